//! The native line protocol's answers, shared by TCP and UDP: the requests of a read (or of a
//! batch of datagrams) are decided through one engine batch and answered in order.

use std::net::IpAddr;

use crate::engine::{ClientCert, Decision, Mode, Query};
use crate::proto::native::{Command, Parsed, Reply, Request, Triplet};
use crate::proto::policy::{expand_template, TemplateVars};

use super::metrics::{Answer, RequestError, Tally};
use super::spf::Passed;
use super::Shared;

fn query<'a>(t: &Triplet<'a>) -> Query<'a> {
    Query {
        client: t.client,
        sender: t.sender,
        recipient: t.recipient,
        client_name: t.name,
        auth: t.auth,
        cert: ClientCert {
            fingerprint: t.cert.unwrap_or(""),
            pubkey_fingerprint: "",
            subject: t.cert_subject.unwrap_or(""),
        },
        body: t.body,
        spf: None,
    }
}

/// The query of a CHECK or PEEK line, and how to decide it; `None` for other lines. `spf`
/// says whether, and for which domain, it passed SPF (the transport found out before deciding).
fn to_decide<'q>(r: &'q Parsed<'_>, spf: Passed) -> Option<(Query<'q>, Mode)> {
    let (t, mode) = match r {
        Ok(Request {
            command: Command::Check(t),
            ..
        }) => (t, Mode::Record),
        Ok(Request {
            command: Command::Peek(t),
            ..
        }) => (t, Mode::Peek),
        _ => return None,
    };
    let mut q = query(t);
    q.spf = spf.identity(t.sender, t.helo.unwrap_or(""));
    Some((q, mode))
}

