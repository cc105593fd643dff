//! Postfix SMTPD policy delegation protocol (see Postfix's
//! `SMTPD_POLICY_README`), plus the texts Greyhound sends through it.
//!
//! Postfix writes a block of `name=value` lines ended by an empty line and
//! waits for `action=...` followed by an empty line; the connection is then
//! reused for the next block. The codec is sans-IO and on the hot path:
//! [`parse`] borrows every value from the caller's buffer and never
//! allocates, and the encoders append to a caller's `Vec<u8>`.

use super::push_clean;

/// The only `request=` value Postfix sends to a policy service.
pub const POLICY_REQUEST: &str = "smtpd_access_policy";

/// Longest `action=...` line [`encode_action`] writes, in bytes, counting
/// `action=` and the `\n` (RFC 5321 caps an SMTP reply line at 512 octets,
/// and Postfix truncates longer texts anyway).
pub const MAX_ACTION_LINE: usize = 512;

/// Bounds on what one request block may cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockLimits {
    /// Largest block in bytes, every line's terminator and the final empty
    /// line included (so a block is accepted iff its `consumed` is at most
    /// this). Default 16384; Postfix's real blocks are well under 2 KiB.
    pub max_block: usize,
    /// Most `name=value` lines in one block, unknown ones included.
    /// Default 128; Postfix 3.8 sends about 35.
    pub max_attrs: usize,
}

impl Default for BlockLimits {
    fn default() -> Self {
        BlockLimits {
            max_block: 16384,
            max_attrs: 128,
        }
    }
}

/// The attributes greylisting needs, borrowed from the buffer. Missing
/// attributes are `""`, as Postfix itself sends empty values for unknowns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PolicyRequest<'a> {
    /// Always [`POLICY_REQUEST`] in a parsed block.
    pub request: &'a str,
    /// SMTP stage: `CONNECT`, `EHLO`, `HELO`, `MAIL`, `RCPT`, `DATA`, ...
    pub protocol_state: &'a str,
    /// Client IP address as text (IPv6 without brackets).
    pub client_address: &'a str,
    /// Verified client hostname, or `unknown`.
    pub client_name: &'a str,
    /// Unverified reverse DNS name of the client, or `unknown`.
    pub reverse_client_name: &'a str,
    /// Name given in HELO/EHLO; empty if none yet.
    pub helo_name: &'a str,
    /// Envelope sender; empty for the null sender.
    pub sender: &'a str,
    /// Envelope recipient; empty before `RCPT`.
    pub recipient: &'a str,
    /// SASL login name; empty if the client did not authenticate.
    pub sasl_username: &'a str,
    /// `ESMTP` or `SMTP`, for `%p` in the greylist text; empty if not sent.
    pub protocol_name: &'a str,
    /// Verified client certificate subject (common name); empty without one.
    pub ccert_subject: &'a str,
    /// Client certificate fingerprint (`AB:CD:…`); empty without a certificate.
    pub ccert_fingerprint: &'a str,
    /// Client certificate public key fingerprint; empty without a certificate.
    pub ccert_pubkey_fingerprint: &'a str,
    /// Postfix queue ID, for log correlation; may be empty.
    pub queue_id: &'a str,
    /// Postfix's per-message instance tag: equal across the recipients of
    /// one message.
    pub instance: &'a str,
}

impl<'a> PolicyRequest<'a> {
    /// Stores one attribute; unknown names are ignored as the README demands,
    /// and a repeated name overwrites (last one wins).
    fn set(&mut self, name: &str, value: &'a str) {
        let slot = match name {
            "request" => &mut self.request,
            "protocol_state" => &mut self.protocol_state,
            "client_address" => &mut self.client_address,
            "client_name" => &mut self.client_name,
            "reverse_client_name" => &mut self.reverse_client_name,
            "helo_name" => &mut self.helo_name,
            "sender" => &mut self.sender,
            "recipient" => &mut self.recipient,
            "sasl_username" => &mut self.sasl_username,
            "queue_id" => &mut self.queue_id,
            "protocol_name" => &mut self.protocol_name,
            "ccert_subject" => &mut self.ccert_subject,
            "ccert_fingerprint" => &mut self.ccert_fingerprint,
            "ccert_pubkey_fingerprint" => &mut self.ccert_pubkey_fingerprint,
            "instance" => &mut self.instance,
            _ => return,
        };
        *slot = value;
    }
}

/// Why a block was refused. Every error is final for the connection: the
/// server logs it and closes without a reply, which Postfix reports as a
/// policy server problem instead of acting on a guess.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// More than `max_block` bytes without a complete block.
    #[error("policy request block larger than the limit")]
    BlockTooLarge,
    /// More than `max_attrs` attribute lines in one block.
    #[error("too many attributes in policy request")]
    TooManyAttributes,
    /// A line without `=`, or with an empty name.
    #[error("policy request line is not name=value")]
    BadLine,
    /// A line is not valid UTF-8.
    #[error("policy request is not valid UTF-8")]
    BadUtf8,
    /// NUL or another control character (tab is allowed in a value only).
    #[error("control character in policy request")]
    Control,
    /// `request=` is missing or not `smtpd_access_policy`.
    #[error("not an smtpd_access_policy request")]
    NotPolicyRequest,
}

impl PolicyError {
    /// Every error, in declaration order; handy for metrics labels and tests.
    pub const ALL: [PolicyError; 6] = [
        PolicyError::BlockTooLarge,
        PolicyError::TooManyAttributes,
        PolicyError::BadLine,
        PolicyError::BadUtf8,
        PolicyError::Control,
        PolicyError::NotPolicyRequest,
    ];

    /// Stable short code for logs and metrics labels.
    #[must_use]
    pub const fn as_code(self) -> &'static str {
        match self {
            PolicyError::BlockTooLarge => "block-too-large",
            PolicyError::TooManyAttributes => "too-many-attributes",
            PolicyError::BadLine => "bad-line",
            PolicyError::BadUtf8 => "bad-utf8",
            PolicyError::Control => "control-char",
            PolicyError::NotPolicyRequest => "not-policy-request",
        }
    }
}

/// Result of looking at the front of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
// The request (15 borrowed strings, 248 bytes) is returned by value and lives for one call on
// the stack; boxing it, as the lint suggests, would allocate for every request.
#[allow(clippy::large_enum_variant)]
pub enum Block<'a> {
    /// No complete block yet, and it can still fit the limits: read more.
    Incomplete,
    /// One complete block.
    Complete {
        /// Bytes to drop from the buffer, the final empty line included.
        consumed: usize,
        /// The attributes greylisting needs.
        request: PolicyRequest<'a>,
    },
}

