//! The cluster batch format (`src/cluster/wire.rs`, `docs/CLUSTER_FORMAT.md`), per record:
//! encoding a batch of 4096 records (3840 triplets, 256 clients) and decoding it — every
//! check of `wire::decode` and every record iterated, as a peer does before merging.
//!
//! `cargo bench --bench cluster` (a few seconds).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use greyhound::cluster::wire::{self, Meta};
use greyhound::engine::{AwlRecord, Key, TripletRecord};
use std::hint::black_box;
use std::time::Duration;

const TRIPLETS: usize = 3840;
const CLIENTS: usize = 256;

fn key(i: usize) -> Key {
    Key::from_u128((i as u128 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835))
}

fn batch(c: &mut Criterion) {
    let now = 90_000_000;
    let triplets: Vec<TripletRecord> = (0..TRIPLETS)
        .map(|i| TripletRecord::from_parts(key(i), now - (i as u32 % 600), now, i % 3 == 0))
        .collect();
    let clients: Vec<AwlRecord> = (0..CLIENTS)
        .map(|i| AwlRecord::from_parts(key(TRIPLETS + i), now, now - 60, 1 + i as u32 % 5))
        .collect();
    let meta = Meta {
        key_id: 0x0123_4567_89ab_cdef,
        created_ms: 1_795_424_602_123,
    };
    let mut bytes = Vec::with_capacity(wire::encoded_len(TRIPLETS, CLIENTS));
    wire::encode(&meta, &triplets, &clients, &mut bytes);

    let mut g = c.benchmark_group("cluster/wire");
    g.throughput(Throughput::Elements((TRIPLETS + CLIENTS) as u64));
    let mut out = Vec::with_capacity(bytes.len());
    g.bench_function(BenchmarkId::new("encode", "4096"), |b| {
        b.iter(|| {
            out.clear();
            wire::encode(&meta, black_box(&triplets), black_box(&clients), &mut out);
            black_box(out.len())
        })
    });
    g.bench_function(BenchmarkId::new("decode", "4096"), |b| {
        b.iter(|| {
            let d = wire::decode(black_box(&bytes)).expect("valid");
            let mut sum = 0u64;
            for r in d.triplets() {
                sum = sum.wrapping_add(u64::from(r.last_seen()));
            }
            for r in d.clients() {
                sum = sum.wrapping_add(u64::from(r.count));
            }
            black_box(sum)
        })
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = batch
}
criterion_main!(benches);
