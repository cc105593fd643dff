//! Prometheus metrics, served as OpenMetrics text on the metrics port.
//!
//! Every counter is created once at start, and the request path never formats a string or
//! looks up a label set. Connection loops count into a local [`Tally`] while answering a batch
//! and add it once per batch to the counters of their thread's shard: on the policy port a
//! batch is one request, and one set of counters shared by every thread would bounce its
//! cache lines between the cores on every request. A scrape sums the shards.
//!
//! Labelled series are written by [`Counts`] (a `prometheus_client` collector) in a fixed
//! order, and only the label pairs that can occur: a native error kind on the native ports, a
//! policy error on the policy port, `udp-truncated` on UDP only.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;

use crate::engine::{Decision, Engine, ExemptList, Pass};
use crate::proto::native::ErrorKind;
use crate::proto::policy::PolicyError;

/// Protocols requests arrive on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// Native line protocol over TCP.
    NativeTcp = 0,
    /// Native line protocol over UDP.
    NativeUdp = 1,
    /// Postfix policy protocol (TCP or Unix socket).
    Policy = 2,
}

impl Proto {
    /// Every protocol, in the order of their label values.
    pub const ALL: [Proto; 3] = [Proto::NativeTcp, Proto::NativeUdp, Proto::Policy];

    /// The `proto` label value.
    pub const fn label(self) -> &'static str {
        match self {
            Proto::NativeTcp => "native-tcp",
            Proto::NativeUdp => "native-udp",
            Proto::Policy => "policy",
        }
    }
}

/// The stream listeners, each with a connection cap (`max-connections`) of its own, so that
/// clients of one port cannot lock out those of another (UDP has no connections).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    /// Native protocol, TCP.
    Native = 0,
    /// Postfix policy protocol (TCP or Unix socket).
    Policy = 1,
    /// Metrics HTTP.
    Metrics = 2,
}

impl Port {
    /// Every listener, in the order of their label values.
    pub const ALL: [Port; 3] = [Port::Native, Port::Policy, Port::Metrics];

    /// The `listener` label value.
    pub const fn label(self) -> &'static str {
        match self {
            Port::Native => "native",
            Port::Policy => "policy",
            Port::Metrics => "metrics",
        }
    }

    /// The listener a stream protocol is served on.
    pub const fn of(proto: Proto) -> Port {
        match proto {
            Proto::NativeTcp | Proto::NativeUdp => Port::Native,
            Proto::Policy => Port::Policy,
        }
    }
}

/// Per-listener counters of what did not become a served connection.
#[derive(Debug, Default)]
pub struct PortCounts {
    refused: [AtomicU64; 3],
    accept_errors: [AtomicU64; 3],
}

