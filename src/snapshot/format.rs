//! The byte layout of a snapshot file, as specified in `docs/SNAPSHOT_FORMAT.md`.
//!
//! All integers are little-endian. A file is a 128-byte header, the triplet records (24 bytes
//! each), then the auto-whitelist records (32 bytes each), and nothing else: its exact length
//! follows from the header's counts, so truncation is caught before any checksum is computed.
//! The header carries a CRC-32C of the body and, in its last four bytes, a CRC-32C of its own
//! first 124 bytes. Records are decoded straight from the mapped bytes with `from_le_bytes`.
//!
//! Every field's offset and size is a [`Field`] constant in [`header`], [`triplet`] or [`awl`],
//! named in the document's tables; bytes are read and written only through them.

use std::fmt;

use crate::engine::{AwlRecord, Key, Policy, TripletRecord};

/// First eight bytes of every snapshot.
pub const MAGIC: [u8; 8] = *b"GREYHSNP";
/// The format version this code writes and reads.
pub const VERSION: u32 = 1;
/// Bytes in the header.
pub const HEADER_LEN: usize = 128;
/// Bytes in one triplet record.
pub const TRIPLET_LEN: usize = 24;
/// Bytes in one auto-whitelist record.
pub const AWL_LEN: usize = 32;
/// Version of the normalisation rules (client masking aside, which has its own fields) that
/// produced the keys. Keys made under other rules would never match again, so a snapshot with
/// another value is refused; bump it whenever `engine::normalize` changes what a key means.
pub const NORMALIZATION: u16 = 1;

/// Where a field lies in the header or in a record: its byte offset and its length.
///
/// Every field of the format has one, named in the tables of `docs/SNAPSHOT_FORMAT.md` (column
/// "name in format.rs"); the encoders and decoders index bytes only through these, and a test
/// reads the document's tables and compares them with the constants, so the two cannot drift.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    /// Offset of the first byte.
    pub at: usize,
    /// Length in bytes.
    pub size: usize,
}

impl Field {
    const fn new(at: usize, size: usize) -> Self {
        Self { at, size }
    }

    /// Offset just past the field.
    pub const fn end(self) -> usize {
        self.at + self.size
    }

    /// The field's bytes as an index range.
    pub const fn range(self) -> std::ops::Range<usize> {
        self.at..self.end()
    }
}

/// The header's fields, in file order (the "Header" table of `docs/SNAPSHOT_FORMAT.md`).
pub mod header {
    use super::Field;

    /// ASCII `GREYHSNP` ([`super::MAGIC`]).
    pub const MAGIC: Field = Field::new(0, 8);
    /// Format version ([`super::VERSION`]).
    pub const VERSION: Field = Field::new(8, 4);
    /// Header length ([`super::HEADER_LEN`]).
    pub const LENGTH: Field = Field::new(12, 4);
    /// Unix seconds when the writer started walking the table.
    pub const CREATED: Field = Field::new(16, 8);
    /// The generation, also in the file name.
    pub const GENERATION: Field = Field::new(24, 8);
    /// Public hash of the secret that made the keys.
    pub const KEY_ID: Field = Field::new(32, 8);
    /// IPv4 client prefix length the keys were made with.
    pub const IPV4_PREFIX: Field = Field::new(40, 1);
    /// IPv6 client prefix length the keys were made with.
    pub const IPV6_PREFIX: Field = Field::new(41, 1);
    /// Version of the normalisation rules ([`super::NORMALIZATION`]).
    pub const NORMALIZATION: Field = Field::new(42, 2);
    /// Bytes in one triplet record ([`super::TRIPLET_LEN`]).
    pub const TRIPLET_SIZE: Field = Field::new(44, 4);
    /// Bytes in one auto-whitelist record ([`super::AWL_LEN`]).
    pub const AWL_SIZE: Field = Field::new(48, 4);
    /// Zero.
    pub const RESERVED_1: Field = Field::new(52, 4);
    /// Number of triplet records.
    pub const TRIPLETS: Field = Field::new(56, 8);
    /// Number of auto-whitelist records.
    pub const CLIENTS: Field = Field::new(64, 8);
    /// The writer's `delay`, seconds.
    pub const DELAY: Field = Field::new(72, 4);
    /// The writer's `retry-window`, seconds.
    pub const RETRY_WINDOW: Field = Field::new(76, 4);
    /// The writer's `whitelist-ttl`, seconds.
    pub const WHITELIST_TTL: Field = Field::new(80, 4);
    /// The writer's `awl-clients`.
    pub const AWL_CLIENTS: Field = Field::new(84, 4);
    /// The writer's `awl-interval`, seconds.
    pub const AWL_INTERVAL: Field = Field::new(88, 4);
    /// The writer's `awl-ttl`, seconds.
    pub const AWL_TTL: Field = Field::new(92, 4);
    /// CRC-32C of every byte after the header.
    pub const BODY_CRC: Field = Field::new(96, 4);
    /// Zero.
    pub const RESERVED_2: Field = Field::new(100, 24);
    /// CRC-32C of every header byte before this field: the header's last four bytes.
    pub const HEADER_CRC: Field = Field::new(124, 4);
}

