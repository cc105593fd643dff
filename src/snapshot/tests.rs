//! Snapshot tests: round trip, corruption of every kind, torn writes at every step of the
//! write sequence under a crash model, rotation, refusal of foreign snapshots.

use super::*;
use crate::cluster::StreamId;
use crate::engine::{
    Clock, EngineConfig, HashSecret, ManualClock, Mode, Normalizer, Policy, Query, Secs,
};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex};

const T0: Secs = 90_000_000;
const SECRET: HashSecret = HashSecret(*b"snapshot-test-01");

/// Short durations, so a test sees every state and expiry within a few hundred seconds.
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

fn engine_at(now: Secs, secret: HashSecret, normalizer: Normalizer) -> (Engine, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(now));
    let e = Engine::new(
        EngineConfig {
            policy: policy(),
            normalizer,
            secret,
        },
        clock.clone(),
    );
    (e, clock)
}

fn engine(now: Secs) -> (Engine, Arc<ManualClock>) {
    engine_at(now, SECRET, Normalizer::default())
}

fn client(i: u32) -> IpAddr {
    if i % 3 == 0 {
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, i as u16, 0, 0, 0, 0, 1))
    } else {
        IpAddr::V4(Ipv4Addr::new(198, 51, (i % 200) as u8, 7))
    }
}

fn check(e: &Engine, i: u32, mode: Mode) -> crate::engine::Decision {
    let from = format!("s{}@sender.example", i % 97);
    let to = format!("r{i}@rcpt.example");
    e.check(&Query::new(client(i), &from, &to), mode)
}

/// Another triplet of the same client as `check(i)`.
fn check_alt(e: &Engine, i: u32) -> crate::engine::Decision {
    let to = format!("other{i}@rcpt.example");
    e.check(
        &Query::new(client(i), "alt@sender.example", &to),
        Mode::Record,
    )
}

/// Every record of an engine, sorted, for comparing two engines.
fn contents(e: &Engine) -> (Vec<TripletRecord>, Vec<AwlRecord>) {
    let mut t = Vec::new();
    e.for_each_triplet_shard(|it| t.extend(it.copied()));
    let mut c = Vec::new();
    e.for_each_client_shard(|it| c.extend(it.copied()));
    t.sort_by_key(|r| r.key.as_u128());
    c.sort_by_key(|r| r.key.as_u128());
    (t, c)
}

/// An engine with a mix of states: whitelisted, waiting, retry-ready, AWL clients.
fn populated(n: u32) -> (Engine, Arc<ManualClock>) {
    let (e, clock) = engine(T0);
    for i in 0..n {
        check(&e, i, Mode::Record);
        if i % 2 == 0 {
            check_alt(&e, i);
        }
    }
    clock.advance(10);
    for i in (0..n).step_by(2) {
        check(&e, i, Mode::Record); // whitelists half, and counts passes for their clients
    }
    clock.advance(6);
    for i in (1..n).step_by(4) {
        check(&e, i, Mode::Record);
    }
    for i in (0..n).step_by(2) {
        check_alt(&e, i); // a second counted pass: these clients are auto-whitelisted
    }
    for i in n..n + n / 4 {
        check(&e, i, Mode::Record); // new, waiting for their delay
    }
    (e, clock)
}

// ---------------------------------------------------------------------------------------------
// An in-memory store with a crash model.

#[derive(Debug, Clone, Default)]
struct Inode {
    /// What a reader sees now (the page cache).
    data: Vec<u8>,
    /// What is on the disk: the contents at the last fsync.
    durable: Vec<u8>,
}

#[derive(Debug, Default)]
struct MemInner {
    inodes: Vec<Inode>,
    /// The directory as a reader sees it now.
    names: BTreeMap<String, usize>,
    /// The directory as on the disk: as of the last directory fsync.
    durable_names: BTreeMap<String, usize>,
    ops: usize,
    fail_at: Option<usize>,
    crashed: bool,
}

/// What survives a crash.
#[derive(Debug, Clone, Copy)]
enum Crash {
    /// The process died (`kill -9`): everything it handed to the kernel survives.
    Process,
    /// The machine lost power: only fsynced data survives, and directory changes made since
    /// the last directory fsync are lost…
    Power,
    /// …or they reached the disk anyway (a journal commit can carry a rename before the
    /// data it names is on the disk; only an fsync before the rename rules that out).
    PowerKeepingRenames,
}

#[derive(Debug, Clone, Default)]
struct MemStore(Arc<Mutex<MemInner>>);

impl MemInner {
    /// Counts an operation; the one chosen to fail (and every later one) fails.
    fn op(&mut self) -> io::Result<bool> {
        if self.crashed {
            return Err(io::Error::other("crashed"));
        }
        self.ops += 1;
        if Some(self.ops) == self.fail_at {
            self.crashed = true;
            return Ok(false);
        }
        Ok(true)
    }
}

fn crashed() -> io::Error {
    io::Error::other("injected crash")
}

impl MemStore {
    fn ops(&self) -> usize {
        self.0.lock().unwrap().ops
    }

    /// The `n`-th operation from now fails, half done where that means anything.
    fn fail_after(&self, n: usize) {
        let mut m = self.0.lock().unwrap();
        m.fail_at = Some(m.ops + n);
    }

