//! The data directory: where the hash secret and the snapshots live.
//!
//! The secret keys every record's hash. It is made once, on the first start in an empty
//! directory, and reused by every later start: a new secret would orphan every stored record.
//! So a directory that has other files but no key, or a key file that is damaged, is an error
//! with a clear message — never a silently regenerated key.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::engine::HashSecret;

/// File name of the secret inside the data directory.
pub const KEY_FILE: &str = "hash.key";

/// File locked by the server using the directory (a dot file: not data).
pub const LOCK_FILE: &str = ".lock";

/// A data directory problem, naming the path.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    /// Filesystem error.
    #[error("data directory {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The path exists but is not a directory.
    #[error("data directory {path} is not a directory")]
    NotADirectory {
        /// The path.
        path: PathBuf,
    },
    /// Files cannot be created in the directory: every snapshot would fail.
    #[error("data directory {path}: cannot write in it ({source}); every snapshot would fail and a crash would lose everything learnt since the start (fix its permissions, attributes or mount)")]
    NotWritable {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The key file exists but is not a valid key.
    #[error("data directory: key file {path} is damaged ({problem}); restore it from a backup — a new key would orphan every stored record")]
    DamagedKey {
        /// The key file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// Another process holds the directory's lock.
    #[error("data directory {path} is in use by another greyhound process; two servers writing the same snapshots would overwrite each other's (stop the other one or use another --data-dir)")]
    InUse {
        /// The directory.
        path: PathBuf,
    },
    /// Files are present but the key is missing.
    #[error("data directory {path} holds files but no {KEY_FILE}; restore the key from a backup, or point --data-dir at an empty directory")]
    MissingKey {
        /// The directory.
        path: PathBuf,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> DataDirError + '_ {
    move |source| DataDirError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Creates the directory if it is missing; a path that exists as something else is named as
/// such (`create_dir_all` would only say "File exists").
fn create(dir: &Path) -> Result<(), DataDirError> {
    match fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(DataDirError::NotADirectory {
            path: dir.to_path_buf(),
        }),
        Err(_) => fs::create_dir_all(dir).map_err(io_err(dir)),
    }
}

/// The exclusive lock on a data directory, held for the life of the server and released by
/// the kernel when the process ends, however it ends.
#[derive(Debug)]
pub struct DirLock {
    _lock: nix::fcntl::Flock<File>,
}

/// Creates the data directory if needed and locks it, so two servers never write snapshots
/// into one directory.
pub fn lock(dir: &Path) -> Result<DirLock, DataDirError> {
    create(dir)?;
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(io_err(&path))?;
    let lock = match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(lock) => DirLock { _lock: lock },
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            return Err(DataDirError::InUse {
                path: dir.to_path_buf(),
            })
        }
        Err((_, e)) => return Err(io_err(&path)(io::Error::from(e))),
    };
    probe_writable(dir)?;
    Ok(lock)
}

/// Name of the file [`lock`] creates and removes to learn whether the directory is writable.
const PROBE_FILE: &str = ".write-probe";

/// Creates, syncs and removes a file in `dir`, the steps every snapshot takes. Opening the
/// existing `.lock` and reading `hash.key` succeed in a directory that is read-only (`chattr
/// +i`, a read-only mount, another owner's mode bits), so without this the first error would
/// come at the first snapshot interval, after the server had reported ready. Called with the
/// lock held, so two servers never probe one directory at once.
fn probe_writable(dir: &Path) -> Result<(), DataDirError> {
    let path = dir.join(PROBE_FILE);
    let not_writable = |source| DataDirError::NotWritable {
        path: dir.to_path_buf(),
        source,
    };
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut f| {
            f.write_all(b"x")?;
            f.sync_all()
        })
        .map_err(not_writable)?;
    fs::remove_file(&path).map_err(not_writable)
}

