//! Multi-node replication (docs/OPERATIONS.md, "Running a cluster") against a real `redis-server` (Debian's package; the
//! test command installs it when missing): every test starts its own Redis on a free
//! loopback port and two or three `greyhound serve` nodes sharing one hash key, then compares
//! the nodes' tables through the digest of `GET /status`.
//!
//! Failures are made for real: `kill -9` of a node under load, Redis killed by its PID and
//! started again on the same port with its data or empty. Every wait is a bounded polling
//! loop ([`CONVERGE_TIMEOUT`]); no test asserts how long anything took, only what was
//! answered and that the tables end up equal.

mod common;

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::redis::{
    applied_from, connected_of, describe, peer_of, status, try_converged, wait_connected,
    wait_converged, wait_status, Cluster, Redis, Relay, Resp, RespConn, CONVERGE_TIMEOUT,
};
use common::{poll, sleep_past, Conn, Server, IO_TIMEOUT};

/// The greylisting delay of the load tests: short, so that the load's own retries pass and
/// the tables hold whitelisted records too, not only greylisted ones.
const LOAD_DELAY_SECS: u64 = 1;

// ---------------------------------------------------------------------------------------
// A small load: one thread per node, CHECKs of new triplets and retries of its own older ones
// ---------------------------------------------------------------------------------------

use common::PipeClient as Client;

/// What one load thread saw.
#[derive(Debug, Default)]
struct LoadReport {
    node: String,
    /// New triplets sent: `load_triplet(tag, n, 0..sent_new)`.
    sent_new: u64,
    /// Requests answered with DEFER or PASS.
    answered: u64,
    /// Failures (connect, write, read timeout, EOF, a reply that is neither DEFER nor PASS),
    /// the first few in full.
    errors: u64,
    first_errors: Vec<String>,
}

/// Load threads, one per node, until [`Load::stop`].
struct Load {
    stop: Arc<AtomicBool>,
    answered: Vec<Arc<AtomicU64>>,
    threads: Vec<thread::JoinHandle<LoadReport>>,
}

/// A triplet of the load: `tag` keeps tests apart, `node` and `i` keep triplets apart.
fn load_triplet(tag: &str, node: usize, i: u64) -> String {
    format!(
        "10.{node}.{}.{} s{i}@{tag}.example r{i}@rcpt.example",
        (i >> 8) & 255,
        i & 255
    )
}

impl Load {
    /// Starts one thread per node: every 20 ms a pipelined batch of 10 CHECKs of new triplets
    /// plus up to 5 retries of that thread's own triplets first seen more than the delay ago
    /// (which pass and so whitelist). About 500 new triplets per second per node: enough to
    /// keep replication busy, small enough for a shared 2-core machine.
    fn start(tag: &str, nodes: &[(&str, &Server)]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut answered = Vec::new();
        let mut threads = Vec::new();
        for (n, (name, node)) in nodes.iter().enumerate() {
            let (stop, count) = (stop.clone(), Arc::new(AtomicU64::new(0)));
            answered.push(count.clone());
            let (tag, name, addr) = (tag.to_string(), name.to_string(), node.native);
            threads.push(thread::spawn(move || {
                let mut report = LoadReport {
                    node: name,
                    ..LoadReport::default()
                };
                let mut client: Option<Client> = None;
                let mut next = 0u64;
                let mut waiting = std::collections::VecDeque::new();
                let delay = Duration::from_secs(LOAD_DELAY_SECS) + Duration::from_millis(500);
                while !stop.load(Ordering::Relaxed) {
                    let mut lines: Vec<String> = (next..next + 10)
                        .map(|i| format!("CHECK {}", load_triplet(&tag, n, i)))
                        .collect();
                    while lines.len() < 15 {
                        match waiting.front() {
                            Some(&(at, i)) if Instant::now().duration_since(at) > delay => {
                                waiting.pop_front();
                                lines.push(format!("CHECK {}", load_triplet(&tag, n, i)));
                            }
                            _ => break,
                        }
                    }
                    let result = match client.as_mut() {
                        Some(c) => c.pipeline(&lines),
                        None => Client::connect(addr).and_then(|mut c| {
                            let r = c.pipeline(&lines);
                            client = Some(c);
                            r
                        }),
                    };
                    let mut fail = |what: String| {
                        report.errors += 1;
                        if report.first_errors.len() < 5 {
                            report.first_errors.push(what);
                        }
                    };
                    match result {
                        Ok(replies) => {
                            for (l, r) in lines.iter().zip(&replies) {
                                if r.starts_with("DEFER ") || r.starts_with("PASS ") {
                                    report.answered += 1;
                                    count.fetch_add(1, Ordering::Relaxed);
                                } else {
                                    fail(format!("{l:?} answered {r:?}"));
                                }
                            }
                            let now = Instant::now();
                            // Every third new triplet is retried later (and whitelisted).
                            waiting
                                .extend((next..next + 10).filter(|i| i % 3 == 0).map(|i| (now, i)));
                            next += 10;
                            report.sent_new = next;
                        }
                        Err(e) => {
                            fail(format!("{e}"));
                            client = None;
                            thread::sleep(Duration::from_millis(50));
                        }
                    }
                    thread::sleep(Duration::from_millis(20));
                }
                report
            }));
        }
        Self {
            stop,
            answered,
            threads,
        }
    }

    /// Requests answered so far by each node's thread.
    fn answered(&self) -> Vec<u64> {
        self.answered
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .collect()
    }

