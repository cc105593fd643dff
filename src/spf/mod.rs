//! The `spf` client identity (DESIGN §11): does the client address pass SPF (RFC 7208
//! `check_host`) for the sender's domain? If so, the request's client identity is the domain's
//! sender pool, `spf:<domain>`, and a retry from another address of the pool finds its triplet.
//!
//! ```text
//!   cached(ip, domain) ──► lower-case + keyed hash ─► home set (one line, no lock) ─► Some
//!                                                     └ miss: name checked ─► None / false
//!
//!   check(ip, domain, …)   miss ─► in flight for this key? ── yes ─► wait on it ─┐
//!                                         │ no                                  ├─► ≤ timeout
//!                                         └─► spawn lookup ─► wait on it ───────┘
//!   lookup task: mail-auth check_host ─► hickory (--dns-server or resolv.conf)
//!                ─► void-lookup limit ─► cache (TTL clamped) ─► wake the waiters
//! ```
//!
//! **Why the cache is ours.** hickory caches DNS records (keyed by name, so it serves every
//! address of a pool), but a `check_host` result costs up to a dozen of its lookups, each an
//! `await`, and the request path needs the *result* for (address, domain) synchronously and
//! cheaply, within a bounded memory the operator chooses. [`Spf::cached`] is one keyed hash and
//! one read of a sequence-locked set, no lock taken and no `await`; see [`cache`] for the table
//! (16 bytes per entry, grows with its contents up to its bound, then evicts the
//! soonest-to-expire entry). A batch of requests reads
//! it through one [`CacheReader`]: one clock read and one counter update per batch.
//!
//! **TTL.** A result lives as long as the shortest TTL among the DNS answers it read (the TXT
//! records, and the A/AAAA/MX records of `a`, `mx`, `include`…), clamped to
//! [[`MIN_TTL`], [`MAX_TTL`]]: at least a minute, so records with tiny TTLs do not turn every
//! retry into DNS traffic; at most six hours, so a pool that drops an address stops vouching for
//! it within a working day. A result read from no answer with a TTL (the domain has no TXT
//! record: NXDOMAIN) lives [`NEGATIVE_TTL`]. A temporary error lives only [`TEMPERROR_TTL`],
//! so a DNS outage is retried soon but not on every request.
//!
//! **Timeouts.** A request whose result is not cached waits at most `--spf-timeout`. On timeout
//! [`Spf::check`] answers `None` (counted); the caller falls back to the next client identity
//! (`name` or `prefix`), as §11 says. The lookup itself runs on its own task and carries on: it
//! fills the cache even after every waiter gave up, so the sender's retry (minutes later)
//! usually finds the result cached. A timed-out first attempt is recorded under the fallback
//! identity, which every later request also looks up (§11), so the cost to the sender is at most
//! one more greylisting round if its retry then comes from another address of its pool.
//! Each lookup is bounded on its own too: hickory's per-query timeout ([`DNS_QUERY_TIMEOUT`],
//! [`DNS_ATTEMPTS`]) and a deadline for the whole evaluation ([`LOOKUP_DEADLINE`]), after which
//! it is a temperror. At most [`MAX_IN_FLIGHT`] lookups run at once; past that a request gets
//! `None` at once (counted as shed), so a DNS outage under a flood cannot pile up tasks.
//!
//! **Limits.** `mail-auth` 0.13 (`src/spf/verify.rs`) enforces the 10-lookup limit of RFC 7208
//! §4.6.4 (so an `include:` loop ends in permerror after 10 lookups), at most 10 MX exchanges
//! per `mx`, and 20 s of wall clock; the limit of two void lookups it lacks is enforced here
//! ([`hooks`]). Only
//! `pass` pools; fail, softfail, neutral, none, permerror and temperror all answer `false`.
//! The key is (address, domain): the sender's local part and the HELO name only feed macros,
//! which real pools do not key on.

pub mod cache;
pub mod hooks;

use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ahash::AHashMap;
use mail_auth::hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use mail_auth::hickory_resolver::system_conf::read_system_conf;
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{MessageAuthenticator, Parameters, SpfResult};
use tokio::sync::watch;

use cache::{Cache, Inserted};
use hooks::Tracker;

/// Default bound on cached results: 1 Mi entries × 16 bytes = 16 MiB at most; the table starts
/// at 64 KiB in use (one 2 MiB huge page where the kernel grants them) and grows with its
/// contents ([`cache`]).
pub const DEFAULT_CACHE_ENTRIES: usize = 1 << 20;

