//! Server throughput over loopback, against a null responder measured in the same run.
//!
//! `cargo bench --bench server_load` starts the real `greyhound` binary and, in this process,
//! a null responder for each transport (same framing and batching as the server, constant
//! answer, no engine). The same client code drives both, so each figure is stated as a share
//! of what this machine's network stack does. Client, server and responder share the machine
//! (2 cores here), so absolute numbers are lower than with a separate load generator.
//!
//! Options: `--secs N` per scenario (default 5); `--only NAME` to run scenarios whose name
//! contains NAME. `greyhound-loadtest ceiling` (docs/LOADTEST.md) measures the same with
//! open-loop rates and latency percentiles; this bench remains a quick check.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use greyhound::server::udp_batch::{bind_reuseport, BatchSocket};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Answers by kind.
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    pass: u64,
    defer: u64,
    err: u64,
    other: u64,
    lost: u64,
}

impl Counts {
    fn add(&mut self, o: Counts) {
        self.pass += o.pass;
        self.defer += o.defer;
        self.err += o.err;
        self.other += o.other;
        self.lost += o.lost;
    }
    fn answered(&self) -> u64 {
        self.pass + self.defer
    }
    fn line(&mut self, l: &[u8]) {
        let l = l.strip_prefix(b"action=").unwrap_or(l);
        let body = l
            .splitn(2, |&b| b == b' ')
            .nth(1)
            .filter(|_| l.first().is_some_and(u8::is_ascii_digit))
            .unwrap_or(l);
        if body.starts_with(b"PASS") || body.starts_with(b"DUNNO") || body.starts_with(b"PREPEND") {
            self.pass += 1;
        } else if body.starts_with(b"DEFER") {
            self.defer += 1;
        } else if body.starts_with(b"ERR") {
            self.err += 1;
        } else {
            self.other += 1;
        }
    }
}

/// Request `i` of the workload: 2^16 client /24s × 64 senders × 64 recipients, drawn so that
/// about half the requests repeat a triplet seen before (retries and known senders).
fn native_line(i: u64, id: Option<u64>, out: &mut Vec<u8>) {
    let t = if i % 2 == 0 {
        i / 2 % 50_000
    } else {
        i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40
    };
    if let Some(id) = id {
        let _ = write!(out, "{id} ");
    }
    let _ = writeln!(
        out,
        "CHECK 10.{}.{}.7 <list-{}@sender{}.example> <user{}@isp.example>",
        (t >> 8) & 0xff,
        t & 0xff,
        t % 64,
        (t >> 6) % 64,
        (t >> 12) % 64
    );
}

fn policy_block(i: u64, out: &mut Vec<u8>) {
    let mut line = Vec::new();
    native_line(i, None, &mut line);
    let parts: Vec<&str> = std::str::from_utf8(&line)
        .unwrap()
        .split_whitespace()
        .collect();
    let _ = write!(
        out,
        "request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\nclient_address={}\nclient_name=unknown\nhelo_name=mx.example\nsender={}\nrecipient={}\nqueue_id=\nsasl_username=\ninstance=1.2.3\n\n",
        parts[1],
        parts[2].trim_matches(['<', '>']),
        parts[3].trim_matches(['<', '>'])
    );
}

fn tcp_client(
    addr: SocketAddr,
    pipeline: usize,
    seed: u64,
    stop: &AtomicBool,
    policy: bool,
) -> Counts {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut c = Counts::default();
    let mut req = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut i = seed;
    let sep: &[u8] = if policy { b"\n\n" } else { b"\n" };
    while !stop.load(Ordering::Relaxed) {
        req.clear();
        for _ in 0..pipeline {
            if policy {
                policy_block(i, &mut req);
            } else {
                native_line(i, None, &mut req);
            }
            i += 1;
        }
        if s.write_all(&req).is_err() {
            break;
        }
        let mut got = 0;
        let mut pending: Vec<u8> = Vec::new();
        while got < pipeline {
            let n = match s.read(&mut buf) {
                Ok(0) | Err(_) => return c,
                Ok(n) => n,
            };
            pending.extend_from_slice(&buf[..n]);
            while let Some(p) = pending.windows(sep.len()).position(|w| w == sep) {
                c.line(&pending[..p]);
                got += 1;
                pending.drain(..p + sep.len());
            }
        }
    }
    c
}

