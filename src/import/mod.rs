//! Importers (`greyhound admin import --from postgrey|sqlgrey|greylistd|postfix-log FILE`,
//! DESIGN §13): each reads a peer program's data, streaming with bounded memory, and yields
//! [`Item`]s that the admin client sends to the running server in batches, where they are
//! normalised, keyed and merged like any record (and so replicated to a cluster).
//!
//! The types here are the contract between the readers (one module per source) and the admin
//! protocol.
//!
//! How the admin client drives a reader:
//! ```no_run
//! use greyhound::import::{open, ImportReader, ReadOptions, Source, Summary};
//! # fn send(_batch: &[greyhound::import::Item]) {}
//! let mut reader = open(Source::Postgrey, "postgrey.dump".as_ref(), &ReadOptions::default())?;
//! let (mut summary, mut batch) = (Summary::default(), Vec::new());
//! for result in reader.by_ref() {
//!     summary.record(&result);
//!     if let Ok(item) = result {
//!         batch.push(item);
//!     }
//!     if batch.len() == 1000 {
//!         send(&batch); // progress: reader.bytes_read() of reader.total_bytes()
//!         batch.clear();
//!     }
//! }
//! send(&batch);
//! println!("{summary}");
//! if let Some(err) = reader.failure() {
//!     eprintln!("greyhound: import stopped: {err}"); // a partial import: exit 2
//! }
//! # Ok::<(), greyhound::import::ImportError>(())
//! ```

use std::net::IpAddr;

/// One thing to import.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// A triplet and its times.
    Triplet(TripletItem),
    /// A client's auto-whitelist count.
    Client(ClientItem),
}

/// A triplet as the peer stored it, before Greyhound's normalisation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TripletItem {
    /// The client: an address, or the network address a peer stored (postgrey's
    /// `192.0.2.0`, and old versions' three octets `192.0.2` read as `192.0.2.0`); Greyhound
    /// masks it to its own prefix.
    pub client: IpAddr,
    /// Envelope sender, bare (`""` for the null sender).
    pub sender: String,
    /// Envelope recipient, bare.
    pub recipient: String,
    /// Unix seconds of the first attempt the peer saw.
    pub first_seen: u64,
    /// Unix seconds of the last attempt the peer saw.
    pub last_seen: u64,
    /// Whether the peer had let it pass (whitelisted from `last_seen`, keeping its age).
    pub passed: bool,
}

/// A client's auto-whitelist standing as the peer stored it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientItem {
    /// The client address or network.
    pub client: IpAddr,
    /// Counted passes.
    pub count: u32,
    /// Unix seconds of the last counted pass.
    pub last_seen: u64,
}

/// Why an input record was not imported, for the summary ("skipped by reason").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Skip {
    /// A line or record the reader does not understand.
    Unparsable,
    /// postgrey `--privacy`: the key is a hash, the triplet cannot be recovered.
    Hashed,
    /// The client is not an address or network (e.g. a host name).
    BadClient,
    /// A record with no Greyhound equivalent (e.g. sqlgrey's any-recipient `from_awl`
    /// entries, `domain_awl`).
    NoEquivalent,
    /// Older than any record Greyhound would keep.
    Expired,
    /// A mail log line that is not part of a delivered message.
    NotDelivered,
}

pub mod greylistd;
pub mod postfix_log;
pub mod postgrey;
pub mod sqlgrey;

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

/// What a reader yields for each input record: an item, or why the record was skipped, with
/// the line or key it came from.
pub type ReadResult = Result<Item, (Skip, String)>;

/// Settings shared by the readers.
#[derive(Debug, Clone)]
pub struct ReadOptions {
    /// The peer's greylisting delay in seconds: a postgrey or greylistd triplet whose
    /// `last - first` reached it had been let through (default 300, postgrey's own).
    pub peer_delay: u64,
    /// "Now" in Unix seconds: the year of a classic syslog time stamp (which has none) is the
    /// one that puts it at or before now (plus a day of clock skew).
    pub now: u64,
    /// Postfix log: the most queue ids waiting for their delivery at once; beyond it the
    /// oldest is dropped and counted, so the join state stays bounded on any log.
    pub max_pending: usize,
    /// Postfix log: a queue id not delivered within this many lines after its `client=`
    /// line is dropped and counted (a message deferred for days is not a fresh delivery).
    pub pending_lines: u64,
}

