//! Exim's side of Greyhound, held to `docs/OPERATIONS.md` section 8.
//!
//! The test reads the `${readsocket{...}}` expansion and the `acl_check_rcpt` regular
//! expressions from the document itself, expands the request the way Exim does for a given
//! session, and replays what `readsocket` does on the wire against the real server: connect,
//! write the request, shut down the sending side, read until the server closes. The replies
//! then go through the document's own `defer` condition and `message` expression.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::thread;
use std::time::{Duration, Instant};

use common::{connect, decisions, free_port, greylist_text, operations_md, Server, TempDir};
use regex::Regex;

/// The native address the document's examples use: Greyhound's default.
const DOC_NATIVE: &str = "127.0.0.1:10030";

/// Section 8 of `docs/OPERATIONS.md`, up to its DATA-stage part (or the next section).
fn exim_section() -> String {
    let doc = operations_md();
    let start = doc
        .find("\n## 8. Exim\n")
        .expect("OPERATIONS.md has a section 8. Exim");
    let rest = &doc[start + 1..];
    let end = rest.find("\n## 9.").expect("a section after 8. Exim");
    let end = rest[..end].find(DATA_STAGE).unwrap_or(end);
    rest[..end].to_string()
}

/// The heading of section 8's DATA-stage part, which has an ACL of its own.
const DATA_STAGE: &str = "\n### The DATA stage\n";

/// Section 8's DATA-stage part, up to the next section.
fn data_stage_section() -> String {
    let doc = operations_md();
    let start = doc
        .find(DATA_STAGE)
        .expect("OPERATIONS.md section 8 has a DATA-stage part");
    let rest = &doc[start + 1..];
    let end = rest.find("\n## 9.").expect("a section after 8. Exim");
    rest[..end].to_string()
}

/// The text inside the braces that open at `s[0]`, and the rest after the closing brace.
fn braced(s: &str) -> (&str, &str) {
    assert!(s.starts_with('{'), "expected '{{' at {s:?}");
    let mut depth = 0;
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return (&s[1..i], &s[i + 1..]);
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced braces in {s:?}");
}

/// Every `${readsocket{...}...}` expansion in `text`, whole (not the bare name in prose).
fn readsocket_expansions(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("${readsocket{") {
        let (_, after) = braced(&rest[i + 1..]);
        let whole = &rest[i..rest.len() - after.len()];
        out.push(whole.to_string());
        rest = after;
    }
    out
}

/// The five arguments of `${readsocket{socket}{request}{timeout}{eol}{fail}}`.
struct Readsocket {
    socket: String,
    request: String,
    timeout: String,
    eol: String,
    fail: String,
}

fn parse_readsocket(expansion: &str) -> Readsocket {
    let mut rest = expansion
        .strip_prefix("${readsocket")
        .and_then(|r| r.strip_suffix('}'))
        .unwrap_or_else(|| panic!("not a readsocket expansion: {expansion:?}"));
    let mut args = Vec::new();
    while !rest.is_empty() {
        let (arg, after) = braced(rest);
        args.push(arg.to_string());
        rest = after;
    }
    let [socket, request, timeout, eol, fail]: [String; 5] = args
        .try_into()
        .unwrap_or_else(|a| panic!("readsocket takes 5 arguments here, got {a:?}"));
    Readsocket {
        socket,
        request,
        timeout,
        eol,
        fail,
    }
}

/// The Exim variables of one SMTP session at the RCPT stage.
struct Session<'a> {
    sender_host_address: &'a str,
    /// Empty for the null sender, as in Exim.
    sender_address: &'a str,
    local_part: &'a str,
    domain: &'a str,
}

