//! Greylisting triplet normalisation.
//!
//! A greylisting triplet is (client address, envelope sender, envelope
//! recipient). Each part is normalised before it is hashed so that one
//! sending server, one mailing list or one forwarder maps to *one* triplet.
//! Without this, a list that puts a fresh bounce id into every envelope
//! sender would be greylisted on every single message, and the triplet table
//! would grow by one entry per message instead of one per correspondent.
//!
//! # Client address
//!
//! Large senders retry from a different host of the same pool, so the client
//! address is masked to its network (/24 and /64 by default). An IPv4-mapped
//! IPv6 address (`::ffff:a.b.c.d`) is the same IPv4 host seen through a dual
//! stack socket, so it is masked as IPv4.
//!
//! # Envelope sender
//!
//! The sender is ASCII-lower-cased, split at its last `@`, and only the local
//! part is rewritten:
//!
//! 1. **BATV** (`prvs=TAG=orig`, `msprvs1=TAG=orig`, `btv1==TAG==orig`): the
//!    signed tag changes daily or per message, so only `orig` is kept.
//! 2. **SRS** (`srs0=HASH=TT=domain=local`, `srs1=HASH=hop==HASH=TT=domain=local`):
//!    hash and timestamp change per message and are dropped, leaving
//!    `srs0=domain=local` / `srs1=hop=domain=local`. Nothing else is applied
//!    to SRS addresses, and a malformed one is left alone rather than guessed.
//! 3. **`+extension`**: `john+lists` becomes `john`; this also removes
//!    Mailman/SendGrid style VERP (`list-bounces+user=example.com`).
//! 4. **`=` VERP**: an encoded recipient `rcpt=rcpt-domain` at the end of the
//!    local part (ezmlm, Mailchimp) is replaced by `#`.
//! 5. **Identifiers**: tokens between `. - _ = +` that are all digits, long hex
//!    with a digit, or long alphanumerics with several digits become `#`.
//!
//! The null sender (`""` or `"<>"`) produces no bytes at all; callers
//! length-prefix each field, so it stays distinct from every real sender.
//!
//! # Recipient
//!
//! The recipient is only ASCII-lower-cased: `+ext` and digits select a real
//! mailbox, so two recipients that differ there are different triplets.
//!
//! # Performance
//!
//! These functions sit on the per-message hot path. They write straight into
//! the caller's buffer, so they never allocate beyond growing it. The sender
//! is normalised in one walk over its local part: each byte is lower-cased,
//! classified by a table lookup and written once, and a token that turns out
//! to be an identifier, or a VERP tail, is rewound to `#` (every rule only
//! shortens the address). The earlier rule-by-rule version, a pass per rule
//! over a lower-cased copy, is kept in the tests as the model this one must
//! match byte for byte: stored keys depend on the output.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Error returned by [`Normalizer::new`] when a prefix length is larger than
/// the address family allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefixError {
    /// Address family of the rejected prefix: `"ipv4"` or `"ipv6"`.
    pub family: &'static str,
    /// The rejected prefix length.
    pub prefix: u8,
    /// The largest prefix length allowed for `family` (32 or 128).
    pub max: u8,
}

impl fmt::Display for PrefixError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} prefix {} is out of range (0..={})",
            self.family, self.prefix, self.max
        )
    }
}

impl std::error::Error for PrefixError {}

/// A client address masked to its network.
///
/// The variant holds the *masked* address, so two clients in the same
/// network compare (and hash) equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientNet {
    /// An IPv4 network, including IPv4-mapped IPv6 clients.
    V4(Ipv4Addr),
    /// An IPv6 network.
    V6(Ipv6Addr),
}

impl ClientNet {
    /// Stable 17-byte encoding for hashing and persistence.
    ///
    /// Byte 0 is `4` or `6`. For IPv4 the masked address follows in bytes
    /// 1..5 (network order) and the rest is zero; for IPv6 it fills bytes
    /// 1..17. The family byte keeps `0.0.0.0/0` and `::/0` distinct.
    #[must_use]
    pub fn encode(&self) -> [u8; 17] {
        let mut buf = [0u8; 17];
        match self {
            Self::V4(addr) => {
                buf[0] = 4;
                buf[1..5].copy_from_slice(&addr.octets());
            }
            Self::V6(addr) => {
                buf[0] = 6;
                buf[1..17].copy_from_slice(&addr.octets());
            }
        }
        buf
    }
}

/// Normalises the three parts of a greylisting triplet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Normalizer {
    ipv4_prefix: u8,
    ipv6_prefix: u8,
}

impl Default for Normalizer {
    /// Masks IPv4 clients to /24 and IPv6 clients to /64: the usual size of
    /// one provider's outbound pool and of one IPv6 site.
    fn default() -> Self {
        Self {
            ipv4_prefix: 24,
            ipv6_prefix: 64,
        }
    }
}

impl Normalizer {
    /// Creates a normaliser that masks IPv4 clients to `ipv4_prefix` bits
    /// and IPv6 clients to `ipv6_prefix` bits.
    ///
    /// # Errors
    ///
    /// Returns [`PrefixError`] if `ipv4_prefix > 32` or `ipv6_prefix > 128`.
    pub fn new(ipv4_prefix: u8, ipv6_prefix: u8) -> Result<Self, PrefixError> {
        if ipv4_prefix > 32 {
            return Err(PrefixError {
                family: "ipv4",
                prefix: ipv4_prefix,
                max: 32,
            });
        }
        if ipv6_prefix > 128 {
            return Err(PrefixError {
                family: "ipv6",
                prefix: ipv6_prefix,
                max: 128,
            });
        }
        Ok(Self {
            ipv4_prefix,
            ipv6_prefix,
        })
    }

    /// The IPv4 prefix length clients are masked to.
    #[must_use]
    pub fn ipv4_prefix(&self) -> u8 {
        self.ipv4_prefix
    }

    /// The IPv6 prefix length clients are masked to.
    #[must_use]
    pub fn ipv6_prefix(&self) -> u8 {
        self.ipv6_prefix
    }

