//! Greyhound's native line protocol: one request per line, one reply per line.
//!
//! ```text
//! [ID ]CHECK <client-ip> <sender> <recipient> [helo=<name>] [name=<client-hostname>] [auth=<user>]
//!            [cert=<fingerprint>] [cert-subject=<name>] [body=<hex digest>]
//! [ID ]PEEK  <client-ip> <sender> <recipient> [same options as CHECK]
//! [ID ]PING
//!
//! [ID ]DEFER <seconds-left> <text>
//! [ID ]PASS <reason>
//! [ID ]PONG
//! [ID ]ERR <code> <text>
//! ```
//!
//! The codec is sans-IO so the same code serves TCP streams, UDP datagrams
//! and tests: [`parse`] looks at the front of a receive buffer, [`parse_line`]
//! at one line (a datagram), and [`encode`] / [`encode_within`] append a reply
//! to a caller's send buffer. It sits on the hot path, so parsing borrows
//! every string from the input and never allocates, and encoding only ever
//! grows the caller's `Vec`.

use super::push_clean;
use std::net::{IpAddr, Ipv6Addr};

/// Longest request line accepted, in bytes, not counting the `\n` or `\r\n`
/// terminator.
pub const MAX_LINE: usize = 1024;

/// Longest request ID, in ASCII digits. Twenty digits hold every `u64`, so a
/// client can number its requests with a plain counter.
pub const MAX_ID: usize = 20;

/// The greylisting triplet (plus the optional context) of a `CHECK` or `PEEK`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Triplet<'a> {
    /// Address of the SMTP client that wants to deliver.
    pub client: IpAddr,
    /// Envelope sender without angle brackets; `""` is the null sender `<>`.
    pub sender: &'a str,
    /// Envelope recipient without angle brackets; never empty.
    pub recipient: &'a str,
    /// `helo=` option: the name the client gave in HELO/EHLO.
    pub helo: Option<&'a str>,
    /// `name=` option: the client's verified reverse DNS name.
    pub name: Option<&'a str>,
    /// `auth=` option: the SASL user name if the client authenticated.
    pub auth: Option<&'a str>,
    /// `cert=` option: the fingerprint of the client's TLS certificate (or of its public key).
    pub cert: Option<&'a str>,
    /// `cert-subject=` option: the verified subject (common name) of that certificate.
    pub cert_subject: Option<&'a str>,
    /// `body=` option (DATA stage): a hex digest of the message, [`MIN_BODY`] to [`MAX_BODY`]
    /// hex digits of either case. When present the greylisting triplet is (client, sender,
    /// digest), so one message to many recipients is one record.
    pub body: Option<&'a str>,
}

/// Fewest hex digits in a `body=` digest: 64 bits, below which unrelated messages would
/// share records.
pub const MIN_BODY: usize = 16;

/// Most hex digits in a `body=` digest: 512 bits (SHA-512).
pub const MAX_BODY: usize = 128;

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command<'a> {
    /// Decide on the triplet and record the attempt.
    Check(Triplet<'a>),
    /// Decide on the triplet without recording anything.
    Peek(Triplet<'a>),
    /// Liveness probe, answered `PONG`.
    Ping,
}

/// One parsed request line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request<'a> {
    /// The client's request ID (1–20 ASCII digits), to be echoed in the reply.
    pub id: Option<&'a str>,
    /// What the client asks for.
    pub command: Command<'a>,
}

/// Why a line was refused; each has a stable short code used on the wire
/// (`as_code()`) and a short human text (`text()`, also its `Display`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ErrorKind {
    /// The line is longer than the line limit.
    #[error("{}", self.text())]
    TooLong,
    /// The line is not valid UTF-8.
    #[error("{}", self.text())]
    BadUtf8,
    /// The line holds a control character (other than tab) or DEL.
    #[error("{}", self.text())]
    Control,
    /// The line is empty or only whitespace.
    #[error("{}", self.text())]
    Empty,
    /// The verb is none of `CHECK`, `PEEK`, `PING`.
    #[error("{}", self.text())]
    UnknownVerb,
    /// Wrong number of arguments for the verb.
    #[error("{}", self.text())]
    BadArgs,
    /// The ID has more than [`MAX_ID`] digits.
    #[error("{}", self.text())]
    BadId,
    /// The client IP address does not parse.
    #[error("{}", self.text())]
    BadIp,
    /// The sender or recipient is malformed (unbalanced brackets, empty recipient).
    #[error("{}", self.text())]
    BadAddress,
    /// An option key is unknown, empty or repeated.
    #[error("{}", self.text())]
    BadOption,
}

impl ErrorKind {
    /// Every kind, in declaration order; handy for metrics labels and tests.
    pub const ALL: [ErrorKind; 10] = [
        ErrorKind::TooLong,
        ErrorKind::BadUtf8,
        ErrorKind::Control,
        ErrorKind::Empty,
        ErrorKind::UnknownVerb,
        ErrorKind::BadArgs,
        ErrorKind::BadId,
        ErrorKind::BadIp,
        ErrorKind::BadAddress,
        ErrorKind::BadOption,
    ];

    /// The stable machine-readable code sent after `ERR`; clients may match on it.
    #[must_use]
    pub const fn as_code(self) -> &'static str {
        match self {
            ErrorKind::TooLong => "too-long",
            ErrorKind::BadUtf8 => "bad-utf8",
            ErrorKind::Control => "control-char",
            ErrorKind::Empty => "empty",
            ErrorKind::UnknownVerb => "unknown-verb",
            ErrorKind::BadArgs => "bad-args",
            ErrorKind::BadId => "bad-id",
            ErrorKind::BadIp => "bad-ip",
            ErrorKind::BadAddress => "bad-address",
            ErrorKind::BadOption => "bad-option",
        }
    }

    /// Short human text sent after the code; may change between versions.
    #[must_use]
    pub const fn text(self) -> &'static str {
        match self {
            // No number: the limit is the server's `max-line`, 1024 bytes by default.
            ErrorKind::TooLong => "line longer than max-line",
            ErrorKind::BadUtf8 => "line is not valid UTF-8",
            ErrorKind::Control => "control character in line",
            ErrorKind::Empty => "empty line",
            ErrorKind::UnknownVerb => "unknown verb, expected CHECK, PEEK or PING",
            ErrorKind::BadArgs => "wrong number of arguments",
            ErrorKind::BadId => "ID must be 1 to 20 digits",
            ErrorKind::BadIp => "malformed client IP address",
            ErrorKind::BadAddress => "malformed sender or recipient",
            ErrorKind::BadOption => "unknown, empty or repeated option",
        }
    }
}

/// A refused line: what was wrong, and the ID to echo so the client can
/// match the `ERR` reply (UDP answers may arrive out of order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineError<'a> {
    /// The line's ID, if its first token was a valid ID.
    pub id: Option<&'a str>,
    /// Why the line was refused.
    pub kind: ErrorKind,
}

/// Result of looking at the front of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    /// No complete line yet and the line can still be valid: read more.
    Incomplete,
    /// One complete line, parsed or refused. A line that is too long but whose
    /// terminator is already buffered also comes back here, as
    /// [`ErrorKind::TooLong`], so the caller needs no discard state for it.
    Line {
        /// Bytes to drop from the buffer, terminator included.
        consumed: usize,
        /// The request, or why it was refused (answer `ERR`, keep serving).
        parsed: Result<Request<'a>, LineError<'a>>,
    },
    /// More than `max_line` bytes without a terminator: the caller answers
    /// `ERR too-long` once, drops `consumed` bytes, then feeds what follows to
    /// [`skip_line`] until it reports the line end.
    TooLong {
        /// Bytes to drop now; they never include a `\n`, so the rest of the
        /// line is still ahead for [`skip_line`].
        consumed: usize,
    },
}

/// Looks for one line at the front of `buf`, accepting lines of at most
/// `max_line` bytes (normally [`MAX_LINE`]) before the `\n` or `\r\n`.
///
/// Never scans more than `max_line + 2` bytes, so a flood without newlines
/// costs no more than one maximal line.
#[must_use]
pub fn parse(buf: &[u8], max_line: usize) -> Frame<'_> {
    // A maximal line plus "\r\n" is the longest prefix that can still be valid.
    let window = &buf[..buf.len().min(max_line.saturating_add(2))];
    if let Some(end) = memchr::memchr(b'\n', window) {
        let line = strip_cr(&buf[..end]);
        let parsed = if line.len() > max_line {
            Err(too_long(&line[..max_line + 1]))
        } else {
            parse_line(line)
        };
        return Frame::Line {
            consumed: end + 1,
            parsed,
        };
    }
    // No terminator in view. Byte `max_line` may only be the '\r' of a
    // "\r\n" whose '\n' has not arrived yet; anything else proves the line
    // too long without waiting for more input.
    let too_long = match buf.get(max_line) {
        None => false,
        Some(&b'\r') => buf.len() > max_line + 1,
        Some(_) => true,
    };
    if too_long {
        Frame::TooLong {
            consumed: window.len(),
        }
    } else {
        Frame::Incomplete
    }
}

/// A parsed line, or why it was refused: what a transport hands on to be answered, in order.
pub type Parsed<'a> = Result<Request<'a>, LineError<'a>>;

/// What [`LineFramer::next`] found at the front of a stream's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framed<'a> {
    /// One request line, parsed or refused: answer it (`ERR` for a refusal) and go on.
    Line(Parsed<'a>),
    /// Bytes of an over-long line were dropped; call again.
    Skipped,
    /// No complete line: read more.
    NeedMore,
}

/// Cuts a byte stream (TCP) into request lines. It remembers one thing between reads: that it
/// is dropping the rest of a line longer than the limit, whose `ERR too-long` has been given.
/// [`datagram_lines`] cuts a datagram the same way, so both transports answer a given line
/// identically.
#[derive(Debug, Clone, Default)]
pub struct LineFramer {
    skipping: bool,
}

