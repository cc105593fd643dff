//! `greyhound admin`: the client side of the admin socket ([`crate::proto::admin`]).
//!
//! Human output by default, the server's answer as JSON with `--json`; exit code 0 done or
//! found, 1 not found, 2 error (DESIGN §13). A blocking Unix socket: one request at a time,
//! nothing here needs a runtime.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use super::{AdminArgs, AdminCommand, ImportSource};
use crate::import::{ImportReader, Item, Skip};
use crate::proto::admin::{
    self as proto, Body, ImportItem, ImportReport, LookupReport, Outcome, Request, Response,
    StatusReport,
};

/// Exit code: done or found.
pub const EXIT_OK: u8 = 0;
/// Exit code: not found.
pub const EXIT_NOT_FOUND: u8 = 1;
/// Exit code: error.
pub const EXIT_ERROR: u8 = 2;

/// How long an answer may take: a snapshot of tens of millions of records takes seconds.
const TIMEOUT: Duration = Duration::from_secs(300);

/// A connection to the admin socket.
struct Client {
    stream: UnixStream,
    buf: Vec<u8>,
}

impl Client {
    fn connect(path: &Path) -> Result<Self, String> {
        let stream = UnixStream::connect(path).map_err(|e| {
            format!(
                "cannot connect to the admin socket {}: {e} (is the server running with this --admin? give its path with --socket)",
                path.display()
            )
        })?;
        let _ = stream.set_read_timeout(Some(TIMEOUT));
        let _ = stream.set_write_timeout(Some(TIMEOUT));
        Ok(Self {
            stream,
            buf: Vec::new(),
        })
    }