/// Looks for one complete block at the front of `buf`.
///
/// Lines end in `\n`; a trailing `\r` is stripped (Postfix sends bare `\n`).
/// Errors are final for the connection. [`PolicyError::BlockTooLarge`] comes
/// as soon as `buf` holds more than `limits.max_block` bytes without a
/// complete block, so an endless block is refused after `max_block + 1`
/// bytes instead of being buffered; no more than `max_block` bytes are ever
/// scanned. Complete lines are checked as soon as they are seen, so a bad
/// line is reported even before its block ends. Duplicate attributes: last
/// one wins.
///
/// # Errors
///
/// Any [`PolicyError`]: the block is malformed or over the limits, and the
/// connection should be closed without a reply.
pub fn parse<'a>(buf: &'a [u8], limits: &BlockLimits) -> Result<Block<'a>, PolicyError> {
    // The whole block, final empty line included, must lie in this window.
    let window = &buf[..buf.len().min(limits.max_block)];
    if let Some(block) = parse_clean(window, limits) {
        return block;
    }
    parse_line_by_line(window, buf.len(), limits)
}

/// The common case in few instructions: a complete block of printable text and `\n` only
/// (what Postfix sends), checked and validated as a whole instead of line by line. Checking
/// each of Postfix's ~35 lines on its own (two searches, a control scan and a UTF-8 check per
/// line) cost ~7,000 instructions per block (callgrind); whole-block passes cost a fraction.
/// `None` when the block is not complete yet or holds anything else (a tab, a `\r`, a line
/// without `=`, too many lines, ...): [`parse_line_by_line`] then finds and names the fault
/// in line order, exactly as it always does.
fn parse_clean<'a>(
    window: &'a [u8],
    limits: &BlockLimits,
) -> Option<Result<Block<'a>, PolicyError>> {
    // One search for every line end up to the first empty line, which ends the block (no `\r`
    // is allowed on this path, so an empty line is "\n" right after another).
    // Line ends are kept on the stack; a block of more lines goes the careful way.
    let mut ends = [0u32; 64];
    let mut lines = 0;
    let mut start = 0;
    let mut end_of_block = None;
    for end in memchr::memchr_iter(b'\n', window) {
        if end == start {
            end_of_block = Some(end);
            break;
        }
        if lines == ends.len() || lines >= limits.max_attrs {
            return None;
        }
        ends[lines] = u32::try_from(end).ok()?;
        lines += 1;
        start = end + 1;
    }
    let end = end_of_block?;
    // Checked as a whole: printable text and line ends only (a tab, `\r` or other control
    // character sends the block the careful way), then UTF-8.
    let block = &window[..end];
    let clean = block.iter().fold(true, |ok, &b| {
        ok & (((0x20..0x7f).contains(&b) | (b >= 0x80)) | (b == b'\n'))
    });
    if !clean || lines == 0 {
        return None;
    }
    let text = std::str::from_utf8(block).ok()?;
    let mut request = PolicyRequest::default();
    let mut start = 0;
    for &end in &ends[..lines] {
        let end = end as usize;
        match block[start..end].iter().position(|&b| b == b'=') {
            // `\n` and `=` are ASCII, so every cut is at a character boundary.
            Some(at) if at > 0 => {
                request.set(&text[start..start + at], &text[start + at + 1..end]);
            }
            _ => return None,
        }
        start = end + 1;
    }
    Some(if request.request == POLICY_REQUEST {
        Ok(Block::Complete {
            consumed: end + 1,
            request,
        })
    } else {
        Err(PolicyError::NotPolicyRequest)
    })
}

/// The general case: each line is checked as soon as it is complete, in order.
fn parse_line_by_line<'a>(
    window: &'a [u8],
    buffered: usize,
    limits: &BlockLimits,
) -> Result<Block<'a>, PolicyError> {
    let mut request = PolicyRequest::default();
    let mut attrs = 0usize;
    let mut pos = 0;
    while let Some(len) = memchr::memchr(b'\n', &window[pos..]) {
        let raw = &window[pos..pos + len];
        pos += len + 1;
        let line = raw.strip_suffix(b"\r").unwrap_or(raw);
        if line.is_empty() {
            if request.request != POLICY_REQUEST {
                return Err(PolicyError::NotPolicyRequest);
            }
            return Ok(Block::Complete {
                consumed: pos,
                request,
            });
        }
        attrs += 1;
        if attrs > limits.max_attrs {
            return Err(PolicyError::TooManyAttributes);
        }
        let (name, value) = split_attribute(line)?;
        request.set(name, value);
    }
    if buffered > limits.max_block {
        Err(PolicyError::BlockTooLarge)
    } else {
        Ok(Block::Incomplete)
    }
}

/// Splits `name=value` at the first `=`. Control characters are checked on
/// bytes first so a NUL is reported as such even in otherwise bad lines.
///
/// Every line of a block is checked, including the ~30 attributes greylisting ignores; this
/// was two thirds of a policy request's instructions (callgrind: ~12,700 per 35-attribute
/// block with byte-at-a-time searches and per-character splitting, ~3,000 with `memchr` and
/// the branch-free checks below).
fn split_attribute(line: &[u8]) -> Result<(&str, &str), PolicyError> {
    let name_end = memchr::memchr(b'=', line);
    let (name, value) = line.split_at(name_end.unwrap_or(line.len()));
    // Postfix's values may hold tabs (e.g. in certificate subjects); names never.
    let control_in_name = name
        .iter()
        .fold(false, |c, &b| c | (b < 0x20) | (b == 0x7f));
    let control_in_value = value
        .iter()
        .fold(false, |c, &b| c | ((b < 0x20) & (b != b'\t')) | (b == 0x7f));
    if control_in_name || control_in_value {
        return Err(PolicyError::Control);
    }
    let text = std::str::from_utf8(line).map_err(|_| PolicyError::BadUtf8)?;
    match name_end {
        // `=` is ASCII, so both sides of it are character boundaries.
        Some(at) if at > 0 => Ok((&text[..at], &text[at + 1..])),
        _ => Err(PolicyError::BadLine),
    }
}

/// Appends `action=<action>\n\n`. Control characters in the text are
/// replaced by spaces (a reply is one line), and the action line is limited
/// to [`MAX_ACTION_LINE`] bytes including `action=` and its `\n` (cut at a
/// character boundary).
pub fn encode_action(action: &str, out: &mut Vec<u8>) {
    const PREFIX: &str = "action=";
    out.extend_from_slice(PREFIX.as_bytes());
    push_clean(action, MAX_ACTION_LINE - PREFIX.len() - 1, out);
    out.extend_from_slice(b"\n\n");
}

/// The action of a DEFER answer to Postfix (`defer-action`): the reply code and text Postfix
/// gives the SMTP client. `DEFER_IF_PERMIT` (the default) lets a later restriction that rejects
/// win over the greylisting; `DEFER` defers whatever follows; `450` and `451` defer with that
/// SMTP code and the enhanced status `4.7.1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeferAction {
    /// `action=DEFER_IF_PERMIT <text>`.
    #[default]
    DeferIfPermit,
    /// `action=DEFER <text>`.
    Defer,
    /// `action=450 4.7.1 <text>`.
    Code450,
    /// `action=451 4.7.1 <text>`.
    Code451,
}

