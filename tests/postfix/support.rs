//! Shared by the real-MTA tests (`tests/postfix.rs`, `tests/exim.rs`): a temp dir, and a
//! `greyhound serve` process that can be stopped with SIGTERM and started again on the same
//! data dir and the same ports, which the helpers of `tests/common` cannot do (their server
//! owns its temp dir and always takes fresh ports).
//!
//! Every wait is bounded; a dropped [`Greyhound`] kills its process, by PID.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_greyhound");

/// How long one read, write, start or stop may take before the test fails. Generous: the
/// machine is shared with builds, and Postfix retries a failed policy request after 1 s.
pub const IO_TIMEOUT: Duration = Duration::from_secs(15);

/// A fresh directory under the system temp dir, removed when dropped.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates a directory no other test or run uses, mode 0755 so that unprivileged Postfix
    /// daemons can reach their queue and mailbox directories below it.
    pub fn new(tag: &str) -> Self {
        use std::os::unix::fs::PermissionsExt;
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = std::env::temp_dir().join(format!(
            "gh-mta-{tag}-{}-{}-{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).expect("create temp dir");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .expect("chmod temp dir");
        Self(path)
    }

    /// A path inside the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A loopback TCP port that was free a moment ago, for servers that must be told their port
/// in advance (Postfix's `master.cf`).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}

/// A TCP connection with read and write timeouts.
pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s
}

/// Lines a process wrote to stderr, shared with the thread that reads them.
type Logs = Arc<Mutex<Vec<String>>>;

/// A running `greyhound serve`.
pub struct Greyhound {
    child: Child,
    logs: Logs,
    /// The arguments it was started with, to start it again the same way.
    args: Vec<String>,
    /// Native protocol (TCP and UDP).
    pub native: SocketAddr,
    /// Postfix policy service.
    pub policy: SocketAddr,
    /// Metrics HTTP.
    pub metrics: SocketAddr,
}

impl Greyhound {
    /// Starts `greyhound serve` with exactly `args` (the caller gives `--data-dir` and the
    /// listener addresses); panics with its log unless it reports `ready` in time.
    pub fn start(args: &[&str]) -> Self {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let mut child = Command::new(BIN)
            .arg("serve")
            .args(&args)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn greyhound");
        let logs: Logs = Arc::default();
        let stderr = child.stderr.take().expect("piped stderr");
        let sink = logs.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
        });
        let deadline = Instant::now() + IO_TIMEOUT;
        let ready = loop {
            let found = logs
                .lock()
                .unwrap()
                .iter()
                .find_map(|l| l.split_once(" ready ").map(|(_, r)| r.to_string()));
            if let Some(r) = found {
                break r;
            }
            let exited = child.try_wait().expect("try_wait");
            if exited.is_some() || Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                thread::sleep(Duration::from_millis(100));
                panic!(
                    "greyhound serve {args:?} did not report ready (exit: {exited:?}); log:\n{}",
                    logs.lock().unwrap().join("\n")
                );
            }
            thread::sleep(Duration::from_millis(10));
        };
        let addr = |key: &str| -> SocketAddr {
            let text = ready
                .split_whitespace()
                .find_map(|t| t.strip_prefix(key))
                .unwrap_or_else(|| panic!("no {key} in ready line {ready:?}"));
            text.parse()
                .unwrap_or_else(|e| panic!("bad address {text:?} in ready line: {e}"))
        };
        Self {
            native: addr("native="),
            policy: addr("policy="),
            metrics: addr("metrics="),
            child,
            logs,
            args,
        }
    }

    /// The arguments this server was started with.
    pub fn args(&self) -> Vec<&str> {
        self.args.iter().map(String::as_str).collect()
    }

    /// Sends SIGTERM (by PID) and waits for the exit, which must be clean: the graceful stop
    /// that writes the final snapshot.
    pub fn terminate(&mut self) -> ExitStatus {
        let pid = self.child.id().to_string();
        let status = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM {pid} failed");
        let deadline = Instant::now() + IO_TIMEOUT;
        let exit = loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "greyhound did not exit within {IO_TIMEOUT:?} of SIGTERM; log:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(20));
        };
        assert!(
            exit.success(),
            "greyhound exited with {exit} after SIGTERM; log:\n{}",
            self.log()
        );
        exit
    }

    /// Everything logged so far.
    pub fn log(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// The Prometheus text of `GET /metrics`.
    pub fn metrics_text(&self) -> String {
        let mut s = connect(self.metrics);
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
            .expect("write HTTP request");
        let mut raw = String::new();
        s.read_to_string(&mut raw).expect("read HTTP response");
        let (head, body) = raw
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("no end of HTTP head in {raw:?}"));
        assert!(head.starts_with("HTTP/1.1 200 "), "GET /metrics: {head}");
        body.to_string()
    }

    /// One sample, e.g. `greyhound_decisions_total{answer="pass",reason="auth"}`; panics if
    /// it is missing.
    pub fn metric(&self, name: &str) -> f64 {
        let text = self.metrics_text();
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
    }
}

impl Drop for Greyhound {
    fn drop(&mut self) {
        // `Child::kill` signals exactly this PID; a stopped server has been reaped already.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `greyhound_decisions_total` for one answer and reason.
pub fn decisions(answer: &str, reason: &str) -> String {
    format!("greyhound_decisions_total{{answer=\"{answer}\",reason=\"{reason}\"}}")
}

/// The default greylist text (`greylist-text`) for this sender and recipient.
pub fn greylist_text(sender: &str, recipient: &str) -> String {
    format!("Greylisted, see https://greylisting.org/; from={sender} to={recipient}")
}

/// `docs/OPERATIONS.md`, which the tests hold to what they run.
pub fn operations_md() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/OPERATIONS.md");
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {path}: {e}"))
}
