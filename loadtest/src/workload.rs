//! The request mix `run` sends: which triplet comes next, and how a triplet is written.
//!
//! A triplet is a number. Its client address, sender and recipient are derived from the
//! number by a hash, so a retry of triplet 42 is byte for byte the same request as its first
//! attempt (as a real MTA's retry is), and the generator keeps no strings. Each request is one
//! of four kinds, drawn by their shares:
//!
//! - **new**: a triplet never sent before (per worker counter, disjoint between workers);
//! - **early retry**: a triplet first sent less than the server's delay ago (it stays DEFER);
//! - **retry**: a triplet first sent at least the server's delay ago, sent once more (it
//!   passes `retried` if the server's delay is what `--server-delay` says);
//! - **known**: a triplet from a fixed pool shared by all workers, so repeated traffic
//!   between known correspondents (whitelisted once each has been seen and retried).
//!
//! When a kind cannot be served yet (no triplet old enough to retry at the start of a run)
//! the generator falls back to a kind it can serve and counts what it actually sent.

use std::collections::VecDeque;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use greyhound::proto::policy;
use serde::{Deserialize, Serialize};

use crate::rng::{mix, mix2, Rng};

/// Shares of the request kinds; they need not add up to one (they are normalised).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Mix {
    /// Never-seen triplets.
    pub new: f64,
    /// Retries before the delay is over.
    pub early_retry: f64,
    /// Retries after the delay.
    pub retry: f64,
    /// Triplets from the known pool.
    pub known: f64,
}

impl Default for Mix {
    /// A mail stream where most requests come from correspondents seen before: 15 % new,
    /// 5 % early retries, 10 % retries after the delay, 70 % known.
    fn default() -> Self {
        Self {
            new: 0.15,
            early_retry: 0.05,
            retry: 0.10,
            known: 0.70,
        }
    }
}

/// Everything that shapes the generated requests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkloadConfig {
    /// Shares of the request kinds.
    pub mix: Mix,
    /// IPv4 client networks (/24s, in 10.0.0.0/8), at most 65,536.
    pub nets_v4: u32,
    /// IPv6 client networks (/64s, in 2001:db8::/32).
    pub nets_v6: u32,
    /// Share of triplets whose client is IPv6.
    pub ipv6_share: f64,
    /// Distinct senders; each sends from one client network.
    pub senders: u32,
    /// Distinct recipients.
    pub recipients: u32,
    /// Triplets in the known pool.
    pub known_pool: u32,
    /// The server's greylisting delay in seconds, so retries come after it.
    pub server_delay: f64,
    /// Seed of every random choice.
    pub seed: u64,
}

impl Default for WorkloadConfig {
    fn default() -> Self {
        Self {
            mix: Mix::default(),
            nets_v4: 65_536,
            nets_v6: 16_384,
            ipv6_share: 0.1,
            senders: 100_000,
            recipients: 1_000_000,
            known_pool: 100_000,
            server_delay: 300.0,
            seed: 1,
        }
    }
}

impl WorkloadConfig {
    /// Checks ranges; the message names the flag.
    pub fn validate(&self) -> Result<(), String> {
        let m = self.mix;
        for (name, v) in [
            ("--new", m.new),
            ("--early-retry", m.early_retry),
            ("--retry", m.retry),
            ("--known", m.known),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(format!("{name}: share must be a number >= 0, got {v}"));
            }
        }
        if m.new + m.early_retry + m.retry + m.known <= 0.0 {
            return Err("--new/--early-retry/--retry/--known: all shares are 0".into());
        }
        if !(1..=65_536).contains(&self.nets_v4) {
            return Err("--nets-v4 must be 1 to 65536 (/24s in 10.0.0.0/8)".into());
        }
        if self.nets_v6 == 0 || self.senders == 0 || self.recipients == 0 || self.known_pool == 0 {
            return Err("--nets-v6, --senders, --recipients, --known-pool must be > 0".into());
        }
        if !(0.0..=1.0).contains(&self.ipv6_share) {
            return Err("--ipv6-share must be between 0 and 1".into());
        }
        if !(self.server_delay >= 0.0 && self.server_delay.is_finite()) {
            return Err("--server-delay must be >= 0".into());
        }
        Ok(())
    }
}

/// What a generated request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A never-seen triplet.
    New,
    /// A retry before the delay is over.
    EarlyRetry,
    /// A retry after the delay.
    Retry,
    /// From the known pool.
    Known,
}

/// Requests generated, by kind (what was actually sent, after fallbacks).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KindCounts {
    /// Never-seen triplets.
    pub new: u64,
    /// Retries before the delay.
    pub early_retry: u64,
    /// Retries after the delay.
    pub retry: u64,
    /// Known-pool triplets.
    pub known: u64,
}

impl KindCounts {
    /// Adds another count.
    pub fn add(&mut self, o: &KindCounts) {
        self.new += o.new;
        self.early_retry += o.early_retry;
        self.retry += o.retry;
        self.known += o.known;
    }

    /// All requests.
    pub fn total(&self) -> u64 {
        self.new + self.early_retry + self.retry + self.known
    }
}

/// Triplet numbers of the known pool live above this bit; new ones below, with the worker in
/// bits 40..62, so no two workers ever make the same "new" triplet.
const KNOWN_BIT: u64 = 1 << 62;
/// The per-worker part of a new triplet's number (its low 40 bits).
const NEW_MASK: u64 = (1 << 40) - 1;
/// First-attempt times remembered for later retries, per worker; the oldest are forgotten
/// past this (a retry share below the new share would otherwise grow it without end).
const MAX_WAITING: usize = 1 << 20;
/// An early retry picks among this many most recent new triplets.
const EARLY_WINDOW: u64 = 64;

/// The node (index of the target, 0-based) that a triplet's first attempt goes to in a run
/// against `nodes` targets: a new triplet's home is its per-worker number modulo `nodes`, a
/// known-pool triplet's its pool index modulo `nodes` (the warm-up's first pass). Derived
/// from the number alone, so every part of the client agrees on it without keeping it.
pub fn home(t: u64, nodes: usize) -> usize {
    let n = nodes.max(1) as u64;
    let i = if t & KNOWN_BIT != 0 {
        t & !KNOWN_BIT
    } else {
        t & NEW_MASK
    };
    (i % n) as usize
}

/// The warm-up's sweep of the known pool, shared by every worker of one pass: each node has a
/// counter over the pool triplets it is sent. In the first pass (`shift` 0) node `j` is sent
/// the triplets whose [`home`] is `j`; in the second (`shift` 1) those whose home is `j - 1`,
/// so with several nodes every triplet's second sight (its retry) reaches another node than
/// its first. With one node both passes send the whole pool in order, as before clusters.
#[derive(Debug)]
pub struct Sweep {
    next: Vec<AtomicU64>,
    shift: usize,
}

impl Sweep {
    /// A pass over the pool against `nodes` targets; `shift` 0 for the first pass, 1 for the
    /// second.
    pub fn new(nodes: usize, shift: usize) -> Self {
        Self {
            next: (0..nodes.max(1)).map(|_| AtomicU64::new(0)).collect(),
            shift,
        }
    }