/// Default `--spf-timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(500);

/// Shortest time a result is kept, whatever the TTLs.
pub const MIN_TTL: Duration = Duration::from_secs(60);
/// Longest time a result is kept, whatever the TTLs.
pub const MAX_TTL: Duration = Duration::from_secs(6 * 3600);
/// Time a result is kept when no answer it read carried a TTL (NXDOMAIN / no data: the
/// negative TTL is not passed on by `mail-auth`). Clamped like the others.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(300);
/// Time a temperror is kept (not raised to [`MIN_TTL`]): long enough that an outage is not
/// asked about on every request, short enough that a recovered server is used soon.
pub const TEMPERROR_TTL: Duration = Duration::from_secs(10);

/// hickory's timeout for one query to one server (its default, 5 s, would let one lookup of a
/// long `include` chain run for minutes).
pub const DNS_QUERY_TIMEOUT: Duration = Duration::from_secs(2);
/// hickory's retries of a failed query.
pub const DNS_ATTEMPTS: usize = 1;
/// The whole evaluation's deadline (up to ~20 queries one after another), after which it is a
/// temperror.
pub const LOOKUP_DEADLINE: Duration = Duration::from_secs(10);
/// Lookups running at once, at most. Each holds a task of a few KiB; 4096 cover ~40 k new
/// (address, domain) pairs per second at a 100 ms DNS round trip.
pub const MAX_IN_FLIGHT: usize = 4096;

/// `%{r}` (the checking host's name) in explanations; RFC 7208 §7.3 allows "unknown".
const HOST_DOMAIN: &str = "unknown";

/// The SPF identity's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpfConfig {
    /// `--dns-server ADDR[:PORT]`; None = the system's resolver (/etc/resolv.conf).
    pub dns_server: Option<SocketAddr>,
    /// `--spf-timeout` (default 500 ms): the longest a request waits for a result.
    pub timeout: Duration,
    /// Bound on cached (address, domain) results (default [`DEFAULT_CACHE_ENTRIES`]; 16 bytes
    /// each, rounded up to a power of two of sets of 4 per shard, in 64 shards).
    pub cache_entries: usize,
}

impl Default for SpfConfig {
    fn default() -> Self {
        Self {
            dns_server: None,
            timeout: DEFAULT_TIMEOUT,
            cache_entries: DEFAULT_CACHE_ENTRIES,
        }
    }
}

/// Why the SPF identity could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SpfError {
    /// The system's resolver configuration is unreadable or empty.
    #[error("cannot read the system's DNS resolver configuration (/etc/resolv.conf): {0}")]
    SystemConf(String),
    /// hickory refused the configuration.
    #[error("cannot set up the DNS resolver: {0}")]
    Resolver(String),
    /// A `--dns-server` value that is not `ADDR`, `ADDR:PORT`, `[V6]` or `[V6]:PORT`.
    #[error("bad DNS server {0:?}: expected an IP address with an optional :PORT (default 53)")]
    BadServer(String),
    /// The result cache's memory could not be reserved.
    #[error("cannot reserve memory for the SPF result cache: {0}")]
    Cache(String),
}

/// Parses `--dns-server ADDR[:PORT]` (IPv6 as `::1`, `[::1]` or `[::1]:5353`); port 53 if
/// none is given.
pub fn parse_dns_server(s: &str) -> Result<SocketAddr, SpfError> {
    let bad = || SpfError::BadServer(s.to_string());
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok(sa);
    }
    let bare = s
        .strip_prefix('[')
        .and_then(|v| v.strip_suffix(']'))
        .unwrap_or(s);
    bare.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, 53))
        .map_err(|_| bad())
}

/// The result kinds of `check_host`, as stored in the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Kind {
    Pass = 1,
    Fail,
    SoftFail,
    Neutral,
    None,
    PermError,
    TempError,
}

impl From<SpfResult> for Kind {
    fn from(r: SpfResult) -> Self {
        match r {
            SpfResult::Pass => Kind::Pass,
            SpfResult::Fail => Kind::Fail,
            SpfResult::SoftFail => Kind::SoftFail,
            SpfResult::Neutral => Kind::Neutral,
            SpfResult::None => Kind::None,
            SpfResult::PermError => Kind::PermError,
            SpfResult::TempError => Kind::TempError,
        }
    }
}

