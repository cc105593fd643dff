//! Helpers for the integration tests: a real `greyhound serve` process on free ports, and
//! small raw-bytes clients for the native protocol (TCP and UDP), the Postfix policy protocol
//! (TCP and Unix socket) and the metrics HTTP port. The real-MTA tests (`tests/postfix.rs`,
//! `tests/exim.rs`) use it too: a server stopped with [`Server::terminate`] starts again
//! on the same data dir and the same ports with [`Server::restart`].
//!
//! Every wait here is bounded: a test that would hang panics instead, naming what it waited
//! for, and a dropped [`Server`] always kills its process and removes its directory.
//!
//! Each test file compiles this module on its own and uses only part of it.
#![allow(dead_code)]

pub mod dns;
pub mod redis;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_greyhound");

/// How long any single read, write, start or stop may take before the test fails. Generous:
/// the machine is shared with builds, and Postfix retries a failed policy request after 1 s.
pub const IO_TIMEOUT: Duration = Duration::from_secs(15);

/// A fresh directory under the system temp dir, removed when dropped.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates a directory with a name no other test (or test run) uses, mode 0755 so that
    /// unprivileged Postfix daemons can reach their queue and mailbox directories below it.
    pub fn new(tag: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = std::env::temp_dir().join(format!(
            "gh-it-{tag}-{}-{}-{nanos}",
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

    /// A path inside the directory, as a string for command lines.
    pub fn file(&self, name: &str) -> String {
        self.join(name).display().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Where the Postfix policy service listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyAddr {
    /// TCP.
    Tcp(SocketAddr),
    /// A Unix socket.
    Unix(PathBuf),
}

/// Lines the server wrote to stderr, shared with the reader thread.
type Logs = Arc<Mutex<Vec<String>>>;

/// A running `greyhound serve`.
pub struct Server {
    child: Child,
    /// The test's directory (data dir `data/`, list files, sockets), removed after the process
    /// unless taken back with [`Server::into_dir`] to start another server on the same data.
    dir: Option<TempDir>,
    /// Native protocol, TCP and UDP.
    pub native: SocketAddr,
    /// Postfix policy protocol.
    pub policy: PolicyAddr,
    /// Metrics HTTP.
    pub metrics_addr: SocketAddr,
    logs: Logs,
    /// The flags the test gave, to start the next server the same way.
    extra: Vec<String>,
}

/// Flags every test server gets unless the test gives them itself: free ports, a fresh data
/// dir, a short delay.
const DEFAULTS: [(&str, &str); 4] = [
    ("--native", "127.0.0.1:0"),
    ("--policy", "127.0.0.1:0"),
    ("--metrics", "127.0.0.1:0"),
    ("--delay", "2s"),
];

/// Spawns `greyhound ARGS` with the default log level, no stdin, stderr piped, and `env` added
/// to the environment.
fn spawn(args: &[&str], stdout: Stdio, env: &[(&str, &str)]) -> Child {
    Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn greyhound")
}

/// Reads `stderr` line by line into `logs` until the process closes it.
fn collect_lines(stderr: impl Read + Send + 'static, logs: Logs) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut r = BufReader::new(stderr);
        let mut line = Vec::new();
        loop {
            line.clear();
            match r.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&line).trim_end().to_string();
                    logs.lock().unwrap().push(text);
                }
            }
        }
    })
}

impl Server {
    /// Starts a server in a new temp dir with the default flags plus `extra`.
    pub fn start(extra: &[&str]) -> Self {
        Self::start_in(TempDir::new("srv"), extra)
    }

    /// Starts a server whose data dir is `dir/data`; `dir` may already hold list files.
    /// Panics (with the server's log) unless it reports ready within [`IO_TIMEOUT`].
    pub fn start_in(dir: TempDir, extra: &[&str]) -> Self {
        Self::start_in_env(dir, extra, &[])
    }

