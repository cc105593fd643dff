//! One Postfix policy connection: attribute blocks in, `action=...` out, the connection
//! reused for the next block. Greylisting happens at `protocol_state=RCPT`; other stages
//! answer `DUNNO`. A malformed block is logged and the connection closed without a reply,
//! which Postfix treats as a policy service failure for that one request.

use std::net::IpAddr;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::engine::{Decision, Mode, Pass, Query};
use crate::proto::policy::{self as wire, Block, PolicyRequest};

use super::metrics::{Proto, Tally, KIND_NOT_RCPT};
use super::native::{DeferFor, TextBuf};
use super::{idle, read_some, write_all, Shared};

/// Serves one connection until the peer closes it, it idles out, it sends a malformed block
/// or the server shuts down.
pub(crate) async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    peer: String,
    shared: &Shared,
    token: &CancellationToken,
) {
    let l = &shared.settings.limits;
    let limits = wire::Limits {
        max_block: l.policy_max_block,
        max_attrs: l.policy_max_attributes,
    };
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut out: Vec<u8> = Vec::with_capacity(1024);
    let mut scratch = Scratch::default();
    let mut tally = Tally::default();
    loop {
        // Answer every complete block already buffered, then read more.
        let mut pos = 0;
        let mut bad = None;
        loop {
            match wire::parse(&buf[pos..], &limits) {
                Ok(Block::Complete { consumed, request }) => {
                    if let Err(code) = answer(shared, &request, &mut out, &mut scratch, &mut tally)
                    {
                        bad = Some(code);
                        break;
                    }
                    pos += consumed;
                }
                Ok(Block::Incomplete) => break,
                Err(e) => {
                    bad = Some(e.as_code());
                    break;
                }
            }
        }
        buf.drain(..pos);
        if let Some(code) = bad {
            tally.error(code);
            shared.log_bad(&peer, "policy", code);
        }
        shared.metrics.flush(Proto::Policy, &mut tally);
        // Blocks answered before a malformed one still get their answers.
        if !out.is_empty() {
            if !write_all(&mut stream, &out, idle(l)).await {
                break;
            }
            out.clear();
        }
        if bad.is_some() {
            break;
        }
        match read_some(&mut stream, &mut buf, idle(l), token).await {
            None | Some(0) => break,
            Some(_) => {}
        }
    }
    let _ = stream.shutdown().await;
}

#[derive(Default)]
struct Scratch {
    text: TextBuf,
    action: Vec<u8>,
}

/// Appends the reply to one block; `Err` is a malformed request (close without reply).
fn answer(
    shared: &Shared,
    req: &PolicyRequest<'_>,
    out: &mut Vec<u8>,
    s: &mut Scratch,
    tally: &mut Tally,
) -> Result<(), &'static str> {
    if !req.protocol_state.eq_ignore_ascii_case("RCPT") || req.recipient.is_empty() {
        tally.request(Some(KIND_NOT_RCPT));
        wire::encode_action("DUNNO", out);
        return Ok(());
    }
    let client: IpAddr = req
        .client_address
        .parse()
        .map_err(|_| "policy-bad-client-address")?;
    // Postfix writes "unknown" when the name did not verify; only a verified name may match.
    let client_name =
        Some(req.client_name).filter(|n| !n.is_empty() && !n.eq_ignore_ascii_case("unknown"));
    let q = Query {
        client,
        sender: req.sender,
        recipient: req.recipient,
        client_name,
        auth: Some(req.sasl_username),
    };
    let d = shared.engine.check(&q, Mode::Record);
    tally.decision(&d);
    tracing::debug!(%client, sender = req.sender, recipient = req.recipient, queue_id = req.queue_id, decision = ?d, "policy");
    let settings = &shared.settings;
    match d {
        Decision::Defer { seconds_left } => {
            let d = DeferFor {
                client,
                sender: req.sender,
                recipient: req.recipient,
                helo: req.helo_name,
                seconds: seconds_left,
            };
            let text = settings.defer_text(&d, &mut s.text);
            s.action.clear();
            s.action.extend_from_slice(b"DEFER_IF_PERMIT ");
            s.action.extend_from_slice(text.as_bytes());
            wire::encode_action(
                std::str::from_utf8(&s.action).unwrap_or("DEFER_IF_PERMIT Greylisted"),
                out,
            );
        }
        Decision::Pass(Pass::Retried { delayed }) if settings.x_greylist_header => {
            s.action.clear();
            let now = crate::engine::clock::to_unix(shared.engine.now());
            wire::x_greylist_prepend(
                delayed,
                env!("CARGO_PKG_VERSION"),
                &settings.hostname,
                now,
                &mut s.action,
            );
            wire::encode_action(std::str::from_utf8(&s.action).unwrap_or("DUNNO"), out);
        }
        Decision::Pass(_) => wire::encode_action("DUNNO", out),
    }
    Ok(())
}
