//! postgrey's databases as `db_dump -p` prints them (DESIGN §13).
//!
//! `postgrey.db` maps `client_net/sender/recipient` (lower-cased; `client_net` is the masked
//! network such as `192.0.2.0` or `2001:db8:0:0:0:0:0:0`, three octets such as `192.0.2` in
//! versions before 1.32, the full address with `--lookup-by-host`) to `first,last[,host]`.
//! `postgrey_clients.db` maps a client address to `count,last`. Both dumps look alike, so
//! each record is told apart by its key: a triplet key has slashes, a client key is an
//! address. With `--privacy` every key is the SHA-1 hex of the above: such records are
//! skipped as [`Skip::Hashed`].
//!
//! `db_dump -p` prints a header (`VERSION=3` … `HEADER=END`), then one line per key and one
//! per value, each starting with a space, bytes outside printable ASCII as `\xx` and a
//! backslash as `\\`, then `DATA=END`; a file may hold several such sections.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use super::{
    parse_client, read_line_bounded, ClientItem, Counting, ImportError, ImportReader, Item,
    ReadOptions, ReadResult, Skip, TripletItem,
};

/// Lines a header may take before the file is judged not to be a dump.
const MAX_HEADER_LINES: u64 = 64;

/// Streams the records of a `db_dump -p` dump of `postgrey.db` or `postgrey_clients.db`.
#[derive(Debug)]
pub struct Reader {
    path: PathBuf,
    input: BufReader<Counting<File>>,
    total: u64,
    peer_delay: u64,
    line: u64,
    buf: Vec<u8>,
    /// Inside a section's data (between `HEADER=END` and `DATA=END`).
    in_data: bool,
    done: bool,
    failure: Option<ImportError>,
}

/// Opens a `db_dump -p` dump; fails unless it starts with a dump header.
pub fn read(path: &Path, opts: &ReadOptions) -> Result<Reader, ImportError> {
    let io = |source| ImportError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let total = file.metadata().map_err(io)?.len();
    let mut r = Reader {
        path: path.to_path_buf(),
        input: BufReader::with_capacity(
            64 * 1024,
            Counting {
                inner: file,
                count: 0,
            },
        ),
        total,
        peer_delay: opts.peer_delay,
        line: 0,
        buf: Vec::new(),
        in_data: false,
        done: false,
        failure: None,
    };
    match r.next_line() {
        Ok(true) if r.buf.starts_with(b"VERSION=") => {}
        Ok(_) => {
            return Err(ImportError::Format {
                path: path.to_path_buf(),
                line: 1,
                message: "not a `db_dump -p` dump (it starts with VERSION=): dump postgrey's \
                          database with `db_dump -p -h DBDIR postgrey.db`"
                    .into(),
            })
        }
        Err(e) => return Err(e),
    }
    r.skip_header()?;
    Ok(r)
}

impl Reader {
    /// Reads the next line into `buf`: `false` at the end of the file.
    fn next_line(&mut self) -> Result<bool, ImportError> {
        match read_line_bounded(&mut self.input, &mut self.buf) {
            Ok(None) => Ok(false),
            Ok(Some(_)) => {
                self.line += 1;
                Ok(true)
            }
            Err(source) => Err(ImportError::IoAt {
                path: self.path.clone(),
                line: self.line + 1,
                source,
            }),
        }
    }

    /// Consumes header lines through `HEADER=END`.
    fn skip_header(&mut self) -> Result<(), ImportError> {
        let start = self.line;
        loop {
            let more = self.next_line()?;
            if more && self.buf == b"HEADER=END" {
                self.in_data = true;
                return Ok(());
            }
            if !more || self.buf.starts_with(b" ") || self.line - start >= MAX_HEADER_LINES {
                {
                    return Err(ImportError::Format {
                        path: self.path.clone(),
                        line: self.line,
                        message: "dump header without HEADER=END".into(),
                    });
                }
            }
        }
    }

    /// Stops with `err`: recorded for [`ImportReader::failure`] and yielded as a counted skip.
    fn fail(&mut self, err: ImportError) -> Option<ReadResult> {
        self.done = true;
        let msg = err.to_string();
        self.failure = Some(err);
        Some(Err((Skip::Unparsable, msg)))
    }

    /// One data line without its leading space, unescaped; `None` if it is not a data line.
    fn data(&self) -> Option<String> {
        unescape(self.buf.strip_prefix(b" ")?)
    }
}

impl Iterator for Reader {
    type Item = ReadResult;