impl LineFramer {
    /// Looks at the front of `buf` (lines of at most `max_line` bytes); returns how many bytes
    /// to drop from it and what they held. At end of input (`eof`), a last line without its
    /// `\n` still counts (Exim's `readsocket` sends one).
    pub fn next<'a>(&mut self, buf: &'a [u8], max_line: usize, eof: bool) -> (usize, Framed<'a>) {
        if self.skipping {
            let (n, found) = skip_line(buf);
            self.skipping = !found;
            return (
                n,
                if n == 0 {
                    Framed::NeedMore
                } else {
                    Framed::Skipped
                },
            );
        }
        match parse(buf, max_line) {
            Frame::Incomplete if eof && !buf.is_empty() => {
                (buf.len(), Framed::Line(parse_line(strip_cr(buf))))
            }
            Frame::Incomplete => (0, Framed::NeedMore),
            Frame::Line { consumed, parsed } => (consumed, Framed::Line(parsed)),
            Frame::TooLong { consumed } => {
                self.skipping = true;
                // `parse` saw at least `max_line + 1` bytes, as it does for a line whose end is
                // buffered: both refuse with what those bytes say.
                (consumed, Framed::Line(Err(too_long(&buf[..max_line + 1]))))
            }
        }
    }
}

/// The request lines of one datagram, in order: a datagram carries whole lines, the last one
/// with or without its `\n`; each is limited to `max_line` bytes like a line on TCP.
pub fn datagram_lines(data: &[u8], max_line: usize) -> impl Iterator<Item = Parsed<'_>> {
    let body = data.strip_suffix(b"\n").unwrap_or(data);
    body.split(|&b| b == b'\n').map(move |line| {
        let line = strip_cr(line);
        if line.len() > max_line {
            Err(too_long(&line[..max_line + 1]))
        } else {
            parse_line(line)
        }
    })
}

/// After [`Frame::TooLong`]: drop input until the end of that line. Returns
/// (bytes to drop, whether the line end was found); while it is `false`,
/// drop everything and call again with the next bytes read.
#[must_use]
pub fn skip_line(buf: &[u8]) -> (usize, bool) {
    match memchr::memchr(b'\n', buf) {
        Some(end) => (end + 1, true),
        None => (buf.len(), false),
    }
}

/// The refusal of a line longer than the limit, given its first bytes (the transports pass
/// the first `max_line + 1`, which a stream always has at hand when it gives up on a line): the
/// ID is echoed when the line starts with a valid one, so a UDP client can still match the
/// answer. Only an ID seen whole counts, one followed by a blank within `start`: digits running
/// to its end may go on beyond it, and a stream that echoed them would name another request
/// than the datagram carrying the same line.
#[must_use]
pub fn too_long(start: &[u8]) -> LineError<'_> {
    let last_blank = start.iter().rposition(|&b| b == b' ' || b == b'\t');
    LineError {
        id: last_blank.and_then(|at| leading_id(&start[..at])),
        kind: ErrorKind::TooLong,
    }
}

/// Parses one line without its terminator (used by [`parse`], and for UDP,
/// where a datagram may end without `\n`: strip an optional trailing `\n` /
/// `\r\n` and check the length against [`MAX_LINE`] first, since this
/// function applies no length limit of its own).
///
/// # Errors
///
/// A [`LineError`] carrying the kind of fault and, when the line's first
/// token is a valid ID, that ID, so the `ERR` reply can echo it.
pub fn parse_line(line: &[u8]) -> Result<Request<'_>, LineError<'_>> {
    // The ID is only looked for again on the (rare) error path.
    let fail = |kind| LineError {
        id: leading_id(line),
        kind,
    };
    // Checked on bytes before UTF-8 so a CR or NUL is reported as such.
    // A fold without early exit vectorises; refused lines are rare.
    if line.iter().fold(false, |bad, &b| bad | is_forbidden(b)) {
        return Err(fail(ErrorKind::Control));
    }
    let text = std::str::from_utf8(line).map_err(|_| fail(ErrorKind::BadUtf8))?;
    // Control bytes are gone, so ASCII whitespace here means spaces and tabs.
    let mut tokens = Tokens(text);
    let first = tokens.next().ok_or_else(|| fail(ErrorKind::Empty))?;
    // No verb is made of digits, so a digits-only first token is the ID.
    let (id, verb) = if is_digits(first) {
        if first.len() > MAX_ID {
            return Err(fail(ErrorKind::BadId));
        }
        let verb = tokens.next().ok_or_else(|| fail(ErrorKind::BadArgs))?;
        (Some(first), verb)
    } else {
        (None, first)
    };
    let command = if verb.eq_ignore_ascii_case("CHECK") {
        Command::Check(parse_triplet(tokens).map_err(fail)?)
    } else if verb.eq_ignore_ascii_case("PEEK") {
        Command::Peek(parse_triplet(tokens).map_err(fail)?)
    } else if verb.eq_ignore_ascii_case("PING") {
        if tokens.next().is_some() {
            return Err(fail(ErrorKind::BadArgs));
        }
        Command::Ping
    } else {
        return Err(fail(ErrorKind::UnknownVerb));
    };
    Ok(Request { id, command })
}

/// Parses `<client-ip> <sender> <recipient> [key=value ...]`. The shape of the
/// line (argument count, options) is checked before the contents, so a client
/// that mixed up the argument order hears `bad-args` rather than a misleading
/// `bad-ip`.
fn parse_triplet(mut tokens: Tokens<'_>) -> Result<Triplet<'_>, ErrorKind> {
    let (Some(ip), Some(sender), Some(recipient)) = (tokens.next(), tokens.next(), tokens.next())
    else {
        return Err(ErrorKind::BadArgs);
    };
    let (mut helo, mut name, mut auth) = (None, None, None);
    let (mut cert, mut cert_subject, mut body) = (None, None, None);
    for token in tokens {
        // A fourth bare word is an extra argument, not an option.
        let (key, value) = token.split_once('=').ok_or(ErrorKind::BadArgs)?;
        let slot = if key.eq_ignore_ascii_case("helo") {
            &mut helo
        } else if key.eq_ignore_ascii_case("name") {
            &mut name
        } else if key.eq_ignore_ascii_case("auth") {
            &mut auth
        } else if key.eq_ignore_ascii_case("cert") {
            &mut cert
        } else if key.eq_ignore_ascii_case("cert-subject") {
            &mut cert_subject
        } else if key.eq_ignore_ascii_case("body") {
            // A digest that is not one is refused here, so the engine can hash it as given.
            if !is_digest(value) {
                return Err(ErrorKind::BadOption);
            }
            &mut body
        } else {
            return Err(ErrorKind::BadOption);
        };
        // Refused rather than "last wins": two values mean a confused client.
        if slot.is_some() {
            return Err(ErrorKind::BadOption);
        }
        *slot = Some(value);
    }
    let client = parse_ip(ip).ok_or(ErrorKind::BadIp)?;
    let sender = parse_address(sender).ok_or(ErrorKind::BadAddress)?;
    let recipient = parse_address(recipient)
        .filter(|r| !r.is_empty())
        .ok_or(ErrorKind::BadAddress)?;
    Ok(Triplet {
        client,
        sender,
        recipient,
        helo,
        name,
        auth,
        cert,
        cert_subject,
        body,
    })
}

/// Whether `value` is a `body=` digest: [`MIN_BODY`] to [`MAX_BODY`] hex digits.
fn is_digest(value: &str) -> bool {
    (MIN_BODY..=MAX_BODY).contains(&value.len()) && value.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Plain IPv4/IPv6 as std parses them (no zone ids), or IPv6 in brackets as
/// in SMTP address literals. Brackets exist to fence IPv6 colons, so
/// `[192.0.2.1]` is refused as a sign of a confused client.
fn parse_ip(token: &str) -> Option<IpAddr> {
    match token.strip_prefix('[') {
        Some(rest) => rest
            .strip_suffix(']')?
            .parse::<Ipv6Addr>()
            .ok()
            .map(IpAddr::V6),
        None => dotted_quad(token.as_bytes())
            .map(IpAddr::V4)
            .or_else(|| token.parse().ok()),
    }
}

/// A plain dotted-quad IPv4 address (four decimal octets, no leading zeros), read directly:
/// `IpAddr::from_str` tries IPv4 and IPv6 through a general parser at ~340 instructions per
/// address (callgrind). Anything else, or anything this does not take, goes to the standard
/// parser, so no address is read differently (a proptest compares the two).
fn dotted_quad(s: &[u8]) -> Option<std::net::Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut n = 0;
    for part in s.split(|&b| b == b'.') {
        let leading_zero = part.len() > 1 && part[0] == b'0';
        if n == 4 || part.is_empty() || part.len() > 3 || leading_zero {
            return None;
        }
        let mut v = 0u32;
        for &c in part {
            if !c.is_ascii_digit() {
                return None;
            }
            v = v * 10 + u32::from(c - b'0');
        }
        octets[n] = u8::try_from(v).ok()?;
        n += 1;
    }
    (n == 4).then_some(std::net::Ipv4Addr::from(octets))
}

/// `a@b` or `<a@b>` → `a@b`, `<>` → `""`. Any other `<` or `>` means
/// unbalanced or nested brackets.
fn parse_address(token: &str) -> Option<&str> {
    let inner = match token.strip_prefix('<') {
        Some(rest) => rest.strip_suffix('>')?,
        None => token,
    };
    if inner
        .bytes()
        .fold(false, |b, c| b | (c == b'<') | (c == b'>'))
    {
        None
    } else {
        Some(inner)
    }
}

/// The first token if it is a valid ID, found on raw bytes so that errors
/// caught before tokenizing (control characters, bad UTF-8, length) still
/// echo it.
fn leading_id(line: &[u8]) -> Option<&str> {
    let is_blank = |b: &u8| *b == b' ' || *b == b'\t';
    let start = line.iter().position(|b| !is_blank(b))?;
    let rest = &line[start..];
    let token = &rest[..rest.iter().position(is_blank).unwrap_or(rest.len())];
    if (1..=MAX_ID).contains(&token.len()) && token.iter().all(u8::is_ascii_digit) {
        std::str::from_utf8(token).ok()
    } else {
        None
    }
}

/// The words of a line that holds no control character but tab: runs of bytes between spaces
/// and tabs (`str::split_ascii_whitespace` checks for five kinds of whitespace per character).
#[derive(Debug, Clone)]
struct Tokens<'a>(&'a str);

