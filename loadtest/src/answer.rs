//! Reading replies: a native reply line or a Postfix `action=` line, classified by kind and
//! counted without allocating (the counters sit on the client's hot path).

use std::collections::BTreeMap;

use greyhound::proto::native;
use serde::{Deserialize, Serialize};

/// PASS reasons the client counts by name; anything else counts as `other`.
/// `dunno` and `prepend` are what the policy protocol says for a pass (its reason is not on
/// the wire: `prepend` is the first pass after a retry, `dunno` every other).
pub const PASS_REASONS: [&str; 13] = [
    "retried",
    "known",
    "awl",
    "exempt:client",
    "exempt:client-name",
    "exempt:sender",
    "exempt:recipient",
    "auth",
    "tls",
    "dry-run",
    "dunno",
    "prepend",
    "other",
];

/// One reply, classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// `DEFER`, or `action=` with a `--defer-action`: `DEFER_IF_PERMIT`, `DEFER`, `450` or `451`.
    Defer,
    /// `PASS <reason>`, `action=DUNNO` or `action=PREPEND`; index into [`PASS_REASONS`].
    Pass(usize),
    /// `ERR <code>`.
    Err(&'static str),
    /// `PONG`.
    Pong,
    /// Anything else.
    Other,
}

/// Reads a native reply line (without its `\n`) through `greyhound::proto::native`: its ID as
/// a number (the client numbers its requests) and its classification.
pub fn native(line: &[u8]) -> (Option<u64>, Answer) {
    classify_native(&native::parse_reply_line(line))
}

/// Reads a native reply line (without its `\n`) as [`native()`] does, but the two replies a
/// load run is made of, `[ID ]DEFER <secs> <text>` and `[ID ]PASS known|retried`, are
/// recognised from their first bytes; anything else goes through the codec's
/// `parse_reply_line`. Same result as [`native()`] for every line (a property test checks):
/// reading a reply through the codec was ~260 of the client thread's 1,055 instructions per
/// request (callgrind, docs/LOADTEST.md).
#[inline]
pub fn native_fast(line: &[u8]) -> (Option<u64>, Answer) {
    let body = line.strip_suffix(b"\r").unwrap_or(line);
    let digits = body.iter().take_while(|b| b.is_ascii_digit()).count();
    let (id, rest) = if digits == 0 {
        (None, body)
    } else if digits < 20 && body.get(digits) == Some(&b' ') {
        // Below 20 digits a number always fits a u64.
        let n = body[..digits]
            .iter()
            .fold(0u64, |n, &b| n * 10 + u64::from(b - b'0'));
        (Some(n), &body[digits + 1..])
    } else {
        return native(line);
    };
    if let Some(after) = rest.strip_prefix(b"DEFER ") {
        // Seconds that fit a u32 (at most 9 digits), then the end or a space and text,
        // which the codec requires to be UTF-8 (ASCII here; anything else takes the codec).
        let secs = after.iter().take_while(|b| b.is_ascii_digit()).count();
        if (1..=9).contains(&secs)
            && after.get(secs).is_none_or(|&b| b == b' ')
            && after[secs..].is_ascii()
        {
            return (id, Answer::Defer);
        }
    } else if rest == b"PASS known" {
        return (id, Answer::Pass(KNOWN));
    } else if rest == b"PASS retried" {
        return (id, Answer::Pass(RETRIED));
    }
    native(line)
}

/// Frames and reads the first native reply line of `buf` (lines end in `\n`): `None` when no
/// line is complete yet, else the line's ID, its answer and the bytes it took (terminator
/// included). The answer is [`native_fast`]'s; a bare `PASS known` (70 % of a default run's
/// replies, and all of a null responder's) is recognised by its fixed bytes before any search
/// for the line end, so it costs a few compares (the `memchr` call alone was ~50
/// instructions per reply, callgrind).
#[inline]
pub fn native_next(buf: &[u8]) -> Option<(Option<u64>, Answer, usize)> {
    let digits = buf.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits < 20 && (digits == 0 || buf.get(digits) == Some(&b' ')) {
        let at = if digits == 0 { 0 } else { digits + 1 };
        if buf[at..].starts_with(b"PASS known\n") {
            // Below 20 digits a number always fits a u64.
            let id = (digits > 0).then(|| {
                buf[..digits]
                    .iter()
                    .fold(0u64, |n, &b| n * 10 + u64::from(b - b'0'))
            });
            return Some((id, Answer::Pass(KNOWN), at + b"PASS known\n".len()));
        }
    }
    let end = memchr::memchr(b'\n', buf)?;
    let (id, a) = native_fast(&buf[..end]);
    Some((id, a, end + 1))
}

