//! Snapshots: the table written to the data directory and read back at start, so restarts keep it.
//!
//! Writing ([`Writer::write`]) walks the engine shard by shard: each shard's live records are
//! copied under its lock (0.4 ms at 10 M records on a quiet machine, up to ~2 ms when the
//! writer is preempted meanwhile), then encoded and appended to a temporary file with no lock
//! held. The header goes in last, at offset 0,
//! then: `fsync` file → rename to `snapshot-<generation>.snap` → `fsync` directory → remove
//! all but the newest two. A crash at any point leaves either the previous snapshots alone or
//! the new one complete, never a half-written file under a snapshot name.
//!
//! With clustering on, the file also holds the node's replication state ([`ClusterState`],
//! written by [`Writer::write_with`]): after a restart the node answers from the loaded table
//! at once and replays each peer's stream, and its own, from the entry recorded here
//! (docs/OPERATIONS.md, "Running a cluster").
//!
//! Loading ([`load`]) maps the newest snapshot, verifies length and checksums before trusting
//! a record, and falls back to the previous one if anything is wrong, renaming the bad file
//! `*.bad` so rotation never counts it as one of the two kept. A snapshot whose keys were made
//! with another secret or other client prefixes is refused, not mixed in.
//!
//! The byte layout is in [`format`](mod@format) and `docs/SNAPSHOT_FORMAT.md`.

pub mod format;
pub mod inspect;
pub mod mmap;
pub mod store;
#[cfg(test)]
mod tests;

use std::io;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::cluster::StreamId;
use crate::engine::clock::to_unix;
use crate::engine::{AwlRecord, Engine, Secs, TripletRecord};
pub use format::{valid_node_id, ClusterError, FormatError, Header};
pub use store::{DirStore, Store, StoreFile};

/// Replication state saved with a snapshot (empty when clustering is off or the file is
/// version 1).
///
/// Saved in the file's cluster section (`docs/SNAPSHOT_FORMAT.md`); [`ClusterState::check`]
/// states the limits the writer and the reader enforce.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterState {
    /// Every change this node made at or before this engine second (engine::Secs) had been
    /// published when the snapshot started; 0 = nothing known.
    pub published_through: Secs,
    /// Per peer node id ([A-Za-z0-9_.-]{1,64}), the last stream entry applied
    /// (crate::cluster::StreamId).
    pub peers: Vec<(String, StreamId)>,
}

/// How many complete snapshots are kept.
pub const KEEP: usize = 2;

/// Bytes gathered before one write to the file.
const WRITE_CHUNK: usize = 1 << 20;

/// What a data-directory entry is, by its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// `snapshot-<generation>.snap`: a complete snapshot (not yet verified).
    Snapshot(u64),
    /// `.snapshot-<generation>.snap.tmp`: a write in progress, or one a crash interrupted.
    Temp(u64),
    /// `snapshot-<generation>.snap.bad`: a snapshot found unusable, kept for inspection.
    Bad(u64),
}

/// The file name of snapshot `generation`.
pub fn file_name(generation: u64) -> String {
    format!("snapshot-{generation:010}.snap")
}

fn temp_name(generation: u64) -> String {
    format!(".{}.tmp", file_name(generation))
}

/// Classifies a directory entry; `None` for anything that is not ours.
pub fn classify(name: &str) -> Option<Entry> {
    let digits = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    if let Some(rest) = name.strip_prefix(".snapshot-") {
        return digits(rest.strip_suffix(".snap.tmp")?).map(Entry::Temp);
    }
    let rest = name.strip_prefix("snapshot-")?;
    if let Some(g) = rest.strip_suffix(".snap") {
        return digits(g).map(Entry::Snapshot);
    }
    digits(rest.strip_suffix(".snap.bad")?).map(Entry::Bad)
}

/// A snapshot problem, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A file operation failed.
    #[error("snapshot {file}: cannot {op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        file: String,
        /// The cause.
        source: io::Error,
    },
    /// The replication state handed to [`Writer::write_with`] breaks a limit of the format;
    /// nothing was written (a file the loader would refuse is never produced).
    #[error("snapshot not written: cannot save the cluster state: {0}")]
    Cluster(#[source] ClusterError),
    /// The snapshot's keys were made differently from this server's.
    #[error("snapshot {file} {problem}; its records would never match. {remedy}")]
    Mismatch {
        /// The file.
        file: String,
        /// What differs.
        problem: String,
        /// What the operator can do.
        remedy: String,
    },
}

