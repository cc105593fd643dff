//! Stream connections, TCP and Unix alike: one accept loop, and the reads and writes of a
//! connection with its idle timeout and the server's shutdown.
//!
//! The request path waits for the socket at most once per request (once per read on a
//! pipelining client), so what that wait costs is paid per request. The first version wrapped
//! every read in `tokio::time::timeout` and a fresh `CancellationToken::cancelled()`: a timer
//! registered and removed, and a lock on the one waiter list every connection shared, for each
//! request. Here a connection owns one timer, pushed back only when it fires (see
//! [`Conn::wait_readable`]), and waits on a child token of its own, whose lock nobody else
//! takes.

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tracing::{debug, warn};

use super::metrics::{Port, Proto};
use super::Shared;

/// A connected stream socket, as the connection loops use it: non-blocking reads and writes
/// that consult tokio's cached readiness first (no system call when the socket is known not
/// to be ready), and waits for readiness.
pub(crate) trait Stream: AsFd + Send + Sync + 'static {
    /// Reads what is available, without waiting.
    fn try_read_buf(&self, buf: &mut Vec<u8>) -> io::Result<usize>;
    /// Writes what fits, without waiting.
    fn try_write(&self, buf: &[u8]) -> io::Result<usize>;
    /// Ready when a read may make progress.
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// Ready when a write may make progress.
    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

macro_rules! stream {
    ($t:ty) => {
        impl Stream for $t {
            fn try_read_buf(&self, buf: &mut Vec<u8>) -> io::Result<usize> {
                <$t>::try_read_buf(self, buf)
            }
            fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
                <$t>::try_write(self, buf)
            }
            fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                <$t>::poll_read_ready(self, cx)
            }
            fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                <$t>::poll_write_ready(self, cx)
            }
        }
    };
}
stream!(TcpStream);
stream!(UnixStream);

/// A listening socket: TCP (peers checked against the allow list) or Unix (file permissions
/// decide who may connect).
pub(crate) trait Listener: Send + 'static {
    /// The accepted connections.
    type Stream: Stream;
    /// Accepts one connection; the peer address for TCP.
    fn poll_accept(
        &self,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<(Self::Stream, Option<SocketAddr>)>>;
}

impl Listener for TcpListener {
    type Stream = TcpStream;
    fn poll_accept(
        &self,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<(TcpStream, Option<SocketAddr>)>> {
        TcpListener::poll_accept(self, cx).map_ok(|(s, peer)| {
            // Replies are written whole, once per batch: nothing to coalesce.
            let _ = s.set_nodelay(true);
            (s, Some(peer))
        })
    }
}

impl Listener for UnixListener {
    type Stream = UnixStream;
    fn poll_accept(
        &self,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<(UnixStream, Option<SocketAddr>)>> {
        UnixListener::poll_accept(self, cx).map_ok(|(s, _)| (s, None))
    }
}

/// Holds a slot of its listener's connection cap while the connection is open.
///
/// Each listener (native TCP, policy, metrics) has a cap of its own: with one shared cap, one
/// client holding thousands of idle native connections locked Postfix out of the policy port.
pub(crate) struct ConnGuard {
    shared: Arc<Shared>,
    port: Port,
}

impl ConnGuard {
    /// A slot on `port`, or `None` (counted, and logged at most every 10 s) if its cap is
    /// reached.
    pub(crate) fn try_new(shared: &Arc<Shared>, port: Port) -> Option<Self> {
        let open = &shared.open[port as usize];
        let n = open.fetch_add(1, Ordering::Relaxed);
        let max = shared.settings.limits.max_connections;
        if n >= max {
            open.fetch_sub(1, Ordering::Relaxed);
            shared.metrics.over_limit.inc();
            shared.metrics.ports.refused(port);
            if shared.cap_log[port as usize].ready(shared.started, Duration::from_secs(10)) {
                warn!(
                    listener = port.label(),
                    max_connections = max,
                    "connection limit reached on the {} port: new connections there are closed at once (logged at most every 10 s per port; see greyhound_connections_refused_total)",
                    port.label()
                );
            }
            return None;
        }
        // A scrape would otherwise count itself in the figure it reads.
        if port != Port::Metrics {
            shared.metrics.open_connections.inc();
        }
        Some(Self {
            shared: shared.clone(),
            port,
        })
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.shared.open[self.port as usize].fetch_sub(1, Ordering::Relaxed);
        if self.port != Port::Metrics {
            self.shared.metrics.open_connections.dec();
        }
    }
}

/// The shortest and longest wait after a failed accept.
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));

/// Most waiting clients closed at once when out of descriptors, before waiting again.
const SHED_AT_MOST: usize = 1024;

