//! Engine tests: every greylisting rule at its boundaries, the auto-whitelist, exemptions,
//! expiry, threads, and a model check against a plain `BTreeMap`.

use super::*;
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

const T0: Secs = 100_000_000;
const DAY: u32 = 86_400;

fn engine_with(policy: Policy) -> (Engine, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(T0));
    let cfg = EngineConfig {
        policy,
        normalizer: Normalizer::default(),
        secret: HashSecret(*b"test-secret-0001"),
    };
    (Engine::new(cfg, clock.clone()), clock)
}

fn engine() -> (Engine, Arc<ManualClock>) {
    engine_with(Policy::default())
}

fn ip(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

fn check(e: &Engine, client: IpAddr, from: &str, to: &str) -> Decision {
    e.check(&Query::new(client, from, to), Mode::Record)
}

fn defer(n: u32) -> Decision {
    Decision::Defer { seconds_left: n }
}

const KNOWN: Decision = Decision::Pass(Pass::Known);

fn retried(n: u32) -> Decision {
    Decision::Pass(Pass::Retried { delayed: n })
}

const C: fn() -> IpAddr = || ip(192, 0, 2, 10);

#[test]
fn first_sight_defers_for_the_whole_delay() {
    let (e, _) = engine();
    assert_eq!(
        check(&e, C(), "alice@example.org", "bob@example.net"),
        defer(300)
    );
    assert_eq!(e.stats().triplets, 1);
}

#[test]
fn delay_boundaries_and_early_retries_do_not_reset() {
    let (e, clock) = engine();
    assert_eq!(check(&e, C(), "a@x.org", "b@y.net"), defer(300));
    clock.advance(100);
    assert_eq!(check(&e, C(), "a@x.org", "b@y.net"), defer(200));
    clock.advance(199); // delay - 1
    assert_eq!(check(&e, C(), "a@x.org", "b@y.net"), defer(1));
    clock.advance(1); // exactly delay
    assert_eq!(check(&e, C(), "a@x.org", "b@y.net"), retried(300));
    clock.advance(1);
    assert_eq!(check(&e, C(), "a@x.org", "b@y.net"), KNOWN);
    assert_eq!(e.stats().whitelisted, 1);
}

#[test]
fn delay_plus_one_passes_with_the_real_wait() {
    let (e, clock) = engine();
    check(&e, C(), "a@x.org", "b@y.net");
    clock.advance(301);
    assert_eq!(check(&e, C(), "a@x.org", "b@y.net"), retried(301));
}

#[test]
fn retry_window_boundaries() {
    let p = Policy::default();
    for (offset, expected) in [
        (p.retry_window - 1, retried(p.retry_window - 1)),
        (p.retry_window, retried(p.retry_window)),
        (p.retry_window + 1, defer(300)),
    ] {
        let (e, clock) = engine();
        check(&e, C(), "a@x.org", "b@y.net");
        clock.advance(offset);
        assert_eq!(
            check(&e, C(), "a@x.org", "b@y.net"),
            expected,
            "offset {offset}"
        );
    }
    // Too late starts a new cycle: the next retry after the delay passes.
    let (e, clock) = engine();
    check(&e, C(), "a@x.org", "b@y.net");
    clock.advance(p.retry_window + 1);
    assert_eq!(check(&e, C(), "a@x.org", "b@y.net"), defer(300));
    clock.advance(299);
    assert_eq!(check(&e, C(), "a@x.org", "b@y.net"), defer(1));
    clock.advance(1);
    assert_eq!(check(&e, C(), "a@x.org", "b@y.net"), retried(300));
}

#[test]
fn whitelist_ttl_boundaries_and_refresh() {
    let ttl = Policy::default().whitelist_ttl;
    for (offset, expected) in [(ttl - 1, KNOWN), (ttl, KNOWN), (ttl + 1, defer(300))] {
        let (e, clock) = engine();
        check(&e, C(), "a@x.org", "b@y.net");
        clock.advance(300);
        assert_eq!(check(&e, C(), "a@x.org", "b@y.net"), retried(300));
        clock.advance(offset);
        assert_eq!(
            check(&e, C(), "a@x.org", "b@y.net"),
            expected,
            "offset {offset}"
        );
    }
    // Each pass pushes the whitelist out again.
    let (e, clock) = engine();
    check(&e, C(), "a@x.org", "b@y.net");
    clock.advance(300);
    check(&e, C(), "a@x.org", "b@y.net");
    for _ in 0..3 {
        clock.advance(ttl - 10);
        assert_eq!(check(&e, C(), "a@x.org", "b@y.net"), KNOWN);
    }
}

#[test]
fn peek_decides_without_recording() {
    let (e, clock) = engine();
    let q = Query::new(C(), "a@x.org", "b@y.net");
    assert_eq!(e.check(&q, Mode::Peek), defer(300));
    assert_eq!(e.stats().triplets, 0);
    e.check(&q, Mode::Record);
    clock.advance(300);
    assert_eq!(e.check(&q, Mode::Peek), retried(300));
    // Still greylisted: the peek did not whitelist it.
    assert_eq!(e.stats().whitelisted, 0);
    assert_eq!(e.check(&q, Mode::Record), retried(300));
    assert_eq!(e.check(&q, Mode::Peek), KNOWN);
}

#[test]
fn triplet_parts_are_normalised() {
    let (e, clock) = engine();
    check(
        &e,
        ip(192, 0, 2, 10),
        "list-bounces+alice=example.org@lists.example.com",
        "Bob@Example.NET",
    );
    clock.advance(300);
    // Another host in the same /24, another VERP address of the same list, other case.
    assert_eq!(
        check(
            &e,
            ip(192, 0, 2, 99),
            "LIST-BOUNCES+carol=example.com@lists.example.com",
            "bob@example.net"
        ),
        retried(300)
    );
    // A different /24 is a different triplet.
    assert_eq!(
        check(
            &e,
            ip(192, 0, 3, 10),
            "list-bounces+alice=example.org@lists.example.com",
            "bob@example.net"
        ),
        defer(300)
    );
    // The null sender is its own sender, in either spelling.
    assert_eq!(check(&e, C(), "", "bob@example.net"), defer(300));
    clock.advance(300);
    assert_eq!(check(&e, C(), "<>", "bob@example.net"), retried(300));
}

#[test]
fn ipv6_and_mapped_ipv4_clients() {
    let (e, clock) = engine();
    let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
    let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
    let mapped: IpAddr = "::ffff:192.0.2.200".parse().unwrap();
    check(&e, a, "a@x.org", "b@y.net");
    check(&e, mapped, "a@x.org", "b@y.net");
    clock.advance(300);
    assert_eq!(check(&e, b, "a@x.org", "b@y.net"), retried(300));
    assert_eq!(check(&e, C(), "a@x.org", "b@y.net"), retried(300));
}

/// Passes one new triplet of `client` (first sight, then retry after the delay).
#[test]
fn prefetch_hints_follow_every_growth() {
    let (e, _clock) = engine();
    let mut out = Vec::new();
    let senders: Vec<String> = (0..5000).map(|i| format!("s{i}@example.org")).collect();
    let queries: Vec<Query> = senders
        .iter()
        .map(|s| Query::new(ip(192, 0, 2, 1), s, "rcpt@example.net"))
        .collect();
    e.check_batch(&queries, Mode::Record, &mut out);
    let current = |e: &Engine| {
        e.triplets
            .iter()
            .zip(e.triplet_hints.iter())
            .all(|(sh, hint)| hint.is_current(&lock(sh).table))
    };
    assert!(current(&e), "after inserts by decisions");
    e.reserve(100_000, 0);
    assert!(current(&e), "after reserve");
    let (f, _clock) = engine();
    let mut records = Vec::new();
    e.for_each_triplet_shard(|rs| records.extend(rs.copied()));
    assert_eq!(f.load_triplets(records, _clock.now()), 5000);
    assert!(current(&f), "after loading");
}

fn pass_one(e: &Engine, clock: &ManualClock, client: IpAddr, n: usize) -> Decision {
    let rcpt = format!("user{n}@example.net");
    let first = check(e, client, "sender@example.org", &rcpt);
    if first != defer(300) {
        return first;
    }
    clock.advance(300);
    check(e, client, "sender@example.org", &rcpt)
}

#[test]
fn awl_after_enough_counted_passes() {
    let (e, clock) = engine();
    let client = ip(198, 51, 100, 7);
    for n in 0..5 {
        assert_eq!(pass_one(&e, &clock, client, n), retried(300), "pass {n}");
        clock.advance(3600);
    }
    // Five counted passes: a brand-new triplet of this client passes at once.
    assert_eq!(
        check(&e, client, "other@example.org", "new@example.net"),
        Decision::Pass(Pass::Awl)
    );
    assert_eq!(e.stats().awl_active, 1);
    // Another client in another /24 is not affected.
    assert_eq!(
        check(
            &e,
            ip(198, 51, 101, 7),
            "other@example.org",
            "new@example.net"
        ),
        defer(300)
    );
}

#[test]
fn awl_counts_at_most_one_pass_per_interval() {
    let (e, clock) = engine();
    let client = ip(198, 51, 100, 7);
    // Four passes in quick succession count once; then three more spaced by the interval.
    for n in 0..4 {
        assert_eq!(pass_one(&e, &clock, client, n), retried(300));
    }
    for n in 10..13 {
        clock.advance(3600);
        assert_eq!(pass_one(&e, &clock, client, n), retried(300));
    }
    // 1 + 3 = 4 counted: not yet.
    assert_eq!(
        check(&e, client, "x@example.org", "y@example.net"),
        defer(300)
    );
    // Just under the interval since the last counted pass: still not counted.
    clock.advance(3600 - 301);
    assert_eq!(pass_one(&e, &clock, client, 20), retried(300));
    assert_eq!(
        check(&e, client, "x2@example.org", "y@example.net"),
        defer(300)
    );
    // At the interval: counted, the fifth.
    clock.advance(1);
    assert_eq!(pass_one(&e, &clock, client, 21), retried(300));
    assert_eq!(
        check(&e, client, "x3@example.org", "y@example.net"),
        Decision::Pass(Pass::Awl)
    );
}

#[test]
fn awl_off_and_awl_expiry() {
    let (e, clock) = engine_with(Policy {
        awl_clients: 0,
        ..Policy::default()
    });
    let client = ip(203, 0, 113, 1);
    for n in 0..8 {
        pass_one(&e, &clock, client, n);
        clock.advance(3600);
    }
    assert_eq!(
        check(&e, client, "z@example.org", "w@example.net"),
        defer(300)
    );
    assert_eq!(e.stats().awl_clients, 0);

    let p = Policy {
        awl_clients: 1,
        ..Policy::default()
    };
    let (e, clock) = engine_with(p);
    pass_one(&e, &clock, client, 0);
    clock.advance(p.awl_ttl);
    assert_eq!(
        check(&e, client, "a1@example.org", "w@example.net"),
        Decision::Pass(Pass::Awl)
    );
    // The hit refreshed the entry: a full TTL from now it still holds, one second more it does not.
    clock.advance(p.awl_ttl);
    assert_eq!(
        check(&e, client, "a2@example.org", "w@example.net"),
        Decision::Pass(Pass::Awl)
    );
    clock.advance(p.awl_ttl + 1);
    assert_eq!(
        check(&e, client, "a3@example.org", "w@example.net"),
        defer(300)
    );
}

#[test]
fn dry_run_answers_pass_but_records() {
    let (e, clock) = engine_with(Policy {
        dry_run: true,
        ..Policy::default()
    });
    assert_eq!(
        check(&e, C(), "a@x.org", "b@y.net"),
        Decision::Pass(Pass::DryRun { seconds_left: 300 })
    );
    clock.advance(120);
    assert_eq!(
        check(&e, C(), "a@x.org", "b@y.net"),
        Decision::Pass(Pass::DryRun { seconds_left: 180 })
    );
    clock.advance(180);
    assert_eq!(check(&e, C(), "a@x.org", "b@y.net"), retried(300));
    assert_eq!(check(&e, C(), "a@x.org", "b@y.net"), KNOWN);
}

#[test]
fn auth_and_exemptions_pass_without_recording() {
    let (e, _) = engine();
    let mut q = Query::new(C(), "a@x.org", "b@y.net");
    q.auth = Some("alice");
    assert_eq!(e.check(&q, Mode::Record), Decision::Pass(Pass::Auth));
    q.auth = Some("");
    assert_eq!(e.check(&q, Mode::Record), defer(300));

    let mut b = Exemptions::builder();
    b.add_clients("test", "10.0.0.0/8\n.mail.example.com\n")
        .unwrap();
    b.add_senders("test", "@trusted.example\n").unwrap();
    b.add_recipients("test", "postmaster@y.net\n").unwrap();
    e.set_exemptions(b.build());
    let before = e.stats().triplets;
    let pass = |client, name, from, to| {
        let mut q = Query::new(client, from, to);
        q.client_name = name;
        e.check(&q, Mode::Record)
    };
    assert_eq!(
        pass(ip(10, 1, 2, 3), None, "a@x.org", "b@y.net"),
        Decision::Pass(Pass::Exempt(ExemptList::Client))
    );
    assert_eq!(
        pass(
            ip(192, 0, 2, 1),
            Some("MX1.Mail.Example.COM"),
            "a@x.org",
            "b@y.net"
        ),
        Decision::Pass(Pass::Exempt(ExemptList::ClientName))
    );
    assert_eq!(
        pass(ip(192, 0, 2, 1), None, "Bob@Trusted.Example", "b@y.net"),
        Decision::Pass(Pass::Exempt(ExemptList::Sender))
    );
    assert_eq!(
        pass(ip(192, 0, 2, 1), None, "a@x.org", "PostMaster@y.net"),
        Decision::Pass(Pass::Exempt(ExemptList::Recipient))
    );
    assert_eq!(e.stats().triplets, before);
    assert_eq!(
        pass(ip(11, 1, 2, 3), None, "a@x.org", "b@y.net"),
        defer(300)
    );
}

#[test]
fn reasons_on_the_wire() {
    assert_eq!(Pass::Retried { delayed: 1 }.reason(), "retried");
    assert_eq!(Pass::Known.reason(), "known");
    assert_eq!(Pass::Awl.reason(), "awl");
    assert_eq!(Pass::Exempt(ExemptList::Client).reason(), "exempt:client");
    assert_eq!(
        Pass::Exempt(ExemptList::Recipient).reason(),
        "exempt:recipient"
    );
    assert_eq!(Pass::Auth.reason(), "auth");
    assert_eq!(Pass::DryRun { seconds_left: 3 }.reason(), "dry-run");
}

#[test]
fn expiry_removes_exactly_the_dead_records() {
    let (e, clock) = engine();
    let p = *e.policy();
    // 1000 triplets greylisted and never retried; 1000 passed.
    // Distinct /24s, so every request is its own triplet.
    for i in 0..1000u32 {
        check(
            &e,
            ip(10, (i >> 8) as u8, i as u8, 1),
            "grey@x.org",
            "b@y.net",
        );
        check(
            &e,
            ip(172, (i >> 8) as u8, i as u8, 1),
            "white@x.org",
            "b@y.net",
        );
    }
    clock.advance(300);
    for i in 0..1000u32 {
        assert_eq!(
            check(
                &e,
                ip(172, (i >> 8) as u8, i as u8, 1),
                "white@x.org",
                "b@y.net"
            ),
            retried(300)
        );
    }
    assert_eq!(e.stats().triplets, 2000);
    // Up to the end of the retry window nothing goes.
    clock.set(T0 + p.retry_window);
    assert_eq!(e.expire(clock.now()).removed, 0);
    assert_eq!(e.stats().triplets, 2000);
    // One second later the greylisted ones are gone, the whitelisted ones stay.
    clock.set(T0 + p.retry_window + 1);
    let s = e.expire(clock.now());
    assert_eq!(s.removed, 1000);
    assert_eq!(e.stats().triplets, 1000);
    assert_eq!(e.stats().whitelisted, 1000);
    // Whitelisted until pass time + ttl: at that second they stay, one later they go.
    clock.set(T0 + 300 + p.whitelist_ttl);
    assert_eq!(e.expire(clock.now()).removed, 0);
    clock.advance(1);
    assert_eq!(e.expire(clock.now()).removed, 1000 + 1000);
    let s = e.stats();
    // The AWL entries of the passing clients expired with them (same 35-day TTL).
    assert_eq!((s.triplets, s.whitelisted, s.awl_clients), (0, 0, 0));
}

#[test]
fn refreshed_records_outlive_their_first_schedule() {
    let (e, clock) = engine();
    let p = *e.policy();
    check(&e, C(), "a@x.org", "b@y.net");
    clock.advance(300);
    check(&e, C(), "a@x.org", "b@y.net");
    // Keep using it every 30 days for 100 days, expiring as we go.
    for _ in 0..4 {
        clock.advance(30 * DAY);
        e.expire(clock.now());
        assert_eq!(check(&e, C(), "a@x.org", "b@y.net"), KNOWN);
    }
    clock.advance(p.whitelist_ttl + 1);
    assert_eq!(e.expire(clock.now()).removed, 1);
    assert_eq!(e.stats().triplets, 0);
}

#[test]
fn restarted_record_is_not_lost_by_its_old_timer() {
    // A greylisted record that restarts (retried too late) keeps its old wheel entry; when
    // that fires the record must be rescheduled, not removed.
    let (e, clock) = engine();
    let p = *e.policy();
    check(&e, C(), "a@x.org", "b@y.net");
    clock.advance(p.retry_window + 10);
    assert_eq!(check(&e, C(), "a@x.org", "b@y.net"), defer(300));
    e.expire(clock.now());
    assert_eq!(e.stats().triplets, 1);
    clock.advance(300);
    assert_eq!(check(&e, C(), "a@x.org", "b@y.net"), retried(300));
}

#[test]
fn threads_share_one_table() {
    let (e, clock) = engine();
    let threads = 4;
    let per = 5_000u32;
    std::thread::scope(|s| {
        for t in 0..threads {
            let e = &e;
            s.spawn(move || {
                for i in 0..per {
                    let c = ip(10, t as u8, (i >> 8) as u8, 0);
                    let to = format!("u{}@example.net", i & 0xff);
                    assert_eq!(check(e, c, "a@x.org", &to), defer(300));
                    // A triplet every thread asks about too.
                    check(e, ip(192, 0, 2, 1), "shared@x.org", "b@y.net");
                }
            });
        }
    });
    // (thread, i >> 8) picks the /24 and i & 0xff the recipient: every i is its own triplet.
    assert_eq!(e.stats().triplets, threads * per as usize + 1);
    clock.advance(300);
    assert_eq!(
        check(&e, ip(192, 0, 2, 1), "shared@x.org", "b@y.net"),
        retried(300)
    );
}

// ---- model check ----

/// The greylisting rules (docs/OPERATIONS.md §1) written as plainly as possible, on a BTreeMap.
#[derive(Debug, Clone, Copy)]
struct ModelRec {
    first: u64,
    last: u64,
    white: bool,
}

#[derive(Default)]
struct Model {
    recs: BTreeMap<usize, ModelRec>,
}

impl Model {
    fn alive_until(r: &ModelRec, p: &Policy) -> u64 {
        if r.white {
            r.last + u64::from(p.whitelist_ttl)
        } else {
            r.first + u64::from(p.retry_window)
        }
    }

    fn check(&mut self, t: usize, now: u64, p: &Policy) -> Decision {
        let fresh = ModelRec {
            first: now,
            last: now,
            white: false,
        };
        match self.recs.get_mut(&t) {
            Some(r) if now <= Self::alive_until(r, p) => {
                if r.white {
                    r.last = now;
                    KNOWN
                } else if now < r.first + u64::from(p.delay) {
                    r.last = now;
                    defer((r.first + u64::from(p.delay) - now) as u32)
                } else {
                    r.white = true;
                    r.last = now;
                    retried((now - r.first) as u32)
                }
            }
            _ => {
                self.recs.insert(t, fresh);
                defer(p.delay)
            }
        }
    }

    fn expire(&mut self, now: u64, p: &Policy) {
        self.recs.retain(|_, r| Self::alive_until(r, p) >= now);
    }
}

#[derive(Debug, Clone)]
enum Op {
    Check(usize),
    Advance(u32),
    Expire,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0usize..40).prop_map(Op::Check),
        3 => prop_oneof![0u32..400, 0u32..3 * DAY, 0u32..40 * DAY].prop_map(Op::Advance),
        1 => Just(Op::Expire),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn engine_matches_model(ops in prop::collection::vec(op(), 1..300)) {
        // AWL off: the model covers the triplet rules; AWL has its own tests above.
        let p = Policy { awl_clients: 0, delay: 300, retry_window: 2 * DAY, whitelist_ttl: 35 * DAY, ..Policy::default() };
        let (e, clock) = engine_with(p);
        let mut m = Model::default();
        let triplets: Vec<(IpAddr, String)> = (0..40).map(|i| (ip(10, 9, i as u8, 1), format!("r{i}@example.net"))).collect();
        for op in ops {
            match op {
                Op::Check(t) => {
                    let got = check(&e, triplets[t].0, "s@example.org", &triplets[t].1);
                    let want = m.check(t, u64::from(clock.now()), &p);
                    prop_assert_eq!(got, want);
                }
                Op::Advance(s) => clock.advance(s),
                Op::Expire => {
                    e.expire(clock.now());
                    m.expire(u64::from(clock.now()), &p);
                    prop_assert_eq!(e.stats().triplets, m.recs.len());
                    prop_assert_eq!(e.stats().whitelisted, m.recs.values().filter(|r| r.white).count());
                }
            }
        }
        e.expire(clock.now());
        m.expire(u64::from(clock.now()), &p);
        prop_assert_eq!(e.stats().triplets, m.recs.len());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(100))]
    /// The batch path gives the same answers, in the same order, as one-by-one checks,
    /// including repeats of one triplet inside a batch and exempt requests mixed in.
    #[test]
    fn batch_matches_one_by_one(
        batches in prop::collection::vec((prop::collection::vec((0usize..30, any::<bool>()), 1..64), 0u32..4000), 1..12)
    ) {
        let p = Policy { awl_clients: 2, awl_interval: 0, ..Policy::default() };
        let (a, clock_a) = engine_with(p);
        let (b, clock_b) = engine_with(p);
        let mut ex = Exemptions::builder();
        ex.add_senders("t", "@exempt.example\n").unwrap();
        a.set_exemptions(ex.build());
        let mut ex = Exemptions::builder();
        ex.add_senders("t", "@exempt.example\n").unwrap();
        b.set_exemptions(ex.build());
        let rcpts: Vec<String> = (0..30).map(|i| format!("r{}@example.net", i % 10)).collect();
        let mut out = Vec::new();
        for (batch, advance) in batches {
            let queries: Vec<Query> = batch.iter().map(|(t, exempt)| {
                let from = if *exempt { "x@exempt.example" } else { "s@example.org" };
                Query::new(ip(10, 20, (*t / 10) as u8, 1), from, &rcpts[*t])
            }).collect();
            a.check_batch(&queries, Mode::Record, &mut out);
            let one_by_one: Vec<Decision> = queries.iter().map(|q| b.check(q, Mode::Record)).collect();
            prop_assert_eq!(&out, &one_by_one);
            clock_a.advance(advance);
            clock_b.advance(advance);
        }
    }
}

