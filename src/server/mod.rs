//! The daemon, a thin shell around [`crate::engine::Engine`], one file per transport:
//!
//! ```text
//!   listen.rs      bind every socket before the runtime starts (clear start-up errors)
//!   conn.rs        one accept loop for TCP and Unix; a connection's reads, writes, idle timer
//!   native_tcp.rs  native lines on TCP: pipelined, one write per read   ─┐ native.rs: decide a
//!   native_udp.rs  native lines on UDP: threads, recvmmsg / sendmmsg    ─┘ batch, answer in order
//!   policy.rs      Postfix policy blocks (TCP or Unix socket)
//!   http.rs        GET /metrics                      metrics.rs  counters, per-thread shards
//!   snapshots.rs   the snapshot thread
//!   admin.rs       the admin Unix socket (`greyhound admin`)
//! ```
//!
//! Requests are answered inline on their connection or socket, never one task per request:
//! the complete requests of a read are decided as one engine batch and answered with one
//! write. Line framing and the codecs are sans-IO, in [`crate::proto`].

pub mod admin;
mod conn;
mod http;
pub mod listen;
pub mod metrics;
mod native;
mod native_tcp;
mod native_udp;
mod policy;
pub mod snapshots;
mod spf;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use tokio::net::{TcpListener, UnixListener};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::cluster::{Cluster, ClusterStatus};
pub use crate::config::Limits;
// For the fuzz targets (fuzz/), which check that a UDP reply is never larger than its request.
use crate::engine::Engine;
pub use listen::{BindError, Listeners, PolicyListener, SocketFile};
use metrics::{Metrics, Proto};
#[doc(hidden)]
pub use native::fit_replies;
pub use spf::SpfPath;

/// What the connection loops need besides the engine.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Greylist text template (`%s %r %c %h %d %p`).
    pub greylist_text: String,
    /// Whether `%c` occurs in the template (so the address is formatted only then).
    pub template_uses_client: bool,
    /// The action of a DEFER answered to Postfix.
    pub defer_action: crate::proto::policy::DeferAction,
    /// Add `X-Greylist:` on the first pass of a retried triplet (policy protocol).
    pub x_greylist_header: bool,
    /// Host name written in that header.
    pub hostname: String,
    /// Input bounds.
    pub limits: Limits,
}

impl Settings {
    /// Settings with the given template, the default defer action (see
    /// [`with_defer_action`](Self::with_defer_action)) and the rest as given.
    pub fn new(
        greylist_text: String,
        x_greylist_header: bool,
        hostname: String,
        limits: Limits,
    ) -> Self {
        Self {
            template_uses_client: greylist_text.contains("%c"),
            greylist_text,
            defer_action: crate::proto::policy::DeferAction::default(),
            x_greylist_header,
            hostname,
            limits,
        }
    }
}

impl Settings {
    /// These settings answering Postfix's greylisted requests with `action`.
    #[must_use]
    pub fn with_defer_action(mut self, action: crate::proto::policy::DeferAction) -> Self {
        self.defer_action = action;
        self
    }
}

/// Networks allowed to query. IPv4-mapped IPv6 peers are checked as IPv4.
#[derive(Debug, Clone)]
pub struct AllowList(Vec<IpNet>);

impl AllowList {
    /// An allow list of these networks.
    pub fn new(nets: Vec<IpNet>) -> Self {
        Self(nets)
    }

    /// Whether `ip` may query.
    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.0.iter().any(|n| n.contains(&ip))
    }
}

/// Logs at most one warning per interval, so a flood of refused clients cannot flood the log.
#[derive(Debug, Default)]
struct RateLimit {
    /// Second (since the server started) from which the next line may be logged.
    next: AtomicU64,
}

