//! One shard's open-addressing table of fixed-size records.
//!
//! Why not `HashMap`/`dashmap`: the key is already a uniformly random keyed hash, so it needs
//! no re-hashing, and a record is only 24 bytes. Storing records inline with linear probing
//! puts a lookup on one cache line (plus its neighbour), where a SwissTable touches a control
//! byte array and a slot array — two misses at 10 M records. The slot index comes from the
//! key's low 64 bits by multiply-shift ("fastrange"), so the capacity need not be a power of
//! two: growing by 1.5× at a load of 0.8 keeps the load between 0.53 and 0.8 at every size,
//! which bounds memory per record (see `docs/BENCHMARKS.md`) where doubling would swing it
//! between 0.4 and 0.8. Deletion shifts followers back, so there are no tombstones.

use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering::Relaxed};

use super::key::Key;
use super::prefetch;

/// A record that can live in a [`Table`].
pub(crate) trait Record: Copy {
    /// A slot with no record; its key must be [`Key::VACANT`].
    const VACANT: Self;
    /// The record's key.
    fn key(&self) -> Key;
}

/// Maximum load, as a fraction `NUM / DEN`.
const LOAD_NUM: usize = 4;
const LOAD_DEN: usize = 5;
const MIN_CAPACITY: usize = 16;

/// Outcome of [`Table::entry`].
pub(crate) enum Slot {
    /// The key is present at this index.
    Occupied(usize),
    /// The key is absent; this vacant index is where it goes.
    Vacant(usize),
}

/// An open-addressing table with linear probing.
#[derive(Debug)]
pub(crate) struct Table<R: Record> {
    slots: Vec<R>,
    len: usize,
}

impl<R: Record> Default for Table<R> {
    fn default() -> Self {
        Self {
            slots: Vec::new(),
            len: 0,
        }
    }
}

#[inline]
fn home(key: Key, cap: usize) -> usize {
    ((u128::from(key.lo) * cap as u128) >> 64) as usize
}

impl<R: Record> Table<R> {
    /// Number of records.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Number of slots.
    #[cfg(test)]
    pub(crate) fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Bytes held by the slot array.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.slots.capacity() * std::mem::size_of::<R>()
    }

    #[inline]
    fn find(&self, key: Key) -> Slot {
        let cap = self.slots.len();
        let mut i = home(key, cap);
        loop {
            let k = self.slots[i].key();
            if k == key {
                return Slot::Occupied(i);
            }
            if k.is_vacant() {
                return Slot::Vacant(i);
            }
            i += 1;
            if i == cap {
                i = 0;
            }
        }
    }

    /// The record with `key`, if present.
    #[inline]
    pub(crate) fn get(&self, key: Key) -> Option<&R> {
        if self.len == 0 {
            return None;
        }
        match self.find(key) {
            Slot::Occupied(i) => Some(&self.slots[i]),
            Slot::Vacant(_) => None,
        }
    }

    /// The record with `key`, mutable, if present.
    #[inline]
    pub(crate) fn get_mut(&mut self, key: Key) -> Option<&mut R> {
        if self.len == 0 {
            return None;
        }
        match self.find(key) {
            Slot::Occupied(i) => Some(&mut self.slots[i]),
            Slot::Vacant(_) => None,
        }
    }

    /// Finds `key`, growing first if one more record would pass the maximum load, so a
    /// [`Slot::Vacant`] answer can be filled with [`Table::fill`].
    #[inline]
    pub(crate) fn entry(&mut self, key: Key) -> Slot {
        if (self.len + 1) * LOAD_DEN > self.slots.len() * LOAD_NUM {
            if let Some(Slot::Occupied(i)) = (self.len > 0).then(|| self.find(key)) {
                return Slot::Occupied(i);
            }
            self.grow();
        }
        self.find(key)
    }

    /// The record at an index from [`Table::entry`].
    #[inline]
    pub(crate) fn at_mut(&mut self, index: usize) -> &mut R {
        &mut self.slots[index]
    }

    /// Stores a new record at a vacant index from [`Table::entry`].
    #[inline]
    pub(crate) fn fill(&mut self, index: usize, record: R) {
        debug_assert!(self.slots[index].key().is_vacant());
        self.slots[index] = record;
        self.len += 1;
    }

    /// Inserts or replaces a record.
    #[cfg(test)]
    pub(crate) fn upsert(&mut self, record: R) {
        match self.entry(record.key()) {
            Slot::Occupied(i) => self.slots[i] = record,
            Slot::Vacant(i) => self.fill(i, record),
        }
    }

    fn grow(&mut self) {
        self.resize((self.slots.len() * 3 / 2).max(MIN_CAPACITY));
    }

    /// Makes room for `additional` more records at a load of 2/3 (the middle of the range
    /// growth keeps), so a bulk load does not rehash a shard over and over.
    pub(crate) fn reserve(&mut self, additional: usize) {
        let want = ((self.len + additional) * 3 / 2).max(MIN_CAPACITY);
        if want > self.slots.len() {
            self.resize(want);
        }
    }

    fn resize(&mut self, new_cap: usize) {
        let old = std::mem::replace(&mut self.slots, vec![R::VACANT; new_cap]);
        for r in old {
            if !r.key().is_vacant() {
                if let Slot::Vacant(i) = self.find(r.key()) {
                    self.slots[i] = r;
                }
            }
        }
    }

    /// Removes the record with `key`, shifting back the records that probed past it so every
    /// record stays reachable from its home slot without tombstones.
    pub(crate) fn remove(&mut self, key: Key) -> Option<R> {
        if self.len == 0 {
            return None;
        }
        let Slot::Occupied(mut hole) = self.find(key) else {
            return None;
        };
        let removed = self.slots[hole];
        let cap = self.slots.len();
        let mut j = hole;
        loop {
            j = if j + 1 == cap { 0 } else { j + 1 };
            let r = self.slots[j];
            if r.key().is_vacant() {
                break;
            }
            let h = home(r.key(), cap);
            // `r` may move into the hole iff the hole lies on its probe path from `h` to `j`.
            let dist_home = (j + cap - h) % cap;
            let dist_hole = (j + cap - hole) % cap;
            if dist_home >= dist_hole {
                self.slots[hole] = r;
                hole = j;
            }
        }
        self.slots[hole] = R::VACANT;
        self.len -= 1;
        Some(removed)
    }

    /// Where the slot array lives and how many slots it has, for a [`SlotHint`].
    fn raw_slots(&self) -> (*const R, usize) {
        (self.slots.as_ptr(), self.slots.len())
    }

    /// All records, in slot order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &R> + '_ {
        self.slots.iter().filter(|r| !r.key().is_vacant())
    }
}

