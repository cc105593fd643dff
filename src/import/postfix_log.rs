//! A Postfix mail log (DESIGN §13): every message Postfix received over SMTP and delivered
//! becomes a passed triplet, so that turning greylisting on delays no one who already
//! writes to you.
//!
//! A message's facts are on separate lines joined by its queue id:
//! ```text
//! Dec  2 03:58:30 mx postfix/smtpd[906]: 5808398E08D: client=mail.example[192.0.2.10]
//! Dec  2 03:58:30 mx postfix/qmgr[730]: 5808398E08D: from=<alice@example.org>, size=314, nrcpt=2 (queue active)
//! Dec  2 03:58:30 mx postfix/virtual[915]: 5808398E08D: to=<bob@example.net>, relay=virtual, …, status=sent (delivered to maildir)
//! Dec  2 03:58:30 mx postfix/qmgr[730]: 5808398E08D: removed
//! ```
//! Each `status=sent` line yields the triplet (client, sender, recipient), with `orig_to=`
//! as the recipient when present (the address the SMTP client gave, before aliasing), at
//! that line's time. Time stamps are the classic syslog form (`Dec  2 03:04:05`, or
//! `Dec 02 …` as Postfix's own `maillog_file` writes it; no year: the one that puts it at or
//! before now, plus a day) or RFC 3339 (`2026-12-02T03:04:05.123456+01:00`, rsyslog's and
//! journald's high-precision form). Classic times have no zone and are read as UTC: hours
//! do not matter for whitelisting ages measured in days.
//!
//! Given `maillog`, its rotations beside it are read first, oldest first: `maillog.N` and
//! `maillog.N.gz` (logrotate; larger N is older), `maillog.YYYYMMDD-HHMMSS.gz` (`postfix
//! logrotate`). Lines that are not Postfix's are [`Skip::Unparsable`]; Postfix lines that
//! are not part of a message delivered over SMTP (connects, rejects, deferrals, messages
//! whose `client=` predates the log) are [`Skip::NotDelivered`]; neither stops the import.
//!
//! The join state is bounded: at most [`ReadOptions::max_pending`] queue ids wait for their
//! delivery, each for at most [`ReadOptions::pending_lines`] lines; past either the oldest
//! is dropped and counted as [`Skip::NotDelivered`].

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use flate2::read::MultiGzDecoder;

use super::{
    read_line_bounded, ImportError, ImportReader, Item, ReadOptions, ReadResult, Skip, TripletItem,
};

/// Streams the delivered messages of a Postfix log and its rotations.
pub struct Reader {
    /// The files still to read, oldest first (the current one is `input`).
    files: VecDeque<PathBuf>,
    path: PathBuf,
    input: Option<Box<dyn BufRead + Send>>,
    /// Bytes read from the files on disk (compressed bytes for `.gz`), across all files.
    count: Arc<AtomicU64>,
    total: u64,
    now: u64,
    max_pending: usize,
    pending_lines: u64,
    /// Line number in the current file (for messages) and across all files (for ages).
    line: u64,
    seq: u64,
    buf: Vec<u8>,
    pending: HashMap<String, Pending>,
    /// Queue ids in the order they arrived, with the `seq` of their `client=` line; an entry
    /// whose id has since gone (or restarted) is stale and skipped.
    order: VecDeque<(u64, String)>,
    /// Results made by one line beyond the one returned (evictions).
    queued: VecDeque<ReadResult>,
    failure: Option<ImportError>,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("path", &self.path)
            .field("line", &self.line)
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

/// A message between its `client=` line and its deliveries.
#[derive(Debug)]
struct Pending {
    client: IpAddr,
    sender: Option<String>,
    /// `seq` of its `client=` line.
    seq: u64,
    delivered: bool,
}

/// A reader that counts bytes into a shared counter (the decoder above it owns it).
struct Counting<R> {
    inner: R,
    count: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Opens `path` and the rotations beside it.
pub fn read(path: &Path, opts: &ReadOptions) -> Result<Reader, ImportError> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| ImportError::Io { path: p, source }
    };
    let meta = std::fs::metadata(path).map_err(io(path))?;
    if !meta.is_file() {
        return Err(ImportError::Io {
            path: path.to_path_buf(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "not a file"),
        });
    }
    let files = with_rotations(path).map_err(io(path))?;
    let mut total = 0;
    for f in &files {
        total += std::fs::metadata(f).map_err(io(f))?.len();
    }
    Ok(Reader {
        files: files.into(),
        path: path.to_path_buf(),
        input: None,
        count: Arc::new(AtomicU64::new(0)),
        total,
        now: opts.now,
        max_pending: opts.max_pending.max(1),
        pending_lines: opts.pending_lines.max(1),
        line: 0,
        seq: 0,
        buf: Vec::new(),
        pending: HashMap::new(),
        order: VecDeque::new(),
        queued: VecDeque::new(),
        failure: None,
    })
}