/// A triplet record's fields (the "Triplet record" table of `docs/SNAPSHOT_FORMAT.md`).
pub mod triplet {
    use super::Field;

    /// Key, low 64 bits.
    pub const KEY_LO: Field = Field::new(0, 8);
    /// Key, high 64 bits.
    pub const KEY_HI: Field = Field::new(8, 8);
    /// Bits 0–30: first seen; bit 31: whitelisted.
    pub const FIRST_SEEN: Field = Field::new(16, 4);
    /// Last seen.
    pub const LAST_SEEN: Field = Field::new(20, 4);
}

/// An auto-whitelist record's fields (the "AWL record" table of `docs/SNAPSHOT_FORMAT.md`).
pub mod awl {
    use super::Field;

    /// Key of the client network, low 64 bits.
    pub const KEY_LO: Field = Field::new(0, 8);
    /// Key, high 64 bits.
    pub const KEY_HI: Field = Field::new(8, 8);
    /// Last seen.
    pub const LAST_SEEN: Field = Field::new(16, 4);
    /// Last counted pass.
    pub const LAST_COUNTED: Field = Field::new(20, 4);
    /// Passes counted.
    pub const PASSES: Field = Field::new(24, 4);
    /// Zero.
    pub const RESERVED: Field = Field::new(28, 4);
}

// Each layout ends exactly at its stated length (a test checks that the fields also tile it
// without gaps or overlaps).
const _: () = assert!(header::HEADER_CRC.end() == HEADER_LEN);
const _: () = assert!(triplet::LAST_SEEN.end() == TRIPLET_LEN);
const _: () = assert!(awl::RESERVED.end() == AWL_LEN);

/// The decoded header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Format version ([`VERSION`]).
    pub version: u32,
    /// When the writer started walking the table, Unix seconds. Every record changed before
    /// this second is in the file.
    pub created_unix: u64,
    /// Sequence number, also in the file name; grows by one per snapshot.
    pub generation: u64,
    /// [`crate::engine::HashSecret::id`] of the secret that made the keys.
    pub key_id: u64,
    /// IPv4 client prefix length the keys were made with.
    pub ipv4_prefix: u8,
    /// IPv6 client prefix length the keys were made with.
    pub ipv6_prefix: u8,
    /// [`NORMALIZATION`] of the writer.
    pub normalization: u16,
    /// Number of triplet records.
    pub triplets: u64,
    /// Number of auto-whitelist records.
    pub clients: u64,
    /// The writer's greylisting settings (informational: `snapshot inspect` uses them to
    /// count records by state; the loader applies the settings in force).
    pub policy: Policy,
    /// CRC-32C of the body (everything after the header).
    pub body_crc: u32,
}

