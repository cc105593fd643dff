//! sqlgrey's SQLite database file (DESIGN §13).
//!
//! sqlgrey (1.8, `db_type = SQLite`) keeps, with Unix seconds as time stamps:
//! - `connect (sender_name, sender_domain, src, rcpt, first_seen)`: attempts it greylisted
//!   and has not yet seen retried: each becomes a greylisted triplet (first = last seen).
//!   The null sender is stored as `-undef-@-undef-`.
//! - `from_awl (sender_name, sender_domain, src, first_seen, last_seen)`: a sender that
//!   passed from `src`, whitelisted for ANY recipient (sqlgrey deletes the `connect` row that
//!   passed, so the recipient is gone).
//! - `domain_awl (sender_domain, src, first_seen, last_seen)`: a whole sender domain from
//!   `src`, promoted once `group_domain_level` senders of it had passed.
//!
//! Greyhound keys triplets, so an any-recipient pass has no equivalent: each `from_awl` and
//! `domain_awl` row is reported as [`Skip::NoEquivalent`]. What those rows do prove is that
//! `src` retries like a real MTA, which is what Greyhound's client auto-whitelist counts: so
//! each `src` of either table is also imported as a [`ClientItem`] whose count is its number
//! of rows there (last seen: the latest), and the server's `awl-clients` threshold decides
//! whether that is enough. `src` is an address or sqlgrey's class-C network (`192.0.2`).
//!
//! Rows are read in pages of [`PAGE`] by rowid, so
//! memory stays bounded on any table; the order is the database's, so a re-run yields the
//! same items.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use rusqlite::types::Value;
use rusqlite::{Connection, OpenFlags};

use super::{
    parse_client, ClientItem, ImportError, ImportReader, Item, ReadOptions, ReadResult, Skip,
    TripletItem,
};

/// Rows fetched per query: small enough to bound memory, large enough that the queries'
/// overhead does not matter.
const PAGE: i64 = 1000;

/// sqlgrey's stand-in for each half of the null sender.
const UNDEF: &str = "-undef-";

/// The tables read, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Connect,
    FromAwl,
    DomainAwl,
    Clients,
    Done,
}

/// Streams a sqlgrey database's rows as items and skips.
#[derive(Debug)]
pub struct Reader {
    path: PathBuf,
    db: Connection,
    phase: Phase,
    /// The last rowid read in this phase.
    after_rowid: i64,
    /// Whether the client counts' temporary table exists.
    clients_made: bool,
    page: VecDeque<ReadResult>,
    /// Rows in all tables read (counted up front) and rows read so far, for progress.
    rows_total: u64,
    rows_done: u64,
    size: u64,
    failure: Option<ImportError>,
}

