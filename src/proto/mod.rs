//! Wire protocols, sans-IO: bytes in, values out. The server's connection loops and the load
//! generator share these codecs.
//!
//! - [`native`]: Greyhound's line protocol (`CHECK`/`PEEK`/`PING`), TCP and UDP.
//! - [`policy`]: Postfix's SMTPD policy delegation protocol.

pub mod native;
pub mod policy;

/// Appends at most `limit` bytes of `text`, cut at a character boundary, with
/// each control character (C0, DEL, C1) replaced by a space; returns the
/// bytes appended. Clean runs are copied whole to keep the common case cheap.
pub(crate) fn push_clean(text: &str, limit: usize, out: &mut Vec<u8>) -> usize {
    let bytes = text.as_bytes();
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
