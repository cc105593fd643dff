//! Integration tests: the real `greyhound` binary, started on free ports, spoken to in raw
//! bytes over the native protocol (TCP and UDP), the Postfix policy protocol (TCP and Unix
//! socket) and the metrics HTTP port, including garbage.
//!
//! Greylisting delays are 2 or 3 seconds and tests sleep just past them; no test asserts how
//! long anything took, only what was answered.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{
    assert_closed_without_reply, connect, policy_block, poll, rcpt_attrs, request, run_bin,
    run_serve, sleep_past, udp_ask, udp_request, udp_request_within, with, Conn, PolicyAddr,
    PolicyConn, Server, TempDir, XorShift, IO_TIMEOUT,
};

const DEFER_M: &str = r#"greyhound_decisions_total{answer="defer",reason=""}"#;
const RETRIED_M: &str = r#"greyhound_decisions_total{answer="pass",reason="retried"}"#;
const KNOWN_M: &str = r#"greyhound_decisions_total{answer="pass",reason="known"}"#;
const DRY_RUN_M: &str = r#"greyhound_decisions_total{answer="pass",reason="dry-run"}"#;
const AUTH_M: &str = r#"greyhound_decisions_total{answer="pass",reason="auth"}"#;
const NOT_RCPT_M: &str = r#"greyhound_decisions_total{answer="dunno",reason="not-rcpt"}"#;
const GREYLISTED_M: &str = r#"greyhound_triplets{state="greylisted"}"#;
const WHITELISTED_M: &str = r#"greyhound_triplets{state="whitelisted"}"#;
const OPEN_M: &str = "greyhound_open_connections";

fn requests_m(proto: &str) -> String {
    format!("greyhound_requests_total{{proto=\"{proto}\"}}")
}

fn error_m(proto: &str, kind: &str) -> String {
    format!("greyhound_protocol_errors_total{{proto=\"{proto}\",kind=\"{kind}\"}}")
}

/// The default greylist text for this sender and recipient.
fn greylist_text(sender: &str, recipient: &str) -> String {
    format!("Greylisted, see https://greylisting.org/; from={sender} to={recipient}")
}

/// The seconds of a `[ID ]DEFER <seconds>[ text]` reply.
fn defer_secs(reply: &str) -> Option<u32> {
    let mut t = reply.split(' ');
    let mut word = t.next()?;
    if word.bytes().all(|b| b.is_ascii_digit()) {
        word = t.next()?;
    }
    if word != "DEFER" {
        return None;
    }
    t.next()?.trim_end().parse().ok()
}

/// Checks a UDP DEFER reply: `DEFER <secs>`, then nothing or a prefix of `full` (the text may
/// be shortened so the reply is no larger than the request), then `\n`.
fn assert_udp_defer(reply: &str, secs: &[u32], full: &str) {
    let line = reply
        .strip_suffix('\n')
        .unwrap_or_else(|| panic!("no final newline in {reply:?}"));
    let got = defer_secs(line).unwrap_or_else(|| panic!("not a DEFER: {reply:?}"));
    assert!(secs.contains(&got), "DEFER {got}, expected one of {secs:?}");
    let text = line.splitn(3, ' ').nth(2).unwrap_or("");
    assert!(
        full.starts_with(text),
        "{text:?} is not a prefix of {full:?}"
    );
}

/// Year, month, day of a count of days since 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// `Www, DD Mon YYYY` of a Unix time, as RFC 5322 writes it.
fn rfc5322_day(unix: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = (unix / 86_400) as i64;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{}, {d:02} {} {y:04}",
        DAYS[(days % 7) as usize],
        MONTHS[m as usize - 1]
    )
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// Checks `action=PREPEND X-Greylist: delayed N seconds by greyhound-<version> at <host>;
/// <RFC 5322 date>`, with N at least `delay` and the date today (UTC).
fn assert_prepend(reply: &str, delay: u32, host: &str) {
    let bad = || panic!("not the X-Greylist PREPEND: {reply:?}");
    let Some(rest) = reply.strip_prefix("action=PREPEND X-Greylist: delayed ") else {
        bad()
    };
    let Some((n, rest)) = rest.split_once(" seconds by greyhound-") else {
        bad()
    };
    let n: u32 = n.parse().unwrap_or_else(|_| bad());
    assert!(n >= delay, "delayed {n} seconds, but the delay is {delay}");
    let Some((version, rest)) = rest.split_once(" at ") else {
        bad()
    };
    assert_eq!(version, env!("CARGO_PKG_VERSION"), "{reply:?}");
    let Some((h, date)) = rest.split_once("; ") else {
        bad()
    };
    assert_eq!(h, host, "{reply:?}");
    // "Mon, 23 Nov 2026 09:03:22 +0000": the day part is today's, the time well-formed.
    let now = unix_now();
    let day = &date[..date.len().min(16)];
    assert!(
        day == rfc5322_day(now) || day == rfc5322_day(now - 60),
        "date {date:?} is not today ({})",
        rfc5322_day(now)
    );
    let time = &date[day.len()..];
    let ok = time.len() == 15
        && time.starts_with(' ')
        && time.ends_with(" +0000")
        && time[1..9].bytes().enumerate().all(|(i, b)| {
            if i % 3 == 2 {
                b == b':'
            } else {
                b.is_ascii_digit()
            }
        });
    assert!(ok, "bad time in {date:?}");
}

// ---------------------------------------------------------------------------------------
// 1. The greylisting cycle on every transport
// ---------------------------------------------------------------------------------------

#[test]
fn native_tcp_greylist_cycle() {
    let srv = Server::start(&["--delay", "3s"]);
    let mut c = Conn::connect(srv.native);
    let req = "CHECK 192.0.2.10 <alice@sender.example> <bob@rcpt.example>";
    let v6 = "CHECK 2001:db8:1:2::10 <alice@sender.example> <bob@rcpt.example>";
    let first = Instant::now();
    let text = greylist_text("alice@sender.example", "bob@rcpt.example");
    assert_eq!(c.ask(req), format!("DEFER 3 {text}"));
    assert_eq!(c.ask(v6), format!("DEFER 3 {text}"));

    // Half way: still deferred, counting from the first attempt. The retry comes from
    // another address of the same /24 (and /64), with bare addresses and other case: it is
    // the same triplet.
    thread::sleep(Duration::from_millis(1500));
    let early = c.ask("CHECK 192.0.2.99 alice@sender.example BOB@rcpt.example");
    let left = defer_secs(&early).unwrap_or_else(|| panic!("early retry: {early:?}"));
    assert!((1..=2).contains(&left), "early retry: {early:?}");
    assert_eq!(
        early,
        format!("DEFER {left} {text}").replace("to=bob", "to=BOB")
    );
    let early6 = c.ask("CHECK [2001:db8:1:2::ffff] <alice@sender.example> <bob@rcpt.example>");
    assert!(
        matches!(defer_secs(&early6), Some(1..=2)),
        "early IPv6 retry: {early6:?}"
    );

    // Had the early retries restarted the clock, this would still be deferred.
    thread::sleep((first + Duration::from_millis(3250)).saturating_duration_since(Instant::now()));
    assert_eq!(c.ask(req), "PASS retried");
    assert_eq!(c.ask(req), "PASS known");
    assert_eq!(c.ask(v6), "PASS retried");
    assert_eq!(c.ask(v6), "PASS known");
    // An unrelated triplet is still greylisted.
    let other = c.ask("CHECK 192.0.2.10 <alice@sender.example> <carol@rcpt.example>");
    assert_eq!(defer_secs(&other), Some(3), "{other:?}");
}

#[test]
fn native_udp_greylist_cycle() {
    let srv = Server::start(&[]);
    let req = "CHECK 192.0.2.20 <carol@sender.example> <dave@rcpt.example>\n";
    let text = greylist_text("carol@sender.example", "dave@rcpt.example");
    assert_udp_defer(&udp_ask(srv.native, req), &[2], &text);
    assert_udp_defer(&udp_ask(srv.native, req), &[1, 2], &text);
    sleep_past(2);
    assert_eq!(udp_ask(srv.native, req), "PASS retried\n");
    assert_eq!(udp_ask(srv.native, req), "PASS known\n");
    // The same triplet over TCP: one table behind both transports.
    assert_eq!(request(srv.native, req.as_bytes()), "PASS known\n");
    assert_eq!(srv.m(&requests_m("native-udp")), 4.0);
}

#[test]
fn policy_tcp_greylist_cycle_and_stages() {
    let srv = Server::start(&["--hostname", "mx.test.example"]);
    let mut p = PolicyConn::connect(&srv.policy);
    let a = rcpt_attrs("192.0.2.30", "erin@sender.example", "frank@rcpt.example");
    let defer = format!(
        "action=DEFER_IF_PERMIT {}",
        greylist_text("erin@sender.example", "frank@rcpt.example")
    );
    assert_eq!(p.ask(&a), defer);
    assert_eq!(p.ask(&a), defer, "early retry");

    // Other stages of the same session are not greylisted.
    for state in ["CONNECT", "EHLO", "DATA", "END-OF-MESSAGE"] {
        let b = with(a.clone(), "protocol_state", state);
        assert_eq!(p.ask(&b), "action=DUNNO", "protocol_state={state}");
    }
    let mail = with(with(a.clone(), "protocol_state", "MAIL"), "recipient", "");
    assert_eq!(p.ask(&mail), "action=DUNNO", "protocol_state=MAIL");

    // An authenticated client passes at once, on a triplet never seen.
    let auth = rcpt_attrs(
        "198.51.100.30",
        "grace@sender.example",
        "heidi@rcpt.example",
    );
    let auth = with(auth, "sasl_username", "grace");
    assert_eq!(p.ask(&with(auth, "sasl_method", "PLAIN")), "action=DUNNO");

    // The null sender is written <> in the text.
    let bounce = rcpt_attrs("203.0.113.30", "", "ivan@rcpt.example");
    assert_eq!(
        p.ask(&bounce),
        format!(
            "action=DEFER_IF_PERMIT {}",
            greylist_text("<>", "ivan@rcpt.example")
        )
    );

    // Two blocks in one write: two replies, in order, on the reused connection.
    let fresh = rcpt_attrs("192.0.2.31", "judy@sender.example", "mallory@rcpt.example");
    let mut two = policy_block(&fresh);
    two.extend(policy_block(&with(a.clone(), "protocol_state", "DATA")));
    p.send(&two).unwrap();
    assert_eq!(
        p.reply(),
        format!(
            "action=DEFER_IF_PERMIT {}",
            greylist_text("judy@sender.example", "mallory@rcpt.example")
        )
    );
    assert_eq!(p.reply(), "action=DUNNO");

    sleep_past(2);
    assert_prepend(&p.ask(&a), 2, "mx.test.example");
    assert_eq!(p.ask(&a), "action=DUNNO");
    assert_eq!(p.ask(&a), "action=DUNNO");

    // A second connection sees the same table.
    let mut p2 = PolicyConn::connect(&srv.policy);
    assert_eq!(p2.ask(&a), "action=DUNNO");
    assert_prepend(&p2.ask(&bounce), 2, "mx.test.example");

    let m = srv.metrics();
    let get = |name: &str| common::metric_value(&m, name).unwrap_or(-1.0);
    assert_eq!(get(AUTH_M), 1.0);
    assert_eq!(get(NOT_RCPT_M), 6.0);
    assert_eq!(get(DEFER_M), 4.0);
    assert_eq!(get(RETRIED_M), 2.0);
    assert_eq!(get(KNOWN_M), 3.0);
    assert_eq!(get(&requests_m("policy")), 16.0);
    assert_eq!(get(&requests_m("native-tcp")), 0.0);
}

