//! Trusted TLS clients (`--trusted-certs FILE`): a client whose certificate (or public key)
//! fingerprint, or whose verified certificate subject, is listed is never greylisted; it
//! passes as `tls`, like an authenticated one.
//!
//! One entry per line, `#` starts a comment (as in the exemption lists), case does not matter:
//! - a fingerprint, hex pairs with colons (`AB:CD:…`, what Postfix sends in
//!   `ccert_fingerprint` and `ccert_pubkey_fingerprint`) or without (`abcd…`), 16 to 64 bytes
//!   (MD5 to SHA-512);
//! - `subject=<name>`, matched against Postfix's `ccert_subject` (the certificate's common
//!   name, which Postfix sends only for a verified chain); ASCII letters compare without
//!   regard to case; at most [`MAX_SUBJECT`] bytes.
//!
//! The list is loaded like the exemption lists, at start and on SIGHUP, all or nothing; it
//! travels with them in [`super::Exemptions`], so a request sees one consistent set.

use ahash::AHashSet;

use super::exempt::{entries_of, ExemptError};

/// Longest fingerprint, in bytes (SHA-512).
pub const MAX_FINGERPRINT: usize = 64;
/// Shortest fingerprint, in bytes (MD5).
pub const MIN_FINGERPRINT: usize = 16;
/// Longest `subject=` name, in bytes: a common name is at most 64 characters (RFC 5280's
/// `ub-common-name`), so this leaves room for any of them in UTF-8 and lets a lookup
/// lower-case on the stack.
pub const MAX_SUBJECT: usize = 256;

/// What the MTA knows of the client's TLS certificate; `""` for what it did not send.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientCert<'a> {
    /// Certificate fingerprint (Postfix `ccert_fingerprint`, native `cert=`).
    pub fingerprint: &'a str,
    /// Public key fingerprint (Postfix `ccert_pubkey_fingerprint`).
    pub pubkey_fingerprint: &'a str,
    /// Verified subject common name (Postfix `ccert_subject`, native `cert-subject=`).
    pub subject: &'a str,
}

impl ClientCert<'_> {
    /// Whether the MTA sent nothing about a certificate (the common case: one test).
    pub fn is_empty(&self) -> bool {
        self.fingerprint.is_empty() && self.pubkey_fingerprint.is_empty() && self.subject.is_empty()
    }
}

/// The trusted fingerprints and subjects. Immutable, cheap to query; default = empty.
#[derive(Debug, Default, Clone)]
pub struct TrustedCerts {
    /// Decoded fingerprints (raw bytes), so that any spelling of one matches.
    fingerprints: AHashSet<Box<[u8]>>,
    /// Subjects, ASCII lower-cased.
    subjects: AHashSet<Box<str>>,
    /// Entries as written (a duplicate counts twice), for the log.
    entries: usize,
}

impl TrustedCerts {
    /// Parses a list's text; `source_name` (the file) and the 1-based line name a bad entry.
    ///
    /// # Errors
    ///
    /// [`ExemptError::Parse`] on the first bad line: a fingerprint of other characters than
    /// hex digits and colons, of an odd number of digits, with misplaced colons or of a length
    /// outside 16 to 64 bytes; an empty or too long `subject=`; any other `key=`.
    pub fn parse(source_name: &str, text: &str) -> Result<Self, ExemptError> {
        let mut t = TrustedCerts::default();
        t.add(source_name, text)?;
        Ok(t)
    }

    /// Adds every entry of `text`, or none of them on the first bad line.
    pub(crate) fn add(&mut self, source_name: &str, text: &str) -> Result<(), ExemptError> {
        let mut fingerprints = Vec::new();
        let mut subjects = Vec::new();
        for (line, entry) in entries_of(text) {
            let fail = |message: String| ExemptError::Parse {
                source_name: source_name.to_owned(),
                line,
                message,
            };
            match entry.split_once('=') {
                Some((key, name)) if key.trim().eq_ignore_ascii_case("subject") => {
                    let name = name.trim();
                    if name.is_empty() {
                        return Err(fail(format!("\"{entry}\" names no subject")));
                    }
                    if name.len() > MAX_SUBJECT {
                        return Err(fail(format!(
                            "subject of {} bytes is longer than {MAX_SUBJECT}",
                            name.len()
                        )));
                    }
                    subjects.push(name.to_ascii_lowercase().into_boxed_str());
                }
                Some((key, _)) => {
                    return Err(fail(format!(
                        "unknown key \"{}=\" (an entry is a fingerprint or subject=<name>)",
                        key.trim()
                    )))
                }
                None => fingerprints.push(parse_fingerprint(entry).map_err(fail)?),
            }
        }
        self.entries += fingerprints.len() + subjects.len();
        self.fingerprints.extend(fingerprints);
        self.subjects.extend(subjects);
        Ok(())
    }

    /// Whether the list has no entry (then [`matches`](Self::matches) is always false).
    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// Number of entries as written, for the log.
    pub fn len(&self) -> usize {
        self.entries
    }

