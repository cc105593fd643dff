//! Prometheus metrics, served as text on the metrics port.
//!
//! Every counter handle is created once at start. The request path never formats a string
//! or looks up a label set: connection loops count into a local [`Tally`] while answering a
//! batch and add it to the shared counters once per batch, so a burst of 1,000 pipelined
//! requests costs a dozen atomic additions, not thousands on shared cache lines.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use crate::engine::{Decision, Engine, ExemptList, Pass};

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

const PROTOS: [&str; 3] = ["native-tcp", "native-udp", "policy"];

/// Decision kinds, in the order of [`Tally::decisions`].
const KINDS: [(&str, &str); 11] = [
    ("defer", ""),
    ("pass", "retried"),
    ("pass", "known"),
    ("pass", "awl"),
    ("pass", "exempt:client"),
    ("pass", "exempt:client-name"),
    ("pass", "exempt:sender"),
    ("pass", "exempt:recipient"),
    ("pass", "auth"),
    ("pass", "dry-run"),
    ("dunno", "not-rcpt"),
];

/// Index in [`KINDS`] of a policy request answered DUNNO outside the RCPT stage.
pub const KIND_NOT_RCPT: usize = 10;

fn kind_of(d: &Decision) -> usize {
    match d {
        Decision::Defer { .. } => 0,
        Decision::Pass(p) => match p {
            Pass::Retried { .. } => 1,
            Pass::Known => 2,
            Pass::Awl => 3,
            Pass::Exempt(ExemptList::Client) => 4,
            Pass::Exempt(ExemptList::ClientName) => 5,
            Pass::Exempt(ExemptList::Sender) => 6,
            Pass::Exempt(ExemptList::Recipient) => 7,
            Pass::Auth => 8,
            Pass::DryRun { .. } => 9,
        },
    }
}

/// Protocol error kinds counted, by their wire/log code.
pub const ERROR_CODES: [&str; 16] = [
    "too-long",
    "bad-utf8",
    "control-char",
    "empty",
    "unknown-verb",
    "bad-args",
    "bad-id",
    "bad-ip",
    "bad-address",
    "bad-option",
    "block-too-large",
    "too-many-attributes",
    "bad-line",
    "not-policy-request",
    "policy-bad-client-address",
    "udp-truncated",
];

/// Index of an error code in [`ERROR_CODES`] (every code the codecs produce is listed, which a
/// test checks; an unknown one would count as the last entry).
pub fn error_index(code: &str) -> usize {
    ERROR_CODES
        .iter()
        .position(|c| *c == code)
        .unwrap_or(ERROR_CODES.len() - 1)
}

/// Counts gathered while answering one batch, added to [`Metrics`] in one go.
#[derive(Debug, Default)]
pub struct Tally {
    decisions: [u64; KINDS.len()],
    requests: u64,
    errors: [u64; ERROR_CODES.len()],
}

impl Tally {
    /// Counts one decision.
    #[inline]
    pub fn decision(&mut self, d: &Decision) {
        self.decisions[kind_of(d)] += 1;
        self.requests += 1;
    }

    /// Counts one request answered without a decision (PING, DUNNO outside RCPT).
    #[inline]
    pub fn request(&mut self, kind: Option<usize>) {
        if let Some(k) = kind {
            self.decisions[k] += 1;
        }
        self.requests += 1;
    }

    /// Counts one protocol error by code.
    #[inline]
    pub fn error(&mut self, code: &str) {
        self.errors[error_index(code)] += 1;
        self.requests += 1;
    }
}

/// Label set of a decision counter.
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

