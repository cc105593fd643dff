//! The native line protocol's request handling, shared by TCP and UDP: every complete request
//! of a read (or datagram) is decided in one engine batch, then answered in order.

use std::net::IpAddr;

use crate::engine::{Decision, Mode, Query};
use crate::proto::native::{Command, LineError, Reply, Request, Triplet};
use crate::proto::policy::{expand_template, TemplateVars};

use super::metrics::Tally;
use super::Shared;

/// A parsed line, or why it was refused.
pub(crate) type Parsed<'a> = Result<Request<'a>, LineError<'a>>;

fn query<'a>(t: &Triplet<'a>) -> Query<'a> {
    Query {
        client: t.client,
        sender: t.sender,
        recipient: t.recipient,
        client_name: t.name,
        auth: t.auth,
    }
}

/// Per-connection (or per-worker) buffers, reused across batches.
#[derive(Debug, Default)]
pub(crate) struct NativeScratch {
    decisions: Vec<Option<Decision>>,
    out: Vec<Decision>,
    text: TextBuf,
}

/// Decides every request in `reqs` and calls `emit(index, id, reply)` for each, in order.
///
/// CHECKs are decided together through [`crate::engine::Engine::check_batch`]; a PEEK first
/// flushes the CHECKs before it, so it sees their effect exactly as one-by-one handling would.
pub(crate) fn answer(
    shared: &Shared,
    reqs: &[Parsed<'_>],
    scratch: &mut NativeScratch,
    tally: &mut Tally,
    mut emit: impl FnMut(usize, Option<&str>, &Reply<'_>),
) {
    let engine = &shared.engine;
    let s = scratch;
    s.decisions.clear();
    s.decisions.resize(reqs.len(), None);
    let mut pending: Vec<(usize, Query<'_>)> = Vec::new();
    let flush = |pending: &mut Vec<(usize, Query<'_>)>,
                 decisions: &mut Vec<Option<Decision>>,
                 out: &mut Vec<Decision>| {
        if pending.is_empty() {
            return;
        }
        let qs: Vec<Query<'_>> = pending.iter().map(|(_, q)| *q).collect();
        engine.check_batch(&qs, Mode::Record, out);
        for ((i, _), d) in pending.iter().zip(out.iter()) {
            decisions[*i] = Some(*d);
        }
        pending.clear();
    };
    for (i, r) in reqs.iter().enumerate() {
        match r {
            Ok(Request {
                command: Command::Check(t),
                ..
            }) => pending.push((i, query(t))),
            Ok(Request {
                command: Command::Peek(t),
                ..
            }) => {
                flush(&mut pending, &mut s.decisions, &mut s.out);
                s.decisions[i] = Some(engine.check(&query(t), Mode::Peek));
            }
            _ => {}
        }
    }
    flush(&mut pending, &mut s.decisions, &mut s.out);

    for (i, r) in reqs.iter().enumerate() {
        match r {
            Ok(req) => match &req.command {
                Command::Ping => {
                    tally.request(None);
                    emit(i, req.id, &Reply::Pong);
                }
                Command::Check(t) | Command::Peek(t) => {
                    let d = s.decisions[i].unwrap_or(Decision::Defer { seconds_left: 0 });
                    tally.decision(&d);
                    tracing::debug!(client = %t.client, sender = t.sender, recipient = t.recipient, decision = ?d, "native");
                    match d {
                        Decision::Pass(p) => emit(i, req.id, &Reply::Pass { reason: p.reason() }),
                        Decision::Defer { seconds_left } => {
                            let d = DeferFor {
                                client: t.client,
                                sender: t.sender,
                                recipient: t.recipient,
                                helo: t.helo.unwrap_or(""),
                                seconds: seconds_left,
                            };
                            let text = shared.settings.defer_text(&d, &mut s.text);
                            emit(
                                i,
                                req.id,
                                &Reply::Defer {
                                    seconds: seconds_left,
                                    text,
                                },
                            );
                        }
                    }
                }
            },
            Err(e) => {
                tally.error(e.kind.as_code());
                emit(i, e.id, &Reply::Err { kind: e.kind });
            }
        }
    }
}

/// The parts of a request a greylist text can mention.
pub(crate) struct DeferFor<'a> {
    pub(crate) client: IpAddr,
    pub(crate) sender: &'a str,
    pub(crate) recipient: &'a str,
    pub(crate) helo: &'a str,
    pub(crate) seconds: u32,
}

/// Reusable buffers for expanding greylist texts.
#[derive(Debug, Default)]
pub(crate) struct TextBuf {
    text: Vec<u8>,
    client: String,
}

impl super::Settings {
    /// Expands the greylist text for a DEFER. The client address is formatted only when the
    /// template asks for it (`%c`).
    pub(crate) fn defer_text<'b>(&self, d: &DeferFor<'_>, buf: &'b mut TextBuf) -> &'b str {
        use std::fmt::Write;
        buf.client.clear();
        if self.template_uses_client {
            let _ = write!(buf.client, "{}", d.client);
        }
        buf.text.clear();
        let vars = TemplateVars {
            sender: if d.sender.is_empty() { "<>" } else { d.sender },
            recipient: d.recipient,
            client: &buf.client,
            helo: d.helo,
            seconds: d.seconds,
        };
        expand_template(&self.greylist_text, &vars, &mut buf.text);
        // The template and the request fields are UTF-8, so the expansion is too.
        std::str::from_utf8(&buf.text).unwrap_or("Greylisted")
    }
}
