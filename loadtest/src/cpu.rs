//! Who used the CPU during a run: the client's own threads, the server (in-process threads by
//! name, or another process by PID), and how much of the machine stayed idle. Read from
//! `/proc` (Linux); elsewhere every figure is `None`/zero and no warning is given.
//!
//! A load generator that shares the machine with the server can saturate first and report
//! false headroom; these figures are what lets a report say so.

use std::fs;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Clock ticks per second of `/proc/*/stat` times. `USER_HZ` is part of Linux's user-space
/// ABI and is 100 on every architecture Rust targets, so no `sysconf` call is needed.
const TICKS_PER_SEC: u64 = 100;

/// The client counts as saturated when its threads used at least this share of the cores
/// they could use.
pub const SATURATED: f64 = 0.9;
/// Below this share of idle CPU the machine had nothing left for the server.
pub const NO_IDLE: f64 = 0.05;

/// CPU use during one run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct CpuUse {
    /// Cores of the machine (what this process may use).
    pub cores: usize,
    /// The client's threads.
    pub client_threads: usize,
    /// CPU the client's threads used, in cores (CPU seconds per second of the run).
    pub client_cores: f64,
    /// CPU the server used, in cores: in-process responders' threads, or the target's
    /// process; `None` when unknown (`run`, or a target whose process was not found).
    pub server_cores: Option<f64>,
    /// Share of the whole machine that stayed idle, 0 to 1.
    pub machine_idle: f64,
    /// The client's threads used at least 90 % of the cores they can use, or the machine had
    /// less than 5 % idle: the figure may be the client's limit, not the server's.
    pub client_saturated: bool,
}

impl CpuUse {
    /// Figures of a run that lasted `elapsed`, from the client's CPU time and two
    /// machine-wide samples.
    pub fn new(
        client_threads: usize,
        client_cpu: Duration,
        elapsed: Duration,
        before: Option<MachineStat>,
        after: Option<MachineStat>,
    ) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let secs = elapsed.as_secs_f64().max(1e-9);
        let client_cores = client_cpu.as_secs_f64() / secs;
        let machine_idle = match (before, after) {
            (Some(b), Some(a)) => a.idle_share_since(&b),
            _ => 1.0,
        };
        let usable = client_threads.min(cores).max(1) as f64;
        Self {
            cores,
            client_threads,
            client_cores,
            server_cores: None,
            machine_idle,
            client_saturated: client_cores >= SATURATED * usable || machine_idle < NO_IDLE,
        }
    }

    /// Why the run's figure may be the client's limit, one sentence each; empty if none.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        let usable = self.client_threads.min(self.cores).max(1) as f64;
        if self.client_cores >= SATURATED * usable {
            w.push(format!(
                "the client saturated: its {} thread(s) used {:.2} of the {usable:.0} core(s) \
                 they can use; the figure may be the client's limit (try --threads)",
                self.client_threads, self.client_cores
            ));
        }
        if self.machine_idle < NO_IDLE {
            w.push(format!(
                "the machine had no idle CPU ({:.0} % idle): client and server competed for \
                 the cores",
                100.0 * self.machine_idle
            ));
        }
        w
    }
}

/// Machine-wide CPU time from the first line of `/proc/stat`, in ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MachineStat {
    idle: u64,
    total: u64,
}

impl MachineStat {
    /// Now, or `None` where `/proc/stat` cannot be read.
    pub fn now() -> Option<Self> {
        Self::parse(&fs::read_to_string("/proc/stat").ok()?)
    }

    fn parse(text: &str) -> Option<Self> {
        let line = text.lines().next()?.strip_prefix("cpu ")?;
        let v: Vec<u64> = line
            .split_ascii_whitespace()
            .map(|f| f.parse().ok())
            .collect::<Option<_>>()?;
        // user nice system idle iowait irq softirq steal [guest guest_nice, already in user].
        let total = v.iter().take(8).sum();
        let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
        Some(Self { idle, total })
    }

    /// Idle share of the machine between `earlier` and `self`.
    pub fn idle_share_since(&self, earlier: &Self) -> f64 {
        let total = self.total.saturating_sub(earlier.total);
        if total == 0 {
            return 1.0;
        }
        self.idle.saturating_sub(earlier.idle) as f64 / total as f64
    }
}

/// utime + stime of a `/proc/.../stat` line. The command name (field 2) is in parentheses
/// and may hold spaces and parentheses itself, so fields are counted from the last `)`.
fn stat_cpu(line: &str) -> Option<Duration> {
    let rest = &line[line.rfind(')')? + 1..];
    let mut f = rest.split_ascii_whitespace();
    // After the name: state(3) ... utime(14) stime(15); `rest` starts at field 3.
    let utime: u64 = f.nth(11)?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some(ticks(utime + stime))
}

fn ticks(t: u64) -> Duration {
    Duration::from_millis(t * 1000 / TICKS_PER_SEC)
}

/// CPU time the calling thread has used so far (zero where unknown).
pub fn this_thread() -> Duration {
    fs::read_to_string("/proc/thread-self/stat")
        .ok()
        .and_then(|s| stat_cpu(&s))
        .unwrap_or_default()
}

