//! Memory per live triplet (the figure to reach: ≤ 64 bytes at 10 M, wheel included).
//!
//! `cargo run --release --example memory -- [TRIPLETS]` fills the engine through its normal
//! path (raw strings → normalise → hash → DEFER, which inserts and schedules each record) and
//! prints process RSS before and after, divided by the number of live triplets.

#[path = "../benches/common/mod.rs"]
mod common;

use common::{engine, Workload};
use greyhound::engine::{Decision, Mode};

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000_000);
    assert!(n < 1 << 24, "the workload has 2^24 distinct /24s");
    let w = Workload::new();
    let (e, _clock) = engine();
    let before = rss_bytes();
    let start = std::time::Instant::now();
    let mut out = Vec::new();
    let mut queries = Vec::with_capacity(4096);
    let mut i = 0;
    while i < n {
        queries.clear();
        queries.extend((i..(i + 4096).min(n)).map(|j| w.query(j)));
        e.check_batch(&queries, Mode::Record, &mut out);
        assert!(
            out.iter().all(|d| matches!(d, Decision::Defer { .. })),
            "every triplet is new"
        );
        i += queries.len() as u64;
    }
    let fill = start.elapsed();
    let after = rss_bytes();
    let s = e.stats();
    assert_eq!(s.triplets as u64, n);
    println!("live triplets          {n}");
    println!(
        "fill time              {:.2} s ({:.2} M inserts/s, 1 thread, batched)",
        fill.as_secs_f64(),
        n as f64 / fill.as_secs_f64() / 1e6
    );
    println!(
        "RSS before / after     {:.1} MiB / {:.1} MiB",
        before as f64 / 1048576.0,
        after as f64 / 1048576.0
    );
    println!(
        "RSS / triplet          {:.1} bytes (whole process)",
        after as f64 / n as f64
    );
    println!(
        "(RSS - start) / triplet {:.1} bytes",
        (after - before) as f64 / n as f64
    );
    println!("tables + wheels        {:.1} bytes/triplet (slot arrays and wheel keys, no allocator overhead)", s.table_bytes as f64 / n as f64);
}
