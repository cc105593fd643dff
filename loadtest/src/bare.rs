//! The minimal client (`--minimal`): the reference the real client is measured against.
//!
//! It sends one fixed request (or datagram) over and over and counts the replies by their line
//! ends, reading nothing else: no workload, no parsing, no latency. It moves bytes the same
//! way as [`crate::client`] (same threads, one epoll set per thread, one `read`/`write` or
//! `recvmmsg`/`sendmmsg` per batch), so the ratio of the two is what the real client's
//! per-request work costs. A reply is counted as a decision (reported as `PASS other`) because
//! the minimal client does not read it; point it only at a null responder or a server whose
//! answers are known to be decisions.

use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Instant;

use mio::{Events, Poll};

use crate::answer::PASS_REASONS;
use crate::client::{
    registered_tcp_stream, registered_udp_socket, Proto, RunConfig, Shared, WorkerOut,
    HOUSEKEEPING, MAX_DATAGRAM, UDP_BATCH,
};
use crate::workload::{RequestWriter, WorkloadConfig};

/// Counts `n` replies as decisions.
fn count(out: &mut WorkerOut, sh: &Shared, n: u64) {
    out.tally.pass[PASS_REASONS.len() - 1] += n;
    sh.decisions.fetch_add(n, Ordering::Relaxed);
}

/// One thread of the minimal client.
pub(crate) fn thread(
    cfg: &RunConfig,
    sh: &Shared,
    workers: &[usize],
    _writer: RequestWriter,
) -> WorkerOut {
    match cfg.proto {
        Proto::NativeUdp => udp(cfg, sh, workers),
        _ => tcp(cfg, sh, workers),
    }
}

/// The fixed request: the first triplet of the default workload.
fn request(cfg: &RunConfig, id: Option<u64>) -> Vec<u8> {
    let mut w = RequestWriter::default();
    let mut out = Vec::new();
    let wl = WorkloadConfig::default();
    if cfg.proto == Proto::Policy {
        w.policy(&wl, 0, &mut out);
    } else {
        w.native(&wl, 0, id, &mut out);
    }
    out
}

struct Conn {
    stream: mio::net::TcpStream,
    inflight: usize,
    out: Vec<u8>,
    out_at: usize,
    /// Policy: whether the last byte read was a `\n` (a reply ends with `\n\n`, which a read
    /// may split).
    after_newline: bool,
    stopping: bool,
    done: bool,
    last_reply: Instant,
}