#[test]
fn policy_unix_socket_greylist_cycle() {
    let dir = TempDir::new("unix");
    let sock = dir.file("p.sock");
    let srv = Server::start_in(dir, &["--policy", &sock, "--hostname", "mx.unix.example"]);
    assert_eq!(srv.policy, PolicyAddr::Unix(sock.clone().into()));
    let mut p = PolicyConn::connect(&srv.policy);
    let a = rcpt_attrs("2001:db8::30", "oscar@sender.example", "peggy@rcpt.example");
    let defer = format!(
        "action=DEFER_IF_PERMIT {}",
        greylist_text("oscar@sender.example", "peggy@rcpt.example")
    );
    assert_eq!(p.ask(&a), defer);
    assert_eq!(
        p.ask(&with(a.clone(), "protocol_state", "DATA")),
        "action=DUNNO"
    );
    sleep_past(2);
    assert_prepend(&p.ask(&a), 2, "mx.unix.example");
    assert_eq!(p.ask(&a), "action=DUNNO");
    // The native port serves the same table.
    assert_eq!(
        request(
            srv.native,
            b"CHECK 2001:db8::31 <oscar@sender.example> <peggy@rcpt.example>\n"
        ),
        "PASS known\n"
    );
}

#[test]
fn policy_without_x_greylist_header() {
    let srv = Server::start(&["--no-x-greylist-header"]);
    let mut p = PolicyConn::connect(&srv.policy);
    let a = rcpt_attrs("192.0.2.35", "trent@sender.example", "victor@rcpt.example");
    assert!(p.ask(&a).starts_with("action=DEFER_IF_PERMIT "));
    sleep_past(2);
    assert_eq!(p.ask(&a), "action=DUNNO");
    assert_eq!(p.ask(&a), "action=DUNNO");
    // The first one was the retried pass, not anything else.
    assert_eq!(srv.m(RETRIED_M), 1.0);
    assert_eq!(srv.m(KNOWN_M), 1.0);
}

#[test]
fn policy_defer_action_numeric_and_refused() {
    let srv = Server::start(&["--defer-action", "451"]);
    let mut p = PolicyConn::connect(&srv.policy);
    let a = rcpt_attrs("192.0.2.36", "trent@sender.example", "wendy@rcpt.example");
    assert_eq!(
        p.ask(&a),
        format!(
            "action=451 4.7.1 {}",
            greylist_text("trent@sender.example", "wendy@rcpt.example")
        )
    );
    assert_eq!(srv.m(DEFER_M), 1.0);
    // The native protocol's answer does not change.
    assert!(request(
        srv.native,
        b"CHECK 192.0.2.36 <trent@sender.example> <xavier@rcpt.example>\n"
    )
    .starts_with("DEFER 2 "));

    let dir = TempDir::new("deferaction");
    let data = dir.file("data");
    let (status, _, err) = run_serve(&data, &["--defer-action", "REJECT"]);
    assert!(!status.success(), "started with a bad --defer-action");
    assert_eq!(
        err.trim(),
        "greyhound: --defer-action: \"REJECT\" is not one of DEFER_IF_PERMIT, DEFER, 450, 451"
    );
}

// ---------------------------------------------------------------------------------------
// 2. IDs, pipelining, PEEK
// ---------------------------------------------------------------------------------------

#[test]
fn native_ids_are_echoed() {
    let srv = Server::start(&[]);
    let mut c = Conn::connect(srv.native);
    assert_eq!(c.ask("42 PING"), "42 PONG");
    assert_eq!(c.ask("PING"), "PONG");
    assert_eq!(
        c.ask("12345678901234567890 PING"),
        "12345678901234567890 PONG"
    );
    let check = "CHECK 192.0.2.40 <walter@sender.example> <xavier@rcpt.example>";
    let text = greylist_text("walter@sender.example", "xavier@rcpt.example");
    assert_eq!(c.ask(&format!("7 {check}")), format!("7 DEFER 2 {text}"));
    let peek = c.ask("0008 PEEK 192.0.2.40 <walter@sender.example> <xavier@rcpt.example>");
    assert!(peek.starts_with("0008 DEFER "), "{peek:?}");
    // Errors echo the ID too.
    let err = c.ask("9 HELLO");
    assert!(err.starts_with("9 ERR unknown-verb "), "{err:?}");
    let err = c.ask("10 CHECK 999.1.1.1 a@b.example c@d.example");
    assert!(err.starts_with("10 ERR bad-ip "), "{err:?}");
    let err = c.ask("11 PING extra");
    assert!(err.starts_with("11 ERR bad-args "), "{err:?}");
    let err = c.ask("12 CHECK 192.0.2.1 a\u{1}b@c.example d@e.example");
    assert!(err.starts_with("12 ERR control-char "), "{err:?}");
    // 21 digits is not an ID.
    let err = c.ask("123456789012345678901 PING");
    assert!(err.starts_with("ERR bad-id "), "{err:?}");
    // Over UDP as well.
    assert_eq!(udp_ask(srv.native, "77 PING\n"), "77 PONG\n");
    let err = udp_ask(srv.native, "78 CHECK 999.1.1.1 a@b.example c@d.example\n");
    assert!(err.starts_with("78 ERR bad-ip"), "{err:?}");
}

#[test]
fn native_pipelining_500_requests_in_order() {
    let srv = Server::start(&[]);
    let c = Conn::connect(srv.native);
    let mut all = Vec::new();
    let mut expect = Vec::new();
    for i in 0..500 {
        let (line, reply) = match i % 5 {
            0 => (format!("{i} PING"), format!("{i} PONG")),
            1 => (
                format!(
                    "{i} CHECK 198.51.100.{} <pipe@sender.example> <r{i}@rcpt.example>",
                    i % 250
                ),
                format!(
                    "{i} DEFER 2 {}",
                    greylist_text("pipe@sender.example", &format!("r{i}@rcpt.example"))
                ),
            ),
            2 => (format!("{i} BOGUS verb"), format!("{i} ERR unknown-verb ")),
            3 => ("PING".to_string(), "PONG".to_string()),
            _ => (
                format!("{i} CHECK 999.1.1.1 a@b.example c@d.example"),
                format!("{i} ERR bad-ip "),
            ),
        };
        all.extend_from_slice(line.as_bytes());
        all.extend_from_slice(if i % 7 == 0 { b"\r\n" } else { b"\n" });
        expect.push(reply);
    }
    let mut w = c.stream().try_clone().unwrap();
    let writer = thread::spawn(move || w.write_all(&all));
    let mut c = c;
    for (i, want) in expect.iter().enumerate() {
        let got = c.line();
        if want.ends_with(' ') {
            assert!(
                got.starts_with(want.as_str()),
                "reply {i}: {got:?}, want {want:?}…"
            );
        } else {
            assert_eq!(&got, want, "reply {i}");
        }
    }
    writer.join().unwrap().expect("write 500 requests");
    assert_eq!(c.ask("PING"), "PONG", "nothing more was queued");
    let m = srv.metrics();
    let get = |name: &str| common::metric_value(&m, name).unwrap_or(-1.0);
    assert_eq!(get(&requests_m("native-tcp")), 501.0);
    assert_eq!(get(DEFER_M), 100.0);
    assert_eq!(get(GREYLISTED_M), 100.0);
    assert_eq!(get(&error_m("native-tcp", "bad-ip")), 100.0);
    assert_eq!(get(&error_m("native-tcp", "unknown-verb")), 100.0);
}

#[test]
fn peek_does_not_record() {
    let srv = Server::start(&[]);
    let mut c = Conn::connect(srv.native);
    let triplet = "192.0.2.50 <yvonne@sender.example> <zach@rcpt.example>";
    let text = greylist_text("yvonne@sender.example", "zach@rcpt.example");
    assert_eq!(c.ask(&format!("PEEK {triplet}")), format!("DEFER 2 {text}"));
    assert_eq!(c.ask(&format!("PEEK {triplet}")), format!("DEFER 2 {text}"));
    assert_eq!(srv.m(GREYLISTED_M), 0.0, "PEEK recorded a triplet");
    // Had a PEEK recorded, this CHECK would pass as retried.
    sleep_past(2);
    assert_eq!(c.ask(&format!("PEEK {triplet}")), format!("DEFER 2 {text}"));
    assert_eq!(
        c.ask(&format!("CHECK {triplet}")),
        format!("DEFER 2 {text}")
    );
    assert_eq!(srv.m(GREYLISTED_M), 1.0);
    // A PEEK sees the record, but does not whitelist it.
    sleep_past(2);
    assert_eq!(c.ask(&format!("PEEK {triplet}")), "PASS retried");
    assert_eq!(srv.m(WHITELISTED_M), 0.0, "PEEK whitelisted a triplet");
    assert_eq!(c.ask(&format!("CHECK {triplet}")), "PASS retried");
    assert_eq!(c.ask(&format!("PEEK {triplet}")), "PASS known");
    assert_eq!(c.ask(&format!("CHECK {triplet}")), "PASS known");
    assert_eq!(srv.m(WHITELISTED_M), 1.0);
    assert_eq!(srv.m(GREYLISTED_M), 0.0);
}

// ---------------------------------------------------------------------------------------
// 3. Half-close (Exim's readsocket)
// ---------------------------------------------------------------------------------------

#[test]
fn half_close_gets_answers_then_eof() {
    let srv = Server::start(&[]);
    for (req, want) in [
        (&b"PING"[..], "PONG\n"),
        (b"PING\n", "PONG\n"),
        (b"PING\r\n", "PONG\n"),
        (b"PING\r", "PONG\n"),
        (b"5 PING", "5 PONG\n"),
        (b"1 PING\n2 PING\n3 PING", "1 PONG\n2 PONG\n3 PONG\n"),
        (b"HELLO", "ERR unknown-verb "),
    ] {
        let got = request(srv.native, req);
        if want.ends_with(' ') {
            assert!(
                got.starts_with(want) && got.ends_with('\n'),
                "{req:?}: {got:?}"
            );
            assert_eq!(got.matches('\n').count(), 1, "{req:?}: {got:?}");
        } else {
            assert_eq!(got, want, "{:?}", String::from_utf8_lossy(req));
        }
    }
    // What Exim's readsocket sends, with and without the newline.
    for (n, end) in [(60, ""), (61, "\n")] {
        let req = format!("CHECK 192.0.2.{n} <exim@sender.example> <rcpt{n}@rcpt.example>{end}");
        let got = request(srv.native, req.as_bytes());
        let text = greylist_text("exim@sender.example", &format!("rcpt{n}@rcpt.example"));
        assert_eq!(got, format!("DEFER 2 {text}\n"), "{req:?}");
    }
}

// ---------------------------------------------------------------------------------------
// 4. Allow list
// ---------------------------------------------------------------------------------------

