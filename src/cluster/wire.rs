//! The batch record format of stream entries, as specified in `docs/CLUSTER_FORMAT.md`.
//!
//! A node publishes its changed records in batches: each entry of its stream has one field `r`
//! whose value is one batch. A batch is a 32-byte header, the triplet records (24 bytes each),
//! the auto-whitelist records (32 bytes each), and a CRC-32C of every preceding byte; its exact
//! length follows from the header's counts. The records are laid out exactly as in a snapshot:
//! they are written and read by [`format::encode_triplet`], [`format::decode_triplet`] and
//! their AWL twins, so the two formats cannot drift apart.
//!
//! [`decode`] checks everything — length, magic, version, counts, checksum and every record —
//! before it returns, so a reader never merges part of a damaged batch.
//!
//! Version 2 adds tombstones (records deleted by `greyhound admin delete`) after the AWL
//! records, counted in an 8-byte header extension. A batch without tombstones is still written
//! as version 1, so a node of the previous release keeps reading every batch but those that
//! carry deletes (the publisher sends tombstones in batches of their own).

use crate::engine::clock::MAX_SECS;
use crate::engine::{AwlRecord, Key, Tombstone, TombstoneKind, TripletRecord};
use crate::snapshot::format::{self, get, put, Field, AWL_LEN, TRIPLET_LEN};
use std::fmt;

/// First four bytes of every batch.
pub const MAGIC: [u8; 4] = *b"GHEV";
/// The format version of batches without tombstones (written and read).
pub const VERSION: u16 = 1;
/// The format version of batches with tombstones (written and read).
pub const VERSION_TOMBSTONES: u16 = 2;
/// Bytes in the header.
pub const HEADER_LEN: usize = 32;
/// Bytes in a version 2 header: the version 1 header and its extension.
pub const HEADER_LEN_V2: usize = 40;
/// Bytes in a tombstone record.
pub const TOMBSTONE_LEN: usize = 24;
/// Bytes in the trailing checksum.
pub const CRC_LEN: usize = 4;
/// Most records (triplets and clients together) in one batch; the publisher splits larger
/// change sets over several entries, and [`decode`] refuses a batch claiming more.
///
/// Why this bound: a batch is then at most 524 324 bytes (512 KiB of AWL records, header and
/// checksum; 384 KiB when it is all triplets), which Redis stores and serves in one go, far
/// from its 512 MB `proto-max-bulk-len`; and a reader asking `XREAD COUNT n` knows it holds at
/// most `n` such batches at once. At 100 k changes/s that is still only about six entries a
/// second per node.
pub const MAX_RECORDS: usize = 16_384;

/// The header's fields, in batch order (the "Header" table of `docs/CLUSTER_FORMAT.md`).
pub mod header {
    use super::Field;

    /// ASCII `GHEV` ([`super::MAGIC`]).
    pub const MAGIC: Field = Field { at: 0, size: 4 };
    /// Format version ([`super::VERSION`]).
    pub const VERSION: Field = Field { at: 4, size: 2 };
    /// Header length ([`super::HEADER_LEN`]).
    pub const LENGTH: Field = Field { at: 6, size: 2 };
    /// Public hash of the publisher's hash key (as a snapshot header's key id).
    pub const KEY_ID: Field = Field { at: 8, size: 8 };
    /// Unix milliseconds when the publisher assembled the batch.
    pub const CREATED_MS: Field = Field { at: 16, size: 8 };
    /// Number of triplet records.
    pub const TRIPLETS: Field = Field { at: 24, size: 4 };
    /// Number of auto-whitelist records.
    pub const CLIENTS: Field = Field { at: 28, size: 4 };
    /// Version 2: number of tombstone records.
    pub const TOMBSTONES: Field = Field { at: 32, size: 4 };
    /// Version 2: reserved, zero.
    pub const RESERVED: Field = Field { at: 36, size: 4 };
}

/// A tombstone's fields, within the record (the "Tombstone record" table).
pub mod tombstone {
    use super::Field;

    /// The deleted record's key, low 64 bits.
    pub const KEY_LO: Field = Field { at: 0, size: 8 };
    /// The key, high 64 bits.
    pub const KEY_HI: Field = Field { at: 8, size: 8 };
    /// When it was deleted (engine seconds).
    pub const DELETED_AT: Field = Field { at: 16, size: 4 };
    /// `1`: a triplet record; `2`: an AWL record.
    pub const KIND: Field = Field { at: 20, size: 4 };
}

const _: () = assert!(header::CLIENTS.end() == HEADER_LEN);
const _: () = assert!(header::RESERVED.end() == HEADER_LEN_V2);
const _: () = assert!(tombstone::KIND.end() == TOMBSTONE_LEN);

/// What a batch says about itself besides its records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Meta {
    /// The publisher's hash-key id ([`crate::engine::HashSecret::id`], the value a snapshot
    /// header stores as its key id). A reader refuses records made under another key: their
    /// keys would match nothing of its own.
    pub key_id: u64,
    /// Unix milliseconds (publisher's clock) from which the batch's changes may have been
    /// made: the start of the collection window that found the oldest of them. A reader
    /// subtracts it from its own clock to tell its replication lag.
    pub created_ms: u64,
}

/// The exact length in bytes of a batch of `triplets` and `clients` records (version 1).
pub const fn encoded_len(triplets: usize, clients: usize) -> usize {
    HEADER_LEN + triplets * TRIPLET_LEN + clients * AWL_LEN + CRC_LEN
}

/// The exact length in bytes of a version 2 batch.
pub const fn encoded_len_v2(triplets: usize, clients: usize, tombstones: usize) -> usize {
    HEADER_LEN_V2
        + triplets * TRIPLET_LEN
        + clients * AWL_LEN
        + tombstones * TOMBSTONE_LEN
        + CRC_LEN
}