    /// Nodes of the pass.
    pub fn nodes(&self) -> usize {
        self.next.len()
    }

    /// The home of the triplets node `node` is sent in this pass.
    fn source(&self, node: usize) -> u64 {
        let n = self.nodes();
        ((node % n + n - self.shift % n) % n) as u64
    }

    /// How many pool triplets node `node` is sent in this pass (its requests budget: the
    /// shares of all nodes add up to the pool).
    pub fn share(&self, pool: u32, node: usize) -> u64 {
        let (n, h) = (self.nodes() as u64, self.source(node));
        (u64::from(pool) + n - 1 - h) / n
    }

    /// The next pool triplet for node `node`.
    fn take(&self, pool: u32, node: usize) -> u64 {
        let n = self.nodes() as u64;
        let k = self.next[node % self.nodes()].fetch_add(1, Ordering::Relaxed);
        // Past its share a node wraps (its budget keeps it from getting there).
        KNOWN_BIT | ((k * n + self.source(node)) % u64::from(pool))
    }
}

/// One worker's request generator.
///
/// In a run against several targets (nodes) a worker has a connection to each; the
/// connection to node `j` asks [`Generator::next_for`] for a request to send to `j`: a new
/// triplet whose [`home`] is `j`, a retry (early or after the delay) of a triplet whose home
/// is another node, or any known-pool triplet. Retries therefore never reach the node that
/// saw the first attempt, as when a sender's MTA retries through another MX host. With one
/// node this is the generator of single-target runs, draw for draw.
#[derive(Debug)]
pub struct Generator {
    cfg: WorkloadConfig,
    /// Cumulative kind thresholds on a 53-bit draw: `x < cut[i]` exactly when the draw as a
    /// `[0, 1)` fraction is below the i-th cumulative share (integer compares instead of a
    /// conversion to `f64`).
    cut: [u64; 3],
    rng: Rng,
    worker: u64,
    /// Per home node: the next new triplet's index among that node's (its number's low bits
    /// are `index * nodes + node`).
    next_new: Vec<u64>,
    /// Per home node: new triplets and when they were first sent (seconds), oldest first.
    waiting: Vec<VecDeque<(u64, f64)>>,
    /// Most triplets each of `waiting` keeps.
    cap: usize,
    /// What was sent.
    pub counts: KindCounts,
    /// Set for a warm-up sweep of the known pool.
    sweep: Option<Arc<Sweep>>,
}

impl Generator {
    /// A generator for worker `worker` (0-based; below 2^22), against one node.
    pub fn new(cfg: &WorkloadConfig, worker: u64) -> Self {
        let m = cfg.mix;
        let sum = m.new + m.early_retry + m.retry + m.known;
        // x / 2^53 < c  <=>  x < ceil(c * 2^53) for an integer x; c * 2^53 is exact.
        let bits = |c: f64| (c * (1u64 << 53) as f64).ceil() as u64;
        let cut = [
            bits(m.new / sum),
            bits((m.new + m.early_retry) / sum),
            bits((m.new + m.early_retry + m.retry) / sum),
        ];
        Self {
            cfg: cfg.clone(),
            cut,
            rng: Rng::new(mix2(cfg.seed, worker)),
            worker: worker & 0x3F_FFFF,
            next_new: vec![0],
            waiting: vec![VecDeque::new()],
            cap: MAX_WAITING,
            counts: KindCounts::default(),
            sweep: None,
        }
    }

    /// The same generator for a run against `nodes` targets (at least one).
    pub fn with_nodes(mut self, nodes: usize) -> Self {
        let n = nodes.max(1);
        self.next_new = vec![0; n];
        self.waiting = (0..n).map(|_| VecDeque::new()).collect();
        self.cap = MAX_WAITING / n;
        self
    }

    /// A generator that sends each triplet of the known pool in turn, sharing `sweep` with
    /// the other workers of the pass (the warm-up that whitelists the pool).
    pub fn sweep(cfg: &WorkloadConfig, worker: u64, sweep: Arc<Sweep>) -> Self {
        let nodes = sweep.nodes();
        Self {
            sweep: Some(sweep),
            ..Self::new(cfg, worker).with_nodes(nodes)
        }
    }

    /// Nodes this generator spreads its requests over.
    pub fn nodes(&self) -> usize {
        self.waiting.len()
    }

    /// The next triplet to send at time `now` (seconds since the run started), against one
    /// node (node 0 of several).
    pub fn next(&mut self, now: f64) -> (Kind, u64) {
        self.next_for(now, 0)
    }

    /// The next triplet to send to node `node` (below [`Generator::nodes`]) at time `now`
    /// (seconds since the run started).
    #[inline]
    pub fn next_for(&mut self, now: f64, node: usize) -> (Kind, u64) {
        if let Some(sweep) = &self.sweep {
            self.counts.known += 1;
            return (Kind::Known, sweep.take(self.cfg.known_pool, node));
        }
        // No `% nodes` here: a division on every request (~9 instructions of the ~450 per
        // request, callgrind); the vectors' bounds checks catch a wrong node.
        debug_assert!(node < self.nodes());
        let u = self.rng.next_u64() >> 11;
        let wanted = if u < self.cut[0] {
            Kind::New
        } else if u < self.cut[1] {
            Kind::EarlyRetry
        } else if u < self.cut[2] {
            Kind::Retry
        } else {
            Kind::Known
        };
        let delay = self.cfg.server_delay;
        let picked = match wanted {
            Kind::Known => Some((
                Kind::Known,
                KNOWN_BIT | self.rng.below(self.cfg.known_pool.into()),
            )),
            Kind::Retry => self
                .retry(now, delay, node)
                .or_else(|| self.early(now, delay, node)),
            Kind::EarlyRetry => self
                .early(now, delay, node)
                .or_else(|| self.retry(now, delay, node)),
            Kind::New => None,
        };
        let (kind, t) = picked.unwrap_or_else(|| {
            let n = self.nodes() as u64;
            let i = self.next_new[node] * n + node as u64;
            let t = (self.worker << 40) | (i & NEW_MASK);
            self.next_new[node] += 1;
            let cap = self.cap;
            let q = &mut self.waiting[node];
            if q.len() >= cap {
                q.pop_front();
            }
            q.push_back((t, now));
            (Kind::New, t)
        });
        match kind {
            Kind::New => self.counts.new += 1,
            Kind::EarlyRetry => self.counts.early_retry += 1,
            Kind::Retry => self.counts.retry += 1,
            Kind::Known => self.counts.known += 1,
        }
        (kind, t)
    }

    /// The oldest waiting triplet whose first attempt went to another node than `node` (any
    /// node when there is only one), if its delay is over; it is retried once and forgotten.
    #[inline]
    fn retry(&mut self, now: f64, delay: f64, node: usize) -> Option<(Kind, u64)> {
        let from = if self.nodes() == 1 {
            0
        } else {
            self.retry_source(node)?
        };
        match self.waiting[from].front() {
            Some(&(t, first)) if now - first >= delay => {
                self.waiting[from].pop_front();
                Some((Kind::Retry, t))
            }
            _ => None,
        }
    }

