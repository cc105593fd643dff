//! The load generator behind `run` and `ceiling`: a few threads (`--threads`; by default half
//! the cores, so the server keeps the other half), each driving its share of the connections
//! or UDP sockets through one epoll instance (mio), without an async runtime.
//!
//! Why this shape: the client shares the machine with the server, so every CPU cycle it spends
//! is one the server does not get. The previous client ran one blocking thread per connection;
//! with 64 policy connections that is 64 threads trading places on 2 cores, and against the
//! null policy responder it reached 124 k/s where a minimal client reached 231 k/s (issue 10).
//! Here a request costs its share of one `epoll_wait`, one `read` and one `write` (TCP), or of
//! one `recvmmsg` and one `sendmmsg` (UDP), and nothing is allocated per request: the
//! workload writes through reused scratch buffers, replies are read in place, latencies go to a
//! per-thread HDR histogram. `--minimal` runs [`crate::bare`], the reference client that sends
//! fixed bytes and only counts replies; `ceiling` measures both, so the report states how close
//! this client comes to it (docs/LOADTEST.md has the figures).
//!
//! Open loop (`--rate`): each connection has a fixed schedule of intended send times; a request
//! that cannot be sent on time (window full, server slow) is sent late and its latency still
//! counts from its intended time, so a stalled server cannot hide its stall by slowing the
//! client down (no coordinated omission). The thread sleeps on a `timerfd` until the next
//! send is due, because epoll's own timeout has only millisecond resolution. Closed loop: each
//! connection keeps its window full.

use std::collections::VecDeque;
use std::io::{ErrorKind, IsTerminal, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use greyhound::net::udp_batch::{bind_reuseport, BatchSocket};
use greyhound::proto::policy;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};

use crate::answer::{self, Answer, Tally};
use crate::cpu::{self, CpuUse, MachineStat};
use crate::outstanding::Outstanding;
use crate::report::NodeReport;
use crate::report::{Latency, RunReport};
use crate::workload::{
    Generator, Kind, KindCounts, KnownCache, RequestWriter, Sweep, Touched, WorkloadConfig,
};

/// The transport under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Proto {
    /// Native line protocol over TCP, pipelined.
    NativeTcp,
    /// Native line protocol over UDP, several requests per datagram, matched by ID.
    NativeUdp,
    /// Postfix policy delegation, one request in flight per connection.
    Policy,
}

impl Proto {
    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Proto::NativeTcp => "native-tcp",
            Proto::NativeUdp => "native-udp",
            Proto::Policy => "policy",
        }
    }
}

/// What one `run` does.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Where to send (node 0 of a cluster run).
    pub target: SocketAddr,
    /// The other nodes of a cluster run, 1, 2, …; empty against one server. Every worker
    /// opens a connection (socket) to each node, and sends each triplet's retries to another
    /// node than its first attempt (see [`Generator`]).
    pub cluster: Vec<SocketAddr>,
    /// How.
    pub proto: Proto,
    /// TCP connections, or UDP sockets; spread over the client's threads.
    pub connections: usize,
    /// Requests in flight per TCP connection; datagrams in flight per UDP socket. Ignored
    /// for `policy` (always one, as Postfix does).
    pub pipeline: usize,
    /// Requests per UDP datagram.
    pub per_datagram: usize,
    /// Stop sending after this long.
    pub duration: Option<Duration>,
    /// Stop after this many requests in all.
    pub requests: Option<u64>,
    /// Open loop at this many requests per second in all; `None` is closed loop (max).
    pub rate: Option<f64>,
    /// A request unanswered for this long is counted as a timeout.
    pub timeout: Duration,
    /// The request mix.
    pub workload: WorkloadConfig,
    /// Show a live progress line on stderr (only drawn on a terminal).
    pub progress: bool,
    /// Name of the run on the progress line.
    pub label: String,
    /// Before measuring, send the known pool twice, `server_delay` apart, so its triplets
    /// are whitelisted and "known" requests answer `PASS known` from the first second.
    pub warmup: bool,
    /// Client threads; 0 picks half the cores (at least one, at most one per connection).
    pub threads: usize,
    /// The known pool was whitelisted before this run (a warm-up ran): a known-pool request
    /// answered DEFER is then counted as wrongly deferred, like a late retry. Set by [`run`]
    /// when it warms up.
    pub known_whitelisted: bool,
    /// Run the minimal reference client ([`crate::bare`]) instead: fixed request bytes,
    /// replies counted, not read.
    pub minimal: bool,
}

impl RunConfig {
    /// A closed-loop run of `proto` against `target` with default settings.
    pub fn new(target: SocketAddr, proto: Proto) -> Self {
        Self {
            target,
            cluster: Vec::new(),
            proto,
            connections: 8,
            pipeline: 16,
            per_datagram: 1,
            duration: Some(Duration::from_secs(10)),
            requests: None,
            rate: None,
            timeout: Duration::from_secs(1),
            workload: WorkloadConfig::default(),
            progress: false,
            label: String::new(),
            warmup: false,
            threads: 0,
            known_whitelisted: false,
            minimal: false,
        }
    }

    /// Every target: [`RunConfig::target`], then [`RunConfig::cluster`].
    pub fn nodes(&self) -> Vec<SocketAddr> {
        std::iter::once(self.target)
            .chain(self.cluster.iter().copied())
            .collect()
    }

    /// The client threads this run uses.
    pub fn thread_count(&self) -> usize {
        let n = if self.threads == 0 {
            thread::available_parallelism().map_or(1, |n| n.get() / 2)
        } else {
            self.threads
        };
        n.clamp(1, self.connections.max(1))
    }

    /// Requests in flight per connection, as this transport allows.
    fn window(&self) -> usize {
        if self.proto == Proto::Policy {
            1
        } else {
            self.pipeline
        }
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.connections == 0 || self.connections > 4096 {
            bail!("--connections must be 1 to 4096");
        }
        if self.pipeline == 0 {
            bail!("--pipeline must be at least 1");
        }
        if self.per_datagram == 0 || self.per_datagram > 64 {
            bail!("--per-datagram must be 1 to 64");
        }
        if self.threads > 256 {
            bail!("--threads must be 0 (automatic) to 256");
        }
        if self.duration.is_none() && self.requests.is_none() {
            bail!("give --duration or --requests (or both): a run must be bounded");
        }
        if let Some(r) = self.rate {
            if !(r > 0.0 && r.is_finite()) {
                bail!("--rate must be a positive number of requests per second");
            }
        }
        if self.timeout.is_zero() {
            bail!("--timeout must be above 0");
        }
        let nodes = self.nodes();
        if nodes.len() > 64 {
            bail!("at most 64 targets");
        }
        for (i, a) in nodes.iter().enumerate() {
            if nodes[..i].contains(a) {
                bail!("--target {a} is given twice: each target must be another node");
            }
        }
        if nodes.len() > 1 && self.minimal {
            bail!("--minimal drives one target");
        }
        self.workload.validate().map_err(|e| anyhow::anyhow!(e))
    }
}