impl Default for ReadOptions {
    fn default() -> Self {
        Self {
            peer_delay: 300,
            now: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            max_pending: 100_000,
            pending_lines: 1_000_000,
        }
    }
}

/// A file that cannot be imported at all, or that broke off in the middle: one line naming
/// the file and the line or record.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The file could not be opened or read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Reading stopped at a line or record (a read error in the middle, a truncated file).
    #[error("{}:{line}: {source}", path.display())]
    IoAt {
        /// The file.
        path: PathBuf,
        /// The line (or record) where reading stopped, counted from 1.
        line: u64,
        /// Why.
        source: io::Error,
    },
    /// The file is not what the source reads (e.g. not a `db_dump -p` dump).
    #[error("{}:{line}: {message}", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// The line (or record) that gave it away, counted from 1.
        line: u64,
        /// What was expected.
        message: String,
    },
    /// An SQLite database that cannot be opened or queried.
    #[error("{}: {message}", path.display())]
    Sqlite {
        /// The file.
        path: PathBuf,
        /// SQLite's message, with the table.
        message: String,
    },
}

/// Which peer program's data to read (`--from`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `db_dump -p` of `postgrey.db` or `postgrey_clients.db`.
    Postgrey,
    /// sqlgrey's SQLite database file.
    Sqlgrey,
    /// greylistd's `states` file (with `triplets` beside it).
    Greylistd,
    /// A Postfix mail log (`maillog`, `maillog.1`, `maillog.2.gz`, …).
    PostfixLog,
}

impl Source {
    /// The name `--from` takes.
    pub fn name(self) -> &'static str {
        match self {
            Source::Postgrey => "postgrey",
            Source::Sqlgrey => "sqlgrey",
            Source::Greylistd => "greylistd",
            Source::PostfixLog => "postfix-log",
        }
    }
}

impl FromStr for Source {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "postgrey" => Ok(Source::Postgrey),
            "sqlgrey" => Ok(Source::Sqlgrey),
            "greylistd" => Ok(Source::Greylistd),
            "postfix-log" => Ok(Source::PostfixLog),
            _ => Err(format!(
                "unknown import source {s:?} (postgrey, sqlgrey, greylistd, postfix-log)"
            )),
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the admin client needs from any reader besides its items: progress, and whether it
/// stopped early.
///
/// Readers are `Send`, so the client may read on a blocking thread while it sends batches.
pub trait ImportReader: Iterator<Item = ReadResult> + Send {
    /// Bytes of input consumed so far (for a progress bar).
    fn bytes_read(&self) -> u64;
    /// Bytes the input holds in all (its files' sizes; compressed sizes for `.gz`).
    fn total_bytes(&self) -> u64;
    /// Set when reading broke off (read error, truncated file): the items yielded so far
    /// are a partial import, and the client must say so and exit with an error.
    fn failure(&self) -> Option<&ImportError>;
}

/// Opens `path` as `source`'s data: the one entry point the admin client needs.
pub fn open(
    source: Source,
    path: &Path,
    opts: &ReadOptions,
) -> Result<Box<dyn ImportReader>, ImportError> {
    Ok(match source {
        Source::Postgrey => Box::new(postgrey::read(path, opts)?),
        Source::Sqlgrey => Box::new(sqlgrey::read(path, opts)?),
        Source::Greylistd => Box::new(greylistd::read(path, opts)?),
        Source::PostfixLog => Box::new(postfix_log::read(path, opts)?),
    })
}

impl Skip {
    /// The reason's name in the summary and in `--json`.
    pub fn name(self) -> &'static str {
        match self {
            Skip::Unparsable => "unparsable",
            Skip::Hashed => "hashed",
            Skip::BadClient => "bad-client",
            Skip::NoEquivalent => "no-equivalent",
            Skip::Expired => "expired",
            Skip::NotDelivered => "not-delivered",
        }
    }