    /// One of the most recent waiting triplets whose first attempt went to another node than
    /// `node` (any node when there is only one), if its delay is not over yet.
    #[inline]
    fn early(&mut self, now: f64, delay: f64, node: usize) -> Option<(Kind, u64)> {
        let from = if self.nodes() == 1 {
            0
        } else {
            self.early_source(node)
        };
        let q = &self.waiting[from];
        let len = q.len() as u64;
        if len == 0 {
            return None;
        }
        let i = len - 1 - self.rng.below(len.min(EARLY_WINDOW));
        let (t, first) = q[i as usize];
        (now - first < delay).then_some((Kind::EarlyRetry, t))
    }

    // The choices of other nodes are kept out of line, so that `retry` and `early` stay
    // small enough to be inlined: called out of line they cost a single-target run ~10
    // instructions per request (callgrind).

    /// The home node, other than `node`, whose oldest waiting triplet is the oldest.
    #[inline(never)]
    fn retry_source(&self, node: usize) -> Option<usize> {
        (0..self.nodes())
            .filter(|&h| h != node)
            .filter_map(|h| self.waiting[h].front().map(|&(_, first)| (h, first)))
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(h, _)| h)
    }

    /// A home node other than `node`, at random.
    #[inline(never)]
    fn early_source(&mut self, node: usize) -> usize {
        let n = self.nodes();
        (node + 1 + self.rng.below(n as u64 - 1) as usize) % n
    }
}

/// The parts of triplet `t`, derived from its number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parts {
    /// The client's address.
    pub client: IpAddr,
    /// Sender number.
    pub sender: u32,
    /// Recipient number.
    pub recipient: u32,
    /// Per-message tag (bounce ids, SRS hashes): same for every attempt of this triplet.
    pub tag: u64,
}

/// Derives triplet `t`'s client, sender and recipient.
pub fn parts(cfg: &WorkloadConfig, t: u64) -> Parts {
    let h = mix2(t, cfg.seed);
    let sender = (mix(h ^ 1) % u64::from(cfg.senders)) as u32;
    let recipient = (mix(h ^ 2) % u64::from(cfg.recipients)) as u32;
    Parts {
        client: client_of(cfg, sender, (h >> 56) as u8),
        sender,
        recipient,
        tag: mix(h ^ 3),
    }
}

/// The client address of a triplet of `sender` whose hash picked host `host`.
fn client_of(cfg: &WorkloadConfig, sender: u32, host: u8) -> IpAddr {
    // A sender sends from one network, on any host of it: hosts of one /24 retry for each
    // other, which is what the /24 masking on the server is for.
    let s = mix2(u64::from(sender), cfg.seed);
    let v6 = ((s >> 11) as f64 / (1u64 << 53) as f64) < cfg.ipv6_share;
    if v6 {
        let net = (mix(s) % u64::from(cfg.nets_v6)) as u32;
        IpAddr::V6(Ipv6Addr::new(
            0x2001,
            0x0db8,
            (net >> 16) as u16,
            net as u16,
            0,
            0,
            0,
            u16::from(host) + 1,
        ))
    } else {
        let net = (mix(s) % u64::from(cfg.nets_v4)) as u32;
        IpAddr::V4(Ipv4Addr::new(
            10,
            (net >> 8) as u8,
            net as u8,
            host.clamp(1, 254),
        ))
    }
}

/// The sender address forms, by share (out of 32): plain 18, `+extension` 3, VERP 4, SRS 2,
/// BATV 3, null sender 2. The VERP, SRS and BATV forms carry a per-message part that the
/// server's normaliser must reduce, or every message of a list would be a new triplet.
pub fn write_sender(sender: u32, tag: u64, out: &mut Vec<u8>) {
    let mut w = Line::new();
    if !sender_into(&mut w, sender, tag) {
        w.s(b"<>");
    }
    out.extend_from_slice(w.bytes());
}

/// Writes the sender's address into `w`; writes nothing and returns `false` for the null
/// sender (whose text depends on the protocol: `<>` as an address, empty in the codecs).
#[inline]
fn sender_into(w: &mut Line, sender: u32, tag: u64) -> bool {
    // Written piece by piece into a stack buffer rather than with `write!` or `Vec` pushes:
    // formatting was ~15 % of the client's CPU in a profile of a native TCP run (perf), and
    // per-byte `Vec` pushes with their capacity checks ~480 instructions per request of the
    // client thread (callgrind, see docs/LOADTEST.md). The text is the same as the `format!`
    // forms (a test checks). A sender is a part of its own (`sender_head`), the message's
    // part (`sender_tag`), then another part of its own (`sender_tail`), so the sender's parts
    // can be written once per run ([`SenderSlot`]).
    let form = sender_form(sender);
    if form == Form::Null {
        return false;
    }
    sender_head(w, form, sender);
    sender_tag(w, form, tag);
    sender_tail(w, form, sender);
    true
}

/// A sender address form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    Plain,
    Extension,
    Verp,
    Srs,
    Batv,
    Null,
}

/// Sender `sender`'s form, by share (out of 32): plain 18, `+extension` 3, VERP 4, SRS 2,
/// BATV 3, null sender 2.
#[inline]
fn sender_form(sender: u32) -> Form {
    match mix(u64::from(sender)) % 32 {
        0..=17 => Form::Plain,
        18..=20 => Form::Extension,
        21..=24 => Form::Verp,
        25..=26 => Form::Srs,
        27..=29 => Form::Batv,
        _ => Form::Null,
    }
}

/// The sender's text before the message's part (a plain sender's whole address).
fn sender_head(w: &mut Line, form: Form, sender: u32) {
    let d = u64::from(sender % 9973);
    let n = u64::from(sender);
    match form {
        Form::Plain => {
            w.s(b"user").dec(n).s(b"@mail").dec(d).s(b".example.com");
        }
        Form::Extension => {
            w.s(b"user").dec(n).s(b"+");
        }
        Form::Verp => {
            w.s(b"list").dec(n).s(b"-bounces+");
        }
        Form::Srs => {
            w.s(b"SRS0=");
        }
        Form::Batv => {
            w.s(b"prvs=");
        }
        Form::Null => {}
    }
}

/// The per-message part of a sender of form `form` (bounce id, SRS hash, BATV tag).
#[inline]
fn sender_tag(w: &mut Line, form: Form, tag: u64) {
    match form {
        Form::Extension => {
            w.dec(tag % 1000);
        }
        Form::Verp => {
            w.dec(tag % 100_000);
        }
        Form::Srs => {
            w.hex(tag & 0xffff, 4).s(b"=").digits((tag >> 16) % 100, 2);
        }
        Form::Batv => {
            w.hex(tag & 0xff_ffff_ffff, 10);
        }
        Form::Plain | Form::Null => {}
    }
}