/// `path` with its rotations, oldest first. A `.gz` path is read alone.
fn with_rotations(path: &Path) -> io::Result<Vec<PathBuf>> {
    let (Some(dir), Some(base)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return Ok(vec![path.to_path_buf()]);
    };
    if base.ends_with(".gz") {
        return Ok(vec![path.to_path_buf()]);
    }
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    // (dated, numbered): dated rotations sort by their date, older first; numbered ones by
    // N, larger (older) first.
    let mut dated = Vec::new();
    let mut numbered = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(suffix) = name.strip_prefix(base).and_then(|s| s.strip_prefix('.')) else {
            continue;
        };
        let suffix = suffix.strip_suffix(".gz").unwrap_or(suffix);
        if let Ok(n) = suffix.parse::<u32>() {
            numbered.push((n, entry.path()));
        } else if suffix.len() == 15
            && suffix.as_bytes()[8] == b'-'
            && suffix
                .bytes()
                .enumerate()
                .all(|(i, b)| i == 8 || b.is_ascii_digit())
        {
            dated.push((suffix.to_owned(), entry.path()));
        }
    }
    dated.sort();
    numbered.sort_by_key(|(n, _)| std::cmp::Reverse(*n));
    let mut out = dated.into_iter().map(|(_, p)| p).collect::<Vec<_>>();
    out.extend(numbered.into_iter().map(|(_, p)| p));
    out.push(path.to_path_buf());
    Ok(out)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The year of `now` (Unix seconds).
fn year_of(now: u64) -> i64 {
    let days = (now / 86_400) as i64;
    // Inverse of days_from_civil, year only.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    yoe + era * 400 + i64::from(m <= 2)
}

/// `HH:MM:SS` as seconds of the day.
fn hms(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 8 || b[2] != b':' || b[5] != b':' {
        return None;
    }
    let h: i64 = s[0..2].parse().ok()?;
    let m: i64 = s[3..5].parse().ok()?;
    let sec: i64 = s[6..8].parse().ok()?;
    (h < 24 && m < 60 && sec < 61).then_some(h * 3600 + m * 60 + sec)
}

/// The time stamp at the start of `line` and the rest after it: classic or RFC 3339.
fn timestamp(line: &str, now: u64) -> Option<(u64, &str)> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let first = line.as_bytes().first()?;
    if first.is_ascii_digit() {
        // 2026-12-02T03:04:05[.ffffff](Z|±hh:mm)
        let (stamp, rest) = line.split_once(' ')?;
        let b = stamp.as_bytes();
        if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' {
            return None;
        }
        let y: i64 = stamp[0..4].parse().ok()?;
        let mo: u32 = stamp[5..7].parse().ok()?;
        let d: u32 = stamp[8..10].parse().ok()?;
        let secs = hms(&stamp[11..19])?;
        let mut zone = &stamp[19..];
        if let Some(frac) = zone.strip_prefix('.') {
            zone = frac.trim_start_matches(|c: char| c.is_ascii_digit());
        }
        let offset = match zone {
            "Z" | "z" => 0,
            _ => {
                let sign = match zone.as_bytes().first()? {
                    b'+' => 1,
                    b'-' => -1,
                    _ => return None,
                };
                let hm = zone.get(1..)?;
                let (h, m) = hm.split_once(':')?;
                sign * (h.parse::<i64>().ok()? * 3600 + m.parse::<i64>().ok()? * 60)
            }
        };
        if !(1..=12).contains(&mo) || !(1..=31).contains(&d) {
            return None;
        }
        let t = days_from_civil(y, mo, d) * 86_400 + secs - offset;
        return Some((u64::try_from(t).ok()?, rest));
    }
    // Mmm dd HH:MM:SS (day space- or zero-padded)
    let month = MONTHS.iter().position(|m| line.starts_with(m))? as u32 + 1;
    let rest = line.get(3..)?.strip_prefix(' ')?;
    let rest = rest.trim_start_matches(' ');
    let (day, rest) = rest.split_once(' ')?;
    let day: u32 = day.parse().ok().filter(|d| (1..=31).contains(d))?;
    let (time, rest) = rest.split_once(' ')?;
    let secs = hms(time)?;
    let at = |year: i64| days_from_civil(year, month, day) * 86_400 + secs;
    let year = year_of(now);
    let mut t = at(year);
    if t > now as i64 + 86_400 {
        t = at(year - 1);
    }
    Some((u64::try_from(t).ok()?, rest))
}

