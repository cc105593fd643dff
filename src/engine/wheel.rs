//! Hierarchical timer wheel that decides when a record is looked at for expiry.
//!
//! Six levels of 64 slots at 1 s resolution (level `n` slots span `64^n` seconds, the whole
//! wheel 2^36 s, far beyond any `u32` time difference), an `occupied: u64` bitmask per level to
//! find the next slot without scanning, as tokio's time driver does. The wheel holds only keys,
//! not deadlines: a record is scheduled once, at its expiry when inserted. When its slot fires,
//! the owner looks the record up and either removes it (expired) or schedules it again at its
//! current expiry — so refreshing a record (every PASS pushes its expiry) costs nothing here.
//! That is sound because a record's expiry never moves earlier than where it is scheduled.
//!
//! Slots are lists of fixed-size chunks rather than one growing `Vec`, so a slot that receives
//! millions of keys in one burst (a load test, a snapshot load) wastes at most one partial
//! chunk instead of up to half its capacity: the wheel costs 16 bytes per record plus a few KiB.

use super::clock::Secs;
use super::key::Key;

const LEVELS: usize = 6;
const SLOT_BITS: u32 = 6;
const SLOTS: usize = 1 << SLOT_BITS;
/// Keys per chunk: 2 KiB, large enough to amortise allocation, small enough to waste little.
const CHUNK: usize = 128;

/// A list of keys stored as fixed-capacity chunks.
#[derive(Debug, Default)]
pub(crate) struct KeyList {
    chunks: Vec<Vec<Key>>,
}

impl KeyList {
    fn push(&mut self, key: Key) {
        match self.chunks.last_mut() {
            Some(c) if c.len() < CHUNK => c.push(key),
            _ => {
                let mut c = Vec::with_capacity(CHUNK);
                c.push(key);
                self.chunks.push(c);
            }
        }
    }

    /// Removes and returns one key.
    pub(crate) fn pop(&mut self) -> Option<Key> {
        loop {
            let last = self.chunks.last_mut()?;
            if let Some(k) = last.pop() {
                return Some(k);
            }
            self.chunks.pop();
        }
    }

    /// Moves all of `other`'s keys into `self` without copying them one by one.
    fn append(&mut self, other: KeyList) {
        self.chunks.extend(other.chunks);
    }

    /// Number of keys.
    pub(crate) fn len(&self) -> usize {
        self.chunks.iter().map(Vec::len).sum()
    }

    /// Whether there are no keys.
    pub(crate) fn is_empty(&self) -> bool {
        self.chunks.iter().all(Vec::is_empty)
    }
}

#[derive(Debug)]
struct Level {
    occupied: u64,
    slots: [KeyList; SLOTS],
}

impl Default for Level {
    fn default() -> Self {
        Self {
            occupied: 0,
            slots: std::array::from_fn(|_| KeyList::default()),
        }
    }
}

/// The wheel. `elapsed` is the time up to which every due slot has been handed out.
#[derive(Debug)]
pub(crate) struct Wheel {
    elapsed: u64,
    levels: [Level; LEVELS],
    len: usize,
}

/// Span in seconds of one slot at `level`.
const fn slot_range(level: usize) -> u64 {
    1 << (SLOT_BITS as usize * level)
}

/// Span in seconds of the whole `level`.
const fn level_range(level: usize) -> u64 {
    1 << (SLOT_BITS as usize * (level + 1))
}

/// The level where a key due at `when` belongs, seen from `elapsed`: the highest 6-bit digit
/// in which the two differ.
fn level_for(elapsed: u64, when: u64) -> usize {
    let masked = (elapsed ^ when) | (SLOTS as u64 - 1);
    let significant = 63 - masked.leading_zeros() as usize;
    (significant / SLOT_BITS as usize).min(LEVELS - 1)
}

fn slot_for(when: u64, level: usize) -> usize {
    ((when >> (SLOT_BITS as usize * level)) as usize) & (SLOTS - 1)
}

impl Wheel {
    /// An empty wheel whose time starts at `now`.
    pub(crate) fn new(now: Secs) -> Self {
        Self {
            elapsed: u64::from(now),
            levels: Default::default(),
            len: 0,
        }
    }

    /// Number of scheduled keys.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Schedules `key` to be looked at once `when` has come. A time at or before `elapsed`
    /// goes into the next second's slot, so it is handed out at the next poll.
    pub(crate) fn insert(&mut self, key: Key, when: Secs) {
        let when = u64::from(when).max(self.elapsed + 1);
        let level = level_for(self.elapsed, when);
        let slot = slot_for(when, level);
        let l = &mut self.levels[level];
        l.slots[slot].push(key);
        l.occupied |= 1 << slot;
        self.len += 1;
    }