/// State all workers of a run share.
pub(crate) struct Shared {
    pub(crate) start: Instant,
    /// End of sending, when the run is bounded by time.
    deadline: Option<Instant>,
    pub(crate) stop: AtomicBool,
    /// Requests left to send, when the run is bounded by count: one budget for the run, or
    /// (a warm-up sweep) one per node.
    remaining: Option<Vec<AtomicU64>>,
    /// Live counters for the progress line.
    pub(crate) decisions: AtomicU64,
    pub(crate) failures: AtomicU64,
    /// Set during a warm-up: the pass over the known pool.
    sweep: Option<Arc<Sweep>>,
    /// Whether a request of each [`Kind`] (by its index) must pass: a retry after the delay
    /// always, a known-pool request when the pool was whitelisted before the run. A table,
    /// so the check is one load per request.
    must_pass: [bool; 4],
}

impl Shared {
    /// Takes up to `want` requests from the run's budget; 0 once the run is over.
    pub(crate) fn claim(&self, want: u64) -> u64 {
        self.claim_for(0, want)
    }

    /// Takes up to `want` requests to node `node` from the run's budget (the node's own in a
    /// warm-up sweep, else the run's); 0 once the run (or the node's share) is over.
    pub(crate) fn claim_for(&self, node: usize, want: u64) -> u64 {
        if self.stop.load(Ordering::Relaxed) {
            return 0;
        }
        let Some(budgets) = &self.remaining else {
            return want;
        };
        let Some(r) = budgets.get(node).or(budgets.first()) else {
            return 0;
        };
        let mut cur = r.load(Ordering::Relaxed);
        loop {
            let n = cur.min(want);
            if n == 0 {
                return 0;
            }
            match r.compare_exchange_weak(cur, cur - n, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return n,
                Err(c) => cur = c,
            }
        }
    }

    /// When the run stopped sending (the deadline, or now if it has not passed).
    pub(crate) fn stop_at(&self) -> Instant {
        let now = Instant::now();
        self.deadline.map_or(now, |d| d.min(now))
    }

    pub(crate) fn secs(&self, now: Instant) -> f64 {
        now.saturating_duration_since(self.start).as_secs_f64()
    }
}

/// A worker's fixed timetable of intended send times (open loop). Units are requests for
/// TCP and datagrams for UDP.
#[derive(Debug, Clone)]
struct Schedule {
    first: Instant,
    interval: f64,
    next: u64,
}

impl Schedule {
    fn new(start: Instant, per_sec: f64, workers: usize, worker: usize) -> Self {
        let interval = workers as f64 / per_sec;
        // Workers are staggered so the run's sends are evenly spread, not in bursts.
        let offset = interval * worker as f64 / workers as f64;
        Self {
            first: start + Duration::from_secs_f64(offset),
            interval,
            next: 0,
        }
    }

    fn at(&self, i: u64) -> Instant {
        self.first + Duration::from_secs_f64(self.interval * i as f64)
    }

    /// How many sends are due by `now`.
    fn due(&self, now: Instant) -> u64 {
        if now < self.first {
            return 0;
        }
        let passed = (now - self.first).as_secs_f64() / self.interval;
        (passed as u64 + 1).saturating_sub(self.next)
    }

    fn take(&mut self) -> Instant {
        let t = self.at(self.next);
        self.next += 1;
        t
    }

    fn next_at(&self) -> Instant {
        self.at(self.next)
    }
}

/// What one client thread measured.
pub(crate) struct WorkerOut {
    pub(crate) hist: Histogram<u64>,
    pub(crate) tally: Tally,
    pub(crate) kinds: KindCounts,
    pub(crate) sent: u64,
    /// CPU time the thread used.
    pub(crate) cpu: Duration,
    /// Per node (target) of the run; empty for the minimal client.
    pub(crate) nodes: Vec<NodeOut>,
}

/// What one client thread measured of one node (target).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct NodeOut {
    /// Requests sent to it.
    sent: u64,
    /// Decisions it answered.
    decisions: u64,
    /// Requests sent to it that must pass: retries sent at least the server's delay after
    /// their first attempt, and known-pool requests after a warm-up.
    late_retries: u64,
    /// Of those, answered DEFER.
    wrongly_deferred: u64,
}

impl NodeOut {
    fn add(&mut self, o: &NodeOut) {
        self.sent += o.sent;
        self.decisions += o.decisions;
        self.late_retries += o.late_retries;
        self.wrongly_deferred += o.wrongly_deferred;
    }
}

/// Latencies are kept in nanoseconds, 3 significant digits, up to an hour (larger values are
/// clamped to it, not dropped).
fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("valid histogram bounds")
}

impl WorkerOut {
    pub(crate) fn new() -> Self {
        Self {
            hist: new_hist(),
            tally: Tally::default(),
            kinds: KindCounts::default(),
            sent: 0,
            cpu: Duration::ZERO,
            nodes: Vec::new(),
        }
    }

    /// Records `n` decisions sent (or due) at `intended` and answered at `at`.
    #[inline]
    fn latency(&mut self, intended: Instant, at: Instant, n: u64) {
        let ns = at.saturating_duration_since(intended).as_nanos();
        self.hist
            .saturating_record_n(u64::try_from(ns).unwrap_or(u64::MAX).max(1), n);
    }

    /// A connection or socket that could not be opened or broke.
    pub(crate) fn failed(&mut self, sh: &Shared) {
        self.tally.connection_errors += 1;
        sh.failures.fetch_add(1, Ordering::Relaxed);
    }
}

/// Decisions answered together whose requests were sent (or due) together: one histogram
/// entry with a count rather than one per reply. Requests written in one batch share their
/// send time and are mostly answered in one read (closed loop, TCP pipeline 128: one record
/// per batch instead of 128).
#[derive(Default)]
struct SameSend(Option<(Instant, u64)>);

impl SameSend {
    /// One more decision sent at `intended`, answered at `at`.
    #[inline(always)]
    fn add(&mut self, out: &mut WorkerOut, intended: Instant, at: Instant) {
        match &mut self.0 {
            Some((t, n)) if *t == intended => *n += 1,
            _ => {
                if let Some((t, n)) = self.0.replace((intended, 1)) {
                    out.latency(t, at, n);
                }
            }
        }
    }

    /// Records what is pending, answered at `at`.
    fn flush(&mut self, out: &mut WorkerOut, at: Instant) {
        if let Some((t, n)) = self.0.take() {
            out.latency(t, at, n);
        }
    }
}

