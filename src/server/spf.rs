//! The `spf` client identity on the request path (DESIGN §11): which requests need an SPF
//! result, waiting for the ones not cached (never longer than `spf-timeout`, never holding up
//! another connection), and the metrics.
//!
//! Every transport does the same two steps around its engine batch:
//! 1. before deciding, each CHECK or PEEK whose result is not cached starts (or joins) its
//!    lookup; the batch waits for all of them at once, bounded by the timeout. TCP and policy
//!    connections wait in their own task; a UDP worker thread cannot wait, so it hands a
//!    datagram with a miss to a task of the runtime, which answers it when its lookups are
//!    done (see `native_udp.rs`), and goes on with the others;
//! 2. while deciding, a request uses the result found in step 1 (`SpfBatch::passes`; the cache
//!    is read once per request): a pass gives it the `spf:<domain>` identity; anything else, a
//!    timeout included, falls back to the next identity.
//!
//! Each request counts once as a cache hit or a miss, in step 1.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use crate::proto::native::{Command, Parsed, Request, Triplet};
use crate::spf::{Spf, SpfKey};

/// Datagrams a UDP worker may hand over to wait for their lookups, at most; past it a
/// datagram is answered at once and its requests fall back (counted as shed). 4096 datagrams
/// of up to 64 KiB would be 256 MiB at worst; real ones are a few hundred bytes.
pub(crate) const MAX_HELD_DATAGRAMS: usize = 4096;

/// The resolver as the server holds it.
#[derive(Debug)]
pub struct SpfPath {
    /// The resolver and its cache.
    pub spf: Arc<Spf>,
    /// UDP datagrams waiting for lookups now.
    pub(crate) held: AtomicUsize,
    /// UDP datagrams answered at once, falling back, because every place was taken.
    held_full: AtomicU64,
}

impl SpfPath {
    /// The request path of `spf`.
    pub fn new(spf: Arc<Spf>) -> Self {
        Self {
            spf,
            held: AtomicUsize::new(0),
            held_full: AtomicU64::new(0),
        }
    }

    /// Counts a datagram answered at once for want of a place to wait.
    pub(crate) fn count_full(&self) {
        self.held_full.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes a place for a UDP datagram to wait in; `false` when all are taken.
    pub(crate) fn hold(&self) -> bool {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < MAX_HELD_DATAGRAMS).then_some(n + 1)
            })
            .is_ok()
    }

    /// Gives back the place of a datagram answered.
    pub(crate) fn release(&self) {
        self.held.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The domain whose SPF pool a request may belong to: the sender's domain, or the HELO name
/// for the null sender (RFC 7208 §2.4). `None` for a sender without a domain.
pub(crate) fn spf_domain<'a>(sender: &'a str, helo: &'a str) -> Option<&'a str> {
    // On bytes, from the end: `rsplit_once('@')` and `trim_end_matches('.')` went through the
    // generic pattern searchers (3 % of a server's CPU with the `spf` identity on, perf), and
    // `memchr::memrchr`'s dispatch cost more than the few dozen bytes it scans (~95
    // instructions a call, callgrind).
    let d = if null_sender(sender) {
        helo
    } else {
        let at = rfind_at(sender.as_bytes())?;
        &sender[at + 1..]
    };
    // `d` is a slice of `source(sender, helo)`: `Passed` keeps where.
    let end = d.bytes().rposition(|b| b != b'.')? + 1;
    // `end` follows an ASCII byte, so it is a character boundary.
    Some(&d[..end])
}

/// Where the last `@` of `s` is: eight bytes at a time from the end.
fn rfind_at(s: &[u8]) -> Option<usize> {
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    const ATS: u64 = u64::from_ne_bytes([b'@'; 8]);
    let mut end = s.len();
    while end >= 8 {
        let word = s[end - 8..end].first_chunk::<8>().expect("eight bytes");
        let x = u64::from_le_bytes(*word) ^ ATS;
        // 0x80 in each byte of `x` that is zero (an `@`), exactly: no carry crosses a byte.
        let zero = !(((x & LOW7).wrapping_add(LOW7)) | x | LOW7);
        if zero != 0 {
            return Some(end - 8 + (63 - zero.leading_zeros() as usize) / 8);
        }
        end -= 8;
    }
    s[..end].iter().rposition(|&b| b == b'@')
}

/// The domain a request passed SPF for, from the cache only (no DNS, not counted): what
/// `greyhound admin lookup` shows.
pub(crate) fn passed<'a>(
    spf: &Spf,
    client: IpAddr,
    sender: &'a str,
    helo: &'a str,
) -> Option<&'a str> {
    let d = spf_domain(sender, helo)?;
    (spf.probe(client, d) == Some(true)).then_some(d)
}