fn with_traps(e: &Engine, clients: &str, traps: &str) {
    let mut b = Exemptions::builder();
    b.add_clients("clients", clients).unwrap();
    b.add_greytraps("traps", traps).unwrap();
    e.set_exemptions(b.build());
}

#[test]
fn a_client_that_writes_to_a_greytrap_is_deferred_for_the_trap_ttl() {
    let clock = Arc::new(ManualClock::new(T0));
    let cfg = EngineConfig {
        policy: Policy::default(),
        normalizer: Normalizer::default(),
        secret: HashSecret(*b"test-secret-0001"),
    };
    let e = Engine::new(cfg, clock.clone()).with_greytrap_ttl(DAY);
    with_traps(&e, "", "trap@example.net\n@spamtrap.example\n");
    // A correspondent known before the trap: whitelisted.
    assert_eq!(check(&e, C(), "a@x.org", "b@y.net"), defer(300));
    clock.advance(300);
    assert_eq!(check(&e, C(), "a@x.org", "b@y.net"), retried(300));
    // PEEK at a trap changes nothing.
    let q = Query::new(C(), "a@x.org", "trap@example.net");
    assert_eq!(e.check(&q, Mode::Peek), defer(300));
    assert_eq!(check(&e, C(), "a@x.org", "b@y.net"), KNOWN);
    // The trap: deferred, and the client's network is trapped.
    assert_eq!(check(&e, C(), "x@z.org", "TRAP@example.net"), defer(300));
    assert_eq!(e.stats().trapped_clients, 1);
    assert_eq!(e.stats().greytrap_hits, 1);
    // Every request from it, known triplets and retries alike, is deferred meanwhile...
    assert_eq!(
        check(&e, ip(192, 0, 2, 99), "a@x.org", "b@y.net"),
        defer(300)
    );
    clock.advance(600);
    assert_eq!(check(&e, C(), "new@x.org", "b@y.net"), defer(300));
    assert_eq!(check(&e, C(), "new@x.org", "b@y.net"), defer(300));
    assert!(e.stats().greytrap_deferrals >= 3);
    // ...while other clients are not.
    assert_eq!(
        check(&e, ip(198, 51, 100, 1), "a@x.org", "b@y.net"),
        defer(300)
    );
    // Writing to any address of a trapped domain traps too.
    assert_eq!(
        check(&e, ip(203, 0, 113, 5), "s@x.org", "x@spamtrap.example"),
        defer(300)
    );
    assert_eq!(e.stats().trapped_clients, 2);
    // After the trap's time the client is itself again: its whitelisted triplet passes.
    clock.advance(DAY + 1);
    e.expire(clock.now());
    assert_eq!(e.stats().trapped_clients, 0);
    assert_eq!(check(&e, C(), "a@x.org", "b@y.net"), KNOWN);
}

