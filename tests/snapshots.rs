//! Persistence against the real binary: graceful restart, `kill -9` at random moments (and in
//! the middle of snapshot writes) many times in a row, a damaged newest snapshot, a snapshot
//! made with other prefixes, and `greyhound snapshot inspect`.
//!
//! No test asserts a duration; timings only decide when to kill.

mod common;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{run_bin, run_serve, sleep_past, Server, TempDir, XorShift, IO_TIMEOUT};

const WHITELISTED_M: &str = r#"greyhound_triplets{state="whitelisted"}"#;
const LOADED_M: &str = "greyhound_snapshot_loaded_triplets";

fn triplet(i: u64) -> String {
    format!(
        "10.{}.{}.9 s{i}@sender.example r{i}@rcpt.example",
        (i >> 8) & 255,
        i & 255
    )
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

use common::PipeClient as Client;

/// What the snapshot tests ask of a [`Client`] beyond a pipeline.
trait Whitelisting {
    fn whitelist(&mut self, ids: std::ops::Range<u64>) -> io::Result<Vec<(u64, u64)>>;
    fn peek(&mut self, ids: &[u64]) -> Vec<String>;
}

impl Whitelisting for Client {
    /// With `--delay 1s` (a zero delay is refused): a CHECK of each, a wait past the delay,
    /// and a second CHECK of each whitelist new triplets. Returns the triplets whitelisted
    /// and, for each, a Unix second no earlier than the moment the server recorded it.
    fn whitelist(&mut self, ids: std::ops::Range<u64>) -> io::Result<Vec<(u64, u64)>> {
        let lines: Vec<String> = ids
            .clone()
            .map(|i| format!("CHECK {}", triplet(i)))
            .collect();
        let mut first = Vec::with_capacity(lines.len());
        for chunk in lines.chunks(5000) {
            first.extend(self.pipeline(chunk)?);
        }
        sleep_past(1);
        let mut second = Vec::with_capacity(lines.len());
        for chunk in lines.chunks(5000) {
            second.extend(self.pipeline(chunk)?);
        }
        let seen = unix_now();
        let mut passed = Vec::new();
        for ((i, a), b) in ids.zip(&first).zip(&second) {
            assert!(a.starts_with("DEFER "), "first CHECK of {i}: {a:?}");
            assert_eq!(b, "PASS retried", "second CHECK of {i}");
            passed.push((i, seen));
        }
        Ok(passed)
    }

    /// PEEKs each id; returns the replies.
    fn peek(&mut self, ids: &[u64]) -> Vec<String> {
        let mut all = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(2000) {
            let lines: Vec<String> = chunk
                .iter()
                .map(|&i| format!("PEEK {}", triplet(i)))
                .collect();
            all.extend(self.pipeline(&lines).expect("PEEK a running server"));
        }
        all
    }
}

/// Complete snapshots in a data directory, newest first.
fn snapshots(data: &Path) -> Vec<PathBuf> {
    let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(data)
        .expect("read data dir")
        .filter_map(|e| {
            let e = e.ok()?;
            let name = e.file_name().into_string().ok()?;
            let g = name
                .strip_prefix("snapshot-")?
                .strip_suffix(".snap")?
                .parse()
                .ok()?;
            Some((g, e.path()))
        })
        .collect();
    v.sort_by_key(|e| std::cmp::Reverse(e.0));
    v.into_iter().map(|(_, p)| p).collect()
}

fn temp_files(data: &Path) -> usize {
    std::fs::read_dir(data)
        .expect("read data dir")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".snap.tmp"))
        .count()
}

/// The creation time in a snapshot's header: bytes 16..24, little-endian Unix seconds
/// (docs/SNAPSHOT_FORMAT.md).
fn created_unix(file: &Path) -> u64 {
    let b = std::fs::read(file).expect("read snapshot");
    u64::from_le_bytes(b[16..24].try_into().unwrap())
}