/// Why a file is not a usable snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FormatError {
    /// Shorter than a header.
    ShortHeader {
        /// Bytes in the file.
        len: usize,
    },
    /// Does not start with [`MAGIC`].
    Magic,
    /// Another format version.
    Version(u32),
    /// The header's own checksum does not match.
    HeaderChecksum {
        /// Stored in the file.
        stored: u32,
        /// Computed over the bytes read.
        computed: u32,
    },
    /// Record sizes other than this version's.
    RecordSize {
        /// Stored triplet record size.
        triplet: u32,
        /// Stored auto-whitelist record size.
        awl: u32,
    },
    /// The file is not as long as the header's counts say.
    Length {
        /// Bytes the header implies.
        expected: u64,
        /// Bytes in the file.
        actual: u64,
    },
    /// The body's checksum does not match.
    BodyChecksum {
        /// Stored in the header.
        stored: u32,
        /// Computed over the body.
        computed: u32,
    },
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ShortHeader { len } => write!(
                f,
                "truncated: {len} bytes, shorter than the {HEADER_LEN}-byte header"
            ),
            Self::Magic => write!(f, "not a greyhound snapshot (bad magic)"),
            Self::Version(v) => write!(
                f,
                "format version {v}, this greyhound reads version {VERSION}"
            ),
            Self::HeaderChecksum { stored, computed } => write!(
                f,
                "header checksum mismatch (stored {stored:08x}, computed {computed:08x})"
            ),
            Self::RecordSize { triplet, awl } => write!(
                f,
                "record sizes {triplet}/{awl} bytes, expected {TRIPLET_LEN}/{AWL_LEN}"
            ),
            Self::Length { expected, actual } => write!(
                f,
                "truncated or padded: {actual} bytes, the header says {expected}"
            ),
            Self::BodyChecksum { stored, computed } => write!(
                f,
                "body checksum mismatch (stored {stored:08x}, computed {computed:08x})"
            ),
        }
    }
}

impl std::error::Error for FormatError {}

/// The bytes of field `f` of `b`; `N` is the field's size (checked in debug builds, and by the
/// golden-bytes tests in every build).
#[inline]
pub(crate) fn get<const N: usize>(b: &[u8], f: Field) -> [u8; N] {
    debug_assert_eq!(f.size, N, "field at {} is {} bytes", f.at, f.size);
    b[f.at..f.at + N].try_into().expect("N bytes")
}

/// Writes `v` into field `f` of `b`.
#[inline]
pub(crate) fn put<const N: usize>(b: &mut [u8], f: Field, v: [u8; N]) {
    debug_assert_eq!(f.size, N, "field at {} is {} bytes", f.at, f.size);
    b[f.at..f.at + N].copy_from_slice(&v);
}

impl Header {
    /// The file length this header implies.
    pub fn file_len(&self) -> u64 {
        HEADER_LEN as u64
            + self.triplets.saturating_mul(TRIPLET_LEN as u64)
            + self.clients.saturating_mul(AWL_LEN as u64)
    }

