//! The `greyhound-loadtest` binary against the real `greyhound` server: a short bounded `run`
//! of each protocol, `ceiling`, and a short `plan`, checking the JSON reports' schema and
//! that answers add up (errors are never counted as decisions).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

const LOADTEST: &str = env!("CARGO_BIN_EXE_greyhound-loadtest");

/// The `greyhound` server binary next to this test's target directory, built if missing
/// (`cargo test --workspace` builds it; `cargo test -p greyhound-loadtest` does not). One
/// build per test process, however many tests ask at once.
fn greyhound_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(find_or_build_greyhound).clone()
}

fn find_or_build_greyhound() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>/greyhound
    let profile_dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = profile_dir.join(format!("greyhound{}", std::env::consts::EXE_SUFFIX));
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", "greyhound", "--bin", "greyhound"]);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "cargo build -p greyhound failed");
    }
    assert!(bin.exists(), "no greyhound binary at {}", bin.display());
    bin
}

/// A `greyhound serve` on free loopback ports with a fresh data dir; killed (by PID) when
/// dropped.
struct Server {
    child: Child,
    dir: PathBuf,
    native: SocketAddr,
    policy: SocketAddr,
}

impl Server {
    fn start() -> Self {
        Self::with_delay("1s")
    }

    fn with_delay(delay: &str) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir = std::env::temp_dir().join(format!(
            "greyhound-loadtest-it-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut child = Command::new(greyhound_bin())
            .args([
                "serve",
                "--native",
                "127.0.0.1:0",
                "--policy",
                "127.0.0.1:0",
                "--metrics",
                "127.0.0.1:0",
                "--delay",
                delay,
                "--data-dir",
            ])
            .arg(dir.join("data"))
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start greyhound serve");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        // Reads the log to the end, so the server never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains(" ready ") {
                    let _ = tx.send(line);
                }
            }
        });
        let ready = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("greyhound did not report ready within 20 s");
            }
        };
        let field = |k: &str| -> SocketAddr {
            ready
                .split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .unwrap_or_else(|| panic!("no {k} in {ready:?}"))
                .parse()
                .unwrap()
        };
        Self {
            native: field("native="),
            policy: field("policy="),
            child,
            dir,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn loadtest(args: &[&str]) -> Output {
    let out = Command::new(LOADTEST)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run greyhound-loadtest");
    assert!(
        out.status.success(),
        "greyhound-loadtest {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("{k} is not a count in {v}"))
}

/// The run report's keys, exactly: a renamed or dropped field is a schema change.
fn check_run_schema(r: &Value) {
    let keys: Vec<&str> = r.as_object().unwrap().keys().map(String::as_str).collect();
    let mut want = vec![
        "schema",
        "proto",
        "target",
        "client",
        "threads",
        "connections",
        "pipeline",
        "per_datagram",
        "mode",
        "rate",
        "elapsed_secs",
        "requests_sent",
        "decisions",
        "decisions_per_sec",
        "latency_us",
        "answers",
        "workload",
        "cpu",
        "late_retries",
        "wrongly_deferred",
        "targets",
    ];
    let mut got = keys.clone();
    got.sort_unstable();
    want.sort_unstable();
    assert_eq!(got, want);
    assert_eq!(r["schema"], "greyhound-loadtest/run/3");
    // Per target, and the totals are the targets' sums.
    let targets = r["targets"].as_array().unwrap();
    assert_eq!(
        targets.len(),
        r["target"].as_str().unwrap().split(',').count()
    );
    for k in [
        "requests_sent",
        "decisions",
        "late_retries",
        "wrongly_deferred",
    ] {
        let sum: u64 = targets.iter().map(|t| u(t, k)).sum();
        assert_eq!(sum, u(r, k), "{k}: {r}");
    }
    for t in targets {
        assert!(t["target"].is_string() && t["decisions_per_sec"].is_number());
        assert!(u(t, "wrongly_deferred") <= u(t, "late_retries"), "{t}");
    }
    for k in ["count", "mean", "p50", "p90", "p99", "p999", "max"] {
        assert!(r["latency_us"][k].is_number(), "latency_us.{k}");
    }
    let l = &r["latency_us"];
    let p = |k: &str| l[k].as_f64().unwrap();
    assert!(p("p50") <= p("p90") && p("p90") <= p("p99") && p("p99") <= p("p999"));
    assert!(p("p999") <= p("max"));
    for k in [
        "defer",
        "pong",
        "other",
        "timeouts",
        "unmatched",
        "connection_errors",
        "behind_schedule",
    ] {
        u(&r["answers"], k);
    }
    assert!(r["answers"]["pass"].is_object() && r["answers"]["err"].is_object());
    for k in ["new", "early_retry", "retry", "known"] {
        u(&r["workload"], k);
    }
    for k in ["cores", "client_threads"] {
        u(&r["cpu"], k);
    }
    for k in ["client_cores", "machine_idle"] {
        assert!(r["cpu"][k].is_number(), "cpu.{k}");
    }
    assert!(r["cpu"]["client_saturated"].is_boolean());
}

/// Decisions are DEFER plus every PASS; with a healthy server every request is one.
fn check_clean_run(r: &Value, requests: u64) {
    let a = &r["answers"];
    let pass: u64 = a["pass"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(u(r, "decisions"), u(a, "defer") + pass, "{r}");
    assert_eq!(u(r, "requests_sent"), requests, "{r}");
    assert_eq!(u(r, "decisions"), requests, "every request decided: {r}");
    assert!(a["err"].as_object().unwrap().is_empty(), "{r}");
    assert_eq!(u(a, "timeouts"), 0, "{r}");
    assert!(u(a, "defer") > 0, "new triplets are deferred: {r}");
    assert!(pass > 0, "{r}");
    assert_eq!(u(&r["latency_us"], "count"), requests);
    assert_eq!(
        u(&r["workload"], "new")
            + u(&r["workload"], "early_retry")
            + u(&r["workload"], "retry")
            + u(&r["workload"], "known"),
        requests
    );
}

#[test]
fn run_each_protocol_against_the_real_server() {
    let server = Server::start();
    let native = server.native.to_string();
    let policy = server.policy.to_string();
    let cases: [(&str, &str, &[&str]); 3] = [
        // Each run its own seed: the server remembers the triplets of the runs before.
        (
            "native-tcp",
            &native,
            &["-c", "2", "-p", "16", "--seed", "11"],
        ),
        (
            "native-udp",
            &native,
            &["-c", "2", "-p", "4", "--per-datagram", "4", "--seed", "12"],
        ),
        ("policy", &policy, &["-c", "4", "--seed", "13"]),
    ];
    for (proto, target, extra) in cases {
        // Open loop at 1500/s for ~2 s: long enough for retries after the server's 1 s delay.
        let mut args = vec![
            "run",
            "--json",
            "--target",
            target,
            "--proto",
            proto,
            "--requests",
            "3000",
            "--rate",
            "1500",
            "--duration",
            "30s",
            "--server-delay",
            "1",
            "--timeout",
            "5s",
        ];
        args.extend_from_slice(extra);
        let r = json(&loadtest(&args));
        check_run_schema(&r);
        assert_eq!(r["proto"], proto);
        assert_eq!(r["mode"], "open-loop");
        check_clean_run(&r, 3000);
        let pass = &r["answers"]["pass"];
        if proto == "policy" {
            // Policy passes say DUNNO, or PREPEND for the first pass after a retry.
            assert!(
                pass.get("prepend").is_some() || pass.get("dunno").is_some(),
                "{r}"
            );
        } else {
            assert!(
                pass.get("retried").and_then(Value::as_u64).unwrap_or(0) > 0,
                "retries after the delay pass: {r}"
            );
        }
    }
    // Closed loop, bounded by count, after a warm-up that whitelists the known pool: with
    // only known-pool requests every answer is PASS known.
    let r = json(&loadtest(&[
        "run",
        "--json",
        "--target",
        &native,
        "--requests",
        "2000",
        "-c",
        "2",
        "-p",
        "8",
        "--warmup",
        "--known-pool",
        "500",
        "--server-delay",
        "1",
        "--new",
        "0",
        "--early-retry",
        "0",
        "--retry",
        "0",
        "--known",
        "1",
        "--seed",
        "14",
    ]));
    check_run_schema(&r);
    assert_eq!(r["mode"], "closed-loop");
    assert_eq!(u(&r, "requests_sent"), 2000);
    assert_eq!(u(&r, "decisions"), 2000);
    assert_eq!(u(&r["answers"]["pass"], "known"), 2000, "{r}");
}

/// The open-loop run of the cluster test: 3000 requests at 1500/s over ~2 s, so retries
/// after the servers' 1 s delay happen.
fn cluster_run(targets: &[&str], seed: &str, proto: &str, extra: &[&str]) -> Value {
    let mut args = vec!["run", "--json", "--proto", proto];
    for t in targets {
        args.extend_from_slice(&["--target", t]);
    }
    args.extend_from_slice(&[
        "--requests",
        "3000",
        "--rate",
        "1500",
        "--duration",
        "30s",
        "--server-delay",
        "1",
        "--timeout",
        "5s",
        "-c",
        "2",
        "--seed",
        seed,
    ]);
    args.extend_from_slice(extra);
    let r = json(&loadtest(&args));
    check_run_schema(&r);
    check_clean_run(&r, 3000);
    r
}

#[test]
fn retries_sent_to_another_unclustered_server_are_counted_wrongly_deferred() {
    // Two servers that share nothing: a retry sent to the other one finds no first attempt
    // there and is deferred, as in a cluster that does not replicate.
    let a = Server::start();
    let b = Server::start();
    let (a_native, b_native) = (a.native.to_string(), b.native.to_string());
    // One target: every late retry reaches the server of its first attempt and passes.
    let one = cluster_run(&[&a_native], "21", "native-tcp", &["-p", "8"]);
    assert_eq!(one["targets"].as_array().unwrap().len(), 1);
    assert_eq!(one["target"], a_native.as_str());
    assert!(u(&one, "late_retries") > 0, "{one}");
    assert_eq!(u(&one, "wrongly_deferred"), 0, "{one}");
    assert_eq!(u(&one["targets"][0], "requests_sent"), 3000);
    // Two targets, over TCP and UDP: retries go to the other server and are deferred there.
    for (proto, seed, extra) in [
        ("native-tcp", "22", &["-p", "8"][..]),
        ("native-udp", "23", &["-p", "4", "--per-datagram", "2"][..]),
    ] {
        let r = cluster_run(&[&a_native, &b_native], seed, proto, extra);
        assert_eq!(r["target"], format!("{a_native},{b_native}").as_str());
        let wrong = u(&r, "wrongly_deferred");
        assert!(wrong > 0, "{proto}: no retry counted wrongly deferred: {r}");
        assert!(wrong <= u(&r, "late_retries"));
        for t in r["targets"].as_array().unwrap() {
            // Each node gets about half the load, and wrongly deferred retries.
            assert!(u(t, "requests_sent") > 1000, "{proto}: {r}");
            assert!(u(t, "wrongly_deferred") > 0, "{proto}: {r}");
        }
    }
    // Policy, and the report for people.
    let out = loadtest(&[
        "run",
        "--proto",
        "policy",
        "--target",
        &a.policy.to_string(),
        "--target",
        &b.policy.to_string(),
        "--requests",
        "3000",
        "--rate",
        "1500",
        "--server-delay",
        "1",
        "--timeout",
        "5s",
        "-c",
        "2",
        "--seed",
        "24",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("conn per target"), "{text}");
    assert!(
        text.contains("  target 1 ") && text.contains("  target 2 "),
        "{text}"
    );
    let wrong: u64 = text
        .lines()
        .find_map(|l| l.split("wrongly deferred ").nth(1))
        .and_then(|w| w.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no wrongly deferred count in {text}"));
    assert!(wrong > 0, "{text}");
    drop((a, b));
    // A warm-up against two others: the pool's second pass goes to the other server, so
    // there the pool is not whitelisted, and known-pool requests it gets are wrongly
    // deferred; on the server of the first pass they pass. A 3 s delay: the engine counts
    // whole seconds, so with 1 s a request in the next second after the second pass (the
    // measured run starts a few hundred ms after it in a debug build) would pass already.
    let a = Server::with_delay("3s");
    let b = Server::with_delay("3s");
    let r = json(&loadtest(&[
        "run",
        "--json",
        "--target",
        &a.native.to_string(),
        "--target",
        &b.native.to_string(),
        "--requests",
        "600",
        "-c",
        "2",
        "-p",
        "4",
        "--warmup",
        "--known-pool",
        "300",
        "--server-delay",
        "3",
        "--new",
        "0",
        "--early-retry",
        "0",
        "--retry",
        "0",
        "--known",
        "1",
        "--seed",
        "25",
    ]));
    check_run_schema(&r);
    assert_eq!(u(&r, "decisions"), 600, "{r}");
    assert_eq!(
        u(&r, "late_retries"),
        600,
        "known requests after a warm-up must pass: {r}"
    );
    let wrong = u(&r, "wrongly_deferred");
    assert!(wrong > 0 && wrong < 600, "{r}");
    assert_eq!(u(&r["answers"], "defer"), wrong, "{r}");
}

#[test]
fn ceiling_measures_the_null_responder_then_the_target() {
    let server = Server::start();
    let native = server.native.to_string();
    let r = json(&loadtest(&[
        "ceiling",
        "--json",
        "--target",
        &native,
        "--proto",
        "native-tcp",
        "--requests",
        "2000",
        "-c",
        "2",
        "-p",
        "8",
    ]));
    assert_eq!(r["schema"], "greyhound-loadtest/ceiling/2");
    for side in ["minimal", "null", "naive", "target"] {
        check_run_schema(&r[side]);
    }
    assert_eq!(r["minimal"]["client"], "minimal");
    assert_eq!(r["null"]["client"], "full");
    assert_eq!(u(&r["minimal"], "decisions"), 2000);
    assert_eq!(u(&r["naive"], "decisions"), 2000);
    // Each side's CPU: the in-process servers' threads, and the target's process, found
    // through the port it listens on.
    for side in ["null", "naive", "target"] {
        assert!(
            r[side]["cpu"]["server_cores"].is_number(),
            "{side}: {}",
            r[side]["cpu"]
        );
    }
    let ratios = &r["ratios"];
    let rate = |side: &str| r[side]["decisions_per_sec"].as_f64().unwrap();
    let close = |k: &str, want: f64| {
        let got = ratios[k].as_f64().unwrap();
        assert!((got - want).abs() < 1e-9, "{k}: {got} vs {want}");
    };
    close("client_vs_minimal", rate("null") / rate("minimal"));
    close("naive_vs_null", rate("naive") / rate("null"));
    close("target_vs_naive", rate("target") / rate("naive"));
    assert!(r["warnings"].is_array());
    assert_eq!(u(&r["null"], "decisions"), 2000);
    assert_eq!(u(&r["null"]["answers"]["pass"], "known"), 2000);
    assert_eq!(u(&r["target"], "decisions"), 2000);
    assert_ne!(r["null"]["target"], r["target"]["target"]);
    let ratio = r["ratio"].as_f64().unwrap();
    let want = r["target"]["decisions_per_sec"].as_f64().unwrap()
        / r["null"]["decisions_per_sec"].as_f64().unwrap();
    assert!((ratio - want).abs() < 1e-9);
}

#[test]
fn remote_targets_are_refused_without_allow_remote() {
    let out = Command::new(LOADTEST)
        .args(["run", "--target", "192.0.2.1:10030", "--requests", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--allow-remote"), "{err}");
    // Without --duration or --requests a run is still bounded (10 s by default); an
    // unbounded run is impossible, so no flag combination is tested for hanging here.
}

#[test]
fn short_plan_reports_and_draws() {
    let dir = std::env::temp_dir().join(format!("greyhound-plan-it-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let chart = dir.join("plan.svg");
    let out = loadtest(&[
        "plan",
        "--json",
        "--days",
        "0.2",
        "--rate",
        "30",
        "--senders",
        "300",
        "--recipients",
        "2000",
        "--sample",
        "1",
        "--report-every",
        "1h",
        "--headroom-time",
        "100ms",
        "--headroom-max-triplets",
        "5000",
        "--chart",
        chart.to_str().unwrap(),
    ]);
    let r = json(&out);
    assert_eq!(r["schema"], "greyhound-loadtest/plan/2");
    for k in [
        "config",
        "sample",
        "simulated_secs",
        "wall_secs",
        "decisions_simulated",
        "timeline",
        "legit",
        "legit_delayed_over_15min_share",
        "spam",
        "headroom",
        "delay_cdf",
        "runs",
        "legit_by_pool_identity",
        "pool_identity_effect",
    ] {
        assert!(r.get(k).is_some(), "no {k} in the plan report");
    }
    // Both pool-identity runs by default, compared per sender type.
    assert_eq!(r["runs"], serde_json::json!(["off", "on"]));
    for t in [
        "sendmail",
        "qmail",
        "courier",
        "momentum",
        "mailenable",
        "pool",
        "all",
    ] {
        let e = &r["pool_identity_effect"][t];
        for k in [
            "delayed_median_off_secs",
            "delayed_median_on_secs",
            "delayed_p95_off_secs",
            "delayed_p95_on_secs",
            "median_saved_secs",
            "p95_saved_secs",
        ] {
            assert!(e[k].is_number(), "pool_identity_effect.{t}.{k}: {e}");
        }
        assert!(r["legit_by_pool_identity"]["on"][t].is_object());
    }
    assert_eq!(u(&r, "simulated_secs"), 17_280);
    // 0.2 days = 4.8 h: points at 1, 2, 3, 4 h and the end.
    let tl = r["timeline"].as_array().unwrap();
    assert_eq!(tl.len(), 5);
    for p in tl {
        for k in [
            "hours",
            "arrivals_per_sec",
            "decisions_per_sec",
            "greylisted",
            "whitelisted",
            "awl_clients",
            "table_bytes",
            "rss_bytes",
            "expiries_per_sec",
        ] {
            assert!(p[k].is_number(), "timeline point without {k}: {p}");
        }
    }
    assert!(u(&tl[4], "greylisted") > 0);
    assert!(u(&tl[4], "table_bytes") > 0);
    for t in ["postfix", "exim", "exchange", "pool", "all"] {
        let d = &r["legit"][t];
        for k in [
            "median_secs",
            "p90_secs",
            "p95_secs",
            "max_secs",
            "delayed_median_secs",
            "delayed_p95_secs",
        ] {
            assert!(d[k].is_number(), "legit.{t}.{k}");
        }
    }
    let share = r["spam"]["stopped_share"].as_f64().unwrap();
    assert!(share > 0.5 && share <= 1.0, "{}", r["spam"]);
    assert!(r["headroom"]["decisions_per_sec"].as_f64().unwrap() > 0.0);
    let svg = std::fs::read_to_string(&chart).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("live triplets"));
    let _ = std::fs::remove_dir_all(&dir);
}