fn udp_client(addr: SocketAddr, per_datagram: usize, seed: u64, stop: &AtomicBool) -> Counts {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let window = 16;
    let mut c = Counts::default();
    let mut i = seed;
    let mut id = 0u64;
    let mut req = Vec::new();
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..window {
            req.clear();
            for _ in 0..per_datagram {
                native_line(i, Some(id), &mut req);
                i += 1;
                id += 1;
            }
            let _ = s.send(&req);
        }
        let mut lines = 0;
        for _ in 0..window {
            match s.recv(&mut buf) {
                Ok(n) => {
                    for l in buf[..n].split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                        c.line(l);
                        lines += 1;
                    }
                }
                Err(_) => break,
            }
        }
        c.lost += (window * per_datagram - lines.min(window * per_datagram)) as u64;
    }
    c
}

/// Runs `clients` client threads for `secs` seconds; returns answers/s and the counts.
fn drive(
    secs: f64,
    clients: usize,
    f: impl Fn(u64, &AtomicBool) -> Counts + Sync,
) -> (f64, Counts) {
    let stop = AtomicBool::new(false);
    let start = Instant::now();
    let total = std::thread::scope(|s| {
        let hs: Vec<_> = (0..clients)
            .map(|t| {
                let (f, stop) = (&f, &stop);
                s.spawn(move || f(t as u64 * 1_000_003, stop))
            })
            .collect();
        std::thread::sleep(Duration::from_secs_f64(secs));
        stop.store(true, Ordering::Relaxed);
        let mut total = Counts::default();
        for h in hs {
            total.add(h.join().unwrap());
        }
        total
    });
    (
        total.answered() as f64 / start.elapsed().as_secs_f64(),
        total,
    )
}

/// The null responders: same framing, a constant answer, no engine.
struct Null {
    native: SocketAddr,
    policy: SocketAddr,
    _rt: tokio::runtime::Runtime,
    stop: Arc<AtomicBool>,
}

impl Null {
    fn start() -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let native_l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let policy_l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        native_l.set_nonblocking(true).unwrap();
        policy_l.set_nonblocking(true).unwrap();
        let (native, policy) = (
            native_l.local_addr().unwrap(),
            policy_l.local_addr().unwrap(),
        );
        for (l, sep, answer) in [
            (native_l, &b"\n"[..], &b"PASS known\n"[..]),
            (policy_l, &b"\n\n"[..], &b"action=DUNNO\n\n"[..]),
        ] {
            rt.spawn(async move {
                let l = tokio::net::TcpListener::from_std(l).unwrap();
                while let Ok((mut s, _)) = l.accept().await {
                    let _ = s.set_nodelay(true);
                    tokio::spawn(async move {
                        let mut buf = Vec::with_capacity(1 << 16);
                        let mut out = Vec::new();
                        loop {
                            if buf.capacity() - buf.len() < 4096 {
                                buf.reserve(8192);
                            }
                            match s.read_buf(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(_) => {}
                            }
                            let mut pos = 0;
                            while let Some(p) = buf[pos..].windows(sep.len()).position(|w| w == sep)
                            {
                                pos += p + sep.len();
                                out.extend_from_slice(answer);
                            }
                            buf.drain(..pos);
                            if s.write_all(&out).await.is_err() {
                                return;
                            }
                            out.clear();
                        }
                    });
                }
            });
        }
        let stop = Arc::new(AtomicBool::new(false));
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let socks = bind_reuseport(native, cores, 8 << 20, Duration::from_millis(100)).unwrap();
        for sock in socks {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut bs = BatchSocket::new(sock, 64, 65507);
                let mut out = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let Ok(n) = bs.recv() else { continue };
                    out.clear();
                    let mut spans = Vec::new();
                    for d in 0..n {
                        let (data, from) = bs.datagram(d);
                        let start = out.len();
                        for _ in data.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                            out.extend_from_slice(b"0 PASS known\n");
                        }
                        spans.push((from, start, out.len()));
                    }
                    let replies: Vec<(SocketAddr, &[u8])> =
                        spans.iter().map(|&(a, s, e)| (a, &out[s..e])).collect();
                    let _ = bs.send(&replies);
                }
            });
        }
        Null {
            native,
            policy,
            _rt: rt,
            stop,
        }
    }
}

