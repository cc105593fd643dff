//! The bounded result cache: (client address, lower-cased domain) → SPF result, until a
//! deadline taken from the DNS TTLs.
//!
//! A table of sets of [`WAYS`] slots in [`SHARDS`] lock shards. A key's 64-bit keyed hash is
//! its tag; a bijective mix of the tag picks the shard (top 6 bits) and the key's home set in
//! it (the next bits). A set is one 64-byte cache line. A key lives in its home set or, when
//! that was full, in one of the next [`PROBE`]` - 1` sets (linear probing by sets): a lookup
//! reads the home line (the one a batch prefetches) and goes on only while the sets it reads
//! are full, all under one shard lock.
//!
//! **Size follows the contents, up to the bound.** A shard starts with [`FIRST_SETS`] sets
//! and doubles when three quarters of its slots are in use, or when [`PROBE`] sets in a row
//! are full, until it reaches the bound. Because the home set comes from the tag alone,
//! doubling rehashes without the keys; expired entries are dropped then. The working set of
//! a cache holding fifty thousand results is one or two megabytes instead of the bound's
//! 16 MiB, so lookups hit the CPU caches and TLB: spread over the whole bound, the prefetches
//! of a batch's sets were 6-8 % of a server's CPU with the `spf` identity on (perf,
//! `loadtest/bench-spf.sh`).
//!
//! At the bound, inserting takes an empty or expired slot of the key's sets first, otherwise
//! evicts the live entry of its home set that expires soonest (for equal TTLs, the oldest).
//! So the table never grows past its bound and eviction is O([`WAYS`] × [`PROBE`]) with no
//! list or heap to maintain.
//!
//! A slot keeps the 64-bit hash as its tag, not the key: 16 bytes per entry instead of the
//! 40+ a stored domain would cost. A wrong answer needs two keys to share 64 bits of a keyed
//! hash whose key is random per process (1 in 2^64 per comparison; an attacker cannot aim at
//! it without the key).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Slots per set: 4 × 16 bytes, one cache line.
pub const WAYS: usize = 4;

/// Lock shards. More than the machine has cores, so two lookups rarely meet on one lock.
pub const SHARDS: usize = 64;

/// Sets a shard starts with: 64 shards × 16 sets × 64 bytes = 64 KiB for an empty cache.
pub const FIRST_SETS: usize = 16;

/// Sets a key may live in: its home set and the next ones, wrapping in its shard.
pub const PROBE: usize = 4;

/// One cached result. `expires == 0` marks an empty slot.
#[derive(Clone, Copy, Default)]
struct Slot {
    tag: u64,
    /// Seconds since the cache's epoch after which the entry is stale; 0 = empty.
    expires: u32,
    /// The result's kind ([`super::Kind`] as u8).
    kind: u8,
}

/// The slots a key may live in: one cache line, aligned to one.
#[derive(Clone, Copy, Default)]
#[repr(align(64))]
struct Set([Slot; WAYS]);

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
    sets: Box<[Set]>,
    /// `sets.len() == 1 << shift`.
    shift: u32,
    /// Slots in use (live or expired but not yet reused).
    len: usize,
}

impl Shard {
    fn new(shift: u32) -> Self {
        Shard {
            sets: vec![Set::default(); 1 << shift].into_boxed_slice(),
            shift,
            len: 0,
        }
    }

    /// Where the shard's sets are and how many, as [`Cache::prefetch`] reads it: the address
    /// of a 64-byte-aligned array has six zero low bits, which carry the shift.
    fn hint(&self) -> usize {
        self.sets.as_ptr() as usize | self.shift as usize
    }

    /// The sets a key whose mixed hash is `mixed` may live in, in order.
    fn chain(&self, mixed: u64) -> impl Iterator<Item = usize> {
        let (home, mask) = (index(mixed, self.shift), self.sets.len() - 1);
        (0..PROBE.min(self.sets.len())).map(move |i| (home + i) & mask)
    }

    /// The slot that holds `tag` (live or expired), if any. The chain ends at the first set
    /// with an empty slot: a key is never stored past one (slots are never emptied again,
    /// only reused, until the shard is rebuilt by [`Shard::grow`]).
    fn find(&self, mixed: u64, tag: u64) -> Option<(usize, usize)> {
        for set in self.chain(mixed) {
            let slots = &self.sets[set].0;
            if let Some(way) = slots.iter().position(|s| s.expires != 0 && s.tag == tag) {
                return Some((set, way));
            }
            if slots.iter().any(|s| s.expires == 0) {
                break;
            }
        }
        None
    }

    /// The first slot of the chain that is empty or expired at `now`.
    fn free(&self, mixed: u64, now: u32) -> Option<(usize, usize)> {
        self.chain(mixed).find_map(|set| {
            let way = self.sets[set].0.iter().position(|s| s.expires <= now)?;
            Some((set, way))
        })
    }