    /// Waits (bounded) until every thread has had at least `more` further answers: proof that
    /// every node is answering now.
    fn wait_answers(&self, more: u64, what: &str) {
        let base = self.answered();
        let ok = poll(CONVERGE_TIMEOUT, || {
            self.answered()
                .iter()
                .zip(&base)
                .all(|(now, was)| now - was >= more)
                .then_some(())
        });
        assert!(
            ok.is_some(),
            "{what}: not every node answered {more} more requests within {CONVERGE_TIMEOUT:?} \
             (answered before {base:?}, now {:?})",
            self.answered()
        );
    }

    /// Stops every thread and returns their reports.
    fn stop(self) -> Vec<LoadReport> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .into_iter()
            .map(|t| t.join().expect("load thread"))
            .collect()
    }
}

/// Waits for the nodes to converge; if they do not, PEEKs every triplet the load sent on
/// every node and panics naming those the nodes disagree on (with the statuses and logs).
fn wait_converged_after(nodes: &[(&str, &Server)], tag: &str, reports: &[LoadReport]) {
    let Err(digests) = try_converged(nodes) else {
        return;
    };
    let mut differ = Vec::new();
    let mut conns: Vec<Client> = nodes
        .iter()
        .map(|(_, n)| Client::connect(n.native).expect("connect to a node"))
        .collect();
    for (t, r) in reports.iter().enumerate() {
        for chunk in (0..r.sent_new).collect::<Vec<_>>().chunks(500) {
            let lines: Vec<String> = chunk
                .iter()
                .map(|&i| format!("PEEK {}", load_triplet(tag, t, i)))
                .collect();
            let answers: Vec<Vec<String>> = conns
                .iter_mut()
                .map(|c| c.pipeline(&lines).expect("PEEK"))
                .collect();
            for (k, &i) in chunk.iter().enumerate() {
                let per_node: Vec<&str> = answers.iter().map(|a| a[k].as_str()).collect();
                if per_node.windows(2).any(|w| w[0] != w[1]) {
                    differ.push(format!(
                        "{} #{i} (sent to {}): {per_node:?}",
                        r.node, r.node
                    ));
                }
            }
        }
    }
    let names: Vec<&str> = nodes.iter().map(|(n, _)| *n).collect();
    panic!(
        "nodes {names:?} did not converge within {CONVERGE_TIMEOUT:?}: digests {digests:?}\n\
         {} load triplets answered differently (PEEK on {names:?}), the first ones:\n  {}\n{}",
        differ.len(),
        differ
            .iter()
            .take(40)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n  "),
        describe(nodes)
    );
}

/// Fails unless every load thread had answers and no error.
fn assert_no_errors(reports: &[LoadReport]) {
    for r in reports {
        assert!(r.answered > 0, "node {}: nothing answered: {r:?}", r.node);
        assert_eq!(r.errors, 0, "node {}: requests failed: {r:?}", r.node);
    }
}

// ---------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------

/// One request on a new connection.
fn ask(node: &Server, line: &str) -> String {
    Conn::connect(node.native).ask(line)
}

/// Polls `PEEK triplet` on `node` until it answers `want` (bounded).
fn wait_peek(node: &Server, name: &str, triplet: &str, want: &str) {
    let mut last = String::new();
    let ok = poll(CONVERGE_TIMEOUT, || {
        last = ask(node, &format!("PEEK {triplet}"));
        (last == want).then_some(())
    });
    assert!(
        ok.is_some(),
        "node {name}: PEEK {triplet} still answers {last:?}, expected {want:?}\n{}",
        describe(&[(name, node)])
    );
}

/// Waits (bounded) until `dir` holds a complete snapshot.
fn wait_snapshot(dir: &Path, name: &str) {
    let found = poll(CONVERGE_TIMEOUT, || {
        std::fs::read_dir(dir)
            .ok()?
            .filter_map(Result::ok)
            .any(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.starts_with("snapshot-") && n.ends_with(".snap")
            })
            .then_some(())
    });
    assert!(found.is_some(), "node {name} wrote no snapshot in {dir:?}");
}

/// SIGKILL and reap, keeping the directory and ports for [`Server::restart`].
fn kill_9(node: &mut Server) {
    node.signal("KILL");
    assert!(
        node.wait_exit(IO_TIMEOUT).is_some(),
        "node did not die of SIGKILL"
    );
}

/// The relay's address.
fn relay_addr(relay: &Relay) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], relay.port))
}

/// The id of the newest entry of `stream`.
fn newest_id(redis: &Redis, stream: &str) -> String {
    let reply = redis.cmd(&["XREVRANGE", stream, "+", "-", "COUNT", "1"]);
    if let Resp::Array(Some(items)) = &reply {
        if let Some(Resp::Array(Some(entry))) = items.first() {
            if let Some(Resp::Bulk(Some(id))) = entry.first() {
                return String::from_utf8_lossy(id).into_owned();
            }
        }
    }
    panic!("XREVRANGE {stream} answered {reply:?}")
}