impl PortCounts {
    /// Counts a connection closed at once because its listener's cap was reached.
    pub fn refused(&self, port: Port) {
        self.refused[port as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a failed `accept` (out of descriptors, out of memory, ...).
    pub fn accept_error(&self, port: Port) {
        self.accept_errors[port as usize].fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct PortLabels {
    listener: &'static str,
}

impl Collector for PortCounts {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for (name, help, values) in [
            (
                "connections_refused",
                "Connections closed at once because their listener's max-connections was reached, by listener.",
                &self.refused,
            ),
            (
                "accept_errors",
                "Failed accepts (out of file descriptors and the like; such clients are closed at once), by listener.",
                &self.accept_errors,
            ),
        ] {
            let mut m = encoder.encode_descriptor(
                name,
                help,
                None,
                ConstCounter::new(0u64).metric_type(),
            )?;
            for (port, v) in Port::ALL.iter().zip(values) {
                ConstCounter::new(v.load(Ordering::Relaxed)).encode(
                    m.encode_family(&PortLabels {
                        listener: port.label(),
                    })?,
                )?;
            }
        }
        Ok(())
    }
}

/// What a request was answered with, for `greyhound_decisions_total{answer,reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// A CHECK or a Postfix RCPT request was decided.
    Decided(Decision),
    /// A Postfix request outside the RCPT stage, answered DUNNO.
    NotRcpt,
}

/// Decision kinds as (answer, reason) label values, in the order [`Answer`] indexes them.
const KINDS: [(&str, &str); 13] = [
    ("defer", ""),
    ("pass", "retried"),
    ("pass", "known"),
    ("pass", "awl"),
    ("pass", "exempt:client"),
    ("pass", "exempt:client-name"),
    ("pass", "exempt:sender"),
    ("pass", "exempt:recipient"),
    ("pass", "auth"),
    ("pass", "tls"),
    ("pass", "dry-run"),
    ("dunno", "not-rcpt"),
    ("pass", "domain-off"),
];

impl Answer {
    const fn index(self) -> usize {
        match self {
            Answer::Decided(Decision::Defer { .. }) => 0,
            Answer::Decided(Decision::Pass(p)) => match p {
                Pass::Retried { .. } => 1,
                Pass::Known => 2,
                Pass::Awl => 3,
                Pass::Exempt(ExemptList::Client) => 4,
                Pass::Exempt(ExemptList::ClientName) => 5,
                Pass::Exempt(ExemptList::Sender) => 6,
                Pass::Exempt(ExemptList::Recipient) => 7,
                Pass::Auth => 8,
                Pass::Tls => 9,
                Pass::DryRun { .. } => 10,
                Pass::DomainOff => 12,
            },
            Answer::NotRcpt => 11,
        }
    }
}

/// A refused request, by kind. Which kinds a protocol can produce is fixed by its type: the
/// native codec's [`ErrorKind`]s on both native transports, a truncated datagram on UDP only,
/// the policy codec's [`PolicyError`]s and an unparsable `client_address` on the policy port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestError {
    /// A native line refused by the codec (answered `ERR`).
    Native(ErrorKind),
    /// A UDP datagram larger than `udp-max-datagram` (dropped unanswered).
    UdpTruncated,
    /// A malformed policy block (connection closed without a reply).
    Policy(PolicyError),
    /// A policy RCPT request whose `client_address` is not an IP address (connection closed).
    PolicyBadClientAddress,
}

impl RequestError {
    /// The `kind` label value.
    pub const fn code(self) -> &'static str {
        match self {
            RequestError::Native(k) => k.as_code(),
            RequestError::UdpTruncated => "udp-truncated",
            RequestError::Policy(e) => e.as_code(),
            RequestError::PolicyBadClientAddress => "policy-bad-client-address",
        }
    }

    /// Every kind `proto` can produce, in export order.
    fn of(proto: Proto) -> Vec<RequestError> {
        let native = ErrorKind::ALL.into_iter().map(RequestError::Native);
        match proto {
            Proto::NativeTcp => native.collect(),
            Proto::NativeUdp => native.chain([RequestError::UdpTruncated]).collect(),
            Proto::Policy => PolicyError::ALL
                .into_iter()
                .map(RequestError::Policy)
                .chain([RequestError::PolicyBadClientAddress])
                .collect(),
        }
    }

    /// Index among the (protocol, kind) pairs that can occur; `None` for a pair that cannot.
    const fn slot(self, proto: Proto) -> Option<usize> {
        const N: usize = ErrorKind::ALL.len();
        const P: usize = PolicyError::ALL.len();
        match (proto, self) {
            (Proto::NativeTcp, RequestError::Native(k)) => Some(k as usize),
            (Proto::NativeUdp, RequestError::Native(k)) => Some(N + k as usize),
            (Proto::NativeUdp, RequestError::UdpTruncated) => Some(2 * N),
            (Proto::Policy, RequestError::Policy(e)) => Some(2 * N + 1 + e as usize),
            (Proto::Policy, RequestError::PolicyBadClientAddress) => Some(2 * N + 1 + P),
            _ => None,
        }
    }
}

/// Number of (protocol, error kind) pairs that can occur.
const ERROR_SLOTS: usize = 2 * ErrorKind::ALL.len() + 1 + PolicyError::ALL.len() + 1;