fn assert_all(replies: &[String], ids: &[u64], want: &str, what: &str) {
    for (r, i) in replies.iter().zip(ids) {
        assert!(
            r.starts_with(want),
            "{what}: triplet {i} answered {r:?}, expected {want}"
        );
    }
    assert_eq!(replies.len(), ids.len());
}

#[test]
fn graceful_restart_loses_no_record() {
    let flags = ["--delay", "1s"];
    let server = Server::start(&flags);
    let mut c = Client::connect(server.native).unwrap();
    let ids: Vec<u64> = (0..3000).collect();
    let first: Vec<String> = ids
        .iter()
        .map(|&i| format!("CHECK {}", triplet(i)))
        .collect();
    assert_all(&c.pipeline(&first).unwrap(), &ids, "DEFER", "first sight");
    sleep_past(1);
    let evens: Vec<u64> = ids.iter().copied().filter(|i| i % 2 == 0).collect();
    let odds: Vec<u64> = ids.iter().copied().filter(|i| i % 2 == 1).collect();
    let retry: Vec<String> = evens
        .iter()
        .map(|&i| format!("CHECK {}", triplet(i)))
        .collect();
    assert_all(
        &c.pipeline(&retry).unwrap(),
        &evens,
        "PASS retried",
        "retry",
    );
    drop(c);

    server.signal("TERM");
    let mut server = server;
    let status = server.wait_exit(IO_TIMEOUT).expect("exit after SIGTERM");
    assert!(status.success(), "{status:?}");
    let final_line = server.wait_log("final snapshot", |l| l.contains("final snapshot written"));
    assert!(final_line.contains("triplets=3000"), "{final_line}");

    let server = Server::start_in(server.into_dir(), &flags);
    assert_eq!(server.m(LOADED_M), 3000.0);
    assert_eq!(server.m(WHITELISTED_M), 1500.0);
    let mut c = Client::connect(server.native).unwrap();
    assert_all(
        &c.peek(&evens),
        &evens,
        "PASS known",
        "whitelisted before the restart",
    );
    // Greylisted ones kept their first sighting: their delay is over, so a retry passes.
    assert_all(
        &c.peek(&odds),
        &odds,
        "PASS retried",
        "greylisted before the restart",
    );
    // A triplet never seen is still new.
    assert!(c.peek(&[999_999])[0].starts_with("DEFER"));
}