/// Fails unless `err` (a refused start's stderr) ends with one line holding every `word`.
fn assert_refused(status: std::process::ExitStatus, err: &str, words: &[&str]) {
    assert_eq!(
        status.code(),
        Some(1),
        "expected a refusal with exit status 1, got {status}; stderr:\n{err}"
    );
    assert!(
        !err.contains(" ready "),
        "it reported ready before refusing:\n{err}"
    );
    let last = err
        .lines()
        .rfind(|l| !l.trim().is_empty())
        .unwrap_or_else(|| panic!("refused with nothing on stderr"));
    for w in words {
        assert!(
            last.contains(w),
            "the last stderr line does not name {w:?}: {last:?}\nstderr:\n{err}"
        );
    }
    let naming = err.lines().filter(|l| l.contains(words[0])).count();
    assert_eq!(naming, 1, "the reason is given more than once:\n{err}");
}

// ---------------------------------------------------------------------------------------
// 0. The harness: Redis stopped and started again on its port, with or without its data
// ---------------------------------------------------------------------------------------

#[test]
fn redis_harness_restarts_on_the_same_port_with_or_without_its_data() {
    let get = |r: &Redis| r.cmd(&["GET", "k"]);
    let mut kept = Redis::start_persistent();
    let port = kept.port;
    assert_eq!(kept.cmd(&["SET", "k", "v"]), Resp::Simple("OK".into()));
    kept.stop();
    assert!(!kept.is_running());
    assert!(
        RespConn::connect(kept.addr()).is_err(),
        "something still answers on port {port} after the stop"
    );
    kept.restart();
    assert_eq!(kept.port, port);
    assert_eq!(
        get(&kept),
        Resp::Bulk(Some(b"v".to_vec())),
        "{}",
        kept.log()
    );
    kept.restart_empty();
    assert_eq!(get(&kept), Resp::Bulk(None));

    // The relay passes commands, goes silent when cut (nothing closed), and after the heal
    // closes what it held and relays new connections.
    let relay = Relay::start(kept.addr());
    let pong = Resp::Simple("PONG".into());
    let mut before = RespConn::connect(relay_addr(&relay)).expect("connect via relay");
    assert_eq!(before.cmd(&["PING"]).expect("PING via relay"), pong);
    relay.cut();
    before.set_read_timeout(Duration::from_millis(300));
    let e = before
        .cmd(&["PING"])
        .expect_err("PING answered through a cut relay");
    assert!(
        matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ),
        "{e}"
    );
    let mut during = RespConn::connect(relay_addr(&relay)).expect("connect to a cut relay");
    during.set_read_timeout(Duration::from_millis(300));
    assert!(during.cmd(&["PING"]).is_err(), "a cut relay answered");
    relay.heal();
    for mut old in [before, during] {
        old.set_read_timeout(IO_TIMEOUT);
        let r = old.cmd(&["PING"]);
        assert!(
            !matches!(r, Ok(Resp::Simple(_))),
            "a connection from before the heal still works: {r:?}"
        );
    }
    let mut after = RespConn::connect(relay_addr(&relay)).expect("connect via relay");
    assert_eq!(after.cmd(&["PING"]).expect("PING after heal"), pong);

    let mut lost = Redis::start();
    lost.cmd(&["SET", "k", "v"]);
    lost.restart();
    assert_eq!(
        get(&lost),
        Resp::Bulk(None),
        "a Redis without persistence kept data"
    );
}

// ---------------------------------------------------------------------------------------
// 1. A retry on another node passes
// ---------------------------------------------------------------------------------------

#[test]
fn retry_on_another_node_passes_and_a_third_knows_it() {
    let redis = Redis::start();
    let cluster = Cluster::new(&redis, "retry", &["--delay", "2s"]);
    let a = cluster.node("a", &[]);
    let b = cluster.node("b", &[]);
    let c = cluster.node("c", &[]);
    let nodes = [("a", &a), ("b", &b), ("c", &c)];
    let empty = wait_converged(&nodes);

    let t = "192.0.2.10 alice@sender.example bob@rcpt.example";
    let first = ask(&a, &format!("CHECK {t}"));
    assert!(first.starts_with("DEFER "), "first attempt on a: {first:?}");
    // The first attempt reaches b and c: their tables equal a's, which changed.
    let seen = wait_converged(&nodes);
    assert_ne!(seen, empty, "the first attempt did not change the digest");
    sleep_past(2);
    assert_eq!(ask(&b, &format!("CHECK {t}")), "PASS retried", "retry on b");
    // The pass reaches c (and a): c now knows the triplet as whitelisted.
    wait_peek(&c, "c", t, "PASS known");
    wait_converged(&nodes);
    // A remote change is applied, never re-published: c has applied both changes and decided
    // nothing, so it has published nothing.
    assert_eq!(
        redis.xlen(&cluster.stream("c")),
        0,
        "c re-published what it applied"
    );
    assert_eq!(ask(&c, &format!("CHECK {t}")), "PASS known", "on c");
    assert_eq!(ask(&a, &format!("CHECK {t}")), "PASS known", "on a");

    // Each stream holds what its node published, under the cluster's name.
    assert!(redis.xlen(&cluster.stream("a")) > 0, "a's stream is empty");
    assert!(redis.xlen(&cluster.stream("b")) > 0, "b's stream is empty");
    for s in [status(&a), status(&b), status(&c)] {
        assert!(connected_of(&s), "{s}");
        assert_eq!(s["table"]["triplets"], 1, "{s}");
        assert_eq!(s["table"]["whitelisted"], 1, "{s}");
    }
}

// ---------------------------------------------------------------------------------------
// 2. kill -9 of a node under load
// ---------------------------------------------------------------------------------------