/// Opens sqlgrey's database read-only; fails unless it has sqlgrey's three tables.
pub fn read(path: &Path, _opts: &ReadOptions) -> Result<Reader, ImportError> {
    let err = |e: rusqlite::Error| ImportError::Sqlite {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let size = std::fs::metadata(path)
        .map_err(|source| ImportError::Io {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    let db = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(err)?;
    let mut rows_total = 0u64;
    for table in ["connect", "from_awl", "domain_awl"] {
        let n: i64 = db
            .query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
            .map_err(|e| ImportError::Sqlite {
                path: path.to_path_buf(),
                message: format!("table {table}: {e} (is this sqlgrey's database?)"),
            })?;
        rows_total += n.max(0) as u64;
    }
    Ok(Reader {
        path: path.to_path_buf(),
        db,
        phase: Phase::Connect,
        after_rowid: i64::MIN,
        clients_made: false,
        page: VecDeque::new(),
        rows_total,
        rows_done: 0,
        size,
        failure: None,
    })
}

/// A time stamp column: sqlgrey's SQLite `now()` stores Unix seconds (an integer; text
/// digits are accepted too).
fn seconds(v: &Value) -> Option<u64> {
    match v {
        Value::Integer(i) => u64::try_from(*i).ok(),
        Value::Text(t) => t.trim().parse().ok(),
        _ => None,
    }
}

/// A text column.
fn text(v: &Value) -> Option<&str> {
    match v {
        Value::Text(t) => Some(t),
        _ => None,
    }
}

/// sqlgrey's sender halves as one address (`""` for the null sender).
fn sender(name: &str, domain: &str) -> String {
    if name == UNDEF && domain == UNDEF {
        String::new()
    } else {
        format!("{name}@{domain}")
    }
}

impl Reader {
    /// Fetches the next page of the current phase into `page`, moving on to the next phase
    /// when one is exhausted.
    fn fill(&mut self) -> rusqlite::Result<()> {
        while self.page.is_empty() && self.phase != Phase::Done {
            let got = match self.phase {
                Phase::Connect => self.rows(
                    "SELECT rowid, sender_name, sender_domain, src, rcpt, first_seen \
                     FROM connect WHERE rowid > ?1 ORDER BY rowid LIMIT ?2",
                    connect_row,
                )?,
                Phase::FromAwl => self.rows(
                    "SELECT rowid, sender_name, sender_domain, src, first_seen, last_seen \
                     FROM from_awl WHERE rowid > ?1 ORDER BY rowid LIMIT ?2",
                    from_awl_row,
                )?,
                Phase::DomainAwl => self.rows(
                    "SELECT rowid, NULL, sender_domain, src, first_seen, last_seen \
                     FROM domain_awl WHERE rowid > ?1 ORDER BY rowid LIMIT ?2",
                    from_awl_row,
                )?,
                Phase::Clients => self.clients()?,
                Phase::Done => 0,
            };
            if got < PAGE as usize {
                self.phase = match self.phase {
                    Phase::Connect => Phase::FromAwl,
                    Phase::FromAwl => Phase::DomainAwl,
                    Phase::DomainAwl => Phase::Clients,
                    Phase::Clients | Phase::Done => Phase::Done,
                };
                self.after_rowid = i64::MIN;
            }
        }
        Ok(())
    }

    /// One page of a table by rowid, each row turned into a result by `f`.
    fn rows(&mut self, sql: &str, f: fn(&[Value]) -> ReadResult) -> rusqlite::Result<usize> {
        let mut stmt = self.db.prepare_cached(sql)?;
        let mut rows = stmt.query((self.after_rowid, PAGE))?;
        let mut n = 0;
        while let Some(row) = rows.next()? {
            let vals = (0..6)
                .map(|i| row.get::<_, Value>(i))
                .collect::<rusqlite::Result<Vec<_>>>()?;
            if let Value::Integer(id) = vals[0] {
                self.after_rowid = id;
            }
            self.page.push_back(f(&vals[1..]));
            n += 1;
        }
        self.rows_done += n as u64;
        Ok(n)
    }

    /// One page of client counts: the rows of both auto-whitelist tables per `src`.
    ///
    /// The counts are made once into a temporary table (SQLite's temp database, on disk
    /// beside the read-only main one), then paged by rowid: paging the `GROUP BY` itself
    /// sorts what is left of both tables again for every page. Measured on 200 000
    /// `from_awl` and 50 000 `domain_awl` rows (100 000 clients): 0.29 s this way, 8.6 s
    /// paging the `GROUP BY` (system SQLite 3.40, the same machine).
    fn clients(&mut self) -> rusqlite::Result<usize> {
        if !self.clients_made {
            self.db.execute_batch(
                "CREATE TEMP TABLE greyhound_import_clients AS \
                 SELECT src, count(*) AS n, max(last_seen) AS last FROM \
                 (SELECT src, last_seen FROM from_awl UNION ALL SELECT src, last_seen FROM domain_awl) \
                 GROUP BY src ORDER BY src",
            )?;
            self.clients_made = true;
        }
        let mut stmt = self.db.prepare_cached(
            "SELECT rowid, src, n, last FROM temp.greyhound_import_clients \
             WHERE rowid > ?1 ORDER BY rowid LIMIT ?2",
        )?;
        let mut rows = stmt.query((self.after_rowid, PAGE))?;
        let mut n = 0;
        while let Some(row) = rows.next()? {
            self.after_rowid = row.get(0)?;
            let src: Value = row.get(1)?;
            let count: i64 = row.get(2)?;
            let last: Value = row.get(3)?;
            let src = text(&src).unwrap_or_default();
            // A bad src or time was reported as its table was read; its aggregate adds
            // nothing to report.
            if let (Some(client), Some(last_seen)) = (parse_client(src), seconds(&last)) {
                self.page.push_back(Ok(Item::Client(ClientItem {
                    client,
                    count: u32::try_from(count).unwrap_or(u32::MAX),
                    last_seen,
                })));
            }
            n += 1;
        }
        Ok(n)
    }
}

/// A `connect` row: `sender_name, sender_domain, src, rcpt, first_seen`.
fn connect_row(v: &[Value]) -> ReadResult {
    let (Some(name), Some(domain), Some(src), Some(rcpt), Some(first)) = (
        text(&v[0]),
        text(&v[1]),
        text(&v[2]),
        text(&v[3]),
        seconds(&v[4]),
    ) else {
        return Err((Skip::Unparsable, format!("connect row {v:?}")));
    };
    let client = parse_client(src).ok_or_else(|| {
        (
            Skip::BadClient,
            format!("connect: src {src:?} is not an address or network"),
        )
    })?;
    Ok(Item::Triplet(TripletItem {
        client,
        sender: sender(name, domain),
        recipient: rcpt.to_owned(),
        first_seen: first,
        last_seen: first,
        passed: false,
    }))
}

/// A `from_awl` row (`sender_name, sender_domain, src, first_seen, last_seen`) or a
/// `domain_awl` row (the same without a sender name): never a triplet.
fn from_awl_row(v: &[Value]) -> ReadResult {
    let (Some(domain), Some(src)) = (text(&v[1]), text(&v[2])) else {
        return Err((Skip::Unparsable, format!("auto-whitelist row {v:?}")));
    };
    if seconds(&v[3]).is_none() || seconds(&v[4]).is_none() {
        return Err((
            Skip::Unparsable,
            format!("auto-whitelist row with bad times {v:?}"),
        ));
    }
    if parse_client(src).is_none() {
        return Err((
            Skip::BadClient,
            format!("auto-whitelist: src {src:?} is not an address or network"),
        ));
    }
    Err((
        Skip::NoEquivalent,
        match text(&v[0]) {
            Some(name) => format!(
                "from_awl: {} from {src} passes for any recipient (counted for the client's auto-whitelist)",
                sender(name, domain)
            ),
            None => format!(
                "domain_awl: domain {domain} from {src} passes for any sender and recipient (counted for the client's auto-whitelist)"
            ),
        },
    ))
}

impl Iterator for Reader {
    type Item = ReadResult;

    fn next(&mut self) -> Option<ReadResult> {
        if self.failure.is_some() {
            return None;
        }
        if let Err(e) = self.fill() {
            let err = ImportError::Sqlite {
                path: self.path.clone(),
                message: format!("reading stopped: {e}"),
            };
            let msg = err.to_string();
            self.failure = Some(err);
            self.phase = Phase::Done;
            return Some(Err((Skip::Unparsable, msg)));
        }
        self.page.pop_front()
    }
}

impl ImportReader for Reader {
    fn bytes_read(&self) -> u64 {
        // SQLite reads pages, not a stream: progress is the share of rows read.
        if self.rows_total == 0 || self.phase == Phase::Done {
            return self.size;
        }
        (self.size as u128 * self.rows_done.min(self.rows_total) as u128 / self.rows_total as u128)
            as u64
    }
    fn total_bytes(&self) -> u64 {
        self.size
    }
    fn failure(&self) -> Option<&ImportError> {
        self.failure.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(path: &Path) -> Vec<ReadResult> {
        let mut r = read(path, &ReadOptions::default()).expect("open");
        let v = r.by_ref().collect();
        assert!(r.failure().is_none());
        assert_eq!(r.bytes_read(), r.total_bytes());
        v
    }

    #[test]
    fn real_sqlgrey_database() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/import/sqlgrey.db");
        let v = all(&path);
        let t = |ip: &str, s: &str, first| {
            Ok(Item::Triplet(TripletItem {
                client: ip.parse().unwrap(),
                sender: s.into(),
                recipient: if s.is_empty() {
                    "bounces@example.net"
                } else {
                    "bob@example.net"
                }
                .into(),
                first_seen: first,
                last_seen: first,
                passed: false,
            }))
        };
        let c = |ip: &str| {
            Ok(Item::Client(ClientItem {
                client: ip.parse().unwrap(),
                count: 1,
                last_seen: 1796184469,
            }))
        };
        assert_eq!(v.len(), 6, "{v:?}");
        assert_eq!(v[0], t("198.51.100.7", "", 1796184467));
        assert_eq!(v[1], t("203.0.113.9", "eve@example.com", 1796184469));
        let (skip, why) = v[2].clone().unwrap_err();
        assert_eq!(skip, Skip::NoEquivalent);
        assert!(
            why.contains("from_awl: carol@example.com from 2001:db8::5"),
            "{why}"
        );
        let (skip, why) = v[3].clone().unwrap_err();
        assert_eq!(skip, Skip::NoEquivalent);
        assert!(
            why.contains("domain_awl: domain example.org from 192.0.2 "),
            "{why}"
        );
        // sqlgrey's class C `192.0.2` is the network 192.0.2.0.
        assert_eq!(v[4..], [c("192.0.2.0"), c("2001:db8::5")]);
    }

    #[test]
    fn paging_covers_every_row_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.db");
        let db = Connection::open(&path).unwrap();
        db.execute_batch(
            "CREATE TABLE connect (sender_name, sender_domain, src, rcpt, first_seen);
             CREATE TABLE from_awl (sender_name, sender_domain, src, first_seen, last_seen);
             CREATE TABLE domain_awl (sender_domain, src, first_seen, last_seen);",
        )
        .unwrap();
        let n = PAGE * 2 + 1;
        db.execute_batch("BEGIN").unwrap();
        for i in 0..n {
            db.execute(
                "INSERT INTO connect VALUES ('a', 'example.org', ?1, 'b@example.net', 5)",
                [format!("10.0.{}.{}", i / 256, i % 256)],
            )
            .unwrap();
            db.execute(
                "INSERT INTO from_awl VALUES ('a', 'example.org', ?1, 5, ?2)",
                (
                    format!("10.1.{}.{}", i % (PAGE + 7) / 256, i % (PAGE + 7) % 256),
                    i,
                ),
            )
            .unwrap();
        }
        db.execute(
            "INSERT INTO connect VALUES ('a', 'b', 'host.example', 'c', 1)",
            [],
        )
        .unwrap();
        db.execute(
            "INSERT INTO connect VALUES ('a', 'b', '10.9.9.9', 'c', 'soon')",
            [],
        )
        .unwrap();
        db.execute_batch("COMMIT").unwrap();
        drop(db);
        let v = all(&path);
        let triplets = v
            .iter()
            .filter(|r| matches!(r, Ok(Item::Triplet(_))))
            .count();
        let clients = v
            .iter()
            .filter_map(|r| match r {
                Ok(Item::Client(c)) => Some(c.count),
                _ => None,
            })
            .collect::<Vec<_>>();
        assert_eq!(triplets as i64, n);
        assert_eq!(clients.len() as i64, PAGE + 7);
        assert_eq!(clients.iter().map(|&c| i64::from(c)).sum::<i64>(), n);
        let skips = |s| {
            v.iter()
                .filter(|r| matches!(r, Err((k, _)) if *k == s))
                .count()
        };
        assert_eq!(skips(Skip::NoEquivalent) as i64, n);
        assert_eq!((skips(Skip::BadClient), skips(Skip::Unparsable)), (1, 1));
    }

    #[test]
    fn not_a_sqlgrey_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("other.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch("CREATE TABLE t (x)")
            .unwrap();
        let err = read(&path, &ReadOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("table connect") && err.contains("sqlgrey"),
            "{err}"
        );
        let text = dir.path().join("text");
        std::fs::write(&text, "hello, this is no database\n".repeat(100)).unwrap();
        assert!(read(&text, &ReadOptions::default()).is_err());
    }
}