/// Indices of the two common reasons in [`PASS_REASONS`].
const RETRIED: usize = 0;
const KNOWN: usize = 1;

/// Classifies what [`native::parse_reply`] or [`native::parse_reply_line`] read; a reply that
/// could not be read is `Other`, with no ID.
pub fn classify_native(
    r: &Result<native::ReplyLine<'_>, native::ReplyError>,
) -> (Option<u64>, Answer) {
    let Ok(r) = r else {
        return (None, Answer::Other);
    };
    // At most 20 digits, but 20 digits can still overflow a u64: that is no ID of ours.
    let id = r.id.and_then(|id| id.parse().ok());
    let answer = match r.reply {
        native::Reply::Defer { .. } => Answer::Defer,
        native::Reply::Pass { reason } => Answer::Pass(reason_index(reason)),
        native::Reply::Err { kind } => Answer::Err(kind.as_code()),
        native::Reply::Pong => Answer::Pong,
    };
    (id, answer)
}

/// Classifies a policy reply by its action (the value `greyhound::proto::policy::parse_action` returns).
pub fn policy(action: &str) -> Answer {
    match action.split_once(' ').map_or(action, |(word, _)| word) {
        // Every `--defer-action` the server can be given; the numeric ones are followed by
        // the enhanced status code and the text (`450 4.7.1 Greylisted, …`).
        "DEFER_IF_PERMIT" | "DEFER" | "450" | "451" => Answer::Defer,
        "DUNNO" | "dunno" => Answer::Pass(reason_index("dunno")),
        "PREPEND" | "prepend" => Answer::Pass(reason_index("prepend")),
        _ => Answer::Other,
    }
}

fn reason_index(reason: &str) -> usize {
    PASS_REASONS
        .iter()
        .position(|&r| r == reason)
        .unwrap_or(PASS_REASONS.len() - 1)
}

/// Replies and failures of one worker, by kind.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    /// DEFER answers.
    pub defer: u64,
    /// PASS answers by reason, indexed like [`PASS_REASONS`].
    pub pass: [u64; PASS_REASONS.len()],
    /// ERR answers by code.
    pub err: BTreeMap<String, u64>,
    /// PONG answers.
    pub pong: u64,
    /// Replies that are none of the above.
    pub other: u64,
    /// Requests that got no answer in time (lost datagrams, a dead connection).
    pub timeouts: u64,
    /// UDP replies whose ID matched nothing outstanding (late after a timeout, duplicated).
    pub unmatched: u64,
    /// Connections that failed (could not connect, reset, closed by the server).
    pub connection_errors: u64,
    /// Open loop: requests whose send time had come when the run stopped but that were
    /// never sent, because the window was full (the server was slower than the rate).
    pub behind_schedule: u64,
}

impl Tally {
    /// Counts one answer; returns whether it is a decision (DEFER or PASS), the only answers
    /// that count as throughput.
    #[inline(always)]
    pub fn count(&mut self, a: Answer) -> bool {
        match a {
            Answer::Defer => self.defer += 1,
            Answer::Pass(i) => self.pass[i] += 1,
            _ => {
                self.count_other(a);
                return false;
            }
        }
        true
    }

    /// The answers that are not decisions: rare, kept off the inlined path.
    #[cold]
    #[inline(never)]
    fn count_other(&mut self, a: Answer) {
        match a {
            Answer::Err(code) => {
                // The key is only allocated the first time.
                match self.err.get_mut(code) {
                    Some(n) => *n += 1,
                    None => {
                        self.err.insert(code.to_string(), 1);
                    }
                }
            }
            Answer::Pong => self.pong += 1,
            Answer::Other => self.other += 1,
            Answer::Defer | Answer::Pass(_) => unreachable!("decisions are counted inline"),
        }
    }