#[test]
fn allow_list_refuses_other_clients() {
    let srv = Server::start(&["--allow", "10.0.0.0/8"]);
    // Silent, then speaking: closed either way, without a byte.
    let mut s = connect(srv.native);
    assert_closed_without_reply(&mut s, "native TCP, silent");
    let mut s = connect(srv.native);
    let _ = s.write_all(b"PING\n");
    assert_closed_without_reply(&mut s, "native TCP, PING");
    let mut s = connect(srv.policy_tcp());
    let _ = s.write_all(&policy_block(&rcpt_attrs(
        "192.0.2.1",
        "a@b.example",
        "c@d.example",
    )));
    assert_closed_without_reply(&mut s, "policy");
    // UDP: no answer at all.
    for dg in [
        &b"PING\n"[..],
        b"CHECK 192.0.2.1 <a@b.example> <c@d.example>\n",
    ] {
        let got = udp_request_within(srv.native, dg, Duration::from_millis(700));
        assert_eq!(got, None, "UDP answered a refused client");
    }
    // The metrics port is not subject to the list, and counted every refusal.
    srv.wait_metric("greyhound_refused_clients_total", 5.0);
    assert_eq!(srv.m(&requests_m("native-tcp")), 0.0);
    assert_eq!(srv.m(&requests_m("native-udp")), 0.0);
    assert_eq!(srv.m(&requests_m("policy")), 0.0);
    assert_eq!(srv.metric(GREYLISTED_M), Some(0.0));
}

// ---------------------------------------------------------------------------------------
// 5. Dry run
// ---------------------------------------------------------------------------------------

#[test]
fn dry_run_passes_but_records() {
    let srv = Server::start(&["--dry-run"]);
    let mut c = Conn::connect(srv.native);
    let req = "CHECK 192.0.2.55 <dry@sender.example> <run@rcpt.example>";
    assert_eq!(c.ask(req), "PASS dry-run");
    assert_eq!(c.ask(req), "PASS dry-run");
    let mut p = PolicyConn::connect(&srv.policy);
    let a = rcpt_attrs("198.51.100.55", "dry@sender.example", "policy@rcpt.example");
    assert_eq!(p.ask(&a), "action=DUNNO");
    assert_eq!(srv.m(DRY_RUN_M), 3.0);
    assert_eq!(srv.m(DEFER_M), 0.0);
    assert_eq!(srv.m(GREYLISTED_M), 2.0);
    sleep_past(2);
    // It recorded: the retry after the delay is a real retried pass.
    assert_eq!(c.ask(req), "PASS retried");
    assert_eq!(c.ask(req), "PASS known");
    assert_eq!(srv.m(RETRIED_M), 1.0);
    assert_eq!(srv.m(WHITELISTED_M), 1.0);
}

// ---------------------------------------------------------------------------------------
// 6. SIGHUP reload
// ---------------------------------------------------------------------------------------

#[test]
fn sighup_reloads_exemption_lists_and_keeps_them_on_error() {
    let dir = TempDir::new("hup");
    let list = dir.file("senders.txt");
    std::fs::write(&list, "# exempt senders\n@other.example\n").unwrap();
    let srv = Server::start_in(dir, &["--whitelist-senders", &list]);
    let mut c = Conn::connect(srv.native);
    let ask = |c: &mut Conn, sender: &str, rcpt: &str| {
        c.ask(&format!(
            "CHECK 192.0.2.90 <{sender}> <{rcpt}@rcpt.example>"
        ))
    };
    assert!(ask(&mut c, "a@trusted.example", "r").starts_with("DEFER 2 "));
    assert_eq!(ask(&mut c, "x@other.example", "r"), "PASS exempt:sender");
    assert_eq!(srv.m(GREYLISTED_M), 1.0);

    std::fs::write(&list, "@trusted.example\n").unwrap();
    srv.signal("HUP");
    let mut n = 0;
    let reloaded = poll(IO_TIMEOUT, || {
        n += 1;
        (ask(&mut c, "b@trusted.example", &format!("poll{n}")) == "PASS exempt:sender")
            .then_some(())
    });
    assert!(
        reloaded.is_some(),
        "new list not in force; log:\n{}",
        srv.logs().join("\n")
    );
    // Replaced, not merged; and the state was kept.
    assert!(ask(&mut c, "x@other.example", "r2").starts_with("DEFER 2 "));
    assert_eq!(ask(&mut c, "a@trusted.example", "r"), "PASS exempt:sender");
    let greylisted_after_reload = srv.m(GREYLISTED_M);
    assert!(
        greylisted_after_reload >= 2.0,
        "records lost on reload: {greylisted_after_reload}"
    );

    std::fs::write(&list, "@trusted.example\nno-at-sign\n").unwrap();
    srv.signal("HUP");
    let at = format!("{list}:2");
    let line = srv.wait_log(&format!("naming {at}"), |l| l.contains(&at));
    assert!(line.contains("ERROR"), "not an error: {line:?}");
    assert!(line.contains("no-at-sign"), "{line:?}");
    // The previous lists stay in force.
    assert_eq!(ask(&mut c, "c@trusted.example", "r3"), "PASS exempt:sender");
    assert!(ask(&mut c, "y@other.example", "r3").starts_with("DEFER 2 "));
    assert_eq!(srv.m(GREYLISTED_M), greylisted_after_reload + 1.0);
}

const TLS_M: &str = r#"greyhound_decisions_total{answer="pass",reason="tls"}"#;
const FP_A: &str = "C2:9D:F4:87:71:73:73:D9:18:E7:C2:F3:C1:DA:6E:04";
const FP_B: &str =
    "3A:7F:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD";

#[test]
fn trusted_tls_clients_pass_and_reload_on_sighup() {
    let dir = TempDir::new("trusted");
    let list = dir.file("trusted_certs");
    std::fs::write(
        &list,
        format!("# relays\n{FP_A}  # partner\nsubject=mx1.partner.example\n"),
    )
    .unwrap();
    let srv = Server::start_in(dir, &["--trusted-certs", &list]);
    let mut c = Conn::connect(srv.native);
    let bare_a: String = FP_A.chars().filter(|c| *c != ':').collect();
    for (req, want) in [
        (
            format!("CHECK 192.0.2.50 <a@b.example> <c@d.example> cert={FP_A}"),
            "PASS tls",
        ),
        (
            format!(
                "CHECK 192.0.2.50 <a@b.example> <c@d.example> cert={}",
                bare_a.to_lowercase()
            ),
            "PASS tls",
        ),
        (
            "CHECK 192.0.2.50 <a@b.example> <c@d.example> cert-subject=MX1.Partner.example"
                .to_owned(),
            "PASS tls",
        ),
        (
            format!("PEEK 192.0.2.50 <a@b.example> <e@d.example> cert={FP_A}"),
            "PASS tls",
        ),
    ] {
        assert_eq!(c.ask(&req), want, "{req}");
    }
    // Unknown ones are greylisted as usual.
    for req in [
        format!("CHECK 192.0.2.50 <a@b.example> <f@d.example> cert={FP_B}"),
        "CHECK 192.0.2.50 <a@b.example> <g@d.example> cert-subject=mx2.partner.example".to_owned(),
    ] {
        assert!(c.ask(&req).starts_with("DEFER 2 "), "{req}");
    }

    // Postfix: either fingerprint, or the verified subject; the answer is DUNNO, counted as tls.
    let mut p = PolicyConn::connect(&srv.policy);
    let mut a = rcpt_attrs("192.0.2.51", "g@h.example", "i@j.example");
    a.push(("ccert_fingerprint", FP_A));
    assert_eq!(p.ask(&a), "action=DUNNO");
    let mut a = rcpt_attrs("192.0.2.51", "g@h.example", "k@j.example");
    a.push(("ccert_fingerprint", FP_B));
    a.push(("ccert_pubkey_fingerprint", FP_A));
    assert_eq!(p.ask(&a), "action=DUNNO");
    let a = with(
        rcpt_attrs("192.0.2.51", "g@h.example", "l@j.example"),
        "ccert_subject",
        "mx1.partner.example",
    );
    assert_eq!(p.ask(&a), "action=DUNNO");
    let mut a = rcpt_attrs("192.0.2.51", "g@h.example", "m@j.example");
    a.push(("ccert_fingerprint", FP_B));
    assert!(p.ask(&a).starts_with("action=DEFER_IF_PERMIT "));
    // Three native CHECKs and three Postfix requests; the PEEK is not a decision.
    assert_eq!(srv.m(TLS_M), 6.0);
    assert_eq!(
        srv.m(GREYLISTED_M),
        3.0,
        "trusted clients are never recorded"
    );

    // SIGHUP: the new list replaces the old one.
    std::fs::write(&list, format!("{}\n", FP_B.to_lowercase())).unwrap();
    srv.signal("HUP");
    let mut n = 0;
    let reloaded = poll(IO_TIMEOUT, || {
        n += 1;
        let req = format!("CHECK 192.0.2.52 <a@b.example> <p{n}@d.example> cert={FP_B}");
        (c.ask(&req) == "PASS tls").then_some(())
    });
    assert!(
        reloaded.is_some(),
        "new list not in force; log:\n{}",
        srv.logs().join("\n")
    );
    assert!(c
        .ask(&format!(
            "CHECK 192.0.2.53 <a@b.example> <q@d.example> cert={FP_A}"
        ))
        .starts_with("DEFER 2 "));

    // A bad file on SIGHUP keeps the lists in force and names the file and line.
    std::fs::write(&list, format!("{FP_A}\nnot-a-fingerprint\n")).unwrap();
    srv.signal("HUP");
    let at = format!("{list}:2");
    let line = srv.wait_log(&format!("naming {at}"), |l| l.contains(&at));
    assert!(line.contains("ERROR"), "not an error: {line:?}");
    assert!(line.contains("not-a-fingerprint"), "{line:?}");
    assert_eq!(
        c.ask(&format!(
            "CHECK 192.0.2.54 <a@b.example> <r@d.example> cert={FP_B}"
        )),
        "PASS tls"
    );
    assert!(c
        .ask(&format!(
            "CHECK 192.0.2.54 <a@b.example> <s@d.example> cert={FP_A}"
        ))
        .starts_with("DEFER 2 "));
}

#[test]
fn bad_trusted_certs_file_stops_the_start_naming_file_and_line() {
    let (list, lines) = refused_with_list(
        "trustedbad",
        "--trusted-certs",
        &format!("{FP_A}\n\nsubject=\n"),
    );
    assert_eq!(
        lines,
        [format!(
            "greyhound: {list}:3: \"subject=\" names no subject"
        )]
    );
}

/// Starts `serve` with `flag` naming a file that holds `contents`; the start must fail.
/// Returns the file's path and the non-empty lines of standard error.
fn refused_with_list(tag: &str, flag: &str, contents: &str) -> (String, Vec<String>) {
    let dir = TempDir::new(tag);
    let list = dir.file("list");
    std::fs::write(&list, contents).unwrap();
    let data = dir.file("data");
    let (status, _, err) = run_serve(&data, &[flag, &list]);
    assert!(!status.success(), "started with a bad {flag}");
    let lines = err
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect();
    (list, lines)
}

// ---------------------------------------------------------------------------------------
// 7. Graceful shutdown
// ---------------------------------------------------------------------------------------