/// What a Postfix line says about a message.
#[derive(Debug, PartialEq, Eq)]
enum Event<'a> {
    Client(&'a str),
    From(&'a str),
    /// A delivery: recipient (orig_to if given), and whether `status=sent`.
    To(&'a str, bool),
    Removed,
    /// Another line of a message (cleanup's message-id, qmgr's expiry, bounces…).
    Other,
}

/// Splits `HOST PROGRAM[PID]: MESSAGE` and returns the message if PROGRAM is Postfix's.
fn postfix_message(rest: &str) -> Option<&str> {
    let (_host, rest) = rest.split_once(' ')?;
    let (prog, msg) = rest.split_once(": ")?;
    let name = prog.split('[').next()?;
    // postfix/smtpd, postfix-out/smtp (multi-instance), or a custom syslog_name/daemon.
    name.contains('/').then_some(msg)
}

/// `<addr>` at the start of `s`, bare.
fn angle(s: &str) -> Option<&str> {
    let s = s.strip_prefix('<')?;
    // The address ends at the `>` that ends the field (`>,` or `>` at the end).
    let end = s.find(">,").or_else(|| s.strip_suffix('>').map(str::len))?;
    Some(&s[..end])
}

/// A queue id and what the line says about it; `None` if the message has none.
fn event(msg: &str) -> Option<(&str, Event<'_>)> {
    let (qid, rest) = msg.split_once(": ")?;
    if qid.len() < 5 || !qid.bytes().all(|b| b.is_ascii_alphanumeric()) || qid == "NOQUEUE" {
        return None;
    }
    let ev = if let Some(c) = rest.strip_prefix("client=") {
        Event::Client(c)
    } else if let Some(f) = rest.strip_prefix("from=") {
        Event::From(angle(f)?)
    } else if let Some(t) = rest.strip_prefix("to=") {
        let to = angle(t)?;
        let rcpt = rest
            .find(", orig_to=")
            .and_then(|i| angle(&rest[i + ", orig_to=".len()..]))
            .unwrap_or(to);
        Event::To(rcpt, rest.contains(", status=sent "))
    } else if rest == "removed" {
        Event::Removed
    } else {
        Event::Other
    };
    Some((qid, ev))
}

/// The address in `client=NAME[ADDR]` (with `:PORT` or `, sasl_…` after it perhaps).
fn client_addr(c: &str) -> Option<IpAddr> {
    let open = c.find('[')?;
    let close = open + c[open..].find(']')?;
    let addr = &c[open + 1..close];
    addr.strip_prefix("IPv6:").unwrap_or(addr).parse().ok()
}

/// A line, shortened for a skip message.
fn excerpt(s: &str) -> String {
    const MAX: usize = 120;
    match s.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

impl Reader {
    /// Opens the next file; `false` when there is none.
    fn open_next(&mut self) -> Result<bool, ImportError> {
        let Some(path) = self.files.pop_front() else {
            return Ok(false);
        };
        let file = File::open(&path).map_err(|source| ImportError::Io {
            path: path.clone(),
            source,
        })?;
        let counted = Counting {
            inner: file,
            count: Arc::clone(&self.count),
        };
        let gz = path.extension().is_some_and(|e| e == "gz");
        self.input = Some(if gz {
            Box::new(BufReader::with_capacity(
                64 * 1024,
                MultiGzDecoder::new(counted),
            ))
        } else {
            Box::new(BufReader::with_capacity(64 * 1024, counted))
        });
        self.path = path;
        self.line = 0;
        Ok(true)
    }

    /// Drops waiting queue ids that are too old or too many, queueing a skip for each one
    /// that was never delivered.
    fn evict(&mut self) {
        // Entries of messages already removed stay in `order` until they reach its front;
        // behind a long-waiting one they could pile up, so they are swept out in bulk.
        if self.order.len() > 4 * self.max_pending {
            let pending = &self.pending;
            self.order
                .retain(|(seq, qid)| pending.get(qid).is_some_and(|p| p.seq == *seq));
        }
        while let Some((seq, qid)) = self.order.front() {
            let live = self.pending.get(qid).is_some_and(|p| p.seq == *seq);
            let old = self.seq.saturating_sub(*seq) > self.pending_lines;
            if live && !old && self.pending.len() <= self.max_pending {
                break;
            }
            let (seq, qid) = self.order.pop_front().expect("front exists");
            if live {
                let p = self.pending.remove(&qid).expect("live entry");
                if !p.delivered {
                    self.queued.push_back(Err((
                        Skip::NotDelivered,
                        format!(
                            "queue id {qid} (client= {} lines back): no delivery seen; dropped",
                            self.seq - seq
                        ),
                    )));
                }
            }
        }
    }

    /// One line: an item, a skip, or nothing (a line that only feeds the join).
    fn line(&mut self, text: &str) -> Option<ReadResult> {
        let here = || format!("{}:{}", self.path.display(), self.line);
        let Some((time, rest)) = timestamp(text, self.now) else {
            return Some(Err((
                Skip::Unparsable,
                format!("{}: {}", here(), excerpt(text)),
            )));
        };
        let Some(msg) = postfix_message(rest) else {
            return Some(Err((
                Skip::Unparsable,
                format!("{}: {}", here(), excerpt(text)),
            )));
        };
        let not_delivered = || Err((Skip::NotDelivered, format!("{}: {}", here(), excerpt(msg))));
        let Some((qid, ev)) = event(msg) else {
            return Some(not_delivered());
        };
        match ev {
            Event::Client(c) => {
                let Some(client) = client_addr(c) else {
                    return Some(Err((
                        Skip::BadClient,
                        format!("{}: {}", here(), excerpt(msg)),
                    )));
                };
                // A queue id is unique while queued; a new client= for one starts a new
                // message (Postfix reuses ids once a message is removed).
                self.pending.insert(
                    qid.to_owned(),
                    Pending {
                        client,
                        sender: None,
                        seq: self.seq,
                        delivered: false,
                    },
                );
                self.order.push_back((self.seq, qid.to_owned()));
                None
            }
            Event::From(f) => match self.pending.get_mut(qid) {
                Some(p) => {
                    p.sender = Some(f.to_owned());
                    None
                }
                None => Some(not_delivered()),
            },
            Event::To(rcpt, sent) => {
                let Some(p) = self.pending.get_mut(qid) else {
                    return Some(not_delivered());
                };
                let Some(sender) = p.sender.clone() else {
                    return Some(not_delivered());
                };
                if !sent {
                    return Some(not_delivered());
                }
                p.delivered = true;
                Some(Ok(Item::Triplet(TripletItem {
                    client: p.client,
                    sender,
                    recipient: rcpt.to_owned(),
                    first_seen: time,
                    last_seen: time,
                    passed: true,
                })))
            }
            Event::Removed => match self.pending.remove(qid) {
                Some(p) if !p.delivered => Some(not_delivered()),
                Some(_) => None,
                None => Some(not_delivered()),
            },
            Event::Other if self.pending.contains_key(qid) => None,
            Event::Other => Some(not_delivered()),
        }
    }

    fn fail(&mut self, err: ImportError) -> Option<ReadResult> {
        let msg = err.to_string();
        self.failure = Some(err);
        self.files.clear();
        self.input = None;
        Some(Err((Skip::Unparsable, msg)))
    }
}

impl Iterator for Reader {
    type Item = ReadResult;

    fn next(&mut self) -> Option<ReadResult> {
        loop {
            if let Some(r) = self.queued.pop_front() {
                return Some(r);
            }
            if self.failure.is_some() {
                return None;
            }
            let Some(input) = self.input.as_mut() else {
                match self.open_next() {
                    Ok(true) => continue,
                    Ok(false) => {
                        // The end: what still waits was never delivered within the log.
                        self.seq = u64::MAX;
                        self.evict();
                        return self.queued.pop_front();
                    }
                    Err(e) => return self.fail(e),
                }
            };
            let whole = match read_line_bounded(input, &mut self.buf) {
                Ok(Some(whole)) => whole,
                Ok(None) => {
                    self.input = None;
                    continue;
                }
                Err(source) => {
                    let err = ImportError::IoAt {
                        path: self.path.clone(),
                        line: self.line + 1,
                        source,
                    };
                    return self.fail(err);
                }
            };
            self.line += 1;
            self.seq += 1;
            let buf = std::mem::take(&mut self.buf);
            let result = if whole {
                let text = String::from_utf8_lossy(&buf);
                self.line(&text)
            } else {
                Some(Err((
                    Skip::Unparsable,
                    format!(
                        "{}:{}: line longer than 64 KiB",
                        self.path.display(),
                        self.line
                    ),
                )))
            };
            self.buf = buf;
            self.evict();
            if let Some(r) = result {
                return Some(r);
            }
        }
    }
}

impl ImportReader for Reader {
    fn bytes_read(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
    fn total_bytes(&self) -> u64 {
        self.total
    }
    fn failure(&self) -> Option<&ImportError> {
        self.failure.as_ref()
    }
}
