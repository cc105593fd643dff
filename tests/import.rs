//! The importers (`greyhound admin import`, DESIGN §13) on data written by the real peer
//! programs: Debian's postgrey (with `db5.3_dump`), sqlgrey (SQLite), greylistd and Postfix,
//! each run privately here (own port or socket, own data directory in a temp dir, stopped by
//! PID), fed requests, stopped, and its files read back with the reader.
//!
//! `tests/run.sh` installs the packages; the tests need root (the peers switch to their own
//! users) and fail, not skip, without them. Asserted: what each reader yields from what the
//! peer wrote, never how long anything took.
//!
//! With `GREYHOUND_IMPORT_FIXTURES=DIR` set, each test also copies the files the real
//! programs wrote into DIR: that is how `tests/fixtures/import/` was made (see its README).

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::{free_port, poll, rcpt_attrs, with, PolicyAddr, PolicyConn, TempDir, IO_TIMEOUT};
use greyhound::import::{self, ClientItem, Item, ReadOptions, Skip, Source, Summary, TripletItem};

/// Greylisting delay given to the peers: a retry after [`RETRY_AFTER`] has waited it out.
const PEER_DELAY: u64 = 1;
const RETRY_AFTER: Duration = Duration::from_millis(2200);

/// A peer process that is stopped (SIGTERM, then SIGKILL) when dropped.
struct Peer {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Peer {
    fn spawn(name: &'static str, cmd: &mut Command, log: PathBuf) -> Self {
        let out = std::fs::File::create(&log).expect("create peer log");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup log"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("run {name}: {e} (tests/run.sh installs it)"));
        Self { name, child, log }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `ready` holds, failing with the peer's output if it exits or times out.
    fn wait_for(&mut self, what: &str, mut ready: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready() {
            let exited = self.child.try_wait().expect("try_wait");
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "{} never {what} (exit {exited:?}):\n{}",
                self.name,
                self.output()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, the way its init script stops it (each peer saves its data then), and wait.
    fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let stopped = poll(IO_TIMEOUT, || self.child.try_wait().ok().flatten());
        assert!(
            stopped.is_some(),
            "{} did not stop:\n{}",
            self.name,
            self.output()
        );
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Gives `dir` to the system user `user`, as the peer runs as it.
fn chown(user: &str, dir: &Path) {
    let ok = Command::new("chown")
        .arg(format!("{user}:{user}"))
        .arg(dir)
        .status()
        .expect("run chown")
        .success();
    assert!(
        ok,
        "chown {user}: the user is missing (is the package installed?)"
    );
}

/// Copies `from` into the fixtures directory as `name`, when one is asked for.
fn keep_fixture(from: &Path, name: &str) {
    if let Some(dir) = std::env::var_os("GREYHOUND_IMPORT_FIXTURES") {
        let to = PathBuf::from(dir).join(name);
        std::fs::create_dir_all(to.parent().expect("parent")).expect("create fixture dir");
        std::fs::copy(from, &to).unwrap_or_else(|e| panic!("copy {}: {e}", to.display()));
    }
}

/// Everything a reader yields, with its summary; fails if reading broke off.
fn read_all(source: Source, path: &Path, opts: &ReadOptions) -> (Vec<import::ReadResult>, Summary) {
    let mut reader = import::open(source, path, opts)
        .unwrap_or_else(|e| panic!("open {source} {}: {e}", path.display()));
    let mut summary = Summary::default();
    let mut all = Vec::new();
    for r in reader.by_ref() {
        summary.record(&r);
        all.push(r);
    }
    assert!(reader.failure().is_none(), "{:?}", reader.failure());
    assert_eq!(
        reader.bytes_read(),
        reader.total_bytes(),
        "progress reaches the end"
    );
    (all, summary)
}

fn triplets(all: &[import::ReadResult]) -> Vec<TripletItem> {
    let mut v = all
        .iter()
        .filter_map(|r| match r {
            Ok(Item::Triplet(t)) => Some(t.clone()),
            _ => None,
        })
        .collect::<Vec<_>>();
    v.sort_by(|a, b| (a.client, &a.sender, &a.recipient).cmp(&(b.client, &b.sender, &b.recipient)));
    v
}

fn clients(all: &[import::ReadResult]) -> Vec<ClientItem> {
    let mut v = all
        .iter()
        .filter_map(|r| match r {
            Ok(Item::Client(c)) => Some(c.clone()),
            _ => None,
        })
        .collect::<Vec<_>>();
    v.sort_by_key(|c| c.client);
    v
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("address")
}

/// (client, sender, recipient, passed) of each triplet, for comparing what matters.
fn shape(ts: &[TripletItem]) -> Vec<(IpAddr, &str, &str, bool)> {
    ts.iter()
        .map(|t| (t.client, t.sender.as_str(), t.recipient.as_str(), t.passed))
        .collect()
}

/// One Postfix policy request to a peer on `port`; the peer's action.
fn ask(port: u16, client: &str, name: &str, sender: &str, recipient: &str) -> String {
    let addr = PolicyAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], port)));
    let attrs = with(rcpt_attrs(client, sender, recipient), "client_name", name);
    let attrs = with(attrs, "reverse_client_name", name);
    // Every request is its own SMTP transaction: postgrey answers DUNNO to further
    // recipients of an `instance` it already let through.
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let instance = format!("{:x}.test", NEXT.fetch_add(1, Ordering::Relaxed));
    let attrs = with(attrs, "instance", &instance);
    PolicyConn::connect(&addr).ask(&attrs)
}

fn listening(port: u16) -> bool {
    TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), IO_TIMEOUT).is_ok()
}