/// Appends one batch to `out`: version 1 when `tombstones` is empty (exactly [`encode`]),
/// version 2 otherwise. The same rules as [`encode`]; tombstones count towards
/// [`MAX_RECORDS`].
pub fn encode_with(
    meta: &Meta,
    triplets: &[TripletRecord],
    clients: &[AwlRecord],
    tombstones: &[Tombstone],
    out: &mut Vec<u8>,
) {
    if tombstones.is_empty() {
        return encode(meta, triplets, clients, out);
    }
    debug_assert!(
        triplets.len() + clients.len() + tombstones.len() <= MAX_RECORDS,
        "records exceed MAX_RECORDS"
    );
    let start = out.len();
    encode(meta, triplets, clients, out);
    // Rewritten as version 2: drop the checksum, widen the header, append the tombstones.
    out.truncate(out.len() - CRC_LEN);
    let mut ext = [0u8; HEADER_LEN_V2 - HEADER_LEN];
    let e = |f: Field| Field {
        at: f.at - HEADER_LEN,
        size: f.size,
    };
    put(
        &mut ext,
        e(header::TOMBSTONES),
        (tombstones.len() as u32).to_le_bytes(),
    );
    out.splice(start + HEADER_LEN..start + HEADER_LEN, ext);
    let h = &mut out[start..start + HEADER_LEN_V2];
    put(h, header::VERSION, VERSION_TOMBSTONES.to_le_bytes());
    put(h, header::LENGTH, (HEADER_LEN_V2 as u16).to_le_bytes());
    for t in tombstones {
        debug_assert!(!t.key.is_vacant() && t.deleted_at <= MAX_SECS, "{t:?}");
        let mut b = [0u8; TOMBSTONE_LEN];
        put(&mut b, tombstone::KEY_LO, t.key.lo.to_le_bytes());
        put(&mut b, tombstone::KEY_HI, t.key.hi.to_le_bytes());
        put(&mut b, tombstone::DELETED_AT, t.deleted_at.to_le_bytes());
        put(&mut b, tombstone::KIND, t.kind.code().to_le_bytes());
        out.extend_from_slice(&b);
    }
    let crc = crc32c::crc32c(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
}

fn decode_tombstone(b: &[u8]) -> (Key, u32, u32) {
    (
        Key {
            lo: u64::from_le_bytes(get(b, tombstone::KEY_LO)),
            hi: u64::from_le_bytes(get(b, tombstone::KEY_HI)),
        },
        u32::from_le_bytes(get(b, tombstone::DELETED_AT)),
        u32::from_le_bytes(get(b, tombstone::KIND)),
    )
}

/// Appends one batch of these records to `out` (whatever `out` already holds is kept and not
/// covered by the checksum).
///
/// The caller keeps to [`MAX_RECORDS`] records in all and hands over only live table records
/// (never the vacant key, times within the engine's clock): a debug build panics otherwise; a
/// release build writes the batch as given, and every reader refuses it.
pub fn encode(meta: &Meta, triplets: &[TripletRecord], clients: &[AwlRecord], out: &mut Vec<u8>) {
    use header as f;
    debug_assert!(
        triplets.len() + clients.len() <= MAX_RECORDS,
        "{} + {} records exceed MAX_RECORDS",
        triplets.len(),
        clients.len()
    );
    let start = out.len();
    out.reserve(encoded_len(triplets.len(), clients.len()));
    let mut h = [0u8; HEADER_LEN];
    put(&mut h, f::MAGIC, MAGIC);
    put(&mut h, f::VERSION, VERSION.to_le_bytes());
    put(&mut h, f::LENGTH, (HEADER_LEN as u16).to_le_bytes());
    put(&mut h, f::KEY_ID, meta.key_id.to_le_bytes());
    put(&mut h, f::CREATED_MS, meta.created_ms.to_le_bytes());
    put(&mut h, f::TRIPLETS, (triplets.len() as u32).to_le_bytes());
    put(&mut h, f::CLIENTS, (clients.len() as u32).to_le_bytes());
    out.extend_from_slice(&h);
    for r in triplets {
        debug_assert!(
            !r.key.is_vacant() && r.last_seen() <= MAX_SECS,
            "not a table record: {r:?}"
        );
        format::encode_triplet(r, out);
    }
    for r in clients {
        debug_assert!(
            !r.key.is_vacant() && r.last_seen <= MAX_SECS && r.last_counted <= MAX_SECS,
            "not a table record: {r:?}"
        );
        format::encode_awl(r, out);
    }
    let crc = crc32c::crc32c(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
}

/// Which part of a batch a record is in, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// A triplet record.
    Triplet,
    /// An auto-whitelist record.
    Client,
    /// A tombstone.
    Tombstone,
}

impl fmt::Display for RecordKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Triplet => "triplet",
            Self::Client => "AWL",
            Self::Tombstone => "tombstone",
        })
    }
}

