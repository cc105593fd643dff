//! The bounded result cache: (client address, lower-cased domain) → SPF result, until a
//! deadline taken from the DNS TTLs.
//!
//! A set-associative table allocated once at its bound: the 128-bit keyed hash of the key picks a
//! shard (top 6 bits) and a set of [`WAYS`] slots in it; a key can live in any slot of its set.
//! Inserting into a full set takes an empty or expired slot first, otherwise evicts the live
//! slot that expires soonest (for equal TTLs, the oldest). So the table never grows past its
//! bound, eviction is O([`WAYS`]) with no list or heap to maintain, and a lookup reads one set
//! (two cache lines) under one shard lock.
//!
//! A slot keeps 64 bits of the hash as its tag, not the key: 16 bytes per entry instead of the
//! 40+ a stored domain would cost. A wrong answer needs two keys of one set to share 64 bits of a
//! keyed hash whose key is random per process (1 in 2^64 per comparison; an attacker cannot aim
//! at it without the key).

use std::sync::Mutex;

/// Slots per set. 8 × 16 bytes = 128 bytes: two cache lines per lookup.
pub const WAYS: usize = 8;

/// Lock shards. More than the machine has cores, so two lookups rarely meet on one lock.
pub const SHARDS: usize = 64;

/// One cached result. `expires == 0` marks an empty slot.
#[derive(Clone, Copy, Default)]
struct Slot {
    tag: u64,
    /// Seconds since the cache's epoch after which the entry is stale; 0 = empty.
    expires: u32,
    /// The result's kind ([`super::Kind`] as u8).
    kind: u8,
}

/// What an insert did to the table, for the statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    /// Filled a slot that was empty: one more entry.
    New,
    /// Replaced the same key or an expired entry: the count is unchanged.
    Replaced,
    /// Pushed out a live entry of another key.
    Evicted,
}

struct Shard {
    slots: Box<[Slot]>,
    /// Slots in use (live or expired but not yet reused).
    len: usize,
}

/// The table. Time is passed in as whole seconds since an epoch the owner keeps, so tests and
/// the owner agree on it without a clock here.
pub struct Cache {
    shards: Box<[Mutex<Shard>]>,
    /// Sets per shard.
    sets: usize,
    /// Each shard's slot array's address, for prefetching without its lock (the arrays are
    /// allocated once and never move; a prefetch is a hint, so even a stale one is harmless).
    bases: Box<[usize]>,
}

impl Cache {
    /// A table holding at most `entries` results (at least one set per shard). The slots are
    /// allocated zeroed, so the kernel backs them with memory only as they are first written.
    pub fn new(entries: usize) -> Self {
        let sets = entries.div_ceil(WAYS * SHARDS).max(1);
        let shards: Box<[Mutex<Shard>]> = (0..SHARDS)
            .map(|_| {
                Mutex::new(Shard {
                    slots: vec![Slot::default(); sets * WAYS].into_boxed_slice(),
                    len: 0,
                })
            })
            .collect();
        let bases = shards
            .iter()
            .map(|s| lock(s).slots.as_ptr() as usize)
            .collect();
        Self {
            shards,
            sets,
            bases,
        }
    }

    /// Starts loading the set `hash` lives in (two cache lines) into the CPU cache. A batch's
    /// requests prefetch their sets before any is read, so the misses overlap: a cold set costs
    /// a DRAM access and, in a VM, a nested page walk, which alone was 15 % of a server's CPU
    /// with the SPF identity on (perf, `loadtest/bench-spf.sh`) before this.
    pub fn prefetch(&self, hash: u128) {
        let (shard, base, _) = self.place(hash);
        let at = self.bases[shard] + base * std::mem::size_of::<Slot>();
        crate::engine::prefetch::read(at as *const u8);
        crate::engine::prefetch::read((at + 64) as *const u8);
    }

    /// The most entries it can hold.
    pub fn capacity(&self) -> usize {
        self.sets * WAYS * SHARDS
    }