/// The sender's text after the message's part.
fn sender_tail(w: &mut Line, form: Form, sender: u32) {
    let d = u64::from(sender % 9973);
    let n = u64::from(sender);
    match form {
        Form::Extension => {
            w.s(b"@example").dec(d).s(b".org");
        }
        Form::Verp => {
            w.s(b"=isp.example@lists").dec(d).s(b".example.net");
        }
        Form::Srs => {
            w.s(b"=orig").dec(d).s(b".example=user").dec(n);
            w.s(b"@forwarder").dec(d % 100).s(b".example");
        }
        Form::Batv => {
            w.s(b"=user").dec(n).s(b"@corp").dec(d).s(b".example");
        }
        Form::Plain | Form::Null => {}
    }
}

/// Text areas of a [`SenderSlot`], each longer than the longest text it holds: a network
/// (`2001:db8:ffff:ffff::`, 20), a head (`user4294967295@mail9972.example.com`, 35), a tail
/// (`=orig9972.example=user4294967295@forwarder99.example`, 52).
const NET_AREA: usize = 24;
const HEAD_AREA: usize = 40;
const TAIL_AREA: usize = 56;

/// What a sender always writes the same, written once per run: its client network (all of
/// the address but the host) and the parts of its address around the message's part. A
/// request from a cached sender is then three fixed-size copies, the host, the message's
/// part and the recipient. Fixed-size areas, so each copy is a few moves, not a `memcpy`
/// call.
#[derive(Debug, Clone, Copy)]
struct SenderSlot {
    net: [u8; NET_AREA],
    head: [u8; HEAD_AREA],
    tail: [u8; TAIL_AREA],
    net_len: u8,
    head_len: u8,
    tail_len: u8,
    v6: bool,
    form: Form,
}

impl SenderSlot {
    fn new(cfg: &WorkloadConfig, sender: u32) -> Self {
        let form = sender_form(sender);
        let mut w = Line::new();
        // The client of a triplet of this sender on host 1, without the host's digit.
        let client = client_of(cfg, sender, 0);
        w.ip(client);
        let net = &w.bytes()[..w.len - 1];
        let mut slot = Self {
            net: [0; NET_AREA],
            head: [0; HEAD_AREA],
            tail: [0; TAIL_AREA],
            net_len: net.len() as u8,
            head_len: 0,
            tail_len: 0,
            v6: client.is_ipv6(),
            form,
        };
        slot.net[..net.len()].copy_from_slice(net);
        let mut w = Line::new();
        sender_head(&mut w, form, sender);
        slot.head[..w.len].copy_from_slice(w.bytes());
        slot.head_len = w.len as u8;
        let mut w = Line::new();
        sender_tail(&mut w, form, sender);
        slot.tail[..w.len].copy_from_slice(w.bytes());
        slot.tail_len = w.len as u8;
        slot
    }
}

/// Most senders whose parts are written once per run (128 bytes each: 16 MiB); requests of
/// senders beyond are written from their parts.
pub const MAX_CACHED_SENDERS: u32 = 1 << 17;

/// Writes recipient `r`.
pub fn write_recipient(r: u32, out: &mut Vec<u8>) {
    let mut w = Line::new();
    recipient_into(&mut w, r);
    out.extend_from_slice(w.bytes());
}

#[inline]
fn recipient_into(w: &mut Line, r: u32) {
    w.s(b"user")
        .dec(r.into())
        .s(b"@isp")
        .dec((r % 50).into())
        .s(b".example");
}

/// Room for the longest request line the client writes (~170 bytes: a 20-digit ID, `CHECK `,
/// a 39-byte IPv6 address, a sender of at most 64 bytes and a recipient of at most 28) and
/// the 20 bytes past the end that a number's fixed-size copy writes.
const LINE_MAX: usize = 256;

/// Two decimal digits for each of 0..100, for writing numbers two digits at a time.
const PAIRS: &[u8; 200] = b"0001020304050607080910111213141516171819\
2021222324252627282930313233343536373839\
4041424344454647484950515253545556575859\
6061626364656667686970717273747576777879\
8081828384858687888990919293949596979899";

/// Most decimal digits of a `u64`.
const DIGITS: usize = 20;

/// The decimal digits of each octet value, then their count.
const OCTETS: [[u8; 4]; 256] = {
    let mut t = [[0u8; 4]; 256];
    let mut i = 0;
    while i < 256 {
        let (h, d, u) = ((i / 100) as u8, (i / 10 % 10) as u8, (i % 10) as u8);
        t[i] = if i >= 100 {
            [b'0' + h, b'0' + d, b'0' + u, 3]
        } else if i >= 10 {
            [b'0' + d, b'0' + u, 0, 2]
        } else {
            [b'0' + u, 0, 0, 1]
        };
        i += 1;
    }
    t
};

/// A request line (or one field of one) written on the stack without the `fmt` machinery and
/// without a capacity check per byte, then copied out in one piece.
pub(crate) struct Line {
    buf: [u8; LINE_MAX],
    len: usize,
}

impl std::fmt::Debug for Line {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Line({:?})", String::from_utf8_lossy(self.bytes()))
    }
}

impl Default for Line {
    fn default() -> Self {
        Self::new()
    }
}

impl Line {
    #[inline(always)]
    fn new() -> Self {
        Self {
            buf: [0; LINE_MAX],
            len: 0,
        }
    }

    /// What was written.
    #[inline(always)]
    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// A literal piece: its length is known at compile time, so a few moves.
    #[inline(always)]
    fn s(&mut self, piece: &[u8]) -> &mut Self {
        self.buf[self.len..self.len + piece.len()].copy_from_slice(piece);
        self.len += piece.len();
        self
    }

    /// The first `len` bytes of a fixed-size area: all of it is copied (a few moves), only
    /// `len` bytes count.
    #[inline(always)]
    fn area<const N: usize>(&mut self, area: &[u8; N], len: u8) -> &mut Self {
        self.buf[self.len..self.len + N].copy_from_slice(area);
        self.len += usize::from(len);
        self
    }

    /// `n` in decimal.
    #[inline(always)]
    fn dec(&mut self, n: u64) -> &mut Self {
        self.digits(n, 1)
    }

    /// `n` in decimal, zero-padded to at least `width` digits (at most 20): two digits at a
    /// time from the end into a scratch array, then a copy of fixed size (a few vector moves,
    /// whatever the length), of which only the digits count.
    #[inline(always)]
    fn digits(&mut self, mut n: u64, width: usize) -> &mut Self {
        let mut tmp = [b'0'; 2 * DIGITS];
        let mut at = DIGITS;
        // A constant divisor: the compiler multiplies instead of dividing.
        while n >= 100 {
            let r = (n % 100) as usize * 2;
            n /= 100;
            at -= 2;
            tmp[at..at + 2].copy_from_slice(&PAIRS[r..r + 2]);
        }
        if n >= 10 {
            let r = n as usize * 2;
            at -= 2;
            tmp[at..at + 2].copy_from_slice(&PAIRS[r..r + 2]);
        } else {
            at -= 1;
            tmp[at] = b'0' + n as u8;
        }
        // Zero padding: `tmp` is all zeros before the digits.
        let at = at.min(DIGITS - width.min(DIGITS));
        self.buf[self.len..self.len + DIGITS].copy_from_slice(&tmp[at..at + DIGITS]);
        self.len += DIGITS - at;
        self
    }

