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
use tracing::debug;

use super::metrics::Proto;
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

/// Accepts connections for `proto` until `token` is cancelled, then waits for the open ones
/// to finish what they have read (the caller bounds how long).
pub(crate) async fn accept_loop<L: Listener>(
    listener: L,
    shared: Arc<Shared>,
    token: CancellationToken,
    proto: Proto,
) {
    let mut conns = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = token.cancelled() => break,
            a = poll_fn(|cx| listener.poll_accept(cx)) => a,
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
        if let Some(peer) = peer {
            if !shared.allow.allows(peer.ip()) {
                shared.refuse(peer, proto.label());
                continue;
            }
        }
        let (shared, token) = (shared.clone(), token.child_token());
        conns.spawn(async move {
            let Some(_guard) = ConnGuard::try_new(&shared) else {
                return;
            };
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