    /// Whether the certificate's fingerprint, public key fingerprint or subject is listed.
    /// Never allocates: a fingerprint is decoded and a subject lower-cased on the stack.
    pub fn matches(&self, cert: &ClientCert<'_>) -> bool {
        if !self.fingerprints.is_empty() {
            let mut buf = [0u8; MAX_FINGERPRINT];
            for fp in [cert.fingerprint, cert.pubkey_fingerprint] {
                if let Some(bytes) = decode_hex(fp, &mut buf) {
                    if self.fingerprints.contains(bytes) {
                        return true;
                    }
                }
            }
        }
        let subject = cert.subject.trim();
        if self.subjects.is_empty() || subject.is_empty() || subject.len() > MAX_SUBJECT {
            return false;
        }
        let mut buf = [0u8; MAX_SUBJECT];
        let lower = &mut buf[..subject.len()];
        lower.copy_from_slice(subject.as_bytes());
        lower.make_ascii_lowercase();
        // Lower-casing ASCII letters keeps the bytes valid UTF-8.
        std::str::from_utf8(lower).is_ok_and(|s| self.subjects.contains(s))
    }
}

/// A list entry's fingerprint: hex pairs all separated by single colons, or no colon at all.
fn parse_fingerprint(entry: &str) -> Result<Box<[u8]>, String> {
    let hint = "(a fingerprint is hex pairs such as AB:CD:…, with or without the colons, or the entry is subject=<name>)";
    if !entry.bytes().all(|b| b.is_ascii_hexdigit() || b == b':') {
        return Err(format!("\"{entry}\" is not a fingerprint {hint}"));
    }
    if entry.contains(':') {
        let pairs_ok = entry.split(':').all(|pair| pair.len() == 2);
        if !pairs_ok {
            return Err(format!(
                "\"{entry}\" is not a fingerprint: colons must separate every hex pair {hint}"
            ));
        }
    } else if entry.len() % 2 != 0 {
        return Err(format!(
            "\"{entry}\" is not a fingerprint: an odd number of hex digits {hint}"
        ));
    }
    let mut buf = [0u8; MAX_FINGERPRINT];
    let bytes = decode_hex(entry, &mut buf).filter(|b| b.len() >= MIN_FINGERPRINT);
    match bytes {
        Some(b) => Ok(b.into()),
        None => Err(format!(
            "\"{entry}\" is {} bytes; a fingerprint is {MIN_FINGERPRINT} to {MAX_FINGERPRINT} bytes (MD5 to SHA-512)",
            entry.bytes().filter(u8::is_ascii_hexdigit).count() / 2
        )),
    }
}