/// Expands `template` as Exim's string expansion does for the constructs the document uses:
/// `$variable` and the `\n` escape. Anything else is a construct this test does not know,
/// so the test fails instead of guessing.
fn expand(template: &str, s: &Session) -> String {
    let vars = [
        ("sender_host_address", s.sender_host_address),
        ("sender_address", s.sender_address),
        ("local_part", s.local_part),
        ("domain", s.domain),
    ];
    let mut out = String::new();
    let mut rest = template;
    while let Some(c) = rest.chars().next() {
        if let Some(after) = rest.strip_prefix('$') {
            let len = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            let name = &after[..len];
            let value = vars
                .iter()
                .find(|(n, _)| *n == name)
                .unwrap_or_else(|| panic!("unknown Exim variable ${name} in {template:?}"))
                .1;
            out.push_str(value);
            rest = &after[len..];
        } else if let Some(after) = rest.strip_prefix('\\') {
            assert!(after.starts_with('n'), "unknown escape in {template:?}");
            out.push('\n');
            rest = &after[1..];
        } else {
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

/// What `readsocket` does with an `inet:` socket: connect, write the request, shut down
/// the sending side (Exim's default), read until the server closes the connection. `None`
/// where Exim would yield the fail string: no connection, or no end of the answer in time.
fn readsocket(addr: SocketAddr, request: &[u8], timeout: Duration) -> Option<String> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).unwrap();
    s.write_all(request).ok()?;
    s.shutdown(Shutdown::Write).ok()?;
    let mut out = Vec::new();
    match s.read_to_end(&mut out) {
        Ok(_) => Some(String::from_utf8(out).expect("answer is UTF-8")),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => None,
        Err(e) => panic!("readsocket read: {e}"),
    }
}

/// The `acl_check_rcpt` of the document, as far as Greyhound is concerned.
struct Acl {
    /// `set acl_m_greyhound = ...`: the readsocket expansion.
    lookup: String,
    /// `defer condition = ${if match{$acl_m_greyhound}{\N...\N}}`.
    defer_if: Regex,
    /// `message = ${if match{$acl_m_greyhound}{\N...\N}{$1}{fallback}}`.
    message_re: Regex,
    message_fallback: String,
}

impl Acl {
    fn from_doc(section: &str) -> Self {
        Self::named(section, "acl_check_rcpt:")
    }

    /// The ACL of the block that starts with `name`.
    fn named(section: &str, name: &str) -> Self {
        let acl = section
            .split("```text\n")
            .find(|b| b.starts_with(name))
            .unwrap_or_else(|| panic!("an {name} block in section 8"));
        let acl = &acl[..acl.find("```").expect("end of the ACL block")];
        let lookup = acl
            .lines()
            .find_map(|l| l.trim().strip_prefix("warn    set acl_m_greyhound = "))
            .expect("warn set acl_m_greyhound = ... in the ACL")
            .to_string();
        // The two \N...\N regular expressions, in order: the condition, then the message.
        let regexes: Vec<&str> = acl.split("\\N").skip(1).step_by(2).collect();
        assert_eq!(
            regexes.len(),
            2,
            "two \\N...\\N expressions in the ACL: {regexes:?}"
        );
        let condition = acl
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with("defer   condition = "))
            .expect("defer condition = ... in the ACL");
        assert_eq!(
            condition,
            format!(
                "defer   condition = ${{if match{{$acl_m_greyhound}}{{\\N{}\\N}}}}",
                regexes[0]
            )
        );
        let message = acl
            .lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix("message   = "))
            .expect("message = ... in the ACL");
        let prefix = format!(
            "${{if match{{$acl_m_greyhound}}{{\\N{}\\N}}{{$1}}{{",
            regexes[1]
        );
        let message_fallback = message
            .strip_prefix(&prefix)
            .and_then(|m| m.strip_suffix("}}"))
            .unwrap_or_else(|| panic!("unexpected message expression {message:?}"))
            .to_string();
        Self {
            lookup,
            defer_if: Regex::new(regexes[0]).expect("condition regex"),
            message_re: Regex::new(regexes[1]).expect("message regex"),
            message_fallback,
        }
    }

    /// The SMTP message of the ACL for an answer, or `None` where it does not defer.
    fn defer_message(&self, answer: &str) -> Option<String> {
        if !self.defer_if.is_match(answer) {
            return None;
        }
        Some(match self.message_re.captures(answer) {
            Some(c) => c[1].to_string(),
            None => self.message_fallback.clone(),
        })
    }
}

