//! Per-domain policy (`domain-policy`) at scale: how long a file of N domains takes to load and
//! what a lookup costs (DESIGN §11: "millions of lines must load in seconds and cost little per
//! lookup").
//!
//! `cargo run --release --example domain_policy -- [DOMAINS]` (default 1 000 000) generates a
//! file of that many lines (one in ten a `.suffix`, settings mixed), loads it as the server does
//! (read from disk, parsed, checked, frozen) and times lookups: an exact name, a name under a
//! listed suffix (two parent probes), and a miss (every parent probed, none listed).

use std::fmt::Write as _;
use std::hint::black_box;
use std::time::Instant;

use greyhound::engine::exempt::Exemptions;
use greyhound::engine::Policy;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    let n: u32 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let mut text = String::with_capacity(n as usize * 40);
    for i in 0..n {
        let setting = match i % 4 {
            0 => "off",
            1 => "delay=1m",
            2 => "dry-run",
            _ => "whitelist-ttl=7d retry-window=1d",
        };
        let dot = if i % 10 == 0 { "." } else { "" };
        writeln!(text, "{dot}mail-{i}.customer.example {setting}").unwrap();
    }
    let path = std::env::temp_dir().join(format!("greyhound-domains-{}", std::process::id()));
    std::fs::write(&path, &text).unwrap();
    let bytes = text.len();
    drop(text);

    let before = rss_kib();
    let t = Instant::now();
    let mut b = Exemptions::builder();
    b.load_domain_policy(&path, &Policy::default()).unwrap();
    let ex = b.build();
    let load = t.elapsed();
    let after = rss_kib();
    std::fs::remove_file(&path).ok();
    assert_eq!(ex.counts().domains, n as usize);
    println!(
        "{n} domains ({:.1} MB file): loaded in {:.2} s, {:.0} MB resident after load ({} B per entry)",
        bytes as f64 / 1e6,
        load.as_secs_f64(),
        after.saturating_sub(before) as f64 / 1024.0,
        after.saturating_sub(before) * 1024 / u64::from(n.max(1)),
    );

    // Names are prepared up front so that only the lookup is timed.
    const LOOKUPS: u32 = 2_000_000;
    let pick = |k: u32| (k.wrapping_mul(2_654_435_761) % n) | 1; // odd: an exact entry
    let exact: Vec<String> = (0..LOOKUPS)
        .map(|k| format!("mail-{}.customer.example", pick(k)))
        .collect();
    let suffix: Vec<String> = (0..LOOKUPS)
        .map(|k| format!("mx.a.mail-{}.customer.example", (pick(k) / 10) * 10))
        .collect();
    let miss: Vec<String> = (0..LOOKUPS)
        .map(|k| format!("mx.mail-{}.other.example", pick(k)))
        .collect();
    for (what, names) in [
        ("exact hit", &exact),
        ("suffix hit (2 parents)", &suffix),
        ("miss (4 parents)", &miss),
    ] {
        let t = Instant::now();
        let mut found = 0u32;
        for name in names {
            found += u32::from(black_box(ex.domain_rule(black_box(name))).is_some());
        }
        let ns = t.elapsed().as_nanos() as f64 / f64::from(LOOKUPS);
        println!("lookup, {what}: {ns:.0} ns ({found} of {LOOKUPS} found)");
    }
}
