//! Issue 13's defects, each seen from outside through the real binary: start-up checks (an
//! unwritable data directory, a damaged key file of any bytes, a snapshot name that cannot be
//! ordered, refused values, clear lines for wrong paths), signals while a snapshot loads, the
//! Unix socket removed only if it is still ours, and connection caps per listener (native,
//! policy, metrics) with accept errors at the descriptor limit logged and survived.
//!
//! The tests run as root, so `chmod` cannot make a directory unwritable: the unwritable data
//! directory is made immutable with `chattr +i` (ext4 here), which stops root too.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// Runs `greyhound serve` expecting a refused start: asserts a failure exit (1, or clap's 2 for
/// a refused command line; not a panic's 101, not a signal) and exactly one line on stderr,
/// and returns that line.
fn refused(data_dir: &str, extra: &[&str]) -> String {
    let (status, _, err) = run_serve(data_dir, extra);
    one_line_failure(extra, status, &err)
}

fn one_line_failure(what: &[&str], status: std::process::ExitStatus, err: &str) -> String {
    assert!(!status.success(), "{what:?} started; stderr:\n{err}");
    assert!(
        matches!(status.code(), Some(1 | 2)),
        "{what:?}: exit {status}; stderr:\n{err}"
    );
    assert!(!err.contains(" ready "), "{what:?}: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{what:?}: not one line:\n{err}");
    lines[0].to_string()
}

/// A data directory that a server has used once: it holds `.lock` and `hash.key`.
fn used_data_dir(dir: &TempDir) -> String {
    let data = dir.file("data");
    drop(greyhound::datadir::lock(Path::new(&data)).unwrap());
    greyhound::datadir::open(Path::new(&data)).unwrap();
    data
}

// ---------------------------------------------------------------------------------------
// 1. A data directory that cannot be written
// ---------------------------------------------------------------------------------------

/// Clears the immutable flag again, even if the test fails, so the directory can be removed.
struct Immutable(PathBuf);