/// Results by kind, as counted when lookups finish.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpfResults {
    /// `pass`: the only result that pools.
    pub pass: u64,
    /// `fail` (`-all`).
    pub fail: u64,
    /// `softfail` (`~all`).
    pub softfail: u64,
    /// `neutral` (`?all`, or no mechanism matched).
    pub neutral: u64,
    /// `none`: no SPF record.
    pub none: u64,
    /// `permerror`: a broken record, a loop, over 10 lookups or over 2 void lookups.
    pub permerror: u64,
    /// `temperror`: DNS failed or the lookup ran past [`LOOKUP_DEADLINE`].
    pub temperror: u64,
}

/// Counters since [`Spf::new`]; the server turns them into metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpfStats {
    /// Lookups (SPF evaluations) started.
    pub lookups: u64,
    /// Answers from the cache (by [`Spf::cached`] and counting [`CacheReader`]s only).
    pub hits: u64,
    /// Cache misses (by [`Spf::cached`] and counting [`CacheReader`]s only: the server reads
    /// once per request, then calls [`Spf::check`] for a miss, which does not count).
    pub misses: u64,
    /// `check` calls that gave up waiting after the timeout (`greyhound_spf_timeouts_total`).
    pub timeouts: u64,
    /// `check` calls that waited on a lookup another call had started.
    pub joins: u64,
    /// `check` calls answered `None` at once because [`MAX_IN_FLIGHT`] lookups were running.
    pub shed: u64,
    /// Domains answered `false` at once, without DNS: empty, over 253 bytes, not a valid
    /// multi-label DNS name, or an IP literal.
    pub invalid: u64,
    /// Entries in the cache (live, or expired and not yet reused).
    pub entries: u64,
    /// Live entries pushed out of a full set.
    pub evictions: u64,
    /// Results turned into permerror by the void-lookup limit (also in `results.permerror`).
    pub void_limit: u64,
    /// Finished lookups by result.
    pub results: SpfResults,
}

#[derive(Default)]
struct Counters {
    lookups: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    timeouts: AtomicU64,
    joins: AtomicU64,
    shed: AtomicU64,
    invalid: AtomicU64,
    evictions: AtomicU64,
    void_limit: AtomicU64,
    /// Indexed by `Kind as usize - 1`.
    results: [AtomicU64; 7],
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Lookups in flight, by key hash: a second `check` of the same key waits on the first.
type InFlight = Mutex<AHashMap<u64, watch::Receiver<Option<bool>>>>;

struct Inner {
    auth: MessageAuthenticator,
    cache: Cache,
    in_flight: Box<[InFlight]>,
    running: AtomicUsize,
    counters: Counters,
    /// Keys the cache's hash; random per process, so entries cannot be aimed at one set.
    secret: ahash::RandomState,
    /// The cache's clock starts here (whole seconds since).
    epoch: Instant,
    min_ttl: Duration,
    max_ttl: Duration,
}

/// A request's cache key: (address, lower-cased domain), hashed ([`Spf::key`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpfKey(u64);

/// The SPF identity's resolver and result cache. `Send + Sync`; the server holds it in an `Arc`.
pub struct Spf {
    inner: Arc<Inner>,
    timeout: Duration,
}

impl std::fmt::Debug for Spf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spf")
            .field("timeout", &self.timeout)
            .field("capacity", &self.capacity())
            .finish_non_exhaustive()
    }
}

