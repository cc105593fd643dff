//! The byte layout of a snapshot file, as specified in `docs/SNAPSHOT_FORMAT.md`.
//!
//! All integers are little-endian. A file is a 128-byte header, the triplet records (24 bytes
//! each), the auto-whitelist records (32 bytes each), then the cluster section (version 2; its
//! length is in the header), and nothing else: its exact length follows from the header, so
//! truncation is caught before any checksum is computed. The header carries a CRC-32C of the
//! body (the cluster section included) and, in its last four bytes, a CRC-32C of its own first
//! 124 bytes. Records are decoded straight from the mapped bytes with `from_le_bytes`.
//!
//! Every fixed field's offset and size is a [`Field`] constant in [`header`], [`triplet`],
//! [`awl`], [`cluster`] or [`peer`], named in the document's tables; bytes are read and written
//! only through them.
//!
//! Version 1 files (no cluster section; header bytes 100–123 all zero) still load, with an
//! empty [`ClusterState`].

use std::fmt;

use super::ClusterState;
use crate::cluster::StreamId;
use crate::engine::{AwlRecord, Key, Policy, TripletRecord};

/// First eight bytes of every snapshot.
pub const MAGIC: [u8; 8] = *b"GREYHSNP";
/// The format version this code writes.
pub const VERSION: u32 = 2;
/// The oldest format version this code reads: version 1, the same layout without the cluster
/// section.
pub const OLDEST_VERSION: u32 = 1;
/// Bytes in the header.
pub const HEADER_LEN: usize = 128;
/// Bytes in one triplet record.
pub const TRIPLET_LEN: usize = 24;
/// Bytes in one auto-whitelist record.
pub const AWL_LEN: usize = 32;
/// Bytes at the start of the cluster section, before the peer entries.
pub const CLUSTER_HEAD_LEN: usize = 8;
/// Bytes of a peer entry before its node id (which is 1 to [`MAX_NODE_ID_LEN`] bytes).
pub const PEER_FIXED_LEN: usize = 17;
/// Most peers a cluster section may list. Far above any real cluster (the design plans for
/// 2–50 nodes), low enough that a damaged count cannot make the reader allocate much.
pub const MAX_PEERS: usize = 4096;
/// Longest node id, in bytes (`[A-Za-z0-9_.-]{1,64}`).
pub const MAX_NODE_ID_LEN: usize = 64;
/// Longest possible cluster section: [`MAX_PEERS`] entries with the longest ids (331 784
/// bytes). A header announcing more is refused before the file's length is even compared.
pub const MAX_CLUSTER_LEN: usize =
    CLUSTER_HEAD_LEN + MAX_PEERS * (PEER_FIXED_LEN + MAX_NODE_ID_LEN);
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
    /// Bytes at the start of the cluster section, before the peer entries.
    pub const CLUSTER_HEAD_LEN: usize = 8;
    /// Bytes of a peer entry before its node id (which is 1 to [`MAX_NODE_ID_LEN`] bytes).
    pub const PEER_FIXED_LEN: usize = 17;
    /// Most peers a cluster section may list. Far above any real cluster (the design plans for
    /// 2–50 nodes), low enough that a damaged count cannot make the reader allocate much.
    pub const MAX_PEERS: usize = 4096;
    /// Longest node id, in bytes (`[A-Za-z0-9_.-]{1,64}`).
    pub const MAX_NODE_ID_LEN: usize = 64;
    /// Longest possible cluster section: [`MAX_PEERS`] entries with the longest ids (331 784
    /// bytes). A header announcing more is refused before the file's length is even compared.
    pub const MAX_CLUSTER_LEN: usize =
        CLUSTER_HEAD_LEN + MAX_PEERS * (PEER_FIXED_LEN + MAX_NODE_ID_LEN);
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
    /// Bytes in the cluster section (version 2; zero, as reserved, in version 1).
    pub const CLUSTER_LEN: Field = Field::new(100, 4);
    /// Zero.
    pub const RESERVED_2: Field = Field::new(104, 20);
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

