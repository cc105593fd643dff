//! The greylisting engine: normalisation, keys, the sharded triplet table with its timer
//! wheel, the client auto-whitelist and the exemption lists. No runtime, no sockets: the
//! server and the capacity planner both drive it directly, with their own [`Clock`].
//!
//! ```text
//!  Query (raw strings) ──► exemptions? ──► normalise ──► keyed hash ──► Keyed
//!                              │ yes                                     │
//!                              ▼                                         ▼
//!                     PASS exempt/auth/tls     shard = key.hi top bits ─► lock shard
//!                                              whitelisted? ─► PASS known
//!                                              client in AWL? ─► PASS awl
//!                                              greylist rules ─► DEFER n / PASS retried
//! ```

mod admin;
pub mod clock;
pub mod domains;
pub mod exempt;
pub mod identity;
pub mod key;
pub mod normalize;
pub mod policy;
pub(crate) mod prefetch;
pub mod record;
mod replica;
mod table;
pub mod trust;
mod wheel;

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use arc_swap::ArcSwap;

pub use admin::{Explanation, IdentityRecord, ImportRecord, ImportStats, Tombstone, TombstoneKind};
pub use clock::{Clock, ManualClock, Secs, SystemClock};
pub use exempt::{ExemptList, Exemptions};
pub use identity::{Identities, IdentityKind};
pub use key::{HashSecret, Key, KeyHasher};
pub use normalize::{ClientNet, Normalizer};
pub use policy::Policy;
pub use record::{AwlRecord, TripletRecord};
pub use replica::{Changes, Digest, MergeStats};
pub use trust::{ClientCert, TrustedCerts};

use record::Judgement;
use table::{Record, Slot, SlotHint, Table};
use wheel::{Pending, Wheel};

/// log2 of the number of triplet shards. 256 shards keep each shard's table small (a 10 M
/// table grows one 1 MB shard at a time, never all at once) while costing ~9 KiB each.
const TRIPLET_SHARD_BITS: u32 = 8;
/// log2 of the number of auto-whitelist shards; that table is far smaller.
const CLIENT_SHARD_BITS: u32 = 6;
/// Records examined per lock hold while expiring: bounds the pause a concurrent caller of
/// the same shard can see (about 20 µs, see `docs/BENCHMARKS.md`).
const EXPIRE_STEP: usize = 512;

/// One request, as raw strings from a protocol.
#[derive(Debug, Clone, Copy)]
pub struct Query<'a> {
    /// The connecting client's address.
    pub client: IpAddr,
    /// Envelope sender, bare; `""` or `"<>"` is the null sender.
    pub sender: &'a str,
    /// Envelope recipient, bare.
    pub recipient: &'a str,
    /// The client's reverse-DNS name, if known (for hostname exemptions).
    pub client_name: Option<&'a str>,
    /// SASL user name; a non-empty one passes as `auth`.
    pub auth: Option<&'a str>,
    /// The client's TLS certificate; a trusted one passes as `tls`.
    pub cert: ClientCert<'a>,
    /// DATA stage: a hex digest of the message (checked by the codec: hex digits only). When
    /// present it replaces the recipient in the key, so one message to many recipients is one
    /// record; the recipient is then only what the exemption lists look at.
    pub body: Option<&'a str>,
    /// The domain the client's address passed SPF for (the sender's domain, or the HELO name
    /// for the null sender), as the server resolved it; the `spf` identity when in force.
    pub spf: Option<&'a str>,
}

impl<'a> Query<'a> {
    /// A query with only the triplet.
    pub fn new(client: IpAddr, sender: &'a str, recipient: &'a str) -> Self {
        Self {
            client,
            sender,
            recipient,
            client_name: None,
            auth: None,
            cert: ClientCert::default(),
            body: None,
            spf: None,
        }
    }
}

/// Whether a decision is recorded (`CHECK`) or only computed (`PEEK`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Decide and record the effect.
    Record,
    /// Decide without changing anything.
    Peek,
}

/// Why a request passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// First pass after a retry; the triplet waited this many seconds.
    Retried {
        /// Seconds since the triplet was first seen.
        delayed: u32,
    },
    /// A whitelisted triplet.
    Known,
    /// The client is auto-whitelisted.
    Awl,
    /// A static exemption list matched.
    Exempt(ExemptList),
    /// The client authenticated.
    Auth,
    /// The client presented a trusted TLS certificate (`trusted-certs`).
    Tls,
    /// The recipient's domain is `off` in `domain-policy`.
    DomainOff,
    /// Dry-run mode: the answer would have been DEFER with this many seconds left.
    DryRun {
        /// Seconds that would have been left.
        seconds_left: u32,
    },
}

impl Pass {
    /// The reason as written on the wire.
    pub fn reason(&self) -> &'static str {
        match self {
            Pass::Retried { .. } => "retried",
            Pass::Known => "known",
            Pass::Awl => "awl",
            Pass::Exempt(ExemptList::Client) => "exempt:client",
            Pass::Exempt(ExemptList::ClientName) => "exempt:client-name",
            Pass::Exempt(ExemptList::Sender) => "exempt:sender",
            Pass::Exempt(ExemptList::Recipient) => "exempt:recipient",
            Pass::Auth => "auth",
            Pass::Tls => "tls",
            Pass::DomainOff => "domain-off",
            Pass::DryRun { .. } => "dry-run",
        }
    }
}

/// The answer to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Temporary rejection; the triplet may pass after this many seconds.
    Defer {
        /// Seconds until a retry would pass.
        seconds_left: u32,
    },
    /// Let the message through.
    Pass(Pass),
}

/// A query reduced to its keys, ready to be decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keyed {
    /// Key of the normalised triplet.
    pub key: Key,
    /// The client's network, keyed lazily for the auto-whitelist (most requests never need it).
    pub client: ClientNet,
    /// The recipient is a greytrap (`greytrap-recipients`) and the client is not exempt:
    /// deciding traps the client. Found while preparing, acted on while deciding, so that
    /// preparing stays free of effects.
    pub greytrap: bool,
    /// The recipient domain's `domain-policy` rule (never an `off` one, answered while
    /// preparing); `None` when no entry applies.
    pub domain: Option<domains::DomainRule>,
    /// The triplet's keys under the client's other identities (`client-identity`), in order
    /// after `key` (the first identity, where a new record is written); a record found under
    /// any of them counts. `alts` of them are used.
    pub alt: [Key; 2],
    /// How many of `alt` are used.
    pub alts: u8,
    /// The auto-whitelist key of an `spf` identity, when the client has one; otherwise the
    /// auto-whitelist is keyed by the client's network (never by a `name` identity).
    pub awl: Option<Key>,
    /// The client identity that `key` is written under, when it is not the client's network
    /// (an `spf` or `name` identity; set only while `--max-new-per-client` is on): whose new
    /// records are counted. `None`: the network's.
    pub who: Option<Key>,
    /// The key under the client's network (the last identity) is not computed yet: it is
    /// hashed from the triplet's message only if the keys before it find no known record
    /// (most requests with an `spf` or `name` identity never need it). Only the grouped path,
    /// [`Batch::decide_each`], which keeps each request's message until it is decided, makes
    /// such keys.
    prefix_pending: bool,
}

impl Keyed {
    /// A keyed query for `key` from `client`, to no greytrap, under no other identity.
    pub fn new(key: Key, client: ClientNet) -> Self {
        Self {
            key,
            client,
            greytrap: false,
            domain: None,
            alt: [Key::VACANT; 2],
            alts: 0,
            awl: None,
            who: None,
            prefix_pending: false,
        }
    }

    /// The keys under the client's other identities.
    #[inline]
    pub fn alternates(&self) -> &[Key] {
        &self.alt[..usize::from(self.alts)]
    }
}