    /// Masks a client address to its network.
    ///
    /// IPv4 is masked to the IPv4 prefix and IPv6 to the IPv6 prefix. An
    /// IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) is treated as the IPv4
    /// address and masked with the IPv4 prefix. Prefix 0 masks everything.
    #[must_use]
    pub fn client(&self, ip: IpAddr) -> ClientNet {
        match ip {
            IpAddr::V4(v4) => ClientNet::V4(mask_v4(v4, self.ipv4_prefix)),
            // Only the mapped form is unwrapped: the deprecated
            // IPv4-compatible form (`::a.b.c.d`) overlaps real IPv6 space.
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => ClientNet::V4(mask_v4(v4, self.ipv4_prefix)),
                None => ClientNet::V6(mask_v6(v6, self.ipv6_prefix)),
            },
        }
    }

    /// Appends the normalised envelope sender to `out` (which is not
    /// cleared).
    ///
    /// The null sender — `""` or `"<>"` — appends nothing. See the module
    /// documentation for the rewriting rules.
    pub fn sender(&self, sender: &str, out: &mut Vec<u8>) {
        let bytes = sender.as_bytes();
        if bytes.is_empty() || bytes == b"<>" {
            return;
        }
        let start = out.len();
        // Every rule only shortens the address, so the input's length is room enough. Writing
        // by index into a zeroed tail costs less than a capacity check per pushed byte.
        out.resize(start + bytes.len(), 0);
        let dst = &mut out[start..];
        // The last '@' separates the domain: a quoted local part may itself
        // contain '@', a domain never does. Searched from the end, so only the
        // (short) domain is read twice, and with SIMD: a byte-by-byte `rposition`
        // was a quarter of this function's time.
        let at = memchr::memrchr(b'@', bytes).unwrap_or(bytes.len());
        let (local, domain) = bytes.split_at(at);
        // BATV and SRS prefixes start with 'p', 'm', 'b' or 's': one look at the first byte
        // spares most senders five prefix comparisons (~100 instructions per sender).
        // A tag inside a tag (a signed bounce address signed again) goes too, so that the
        // result is a fixed point: normalising it again changes nothing.
        let mut local = local;
        while let Some(b'p' | b'm' | b'b') = local.first().map(u8::to_ascii_lowercase) {
            match batv_original_start(local) {
                Some(start) => local = &local[start..],
                None => break,
            }
        }
        let srs = match local.first() {
            Some(b's' | b'S') => srs_kind(local),
            _ => None,
        };
        let w = match srs {
            Some(kind) => write_srs(local, kind, dst),
            None => write_local(local, dst),
        };
        let w = put_lower(dst, w, domain);
        out.truncate(start + w);
        // What normalises to "<>" ("<>+x") would be the null sender on a second pass: it is
        // one now, so that normalising twice equals once (found by the `normalize` fuzz target).
        if out[start..] == *b"<>" {
            out.truncate(start);
        }
    }

    /// Appends the recipient, ASCII-lower-cased, to `out` (which is not
    /// cleared). Nothing else is changed.
    pub fn recipient(&self, recipient: &str, out: &mut Vec<u8>) {
        let start = out.len();
        // Copy, then lower-case in place: this loop is vectorised, where extending from
        // `bytes().map(..)` went byte by byte (over half of `prepare`'s own time in `perf`).
        out.extend_from_slice(recipient.as_bytes());
        out[start..].make_ascii_lowercase();
    }
}

fn mask_v4(addr: Ipv4Addr, prefix: u8) -> Ipv4Addr {
    // A shift by the full width overflows, which is exactly the /0 case.
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    Ipv4Addr::from(u32::from(addr) & mask)
}

fn mask_v6(addr: Ipv6Addr, prefix: u8) -> Ipv6Addr {
    let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
    Ipv6Addr::from(u128::from(addr) & mask)
}

/// Whether `s` starts with the ASCII `prefix` (given in lower case), in any case.
fn starts_with_ci(s: &[u8], prefix: &[u8]) -> bool {
    s.len() >= prefix.len() && s[..prefix.len()].eq_ignore_ascii_case(prefix)
}

/// Offset at which the original local part of a BATV address starts. Reads the raw bytes:
/// only the prefixes are letters, and they are compared without regard to case.
fn batv_original_start(local: &[u8]) -> Option<usize> {
    let (prefix, sep): (&[u8], &[u8]) = if starts_with_ci(local, b"prvs=") {
        (b"prvs=", b"=")
    } else if starts_with_ci(local, b"msprvs1=") {
        (b"msprvs1=", b"=")
    } else if starts_with_ci(local, b"btv1==") {
        (b"btv1==", b"==")
    } else {
        return None;
    };
    let rest = &local[prefix.len()..];
    let tag_len = rest.iter().position(|&b| b == b'=')?;
    if tag_len == 0 {
        return None;
    }
    let orig = rest[tag_len..].strip_prefix(sep)?;
    if orig.is_empty() {
        return None;
    }
    Some(local.len() - orig.len())
}

#[derive(Clone, Copy)]
enum SrsKind {
    Srs0,
    Srs1,
}

fn is_srs_separator(b: u8) -> bool {
    matches!(b, b'=' | b'+' | b'-')
}

/// Recognises the `srs0`/`srs1` prefix in any case; the body starts at offset 5.
fn srs_kind(local: &[u8]) -> Option<SrsKind> {
    let kind = if starts_with_ci(local, b"srs0") {
        SrsKind::Srs0
    } else if starts_with_ci(local, b"srs1") {
        SrsKind::Srs1
    } else {
        return None;
    };
    is_srs_separator(*local.get(4)?).then_some(kind)
}

/// Splits off a non-empty field terminated by `=`.
fn srs_field(s: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = s.iter().position(|&b| b == b'=')?;
    if end == 0 {
        return None;
    }
    Some((&s[..end], &s[end + 1..]))
}

/// Parses `HASH=TT=domain=local` and returns the `domain=local` tail. Case plays no part:
/// fields end at `=`, and the timestamp test accepts letters of either case.
fn srs0_tail(body: &[u8]) -> Option<&[u8]> {
    let (hash, rest) = srs_field(body)?;
    let (timestamp, tail) = srs_field(rest)?;
    // SRS timestamps are two base32 characters; insisting on that keeps a
    // local part that merely starts with "srs0=" from being cut up.
    if timestamp.len() != 2 || !timestamp.iter().all(u8::is_ascii_alphanumeric) {
        return None;
    }
    let (domain, orig_local) = srs_field(tail)?;
    // A hash is base64 (no '.'), a domain has a '.': the rewritten `srs0=domain=local` then
    // never parses as SRS again, so normalising twice equals normalising once (the fuzz
    // target `normalize` found `srs0=h=TT=a=xy=b=c` rewritten twice, to `srs0=b=c`).
    if orig_local.is_empty() || hash.contains(&b'.') || !domain.contains(&b'.') {
        return None;
    }
    Some(tail)
}