impl DeferAction {
    /// Every value as the configuration writes it, in declaration order.
    pub const NAMES: [&'static str; 4] = ["DEFER_IF_PERMIT", "DEFER", "450", "451"];

    /// The value as the configuration writes it.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        Self::NAMES[self as usize]
    }

    /// What the action line holds before the text, its separating space included.
    #[must_use]
    pub const fn prefix(self) -> &'static str {
        match self {
            DeferAction::DeferIfPermit => "DEFER_IF_PERMIT ",
            DeferAction::Defer => "DEFER ",
            DeferAction::Code450 => "450 4.7.1 ",
            DeferAction::Code451 => "451 4.7.1 ",
        }
    }
}

impl std::str::FromStr for DeferAction {
    type Err = String;

    /// One of [`DeferAction::NAMES`], any case; the error quotes the input and lists them.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const ALL: [DeferAction; 4] = [
            DeferAction::DeferIfPermit,
            DeferAction::Defer,
            DeferAction::Code450,
            DeferAction::Code451,
        ];
        ALL.into_iter()
            .find(|a| a.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("{s:?} is not one of {}", Self::NAMES.join(", ")))
    }
}

impl std::fmt::Display for DeferAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Appends the answer to a greylisted request: `action=<action> <text>\n\n` (for the numeric
/// actions `action=450 4.7.1 <text>`). The text is cleaned and the line limited as in
/// [`encode_action`].
pub fn encode_defer(action: DeferAction, text: &str, out: &mut Vec<u8>) {
    const PREFIX: &str = "action=";
    let head = action.prefix();
    out.extend_from_slice(PREFIX.as_bytes());
    out.extend_from_slice(head.as_bytes());
    push_clean(text, MAX_ACTION_LINE - PREFIX.len() - head.len() - 1, out);
    out.extend_from_slice(b"\n\n");
}

/// Values for [`expand_template`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TemplateVars<'a> {
    /// `%s`: the envelope sender; `""` (null sender) is written `<>`.
    pub sender: &'a str,
    /// `%r`: the envelope recipient.
    pub recipient: &'a str,
    /// `%c`: the client address.
    pub client: &'a str,
    /// `%h`: the HELO name.
    pub helo: &'a str,
    /// `%d`: seconds left until a retry is accepted.
    pub seconds: u32,
    /// `%p`: the SMTP protocol name (`ESMTP`, `SMTP`); `""` when unknown.
    pub protocol: &'a str,
}

/// Expands the greylist text template: `%s` sender (`<>` for the null
/// sender), `%r` recipient, `%c` client address, `%h` helo name, `%d` seconds
/// left, `%p` protocol name (`ESMTP`, `SMTP`; empty when unknown), `%%` a literal percent; any other `%x`, and a trailing lone `%`, is
/// kept literally. Values are copied as they are (the encoders replace
/// control characters), so the appended bytes are valid UTF-8.
pub fn expand_template(template: &str, vars: &TemplateVars<'_>, out: &mut Vec<u8>) {
    let mut rest = template;
    while let Some(at) = memchr::memchr(b'%', rest.as_bytes()) {
        out.extend_from_slice(&rest.as_bytes()[..at]);
        let after = &rest[at + 1..];
        let value = match after.as_bytes().first() {
            Some(b's') if vars.sender.is_empty() => "<>",
            Some(b's') => vars.sender,
            Some(b'r') => vars.recipient,
            Some(b'c') => vars.client,
            Some(b'h') => vars.helo,
            Some(b'p') => vars.protocol,
            Some(b'%') => "%",
            Some(b'd') => {
                push_u64(u64::from(vars.seconds), 1, out);
                rest = &after[1..];
                continue;
            }
            // Unknown or missing letter: keep the '%' and let the next
            // character (if any) be copied as ordinary text.
            _ => {
                out.push(b'%');
                rest = after;
                continue;
            }
        };
        out.extend_from_slice(value.as_bytes());
        // The placeholder letter is ASCII, so index 1 is a char boundary.
        rest = &after[1..];
    }
    out.extend_from_slice(rest.as_bytes());
}

/// The default text, following postgrey's custom.
pub const DEFAULT_GREYLIST_TEXT: &str = "Greylisted, see https://greylisting.org/; from=%s to=%r";

/// Appends the PREPEND action value (without `action=`) for a message that
/// passed after being delayed, in postgrey's format:
/// `PREPEND X-Greylist: delayed 312 seconds by greyhound-0.1.0 at mx1.example.net; Mon, 23 Nov 2026 09:03:22 +0000`.
/// The date is `unix_now` in UTC as RFC 5322 writes it. Control characters
/// in `version` and `host` become spaces so the header cannot be split.
pub fn x_greylist_prepend(
    delayed_secs: u32,
    version: &str,
    host: &str,
    unix_now: u64,
    out: &mut Vec<u8>,
) {
    out.extend_from_slice(b"PREPEND X-Greylist: delayed ");
    push_u64(u64::from(delayed_secs), 1, out);
    out.extend_from_slice(b" seconds by greyhound-");
    push_clean(version, usize::MAX, out);
    out.extend_from_slice(b" at ");
    push_clean(host, usize::MAX, out);
    out.extend_from_slice(b"; ");
    push_rfc5322_date(unix_now, out);
}

/// Appends e.g. `Thu, 01 Jan 1970 00:00:00 +0000`. Day, hour, minute and
/// second have two digits and the year at least four, as RFC 5322 allows
/// and mail software commonly writes.
fn push_rfc5322_date(unix: u64, out: &mut Vec<u8>) {
    let days = unix / 86_400;
    let secs = unix % 86_400;
    let (year, month, day) = civil_from_days(days);
    // 1970-01-01 was a Thursday.
    let weekday = match (days + 4) % 7 {
        0 => "Sun",
        1 => "Mon",
        2 => "Tue",
        3 => "Wed",
        4 => "Thu",
        5 => "Fri",
        _ => "Sat",
    };
    out.extend_from_slice(weekday.as_bytes());
    out.extend_from_slice(b", ");
    push_u64(day, 2, out);
    out.push(b' ');
    let month_name = match month {
        1 => "Jan",
        2 => "Feb",
        3 => "Mar",
        4 => "Apr",
        5 => "May",
        6 => "Jun",
        7 => "Jul",
        8 => "Aug",
        9 => "Sep",
        10 => "Oct",
        11 => "Nov",
        // civil_from_days yields only 1..=12.
        _ => "Dec",
    };
    out.extend_from_slice(month_name.as_bytes());
    out.push(b' ');
    push_u64(year, 4, out);
    out.push(b' ');
    push_u64(secs / 3600, 2, out);
    out.push(b':');
    push_u64(secs / 60 % 60, 2, out);
    out.push(b':');
    push_u64(secs % 60, 2, out);
    out.extend_from_slice(b" +0000");
}

