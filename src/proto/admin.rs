//! The admin protocol (`greyhound admin` ↔ the server's `--admin` Unix socket), sans-IO.
//!
//! A frame is a 4-byte big-endian length `N` (1 ..= [`MAX_FRAME`]) followed by `N` bytes of
//! one UTF-8 JSON object. The client sends one [`Request`] frame and reads one [`Response`]
//! frame, and may go on with the next request on the same connection (`import` sends its
//! batches that way). JSON because the answers are what `--json` prints and what scripts read,
//! and an administrator can speak it with `socat` and `jq`; the rate is a few requests a
//! second, never the request path's. The layout is documented in `docs/PROTOCOL.md`, section 4.
//!
//! Bounds: a frame is at most [`MAX_FRAME`] bytes (the length is checked before any byte of
//! the body is awaited, so a peer cannot make the server buffer more), and an import batch at
//! most [`MAX_IMPORT_ITEMS`] items.

use std::net::IpAddr;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Bytes of the length prefix.
pub const LENGTH_LEN: usize = 4;
/// Largest frame body, in bytes: a batch of [`MAX_IMPORT_ITEMS`] items of ordinary addresses
/// is ~200 KiB; 4 MiB leaves room for long ones and bounds what one connection can hold.
pub const MAX_FRAME: usize = 4 << 20;
/// Most items in one `import` request. A batch is merged under the shard locks it needs, one
/// after another, in well under a millisecond; the client sends a large import as many
/// batches, each answered before the next, so the server never holds more than one.
pub const MAX_IMPORT_ITEMS: usize = 1000;

/// Why a frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminError {
    /// The length prefix is 0.
    #[error("empty frame")]
    Empty,
    /// The length prefix is larger than [`MAX_FRAME`] (or a frame to send would be).
    #[error("frame of {len} bytes, more than the {} allowed", MAX_FRAME)]
    TooLarge {
        /// The length given.
        len: usize,
    },
    /// The body is not the JSON of a request (or response).
    #[error("bad frame: {0}")]
    Json(String),
    /// An import batch holds more than [`MAX_IMPORT_ITEMS`] items.
    #[error(
        "import batch of {n} items, more than the {} allowed",
        MAX_IMPORT_ITEMS
    )]
    TooManyItems {
        /// Items in the batch.
        n: usize,
    },
}

/// One request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Records by state, memory, snapshot age, uptime, cluster.
    Status,
    /// Explain a triplet; changes nothing.
    Lookup {
        /// Client address.
        client: IpAddr,
        /// Envelope sender (`""` or `<>`: the null sender).
        sender: String,
        /// Envelope recipient.
        recipient: String,
        /// The client's verified host name (for the `name` identity and name exemptions).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// Whitelist a triplet now.
    Whitelist {
        /// Client address.
        client: IpAddr,
        /// Envelope sender.
        sender: String,
        /// Envelope recipient.
        recipient: String,
        /// Seconds to keep it whitelisted (default: `whitelist-ttl`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ttl: Option<u32>,
    },
    /// Delete a triplet's record (under every identity that applies).
    Delete {
        /// Client address.
        client: IpAddr,
        /// Envelope sender.
        sender: String,
        /// Envelope recipient.
        recipient: String,
        /// The client's verified host name: its `name` identity's record is deleted too.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// Delete a client's auto-whitelist entry.
    DeleteClient {
        /// Client address.
        client: IpAddr,
    },
    /// Write a snapshot now.
    Snapshot,
    /// Merge a batch of records read from another program.
    Import {
        /// At most [`MAX_IMPORT_ITEMS`].
        items: Vec<ImportItem>,
    },
}

/// One record of an import batch ([`crate::import::Item`] on the wire).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum ImportItem {
    /// A triplet and its Unix times.
    Triplet {
        /// Client address or network.
        client: IpAddr,
        /// Envelope sender (`""`: the null sender).
        sender: String,
        /// Envelope recipient.
        recipient: String,
        /// Unix seconds of the first attempt.
        first_seen: u64,
        /// Unix seconds of the last attempt.
        last_seen: u64,
        /// Whether the peer had let it pass.
        passed: bool,
    },
    /// A client's auto-whitelist count.
    Client {
        /// Client address or network.
        client: IpAddr,
        /// Passes counted.
        count: u32,
        /// Unix seconds of the last counted pass.
        last_seen: u64,
    },
}

impl From<&crate::import::Item> for ImportItem {
    fn from(item: &crate::import::Item) -> Self {
        use crate::import::Item;
        match item {
            Item::Triplet(t) => ImportItem::Triplet {
                client: t.client,
                sender: t.sender.clone(),
                recipient: t.recipient.clone(),
                first_seen: t.first_seen,
                last_seen: t.last_seen,
                passed: t.passed,
            },
            Item::Client(c) => ImportItem::Client {
                client: c.client,
                count: c.count,
                last_seen: c.last_seen,
            },
        }
    }
}

