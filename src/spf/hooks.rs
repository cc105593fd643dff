//! What one `check_host` evaluation looked up: the shortest TTL among the records it read, and
//! its void lookups (RFC 7208 §4.6.4), seen through the cache hooks `mail-auth` takes.
//!
//! `mail-auth` 0.13 enforces the 10-lookup limit but not the limit of two void lookups (an
//! answer with no records, or NXDOMAIN). It asks a caller-supplied cache before every TXT, MX,
//! A, AAAA and PTR query and hands it every answer with its expiry; a [`Tracker`] is such a
//! cache, one per evaluation, that never answers from memory (hickory caches the records) but
//! watches: a query asked for and never answered ended in an error (void or temporary), one
//! answered with no records was void. Queries run one after another within an evaluation, so
//! "asked and not answered before the next ask" identifies them. Past two voids, it answers
//! every further ask itself with an empty set (or, for TXT, a parse error, which ends an
//! `include`/`redirect` in permerror), so the evaluation finishes without more DNS traffic, and
//! [`Tracker::verdict`] turns the result into permerror.
//!
//! Blind spots: `exists:` asks the A and then the AAAA hook for one name but queries through
//! hickory's `lookup_ip`, which answers neither hook; its outcome is not seen, so it is not
//! counted as void (the 10-lookup limit still applies to it). `ptr` and the `%{p}` macro
//! ignore DNS errors, so a temporary failure there counts as void; so does a void `exp=`
//! lookup after a fail (which does not pool either way).

use std::borrow::Borrow;
use std::hash::Hash;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use mail_auth::{DnssecStatus, Error, RecordSet, ResolverCache, SpfResult, Txt, MX};

/// RFC 7208 §4.6.4: "SPF implementations SHOULD limit 'void lookups' to two."
pub const VOID_LOOKUP_LIMIT: u32 = 2;

/// The record types the hooks see, with what makes an answer void and what to answer once the
/// limit is exceeded.
pub trait Answer: Sized {
    /// An A/AAAA hook (`exists` asks both for one name).
    const ADDRESS: Option<bool> = None;
    /// The answer holds no records.
    fn is_void(&self) -> bool;
    /// The answer given instead of a DNS query once the void limit is exceeded.
    fn cut_short() -> Self;
}

fn empty<T>() -> RecordSet<T> {
    RecordSet {
        rrset: Vec::new().into(),
        dnssec_status: DnssecStatus::Indeterminate,
    }
}

impl Answer for Txt {
    // A TXT answer reaches the hook only when the name had TXT records; `mail-auth` stores a
    // record that is not SPF as an error value, which is not void.
    fn is_void(&self) -> bool {
        false
    }
    fn cut_short() -> Self {
        Txt::Error(Error::ParseError)
    }
}

impl Answer for RecordSet<MX> {
    fn is_void(&self) -> bool {
        self.rrset.is_empty()
    }
    fn cut_short() -> Self {
        empty()
    }
}

impl Answer for RecordSet<Ipv4Addr> {
    const ADDRESS: Option<bool> = Some(true);
    fn is_void(&self) -> bool {
        self.rrset.is_empty()
    }
    fn cut_short() -> Self {
        empty()
    }
}

impl Answer for RecordSet<Ipv6Addr> {
    const ADDRESS: Option<bool> = Some(false);
    fn is_void(&self) -> bool {
        self.rrset.is_empty()
    }
    fn cut_short() -> Self {
        empty()
    }
}

impl Answer for RecordSet<Box<str>> {
    fn is_void(&self) -> bool {
        self.rrset.is_empty()
    }
    fn cut_short() -> Self {
        empty()
    }
}

/// One evaluation's observer (shared by reference between the five hooks; atomics because the
/// evaluation's future must be `Send`, not because of contention).
#[derive(Default)]
pub struct Tracker {
    /// A query was asked for and has not been answered yet.
    pending: AtomicBool,
    /// The name of the last A hook ask, hashed, while it is pending (0 = none): an AAAA ask for
    /// the same name right after it is `exists`, whose outcome the hooks do not see.
    pending_a: AtomicU64,
    voids: AtomicU32,
    /// The earliest expiry of any answer read.
    expires: Mutex<Option<Instant>>,
    hasher: ahash::RandomState,
}

impl Tracker {
    /// A fresh tracker for one evaluation.
    pub fn new() -> Self {
        Self::default()
    }

    /// Void lookups counted so far.
    pub fn voids(&self) -> u32 {
        self.voids.load(Ordering::Relaxed)
    }

    /// The earliest expiry among the answers read, if any answer was read.
    pub fn expires(&self) -> Option<Instant> {
        *self.expires.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn exceeded(&self) -> bool {
        self.voids() > VOID_LOOKUP_LIMIT
    }

    /// The evaluation's final result with the void limit applied, and whether the limit
    /// changed it. A pending query at the end ended in an error: the temporary error that
    /// stopped the evaluation if it ended in temperror, a void otherwise.
    pub fn verdict(&self, result: SpfResult) -> (SpfResult, bool) {
        if self.pending.swap(false, Ordering::Relaxed) && result != SpfResult::TempError {
            self.voids.fetch_add(1, Ordering::Relaxed);
        }
        if self.exceeded() && result != SpfResult::PermError {
            (SpfResult::PermError, true)
        } else {
            (result, false)
        }
    }
}

impl<K, V: Answer> ResolverCache<K, V> for Tracker {
    fn get<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if self.exceeded() {
            return Some(V::cut_short());
        }
        let name_hash = self.hasher.hash_one(name) | 1;
        let was_pending = self.pending.swap(true, Ordering::Relaxed);
        let pending_a = self.pending_a.swap(0, Ordering::Relaxed);
        if was_pending {
            if V::ADDRESS == Some(false) && pending_a == name_hash {
                // `exists`: the A ask before this one was for the same name, and neither will
                // be answered. Its outcome is unknown, so it is not counted either way.
                self.pending.store(false, Ordering::Relaxed);
                return None;
            }
            // The query before this one was asked for and never answered: void.
            self.voids.fetch_add(1, Ordering::Relaxed);
            if self.exceeded() {
                self.pending.store(false, Ordering::Relaxed);
                return Some(V::cut_short());
            }
        }
        if V::ADDRESS == Some(true) {
            self.pending_a.store(name_hash, Ordering::Relaxed);
        }
        None
    }

