//! Multi-node replication through Redis Streams (docs/OPERATIONS.md, "Running a cluster").
//!
//! Every node keeps the whole table and answers only from it; this module carries each node's
//! changes to the others. The engine stays runtime-free: it hands changes over through
//! per-shard outboxes ([`crate::engine::Engine::take_changes`]) and merges what peers send
//! ([`crate::engine::Engine::merge_triplets`]); everything that talks to Redis lives here, on
//! a thread of its own (a single-threaded runtime), so neither a slow Redis nor a burst of
//! merges ever waits on, or holds up, a connection's runtime worker.
//!
//! ```text
//!  decision ─► shard outbox (keys, bounded) ──take_changes every 20 ms──► pending (coalesced)
//!                                                                          │ XADD <c>:ev:<me>
//!                                                                          ▼   MINID ~ now-retention
//!  Engine::merge_* ◄── decode + key id check ◄── XREAD BLOCK <c>:ev:<peer>… (own connection)
//! ```
//!
//! Redis keys, all under `<cluster-name>:`: `ev:<node-id>` (a node's stream), `nodes` (the set
//! of node ids, how peers that join later are found), `node:<node-id>` (a lease held by the
//! live node with that id, so a second one is refused), `config` (the key id and client
//! masking every node must share).

pub mod id;
mod replicator;
pub mod wire;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

pub use id::StreamId;

use crate::engine::{Engine, Secs};
use crate::snapshot::ClusterState;

/// What a node needs to join a cluster.
#[derive(Clone)]
pub struct ClusterConfig {
    /// `redis://…`, `rediss://…` or `unix://…`.
    pub url: String,
    /// This node's id (`[A-Za-z0-9_.-]{1,64}`).
    pub node_id: String,
    /// Prefix of every Redis key.
    pub name: String,
    /// How long a node's stream keeps its entries.
    pub retention: Duration,
    /// Who holds this node id: the same value on a restart of the same node (host name and
    /// data directory), another value on another machine or directory. A node whose lease is
    /// held by another holder is refused; one that finds its own (a restart after a crash)
    /// takes it over at once.
    pub holder: String,
    /// The client masking the keys were made with (must match the cluster's, like the key).
    pub masking: String,
}

impl std::fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password.
        f.debug_struct("ClusterConfig")
            .field("url", &crate::config::redact_url(&self.url))
            .field("node_id", &self.node_id)
            .field("name", &self.name)
            .field("retention", &self.retention)
            .finish_non_exhaustive()
    }
}

impl ClusterConfig {
    fn key(&self, suffix: &str) -> String {
        format!("{}:{suffix}", self.name)
    }
    fn stream_of(&self, node: &str) -> String {
        self.key(&format!("ev:{node}"))
    }
    fn peer_of_stream<'a>(&self, stream: &'a str) -> Option<&'a str> {
        stream
            .strip_prefix(self.name.as_str())
            .and_then(|s| s.strip_prefix(":ev:"))
    }
}

/// Why a node cannot join its cluster (it must not start: it would answer from a table the
/// others cannot share).
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The URL does not parse.
    #[error("--cluster-redis {url}: {reason}")]
    Url {
        /// The URL, password hidden.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// Another live node holds this node id.
    #[error("node id {node:?} is already in use by a live node ({holder}); give this node another --node-id (or stop the other one)")]
    DuplicateNode {
        /// The id.
        node: String,
        /// Who holds it.
        holder: String,
    },
    /// The cluster's records are keyed or masked differently.
    #[error("this node's hash key or client masking ({ours}) differs from the cluster's ({theirs}): copy hash.key (and the ipv4-prefix/ipv6-prefix settings) from a running node, or use another --cluster-name")]
    Mismatch {
        /// This node's.
        ours: String,
        /// The cluster's.
        theirs: String,
    },
    /// The replication thread could not be started.
    #[error("cannot start the replication thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// One peer as seen by this node.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PeerStatus {
    /// The peer's node id.
    pub node: String,
    /// Records merged from its stream since start.
    pub applied_records: u64,
    /// Batches refused (damaged, or made under another key).
    pub refused_batches: u64,
    /// The last entry applied.
    pub last_id: String,
    /// Age of the last batch applied when it was applied (0 once caught up and idle).
    pub lag_seconds: f64,
    /// Times entries were trimmed from its stream before this node read them.
    pub gaps: u64,
    /// Whether the last read found nothing more to read.
    pub caught_up: bool,
}