/// A copy of a table's slot-array address and size that can be read without the table's
/// lock, so that a key's home slot can be prefetched a group of requests ahead.
///
/// It is refreshed under the lock after anything that may reallocate the table. A reader
/// racing with a reallocation may see an old address or a mismatched pair: then it prefetches
/// a useless line, which costs a little bandwidth and nothing else ([`prefetch::read`] accepts
/// any address). The address is only ever prefetched, never read.
#[derive(Debug)]
pub(crate) struct SlotHint<R> {
    base: AtomicPtr<R>,
    cap: AtomicUsize,
}

impl<R> Default for SlotHint<R> {
    fn default() -> Self {
        Self {
            base: AtomicPtr::new(std::ptr::null_mut()),
            cap: AtomicUsize::new(0),
        }
    }
}

impl<R: Record> SlotHint<R> {
    /// Records `table`'s slot array, if it moved. Called with the table's lock held.
    #[inline]
    pub(crate) fn refresh(&self, table: &Table<R>) {
        let (base, cap) = table.raw_slots();
        if self.base.load(Relaxed).cast_const() != base || self.cap.load(Relaxed) != cap {
            self.base.store(base.cast_mut(), Relaxed);
            self.cap.store(cap, Relaxed);
        }
    }

    /// Where `key`'s home slot was when the hint was last refreshed; `None` before the table
    /// had any slots. Never dereferenced: only prefetched and compared.
    #[inline]
    pub(crate) fn home_slot(&self, key: Key) -> Option<*const R> {
        let cap = self.cap.load(Relaxed);
        if cap == 0 {
            return None;
        }
        Some(
            self.base
                .load(Relaxed)
                .cast_const()
                .wrapping_add(home(key, cap)),
        )
    }

    /// Whether the hint describes `table` as it is now.
    #[cfg(test)]
    pub(crate) fn is_current(&self, table: &Table<R>) -> bool {
        let (base, cap) = table.raw_slots();
        self.base.load(Relaxed).cast_const() == base && self.cap.load(Relaxed) == cap
    }