#[test]
fn sigterm_and_sigint_exit_zero_despite_idle_connections() {
    for sig in ["TERM", "INT"] {
        let mut srv = Server::start(&[]);
        // An idle Postfix connection that was used once, as Postfix keeps them.
        let mut p = PolicyConn::connect(&srv.policy);
        let a = rcpt_attrs("192.0.2.70", "term@sender.example", "sig@rcpt.example");
        assert!(p.ask(&a).starts_with("action=DEFER_IF_PERMIT "));
        let mut c = Conn::connect(srv.native);
        assert_eq!(c.ask("PING"), "PONG");
        let _silent = connect(srv.native);
        srv.signal(sig);
        let status = srv.wait_exit(IO_TIMEOUT);
        let Some(status) = status else {
            panic!(
                "SIG{sig}: still running after {IO_TIMEOUT:?}; log:\n{}",
                srv.logs().join("\n")
            )
        };
        assert_eq!(
            status.code(),
            Some(0),
            "SIG{sig}; log:\n{}",
            srv.logs().join("\n")
        );
        // The connections were closed by the server, without a stray reply.
        c.expect_closed("native after shutdown");
        p.expect_closed("policy after shutdown");
    }
}

// ---------------------------------------------------------------------------------------
// 8. Metrics
// ---------------------------------------------------------------------------------------

#[test]
fn metrics_count_known_traffic_exactly() {
    let srv = Server::start(&[]);
    let mut c = Conn::connect(srv.native);
    let t = [
        "CHECK 192.0.2.1 <m1@sender.example> <r@rcpt.example>",
        "CHECK 198.51.100.1 <m2@sender.example> <r@rcpt.example>",
        "CHECK 203.0.113.1 <m3@sender.example> <r@rcpt.example>",
    ];
    for req in t {
        assert!(c.ask(req).starts_with("DEFER 2 "));
    }
    assert!(c.ask(t[0]).starts_with("DEFER ")); // early retry: 4 defers
    for _ in 0..2 {
        assert!(c
            .ask("CHECK 999.1.1.1 a@b.example c@d.example")
            .starts_with("ERR bad-ip "));
    }
    assert!(c.ask("HELO x").starts_with("ERR unknown-verb "));
    assert_eq!(c.ask("PING"), "PONG");
    assert_eq!(srv.m(GREYLISTED_M), 3.0);
    assert_eq!(srv.m(WHITELISTED_M), 0.0);
    sleep_past(2);
    assert_eq!(c.ask(t[0]), "PASS retried");
    assert_eq!(c.ask(t[1]), "PASS retried");
    assert_eq!(c.ask(t[0]), "PASS known");
    assert_eq!(udp_ask(srv.native, "PING\n"), "PONG\n");

    let m = srv.metrics();
    for (name, want) in [
        (DEFER_M.to_string(), 4.0),
        (RETRIED_M.to_string(), 2.0),
        (KNOWN_M.to_string(), 1.0),
        (DRY_RUN_M.to_string(), 0.0),
        (requests_m("native-tcp"), 11.0),
        (requests_m("native-udp"), 1.0),
        (requests_m("policy"), 0.0),
        (error_m("native-tcp", "bad-ip"), 2.0),
        (error_m("native-tcp", "unknown-verb"), 1.0),
        (error_m("native-tcp", "empty"), 0.0),
        (error_m("native-udp", "bad-ip"), 0.0),
        (WHITELISTED_M.to_string(), 2.0),
        (GREYLISTED_M.to_string(), 1.0),
        (
            r#"greyhound_connections_total{proto="native-tcp"}"#.to_string(),
            1.0,
        ),
        (OPEN_M.to_string(), 1.0),
        ("greyhound_refused_clients_total".to_string(), 0.0),
    ] {
        assert_eq!(
            common::metric_value(&m, &name),
            Some(want),
            "{name}; metrics:\n{m}"
        );
    }
    let (status, _) = srv.http_get("/other");
    assert!(status.starts_with("HTTP/1.1 404"), "{status}");
    let (status, _) = srv.http_get("/");
    assert!(status.starts_with("HTTP/1.1 404"), "{status}");
}

// ---------------------------------------------------------------------------------------
// 9. `greyhound check`
// ---------------------------------------------------------------------------------------

#[test]
fn check_command_exit_codes() {
    let srv = Server::start(&[]);
    let server = srv.native.to_string();
    let check = |args: &[&str]| {
        let mut all = vec!["check"];
        all.extend_from_slice(args);
        all.extend(["--server", &server]);
        run_bin(&all)
    };
    let triplet = ["192.0.2.80", "olivia@sender.example", "pat@rcpt.example"];
    let (status, out, err) = check(&triplet);
    assert_eq!(status.code(), Some(1), "stdout {out:?} stderr {err:?}");
    assert_eq!(
        out,
        format!(
            "DEFER 2 {}",
            greylist_text("olivia@sender.example", "pat@rcpt.example")
        )
    );
    // The null sender, over UDP.
    let (status, out, _) = check(&["192.0.2.81", "<>", "quinn@rcpt.example", "--udp"]);
    assert_eq!(status.code(), Some(1));
    assert!(out.starts_with("DEFER 2"), "{out:?}");
    sleep_past(2);
    let (status, out, _) = check(&triplet);
    assert_eq!((status.code(), out.as_str()), (Some(0), "PASS retried"));
    let (status, out, _) = check(&[
        "192.0.2.80",
        "olivia@sender.example",
        "pat@rcpt.example",
        "--udp",
    ]);
    assert_eq!((status.code(), out.as_str()), (Some(0), "PASS known"));
    let (status, out, _) = check(&["192.0.2.81", "<>", "quinn@rcpt.example"]);
    assert_eq!((status.code(), out.as_str()), (Some(0), "PASS retried"));

    // Nobody listening.
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let (status, out, err) = run_bin(&[
        "check",
        "192.0.2.1",
        "a@b.example",
        "c@d.example",
        "--server",
        &closed,
    ]);
    assert_eq!(status.code(), Some(2), "stdout {out:?} stderr {err:?}");
    assert!(!err.trim().is_empty());
    let (status, _, err) = run_bin(&[
        "check",
        "192.0.2.1",
        "a@b.example",
        "c@d.example",
        "--server",
        &closed,
        "--udp",
        "--timeout",
        "1s",
    ]);
    assert_eq!(status.code(), Some(2), "UDP, stderr {err:?}");
}

// ---------------------------------------------------------------------------------------
// 10. Start-up errors
// ---------------------------------------------------------------------------------------

#[test]
fn startup_errors_name_the_culprit_in_one_line() {
    let dir = TempDir::new("starterr");
    let cfg = dir.file("g.toml");
    std::fs::write(&cfg, "delay = \"2s\"\ndely = 5\n").unwrap();
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_addr = busy.local_addr().unwrap().to_string();
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (vec!["--config", &cfg], vec![&cfg, "dely"]),
        (vec!["--delay", "5x"], vec!["delay", "5x"]),
        (vec!["--native", "300.1.1.1:1"], vec!["300.1.1.1"]),
        (vec!["--native", &busy_addr], vec![&busy_addr]),
        (vec!["--policy", &busy_addr], vec![&busy_addr]),
        (vec!["--metrics", &busy_addr], vec![&busy_addr]),
        (vec!["--ipv4-prefix", "33"], vec!["ipv4-prefix", "33"]),
    ];
    for (i, (flags, culprits)) in cases.into_iter().enumerate() {
        let data = dir.file(&format!("data{i}"));
        let mut args = vec!["serve", "--data-dir", &data];
        for (flag, value) in [
            ("--native", "127.0.0.1:0"),
            ("--policy", "127.0.0.1:0"),
            ("--metrics", "127.0.0.1:0"),
        ] {
            if !flags.contains(&flag) {
                args.extend([flag, value]);
            }
        }
        args.extend(&flags);
        let (status, _, err) = run_bin(&args);
        assert!(!status.success(), "{flags:?} started; stderr:\n{err}");
        assert!(!err.contains(" ready "), "{flags:?}: {err}");
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        let Some(last) = lines.last() else {
            panic!("{flags:?}: nothing on stderr")
        };
        assert_eq!(lines.len(), 1, "{flags:?}: more than one line:\n{err}");
        for c in culprits {
            assert!(last.contains(c), "{flags:?}: {last:?} does not name {c:?}");
        }
    }
    drop(busy);
}

#[test]
fn startup_bind_error_states_the_os_error_once() {
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_addr = busy.local_addr().unwrap().to_string();
    let dir = TempDir::new("bind");
    let data = dir.file("data");
    let (status, _, err) = run_serve(&data, &["--native", &busy_addr]);
    assert!(!status.success());
    let line = err.trim();
    assert!(line.contains(&busy_addr), "{line:?}");
    assert_eq!(
        line.matches("(os error").count(),
        1,
        "the cause is repeated: {line:?}"
    );
    drop(busy);
}

// ---------------------------------------------------------------------------------------
// 11. Bad input on the native port
// ---------------------------------------------------------------------------------------

#[test]
fn native_bad_input_gets_err_and_connection_stays_open() {
    let srv = Server::start(&[]);
    let mut c = Conn::connect(srv.native);
    let long = [vec![b'A'; 1025], b"\n".to_vec()].concat();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"\n".to_vec(), "empty"),
        (b"\r\n".to_vec(), "empty"),
        (b"  \t \n".to_vec(), "empty"),
        (long, "too-long"),
        (
            b"CHECK 192.0.2.1 <a\xff@b.example> c@d.example\n".to_vec(),
            "bad-utf8",
        ),
        (b"\xc3\x28\n".to_vec(), "bad-utf8"),
        (b"HELLO there\n".to_vec(), "unknown-verb"),
        (b"CHECK 192.0.2.1 a@b.example\n".to_vec(), "bad-args"),
        (b"CHECK\n".to_vec(), "bad-args"),
        (b"PING extra\n".to_vec(), "bad-args"),
        (
            b"CHECK 999.1.1.1 a@b.example c@d.example\n".to_vec(),
            "bad-ip",
        ),
        (
            b"CHECK 192.0.2.1 a\0b@c.example d@e.example\n".to_vec(),
            "control-char",
        ),
        (
            b"CHECK 192.0.2.1 a@b.example c\rd@e.example\n".to_vec(),
            "control-char",
        ),
        (b"CHECK 1.2.3.4 <a@b c@d\n".to_vec(), "bad-address"),
        (b"CHECK 192.0.2.1 a@b.example <>\n".to_vec(), "bad-address"),
        (
            b"CHECK 192.0.2.1 a@b.example c@d.example color=red\n".to_vec(),
            "bad-option",
        ),
        (b"123456789012345678901 PING\n".to_vec(), "bad-id"),
    ];
    for (req, code) in &cases {
        c.send(req);
        let got = c.line();
        let what = String::from_utf8_lossy(req);
        let rest = got
            .strip_prefix(&format!("ERR {code} "))
            .unwrap_or_else(|| panic!("{what:?}: {got:?}, expected ERR {code} <text>"));
        assert!(!rest.trim().is_empty(), "{what:?}: no text in {got:?}");
        assert_eq!(c.ask("PING"), "PONG", "after {what:?}");
    }

    // The longest line is accepted, with either terminator.
    let max = format!("PING{}", " ".repeat(1020));
    assert_eq!(max.len(), 1024);
    assert_eq!(c.ask(&max), "PONG");
    assert_eq!(c.ask(&format!("{max}\r")), "PONG");

    // 100 KB without a newline: one ERR, the rest of the line skipped, then business as usual.
    let mut flood = vec![b'x'; 100 * 1024];
    flood.extend_from_slice(b"\nPING\n");
    let mut w = c.stream().try_clone().unwrap();
    let writer = thread::spawn(move || w.write_all(&flood));
    let got = c.line();
    assert!(got.starts_with("ERR too-long "), "{got:?}");
    assert_eq!(c.line(), "PONG");
    writer.join().unwrap().unwrap();
    assert_eq!(c.ask("42 PING"), "42 PONG");

    let m = srv.metrics();
    let get = |name: &str| common::metric_value(&m, name).unwrap_or(-1.0);
    assert_eq!(
        get(GREYLISTED_M),
        0.0,
        "a refused request changed the table"
    );
    assert_eq!(get(WHITELISTED_M), 0.0);
    assert_eq!(get(DEFER_M), 0.0);
    for code in [
        "empty",
        "too-long",
        "bad-utf8",
        "bad-args",
        "control-char",
        "bad-address",
    ] {
        let want = cases.iter().filter(|(_, c)| *c == code).count() as f64
            + if code == "too-long" { 1.0 } else { 0.0 };
        assert_eq!(get(&error_m("native-tcp", code)), want, "{code}");
    }
    // Each case and its PING, the two longest lines, the flood's ERR and PONG, "42 PING".
    let total = cases.len() * 2 + 2 + 2 + 1;
    assert_eq!(get(&requests_m("native-tcp")), total as f64);
}