#[test]
fn an_exempt_client_is_not_trapped_but_the_trap_is_never_delivered_to() {
    let (e, _) = engine();
    with_traps(&e, "192.0.2.0/24\n", "trap@example.net\n");
    assert_eq!(check(&e, C(), "x@z.org", "trap@example.net"), defer(300));
    assert_eq!(e.stats().trapped_clients, 0);
    assert_eq!(
        check(&e, C(), "x@z.org", "b@y.net"),
        Decision::Pass(Pass::Exempt(ExemptList::Client))
    );
}

// DATA stage (`body=`): the triplet is (client, sender, digest).

const DIGEST: &str = "9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08";

fn check_body(e: &Engine, from: &str, to: &str, digest: &str) -> Decision {
    let mut q = Query::new(C(), from, to);
    q.body = Some(digest);
    e.check(&q, Mode::Record)
}

#[test]
fn one_message_to_many_recipients_is_one_record() {
    let (e, clock) = engine();
    assert_eq!(check_body(&e, "a@x.org", "b@y.net", DIGEST), defer(300));
    clock.advance(100);
    // Another recipient, the same message (digest in the other case): an early retry.
    let lower = DIGEST.to_ascii_lowercase();
    assert_eq!(check_body(&e, "a@x.org", "c@z.net", &lower), defer(200));
    assert_eq!(e.stats().triplets, 1);
    clock.advance(200);
    assert_eq!(check_body(&e, "a@x.org", "d@w.net", DIGEST), retried(300));
    clock.advance(1);
    assert_eq!(check_body(&e, "a@x.org", "b@y.net", DIGEST), KNOWN);
    // Another sender or another message is another record.
    assert_eq!(check_body(&e, "e@x.org", "b@y.net", DIGEST), defer(300));
    assert_eq!(
        check_body(&e, "a@x.org", "b@y.net", &DIGEST[..16]),
        defer(300)
    );
    assert_eq!(e.stats().triplets, 3);
}