/// Kills the server with SIGKILL many times in a row — at random moments, and right while a
/// snapshot is being written — and restarts it each time on the same data directory. The
/// server must always start, and every triplet whitelisted before the newest snapshot its
/// process completed began must still be whitelisted, in this and every later life.
#[test]
fn kill_9_again_and_again_keeps_every_snapshotted_whitelisting() {
    let seed = unix_now() ^ u64::from(std::process::id());
    eprintln!("crash loop seed {seed}");
    let mut rng = XorShift::new(seed);
    let flags = ["--delay", "1s", "--snapshot-interval", "1s"];
    let mut dir = TempDir::new("crash");
    let mut next = 0u64;
    let (mut mid_write, mut checked) = (0usize, 0usize);
    // Enough records that a snapshot write takes a noticeable time to be caught in.
    const PREFILL: u64 = 150_000;
    const ROUNDS: usize = 12;
    // Whitelisted before a snapshot that completed: must survive every later restart.
    let mut must_survive: Vec<u64> = Vec::new();
    let mut history: Vec<String> = Vec::new();
    for round in 0..=ROUNDS {
        let server = Server::start_in(dir, &flags);
        let data = server.data_dir();
        // Snapshots up to this generation were written by earlier lives.
        let inherited = snapshots(&data).first().map_or(0, |p| generation(p));
        let mut c = Client::connect(server.native).unwrap();
        let replies = c.peek(&must_survive);
        if let Some((r, i)) = replies
            .iter()
            .zip(&must_survive)
            .find(|(r, _)| !r.starts_with("PASS known"))
        {
            panic!(
                "after restart {round}: triplet {i} answered {r:?}\n{}\n--- now ---\n{}",
                history.join("\n"),
                server.logs().join("\n")
            );
        }
        checked += must_survive.len();
        if round == ROUNDS {
            break;
        }
        let mut passed = Vec::new();
        if round == 0 {
            passed.extend(c.whitelist(0..PREFILL).unwrap());
            next = PREFILL;
            // The prefill is what later lives check: let one snapshot that holds it complete
            // before this life may be killed. (A kill 0.1-2.5 s after the prefill could come
            // before any snapshot started in a later second than the prefill's last answer,
            // leaving the prefill unchecked: the count below failed about one run in three.)
            let last = passed.last().map_or(0, |p| p.1);
            let deadline = Instant::now() + Duration::from_secs(15);
            while snapshots(&data)
                .first()
                .is_none_or(|f| created_unix(f) <= last)
            {
                assert!(
                    Instant::now() < deadline,
                    "no snapshot holding the prefill within 15 s"
                );
                thread::sleep(Duration::from_millis(50));
            }
        }
        drop(c);

        // Traffic: new triplets whitelisted in small batches until the server dies.
        let stop = Arc::new(AtomicBool::new(false));
        let traffic = {
            let (addr, stop) = (server.native, stop.clone());
            let first = next;
            thread::spawn(move || {
                let mut got = Vec::new();
                let Ok(mut c) = Client::connect(addr) else {
                    return (got, first);
                };
                let mut i = first;
                while !stop.load(Ordering::Relaxed) {
                    // Each batch waits out the 1 s delay once: large enough to keep traffic up.
                    match c.whitelist(i..i + 1000) {
                        Ok(p) => got.extend(p),
                        Err(_) => break,
                    }
                    i += 1000;
                }
                // The batch cut short may have whitelisted some: never reuse its ids.
                (got, i + 1000)
            })
        };
        if round % 2 == 1 {
            // Wait for a snapshot write in progress (its temporary file), then kill.
            let deadline = Instant::now() + Duration::from_secs(5);
            while temp_files(&data) == 0 && Instant::now() < deadline {
                thread::sleep(Duration::from_micros(500));
            }
        } else {
            thread::sleep(Duration::from_millis(100 + rng.next_u64() % 2400));
        }
        let logs = server.logs();
        dir = server.into_dir(); // SIGKILL
        stop.store(true, Ordering::Relaxed);
        let (got, after) = traffic.join().expect("traffic thread");
        passed.extend(got);
        next = after;
        if temp_files(&data) > 0 {
            mid_write += 1;
        }
        history.push(format!(
            "--- life {round}: {} whitelisted, killed with {:?} ---\n{}",
            passed.len(),
            std::fs::read_dir(&data)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect::<Vec<_>>(),
            logs.join("\n")
        ));

        // The newest completed snapshot is intact, and says from when its records are. If
        // this life completed none, what it whitelisted is lost with it, as it should be.
        let newest = snapshots(&data);
        let newest = newest.first().expect("at least one completed snapshot");
        let (status, out, err) = run_bin(&["snapshot", "inspect", &newest.display().to_string()]);
        assert!(status.success(), "inspect {}: {out}{err}", newest.display());
        if generation(newest) > inherited {
            let created = created_unix(newest);
            must_survive.extend(passed.iter().filter(|p| p.1 < created).map(|p| p.0));
        }
    }
    eprintln!(
        "crash loop: {ROUNDS} kills, {mid_write} in the middle of a snapshot write, {checked} whitelistings checked after restarts"
    );
    assert!(
        mid_write > 0,
        "no kill landed in the middle of a snapshot write"
    );
    assert!(
        must_survive.len() >= PREFILL as usize,
        "too few whitelistings were checked: {}",
        must_survive.len()
    );
}