    /// The store a restarted process would find.
    fn after(&self, crash: Crash) -> MemStore {
        let m = self.0.lock().unwrap();
        let names = match crash {
            Crash::Process | Crash::PowerKeepingRenames => m.names.clone(),
            Crash::Power => m.durable_names.clone(),
        };
        let mut inner = MemInner::default();
        for (name, &ino) in &names {
            let f = &m.inodes[ino];
            let data = match crash {
                Crash::Process => f.data.clone(),
                Crash::Power | Crash::PowerKeepingRenames => f.durable.clone(),
            };
            inner.inodes.push(Inode {
                data: data.clone(),
                durable: data,
            });
            inner.names.insert(name.clone(), inner.inodes.len() - 1);
        }
        inner.durable_names = inner.names.clone();
        MemStore(Arc::new(Mutex::new(inner)))
    }

    fn put(&self, name: &str, data: Vec<u8>) {
        let mut m = self.0.lock().unwrap();
        m.inodes.push(Inode {
            data: data.clone(),
            durable: data,
        });
        let ino = m.inodes.len() - 1;
        m.names.insert(name.to_owned(), ino);
        m.durable_names.insert(name.to_owned(), ino);
    }

    fn get(&self, name: &str) -> Option<Vec<u8>> {
        let m = self.0.lock().unwrap();
        m.names.get(name).map(|&i| m.inodes[i].data.clone())
    }

    fn names(&self) -> Vec<String> {
        self.0.lock().unwrap().names.keys().cloned().collect()
    }
}

#[derive(Debug)]
struct MemFile {
    store: MemStore,
    ino: usize,
}

impl StoreFile for MemFile {
    fn append(&mut self, buf: &[u8]) -> io::Result<()> {
        let mut m = self.store.0.lock().unwrap();
        let whole = m.op()?;
        let n = if whole { buf.len() } else { buf.len() / 2 };
        m.inodes[self.ino].data.extend_from_slice(&buf[..n]);
        if whole {
            Ok(())
        } else {
            Err(crashed())
        }
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let mut m = self.store.0.lock().unwrap();
        let whole = m.op()?;
        let n = if whole { buf.len() } else { buf.len() / 2 };
        let data = &mut m.inodes[self.ino].data;
        let at = offset as usize;
        if data.len() < at + n {
            data.resize(at + n, 0);
        }
        data[at..at + n].copy_from_slice(&buf[..n]);
        if whole {
            Ok(())
        } else {
            Err(crashed())
        }
    }
    fn sync(&mut self) -> io::Result<()> {
        let mut m = self.store.0.lock().unwrap();
        if !m.op()? {
            return Err(crashed());
        }
        let f = &mut m.inodes[self.ino];
        f.durable = f.data.clone();
        Ok(())
    }
}

impl Store for MemStore {
    type File = MemFile;
    type Bytes = Vec<u8>;

    fn list(&self) -> io::Result<Vec<String>> {
        Ok(self.names())
    }
    fn create(&self, name: &str) -> io::Result<MemFile> {
        let mut m = self.0.lock().unwrap();
        if !m.op()? {
            return Err(crashed());
        }
        m.inodes.push(Inode::default());
        let ino = m.inodes.len() - 1;
        m.names.insert(name.to_owned(), ino);
        Ok(MemFile {
            store: self.clone(),
            ino,
        })
    }
    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let mut m = self.0.lock().unwrap();
        if !m.op()? {
            return Err(crashed());
        }
        let ino = m
            .names
            .remove(from)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        m.names.insert(to.to_owned(), ino);
        Ok(())
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        let mut m = self.0.lock().unwrap();
        if !m.op()? {
            return Err(crashed());
        }
        m.names
            .remove(name)
            .map(|_| ())
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
    }
    fn sync_dir(&self) -> io::Result<()> {
        let mut m = self.0.lock().unwrap();
        if !m.op()? {
            return Err(crashed());
        }
        m.durable_names = m.names.clone();
        Ok(())
    }
    fn read(&self, name: &str) -> io::Result<Vec<u8>> {
        self.get(name)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
    }
    fn display(&self, name: &str) -> String {
        format!("mem:{name}")
    }
}

// ---------------------------------------------------------------------------------------------

#[test]
fn names_classify_and_sort_by_generation() {
    assert_eq!(file_name(42), "snapshot-0000000042.snap");
    assert_eq!(
        classify("snapshot-0000000042.snap"),
        Some(Entry::Snapshot(42))
    );
    assert_eq!(
        classify(".snapshot-0000000042.snap.tmp"),
        Some(Entry::Temp(42))
    );
    assert_eq!(
        classify("snapshot-0000000042.snap.bad"),
        Some(Entry::Bad(42))
    );
    assert_eq!(
        classify("snapshot-99999999999.snap"),
        Some(Entry::Snapshot(99_999_999_999))
    );
    for other in [
        "hash.key",
        "snapshot-.snap",
        "snapshot-12a.snap",
        "snapshot-+1.snap",
        "snapshot-1.snap~",
        ".snapshot-1.snap",
        "snapshot-99999999999999999999999.snap",
    ] {
        assert_eq!(classify(other), None, "{other}");
    }
}