impl<'a> Iterator for Tokens<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let bytes = self.0.as_bytes();
        // Words are usually one blank apart: the blanks are skipped byte by byte, the word's
        // end is searched for with `memchr2` (addresses run to 40 bytes and more).
        let start = bytes.iter().position(|&b| b != b' ' && b != b'\t')?;
        let len = memchr::memchr2(b' ', b'\t', &bytes[start..]).unwrap_or(bytes.len() - start);
        // Spaces and tabs are ASCII, so both cuts are at character boundaries.
        let token = &self.0[start..start + len];
        self.0 = &self.0[start + len..];
        Some(token)
    }
}

fn is_digits(token: &str) -> bool {
    token.bytes().all(|b| b.is_ascii_digit())
}

/// C0 controls except tab (a separator) and DEL are refused anywhere in a line.
#[inline]
fn is_forbidden(b: u8) -> bool {
    ((b < 0x20) & (b != b'\t')) | (b == 0x7f)
}

fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// A reply to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply<'a> {
    /// Greylisted: try again later.
    Defer {
        /// Seconds until a retry would be accepted.
        seconds: u32,
        /// Human text (the expanded greylist template); may be shortened.
        text: &'a str,
    },
    /// Accepted.
    Pass {
        /// Machine-readable reason: `retried`, `known`, `awl`, `exempt:<list>`, `auth`,
        /// `tls`, `domain-off` or `dry-run`; never shortened.
        reason: &'a str,
    },
    /// Answer to `PING`.
    Pong,
    /// The request was refused; the connection stays open.
    Err {
        /// Why; sent as `<code> <human text>`.
        kind: ErrorKind,
    },
}

/// A reply split into what may never be shortened and what may.
struct Parts<'r> {
    keyword: &'static str,
    /// Sent after one space unless empty; never cut.
    fixed: &'r str,
    /// Sent after one space unless empty; cut first when space is short.
    text: &'r str,
}

impl<'r> Parts<'r> {
    fn of(reply: &Reply<'r>, digits: &'r mut [u8; 20]) -> Self {
        match *reply {
            Reply::Defer { seconds, text } => Parts {
                keyword: "DEFER",
                fixed: format_u32(seconds, digits),
                text,
            },
            Reply::Pass { reason } => Parts {
                keyword: "PASS",
                fixed: reason,
                text: "",
            },
            Reply::Pong => Parts {
                keyword: "PONG",
                fixed: "",
                text: "",
            },
            Reply::Err { kind } => Parts {
                keyword: "ERR",
                fixed: kind.as_code(),
                text: kind.text(),
            },
        }
    }
}

/// Appends `[ID ]<reply>\n`. `ERR` lines are `ERR <code> <human text>`.
/// Control characters in any text are replaced by a space so one reply is
/// always one line; an empty text leaves no trailing space.
pub fn encode(id: Option<&str>, reply: &Reply<'_>, out: &mut Vec<u8>) {
    // With an unlimited budget every reply fits, so the result carries no news.
    let _always_fits = encode_within(id, reply, usize::MAX, out);
}

/// Like [`encode`], but the encoded line (with `\n`) must fit in `budget`
/// bytes. The `DEFER`/`ERR` human text is shortened at a UTF-8 character
/// boundary, down to nothing (`[ID ]DEFER <seconds>\n`, `[ID ]ERR <code>\n`);
/// returns `false` and appends nothing if even the shortest form does not
/// fit. This keeps UDP replies no larger than their request (no
/// amplification).
#[must_use]
pub fn encode_within(
    id: Option<&str>,
    reply: &Reply<'_>,
    budget: usize,
    out: &mut Vec<u8>,
) -> bool {
    encode_line(id, reply, budget, out).is_some()
}

/// Appends `[ID ]<reply>\n` as [`encode`] does and returns the length of the line's head: the
/// line without its human text (and the space before it) and without the `\n`. The head and a
/// `\n` make the reply's shortest form, which [`encode_within`] sends when room is short; the
/// UDP server encodes each reply once this way and cuts the shortest form from it.
pub fn encode_split(id: Option<&str>, reply: &Reply<'_>, out: &mut Vec<u8>) -> usize {
    // With an unlimited budget every reply fits.
    encode_line(id, reply, usize::MAX, out).unwrap_or(0)
}

/// [`encode_within`], returning the head length (see [`encode_split`]) when the line fits.
fn encode_line(
    id: Option<&str>,
    reply: &Reply<'_>,
    budget: usize,
    out: &mut Vec<u8>,
) -> Option<usize> {
    let mut digits = [0u8; 20];
    let parts = Parts::of(reply, &mut digits);
    // An empty ID would start the line with a space; treat it as absent.
    let id = id.filter(|id| !id.is_empty());
    let id_len = id.map_or(0, |id| clean_len(id) + 1);
    let fixed_len = if parts.fixed.is_empty() {
        0
    } else {
        1 + clean_len(parts.fixed)
    };
    let shortest = id_len + parts.keyword.len() + fixed_len + 1;
    if shortest > budget {
        return None;
    }
    if let Some(id) = id {
        push_clean(id, usize::MAX, out);
        out.push(b' ');
    }
    out.extend_from_slice(parts.keyword.as_bytes());
    if !parts.fixed.is_empty() {
        out.push(b' ');
        push_clean(parts.fixed, usize::MAX, out);
    }
    // What is left of the budget pays for the separating space and the text.
    let room = budget - shortest;
    if !parts.text.is_empty() && room > 1 {
        out.push(b' ');
        if push_clean(parts.text, room - 1, out) == 0 {
            // Not even the first character fitted: no dangling space.
            out.pop();
        }
    }
    out.push(b'\n');
    Some(shortest - 1)
}

/// Length of `text` once control characters are replaced by one space each.
fn clean_len(text: &str) -> usize {
    if super::is_printable_ascii(text.as_bytes()) {
        return text.len();
    }
    text.chars()
        .map(|c| if c.is_control() { 1 } else { c.len_utf8() })
        .sum()
}