impl RateLimit {
    fn ready(&self, start: Instant, every: Duration) -> bool {
        let now = start.elapsed().as_secs();
        let next = self.next.load(Ordering::Relaxed);
        now >= next
            && self
                .next
                .compare_exchange(
                    next,
                    now + every.as_secs(),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
    }
}

/// State shared by every listener and connection.
#[derive(Debug)]
pub struct Shared {
    /// The engine.
    pub engine: Arc<Engine>,
    /// Counters and gauges.
    pub metrics: Metrics,
    /// Who may query.
    pub allow: AllowList,
    /// Templates and limits.
    pub settings: Settings,
    /// Replication, when this node is part of a cluster.
    pub cluster: Option<Arc<Cluster>>,
    /// SPF lookups, when the `spf` client identity is in force.
    pub spf: Option<Arc<SpfPath>>,
    /// Connections open now, by [`metrics::Port`]: each listener has its own cap.
    open: [AtomicUsize; 3],
    started: Instant,
    refused_log: RateLimit,
    error_log: RateLimit,
    /// A listener reached its cap, by [`metrics::Port`].
    cap_log: [RateLimit; 3],
    accept_log: RateLimit,
}

impl Shared {
    /// Shared state for a server.
    pub fn new(engine: Arc<Engine>, allow: AllowList, settings: Settings) -> Self {
        Self {
            engine,
            metrics: Metrics::new(),
            allow,
            settings,
            cluster: None,
            spf: None,
            open: Default::default(),
            started: Instant::now(),
            refused_log: RateLimit::default(),
            error_log: RateLimit::default(),
            cap_log: Default::default(),
            accept_log: RateLimit::default(),
        }
    }

    /// Adds the cluster: its metrics, its status, its positions in snapshots.
    pub fn with_cluster(mut self, cluster: Arc<Cluster>) -> Self {
        self.metrics.register_collector(cluster.collector());
        self.cluster = Some(cluster);
        self
    }

    /// Adds SPF lookups (the `spf` client identity) and their metrics.
    pub fn with_spf(mut self, spf: Arc<crate::spf::Spf>) -> Self {
        let path = Arc::new(SpfPath::new(spf));
        self.metrics
            .register_collector(Box::new(spf::SpfCollector(path.clone())));
        self.spf = Some(path);
        self
    }

    /// What `GET /status` answers: the table's counts and digest, and the cluster as seen
    /// from here. Walks the whole table for the digest (~50 ms at 10 M records).
    pub fn status(&self) -> Status {
        let now = self.engine.now();
        let d = self.engine.digest(now);
        Status {
            version: env!("CARGO_PKG_VERSION"),
            uptime_seconds: self.started.elapsed().as_secs(),
            node_id: self.cluster.as_ref().map(|c| c.status().node_id),
            table: TableStatus {
                triplets: d.triplets,
                whitelisted: d.whitelisted,
                clients: d.clients,
                digest: d.to_string(),
            },
            cluster: self.cluster.as_ref().map(|c| c.status()),
        }
    }

    /// Counts and (rate-limited) logs a client outside the allow list.
    fn refuse(&self, peer: SocketAddr, proto: &'static str) {
        self.metrics.refused.inc();
        if self
            .refused_log
            .ready(self.started, Duration::from_secs(10))
        {
            warn!(%peer, proto, "refused a client outside the allow list (further refusals are logged at most every 10 s; see greyhound_refused_clients_total)");
        }
    }

    /// Logs a closed-for-cause connection, rate-limited.
    fn log_bad(&self, peer: &str, proto: &'static str, code: &'static str) {
        if self.error_log.ready(self.started, Duration::from_secs(10)) {
            warn!(%peer, proto, error = code, "malformed request; connection closed (further ones are logged at most every 10 s)");
        } else {
            debug!(%peer, proto, error = code, "malformed request; connection closed");
        }
    }
}

/// The answer of `GET /status` (JSON).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    /// Greyhound's version.
    pub version: &'static str,
    /// Seconds since the server started.
    pub uptime_seconds: u64,
    /// This node's id in its cluster (`null` on a single node).
    pub node_id: Option<String>,
    /// The live table.
    pub table: TableStatus,
    /// Replication (`null` on a single node).
    pub cluster: Option<ClusterStatus>,
}

/// The live table in [`Status`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct TableStatus {
    /// Live triplet records.
    pub triplets: u64,
    /// Of those, whitelisted.
    pub whitelisted: u64,
    /// Live auto-whitelist records.
    pub clients: u64,
    /// Equal on two nodes iff they hold the same live records ([`crate::engine::Digest`]).
    pub digest: String,
}