fn generator(cfg: &RunConfig, sh: &Shared, w: usize) -> Generator {
    match &sh.sweep {
        Some(sweep) => Generator::sweep(&cfg.workload, w as u64, sweep.clone()),
        None => Generator::new(&cfg.workload, w as u64).with_nodes(1 + cfg.cluster.len()),
    }
}

/// Whether a request of `kind` must pass: a retry sent at least the server's delay after its
/// first attempt, or (after a warm-up) a known-pool request. Answered DEFER, it is wrongly
/// deferred: in a cluster, the first attempt did not reach the node in time.
#[inline(always)]
fn must_pass(sh: &Shared, kind: Kind) -> bool {
    sh.must_pass[kind as usize]
}

/// [`Shared::must_pass`]: retries after the delay, and known-pool requests if `check_known`.
fn must_pass_table(check_known: bool) -> [bool; 4] {
    let mut t = [false; 4];
    t[Kind::Retry as usize] = true;
    t[Kind::Known as usize] = check_known;
    t
}

/// Runs the load (after the warm-up, if asked) and returns its report.
pub fn run(cfg: &RunConfig) -> anyhow::Result<RunReport> {
    cfg.validate()?;
    if cfg.minimal {
        return measure_with(cfg, None, crate::bare::thread);
    }
    if cfg.warmup {
        warmup(cfg)?;
    }
    let cfg = RunConfig {
        known_whitelisted: cfg.known_whitelisted || cfg.warmup,
        ..cfg.clone()
    };
    measure_with(&cfg, None, client_thread)
}

/// Sends every known-pool triplet, waits the server's delay, sends them again: the second
/// sight passes `retried` and whitelists each. Closed loop, no report. Against several nodes
/// the first pass sends each triplet to its home node and the second to the next node (a
/// retry through another node, which passes once the cluster has carried the first).
///
/// # Errors
///
/// The target could not be reached, or decided less than 90 % of the pool.
pub fn warmup(cfg: &RunConfig) -> anyhow::Result<()> {
    let pool = u64::from(cfg.workload.known_pool);
    let sweep = RunConfig {
        duration: None,
        requests: Some(pool),
        rate: None,
        label: format!("{} warm-up", cfg.label),
        warmup: false,
        ..cfg.clone()
    };
    let nodes = 1 + cfg.cluster.len();
    let first = measure_with(&sweep, Some(Arc::new(Sweep::new(nodes, 0))), client_thread)?;
    thread::sleep(Duration::from_secs_f64(cfg.workload.server_delay + 0.2));
    let second = measure_with(&sweep, Some(Arc::new(Sweep::new(nodes, 1))), client_thread)?;
    // A few lost UDP datagrams leave a few pool triplets unknown; that shows in the report.
    if first.decisions < pool * 9 / 10 || second.decisions < pool * 9 / 10 {
        bail!(
            "warm-up: the target decided {} and {} of the {pool} known-pool requests",
            first.decisions,
            second.decisions
        );
    }
    Ok(())
}

/// One client thread of the full client: its connections are `workers`.
fn client_thread(
    cfg: &RunConfig,
    sh: &Shared,
    workers: &[usize],
    writer: RequestWriter,
) -> WorkerOut {
    match cfg.proto {
        Proto::NativeTcp => tcp_thread(cfg, sh, workers, writer, false),
        Proto::Policy => tcp_thread(cfg, sh, workers, writer, true),
        Proto::NativeUdp => udp_thread(cfg, sh, workers, writer),
    }
}

/// Runs `body` on the client's threads, connection `w` on thread `w % threads`, and sums
/// what they measured into the report.
pub(crate) fn measure_with(
    cfg: &RunConfig,
    sweep: Option<Arc<Sweep>>,
    body: fn(&RunConfig, &Shared, &[usize], RequestWriter) -> WorkerOut,
) -> anyhow::Result<RunReport> {
    let threads = cfg.thread_count();
    // Written before the clock starts: it is set-up, not load.
    let known = Arc::new(if cfg.minimal {
        KnownCache::default()
    } else {
        KnownCache::build(&cfg.workload, cfg.proto == Proto::Policy)
    });
    let nodes = cfg.nodes();
    // A sweep gives each node its share of the pool; a run has one budget.
    let remaining = cfg.requests.map(|n| match &sweep {
        Some(sw) if nodes.len() > 1 => (0..nodes.len())
            .map(|j| AtomicU64::new(n.min(sw.share(cfg.workload.known_pool, j))))
            .collect(),
        _ => vec![AtomicU64::new(n)],
    });
    let machine_before = MachineStat::now();
    let start = Instant::now();
    let sh = Shared {
        start,
        deadline: cfg.duration.map(|d| start + d),
        stop: AtomicBool::new(false),
        remaining,
        decisions: AtomicU64::new(0),
        failures: AtomicU64::new(0),
        must_pass: must_pass_table(cfg.known_whitelisted && sweep.is_none()),
        sweep,
    };
    let outs: Vec<WorkerOut> = thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let sh = &sh;
                let known = known.clone();
                let workers: Vec<usize> = (t..cfg.connections).step_by(threads).collect();
                thread::Builder::new()
                    .name(format!("load-{t}"))
                    .spawn_scoped(s, move || {
                        let cpu0 = cpu::this_thread();
                        let mut out = body(cfg, sh, &workers, RequestWriter::with_cache(known));
                        out.cpu = cpu::this_thread().saturating_sub(cpu0);
                        out
                    })
                    .expect("spawn client thread")
            })
            .collect();
        watch(cfg, &sh, &handles);
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread panicked"))
            .collect()
    });
    let elapsed = start.elapsed();
    let machine_after = MachineStat::now();
    let mut hist = new_hist();
    let mut tally = Tally::default();
    let mut kinds = KindCounts::default();
    let mut sent = 0;
    let mut client_cpu = Duration::ZERO;
    let mut per_node = vec![NodeOut::default(); nodes.len()];
    for o in &outs {
        hist.add(&o.hist).expect("same histogram bounds");
        tally.add(&o.tally);
        kinds.add(&o.kinds);
        sent += o.sent;
        client_cpu += o.cpu;
        for (a, b) in per_node.iter_mut().zip(&o.nodes) {
            a.add(b);
        }
    }
    if tally.connection_errors as usize == cfg.connections * nodes.len() && sent == 0 {
        bail!(
            "could not reach {} over {} (every connection failed)",
            cfg.nodes()
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            cfg.proto.name()
        );
    }
    let decisions = tally.decisions();
    let secs = elapsed.as_secs_f64();
    if let [only] = &mut per_node[..] {
        // One target has it all (the minimal client counts no node).
        only.sent = sent;
        only.decisions = decisions;
    }
    let targets: Vec<NodeReport> = nodes
        .iter()
        .zip(&per_node)
        .map(|(a, n)| NodeReport {
            target: a.to_string(),
            requests_sent: n.sent,
            decisions: n.decisions,
            decisions_per_sec: n.decisions as f64 / secs.max(1e-9),
            late_retries: n.late_retries,
            wrongly_deferred: n.wrongly_deferred,
        })
        .collect();
    Ok(RunReport {
        schema: RunReport::SCHEMA.to_string(),
        proto: cfg.proto.name().to_string(),
        target: nodes
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(","),
        client: if cfg.minimal { "minimal" } else { "full" }.to_string(),
        threads,
        connections: cfg.connections,
        pipeline: cfg.window(),
        per_datagram: if cfg.proto == Proto::NativeUdp {
            cfg.per_datagram
        } else {
            1
        },
        mode: if cfg.rate.is_some() {
            "open-loop"
        } else {
            "closed-loop"
        }
        .to_string(),
        rate: cfg.rate,
        elapsed_secs: secs,
        requests_sent: sent,
        decisions,
        decisions_per_sec: decisions as f64 / secs.max(1e-9),
        latency_us: Latency::from_hist(&hist),
        answers: tally.to_answers(),
        workload: kinds,
        cpu: CpuUse::new(threads, client_cpu, elapsed, machine_before, machine_after),
        late_retries: per_node.iter().map(|n| n.late_retries).sum(),
        wrongly_deferred: per_node.iter().map(|n| n.wrongly_deferred).sum(),
        targets,
    })
}

