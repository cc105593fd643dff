//! Engine decisions per second (the figure to reach: ≥ 10 M/s from raw strings, 10 M live
//! triplets, 2 threads): from raw triplet strings (normalise + hash + decide) and from
//! precomputed keys, at 1 M and 10 M live triplets, 1 and 2 threads, uniform and skewed keys,
//! one by one and batched; beside a naive `Mutex<HashMap>` and a `dashmap` upsert on the same
//! precomputed keys.
//!
//! `cargo bench --bench engine` (all), or e.g. `cargo bench --bench engine -- 10M/raw`.

mod common;

use common::{engine, pick, prefill, run_single, Rng, Workload, NOW};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use greyhound::engine::{Decision, Engine, Keyed, Mode, Query};
use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Requests per batch in the batched variants (a TCP read of 8 connections × 128 pipelined).
const BATCH: usize = 1024;

/// Runs `f(thread_index, iters)` on `threads` threads and returns the wall time.
fn parallel(threads: usize, iters: u64, f: impl Fn(usize, u64) + Sync) -> Duration {
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let f = &f;
            s.spawn(move || f(t, iters));
        }
    });
    start.elapsed()
}

fn raw_batch(e: &Engine, w: &Workload, rng: &mut Rng, live: u64, iters: u64, skewed: bool) {
    let mut out = Vec::with_capacity(BATCH);
    let mut queries: Vec<Query> = Vec::with_capacity(BATCH);
    for _ in 0..iters {
        queries.clear();
        queries.extend((0..BATCH).map(|_| w.query(pick(rng, live, skewed))));
        e.check_batch(&queries, Mode::Record, &mut out);
        black_box(&out);
    }
}

fn keyed_batch(e: &Engine, keys: &[Keyed], fresh: &[Keyed], rng: &mut Rng, iters: u64) {
    let mut out = Vec::with_capacity(BATCH);
    let mut items = Vec::with_capacity(BATCH);
    let live = keys.len() as u64;
    for _ in 0..iters {
        items.clear();
        items.extend((0..BATCH).map(|_| {
            let i = pick(rng, live, false);
            if i < live {
                keys[i as usize]
            } else {
                fresh[(i % fresh.len() as u64) as usize]
            }
        }));
        e.decide_batch(&items, NOW, Mode::Record, &mut out);
        black_box(&out);
    }
}

fn bench_live(c: &mut Criterion, live: u64, label: &str) {
    let w = Workload::new();
    let (e, _clock) = engine();
    let keys = prefill(&e, &w, live);
    // Keys of triplets never seen, for the 5 % new requests of the keyed variant.
    let fresh: Vec<Keyed> = (0..1_000_000u64)
        .map(|i| e.prepare(&w.query(live + i)).unwrap())
        .collect();

    let mut g = c.benchmark_group(label);
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    for threads in [1usize, 2] {
        g.throughput(Throughput::Elements((BATCH * threads) as u64));
        for skewed in [false, true] {
            let dist = if skewed { "skewed" } else { "uniform" };
            g.bench_function(
                BenchmarkId::new(format!("raw/batch/{dist}"), format!("{threads}t")),
                |b| {
                    b.iter_custom(|iters| {
                        parallel(threads, iters, |t, n| {
                            raw_batch(
                                &e,
                                &w,
                                &mut Rng(0x1234_5678 + t as u64 * 7 + n),
                                live,
                                n,
                                skewed,
                            )
                        })
                    })
                },
            );
        }
        g.bench_function(
            BenchmarkId::new("raw/single/uniform", format!("{threads}t")),
            |b| {
                b.iter_custom(|iters| {
                    parallel(threads, iters, |t, n| {
                        black_box(run_single(
                            &e,
                            &w,
                            &mut Rng(0x9876 + t as u64 + n),
                            live,
                            n * BATCH as u64,
                            false,
                        ));
                    })
                })
            },
        );
        g.bench_function(
            BenchmarkId::new("keyed/batch/uniform", format!("{threads}t")),
            |b| {
                b.iter_custom(|iters| {
                    parallel(threads, iters, |t, n| {
                        keyed_batch(&e, &keys, &fresh, &mut Rng(0x4242 + t as u64 + n), n)
                    })
                })
            },
        );
        g.bench_function(
            BenchmarkId::new("keyed/single/uniform", format!("{threads}t")),
            |b| {
                b.iter_custom(|iters| {
                    parallel(threads, iters, |t, n| {
                        let mut rng = Rng(0x777 + t as u64 + n);
                        let mut passed = 0u64;
                        for _ in 0..n * BATCH as u64 {
                            let i = rng.below(keys.len() as u64) as usize;
                            passed += u64::from(matches!(
                                e.decide(&keys[i], NOW, Mode::Record),
                                Decision::Pass(_)
                            ));
                        }
                        black_box(passed);
                    })
                })
            },
        );
    }
    g.finish();
    drop(e);

    // Baselines on the same keys: what a plain map costs for an upsert of a 24-byte record.
    let raw: Vec<u128> = keys.iter().map(|k| k.key.as_u128()).collect();
    drop(keys);
    let mut g = c.benchmark_group(label);
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    let map: Mutex<HashMap<u128, (u32, u32)>> =
        Mutex::new(raw.iter().map(|k| (*k, (NOW, NOW))).collect());
    let dash: dashmap::DashMap<u128, (u32, u32), ahash::RandomState> =
        raw.iter().map(|k| (*k, (NOW, NOW))).collect();
    for threads in [1usize, 2] {
        g.throughput(Throughput::Elements((BATCH * threads) as u64));
        g.bench_function(
            BenchmarkId::new("baseline/mutex-hashmap", format!("{threads}t")),
            |b| {
                b.iter_custom(|iters| {
                    parallel(threads, iters, |t, n| {
                        let mut rng = Rng(0x55 + t as u64 + n);
                        for _ in 0..n * BATCH as u64 {
                            let k = raw[rng.below(raw.len() as u64) as usize];
                            map.lock().unwrap().entry(k).or_insert((NOW, NOW)).1 = NOW;
                        }
                    })
                })
            },
        );
        g.bench_function(
            BenchmarkId::new("baseline/dashmap-upsert", format!("{threads}t")),
            |b| {
                b.iter_custom(|iters| {
                    parallel(threads, iters, |t, n| {
                        let mut rng = Rng(0x66 + t as u64 + n);
                        for _ in 0..n * BATCH as u64 {
                            let k = raw[rng.below(raw.len() as u64) as usize];
                            dash.entry(k).or_insert((NOW, NOW)).1 = NOW;
                        }
                    })
                })
            },
        );
    }
    g.finish();
}

fn engine_1m(c: &mut Criterion) {
    bench_live(c, 1_000_000, "1M");
}

fn engine_10m(c: &mut Criterion) {
    bench_live(c, 10_000_000, "10M");
}

criterion_group!(benches, engine_1m, engine_10m);
criterion_main!(benches);
