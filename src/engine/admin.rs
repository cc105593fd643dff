//! What `greyhound admin` asks of the engine (DESIGN §13): explain a triplet without changing
//! anything, whitelist it, delete it or a client's auto-whitelist entry, and import records of
//! another greylisting program. Every change goes through the shard outboxes like a decision's,
//! so a cluster replicates it; a delete leaves a [`Tombstone`] that replicates too and wins over
//! any older copy of the record a peer still holds or sends later (see `replica.rs`).
//!
//! Kept apart from `mod.rs` so the request path and the administration path change
//! independently; as a child module it reaches the engine's private parts directly.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use super::clock::{from_unix, Secs, MAX_SECS};
use super::identity::{self, IdentityKind};
use super::key::Key;
use super::record::Judgement;
use super::replica::MergeStats;
use super::table::Slot;
use super::{
    lock, shard_of, AwlRecord, Decision, Engine, Exemptions, Expiring, Mode, Query, Scratch,
    TripletRecord, CLIENT_SHARD_BITS, TRIPLET_SHARD_BITS,
};
use crate::engine::ExemptList;

/// Which table a [`Tombstone`] deletes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TombstoneKind {
    /// A triplet record.
    Triplet,
    /// A client's auto-whitelist record.
    Client,
}

impl TombstoneKind {
    /// The value written in a batch (`docs/CLUSTER_FORMAT.md`).
    pub fn code(self) -> u32 {
        match self {
            Self::Triplet => 1,
            Self::Client => 2,
        }
    }

    /// The kind of a batch's code.
    pub fn from_code(code: u32) -> Option<Self> {
        match code {
            1 => Some(Self::Triplet),
            2 => Some(Self::Client),
            _ => None,
        }
    }
}

/// A record deleted by an administrator at `deleted_at`: every copy of that record whose life
/// had begun before then (a triplet first seen before it, a client whose last counted pass is
/// before it) is dead, wherever and whenever it turns up. A life that begins in that second or
/// later is news and is kept: a new first attempt right after the delete must reach every peer
/// (with `<=`, one made in the delete's own second was refused by every peer, and they never
/// learnt the triplet until it expired — seen in `tests/admin.rs`). The node that deletes
/// removes its own record whatever its age.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tombstone {
    /// The deleted record's key.
    pub key: Key,
    /// When it was deleted.
    pub deleted_at: Secs,
    /// From which table.
    pub kind: TombstoneKind,
}

/// Whether a copy of a record is older than a delete at `deleted_at` (its life had begun by
/// then). Part of the merge: see `replica.rs`.
pub(super) trait Deletable {
    /// The table the record lives in.
    const KIND: TombstoneKind;
    fn deleted_by(&self, deleted_at: Secs) -> bool;
}

impl Deletable for TripletRecord {
    const KIND: TombstoneKind = TombstoneKind::Triplet;
    fn deleted_by(&self, deleted_at: Secs) -> bool {
        self.first_seen() < deleted_at
    }
}

impl Deletable for AwlRecord {
    const KIND: TombstoneKind = TombstoneKind::Client;
    fn deleted_by(&self, deleted_at: Secs) -> bool {
        self.last_counted < deleted_at
    }
}

/// The tombstones a node knows, and those made here that replication has not collected yet.
///
/// A map under one lock: deletes are an administrator's, a handful a day, and `count` lets
/// every merge skip the lock while there are none.
#[derive(Debug, Default)]
pub(super) struct Tombstones {
    map: Mutex<ahash::AHashMap<(TombstoneKind, Key), Secs>>,
    count: AtomicUsize,
    /// Made here, for [`Engine::take_changes`] (only while replication is on).
    outbox: Mutex<Vec<Tombstone>>,
}

/// How long a tombstone is kept beyond what the records it could cover may live: a peer's
/// copy touched just before it heard of the delete, and a stream replayed from its retention
/// (at most 30 days, `MAX_CLUSTER_RETENTION_SECS`), are both covered.
const TOMBSTONE_MARGIN: u64 = 30 * 86_400;

