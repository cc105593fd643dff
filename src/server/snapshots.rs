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

/// What the writer thread is asked to do besides its periodic snapshots.
#[derive(Debug)]
enum Cmd {
    /// Stop (the final snapshot is written by [`Snapshots::finish`]).
    Stop,
    /// Write one now (`greyhound admin snapshot`) and send back how it went.
    Now(mpsc::SyncSender<Result<Written, String>>),
}

/// The running writer thread.
#[derive(Debug)]
pub struct Snapshots {
    stop: mpsc::Sender<Cmd>,
    thread: JoinHandle<Writer<DirStore>>,
}

/// Asks the writer thread for a snapshot now: the one writer, so an admin's snapshot and a
/// periodic one never run at once.
#[derive(Debug, Clone)]
pub struct SnapshotTrigger(mpsc::Sender<Cmd>);

impl SnapshotTrigger {
    /// Writes a snapshot now and waits for it (blocking: call off the async workers).
    pub fn write_now(&self) -> Result<Written, String> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.0
            .send(Cmd::Now(tx))
            .map_err(|_| "the snapshot thread has stopped".to_string())?;
        rx.recv()
            .map_err(|_| "the snapshot thread has stopped".to_string())?
    }
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
                        Ok(Cmd::Now(reply)) => {
                            let w = write_one(&mut writer, &shared, "requested");
                            let _ = reply.send(w.map_err(|e| e.to_string()));
                            continue;
                        }
                        // Asked to stop, or the owner is gone.
                        Ok(Cmd::Stop) | Err(RecvTimeoutError::Disconnected) => return writer,
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

    /// A handle that asks for a snapshot now.
    pub fn trigger(&self) -> SnapshotTrigger {
        SnapshotTrigger(self.stop.clone())
    }

    /// Stops the thread (waiting for a write in progress) and writes the final snapshot.
    pub fn finish(self, shared: &Shared) -> Result<Written, SnapshotError> {
        let _ = self.stop.send(Cmd::Stop);
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
