//! Snapshot loading (`src/snapshot`): the loader, the format's decoders and `snapshot inspect`.
//!
//! The input is a snapshot file; the corpus starts from real ones the library wrote (see
//! `write_seeds`). Each input is tried twice: as it is, and "sealed" (both checksums made to
//! match its bytes), so the checks past the checksums are reached too. Invariants:
//! - nothing panics;
//! - a file the loader accepts has a header checksum and a body checksum that verify (by a
//!   bit-by-bit CRC-32C written here, not the library's), and the length its counts imply;
//! - an accepted file's records are all accounted for (loaded or expired); for one input in
//!   512, writing the loaded table and loading that gives the same table again;
//! - a refused file leaves the engine untouched and is set aside (`*.bad`);
//! - a decoded header or cluster section encodes back to the same bytes;
//! - `snapshot inspect` agrees with the loader on whether the file is usable.
//!
//! `GREYHOUND_FUZZ_SEEDS=DIR` makes the target write its seed snapshots into DIR and exit.

#![no_main]

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex, OnceLock};

use greyhound::cluster::StreamId;
use greyhound::engine::clock::to_unix;
use greyhound::engine::{
    AwlRecord, Engine, EngineConfig, HashSecret, ManualClock, Mode, Normalizer, Policy, Query,
    Secs, TripletRecord,
};
use greyhound::snapshot::format::{self, header, HEADER_LEN};
use greyhound::snapshot::inspect::inspect;
use greyhound::snapshot::{load, ClusterState, Store, StoreFile, Writer};
use libfuzzer_sys::fuzz_target;

const T0: Secs = 90_000_000;
const SECRET: HashSecret = HashSecret(*b"fuzz-snapshot-01");
const NAME: &str = "snapshot-0000000007.snap";

/// Short windows, so the seeds hold records in every state.
fn policy() -> Policy {
    Policy {
        delay: 10,
        retry_window: 100,
        whitelist_ttl: 200,
        awl_clients: 2,
        awl_interval: 5,
        awl_ttl: 300,
        dry_run: false,
    }
}

fn engine() -> (Engine, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(T0));
    let e = Engine::new(
        EngineConfig {
            policy: policy(),
            normalizer: Normalizer::default(),
            secret: SECRET,
        },
        clock.clone(),
    );
    (e, clock)
}

/// A directory of snapshot files in memory.
#[derive(Debug, Clone, Default)]
struct MemStore(Arc<Mutex<BTreeMap<String, Vec<u8>>>>);

struct MemFile(MemStore, String);