    /// What an operator can do about records skipped for this reason.
    pub fn suggestion(self) -> &'static str {
        match self {
            Skip::Unparsable => "check that the file is the source's own format, unedited",
            Skip::Hashed => {
                "postgrey --privacy stores one-way hashes: the triplets cannot be recovered; \
                 import a Postfix log instead to whitelist your regular correspondents"
            }
            Skip::BadClient => "records keyed by host name cannot be matched to an address",
            Skip::NoEquivalent => {
                "Greyhound keeps triplets and per-client counts only: list such senders or \
                 domains in the exemption lists (OPERATIONS.md section 6) if they must pass at once"
            }
            Skip::Expired => "nothing to do: Greyhound would have expired these already",
            Skip::NotDelivered => "nothing to do: only delivered messages are whitelisted",
        }
    }
}

/// The tally of one import: what was imported and what was skipped, by reason, with the
/// first example of each reason. Fed every result by [`Summary::record`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Triplets imported (greylisted and passed).
    pub triplets: u64,
    /// Of those, the ones the peer had let pass (imported as whitelisted).
    pub passed: u64,
    /// Client auto-whitelist counts imported.
    pub clients: u64,
    /// Records skipped, by reason.
    pub skipped: BTreeMap<Skip, u64>,
    /// The first skipped record's message for each reason, so the summary shows an example.
    pub first_skip: BTreeMap<Skip, String>,
}

impl Summary {
    /// Counts one reader result.
    pub fn record(&mut self, result: &ReadResult) {
        match result {
            Ok(Item::Triplet(t)) => {
                self.triplets += 1;
                self.passed += u64::from(t.passed);
            }
            Ok(Item::Client(_)) => self.clients += 1,
            Err((skip, why)) => {
                *self.skipped.entry(*skip).or_insert(0) += 1;
                self.first_skip.entry(*skip).or_insert_with(|| why.clone());
            }
        }
    }

    /// Items imported (triplets and clients).
    pub fn imported(&self) -> u64 {
        self.triplets + self.clients
    }

    /// Records skipped, all reasons together.
    pub fn skipped_total(&self) -> u64 {
        self.skipped.values().sum()
    }

    /// The summary for `--json`: totals, and per skip reason (by [`Skip::name`]) its count,
    /// first example and suggestion.
    pub fn to_json(&self) -> serde_json::Value {
        let skipped = self
            .skipped
            .iter()
            .map(|(skip, n)| {
                let example = self.first_skip.get(skip).cloned().unwrap_or_default();
                let value = serde_json::json!({
                    "count": n,
                    "example": example,
                    "suggestion": skip.suggestion(),
                });
                (skip.name().to_owned(), value)
            })
            .collect::<serde_json::Map<_, _>>();
        serde_json::json!({
            "imported": self.imported(),
            "triplets": self.triplets,
            "passed": self.passed,
            "clients": self.clients,
            "skipped_total": self.skipped_total(),
            "skipped": skipped,
        })
    }
}

impl fmt::Display for Summary {
    /// The human summary: one line of totals, then one line per skip reason with an example
    /// and a suggestion.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "imported {} triplets ({} passed, {} greylisted) and {} client counts; skipped {}",
            self.triplets,
            self.passed,
            self.triplets - self.passed,
            self.clients,
            self.skipped_total()
        )?;
        for (skip, n) in &self.skipped {
            write!(
                f,
                "\n  skipped {n} {}: e.g. {}",
                skip.name(),
                self.first_skip[skip]
            )?;
            write!(f, "\n    ({})", skip.suggestion())?;
        }
        Ok(())
    }
}

/// A reader that counts the bytes passing through it, for [`ImportReader::bytes_read`].
#[derive(Debug)]
struct Counting<R> {
    inner: R,
    count: u64,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        Ok(n)
    }
}

/// Longest line a reader accepts; a longer one is skipped as unparsable without being held
/// in memory whole (a corrupt file with no newline must not take the heap).
const MAX_LINE: usize = 64 * 1024;