    /// The 128 header bytes, own checksum included.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        use header as f;
        let mut h = [0u8; HEADER_LEN];
        let p = &self.policy;
        put(&mut h, f::MAGIC, MAGIC);
        put(&mut h, f::VERSION, self.version.to_le_bytes());
        put(&mut h, f::LENGTH, (HEADER_LEN as u32).to_le_bytes());
        put(&mut h, f::CREATED, self.created_unix.to_le_bytes());
        put(&mut h, f::GENERATION, self.generation.to_le_bytes());
        put(&mut h, f::KEY_ID, self.key_id.to_le_bytes());
        put(&mut h, f::IPV4_PREFIX, [self.ipv4_prefix]);
        put(&mut h, f::IPV6_PREFIX, [self.ipv6_prefix]);
        put(&mut h, f::NORMALIZATION, self.normalization.to_le_bytes());
        put(&mut h, f::TRIPLET_SIZE, (TRIPLET_LEN as u32).to_le_bytes());
        put(&mut h, f::AWL_SIZE, (AWL_LEN as u32).to_le_bytes());
        // RESERVED_1 stays zero.
        put(&mut h, f::TRIPLETS, self.triplets.to_le_bytes());
        put(&mut h, f::CLIENTS, self.clients.to_le_bytes());
        put(&mut h, f::DELAY, p.delay.to_le_bytes());
        put(&mut h, f::RETRY_WINDOW, p.retry_window.to_le_bytes());
        put(&mut h, f::WHITELIST_TTL, p.whitelist_ttl.to_le_bytes());
        put(&mut h, f::AWL_CLIENTS, p.awl_clients.to_le_bytes());
        put(&mut h, f::AWL_INTERVAL, p.awl_interval.to_le_bytes());
        put(&mut h, f::AWL_TTL, p.awl_ttl.to_le_bytes());
        put(&mut h, f::BODY_CRC, self.body_crc.to_le_bytes());
        // RESERVED_2 stays zero.
        let crc = crc32c::crc32c(&h[..f::HEADER_CRC.at]);
        put(&mut h, f::HEADER_CRC, crc.to_le_bytes());
        h
    }

    /// Decodes and checks a header: magic, version, own checksum, record sizes. The body is
    /// not looked at (see [`verify`]).
    pub fn decode(file: &[u8]) -> Result<Self, FormatError> {
        use header as f;
        if file.len() < HEADER_LEN {
            if file.len() >= f::MAGIC.end() && file[f::MAGIC.range()] != MAGIC {
                return Err(FormatError::Magic);
            }
            return Err(FormatError::ShortHeader { len: file.len() });
        }
        let h = &file[..HEADER_LEN];
        if h[f::MAGIC.range()] != MAGIC {
            return Err(FormatError::Magic);
        }
        let u32_at = |field| u32::from_le_bytes(get(h, field));
        let u64_at = |field| u64::from_le_bytes(get(h, field));
        let stored = u32_at(f::HEADER_CRC);
        let computed = crc32c::crc32c(&h[..f::HEADER_CRC.at]);
        let version = u32_at(f::VERSION);
        // A newer version may lay its header out differently: name the version rather than
        // report a checksum mismatch for a file that is merely not ours to read.
        if version != VERSION && stored != computed {
            return Err(FormatError::Version(version));
        }
        if stored != computed {
            return Err(FormatError::HeaderChecksum { stored, computed });
        }
        if version != VERSION || u32_at(f::LENGTH) as usize != HEADER_LEN {
            return Err(FormatError::Version(version));
        }
        let (triplet, awl) = (u32_at(f::TRIPLET_SIZE), u32_at(f::AWL_SIZE));
        if triplet as usize != TRIPLET_LEN || awl as usize != AWL_LEN {
            return Err(FormatError::RecordSize { triplet, awl });
        }
        Ok(Self {
            version,
            created_unix: u64_at(f::CREATED),
            generation: u64_at(f::GENERATION),
            key_id: u64_at(f::KEY_ID),
            ipv4_prefix: u8::from_le_bytes(get(h, f::IPV4_PREFIX)),
            ipv6_prefix: u8::from_le_bytes(get(h, f::IPV6_PREFIX)),
            normalization: u16::from_le_bytes(get(h, f::NORMALIZATION)),
            triplets: u64_at(f::TRIPLETS),
            clients: u64_at(f::CLIENTS),
            policy: Policy {
                delay: u32_at(f::DELAY),
                retry_window: u32_at(f::RETRY_WINDOW),
                whitelist_ttl: u32_at(f::WHITELIST_TTL),
                awl_clients: u32_at(f::AWL_CLIENTS),
                awl_interval: u32_at(f::AWL_INTERVAL),
                awl_ttl: u32_at(f::AWL_TTL),
                dry_run: false,
            },
            body_crc: u32_at(f::BODY_CRC),
        })
    }
}