/// Shows progress and ends the run at its deadline; returns once every thread is done.
fn watch<T>(cfg: &RunConfig, sh: &Shared, handles: &[thread::ScopedJoinHandle<'_, T>]) {
    let pb = if cfg.progress && std::io::stderr().is_terminal() {
        let pb = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        pb.set_style(
            ProgressStyle::with_template("{spinner} {prefix} [{elapsed_precise}] {msg}")
                .expect("valid progress template"),
        );
        pb.set_prefix(cfg.label.clone());
        pb
    } else {
        ProgressBar::hidden()
    };
    let deadline = cfg.duration.map(|d| sh.start + d);
    let (mut last_n, mut last_t) = (0u64, Instant::now());
    while !handles.iter().all(|h| h.is_finished()) {
        thread::sleep(Duration::from_millis(20));
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d) {
            sh.stop.store(true, Ordering::Relaxed);
        }
        if now - last_t >= Duration::from_millis(250) {
            let n = sh.decisions.load(Ordering::Relaxed);
            let rate = (n - last_n) as f64 / (now - last_t).as_secs_f64();
            pb.set_message(format!(
                "{n} decisions, {rate:.0}/s now, {} errors or timeouts",
                sh.failures.load(Ordering::Relaxed)
            ));
            pb.tick();
            (last_n, last_t) = (n, now);
        }
    }
    pb.finish_and_clear();
}

/// How often a thread looks at what no socket event tells it: the end of the run, requests
/// overdue, and (UDP) lost datagrams.
pub(crate) const HOUSEKEEPING: Duration = Duration::from_millis(10);
/// The open-loop timer's token; connections use their index.
const TIMER: Token = Token(usize::MAX);

/// Sleeps until the next open-loop send with microsecond precision: a `timerfd` in the
/// thread's epoll set. epoll's own timeout is rounded up to whole milliseconds, which would
/// add up to a millisecond to every open-loop latency.
struct SendTimer {
    fd: TimerFd,
    armed: Option<Instant>,
}

impl SendTimer {
    /// `None` in closed loop, or if the timer cannot be made (then sends are late by up to a
    /// millisecond, and that shows in the latencies).
    fn new(cfg: &RunConfig, poll: &Poll) -> Option<Self> {
        cfg.rate?;
        let fd = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )
        .ok()?;
        poll.registry()
            .register(
                &mut SourceFd(&fd.as_fd().as_raw_fd()),
                TIMER,
                Interest::READABLE,
            )
            .ok()?;
        Some(Self { fd, armed: None })
    }

    /// The epoll timeout to use until `at`, arming the timer when epoll's own would be late.
    fn wait_until(&mut self, at: Instant, now: Instant, cap: Duration) -> Duration {
        let wait = at.saturating_duration_since(now);
        if wait >= cap || wait.is_zero() {
            return wait.min(cap);
        }
        if self.armed != Some(at) {
            let spec = TimeSpec::from_duration(wait);
            if self
                .fd
                .set(Expiration::OneShot(spec), TimerSetTimeFlags::empty())
                .is_ok()
            {
                self.armed = Some(at);
            }
        }
        cap
    }

    /// Called on the timer's event: consumes the expiry so the next one is reported again.
    fn fired(&mut self) {
        let _ = self.fd.wait();
        self.armed = None;
    }
}

/// One native TCP or policy connection of a client thread.
struct TcpConn {
    stream: mio::net::TcpStream,
    /// The node (target) it goes to.
    node: usize,
    /// Its worker's generator, in the thread's list (a worker has a connection per node).
    gen: usize,
    schedule: Option<Schedule>,
    /// (intended, sent, must pass) of each request in flight, in order: TCP answers in order.
    inflight: VecDeque<(Instant, Instant, bool)>,
    /// Encoded requests not yet written, from `out_at`.
    out: Vec<u8>,
    out_at: usize,
    /// Received bytes not yet read as replies: `inbuf[..in_len]`.
    inbuf: Vec<u8>,
    in_len: usize,
    stopping: bool,
    done: bool,
    /// Whether the thread has counted this connection as done.
    retired: bool,
}

/// Requests whose triplets are drawn, then touched, then written, together.
const TOUCH_BATCH: usize = 32;

/// First size of a connection's receive buffer; it doubles when a reply does not fit.
const READ_BUF: usize = 1 << 16;

