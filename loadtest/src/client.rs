//! The load generator behind `run` and `ceiling`: worker threads, one per connection (or
//! UDP socket), each driving its own socket with blocking calls.
//!
//! Blocking threads rather than an async runtime: the client shares the machine with the
//! server, and a thread that writes a batch and reads what came back costs the fewest
//! syscalls and wake-ups per request. The same code drives the null responder and the real
//! server, so whatever the client costs is in both figures of a `ceiling` run.
//!
//! Open loop (`--rate`): each worker has a fixed schedule of intended send times; a request
//! that cannot be sent on time (window full, server slow) is sent late and its latency still
//! counts from its intended time, so a stalled server cannot hide its stall by slowing the
//! client down (no coordinated omission). Closed loop: each worker keeps its window full.

use std::collections::VecDeque;
use std::io::{ErrorKind, IsTerminal, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use greyhound::net::udp_batch::{bind_reuseport, BatchSocket};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::answer::{self, Tally};
use crate::outstanding::Outstanding;
use crate::report::{Latency, RunReport};
use crate::workload::{self, Generator, KindCounts, WorkloadConfig};

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
    /// Where to send.
    pub target: SocketAddr,
    /// How.
    pub proto: Proto,
    /// TCP connections, or UDP sockets; one worker thread each.
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
}

