//! Two-phase batches, with and without prefetch, against one-by-one decisions, measured
//! fairly: the engine bench's 10 M prefilled triplets, then one settling pass over the whole
//! key space (the first seconds after a prefill whitelist retries, fill the auto-whitelist and
//! grow tables, which would favour whichever variant runs later), then 1 s rounds rotating
//! the three variants on 2 threads, batches of 1024 requests of the bench's mix. Besides
//! decisions per wall second it prints decisions per CPU second (× 2 threads), which leaves
//! out the time other programs held the cores of a shared machine.
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
use greyhound::engine::{Decision, Engine, Mode, Pass, Query, DECIDE_GROUP};
use std::time::{Duration, Instant};

const BATCH: usize = 1024;
const LIVE: u64 = 10_000_000;

/// CPU seconds this process has used (user + system), from `/proc/self/stat`, in ticks of
/// 10 ms; 0 where that file does not exist.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime and stime are 14 and 15.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let ticks: u64 = after
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse::<u64>().ok())
        .sum();
    ticks as f64 / 100.0
}

/// One 1 s round on 2 threads: (M decisions per wall second, M decisions per CPU second × 2).
/// The second figure leaves out the time other programs of a shared machine held the cores.
/// The ways of deciding a batch that are compared.
#[derive(Clone, Copy, PartialEq)]
enum Variant {
    /// `Batch::check` on each query.
    OneByOne,
    /// Groups of `DECIDE_GROUP`: `Batch::prepare` on each, then `Batch::decide` on each.
    TwoPhase,
    /// The same with `Batch::prefetch` after each preparation: `Engine::check_batch`.
    Prefetch,
}

fn two_phase_without_prefetch(e: &Engine, qs: &[Query], out: &mut Vec<Decision>) {
    out.clear();
    let mut keyed = [Err(Decision::Pass(Pass::Auth)); DECIDE_GROUP];
    e.batch(|b| {
        for group in qs.chunks(DECIDE_GROUP) {
            for (slot, q) in keyed.iter_mut().zip(group) {
                *slot = b.prepare(q);
            }
            out.extend(keyed[..group.len()].iter().map(|k| match k {
                Ok(k) => b.decide(k, Mode::Record),
                Err(d) => *d,
            }));
        }
    });
}

fn round(e: &Engine, w: &Workload, variant: Variant, seed: u64) -> (f64, f64) {
    let cpu = cpu_seconds();
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
                        match variant {
                            Variant::Prefetch => e.check_batch(&qs, Mode::Record, &mut out),
                            Variant::TwoPhase => two_phase_without_prefetch(e, &qs, &mut out),
                            Variant::OneByOne => {
                                out.clear();
                                e.batch(|b| {
                                    out.extend(qs.iter().map(|q| b.check(q, Mode::Record)))
                                });
                            }
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
    let wall = t.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu;
    (done as f64 / wall / 1e6, done as f64 * 2.0 / cpu / 1e6)
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
    let variants = [
        ("one by one", Variant::OneByOne),
        ("two-phase", Variant::TwoPhase),
        ("two-phase + prefetch", Variant::Prefetch),
    ];
    let mut wall = vec![Vec::new(); variants.len()];
    let mut cpu = vec![Vec::new(); variants.len()];
    for r in 0..rounds {
        // Rotate which variant goes first.
        for v in 0..variants.len() {
            let v = (v + r as usize) % variants.len();
            let (m, c) = round(&e, &w, variants[v].1, r);
            wall[v].push(m);
            cpu[v].push(c);
        }
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    for (v, (name, _)) in variants.iter().enumerate() {
        println!(
            "{name:>20}: {:.2?} M/s, median {:.2}; per CPU second x 2: median {:.2}",
            wall[v],
            median(&wall[v]),
            median(&cpu[v])
        );
    }
}
