//! The SPF identity's resolver and cache (`greyhound::spf`) against a real DNS server: a private
//! `dnsmasq` per test (tests/common/dns.rs) serving SPF records under `.test` (RFC 6761).
//!
//! Each test drives the library API: results by mechanism, the RFC 7208 limits, the cache
//! (hits with the DNS server gone, negative entries, expiry by TTL), a DNS server that does not
//! answer (the request gives up at the timeout, the lookup goes on and fills the cache) or is
//! gone, and one lookup for concurrent requests of one key. No test asserts a timing; a
//! generous bound (5 × the timeout) only guards against a hang.

mod common;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use common::dns::{Dns, DnsBuilder};
use common::poll;
use greyhound::spf::{Spf, SpfConfig, SpfResults, SpfStats};

/// The zone's records. 192.0.2.0/24 and 2001:db8:1::/48 are the senders' pool.
fn records() -> DnsBuilder {
    let mut b = Dns::builder()
        .local("test")
        .ttl(300)
        .txt("ip4.test", "v=spf1 ip4:192.0.2.0/24 -all")
        .txt("ip6.test", "v=spf1 ip6:2001:db8:1::/48 -all")
        .txt("inc.test", "v=spf1 include:ip4.test -all")
        .txt("a.test", "v=spf1 a a:mail.other.test -all")
        .host("a.test", &["203.0.113.5", "2001:db8:5::5"])
        .host("mail.other.test", &["203.0.113.6"])
        .txt("mx.test", "v=spf1 mx -all")
        .mx("mx.test", "mx1.mx.test", 10)
        .host("mx1.mx.test", &["203.0.113.25"])
        .txt("redir.test", "v=spf1 redirect=ip4.test")
        .txt("soft.test", "v=spf1 ip4:192.0.2.0/24 ~all")
        .txt("neutral.test", "v=spf1 ip4:192.0.2.0/24 ?all")
        .host("nospf.test", &["203.0.113.7"])
        .txt("loop.test", "v=spf1 include:loop.test -all")
        .txt("broken.test", "v=spf1 ip4:not-an-address -all")
        // Two void lookups (an unknown name, a name without A records) are allowed ...
        .txt(
            "void2.test",
            "v=spf1 a:nx1.test a:ip4.test ip4:192.0.2.0/24 -all",
        )
        // ... a third is permerror, though the address would match after it.
        .txt(
            "void3.test",
            "v=spf1 a:nx1.test a:ip4.test a:nx3.test ip4:192.0.2.0/24 -all",
        )
        .txt(
            "voidmx.test",
            "v=spf1 mx:nx1.test mx:nx2.test mx:nx3.test ip4:192.0.2.0/24 -all",
        );
    // c1 → c2 → … → c11 (include chain); c11 holds the pool. From c1 that is 10 lookups (the
    // limit), from c0 11.
    for i in 0..11 {
        b = b.txt(
            &format!("c{i}.test"),
            &format!("v=spf1 include:c{}.test -all", i + 1),
        );
    }
    b.txt("c11.test", "v=spf1 ip4:192.0.2.0/24 -all")
}

fn spf(dns: &Dns, timeout: Duration) -> Spf {
    Spf::new(SpfConfig {
        dns_server: Some(dns.addr()),
        timeout,
        cache_entries: 10_000,
    })
    .expect("build the SPF resolver")
}

/// A timeout no healthy lookup against a local dnsmasq runs into, even on a busy machine.
const PATIENT: Duration = Duration::from_secs(10);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The result kind a finished lookup added to the statistics.
fn new_kind(before: &SpfStats, after: &SpfStats) -> &'static str {
    let (b, a): (&SpfResults, &SpfResults) = (&before.results, &after.results);
    let kinds = [
        ("pass", b.pass, a.pass),
        ("fail", b.fail, a.fail),
        ("softfail", b.softfail, a.softfail),
        ("neutral", b.neutral, a.neutral),
        ("none", b.none, a.none),
        ("permerror", b.permerror, a.permerror),
        ("temperror", b.temperror, a.temperror),
    ];
    let changed: Vec<_> = kinds.iter().filter(|k| k.2 != k.1).collect();
    assert_eq!(
        changed.len(),
        1,
        "one result counted: {before:?} → {after:?}"
    );
    changed[0].0
}

