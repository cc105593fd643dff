//! The replication thread: three loops on one single-threaded runtime.
//!
//! - **publish** (every [`FLUSH`]): collects the engine's changes, coalesces them by key (the
//!   latest state wins: a record's state only moves forward here), and once [`PUBLISH_AT`]
//!   records wait or the oldest has waited [`MAX_WAIT`], `XADD`s them to this node's stream in
//!   batches of at most [`wire::MAX_RECORDS`], trimming entries older than the retention
//!   (`MINID ~`). While Redis is away the changes wait here, up to
//!   [`PENDING_LIMIT`]; past that the engine's bounded outboxes fill and the shards are
//!   rescanned when Redis is back — memory stays bounded and nothing is lost.
//! - **read**: `XREAD BLOCK` over every peer's stream on a connection of its own (a blocking
//!   read would hold up the publisher's commands on a shared one), with a response timeout
//!   longer than the block; each batch is checked ([`wire::decode`], key id) and merged. Each
//!   entry also names the entry before it in its stream (field `p`): a reader that never read
//!   that one missed entries (trimmed, or lost with Redis's data) and counts a gap.
//! - **lease** (every [`LEASE_EVERY`]): holds this node's id (`node:<id>`, expires after
//!   [`LEASE_TTL`]), checks the cluster's key and masking, registers the id in `nodes`, and
//!   notices a Redis that came back empty (the lease is gone): then every record changed within
//!   the retention is published again, so nodes that missed entries, and nodes that join later,
//!   still learn the table.

use std::cell::{Cell, RefCell};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::streams::StreamReadReply;
use redis::{AsyncConnectionConfig, Client, Value};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::{wire, ClusterConfig, ClusterError, Joined, Peer, PeerStatus, State, StreamId};
use crate::engine::{clock, AwlRecord, Changes, Engine, Secs, TripletRecord};

/// How often changes are collected and published: the bulk of the replication lag.
const FLUSH: Duration = Duration::from_millis(20);
/// Pending records that make an entry worth writing at once (see `Replicator::due`).
const PUBLISH_AT: usize = 1024;
/// The longest a change waits for more to share its entry (see `Replicator::due`).
const MAX_WAIT: Duration = Duration::from_millis(100);
/// Records kept waiting for Redis before the engine's outboxes are left to fill (24 MB of
/// triplets at most; the outboxes then hold keys, and a full one is rescanned instead).
const PENDING_LIMIT: usize = 1_000_000;
/// A republish sweep stops adding shards to what is pending past this many records.
const SWEEP_BATCH: usize = 65_536;
/// Reads of peers' streams start at most this often (see `read_loop`); adds at most this much
/// to the replication lag.
const READ_EVERY: Duration = Duration::from_millis(20);
/// How long a read waits for a peer's entries.
const BLOCK: Duration = Duration::from_millis(500);
/// Entries per peer per read (each up to [`wire::MAX_RECORDS`] records).
const READ_COUNT: usize = 16;
/// How often the lease is renewed and the peers are listed again.
const LEASE_EVERY: Duration = Duration::from_secs(2);
/// How long a lease outlives its last renewal: how long the id of a node that died stays
/// refused to a *different* node (its own restart takes it over at once).
const LEASE_TTL: Duration = Duration::from_secs(15);
/// Connecting, and any command but the blocking read.
const TIMEOUT: Duration = Duration::from_secs(2);
/// The first contact at start: longer than this and the node starts alone.
const FIRST_CONTACT: Duration = Duration::from_secs(3);
/// Pause after a failed command before the next attempt.
const BACKOFF: Duration = Duration::from_millis(500);

/// Holds the lease if it is free or already ours; returns 1 if it was free (a fresh start, or
/// a Redis that lost its data), 0 if it was ours, else the holder.
const LEASE_SCRIPT: &str = r"
local v = redis.call('GET', KEYS[1])
if v == false or v == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  if v == false then return 1 end
  return 0