    /// Adds another worker's tally.
    pub fn add(&mut self, o: &Tally) {
        self.defer += o.defer;
        for (a, b) in self.pass.iter_mut().zip(o.pass) {
            *a += b;
        }
        for (k, v) in &o.err {
            *self.err.entry(k.clone()).or_default() += v;
        }
        self.pong += o.pong;
        self.other += o.other;
        self.timeouts += o.timeouts;
        self.unmatched += o.unmatched;
        self.connection_errors += o.connection_errors;
        self.behind_schedule += o.behind_schedule;
    }

    /// DEFER and PASS answers: the decisions, the only answers counted as throughput.
    pub fn decisions(&self) -> u64 {
        self.defer + self.pass.iter().sum::<u64>()
    }

    /// The tally as it is reported.
    pub fn to_answers(&self) -> Answers {
        Answers {
            defer: self.defer,
            pass: PASS_REASONS
                .iter()
                .zip(self.pass)
                .filter(|&(_, n)| n > 0)
                .map(|(r, n)| (r.to_string(), n))
                .collect(),
            err: self.err.clone(),
            pong: self.pong,
            other: self.other,
            timeouts: self.timeouts,
            unmatched: self.unmatched,
            connection_errors: self.connection_errors,
            behind_schedule: self.behind_schedule,
        }
    }
}