impl Tombstones {
    /// The delete time of `key`'s tombstone, if any.
    pub(super) fn get(&self, kind: TombstoneKind, key: Key) -> Option<Secs> {
        if self.count.load(Ordering::Relaxed) == 0 {
            return None;
        }
        lock(&self.map).get(&(kind, key)).copied()
    }

    /// Adds a tombstone (the later delete wins). Returns whether it is news.
    pub(super) fn add(&self, t: Tombstone) -> bool {
        let mut m = lock(&self.map);
        let d = m.entry((t.kind, t.key)).or_insert(0);
        let news = t.deleted_at > *d;
        *d = (*d).max(t.deleted_at);
        self.count.store(m.len(), Ordering::Relaxed);
        news
    }

    /// Forgets tombstones older than `keep` seconds at `now`.
    pub(super) fn expire(&self, now: Secs, keep: u64) {
        if self.count.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut m = lock(&self.map);
        m.retain(|_, d| u64::from(*d) + keep >= u64::from(now));
        self.count.store(m.len(), Ordering::Relaxed);
    }

    pub(super) fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    pub(super) fn take_outbox(&self, out: &mut Vec<Tombstone>) {
        out.append(&mut lock(&self.outbox));
    }

    pub(super) fn since(&self, since: Secs, out: &mut Vec<Tombstone>) {
        let m = lock(&self.map);
        out.extend(
            m.iter()
                .filter(|(_, d)| **d >= since)
                .map(|(&(kind, key), &deleted_at)| Tombstone {
                    key,
                    deleted_at,
                    kind,
                }),
        );
    }
}

/// A record as [`Engine::explain`] found it under one of the client's identities.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityRecord {
    /// Which identity.
    pub kind: IdentityKind,
    /// The identity as written in logs: `spf:example.org`, `name:example.net`, `192.0.2.0/24`.
    pub identity: String,
    /// The triplet's key under it.
    pub key: Key,
    /// The record, if the table holds one (live or not yet expired away).
    pub record: Option<TripletRecord>,
}

/// What [`Engine::explain`] reports: everything a decision would look at, nothing changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// The client's network as the table keys it (`192.0.2.0/24`).
    pub client_net: String,
    /// The normalised sender (empty: the null sender).
    pub sender: String,
    /// The normalised recipient.
    pub recipient: String,
    /// The identities that apply, in order: a new record is written under the first.
    pub identities: Vec<IdentityRecord>,
    /// The exemption list that lets the request through, if any.
    pub exemption: Option<ExemptList>,
    /// The `domain-policy` entry of the recipient's domain, as written in the file.
    pub domain_rule: Option<String>,
    /// The settings this triplet is judged by (the domain's rule over the global ones).
    pub policy: super::Policy,
    /// The recipient is a greytrap.
    pub greytrap: bool,
    /// The client is trapped now (it wrote to a greytrap).
    pub trapped: bool,
    /// The auto-whitelist identity (`spf:…` or the network) and its record.
    pub awl_identity: String,
    /// The auto-whitelist record, if any.
    pub awl: Option<AwlRecord>,
    /// The answer a request would get now (a PEEK).
    pub decision: Decision,
    /// The engine's time of the explanation.
    pub now: Secs,
}

/// What [`Engine::import`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImportStats {
    /// Triplet records merged into the table (new or combined with a live one).
    pub triplets: usize,
    /// Client auto-whitelist records merged.
    pub clients: usize,
    /// Records already dead by this server's settings (not imported).
    pub expired: usize,
    /// Records older than a delete made here (not imported).
    pub deleted: usize,
}

/// One record to import, in the peer's own terms (see [`crate::import::Item`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportRecord<'a> {
    /// A triplet with Unix times.
    Triplet {
        /// The client address or network.
        client: IpAddr,
        /// Envelope sender, bare.
        sender: &'a str,
        /// Envelope recipient, bare.
        recipient: &'a str,
        /// Unix seconds of the first attempt.
        first_seen: u64,
        /// Unix seconds of the last attempt.
        last_seen: u64,
        /// Whether the peer had let it pass.
        passed: bool,
    },
    /// A client's pass count with the Unix second of its last counted pass.
    Client {
        /// The client address or network.
        client: IpAddr,
        /// Passes counted.
        count: u32,
        /// Unix seconds of the last counted pass.
        last_seen: u64,
    },
}