impl Spf {
    /// Builds the resolver (no runtime needed: hickory connects on the first query) and an
    /// empty cache. `--dns-server` is that one server, UDP with a TCP retry on truncation or
    /// error; otherwise the system's resolvers from /etc/resolv.conf.
    pub fn new(cfg: SpfConfig) -> Result<Spf, SpfError> {
        let SpfConfig {
            dns_server,
            timeout,
            cache_entries,
        } = cfg;
        let (config, mut opts) = match dns_server {
            Some(addr) => {
                let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
                for c in &mut ns.connections {
                    c.port = addr.port();
                }
                (
                    ResolverConfig::from_parts(None, vec![], vec![ns]),
                    ResolverOpts::default(),
                )
            }
            None => read_system_conf().map_err(|e| SpfError::SystemConf(e.to_string()))?,
        };
        opts.timeout = DNS_QUERY_TIMEOUT;
        opts.attempts = DNS_ATTEMPTS;
        opts.try_tcp_on_error = true;
        let auth = MessageAuthenticator::new(config, opts)
            .map_err(|e| SpfError::Resolver(e.to_string()))?;
        let rs = std::collections::hash_map::RandomState::new();
        let secret = ahash::RandomState::with_seeds(
            rs.hash_one(1u8),
            rs.hash_one(2u8),
            rs.hash_one(3u8),
            rs.hash_one(4u8),
        );
        Ok(Spf {
            inner: Arc::new(Inner {
                auth,
                cache: Cache::new(cache_entries).map_err(|e| SpfError::Cache(e.to_string()))?,
                in_flight: (0..cache::SHARDS).map(|_| InFlight::default()).collect(),
                running: AtomicUsize::new(0),
                counters: Counters::default(),
                secret,
                epoch: Instant::now(),
                min_ttl: MIN_TTL,
                max_ttl: MAX_TTL,
            }),
            timeout,
        })
    }

    /// Replaces the TTL clamp (default [[`MIN_TTL`], [`MAX_TTL`]]); the tests use seconds to
    /// see entries expire. Call before sharing the value.
    pub fn with_ttl_bounds(mut self, min: Duration, max: Duration) -> Self {
        let inner = Arc::get_mut(&mut self.inner).expect("with_ttl_bounds before sharing");
        inner.min_ttl = min.min(max);
        inner.max_ttl = max;
        self
    }

    /// The cache's bound, after rounding up to whole sets.
    pub fn capacity(&self) -> usize {
        self.inner.cache.capacity()
    }

    /// The cached result for (ip, domain) if still fresh: `Some(true)` = the address passes SPF
    /// for the domain, `Some(false)` = any other result (or an invalid domain); `None` = not
    /// cached or expired. No DNS, no `await`, no lock: one keyed hash and one set read.
    pub fn cached(&self, ip: IpAddr, domain: &str) -> Option<bool> {
        let mut reader = self.reader(true);
        match self.key(ip, domain) {
            Some(key) => reader.get(key, || domain),
            None => Some(false),
        }
    }

    /// The cache key of (ip, domain), computed once for a request that is then prefetched
    /// ([`Spf::prefetch`]) and looked up ([`CacheReader::get`]); `None` for a name too long
    /// for DNS (answered `false` without DNS; counted as invalid). The name is not checked
    /// further here: only a miss needs to be ([`CacheReader::get`] does).
    pub fn key(&self, ip: IpAddr, domain: &str) -> Option<SpfKey> {
        let k = self.inner.key(ip, domain).map(SpfKey);
        if k.is_none() {
            bump(&self.inner.counters.invalid);
        }
        k
    }

    /// Starts loading the cache set of `key` into the CPU cache (see [`cache::Cache::prefetch`]).
    pub fn prefetch(&self, key: SpfKey) {
        self.inner.cache.prefetch(key.0);
    }