/// Writes `src` lower-cased at `dst[w..]` and returns the new write offset.
#[inline]
fn put_lower(dst: &mut [u8], w: usize, src: &[u8]) -> usize {
    let end = w + src.len();
    for (o, &b) in dst[w..end].iter_mut().zip(src) {
        *o = b.to_ascii_lowercase();
    }
    end
}

/// Writes an SRS local part without hash and timestamp (`srs0=domain=local`,
/// `srs1=hop=domain=local`), or, if it is not fully shaped like SRS, lower-cased as it is:
/// VERP or identifier rules would mangle it unpredictably. Returns the length written.
fn write_srs(local: &[u8], kind: SrsKind, dst: &mut [u8]) -> usize {
    let body = &local[5..];
    let parsed = match kind {
        SrsKind::Srs0 => srs0_tail(body).map(|tail| (None, tail)),
        SrsKind::Srs1 => (|| {
            let (hash, rest) = srs_field(body)?;
            let (hop, rest) = srs_field(rest)?;
            // As in `srs0_tail`: the rewritten `srs1=hop=…` must not parse as SRS again.
            if hash.contains(&b'.') || !hop.contains(&b'.') {
                return None;
            }
            // The byte after "hop=" is the separator the first hop used
            // after its own "srs0", hence the "==" (or "=+", "=-").
            let (&sep, rest) = rest.split_first()?;
            if !is_srs_separator(sep) {
                return None;
            }
            Some((Some(hop), srs0_tail(rest)?))
        })(),
    };
    let Some((hop, tail)) = parsed else {
        return put_lower(dst, 0, local);
    };
    let mut w = put_lower(dst, 0, &local[..4]);
    dst[w] = b'=';
    w += 1;
    if let Some(hop) = hop {
        w = put_lower(dst, w, hop);
        dst[w] = b'=';
        w += 1;
    }
    put_lower(dst, w, tail)
}

// Byte classes of a lower-cased byte, looked up once per byte by the single pass.
const DIGIT: u8 = 1;
/// `0-9a-f`.
const HEX: u8 = 1 << 1;
/// `a-z`.
const LOWER: u8 = 1 << 2;
/// `a-z0-9`: a long tracking id is made of these only.
const ALNUM: u8 = 1 << 3;
/// `. - _ = +`: bytes between identifier tokens.
const SEP: u8 = 1 << 4;
/// `a-z0-9_.`: a VERP-encoded recipient's local part.
const RUN: u8 = 1 << 5;
/// `a-z0-9.-`: a VERP-encoded recipient's domain.
const DOMAIN: u8 = 1 << 6;
const DOT: u8 = 1 << 7;

const fn class_of(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => DIGIT | HEX | ALNUM | RUN | DOMAIN,
        b'a'..=b'f' => HEX | LOWER | ALNUM | RUN | DOMAIN,
        b'g'..=b'z' => LOWER | ALNUM | RUN | DOMAIN,
        b'.' => SEP | RUN | DOMAIN | DOT,
        b'-' => SEP | DOMAIN,
        b'_' => SEP | RUN,
        b'=' | b'+' => SEP,
        _ => 0,
    }
}

static CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = class_of(i as u8);
        i += 1;
    }
    t
};

/// What the single pass knows about the token being written.
struct Token {
    /// Offset in the output where it starts.
    start: usize,
    digits: usize,
    /// Classes every byte has.
    all: u8,
    /// Classes some byte has.
    any: u8,
}

impl Token {
    fn new(start: usize) -> Self {
        Self {
            start,
            digits: 0,
            all: !0,
            any: 0,
        }
    }

    /// Whether the token, `len` bytes long, looks like a per-message id rather than a name.
    #[inline]
    fn is_identifier(&self, len: usize) -> bool {
        // All digits. (Digits are hex and alphanumeric too, so this also covers the
        // other rules' digit-only tokens.)
        len > 0
            && (self.digits == len
            // Hex with a digit: eight or more characters, or four or more mixing digits and
            // letters (the middle groups of UUIDs; Amazon SES return paths carry one per
            // message, and a name rarely looks like "9c0d"). The digit spares words like
            // "deadbeef" or "cafe".
            || (self.all & HEX != 0
                && self.digits > 0
                && (len >= 8 || (len >= 4 && self.any & LOWER != 0)))
            // Base32/base36 tracking ids; the digit count spares long plain words.
            || (len >= 16 && self.digits >= 4 && self.all & ALNUM != 0))
    }

    /// Ends the token written up to `w`: an identifier becomes `#`. Returns the new offset.
    #[inline]
    fn finish(&self, dst: &mut [u8], w: usize) -> usize {
        if self.is_identifier(w - self.start) {
            dst[self.start] = b'#';
            self.start + 1
        } else {
            w
        }
    }
}

