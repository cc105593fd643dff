//! `greyhound admin` against a running server, through the real binary (DESIGN §13): every
//! subcommand, its exit code (0 done or found, 1 not found, 2 error) and `--json` shape, the
//! socket's mode, `--admin off`, bad requests on the socket, and a delete across a cluster of
//! two nodes on a real `redis-server`.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::redis::{status, wait_converged, Cluster, Redis};
use common::{sleep_past, Conn, Server, TempDir, BIN, IO_TIMEOUT};
use serde_json::Value;

/// What one `greyhound admin` run gave.
struct Run {
    code: i32,
    out: String,
    err: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.out)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", self.out, self.err))
    }
}

fn admin_at(socket: &Path, args: &[&str]) -> Run {
    let out = Command::new(BIN)
        .arg("admin")
        .arg("--socket")
        .arg(socket)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run greyhound admin");
    Run {
        code: out.status.code().unwrap_or(-1),
        out: String::from_utf8_lossy(&out.stdout).into_owned(),
        err: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn socket_of(s: &Server) -> PathBuf {
    s.data_dir().join("admin.sock")
}

fn admin(s: &Server, args: &[&str]) -> Run {
    admin_at(&socket_of(s), args)
}

/// Runs and checks the exit code, showing everything if it is not the one wanted.
fn expect(s: &Server, args: &[&str], code: i32) -> Run {
    let r = admin(s, args);
    assert_eq!(
        r.code, code,
        "greyhound admin {args:?}: exit {}\nstdout: {}\nstderr: {}",
        r.code, r.out, r.err
    );
    r
}

fn ask(s: &Server, line: &str) -> String {
    Conn::connect(s.native).ask(line)
}

/// The answer of `PEEK triplet` without its text: `DEFER 2`, `PASS known`.
fn peek(s: &Server, triplet: &str) -> String {
    let a = ask(s, &format!("PEEK {triplet}"));
    a.split(' ').take(2).collect::<Vec<_>>().join(" ")
}

const T: [&str; 3] = ["192.0.2.10", "alice@sender.example", "bob@rcpt.example"];

fn t(extra: &[&'static str]) -> Vec<&'static str> {
    T.iter().chain(extra).copied().collect()
}

#[test]
fn every_subcommand_against_a_running_server() {
    let s = Server::start(&["--delay", "2s"]);
    let triplet = T.join(" ");

    // status: human and JSON.
    let r = expect(&s, &["status"], 0);
    assert!(r.out.contains("triplets        0"), "{}", r.out);
    assert!(r.out.contains("cluster         off"), "{}", r.out);
    let j = expect(&s, &["status", "--json"], 0).json();
    assert_eq!(j["outcome"], "ok");
    let st = &j["body"]["status"];
    for key in [
        "uptime_seconds",
        "triplets",
        "greylisted",
        "whitelisted",
        "awl_clients",
        "tombstones",
        "table_bytes",
    ] {
        assert!(st[key].is_u64(), "status.{key} in {j}");
    }
    assert!(
        st["cluster"].is_null() && st["snapshot_unix"].is_null(),
        "{j}"
    );

    // lookup of an unknown triplet: not found, and it records nothing.
    let mut lookup = vec!["lookup"];
    lookup.extend(T);
    let j = expect(&s, &[&lookup[..], &["--json"]].concat(), 1).json();
    assert_eq!(j["outcome"], "not-found");
    let l = &j["body"]["lookup"];
    assert_eq!(l["client_net"], "192.0.2.0/24");
    assert_eq!(l["identities"][0]["state"], "none");
    assert_eq!(l["answer"], "DEFER 2");
    assert_eq!(peek(&s, &triplet), "DEFER 2");
    assert_eq!(
        expect(&s, &["status", "--json"], 0).json()["body"]["status"]["triplets"],
        0
    );

    // After a first attempt: greylisted, with its times.
    assert!(ask(&s, &format!("CHECK {triplet}")).starts_with("DEFER "));
    let r = expect(&s, &lookup, 0);
    assert!(r.out.contains("greylisted: first seen"), "{}", r.out);
    assert!(
        r.out
            .contains("identity        192.0.2.0/24 (prefix; new records go here)"),
        "{}",
        r.out
    );
    let l = expect(&s, &[&lookup[..], &["--json"]].concat(), 0).json()["body"]["lookup"].clone();
    let id = &l["identities"][0];
    assert_eq!(id["state"], "greylisted");
    assert_eq!(
        id["passes_from"].as_u64().unwrap(),
        id["first_seen"].as_u64().unwrap() + 2
    );
    assert_eq!(id["key"].as_str().unwrap().len(), 32);

    // whitelist: passes at once, with a TTL.
    let other = ["192.0.2.10", "carol@sender.example", "bob@rcpt.example"];
    let mut wl = vec!["whitelist"];
    wl.extend(other);
    let j = expect(&s, &[&wl[..], &["--ttl", "2d", "--json"]].concat(), 0).json();
    let until = j["body"]["whitelist"]["whitelisted_until"]
        .as_u64()
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        until > now + 2 * 86_400 - 60 && until <= now + 2 * 86_400 + 60,
        "{j}"
    );
    assert_eq!(ask(&s, &format!("CHECK {}", other.join(" "))), "PASS known");
    let r = expect(&s, &wl, 0);
    assert!(
        r.out.starts_with("whitelisted under 192.0.2.0/24 until "),
        "{}",
        r.out
    );
    expect(&s, &[&wl[..], &["--ttl", "soon"]].concat(), 2);

    // delete: found once, then not; the triplet starts over.
    let mut del = vec!["delete"];
    del.extend(other);
    assert_eq!(expect(&s, &del, 0).out.trim(), "deleted");
    expect(&s, &del, 1);
    assert_eq!(peek(&s, &other.join(" ")), "DEFER 2");
    let j = expect(&s, &[&del[..], &["--json"]].concat(), 1).json();
    assert_eq!(j["outcome"], "not-found");
    assert_eq!(
        expect(&s, &["status", "--json"], 0).json()["body"]["status"]["tombstones"],
        1
    );

    // delete-client: a client that earned the auto-whitelist loses it.
    expect(&s, &["delete-client", "198.51.100.7"], 1);

    // snapshot now: a file appears, and status says how old it is.
    let j = expect(&s, &["snapshot", "--json"], 0).json();
    let file = j["body"]["snapshot"]["file"].as_str().unwrap().to_string();
    assert!(s.data_dir().join(&file).is_file(), "{j}");
    assert_eq!(j["body"]["snapshot"]["triplets"], 1);
    let st = expect(&s, &["status", "--json"], 0).json();
    assert!(
        st["body"]["status"]["snapshot_age_seconds"]
            .as_u64()
            .unwrap()
            < 60
    );

    // import: one passed triplet, one expired, one client count, one line it cannot read.
    let dir = TempDir::new("import");
    let f = dir.join("items.jsonl");
    let unix = now;
    std::fs::write(
        &f,
        format!(
            "{}\n{}\n{}\nthis is not an item\n",
            serde_json::json!({"kind": "triplet", "client": "203.0.113.9", "sender": "dave@old.example",
                "recipient": "erin@rcpt.example", "first_seen": unix - 4000, "last_seen": unix - 100, "passed": true}),
            serde_json::json!({"kind": "triplet", "client": "203.0.113.9", "sender": "gone@old.example",
                "recipient": "erin@rcpt.example", "first_seen": unix - 400_000, "last_seen": unix - 400_000, "passed": false}),
            serde_json::json!({"kind": "client", "client": "203.0.113.0", "count": 9, "last_seen": unix - 100}),
        ),
    )
    .unwrap();
    let import = ["import", "--from", "jsonl", f.to_str().unwrap()];
    let r = expect(&s, &import, 0);
    assert!(
        r.out.contains(
            "read 3 records; imported 1 triplets and 1 client counts; 1 already expired here"
        ),
        "{}",
        r.out
    );
    assert!(
        r.out.contains("skipped 1 (unparsable), first: line 4:"),
        "{}",
        r.out
    );
    assert_eq!(
        peek(&s, "203.0.113.9 dave@old.example erin@rcpt.example"),
        "PASS known"
    );
    // The client's count was imported too: it is auto-whitelisted.
    assert_eq!(
        peek(&s, "203.0.113.20 new@any.example frank@rcpt.example"),
        "PASS awl"
    );
    // Importing again is harmless.
    let j = expect(&s, &[&import[..], &["--json"]].concat(), 0).json();
    assert_eq!(j["complete"], true);
    assert_eq!(j["imported_triplets"], 1);
    assert_eq!(j["skipped"]["unparsable"]["count"], 1);
    assert_eq!(
        expect(&s, &["status", "--json"], 0).json()["body"]["status"]["awl_clients"],
        1
    );
    // The lookup explains the auto-whitelist.
    let l = expect(
        &s,
        &[
            "lookup",
            "203.0.113.20",
            "x@y.example",
            "z@rcpt.example",
            "--json",
        ],
        1,
    )
    .json();
    let l = &l["body"]["lookup"];
    assert_eq!(
        (l["awl_count"].as_u64(), l["awl_active"].as_bool()),
        (Some(9), Some(true))
    );
    assert_eq!(l["answer"], "PASS awl");
    assert_eq!(
        expect(&s, &["delete-client", "203.0.113.20"], 0).out.trim(),
        "deleted"
    );
    assert_eq!(
        peek(&s, "203.0.113.20 new@any.example frank@rcpt.example"),
        "DEFER 2"
    );

    // An importer not built yet, a file that does not exist: errors, exit 2.
    let r = expect(&s, &["import", "--from", "jsonl", "/nonexistent/x"], 2);
    assert!(r.err.contains("/nonexistent/x"), "{}", r.err);
    // The first attempt recorded above is still there: nothing here touched it.
    assert_eq!(expect(&s, &lookup, 0).code, 0);
    sleep_past(2);
    assert_eq!(ask(&s, &format!("CHECK {triplet}")), "PASS retried");
}

#[test]
fn lookup_explains_lists_identities_and_domain_policy() {
    let dir = TempDir::new("explain");
    std::fs::write(dir.join("senders"), "@lists.example\n").unwrap();
    std::fs::write(dir.join("domains"), "slow.example delay=60s\n").unwrap();
    let senders = dir.file("senders");
    let domains = dir.file("domains");
    let s = Server::start_in(
        dir,
        &["--whitelist-senders", &senders, "--domain-policy", &domains],
    );
    let l = expect(
        &s,
        &[
            "lookup",
            "192.0.2.1",
            "news@lists.example",
            "a@b.example",
            "--json",
        ],
        1,
    )
    .json();
    assert_eq!(l["body"]["lookup"]["exemption"], "sender");
    assert_eq!(l["body"]["lookup"]["answer"], "PASS exempt:sender");
    let r = expect(
        &s,
        &[
            "lookup",
            "192.0.2.1",
            "a@x.example",
            "b@slow.example",
            "--name",
            "mx1.x.example",
        ],
        1,
    );
    assert!(r.out.contains("domain policy   delay=1m"), "{}", r.out);
    assert!(r.out.contains("answer now      DEFER 60"), "{}", r.out);
    // A verified, non-generic name: the `name` identity first, then the prefix.
    assert!(
        r.out
            .contains("identity        name:x.example (name; new records go here)"),
        "{}",
        r.out
    );
    assert!(
        r.out
            .contains("identity        192.0.2.0/24 (prefix; also looked up)"),
        "{}",
        r.out
    );
    // A record made under the name identity is deleted only when the name is given.
    let line = "CHECK 192.0.2.1 a@x.example b@y.example name=mx1.x.example";
    assert!(ask(&s, line).starts_with("DEFER "));
    let by_name = [
        "192.0.2.1",
        "a@x.example",
        "b@y.example",
        "--name",
        "mx1.x.example",
    ];
    expect(&s, &[&["lookup"][..], &by_name].concat(), 0);
    expect(
        &s,
        &["delete", "192.0.2.1", "a@x.example", "b@y.example"],
        1,
    );
    expect(&s, &[&["delete"][..], &by_name].concat(), 0);
    expect(&s, &[&["lookup"][..], &by_name].concat(), 1);
}

#[test]
fn the_socket_is_private_configurable_and_removed_at_exit() {
    let mut s = Server::start(&[]);
    let sock = socket_of(&s);
    let meta = std::fs::symlink_metadata(&sock).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o600,
        "mode of {}",
        sock.display()
    );
    assert!(s.terminate().success());
    assert!(!sock.exists(), "the socket is left after exit");

    // `off`: no socket, and the client says it cannot connect (exit 2).
    let s = Server::start(&["--admin", "off"]);
    assert!(!socket_of(&s).exists());
    let r = admin(&s, &["status"]);
    assert_eq!(r.code, 2, "{}", r.err);
    assert!(
        r.err.contains("cannot connect to the admin socket"),
        "{}",
        r.err
    );
    let j = admin(&s, &["status", "--json"]).json();
    assert_eq!(j["outcome"], "error");

    // A path of one's own.
    let dir = TempDir::new("adm");
    let path = dir.file("ctl.sock");
    let s = Server::start(&["--admin", &path]);
    assert_eq!(admin_at(Path::new(&path), &["status"]).code, 0);
    drop(s);
    drop(dir);

    // A bad value fails at start with one line.
    let out = Command::new(BIN)
        .args(["serve", "--admin", "unix:", "--native", "127.0.0.1:0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--admin"), "{err}");
}

/// Sends raw bytes on a new connection and reads until the server closes it or answers
/// (one frame); returns the answer's body text, or "" when it closed without one.
fn raw(sock: &Path, bytes: &[u8]) -> String {
    let mut c = UnixStream::connect(sock).unwrap();
    c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let _ = c.write_all(bytes);
    let _ = c.shutdown(std::net::Shutdown::Write);
    let mut got = Vec::new();
    let _ = c.read_to_end(&mut got);
    if got.len() < 4 {
        return String::new();
    }
    String::from_utf8_lossy(&got[4..]).into_owned()
}

fn framed(body: &[u8]) -> Vec<u8> {
    let mut v = (body.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(body);
    v
}

#[test]
fn bad_requests_on_the_socket_never_crash_the_server() {
    let s = Server::start(&[]);
    let sock = socket_of(&s);
    let items: Vec<Value> = (0..1001)
        .map(|_| serde_json::json!({"kind": "client", "client": "192.0.2.1", "count": 1, "last_seen": 1}))
        .collect();
    let too_many =
        serde_json::to_vec(&serde_json::json!({"op": "import", "items": items})).unwrap();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"GET / HTTP/1.1\r\n\r\n".to_vec(), "more than the"),
        (vec![0, 0, 0, 0], "empty frame"),
        (vec![0xff; 4], "more than the"),
        (framed(b"not json"), "bad frame"),
        (framed(br#"{"op":"fly"}"#), "unknown variant"),
        (
            framed(br#"{"op":"lookup","client":"x","sender":"","recipient":""}"#),
            "bad frame",
        ),
        (framed(&too_many), "import batch of 1001 items"),
        (vec![0, 0, 0, 10, b'{'], ""), // truncated, then closed
        (Vec::new(), ""),
    ];
    for (bytes, want) in &cases {
        let answer = raw(&sock, bytes);
        assert!(answer.contains(want), "{bytes:?}: answered {answer:?}");
        if !want.is_empty() {
            let j: Value = serde_json::from_str(&answer).unwrap();
            assert_eq!(j["outcome"], "error", "{answer}");
        }
    }
    // A good request after a bad one on the same connection is never read: the connection
    // closes at the bad one. The server itself goes on.
    let mut two = framed(b"garbage");
    two.extend(framed(br#"{"op":"status"}"#));
    assert!(raw(&sock, &two).contains("bad frame"));
    assert_eq!(admin(&s, &["status"]).code, 0);
    assert!(
        ask(&s, "PING").starts_with("PONG"),
        "the server still answers"
    );
    // Several requests on one connection are answered in turn.
    let mut c = UnixStream::connect(&sock).unwrap();
    c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    for _ in 0..3 {
        c.write_all(&framed(br#"{"op":"status"}"#)).unwrap();
        let mut len = [0u8; 4];
        c.read_exact(&mut len).unwrap();
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        c.read_exact(&mut body).unwrap();
        let j: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(j["outcome"], "ok");
    }
}

#[test]
fn exit_codes_for_a_bad_command_line() {
    let nowhere = Path::new("/nonexistent/admin.sock");
    assert_eq!(
        admin_at(nowhere, &["lookup", "not-an-ip", "a@b", "c@d"]).code,
        2
    );
    assert_eq!(
        admin_at(nowhere, &["import", "--from", "exim", "f"]).code,
        2
    );
    let r = admin_at(nowhere, &["snapshot"]);
    assert_eq!(r.code, 2);
    assert!(r.err.contains("/nonexistent/admin.sock"), "{}", r.err);
    for from in ["postgrey", "sqlgrey", "greylistd", "postfix-log"] {
        let r = admin_at(nowhere, &["import", "--from", from, "/dev/null"]);
        assert_eq!(r.code, 2, "{from}: {}", r.err);
    }
}

/// A delete made on one node wins over the older record another node still holds: the other
/// node's copy (whitelisted, in its snapshot) does not come back, neither there nor here,
/// even after that node is killed and restarted from its snapshot.
#[test]
fn a_delete_wins_over_a_peers_older_record_across_a_cluster() {
    let redis = Redis::start();
    let cluster = Cluster::new(&redis, "delete", &["--delay", "2s"]);
    let a = cluster.node("a", &[]);
    let mut b = cluster.node("b", &[]);
    let nodes = [("a", &a), ("b", &b)];
    let line = T.join(" ");
    assert!(ask(&a, &format!("CHECK {line}")).starts_with("DEFER "));
    wait_converged(&nodes);
    sleep_past(2);
    assert_eq!(ask(&b, &format!("CHECK {line}")), "PASS retried");
    wait_converged(&nodes);
    assert_eq!(peek(&a, &line), "PASS known");
    // b's snapshot holds the whitelisted record.
    expect(&b, &["snapshot"], 0);

    // Deleted on a: gone on both.
    expect(&a, &[&["delete"][..], &t(&[])].concat(), 0);
    let gone = wait_converged(&nodes);
    assert_eq!(peek(&a, &line), "DEFER 2");
    assert_eq!(peek(&b, &line), "DEFER 2");
    for n in [&a, &b] {
        assert_eq!(status(n)["table"]["triplets"], 0);
        let st = expect(n, &["status", "--json"], 0).json();
        assert_eq!(st["body"]["status"]["tombstones"], 1, "{st}");
        assert_eq!(st["body"]["status"]["cluster"]["connected"], true, "{st}");
    }

    // b dies and comes back from its snapshot, which still holds the old record: the
    // tombstone in a's stream removes it again, and b's republished copy is refused by a.
    b.restart();
    let nodes = [("a", &a), ("b", &b)];
    let after = wait_converged(&nodes);
    assert_eq!(after, gone, "the tables differ from right after the delete");
    assert_eq!(peek(&a, &line), "DEFER 2");
    assert_eq!(peek(&b, &line), "DEFER 2");
    // A new first attempt after the delete is a new life, and replicates as usual.
    assert!(ask(&b, &format!("CHECK {line}")).starts_with("DEFER "));
    wait_converged(&nodes);
    let l = expect(&a, &[&["lookup"][..], &t(&["--json"])].concat(), 0).json();
    assert_eq!(l["body"]["lookup"]["identities"][0]["state"], "greylisted");
    // status shows the cluster: the peer and its lag.
    let r = expect(&a, &["status"], 0);
    assert!(r.out.contains("peer b"), "{}", r.out);
}

/// The importers end to end: a dump written by the real postgrey (tests/fixtures/import, see
/// its README) imported into a running server answers as postgrey would have; its `--privacy`
/// dump is reported as not importable; a truncated file is an error, not a silent success.
#[test]
fn admin_import_loads_a_real_postgrey_dump_into_the_running_server() {
    let s = Server::start(&["--delay", "2s"]);
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/import");
    let dump = fixtures.join("postgrey.dump");
    let triplet = "192.0.2.10 alice@example.org bob@example.net";
    assert_eq!(peek(&s, triplet), "DEFER 2");
    // postgrey let alice → bob through 2 s after its first attempt (it ran with --delay 1).
    let r = expect(
        &s,
        &[
            "import",
            "--from",
            "postgrey",
            "--peer-delay",
            "1s",
            dump.to_str().unwrap(),
        ],
        0,
    );
    assert!(r.out.contains("imported 4 triplets"), "{}", r.out);
    assert_eq!(peek(&s, triplet), "PASS known");
    // Running it again is harmless.
    expect(
        &s,
        &[
            "import",
            "--from",
            "postgrey",
            "--peer-delay",
            "1s",
            dump.to_str().unwrap(),
        ],
        0,
    );
    assert_eq!(peek(&s, triplet), "PASS known");

    let privacy = fixtures.join("postgrey-privacy.dump");
    let r = expect(
        &s,
        &["import", "--from", "postgrey", privacy.to_str().unwrap()],
        0,
    );
    assert!(r.out.contains("hashed"), "{}", r.out);
    assert!(r.out.contains("imported 0 triplets"), "{}", r.out);

    // A dump cut in the middle of a record: named error, exit 2.
    let dir = common::TempDir::new("import");
    let cut = dir.join("cut.dump");
    let text = std::fs::read_to_string(&dump).unwrap();
    std::fs::write(&cut, &text[..text.len() / 2]).unwrap();
    let r = expect(
        &s,
        &["import", "--from", "postgrey", cut.to_str().unwrap()],
        2,
    );
    assert!(r.err.contains("cut.dump"), "{}", r.err);
}