/// How long changes took to reach this node, over every batch applied since start (from the
/// start of the publisher's collection window the batch's changes were made in, to their
/// merge here; clocks of the two nodes are compared, so skew between hosts adds to it).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct LagSummary {
    /// Batches measured.
    pub batches: u64,
    /// Median, seconds.
    pub p50_seconds: f64,
    /// 99th percentile, seconds.
    pub p99_seconds: f64,
    /// Largest, seconds.
    pub max_seconds: f64,
}

/// The cluster as seen by this node (for `/status`, `greyhound admin status` and metrics).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ClusterStatus {
    /// This node's id.
    pub node_id: String,
    /// The cluster name.
    pub cluster_name: String,
    /// Whether Redis answered the last command.
    pub connected: bool,
    /// Records published since start.
    pub published_records: u64,
    /// Every change made here at or before this Unix second has been published (0: none yet).
    pub published_through_unix: u64,
    /// Records waiting to be published.
    pub pending_records: u64,
    /// Outbox overflows that made this node rescan a shard instead.
    pub rescanned_shards: u64,
    /// Replication lag of every peer's batches, since start.
    pub lag: LagSummary,
    /// Peers.
    pub peers: Vec<PeerStatus>,
}

#[derive(Debug, Default)]
struct Peer {
    status: PeerStatus,
    /// The last entry applied: reading goes on after it.
    position: StreamId,
}

/// State shared between the replication thread and the rest of the server.
#[derive(Debug, Default)]
struct State {
    connected: AtomicBool,
    published: AtomicU64,
    published_through: AtomicU32,
    pending: AtomicU64,
    rescanned: AtomicU64,
    peers: Mutex<BTreeMap<String, Peer>>,
    /// The last entry of this node's own stream that Redis acknowledged: every record in it was
    /// in the table before. Saved with snapshots, so a restart replays its own stream from there
    /// (what it decided and published after the snapshot was taken).
    own_position: Mutex<StreamId>,
    /// Replication lag per applied batch, in milliseconds.
    lag_ms: Mutex<Option<hdrhistogram::Histogram<u64>>>,
}

impl State {
    fn record_lag(&self, ms: u64) {
        let mut h = self.lag_ms.lock().unwrap_or_else(PoisonError::into_inner);
        // 3 significant digits up to an hour: ~30 KB, made on first use.
        let h = h.get_or_insert_with(|| {
            hdrhistogram::Histogram::new_with_bounds(1, 3_600_000, 3).expect("valid bounds")
        });
        h.saturating_record(ms.max(1));
    }

    fn lag(&self) -> LagSummary {
        let h = self.lag_ms.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(h) = h.as_ref().filter(|h| !h.is_empty()) else {
            return LagSummary::default();
        };
        let s = |ms: u64| ms as f64 / 1000.0;
        LagSummary {
            batches: h.len(),
            p50_seconds: s(h.value_at_quantile(0.5)),
            p99_seconds: s(h.value_at_quantile(0.99)),
            max_seconds: s(h.max()),
        }
    }

