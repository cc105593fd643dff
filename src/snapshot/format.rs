//! The byte layout of a snapshot file, as specified in `docs/SNAPSHOT_FORMAT.md`.
//!
//! All integers are little-endian. A file is a 128-byte header, the triplet records (24 bytes
//! each), then the auto-whitelist records (32 bytes each), and nothing else: its exact length
//! follows from the header's counts, so truncation is caught before any checksum is computed.
//! The header carries a CRC-32C of the body and, in its last four bytes, a CRC-32C of its own
//! first 124 bytes. Records are decoded straight from the mapped bytes with `from_le_bytes`.

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

/// Offset of the header checksum: the last four bytes of the header.
const HEADER_CRC_AT: usize = HEADER_LEN - 4;

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

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
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
        let mut h = [0u8; HEADER_LEN];
        let p = &self.policy;
        h[0..8].copy_from_slice(&MAGIC);
        h[8..12].copy_from_slice(&self.version.to_le_bytes());
        h[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        h[16..24].copy_from_slice(&self.created_unix.to_le_bytes());
        h[24..32].copy_from_slice(&self.generation.to_le_bytes());
        h[32..40].copy_from_slice(&self.key_id.to_le_bytes());
        h[40] = self.ipv4_prefix;
        h[41] = self.ipv6_prefix;
        h[42..44].copy_from_slice(&self.normalization.to_le_bytes());
        h[44..48].copy_from_slice(&(TRIPLET_LEN as u32).to_le_bytes());
        h[48..52].copy_from_slice(&(AWL_LEN as u32).to_le_bytes());
        // 52..56 reserved (zero).
        h[56..64].copy_from_slice(&self.triplets.to_le_bytes());
        h[64..72].copy_from_slice(&self.clients.to_le_bytes());
        for (i, v) in [
            p.delay,
            p.retry_window,
            p.whitelist_ttl,
            p.awl_clients,
            p.awl_interval,
            p.awl_ttl,
        ]
        .into_iter()
        .enumerate()
        {
            h[72 + 4 * i..76 + 4 * i].copy_from_slice(&v.to_le_bytes());
        }
        h[96..100].copy_from_slice(&self.body_crc.to_le_bytes());
        // 100..124 reserved (zero).
        let crc = crc32c::crc32c(&h[..HEADER_CRC_AT]);
        h[HEADER_CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// Decodes and checks a header: magic, version, own checksum, record sizes. The body is
    /// not looked at (see [`verify`]).
    pub fn decode(file: &[u8]) -> Result<Self, FormatError> {
        if file.len() < HEADER_LEN {
            if file.len() >= 8 && file[..8] != MAGIC {
                return Err(FormatError::Magic);
            }
            return Err(FormatError::ShortHeader { len: file.len() });
        }
        let h = &file[..HEADER_LEN];
        if h[..8] != MAGIC {
            return Err(FormatError::Magic);
        }
        let stored = u32_at(h, HEADER_CRC_AT);
        let computed = crc32c::crc32c(&h[..HEADER_CRC_AT]);
        let version = u32_at(h, 8);
        // A newer version may lay its header out differently: name the version rather than
        // report a checksum mismatch for a file that is merely not ours to read.
        if version != VERSION && stored != computed {
            return Err(FormatError::Version(version));
        }
        if stored != computed {
            return Err(FormatError::HeaderChecksum { stored, computed });
        }
        if version != VERSION || u32_at(h, 12) as usize != HEADER_LEN {
            return Err(FormatError::Version(version));
        }
        let (triplet, awl) = (u32_at(h, 44), u32_at(h, 48));
        if triplet as usize != TRIPLET_LEN || awl as usize != AWL_LEN {
            return Err(FormatError::RecordSize { triplet, awl });
        }
        Ok(Self {
            version,
            created_unix: u64_at(h, 16),
            generation: u64_at(h, 24),
            key_id: u64_at(h, 32),
            ipv4_prefix: h[40],
            ipv6_prefix: h[41],
            normalization: u16_at(h, 42),
            triplets: u64_at(h, 56),
            clients: u64_at(h, 64),
            policy: Policy {
                delay: u32_at(h, 72),
                retry_window: u32_at(h, 76),
                whitelist_ttl: u32_at(h, 80),
                awl_clients: u32_at(h, 84),
                awl_interval: u32_at(h, 88),
                awl_ttl: u32_at(h, 92),
                dry_run: false,
            },
            body_crc: u32_at(h, 96),
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

/// Bit 31 of a triplet record's third field: the triplet is whitelisted.
const WHITELISTED: u32 = 1 << 31;

/// Appends one triplet record.
pub fn encode_triplet(r: &TripletRecord, out: &mut Vec<u8>) {
    out.extend_from_slice(&r.key.lo.to_le_bytes());
    out.extend_from_slice(&r.key.hi.to_le_bytes());
    let flag = if r.is_whitelisted() { WHITELISTED } else { 0 };
    out.extend_from_slice(&(r.first_seen() | flag).to_le_bytes());
    out.extend_from_slice(&r.last_seen().to_le_bytes());
}

fn decode_triplet(b: &[u8]) -> TripletRecord {
    let first = u32_at(b, 16);
    TripletRecord::from_parts(
        Key {
            lo: u64_at(b, 0),
            hi: u64_at(b, 8),
        },
        first & !WHITELISTED,
        u32_at(b, 20),
        first & WHITELISTED != 0,
    )
}

/// Appends one auto-whitelist record.
pub fn encode_awl(r: &AwlRecord, out: &mut Vec<u8>) {
    out.extend_from_slice(&r.key.lo.to_le_bytes());
    out.extend_from_slice(&r.key.hi.to_le_bytes());
    out.extend_from_slice(&r.last_seen.to_le_bytes());
    out.extend_from_slice(&r.last_counted.to_le_bytes());
    out.extend_from_slice(&r.count.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
}

fn decode_awl(b: &[u8]) -> AwlRecord {
    AwlRecord::from_parts(
        Key {
            lo: u64_at(b, 0),
            hi: u64_at(b, 8),
        },
        u32_at(b, 16),
        u32_at(b, 20),
        u32_at(b, 24),
    )
}