#[test]
fn body_and_recipient_triplets_are_separate_records() {
    let (e, clock) = engine();
    let digest = DIGEST.to_ascii_lowercase();
    assert_eq!(check_body(&e, "a@x.org", "b@y.net", &digest), defer(300));
    // The recipient check of the same envelope, and a recipient spelled like the digest
    // field, are records of their own.
    assert_eq!(check(&e, C(), "a@x.org", "b@y.net"), defer(300));
    let spoof = format!("body:{digest}");
    assert_eq!(check(&e, C(), "a@x.org", &spoof), defer(300));
    assert_eq!(check(&e, C(), "a@x.org", &digest), defer(300));
    assert_eq!(e.stats().triplets, 4);
    clock.advance(300);
    assert_eq!(check_body(&e, "a@x.org", "b@y.net", &digest), retried(300));
}

#[test]
fn recipient_exemptions_still_see_the_recipient_of_a_body_check() {
    let (e, _) = engine();
    let mut b = Exemptions::builder();
    b.add_recipients("test", "postmaster@y.net\n").unwrap();
    e.set_exemptions(b.build());
    assert_eq!(
        check_body(&e, "a@x.org", "Postmaster@Y.net", DIGEST),
        Decision::Pass(Pass::Exempt(ExemptList::Recipient))
    );
    assert_eq!(check_body(&e, "a@x.org", "b@y.net", DIGEST), defer(300));
}