/// A verified snapshot: its header and its records, borrowed from the file's bytes.
#[derive(Debug, Clone)]
pub struct View<'a> {
    /// The header.
    pub header: Header,
    triplets: &'a [u8],
    clients: &'a [u8],
}

/// Checks a whole file: header, exact length, body checksum. Only then may records be read.
pub fn verify(file: &[u8]) -> Result<View<'_>, FormatError> {
    let header = Header::decode(file)?;
    let expected = header.file_len();
    if expected != file.len() as u64 {
        return Err(FormatError::Length {
            expected,
            actual: file.len() as u64,
        });
    }
    let body = &file[HEADER_LEN..];
    let computed = crc32c::crc32c(body);
    if computed != header.body_crc {
        return Err(FormatError::BodyChecksum {
            stored: header.body_crc,
            computed,
        });
    }
    let split = header.triplets as usize * TRIPLET_LEN;
    let (triplets, clients) = body.split_at(split);
    Ok(View {
        header,
        triplets,
        clients,
    })
}

impl<'a> View<'a> {
    /// The triplet records, decoded as they are iterated.
    pub fn triplets(&self) -> impl ExactSizeIterator<Item = TripletRecord> + Clone + 'a {
        self.triplets.chunks_exact(TRIPLET_LEN).map(decode_triplet)
    }

    /// The triplet records in up to `parts` contiguous runs of about equal length, for
    /// loading on several threads.
    pub fn triplet_parts(&self, parts: usize) -> Vec<&'a [u8]> {
        let n = self.triplets.len() / TRIPLET_LEN;
        let per = n.div_ceil(parts.max(1)).max(1);
        self.triplets.chunks(per * TRIPLET_LEN).collect()
    }

    /// The auto-whitelist records.
    pub fn clients(&self) -> impl ExactSizeIterator<Item = AwlRecord> + Clone + 'a {
        self.clients.chunks_exact(AWL_LEN).map(decode_awl)
    }
}

/// Decodes the triplet records of a run returned by [`View::triplet_parts`].
pub fn decode_triplets(run: &[u8]) -> impl ExactSizeIterator<Item = TripletRecord> + '_ {
    run.chunks_exact(TRIPLET_LEN).map(decode_triplet)
}

/// Bit 31 of a triplet record's [`triplet::FIRST_SEEN`] field: the triplet is whitelisted.
const WHITELISTED: u32 = 1 << 31;

/// Appends one triplet record.
pub fn encode_triplet(r: &TripletRecord, out: &mut Vec<u8>) {
    use triplet as f;
    let mut b = [0u8; TRIPLET_LEN];
    let flag = if r.is_whitelisted() { WHITELISTED } else { 0 };
    put(&mut b, f::KEY_LO, r.key.lo.to_le_bytes());
    put(&mut b, f::KEY_HI, r.key.hi.to_le_bytes());
    put(&mut b, f::FIRST_SEEN, (r.first_seen() | flag).to_le_bytes());
    put(&mut b, f::LAST_SEEN, r.last_seen().to_le_bytes());
    out.extend_from_slice(&b);
}

/// Decodes one triplet record from its [`TRIPLET_LEN`] bytes (panics if `b` is shorter).
/// Nothing is checked: callers verify the bytes first ([`verify`], `cluster::wire::decode`).
pub fn decode_triplet(b: &[u8]) -> TripletRecord {
    use triplet as f;
    let first = u32::from_le_bytes(get(b, f::FIRST_SEEN));
    TripletRecord::from_parts(
        Key {
            lo: u64::from_le_bytes(get(b, f::KEY_LO)),
            hi: u64::from_le_bytes(get(b, f::KEY_HI)),
        },
        first & !WHITELISTED,
        u32::from_le_bytes(get(b, f::LAST_SEEN)),
        first & WHITELISTED != 0,
    )
}