/// The SPF domain of a CHECK or PEEK line ("" for none).
fn domain<'r>(r: &'r Parsed<'_>) -> &'r str {
    triplet(r)
        .and_then(|t| spf_domain(t.sender, t.helo.unwrap_or("")))
        .unwrap_or("")
}

/// The triplet of a CHECK or PEEK line.
pub(crate) fn triplet<'r, 'a>(r: &'r Parsed<'a>) -> Option<&'r Triplet<'a>> {
    match r {
        Ok(Request {
            command: Command::Check(t) | Command::Peek(t),
            ..
        }) => Some(t),
        _ => None,
    }
}

/// What a request needs from the SPF cache.
#[derive(Clone, Copy)]
enum Probe {
    /// No CHECK or PEEK, or no domain to check: no SPF identity.
    None,
    /// A domain too long for DNS: does not pass, no lookup. (Other invalid names are found
    /// on a cache miss: none is ever cached.)
    Invalid,
    /// Look this key up; the domain is there in the request.
    Key(SpfKey, Passed),
}

/// Whether a request of a batch passed SPF, and for which domain: where [`spf_domain`] found
/// it, as a byte range of the request's sender (of its HELO name for the null sender), so
/// that deciding does not search the sender again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Passed {
    start: u32,
    /// 0: did not pass (a domain is never empty).
    end: u32,
}

impl Passed {
    /// Did not pass, or no SPF identity.
    pub(crate) const NO: Passed = Passed { start: 0, end: 0 };

    /// The range of `domain`, a slice of `within`.
    fn at(domain: &str, within: &str) -> Passed {
        let start = domain.as_ptr() as usize - within.as_ptr() as usize;
        Passed {
            start: start as u32,
            end: (start + domain.len()) as u32,
        }
    }

    /// The `spf` identity of a request ([`crate::engine::Query::spf`]) with this sender and
    /// HELO name: the domain it passed for, if it did.
    pub(crate) fn identity<'a>(self, sender: &'a str, helo: &'a str) -> Option<&'a str> {
        if self.end == 0 {
            return None;
        }
        source(sender, helo).get(self.start as usize..self.end as usize)
    }
}

/// The null sender, whose SPF domain is the HELO name.
fn null_sender(sender: &str) -> bool {
    sender.is_empty() || sender == "<>"
}

/// The string a request's SPF domain is taken from: its sender, or its HELO name for the
/// null sender.
fn source<'a>(sender: &'a str, helo: &'a str) -> &'a str {
    if null_sender(sender) {
        helo
    } else {
        sender
    }
}

/// The SPF results of a batch of native requests, with the buffers that find them; kept by a
/// connection or a UDP worker from one batch to the next, so no batch allocates.
#[derive(Default)]
pub(crate) struct SpfBatch {
    /// One per request of the batch: its cache key, computed (and its cache set prefetched)
    /// for all the requests before any is read, so the batch's cache misses overlap.
    probes: Vec<Probe>,
    /// One per request of the batch: whether it passed SPF, and for which domain.
    pub(crate) passes: Vec<Passed>,
}

