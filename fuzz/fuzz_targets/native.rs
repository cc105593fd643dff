//! The native line protocol (`src/proto/native.rs`) and the UDP reply budget
//! (`src/server/native.rs`, `fit_replies`).
//!
//! The input is one datagram (or the bytes of a TCP stream). Invariants:
//! - a stream cut into reads of any size frames into the same lines as the datagram;
//! - a parsed request, encoded again by the client's encoder, parses to the same request;
//! - a refused line's echoed ID is a valid ID (1 to 20 digits) taken from the line's start;
//! - every reply encodes to one line the client's parser reads back as the same reply;
//! - the replies to a datagram never take more bytes than the datagram (no amplification),
//!   and each is sent (possibly shortened) or counted as dropped, in order.

#![no_main]

use greyhound::proto::native::{
    self as wire, datagram_lines, encode_request, parse_line, parse_reply_line, ErrorKind, Framed,
    LineFramer, Parsed, Reply, MAX_ID, MAX_LINE,
};
use greyhound::proto::policy::{expand_template, TemplateVars, DEFAULT_GREYLIST_TEXT};
use libfuzzer_sys::fuzz_target;

/// What the engine can answer as a PASS reason (`Pass::reason`), plus a long one.
const REASONS: [&str; 9] = [
    "retried",
    "known",
    "awl",
    "exempt:client",
    "exempt:client-name",
    "auth",
    "tls",
    "domain-off",
    "dry-run",
];

/// A parsed line, owned: the request as the client's encoder writes it, or the refusal.
/// (Comparing `Debug` strings instead cost a fifth of this target's time.)
type Signature = Result<Vec<u8>, (Option<String>, ErrorKind)>;

fn signature(parsed: &Parsed<'_>) -> Signature {
    match parsed {
        Ok(req) => {
            let mut out = Vec::new();
            encode_request(req, &mut out);
            Ok(out)
        }
        Err(e) => Err((e.id.map(str::to_owned), e.kind)),
    }
}

/// A control character becomes one space, as the encoders write it.
fn cleaned(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

fn check_request_round_trip(line: &[u8], parsed: &Parsed<'_>) {
    match parsed {
        Ok(req) => {
            let mut out = Vec::new();
            encode_request(req, &mut out);
            assert_eq!(out.last(), Some(&b'\n'), "one line");
            let body = &out[..out.len() - 1];
            assert!(!body.contains(&b'\n'));
            let again = parse_line(body).unwrap_or_else(|e| {
                panic!(
                    "{:?} re-encoded as {:?} is refused: {e:?}",
                    String::from_utf8_lossy(line),
                    String::from_utf8_lossy(body)
                )
            });
            assert_eq!(
                &again,
                req,
                "re-encoded as {:?}",
                String::from_utf8_lossy(body)
            );
        }
        Err(e) => {
            if let Some(id) = e.id {
                assert!((1..=MAX_ID).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_digit()));
                // The echoed ID is the line's first word.
                let first = line
                    .split(|&b| b == b' ' || b == b'\t')
                    .find(|w| !w.is_empty());
                assert_eq!(first, Some(id.as_bytes()));
            }
        }
    }
}

/// The reply a server could give to `parsed` (the greylist text expanded as the server does).
fn reply_for<'a>(parsed: &Parsed<'_>, n: usize, text: &'a mut Vec<u8>) -> Reply<'a> {
    match parsed {
        Ok(wire::Request {
            command: wire::Command::Check(t) | wire::Command::Peek(t),
            ..
        }) => {
            if n % 3 == 0 {
                return Reply::Pass {
                    reason: REASONS[n % REASONS.len()],
                };
            }
            let client = t.client.to_string();
            let template = if n % 3 == 1 {
                DEFAULT_GREYLIST_TEXT
            } else {
                "%%Greylisted %c helo=%h for %d s (%p) %s -> %r %"
            };
            let vars = TemplateVars {
                sender: t.sender,
                recipient: t.recipient,
                client: &client,
                helo: t.helo.unwrap_or(""),
                seconds: (n as u32).wrapping_mul(2_654_435_761),
                protocol: "",
            };
            expand_template(template, &vars, text);
            Reply::Defer {
                seconds: vars.seconds,
                text: std::str::from_utf8(text).expect("an expanded template is UTF-8"),
            }
        }
        Ok(_) => Reply::Pong,
        Err(e) => Reply::Err { kind: e.kind },
    }
}

/// Whether `got` (read back from the wire) is `sent`, its text possibly shortened.
fn same_reply(sent: &Reply<'_>, got: &Reply<'_>, whole: bool) -> bool {
    match (sent, got) {
        (
            Reply::Defer { seconds, text },
            Reply::Defer {
                seconds: s,
                text: t,
            },
        ) => {
            let text = cleaned(text);
            seconds == s
                && if whole {
                    text == *t
                } else {
                    text.starts_with(t)
                }
        }
        (Reply::Pass { reason }, Reply::Pass { reason: r }) => reason == r,
        (Reply::Pong, Reply::Pong) => true,
        (Reply::Err { kind }, Reply::Err { kind: k }) => kind == k,
        _ => false,
    }
}