/// Checks one (address, domain) that is not cached yet: its answer and its result kind.
async fn check_kind(s: &Spf, addr: &str, domain: &str) -> (Option<bool>, &'static str) {
    let before = s.stats();
    let sender = format!("bounce@{domain}");
    let r = s
        .check(ip(addr), domain, "mail.example.test", &sender)
        .await;
    let after = s.stats();
    assert_eq!(
        after.lookups,
        before.lookups + 1,
        "{addr} {domain}: one lookup"
    );
    (r, new_kind(&before, &after))
}

#[tokio::test]
async fn mechanisms_and_results() {
    let dns = records().start();
    let s = spf(&dns, PATIENT);
    let cases = [
        // ip4: inside and outside the pool.
        ("192.0.2.10", "ip4.test", Some(true), "pass"),
        ("198.51.100.1", "ip4.test", Some(false), "fail"),
        // ip6:
        ("2001:db8:1::5", "ip6.test", Some(true), "pass"),
        ("2001:db8:2::5", "ip6.test", Some(false), "fail"),
        // include:
        ("192.0.2.11", "inc.test", Some(true), "pass"),
        ("198.51.100.2", "inc.test", Some(false), "fail"),
        // a (the domain's own A and AAAA) and a:<name>
        ("203.0.113.5", "a.test", Some(true), "pass"),
        ("2001:db8:5::5", "a.test", Some(true), "pass"),
        ("203.0.113.6", "a.test", Some(true), "pass"),
        ("203.0.113.9", "a.test", Some(false), "fail"),
        // mx
        ("203.0.113.25", "mx.test", Some(true), "pass"),
        ("203.0.113.26", "mx.test", Some(false), "fail"),
        // redirect=
        ("192.0.2.12", "redir.test", Some(true), "pass"),
        ("198.51.100.3", "redir.test", Some(false), "fail"),
        // ~all and ?all do not pool.
        ("192.0.2.13", "soft.test", Some(true), "pass"),
        ("198.51.100.4", "soft.test", Some(false), "softfail"),
        ("198.51.100.4", "neutral.test", Some(false), "neutral"),
        // No SPF record; no such domain.
        ("203.0.113.7", "nospf.test", Some(false), "none"),
        ("203.0.113.7", "nxdomain.test", Some(false), "none"),
        // A syntax error.
        ("192.0.2.14", "broken.test", Some(false), "permerror"),
        // The 10-lookup limit: 10 includes pass, 11 are permerror.
        ("192.0.2.15", "c1.test", Some(true), "pass"),
        ("192.0.2.15", "c0.test", Some(false), "permerror"),
        // Two void lookups pass, three are permerror (RFC 7208 §4.6.4).
        ("192.0.2.16", "void2.test", Some(true), "pass"),
        ("192.0.2.16", "void3.test", Some(false), "permerror"),
        ("192.0.2.16", "voidmx.test", Some(false), "permerror"),
    ];
    for (addr, domain, want, kind) in cases {
        let got = check_kind(&s, addr, domain).await;
        assert_eq!(
            got,
            (want, kind),
            "{addr} for {domain}; dnsmasq log:\n{}",
            dns.log()
        );
    }
    assert_eq!(s.stats().void_limit, 2, "void3 and voidmx");
    // Mixed case and a root dot are the same domain: a cache hit, no lookup.
    let lookups = s.stats().lookups;
    assert_eq!(s.cached(ip("192.0.2.10"), "IP4.Test."), Some(true));
    assert_eq!(s.stats().lookups, lookups);
}

#[tokio::test]
async fn a_record_loop_is_a_quick_permerror() {
    let dns = records().start();
    let s = spf(&dns, PATIENT);
    let t = Instant::now();
    assert_eq!(
        check_kind(&s, "192.0.2.10", "loop.test").await,
        (Some(false), "permerror")
    );
    // A hang guard, not a timing assertion: the loop stops at the lookup limit.
    assert!(t.elapsed() < PATIENT, "the loop ran {:?}", t.elapsed());
}