    /// [`Server::start_in`] with `env` added to the server's environment (not kept by
    /// [`Server::restart`]).
    pub fn start_in_env(dir: TempDir, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let data = dir.file("data");
        let mut args: Vec<&str> = vec!["serve", "--data-dir", &data];
        for (flag, value) in DEFAULTS {
            if !extra.contains(&flag) {
                args.extend([flag, value]);
            }
        }
        args.extend_from_slice(extra);
        let mut child = spawn(&args, Stdio::null(), env);
        let logs: Logs = Arc::default();
        collect_lines(child.stderr.take().expect("piped stderr"), logs.clone());
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
                    "greyhound {args:?} did not report ready (exit: {exited:?}); log:\n{}",
                    logs.lock().unwrap().join("\n")
                );
            }
            thread::sleep(Duration::from_millis(10));
        };
        let field = |key: &str| -> String {
            ready
                .split_whitespace()
                .find_map(|t| t.strip_prefix(key))
                .unwrap_or_else(|| panic!("no {key} in ready line {ready:?}"))
                .to_string()
        };
        let parse = |s: String| -> SocketAddr {
            s.parse()
                .unwrap_or_else(|e| panic!("bad address {s:?} in ready line: {e}"))
        };
        let native = parse(field("native="));
        let metrics_addr = parse(field("metrics="));
        let policy_text = field("policy=");
        let policy = match policy_text.strip_prefix("unix:") {
            Some(path) => PolicyAddr::Unix(PathBuf::from(path)),
            None => PolicyAddr::Tcp(parse(policy_text)),
        };
        Self {
            child,
            dir: Some(dir),
            native,
            policy,
            metrics_addr,
            logs,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Replaces this server with a new one on the same directory, with the same flags and
    /// on the same addresses (the ones it bound, not `:0`), as a restarted service comes
    /// back where its clients expect it. This one is killed first (SIGKILL) unless it has
    /// exited already, e.g. by [`Server::terminate`].
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let policy = match &self.policy {
            PolicyAddr::Tcp(a) => a.to_string(),
            PolicyAddr::Unix(p) => format!("unix:{}", p.display()),
        };
        let bound = [
            ("--native", self.native.to_string()),
            ("--policy", policy),
            ("--metrics", self.metrics_addr.to_string()),
        ];
        let first = std::mem::take(&mut self.extra);
        let mut extra: Vec<&str> = Vec::new();
        let mut given = first.iter().map(String::as_str);
        while let Some(flag) = given.next() {
            if bound.iter().any(|(f, _)| *f == flag) {
                given.next(); // the address this server bound replaces the one given
            } else {
                extra.push(flag);
            }
        }
        for (flag, addr) in &bound {
            extra.extend([*flag, addr.as_str()]);
        }
        let dir = self.dir.take().expect("dir");
        *self = Self::start_in(dir, &extra);
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        PathBuf::from(self.dir.as_ref().expect("dir").file("data"))
    }

    /// Kills the process (SIGKILL, unless it has already exited) and hands back its
    /// directory, data directory included, for the next server.
    pub fn into_dir(mut self) -> TempDir {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.dir.take().expect("dir")
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The policy service's TCP address (panics for a Unix socket).
    pub fn policy_tcp(&self) -> SocketAddr {
        match &self.policy {
            PolicyAddr::Tcp(a) => *a,
            PolicyAddr::Unix(p) => panic!("policy is a Unix socket at {}", p.display()),
        }
    }

    /// Sends a signal by name (`TERM`, `HUP`, ...) with the `kill` command.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([format!("-{name}"), self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} {} failed", self.pid());
    }

    /// Sends SIGTERM and waits for the exit, which must be clean: the graceful stop that
    /// writes the final snapshot.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal("TERM");
        let exit = self.wait_exit(IO_TIMEOUT).unwrap_or_else(|| {
            panic!(
                "greyhound did not exit within {IO_TIMEOUT:?} of SIGTERM; log:\n{}",
                self.logs().join("\n")
            )
        });
        assert!(
            exit.success(),
            "greyhound exited with {exit} after SIGTERM; log:\n{}",
            self.logs().join("\n")
        );
        exit
    }

    /// Waits for the process to exit, at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every line logged so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// Waits (bounded) for a log line matching `pred`.
    pub fn wait_log(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let found = poll(IO_TIMEOUT, || {
            self.logs.lock().unwrap().iter().find(|l| pred(l)).cloned()
        });
        found.unwrap_or_else(|| panic!("no log line {what}; log:\n{}", self.logs().join("\n")))
    }

    /// `GET path` on the metrics port: (status line, body).
    pub fn http_get(&self, path: &str) -> (String, String) {
        let mut s = connect(self.metrics_addr);
        let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).expect("write HTTP request");
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).expect("read HTTP response");
        let text = String::from_utf8(raw).expect("HTTP response is UTF-8");
        let (head, body) = text
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("no end of head in {text:?}"));
        (head.lines().next().unwrap_or("").to_string(), body.into())
    }

    /// The body of `GET /metrics`, which must answer 200.
    pub fn metrics(&self) -> String {
        let (status, body) = self.http_get("/metrics");
        assert!(status.contains(" 200 "), "GET /metrics: {status}");
        body
    }

    /// One sample, e.g. `greyhound_requests_total{proto="native-tcp"}`, read now.
    pub fn metric(&self, name: &str) -> Option<f64> {
        metric_value(&self.metrics(), name)
    }

    /// Like [`Server::metric`], panicking when the sample is missing.
    pub fn m(&self, name: &str) -> f64 {
        let text = self.metrics();
        metric_value(&text, name).unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
    }

    /// Polls (bounded) until metric `name` equals `want`; returns the last value seen.
    pub fn wait_metric(&self, name: &str, want: f64) -> f64 {
        let mut last = f64::NAN;
        let ok = poll(IO_TIMEOUT, || {
            last = self.m(name);
            (last == want).then_some(())
        });
        assert!(ok.is_some(), "{name} stayed {last}, expected {want}");
        last
    }

    /// Resident memory of the server process, from `/proc`.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/PID/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // `Child::kill` signals exactly this PID; reaping it lets the temp dir go.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of sample `name` (its full name with labels) in a Prometheus text body.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
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