fn tcp(cfg: &RunConfig, sh: &Shared, workers: &[usize]) -> WorkerOut {
    let mut out = WorkerOut::new();
    let policy = cfg.proto == Proto::Policy;
    let window = if policy { 1 } else { cfg.pipeline };
    let req = request(cfg, None);
    let Ok(mut poll) = Poll::new() else {
        workers.iter().for_each(|_| out.failed(sh));
        return out;
    };
    let mut conns = Vec::new();
    for _ in workers {
        let s = registered_tcp_stream(cfg, cfg.target, &poll, conns.len());
        match s {
            Ok(stream) => conns.push(Conn {
                stream,
                inflight: 0,
                out: Vec::with_capacity(window * req.len()),
                out_at: 0,
                after_newline: false,
                stopping: false,
                done: false,
                last_reply: Instant::now(),
            }),
            Err(_) => out.failed(sh),
        }
    }
    let mut buf = vec![0u8; 1 << 16];
    let mut events = Events::with_capacity(conns.len() + 1);
    let send = |c: &mut Conn, out: &mut WorkerOut| {
        if !c.stopping && c.inflight < window {
            let n = sh.claim((window - c.inflight) as u64);
            if n == 0 {
                c.stopping = true;
            }
            for _ in 0..n {
                c.out.extend_from_slice(&req);
            }
            c.inflight += n as usize;
            out.sent += n;
        }
        while c.out_at < c.out.len() {
            match c.stream.write(&c.out[c.out_at..]) {
                Ok(n) if n > 0 => c.out_at += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                _ => {
                    c.done = true;
                    out.failed(sh);
                    return;
                }
            }
        }
        c.out.clear();
        c.out_at = 0;
        if c.stopping && c.inflight == 0 {
            c.done = true;
        }
    };
    for c in &mut conns {
        send(c, &mut out);
    }
    let mut next_check = Instant::now() + HOUSEKEEPING;
    while conns.iter().any(|c| !c.done) {
        let wait = next_check.saturating_duration_since(Instant::now());
        if poll.poll(&mut events, Some(wait)).is_err() {
            continue;
        }
        for ev in &events {
            let c = &mut conns[ev.token().0];
            if c.done {
                continue;
            }
            let mut replies = 0;
            loop {
                match c.stream.read(&mut buf) {
                    Ok(0) => {
                        c.done = true;
                        out.failed(sh);
                        break;
                    }
                    Ok(n) => {
                        if policy {
                            for &b in &buf[..n] {
                                if b != b'\n' {
                                    c.after_newline = false;
                                } else if c.after_newline {
                                    replies += 1;
                                    c.after_newline = false;
                                } else {
                                    c.after_newline = true;
                                }
                            }
                        } else {
                            replies += buf[..n].iter().filter(|&&b| b == b'\n').count();
                        }
                        if n < buf.len() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => {
                        c.done = true;
                        out.failed(sh);
                        break;
                    }
                }
            }
            if replies > 0 {
                c.last_reply = Instant::now();
            }
            let replies = replies.min(c.inflight);
            c.inflight -= replies;
            count(&mut out, sh, replies as u64);
            if !c.done {
                send(c, &mut out);
            }
        }
        let now = Instant::now();
        if now >= next_check {
            next_check = now + HOUSEKEEPING;
            for c in conns.iter_mut().filter(|c| !c.done) {
                if sh.stop.load(Ordering::Relaxed) {
                    c.stopping = true;
                }
                if c.inflight > 0 && now - c.last_reply >= cfg.timeout {
                    c.done = true;
                }
                if c.stopping && c.inflight == 0 {
                    c.done = true;
                }
            }
        }
    }
    for c in &conns {
        out.tally.timeouts += c.inflight as u64;
    }
    out
}

fn udp(cfg: &RunConfig, sh: &Shared, workers: &[usize]) -> WorkerOut {
    let mut out = WorkerOut::new();
    let k = cfg.per_datagram;
    let mut dgram = Vec::new();
    for _ in 0..k {
        dgram.extend_from_slice(&request(cfg, Some(1)));
    }
    assert!(dgram.len() <= MAX_DATAGRAM);
    // The same datagram, as many times as one sendmmsg takes: built once.
    let batch: Vec<(SocketAddr, &[u8])> = vec![(cfg.target, &dgram[..]); UDP_BATCH];
    let Ok(mut poll) = Poll::new() else {
        workers.iter().for_each(|_| out.failed(sh));
        return out;
    };
    struct Sock {
        bs: greyhound::net::udp_batch::BatchSocket,
        _ctl: std::net::UdpSocket,
        inflight: usize,
        stopping: bool,
        last_reply: Instant,
    }
    let mut socks = Vec::new();
    for _ in workers {
        let s = registered_udp_socket(cfg.target, &poll, socks.len());
        match s {
            Ok((bs, ctl)) => socks.push(Sock {
                bs,
                _ctl: ctl,
                inflight: 0,
                stopping: false,
                last_reply: Instant::now(),
            }),
            Err(_) => out.failed(sh),
        }
    }
    let send = |s: &mut Sock, out: &mut WorkerOut| {
        let room = (cfg.pipeline - s.inflight).min(UDP_BATCH);
        if s.stopping || room == 0 {
            return;
        }
        let n = sh.claim((room * k) as u64) as usize;
        if n == 0 {
            s.stopping = true;
            return;
        }
        // A partial claim still sends whole datagrams: the budget is a bound, not exact.
        let datagrams = n.div_ceil(k);
        let _ = s.bs.send(&batch[..datagrams]);
        s.inflight += datagrams;
        out.sent += (datagrams * k) as u64;
    };
    for s in &mut socks {
        send(s, &mut out);
    }
    let mut events = Events::with_capacity(socks.len() + 1);
    let mut next_check = Instant::now() + HOUSEKEEPING;
    while socks.iter().any(|s| !(s.stopping && s.inflight == 0)) {
        let wait = next_check.saturating_duration_since(Instant::now());
        if poll.poll(&mut events, Some(wait)).is_err() {
            continue;
        }
        for ev in &events {
            let s = &mut socks[ev.token().0];
            while let Ok(n) = s.bs.recv() {
                let mut replies = 0;
                for d in 0..n {
                    let (data, _) = s.bs.datagram(d);
                    replies += data.iter().filter(|&&b| b == b'\n').count();
                }
                s.inflight = s.inflight.saturating_sub(n);
                count(&mut out, sh, replies as u64);
                if n > 0 {
                    s.last_reply = Instant::now();
                }
                if n < UDP_BATCH {
                    break;
                }
            }
            send(s, &mut out);
        }
        let now = Instant::now();
        if now >= next_check {
            next_check = now + HOUSEKEEPING;
            for s in &mut socks {
                if sh.stop.load(Ordering::Relaxed) {
                    s.stopping = true;
                }
                // Nothing back for a whole timeout: what is in flight is lost.
                if s.inflight > 0 && now - s.last_reply >= cfg.timeout {
                    out.tally.timeouts += (s.inflight * k) as u64;
                    s.inflight = 0;
                    s.last_reply = now;
                }
                send(s, &mut out);
            }
        }
    }
    out
}
