//! The sender normaliser as it was before the single-pass rewrite: one pass per rule over a
//! lower-cased copy. Kept as the model the single-pass version is checked against
//! (`tests::single_pass_matches_model_*`): stored keys depend on the exact output, so the two
//! must agree on every input. Changed only with it: the fixes that make normalising twice equal
//! normalising once (BATV tags to the last, SRS fields with and without dots, "<>").

/// Appends the normalised envelope sender to `out`, as the old `Normalizer::sender` did.
pub(super) fn sender(sender: &str, out: &mut Vec<u8>) {
    let bytes = sender.as_bytes();
    if bytes.is_empty() || bytes == b"<>" {
        return;
    }
    let start = out.len();
    out.extend(bytes.iter().map(u8::to_ascii_lowercase));
    let addr = &mut out[start..];
    let at = addr.iter().rposition(|&b| b == b'@').unwrap_or(addr.len());
    let local_len = normalize_local(&mut addr[..at]);
    let total = local_len + (addr.len() - at);
    addr.copy_within(at.., local_len);
    out.truncate(start + total);
    if out[start..] == *b"<>" {
        out.truncate(start);
    }
}

/// Rewrites a lower-cased local part in place and returns its new length.
///
/// Every rule only removes or replaces bytes with fewer bytes, which is what
/// lets the whole sender be rewritten inside the caller's buffer.
fn normalize_local(local: &mut [u8]) -> usize {
    let mut len = local.len();
    while let Some(orig) = batv_original_start(&local[..len]) {
        local.copy_within(orig..len, 0);
        len -= orig;
    }
    let local = &mut local[..len];
    if let Some(kind) = srs_kind(local) {
        // A local part that announces SRS but does not parse is kept as is:
        // VERP or identifier rules would mangle it unpredictably.
        return rewrite_srs(local, kind).unwrap_or(len);
    }
    let len = strip_extension(local);
    let len = collapse_verp(&mut local[..len]);
    collapse_identifiers(&mut local[..len])
}

/// Offset at which the original local part of a BATV address starts.
fn batv_original_start(local: &[u8]) -> Option<usize> {
    let (rest, sep): (&[u8], &[u8]) = if let Some(rest) = local.strip_prefix(b"prvs=") {
        (rest, b"=")
    } else if let Some(rest) = local.strip_prefix(b"msprvs1=") {
        (rest, b"=")
    } else if let Some(rest) = local.strip_prefix(b"btv1==") {
        (rest, b"==")
    } else {
        return None;
    };
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

/// Recognises the `srs0`/`srs1` prefix; the body starts at offset 5.
fn srs_kind(local: &[u8]) -> Option<SrsKind> {
    let kind = match local.get(..4)? {
        b"srs0" => SrsKind::Srs0,
        b"srs1" => SrsKind::Srs1,
        _ => return None,
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

/// Parses `HASH=TT=domain=local` and returns the `domain=local` tail.
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

/// Drops hash and timestamp from an SRS local part in place; `None` if the
/// local part is not fully shaped like SRS.
fn rewrite_srs(local: &mut [u8], kind: SrsKind) -> Option<usize> {
    let len = local.len();
    let body = &local[5..];
    match kind {
        SrsKind::Srs0 => {
            let tail_len = srs0_tail(body)?.len();
            local[4] = b'=';
            local.copy_within(len - tail_len.., 5);
            Some(5 + tail_len)
        }
        SrsKind::Srs1 => {
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
            let tail_len = srs0_tail(rest)?.len();
            let hop_start = 5 + hash.len() + 1;
            let hop_len = hop.len();
            local[4] = b'=';
            local.copy_within(hop_start..hop_start + hop_len, 5);
            let mut write = 5 + hop_len;
            local[write] = b'=';
            write += 1;
            local.copy_within(len - tail_len.., write);
            Some(write + tail_len)
        }
    }
}

/// Length of the local part without its `+extension`.
fn strip_extension(local: &[u8]) -> usize {
    match local.iter().position(|&b| b == b'+') {
        // A leading '+' is the whole name, not an extension of one.
        Some(plus) if plus > 0 => plus,
        _ => local.len(),
    }
}

fn looks_like_domain(s: &[u8]) -> bool {
    s.contains(&b'.')
        && s.first() != Some(&b'.')
        && s.last() != Some(&b'.')
        && s.iter()
            .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
}

/// Replaces a trailing VERP-encoded recipient (`rcpt=example.com`) with `#`
/// in place and returns the new length.
fn collapse_verp(local: &mut [u8]) -> usize {
    let len = local.len();
    let Some(eq) = local.iter().rposition(|&b| b == b'=') else {
        return len;
    };
    if !looks_like_domain(&local[eq + 1..]) {
        return len;
    }
    // '.' belongs to the recipient (john.smith), so only '-' and '+' can
    // separate it from the list's own prefix.
    let mut start = eq;
    while start > 0 && matches!(local[start - 1], b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.') {
        start -= 1;
    }
    if start > 0 && !matches!(local[start - 1], b'-' | b'+') {
        // Something else ('=', a quote, non-ASCII) precedes the candidate:
        // not a VERP shape we know, so leave it.
        return len;
    }
    local[start] = b'#';
    start + 1
}

fn is_token_separator(b: u8) -> bool {
    matches!(b, b'.' | b'-' | b'_' | b'=' | b'+')
}

/// Whether a token looks like a per-message id rather than a name.
fn is_identifier(token: &[u8]) -> bool {
    if token.is_empty() {
        return false;
    }
    let digits = token.iter().filter(|b| b.is_ascii_digit()).count();
    if digits == token.len() {
        return true;
    }
    // A digit is required so that words like "deadbeef" or "cafe" survive.
    if token.len() >= 8 && digits > 0 && token.iter().all(u8::is_ascii_hexdigit) {
        return true;
    }
    // Short hex groups mixing digits and letters are the middle of UUIDs (Amazon SES return
    // paths carry one per message); a name rarely looks like "9c0d". Merging two such senders
    // costs nothing worse than a shared greylist entry, while keeping them apart would make
    // every message of a bulk sender a new triplet.
    if token.len() >= 4
        && digits > 0
        && token.iter().any(|b| b.is_ascii_lowercase())
        && token.iter().all(u8::is_ascii_hexdigit)
    {
        return true;
    }
    // Base32/base36 tracking ids; the digit count spares long plain words.
    token.len() >= 16
        && digits >= 4
        && token
            .iter()
            .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// Replaces identifier tokens with `#` in place, keeping separators, and
/// returns the new length.
fn collapse_identifiers(local: &mut [u8]) -> usize {
    let len = local.len();
    let mut write = 0;
    let mut token_start = 0;
    for read in 0..=len {
        let separator = local.get(read).copied().filter(|&b| is_token_separator(b));
        if read < len && separator.is_none() {
            continue;
        }
        if is_identifier(&local[token_start..read]) {
            local[write] = b'#';
            write += 1;
        } else {
            local.copy_within(token_start..read, write);
            write += read - token_start;
        }
        if let Some(sep) = separator {
            local[write] = sep;
            write += 1;
        }
        token_start = read + 1;
    }
    write
}