    /// The next occupied slot and its deadline, lowest level first: every deadline of level
    /// `n` is earlier than any of level `n + 1`, because a key sits on the lowest level whose
    /// span still separates it from `elapsed`.
    fn next_expiration(&self) -> Option<(usize, usize, u64)> {
        for (level, l) in self.levels.iter().enumerate() {
            if l.occupied == 0 {
                continue;
            }
            let now_slot = (self.elapsed / slot_range(level)) as u32 % SLOTS as u32;
            let zeros = l.occupied.rotate_right(now_slot).trailing_zeros();
            let slot = (zeros + now_slot) as usize % SLOTS;
            let level_start = self.elapsed & !(level_range(level) - 1);
            let mut deadline = level_start + slot as u64 * slot_range(level);
            if deadline <= self.elapsed {
                // Only the top level wraps around; the wheel's span exceeds any u32 delta.
                deadline += level_range(level);
            }
            return Some((level, slot, deadline));
        }
        None
    }

    /// Hands out the next slot due at or before `now`, whole, and moves `elapsed` to its
    /// deadline; when nothing more is due, moves `elapsed` to `now` and returns `None`.
    /// Keys from a higher level are returned too (not cascaded here): the owner re-inserts
    /// whatever is not yet expired at its current expiry, which lands it on a lower level.
    pub(crate) fn poll(&mut self, now: Secs) -> Option<KeyList> {
        let now = u64::from(now);
        match self.next_expiration() {
            Some((level, slot, deadline)) if deadline <= now => {
                self.elapsed = deadline;
                let l = &mut self.levels[level];
                l.occupied &= !(1 << slot);
                let keys = std::mem::take(&mut l.slots[slot]);
                self.len -= keys.len();
                Some(keys)
            }
            _ => {
                self.elapsed = self.elapsed.max(now);
                None
            }
        }
    }

    /// The deadline of the earliest occupied slot: no key in the wheel is scheduled before it.
    pub(crate) fn next_deadline(&self) -> Option<u64> {
        self.next_expiration().map(|(_, _, deadline)| deadline)
    }

    /// Hands out the earliest occupied slot whole, due or not, leaving `elapsed` where it is:
    /// for eviction (`--max-triplets`), which wants the records that expire first. The owner
    /// takes over the keys (see `Shard::make_room`) and schedules again those it keeps.
    pub(crate) fn take_earliest(&mut self) -> Option<KeyList> {
        let (level, slot, _) = self.next_expiration()?;
        let l = &mut self.levels[level];
        l.occupied &= !(1 << slot);
        let keys = std::mem::take(&mut l.slots[slot]);
        self.len -= keys.len();
        Some(keys)
    }
}

/// Keys handed out by the wheel and not yet dealt with; drained in small steps.
#[derive(Debug, Default)]
pub(crate) struct Pending(KeyList);