impl RunConfig {
    /// A closed-loop run of `proto` against `target` with default settings.
    pub fn new(target: SocketAddr, proto: Proto) -> Self {
        Self {
            target,
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
        self.workload.validate().map_err(|e| anyhow::anyhow!(e))
    }
}

/// State all workers of a run share.
struct Shared {
    start: Instant,
    /// End of sending, when the run is bounded by time.
    deadline: Option<Instant>,
    stop: AtomicBool,
    /// Requests left to send, when the run is bounded by count.
    remaining: Option<AtomicU64>,
    /// Live counters for the progress line.
    decisions: AtomicU64,
    failures: AtomicU64,
    /// Set during a warm-up: the next known-pool triplet to send.
    sweep: Option<Arc<AtomicU64>>,
}

impl Shared {
    /// Takes up to `want` requests from the run's budget; 0 once the run is over.
    fn claim(&self, want: u64) -> u64 {
        if self.stop.load(Ordering::Relaxed) {
            return 0;
        }
        let Some(r) = &self.remaining else {
            return want;
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
    fn stop_at(&self) -> Instant {
        let now = Instant::now();
        self.deadline.map_or(now, |d| d.min(now))
    }

    fn secs(&self, now: Instant) -> f64 {
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

/// What one worker measured.
struct WorkerOut {
    hist: Histogram<u64>,
    tally: Tally,
    kinds: KindCounts,
    sent: u64,
}

/// Latencies are kept in nanoseconds, 3 significant digits, up to an hour (larger values are
/// clamped to it, not dropped).
fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("valid histogram bounds")
}

impl WorkerOut {
    fn new() -> Self {
        Self {
            hist: new_hist(),
            tally: Tally::default(),
            kinds: KindCounts::default(),
            sent: 0,
        }
    }

    #[inline]
    fn record(&mut self, a: answer::Answer<'_>, intended: Instant, at: Instant) -> bool {
        let decision = self.tally.count(a);
        if decision {
            let ns = at.saturating_duration_since(intended).as_nanos();
            self.hist
                .saturating_record(u64::try_from(ns).unwrap_or(u64::MAX).max(1));
        }
        decision
    }
}

fn generator(cfg: &RunConfig, sh: &Shared, w: usize) -> Generator {
    match &sh.sweep {
        Some(next) => Generator::sweep(&cfg.workload, w as u64, next.clone()),
        None => Generator::new(&cfg.workload, w as u64),
    }
}

/// Runs the load (after the warm-up, if asked) and returns its report.
pub fn run(cfg: &RunConfig) -> anyhow::Result<RunReport> {
    cfg.validate()?;
    if cfg.warmup {
        warmup(cfg)?;
    }
    measure(cfg, None)
}

/// Sends every known-pool triplet, waits the server's delay, sends them again: the second
/// sight passes `retried` and whitelists each. Closed loop, no report.
fn warmup(cfg: &RunConfig) -> anyhow::Result<()> {
    let pool = u64::from(cfg.workload.known_pool);
    let sweep = RunConfig {
        duration: None,
        requests: Some(pool),
        rate: None,
        label: format!("{} warm-up", cfg.label),
        warmup: false,
        ..cfg.clone()
    };
    let first = measure(&sweep, Some(Arc::new(AtomicU64::new(0))))?;
    thread::sleep(Duration::from_secs_f64(cfg.workload.server_delay + 0.2));
    let second = measure(&sweep, Some(Arc::new(AtomicU64::new(0))))?;
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

fn measure(cfg: &RunConfig, sweep: Option<Arc<AtomicU64>>) -> anyhow::Result<RunReport> {
    let start = Instant::now();
    let sh = Shared {
        start,
        deadline: cfg.duration.map(|d| start + d),
        stop: AtomicBool::new(false),
        remaining: cfg.requests.map(AtomicU64::new),
        decisions: AtomicU64::new(0),
        failures: AtomicU64::new(0),
        sweep,
    };
    let outs: Vec<WorkerOut> = thread::scope(|s| {
        let handles: Vec<_> = (0..cfg.connections)
            .map(|w| {
                let sh = &sh;
                thread::Builder::new()
                    .name(format!("load-{w}"))
                    .spawn_scoped(s, move || match cfg.proto {
                        Proto::NativeTcp => tcp_worker(cfg, sh, w, false),
                        Proto::Policy => tcp_worker(cfg, sh, w, true),
                        Proto::NativeUdp => udp_worker(cfg, sh, w),
                    })
                    .expect("spawn worker thread")
            })
            .collect();
        watch(cfg, &sh, &handles);
        handles
            .into_iter()
            .map(|h| h.join().expect("worker thread panicked"))
            .collect()
    });
    let elapsed = start.elapsed().as_secs_f64();
    let mut hist = new_hist();
    let mut tally = Tally::default();
    let mut kinds = KindCounts::default();
    let mut sent = 0;
    for o in &outs {
        hist.add(&o.hist).expect("same histogram bounds");
        tally.add(&o.tally);
        kinds.add(&o.kinds);
        sent += o.sent;
    }
    if tally.connection_errors as usize == cfg.connections && sent == 0 {
        bail!(
            "could not reach {} over {} (every connection failed)",
            cfg.target,
            cfg.proto.name()
        );
    }
    let decisions = tally.decisions();
    Ok(RunReport {
        schema: RunReport::SCHEMA.to_string(),
        proto: cfg.proto.name().to_string(),
        target: cfg.target.to_string(),
        connections: cfg.connections,
        pipeline: if cfg.proto == Proto::Policy {
            1
        } else {
            cfg.pipeline
        },
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
        elapsed_secs: elapsed,
        requests_sent: sent,
        decisions,
        decisions_per_sec: decisions as f64 / elapsed.max(1e-9),
        latency_us: Latency::from_hist(&hist),
        answers: tally.to_answers(),
        workload: kinds,
    })
}

/// Shows progress and ends the run at its deadline; returns once every worker is done.
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
        thread::sleep(Duration::from_millis(50));
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

/// A native TCP or policy connection: send what the window and the schedule allow in one
/// write, read what came back, repeat.
fn tcp_worker(cfg: &RunConfig, sh: &Shared, w: usize, policy: bool) -> WorkerOut {
    let mut out = WorkerOut::new();
    let mut s = match TcpStream::connect_timeout(&cfg.target, cfg.timeout) {
        Ok(s) => s,
        Err(_) => {
            out.tally.connection_errors += 1;
            sh.failures.fetch_add(1, Ordering::Relaxed);
            return out;
        }
    };
    let _ = s.set_nodelay(true);
    let window = if policy { 1 } else { cfg.pipeline };
    let sep: &[u8] = if policy { b"\n\n" } else { b"\n" };
    let mut schedule = cfg
        .rate
        .map(|r| Schedule::new(sh.start, r, cfg.connections, w));
    let mut gen = generator(cfg, sh, w);
    // (intended, sent) of each request in flight, in order: TCP answers in order.
    let mut inflight: VecDeque<(Instant, Instant)> = VecDeque::with_capacity(window);
    let mut req = Vec::with_capacity(window * 128);
    let mut buf = vec![0u8; 1 << 16];
    let mut pending: Vec<u8> = Vec::with_capacity(1 << 16);
    let mut stopping = false;
    let mut read_timeout = None;
    loop {
        let now = Instant::now();
        if !stopping {
            let room = (window - inflight.len()) as u64;
            let want = match &schedule {
                Some(sc) => sc.due(now).min(room),
                None => room,
            };
            if want > 0 {
                let n = sh.claim(want);
                if n == 0 {
                    stopping = true;
                } else {
                    req.clear();
                    let t = sh.secs(now);
                    for _ in 0..n {
                        let (_, triplet) = gen.next(t);
                        if policy {
                            workload::write_policy(&cfg.workload, triplet, &mut req);
                        } else {
                            workload::write_native(&cfg.workload, triplet, None, &mut req);
                        }
                        let intended = schedule.as_mut().map_or(now, Schedule::take);
                        inflight.push_back((intended, now));
                    }
                    out.sent += n;
                    if s.write_all(&req).is_err() {
                        out.tally.connection_errors += 1;
                        break;
                    }
                }
            } else if sh.stop.load(Ordering::Relaxed) {
                stopping = true;
            }
        }
        let Some(&(_, oldest_sent)) = inflight.front() else {
            if stopping {
                break;
            }
            if let Some(sc) = &schedule {
                let wait = sc.next_at().saturating_duration_since(Instant::now());
                thread::sleep(wait.min(Duration::from_millis(10)));
            }
            continue;
        };
        // Closed loop: one fixed timeout (a changing one would cost a setsockopt per batch,
        // which would show in the ceiling); a stuck connection is noticed within two.
        // Open loop: wake up in time for the next scheduled send if the window has room.
        let mut wait = cfg.timeout;
        if let (Some(sc), false) = (&schedule, stopping) {
            if inflight.len() < window {
                wait = wait.min(sc.next_at().saturating_duration_since(now));
            }
        }
        let wait = wait.max(Duration::from_micros(50));
        if read_timeout != Some(wait) {
            let _ = s.set_read_timeout(Some(wait));
            read_timeout = Some(wait);
        }
        match s.read(&mut buf) {
            Ok(0) => {
                out.tally.connection_errors += 1;
                break;
            }
            Ok(n) => {
                let at = Instant::now();
                pending.extend_from_slice(&buf[..n]);
                let mut pos = 0;
                let mut decided = 0;
                while let Some(p) = find(&pending[pos..], sep) {
                    let msg = &pending[pos..pos + p];
                    let a = if policy {
                        answer::policy(msg)
                    } else {
                        answer::native(msg).1
                    };
                    pos += p + sep.len();
                    let Some((intended, _)) = inflight.pop_front() else {
                        // More answers than requests: count, never match.
                        out.tally.unmatched += 1;
                        continue;
                    };
                    if out.record(a, intended, at) {
                        decided += 1;
                    } else {
                        sh.failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
                pending.drain(..pos);
                sh.decisions.fetch_add(decided, Ordering::Relaxed);
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if Instant::now().saturating_duration_since(oldest_sent) >= cfg.timeout {
                    // The oldest request is overdue: TCP answers in order, so the connection
                    // is stuck; give up on it rather than wait forever.
                    break;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => {
                out.tally.connection_errors += 1;
                break;
            }
        }
    }
    if let Some(sc) = &schedule {
        out.tally.behind_schedule += sc.due(Instant::now().min(sh.stop_at()));
    }
    let lost = inflight.len() as u64;
    out.tally.timeouts += lost;
    sh.failures
        .fetch_add(lost + out.tally.connection_errors, Ordering::Relaxed);
    out.kinds = gen.counts;
    out
}

fn find(hay: &[u8], sep: &[u8]) -> Option<usize> {
    if sep.len() == 1 {
        hay.iter().position(|&b| b == sep[0])
    } else {
        hay.windows(sep.len()).position(|w| w == sep)
    }
}

/// Largest datagram the client builds (the server's limit is the UDP maximum; 64 lines of at
/// most ~200 bytes stay far below it).
const MAX_DATAGRAM: usize = 65_507;
/// Datagrams moved per `recvmmsg`/`sendmmsg`.
const UDP_BATCH: usize = 64;

/// A native UDP socket: send the datagrams the window and schedule allow in one `sendmmsg`,
/// take what came back with one `recvmmsg`, match replies to requests by ID, retire what
/// waited longer than the timeout.
fn udp_worker(cfg: &RunConfig, sh: &Shared, w: usize) -> WorkerOut {
    let mut out = WorkerOut::new();
    let local = SocketAddr::new(
        match cfg.target.ip() {
            IpAddr::V4(ip) if ip.is_loopback() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(ip) if ip.is_loopback() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        },
        0,
    );
    // Short receive waits, so the schedule and the timeouts are looked at often.
    let poll = if cfg.rate.is_some() {
        Duration::from_millis(1)
    } else {
        (cfg.timeout / 4).clamp(Duration::from_millis(1), Duration::from_millis(20))
    };
    let sock = match bind_reuseport(local, 1, 4 << 20, poll).map(|mut v| v.remove(0)) {
        Ok(s) => s,
        Err(_) => {
            out.tally.connection_errors += 1;
            return out;
        }
    };
    // A second handle on the same socket, to move the receive timeout with the schedule
    // (BatchSocket owns the first one).
    let ctl = sock.try_clone().ok();
    let mut read_timeout = poll;
    let mut bs = BatchSocket::new(sock, UDP_BATCH, MAX_DATAGRAM);
    let k = cfg.per_datagram as u64;
    let window = cfg.pipeline as u64 * k;
    let mut schedule = cfg
        .rate
        .map(|r| Schedule::new(sh.start, r / k as f64, cfg.connections, w));
    let mut gen = generator(cfg, sh, w);
    let mut outstanding = Outstanding::new(1);
    let mut req: Vec<u8> = Vec::with_capacity(UDP_BATCH * 200 * cfg.per_datagram);
    let mut spans: Vec<(usize, usize)> = Vec::with_capacity(UDP_BATCH);
    let mut stopping = false;
    loop {
        let now = Instant::now();
        if !stopping {
            let room = (window - (outstanding.live() as u64).min(window)) / k;
            let room = room.min(UDP_BATCH as u64);
            let datagrams = match &schedule {
                Some(sc) => sc.due(now).min(room),
                None => room,
            };
            if datagrams > 0 {
                let n = sh.claim(datagrams * k);
                if n == 0 {
                    stopping = true;
                } else {
                    req.clear();
                    spans.clear();
                    let t = sh.secs(now);
                    let mut left = n;
                    while left > 0 {
                        let intended = schedule.as_mut().map_or(now, Schedule::take);
                        let start = req.len();
                        for _ in 0..left.min(k) {
                            let (_, triplet) = gen.next(t);
                            let id = outstanding.push(intended, now);
                            workload::write_native(&cfg.workload, triplet, Some(id), &mut req);
                        }
                        left -= left.min(k);
                        spans.push((start, req.len()));
                    }
                    out.sent += n;
                    let replies: Vec<(SocketAddr, &[u8])> = spans
                        .iter()
                        .map(|&(a, b)| (cfg.target, &req[a..b]))
                        .collect();
                    // A datagram the kernel refused is never answered: the timeout below
                    // counts it as lost, as it would a datagram lost on the way.
                    if bs.send(&replies).is_err() {
                        out.tally.connection_errors += 1;
                        break;
                    }
                }
            } else if sh.stop.load(Ordering::Relaxed) {
                stopping = true;
            }
        }
        if outstanding.live() == 0 {
            if stopping {
                break;
            }
            if let Some(sc) = &schedule {
                let wait = sc.next_at().saturating_duration_since(Instant::now());
                thread::sleep(wait.min(Duration::from_millis(10)));
            }
            continue;
        }
        if let (Some(sc), Some(ctl), false) = (&schedule, &ctl, stopping) {
            // Open loop: wake up for the next scheduled send rather than a fixed poll later,
            // so the schedule slips by microseconds, not by the poll interval.
            let wait = sc
                .next_at()
                .saturating_duration_since(Instant::now())
                .clamp(Duration::from_micros(50), poll);
            if wait != read_timeout && ctl.set_read_timeout(Some(wait)).is_ok() {
                read_timeout = wait;
            }
        }
        let n = match bs.recv() {
            Ok(n) => n,
            Err(_) => {
                out.tally.connection_errors += 1;
                break;
            }
        };
        let at = Instant::now();
        let mut decided = 0;
        let mut failed = 0;
        for d in 0..n {
            let (data, from) = bs.datagram(d);
            if from != cfg.target {
                continue;
            }
            for line in data.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                let (id, a) = answer::native(line);
                match id.and_then(|id| outstanding.answer(id)) {
                    Some(intended) => {
                        if out.record(a, intended, at) {
                            decided += 1;
                        } else {
                            failed += 1;
                        }
                    }
                    None => {
                        out.tally.unmatched += 1;
                        failed += 1;
                    }
                }
            }
        }
        let lost = outstanding.expire(at, cfg.timeout);
        out.tally.timeouts += lost;
        sh.decisions.fetch_add(decided, Ordering::Relaxed);
        sh.failures.fetch_add(failed + lost, Ordering::Relaxed);
    }
    if let Some(sc) = &schedule {
        out.tally.behind_schedule += sc.due(Instant::now().min(sh.stop_at())) * k;
    }
    out.tally.timeouts += outstanding.abandon();
    out.kinds = gen.counts;
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
            remaining: Some(AtomicU64::new(10)),
            decisions: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            sweep: None,
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
