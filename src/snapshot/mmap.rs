//! Read-only memory maps of snapshot files: one of the two `unsafe` modules in Greyhound (the
//! other is `engine::prefetch`).
//!
//! A snapshot is read where it lies: the kernel pages it in as the loader decodes records,
//! with no read buffer the size of the table and no copy.

#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::ops::Deref;
use std::path::Path;

use memmap2::{Advice, Mmap};

/// A file's bytes, mapped (or empty: a zero-length file cannot be mapped).
#[derive(Debug)]
pub struct Mapped(Option<Mmap>);

impl Deref for Mapped {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.0.as_deref().unwrap_or(&[])
    }
}

/// Maps `path` read-only.
pub fn map(path: &Path) -> io::Result<Mapped> {
    let file = File::open(path)?;
    if file.metadata()?.len() == 0 {
        return Ok(Mapped(None));
    }
    // SAFETY: a mapped file must not change while mapped, or the bytes under our slices could
    // change (or a page vanish: SIGBUS on truncation). Snapshot files are never written after
    // their atomic rename: the writer only ever writes a fresh temporary file, and old
    // snapshots are removed by unlink, which leaves an existing mapping intact. Nothing else
    // should write into the data directory (docs/OPERATIONS.md says so); `snapshot inspect`
    // on a file that another program is rewriting is the operator's own risk, as with any
    // tool that reads a file being overwritten.
    let map = unsafe { Mmap::map(&file)? };
    // The loader reads front to back once; read-ahead suits that. Advice is only a hint.
    let _ = map.advise(Advice::Sequential);
    Ok(Mapped(Some(map)))
}
