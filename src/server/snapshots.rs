//! The snapshot writer thread: a snapshot every `snapshot-interval`, and a final one at
//! shutdown. It runs on its own OS thread, never on the async runtime's workers: a write
//! spends most of its time in `write` and `fsync`, which would stall every connection that
//! worker serves.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tracing::{error, info};

use super::Shared;
use crate::snapshot::{DirStore, SnapshotError, Writer, Written};

/// The running writer thread.
#[derive(Debug)]
pub struct Snapshots {
    stop: mpsc::Sender<()>,
    thread: JoinHandle<Writer<DirStore>>,
}

impl Snapshots {
    /// Starts writing a snapshot every `every` (the first one `every` from now).
    pub fn start(
        writer: Writer<DirStore>,
        shared: Arc<Shared>,
        every: Duration,
    ) -> std::io::Result<Self> {
        let (stop, stopped) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("snapshot".into())
            .spawn(move || {
                let mut writer = writer;
                let mut next = Instant::now() + every;
                loop {
                    match stopped.recv_timeout(next.saturating_duration_since(Instant::now())) {
                        Err(RecvTimeoutError::Timeout) => {}
                        // Asked to stop, or the owner is gone.
                        _ => return writer,
                    }
                    // Failures are counted and logged inside; the next attempt is on time.
                    let _ = write_one(&mut writer, &shared, "periodic");
                    next += every;
                    // Fell behind (a write took longer than the interval): start from now
                    // rather than write back to back.
                    next = next.max(Instant::now());
                }
            })?;
        Ok(Self { stop, thread })
    }

    /// Stops the thread (waiting for a write in progress) and writes the final snapshot.
    pub fn finish(self, shared: &Shared) -> Result<Written, SnapshotError> {
        let _ = self.stop.send(());
        let mut writer = self.thread.join().map_err(|_| SnapshotError::Io {
            op: "write",
            file: "(snapshot thread)".into(),
            source: std::io::Error::other("the snapshot thread panicked"),
        })?;
        write_one(&mut writer, shared, "final")
    }
}

/// Writes one snapshot, logs it and updates the metrics.
pub fn write_one(
    writer: &mut Writer<DirStore>,
    shared: &Shared,
    why: &str,
) -> Result<Written, SnapshotError> {
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let m = &shared.metrics.snapshots;
    // Read before the table walk (see `Cluster::positions`).
    let positions = shared
        .cluster
        .as_ref()
        .map(|c| c.positions())
        .unwrap_or_default();
    match writer.write_with(&shared.engine, &positions) {
        Ok(w) => {
            m.written.inc();
            m.last_time.set(started as i64);
            m.last_duration.set(w.duration.as_secs_f64());
            m.last_bytes.set(w.bytes as i64);
            m.last_triplets.set(w.triplets as i64);
            m.last_clients.set(w.clients as i64);
            m.last_longest_hold.set(w.longest_hold.as_secs_f64());
            info!(
                file = %w.name,
                triplets = w.triplets,
                clients = w.clients,
                bytes = w.bytes,
                ms = w.duration.as_millis() as u64,
                longest_lock_us = w.longest_hold.as_micros() as u64,
                removed = ?w.removed,
                "{why} snapshot written"
            );
            Ok(w)
        }
        Err(e) => {
            m.failures.inc();
            error!("{why} snapshot failed, the previous ones are kept: {e}");
            Err(e)
        }
    }
}
