//! A private `dnsmasq` (Debian's `dnsmasq-base`) serving fixed records, for the SPF tests.
//!
//! [`Dns`] runs `/usr/sbin/dnsmasq` as a child process on a loopback port that was free (UDP
//! and TCP) a moment ago, configured by one command line and no files: no upstream servers
//! (`--no-resolv`), no /etc/hosts, authoritative-style answers for the zones given with
//! [`DnsBuilder::local`] (NXDOMAIN for names it does not know), the records given with
//! `--txt-record`, `--host-record`, `--mx-host` and `--ptr-record`, all with one TTL
//! (`--local-ttl`). It is stopped by its PID (never by name), can be paused (SIGSTOP: the
//! port stays open and swallows queries, a DNS server that does not answer), started again on
//! the same port, and is killed when dropped.

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use super::{poll, IO_TIMEOUT};

/// Debian's binary; the test command (`tests/run.sh`) installs `dnsmasq-base` when missing.
pub const DNSMASQ: &str = "/usr/sbin/dnsmasq";

/// Lines dnsmasq wrote, shared with the reader threads.
type Lines = Arc<Mutex<Vec<String>>>;

/// The records and settings of a [`Dns`], one `dnsmasq` option each.
#[derive(Debug, Clone, Default)]
pub struct DnsBuilder {
    args: Vec<String>,
    ttl: Option<u32>,
}

impl DnsBuilder {
    /// A TXT record (`--txt-record`). The text must not hold a comma (dnsmasq's separator
    /// between strings); SPF records do not.
    pub fn txt(mut self, name: &str, text: &str) -> Self {
        assert!(
            !text.contains(','),
            "dnsmasq splits TXT text at commas: {text:?}"
        );
        self.args.push(format!("--txt-record={name},{text}"));
        self
    }

    /// A and/or AAAA records for a name (`--host-record`); each address may be v4 or v6.
    pub fn host(mut self, name: &str, addrs: &[&str]) -> Self {
        self.args
            .push(format!("--host-record={name},{}", addrs.join(",")));
        self
    }

    /// An MX record (`--mx-host`): `name` is exchanged by `exchange` at `preference`.
    pub fn mx(mut self, name: &str, exchange: &str, preference: u16) -> Self {
        self.args
            .push(format!("--mx-host={name},{exchange},{preference}"));
        self
    }

    /// A PTR record (`--ptr-record`), `name` as in-addr.arpa / ip6.arpa.
    pub fn ptr(mut self, name: &str, target: &str) -> Self {
        self.args.push(format!("--ptr-record={name},{target}"));
        self
    }

    /// Answers for every name under `zone` itself (`--local=/zone/`): NXDOMAIN for names it has
    /// no record of, no data for types it has none of — the void lookups of RFC 7208.
    pub fn local(mut self, zone: &str) -> Self {
        self.args.push(format!("--local=/{zone}/"));
        self
    }

    /// The TTL of every record (`--local-ttl`; dnsmasq's default is 0).
    pub fn ttl(mut self, secs: u32) -> Self {
        self.ttl = Some(secs);
        self
    }

    /// Starts it on a free port and waits until it answers.
    pub fn start(self) -> Dns {
        let mut d = Dns {
            child: None,
            port: free_udp_tcp_port(),
            builder: self,
            log: Lines::default(),
            paused: false,
        };
        d.spawn();
        d
    }
}

/// A private `dnsmasq` process.
pub struct Dns {
    child: Option<Child>,
    /// The loopback port it listens on (UDP and TCP), the same across restarts.
    pub port: u16,
    builder: DnsBuilder,
    log: Lines,
    paused: bool,
}

impl Dns {
    /// A builder with no records yet.
    pub fn builder() -> DnsBuilder {
        DnsBuilder::default()
    }

    /// The address it serves on, for `--dns-server`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Everything dnsmasq logged so far, for failure messages.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "dnsmasq is already running");
        let mut args = vec![
            format!("--port={}", self.port),
            "--listen-address=127.0.0.1".into(),
            // Only that address: without it dnsmasq binds the wildcard address.
            "--bind-interfaces".into(),
            "--no-resolv".into(),
            "--no-hosts".into(),
            "--keep-in-foreground".into(),
            // No pid file (the default is /run/dnsmasq.pid, the system's) and log to stderr.
            "--pid-file=".into(),
            "--log-facility=-".into(),
        ];
        if let Some(ttl) = self.builder.ttl {
            args.push(format!("--local-ttl={ttl}"));
        }
        args.extend(self.builder.args.iter().cloned());
        let mut child = Command::new(DNSMASQ)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {DNSMASQ} ({e}): install Debian's package dnsmasq-base \
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
        // Until it answers a query over UDP (any answer: it is up and reading its socket).
        let ready = poll(IO_TIMEOUT, || {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().expect("try_wait") {
                panic!(
                    "dnsmasq on port {} exited with {status}; log:\n{}",
                    self.port,
                    self.log()
                );
            }
            answers(self.addr()).then_some(())
        });
        assert!(
            ready.is_some(),
            "dnsmasq on port {} did not answer within {IO_TIMEOUT:?}; log:\n{}",
            self.port,
            self.log()
        );
    }

    /// Stops it (SIGKILL by PID): queries now meet a closed port.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if self.paused {
                signal(&child, "CONT");
                self.paused = false;
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port with the same records.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Starts it again on the same port with other records.
    pub fn restart_with(&mut self, builder: DnsBuilder) {
        self.stop();
        self.builder = builder;
        self.spawn();
    }

    /// Freezes it (SIGSTOP): the port stays open and queries go unanswered.
    pub fn pause(&mut self) {
        let child = self.child.as_ref().expect("dnsmasq is running");
        signal(child, "STOP");
        self.paused = true;
    }

    /// Thaws a paused server (SIGCONT).
    pub fn resume(&mut self) {
        let child = self.child.as_ref().expect("dnsmasq is running");
        signal(child, "CONT");
        self.paused = false;
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Sends a signal to the child by its PID.
fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{sig} {}", child.id());
}

/// A port free for both UDP and TCP on 127.0.0.1 a moment ago.
fn free_udp_tcp_port() -> u16 {
    for _ in 0..100 {
        let tcp = TcpListener::bind("127.0.0.1:0").expect("bind a free TCP port");
        let port = tcp.local_addr().unwrap().port();
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no port free for both UDP and TCP on 127.0.0.1");
}

/// Whether a DNS server at `addr` answers a query (for `test.` SOA) over UDP within 200 ms.
fn answers(addr: SocketAddr) -> bool {
    let Ok(sock) = UdpSocket::bind("127.0.0.1:0") else {
        return false;
    };
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    // Header: id 0x4748, RD, one question; `test.` IN SOA.
    let query = [
        0x47, 0x48, 0x01, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 4, b't', b'e',
        b's', b't', 0, 0x00, 0x06, 0x00, 0x01,
    ];
    if sock.send_to(&query, addr).is_err() {
        return false;
    }
    let mut buf = [0u8; 512];
    matches!(sock.recv_from(&mut buf), Ok((n, _)) if n >= 12 && buf[..2] == [0x47, 0x48])
}