    fn next(&mut self) -> Option<ReadResult> {
        while !self.done {
            match self.next_line() {
                Ok(true) => {}
                Ok(false) if self.in_data => {
                    let err = ImportError::Format {
                        path: self.path.clone(),
                        line: self.line,
                        message: "the dump ends without DATA=END: truncated".into(),
                    };
                    return self.fail(err);
                }
                Ok(false) => return None,
                Err(e) => return self.fail(e),
            };
            if !self.in_data {
                // Between sections: another dump may follow (several databases in one file).
                if self.buf.starts_with(b"VERSION=") {
                    if let Err(e) = self.skip_header() {
                        return self.fail(e);
                    }
                }
                continue;
            }
            if self.buf == b"DATA=END" {
                self.in_data = false;
                continue;
            }
            let key_line = self.line;
            let key = self.data();
            let value = match self.next_line() {
                Ok(true) => self.data(),
                Ok(false) => {
                    let err = ImportError::Format {
                        path: self.path.clone(),
                        line: self.line,
                        message: "a key without its value: truncated".into(),
                    };
                    return self.fail(err);
                }
                Err(e) => return self.fail(e),
            };
            let (Some(key), Some(value)) = (key, value) else {
                return Some(Err((
                    Skip::Unparsable,
                    format!("line {key_line}: not a key and value of `db_dump -p`"),
                )));
            };
            return Some(
                record(&key, &value, self.peer_delay).map_err(|(skip, why)| {
                    (skip, format!("line {key_line}: {why}: {key:?} = {value:?}"))
                }),
            );
        }
        None
    }
}

impl ImportReader for Reader {
    fn bytes_read(&self) -> u64 {
        self.input.get_ref().count
    }
    fn total_bytes(&self) -> u64 {
        self.total
    }
    fn failure(&self) -> Option<&ImportError> {
        self.failure.as_ref()
    }
}