/// Runs every listener until `shutdown` is cancelled, then stops accepting, lets connections
/// answer what they have already read, and returns within `grace` even if some connections
/// stay open (Postfix keeps idle policy connections for minutes).
pub async fn run(
    listeners: Listeners,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    grace: Duration,
) -> io::Result<()> {
    let mut tasks = JoinSet::new();
    tasks.spawn(conn::accept_loop(
        TcpListener::from_std(listeners.native_tcp)?,
        shared.clone(),
        shutdown.clone(),
        Proto::NativeTcp,
    ));
    let unix_path = match listeners.policy {
        PolicyListener::Tcp(l) => {
            tasks.spawn(conn::accept_loop(
                TcpListener::from_std(l)?,
                shared.clone(),
                shutdown.clone(),
                Proto::Policy,
            ));
            None
        }
        PolicyListener::Unix(l, file) => {
            tasks.spawn(conn::accept_loop(
                UnixListener::from_std(l)?,
                shared.clone(),
                shutdown.clone(),
                Proto::Policy,
            ));
            Some(file)
        }
    };
    tasks.spawn(http::serve(
        TcpListener::from_std(listeners.metrics)?,
        shared.clone(),
        shutdown.clone(),
    ));

    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for (n, sock) in listeners.native_udp.into_iter().enumerate() {
        let (shared, stop) = (shared.clone(), stop.clone());
        // UDP threads hand datagrams that wait for SPF lookups to the runtime.
        let rt = tokio::runtime::Handle::current();
        threads.push(
            std::thread::Builder::new()
                .name(format!("udp-{n}"))
                .spawn(move || native_udp::worker(sock, &shared, &stop, &rt))?,
        );
    }
    {
        let (shared, stop) = (shared.clone(), stop.clone());
        threads.push(
            std::thread::Builder::new()
                .name("expiry".into())
                .spawn(move || expiry_loop(&shared, &stop))?,
        );
    }

    shutdown.cancelled().await;
    stop.store(true, Ordering::Relaxed);
    let deadline = tokio::time::sleep(grace);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            next = tasks.join_next() => if next.is_none() { break },
            _ = &mut deadline => {
                debug!("grace period over; closing the remaining connections");
                tasks.abort_all();
                break;
            }
        }
    }
    for t in threads {
        let _ = t.join();
    }
    if let Some(file) = unix_path {
        file.remove_if_ours();
    }
    Ok(())
}

/// Expires records once a second, in small steps (see `Engine::expire`), and logs what the
/// table limits did (at most every 10 s).
fn expiry_loop(shared: &Shared, stop: &AtomicBool) {
    let mut limits = LimitLog::default();
    while !stop.load(Ordering::Relaxed) {
        let stats = shared.engine.expire(shared.engine.now());
        if stats.removed > 0 {
            shared.metrics.expired.inc_by(stats.removed as u64);
        }
        limits.log(&shared.engine.stats());
        for _ in 0..10 {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// What `--max-triplets` and `--max-new-per-client` did since the last line about them.
#[derive(Default)]
struct LimitLog {
    /// Counts as of the last line: evicted greylisted, evicted whitelisted, refused.
    logged: (u64, u64, u64),
    at: Option<Instant>,
}

impl LimitLog {
    /// Logs the counts that grew since the last line, at most every 10 s.
    fn log(&mut self, s: &crate::engine::EngineStats) {
        let now = (s.evicted_greylisted, s.evicted_whitelisted, s.new_refused);
        if now == self.logged
            || self
                .at
                .is_some_and(|t| t.elapsed() < Duration::from_secs(10))
        {
            return;
        }
        let (g, w, r) = (
            now.0 - self.logged.0,
            now.1 - self.logged.1,
            now.2 - self.logged.2,
        );
        if g + w > 0 {
            warn!(
                evicted_greylisted = g,
                evicted_whitelisted = w,
                triplets = s.triplets,
                "max-triplets reached: records evicted to make room for new triplets (counts since the previous such line; logged at most every 10 s, see greyhound_evicted_total)"
            );
        }
        if r > 0 {
            warn!(
                refused = r,
                "max-new-per-client reached: new triplets deferred without being recorded (count since the previous such line; logged at most every 10 s, see greyhound_new_refused_total)"
            );
        }
        self.logged = now;
        self.at = Some(Instant::now());
    }
}

/// Announces the listeners once everything is up (tests and scripts wait for this line).
pub fn announce(listeners: &Listeners) {
    info!(target: "greyhound", "ready {}", listeners.describe());
}