// ---------------------------------------------------------------------------------------
// postgrey

/// Runs postgrey with `extra` flags, sends the test's requests, stops it and dumps both
/// databases: (postgrey.db dump, postgrey_clients.db dump).
fn run_postgrey(tmp: &TempDir, extra: &[&str]) -> (PathBuf, PathBuf) {
    let dbdir = tmp.join("db");
    std::fs::create_dir_all(&dbdir).expect("create dbdir");
    chown("postgrey", &dbdir);
    let port = free_port();
    let mut pg = Peer::spawn(
        "postgrey",
        Command::new("/usr/sbin/postgrey")
            .arg(format!("--inet=127.0.0.1:{port}"))
            .arg(format!("--dbdir={}", dbdir.display()))
            .arg(format!("--pidfile={}", tmp.file("postgrey.pid")))
            .arg(format!("--delay={PEER_DELAY}"))
            // As root it switches to its own user, which owns the dbdir.
            .args(["--user=postgrey", "--group=postgrey"])
            .args(extra),
        tmp.join("postgrey.log"),
    );
    pg.wait_for("listened", || listening(port));

    let greylisted = |a: &str| assert!(a.contains("DEFER_IF_PERMIT"), "postgrey said {a:?}");
    let passed = |a: &str| assert!(a.contains("X-Greylist: delayed"), "postgrey said {a:?}");
    greylisted(&ask(
        port,
        "192.0.2.10",
        "unknown",
        "alice@example.org",
        "bob@example.net",
    ));
    greylisted(&ask(
        port,
        "198.51.100.7",
        "unknown",
        "",
        "bounces@example.net",
    ));
    greylisted(&ask(
        port,
        "2001:db8::5",
        "unknown",
        "carol@example.com",
        "dave@example.net",
    ));
    // postgrey rewrites digits in the local part (`#`) and keeps UTF-8 as bytes.
    greylisted(&ask(
        port,
        "203.0.113.9",
        "unknown",
        "list-4711@example.org",
        "josé@example.net",
    ));
    thread::sleep(RETRY_AFTER);
    passed(&ask(
        port,
        "192.0.2.10",
        "unknown",
        "alice@example.org",
        "bob@example.net",
    ));
    passed(&ask(
        port,
        "2001:db8::5",
        "unknown",
        "carol@example.com",
        "dave@example.net",
    ));
    pg.stop();

    let dump = |db: &str| {
        let out = tmp.join(&format!("{db}.dump"));
        let status = Command::new("db5.3_dump")
            .arg("-p")
            .arg("-h")
            .arg(&dbdir)
            .arg("-f")
            .arg(&out)
            .arg(db)
            .status()
            .expect("run db5.3_dump (package db5.3-util)");
        assert!(status.success(), "db5.3_dump {db} failed");
        out
    };
    (dump("postgrey.db"), dump("postgrey_clients.db"))
}