/// (year, month 1–12, day 1–31) of a day count since 1970-01-01, after
/// Howard Hinnant's `civil_from_days`. Unix time here is never negative, so
/// unsigned arithmetic suffices and no value can overflow even for
/// `u64::MAX` seconds.
pub(crate) fn civil_from_days(days: u64) -> (u64, u64, u64) {
    // Shift the epoch to 0000-03-01 so leap days fall at the end of a year.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097; // day of the 400-year era, [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // day of March-based year, [0, 365]
    let mp = (5 * doy + 2) / 153; // March-based month, [0, 11]
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// Appends `n` in decimal, zero-padded to at least `width` digits (at most
/// 20), through a stack buffer so no temporary `String` is allocated.
fn push_u64(n: u64, width: usize, out: &mut Vec<u8>) {
    let mut buf = [b'0'; 20];
    let at = super::decimal(n, &mut buf);
    let start = at.min(buf.len() - width.min(buf.len()));
    out.extend_from_slice(&buf[start..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shaped after the example in Postfix's `SMTPD_POLICY_README`.
    const README_BLOCK: &str = "request=smtpd_access_policy\n\
        protocol_state=RCPT\n\
        protocol_name=SMTP\n\
        helo_name=some.domain.tld\n\
        queue_id=8045F2AB23\n\
        sender=foo@bar.tld\n\
        recipient=bar@foo.tld\n\
        recipient_count=0\n\
        client_address=1.2.3.4\n\
        client_name=another.domain.tld\n\
        reverse_client_name=another.domain.tld\n\
        instance=123.456.7\n\
        sasl_method=\n\
        sasl_username=\n\
        sasl_sender=\n\
        size=12345\n\
        ccert_subject=solaris9.porcupine.org\n\
        ccert_issuer=Wietse+20Venema\n\
        ccert_fingerprint=C2:9D:F4:87:71:73:73:D9:18:E7:C2:F3:C1:DA:6E:04\n\
        encryption_protocol=TLSv1/SSLv3\n\
        encryption_cipher=DHE-RSA-AES256-SHA\n\
        encryption_keysize=256\n\
        etrn_domain=\n\
        stress=\n\
        ccert_pubkey_fingerprint=68:B3:29:DA:98:93:E3:40:99:C7:D8:AD:5C:B9:C9:40\n\
        client_port=1234\n\
        policy_context=submission\n\
        server_address=10.3.2.1\n\
        server_port=54321\n\
        compatibility_level=major.minor.patch\n\
        mail_version=3.8.0\n\
        \n";

    fn readme_request() -> PolicyRequest<'static> {
        PolicyRequest {
            request: "smtpd_access_policy",
            protocol_state: "RCPT",
            client_address: "1.2.3.4",
            client_name: "another.domain.tld",
            reverse_client_name: "another.domain.tld",
            helo_name: "some.domain.tld",
            sender: "foo@bar.tld",
            recipient: "bar@foo.tld",
            sasl_username: "",
            protocol_name: "SMTP",
            ccert_subject: "solaris9.porcupine.org",
            ccert_fingerprint: "C2:9D:F4:87:71:73:73:D9:18:E7:C2:F3:C1:DA:6E:04",
            ccert_pubkey_fingerprint: "68:B3:29:DA:98:93:E3:40:99:C7:D8:AD:5C:B9:C9:40",
            queue_id: "8045F2AB23",
            instance: "123.456.7",
        }
    }

    fn parse_default(buf: &[u8]) -> Result<Block<'_>, PolicyError> {
        parse(buf, &BlockLimits::default())
    }

    fn complete(buf: &[u8]) -> (usize, PolicyRequest<'_>) {
        match parse_default(buf) {
            Ok(Block::Complete { consumed, request }) => (consumed, request),
            other => panic!("expected a complete block, got {other:?}"),
        }
    }

    /// A minimal valid block padded by an ignored attribute to exactly `len` bytes.
    fn block_of(len: usize) -> String {
        let head = "request=smtpd_access_policy\nx=";
        let tail = "\n\n";
        let block = format!("{head}{}{tail}", "v".repeat(len - head.len() - tail.len()));
        assert_eq!(block.len(), len);
        block
    }

    /// A valid block with exactly `n` attribute lines.
    fn block_with_attrs(n: usize) -> String {
        let mut block = String::from("request=smtpd_access_policy\n");
        for i in 1..n {
            block.push_str(&format!("a{i}=v\n"));
        }
        block.push('\n');
        block
    }

    fn expand(template: &str, vars: &TemplateVars<'_>) -> String {
        let mut out = Vec::new();
        expand_template(template, vars, &mut out);
        String::from_utf8(out).unwrap()
    }

    fn action(text: &str) -> String {
        let mut out = Vec::new();
        encode_action(text, &mut out);
        String::from_utf8(out).unwrap()
    }

    fn date(unix: u64) -> String {
        let mut out = Vec::new();
        push_rfc5322_date(unix, &mut out);
        String::from_utf8(out).unwrap()
    }

    const VARS: TemplateVars<'static> = TemplateVars {
        sender: "a@b.example",
        recipient: "c@d.example",
        client: "192.0.2.1",
        helo: "mx.b.example",
        seconds: 299,
        protocol: "ESMTP",
    };

    #[test]
    fn readme_example_block() {
        let (consumed, request) = complete(README_BLOCK.as_bytes());
        assert_eq!(consumed, README_BLOCK.len());
        assert_eq!(request, readme_request());
    }

    #[test]
    fn two_blocks_pipelined() {
        let second = README_BLOCK
            .replace("recipient=bar@foo.tld", "recipient=baz@foo.tld")
            .replace("sender=foo@bar.tld", "sender=");
        let buf = format!("{README_BLOCK}{second}request=smtpd");
        let (first_len, first) = complete(buf.as_bytes());
        assert_eq!(first_len, README_BLOCK.len());
        assert_eq!(first.recipient, "bar@foo.tld");
        let rest = &buf.as_bytes()[first_len..];
        let (second_len, second_req) = complete(rest);
        assert_eq!(second_len, second.len());
        assert_eq!(second_req.recipient, "baz@foo.tld");
        assert_eq!(second_req.sender, "");
        assert_eq!(parse_default(&rest[second_len..]), Ok(Block::Incomplete));
    }

    #[test]
    fn partial_blocks_are_incomplete() {
        let full = README_BLOCK.as_bytes();
        // Every proper prefix: empty, mid-line, after a line, before the empty line.
        for cut in 0..full.len() {
            assert_eq!(
                parse_default(&full[..cut]),
                Ok(Block::Incomplete),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn crlf_lines() {
        let crlf = README_BLOCK.replace('\n', "\r\n");
        let (consumed, request) = complete(crlf.as_bytes());
        assert_eq!(consumed, crlf.len());
        assert_eq!(request, readme_request());
        // A lone '\r' before the final '\n' is still incomplete.
        assert_eq!(
            parse_default(&crlf.as_bytes()[..crlf.len() - 1]),
            Ok(Block::Incomplete)
        );
    }

    #[test]
    fn empty_values_and_values_with_equals() {
        let (_, r) =
            complete(b"request=smtpd_access_policy\nsender=\nhelo_name=a=b==c\nrecipient==x\n\n");
        assert_eq!(r.sender, "");
        assert_eq!(r.helo_name, "a=b==c");
        assert_eq!(r.recipient, "=x");
    }

    #[test]
    fn duplicates_last_wins_and_unknowns_are_ignored() {
        let (_, r) = complete(
            b"request=smtpd_access_policy\nsender=first@x\nfuture_attr=1\nsender=last@x\nSender=ignored\n\n",
        );
        assert_eq!(r.sender, "last@x");
        assert_eq!(
            r,
            PolicyRequest {
                request: POLICY_REQUEST,
                sender: "last@x",
                ..PolicyRequest::default()
            }
        );
    }

    #[test]
    fn tab_in_value_is_allowed() {
        let (_, r) = complete(b"request=smtpd_access_policy\nhelo_name=a\tb\n\n");
        assert_eq!(r.helo_name, "a\tb");
    }

    #[test]
    fn control_characters() {
        for block in [
            &b"request=smtpd_access_policy\nsender=a\0b\n\n"[..],
            b"request=smtpd_access_policy\nsender=a\rb\n\n",
            b"request=smtpd_access_policy\nsender=ab\r\r\n\n",
            b"request=smtpd_access_policy\nsender=a\x7fb\n\n",
            b"request=smtpd_access_policy\nsen\tder=ab\n\n",
            b"request=smtpd_access_policy\nno\0equals\n\n",
        ] {
            assert_eq!(
                parse_default(block),
                Err(PolicyError::Control),
                "{}",
                String::from_utf8_lossy(block)
            );
        }
        // Checked as soon as the line is complete, before the block ends.
        assert_eq!(
            parse_default(b"request=smtpd_access_policy\nsender=\0\n"),
            Err(PolicyError::Control)
        );
    }

    #[test]
    fn invalid_utf8() {
        assert_eq!(
            parse_default(b"request=smtpd_access_policy\nsender=\xff@x\n\n"),
            Err(PolicyError::BadUtf8)
        );
        assert_eq!(parse_default(b"\xc3=x\n\n"), Err(PolicyError::BadUtf8));
        let (_, r) =
            complete("request=smtpd_access_policy\nsender=jörg@bücher.example\n\n".as_bytes());
        assert_eq!(r.sender, "jörg@bücher.example");
    }

    #[test]
    fn bad_lines() {
        assert_eq!(
            parse_default(b"request=smtpd_access_policy\nnoequals\n\n"),
            Err(PolicyError::BadLine)
        );
        assert_eq!(
            parse_default(b"request=smtpd_access_policy\n=value\n\n"),
            Err(PolicyError::BadLine)
        );
        assert_eq!(
            parse_default(b"request=smtpd_access_policy\n \n\n"),
            Err(PolicyError::BadLine)
        );
    }

    #[test]
    fn not_a_policy_request() {
        assert_eq!(
            parse_default(b"request=something_else\nsender=a\n\n"),
            Err(PolicyError::NotPolicyRequest)
        );
        assert_eq!(
            parse_default(b"sender=a\n\n"),
            Err(PolicyError::NotPolicyRequest)
        );
        assert_eq!(
            parse_default(b"request=SMTPD_ACCESS_POLICY\n\n"),
            Err(PolicyError::NotPolicyRequest)
        );
        // A stray empty line is an empty block.
        assert_eq!(parse_default(b"\n"), Err(PolicyError::NotPolicyRequest));
        // Last one wins for `request` too.
        assert_eq!(
            parse_default(b"request=smtpd_access_policy\nrequest=other\n\n"),
            Err(PolicyError::NotPolicyRequest)
        );
    }

    #[test]
    fn block_size_limit_counts_the_final_empty_line() {
        let max = BlockLimits::default().max_block;
        for len in [max - 1, max] {
            let block = block_of(len);
            assert_eq!(complete(block.as_bytes()).0, len);
            // Another block behind it does not matter.
            let two = format!("{block}{}", block_of(100));
            assert_eq!(complete(two.as_bytes()).0, len);
        }
        // max + 1: refused once it is all there...
        let over = block_of(max + 1);
        assert_eq!(
            parse_default(over.as_bytes()),
            Err(PolicyError::BlockTooLarge)
        );
        // ...and already when only max + 1 of its bytes are.
        assert_eq!(
            parse_default(&over.as_bytes()[..max + 1]),
            Err(PolicyError::BlockTooLarge)
        );
        // With max bytes of it buffered, it could still have been a valid block.
        assert_eq!(
            parse_default(&over.as_bytes()[..max]),
            Ok(Block::Incomplete)
        );
        assert_eq!(
            parse_default(&over.as_bytes()[..max - 1]),
            Ok(Block::Incomplete)
        );
    }

    #[test]
    fn huge_block_is_refused_after_the_limit() {
        let limits = BlockLimits {
            max_block: 64,
            max_attrs: 128,
        };
        let mut huge = b"request=smtpd_access_policy\nsender=".to_vec();
        huge.resize(10 * 1024 * 1024, b'x');
        assert_eq!(parse(&huge[..64], &limits), Ok(Block::Incomplete));
        assert_eq!(parse(&huge[..65], &limits), Err(PolicyError::BlockTooLarge));
        assert_eq!(parse(&huge, &limits), Err(PolicyError::BlockTooLarge));
    }

    #[test]
    fn small_block_limit_boundaries() {
        let block = b"request=smtpd_access_policy\n\n";
        let n = block.len();
        for (max_block, want) in [
            (
                n + 1,
                Ok(Block::Complete {
                    consumed: n,
                    request: PolicyRequest {
                        request: POLICY_REQUEST,
                        ..PolicyRequest::default()
                    },
                }),
            ),
            (
                n,
                Ok(Block::Complete {
                    consumed: n,
                    request: PolicyRequest {
                        request: POLICY_REQUEST,
                        ..PolicyRequest::default()
                    },
                }),
            ),
            (n - 1, Err(PolicyError::BlockTooLarge)),
        ] {
            let limits = BlockLimits {
                max_block,
                max_attrs: 1,
            };
            assert_eq!(parse(block, &limits), want, "max_block {max_block}");
        }
    }

    #[test]
    fn attribute_count_limit() {
        let max = BlockLimits::default().max_attrs;
        for n in [max - 1, max] {
            let block = block_with_attrs(n);
            assert_eq!(block.lines().count(), n + 1);
            assert_eq!(complete(block.as_bytes()).0, block.len());
        }
        assert_eq!(
            parse_default(block_with_attrs(max + 1).as_bytes()),
            Err(PolicyError::TooManyAttributes)
        );
        // The empty line is not an attribute.
        let limits = BlockLimits {
            max_block: 16384,
            max_attrs: 1,
        };
        assert!(matches!(
            parse(b"request=smtpd_access_policy\n\n", &limits),
            Ok(Block::Complete { .. })
        ));
        assert_eq!(
            parse(b"request=smtpd_access_policy\nx=1\n", &limits),
            Err(PolicyError::TooManyAttributes)
        );
    }

    #[test]
    fn default_limits() {
        assert_eq!(
            BlockLimits::default(),
            BlockLimits {
                max_block: 16384,
                max_attrs: 128
            }
        );
    }

    #[test]
    fn error_codes() {
        let codes: Vec<&str> = PolicyError::ALL.iter().map(|e| e.as_code()).collect();
        assert_eq!(
            codes,
            [
                "block-too-large",
                "too-many-attributes",
                "bad-line",
                "bad-utf8",
                "control-char",
                "not-policy-request"
            ]
        );
        assert_eq!(
            PolicyError::BadLine.to_string(),
            "policy request line is not name=value"
        );
    }

    #[test]
    fn template_placeholders() {
        assert_eq!(
            expand("%s -> %r from %c (%h), %d s", &VARS),
            "a@b.example -> c@d.example from 192.0.2.1 (mx.b.example), 299 s"
        );
        assert_eq!(
            expand(DEFAULT_GREYLIST_TEXT, &VARS),
            "Greylisted, see https://greylisting.org/; from=a@b.example to=c@d.example"
        );
        assert_eq!(
            expand("Greylisted; from=%s to=%r proto=%p helo=%h", &VARS),
            "Greylisted; from=a@b.example to=c@d.example proto=ESMTP helo=mx.b.example"
        );
        let unknown = TemplateVars {
            protocol: "",
            ..VARS
        };
        assert_eq!(expand("proto=%p.", &unknown), "proto=.");
        let null = TemplateVars { sender: "", ..VARS };
        assert_eq!(expand("from=%s", &null), "from=<>");
        assert_eq!(expand("%d", &TemplateVars { seconds: 0, ..VARS }), "0");
        assert_eq!(
            expand(
                "%d",
                &TemplateVars {
                    seconds: u32::MAX,
                    ..VARS
                }
            ),
            "4294967295"
        );
    }

    #[test]
    fn template_percent_handling() {
        assert_eq!(expand("100%% sure", &VARS), "100% sure");
        assert_eq!(expand("%%s", &VARS), "%s");
        assert_eq!(expand("%%%s", &VARS), "%a@b.example");
        assert_eq!(expand("%x %S %5", &VARS), "%x %S %5");
        assert_eq!(expand("50%", &VARS), "50%");
        assert_eq!(expand("%", &VARS), "%");
        assert_eq!(expand("%%%", &VARS), "%%");
        assert_eq!(expand("%é%s", &VARS), "%éa@b.example");
        assert_eq!(expand("", &VARS), "");
        assert_eq!(expand("no placeholders", &VARS), "no placeholders");
    }

    #[test]
    fn template_appends() {
        let mut out = b"action=DEFER_IF_PERMIT ".to_vec();
        expand_template("%d", &VARS, &mut out);
        assert_eq!(out, b"action=DEFER_IF_PERMIT 299");
    }

    #[test]
    fn encode_action_plain() {
        assert_eq!(action("DUNNO"), "action=DUNNO\n\n");
        assert_eq!(
            action("DEFER_IF_PERMIT Greylisted, see https://greylisting.org/"),
            "action=DEFER_IF_PERMIT Greylisted, see https://greylisting.org/\n\n"
        );
        let mut out = b"x".to_vec();
        encode_action("DUNNO", &mut out);
        assert_eq!(out, b"xaction=DUNNO\n\n");
    }

    fn defer(a: DeferAction, text: &str) -> String {
        let mut out = Vec::new();
        encode_defer(a, text, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn encode_defer_per_action() {
        let text = "Greylisted, see https://greylisting.org/";
        assert_eq!(
            defer(DeferAction::default(), text),
            format!("action=DEFER_IF_PERMIT {text}\n\n")
        );
        assert_eq!(
            defer(DeferAction::Defer, text),
            format!("action=DEFER {text}\n\n")
        );
        assert_eq!(
            defer(DeferAction::Code450, text),
            format!("action=450 4.7.1 {text}\n\n")
        );
        assert_eq!(
            defer(DeferAction::Code451, text),
            format!("action=451 4.7.1 {text}\n\n")
        );
        // The same bytes as the action built whole and encoded, control characters included.
        for a in [DeferAction::DeferIfPermit, DeferAction::Code451] {
            let t = "a\r\nb";
            assert_eq!(defer(a, t), action(&format!("{}{t}", a.prefix())));
        }
    }

    #[test]
    fn encode_defer_line_limit() {
        for a in [
            DeferAction::DeferIfPermit,
            DeferAction::Defer,
            DeferAction::Code450,
        ] {
            let out = defer(a, &"a".repeat(2000));
            assert_eq!(out.len() - 1, MAX_ACTION_LINE, "{a}");
            assert_eq!(out, action(&format!("{}{}", a.prefix(), "a".repeat(2000))));
        }
    }

    #[test]
    fn defer_action_names() {
        for name in DeferAction::NAMES {
            let a: DeferAction = name.parse().unwrap();
            assert_eq!(a.as_str(), name);
            assert_eq!(a.to_string(), name);
        }
        assert_eq!("defer".parse(), Ok(DeferAction::Defer));
        assert_eq!("Defer_If_Permit".parse(), Ok(DeferAction::DeferIfPermit));
        assert_eq!(
            "452".parse::<DeferAction>(),
            Err("\"452\" is not one of DEFER_IF_PERMIT, DEFER, 450, 451".to_owned())
        );
        assert!("REJECT".parse::<DeferAction>().is_err());
        assert!("".parse::<DeferAction>().is_err());
    }

    #[test]
    fn encode_action_replaces_control_characters() {
        assert_eq!(
            action("DEFER_IF_PERMIT a\r\n\naction=OK\0b\tc\u{85}d"),
            "action=DEFER_IF_PERMIT a   action=OK b c d\n\n"
        );
    }

    #[test]
    fn encode_action_line_limit() {
        // The action text may take 512 - "action=".len() - "\n".len() = 504 bytes.
        let room = MAX_ACTION_LINE - "action=".len() - 1;
        assert_eq!(room, 504);
        for (len, kept) in [
            (room - 1, room - 1),
            (room, room),
            (room + 1, room),
            (2000, room),
        ] {
            let out = action(&"a".repeat(len));
            assert_eq!(out, format!("action={}\n\n", "a".repeat(kept)), "len {len}");
            let line_len = out.len() - 1; // the line, without the blank line after it
            assert!(line_len <= MAX_ACTION_LINE);
        }
        // A 3-byte character straddling the limit is dropped whole.
        let text = format!("{}€", "a".repeat(room - 2));
        assert_eq!(
            action(&text),
            format!("action={}\n\n", "a".repeat(room - 2))
        );
        let text = format!("{}€", "a".repeat(room - 3));
        assert_eq!(action(&text), format!("action={text}\n\n"));
        assert_eq!(action(&text).len() - 1, MAX_ACTION_LINE);
    }

    #[test]
    fn x_greylist_header() {
        let mut out = Vec::new();
        x_greylist_prepend(312, "0.1.0", "mx1.example.net", 1_795_424_602, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "PREPEND X-Greylist: delayed 312 seconds by greyhound-0.1.0 at mx1.example.net; Mon, 23 Nov 2026 09:03:22 +0000"
        );
        let mut out = b"action=".to_vec();
        x_greylist_prepend(0, "1\n", "mx\r\nBcc: x", 0, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "action=PREPEND X-Greylist: delayed 0 seconds by greyhound-1  at mx  Bcc: x; Thu, 01 Jan 1970 00:00:00 +0000"
        );
    }

    #[test]
    fn dates_match_known_values() {
        // Expected values from GNU `date -u -d @N '+%a, %d %b %Y %H:%M:%S +0000'`.
        for (unix, want) in [
            (0, "Thu, 01 Jan 1970 00:00:00 +0000"),
            (86_399, "Thu, 01 Jan 1970 23:59:59 +0000"),
            (86_400, "Fri, 02 Jan 1970 00:00:00 +0000"),
            (68_169_600, "Tue, 29 Feb 1972 00:00:00 +0000"),
            (946_684_799, "Fri, 31 Dec 1999 23:59:59 +0000"),
            (951_825_600, "Tue, 29 Feb 2000 12:00:00 +0000"),
            (1_000_000_000, "Sun, 09 Sep 2001 01:46:40 +0000"),
            (1_709_251_199, "Thu, 29 Feb 2024 23:59:59 +0000"),
            (1_709_251_200, "Fri, 01 Mar 2024 00:00:00 +0000"),
            (1_795_424_602, "Mon, 23 Nov 2026 09:03:22 +0000"),
            (2_147_483_648, "Tue, 19 Jan 2038 03:14:08 +0000"),
            // 2100 is not a leap year: 28 Feb is followed by 1 Mar.
            (4_107_456_000, "Sun, 28 Feb 2100 00:00:00 +0000"),
            (4_107_542_400, "Mon, 01 Mar 2100 00:00:00 +0000"),
            (253_402_300_799, "Fri, 31 Dec 9999 23:59:59 +0000"),
            (253_402_300_800, "Sat, 01 Jan 10000 00:00:00 +0000"),
        ] {
            assert_eq!(date(unix), want, "unix {unix}");
        }
        // The far future must not panic or overflow.
        assert!(date(u64::MAX).ends_with(" +0000"));
    }

    #[test]
    fn civil_from_days_leap_years() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(59), (1970, 3, 1)); // 1970 is not a leap year
        assert_eq!(civil_from_days(365 + 365 + 59), (1972, 2, 29));
        assert_eq!(civil_from_days(10_956), (1999, 12, 31));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29)); // divisible by 400: leap
    }

    #[test]
    fn number_padding() {
        let mut out = Vec::new();
        push_u64(7, 2, &mut out);
        out.push(b' ');
        push_u64(123, 2, &mut out);
        out.push(b' ');
        push_u64(0, 1, &mut out);
        out.push(b' ');
        push_u64(u64::MAX, 4, &mut out);
        out.push(b' ');
        push_u64(5, 99, &mut out);
        assert_eq!(out, b"07 123 0 18446744073709551615 00000000000000000005");
    }

    /// Pieces that make up blocks, good and bad: attributes, the request line, the empty
    /// line, and the bytes each check is about.
    fn piece() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        prop_oneof![
            Just(b"request=smtpd_access_policy\n".to_vec()),
            Just(b"protocol_state=RCPT\n".to_vec()),
            Just(b"recipient=b@example.net\n".to_vec()),
            Just(b"client_address=192.0.2.1\n".to_vec()),
            Just(b"\n".to_vec()),
            Just(b"\r\n".to_vec()),
            Just(b"=".to_vec()),
            Just(b"x".to_vec()),
            Just(b"\t".to_vec()),
            Just(b"\r".to_vec()),
            Just(vec![0]),
            Just(vec![0x7f]),
            Just("é".as_bytes().to_vec()),
            Just(vec![0xc3]),
            Just(vec![0x85]),
            Just(b"sender=a@b\n".to_vec()),
        ]
    }

    proptest::proptest! {
        /// The whole-block fast path never changes an answer: every input parses exactly as
        /// the line-by-line checks alone would parse it (same block, same error).
        #[test]
        fn fast_path_agrees_with_line_by_line(
            pieces in proptest::collection::vec(piece(), 0..40),
            max_block in 16usize..600,
            max_attrs in 1usize..12,
        ) {
            let buf: Vec<u8> = pieces.concat();
            let limits = BlockLimits { max_block, max_attrs };
            let window = &buf[..buf.len().min(max_block)];
            proptest::prop_assert_eq!(
                parse(&buf, &limits),
                parse_line_by_line(window, buf.len(), &limits)
            );
        }
    }
}

