//! A private `redis-server` (Debian's package) for the cluster tests, and the cluster nodes
//! that share it.
//!
//! [`Redis`] runs `/usr/bin/redis-server` as a child process on a loopback port that was free
//! a moment ago, in a temp dir, without persistence unless asked for; it is stopped by its PID
//! (never by name), started again on the same port, empty or with its data, and killed when
//! dropped. [`Resp`] is a minimal RESP2 client over a `TcpStream`, enough for `PING` and for
//! looking at the streams the nodes write.
//!
//! [`Cluster`] starts `greyhound serve` nodes ([`Server`]) that share one Redis, one cluster
//! name and one hash key, and reads each node's `GET /status` JSON.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use serde_json::Value;

use super::{free_port, poll, Server, TempDir, XorShift, IO_TIMEOUT};

/// Debian's binary; the test command (`tests/run.sh`) installs the package when it is missing.
pub const REDIS_SERVER: &str = "redis-server";

/// How long the cluster tests wait for nodes to converge or for a state to show: generous,
/// since the machine is shared with builds. A wait that runs out fails the test, naming what
/// it waited for.
pub const CONVERGE_TIMEOUT: Duration = Duration::from_secs(30);

/// Lines redis-server wrote, shared with the reader thread.
type Lines = Arc<Mutex<Vec<String>>>;

/// A private `redis-server` process.
pub struct Redis {
    child: Option<Child>,
    /// The loopback port it listens on, the same across restarts.
    pub port: u16,
    /// Its working directory (`--dir`): the append-only files when persistent.
    dir: TempDir,
    persistent: bool,
    log: Lines,
}

impl Redis {
    /// Starts an empty Redis without persistence (`--save "" --appendonly no`): a restart
    /// comes back empty.
    pub fn start() -> Self {
        Self::launch(false)
    }

    /// Starts an empty Redis that keeps its data across a stop, even a SIGKILL: append-only
    /// file, fsync'd on every write.
    pub fn start_persistent() -> Self {
        Self::launch(true)
    }

    fn launch(persistent: bool) -> Self {
        let mut r = Self {
            child: None,
            port: stable_port(),
            dir: TempDir::new("redis"),
            persistent,
            log: Lines::default(),
        };
        r.spawn();
        r
    }

