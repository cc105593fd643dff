//! One Postfix policy connection: attribute blocks in, `action=...` out, the connection
//! reused for the next block. Greylisting happens at `protocol_state=RCPT`; other stages
//! answer `DUNNO`. A malformed block is logged and the connection closed without a reply,
//! which Postfix treats as a policy service failure for that one request.

use std::net::IpAddr;

use crate::engine::{ClientCert, Decision, Mode, Pass, Query};
use crate::proto::policy::{self as wire, Block, BlockLimits, PolicyRequest};

use super::conn::{Conn, Read, Stream};
use super::metrics::{Answer, Proto, RequestError, Tally};
use super::native::{DeferFor, TextBuf};
use super::spf::Passed;
use super::Shared;

/// Serves one connection until the peer closes it, it idles out, it sends a malformed block
/// or the server shuts down.
pub(crate) async fn serve<S: Stream>(mut conn: Conn<S>, peer: &str, shared: &Shared) {
    let l = &shared.settings.limits;
    let limits = BlockLimits {
        max_block: l.policy_max_block,
        max_attrs: l.policy_max_attributes,
    };
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut out: Vec<u8> = Vec::with_capacity(1024);
    let mut scratch = Scratch::default();
    let mut tally = Tally::new(Proto::Policy);
    loop {
        // Answer every complete block already buffered, then read more.
        let mut pos = 0;
        let mut bad = None;
        loop {
            match wire::parse(&buf[pos..], &limits) {
                Ok(Block::Complete { consumed, request }) => {
                    let spf = match &shared.spf {
                        Some(s) => wait_for_spf(&s.spf, &request).await,
                        None => Passed::NO,
                    };
                    if let Err(e) =
                        answer(shared, &request, spf, &mut out, &mut scratch, &mut tally)
                    {
                        bad = Some(e);
                        break;
                    }
                    pos += consumed;
                }
                Ok(Block::Incomplete) => break,
                Err(e) => {
                    bad = Some(RequestError::Policy(e));
                    break;
                }
            }
        }
        buf.drain(..pos);
        if let Some(e) = bad {
            tally.error(e);
            shared.log_bad(peer, "policy", e.code());
        }
        shared.metrics.flush(&mut tally);
        // Blocks answered before a malformed one still get their answers.
        if !out.is_empty() {
            if !conn.write_all(&out).await {
                break;
            }
            out.clear();
        }
        if bad.is_some() {
            break;
        }
        match conn.read(&mut buf).await {
            Read::Data => {}
            Read::Eof | Read::Close => break,
        }
    }
    conn.shutdown();
}

/// Whether a RCPT-stage request passes SPF, and for which domain: from the cache, or waiting
/// (at most the timeout) for its lookup.
async fn wait_for_spf(spf: &std::sync::Arc<crate::spf::Spf>, req: &PolicyRequest<'_>) -> Passed {
    if !req.protocol_state.eq_ignore_ascii_case("RCPT") || req.recipient.is_empty() {
        return Passed::NO;
    }
    match req.client_address.parse::<IpAddr>() {
        Ok(client) => super::spf::resolve_one(spf, client, req.sender, req.helo_name).await,
        Err(_) => Passed::NO,
    }
}

#[derive(Default)]
struct Scratch {
    text: TextBuf,
    action: Vec<u8>,
}

/// Appends the reply to one block; `Err` is a malformed request (close without reply). `spf`:
/// whether, and for which domain, the client passed SPF.
fn answer(
    shared: &Shared,
    req: &PolicyRequest<'_>,
    spf: Passed,
    out: &mut Vec<u8>,
    s: &mut Scratch,
    tally: &mut Tally,
) -> Result<(), RequestError> {
    if !req.protocol_state.eq_ignore_ascii_case("RCPT") || req.recipient.is_empty() {
        tally.answer(Answer::NotRcpt);
        wire::encode_action("DUNNO", out);
        return Ok(());
    }
    let client: IpAddr = req
        .client_address
        .parse()
        .map_err(|_| RequestError::PolicyBadClientAddress)?;
    // Postfix writes "unknown" when the name did not verify; only a verified name may match.
    let client_name =
        Some(req.client_name).filter(|n| !n.is_empty() && !n.eq_ignore_ascii_case("unknown"));
    let q = Query {
        client,
        sender: req.sender,
        recipient: req.recipient,
        client_name,
        auth: Some(req.sasl_username),
        // Postfix sends these only with `smtpd_tls_ask_ccert = yes`; the subject only for a
        // verified chain.
        cert: ClientCert {
            fingerprint: req.ccert_fingerprint,
            pubkey_fingerprint: req.ccert_pubkey_fingerprint,
            subject: req.ccert_subject,
        },
        body: None,
        spf: spf.identity(req.sender, req.helo_name),
    };
    let d = shared.engine.check(&q, Mode::Record);
    tally.answer(Answer::Decided(d));
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
                protocol: req.protocol_name,
            };
            let text = settings.defer_text(&d, &mut s.text);
            wire::encode_defer(settings.defer_action, text, out);
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