// =========================================================================================
// The client's half: request encoding and reply parsing.
//
// The load generator speaks Postfix's side of the protocol through these, so its blocks are
// by construction ones the server's [`parse`] reads. Same rules as the server's half: parsing
// borrows and never allocates; encoding only grows the caller's `Vec`.
// =========================================================================================

/// Largest reply block [`parse_action`] waits for, in bytes: an action line is at most
/// [`MAX_ACTION_LINE`], and a reply is that line and the empty one, with room to spare.
pub const MAX_REPLY_BLOCK: usize = 4 * MAX_ACTION_LINE;

/// Appends a request block: every field of `req` as a `name=value` line, in the order Postfix
/// sends them, then the `extra` attributes (a server ignores names it does not know, so a
/// client may add what real Postfix sends to make blocks as long as real ones), then the empty
/// line that ends the block. The fields that only some requests carry (`protocol_name` and the
/// client certificate's) are written only when they are not empty. Control characters in values become spaces, so one
/// attribute is always one line.
pub fn encode_request(req: &PolicyRequest<'_>, extra: &[(&str, &str)], out: &mut Vec<u8>) {
    let optional = [
        ("protocol_name", req.protocol_name),
        ("ccert_subject", req.ccert_subject),
        ("ccert_fingerprint", req.ccert_fingerprint),
        ("ccert_pubkey_fingerprint", req.ccert_pubkey_fingerprint),
    ];
    let fields = [
        ("request", req.request),
        ("protocol_state", req.protocol_state),
        ("client_address", req.client_address),
        ("client_name", req.client_name),
        ("reverse_client_name", req.reverse_client_name),
        ("helo_name", req.helo_name),
        ("sender", req.sender),
        ("recipient", req.recipient),
        ("sasl_username", req.sasl_username),
        ("queue_id", req.queue_id),
        ("instance", req.instance),
    ];
    let present = optional.iter().filter(|(_, value)| !value.is_empty());
    for (name, value) in fields.iter().chain(present).chain(extra) {
        out.extend_from_slice(name.as_bytes());
        out.push(b'=');
        push_clean(value, usize::MAX, out);
        out.push(b'\n');
    }
    out.push(b'\n');
}

