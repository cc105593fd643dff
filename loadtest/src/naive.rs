//! A naive greylisting server: the reference `ceiling` measures beside the null responder.
//!
//! What a competent engineer writes in an afternoon: tokio, one task per connection (UDP: one
//! socket read by one task per core, a datagram at a time), a `DashMap` keyed by the raw
//! triplet string holding when it was first seen; DEFER until the delay has passed, PASS
//! after. No normalisation, no exemptions, no metrics, no batching. Greyhound does more per
//! request; it must still never be slower than this (one of the project's figures to reach),
//! and `ceiling` shows whether it is.

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;
use dashmap::DashMap;
use greyhound::net::udp_batch::bind_reuseport;
use greyhound::proto::{native, policy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// First sight of each raw triplet.
type Seen = Arc<DashMap<String, Instant>>;

/// The greylisting text of the naive server's DEFER answers.
const TEXT: &str = "Greylisted, see https://greylisting.org/";

/// A running naive server; stopped when dropped.
pub struct NaiveServer {
    /// Native protocol, TCP and UDP on the same port.
    pub native: SocketAddr,
    /// Postfix policy protocol.
    pub policy: SocketAddr,
    rt: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for NaiveServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NaiveServer")
            .field("native", &self.native)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

/// The naive server's decision: DEFER with the seconds left, or PASS.
fn decide(seen: &DashMap<String, Instant>, key: &str, delay: Duration) -> Option<u32> {
    let now = Instant::now();
    if let Some(first) = seen.get(key) {
        let age = now.saturating_duration_since(*first);
        return (age < delay).then(|| (delay - age).as_secs_f64().ceil() as u32);
    }
    seen.entry(key.to_string()).or_insert(now);
    Some(delay.as_secs_f64().ceil() as u32)
}

impl NaiveServer {
    /// Starts the server on free ports of `ip`, greylisting for `delay`.
    pub fn start(ip: IpAddr, delay: Duration) -> anyhow::Result<Self> {
        let cores = thread::available_parallelism().map_or(2, |n| n.get());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cores)
            .thread_name("naive")
            .enable_io()
            .build()
            .context("start the naive server's runtime")?;
        let seen: Seen = Arc::new(DashMap::new());
        // The native port must be free for TCP and UDP at once.
        let mut attempt = 0;
        let (native_l, udp) = loop {
            let l = TcpListener::bind(SocketAddr::new(ip, 0)).context("bind naive TCP")?;
            // The one concession to UDP: a receive buffer as large as the null responder's
            // and the server's (8 MiB). With the system default (~200 KiB) a window of 512
            // datagrams in flight overflows it, and the run measures loss, not the server.
            match bind_reuseport(l.local_addr()?, 1, 8 << 20, Duration::from_millis(100)) {
                Ok(mut u) => break (l, u.remove(0)),
                Err(e) if attempt >= 10 => return Err(e).context("bind naive UDP"),
                Err(_) => attempt += 1,
            }
        };
        let policy_l = TcpListener::bind(SocketAddr::new(ip, 0)).context("bind naive policy")?;
        let native = native_l.local_addr()?;
        let policy = policy_l.local_addr()?;
        let _guard = rt.enter();
        for (l, is_policy) in [(native_l, false), (policy_l, true)] {
            l.set_nonblocking(true)?;
            let l = tokio::net::TcpListener::from_std(l)?;
            let seen = seen.clone();
            rt.spawn(async move {
                while let Ok((s, _)) = l.accept().await {
                    let seen = seen.clone();
                    if is_policy {
                        tokio::spawn(policy_conn(s, seen, delay));
                    } else {
                        tokio::spawn(native_conn(s, seen, delay));
                    }
                }
            });
        }
        udp.set_nonblocking(true)?;
        let udp = Arc::new(tokio::net::UdpSocket::from_std(udp)?);
        for _ in 0..cores {
            rt.spawn(udp_task(udp.clone(), seen.clone(), delay));
        }
        drop(_guard);
        Ok(Self {
            native,
            policy,
            rt: Some(rt),
        })
    }
}

impl Drop for NaiveServer {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Answers one native request line into `out`; `key` is scratch for the triplet string.
fn native_line(
    line: &[u8],
    seen: &DashMap<String, Instant>,
    delay: Duration,
    key: &mut String,
    out: &mut Vec<u8>,
) {
    native_line_within(line, seen, delay, key, usize::MAX, out);
}

/// [`native_line`] with at most `budget` bytes for the reply: the text is shortened (down to
/// `DEFER n`) as the protocol asks of every server on UDP, and a reply that cannot fit at all
/// is left out.
fn native_line_within(
    line: &[u8],
    seen: &DashMap<String, Instant>,
    delay: Duration,
    key: &mut String,
    budget: usize,
    out: &mut Vec<u8>,
) {
    let text = std::str::from_utf8(line).unwrap_or("");
    let mut words = text.split_ascii_whitespace();
    let mut first = words.next().unwrap_or("");
    let id = if !first.is_empty() && first.bytes().all(|b| b.is_ascii_digit()) {
        let id = first;
        first = words.next().unwrap_or("");
        Some(id)
    } else {
        None
    };
    let reply = match (first, words.next(), words.next(), words.next()) {
        ("CHECK" | "PEEK", Some(ip), Some(sender), Some(rcpt)) => {
            key.clear();
            key.push_str(ip);
            key.push(' ');
            key.push_str(sender);
            key.push(' ');
            key.push_str(rcpt);
            match decide(seen, key, delay) {
                Some(seconds) => native::Reply::Defer {
                    seconds,
                    text: TEXT,
                },
                None => native::Reply::Pass { reason: "retried" },
            }
        }
        ("PING", None, _, _) => native::Reply::Pong,
        _ => native::Reply::Err {
            kind: native::ErrorKind::BadArgs,
        },
    };
    let _fits = native::encode_within(id, &reply, budget, out);
}

async fn native_conn(mut s: tokio::net::TcpStream, seen: Seen, delay: Duration) {
    let _ = s.set_nodelay(true);
    let mut buf = Vec::with_capacity(1 << 16);
    let mut out = Vec::with_capacity(1 << 14);
    let mut key = String::new();
    loop {
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(8192);
        }
        match s.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let mut pos = 0;
        while let Some(p) = buf[pos..].iter().position(|&b| b == b'\n') {
            let line = &buf[pos..pos + p];
            native_line(
                line.strip_suffix(b"\r").unwrap_or(line),
                &seen,
                delay,
                &mut key,
                &mut out,
            );
            pos += p + 1;
        }
        buf.drain(..pos);
        if s.write_all(&out).await.is_err() {
            return;
        }
        out.clear();
    }
}

async fn policy_conn(mut s: tokio::net::TcpStream, seen: Seen, delay: Duration) {
    let _ = s.set_nodelay(true);
    let limits = policy::BlockLimits::default();
    let mut buf = Vec::with_capacity(1 << 14);
    let mut out = Vec::with_capacity(1 << 12);
    let mut key = String::new();
    loop {
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(8192);
        }
        match s.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let mut pos = 0;
        loop {
            match policy::parse(&buf[pos..], &limits) {
                Ok(policy::Block::Complete { consumed, request }) => {
                    pos += consumed;
                    let defer = request.protocol_state.eq_ignore_ascii_case("RCPT") && {
                        key.clear();
                        key.push_str(request.client_address);
                        key.push(' ');
                        key.push_str(request.sender);
                        key.push(' ');
                        key.push_str(request.recipient);
                        decide(&seen, &key, delay).is_some()
                    };
                    policy::encode_action(
                        if defer {
                            "DEFER_IF_PERMIT Greylisted, see https://greylisting.org/"
                        } else {
                            "DUNNO"
                        },
                        &mut out,
                    );
                }
                Ok(policy::Block::Incomplete) => break,
                Err(_) => return,
            }
        }
        buf.drain(..pos);
        if !out.is_empty() && s.write_all(&out).await.is_err() {
            return;
        }
        out.clear();
    }
}