/// Writes the normalised form of a local part that is not SRS (rules 3–5 of the module
/// documentation) in one walk over its bytes, and returns the length written.
///
/// Each byte is lower-cased and written as it is read. The bytes of a token (between
/// `. - _ = +`) are classified on the way, so at its end it is either kept or rewound to `#`.
/// The `+extension` ends the walk. For the `=` VERP rule the walk remembers, at each `=`,
/// where in the output the candidate recipient would start (right after a `-` or `+`, or at
/// the start), and whether everything after the last `=` looks like a domain; if so, at the
/// end the output is cut back to that point and a `#` written. The cut always falls on a
/// token boundary, so the tokens kept before it are collapsed exactly as if the rules had
/// run one after another.
fn write_local(local: &[u8], dst: &mut [u8]) -> usize {
    // A leading '+' is the whole name, not an extension of one: then no '+' ends it.
    let plus_ends = local.first() != Some(&b'+');
    let mut w = 0;
    let mut token = Token::new(0);
    // Where the run of `a-z0-9_.` being read starts in the output, if what precedes it lets
    // it be a VERP recipient (nothing, '-' or '+').
    let mut run_cut = Some(0);
    // `run_cut` as it was at the last '=', and the byte offset after that '='.
    let mut verp: Option<(Option<usize>, usize)> = None;
    // Classes of the bytes after the last '=' (all of them, any of them).
    let (mut tail_all, mut tail_any) = (!0u8, 0u8);
    let mut end = local.len();
    for (i, &raw) in local.iter().enumerate() {
        let b = raw.to_ascii_lowercase();
        let c = CLASS[usize::from(b)];
        if c & SEP == 0 {
            dst[w] = b;
            w += 1;
            token.digits += usize::from(c & DIGIT);
            token.all &= c;
            token.any |= c;
            if c & RUN == 0 {
                run_cut = None;
            }
            tail_all &= c;
            tail_any |= c;
            continue;
        }
        if b == b'+' && plus_ends {
            end = i;
            break;
        }
        w = token.finish(dst, w);
        dst[w] = b;
        w += 1;
        token = Token::new(w);
        if b == b'=' {
            verp = Some((run_cut, i + 1));
            run_cut = None;
            (tail_all, tail_any) = (!0, 0);
        } else {
            // '.' and '_' continue a run; '-' and '+' start one that may be a recipient.
            if matches!(b, b'-' | b'+') {
                run_cut = Some(w);
            }
            tail_all &= c;
            tail_any |= c;
        }
    }
    if let Some((Some(cut), tail_start)) = verp {
        // '.' inside, not first or last, and only domain bytes. The tail holds a '.', so it
        // is not empty and `tail_start < end`.
        if tail_any & DOT != 0
            && tail_all & DOMAIN != 0
            && local[tail_start] != b'.'
            && local[end - 1] != b'.'
        {
            dst[cut] = b'#';
            return cut + 1;
        }
    }
    token.finish(dst, w)
}

#[cfg(test)]
mod model;

#[cfg(test)]
mod tests {
    use super::*;

    fn sender(input: &str) -> String {
        let mut out = Vec::new();
        Normalizer::default().sender(input, &mut out);
        String::from_utf8(out).expect("normalised sender stays UTF-8")
    }

    fn recipient(input: &str) -> String {
        let mut out = Vec::new();
        Normalizer::default().recipient(input, &mut out);
        String::from_utf8(out).expect("normalised recipient stays UTF-8")
    }

    fn v4(s: &str) -> IpAddr {
        IpAddr::V4(s.parse().unwrap())
    }

    fn v6(s: &str) -> IpAddr {
        IpAddr::V6(s.parse().unwrap())
    }

    fn net4(s: &str) -> ClientNet {
        ClientNet::V4(s.parse().unwrap())
    }

    fn net6(s: &str) -> ClientNet {
        ClientNet::V6(s.parse().unwrap())
    }

    // ---- prefixes and construction ----

    #[test]
    fn new_accepts_boundary_prefixes() {
        let n = Normalizer::new(32, 128).unwrap();
        assert_eq!((n.ipv4_prefix(), n.ipv6_prefix()), (32, 128));
        let n = Normalizer::new(0, 0).unwrap();
        assert_eq!((n.ipv4_prefix(), n.ipv6_prefix()), (0, 0));
    }

    #[test]
    fn new_rejects_ipv4_prefix_33() {
        let err = Normalizer::new(33, 64).unwrap_err();
        assert_eq!(
            err,
            PrefixError {
                family: "ipv4",
                prefix: 33,
                max: 32
            }
        );
        assert_eq!(err.to_string(), "ipv4 prefix 33 is out of range (0..=32)");
    }

    #[test]
    fn new_rejects_ipv6_prefix_129() {
        let err = Normalizer::new(24, 129).unwrap_err();
        assert_eq!(
            err,
            PrefixError {
                family: "ipv6",
                prefix: 129,
                max: 128
            }
        );
        assert_eq!(err.to_string(), "ipv6 prefix 129 is out of range (0..=128)");
        let boxed: Box<dyn std::error::Error> = Box::new(err);
        assert_eq!(
            boxed.to_string(),
            "ipv6 prefix 129 is out of range (0..=128)"
        );
    }

    #[test]
    fn default_is_24_and_64() {
        let n = Normalizer::default();
        assert_eq!((n.ipv4_prefix(), n.ipv6_prefix()), (24, 64));
        assert_eq!(n, Normalizer::new(24, 64).unwrap());
    }

    // ---- client masking ----

    #[test]
    fn client_default_masks_ipv4_to_24() {
        let n = Normalizer::default();
        assert_eq!(n.client(v4("192.0.2.77")), net4("192.0.2.0"));
        assert_eq!(n.client(v4("192.0.2.255")), net4("192.0.2.0"));
        assert_eq!(n.client(v4("192.0.3.1")), net4("192.0.3.0"));
        assert_ne!(n.client(v4("192.0.2.1")), n.client(v4("192.0.3.1")));
    }

    #[test]
    fn client_ipv4_32_keeps_host() {
        let n = Normalizer::new(32, 64).unwrap();
        assert_eq!(n.client(v4("192.0.2.77")), net4("192.0.2.77"));
        assert_eq!(n.client(v4("255.255.255.255")), net4("255.255.255.255"));
    }

    #[test]
    fn client_ipv4_0_masks_everything() {
        let n = Normalizer::new(0, 64).unwrap();
        assert_eq!(n.client(v4("192.0.2.77")), net4("0.0.0.0"));
        assert_eq!(n.client(v4("255.255.255.255")), net4("0.0.0.0"));
    }

    #[test]
    fn client_ipv4_25_splits_a_24() {
        let n = Normalizer::new(25, 64).unwrap();
        assert_eq!(n.client(v4("192.0.2.77")), net4("192.0.2.0"));
        assert_eq!(n.client(v4("192.0.2.127")), net4("192.0.2.0"));
        assert_eq!(n.client(v4("192.0.2.128")), net4("192.0.2.128"));
        assert_eq!(n.client(v4("192.0.2.200")), net4("192.0.2.128"));
    }

    #[test]
    fn client_ipv6_64_128_and_0() {
        let ip = v6("2001:db8:1:2:3:4:5:6");
        let n = Normalizer::default();
        assert_eq!(n.client(ip), net6("2001:db8:1:2::"));
        assert_eq!(
            n.client(v6("2001:db8:1:2:ffff:ffff:ffff:ffff")),
            net6("2001:db8:1:2::")
        );
        assert_eq!(n.client(v6("2001:db8:1:3::1")), net6("2001:db8:1:3::"));
        let n = Normalizer::new(24, 128).unwrap();
        assert_eq!(n.client(ip), net6("2001:db8:1:2:3:4:5:6"));
        let n = Normalizer::new(24, 0).unwrap();
        assert_eq!(n.client(ip), net6("::"));
    }