fn net_string(net: super::ClientNet, n: &super::Normalizer) -> String {
    match net {
        super::ClientNet::V4(a) => format!("{a}/{}", n.ipv4_prefix()),
        super::ClientNet::V6(a) => format!("{a}/{}", n.ipv6_prefix()),
    }
}

/// A domain rule as `domain-policy` writes it.
fn describe_rule(r: &super::domains::DomainRule) -> String {
    let mut parts = Vec::new();
    if r.off {
        parts.push("off".to_string());
    }
    if r.dry_run {
        parts.push("dry-run".to_string());
    }
    let d = super::policy::format_duration;
    if let Some(s) = r.delay {
        parts.push(format!("delay={}", d(s)));
    }
    if let Some(s) = r.retry_window {
        parts.push(format!("retry-window={}", d(s)));
    }
    if let Some(s) = r.whitelist_ttl {
        parts.push(format!("whitelist-ttl={}", d(s)));
    }
    parts.join(" ")
}

impl Engine {
    /// The keys of `q`'s triplet under every identity that applies, in order, with each
    /// identity's kind and name; exemptions are not consulted (an administrator acts on the
    /// record even of a triplet a list lets through).
    fn identity_keys(&self, q: &Query<'_>) -> Vec<(IdentityKind, String, Key)> {
        let mut scratch = Scratch::default();
        let keyed = match self.prepare_with(q, &Exemptions::default(), &mut scratch, false) {
            Ok(k) => k,
            // Without lists, auth or certificates nothing is decided while preparing.
            Err(_) => unreachable!("a query without auth or lists is always keyed"),
        };
        let net = net_string(self.normalizer.client(q.client), &self.normalizer);
        let mut names = Vec::new();
        for &kind in self.identities.kinds() {
            match kind {
                IdentityKind::Prefix => names.push((kind, net.clone())),
                IdentityKind::Spf => {
                    if let Some(d) = identity::spf_name(q.spf) {
                        names.push((kind, format!("spf:{}", d.to_ascii_lowercase())));
                    }
                }
                IdentityKind::Name => {
                    if let Some(name) = q.client_name {
                        let name = name.to_ascii_lowercase();
                        if let Some(d) = identity::name_identity(&name, q.client) {
                            names.push((kind, format!("name:{d}")));
                        }
                    }
                }
            }
        }
        let keys = std::iter::once(keyed.key).chain(keyed.alternates().iter().copied());
        names
            .into_iter()
            .zip(keys)
            .map(|((kind, name), key)| (kind, name, key))
            .collect()
    }

    /// The auto-whitelist key of `q`'s client and its name: the `spf` identity when the query
    /// has one and `spf` is in force, otherwise the network.
    fn awl_key(&self, q: &Query<'_>) -> (String, Key) {
        let net = self.normalizer.client(q.client);
        if self.identities.uses(IdentityKind::Spf) {
            if let Some(d) = identity::spf_name(q.spf) {
                let d = d.to_ascii_lowercase();
                let key = self
                    .hasher
                    .identity_client(IdentityKind::Spf.tag(), d.as_bytes());
                return (format!("spf:{d}"), key);
            }
        }
        (net_string(net, &self.normalizer), self.hasher.client(&net))
    }

