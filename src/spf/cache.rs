//! The bounded result cache: (client address, lower-cased domain) → SPF result, until a
//! deadline taken from the DNS TTLs.
//!
//! A table of sets of [`WAYS`] slots in [`SHARDS`] shards. A key's 64-bit keyed hash is its
//! tag; a bijective mix of the tag picks the shard (top 6 bits) and the key's home set in it
//! (the next bits). A set is one 64-byte cache line. A key lives in its home set or, when that
//! was full, in one of the next [`PROBE`]` - 1` sets (linear probing by sets): a lookup reads
//! the home line (the one a batch prefetches) and goes on only while the sets it reads are
//! full.
//!
//! **Reads take no lock.** Every request with an SPF domain reads the cache, from every
//! worker thread; writes come only from finished lookups. So a shard is a sequence lock:
//! writers (one at a time, under the shard's mutex) make its counter odd while they change
//! slots and even again after; a reader reads the counter, the slots (atomic words) and the
//! counter again, and trusts what it read only if the counter was even and unchanged, else
//! reads again under the mutex. A read writes nothing, so the lines of a warm cache stay in
//! both cores' caches: with a mutex per shard, every read wrote its lock's line and the two
//! workers passed those lines back and forth (the lock was two thirds of a hit's cost, perf,
//! `loadtest/bench-spf.sh`).
//!
//! **Size follows the contents, up to the bound.** The table is one region of zeroed
//! anonymous memory laid out for the bound ([`ZeroedWords`]): the kernel backs a page only
//! once it is written. Set `j` of shard `s` is the region's set `j × SHARDS + s`, so the sets
//! in use, the first `2^shift` of each shard, are the front of the region, whatever the shard,
//! and the region asks for huge pages: a cache of fifty thousand results is one or two huge
//! pages, two TLB entries instead of hundreds (the prefetch of a batch's sets waited on page
//! walks, perf). A shard starts with [`FIRST_SETS`] sets and doubles in place when three
//! quarters of its slots are in use, or when [`PROBE`] sets in a row are full, until it
//! reaches the bound. Because the home set comes from the tag alone, doubling rehashes without
//! the keys; expired entries are dropped then.
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

use std::io;
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::snapshot::mmap::ZeroedWords;

/// Slots per set: 4 × 16 bytes, one cache line.
pub const WAYS: usize = 4;

/// Shards: each grows on its own, and writers of different shards do not wait for each
/// other. More than the machine has cores.
pub const SHARDS: usize = 64;

/// Sets a shard starts with: 64 shards × 16 sets × 64 bytes = 64 KiB in use for an empty
/// cache.
pub const FIRST_SETS: usize = 16;

/// Sets a key may live in: its home set and the next ones, wrapping in its shard.
pub const PROBE: usize = 4;

/// Words per slot: the tag, then the entry ([`entry`]).
const SLOT_WORDS: usize = 2;

/// Words per set.
const SET_WORDS: usize = WAYS * SLOT_WORDS;

/// A slot's second word: the second after which it is stale (the cache's clock), then the
/// result's kind ([`super::Kind`] as u8). 0 = empty: a stored entry expires after second 0.
fn entry(expires: u32, kind: u8) -> u64 {
    u64::from(expires) << 8 | u64::from(kind)
}