#[test]
fn postgrey_dumps_import_as_postgrey_answered() {
    let tmp = TempDir::new("import-postgrey");
    let (db, clients_db) = run_postgrey(&tmp, &[]);
    keep_fixture(&db, "postgrey.dump");
    keep_fixture(&clients_db, "postgrey_clients.dump");
    let opts = ReadOptions {
        peer_delay: PEER_DELAY,
        ..ReadOptions::default()
    };

    let (all, summary) = read_all(Source::Postgrey, &db, &opts);
    assert_eq!(summary.skipped_total(), 0, "{summary}");
    let ts = triplets(&all);
    assert_eq!(
        shape(&ts),
        vec![
            (
                ip("192.0.2.0"),
                "alice@example.org",
                "bob@example.net",
                true
            ),
            (ip("198.51.100.0"), "", "bounces@example.net", false),
            (
                ip("203.0.113.0"),
                "list-#@example.org",
                "josé@example.net",
                false
            ),
            (
                ip("2001:db8::"),
                "carol@example.com",
                "dave@example.net",
                true
            ),
        ]
    );
    for t in &ts {
        assert!(
            t.last_seen >= t.first_seen && t.first_seen > 1_700_000_000,
            "{t:?}"
        );
    }

    let (all, summary) = read_all(Source::Postgrey, &clients_db, &opts);
    assert_eq!(summary.skipped_total(), 0, "{summary}");
    let cs = clients(&all);
    assert_eq!(
        cs.iter().map(|c| (c.client, c.count)).collect::<Vec<_>>(),
        vec![(ip("192.0.2.10"), 1), (ip("2001:db8::5"), 1)]
    );

    // Deterministic: the same file gives the same items again.
    assert_eq!(read_all(Source::Postgrey, &clients_db, &opts).0, all);
}