    /// Twice the sets, with every entry still live at `now` moved to its place there.
    fn grow(&mut self, now: u32) {
        let mut bigger = Shard::new(self.shift + 1);
        for slot in self.sets.iter().flat_map(|s| &s.0) {
            if slot.expires > now {
                // Half as full as the old shard was: PROBE full sets in a row are unheard of
                // there, and an entry that found none would only be looked up again.
                if let Some((set, way)) = bigger.free(mix(slot.tag), now) {
                    bigger.sets[set].0[way] = *slot;
                    bigger.len += 1;
                }
            }
        }
        *self = bigger;
    }
}

/// The table. Time is passed in as whole seconds since an epoch the owner keeps, so tests and
/// the owner agree on it without a clock here.
pub struct Cache {
    shards: Box<[Lock]>,
    /// The most sets a shard grows to, as a shift.
    max_shift: u32,
    /// Each shard's [`Shard::hint`], for prefetching without its lock: a prefetch is a hint,
    /// so one read while the shard grows (a stale or mixed address) is harmless.
    hints: Box<[AtomicUsize]>,
}

impl Cache {
    /// A table holding at most `entries` results, rounded up to a power of two of sets per
    /// shard (at least [`FIRST_SETS`]). It starts small and grows with its contents.
    pub fn new(entries: usize) -> Self {
        let sets = entries.div_ceil(WAYS * SHARDS).next_power_of_two();
        let max_shift = sets.max(FIRST_SETS).trailing_zeros();
        let first = FIRST_SETS.trailing_zeros();
        let shards: Box<[Lock]> = (0..SHARDS)
            .map(|_| Lock(Mutex::new(Shard::new(first))))
            .collect();
        let hints = shards
            .iter()
            .map(|s| AtomicUsize::new(lock(s).hint()))
            .collect();
        Self {
            shards,
            max_shift,
            hints,
        }
    }

    /// Starts loading the set `hash` lives in (one cache line) into the CPU cache. A batch's
    /// requests prefetch their sets before any is read, so the misses overlap.
    pub fn prefetch(&self, hash: u64) {
        let mixed = mix(hash);
        let hint = self.hints[shard_of_mixed(mixed)].load(Ordering::Relaxed);
        let (base, shift) = (hint & !63, (hint & 63) as u32);
        let at = base + index(mixed, shift) * std::mem::size_of::<Set>();
        crate::engine::prefetch::read(at as *const u8);
    }

    /// The most entries it can hold.
    pub fn capacity(&self) -> usize {
        (WAYS << self.max_shift) * SHARDS
    }

    /// Slots allocated now (16 bytes each): grows with the contents up to [`Cache::capacity`].
    pub fn allocated(&self) -> usize {
        self.shards.iter().map(|s| lock(s).sets.len() * WAYS).sum()
    }

    /// Entries held (live or expired, not yet reused).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len).sum()
    }

    /// Whether no entry was ever stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The fresh result kind for `hash` at second `now`, if any.
    pub fn get(&self, hash: u64, now: u32) -> Option<u8> {
        let mixed = mix(hash);
        let shard = lock(&self.shards[shard_of_mixed(mixed)]);
        let (set, way) = shard.find(mixed, hash)?;
        let s = &shard.sets[set].0[way];
        (s.expires > now).then_some(s.kind)
    }

    /// Stores `kind` for `hash` until second `expires` (> `now`).
    pub fn insert(&self, hash: u64, kind: u8, now: u32, expires: u32) -> Inserted {
        let mixed = mix(hash);
        let at = shard_of_mixed(mixed);
        let mut guard = lock(&self.shards[at]);
        let shard = &mut *guard;
        let new = Slot {
            tag: hash,
            expires,
            kind,
        };
        // The same key, wherever it is, is replaced: one key never holds two slots.
        if let Some((set, way)) = shard.find(mixed, hash) {
            shard.sets[set].0[way] = new;
            return Inserted::Replaced;
        }
        loop {
            let free = shard.free(mixed, now);
            let crowded = shard.len >= (WAYS << shard.shift) / 4 * 3;
            if (crowded || free.is_none()) && shard.shift < self.max_shift {
                shard.grow(now);
                self.hints[at].store(shard.hint(), Ordering::Relaxed);
                continue;
            }
            if let Some((set, way)) = free {
                let slot = &mut shard.sets[set].0[way];
                let was_empty = slot.expires == 0;
                *slot = new;
                if was_empty {
                    shard.len += 1;
                    return Inserted::New;
                }
                return Inserted::Replaced;
            }
            // At the bound, every slot of the chain live: the home set's soonest to expire goes.
            let home = index(mixed, shard.shift);
            let victim = shard.sets[home]
                .0
                .iter_mut()
                .min_by_key(|s| s.expires)
                .expect("a set has WAYS > 0 slots");
            *victim = new;
            return Inserted::Evicted;
        }
    }
}