impl TcpConn {
    /// Reads what the socket holds and matches the replies to the requests in flight.
    fn read(&mut self, sh: &Shared, policy: bool, out: &mut WorkerOut) {
        loop {
            if self.in_len == self.inbuf.len() {
                self.inbuf.resize(self.inbuf.len() * 2, 0);
            }
            let space = self.inbuf.len() - self.in_len;
            match self.stream.read(&mut self.inbuf[self.in_len..]) {
                Ok(0) => return self.fail(sh, out),
                Ok(n) => {
                    self.in_len += n;
                    // A short read emptied the socket's queue: more data will raise a new
                    // edge, so the extra read that would only say EAGAIN is saved (one
                    // syscall per reply batch instead of two).
                    if n < space {
                        break;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return self.fail(sh, out),
            }
        }
        let at = Instant::now();
        let (mut pos, mut decided, mut failed, mut wrong) = (0, 0, 0, 0);
        let mut same = SameSend::default();
        let mut broken = false;
        loop {
            let buf = &self.inbuf[pos..self.in_len];
            let (a, used) = if policy {
                match policy::parse_action(buf) {
                    Ok(Some((action, used))) => (answer::policy(action), used),
                    Ok(None) => break,
                    // A reply that cannot be framed leaves the stream unreadable.
                    Err(_) => {
                        broken = true;
                        break;
                    }
                }
            } else {
                // Framed and classified from the first bytes (`answer::native_next`), the
                // codec's parse only for the rare replies.
                match answer::native_next(buf) {
                    Some((_, a, used)) => (a, used),
                    None => break,
                }
            };
            pos += used;
            match self.inflight.pop_front() {
                Some((intended, _, must)) if out.tally.count(a) => {
                    decided += 1;
                    wrong += u64::from(must && a == Answer::Defer);
                    same.add(out, intended, at);
                }
                Some(_) => failed += 1,
                None => {
                    // More answers than requests: count, never match.
                    out.tally.unmatched += 1;
                    failed += 1;
                }
            }
        }
        same.flush(out, at);
        if broken {
            self.fail(sh, out);
        }
        self.inbuf.copy_within(pos..self.in_len, 0);
        self.in_len -= pos;
        let node = &mut out.nodes[self.node];
        node.decisions += decided;
        node.wrongly_deferred += wrong;
        sh.decisions.fetch_add(decided, Ordering::Relaxed);
        if failed > 0 {
            sh.failures.fetch_add(failed, Ordering::Relaxed);
        }
    }

    /// Sends what the window and the schedule allow, in one write.
    #[allow(clippy::too_many_arguments)]
    fn pump(
        &mut self,
        cfg: &RunConfig,
        sh: &Shared,
        writer: &mut RequestWriter,
        gen: &mut Generator,
        out: &mut WorkerOut,
        now: Instant,
    ) {
        if self.done {
            return;
        }
        if !self.stopping {
            let room = (cfg.window() - self.inflight.len()) as u64;
            let want = match &self.schedule {
                Some(sc) => sc.due(now).min(room),
                None => room,
            };
            if want > 0 {
                let n = sh.claim_for(self.node, want);
                if n == 0 {
                    self.stopping = true;
                } else {
                    let t = sh.secs(now);
                    let policy = cfg.proto == Proto::Policy;
                    let mut left = n as usize;
                    let mut late = 0;
                    while left > 0 {
                        // Triplets first, then a read of what each is written from, then the
                        // writing: the reads' cache misses overlap (see `touch`).
                        let k = left.min(TOUCH_BATCH);
                        let mut triplets = [(Touched::default(), false); TOUCH_BATCH];
                        let mut seen = 0;
                        for x in &mut triplets[..k] {
                            let (kind, tr) = gen.next_for(t, self.node);
                            let (touched, byte) = writer.touch(&cfg.workload, tr, policy);
                            *x = (touched, must_pass(sh, kind));
                            seen ^= byte;
                        }
                        std::hint::black_box(seen);
                        for &(x, must) in &triplets[..k] {
                            if policy {
                                writer.policy(&cfg.workload, x.t, &mut self.out);
                            } else {
                                writer.native_touched(&cfg.workload, x, None, &mut self.out);
                            }
                            let intended = self.schedule.as_mut().map_or(now, Schedule::take);
                            self.inflight.push_back((intended, now, must));
                            late += u64::from(must);
                        }
                        left -= k;
                    }
                    out.sent += n;
                    let node = &mut out.nodes[self.node];
                    node.sent += n;
                    node.late_retries += late;
                }
            } else if sh.stop.load(Ordering::Relaxed) {
                self.stopping = true;
            }
        }
        self.flush(sh, out);
        if self.stopping && self.inflight.is_empty() {
            self.done = true;
        }
    }

    /// Writes what is pending; what the socket does not take waits for its writable event.
    fn flush(&mut self, sh: &Shared, out: &mut WorkerOut) {
        while self.out_at < self.out.len() {
            match self.stream.write(&self.out[self.out_at..]) {
                Ok(0) => return self.fail(sh, out),
                Ok(n) => self.out_at += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return self.fail(sh, out),
            }
        }
        self.out.clear();
        self.out_at = 0;
    }

    /// Housekeeping: notices the end of the run and a connection stuck on an overdue reply.
    fn check(&mut self, cfg: &RunConfig, now: Instant) {
        if let Some(&(_, oldest_sent, _)) = self.inflight.front() {
            // TCP answers in order: an overdue oldest request means the connection is stuck;
            // give up on it rather than wait forever.
            if now.saturating_duration_since(oldest_sent) >= cfg.timeout {
                self.done = true;
            }
        }
    }

    fn fail(&mut self, sh: &Shared, out: &mut WorkerOut) {
        if !self.done {
            out.failed(sh);
        }
        self.done = true;
    }

    /// Once done: counts what never got an answer; returns whether this call retired it.
    fn retire(&mut self, sh: &Shared, out: &mut WorkerOut, stop_at: Instant) -> bool {
        if !self.done || self.retired {
            return false;
        }
        self.retired = true;
        if let Some(sc) = &self.schedule {
            out.tally.behind_schedule += sc.due(Instant::now().min(stop_at));
        }
        let lost = self.inflight.len() as u64;
        self.inflight.clear();
        out.tally.timeouts += lost;
        sh.failures.fetch_add(lost, Ordering::Relaxed);
        true
    }
}

/// A connection to `target`, registered with `poll` (readable and writable) under `token`:
/// connected with a timeout (blocking), then handed to mio.
pub(crate) fn registered_tcp_stream(
    cfg: &RunConfig,
    target: SocketAddr,
    poll: &Poll,
    token: usize,
) -> std::io::Result<mio::net::TcpStream> {
    let s = TcpStream::connect_timeout(&target, cfg.timeout)?;
    s.set_nodelay(true)?;
    s.set_nonblocking(true)?;
    let mut s = mio::net::TcpStream::from_std(s);
    poll.registry().register(
        &mut s,
        Token(token),
        Interest::READABLE | Interest::WRITABLE,
    )?;
    Ok(s)
}

/// Earliest next open-loop send among connections that have room for it.
fn next_send<'a>(schedules: impl Iterator<Item = &'a Schedule>) -> Option<Instant> {
    schedules.map(Schedule::next_at).min()
}

/// How long one `epoll_wait` may sleep: at most `cap` (the next housekeeping), and in open
/// loop no longer than until the earliest send of the schedules `ready` gives (only those of
/// connections with room to send).
fn poll_wait<'a>(
    timer: &mut Option<SendTimer>,
    now: Instant,
    cap: Duration,
    ready: impl Iterator<Item = &'a Schedule>,
) -> Duration {
    // Closed loop has no timer: the schedules are not even looked at.
    let Some(timer) = timer else {
        return cap;
    };
    match next_send(ready) {
        Some(at) => timer.wait_until(at, now, cap),
        None => cap,
    }
}