/// Opens (creating if needed) the data directory and returns its secret.
pub fn open(dir: &Path) -> Result<HashSecret, DataDirError> {
    create(dir)?;
    let key_path = dir.join(KEY_FILE);
    // Read as bytes: a damaged file may hold anything, not only UTF-8.
    match fs::read(&key_path) {
        Ok(bytes) => parse_key(&bytes).map_err(|problem| DataDirError::DamagedKey {
            path: key_path.clone(),
            problem,
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let others = fs::read_dir(dir)
                .map_err(io_err(dir))?
                .filter_map(Result::ok)
                .any(|e| !e.file_name().to_string_lossy().starts_with('.'));
            if others {
                return Err(DataDirError::MissingKey {
                    path: dir.to_path_buf(),
                });
            }
            create_key(dir, &key_path)
        }
        Err(e) => Err(io_err(&key_path)(e)),
    }
}

/// Parses the key file: 32 hexadecimal digits, blanks around them allowed. Any other bytes,
/// multi-byte UTF-8 or not UTF-8 at all, are a damaged key, never a panic.
fn parse_key(bytes: &[u8]) -> Result<HashSecret, String> {
    let hex = bytes.trim_ascii();
    if hex.len() != 32 {
        return Err(format!(
            "expected 32 hexadecimal digits, found {} bytes",
            hex.len()
        ));
    }
    let digit = |b: u8| char::from(b).to_digit(16);
    let mut key = [0u8; 16];
    for (k, pair) in key.iter_mut().zip(hex.chunks_exact(2)) {
        match (digit(pair[0]), digit(pair[1])) {
            // Both below 16: the byte cannot overflow.
            (Some(hi), Some(lo)) => *k = (hi * 16 + lo) as u8,
            _ => return Err("not hexadecimal".to_string()),
        }
    }
    Ok(HashSecret(key))
}

fn create_key(dir: &Path, key_path: &Path) -> Result<HashSecret, DataDirError> {
    let mut key = [0u8; 16];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut key))
        .map_err(io_err(Path::new("/dev/urandom")))?;
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    // Written to a temporary name, synced, then renamed: a crash never leaves a half key.
    let tmp = dir.join(format!(".{KEY_FILE}.tmp"));
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.set_permissions(fs::Permissions::from_mode(0o600))
        .map_err(io_err(&tmp))?;
    f.write_all(format!("{hex}\n").as_bytes())
        .map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, key_path).map_err(io_err(key_path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))?;
    Ok(HashSecret(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("greyhound-datadir-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn first_start_makes_a_private_key_and_later_starts_reuse_it() {
        let d = temp_dir("reuse");
        let a = open(&d).unwrap();
        let b = open(&d).unwrap();
        assert_eq!(a, b);
        let mode = fs::metadata(d.join(KEY_FILE)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            fs::read_to_string(d.join(KEY_FILE)).unwrap().trim().len(),
            32
        );
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn damaged_or_missing_key_is_an_error_not_a_new_key() {
        let d = temp_dir("damaged");
        open(&d).unwrap();
        fs::write(d.join(KEY_FILE), "zz\n").unwrap();
        let e = open(&d).unwrap_err().to_string();
        assert!(e.contains("damaged") && e.contains("hash.key"), "{e}");
        fs::write(d.join(KEY_FILE), "0123456789abcdef0123456789abcdeg\n").unwrap();
        assert!(open(&d)
            .unwrap_err()
            .to_string()
            .contains("not hexadecimal"));
        // 32 bytes that are not 32 characters, and bytes that are not UTF-8 at all.
        for bytes in ["éééééééééééééééé".as_bytes(), &[0xff; 32]] {
            fs::write(d.join(KEY_FILE), bytes).unwrap();
            let e = open(&d).unwrap_err().to_string();
            assert!(e.contains("damaged"), "{e}");
        }
        fs::remove_file(d.join(KEY_FILE)).unwrap();
        fs::write(d.join("snapshot-0000000001.snap"), b"x").unwrap();
        let e = open(&d).unwrap_err().to_string();
        assert!(e.contains("no hash.key"), "{e}");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_second_lock_on_one_directory_is_refused_until_the_first_is_dropped() {
        let d = temp_dir("lock");
        let first = lock(&d).unwrap();
        let e = lock(&d).unwrap_err().to_string();
        assert!(e.contains("in use by another greyhound"), "{e}");
        drop(first);
        lock(&d).unwrap();
        // Neither the lock file nor the probe is data: a directory holding only them still
        // gets a new key.
        fs::write(d.join(PROBE_FILE), b"x").unwrap();
        open(&d).unwrap();
        fs::remove_dir_all(&d).unwrap();
    }
}