impl Immutable {
    fn set(path: &Path) -> Self {
        let st = Command::new("chattr").arg("+i").arg(path).status().unwrap();
        assert!(st.success(), "chattr +i {} failed", path.display());
        Self(path.to_path_buf())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}

#[test]
fn unwritable_data_dir_holding_lock_and_key_fails_at_start() {
    let dir = TempDir::new("rodir");
    let data = used_data_dir(&dir);
    let _immutable = Immutable::set(Path::new(&data));
    let line = refused(&data, &[]);
    assert!(
        line.contains(&data) && line.contains("cannot write"),
        "{line}"
    );
}

// ---------------------------------------------------------------------------------------
// 2, 10. Connection caps per listener; accept errors at the descriptor limit
// ---------------------------------------------------------------------------------------

#[test]
fn idle_metrics_connections_count_against_their_own_cap() {
    let srv = Server::start(&["--max-connections", "2"]);
    let idle: Vec<TcpStream> = (0..2).map(|_| connect(srv.metrics_addr)).collect();
    // No wait needed: the accept loop takes a slot for each connection as it accepts it, in
    // the order of the backlog, so the two idle ones hold theirs before the third is accepted.
    let mut third = connect(srv.metrics_addr);
    third.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
    assert_closed_without_reply(&mut third, "third metrics connection over the cap of 2");
    drop(idle);
    // A scrape may still find the cap full until the server has seen the two close.
    let scrape = || -> Option<String> {
        let mut s = TcpStream::connect(srv.metrics_addr).ok()?;
        s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        out.contains(" 200 ").then_some(out)
    };
    let text = poll(IO_TIMEOUT, scrape).expect("a scrape once the idle connections closed");
    let refused = "greyhound_connections_refused_total{listener=\"metrics\"}";
    // The third, and any scrape above that came before the two had closed.
    let n = metric_value(&text, refused).unwrap_or_else(|| panic!("no {refused} in {text}"));
    assert!(n >= 1.0, "{text}");
    // Native and policy connections are not counted against the metrics cap.
    assert_eq!(request(srv.native, b"PING\n"), "PONG\n");
    srv.wait_log("naming the metrics listener's cap", |l| {
        l.contains("WARN") && l.contains("connection limit") && l.contains("metrics")
    });
}

#[test]
fn a_full_native_cap_does_not_lock_postfix_out_of_the_policy_port() {
    let srv = Server::start(&["--max-connections", "3"]);
    let mut idle: Vec<Conn> = (0..3).map(|_| Conn::connect(srv.native)).collect();
    for (i, c) in idle.iter_mut().enumerate() {
        assert_eq!(c.ask(&format!("{i} PING")), format!("{i} PONG"));
    }
    let mut fourth = Conn::connect(srv.native);
    fourth.send(b"PING\n");
    fourth.expect_closed("4th native connection over the cap of 3");
    let mut policy = PolicyConn::connect(&srv.policy);
    let reply = policy.ask(&rcpt_attrs("192.0.2.1", "a@b.example", "c@d.example"));
    assert!(reply.starts_with("action="), "{reply:?}");
    let native = "greyhound_connections_refused_total{listener=\"native\"}";
    assert_eq!(srv.metric(native), Some(1.0));
    let policy_refused = "greyhound_connections_refused_total{listener=\"policy\"}";
    assert_eq!(srv.metric(policy_refused), Some(0.0));
    srv.wait_log("naming the native listener's cap", |l| {
        l.contains("WARN") && l.contains("connection limit") && l.contains("native")
    });
}

/// Open descriptors of process `pid`.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[test]
fn accept_errors_at_the_descriptor_limit_are_logged_and_clients_not_left_hanging() {
    let srv = Server::start(&[]);
    let pid = srv.pid().to_string();
    // A few descriptors to spare, then none (the soft limit only: root in this container may
    // not raise a hard limit again).
    let limit = open_fds(srv.pid()) + 2;
    let st = Command::new("prlimit")
        .args(["--pid", &pid, &format!("--nofile={limit}:")])
        .status()
        .unwrap();
    assert!(st.success(), "prlimit failed");
    let mut conns: Vec<TcpStream> = (0..8).map(|_| connect(srv.native)).collect();
    srv.wait_log("warning about accept errors", |l| {
        l.contains("WARN") && l.contains("accept") && l.contains("descriptor")
    });
    // A client the server has no descriptor for is closed, not left waiting in the backlog.
    let mut closed = 0;
    for c in &mut conns {
        c.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let _ = c.write_all(b"PING\n");
        let mut buf = [0u8; 16];
        match c.read(&mut buf) {
            Ok(0) => closed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => closed += 1,
            _ => {}
        }
    }
    assert!(
        closed > 0,
        "no connection over the descriptor limit was closed"
    );
    drop(conns);
    let st = Command::new("prlimit")
        .args(["--pid", &pid, "--nofile=4096:"])
        .status()
        .unwrap();
    assert!(st.success());
    // Serving again once descriptors are free.
    let answer = poll(IO_TIMEOUT, || {
        let mut s = TcpStream::connect(srv.native).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
        s.write_all(b"PING\n").ok()?;
        let mut out = [0u8; 5];
        s.read_exact(&mut out).ok()?;
        Some(out)
    });
    assert_eq!(answer.as_ref().map(|a| &a[..]), Some(&b"PONG\n"[..]));
}

// ---------------------------------------------------------------------------------------
// 3. Signals while a large snapshot loads
// ---------------------------------------------------------------------------------------

/// Writes a snapshot of `n` whitelisted triplets into `data` (made with its key), so that a
/// server's start spends a while loading it.
fn big_snapshot(data: &Path, n: u64) {
    use greyhound::engine::{
        Engine, EngineConfig, Key, Normalizer, Policy, SystemClock, TripletRecord,
    };
    let secret = greyhound::datadir::open(data).unwrap();
    let engine = Engine::new(
        EngineConfig {
            policy: Policy::default(),
            normalizer: Normalizer::new(24, 64).unwrap(),
            secret,
        },
        Arc::new(SystemClock),
    );
    let now = engine.now();
    let mut rng = XorShift::new(13);
    engine.reserve(n as usize, 0);
    engine.load_triplets(
        (0..n).map(|_| {
            let key = Key {
                lo: rng.next_u64(),
                hi: rng.next_u64(),
            };
            TripletRecord::from_parts(key, now, now, true)
        }),
        now,
    );
    let mut w = greyhound::snapshot::Writer::new(greyhound::snapshot::DirStore::new(data)).unwrap();
    w.write(&engine).unwrap();
}

/// A server started on `data` without waiting for it to be ready; its stderr lines.
fn spawn_serve(data: &str, native: &str) -> (Child, Arc<Mutex<Vec<String>>>) {
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--data-dir",
            data,
            "--native",
            native,
            "--policy",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
        ])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let logs = Arc::new(Mutex::new(Vec::new()));
    let stderr = child.stderr.take().unwrap();
    let l = logs.clone();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            l.lock().unwrap().push(line);
        }
    });
    (child, logs)
}