/// Decimal digits of `n` written into a stack buffer, so encoding numbers
/// never allocates.
fn format_u32(n: u32, buf: &mut [u8; 20]) -> &str {
    let at = super::decimal(u64::from(n), buf);
    // Only ASCII digits were written, so this cannot fail.
    std::str::from_utf8(&buf[at..]).unwrap_or("0")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    }

    fn ok(line: &str) -> Request<'_> {
        parse_line(line.as_bytes()).unwrap_or_else(|e| panic!("{line:?} refused: {e:?}"))
    }

    fn kind(line: &[u8]) -> ErrorKind {
        parse_line(line).expect_err("line should be refused").kind
    }

    fn triplet(line: &str) -> Triplet<'_> {
        match ok(line).command {
            Command::Check(t) | Command::Peek(t) => t,
            Command::Ping => panic!("{line:?} is a PING"),
        }
    }

    fn enc(id: Option<&str>, reply: Reply<'_>) -> String {
        let mut out = Vec::new();
        encode(id, &reply, &mut out);
        String::from_utf8(out).unwrap()
    }

    fn enc_within(id: Option<&str>, reply: Reply<'_>, budget: usize) -> Option<String> {
        let mut out = b"old".to_vec();
        let fits = encode_within(id, &reply, budget, &mut out);
        assert_eq!(&out[..3], b"old", "earlier output must be kept");
        if fits {
            assert!(out.len() - 3 <= budget, "line exceeds budget {budget}");
            Some(String::from_utf8(out[3..].to_vec()).unwrap())
        } else {
            assert_eq!(out, b"old", "nothing may be appended when it does not fit");
            None
        }
    }

    /// A CHECK line of exactly `len` bytes: the recipient's local part pads it.
    fn check_line_of(len: usize) -> String {
        let head = "CHECK 192.0.2.1 a@b.example ";
        let tail = "@d.example";
        let pad = len - head.len() - tail.len();
        let line = format!("{head}{}{tail}", "r".repeat(pad));
        assert_eq!(line.len(), len);
        line
    }

    #[test]
    fn round_trip_check_with_all_options() {
        let t = Triplet {
            client: v4(192, 0, 2, 1),
            sender: "alice@a.example",
            recipient: "bob@b.example",
            helo: Some("mx.a.example"),
            name: Some("mail.a.example"),
            auth: Some("alice"),
            cert: Some("C2:9D:F4:87:71:73:73:D9:18:E7:C2:F3:C1:DA:6E:04"),
            cert_subject: Some("mx.a.example"),
            body: Some("9F86D081884C7D659A2FEAA0C55AD015"),
        };
        // Written by hand the way a client would, then parsed back.
        let line = format!(
            "17 CHECK {} <{}> <{}> helo={} name={} auth={} cert={} cert-subject={} body={}",
            t.client,
            t.sender,
            t.recipient,
            t.helo.unwrap(),
            t.name.unwrap(),
            t.auth.unwrap(),
            t.cert.unwrap(),
            t.cert_subject.unwrap(),
            t.body.unwrap()
        );
        assert_eq!(
            ok(&line),
            Request {
                id: Some("17"),
                command: Command::Check(t)
            }
        );
    }

    #[test]
    fn peek_accepts_options_and_bare_addresses() {
        assert_eq!(
            ok("PEEK 198.51.100.7 a@b c@d auth=carol"),
            Request {
                id: None,
                command: Command::Peek(Triplet {
                    client: v4(198, 51, 100, 7),
                    sender: "a@b",
                    recipient: "c@d",
                    helo: None,
                    name: None,
                    auth: Some("carol"),
                    cert: None,
                    cert_subject: None,
                    body: None,
                })
            }
        );
    }

    #[test]
    fn ping_with_and_without_id() {
        assert_eq!(
            ok("PING"),
            Request {
                id: None,
                command: Command::Ping
            }
        );
        assert_eq!(
            ok("0042 PING"),
            Request {
                id: Some("0042"),
                command: Command::Ping
            }
        );
    }

    #[test]
    fn verbs_are_case_insensitive() {
        assert_eq!(ok("ping").command, Command::Ping);
        assert_eq!(ok("Ping").command, Command::Ping);
        assert!(matches!(
            ok("check 192.0.2.1 a b").command,
            Command::Check(_)
        ));
        assert!(matches!(
            ok("Check 192.0.2.1 a b").command,
            Command::Check(_)
        ));
        assert!(matches!(ok("pEeK 192.0.2.1 a b").command, Command::Peek(_)));
    }

    #[test]
    fn option_keys_are_case_insensitive() {
        assert_eq!(triplet("CHECK 192.0.2.1 a b HELO=x").helo, Some("x"));
    }

    #[test]
    fn spaces_and_tabs_separate_tokens() {
        let t = triplet(" \tCHECK \t 192.0.2.1\t\ta@b   c@d\thelo=h \t");
        assert_eq!(t.client, v4(192, 0, 2, 1));
        assert_eq!(t.sender, "a@b");
        assert_eq!(t.recipient, "c@d");
        assert_eq!(t.helo, Some("h"));
    }

    #[test]
    fn null_sender_and_brackets() {
        assert_eq!(triplet("CHECK 192.0.2.1 <> c@d").sender, "");
        assert_eq!(triplet("CHECK 192.0.2.1 <a@b> <c@d>").sender, "a@b");
        assert_eq!(triplet("CHECK 192.0.2.1 <a@b> <c@d>").recipient, "c@d");
        // Postmaster without a domain is still an address.
        assert_eq!(
            triplet("CHECK 192.0.2.1 <> postmaster").recipient,
            "postmaster"
        );
    }

    #[test]
    fn bad_addresses() {
        for line in [
            "CHECK 192.0.2.1 <a@b c@d",
            "CHECK 192.0.2.1 a@b> c@d",
            "CHECK 192.0.2.1 < c@d",
            "CHECK 192.0.2.1 <<a@b>> c@d",
            "CHECK 192.0.2.1 a<b@c c@d",
            "CHECK 192.0.2.1 a@b <c@d",
            "CHECK 192.0.2.1 a@b <>",
        ] {
            assert_eq!(kind(line.as_bytes()), ErrorKind::BadAddress, "{line}");
        }
    }

    #[test]
    fn ip_addresses() {
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(triplet("CHECK 2001:db8::1 a b").client, v6);
        assert_eq!(triplet("CHECK [2001:db8::1] a b").client, v6);
        assert_eq!(
            triplet("CHECK ::ffff:192.0.2.1 a b").client,
            "::ffff:192.0.2.1".parse::<IpAddr>().unwrap()
        );
        for bad in [
            "300.1.2.3",
            "1.2.3",
            "01.2.3.4",
            "fe80::1%eth0",
            "[fe80::1%eth0]",
            "[2001:db8::1",
            "2001:db8::1]",
            "[192.0.2.1]",
            "[]",
            "localhost",
        ] {
            let line = format!("CHECK {bad} a b");
            assert_eq!(kind(line.as_bytes()), ErrorKind::BadIp, "{bad}");
        }
    }

    #[test]
    fn body_digest() {
        let hex64 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        let line = format!("CHECK 192.0.2.1 a@b c@d body={hex64}");
        assert_eq!(triplet(&line).body, Some(hex64));
        // Either case, as given (the engine lower-cases); the key is case-insensitive.
        let upper = hex64.to_ascii_uppercase();
        let line = format!("CHECK 192.0.2.1 a@b c@d BODY={upper}");
        assert_eq!(triplet(&line).body, Some(upper.as_str()));
        // The bounds: 16 and 128 digits pass, 15 and 129 do not.
        for n in [MIN_BODY, MAX_BODY] {
            let line = format!("CHECK 192.0.2.1 a@b c@d body={}", "a".repeat(n));
            assert_eq!(triplet(&line).body.map(str::len), Some(n));
        }
        for n in [0, 1, MIN_BODY - 1, MAX_BODY + 1, 200] {
            let line = format!("CHECK 192.0.2.1 a@b c@d body={}", "a".repeat(n));
            assert_eq!(kind(line.as_bytes()), ErrorKind::BadOption, "{n}");
        }
        // Not hex: a 'g', a base64 '+', a '0x' prefix, a separator.
        for bad in [
            "0123456789abcdeg",
            "0123456789abcde+",
            "0x0123456789abcdef",
            "01:23:45:67:89:ab:cd:ef",
        ] {
            let line = format!("CHECK 192.0.2.1 a@b c@d body={bad}");
            assert_eq!(kind(line.as_bytes()), ErrorKind::BadOption, "{bad}");
        }
        // Twice, even the same value, is a confused client.
        let line = format!("CHECK 192.0.2.1 a@b c@d body={hex64} Body={hex64}");
        assert_eq!(kind(line.as_bytes()), ErrorKind::BadOption);
        // PEEK takes it too.
        let line = format!("PEEK 192.0.2.1 a@b c@d body={hex64}");
        assert!(matches!(
            ok(&line).command,
            Command::Peek(Triplet { body: Some(_), .. })
        ));
    }

    #[test]
    fn options() {
        // The value is everything after the first '=' and may be empty.
        assert_eq!(triplet("CHECK 192.0.2.1 a b auth=u=v").auth, Some("u=v"));
        assert_eq!(triplet("CHECK 192.0.2.1 a b helo=").helo, Some(""));
        assert_eq!(kind(b"CHECK 192.0.2.1 a b foo=1"), ErrorKind::BadOption);
        assert_eq!(kind(b"CHECK 192.0.2.1 a b =1"), ErrorKind::BadOption);
        assert_eq!(
            kind(b"CHECK 192.0.2.1 a b helo=x helo=x"),
            ErrorKind::BadOption
        );
        assert_eq!(
            kind(b"CHECK 192.0.2.1 a b name=x NAME=y"),
            ErrorKind::BadOption
        );
        assert_eq!(kind(b"PEEK 192.0.2.1 a b bogus=1"), ErrorKind::BadOption);
        // The certificate options, parsed like the others (a subject is one word).
        let t = triplet("CHECK 192.0.2.1 a b CERT=ab:cd cert-subject=mx.example");
        assert_eq!(
            (t.cert, t.cert_subject),
            (Some("ab:cd"), Some("mx.example"))
        );
        assert_eq!(
            kind(b"CHECK 192.0.2.1 a b cert=x Cert=y"),
            ErrorKind::BadOption
        );
        assert_eq!(
            kind(b"CHECK 192.0.2.1 a b cert-subject=x cert-subject=x"),
            ErrorKind::BadOption
        );
        assert_eq!(kind(b"CHECK 192.0.2.1 a b certs=x"), ErrorKind::BadOption);
        assert_eq!(
            kind(b"CHECK 192.0.2.1 a b cert-subject=Mail Relay"),
            ErrorKind::BadArgs
        );
    }

    #[test]
    fn argument_counts() {
        assert_eq!(kind(b"CHECK"), ErrorKind::BadArgs);
        assert_eq!(kind(b"CHECK 192.0.2.1"), ErrorKind::BadArgs);
        assert_eq!(kind(b"CHECK 192.0.2.1 a"), ErrorKind::BadArgs);
        assert_eq!(kind(b"CHECK 192.0.2.1 a b extra"), ErrorKind::BadArgs);
        assert_eq!(kind(b"PEEK 192.0.2.1 a"), ErrorKind::BadArgs);
        assert_eq!(kind(b"PING now"), ErrorKind::BadArgs);
        // Shape before content: a bad IP with too few arguments is bad-args.
        assert_eq!(kind(b"CHECK a@b c@d"), ErrorKind::BadArgs);
        // An ID with no verb.
        assert_eq!(kind(b"12"), ErrorKind::BadArgs);
    }

    #[test]
    fn every_error_kind_is_reachable() {
        let long = check_line_of(MAX_LINE + 1) + "\n";
        let Frame::Line {
            parsed: Err(too_long),
            ..
        } = parse(long.as_bytes(), MAX_LINE)
        else {
            panic!("expected a refused line");
        };
        let cases: [(ErrorKind, &[u8]); 9] = [
            (ErrorKind::BadUtf8, b"CHECK 192.0.2.1 a\xff@b c@d"),
            (ErrorKind::Control, b"CHECK 192.0.2.1 a\0b c@d"),
            (ErrorKind::Empty, b""),
            (ErrorKind::UnknownVerb, b"HELLO"),
            (ErrorKind::BadArgs, b"CHECK 192.0.2.1 a@b"),
            (ErrorKind::BadId, b"123456789012345678901 PING"),
            (ErrorKind::BadIp, b"CHECK 192.0.2.300 a@b c@d"),
            (ErrorKind::BadAddress, b"CHECK 192.0.2.1 <a@b c@d"),
            (ErrorKind::BadOption, b"CHECK 192.0.2.1 a@b c@d x=1"),
        ];
        let mut seen = vec![too_long.kind];
        for (want, line) in cases {
            assert_eq!(kind(line), want, "{}", String::from_utf8_lossy(line));
            seen.push(want);
        }
        assert_eq!(seen, ErrorKind::ALL);
    }

    #[test]
    fn empty_and_blank_lines() {
        assert_eq!(kind(b""), ErrorKind::Empty);
        assert_eq!(kind(b"   "), ErrorKind::Empty);
        assert_eq!(kind(b" \t "), ErrorKind::Empty);
    }

    #[test]
    fn unknown_verbs() {
        assert_eq!(kind(b"HELO x"), ErrorKind::UnknownVerb);
        assert_eq!(kind(b"12a PING"), ErrorKind::UnknownVerb);
        assert_eq!(kind(b"1 2 PING"), ErrorKind::UnknownVerb);
    }

    #[test]
    fn control_characters() {
        assert_eq!(kind(b"CHECK 192.0.2.1 a\rb c@d"), ErrorKind::Control);
        assert_eq!(kind(b"CHECK 192.0.2.1 a@b c@d\0"), ErrorKind::Control);
        assert_eq!(kind(b"PI\x7fNG"), ErrorKind::Control);
        assert_eq!(kind(b"PING\x1b"), ErrorKind::Control);
        // A datagram holding two lines is one line with a '\n' inside.
        assert_eq!(kind(b"PING\nPING"), ErrorKind::Control);
        // Control wins over UTF-8 so the client hears the more specific error.
        assert_eq!(kind(b"PING \xff\0"), ErrorKind::Control);
        // A CR before the CRLF terminator is inside the line.
        let Frame::Line { parsed, consumed } = parse(b"PING\r\r\n", MAX_LINE) else {
            panic!("expected a line");
        };
        assert_eq!(consumed, 7);
        assert_eq!(parsed.unwrap_err().kind, ErrorKind::Control);
    }

    #[test]
    fn invalid_utf8() {
        assert_eq!(kind(b"PING \xc3"), ErrorKind::BadUtf8);
        assert_eq!(
            kind(b"CHECK 192.0.2.1 \xed\xa0\x80@b c@d"),
            ErrorKind::BadUtf8
        );
        // Valid non-ASCII UTF-8 (SMTPUTF8 addresses) is fine.
        assert_eq!(
            triplet("CHECK 192.0.2.1 jörg@bücher.example c@d").sender,
            "jörg@bücher.example"
        );
    }

    #[test]
    fn id_limits() {
        let id19 = "1".repeat(MAX_ID - 1);
        let id20 = "2".repeat(MAX_ID);
        let id21 = "3".repeat(MAX_ID + 1);
        assert_eq!(ok(&format!("{id19} PING")).id, Some(id19.as_str()));
        assert_eq!(ok(&format!("{id20} PING")).id, Some(id20.as_str()));
        assert_eq!(
            parse_line(format!("{id21} PING").as_bytes()),
            Err(LineError {
                id: None,
                kind: ErrorKind::BadId
            })
        );
    }

    #[test]
    fn errors_echo_a_valid_id() {
        let cases: [(&[u8], ErrorKind); 7] = [
            (b"7 CHECK 192.0.2.1 a b x=1", ErrorKind::BadOption),
            (b"7 FETCH", ErrorKind::UnknownVerb),
            (b"7", ErrorKind::BadArgs),
            (b"7 CHECK 999.0.2.1 a b", ErrorKind::BadIp),
            (b"  7\tPI\0NG", ErrorKind::Control),
            (b"7 PING \xff", ErrorKind::BadUtf8),
            (b"7 CHECK 192.0.2.1 a <>", ErrorKind::BadAddress),
        ];
        for (line, kind) in cases {
            assert_eq!(
                parse_line(line),
                Err(LineError {
                    id: Some("7"),
                    kind
                }),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
        // No echo when the first token is not a clean ID.
        assert_eq!(parse_line(b"7\0 PING").unwrap_err().id, None);
        assert_eq!(parse_line(b"x7 PING").unwrap_err().id, None);
    }

    #[test]
    fn pipelined_buffer_with_partial_last_line() {
        let buf = b"1 PING\r\n2 CHECK 192.0.2.1 <> b@c\nPEEK 192.0.2.9 a b\nbogus\n3 PI";
        let mut rest = &buf[..];
        let mut got = Vec::new();
        loop {
            match parse(rest, MAX_LINE) {
                Frame::Line { consumed, parsed } => {
                    got.push(parsed);
                    rest = &rest[consumed..];
                }
                Frame::Incomplete => break,
                Frame::TooLong { .. } => panic!("nothing here is too long"),
            }
        }
        assert_eq!(rest, b"3 PI");
        assert_eq!(got.len(), 4);
        assert_eq!(
            got[0],
            Ok(Request {
                id: Some("1"),
                command: Command::Ping
            })
        );
        let Ok(Request {
            id: Some("2"),
            command: Command::Check(t),
        }) = got[1]
        else {
            panic!("second line: {:?}", got[1]);
        };
        assert_eq!((t.sender, t.recipient), ("", "b@c"));
        assert!(matches!(
            got[2],
            Ok(Request {
                id: None,
                command: Command::Peek(_)
            })
        ));
        assert_eq!(
            got[3],
            Err(LineError {
                id: None,
                kind: ErrorKind::UnknownVerb
            })
        );
    }

    #[test]
    fn terminators() {
        assert_eq!(parse(b"", MAX_LINE), Frame::Incomplete);
        assert_eq!(parse(b"PING", MAX_LINE), Frame::Incomplete);
        assert_eq!(parse(b"PING\r", MAX_LINE), Frame::Incomplete);
        let ping = Ok(Request {
            id: None,
            command: Command::Ping,
        });
        assert_eq!(
            parse(b"PING\n", MAX_LINE),
            Frame::Line {
                consumed: 5,
                parsed: ping
            }
        );
        assert_eq!(
            parse(b"PING\r\nPING\n", MAX_LINE),
            Frame::Line {
                consumed: 6,
                parsed: ping
            }
        );
        let Frame::Line {
            consumed: 1,
            parsed,
        } = parse(b"\n", MAX_LINE)
        else {
            panic!("expected an empty line");
        };
        assert_eq!(parsed.unwrap_err().kind, ErrorKind::Empty);
        let Frame::Line {
            consumed: 2,
            parsed,
        } = parse(b"\r\n", MAX_LINE)
        else {
            panic!("expected an empty line");
        };
        assert_eq!(parsed.unwrap_err().kind, ErrorKind::Empty);
    }

    #[test]
    fn line_length_with_terminator_present() {
        for term in ["\n", "\r\n"] {
            for len in [MAX_LINE - 1, MAX_LINE] {
                let buf = check_line_of(len) + term;
                let frame = parse(buf.as_bytes(), MAX_LINE);
                let Frame::Line {
                    consumed,
                    parsed: Ok(req),
                } = frame
                else {
                    panic!("{len} bytes + {term:?}: {frame:?}");
                };
                assert_eq!(consumed, len + term.len());
                assert!(matches!(req.command, Command::Check(_)));
            }
        }
        // 1025 bytes + "\n" fits the scan window: refused as a whole line.
        let buf = format!("5 {}\n", check_line_of(MAX_LINE - 1));
        assert_eq!(
            parse(buf.as_bytes(), MAX_LINE),
            Frame::Line {
                consumed: MAX_LINE + 2,
                parsed: Err(LineError {
                    id: Some("5"),
                    kind: ErrorKind::TooLong
                })
            }
        );
        // 1025 bytes + "\r\n": the '\n' is beyond the window, so TooLong then skip.
        let buf = check_line_of(MAX_LINE + 1) + "\r\nPING\n";
        assert_eq!(
            parse(buf.as_bytes(), MAX_LINE),
            Frame::TooLong {
                consumed: MAX_LINE + 2
            }
        );
        let rest = &buf.as_bytes()[MAX_LINE + 2..];
        assert_eq!(skip_line(rest), (1, true));
        assert!(matches!(
            parse(&rest[1..], MAX_LINE),
            Frame::Line {
                consumed: 5,
                parsed: Ok(_)
            }
        ));
    }

    #[test]
    fn line_length_before_terminator_arrives() {
        let at = check_line_of(MAX_LINE);
        let over = check_line_of(MAX_LINE + 1);
        // 1023 and 1024 bytes: could still be valid.
        assert_eq!(
            parse(&at.as_bytes()[..MAX_LINE - 1], MAX_LINE),
            Frame::Incomplete
        );
        assert_eq!(parse(at.as_bytes(), MAX_LINE), Frame::Incomplete);
        // 1024 bytes + '\r': the '\n' may follow.
        assert_eq!(
            parse(format!("{at}\r").as_bytes(), MAX_LINE),
            Frame::Incomplete
        );
        // 1025 bytes: too long at once.
        assert_eq!(
            parse(over.as_bytes(), MAX_LINE),
            Frame::TooLong {
                consumed: MAX_LINE + 1
            }
        );
        // 1024 bytes + '\r' + something other than '\n'.
        assert_eq!(
            parse(format!("{at}\rx").as_bytes(), MAX_LINE),
            Frame::TooLong {
                consumed: MAX_LINE + 2
            }
        );
        // A flood is never scanned past the window.
        let flood = vec![b'x'; 100_000];
        assert_eq!(
            parse(&flood, MAX_LINE),
            Frame::TooLong {
                consumed: MAX_LINE + 2
            }
        );
    }

    #[test]
    fn small_max_line() {
        assert!(matches!(
            parse(b"PING\n", 4),
            Frame::Line {
                consumed: 5,
                parsed: Ok(_)
            }
        ));
        assert!(matches!(
            parse(b"PING \n", 4),
            Frame::Line {
                consumed: 6,
                parsed: Err(LineError {
                    kind: ErrorKind::TooLong,
                    ..
                })
            }
        ));
        assert_eq!(parse(b"PINGS", 4), Frame::TooLong { consumed: 5 });
        assert_eq!(parse(b"PINGSS", 4), Frame::TooLong { consumed: 6 });
        assert_eq!(parse(b"PINGSSS\n", 4), Frame::TooLong { consumed: 6 });
        assert_eq!(parse(b"PI", 0), Frame::TooLong { consumed: 2 });
    }

    #[test]
    fn skip_line_finds_the_end() {
        assert_eq!(skip_line(b""), (0, false));
        assert_eq!(skip_line(b"junk"), (4, false));
        assert_eq!(skip_line(b"\n"), (1, true));
        assert_eq!(skip_line(b"junk\r\nPING\n"), (6, true));
    }

    #[test]
    fn encode_replies() {
        assert_eq!(
            enc(
                Some("9"),
                Reply::Defer {
                    seconds: 312,
                    text: "Greylisted, try later"
                }
            ),
            "9 DEFER 312 Greylisted, try later\n"
        );
        assert_eq!(
            enc(
                None,
                Reply::Defer {
                    seconds: 0,
                    text: ""
                }
            ),
            "DEFER 0\n"
        );
        assert_eq!(
            enc(
                None,
                Reply::Defer {
                    seconds: u32::MAX,
                    text: "x"
                }
            ),
            "DEFER 4294967295 x\n"
        );
        assert_eq!(
            enc(None, Reply::Pass { reason: "retried" }),
            "PASS retried\n"
        );
        assert_eq!(
            enc(
                Some("1"),
                Reply::Pass {
                    reason: "exempt:clients"
                }
            ),
            "1 PASS exempt:clients\n"
        );
        assert_eq!(enc(Some("123"), Reply::Pong), "123 PONG\n");
        assert_eq!(enc(None, Reply::Pong), "PONG\n");
        // An empty ID is no ID.
        assert_eq!(enc(Some(""), Reply::Pong), "PONG\n");
        assert_eq!(
            enc(
                Some("4"),
                Reply::Err {
                    kind: ErrorKind::BadIp
                }
            ),
            "4 ERR bad-ip malformed client IP address\n"
        );
        assert_eq!(
            enc(
                None,
                Reply::Err {
                    kind: ErrorKind::TooLong
                }
            ),
            "ERR too-long line longer than max-line\n"
        );
    }

    #[test]
    fn encode_appends() {
        let mut out = b"PONG\n".to_vec();
        encode(None, &Reply::Pass { reason: "known" }, &mut out);
        assert_eq!(out, b"PONG\nPASS known\n");
    }

    #[test]
    fn encode_replaces_control_characters() {
        assert_eq!(
            enc(
                None,
                Reply::Defer {
                    seconds: 5,
                    text: "a\r\nb\0c\u{7f}d\u{85}e\tf"
                }
            ),
            "DEFER 5 a  b c d e f\n"
        );
        assert_eq!(
            enc(
                None,
                Reply::Pass {
                    reason: "exempt:x\ny"
                }
            ),
            "PASS exempt:x y\n"
        );
        assert_eq!(enc(Some("1\n"), Reply::Pong), "1  PONG\n");
    }

    #[test]
    fn encode_within_budget_around_full_length() {
        let reply = Reply::Defer {
            seconds: 300,
            text: "Greylisted",
        };
        let full = "7 DEFER 300 Greylisted\n";
        let n = full.len();
        assert_eq!(enc_within(Some("7"), reply, n + 1).as_deref(), Some(full));
        assert_eq!(enc_within(Some("7"), reply, n).as_deref(), Some(full));
        assert_eq!(
            enc_within(Some("7"), reply, n - 1).as_deref(),
            Some("7 DEFER 300 Greyliste\n")
        );
        assert_eq!(
            enc_within(None, reply, usize::MAX).as_deref(),
            Some("DEFER 300 Greylisted\n")
        );
    }

    #[test]
    fn encode_within_shortest_defer() {
        let reply = Reply::Defer {
            seconds: 300,
            text: "Greylisted",
        };
        let shortest = "7 DEFER 300\n".len();
        assert_eq!(enc_within(Some("7"), reply, shortest - 1), None);
        assert_eq!(
            enc_within(Some("7"), reply, shortest).as_deref(),
            Some("7 DEFER 300\n")
        );
        // Room for the space but not a character: still no trailing space.
        assert_eq!(
            enc_within(Some("7"), reply, shortest + 1).as_deref(),
            Some("7 DEFER 300\n")
        );
        assert_eq!(
            enc_within(Some("7"), reply, shortest + 2).as_deref(),
            Some("7 DEFER 300 G\n")
        );
    }

    #[test]
    fn encode_within_cuts_at_char_boundary() {
        let reply = Reply::Defer {
            seconds: 1,
            text: "é€x",
        };
        // "DEFER 1" + " " + text + "\n": é is 2 bytes, € is 3.
        assert_eq!(enc_within(None, reply, 10).as_deref(), Some("DEFER 1\n"));
        assert_eq!(enc_within(None, reply, 11).as_deref(), Some("DEFER 1 é\n"));
        assert_eq!(enc_within(None, reply, 13).as_deref(), Some("DEFER 1 é\n"));
        assert_eq!(enc_within(None, reply, 14).as_deref(), Some("DEFER 1 é€\n"));
        assert_eq!(
            enc_within(None, reply, 15).as_deref(),
            Some("DEFER 1 é€x\n")
        );
        // A replaced control character counts as the one space it becomes.
        let reply = Reply::Defer {
            seconds: 1,
            text: "\u{85}\u{85}",
        };
        assert_eq!(enc_within(None, reply, 11).as_deref(), Some("DEFER 1   \n"));
    }

    #[test]
    fn encode_within_err() {
        let reply = Reply::Err {
            kind: ErrorKind::BadArgs,
        };
        let full = "12 ERR bad-args wrong number of arguments\n";
        let shortest = "12 ERR bad-args\n";
        assert_eq!(
            enc_within(Some("12"), reply, full.len() + 1).as_deref(),
            Some(full)
        );
        assert_eq!(
            enc_within(Some("12"), reply, full.len()).as_deref(),
            Some(full)
        );
        assert_eq!(
            enc_within(Some("12"), reply, full.len() - 1).as_deref(),
            Some("12 ERR bad-args wrong number of argument\n")
        );
        assert_eq!(
            enc_within(Some("12"), reply, shortest.len() + 2).as_deref(),
            Some("12 ERR bad-args w\n")
        );
        assert_eq!(
            enc_within(Some("12"), reply, shortest.len() + 1).as_deref(),
            Some(shortest)
        );
        assert_eq!(
            enc_within(Some("12"), reply, shortest.len()).as_deref(),
            Some(shortest)
        );
        assert_eq!(enc_within(Some("12"), reply, shortest.len() - 1), None);
    }

    #[test]
    fn encode_within_pass_and_pong_are_never_cut() {
        let pass = Reply::Pass {
            reason: "exempt:clients",
        };
        let line = "PASS exempt:clients\n";
        assert_eq!(
            enc_within(None, pass, line.len() + 1).as_deref(),
            Some(line)
        );
        assert_eq!(enc_within(None, pass, line.len()).as_deref(), Some(line));
        assert_eq!(enc_within(None, pass, line.len() - 1), None);
        assert_eq!(
            enc_within(Some("12"), Reply::Pong, 9).as_deref(),
            Some("12 PONG\n")
        );
        assert_eq!(
            enc_within(Some("12"), Reply::Pong, 8).as_deref(),
            Some("12 PONG\n")
        );
        assert_eq!(enc_within(Some("12"), Reply::Pong, 7), None);
        assert_eq!(enc_within(None, Reply::Pong, 0), None);
    }

    #[test]
    fn error_codes_and_texts() {
        let codes: Vec<&str> = ErrorKind::ALL.iter().map(|k| k.as_code()).collect();
        assert_eq!(
            codes,
            [
                "too-long",
                "bad-utf8",
                "control-char",
                "empty",
                "unknown-verb",
                "bad-args",
                "bad-id",
                "bad-ip",
                "bad-address",
                "bad-option"
            ]
        );
        for kind in ErrorKind::ALL {
            assert_eq!(kind.to_string(), kind.text());
            // Codes and texts travel inside one reply line.
            assert!(!kind.as_code().contains(char::is_whitespace));
            assert!(!kind.text().contains(char::is_control));
        }
        assert_eq!(
            ErrorKind::BadId.text(),
            format!("ID must be 1 to {MAX_ID} digits")
        );
    }

    #[test]
    fn number_formatting() {
        let mut buf = [0u8; 20];
        assert_eq!(format_u32(0, &mut buf), "0");
        assert_eq!(format_u32(9, &mut buf), "9");
        assert_eq!(format_u32(10, &mut buf), "10");
        assert_eq!(format_u32(u32::MAX, &mut buf), "4294967295");
    }
}

#[cfg(test)]
mod bound_tests {
    use super::*;

    #[test]
    fn dotted_quad_bounds() {
        use std::net::Ipv4Addr;
        assert_eq!(dotted_quad(b"192.0.2.1"), Some(Ipv4Addr::new(192, 0, 2, 1)));
        assert_eq!(dotted_quad(b"0.0.0.0"), Some(Ipv4Addr::UNSPECIFIED));
        assert_eq!(dotted_quad(b"255.255.255.255"), Some(Ipv4Addr::BROADCAST));
        for bad in [
            &b"256.0.0.1"[..],
            b"01.2.3.4",
            b"1.2.3",
            b"1.2.3.4.5",
            b"1..3.4",
            b"1.2.3.4.",
            b"1234.1.1.1",
            b"",
        ] {
            assert_eq!(dotted_quad(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn too_long_keeps_a_valid_leading_id() {
        assert_eq!(too_long(b"7 PING     ").id, Some("7"));
        assert_eq!(too_long(b"PING 7").id, None);
        assert_eq!(too_long(b"7 PING").kind, ErrorKind::TooLong);
        // Digits cut off by the end of what is at hand are not an ID: they may go on.
        assert_eq!(too_long(b"  123").id, None);
        assert_eq!(too_long(b"123").id, None);
        assert_eq!(too_long(b"123 ").id, Some("123"));
    }

    /// Found by the `native` fuzz target: a line longer than the limit whose ID starts past
    /// the first `max_line + 2` bytes (or straddles them) was answered with an ID over UDP and
    /// without one, or with the ID's first digits only, over TCP.
    #[test]
    fn an_over_long_line_is_answered_alike_on_both_transports() {
        let max_line = 17;
        for blanks in [0, 10, 14, 15, 16, 17, 18, 19, 42] {
            let line = format!(
                "{}12345 CHECK 192.0.2.1 <a@b.example> <c@d.example>",
                "\t".repeat(blanks)
            );
            let datagram: Vec<_> = datagram_lines(line.as_bytes(), max_line).collect();
            for chunk in 1..line.len() {
                let mut framer = LineFramer::default();
                let mut buf = Vec::new();
                let mut got = None;
                for piece in line.as_bytes().chunks(chunk) {
                    buf.extend_from_slice(piece);
                    let (n, f) = framer.next(&buf, max_line, false);
                    if let Framed::Line(r) = f {
                        got = Some(r.map(|_| ()).map_err(|e| (e.id.map(str::to_owned), e.kind)));
                        break;
                    }
                    buf.drain(..n);
                }
                let want = datagram[0]
                    .map(|_| ())
                    .map_err(|e| (e.id.map(str::to_owned), e.kind));
                assert_eq!(got, Some(want), "{blanks} blanks, reads of {chunk}");
            }
        }
    }
}

#[cfg(test)]
mod framing_tests {
    use super::*;
    use proptest::prelude::*;

    /// Every request a stream holds, fed to a framer in chunks of the given sizes (as reads
    /// would bring them), with the stream's end after the last chunk.
    fn frame_stream(stream: &[u8], chunks: &[usize], max_line: usize) -> Vec<String> {
        let mut framer = LineFramer::default();
        let mut buf: Vec<u8> = Vec::new();
        let mut out = Vec::new();
        let mut fed = 0;
        let mut sizes = chunks.iter().copied().chain(std::iter::repeat(7));
        loop {
            let take = sizes.next().unwrap_or(7).max(1).min(stream.len() - fed);
            buf.extend_from_slice(&stream[fed..fed + take]);
            fed += take;
            let eof = fed == stream.len();
            let mut pos = 0;
            loop {
                let (n, framed) = framer.next(&buf[pos..], max_line, eof);
                pos += n;
                match framed {
                    Framed::Line(r) => out.push(format!("{r:?}")),
                    Framed::Skipped => {}
                    Framed::NeedMore => break,
                }
            }
            buf.drain(..pos);
            if eof {
                return out;
            }
        }
    }

    fn piece() -> impl Strategy<Value = &'static str> {
        prop_oneof![
            Just("CHECK 192.0.2.1 <a@b.example> <c@d.example>"),
            Just("7 PEEK 2001:db8::1 a@b c@d helo=x"),
            Just("12 PING"),
            Just(" "),
            Just("\t"),
            Just("x"),
            Just("é"),
            Just("\r"),
            Just("\0"),
            Just("<"),
        ]
    }

    proptest! {
        /// TCP and UDP cut lines identically: the lines of a stream, however its reads are
        /// split, are the lines of the same bytes sent as one datagram (a datagram ends its
        /// last line; a stream's end does too).
        #[test]
        fn stream_and_datagram_frame_alike(
            lines in proptest::collection::vec(proptest::collection::vec(piece(), 0..12), 1..6),
            chunks in proptest::collection::vec(1usize..40, 0..30),
            max_line in 8usize..80,
        ) {
            let text = lines.iter().map(|l| l.concat()).collect::<Vec<_>>().join("\n");
            let stream = text.as_bytes();
            let datagram: Vec<String> =
                datagram_lines(stream, max_line).map(|r| format!("{r:?}")).collect();
            // An empty stream holds no line; an empty datagram is one empty line.
            prop_assume!(!stream.is_empty());
            prop_assert_eq!(frame_stream(stream, &chunks, max_line), datagram);
        }

        /// The dotted-quad reader takes only what the standard parser takes, as the same address.
        #[test]
        fn dotted_quad_agrees_with_std(s in "[0-9.]{0,17}|[0-9a-f.:x+ -]{0,12}") {
            if let Some(a) = dotted_quad(s.as_bytes()) {
                prop_assert_eq!(s.parse::<std::net::Ipv4Addr>().ok(), Some(a));
            }
            prop_assert_eq!(parse_ip(&s), s.parse::<IpAddr>().ok());
        }

        /// The byte tokenizer finds the words `split_ascii_whitespace` finds, on every line
        /// the parser lets through to it (no control character but tab).
        #[test]
        fn tokens_match_split_ascii_whitespace(s in "[a \t\u{e9}=<>]{0,40}") {
            let ours: Vec<&str> = Tokens(&s).collect();
            let std: Vec<&str> = s.split_ascii_whitespace().collect();
            prop_assert_eq!(ours, std);
        }
    }
}

// =========================================================================================
// The client's half: request encoding and reply parsing.
//
// `greyhound check` and the load generator speak the protocol through these, so a client and
// the server can never disagree about the wire format. Same rules as the server's half:
// parsing borrows from the input and never allocates; encoding only grows the caller's `Vec`.
// =========================================================================================

/// Appends one request line: `[ID ]CHECK|PEEK <ip> <sender> <recipient> [helo=..] [name=..]
/// [auth=..] [cert=..] [cert-subject=..] [body=..]\n` or `[ID ]PING\n`. Sender and recipient
/// go in angle brackets (the null sender is `<>`), options in the order `helo`, `name`, `auth`,
/// `cert`, `cert-subject`, `body`.
///
/// Fields are written as given: one holding whitespace, a control character or an angle
/// bracket makes a line the server answers with `ERR`, exactly as it would from any client.
/// Never allocates beyond growing `out` (the IP address is formatted in place).
pub fn encode_request(req: &Request<'_>, out: &mut Vec<u8>) {
    use std::io::Write as _;
    if let Some(id) = req.id {
        out.extend_from_slice(id.as_bytes());
        out.push(b' ');
    }
    let (verb, t) = match &req.command {
        Command::Check(t) => ("CHECK ", t),
        Command::Peek(t) => ("PEEK ", t),
        Command::Ping => {
            out.extend_from_slice(b"PING\n");
            return;
        }
    };
    out.extend_from_slice(verb.as_bytes());
    match t.client {
        // By hand: the `fmt` path was a tenth of the load generator's CPU (perf).
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                // At most three digits, no leading zeros.
                if octet >= 100 {
                    out.push(b'0' + octet / 100);
                }
                if octet >= 10 {
                    out.push(b'0' + octet / 10 % 10);
                }
                out.push(b'0' + octet % 10);
            }
        }
        // Writing into a Vec cannot fail; Display of an address needs no heap.
        IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
    for address in [t.sender, t.recipient] {
        out.extend_from_slice(b" <");
        out.extend_from_slice(address.as_bytes());
        out.push(b'>');
    }
    for (key, value) in [
        (" helo=", t.helo),
        (" name=", t.name),
        (" auth=", t.auth),
        (" cert=", t.cert),
        (" cert-subject=", t.cert_subject),
        (" body=", t.body),
    ] {
        if let Some(value) = value {
            out.extend_from_slice(key.as_bytes());
            out.extend_from_slice(value.as_bytes());
        }
    }
    out.push(b'\n');
}

/// One reply line as a client reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyLine<'a> {
    /// The request ID the server echoed, if the request had one.
    pub id: Option<&'a str>,
    /// The reply.
    pub reply: Reply<'a>,
}

/// Why a reply line could not be read. The line is consumed all the same, so a client can
/// count it and go on with the next one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    /// The line is not valid UTF-8.
    #[error("reply is not valid UTF-8")]
    BadUtf8,
    /// The line is empty.
    #[error("empty reply")]
    Empty,
    /// The leading ID has more than [`MAX_ID`] digits.
    #[error("reply ID longer than 20 digits")]
    BadId,
    /// The keyword is none of `DEFER`, `PASS`, `PONG`, `ERR`.
    #[error("unknown reply keyword")]
    UnknownKeyword,
    /// `DEFER` without a number of seconds that fits a `u32`, or `PONG` with arguments.
    #[error("malformed reply arguments")]
    BadArgs,
    /// `ERR` with a code this version does not know.
    #[error("unknown ERR code")]
    UnknownCode,
}

/// Looks for one reply line at the front of `buf`: `None` means no complete line yet (read
/// more); otherwise the line, parsed or refused, and the bytes to drop (terminator included).
/// Lines end in `\n` or `\r\n`.
#[must_use]
pub fn parse_reply(buf: &[u8]) -> Option<(Result<ReplyLine<'_>, ReplyError>, usize)> {
    let end = buf.iter().position(|&b| b == b'\n')?;
    Some((parse_reply_line(&buf[..end]), end + 1))
}

/// Parses one reply line without its `\n` (a trailing `\r` is ignored): `[ID ]DEFER <secs>
/// <text>`, `[ID ]PASS <reason>`, `[ID ]PONG` or `[ID ]ERR <code> <text>`. Texts and the
/// reason are taken verbatim after the single space that follows the field before them, so
/// whatever [`encode`] wrote comes back as it was; an `ERR`'s text is not read (it belongs to
/// its code).
///
/// # Errors
///
/// A [`ReplyError`] saying what was wrong with the line.
pub fn parse_reply_line(line: &[u8]) -> Result<ReplyLine<'_>, ReplyError> {
    // Split on bytes and check UTF-8 only in the parts returned as text: this sits on the
    // load generator's hot path once per reply, and a whole-line check plus `str` splitting
    // cost more than the rest of the parse (callgrind).
    let line = strip_cr(line);
    if line.is_empty() {
        return Err(ReplyError::Empty);
    }
    let utf8 = |b| std::str::from_utf8(b).map_err(|_| ReplyError::BadUtf8);
    let (first, rest) = split_word(line);
    // No keyword is made of digits, so a digits-only first word is the echoed ID.
    let (id, keyword, rest) = if !first.is_empty() && first.iter().all(u8::is_ascii_digit) {
        if first.len() > MAX_ID {
            return Err(ReplyError::BadId);
        }
        let (keyword, rest) = split_word(rest);
        (Some(utf8(first)?), keyword, rest)
    } else {
        (None, first, rest)
    };
    let reply = match keyword {
        b"DEFER" => {
            let (seconds, text) = split_word(rest);
            if seconds.is_empty() || !seconds.iter().all(u8::is_ascii_digit) {
                return Err(ReplyError::BadArgs);
            }
            let seconds = utf8(seconds)?.parse().map_err(|_| ReplyError::BadArgs)?;
            Reply::Defer {
                seconds,
                text: utf8(text)?,
            }
        }
        b"PASS" => Reply::Pass {
            reason: utf8(rest)?,
        },
        b"PONG" if rest.is_empty() => Reply::Pong,
        b"PONG" => return Err(ReplyError::BadArgs),
        b"ERR" => {
            let (code, text) = split_word(rest);
            // The text is not returned, but the line must still be text.
            utf8(text)?;
            let kind = ErrorKind::ALL
                .into_iter()
                .find(|k| k.as_code().as_bytes() == code)
                .ok_or(ReplyError::UnknownCode)?;
            Reply::Err { kind }
        }
        _ if std::str::from_utf8(line).is_err() => return Err(ReplyError::BadUtf8),
        _ => return Err(ReplyError::UnknownKeyword),
    };
    Ok(ReplyLine { id, reply })
}