#[test]
fn operations_md_readsocket_matches_the_acl_and_the_defaults() {
    let section = exim_section();
    let all = readsocket_expansions(&section);
    assert!(
        all.len() >= 2,
        "the expansion alone and inside the ACL: {all:?}"
    );
    assert!(
        all.iter().all(|e| *e == all[0]),
        "every readsocket in section 8 must be the same: {all:?}"
    );
    let acl = Acl::from_doc(&section);
    assert_eq!(
        acl.lookup, all[0],
        "the ACL uses the expansion shown above it"
    );
    let rs = parse_readsocket(&all[0]);
    assert_eq!(
        rs.socket,
        format!("inet:{DOC_NATIVE}"),
        "Greyhound's default native address"
    );
    assert_eq!(
        rs.request,
        "CHECK $sender_host_address <$sender_address> $local_part@$domain\\n"
    );
    assert_eq!(rs.timeout, "3s");
    assert_eq!(rs.eol, "\\n", "answers keep their newline");
    assert_eq!(rs.fail, "PASS", "fail-open, as the document says");
    // The fail string must not defer: Greyhound unreachable means mail is accepted.
    assert_eq!(acl.defer_message(&rs.fail), None);
}

#[test]
fn exim_readsocket_replayed_against_the_real_server() {
    let section = exim_section();
    let rs = parse_readsocket(&readsocket_expansions(&section)[0]);
    let acl = Acl::from_doc(&section);
    let timeout = Duration::from_secs(rs.timeout.trim_end_matches('s').parse().unwrap());
    let gh = Server::start_in(TempDir::new("exim"), &["--delay", "3s"]);
    assert_eq!(rs.socket, format!("inet:{DOC_NATIVE}"));
    // `eol` is "\n": each newline of the answer is kept as it is.
    let ask = |s: &Session| -> String {
        let request = expand(&rs.request, s);
        let answer = readsocket(gh.native, request.as_bytes(), timeout)
            .unwrap_or_else(|| panic!("no answer to {request:?} within {timeout:?}"));
        answer.replace('\n', &expand(&rs.eol, s))
    };

    let alice = Session {
        sender_host_address: "203.0.113.25",
        sender_address: "alice@example.org",
        local_part: "bob",
        domain: "example.net",
    };
    assert_eq!(
        expand(&rs.request, &alice),
        "CHECK 203.0.113.25 <alice@example.org> bob@example.net\n",
        "the bytes Exim writes"
    );

    // A new triplet: DEFER, and the ACL defers with Greyhound's text.
    let text = greylist_text("alice@example.org", "bob@example.net");
    let first = Instant::now();
    let answer = ask(&alice);
    assert_eq!(answer, format!("DEFER 3 {text}\n"));
    assert_eq!(acl.defer_message(&answer), Some(text));

    // The null sender: Exim's $sender_address is empty, the brackets make it <>.
    let bounce = Session {
        sender_address: "",
        ..alice
    };
    let answer = ask(&bounce);
    assert_eq!(
        answer,
        format!("DEFER 3 {}\n", greylist_text("<>", "bob@example.net"))
    );
    assert!(acl.defer_message(&answer).is_some());

    // IPv6 clients are written bare, as Exim's $sender_host_address has them.
    let v6 = Session {
        sender_host_address: "2001:db8::25",
        sender_address: "carol@example.org",
        ..alice
    };
    let answer = ask(&v6);
    assert!(answer.starts_with("DEFER 3 "), "IPv6 client: {answer:?}");

    // A quoted local part with a space splits the request: ERR, which the ACL accepts, as
    // the document says.
    let quoted = Session {
        local_part: "\"john doe\"",
        ..alice
    };
    let answer = ask(&quoted);
    assert!(answer.starts_with("ERR "), "quoted local part: {answer:?}");
    assert!(
        answer.ends_with('\n') && answer.matches('\n').count() == 1,
        "{answer:?}"
    );
    assert_eq!(acl.defer_message(&answer), None, "ERR is accepted");

    // The retry after the delay passes, and the next one too; the ACL accepts both.
    thread::sleep((first + Duration::from_millis(3250)).saturating_duration_since(Instant::now()));
    let answer = ask(&alice);
    assert_eq!(answer, "PASS retried\n");
    assert_eq!(acl.defer_message(&answer), None);
    assert_eq!(ask(&alice), "PASS known\n");
    assert_eq!(gh.m(&decisions("pass", "known")), 1.0);
    assert_eq!(gh.m(&decisions("defer", "")), 3.0);

    // Nothing listening: Exim yields the fail string, and the ACL accepts.
    let closed = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let request = expand(&rs.request, &alice);
    let answer = readsocket(closed, request.as_bytes(), timeout).unwrap_or(rs.fail.clone());
    assert_eq!(answer, "PASS");
    assert_eq!(acl.defer_message(&answer), None);
    // The server is still up and answering on a normal connection.
    drop(connect(gh.native));
}