#[test]
fn write_then_load_restores_every_record() {
    let (e, clock) = populated(2000);
    let (t, c) = contents(&e);
    assert!(t.iter().any(|r| r.is_whitelisted()) && t.iter().any(|r| !r.is_whitelisted()));
    assert!(!c.is_empty());
    let store = MemStore::default();
    let w = Writer::new(store.clone()).unwrap().write(&e).unwrap();
    assert_eq!((w.triplets, w.clients), (t.len() as u64, c.len() as u64));
    assert_eq!(w.name, file_name(1));
    assert_eq!(store.get(&w.name).unwrap().len() as u64, w.bytes);

    let (e2, _) = engine(clock.now());
    let l = load(&store, &e2, 2).unwrap();
    assert_eq!(l.name.as_deref(), Some(w.name.as_str()));
    assert_eq!((l.triplets, l.clients), (t.len(), c.len()));
    assert_eq!((l.triplets_expired, l.clients_expired), (0, 0));
    assert_eq!(contents(&e2), (t, c));
    let (a, b) = (e.stats(), e2.stats());
    assert_eq!(
        (a.triplets, a.whitelisted, a.awl_clients, a.awl_active),
        (b.triplets, b.whitelisted, b.awl_clients, b.awl_active)
    );
}

#[test]
fn records_expired_by_load_time_are_dropped_and_timers_rearmed() {
    let (e, clock) = populated(400);
    let store = MemStore::default();
    Writer::new(store.clone()).unwrap().write(&e).unwrap();
    // Past the retry window: only whitelisted triplets and AWL clients survive.
    let later = clock.now() + 150;
    let (e2, clock2) = engine(later);
    let l = load(&store, &e2, 2).unwrap();
    let (t, _) = contents(&e2);
    assert!(l.triplets_expired > 0);
    assert!(t.iter().all(|r| r.is_whitelisted()));
    assert_eq!(t.len(), l.triplets);
    // The expiry wheel knows the loaded records: past the whitelist TTL, expiry empties it.
    clock2.advance(400);
    let removed = e2.expire(clock2.now()).removed;
    assert_eq!(removed, l.triplets + l.clients);
    assert_eq!(e2.stats().triplets + e2.stats().awl_clients, 0);
}

