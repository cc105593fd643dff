//! SPF identity figures (docs/BENCHMARKS.md, "SPF identity"): evaluations per second against a
//! local dnsmasq with a cold result cache, cache hits per second, and memory per cache entry.
//!
//! ```sh
//! cargo run --release --example spf_bench -- [EVALUATIONS] [DOMAINS]   # default 20000 2000
//! ```
//!
//! It starts Debian's `/usr/sbin/dnsmasq` on a free loopback port (one command line, no files,
//! killed by PID at the end) serving `pool.test` and DOMAINS more domains `d<i>.test`, each
//! `v=spf1 ip4:10.0.0.0/8 -all`, then measures, on a 2-worker tokio runtime with 64 checks in
//! flight:
//! - **distinct addresses, one domain**: EVALUATIONS checks of `pool.test`, each from a new
//!   address, so every one misses the result cache and runs `check_host`; the TXT record comes
//!   from hickory's record cache after the first, so this is the evaluation's own cost;
//! - **distinct domains**: one check per `d<i>.test`, each a TXT query to dnsmasq over UDP;
//! - **cache hits**: `Spf::cached` over the keys of the first phase, on 1 and 2 threads;
//! - **memory per entry**: resident memory of a cache bounded at 1 Mi entries holding 50 000
//!   random keys, then filled to its bound.

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use greyhound::spf::cache::Cache;
use greyhound::spf::{Spf, SpfConfig};

const IN_FLIGHT: usize = 64;

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numbers: EVALUATIONS DOMAINS"))
        .collect();
    let evaluations = args.first().copied().unwrap_or(20_000);
    let domains = args.get(1).copied().unwrap_or(2_000);

    let port = free_port();
    let mut cmd = Command::new("/usr/sbin/dnsmasq");
    cmd.args([
        format!("--port={port}"),
        "--listen-address=127.0.0.1".into(),
        "--bind-interfaces".into(),
        "--no-resolv".into(),
        "--no-hosts".into(),
        "--keep-in-foreground".into(),
        "--pid-file=".into(),
        "--local=/test/".into(),
        "--local-ttl=3600".into(),
        "--txt-record=pool.test,v=spf1 ip4:10.0.0.0/8 -all".into(),
    ]);
    for i in 0..domains {
        cmd.arg(format!("--txt-record=d{i}.test,v=spf1 ip4:10.0.0.0/8 -all"));
    }
    let mut dnsmasq = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run /usr/sbin/dnsmasq (Debian's dnsmasq-base)");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let up = (0..250).any(|_| {
        std::thread::sleep(Duration::from_millis(20));
        answers(addr)
    });
    if !up {
        let _ = dnsmasq.kill();
        let log = BufReader::new(dnsmasq.stderr.take().unwrap()).lines();
        panic!(
            "dnsmasq did not answer: {:?}",
            log.map_while(Result::ok).collect::<Vec<_>>()
        );
    }

    let spf = Arc::new(
        Spf::new(SpfConfig {
            dns_server: Some(addr),
            timeout: Duration::from_secs(10),
            cache_entries: 1 << 20,
        })
        .expect("resolver"),
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    let address = |i: usize| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | i as u32));
    // Warm hickory's record cache for pool.test, so the first phase is evaluations only.
    rt.block_on(spf.check(address(0), "pool.test", "h.test", ""));

    let run = |n: usize, key: &(dyn Fn(usize) -> (IpAddr, String) + Sync)| {
        let t = Instant::now();
        let passes = rt.block_on(async {
            let mut set = tokio::task::JoinSet::new();
            let mut passes = 0usize;
            for i in 0..n {
                if set.len() >= IN_FLIGHT {
                    passes += usize::from(set.join_next().await.unwrap().unwrap() == Some(true));
                }
                let (ip, domain) = key(i);
                let spf = spf.clone();
                set.spawn(async move { spf.check(ip, &domain, "h.test", "").await });
            }
            while let Some(r) = set.join_next().await {
                passes += usize::from(r.unwrap() == Some(true));
            }
            passes
        });
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(passes, n, "every check passes: {:?}", spf.stats());
        n as f64 / secs
    };

    let before = spf.stats().lookups;
    let per_s = run(evaluations, &|i| (address(i + 1), "pool.test".to_string()));
    assert_eq!(spf.stats().lookups - before, evaluations as u64, "all cold");
    println!("distinct addresses, one domain: {evaluations} evaluations, {per_s:.0}/s");

    let per_s = run(domains, &|i| (address(1), format!("d{i}.test")));
    println!("distinct domains (a TXT query each): {domains} evaluations, {per_s:.0}/s");

    for threads in [1, 2] {
        let rounds = 50;
        let t = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| {
                    for _ in 0..rounds {
                        for i in 0..evaluations {
                            assert_eq!(spf.cached(address(i + 1), "pool.test"), Some(true));
                        }
                    }
                });
            }
        });
        let hits = (threads * rounds * evaluations) as f64;
        let secs = t.elapsed().as_secs_f64();
        println!(
            "cache hits, {threads} thread(s): {:.1} M/s ({:.0} ns each per thread)",
            hits / secs / 1e6,
            secs * 1e9 * threads as f64 / hits
        );
    }
    println!("stats: {:?}", spf.stats());
    let _ = dnsmasq.kill();
    let _ = dnsmasq.wait();

    let rss0 = rss();
    let cache = Cache::new(1 << 20).expect("address space for the cache");
    let mut x = 0x243f_6a88_85a3_08d3_u64;
    let mut next = || {
        // splitmix64
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    // A cache of fifty thousand results (the size `loadtest/bench-spf.sh` warms), then one
    // filled to its bound: it grows with its contents, 16 bytes a slot.
    let mut inserted = 0;
    for target in [50_000, 2 * cache.capacity()] {
        while inserted < target {
            cache.insert(next(), 1, 0, 3600);
            inserted += 1;
        }
        let grown = rss() - rss0;
        println!(
            "cache bound {} after {inserted} random inserts: {} entries in {} slots ({:.0} % \
             full), {:.1} MiB resident, {:.1} B/entry ({:.1} B/slot)",
            cache.capacity(),
            cache.len(),
            cache.allocated(),
            100.0 * cache.len() as f64 / cache.allocated() as f64,
            grown as f64 / (1 << 20) as f64,
            grown as f64 / cache.len() as f64,
            grown as f64 / cache.allocated() as f64
        );
    }
}

/// Resident bytes of this process.
fn rss() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

fn free_port() -> u16 {
    loop {
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = tcp.local_addr().unwrap().port();
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Whether a DNS server at `addr` answers a `test.` SOA query over UDP.
fn answers(addr: SocketAddr) -> bool {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let query = [
        0x47, 0x48, 0x01, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 4, b't', b'e',
        b's', b't', 0, 0x00, 0x06, 0x00, 0x01,
    ];
    let mut buf = [0u8; 512];
    sock.send_to(&query, addr).is_ok()
        && matches!(sock.recv_from(&mut buf), Ok((n, _)) if n >= 12 && buf[..2] == [0x47, 0x48])
}