/// Waits until the native port accepts connections (it is bound before the snapshot loads),
/// and asserts the snapshot is still loading then.
fn wait_loading(child: &mut Child, native: &str, logs: &Arc<Mutex<Vec<String>>>) {
    let bound = poll(IO_TIMEOUT, || {
        assert!(
            child.try_wait().unwrap().is_none(),
            "exited early: {:?}",
            logs.lock().unwrap()
        );
        TcpStream::connect(native).ok()
    });
    assert!(bound.is_some(), "native port never bound");
    let logs = logs.lock().unwrap();
    assert!(
        !logs.iter().any(|l| l.contains("snapshot loaded")),
        "the snapshot loaded before the signal could be sent; make it larger: {logs:?}"
    );
}

fn kill(child: &Child, sig: &str) {
    let st = Command::new("kill")
        .args([format!("-{sig}"), child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "no exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sighup_and_sigterm_while_a_snapshot_loads_are_not_fatal() {
    const N: u64 = 2_000_000;
    let dir = TempDir::new("sigload");
    let data = dir.file("data");
    std::fs::create_dir_all(&data).unwrap();
    big_snapshot(Path::new(&data), N);
    let native = format!("127.0.0.1:{}", free_port());

    // SIGHUP while loading: the start goes on and the server serves.
    let (mut child, logs) = spawn_serve(&data, &native);
    wait_loading(&mut child, &native, &logs);
    kill(&child, "HUP");
    let ready = poll(Duration::from_secs(60), || {
        if let Some(s) = child.try_wait().unwrap() {
            panic!(
                "exited with {s} after SIGHUP while loading: {:?}",
                logs.lock().unwrap()
            );
        }
        logs.lock()
            .unwrap()
            .iter()
            .any(|l| l.contains(" ready "))
            .then_some(())
    });
    assert!(ready.is_some(), "never ready: {:?}", logs.lock().unwrap());
    assert_eq!(request(native.parse().unwrap(), b"PING\n"), "PONG\n");
    // The SIGHUP was kept, not lost: the lists are reloaded once serving.
    let reloaded = poll(IO_TIMEOUT, || {
        let logs = logs.lock().unwrap();
        logs.iter()
            .any(|l| l.contains("SIGHUP: exemption lists reloaded"))
            .then_some(())
    });
    assert!(reloaded.is_some(), "{:?}", logs.lock().unwrap());
    kill(&child, "TERM");
    assert!(
        wait_exit(&mut child).success(),
        "{:?}",
        logs.lock().unwrap()
    );

    // SIGTERM while loading: a clean exit, and the data loads again in full.
    let (mut child, logs) = spawn_serve(&data, &native);
    wait_loading(&mut child, &native, &logs);
    kill(&child, "TERM");
    let status = wait_exit(&mut child);
    assert!(
        status.success(),
        "exit {status} after SIGTERM while loading: {:?}",
        logs.lock().unwrap()
    );
    assert!(
        logs.lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("SIGTERM while starting")),
        "{:?}",
        logs.lock().unwrap()
    );
    let srv = Server::start_in(dir, &[]);
    let loaded = srv.wait_log("snapshot loaded", |l| l.contains("snapshot loaded"));
    assert!(loaded.contains(&format!("triplets={N}")), "{loaded}");
}

// ---------------------------------------------------------------------------------------
// 4. Snapshot names whose generation cannot be ordered
// ---------------------------------------------------------------------------------------

#[test]
fn snapshot_names_that_would_wrap_the_generation_are_refused_at_start() {
    for name in [
        "snapshot-18446744073709551615.snap",
        "snapshot-99999999999999999999999.snap",
        ".snapshot-18446744073709551615.snap.tmp",
        "snapshot-18446744073709551615.snap.bad",
    ] {
        let dir = TempDir::new("wrap");
        let data = used_data_dir(&dir);
        std::fs::write(Path::new(&data).join(name), b"not a snapshot").unwrap();
        let line = refused(&data, &[]);
        assert!(line.contains(name), "{name}: {line}");
    }
}

// ---------------------------------------------------------------------------------------
// 5. A key file of any bytes
// ---------------------------------------------------------------------------------------

#[test]
fn key_file_of_any_32_bytes_is_damaged_not_a_panic() {
    let contents: [&[u8]; 4] = [
        "é0123456789abcdef0123456789abcd".as_bytes(),
        "éééééééééééééééé".as_bytes(),
        &[0xff; 32],
        b"0123456789abcdef0123456789abcdeg",
    ];
    for (i, bytes) in contents.into_iter().enumerate() {
        assert_eq!(bytes.len(), 32, "case {i}");
        let dir = TempDir::new("key");
        let data = dir.file("data");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::write(Path::new(&data).join("hash.key"), bytes).unwrap();
        let line = refused(&data, &[]);
        assert!(
            line.contains("damaged") && line.contains("hash.key"),
            "case {i}: {line}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// 6. The Unix socket is removed only if it is still ours
// ---------------------------------------------------------------------------------------

#[test]
fn at_exit_another_instances_unix_socket_is_left_alone() {
    let dir = TempDir::new("sock");
    let path = dir.file("policy.sock");
    let policy = format!("unix:{path}");
    let mut srv = Server::start_in(dir, &["--policy", &policy]);
    // Another instance takes the path over.
    std::fs::remove_file(&path).unwrap();
    let other = UnixListener::bind(&path).unwrap();
    srv.terminate();
    assert!(
        Path::new(&path).exists(),
        "the other instance's socket was removed"
    );
    other.set_nonblocking(true).unwrap();
    let _c = std::os::unix::net::UnixStream::connect(&path).unwrap();
    assert!(
        other.accept().is_ok(),
        "the path no longer reaches the other instance"
    );

    // Its own socket, still in place, is removed.
    let dir = TempDir::new("sock2");
    let path = dir.file("policy.sock");
    let policy = format!("unix:{path}");
    let mut srv = Server::start_in(dir, &["--policy", &policy]);
    srv.terminate();
    assert!(!Path::new(&path).exists(), "its own socket was left behind");
}

// ---------------------------------------------------------------------------------------
// 7, 9. Refused values and wrong paths: one line naming the culprit
// ---------------------------------------------------------------------------------------

#[test]
fn negative_numbers_name_their_flag_in_one_line() {
    let dir = TempDir::new("neg");
    let data = dir.file("data");
    for (flag, value) in [
        ("--delay", "-5"),
        ("--awl-clients", "-1"),
        ("--max-connections", "-3"),
    ] {
        let line = refused(&data, &[flag, value]);
        assert!(
            line.contains(flag) && line.contains(value),
            "{flag} {value}: {line}"
        );
        assert!(!line.contains("Usage"), "{line}");
    }
}

#[test]
fn a_data_dir_that_is_a_file_is_named_as_not_a_directory() {
    let dir = TempDir::new("notdir");
    let file = dir.file("plain");
    std::fs::write(&file, b"x").unwrap();
    let line = refused(&file, &[]);
    assert!(
        line.contains(&file) && line.contains("is not a directory"),
        "{line}"
    );
}

#[test]
fn snapshot_inspect_of_a_directory_says_so() {
    let dir = TempDir::new("inspectdir");
    let d = dir.file("d");
    std::fs::create_dir_all(&d).unwrap();
    let (status, _, err) = run_bin(&["snapshot", "inspect", &d]);
    let line = one_line_failure(&["snapshot", "inspect"], status, &err);
    assert!(
        line.contains(&d) && line.contains("is a directory"),
        "{line}"
    );
}

#[test]
fn values_that_defeat_greylisting_are_refused() {
    let dir = TempDir::new("defeat");
    let data = dir.file("data");
    for (flags, culprit) in [
        (&["--ipv4-prefix", "7"][..], "ipv4-prefix"),
        (&["--ipv4-prefix", "0"][..], "ipv4-prefix"),
        (&["--ipv6-prefix", "15"][..], "ipv6-prefix"),
        (&["--delay", "0"][..], "delay"),
        (&["--delay", "0s", "--no-dry-run"][..], "delay"),
    ] {
        let line = refused(&data, flags);
        assert!(line.contains(culprit), "{flags:?}: {line}");
    }
    let cfg = dir.file("g.toml");
    std::fs::write(&cfg, "delay = 0\n").unwrap();
    let line = refused(&data, &["--config", &cfg]);
    assert!(line.contains("delay"), "{line}");
    std::fs::write(&cfg, "ipv4-prefix = 4\n").unwrap();
    let line = refused(&data, &["--config", &cfg]);
    assert!(line.contains("ipv4-prefix"), "{line}");
    // The lowest accepted values start; so does a zero delay in dry-run.
    let mut srv = Server::start(&["--ipv4-prefix", "8", "--ipv6-prefix", "16"]);
    srv.terminate();
    let mut srv = Server::start(&["--delay", "0", "--dry-run"]);
    srv.terminate();
}

// ---------------------------------------------------------------------------------------
// Start-up check of the open-file limit
// ---------------------------------------------------------------------------------------

/// Starts `greyhound serve` under `prlimit --nofile=SOFT:HARD`, waits for it to be ready and
/// stops it; returns its log.
fn serve_with_nofile(soft: u64, hard: u64, extra: &[&str]) -> Vec<String> {
    let dir = TempDir::new("nofile");
    let data = dir.file("data");
    let mut child = Command::new("prlimit")
        .arg(format!("--nofile={soft}:{hard}"))
        .arg(BIN)
        .args(["serve", "--data-dir", &data])
        .args(["--native", "127.0.0.1:0", "--policy", "127.0.0.1:0"])
        .args(["--metrics", "127.0.0.1:0"])
        .args(extra)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let logs = Arc::new(Mutex::new(Vec::new()));
    let l = logs.clone();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            l.lock().unwrap().push(line);
        }
    });
    let ready = poll(IO_TIMEOUT, || {
        assert!(
            child.try_wait().unwrap().is_none(),
            "{:?}",
            logs.lock().unwrap()
        );
        logs.lock()
            .unwrap()
            .iter()
            .any(|l| l.contains(" ready "))
            .then_some(())
    });
    assert!(ready.is_some(), "{:?}", logs.lock().unwrap());
    kill(&child, "TERM");
    assert!(wait_exit(&mut child).success());
    let out = logs.lock().unwrap().clone();
    out
}

#[test]
fn an_open_file_limit_below_three_caps_is_raised_or_warned_about() {
    // 3 × 4096 connections need more than 1024 descriptors: raised when the hard limit allows.
    let logs = serve_with_nofile(1024, 20_000, &[]);
    assert!(
        logs.iter()
            .any(|l| l.contains("raised the open-file limit")),
        "{logs:?}"
    );
    assert!(!logs.iter().any(|l| l.contains("WARN")), "{logs:?}");
    // Not possible: a warning, and the server still starts.
    let logs = serve_with_nofile(1024, 1024, &[]);
    assert!(
        logs.iter()
            .any(|l| l.contains("WARN") && l.contains("open-file limit (1024)")),
        "{logs:?}"
    );
    // Enough for a smaller cap: nothing said.
    let logs = serve_with_nofile(1024, 1024, &["--max-connections", "100"]);
    assert!(
        !logs.iter().any(|l| l.contains("open-file limit")),
        "{logs:?}"
    );
}