/// A loopback TCP port that was free a moment ago, for servers that must be told their port
/// in advance (Postfix's `master.cf`), or an address where nothing listens.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}

/// Calls `f` every 20 ms until it returns `Some`, at most `timeout`.
pub fn poll<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Sleeps past a greylisting delay of `secs` seconds. The server's clock counts whole seconds
/// (floored), so `secs` seconds and a margin after the first sight the delay is always over.
pub fn sleep_past(secs: u64) {
    thread::sleep(Duration::from_secs(secs) + Duration::from_millis(250));
}

/// A TCP connection with read and write timeouts.
pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s
}

/// One native TCP exchange as Exim's `readsocket` does it: connect, write, shut down the
/// sending side, read everything until the server closes.
pub fn request(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = connect(addr);
    s.write_all(bytes).expect("write request");
    s.shutdown(Shutdown::Write).expect("shutdown write");
    let mut out = Vec::new();
    s.read_to_end(&mut out)
        .unwrap_or_else(|e| panic!("read reply to {:?}: {e}", String::from_utf8_lossy(bytes)));
    String::from_utf8(out).expect("reply is UTF-8")
}

/// Reads until the peer closes, and fails if it sent anything or did not close within
/// [`IO_TIMEOUT`]. A reset counts as closed.
pub fn assert_closed_without_reply(r: &mut impl Read, what: &str) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("{what}: connection still open after {IO_TIMEOUT:?}")
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => break, // reset: closed
        }
    }
    assert!(
        got.is_empty(),
        "{what}: expected no reply, got {:?}",
        String::from_utf8_lossy(&got)
    );
}

/// Like [`assert_closed_without_reply`], for a buffered reader: nothing may be left unread.
fn assert_reader_closed(reader: &mut BufReader<impl Read>, what: &str) {
    assert!(
        reader.buffer().is_empty(),
        "{what}: unread reply {:?}",
        String::from_utf8_lossy(reader.buffer())
    );
    assert_closed_without_reply(reader.get_mut(), what);
}

/// A persistent native TCP connection, for pipelining and for several exchanges in a row.
pub struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Conn {
    /// Connects to the native port (or any line-oriented TCP service).
    pub fn connect(addr: SocketAddr) -> Self {
        let writer = connect(addr);
        let reader = BufReader::new(writer.try_clone().expect("clone stream"));
        Self { reader, writer }
    }

    /// Writes raw bytes.
    pub fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).expect("write to server");
    }

    /// Reads one reply line, without its `\n`; panics on EOF or timeout.
    pub fn line(&mut self) -> String {
        let mut line = Vec::new();
        match self.reader.read_until(b'\n', &mut line) {
            Ok(0) => panic!("server closed the connection instead of replying"),
            Ok(_) => {}
            Err(e) => panic!("no reply line: {e}"),
        }
        assert_eq!(
            line.pop(),
            Some(b'\n'),
            "reply cut short: {:?}",
            String::from_utf8_lossy(&line)
        );
        String::from_utf8(line).expect("reply is UTF-8")
    }

    /// Sends `line` plus `\n` and reads one reply line.
    pub fn ask(&mut self, line: &str) -> String {
        self.send(format!("{line}\n").as_bytes());
        self.line()
    }

    /// Reads until the server closes; panics on timeout.
    pub fn read_to_end(&mut self) -> String {
        let mut out = Vec::new();
        self.reader.read_to_end(&mut out).expect("read to EOF");
        String::from_utf8(out).expect("reply is UTF-8")
    }

    /// Fails unless the server closes the connection without sending anything.
    pub fn expect_closed(&mut self, what: &str) {
        assert_reader_closed(&mut self.reader, what);
    }

    /// The underlying stream (for timeouts).
    pub fn stream(&self) -> &TcpStream {
        &self.writer
    }
}