/// Decodes hex digits, skipping colons, into `buf`; `None` if anything else is found, the
/// digits are odd in number or more than `buf` holds, or there are none.
fn decode_hex<'b>(text: &str, buf: &'b mut [u8; MAX_FINGERPRINT]) -> Option<&'b [u8]> {
    let mut len = 0;
    let mut high: Option<u8> = None;
    for b in text.trim().bytes() {
        if b == b':' {
            continue;
        }
        let nibble = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            b'A'..=b'F' => b - b'A' + 10,
            _ => return None,
        };
        match high.take() {
            None => high = Some(nibble),
            Some(h) => {
                *buf.get_mut(len)? = (h << 4) | nibble;
                len += 1;
            }
        }
    }
    (high.is_none() && len > 0).then_some(&buf[..len])
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA256: &str =
        "3A:7F:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD";
    const MD5: &str = "C2:9D:F4:87:71:73:73:D9:18:E7:C2:F3:C1:DA:6E:04";

    fn cert<'a>(fingerprint: &'a str, pubkey: &'a str, subject: &'a str) -> ClientCert<'a> {
        ClientCert {
            fingerprint,
            pubkey_fingerprint: pubkey,
            subject,
        }
    }

    fn error(text: &str) -> String {
        TrustedCerts::parse("trusted.txt", text)
            .expect_err("must be refused")
            .to_string()
    }

    #[test]
    fn good_entries_in_any_spelling() {
        let text = format!(
            "# trusted relays\n\n{}\n  {MD5}  # the old one\nSubject=MX1.Partner.Example\nsubject = relay two.example\n",
            SHA256.to_lowercase()
        );
        let t = TrustedCerts::parse("t", &text).unwrap();
        assert_eq!(t.len(), 4);
        // The certificate fingerprint, as Postfix sends it (upper case, colons).
        assert!(t.matches(&cert(SHA256, "", "")));
        // Without colons, in either field.
        let bare: String = SHA256.chars().filter(|c| *c != ':').collect();
        assert!(t.matches(&cert(&bare, "", "")));
        assert!(t.matches(&cert("", MD5, "")));
        assert!(t.matches(&cert("00:11", &MD5.to_lowercase(), "")));
        // Subjects, any case; spaces inside are kept.
        assert!(t.matches(&cert("", "", "mx1.partner.example")));
        assert!(t.matches(&cert("", "", "MX1.PARTNER.EXAMPLE")));
        assert!(t.matches(&cert("", "", "Relay Two.example")));
        // Near misses.
        assert!(!t.matches(&cert("", "", "")));
        assert!(!t.matches(&cert("", "", "mx2.partner.example")));
        assert!(!t.matches(&cert(&SHA256[..SHA256.len() - 3], "", "")));
        assert!(!t.matches(&cert("3A:7G", "not hex", "x")));
        // A subject is not a fingerprint and the other way round.
        assert!(!t.matches(&cert("mx1.partner.example", "", MD5)));
        assert!(TrustedCerts::default().is_empty());
        assert!(!TrustedCerts::default().matches(&cert(MD5, MD5, "x")));
    }

    /// Through the engine: after `auth`, before the exemption lists and the table; nothing
    /// recorded; PEEK the same.
    #[test]
    fn engine_passes_trusted_clients_as_tls() {
        use crate::engine::{
            Decision, Engine, EngineConfig, Exemptions, HashSecret, ManualClock, Mode, Normalizer,
            Pass, Policy, Query,
        };
        use std::sync::Arc;
        let e = Engine::new(
            EngineConfig {
                policy: Policy::default(),
                normalizer: Normalizer::default(),
                secret: HashSecret(*b"test-secret-0001"),
            },
            Arc::new(ManualClock::new(1_000_000)),
        );
        let mut b = Exemptions::builder();
        b.add_clients("clients", "192.0.2.0/24\n").unwrap();
        b.add_trusted_certs("trusted", &format!("{MD5}\nsubject=mx.example\n"))
            .unwrap();
        e.set_exemptions(b.build());
        let client = "192.0.2.1".parse().unwrap();
        let other = "198.51.100.1".parse().unwrap();
        let mut q = Query::new(client, "a@x.org", "b@y.net");
        q.cert = cert("", MD5, "");
        assert_eq!(e.check(&q, Mode::Record), Decision::Pass(Pass::Tls));
        q.auth = Some("alice");
        assert_eq!(e.check(&q, Mode::Record), Decision::Pass(Pass::Auth));
        let mut q = Query::new(other, "a@x.org", "b@y.net");
        q.cert = cert("", "", "MX.example");
        assert_eq!(e.check(&q, Mode::Peek), Decision::Pass(Pass::Tls));
        assert_eq!(e.check(&q, Mode::Record), Decision::Pass(Pass::Tls));
        assert_eq!(e.stats().triplets, 0, "a trusted client is never recorded");
        q.cert = cert("", "", "mx2.example");
        assert!(matches!(e.check(&q, Mode::Record), Decision::Defer { .. }));
        assert_eq!(Pass::Tls.reason(), "tls");
    }

    #[test]
    fn longest_and_shortest_fingerprints() {
        let sha512 = "ab".repeat(MAX_FINGERPRINT);
        let t = TrustedCerts::parse("t", &sha512).unwrap();
        assert!(t.matches(&cert(&sha512.to_uppercase(), "", "")));
        // One more byte than any fingerprint cannot match (nor overflow the buffer).
        assert!(!t.matches(&cert(&"ab".repeat(MAX_FINGERPRINT + 1), "", "")));
        let md5 = "0f".repeat(MIN_FINGERPRINT);
        assert!(TrustedCerts::parse("t", &md5).is_ok());
    }

    #[test]
    fn each_bad_line_kind_names_file_and_line() {
        assert_eq!(
            error(&format!("{MD5}\nnot-a-fingerprint\n")),
            "trusted.txt:2: \"not-a-fingerprint\" is not a fingerprint (a fingerprint is hex pairs such as AB:CD:…, with or without the colons, or the entry is subject=<name>)"
        );
        assert!(error("# c\n\nC2:9D:F4:8\n").starts_with(
            "trusted.txt:3: \"C2:9D:F4:8\" is not a fingerprint: colons must separate every hex pair"
        ));
        assert!(error("C29DF487717373D918E7C2F3C1DA6E0").starts_with(
            "trusted.txt:1: \"C29DF487717373D918E7C2F3C1DA6E0\" is not a fingerprint: an odd number of hex digits"
        ));
        assert!(error("C2::9D").contains("colons must separate every hex pair"));
        assert_eq!(
            error("C2:9D:F4:87"),
            "trusted.txt:1: \"C2:9D:F4:87\" is 4 bytes; a fingerprint is 16 to 64 bytes (MD5 to SHA-512)"
        );
        assert!(error(&"ab".repeat(MAX_FINGERPRINT + 1)).contains("is 65 bytes"));
        assert_eq!(
            error("subject="),
            "trusted.txt:1: \"subject=\" names no subject"
        );
        assert_eq!(
            error(&format!("subject={}", "x".repeat(MAX_SUBJECT + 1))),
            "trusted.txt:1: subject of 257 bytes is longer than 256"
        );
        assert_eq!(
            error("issuer=Wietse Venema"),
            "trusted.txt:1: unknown key \"issuer=\" (an entry is a fingerprint or subject=<name>)"
        );
    }
}