    #[test]
    fn client_ipv4_mapped_is_treated_as_ipv4() {
        let n = Normalizer::default();
        assert_eq!(n.client(v6("::ffff:192.0.2.77")), net4("192.0.2.0"));
        assert_eq!(
            n.client(v6("::ffff:192.0.2.77")),
            n.client(v4("192.0.2.77"))
        );
        // The IPv6 prefix must not apply to the mapped address.
        let n = Normalizer::new(32, 0).unwrap();
        assert_eq!(n.client(v6("::ffff:192.0.2.77")), net4("192.0.2.77"));
    }

    #[test]
    fn client_ipv4_compatible_stays_ipv6() {
        let n = Normalizer::new(24, 128).unwrap();
        assert_eq!(n.client(v6("::192.0.2.77")), net6("::c000:24d"));
    }

    #[test]
    fn encode_layout() {
        let n = Normalizer::default();
        let mut expected = [0u8; 17];
        expected[..5].copy_from_slice(&[4, 192, 0, 2, 0]);
        assert_eq!(n.client(v4("192.0.2.77")).encode(), expected);

        let mut expected = [0u8; 17];
        expected[..9].copy_from_slice(&[6, 0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 2]);
        assert_eq!(n.client(v6("2001:db8:1:2:3:4:5:6")).encode(), expected);

        let full = Normalizer::new(32, 128).unwrap();
        let enc = full.client(v6("2001:db8::ff01")).encode();
        assert_eq!(enc[0], 6);
        assert_eq!(&enc[1..5], &[0x20, 0x01, 0x0d, 0xb8]);
        assert_eq!(&enc[15..17], &[0xff, 0x01]);

        // Same all-zero address bits, different family.
        let mut zero4 = [0u8; 17];
        zero4[0] = 4;
        let mut zero6 = [0u8; 17];
        zero6[0] = 6;
        assert_eq!(net4("0.0.0.0").encode(), zero4);
        assert_eq!(net6("::").encode(), zero6);
    }

    // ---- null sender and buffer handling ----

    #[test]
    fn null_sender_appends_nothing() {
        let n = Normalizer::default();
        let mut out = b"x".to_vec();
        n.sender("", &mut out);
        assert_eq!(out, b"x");
        n.sender("<>", &mut out);
        assert_eq!(out, b"x");
        assert_eq!(sender(""), "");
        assert_eq!(sender("<>"), "");
    }

    #[test]
    fn sender_appends_without_clearing() {
        let n = Normalizer::default();
        let mut out = b"prefix:".to_vec();
        n.sender("Bounce-12345@Example.COM", &mut out);
        assert_eq!(out, b"prefix:bounce-#@example.com");
        n.sender("|John+x@Example.com", &mut out);
        assert_eq!(out, b"prefix:bounce-#@example.com|john@example.com");
    }

    #[test]
    fn sender_reuses_the_callers_buffer() {
        let n = Normalizer::default();
        let mut out = Vec::with_capacity(256);
        let ptr = out.as_ptr();
        n.sender(
            "SRS1=Abcd=forwarder.example==x7Kq=2E=example.com=john@pobox.com",
            &mut out,
        );
        n.sender("0100018c1a2b3c4d-5e6f7a8b-9c0d@amazonses.com", &mut out);
        assert_eq!(out.as_ptr(), ptr);
        assert_eq!(out.capacity(), 256);
        assert_eq!(
            out,
            b"srs1=forwarder.example=example.com=john@pobox.com#-#-#@amazonses.com"
        );
    }

    // ---- addresses that must not be rewritten ----

    #[test]
    fn ordinary_addresses_are_unchanged() {
        for addr in [
            "john.smith@example.com",
            "first-last@example.org",
            "cafe@example.com",
            "deadbeef@example.com",
            "john2000@example.com",
            "o'brien@example.ie",
            "info@example.com",
            "noreply@github.com",
            "+start@example.com",
            "jörg@example.de",
            "postmaster",
            "john@mail123.example.net",
        ] {
            assert_eq!(sender(addr), addr, "{addr}");
        }
    }

    #[test]
    fn upper_case_equals_lower_case() {
        assert_eq!(sender("John.Smith@Example.COM"), "john.smith@example.com");
        assert_eq!(
            sender("JOHN.SMITH@EXAMPLE.COM"),
            sender("john.smith@example.com")
        );
        assert_eq!(sender("NoReply@GitHub.com"), "noreply@github.com");
        assert_eq!(sender("POSTMASTER"), "postmaster");
    }

    #[test]
    fn lower_casing_is_ascii_only() {
        assert_eq!(sender("JÖRG@EXAMPLE.DE"), "jÖrg@example.de");
        assert_eq!(recipient("JÖRG@EXAMPLE.DE"), "jÖrg@example.de");
    }

    #[test]
    fn splits_at_last_at_sign() {
        // Split at the first '@' would give "john@y@example.com".
        assert_eq!(sender("john+x@y@example.com"), "john@example.com");
        assert_eq!(sender("\"a@b\"@example.com"), "\"a@b\"@example.com");
    }

    #[test]
    fn local_part_without_domain_is_normalised() {
        assert_eq!(sender("bounce-12345"), "bounce-#");
        assert_eq!(sender("John+Lists"), "john");
    }

    // ---- rule 1: BATV ----

    #[test]
    fn batv_prvs() {
        assert_eq!(
            sender("prvs=0123abcdef=john@example.com"),
            "john@example.com"
        );
        assert_eq!(
            sender("PRVS=0123ABCDEF=John@Example.COM"),
            "john@example.com"
        );
    }

    #[test]
    fn batv_microsoft() {
        assert_eq!(
            sender("msprvs1=19796hGbd4Zcc=bounces-12345@spmailtechn.com"),
            "bounces-#@spmailtechn.com"
        );
    }

    #[test]
    fn batv_barracuda() {
        assert_eq!(
            sender("btv1==25c01d1b2f3==newsletter@example.net"),
            "newsletter@example.net"
        );
    }

    #[test]
    fn batv_different_tags_normalise_equal() {
        let a = sender("prvs=0123abcdef=news@example.com");
        let b = sender("prvs=9876fedcba=news@example.com");
        assert_eq!(a, "news@example.com");
        assert_eq!(a, b);
        let a = sender("btv1==25c01d1b2f3==news@example.com");
        let b = sender("btv1==7e0a1c9d4b2==news@example.com");
        assert_eq!(a, "news@example.com");
        assert_eq!(a, b);
    }