// ---------------------------------------------------------------------------------------
// 12. UDP: no amplification, several requests per datagram
// ---------------------------------------------------------------------------------------

#[test]
fn udp_replies_are_never_larger_than_requests() {
    let srv = Server::start(&[]);
    let small = b"CHECK 1.2.3.4 <> a\n";
    let reply = udp_request(srv.native, small).expect("reply to the smallest CHECK");
    assert!(reply.len() <= small.len(), "{reply:?}");
    let text = String::from_utf8(reply).unwrap();
    assert!(
        text.starts_with("DEFER 2") && text.ends_with('\n'),
        "{text:?}"
    );

    assert_eq!(
        udp_request(srv.native, b"PING\n").as_deref(),
        Some(&b"PONG\n"[..])
    );
    for tiny in [&b"x"[..], b"\n", b"\r\n", b"7", b" \n"] {
        if let Some(r) = udp_request_within(srv.native, tiny, Duration::from_millis(500)) {
            assert!(r.len() <= tiny.len(), "{tiny:?} got {r:?}");
        }
    }
    // Several requests in one datagram: every answer, in order, within the request's size.
    assert_eq!(
        udp_ask(srv.native, "1 PING\n2 PING\n3 PING\n"),
        "1 PONG\n2 PONG\n3 PONG\n"
    );
    assert_eq!(
        udp_ask(srv.native, "1 PING\r\n2 PING\r\n3 PING"),
        "1 PONG\n2 PONG\n3 PONG\n"
    );
    let bad = udp_ask(
        srv.native,
        "1 CHECK 999.1.1.1 a@b.example c@d.example\n2 PING\n",
    );
    assert!(
        bad.starts_with("1 ERR bad-ip") && bad.ends_with("\n2 PONG\n"),
        "{bad:?}"
    );
    assert_eq!(srv.m(GREYLISTED_M), 1.0);
}

#[test]
fn udp_datagram_of_several_requests_gets_every_answer() {
    let srv = Server::start(&[]);
    // A DEFER first: its text may be shortened, but the answers after it must still come.
    let several =
        "1 CHECK 192.0.2.71 <m@sender.example> <n@rcpt.example>\n2 PING\n3 BOGUS\n4 PING\n";
    let got = udp_ask(srv.native, several);
    let lines: Vec<&str> = got.lines().collect();
    assert_eq!(lines.len(), 4, "answers missing from {got:?}");
    assert!(lines[0].starts_with("1 DEFER 2"), "{got:?}");
    assert_eq!(lines[1], "2 PONG", "{got:?}");
    assert!(lines[2].starts_with("3 ERR unknown-verb"), "{got:?}");
    assert_eq!(lines[3], "4 PONG", "{got:?}");
    // And the retry in a datagram of its own (the first CHECK was recorded).
    let again = udp_ask(
        srv.native,
        "5 CHECK 192.0.2.71 <m@sender.example> <n@rcpt.example>\n",
    );
    assert!(matches!(defer_secs(&again), Some(1..=2)), "{again:?}");
}

// ---------------------------------------------------------------------------------------
// Exemptions, options, configuration file, greylist text
// ---------------------------------------------------------------------------------------

#[test]
fn exemptions_and_request_options() {
    let dir = TempDir::new("exempt");
    let rcpts = dir.file("recipients.txt");
    std::fs::write(
        &rcpts,
        "# opt-out\npostmaster@rcpt.example\n@optout.example\n",
    )
    .unwrap();
    let srv = Server::start_in(dir, &["--whitelist-recipients", &rcpts]);
    let mut c = Conn::connect(srv.native);
    for (req, want) in [
        // The embedded client list (Google's 209.85.128.0/17 and .google.com).
        (
            "CHECK 209.85.128.5 a@b.example c@d.example",
            "PASS exempt:client",
        ),
        (
            "CHECK ::ffff:209.85.128.5 a@b.example c@d.example",
            "PASS exempt:client",
        ),
        (
            "CHECK 192.0.2.1 a@b.example c@d.example name=mail-x.google.com",
            "PASS exempt:client-name",
        ),
        (
            "CHECK 192.0.2.1 a@b.example POSTMASTER@rcpt.example",
            "PASS exempt:recipient",
        ),
        (
            "CHECK 192.0.2.1 a@b.example anyone@optout.example",
            "PASS exempt:recipient",
        ),
        (
            "CHECK 192.0.2.1 a@b.example c@d.example auth=alice",
            "PASS auth",
        ),
        (
            "PEEK 192.0.2.1 a@b.example e@d.example auth=alice",
            "PASS auth",
        ),
    ] {
        assert_eq!(c.ask(req), want, "{req}");
    }
    // helo= only feeds the text; a lookalike name does not match the suffix.
    for req in [
        "CHECK 192.0.2.2 a@b.example c@d.example helo=mail.google.com",
        "CHECK 192.0.2.2 a@b.example f@d.example name=notgoogle.com",
    ] {
        assert!(c.ask(req).starts_with("DEFER 2 "), "{req}");
    }
    assert_eq!(
        srv.m(GREYLISTED_M),
        2.0,
        "exempt requests must not be recorded"
    );

    // Policy: only a verified client_name counts.
    let mut p = PolicyConn::connect(&srv.policy);
    let a = rcpt_attrs("192.0.2.3", "a@b.example", "g@d.example");
    assert_eq!(
        p.ask(&with(a.clone(), "client_name", "mail-y.google.com")),
        "action=DUNNO"
    );
    let unverified = with(a.clone(), "reverse_client_name", "mail-y.google.com");
    assert!(p.ask(&unverified).starts_with("action=DEFER_IF_PERMIT "));
    let mapped = rcpt_attrs("::ffff:209.85.128.9", "a@b.example", "g@d.example");
    assert_eq!(p.ask(&mapped), "action=DUNNO");
    let r = r#"greyhound_decisions_total{answer="pass",reason="exempt:client-name"}"#;
    assert_eq!(srv.m(r), 2.0);

    // A client list of one's own replaces the embedded one.
    let dir = TempDir::new("clients");
    let clients = dir.file("clients.txt");
    std::fs::write(&clients, "192.0.2.0/25\n/^mx[0-9]+\\.partner\\.example$/\n").unwrap();
    let srv = Server::start_in(dir, &["--whitelist-clients", &clients]);
    let mut c = Conn::connect(srv.native);
    assert!(c
        .ask("CHECK 209.85.128.5 a@b.example c@d.example")
        .starts_with("DEFER 2 "));
    assert_eq!(
        c.ask("CHECK 192.0.2.127 a@b.example c@d.example"),
        "PASS exempt:client"
    );
    assert!(c
        .ask("CHECK 192.0.2.128 a@b.example c@d.example")
        .starts_with("DEFER "));
    assert_eq!(
        c.ask("CHECK 198.51.100.1 a@b.example c@d.example name=MX12.partner.example"),
        "PASS exempt:client-name"
    );
}

#[test]
fn config_file_flags_and_greylist_text() {
    let dir = TempDir::new("config");
    let cfg = dir.file("greyhound.toml");
    std::fs::write(
        &cfg,
        "delay = \"10m\"\n\
         greylist-text = \"Come back in %d s (%c, %h): %s -> %r 100%% %x\"\n\
         awl-clients = 0\n\
         [limits]\n\
         max-connections = 100\n",
    )
    .unwrap();
    // --delay on the command line (a bare number of seconds) beats the file's 10m.
    let srv = Server::start_in(dir, &["--config", &cfg, "--delay", "2"]);
    let mut c = Conn::connect(srv.native);
    assert_eq!(
        c.ask("CHECK 192.0.2.1 <a@b.example> <c@d.example> helo=helo.example"),
        "DEFER 2 Come back in 2 s (192.0.2.1, helo.example): a@b.example -> c@d.example 100% %x"
    );
    assert_eq!(
        c.ask("CHECK 2001:db8::5 <> <c@d.example>"),
        "DEFER 2 Come back in 2 s (2001:db8::5, ): <> -> c@d.example 100% %x"
    );
    let mut p = PolicyConn::connect(&srv.policy);
    let a = rcpt_attrs("198.51.100.7", "e@f.example", "g@h.example");
    assert_eq!(
        p.ask(&a),
        "action=DEFER_IF_PERMIT Come back in 2 s (198.51.100.7, mail.sender.example): e@f.example -> g@h.example 100% %x"
    );
    // A flag's text wins over the file's.
    let dir = TempDir::new("config2");
    let cfg2 = dir.file("g.toml");
    std::fs::write(&cfg2, "greylist-text = \"from the file\"\n").unwrap();
    let srv = Server::start_in(
        dir,
        &["--config", &cfg2, "--greylist-text", "from the flag %r"],
    );
    assert_eq!(
        request(srv.native, b"CHECK 192.0.2.1 a@b.example c@d.example\n"),
        "DEFER 2 from the flag c@d.example\n"
    );
}

#[test]
fn greylist_text_protocol_placeholder() {
    let srv = Server::start(&[
        "--greylist-text",
        "Greylisted; from=%s to=%r proto=%p helo=%h",
    ]);
    let mut p = PolicyConn::connect(&srv.policy);
    let a = rcpt_attrs("198.51.100.8", "e@f.example", "g@h.example");
    assert_eq!(
        p.ask(&a),
        "action=DEFER_IF_PERMIT Greylisted; from=e@f.example to=g@h.example proto=ESMTP helo=mail.sender.example"
    );
    let smtp = with(
        rcpt_attrs("198.51.100.8", "e@f.example", "i@h.example"),
        "protocol_name",
        "SMTP",
    );
    assert_eq!(
        p.ask(&smtp),
        "action=DEFER_IF_PERMIT Greylisted; from=e@f.example to=i@h.example proto=SMTP helo=mail.sender.example"
    );
    // Postfix always sends it; a block without it (or the native protocol) leaves it empty.
    let none: Vec<_> = rcpt_attrs("198.51.100.8", "e@f.example", "j@h.example")
        .into_iter()
        .filter(|(n, _)| *n != "protocol_name")
        .collect();
    assert_eq!(
        p.ask(&none),
        "action=DEFER_IF_PERMIT Greylisted; from=e@f.example to=j@h.example proto= helo=mail.sender.example"
    );
    assert_eq!(
        request(
            srv.native,
            b"CHECK 198.51.100.8 <e@f.example> <k@h.example> helo=h.example\n"
        ),
        "DEFER 2 Greylisted; from=e@f.example to=k@h.example proto= helo=h.example\n"
    );
}