#[test]
fn postgrey_privacy_hashes_are_reported_not_imported() {
    let tmp = TempDir::new("import-postgrey-privacy");
    let (db, clients_db) = run_postgrey(&tmp, &["--privacy"]);
    keep_fixture(&db, "postgrey-privacy.dump");
    keep_fixture(&clients_db, "postgrey_clients-privacy.dump");
    for (file, n) in [(&db, 4), (&clients_db, 2)] {
        let (_, summary) = read_all(Source::Postgrey, file, &ReadOptions::default());
        assert_eq!(summary.imported(), 0, "{summary}");
        assert_eq!(summary.skipped.get(&Skip::Hashed), Some(&n), "{summary}");
        assert!(
            summary.to_string().contains("cannot be recovered"),
            "{summary}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// sqlgrey

#[test]
fn sqlgrey_database_imports_connect_rows_and_client_counts() {
    let tmp = TempDir::new("import-sqlgrey");
    let dbdir = tmp.join("db");
    std::fs::create_dir_all(&dbdir).expect("create dbdir");
    chown("sqlgrey", &dbdir);
    let db = dbdir.join("sqlgrey.db");
    let port = free_port();
    // reconnect_delay is in minutes; SQLite does the arithmetic in seconds, so a fraction
    // (1.2 s) works.
    let conf = format!(
        "loglevel = 2\ninet = 127.0.0.1:{port}\npidfile = {}\ndb_type = SQLite\n\
         db_name = {}\nreconnect_delay = 0.02\ngroup_domain_level = 2\nadmin_mail = root@localhost\n",
        tmp.file("sqlgrey.pid"),
        db.display()
    );
    std::fs::write(tmp.join("sqlgrey.conf"), conf).expect("write sqlgrey.conf");
    let mut sg = Peer::spawn(
        "sqlgrey",
        Command::new("/usr/sbin/sqlgrey")
            .arg("-f")
            .arg(tmp.join("sqlgrey.conf")),
        tmp.join("sqlgrey.log"),
    );
    sg.wait_for("listened", || listening(port));

    let greylisted = |a: &str| assert!(a.contains("defer_if_permit"), "sqlgrey said {a:?}");
    let passed = |a: &str| assert!(a.contains("X-Greylist:"), "sqlgrey said {a:?}");
    // A client with a static-looking name is stored as its class C (`192.0.2`).
    let mx = "mail.example.org";
    greylisted(&ask(
        port,
        "192.0.2.10",
        mx,
        "alice@example.org",
        "bob@example.net",
    ));
    greylisted(&ask(
        port,
        "192.0.2.10",
        mx,
        "frank@example.org",
        "bob@example.net",
    ));
    greylisted(&ask(
        port,
        "2001:db8::5",
        "unknown",
        "carol@example.com",
        "dave@example.net",
    ));
    greylisted(&ask(
        port,
        "198.51.100.7",
        "unknown",
        "",
        "bounces@example.net",
    ));
    thread::sleep(RETRY_AFTER);
    passed(&ask(
        port,
        "192.0.2.10",
        mx,
        "alice@example.org",
        "bob@example.net",
    ));
    // The second sender of example.org from 192.0.2 promotes the domain (domain_awl).
    passed(&ask(
        port,
        "192.0.2.10",
        mx,
        "frank@example.org",
        "bob@example.net",
    ));
    passed(&ask(
        port,
        "2001:db8::5",
        "unknown",
        "carol@example.com",
        "dave@example.net",
    ));
    greylisted(&ask(
        port,
        "203.0.113.9",
        "unknown",
        "eve@example.com",
        "bob@example.net",
    ));
    sg.stop();
    keep_fixture(&db, "sqlgrey.db");

    let (all, summary) = read_all(Source::Sqlgrey, &db, &ReadOptions::default());
    assert_eq!(
        shape(&triplets(&all)),
        vec![
            (ip("198.51.100.7"), "", "bounces@example.net", false),
            (
                ip("203.0.113.9"),
                "eve@example.com",
                "bob@example.net",
                false
            ),
        ],
        "{summary}"
    );
    assert_eq!(
        clients(&all)
            .iter()
            .map(|c| (c.client, c.count))
            .collect::<Vec<_>>(),
        vec![(ip("192.0.2.0"), 1), (ip("2001:db8::5"), 1)]
    );
    // carol's from_awl row and example.org's domain_awl row: any-recipient passes.
    assert_eq!(
        summary.skipped.get(&Skip::NoEquivalent),
        Some(&2),
        "{summary}"
    );
    assert_eq!(summary.skipped_total(), 2, "{summary}");
    assert_eq!(
        read_all(Source::Sqlgrey, &db, &ReadOptions::default()).0,
        all
    );
}

// ---------------------------------------------------------------------------------------
// greylistd

/// One command on greylistd's socket, as its `greylist` client sends it; the answer.
fn greylistd(socket: &Path, command: &str) -> String {
    let mut s = UnixStream::connect(socket).expect("connect to greylistd");
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.write_all(command.as_bytes()).expect("write to greylistd");
    let mut answer = String::new();
    s.read_to_string(&mut answer)
        .expect("read greylistd's answer");
    answer
}

#[test]
fn greylistd_states_and_triplets_import() {
    let tmp = TempDir::new("import-greylistd");
    let socket = tmp.join("socket");
    let conf = format!(
        "[timeouts]\nretryMin = {PEER_DELAY}\nretryMax = 28800\nexpire = 5184000\n\
         [socket]\npath = {}\nowner = root:root\nmode = 0600\n\
         [data]\nupdate = 600\nstatefile = {}\ntripletfile = {}\nsavetriplets = true\n",
        socket.display(),
        tmp.file("states"),
        tmp.file("triplets")
    );
    std::fs::write(tmp.join("config"), conf).expect("write greylistd config");
    let mut gl = Peer::spawn(
        "greylistd",
        Command::new("/usr/sbin/greylistd").arg(tmp.join("config")),
        tmp.join("greylistd.log"),
    );
    gl.wait_for("made its socket", || UnixStream::connect(&socket).is_ok());

    // What Exim's ACL sends: `update IP SENDER RECIPIENT`; the null sender's empty word
    // vanishes.
    let t1 = "update 192.0.2.10 alice@example.org bob@example.net";
    assert_eq!(greylistd(&socket, t1), "grey");
    assert_eq!(
        greylistd(&socket, "update 198.51.100.7 bounces@example.net"),
        "grey"
    );
    assert_eq!(
        greylistd(
            &socket,
            "add --black 203.0.113.66 spam@example.com bob@example.net"
        ),
        "Added to blacklist"
    );
    assert_eq!(
        greylistd(&socket, "add --white 2001:db8::5"),
        "Added to whitelist"
    );
    thread::sleep(RETRY_AFTER);
    assert_eq!(greylistd(&socket, t1), "white");
    gl.stop();
    keep_fixture(&tmp.join("states"), "greylistd/states");
    keep_fixture(&tmp.join("triplets"), "greylistd/triplets");

    let (all, summary) = read_all(
        Source::Greylistd,
        &tmp.join("states"),
        &ReadOptions::default(),
    );
    assert_eq!(
        shape(&triplets(&all)),
        vec![
            (
                ip("192.0.2.10"),
                "alice@example.org",
                "bob@example.net",
                true
            ),
            (ip("198.51.100.7"), "", "bounces@example.net", false),
        ],
        "{summary}"
    );
    assert_eq!(
        clients(&all)
            .iter()
            .map(|c| (c.client, c.count))
            .collect::<Vec<_>>(),
        vec![(ip("2001:db8::5"), 1)]
    );
    assert_eq!(
        summary.skipped.get(&Skip::NoEquivalent),
        Some(&1),
        "{summary}"
    );
    assert_eq!(summary.skipped_total(), 1, "{summary}");
}

// ---------------------------------------------------------------------------------------
// Postfix mail log

/// Where Debian installs the `postfix` command.
const POSTFIX: &str = "/usr/sbin/postfix";

/// A private Postfix (configuration, queue, mailbox and `maillog_file` in a temp dir; the
/// configuration of `tests/postfix/` without the policy service), SMTP on a free loopback
/// port, stopped when dropped. The machine's `/etc/postfix` is never read.
struct Postfix {
    root: PathBuf,
    peer: Peer,
    smtp: SocketAddr,
}

impl Postfix {
    fn postfix(&self, command: &str) -> bool {
        Command::new(POSTFIX)
            .arg("-c")
            .arg(self.root.join("etc"))
            .arg(command)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn start(root: &Path) -> Self {
        for d in ["etc", "spool", "data", "mail"] {
            std::fs::create_dir_all(root.join(d)).expect("create Postfix directory");
        }
        chown("postfix", &root.join("data"));
        chown("postfix", &root.join("mail"));
        let id = |flag: &str| {
            let out = Command::new("id")
                .args([flag, "postfix"])
                .output()
                .expect("run id");
            String::from_utf8(out.stdout)
                .expect("id output")
                .trim()
                .to_owned()
        };
        let main_cf = include_str!("postfix/main.cf.private")
            .replace("@DIR@", &root.display().to_string())
            .replace("@UID@", &id("-u"))
            .replace("@GID@", &id("-g"))
            + "smtpd_recipient_restrictions = reject_unauth_destination\n";
        std::fs::write(root.join("etc/main.cf"), main_cf).expect("write main.cf");
        let port = free_port();
        let master = include_str!("postfix/master.cf")
            .replace("@SMTP_PORT@", &port.to_string())
            .replace("@FAIL_CLOSED_PORT@", &free_port().to_string());
        std::fs::write(root.join("etc/master.cf"), master).expect("write master.cf");
        let mut peer = Peer::spawn(
            "postfix",
            Command::new(POSTFIX)
                .arg("-c")
                .arg(root.join("etc"))
                .arg("start-fg"),
            root.join("postfix.out"),
        );
        let smtp = SocketAddr::from(([127, 0, 0, 1], port));
        peer.wait_for("listened", || listening(port));
        Self {
            root: root.to_path_buf(),
            peer,
            smtp,
        }
    }

    fn maillog(&self) -> String {
        std::fs::read_to_string(self.root.join("maillog")).unwrap_or_default()
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        self.postfix("stop");
        let _ = poll(IO_TIMEOUT, || self.peer.child.try_wait().ok().flatten());
    }
}

/// A minimal SMTP client: each command's reply code.
struct Smtp {
    r: std::io::BufReader<TcpStream>,
    w: TcpStream,
}

impl Smtp {
    fn open(addr: SocketAddr) -> Self {
        let w = TcpStream::connect_timeout(&addr, IO_TIMEOUT).expect("connect to Postfix");
        w.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let r = std::io::BufReader::new(w.try_clone().expect("clone stream"));
        let mut s = Self { r, w };
        assert_eq!(s.reply(), 220, "greeting");
        s
    }

    fn reply(&mut self) -> u16 {
        use std::io::BufRead;
        loop {
            let mut line = String::new();
            self.r.read_line(&mut line).expect("read SMTP reply");
            assert!(line.len() >= 4, "SMTP reply {line:?}");
            if line.as_bytes()[3] != b'-' {
                return line[..3].parse().expect("reply code");
            }
        }
    }

    fn cmd(&mut self, line: &str) -> u16 {
        self.w
            .write_all(format!("{line}\r\n").as_bytes())
            .expect("write SMTP command");
        self.reply()
    }
}

/// One SMTP session from `client` (Postfix's XCLIENT): each RCPT's reply code; the message
/// is sent when `data` and a recipient was accepted.
fn smtp(pf: &Postfix, client: &str, sender: &str, rcpts: &[&str], data: bool) -> Vec<u16> {
    let mut s = Smtp::open(pf.smtp);
    assert_eq!(s.cmd("EHLO client.example"), 250);
    let xclient = format!("XCLIENT ADDR={client} NAME=mail.sender.test");
    assert_eq!(s.cmd(&xclient), 220, "{xclient}");
    assert_eq!(s.cmd("EHLO client.example"), 250);
    assert_eq!(s.cmd(&format!("MAIL FROM:<{sender}>")), 250);
    let codes = rcpts
        .iter()
        .map(|r| s.cmd(&format!("RCPT TO:<{r}>")))
        .collect::<Vec<_>>();
    if data && codes.contains(&250) {
        assert_eq!(s.cmd("DATA"), 354);
        assert_eq!(s.cmd("Subject: import test\r\n\r\nhello\r\n."), 250);
    }
    let _ = s.cmd("QUIT");
    codes
}

/// Waits until the log shows `n` deliveries.
fn wait_delivered(pf: &Postfix, n: usize) {
    let done = poll(IO_TIMEOUT, || {
        (pf.maillog().matches("status=sent").count() >= n).then_some(())
    });
    assert!(done.is_some(), "not {n} deliveries:\n{}", pf.maillog());
}

#[test]
fn postfix_log_deliveries_import_as_passed_triplets() {
    let tmp = TempDir::new("import-postfix");
    let pf = Postfix::start(&tmp.join("pf"));
    assert_eq!(
        smtp(
            &pf,
            "192.0.2.10",
            "alice@example.org",
            &["bob@example.net", "carol@example.net"],
            true
        ),
        [250, 250]
    );
    assert_eq!(
        smtp(&pf, "198.51.100.7", "", &["postmaster@example.net"], true),
        [250]
    );
    // Refused (relay) and never sent (no DATA): no delivery, counted.
    assert_eq!(
        smtp(
            &pf,
            "203.0.113.5",
            "spam@example.com",
            &["x@elsewhere.test"],
            true
        ),
        [454]
    );
    assert_eq!(
        smtp(
            &pf,
            "203.0.113.6",
            "ann@example.com",
            &["bob@example.net"],
            false
        ),
        [250]
    );
    wait_delivered(&pf, 3);
    // Postfix's own rotation: maillog -> maillog.YYYYMMDD-HHMMSS.gz.
    assert!(pf.postfix("logrotate"), "postfix logrotate failed");
    let rotated = poll(IO_TIMEOUT, || {
        std::fs::read_dir(&pf.root)
            .ok()?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .find(|n| n.starts_with("maillog.") && n.ends_with(".gz"))
    })
    .unwrap_or_else(|| panic!("no rotated log in {}", pf.root.display()));
    assert_eq!(
        smtp(
            &pf,
            "192.0.2.77",
            "dave@example.com",
            &["erin@example.net"],
            true
        ),
        [250]
    );
    wait_delivered(&pf, 1);
    drop(pf);
    let root = tmp.join("pf");
    keep_fixture(&root.join("maillog"), "postfix/maillog");
    keep_fixture(&root.join(&rotated), &format!("postfix/{rotated}"));

    let (all, summary) = read_all(
        Source::PostfixLog,
        &root.join("maillog"),
        &ReadOptions::default(),
    );
    assert_eq!(
        shape(&triplets(&all)),
        vec![
            (
                ip("192.0.2.10"),
                "alice@example.org",
                "bob@example.net",
                true
            ),
            (
                ip("192.0.2.10"),
                "alice@example.org",
                "carol@example.net",
                true
            ),
            (
                ip("192.0.2.77"),
                "dave@example.com",
                "erin@example.net",
                true
            ),
            (ip("198.51.100.7"), "", "postmaster@example.net", true),
        ],
        "{summary}"
    );
    let now = ReadOptions::default().now;
    for t in triplets(&all) {
        assert!(
            t.last_seen <= now + 1 && t.last_seen + 3600 > now,
            "{t:?} at {now}"
        );
    }
    assert_eq!(summary.skipped.get(&Skip::Unparsable), None, "{summary}");
    assert!(summary.skipped[&Skip::NotDelivered] > 0, "{summary}");
    // The message that never got DATA is among them, as a dropped queue id.
    assert!(
        all.iter().any(|r| matches!(r, Err((Skip::NotDelivered, m)) if m.contains("removed") || m.contains("no delivery"))),
        "{summary}"
    );
}