/// How a request went: what `greyhound admin` turns into its exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Done, or found (exit 0).
    Ok,
    /// Nothing to look up or delete (exit 1).
    NotFound,
    /// Refused or failed (exit 2).
    Error,
}

/// One response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// How it went.
    pub outcome: Outcome,
    /// One line for a person.
    pub message: String,
    /// What the request asked for, if anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<Body>,
}

impl Response {
    /// An error response.
    pub fn error(message: impl Into<String>) -> Self {
        Self {
            outcome: Outcome::Error,
            message: message.into(),
            body: None,
        }
    }
}

/// The payload of a [`Response`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Body {
    /// `status`.
    Status(StatusReport),
    /// `lookup`.
    Lookup(LookupReport),
    /// `whitelist`.
    Whitelist(WhitelistReport),
    /// `import` (this batch).
    Import(ImportReport),
    /// `snapshot`.
    Snapshot(SnapshotReport),
}

/// The answer to `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// Greyhound's version.
    pub version: String,
    /// Seconds since the server started.
    pub uptime_seconds: u64,
    /// Triplet records in memory (some may have expired and wait for the expiry sweep).
    pub triplets: u64,
    /// Of those, greylisted (not yet passed).
    pub greylisted: u64,
    /// Of those, whitelisted.
    pub whitelisted: u64,
    /// Client auto-whitelist records.
    pub awl_clients: u64,
    /// Of those, at or above `awl-clients` passes.
    pub awl_active: u64,
    /// Client networks trapped by a greytrap now.
    pub trapped_clients: u64,
    /// Deletes remembered so a peer's older copy cannot bring a record back.
    pub tombstones: u64,
    /// Bytes held by the tables and their expiry wheels.
    pub table_bytes: u64,
    /// Unix time of the last snapshot written since start (`null`: none yet).
    pub snapshot_unix: Option<u64>,
    /// Seconds since then.
    pub snapshot_age_seconds: Option<u64>,
    /// The cluster as `GET /status` shows it (`null` on a single node): peers, lag, gaps.
    pub cluster: Option<serde_json::Value>,
}

/// A triplet's record under one identity, in [`LookupReport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityReport {
    /// `spf`, `name` or `prefix`.
    pub kind: String,
    /// `spf:example.org`, `name:example.net` or the network, `192.0.2.0/24`.
    pub identity: String,
    /// The record's key (32 hex digits), as in logs.
    pub key: String,
    /// `none`, `greylisted`, `whitelisted` or `expired`.
    pub state: String,
    /// Unix time of the first attempt of this greylisting cycle.
    pub first_seen: Option<u64>,
    /// Unix time of the last attempt.
    pub last_seen: Option<u64>,
    /// Greylisted: Unix time from which a retry passes.
    pub passes_from: Option<u64>,
    /// Whitelisted: Unix time until which it passes.
    pub whitelisted_until: Option<u64>,
    /// Unix time after which the record is forgotten.
    pub expires: Option<u64>,
}

/// The answer to `lookup`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LookupReport {
    /// The client's network as keyed.
    pub client_net: String,
    /// The normalised sender (`""`: null sender).
    pub sender: String,
    /// The normalised recipient.
    pub recipient: String,
    /// Every identity that applies, in order; new records are written under the first.
    pub identities: Vec<IdentityReport>,
    /// The exemption list that passes the request (`client`, `client-name`, `sender`,
    /// `recipient`), if any.
    pub exemption: Option<String>,
    /// The recipient domain's `domain-policy` entry, if any (`off`, `delay=60s`, …).
    pub domain_rule: Option<String>,
    /// The recipient is a greytrap.
    pub greytrap: bool,
    /// The client is trapped now.
    pub trapped: bool,
    /// The client's auto-whitelist identity (`spf:…` or its network).
    pub awl_identity: String,
    /// Its counted passes (0: none).
    pub awl_count: u32,
    /// The count that auto-whitelists (`awl-clients`; 0: off).
    pub awl_threshold: u32,
    /// Whether the client is auto-whitelisted now.
    pub awl_active: bool,
    /// The answer a request would get now: `DEFER 240`, `PASS known`, …
    pub answer: String,
    /// The server's Unix time.
    pub now: u64,
}

/// The answer to `whitelist`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WhitelistReport {
    /// The identity it was written under.
    pub identity: String,
    /// Unix time until which it passes.
    pub whitelisted_until: u64,
}

/// The answer to one `import` batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportReport {
    /// Triplets merged.
    pub triplets: u64,
    /// Client counts merged.
    pub clients: u64,
    /// Records already expired by this server's settings.
    pub expired: u64,
    /// Records older than a delete made here.
    pub deleted: u64,
}