/// Answers by kind, as reported (text and JSON).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answers {
    /// DEFER answers.
    pub defer: u64,
    /// PASS answers by reason (only reasons seen).
    pub pass: BTreeMap<String, u64>,
    /// ERR answers by code.
    pub err: BTreeMap<String, u64>,
    /// PONG answers.
    pub pong: u64,
    /// Unrecognised replies.
    pub other: u64,
    /// Requests never answered within the timeout.
    pub timeouts: u64,
    /// UDP replies matching no outstanding request.
    pub unmatched: u64,
    /// Connections that failed.
    pub connection_errors: u64,
    /// Open loop: requests due by the end but never sent (the server fell behind the rate).
    pub behind_schedule: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn native_replies_are_classified_with_their_id() {
        assert_eq!(
            native(b"17 DEFER 300 Greylisted"),
            (Some(17), Answer::Defer)
        );
        assert_eq!(native(b"PASS known"), (None, Answer::Pass(1)));
        assert_eq!(native(b"3 PASS exempt:client"), (Some(3), Answer::Pass(3)));
        assert_eq!(
            native(b"3 PASS whatever"),
            (Some(3), Answer::Pass(reason_index("other")))
        );
        // A trusted TLS client's pass is a reason of its own, not `other`.
        let tls = native(b"4 PASS tls");
        assert_eq!(tls, (Some(4), Answer::Pass(reason_index("tls"))));
        assert_eq!(PASS_REASONS[reason_index("tls")], "tls");
        assert_eq!(native_fast(b"4 PASS tls"), tls);
        let mut t = Tally::default();
        assert!(t.count(tls.1));
        assert_eq!(t.to_answers().pass.get("tls"), Some(&1));
        assert_eq!(t.to_answers().other, 0);
        assert_eq!(
            native(b"9 ERR bad-ip malformed"),
            (Some(9), Answer::Err("bad-ip"))
        );
        assert_eq!(native(b"9 ERR what x"), (None, Answer::Other));
        assert_eq!(native(b"PONG"), (None, Answer::Pong));
        assert_eq!(native(b"DEFER 12\r"), (None, Answer::Defer));
        assert_eq!(native(b"HELLO"), (None, Answer::Other));
        // An ID that overflows u64 is no ID.
        assert_eq!(native(b"99999999999999999999 PONG").0, None);
    }

    #[test]
    fn fast_path_reads_the_common_replies() {
        assert_eq!(
            native_fast(b"17 DEFER 300 Greylisted"),
            (Some(17), Answer::Defer)
        );
        assert_eq!(native_fast(b"DEFER 1"), (None, Answer::Defer));
        assert_eq!(
            native_fast(b"4 PASS known\r"),
            (Some(4), Answer::Pass(KNOWN))
        );
        assert_eq!(native_fast(b"PASS retried"), (None, Answer::Pass(RETRIED)));
        assert_eq!(PASS_REASONS[KNOWN], "known");
        assert_eq!(PASS_REASONS[RETRIED], "retried");
        // Not plain: through the codec, same answers as `native`.
        assert_eq!(
            native_fast(b"9 ERR bad-ip x"),
            (Some(9), Answer::Err("bad-ip"))
        );
        assert_eq!(native_fast(b"DEFER 9999999999 x"), (None, Answer::Other));
        assert_eq!(native_fast(b"DEFER x"), (None, Answer::Other));
        assert_eq!(native_fast(b"DEFER 5 \xff"), (None, Answer::Other));
        assert_eq!(native_fast(b"99999999999999999999 PASS known").0, None);
    }

    proptest::proptest! {
        /// The fast path answers exactly what the codec's parse does, for lines made of
        /// the pieces replies are made of (and some that are not).
        #[test]
        fn fast_path_agrees_with_the_codec(
            id in proptest::option::of("[0-9]{0,22}"),
            space in proptest::bool::ANY,
            word in proptest::sample::select(vec![
                "DEFER", "PASS", "PONG", "ERR", "defer", "PASSX", "", "DEFER5",
            ]),
            args in proptest::collection::vec(
                proptest::sample::select(vec![
                    "300", "0", "4294967295", "4294967296", "999999999", "1234567890",
                    "known", "retried", "known ", "bad-ip", "Greylisted,", "x", "", "\u{e9}",
                ]),
                0..4,
            ),
            tail in proptest::sample::select(vec![&b""[..], b"\r", b"\xff", b" ", b"\r\r"]),
        ) {
            let mut line = Vec::new();
            if let Some(id) = id {
                line.extend_from_slice(id.as_bytes());
                if space {
                    line.push(b' ');
                }
            }
            line.extend_from_slice(word.as_bytes());
            for a in &args {
                line.push(b' ');
                line.extend_from_slice(a.as_bytes());
            }
            line.extend_from_slice(tail);
            proptest::prop_assert_eq!(native_fast(&line), native(&line), "{:?}", String::from_utf8_lossy(&line));
            // Framed from a buffer: the same answer, the line and its `\n` taken, nothing
            // without a `\n`.
            let (id, a) = native(&line);
            let framed = [&line[..], b"\n", b"7 PASS known\n"].concat();
            if !line.contains(&b'\n') {
                proptest::prop_assert_eq!(native_next(&framed), Some((id, a, line.len() + 1)));
                proptest::prop_assert_eq!(native_next(&line), None);
            }
        }
    }

    #[test]
    fn policy_actions_are_classified() {
        assert_eq!(policy("DEFER_IF_PERMIT Greylisted, see x"), Answer::Defer);
        assert_eq!(policy("DUNNO"), Answer::Pass(reason_index("dunno")));
        assert_eq!(PASS_REASONS[reason_index("dunno")], "dunno");
        assert_eq!(
            policy("PREPEND X-Greylist: delayed 2 seconds"),
            Answer::Pass(reason_index("prepend"))
        );
        assert_eq!(PASS_REASONS[reason_index("prepend")], "prepend");
        // The other `--defer-action` values are deferrals too.
        assert_eq!(policy("DEFER Greylisted, see x"), Answer::Defer);
        assert_eq!(policy("450 4.7.1 Greylisted, see x"), Answer::Defer);
        assert_eq!(policy("451 4.7.1 Greylisted, see x"), Answer::Defer);
        // Other numeric codes are not ours.
        assert_eq!(policy("550 5.7.1 no"), Answer::Other);
        assert_eq!(policy("4501 x"), Answer::Other);
        assert_eq!(policy("REJECT no"), Answer::Other);
        assert_eq!(policy(""), Answer::Other);
    }

    #[test]
    fn errors_are_never_decisions() {
        let mut t = Tally::default();
        assert!(t.count(Answer::Defer));
        assert!(t.count(Answer::Pass(0)));
        assert!(!t.count(Answer::Err("bad-ip")));
        assert!(!t.count(Answer::Other));
        assert!(!t.count(Answer::Pong));
        assert_eq!(t.decisions(), 2);
        let a = t.to_answers();
        assert_eq!(a.err.get("bad-ip"), Some(&1));
        assert_eq!(a.pass.get("retried"), Some(&1));
    }
}