    /// Explains what the engine holds and would answer for `q`, changing nothing.
    pub fn explain(&self, q: &Query<'_>) -> Explanation {
        let now = self.now();
        let ex = self.exemptions();
        let net = self.normalizer.client(q.client);
        let sender = if q.sender == "<>" { "" } else { q.sender };
        let mut buf = Vec::new();
        self.normalizer.sender(sender, &mut buf);
        let sender_n = String::from_utf8_lossy(&buf).into_owned();
        buf.clear();
        self.normalizer.recipient(q.recipient, &mut buf);
        let rcpt_n = String::from_utf8_lossy(&buf).into_owned();
        let name_lc = q.client_name.map(str::to_ascii_lowercase);
        let exemption = ex.check(
            q.client,
            name_lc.as_deref(),
            &sender.to_ascii_lowercase(),
            &rcpt_n,
        );
        let rule = rcpt_n.rsplit_once('@').and_then(|(_, d)| ex.domain_rule(d));
        let domain_rule = rule.map(|r| describe_rule(&r));
        // A request is judged by its domain's rule laid over the global settings.
        let policy = rule.map_or(self.policy, |r| r.over(&self.policy));
        let identities = self
            .identity_keys(q)
            .into_iter()
            .map(|(kind, identity, key)| IdentityRecord {
                kind,
                identity,
                key,
                record: lock(&self.triplets[shard_of(key, TRIPLET_SHARD_BITS)])
                    .table
                    .get(key)
                    .copied(),
            })
            .collect();
        let (awl_identity, ak) = self.awl_key(q);
        let awl = lock(&self.clients[shard_of(ak, CLIENT_SHARD_BITS)])
            .table
            .get(ak)
            .copied();
        let trapped = self.traps.any() && self.traps.is_trapped(self.hasher.client(&net), now);
        Explanation {
            client_net: net_string(net, &self.normalizer),
            sender: sender_n,
            recipient: rcpt_n.clone(),
            identities,
            exemption,
            domain_rule,
            policy,
            greytrap: ex.has_greytraps() && ex.is_greytrap(&rcpt_n),
            trapped,
            awl_identity,
            awl,
            decision: self.check(q, Mode::Peek),
            now,
        }
    }

    /// Whitelists `q`'s triplet under its first identity (where a request would write it) as
    /// a pass at now would, for `ttl` seconds instead of `whitelist-ttl` when given (a later
    /// pass pushes it to `whitelist-ttl` again, never shortens it). A live record keeps its
    /// first seen. Returns the record as stored; replicated like a pass.
    pub fn whitelist(&self, q: &Query<'_>, ttl: Option<u32>) -> TripletRecord {
        let now = self.now();
        let key = self.identity_keys(q)[0].2;
        let p = &self.policy;
        // Whitelisted until `last_seen + whitelist_ttl`: a TTL is a `last_seen` moved by the
        // difference (the record keeps 24 bytes; see `record.rs`).
        let last = match ttl {
            None => now,
            Some(t) => (i64::from(now) + i64::from(t) - i64::from(p.whitelist_ttl))
                .clamp(0, i64::from(MAX_SECS)) as Secs,
        };
        let s = shard_of(key, TRIPLET_SHARD_BITS);
        let mut sh = lock(&self.triplets[s]);
        let r = match sh.table.entry(key) {
            Slot::Occupied(i) => {
                let old = *sh.table.at_mut(i);
                // A live record keeps its first seen and never loses time it already had; a
                // dead one starts a new life.
                let new = if TripletRecord::judge(Some(&old), now, p) == Judgement::New {
                    TripletRecord::from_parts(key, last.min(now), last, true)
                } else {
                    let first = old.first_seen().min(last);
                    TripletRecord::from_parts(key, first, old.last_seen().max(last), true)
                };
                *sh.table.at_mut(i) = new;
                sh.marked = sh.marked - usize::from(old.is_whitelisted()) + 1;
                if new.alive_until(p) > old.alive_until(p) {
                    sh.wheel.insert(key, super::wheel_time(new.alive_until(p)));
                }
                new
            }
            Slot::Vacant(i) => {
                let new = TripletRecord::from_parts(key, last.min(now), last, true);
                sh.insert_new(i, new, p);
                new
            }
        };
        sh.outbox.push(key);
        self.triplet_hints[s].refresh(&sh.table);
        r
    }