/// The fixed start of the cluster section (the "Cluster section" table of
/// `docs/SNAPSHOT_FORMAT.md`); the peer entries follow it.
pub mod cluster {
    use super::Field;

    /// [`crate::snapshot::ClusterState::published_through`], engine seconds.
    pub const PUBLISHED_THROUGH: Field = Field::new(0, 4);
    /// Number of peer entries that follow.
    pub const PEERS: Field = Field::new(4, 4);
}

/// The fixed part of a peer entry (the "Peer entry" table of `docs/SNAPSHOT_FORMAT.md`); the
/// node id's bytes follow it. Fixed fields come first so each has a constant offset.
pub mod peer {
    use super::Field;

    /// Last stream entry applied from this peer: milliseconds part.
    pub const ENTRY_MS: Field = Field::new(0, 8);
    /// Last stream entry applied from this peer: sequence part.
    pub const ENTRY_SEQ: Field = Field::new(8, 8);
    /// Bytes in the node id that follows (1 to 64).
    pub const ID_LEN: Field = Field::new(16, 1);
}

// Each layout ends exactly at its stated length (a test checks that the fields also tile it
// without gaps or overlaps).
const _: () = assert!(header::HEADER_CRC.end() == HEADER_LEN);
const _: () = assert!(triplet::LAST_SEEN.end() == TRIPLET_LEN);
const _: () = assert!(awl::RESERVED.end() == AWL_LEN);
const _: () = assert!(cluster::PEERS.end() == CLUSTER_HEAD_LEN);
const _: () = assert!(peer::ID_LEN.end() == PEER_FIXED_LEN);
const _: () = assert!(MAX_CLUSTER_LEN <= u32::MAX as usize);

/// The decoded header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Format version ([`VERSION`] or [`OLDEST_VERSION`]).
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
    /// Bytes in the cluster section, after the records (always 0 in version 1).
    pub cluster_len: u32,
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
    /// A reserved header byte is not zero (no Greyhound writes such a header).
    Reserved {
        /// Offset of the first non-zero reserved byte.
        at: usize,
    },
    /// The cluster section is malformed.
    Cluster(ClusterError),
}

/// What is wrong with a cluster section read from a file, or with a [`ClusterState`] about
/// to be written (the writer refuses what the reader would refuse).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterError {
    /// The header announces a section longer than [`MAX_CLUSTER_LEN`].
    TooLong {
        /// Announced length.
        len: u64,
    },
    /// The section is shorter than its fixed start.
    Short {
        /// Its length.
        len: usize,
    },
    /// More than [`MAX_PEERS`] peers.
    TooManyPeers {
        /// The count.
        count: u64,
    },
    /// The section ends inside a peer entry.
    Truncated {
        /// Index of that entry (from 0).
        index: usize,
    },
    /// Bytes are left after the last peer entry.
    Trailing {
        /// How many.
        extra: usize,
    },
    /// A node id that is not `[A-Za-z0-9_.-]{1,64}`.
    BadPeerId {
        /// Index of the entry (from 0).
        index: usize,
        /// The id, lossily decoded.
        id: String,
    },
    /// The same node listed twice: which position would a replay start from?
    DuplicatePeer {
        /// The node id.
        id: String,
    },
}

impl fmt::Display for ClusterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLong { len } => write!(
                f,
                "cluster section of {len} bytes, longer than the largest valid one ({MAX_CLUSTER_LEN})"
            ),
            Self::Short { len } => write!(
                f,
                "cluster section of {len} bytes, shorter than its {CLUSTER_HEAD_LEN}-byte start"
            ),
            Self::TooManyPeers { count } => write!(
                f,
                "cluster section lists {count} peers, more than the {MAX_PEERS} allowed"
            ),
            Self::Truncated { index } => {
                write!(f, "cluster section ends inside peer entry {index}")
            }
            Self::Trailing { extra } => write!(
                f,
                "cluster section has {extra} bytes after its last peer entry"
            ),
            Self::BadPeerId { index, id } => write!(
                f,
                "cluster section: peer entry {index} has an invalid node id {id:?} (not [A-Za-z0-9_.-]{{1,{MAX_NODE_ID_LEN}}})"
            ),
            Self::DuplicatePeer { id } => {
                write!(f, "cluster section lists peer {id:?} twice")
            }
        }
    }
}