/// A bijective mix of a key's hash, whose bits place it: the top 6 its shard, the next ones
/// its set. Bijective, so no two tags share a placement by more than chance, and the place is
/// computed again from the tag alone when a shard grows.
fn mix(hash: u64) -> u64 {
    (hash ^ (hash >> 29)).wrapping_mul(0xbf58_476d_1ce4_e5b9)
}

fn shard_of_mixed(mixed: u64) -> usize {
    (mixed >> 58) as usize
}

/// The set of a mixed hash in a shard of `1 << shift` sets: the bits below the shard's.
fn index(mixed: u64, shift: u32) -> usize {
    ((mixed << 6) >> 1 >> (63 - shift)) as usize
}

/// The shard of a key hash; the in-flight map is sharded the same way.
pub fn shard_of(hash: u64) -> usize {
    shard_of_mixed(mix(hash))
}

/// A poisoned shard only means another thread panicked between two plain stores to slots; the
/// slots are still well-formed, so the lock is taken anyway.
fn lock(m: &Lock) -> std::sync::MutexGuard<'_, Shard> {
    m.0.lock().unwrap_or_else(|e| e.into_inner())
}

/// A shard's lock on a cache line of its own: two worker threads taking neighbouring shards'
/// locks would otherwise pass one line back and forth.
#[repr(align(64))]
struct Lock(Mutex<Shard>);

#[cfg(test)]
mod tests {
    use super::*;

    /// The inverse of [`mix`]: a hash placed at the given mixed value.
    fn unmix(mixed: u64) -> u64 {
        // 0xbf58476d1ce4e5b9 is odd: its inverse modulo 2^64 by Newton's iteration.
        let c = 0xbf58_476d_1ce4_e5b9_u64;
        let mut inv = c;
        for _ in 0..6 {
            inv = inv.wrapping_mul(2u64.wrapping_sub(c.wrapping_mul(inv)));
        }
        let x = mixed.wrapping_mul(inv);
        // x = h ^ (h >> 29): two steps undo it for 64 bits.
        let h = x ^ (x >> 29);
        x ^ (h >> 29)
    }

    /// Hashes that land in shard 0, set 0 of any size, told apart by `n`.
    fn in_first_set(n: u64) -> u64 {
        unmix(n)
    }

    #[test]
    fn unmix_inverts_mix_and_first_set_is_shard_0_set_0() {
        for n in [0, 1, 7, 1000, 1 << 20] {
            assert_eq!(mix(unmix(n)), n);
            let h = in_first_set(n);
            assert_eq!(shard_of(h), 0);
            assert_eq!(index(mix(h), 12), 0);
        }
    }

    #[test]
    fn set_is_one_cache_line() {
        assert_eq!(std::mem::size_of::<Slot>(), 16);
        assert_eq!(std::mem::size_of::<Set>(), 64);
        assert_eq!(std::mem::align_of::<Set>(), 64);
    }

    #[test]
    fn index_takes_the_bits_below_the_shard() {
        let m = 0b101101_u64 << 58 | 0b1011 << 54;
        assert_eq!(shard_of_mixed(m), 0b101101);
        assert_eq!(index(m, 0), 0);
        assert_eq!(index(m, 1), 1);
        assert_eq!(index(m, 4), 0b1011);
        assert_eq!(index(u64::MAX, 12), (1 << 12) - 1);
    }

    #[test]
    fn capacity_rounds_up_to_a_power_of_two_of_sets() {
        let first = WAYS * FIRST_SETS * SHARDS;
        assert_eq!(Cache::new(0).capacity(), first);
        assert_eq!(Cache::new(first).capacity(), first);
        assert_eq!(Cache::new(first + 1).capacity(), 2 * first);
        assert_eq!(Cache::new(1 << 20).capacity(), 1 << 20);
        assert_eq!(Cache::new(1_000_000).capacity(), 1 << 20);
    }

