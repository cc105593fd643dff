//! What the engine offers replication: an outbox of changed keys per shard, the merge of a
//! peer's records, and a digest that two nodes holding the same table agree on.
//!
//! The engine stays free of any runtime or network: a change is a key pushed onto a `Vec`
//! under the shard lock the decision already holds (no extra lock, no atomic, nothing shared
//! between shards), and the replicator (`crate::cluster`) collects them with
//! [`Engine::take_changes`]. Each outbox is bounded; when one fills (Redis down, replicator
//! behind) it stops recording and the next collection rescans that shard for every record
//! changed since the previous collection instead (every change sets `last_seen` to at least
//! its own time, so "changed since" is "`last_seen` at or after"). Nothing is lost either way.

use std::sync::Mutex;

use super::admin::{Deletable, Tombstone, Tombstones};
use super::clock::Secs;
use super::key::Key;
use super::policy::Policy;
use super::table::{Record, Slot, SlotHint};
use super::{
    by_shard, lock, AwlRecord, Engine, Expiring, Shard, TripletRecord, CLIENT_SHARD_BITS,
    TRIPLET_SHARD_BITS,
};

/// A whitelisted record (or an active auto-whitelist client) touched again is published at most
/// once per clock hour: its expiry then lags a peer's by at most an hour out of weeks, for one
/// record per hour instead of one per message.
const REFRESH_SECS: Secs = 3600;

/// Whether touching a record last seen at `before` again at `now` is worth telling peers.
#[inline]
pub(super) fn refresh_due(before: Secs, now: Secs) -> bool {
    before / REFRESH_SECS != now / REFRESH_SECS
}

/// One shard's changed keys since the last collection.
#[derive(Debug, Default)]
pub(super) struct Outbox {
    keys: Vec<Key>,
    /// At most this many keys; 0 = replication off (nothing is recorded).
    cap: usize,
    /// A change was not recorded because the outbox was full: rescan at the next collection.
    overflowed: bool,
    /// When the shard was last collected: a rescan looks at records changed since.
    collected_at: Secs,
}

impl Outbox {
    /// Records that `key` changed. Costs one compare when replication is off.
    #[inline]
    pub(super) fn push(&mut self, key: Key) {
        if self.keys.len() < self.cap {
            self.keys.push(key);
        } else if self.cap > 0 {
            self.overflowed = true;
        }
    }
}

/// Records collected for publishing by [`Engine::take_changes`] or [`Engine::changed_since`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Triplet records, each in its current whole state (a key may appear more than once).
    pub triplets: Vec<TripletRecord>,
    /// Auto-whitelist records, likewise.
    pub clients: Vec<AwlRecord>,
    /// Records deleted by an administrator here (`greyhound admin delete`): applied by a peer
    /// before the records of the same batch.
    pub tombstones: Vec<Tombstone>,
    /// Shards whose outbox had filled up and that were rescanned instead.
    pub rescanned_shards: usize,
}

impl Changes {
    /// Empties both lists, keeping their allocations.
    pub fn clear(&mut self) {
        self.triplets.clear();
        self.clients.clear();
        self.tombstones.clear();
        self.rescanned_shards = 0;
    }

    /// Whether there is nothing to publish.
    pub fn is_empty(&self) -> bool {
        self.triplets.is_empty() && self.clients.is_empty() && self.tombstones.is_empty()
    }
}

/// What [`Engine::merge_triplets`] or [`Engine::merge_clients`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MergeStats {
    /// Records received.
    pub received: usize,
    /// Records already dead at the merge time (ignored).
    pub dead: usize,
    /// Records that were not in the table (or only dead there) and were added.
    pub added: usize,
    /// Records older than a delete this node knows of (ignored: a delete wins).
    pub deleted: usize,
}

/// A summary of the live table that two nodes holding the same records agree on: counts plus
/// an XOR of a mix of each live record's replicated state (key, first seen, whitelisted flag;
/// key and pass count for auto-whitelist clients). `last_seen` is left out on purpose: a
/// known triplet's touches are published at most hourly, so nodes legitimately differ there.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Digest {
    /// Live triplet records.
    pub triplets: u64,
    /// Of those, whitelisted.
    pub whitelisted: u64,
    /// Live auto-whitelist records.
    pub clients: u64,
    /// XOR of every live record's mixed state.
    pub xor: u64,
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}-{}-{}-{:016x}",
            self.triplets, self.whitelisted, self.clients, self.xor
        )
    }
}