/// Everything needed to build an [`Engine`].
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The rules' settings.
    pub policy: Policy,
    /// Client masking.
    pub normalizer: Normalizer,
    /// Secret that keys record hashes.
    pub secret: HashSecret,
}

/// Counts for metrics and logs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Triplet records in memory (including expired ones not yet reached by the wheel).
    pub triplets: usize,
    /// Of those, whitelisted.
    pub whitelisted: usize,
    /// Client records in the auto-whitelist table.
    pub awl_clients: usize,
    /// Client records at or above the pass threshold.
    pub awl_active: usize,
    /// Bytes held by tables and wheels (slot arrays; excludes allocator overhead).
    pub table_bytes: usize,
    /// Client networks trapped by a greytrap now.
    pub trapped_clients: usize,
    /// Requests to a greytrap address (recorded ones, since start).
    pub greytrap_hits: u64,
    /// Requests deferred because their client was trapped (since start).
    pub greytrap_deferrals: u64,
    /// Greylisted (never passed) triplets evicted to stay within `--max-triplets` (since start).
    pub evicted_greylisted: u64,
    /// Whitelisted triplets evicted to stay within `--max-triplets`: only when a shard held
    /// nothing else (since start).
    pub evicted_whitelisted: u64,
    /// New triplets answered DEFER without being recorded because their client was over
    /// `--max-new-per-client` (since start).
    pub new_refused: u64,
}

/// What one call to [`Engine::expire`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExpireStats {
    /// Records looked at because their wheel slot came due.
    pub examined: usize,
    /// Records removed because they had expired.
    pub removed: usize,
    /// The longest time one shard's lock was held for a step: the longest a request on
    /// that shard could have waited behind expiry.
    pub longest_step: std::time::Duration,
}

/// How a record type expires and which records count as "marked" (whitelisted triplets,
/// active AWL clients) for the statistics.
trait Expiring: Record {
    fn alive_until_at(&self, p: &Policy) -> u64;
    fn marked(&self, p: &Policy) -> bool;
    /// Every change to a record sets this to at least the change's time.
    fn last_seen_at(&self) -> Secs;
}

impl Expiring for TripletRecord {
    fn alive_until_at(&self, p: &Policy) -> u64 {
        self.alive_until(p)
    }
    fn last_seen_at(&self) -> Secs {
        self.last_seen()
    }
    fn marked(&self, _: &Policy) -> bool {
        self.is_whitelisted()
    }
}

impl Expiring for AwlRecord {
    fn alive_until_at(&self, p: &Policy) -> u64 {
        self.alive_until(p)
    }
    fn last_seen_at(&self) -> Secs {
        self.last_seen
    }
    fn marked(&self, p: &Policy) -> bool {
        p.awl_clients > 0 && self.count >= p.awl_clients
    }
}

/// A table and the wheel that expires its records, under one lock.
///
/// Every record's key is in exactly one of `wheel`, `pending`, `evict` and `spared` (possibly
/// also more than once: a stale copy is skipped when its record is gone or looked at again).
#[derive(Debug)]
struct Shard<R: Record> {
    table: Table<R>,
    wheel: Wheel,
    pending: Pending,
    marked: usize,
    /// Keys changed here since the last [`Engine::take_changes`], for replication.
    outbox: replica::Outbox,
    /// Most records this shard keeps (`--max-triplets` / shards); `usize::MAX`: no bound.
    cap: usize,
    /// Keys taken from the wheel's earliest slot by [`Shard::make_room`], earliest expiry last.
    evict: Vec<Aside>,
    /// Marked (whitelisted) records met while looking for an unmarked one to evict, kept
    /// out of the wheel so the search never meets them again; earliest expiry first.
    spared: BinaryHeap<Reverse<Aside>>,
    /// Records evicted to make room: `[unmarked, marked]`.
    evicted: [u64; 2],
}

/// A key set aside for eviction, with the wheel time of its record's expiry when set aside:
/// the second [`Shard::expire_step`] looks at it again, as the wheel would have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Aside {
    when: Secs,
    key: Key,
}

/// What [`Shard::make_room`] freed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Freed {
    /// Nothing: the shard is empty.
    Nothing,
    /// An expired record, removed as expiry would have.
    Expired,
    /// A live unmarked record (a greylisted, never-passed triplet).
    Unmarked,
    /// A live marked record (a whitelisted triplet): nothing else was left.
    Marked,
}

impl<R: Expiring> Shard<R> {
    fn new(now: Secs) -> Self {
        Self {
            table: Table::default(),
            wheel: Wheel::new(now),
            pending: Pending::default(),
            marked: 0,
            outbox: replica::Outbox::default(),
            cap: usize::MAX,
            evict: Vec::new(),
            spared: BinaryHeap::new(),
            evicted: [0; 2],
        }
    }

    /// Whether a new record must first make room (`--max-triplets`).
    #[inline]
    fn full(&self) -> bool {
        self.table.len() >= self.cap
    }

    /// Makes room for a new record with `key` if the shard is full and `key` is not there.
    #[inline]
    fn room_for(&mut self, key: Key, now: Secs, p: &Policy) {
        if self.full() && self.table.get(key).is_none() {
            self.make_room(now, p);
        }
    }

    /// Frees one record: an expired one if met first, else the unmarked record (greylisted,
    /// never passed) that expires first, else — only when every record is marked — the
    /// marked (whitelisted) one that expires first.
    ///
    /// A greylisted triplet expires at first seen + retry window, so "expires first" is "the
    /// oldest". The wheel already orders keys by expiry: its earliest slot is taken whole,
    /// sorted by the records' true expiry into `evict` and consumed from there, so each key
    /// is looked up about twice per eviction and no memory is spent on a separate queue (the
    /// keys move out of the wheel; the order is exact within a slot and slots are in order).
    /// Whitelisted records met on the way go to `spared`, out of the search, so a shard full
    /// of whitelisted records that expire soon does not make every eviction re-sort them.
    fn make_room(&mut self, now: Secs, p: &Policy) -> Freed {
        loop {
            if self.marked >= self.table.len() {
                return self.evict_marked(now, p);
            }
            let aside = match self.pop_evict() {
                Some(a) => a,
                None if self.set_aside(p) => continue,
                None => return self.evict_spared_unmarked(now, p),
            };
            let Some(r) = self.table.get(aside.key).copied() else {
                continue;
            };
            let until = r.alive_until_at(p);
            let marked = r.marked(p);
            let when = wheel_time(until);
            if until >= u64::from(now) {
                if marked {
                    self.spared.push(Reverse(Aside { when, ..aside }));
                    continue;
                }
                if when != aside.when {
                    // Started over since it was set aside: younger than its place says.
                    self.wheel.insert(aside.key, when);
                    continue;
                }
            }
            return self.evict_now(aside.key, marked, until < u64::from(now));
        }
    }

    /// Removes the record with `key`, counting it as evicted unless it had `expired`.
    fn evict_now(&mut self, key: Key, marked: bool, expired: bool) -> Freed {
        self.table.remove(key);
        self.marked -= usize::from(marked);
        if expired {
            return Freed::Expired;
        }
        self.evicted[usize::from(marked)] += 1;
        if marked {
            Freed::Marked
        } else {
            Freed::Unmarked
        }
    }

    /// Wheel and queue are empty but unmarked records are left: they were spared while
    /// whitelisted and started over in place since (or the count is off). Rare, so a linear
    /// search of `spared` is fine.
    fn evict_spared_unmarked(&mut self, now: Secs, p: &Policy) -> Freed {
        let mut v = std::mem::take(&mut self.spared).into_vec();
        let found = v
            .iter()
            .position(|Reverse(a)| self.table.get(a.key).is_some_and(|r| !r.marked(p)));
        let picked = found.map(|i| v.swap_remove(i).0);
        self.spared = v.into();
        match picked.and_then(|a| self.table.get(a.key).copied()) {
            Some(r) => {
                let expired = r.alive_until_at(p) < u64::from(now);
                self.evict_now(r.key(), false, expired)
            }
            None => self.evict_marked(now, p),
        }
    }

