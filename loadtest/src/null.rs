//! Null responders: the server's transports with a constant answer and no engine.
//!
//! They frame and batch exactly as the server does (tokio for TCP, one write per read;
//! `SO_REUSEPORT` sockets with `recvmmsg`/`sendmmsg` for UDP, one thread per core), so what
//! they reach is what this machine's network stack and the load generator allow: the
//! ceiling against which the server's figures are stated. The UDP responder echoes request
//! IDs so the client's matching works, and can drop every n-th datagram for tests.

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use anyhow::Context;
use greyhound::net::udp_batch::{bind_reuseport, BatchSocket};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The native answer: a PASS, as most real traffic is.
const NATIVE_ANSWER: &[u8] = b"PASS known\n";
/// The policy answer.
const POLICY_ANSWER: &[u8] = b"action=DUNNO\n\n";

/// How the null responder behaves.
#[derive(Debug, Clone, Copy, Default)]
pub struct NullOptions {
    /// Drop every n-th UDP datagram instead of answering it (tests of loss accounting).
    pub udp_drop_every: Option<u64>,
}

/// Running null responders; stopped when dropped.
pub struct NullResponder {
    /// Native protocol, TCP and UDP on the same port.
    pub native: SocketAddr,
    /// Postfix policy protocol.
    pub policy: SocketAddr,
    stop: Arc<AtomicBool>,
    dropped: Arc<AtomicU64>,
    udp_threads: Vec<thread::JoinHandle<()>>,
    rt: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for NullResponder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NullResponder")
            .field("native", &self.native)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl NullResponder {
    /// Starts the responders on free ports of loopback address `ip`.
    pub fn start(ip: IpAddr, opts: NullOptions) -> anyhow::Result<Self> {
        let cores = thread::available_parallelism().map_or(2, |n| n.get());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cores)
            .thread_name("null-tcp")
            .enable_io()
            .build()
            .context("start the null responder's runtime")?;
        // The native port must be free for TCP and UDP at once; another program may hold
        // the UDP side of a port the kernel gave us for TCP, so try a few.
        let mut attempt = 0;
        let (native_l, socks) = loop {
            let l = TcpListener::bind(SocketAddr::new(ip, 0)).context("bind null TCP")?;
            let addr = l.local_addr()?;
            match bind_reuseport(addr, cores, 8 << 20, Duration::from_millis(50)) {
                Ok(socks) => break (l, socks),
                Err(e) if attempt >= 10 => return Err(e).context("bind null UDP"),
                Err(_) => attempt += 1,
            }
        };
        let policy_l = TcpListener::bind(SocketAddr::new(ip, 0)).context("bind null policy")?;
        let native = native_l.local_addr()?;
        let policy = policy_l.local_addr()?;
        for (l, sep, answer) in [
            (native_l, &b"\n"[..], NATIVE_ANSWER),
            (policy_l, &b"\n\n"[..], POLICY_ANSWER),
        ] {
            l.set_nonblocking(true)?;
            let _guard = rt.enter();
            let l = tokio::net::TcpListener::from_std(l)?;
            rt.spawn(async move {
                while let Ok((s, _)) = l.accept().await {
                    tokio::spawn(tcp_conn(s, sep, answer));
                }
            });
        }
        let stop = Arc::new(AtomicBool::new(false));
        let dropped = Arc::new(AtomicU64::new(0));
        let seen = Arc::new(AtomicU64::new(0));
        let udp_threads = socks
            .into_iter()
            .map(|sock| {
                let (stop, dropped, seen) = (stop.clone(), dropped.clone(), seen.clone());
                thread::Builder::new()
                    .name("null-udp".into())
                    .spawn(move || udp_loop(sock, &stop, &dropped, &seen, opts.udp_drop_every))
                    .expect("spawn null UDP thread")
            })
            .collect();
        Ok(Self {
            native,
            policy,
            stop,
            dropped,
            udp_threads,
            rt: Some(rt),
        })
    }

    /// UDP datagrams dropped on purpose so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl Drop for NullResponder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.udp_threads.drain(..) {
            let _ = t.join();
        }
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// One TCP connection: answer every complete request in what was read, in one write.
async fn tcp_conn(mut s: tokio::net::TcpStream, sep: &'static [u8], answer: &'static [u8]) {
    let _ = s.set_nodelay(true);
    let mut buf = Vec::with_capacity(1 << 16);
    let mut out = Vec::with_capacity(1 << 14);
    loop {
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(8192);
        }
        match s.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let mut pos = 0;
        while let Some(p) = find(&buf[pos..], sep) {
            pos += p + sep.len();
            out.extend_from_slice(answer);
        }
        buf.drain(..pos);
        if s.write_all(&out).await.is_err() {
            return;
        }
        out.clear();
    }
}

fn find(hay: &[u8], sep: &[u8]) -> Option<usize> {
    if sep.len() == 1 {
        hay.iter().position(|&b| b == sep[0])
    } else {
        hay.windows(sep.len()).position(|w| w == sep)
    }
}

/// One UDP socket: a batch in, a batch of replies out; each request line answered
/// `[ID ]PASS known`, which is never longer than the request (as the server guarantees).
fn udp_loop(
    sock: std::net::UdpSocket,
    stop: &AtomicBool,
    dropped: &AtomicU64,
    seen: &AtomicU64,
    drop_every: Option<u64>,
) {
    let mut bs = BatchSocket::new(sock, 64, 65_507);
    let mut out = Vec::with_capacity(1 << 16);
    let mut spans = Vec::with_capacity(64);
    while !stop.load(Ordering::Relaxed) {
        let Ok(n) = bs.recv() else { continue };
        out.clear();
        spans.clear();
        for d in 0..n {
            let (data, from) = bs.datagram(d);
            let nth = seen.fetch_add(1, Ordering::Relaxed) + 1;
            if drop_every.is_some_and(|k| k > 0 && nth % k == 0) {
                dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let start = out.len();
            for line in data.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                let id_len = line.iter().take_while(|b| b.is_ascii_digit()).count();
                if id_len > 0 && line.get(id_len) == Some(&b' ') {
                    out.extend_from_slice(&line[..=id_len]);
                }
                out.extend_from_slice(NATIVE_ANSWER);
            }
            spans.push((from, start, out.len()));
        }
        let replies: Vec<(SocketAddr, &[u8])> =
            spans.iter().map(|&(a, s, e)| (a, &out[s..e])).collect();
        let _ = bs.send(&replies);
    }
}
