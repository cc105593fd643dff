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
//! as the recipient when present (the address the SMTP client gave, before aliasing), and
//! `orig_client=` as the client when present (a content filter's re-injection), at that
//! line's time; loopback clients (local submissions) are not whitelisted. Time stamps are the classic syslog form (`Dec  2 03:04:05`, or
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
    // The latest of next year, this year and last year that is not in the future (a day of
    // clock skew allowed): a log read just after New Year still has December's lines.
    let year = year_of(now);
    let t = (year - 1..=year + 1)
        .rev()
        .map(at)
        .find(|&t| t <= now as i64 + 86_400)?;
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
///
/// A message a content filter re-injected (amavis and the like, after the queue) arrives
/// from loopback; with XFORWARD Postfix logs the real client as `orig_client=NAME[ADDR]`,
/// which is used instead.
fn client_addr(c: &str) -> Option<IpAddr> {
    let c = match c.find(", orig_client=") {
        Some(i) => &c[i + ", orig_client=".len()..],
        None => c,
    };
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
                if client.is_loopback() {
                    // Local submission, or a content filter's re-injection without
                    // XFORWARD: not a client from outside, nothing to whitelist.
                    return Some(not_delivered());
                }
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
            // Drop what aged out before this line can join it.
            self.evict();
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

#[cfg(test)]
mod tests {
    use super::*;

    /// 2 December 2026 04:10 UTC: just after the fixtures were written.
    const NOW: u64 = 1_796_184_600;

    fn fixture_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/import/postfix")
    }

    fn opts() -> ReadOptions {
        ReadOptions {
            now: NOW,
            ..ReadOptions::default()
        }
    }

    fn all(path: &Path, opts: &ReadOptions) -> Vec<ReadResult> {
        let mut r = read(path, opts).expect("open");
        let v = r.by_ref().collect();
        assert!(r.failure().is_none(), "{:?}", r.failure());
        assert_eq!(r.bytes_read(), r.total_bytes());
        v
    }

    fn items(v: &[ReadResult]) -> Vec<(String, String, String, u64)> {
        v.iter()
            .filter_map(|r| match r {
                Ok(Item::Triplet(t)) => {
                    assert!(t.passed && t.first_seen == t.last_seen);
                    Some((
                        t.client.to_string(),
                        t.sender.clone(),
                        t.recipient.clone(),
                        t.last_seen,
                    ))
                }
                _ => None,
            })
            .collect()
    }

    fn expected() -> Vec<(String, String, String, u64)> {
        // 04:08:01 and 04:08:02 on 2 December 2026 (`date -u -d … +%s`).
        let row = |c: &str, s: &str, r: &str, t| (c.into(), s.into(), r.into(), t);
        vec![
            row(
                "192.0.2.10",
                "alice@example.org",
                "bob@example.net",
                1_796_184_481,
            ),
            row(
                "192.0.2.10",
                "alice@example.org",
                "carol@example.net",
                1_796_184_481,
            ),
            row("198.51.100.7", "", "postmaster@example.net", 1_796_184_481),
            row(
                "192.0.2.77",
                "dave@example.com",
                "erin@example.net",
                1_796_184_482,
            ),
        ]
    }

    #[test]
    fn real_postfix_log_with_its_gzipped_rotation() {
        let v = all(&fixture_dir().join("maillog"), &opts());
        // The rotated (older) file is read first.
        assert_eq!(items(&v), expected());
        let skips = |s| {
            v.iter()
                .filter(|r| matches!(r, Err((k, _)) if *k == s))
                .count()
        };
        assert_eq!(skips(Skip::Unparsable), 0);
        assert!(skips(Skip::NotDelivered) > 10);
        // The session that never sent DATA left a queue id that was never delivered.
        assert!(v.iter().any(|r| matches!(r, Err((Skip::NotDelivered, m))
            if m.contains("60EFF98E1D9") && m.contains("no delivery"))));
        // Deterministic.
        assert_eq!(all(&fixture_dir().join("maillog"), &opts()), v);
    }

    /// Rewrites `Dec 02 04:08:01` into RFC 3339 with the given zone, as rsyslog's
    /// high-precision template would have written the same lines.
    fn to_rfc3339(line: &str, zone: &str, hours: i64) -> String {
        let (t, rest) = timestamp(line, NOW).expect("classic stamp");
        let local = t as i64 + hours * 3600;
        let days = local.div_euclid(86_400);
        let secs = local.rem_euclid(86_400);
        assert_eq!(days, days_from_civil(2026, 12, 2), "fixture day");
        format!(
            "2026-12-02T{:02}:{:02}:{:02}.123456{zone} {rest}",
            secs / 3600,
            secs / 60 % 60,
            secs % 60
        )
    }

    #[test]
    fn rfc3339_time_stamps_give_the_same_items() {
        let dir = tempfile::tempdir().unwrap();
        let mut text = String::new();
        let mut gz = flate2::read::MultiGzDecoder::new(
            File::open(
                std::fs::read_dir(fixture_dir())
                    .unwrap()
                    .map(|e| e.unwrap().path())
                    .find(|p| p.extension().is_some_and(|e| e == "gz"))
                    .unwrap(),
            )
            .unwrap(),
        );
        gz.read_to_string(&mut text).unwrap();
        text += &std::fs::read_to_string(fixture_dir().join("maillog")).unwrap();
        // Half-hour zones are checked by the boundary test below.
        for (zone, hours) in [("+00:00", 0), ("Z", 0), ("+02:00", 2), ("+05:00", 5)] {
            let out = text
                .lines()
                .map(|l| to_rfc3339(l, zone, hours) + "\n")
                .collect::<String>();
            let path = dir.path().join("mail.log");
            std::fs::write(&path, out).unwrap();
            assert_eq!(items(&all(&path, &opts())), expected(), "zone {zone}");
        }
    }

    #[test]
    fn time_stamps_at_their_boundaries() {
        let new_year = 1_767_225_600; // 2026-01-01T00:00:00Z
        let t = |s: &str, now| timestamp(s, now).map(|(t, _)| t);
        // Classic: the year that puts the stamp at or before now (plus a day).
        assert_eq!(
            t("Dec 31 23:59:59 h p/q[1]: m", new_year + 10),
            Some(new_year - 1)
        );
        assert_eq!(
            t("Jan  1 00:00:00 h p/q[1]: m", new_year + 10),
            Some(new_year)
        );
        assert_eq!(
            t("Jan 01 00:00:00 h p/q[1]: m", new_year - 10),
            Some(new_year)
        );
        assert_eq!(
            t("Jan  2 00:00:01 h p/q[1]: m", new_year - 10),
            Some(1_735_776_001)
        );
        assert_eq!(t("Dec 32 00:00:00 h", NOW), None);
        assert_eq!(t("Dec  2 24:00:00 h", NOW), None);
        assert_eq!(t("Foo  2 03:04:05 h", NOW), None);
        // RFC 3339, with and without fraction, with zones.
        assert_eq!(t("2026-01-01T00:00:00Z h", NOW), Some(new_year));
        assert_eq!(t("2026-01-01T01:00:00+01:00 h", NOW), Some(new_year));
        assert_eq!(t("2025-12-31T18:30:00.5-05:30 h", NOW), Some(new_year));
        assert_eq!(t("2026-13-01T00:00:00Z h", NOW), None);
        assert_eq!(t("2026-01-01 00:00:00 h", NOW), None);
        assert_eq!(year_of(new_year - 1), 2025);
        assert_eq!(year_of(new_year), 2026);
    }

    fn log(lines: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("maillog");
        std::fs::write(&path, lines).unwrap();
        (dir, path)
    }

    #[test]
    fn join_state_is_bounded_and_evictions_are_counted() {
        let mut text = String::new();
        for i in 0..5 {
            text +=
                &format!("Dec  2 03:00:00 mx postfix/smtpd[1]: AAAA{i}: client=a[192.0.2.{i}]\n");
        }
        // The oldest ids were dropped: their late deliveries are not joined.
        for i in 0..5 {
            text += &format!("Dec  2 03:00:01 mx postfix/qmgr[2]: AAAA{i}: from=<s@example.org>, size=1, nrcpt=1 (queue active)\n");
            text += &format!("Dec  2 03:00:02 mx postfix/smtp[3]: AAAA{i}: to=<r@example.net>, relay=x[192.0.2.99]:25, delay=1, dsn=2.0.0, status=sent (250 ok)\n");
        }
        let (_d, path) = log(&text);
        let o = ReadOptions {
            max_pending: 2,
            ..opts()
        };
        let v = all(&path, &o);
        let clients = items(&v).into_iter().map(|i| i.0).collect::<Vec<_>>();
        assert_eq!(clients, ["192.0.2.3", "192.0.2.4"]);
        let dropped = v
            .iter()
            .filter(|r| matches!(r, Err((Skip::NotDelivered, m)) if m.contains("dropped")))
            .count();
        assert_eq!(dropped, 3);

        // By age: a delivery more than pending_lines lines after its client= is not joined.
        let o = ReadOptions {
            pending_lines: 2,
            ..opts()
        };
        let text = "Dec  2 03:00:00 mx postfix/smtpd[1]: BBBB1: client=a[192.0.2.1]\n\
                    Dec  2 03:00:01 mx postfix/qmgr[2]: BBBB1: from=<>, size=1, nrcpt=1 (queue active)\n\
                    Dec  2 03:00:01 mx postfix/smtpd[1]: disconnect from a[192.0.2.1]\n\
                    Dec  2 03:00:02 mx postfix/local[3]: BBBB1: to=<r@example.net>, relay=local, status=sent (delivered)\n";
        let (_d, path) = log(text);
        assert!(items(&all(&path, &o)).is_empty());
        let o = ReadOptions {
            pending_lines: 3,
            ..opts()
        };
        assert_eq!(items(&all(&path, &o)).len(), 1);
    }

    #[test]
    fn lines_it_does_not_understand_are_counted_not_fatal() {
        let text = "garbage\n\
                    \n\
                    Dec  2 03:00:00 mx kernel: something\n\
                    Dec  2 03:00:00 mx postfix/smtpd[1]: CCCC1: client=a[192.0.2.1]:2525, sasl_method=PLAIN\n\
                    Dec  2 03:00:00 mx postfix/smtpd[1]: CCCC9: client=unknown[unknown]\n\
                    Dec  2 03:00:01 mx postfix-out/qmgr[2]: CCCC1: from=<a>b@example.org>, size=1, nrcpt=2 (queue active)\n\
                    Dec  2 03:00:02 mx postfix/smtp[3]: CCCC1: to=<x@example.net>, relay=none, delay=1, dsn=4.4.1, status=deferred (connect refused)\n\
                    Dec  2 03:00:02 mx postfix/local[3]: CCCC1: to=<u@mx.example>, orig_to=<Alias@example.net>, relay=local, delay=1, dsn=2.0.0, status=sent (delivered)\n\
                    Dec  2 03:00:03 mx postfix/qmgr[2]: CCCC1: removed\n\
                    Dec  2 03:00:03 mx postfix/qmgr[2]: DDDD1: removed\n\
                    Dec  2 03:00:04 mx postfix/smtpd[1]: EEEE1: client=localhost[127.0.0.1], orig_queue_id=X, orig_client=v6.example[2001:db8::25]\n\
                    Dec  2 03:00:04 mx postfix/smtpd[1]: FFFF1: client=localhost[127.0.0.1]\n\
                    Dec  2 03:00:04 mx postfix/qmgr[2]: EEEE1: from=<>, size=1, nrcpt=1 (queue active)\n\
                    Dec  2 03:00:05 mx postfix/lmtp[4]: EEEE1: to=<v@example.net>, relay=x, dsn=2.0.0, status=sent (250 ok)\n";
        let (_d, path) = log(text);
        let v = all(&path, &opts());
        let kinds = v
            .iter()
            .map(|r| match r {
                Ok(_) => "item",
                Err((s, _)) => s.name(),
            })
            .collect::<Vec<_>>();
        assert_eq!(
            kinds,
            [
                "unparsable",
                "unparsable",
                "unparsable",
                "bad-client",
                "not-delivered",
                "item",
                "not-delivered",
                "not-delivered",
                "item",
            ]
        );
        // orig_to is what the SMTP client gave; a `>` inside the sender is kept.
        let row = |c: &str, s: &str, r: &str, t| (c.into(), s.into(), r.into(), t);
        assert_eq!(
            items(&v),
            [
                row(
                    "192.0.2.1",
                    "a>b@example.org",
                    "Alias@example.net",
                    1_796_180_402
                ),
                row("2001:db8::25", "", "v@example.net", 1_796_180_405),
            ]
        );
    }

    #[test]
    fn a_corrupt_gz_rotation_stops_the_import_loudly() {
        let dir = tempfile::tempdir().unwrap();
        let gz = std::fs::read_dir(fixture_dir())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "gz"))
            .unwrap();
        let bytes = std::fs::read(gz).unwrap();
        // Cut in the middle of the compressed stream.
        std::fs::write(dir.path().join("maillog.1.gz"), &bytes[..bytes.len() / 2]).unwrap();
        std::fs::copy(fixture_dir().join("maillog"), dir.path().join("maillog")).unwrap();
        let mut r = read(&dir.path().join("maillog"), &opts()).unwrap();
        let v = r.by_ref().collect::<Vec<_>>();
        let (skip, why) = v.last().unwrap().clone().unwrap_err();
        assert_eq!(skip, Skip::Unparsable);
        assert!(why.contains("maillog.1.gz:"), "{why}");
        let err = r.failure().expect("failure recorded").to_string();
        assert!(err.contains("maillog.1.gz:"), "{err}");
        // Nothing of the next file was read after the failure.
        assert!(!items(&v).iter().any(|i| i.2 == "erin@example.net"));
    }

    #[test]
    fn rotations_are_found_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        for n in [
            "maillog",
            "maillog.1",
            "maillog.2.gz",
            "maillog.10",
            "maillog.20261201-000000.gz",
            "maillog.old",
            "other.1",
        ] {
            std::fs::write(dir.path().join(n), "").unwrap();
        }
        let files = with_rotations(&dir.path().join("maillog")).unwrap();
        let names = files
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap())
            .collect::<Vec<_>>();
        assert_eq!(
            names,
            [
                "maillog.20261201-000000.gz",
                "maillog.10",
                "maillog.2.gz",
                "maillog.1",
                "maillog"
            ]
        );
        assert_eq!(
            with_rotations(&dir.path().join("maillog.2.gz"))
                .unwrap()
                .len(),
            1
        );
    }
}
