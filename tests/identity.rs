//! Client identities through the real server (DESIGN §11): a sender pool's retry from another
//! network passes under the `spf` identity against a real DNS server (a private `dnsmasq`,
//! tests/common/dns.rs) over native TCP, UDP and the Postfix policy protocol; softfail, fail and
//! records without `pass` do not pool; a DNS server that stops answering never stalls
//! decisions (they fall back within the timeout, counted); the `name` identity pools verified,
//! non-generic names only.
//!
//! No test asserts a timing; a generous bound only guards against a hang.

mod common;

use std::time::{Duration, Instant};

use common::dns::{Dns, DnsBuilder};
use common::{greylist_text, rcpt_attrs, sleep_past, udp_ask, with, Conn, PolicyConn, Server};

/// The pool: two /24s that are far apart, plus an include chain, a softfail and a fail domain.
fn zone() -> DnsBuilder {
    Dns::builder()
        .local("test")
        .ttl(300)
        .txt(
            "pool.test",
            "v=spf1 ip4:192.0.2.0/24 include:_spf.pool.test -all",
        )
        .txt(
            "_spf.pool.test",
            "v=spf1 ip4:198.51.100.0/24 ip6:2001:db8:7::/48 ~all",
        )
        .txt("soft.test", "v=spf1 ip4:192.0.2.0/24 ~all")
        .txt("fail.test", "v=spf1 -all")
        .txt("helo.pool.test", "v=spf1 redirect=pool.test")
}

fn spf_server(dns: &Dns, extra: &[&str]) -> Server {
    let server = dns.addr().to_string();
    let mut args = vec![
        "--client-identity",
        "spf,name,prefix",
        "--dns-server",
        &server,
        "--spf-timeout",
        "300ms",
    ];
    args.extend_from_slice(extra);
    Server::start(&args)
}

#[test]
fn a_pools_retry_from_another_network_passes_under_spf_on_every_transport() {
    let dns = zone().start();
    let srv = spf_server(&dns, &[]);
    let mut c = Conn::connect(srv.native);
    let text = greylist_text("news@pool.test", "bob@rcpt.example");
    // Native TCP: first attempt from one /24 of the pool (its result is not cached yet: the
    // request waits for the lookup), the retry from another /24 of it.
    assert_eq!(
        c.ask("CHECK 192.0.2.10 news@pool.test bob@rcpt.example"),
        format!("DEFER 2 {text}")
    );
    // UDP and the policy protocol, each their own triplet, first attempts from the pool.
    // (A UDP reply is never longer than its request: the text is cut.)
    let udp_first = udp_ask(
        srv.native,
        "CHECK 192.0.2.11 news@pool.test carol@rcpt.example helo=mx1.pool.test\n",
    );
    assert!(udp_first.starts_with("DEFER 2 "), "{udp_first}");
    let mut p = PolicyConn::connect(&srv.policy);
    let first_policy = p.ask(&rcpt_attrs(
        "192.0.2.12",
        "news@pool.test",
        "dave@rcpt.example",
    ));
    assert!(
        first_policy.starts_with("action=DEFER_IF_PERMIT "),
        "{first_policy}"
    );

    sleep_past(2);
    // The retries come from 198.51.100.0/24 and 2001:db8:7::/48, other networks of the pool
    // (through `include:`): one triplet each, so they pass as retried.
    assert_eq!(
        c.ask("CHECK 198.51.100.77 news@pool.test bob@rcpt.example"),
        "PASS retried"
    );
    assert_eq!(
        udp_ask(
            srv.native,
            "CHECK 2001:db8:7::25 news@pool.test carol@rcpt.example helo=mx2.pool.test\n"
        ),
        "PASS retried\n"
    );
    let retry = p.ask(&rcpt_attrs(
        "198.51.100.78",
        "news@pool.test",
        "dave@rcpt.example",
    ));
    assert!(retry.starts_with("action=PREPEND X-Greylist:"), "{retry}");

    // Lookups were made and cached: one per (address, domain), passes counted.
    assert!(srv.m("greyhound_spf_lookups_total") >= 6.0);
    assert!(srv.m("greyhound_spf_results_total{result=\"pass\"}") >= 6.0);
    assert_eq!(srv.m("greyhound_spf_timeouts_total"), 0.0);
    // A second request from the same address and domain is answered from the cache.
    let hits = srv.m("greyhound_spf_cache_hits_total");
    assert_eq!(
        c.ask("CHECK 198.51.100.77 news@pool.test bob@rcpt.example"),
        "PASS known"
    );
    assert_eq!(srv.m("greyhound_spf_cache_hits_total"), hits + 1.0);
}

#[test]
fn the_null_sender_pools_by_its_helo_name() {
    let dns = zone().start();
    let srv = spf_server(&dns, &[]);
    let mut c = Conn::connect(srv.native);
    let first = c.ask("CHECK 192.0.2.10 <> postmaster@rcpt.example helo=helo.pool.test");
    assert!(first.starts_with("DEFER 2 "), "{first}");
    sleep_past(2);
    // `redirect=` to the pool: the other /24 passes too.
    assert_eq!(
        c.ask("CHECK 198.51.100.9 <> postmaster@rcpt.example helo=helo.pool.test"),
        "PASS retried"
    );
}