    /// A reader of cached results at one instant, for a batch of requests: the clock is read
    /// once, and with `count` the batch's hits and misses are added to the shared counters
    /// once, when the reader is dropped (an atomic add per request, on a cache line both
    /// worker threads write, was a measurable share of a cache hit's cost).
    pub fn reader(&self, count: bool) -> CacheReader<'_> {
        CacheReader {
            inner: &self.inner,
            now: self.inner.now(),
            count,
            hits: 0,
            misses: 0,
        }
    }

    /// [`Spf::cached`] without counting a hit or a miss: for a request already counted.
    /// `None` when not cached, whatever the name.
    pub fn probe(&self, ip: IpAddr, domain: &str) -> Option<bool> {
        let inner = &*self.inner;
        let hash = inner.key(ip, domain)?;
        inner.cache.get(hash, inner.now()).map(decode)
    }

    /// The result for (ip, domain), waiting at most the timeout: `None` = timed out (counted in
    /// [`SpfStats::timeouts`]) or shed. While a lookup of the same (ip, domain) is in flight no
    /// second one starts: this call waits on it. The lookup runs on a spawned task (so this must
    /// be called inside a tokio runtime) and fills the cache even after its waiters gave up.
    /// `helo` and `sender` (the full address, empty for the null sender) feed macros.
    pub async fn check(&self, ip: IpAddr, domain: &str, helo: &str, sender: &str) -> Option<bool> {
        let inner = &self.inner;
        let Some(hash) = inner
            .key(ip, domain)
            .filter(|_| valid_domain(trim_root(domain)))
        else {
            bump(&inner.counters.invalid);
            return Some(false);
        };
        // Not counted: the server counts each request once, when it asks `cached` first.
        if let Some(hit) = inner.cache.get(hash, inner.now()) {
            return Some(decode(hit));
        }
        let mut rx = {
            let mut in_flight = lock(&inner.in_flight[cache::shard_of(hash)]);
            if let Some(rx) = in_flight.get(&hash) {
                bump(&inner.counters.joins);
                rx.clone()
            } else {
                // The lookup may have finished between the miss above and this lock: it fills
                // the cache before it leaves the in-flight map.
                if let Some(hit) = inner.cache.get(hash, inner.now()) {
                    return Some(decode(hit));
                }
                if inner.running.fetch_add(1, Ordering::Relaxed) >= MAX_IN_FLIGHT {
                    inner.running.fetch_sub(1, Ordering::Relaxed);
                    bump(&inner.counters.shed);
                    return None;
                }
                let (tx, rx) = watch::channel(None);
                in_flight.insert(hash, rx.clone());
                bump(&inner.counters.lookups);
                let job = Lookup {
                    inner: inner.clone(),
                    hash,
                    ip: ip.to_canonical(),
                    domain: trim_root(domain).to_ascii_lowercase(),
                    helo: helo.to_string(),
                    sender: sender.to_string(),
                };
                tokio::spawn(job.run(tx));
                rx
            }
        };
        let waited = tokio::time::timeout(self.timeout, async {
            // Copied out at once: the `Ref` holds the channel's lock.
            rx.wait_for(Option::is_some).await.map(|v| *v)
        })
        .await;
        match waited {
            Ok(Ok(v)) => v,
            // The lookup task died (a panic in the resolver): no answer, like a timeout.
            Ok(Err(_)) => None,
            Err(_) => {
                bump(&inner.counters.timeouts);
                None
            }
        }
    }

    /// The counters since [`Spf::new`], and the cache's size.
    pub fn stats(&self) -> SpfStats {
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let r = |k: Kind| get(&c.results[k as usize - 1]);
        SpfStats {
            lookups: get(&c.lookups),
            hits: get(&c.hits),
            misses: get(&c.misses),
            timeouts: get(&c.timeouts),
            joins: get(&c.joins),
            shed: get(&c.shed),
            invalid: get(&c.invalid),
            entries: self.inner.cache.len() as u64,
            evictions: get(&c.evictions),
            void_limit: get(&c.void_limit),
            results: SpfResults {
                pass: r(Kind::Pass),
                fail: r(Kind::Fail),
                softfail: r(Kind::SoftFail),
                neutral: r(Kind::Neutral),
                none: r(Kind::None),
                permerror: r(Kind::PermError),
                temperror: r(Kind::TempError),
            },
        }
    }
}

/// Reads cached results for a batch ([`Spf::reader`]).
pub struct CacheReader<'a> {
    inner: &'a Inner,
    now: u32,
    count: bool,
    hits: u64,
    misses: u64,
}

impl CacheReader<'_> {
    /// The cached result of `key`, the key of `domain` ([`Spf::cached`]): a hit, else `false`
    /// for a domain no lookup is made for (checked only now: a name that fails the check is
    /// never cached, so a hit needs no check), else `None`. Counted as a hit, a miss or an
    /// invalid name if the reader counts.
    pub fn get<'d>(&mut self, key: SpfKey, domain: impl FnOnce() -> &'d str) -> Option<bool> {
        if let Some(hit) = self.inner.cache.get(key.0, self.now) {
            self.hits += 1;
            return Some(decode(hit));
        }
        if !valid_domain(trim_root(domain())) {
            if self.count {
                bump(&self.inner.counters.invalid);
            }
            return Some(false);
        }
        self.misses += 1;
        None
    }
}

impl Drop for CacheReader<'_> {
    fn drop(&mut self) {
        // Only what there is to add: a policy request reads one result per reader.
        let c = &self.inner.counters;
        for (n, counter) in [(self.hits, &c.hits), (self.misses, &c.misses)] {
            if self.count && n > 0 {
                counter.fetch_add(n, Ordering::Relaxed);
            }
        }
    }
}