    #[test]
    fn batv_original_goes_through_remaining_rules() {
        assert_eq!(
            sender("prvs=0123abcdef=john+lists@example.com"),
            "john@example.com"
        );
        assert_eq!(
            sender("prvs=0123abcdef=SRS0=x7Kq=2E=example.com=john@pobox.com"),
            "srs0=example.com=john@pobox.com"
        );
    }

    #[test]
    fn batv_malformed_is_not_stripped() {
        // Empty tag.
        assert_eq!(sender("prvs==john@example.com"), "prvs==john@example.com");
        // Empty original: not BATV, so the hex tag is just an identifier.
        assert_eq!(
            sender("prvs=0123abcdef=@example.com"),
            "prvs=#=@example.com"
        );
        // Barracuda needs "==" on both sides of the tag.
        assert_eq!(
            sender("btv1=tag=john@example.com"),
            "btv1=tag=john@example.com"
        );
        assert_eq!(
            sender("btv1==tag=john@example.com"),
            "btv1==tag=john@example.com"
        );
    }

    // ---- rule 2: SRS ----

    #[test]
    fn srs0_drops_hash_and_timestamp() {
        assert_eq!(
            sender("SRS0=x7Kq=2E=example.com=john@pobox.com"),
            "srs0=example.com=john@pobox.com"
        );
    }

    #[test]
    fn srs0_alternative_separators() {
        assert_eq!(
            sender("SRS0+x7Kq=2E=example.com=john@pobox.com"),
            "srs0=example.com=john@pobox.com"
        );
        assert_eq!(
            sender("srs0-x7kq=2e=example.com=john@pobox.com"),
            "srs0=example.com=john@pobox.com"
        );
    }

    #[test]
    fn srs0_different_messages_normalise_equal() {
        let a = sender("SRS0=x7Kq=2E=example.com=john@pobox.com");
        let b = sender("SRS0=Qz9+=3F=example.com=john@pobox.com");
        assert_eq!(a, b);
        assert_eq!(a, "srs0=example.com=john@pobox.com");
    }

    #[test]
    fn srs_original_local_part_is_only_lower_cased() {
        assert_eq!(
            sender("SRS0=x7Kq=2E=Example.com=John+Lists@pobox.com"),
            "srs0=example.com=john+lists@pobox.com"
        );
        assert_eq!(
            sender("SRS0=x7Kq=2E=example.com=bounce-12345=user=example.org@pobox.com"),
            "srs0=example.com=bounce-12345=user=example.org@pobox.com"
        );
    }

    #[test]
    fn srs1_keeps_first_hop() {
        assert_eq!(
            sender("SRS1=Abcd=forwarder.example==x7Kq=2E=example.com=john@pobox.com"),
            "srs1=forwarder.example=example.com=john@pobox.com"
        );
        // First hop used '+' after its own "SRS0".
        assert_eq!(
            sender("SRS1+Abcd=forwarder.example=+x7Kq=2E=example.com=john@pobox.com"),
            "srs1=forwarder.example=example.com=john@pobox.com"
        );
    }

    #[test]
    fn srs1_different_messages_normalise_equal() {
        let a = sender("SRS1=Abcd=forwarder.example==x7Kq=2E=example.com=john@pobox.com");
        let b = sender("SRS1=Wxyz=forwarder.example==Lm3n=4G=example.com=john@pobox.com");
        assert_eq!(a, b);
        assert_eq!(a, "srs1=forwarder.example=example.com=john@pobox.com");
    }

    #[test]
    fn srs_malformed_is_left_unchanged() {
        // Missing timestamp.
        assert_eq!(
            sender("SRS0=x7Kq=example.com=john@pobox.com"),
            "srs0=x7kq=example.com=john@pobox.com"
        );
        // Missing original local part; identifier rules must not touch it.
        assert_eq!(
            sender("SRS0=x7Kq=2E=12345@pobox.com"),
            "srs0=x7kq=2e=12345@pobox.com"
        );
        // Empty hash.
        assert_eq!(
            sender("SRS0==2E=example.com=john@pobox.com"),
            "srs0==2e=example.com=john@pobox.com"
        );
        // SRS1 without the "==" after the first hop.
        assert_eq!(
            sender("SRS1=Abcd=forwarder.example=x7Kq=2E=example.com=john@pobox.com"),
            "srs1=abcd=forwarder.example=x7kq=2e=example.com=john@pobox.com"
        );
    }

    /// Found by the `normalize` fuzz target: a second pass rewrote what the first had written
    /// (a BATV tag inside a BATV tag; an SRS original local part that itself looked like
    /// `TT=domain=local`). Normalising twice must equal normalising once.
    #[test]
    fn normalising_twice_equals_once() {
        for input in [
            "prvs=1234abcd=prvs=5678ef01=bounce@lists.example",
            "btv1==05a==msprvs1=17aaa=x@y.example",
            "SRS0=hh=TT=ab.example=xy=q=r.s=t@fwd.example",
            "SRS0=hh=TT=exa.mple=tt=@x.y=z@fwd.example",
            "SRS1=HHH=fwd1.example==hh=TT=ab.example=xy=q=r.s=t@fwd2.example",
            "SRS0=x7Kq=2E=example.com=john@pobox.com",
            "<>+BbaoT",
        ] {
            let once = sender(input);
            assert_eq!(sender(&once), once, "{input}");
        }
        // Still rewritten as before: real SRS and BATV.
        assert_eq!(
            sender("prvs=1234abcd=prvs=5678ef01=bounce@lists.example"),
            "bounce@lists.example"
        );
        assert_eq!(
            sender("SRS0=hh=TT=ab.example=xy=q=r.s=t@fwd.example"),
            "srs0=ab.example=xy=q=r.s=t@fwd.example"
        );
        // What normalises to "<>" is the null sender.
        assert_eq!(sender("<>+BbaoT"), "");
        // A "hash" with a dot or a "domain" without one is not SRS: left as it is.
        assert_eq!(
            sender("SRS0=a.b=TT=example=john@fwd.example"),
            "srs0=a.b=tt=example=john@fwd.example"
        );
    }

    #[test]
    fn srs_prefix_needs_a_separator() {
        // Not SRS, so the ordinary rules apply.
        assert_eq!(sender("srs0x+tag@example.com"), "srs0x@example.com");
    }