/// Sends one datagram from a fresh socket and waits at most `timeout` for one reply.
pub fn udp_request_within(addr: SocketAddr, datagram: &[u8], timeout: Duration) -> Option<Vec<u8>> {
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind UDP");
    sock.set_read_timeout(Some(timeout)).unwrap();
    sock.send_to(datagram, addr).expect("send datagram");
    let mut buf = vec![0u8; 65536];
    match sock.recv_from(&mut buf) {
        Ok((n, from)) => {
            assert_eq!(from, addr, "reply from another address");
            buf.truncate(n);
            Some(buf)
        }
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => None,
        Err(e) => panic!("UDP receive: {e}"),
    }
}

/// Sends one datagram and waits up to 5 s for its reply.
pub fn udp_request(addr: SocketAddr, datagram: &[u8]) -> Option<Vec<u8>> {
    udp_request_within(addr, datagram, Duration::from_secs(5))
}

/// Like [`udp_request`], for a datagram that must be answered, as text.
pub fn udp_ask(addr: SocketAddr, datagram: &str) -> String {
    let reply = udp_request(addr, datagram.as_bytes())
        .unwrap_or_else(|| panic!("no UDP reply to {datagram:?}"));
    assert!(
        reply.len() <= datagram.len(),
        "UDP reply {} bytes > request {} bytes: {:?}",
        reply.len(),
        datagram.len(),
        String::from_utf8_lossy(&reply)
    );
    String::from_utf8(reply).expect("UDP reply is UTF-8")
}

/// A Postfix policy request block: `name=value` lines and the final empty line.
pub fn policy_block(attrs: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in attrs {
        out.extend_from_slice(name.as_bytes());
        out.push(b'=');
        out.extend_from_slice(value.as_bytes());
        out.push(b'\n');
    }
    out.push(b'\n');
    out
}

/// The attributes Postfix 3.x sends at the RCPT stage (a representative subset, unknown
/// ones included, which the server must ignore).
pub fn rcpt_attrs<'a>(
    client: &'a str,
    sender: &'a str,
    recipient: &'a str,
) -> Vec<(&'a str, &'a str)> {
    vec![
        ("request", "smtpd_access_policy"),
        ("protocol_state", "RCPT"),
        ("protocol_name", "ESMTP"),
        ("client_address", client),
        ("client_name", "unknown"),
        ("client_port", "51234"),
        ("reverse_client_name", "unknown"),
        ("server_address", "127.0.0.1"),
        ("server_port", "25"),
        ("helo_name", "mail.sender.example"),
        ("sender", sender),
        ("recipient", recipient),
        ("recipient_count", "0"),
        ("queue_id", ""),
        ("instance", "1a2b.5f0e1c2d.3e4f.0"),
        ("size", "0"),
        ("etrn_domain", ""),
        ("stress", ""),
        ("sasl_method", ""),
        ("sasl_username", ""),
        ("sasl_sender", ""),
        ("ccert_subject", ""),
        ("encryption_protocol", "TLSv1.3"),
        ("encryption_cipher", "TLS_AES_256_GCM_SHA384"),
        ("encryption_keysize", "256"),
        ("policy_context", ""),
        ("server_hostname", "mx.test.example"),
    ]
}

/// Replaces attribute `name` in `attrs`.
pub fn with<'a>(
    mut attrs: Vec<(&'a str, &'a str)>,
    name: &'a str,
    value: &'a str,
) -> Vec<(&'a str, &'a str)> {
    let slot = attrs
        .iter_mut()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("no attribute {name}"));
    slot.1 = value;
    attrs
}

/// A Postfix policy client over TCP or a Unix socket.
pub struct PolicyConn {
    reader: BufReader<Box<dyn Read + Send>>,
    writer: Box<dyn Write + Send>,
}

impl PolicyConn {
    /// Connects to the server's policy service.
    pub fn connect(addr: &PolicyAddr) -> Self {
        match addr {
            PolicyAddr::Tcp(a) => {
                let s = connect(*a);
                let r = s.try_clone().expect("clone stream");
                Self {
                    reader: BufReader::new(Box::new(r)),
                    writer: Box::new(s),
                }
            }
            PolicyAddr::Unix(path) => {
                let s = UnixStream::connect(path)
                    .unwrap_or_else(|e| panic!("connect to {}: {e}", path.display()));
                s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
                let r = s.try_clone().expect("clone stream");
                Self {
                    reader: BufReader::new(Box::new(r)),
                    writer: Box::new(s),
                }
            }
        }
    }

