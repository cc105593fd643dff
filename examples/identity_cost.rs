//! Instructions per decision with client identities, for callgrind (repeatable on a shared
//! machine, where wall-clock ratios are not): prefills LIVE triplets with verified host
//! names (half a provider pool, half generic; see `benches/common`), then decides N requests
//! on one thread in `counted`.
//!
//! `valgrind --tool=callgrind --toggle-collect='*counted*' target/release/examples/identity_cost LIST LIVE N KIND`
//! with LIST a `client-identity` list (`prefix`, `name,prefix`, `spf,prefix`: with `spf`, every
//! request passed SPF for its sender's domain) and KIND `mix` (the benches' 95 % existing
//! triplets) or `unknown` (triplets never seen). Instructions per decision =
//! Ir / N.

#[path = "../benches/common/mod.rs"]
mod common;

use common::{client_name, pick, Rng, Workload, NOW};
use greyhound::engine::{
    Engine, EngineConfig, HashSecret, Identities, ManualClock, Mode, Normalizer, Policy, Query,
    TripletRecord,
};
use std::hint::black_box;
use std::sync::Arc;

#[inline(never)]
fn counted(e: &Engine, qs: &[Query<'_>]) -> usize {
    let mut out = Vec::with_capacity(1024);
    let mut passed = 0;
    for chunk in qs.chunks(1024) {
        e.check_batch(chunk, Mode::Record, &mut out);
        passed += out
            .iter()
            .filter(|d| matches!(d, greyhound::engine::Decision::Pass(_)))
            .count();
    }
    passed
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let list = args.get(1).map_or("name,prefix", String::as_str);
    let live: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let n: u64 = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(200_000);
    let unknown = args.get(4).is_some_and(|k| k == "unknown");
    let e = Engine::new(
        EngineConfig {
            policy: Policy::default(),
            normalizer: Normalizer::default(),
            secret: HashSecret(*b"bench-secret-key"),
        },
        Arc::new(ManualClock::new(NOW)),
    )
    .with_identities(Identities::parse(list).expect("a client-identity list"));
    let w = Workload::new();
    let names: Vec<String> = (0..1u64 << 20)
        .map(|i| client_name(i, w.query(i).client))
        .collect();
    // With `spf` in the list, every request passed SPF for its sender's domain (as the server
    // says once the result is cached): the identity's cost without any DNS.
    let with_spf = list.contains("spf");
    let query = |i: u64| {
        let q = w.query(i);
        Query {
            client_name: Some(names[(i % names.len() as u64) as usize].as_str()),
            spf: if with_spf {
                q.sender.rsplit_once('@').map(|(_, d)| d)
            } else {
                None
            },
            ..q
        }
    };
    for i in 0..live {
        let k = e.prepare(&query(i)).expect("not exempt");
        let r = match i % 8 {
            0 => TripletRecord::from_parts(k.key, NOW - 600, NOW - 600, false),
            1 => TripletRecord::from_parts(k.key, NOW - 60, NOW - 60, false),
            _ => TripletRecord::from_parts(k.key, NOW - 86_400, NOW - 3600, true),
        };
        e.load_triplets([r], NOW);
    }
    let mut rng = Rng(0x5eed);
    let qs: Vec<Query> = (0..n)
        .map(|_| {
            let i = if unknown {
                live + rng.below((1 << 20) - live)
            } else {
                pick(&mut rng, live, false) % (1 << 20)
            };
            query(i)
        })
        .collect();
    let passed = counted(&e, &qs);
    println!("{list}: {passed} of {n} passed");
    black_box(passed);
}