    // ---- rule 3: +extension ----

    #[test]
    fn plus_extension_is_dropped() {
        assert_eq!(sender("john+lists@example.com"), "john@example.com");
        assert_eq!(sender("john+a+b@example.com"), "john@example.com");
        assert_eq!(
            sender("notification+zrdo3ofpsaid@facebookmail.com"),
            "notification@facebookmail.com"
        );
    }

    #[test]
    fn leading_plus_is_kept() {
        assert_eq!(sender("+start@example.com"), "+start@example.com");
        // The '+' is also a token separator for the identifier rule.
        assert_eq!(sender("+123@example.com"), "+#@example.com");
    }

    #[test]
    fn mailman_verp() {
        let a = sender("mylist-bounces+john=example.com@lists.example.org");
        let b = sender("mylist-bounces+jane.doe=example.net@lists.example.org");
        assert_eq!(a, "mylist-bounces@lists.example.org");
        assert_eq!(a, b);
    }

    #[test]
    fn sendgrid_verp() {
        let a = sender("bounces+1234567-ab12-john=example.com@em1234.example.com");
        let b = sender("bounces+7654321-cd34-jane=example.org@em1234.example.com");
        assert_eq!(a, "bounces@em1234.example.com");
        assert_eq!(a, b);
    }

    // ---- rule 4: '=' VERP ----

    #[test]
    fn ezmlm_verp() {
        let a = sender("list-return-123-john=example.com@lists.example.org");
        let b = sender("list-return-456-jane.doe=example.net@lists.example.org");
        assert_eq!(a, "list-return-#-#@lists.example.org");
        assert_eq!(a, b);
        assert_eq!(
            sender("list-return-123-john.smith=example.com@lists.example.org"),
            "list-return-#-#@lists.example.org"
        );
    }

    #[test]
    fn mailchimp_verp() {
        let a = sender("bounce-mc.us5_12345678.1234567-user=example.com@mail123.mcsv.net");
        let b = sender("bounce-mc.us5_12345678.7654321-other_user=example.org@mail123.mcsv.net");
        assert_eq!(a, "bounce-mc.us5_#.#-#@mail123.mcsv.net");
        assert_eq!(a, b);
    }

    #[test]
    fn verp_without_separator_replaces_whole_local_part() {
        assert_eq!(
            sender("john.smith=example.com@bounces.example.org"),
            "#@bounces.example.org"
        );
        assert_eq!(
            sender("bounce-john=mail-host.example.com@x.example"),
            "bounce-#@x.example"
        );
    }

    #[test]
    fn verp_requires_a_domain_after_the_last_equals() {
        // No dot.
        assert_eq!(sender("a=b@example.com"), "a=b@example.com");
        // Leading or trailing dot.
        assert_eq!(
            sender("news=.example.com@x.example"),
            "news=.example.com@x.example"
        );
        assert_eq!(sender("news=example.@x.example"), "news=example.@x.example");
        // '_' is not a domain character.
        assert_eq!(
            sender("user=exa_mple.com@x.example"),
            "user=exa_mple.com@x.example"
        );
    }

    #[test]
    fn verp_preceded_by_unknown_character_is_left() {
        assert_eq!(
            sender("o'brien=example.com@x.example"),
            "o'brien=example.com@x.example"
        );
        assert_eq!(
            sender("a=b=example.com@x.example"),
            "a=b=example.com@x.example"
        );
    }

    // ---- rule 5: identifiers ----

    #[test]
    fn digit_tokens_become_hash() {
        assert_eq!(sender("bounce-0@example.com"), "bounce-#@example.com");
        assert_eq!(
            sender("id.123_456=789-abc@example.com"),
            "id.#_#=#-abc@example.com"
        );
        assert_eq!(sender("12345@example.com"), "#@example.com");
    }

    #[test]
    fn hex_tokens_need_a_digit_and_eight_chars_or_a_letter() {
        assert_eq!(
            sender("bounce-3f2a9c1d77e0@example.com"),
            "bounce-#@example.com"
        );
        assert_eq!(
            sender("bounce-abc12345@example.com"),
            "bounce-#@example.com"
        );
        // Shorter hex runs go only when they mix digits and letters (UUID groups)...
        assert_eq!(sender("bounce-abc1234@example.com"), "bounce-#@example.com");
        assert_eq!(sender("bounce-9c0d@example.com"), "bounce-#@example.com");
        // ...not when shorter than four, and all-digit ones go by the digit rule anyway.
        assert_eq!(sender("bounce-9c0@example.com"), "bounce-9c0@example.com");
        assert_eq!(
            sender("bounce-deadbeef@example.com"),
            "bounce-deadbeef@example.com"
        );
        assert_eq!(
            sender("bounce-deadbee1@example.com"),
            "bounce-#@example.com"
        );
    }

    #[test]
    fn long_alphanumeric_tokens_need_sixteen_chars_and_four_digits() {
        assert_eq!(
            sender("msg-k3j4h5g6f7d8s9a0@example.com"),
            "msg-#@example.com"
        );
        assert_eq!(
            sender("msg-abcdefghijkl1234@example.com"),
            "msg-#@example.com"
        );
        // 15 characters.
        assert_eq!(
            sender("msg-k3j4h5g6f7d8s9a@example.com"),
            "msg-k3j4h5g6f7d8s9a@example.com"
        );
        // Only three digits.
        assert_eq!(
            sender("msg-abcdefghijklm123@example.com"),
            "msg-abcdefghijklm123@example.com"
        );
    }

    #[test]
    fn amazon_ses() {
        // Tokens: 0100018c1a2b3c4d (16 hex) -> #, 5e6f7a8b (8 hex) -> #,
        // 9c0d / 4e1f / a2b3 (4 hex, digits and letters) -> #, c4d5e6f7a8b9 (12 hex) -> #,
        // 000000 (digits) -> #.
        assert_eq!(
            sender("0100018c1a2b3c4d-5e6f7a8b-9c0d-4e1f-a2b3-c4d5e6f7a8b9-000000@amazonses.com"),
            "#-#-#-#-#-#-#@amazonses.com"
        );
        // Two messages of one SES sender are one sender.
        assert_eq!(
            sender("0100018c1a2b3c4d-5e6f7a8b-9c0d-4e1f-a2b3-c4d5e6f7a8b9-000000@amazonses.com"),
            sender("0100018c99f0e1d2-77aa88bb-1e2f-43ac-b0c1-d2e3f4a5b6c7-000000@amazonses.com")
        );
        // Short hex-looking words without digits, and 3-character groups, stay.
        assert_eq!(sender("cafe-face@example.com"), "cafe-face@example.com");
        assert_eq!(sender("mp3-fan@example.com"), "mp3-fan@example.com");
    }