fn with_domains(e: &Engine, text: &str) {
    let mut b = Exemptions::builder();
    b.add_domain_policy("domains", text, e.policy()).unwrap();
    e.set_exemptions(b.build());
}

#[test]
fn a_domain_with_its_own_delay() {
    let (e, clock) = engine();
    with_domains(&e, "fast.test delay=10s\n.slow.test delay=1h\n");
    assert_eq!(check(&e, C(), "a@x.org", "b@fast.test"), defer(10));
    assert_eq!(check(&e, C(), "a@x.org", "b@a.slow.test"), defer(3600));
    assert_eq!(check(&e, C(), "a@x.org", "b@other.test"), defer(300));
    clock.advance(9);
    assert_eq!(check(&e, C(), "a@x.org", "b@fast.test"), defer(1));
    clock.advance(1);
    assert_eq!(check(&e, C(), "a@x.org", "b@fast.test"), retried(10));
    assert_eq!(check(&e, C(), "a@x.org", "b@other.test"), defer(290));
    clock.advance(300);
    assert_eq!(check(&e, C(), "a@x.org", "b@a.slow.test"), defer(3290));
    assert_eq!(check(&e, C(), "a@x.org", "b@fast.test"), KNOWN);
}

#[test]
fn a_domain_with_shorter_windows_starts_over_but_records_live_by_the_global_ones() {
    let (e, clock) = engine();
    with_domains(&e, "short.test retry-window=1h whitelist-ttl=1d\n");
    // Greylisted, retried after the domain's window: starts over.
    assert_eq!(check(&e, C(), "a@x.org", "late@short.test"), defer(300));
    assert_eq!(check(&e, C(), "a@x.org", "late@other.test"), defer(300));
    clock.advance(3601);
    assert_eq!(check(&e, C(), "a@x.org", "late@short.test"), defer(300));
    assert_eq!(check(&e, C(), "a@x.org", "late@other.test"), retried(3601));
    // Inside the window it passes as usual.
    clock.advance(300);
    assert_eq!(check(&e, C(), "a@x.org", "late@short.test"), retried(300));
    // Whitelisted, seen again after the domain's ttl: starts over; the global one keeps it.
    clock.advance(DAY);
    assert_eq!(check(&e, C(), "a@x.org", "late@short.test"), KNOWN);
    clock.advance(DAY + 1);
    assert_eq!(check(&e, C(), "a@x.org", "late@short.test"), defer(300));
    assert_eq!(check(&e, C(), "a@x.org", "late@other.test"), KNOWN);
    // Both records are still stored (by the global settings).
    assert_eq!(e.stats().triplets, 2);
}

#[test]
fn a_dry_run_domain_passes_what_would_be_deferred_and_records() {
    let (e, clock) = engine();
    with_domains(&e, ".dry.test dry-run delay=1m\n");
    let dry = |n| Decision::Pass(Pass::DryRun { seconds_left: n });
    assert_eq!(check(&e, C(), "a@x.org", "b@www.dry.test"), dry(60));
    assert_eq!(check(&e, C(), "a@x.org", "b@dry.test"), defer(300));
    clock.advance(60);
    assert_eq!(check(&e, C(), "a@x.org", "b@www.dry.test"), retried(60));
    assert_eq!(e.stats().triplets, 2);
}

#[test]
fn an_off_domain_passes_and_records_nothing() {
    let (e, _) = engine();
    with_domains(&e, "off.test off\n.off.test delay=1m\n");
    let off = Decision::Pass(Pass::DomainOff);
    assert_eq!(check(&e, C(), "a@x.org", "B@OFF.test"), off);
    assert_eq!(
        e.check(&Query::new(C(), "a@x.org", "b@off.test"), Mode::Peek),
        off
    );
    assert_eq!(e.stats().triplets, 0);
    assert_eq!(check(&e, C(), "a@x.org", "b@sub.off.test"), defer(60));
    assert_eq!(check(&e, C(), "a@x.org", "postmaster"), defer(300));
    assert_eq!(Pass::DomainOff.reason(), "domain-off");
}

// --- Client identities (`client-identity`, DESIGN §11) ---

fn named<'a>(client: IpAddr, name: &'a str, from: &'a str, to: &'a str) -> Query<'a> {
    Query {
        client_name: Some(name),
        ..Query::new(client, from, to)
    }
}

fn spf<'a>(client: IpAddr, domain: &'a str, from: &'a str, to: &'a str) -> Query<'a> {
    Query {
        spf: Some(domain),
        ..Query::new(client, from, to)
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(100))]
    /// Under client identities the grouped path (which hashes the key under the client's
    /// network only when the keys before it find no known record) gives the answers of
    /// one-by-one checks, with records made under the prefix alone mixed in, pools that
    /// retry from other networks, and names and SPF domains in any case.
    #[test]
    fn batch_matches_one_by_one_under_identities(
        before in prop::collection::vec(0usize..40, 0..20),
        batches in prop::collection::vec((prop::collection::vec(0usize..40, 1..64), 0u32..4000), 1..10)
    ) {
        let p = Policy { awl_clients: 2, awl_interval: 0, ..Policy::default() };
        let list = Identities::parse("spf,name,prefix").unwrap();
        let (a, clock_a) = engine_with(p);
        let (b, clock_b) = engine_with(p);
        let (a, b) = (a.with_identities(list), b.with_identities(list));
        let domains = ["pool.example", "POOL.example.", "other.example"];
        let names = ["mx1.pool.example", "MX2.Pool.Example", "203-0-113-7.dyn.example.net"];
        let rcpts: Vec<String> = (0..4).map(|i| format!("r{i}@example.net")).collect();
        // Request `t`: one of 5 networks, with or without an SPF domain and a name.
        let query = |t: usize| {
            let q = Query::new(ip(203, 0, (t % 5) as u8, 7), "s@pool.example", &rcpts[t / 10 % 4]);
            Query {
                spf: (t % 3 != 0).then_some(domains[t % 3]),
                client_name: (t % 4 != 0).then_some(names[t % 3]),
                ..q
            }
        };
        // Records made before the identities were turned on: keyed by the prefix only.
        let (old, _) = engine_with(p);
        let old = old.with_identities(Identities::PREFIX_ONLY);
        for &t in &before {
            old.check(&query(t), Mode::Record);
        }
        let records = all_triplets(&old);
        a.load_triplets(records.clone(), T0);
        b.load_triplets(records, T0);
        let mut out = Vec::new();
        for (batch, advance) in batches {
            let queries: Vec<Query> = batch.iter().map(|&t| query(t)).collect();
            a.check_batch(&queries, Mode::Record, &mut out);
            let one_by_one: Vec<Decision> = queries.iter().map(|q| b.check(q, Mode::Record)).collect();
            prop_assert_eq!(&out, &one_by_one);
            clock_a.advance(advance);
            clock_b.advance(advance);
        }
        prop_assert_eq!(a.stats().triplets, b.stats().triplets);
    }
}