    /// Deletes `q`'s triplet under every identity that applies, leaving a tombstone for each
    /// (replicated in a cluster). Returns whether a live record was deleted.
    pub fn delete(&self, q: &Query<'_>) -> bool {
        let keys: Vec<Key> = self.identity_keys(q).into_iter().map(|k| k.2).collect();
        let mut found = false;
        for key in keys {
            found |= self.delete_key(TombstoneKind::Triplet, key);
        }
        found
    }

    /// Deletes the auto-whitelist entry of `client`'s network, leaving a tombstone. Returns
    /// whether a live entry was deleted.
    pub fn delete_client(&self, client: IpAddr) -> bool {
        let key = self.hasher.client(&self.normalizer.client(client));
        self.delete_key(TombstoneKind::Client, key)
    }

    fn delete_key(&self, kind: TombstoneKind, key: Key) -> bool {
        let now = self.now();
        let t = Tombstone {
            key,
            deleted_at: now,
            kind,
        };
        self.tombstones.add(t);
        if self.replicates() {
            lock(&self.tombstones.outbox).push(t);
        }
        self.remove_deleted(t, true)
    }

    /// Removes the record a tombstone covers (any record of its key if `whatever`), if the
    /// table holds it. Returns whether it was alive.
    fn remove_deleted(&self, t: Tombstone, whatever: bool) -> bool {
        fn remove<R: Expiring + Deletable>(
            shard: &Mutex<super::Shard<R>>,
            t: Tombstone,
            whatever: bool,
            now: Secs,
            p: &super::Policy,
        ) -> bool {
            let mut sh = lock(shard);
            match sh.table.get(t.key).copied() {
                Some(r) if whatever || r.deleted_by(t.deleted_at) => {
                    sh.table.remove(t.key);
                    sh.marked -= usize::from(r.marked(p));
                    r.alive_until_at(p) >= u64::from(now)
                }
                _ => false,
            }
        }
        let (now, p) = (self.now(), &self.policy);
        match t.kind {
            TombstoneKind::Triplet => remove(
                &self.triplets[shard_of(t.key, TRIPLET_SHARD_BITS)],
                t,
                whatever,
                now,
                p,
            ),
            TombstoneKind::Client => remove(
                &self.clients[shard_of(t.key, CLIENT_SHARD_BITS)],
                t,
                whatever,
                now,
                p,
            ),
        }
    }

    /// Applies a peer's tombstones: each is remembered (so an older copy arriving later is
    /// refused) and removes the local record it covers. Tombstones older than the keeping
    /// time are ignored. Never published again. Returns how many were news.
    pub fn merge_tombstones(&self, tombstones: impl IntoIterator<Item = Tombstone>) -> usize {
        let now = self.now();
        let keep = self.tombstone_keep();
        let mut news = 0;
        for t in tombstones {
            if t.key.is_vacant() || u64::from(t.deleted_at) + keep < u64::from(now) {
                continue;
            }
            if self.tombstones.add(t) {
                news += 1;
            }
            self.remove_deleted(t, false);
        }
        news
    }

    /// Tombstones known now (made here or merged from peers, not yet expired).
    pub fn tombstone_count(&self) -> usize {
        self.tombstones.len()
    }

    /// Seconds a tombstone is kept: longer than any record it could cover may live, plus
    /// the longest stream retention.
    pub(super) fn tombstone_keep(&self) -> u64 {
        let p = &self.policy;
        u64::from(p.whitelist_ttl.max(p.retry_window).max(p.awl_ttl)) + TOMBSTONE_MARGIN
    }