    fn peers(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Peer>> {
        self.peers.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A running replication: a thread with its own runtime, publishing this node's changes and
/// applying every peer's.
#[derive(Debug)]
pub struct Cluster {
    cfg: ClusterConfig,
    state: Arc<State>,
    stop: CancellationToken,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// What [`Cluster::start`] found on its first contact with Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Joined {
    /// Registered: the node id is ours and the cluster's key matches.
    Connected,
    /// Redis did not answer; decisions go on, and the checks run when it does.
    Unreachable(String),
}

impl Cluster {
    /// Starts replicating `engine` (built [`Engine::with_outbox`]) from the replication state
    /// of its snapshot. Waits for a first contact with Redis (a few seconds at most): a
    /// duplicate node id or another hash key refuse the start; an unreachable Redis does not.
    pub fn start(
        cfg: ClusterConfig,
        engine: Arc<Engine>,
        saved: &ClusterState,
    ) -> Result<(Arc<Self>, Joined), ClusterError> {
        let client = replicator::client(&cfg)?;
        let state = Arc::new(State::default());
        state
            .published_through
            .store(saved.published_through, Relaxed);
        {
            let mut peers = state.peers();
            for (node, id) in &saved.peers {
                if *node != cfg.node_id {
                    peers.insert(node.clone(), replicator::peer_at(node, *id));
                }
            }
        }
        let stop = CancellationToken::new();
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = {
            let (cfg, state, stop) = (cfg.clone(), state.clone(), stop.clone());
            std::thread::Builder::new()
                .name("cluster".into())
                .spawn(move || replicator::run(client, cfg, engine, state, stop, tx))?
        };
        let joined = match rx.recv() {
            Ok(Ok(j)) => j,
            Ok(Err(e)) => {
                stop.cancel();
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => Joined::Unreachable("the replication thread stopped".into()),
        };
        Ok((
            Arc::new(Self {
                cfg,
                state,
                stop,
                thread: Mutex::new(Some(thread)),
            }),
            joined,
        ))
    }

    /// The replication state to save with a snapshot. Read it *before* the table walk: every
    /// entry it names as applied is then in the snapshot, and replaying from it after a
    /// restart can only repeat changes (harmless), never miss one.
    pub fn positions(&self) -> ClusterState {
        let mut peers: Vec<(String, StreamId)> = self
            .state
            .peers()
            .iter()
            .filter(|(_, p)| p.position != StreamId::ZERO)
            .map(|(n, p)| (n.clone(), p.position))
            .collect();
        let own = *self
            .state
            .own_position
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if own != StreamId::ZERO {
            peers.push((self.cfg.node_id.clone(), own));
        }
        ClusterState {
            published_through: self.state.published_through.load(Relaxed),
            peers,
        }
    }

    /// The cluster as seen from here.
    pub fn status(&self) -> ClusterStatus {
        let through: Secs = self.state.published_through.load(Relaxed);
        ClusterStatus {
            node_id: self.cfg.node_id.clone(),
            cluster_name: self.cfg.name.clone(),
            connected: self.state.connected.load(Relaxed),
            published_records: self.state.published.load(Relaxed),
            published_through_unix: if through == 0 {
                0
            } else {
                crate::engine::clock::to_unix(through)
            },
            pending_records: self.state.pending.load(Relaxed),
            rescanned_shards: self.state.rescanned.load(Relaxed),
            lag: self.state.lag(),
            peers: self
                .state
                .peers()
                .values()
                .map(|p| p.status.clone())
                .collect(),
        }
    }

    /// A collector for the `greyhound_cluster_*` metrics.
    pub fn collector(self: &Arc<Self>) -> Box<dyn Collector> {
        Box::new(Metrics(self.clone()))
    }

    /// Publishes what is still pending (a few seconds at most) and stops the thread.
    pub fn stop(&self) {
        self.stop.cancel();
        if let Some(t) = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            let _ = t.join();
        }
    }
}

#[derive(Debug)]
struct Metrics(Arc<Cluster>);

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct PeerLabels {
    peer: String,
}

impl Collector for Metrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.0.status();
        let connected = ConstGauge::new(i64::from(s.connected));
        connected.encode(encoder.encode_descriptor(
            "cluster_connected",
            "Whether Redis answered the last command (1) or not (0).",
            None,
            connected.metric_type(),
        )?)?;
        let published = ConstCounter::new(s.published_records);
        published.encode(encoder.encode_descriptor(
            "cluster_published_records",
            "Records this node published to its stream.",
            None,
            published.metric_type(),
        )?)?;
        let pending = ConstGauge::new(s.pending_records as i64);
        pending.encode(encoder.encode_descriptor(
            "cluster_pending_records",
            "Records waiting to be published (Redis down or behind).",
            None,
            pending.metric_type(),
        )?)?;
        let rescanned = ConstCounter::new(s.rescanned_shards);
        rescanned.encode(encoder.encode_descriptor(
            "cluster_rescanned_shards",
            "Shards rescanned because their outbox of changes filled up (nothing lost).",
            None,
            rescanned.metric_type(),
        )?)?;
        type Counter = (&'static str, &'static str, fn(&PeerStatus) -> u64);
        let counters: [Counter; 3] = [
            (
                "cluster_applied_records",
                "Records merged from a peer's stream.",
                |p| p.applied_records,
            ),
            (
                "cluster_gaps",
                "Times a peer's entries were trimmed before this node read them.",
                |p| p.gaps,
            ),
            (
                "cluster_refused_batches",
                "A peer's batches refused (damaged, or made under another hash key).",
                |p| p.refused_batches,
            ),
        ];
        for (name, help, field) in counters {
            let mut m = encoder.encode_descriptor(
                name,
                help,
                None,
                ConstCounter::new(0u64).metric_type(),
            )?;
            for p in &s.peers {
                let labels = PeerLabels {
                    peer: p.node.clone(),
                };
                ConstCounter::new(field(p)).encode(m.encode_family(&labels)?)?;
            }
        }
        let mut m = encoder.encode_descriptor(
            "cluster_lag_seconds",
            "Age of the last batch applied from a peer when it was applied (0 when caught up).",
            None,
            ConstGauge::new(0.0f64).metric_type(),
        )?;
        for p in &s.peers {
            let labels = PeerLabels {
                peer: p.node.clone(),
            };
            ConstGauge::new(p.lag_seconds).encode(m.encode_family(&labels)?)?;
        }
        Ok(())
    }
}
