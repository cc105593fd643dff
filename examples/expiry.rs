//! Expiry cost (issue: time to expire 10 M records, and the longest single pause it causes a
//! concurrent caller).
//!
//! `cargo run --release --example expiry -- [TRIPLETS]` fills the engine with greylisted
//! triplets first seen at the same second, moves the clock past the retry window, and runs
//! `Engine::expire` on one thread while another keeps deciding known triplets in a loop and
//! records the longest time any single decision took.

#[path = "../benches/common/mod.rs"]
mod common;

use common::{engine, Workload, NOW};
use greyhound::engine::{Clock, Mode, TripletRecord};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000_000);
    let w = Workload::new();
    let (e, clock) = engine();
    // A small set of whitelisted triplets the concurrent caller keeps asking about; they are
    // spread over all shards, so the caller regularly hits the shard being expired.
    let probe: Vec<_> = (0..4096u64)
        .map(|i| e.prepare(&w.query(n + i)).unwrap())
        .collect();
    for k in &probe {
        e.load_triplets([TripletRecord::from_parts(k.key, NOW, NOW, true)], NOW);
    }
    for i in 0..n {
        let k = e.prepare(&w.query(i)).unwrap();
        e.load_triplets([TripletRecord::from_parts(k.key, NOW, NOW, false)], NOW);
    }
    let p = *e.policy();
    // Baseline: the same caller for the same time with no expiry running, so scheduler
    // preemption on a small machine is not mistaken for a pause caused by expiry.
    let baseline = {
        let t = Instant::now();
        let mut max = Duration::ZERO;
        let mut i = 0;
        while t.elapsed() < Duration::from_millis(500) {
            let s = Instant::now();
            std::hint::black_box(e.decide(&probe[i % probe.len()], NOW + 1, Mode::Record));
            max = max.max(s.elapsed());
            i += 1;
        }
        max
    };
    clock.set(NOW + p.retry_window + 1);
    let done = AtomicBool::new(false);
    let (took, stats, max_pause, probes) = std::thread::scope(|s| {
        let caller = s.spawn(|| {
            let mut max = Duration::ZERO;
            let mut count = 0u64;
            let mut i = 0;
            while !done.load(Ordering::Relaxed) {
                let t = Instant::now();
                std::hint::black_box(e.decide(&probe[i % probe.len()], NOW + 1, Mode::Record));
                max = max.max(t.elapsed());
                i += 1;
                count += 1;
            }
            (max, count)
        });
        let t = Instant::now();
        let stats = e.expire(clock.now());
        let took = t.elapsed();
        done.store(true, Ordering::Relaxed);
        let (max, count) = caller.join().unwrap();
        (took, stats, max, count)
    });
    assert_eq!(stats.removed as u64, n);
    assert_eq!(e.stats().triplets, probe.len());
    println!("expired records        {}", stats.removed);
    println!(
        "expire time            {:.3} s ({:.1} M records/s, 1 thread)",
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64() / 1e6
    );
    println!("concurrent decisions   {probes}");
    println!(
        "longest lock hold by one expiry step  {:.1} µs",
        stats.longest_step.as_secs_f64() * 1e6
    );
    println!(
        "longest single decision during expiry  {:.1} µs",
        max_pause.as_secs_f64() * 1e6
    );
    println!(
        "longest single decision, no expiry (0.5 s baseline)  {:.1} µs",
        baseline.as_secs_f64() * 1e6
    );
}