/// A listener's accepts, riding out failures: at the descriptor limit (EMFILE, ENFILE) the
/// kernel still completes handshakes into the listen backlog, where clients would wait
/// unanswered. So each listener keeps one spare descriptor: on EMFILE it frees it, accepts and
/// closes what waits (the clients see the connection closed and try another server or later),
/// and takes it back. Every failure is counted, logged at most every 10 s, and followed by a
/// wait that doubles up to a second while failures go on, instead of a busy loop.
pub(crate) struct Acceptor<L> {
    listener: L,
    port: Port,
    spare: Option<std::fs::File>,
    backoff: Duration,
}

impl<L: Listener> Acceptor<L> {
    /// Accepts on `listener` for `port`.
    pub(crate) fn new(listener: L, port: Port) -> Self {
        Self {
            listener,
            port,
            spare: std::fs::File::open("/dev/null").ok(),
            backoff: ACCEPT_BACKOFF.0,
        }
    }

    /// The next connection; failures are handled here (see [`Acceptor`]).
    pub(crate) async fn accept(&mut self, shared: &Shared) -> (L::Stream, Option<SocketAddr>) {
        loop {
            match poll_fn(|cx| self.listener.poll_accept(cx)).await {
                Ok(a) => {
                    self.backoff = ACCEPT_BACKOFF.0;
                    return a;
                }
                Err(e) => self.failed(&e, shared).await,
            }
        }
    }

    async fn failed(&mut self, e: &io::Error, shared: &Shared) {
        use nix::errno::Errno;
        // The peer gave up before we accepted: nothing wrong here, take the next one.
        if matches!(
            e.kind(),
            io::ErrorKind::ConnectionAborted
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::Interrupted
        ) {
            debug!(error = %e, "accept: the client went away first");
            return;
        }
        shared.metrics.ports.accept_error(self.port);
        let code = e.raw_os_error();
        let out_of_fds = code == Some(Errno::EMFILE as i32) || code == Some(Errno::ENFILE as i32);
        let shed = if out_of_fds { self.shed().await } else { 0 };
        if shared
            .accept_log
            .ready(shared.started, Duration::from_secs(10))
        {
            if out_of_fds {
                warn!(
                    listener = self.port.label(),
                    error = %e,
                    closed = shed,
                    "accept failed on the {} port: out of file descriptors; waiting clients are closed at once and accepts retried within {:?} (raise LimitNOFILE or lower max-connections; logged at most every 10 s, see greyhound_accept_errors_total)",
                    self.port.label(),
                    ACCEPT_BACKOFF.1
                );
            } else {
                warn!(
                    listener = self.port.label(),
                    error = %e,
                    "accept failed on the {} port; retrying within {:?} (logged at most every 10 s, see greyhound_accept_errors_total)",
                    self.port.label(),
                    ACCEPT_BACKOFF.1
                );
            }
        } else {
            debug!(listener = self.port.label(), error = %e, closed = shed, "accept failed");
        }
        tokio::time::sleep(self.backoff).await;
        self.backoff = (self.backoff * 2).min(ACCEPT_BACKOFF.1);
    }

    /// Frees the spare descriptor, accepts and closes the clients waiting in the backlog, and
    /// takes the spare back. Returns how many were closed.
    async fn shed(&mut self) -> usize {
        let Some(spare) = self.spare.take() else {
            return 0;
        };
        drop(spare);
        let listener = &self.listener;
        let closed = poll_fn(|cx| {
            let mut n = 0;
            while n < SHED_AT_MOST {
                match listener.poll_accept(cx) {
                    // Dropped at once: the client sees the connection closed.
                    Poll::Ready(Ok(_)) => n += 1,
                    _ => break,
                }
            }
            Poll::Ready(n)
        })
        .await;
        self.spare = std::fs::File::open("/dev/null").ok();
        closed
    }
}

/// Accepts connections for `proto` until `token` is cancelled, then waits for the open ones
/// to finish what they have read (the caller bounds how long).
pub(crate) async fn accept_loop<L: Listener>(
    listener: L,
    shared: Arc<Shared>,
    token: CancellationToken,
    proto: Proto,
) {
    let port = Port::of(proto);
    let mut acceptor = Acceptor::new(listener, port);
    let mut conns = JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = token.cancelled() => break,
            a = acceptor.accept(&shared) => a,
            // Reap finished connection tasks so the set does not grow without bound.
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        if let Some(peer) = peer {
            if !shared.allow.allows(peer.ip()) {
                shared.refuse(peer, proto.label());
                continue;
            }
        }
        // Over the cap the stream is dropped here: closed at once.
        let Some(guard) = ConnGuard::try_new(&shared, port) else {
            continue;
        };
        let (shared, token) = (shared.clone(), token.child_token());
        conns.spawn(async move {
            let _guard = guard;
            shared.metrics.connection(proto);
            let peer = peer.map_or_else(|| "unix".to_string(), |p| p.to_string());
            let idle = Duration::from_secs(u64::from(shared.settings.limits.idle_timeout_secs));
            let conn = Conn::new(stream, idle, token);
            match proto {
                Proto::Policy => super::policy::serve(conn, &peer, &shared).await,
                Proto::NativeTcp | Proto::NativeUdp => {
                    super::native_tcp::serve(conn, &peer, &shared).await
                }
            }
        });
    }
    while conns.join_next().await.is_some() {}
}

