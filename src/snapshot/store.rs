//! The few file operations a snapshot needs, behind a trait, so tests can stop a write at
//! any step of the write → fsync → rename → fsync-directory sequence and look at what a
//! crash would leave behind (see the crash model in `tests`).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::ops::Deref;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::mmap::{self, Mapped};

/// A file being written.
pub trait StoreFile {
    /// Appends bytes.
    fn append(&mut self, buf: &[u8]) -> io::Result<()>;
    /// Overwrites bytes at `offset` (the header, once the body is written).
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()>;
    /// Makes the file's contents durable (`fsync`).
    fn sync(&mut self) -> io::Result<()>;
}

/// A directory of snapshot files.
pub trait Store {
    /// A file being written.
    type File: StoreFile;
    /// A file's bytes, for reading.
    type Bytes: Deref<Target = [u8]>;
    /// Names of the entries.
    fn list(&self) -> io::Result<Vec<String>>;
    /// Creates (or truncates) a file for writing.
    fn create(&self, name: &str) -> io::Result<Self::File>;
    /// Atomically renames `from` to `to`, replacing `to`.
    fn rename(&self, from: &str, to: &str) -> io::Result<()>;
    /// Removes a file.
    fn remove(&self, name: &str) -> io::Result<()>;
    /// Makes renames and removals durable (`fsync` of the directory).
    fn sync_dir(&self) -> io::Result<()>;
    /// The bytes of a file.
    fn read(&self, name: &str) -> io::Result<Self::Bytes>;
    /// A name as the operator knows it, for messages.
    fn display(&self, name: &str) -> String;
}

/// Snapshot files in a real directory, read through a memory map.
#[derive(Debug, Clone)]
pub struct DirStore {
    dir: PathBuf,
}

impl DirStore {
    /// The store in `dir` (which must exist).
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
        }
    }
}

/// A real file being written.
#[derive(Debug)]
pub struct DirFile(File);

impl StoreFile for DirFile {
    fn append(&mut self, buf: &[u8]) -> io::Result<()> {
        self.0.write_all(buf)
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }
    fn sync(&mut self) -> io::Result<()> {
        self.0.sync_all()
    }
}

impl Store for DirStore {
    type File = DirFile;
    type Bytes = Mapped;

    fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for e in fs::read_dir(&self.dir)? {
            if let Ok(name) = e?.file_name().into_string() {
                names.push(name);
            }
        }
        Ok(names)
    }

    fn create(&self, name: &str) -> io::Result<DirFile> {
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            // Records are keyed hashes, not addresses, but the file still tells who mails whom
            // how often: readable by the service's user only, like the key.
            .mode(0o600)
            .open(self.dir.join(name))
            .map(DirFile)
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        fs::rename(self.dir.join(from), self.dir.join(to))
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        fs::remove_file(self.dir.join(name))
    }

    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }

    fn read(&self, name: &str) -> io::Result<Mapped> {
        mmap::map(&self.dir.join(name))
    }

    fn display(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

/// The highest generation a snapshot file name may carry: half the range of `u64`, so that the
/// writer's next generation (one more than the highest found) can never wrap to 0. A server
/// writing one snapshot a second would take 2.9 × 10¹¹ years to get there; a name above it
/// was made by hand or by a damaged disk.
pub const MAX_GENERATION: u64 = u64::MAX / 2;

/// The first entry named like a snapshot file (`snapshot-N.snap`, `.snapshot-N.snap.tmp`,
/// `snapshot-N.snap.bad`, N all digits) whose generation cannot be ordered: too large for a
/// `u64`, or above [`MAX_GENERATION`]. Such a file would sort as the newest snapshot at every
/// start, or make the next generation wrap to 0, so newer state would be forgotten; the server
/// refuses to start on it instead (docs/OPERATIONS.md). Names not of this shape are not ours
/// and are left alone.
pub fn unorderable(names: &[String]) -> Option<&str> {
    names.iter().map(String::as_str).find(|name| {
        let rest = name.strip_prefix('.').unwrap_or(name);
        let digits = rest.strip_prefix("snapshot-").and_then(|r| {
            [".snap", ".snap.tmp", ".snap.bad"]
                .iter()
                .find_map(|suffix| r.strip_suffix(suffix))
        });
        digits.is_some_and(|d| {
            !d.is_empty()
                && d.bytes().all(|b| b.is_ascii_digit())
                && d.parse::<u64>().map_or(true, |g| g > MAX_GENERATION)
        })
    })
}

/// Fails, naming the file, if [`unorderable`] finds one in `store`.
pub fn check_names<S: Store>(store: &S) -> io::Result<()> {
    let names = store.list()?;
    match unorderable(&names) {
        None => Ok(()),
        Some(name) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "snapshot file {} has a generation that cannot be ordered (above {MAX_GENERATION}): the \
                 generations after it would wrap and newer snapshots be forgotten; move it out \
                 of the data directory",
                store.display(name)
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_that_cannot_be_ordered_are_found_and_others_left_alone() {
        let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let ok = names(&[
            "snapshot-0000000001.snap",
            ".snapshot-0000000002.snap.tmp",
            "snapshot-9223372036854775807.snap",
            "snapshot-x.snap",
            "snapshot-.snap",
            "hash.key",
            "snapshot-99999999999999999999.snap.orig",
        ]);
        assert_eq!(unorderable(&ok), None);
        for bad in [
            "snapshot-9223372036854775808.snap",
            "snapshot-18446744073709551615.snap",
            "snapshot-99999999999999999999999.snap",
            ".snapshot-18446744073709551615.snap.tmp",
            "snapshot-18446744073709551615.snap.bad",
        ] {
            let mut n = ok.clone();
            n.push(bad.to_string());
            assert_eq!(unorderable(&n), Some(bad));
        }
    }
}