    /// Imports another program's records (DESIGN §13): each is normalised and keyed as a
    /// request of its client would be (under the client's network: peers keep no host names),
    /// then merged like a peer's record — first seen the earlier, last seen the later,
    /// whitelisted if either is, counts the larger — so importing twice changes nothing. Unlike
    /// a peer's records, imported ones are changes of this node: a cluster replicates them.
    pub fn import(&self, records: &[ImportRecord<'_>]) -> ImportStats {
        let now = self.now();
        let mut triplets = Vec::new();
        let mut clients = Vec::new();
        for r in records {
            match *r {
                ImportRecord::Triplet {
                    client,
                    sender,
                    recipient,
                    first_seen,
                    last_seen,
                    passed,
                } => {
                    let key = self.identity_keys(&Query::new(client, sender, recipient))[0].2;
                    let (first, last) = (from_unix(first_seen), from_unix(last_seen));
                    triplets.push(TripletRecord::from_parts(
                        key,
                        first.min(last),
                        last.max(first),
                        passed,
                    ));
                }
                ImportRecord::Client {
                    client,
                    count,
                    last_seen,
                } => {
                    let key = self.hasher.client(&self.normalizer.client(client));
                    let last = from_unix(last_seen);
                    clients.push(AwlRecord::from_parts(key, last, last, count));
                }
            }
        }
        let t = self.merge_local_triplets(triplets, now);
        let c = self.merge_local_clients(clients, now);
        ImportStats {
            triplets: t.received - t.dead - t.deleted,
            clients: c.received - c.dead - c.deleted,
            expired: t.dead + c.dead,
            deleted: t.deleted + c.deleted,
        }
    }

    fn merge_local_triplets(&self, records: Vec<TripletRecord>, now: Secs) -> MergeStats {
        super::replica::merge_into(
            &self.triplets,
            &self.triplet_hints,
            TRIPLET_SHARD_BITS,
            records,
            now,
            &self.policy,
            &self.tombstones,
            true,
        )
    }

    fn merge_local_clients(&self, records: Vec<AwlRecord>, now: Secs) -> MergeStats {
        super::replica::merge_into(
            &self.clients,
            &[],
            CLIENT_SHARD_BITS,
            records,
            now,
            &self.policy,
            &self.tombstones,
            true,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{
        Changes, EngineConfig, HashSecret, Identities, ManualClock, Normalizer, Pass, Policy,
    };
    use std::net::Ipv4Addr;
    use std::sync::Arc;

    const T0: Secs = 100_000_000;

    fn engine(clock: &Arc<ManualClock>) -> Engine {
        Engine::new(
            EngineConfig {
                policy: Policy {
                    delay: 60,
                    retry_window: 3600,
                    whitelist_ttl: 86_400,
                    awl_clients: 2,
                    awl_interval: 0,
                    ..Policy::default()
                },
                normalizer: Normalizer::default(),
                secret: HashSecret(*b"admin-test-key-1"),
            },
            clock.clone(),
        )
        .with_outbox(64)
    }

    fn ip(c: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, c))
    }

    fn q(c: u8) -> Query<'static> {
        Query::new(ip(c), "Alice+tag@Example.org", "Bob@Example.NET")
    }

    #[test]
    fn explain_changes_nothing_and_reports_the_record() {
        let clock = Arc::new(ManualClock::new(T0));
        let e = engine(&clock);
        let x = e.explain(&q(1));
        assert_eq!(x.client_net, "192.0.2.0/24");
        assert_eq!(x.recipient, "bob@example.net");
        assert_eq!(x.identities.len(), 1, "no name given: the prefix only");
        assert_eq!(x.identities[0].record, None);
        assert_eq!(x.decision, Decision::Defer { seconds_left: 60 });
        assert_eq!(e.stats().triplets, 0, "a lookup records nothing");
        e.check(&q(1), Mode::Record);
        clock.advance(10);
        let x = e.explain(&q(7));
        let r = x.identities[0].record.expect("the record");
        assert_eq!((r.first_seen(), r.is_whitelisted()), (T0, false));
        assert_eq!(x.decision, Decision::Defer { seconds_left: 50 });
        // With a verified name, the name identity comes first.
        let mut named = q(1);
        named.client_name = Some("mail7.Example.COM");
        let x = e.explain(&named);
        let ids: Vec<&str> = x.identities.iter().map(|i| i.identity.as_str()).collect();
        assert_eq!(ids, ["name:example.com", "192.0.2.0/24"]);
        assert!(x.identities[0].record.is_none() && x.identities[1].record.is_some());
    }