#[test]
fn softfail_fail_and_no_record_do_not_pool() {
    let dns = zone().start();
    let srv = spf_server(&dns, &[]);
    let mut c = Conn::connect(srv.native);
    // Each domain: a first attempt from an address its record names (softfail's `ip4:` is a
    // pass), then one from another /24 that gets softfail / fail / none.
    for from in ["a@soft.test", "a@fail.test", "a@nospf.test"] {
        let r = c.ask(&format!("CHECK 192.0.2.10 {from} r@rcpt.example"));
        assert!(r.starts_with("DEFER 2 "), "{from}: {r}");
    }
    sleep_past(2);
    for (from, other_ip) in [
        ("a@soft.test", "203.0.113.10"),
        ("a@fail.test", "203.0.113.11"),
        ("a@nospf.test", "203.0.113.12"),
    ] {
        let r = c.ask(&format!("CHECK {other_ip} {from} r@rcpt.example"));
        assert!(r.starts_with("DEFER 2 "), "{from} from {other_ip}: {r}");
    }
    assert!(srv.m("greyhound_spf_results_total{result=\"softfail\"}") >= 1.0);
    assert!(srv.m("greyhound_spf_results_total{result=\"fail\"}") >= 2.0);
    assert!(srv.m("greyhound_spf_results_total{result=\"none\"}") >= 1.0);
}

#[test]
fn a_dns_server_that_stops_answering_never_stalls_decisions() {
    let mut dns = zone().start();
    let srv = spf_server(&dns, &[]);
    let mut c = Conn::connect(srv.native);
    // Cached before the outage: a first attempt from one /24 of the pool, and a PEEK (which
    // records nothing) that caches the SPF result of an address in another /24.
    assert!(c
        .ask("CHECK 192.0.2.10 news@pool.test r1@rcpt.example")
        .starts_with("DEFER 2 "));
    // The pool's pending record, peeked from its other /24: 2 seconds left, or 1 when the
    // lookup before it crossed a second (the clock counts whole seconds; CI saw it once).
    let r = c.ask("PEEK 198.51.100.9 news@pool.test r1@rcpt.example");
    assert!(
        r.starts_with("DEFER 2 ") || r.starts_with("DEFER 1 "),
        "{r}"
    );
    dns.pause();
    // Not cached: each request waits at most the timeout, then falls back to the prefix and is
    // counted; TCP, UDP and policy alike, and other connections are answered meanwhile.
    let started = Instant::now();
    for i in 0..5 {
        let r = c.ask(&format!(
            "CHECK 203.0.113.{i} x@soft.test r{i}@rcpt.example"
        ));
        assert!(r.starts_with("DEFER 2 "), "{r}");
    }
    let r = udp_ask(
        srv.native,
        "CHECK 203.0.113.50 y@soft.test r@rcpt.example\n",
    );
    assert!(r.starts_with("DEFER 2 "), "{r}");
    let mut p = PolicyConn::connect(&srv.policy);
    let r = p.ask(&rcpt_attrs("203.0.113.51", "z@soft.test", "r@rcpt.example"));
    assert!(r.starts_with("action=DEFER_IF_PERMIT "), "{r}");
    // A hang guard, not a timing: 7 lookups of 300 ms would be ~2 s.
    assert!(started.elapsed() < Duration::from_secs(30));
    // Each of the 7 fell back, counted: as a timeout when it waited the whole 300 ms, or as a
    // temperror when the resolver gave up on a query an earlier lookup had started (its own
    // per-query timeout, 2 s) within those 300 ms.
    assert!(srv.m("greyhound_spf_timeouts_total") >= 1.0);
    let fell_back = common::poll(Duration::from_secs(20), || {
        let n = srv.m("greyhound_spf_timeouts_total")
            + srv.m("greyhound_spf_results_total{result=\"temperror\"}");
        (n >= 7.0).then_some(n)
    });
    assert!(fell_back.is_some(), "{}", srv.metrics());
    // The pool's cached addresses still pool during the outage.
    sleep_past(2);
    let r = c.ask("CHECK 198.51.100.9 news@pool.test r1@rcpt.example");
    assert_eq!(r, "PASS retried");
    dns.resume();
}

#[test]
fn the_name_identity_pools_verified_names_only() {
    // No DNS needed: `name` uses the host name the MTA verified (native `name=`).
    let srv = Server::start(&["--client-identity", "name,prefix"]);
    let mut c = Conn::connect(srv.native);
    let first =
        c.ask("CHECK 192.0.2.54 a@gmail.example b@rcpt.example name=mail-by1-f54.bigmail.example");
    assert!(first.starts_with("DEFER 2 "), "{first}");
    let generic = c.ask(
        "CHECK 203.0.113.7 a@gmail.example b@rcpt.example name=203-0-113-7.dyn.bigmail.example",
    );
    assert!(generic.starts_with("DEFER 2 "), "{generic}");
    sleep_past(2);
    assert_eq!(
        c.ask("CHECK 198.51.100.9 a@gmail.example b@rcpt.example name=mail-ua1-f9.bigmail.example"),
        "PASS retried"
    );
    // A generic name from yet another network is not the pool.
    let other =
        c.ask("CHECK 198.18.0.80 a@gmail.example b@rcpt.example name=host8.pool.bigmail.example");
    assert!(other.starts_with("DEFER 2 "), "{other}");
    // Postfix's unverified name ("unknown") is no identity either.
    let mut p = PolicyConn::connect(&srv.policy);
    let attrs = rcpt_attrs("192.0.2.200", "a@gmail.example", "b@rcpt.example");
    let r = p.ask(&with(attrs, "client_name", "unknown"));
    assert!(r.starts_with("action=DEFER_IF_PERMIT "), "{r}");
    // With `prefix` only, the same pool retry would have been a new triplet.
    let srv = Server::start(&["--client-identity", "prefix"]);
    let mut c = Conn::connect(srv.native);
    c.ask("CHECK 192.0.2.54 a@gmail.example b@rcpt.example name=mail-by1-f54.bigmail.example");
    sleep_past(2);
    let r =
        c.ask("CHECK 198.51.100.9 a@gmail.example b@rcpt.example name=mail-ua1-f9.bigmail.example");
    assert!(r.starts_with("DEFER 2 "), "{r}");
}