/// A 64-bit finaliser (SplitMix64's): XOR of raw fields would let patterns cancel.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn mix_key(k: Key, tag: u64, state: u64) -> u64 {
    mix(k.lo ^ mix(k.hi ^ mix(tag ^ state)))
}

/// How two copies of one record combine. Commutative, associative and idempotent, so the
/// order in which a node hears of changes, and how often, never matters.
pub(super) trait Merge: Expiring + Deletable + PartialEq {
    fn merge(&self, other: &Self) -> Self;
    /// The part of the state the [`Digest`] covers.
    fn digest_state(&self) -> u64;
}

impl Merge for TripletRecord {
    fn merge(&self, o: &Self) -> Self {
        self.merged(o)
    }
    fn digest_state(&self) -> u64 {
        u64::from(self.first_seen()) | (u64::from(self.is_whitelisted()) << 32)
    }
}

impl Merge for AwlRecord {
    fn merge(&self, o: &Self) -> Self {
        self.merged(o)
    }
    fn digest_state(&self) -> u64 {
        u64::from(self.count) | (1 << 40)
    }
}

impl<R: Merge> Shard<R> {
    /// Merges a copy of a record at `now`: a peer's, or an imported one (`publish`: then it
    /// is a change of this node, recorded in the outbox). A copy already dead changes nothing
    /// (it is a replay or a late arrival of a life that is over), nor does one older than a
    /// delete this node knows of (a delete wins over older state, whenever it arrives); a live
    /// copy is merged into a live local record and replaces a dead one outright, so a triplet
    /// that expired and started over never inherits its old life (first seen, whitelisted
    /// flag) from a peer.
    fn merge_in(
        &mut self,
        r: R,
        now: Secs,
        p: &Policy,
        tombs: &Tombstones,
        publish: bool,
        stats: &mut MergeStats,
    ) {
        stats.received += 1;
        let dead = |x: &R| x.alive_until_at(p) < u64::from(now);
        if r.key().is_vacant() || dead(&r) {
            stats.dead += 1;
            return;
        }
        if tombs.get(R::KIND, r.key()).is_some_and(|d| r.deleted_by(d)) {
            stats.deleted += 1;
            return;
        }
        // A peer's flood is bounded like a local one (`--max-triplets`).
        self.room_for(r.key(), now, p);
        let changed = match self.table.entry(r.key()) {
            Slot::Occupied(i) => {
                let old = *self.table.at_mut(i);
                let new = if dead(&old) {
                    stats.added += 1;
                    r
                } else {
                    old.merge(&r)
                };
                *self.table.at_mut(i) = new;
                self.marked = self.marked - usize::from(old.marked(p)) + usize::from(new.marked(p));
                // The wheel entry stays; when it fires the record is rescheduled if still alive.
                if new.alive_until_at(p) > old.alive_until_at(p) {
                    self.wheel
                        .insert(new.key(), super::wheel_time(new.alive_until_at(p)));
                }
                new != old
            }
            Slot::Vacant(i) => {
                stats.added += 1;
                self.insert_new(i, r, p);
                true
            }
        };
        if publish && changed {
            self.outbox.push(r.key());
        }
    }

    /// Moves this shard's changes into `out` (current state of each changed, live record).
    fn collect(&mut self, now: Secs, p: &Policy, out: &mut Vec<R>) -> bool {
        let rescan = self.outbox.overflowed;
        if rescan {
            let since = self.outbox.collected_at;
            out.extend(
                self.table
                    .iter()
                    .filter(|r| changed_since(*r, since) && r.alive_until_at(p) >= u64::from(now)),
            );
        } else {
            for &k in &self.outbox.keys {
                if let Some(r) = self.table.get(k) {
                    out.push(*r);
                }
            }
        }
        self.outbox.keys.clear();
        self.outbox.overflowed = false;
        self.outbox.collected_at = now;
        rescan
    }
}

/// Every change sets `last_seen` to at least its own time.
fn changed_since<R: Expiring>(r: &R, since: Secs) -> bool {
    r.last_seen_at() >= since
}