/// Undoes `db_dump -p`'s escapes (`\\` and `\xx`); `None` if they are malformed or the bytes
/// are not UTF-8.
fn unescape(s: &[u8]) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'\\' {
            if s.get(i + 1) == Some(&b'\\') {
                out.push(b'\\');
                i += 2;
            } else {
                let hex = std::str::from_utf8(s.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Whether `key` is one of `--privacy`'s SHA-1 hex digests.
fn is_hashed(key: &str) -> bool {
    key.len() == 40 && key.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Two comma-separated numbers at the start of a value (a host name may follow).
fn two_numbers(value: &str) -> Option<(u64, u64)> {
    let mut it = value.split(',');
    let a = it.next()?.parse().ok()?;
    let b = it.next()?.parse().ok()?;
    Some((a, b))
}

/// One record of either database.
fn record(key: &str, value: &str, peer_delay: u64) -> Result<Item, (Skip, &'static str)> {
    if is_hashed(key) {
        return Err((
            Skip::Hashed,
            "a --privacy hash: postgrey stored no address to import",
        ));
    }
    let Some((a, b)) = two_numbers(value) else {
        return Err((
            Skip::Unparsable,
            "value is not `first,last` or `count,last`",
        ));
    };
    // A triplet key: the client network up to the first slash, the recipient after the
    // last one (an address has no slash in its domain), the sender between (where a local
    // part could hold one).
    if let Some((client, rest)) = key.split_once('/') {
        let Some((sender, recipient)) = rest.rsplit_once('/') else {
            return Err((Skip::Unparsable, "key is not client/sender/recipient"));
        };
        let client = parse_client(client).ok_or((Skip::BadClient, "client is not a network"))?;
        if b < a {
            return Err((Skip::Unparsable, "last seen before first seen"));
        }
        return Ok(Item::Triplet(TripletItem {
            client,
            sender: sender.to_owned(),
            recipient: recipient.to_owned(),
            first_seen: a,
            last_seen: b,
            passed: b - a >= peer_delay,
        }));
    }
    let client = parse_client(key).ok_or((Skip::Unparsable, "neither a triplet nor a client"))?;
    let count = u32::try_from(a).map_err(|_| (Skip::Unparsable, "client count out of range"))?;
    Ok(Item::Client(ClientItem {
        client,
        count,
        last_seen: b,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/import")
            .join(name)
    }

    fn all(path: &Path, peer_delay: u64) -> Vec<ReadResult> {
        let opts = ReadOptions {
            peer_delay,
            ..ReadOptions::default()
        };
        let mut r = read(path, &opts).expect("open");
        let v = r.by_ref().collect();
        assert!(r.failure().is_none());
        assert_eq!(r.bytes_read(), r.total_bytes());
        v
    }

    fn triplet(client: &str, s: &str, r: &str, first: u64, last: u64, passed: bool) -> ReadResult {
        Ok(Item::Triplet(TripletItem {
            client: client.parse().unwrap(),
            sender: s.into(),
            recipient: r.into(),
            first_seen: first,
            last_seen: last,
            passed,
        }))
    }

    #[test]
    fn real_postgrey_db_dump() {
        // postgrey ran with --delay=1; the two retried triplets waited 2 s.
        assert_eq!(
            all(&fixture("postgrey.dump"), 1),
            vec![
                triplet(
                    "192.0.2.0",
                    "alice@example.org",
                    "bob@example.net",
                    1796184464,
                    1796184466,
                    true
                ),
                triplet(
                    "198.51.100.0",
                    "",
                    "bounces@example.net",
                    1796184464,
                    1796184464,
                    false
                ),
                triplet(
                    "2001:db8::",
                    "carol@example.com",
                    "dave@example.net",
                    1796184464,
                    1796184466,
                    true
                ),
                triplet(
                    "203.0.113.0",
                    "list-#@example.org",
                    "josé@example.net",
                    1796184464,
                    1796184464,
                    false
                ),
            ]
        );
        // With postgrey's default delay a 2 s wait had not passed: passed is last - first
        // >= peer_delay, tested just below, at and above.
        let passed = |d| {
            all(&fixture("postgrey.dump"), d)
                .iter()
                .filter(|r| matches!(r, Ok(Item::Triplet(t)) if t.passed))
                .count()
        };
        assert_eq!((passed(1), passed(2), passed(3), passed(300)), (2, 2, 0, 0));
    }

    #[test]
    fn real_postgrey_clients_db_dump() {
        let client = |ip: &str| {
            Ok(Item::Client(ClientItem {
                client: ip.parse().unwrap(),
                count: 1,
                last_seen: 1796184466,
            }))
        };
        // The clients database writes IPv6 upper-case (`2001:DB8:0:0:0:0:0:5`).
        assert_eq!(
            all(&fixture("postgrey_clients.dump"), 300),
            vec![client("192.0.2.10"), client("2001:db8::5")]
        );
    }

    #[test]
    fn real_privacy_dumps_are_hashed() {
        for (name, n) in [
            ("postgrey-privacy.dump", 4),
            ("postgrey_clients-privacy.dump", 2),
        ] {
            let v = all(&fixture(name), 300);
            assert_eq!(v.len(), n, "{name}");
            for r in v {
                let (skip, why) = r.expect_err("hashed");
                assert_eq!(skip, Skip::Hashed);
                assert!(why.contains("--privacy"), "{why}");
            }
        }
    }

    fn dump_of(body: &str) -> (tempfile::NamedTempFile, Vec<ReadResult>) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        write!(f, "VERSION=3\nformat=print\ntype=btree\nHEADER=END\n{body}").unwrap();
        let v = read(f.path(), &ReadOptions::default())
            .expect("open")
            .collect();
        (f, v)
    }

    #[test]
    fn old_three_octet_keys_and_bad_records() {
        let (_f, v) = dump_of(
            " 192.0.2/a@example.org/b@example.net\n 100,500,mx.example.org\n\
             \x20mail.example.org/a@example.org/b@example.net\n 1,2\n\
             \x20192.0.2.0/a@example.org/b@example.net\n 500,100\n\
             \x20192.0.2.0/no-recipient\n 1,2\n\
             \x20192.0.2.9\n many,2\n\
             \x20bad\\zzescape\n 1,2\n\
             DATA=END\n",
        );
        assert_eq!(
            v[0],
            triplet(
                "192.0.2.0",
                "a@example.org",
                "b@example.net",
                100,
                500,
                true
            )
        );
        let skips = v[1..]
            .iter()
            .map(|r| r.as_ref().unwrap_err().0)
            .collect::<Vec<_>>();
        use Skip::*;
        assert_eq!(
            skips,
            [BadClient, Unparsable, Unparsable, Unparsable, Unparsable]
        );
    }

    #[test]
    fn several_sections_in_one_file() {
        let (_f, v) = dump_of(
            " 192.0.2.0//b@example.net\n 1,2\nDATA=END\n\
             VERSION=3\nformat=print\nHEADER=END\n 192.0.2.1\n 3,4\nDATA=END\n",
        );
        assert_eq!(v.len(), 2);
        assert!(matches!(
            v[1],
            Ok(Item::Client(ClientItem {
                count: 3,
                last_seen: 4,
                ..
            }))
        ));
    }

    #[test]
    fn truncated_dump_fails_loudly() {
        let text = std::fs::read_to_string(fixture("postgrey.dump")).unwrap();
        let cut = &text[..text.find("DATA=END").unwrap()];
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(cut.as_bytes()).unwrap();
        let mut r = read(f.path(), &ReadOptions::default()).unwrap();
        let v = r.by_ref().collect::<Vec<_>>();
        assert_eq!(v.iter().filter(|r| r.is_ok()).count(), 4);
        let (skip, why) = v.last().unwrap().clone().unwrap_err();
        assert_eq!(skip, Skip::Unparsable);
        assert!(why.contains("truncated"), "{why}");
        let err = r.failure().expect("failure recorded").to_string();
        assert!(err.contains(&f.path().display().to_string()), "{err}");
    }

    #[test]
    fn not_a_dump_is_an_error_naming_the_file() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"192.0.2.0/a/b 1,2\n").unwrap();
        let err = read(f.path(), &ReadOptions::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains(":1: not a `db_dump -p` dump"), "{err}");
        let err = read(
            Path::new("/nonexistent/postgrey.dump"),
            &ReadOptions::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("/nonexistent/postgrey.dump: "), "{err}");
    }

    #[test]
    fn unescapes_db_dump_bytes() {
        assert_eq!(unescape(br"jos\c3\a9").as_deref(), Some("josé"));
        assert_eq!(unescape(br"a\\b").as_deref(), Some(r"a\b"));
        assert_eq!(unescape(br"a\c"), None);
        assert_eq!(unescape(br"\ff"), None);
    }
}
