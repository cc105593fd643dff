//! Statistics of the workload generator: the mix it was asked for is the mix it sends, retries
//! come at the right age, and clients and senders are spread as documented.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use greyhound_loadtest::workload::{self, Generator, Kind, Mix, WorkloadConfig};

fn cfg() -> WorkloadConfig {
    WorkloadConfig {
        mix: Mix {
            new: 0.2,
            early_retry: 0.1,
            retry: 0.15,
            known: 0.55,
        },
        server_delay: 10.0,
        ..WorkloadConfig::default()
    }
}

#[test]
fn kinds_follow_the_mix_once_retries_are_possible() {
    let cfg = cfg();
    let mut g = Generator::new(&cfg, 0);
    // 1000 requests per simulated second for 100 s; the first 10 s cannot hold retries after
    // the delay yet, so only the rest is counted.
    let mut counts: HashMap<Kind, u64> = HashMap::new();
    let n = 100_000u64;
    for i in 0..n {
        let now = i as f64 / 1000.0;
        let (kind, _) = g.next(now);
        if now >= 20.0 {
            *counts.entry(kind).or_default() += 1;
        }
    }
    let total: u64 = counts.values().sum();
    let share = |k| counts.get(&k).copied().unwrap_or(0) as f64 / total as f64;
    // 80,000 draws: one standard deviation of a share near 0.2 is 0.0014; allow ~7.
    for (kind, want) in [
        (Kind::New, 0.2),
        (Kind::EarlyRetry, 0.1),
        (Kind::Retry, 0.15),
        (Kind::Known, 0.55),
    ] {
        assert!(
            (share(kind) - want).abs() < 0.01,
            "{kind:?}: {} (wanted {want}); {counts:?}",
            share(kind)
        );
    }
    assert_eq!(g.counts.total(), n);
}

#[test]
fn retries_come_at_the_right_age_and_new_triplets_never_repeat() {
    let cfg = cfg();
    let mut g = Generator::new(&cfg, 3);
    let mut first_sent: HashMap<u64, f64> = HashMap::new();
    let mut retried: HashSet<u64> = HashSet::new();
    for i in 0..60_000u64 {
        let now = i as f64 / 1000.0;
        let (kind, t) = g.next(now);
        match kind {
            Kind::New => {
                assert!(
                    first_sent.insert(t, now).is_none(),
                    "new triplet {t} repeated"
                );
            }
            Kind::EarlyRetry => {
                let age = now - first_sent[&t];
                assert!(age < cfg.server_delay, "early retry of {t} at age {age}");
            }
            Kind::Retry => {
                let age = now - first_sent[&t];
                assert!(age >= cfg.server_delay, "retry of {t} at age {age}");
                assert!(
                    retried.insert(t),
                    "triplet {t} retried after the delay twice"
                );
            }
            Kind::Known => assert!(!first_sent.contains_key(&t)),
        }
    }
    assert!(!retried.is_empty());
}

#[test]
fn workers_make_disjoint_new_triplets() {
    let cfg = WorkloadConfig {
        mix: Mix {
            new: 1.0,
            early_retry: 0.0,
            retry: 0.0,
            known: 0.0,
        },
        ..WorkloadConfig::default()
    };
    let mut seen = HashSet::new();
    for w in 0..4 {
        let mut g = Generator::new(&cfg, w);
        for _ in 0..10_000 {
            let (kind, t) = g.next(0.0);
            assert_eq!(kind, Kind::New);
            assert!(seen.insert(t));
        }
    }
}

#[test]
fn clients_spread_over_many_networks_of_both_families() {
    let cfg = WorkloadConfig::default();
    let mut v4_nets = HashSet::new();
    let mut v6_nets = HashSet::new();
    let n = 200_000u64;
    for t in 0..n {
        match workload::parts(&cfg, t).client {
            IpAddr::V4(ip) => {
                let o = ip.octets();
                assert_eq!(o[0], 10, "{ip} outside 10.0.0.0/8");
                v4_nets.insert((o[1], o[2]));
            }
            IpAddr::V6(ip) => {
                let s = ip.segments();
                assert_eq!((s[0], s[1]), (0x2001, 0x0db8), "{ip} outside 2001:db8::/32");
                v6_nets.insert((s[2], s[3]));
            }
        }
    }
    let v6 = v6_nets.len() as f64;
    let v4 = v4_nets.len() as f64;
    // 100,000 senders, 10 % on IPv6: ~10,000 senders over 16,384 /64s and ~90,000 over
    // 65,536 /24s; both far beyond what a few networks would give.
    assert!(v4 > 40_000.0, "{v4} /24s");
    assert!(v6 > 5_000.0, "{v6} /64s");
    // The IPv6 share is drawn per sender; among 200,000 triplets of 100,000 senders it is
    // close to 10 %.
    let v6_triplets = (0..n)
        .filter(|&t| workload::parts(&cfg, t).client.is_ipv6())
        .count() as f64
        / n as f64;
    assert!((v6_triplets - 0.1).abs() < 0.01, "{v6_triplets}");
}

#[test]
fn senders_come_in_the_documented_forms() {
    let cfg = WorkloadConfig::default();
    let mut forms: HashMap<&str, u64> = HashMap::new();
    let n = 100_000u64;
    let mut buf = Vec::new();
    for t in 0..n {
        let p = workload::parts(&cfg, t);
        buf.clear();
        workload::write_sender(p.sender, p.tag, &mut buf);
        let s = String::from_utf8(buf.clone()).unwrap();
        let form = if s == "<>" {
            "null"
        } else if s.starts_with("SRS0=") {
            "srs"
        } else if s.starts_with("prvs=") {
            "batv"
        } else if s.contains("-bounces+") {
            "verp"
        } else if s.contains('+') {
            "extension"
        } else {
            "plain"
        };
        *forms.entry(form).or_default() += 1;
    }
    let share = |f| forms.get(f).copied().unwrap_or(0) as f64 / n as f64;
    for (form, want) in [
        ("plain", 18.0 / 32.0),
        ("extension", 3.0 / 32.0),
        ("verp", 4.0 / 32.0),
        ("srs", 2.0 / 32.0),
        ("batv", 3.0 / 32.0),
        ("null", 2.0 / 32.0),
    ] {
        assert!(
            (share(form) - want).abs() < 0.015,
            "{form}: {} (wanted {want:.3}); {forms:?}",
            share(form)
        );
    }
}

#[test]
fn one_sender_keeps_one_network() {
    let cfg = WorkloadConfig::default();
    let mut net_of: HashMap<u32, [u8; 3]> = HashMap::new();
    for t in 0..50_000u64 {
        let p = workload::parts(&cfg, t);
        if let IpAddr::V4(ip) = p.client {
            let o = ip.octets();
            let net = [o[0], o[1], o[2]];
            assert_eq!(*net_of.entry(p.sender).or_insert(net), net);
        }
    }
}