impl SpfBatch {
    /// Fills `probes` with those of `reqs`, prefetching each key's cache set.
    fn probe(&mut self, spf: &Spf, reqs: &[Parsed<'_>]) {
        self.probes.clear();
        self.probes.extend(reqs.iter().map(|r| {
            let Some(t) = triplet(r) else {
                return Probe::None;
            };
            let helo = t.helo.unwrap_or("");
            let Some(d) = spf_domain(t.sender, helo) else {
                return Probe::None;
            };
            match spf.key(t.client, d) {
                Some(k) => {
                    spf.prefetch(k);
                    Probe::Key(k, Passed::at(d, source(t.sender, helo)))
                }
                None => Probe::Invalid,
            }
        }));
    }

    /// Appends to `passes` whether each request of `reqs` passes SPF, from the cache (each
    /// counted as a hit or a miss); not when the result is not cached. Returns whether any
    /// was not: such a datagram waits for its lookups on a task ([`SpfBatch::resolve`]).
    pub(crate) fn append_cached(&mut self, spf: &Spf, reqs: &[Parsed<'_>]) -> bool {
        self.probe(spf, reqs);
        let mut missed = false;
        let mut cache = spf.reader(true);
        self.passes
            .extend(self.probes.iter().zip(reqs).map(|(p, r)| match *p {
                Probe::None | Probe::Invalid => Passed::NO,
                Probe::Key(k, at) => match cache.get(k, || domain(r)) {
                    Some(true) => at,
                    Some(false) => Passed::NO,
                    None => {
                        missed = true;
                        Passed::NO
                    }
                },
            }));
        missed
    }

    /// Sets `passes` (one per request of `reqs`) to whether each passes SPF: from the cache,
    /// or by a lookup (started, or joined if one is in flight) that the batch waits for
    /// together with the others, at most the timeout; a request whose lookup did not finish in
    /// time does not pass (it falls back). `count`: count each request as a cache hit or miss
    /// (not when it was counted already, by [`SpfBatch::append_cached`]).
    pub(crate) async fn resolve(&mut self, spf: &Arc<Spf>, reqs: &[Parsed<'_>], count: bool) {
        self.probe(spf, reqs);
        self.passes.clear();
        let mut waits = Vec::new();
        let mut cache = spf.reader(count);
        for (i, (r, p)) in reqs.iter().zip(&self.probes).enumerate() {
            let pass = match *p {
                Probe::None | Probe::Invalid => Passed::NO,
                Probe::Key(k, at) => match cache.get(k, || domain(r)) {
                    Some(true) => at,
                    Some(false) => Passed::NO,
                    None => {
                        if let Some(t) = triplet(r) {
                            let helo = t.helo.unwrap_or("");
                            waits.push((i, at, start(spf, t.client, t.sender, helo)));
                        }
                        Passed::NO
                    }
                },
            };
            self.passes.push(pass);
        }
        // Counted before the wait: the reader is not held across an await.
        drop(cache);
        for (i, at, w) in waits {
            // A waiter that panicked is a request without a result: it falls back.
            if matches!(w.await, Ok(Some(true))) {
                self.passes[i] = at;
            }
        }
    }
}

/// Whether one request (Postfix policy) passes SPF, and for which domain: from the cache, or
/// waiting for its lookup at most the timeout.
pub(crate) async fn resolve_one(
    spf: &Arc<Spf>,
    client: IpAddr,
    sender: &str,
    helo: &str,
) -> Passed {
    let Some(d) = spf_domain(sender, helo) else {
        return Passed::NO;
    };
    let pass = match spf.cached(client, d) {
        Some(pass) => pass,
        None => matches!(start(spf, client, sender, helo).await, Ok(Some(true))),
    };
    if pass {
        Passed::at(d, source(sender, helo))
    } else {
        Passed::NO
    }
}

/// A task waiting (at most the timeout) for the lookup of one request: tasks, so the waits of
/// one batch run side by side.
fn start(
    spf: &Arc<Spf>,
    client: IpAddr,
    sender: &str,
    helo: &str,
) -> tokio::task::JoinHandle<Option<bool>> {
    let spf = spf.clone();
    let domain = spf_domain(sender, helo).unwrap_or_default().to_owned();
    let (sender, helo) = (sender.to_owned(), helo.to_owned());
    tokio::spawn(async move { spf.check(client, &domain, &helo, &sender).await })
}

/// The SPF resolver's counters as metrics, read at each scrape.
#[derive(Debug)]
pub(crate) struct SpfCollector(pub Arc<SpfPath>);

impl Collector for SpfCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.0.spf.stats();
        let held_full = self.0.held_full.load(Ordering::Relaxed);
        let counters = [
            ("spf_lookups", "SPF evaluations started (each a DNS round of up to 10 lookups).", s.lookups),
            ("spf_cache_hits", "Requests whose SPF result was cached.", s.hits),
            ("spf_cache_misses", "Requests whose SPF result was not cached.", s.misses),
            (
                "spf_timeouts",
                "Requests that waited spf-timeout for an SPF result and fell back to the next identity.",
                s.timeouts,
            ),
            (
                "spf_shed",
                "Requests (or UDP datagrams) that fell back at once because too many SPF lookups (or datagrams waiting for them) were pending.",
                s.shed + held_full,
            ),
            ("spf_cache_evictions", "Live SPF results pushed out of the full cache.", s.evictions),
        ];
        for (name, help, v) in counters {
            let c = ConstCounter::new(v);
            c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        let r = s.results;
        let c = ConstCounter::new(0u64);
        let mut family = encoder.encode_descriptor(
            "spf_results",
            "Finished SPF evaluations by result; only pass pools.",
            None,
            c.metric_type(),
        )?;
        for (result, v) in [
            ("pass", r.pass),
            ("fail", r.fail),
            ("softfail", r.softfail),
            ("neutral", r.neutral),
            ("none", r.none),
            ("permerror", r.permerror),
            ("temperror", r.temperror),
        ] {
            let labels = [("result", result)];
            ConstCounter::new(v).encode(family.encode_family(&labels)?)?;
        }
        let g = ConstGauge::new(s.entries as i64);
        g.encode(encoder.encode_descriptor(
            "spf_cache_entries",
            "SPF results in the cache.",
            None,
            g.metric_type(),
        )?)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_domain_is_the_senders_or_the_helo_for_the_null_sender() {
        assert_eq!(spf_domain("a@Example.COM", "mx.x"), Some("Example.COM"));
        assert_eq!(spf_domain("a@b@example.org.", "mx.x"), Some("example.org"));
        assert_eq!(spf_domain("", "mx.example.net"), Some("mx.example.net"));
        assert_eq!(spf_domain("<>", "mx.example.net"), Some("mx.example.net"));
        assert_eq!(spf_domain("", ""), None);
        assert_eq!(spf_domain("postmaster", "mx.example.net"), None);
        assert_eq!(spf_domain("a@", "mx.example.net"), None);
    }

    #[test]
    fn the_last_at_is_found_in_any_position_and_byte_neighbourhood() {
        // Every length up to three words, an `@` at every place (alone, and with another
        // before it), among bytes next to '@' in value ('?', 'A', 0xC0 of UTF-8), which a
        // word trick that lets carries cross bytes would take for one.
        for len in 0..24 {
            for fill in [b'?', b'A', b'a', 0xc0] {
                let plain = vec![fill; len];
                assert_eq!(rfind_at(&plain), None);
                for at in 0..len {
                    let mut s = plain.clone();
                    s[at] = b'@';
                    assert_eq!(rfind_at(&s), Some(at), "len {len}, fill {fill}, at {at}");
                    if at > 0 {
                        s[at / 2] = b'@';
                        assert_eq!(rfind_at(&s), Some(at), "two @, len {len}, at {at}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_pass_gives_back_the_domain_it_was_found_for() {
        for (sender, helo, domain) in [
            ("a@Example.COM", "mx.x", "Example.COM"),
            ("a@b@example.org..", "mx.x", "example.org"),
            ("", "mx.example.net.", "mx.example.net"),
            ("<>", "mx.example.net", "mx.example.net"),
        ] {
            let d = spf_domain(sender, helo).unwrap();
            let passed = Passed::at(d, source(sender, helo));
            assert_eq!(passed.identity(sender, helo), Some(domain));
        }
        assert_eq!(Passed::NO.identity("a@example.com", "mx.x"), None);
    }
}