/// Decides every request in `reqs`, in order, through one engine batch (one exemption-list
/// load, one clock read; see `Batch::decide_each`), and calls `emit(id, reply)` for each.
/// `spf` holds, when SPF lookups are on, whether each request passed SPF and for which domain
/// (empty otherwise).
pub(crate) fn answer(
    shared: &Shared,
    reqs: &[Parsed<'_>],
    spf: &[Passed],
    texts: &mut TextBuf,
    tally: &mut Tally,
    mut emit: impl FnMut(Option<&str>, &Reply<'_>),
) {
    shared.engine.batch(|batch| {
        batch.decide_each(
            reqs,
            |i, r| to_decide(r, spf.get(i).copied().unwrap_or(Passed::NO)),
            |r, d| match (r, d) {
            (Ok(req), Some(d)) => {
                let t = match &req.command {
                    Command::Check(t) => {
                        tally.answer(Answer::Decided(d));
                        t
                    }
                    Command::Peek(t) => {
                        tally.peek();
                        t
                    }
                    // `to_decide` gives a PING no query, so it has no decision.
                    Command::Ping => return,
                };
                tracing::debug!(client = %t.client, sender = t.sender, recipient = t.recipient, decision = ?d, "native");
                match d {
                    Decision::Pass(p) => emit(req.id, &Reply::Pass { reason: p.reason() }),
                    Decision::Defer { seconds_left } => {
                        let d = DeferFor {
                            client: t.client,
                            sender: t.sender,
                            recipient: t.recipient,
                            helo: t.helo.unwrap_or(""),
                            seconds: seconds_left,
                            // The native protocol does not say which SMTP dialect was spoken.
                            protocol: "",
                        };
                        let text = shared.settings.defer_text(&d, texts);
                        emit(req.id, &Reply::Defer { seconds: seconds_left, text });
                    }
                }
            }
            (Ok(req), None) => {
                tally.other();
                emit(req.id, &Reply::Pong);
            }
            (Err(e), _) => {
                tally.error(RequestError::Native(e.kind));
                emit(e.id, &Reply::Err { kind: e.kind });
            }
            },
        );
    });
}

/// An empty vector of `U`, keeping `v`'s allocation when `U` is `T` with other lifetimes: the
/// request and reply lists of a read borrow its buffer and are emptied before it changes, so
/// one allocation serves every read, without any `unsafe`.
pub(crate) fn recycle<T, U>(mut v: Vec<T>) -> Vec<U> {
    v.clear();
    // Collecting the (zero) items of a vector into one of a type of the same size reuses its
    // allocation (in-place collection).
    v.into_iter().map(|_| unreachable!()).collect()
}

/// Appends one datagram's replies within `budget` bytes (the request's size: no
/// amplification). Each reply is `(line, head)`: the full line, ending in `\n`, and the length
/// of its head (`proto::native::encode_split`); the head and a `\n` are its shortest form.
/// When every shortest form fits, all replies are sent and the room left over goes to their
/// texts in order (a text is cut at a character boundary when it does not fit whole);
/// otherwise replies are taken in order, in their shortest form, as long as they fit, and the
/// client matches them by ID. Returns how many replies were left out.
pub fn fit_replies<'a>(
    lines: impl Iterator<Item = (&'a [u8], usize)> + Clone,
    budget: usize,
    out: &mut Vec<u8>,
) -> usize {
    let push_shortest = |f: &[u8], head: usize, out: &mut Vec<u8>| {
        out.extend_from_slice(&f[..head]);
        out.push(b'\n');
    };
    let needed: usize = lines.clone().map(|(_, head)| head + 1).sum();
    if needed > budget {
        let mut left = budget;
        let mut dropped = 0;
        for (f, head) in lines {
            if head < left {
                push_shortest(f, head, out);
                left -= head + 1;
            } else {
                dropped += 1;
            }
        }
        return dropped;
    }
    let mut extra = budget - needed;
    for (f, head) in lines {
        let more = f.len() - (head + 1);
        if more <= extra {
            out.extend_from_slice(f);
            extra -= more;
            continue;
        }
        // The full form is the head with " text" before its newline: keep as much of the
        // text as fits, never splitting a UTF-8 character.
        let mut cut = head + extra;
        while cut > head + 1 && (f[cut] & 0xC0) == 0x80 {
            cut -= 1;
        }
        // A cut that would leave only the separating space (or nothing) sends the shortest form.
        if cut > head + 1 {
            out.extend_from_slice(&f[..cut]);
            out.push(b'\n');
            extra -= cut - head;
        } else {
            push_shortest(f, head, out);
        }
    }
    0
}

/// The parts of a request a greylist text can mention.
pub(crate) struct DeferFor<'a> {
    pub(crate) client: IpAddr,
    pub(crate) sender: &'a str,
    pub(crate) recipient: &'a str,
    pub(crate) helo: &'a str,
    pub(crate) seconds: u32,
    /// `ESMTP`, `SMTP` or `""` (unknown).
    pub(crate) protocol: &'a str,
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
            protocol: d.protocol,
        };
        expand_template(&self.greylist_text, &vars, &mut buf.text);
        // The template and the request fields are UTF-8, so the expansion is too.
        std::str::from_utf8(&buf.text).unwrap_or("Greylisted")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::native::{self as wire, ErrorKind};

    /// A reply's full line and its shortest form.
    fn forms(id: Option<&str>, r: &Reply<'_>) -> (Vec<u8>, Vec<u8>) {
        let mut f = Vec::new();
        let head = wire::encode_split(id, r, &mut f);
        let mut s = f[..head].to_vec();
        s.push(b'\n');
        // The shortest form is what encode_within sends in the least room.
        let mut least = Vec::new();
        assert!(wire::encode_within(id, r, s.len(), &mut least));
        assert_eq!(least, s);
        (f, s)
    }

    fn fit(replies: &[(Option<&str>, Reply<'_>)], budget: usize) -> String {
        let owned: Vec<(Vec<u8>, usize)> = replies
            .iter()
            .map(|(id, r)| {
                let (f, s) = forms(*id, r);
                (f, s.len() - 1)
            })
            .collect();
        let lines: Vec<(&[u8], usize)> = owned.iter().map(|(f, h)| (&f[..], *h)).collect();
        let mut out = Vec::new();
        let dropped = fit_replies(lines.iter().copied(), budget, &mut out);
        assert!(out.len() <= budget, "{} > {budget}", out.len());
        let sent = out.iter().filter(|&&b| b == b'\n').count();
        assert_eq!(
            sent + dropped,
            replies.len(),
            "every reply is sent or counted as dropped"
        );
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn shortest_forms() {
        assert_eq!(
            forms(
                Some("1"),
                &Reply::Defer {
                    seconds: 300,
                    text: "Greylisted"
                }
            )
            .1,
            b"1 DEFER 300\n"
        );
        assert_eq!(
            forms(
                None,
                &Reply::Err {
                    kind: ErrorKind::Empty
                }
            )
            .1,
            b"ERR empty\n"
        );
        assert_eq!(forms(Some("7"), &Reply::Pong).1, b"7 PONG\n");
    }

    #[test]
    fn long_text_does_not_crowd_out_later_replies() {
        let defer = Reply::Defer {
            seconds: 2,
            text: "Greylisted, see https://greylisting.org/; from=m@s to=n@r",
        };
        let replies = [
            (Some("1"), defer),
            (Some("2"), Reply::Pong),
            (
                Some("3"),
                Reply::Err {
                    kind: ErrorKind::UnknownVerb,
                },
            ),
            (Some("4"), Reply::Pong),
        ];
        // Shortest forms: "1 DEFER 2\n" 10 + "2 PONG\n" 7 + "3 ERR unknown-verb\n" 19 + 7 = 43.
        assert_eq!(
            fit(&replies, 43),
            "1 DEFER 2\n2 PONG\n3 ERR unknown-verb\n4 PONG\n"
        );
        // Five bytes more go to the first text: " Grey" would leave "Grey"; the cut keeps 4 chars.
        assert_eq!(
            fit(&replies, 48),
            "1 DEFER 2 Grey\n2 PONG\n3 ERR unknown-verb\n4 PONG\n"
        );
        // One byte short of the shortest forms: the last reply that does not fit is left out.
        assert_eq!(fit(&replies, 42), "1 DEFER 2\n2 PONG\n3 ERR unknown-verb\n");
    }

    #[test]
    fn tiny_datagrams_keep_earlier_answers() {
        // "1 PING\n2 PING\n\n" is 15 bytes: two PONGs (14 bytes) fit, the empty line's ERR not.
        let replies = [
            (Some("1"), Reply::Pong),
            (Some("2"), Reply::Pong),
            (
                None,
                Reply::Err {
                    kind: ErrorKind::Empty,
                },
            ),
        ];
        assert_eq!(fit(&replies, 15), "1 PONG\n2 PONG\n");
    }

    #[test]
    fn texts_are_cut_on_character_boundaries() {
        let r = [(
            None,
            Reply::Defer {
                seconds: 5,
                text: "ééé",
            },
        )];
        // "DEFER 5\n" is 8; with 4 more bytes: " é" is 3 bytes, the next é would split.
        assert_eq!(fit(&r, 12), "DEFER 5 é\n");
        assert_eq!(fit(&r, 9), "DEFER 5\n");
        assert_eq!(fit(&r, 100), "DEFER 5 ééé\n");
    }
}