fn expiry(entry: u64) -> u32 {
    (entry >> 8) as u32
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

/// A shard's state, on a cache line of its own: readers read `seq` and `shift`, which change
/// only when a writer holds `writer`.
#[repr(align(64))]
struct Shard {
    /// Even when no writer is changing the shard; odd while one is.
    seq: AtomicU32,
    /// The shard uses its first `1 << shift` sets.
    shift: AtomicU32,
    /// Taken by writers; holds the slots in use (live, or expired but not yet reused).
    writer: Mutex<usize>,
}

/// The table. Time is passed in as whole seconds since an epoch the owner keeps, so tests and
/// the owner agree on it without a clock here.
pub struct Cache {
    shards: Box<[Shard]>,
    /// Every shard's sets, interleaved: `SHARDS << max_shift` sets of [`SET_WORDS`] words.
    table: ZeroedWords,
    /// The most sets a shard grows to, as a shift.
    max_shift: u32,
}

impl Cache {
    /// A table holding at most `entries` results, rounded up to a power of two of sets per
    /// shard (at least [`FIRST_SETS`]). It starts small and grows with its contents; an error
    /// only when the address space for the bound cannot be reserved.
    pub fn new(entries: usize) -> io::Result<Self> {
        let sets = entries.div_ceil(WAYS * SHARDS).next_power_of_two();
        let max_shift = sets.max(FIRST_SETS).trailing_zeros();
        let first = FIRST_SETS.trailing_zeros();
        Ok(Self {
            shards: (0..SHARDS)
                .map(|_| Shard {
                    seq: AtomicU32::new(0),
                    shift: AtomicU32::new(first),
                    writer: Mutex::new(0),
                })
                .collect(),
            table: ZeroedWords::new((SHARDS << max_shift) * SET_WORDS)?,
            max_shift,
        })
    }

    /// Starts loading the set `hash` lives in (one cache line) into the CPU cache. A batch's
    /// requests prefetch their sets before any is read, so the misses overlap.
    pub fn prefetch(&self, hash: u64) {
        let mixed = mix(hash);
        let s = shard_of_mixed(mixed);
        // A shift read while the shard grows only prefetches another set of it.
        let shift = self.shards[s].shift.load(Ordering::Relaxed);
        let at = self.set(s, index(mixed, shift));
        crate::engine::prefetch::read(self.table.words()[at..].as_ptr());
    }

    /// The most entries it can hold.
    pub fn capacity(&self) -> usize {
        (WAYS << self.max_shift) * SHARDS
    }

    /// Slots in use now (16 bytes each): grows with the contents up to [`Cache::capacity`].
    pub fn allocated(&self) -> usize {
        let shift = |s: &Shard| s.shift.load(Ordering::Relaxed);
        self.shards.iter().map(|s| WAYS << shift(s)).sum()
    }

    /// Entries held (live or expired, not yet reused).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| *lock(&s.writer)).sum()
    }

    /// Whether no entry was ever stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The fresh result kind for `hash` at second `now`, if any.
    pub fn get(&self, hash: u64, now: u32) -> Option<u8> {
        let mixed = mix(hash);
        let s = shard_of_mixed(mixed);
        let shard = &self.shards[s];
        let seq = shard.seq.load(Ordering::Acquire);
        let found = if seq & 1 == 0 {
            let found = self.find(s, shard.shift.load(Ordering::Relaxed), mixed, hash);
            // The slots were read before the counter is read again (the sequence lock's
            // reader side; the writer's side is in `Cache::write`).
            fence(Ordering::Acquire);
            (shard.seq.load(Ordering::Relaxed) == seq).then_some(found)
        } else {
            None
        };
        // A writer was at work: wait for it, and read what it left.
        let found = found.unwrap_or_else(|| {
            let _writer = lock(&shard.writer);
            self.find(s, shard.shift.load(Ordering::Relaxed), mixed, hash)
        });
        found.and_then(|(_, e)| (expiry(e) > now).then_some(e as u8))
    }

    /// Stores `kind` for `hash` until second `expires` (> `now`).
    pub fn insert(&self, hash: u64, kind: u8, now: u32, expires: u32) -> Inserted {
        let mixed = mix(hash);
        let s = shard_of_mixed(mixed);
        let new = entry(expires, kind);
        self.write(s, |len| {
            let words = self.table.words();
            let put = |slot: usize, e: u64| self.put(slot, hash, e);
            let shift = self.shards[s].shift.load(Ordering::Relaxed);
            // The same key, wherever it is, is replaced: one key never holds two slots.
            if let Some((slot, _)) = self.find(s, shift, mixed, hash) {
                put(slot, new);
                return Inserted::Replaced;
            }
            loop {
                let shift = self.shards[s].shift.load(Ordering::Relaxed);
                let free = self.free(s, shift, mixed, now);
                let crowded = *len >= (WAYS << shift) / 4 * 3;
                if (crowded || free.is_none()) && shift < self.max_shift {
                    *len = self.grow(s, shift, now);
                    continue;
                }
                if let Some(slot) = free {
                    let was_empty = words[slot + 1].load(Ordering::Relaxed) == 0;
                    put(slot, new);
                    if was_empty {
                        *len += 1;
                        return Inserted::New;
                    }
                    return Inserted::Replaced;
                }
                // At the bound, every slot of the chain live: the home set's soonest to
                // expire goes.
                let home = self.set(s, index(mixed, shift));
                let victim = (0..WAYS)
                    .map(|w| home + w * SLOT_WORDS)
                    .min_by_key(|&slot| expiry(words[slot + 1].load(Ordering::Relaxed)))
                    .expect("a set has WAYS > 0 slots");
                put(victim, new);
                return Inserted::Evicted;
            }
        })
    }

    /// Runs `change` on shard `s` as its only writer, with readers told to read again (the
    /// sequence lock's writer side). `change` gets the shard's count of slots in use.
    fn write<R>(&self, s: usize, change: impl FnOnce(&mut usize) -> R) -> R {
        let shard = &self.shards[s];
        let mut len = lock(&shard.writer);
        // Odd from before the first slot changes (the release fence orders the counter
        // before the slots' stores) until after the last (the release store).
        let seq = shard.seq.load(Ordering::Relaxed);
        shard.seq.store(seq.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
        // Even again on the way out, a panic included: the slots are well-formed between
        // any two stores, only perhaps not what the writer meant.
        struct Even<'a>(&'a AtomicU32, u32);
        impl Drop for Even<'_> {
            fn drop(&mut self) {
                self.0.store(self.1, Ordering::Release);
            }
        }
        let _even = Even(&shard.seq, seq.wrapping_add(2));
        change(&mut len)
    }

    /// Stores an entry in the slot whose first word is `slot`. Only under [`Cache::write`].
    fn put(&self, slot: usize, tag: u64, entry: u64) {
        let words = self.table.words();
        words[slot].store(tag, Ordering::Relaxed);
        words[slot + 1].store(entry, Ordering::Relaxed);
    }

    /// The first word of set `j` of shard `s`.
    fn set(&self, s: usize, j: usize) -> usize {
        (j * SHARDS + s) * SET_WORDS
    }

    /// The sets (first words) a key whose mixed hash is `mixed` may live in, in order, in
    /// shard `s` of `1 << shift` sets.
    fn chain(&self, s: usize, shift: u32, mixed: u64) -> impl Iterator<Item = usize> + '_ {
        let (home, mask) = (index(mixed, shift), (1 << shift) - 1);
        (0..PROBE.min(1 << shift)).map(move |i| self.set(s, (home + i) & mask))
    }

    /// The slot (first word) and entry that hold `tag`, live or expired, if any. The chain
    /// ends at the first set with an empty slot: a key is never stored past one (slots are
    /// never emptied again, only reused, until the shard doubles).
    #[inline]
    fn find(&self, s: usize, shift: u32, mixed: u64, tag: u64) -> Option<(usize, u64)> {
        let words = self.table.words();
        for set in self.chain(s, shift, mixed) {
            // One bounds check per set, and the ways unrolled: every request reads here.
            let slots: &[AtomicU64; SET_WORDS] = words[set..set + SET_WORDS]
                .try_into()
                .expect("a set's words");
            let mut room = false;
            for way in 0..WAYS {
                let e = slots[way * SLOT_WORDS + 1].load(Ordering::Relaxed);
                if e != 0 && slots[way * SLOT_WORDS].load(Ordering::Relaxed) == tag {
                    return Some((set + way * SLOT_WORDS, e));
                }
                room |= e == 0;
            }
            if room {
                break;
            }
        }
        None
    }

    /// The first slot of the chain that is empty or expired at `now`.
    fn free(&self, s: usize, shift: u32, mixed: u64, now: u32) -> Option<usize> {
        let words = self.table.words();
        self.chain(s, shift, mixed).find_map(|set| {
            (set..set + SET_WORDS)
                .step_by(SLOT_WORDS)
                .find(|&slot| expiry(words[slot + 1].load(Ordering::Relaxed)) <= now)
        })
    }

    /// Doubles shard `s` from `1 << shift` sets, in place, keeping every entry still live at
    /// `now`; returns the slots in use. Only under [`Cache::write`].
    fn grow(&self, s: usize, shift: u32, now: u32) -> usize {
        let words = self.table.words();
        let mut live = Vec::new();
        for j in 0..1 << shift {
            let set = self.set(s, j);
            for slot in (set..set + SET_WORDS).step_by(SLOT_WORDS) {
                let e = words[slot + 1].swap(0, Ordering::Relaxed);
                if expiry(e) > now {
                    live.push((words[slot].load(Ordering::Relaxed), e));
                }
            }
        }
        self.shards[s].shift.store(shift + 1, Ordering::Relaxed);
        let mut len = 0;
        for (tag, e) in live {
            // Half as full as before: PROBE full sets in a row are unheard of there, and an
            // entry that found none would only be looked up again.
            if let Some(slot) = self.free(s, shift + 1, mix(tag), now) {
                self.put(slot, tag, e);
                len += 1;
            }
        }
        len
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

/// A poisoned shard only means another thread panicked in a writer; the slots are
/// well-formed between any two stores, so the lock is taken anyway.
fn lock(m: &Mutex<usize>) -> MutexGuard<'_, usize> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

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
    fn a_set_is_one_aligned_cache_line() {
        assert_eq!(SET_WORDS * 8, 64);
        let c = Cache::new(1 << 20).unwrap();
        assert_eq!(c.table.words().as_ptr() as usize % 64, 0);
        assert_eq!(c.table.words().len(), c.capacity() * SLOT_WORDS);
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
        assert_eq!(Cache::new(0).unwrap().capacity(), first);
        assert_eq!(Cache::new(first).unwrap().capacity(), first);
        assert_eq!(Cache::new(first + 1).unwrap().capacity(), 2 * first);
        assert_eq!(Cache::new(1 << 20).unwrap().capacity(), 1 << 20);
        assert_eq!(Cache::new(1_000_000).unwrap().capacity(), 1 << 20);
    }

    #[test]
    fn starts_small() {
        let c = Cache::new(1 << 20).unwrap();
        assert_eq!(c.allocated(), WAYS * FIRST_SETS * SHARDS);
        assert!(c.is_empty());
    }

    #[test]
    fn get_until_expiry() {
        let c = Cache::new(1).unwrap();
        assert_eq!(c.insert(in_first_set(7), 3, 10, 20), Inserted::New);
        assert_eq!(c.get(in_first_set(7), 10), Some(3));
        assert_eq!(c.get(in_first_set(7), 19), Some(3));
        assert_eq!(c.get(in_first_set(7), 20), None);
        assert_eq!(c.get(in_first_set(8), 10), None);
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn same_key_replaced_in_place() {
        let c = Cache::new(1).unwrap();
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
        let c = Cache::new(1).unwrap();
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
        let c = Cache::new(1).unwrap();
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
        let c = Cache::new(1 << 20).unwrap();
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
        let c = Cache::new(1 << 20).unwrap();
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
        let c = Cache::new(5000).unwrap();
        for h in hashes().take(10 * c.capacity()) {
            c.insert(h, 0, 0, 100);
            assert!(c.len() <= c.capacity());
        }
        assert_eq!(c.allocated(), c.capacity());
        assert_eq!(c.len(), c.capacity(), "a uniform load fills every slot");
    }

    #[test]
    fn prefetch_of_any_hash_is_harmless_while_growing() {
        let c = Cache::new(1 << 16).unwrap();
        for h in hashes().take(20_000) {
            c.prefetch(h);
            c.insert(h, 0, 0, 100);
            c.prefetch(h);
        }
        assert_eq!(c.len(), 20_000);
    }
    #[test]
    fn the_sets_in_use_are_the_front_of_the_region() {
        let c = Cache::new(1 << 20).unwrap();
        for h in hashes().take(50_000) {
            c.insert(h, 1, 0, 100);
        }
        // Every shard grew alike; nothing was written past the largest shard's sets.
        let most = c
            .shards
            .iter()
            .map(|s| s.shift.load(Ordering::Relaxed))
            .max()
            .unwrap();
        let front = (SHARDS << most) * SET_WORDS;
        let words = c.table.words();
        assert!(words[front..]
            .iter()
            .all(|w| w.load(Ordering::Relaxed) == 0));
        assert!(words[..front]
            .iter()
            .any(|w| w.load(Ordering::Relaxed) != 0));
        assert!(
            front < words.len() / 4,
            "a small part of the bound's region"
        );
    }

    /// Readers on other threads, while a writer fills and grows every shard, see each key
    /// either missing or with the kind it was stored with: never another key's, never torn.
    #[test]
    fn readers_never_see_a_torn_or_wrong_entry_while_the_table_grows() {
        let c = Cache::new(1 << 20).unwrap();
        let keys: Vec<u64> = hashes().take(200_000).collect();
        let kind = |h: u64| (h % 251) as u8 + 1;
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            let readers: Vec<_> = (0..2)
                .map(|r| {
                    let (c, keys, done) = (&c, &keys, &done);
                    scope.spawn(move || {
                        let (mut hits, mut rounds) = (0u64, 0);
                        while !done.load(Ordering::Relaxed) || rounds == 0 {
                            for &h in keys.iter().skip(r).step_by(7) {
                                if let Some(k) = c.get(h, 5) {
                                    assert_eq!(k, kind(h), "wrong kind for {h:#x}");
                                    hits += 1;
                                }
                                // Never stored: never found.
                                assert_eq!(c.get(!h, 5), None);
                            }
                            rounds += 1;
                        }
                        hits
                    })
                })
                .collect();
            for (i, &h) in keys.iter().enumerate() {
                // Some stored twice with another expiry: replaced in place.
                c.insert(h, kind(h), 5, 100 + (i % 3) as u32);
                if i % 5 == 0 {
                    c.insert(h, kind(h), 5, 200);
                }
            }
            done.store(true, Ordering::Relaxed);
            for r in readers {
                assert!(r.join().unwrap() > 0, "the readers read entries");
            }
        });
        assert!(keys.iter().all(|&h| c.get(h, 5) == Some(kind(h))));
        assert_eq!(c.len(), keys.len());
    }
}