fn generation(snapshot: &Path) -> u64 {
    let name = snapshot.file_name().unwrap().to_string_lossy();
    name["snapshot-".len()..name.len() - ".snap".len()]
        .parse()
        .unwrap()
}

#[test]
fn damaged_newest_snapshot_is_named_and_the_previous_one_used() {
    let flags = ["--delay", "1s"];
    let server = Server::start(&flags);
    let mut c = Client::connect(server.native).unwrap();
    let a: Vec<u64> = (0..500).collect();
    c.whitelist(0..500).unwrap();
    drop(c);
    server.signal("TERM");
    let mut server = server;
    assert!(server.wait_exit(IO_TIMEOUT).expect("exit").success());

    let server = Server::start_in(server.into_dir(), &flags);
    let mut c = Client::connect(server.native).unwrap();
    let b: Vec<u64> = (500..800).collect();
    c.whitelist(500..800).unwrap();
    drop(c);
    server.signal("TERM");
    let mut server = server;
    assert!(server.wait_exit(IO_TIMEOUT).expect("exit").success());
    let data = server.data_dir();
    let files = snapshots(&data);
    assert_eq!(files.len(), 2, "{files:?}");
    let newest = files[0].clone();
    let mut bytes = std::fs::read(&newest).unwrap();
    let at = bytes.len() - 100;
    bytes[at] ^= 0x40;
    std::fs::write(&newest, &bytes).unwrap();

    let (status, out, _) = run_bin(&["snapshot", "inspect", &newest.display().to_string()]);
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(
        out.contains("checksum:     BAD: body checksum mismatch"),
        "{out}"
    );
    let (status, out, _) = run_bin(&["snapshot", "inspect", &files[1].display().to_string()]);
    assert!(status.success(), "{out}");
    assert!(out.contains("triplets:     500 (500 whitelisted"), "{out}");

    let server = Server::start_in(server.into_dir(), &flags);
    let name = newest.file_name().unwrap().to_string_lossy().into_owned();
    let complaints: Vec<String> = server
        .logs()
        .into_iter()
        .filter(|l| l.contains(&name))
        .collect();
    assert_eq!(complaints.len(), 1, "{complaints:?}");
    assert!(
        complaints[0].contains("unusable (body checksum mismatch")
            && complaints[0].contains("renamed to"),
        "{}",
        complaints[0]
    );
    assert!(data.join(format!("{name}.bad")).exists());
    let mut c = Client::connect(server.native).unwrap();
    assert_all(&c.peek(&a), &a, "PASS known", "from the previous snapshot");
    assert_all(&c.peek(&b), &b, "DEFER", "only in the damaged snapshot");
}

#[test]
fn snapshot_made_with_other_prefixes_is_refused_at_start() {
    let server = Server::start(&[]);
    let mut c = Client::connect(server.native).unwrap();
    c.pipeline(&[format!("CHECK {}", triplet(1))]).unwrap();
    drop(c);
    server.signal("TERM");
    let mut server = server;
    assert!(server.wait_exit(IO_TIMEOUT).expect("exit").success());
    let dir = server.into_dir();
    let data = dir.file("data");
    let (status, _, err) = run_serve(&data, &["--ipv4-prefix", "28"]);
    assert_eq!(status.code(), Some(1), "{err}");
    let last = err.lines().last().unwrap_or("");
    assert!(
        last.starts_with("greyhound: snapshot ")
            && last.contains("ipv4-prefix 24 and ipv6-prefix 64, this server uses 28 and 64"),
        "{err}"
    );
    // Refused, not renamed or replaced: the settings can be put back.
    assert_eq!(snapshots(Path::new(&data)).len(), 1);
}

#[test]
fn inspect_missing_file_fails_clearly() {
    let (status, _, err) = run_bin(&["snapshot", "inspect", "/nonexistent/snapshot-1.snap"]);
    assert_eq!(status.code(), Some(1));
    assert!(
        err.contains("/nonexistent/snapshot-1.snap") && err.contains("No such file"),
        "{err}"
    );
}