/// Merges `records` into their shards (see [`Shard::merge_in`]).
#[allow(clippy::too_many_arguments)]
pub(super) fn merge_into<R: Merge>(
    shards: &[Mutex<Shard<R>>],
    hints: &[SlotHint<R>],
    bits: u32,
    records: impl IntoIterator<Item = R>,
    now: Secs,
    p: &Policy,
    tombs: &Tombstones,
    publish: bool,
) -> MergeStats {
    let mut stats = MergeStats::default();
    by_shard(shards, hints, bits, records, |sh, r| {
        sh.merge_in(r, now, p, tombs, publish, &mut stats)
    });
    stats
}

fn digest_of<R: Merge>(
    shards: &[Mutex<Shard<R>>],
    now: Secs,
    p: &Policy,
    tag: u64,
) -> (u64, u64, u64) {
    let (mut n, mut marked, mut xor) = (0, 0, 0);
    for shard in shards {
        let sh = lock(shard);
        for r in sh.table.iter() {
            if r.alive_until_at(p) >= u64::from(now) {
                n += 1;
                marked += u64::from(r.marked(p));
                xor ^= mix_key(r.key(), tag, r.digest_state());
            }
        }
    }
    (n, marked, xor)
}

impl Engine {
    /// Turns on the outboxes of changed records that replication collects, each bounded to
    /// `per_shard` keys (16 bytes each; 256 triplet and 64 client shards). Off by default:
    /// a single node records nothing.
    pub fn with_outbox(mut self, per_shard: usize) -> Self {
        fn arm<R: Record>(shards: &mut [Mutex<Shard<R>>], cap: usize, now: Secs) {
            for shard in shards {
                let sh = shard
                    .get_mut()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                sh.outbox.cap = cap;
                sh.outbox.collected_at = now;
            }
        }
        let now = self.clock.now();
        arm(&mut self.triplets, per_shard, now);
        arm(&mut self.clients, per_shard, now);
        self
    }

    /// Whether [`Engine::with_outbox`] turned replication's outboxes on.
    pub fn replicates(&self) -> bool {
        lock(&self.triplets[0]).outbox.cap > 0
    }

    /// Appends to `out` every record changed by a decision here since the last call (merges of
    /// peers' records are not changes: they are never sent back), in its current state, and
    /// empties the outboxes. A shard whose outbox filled up meanwhile is rescanned for the
    /// records changed since its last collection (counted in `out.rescanned_shards`).
    pub fn take_changes(&self, now: Secs, out: &mut Changes) {
        let p = &self.policy;
        for shard in self.triplets.iter() {
            out.rescanned_shards += usize::from(lock(shard).collect(now, p, &mut out.triplets));
        }
        for shard in self.clients.iter() {
            out.rescanned_shards += usize::from(lock(shard).collect(now, p, &mut out.clients));
        }
        self.tombstones.take_outbox(&mut out.tombstones);
    }

    /// Appends to `out` every live record whose `last_seen` is at or after `since` — whatever
    /// may have changed since then, also records merged from peers. For a republish: after a
    /// restart (changes made before the crash may not have left) or when Redis lost its data.
    pub fn changed_since(&self, since: Secs, now: Secs, out: &mut Changes) {
        let (t, c) = self.shard_counts();
        for shard in 0..t + c {
            self.changed_since_shard(shard, since, now, out);
        }
    }

    /// [`Engine::changed_since`] for one shard: triplet shards are numbered first, then the
    /// auto-whitelist shards (see [`Engine::shard_counts`]); a larger number does nothing.
    /// One shard's lock is held for one pass over its records.
    pub fn changed_since_shard(&self, shard: usize, since: Secs, now: Secs, out: &mut Changes) {
        fn live<R: Expiring>(r: &R, since: Secs, now: Secs, p: &Policy) -> bool {
            changed_since(r, since) && r.alive_until_at(p) >= u64::from(now)
        }
        let p = &self.policy;
        if shard == 0 {
            // The few tombstones travel with the first shard.
            self.tombstones.since(since, &mut out.tombstones);
        }
        if let Some(sh) = self.triplets.get(shard) {
            let sh = lock(sh);
            out.triplets
                .extend(sh.table.iter().filter(|r| live(*r, since, now, p)));
        } else if let Some(sh) = self.clients.get(shard - self.triplets.len()) {
            let sh = lock(sh);
            out.clients
                .extend(sh.table.iter().filter(|r| live(*r, since, now, p)));
        }
    }