/// Why a batch was refused. Each variant names what is wrong, for one log line; the checks run
/// in the order of the variants (see `docs/CLUSTER_FORMAT.md`, "Reading").
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The first bytes are not [`MAGIC`]: not a batch at all.
    #[error("not a greyhound batch (bad magic)")]
    Magic,
    /// Shorter than a header and a checksum.
    #[error(
        "truncated: {len} bytes, shorter than a {}-byte header and its {}-byte checksum",
        HEADER_LEN,
        CRC_LEN
    )]
    Short {
        /// Bytes in the batch.
        len: usize,
    },
    /// A version other than [`VERSION`] and [`VERSION_TOMBSTONES`], in a batch whose
    /// checksum holds: written by a newer Greyhound, not damaged.
    #[error(
        "format version {0}, this greyhound reads versions {VERSION} and {VERSION_TOMBSTONES} (a node of another release is publishing)"
    )]
    Version(u16),
    /// A header length other than its version's ([`HEADER_LEN`], [`HEADER_LEN_V2`]).
    #[error("header length {length}, version {version} has {expected}")]
    HeaderLength {
        /// The length stored.
        length: u16,
        /// The batch's version.
        version: u16,
        /// That version's header length.
        expected: usize,
    },
    /// A version 2 header's reserved field is not zero.
    #[error("header reserved field is {0:#010x}, not 0")]
    HeaderReserved(u32),
    /// The header counts more than [`MAX_RECORDS`] records.
    #[error(
        "{triplets} triplet, {clients} AWL and {tombstones} tombstone records, more than the {} a batch may hold",
        MAX_RECORDS
    )]
    TooManyRecords {
        /// Triplet records counted.
        triplets: u32,
        /// AWL records counted.
        clients: u32,
        /// Tombstones counted (0 in version 1).
        tombstones: u32,
    },
    /// The batch is not as long as the header's counts say.
    #[error("truncated or padded: {actual} bytes, the header's counts say {expected}")]
    Length {
        /// Bytes the counts imply.
        expected: usize,
        /// Bytes in the batch.
        actual: usize,
    },
    /// The trailing checksum does not match the bytes.
    #[error("checksum mismatch (stored {stored:08x}, computed {computed:08x})")]
    Checksum {
        /// The batch's last four bytes.
        stored: u32,
        /// Computed over the bytes before them.
        computed: u32,
    },
    /// A record carries the all-zero key, which marks a vacant table slot.
    #[error("{kind} record {index} has the vacant key")]
    VacantKey {
        /// Which records.
        kind: RecordKind,
        /// Position among them, from 0.
        index: usize,
    },
    /// A time past the engine's last second (bit 31 set where it is not a flag).
    #[error(
        "{kind} record {index}: {field} {value} is past the engine's last second {}",
        MAX_SECS
    )]
    Time {
        /// Which records.
        kind: RecordKind,
        /// Position among them, from 0.
        index: usize,
        /// Which time, as the document names it.
        field: &'static str,
        /// The value stored.
        value: u32,
    },
    /// An AWL record's reserved field is not zero.
    #[error("AWL record {index}: reserved field is {value:#010x}, not 0")]
    Reserved {
        /// Position among the AWL records, from 0.
        index: usize,
        /// The value stored.
        value: u32,
    },
    /// A tombstone of no known kind.
    #[error("tombstone record {index}: kind {value}, not 1 (triplet) or 2 (AWL)")]
    TombstoneKind {
        /// Position among the tombstones, from 0.
        index: usize,
        /// The value stored.
        value: u32,
    },
}

/// A verified batch: its meta data and its records, borrowed from the entry's bytes.
#[derive(Debug, Clone)]
pub struct Decoded<'a> {
    /// Key id and creation time.
    pub meta: Meta,
    triplets: &'a [u8],
    clients: &'a [u8],
    tombstones: &'a [u8],
}

impl<'a> Decoded<'a> {
    /// The triplet records, decoded as they are iterated.
    pub fn triplets(&self) -> impl ExactSizeIterator<Item = TripletRecord> + Clone + 'a {
        self.triplets
            .chunks_exact(TRIPLET_LEN)
            .map(format::decode_triplet)
    }

    /// The auto-whitelist records, decoded as they are iterated.
    pub fn clients(&self) -> impl ExactSizeIterator<Item = AwlRecord> + Clone + 'a {
        self.clients.chunks_exact(AWL_LEN).map(format::decode_awl)
    }

    /// The tombstones (none in a version 1 batch), to apply before the records.
    pub fn tombstones(&self) -> impl ExactSizeIterator<Item = Tombstone> + Clone + 'a {
        self.tombstones.chunks_exact(TOMBSTONE_LEN).map(|b| {
            let (key, deleted_at, kind) = decode_tombstone(b);
            Tombstone {
                key,
                deleted_at,
                // Checked by `decode`.
                kind: TombstoneKind::from_code(kind).unwrap_or(TombstoneKind::Triplet),
            }
        })
    }
}