/// All counters and gauges.
pub struct Metrics {
    registry: Registry,
    decisions: Vec<Counter>,
    requests: Vec<Counter>,
    errors: Vec<Vec<Counter>>,
    /// Connections accepted, by protocol.
    pub connections: Vec<Counter>,
    /// Connections open now.
    pub open_connections: Gauge,
    /// Clients refused by the allow list (TCP connections and UDP datagrams).
    pub refused: Counter,
    /// Connections refused because `max-connections` was reached.
    pub over_limit: Counter,
    /// Records removed by expiry.
    pub expired: Counter,
    triplets: Family<StateLabels, Gauge>,
    awl_clients: Gauge,
    awl_active: Gauge,
    /// Snapshot writes and their outcome.
    pub snapshots: SnapshotMetrics,
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
        let decision_family = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "decisions",
            "Answers given, by answer and reason",
            decision_family.clone(),
        );
        let decisions = KINDS
            .iter()
            .map(|(answer, reason)| {
                decision_family
                    .get_or_create(&DecisionLabels { answer, reason })
                    .clone()
            })
            .collect();
        let request_family = Family::<ProtoLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests received, by protocol",
            request_family.clone(),
        );
        let requests = PROTOS
            .iter()
            .map(|proto| request_family.get_or_create(&ProtoLabels { proto }).clone())
            .collect();
        let error_family = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "protocol_errors",
            "Refused requests, by protocol and kind",
            error_family.clone(),
        );
        let errors = PROTOS
            .iter()
            .map(|proto| {
                ERROR_CODES
                    .iter()
                    .map(|kind| {
                        error_family
                            .get_or_create(&ErrorLabels { proto, kind })
                            .clone()
                    })
                    .collect()
            })
            .collect();
        let conn_family = Family::<ProtoLabels, Counter>::default();
        registry.register(
            "connections",
            "Connections accepted, by protocol",
            conn_family.clone(),
        );
        let connections = PROTOS
            .iter()
            .map(|proto| conn_family.get_or_create(&ProtoLabels { proto }).clone())
            .collect();
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
        let expired = Counter::default();
        registry.register(
            "expired_records",
            "Records removed by expiry",
            expired.clone(),
        );
        let triplets = Family::<StateLabels, Gauge>::default();
        registry.register(
            "triplets",
            "Live triplet records, by state",
            triplets.clone(),
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
        let snapshots = SnapshotMetrics::default();
        snapshots.register(&mut registry);
        Self {
            registry,
            snapshots,
            decisions,
            requests,
            errors,
            connections,
            open_connections,
            refused,
            over_limit,
            expired,
            triplets,
            awl_clients,
            awl_active,
        }
    }

    /// Adds a batch's tally and clears it.
    pub fn flush(&self, proto: Proto, tally: &mut Tally) {
        if tally.requests == 0 {
            return;
        }
        for (c, n) in self.decisions.iter().zip(tally.decisions.iter_mut()) {
            if *n > 0 {
                c.inc_by(*n);
                *n = 0;
            }
        }
        for (c, n) in self.errors[proto as usize]
            .iter()
            .zip(tally.errors.iter_mut())
        {
            if *n > 0 {
                c.inc_by(*n);
                *n = 0;
            }
        }
        self.requests[proto as usize].inc_by(tally.requests);
        tally.requests = 0;
    }

    /// The Prometheus text exposition, with table gauges read from the engine now.
    pub fn render(&self, engine: &Engine) -> String {
        let s = engine.stats();
        self.triplets
            .get_or_create(&StateLabels {
                state: "greylisted",
            })
            .set((s.triplets - s.whitelisted) as i64);
        self.triplets
            .get_or_create(&StateLabels {
                state: "whitelisted",
            })
            .set(s.whitelisted as i64);
        self.awl_clients.set(s.awl_clients as i64);
        self.awl_active.set(s.awl_active as i64);
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tally_flushes_into_labelled_counters() {
        let m = Metrics::new();
        let mut t = Tally::default();
        t.decision(&Decision::Defer { seconds_left: 3 });
        t.decision(&Decision::Defer { seconds_left: 3 });
        t.decision(&Decision::Pass(Pass::Exempt(ExemptList::Sender)));
        t.error("bad-ip");
        m.flush(Proto::NativeTcp, &mut t);
        m.flush(Proto::NativeTcp, &mut t); // a flushed tally adds nothing
        let text = {
            let mut out = String::new();
            encode(&mut out, &m.registry).unwrap();
            out
        };
        assert!(
            text.contains("greyhound_decisions_total{answer=\"defer\",reason=\"\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("greyhound_decisions_total{answer=\"pass\",reason=\"exempt:sender\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("greyhound_requests_total{proto=\"native-tcp\"} 4"),
            "{text}"
        );
        assert!(
            text.contains(
                "greyhound_protocol_errors_total{proto=\"native-tcp\",kind=\"bad-ip\"} 1"
            ),
            "{text}"
        );
    }

    #[test]
    fn every_native_and_policy_error_code_is_known() {
        use crate::proto::{native, policy};
        for k in native::ErrorKind::ALL {
            assert_eq!(ERROR_CODES[error_index(k.as_code())], k.as_code());
        }
        for k in policy::PolicyError::ALL {
            assert_eq!(ERROR_CODES[error_index(k.as_code())], k.as_code());
        }
    }
}