    fn remove<Q>(&self, _: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        None
    }

    fn insert(&self, _: K, value: V, valid_until: Instant) {
        self.pending.store(false, Ordering::Relaxed);
        self.pending_a.store(0, Ordering::Relaxed);
        if value.is_void() {
            self.voids.fetch_add(1, Ordering::Relaxed);
        }
        let mut e = self.expires.lock().unwrap_or_else(|e| e.into_inner());
        *e = Some(e.map_or(valid_until, |old| old.min(valid_until)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    type A = RecordSet<Ipv4Addr>;
    type Aaaa = RecordSet<Ipv6Addr>;

    fn ask<V: Answer>(t: &Tracker, name: &str) -> Option<V> {
        <Tracker as ResolverCache<Box<str>, V>>::get::<str>(t, name)
    }

    fn answer<V: Answer>(t: &Tracker, v: V, ttl: u64) {
        let until = Instant::now() + Duration::from_secs(ttl);
        <Tracker as ResolverCache<Box<str>, V>>::insert(t, "n".into(), v, until);
    }

    fn one_addr() -> A {
        RecordSet {
            rrset: vec![Ipv4Addr::new(192, 0, 2, 1)].into(),
            dnssec_status: DnssecStatus::Indeterminate,
        }
    }

    #[test]
    fn unanswered_or_empty_answers_are_void() {
        let t = Tracker::new();
        assert!(ask::<Txt>(&t, "d.test").is_none());
        answer(&t, Txt::Error(Error::ParseError), 300); // a TXT that is not SPF: not void
        assert!(ask::<A>(&t, "a.test").is_none());
        answer(&t, one_addr(), 300);
        assert_eq!(t.voids(), 0);
        assert!(ask::<A>(&t, "nx1.test").is_none()); // never answered (NXDOMAIN) ...
        assert!(ask::<RecordSet<MX>>(&t, "m.test").is_none()); // ... seen at the next ask
        assert_eq!(t.voids(), 1);
        answer(&t, empty::<MX>(), 300); // no data
        assert_eq!(t.voids(), 2);
        assert_eq!(t.verdict(SpfResult::Pass), (SpfResult::Pass, false));
    }

    #[test]
    fn a_third_void_cuts_short_and_is_permerror() {
        let t = Tracker::new();
        for name in ["nx1", "nx2", "nx3"] {
            assert!(ask::<A>(&t, name).is_none(), "{name} goes to DNS");
        }
        assert_eq!(t.voids(), 2);
        // The ask after the third void is answered here, without DNS.
        assert_eq!(ask::<A>(&t, "x").map(|r| r.rrset.len()), Some(0));
        assert!(matches!(
            ask::<Txt>(&t, "inc"),
            Some(Txt::Error(Error::ParseError))
        ));
        assert_eq!(t.voids(), 3);
        assert_eq!(t.verdict(SpfResult::Fail), (SpfResult::PermError, true));
        assert_eq!(
            t.verdict(SpfResult::PermError),
            (SpfResult::PermError, false)
        );
    }

    #[test]
    fn a_pending_ask_at_the_end_is_void_unless_it_was_the_temperror() {
        let setup = || {
            let t = Tracker::new();
            for name in ["nx1", "nx2", "nx3"] {
                ask::<A>(&t, name);
            }
            t
        };
        assert_eq!(
            setup().verdict(SpfResult::TempError),
            (SpfResult::TempError, false)
        );
        assert_eq!(
            setup().verdict(SpfResult::Neutral),
            (SpfResult::PermError, true)
        );
    }

    #[test]
    fn exists_is_not_counted() {
        let t = Tracker::new();
        for name in ["e1", "e2", "e3", "e4"] {
            assert!(ask::<A>(&t, name).is_none());
            assert!(ask::<Aaaa>(&t, name).is_none());
        }
        assert_eq!(t.voids(), 0);
        assert_eq!(t.verdict(SpfResult::Neutral), (SpfResult::Neutral, false));
        // An AAAA ask for another name after an unanswered A ask is a void (an IPv6 `a` after
        // an IPv4 one cannot happen in one evaluation, but the count stays honest).
        let t = Tracker::new();
        ask::<A>(&t, "x");
        ask::<Aaaa>(&t, "y");
        assert_eq!(t.voids(), 1);
    }

    #[test]
    fn expires_is_the_earliest_answer() {
        let t = Tracker::new();
        assert_eq!(t.expires(), None);
        answer(&t, one_addr(), 3600);
        answer(&t, one_addr(), 60);
        answer(&t, one_addr(), 600);
        let left = t.expires().unwrap() - Instant::now();
        assert!(
            left <= Duration::from_secs(60) && left > Duration::from_secs(50),
            "{left:?}"
        );
    }
}