/// Every triplet record `e` holds, as a snapshot would copy them at `T0`.
fn all_triplets(e: &Engine) -> Vec<TripletRecord> {
    (0..e.shard_counts().0)
        .flat_map(|s| {
            let mut v = Vec::new();
            e.copy_triplets(s, T0, &mut v);
            v
        })
        .collect()
}

fn with_identities(list: &str) -> (Engine, Arc<ManualClock>) {
    let (e, clock) = engine();
    (e.with_identities(Identities::parse(list).unwrap()), clock)
}

#[test]
fn a_pool_retry_from_another_network_passes_under_the_name_identity() {
    let (e, clock) = with_identities("name,prefix");
    let first = named(
        ip(209, 85, 128, 54),
        "mail-by1-f54.google.com",
        "a@gmail.com",
        "b@y.net",
    );
    let retry = named(
        ip(74, 125, 3, 9),
        "mail-ua1-f9.google.com",
        "a@gmail.com",
        "b@y.net",
    );
    assert_eq!(e.check(&first, Mode::Record), defer(300));
    clock.advance(400);
    assert_eq!(e.check(&retry, Mode::Record), retried(400));
    assert_eq!(e.check(&first, Mode::Record), KNOWN);
    // One record: the name identity's.
    assert_eq!(e.stats().triplets, 1);

    // The same pool without the identity: the retry is a new triplet.
    let (e, clock) = with_identities("prefix");
    assert_eq!(e.check(&first, Mode::Record), defer(300));
    clock.advance(400);
    assert_eq!(e.check(&retry, Mode::Record), defer(300));
}

#[test]
fn generic_or_missing_names_fall_back_to_the_prefix() {
    let (e, clock) = with_identities("name,prefix");
    // Each line of an access pool spells its own address: no pool.
    let a = named(
        ip(203, 0, 113, 7),
        "203-0-113-7.dyn.example.net",
        "a@x.org",
        "b@y.net",
    );
    let b = named(
        ip(198, 51, 100, 8),
        "198-51-100-8.dyn.example.net",
        "a@x.org",
        "b@y.net",
    );
    assert_eq!(e.check(&a, Mode::Record), defer(300));
    clock.advance(400);
    assert_eq!(e.check(&b, Mode::Record), defer(300));
    // But the same line retrying passes, keyed by its prefix.
    assert_eq!(e.check(&a, Mode::Record), retried(400));
    // A client without a verified name is keyed by its prefix too.
    let c = Query::new(ip(203, 0, 113, 99), "a@x.org", "b@y.net");
    assert_eq!(e.check(&c, Mode::Record), KNOWN);
}

#[test]
fn records_made_before_an_identity_was_turned_on_still_count() {
    let clock = Arc::new(ManualClock::new(T0));
    let cfg = || EngineConfig {
        policy: Policy::default(),
        normalizer: Normalizer::default(),
        secret: HashSecret(*b"test-secret-0001"),
    };
    let q = named(
        ip(209, 85, 128, 54),
        "mail-by1-f54.google.com",
        "a@gmail.com",
        "b@y.net",
    );
    // Greylisted and then whitelisted under the prefix only.
    let before = Engine::new(cfg(), clock.clone()).with_identities(Identities::PREFIX_ONLY);
    assert_eq!(before.check(&q, Mode::Record), defer(300));
    let all = all_triplets(&before);
    assert_eq!(all.len(), 1);

    // The same records under `name,prefix`: the first attempt is found under the prefix, so
    // the retry passes instead of starting over under the name.
    let after = Engine::new(cfg(), clock.clone());
    after.load_triplets(all.clone(), T0);
    clock.advance(400);
    assert_eq!(after.check(&q, Mode::Peek), retried(400));
    assert_eq!(after.check(&q, Mode::Record), retried(400));
    assert_eq!(after.check(&q, Mode::Record), KNOWN);
    assert_eq!(after.stats().triplets, 1, "no second record under the name");

    // A whitelisted prefix record counts for a request that now has a name identity.
    let again = Engine::new(cfg(), clock.clone());
    again.load_triplets(all, T0);
    clock.advance(1);
    assert_eq!(again.check(&q, Mode::Record), retried(401));
    let other = named(
        ip(209, 85, 128, 54),
        "mail-by1-f54.google.com",
        "a@gmail.com",
        "b@y.net",
    );
    assert_eq!(again.check(&other, Mode::Record), KNOWN);
}

#[test]
fn the_awl_is_never_keyed_by_a_name_identity() {
    let policy = Policy {
        awl_clients: 2,
        ..Policy::default()
    };
    let (e, clock) = engine_with(policy);
    let e = e.with_identities(Identities::parse("name,prefix").unwrap());
    // Two customers of one hosting provider, each with its own verified name.
    for i in 0..3 {
        let rcpt = format!("r{i}@y.net");
        let q = named(ip(192, 0, 2, 10), "web1.hoster.example", "a@x.org", &rcpt);
        e.check(&q, Mode::Record);
        clock.advance(400);
        e.check(&q, Mode::Record);
        clock.advance(3_700);
    }
    // The first customer's network is auto-whitelisted by now...
    let same_net = named(
        ip(192, 0, 2, 11),
        "web1.hoster.example",
        "new@x.org",
        "new@y.net",
    );
    assert_eq!(e.check(&same_net, Mode::Peek), Decision::Pass(Pass::Awl));
    // ...but not the other customer under the same registrable domain.
    let other = named(
        ip(198, 51, 100, 20),
        "web2.hoster.example",
        "new@x.org",
        "new@y.net",
    );
    assert_eq!(e.check(&other, Mode::Record), defer(300));
}

#[test]
fn the_spf_identity_pools_and_keys_the_awl() {
    let policy = Policy {
        awl_clients: 2,
        ..Policy::default()
    };
    let (e, clock) = engine_with(policy);
    let e = e.with_identities(Identities::parse("spf,name,prefix").unwrap());
    let first = spf(
        ip(40, 107, 22, 101),
        "Example.COM",
        "a@example.com",
        "b@y.net",
    );
    let retry = spf(ip(52, 100, 3, 4), "example.com", "a@example.com", "b@y.net");
    assert_eq!(e.check(&first, Mode::Record), defer(300));
    clock.advance(400);
    assert_eq!(e.check(&retry, Mode::Record), retried(400));
    // A second pass of the pool (another recipient), an hour later: the AWL counts by the
    // spf identity, so a third network of the pool is auto-whitelisted.
    clock.advance(3_700);
    let r2 = spf(
        ip(40, 107, 22, 101),
        "example.com",
        "a@example.com",
        "c@y.net",
    );
    assert_eq!(e.check(&r2, Mode::Record), defer(300));
    clock.advance(400);
    assert_eq!(e.check(&r2, Mode::Record), retried(400));
    let third = spf(
        ip(104, 47, 1, 1),
        "example.com",
        "z@example.com",
        "new@y.net",
    );
    assert_eq!(e.check(&third, Mode::Record), Decision::Pass(Pass::Awl));
    // Without an SPF pass the same address is its own network.
    let bare = Query::new(ip(104, 47, 1, 1), "z@example.com", "new2@y.net");
    assert_eq!(e.check(&bare, Mode::Record), defer(300));
    // The spf identity is ignored when not in force.
    let (p, clock) = with_identities("name,prefix");
    assert_eq!(p.check(&first, Mode::Record), defer(300));
    clock.advance(400);
    assert_eq!(p.check(&retry, Mode::Record), defer(300));
}

