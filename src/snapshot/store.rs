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