/// One client thread's native TCP or policy connections, driven through one epoll set.
fn tcp_thread(
    cfg: &RunConfig,
    sh: &Shared,
    workers: &[usize],
    mut writer: RequestWriter,
    policy: bool,
) -> WorkerOut {
    let mut out = WorkerOut::new();
    let Ok(mut poll) = Poll::new() else {
        // Every connection (one per worker and node) is lost.
        for _ in 0..workers.len() * (1 + cfg.cluster.len()) {
            out.failed(sh);
        }
        return out;
    };
    let mut timer = SendTimer::new(cfg, &poll);
    let nodes = cfg.nodes();
    out.nodes = vec![NodeOut::default(); nodes.len()];
    let mut gens: Vec<Generator> = workers.iter().map(|&w| generator(cfg, sh, w)).collect();
    let mut conns: Vec<TcpConn> = Vec::with_capacity(workers.len() * nodes.len());
    // Worker `w` has a connection to each node; the rate is spread over all of them.
    let legs = workers
        .iter()
        .enumerate()
        .flat_map(|(g, &w)| nodes.iter().enumerate().map(move |(j, &a)| (g, w, j, a)));
    for (g, w, node, addr) in legs {
        let stream = registered_tcp_stream(cfg, addr, &poll, conns.len());
        match stream {
            Ok(stream) => conns.push(TcpConn {
                stream,
                node,
                gen: g,
                schedule: cfg.rate.map(|r| {
                    Schedule::new(
                        sh.start,
                        r,
                        cfg.connections * nodes.len(),
                        w * nodes.len() + node,
                    )
                }),
                inflight: VecDeque::with_capacity(cfg.window()),
                out: Vec::with_capacity(cfg.window() * 512),
                out_at: 0,
                inbuf: vec![0; READ_BUF],
                in_len: 0,
                stopping: false,
                done: false,
                retired: false,
            }),
            Err(_) => out.failed(sh),
        }
    }
    let mut events = Events::with_capacity(conns.len() + 1);
    let mut live = conns.len();
    let now = Instant::now();
    for c in &mut conns {
        c.pump(cfg, sh, &mut writer, &mut gens[c.gen], &mut out, now);
        live -= usize::from(c.retire(sh, &mut out, sh.stop_at()));
    }
    let mut next_check = now + HOUSEKEEPING;
    while live > 0 {
        let now = Instant::now();
        let cap = next_check.saturating_duration_since(now);
        let ready = conns
            .iter()
            .filter(|c| !c.stopping && !c.done && c.inflight.len() < cfg.window())
            .filter_map(|c| c.schedule.as_ref());
        let wait = poll_wait(&mut timer, now, cap, ready);
        if let Err(e) = poll.poll(&mut events, Some(wait)) {
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            for c in &mut conns {
                c.fail(sh, &mut out);
            }
        }
        let now = Instant::now();
        for ev in &events {
            if ev.token() == TIMER {
                if let Some(t) = &mut timer {
                    t.fired();
                }
                continue;
            }
            let c = &mut conns[ev.token().0];
            if c.done {
                continue;
            }
            if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                c.read(sh, policy, &mut out);
            }
            c.pump(cfg, sh, &mut writer, &mut gens[c.gen], &mut out, now);
            live -= usize::from(c.retire(sh, &mut out, sh.stop_at()));
        }
        // Open loop: sends fall due whether or not a socket spoke.
        let housekeeping = now >= next_check;
        if timer.is_some() || housekeeping {
            for c in &mut conns {
                if housekeeping {
                    c.check(cfg, now);
                }
                c.pump(cfg, sh, &mut writer, &mut gens[c.gen], &mut out, now);
                live -= usize::from(c.retire(sh, &mut out, sh.stop_at()));
            }
            if housekeeping {
                next_check = now + HOUSEKEEPING;
            }
        }
    }
    for g in &gens {
        out.kinds.add(&g.counts);
    }
    out
}

/// Largest datagram the client builds (the server's limit is the UDP maximum; 64 lines of at
/// most ~200 bytes stay far below it).
pub(crate) const MAX_DATAGRAM: usize = 65_507;
/// Datagrams moved per `recvmmsg`/`sendmmsg`.
pub(crate) const UDP_BATCH: usize = 64;

/// A UDP socket of the client, bound to the loopback (or any) address of the target's family,
/// non-blocking, with its descriptor for epoll.
/// [`udp_socket`], its control handle registered with `poll` (readable) under `token`.
pub(crate) fn registered_udp_socket(
    target: SocketAddr,
    poll: &Poll,
    token: usize,
) -> std::io::Result<(BatchSocket, std::net::UdpSocket)> {
    let (bs, ctl) = udp_socket(target)?;
    poll.registry().register(
        &mut SourceFd(&ctl.as_raw_fd()),
        Token(token),
        Interest::READABLE,
    )?;
    Ok((bs, ctl))
}

pub(crate) fn udp_socket(
    target: SocketAddr,
) -> std::io::Result<(BatchSocket, std::net::UdpSocket)> {
    let local = SocketAddr::new(
        match target.ip() {
            IpAddr::V4(ip) if ip.is_loopback() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(ip) if ip.is_loopback() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        },
        0,
    );
    let sock = bind_reuseport(local, 1, 4 << 20, HOUSEKEEPING)?.remove(0);
    // A second handle on the same socket: non-blocking applies to both (one open file), and
    // its descriptor is what epoll watches (BatchSocket owns the first).
    let ctl = sock.try_clone()?;
    ctl.set_nonblocking(true)?;
    Ok((BatchSocket::new(sock, UDP_BATCH, MAX_DATAGRAM), ctl))
}

/// An empty `Vec` of another lifetime on the same allocation: the datagram list for
/// `BatchSocket::send` borrows the request buffer, so it cannot be kept between batches as
/// is. Collecting an emptied `IntoIter` into a `Vec` of the same layout reuses the buffer
/// (std's in-place collection), so no allocation is made per batch.
fn recycle<'b>(mut v: Vec<(SocketAddr, &[u8])>) -> Vec<(SocketAddr, &'b [u8])> {
    v.clear();
    v.into_iter().map(|_| unreachable!("emptied")).collect()
}

/// One UDP socket of a client thread.
struct UdpConn {
    bs: BatchSocket,
    /// Keeps the descriptor epoll watches registered for the socket's life.
    _ctl: std::net::UdpSocket,
    /// The node (target) it sends to, and its address.
    node: usize,
    target: SocketAddr,
    /// Its worker's generator, in the thread's list (a worker has a socket per node).
    gen: usize,
    schedule: Option<Schedule>,
    outstanding: Outstanding,
    /// Request bytes of the batch being sent, and each datagram's span in it.
    req: Vec<u8>,
    spans: Vec<(usize, usize)>,
    stopping: bool,
    done: bool,
    retired: bool,
}