    /// Prefetches the cache lines of `key`'s home slot.
    #[inline]
    pub(crate) fn prefetch(&self, key: Key) {
        let Some(slot) = self.home_slot(key) else {
            return;
        };
        prefetch::read(slot);
        // A record may straddle two lines; its last byte's line is the next one then (and
        // otherwise the same line again, which costs next to nothing).
        prefetch::read(slot.cast::<u8>().wrapping_add(std::mem::size_of::<R>() - 1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[derive(Debug, Clone, Copy, PartialEq)]
    struct R {
        key: Key,
        v: u32,
    }
    impl Record for R {
        const VACANT: Self = R {
            key: Key::VACANT,
            v: 0,
        };
        fn key(&self) -> Key {
            self.key
        }
    }

    fn key(lo: u64) -> Key {
        Key::from_u128(u128::from(lo) | 1 << 100)
    }

    #[test]
    fn grows_keeping_load_between_bounds() {
        let mut t = Table::<R>::default();
        for i in 0..100_000u64 {
            // Spread keys like a real hash would.
            let k = key(i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            if let Slot::Vacant(s) = t.entry(k) {
                t.fill(
                    s,
                    R {
                        key: k,
                        v: i as u32,
                    },
                );
            }
            let load = t.len() as f64 / t.capacity() as f64;
            assert!(load <= 0.8, "load {load} at {i}");
            if t.capacity() > MIN_CAPACITY {
                assert!(load > 0.5, "load {load} at {i}");
            }
        }
        assert_eq!(t.len(), 100_000);
        assert_eq!(t.iter().count(), 100_000);
    }

    #[test]
    fn reserve_makes_room_once_and_keeps_what_is_there() {
        let mut t = Table::<R>::default();
        let k = |i: u64| key(i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        for i in 0..10 {
            t.upsert(R { key: k(i), v: 1 });
        }
        t.reserve(990);
        let cap = t.capacity();
        assert_eq!(cap, 1500, "1000 records at a load of 2/3");
        for i in 10..1000 {
            t.upsert(R { key: k(i), v: 2 });
        }
        assert_eq!(
            t.capacity(),
            cap,
            "no growth while filling what was reserved"
        );
        assert_eq!(t.len(), 1000);
        assert!((0..10).all(|i| t.get(k(i)).map(|r| r.v) == Some(1)));
        // Reserving less than is there changes nothing.
        t.reserve(0);
        assert_eq!(t.capacity(), cap);
    }

    #[test]
    fn colliding_homes_survive_removal_in_any_order() {
        // Keys with lo = 0 or near it all map to home slot 0: one long probe chain that wraps.
        let mut t = Table::<R>::default();
        let ks: Vec<Key> = (0..12u64)
            .map(|i| Key { lo: i, hi: 1 })
            .chain((0..3u64).map(|i| Key {
                lo: u64::MAX - i,
                hi: 1,
            }))
            .collect();
        for (i, k) in ks.iter().enumerate() {
            t.upsert(R {
                key: *k,
                v: i as u32,
            });
        }
        for (n, k) in ks.iter().enumerate().rev() {
            assert_eq!(t.remove(*k).map(|r| r.v), Some(n as u32));
            for (m, other) in ks.iter().enumerate().take(n) {
                assert_eq!(
                    t.get(*other).map(|r| r.v),
                    Some(m as u32),
                    "lost {m} after removing {n}"
                );
            }
        }
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn slot_hint_finds_the_home_slot_after_growth() {
        let mut t = Table::<R>::default();
        let hint = SlotHint::default();
        assert_eq!(hint.home_slot(key(1)), None, "no slots yet");
        let k = |i: u64| key(i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        for i in 0..1000 {
            t.upsert(R { key: k(i), v: 0 });
            hint.refresh(&t);
        }
        assert!(hint.is_current(&t));
        // A record sits at its home slot or a few slots after it (linear probing).
        let base = t.slots.as_ptr();
        let mut at_home = 0;
        for i in 0..1000 {
            let rec = t.get(k(i)).unwrap() as *const R;
            let slot = hint.home_slot(k(i)).unwrap();
            let dist = (rec as usize).wrapping_sub(slot as usize) / std::mem::size_of::<R>();
            let wrapped = (rec as usize) < (slot as usize);
            assert!(
                wrapped || dist < 64,
                "record {i} is {dist} slots past its hint"
            );
            assert!(slot >= base && slot < base.wrapping_add(t.capacity()));
            at_home += usize::from(rec == slot);
        }
        assert!(at_home > 500, "only {at_home} of 1000 at their hinted slot");
        // After a growth the old hint is stale until refreshed.
        t.reserve(10_000);
        assert!(!hint.is_current(&t));
        hint.refresh(&t);
        assert!(hint.is_current(&t));
        assert_eq!(
            hint.home_slot(k(3)).unwrap(),
            t.slots.as_ptr().wrapping_add(home(k(3), t.capacity()))
        );
    }

    proptest! {
        #[test]
        fn matches_btreemap(ops in prop::collection::vec((0u8..3, 0u64..64, any::<u32>()), 1..2000)) {
            let mut t = Table::<R>::default();
            let mut m = BTreeMap::new();
            for (op, k, v) in ops {
                // Small key space with clustered homes, to exercise long probe runs.
                let key = Key { lo: k << 58 | k, hi: 3 };
                match op {
                    0 => { t.upsert(R { key, v }); m.insert(key, v); }
                    1 => { prop_assert_eq!(t.remove(key).map(|r| r.v), m.remove(&key)); }
                    _ => { prop_assert_eq!(t.get(key).map(|r| r.v), m.get(&key).copied()); }
                }
                prop_assert_eq!(t.len(), m.len());
            }
            for (k, v) in &m {
                prop_assert_eq!(t.get(*k).map(|r| r.v), Some(*v));
            }
        }
    }
}