/// The answer to `snapshot`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotReport {
    /// The file written.
    pub file: String,
    /// Triplets in it.
    pub triplets: u64,
    /// Clients in it.
    pub clients: u64,
    /// Its size.
    pub bytes: u64,
    /// Milliseconds it took.
    pub ms: u64,
}

/// Reads one frame from the start of `buf`: `Ok(None)` when more bytes are needed, otherwise
/// the value and the bytes used. The length is checked as soon as its 4 bytes are there.
fn parse_frame<T: DeserializeOwned>(buf: &[u8]) -> Result<Option<(T, usize)>, AdminError> {
    let Some(len) = frame_len(buf)? else {
        return Ok(None);
    };
    let Some(body) = buf.get(LENGTH_LEN..LENGTH_LEN + len) else {
        return Ok(None);
    };
    let v = serde_json::from_slice(body).map_err(|e| AdminError::Json(e.to_string()))?;
    Ok(Some((v, LENGTH_LEN + len)))
}

/// The body length a frame's prefix announces, once its 4 bytes are there.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, AdminError> {
    let Some(prefix) = buf.get(..LENGTH_LEN) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes(prefix.try_into().expect("4 bytes")) as usize;
    match len {
        0 => Err(AdminError::Empty),
        l if l > MAX_FRAME => Err(AdminError::TooLarge { len: l }),
        l => Ok(Some(l)),
    }
}