    /// Writes raw bytes; an error (the server closed) is returned, not a panic.
    pub fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.writer.write_all(bytes)
    }

    /// Reads one reply: lines up to the empty line, joined by `\n`, without the final `\n\n`.
    pub fn reply(&mut self) -> String {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) => panic!("policy connection closed; reply so far: {lines:?}"),
                Ok(_) => {}
                Err(e) => panic!("no policy reply: {e}; so far: {lines:?}"),
            }
            assert!(line.ends_with('\n'), "reply line cut short: {line:?}");
            line.pop();
            if line.is_empty() {
                return lines.join("\n");
            }
            lines.push(line);
        }
    }

    /// Sends one block and reads its reply.
    pub fn ask(&mut self, attrs: &[(&str, &str)]) -> String {
        self.send(&policy_block(attrs)).expect("write policy block");
        self.reply()
    }

    /// Fails unless the server closes the connection without sending anything.
    pub fn expect_closed(&mut self, what: &str) {
        assert_reader_closed(&mut self.reader, what);
    }
}

/// A deterministic xorshift64* generator, for reproducible garbage.
pub struct XorShift(u64);

impl XorShift {
    /// A generator from a non-zero seed.
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next_u64() % (hi - lo + 1) as u64) as usize
    }

    /// `n` random bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n + 8);
        while out.len() < n {
            out.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        out.truncate(n);
        out
    }
}

/// Runs `greyhound serve` on `data_dir` with free loopback ports and `extra` flags (which may
/// replace the ports) to completion, for a start that is expected to fail: (exit status,
/// stdout, stderr).
pub fn run_serve(data_dir: &str, extra: &[&str]) -> (ExitStatus, String, String) {
    let mut args = vec!["serve", "--data-dir", data_dir];
    for (flag, value) in [
        ("--native", "127.0.0.1:0"),
        ("--policy", "127.0.0.1:0"),
        ("--metrics", "127.0.0.1:0"),
    ] {
        if !extra.contains(&flag) {
            args.extend([flag, value]);
        }
    }
    args.extend_from_slice(extra);
    run_bin(&args)
}

/// Runs `greyhound ARGS` to completion (bounded): (exit status, stdout, stderr).
pub fn run_bin(args: &[&str]) -> (ExitStatus, String, String) {
    let mut child = spawn(args, Stdio::piped(), &[]);
    let out: Logs = Arc::default();
    let err: Logs = Arc::default();
    let readers = [
        collect_lines(child.stdout.take().unwrap(), out.clone()),
        collect_lines(child.stderr.take().unwrap(), err.clone()),
    ];
    let deadline = Instant::now() + IO_TIMEOUT;
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "greyhound {args:?} still running after {IO_TIMEOUT:?}; stderr:\n{}",
                err.lock().unwrap().join("\n")
            );
        }
        thread::sleep(Duration::from_millis(10));
    };
    // The pipes reach EOF with the exit, so the readers end.
    for r in readers {
        let _ = r.join();
    }
    let join = |l: &Logs| l.lock().unwrap().join("\n");
    (status, join(&out), join(&err))
}

/// A TCP connection to `addr` with [`IO_TIMEOUT`] on the connect, every read and every write,
/// as a buffered reading half and a writing half.
pub fn timed_stream(addr: SocketAddr) -> std::io::Result<(BufReader<TcpStream>, TcpStream)> {
    let w = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    w.set_read_timeout(Some(IO_TIMEOUT))?;
    w.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok((BufReader::new(w.try_clone()?), w))
}

/// A pipelining native-protocol client that reports errors instead of panicking, because the
/// server it talks to may be killed under it (snapshot crash loops, cluster nodes).
pub struct PipeClient {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl PipeClient {
    /// Connects with [`IO_TIMEOUT`] on the connect, every read and every write.
    pub fn connect(addr: SocketAddr) -> std::io::Result<Self> {
        let (r, w) = timed_stream(addr)?;
        Ok(Self { r, w })
    }

    /// Sends every line at once, then reads one reply per line.
    pub fn pipeline(&mut self, lines: &[String]) -> std::io::Result<Vec<String>> {
        let mut out = String::new();
        for l in lines {
            out.push_str(l);
            out.push('\n');
        }
        self.w.write_all(out.as_bytes())?;
        let mut replies = Vec::with_capacity(lines.len());
        let mut line = String::new();
        for _ in lines {
            line.clear();
            if self.r.read_line(&mut line)? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            replies.push(line.trim_end().to_owned());
        }
        Ok(replies)
    }
}