impl UdpConn {
    /// Sends the datagrams the window and the schedule allow in one `sendmmsg`.
    #[allow(clippy::too_many_arguments)]
    fn pump(
        &mut self,
        cfg: &RunConfig,
        sh: &Shared,
        writer: &mut RequestWriter,
        gen: &mut Generator,
        out: &mut WorkerOut,
        now: Instant,
        pairs: &mut Vec<(SocketAddr, &'static [u8])>,
    ) {
        if self.done {
            return;
        }
        if !self.stopping {
            let k = cfg.per_datagram as u64;
            let window = cfg.pipeline as u64 * k;
            let room = (window - (self.outstanding.live() as u64).min(window)) / k;
            let room = room.min(UDP_BATCH as u64);
            let datagrams = match &self.schedule {
                Some(sc) => sc.due(now).min(room),
                None => room,
            };
            if datagrams > 0 {
                let n = sh.claim_for(self.node, datagrams * k);
                if n == 0 {
                    self.stopping = true;
                } else {
                    self.req.clear();
                    self.spans.clear();
                    let t = sh.secs(now);
                    let mut left = n;
                    let mut late = 0;
                    while left > 0 {
                        let intended = self.schedule.as_mut().map_or(now, Schedule::take);
                        let start = self.req.len();
                        // Triplets first, then a read of what each is written from, then the
                        // writing: the reads' cache misses overlap (see `touch`).
                        let lines = left.min(k) as usize;
                        let mut triplets = [(Touched::default(), false); 64];
                        let mut seen = 0;
                        for x in &mut triplets[..lines] {
                            let (kind, tr) = gen.next_for(t, self.node);
                            let (touched, byte) = writer.touch(&cfg.workload, tr, false);
                            *x = (touched, must_pass(sh, kind));
                            seen ^= byte;
                        }
                        std::hint::black_box(seen);
                        for &(x, must) in &triplets[..lines] {
                            let id = self.outstanding.push_flagged(intended, now, must);
                            writer.native_touched(&cfg.workload, x, Some(id), &mut self.req);
                            late += u64::from(must);
                        }
                        left -= left.min(k);
                        self.spans.push((start, self.req.len()));
                    }
                    out.sent += n;
                    let node = &mut out.nodes[self.node];
                    node.sent += n;
                    node.late_retries += late;
                    let mut batch = recycle(std::mem::take(pairs));
                    batch.extend(
                        self.spans
                            .iter()
                            .map(|&(a, b)| (self.target, &self.req[a..b])),
                    );
                    // A datagram the kernel refused is never answered: the timeout counts it
                    // as lost, as it would a datagram lost on the way.
                    let sent = self.bs.send(&batch);
                    *pairs = recycle(batch);
                    if sent.is_err() {
                        out.failed(sh);
                        self.done = true;
                        return;
                    }
                }
            } else if sh.stop.load(Ordering::Relaxed) {
                self.stopping = true;
            }
        }
        if self.stopping && self.outstanding.live() == 0 {
            self.done = true;
        }
    }

    /// Takes every datagram queued (one `recvmmsg` per 64) and matches replies by ID.
    fn recv(&mut self, sh: &Shared, out: &mut WorkerOut) {
        let (mut decided, mut failed, mut wrong) = (0, 0, 0);
        let mut same = SameSend::default();
        loop {
            let n = match self.bs.recv() {
                Ok(n) => n,
                Err(_) => {
                    out.failed(sh);
                    self.done = true;
                    break;
                }
            };
            let at = Instant::now();
            for d in 0..n {
                let (data, from) = self.bs.datagram(d);
                if from != self.target {
                    continue;
                }
                // Line by line; the last line may lack its `\n`.
                let mut rest = data;
                while !rest.is_empty() {
                    let (id, a) = match answer::native_next(rest) {
                        Some((_, _, 1)) => {
                            rest = &rest[1..];
                            continue;
                        }
                        Some((id, a, used)) => {
                            rest = &rest[used..];
                            (id, a)
                        }
                        None => {
                            let line = std::mem::take(&mut rest);
                            answer::native_fast(line)
                        }
                    };
                    match id.and_then(|id| self.outstanding.answer_flagged(id)) {
                        Some((intended, must)) if out.tally.count(a) => {
                            decided += 1;
                            wrong += u64::from(must && a == Answer::Defer);
                            same.add(out, intended, at);
                        }
                        Some(_) => failed += 1,
                        None => {
                            out.tally.unmatched += 1;
                            failed += 1;
                        }
                    }
                }
            }
            same.flush(out, at);
            // Fewer than a full batch: the queue is empty (more will raise a new edge).
            if n < UDP_BATCH {
                break;
            }
        }
        let node = &mut out.nodes[self.node];
        node.decisions += decided;
        node.wrongly_deferred += wrong;
        sh.decisions.fetch_add(decided, Ordering::Relaxed);
        if failed > 0 {
            sh.failures.fetch_add(failed, Ordering::Relaxed);
        }
    }

    /// Retires requests unanswered for longer than the timeout.
    fn expire(&mut self, cfg: &RunConfig, sh: &Shared, out: &mut WorkerOut, now: Instant) {
        let lost = self.outstanding.expire(now, cfg.timeout);
        if lost > 0 {
            out.tally.timeouts += lost;
            sh.failures.fetch_add(lost, Ordering::Relaxed);
        }
    }

    fn retire(&mut self, sh: &Shared, out: &mut WorkerOut, stop_at: Instant, k: u64) -> bool {
        if !self.done || self.retired {
            return false;
        }
        self.retired = true;
        if let Some(sc) = &self.schedule {
            out.tally.behind_schedule += sc.due(Instant::now().min(stop_at)) * k;
        }
        let lost = self.outstanding.abandon();
        out.tally.timeouts += lost;
        sh.failures.fetch_add(lost, Ordering::Relaxed);
        true
    }
}

/// One client thread's UDP sockets: send what each window allows with one `sendmmsg`, take
/// what came back with one `recvmmsg`, match replies to requests by ID, retire what waited
/// longer than the timeout.
fn udp_thread(
    cfg: &RunConfig,
    sh: &Shared,
    workers: &[usize],
    mut writer: RequestWriter,
) -> WorkerOut {
    let mut out = WorkerOut::new();
    let Ok(poll) = Poll::new() else {
        // Every connection (one per worker and node) is lost.
        for _ in 0..workers.len() * (1 + cfg.cluster.len()) {
            out.failed(sh);
        }
        return out;
    };
    let mut timer = SendTimer::new(cfg, &poll);
    let k = cfg.per_datagram as u64;
    let nodes = cfg.nodes();
    out.nodes = vec![NodeOut::default(); nodes.len()];
    let mut gens: Vec<Generator> = workers.iter().map(|&w| generator(cfg, sh, w)).collect();
    let mut conns: Vec<UdpConn> = Vec::with_capacity(workers.len() * nodes.len());
    // Worker `w` has a socket to each node; the rate is spread over all of them.
    let legs = workers
        .iter()
        .enumerate()
        .flat_map(|(g, &w)| nodes.iter().enumerate().map(move |(j, &a)| (g, w, j, a)));
    for (g, w, node, addr) in legs {
        let sock = registered_udp_socket(addr, &poll, conns.len());
        match sock {
            Ok((bs, ctl)) => conns.push(UdpConn {
                bs,
                _ctl: ctl,
                node,
                target: addr,
                gen: g,
                schedule: cfg.rate.map(|r| {
                    Schedule::new(
                        sh.start,
                        r / k as f64,
                        cfg.connections * nodes.len(),
                        w * nodes.len() + node,
                    )
                }),
                outstanding: Outstanding::new(1),
                req: Vec::with_capacity(UDP_BATCH * 200 * cfg.per_datagram),
                spans: Vec::with_capacity(UDP_BATCH),
                stopping: false,
                done: false,
                retired: false,
            }),
            Err(_) => out.failed(sh),
        }
    }
    let mut poll = poll;
    let mut pairs: Vec<(SocketAddr, &'static [u8])> = Vec::with_capacity(UDP_BATCH);
    let mut events = Events::with_capacity(conns.len() + 1);
    let mut live = conns.len();
    let now = Instant::now();
    for c in &mut conns {
        c.pump(
            cfg,
            sh,
            &mut writer,
            &mut gens[c.gen],
            &mut out,
            now,
            &mut pairs,
        );
        live -= usize::from(c.retire(sh, &mut out, sh.stop_at(), k));
    }
    let mut next_check = now + HOUSEKEEPING;
    while live > 0 {
        let now = Instant::now();
        let cap = next_check.saturating_duration_since(now);
        // Only sockets with room for a datagram: a full window waits for replies, and waking
        // up for its overdue schedule would spin.
        let window = cfg.pipeline * cfg.per_datagram;
        let ready = conns
            .iter()
            .filter(|c| {
                !c.stopping
                    && !c.done
                    && (window - c.outstanding.live().min(window)) >= cfg.per_datagram
            })
            .filter_map(|c| c.schedule.as_ref());
        let wait = poll_wait(&mut timer, now, cap, ready);
        if let Err(e) = poll.poll(&mut events, Some(wait)) {
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            for c in &mut conns {
                out.failed(sh);
                c.done = true;
            }
        }
        let now = Instant::now();
        for ev in &events {
            if ev.token() == TIMER {
                if let Some(t) = &mut timer {
                    t.fired();
                }
                continue;
            }
            let c = &mut conns[ev.token().0];
            if c.done {
                continue;
            }
            c.recv(sh, &mut out);
            c.expire(cfg, sh, &mut out, now);
            c.pump(
                cfg,
                sh,
                &mut writer,
                &mut gens[c.gen],
                &mut out,
                now,
                &mut pairs,
            );
            live -= usize::from(c.retire(sh, &mut out, sh.stop_at(), k));
        }
        let housekeeping = now >= next_check;
        if timer.is_some() || housekeeping {
            for c in &mut conns {
                if housekeeping && !c.done {
                    c.expire(cfg, sh, &mut out, now);
                }
                c.pump(
                    cfg,
                    sh,
                    &mut writer,
                    &mut gens[c.gen],
                    &mut out,
                    now,
                    &mut pairs,
                );
                live -= usize::from(c.retire(sh, &mut out, sh.stop_at(), k));
            }
            if housekeeping {
                next_check = now + HOUSEKEEPING;
            }
        }
    }
    for g in &gens {
        out.kinds.add(&g.counts);
    }
    out
}

/// Resolves `target` and refuses anything but loopback unless `allow_remote`.
pub fn resolve_target(target: &str, allow_remote: bool) -> anyhow::Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    let addrs: Vec<SocketAddr> = target
        .to_socket_addrs()
        .with_context(|| format!("--target {target}: not an address:port"))?
        .collect();
    let Some(&first) = addrs.first() else {
        bail!("--target {target}: resolves to no address");
    };
    if !allow_remote && addrs.iter().any(|a| !a.ip().is_loopback()) {
        bail!(
            "--target {target}: {} is not a loopback address; load tests send only to this \
             machine unless --allow-remote is given",
            first.ip()
        );
    }
    Ok(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_spreads_sends_evenly() {
        let t0 = Instant::now();
        // 1000/s over 4 workers: each sends every 4 ms, worker 1 starts 1 ms after worker 0.
        let mut s = Schedule::new(t0, 1000.0, 4, 1);
        assert_eq!(s.due(t0), 0);
        assert_eq!(s.due(t0 + Duration::from_micros(1000)), 1);
        assert_eq!(s.due(t0 + Duration::from_micros(9100)), 3);
        let first = s.take();
        assert_eq!(first, t0 + Duration::from_millis(1));
        assert_eq!(s.due(t0 + Duration::from_micros(9100)), 2);
        assert_eq!(s.next_at(), t0 + Duration::from_millis(5));
    }

    #[test]
    fn claim_never_exceeds_the_budget() {
        let sh = Shared {
            start: Instant::now(),
            deadline: None,
            stop: AtomicBool::new(false),
            remaining: Some(vec![AtomicU64::new(10)]),
            decisions: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            sweep: None,
            must_pass: must_pass_table(false),
        };
        assert_eq!(sh.claim(4), 4);
        assert_eq!(sh.claim(4), 4);
        assert_eq!(sh.claim(4), 2);
        assert_eq!(sh.claim(4), 0);
        let unbounded = Shared {
            remaining: None,
            ..sh
        };
        assert_eq!(unbounded.claim(7), 7);
        unbounded.stop.store(true, Ordering::Relaxed);
        assert_eq!(unbounded.claim(7), 0);
    }

    #[test]
    fn remote_targets_need_allow_remote() {
        assert!(resolve_target("127.0.0.1:10030", false).is_ok());
        assert!(resolve_target("[::1]:10030", false).is_ok());
        let err = resolve_target("192.0.2.1:10030", false).unwrap_err();
        assert!(err.to_string().contains("--allow-remote"), "{err}");
        assert!(resolve_target("192.0.2.1:10030", true).is_ok());
        assert!(resolve_target("nonsense", false).is_err());
    }
}