    /// Evicts the marked record that expires first (for a whitelisted triplet: the one seen
    /// longest ago), once nothing unmarked is left. Gathers into `spared`, at their true
    /// expiry, the keys set aside and every wheel slot that may hold an earlier one (a key
    /// sits in a slot no later than its expiry), so later calls pop the heap at once.
    fn evict_marked(&mut self, now: Secs, p: &Policy) -> Freed {
        let mut keys: Vec<Key> = std::mem::take(&mut self.evict)
            .into_iter()
            .map(|a| a.key)
            .collect();
        let mut pending = self.pending.take();
        while let Some(k) = pending.pop() {
            keys.push(k);
        }
        self.spare(keys, p);
        while let Some(deadline) = self.wheel.next_deadline() {
            if self
                .spared
                .peek()
                .is_some_and(|Reverse(a)| u64::from(a.when) <= deadline)
            {
                break;
            }
            let Some(mut slot) = self.wheel.take_earliest() else {
                break;
            };
            let mut keys = Vec::with_capacity(slot.len());
            while let Some(k) = slot.pop() {
                keys.push(k);
            }
            self.spare(keys, p);
        }
        while let Some(Reverse(a)) = self.spared.pop() {
            let Some(r) = self.table.get(a.key).copied() else {
                continue;
            };
            let until = r.alive_until_at(p);
            if wheel_time(until) != a.when {
                // Refreshed since it was spared: back in at its true place.
                self.spared.push(Reverse(Aside {
                    when: wheel_time(until),
                    key: a.key,
                }));
                continue;
            }
            return self.evict_now(a.key, r.marked(p), until < u64::from(now));
        }
        Freed::Nothing
    }

    /// Puts `keys` into `spared` at their records' expiry (a key whose record is gone is
    /// dropped).
    fn spare(&mut self, keys: Vec<Key>, p: &Policy) {
        for key in keys {
            if let Some(r) = self.table.get(key) {
                let when = wheel_time(r.alive_until_at(p));
                self.spared.push(Reverse(Aside { when, key }));
            }
        }
    }

    /// The next key of `evict`, releasing its memory once it is used up.
    fn pop_evict(&mut self) -> Option<Aside> {
        let a = self.evict.pop();
        if self.evict.is_empty() && self.evict.capacity() > 0 {
            self.evict = Vec::new();
        }
        a
    }

    /// Moves the keys that expire first (those already handed out by the wheel, else its
    /// earliest slot) into `evict`, sorted by their records' expiry, earliest last. False
    /// when the wheel is empty.
    fn set_aside(&mut self, p: &Policy) -> bool {
        let mut keys = self.pending.take();
        if keys.is_empty() {
            match self.wheel.take_earliest() {
                Some(k) => keys = k,
                None => return false,
            }
        }
        let mut v = Vec::with_capacity(keys.len());
        while let Some(key) = keys.pop() {
            // A key whose record is gone was a stale copy: dropped.
            if let Some(r) = self.table.get(key) {
                v.push(Aside {
                    when: wheel_time(r.alive_until_at(p)),
                    key,
                });
            }
        }
        v.sort_unstable_by(|a, b| b.cmp(a));
        self.evict.append(&mut v);
        true
    }

    /// A set-aside key due by `now`, for expiry to look at as if the wheel had handed it out.
    fn due_aside(&mut self, now: Secs) -> Option<Key> {
        if self.evict.last().is_some_and(|a| a.when <= now) {
            return self.pop_evict().map(|a| a.key);
        }
        if self.spared.peek().is_some_and(|Reverse(a)| a.when <= now) {
            return self.spared.pop().map(|Reverse(a)| a.key);
        }
        None
    }

    /// Bytes held outside the table: the wheel and the keys set aside.
    fn schedule_bytes(&self) -> usize {
        self.wheel.len() * std::mem::size_of::<Key>()
            + (self.evict.capacity() + self.spared.capacity()) * std::mem::size_of::<Aside>()
    }

    /// Inserts a new record and schedules its expiry.
    fn insert_new(&mut self, index: usize, r: R, p: &Policy) {
        self.table.fill(index, r);
        self.marked += usize::from(r.marked(p));
        self.wheel.insert(r.key(), wheel_time(r.alive_until_at(p)));
    }

    /// Adds or replaces a record from outside (loading), scheduling it if it is new.
    fn put(&mut self, r: R, now: Secs, p: &Policy) {
        self.room_for(r.key(), now, p);
        match self.table.entry(r.key()) {
            Slot::Occupied(i) => {
                let old = std::mem::replace(self.table.at_mut(i), r);
                self.marked = self.marked - usize::from(old.marked(p)) + usize::from(r.marked(p));
            }
            Slot::Vacant(i) => self.insert_new(i, r, p),
        }
    }

    /// Looks at up to `budget` records whose slot is due by `now`. Returns true when the
    /// shard is caught up.
    fn expire_step(
        &mut self,
        now: Secs,
        p: &Policy,
        budget: usize,
        stats: &mut ExpireStats,
    ) -> bool {
        let mut left = budget;
        while left > 0 {
            let Some(key) = self.pending.pop().or_else(|| self.due_aside(now)) else {
                match self.wheel.poll(now) {
                    Some(keys) => {
                        self.pending.add(keys);
                        continue;
                    }
                    None => return true,
                }
            };
            left -= 1;
            stats.examined += 1;
            let Some(r) = self.table.get(key).copied() else {
                continue;
            };
            let until = r.alive_until_at(p);
            if until < u64::from(now) {
                self.table.remove(key);
                self.marked -= usize::from(r.marked(p));
                stats.removed += 1;
            } else {
                self.wheel.insert(key, wheel_time(until));
            }
        }
        // Budget spent: not known to be caught up; the caller releases the lock and comes back.
        false
    }
}

