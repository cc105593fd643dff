//! The fixed-size records kept in the tables, and the rules that read them.
//!
//! Records hold no strings and no addresses: a key, and times in engine seconds.

use super::clock::Secs;
use super::key::Key;
use super::policy::Policy;
use super::table::Record;

/// Top bit of `first` marks a whitelisted (passed) triplet; see [`super::clock`].
const WHITELISTED: u32 = 1 << 31;

/// One triplet: 24 bytes.
///
/// A whitelisted triplet's `whitelisted_until` is not stored: every pass sets it to
/// `now + whitelist_ttl` and `last_seen` to `now`, so it is always `last_seen + whitelist_ttl`.
/// Deriving it saves 4 bytes per record, which is what keeps a record at 24 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TripletRecord {
    /// The triplet's keyed hash.
    pub key: Key,
    first: u32,
    last_seen: Secs,
}

/// What the rules say about a triplet at a given time, before any effect is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Judgement {
    /// Whitelisted and not expired.
    Known,
    /// Greylisted, delay not yet over: this many seconds left.
    Early(u32),
    /// Greylisted, delay over, inside the retry window: passes after waiting this long.
    Retried(u32),
    /// Unknown, expired, or retried too late: starts over.
    New,
}

impl TripletRecord {
    /// A newly greylisted triplet first seen at `now`.
    pub fn new(key: Key, now: Secs) -> Self {
        Self {
            key,
            first: now & !WHITELISTED,
            last_seen: now,
        }
    }

    /// A record from stored parts (snapshots, replication).
    pub fn from_parts(key: Key, first_seen: Secs, last_seen: Secs, whitelisted: bool) -> Self {
        let flag = if whitelisted { WHITELISTED } else { 0 };
        Self {
            key,
            first: (first_seen & !WHITELISTED) | flag,
            last_seen,
        }
    }

    /// When the triplet was first seen (in this greylisting cycle).
    pub fn first_seen(&self) -> Secs {
        self.first & !WHITELISTED
    }

    /// When the triplet was last asked about.
    pub fn last_seen(&self) -> Secs {
        self.last_seen
    }

    /// Whether the triplet has passed and is whitelisted (if not expired).
    pub fn is_whitelisted(&self) -> bool {
        self.first & WHITELISTED != 0
    }

    /// The last second at which the record is alive.
    pub fn alive_until(&self, p: &Policy) -> u64 {
        if self.is_whitelisted() {
            u64::from(self.last_seen) + u64::from(p.whitelist_ttl)
        } else {
            u64::from(self.first_seen()) + u64::from(p.retry_window)
        }
    }

    /// The greylisting rules (docs/OPERATIONS.md §1) for this record at `now` (`None`: none).
    pub(crate) fn judge(record: Option<&Self>, now: Secs, p: &Policy) -> Judgement {
        let Some(r) = record else {
            return Judgement::New;
        };
        if u64::from(now) > r.alive_until(p) {
            return Judgement::New;
        }
        if r.is_whitelisted() {
            return Judgement::Known;
        }
        let first = r.first_seen();
        let pass_at = u64::from(first) + u64::from(p.delay);
        if u64::from(now) < pass_at {
            // Clamped: after the clock steps back, never ask for more than a fresh triplet.
            Judgement::Early(((pass_at - u64::from(now)) as u32).min(p.delay))
        } else {
            Judgement::Retried(now - first)
        }
    }

    /// Records a request at `now` (never moves `last_seen` back, so replicas can merge by max).
    pub(crate) fn touch(&mut self, now: Secs) {
        self.last_seen = self.last_seen.max(now);
    }

    /// This record combined with a peer's copy of it (same key): first seen the earlier, last
    /// seen the later, whitelisted if either is. Commutative, associative and idempotent, so
    /// replicas converge whatever order and however often they hear of changes.
    pub fn merged(&self, other: &Self) -> Self {
        Self::from_parts(
            self.key,
            self.first_seen().min(other.first_seen()),
            self.last_seen.max(other.last_seen),
            self.is_whitelisted() || other.is_whitelisted(),
        )
    }

    /// Marks the triplet passed at `now`.
    pub(crate) fn whitelist(&mut self, now: Secs) {
        self.first |= WHITELISTED;
        self.touch(now);
    }
}

impl Record for TripletRecord {
    const VACANT: Self = Self {
        key: Key::VACANT,
        first: 0,
        last_seen: 0,
    };
    fn key(&self) -> Key {
        self.key
    }
}

/// One client network's auto-whitelist state: 32 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AwlRecord {
    /// The client network's keyed hash.
    pub key: Key,
    /// Last pass (or AWL hit) of this client.
    pub last_seen: Secs,
    /// Last pass that was counted (at most one per `awl_interval`).
    pub last_counted: Secs,
    /// Counted passes.
    pub count: u32,
    _reserved: u32,
}

impl AwlRecord {
    /// A client whose first triplet passed at `now`.
    pub fn new(key: Key, now: Secs) -> Self {
        Self::from_parts(key, now, now, 1)
    }

    /// A record from stored parts.
    pub fn from_parts(key: Key, last_seen: Secs, last_counted: Secs, count: u32) -> Self {
        Self {
            key,
            last_seen,
            last_counted,
            count,
            _reserved: 0,
        }
    }

    /// The last second at which the record is alive.
    pub fn alive_until(&self, p: &Policy) -> u64 {
        u64::from(self.last_seen) + u64::from(p.awl_ttl)
    }

    /// This record combined with a peer's copy (same key): every field the larger, so two
    /// nodes counting passes of one client agree on the higher count (not the sum: the same
    /// pass may have been counted on both). Commutative, associative and idempotent.
    pub fn merged(&self, other: &Self) -> Self {
        Self::from_parts(
            self.key,
            self.last_seen.max(other.last_seen),
            self.last_counted.max(other.last_counted),
            self.count.max(other.count),
        )
    }

    /// Whether the client is auto-whitelisted at `now`.
    pub fn is_active(&self, now: Secs, p: &Policy) -> bool {
        p.awl_clients > 0 && self.count >= p.awl_clients && u64::from(now) <= self.alive_until(p)
    }

    /// Counts one passed triplet at `now`.
    pub(crate) fn count_pass(&mut self, now: Secs, p: &Policy) {
        if u64::from(now) > self.alive_until(p) {
            *self = Self::new(self.key, now);
            return;
        }
        if u64::from(now) >= u64::from(self.last_counted) + u64::from(p.awl_interval) {
            self.count = self.count.saturating_add(1);
            self.last_counted = now;
        }
        self.last_seen = self.last_seen.max(now);
    }
}

impl Record for AwlRecord {
    const VACANT: Self = Self {
        key: Key::VACANT,
        last_seen: 0,
        last_counted: 0,
        count: 0,
        _reserved: 0,
    };
    fn key(&self) -> Key {
        self.key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_compact() {
        assert_eq!(std::mem::size_of::<TripletRecord>(), 24);
        assert_eq!(std::mem::size_of::<AwlRecord>(), 32);
    }

    #[test]
    fn flag_does_not_leak_into_times() {
        let k = Key { lo: 1, hi: 2 };
        let r = TripletRecord::from_parts(k, 1000, 2000, true);
        assert!(r.is_whitelisted());
        assert_eq!((r.first_seen(), r.last_seen()), (1000, 2000));
        let r = TripletRecord::from_parts(k, 1000, 2000, false);
        assert!(!r.is_whitelisted());
        assert_eq!(r.first_seen(), 1000);
    }
}
