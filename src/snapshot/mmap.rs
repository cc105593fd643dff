//! Memory maps: one of the two `unsafe` modules in Greyhound (the other is `engine::prefetch`).
//!
//! - Read-only maps of snapshot files ([`map`]): a snapshot is read where it lies, the kernel
//!   pages it in as the loader decodes records, with no read buffer the size of the table and
//!   no copy.
//! - Zeroed anonymous memory seen as atomic words ([`ZeroedWords`]): the SPF result cache,
//!   sized for its bound but backed by memory only where it is written, read without locks.

#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::ops::Deref;
use std::path::Path;
use std::sync::atomic::AtomicU64;

use memmap2::{Advice, Mmap, MmapMut, MmapRaw};

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

/// A huge page of x86_64 (and of aarch64 with 4 KiB pages).
const HUGE_PAGE: usize = 2 << 20;

/// `len` atomic 64-bit words of anonymous memory, all zero at first.
///
/// The kernel backs a page only when it is first written, so a table laid out for its bound
/// costs memory as it fills, not up front. A region of at least one huge page is aligned to
/// one and asks for transparent huge pages (`MADV_HUGEPAGE`: honoured under the kernel's
/// default `madvise` setting): one TLB entry then covers 2 MiB of it instead of 4 KiB, which
/// matters for a table read at random on every request.
#[derive(Debug)]
pub struct ZeroedWords {
    map: MmapRaw,
    /// Bytes from the mapping's start to the first word (a huge page boundary, or 0).
    start: usize,
    len: usize,
}

impl ZeroedWords {
    /// Maps `len` words (at least one).
    pub fn new(len: usize) -> io::Result<Self> {
        let bytes = len
            .max(1)
            .checked_mul(8)
            .filter(|b| {
                b.checked_add(HUGE_PAGE)
                    .is_some_and(|t| t <= isize::MAX as usize)
            })
            .ok_or_else(|| io::Error::new(io::ErrorKind::OutOfMemory, "table too large"))?;
        let huge = bytes >= HUGE_PAGE;
        // A huge page can back only a whole, aligned 2 MiB: map one more and start at the
        // first boundary (the slack is never touched, so never backed).
        let map = MmapMut::map_anon(if huge { bytes + HUGE_PAGE } else { bytes })?;
        let start = if huge {
            let addr = map.as_ptr() as usize;
            addr.next_multiple_of(HUGE_PAGE) - addr
        } else {
            0
        };
        #[cfg(target_os = "linux")]
        if huge {
            // Only advice: without huge pages the table works the same, a little slower.
            let _ = map.advise_range(Advice::HugePage, start, bytes);
        }
        Ok(Self {
            map: MmapRaw::from(map),
            start,
            len: len.max(1),
        })
    }

    /// The words.
    pub fn words(&self) -> &[AtomicU64] {
        // SAFETY: the pointer is `start` bytes into a live, private, readable and writable
        // anonymous mapping of at least `start + 8 * len` bytes, owned by `self`, so it lives
        // as long as the returned borrow; `start` is 0 or a multiple of 2 MiB from a
        // page-aligned address, so the words are 8-aligned. The kernel fills anonymous memory
        // with zeros, a valid `AtomicU64`. The bytes are reached only through these atomics
        // (`MmapRaw` hands out no `&[u8]`, and this type never does), so every access,
        // from any thread, is atomic: no data race, no aliasing of a non-atomic reference.
        unsafe {
            std::slice::from_raw_parts(
                self.map.as_mut_ptr().add(self.start).cast::<AtomicU64>(),
                self.len,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn zeroed_words_start_zero_and_keep_what_is_stored() {
        // One word, a few pages, and past a huge page (aligned to one).
        for len in [1, 1000, HUGE_PAGE / 8 + 5] {
            let w = ZeroedWords::new(len).unwrap();
            let words = w.words();
            assert_eq!(words.len(), len);
            assert!(words.iter().all(|x| x.load(Ordering::Relaxed) == 0));
            words[0].store(7, Ordering::Relaxed);
            words[len - 1].fetch_add(9, Ordering::Relaxed);
            assert_eq!(
                words[len - 1].load(Ordering::Relaxed),
                if len == 1 { 16 } else { 9 }
            );
            if len * 8 >= HUGE_PAGE {
                assert_eq!(words.as_ptr() as usize % HUGE_PAGE, 0, "huge-page aligned");
            }
        }
        assert_eq!(ZeroedWords::new(0).unwrap().words().len(), 1);
    }

    #[test]
    fn too_large_is_an_error_not_a_panic() {
        assert!(ZeroedWords::new(usize::MAX / 4).is_err());
        assert!(ZeroedWords::new(1 << 58).is_err());
    }
}
