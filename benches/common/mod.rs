//! Workload shared by the engine bench and the examples: `n` distinct triplets made of raw
//! strings, a prefilled engine, and a fast deterministic random source.
#![allow(dead_code)]

use greyhound::engine::{
    Engine, EngineConfig, HashSecret, Keyed, ManualClock, Mode, Normalizer, Policy, Query,
    TripletRecord,
};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

/// Engine time the benches run at.
pub const NOW: u32 = 100_000_000;

/// Raw strings: triplet `i` is (a /24 picked by `i`, sender `i % 1000`, recipient `i / 1000 % 1000`).
pub struct Workload {
    senders: Vec<String>,
    recipients: Vec<String>,
}

impl Workload {
    pub fn new() -> Self {
        // Realistic shapes, several of which the normaliser rewrites.
        let senders = (0..1000)
            .map(|i| match i % 4 {
                0 => format!("newsletter-{i}@lists.example{i}.com"),
                1 => format!("bounces+{}-{i}=example.net@sender{i}.example.org", i * 7919),
                2 => format!("John.Smith{i}@Example{i}.net"),
                _ => format!("prvs=1234abcdef=user{i}@corp{i}.example"),
            })
            .collect();
        let recipients = (0..1000)
            .map(|i| format!("user{i}@isp{}.example", i % 50))
            .collect();
        Self {
            senders,
            recipients,
        }
    }

    /// Triplet `i` (i < 2^24) as a query.
    #[inline]
    pub fn query(&self, i: u64) -> Query<'_> {
        // A bijection on 24 bits spreads consecutive i over unrelated /24s.
        let net = ((i as u32).wrapping_mul(0x9E_3779) & 0x00FF_FFFF) << 8;
        Query::new(
            IpAddr::V4(Ipv4Addr::from(net | 0x21)),
            &self.senders[(i % 1000) as usize],
            &self.recipients[(i / 1000 % 1000) as usize],
        )
    }
}

/// Verified host names for [`Workload::query`]'s clients, for the identity benches: half are
/// a provider's pool (`mail-<n>.sender<k>.example`, whose `name` identity is
/// `sender<k>.example`), half spell the client's address (`a-b-c-d.dyn.isp.example`, generic,
/// so keyed by the prefix): both paths of the `name` identity are exercised.
pub fn client_name(i: u64, client: IpAddr) -> String {
    match client {
        IpAddr::V4(v4) if i % 2 == 1 => {
            let [a, b, c, d] = v4.octets();
            format!("{a}-{b}-{c}-{d}.dyn.isp{}.example", i % 50)
        }
        _ => format!("mail-{}.sender{}.example", i % 977, i % 1000),
    }
}

pub fn engine() -> (Engine, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(NOW));
    let cfg = EngineConfig {
        policy: Policy::default(),
        normalizer: Normalizer::default(),
        secret: HashSecret(*b"bench-secret-key"),
    };
    (Engine::new(cfg, clock.clone()), clock)
}

/// Fills `live` triplets: three quarters whitelisted (known senders), one eighth greylisted
/// long enough ago to pass on retry, one eighth greylisted a minute ago (early retries).
/// Returns their keys, in the same order as `Workload::query(i)`.
pub fn prefill(e: &Engine, w: &Workload, live: u64) -> Vec<Keyed> {
    let mut keys = Vec::with_capacity(live as usize);
    for i in 0..live {
        let k = e
            .prepare(&w.query(i))
            .expect("bench triplets are not exempt");
        let r = match i % 8 {
            0 => TripletRecord::from_parts(k.key, NOW - 600, NOW - 600, false),
            1 => TripletRecord::from_parts(k.key, NOW - 60, NOW - 60, false),
            _ => TripletRecord::from_parts(k.key, NOW - 86_400, NOW - 3600, true),
        };
        e.load_triplets([r], NOW);
        keys.push(k);
    }
    keys
}

/// xorshift64*: cheap enough not to show in the figures.
pub struct Rng(pub u64);

impl Rng {
    #[inline]
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, n).
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }

    /// Skewed (Zipf-like) in [0, n): index = n·u⁴, so the first 1 % of triplets get ~32 % of requests.
    #[inline]
    pub fn skewed(&mut self, n: u64) -> u64 {
        let u = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        ((u * u * u * u) * n as f64) as u64
    }
}

/// One request of the mixed workload: 95 % existing triplets (by their prefilled state: known,
/// retry after the delay, early retry), 5 % never seen before.
#[inline]
pub fn pick(rng: &mut Rng, live: u64, skewed: bool) -> u64 {
    if rng.below(20) == 0 {
        // New triplets come from above the live range (and below 2^24 distinct /24s).
        live + rng.below((1 << 24) - live)
    } else if skewed {
        rng.skewed(live)
    } else {
        rng.below(live)
    }
}

/// Decides `n` mixed requests one by one; returns how many passed (so work is not optimised away).
pub fn run_single(e: &Engine, w: &Workload, rng: &mut Rng, live: u64, n: u64, skewed: bool) -> u64 {
    let mut passed = 0;
    for _ in 0..n {
        let q = w.query(pick(rng, live, skewed));
        passed += u64::from(matches!(
            e.check(&q, Mode::Record),
            greyhound::engine::Decision::Pass(_)
        ));
    }
    passed
}