fn encode_frame<T: Serialize>(v: &T, out: &mut Vec<u8>) -> Result<(), AdminError> {
    let start = out.len();
    out.extend_from_slice(&[0; LENGTH_LEN]);
    serde_json::to_writer(&mut *out, v).map_err(|e| AdminError::Json(e.to_string()))?;
    let len = out.len() - start - LENGTH_LEN;
    if len > MAX_FRAME {
        out.truncate(start);
        return Err(AdminError::TooLarge { len });
    }
    out[start..start + LENGTH_LEN].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

/// Reads one request (see [`parse_frame`]); an import batch over [`MAX_IMPORT_ITEMS`] is
/// refused.
pub fn parse_request(buf: &[u8]) -> Result<Option<(Request, usize)>, AdminError> {
    let parsed = parse_frame::<Request>(buf)?;
    if let Some((Request::Import { items }, _)) = &parsed {
        if items.len() > MAX_IMPORT_ITEMS {
            return Err(AdminError::TooManyItems { n: items.len() });
        }
    }
    Ok(parsed)
}

/// Appends one request frame to `out`; refuses what the server would refuse (nothing is
/// appended then).
pub fn encode_request(r: &Request, out: &mut Vec<u8>) -> Result<(), AdminError> {
    if let Request::Import { items } = r {
        if items.len() > MAX_IMPORT_ITEMS {
            return Err(AdminError::TooManyItems { n: items.len() });
        }
    }
    encode_frame(r, out)
}

/// Reads one response (see [`parse_frame`]).
pub fn parse_response(buf: &[u8]) -> Result<Option<(Response, usize)>, AdminError> {
    parse_frame(buf)
}

/// Appends one response frame to `out`.
pub fn encode_response(r: &Response, out: &mut Vec<u8>) -> Result<(), AdminError> {
    encode_frame(r, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn ip() -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))
    }

    fn every_request() -> Vec<Request> {
        vec![
            Request::Status,
            Request::Lookup {
                client: ip(),
                sender: "a@b.example".into(),
                recipient: "c@d.example".into(),
                name: Some("mx.b.example".into()),
            },
            Request::Lookup {
                client: "2001:db8::1".parse().unwrap(),
                sender: String::new(),
                recipient: "c@d.example".into(),
                name: None,
            },
            Request::Whitelist {
                client: ip(),
                sender: "a@b.example".into(),
                recipient: "c@d.example".into(),
                ttl: Some(3600),
            },
            Request::Delete {
                client: ip(),
                sender: "a@b.example".into(),
                recipient: "c@d.example".into(),
                name: None,
            },
            Request::DeleteClient { client: ip() },
            Request::Snapshot,
            Request::Import {
                items: vec![
                    ImportItem::Triplet {
                        client: ip(),
                        sender: "a@b.example".into(),
                        recipient: "c@d.example".into(),
                        first_seen: 1_700_000_000,
                        last_seen: 1_700_000_400,
                        passed: true,
                    },
                    ImportItem::Client {
                        client: ip(),
                        count: 5,
                        last_seen: 1_700_000_400,
                    },
                ],
            },
        ]
    }

    #[test]
    fn every_request_round_trips_even_split_anywhere() {
        let mut all = Vec::new();
        for r in every_request() {
            encode_request(&r, &mut all).unwrap();
        }
        let mut at = 0;
        for want in every_request() {
            // Every prefix shorter than the frame asks for more.
            let (got, len) = parse_request(&all[at..]).unwrap().unwrap();
            assert_eq!(got, want);
            for cut in 0..len {
                assert_eq!(parse_request(&all[at..at + cut]).unwrap(), None, "{cut}");
            }
            at += len;
        }
        assert_eq!(at, all.len());
    }

    #[test]
    fn responses_round_trip() {
        let r = Response {
            outcome: Outcome::NotFound,
            message: "no record".into(),
            body: Some(Body::Import(ImportReport {
                triplets: 3,
                clients: 1,
                expired: 2,
                deleted: 0,
            })),
        };
        let mut out = Vec::new();
        encode_response(&r, &mut out).unwrap();
        assert_eq!(parse_response(&out).unwrap(), Some((r, out.len())));
        let e = Response::error("boom");
        out.clear();
        encode_response(&e, &mut out).unwrap();
        let text = std::str::from_utf8(&out[LENGTH_LEN..]).unwrap();
        assert_eq!(text, r#"{"outcome":"error","message":"boom"}"#);
    }

    #[test]
    fn the_wire_form_is_the_documented_one() {
        let mut out = Vec::new();
        encode_request(&Request::DeleteClient { client: ip() }, &mut out).unwrap();
        let body = br#"{"op":"delete-client","client":"192.0.2.1"}"#;
        assert_eq!(&out[..LENGTH_LEN], &(body.len() as u32).to_be_bytes());
        assert_eq!(&out[LENGTH_LEN..], body);
    }

    #[test]
    fn frame_length_bounds() {
        let frame = |len: u32| len.to_be_bytes().to_vec();
        assert_eq!(parse_request(&frame(0)), Err(AdminError::Empty));
        assert_eq!(parse_request(&frame(MAX_FRAME as u32)), Ok(None));
        assert_eq!(
            parse_request(&frame(MAX_FRAME as u32 + 1)),
            Err(AdminError::TooLarge { len: MAX_FRAME + 1 })
        );
        assert_eq!(
            parse_request(&frame(u32::MAX)),
            Err(AdminError::TooLarge {
                len: u32::MAX as usize
            })
        );
        // A frame too large to send is refused before it is sent, and nothing is left behind.
        let huge = Request::Lookup {
            client: ip(),
            sender: "x".repeat(MAX_FRAME),
            recipient: String::new(),
            name: None,
        };
        let mut out = b"kept".to_vec();
        assert!(matches!(
            encode_request(&huge, &mut out),
            Err(AdminError::TooLarge { .. })
        ));
        assert_eq!(out, b"kept");
    }

    #[test]
    fn import_batches_are_bounded() {
        let item = ImportItem::Client {
            client: ip(),
            count: 1,
            last_seen: 1,
        };
        let at_most = Request::Import {
            items: vec![item.clone(); MAX_IMPORT_ITEMS],
        };
        let mut out = Vec::new();
        encode_request(&at_most, &mut out).unwrap();
        assert!(parse_request(&out).unwrap().is_some());
        let over = Request::Import {
            items: vec![item; MAX_IMPORT_ITEMS + 1],
        };
        assert_eq!(
            encode_request(&over, &mut Vec::new()),
            Err(AdminError::TooManyItems {
                n: MAX_IMPORT_ITEMS + 1
            })
        );
        // Built by hand, as a hostile client would: refused on reading too.
        let body = serde_json::to_vec(&over).unwrap();
        let mut raw = (body.len() as u32).to_be_bytes().to_vec();
        raw.extend_from_slice(&body);
        assert_eq!(
            parse_request(&raw),
            Err(AdminError::TooManyItems {
                n: MAX_IMPORT_ITEMS + 1
            })
        );
    }

    #[test]
    fn garbage_is_a_clear_error() {
        let framed = |body: &[u8]| {
            let mut v = (body.len() as u32).to_be_bytes().to_vec();
            v.extend_from_slice(body);
            v
        };
        for body in [
            &b"not json"[..],
            b"{}",
            br#"{"op":"fly"}"#,
            br#"{"op":"lookup","client":"not-an-ip","sender":"","recipient":""}"#,
            br#"{"op":"delete-client"}"#,
            b"\xff\xfe\x00",
        ] {
            let e = parse_request(&framed(body)).unwrap_err();
            assert!(matches!(e, AdminError::Json(_)), "{body:?}: {e:?}");
            assert!(e.to_string().starts_with("bad frame: "), "{e}");
        }
        let e = parse_request(&framed(br#"{"op":"fly"}"#)).unwrap_err();
        assert!(e.to_string().contains("fly"), "{e}");
    }
}