#[test]
fn exim_data_stage_acl_replayed_against_the_real_server() {
    let rcpt = parse_readsocket(&readsocket_expansions(&exim_section())[0]);
    let rcpt_acl = Acl::from_doc(&exim_section());
    let section = data_stage_section();
    let all = readsocket_expansions(&section);
    assert_eq!(
        all.len(),
        1,
        "one readsocket in the DATA-stage part: {all:?}"
    );
    let rs = parse_readsocket(&all[0]);
    let acl = Acl::named(&section, "acl_check_data:");
    assert_eq!(acl.lookup, all[0], "the ACL holds the expansion");
    // Everything but the request is the RCPT stage's: address, timeout, fail-open, and the
    // same reading of the answer.
    assert_eq!(
        (&rs.socket, &rs.timeout, &rs.eol, &rs.fail),
        (&rcpt.socket, &rcpt.timeout, &rcpt.eol, &rcpt.fail)
    );
    assert_eq!(acl.defer_if.as_str(), rcpt_acl.defer_if.as_str());
    assert_eq!(acl.message_re.as_str(), rcpt_acl.message_re.as_str());
    assert_eq!(acl.message_fallback, rcpt_acl.message_fallback);
    const RECIPIENTS: &str = "${extract{1}{,}{$recipients}}";
    const DIGEST: &str = "${sha256:$message_body_size $message_body $message_body_end}";
    assert_eq!(
        rs.request,
        format!("CHECK $sender_host_address <$sender_address> {RECIPIENTS} body={DIGEST}\\n")
    );

    // Exim's `extract` (the first of `$recipients`, "a, b") and `sha256` (64 hex digits)
    // done here; the rest expanded as above.
    let gh = Server::start_in(TempDir::new("exim-data"), &["--delay", "3s"]);
    let timeout = Duration::from_secs(rs.timeout.trim_end_matches('s').parse().unwrap());
    let ask = |recipients: &str| -> String {
        let first = recipients.split(',').next().unwrap();
        let template = rs.request.replace(RECIPIENTS, first).replace(
            DIGEST,
            "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        );
        let s = Session {
            sender_host_address: "203.0.113.25",
            sender_address: "alice@example.org",
            local_part: "",
            domain: "",
        };
        let request = expand(&template, &s);
        readsocket(gh.native, request.as_bytes(), timeout)
            .unwrap_or_else(|| panic!("no answer to {request:?} within {timeout:?}"))
    };
    let first = Instant::now();
    let answer = ask("bob@example.net, carol@example.net");
    assert_eq!(
        answer,
        format!(
            "DEFER 3 {}\n",
            greylist_text("alice@example.org", "bob@example.net")
        )
    );
    assert!(acl.defer_message(&answer).is_some());
    // The same message retried to other recipients after the delay is the same record.
    thread::sleep((first + Duration::from_millis(3250)).saturating_duration_since(Instant::now()));
    let answer = ask("dave@example.net");
    assert_eq!(answer, "PASS retried\n");
    assert_eq!(acl.defer_message(&answer), None);
}