#[tokio::test]
async fn invalid_domains_answer_false_without_dns() {
    let dns = records().start();
    let s = spf(&dns, PATIENT);
    for d in [
        "",
        "192.0.2.10",
        "[192.0.2.10]",
        "test",
        "a..test",
        &"x".repeat(254),
    ] {
        assert_eq!(
            s.check(ip("192.0.2.10"), d, "h.test", "").await,
            Some(false),
            "{d:?}"
        );
    }
    let st = s.stats();
    assert_eq!((st.lookups, st.invalid), (0, 6));
}

#[tokio::test]
async fn cached_results_survive_the_dns_server() {
    let mut dns = records().start();
    let s = spf(&dns, PATIENT);
    assert_eq!(s.cached(ip("192.0.2.10"), "ip4.test"), None, "cold");
    // Positive, and negative of three kinds.
    assert_eq!(check_kind(&s, "192.0.2.10", "ip4.test").await.1, "pass");
    assert_eq!(check_kind(&s, "198.51.100.1", "ip4.test").await.1, "fail");
    assert_eq!(
        check_kind(&s, "198.51.100.4", "soft.test").await.1,
        "softfail"
    );
    assert_eq!(check_kind(&s, "203.0.113.7", "nospf.test").await.1, "none");
    dns.stop();
    let lookups = s.stats().lookups;
    let hits = s.stats().hits;
    for _ in 0..2 {
        assert_eq!(s.cached(ip("192.0.2.10"), "ip4.test"), Some(true));
        assert_eq!(s.cached(ip("198.51.100.1"), "ip4.test"), Some(false));
        assert_eq!(s.cached(ip("198.51.100.4"), "soft.test"), Some(false));
        assert_eq!(s.cached(ip("203.0.113.7"), "nospf.test"), Some(false));
        assert_eq!(
            s.check(ip("192.0.2.10"), "ip4.test", "h.test", "").await,
            Some(true)
        );
        assert_eq!(
            s.check(ip("198.51.100.1"), "ip4.test", "h.test", "").await,
            Some(false)
        );
    }
    let st = s.stats();
    assert_eq!(st.lookups, lookups, "answered from the cache");
    // `cached` counts, `check` does not (the server counts each request once).
    assert_eq!(st.hits, hits + 8);
    assert_eq!(st.entries, 4);
    // Another address of the pool is not cached: a key is (address, domain).
    assert_eq!(s.cached(ip("192.0.2.11"), "ip4.test"), None);
}

// Multi-threaded: `poll` blocks this thread while the lookup task runs on another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_expire_with_the_dns_ttl() {
    let mut dns = records().ttl(1).start();
    let s = spf(&dns, PATIENT).with_ttl_bounds(Duration::from_secs(1), Duration::from_secs(1));
    assert_eq!(check_kind(&s, "192.0.2.10", "ip4.test").await.1, "pass");
    // The pool shrinks; the cached pass holds until its TTL is over.
    dns.restart_with(records().ttl(1).txt("ip4.test", "v=spf1 -all"));
    let expired = poll(Duration::from_secs(10), || {
        s.cached(ip("192.0.2.10"), "ip4.test")
            .is_none()
            .then_some(())
    });
    assert!(expired.is_some(), "the entry expires after its 1 s TTL");
    // Looked up afresh: the new record (dnsmasq answers the first TXT record it has).
    let (r, _) = check_kind(&s, "192.0.2.10", "ip4.test").await;
    assert_eq!(r, Some(false), "after expiry the new record counts");
}

// Multi-threaded: `poll` blocks this thread while the lookup task runs on another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswering_dns_server_times_out_and_the_lookup_fills_the_cache() {
    let mut dns = records().start();
    let timeout = Duration::from_millis(300);
    let s = spf(&dns, timeout);
    dns.pause();
    // Two concurrent requests for one key: one lookup, both give up at the timeout.
    let t = Instant::now();
    let (a, b) = tokio::join!(
        s.check(ip("192.0.2.10"), "ip4.test", "h.test", ""),
        s.check(ip("192.0.2.10"), "ip4.test", "h.test", "")
    );
    assert!(t.elapsed() < 5 * timeout, "hang guard: {:?}", t.elapsed());
    assert_eq!((a, b), (None, None));
    let st = s.stats();
    assert_eq!((st.lookups, st.joins, st.timeouts), (1, 1, 2), "{st:?}");
    // The server comes back: the lookup that nobody waits for anymore finishes and fills the
    // cache, so the sender's retry finds the answer without waiting.
    dns.resume();
    let filled = poll(Duration::from_secs(15), || {
        s.cached(ip("192.0.2.10"), "ip4.test")
    });
    assert_eq!(filled, Some(true), "dnsmasq log:\n{}", dns.log());
    let st = s.stats();
    assert_eq!((st.lookups, st.results.pass), (1, 1), "{st:?}");
}