#[test]
fn policy_limits_boundaries() {
    let srv = Server::start(&[]);
    let data = with(
        rcpt_attrs("192.0.2.1", "a@b.example", "c@d.example"),
        "protocol_state",
        "DATA",
    );
    // A block of exactly 16384 bytes (the default limit) is answered; one byte more is not.
    let base = policy_block(&data).len() + "pad=\n".len();
    for (extra, answered) in [(0, true), (1, false)] {
        let pad = "p".repeat(16384 - base + extra);
        let mut attrs = data.clone();
        attrs.push(("pad", &pad));
        let block = policy_block(&attrs);
        assert_eq!(block.len(), 16384 + extra);
        let mut p = PolicyConn::connect(&srv.policy);
        if answered {
            assert_eq!(p.ask(&attrs), "action=DUNNO", "16384-byte block");
            assert_eq!(p.ask(&data), "action=DUNNO", "after the largest block");
        } else {
            write_until_closed(&mut PolicyWriter(&mut p), &block, block.len());
            p.expect_closed("16385-byte block");
        }
    }
    // 128 attributes are answered, 129 are not.
    let names: Vec<String> = (0..110).map(|i| format!("x-unknown-{i}")).collect();
    for (count, answered) in [(128, true), (129, false)] {
        let mut attrs = data.clone();
        for n in &names[..count - data.len()] {
            attrs.push((n, "v"));
        }
        assert_eq!(attrs.len(), count);
        let mut p = PolicyConn::connect(&srv.policy);
        if answered {
            assert_eq!(p.ask(&attrs), "action=DUNNO", "{count} attributes");
        } else {
            let _ = p.send(&policy_block(&attrs));
            p.expect_closed(&format!("{count} attributes"));
        }
    }
    // CRLF line ends are accepted as well.
    let mut p = PolicyConn::connect(&srv.policy);
    let crlf = String::from_utf8(policy_block(&data))
        .unwrap()
        .replace('\n', "\r\n");
    p.send(crlf.as_bytes()).unwrap();
    assert_eq!(p.reply(), "action=DUNNO");
}

#[test]
fn policy_answers_a_good_block_sent_before_a_bad_one() {
    let srv = Server::start(&[]);
    let data = with(
        rcpt_attrs("192.0.2.1", "a@b.example", "c@d.example"),
        "protocol_state",
        "DATA",
    );
    // Both blocks arrive in one read: the valid request still deserves its answer, and
    // only then is the connection closed for the malformed one.
    let mut p = PolicyConn::connect(&srv.policy);
    let mut two = policy_block(&data);
    two.extend_from_slice(b"request=smtpd_access_policy\nfoo\n\n");
    p.send(&two).unwrap();
    assert_eq!(p.reply(), "action=DUNNO", "answer to the valid block");
    p.expect_closed("after the malformed block");
}

/// Lets [`write_until_closed`] write through a [`PolicyConn`].
struct PolicyWriter<'a>(&'a mut PolicyConn);

impl Write for PolicyWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.send(buf).map(|()| buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Auto-whitelisting and expiry (the greylisting rules, docs/OPERATIONS.md §1)
// ---------------------------------------------------------------------------------------

#[test]
fn auto_whitelist_counts_one_pass_per_interval() {
    // One counted pass suffices here...
    let one = Server::start(&["--awl-clients", "1"]);
    // ...two are needed here, and two passes within the hour count once.
    let two = Server::start(&["--awl-clients", "2"]);
    let mut c1 = Conn::connect(one.native);
    let mut c2 = Conn::connect(two.native);
    let t = |host: u8, rcpt: &str| {
        format!("CHECK 192.0.2.{host} <list@sender.example> <{rcpt}@rcpt.example>")
    };
    for c in [&mut c1, &mut c2] {
        assert!(c.ask(&t(1, "a")).starts_with("DEFER 2 "));
        assert!(c.ask(&t(2, "b")).starts_with("DEFER 2 "));
    }
    sleep_past(2);
    for c in [&mut c1, &mut c2] {
        assert_eq!(c.ask(&t(1, "a")), "PASS retried");
    }
    // The client's other greylisted triplet, and a new one from the same /24.
    assert_eq!(c1.ask(&t(2, "b")), "PASS awl");
    assert_eq!(c2.ask(&t(2, "b")), "PASS retried");
    assert_eq!(c1.ask(&t(3, "new")), "PASS awl");
    assert!(
        c2.ask(&t(3, "new")).starts_with("DEFER 2 "),
        "second pass within the hour counted"
    );
    // Another network is not whitelisted.
    let other = "CHECK 198.51.100.1 <list@sender.example> <new@rcpt.example>";
    assert!(c1.ask(other).starts_with("DEFER 2 "));
    assert_eq!(one.m("greyhound_awl_active_clients"), 1.0);
    assert_eq!(two.m("greyhound_awl_active_clients"), 0.0);
    assert_eq!(
        one.m(r#"greyhound_decisions_total{answer="pass",reason="awl"}"#),
        2.0
    );
}

#[test]
fn records_expire_after_retry_window_and_whitelist_ttl() {
    let srv = Server::start(&[
        "--retry-window",
        "3s",
        "--whitelist-ttl",
        "1s",
        "--awl-clients",
        "0",
    ]);
    let mut c = Conn::connect(srv.native);
    let a = "CHECK 192.0.2.1 <ttl@sender.example> <passed@rcpt.example>";
    let b = "CHECK 198.51.100.1 <ttl@sender.example> <late@rcpt.example>";
    let z = "CHECK 203.0.113.1 <ttl@sender.example> <never@rcpt.example>";
    let first = Instant::now();
    for req in [a, b, z] {
        assert!(c.ask(req).starts_with("DEFER 2 "), "{req}");
    }
    sleep_past(2);
    assert_eq!(c.ask(a), "PASS retried");
    assert_eq!(srv.m(WHITELISTED_M), 1.0);
    // 4.5 s after first sight: past the 3 s retry window; 2 s after A's pass: past its TTL.
    thread::sleep((first + Duration::from_millis(4500)).saturating_duration_since(Instant::now()));
    assert!(
        c.ask(a).starts_with("DEFER 2 "),
        "whitelisting outlived its TTL"
    );
    assert!(
        c.ask(b).starts_with("DEFER 2 "),
        "a retry after the window passed"
    );
    // Z was never retried: it leaves memory by itself.
    srv.wait_metric(GREYLISTED_M, 2.0);
    srv.wait_metric(WHITELISTED_M, 0.0);
    assert!(srv.m("greyhound_expired_records_total") >= 1.0);
}

// ---------------------------------------------------------------------------------------
// 13. Policy bad input
// ---------------------------------------------------------------------------------------

/// Writes `total` bytes of `chunk`s until done or the server closes; only a closed
/// connection may stop the writing.
fn write_until_closed(s: &mut impl Write, chunk: &[u8], total: usize) {
    let mut sent = 0;
    while sent < total {
        match s.write(chunk) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                assert!(
                    matches!(
                        e.kind(),
                        ErrorKind::BrokenPipe
                            | ErrorKind::ConnectionReset
                            | ErrorKind::ConnectionAborted
                    ),
                    "write stopped by {e} (the server neither read nor closed)"
                );
                return;
            }
        }
    }
}

#[test]
fn policy_bad_input_closes_without_reply() {
    let srv = Server::start(&[]);
    let rss_before = srv.rss_kib();

    // 10 MB in one block.
    let mut s = connect(srv.policy_tcp());
    s.write_all(b"request=smtpd_access_policy\nprotocol_state=RCPT\nx=")
        .unwrap();
    write_until_closed(&mut s, &[b'a'; 64 * 1024], 10 << 20);
    assert_closed_without_reply(&mut s, "10 MB block");
    // 1 MB of short attribute lines.
    let mut s = connect(srv.policy_tcp());
    write_until_closed(&mut s, &b"name=value\n".repeat(1000), 1 << 20);
    assert_closed_without_reply(&mut s, "too many attributes");
    let rss = srv.rss_kib();
    assert!(
        rss < 200 * 1024,
        "RSS {rss} KiB after a 10 MB block (was {rss_before})"
    );

    let good = rcpt_attrs("192.0.2.75", "bad@sender.example", "input@rcpt.example");
    let data = with(good.clone(), "protocol_state", "DATA");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "bad-line",
            b"request=smtpd_access_policy\nprotocol_state=RCPT\nfoo\n\n".to_vec(),
        ),
        (
            "bad-line",
            b"=value\nrequest=smtpd_access_policy\n\n".to_vec(),
        ),
        (
            "control-char",
            b"request=smtpd_access_policy\nprotocol_state=RCPT\nsender=a\0b@c.example\n\n".to_vec(),
        ),
        (
            "bad-utf8",
            b"request=smtpd_access_policy\nsender=\xff@c.example\n\n".to_vec(),
        ),
        (
            "not-policy-request",
            b"request=other\nprotocol_state=RCPT\n\n".to_vec(),
        ),
        ("not-policy-request", b"protocol_state=RCPT\n\n".to_vec()),
        (
            "policy-bad-client-address",
            policy_block(&with(good.clone(), "client_address", "999.1.1.1")),
        ),
    ];
    for (code, block) in &cases {
        // A good block first: the connection is healthy until the bad one.
        let mut p = PolicyConn::connect(&srv.policy);
        assert_eq!(p.ask(&data), "action=DUNNO");
        let _ = p.send(block);
        p.expect_closed(&format!("{code}: {:?}", String::from_utf8_lossy(block)));
    }

    // The server still serves, and nothing bad was recorded.
    let mut p = PolicyConn::connect(&srv.policy);
    assert!(p.ask(&good).starts_with("action=DEFER_IF_PERMIT "));
    let m = srv.metrics();
    let get = |name: &str| common::metric_value(&m, name).unwrap_or(-1.0);
    assert_eq!(get(GREYLISTED_M), 1.0);
    assert_eq!(get(&error_m("policy", "block-too-large")), 1.0);
    assert_eq!(get(&error_m("policy", "too-many-attributes")), 1.0);
    for code in [
        "bad-line",
        "control-char",
        "bad-utf8",
        "not-policy-request",
        "policy-bad-client-address",
    ] {
        let want = cases.iter().filter(|(c, _)| *c == code).count() as f64;
        assert_eq!(get(&error_m("policy", code)), want, "{code}");
    }
}

// ---------------------------------------------------------------------------------------
// 14. Robustness
// ---------------------------------------------------------------------------------------