/// Splits at the first space: (before, after); `after` is empty when there is no space.
fn split_word(s: &[u8]) -> (&[u8], &[u8]) {
    match s.iter().position(|&b| b == b' ') {
        Some(at) => (&s[..at], &s[at + 1..]),
        None => (s, &[]),
    }
}

#[cfg(test)]
mod client_tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::Ipv4Addr;

    fn line(req: &Request<'_>) -> String {
        let mut out = Vec::new();
        encode_request(req, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn requests_are_written_as_the_protocol_shows_them() {
        let t = Triplet {
            client: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
            sender: "",
            recipient: "b@c.example",
            helo: Some("mx.example"),
            name: None,
            auth: Some("joe"),
            cert: None,
            cert_subject: None,
            body: None,
        };
        let check = Request {
            id: Some("17"),
            command: Command::Check(t),
        };
        assert_eq!(
            line(&check),
            "17 CHECK 192.0.2.1 <> <b@c.example> helo=mx.example auth=joe\n"
        );
        let peek = Request {
            id: None,
            command: Command::Peek(Triplet {
                client: "2001:db8::1".parse().unwrap(),
                sender: "a@b",
                helo: None,
                auth: None,
                ..t
            }),
        };
        assert_eq!(line(&peek), "PEEK 2001:db8::1 <a@b> <b@c.example>\n");
        let tls = Request {
            id: None,
            command: Command::Check(Triplet {
                auth: None,
                cert: Some("AB:CD"),
                cert_subject: Some("mx.example"),
                ..t
            }),
        };
        assert_eq!(
            line(&tls),
            "CHECK 192.0.2.1 <> <b@c.example> helo=mx.example cert=AB:CD cert-subject=mx.example\n"
        );
        let data = Request {
            id: None,
            command: Command::Check(Triplet {
                helo: None,
                auth: None,
                body: Some("0123456789ABCDEF"),
                ..t
            }),
        };
        assert_eq!(
            line(&data),
            "CHECK 192.0.2.1 <> <b@c.example> body=0123456789ABCDEF\n"
        );
        let ping = Request {
            id: Some("0"),
            command: Command::Ping,
        };
        assert_eq!(line(&ping), "0 PING\n");
    }

    #[test]
    fn replies_are_read_with_their_id() {
        fn ok(l: &[u8]) -> ReplyLine<'_> {
            parse_reply_line(l).unwrap()
        }
        assert_eq!(
            ok(b"17 DEFER 300 Greylisted, see x"),
            ReplyLine {
                id: Some("17"),
                reply: Reply::Defer {
                    seconds: 300,
                    text: "Greylisted, see x"
                }
            }
        );
        assert_eq!(
            ok(b"DEFER 12\r").reply,
            Reply::Defer {
                seconds: 12,
                text: ""
            }
        );
        assert_eq!(
            ok(b"PASS exempt:client").reply,
            Reply::Pass {
                reason: "exempt:client"
            }
        );
        assert_eq!(ok(b"3 PONG").id, Some("3"));
        assert_eq!(
            ok(b"9 ERR bad-ip malformed client IP address").reply,
            Reply::Err {
                kind: ErrorKind::BadIp
            }
        );
        // An ERR code is read, its text is not.
        assert_eq!(
            ok(b"ERR too-long").reply,
            Reply::Err {
                kind: ErrorKind::TooLong
            }
        );
    }

    #[test]
    fn bad_replies_say_why() {
        let err = |l: &[u8]| parse_reply_line(l).unwrap_err();
        assert_eq!(err(b""), ReplyError::Empty);
        assert_eq!(err(b"\r"), ReplyError::Empty);
        assert_eq!(err(b"HELLO"), ReplyError::UnknownKeyword);
        assert_eq!(err(b"pass known"), ReplyError::UnknownKeyword);
        assert_eq!(err(b"17"), ReplyError::UnknownKeyword);
        assert_eq!(err(b"DEFER"), ReplyError::BadArgs);
        assert_eq!(err(b"DEFER -1 x"), ReplyError::BadArgs);
        // u32::MAX is the largest number of seconds; one more does not fit.
        assert!(parse_reply_line(b"DEFER 4294967295").is_ok());
        assert_eq!(err(b"DEFER 4294967296"), ReplyError::BadArgs);
        assert_eq!(err(b"PONG x"), ReplyError::BadArgs);
        assert_eq!(err(b"ERR no-such-code x"), ReplyError::UnknownCode);
        assert_eq!(err(b"\xff PASS"), ReplyError::BadUtf8);
        // Twenty digits are an ID, twenty-one are not.
        assert!(parse_reply_line(b"18446744073709551615 PONG").is_ok());
        assert_eq!(err(b"123456789012345678901 PONG"), ReplyError::BadId);
    }

    #[test]
    fn reply_framing_waits_for_the_line_end() {
        assert_eq!(parse_reply(b""), None);
        assert_eq!(parse_reply(b"PASS kno"), None);
        let (r, used) = parse_reply(b"PASS known\r\n4 PONG\n").unwrap();
        assert_eq!(used, 12);
        assert_eq!(r.unwrap().reply, Reply::Pass { reason: "known" });
        let (r, used) = parse_reply(b"BOGUS\nPONG\n").unwrap();
        assert_eq!((r, used), (Err(ReplyError::UnknownKeyword), 6));
    }

    /// Words the server's tokenizer keeps whole: no ASCII whitespace, no control characters.
    const WORD: &str = "[^\\s\\p{Cc}<>]{1,24}";
    const VALUE: &str = "[^\\s\\p{Cc}]{0,16}";
    const ID: &str = "[0-9]{1,20}";

    fn triplet() -> impl Strategy<Value = (IpAddr, String, String, [Option<String>; 5])> {
        (
            any::<IpAddr>(),
            prop_oneof![Just(String::new()), WORD.prop_map(String::from)],
            WORD,
            [
                proptest::option::of(VALUE),
                proptest::option::of(VALUE),
                proptest::option::of(VALUE),
                proptest::option::of(VALUE),
                proptest::option::of(VALUE),
            ],
        )
    }

    fn reply() -> impl Strategy<Value = (u8, u32, String)> {
        // Texts and reasons may hold any character but controls, spaces included.
        (0u8..4, any::<u32>(), "[^\\p{Cc}]{0,40}")
    }

    fn build_reply(kind: u8, n: u32, text: &str) -> Reply<'_> {
        match kind {
            0 => Reply::Defer { seconds: n, text },
            1 => Reply::Pass { reason: text },
            2 => Reply::Pong,
            _ => Reply::Err {
                kind: ErrorKind::ALL[n as usize % ErrorKind::ALL.len()],
            },
        }
    }

    proptest! {
        /// What the client encodes, the server parses back to the same request.
        #[test]
        fn requests_round_trip(
            id in proptest::option::of(ID),
            verb in 0u8..3,
            (client, sender, recipient, [helo, name, auth, cert, cert_subject]) in triplet(),
            body in proptest::option::of("[0-9a-fA-F]{16,128}"),
        ) {
            let t = Triplet {
                client,
                sender: &sender,
                recipient: &recipient,
                helo: helo.as_deref(),
                name: name.as_deref(),
                auth: auth.as_deref(),
                cert: cert.as_deref(),
                cert_subject: cert_subject.as_deref(),
                body: body.as_deref(),
            };
            let command = match verb {
                0 => Command::Check(t),
                1 => Command::Peek(t),
                _ => Command::Ping,
            };
            let req = Request { id: id.as_deref(), command };
            let mut out = Vec::new();
            encode_request(&req, &mut out);
            prop_assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1);
            match parse(&out, usize::MAX) {
                Frame::Line { consumed, parsed } => {
                    prop_assert_eq!(consumed, out.len());
                    prop_assert_eq!(parsed, Ok(req));
                }
                other => prop_assert!(false, "{:?}", other),
            }
        }

        /// What the server encodes, the client parses back to the same reply.
        #[test]
        fn replies_round_trip(id in proptest::option::of(ID), (kind, n, text) in reply()) {
            let reply = build_reply(kind, n, &text);
            let mut out = Vec::new();
            encode(id.as_deref(), &reply, &mut out);
            let (parsed, used) = parse_reply(&out).expect("a whole line");
            prop_assert_eq!(used, out.len());
            prop_assert_eq!(parsed, Ok(ReplyLine { id: id.as_deref(), reply }));
        }

        /// A shortened UDP reply still parses, to the same reply with a prefix of its text.
        #[test]
        fn shortened_replies_parse(id in proptest::option::of(ID), (kind, n, text) in reply(), budget in 0usize..80) {
            let reply = build_reply(kind, n, &text);
            let mut out = Vec::new();
            if encode_within(id.as_deref(), &reply, budget, &mut out) {
                let got = parse_reply_line(&out[..out.len() - 1]).unwrap();
                prop_assert_eq!(got.id, id.as_deref());
                match (got.reply, reply) {
                    (Reply::Defer { seconds: a, text: ta }, Reply::Defer { seconds: b, text: tb }) => {
                        prop_assert_eq!(a, b);
                        prop_assert!(tb.starts_with(ta));
                    }
                    (got, want) => prop_assert_eq!(got, want),
                }
            }
        }

        /// Whatever bytes come back, reading them never panics and consumes one line.
        #[test]
        fn reply_parsing_survives_garbage(buf in proptest::collection::vec(any::<u8>(), 0..64)) {
            match parse_reply(&buf) {
                None => prop_assert!(!buf.contains(&b'\n')),
                Some((_, used)) => prop_assert_eq!(buf[..used].iter().filter(|&&b| b == b'\n').count(), 1),
            }
        }
    }
}