#[tokio::test]
async fn a_stopped_dns_server_never_stalls_a_request() {
    let mut dns = records().start();
    let timeout = Duration::from_millis(300);
    let s = spf(&dns, timeout);
    dns.stop();
    for (n, domain) in ["ip4.test", "inc.test", "a.test"].into_iter().enumerate() {
        let t = Instant::now();
        let r = s.check(ip("192.0.2.10"), domain, "h.test", "").await;
        assert!(t.elapsed() < 5 * timeout, "hang guard: {:?}", t.elapsed());
        assert_ne!(r, Some(true), "no pass without DNS");
        // Either the request gave up (a timeout) or the lookup failed first (a temperror):
        // counted one way or the other.
        let st = s.stats();
        assert!(st.timeouts + st.results.temperror > n as u64, "{st:?}");
    }
    // The lookups themselves end at hickory's own query timeout in temperror, which is cached
    // briefly: meanwhile requests for those keys answer at once, without waiting.
    let deadline = Instant::now() + 10 * PATIENT;
    while s.stats().results.temperror < 3 {
        assert!(
            Instant::now() < deadline,
            "lookups never ended: {:?}",
            s.stats()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(s.cached(ip("192.0.2.10"), "ip4.test"), Some(false));
    let r = s.check(ip("192.0.2.10"), "inc.test", "h.test", "").await;
    assert_eq!(r, Some(false), "the cached temperror");
    assert_eq!(
        s.stats().lookups,
        3,
        "no new lookup while the temperror is cached"
    );
}

#[tokio::test]
async fn concurrent_checks_of_one_key_start_one_lookup() {
    let dns = records().start();
    let s = spf(&dns, PATIENT);
    let checks = (0..8).map(|_| s.check(ip("192.0.2.10"), "inc.test", "h.test", ""));
    let results = futures_join_all(checks).await;
    assert!(results.iter().all(|r| *r == Some(true)), "{results:?}");
    let st = s.stats();
    // The first starts the lookup; the others join it (none finds the result cached: they
    // all reached the in-flight map before it finished, as no `await` came between them).
    assert_eq!((st.lookups, st.joins), (1, 7), "{st:?}");
}

/// Polls every future to completion on this task, concurrently (tokio has no `join_all`).
async fn futures_join_all<F: std::future::Future>(futs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut set = Vec::new();
    for f in futs {
        set.push(Box::pin(f));
    }
    let mut out: Vec<Option<F::Output>> = set.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, o) in set.iter_mut().zip(out.iter_mut()) {
            if o.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *o = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().map(Option::unwrap).collect()
}

#[tokio::test]
async fn the_cache_never_grows_past_its_bound() {
    let dns = records().start();
    // The smallest table: 16 sets of 4 slots in each of the 64 shards, at its bound from
    // the start.
    let s = Spf::new(SpfConfig {
        dns_server: Some(dns.addr()),
        timeout: PATIENT,
        cache_entries: 1,
    })
    .expect("build the SPF resolver");
    let cap = s.capacity() as u64;
    assert_eq!(cap, 4096);
    let n = 2 * cap;
    for i in 0..n {
        let addr = IpAddr::from([192, 0, 2 + (i / 256) as u8, (i % 256) as u8]);
        let want = if addr.to_string().starts_with("192.0.2.") {
            Some(true)
        } else {
            Some(false)
        };
        assert_eq!(
            s.check(addr, "ip4.test", "h.test", "").await,
            want,
            "{addr}"
        );
    }
    let st = s.stats();
    assert_eq!(st.lookups, n);
    assert!(st.entries <= cap, "{st:?}");
    // Every lookup was stored: each either filled a slot or pushed out a live entry.
    assert_eq!(st.entries + st.evictions, n, "{st:?}");
}