/// Appends one auto-whitelist record.
pub fn encode_awl(r: &AwlRecord, out: &mut Vec<u8>) {
    use awl as f;
    let mut b = [0u8; AWL_LEN];
    put(&mut b, f::KEY_LO, r.key.lo.to_le_bytes());
    put(&mut b, f::KEY_HI, r.key.hi.to_le_bytes());
    put(&mut b, f::LAST_SEEN, r.last_seen.to_le_bytes());
    put(&mut b, f::LAST_COUNTED, r.last_counted.to_le_bytes());
    put(&mut b, f::PASSES, r.count.to_le_bytes());
    // RESERVED stays zero.
    out.extend_from_slice(&b);
}

/// Decodes one auto-whitelist record from its [`AWL_LEN`] bytes (panics if `b` is shorter).
/// Nothing is checked, the reserved field included: callers verify the bytes first.
pub fn decode_awl(b: &[u8]) -> AwlRecord {
    use awl as f;
    AwlRecord::from_parts(
        Key {
            lo: u64::from_le_bytes(get(b, f::KEY_LO)),
            hi: u64::from_le_bytes(get(b, f::KEY_HI)),
        },
        u32::from_le_bytes(get(b, f::LAST_SEEN)),
        u32::from_le_bytes(get(b, f::LAST_COUNTED)),
        u32::from_le_bytes(get(b, f::PASSES)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header whose every value byte equals its own offset in the file (`created` is bytes
    /// 0x10..=0x17 at offsets 16..=23, and so on), so a field written at the wrong offset or
    /// with the wrong width cannot go unnoticed. `dry_run` is not part of the format.
    fn golden_header() -> Header {
        Header {
            version: VERSION,
            created_unix: 0x1716_1514_1312_1110,
            generation: 0x1f1e_1d1c_1b1a_1918,
            key_id: 0x2726_2524_2322_2120,
            ipv4_prefix: 0x28,
            ipv6_prefix: 0x29,
            normalization: 0x2b2a,
            triplets: 0x3f3e_3d3c_3b3a_3938,
            clients: 0x4746_4544_4342_4140,
            policy: Policy {
                delay: 0x4b4a_4948,
                retry_window: 0x4f4e_4d4c,
                whitelist_ttl: 0x5352_5150,
                awl_clients: 0x5756_5554,
                awl_interval: 0x5b5a_5958,
                awl_ttl: 0x5f5e_5d5c,
                dry_run: false,
            },
            body_crc: 0x6362_6160,
        }
    }

    /// [`golden_header`] as the header table of `docs/SNAPSHOT_FORMAT.md` lays it out, written
    /// by hand row by row (little-endian), not produced by the encoder. The one value that
    /// cannot be worked out by hand, the header CRC, is checked against a bit-by-bit CRC-32C
    /// below rather than trusted.
    #[rustfmt::skip]
    const GOLDEN_HEADER: [u8; HEADER_LEN] = [
        b'G', b'R', b'E', b'Y', b'H', b'S', b'N', b'P', //  0 magic
        0x01, 0x00, 0x00, 0x00,                         //  8 version 1
        0x80, 0x00, 0x00, 0x00,                         // 12 header length 128
        0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, // 16 created
        0x18, 0x19, 0x1a, 0x1b, 0x1c, 0x1d, 0x1e, 0x1f, // 24 generation
        0x20, 0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x27, // 32 key id
        0x28,                                           // 40 ipv4 prefix
        0x29,                                           // 41 ipv6 prefix
        0x2a, 0x2b,                                     // 42 normalisation
        0x18, 0x00, 0x00, 0x00,                         // 44 triplet record size 24
        0x20, 0x00, 0x00, 0x00,                         // 48 AWL record size 32
        0x00, 0x00, 0x00, 0x00,                         // 52 reserved
        0x38, 0x39, 0x3a, 0x3b, 0x3c, 0x3d, 0x3e, 0x3f, // 56 triplets
        0x40, 0x41, 0x42, 0x43, 0x44, 0x45, 0x46, 0x47, // 64 clients
        0x48, 0x49, 0x4a, 0x4b,                         // 72 delay
        0x4c, 0x4d, 0x4e, 0x4f,                         // 76 retry window
        0x50, 0x51, 0x52, 0x53,                         // 80 whitelist ttl
        0x54, 0x55, 0x56, 0x57,                         // 84 awl clients
        0x58, 0x59, 0x5a, 0x5b,                         // 88 awl interval
        0x5c, 0x5d, 0x5e, 0x5f,                         // 92 awl ttl
        0x60, 0x61, 0x62, 0x63,                         // 96 body CRC
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // 100 reserved (24 bytes)
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x5b, 0xf2, 0x0a, 0x68,                         // 124 header CRC of bytes 0..124
    ];

    /// CRC-32C bit by bit (reflected polynomial 0x82F63B78), independent of the `crc32c`
    /// crate, to show the header checksum is the CRC the document names.
    fn crc32c_reference(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0x82F6_3B78
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    #[test]
    fn crc_reference_matches_the_published_check_value() {
        // The check value of CRC-32C (RFC 3720 appendix B.4 and the CRC catalogue).
        assert_eq!(crc32c_reference(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn header_encodes_to_the_golden_bytes_and_back() {
        let crc = &GOLDEN_HEADER[header::HEADER_CRC.range()];
        assert_eq!(
            u32::from_le_bytes(crc.try_into().unwrap()),
            crc32c_reference(&GOLDEN_HEADER[..header::HEADER_CRC.at]),
        );
        assert_eq!(golden_header().encode(), GOLDEN_HEADER);
        assert_eq!(Header::decode(&GOLDEN_HEADER), Ok(golden_header()));
    }

    #[test]
    fn records_encode_to_the_golden_bytes_and_back() {
        let key = Key {
            lo: 0x0706_0504_0302_0100,
            hi: 0x0f0e_0d0c_0b0a_0908,
        };
        // First seen 0x13121110 with the whitelisted bit (bit 31: the top bit of byte 19).
        let t = TripletRecord::from_parts(key, 0x1312_1110, 0x1716_1514, true);
        #[rustfmt::skip]
        let golden_triplet: [u8; TRIPLET_LEN] = [
            0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, //  0 key, low 64 bits
            0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f, //  8 key, high 64 bits
            0x10, 0x11, 0x12, 0x93,                         // 16 first seen | whitelisted
            0x14, 0x15, 0x16, 0x17,                         // 20 last seen
        ];
        let mut out = Vec::new();
        encode_triplet(&t, &mut out);
        assert_eq!(out, golden_triplet);
        assert_eq!(decode_triplet(&golden_triplet), t);

        let a = AwlRecord::from_parts(key, 0x1312_1110, 0x1716_1514, 0x1b1a_1918);
        #[rustfmt::skip]
        let golden_awl: [u8; AWL_LEN] = [
            0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, //  0 key, low 64 bits
            0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f, //  8 key, high 64 bits
            0x10, 0x11, 0x12, 0x13,                         // 16 last seen
            0x14, 0x15, 0x16, 0x17,                         // 20 last counted pass
            0x18, 0x19, 0x1a, 0x1b,                         // 24 passes counted
            0x00, 0x00, 0x00, 0x00,                         // 28 reserved
        ];
        out.clear();
        encode_awl(&a, &mut out);
        assert_eq!(out, golden_awl);
        assert_eq!(decode_awl(&golden_awl), a);
    }

    /// Every field constant, by the name the document's tables give it.
    const FIELDS: [(&str, Field); 33] = [
        ("header::MAGIC", header::MAGIC),
        ("header::VERSION", header::VERSION),
        ("header::LENGTH", header::LENGTH),
        ("header::CREATED", header::CREATED),
        ("header::GENERATION", header::GENERATION),
        ("header::KEY_ID", header::KEY_ID),
        ("header::IPV4_PREFIX", header::IPV4_PREFIX),
        ("header::IPV6_PREFIX", header::IPV6_PREFIX),
        ("header::NORMALIZATION", header::NORMALIZATION),
        ("header::TRIPLET_SIZE", header::TRIPLET_SIZE),
        ("header::AWL_SIZE", header::AWL_SIZE),
        ("header::RESERVED_1", header::RESERVED_1),
        ("header::TRIPLETS", header::TRIPLETS),
        ("header::CLIENTS", header::CLIENTS),
        ("header::DELAY", header::DELAY),
        ("header::RETRY_WINDOW", header::RETRY_WINDOW),
        ("header::WHITELIST_TTL", header::WHITELIST_TTL),
        ("header::AWL_CLIENTS", header::AWL_CLIENTS),
        ("header::AWL_INTERVAL", header::AWL_INTERVAL),
        ("header::AWL_TTL", header::AWL_TTL),
        ("header::BODY_CRC", header::BODY_CRC),
        ("header::RESERVED_2", header::RESERVED_2),
        ("header::HEADER_CRC", header::HEADER_CRC),
        ("triplet::KEY_LO", triplet::KEY_LO),
        ("triplet::KEY_HI", triplet::KEY_HI),
        ("triplet::FIRST_SEEN", triplet::FIRST_SEEN),
        ("triplet::LAST_SEEN", triplet::LAST_SEEN),
        ("awl::KEY_LO", awl::KEY_LO),
        ("awl::KEY_HI", awl::KEY_HI),
        ("awl::LAST_SEEN", awl::LAST_SEEN),
        ("awl::LAST_COUNTED", awl::LAST_COUNTED),
        ("awl::PASSES", awl::PASSES),
        ("awl::RESERVED", awl::RESERVED),
    ];

    #[test]
    fn fields_tile_each_layout_without_gaps_or_overlaps() {
        for (prefix, len) in [
            ("header::", HEADER_LEN),
            ("triplet::", TRIPLET_LEN),
            ("awl::", AWL_LEN),
        ] {
            let mut end = 0;
            for (name, f) in FIELDS.iter().filter(|(n, _)| n.starts_with(prefix)) {
                assert_eq!(
                    f.at, end,
                    "{name} should start where the previous field ends"
                );
                assert!(f.size > 0, "{name} is empty");
                end = f.end();
            }
            assert_eq!(end, len, "{prefix} fields should end at {len}");
        }
    }

    /// The document's layout tables name each field's constant (column "name in `format.rs`");
    /// every named row's offset and size must be the constant's, and every constant must
    /// have its row, so the document and the code cannot drift apart.
    #[test]
    fn document_tables_match_the_constants() {
        let doc = include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/docs/SNAPSHOT_FORMAT.md"
        ));
        let mut rows = Vec::new();
        for line in doc.lines().filter(|l| l.starts_with('|')) {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            // ["", offset, size, `name`, field, ...]
            let Some(name) = cells
                .get(3)
                .and_then(|c| c.strip_prefix('`'))
                .and_then(|c| c.strip_suffix('`'))
                .filter(|c| c.contains("::"))
            else {
                continue;
            };
            let at: usize = cells[1]
                .parse()
                .unwrap_or_else(|_| panic!("offset of {name}"));
            let size: usize = cells[2]
                .parse()
                .unwrap_or_else(|_| panic!("size of {name}"));
            rows.push((name, Field { at, size }));
        }
        let expected: Vec<(&str, Field)> = FIELDS.to_vec();
        assert_eq!(
            rows, expected,
            "docs/SNAPSHOT_FORMAT.md tables vs format.rs"
        );
        // The stated lengths, too.
        for heading in [
            format!("### Header ({HEADER_LEN} bytes)"),
            format!("### Triplet record ({TRIPLET_LEN} bytes)"),
            format!("### AWL record ({AWL_LEN} bytes)"),
            format!("`{HEADER_LEN} + {TRIPLET_LEN} × triplets + {AWL_LEN} × clients`"),
        ] {
            assert!(doc.contains(&heading), "the document should say {heading}");
        }
    }
}