/// The wheel fires at the first second a record is dead.
fn wheel_time(alive_until: u64) -> Secs {
    (alive_until + 1).min(u64::from(u32::MAX)) as Secs
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a shard lock cannot leave a record half-written (records are
    // plain Copy values written whole), so a poisoned shard is still consistent.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[inline]
fn shard_of(key: Key, bits: u32) -> usize {
    (key.hi >> (64 - bits)) as usize
}

/// Per-thread buffers for normalised strings, so a decision allocates nothing.
#[derive(Default)]
struct Scratch {
    /// The messages of a group of [`Batch::decide_each`], one per request, kept until the
    /// request is decided.
    group: [Vec<u8>; DECIDE_GROUP],
    lower_sender: Vec<u8>,
    lower_name: Vec<u8>,
    message: Vec<u8>,
    /// The normalised recipient of a DATA-stage query, which is not part of `message`.
    rcpt: Vec<u8>,
    /// The lower-cased name of a client identity.
    ident_name: Vec<u8>,
    ident_memo: identity::IdentityMemo,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

fn lower_into<'b>(s: &str, buf: &'b mut Vec<u8>) -> &'b str {
    buf.clear();
    buf.extend_from_slice(s.as_bytes());
    buf.make_ascii_lowercase();
    // ASCII lower-casing keeps UTF-8 valid; fall back to "" rather than panic if not.
    std::str::from_utf8(buf).unwrap_or("")
}

/// The greylisting engine. Shared between threads by reference or `Arc`.
pub struct Engine {
    policy: Policy,
    normalizer: Normalizer,
    hasher: KeyHasher,
    key_id: u64,
    clock: Arc<dyn Clock>,
    exemptions: ArcSwap<Exemptions>,
    triplets: Box<[Mutex<Shard<TripletRecord>>]>,
    /// Each triplet shard's slot array, readable without its lock, for prefetching.
    triplet_hints: Box<[SlotHint<TripletRecord>]>,
    clients: Box<[Mutex<Shard<AwlRecord>>]>,
    /// Greytraps: trapped client networks (by client key) and the second their trap ends.
    traps: Greytraps,
    /// The client identities in force, in order.
    identities: Identities,
    /// New records per client identity this minute (`--max-new-per-client`).
    new_counts: NewCounts,
    /// Records deleted by an administrator, here or on a peer (`admin.rs`).
    tombstones: admin::Tombstones,
}

/// log2 of the number of shards counting new records per client.
const NEW_SHARD_BITS: u32 = 6;
/// Client identities counted per shard in one minute: 64 × 4096 = 262 144 in all, at most
/// ~10 MB. A client not counted because its shard is full that minute is let through: the
/// limit is aimed at a few sources inventing triplets, and `--max-triplets` bounds memory
/// whatever the number of sources.
const NEW_PER_SHARD: usize = 4096;

/// `--max-new-per-client`: new records per client identity in the current minute (fixed
/// one-minute windows, `now / 60`), in a few small maps that are emptied when the minute turns.
#[derive(Debug)]
struct NewCounts {
    /// New records allowed per client per minute; 0 = off.
    limit: u32,
    shards: Box<[Mutex<MinuteCounts>]>,
    refused: std::sync::atomic::AtomicU64,
}

#[derive(Debug, Default)]
struct MinuteCounts {
    minute: Secs,
    counts: ahash::AHashMap<Key, u32>,
}

impl Default for NewCounts {
    fn default() -> Self {
        Self {
            limit: 0,
            shards: (0..1 << NEW_SHARD_BITS).map(|_| Mutex::default()).collect(),
            refused: Default::default(),
        }
    }
}

impl NewCounts {
    /// Counts one new record from `client` at `now`; false (and counted as refused) if the
    /// client already made `limit` this minute.
    fn admit(&self, client: Key, now: Secs) -> bool {
        let mut m = lock(&self.shards[shard_of(client, NEW_SHARD_BITS)]);
        let minute = now / 60;
        if m.minute != minute {
            m.minute = minute;
            m.counts.clear();
        }
        let len = m.counts.len();
        match m.counts.get_mut(&client) {
            Some(n) if *n >= self.limit => {
                drop(m);
                self.refused
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                false
            }
            Some(n) => {
                *n += 1;
                true
            }
            None if len >= NEW_PER_SHARD => true,
            None => {
                m.counts.insert(client, 1);
                true
            }
        }
    }
}

/// Clients trapped by writing to a greytrap address: few, short-lived, so a plain map per
/// shard; `trapped` lets every other request skip them with one relaxed load.
#[derive(Debug)]
struct Greytraps {
    shards: Box<[Mutex<ahash::AHashMap<Key, Secs>>]>,
    trapped: std::sync::atomic::AtomicUsize,
    ttl: u32,
    hits: std::sync::atomic::AtomicU64,
    deferrals: std::sync::atomic::AtomicU64,
}

/// log2 of the number of greytrap shards.
const TRAP_SHARD_BITS: u32 = 4;

impl Default for Greytraps {
    fn default() -> Self {
        Self {
            shards: (0..1 << TRAP_SHARD_BITS)
                .map(|_| Mutex::default())
                .collect(),
            trapped: Default::default(),
            ttl: 86_400,
            hits: Default::default(),
            deferrals: Default::default(),
        }
    }
}

impl Greytraps {
    fn trap(&self, client: Key, now: Secs) {
        let until = now.saturating_add(self.ttl);
        let mut m = lock(&self.shards[shard_of(client, TRAP_SHARD_BITS)]);
        if m.insert(client, until).is_none() {
            self.trapped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn is_trapped(&self, client: Key, now: Secs) -> bool {
        lock(&self.shards[shard_of(client, TRAP_SHARD_BITS)])
            .get(&client)
            .is_some_and(|&until| now <= until)
    }

    fn any(&self) -> bool {
        self.trapped.load(std::sync::atomic::Ordering::Relaxed) > 0
    }

    fn expire(&self, now: Secs) {
        for shard in self.shards.iter() {
            let mut m = lock(shard);
            let before = m.len();
            m.retain(|_, until| now <= *until);
            let removed = before - m.len();
            if removed > 0 {
                self.trapped
                    .fetch_sub(removed, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

/// Decisions sharing their per-batch costs; see [`Engine::batch`].
pub struct Batch<'e, 's> {
    engine: &'e Engine,
    now: Secs,
    exemptions: &'s Exemptions,
    scratch: &'s mut Scratch,
}

/// How many queries [`Engine::check_batch`] (and the server) prepare before deciding them.
///
/// Preparing (exemptions, normalisation, hashing) reads no table, so a group can be prepared
/// first and decided after, in order, with the same answers as one by one. Deciding a run of
/// prepared keys back to back lets the CPU overlap their table lookups, which miss the cache
/// at 10 M records: measured ×1.7–1.9 decisions/s over preparing and deciding each in turn
/// (10 M live triplets, 2 threads; docs/BENCHMARKS.md). Prefetching the group's slots
/// between the phases ([`Batch::prefetch`]) overlaps them further.
pub const DECIDE_GROUP: usize = 32;

impl Batch<'_, '_> {
    /// Decides a query, as [`Engine::check`] would at the batch's time.
    pub fn check(&mut self, q: &Query<'_>, mode: Mode) -> Decision {
        match self.prepare(q) {
            Ok(k) => self.decide(&k, mode),
            Err(d) => d,
        }
    }

    /// The first half of [`Batch::check`]: exemptions, normalisation and hashing. Reads no
    /// table, so queries may be prepared ahead of the decisions of earlier ones (then pass
    /// the group's results to [`Batch::prefetch`] just before deciding them, as
    /// [`Engine::check_batch`] does).
    pub fn prepare(&mut self, q: &Query<'_>) -> Result<Keyed, Decision> {
        self.engine
            .prepare_with(q, self.exemptions, self.scratch, false)
    }

    /// Starts loading into the cache the table slot that deciding `k` will read. Called for a
    /// whole group of prepared keys right before deciding them, the group's cache misses
    /// overlap instead of following one another. A hint only: it changes no answer.
    #[inline]
    pub fn prefetch(&self, k: &Keyed) {
        self.engine.triplet_hints[shard_of(k.key, TRIPLET_SHARD_BITS)].prefetch(k.key);
    }

    /// The second half of [`Batch::check`]: the decision at the batch's time.
    pub fn decide(&self, k: &Keyed, mode: Mode) -> Decision {
        self.engine.decide(k, self.now, mode)
    }

    /// Decides the queries among `items`, in order, [`DECIDE_GROUP`] at a time: each group is
    /// prepared first, then decided (the answers are those of one by one; a PEEK sees the
    /// CHECKs before it, since only preparing runs ahead). `query` gives an item's query and
    /// mode from its index in `items` and the item, or `None` for an item that needs no
    /// decision (a PING, a refused line); `emit` is called once per item, in order, with its
    /// decision (`None` for those).
    ///
    /// This is the one grouping path: [`Engine::check_batch`] and the server's native
    /// transports both decide through it.
    pub fn decide_each<'q, T>(
        &mut self,
        items: &'q [T],
        query: impl Fn(usize, &'q T) -> Option<(Query<'q>, Mode)>,
        mut emit: impl FnMut(&'q T, Option<Decision>),
    ) {
        // On the stack: no allocation per batch.
        let mut keyed: [Option<(Result<Keyed, Decision>, Mode)>; DECIDE_GROUP] =
            [None; DECIDE_GROUP];
        // Each request's message is kept until it is decided (`Scratch::group`), for a key
        // under the client's network that is only hashed if needed (`Keyed::prefix_pending`).
        for (g, group) in items.chunks(DECIDE_GROUP).enumerate() {
            for (j, (slot, item)) in keyed.iter_mut().zip(group).enumerate() {
                *slot = query(g * DECIDE_GROUP + j, item).map(|(q, mode)| {
                    let k = self
                        .engine
                        .prepare_with(&q, self.exemptions, self.scratch, true);
                    if matches!(
                        k,
                        Ok(Keyed {
                            prefix_pending: true,
                            ..
                        })
                    ) {
                        std::mem::swap(&mut self.scratch.message, &mut self.scratch.group[j]);
                    }
                    (k, mode)
                });
            }
            // All of the group's slots at once, right before they are read: the misses
            // overlap, and nothing evicts the lines meanwhile. Measured on 10 M triplets,
            // 2 threads: +11-29 % decisions per CPU second over no prefetch; prefetching each
            // slot as soon as its key was known (a whole group ahead) was 10-20 % *slower*
            // than no prefetch (docs/BENCHMARKS.md, "Engine raw path").
            for (k, _) in keyed[..group.len()].iter().flatten() {
                if let Ok(k) = k {
                    self.prefetch(k);
                }
            }
            for (j, (item, k)) in group.iter().zip(&keyed).enumerate() {
                let d = k.map(|(k, mode)| match k {
                    Ok(k) => {
                        let message = &self.scratch.group[j];
                        self.engine.decide_with(&k, self.now, mode, message)
                    }
                    Err(d) => d,
                });
                emit(item, d);
            }
        }
    }
}

impl Engine {
    /// Builds an empty engine. The policy must be valid ([`Policy::validate`]).
    pub fn new(config: EngineConfig, clock: Arc<dyn Clock>) -> Self {
        let now = clock.now();
        Self {
            policy: config.policy,
            normalizer: config.normalizer,
            hasher: KeyHasher::new(&config.secret),
            key_id: config.secret.id(),
            exemptions: ArcSwap::from_pointee(Exemptions::default()),
            triplets: (0..1 << TRIPLET_SHARD_BITS)
                .map(|_| Mutex::new(Shard::new(now)))
                .collect(),
            triplet_hints: (0..1 << TRIPLET_SHARD_BITS)
                .map(|_| SlotHint::default())
                .collect(),
            clients: (0..1 << CLIENT_SHARD_BITS)
                .map(|_| Mutex::new(Shard::new(now)))
                .collect(),
            traps: Greytraps::default(),
            identities: Identities::default(),
            new_counts: NewCounts::default(),
            tombstones: admin::Tombstones::default(),
            clock,
        }
    }

    /// Sets the client identities (`client-identity`; default `name,prefix`).
    pub fn with_identities(mut self, identities: Identities) -> Self {
        self.identities = identities;
        self
    }

    /// Sets the limits on the triplet table (DESIGN §12): at most `max_triplets` records
    /// (`--max-triplets`), and at most `max_new_per_client` new records per client identity
    /// per minute (`--max-new-per-client`, 0 = off).
    ///
    /// The bound is kept per shard, `max_triplets / 256` each (at least 1), by evicting
    /// inside the shard under the lock the insert already holds: no global counter, no
    /// second lock. That is fair because records go to shards by a keyed hash the clients
    /// cannot steer, so shards fill evenly (at 1 M, 3 906 per shard, a standard deviation
    /// of ~62): the record evicted is the oldest greylisted one of its shard, which is
    /// among the oldest of the table, and the table holds at most `max_triplets` records.
    /// Measured (docs/BENCHMARKS.md, "Limits: flood"): a 60 s flood of new triplets at a
    /// bound of 1 M kept RSS at 90 MiB and ran at 441 k decisions/s, against 472 k/s with no
    /// bound (same noisy machine: within its run-to-run spread).
    pub fn with_limits(mut self, max_triplets: usize, max_new_per_client: u32) -> Self {
        // The remainder goes one each to the first shards, so the bounds add up to exactly
        // `max_triplets` (from 256 on; below, each shard still keeps one).
        let n = self.triplets.len();
        for (i, shard) in self.triplets.iter_mut().enumerate() {
            let cap = max_triplets / n + usize::from(i < max_triplets % n);
            shard.get_mut().unwrap_or_else(PoisonError::into_inner).cap = cap.max(1);
        }
        self.new_counts.limit = max_new_per_client;
        self
    }

    /// The client identities in force.
    pub fn identities(&self) -> Identities {
        self.identities
    }

    /// Sets how long a client that wrote to a greytrap address stays trapped
    /// (`greytrap-ttl`, default one day).
    pub fn with_greytrap_ttl(mut self, secs: u32) -> Self {
        self.traps.ttl = secs;
        self
    }

    /// The settings in force.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The client masking in force.
    pub fn normalizer(&self) -> &Normalizer {
        &self.normalizer
    }

    /// [`HashSecret::id`] of the secret keying the records (stored in snapshots).
    pub fn key_id(&self) -> u64 {
        self.key_id
    }

    /// The current time of the engine's clock.
    pub fn now(&self) -> Secs {
        self.clock.now()
    }

    /// Replaces the exemption lists; requests already being decided finish with the old ones.
    pub fn set_exemptions(&self, exemptions: Exemptions) {
        self.exemptions.store(Arc::new(exemptions));
    }

    /// The exemption lists in force.
    pub fn exemptions(&self) -> Arc<Exemptions> {
        self.exemptions.load_full()
    }

    /// Decides a query at the clock's current time.
    pub fn check(&self, query: &Query<'_>, mode: Mode) -> Decision {
        self.batch(|b| b.check(query, mode))
    }

    /// Applies authentication and exemptions, then normalises and hashes the triplet.
    /// `Err` carries the final decision for a request that needs no table.
    pub fn prepare(&self, q: &Query<'_>) -> Result<Keyed, Decision> {
        self.batch(|b| b.engine.prepare_with(q, b.exemptions, b.scratch, false))
    }

    /// `lazy`: the key under the client's network may be left to the decision
    /// ([`Keyed::prefix_pending`]); only for a caller that keeps `s.message` for it.
    fn prepare_with(
        &self,
        q: &Query<'_>,
        exemptions: &Exemptions,
        s: &mut Scratch,
        lazy: bool,
    ) -> Result<Keyed, Decision> {
        if q.auth.is_some_and(|a| !a.is_empty()) {
            return Err(Decision::Pass(Pass::Auth));
        }
        // Like `auth`, before the table: a trusted client is never greylisted.
        if !q.cert.is_empty() && exemptions.trusted().matches(&q.cert) {
            return Err(Decision::Pass(Pass::Tls));
        }
        let sender = if q.sender == "<>" { "" } else { q.sender };
        let client = self.normalizer.client(q.client);
        // The normalised sender and recipient are written straight into the message that is
        // hashed; the recipient, last, is also what the exemption lists look at.
        let m = &mut s.message;
        key::begin_triplet(&client, m);
        key::push_field(m, |m| self.normalizer.sender(sender, m));
        // DATA stage: the digest takes the recipient's place in the key. One branch here and
        // an out-of-range `rcpt_at` below: +5 instructions per decision (1761 -> 1766,
        // callgrind, examples/decide_group count 100000 512000); an `Option<usize>` was +10.
        let rcpt_at = match q.body {
            None => key::push_field(m, |m| self.normalizer.recipient(q.recipient, m)),
            Some(digest) => {
                key::push_body(m, digest);
                usize::MAX
            }
        };
        if !exemptions.is_empty() {
            // Lower-case only what a list will look at: the embedded client list is almost
            // always loaded, sender and name lists often are not.
            let counts = exemptions.counts();
            let sender_lc = if counts.senders > 0 {
                lower_into(sender, &mut s.lower_sender)
            } else {
                ""
            };
            let name_lc = q
                .client_name
                .filter(|_| counts.client_names > 0)
                .map(|n| lower_into(n, &mut s.lower_name));
            let rcpt_lc = match m.get(rcpt_at..) {
                Some(rcpt) => std::str::from_utf8(rcpt).unwrap_or(""),
                // DATA stage: the recipient is not in the key, but the lists still look at it.
                None => self.body_recipient(q.recipient, &mut s.rcpt),
            };
            if exemptions.has_greytraps() && exemptions.is_greytrap(rcpt_lc) {
                // A trap address is never delivered to. A client on the exempt lists (large
                // providers' pools) is not trapped: one of its users' typo must not defer the
                // whole pool for a day.
                let exempt_client = matches!(
                    exemptions.check(q.client, name_lc, "", ""),
                    Some(ExemptList::Client | ExemptList::ClientName)
                );
                if exempt_client {
                    return Err(self.deferred(self.policy.delay));
                }
                return Ok(Keyed {
                    greytrap: true,
                    ..Keyed::new(self.hasher.finish_triplet(m), client)
                });
            }
            if let Some(list) = exemptions.check(q.client, name_lc, sender_lc, rcpt_lc) {
                return Err(Decision::Pass(Pass::Exempt(list)));
            }
        }
        // One branch when no domain policy is loaded.
        let domain = if exemptions.has_domain_policy() {
            let rcpt = std::str::from_utf8(&m[rcpt_at..]).unwrap_or("");
            let rule = rcpt
                .rsplit_once('@')
                .and_then(|(_, d)| exemptions.domain_rule(d));
            if rule.is_some_and(|r| r.off) {
                return Err(Decision::Pass(Pass::DomainOff));
            }
            rule
        } else {
            None
        };
        if self.identities.prefix_only() {
            return Ok(Keyed {
                domain,
                ..Keyed::new(self.hasher.finish_triplet(m), client)
            });
        }
        Ok(Keyed {
            domain,
            ..self.key_identities(q, client, s, lazy)
        })
    }

    /// The keys of a prepared triplet (its message in `s.message`) under every identity in
    /// force that applies to `q`, in order. `lazy`: the key under the client's network is
    /// left pending when another identity comes first.
    fn key_identities(
        &self,
        q: &Query<'_>,
        client: ClientNet,
        s: &mut Scratch,
        lazy: bool,
    ) -> Keyed {
        let mut keys = [Key::VACANT; 3];
        let mut n = 0;
        let mut awl = None;
        let mut who = None;
        let mut prefix_pending = false;
        for &kind in self.identities.kinds() {
            let id = match kind {
                IdentityKind::Prefix => {
                    if lazy && n > 0 {
                        prefix_pending = true;
                    } else {
                        keys[n] = self.hasher.finish_triplet(&s.message);
                        n += 1;
                    }
                    continue;
                }
                IdentityKind::Spf => {
                    let Some(d) = identity::spf_name(q.spf) else {
                        continue;
                    };
                    let d = d.as_bytes();
                    let name = &mut s.ident_name;
                    s.ident_memo.get_or(self.key_id, kind.tag(), d, || {
                        name.clear();
                        name.extend_from_slice(d);
                        name.make_ascii_lowercase();
                        self.hasher.identity_client(kind.tag(), name)
                    })
                }
                IdentityKind::Name => {
                    let Some(name) = q.client_name else {
                        continue;
                    };
                    let name = lower_into(name, &mut s.ident_name);
                    let Some(domain) = identity::name_identity(name, q.client) else {
                        continue;
                    };
                    s.ident_memo
                        .get_or(self.key_id, kind.tag(), domain.as_bytes(), || {
                            self.hasher.identity_client(kind.tag(), domain.as_bytes())
                        })
                }
            };
            let key = key::with_identity(&mut s.message, kind.tag(), id, |m| {
                self.hasher.finish_triplet(m)
            });
            // The auto-whitelist follows an `spf` identity, never a `name` one.
            if kind == IdentityKind::Spf {
                awl = Some(id);
            }
            if n == 0 && self.new_counts.limit > 0 {
                who = Some(id);
            }
            keys[n] = key;
            n += 1;
        }
        let mut k = Keyed::new(keys[0], client);
        k.alts = (n - 1) as u8;
        k.alt.copy_from_slice(&keys[1..]);
        k.awl = awl;
        k.who = who;
        k.prefix_pending = prefix_pending;
        k
    }

    /// The normalised recipient of a DATA-stage query, for the exemption lists only.
    #[cold]
    fn body_recipient<'b>(&self, recipient: &str, buf: &'b mut Vec<u8>) -> &'b str {
        buf.clear();
        self.normalizer.recipient(recipient, buf);
        std::str::from_utf8(buf).unwrap_or("")
    }

    /// DEFER for `seconds_left`, or PASS `dry-run` in dry-run mode.
    fn deferred(&self, seconds_left: u32) -> Decision {
        Self::deferred_by(&self.policy, seconds_left)
    }

    /// DEFER for `seconds_left`, or PASS `dry-run` if `p` runs dry.
    fn deferred_by(p: &Policy, seconds_left: u32) -> Decision {
        if p.dry_run {
            Decision::Pass(Pass::DryRun { seconds_left })
        } else {
            Decision::Defer { seconds_left }
        }
    }

    /// Decides a keyed query at time `now`.
    pub fn decide(&self, k: &Keyed, now: Secs, mode: Mode) -> Decision {
        debug_assert!(!k.prefix_pending, "only decide_each makes pending keys");
        self.decide_with(k, now, mode, &[])
    }

    /// [`Engine::decide`], with the triplet's message (as prepared) for a pending key under
    /// the client's network.
    fn decide_with(&self, k: &Keyed, now: Secs, mode: Mode, message: &[u8]) -> Decision {
        // A domain's rule changes how records are judged and answered, never how they are
        // stored: `store` (the global settings) schedules expiry.
        let store = &self.policy;
        let own;
        let p = match &k.domain {
            None => store,
            Some(rule) => {
                own = rule.over(store);
                &own
            }
        };
        // Greytraps: one relaxed load for every request while no client is trapped.
        if k.greytrap || self.traps.any() {
            let ck = self.hasher.client(&k.client);
            if k.greytrap {
                if mode == Mode::Record {
                    self.traps
                        .hits
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    self.traps.trap(ck, now);
                }
                return Self::deferred_by(p, p.delay);
            }
            if self.traps.is_trapped(ck, now) {
                if mode == Mode::Record {
                    self.traps
                        .deferrals
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                return Self::deferred_by(p, p.delay);
            }
        }
        // Fast path: a known triplet costs one lookup and never touches the AWL table.
        let primary = self.look_up(k.key, now, p, mode);
        if primary == Some(Judgement::Known) {
            return Decision::Pass(Pass::Known);
        }
        let live =
            |j: Option<Judgement>| matches!(j, Some(Judgement::Early(_) | Judgement::Retried(_)));
        let primary_live = live(primary);
        // The client's other identities: a record under any of them counts (one more lookup
        // each for a triplet not known under the first).
        let mut live_alt = None;
        let pending = k
            .prefix_pending
            .then(|| self.hasher.finish_triplet(message));
        for &alt in k.alternates().iter().chain(pending.as_ref()) {
            let j = self.look_up(alt, now, p, mode);
            if j == Some(Judgement::Known) {
                return Decision::Pass(Pass::Known);
            }
            if live(j) && live_alt.is_none() {
                live_alt = Some(alt);
            }
        }
        let client_key =
            (p.awl_clients > 0).then(|| k.awl.unwrap_or_else(|| self.hasher.client(&k.client)));
        if let Some(ck) = client_key {
            if self.awl_hit(ck, now, mode) {
                return Decision::Pass(Pass::Awl);
            }
            // A client whitelisted by its network before its `spf` identity was turned on.
            if k.awl.is_some() && self.awl_hit(self.hasher.client(&k.client), now, mode) {
                return Decision::Pass(Pass::Awl);
            }
        }
        // `--max-new-per-client`: this request would make a new record (barring a race with
        // another request for the same triplet, which may then count twice).
        if mode == Mode::Record && !primary_live && live_alt.is_none() && self.new_counts.limit > 0
        {
            let who = k.who.unwrap_or_else(|| self.hasher.client(&k.client));
            if !self.new_counts.admit(who, now) {
                return Self::deferred_by(p, p.delay);
            }
        }
        // The greylisting rules run on the record of the first identity, unless only another
        // identity has a live one (made before the first was turned on, or by a peer that
        // keys by address): then on that one, so its first attempt is not forgotten.
        let target = match live_alt {
            Some(alt) if !primary_live => alt,
            _ => k.key,
        };
        let ts = shard_of(target, TRIPLET_SHARD_BITS);
        let judgement = {
            let mut sh = lock(&self.triplets[ts]);
            match mode {
                Mode::Peek => TripletRecord::judge(sh.table.get(target), now, p),
                Mode::Record => {
                    let j = Self::apply(&mut sh, target, now, p, store);
                    // The insert may have grown the table.
                    self.triplet_hints[ts].refresh(&sh.table);
                    j
                }
            }
        };
        let decision = match judgement {
            Judgement::Known => Decision::Pass(Pass::Known),
            Judgement::Retried(delayed) => {
                if let (Some(ck), Mode::Record) = (client_key, mode) {
                    self.awl_count(ck, now);
                }
                Decision::Pass(Pass::Retried { delayed })
            }
            Judgement::Early(left) => Decision::Defer { seconds_left: left },
            Judgement::New => Decision::Defer {
                seconds_left: p.delay,
            },
        };
        match decision {
            Decision::Defer { seconds_left } if p.dry_run => {
                Decision::Pass(Pass::DryRun { seconds_left })
            }
            d => d,
        }
    }

    /// Runs `f` with a [`Batch`]: decisions taken through it share one load of the exemption
    /// lists, one borrow of this thread's buffers and one clock read, and are otherwise
    /// exactly those of [`Engine::check`] one by one, in the order they are asked.
    ///
    /// (An earlier batch path also sorted requests by shard and read every slot of a group
    /// before examining any, to overlap cache misses; it measured slower than one by one at
    /// 1 M and 10 M triplets — see `docs/BENCHMARKS.md` — and was removed.)
    pub fn batch<R>(&self, f: impl FnOnce(&mut Batch<'_, '_>) -> R) -> R {
        let exemptions = self.exemptions.load();
        let now = self.clock.now();
        SCRATCH.with(|s| match s.try_borrow_mut() {
            Ok(mut scratch) => f(&mut Batch {
                engine: self,
                now,
                exemptions: &exemptions,
                scratch: &mut scratch,
            }),
            // Only if `f` itself starts a batch or calls `check`: correct, just not free.
            Err(_) => f(&mut Batch {
                engine: self,
                now,
                exemptions: &exemptions,
                scratch: &mut Scratch::default(),
            }),
        })
    }

    /// Decides many queries at the clock's current time; `out` receives one decision per
    /// query, in order (see [`Engine::batch`] and [`Batch::decide_each`]).
    pub fn check_batch(&self, queries: &[Query<'_>], mode: Mode, out: &mut Vec<Decision>) {
        out.clear();
        self.batch(|b| {
            b.decide_each(queries, |_, q| Some((*q, mode)), |_, d| out.extend(d));
        });
    }

    /// Decides many keyed queries at `now`; `out` receives one decision per item, in order.
    pub fn decide_batch(&self, items: &[Keyed], now: Secs, mode: Mode, out: &mut Vec<Decision>) {
        out.clear();
        out.extend(items.iter().map(|k| self.decide(k, now, mode)));
    }

    /// Judges a triplet by the greylisting rules and records the effect under its shard's lock.
    /// Judges by `p` (the request's settings); stores and schedules by `store` (the global ones).
    fn apply(
        sh: &mut Shard<TripletRecord>,
        key: Key,
        now: Secs,
        p: &Policy,
        store: &Policy,
    ) -> Judgement {
        sh.room_for(key, now, store);
        match sh.table.entry(key) {
            Slot::Vacant(i) => {
                sh.insert_new(i, TripletRecord::new(key, now), store);
                sh.outbox.push(key);
                Judgement::New
            }
            Slot::Occupied(i) => {
                let r = sh.table.at_mut(i);
                let j = TripletRecord::judge(Some(r), now, p);
                // What peers are told (docs/OPERATIONS.md, "Running a cluster"): new records and
                // passes always, a whitelisted record's refresh at most once an hour, an early
                // retry never (it changes nothing a peer decides by).
                let publish = match j {
                    Judgement::Early(_) => {
                        r.touch(now);
                        false
                    }
                    Judgement::Known => {
                        let before = r.last_seen();
                        r.touch(now);
                        replica::refresh_due(before, now)
                    }
                    Judgement::Retried(_) => {
                        r.whitelist(now);
                        sh.marked += 1;
                        true
                    }
                    Judgement::New => {
                        // Starting over in place: the wheel entry stays where it is, and when
                        // it fires the record is rescheduled at its new expiry.
                        let was = r.is_whitelisted();
                        *r = TripletRecord::new(key, now);
                        sh.marked -= usize::from(was);
                        true
                    }
                };
                if publish {
                    sh.outbox.push(key);
                }
                j
            }
        }
    }

    /// Looks the triplet `key` up and judges it; a known record is touched (its refresh
    /// published at most hourly) when recording. `None` when there is no record.
    fn look_up(&self, key: Key, now: Secs, p: &Policy, mode: Mode) -> Option<Judgement> {
        let mut sh = lock(&self.triplets[shard_of(key, TRIPLET_SHARD_BITS)]);
        let r = sh.table.get_mut(key)?;
        let j = TripletRecord::judge(Some(r), now, p);
        if j == Judgement::Known && mode == Mode::Record {
            let before = r.last_seen();
            r.touch(now);
            if replica::refresh_due(before, now) {
                sh.outbox.push(key);
            }
        }
        Some(j)
    }

    fn awl_hit(&self, ck: Key, now: Secs, mode: Mode) -> bool {
        let p = &self.policy;
        let mut sh = lock(&self.clients[shard_of(ck, CLIENT_SHARD_BITS)]);
        match sh.table.get_mut(ck) {
            Some(r) if r.is_active(now, p) => {
                if mode == Mode::Record {
                    let before = r.last_seen;
                    r.last_seen = r.last_seen.max(now);
                    if replica::refresh_due(before, now) {
                        sh.outbox.push(ck);
                    }
                }
                true
            }
            _ => false,
        }
    }

    fn awl_count(&self, ck: Key, now: Secs) {
        let p = &self.policy;
        let mut sh = lock(&self.clients[shard_of(ck, CLIENT_SHARD_BITS)]);
        match sh.table.entry(ck) {
            Slot::Vacant(i) => sh.insert_new(i, AwlRecord::new(ck, now), p),
            Slot::Occupied(i) => {
                let r = sh.table.at_mut(i);
                let was = r.marked(p);
                r.count_pass(now, p);
                let is = r.marked(p);
                sh.marked = sh.marked + usize::from(is) - usize::from(was);
            }
        }
        sh.outbox.push(ck);
    }

    /// Removes every record that has expired by `now`, a few hundred records per lock hold,
    /// so a concurrent request never waits behind more than one small step.
    ///
    /// Shards take one step each in turn rather than one shard to the end: a mutex released
    /// and at once re-taken by the same thread is usually re-taken before a waiting thread
    /// wakes, so finishing one shard at a time starved callers on that shard (measured while
    /// 10 M records expired: a concurrent caller got 0.16 M decisions through one shard at a
    /// time, 2.6 M in turn; see `docs/BENCHMARKS.md`).
    pub fn expire(&self, now: Secs) -> ExpireStats {
        let mut stats = ExpireStats::default();
        let p = &self.policy;
        fn in_turn<R: Expiring>(
            shards: &[Mutex<Shard<R>>],
            now: Secs,
            p: &Policy,
            stats: &mut ExpireStats,
        ) {
            let mut busy: Vec<usize> = (0..shards.len()).collect();
            while !busy.is_empty() {
                busy.retain(|&i| {
                    let start = std::time::Instant::now();
                    let done = lock(&shards[i]).expire_step(now, p, EXPIRE_STEP, stats);
                    stats.longest_step = stats.longest_step.max(start.elapsed());
                    !done
                });
            }
        }
        in_turn(&self.triplets, now, p, &mut stats);
        in_turn(&self.clients, now, p, &mut stats);
        self.traps.expire(now);
        self.tombstones.expire(now, self.tombstone_keep());
        stats
    }

    /// Counts of records by kind (takes each shard lock briefly).
    pub fn stats(&self) -> EngineStats {
        let mut s = EngineStats::default();
        for shard in self.triplets.iter() {
            let sh = lock(shard);
            s.triplets += sh.table.len();
            s.whitelisted += sh.marked;
            s.evicted_greylisted += sh.evicted[0];
            s.evicted_whitelisted += sh.evicted[1];
            s.table_bytes += sh.table.heap_bytes() + sh.schedule_bytes();
        }
        for shard in self.clients.iter() {
            let sh = lock(shard);
            s.awl_clients += sh.table.len();
            s.awl_active += sh.marked;
            s.table_bytes += sh.table.heap_bytes() + sh.schedule_bytes();
        }
        let relaxed = std::sync::atomic::Ordering::Relaxed;
        s.trapped_clients = self.traps.trapped.load(relaxed);
        s.greytrap_hits = self.traps.hits.load(relaxed);
        s.greytrap_deferrals = self.traps.deferrals.load(relaxed);
        s.new_refused = self.new_counts.refused.load(relaxed);
        s
    }

    /// Calls `f` with each shard's triplet records in turn, holding only that shard's lock.
    pub fn for_each_triplet_shard(
        &self,
        mut f: impl FnMut(&mut dyn Iterator<Item = &TripletRecord>),
    ) {
        for shard in self.triplets.iter() {
            let sh = lock(shard);
            f(&mut sh.table.iter());
        }
    }

    /// Calls `f` with each shard's auto-whitelist records in turn.
    pub fn for_each_client_shard(&self, mut f: impl FnMut(&mut dyn Iterator<Item = &AwlRecord>)) {
        for shard in self.clients.iter() {
            let sh = lock(shard);
            f(&mut sh.table.iter());
        }
    }

    /// Number of triplet shards and of auto-whitelist shards.
    pub fn shard_counts(&self) -> (usize, usize) {
        (self.triplets.len(), self.clients.len())
    }

    /// Replaces `out` with the triplet records of shard `shard` still alive at `now`, holding
    /// that shard's lock only for the copy (0.4 ms at 10 M records on a quiet machine, up to
    /// ~2 ms when the writer is preempted meanwhile), so a snapshot writer can encode and
    /// write outside the lock.
    pub fn copy_triplets(&self, shard: usize, now: Secs, out: &mut Vec<TripletRecord>) {
        copy_alive(&self.triplets[shard], now, &self.policy, out);
    }

    /// Replaces `out` with the auto-whitelist records of shard `shard` still alive at `now`.
    pub fn copy_clients(&self, shard: usize, now: Secs, out: &mut Vec<AwlRecord>) {
        copy_alive(&self.clients[shard], now, &self.policy, out);
    }

    /// Grows the tables ahead of loading about this many records, spread evenly over the
    /// shards, so loading does not rehash every shard several times.
    pub fn reserve(&self, triplets: usize, clients: usize) {
        let per = triplets.div_ceil(self.triplets.len());
        for (shard, hint) in self.triplets.iter().zip(self.triplet_hints.iter()) {
            let mut sh = lock(shard);
            sh.table.reserve(per);
            hint.refresh(&sh.table);
        }
        let per = clients.div_ceil(self.clients.len());
        for shard in self.clients.iter() {
            lock(shard).table.reserve(per);
        }
    }

    /// Adds (or replaces) triplet records, e.g. from a snapshot, and schedules their expiry.
    /// Records expired at `now` (under the settings in force) are dropped. Returns how many
    /// were kept. Consecutive records of one shard share one lock hold, which makes loading
    /// a snapshot (written shard by shard) several times faster than one lock per record.
    pub fn load_triplets(
        &self,
        records: impl IntoIterator<Item = TripletRecord>,
        now: Secs,
    ) -> usize {
        load_into(
            &self.triplets,
            &self.triplet_hints,
            TRIPLET_SHARD_BITS,
            records,
            now,
            &self.policy,
        )
    }

    /// Adds (or replaces) auto-whitelist records; expired ones are dropped. Returns how many
    /// were kept.
    pub fn load_clients(&self, records: impl IntoIterator<Item = AwlRecord>, now: Secs) -> usize {
        load_into(
            &self.clients,
            &[],
            CLIENT_SHARD_BITS,
            records,
            now,
            &self.policy,
        )
    }
}

fn copy_alive<R: Expiring>(shard: &Mutex<Shard<R>>, now: Secs, p: &Policy, out: &mut Vec<R>) {
    out.clear();
    let sh = lock(shard);
    out.reserve(sh.table.len());
    out.extend(
        sh.table
            .iter()
            .filter(|r| r.alive_until_at(p) >= u64::from(now)),
    );
}

/// Holds a shard's lock for as long as consecutive records belong to it. `hints`, if not
/// empty, are refreshed as shards grow.
fn load_into<R: Expiring>(
    shards: &[Mutex<Shard<R>>],
    hints: &[SlotHint<R>],
    bits: u32,
    records: impl IntoIterator<Item = R>,
    now: Secs,
    p: &Policy,
) -> usize {
    let mut kept = 0;
    let alive = records
        .into_iter()
        .filter(|r| !r.key().is_vacant() && r.alive_until_at(p) >= u64::from(now));
    by_shard(shards, hints, bits, alive, |sh, r| {
        sh.put(r, now, p);
        kept += 1;
    });
    kept
}

/// Calls `f` with each record and its shard, holding a shard's lock for as long as
/// consecutive records belong to it (records written shard by shard, as in a snapshot or a
/// peer's coalesced batch, share one lock hold each). `hints`, if not empty, are refreshed as
/// shards grow.
fn by_shard<R: Record>(
    shards: &[Mutex<Shard<R>>],
    hints: &[SlotHint<R>],
    bits: u32,
    records: impl IntoIterator<Item = R>,
    mut f: impl FnMut(&mut Shard<R>, R),
) {
    let mut held: Option<(usize, MutexGuard<'_, Shard<R>>)> = None;
    for r in records {
        let s = shard_of(r.key(), bits);
        let guard = match &mut held {
            Some((i, g)) if *i == s => g,
            _ => {
                held = None; // release before taking the next: never two shard locks at once
                &mut held.insert((s, lock(&shards[s]))).1
            }
        };
        f(guard, r);
        if let Some(h) = hints.get(s) {
            h.refresh(&guard.table);
        }
    }
}

#[cfg(test)]
mod tests;
