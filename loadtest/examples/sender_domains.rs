//! Prints the distinct domains of the load generator's senders `0..N` (`--senders N`), one per
//! line: `loadtest/bench-spf.sh` gives each an SPF record in its private DNS server.
//!
//! `cargo run --release -p greyhound-loadtest --example sender_domains -- N`

use std::collections::BTreeSet;

fn main() {
    let n: u32 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1000);
    let mut domains = BTreeSet::new();
    let mut out = Vec::new();
    for s in 0..n {
        // The tag only changes the local part.
        out.clear();
        greyhound_loadtest::workload::write_sender(s, 0, &mut out);
        let text = String::from_utf8_lossy(&out);
        if let Some((_, d)) = text.rsplit_once('@') {
            domains.insert(d.to_ascii_lowercase());
        }
    }
    for d in domains {
        println!("{d}");
    }
}