end
return v
";

/// Builds the client for the configured URL (nothing is contacted yet).
pub(super) fn client(cfg: &ClusterConfig) -> Result<Client, ClusterError> {
    if cfg.url.starts_with("rediss://") {
        // rustls needs one process-wide crypto provider; a second install is a no-op error.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    Client::open(cfg.url.as_str()).map_err(|e| ClusterError::Url {
        url: crate::config::redact_url(&cfg.url),
        reason: e.to_string(),
    })
}

/// A peer known from a snapshot, to be read from `id` on.
pub(super) fn peer_at(node: &str, id: StreamId) -> Peer {
    Peer {
        status: PeerStatus {
            node: node.to_string(),
            last_id: id.to_string(),
            ..PeerStatus::default()
        },
        position: id,
    }
}

/// Runs the replication until `stop`; reports the first contact through `first`.
pub(super) fn run(
    client: Client,
    cfg: ClusterConfig,
    engine: Arc<Engine>,
    state: Arc<State>,
    stop: CancellationToken,
    first: Sender<Result<Joined, ClusterError>>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = first.send(Err(ClusterError::Thread(e)));
            return;
        }
    };
    let replay_from = *state
        .own_position
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let r = Replicator {
        client,
        cfg,
        engine,
        state,
        stop,
        manager: RefCell::new(None),
        pending: RefCell::new(Changes::default()),
        oldest_ms: Cell::new(None),
        collected_ms: Cell::new(unix_ms()),
        republish: Cell::new(None),
        joined_once: Cell::new(false),
        reading: Cell::new(false),
        replay_own: Cell::new(Some(replay_from)),
        replayed: Cell::new(0),
        rejoin: Cell::new(true),
        told: Cell::new(false),
        refused: Cell::new(false),
    };
    rt.block_on(async {
        let joined = match tokio::time::timeout(FIRST_CONTACT, r.join()).await {
            Ok(Ok(())) => Joined::Connected,
            Ok(Err(Fail::Refused(e))) => {
                let _ = first.send(Err(e));
                return;
            }
            Ok(Err(Fail::Redis(e))) => Joined::Unreachable(e.to_string()),
            Err(_) => {
                Joined::Unreachable(format!("no answer within {} s", FIRST_CONTACT.as_secs()))
            }
        };
        if let Joined::Unreachable(why) = &joined {
            r.lost(why);
        }
        let _ = first.send(Ok(joined));
        tokio::join!(r.publish_loop(), r.read_loop(), r.lease_loop());
    });
}

enum Fail {
    Redis(redis::RedisError),
    Refused(ClusterError),
}

impl From<redis::RedisError> for Fail {
    fn from(e: redis::RedisError) -> Self {
        Fail::Redis(e)
    }
}

struct Replicator {
    client: Client,
    cfg: ClusterConfig,
    engine: Arc<Engine>,
    state: Arc<State>,
    stop: CancellationToken,
    manager: RefCell<Option<ConnectionManager>>,
    /// Collected, not yet published; coalesced by key.
    pending: RefCell<Changes>,
    /// When the oldest change waiting in `pending` may have been made: the collection before
    /// the one that found it (a batch's `created_ms`, so lag is measured from the change, not
    /// from the batch).
    oldest_ms: Cell<Option<u64>>,
    /// When the engine's outboxes were last collected.
    collected_ms: Cell<u64>,
    /// A republish in progress: records changed since this second, from this shard on.
    republish: Cell<Option<(Secs, usize)>>,
    joined_once: Cell<bool>,
    /// Whether peers' entries may be merged yet: not before the first join's sweep of this
    /// node's own table is done, or that sweep would publish again what it merged.
    reading: Cell<bool>,
    /// This node's own stream still to be read back after a restart, from this entry on
    /// (what it published after its snapshot was taken is in no snapshot).
    replay_own: Cell<Option<StreamId>>,
    /// Redis was lost since the last join: join again before publishing.
    rejoin: Cell<bool>,
    /// Records of its own stream read back so far.
    replayed: Cell<u64>,
    /// Whether the connection state was logged yet.
    told: Cell<bool>,
    /// Another live node holds our id (found after start): replication stopped.
    refused: Cell<bool>,
}