impl std::error::Error for ClusterError {}

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
                "format version {v}, this greyhound reads versions {OLDEST_VERSION} to {VERSION}"
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
            Self::Reserved { at } => write!(f, "reserved header byte {at} is not zero"),
            Self::Cluster(e) => e.fmt(f),
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
        (HEADER_LEN as u64)
            .saturating_add(self.triplets.saturating_mul(TRIPLET_LEN as u64))
            .saturating_add(self.clients.saturating_mul(AWL_LEN as u64))
            .saturating_add(u64::from(self.cluster_len))
    }

    /// The 128 header bytes, own checksum included. A version 1 header must have no cluster
    /// section (its bytes there are reserved, zero).
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        use header as f;
        debug_assert!(self.version >= 2 || self.cluster_len == 0);
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
        put(&mut h, f::CLUSTER_LEN, self.cluster_len.to_le_bytes());
        // RESERVED_2 stays zero.
        let crc = crc32c::crc32c(&h[..f::HEADER_CRC.at]);
        put(&mut h, f::HEADER_CRC, crc.to_le_bytes());
        h
    }

    /// Decodes and checks a header: magic, version, own checksum, record sizes, reserved
    /// bytes. The body is not looked at (see [`verify`]).
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
        let known = (OLDEST_VERSION..=VERSION).contains(&version);
        // A newer version may lay its header out differently: name the version rather than
        // report a checksum mismatch for a file that is merely not ours to read.
        if !known && stored != computed {
            return Err(FormatError::Version(version));
        }
        if stored != computed {
            return Err(FormatError::HeaderChecksum { stored, computed });
        }
        if !known || u32_at(f::LENGTH) as usize != HEADER_LEN {
            return Err(FormatError::Version(version));
        }
        let (triplet, awl) = (u32_at(f::TRIPLET_SIZE), u32_at(f::AWL_SIZE));
        if triplet as usize != TRIPLET_LEN || awl as usize != AWL_LEN {
            return Err(FormatError::RecordSize { triplet, awl });
        }
        // Version 1 reserved all of bytes 100..124; version 2 took the first four for the
        // cluster section's length.
        let reserved: [_; 2] = if version == 1 {
            [
                f::RESERVED_1,
                Field::new(f::CLUSTER_LEN.at, f::HEADER_CRC.at - f::CLUSTER_LEN.at),
            ]
        } else {
            [f::RESERVED_1, f::RESERVED_2]
        };
        for r in reserved {
            if let Some(i) = h[r.range()].iter().position(|&b| b != 0) {
                return Err(FormatError::Reserved { at: r.at + i });
            }
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
            // Zero in version 1 (checked above).
            cluster_len: u32_at(f::CLUSTER_LEN),
        })
    }
}

/// A verified snapshot: its header, its records borrowed from the file's bytes, and its
/// decoded cluster section.
#[derive(Debug, Clone)]
pub struct View<'a> {
    /// The header.
    pub header: Header,
    /// The replication state (empty in a version 1 file).
    pub cluster: ClusterState,
    triplets: &'a [u8],
    clients: &'a [u8],
}

/// Checks a whole file: header, exact length, body checksum, cluster section. Only then may
/// records be read.
pub fn verify(file: &[u8]) -> Result<View<'_>, FormatError> {
    let header = Header::decode(file)?;
    // Before the length check, so an absurd length is named for what it is.
    if header.cluster_len as usize > MAX_CLUSTER_LEN {
        return Err(FormatError::Cluster(ClusterError::TooLong {
            len: header.cluster_len.into(),
        }));
    }
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
    let (triplets, rest) = body.split_at(header.triplets as usize * TRIPLET_LEN);
    let (clients, section) = rest.split_at(header.clients as usize * AWL_LEN);
    let cluster = if header.version == 1 {
        ClusterState::default()
    } else {
        decode_cluster(section).map_err(FormatError::Cluster)?
    };
    Ok(View {
        header,
        cluster,
        triplets,
        clients,
    })
}

