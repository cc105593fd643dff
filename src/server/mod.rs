//! The daemon: tokio listeners for the native protocol (TCP), the Postfix policy protocol
//! (TCP or Unix socket) and metrics (HTTP); plain threads for UDP (batched `recvmmsg` /
//! `sendmmsg`, one `SO_REUSEPORT` socket per core) and for expiry. All of it is a thin shell
//! around [`crate::engine::Engine`].
//!
//! Requests are answered inline on their connection or socket, never one task per request:
//! a TCP read's complete lines are decided as one engine batch and answered with one write.

pub mod metrics;
mod native;
mod policy;
pub mod snapshots;
pub mod udp_batch;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use crate::config::{Limits, PolicyAddr};
use crate::engine::Engine;
use crate::proto::native as wire;
use metrics::{Metrics, Proto, Tally};

/// What the connection loops need besides the engine.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Greylist text template (`%s %r %c %h %d`).
    pub greylist_text: String,
    /// Whether `%c` occurs in the template (so the address is formatted only then).
    pub template_uses_client: bool,
    /// Add `X-Greylist:` on the first pass of a retried triplet (policy protocol).
    pub x_greylist_header: bool,
    /// Host name written in that header.
    pub hostname: String,
    /// Input bounds.
    pub limits: Limits,
}