impl Replicator {
    /// The shared connection (publisher and lease), made on first use and after it failed.
    async fn manager(&self) -> Result<ConnectionManager, redis::RedisError> {
        if let Some(m) = self.manager.borrow().as_ref() {
            return Ok(m.clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(TIMEOUT))
            .set_response_timeout(Some(TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let m = self
            .client
            .get_connection_manager_with_config(config)
            .await?;
        *self.manager.borrow_mut() = Some(m.clone());
        Ok(m)
    }

    fn ok(&self) {
        self.told.set(true);
        if !self.state.connected.swap(true, Relaxed) {
            info!(
                redis = %crate::config::redact_url(&self.cfg.url),
                node = %self.cfg.node_id,
                cluster = %self.cfg.name,
                "cluster: connected to redis"
            );
        }
    }

    fn lost(&self, why: &str) {
        // Redis may come back empty: join again (and look for this node's stream) before the
        // next XADD would create the stream afresh and hide that it was lost.
        self.rejoin.set(true);
        // Once per loss (and once if Redis is away from the start).
        if self.state.connected.swap(false, Relaxed) || !self.told.replace(true) {
            warn!(
                redis = %crate::config::redact_url(&self.cfg.url),
                "cluster: lost redis ({why}); decisions go on from the local table, changes are kept and published once it is back"
            );
        }
    }

    /// Checks the cluster's key and masking, holds the lease, registers the id. On a fresh
    /// lease (first start, or Redis lost its data) schedules the republish that brings the
    /// stream back.
    async fn join(&self) -> Result<(), Fail> {
        let mut con = self.manager().await?;
        let config_key = self.cfg.key("config");
        let _: Value = redis::cmd("SET")
            .arg(&config_key)
            .arg(&self.cfg.masking)
            .arg("NX")
            .query_async(&mut con)
            .await?;
        let theirs: Option<String> = redis::cmd("GET")
            .arg(&config_key)
            .query_async(&mut con)
            .await?;
        if let Some(theirs) = theirs {
            if theirs != self.cfg.masking {
                return Err(Fail::Refused(ClusterError::Mismatch {
                    ours: self.cfg.masking.clone(),
                    theirs,
                }));
            }
        }
        let lease: Value = redis::Script::new(LEASE_SCRIPT)
            .key(self.cfg.key(&format!("node:{}", self.cfg.node_id)))
            .arg(&self.cfg.holder)
            .arg(LEASE_TTL.as_millis() as u64)
            .invoke_async(&mut con)
            .await?;
        let fresh = match lease {
            Value::Int(n) => n == 1,
            other => {
                let holder = match other {
                    Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
                    v => format!("{v:?}"),
                };
                return Err(Fail::Refused(ClusterError::DuplicateNode {
                    node: self.cfg.node_id.clone(),
                    holder,
                }));
            }
        };
        let _: Value = redis::cmd("SADD")
            .arg(self.cfg.key("nodes"))
            .arg(&self.cfg.node_id)
            .query_async(&mut con)
            .await?;
        // Marked joined only at the end: a join that fails halfway is still the first.
        let first = !self.joined_once.get();
        if fresh || first {
            let exists: bool = redis::cmd("EXISTS")
                .arg(self.cfg.stream_of(&self.cfg.node_id))
                .query_async(&mut con)
                .await?;
            let now = self.engine.now();
            let within_retention = now.saturating_sub(self.cfg.retention.as_secs() as Secs);
            let through = self.state.published_through.load(Relaxed);
            let since = match (first, exists) {
                // A node that never published (new in the cluster, or a single node joining
                // one) shares its whole table: the others know none of it.
                (true, _) if through == 0 => 0,
                // A restart: what changed since its last confirmed publish (what it published
                // after its snapshot is read back from its stream instead).
                (true, true) => through + 1,
                // Its stream is gone although it published (Redis came back empty): what a
                // node joining now could have learnt from it (and, after a restart, whatever
                // it changed since its last confirmed publish).
                (true, false) => within_retention.min(through + 1),
                (false, false) => within_retention,
                // The lease had lapsed but the stream is there: nothing was lost.
                (false, true) => Secs::MAX,
            };
            if since != Secs::MAX {
                if !first && !exists {
                    warn!("cluster: redis lost this node's stream (restarted empty?); publishing every record changed within the retention again");
                }
                let start = self.republish.get().map_or(since, |(s, _)| s.min(since));
                self.republish.set(Some((start, 0)));
            } else if first {
                self.reading.set(true);
            }
        }
        // Only now: a publish waiting for this join must not create the stream before the
        // look above.
        self.joined_once.set(true);
        self.rejoin.set(false);
        self.ok();
        Ok(())
    }

    async fn lease_loop(&self) {
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tokio::time::sleep(LEASE_EVERY) => {}
            }
            if self.refused.get() {
                continue;
            }
            if let Err(e) = self.join_or_stop().await {
                self.lost(&e.to_string());
            }
        }
    }

    /// [`Replicator::join`]; a refusal found now (Redis was away at the start, or another node
    /// took this id meanwhile) stops the replication, the node goes on alone.
    async fn join_or_stop(&self) -> Result<(), redis::RedisError> {
        match self.join().await {
            Ok(()) => Ok(()),
            Err(Fail::Redis(e)) => Err(e),
            Err(Fail::Refused(e)) => {
                error!("cluster: replication stopped: {e}");
                self.refused.set(true);
                self.state.connected.store(false, Relaxed);
                Ok(())
            }
        }
    }

    /// Moves the engine's changes (and a republish step) into `pending`, if there is room.
    fn collect(&self) -> Option<Secs> {
        let mut pending = self.pending.borrow_mut();
        if pending.triplets.len() + pending.clients.len() >= PENDING_LIMIT {
            return None;
        }
        let now = self.engine.now();
        let before = pending.rescanned_shards;
        let was_empty = pending.is_empty();
        self.engine.take_changes(now, &mut pending);
        self.state
            .rescanned
            .fetch_add((pending.rescanned_shards - before) as u64, Relaxed);
        if let Some((since, mut shard)) = self.republish.get() {
            // Shard by shard while what waits stays small: a republish of millions of records
            // never needs them all in memory at once, and a small table is swept at once.
            let (t, c) = self.engine.shard_counts();
            while shard < t + c && pending.triplets.len() + pending.clients.len() < SWEEP_BATCH {
                self.engine
                    .changed_since_shard(shard, since, now, &mut pending);
                shard += 1;
            }
            if shard < t + c {
                self.republish.set(Some((since, shard)));
            } else {
                info!(
                    since = clock::to_unix(since),
                    "cluster: every record changed since then is queued for publishing"
                );
                self.republish.set(None);
                // The first sweep saw only this node's own table: peers may be read now.
                self.reading.set(true);
            }
        }
        coalesce(&mut pending);
        let window_start = self.collected_ms.replace(unix_ms());
        if was_empty && !pending.is_empty() {
            self.oldest_ms.set(Some(window_start));
        }
        self.state.pending.store(
            (pending.triplets.len() + pending.clients.len()) as u64,
            Relaxed,
        );
        Some(now)
    }

    async fn publish_loop(&self) {
        let mut collected_at: Option<Secs> = None;
        loop {
            let stopping = tokio::select! {
                _ = self.stop.cancelled() => true,
                _ = tokio::time::sleep(FLUSH) => false,
            };
            if self.refused.get() {
                if stopping {
                    return;
                }
                continue;
            }
            if let Some(t) = self.collect() {
                collected_at = Some(t);
            }
            let result = if stopping {
                // At shutdown: what is pending gets a bounded chance to leave.
                tokio::time::timeout(TIMEOUT, self.publish())
                    .await
                    .unwrap_or(Ok(()))
            } else if self.due() {
                self.publish().await
            } else {
                Ok(())
            };
            match result {
                Ok(()) => {
                    let empty = self.pending.borrow().is_empty();
                    // Not before the first join: until then nothing has been published, and
                    // the join decides from this what a node that never published must send.
                    let joined = self.joined_once.get();
                    if let (true, true, Some(t), None) =
                        (joined, empty, collected_at, self.republish.get())
                    {
                        self.state
                            .published_through
                            .store(t.saturating_sub(1), Relaxed);
                    }
                }
                Err(e) => {
                    self.lost(&e.to_string());
                    *self.manager.borrow_mut() = None;
                    tokio::select! {
                        _ = self.stop.cancelled() => {}
                        _ = tokio::time::sleep(BACKOFF) => {}
                    }
                }
            }
            if stopping {
                return;
            }
        }
    }

    /// Whether what is pending should leave now: enough of it for a well-filled entry, or its
    /// oldest change has waited [`MAX_WAIT`]. A busy node publishes every [`FLUSH`]; a quiet
    /// one writes fewer, fuller entries, and Redis keeps ~360 bytes per entry besides the
    /// records (docs/SCALING.md).
    fn due(&self) -> bool {
        let p = self.pending.borrow();
        p.triplets.len() + p.clients.len() >= PUBLISH_AT
            || self
                .oldest_ms
                .get()
                .is_some_and(|t| unix_ms().saturating_sub(t) >= MAX_WAIT.as_millis() as u64)
    }

    /// XADDs what is pending, a batch at a time; a batch leaves `pending` only once Redis took it.
    async fn publish(&self) -> Result<(), redis::RedisError> {
        if self.pending.borrow().is_empty() {
            return Ok(());
        }
        if self.rejoin.get() {
            self.join_or_stop().await?;
            if self.refused.get() {
                return Ok(());
            }
        }
        let mut con = self.manager().await?;
        let stream = self.cfg.stream_of(&self.cfg.node_id);
        let mut blob = Vec::new();
        loop {
            let (t, c, d) = {
                let p = self.pending.borrow();
                if p.is_empty() {
                    break;
                }
                // Tombstones leave first, in batches of their own (version 2): a node of the
                // previous release skips those and still reads every record.
                let d = p.tombstones.len().min(wire::MAX_RECORDS);
                let (t, c) = if d > 0 {
                    (0, 0)
                } else {
                    let t = p.triplets.len().min(wire::MAX_RECORDS);
                    (t, p.clients.len().min(wire::MAX_RECORDS - t))
                };
                blob.clear();
                let meta = wire::Meta {
                    key_id: self.engine.key_id(),
                    created_ms: self.oldest_ms.get().unwrap_or_else(unix_ms),
                };
                wire::encode_with(
                    &meta,
                    &p.triplets[..t],
                    &p.clients[..c],
                    &p.tombstones[..d],
                    &mut blob,
                );
                (t, c, d)
            };
            let min_id = unix_ms().saturating_sub(self.cfg.retention.as_millis() as u64);
            let previous = *self
                .state
                .own_position
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let id: String = redis::cmd("XADD")
                .arg(&stream)
                .arg("MINID")
                .arg("~")
                .arg(min_id)
                .arg("*")
                .arg("r")
                .arg(&blob[..])
                // The entry this one follows: a reader that has not seen it missed some.
                .arg("p")
                .arg(previous.to_string())
                .query_async(&mut con)
                .await?;
            if let Ok(id) = id.parse::<StreamId>() {
                let mut own = self
                    .state
                    .own_position
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                *own = (*own).max(id);
            }
            let mut p = self.pending.borrow_mut();
            p.triplets.drain(..t);
            p.clients.drain(..c);
            p.tombstones.drain(..d);
            self.state.published.fetch_add((t + c + d) as u64, Relaxed);
            if p.is_empty() {
                self.oldest_ms.set(None);
            }
            self.state
                .pending
                .store((p.triplets.len() + p.clients.len()) as u64, Relaxed);
        }
        self.ok();
        Ok(())
    }

    async fn reader(&self) -> Result<MultiplexedConnection, redis::RedisError> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(TIMEOUT))
            // Longer than the block, or every quiet read would time out.
            .set_response_timeout(Some(BLOCK + TIMEOUT));
        self.client
            .get_multiplexed_async_connection_with_config(&config)
            .await
    }

    async fn read_loop(&self) {
        let mut con: Option<MultiplexedConnection> = None;
        let mut listed = Instant::now() - LEASE_EVERY;
        while !self.stop.is_cancelled() {
            if self.refused.get() || !self.reading.get() {
                self.pause_briefly().await;
                continue;
            }
            let c = match &mut con {
                Some(c) => c,
                None => match self.reader().await {
                    Ok(c) => con.insert(c),
                    Err(e) => {
                        self.lost(&e.to_string());
                        self.pause().await;
                        continue;
                    }
                },
            };
            let step = async {
                if let Some(from) = self.replay_own.get() {
                    let next = self.replay_own_stream(c, from).await?;
                    self.replay_own.set(next);
                    return Ok(true);
                }
                if listed.elapsed() >= LEASE_EVERY {
                    self.list_peers(c).await?;
                    listed = Instant::now();
                }
                self.read_once(c).await
            };
            let started = Instant::now();
            let result = tokio::select! {
                _ = self.stop.cancelled() => return,
                r = step => r,
            };
            match result {
                Ok(true) => {
                    // At most one read per READ_EVERY: a blocked read returns as soon as any
                    // one peer publishes, so without this each node would read once per entry
                    // of every peer — N × (N − 1) reads of N − 1 keys per publishing interval
                    // for Redis (docs/SCALING.md). Entries arriving meanwhile come together.
                    let left = READ_EVERY.saturating_sub(started.elapsed());
                    if !left.is_zero() {
                        tokio::select! {
                            _ = self.stop.cancelled() => return,
                            _ = tokio::time::sleep(left) => {}
                        }
                    }
                }
                // No peer yet.
                Ok(false) => self.pause().await,
                Err(e) => {
                    self.lost(&e.to_string());
                    con = None;
                    self.pause().await;
                }
            }
        }
    }

    async fn pause_briefly(&self) {
        tokio::select! {
            _ = self.stop.cancelled() => {}
            _ = tokio::time::sleep(FLUSH) => {}
        }
    }

    /// Reads back a batch of this node's own stream after `from` and merges it (what it
    /// decided and published after its last snapshot). Returns where to go on, or `None` at
    /// the end.
    async fn replay_own_stream(
        &self,
        con: &mut MultiplexedConnection,
        from: StreamId,
    ) -> Result<Option<StreamId>, redis::RedisError> {
        let start = if from == StreamId::ZERO {
            "-".to_string()
        } else {
            format!("({from}")
        };
        let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(self.cfg.stream_of(&self.cfg.node_id))
            .arg(start)
            .arg("+")
            .arg("COUNT")
            .arg(READ_COUNT)
            .query_async(con)
            .await?;
        let mut last = from;
        let mut records = 0;
        for entry in &reply.ids {
            let Ok(id) = entry.id.parse::<StreamId>() else {
                continue;
            };
            if let Some(Value::BulkString(b)) = entry.map.get("r") {
                match wire::decode(b) {
                    Ok(d) if d.meta.key_id == self.engine.key_id() => {
                        let now = self.engine.now();
                        self.engine.merge_tombstones(d.tombstones());
                        records += d.tombstones().len();
                        records += self.engine.merge_triplets(d.triplets(), now).received;
                        records += self.engine.merge_clients(d.clients(), now).received;
                    }
                    _ => {}
                }
            }
            last = last.max(id);
        }
        self.replayed.set(self.replayed.get() + records as u64);
        {
            // What this node publishes next follows the newest entry of its stream.
            let mut own = self
                .state
                .own_position
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            *own = (*own).max(last);
        }
        if reply.ids.len() < READ_COUNT {
            if self.replayed.get() > 0 {
                info!(
                    records = self.replayed.get(),
                    up_to = %last,
                    "cluster: read back this node's own records published after its last snapshot"
                );
            }
            return Ok(None);
        }
        Ok(Some(last))
    }

    async fn pause(&self) {
        tokio::select! {
            _ = self.stop.cancelled() => {}
            _ = tokio::time::sleep(BACKOFF) => {}
        }
    }

    /// Adds the nodes registered since the last look (read from the start of their stream).
    async fn list_peers(&self, con: &mut MultiplexedConnection) -> Result<(), redis::RedisError> {
        let nodes: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.cfg.key("nodes"))
            .query_async(con)
            .await?;
        let mut peers = self.state.peers();
        for n in nodes {
            if n != self.cfg.node_id && !peers.contains_key(&n) {
                info!(peer = %n, "cluster: found peer");
                peers.insert(n.clone(), peer_at(&n, StreamId::ZERO));
            }
        }
        Ok(())
    }

    /// One blocking read over every peer's stream; applies what came. `Ok(false)`: no peers.
    async fn read_once(&self, con: &mut MultiplexedConnection) -> Result<bool, redis::RedisError> {
        let (keys, ids): (Vec<String>, Vec<String>) = {
            let peers = self.state.peers();
            if peers.is_empty() {
                return Ok(false);
            }
            peers
                .iter()
                .map(|(n, p)| (self.cfg.stream_of(n), p.position.to_string()))
                .unzip()
        };
        let reply: Option<StreamReadReply> = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(READ_COUNT)
            .arg("BLOCK")
            .arg(BLOCK.as_millis() as u64)
            .arg("STREAMS")
            .arg(&keys)
            .arg(&ids)
            .query_async(con)
            .await?;
        self.ok();
        let reply = reply.unwrap_or_default();
        let mut heard = std::collections::HashSet::new();
        for key in reply.keys {
            let Some(node) = self.cfg.peer_of_stream(&key.key).map(str::to_string) else {
                continue;
            };
            let full = key.ids.len() >= READ_COUNT;
            for entry in key.ids {
                self.apply(&node, &entry);
            }
            heard.insert(node.clone());
            self.set_caught_up(&node, !full);
        }
        // A quiet read: every peer it covered is caught up.
        let all: Vec<String> = self.state.peers().keys().cloned().collect();
        for node in all.iter().filter(|n| !heard.contains(*n)) {
            self.set_caught_up(node, true);
        }
        Ok(true)
    }

    fn set_caught_up(&self, node: &str, caught_up: bool) {
        let mut peers = self.state.peers();
        let Some(p) = peers.get_mut(node) else { return };
        if caught_up && !p.status.caught_up {
            info!(
                peer = %node,
                applied = p.status.applied_records,
                last_id = %p.position,
                "cluster: caught up with peer"
            );
        }
        if caught_up && p.status.caught_up {
            p.status.lag_seconds = 0.0;
        }
        p.status.caught_up = caught_up;
    }

    /// Checks and merges one stream entry, then moves the peer's position past it.
    fn apply(&self, node: &str, entry: &redis::streams::StreamId) {
        let Ok(id) = entry.id.parse::<StreamId>() else {
            return;
        };
        let blob = match entry.map.get("r") {
            Some(Value::BulkString(b)) => Some(&b[..]),
            _ => None,
        };
        let outcome = match blob.map(wire::decode) {
            None => Err("an entry without a field `r`".to_string()),
            Some(Err(e)) => Err(e.to_string()),
            Some(Ok(d)) if d.meta.key_id != self.engine.key_id() => Err(format!(
                "a batch made under another hash key (key id {:016x}, ours {:016x})",
                d.meta.key_id,
                self.engine.key_id()
            )),
            Some(Ok(d)) => {
                let now = self.engine.now();
                // Deletes first: a record of the same batch older than one is refused.
                self.engine.merge_tombstones(d.tombstones());
                let t = self.engine.merge_triplets(d.triplets(), now);
                let c = self.engine.merge_clients(d.clients(), now);
                Ok((
                    t.received + c.received + d.tombstones().len(),
                    d.meta.created_ms,
                ))
            }
        };
        let previous = match entry.map.get("p") {
            Some(Value::BulkString(b)) => std::str::from_utf8(b)
                .ok()
                .and_then(|t| t.parse::<StreamId>().ok()),
            _ => None,
        };
        let mut peers = self.state.peers();
        let p = peers
            .entry(node.to_string())
            .or_insert_with(|| peer_at(node, StreamId::ZERO));
        // The entry names the one before it: if this node never read that one, the entries in
        // between were trimmed (or lost with Redis's data) before it could. A node reading a
        // stream from its start learns what the retention still holds; that is no gap.
        if let Some(previous) = previous {
            if p.position != StreamId::ZERO && previous > p.position {
                p.status.gaps += 1;
                warn!(
                    peer = %node,
                    applied_up_to = %p.position,
                    missed_up_to = %previous,
                    "cluster: entries of a peer were trimmed before this node read them (a gap); each lost record costs at most one extra deferral"
                );
            }
        }
        match outcome {
            Ok((records, created_ms)) => {
                p.status.applied_records += records as u64;
                let lag = unix_ms().saturating_sub(created_ms);
                p.status.lag_seconds = lag as f64 / 1000.0;
                self.state.record_lag(lag);
            }
            Err(why) => {
                if p.status.refused_batches == 0 {
                    warn!(peer = %node, entry = %id, "cluster: refused {why} (skipped; further ones are counted in greyhound_cluster_refused_batches_total)");
                }
                p.status.refused_batches += 1;
            }
        }
        p.position = p.position.max(id);
        p.status.last_id = p.position.to_string();
    }
}