    /// An IPv4 octet: its digits from a table, a fixed 4-byte copy.
    #[inline(always)]
    fn octet(&mut self, o: u8) -> &mut Self {
        let [a, b, c, len] = OCTETS[usize::from(o)];
        self.buf[self.len..self.len + 3].copy_from_slice(&[a, b, c]);
        self.len += usize::from(len);
        self
    }

    /// `n` in lower-case hexadecimal, zero-padded to at least `width` digits (at most 16).
    #[inline]
    fn hex(&mut self, mut n: u64, width: usize) -> &mut Self {
        let len = ((64 - (n | 1).leading_zeros() as usize).div_ceil(4)).max(width.min(16));
        let end = self.len + len;
        let mut at = end;
        // Shifts and masks: a constant base, no division.
        while at > self.len {
            at -= 1;
            self.buf[at] = b"0123456789abcdef"[(n & 0xf) as usize];
            n >>= 4;
        }
        self.len = end;
        self
    }

    /// `ip` as its `Display` writes it (a test checks): IPv4 by hand, and IPv6 by hand for
    /// the shape the workload makes (`2001:db8:x:y::h`, zeros only in the last 64 bits but
    /// the host); other IPv6 addresses through `Display`.
    #[inline]
    fn ip(&mut self, ip: IpAddr) -> &mut Self {
        match ip {
            IpAddr::V4(v4) => {
                let [a, b, c, d] = v4.octets();
                self.octet(a)
                    .s(b".")
                    .octet(b)
                    .s(b".")
                    .octet(c)
                    .s(b".")
                    .octet(d);
            }
            IpAddr::V6(v6) => {
                let g = v6.segments();
                if g[0] != 0 && g[1] != 0 && g[4..7] == [0, 0, 0] && g[7] != 0 {
                    // The longest run of zero groups is 4..7 (or 2..7 when x and y are 0).
                    self.hex(g[0].into(), 1).s(b":").hex(g[1].into(), 1);
                    match (g[2], g[3]) {
                        (0, 0) => {}
                        (x, 0) => {
                            self.s(b":").hex(x.into(), 1);
                        }
                        (x, y) => {
                            self.s(b":").hex(x.into(), 1).s(b":").hex(y.into(), 1);
                        }
                    }
                    self.s(b"::").hex(g[7].into(), 1);
                } else {
                    let mut text = Vec::with_capacity(40);
                    let _ = write!(text, "{v6}");
                    self.s(&text);
                }
            }
        }
        self
    }
}

/// Appends `ip` as text, as its `Display` does.
pub fn write_ip(ip: IpAddr, out: &mut Vec<u8>) {
    let mut w = Line::new();
    w.ip(ip);
    out.extend_from_slice(w.bytes());
}

/// A triplet [`RequestWriter::touch`] looked at, ready to write.
#[derive(Debug, Clone, Copy, Default)]
pub struct Touched {
    /// The triplet.
    pub t: u64,
    /// Its hash, if computed.
    h: Option<u64>,
}

/// Writes triplets as request bytes in the protocols' formats, so the load generator sends
/// exactly what the server's parser reads: native lines are written in place into a stack
/// buffer in the form `greyhound::proto::native::encode_request` writes (the codec defines the
/// format; tests check the bytes are the codec's, and that `native::parse_line` reads them back
/// as the intended request), policy blocks through `greyhound::proto::policy::encode_request`.
/// Scratch buffers are kept between calls: once warm, writing a request allocates nothing.
#[derive(Debug, Default)]
pub struct RequestWriter {
    /// Known-pool requests written once for the whole run, if given.
    known: Option<Arc<KnownCache>>,
    /// The native line being written, kept so it is not zeroed again for every request
    /// (zeroing it was ~70 instructions per request, callgrind).
    line: Line,
    sender: Vec<u8>,
    recipient: Vec<u8>,
    client: Vec<u8>,
    helo: Vec<u8>,
    instance: Vec<u8>,
}

impl RequestWriter {
    /// A writer that copies known-pool requests from `known` instead of writing them again.
    pub fn with_cache(known: Arc<KnownCache>) -> Self {
        Self {
            known: Some(known),
            ..Self::default()
        }
    }

    /// Appends the native request line for triplet `t`: `[ID ]CHECK ip <sender> <recipient>\n`.
    pub fn native(&mut self, cfg: &WorkloadConfig, t: u64, id: Option<u64>, out: &mut Vec<u8>) {
        self.native_touched(cfg, Touched { t, h: None }, id, out);
    }

    /// [`RequestWriter::native`] for a triplet [`RequestWriter::touch`] looked at.
    pub fn native_touched(
        &mut self,
        cfg: &WorkloadConfig,
        Touched { t, h }: Touched,
        id: Option<u64>,
        out: &mut Vec<u8>,
    ) {
        let w = &mut self.line;
        w.len = 0;
        if let Some(id) = id {
            // What `encode_request` writes first: the ID and a space.
            w.dec(id).s(b" ");
        }
        if let Some(line) = self.known.as_ref().and_then(|k| k.get(t, false)) {
            out.extend_from_slice(w.bytes());
            out.extend_from_slice(line);
            return;
        }
        // Written in place rather than through `encode_request` and scratch strings: with the
        // digits two at a time and IPv6 by hand, the client thread went from 1,055 to 572
        // instructions per request (with the reply fast path), with the senders' parts written
        // once per run and `PASS known` read from its fixed bytes to 408 (callgrind,
        // docs/LOADTEST.md); ~30 % of requests (new triplets and retries) take this path.
        let h = h.unwrap_or_else(|| mix2(t, cfg.seed));
        let sender = (mix(h ^ 1) % u64::from(cfg.senders)) as u32;
        let slot = self
            .known
            .as_ref()
            .and_then(|k| k.senders.get(sender as usize));
        if let Some(slot) = slot {
            // What `parts` derives, from the same hashes.
            let recipient = (mix(h ^ 2) % u64::from(cfg.recipients)) as u32;
            let host = (h >> 56) as u8;
            w.s(b"CHECK ").area(&slot.net, slot.net_len);
            if slot.v6 {
                w.hex(u64::from(host) + 1, 1);
            } else {
                w.octet(host.clamp(1, 254));
            }
            w.s(b" <").area(&slot.head, slot.head_len);
            if !matches!(slot.form, Form::Plain | Form::Null) {
                sender_tag(w, slot.form, mix(h ^ 3));
            }
            w.area(&slot.tail, slot.tail_len).s(b"> <");
            recipient_into(w, recipient);
            w.s(b">\n");
            out.extend_from_slice(w.bytes());
            return;
        }
        let p = parts(cfg, t);
        w.s(b"CHECK ").ip(p.client).s(b" <");
        // The null sender is an empty address, `<>` on the wire.
        sender_into(w, p.sender, p.tag);
        w.s(b"> <");
        recipient_into(w, p.recipient);
        w.s(b">\n");
        out.extend_from_slice(w.bytes());
    }