/// Checks a whole batch, then returns a view of it. The checks, in order: magic, minimum
/// length, version (a batch of another version is named as such only if its checksum holds —
/// the one thing every version keeps in place — so damage is never mistaken for a newer
/// node), header length, counts ≤ [`MAX_RECORDS`], exact length, checksum, and then every
/// record: no vacant key, no time past [`MAX_SECS`] where bit 31 is not a flag, AWL reserved
/// field zero. The key id is not checked here: the caller compares it with its own.
pub fn decode(bytes: &[u8]) -> Result<Decoded<'_>, WireError> {
    use header as f;
    let present = bytes.len().min(MAGIC.len());
    if bytes[..present] != MAGIC[..present] {
        return Err(WireError::Magic);
    }
    if bytes.len() < HEADER_LEN + CRC_LEN {
        return Err(WireError::Short { len: bytes.len() });
    }
    let (covered, crc) = bytes.split_at(bytes.len() - CRC_LEN);
    let checksum = || {
        let stored = u32::from_le_bytes(crc.try_into().expect("CRC_LEN bytes"));
        let computed = crc32c::crc32c(covered);
        if stored == computed {
            Ok(())
        } else {
            Err(WireError::Checksum { stored, computed })
        }
    };
    let h = &bytes[..HEADER_LEN];
    let version = u16::from_le_bytes(get(h, f::VERSION));
    let header_len = match version {
        VERSION => HEADER_LEN,
        VERSION_TOMBSTONES => HEADER_LEN_V2,
        _ => {
            checksum()?;
            return Err(WireError::Version(version));
        }
    };
    let length = u16::from_le_bytes(get(h, f::LENGTH));
    if usize::from(length) != header_len {
        return Err(WireError::HeaderLength {
            length,
            version,
            expected: header_len,
        });
    }
    if bytes.len() < header_len + CRC_LEN {
        return Err(WireError::Short { len: bytes.len() });
    }
    let h = &bytes[..header_len];
    let triplets = u32::from_le_bytes(get(h, f::TRIPLETS));
    let clients = u32::from_le_bytes(get(h, f::CLIENTS));
    let tombstones = if version == VERSION_TOMBSTONES {
        u32::from_le_bytes(get(h, f::TOMBSTONES))
    } else {
        0
    };
    // Summed in u64: three u32 counts cannot overflow it, whatever the bytes say.
    if u64::from(triplets) + u64::from(clients) + u64::from(tombstones) > MAX_RECORDS as u64 {
        return Err(WireError::TooManyRecords {
            triplets,
            clients,
            tombstones,
        });
    }
    let (t, c, d) = (triplets as usize, clients as usize, tombstones as usize);
    let expected = if version == VERSION {
        encoded_len(t, c)
    } else {
        encoded_len_v2(t, c, d)
    };
    if bytes.len() != expected {
        return Err(WireError::Length {
            expected,
            actual: bytes.len(),
        });
    }
    checksum()?;
    if version == VERSION_TOMBSTONES {
        let reserved = u32::from_le_bytes(get(h, f::RESERVED));
        if reserved != 0 {
            return Err(WireError::HeaderReserved(reserved));
        }
    }
    let body = &covered[header_len..];
    let (triplets, rest) = body.split_at(t * TRIPLET_LEN);
    let (clients, tombstones) = rest.split_at(c * AWL_LEN);
    check_records(triplets, clients)?;
    check_tombstones(tombstones)?;
    Ok(Decoded {
        meta: Meta {
            key_id: u64::from_le_bytes(get(h, f::KEY_ID)),
            created_ms: u64::from_le_bytes(get(h, f::CREATED_MS)),
        },
        triplets,
        clients,
        tombstones,
    })
}

/// Tombstones: no vacant key, a time within the engine's clock, a known kind.
fn check_tombstones(tombstones: &[u8]) -> Result<(), WireError> {
    let kind = RecordKind::Tombstone;
    for (index, b) in tombstones.chunks_exact(TOMBSTONE_LEN).enumerate() {
        let (key, deleted_at, code) = decode_tombstone(b);
        if key.is_vacant() {
            return Err(WireError::VacantKey { kind, index });
        }
        if deleted_at > MAX_SECS {
            return Err(WireError::Time {
                kind,
                index,
                field: "deleted at",
                value: deleted_at,
            });
        }
        if TombstoneKind::from_code(code).is_none() {
            return Err(WireError::TombstoneKind { index, value: code });
        }
    }
    Ok(())
}