#[test]
fn writing_skips_records_already_expired() {
    let (e, clock) = populated(200);
    let before = contents(&e).0.len();
    clock.advance(150); // greylisted ones are dead but not yet removed by expiry
    let w = Writer::new(MemStore::default()).unwrap().write(&e).unwrap();
    assert!(w.triplets < before as u64);
    assert_eq!(
        contents(&e).0.len(),
        before,
        "writing does not change the table"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Whatever happened before a snapshot, the restored engine answers exactly as the
    /// original at every later time.
    #[test]
    fn restored_engine_decides_identically(
        before in prop::collection::vec((0u32..60, 0u32..20), 1..120),
        after in prop::collection::vec((0u32..80, 0u32..40, any::<bool>()), 1..120),
    ) {
        let (a, clock_a) = engine(T0);
        for (i, dt) in before {
            clock_a.advance(dt);
            check(&a, i, Mode::Record);
        }
        let store = MemStore::default();
        Writer::new(store.clone()).unwrap().write(&a).unwrap();
        let (b, clock_b) = engine(clock_a.now());
        load(&store, &b, 2).unwrap();
        for (i, dt, peek) in after {
            clock_a.advance(dt);
            clock_b.advance(dt);
            let mode = if peek { Mode::Peek } else { Mode::Record };
            prop_assert_eq!(check(&a, i, mode), check(&b, i, mode), "query {} at {}", i, clock_a.now());
            if dt > 30 {
                a.expire(clock_a.now());
                b.expire(clock_b.now());
            }
        }
    }
}

/// A replication state with a few peers, the longest id among them.
fn cluster_state(tag: u64) -> ClusterState {
    ClusterState {
        published_through: T0 + tag as Secs,
        peers: vec![
            ("b".into(), StreamId::new(1_795_000_000_000 + tag, 3)),
            (
                "mx-2.eu.example".into(),
                StreamId::new(1_795_000_000_123, tag),
            ),
            ("x".repeat(64), StreamId::ZERO),
        ],
    }
}

/// A snapshot with a non-empty cluster section.
fn one_snapshot() -> (MemStore, String, Vec<u8>) {
    let (e, _) = populated(300);
    let store = MemStore::default();
    let w = Writer::new(store.clone())
        .unwrap()
        .write_with(&e, &cluster_state(1))
        .unwrap();
    let bytes = store.get(&w.name).unwrap();
    (store, w.name, bytes)
}

/// Puts `section` in place of a file's cluster section and seals the file again (cluster
/// length, body and header checksums), as a writer with a bug would: only the section's own
/// checks can catch what is wrong with it.
fn with_section(file: &[u8], section: &[u8]) -> Vec<u8> {
    let mut h = Header::decode(file).unwrap();
    let start = file.len() - h.cluster_len as usize;
    let mut out = file[..start].to_vec();
    out.extend_from_slice(section);
    h.cluster_len = section.len() as u32;
    h.body_crc = crc32c::crc32c(&out[format::HEADER_LEN..]);
    out[..format::HEADER_LEN].copy_from_slice(&h.encode());
    out
}

/// A version 1 file as Greyhound wrote it before replication: built from the version 1
/// header table with literal offsets (not through `format::header`, so a change to the
/// current layout cannot change it), with the record layouts, which version 2 kept.
fn v1_file(e: &Engine, generation: u64) -> Vec<u8> {
    let (t, c) = contents(e);
    let mut body = Vec::new();
    t.iter().for_each(|r| format::encode_triplet(r, &mut body));
    c.iter().for_each(|r| format::encode_awl(r, &mut body));
    let mut h = [0u8; 128];
    let mut put = |at: usize, b: &[u8]| h[at..at + b.len()].copy_from_slice(b);
    let p = e.policy();
    put(0, b"GREYHSNP");
    put(8, &1u32.to_le_bytes());
    put(12, &128u32.to_le_bytes());
    put(16, &crate::engine::clock::to_unix(e.now()).to_le_bytes());
    put(24, &generation.to_le_bytes());
    put(32, &e.key_id().to_le_bytes());
    put(40, &[e.normalizer().ipv4_prefix()]);
    put(41, &[e.normalizer().ipv6_prefix()]);
    put(42, &1u16.to_le_bytes());
    put(44, &24u32.to_le_bytes());
    put(48, &32u32.to_le_bytes());
    put(56, &(t.len() as u64).to_le_bytes());
    put(64, &(c.len() as u64).to_le_bytes());
    put(72, &p.delay.to_le_bytes());
    put(76, &p.retry_window.to_le_bytes());
    put(80, &p.whitelist_ttl.to_le_bytes());
    put(84, &p.awl_clients.to_le_bytes());
    put(88, &p.awl_interval.to_le_bytes());
    put(92, &p.awl_ttl.to_le_bytes());
    put(96, &crc32c::crc32c(&body).to_le_bytes());
    let crc = crc32c::crc32c(&h[..124]);
    h[124..].copy_from_slice(&crc.to_le_bytes());
    let mut file = h.to_vec();
    file.extend_from_slice(&body);
    file
}

#[test]
fn every_flipped_byte_and_every_truncation_is_detected() {
    let (_, _, good) = one_snapshot();
    // The file ends with a cluster section of several peers: it is flipped and cut too.
    let view = format::verify(&good).unwrap();
    assert_eq!(view.cluster, cluster_state(1));
    assert_eq!(
        view.header.cluster_len as usize,
        format::cluster_len(&cluster_state(1))
    );
    for at in 0..good.len() {
        for bit in [0x01u8, 0x80] {
            let mut bad = good.clone();
            bad[at] ^= bit;
            assert!(
                format::verify(&bad).is_err(),
                "flip {bit:#x} at byte {at} not detected"
            );
        }
    }
    for len in 0..good.len() {
        assert!(
            format::verify(&good[..len]).is_err(),
            "truncation to {len} not detected"
        );
    }
    let mut longer = good.clone();
    longer.extend_from_slice(&[0; 24]);
    assert!(matches!(
        format::verify(&longer),
        Err(FormatError::Length { .. })
    ));
}

#[test]
fn damage_is_named_precisely() {
    let (_, _, good) = one_snapshot();
    let mut zeroed = good.clone();
    zeroed[..format::HEADER_LEN].fill(0);
    assert_eq!(format::verify(&zeroed).unwrap_err(), FormatError::Magic);
    let mut magic = good.clone();
    magic[0] = b'X';
    assert_eq!(format::verify(&magic).unwrap_err(), FormatError::Magic);
    assert_eq!(
        format::verify(&good[..10]).unwrap_err(),
        FormatError::ShortHeader { len: 10 }
    );
    // A newer version with a consistent header: named as a version, not as damage.
    let mut h = Header::decode(&good).unwrap();
    h.version = 3;
    let mut newer = good.clone();
    newer[..format::HEADER_LEN].copy_from_slice(&h.encode());
    assert_eq!(format::verify(&newer).unwrap_err(), FormatError::Version(3));
    // A version field damaged in place: the header checksum no longer holds.
    let mut damaged = good.clone();
    damaged[format::header::VERSION.at] = 7;
    assert_eq!(
        format::verify(&damaged).unwrap_err(),
        FormatError::Version(7)
    );
    let mut body = good.clone();
    *body.last_mut().unwrap() ^= 1;
    assert!(matches!(
        format::verify(&body),
        Err(FormatError::BodyChecksum { .. })
    ));
    let mut header = good.clone();
    header[format::header::TRIPLETS.at] ^= 1;
    assert!(matches!(
        format::verify(&header),
        Err(FormatError::HeaderChecksum { .. })
    ));
    assert!(matches!(
        format::verify(&good[..good.len() - 1]),
        Err(FormatError::Length { .. })
    ));
}

/// Two snapshots, the newer damaged in the given way: the older one is loaded (its records
/// and its cluster state), the newer renamed `.bad`, and nothing panics. Returns the reason
/// the newer one was skipped.
fn falls_back(damage: impl Fn(&mut Vec<u8>)) -> String {
    let (e, clock) = populated(300);
    let first = contents(&e);
    let store = MemStore::default();
    let mut w = Writer::new(store.clone()).unwrap();
    let w1 = w.write_with(&e, &cluster_state(1)).unwrap();
    clock.advance(1);
    for i in 1000..1100 {
        check(&e, i, Mode::Record);
    }
    let w2 = w.write_with(&e, &cluster_state(2)).unwrap();
    let mut bytes = store.get(&w2.name).unwrap();
    damage(&mut bytes);
    store.put(&w2.name, bytes);

    let (e2, _) = engine(clock.now());
    let l = load(&store, &e2, 2).unwrap();
    assert_eq!(l.name.as_deref(), Some(w1.name.as_str()));
    assert_eq!(l.skipped.len(), 1, "{:?}", l.skipped);
    assert_eq!(contents(&e2), first);
    assert_eq!(l.cluster, cluster_state(1));
    assert!(store.get(&format!("{}.bad", w2.name)).is_some());
    assert!(store.get(&w2.name).is_none());
    // The bad file never counts among the two kept: two more writes keep two good ones.
    let mut w = Writer::new(store.clone()).unwrap();
    let w3 = w.write(&e2).unwrap();
    let w4 = w.write(&e2).unwrap();
    assert!(
        w3.generation > w2.generation,
        "a bad file's generation is not reused"
    );
    let names = store.names();
    assert!(
        names.contains(&w3.name) && names.contains(&w4.name),
        "{names:?}"
    );
    assert!(!names.contains(&w1.name), "{names:?}");
    l.skipped[0].1.clone()
}

#[test]
fn fallback_on_flipped_byte_in_body() {
    falls_back(|b| {
        let at = b.len() - 30;
        b[at] ^= 0x10;
    });
}

#[test]
fn fallback_on_truncation() {
    falls_back(|b| b.truncate(b.len() / 2));
}

#[test]
fn fallback_on_damage_in_the_cluster_section() {
    // The last byte of the last peer's id: caught by the body checksum.
    let why = falls_back(|b| *b.last_mut().unwrap() ^= 0x01);
    assert!(why.starts_with("body checksum mismatch"), "{why}");
    // One byte of the section cut off.
    let why = falls_back(|b| {
        b.pop();
    });
    assert!(why.starts_with("truncated or padded"), "{why}");
}

#[test]
fn fallback_on_a_bad_peer_id_sealed_with_good_checksums() {
    let why = falls_back(|b| {
        let mut section = Vec::new();
        format::encode_cluster(&cluster_state(2), &mut section).unwrap();
        // The first peer's one-byte id "b" becomes "/".
        let at = format::CLUSTER_HEAD_LEN + format::PEER_FIXED_LEN;
        assert_eq!(section[at], b'b');
        section[at] = b'/';
        *b = with_section(b, &section);
    });
    assert_eq!(
        why,
        "cluster section: peer entry 0 has an invalid node id \"/\" (not [A-Za-z0-9_.-]{1,64})"
    );
}

#[test]
fn fallback_on_an_over_long_cluster_section() {
    // Longer than any valid section: refused from the header alone.
    let why = falls_back(|b| {
        let mut h = Header::decode(b).unwrap();
        h.cluster_len = format::MAX_CLUSTER_LEN as u32 + 1;
        b[..format::HEADER_LEN].copy_from_slice(&h.encode());
    });
    assert!(
        why.starts_with("cluster section of 331785 bytes, longer than the largest valid one"),
        "{why}"
    );
    // A valid section with one byte too many, sealed: the entries must end the section.
    let why = falls_back(|b| {
        let mut section = Vec::new();
        format::encode_cluster(&cluster_state(2), &mut section).unwrap();
        section.push(0);
        *b = with_section(b, &section);
    });
    assert_eq!(why, "cluster section has 1 bytes after its last peer entry");
    // A peer count beyond the limit.
    let why = falls_back(|b| {
        let mut section = vec![0u8; format::CLUSTER_HEAD_LEN];
        section[format::cluster::PEERS.range()].copy_from_slice(&4097u32.to_le_bytes());
        *b = with_section(b, &section);
    });
    assert_eq!(
        why,
        "cluster section lists 4097 peers, more than the 4096 allowed"
    );
}

#[test]
fn cluster_state_round_trips_through_a_real_write_and_load() {
    let dir = tempfile::tempdir().unwrap();
    let (e, clock) = populated(300);
    let mut w = Writer::new(DirStore::new(dir.path())).unwrap();
    let state = cluster_state(7);
    let written = w.write_with(&e, &state).unwrap();
    assert_eq!(
        written.bytes,
        (format::HEADER_LEN
            + format::TRIPLET_LEN * written.triplets as usize
            + format::AWL_LEN * written.clients as usize
            + format::cluster_len(&state)) as u64
    );
    let (e2, _) = engine(clock.now());
    let l = load(&DirStore::new(dir.path()), &e2, 2).unwrap();
    assert_eq!(l.name.as_deref(), Some(written.name.as_str()));
    assert_eq!(l.cluster, state);
    assert_eq!(contents(&e2), contents(&e));

    // `write` saves an empty state, which loads as the default.
    let plain = w.write(&e).unwrap();
    let (e3, _) = engine(clock.now());
    let l = load(&DirStore::new(dir.path()), &e3, 2).unwrap();
    assert_eq!(l.name.as_deref(), Some(plain.name.as_str()));
    assert_eq!(l.cluster, ClusterState::default());
    assert_eq!(contents(&e3), contents(&e));
}

#[test]
fn a_cluster_state_the_reader_would_refuse_is_never_written() {
    let (e, _) = populated(20);
    let store = MemStore::default();
    let mut w = Writer::new(store.clone()).unwrap();
    let mut bad_id = cluster_state(1);
    bad_id.peers[1].0 = "mx 2".into();
    let mut twice = cluster_state(1);
    twice.peers[2].0 = "b".into();
    let too_many = ClusterState {
        published_through: 0,
        peers: (0..=format::MAX_PEERS)
            .map(|i| (format!("n{i}"), StreamId::ZERO))
            .collect(),
    };
    for (state, expected) in [
        (
            bad_id,
            ClusterError::BadPeerId {
                index: 1,
                id: "mx 2".into(),
            },
        ),
        (twice, ClusterError::DuplicatePeer { id: "b".into() }),
        (
            too_many,
            ClusterError::TooManyPeers {
                count: format::MAX_PEERS as u64 + 1,
            },
        ),
    ] {
        match w.write_with(&e, &state) {
            Err(SnapshotError::Cluster(got)) => assert_eq!(got, expected),
            other => panic!("{other:?}"),
        }
    }
    assert!(store.names().is_empty(), "{:?}", store.names());
    let err = w.write_with(
        &e,
        &ClusterState {
            published_through: 0,
            peers: vec![(String::new(), StreamId::ZERO)],
        },
    );
    assert!(
        err.unwrap_err()
            .to_string()
            .starts_with("snapshot not written: cannot save the cluster state: cluster section: peer entry 0 has an invalid node id \"\""),
    );
    // The writer still works afterwards.
    assert!(w.write_with(&e, &cluster_state(1)).is_ok());
}

#[test]
fn version_1_files_still_load_with_an_empty_cluster_state() {
    let (e, clock) = populated(300);
    let store = MemStore::default();
    store.put(&file_name(5), v1_file(&e, 5));
    let view = format::verify(store.get(&file_name(5)).as_deref().unwrap())
        .map(|v| (v.header.version, v.header.cluster_len, v.cluster))
        .unwrap();
    assert_eq!(view, (1, 0, ClusterState::default()));
    let (e2, _) = engine(clock.now());
    let l = load(&store, &e2, 2).unwrap();
    assert_eq!(l.name.as_deref(), Some(file_name(5).as_str()));
    assert!(l.skipped.is_empty(), "{:?}", l.skipped);
    assert_eq!(l.cluster, ClusterState::default());
    let (t, c) = contents(&e);
    assert!(!t.is_empty() && !c.is_empty());
    assert_eq!((l.triplets, l.clients), (t.len(), c.len()));
    assert_eq!(contents(&e2), (t, c));

    // The next snapshot is version 2 and is preferred; the version 1 file is kept in the
    // rotation until two newer ones exist.
    let mut w = Writer::new(store.clone()).unwrap();
    let w6 = w.write_with(&e2, &cluster_state(3)).unwrap();
    assert_eq!(w6.generation, 6);
    let bytes = store.get(&w6.name).unwrap();
    assert_eq!(Header::decode(&bytes).unwrap().version, format::VERSION);
    let (e3, _) = engine(clock.now());
    assert_eq!(load(&store, &e3, 1).unwrap().cluster, cluster_state(3));
    assert!(store.get(&file_name(5)).is_some());
}

#[test]
fn a_version_1_file_with_a_cluster_section_is_refused() {
    // Version 1 has no cluster section: a version 1 header with a cluster length, or with
    // bytes after the last record, is not a file any Greyhound wrote.
    let (e, _) = populated(50);
    let good = v1_file(&e, 1);
    let mut h = good[..format::HEADER_LEN].to_vec();
    h[format::header::CLUSTER_LEN.at] = 8;
    let crc = crc32c::crc32c(&h[..format::header::HEADER_CRC.at]);
    h[format::header::HEADER_CRC.range()].copy_from_slice(&crc.to_le_bytes());
    let mut with_len = h.clone();
    with_len.extend_from_slice(&good[format::HEADER_LEN..]);
    with_len.extend_from_slice(&[0; 8]);
    assert_eq!(
        format::verify(&with_len).unwrap_err(),
        FormatError::Reserved {
            at: format::header::CLUSTER_LEN.at
        }
    );
    let mut trailing = good.clone();
    trailing.extend_from_slice(&[0; 8]);
    assert!(matches!(
        format::verify(&trailing),
        Err(FormatError::Length { .. })
    ));
}

#[test]
fn every_flipped_byte_and_every_truncation_of_a_version_1_file_is_detected() {
    let (e, _) = populated(40);
    let good = v1_file(&e, 1);
    assert!(format::verify(&good).is_ok());
    for at in 0..good.len() {
        let mut bad = good.clone();
        bad[at] ^= 0x01;
        assert!(
            format::verify(&bad).is_err(),
            "flip at byte {at} not detected"
        );
    }
    for len in 0..good.len() {
        assert!(format::verify(&good[..len]).is_err(), "truncation to {len}");
    }
}

#[test]
fn fallback_on_zeroed_header() {
    falls_back(|b| b[..format::HEADER_LEN].fill(0));
}

#[test]
fn fallback_on_empty_file() {
    falls_back(|b| b.clear());
}

#[test]
fn fallback_on_wrong_version() {
    falls_back(|b| {
        let mut h = Header::decode(b).unwrap();
        h.version = 9;
        b[..format::HEADER_LEN].copy_from_slice(&h.encode());
    });
}

#[test]
fn no_usable_snapshot_starts_empty() {
    let store = MemStore::default();
    store.put(&file_name(3), b"GREYHSNP garbage".to_vec());
    store.put(&file_name(2), Vec::new());
    let (e, _) = engine(T0);
    let l = load(&store, &e, 2).unwrap();
    assert_eq!(l.name, None);
    assert_eq!(l.skipped.len(), 2);
    assert_eq!(e.stats().triplets, 0);
}

#[test]
fn foreign_snapshots_are_refused_not_mixed_in() {
    let (_, name, bytes) = one_snapshot();
    let store = MemStore::default();
    store.put(&name, bytes);
    let other_key = engine_at(T0, HashSecret(*b"another-secret-2"), Normalizer::default()).0;
    let err = load(&store, &other_key, 2).unwrap_err().to_string();
    assert!(
        err.contains("another hash key") && err.contains(&name),
        "{err}"
    );
    assert_eq!(other_key.stats().triplets, 0);
    let other_prefix = engine_at(T0, SECRET, Normalizer::new(28, 64).unwrap()).0;
    let err = load(&store, &other_prefix, 2).unwrap_err().to_string();
    assert!(
        err.contains("ipv4-prefix 24") && err.contains("28"),
        "{err}"
    );
    assert_eq!(other_prefix.stats().triplets, 0);
    // The file stays where it is: it is not damaged, only not ours to load.
    assert!(store.get(&name).is_some());
}

#[test]
fn two_newest_are_kept_and_stale_temp_files_removed() {
    let (e, _) = populated(50);
    let store = MemStore::default();
    store.put(".snapshot-0000000007.snap.tmp", vec![1, 2, 3]);
    store.put("hash.key", b"key".to_vec());
    let mut w = Writer::new(store.clone()).unwrap();
    let gens: Vec<u64> = (0..4).map(|_| w.write(&e).unwrap().generation).collect();
    assert_eq!(gens, [8, 9, 10, 11]);
    assert_eq!(
        store.names(),
        [
            "hash.key",
            "snapshot-0000000010.snap",
            "snapshot-0000000011.snap"
        ]
    );
    // Loading removes what an interrupted write left.
    store.put(".snapshot-0000000012.snap.tmp", vec![0; 10]);
    let (e2, _) = engine(T0);
    let l = load(&store, &e2, 1).unwrap();
    assert_eq!(l.removed_temp, [".snapshot-0000000012.snap.tmp"]);
    assert_eq!(l.name.as_deref(), Some("snapshot-0000000011.snap"));
}

/// Stops a write at every step of its sequence (a torn append or header write, a missing
/// fsync, rename or directory fsync, a failed removal), then looks at what a killed process
/// and what a power loss would leave: the loader must always find a complete snapshot, the
/// new one or the previous one, and exactly its records.
#[test]
fn torn_writes_at_every_step_lose_nothing_of_the_last_complete_snapshot() {
    let (e, clock) = populated(200);
    let base = MemStore::default();
    let mut w = Writer::new(base.clone()).unwrap();
    w.write_with(&e, &cluster_state(1)).unwrap();
    // Two complete snapshots: the next write also removes one.
    w.write_with(&e, &cluster_state(1)).unwrap();
    let old = (contents(&e), cluster_state(1));
    clock.advance(1);
    for i in 500..600 {
        check(&e, i, Mode::Record);
    }
    let new = (contents(&e), cluster_state(2));
    assert_ne!(old.0, new.0);

    // How many operations a full write takes.
    let probe = base.after(Crash::Process);
    let start = probe.ops();
    Writer::new(probe.clone())
        .unwrap()
        .write_with(&e, &new.1)
        .unwrap();
    let steps = probe.ops() - start;
    assert!(
        steps >= 8,
        "create, append ×2, header, fsync, rename, fsync dir, remove: {steps}"
    );

    for fail in 1..=steps + 1 {
        let store = base.after(Crash::Process);
        let mut w = Writer::new(store.clone()).unwrap();
        store.fail_after(fail);
        // Success means the directory fsync returned: the new snapshot is durable.
        let durable = w.write_with(&e, &new.1).is_ok();
        for crash in [Crash::Process, Crash::Power, Crash::PowerKeepingRenames] {
            let after = store.after(crash);
            let (e2, _) = engine(clock.now());
            let l =
                load(&after, &e2, 2).unwrap_or_else(|err| panic!("step {fail}, {crash:?}: {err}"));
            assert!(l.name.is_some(), "step {fail}, {crash:?}: nothing loaded");
            let got = (contents(&e2), l.cluster.clone());
            assert!(
                got == old || got == new,
                "step {fail}, {crash:?}: loaded neither snapshot"
            );
            if durable {
                assert_eq!(
                    got, new,
                    "step {fail}, {crash:?}: a completed write was lost"
                );
            }
            assert!(
                l.skipped.is_empty(),
                "step {fail}, {crash:?}: {:?}",
                l.skipped
            );
        }
    }
}

#[test]
fn real_directory_round_trip_through_the_memory_map() {
    let dir = tempfile::tempdir().unwrap();
    let (e, clock) = populated(500);
    let mut w = Writer::new(DirStore::new(dir.path())).unwrap();
    let written = w.write(&e).unwrap();
    let path = dir.path().join(&written.name);
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), written.bytes);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let (e2, _) = engine(clock.now());
    let l = load(&DirStore::new(dir.path()), &e2, 2).unwrap();
    assert_eq!(l.name.as_deref(), Some(written.name.as_str()));
    assert_eq!(contents(&e2), contents(&e));

    // Empty and truncated files on disk are handled the same way as in memory.
    let second = w.write(&e).unwrap();
    let p2 = dir.path().join(&second.name);
    std::fs::write(&p2, b"").unwrap();
    let (e3, _) = engine(clock.now());
    let l = load(&DirStore::new(dir.path()), &e3, 2).unwrap();
    assert_eq!(l.name.as_deref(), Some(written.name.as_str()));
    assert!(dir.path().join(format!("{}.bad", second.name)).exists());
}