/// Why a reply block could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ActionError {
    /// More than [`MAX_REPLY_BLOCK`] bytes without the empty line that ends a reply.
    #[error("policy reply larger than the limit")]
    TooLarge,
    /// A complete block without an `action=` line.
    #[error("policy reply without action=")]
    NoAction,
    /// The block is not valid UTF-8.
    #[error("policy reply is not valid UTF-8")]
    BadUtf8,
}

/// Looks for one reply block (`action=...\n` and an empty line) at the front of `buf`:
/// `Ok(None)` means no complete block yet (read more); otherwise the action's value (the
/// text after `action=`, e.g. `DUNNO` or `DEFER_IF_PERMIT Greylisted, ...`) and the bytes to
/// drop, the empty line included. Other attributes are skipped; the first `action=` counts. A
/// trailing `\r` on a line is ignored.
///
/// # Errors
///
/// An [`ActionError`]; a client should treat the connection as broken.
pub fn parse_action(buf: &[u8]) -> Result<Option<(&str, usize)>, ActionError> {
    let window = &buf[..buf.len().min(MAX_REPLY_BLOCK)];
    let mut action = None;
    let mut pos = 0;
    while let Some(len) = window[pos..].iter().position(|&b| b == b'\n') {
        let raw = &window[pos..pos + len];
        pos += len + 1;
        let line = raw.strip_suffix(b"\r").unwrap_or(raw);
        if line.is_empty() {
            return match action {
                Some(value) => Ok(Some((value, pos))),
                None => Err(ActionError::NoAction),
            };
        }
        if action.is_none() {
            if let Some(value) = line.strip_prefix(b"action=") {
                action = Some(std::str::from_utf8(value).map_err(|_| ActionError::BadUtf8)?);
            }
        }
    }
    if buf.len() > MAX_REPLY_BLOCK {
        Err(ActionError::TooLarge)
    } else {
        Ok(None)
    }
}