    /// Reads a byte at each end of what the request of triplet `t` is copied from (its
    /// known-pool entry, or its sender's slot) and returns them combined. Called for a batch
    /// of requests before they are written, the reads are independent of each other, so
    /// their cache misses overlap instead of coming one after the other while writing (the
    /// tables are ~20 MiB at the default sizes). It costs ~50 instructions per request
    /// (callgrind: 408 -> 457) and saves more than that in CPU time (interleaved runs, TCP
    /// pipeline 16: 553/624/707 ns per request against 722/675/820 without).
    /// The triplet comes back with the hash it took to find its sender, so writing it does
    /// not hash again (~30 instructions per request written from its parts, callgrind).
    #[inline]
    pub fn touch(&self, cfg: &WorkloadConfig, t: u64, policy: bool) -> (Touched, u8) {
        let plain = Touched { t, h: None };
        let Some(k) = &self.known else {
            return (plain, 0);
        };
        if let Some(entry) = k.get(t, policy) {
            let seen = entry.first().copied().unwrap_or(0) ^ entry.last().copied().unwrap_or(0);
            return (plain, seen);
        }
        if policy {
            return (plain, 0);
        }
        let h = mix2(t, cfg.seed);
        let sender = (mix(h ^ 1) % u64::from(cfg.senders)) as usize;
        let seen = k
            .senders
            .get(sender)
            .map_or(0, |s| s.net[0] ^ s.tail[TAIL_AREA - 1]);
        (Touched { t, h: Some(h) }, seen)
    }

    /// Formats triplet `t`'s sender and recipient into the scratch buffers.
    fn addresses(&mut self, p: &Parts) {
        self.sender.clear();
        let mut w = Line::new();
        // The codecs take the null sender as an empty address.
        sender_into(&mut w, p.sender, p.tag);
        self.sender.extend_from_slice(w.bytes());
        self.recipient.clear();
        write_recipient(p.recipient, &mut self.recipient);
    }

    /// Appends the Postfix policy request block for triplet `t`, at the RCPT stage, with the
    /// attributes Postfix 3 sends (shortened to the ones that matter plus a few that cost
    /// bytes).
    pub fn policy(&mut self, cfg: &WorkloadConfig, t: u64, out: &mut Vec<u8>) {
        if let Some(block) = self.known.as_ref().and_then(|k| k.get(t, true)) {
            out.extend_from_slice(block);
            return;
        }
        let p = parts(cfg, t);
        self.addresses(&p);
        self.client.clear();
        write_ip(p.client, &mut self.client);
        self.helo.clear();
        let mut w = Line::new();
        w.s(b"mx").dec((p.sender % 9973).into()).s(b".example");
        self.helo.extend_from_slice(w.bytes());
        self.instance.clear();
        let mut w = Line::new();
        w.hex(t & 0xffff_ffff, 1).s(b".1");
        self.instance.extend_from_slice(w.bytes());
        policy::encode_request(
            &policy::PolicyRequest {
                request: policy::POLICY_REQUEST,
                protocol_state: "RCPT",
                client_address: ascii(&self.client),
                client_name: "unknown",
                reverse_client_name: "unknown",
                helo_name: ascii(&self.helo),
                sender: ascii(&self.sender),
                recipient: ascii(&self.recipient),
                sasl_username: "",
                queue_id: "",
                instance: ascii(&self.instance),
                protocol_name: "ESMTP",
                // What a client without a TLS certificate sends: nothing more.
                ..policy::PolicyRequest::default()
            },
            &[("recipient_count", "0"), ("sasl_method", ""), ("size", "0")],
            out,
        );
    }
}

/// The known pool's requests, written once per run and shared by the client's threads: 70 %
/// of the default mix is known-pool traffic, and copying its bytes instead of writing them
/// again halves the client's CPU per request (see docs/LOADTEST.md). The bytes are the ones
/// [`RequestWriter`] writes (a test checks), so the server cannot tell the difference.
#[derive(Debug, Default)]
pub struct KnownCache {
    /// The native protocol's senders, by number (not made for policy runs).
    senders: Vec<SenderSlot>,
    policy: bool,
    bytes: Vec<u8>,
    /// End of entry `i` in `bytes`; entry `i` starts where `i - 1` ends.
    ends: Vec<usize>,
}

/// Most known-pool entries cached: 131,072 policy blocks are ~50 MiB; a larger pool is
/// cached up to here and written as usual beyond.
pub const MAX_CACHED: u32 = 1 << 17;

impl KnownCache {
    /// The requests of the known pool (native lines without an ID, or policy blocks).
    pub fn build(cfg: &WorkloadConfig, policy: bool) -> Self {
        let n = cfg.known_pool.min(MAX_CACHED) as usize;
        let mut w = RequestWriter::default();
        let mut bytes = Vec::new();
        let mut ends = Vec::with_capacity(n);
        for i in 0..n as u64 {
            if policy {
                w.policy(cfg, KNOWN_BIT | i, &mut bytes);
            } else {
                w.native(cfg, KNOWN_BIT | i, None, &mut bytes);
            }
            ends.push(bytes.len());
        }
        let senders = if policy {
            Vec::new()
        } else {
            (0..cfg.senders.min(MAX_CACHED_SENDERS))
                .map(|sender| SenderSlot::new(cfg, sender))
                .collect()
        };
        Self {
            senders,
            policy,
            bytes,
            ends,
        }
    }

    /// The cached request of triplet `t`, if it is a cached known-pool triplet of this kind.
    fn get(&self, t: u64, policy: bool) -> Option<&[u8]> {
        if t & KNOWN_BIT == 0 || policy != self.policy {
            return None;
        }
        let i = usize::try_from(t & !KNOWN_BIT).ok()?;
        let end = *self.ends.get(i)?;
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        Some(&self.bytes[start..end])
    }
}