    /// `redis://127.0.0.1:PORT`, for `--cluster-redis`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Whether the process is running (started and not stopped).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Everything redis-server logged so far, for failure messages.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "redis-server is already running");
        let port = self.port.to_string();
        let dir = self.dir.file("");
        let mut args: Vec<&str> = vec![
            "--port",
            &port,
            "--bind",
            "127.0.0.1",
            "--dir",
            &dir,
            "--daemonize",
            "no",
            // Log to stdout, which the test reads: nothing is written under /var/log.
            "--logfile",
            "",
            "--save",
            "",
        ];
        if self.persistent {
            args.extend(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            args.extend(["--appendonly", "no"]);
        }
        let mut child = Command::new(REDIS_SERVER)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {REDIS_SERVER} ({e}): install Debian's package redis-server \
                     (tests/run.sh does when it is missing)"
                )
            });
        for out in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let log = self.log.clone();
            thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    log.lock().unwrap().push(line);
                }
            });
        }
        self.child = Some(child);
        // Until it answers PING with PONG (`-LOADING` while it reads its append-only file).
        let ready = poll(IO_TIMEOUT, || {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().expect("try_wait") {
                panic!(
                    "redis-server on port {} exited with {status}; log:\n{}",
                    self.port,
                    self.log()
                );
            }
            let mut c = RespConn::connect(self.addr()).ok()?;
            match c.cmd(&["PING"]).ok()? {
                Resp::Simple(s) if s == "PONG" => Some(()),
                _ => None,
            }
        });
        if ready.is_none() {
            self.stop();
            panic!(
                "redis-server on port {} did not answer PING within {IO_TIMEOUT:?}; log:\n{}",
                self.port,
                self.log()
            );
        }
    }

    /// Stops the server by its PID with SIGKILL and reaps it: Redis vanishes as in a crash or
    /// a cut link. A persistent Redis keeps every acknowledged write (`appendfsync always`).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, with the data it had if it is persistent.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Starts it again on the same port with no data at all, as a Redis that lost its disk or
    /// never had persistence.
    pub fn restart_empty(&mut self) {
        self.stop();
        for entry in std::fs::read_dir(self.dir.join("")).expect("read redis dir") {
            let path = entry.expect("redis dir entry").path();
            if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            }
            .unwrap_or_else(|e| panic!("remove {}: {e}", path.display()));
        }
        self.spawn();
    }

    /// Runs one command on a new connection; panics if Redis cannot be reached.
    pub fn cmd(&self, args: &[&str]) -> Resp {
        RespConn::connect(self.addr())
            .and_then(|mut c| c.cmd(args))
            .unwrap_or_else(|e| panic!("redis {args:?}: {e}"))
    }

    /// Every key matching `pattern` (`KEYS`: fine on a test's few keys).
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        match self.cmd(&["KEYS", pattern]) {
            Resp::Array(Some(items)) => items
                .into_iter()
                .map(|i| match i {
                    Resp::Bulk(Some(b)) => String::from_utf8_lossy(&b).into_owned(),
                    other => panic!("KEYS answered {other:?}"),
                })
                .collect(),
            other => panic!("KEYS answered {other:?}"),
        }
    }

    /// The number of entries of a stream (0 if it does not exist).
    pub fn xlen(&self, key: &str) -> i64 {
        match self.cmd(&["XLEN", key]) {
            Resp::Int(n) => n,
            other => panic!("XLEN {key} answered {other:?}"),
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A RESP2 value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resp {
    /// `+OK`
    Simple(String),
    /// `-ERR ...`
    Error(String),
    /// `:42`
    Int(i64),
    /// `$n` bytes, or `$-1` (nil).
    Bulk(Option<Vec<u8>>),
    /// `*n` values, or `*-1` (nil).
    Array(Option<Vec<Resp>>),
}

/// One RESP connection with read and write timeouts.
pub struct RespConn {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl RespConn {
    /// Connects, failing within [`IO_TIMEOUT`].
    pub fn connect(addr: SocketAddr) -> std::io::Result<Self> {
        let (r, w) = super::timed_stream(addr)?;
        Ok(Self { r, w })
    }

    /// Changes the read timeout (default [`IO_TIMEOUT`]).
    pub fn set_read_timeout(&self, t: Duration) {
        self.w.set_read_timeout(Some(t)).expect("set read timeout");
    }

    /// Sends one command as an array of bulk strings and reads its reply.
    pub fn cmd(&mut self, args: &[&str]) -> std::io::Result<Resp> {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            out.extend_from_slice(a.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        self.w.write_all(&out)?;
        self.read()
    }

    fn line(&mut self) -> std::io::Result<String> {
        let mut line = String::new();
        if self.r.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if !line.ends_with("\r\n") {
            return Err(std::io::Error::other(format!("RESP line cut: {line:?}")));
        }
        line.truncate(line.len() - 2);
        Ok(line)
    }

    fn read(&mut self) -> std::io::Result<Resp> {
        let line = self.line()?;
        let bad = || std::io::Error::other(format!("bad RESP line {line:?}"));
        let (kind, rest) = line.split_at_checked(1).ok_or_else(bad)?;
        let int = || rest.parse::<i64>().map_err(|_| bad());
        Ok(match kind {
            "+" => Resp::Simple(rest.to_string()),
            "-" => Resp::Error(rest.to_string()),
            ":" => Resp::Int(int()?),
            "$" => match int()? {
                n if n < 0 => Resp::Bulk(None),
                n => {
                    let mut b = vec![0u8; n as usize + 2];
                    self.r.read_exact(&mut b)?;
                    b.truncate(n as usize);
                    Resp::Bulk(Some(b))
                }
            },
            "*" => match int()? {
                n if n < 0 => Resp::Array(None),
                n => {
                    let mut items = Vec::with_capacity(n as usize);
                    for _ in 0..n {
                        items.push(self.read()?);
                    }
                    Resp::Array(Some(items))
                }
            },
            _ => return Err(bad()),
        })
    }
}

// ---------------------------------------------------------------------------------------
// Cluster nodes
// ---------------------------------------------------------------------------------------

/// What the nodes of one test share: the Redis URL, a cluster name no other test uses, the
/// hash key, and the flags every node gets.
pub struct Cluster {
    /// `--cluster-redis`.
    pub url: String,
    /// `--cluster-name`.
    pub name: String,
    /// The `hash.key` every node's data dir holds (32 hex digits).
    pub key: String,
    /// Flags given to every node besides the cluster ones (e.g. `--delay 2s`).
    pub flags: Vec<String>,
}

/// 32 hex digits, the format of `hash.key` (src/datadir.rs), different on every call.
pub fn random_key() -> String {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        ^ u64::from(std::process::id()) << 32;
    let mut rng = XorShift::new(seed);
    rng.bytes(16).iter().map(|b| format!("{b:02x}")).collect()
}

impl Cluster {
    /// A cluster on `redis` named after the test (`tag`) and this process, with a fresh key.
    pub fn new(redis: &Redis, tag: &str, flags: &[&str]) -> Self {
        Self {
            url: redis.url(),
            name: format!("gh-it-{tag}-{}", std::process::id()),
            key: random_key(),
            flags: flags.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// A test directory whose `data/` holds `key` as `hash.key`, as an operator copies it.
    pub fn dir_with_key(key: &str) -> TempDir {
        let dir = TempDir::new("node");
        std::fs::create_dir_all(dir.join("data")).expect("create data dir");
        std::fs::write(dir.join("data").join("hash.key"), format!("{key}\n"))
            .expect("write hash.key");
        dir
    }

    /// The flags of node `id`: the cluster's, then the shared ones, then `extra`.
    pub fn args(&self, id: &str, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = [
            "--cluster-redis",
            &self.url,
            "--node-id",
            id,
            "--cluster-name",
            &self.name,
            "--cluster-retention",
            "1h",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(self.flags.iter().cloned());
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    /// Starts node `id` on a fresh data dir holding the cluster's key; panics unless it
    /// reports ready.
    pub fn node(&self, id: &str, extra: &[&str]) -> Server {
        self.node_in(Self::dir_with_key(&self.key), id, extra)
    }

    /// Starts node `id` on `dir` (which may hold an earlier life's data).
    pub fn node_in(&self, dir: TempDir, id: &str, extra: &[&str]) -> Server {
        let args = self.args(id, extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Server::start_in(dir, &args)
    }

    /// Starts node `id` on a fresh data dir, reaching Redis at `url` (a [`Relay`]'s) instead
    /// of the cluster's.
    pub fn node_at(&self, url: &str, id: &str, extra: &[&str]) -> Server {
        let mut args = self.args(id, extra);
        args[1] = url.to_string(); // the value of --cluster-redis
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Server::start_in(Self::dir_with_key(&self.key), &args)
    }

    /// [`Cluster::node_at`] with `env` added to the node's environment (e.g. `SSL_CERT_FILE`,
    /// the CA a `rediss://` connection trusts).
    pub fn node_at_env(&self, url: &str, id: &str, env: &[(&str, &str)]) -> Server {
        let mut args = self.args(id, &[]);
        args[1] = url.to_string(); // the value of --cluster-redis
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Server::start_in_env(Self::dir_with_key(&self.key), &args, env)
    }

    /// Runs node `id` on `data_dir` to completion, for a start that is expected to fail
    /// ([`super::run_serve`]).
    pub fn run_refused(
        &self,
        data_dir: &str,
        id: &str,
    ) -> (std::process::ExitStatus, String, String) {
        let args = self.args(id, &[]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        super::run_serve(data_dir, &args)
    }

    /// The stream key of node `id`.
    pub fn stream(&self, id: &str) -> String {
        format!("{}:ev:{id}", self.name)
    }
}

/// `GET /status` of a node, parsed.
pub fn status(node: &Server) -> Value {
    let (line, body) = node.http_get("/status");
    assert!(line.contains(" 200 "), "GET /status: {line}\n{body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET /status is not JSON ({e}): {body}"))
}

/// `table.digest` of a status.
pub fn digest_of(status: &Value) -> String {
    match &status["table"]["digest"] {
        Value::String(s) => s.clone(),
        other => panic!("status table.digest is {other}, not a string: {status}"),
    }
}

/// A node's table digest, read now.
pub fn digest(node: &Server) -> String {
    digest_of(&status(node))
}

/// `cluster.connected` of a status.
pub fn connected_of(status: &Value) -> bool {
    status["cluster"]["connected"]
        .as_bool()
        .unwrap_or_else(|| panic!("status cluster.connected is not a boolean: {status}"))
}

/// `cluster.peers[node == peer]` of a status, if listed.
pub fn peer_of<'a>(status: &'a Value, peer: &str) -> Option<&'a Value> {
    status["cluster"]["peers"]
        .as_array()
        .unwrap_or_else(|| panic!("status cluster.peers is not an array: {status}"))
        .iter()
        .find(|p| p["node"] == peer)
}

/// `applied_records` of peer `peer` in a status (0 when the peer is not listed).
pub fn applied_from(status: &Value, peer: &str) -> u64 {
    peer_of(status, peer).map_or(0, |p| {
        p["applied_records"]
            .as_u64()
            .unwrap_or_else(|| panic!("applied_records of {peer} is not a count: {status}"))
    })
}

/// The statuses of `nodes`, named, for failure messages.
pub fn describe(nodes: &[(&str, &Server)]) -> String {
    nodes
        .iter()
        .map(|(name, n)| {
            let s = n
                .http_get("/status")
                .1
                .chars()
                .take(4000)
                .collect::<String>();
            // The periodic snapshot lines would hide the rest.
            let logs: Vec<String> = n
                .logs()
                .into_iter()
                .filter(|l| !l.contains("periodic snapshot written"))
                .collect();
            let tail = logs[logs.len().saturating_sub(30)..].join("\n    ");
            format!("--- node {name}: {s}\n  last log lines:\n    {tail}")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Waits (bounded by [`CONVERGE_TIMEOUT`]) until every node's digest is the same, and
/// returns it; or the last digests seen if they never agree.
pub fn try_converged(nodes: &[(&str, &Server)]) -> Result<String, Vec<String>> {
    let mut last = Vec::new();
    let agreed = poll(CONVERGE_TIMEOUT, || {
        last = nodes.iter().map(|(_, n)| digest(n)).collect::<Vec<_>>();
        last.windows(2)
            .all(|w| w[0] == w[1])
            .then(|| last[0].clone())
    });
    agreed.ok_or(last)
}

/// Like [`try_converged`]; panics with every node's status and log tail if they never agree.
pub fn wait_converged(nodes: &[(&str, &Server)]) -> String {
    try_converged(nodes).unwrap_or_else(|last| {
        panic!(
            "nodes did not converge within {CONVERGE_TIMEOUT:?}: digests {last:?}\n{}",
            describe(nodes)
        )
    })
}

/// Waits (bounded) until `pred` holds for the status of `node`; returns that status.
pub fn wait_status(node: &Server, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    let found = poll(CONVERGE_TIMEOUT, || {
        last = status(node);
        pred(&last).then(|| last.clone())
    });
    found.unwrap_or_else(|| {
        let logs = node.logs();
        panic!(
            "status never showed {what} within {CONVERGE_TIMEOUT:?}; last status: {last}\nlog tail:\n{}",
            logs[logs.len().saturating_sub(30)..].join("\n")
        )
    })
}

/// Waits (bounded) until a node's status says `cluster.connected == want`.
pub fn wait_connected(node: &Server, want: bool) -> Value {
    wait_status(node, &format!("cluster.connected {want}"), |s| {
        connected_of(s) == want
    })
}

// ---------------------------------------------------------------------------------------
// A link that can be cut
// ---------------------------------------------------------------------------------------

/// A TCP relay on a free loopback port in front of Redis, for one node: [`Relay::cut`] makes
/// it a partitioned link (bytes stop flowing both ways, nothing is closed or reset, new
/// connections are accepted and then hear nothing), [`Relay::heal`] ends every connection
/// made before (as TCP would after its timeouts) and relays new ones again. Unlike a stopped
/// Redis, the node sees no error: only its own timeouts can tell it the link is gone.
pub struct Relay {
    /// The port the node connects to.
    pub port: u16,
    state: Arc<RelayState>,
    accept: Option<thread::JoinHandle<()>>,
}

#[derive(Default)]
struct RelayState {
    cut: std::sync::atomic::AtomicBool,
    /// Bumped by every heal: pumps of an older epoch close their connection.
    epoch: std::sync::atomic::AtomicU64,
    stop: std::sync::atomic::AtomicBool,
    /// Connections accepted while cut, held open without a word until the heal.
    held: Mutex<Vec<TcpStream>>,
}

impl Relay {
    /// Relays a free loopback port to `upstream`.
    pub fn start(upstream: SocketAddr) -> Self {
        use std::sync::atomic::Ordering::SeqCst;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind relay");
        let port = listener.local_addr().expect("relay address").port();
        listener.set_nonblocking(true).expect("nonblocking relay");
        let state = Arc::new(RelayState::default());
        let st = state.clone();
        let accept = thread::spawn(move || {
            while !st.stop.load(SeqCst) {
                let down = match listener.accept() {
                    Ok((down, _)) => down,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                    Err(_) => continue,
                };
                let _ = down.set_nonblocking(false);
                if st.cut.load(SeqCst) {
                    st.held.lock().unwrap().push(down);
                    continue;
                }
                let Ok(up) = TcpStream::connect_timeout(&upstream, Duration::from_secs(1)) else {
                    continue; // Redis down: the node sees its connection closed
                };
                let epoch = st.epoch.load(SeqCst);
                for (from, to) in [(&down, &up), (&up, &down)] {
                    let (Ok(from), Ok(to)) = (from.try_clone(), to.try_clone()) else {
                        continue;
                    };
                    let st = st.clone();
                    thread::spawn(move || pump(from, to, &st, epoch));
                }
            }
        });
        Self {
            port,
            state,
            accept: Some(accept),
        }
    }

    /// `redis://127.0.0.1:PORT` of the relay.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Cuts the link: nothing flows any more, nothing is closed.
    pub fn cut(&self) {
        self.state
            .cut
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Restores the link: every connection from before is closed, new ones are relayed.
    pub fn heal(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        self.state.epoch.fetch_add(1, SeqCst);
        for s in self.state.held.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        self.state.cut.store(false, SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.state
            .epoch
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.state
            .stop
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// Copies `from` to `to` until EOF, an error, or a heal after which this connection is stale;
/// while the link is cut it reads nothing, so the sender's bytes wait in the kernel.
fn pump(mut from: TcpStream, mut to: TcpStream, st: &RelayState, epoch: u64) {
    use std::sync::atomic::Ordering::SeqCst;
    let _ = from.set_read_timeout(Some(Duration::from_millis(50)));
    // A write never blocks a pump past a heal for long.
    let _ = to.set_write_timeout(Some(Duration::from_secs(1)));
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if st.epoch.load(SeqCst) != epoch || st.stop.load(SeqCst) {
            let _ = from.shutdown(std::net::Shutdown::Both);
            let _ = to.shutdown(std::net::Shutdown::Both);
            return;
        }
        if st.cut.load(SeqCst) {
            thread::sleep(Duration::from_millis(20));
            continue;
        }
        match from.read(&mut buf) {
            Ok(0) => {
                let _ = to.shutdown(std::net::Shutdown::Write);
                return;
            }
            Ok(n) => {
                // Bytes that arrive after the cut wait for the heal, which drops them with
                // their connection.
                while st.cut.load(SeqCst) && st.epoch.load(SeqCst) == epoch {
                    thread::sleep(Duration::from_millis(20));
                }
                if st.epoch.load(SeqCst) != epoch {
                    continue;
                }
                if to.write_all(&buf[..n]).is_err() {
                    let _ = from.shutdown(std::net::Shutdown::Both);
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => {
                let _ = to.shutdown(std::net::Shutdown::Both);
                return;
            }
        }
    }
}

/// A free loopback port *below* the kernel's ephemeral range (32768 and up by default), for a
/// Redis that is stopped and started again on the same port: while it is down, the nodes keep
/// reconnecting, and an ephemeral port (`free_port`) can be taken meanwhile by one of those
/// connections' own source ports (a connect to a closed loopback port may even connect to
/// itself), so the restart would find its port in use.
fn stable_port() -> u16 {
    let seed = std::process::id() as u64
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
    let mut rng = XorShift::new(seed);
    for _ in 0..1000 {
        let port = rng.range(20_000, 32_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    free_port()
}