    /// Merges a peer's triplet records at `now` (see [`TripletRecord::merged`]). Records dead
    /// at `now` are ignored, and a live record replaces a dead local one outright. Merged
    /// records are not recorded as changes, so they are never published again.
    pub fn merge_triplets(
        &self,
        records: impl IntoIterator<Item = TripletRecord>,
        now: Secs,
    ) -> MergeStats {
        merge_into(
            &self.triplets,
            &self.triplet_hints,
            TRIPLET_SHARD_BITS,
            records,
            now,
            &self.policy,
            &self.tombstones,
            false,
        )
    }

    /// Merges a peer's auto-whitelist records at `now` (see [`AwlRecord::merged`]).
    pub fn merge_clients(
        &self,
        records: impl IntoIterator<Item = AwlRecord>,
        now: Secs,
    ) -> MergeStats {
        merge_into(
            &self.clients,
            &[],
            CLIENT_SHARD_BITS,
            records,
            now,
            &self.policy,
            &self.tombstones,
            false,
        )
    }

    /// The [`Digest`] of the records live at `now` (walks the whole table, one shard lock at a
    /// time: ~50 ms at 10 M records; for tests and operators, not for the request path).
    pub fn digest(&self, now: Secs) -> Digest {
        let p = &self.policy;
        let (triplets, whitelisted, xt) = digest_of(&self.triplets, now, p, 1);
        let (clients, _, xc) = digest_of(&self.clients, now, p, 2);
        Digest {
            triplets,
            whitelisted,
            clients,
            xor: xt ^ xc,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{
        Clock, Decision, EngineConfig, HashSecret, ManualClock, Mode, Normalizer, Pass, Query,
    };
    use proptest::prelude::*;
    use std::net::{IpAddr, Ipv4Addr};
    use std::sync::Arc;

    const T0: Secs = 100_000_000;
    /// How late a batch may arrive in [`any_interleaving_converges`]: less than the delay.
    /// Without a bound, a node that hears of a first attempt only after its retry window
    /// closed can disagree with the others about that one record until its next attempt
    /// (docs/CLUSTER_FORMAT.md, "Merging"); real lag is well under a second, and after an
    /// outage the replay is what brings nodes back together.
    const MAX_LAG: Secs = 50;

    fn policy() -> Policy {
        Policy {
            delay: 60,
            retry_window: 3600,
            awl_clients: 2,
            awl_interval: 0,
            ..Policy::default()
        }
    }

    fn node(clock: &Arc<ManualClock>, cap: usize) -> Engine {
        let cfg = EngineConfig {
            policy: policy(),
            normalizer: Normalizer::default(),
            secret: HashSecret(*b"test-secret-0001"),
        };
        Engine::new(cfg, clock.clone()).with_outbox(cap)
    }

    fn ask(e: &Engine, client: u8, n: u32) -> Decision {
        let from = format!("s{n}@example.org");
        let to = format!("r{n}@example.net");
        let ip = IpAddr::V4(Ipv4Addr::new(192, 0, client, 1));
        e.check(&Query::new(ip, &from, &to), Mode::Record)
    }

    fn take(e: &Engine) -> Changes {
        let mut c = Changes::default();
        e.take_changes(e.now(), &mut c);
        c
    }

    fn apply(e: &Engine, c: &Changes) {
        // As the replicator does: a batch's deletes before its records.
        e.merge_tombstones(c.tombstones.iter().copied());
        e.merge_triplets(c.triplets.iter().copied(), e.now());
        e.merge_clients(c.clients.iter().copied(), e.now());
    }

    /// Batches on their way between two nodes: those waiting for each node, with the time
    /// they were made.
    #[derive(Default)]
    struct Mail([Vec<(Secs, Changes)>; 2]);

    impl Mail {
        /// Delivers first whatever would be older than [`MAX_LAG`] at `then`.
        fn deliver_overdue(&mut self, nodes: &[Engine; 2], then: Secs) {
            for (to, inbox) in self.0.iter_mut().enumerate() {
                for (_, c) in inbox.extract_if(.., |(made, _)| then - *made > MAX_LAG) {
                    apply(&nodes[to], &c);
                }
            }
        }

        /// Sends node `from`'s changes, made at `now`, to the other node, then delivers by
        /// `how`: 0, everything waiting for node 1; 1, everything waiting for node 0; 2, the
        /// first batch waiting for node 1, which stays queued (so it arrives twice); else
        /// nothing.
        fn exchange(&mut self, nodes: &[Engine; 2], from: usize, now: Secs, how: u8) {
            self.0[1 - from].push((now, take(&nodes[from])));
            let to = usize::from(how % 2 == 0);
            match how {
                0 | 1 => {
                    for (_, c) in self.0[to].drain(..) {
                        apply(&nodes[to], &c);
                    }
                }
                2 => {
                    if let Some((_, c)) = self.0[to].first() {
                        apply(&nodes[to], c);
                    }
                }
                _ => {}
            }
        }

        /// Delivers everything still on its way.
        fn deliver_all(&mut self, nodes: &[Engine; 2]) {
            for (to, inbox) in self.0.iter_mut().enumerate() {
                for (_, c) in inbox.drain(..) {
                    apply(&nodes[to], &c);
                }
            }
        }
    }

    fn triplet() -> impl Strategy<Value = TripletRecord> {
        (T0..T0 + 100, 0u32..100, any::<bool>()).prop_map(|(first, d, wl)| {
            TripletRecord::from_parts(Key { lo: 1, hi: 7 }, first, first + d, wl)
        })
    }

    fn awl() -> impl Strategy<Value = AwlRecord> {
        (T0..T0 + 100, T0..T0 + 100, 0u32..10).prop_map(|(seen, counted, n)| {
            AwlRecord::from_parts(Key { lo: 1, hi: 9 }, seen, counted, n)
        })
    }

    proptest! {
        #[test]
        fn triplet_merge_is_a_semilattice(a in triplet(), b in triplet(), c in triplet()) {
            prop_assert_eq!(a.merged(&b), b.merged(&a));
            prop_assert_eq!(a.merged(&b).merged(&c), a.merged(&b.merged(&c)));
            prop_assert_eq!(a.merged(&a), a);
            // Never loses what either side knew.
            let m = a.merged(&b);
            prop_assert_eq!(m.is_whitelisted(), a.is_whitelisted() || b.is_whitelisted());
            prop_assert!(m.first_seen() <= a.first_seen() && m.last_seen() >= b.last_seen());
        }

        #[test]
        fn awl_merge_is_a_semilattice(a in awl(), b in awl(), c in awl()) {
            prop_assert_eq!(a.merged(&b), b.merged(&a));
            prop_assert_eq!(a.merged(&b).merged(&c), a.merged(&b.merged(&c)));
            prop_assert_eq!(a.merged(&a), a);
            prop_assert_eq!(a.merged(&b).count, a.count.max(b.count));
        }

        /// Two nodes take requests (some for the same triplets, from clients that earn the
        /// auto-whitelist) while time passes past delays and retry windows; each node's
        /// changes reach the other in batches, at random moments, possibly twice, each within
        /// [`MAX_LAG`] of being made. Once every batch has arrived both hold the same table,
        /// whatever the interleaving.
        #[test]
        fn any_interleaving_converges(
            ops in proptest::collection::vec(
                (any::<bool>(), 0u8..3, 0u32..6, 0u32..400, 0u8..4), 1..60),
        ) {
            let clock = Arc::new(ManualClock::new(T0));
            let nodes = [node(&clock, 4), node(&clock, 4)];
            let mut mail = Mail::default();
            for (on_b, client, n, advance, deliver) in ops {
                // Whatever would be older than the lag bound after this step arrives first.
                mail.deliver_overdue(&nodes, clock.now() + advance);
                clock.advance(advance);
                let me = usize::from(on_b);
                ask(&nodes[me], client, n);
                mail.exchange(&nodes, me, clock.now(), deliver);
            }
            mail.deliver_all(&nodes);
            let now = clock.now();
            prop_assert_eq!(nodes[0].digest(now), nodes[1].digest(now));
            // Merges are never published back.
            prop_assert!(take(&nodes[0]).is_empty() && take(&nodes[1]).is_empty());
        }
    }

    fn query(client: u8, n: u32) -> (IpAddr, String, String) {
        (
            IpAddr::V4(Ipv4Addr::new(192, 0, client, 1)),
            format!("s{n}@example.org"),
            format!("r{n}@example.net"),
        )
    }

    proptest! {
        /// As [`any_interleaving_converges`], with administrators deleting triplets and
        /// clients' auto-whitelist entries on either node meanwhile: once every batch has
        /// arrived both nodes hold the same table, and no node holds a copy of a deleted
        /// triplet's life that had begun by its delete, whatever arrived when.
        #[test]
        fn deletes_converge_and_are_never_resurrected(
            ops in proptest::collection::vec(
                (any::<bool>(), 0u8..3, 0u32..4, 0u32..200, 0u8..4, 0u8..8), 1..60),
        ) {
            let clock = Arc::new(ManualClock::new(T0));
            let nodes = [node(&clock, 4), node(&clock, 4)];
            let mut mail = Mail::default();
            let mut deleted: Vec<(Key, Secs)> = Vec::new();
            for (on_b, client, n, advance, deliver, action) in ops {
                mail.deliver_overdue(&nodes, clock.now() + advance);
                clock.advance(advance);
                let me = usize::from(on_b);
                let (ip, from, to_addr) = query(client, n);
                let q = Query::new(ip, &from, &to_addr);
                match action {
                    0 => {
                        nodes[me].delete(&q);
                        let key = nodes[me].explain(&q).identities[0].key;
                        deleted.push((key, clock.now()));
                    }
                    1 => {
                        nodes[me].delete_client(ip);
                    }
                    _ => {
                        nodes[me].check(&q, Mode::Record);
                    }
                }
                mail.exchange(&nodes, me, clock.now(), deliver);
            }
            mail.deliver_all(&nodes);
            let now = clock.now();
            prop_assert_eq!(nodes[0].digest(now), nodes[1].digest(now));
            for e in &nodes {
                let mut held = Vec::new();
                e.for_each_triplet_shard(|it| held.extend(it.copied()));
                for r in held {
                    for &(key, at) in &deleted {
                        prop_assert!(
                            r.key != key || r.first_seen() >= at,
                            "a life begun by its delete came back: {:?} deleted at {}", r, at
                        );
                    }
                }
            }
            prop_assert!(take(&nodes[0]).is_empty() && take(&nodes[1]).is_empty());
        }
    }

    #[test]
    fn a_peers_older_copy_never_comes_back_after_a_delete() {
        let clock = Arc::new(ManualClock::new(T0));
        let (a, b) = (node(&clock, 64), node(&clock, 64));
        let (ip, from, to) = query(1, 1);
        let q = Query::new(ip, &from, &to);
        a.check(&q, Mode::Record);
        apply(&b, &take(&a));
        clock.advance(61);
        // B passes it (whitelisted) and publishes that; A deletes meanwhile.
        assert!(matches!(
            b.check(&q, Mode::Record),
            Decision::Pass(Pass::Retried { .. })
        ));
        let from_b = take(&b);
        assert!(a.delete(&q));
        let from_a = take(&a);
        assert_eq!(from_a.tombstones.len(), 1);
        // B's older, whitelisted copy reaches A after the delete: refused.
        apply(&a, &from_b);
        assert_eq!(a.stats().triplets, 0);
        // The delete reaches B: its copy goes too.
        apply(&b, &from_a);
        assert_eq!(b.stats().triplets, 0);
        // Replayed later (a restart, a republish): still refused, both ways.
        apply(&a, &from_b);
        apply(&b, &from_b);
        assert_eq!((a.stats().triplets, b.stats().triplets), (0, 0));
        // A new first attempt after the delete is a new life, and travels, even in the very
        // second of the delete.
        assert_eq!(
            a.check(&q, Mode::Record),
            Decision::Defer { seconds_left: 60 }
        );
        apply(&b, &take(&a));
        assert_eq!(b.digest(clock.now()), a.digest(clock.now()));
        assert_eq!(b.stats().triplets, 1);
    }

    #[test]
    fn what_is_published_and_what_is_not() {
        let clock = Arc::new(ManualClock::new(T0 - T0 % REFRESH_SECS));
        let e = node(&clock, 64);
        ask(&e, 1, 1);
        assert_eq!(take(&e).triplets.len(), 1, "a new record");
        clock.advance(10);
        ask(&e, 1, 1);
        assert!(
            take(&e).is_empty(),
            "an early retry changes nothing a peer decides by"
        );
        clock.advance(60);
        assert!(matches!(
            ask(&e, 1, 1),
            Decision::Pass(Pass::Retried { .. })
        ));
        let c = take(&e);
        assert_eq!(c.triplets.len(), 1, "a pass");
        assert!(c.triplets[0].is_whitelisted());
        assert_eq!(c.clients.len(), 1, "the client's pass count");
        clock.advance(60);
        assert_eq!(ask(&e, 1, 1), Decision::Pass(Pass::Known));
        assert!(take(&e).is_empty(), "a known pass within the hour");
        clock.advance(REFRESH_SECS);
        assert_eq!(ask(&e, 1, 1), Decision::Pass(Pass::Known));
        let c = take(&e);
        assert_eq!(c.triplets.len(), 1, "the hourly refresh");
        assert_eq!(c.triplets[0].last_seen(), clock.now());
        // A PEEK records nothing.
        clock.advance(REFRESH_SECS);
        let q = Query::new(IpAddr::V4(Ipv4Addr::new(192, 0, 9, 9)), "a@b.c", "d@e.f");
        e.check(&q, Mode::Peek);
        assert!(take(&e).is_empty());
    }

    #[test]
    fn a_single_node_records_nothing() {
        let clock = Arc::new(ManualClock::new(T0));
        let e = node(&clock, 0);
        assert!(!e.replicates());
        for n in 0..100 {
            ask(&e, 1, n);
        }
        let c = take(&e);
        assert!(c.is_empty() && c.rescanned_shards == 0);
    }

    #[test]
    fn a_full_outbox_rescans_instead_of_losing() {
        let clock = Arc::new(ManualClock::new(T0));
        let e = node(&clock, 1);
        // Something collected earlier that must not come again.
        ask(&e, 1, 100_000);
        clock.advance(1);
        take(&e);
        clock.advance(5);
        for n in 0..2000 {
            ask(&e, 1, n);
        }
        let c = take(&e);
        assert!(c.rescanned_shards > 0);
        let mut keys: Vec<Key> = c.triplets.iter().map(|r| r.key).collect();
        keys.sort_by_key(|k| (k.hi, k.lo));
        keys.dedup();
        assert_eq!(
            keys.len(),
            2000,
            "every changed record, the earlier one not again"
        );
        // Once collected, the next collection is small again.
        clock.advance(1);
        ask(&e, 1, 5000);
        let c = take(&e);
        assert_eq!((c.triplets.len(), c.rescanned_shards), (1, 0));
    }

    #[test]
    fn a_retry_on_the_other_node_passes_once_the_first_attempt_arrived() {
        let clock = Arc::new(ManualClock::new(T0));
        let (a, b) = (node(&clock, 64), node(&clock, 64));
        assert_eq!(ask(&a, 1, 1), Decision::Defer { seconds_left: 60 });
        apply(&b, &take(&a));
        clock.advance(61);
        assert!(matches!(
            ask(&b, 1, 1),
            Decision::Pass(Pass::Retried { delayed: 61 })
        ));
        apply(&a, &take(&b));
        assert_eq!(ask(&a, 1, 1), Decision::Pass(Pass::Known));
        assert_eq!(a.digest(clock.now()), b.digest(clock.now()));
        assert_eq!(a.digest(clock.now()).whitelisted, 1);
    }

    #[test]
    fn a_dead_local_record_is_replaced_not_merged() {
        let clock = Arc::new(ManualClock::new(T0));
        let (a, b) = (node(&clock, 64), node(&clock, 64));
        ask(&a, 1, 1);
        apply(&b, &take(&a));
        // Past the retry window both copies are dead; A starts the triplet over.
        clock.advance(3601 + 10);
        ask(&a, 1, 1);
        let c = take(&a);
        let fresh = c.triplets[0];
        assert_eq!(fresh.first_seen(), clock.now());
        apply(&b, &c);
        assert_eq!(b.digest(clock.now()), a.digest(clock.now()));
        // A copy of the old life arriving late (a replay) changes nothing.
        let old = TripletRecord::from_parts(fresh.key, T0, T0, false);
        let s = b.merge_triplets([old], clock.now());
        assert_eq!((s.received, s.dead, s.added), (1, 1, 0));
        assert_eq!(b.digest(clock.now()), a.digest(clock.now()));
    }

    #[test]
    fn changed_since_finds_merged_records_too() {
        let clock = Arc::new(ManualClock::new(T0));
        let (a, b) = (node(&clock, 64), node(&clock, 64));
        ask(&a, 1, 1);
        clock.advance(10);
        ask(&a, 1, 2);
        apply(&b, &take(&a));
        let mut c = Changes::default();
        b.changed_since(T0 + 5, clock.now(), &mut c);
        assert_eq!(c.triplets.len(), 1);
        c.clear();
        b.changed_since(0, clock.now(), &mut c);
        assert_eq!(c.triplets.len(), 2);
    }
}