    #[test]
    fn domain_is_never_rewritten() {
        assert_eq!(
            sender("bounce-123@123.45.example.com"),
            "bounce-#@123.45.example.com"
        );
        assert_eq!(
            sender("john@em1234+x.example.com"),
            "john@em1234+x.example.com"
        );
    }

    // ---- the single pass against the old rule-by-rule model ----

    use proptest::prelude::*;

    /// Pieces senders are made of, in both cases, including the shapes every rule looks for.
    fn atom() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-zA-Z]{1,10}",
            "[0-9]{1,20}",
            "[0-9a-fA-F]{1,20}",
            "[0-9a-zA-Z]{10,24}",
            "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
            "[a-z0-9]{1,8}\\.[a-zA-Z]{2,4}",
            "[a-z0-9-]{1,8}\\.[a-z0-9.-]{0,8}",
            "[äöüÖé]{1,3}",
            "[#'\"@!. ]",
            Just(String::new()),
        ]
    }

    fn separator() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec![".", "-", "_", "=", "+", "", "==", "=+", "=-", "@"])
    }

    /// Prefixes of BATV and SRS, well- and ill-formed.
    fn prefix() -> impl Strategy<Value = String> {
        let tag = "[0-9a-zA-Z]{0,12}";
        prop_oneof![
            Just(String::new()),
            Just(String::new()),
            tag.prop_map(|t| format!("prvs={t}=")),
            tag.prop_map(|t| format!("PRVS={t}=")),
            tag.prop_map(|t| format!("msprvs1={t}=")),
            tag.prop_map(|t| format!("btv1=={t}==")),
            tag.prop_map(|t| format!("BTV1=={t}=")),
            (tag, "[0-9a-zA-Z+/]{0,3}", "[=+-]").prop_map(|(h, t, s)| format!("SRS0{s}{h}={t}=")),
            (tag, "[a-z.]{0,12}", "[=+-]{1,2}", "[0-9a-zA-Z]{0,3}")
                .prop_map(|(h, hop, s, t)| format!("srs1={h}={hop}={s}{h}={t}=")),
            "(srs[01]|SRS[01]|prvs|btv1)[=+-]{0,2}",
        ]
    }

    fn address() -> impl Strategy<Value = String> {
        (
            prefix(),
            prop::collection::vec((atom(), separator()), 0..7),
            prop_oneof![
                Just(String::new()),
                "@[a-zA-Z0-9.-]{0,20}",
                "@[a-z]{1,5}@[a-z.]{1,10}",
            ],
            prop::bool::weighted(0.05),
        )
            .prop_map(|(prefix, parts, domain, null)| {
                if null {
                    return ["", "<>"][prefix.len() % 2].to_owned();
                }
                let mut s = prefix;
                for (a, sep) in parts {
                    s.push_str(&a);
                    s.push_str(sep);
                }
                s.push_str(&domain);
                s
            })
    }

    fn both(input: &str) -> (Vec<u8>, Vec<u8>) {
        let mut new = b"p:".to_vec();
        Normalizer::default().sender(input, &mut new);
        let mut old = b"p:".to_vec();
        model::sender(input, &mut old);
        (new, old)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(20_000))]

        #[test]
        fn single_pass_matches_model_on_addresses(input in address()) {
            let (new, old) = both(&input);
            prop_assert_eq!(new, old, "{:?}", input);
        }

        #[test]
        fn single_pass_matches_model_on_symbol_soup(input in "[a-fA-Z0-9.=+_@<>#-]{0,40}") {
            let (new, old) = both(&input);
            prop_assert_eq!(new, old, "{:?}", input);
        }

        #[test]
        fn single_pass_matches_model_on_any_string(input in any::<String>()) {
            // Mostly non-ASCII, which every rule leaves alone: fewer cases find as much.
            let (new, old) = both(&input);
            prop_assert_eq!(new, old, "{:?}", input);
        }
    }

    #[test]
    fn single_pass_matches_model_on_the_listed_cases() {
        // Shapes found while writing the single pass: a kept leading '+' before a VERP
        // recipient, an '=' tail with a leading or trailing dot, an empty VERP run.
        for input in [
            "+a+b=example.com@x",
            "+a+b@x",
            "list-=example.com@x",
            "a==b.com@x",
            "x-.y=a.b@c",
            "x-y=.a.b@c",
            "x-y=a.b.@c",
            "x-y=a.b=@c",
            "12-34=a.b@c",
            "=a.b@c",
            "prvs=t=+x@y",
            "btv1==t==srs0=a=bc=d=e@f",
            "SRS1=h=hop=+h=tt=d=l@x",
            "srs1=h=hop=xh=tt=d=l@x",
            "0123abcd-EF01-1234-ABCD-0123456789ab@x",
            // What the proptests shrank to when the single pass was broken on purpose (VERP
            // tail ending in '.' accepted; four-character hex tokens kept).
            "A=-.+",
            "0a00000a-00a0-aa0a-00a0-aa0aaa0aaa0a.",
        ] {
            let (new, old) = both(input);
            assert_eq!(
                String::from_utf8_lossy(&new),
                String::from_utf8_lossy(&old),
                "{input}"
            );
        }
    }

    // ---- recipient ----

    #[test]
    fn recipient_is_only_lower_cased() {
        assert_eq!(
            recipient("John.Smith+Tag@Example.COM"),
            "john.smith+tag@example.com"
        );
        assert_eq!(
            recipient("user-12345@example.com"),
            "user-12345@example.com"
        );
        assert_eq!(
            recipient("prvs=0123abcdef=john@example.com"),
            "prvs=0123abcdef=john@example.com"
        );
        assert_ne!(
            recipient("john+a@example.com"),
            recipient("john+b@example.com")
        );
    }

    #[test]
    fn recipient_appends_without_clearing() {
        let n = Normalizer::default();
        let mut out = b"rcpt:".to_vec();
        n.recipient("Info+Sales@Example.ORG", &mut out);
        assert_eq!(out, b"rcpt:info+sales@example.org");
    }
}