/// What a completed write did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// File name in the data directory.
    pub name: String,
    /// Its generation.
    pub generation: u64,
    /// Triplet records written.
    pub triplets: u64,
    /// Auto-whitelist records written.
    pub clients: u64,
    /// File size.
    pub bytes: u64,
    /// Time from start to the directory `fsync`.
    pub duration: Duration,
    /// The longest a shard lock was held for copying: the longest a request waited.
    pub longest_hold: Duration,
    /// Older snapshots removed.
    pub removed: Vec<String>,
}

/// Writes snapshots of one engine into one store.
#[derive(Debug)]
pub struct Writer<S: Store> {
    store: S,
    next_generation: u64,
}

impl<S: Store> Writer<S> {
    /// A writer whose first snapshot's generation follows every generation in the store
    /// (including unfinished and bad ones, so a name is never reused).
    pub fn new(store: S) -> io::Result<Self> {
        let last = store
            .list()?
            .iter()
            .filter_map(|n| classify(n))
            .map(|e| match e {
                Entry::Snapshot(g) | Entry::Temp(g) | Entry::Bad(g) => g,
            })
            .max()
            .unwrap_or(0);
        Ok(Self {
            store,
            next_generation: last + 1,
        })
    }

    /// Writes a snapshot of `engine` as it is now, with an empty [`ClusterState`] (clustering
    /// off): [`Writer::write_with`] with the default state.
    pub fn write(&mut self, engine: &Engine) -> Result<Written, SnapshotError> {
        self.write_with(engine, &ClusterState::default())
    }

    /// Writes a snapshot of `engine` as it is now, with the replication state `cluster`. On
    /// error the temporary file is removed (if it can be) and the previous snapshots are
    /// untouched.
    ///
    /// The caller reads `cluster` (what has been published, the last entry applied per peer)
    /// **before** calling: the table walk starts after it, so every change those positions
    /// cover is already in the table when its shard is copied. A replay from the saved
    /// positions after a restart then never misses a change; at worst it applies again some
    /// the file already holds, which the CRDT merge makes harmless. Positions read after the
    /// walk could cover changes applied behind the walk's back and lose them.
    ///
    /// A state that breaks a limit of the format (more than [`format::MAX_PEERS`] peers, an
    /// invalid or repeated node id) is refused with [`SnapshotError::Cluster`] before any file
    /// is created.
    pub fn write_with(
        &mut self,
        engine: &Engine,
        cluster: &ClusterState,
    ) -> Result<Written, SnapshotError> {
        let mut section = Vec::with_capacity(format::cluster_len(cluster));
        format::encode_cluster(cluster, &mut section).map_err(SnapshotError::Cluster)?;
        let generation = self.next_generation;
        // A failed attempt's generation is not reused: its temporary file may linger.
        self.next_generation += 1;
        let tmp = temp_name(generation);
        match self.write_inner(engine, generation, &tmp, &section) {
            Ok(w) => Ok(w),
            Err(e) => {
                let _ = self.store.remove(&tmp);
                Err(e)
            }
        }
    }

    fn write_inner(
        &self,
        engine: &Engine,
        generation: u64,
        tmp: &str,
        section: &[u8],
    ) -> Result<Written, SnapshotError> {
        let start = Instant::now();
        let now = engine.now();
        let io = |op: &'static str, file: &str| {
            let file = self.store.display(file);
            move |source| SnapshotError::Io { op, file, source }
        };
        let mut f = self.store.create(tmp).map_err(io("create", tmp))?;
        // Placeholder header: the real one, with counts and checksum, is written last.
        f.append(&[0u8; format::HEADER_LEN])
            .map_err(io("write", tmp))?;

        let mut crc = 0u32;
        let mut buf = Vec::with_capacity(WRITE_CHUNK + (1 << 16));
        let mut longest_hold = Duration::ZERO;
        let (triplet_shards, client_shards) = engine.shard_counts();
        let mut triplets = 0u64;
        let mut recs: Vec<TripletRecord> = Vec::new();
        for shard in 0..triplet_shards {
            let t = Instant::now();
            engine.copy_triplets(shard, now, &mut recs);
            longest_hold = longest_hold.max(t.elapsed());
            for r in &recs {
                format::encode_triplet(r, &mut buf);
                if buf.len() >= WRITE_CHUNK {
                    append(&mut buf, &mut f, &mut crc).map_err(io("write", tmp))?;
                }
            }
            triplets += recs.len() as u64;
        }
        drop(recs);
        let mut clients = 0u64;
        let mut recs: Vec<AwlRecord> = Vec::new();
        for shard in 0..client_shards {
            let t = Instant::now();
            engine.copy_clients(shard, now, &mut recs);
            longest_hold = longest_hold.max(t.elapsed());
            for r in &recs {
                format::encode_awl(r, &mut buf);
                if buf.len() >= WRITE_CHUNK {
                    append(&mut buf, &mut f, &mut crc).map_err(io("write", tmp))?;
                }
            }
            clients += recs.len() as u64;
        }
        buf.extend_from_slice(section);
        append(&mut buf, &mut f, &mut crc).map_err(io("write", tmp))?;