/// Whether `id` is a valid node id: `[A-Za-z0-9_.-]{1,64}`.
pub fn valid_node_id(id: &[u8]) -> bool {
    (1..=MAX_NODE_ID_LEN).contains(&id.len())
        && id
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

impl ClusterState {
    /// Checks what the reader checks: at most [`MAX_PEERS`] peers, valid node ids, none twice.
    pub fn check(&self) -> Result<(), ClusterError> {
        if self.peers.len() > MAX_PEERS {
            return Err(ClusterError::TooManyPeers {
                count: self.peers.len() as u64,
            });
        }
        let mut seen = std::collections::HashSet::with_capacity(self.peers.len());
        for (index, (id, _)) in self.peers.iter().enumerate() {
            if !valid_node_id(id.as_bytes()) {
                return Err(ClusterError::BadPeerId {
                    index,
                    id: id.clone(),
                });
            }
            if !seen.insert(id.as_str()) {
                return Err(ClusterError::DuplicatePeer { id: id.clone() });
            }
        }
        Ok(())
    }
}

/// Appends the cluster section of `state`, after checking it ([`ClusterState::check`]).
pub fn encode_cluster(state: &ClusterState, out: &mut Vec<u8>) -> Result<(), ClusterError> {
    state.check()?;
    let mut head = [0u8; CLUSTER_HEAD_LEN];
    put(
        &mut head,
        cluster::PUBLISHED_THROUGH,
        state.published_through.to_le_bytes(),
    );
    put(
        &mut head,
        cluster::PEERS,
        (state.peers.len() as u32).to_le_bytes(),
    );
    out.extend_from_slice(&head);
    for (id, entry) in &state.peers {
        let mut b = [0u8; PEER_FIXED_LEN];
        put(&mut b, peer::ENTRY_MS, entry.ms.to_le_bytes());
        put(&mut b, peer::ENTRY_SEQ, entry.seq.to_le_bytes());
        // At most MAX_NODE_ID_LEN bytes (checked above).
        put(&mut b, peer::ID_LEN, [id.len() as u8]);
        out.extend_from_slice(&b);
        out.extend_from_slice(id.as_bytes());
    }
    Ok(())
}

/// The bytes [`encode_cluster`] appends for `state`.
pub fn cluster_len(state: &ClusterState) -> usize {
    CLUSTER_HEAD_LEN
        + state
            .peers
            .iter()
            .map(|(id, _)| PEER_FIXED_LEN + id.len())
            .sum::<usize>()
}

/// Decodes a cluster section, which must be consumed exactly, with every limit checked.
pub fn decode_cluster(section: &[u8]) -> Result<ClusterState, ClusterError> {
    if section.len() < CLUSTER_HEAD_LEN {
        return Err(ClusterError::Short { len: section.len() });
    }
    let count = u32::from_le_bytes(get(section, cluster::PEERS));
    if count as usize > MAX_PEERS {
        return Err(ClusterError::TooManyPeers {
            count: count.into(),
        });
    }
    let mut state = ClusterState {
        published_through: u32::from_le_bytes(get(section, cluster::PUBLISHED_THROUGH)),
        peers: Vec::with_capacity(count as usize),
    };
    let mut rest = &section[CLUSTER_HEAD_LEN..];
    for index in 0..count as usize {
        if rest.len() < PEER_FIXED_LEN {
            return Err(ClusterError::Truncated { index });
        }
        let id_len = usize::from(u8::from_le_bytes(get(rest, peer::ID_LEN)));
        let Some(id) = rest.get(PEER_FIXED_LEN..PEER_FIXED_LEN + id_len) else {
            return Err(ClusterError::Truncated { index });
        };
        if !valid_node_id(id) {
            return Err(ClusterError::BadPeerId {
                index,
                id: String::from_utf8_lossy(id).into_owned(),
            });
        }
        let entry = StreamId::new(
            u64::from_le_bytes(get(rest, peer::ENTRY_MS)),
            u64::from_le_bytes(get(rest, peer::ENTRY_SEQ)),
        );
        // Valid node ids are ASCII.
        let id = String::from_utf8_lossy(id).into_owned();
        state.peers.push((id, entry));
        rest = &rest[PEER_FIXED_LEN + id_len..];
    }
    if !rest.is_empty() {
        return Err(ClusterError::Trailing { extra: rest.len() });
    }
    state.check()?;
    Ok(state)
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

/// CRC-32C bit by bit (reflected polynomial 0x82F63B78), independent of the `crc32c` crate,
/// to show the checksums of this format and of the cluster's entry format are the CRC their
/// documents name.
#[cfg(test)]
pub(crate) fn crc32c_reference(bytes: &[u8]) -> u32 {
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

/// The rows of a format document's layout tables that name a field constant (`| offset | size
/// | `module::NAME` | ...`), as (name, field): what the doc-table tests of this format and of
/// the cluster's entry format (`crate::cluster::wire`) compare with the constants.
#[cfg(test)]
pub(crate) fn doc_table_fields(doc: &str) -> Vec<(&str, Field)> {
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
    rows
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
            cluster_len: 0x6766_6564,
        }
    }

    /// [`golden_header`] as the header table of `docs/SNAPSHOT_FORMAT.md` lays it out, written
    /// by hand row by row (little-endian), not produced by the encoder. The one value that
    /// cannot be worked out by hand, the header CRC, is checked against a bit-by-bit CRC-32C
    /// below rather than trusted.
    #[rustfmt::skip]
    const GOLDEN_HEADER: [u8; HEADER_LEN] = [
        b'G', b'R', b'E', b'Y', b'H', b'S', b'N', b'P', //  0 magic
        0x02, 0x00, 0x00, 0x00,                         //  8 version 2
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
        0x64, 0x65, 0x66, 0x67,                         // 100 cluster section length
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // 104 reserved (20 bytes)
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00,
        0x6c, 0x88, 0xe2, 0x7c,                         // 124 header CRC of bytes 0..124
    ];

    /// The same header as version 1 wrote it (the table of the version 1 document): no
    /// cluster section length, bytes 100..124 reserved. Kept so version 1 files still load.
    #[rustfmt::skip]
    const GOLDEN_HEADER_V1: [u8; HEADER_LEN] = [
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

    use super::crc32c_reference;

    #[test]
    fn crc_reference_matches_the_published_check_value() {
        // The check value of CRC-32C (RFC 3720 appendix B.4 and the CRC catalogue).
        assert_eq!(crc32c_reference(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn header_encodes_to_the_golden_bytes_and_back() {
        for golden in [GOLDEN_HEADER, GOLDEN_HEADER_V1] {
            let crc = &golden[header::HEADER_CRC.range()];
            assert_eq!(
                u32::from_le_bytes(crc.try_into().unwrap()),
                crc32c_reference(&golden[..header::HEADER_CRC.at]),
            );
        }
        assert_eq!(golden_header().encode(), GOLDEN_HEADER);
        assert_eq!(Header::decode(&GOLDEN_HEADER), Ok(golden_header()));
        let v1 = Header {
            version: 1,
            cluster_len: 0,
            ..golden_header()
        };
        assert_eq!(Header::decode(&GOLDEN_HEADER_V1), Ok(v1.clone()));
        assert_eq!(v1.encode(), GOLDEN_HEADER_V1);
    }

    /// Sets bytes of a header and seals it again with a correct header CRC.
    fn resealed(mut h: [u8; HEADER_LEN], at: usize, bytes: &[u8]) -> [u8; HEADER_LEN] {
        h[at..at + bytes.len()].copy_from_slice(bytes);
        let crc = crc32c::crc32c(&h[..header::HEADER_CRC.at]);
        h[header::HEADER_CRC.range()].copy_from_slice(&crc.to_le_bytes());
        h
    }

    #[test]
    fn reserved_bytes_must_be_zero_in_either_version() {
        // Version 1 reserved the bytes version 2 uses for the cluster section's length.
        for at in [52, 55, 100, 103, 104, 123] {
            let h = resealed(GOLDEN_HEADER_V1, at, &[1]);
            assert_eq!(
                Header::decode(&h),
                Err(FormatError::Reserved { at }),
                "v1 {at}"
            );
        }
        for at in [52, 55, 104, 123] {
            let h = resealed(GOLDEN_HEADER, at, &[1]);
            assert_eq!(
                Header::decode(&h),
                Err(FormatError::Reserved { at }),
                "v2 {at}"
            );
        }
        // Neither version 0 nor 3 is read; both are named.
        for v in [0u8, 3] {
            let h = resealed(GOLDEN_HEADER, header::VERSION.at, &[v]);
            assert_eq!(Header::decode(&h), Err(FormatError::Version(v.into())));
        }
        assert_eq!(
            FormatError::Version(3).to_string(),
            "format version 3, this greyhound reads versions 1 to 2"
        );
    }

    fn golden_cluster() -> ClusterState {
        ClusterState {
            published_through: 0x0302_0100,
            peers: vec![
                (
                    "b".into(),
                    StreamId::new(0x1716_1514_1312_1110, 0x1f1e_1d1c_1b1a_1918),
                ),
                ("mx-2.eu".into(), StreamId::new(0x0201, 0x03)),
            ],
        }
    }

    /// [`golden_cluster`] as the "Cluster section" and "Peer entry" tables lay it out,
    /// written by hand.
    #[rustfmt::skip]
    const GOLDEN_CLUSTER: [u8; 8 + 18 + 24] = [
        0x00, 0x01, 0x02, 0x03,                         //  0 published through
        0x02, 0x00, 0x00, 0x00,                         //  4 peers: 2
        // peer entry 0, at 8
        0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, //  0 entry, milliseconds
        0x18, 0x19, 0x1a, 0x1b, 0x1c, 0x1d, 0x1e, 0x1f, //  8 entry, sequence
        0x01,                                           // 16 id length 1
        b'b',                                           // 17 id
        // peer entry 1, at 26
        0x01, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, //  0 entry, milliseconds
        0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, //  8 entry, sequence
        0x07,                                           // 16 id length 7
        b'm', b'x', b'-', b'2', b'.', b'e', b'u',       // 17 id
    ];

    #[test]
    fn cluster_section_encodes_to_the_golden_bytes_and_back() {
        let mut out = Vec::new();
        encode_cluster(&golden_cluster(), &mut out).unwrap();
        assert_eq!(out, GOLDEN_CLUSTER);
        assert_eq!(cluster_len(&golden_cluster()), GOLDEN_CLUSTER.len());
        assert_eq!(decode_cluster(&GOLDEN_CLUSTER), Ok(golden_cluster()));
        out.clear();
        encode_cluster(&ClusterState::default(), &mut out).unwrap();
        assert_eq!(out, [0; CLUSTER_HEAD_LEN]);
        assert_eq!(decode_cluster(&out), Ok(ClusterState::default()));
    }

    #[test]
    fn malformed_cluster_sections_are_named() {
        let g = &GOLDEN_CLUSTER;
        assert_eq!(decode_cluster(&g[..7]), Err(ClusterError::Short { len: 7 }));
        // Cut anywhere inside an entry.
        for (len, index) in [(8, 0), (24, 0), (25, 0), (26, 1), (49, 1)] {
            assert_eq!(
                decode_cluster(&g[..len]),
                Err(ClusterError::Truncated { index }),
                "{len}"
            );
        }
        let mut longer = g.to_vec();
        longer.push(0);
        assert_eq!(
            decode_cluster(&longer),
            Err(ClusterError::Trailing { extra: 1 })
        );
        let mut count = g.to_vec();
        count[4..8].copy_from_slice(&(MAX_PEERS as u32 + 1).to_le_bytes());
        assert_eq!(
            decode_cluster(&count),
            Err(ClusterError::TooManyPeers {
                count: MAX_PEERS as u64 + 1
            })
        );
        let mut one = g.to_vec();
        one[4] = 1;
        assert_eq!(
            decode_cluster(&one),
            Err(ClusterError::Trailing { extra: 24 })
        );
        // A space in an id; an empty id (whose entry then swallows the next one's bytes).
        let mut space = g.to_vec();
        space[26 + 17 + 2] = b' ';
        assert_eq!(
            decode_cluster(&space),
            Err(ClusterError::BadPeerId {
                index: 1,
                id: "mx 2.eu".into()
            })
        );
        let mut empty = g.to_vec();
        empty[8 + 16] = 0;
        assert_eq!(
            decode_cluster(&empty),
            Err(ClusterError::BadPeerId {
                index: 0,
                id: String::new()
            })
        );
        let mut twice = g.to_vec();
        twice[26 + 16] = 1;
        twice[26 + 17] = b'b';
        twice.truncate(26 + 18);
        assert_eq!(
            decode_cluster(&twice),
            Err(ClusterError::DuplicatePeer { id: "b".into() })
        );
    }

    #[test]
    fn node_ids_follow_the_design_syntax() {
        for ok in ["a", "mx-1.example_2", &"x".repeat(64), "0", "..", "A-Z"] {
            assert!(valid_node_id(ok.as_bytes()), "{ok}");
        }
        for bad in ["", &"x".repeat(65), "a b", "a/b", "a:b", "é", "a\0", "mx\n"] {
            assert!(!valid_node_id(bad.as_bytes()), "{bad:?}");
        }
    }

    #[test]
    fn the_largest_valid_section_round_trips_and_one_more_peer_is_refused() {
        let mut state = ClusterState {
            published_through: 1,
            peers: (0..MAX_PEERS)
                .map(|i| (format!("{i:064}"), StreamId::new(i as u64, 1)))
                .collect(),
        };
        let mut out = Vec::new();
        encode_cluster(&state, &mut out).unwrap();
        assert_eq!(out.len(), MAX_CLUSTER_LEN);
        assert_eq!(MAX_CLUSTER_LEN, 331_784, "as docs/SNAPSHOT_FORMAT.md says");
        assert_eq!(decode_cluster(&out), Ok(state.clone()));
        state.peers.push(("one-more".into(), StreamId::ZERO));
        assert_eq!(
            encode_cluster(&state, &mut Vec::new()),
            Err(ClusterError::TooManyPeers {
                count: MAX_PEERS as u64 + 1
            })
        );
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
    const FIELDS: [(&str, Field); 39] = [
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
        ("header::CLUSTER_LEN", header::CLUSTER_LEN),
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
        ("cluster::PUBLISHED_THROUGH", cluster::PUBLISHED_THROUGH),
        ("cluster::PEERS", cluster::PEERS),
        ("peer::ENTRY_MS", peer::ENTRY_MS),
        ("peer::ENTRY_SEQ", peer::ENTRY_SEQ),
        ("peer::ID_LEN", peer::ID_LEN),
    ];

    #[test]
    fn fields_tile_each_layout_without_gaps_or_overlaps() {
        for (prefix, len) in [
            ("header::", HEADER_LEN),
            ("triplet::", TRIPLET_LEN),
            ("awl::", AWL_LEN),
            ("cluster::", CLUSTER_HEAD_LEN),
            ("peer::", PEER_FIXED_LEN),
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
        let rows = doc_table_fields(doc);
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
            format!("### Cluster section ({CLUSTER_HEAD_LEN} bytes, then the peer entries)"),
            format!("### Peer entry ({PEER_FIXED_LEN} bytes, then the node id)"),
            format!(
                "`{HEADER_LEN} + {TRIPLET_LEN} × triplets + {AWL_LEN} × clients + cluster length`"
            ),
            format!("# Snapshot file format, version {VERSION}"),
            format!("at most {MAX_PEERS} peers"),
            "`8 + 4096 × (17 + 64)` = 331 784 bytes".to_owned(),
        ] {
            assert!(doc.contains(&heading), "the document should say {heading}");
        }
    }
}