    #[test]
    fn whitelist_passes_at_once_and_a_ttl_moves_the_expiry() {
        let clock = Arc::new(ManualClock::new(T0));
        let e = engine(&clock);
        let r = e.whitelist(&q(1), None);
        assert!(r.is_whitelisted());
        assert_eq!(e.check(&q(2), Mode::Record), Decision::Pass(Pass::Known));
        let r = e.whitelist(&q(1), Some(3600));
        // Never shortened below what it has.
        assert_eq!(r.alive_until(e.policy()), u64::from(T0) + 86_400);
        let other = Query::new(ip(1), "x@y.example", "z@w.example");
        let r = e.whitelist(&other, Some(3600));
        assert_eq!(r.alive_until(e.policy()), u64::from(T0) + 3600);
        let r = e.whitelist(&other, Some(10 * 86_400));
        assert_eq!(r.alive_until(e.policy()), u64::from(T0) + 10 * 86_400);
        let mut c = Changes::default();
        e.take_changes(e.now(), &mut c);
        assert_eq!(c.triplets.len(), 4, "every whitelisting is published");
    }

    #[test]
    fn delete_removes_under_every_identity_and_leaves_a_tombstone() {
        let clock = Arc::new(ManualClock::new(T0));
        let e = engine(&clock).with_identities(Identities::parse("name,prefix").unwrap());
        let mut named = q(1);
        named.client_name = Some("mx.example.com");
        e.whitelist(&named, None);
        e.whitelist(&q(1), None);
        assert_eq!(e.stats().triplets, 2);
        clock.advance(5);
        assert!(e.delete(&named));
        assert_eq!(e.stats().triplets, 0);
        assert!(!e.delete(&named), "nothing left to delete");
        assert_eq!(e.tombstone_count(), 2);
        let mut c = Changes::default();
        e.take_changes(e.now(), &mut c);
        assert_eq!(c.tombstones.len(), 4);
        // A peer's older copy does not bring it back; a newer life does come in.
        let old = TripletRecord::from_parts(e.explain(&q(1)).identities[0].key, T0, T0 + 9, true);
        let s = e.merge_triplets([old], e.now());
        assert_eq!((s.deleted, e.stats().triplets), (1, 0));
        clock.advance(1);
        let new = TripletRecord::from_parts(old.key, e.now(), e.now(), false);
        e.merge_triplets([new], e.now());
        assert_eq!(e.stats().triplets, 1);
    }

    #[test]
    fn delete_client_and_import() {
        let clock = Arc::new(ManualClock::new(T0));
        let e = engine(&clock);
        let unix = super::super::clock::to_unix(T0);
        let items = [
            ImportRecord::Triplet {
                client: ip(9),
                sender: "a@b.example",
                recipient: "c@d.example",
                first_seen: unix - 4000,
                last_seen: unix - 100,
                passed: true,
            },
            ImportRecord::Triplet {
                client: ip(9),
                sender: "old@b.example",
                recipient: "c@d.example",
                first_seen: unix - 90_000,
                last_seen: unix - 90_000,
                passed: false,
            },
            ImportRecord::Client {
                client: ip(9),
                count: 7,
                last_seen: unix - 100,
            },
        ];
        let s = e.import(&items);
        assert_eq!((s.triplets, s.clients, s.expired), (1, 1, 1));
        assert_eq!(e.import(&items), s, "importing again is harmless");
        assert_eq!(e.stats().triplets, 1);
        let q = Query::new(ip(1), "x@y.example", "new@d.example");
        assert_eq!(e.check(&q, Mode::Peek), Decision::Pass(Pass::Awl));
        let x = e.explain(&Query::new(ip(9), "a@b.example", "c@d.example"));
        assert_eq!(x.awl.map(|a| a.count), Some(7));
        assert_eq!(x.decision, Decision::Pass(Pass::Known));
        assert!(e.delete_client(ip(3)));
        assert!(!e.delete_client(ip(3)));
        assert_eq!(
            e.check(&q, Mode::Peek),
            Decision::Defer { seconds_left: 60 }
        );
    }
}