/// What a read brought.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Read {
    /// Bytes were appended to the buffer.
    Data,
    /// The peer shut down its sending side.
    Eof,
    /// Idle timeout, error or shutdown: close the connection.
    Close,
}

/// One connection's socket, idle timer and shutdown signal.
pub(crate) struct Conn<S> {
    stream: S,
    idle: Duration,
    /// When the connection last read or wrote.
    last_io: Instant,
    /// Fires no earlier than `last_io + idle`; pushed back only when it fires early.
    timer: Pin<Box<Sleep>>,
    /// The connection's own shutdown token (a child of the server's).
    token: CancellationToken,
    /// Fires when the server shuts down.
    cancelled: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl<S: Stream> Conn<S> {
    fn new(stream: S, idle: Duration, token: CancellationToken) -> Self {
        let now = Instant::now();
        Self {
            stream,
            idle,
            last_io: now,
            timer: Box::pin(tokio::time::sleep_until(now + idle)),
            cancelled: Box::pin(token.clone().cancelled_owned()),
            token,
        }
    }

    /// Appends what the peer sent to `buf`, waiting for it if need be. Once the server shuts
    /// down, the next read closes the connection (what was read before has been answered),
    /// so a client that never stops sending cannot hold the shutdown up.
    pub(crate) async fn read(&mut self, buf: &mut Vec<u8>) -> Read {
        // The connection's own token: checking it locks nothing another connection uses.
        if self.token.is_cancelled() {
            return Read::Close;
        }
        // `try_read_buf` and `try_write` take no part in tokio's cooperative budget: a client
        // that keeps its socket readable would never let this task yield, starving every other
        // task of its worker (the signal handler included). One unit of budget per read makes
        // the task yield after tokio's usual 128.
        tokio::task::coop::consume_budget().await;
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(8192);
        }
        loop {
            match self.stream.try_read_buf(buf) {
                Ok(0) => return Read::Eof,
                Ok(_) => {
                    self.last_io = Instant::now();
                    return Read::Data;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    debug!(error = %e, "read failed");
                    return Read::Close;
                }
            }
            if !self.wait_readable().await {
                return Read::Close;
            }
        }
    }

    /// Waits until the socket is readable; `false` on idle timeout, error or shutdown.
    async fn wait_readable(&mut self) -> bool {
        loop {
            let ready = tokio::select! {
                biased;
                r = poll_fn(|cx| self.stream.poll_read_ready(cx)) => r,
                _ = self.cancelled.as_mut() => return false,
                _ = self.timer.as_mut() => {
                    let deadline = self.last_io + self.idle;
                    if Instant::now() >= deadline {
                        debug!("idle timeout");
                        return false;
                    }
                    // Activity since the timer was set: wait for the rest of the idle time.
                    self.timer.as_mut().reset(deadline);
                    continue;
                }
            };
            return ready.is_ok();
        }
    }

    /// Writes all of `out`; `false` if the peer stopped reading for the idle time, or on error.
    pub(crate) async fn write_all(&mut self, mut out: &[u8]) -> bool {
        loop {
            match self.stream.try_write(out) {
                Ok(n) if n == out.len() => {
                    self.last_io = Instant::now();
                    return true;
                }
                Ok(n) => out = &out[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    debug!(error = %e, "write failed");
                    return false;
                }
            }
            // The slow path (the peer is not reading): a timer of its own is fine here.
            let writable = poll_fn(|cx| self.stream.poll_write_ready(cx));
            match tokio::time::timeout(self.idle, writable).await {
                Ok(Ok(())) => {}
                _ => return false,
            }
        }
    }

    /// Sends FIN after everything written, so the peer reads all answers before the end.
    pub(crate) fn shutdown(&self) {
        let _ = nix::sys::socket::shutdown(
            std::os::fd::AsRawFd::as_raw_fd(&self.stream.as_fd()),
            nix::sys::socket::Shutdown::Write,
        );
    }
}