/// CPU time used so far by process `pid`, all its threads (`None` if it cannot be read).
pub fn process(pid: u32) -> Option<Duration> {
    stat_cpu(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// The process that has a socket bound to `addr` (listening, for TCP), found through the
/// socket's inode in `/proc/net/{tcp,tcp6,udp,udp6}` and the `/proc/*/fd` links that point at
/// it. Only processes this user may inspect are found.
pub fn pid_bound_to(addr: SocketAddr, udp: bool) -> Option<u32> {
    let table = match (udp, addr.is_ipv4()) {
        (false, true) => "tcp",
        (false, false) => "tcp6",
        (true, true) => "udp",
        (true, false) => "udp6",
    };
    let text = fs::read_to_string(format!("/proc/net/{table}")).ok()?;
    let inodes = socket_inodes(&text, addr, !udp);
    if inodes.is_empty() {
        return None;
    }
    let wanted: Vec<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    for proc_dir in fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = proc_dir.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let Ok(fds) = fs::read_dir(proc_dir.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(link) = fs::read_link(fd.path()) {
                if wanted.iter().any(|w| link.as_os_str() == w.as_str()) {
                    return Some(pid);
                }
            }
        }
    }
    None
}

/// Inodes of the sockets in a `/proc/net/*` table whose local address is `addr` (or the
/// wildcard address of its family on the same port), listening ones only if `listen`.
fn socket_inodes(table: &str, addr: SocketAddr, listen: bool) -> Vec<u64> {
    let port = format!("{:04X}", addr.port());
    let exact = hex_ip(addr);
    let wildcard = match addr {
        SocketAddr::V4(_) => "00000000".to_string(),
        SocketAddr::V6(_) => "0".repeat(32),
    };
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_ascii_whitespace().collect();
            let (ip, p) = f.get(1)?.split_once(':')?;
            // State 0A is TCP_LISTEN; UDP sockets are 07 (unconnected), any will do.
            let state_ok = !listen || *f.get(3)? == "0A";
            (p == port && (ip == exact || ip == wildcard) && state_ok)
                .then(|| f.get(9)?.parse().ok())
                .flatten()
        })
        .collect()
}

/// The address as `/proc/net` writes it: the in-memory bytes of each 32-bit word, as hex of
/// the host-order word (little-endian machines show 127.0.0.1 as `0100007F`).
fn hex_ip(addr: SocketAddr) -> String {
    let words: Vec<u32> = match addr {
        SocketAddr::V4(a) => vec![u32::from_ne_bytes(a.ip().octets())],
        SocketAddr::V6(a) => a
            .ip()
            .octets()
            .chunks(4)
            .map(|c| u32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    };
    words.iter().map(|w| format!("{w:08X}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_are_read_past_odd_names() {
        let line = "4242 (load (x) 1) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1 0";
        // utime 250 + stime 50 ticks = 3 s.
        assert_eq!(stat_cpu(line), Some(Duration::from_secs(3)));
        assert_eq!(stat_cpu("1 (x) S 1 2"), None);
    }

    #[test]
    fn machine_idle_share() {
        let a = MachineStat::parse("cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 1\n").unwrap();
        let b = MachineStat::parse("cpu  200 0 200 750 100 0 0 0 0 0\n").unwrap();
        assert_eq!(b.idle_share_since(&a), 50.0 / 250.0);
        assert_eq!(a.idle_share_since(&a), 1.0);
        assert_eq!(MachineStat::parse("intr 1 2"), None);
    }

    #[test]
    fn saturation_is_judged_on_usable_cores() {
        let cpu = |threads, used: f64, idle| CpuUse {
            cores: 2,
            ..CpuUse::new(
                threads,
                Duration::from_secs_f64(used),
                Duration::from_secs(1),
                Some(MachineStat { idle: 0, total: 0 }),
                Some(MachineStat { idle, total: 100 }),
            )
        };
        // One thread can use one core: 0.89 is below the line, 0.9 at it.
        assert!(!cpu(1, 0.89, 50).client_saturated);
        assert!(cpu(1, 0.9, 50).client_saturated);
        assert_eq!(cpu(1, 0.9, 50).warnings().len(), 1);
        // A busy machine is a warning too.
        assert!(cpu(1, 0.1, 4).client_saturated);
        assert!(!cpu(1, 0.1, 5).client_saturated);
    }

    #[test]
    fn sockets_are_found_by_address_and_state() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
            0: 0100007F:271E 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 111 1\n\
            1: 0100007F:271E 0100007F:9C40 01 00000000:00000000 00:00000000 00000000  1000        0 222 1\n\
            2: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 333 1\n";
        let native: SocketAddr = "127.0.0.1:10014".parse().unwrap();
        if cfg!(target_endian = "little") {
            assert_eq!(hex_ip(native), "0100007F");
            assert_eq!(socket_inodes(table, native, true), vec![111]);
            assert_eq!(socket_inodes(table, native, false), vec![111, 222]);
            // A wildcard listener serves loopback too.
            let any: SocketAddr = "127.0.0.1:8080".parse().unwrap();
            assert_eq!(socket_inodes(table, any, true), vec![333]);
        }
        assert!(socket_inodes(table, "127.0.0.1:1".parse().unwrap(), true).is_empty());
    }

    #[test]
    fn this_process_is_found_by_its_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        if std::path::Path::new("/proc/net/tcp").exists() {
            assert_eq!(pid_bound_to(addr, false), Some(std::process::id()));
            assert!(process(std::process::id()).is_some());
        }
    }
}