/// The scratch buffers hold only numbers and ASCII literals.
fn ascii(b: &[u8]) -> &str {
    std::str::from_utf8(b).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn null_sender_is_written_once_bracketed() {
        let cfg = WorkloadConfig::default();
        // Find a triplet whose sender is the null sender.
        let t = (0..10_000u64)
            .find(|&t| mix(u64::from(parts(&cfg, t).sender)) % 32 >= 30)
            .expect("some null sender");
        let mut w = RequestWriter::default();
        let mut line = Vec::new();
        w.native(&cfg, t, None, &mut line);
        let text = String::from_utf8(line).unwrap();
        assert!(text.contains(" <> <user"), "{text}");
        assert!(!text.contains("<<"), "{text}");
        let mut block = Vec::new();
        w.policy(&cfg, t, &mut block);
        assert!(String::from_utf8(block).unwrap().contains("\nsender=\n"));
    }

    #[test]
    fn every_request_is_one_the_server_codecs_accept() {
        use greyhound::proto::{native, policy};
        let cfg = WorkloadConfig {
            ipv6_share: 0.5,
            ..WorkloadConfig::default()
        };
        let mut w = RequestWriter::default();
        let mut line = Vec::new();
        let mut block = Vec::new();
        for t in (0..20_000u64).chain([KNOWN_BIT | 5, (3 << 40) | 9]) {
            line.clear();
            w.native(&cfg, t, Some(t), &mut line);
            assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
            let req = native::parse_line(&line[..line.len() - 1])
                .unwrap_or_else(|e| panic!("{:?}: {e:?}", String::from_utf8_lossy(&line)));
            let id = t.to_string();
            assert_eq!(req.id, Some(id.as_str()));
            let native::Command::Check(tr) = req.command else {
                panic!("not a CHECK: {:?}", String::from_utf8_lossy(&line));
            };
            // The intended request: the triplet's client, sender (the null sender empty) and
            // recipient.
            let p = parts(&cfg, t);
            assert_eq!(tr.client, p.client);
            let (mut sender, mut recipient) = (Vec::new(), Vec::new());
            write_sender(p.sender, p.tag, &mut sender);
            write_recipient(p.recipient, &mut recipient);
            let sender = if sender == b"<>" {
                &[][..]
            } else {
                &sender[..]
            };
            assert_eq!(tr.sender.as_bytes(), sender);
            assert_eq!(tr.recipient.as_bytes(), &recipient[..]);
            block.clear();
            w.policy(&cfg, t, &mut block);
            match policy::parse(&block, &policy::BlockLimits::default()) {
                Ok(policy::Block::Complete { consumed, request }) => {
                    assert_eq!(consumed, block.len());
                    assert_eq!(request.protocol_state, "RCPT");
                    assert_eq!(request.recipient, tr.recipient);
                    assert_eq!(request.sender, tr.sender);
                }
                other => panic!("{other:?}: {:?}", String::from_utf8_lossy(&block)),
            }
        }
    }

    /// The line as the codec writes it from the triplet's parts (what `native` wrote
    /// before it wrote lines in place).
    fn codec_line(cfg: &WorkloadConfig, t: u64, id: Option<u64>) -> Vec<u8> {
        use greyhound::proto::native;
        let p = parts(cfg, t);
        let (mut sender, mut recipient) = (Vec::new(), Vec::new());
        write_sender(p.sender, p.tag, &mut sender);
        if sender == b"<>" {
            sender.clear();
        }
        write_recipient(p.recipient, &mut recipient);
        let id = id.map(|id| id.to_string());
        let mut out = Vec::new();
        native::encode_request(
            &native::Request {
                id: id.as_deref(),
                command: native::Command::Check(native::Triplet {
                    client: p.client,
                    sender: ascii(&sender),
                    recipient: ascii(&recipient),
                    helo: None,
                    name: None,
                    auth: None,
                    cert: None,
                    cert_subject: None,
                    body: None,
                }),
            },
            &mut out,
        );
        out
    }

    #[test]
    fn lines_written_in_place_are_the_codecs_bytes() {
        // IPv6 nets below and above 2^16 (the third group zero or not), and the null sender
        // among the forms; IDs of every length.
        for (nets_v6, seed) in [(1, 1), (16_384, 2), (1 << 20, 3), (u32::MAX, 4)] {
            let cfg = WorkloadConfig {
                ipv6_share: 0.5,
                nets_v6,
                seed,
                ..WorkloadConfig::default()
            };
            // Written from parts, and from the senders' parts written once (half the senders
            // beyond the cached ones in the second run, so both ways are taken).
            let mut plain = RequestWriter::default();
            let small = WorkloadConfig {
                known_pool: 10,
                senders: MAX_CACHED_SENDERS * 2,
                ..cfg.clone()
            };
            for cfg in [cfg, small] {
                let mut cached =
                    RequestWriter::with_cache(Arc::new(KnownCache::build(&cfg, false)));
                for t in (0..5_000u64).chain([KNOWN_BIT | 7, (5 << 40) | 3]) {
                    for id in [None, Some(0), Some(t), Some(u64::MAX)] {
                        let want = codec_line(&cfg, t, id);
                        for w in [&mut plain, &mut cached] {
                            let mut line = Vec::new();
                            w.native(&cfg, t, id, &mut line);
                            assert_eq!(
                                String::from_utf8_lossy(&line),
                                String::from_utf8_lossy(&want)
                            );
                            // Touched first, as the client does.
                            line.clear();
                            let (touched, _) = w.touch(&cfg, t, false);
                            w.native_touched(&cfg, touched, id, &mut line);
                            assert_eq!(line, want);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn hand_written_text_matches_the_format_forms() {
        // The forms as `format!` wrote them before formatting was done by hand.
        fn sender_fmt(sender: u32, tag: u64) -> String {
            let d = sender % 9973;
            match mix(u64::from(sender)) % 32 {
                0..=17 => format!("user{sender}@mail{d}.example.com"),
                18..=20 => format!("user{sender}+{}@example{d}.org", tag % 1000),
                21..=24 => format!(
                    "list{sender}-bounces+{}=isp.example@lists{d}.example.net",
                    tag % 100_000
                ),
                25..=26 => format!(
                    "SRS0={:04x}={:02}=orig{d}.example=user{sender}@forwarder{}.example",
                    tag & 0xffff,
                    (tag >> 16) % 100,
                    d % 100
                ),
                27..=29 => format!(
                    "prvs={:010x}=user{sender}@corp{d}.example",
                    tag & 0xff_ffff_ffff
                ),
                _ => "<>".to_string(),
            }
        }
        let mut out = Vec::new();
        let samples = (0..5_000u32).chain([u32::MAX, 9972, 9973, 1 << 31]);
        for (i, s) in samples.enumerate() {
            let tag = mix(i as u64) >> (i % 64);
            for tag in [tag, 0, u64::MAX] {
                out.clear();
                write_sender(s, tag, &mut out);
                assert_eq!(String::from_utf8_lossy(&out), sender_fmt(s, tag));
            }
            out.clear();
            write_recipient(s, &mut out);
            assert_eq!(
                String::from_utf8_lossy(&out),
                format!("user{s}@isp{}.example", s % 50)
            );
        }
        for ip in [
            "0.0.0.0",
            "10.0.9.255",
            "255.255.255.255",
            "2001:db8::1",
            "2001:db8:0:5::1",
            "2001:db8:3::ff",
            "2001:db8:3:4::100",
            "2001:db8:ffff:ffff::1",
            "2001:db8:1:2:3::1",
            "::1",
            "::ffff:1.2.3.4",
        ] {
            out.clear();
            write_ip(ip.parse().unwrap(), &mut out);
            assert_eq!(String::from_utf8_lossy(&out), ip);
        }
    }

    #[test]
    fn cached_known_requests_are_the_written_ones() {
        let cfg = WorkloadConfig {
            known_pool: 300,
            ..WorkloadConfig::default()
        };
        for policy in [false, true] {
            let cache = Arc::new(KnownCache::build(&cfg, policy));
            let mut cached = RequestWriter::with_cache(cache);
            let mut plain = RequestWriter::default();
            // Cached entries, the last one, one past the pool, and triplets of other kinds.
            for t in [0, 1, 299, 300, 5, 1 << 40].into_iter().map(|i| {
                if i < 1 << 40 {
                    KNOWN_BIT | i
                } else {
                    i
                }
            }) {
                let (mut a, mut b) = (Vec::new(), Vec::new());
                if policy {
                    cached.policy(&cfg, t, &mut a);
                    plain.policy(&cfg, t, &mut b);
                } else {
                    cached.native(&cfg, t, Some(t & 0xffff), &mut a);
                    plain.native(&cfg, t, Some(t & 0xffff), &mut b);
                }
                assert_eq!(a, b, "{policy} {t}");
            }
        }
    }

    /// Drives `nodes` connections of one worker in turn, one request each, for `secs`
    /// simulated seconds at `per_sec` requests per second; returns (node, kind, triplet, time).
    fn route(nodes: usize, secs: f64, per_sec: f64) -> Vec<(usize, Kind, u64, f64)> {
        let cfg = WorkloadConfig {
            server_delay: 2.0,
            known_pool: 1000,
            ..WorkloadConfig::default()
        };
        let mut g = Generator::new(&cfg, 5).with_nodes(nodes);
        let steps = (secs * per_sec) as u64;
        (0..steps)
            .map(|i| {
                let node = (i % nodes as u64) as usize;
                let now = i as f64 / per_sec;
                let (kind, t) = g.next_for(now, node);
                (node, kind, t, now)
            })
            .collect()
    }

    #[test]
    fn retries_never_reach_the_node_of_the_first_attempt() {
        for nodes in [2, 3, 5] {
            let mut first: std::collections::HashMap<u64, (usize, f64)> = Default::default();
            let mut counts = [0u64; 4];
            for (node, kind, t, now) in route(nodes, 20.0, 500.0) {
                counts[kind as usize] += 1;
                match kind {
                    Kind::New => {
                        // A new triplet goes to its home node, and is new only once.
                        assert_eq!(home(t, nodes), node, "{nodes} nodes: {t:#x}");
                        assert!(first.insert(t, (node, now)).is_none());
                    }
                    Kind::EarlyRetry | Kind::Retry => {
                        let (at, when) = first[&t];
                        assert_eq!(home(t, nodes), at);
                        assert_ne!(
                            node, at,
                            "{nodes} nodes: {kind:?} of {t:#x} to its first node"
                        );
                        let age = now - when;
                        assert_eq!(kind == Kind::Retry, age >= 2.0, "{kind:?} at age {age}");
                    }
                    Kind::Known => assert!(t & KNOWN_BIT != 0),
                }
            }
            // Every kind was drawn, so the rule was exercised for each.
            assert!(counts.iter().all(|&c| c > 100), "{nodes} nodes: {counts:?}");
        }
    }

    #[test]
    fn one_node_is_the_single_target_generator() {
        // Draw for draw the same triplets as a generator that never heard of nodes.
        let cfg = WorkloadConfig {
            server_delay: 1.0,
            ..WorkloadConfig::default()
        };
        let mut plain = Generator::new(&cfg, 2);
        let mut one = Generator::new(&cfg, 2).with_nodes(1);
        for i in 0..20_000u64 {
            let now = i as f64 / 2000.0;
            let a = plain.next(now);
            assert_eq!(a, one.next_for(now, 0));
            assert_eq!(home(a.1, 1), 0);
        }
        assert_eq!(plain.counts, one.counts);
        assert!(plain.counts.retry > 0 && plain.counts.early_retry > 0);
        // New triplets numbered 0, 1, 2, … per worker, as before clusters.
        let cfg = WorkloadConfig {
            mix: Mix {
                new: 1.0,
                early_retry: 0.0,
                retry: 0.0,
                known: 0.0,
            },
            ..cfg
        };
        let mut g = Generator::new(&cfg, 3).with_nodes(1);
        let ts: Vec<u64> = (0..4).map(|_| g.next_for(0.0, 0).1).collect();
        assert_eq!(ts, (0..4).map(|i| (3 << 40) | i).collect::<Vec<_>>());
    }

    #[test]
    fn known_pool_requests_spread_evenly_over_the_nodes() {
        let nodes = 3;
        let mut per_node = [0u64; 3];
        let mut nodes_of: std::collections::HashMap<u64, u8> = Default::default();
        for (node, kind, t, _) in route(nodes, 40.0, 1500.0) {
            if kind == Kind::Known {
                per_node[node] += 1;
                *nodes_of.entry(t).or_default() |= 1 << node;
            }
        }
        let total: u64 = per_node.iter().sum();
        for n in per_node {
            // ~14,000 each: within 3 % of a third.
            assert!(
                (n as f64 / total as f64 - 1.0 / 3.0).abs() < 0.01,
                "{per_node:?}"
            );
        }
        // A pool triplet reaches every node, not one fixed node.
        let everywhere = nodes_of.values().filter(|&&m| m == 0b111).count();
        assert!(
            everywhere > nodes_of.len() * 9 / 10,
            "{everywhere} of {}",
            nodes_of.len()
        );
    }

    #[test]
    fn warm_up_passes_send_the_pool_once_each_retry_to_another_node() {
        let cfg = WorkloadConfig {
            known_pool: 1001,
            ..WorkloadConfig::default()
        };
        for nodes in [1usize, 2, 3, 4] {
            let mut pass_node = Vec::new();
            for shift in [0, 1] {
                let sweep = Arc::new(Sweep::new(nodes, shift));
                let total: u64 = (0..nodes).map(|j| sweep.share(cfg.known_pool, j)).sum();
                assert_eq!(total, u64::from(cfg.known_pool));
                let mut g = Generator::sweep(&cfg, 0, sweep.clone());
                let mut node_of = vec![usize::MAX; cfg.known_pool as usize];
                for j in 0..nodes {
                    for _ in 0..sweep.share(cfg.known_pool, j) {
                        let (kind, t) = g.next_for(0.0, j);
                        assert_eq!(kind, Kind::Known);
                        let i = (t & !KNOWN_BIT) as usize;
                        assert_eq!(node_of[i], usize::MAX, "{t:#x} sent twice in a pass");
                        node_of[i] = j;
                    }
                }
                assert!(node_of.iter().all(|&j| j < nodes));
                pass_node.push(node_of);
            }
            for (i, (&first, &second)) in pass_node[0].iter().zip(&pass_node[1]).enumerate() {
                assert_eq!(first, home(KNOWN_BIT | i as u64, nodes));
                if nodes > 1 {
                    assert_ne!(first, second);
                }
            }
        }
    }

    #[test]
    fn retry_repeats_the_same_bytes() {
        let cfg = WorkloadConfig::default();
        let mut w = RequestWriter::default();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        w.native(&cfg, 12345, Some(7), &mut a);
        w.native(&cfg, 12345, Some(7), &mut b);
        assert_eq!(a, b);
        b.clear();
        w.native(&cfg, 12346, Some(7), &mut b);
        assert_ne!(a, b);
    }
}