    /// Entries held (live or expired, not yet reused).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len).sum()
    }

    /// Whether no entry was ever stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn place(&self, hash: u128) -> (usize, usize, u64) {
        let shard = shard_of(hash);
        // Multiply-shift maps 58 further bits onto 0..sets without a division.
        let bits = (hash >> 64) as u64 & ((1 << 58) - 1);
        let set = ((u128::from(bits) * self.sets as u128) >> 58) as usize;
        (shard, set * WAYS, hash as u64)
    }

    /// The fresh result kind for `hash` at second `now`, if any.
    pub fn get(&self, hash: u128, now: u32) -> Option<u8> {
        let (shard, base, tag) = self.place(hash);
        let shard = lock(&self.shards[shard]);
        shard.slots[base..base + WAYS]
            .iter()
            .find(|s| s.expires > now && s.tag == tag)
            .map(|s| s.kind)
    }

    /// Stores `kind` for `hash` until second `expires` (> `now`).
    pub fn insert(&self, hash: u128, kind: u8, now: u32, expires: u32) -> Inserted {
        let (shard, base, tag) = self.place(hash);
        let mut guard = lock(&self.shards[shard]);
        let shard = &mut *guard;
        let set = &mut shard.slots[base..base + WAYS];
        let new = Slot { tag, expires, kind };
        // The same key, wherever it is, is replaced: one key never holds two slots.
        if let Some(s) = set.iter_mut().find(|s| s.expires != 0 && s.tag == tag) {
            *s = new;
            return Inserted::Replaced;
        }
        if let Some(s) = set.iter_mut().find(|s| s.expires == 0) {
            *s = new;
            shard.len += 1;
            return Inserted::New;
        }
        // Full set: the soonest to expire goes, which is an expired one if there is one.
        let victim = set
            .iter_mut()
            .min_by_key(|s| s.expires)
            .expect("a set has WAYS > 0 slots");
        let was_live = victim.expires > now;
        *victim = new;
        if was_live {
            Inserted::Evicted
        } else {
            Inserted::Replaced
        }
    }
}

/// The shard of a key hash (its top 6 bits); the in-flight map is sharded the same way.
pub fn shard_of(hash: u128) -> usize {
    (hash >> 122) as usize & (SHARDS - 1)
}

/// A poisoned shard only means another thread panicked between two plain stores to slots; the
/// slots are still well-formed, so the lock is taken anyway.
fn lock(m: &Mutex<Shard>) -> std::sync::MutexGuard<'_, Shard> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hash landing in shard 0, set 0 with the given tag.
    fn in_first_set(tag: u64) -> u128 {
        u128::from(tag)
    }

    #[test]
    fn slot_is_16_bytes() {
        assert_eq!(std::mem::size_of::<Slot>(), 16);
    }

    #[test]
    fn capacity_rounds_up_to_whole_sets() {
        assert_eq!(Cache::new(0).capacity(), WAYS * SHARDS);
        assert_eq!(Cache::new(WAYS * SHARDS).capacity(), WAYS * SHARDS);
        assert_eq!(Cache::new(WAYS * SHARDS + 1).capacity(), 2 * WAYS * SHARDS);
        assert_eq!(Cache::new(1_000_000).capacity(), 1_000_448);
    }

    #[test]
    fn get_until_expiry() {
        let c = Cache::new(1);
        assert_eq!(c.insert(in_first_set(7), 3, 10, 20), Inserted::New);
        assert_eq!(c.get(in_first_set(7), 10), Some(3));
        assert_eq!(c.get(in_first_set(7), 19), Some(3));
        assert_eq!(c.get(in_first_set(7), 20), None);
        assert_eq!(c.get(in_first_set(8), 10), None);
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn same_key_replaced_in_place() {
        let c = Cache::new(1);
        c.insert(in_first_set(7), 1, 0, 5);
        assert_eq!(c.insert(in_first_set(7), 2, 1, 9), Inserted::Replaced);
        assert_eq!(c.get(in_first_set(7), 6), Some(2));
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn full_set_reuses_expired_first_then_evicts_soonest() {
        let c = Cache::new(1);
        for t in 0..WAYS as u64 {
            // Tag 3 expires first (second 5); the others at 100 + tag.
            let exp = if t == 3 { 5 } else { 100 + t as u32 };
            assert_eq!(c.insert(in_first_set(t), 0, 0, exp), Inserted::New);
        }
        assert_eq!(c.len(), WAYS);
        // At second 6 tag 3 is expired: its slot is reused, nothing live is lost.
        assert_eq!(c.insert(in_first_set(50), 0, 6, 200), Inserted::Replaced);
        for t in (0..WAYS as u64).filter(|&t| t != 3) {
            assert!(c.get(in_first_set(t), 6).is_some(), "tag {t} kept");
        }
        // Now every slot is live: the soonest to expire (tag 0, second 100) is evicted.
        assert_eq!(c.insert(in_first_set(51), 0, 6, 200), Inserted::Evicted);
        assert_eq!(c.get(in_first_set(0), 6), None);
        assert!(c.get(in_first_set(1), 6).is_some());
        assert!(c.get(in_first_set(51), 6).is_some());
        assert_eq!(c.len(), WAYS, "never grows past the set");
    }

    #[test]
    fn never_grows_past_capacity() {
        let c = Cache::new(1000);
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        for _ in 0..10 * c.capacity() {
            // splitmix64, twice, for well-spread 128-bit hashes.
            let mut next = || {
                x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = x;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                z ^ (z >> 31)
            };
            let h = (u128::from(next()) << 64) | u128::from(next());
            c.insert(h, 0, 0, 100);
            assert!(c.len() <= c.capacity());
        }
        assert_eq!(c.len(), c.capacity(), "a uniform load fills every slot");
    }
}