/// The record checks of [`decode`]: what the engine would never hold, refused before any
/// record is merged.
fn check_records(triplets: &[u8], clients: &[u8]) -> Result<(), WireError> {
    let time = |kind, index, field, value: u32| {
        if value > MAX_SECS {
            Err(WireError::Time {
                kind,
                index,
                field,
                value,
            })
        } else {
            Ok(())
        }
    };
    for (index, b) in triplets.chunks_exact(TRIPLET_LEN).enumerate() {
        let kind = RecordKind::Triplet;
        let r = format::decode_triplet(b);
        if r.key.is_vacant() {
            return Err(WireError::VacantKey { kind, index });
        }
        // First seen shares its field with the whitelisted flag (bit 31), so it always fits.
        time(kind, index, "last seen", r.last_seen())?;
    }
    for (index, b) in clients.chunks_exact(AWL_LEN).enumerate() {
        let kind = RecordKind::Client;
        let r = format::decode_awl(b);
        if r.key.is_vacant() {
            return Err(WireError::VacantKey { kind, index });
        }
        time(kind, index, "last seen", r.last_seen)?;
        time(kind, index, "last counted pass", r.last_counted)?;
        let reserved = u32::from_le_bytes(get(b, format::awl::RESERVED));
        if reserved != 0 {
            return Err(WireError::Reserved {
                index,
                value: reserved,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{
        Engine, EngineConfig, HashSecret, Key, ManualClock, Mode, Normalizer, Policy, Query,
    };
    use proptest::prelude::*;
    use std::net::{IpAddr, Ipv4Addr};
    use std::sync::Arc;

    /// Recomputes a batch's trailing checksum after a test changed its bytes on purpose, so
    /// that the check under test is the one that fires.
    fn seal(batch: &mut [u8]) {
        let at = batch.len() - CRC_LEN;
        let crc = crc32c::crc32c(&batch[..at]);
        batch[at..].copy_from_slice(&crc.to_le_bytes());
    }

    fn encoded(meta: &Meta, t: &[TripletRecord], c: &[AwlRecord]) -> Vec<u8> {
        let mut out = Vec::new();
        encode(meta, t, c, &mut out);
        out
    }

    fn decoded(bytes: &[u8]) -> (Meta, Vec<TripletRecord>, Vec<AwlRecord>) {
        let d = decode(bytes).expect("a valid batch");
        (d.meta, d.triplets().collect(), d.clients().collect())
    }

    const META: Meta = Meta {
        key_id: 0x5eed_0000_0000_0042,
        created_ms: 1_795_424_602_123,
    };

    /// A batch of what an engine really holds: greylisted and whitelisted triplets, counted
    /// and auto-whitelisted clients.
    fn real_batch() -> (Vec<TripletRecord>, Vec<AwlRecord>, Vec<u8>) {
        let clock = Arc::new(ManualClock::new(90_000_000));
        let policy = Policy {
            delay: 10,
            retry_window: 100,
            whitelist_ttl: 200,
            awl_clients: 2,
            awl_interval: 5,
            awl_ttl: 300,
            dry_run: false,
        };
        let e = Engine::new(
            EngineConfig {
                policy,
                normalizer: Normalizer::default(),
                secret: HashSecret(*b"wire-test-secret"),
            },
            clock.clone(),
        );
        let check = |i: u32, to: &str| {
            let client = IpAddr::V4(Ipv4Addr::new(198, 51, (i % 7) as u8, 9));
            e.check(
                &Query::new(client, "s@sender.example", &format!("{to}{i}@rcpt.example")),
                Mode::Record,
            );
        };
        for i in 0..30 {
            check(i, "r");
            check(i, "other");
        }
        clock.advance(11);
        for i in (0..30).step_by(2) {
            check(i, "r"); // passes: whitelisted, one counted pass for the client
        }
        clock.advance(6);
        for i in (0..30).step_by(3) {
            check(i, "other"); // a second counted pass: the client is auto-whitelisted
            check(i, "new"); // greylisted
        }
        let mut t = Vec::new();
        e.for_each_triplet_shard(|it| t.extend(it.copied()));
        let mut c = Vec::new();
        e.for_each_client_shard(|it| c.extend(it.copied()));
        assert!(t.iter().any(|r| r.is_whitelisted()) && t.iter().any(|r| !r.is_whitelisted()));
        assert!(c.iter().any(|r| r.count >= 2));
        let bytes = encoded(&META, &t, &c);
        (t, c, bytes)
    }

    #[test]
    fn a_real_batch_round_trips() {
        let (t, c, bytes) = real_batch();
        assert_eq!(bytes.len(), encoded_len(t.len(), c.len()));
        assert_eq!(decoded(&bytes), (META, t, c));
    }

    #[test]
    fn an_empty_batch_is_a_header_and_a_checksum() {
        let bytes = encoded(&META, &[], &[]);
        assert_eq!(bytes.len(), HEADER_LEN + CRC_LEN);
        assert_eq!(decoded(&bytes), (META, vec![], vec![]));
    }

    #[test]
    fn encode_appends_and_checksums_only_its_own_bytes() {
        let (t, c, alone) = real_batch();
        let mut out = b"earlier".to_vec();
        encode(&META, &t, &c, &mut out);
        assert_eq!(&out[..7], b"earlier");
        assert_eq!(&out[7..], alone);
    }

    fn key() -> impl Strategy<Value = Key> {
        (any::<u64>(), any::<u64>())
            .prop_filter("not vacant", |&(lo, hi)| lo != 0 || hi != 0)
            .prop_map(|(lo, hi)| Key { lo, hi })
    }

    fn triplet() -> impl Strategy<Value = TripletRecord> {
        (key(), 0..=MAX_SECS, 0..=MAX_SECS, any::<bool>())
            .prop_map(|(k, first, last, w)| TripletRecord::from_parts(k, first, last, w))
    }

    fn client() -> impl Strategy<Value = AwlRecord> {
        (key(), 0..=MAX_SECS, 0..=MAX_SECS, any::<u32>())
            .prop_map(|(k, seen, counted, n)| AwlRecord::from_parts(k, seen, counted, n))
    }

    proptest! {
        #[test]
        fn any_batch_round_trips(
            key_id in any::<u64>(),
            created_ms in any::<u64>(),
            t in prop::collection::vec(triplet(), 0..40),
            c in prop::collection::vec(client(), 0..40),
        ) {
            let meta = Meta { key_id, created_ms };
            let bytes = encoded(&meta, &t, &c);
            prop_assert_eq!(bytes.len(), encoded_len(t.len(), c.len()));
            let d = decode(&bytes).expect("valid");
            prop_assert_eq!(d.triplets().len(), t.len());
            prop_assert_eq!(d.clients().len(), c.len());
            prop_assert_eq!(decoded(&bytes), (meta, t, c));
        }
    }

    #[test]
    fn every_flipped_byte_is_refused() {
        let (_, _, good) = real_batch();
        for at in 0..good.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut bad = good.clone();
                bad[at] ^= flip;
                assert!(
                    decode(&bad).is_err(),
                    "flip {flip:#04x} at byte {at} not detected"
                );
            }
        }
    }

    #[test]
    fn every_truncation_and_padding_is_refused() {
        let (_, _, good) = real_batch();
        for len in 0..good.len() {
            assert!(
                decode(&good[..len]).is_err(),
                "truncation to {len} not detected"
            );
        }
        for extra in [1, 4, AWL_LEN] {
            let mut longer = good.clone();
            longer.resize(good.len() + extra, 0);
            assert_eq!(
                decode(&longer).unwrap_err(),
                WireError::Length {
                    expected: good.len(),
                    actual: good.len() + extra
                }
            );
        }
    }

    #[test]
    fn damage_is_named_precisely() {
        let (_, _, good) = real_batch();
        assert_eq!(decode(b"").unwrap_err(), WireError::Short { len: 0 });
        assert_eq!(decode(b"GH").unwrap_err(), WireError::Short { len: 2 });
        assert_eq!(decode(b"GX").unwrap_err(), WireError::Magic);
        assert_eq!(
            decode(&good[..HEADER_LEN]).unwrap_err(),
            WireError::Short { len: HEADER_LEN }
        );
        let mut magic = good.clone();
        magic[3] = b'S';
        assert_eq!(decode(&magic).unwrap_err(), WireError::Magic);
        assert!(matches!(
            decode(&good[..good.len() - 1]),
            Err(WireError::Length { .. })
        ));
        let mut body = good.clone();
        body[HEADER_LEN + 3] ^= 4;
        assert!(matches!(decode(&body), Err(WireError::Checksum { .. })));
        let mut header_len = good.clone();
        header_len[header::LENGTH.at] = 40;
        seal(&mut header_len);
        assert_eq!(
            decode(&header_len).unwrap_err(),
            WireError::HeaderLength {
                length: 40,
                version: 1,
                expected: HEADER_LEN
            }
        );
    }

    #[test]
    fn another_version_is_named_only_when_its_checksum_holds() {
        let (_, _, good) = real_batch();
        let mut newer = good.clone();
        newer[header::VERSION.range()].copy_from_slice(&3u16.to_le_bytes());
        seal(&mut newer);
        assert_eq!(decode(&newer).unwrap_err(), WireError::Version(3));
        // Another version may lay out everything after the version differently: a longer
        // header, other counts. Only the magic, the version and the trailing checksum count.
        let mut longer = newer.clone();
        longer.splice(HEADER_LEN..HEADER_LEN, [0xab; 17]);
        seal(&mut longer);
        assert_eq!(decode(&longer).unwrap_err(), WireError::Version(3));
        assert!(decode(&longer)
            .unwrap_err()
            .to_string()
            .contains("version 3"));
        // A version field damaged in place is damage, not a newer node.
        let mut damaged = good.clone();
        damaged[header::VERSION.at] = 3;
        assert!(matches!(decode(&damaged), Err(WireError::Checksum { .. })));
    }

    #[test]
    fn counts_are_bounded_by_max_records() {
        let k = |i: usize| Key::from_u128(i as u128 + 1);
        let t: Vec<TripletRecord> = (0..MAX_RECORDS - 10)
            .map(|i| TripletRecord::from_parts(k(i), 5, 6, i % 2 == 0))
            .collect();
        let c: Vec<AwlRecord> = (0..10)
            .map(|i| AwlRecord::from_parts(k(i), 7, 8, 9))
            .collect();
        let full = encoded(&META, &t, &c);
        assert_eq!(decode(&full).unwrap().triplets().len(), MAX_RECORDS - 10);
        // One record more, with a consistent length and checksum: refused by its count.
        let mut over = full.clone();
        over.truncate(over.len() - CRC_LEN);
        over[header::CLIENTS.range()].copy_from_slice(&11u32.to_le_bytes());
        format::encode_awl(&c[0], &mut over);
        over.extend_from_slice(&[0; CRC_LEN]);
        seal(&mut over);
        assert_eq!(
            decode(&over).unwrap_err(),
            WireError::TooManyRecords {
                triplets: (MAX_RECORDS - 10) as u32,
                clients: 11,
                tombstones: 0
            }
        );
        // Counts whose sum overflows 32 bits are refused the same way.
        let mut huge = encoded(&META, &[], &[]);
        huge[header::TRIPLETS.range()].fill(0xff);
        huge[header::CLIENTS.range()].fill(0xff);
        seal(&mut huge);
        assert!(matches!(
            decode(&huge),
            Err(WireError::TooManyRecords { .. })
        ));
    }

    #[cfg(debug_assertions)]
    #[test]
    #[should_panic(expected = "exceed MAX_RECORDS")]
    fn encoding_too_many_records_panics_in_debug_builds() {
        let t = vec![TripletRecord::from_parts(Key { lo: 1, hi: 1 }, 1, 1, false); MAX_RECORDS + 1];
        encoded(&META, &t, &[]);
    }

    #[test]
    fn records_the_engine_would_never_hold_are_refused() {
        let (t, c, good) = real_batch();
        let t_at = |i: usize| HEADER_LEN + i * TRIPLET_LEN;
        let c_at = |i: usize| HEADER_LEN + t.len() * TRIPLET_LEN + i * AWL_LEN;
        let refused = |change: &dyn Fn(&mut [u8])| {
            let mut bad = good.clone();
            change(&mut bad);
            seal(&mut bad);
            decode(&bad).unwrap_err()
        };
        let tk = format::triplet::KEY_LO.at..format::triplet::KEY_HI.end();
        assert_eq!(
            refused(&|b| b[t_at(3) + tk.start..t_at(3) + tk.end].fill(0)),
            WireError::VacantKey {
                kind: RecordKind::Triplet,
                index: 3
            }
        );
        let ck = format::awl::KEY_LO.at..format::awl::KEY_HI.end();
        assert_eq!(
            refused(&|b| b[c_at(1) + ck.start..c_at(1) + ck.end].fill(0)),
            WireError::VacantKey {
                kind: RecordKind::Client,
                index: 1
            }
        );
        // Bit 31 of a time: the top bit of the field's last byte.
        let top = |f: Field| f.end() - 1;
        let last = t[2].last_seen();
        assert_eq!(
            refused(&|b| b[t_at(2) + top(format::triplet::LAST_SEEN)] |= 0x80),
            WireError::Time {
                kind: RecordKind::Triplet,
                index: 2,
                field: "last seen",
                value: last | 1 << 31
            }
        );
        assert!(matches!(
            refused(&|b| b[c_at(0) + top(format::awl::LAST_SEEN)] |= 0x80),
            WireError::Time {
                kind: RecordKind::Client,
                index: 0,
                field: "last seen",
                ..
            }
        ));
        assert!(matches!(
            refused(&|b| b[c_at(0) + top(format::awl::LAST_COUNTED)] |= 0x80),
            WireError::Time {
                kind: RecordKind::Client,
                index: 0,
                field: "last counted pass",
                ..
            }
        ));
        assert_eq!(
            refused(&|b| b[c_at(1) + format::awl::RESERVED.at] = 7),
            WireError::Reserved { index: 1, value: 7 }
        );
        // …while bit 31 of first seen is the whitelisted flag, and both values are fine.
        let flag = t_at(0) + top(format::triplet::FIRST_SEEN);
        let mut flipped = good.clone();
        flipped[flag] ^= 0x80;
        seal(&mut flipped);
        let (_, t2, c2) = decoded(&flipped);
        assert_eq!(t2[0].is_whitelisted(), !t[0].is_whitelisted());
        assert_eq!(
            (t2[0].first_seen(), &t2[1..], c2),
            (t[0].first_seen(), &t[1..], c)
        );
        assert_eq!(Key::VACANT, Key { lo: 0, hi: 0 });
    }

    #[test]
    fn errors_read_as_one_log_line() {
        let e = WireError::Time {
            kind: RecordKind::Client,
            index: 4,
            field: "last counted pass",
            value: 1 << 31,
        };
        assert_eq!(
            e.to_string(),
            "AWL record 4: last counted pass 2147483648 is past the engine's last second 2147483647"
        );
        assert_eq!(
            WireError::Version(3).to_string(),
            "format version 3, this greyhound reads versions 1 and 2 (a node of another release is publishing)"
        );
        assert_eq!(
            WireError::Short { len: 3 }.to_string(),
            "truncated: 3 bytes, shorter than a 32-byte header and its 4-byte checksum"
        );
    }

    fn tombstones() -> Vec<Tombstone> {
        vec![
            Tombstone {
                key: Key { lo: 5, hi: 6 },
                deleted_at: 90_000_123,
                kind: TombstoneKind::Triplet,
            },
            Tombstone {
                key: Key { lo: 7, hi: 0 },
                deleted_at: MAX_SECS,
                kind: TombstoneKind::Client,
            },
        ]
    }

    fn encoded_v2(t: &[TripletRecord], c: &[AwlRecord], d: &[Tombstone]) -> Vec<u8> {
        let mut out = b"before".to_vec();
        encode_with(&META, t, c, d, &mut out);
        out.split_off(6)
    }

    #[test]
    fn tombstones_travel_in_version_2_and_only_then() {
        let (t, c, v1) = real_batch();
        // Without tombstones, `encode_with` is `encode`: the previous release reads it.
        assert_eq!(encoded_v2(&t, &c, &[]), v1);
        let d = tombstones();
        let v2 = encoded_v2(&t, &c, &d);
        assert_eq!(v2.len(), encoded_len_v2(t.len(), c.len(), d.len()));
        assert_eq!(
            &v2[header::VERSION.range()],
            &VERSION_TOMBSTONES.to_le_bytes()
        );
        let got = decode(&v2).unwrap();
        assert_eq!(got.meta, META);
        assert_eq!(got.triplets().collect::<Vec<_>>(), t);
        assert_eq!(got.clients().collect::<Vec<_>>(), c);
        assert_eq!(got.tombstones().collect::<Vec<_>>(), d);
        assert_eq!(decode(&v1).unwrap().tombstones().len(), 0);
        let alone = encoded_v2(&[], &[], &d);
        assert_eq!(decode(&alone).unwrap().tombstones().collect::<Vec<_>>(), d);
    }

    #[test]
    fn every_flip_and_truncation_of_a_version_2_batch_is_refused() {
        let (t, c, _) = real_batch();
        let good = encoded_v2(&t[..3], &c[..2], &tombstones());
        for at in 0..good.len() {
            let mut bad = good.clone();
            bad[at] ^= 0x41;
            assert!(decode(&bad).is_err(), "flip at byte {at} not detected");
        }
        for len in 0..good.len() {
            assert!(decode(&good[..len]).is_err(), "truncation to {len}");
        }
    }

    #[test]
    fn tombstones_the_engine_would_never_hold_are_refused() {
        let good = encoded_v2(&[], &[], &tombstones());
        let refused = |change: &dyn Fn(&mut [u8])| {
            let mut bad = good.clone();
            change(&mut bad);
            seal(&mut bad);
            decode(&bad).unwrap_err()
        };
        let at = |i: usize, f: Field| HEADER_LEN_V2 + i * TOMBSTONE_LEN + f.at;
        assert_eq!(
            refused(&|b| b[at(1, tombstone::KIND)] = 9),
            WireError::TombstoneKind { index: 1, value: 9 }
        );
        assert_eq!(
            refused(&|b| b[at(0, tombstone::KEY_LO)..at(0, tombstone::KEY_HI) + 8].fill(0)),
            WireError::VacantKey {
                kind: RecordKind::Tombstone,
                index: 0
            }
        );
        assert!(matches!(
            refused(&|b| b[at(0, tombstone::DELETED_AT) + 3] |= 0x80),
            WireError::Time {
                kind: RecordKind::Tombstone,
                ..
            }
        ));
        assert_eq!(
            refused(&|b| b[header::RESERVED.at] = 1),
            WireError::HeaderReserved(1)
        );
        assert_eq!(
            refused(&|b| b[header::LENGTH.at] = 32),
            WireError::HeaderLength {
                length: 32,
                version: 2,
                expected: HEADER_LEN_V2
            }
        );
    }

    // Checked against the published check value in `snapshot::format`'s tests.
    use crate::snapshot::format::crc32c_reference;

    /// A batch of one triplet and one client, written out by hand from the document's tables
    /// (little-endian); every value byte equals its own offset in the batch, so a field
    /// written at the wrong offset or with the wrong width cannot go unnoticed.
    #[rustfmt::skip]
    const GOLDEN: [u8; encoded_len(1, 1)] = [
        b'G', b'H', b'E', b'V',                         //  0 magic
        0x01, 0x00,                                     //  4 version 1
        0x20, 0x00,                                     //  6 header length 32
        0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f, //  8 key id
        0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, // 16 created ms
        0x01, 0x00, 0x00, 0x00,                         // 24 triplets 1
        0x01, 0x00, 0x00, 0x00,                         // 28 clients 1
        // triplet record 0
        0x20, 0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x27, // 32 key, low 64 bits
        0x28, 0x29, 0x2a, 0x2b, 0x2c, 0x2d, 0x2e, 0x2f, // 40 key, high 64 bits
        0x30, 0x31, 0x32, 0xb3,                         // 48 first seen | whitelisted (bit 31)
        0x34, 0x35, 0x36, 0x37,                         // 52 last seen
        // AWL record 0
        0x38, 0x39, 0x3a, 0x3b, 0x3c, 0x3d, 0x3e, 0x3f, // 56 key, low 64 bits
        0x40, 0x41, 0x42, 0x43, 0x44, 0x45, 0x46, 0x47, // 64 key, high 64 bits
        0x48, 0x49, 0x4a, 0x4b,                         // 72 last seen
        0x4c, 0x4d, 0x4e, 0x4f,                         // 76 last counted pass
        0x50, 0x51, 0x52, 0x53,                         // 80 passes counted
        0x00, 0x00, 0x00, 0x00,                         // 84 reserved
        CRC[0], CRC[1], CRC[2], CRC[3],                 // 88 CRC-32C of bytes 0..88
    ];
    /// The one value not worked out by hand; checked against [`crc32c_reference`] below.
    const CRC: [u8; 4] = [0xdb, 0xf8, 0x96, 0xab];

    #[test]
    fn a_small_batch_encodes_to_the_bytes_written_by_hand() {
        let meta = Meta {
            key_id: 0x0f0e_0d0c_0b0a_0908,
            created_ms: 0x1716_1514_1312_1110,
        };
        let t = TripletRecord::from_parts(
            Key {
                lo: 0x2726_2524_2322_2120,
                hi: 0x2f2e_2d2c_2b2a_2928,
            },
            0x3332_3130,
            0x3736_3534,
            true,
        );
        let c = AwlRecord::from_parts(
            Key {
                lo: 0x3f3e_3d3c_3b3a_3938,
                hi: 0x4746_4544_4342_4140,
            },
            0x4b4a_4948,
            0x4f4e_4d4c,
            0x5352_5150,
        );
        assert_eq!(
            u32::from_le_bytes(CRC),
            crc32c_reference(&GOLDEN[..GOLDEN.len() - CRC_LEN])
        );
        assert_eq!(encoded(&meta, &[t], &[c]), GOLDEN);
        assert_eq!(decoded(&GOLDEN), (meta, vec![t], vec![c]));
    }

    /// Every field constant, by the name the document's tables give it.
    const FIELDS: [(&str, Field); 23] = [
        ("header::MAGIC", header::MAGIC),
        ("header::VERSION", header::VERSION),
        ("header::LENGTH", header::LENGTH),
        ("header::KEY_ID", header::KEY_ID),
        ("header::CREATED_MS", header::CREATED_MS),
        ("header::TRIPLETS", header::TRIPLETS),
        ("header::CLIENTS", header::CLIENTS),
        ("header::TOMBSTONES", header::TOMBSTONES),
        ("header::RESERVED", header::RESERVED),
        ("triplet::KEY_LO", format::triplet::KEY_LO),
        ("triplet::KEY_HI", format::triplet::KEY_HI),
        ("triplet::FIRST_SEEN", format::triplet::FIRST_SEEN),
        ("triplet::LAST_SEEN", format::triplet::LAST_SEEN),
        ("awl::KEY_LO", format::awl::KEY_LO),
        ("awl::KEY_HI", format::awl::KEY_HI),
        ("awl::LAST_SEEN", format::awl::LAST_SEEN),
        ("awl::LAST_COUNTED", format::awl::LAST_COUNTED),
        ("awl::PASSES", format::awl::PASSES),
        ("awl::RESERVED", format::awl::RESERVED),
        ("tombstone::KEY_LO", tombstone::KEY_LO),
        ("tombstone::KEY_HI", tombstone::KEY_HI),
        ("tombstone::DELETED_AT", tombstone::DELETED_AT),
        ("tombstone::KIND", tombstone::KIND),
    ];

    #[test]
    fn header_fields_tile_the_header() {
        let mut end = 0;
        for (name, f) in FIELDS.iter().filter(|(n, _)| n.starts_with("header::")) {
            assert_eq!(
                f.at, end,
                "{name} should start where the previous field ends"
            );
            assert!(f.size > 0, "{name} is empty");
            end = f.end();
        }
        assert_eq!(end, HEADER_LEN_V2);
        assert_eq!(header::CLIENTS.end(), HEADER_LEN);
    }

    /// The document's layout tables name each field's constant (column "name in code"); every
    /// named row's offset and size must be the constant's, and every constant must have its
    /// row, so the document and the code cannot drift apart.
    #[test]
    fn document_tables_match_the_constants() {
        let doc = include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/docs/CLUSTER_FORMAT.md"
        ));
        let rows = crate::snapshot::format::doc_table_fields(doc);
        assert_eq!(
            rows,
            FIELDS.to_vec(),
            "docs/CLUSTER_FORMAT.md tables vs the code"
        );
        for text in [
            format!("### Header ({HEADER_LEN} bytes)"),
            format!("### Triplet record ({TRIPLET_LEN} bytes)"),
            format!("### AWL record ({AWL_LEN} bytes)"),
            format!("### Checksum ({CRC_LEN} bytes)"),
            format!("### Tombstone record ({TOMBSTONE_LEN} bytes)"),
            format!("### Version 2 header ({HEADER_LEN_V2} bytes)"),
            format!("`version` = `{VERSION_TOMBSTONES}`"),
            format!("`{HEADER_LEN} + {TRIPLET_LEN} × triplets + {AWL_LEN} × clients + {CRC_LEN}`"),
            format!("ASCII `{}`", std::str::from_utf8(&MAGIC).unwrap()),
            format!("| `{VERSION}` |"),
            format!("| `{HEADER_LEN}` |"),
            format!("at most {MAX_RECORDS} records"),
        ] {
            assert!(doc.contains(&text), "the document should say {text}");
        }
    }
}