fuzz_target!(|data: &[u8]| {
    // A small line limit too, so over-long lines are common.
    let small = 8 + usize::from(data.first().copied().unwrap_or(0) % 64);
    for max_line in [MAX_LINE, small] {
        let lines: Vec<Parsed<'_>> = datagram_lines(data, max_line).collect();

        // TCP: the same bytes in reads of a size picked by the input.
        if !data.is_empty() {
            let chunk = 1 + usize::from(data[data.len() - 1] % 17);
            let mut framer = LineFramer::default();
            let mut buf: Vec<u8> = Vec::new();
            let mut framed: Vec<Signature> = Vec::new();
            let mut fed = 0;
            while fed < data.len() {
                let take = chunk.min(data.len() - fed);
                buf.extend_from_slice(&data[fed..fed + take]);
                fed += take;
                let eof = fed == data.len();
                let mut pos = 0;
                loop {
                    let (n, f) = framer.next(&buf[pos..], max_line, eof);
                    assert!(n <= buf.len() - pos, "consumed more than buffered");
                    pos += n;
                    match f {
                        Framed::Line(r) => framed.push(signature(&r)),
                        Framed::Skipped => assert!(n > 0),
                        Framed::NeedMore => break,
                    }
                }
                buf.drain(..pos);
            }
            let datagram: Vec<Signature> = lines.iter().map(signature).collect();
            assert_eq!(framed, datagram, "stream and datagram frame alike");
        }

        let body = data.strip_suffix(b"\n").unwrap_or(data);
        for (raw, parsed) in body.split(|&b| b == b'\n').zip(&lines) {
            let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
            if raw.len() > max_line {
                assert!(matches!(parsed, Err(e) if e.kind == ErrorKind::TooLong));
            }
            check_request_round_trip(raw, parsed);
        }

        if max_line != MAX_LINE {
            // The replies do not depend on the line limit: checked once, at the default.
            continue;
        }
        // The replies, each encoded once as the UDP server does.
        let mut texts: Vec<Vec<u8>> = vec![Vec::new(); lines.len()];
        let replies: Vec<(Option<&str>, Reply<'_>)> = lines
            .iter()
            .zip(texts.iter_mut())
            .enumerate()
            .map(|(n, (parsed, text))| {
                let id = match parsed {
                    Ok(r) => r.id,
                    Err(e) => e.id,
                };
                (id, reply_for(parsed, n, text))
            })
            .collect();
        let mut full = Vec::new();
        let mut forms = Vec::new();
        for (id, reply) in &replies {
            let start = full.len();
            let head = wire::encode_split(*id, reply, &mut full);
            let line = &full[start..];
            assert_eq!(line.last(), Some(&b'\n'));
            assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1, "one line");
            assert!(head < line.len());
            let back = parse_reply_line(&line[..line.len() - 1]).expect("a reply reads back");
            assert_eq!(back.id, *id);
            assert!(
                same_reply(reply, &back.reply, true),
                "{reply:?} read back as {back:?}"
            );
            // The shortest form reads back too.
            let shortest = parse_reply_line(&line[..head]).expect("the shortest form reads back");
            assert!(same_reply(reply, &shortest.reply, false));
            forms.push((start, full.len(), head));
        }

        // No amplification: the replies fit in the datagram's size.
        let budget = data.len();
        let mut out = Vec::new();
        let dropped = greyhound::server::fit_replies(
            forms.iter().map(|&(s, e, h)| (&full[s..e], h)),
            budget,
            &mut out,
        );
        assert!(
            out.len() <= budget,
            "reply of {} bytes to a request of {budget}",
            out.len()
        );
        let sent: Vec<&[u8]> = out
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .collect();
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), sent.len());
        assert_eq!(
            sent.len() + dropped,
            replies.len(),
            "each reply sent or counted"
        );
        // In order: each line sent is one of the replies, after the previous one's.
        let mut next = 0;
        for line in sent {
            let back = parse_reply_line(line).expect("a sent reply reads back");
            let at = replies[next..]
                .iter()
                .position(|(id, r)| *id == back.id && same_reply(r, &back.reply, false))
                .expect("every reply sent was asked for, in order");
            next += at + 1;
        }

        // `encode_within` keeps its budget too.
        for (id, reply) in &replies {
            let mut line = Vec::new();
            if wire::encode_within(*id, reply, budget, &mut line) {
                assert!(line.len() <= budget);
            } else {
                assert!(line.is_empty());
            }
        }
    }
});