        let header = Header {
            version: format::VERSION,
            created_unix: to_unix(now),
            generation,
            key_id: engine.key_id(),
            ipv4_prefix: engine.normalizer().ipv4_prefix(),
            ipv6_prefix: engine.normalizer().ipv6_prefix(),
            normalization: format::NORMALIZATION,
            triplets,
            clients,
            policy: *engine.policy(),
            body_crc: crc,
            // At most format::MAX_CLUSTER_LEN (encode_cluster checked the state).
            cluster_len: section.len() as u32,
        };
        f.write_at(0, &header.encode()).map_err(io("write", tmp))?;
        f.sync().map_err(io("fsync", tmp))?;
        drop(f);
        let name = file_name(generation);
        self.store.rename(tmp, &name).map_err(io("rename", tmp))?;
        self.store
            .sync_dir()
            .map_err(io("fsync the directory of", &name))?;
        let removed = self.rotate(generation);
        Ok(Written {
            name,
            generation,
            triplets,
            clients,
            bytes: header.file_len(),
            duration: start.elapsed(),
            longest_hold,
            removed,
        })
    }

    /// Removes complete snapshots older than the newest [`KEEP`], and temporary files of
    /// earlier generations (left by a failed write). Failures are logged, not fatal: an
    /// extra old file costs only disk space.
    fn rotate(&self, newest: u64) -> Vec<String> {
        let names = match self.store.list() {
            Ok(n) => n,
            Err(e) => {
                warn!(error = %e, "cannot list the data directory to remove old snapshots");
                return Vec::new();
            }
        };
        let mut complete: Vec<(u64, &String)> = Vec::new();
        let mut stale = Vec::new();
        for n in &names {
            match classify(n) {
                Some(Entry::Snapshot(g)) if g <= newest => complete.push((g, n)),
                Some(Entry::Temp(g)) if g < newest => stale.push(n),
                _ => {}
            }
        }
        complete.sort_unstable_by_key(|e| std::cmp::Reverse(e.0));
        let mut removed = Vec::new();
        for n in complete.iter().skip(KEEP).map(|(_, n)| *n).chain(stale) {
            match self.store.remove(n) {
                Ok(()) => removed.push(n.clone()),
                Err(e) => {
                    warn!(file = %self.store.display(n), error = %e, "cannot remove an old snapshot")
                }
            }
        }
        removed
    }
}

/// Appends the encoded records gathered so far, folding them into the body checksum.
fn append<F: StoreFile>(buf: &mut Vec<u8>, f: &mut F, crc: &mut u32) -> io::Result<()> {
    *crc = crc32c::crc32c_append(*crc, buf);
    f.append(buf)?;
    buf.clear();
    Ok(())
}

/// What [`load`] found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Loaded {
    /// The snapshot loaded, if any.
    pub name: Option<String>,
    /// Triplet records loaded (alive at load time).
    pub triplets: usize,
    /// Triplet records dropped because they had expired meanwhile.
    pub triplets_expired: usize,
    /// Auto-whitelist records loaded.
    pub clients: usize,
    /// Auto-whitelist records dropped because they had expired.
    pub clients_expired: usize,
    /// Snapshots skipped as unusable, newest first, with the reason.
    pub skipped: Vec<(String, String)>,
    /// Unfinished temporary files removed.
    pub removed_temp: Vec<String>,
    /// The loaded snapshot's replication state: where to replay each peer from (empty when
    /// none was loaded, or it came from a version 1 file or a node with clustering off).
    pub cluster: ClusterState,
}

