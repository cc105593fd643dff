//! Wire protocols, sans-IO: bytes in, values out. The server's connection loops and the load
//! generator share these codecs.
//!
//! - [`native`]: Greyhound's line protocol (`CHECK`/`PEEK`/`PING`), TCP and UDP.
//! - [`policy`]: Postfix's SMTPD policy delegation protocol.
//! - [`admin`]: `greyhound admin`'s requests on the admin Unix socket.

pub mod admin;
pub mod native;
pub mod policy;

/// Appends at most `limit` bytes of `text`, cut at a character boundary, with
/// each control character (C0, DEL, C1) replaced by a space; returns the
/// bytes appended. Clean runs are copied whole to keep the common case cheap.
pub(crate) fn push_clean(text: &str, limit: usize, out: &mut Vec<u8>) -> usize {
    let bytes = text.as_bytes();
    // Nearly every text is printable ASCII: one branch-free pass over the bytes decides it, and
    // the text is copied whole. The character walk below cost ~23 instructions per byte
    // (callgrind, a 120-byte Postfix DEFER action): a tenth of a policy request's instructions.
    if bytes.len() <= limit && is_printable_ascii(bytes) {
        out.extend_from_slice(bytes);
        return bytes.len();
    }
    let mut written = 0;
    let mut run = 0;
    for (at, c) in text.char_indices() {
        let control = c.is_control();
        let width = if control { 1 } else { c.len_utf8() };
        if written + width > limit {
            out.extend_from_slice(&bytes[run..at]);
            return written;
        }
        if control {
            out.extend_from_slice(&bytes[run..at]);
            out.push(b' ');
            run = at + c.len_utf8();
        }
        written += width;
    }
    out.extend_from_slice(&bytes[run..]);
    written
}

/// Whether every byte is printable ASCII (space to `~`). Written as a fold without early exit so
/// the compiler can vectorise it.
#[inline]
pub(crate) fn is_printable_ascii(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .fold(true, |ok, &b| ok & (0x20..0x7f).contains(&b))
}

/// Writes the decimal digits of `n` at the end of `buf` (no allocation) and returns the index
/// where they start.
pub(crate) fn decimal(mut n: u64, buf: &mut [u8; 20]) -> usize {
    let mut at = buf.len();
    loop {
        at -= 1;
        // `n % 10` is below 10, so the cast cannot truncate.
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return at;
        }
    }
}