/// Keeps the latest state of each key. Records are collected in order, so of two copies of a
/// key the later one is the newer state (a copy is never merged here: a record that started
/// over must replace its old life, not inherit from it).
fn coalesce(c: &mut Changes) {
    fn latest<R: Copy>(v: &mut Vec<R>, key: impl Fn(&R) -> (u64, u64)) {
        if v.len() < 2 {
            return;
        }
        // Stable: copies of one key stay in the order they were collected.
        v.sort_by_key(&key);
        v.dedup_by(|later, earlier| {
            let same = key(later) == key(earlier);
            if same {
                *earlier = *later;
            }
            same
        });
    }
    latest(&mut c.triplets, |r: &TripletRecord| (r.key.hi, r.key.lo));
    latest(&mut c.clients, |r: &AwlRecord| (r.key.hi, r.key.lo));
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Key;

    #[test]
    fn coalescing_keeps_the_latest_state_of_each_key() {
        let k = |n| Key { lo: n, hi: 1 };
        let mut c = Changes {
            triplets: vec![
                TripletRecord::from_parts(k(2), 10, 10, false),
                TripletRecord::from_parts(k(1), 10, 10, false),
                TripletRecord::from_parts(k(2), 10, 20, true),
                // A restart after expiry: the later, younger life wins, not a merge of the two.
                TripletRecord::from_parts(k(1), 5000, 5000, false),
            ],
            ..Changes::default()
        };
        coalesce(&mut c);
        assert_eq!(
            c.triplets,
            vec![
                TripletRecord::from_parts(k(1), 5000, 5000, false),
                TripletRecord::from_parts(k(2), 10, 20, true),
            ]
        );
    }
}
