//! Snapshots, per record: writing an engine's records into a snapshot file and loading them
//! back into an empty engine, at 100 k and 1 M triplets (plus one auto-whitelist record per 16
//! triplets); and the format alone, encoding and verifying + decoding in memory, to tell the
//! format's share from the engine's and the file system's.
//!
//! Files go to a fresh temporary directory. Writing includes what a real snapshot does: the
//! walk of every shard under its lock, encoding, the body checksum, the writes, `fsync` of
//! the file and of the directory, rotation. Loading includes the memory map, the checks and
//! inserting every record into an empty engine on 2 threads (each timed run gets a new engine,
//! made and dropped outside the timing).
//!
//! `cargo bench --bench snapshot` (all, < 1 min), or e.g. `cargo bench --bench snapshot -- load`.

mod common;

use common::{engine, prefill, Workload, NOW};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use greyhound::engine::{AwlRecord, Engine, Key, TripletRecord};
use greyhound::snapshot::{self, format, DirStore, Writer};
use std::hint::black_box;
use std::time::{Duration, Instant};

/// Loader threads: this machine's cores, as the server uses.
const LOAD_THREADS: usize = 2;

/// An engine holding `n` triplets (the engine bench's mix of states) and `n / 16` clients.
fn filled(w: &Workload, n: u64) -> Engine {
    let (e, _clock) = engine();
    prefill(&e, w, n);
    e.load_clients(
        (0..n / 16).map(|i| {
            AwlRecord::from_parts(
                Key::from_u128(
                    u128::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835) | 1,
                ),
                NOW - 60,
                NOW - 3600,
                3,
            )
        }),
        NOW,
    );
    e
}

fn write_and_load(c: &mut Criterion) {
    let w = Workload::new();
    for (n, label) in [(100_000u64, "100k"), (1_000_000, "1M")] {
        let e = filled(&w, n);
        let records = n + n / 16;
        let dir = tempfile::tempdir().expect("temporary directory");
        let store = DirStore::new(dir.path());
        let mut writer = Writer::new(store.clone()).expect("writer");

        let mut g = c.benchmark_group("snapshot");
        g.throughput(Throughput::Elements(records));
        g.bench_function(BenchmarkId::new("write", label), |b| {
            b.iter(|| {
                let written = writer.write(&e).expect("snapshot written");
                assert_eq!(written.triplets + written.clients, records);
            })
        });
        // The writer keeps the two newest snapshots; `load` takes the newest.
        g.bench_function(BenchmarkId::new("load", label), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let (fresh, _clock) = engine();
                    let t = Instant::now();
                    let loaded = snapshot::load(&store, &fresh, LOAD_THREADS).expect("loaded");
                    total += t.elapsed();
                    assert_eq!((loaded.triplets + loaded.clients) as u64, records);
                    drop(fresh);
                }
                total
            })
        });
        g.finish();
    }
}

fn format_only(c: &mut Criterion) {
    const N: u64 = 1_000_000;
    let w = Workload::new();
    let e = filled(&w, N);
    let mut triplets: Vec<TripletRecord> = Vec::with_capacity(N as usize);
    e.for_each_triplet_shard(|it| triplets.extend(it.copied()));
    let mut clients: Vec<AwlRecord> = Vec::new();
    e.for_each_client_shard(|it| clients.extend(it.copied()));
    drop(e);
    let records = (triplets.len() + clients.len()) as u64;

    // A whole file in memory, as the writer lays it out.
    let encode = |out: &mut Vec<u8>| {
        out.clear();
        out.extend_from_slice(&[0; format::HEADER_LEN]);
        for r in &triplets {
            format::encode_triplet(r, out);
        }
        for r in &clients {
            format::encode_awl(r, out);
        }
        let section = out.len();
        format::encode_cluster(&Default::default(), out).expect("an empty cluster state");
        let cluster_len = (out.len() - section) as u32;
        let header = format::Header {
            version: format::VERSION,
            created_unix: 1_795_424_602,
            generation: 1,
            key_id: 7,
            ipv4_prefix: 24,
            ipv6_prefix: 64,
            normalization: format::NORMALIZATION,
            triplets: triplets.len() as u64,
            clients: clients.len() as u64,
            policy: Default::default(),
            body_crc: crc32c::crc32c(&out[format::HEADER_LEN..]),
            cluster_len,
        };
        out[..format::HEADER_LEN].copy_from_slice(&header.encode());
    };
    let mut file = Vec::with_capacity(format::HEADER_LEN + records as usize * format::AWL_LEN);
    encode(&mut file);

    let mut g = c.benchmark_group("snapshot/format");
    g.throughput(Throughput::Elements(records));
    let mut out = Vec::with_capacity(file.len());
    g.bench_function(BenchmarkId::new("encode+crc", "1M"), |b| {
        b.iter(|| {
            encode(&mut out);
            black_box(out.len())
        })
    });
    g.bench_function(BenchmarkId::new("verify+decode", "1M"), |b| {
        b.iter(|| {
            let view = format::verify(black_box(&file)).expect("valid");
            let mut sum = 0u64;
            for r in view.triplets() {
                sum = sum.wrapping_add(u64::from(r.last_seen()));
            }
            for r in view.clients() {
                sum = sum.wrapping_add(u64::from(r.count));
            }
            black_box(sum)
        })
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = benches;
    config = config();
    targets = write_and_load, format_only
}
criterion_main!(benches);