impl StoreFile for MemFile {
    fn append(&mut self, buf: &[u8]) -> io::Result<()> {
        let mut m = self.0 .0.lock().unwrap();
        m.entry(self.1.clone()).or_default().extend_from_slice(buf);
        Ok(())
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let mut m = self.0 .0.lock().unwrap();
        let f = m.entry(self.1.clone()).or_default();
        let at = offset as usize;
        if f.len() < at + buf.len() {
            f.resize(at + buf.len(), 0);
        }
        f[at..at + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn sync(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Store for MemStore {
    type File = MemFile;
    type Bytes = Vec<u8>;
    fn list(&self) -> io::Result<Vec<String>> {
        Ok(self.0.lock().unwrap().keys().cloned().collect())
    }
    fn create(&self, name: &str) -> io::Result<MemFile> {
        self.0.lock().unwrap().insert(name.to_owned(), Vec::new());
        Ok(MemFile(self.clone(), name.to_owned()))
    }
    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let mut m = self.0.lock().unwrap();
        let f = m.remove(from).ok_or(io::ErrorKind::NotFound)?;
        m.insert(to.to_owned(), f);
        Ok(())
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        let mut m = self.0.lock().unwrap();
        m.remove(name)
            .map(|_| ())
            .ok_or(io::ErrorKind::NotFound.into())
    }
    fn sync_dir(&self) -> io::Result<()> {
        Ok(())
    }
    fn read(&self, name: &str) -> io::Result<Vec<u8>> {
        let m = self.0.lock().unwrap();
        m.get(name).cloned().ok_or(io::ErrorKind::NotFound.into())
    }
    fn display(&self, name: &str) -> String {
        format!("mem:{name}")
    }
}

/// CRC-32C bit by bit (reflected polynomial 0x82F63B78): independent of the `crc32c` crate
/// the library uses.
fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn le32(b: &[u8], f: format::Field) -> u32 {
    u32::from_le_bytes(b[f.range()].try_into().unwrap())
}

fn le64(b: &[u8], f: format::Field) -> u64 {
    u64::from_le_bytes(b[f.range()].try_into().unwrap())
}

/// The bytes with both checksums made to match them.
fn sealed(file: &[u8]) -> Option<Vec<u8>> {
    if file.len() < HEADER_LEN {
        return None;
    }
    let mut f = file.to_vec();
    let body = crc32c(&f[HEADER_LEN..]);
    f[header::BODY_CRC.range()].copy_from_slice(&body.to_le_bytes());
    let head = crc32c(&f[..header::HEADER_CRC.at]);
    f[header::HEADER_CRC.range()].copy_from_slice(&head.to_le_bytes());
    Some(f)
}

/// Every record of an engine, sorted.
fn contents(e: &Engine) -> (Vec<TripletRecord>, Vec<AwlRecord>) {
    let mut t = Vec::new();
    e.for_each_triplet_shard(|it| t.extend(it.copied()));
    let mut c = Vec::new();
    e.for_each_client_shard(|it| c.extend(it.copied()));
    t.sort_by_key(|r| r.key.as_u128());
    c.sort_by_key(|r| r.key.as_u128());
    (t, c)
}

/// The engine refused files are loaded into: it must stay empty.
fn untouched() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| engine().0)
}

/// Accepted files are loaded into one engine, replaced after this many loads: dropping an
/// engine (320 shards and their timer wheels) cost 90% of this target's time when each input
/// had its own (callgrind; 276 inputs/s).
const LOADS_PER_ENGINE: usize = 4096;

thread_local! {
    static SHARED: std::cell::RefCell<(Engine, usize)> = std::cell::RefCell::new((engine().0, 0));
}

/// Whether this input also goes through a write and a second load on engines of its own: one
/// in 512, picked by the input's bytes so a crash reproduces (each costs two engines, whose
/// drop alone costs as much as ~1,000 inputs).
fn round_trip_this(file: &[u8]) -> bool {
    hash(file) % 512 == 0
}

/// A cheap hash of the input, to pick the inputs that get the costly checks.
fn hash(file: &[u8]) -> u16 {
    file.iter()
        .fold(0u16, |a, &b| a.wrapping_mul(31).wrapping_add(u16::from(b)))
}

fn check(file: &[u8]) {
    // Decoders: what decodes encodes back to the same bytes.
    if let Ok(h) = format::Header::decode(file) {
        assert_eq!(&h.encode()[..], &file[..HEADER_LEN], "header round trip");
    }
    let verified = format::verify(file);
    if let Ok(view) = &verified {
        let h = &view.header;
        if h.version >= 2 {
            let section = &file[file.len() - h.cluster_len as usize..];
            let mut again = Vec::new();
            format::encode_cluster(&view.cluster, &mut again).expect("a decoded state encodes");
            assert_eq!(again, section, "cluster section round trip");
        }
    }
    let report = inspect(file, to_unix(T0));
    assert_eq!(
        report.ok(),
        verified.is_ok(),
        "inspect and the loader agree"
    );
    let _ = report.to_string();

    // The loader, on a directory holding this one file.
    let store = MemStore::default();
    store
        .0
        .lock()
        .unwrap()
        .insert(NAME.to_owned(), file.to_vec());
    if verified.is_err() {
        let e = untouched();
        let loaded = load(&store, e, 1).expect("a damaged file is skipped, not an error");
        assert!(loaded.name.is_none(), "accepted a file `verify` refuses");
        assert_eq!(loaded.skipped.len(), 1, "the file was set aside");
        assert!(store.0.lock().unwrap().contains_key(&format!("{NAME}.bad")));
        if hash(file) % 64 == 0 {
            // One input in 64: counting takes every shard's lock.
            let s = e.stats();
            assert_eq!(
                (s.triplets, s.awl_clients),
                (0, 0),
                "a refused file loads nothing"
            );
        }
        return;
    }
    SHARED.with(|shared| {
        let mut shared = shared.borrow_mut();
        if shared.1 == LOADS_PER_ENGINE {
            *shared = (engine().0, 0);
        }
        shared.1 += 1;
        accepted(file, &store, &shared.0);
    });
    if round_trip_this(file) {
        round_trip(file);
    }
}

/// An accepted file: its checksums hold and its records are all accounted for.
fn accepted(file: &[u8], store: &MemStore, e: &Engine) {
    // The engine is shared (see `LOADS_PER_ENGINE`); counts are checked against an empty one
    // in `round_trip`.
    let Ok(loaded) = load(store, e, 1) else {
        // Refused as made with another key or other prefixes (the round trip checks that
        // nothing was loaded then).
        return;
    };
    assert!(loaded.name.is_some(), "a verified file is loaded");
    // Accepted: both checksums and the length hold.
    assert!(
        file.len() >= HEADER_LEN,
        "accepted a file shorter than a header"
    );
    assert_eq!(
        crc32c(&file[..header::HEADER_CRC.at]),
        le32(file, header::HEADER_CRC),
        "accepted a file whose header checksum fails"
    );
    assert_eq!(
        crc32c(&file[HEADER_LEN..]),
        le32(file, header::BODY_CRC),
        "accepted a file whose body checksum fails"
    );
    let (triplets, clients) = (le64(file, header::TRIPLETS), le64(file, header::CLIENTS));
    let implied = HEADER_LEN as u128
        + u128::from(triplets) * format::TRIPLET_LEN as u128
        + u128::from(clients) * format::AWL_LEN as u128
        + u128::from(le32(file, header::CLUSTER_LEN));
    assert_eq!(
        implied,
        file.len() as u128,
        "accepted a file of the wrong length"
    );
    assert_eq!((loaded.triplets + loaded.triplets_expired) as u64, triplets);
    assert_eq!((loaded.clients + loaded.clients_expired) as u64, clients);
}

/// Loaded into an empty engine, written, and loaded again: the same table.
fn round_trip(file: &[u8]) {
    let store = MemStore::default();
    store
        .0
        .lock()
        .unwrap()
        .insert(NAME.to_owned(), file.to_vec());
    let (first, _) = engine();
    let Ok(loaded) = load(&store, &first, 1) else {
        let s = first.stats();
        assert_eq!(
            (s.triplets, s.awl_clients),
            (0, 0),
            "a refused file loads nothing"
        );
        return;
    };
    let s = first.stats();
    // Records of one key replace each other, so the table holds at most what was loaded.
    assert!(s.triplets <= loaded.triplets && s.awl_clients <= loaded.clients);
    let again = MemStore::default();
    let mut w = Writer::new(again.clone()).unwrap();
    w.write_with(&first, &loaded.cluster)
        .expect("a loaded table is written");
    let (second, _) = engine();
    let reloaded = load(&again, &second, 1).expect("a written snapshot loads");
    assert!(reloaded.name.is_some(), "a written snapshot is accepted");
    assert_eq!(reloaded.cluster, loaded.cluster);
    assert_eq!(
        contents(&second),
        contents(&first),
        "written and loaded again, the table differs"
    );
}

/// Real snapshots written by the library: empty, a table with records in every state, and
/// one with a cluster section.
fn write_seeds(dir: &str) {
    let client = |i: u32| {
        if i % 3 == 0 {
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, i as u16, 0, 0, 0, 0, 1))
        } else {
            IpAddr::V4(Ipv4Addr::new(198, 51, (i % 200) as u8, 7))
        }
    };
    let check = |e: &Engine, i: u32, to: &str| {
        let from = format!("s{}@sender.example", i % 7);
        e.check(
            &Query::new(client(i), &from, &format!("{to}{i}@rcpt.example")),
            Mode::Record,
        );
    };
    let populated = |n: u32| {
        let (e, clock) = engine();
        (0..n).for_each(|i| check(&e, i, "r"));
        clock.advance(10);
        (0..n).step_by(2).for_each(|i| check(&e, i, "r"));
        clock.advance(6);
        (0..n).step_by(2).for_each(|i| check(&e, i, "other"));
        (0..n).step_by(2).for_each(|i| check(&e, i, "third"));
        (n..n + n / 4).for_each(|i| check(&e, i, "r"));
        e
    };
    let cluster = ClusterState {
        published_through: T0 - 5,
        peers: vec![
            ("mx1.example".into(), StreamId::new(1_700_000_000_000, 3)),
            ("mx-2".into(), StreamId::new(1_700_000_000_001, 0)),
        ],
    };
    let seeds = [
        ("empty", engine().0, ClusterState::default()),
        ("small", populated(6), ClusterState::default()),
        ("states", populated(24), ClusterState::default()),
        ("cluster", populated(4), cluster),
    ];
    for (name, e, state) in seeds {
        let store = MemStore::default();
        let w = Writer::new(store.clone())
            .unwrap()
            .write_with(&e, &state)
            .unwrap();
        let bytes = store.read(&w.name).unwrap();
        std::fs::write(format!("{dir}/{name}.snap"), bytes).unwrap();
    }
}

fuzz_target!(
    init: {
        if let Ok(dir) = std::env::var("GREYHOUND_FUZZ_SEEDS") {
            write_seeds(&dir);
            std::process::exit(0);
        }
    },
    |data: &[u8]| {
        check(data);
        if let Some(s) = sealed(data) {
            check(&s);
        }
    }
);