#[cfg(test)]
mod client_tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn request_blocks_carry_every_field_and_the_extras() {
        let req = PolicyRequest {
            request: POLICY_REQUEST,
            protocol_state: "RCPT",
            client_address: "192.0.2.1",
            sender: "",
            recipient: "b@c.example",
            ..PolicyRequest::default()
        };
        let mut out = Vec::new();
        encode_request(&req, &[("size", "0")], &mut out);
        let text = String::from_utf8(out.clone()).unwrap();
        assert!(text.starts_with("request=smtpd_access_policy\nprotocol_state=RCPT\n"));
        assert!(
            text.contains("\nsender=\nrecipient=b@c.example\n"),
            "{text}"
        );
        assert!(text.ends_with("\ninstance=\nsize=0\n\n"), "{text}");
        assert_eq!(
            parse(&out, &BlockLimits::default()),
            Ok(Block::Complete {
                consumed: out.len(),
                request: req
            })
        );
        // A newline in a value cannot split the attribute.
        out.clear();
        let sneaky = PolicyRequest {
            helo_name: "x\nrequest=other",
            ..req
        };
        encode_request(&sneaky, &[], &mut out);
        let Ok(Block::Complete { request, .. }) = parse(&out, &BlockLimits::default()) else {
            panic!("{:?}", String::from_utf8_lossy(&out));
        };
        assert_eq!(request.request, POLICY_REQUEST);
        assert_eq!(request.helo_name, "x request=other");
    }

    #[test]
    fn replies_are_read_to_the_empty_line() {
        assert_eq!(parse_action(b""), Ok(None));
        assert_eq!(parse_action(b"action=DUNNO\n"), Ok(None));
        assert_eq!(
            parse_action(b"action=DUNNO\n\naction=PREPEND x\n\n"),
            Ok(Some(("DUNNO", 14)))
        );
        assert_eq!(
            parse_action(b"other=1\r\naction=DEFER_IF_PERMIT Greylisted\r\n\r\n"),
            Ok(Some(("DEFER_IF_PERMIT Greylisted", 46)))
        );
        assert_eq!(parse_action(b"\n"), Err(ActionError::NoAction));
        assert_eq!(parse_action(b"action=\xff\n\n"), Err(ActionError::BadUtf8));
        // A block may fill the limit exactly; one byte more without its end is refused.
        let mut big = b"action=".to_vec();
        big.resize(MAX_REPLY_BLOCK - 2, b'x');
        big.extend_from_slice(b"\n\n");
        assert_eq!(
            parse_action(&big).map(|r| r.map(|(_, n)| n)),
            Ok(Some(MAX_REPLY_BLOCK))
        );
        let endless = vec![b'x'; MAX_REPLY_BLOCK + 1];
        assert_eq!(parse_action(&endless[..MAX_REPLY_BLOCK]), Ok(None));
        assert_eq!(parse_action(&endless), Err(ActionError::TooLarge));
    }

    /// Values Postfix could send on one line: anything but control characters.
    const VALUE: &str = "[^\\p{Cc}]{0,24}";

    proptest! {
        /// What the client encodes, the server parses back to the same request.
        #[test]
        fn requests_round_trip(v in proptest::collection::vec(VALUE, 14)) {
            let req = PolicyRequest {
                request: POLICY_REQUEST,
                protocol_state: &v[0],
                client_address: &v[1],
                client_name: &v[2],
                reverse_client_name: &v[3],
                helo_name: &v[4],
                sender: &v[5],
                recipient: &v[6],
                sasl_username: &v[7],
                queue_id: &v[8],
                instance: &v[9],
                protocol_name: &v[10],
                ccert_subject: &v[11],
                ccert_fingerprint: &v[12],
                ccert_pubkey_fingerprint: &v[13],
            };
            let mut out = Vec::new();
            encode_request(&req, &[("recipient_count", "0")], &mut out);
            prop_assert_eq!(
                parse(&out, &BlockLimits::default()),
                Ok(Block::Complete { consumed: out.len(), request: req })
            );
        }

        /// What the server encodes, the client parses back to the same action.
        #[test]
        fn replies_round_trip(action in "[^\\p{Cc}]{0,120}") {
            let mut out = Vec::new();
            encode_action(&action, &mut out);
            prop_assert_eq!(parse_action(&out), Ok(Some((action.as_str(), out.len()))));
        }
    }
}
