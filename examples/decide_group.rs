//! Two-phase batches against one-by-one decisions, measured fairly: the engine bench's 10 M
//! prefilled triplets, then one settling pass over the whole key space (the first seconds
//! after a prefill whitelist retries, fill the auto-whitelist and grow tables, which would
//! favour whichever variant runs later), then 1 s rounds alternating the two variants on
//! 2 threads, batches of 1024 requests of the bench's mix.
//!
//! `cargo run --release --example decide_group -- [ROUNDS]`
//!
//! `decide_group -- count LIVE N` instead prefills LIVE triplets and decides N requests of the
//! same mix on one thread in `counted`, for instruction counts that a shared machine cannot
//! blur: `valgrind --tool=callgrind --toggle-collect='*counted*' target/release/examples/decide_group count 100000 1000000`
//! (instructions per decision = Ir / N).

#[path = "../benches/common/mod.rs"]
mod common;

use common::{engine, pick, prefill, Rng, Workload};
use greyhound::engine::{Decision, Mode, Query};
use std::time::{Duration, Instant};

const BATCH: usize = 1024;
const LIVE: u64 = 10_000_000;

fn round(e: &greyhound::engine::Engine, w: &Workload, two_phase: bool, seed: u64) -> f64 {
    let t = Instant::now();
    let done: u64 = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2u64)
            .map(|th| {
                s.spawn(move || {
                    let mut rng = Rng(seed * 31 + th + 1);
                    let mut out: Vec<Decision> = Vec::with_capacity(BATCH);
                    let mut qs: Vec<Query> = Vec::with_capacity(BATCH);
                    let mut n = 0u64;
                    while t.elapsed() < Duration::from_secs(1) {
                        qs.clear();
                        qs.extend((0..BATCH).map(|_| w.query(pick(&mut rng, LIVE, false))));
                        if two_phase {
                            e.check_batch(&qs, Mode::Record, &mut out);
                        } else {
                            out.clear();
                            e.batch(|b| out.extend(qs.iter().map(|q| b.check(q, Mode::Record))));
                        }
                        std::hint::black_box(&out);
                        n += BATCH as u64;
                    }
                    n
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).sum()
    });
    done as f64 / t.elapsed().as_secs_f64() / 1e6
}

/// Decides `n` requests two-phase on this thread; kept out of line so callgrind can count it
/// alone.
#[inline(never)]
fn counted(e: &greyhound::engine::Engine, w: &Workload, live: u64, n: u64) -> u64 {
    let mut rng = Rng(7);
    let mut out: Vec<Decision> = Vec::with_capacity(BATCH);
    let mut qs: Vec<Query> = Vec::with_capacity(BATCH);
    let mut passed = 0;
    for _ in 0..n.div_ceil(BATCH as u64) {
        qs.clear();
        qs.extend((0..BATCH).map(|_| w.query(pick(&mut rng, live, false))));
        e.check_batch(&qs, Mode::Record, &mut out);
        passed += out
            .iter()
            .filter(|d| matches!(d, Decision::Pass(_)))
            .count() as u64;
    }
    passed
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("count") {
        let arg = |i: usize, d: u64| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(d);
        let (live, n) = (arg(2, 100_000), arg(3, 1_000_000));
        let w = Workload::new();
        let (e, _clock) = engine();
        prefill(&e, &w, live);
        let passed = counted(&e, &w, live, n);
        println!("{n} decisions over {live} live triplets, {passed} passed");
        return;
    }
    let rounds: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(7);
    let w = Workload::new();
    let (e, _clock) = engine();
    prefill(&e, &w, LIVE);
    // Settle: every triplet of the key space asked once.
    let mut out = Vec::new();
    let all: Vec<u64> = (0..1u64 << 24).collect();
    for chunk in all.chunks(BATCH) {
        let qs: Vec<Query> = chunk.iter().map(|&i| w.query(i)).collect();
        e.check_batch(&qs, Mode::Record, &mut out);
    }
    println!("settled: {} live triplets", e.stats().triplets);
    let (mut one, mut two) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        // Alternate which variant goes first.
        let order = if r % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for two_phase in order {
            let m = round(&e, &w, two_phase, r);
            if two_phase {
                two.push(m)
            } else {
                one.push(m)
            }
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "one by one: {:.2?} M/s, median {:.2}",
        one,
        median(&mut one.clone())
    );
    println!(
        "two-phase:  {:.2?} M/s, median {:.2}",
        two,
        median(&mut two.clone())
    );
}
