//! What client identities (`client-identity`, DESIGN §11) cost the engine: decisions per
//! second with `name,prefix` against `prefix` only, on the same requests (each with a
//! verified host name: half a provider's pool, half generic names that fall back to the
//! prefix), 1 M live triplets, 2 threads; for the usual mix (95 % existing triplets) and for
//! unknown triplets only, which pay one more table lookup per extra identity.
//!
//! `cargo bench --bench identity`.

mod common;

use common::{client_name, pick, Rng, Workload, NOW};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use greyhound::engine::{
    Engine, EngineConfig, HashSecret, Identities, ManualClock, Mode, Normalizer, Policy, Query,
};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

const BATCH: usize = 1024;
const LIVE: u64 = 1_000_000;

fn engine(identities: &str) -> Engine {
    let cfg = EngineConfig {
        policy: Policy::default(),
        normalizer: Normalizer::default(),
        secret: HashSecret(*b"bench-secret-key"),
    };
    Engine::new(cfg, Arc::new(ManualClock::new(NOW)))
        .with_identities(Identities::parse(identities).expect("valid list"))
}

/// Runs `iters` batches on each of 2 threads; `unknown`: only triplets never seen.
fn run(e: &Engine, w: &Workload, names: &[String], iters: u64, unknown: bool) -> Duration {
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..2u64 {
            s.spawn(move || {
                let mut rng = Rng(0xabcd + t * 31 + iters);
                let mut out = Vec::with_capacity(BATCH);
                let mut qs: Vec<Query> = Vec::with_capacity(BATCH);
                for _ in 0..iters {
                    qs.clear();
                    qs.extend((0..BATCH).map(|_| {
                        let i = if unknown {
                            LIVE + rng.below((1 << 24) - LIVE)
                        } else {
                            pick(&mut rng, LIVE, false)
                        };
                        Query {
                            client_name: Some(names[(i % names.len() as u64) as usize].as_str()),
                            ..w.query(i)
                        }
                    }));
                    e.check_batch(&qs, Mode::Record, &mut out);
                    black_box(&out);
                }
            });
        }
    });
    start.elapsed()
}

fn identities(c: &mut Criterion) {
    let w = Workload::new();
    // Names are looked up by `i % len`: with len a multiple of 2 and coprime to the rest the
    // generic half still spells the request's own address for the prefilled triplets.
    let names: Vec<String> = (0..LIVE)
        .map(|i| client_name(i, w.query(i).client))
        .collect();
    let mut g = c.benchmark_group("identity");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .throughput(Throughput::Elements(2 * BATCH as u64));
    for list in ["prefix", "name,prefix"] {
        let e = engine(list);
        // Prefilled through the engine's own keys, so the live records are under the first
        // identity that applies, as a running server would have made them.
        prefill_named(&e, &w, &names);
        for unknown in [false, true] {
            let label = if unknown { "unknown" } else { "mix" };
            g.bench_function(BenchmarkId::new(label, list), |b| {
                b.iter_custom(|iters| run(&e, &w, &names, iters, unknown))
            });
        }
    }
    g.finish();
}

/// Like `common::prefill`, with each triplet's client name.
fn prefill_named(e: &Engine, w: &Workload, names: &[String]) {
    for i in 0..LIVE {
        let q = Query {
            client_name: Some(names[i as usize].as_str()),
            ..w.query(i)
        };
        let k = e.prepare(&q).expect("bench triplets are not exempt");
        let r = match i % 8 {
            0 => greyhound::engine::TripletRecord::from_parts(k.key, NOW - 600, NOW - 600, false),
            1 => greyhound::engine::TripletRecord::from_parts(k.key, NOW - 60, NOW - 60, false),
            _ => {
                greyhound::engine::TripletRecord::from_parts(k.key, NOW - 86_400, NOW - 3600, true)
            }
        };
        e.load_triplets([r], NOW);
    }
}

criterion_group!(benches, identities);
criterion_main!(benches);