    #[test]
    fn starts_small() {
        let c = Cache::new(1 << 20);
        assert_eq!(c.allocated(), WAYS * FIRST_SETS * SHARDS);
        assert!(c.is_empty());
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

    /// Hashes whose home set is set `set` of shard 0 at the bound `Cache::new(1)` (FIRST_SETS
    /// sets), told apart by `n` < 2^50.
    fn at_home(set: u64, n: u64) -> u64 {
        unmix(set << (58 - FIRST_SETS.trailing_zeros()) | n)
    }

    #[test]
    fn full_sets_at_the_bound_reuse_expired_first_then_evict_soonest() {
        // At its bound from the start: a shard of FIRST_SETS sets never grows.
        let c = Cache::new(1);
        let n = (WAYS * PROBE) as u64;
        // Home set 0 fills, then the next PROBE - 1 sets take the overflow. Entry 3 expires
        // first (second 5), the others at 100 + t.
        for t in 0..n {
            let exp = if t == 3 { 5 } else { 100 + t as u32 };
            assert_eq!(c.insert(at_home(0, t), 0, 0, exp), Inserted::New);
        }
        assert_eq!(c.len(), WAYS * PROBE);
        assert!((0..n).all(|t| c.get(at_home(0, t), 0).is_some()));
        // At second 6 entry 3 is expired: its slot is reused, nothing live is lost.
        assert_eq!(c.insert(at_home(0, 50), 0, 6, 200), Inserted::Replaced);
        for t in (0..n).filter(|&t| t != 3) {
            assert!(c.get(at_home(0, t), 6).is_some(), "entry {t} kept");
        }
        // Now every slot of the chain is live: the home set's soonest to expire (entry 0,
        // second 100) is evicted.
        assert_eq!(c.insert(at_home(0, 51), 0, 6, 200), Inserted::Evicted);
        assert_eq!(c.get(at_home(0, 0), 6), None);
        assert!(c.get(at_home(0, 1), 6).is_some());
        assert!(c.get(at_home(0, 51), 6).is_some());
        assert_eq!(c.len(), WAYS * PROBE, "never grows past the chain");
        assert_eq!(c.allocated(), c.capacity());
    }

    #[test]
    fn a_key_past_its_home_set_is_found_and_replaced_there() {
        let c = Cache::new(1);
        for t in 0..WAYS as u64 + 1 {
            c.insert(at_home(0, t), 1, 0, 100);
        }
        // The fifth went to set 1; a key whose home is set 1 goes after it.
        c.insert(at_home(1, 9), 2, 0, 100);
        assert_eq!(c.get(at_home(0, WAYS as u64), 0), Some(1));
        assert_eq!(
            c.insert(at_home(0, WAYS as u64), 3, 0, 100),
            Inserted::Replaced
        );
        assert_eq!(c.get(at_home(0, WAYS as u64), 0), Some(3));
        assert_eq!(c.get(at_home(1, 9), 0), Some(2));
        assert_eq!(c.len(), WAYS + 2);
        // A key of home set 2 is not looked for past set 2, which has room.
        assert_eq!(c.get(at_home(2, 1), 0), None);
    }

    /// splitmix64: well-spread hashes.
    fn hashes() -> impl Iterator<Item = u64> {
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        std::iter::repeat_with(move || {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        })
    }

    #[test]
    fn grows_with_its_contents_and_keeps_every_entry() {
        let c = Cache::new(1 << 20);
        let keys: Vec<u64> = hashes().take(50_000).collect();
        for &h in &keys {
            assert_eq!(c.insert(h, 1, 0, 100), Inserted::New);
        }
        assert_eq!(c.len(), keys.len());
        assert!(keys.iter().all(|&h| c.get(h, 0) == Some(1)), "all kept");
        // A quarter to three quarters full: a few megabytes, not the bound's 16 MiB.
        let slots = c.allocated();
        assert!(
            slots <= 4 * keys.len() && slots > keys.len(),
            "{slots} slots"
        );
        assert!(slots <= c.capacity() / 4);
    }

    #[test]
    fn growing_drops_expired_entries() {
        let c = Cache::new(1 << 20);
        let keys: Vec<u64> = hashes().take(10_000).collect();
        for &h in &keys[..5_000] {
            c.insert(h, 1, 0, 10);
        }
        // At second 20 the first half is stale; inserting the second half grows the table,
        // which carries only the live ones.
        for &h in &keys[5_000..] {
            c.insert(h, 2, 20, 100);
        }
        assert!(c.len() < 10_000, "expired entries left behind: {}", c.len());
        assert!(keys[5_000..].iter().all(|&h| c.get(h, 20) == Some(2)));
        assert!(keys[..5_000].iter().all(|&h| c.get(h, 20).is_none()));
    }

    #[test]
    fn never_grows_past_capacity() {
        let c = Cache::new(5000);
        for h in hashes().take(10 * c.capacity()) {
            c.insert(h, 0, 0, 100);
            assert!(c.len() <= c.capacity());
        }
        assert_eq!(c.allocated(), c.capacity());
        assert_eq!(c.len(), c.capacity(), "a uniform load fills every slot");
    }

    #[test]
    fn prefetch_of_any_hash_is_harmless_while_growing() {
        let c = Cache::new(1 << 16);
        for h in hashes().take(20_000) {
            c.prefetch(h);
            c.insert(h, 0, 0, 100);
            c.prefetch(h);
        }
        assert_eq!(c.len(), 20_000);
    }
}