impl Pending {
    pub(crate) fn add(&mut self, keys: KeyList) {
        self.0.append(keys);
    }
    pub(crate) fn pop(&mut self) -> Option<Key> {
        self.0.pop()
    }
    /// Takes every key out.
    pub(crate) fn take(&mut self) -> KeyList {
        std::mem::take(&mut self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn k(n: u64) -> Key {
        Key { lo: n, hi: 0 }
    }

    /// Drains everything due by `now` as the owner does: a key handed out early (from a
    /// higher level's slot) goes back in at its true time from `times`.
    fn due(w: &mut Wheel, times: &BTreeMap<u64, Secs>, now: Secs) -> Vec<u64> {
        let mut out = Vec::new();
        while let Some(mut l) = w.poll(now) {
            while let Some(key) = l.pop() {
                let t = times[&key.lo];
                if t <= now {
                    out.push(key.lo);
                } else {
                    w.insert(key, t);
                }
            }
        }
        out.sort_unstable();
        out
    }

    #[test]
    fn take_earliest_hands_out_the_first_slot_due_or_not() {
        let mut w = Wheel::new(1000);
        w.insert(k(1), 1000 + 5000);
        w.insert(k(2), 1000 + 30);
        w.insert(k(3), 1000 + 30);
        w.insert(k(4), 1000 + 200_000);
        let mut first = w.take_earliest().unwrap();
        let mut got = vec![first.pop().unwrap().lo, first.pop().unwrap().lo];
        got.sort_unstable();
        assert_eq!(got, vec![2, 3]);
        assert_eq!(w.len(), 2);
        assert_eq!(w.take_earliest().unwrap().pop().map(|k| k.lo), Some(1));
        assert_eq!(w.take_earliest().unwrap().pop().map(|k| k.lo), Some(4));
        assert!(w.take_earliest().is_none());
        assert_eq!(w.len(), 0);
        // Time did not move: a key due at 1001 is still handed out at 1001, not before.
        w.insert(k(5), 1001);
        assert!(w.poll(1000).is_none());
        assert!(w.poll(1001).is_some());
    }

    #[test]
    fn level_boundaries() {
        assert_eq!(level_for(0, 0), 0);
        assert_eq!(level_for(0, 63), 0);
        assert_eq!(level_for(0, 64), 1);
        assert_eq!(level_for(0, 4095), 1);
        assert_eq!(level_for(0, 4096), 2);
        assert_eq!(level_for(0, 262_143), 2);
        assert_eq!(level_for(0, 262_144), 3);
        assert_eq!(level_for(63, 64), 1);
        assert_eq!(level_for(64, 127), 0);
        assert_eq!(level_for(0, u64::from(u32::MAX)), 5);
    }

    #[test]
    fn fires_at_the_second_not_before() {
        let mut w = Wheel::new(1000);
        let times = BTreeMap::from([(1, 1300)]);
        w.insert(k(1), 1300);
        assert!(due(&mut w, &times, 1299).is_empty());
        assert_eq!(w.len(), 1);
        assert_eq!(due(&mut w, &times, 1300), vec![1]);
        assert_eq!(w.len(), 0);
        assert!(due(&mut w, &times, 5000).is_empty());
    }

    #[test]
    fn a_level_zero_slot_is_never_handed_out_early() {
        let mut w = Wheel::new(0);
        w.insert(k(1), 40);
        assert!(w.poll(39).is_none());
        assert_eq!(w.poll(40).map(|l| l.len()), Some(1));
    }

    #[test]
    fn past_times_fire_at_next_poll() {
        let mut w = Wheel::new(500);
        w.insert(k(7), 10);
        assert_eq!(due(&mut w, &BTreeMap::from([(7, 10)]), 501), vec![7]);
    }

    #[test]
    fn far_future_and_large_jumps() {
        let mut w = Wheel::new(0);
        let month = 35 * 86_400;
        let times = BTreeMap::from([(1, month), (2, 300), (3, 2 * 86_400)]);
        for (key, t) in &times {
            w.insert(k(*key), *t);
        }
        assert_eq!(due(&mut w, &times, 299), Vec::<u64>::new());
        assert_eq!(due(&mut w, &times, 300), vec![2]);
        assert_eq!(due(&mut w, &times, month - 1), vec![3]);
        assert_eq!(due(&mut w, &times, month), vec![1]);
        assert_eq!(w.len(), 0);
    }

    proptest! {
        /// Model: every key is handed out no later than the first poll at or after its time,
        /// and a key handed out early is only ever from a higher level (its time is ahead).
        /// With re-insertion at the true time, as the owner does, it fires exactly on time.
        #[test]
        fn matches_a_btreemap_model(
            start in 0u32..1_000_000,
            ops in prop::collection::vec((0u32..3_000_000, 1u32..200_000), 1..200)
        ) {
            let mut w = Wheel::new(start);
            let mut model: BTreeMap<u64, Secs> = BTreeMap::new();
            let mut now = start;
            for (i, (delta, step)) in ops.iter().enumerate() {
                let when = now.saturating_add(*delta);
                w.insert(k(i as u64), when);
                model.insert(i as u64, when.max(now + 1));
                now = now.saturating_add(*step);
                // Drain as the owner does: re-insert what is not yet due.
                let mut fired = Vec::new();
                while let Some(mut l) = w.poll(now) {
                    while let Some(key) = l.pop() {
                        let t = model[&key.lo];
                        if t <= now { fired.push(key.lo); } else { w.insert(key, t); }
                    }
                }
                let expected: Vec<u64> = model.iter().filter(|(_, t)| **t <= now).map(|(k, _)| *k).collect();
                fired.sort_unstable();
                prop_assert_eq!(&fired, &expected);
                for key in expected { model.remove(&key); }
                prop_assert_eq!(w.len(), model.len());
            }
        }
    }
}