/// One line from `input` into `buf` (without its end of line), at most [`MAX_LINE`] bytes
/// kept: `Ok(None)` at the end, `Ok(Some(false))` for a line that was too long (its rest is
/// consumed and dropped).
fn read_line_bounded<R: io::BufRead>(input: &mut R, buf: &mut Vec<u8>) -> io::Result<Option<bool>> {
    buf.clear();
    let mut whole = true;
    let mut any = false;
    loop {
        let chunk = input.fill_buf()?;
        if chunk.is_empty() {
            return Ok(any.then_some(whole));
        }
        any = true;
        let (take, done) = match memchr::memchr(b'\n', chunk) {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        let room = MAX_LINE.saturating_sub(buf.len());
        let body = if done { take - 1 } else { take };
        if body > room {
            whole = false;
        }
        buf.extend_from_slice(&chunk[..body.min(room)]);
        input.consume(take);
        if done {
            if buf.last() == Some(&b'\r') {
                buf.pop();
            }
            return Ok(Some(whole));
        }
    }
}

/// A client as a peer stored it: an address, or an old postgrey's three-octet network
/// (`192.0.2` → `192.0.2.0`).
fn parse_client(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    let octets = s.split('.').collect::<Vec<_>>();
    if (1..4).contains(&octets.len()) && octets.iter().all(|o| o.parse::<u8>().is_ok()) {
        let mut full = octets.join(".");
        for _ in octets.len()..4 {
            full.push_str(".0");
        }
        return full.parse().ok();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_as_peers_store_them() {
        assert_eq!(
            parse_client("192.0.2.7"),
            Some("192.0.2.7".parse().unwrap())
        );
        assert_eq!(parse_client("192.0.2"), Some("192.0.2.0".parse().unwrap()));
        assert_eq!(
            parse_client("2001:db8::"),
            Some("2001:db8::".parse().unwrap())
        );
        assert_eq!(parse_client("192.0.256"), None);
        assert_eq!(parse_client("mail.example.com"), None);
        assert_eq!(parse_client(""), None);
    }

    #[test]
    fn lines_are_bounded() {
        let long = vec![b'x'; MAX_LINE + 10];
        let mut input = Vec::new();
        input.extend_from_slice(b"a\r\n");
        input.extend_from_slice(&long);
        input.extend_from_slice(b"\nb");
        let mut r = io::BufReader::with_capacity(16, &input[..]);
        let mut buf = Vec::new();
        assert_eq!(read_line_bounded(&mut r, &mut buf).unwrap(), Some(true));
        assert_eq!(buf, b"a");
        assert_eq!(read_line_bounded(&mut r, &mut buf).unwrap(), Some(false));
        assert_eq!(buf.len(), MAX_LINE);
        assert_eq!(read_line_bounded(&mut r, &mut buf).unwrap(), Some(true));
        assert_eq!(buf, b"b");
        assert_eq!(read_line_bounded(&mut r, &mut buf).unwrap(), None);
    }

    #[test]
    fn summary_counts_by_reason() {
        let mut s = Summary::default();
        let t = TripletItem {
            client: "192.0.2.0".parse().unwrap(),
            sender: String::new(),
            recipient: "a@b".into(),
            first_seen: 1,
            last_seen: 400,
            passed: true,
        };
        s.record(&Ok(Item::Triplet(t)));
        s.record(&Err((Skip::Hashed, "first".into())));
        s.record(&Err((Skip::Hashed, "second".into())));
        assert_eq!(
            (s.triplets, s.passed, s.imported(), s.skipped_total()),
            (1, 1, 1, 2)
        );
        assert_eq!(s.first_skip[&Skip::Hashed], "first");
        assert!(s.to_string().contains("skipped 2 hashed: e.g. first"));
        let j = s.to_json();
        assert_eq!(j["imported"], 1);
        assert_eq!(j["skipped"]["hashed"]["count"], 2);
        assert_eq!(j["skipped"]["hashed"]["example"], "first");
    }
}