#[test]
fn slow_client_does_not_hold_up_others() {
    let srv = Server::start(&[]);
    let fast_done = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let native = srv.native;
    let slow = {
        let (fast_done, sent) = (fast_done.clone(), sent.clone());
        thread::spawn(move || {
            // One byte every 200 ms, until the other client is done and a line is complete.
            let mut s = connect(native);
            let pattern = b"PING\n";
            let mut n = 0;
            while n < 100 && !(fast_done.load(Ordering::SeqCst) && n % pattern.len() == 0) {
                s.write_all(&pattern[n % pattern.len()..][..1]).unwrap();
                n += 1;
                sent.store(n, Ordering::SeqCst);
                thread::sleep(Duration::from_millis(200));
            }
            s.shutdown(Shutdown::Write).unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            (n, out)
        })
    };
    assert!(poll(IO_TIMEOUT, || (sent.load(Ordering::SeqCst) >= 2)
        .then_some(()))
    .is_some());
    let mut c = Conn::connect(srv.native);
    for i in 0..10 {
        assert_eq!(c.ask(&format!("{i} PING")), format!("{i} PONG"));
        let req = format!("CHECK 192.0.2.{i} <slow@sender.example> <fast{i}@rcpt.example>");
        assert!(request(srv.native, req.as_bytes()).starts_with("DEFER 2 "));
    }
    let bytes_meanwhile = sent.load(Ordering::SeqCst);
    fast_done.store(true, Ordering::SeqCst);
    let (n, out) = slow.join().unwrap();
    assert!(n < 100, "the fast client took the whole slow session");
    assert_eq!(out, "PONG\n".repeat(n / 5), "slow client after {n} bytes");
    assert!(bytes_meanwhile >= 2);
}