/// Loads the newest usable snapshot of `store` into `engine` on up to `threads` threads.
///
/// Unusable files (unreadable, torn, truncated, wrong version, bad checksum) are each named in
/// one log line, renamed `*.bad` and skipped for the previous one. A snapshot made with another
/// key or other client prefixes is an error: loading it would silently lose every record.
/// With no usable snapshot the engine stays empty.
pub fn load<S: Store>(store: &S, engine: &Engine, threads: usize) -> Result<Loaded, SnapshotError>
where
    S::Bytes: Sync,
{
    let mut out = Loaded::default();
    let names = store.list().map_err(|source| SnapshotError::Io {
        op: "list",
        file: store.display(""),
        source,
    })?;
    let mut snapshots = Vec::new();
    for n in &names {
        match classify(n) {
            Some(Entry::Snapshot(g)) => snapshots.push((g, n)),
            Some(Entry::Temp(_)) => {
                // Only a write that never reached its rename leaves one: not a snapshot.
                match store.remove(n) {
                    Ok(()) => {
                        info!(file = %store.display(n), "removed the temporary file of an interrupted snapshot write");
                        out.removed_temp.push(n.clone());
                    }
                    Err(e) => {
                        warn!(file = %store.display(n), error = %e, "cannot remove the temporary file of an interrupted snapshot write")
                    }
                }
            }
            _ => {}
        }
    }
    snapshots.sort_unstable_by_key(|e| std::cmp::Reverse(e.0));
    for (_, name) in snapshots {
        let bytes = match store.read(name) {
            Ok(b) => b,
            Err(e) => {
                skip(store, name, &format!("cannot read: {e}"), &mut out);
                continue;
            }
        };
        let view = match format::verify(&bytes) {
            Ok(v) => v,
            Err(e) => {
                skip(store, name, &e.to_string(), &mut out);
                continue;
            }
        };
        check_compatible(&view.header, engine, &store.display(name))?;
        let now = engine.now();
        engine.reserve(view.header.triplets as usize, view.header.clients as usize);
        let parts = view.triplet_parts(threads.max(1));
        let kept: usize = std::thread::scope(|s| {
            let handles: Vec<_> = parts
                .iter()
                .map(|run| s.spawn(move || engine.load_triplets(format::decode_triplets(run), now)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a loader thread panicked"))
                .sum()
        });
        out.triplets = kept;
        out.triplets_expired = view.header.triplets as usize - kept;
        out.clients = engine.load_clients(view.clients(), now);
        out.clients_expired = view.header.clients as usize - out.clients;
        out.name = Some(name.clone());
        out.cluster = view.cluster;
        return Ok(out);
    }
    Ok(out)
}

/// Names an unusable snapshot in one log line and moves it out of the way.
fn skip<S: Store>(store: &S, name: &str, why: &str, out: &mut Loaded) {
    let bad = format!("{name}.bad");
    match store.rename(name, &bad) {
        Ok(()) => warn!(
            "snapshot {} is unusable ({why}); renamed to {bad}, using the previous one",
            store.display(name)
        ),
        Err(e) => warn!(
            "snapshot {} is unusable ({why}) and could not be renamed ({e}); using the previous one",
            store.display(name)
        ),
    }
    out.skipped.push((name.to_owned(), why.to_owned()));
}

fn check_compatible(h: &Header, engine: &Engine, file: &str) -> Result<(), SnapshotError> {
    let n = engine.normalizer();
    let mismatch = |problem: String, remedy: String| {
        Err(SnapshotError::Mismatch {
            file: file.to_owned(),
            problem,
            remedy,
        })
    };
    if h.key_id != engine.key_id() {
        return mismatch(
            format!(
                "was made with another hash key (key id {:016x}; the data directory's key has id {:016x})",
                h.key_id,
                engine.key_id()
            ),
            "Put back the hash.key it was made with, or move the snapshot files away to start with an empty table.".into(),
        );
    }
    if (h.ipv4_prefix, h.ipv6_prefix) != (n.ipv4_prefix(), n.ipv6_prefix()) {
        return mismatch(
            format!(
                "was made with ipv4-prefix {} and ipv6-prefix {}, this server uses {} and {}",
                h.ipv4_prefix,
                h.ipv6_prefix,
                n.ipv4_prefix(),
                n.ipv6_prefix()
            ),
            "Set the prefixes back, or move the snapshot files away to start with an empty table."
                .into(),
        );
    }
    if h.normalization != format::NORMALIZATION {
        return mismatch(
            format!(
                "was made with address normalisation version {}, this greyhound uses {}",
                h.normalization,
                format::NORMALIZATION
            ),
            "Run the greyhound version that wrote it, or move the snapshot files away to start with an empty table.".into(),
        );
    }
    Ok(())
}