#[test]
fn identities_key_the_data_stage_too() {
    let (e, clock) = with_identities("name,prefix");
    let q = |c, n| Query {
        body: Some("abc123"),
        ..named(c, n, "a@x.org", "b@y.net")
    };
    assert_eq!(
        e.check(&q(ip(209, 85, 128, 54), "a1.mailer.example"), Mode::Record),
        defer(300)
    );
    clock.advance(400);
    assert_eq!(
        e.check(&q(ip(74, 125, 3, 9), "b2.mailer.example"), Mode::Record),
        retried(400)
    );
}

// ---- Limits (DESIGN §12): --max-triplets and --max-new-per-client ----

/// A key in triplet shard 0 (the top bits of `hi` pick the shard).
fn shard0(n: u64) -> Key {
    Key {
        lo: n.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
        hi: n + 1,
    }
}

fn decide_key(e: &Engine, key: Key, mode: Mode) -> Decision {
    e.decide(&Keyed::new(key, e.normalizer().client(C())), e.now(), mode)
}

fn present(e: &Engine, key: Key) -> bool {
    lock(&e.triplets[shard_of(key, TRIPLET_SHARD_BITS)])
        .table
        .get(key)
        .is_some()
}

/// Whitelisted records counted one by one, to check the running count (`marked`).
fn count_whitelisted(e: &Engine) -> (usize, usize) {
    let (mut n, mut w) = (0, 0);
    e.for_each_triplet_shard(|it| {
        for r in it {
            n += 1;
            w += usize::from(r.is_whitelisted());
        }
    });
    (n, w)
}

#[test]
fn max_triplets_evicts_the_oldest_greylisted_first_and_whitelisted_last() {
    let (e, clock) = engine();
    // 3 records per shard.
    let e = e.with_limits(3 << TRIPLET_SHARD_BITS, 0);
    let k: Vec<Key> = (0..8).map(shard0).collect();
    decide_key(&e, k[0], Mode::Record);
    clock.advance(10);
    decide_key(&e, k[1], Mode::Record);
    clock.advance(10);
    decide_key(&e, k[2], Mode::Record);
    clock.advance(300);
    assert_eq!(decide_key(&e, k[0], Mode::Record), retried(320));
    // Full: a new triplet evicts the oldest greylisted one (k1), not the older whitelisted k0.
    assert_eq!(decide_key(&e, k[3], Mode::Record), defer(300));
    assert!(!present(&e, k[1]), "k1 (oldest greylisted) evicted");
    assert!(present(&e, k[2]) && present(&e, k[3]));
    assert_eq!(decide_key(&e, k[0], Mode::Peek), KNOWN);
    let s = e.stats();
    assert_eq!((s.triplets, s.whitelisted), (3, 1));
    assert_eq!((s.evicted_greylisted, s.evicted_whitelisted), (1, 0));
    // Next: k2, then k3, in the order they were first seen.
    clock.advance(1);
    decide_key(&e, k[4], Mode::Record);
    assert!(!present(&e, k[2]) && present(&e, k[3]) && present(&e, k[4]));
    clock.advance(1);
    decide_key(&e, k[5], Mode::Record);
    assert!(!present(&e, k[3]) && present(&e, k[4]) && present(&e, k[5]));
    // Whitelist everything: only then is a whitelisted record evicted, the one seen longest
    // ago (k0) first.
    clock.advance(400);
    assert!(matches!(
        decide_key(&e, k[4], Mode::Record),
        Decision::Pass(Pass::Retried { .. })
    ));
    assert!(matches!(
        decide_key(&e, k[5], Mode::Record),
        Decision::Pass(Pass::Retried { .. })
    ));
    assert_eq!(e.stats().whitelisted, 3);
    decide_key(&e, k[6], Mode::Record);
    assert!(!present(&e, k[0]), "k0, whitelisted longest ago, evicted");
    assert_eq!(decide_key(&e, k[4], Mode::Peek), KNOWN);
    assert_eq!(decide_key(&e, k[5], Mode::Peek), KNOWN);
    let s = e.stats();
    assert_eq!((s.triplets, s.whitelisted), (3, 2));
    assert_eq!((s.evicted_greylisted, s.evicted_whitelisted), (3, 1));
    assert_eq!(count_whitelisted(&e), (3, 2));
    // k6 is greylisted again: the next new triplet evicts it, not a whitelisted one.
    clock.advance(1);
    decide_key(&e, k[7], Mode::Record);
    assert!(!present(&e, k[6]));
    assert_eq!(e.stats().evicted_whitelisted, 1);
    assert_eq!(count_whitelisted(&e), (3, 2));
}

#[test]
fn max_triplets_keeps_whitelisted_records_and_expiry_still_finds_set_aside_keys() {
    // No auto-whitelist: every triplet of the flood makes a record.
    let (e, clock) = engine_with(Policy {
        awl_clients: 0,
        ..Policy::default()
    });
    let e = e.with_limits(100 << TRIPLET_SHARD_BITS, 0);
    let p = *e.policy();
    // A flood into one shard, with every 10th triplet whitelisted.
    for n in 0..500u64 {
        decide_key(&e, shard0(n), Mode::Record);
        if n % 10 == 0 {
            clock.advance(p.delay);
            decide_key(&e, shard0(n), Mode::Record);
        }
        clock.advance(1);
        let s = e.stats();
        assert!(s.triplets <= 100, "{} records after {n}", s.triplets);
    }
    let s = e.stats();
    assert_eq!((s.triplets, s.whitelisted), (100, 50));
    assert_eq!(count_whitelisted(&e), (100, 50));
    // Whitelisted records are never evicted while greylisted ones are left.
    assert_eq!((s.evicted_greylisted, s.evicted_whitelisted), (400, 0));
    assert!((0..500)
        .step_by(10)
        .all(|n| decide_key(&e, shard0(n), Mode::Peek) == KNOWN));
    // The newest greylisted records are the ones kept.
    assert!((450..500)
        .filter(|n| n % 10 != 0)
        .all(|n| present(&e, shard0(n))));
    // Everything set aside for eviction is still expired on time.
    clock.advance(p.retry_window + 1);
    e.expire(e.now());
    assert_eq!(e.stats().triplets, 50, "greylisted ones expired");
    clock.advance(p.whitelist_ttl);
    e.expire(e.now());
    let s = e.stats();
    assert_eq!((s.triplets, s.whitelisted), (0, 0));
}