#[test]
fn inspect_counts_states_and_reports_damage() {
    let (e, clock) = populated(400);
    let (t, c) = contents(&e);
    let (_, name, bytes) = {
        let store = MemStore::default();
        let w = Writer::new(store.clone())
            .unwrap()
            .write_with(&e, &cluster_state(1))
            .unwrap();
        let b = store.get(&w.name).unwrap();
        (store, w.name, b)
    };
    assert!(name.starts_with("snapshot-"));
    let now_unix = crate::engine::clock::to_unix(clock.now());
    let r = inspect::inspect(&bytes, now_unix);
    assert!(r.ok());
    let counts = r.counts.unwrap();
    let p = policy();
    let now = clock.now();
    let whitelisted = t.iter().filter(|r| r.is_whitelisted()).count() as u64;
    let waiting = t
        .iter()
        .filter(|r| !r.is_whitelisted() && now < r.first_seen() + p.delay)
        .count() as u64;
    assert_eq!(counts.whitelisted, whitelisted);
    assert_eq!(counts.waiting, waiting);
    assert_eq!(
        counts.whitelisted + counts.waiting + counts.retry_ready,
        t.len() as u64
    );
    assert_eq!(counts.awl_active + counts.awl_counting, c.len() as u64);
    assert!(counts.awl_active > 0 && counts.retry_ready > 0);
    let text = r.to_string();
    assert!(text.contains("checksum:     ok"), "{text}");
    assert!(
        text.contains(&format!("triplets:     {}", t.len())),
        "{text}"
    );
    assert_eq!(r.cluster, Some(cluster_state(1)));
    assert!(text.contains("version:      2\n"), "{text}");
    // T0 + 1 engine seconds = Unix 1 794 067 201 = 2026-11-07T16:00:01Z.
    assert!(
        text.contains(
            "published:    every change through 2026-11-07T16:00:01Z (engine second 90000001)\n"
        ),
        "{text}"
    );
    assert!(
        text.contains("peers:        3 (last stream entry applied)\n"),
        "{text}"
    );
    assert!(
        text.contains("\n  b                        1795000000001-3\n"),
        "{text}"
    );
    assert!(
        text.contains("\n  mx-2.eu.example          1795000000123-1\n"),
        "{text}"
    );
    assert!(
        text.contains(&format!("\n  {} 0-0\n", "x".repeat(64))),
        "{text}"
    );

    // A version 1 file has no cluster section; a version 2 one written with clustering off
    // has an empty one.
    let v1 = inspect::inspect(&v1_file(&e, 1), now_unix);
    assert!(v1.ok() && v1.cluster.is_none());
    let text = v1.to_string();
    assert!(text.contains("version:      1\n"), "{text}");
    assert!(
        text.contains("cluster:      none (version 1 file)\n"),
        "{text}"
    );
    let store = MemStore::default();
    let w = Writer::new(store.clone()).unwrap().write(&e).unwrap();
    let off = inspect::inspect(&store.get(&w.name).unwrap(), now_unix);
    assert_eq!(off.cluster, Some(ClusterState::default()));
    let text = off.to_string();
    assert!(
        text.contains("published:    nothing known\npeers:        none\n"),
        "{text}"
    );

    // Later, by the snapshot's own settings, the greylisted records have expired.
    let later = inspect::inspect(&bytes, now_unix + 150).counts.unwrap();
    assert_eq!(later.triplets_expired, t.len() as u64 - whitelisted);

    let mut bad = bytes.clone();
    let at = bad.len() - 5;
    bad[at] ^= 4;
    let r = inspect::inspect(&bad, now_unix);
    assert!(!r.ok());
    assert!(r.header.is_some() && r.counts.is_none());
    assert!(r
        .to_string()
        .contains("checksum:     BAD: body checksum mismatch"));
}