fn decode(kind: u8) -> bool {
    kind == Kind::Pass as u8
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The maps stay well-formed across a panic elsewhere (single inserts and removes).
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Inner {
    /// Whole seconds since the epoch: the cache's clock.
    fn now(&self) -> u32 {
        self.epoch.elapsed().as_secs() as u32
    }

    /// The keyed 64-bit hash of (canonical address, lower-cased domain without its root dot);
    /// `None` for a name over 253 bytes.
    fn key(&self, ip: IpAddr, domain: &str) -> Option<u64> {
        // The name is lower-cased eight bytes at a time into the hasher, with no copy: a
        // stack buffer zeroed, filled and lower-cased per request was a third of a hit's cost
        // (perf, `loadtest/bench-spf.sh`). The name's syntax is checked only on a miss
        // ([`CacheReader::get`]): a hit of a 12-byte name cost ~150 instructions more when
        // every byte was checked here.
        let name = trim_root(domain).as_bytes();
        if name.len() > MAX_NAME {
            return None;
        }
        // aHash with per-process random seeds: keyed (entries cannot be aimed at one set), and
        // 4× cheaper than SipHash-1-3-128 here (a hit: 787 → 340 instructions, callgrind over
        // `spf_bench 500 10`), which matters because every request with an SPF domain asks.
        // 64 bits are enough: a wrong answer needs another key with the same 64-bit hash.
        let mut h = self.secret.build_hasher();
        match ip.to_canonical() {
            IpAddr::V4(v4) => h.write_u64(u64::from(v4.to_bits()) | 4 << 32),
            IpAddr::V6(v6) => {
                h.write_u128(v6.to_bits());
                h.write_u8(6);
            }
        }
        // The length, then the name's 8-byte words, the last one overlapping the one before
        // when the length is not a multiple of 8: with the length known, the words give the
        // name back, so two names never feed the same input.
        h.write_usize(name.len());
        if name.len() < 8 {
            let w = name.iter().rev().fold(0u64, |w, &b| w << 8 | u64::from(b));
            h.write_u64(lower_word(w));
        } else {
            for w in name.chunks_exact(8) {
                let w = w.try_into().expect("chunks of 8");
                h.write_u64(lower_word(u64::from_le_bytes(w)));
            }
            if name.len() % 8 != 0 {
                let last = name.last_chunk::<8>().expect("8 bytes or more");
                h.write_u64(lower_word(u64::from_le_bytes(*last)));
            }
        }
        Some(h.finish())
    }

    /// Seconds since the epoch at which a result read at `now` from answers expiring at
    /// `expires` goes stale.
    fn expiry(&self, kind: Kind, expires: Option<Instant>) -> u32 {
        let ttl = if kind == Kind::TempError {
            TEMPERROR_TTL.min(self.max_ttl)
        } else {
            expires
                .map_or(NEGATIVE_TTL, |e| {
                    e.saturating_duration_since(Instant::now())
                })
                .clamp(self.min_ttl, self.max_ttl)
        };
        // Rounded up: an entry lives at least its TTL and less than a second more.
        let end = self.epoch.elapsed() + ttl;
        let secs = end.as_secs() + u64::from(end.subsec_nanos() > 0);
        secs.min(u64::from(u32::MAX)) as u32
    }
}

/// One SPF evaluation, run on its own task.
struct Lookup {
    inner: Arc<Inner>,
    hash: u64,
    ip: IpAddr,
    domain: String,
    helo: String,
    sender: String,
}

/// Takes the key out of the in-flight map however the lookup ends (a panic included), so a
/// later `check` starts afresh instead of waiting on a dead task.
struct InFlightGuard<'a> {
    inner: &'a Inner,
    hash: u64,
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        lock(&self.inner.in_flight[cache::shard_of(self.hash)]).remove(&self.hash);
        self.inner.running.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Lookup {
    async fn run(self, tx: watch::Sender<Option<bool>>) {
        let inner = &*self.inner;
        let guard = InFlightGuard {
            inner,
            hash: self.hash,
        };
        let tracker = Tracker::new();
        let params = Parameters::new(SpfParameters::new(
            self.ip,
            &self.domain,
            &self.helo,
            HOST_DOMAIN,
            &self.sender,
        ))
        .with_txt_cache(&tracker)
        .with_mx_cache(&tracker)
        .with_ipv4_cache(&tracker)
        .with_ipv6_cache(&tracker)
        .with_ptr_cache(&tracker);
        let result =
            match tokio::time::timeout(LOOKUP_DEADLINE, inner.auth.check_host(params)).await {
                Ok(out) => out.result(),
                Err(_) => SpfResult::TempError,
            };
        let (result, by_void_limit) = tracker.verdict(result);
        let kind = Kind::from(result);
        let c = &inner.counters;
        bump(&c.results[kind as usize - 1]);
        if by_void_limit {
            bump(&c.void_limit);
        }
        let now = inner.now();
        let expires = inner.expiry(kind, tracker.expires()).max(now + 1);
        if inner.cache.insert(self.hash, kind as u8, now, expires) == Inserted::Evicted {
            bump(&c.evictions);
        }
        // Cache first, then the map (the guard), then the waiters: a `check` that finds no
        // lookup in flight finds the result cached.
        drop(guard);
        tx.send_replace(Some(kind == Kind::Pass));
    }
}

/// The domain without one trailing root dot.
fn trim_root(domain: &str) -> &str {
    domain.strip_suffix('.').unwrap_or(domain)
}

/// The longest DNS name, in bytes without the root dot (RFC 1035 §2.3.4).
const MAX_NAME: usize = 253;

/// Eight bytes with ASCII `A`-`Z` lower-cased and every other byte (non-ASCII ones included)
/// unchanged, without a branch: what `make_ascii_lowercase` does to them.
fn lower_word(w: u64) -> u64 {
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let each = |b: u8| u64::from_le_bytes([b; 8]);
    // Per byte, on its low seven bits (no carry crosses bytes): the high bit of `x + (0x80 -
    // c)` is set exactly when the byte is >= c.
    let low = w & LOW7;
    let from_a = low + each(0x80 - b'A');
    let past_z = low + each(0x80 - b'Z' - 1);
    let upper = (from_a & !past_z) & !w & HIGH;
    w | (upper >> 2)
}

/// A name worth a DNS lookup: 1..=253 bytes of 2+ labels of 1..=63 letters, digits, `-` (not
/// at either end) or `_`, and a top-level label that is not all digits (so not an IPv4
/// literal; `[…]` literals and IPv6 fail the character test). RFC 7208 §4.3 makes a malformed
/// or single-label domain `none` without a lookup; a non-ASCII (U-label) name would need IDNA
/// and is not what an SMTP envelope carries without SMTPUTF8, so it is refused too.
fn valid_domain(name: &str) -> bool {
    let b = name.as_bytes();
    if b.is_empty() || b.len() > MAX_NAME {
        return false;
    }
    let (mut labels, mut label_len, mut all_digits, mut prev) = (1, 0, true, b'.');
    for &c in b {
        if c == b'.' {
            if label_len == 0 || prev == b'-' {
                return false;
            }
            (labels, label_len, all_digits) = (labels + 1, 0, true);
        } else {
            if !(c.is_ascii_alphanumeric() || c == b'_' || (c == b'-' && label_len > 0)) {
                return false;
            }
            label_len += 1;
            if label_len > 63 {
                return false;
            }
            all_digits &= c.is_ascii_digit();
        }
        prev = c;
    }
    label_len > 0 && prev != b'-' && labels >= 2 && !all_digits
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spf() -> Spf {
        Spf::new(SpfConfig {
            dns_server: Some("127.0.0.1:9".parse().unwrap()),
            ..SpfConfig::default()
        })
        .expect("builds outside a runtime")
    }

    #[test]
    fn send_and_sync() {
        fn is<T: Send + Sync>() {}
        is::<Spf>();
    }

    #[test]
    fn domains_checked_without_dns() {
        for ok in [
            "example.com",
            "Example.COM.",
            "_spf.google.com",
            "a-b.c",
            "xn--bcher-kva.example",
            "123.example",
            &format!("{0}.{0}.{0}.{1}", "a".repeat(63), "b".repeat(61)), // 253 bytes
            &format!("{}.com", ["a".repeat(63).as_str(); 3].join(".")),
        ] {
            assert!(valid_domain(trim_root(ok)), "{ok:?} is valid");
        }
        let long = format!("{0}.{0}.{0}.{1}", "a".repeat(63), "b".repeat(62)); // 254 bytes
        for bad in [
            "",
            ".",
            "com",
            "localhost",
            "192.0.2.1",
            "[192.0.2.1]",
            "2001:db8::1",
            "[IPv6:2001:db8::1]",
            "a..com",
            ".example.com",
            "-a.com",
            "a-.com",
            "exa mple.com",
            "bücher.example",
            "user@example.com",
            "example.123",
            "example.com-",
            &format!("{}.com", "a".repeat(64)),
            &long,
        ] {
            assert!(!valid_domain(trim_root(bad)), "{bad:?} is refused");
        }
    }

    #[test]
    fn invalid_domains_answer_false_and_count() {
        let s = spf();
        assert_eq!(
            s.cached("192.0.2.1".parse().unwrap(), "192.0.2.9"),
            Some(false)
        );
        assert_eq!(s.cached("192.0.2.1".parse().unwrap(), ""), Some(false));
        assert_eq!(s.stats().invalid, 2);
        assert_eq!(s.stats().misses, 0);
    }

    #[test]
    fn lower_word_is_make_ascii_lowercase_on_every_byte() {
        for b in 0..=255u8 {
            for at in 0..8 {
                let mut w = *b"aZ@[`{\xff0";
                w[at] = b;
                let mut want = w;
                want.make_ascii_lowercase();
                assert_eq!(
                    lower_word(u64::from_le_bytes(w)).to_le_bytes(),
                    want,
                    "{b} at {at}"
                );
            }
        }
    }

    #[test]
    fn key_ignores_case_root_dot_and_v4_mapping() {
        let s = spf();
        let k = |ip: &str, d: &str| s.inner.key(ip.parse().unwrap(), d).unwrap();
        let base = k("192.0.2.1", "example.com");
        assert_eq!(k("192.0.2.1", "EXAMPLE.Com."), base);
        assert_eq!(k("::ffff:192.0.2.1", "example.com"), base);
        assert_ne!(k("192.0.2.2", "example.com"), base);
        assert_ne!(k("192.0.2.1", "example.org"), base);
        assert_ne!(k("::192.0.2.1", "example.com"), base);
        // Every length around the 8-byte words, and names that differ in one byte only.
        for len in 1..=40 {
            let name: String = (0..len).map(|i| (b'a' + i as u8 % 26) as char).collect();
            let upper = name.to_ascii_uppercase();
            assert_eq!(k("192.0.2.1", &name), k("192.0.2.1", &upper), "{name}");
            for at in 0..len {
                let mut other = name.clone().into_bytes();
                other[at] = b'0';
                let other = String::from_utf8(other).unwrap();
                assert_ne!(k("192.0.2.1", &name), k("192.0.2.1", &other), "{other}");
            }
            assert_ne!(k("192.0.2.1", &name), k("192.0.2.1", &format!("{name}a")));
        }
    }

    #[test]
    fn expiry_clamps_ttls() {
        let s = spf();
        let i = &s.inner;
        let now = i.now();
        let secs = |d: Duration| d.as_secs() as u32;
        let soon = Some(Instant::now() + Duration::from_secs(5));
        let late = Some(Instant::now() + Duration::from_secs(100 * 3600));
        let mid = Some(Instant::now() + Duration::from_secs(3600));
        let within = |e: u32, d: Duration| e >= now + secs(d) && e <= now + secs(d) + 2;
        assert!(within(i.expiry(Kind::Pass, soon), MIN_TTL));
        assert!(within(i.expiry(Kind::Pass, late), MAX_TTL));
        assert!(within(i.expiry(Kind::Fail, mid), Duration::from_secs(3600)));
        assert!(within(i.expiry(Kind::None, None), NEGATIVE_TTL));
        assert!(within(i.expiry(Kind::TempError, late), TEMPERROR_TTL));
    }

    #[test]
    fn dns_server_parsing() {
        let p = |s| parse_dns_server(s).ok();
        assert_eq!(p("192.0.2.53"), Some("192.0.2.53:53".parse().unwrap()));
        assert_eq!(
            p("192.0.2.53:5353"),
            Some("192.0.2.53:5353".parse().unwrap())
        );
        assert_eq!(p("::1"), Some("[::1]:53".parse().unwrap()));
        assert_eq!(p("[::1]"), Some("[::1]:53".parse().unwrap()));
        assert_eq!(p("[::1]:5353"), Some("[::1]:5353".parse().unwrap()));
        assert_eq!(p("dns.example"), None);
        assert_eq!(p("192.0.2.53:99999"), None);
        assert_eq!(p(""), None);
    }
}