#[test]
fn an_expired_record_makes_room_before_a_live_one_is_evicted() {
    let (e, clock) = engine();
    let e = e.with_limits(2 << TRIPLET_SHARD_BITS, 0);
    let p = *e.policy();
    decide_key(&e, shard0(0), Mode::Record);
    clock.advance(p.retry_window - 100);
    decide_key(&e, shard0(1), Mode::Record);
    clock.advance(101); // shard0(0) has just expired; expiry has not run
    decide_key(&e, shard0(2), Mode::Record);
    let s = e.stats();
    assert_eq!((s.triplets, s.evicted_greylisted), (2, 0));
    assert!(present(&e, shard0(1)) && present(&e, shard0(2)));
}

#[test]
fn max_triplets_bounds_the_whole_table_through_check() {
    let (e, _) = engine();
    let e = e.with_limits(1_000, 0);
    for n in 0..5_000 {
        check(&e, C(), &format!("s{n}@x.org"), "b@y.net");
    }
    let s = e.stats();
    assert!(s.triplets <= 1_000, "{}", s.triplets);
    // Keyed hashes fill the shards evenly: all of them are at their bound.
    assert_eq!(s.triplets, 1_000);
    assert_eq!(s.evicted_greylisted as usize + s.triplets, 5_000);
}

#[test]
fn max_new_per_client_defers_without_recording_per_minute() {
    let (e, clock) = engine();
    let e = e.with_limits(1 << 20, 3);
    // Start at the beginning of a minute.
    clock.set((T0 / 60 + 1) * 60);
    let a = C();
    let b = ip(198, 51, 100, 7);
    // PEEK never counts.
    for n in 0..10 {
        assert_eq!(
            e.check(
                &Query::new(a, &format!("p{n}@x.org"), "r@y.net"),
                Mode::Peek
            ),
            defer(300)
        );
    }
    for n in 0..3 {
        assert_eq!(check(&e, a, &format!("s{n}@x.org"), "r@y.net"), defer(300));
    }
    assert_eq!(e.stats().triplets, 3);
    // The fourth new triplet this minute: DEFER for the whole delay, not recorded.
    clock.advance(30);
    assert_eq!(check(&e, a, "s3@x.org", "r@y.net"), defer(300));
    assert_eq!(check(&e, a, "s3@x.org", "r@y.net"), defer(300));
    let s = e.stats();
    assert_eq!((s.triplets, s.new_refused), (3, 2));
    // Its known triplets are answered as usual (not new).
    assert_eq!(check(&e, a, "s0@x.org", "r@y.net"), defer(270));
    // Another client is not affected.
    for n in 0..3 {
        assert_eq!(check(&e, b, &format!("s{n}@x.org"), "r@y.net"), defer(300));
    }
    assert_eq!(e.stats().triplets, 6);
    // The last second of the minute still counts; the next minute, the client may add again.
    clock.advance(29);
    assert_eq!(check(&e, a, "s3@x.org", "r@y.net"), defer(300));
    assert_eq!(e.stats().triplets, 6);
    assert_eq!(e.stats().new_refused, 3);
    clock.advance(1);
    assert_eq!(check(&e, a, "s3@x.org", "r@y.net"), defer(300));
    assert_eq!(e.stats().triplets, 7);
    assert_eq!(e.stats().new_refused, 3);
}

#[test]
fn max_new_per_client_counts_by_the_first_identity() {
    let (e, clock) = with_identities("name,prefix");
    let e = e.with_limits(1 << 20, 2);
    clock.set((T0 / 60 + 1) * 60);
    // Two networks of one pool (name identity): one client.
    let q = |n: u32, addr: IpAddr, name: &'static str| {
        let from = format!("s{n}@gmail.com");
        e.check(&named(addr, name, &from, "b@y.net"), Mode::Record)
    };
    assert_eq!(
        q(0, ip(209, 85, 128, 54), "mail-by1-f54.google.com"),
        defer(300)
    );
    assert_eq!(
        q(1, ip(74, 125, 3, 9), "mail-ua1-f9.google.com"),
        defer(300)
    );
    assert_eq!(
        q(2, ip(74, 125, 3, 9), "mail-ua1-f9.google.com"),
        defer(300)
    );
    assert_eq!(e.stats().triplets, 2);
    assert_eq!(e.stats().new_refused, 1);
    // A client without a name is its network.
    assert_eq!(
        check(&e, ip(74, 125, 3, 9), "s2@gmail.com", "b@y.net"),
        defer(300)
    );
    assert_eq!(e.stats().triplets, 3);
}

#[test]
fn a_flood_never_evicts_a_whitelisted_record_while_greylisted_ones_are_left() {
    let (e, clock) = engine_with(Policy {
        awl_clients: 0,
        ..Policy::default()
    });
    let e = e.with_limits(10_000, 0);
    for i in 0..200 {
        check(
            &e,
            ip(192, 0, 2, i as u8),
            &format!("s{i}@known.example"),
            "r@rcpt.example",
        );
    }
    clock.advance(301);
    for i in 0..200 {
        check(
            &e,
            ip(192, 0, 2, i as u8),
            &format!("s{i}@known.example"),
            "r@rcpt.example",
        );
    }
    assert_eq!(e.stats().whitelisted, 200);
    for i in 0..30_000u32 {
        let c = ip(10, (i % 600 / 256) as u8, (i % 600 % 256) as u8, 1);
        check(
            &e,
            c,
            &format!("f{i}@flood.example"),
            &format!("r{i}@rcpt.example"),
        );
        if i % 1000 == 0 {
            clock.advance(1);
            e.expire(e.now());
        }
    }
    let s = e.stats();
    assert_eq!((s.evicted_whitelisted, s.whitelisted), (0, 200), "{s:?}");
}

proptest! {
    /// Random new triplets, passes, clock steps and expiry into one shard of 5: the shard never
    /// holds more than 5, the whitelisted count stays exact, a whitelisted record is evicted
    /// only when the shard holds nothing else, and every record is still scheduled (all of
    /// them expire in the end).
    #[test]
    fn eviction_keeps_counts_and_schedules(
        ops in prop::collection::vec((0u8..4, 0u64..24, 0u32..4000), 1..300)
    ) {
        let (e, clock) = engine_with(Policy {
            awl_clients: 0,
            retry_window: 3 * 3600,
            ..Policy::default()
        });
        let e = e.with_limits(5 << TRIPLET_SHARD_BITS, 0);
        for (op, k, dt) in ops {
            let key = shard0(k);
            match op {
                0 | 1 => {
                    let before = e.stats();
                    let (n, w) = count_whitelisted(&e);
                    decide_key(&e, key, Mode::Record);
                    let after = e.stats();
                    if after.evicted_whitelisted > before.evicted_whitelisted {
                        prop_assert_eq!(n, w, "a whitelisted record evicted beside greylisted ones");
                    }
                }
                2 => clock.advance(dt),
                _ => {
                    e.expire(e.now());
                }
            }
            let s = e.stats();
            prop_assert!(s.triplets <= 5);
            prop_assert_eq!(count_whitelisted(&e), (s.triplets, s.whitelisted));
        }
        clock.advance(Policy::default().whitelist_ttl + 3 * 3600 + 1);
        e.expire(e.now());
        prop_assert_eq!(e.stats().triplets, 0, "a record was left unscheduled");
    }
}
