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
            let line = match self.next_line() {
                Ok(true) => self.buf.clone(),
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
                if line.starts_with(b"VERSION=") {
                    if let Err(e) = self.skip_header() {
                        return self.fail(e);
                    }
                }
                continue;
            }
            if line == b"DATA=END" {
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
