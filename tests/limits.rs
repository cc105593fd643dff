//! Issue 13's table limits through the real binary (DESIGN §12): `--max-triplets` keeps the
//! table bounded under a flood of new triplets while every whitelisted triplet survives, and
//! `--max-new-per-client` defers a client's new triplets past its limit without recording
//! them; both counted in metrics and logged; out-of-range values refused with one line.

mod common;

use common::*;

/// Sends `lines` pipelined, a few hundred at a time, and returns the replies in order.
fn pipeline(c: &mut Conn, lines: &[String]) -> Vec<String> {
    let mut replies = Vec::with_capacity(lines.len());
    for chunk in lines.chunks(500) {
        let mut buf = String::new();
        for l in chunk {
            buf.push_str(l);
            buf.push('\n');
        }
        c.send(buf.as_bytes());
        replies.extend(chunk.iter().map(|_| c.line()));
    }
    replies
}

fn live_triplets(srv: &Server) -> f64 {
    srv.m("greyhound_triplets{state=\"greylisted\"}")
        + srv.m("greyhound_triplets{state=\"whitelisted\"}")
}

/// The short, bounded version of the flood proof (loadtest/flood.sh is the long one): 200
/// whitelisted triplets, then 30 000 new ones from 600 clients into a table of 10 000. (The
/// bound is kept per shard, 39 records each here: a table bound of a few hundred would let
/// the odd shard fill up with whitelisted records alone, and then evict one of those.)
#[test]
fn a_flood_of_new_triplets_stays_within_max_triplets_and_whitelisted_ones_survive() {
    // No auto-whitelist, so the flood's clients keep making records.
    let srv = Server::start(&[
        "--max-triplets",
        "10000",
        "--delay",
        "1s",
        "--awl-clients",
        "0",
    ]);
    let mut c = Conn::connect(srv.native);
    let known: Vec<String> = (0..200)
        .map(|i| format!("192.0.2.{} s{i}@known.example r@rcpt.example", i % 200))
        .collect();
    let checks: Vec<String> = known.iter().map(|t| format!("CHECK {t}")).collect();
    assert!(pipeline(&mut c, &checks)
        .iter()
        .all(|r| r.starts_with("DEFER ")));
    sleep_past(3);
    let passed = pipeline(&mut c, &checks);
    assert!(passed.iter().all(|r| r == "PASS retried"), "{passed:?}");
    srv.wait_metric("greyhound_triplets{state=\"whitelisted\"}", 200.0);

    let flood: Vec<String> = (0..30_000)
        .map(|i| {
            format!(
                "CHECK 10.{}.{}.1 f{i}@flood.example r{i}@rcpt.example",
                i % 600 / 256,
                i % 600 % 256
            )
        })
        .collect();
    let replies = pipeline(&mut c, &flood);
    assert!(replies.iter().all(|r| r.starts_with("DEFER ")));

    let live = live_triplets(&srv);
    assert!(live <= 10_000.0, "{live} triplets kept, bound 10000");
    assert_eq!(
        srv.m("greyhound_evicted_total{state=\"whitelisted\"}"),
        0.0,
        "{}",
        srv.metrics()
    );
    assert_eq!(
        srv.m("greyhound_evicted_total{state=\"greylisted\"}") + live,
        30_200.0,
        "every record not kept was evicted"
    );
    // Every whitelisted triplet is still known.
    let peeks: Vec<String> = known.iter().map(|t| format!("PEEK {t}")).collect();
    let answers = pipeline(&mut c, &peeks);
    let survived = answers.iter().filter(|r| *r == "PASS known").count();
    assert_eq!(survived, 200, "{answers:?}");
    // The newest flood triplet is kept: checking it again makes no new record.
    let before = srv.m("greyhound_evicted_total{state=\"greylisted\"}");
    pipeline(&mut c, &flood[29_999..]);
    assert_eq!(
        srv.m("greyhound_evicted_total{state=\"greylisted\"}"),
        before
    );
    srv.wait_log("the eviction line", |l| l.contains("max-triplets reached"));
}

#[test]
fn max_new_per_client_defers_new_triplets_without_recording_them() {
    let srv = Server::start(&["--max-new-per-client", "5"]);
    let mut c = Conn::connect(srv.native);
    let lines = |client: &str, n: usize| -> Vec<String> {
        (0..n)
            .map(|i| format!("CHECK {client} s{i}@x.example r@rcpt.example"))
            .collect()
    };
    // PEEKs of new triplets never count.
    let peeks: Vec<String> = (0..20)
        .map(|i| format!("PEEK 192.0.2.1 p{i}@x.example r@rcpt.example"))
        .collect();
    pipeline(&mut c, &peeks);
    // A minute boundary between the CHECKs would reset the count: start right after one.
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    if secs % 60 > 50 {
        std::thread::sleep(std::time::Duration::from_secs(61 - secs % 60));
    }
    let replies = pipeline(&mut c, &lines("192.0.2.1", 8));
    // Every one is DEFER for the whole delay; only five are recorded.
    assert!(
        replies.iter().all(|r| r.starts_with("DEFER 2 ")),
        "{replies:?}"
    );
    assert_eq!(srv.m("greyhound_new_refused_total"), 3.0);
    assert_eq!(srv.m("greyhound_triplets{state=\"greylisted\"}"), 5.0);
    // Another client is not affected.
    pipeline(&mut c, &lines("198.51.100.1", 4));
    assert_eq!(srv.m("greyhound_triplets{state=\"greylisted\"}"), 9.0);
    assert_eq!(srv.m("greyhound_new_refused_total"), 3.0);
    // The recorded ones pass after the delay; the refused ones start again from scratch.
    sleep_past(2);
    let again = pipeline(&mut c, &lines("192.0.2.1", 5));
    assert!(again.iter().all(|r| r == "PASS retried"), "{again:?}");
    srv.wait_log("the refusal line", |l| {
        l.contains("max-new-per-client reached")
    });
}

#[test]
fn limits_out_of_range_are_refused_in_one_line() {
    let dir = TempDir::new("limits-refused");
    let data = dir.file("data");
    for (flag, value) in [
        ("--max-triplets", "0"),
        ("--max-triplets", "999"),
        ("--max-triplets", "4000000001"),
        ("--max-new-per-client", "1000001"),
        ("--max-new-per-client", "-1"),
    ] {
        let (status, _, err) = run_serve(&data, &[flag, value]);
        assert!(!status.success(), "{flag} {value} started");
        assert!(
            matches!(status.code(), Some(1 | 2)),
            "{flag} {value}: {status}"
        );
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{flag} {value}:\n{err}");
        assert!(
            lines[0].contains(flag.trim_start_matches("--")) && lines[0].contains(value),
            "{flag} {value}: {}",
            lines[0]
        );
    }
}