/// Counts gathered while answering one batch on one protocol, added to [`Metrics`] in one go.
#[derive(Debug)]
pub struct Tally {
    proto: Proto,
    decisions: [u64; KINDS.len()],
    peeks: u64,
    requests: u64,
    errors: [u64; ERROR_SLOTS],
    /// Whether `errors` holds anything.
    errored: bool,
    udp_dropped: u64,
}

impl Tally {
    /// An empty tally for requests on `proto`.
    pub fn new(proto: Proto) -> Self {
        Self {
            proto,
            decisions: [0; KINDS.len()],
            peeks: 0,
            requests: 0,
            errors: [0; ERROR_SLOTS],
            errored: false,
            udp_dropped: 0,
        }
    }

    /// Counts one answered request (a CHECK decision, or DUNNO outside RCPT).
    #[inline]
    pub fn answer(&mut self, a: Answer) {
        self.decisions[a.index()] += 1;
        self.requests += 1;
    }

    /// Counts one PEEK: a request, but no decision (nothing was recorded).
    #[inline]
    pub fn peek(&mut self) {
        self.peeks += 1;
        self.requests += 1;
    }

    /// Counts one request answered without a decision (PING).
    #[inline]
    pub fn other(&mut self) {
        self.requests += 1;
    }

    /// Counts one refused request.
    #[inline]
    pub fn error(&mut self, e: RequestError) {
        match e.slot(self.proto) {
            Some(i) => {
                self.errors[i] += 1;
                self.errored = true;
            }
            None => debug_assert!(false, "{e:?} cannot occur on {:?}", self.proto),
        }
        self.requests += 1;
    }

    /// Counts UDP replies left out because they did not fit their request's size.
    #[inline]
    pub fn udp_dropped(&mut self, n: usize) {
        self.udp_dropped += n as u64;
    }
}

/// One thread's counters, on cache lines of their own.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard {
    requests: [AtomicU64; 3],
    decisions: [AtomicU64; KINDS.len()],
    peeks: AtomicU64,
    errors: [AtomicU64; ERROR_SLOTS],
    udp_dropped: AtomicU64,
}

/// Shards of the request counters; a thread keeps the one it was first given. More shards
/// than threads that count (runtime workers and UDP threads, one per core each) would only
/// make scrapes slower; fewer would share a shard between two threads, which is correct.
const SHARDS: usize = 16;

fn my_shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static MINE: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    MINE.with(|m| *m)
}

fn add(c: &AtomicU64, n: &mut u64) {
    if *n > 0 {
        c.fetch_add(*n, Ordering::Relaxed);
        *n = 0;
    }
}

fn sum(shards: &[Shard], f: impl Fn(&Shard) -> &AtomicU64) -> u64 {
    shards.iter().map(|s| f(s).load(Ordering::Relaxed)).sum()
}

/// The labelled counters and gauges, written in a fixed order at each scrape.
#[derive(Debug)]
pub struct Counts {
    shards: Box<[Shard]>,
    /// Connections accepted, by protocol.
    connections: [Counter; 3],
    /// Live triplets (greylisted, whitelisted), read from the engine just before a scrape.
    triplets: [Gauge; 2],
}