    fn call(&mut self, req: &Request) -> Result<Response, String> {
        let mut out = Vec::new();
        proto::encode_request(req, &mut out).map_err(|e| e.to_string())?;
        self.stream
            .write_all(&out)
            .map_err(|e| format!("admin socket: {e}"))?;
        let mut chunk = [0u8; 16 << 10];
        loop {
            if let Some((r, used)) = proto::parse_response(&self.buf).map_err(|e| e.to_string())? {
                self.buf.drain(..used);
                return Ok(r);
            }
            let n = self
                .stream
                .read(&mut chunk)
                .map_err(|e| format!("admin socket: {e}"))?;
            if n == 0 {
                return Err("admin socket: the server closed the connection".into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

fn exit_of(o: Outcome) -> u8 {
    match o {
        Outcome::Ok => EXIT_OK,
        Outcome::NotFound => EXIT_NOT_FOUND,
        Outcome::Error => EXIT_ERROR,
    }
}

/// Runs `greyhound admin`; returns the exit code.
pub fn run(args: &AdminArgs) -> u8 {
    let req = match request_of(&args.command) {
        Ok(Some(r)) => r,
        Ok(None) => return import(args),
        Err(e) => return fail(args.json, &e),
    };
    let response = Client::connect(&args.socket).and_then(|mut c| c.call(&req));
    match response {
        Ok(r) => {
            if args.json {
                print_json(&r);
            } else {
                print_human(&r);
            }
            exit_of(r.outcome)
        }
        Err(e) => fail(args.json, &e),
    }
}

/// Reports an error the client met (not the server's), as the server would: one line, or the
/// same JSON shape as an answer.
fn fail(json: bool, message: &str) -> u8 {
    if json {
        print_json(&Response::error(message));
    } else {
        eprintln!("greyhound admin: {message}");
    }
    EXIT_ERROR
}

fn print_json<T: serde::Serialize>(v: &T) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("greyhound admin: {e}"),
    }
}

/// The request of a subcommand; `None` for `import`, which sends many.
fn request_of(c: &AdminCommand) -> Result<Option<Request>, String> {
    Ok(Some(match c.clone() {
        AdminCommand::Status => Request::Status,
        AdminCommand::Lookup {
            client,
            sender,
            recipient,
            name,
        } => Request::Lookup {
            client,
            sender,
            recipient,
            name,
        },
        AdminCommand::Whitelist {
            client,
            sender,
            recipient,
            ttl,
        } => Request::Whitelist {
            client,
            sender,
            recipient,
            ttl: ttl
                .map(|t| crate::config::parse_duration(&t).map_err(|e| format!("--ttl: {e}")))
                .transpose()?,
        },
        AdminCommand::Delete {
            client,
            sender,
            recipient,
            name,
        } => Request::Delete {
            client,
            sender,
            recipient,
            name,
        },
        AdminCommand::DeleteClient { client } => Request::DeleteClient { client },
        AdminCommand::Snapshot => Request::Snapshot,
        AdminCommand::Import { .. } => return Ok(None),
    }))
}

/// `2026-12-02T04:05:06Z` of a Unix time.
pub fn utc(unix: u64) -> String {
    let (y, m, d) = crate::proto::policy::civil_from_days(unix / 86_400);
    let s = unix % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// `3d 4h`, `5m 2s`: a span for a person.
pub fn span(secs: u64) -> String {
    let units = [(86_400, "d"), (3600, "h"), (60, "m"), (1, "s")];
    let parts: Vec<String> = units
        .iter()
        .scan(secs, |left, &(n, u)| {
            let v = *left / n;
            *left %= n;
            Some((v, u))
        })
        .filter(|(v, _)| *v > 0)
        .take(2)
        .map(|(v, u)| format!("{v}{u}"))
        .collect();
    if parts.is_empty() {
        "0s".into()
    } else {
        parts.join(" ")
    }
}

/// A Unix time and how far it is from `now`.
fn when(t: u64, now: u64) -> String {
    if t == now {
        format!("{} (now)", utc(t))
    } else if t > now {
        format!("{} (in {})", utc(t), span(t - now))
    } else {
        format!("{} ({} ago)", utc(t), span(now - t))
    }
}

fn print_human(r: &Response) {
    match &r.body {
        Some(Body::Status(s)) => print_status(s),
        Some(Body::Lookup(l)) => print_lookup(l),
        Some(Body::Whitelist(w)) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            println!(
                "whitelisted under {} until {}",
                w.identity,
                when(w.whitelisted_until, now)
            );
        }
        Some(Body::Snapshot(s)) => println!(
            "snapshot {} written: {} triplets, {} clients, {} bytes, {} ms",
            s.file, s.triplets, s.clients, s.bytes, s.ms
        ),
        Some(Body::Import(i)) => println!("{i:?}"),
        None if r.outcome == Outcome::Error => eprintln!("greyhound admin: {}", r.message),
        None => println!("{}", r.message),
    }
}

fn print_status(s: &StatusReport) {
    println!("version         {}", s.version);
    println!("uptime          {}", span(s.uptime_seconds));
    println!(
        "triplets        {} ({} greylisted, {} whitelisted)",
        s.triplets, s.greylisted, s.whitelisted
    );
    println!(
        "auto-whitelist  {} clients ({} whitelisted)",
        s.awl_clients, s.awl_active
    );
    println!("trapped         {} client networks", s.trapped_clients);
    println!("tombstones      {}", s.tombstones);
    println!(
        "memory          {:.1} MiB in tables",
        s.table_bytes as f64 / (1 << 20) as f64
    );
    match (s.snapshot_unix, s.snapshot_age_seconds) {
        (Some(t), Some(age)) => println!("last snapshot   {} ({} ago)", utc(t), span(age)),
        _ => println!("last snapshot   none since start"),
    }
    let Some(c) = &s.cluster else {
        println!("cluster         off (single node)");
        return;
    };
    let str_of = |v: &serde_json::Value, k: &str| v[k].as_str().unwrap_or("").to_string();
    println!(
        "cluster         {} as node {}, {}; {} records published, {} waiting",
        str_of(c, "cluster_name"),
        str_of(c, "node_id"),
        if c["connected"].as_bool() == Some(true) {
            "connected"
        } else {
            "NOT connected to Redis"
        },
        c["published_records"],
        c["pending_records"],
    );
    let lag = &c["lag"];
    println!(
        "lag             p50 {:.3} s, p99 {:.3} s, max {:.3} s over {} batches",
        lag["p50_seconds"].as_f64().unwrap_or(0.0),
        lag["p99_seconds"].as_f64().unwrap_or(0.0),
        lag["max_seconds"].as_f64().unwrap_or(0.0),
        lag["batches"],
    );
    for p in c["peers"].as_array().into_iter().flatten() {
        println!(
            "peer {:<10} {} records applied, lag {:.3} s, {} gaps, {}",
            str_of(p, "node"),
            p["applied_records"],
            p["lag_seconds"].as_f64().unwrap_or(0.0),
            p["gaps"],
            if p["caught_up"].as_bool() == Some(true) {
                "caught up"
            } else {
                "catching up"
            }
        );
    }
}

fn print_lookup(l: &LookupReport) {
    let now = l.now;
    println!("answer now      {}", l.answer);
    println!(
        "triplet         {} {} {}",
        l.client_net,
        if l.sender.is_empty() { "<>" } else { &l.sender },
        l.recipient
    );
    for (n, i) in l.identities.iter().enumerate() {
        let role = if n == 0 {
            "new records go here"
        } else {
            "also looked up"
        };
        println!("identity        {} ({}; {role})", i.identity, i.kind);
        let detail = match i.state.as_str() {
            "none" => "no record".to_string(),
            "greylisted" => format!(
                "greylisted: first seen {}, last seen {}, a retry passes from {}",
                when(i.first_seen.unwrap_or(0), now),
                when(i.last_seen.unwrap_or(0), now),
                when(i.passes_from.unwrap_or(0), now)
            ),
            "whitelisted" => format!(
                "whitelisted: first seen {}, last seen {}, whitelisted until {}",
                when(i.first_seen.unwrap_or(0), now),
                when(i.last_seen.unwrap_or(0), now),
                when(i.whitelisted_until.unwrap_or(0), now)
            ),
            other => format!(
                "{other}: first seen {}, forgotten at {} (the next attempt starts over)",
                when(i.first_seen.unwrap_or(0), now),
                when(i.expires.unwrap_or(0), now)
            ),
        };
        println!("  record        {detail}");
        println!("  key           {}", i.key);
    }
    println!(
        "exemption       {}",
        l.exemption.as_deref().unwrap_or("none")
    );
    println!(
        "domain policy   {}",
        l.domain_rule.as_deref().unwrap_or("none")
    );
    if l.greytrap {
        println!("greytrap        the recipient is a greytrap");
    }
    if l.trapped {
        println!("trapped         the client wrote to a greytrap: every request is deferred");
    }
    println!(
        "auto-whitelist  {}: {} passes counted (whitelisted from {}{}){}",
        l.awl_identity,
        l.awl_count,
        l.awl_threshold,
        if l.awl_threshold == 0 { ", off" } else { "" },
        if l.awl_active { ": whitelisted" } else { "" }
    );
}

/// What one run of an import read and what the server did with it.
#[derive(Debug, Default, serde::Serialize)]
struct ImportSummary {
    file: String,
    source: String,
    read: u64,
    imported_triplets: u64,
    imported_clients: u64,
    expired: u64,
    older_than_a_delete: u64,
    /// Skipped records by reason, with the first one's message.
    skipped: BTreeMap<String, Skipped>,
    complete: bool,
    error: Option<String>,
}

#[derive(Debug, Default, serde::Serialize)]
struct Skipped {
    count: u64,
    first: String,
}

fn skip_name(s: Skip) -> &'static str {
    match s {
        Skip::Unparsable => "unparsable",
        Skip::Hashed => "hashed (postgrey --privacy: cannot be imported)",
        Skip::BadClient => "client is not an address",
        Skip::NoEquivalent => "no greyhound equivalent",
        Skip::Expired => "expired",
        Skip::NotDelivered => "not a delivered message",
    }
}

/// The items of a file, as a reader yields them.
type Items = Box<dyn Iterator<Item = Result<Item, (Skip, String)>> + Send>;

/// `--from jsonl` as an [`ImportReader`]: no progress figures, and a line that does not parse
/// is a counted skip, never a failure.
struct JsonlReader(Items);

impl Iterator for JsonlReader {
    type Item = Result<Item, (Skip, String)>;
    fn next(&mut self) -> Option<Self::Item> {
        self.0.next()
    }
}

impl ImportReader for JsonlReader {
    fn bytes_read(&self) -> u64 {
        0
    }
    fn total_bytes(&self) -> u64 {
        0
    }
    fn failure(&self) -> Option<&crate::import::ImportError> {
        None
    }
}

/// Opens the reader of `source` (src/import/), or of `--from jsonl`.
fn open_reader(
    source: ImportSource,
    file: &Path,
    peer_delay: u32,
) -> Result<Box<dyn ImportReader>, String> {
    let opts = crate::import::ReadOptions {
        peer_delay: u64::from(peer_delay),
        ..Default::default()
    };
    let source = match source {
        ImportSource::Jsonl => return Ok(Box::new(JsonlReader(jsonl(file)?))),
        ImportSource::Postgrey => crate::import::Source::Postgrey,
        ImportSource::Sqlgrey => crate::import::Source::Sqlgrey,
        ImportSource::Greylistd => crate::import::Source::Greylistd,
        ImportSource::PostfixLog => crate::import::Source::PostfixLog,
    };
    crate::import::open(source, file, &opts).map_err(|e| e.to_string())
}

/// `--from jsonl`: one import item per line, as the admin protocol writes them
/// (docs/PROTOCOL.md, section 4); blank lines and `#` comments are passed over. For data from
/// any other system, converted by a script.
fn jsonl(file: &Path) -> Result<Items, String> {
    use std::io::BufRead;
    let f = std::fs::File::open(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let lines = std::io::BufReader::new(f).lines().enumerate();
    Ok(Box::new(lines.filter_map(|(n, line)| {
        let line = match line {
            Ok(l) => l,
            Err(e) => return Some(Err((Skip::Unparsable, format!("line {}: {e}", n + 1)))),
        };
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            return None;
        }
        Some(
            serde_json::from_str::<ImportItem>(t)
                .map(|i| match i {
                    ImportItem::Triplet {
                        client,
                        sender,
                        recipient,
                        first_seen,
                        last_seen,
                        passed,
                    } => Item::Triplet(crate::import::TripletItem {
                        client,
                        sender,
                        recipient,
                        first_seen,
                        last_seen,
                        passed,
                    }),
                    ImportItem::Client {
                        client,
                        count,
                        last_seen,
                    } => Item::Client(crate::import::ClientItem {
                        client,
                        count,
                        last_seen,
                    }),
                })
                .map_err(|e| (Skip::Unparsable, format!("line {}: {e}", n + 1))),
        )
    })))
}

/// Sends `batch` (split in halves if a frame would be too large); adds what the server did.
fn send_batch(
    c: &mut Client,
    batch: Vec<ImportItem>,
    into: &mut ImportReport,
) -> Result<(), String> {
    let req = Request::Import { items: batch };
    let r = match c.call(&req) {
        Err(e) if e.contains("more than the") => {
            let Request::Import { mut items } = req else {
                unreachable!()
            };
            if items.len() < 2 {
                return Err(e);
            }
            let rest = items.split_off(items.len() / 2);
            send_batch(c, items, into)?;
            return send_batch(c, rest, into);
        }
        r => r?,
    };
    match (r.outcome, r.body) {
        (Outcome::Ok, Some(Body::Import(i))) => {
            into.triplets += i.triplets;
            into.clients += i.clients;
            into.expired += i.expired;
            into.deleted += i.deleted;
            Ok(())
        }
        (_, _) => Err(format!("the server refused a batch: {}", r.message)),
    }
}

fn import(args: &AdminArgs) -> u8 {
    let AdminCommand::Import {
        from,
        file,
        peer_delay,
    } = &args.command
    else {
        unreachable!("called for import only")
    };
    let peer_delay = match crate::config::parse_duration(peer_delay) {
        Ok(d) => d,
        Err(e) => return fail(args.json, &format!("--peer-delay: {e}")),
    };
    let mut summary = ImportSummary {
        file: file.display().to_string(),
        source: format!("{from:?}"),
        ..Default::default()
    };
    let result = (|| {
        let mut items = open_reader(*from, file, peer_delay)?;
        let mut c = Client::connect(&args.socket)?;
        let progress = std::io::stderr().is_terminal() && !args.json;
        let mut shown = Instant::now();
        let mut report = ImportReport::default();
        let mut batch = Vec::with_capacity(proto::MAX_IMPORT_ITEMS);
        while let Some(item) = items.next() {
            match item {
                Ok(i) => {
                    summary.read += 1;
                    batch.push(ImportItem::from(&i));
                }
                Err((why, message)) => {
                    let s = summary
                        .skipped
                        .entry(skip_name(why).to_string())
                        .or_default();
                    if s.count == 0 {
                        s.first = message;
                    }
                    s.count += 1;
                }
            }
            if batch.len() == proto::MAX_IMPORT_ITEMS {
                send_batch(&mut c, std::mem::take(&mut batch), &mut report)?;
                if progress && shown.elapsed() >= Duration::from_secs(1) {
                    shown = Instant::now();
                    let total = items.total_bytes();
                    let done = if total > 0 {
                        format!(
                            "{:.0} % of the input, ",
                            items.bytes_read() as f64 * 100.0 / total as f64
                        )
                    } else {
                        String::new()
                    };
                    eprint!(
                        "\r{done}read {}, imported {}, skipped {} ",
                        summary.read,
                        report.triplets + report.clients,
                        summary.skipped.values().map(|s| s.count).sum::<u64>()
                    );
                }
            }
        }
        if !batch.is_empty() {
            send_batch(&mut c, batch, &mut report)?;
        }
        if progress {
            eprintln!();
        }
        // A reader that broke off (read error, truncated file) yielded a partial import: it is
        // an error, never a silent success.
        if let Some(e) = items.failure() {
            return Err(format!(
                "{e} (imported so far: {} triplets, {} client counts)",
                report.triplets, report.clients
            ));
        }
        Ok::<_, String>(report)
    })();
    let code = match result {
        Ok(r) => {
            summary.imported_triplets = r.triplets;
            summary.imported_clients = r.clients;
            summary.expired = r.expired;
            summary.older_than_a_delete = r.deleted;
            summary.complete = true;
            EXIT_OK
        }
        Err(e) => {
            summary.error = Some(e);
            EXIT_ERROR
        }
    };
    if args.json {
        print_json(&summary);
        return code;
    }
    if let Some(e) = &summary.error {
        eprintln!(
            "greyhound admin: import stopped: {e} (records sent before this stay imported; running the import again is harmless)"
        );
    }
    println!(
        "{}: read {} records; imported {} triplets and {} client counts; {} already expired here; {} older than a delete",
        summary.file,
        summary.read,
        summary.imported_triplets,
        summary.imported_clients,
        summary.expired,
        summary.older_than_a_delete
    );
    for (why, s) in &summary.skipped {
        println!("skipped {} ({why}), first: {}", s.count, s.first);
    }
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_for_people() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(1_795_424_602), "2026-11-23T09:03:22Z");
        assert_eq!(span(0), "0s");
        assert_eq!(span(59), "59s");
        assert_eq!(span(3600 + 61), "1h 1m");
        assert_eq!(span(3 * 86_400 + 5), "3d 5s");
        assert_eq!(when(100, 40), format!("{} (in 1m)", utc(100)));
        assert_eq!(when(40, 100), format!("{} (1m ago)", utc(40)));
        assert_eq!(when(40, 40), format!("{} (now)", utc(40)));
    }

    #[test]
    fn jsonl_counts_what_it_cannot_read() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("items.jsonl");
        std::fs::write(
            &f,
            concat!(
                "# exported\n",
                r#"{"kind":"triplet","client":"192.0.2.1","sender":"a@b","recipient":"c@d","first_seen":1,"last_seen":2,"passed":false}"#,
                "\n\nnot json\n",
                r#"{"kind":"client","client":"192.0.2.0","count":5,"last_seen":9}"#,
                "\n"
            ),
        )
        .unwrap();
        let got: Vec<_> = jsonl(&f).unwrap().collect();
        assert_eq!(got.len(), 3);
        assert!(matches!(&got[0], Ok(Item::Triplet(t)) if t.recipient == "c@d"));
        assert!(matches!(&got[1], Err((Skip::Unparsable, m)) if m.starts_with("line 4:")));
        assert!(matches!(&got[2], Ok(Item::Client(c)) if c.count == 5));
    }
}