impl Settings {
    /// Settings with the given template and the rest defaulted.
    pub fn new(
        greylist_text: String,
        x_greylist_header: bool,
        hostname: String,
        limits: Limits,
    ) -> Self {
        Self {
            template_uses_client: greylist_text.contains("%c"),
            greylist_text,
            x_greylist_header,
            hostname,
            limits,
        }
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
    open: AtomicUsize,
    started: Instant,
    refused_log: RateLimit,
    error_log: RateLimit,
}

impl Shared {
    /// Shared state for a server.
    pub fn new(engine: Arc<Engine>, allow: AllowList, settings: Settings) -> Self {
        Self {
            engine,
            metrics: Metrics::new(),
            allow,
            settings,
            open: AtomicUsize::new(0),
            started: Instant::now(),
            refused_log: RateLimit::default(),
            error_log: RateLimit::default(),
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

/// Where the Postfix policy listener is bound.
#[derive(Debug)]
pub enum PolicyListener {
    /// A TCP socket.
    Tcp(std::net::TcpListener),
    /// A Unix socket, removed again at shutdown.
    Unix(std::os::unix::net::UnixListener, PathBuf),
}

/// Every socket the server serves, bound before the runtime starts so that an unusable
/// address fails at start with a clear message.
#[derive(Debug)]
pub struct Listeners {
    /// Native protocol, TCP.
    pub native_tcp: std::net::TcpListener,
    /// Native protocol, UDP: one socket per worker thread, same port.
    pub native_udp: Vec<std::net::UdpSocket>,
    /// Postfix policy protocol.
    pub policy: PolicyListener,
    /// Metrics HTTP.
    pub metrics: std::net::TcpListener,
}

/// A listener that could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen for {what} on {addr}: {source}")]
pub struct BindError {
    /// Which listener.
    pub what: &'static str,
    /// The address as configured.
    pub addr: String,
    /// Why.
    pub source: io::Error,
}

fn tcp_listener(what: &'static str, addr: SocketAddr) -> Result<std::net::TcpListener, BindError> {
    let err = |source| BindError {
        what,
        addr: addr.to_string(),
        source,
    };
    let l = std::net::TcpListener::bind(addr).map_err(err)?;
    l.set_nonblocking(true).map_err(err)?;
    Ok(l)
}

impl Listeners {
    /// Binds every listener. `udp_workers` sockets share the native port.
    pub fn bind(
        native: SocketAddr,
        policy: &PolicyAddr,
        metrics: SocketAddr,
        udp_workers: usize,
    ) -> Result<Self, BindError> {
        let native_tcp = tcp_listener("the native protocol (TCP)", native)?;
        // Port 0 means "any": UDP takes the port TCP got, so both share one number.
        let udp_addr = native_tcp.local_addr().map_err(|source| BindError {
            what: "the native protocol (TCP)",
            addr: native.to_string(),
            source,
        })?;
        let native_udp = udp_batch::bind_reuseport(
            udp_addr,
            udp_workers.max(1),
            8 << 20,
            Duration::from_millis(200),
        )
        .map_err(|source| BindError {
            what: "the native protocol (UDP)",
            addr: udp_addr.to_string(),
            source,
        })?;
        let policy = match policy {
            PolicyAddr::Tcp(a) => {
                PolicyListener::Tcp(tcp_listener("the Postfix policy protocol", *a)?)
            }
            PolicyAddr::Unix(path) => {
                let err = |source| BindError {
                    what: "the Postfix policy protocol",
                    addr: path.display().to_string(),
                    source,
                };
                // A socket file left by a previous run that crashed would make bind fail;
                // remove it only if it is a socket nobody answers on.
                if std::os::unix::net::UnixStream::connect(path).is_err() {
                    if let Ok(meta) = std::fs::symlink_metadata(path) {
                        use std::os::unix::fs::FileTypeExt;
                        if meta.file_type().is_socket() {
                            let _ = std::fs::remove_file(path);
                        }
                    }
                }
                let l = std::os::unix::net::UnixListener::bind(path).map_err(err)?;
                l.set_nonblocking(true).map_err(err)?;
                PolicyListener::Unix(l, path.clone())
            }
        };
        let metrics = tcp_listener("metrics (HTTP)", metrics)?;
        Ok(Self {
            native_tcp,
            native_udp,
            policy,
            metrics,
        })
    }

    /// A one-line description of the bound addresses, for the startup log and for tests.
    pub fn describe(&self) -> String {
        let addr =
            |l: &std::net::TcpListener| l.local_addr().map(|a| a.to_string()).unwrap_or_default();
        let policy = match &self.policy {
            PolicyListener::Tcp(l) => addr(l),
            PolicyListener::Unix(_, p) => format!("unix:{}", p.display()),
        };
        format!(
            "native={} policy={} metrics={}",
            addr(&self.native_tcp),
            policy,
            addr(&self.metrics)
        )
    }
}

fn idle(limits: &Limits) -> Duration {
    Duration::from_secs(u64::from(limits.idle_timeout_secs))
}

/// Counts a connection while it is open; releases its slot when dropped.
struct ConnGuard<'a>(&'a Shared);

impl<'a> ConnGuard<'a> {
    fn try_new(shared: &'a Shared) -> Option<Self> {
        let n = shared.open.fetch_add(1, Ordering::Relaxed);
        if n >= shared.settings.limits.max_connections {
            shared.open.fetch_sub(1, Ordering::Relaxed);
            shared.metrics.over_limit.inc();
            return None;
        }
        shared.metrics.open_connections.inc();
        Some(Self(shared))
    }
}

impl Drop for ConnGuard<'_> {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
        self.0.metrics.open_connections.dec();
    }
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
    let native = TcpListener::from_std(listeners.native_tcp)?;
    tasks.spawn(accept_tcp(
        native,
        shared.clone(),
        shutdown.clone(),
        Proto::NativeTcp,
    ));
    let unix_path = match listeners.policy {
        PolicyListener::Tcp(l) => {
            tasks.spawn(accept_tcp(
                TcpListener::from_std(l)?,
                shared.clone(),
                shutdown.clone(),
                Proto::Policy,
            ));
            None
        }
        PolicyListener::Unix(l, path) => {
            tasks.spawn(accept_unix(
                UnixListener::from_std(l)?,
                shared.clone(),
                shutdown.clone(),
            ));
            Some(path)
        }
    };
    tasks.spawn(accept_metrics(
        TcpListener::from_std(listeners.metrics)?,
        shared.clone(),
        shutdown.clone(),
    ));

    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for (n, sock) in listeners.native_udp.into_iter().enumerate() {
        let (shared, stop) = (shared.clone(), stop.clone());
        threads.push(
            std::thread::Builder::new()
                .name(format!("udp-{n}"))
                .spawn(move || udp_worker(sock, &shared, &stop))?,
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
    if let Some(path) = unix_path {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

/// Accepts TCP connections for the native or policy protocol.
async fn accept_tcp(
    listener: TcpListener,
    shared: Arc<Shared>,
    token: CancellationToken,
    proto: Proto,
) {
    let mut conns = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = token.cancelled() => break,
            a = listener.accept() => a,
            // Reap finished connection tasks so the set does not grow without bound.
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                debug!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if !shared.allow.allows(peer.ip()) {
            shared.refuse(
                peer,
                if proto == Proto::Policy {
                    "policy"
                } else {
                    "native-tcp"
                },
            );
            continue;
        }
        let _ = stream.set_nodelay(true);
        let (shared, token) = (shared.clone(), token.clone());
        conns.spawn(async move {
            let Some(_guard) = ConnGuard::try_new(&shared) else {
                return;
            };
            shared.metrics.connections[proto as usize].inc();
            match proto {
                Proto::Policy => policy::serve(stream, peer.to_string(), &shared, &token).await,
                _ => native_tcp(stream, peer, &shared, &token).await,
            }
        });
    }
    // Connections finish what they have read; the caller bounds how long that may take.
    while conns.join_next().await.is_some() {}
}

/// Accepts Postfix policy connections on a Unix socket (file permissions decide who may).
async fn accept_unix(listener: UnixListener, shared: Arc<Shared>, token: CancellationToken) {
    let mut conns = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = token.cancelled() => break,
            a = listener.accept() => a,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let (shared, token) = (shared.clone(), token.clone());
        conns.spawn(async move {
            let Some(_guard) = ConnGuard::try_new(&shared) else {
                return;
            };
            shared.metrics.connections[Proto::Policy as usize].inc();
            policy::serve(stream, "unix".to_string(), &shared, &token).await;
        });
    }
    while conns.join_next().await.is_some() {}
}

/// Reads with the idle timeout; `None` when the connection should close (timeout, error,
/// shutdown), `Some(0)` at end of input.
async fn read_some<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    idle: Duration,
    token: &CancellationToken,
) -> Option<usize> {
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(8192);
    }
    tokio::select! {
        _ = token.cancelled() => None,
        r = tokio::time::timeout(idle, stream.read_buf(buf)) => match r {
            Ok(Ok(n)) => Some(n),
            Ok(Err(e)) => { debug!(error = %e, "read failed"); None }
            Err(_) => None,
        },
    }
}

async fn write_all<S: AsyncWrite + Unpin>(stream: &mut S, out: &[u8], idle: Duration) -> bool {
    matches!(
        tokio::time::timeout(idle, stream.write_all(out)).await,
        Ok(Ok(()))
    )
}

/// One native-protocol TCP connection: pipelined lines, answered in order, one write per read.
async fn native_tcp(
    mut stream: TcpStream,
    peer: SocketAddr,
    shared: &Shared,
    token: &CancellationToken,
) {
    let limits = &shared.settings.limits;
    let mut buf: Vec<u8> = Vec::with_capacity(16 << 10);
    let mut out: Vec<u8> = Vec::with_capacity(16 << 10);
    let mut texts = native::TextBuf::default();
    let mut tally = Tally::default();
    let mut skipping = false;
    let mut eof = false;
    let mut more = false;
    loop {
        if !more && !eof {
            match read_some(&mut stream, &mut buf, idle(limits), token).await {
                None => break,
                Some(0) => eof = true,
                Some(_) => {}
            }
        }
        let mut pos = 0;
        more = false;
        {
            let mut reqs: Vec<native::Parsed<'_>> = Vec::new();
            loop {
                if skipping {
                    let (n, found) = wire::skip_line(&buf[pos..]);
                    pos += n;
                    if !found {
                        break;
                    }
                    skipping = false;
                }
                if reqs.len() >= limits.requests_per_read {
                    more = true;
                    break;
                }
                match wire::parse(&buf[pos..], limits.max_line) {
                    wire::Frame::Incomplete => {
                        // At end of input a last line without '\n' still counts (Exim sends one).
                        if eof && pos < buf.len() {
                            let rest = &buf[pos..];
                            let rest = rest.strip_suffix(b"\r").unwrap_or(rest);
                            reqs.push(wire::parse_line(rest));
                            pos = buf.len();
                        }
                        break;
                    }
                    wire::Frame::Line { consumed, parsed } => {
                        reqs.push(parsed);
                        pos += consumed;
                    }
                    wire::Frame::TooLong { consumed } => {
                        reqs.push(Err(wire::too_long(&buf[pos..pos + consumed])));
                        pos += consumed;
                        skipping = true;
                    }
                }
            }
            native::answer(shared, &reqs, &mut texts, &mut tally, |id, reply| {
                wire::encode(id, reply, &mut out)
            });
        }
        buf.drain(..pos);
        shared.metrics.flush(Proto::NativeTcp, &mut tally);
        if !out.is_empty() {
            if !write_all(&mut stream, &out, idle(limits)).await {
                break;
            }
            out.clear();
        }
        if eof && !more {
            break;
        }
    }
    let _ = stream.shutdown().await;
    debug!(%peer, "native connection closed");
}

/// The UDP worker: batches of datagrams in, one engine batch, batches of replies out. A reply
/// is never larger than its request: texts are shortened and replies that cannot fit dropped.
fn udp_worker(sock: std::net::UdpSocket, shared: &Shared, stop: &AtomicBool) {
    let limits = &shared.settings.limits;
    let mut bs = udp_batch::BatchSocket::new(sock, 64, limits.udp_max_datagram);
    let mut texts = native::TextBuf::default();
    let mut tally = Tally::default();
    let mut out: Vec<u8> = Vec::new();
    // Every reply in its full and its shortest form, as (full start, end, short start, end).
    let (mut full, mut short): (Vec<u8>, Vec<u8>) = (Vec::new(), Vec::new());
    let mut forms: Vec<(usize, usize, usize, usize)> = Vec::new();
    // (datagram, number of its lines) for each datagram answered, in order.
    let mut runs: Vec<(usize, usize)> = Vec::new();
    let mut spans: Vec<(usize, usize, usize)> = Vec::new(); // (datagram, start, end) in `out`
    while !stop.load(Ordering::Relaxed) {
        let n = match bs.recv() {
            Ok(0) => continue,
            Ok(n) => n,
            Err(e) => {
                debug!(error = %e, "udp receive failed");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        out.clear();
        spans.clear();
        runs.clear();
        {
            // The lines of all datagrams, in datagram order.
            let mut reqs: Vec<native::Parsed<'_>> = Vec::new();
            for d in 0..n {
                let (data, from) = bs.datagram(d);
                if !shared.allow.allows(from.ip()) {
                    shared.refuse(from, "native-udp");
                    continue;
                }
                if bs.truncated(d) {
                    tally.error("udp-truncated");
                    continue;
                }
                let before = reqs.len();
                let body = data.strip_suffix(b"\n").unwrap_or(data);
                for line in body.split(|&b| b == b'\n') {
                    let line = line.strip_suffix(b"\r").unwrap_or(line);
                    reqs.push(if line.len() > limits.max_line {
                        Err(wire::too_long(line))
                    } else {
                        wire::parse_line(line)
                    });
                }
                runs.push((d, reqs.len() - before));
            }
            // Which form of each reply a datagram can afford is decided once all of its
            // replies are known.
            full.clear();
            short.clear();
            forms.clear();
            native::answer(shared, &reqs, &mut texts, &mut tally, |id, reply| {
                let (f, s) = (full.len(), short.len());
                wire::encode(id, reply, &mut full);
                native::encode_shortest(id, reply, &mut short);
                forms.push((f, full.len(), s, short.len()));
            });
        }
        let mut first = 0;
        for &(d, count) in &runs {
            let lines = forms[first..first + count]
                .iter()
                .map(|&(f0, f1, s0, s1)| (&full[f0..f1], &short[s0..s1]));
            let begin = out.len();
            native::fit_replies(lines, bs.datagram(d).0.len(), &mut out);
            if out.len() > begin {
                spans.push((d, begin, out.len()));
            }
            first += count;
        }
        shared.metrics.flush(Proto::NativeUdp, &mut tally);
        let replies: Vec<(SocketAddr, &[u8])> = spans
            .iter()
            .map(|&(d, s, e)| (bs.datagram(d).1, &out[s..e]))
            .collect();
        if let Err(e) = bs.send(&replies) {
            debug!(error = %e, "udp send failed");
        }
    }
}

/// Expires records once a second, in small steps (see `Engine::expire`).
fn expiry_loop(shared: &Shared, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        let stats = shared.engine.expire(shared.engine.now());
        if stats.removed > 0 {
            shared.metrics.expired.inc_by(stats.removed as u64);
        }
        for _ in 0..10 {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Serves `GET /metrics` (Prometheus text format); anything else gets 404.
async fn accept_metrics(listener: TcpListener, shared: Arc<Shared>, token: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            _ = token.cancelled() => break,
            a = listener.accept() => a,
        };
        let Ok((mut stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut buf = Vec::with_capacity(1024);
            let fut = async {
                // A request head larger than 8 KiB is not a scrape.
                while buf.len() < 8192 && !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    let mut chunk = [0u8; 1024];
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let line = buf
                    .split(|&b| b == b'\r' || b == b'\n')
                    .next()
                    .unwrap_or(&[]);
                let mut parts = line.split(|&b| b == b' ');
                let (method, path) = (parts.next().unwrap_or(&[]), parts.next().unwrap_or(&[]));
                let (status, ctype, body) = if method == b"GET"
                    && (path == b"/metrics" || path.starts_with(b"/metrics?"))
                {
                    (
                        "200 OK",
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        shared.metrics.render(&shared.engine),
                    )
                } else {
                    (
                        "404 Not Found",
                        "text/plain; charset=utf-8",
                        "not found: try GET /metrics\n".to_string(),
                    )
                };
                let head = format!("HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(body.as_bytes()).await;
                let _ = stream.shutdown().await;
            };
            let _ = tokio::time::timeout(Duration::from_secs(5), fut).await;
        });
    }
}

/// Announces the listeners once everything is up (tests and scripts wait for this line).
pub fn announce(listeners: &Listeners) {
    info!(target: "greyhound", "ready {}", listeners.describe());
}