#[test]
fn connection_churn_leaves_nothing_open() {
    let srv = Server::start(&[]);
    let per_thread = 500;
    let workers: Vec<_> = (0..4)
        .map(|t| {
            let addr = if t % 2 == 0 {
                srv.native
            } else {
                srv.policy_tcp()
            };
            thread::spawn(move || {
                for i in 0..per_thread {
                    let mut s = connect(addr);
                    match (i % 3, t % 2) {
                        (0, _) => {}
                        (1, 0) => s.write_all(b"PI").unwrap(),
                        (1, _) => s.write_all(b"request=smtpd_access_policy\n").unwrap(),
                        (_, 0) => s.write_all(b"PING\n").unwrap(),
                        (_, _) => s
                            .write_all(&policy_block(&with(
                                rcpt_attrs("192.0.2.1", "a@b.example", "c@d.example"),
                                "protocol_state",
                                "DATA",
                            )))
                            .unwrap(),
                    }
                    drop(s);
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    srv.wait_metric(r#"greyhound_connections_total{proto="native-tcp"}"#, 1000.0);
    srv.wait_metric(r#"greyhound_connections_total{proto="policy"}"#, 1000.0);
    srv.wait_metric(OPEN_M, 0.0);
    assert_eq!(request(srv.native, b"PING\n"), "PONG\n");
    let mut p = PolicyConn::connect(&srv.policy);
    let a = rcpt_attrs("192.0.2.77", "churn@sender.example", "r@rcpt.example");
    assert!(p.ask(&a).starts_with("action=DEFER_IF_PERMIT "));
    drop(p);
    srv.wait_metric(OPEN_M, 0.0);
}

/// Replies the native TCP port owes for `data` sent and then half-closed: one per `\n`, and
/// one for a last line without it.
fn native_replies_owed(data: &[u8]) -> usize {
    let newlines = data.iter().filter(|&&b| b == b'\n').count();
    newlines + usize::from(data.last().is_some_and(|&b| b != b'\n'))
}

#[test]
fn random_bytes_on_every_port() {
    let srv = Server::start(&[]);
    let mut rng = XorShift::new(0x9E37_79B9_7F4A_7C15);

    // Native TCP: 256 KB of garbage, every line answered ERR, in one stream.
    let garbage = rng.bytes(256 * 1024);
    let owed = native_replies_owed(&garbage);
    let c = Conn::connect(srv.native);
    let mut w = c.stream().try_clone().unwrap();
    let writer = thread::spawn(move || {
        w.write_all(&garbage)?;
        w.shutdown(Shutdown::Write)
    });
    let mut c = c;
    let replies = c.read_to_end();
    writer.join().unwrap().unwrap();
    let lines: Vec<&str> = replies.lines().collect();
    assert_eq!(lines.len(), owed, "replies to garbage");
    for l in &lines {
        let mut words = l.split(' ');
        let mut first = words.next().unwrap_or("");
        if !first.is_empty() && first.bytes().all(|b| b.is_ascii_digit()) {
            first = words.next().unwrap_or("");
        }
        assert_eq!(first, "ERR", "garbage answered {l:?}");
    }

    // Native UDP: datagrams of garbage, never a reply larger than its datagram.
    for i in 0..160 {
        let len = if i < 150 {
            rng.range(32, 1400)
        } else {
            rng.range(1, 31)
        };
        let dg = rng.bytes(len);
        let wait = Duration::from_millis(if i < 150 { 1000 } else { 200 });
        if let Some(r) = udp_request_within(srv.native, &dg, wait) {
            assert!(
                r.len() <= dg.len(),
                "{} byte reply to {} bytes",
                r.len(),
                dg.len()
            );
        }
    }

    // Policy: garbage closes the connection without a reply.
    for _ in 0..8 {
        let mut s = connect(srv.policy_tcp());
        let len = rng.range(1, 32 * 1024);
        write_until_closed(&mut s, &rng.bytes(len), len);
        let _ = s.shutdown(Shutdown::Write);
        assert_closed_without_reply(&mut s, "policy garbage");
    }

    // Metrics: garbage gets a 404 or nothing.
    for _ in 0..8 {
        let mut s = connect(srv.metrics_addr);
        let len = rng.range(1, 16 * 1024);
        write_until_closed(&mut s, &rng.bytes(len), len);
        let _ = s.shutdown(Shutdown::Write);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        assert!(
            out.is_empty() || out.starts_with(b"HTTP/1.1 404"),
            "metrics answered garbage with {:?}",
            String::from_utf8_lossy(&out[..out.len().min(200)])
        );
    }

    // Still serving, and the garbage recorded nothing.
    assert_eq!(request(srv.native, b"PING\n"), "PONG\n");
    let reply = request(
        srv.native,
        b"CHECK 192.0.2.88 <after@sender.example> <garbage@rcpt.example>\n",
    );
    assert!(reply.starts_with("DEFER 2 "), "{reply:?}");
    assert_eq!(srv.m(GREYLISTED_M), 1.0);
    assert_eq!(srv.m(WHITELISTED_M), 0.0);
    srv.wait_metric(OPEN_M, 0.0);
}

// ---------------------------------------------------------------------------------------
// 15. Limits
// ---------------------------------------------------------------------------------------

#[test]
fn max_connections_refuses_the_sixth() {
    let srv = Server::start(&["--max-connections", "5"]);
    let mut five: Vec<Conn> = (0..5).map(|_| Conn::connect(srv.native)).collect();
    for (i, c) in five.iter_mut().enumerate() {
        assert_eq!(c.ask(&format!("{i} PING")), format!("{i} PONG"));
    }
    let mut sixth = Conn::connect(srv.native);
    let _ = sixth.stream().set_nodelay(true);
    sixth.send(b"PING\n");
    sixth.expect_closed("6th native connection");
    // Each listener has its own cap: the policy port still answers.
    let mut policy = PolicyConn::connect(&srv.policy);
    let reply = policy.ask(&rcpt_attrs("192.0.2.1", "a@b.example", "c@d.example"));
    assert!(reply.starts_with("action="), "{reply:?}");
    drop(policy);
    for (i, c) in five.iter_mut().enumerate() {
        assert_eq!(
            c.ask(&format!("{i} PING")),
            format!("{i} PONG"),
            "after the 6th"
        );
    }
    assert_eq!(srv.m("greyhound_over_limit_connections_total"), 1.0);
    // A freed slot can be taken again.
    drop(five.pop());
    srv.wait_metric(OPEN_M, 4.0);
    let mut again = Conn::connect(srv.native);
    assert_eq!(again.ask("PING"), "PONG");
}

#[test]
fn small_read_and_line_limits_still_answer_everything_in_order() {
    let srv = Server::start(&["--requests-per-read", "1", "--max-line", "64"]);
    let mut req = Vec::new();
    let mut want = Vec::new();
    for i in 0..40 {
        match i % 4 {
            0 => {
                req.extend(format!("{i} PING\n").bytes());
                want.push(format!("{i} PONG"));
            }
            1 => {
                // Exactly 64 bytes: accepted.
                let line = format!("{i:02} PING{}", " ".repeat(57));
                assert_eq!(line.len(), 64);
                req.extend(format!("{line}\n").bytes());
                want.push(format!("{i:02} PONG"));
            }
            2 => {
                // 65 bytes: too long.
                req.extend(vec![b'z'; 65]);
                req.push(b'\n');
                want.push("ERR too-long".into());
            }
            _ => {
                req.extend(format!("{i} CHECK 192.0.2.{i} a@b.example r{i}@c.example\n").bytes());
                want.push(format!("{i} DEFER 2"));
            }
        }
    }
    req.extend(b"99 PING"); // the last line without its newline, then half-close
    want.push("99 PONG".into());
    let got = request(srv.native, &req);
    let lines: Vec<&str> = got.lines().collect();
    assert_eq!(lines.len(), want.len(), "{got}");
    for (i, (g, w)) in lines.iter().zip(&want).enumerate() {
        assert!(
            g == w || g.starts_with(&format!("{w} ")),
            "reply {i}: {g:?}, want {w:?}"
        );
    }
    // UDP applies the same line limit.
    let long = format!("PING{}\n", " ".repeat(61));
    let r = udp_ask(srv.native, &long);
    assert!(r.starts_with("ERR too-long"), "{r:?}");
}

#[test]
fn too_long_lines_echo_their_id() {
    let srv = Server::start(&[]);
    // The ID is what lets a UDP client match an answer to its request.
    let line = format!("7 PING{}", " ".repeat(1100));
    let r = udp_ask(srv.native, &format!("{line}\n"));
    assert!(r.starts_with("7 ERR too-long"), "UDP: {r:?}");
    // TCP echoes it for a line just over the limit...
    let mut c = Conn::connect(srv.native);
    let just_over = format!("8 PING{}", " ".repeat(1019));
    assert_eq!(just_over.len(), 1025);
    assert!(c.ask(&just_over).starts_with("8 ERR too-long"));
    // ...and for a longer one alike.
    assert!(
        c.ask(&line.replacen('7', "9", 1))
            .starts_with("9 ERR too-long"),
        "TCP, 1106 bytes"
    );
}

#[test]
fn idle_timeout_closes_idle_connections() {
    let srv = Server::start(&["--idle-timeout", "1s"]);
    let mut used = Conn::connect(srv.native);
    assert_eq!(used.ask("PING"), "PONG");
    let mut silent = connect(srv.native);
    let mut p = PolicyConn::connect(&srv.policy);
    let a = rcpt_attrs("192.0.2.1", "a@b.example", "c@d.example");
    assert_eq!(p.ask(&with(a, "protocol_state", "DATA")), "action=DUNNO");
    used.expect_closed("idle native connection");
    assert_closed_without_reply(&mut silent, "silent native connection");
    p.expect_closed("idle policy connection");
    srv.wait_metric(OPEN_M, 0.0);
    // New connections are served as usual.
    assert_eq!(request(srv.native, b"PING\n"), "PONG\n");
}

#[test]
fn idle_timeout_spares_a_connection_in_use() {
    // The idle timer is armed once per connection and pushed back only when it fires: a
    // connection that keeps asking must outlive several idle periods, and be closed once it
    // falls silent.
    let srv = Server::start(&["--idle-timeout", "1s"]);
    let mut c = Conn::connect(srv.native);
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(3500) {
        assert_eq!(c.ask("PING"), "PONG", "closed while in use");
        thread::sleep(Duration::from_millis(300));
    }
    let mut p = PolicyConn::connect(&srv.policy);
    let a = rcpt_attrs("192.0.2.1", "a@b.example", "c@d.example");
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(3500) {
        assert_eq!(
            p.ask(&with(a.clone(), "protocol_state", "DATA")),
            "action=DUNNO",
            "policy connection closed while in use"
        );
        thread::sleep(Duration::from_millis(300));
    }
    c.expect_closed("native connection after falling silent");
    p.expect_closed("policy connection after falling silent");
}

#[test]
fn sigterm_stops_a_client_that_never_stops_sending() {
    // A pipelining client that keeps the socket readable: the server answers what it has read
    // and closes at its next read, so shutdown is not held up until the grace period's end.
    let mut srv = Server::start(&[]);
    let mut s = connect(srv.native);
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let mut r = s.try_clone().expect("clone");
        thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 16];
            let mut got = 0usize;
            loop {
                match r.read(&mut buf) {
                    Ok(0) | Err(_) => return got,
                    Ok(n) => got += n,
                }
            }
        })
    };
    let writer = {
        let stop = stop.clone();
        thread::spawn(move || {
            let burst = "PING\n".repeat(200);
            while !stop.load(Ordering::Relaxed) {
                if s.write_all(burst.as_bytes()).is_err() {
                    return;
                }
            }
        })
    };
    thread::sleep(Duration::from_millis(300));
    srv.signal("TERM");
    let status = srv.wait_exit(IO_TIMEOUT);
    stop.store(true, Ordering::Relaxed);
    let status = status.unwrap_or_else(|| {
        panic!(
            "still running after {IO_TIMEOUT:?}; log:\n{}",
            srv.logs().join("\n")
        )
    });
    assert_eq!(status.code(), Some(0), "log:\n{}", srv.logs().join("\n"));
    let got = reader.join().expect("reader");
    assert!(got > 0, "no answer before the shutdown");
    let _ = writer.join();
    // Closed at a read, never mid-answer: whatever arrived is whole PONG lines.
    assert_eq!(got % "PONG\n".len(), 0, "a partial answer ({got} bytes)");
}

// ---------------------------------------------------------------------------------------
// Greytraps
// ---------------------------------------------------------------------------------------

#[test]
fn a_client_writing_to_a_greytrap_is_deferred_and_a_bad_trap_file_is_named() {
    let dir = TempDir::new("trap");
    let traps = dir.file("traps.txt");
    std::fs::write(&traps, "# traps\ntrap@example.net\n@spamtrap.example\n").unwrap();
    let srv = Server::start_in(dir, &["--greytrap-recipients", &traps, "--delay", "1s"]);
    let mut c = Conn::connect(srv.native);
    // A triplet of 192.0.2.0/24 whitelisted before the trap.
    let known = "CHECK 192.0.2.70 <a@sender.example> <b@rcpt.example>";
    assert!(c.ask(known).starts_with("DEFER 1 "));
    sleep_past(1);
    assert_eq!(c.ask(known), "PASS retried");
    // PEEK at a trap traps nobody.
    assert!(c
        .ask("PEEK 192.0.2.71 <x@z.example> <trap@example.net>")
        .starts_with("DEFER "));
    assert_eq!(c.ask(known), "PASS known");
    // The trap: DEFER as usual (the sender learns nothing), and the /24 is trapped.
    assert!(c
        .ask("CHECK 192.0.2.71 <x@z.example> <Trap@Example.NET>")
        .starts_with("DEFER 1 "));
    assert!(
        c.ask(known).starts_with("DEFER 1 "),
        "known triplet of a trapped client"
    );
    let other = "CHECK 198.51.100.7 <a@sender.example> <b@rcpt.example>";
    assert!(c.ask(other).starts_with("DEFER 1 "));
    sleep_past(1);
    assert_eq!(
        c.ask(other),
        "PASS retried",
        "another client is not trapped"
    );
    let m = srv.metrics();
    assert_eq!(
        common::metric_value(&m, "greyhound_greytrap_hits_total"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        common::metric_value(&m, "greyhound_trapped_clients"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        common::metric_value(&m, "greyhound_greytrap_deferrals_total"),
        Some(1.0),
        "{m}"
    );

    // A bad line on SIGHUP is named with its file and line; the traps in force stay.
    std::fs::write(&traps, "trap@example.net\nnot an address\n").unwrap();
    srv.signal("HUP");
    let at = format!("{traps}:2");
    let line = srv.wait_log(&format!("naming {at}"), |l| l.contains(&at));
    assert!(line.contains("ERROR"), "not an error: {line:?}");
    assert!(c
        .ask("CHECK 203.0.113.9 <x@z.example> <u@spamtrap.example>")
        .starts_with("DEFER "));
    assert!(c
        .ask("CHECK 203.0.113.9 <a@sender.example> <b@rcpt.example>")
        .starts_with("DEFER "));
    let m = srv.metrics();
    assert_eq!(
        common::metric_value(&m, "greyhound_trapped_clients"),
        Some(2.0),
        "{m}"
    );
}

#[test]
fn a_bad_greytrap_file_at_start_is_one_line_naming_file_and_line() {
    let (list, lines) = refused_with_list(
        "trapbad",
        "--greytrap-recipients",
        "ok@example.net\n\nbad entry\n",
    );
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with(&format!("greyhound: {list}:3: ")),
        "{lines:?}"
    );
}

#[test]
fn native_body_digest_is_one_record_for_all_recipients() {
    let srv = Server::start(&["--delay", "3s"]);
    let mut c = Conn::connect(srv.native);
    let digest = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    let req = format!("CHECK 192.0.2.1 <a@b.example> <c@d.example> body={digest}");
    let first = Instant::now();
    let reply = c.ask(&req);
    assert_eq!(defer_secs(&reply), Some(3), "{reply:?}");
    // The recipient-stage triplet of the same envelope is a record of its own.
    let rcpt = c.ask("CHECK 192.0.2.1 <a@b.example> <c@d.example>");
    assert_eq!(defer_secs(&rcpt), Some(3), "{rcpt:?}");

    // The same message to another recipient (digest in upper case) is the same record: an
    // early retry, counting from the first attempt.
    thread::sleep(Duration::from_millis(1500));
    let upper = digest.to_ascii_uppercase();
    let other = c.ask(&format!(
        "CHECK 192.0.2.1 <a@b.example> <e@f.example> body={upper}"
    ));
    assert!(matches!(defer_secs(&other), Some(1..=2)), "{other:?}");
    // A bad digest is refused, not recorded.
    let bad = c.ask("CHECK 192.0.2.1 <a@b.example> <c@d.example> body=abc");
    assert!(bad.starts_with("ERR bad-option"), "{bad:?}");

    thread::sleep((first + Duration::from_millis(3250)).saturating_duration_since(Instant::now()));
    assert_eq!(
        c.ask(&format!(
            "CHECK 192.0.2.1 <a@b.example> <g@h.example> body={digest}"
        )),
        "PASS retried"
    );
    assert_eq!(c.ask(&req), "PASS known");
}

// ---------------------------------------------------------------------------------------
// Per-recipient-domain policy (`--domain-policy`)
// ---------------------------------------------------------------------------------------

const DOMAIN_OFF_M: &str = r#"greyhound_decisions_total{answer="pass",reason="domain-off"}"#;

#[test]
fn domain_policy_own_delay_off_and_sighup_reload() {
    let dir = TempDir::new("domains");
    let list = dir.file("domains");
    std::fs::write(
        &list,
        "# per-domain policy\nFast.example delay=1s\n.off.example off  # all subdomains\n",
    )
    .unwrap();
    let srv = Server::start_in(dir, &["--delay", "1h", "--domain-policy", &list]);
    let mut c = Conn::connect(srv.native);
    let ask = |c: &mut Conn, rcpt: &str| c.ask(&format!("CHECK 192.0.2.70 <a@b.example> <{rcpt}>"));

    // The domain's own delay, while the global one is an hour.
    let first = ask(&mut c, "r@fast.example");
    assert_eq!(defer_secs(&first), Some(1), "{first:?}");
    let other = ask(&mut c, "r@slow.example");
    assert_eq!(defer_secs(&other), Some(3600), "{other:?}");
    // `off`: passes, records nothing; Postfix is answered DUNNO.
    assert_eq!(ask(&mut c, "r@mx.OFF.example"), "PASS domain-off");
    let mut p = PolicyConn::connect(&srv.policy);
    let a = rcpt_attrs("192.0.2.71", "g@h.example", "i@a.off.example");
    assert_eq!(p.ask(&a), "action=DUNNO");
    // `.off.example` is its subdomains, not itself.
    assert!(ask(&mut c, "r@off.example").starts_with("DEFER 3600 "));
    assert_eq!(srv.m(DOMAIN_OFF_M), 2.0);
    assert_eq!(srv.m(GREYLISTED_M), 3.0, "off domains are never recorded");

    sleep_past(1);
    assert_eq!(ask(&mut c, "r@fast.example"), "PASS retried");
    assert_eq!(ask(&mut c, "r@fast.example"), "PASS known");
    assert!(ask(&mut c, "r@slow.example").starts_with("DEFER "));

    // SIGHUP: the new file replaces the old one.
    std::fs::write(&list, "new.example off\n").unwrap();
    srv.signal("HUP");
    let mut n = 0;
    let reloaded = poll(IO_TIMEOUT, || {
        n += 1;
        (ask(&mut c, &format!("p{n}@new.example")) == "PASS domain-off").then_some(())
    });
    assert!(
        reloaded.is_some(),
        "new file not in force; log:\n{}",
        srv.logs().join("\n")
    );
    assert!(ask(&mut c, "s@mx.off.example").starts_with("DEFER 3600 "));
    assert!(ask(&mut c, "s@fast.example").starts_with("DEFER 3600 "));

    // A bad line on SIGHUP keeps the previous file in force and names the file and line.
    std::fs::write(&list, "other.example off\nnew.example frobnicate\n").unwrap();
    srv.signal("HUP");
    let at = format!("{list}:2");
    let line = srv.wait_log(&format!("naming {at}"), |l| l.contains(&at));
    assert!(line.contains("ERROR"), "not an error: {line:?}");
    assert!(line.contains("frobnicate"), "{line:?}");
    assert_eq!(ask(&mut c, "t@new.example"), "PASS domain-off");
    assert!(ask(&mut c, "t@other.example").starts_with("DEFER 3600 "));
}

#[test]
fn bad_domain_policy_stops_the_start_naming_file_and_line() {
    let (list, lines) = refused_with_list(
        "domainsbad",
        "--domain-policy",
        "a.example off\n\nb.example retry-window=3d\n",
    );
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with(&format!(
            "greyhound: {list}:3: retry-window=3d is longer than the global retry-window (2d): \
             records live by the global settings"
        )),
        "{lines:?}"
    );
}