#[test]
fn a_node_killed_under_load_restarts_at_once_and_catches_up() {
    let redis = Redis::start();
    let cluster = Cluster::new(
        &redis,
        "kill9",
        &["--delay", "1s", "--snapshot-interval", "1s"],
    );
    let a = cluster.node("a", &[]);
    let mut b = cluster.node("b", &[]);
    let c = cluster.node("c", &[]);

    let load = Load::start("kill9", &[("a", &a), ("b", &b)]);
    wait_status(&b, "b applied records from a", |s| applied_from(s, "a") > 0);
    wait_status(&a, "a applied records from b", |s| applied_from(s, "b") > 0);
    // b's snapshot holds some of the table and where it was in a's stream; what b decided
    // and published after it is lost locally by the kill and must come back from Redis.
    wait_snapshot(&b.data_dir(), "b");
    load.wait_answers(100, "before the kill");
    kill_9(&mut b);
    // a goes on deciding while b is down: b must catch up on that too.
    let load_answers = load.answered()[0];
    assert!(
        poll(CONVERGE_TIMEOUT, || (load.answered()[0]
            >= load_answers + 200)
            .then_some(()))
        .is_some(),
        "a stopped answering while b was down"
    );
    // Its own data dir, the same node id, seconds after the kill: not a duplicate.
    b.restart();
    b.wait_log("b caught up", |l| {
        l.contains("cluster: caught up with peer")
    });
    load.wait_answers(200, "after b's restart");
    let reports = load.stop();
    for r in &reports {
        assert!(r.answered > 0, "{r:?}");
    }
    assert_eq!(reports[0].errors, 0, "a failed requests: {:?}", reports[0]);

    let nodes = [("a", &a), ("b", &b), ("c", &c)];
    wait_converged_after(&nodes, "kill9", &reports);
    let sb = status(&b);
    assert!(connected_of(&sb), "{sb}");
    assert!(applied_from(&sb, "a") > 0, "b after restart: {sb}");
    let sc = status(&c);
    assert!(
        applied_from(&sc, "a") > 0 && applied_from(&sc, "b") > 0,
        "{sc}"
    );
    // c had no load: it decided nothing and must not re-publish what it applied.
    assert_eq!(sc["cluster"]["published_records"], 0, "{sc}");
    let sa = status(&a);
    assert!(applied_from(&sa, "b") > 0, "{sa}");
    let triplets = sa["table"]["triplets"].as_u64().unwrap_or(0);
    assert!(triplets > 0, "{sa}");
    // Nothing was trimmed (retention 1h): no gap anywhere.
    for (name, s) in [("a", &sa), ("b", &sb), ("c", &sc)] {
        for peer in ["a", "b", "c"] {
            if let Some(p) = peer_of(s, peer) {
                assert_eq!(p["gaps"], 0, "node {name}, peer {peer}: {s}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// 3. and 4. Redis down under load, back with its data or empty
// ---------------------------------------------------------------------------------------

/// Three nodes under load; Redis is killed; every node goes on answering and says it is
/// disconnected; a triplet is greylisted and whitelisted on a meanwhile; Redis comes back on
/// the same port (`empty`: with no data at all) and the nodes converge, c knowing the triplet.
fn redis_outage(tag: &str, empty: bool) {
    let mut redis = if empty {
        Redis::start()
    } else {
        Redis::start_persistent()
    };
    let delay = LOAD_DELAY_SECS.to_string();
    let cluster = Cluster::new(&redis, tag, &["--delay", &delay]);
    let a = cluster.node("a", &[]);
    let b = cluster.node("b", &[]);
    let c = cluster.node("c", &[]);
    let nodes = [("a", &a), ("b", &b), ("c", &c)];

    let mut load = Load::start(tag, &nodes);
    wait_status(&c, "c applied records from a", |s| applied_from(s, "a") > 0);
    load.wait_answers(100, "before the outage");
    if empty {
        // What Redis loses with its data and a peer had not read yet is lost for that peer
        // (at most one extra deferral each); so the table is made whole before.
        assert_no_errors(&load.stop());
        wait_converged(&nodes);
        load = Load::start(&format!("{tag}2"), &nodes);
        load.wait_answers(100, "before the outage, again");
    }

    redis.stop();
    for (_, n) in nodes {
        wait_connected(n, false);
    }
    // Decisions go on without Redis, on every node: each load thread gets answers (any
    // request left unanswered would fail it with a read timeout).
    load.wait_answers(200, "while Redis is down");
    let t = "192.0.2.20 carol@sender.example dave@rcpt.example";
    let first = ask(&a, &format!("CHECK {t}"));
    assert!(first.starts_with("DEFER "), "{first:?}");
    sleep_past(LOAD_DELAY_SECS);
    assert_eq!(ask(&a, &format!("CHECK {t}")), "PASS retried");
    load.wait_answers(100, "while Redis is down, later");
    for (name, n) in nodes {
        let s = status(n);
        assert!(
            !connected_of(&s),
            "node {name} connected with Redis down: {s}"
        );
    }

    if empty {
        redis.restart_empty();
    } else {
        redis.restart();
    }
    for (_, n) in nodes {
        wait_connected(n, true);
    }
    load.wait_answers(200, "after Redis returned");
    let reports = load.stop();
    assert_no_errors(&reports);

    wait_converged(&nodes);
    // What a decided while Redis was down reached c.
    assert_eq!(ask(&c, &format!("PEEK {t}")), "PASS known", "on c");
    // Published again: a's stream exists (even in a Redis that came back empty).
    assert!(redis.xlen(&cluster.stream("a")) > 0, "a's stream is empty");
    for (name, n) in nodes {
        let s = status(n);
        assert!(connected_of(&s), "node {name}: {s}");
        // One line per state change: connected, lost, connected again.
        let logs = n.logs();
        let count = |what: &str| logs.iter().filter(|l| l.contains(what)).count();
        assert_eq!(
            (
                count("cluster: connected to redis"),
                count("cluster: lost redis")
            ),
            (2, 1),
            "node {name}: not one line per state change:\n{}",
            logs.join("\n")
        );
    }
}

#[test]
fn redis_down_under_load_decisions_go_on_and_nodes_converge_after() {
    redis_outage("outage", false);
}

#[test]
fn redis_back_empty_nodes_still_converge() {
    redis_outage("empty", true);
}

// ---------------------------------------------------------------------------------------
// 4b. A partition: one node's link to Redis cut without a word (no reset, no error)
// ---------------------------------------------------------------------------------------

#[test]
fn a_node_cut_off_by_a_silent_partition_goes_on_and_converges_after() {
    let redis = Redis::start();
    let relay = Relay::start(redis.addr());
    let delay = LOAD_DELAY_SECS.to_string();
    let cluster = Cluster::new(&redis, "partition", &["--delay", &delay]);
    let a = cluster.node_at(&relay.url(), "a", &[]);
    let b = cluster.node("b", &[]);
    let c = cluster.node("c", &[]);
    let nodes = [("a", &a), ("b", &b), ("c", &c)];
    let load = Load::start("partition", &nodes);
    wait_status(&b, "b applied records from a", |s| applied_from(s, "a") > 0);
    wait_status(&a, "a applied records from b", |s| applied_from(s, "b") > 0);

    relay.cut();
    // Only a's own timeouts can tell it: the relay closes nothing.
    wait_connected(&a, false);
    load.wait_answers(200, "during the partition");
    // Each side whitelists a triplet the other cannot hear of.
    let x = "192.0.2.60 mallory@sender.example nick@rcpt.example";
    let y = "192.0.2.61 olivia@sender.example peggy@rcpt.example";
    for (node, t) in [(&a, x), (&b, y)] {
        assert!(ask(node, &format!("CHECK {t}")).starts_with("DEFER "));
    }
    sleep_past(LOAD_DELAY_SECS);
    for (node, t) in [(&a, x), (&b, y)] {
        assert_eq!(ask(node, &format!("CHECK {t}")), "PASS retried");
    }
    assert!(connected_of(&status(&b)) && connected_of(&status(&c)));

    relay.heal();
    wait_connected(&a, true);
    load.wait_answers(200, "after the heal");
    let reports = load.stop();
    assert_no_errors(&reports);
    wait_converged(&nodes);
    assert_eq!(ask(&c, &format!("PEEK {x}")), "PASS known", "x on c");
    assert_eq!(ask(&a, &format!("PEEK {y}")), "PASS known", "y on a");
}

// ---------------------------------------------------------------------------------------
// 5. A node started later
// ---------------------------------------------------------------------------------------

#[test]
fn a_node_started_later_learns_the_table_from_the_streams() {
    let redis = Redis::start();
    let delay = LOAD_DELAY_SECS.to_string();
    let cluster = Cluster::new(&redis, "later", &["--delay", &delay]);
    let a = cluster.node("a", &[]);
    let b = cluster.node("b", &[]);
    let load = Load::start("later", &[("a", &a), ("b", &b)]);
    load.wait_answers(300, "a and b");
    let reports = load.stop();
    assert_no_errors(&reports);
    // One whitelisted triplet, decided on a before c exists.
    let t = "192.0.2.30 erin@sender.example frank@rcpt.example";
    assert!(ask(&a, &format!("CHECK {t}")).starts_with("DEFER "));
    sleep_past(LOAD_DELAY_SECS);
    assert_eq!(ask(&a, &format!("CHECK {t}")), "PASS retried");
    let before = wait_converged(&[("a", &a), ("b", &b)]);

    let c = cluster.node("c", &[]);
    let after = wait_converged(&[("a", &a), ("b", &b), ("c", &c)]);
    c.wait_log("c caught up", |l| {
        l.contains("cluster: caught up with peer")
    });
    assert_eq!(
        before, after,
        "a and b changed although the load had stopped"
    );
    assert_eq!(ask(&c, &format!("PEEK {t}")), "PASS known");
    let sc = status(&c);
    assert!(
        applied_from(&sc, "a") > 0 && applied_from(&sc, "b") > 0,
        "{sc}"
    );
    assert_eq!(sc["table"]["triplets"], status(&a)["table"]["triplets"]);
    // What c learnt it applied; it decided nothing, so it published nothing (a remote change
    // is never re-published: with n nodes that would multiply the traffic by n).
    assert_eq!(sc["cluster"]["published_records"], 0, "{sc}");
    assert_eq!(redis.xlen(&cluster.stream("c")), 0, "c's stream");
}

// ---------------------------------------------------------------------------------------
// 6. and 7. Start-up refusals
// ---------------------------------------------------------------------------------------

#[test]
fn a_duplicate_node_id_is_refused_but_a_restart_after_a_crash_is_not() {
    let redis = Redis::start();
    let cluster = Cluster::new(&redis, "dup", &["--delay", "2s"]);
    let mut a = cluster.node("a", &[]);
    let b = cluster.node("b", &[]);
    wait_connected(&a, true);

    // Another machine (its own data dir, the same key) configured with a's node id.
    let other = Cluster::dir_with_key(&cluster.key);
    let (code, _, err) = cluster.run_refused(&other.file("data"), "a");
    assert_refused(code, &err, &["node id \"a\"", "already in use"]);

    // The first one goes on serving and replicating.
    let t = "192.0.2.40 grace@sender.example heidi@rcpt.example";
    assert!(ask(&a, &format!("CHECK {t}")).starts_with("DEFER "));
    wait_converged(&[("a", &a), ("b", &b)]);
    assert!(connected_of(&status(&a)));

    // kill -9 and an immediate restart on its own data dir: the same node, not a duplicate.
    kill_9(&mut a);
    a.restart();
    wait_connected(&a, true);
    let u = "192.0.2.41 ivan@sender.example judy@rcpt.example";
    assert!(ask(&a, &format!("CHECK {u}")).starts_with("DEFER "));
    wait_converged(&[("a", &a), ("b", &b)]);

    // The restarted node holds the id again: a second one is still refused.
    let (code, _, err) = cluster.run_refused(&other.file("data"), "a");
    assert_refused(code, &err, &["node id \"a\"", "already in use"]);
    assert!(connected_of(&status(&a)));
}

#[test]
fn a_node_with_another_hash_key_is_refused() {
    let redis = Redis::start();
    let cluster = Cluster::new(&redis, "key", &["--delay", "2s"]);
    let a = cluster.node("a", &[]);
    wait_connected(&a, true);
    let other_key = common::redis::random_key();
    assert_ne!(other_key, cluster.key);
    let dir = Cluster::dir_with_key(&other_key);
    let (code, _, err) = cluster.run_refused(&dir.file("data"), "b");
    assert_refused(code, &err, &["hash key", "differs"]);
    // a is untouched; a node with the right key still joins.
    let b = cluster.node("b", &[]);
    assert!(ask(&a, "CHECK 192.0.2.50 kim@sender.example lee@rcpt.example").starts_with("DEFER "));
    wait_converged(&[("a", &a), ("b", &b)]);
}

// ---------------------------------------------------------------------------------------
// 8. Metrics and status
// ---------------------------------------------------------------------------------------

#[test]
fn cluster_metrics_and_status_count_what_was_published_and_applied() {
    let redis = Redis::start();
    let cluster = Cluster::new(&redis, "metrics", &["--delay", "2s"]);
    let a = cluster.node("a", &[]);
    let b = cluster.node("b", &[]);
    wait_connected(&a, true);
    wait_connected(&b, true);

    const N: usize = 50;
    let lines: Vec<String> = (0..N)
        .map(|i| format!("CHECK 198.51.100.{i} m{i}@sender.example n{i}@rcpt.example"))
        .collect();
    let mut conn = Client::connect(a.native).expect("connect to a");
    for r in conn.pipeline(&lines).expect("CHECKs on a") {
        assert!(r.starts_with("DEFER "), "{r:?}");
    }
    wait_converged(&[("a", &a), ("b", &b)]);
    let n = N as f64;

    let ma = a.metrics();
    let mb = b.metrics();
    let m = |text: &str, name: &str| -> f64 {
        common::metric_value(text, name).unwrap_or_else(|| panic!("no {name} in:\n{text}"))
    };
    assert_eq!(m(&ma, "greyhound_cluster_connected"), 1.0);
    assert_eq!(m(&mb, "greyhound_cluster_connected"), 1.0);
    assert!(
        m(&ma, "greyhound_cluster_published_records_total") >= n,
        "{ma}"
    );
    assert!(
        m(&mb, r#"greyhound_cluster_applied_records_total{peer="a"}"#) >= n,
        "{mb}"
    );
    assert_eq!(m(&mb, r#"greyhound_cluster_gaps_total{peer="a"}"#), 0.0);
    assert!(m(&mb, r#"greyhound_cluster_lag_seconds{peer="a"}"#) >= 0.0);
    // b decided nothing: it published nothing (what it applied is never re-published).
    assert_eq!(
        m(&mb, "greyhound_cluster_published_records_total"),
        0.0,
        "b re-published what it applied from a"
    );

    let sa = status(&a);
    let sb = status(&b);
    assert_eq!(sa["node_id"], "a", "{sa}");
    assert_eq!(sb["node_id"], "b", "{sb}");
    assert_eq!(sa["table"]["triplets"], N, "{sa}");
    assert_eq!(sb["table"]["triplets"], N, "{sb}");
    assert!(
        sa["cluster"]["published_records"].as_u64() >= Some(N as u64),
        "{sa}"
    );
    let peer = peer_of(&sb, "a").unwrap_or_else(|| panic!("no peer a in {sb}"));
    assert!(peer["applied_records"].as_u64() >= Some(N as u64), "{sb}");
    assert_eq!(peer["gaps"], 0, "{sb}");
    assert!(peer["lag_seconds"].as_f64().is_some(), "{sb}");
    let last_id = peer["last_id"].as_str().unwrap_or_else(|| panic!("{sb}"));
    let (ms, seq) = last_id
        .split_once('-')
        .unwrap_or_else(|| panic!("last_id {last_id:?} is not ms-seq"));
    assert!(
        ms.parse::<u64>().is_ok() && seq.parse::<u64>().is_ok(),
        "{last_id:?}"
    );
    // b gets to a's stream's newest entry: it applied all of it.
    let newest = newest_id(&redis, &cluster.stream("a"));
    wait_status(&b, "b at the end of a's stream", |s| {
        peer_of(s, "a").is_some_and(|p| p["last_id"] == newest.as_str())
    });

    // Clustering off: "cluster" is null.
    let single = Server::start(&[]);
    assert_eq!(status(&single)["cluster"], serde_json::Value::Null);
}

// ---------------------------------------------------------------------------------------
// 9. A restart replays each peer from the entry its snapshot names; a trimmed gap is counted
// ---------------------------------------------------------------------------------------

/// Sends `n` CHECKs of new triplets tagged `round` to `node`, as one pipelined batch.
fn check_round(node: &Server, round: &str, n: usize) {
    let lines: Vec<String> = (0..n)
        .map(|i| format!("CHECK 203.0.113.{i} {round}{i}@sender.example r{i}@rcpt.example"))
        .collect();
    let mut conn = Client::connect(node.native).expect("connect");
    for r in conn.pipeline(&lines).expect("CHECKs") {
        assert!(r.starts_with("DEFER "), "{r:?}");
    }
}

#[test]
fn a_restart_replays_from_its_snapshot_and_counts_a_trimmed_gap() {
    let redis = Redis::start();
    let cluster = Cluster::new(&redis, "gap", &["--delay", "1h"]);
    let a = cluster.node("a", &[]);
    let mut b = cluster.node("b", &[]);
    check_round(&a, "before", 10);
    wait_converged(&[("a", &a), ("b", &b)]);
    // A graceful stop: the final snapshot holds b's position in a's stream.
    b.terminate();

    // While b is down, a publishes three rounds (three entries at least, 20 ms apart)...
    for round in ["lost1", "lost2", "kept"] {
        check_round(&a, round, 10);
        thread::sleep(Duration::from_millis(200));
    }
    // ...and everything but the newest entry is trimmed before b reads it.
    let stream = cluster.stream("a");
    let newest = newest_id(&redis, &stream);
    let before = redis.xlen(&stream);
    redis.cmd(&["XTRIM", &stream, "MINID", &newest]);
    assert_eq!(
        redis.xlen(&stream),
        1,
        "XTRIM left more than the newest of {before} entries"
    );

    b.restart();
    b.wait_log("b counts the gap", |l| {
        l.contains("trimmed before this node read them")
    });
    let s = wait_status(&b, "b at the end of a's stream", |s| {
        peer_of(s, "a").and_then(|p| p["last_id"].as_str()) == Some(newest.as_str())
    });
    let peer = peer_of(&s, "a").expect("peer a");
    assert_eq!(peer["gaps"], 1, "{s}");
    // b went on from its snapshot's position: what it read after the restart is the newest
    // entry only (the 10 "kept" records), not a's stream from the start (which would also
    // have counted the 10 "before" records, still in the stream had they not been trimmed).
    assert_eq!(applied_from(&s, "a"), 10, "{s}");
    for i in [0, 9] {
        let t = format!("203.0.113.{i} kept{i}@sender.example r{i}@rcpt.example");
        assert!(
            ask(&b, &format!("PEEK {t}")).starts_with("DEFER "),
            "kept {i}"
        );
        let before = format!("203.0.113.{i} before{i}@sender.example r{i}@rcpt.example");
        assert!(ask(&b, &format!("PEEK {before}")).starts_with("DEFER "));
    }
    // The cost of the gap: the trimmed records are missing on b (20 of them), nothing else.
    let (ta, tb) = (
        status(&a)["table"]["triplets"].as_u64().unwrap_or(0),
        s["table"]["triplets"].as_u64().unwrap_or(0),
    );
    assert_eq!(ta - tb, 20, "a {ta}, b {tb}");
    let m = b.metrics();
    assert_eq!(
        common::metric_value(&m, r#"greyhound_cluster_gaps_total{peer="a"}"#),
        Some(1.0),
        "{m}"
    );
}

// ---------------------------------------------------------------------------------------
// 10. The Redis ACL of docs/OPERATIONS.md: a node may write only its own stream
// ---------------------------------------------------------------------------------------

/// The `ACL SETUSER mx1 …` command of docs/OPERATIONS.md, for `user` with `password` on
/// cluster `name`, as words.
fn documented_acl(user: &str, password: &str, name: &str) -> Vec<String> {
    let doc = common::operations_md();
    let start = doc
        .find("ACL SETUSER mx1")
        .expect("docs/OPERATIONS.md shows an ACL SETUSER mx1 command");
    let block = &doc[start..doc[start..].find("```").map_or(doc.len(), |e| start + e)];
    block
        .split_whitespace()
        .map(|w| {
            w.replace("mx1", user)
                .replace(">long-random-password", &format!(">{password}"))
                .replace("greyhound:", &format!("{name}:"))
        })
        .collect()
}

#[test]
fn the_documented_acl_lets_a_node_write_only_its_own_stream() {
    let redis = Redis::start();
    let cluster = Cluster::new(&redis, "acl", &["--delay", "1s"]);
    for node in ["a", "b"] {
        let words = documented_acl(node, &format!("pw-{node}"), &cluster.name);
        let args: Vec<&str> = words.iter().map(String::as_str).collect();
        let reply = redis.cmd(&args);
        assert!(
            matches!(reply, Resp::Simple(ref s) if s == "OK"),
            "{args:?}: {reply:?}"
        );
    }
    let url = |node: &str| {
        let addr = redis.addr();
        format!("redis://{node}:pw-{node}@{addr}")
    };
    let a = cluster.node_at(&url("a"), "a", &[]);
    let b = cluster.node_at(&url("b"), "b", &[]);
    wait_connected(&a, true);
    wait_connected(&b, true);
    let t = "192.0.2.77 acl@sender.example acl@rcpt.example";
    assert!(ask(&a, &format!("CHECK {t}")).starts_with("DEFER "));
    sleep_past(1);
    assert_eq!(ask(&b, &format!("CHECK {t}")), "PASS retried");
    wait_converged(&[("a", &a), ("b", &b)]);

    // As a, writing b's stream or taking b's lease is refused by Redis.
    let mut conn = RespConn::connect(redis.addr()).expect("connect to redis");
    let auth = conn.cmd(&["AUTH", "a", "pw-a"]).expect("AUTH");
    assert!(matches!(auth, Resp::Simple(ref s) if s == "OK"), "{auth:?}");
    for cmd in [
        vec!["XADD", &cluster.stream("b"), "*", "r", "x"],
        vec!["SET", &format!("{}:node:b", cluster.name), "x"],
    ] {
        let reply = conn.cmd(&cmd).expect("command");
        assert!(
            matches!(&reply, Resp::Error(e) if e.starts_with("NOPERM")),
            "{cmd:?} as a: {reply:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// 11. rediss://: two nodes replicate through Redis over TLS
// ---------------------------------------------------------------------------------------

/// A `redis-server` listening only on a TLS port, with a certificate from a CA made here.
struct TlsRedis {
    child: std::process::Child,
    port: u16,
    dir: common::TempDir,
}

impl TlsRedis {
    fn start() -> Self {
        let dir = common::TempDir::new("tls");
        let openssl = |args: &[&str]| {
            let out = std::process::Command::new("openssl")
                .args(args)
                .current_dir(dir.join(""))
                .output()
                .expect("run openssl (tests/run.sh installs it)");
            assert!(out.status.success(), "openssl {args:?}: {out:?}");
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=greyhound test CA",
        ]);
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "srv.key",
            "-out",
            "srv.csr",
            "-subj",
            "/CN=localhost",
        ]);
        std::fs::write(
            dir.join("ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
        )
        .expect("write ext");
        openssl(&[
            "x509",
            "-req",
            "-in",
            "srv.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "srv.pem",
            "-days",
            "2",
            "-extfile",
            "ext",
        ]);
        let port = common::free_port();
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .args(["--tls-cert-file", "srv.pem", "--tls-key-file", "srv.key"])
            .args(["--tls-ca-cert-file", "ca.pem", "--tls-auth-clients", "no"])
            .args(["--save", "", "--appendonly", "no", "--dir", "."])
            .current_dir(dir.join(""))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start redis-server");
        let up = poll(IO_TIMEOUT, || {
            TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ())
        });
        assert!(
            up.is_some(),
            "redis-server with TLS did not listen on {port}"
        );
        Self { child, port, dir }
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn two_nodes_replicate_through_redis_over_tls() {
    let redis = Redis::start(); // only names the cluster; the nodes use the TLS one
    let tls = TlsRedis::start();
    let cluster = Cluster::new(&redis, "tls", &["--delay", "1s"]);
    let url = format!("rediss://127.0.0.1:{}", tls.port);
    let ca = tls.dir.file("ca.pem");
    let env = [("SSL_CERT_FILE", ca.as_str())];
    let a = cluster.node_at_env(&url, "a", &env);
    let b = cluster.node_at_env(&url, "b", &env);
    wait_connected(&a, true);
    wait_connected(&b, true);
    let t = "192.0.2.88 tls@sender.example tls@rcpt.example";
    assert!(ask(&a, &format!("CHECK {t}")).starts_with("DEFER "));
    sleep_past(1);
    assert_eq!(ask(&b, &format!("CHECK {t}")), "PASS retried");
    wait_converged(&[("a", &a), ("b", &b)]);

    // Without the CA, the certificate is not trusted: the node says so and goes on alone.
    let c = cluster.node_at_env(&url, "c", &[]);
    c.wait_log("c refuses the certificate", |l| {
        l.contains("lost redis") && l.contains("certificate")
    });
    assert!(!connected_of(&status(&c)));
    assert!(ask(&c, &format!("CHECK {t}")).starts_with("DEFER "));
}

// ---------------------------------------------------------------------------------------
// 12. Redis away at the start: the node starts alone and joins when Redis comes
// ---------------------------------------------------------------------------------------

#[test]
fn a_node_started_while_redis_is_away_starts_alone_and_joins_later() {
    let mut redis = Redis::start();
    let cluster = Cluster::new(&redis, "away", &["--delay", "1s"]);
    redis.stop();
    let a = cluster.node("a", &[]);
    a.wait_log("a says it starts alone", |l| l.contains("starting alone"));
    let t = "192.0.2.99 early@sender.example early@rcpt.example";
    assert!(ask(&a, &format!("CHECK {t}")).starts_with("DEFER "));
    assert!(!connected_of(&status(&a)));

    redis.restart_empty();
    wait_connected(&a, true);
    // What a decided alone reaches a node that joins now.
    let b = cluster.node("b", &[]);
    wait_converged(&[("a", &a), ("b", &b)]);
    sleep_past(1);
    assert_eq!(ask(&b, &format!("CHECK {t}")), "PASS retried");
}
