//! Snapshot figures (targets: docs/BENCHMARKS.md): writing a snapshot of 10 M triplets (time, size,
//! longest lock hold), the decision latency a concurrent caller sees meanwhile, loading it
//! back, and the real server's restart time until its first answer.
//!
//! `cargo build --release && cargo run --release --example snapshot -- [TRIPLETS] [DIR]`
//!
//! 1. fills an engine (real clock, the data directory's key) with TRIPLETS triplets, 3 in 4
//!    whitelisted, plus one auto-whitelist record per 16 triplets;
//! 2. one thread decides random known triplets for 3 s and records each decision's latency
//!    (baseline), then again while the main thread writes a snapshot into DIR;
//! 3. loads the snapshot into a fresh engine on 2 threads;
//! 4. starts `target/release/greyhound serve --data-dir DIR` and asks triplet 0 over native
//!    TCP every millisecond until it answers `PASS known`: the restart time as a client sees
//!    it; then stops it with SIGTERM (final snapshot included) and times that too.

#[path = "../benches/common/mod.rs"]
mod common;

use common::Workload;
use greyhound::engine::{
    AwlRecord, Engine, EngineConfig, Key, Mode, Normalizer, Policy, SystemClock, TripletRecord,
};
use greyhound::snapshot::{self, DirStore, Writer};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn engine(secret: greyhound::engine::HashSecret) -> Engine {
    Engine::new(
        EngineConfig {
            policy: Policy::default(),
            normalizer: Normalizer::default(),
            secret,
        },
        Arc::new(SystemClock),
    )
}

/// Latencies (ns) of decisions on random known triplets until `stop`.
fn decide_until(e: &Engine, w: &Workload, n: u64, stop: &AtomicBool) -> Vec<u32> {
    let mut rng = common::Rng(0x9e37_79b9_7f4a_7c15);
    let mut lat = Vec::with_capacity(1 << 24);
    while !stop.load(Ordering::Relaxed) {
        let q = w.query(rng.next() % n);
        let t = Instant::now();
        std::hint::black_box(e.check(&q, Mode::Record));
        lat.push(t.elapsed().as_nanos().min(u128::from(u32::MAX)) as u32);
    }
    lat
}

fn summary(name: &str, mut lat: Vec<u32>) {
    lat.sort_unstable();
    let at = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)] as f64 / 1000.0;
    println!(
        "{name}: {} decisions, p50 {:.1} µs, p99 {:.1} µs, p99.9 {:.1} µs, max {:.1} µs",
        lat.len(),
        at(0.5),
        at(0.99),
        at(0.999),
        *lat.last().unwrap() as f64 / 1000.0
    );
}

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000_000);
    let dir = PathBuf::from(
        std::env::args()
            .nth(2)
            .unwrap_or_else(|| "/tmp/greyhound-snapshot-bench".into()),
    );
    let _ = std::fs::remove_dir_all(&dir);
    let secret = greyhound::datadir::open(&dir).expect("data directory");
    let w = Workload::new();
    let e = engine(secret.clone());
    let now = e.now();
    let t = Instant::now();
    let mut batch = Vec::with_capacity(1 << 16);
    for i in 0..n {
        let k = e.prepare(&w.query(i)).expect("not exempt");
        let whitelisted = i % 4 != 3;
        batch.push(TripletRecord::from_parts(
            k.key,
            now - 600,
            now - 60,
            whitelisted,
        ));
        if batch.len() == batch.capacity() {
            e.load_triplets(batch.drain(..), now);
        }
    }
    e.load_triplets(batch.drain(..), now);
    e.load_clients(
        (0..n / 16).map(|i| {
            AwlRecord::from_parts(
                Key::from_u128(
                    u128::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835) | 1,
                ),
                now - 60,
                now - 3600,
                3,
            )
        }),
        now,
    );
    let s = e.stats();
    println!(
        "filled {} triplets ({} whitelisted), {} AWL clients in {:.1} s",
        s.triplets,
        s.whitelisted,
        s.awl_clients,
        t.elapsed().as_secs_f64()
    );

    let stop = AtomicBool::new(false);
    let baseline = std::thread::scope(|sc| {
        let h = sc.spawn(|| decide_until(&e, &w, n, &stop));
        std::thread::sleep(Duration::from_secs(3));
        stop.store(true, Ordering::Relaxed);
        h.join().unwrap()
    });
    summary("decisions, no snapshot running (3 s)", baseline);

    let mut writer = Writer::new(DirStore::new(&dir)).expect("writer");
    let stop = AtomicBool::new(false);
    let (written, during) = std::thread::scope(|sc| {
        let h = sc.spawn(|| decide_until(&e, &w, n, &stop));
        // Let the caller warm up so the whole write is covered.
        std::thread::sleep(Duration::from_millis(200));
        let written = writer.write(&e).expect("snapshot");
        stop.store(true, Ordering::Relaxed);
        (written, h.join().unwrap())
    });
    println!(
        "snapshot: {} triplets + {} clients, {} bytes ({:.1} B/triplet), written in {:.2} s, longest shard lock hold {:.2} ms",
        written.triplets,
        written.clients,
        written.bytes,
        written.bytes as f64 / written.triplets as f64,
        written.duration.as_secs_f64(),
        written.longest_hold.as_secs_f64() * 1000.0
    );
    summary("decisions while the snapshot was written", during);
    drop(e);

    let fresh = engine(secret);
    let t = Instant::now();
    let loaded = snapshot::load(&DirStore::new(&dir), &fresh, 2).expect("load");
    println!(
        "loaded {} triplets + {} clients in-process on 2 threads in {:.2} s",
        loaded.triplets,
        loaded.clients,
        t.elapsed().as_secs_f64()
    );
    drop(fresh);

    // The real server, on the same data directory.
    let bin = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(|p| p.parent())
        .map(|p| p.join("greyhound"))
        .unwrap();
    let q = w.query(0);
    let ask = format!("CHECK {} {} {}\n", q.client, q.sender, q.recipient);
    let t = Instant::now();
    let mut child = Command::new(&bin)
        .args(["serve", "--data-dir"])
        .arg(&dir)
        .args([
            "--native",
            "127.0.0.1:17030",
            "--policy",
            "127.0.0.1:17023",
            "--metrics",
            "127.0.0.1:17470",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "start {}: {e} (run cargo build --release first)",
                bin.display()
            )
        });
    let answer = loop {
        if let Ok(mut s) = TcpStream::connect("127.0.0.1:17030") {
            s.write_all(ask.as_bytes()).unwrap();
            let mut line = String::new();
            if BufReader::new(s).read_line(&mut line).is_ok() && !line.is_empty() {
                break line;
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no answer within 60 s"
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    println!(
        "restart: first answer {:?} {:.2} s after the process started",
        answer.trim_end(),
        t.elapsed().as_secs_f64()
    );
    let rss = std::fs::read_to_string(format!("/proc/{}/status", child.id()))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .map(|v| v.trim().to_owned())
        })
        .unwrap_or_default();
    println!("server RSS after loading: {rss}");
    let t = Instant::now();
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    println!(
        "SIGTERM to exit (final snapshot of the whole table included): {:.2} s, {status}",
        t.elapsed().as_secs_f64()
    );
}