async fn udp_task(sock: Arc<tokio::net::UdpSocket>, seen: Seen, delay: Duration) {
    let mut buf = vec![0u8; 65_536];
    let mut out = Vec::with_capacity(65_536);
    let mut key = String::new();
    loop {
        let Ok((n, from)) = sock.recv_from(&mut buf).await else {
            continue;
        };
        out.clear();
        for line in buf[..n].split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            // No amplification, as the protocol asks: the replies may not outgrow the
            // request, so texts are cut to fit. (Dropping a whole reply instead stalled the
            // client's window for its timeout and measured loss, not the server.)
            let budget = n - out.len();
            native_line_within(
                line.strip_suffix(b"\r").unwrap_or(line),
                &seen,
                delay,
                &mut key,
                budget,
                &mut out,
            );
        }
        if !out.is_empty() {
            let _ = sock.send_to(&out, from).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_sight_defers_and_the_delay_passes() {
        let seen = DashMap::new();
        let delay = Duration::from_millis(50);
        assert_eq!(decide(&seen, "a b c", delay), Some(1));
        assert_eq!(decide(&seen, "a b c", delay), Some(1));
        thread::sleep(delay);
        assert_eq!(decide(&seen, "a b c", delay), None);
        // Raw strings: no normalisation at all.
        assert_eq!(decide(&seen, "a b C", delay), Some(1));
    }

    #[test]
    fn native_lines_are_answered_with_their_id() {
        let seen = DashMap::new();
        let (mut key, mut out) = (String::new(), Vec::new());
        let d = Duration::from_secs(300);
        native_line(
            b"7 CHECK 192.0.2.1 <a@b> <c@d>",
            &seen,
            d,
            &mut key,
            &mut out,
        );
        native_line(b"PING", &seen, d, &mut key, &mut out);
        native_line(b"CHECK 192.0.2.1", &seen, d, &mut key, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!("7 DEFER 300 {TEXT}\nPONG\nERR bad-args wrong number of arguments\n")
        );
    }
}