impl Drop for Null {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

struct Greyhound {
    child: Child,
    native: SocketAddr,
    policy: SocketAddr,
    dir: std::path::PathBuf,
}

impl Greyhound {
    fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("greyhound-load-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut child = Command::new(env!("CARGO_BIN_EXE_greyhound"))
            .args([
                "serve",
                "--native",
                "127.0.0.1:0",
                "--policy",
                "127.0.0.1:0",
                "--metrics",
                "127.0.0.1:0",
                "--delay",
                "1s",
                "--data-dir",
            ])
            .arg(&dir)
            .stderr(Stdio::piped())
            .spawn()
            .expect("start greyhound");
        let mut err = child.stderr.take().unwrap();
        let mut seen = Vec::new();
        let mut b = [0u8; 4096];
        let line = loop {
            let n = err.read(&mut b).expect("greyhound stderr");
            assert!(
                n > 0,
                "greyhound exited: {}",
                String::from_utf8_lossy(&seen)
            );
            seen.extend_from_slice(&b[..n]);
            let text = String::from_utf8_lossy(&seen).into_owned();
            if let Some(l) = text.lines().find(|l| l.contains("ready native=")) {
                break l.to_string();
            }
        };
        // Keep draining stderr so the server never blocks on a full pipe.
        std::thread::spawn(move || while err.read(&mut b).is_ok_and(|n| n > 0) {});
        let field = |k: &str| -> SocketAddr {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .unwrap()
                .parse()
                .unwrap()
        };
        Greyhound {
            native: field("native="),
            policy: field("policy="),
            child,
            dir,
        }
    }
}

impl Drop for Greyhound {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let opt = |k: &str| {
        args.iter()
            .position(|a| a == k)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let secs: f64 = opt("--secs").and_then(|s| s.parse().ok()).unwrap_or(5.0);
    let only = opt("--only").unwrap_or_default();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    let null = Null::start();
    let gh = Greyhound::start();
    println!("| scenario | null responder (answers/s) | greyhound (answers/s) | share | greyhound answers: pass / defer / err / other / lost |");
    println!("|---|---:|---:|---:|---|");
    type Scenario = (
        String,
        usize,
        Box<dyn Fn(SocketAddr, SocketAddr, u64, &AtomicBool) -> Counts + Sync>,
    );
    let mut scenarios: Vec<Scenario> = Vec::new();
    for (conns, pipe) in [(8usize, 128usize), (8, 16), (64, 16)] {
        scenarios.push((
            format!("native-tcp {conns} conns × pipeline {pipe}"),
            conns,
            Box::new(move |n, _, seed, stop| tcp_client(n, pipe, seed, stop, false)),
        ));
    }
    for per in [1usize, 8] {
        scenarios.push((
            format!("native-udp 4 clients × {per}/datagram"),
            4,
            Box::new(move |n, _, seed, stop| udp_client(n, per, seed, stop)),
        ));
    }
    for conns in [8usize, 64] {
        scenarios.push((
            format!("policy {conns} conns × 1 in flight"),
            conns,
            Box::new(move |_, p, seed, stop| tcp_client(p, 1, seed, stop, true)),
        ));
    }
    for (name, clients, f) in &scenarios {
        if !name.contains(&only) {
            continue;
        }
        let (null_rate, _) = drive(secs, *clients, |seed, stop| {
            f(null.native, null.policy, seed, stop)
        });
        let (gh_rate, c) = drive(secs, *clients, |seed, stop| {
            f(gh.native, gh.policy, seed, stop)
        });
        println!(
            "| {name} | {:.0} | {:.0} | {:.0} % | {} / {} / {} / {} / {} |",
            null_rate,
            gh_rate,
            100.0 * gh_rate / null_rate.max(1.0),
            c.pass,
            c.defer,
            c.err,
            c.other,
            c.lost
        );
    }
}