impl Counts {
    fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            connections: Default::default(),
            triplets: Default::default(),
        }
    }

    fn flush(&self, t: &mut Tally) {
        let s = &self.shards[my_shard()];
        for (c, n) in s.decisions.iter().zip(t.decisions.iter_mut()) {
            add(c, n);
        }
        // Refused requests are rare: their 28 counters are walked only when there are some.
        if t.errored {
            t.errored = false;
            for (c, n) in s.errors.iter().zip(t.errors.iter_mut()) {
                add(c, n);
            }
        }
        add(&s.peeks, &mut t.peeks);
        add(&s.udp_dropped, &mut t.udp_dropped);
        add(&s.requests[t.proto as usize], &mut t.requests);
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct DecisionLabels {
    answer: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct ProtoLabels {
    proto: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct ErrorLabels {
    proto: &'static str,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

impl Collector for Counts {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let shards = &self.shards[..];
        let counter = |n: u64| ConstCounter::new(n);
        {
            let mut m = encoder.encode_descriptor(
                "decisions",
                "Answers given (CHECK and Postfix requests; PEEKs are counted apart), by answer and reason.",
                None,
                counter(0).metric_type(),
            )?;
            for (i, &(answer, reason)) in KINDS.iter().enumerate() {
                let n = sum(shards, |s| &s.decisions[i]);
                counter(n).encode(m.encode_family(&DecisionLabels { answer, reason })?)?;
            }
        }
        let peeks = counter(sum(shards, |s| &s.peeks));
        peeks.encode(encoder.encode_descriptor(
            "peeks",
            "PEEK requests answered (decided without recording).",
            None,
            peeks.metric_type(),
        )?)?;
        {
            let mut m = encoder.encode_descriptor(
                "requests",
                "Requests received, by protocol.",
                None,
                counter(0).metric_type(),
            )?;
            for p in Proto::ALL {
                let n = sum(shards, |s| &s.requests[p as usize]);
                counter(n).encode(m.encode_family(&ProtoLabels { proto: p.label() })?)?;
            }
        }
        {
            let mut m = encoder.encode_descriptor(
                "protocol_errors",
                "Refused requests, by protocol and kind.",
                None,
                counter(0).metric_type(),
            )?;
            for p in Proto::ALL {
                for e in RequestError::of(p) {
                    // `of` lists only pairs that have a slot.
                    let i = e.slot(p).unwrap_or(0);
                    let n = sum(shards, |s| &s.errors[i]);
                    let labels = ErrorLabels {
                        proto: p.label(),
                        kind: e.code(),
                    };
                    counter(n).encode(m.encode_family(&labels)?)?;
                }
            }
        }
        let dropped = counter(sum(shards, |s| &s.udp_dropped));
        dropped.encode(encoder.encode_descriptor(
            "udp_replies_dropped",
            "UDP replies left out because they would have made the reply datagram larger than its request.",
            None,
            dropped.metric_type(),
        )?)?;
        {
            let mut m = encoder.encode_descriptor(
                "connections",
                "Connections accepted, by protocol.",
                None,
                counter(0).metric_type(),
            )?;
            // UDP has no connections.
            for p in [Proto::NativeTcp, Proto::Policy] {
                let n = self.connections[p as usize].get();
                counter(n).encode(m.encode_family(&ProtoLabels { proto: p.label() })?)?;
            }
        }
        {
            let g = ConstGauge::new(0i64);
            let mut m = encoder.encode_descriptor(
                "triplets",
                "Live triplet records, by state.",
                None,
                g.metric_type(),
            )?;
            for (state, gauge) in ["greylisted", "whitelisted"].iter().zip(&self.triplets) {
                ConstGauge::new(gauge.get()).encode(m.encode_family(&StateLabels { state })?)?;
            }
        }
        Ok(())
    }
}

/// All counters and gauges.
pub struct Metrics {
    registry: Registry,
    counts: Arc<Counts>,
    /// Connections open now on the native and policy ports (a scrape does not count itself).
    pub open_connections: Gauge,
    /// Clients refused by the allow list (TCP connections and UDP datagrams).
    pub refused: Counter,
    /// Connections refused because their listener's `max-connections` was reached, over all
    /// listeners (`ports` has them by listener).
    pub over_limit: Counter,
    /// Refused connections and accept errors, by listener.
    pub ports: Arc<PortCounts>,
    /// Records removed by expiry.
    pub expired: Counter,
    awl_clients: Gauge,
    awl_active: Gauge,
    greytraps: Arc<GreytrapCounts>,
    limits: Arc<LimitCounts>,
    /// Snapshot writes and their outcome.
    pub snapshots: SnapshotMetrics,
}

/// The engine's greytrap figures as of the last scrape.
#[derive(Debug, Default)]
struct GreytrapCounts {
    hits: AtomicU64,
    deferrals: AtomicU64,
    trapped: AtomicU64,
}

impl Collector for GreytrapCounts {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let hits = ConstCounter::new(self.hits.load(Ordering::Relaxed));
        hits.encode(encoder.encode_descriptor(
            "greytrap_hits",
            "Requests to a greytrap address (each trapped its client).",
            None,
            hits.metric_type(),
        )?)?;
        let deferrals = ConstCounter::new(self.deferrals.load(Ordering::Relaxed));
        deferrals.encode(encoder.encode_descriptor(
            "greytrap_deferrals",
            "Requests deferred because their client was trapped by a greytrap.",
            None,
            deferrals.metric_type(),
        )?)?;
        let trapped = ConstGauge::new(self.trapped.load(Ordering::Relaxed) as i64);
        trapped.encode(encoder.encode_descriptor(
            "trapped_clients",
            "Client networks trapped by a greytrap now.",
            None,
            trapped.metric_type(),
        )?)?;
        Ok(())
    }
}

/// The engine's limit counters (`--max-triplets`, `--max-new-per-client`) as of the last
/// scrape.
#[derive(Debug, Default)]
struct LimitCounts {
    evicted: [AtomicU64; 2],
    new_refused: AtomicU64,
}

impl Collector for LimitCounts {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut m = encoder.encode_descriptor(
            "evicted",
            "Triplet records evicted to stay within max-triplets, by state (whitelisted ones only when nothing else was left).",
            None,
            ConstCounter::new(0u64).metric_type(),
        )?;
        for (state, v) in ["greylisted", "whitelisted"].into_iter().zip(&self.evicted) {
            ConstCounter::new(v.load(Ordering::Relaxed))
                .encode(m.encode_family(&StateLabels { state })?)?;
        }
        let refused = ConstCounter::new(self.new_refused.load(Ordering::Relaxed));
        refused.encode(encoder.encode_descriptor(
            "new_refused",
            "New triplets deferred without being recorded because their client was over max-new-per-client.",
            None,
            refused.metric_type(),
        )?)?;
        Ok(())
    }
}

/// What the snapshot writer and loader did.
#[derive(Debug, Default)]
pub struct SnapshotMetrics {
    /// Snapshots written.
    pub written: Counter,
    /// Snapshot writes that failed (each is also logged).
    pub failures: Counter,
    /// Unix time the last successful snapshot was started (its records are as of then).
    pub last_time: Gauge,
    /// Seconds the last successful write took, fsyncs included.
    pub last_duration: Gauge<f64, AtomicU64>,
    /// Size of the last snapshot file.
    pub last_bytes: Gauge,
    /// Triplet records in the last snapshot.
    pub last_triplets: Gauge,
    /// Auto-whitelist records in the last snapshot.
    pub last_clients: Gauge,
    /// Longest a shard lock was held while the last snapshot copied it.
    pub last_longest_hold: Gauge<f64, AtomicU64>,
    /// Triplet records loaded from a snapshot at start.
    pub loaded_triplets: Gauge,
}

impl SnapshotMetrics {
    fn register(&self, r: &mut Registry) {
        r.register(
            "snapshots_written",
            "Snapshots written",
            self.written.clone(),
        );
        r.register(
            "snapshot_failures",
            "Snapshot writes that failed (see the log)",
            self.failures.clone(),
        );
        r.register(
            "snapshot_last_time_seconds",
            "Unix time of the last successful snapshot",
            self.last_time.clone(),
        );
        r.register(
            "snapshot_last_duration_seconds",
            "Time the last successful snapshot write took, fsyncs included",
            self.last_duration.clone(),
        );
        r.register(
            "snapshot_last_size_bytes",
            "Size of the last snapshot file",
            self.last_bytes.clone(),
        );
        r.register(
            "snapshot_last_triplets",
            "Triplet records in the last snapshot",
            self.last_triplets.clone(),
        );
        r.register(
            "snapshot_last_clients",
            "Auto-whitelist records in the last snapshot",
            self.last_clients.clone(),
        );
        r.register(
            "snapshot_last_longest_lock_hold_seconds",
            "Longest a shard lock was held while the last snapshot copied it",
            self.last_longest_hold.clone(),
        );
        r.register(
            "snapshot_loaded_triplets",
            "Triplet records loaded from a snapshot at start",
            self.loaded_triplets.clone(),
        );
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("greyhound");
        let counts = Arc::new(Counts::new());
        registry.register_collector(Box::new(counts.clone()));
        let open_connections = Gauge::default();
        registry.register(
            "open_connections",
            "Connections open now",
            open_connections.clone(),
        );
        let refused = Counter::default();
        registry.register(
            "refused_clients",
            "Clients outside the allow list (connections and datagrams)",
            refused.clone(),
        );
        let over_limit = Counter::default();
        registry.register(
            "over_limit_connections",
            "Connections closed because max-connections was reached",
            over_limit.clone(),
        );
        let ports = Arc::new(PortCounts::default());
        registry.register_collector(Box::new(ports.clone()));
        let expired = Counter::default();
        registry.register(
            "expired_records",
            "Records removed by expiry",
            expired.clone(),
        );
        let awl_clients = Gauge::default();
        registry.register(
            "awl_clients",
            "Client records in the auto-whitelist table",
            awl_clients.clone(),
        );
        let awl_active = Gauge::default();
        registry.register(
            "awl_active_clients",
            "Clients currently auto-whitelisted",
            awl_active.clone(),
        );
        let greytraps = Arc::new(GreytrapCounts::default());
        registry.register_collector(Box::new(greytraps.clone()));
        let limits = Arc::new(LimitCounts::default());
        registry.register_collector(Box::new(limits.clone()));
        let snapshots = SnapshotMetrics::default();
        snapshots.register(&mut registry);
        Self {
            registry,
            counts,
            open_connections,
            refused,
            over_limit,
            ports,
            expired,
            awl_clients,
            awl_active,
            greytraps,
            limits,
            snapshots,
        }
    }

    /// Adds a batch's tally to this thread's counters and clears it.
    #[inline]
    pub fn flush(&self, tally: &mut Tally) {
        if tally.requests > 0 || tally.udp_dropped > 0 {
            self.counts.flush(tally);
        }
    }

    /// Counts an accepted connection.
    pub fn connection(&self, proto: Proto) {
        self.counts.connections[proto as usize].inc();
    }

    /// Adds a collector of more series (the cluster's), rendered after the others.
    pub fn register_collector(
        &mut self,
        collector: Box<dyn prometheus_client::collector::Collector>,
    ) {
        self.registry.register_collector(collector);
    }

    /// The OpenMetrics text exposition, with table gauges read from the engine now.
    pub fn render(&self, engine: &Engine) -> String {
        let s = engine.stats();
        self.greytraps
            .hits
            .store(s.greytrap_hits, Ordering::Relaxed);
        self.greytraps
            .deferrals
            .store(s.greytrap_deferrals, Ordering::Relaxed);
        self.greytraps
            .trapped
            .store(s.trapped_clients as u64, Ordering::Relaxed);
        self.limits.evicted[0].store(s.evicted_greylisted, Ordering::Relaxed);
        self.limits.evicted[1].store(s.evicted_whitelisted, Ordering::Relaxed);
        self.limits
            .new_refused
            .store(s.new_refused, Ordering::Relaxed);
        self.counts.triplets[0].set((s.triplets - s.whitelisted) as i64);
        self.counts.triplets[1].set(s.whitelisted as i64);
        self.awl_clients.set(s.awl_clients as i64);
        self.awl_active.set(s.awl_active as i64);
        let mut out = String::with_capacity(8192);
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(m: &Metrics) -> String {
        let mut out = String::new();
        encode(&mut out, &m.registry).unwrap();
        out
    }

    #[test]
    fn tally_flushes_into_labelled_counters() {
        let m = Metrics::new();
        let mut t = Tally::new(Proto::NativeTcp);
        t.answer(Answer::Decided(Decision::Defer { seconds_left: 3 }));
        t.answer(Answer::Decided(Decision::Defer { seconds_left: 3 }));
        t.answer(Answer::Decided(Decision::Pass(Pass::Exempt(
            ExemptList::Sender,
        ))));
        t.peek();
        t.error(RequestError::Native(ErrorKind::BadIp));
        m.flush(&mut t);
        m.flush(&mut t); // a flushed tally adds nothing
                         // Another thread counts into another shard; a scrape sums them.
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut t = Tally::new(Proto::NativeTcp);
                t.answer(Answer::Decided(Decision::Defer { seconds_left: 1 }));
                m.flush(&mut t);
            });
        });
        let text = text(&m);
        for want in [
            "greyhound_decisions_total{answer=\"defer\",reason=\"\"} 3\n",
            "greyhound_decisions_total{answer=\"pass\",reason=\"exempt:sender\"} 1\n",
            "greyhound_peeks_total 1\n",
            "greyhound_requests_total{proto=\"native-tcp\"} 6\n",
            "greyhound_protocol_errors_total{proto=\"native-tcp\",kind=\"bad-ip\"} 1\n",
        ] {
            assert!(text.contains(want), "{want} missing from:\n{text}");
        }
    }

    #[test]
    fn only_error_pairs_that_can_occur_are_exported_in_a_fixed_order() {
        let m = Metrics::new();
        let a = text(&m);
        let series: Vec<&str> = a
            .lines()
            .filter(|l| l.starts_with("greyhound_protocol_errors_total{"))
            .collect();
        // 10 native kinds on TCP, the same and udp-truncated on UDP, 6 policy errors and
        // policy-bad-client-address on the policy port.
        assert_eq!(series.len(), 28, "{series:#?}");
        assert!(!a.contains("proto=\"native-tcp\",kind=\"udp-truncated\""));
        assert!(!a.contains("proto=\"policy\",kind=\"bad-ip\""));
        assert!(!a.contains("proto=\"native-udp\",kind=\"block-too-large\""));
        assert!(a.contains("proto=\"native-udp\",kind=\"udp-truncated\""));
        assert!(a.contains("proto=\"policy\",kind=\"policy-bad-client-address\""));
        // Every scrape lists the series in the same order.
        for _ in 0..5 {
            assert_eq!(text(&m), a);
        }
        // Each (protocol, kind) pair has a slot of its own.
        let mut slots: Vec<usize> = Proto::ALL
            .iter()
            .flat_map(|&p| {
                RequestError::of(p)
                    .into_iter()
                    .map(move |e| e.slot(p).unwrap())
            })
            .collect();
        slots.sort_unstable();
        assert_eq!(slots, (0..ERROR_SLOTS).collect::<Vec<_>>());
    }

    #[test]
    fn udp_truncation_counts_under_its_own_kind_and_dropped_replies_are_counted() {
        let m = Metrics::new();
        let mut t = Tally::new(Proto::NativeUdp);
        t.error(RequestError::UdpTruncated);
        t.error(RequestError::Native(ErrorKind::Empty));
        t.udp_dropped(2);
        m.flush(&mut t);
        let text = text(&m);
        for want in [
            "greyhound_protocol_errors_total{proto=\"native-udp\",kind=\"udp-truncated\"} 1\n",
            "greyhound_protocol_errors_total{proto=\"native-udp\",kind=\"empty\"} 1\n",
            "greyhound_protocol_errors_total{proto=\"native-tcp\",kind=\"empty\"} 0\n",
            "greyhound_udp_replies_dropped_total 2\n",
        ] {
            assert!(text.contains(want), "{want} missing from:\n{text}");
        }
    }
}
