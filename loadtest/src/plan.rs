//! `plan`: the engine in-process on a simulated clock, fed days or weeks of mail.
//!
//! Time advances one simulated second per step on a [`ManualClock`]. Each second brings the
//! arrivals of that second (mean rate × a daily curve) and the retries that fall due; each
//! attempt is one decision of a real [`Engine`]. A deferred message is retried on its
//! sender's schedule until it passes or its sender gives up (5 days, Postfix's
//! `maximal_queue_lifetime`).
//!
//! ## Pool identities
//! Provider pools retry from another address of the pool. `pool_identity` runs the
//! simulation with each address its own client network (`--client-identity prefix`), with
//! every address of a pool under one `spf:` identity (the engine's identity path: the pool's
//! key first, the address's network looked up too, the auto-whitelist by the pool), or both,
//! on the same arrivals, and compares the delays by sender type.
//!
//! ## Sampling
//! A week at 1,000 messages/s is ~600 M messages; the engine decides a few million per
//! second per core, so the full stream cannot be simulated in a minute. The planner therefore
//! simulates a consistent **1-in-k sample of the senders** (legitimate sending organisations
//! with their whole address pool, spam messages one by one) and multiplies counts by k.
//! Everything greylisting does is per sender (triplets) or per client network (the
//! auto-whitelist), and sampled senders keep all their networks, so per-message results
//! (delays, spam stopped) are unbiased and table sizes are k × the sample's. The report
//! states k; `--sample 1` simulates everything.
//!
//! Triplets are keyed directly (a 128-bit mix of network, sender and recipient numbers)
//! instead of hashing strings: the planner studies the table over time; the cost of the
//! string path is in the headroom benchmark at the end, which uses it.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use greyhound::engine::{
    ClientNet, Decision, Engine, EngineConfig, HashSecret, Key, Keyed, ManualClock, Mode,
    Normalizer, Policy, Query, TripletRecord,
};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::rng::{mix, mix2, Rng};

/// Engine time at which the simulation starts (any time inside the 31-bit range works).
const T0: u32 = 100_000_000;
/// Calendar ring for pending retries, in seconds; longer than any single retry gap.
const RING: usize = 1 << 16;
/// Decisions the automatic sample size aims at: ~10–20 s of simulation on one core.
const AUTO_DECISIONS: f64 = 30e6;

/// Legitimate sender types, in report order (the order of [`Class`]).
pub const SENDER_TYPES: [&str; LEGIT] = [
    "postfix",
    "exim",
    "exchange",
    "sendmail",
    "qmail",
    "courier",
    "momentum",
    "mailenable",
    "pool",
];

/// Number of legitimate sender types.
const LEGIT: usize = 9;

/// Shares of the legitimate sender types (any scale: they are divided by their sum). The
/// types added with the pool study default to 0 when an older JSON configuration lacks them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SenderMix {
    /// Postfix: retries after 300 s, doubling to 4000 s.
    pub postfix: f64,
    /// Exim: every 15 min for 2 h, then from 1 h growing ×1.5 until 16 h, then every 6 h.
    pub exim: f64,
    /// Exchange: every minute 4 times, then every 5 min.
    pub exchange: f64,
    /// Sendmail: every 15 min (its queue-run interval).
    #[serde(default)]
    pub sendmail: f64,
    /// Qmail: attempts at 400·n² s (0, 6:40, 26:40, 1:00:00, …).
    #[serde(default)]
    pub qmail: f64,
    /// Courier: 5, 10, 15, 30, 35, 40, 70, 75, 80 … min.
    #[serde(default)]
    pub courier: f64,
    /// Momentum: 20, 60, 100, 180 … min.
    #[serde(default)]
    pub momentum: f64,
    /// MailEnable: retries after 15, 30, 60, then every 240 min.
    #[serde(default)]
    pub mailenable: f64,
    /// Provider pools: retry after 5–15 min, each time from a random address of the pool.
    pub pool: f64,
}

impl SenderMix {
    /// The shares in [`SENDER_TYPES`] order.
    pub fn shares(&self) -> [f64; LEGIT] {
        [
            self.postfix,
            self.exim,
            self.exchange,
            self.sendmail,
            self.qmail,
            self.courier,
            self.momentum,
            self.mailenable,
            self.pool,
        ]
    }
}

impl Default for SenderMix {
    fn default() -> Self {
        Self {
            postfix: 0.3,
            exim: 0.15,
            exchange: 0.15,
            sendmail: 0.05,
            qmail: 0.03,
            courier: 0.02,
            momentum: 0.05,
            mailenable: 0.02,
            pool: 0.23,
        }
    }
}

/// Which pool model `plan` simulates: the engine keyed on each pool address's own network
/// (`off`, today's engine), on one client identity per pool (`on`, what an `spf:`/`name:`
/// identity does to the key), or both, one run each on the same arrivals.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolIdentity {
    /// Every pool address is its own client network.
    Off,
    /// Every address of one pool is the same client.
    On,
    /// Two runs, `off` then `on`.
    #[default]
    Both,
}

impl PoolIdentity {
    /// The runs this setting asks for, as `identity on?` flags.
    fn runs(self) -> &'static [bool] {
        match self {
            Self::Off => &[false],
            Self::On => &[true],
            Self::Both => &[false, true],
        }
    }
}

impl std::str::FromStr for PoolIdentity {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(Self::Off),
            "on" => Ok(Self::On),
            "both" => Ok(Self::Both),
            _ => Err(format!("{s}: expected on, off or both")),
        }
    }
}

/// Name of a run in the report.
fn run_name(identity: bool) -> &'static str {
    if identity {
        "on"
    } else {
        "off"
    }
}

/// Everything `plan` simulates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanConfig {
    /// Simulated days.
    pub days: f64,
    /// Mean arrival rate, messages (one recipient each) per second, over the day.
    pub rate: f64,
    /// Busiest over quietest hour of the daily curve (a sine with its peak at 15:00).
    pub peak_ratio: f64,
    /// Share of messages that are spam.
    pub spam_share: f64,
    /// Legitimate sending organisations (each one client network, or a pool of them).
    pub senders: u32,
    /// Local recipients.
    pub recipients: u32,
    /// Distinct recipients each sender writes to (its correspondents).
    pub fanout: u32,
    /// Legitimate sender types.
    pub mix: SenderMix,
    /// Client networks in a provider's pool (one sending address in each).
    pub pool_nets: u32,
    /// Pool identity off, on or both (one simulation each).
    #[serde(default)]
    pub pool_identity: PoolIdentity,
    /// Share of spam that retries once, a few seconds later (5–60 s).
    pub spam_retry_once: f64,
    /// Share of spam sent through real MTAs that retry like Postfix (snowshoe spam).
    pub spam_mta: f64,
    /// Client networks of those spam MTAs.
    pub spam_mta_nets: u32,
    /// Client networks of the botnet (spam that does not use an MTA).
    pub spam_nets: u64,
    /// The greylisting settings under test, as the engine takes them; flattened so that the
    /// JSON report lists them beside the others (`delay`, `retry_window`, ...).
    #[serde(flatten)]
    pub policy: Policy,
    /// Seconds a sender keeps retrying before it gives up.
    pub give_up: u32,
    /// Simulate 1 sender in this many; `None` picks one for ~30 M decisions.
    pub sample: Option<u32>,
    /// Seconds between timeline points; `None` gives about 200 points.
    pub report_every: Option<u32>,
    /// Seconds of the headroom benchmark.
    pub headroom_secs: f64,
    /// Most triplets the headroom benchmark loads (the peak live count, up to this).
    pub headroom_max_triplets: u64,
    /// Seed of every random choice.
    pub seed: u64,
}

impl Default for PlanConfig {
    fn default() -> Self {
        Self {
            days: 7.0,
            rate: 1000.0,
            peak_ratio: 3.0,
            spam_share: 0.5,
            senders: 50_000,
            recipients: 1_000_000,
            fanout: 200,
            mix: SenderMix::default(),
            pool_nets: 8,
            pool_identity: PoolIdentity::Both,
            spam_retry_once: 0.2,
            spam_mta: 0.05,
            spam_mta_nets: 2_000,
            spam_nets: 5_000_000,
            policy: Policy::default(),
            give_up: 5 * 86_400,
            sample: None,
            report_every: None,
            headroom_secs: 1.0,
            headroom_max_triplets: 10_000_000,
            seed: 1,
        }
    }
}

/// One point of the timeline; counts are full scale (sample × k).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Point {
    /// Simulated hours since the start.
    pub hours: f64,
    /// Messages arriving per second over the last interval (first attempts).
    pub arrivals_per_sec: f64,
    /// Decisions per second over the last interval (first attempts and retries).
    pub decisions_per_sec: f64,
    /// Greylisted triplet records (including expired ones expiry has not reached yet).
    pub greylisted: u64,
    /// Whitelisted triplet records.
    pub whitelisted: u64,
    /// Client records in the auto-whitelist table.
    pub awl_clients: u64,
    /// Engine table bytes (`Engine::stats().table_bytes`: slot arrays and wheel keys, measured
    /// on the sample's tables, × k).
    pub table_bytes: u64,
    /// Resident memory of this process (VmRSS), as measured, not scaled.
    pub rss_bytes: u64,
    /// Records removed by expiry per second over the last interval.
    pub expiries_per_sec: f64,
}

/// Delay legitimate mail saw, for one sender type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Delays {
    /// Messages delivered (passed), × k.
    pub delivered: u64,
    /// Of those, delayed at least once, × k.
    pub delayed: u64,
    /// Delivered after more than 15 minutes, × k.
    pub delayed_over_15min: u64,
    /// Gave up before passing, × k.
    pub not_delivered: u64,
    /// Still retrying when the simulation ended, × k.
    pub pending_at_end: u64,
    /// Median delay of all delivered messages, seconds.
    pub median_secs: f64,
    /// 90th percentile of all delivered messages, seconds.
    pub p90_secs: f64,
    /// 95th percentile of all delivered messages, seconds.
    pub p95_secs: f64,
    /// Median delay of the delayed messages only, seconds.
    pub delayed_median_secs: f64,
    /// 90th percentile of the delayed messages only, seconds.
    pub delayed_p90_secs: f64,
    /// 95th percentile of the delayed messages only, seconds.
    pub delayed_p95_secs: f64,
    /// Longest delay, seconds.
    pub max_secs: f64,
}

/// What pool identities change for one sender type: the same arrivals simulated with the
/// identity off and on. Delays are of the delayed messages only (most mail is not delayed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct IdentityEffect {
    /// Share of delivered messages delayed at all, identity off.
    pub delayed_share_off: f64,
    /// Share of delivered messages delayed at all, identity on.
    pub delayed_share_on: f64,
    /// Median delay of the delayed messages, identity off, seconds.
    pub delayed_median_off_secs: f64,
    /// Median delay of the delayed messages, identity on, seconds.
    pub delayed_median_on_secs: f64,
    /// 95th percentile delay of the delayed messages, identity off, seconds.
    pub delayed_p95_off_secs: f64,
    /// 95th percentile delay of the delayed messages, identity on, seconds.
    pub delayed_p95_on_secs: f64,
    /// Longest delay, identity off, seconds.
    pub max_off_secs: f64,
    /// Longest delay, identity on, seconds.
    pub max_on_secs: f64,
    /// `delayed_median_off_secs - delayed_median_on_secs`: what the identity saves.
    pub median_saved_secs: f64,
    /// `delayed_p95_off_secs - delayed_p95_on_secs`.
    pub p95_saved_secs: f64,
}

impl IdentityEffect {
    fn new(off: &Delays, on: &Delays) -> Self {
        let share = |d: &Delays| d.delayed as f64 / d.delivered.max(1) as f64;
        Self {
            delayed_share_off: share(off),
            delayed_share_on: share(on),
            delayed_median_off_secs: off.delayed_median_secs,
            delayed_median_on_secs: on.delayed_median_secs,
            delayed_p95_off_secs: off.delayed_p95_secs,
            delayed_p95_on_secs: on.delayed_p95_secs,
            max_off_secs: off.max_secs,
            max_on_secs: on.max_secs,
            median_saved_secs: off.delayed_median_secs - on.delayed_median_secs,
            p95_saved_secs: off.delayed_p95_secs - on.delayed_p95_secs,
        }
    }
}

/// What happened to spam.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct SpamOutcome {
    /// Spam messages, × k.
    pub messages: u64,
    /// Passed greylisting (after retrying through an MTA), × k.
    pub passed: u64,
    /// Never passed, × k.
    pub stopped: u64,
    /// Still retrying at the end, × k.
    pub pending_at_end: u64,
    /// `stopped / (messages - pending_at_end)`.
    pub stopped_share: f64,
}

/// The short in-process benchmark at the end.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Headroom {
    /// Live triplets loaded before measuring.
    pub triplets: u64,
    /// Threads deciding.
    pub threads: usize,
    /// Decisions per second this machine reached, from raw strings (normalise, hash, decide).
    pub decisions_per_sec: f64,
    /// The busiest interval's decisions per second in the simulation (full scale).
    pub peak_needed_per_sec: f64,
    /// `decisions_per_sec / peak_needed_per_sec`.
    pub factor: f64,
}

/// The whole `plan` report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanReport {
    /// Always [`PlanReport::SCHEMA`].
    pub schema: String,
    /// What was simulated.
    pub config: PlanConfig,
    /// 1 in this many senders simulated; counts are multiplied by it.
    pub sample: u32,
    /// Legitimate senders in the sample (few means noisy per-sender figures).
    pub sampled_senders: u64,
    /// Simulated seconds (of each run).
    pub simulated_secs: u64,
    /// Wall time of the simulation runs together (without the headroom benchmark).
    pub wall_secs: f64,
    /// Decisions the simulation runs made together (not scaled).
    pub decisions_simulated: u64,
    /// The runs made: `["off"]`, `["on"]` or `["off", "on"]` (pool identity); the timeline,
    /// `legit`, `spam`, `headroom` and `delay_cdf` are those of the first.
    pub runs: Vec<String>,
    /// The table over time.
    pub timeline: Vec<Point>,
    /// Delay of legitimate mail by sender type (and `all`).
    pub legit: BTreeMap<String, Delays>,
    /// `legit` of every run, by run name (`off`, `on`).
    pub legit_by_pool_identity: BTreeMap<String, BTreeMap<String, Delays>>,
    /// With both runs: by sender type (and `all`), the delay with the identity off and on and
    /// the difference. Empty with one run.
    pub pool_identity_effect: BTreeMap<String, IdentityEffect>,
    /// Share of delivered legitimate mail delayed more than 15 minutes.
    pub legit_delayed_over_15min_share: f64,
    /// What happened to spam.
    pub spam: SpamOutcome,
    /// Decisions/s this machine has left at the peak table size.
    pub headroom: Headroom,
    /// Delay distribution of the delayed messages (seconds, share of them delivered within)
    /// by sender type, for the chart.
    pub delay_cdf: BTreeMap<String, Vec<(f64, f64)>>,
}

impl PlanReport {
    /// Schema name and version of the JSON form.
    pub const SCHEMA: &'static str = "greyhound-loadtest/plan/2";

    /// The report for people: a timeline every few hours, then the results.
    pub fn text(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let c = &self.config;
        let p = &c.policy;
        let _ = writeln!(
            s,
            "plan: {} days at {:.0} msg/s (peak/trough {}), {:.0} % spam, {} senders, {} recipients",
            c.days, c.rate, c.peak_ratio, 100.0 * c.spam_share, c.senders, c.recipients
        );
        let _ = writeln!(
            s,
            "      delay {} s, retry window {} s, whitelist {} s, awl-clients {} (interval {} s, ttl {} s)",
            p.delay, p.retry_window, p.whitelist_ttl, p.awl_clients, p.awl_interval, p.awl_ttl
        );
        let _ = writeln!(
            s,
            "      simulated 1 in {} senders ({} decisions) in {:.1} s; counts and table bytes are \
             scaled up by {}",
            self.sample, self.decisions_simulated, self.wall_secs, self.sample
        );
        if self.runs.len() > 1 {
            let _ = writeln!(
                s,
                "      {} runs on the same arrivals, pool identity {}; the timeline, delays and \
                 spam below are of the first",
                self.runs.len(),
                self.runs.join(", then ")
            );
        } else if let Some(r) = self.runs.first() {
            let _ = writeln!(s, "      pool identity {r}");
        }
        if self.sampled_senders < 1000 {
            let _ = writeln!(
                s,
                "      note: only {} legitimate senders in the sample; raise --senders or lower \
                 --sample for steadier per-sender figures",
                self.sampled_senders
            );
        }
        let _ = writeln!(
            s,
            "\n{:>7} {:>9} {:>11} {:>12} {:>12} {:>10} {:>11} {:>10} {:>10}",
            "hours",
            "msg/s",
            "decisions/s",
            "greylisted",
            "whitelisted",
            "awl",
            "table MiB",
            "RSS+ MiB",
            "expired/s"
        );
        // About 30 lines whatever the length; the JSON has every point.
        let step = (self.timeline.len() / 30).max(1);
        let mib = 1024.0 * 1024.0;
        for (i, p) in self.timeline.iter().enumerate() {
            if i % step != 0 && i + 1 != self.timeline.len() {
                continue;
            }
            let _ = writeln!(
                s,
                "{:>7.1} {:>9.0} {:>11.0} {:>12} {:>12} {:>10} {:>11.1} {:>10.1} {:>10.1}",
                p.hours,
                p.arrivals_per_sec,
                p.decisions_per_sec,
                p.greylisted,
                p.whitelisted,
                p.awl_clients,
                p.table_bytes as f64 / mib,
                p.rss_bytes as f64 / mib,
                p.expiries_per_sec
            );
        }
        let _ = writeln!(
            s,
            "\nlegitimate mail     delivered    delayed  median   p90  | delayed: median    p90      max  | not delivered"
        );
        let mut names: Vec<&str> = SENDER_TYPES.to_vec();
        names.push("all");
        for name in names {
            let Some(d) = self.legit.get(name) else {
                continue;
            };
            let _ = writeln!(
                s,
                "  {:<16} {:>11} {:>9.1}% {:>6} {:>6}  |        {:>6} {:>6} {:>8}  | {}",
                name,
                d.delivered,
                100.0 * d.delayed as f64 / d.delivered.max(1) as f64,
                secs(d.median_secs),
                secs(d.p90_secs),
                secs(d.delayed_median_secs),
                secs(d.delayed_p90_secs),
                secs(d.max_secs),
                d.not_delivered
            );
        }
        let _ = writeln!(
            s,
            "  delayed more than 15 min: {:.2} % of delivered legitimate mail",
            100.0 * self.legit_delayed_over_15min_share
        );
        if !self.pool_identity_effect.is_empty() {
            let _ = writeln!(
                s,
                "\npool identity (simulated: on = one client per pool, as spf:/name: key it; \
                 off = each pool address its own network; delayed mail only)"
            );
            let _ = writeln!(
                s,
                "  {:<12} {:>15}  {:>17}  {:>17}  {:>17}  {:>9} {:>9}",
                "sender",
                "delayed off/on",
                "median off → on",
                "p95 off → on",
                "max off → on",
                "saved p50",
                "saved p95"
            );
            let mut names: Vec<&str> = SENDER_TYPES.to_vec();
            names.push("all");
            for name in names {
                let Some(e) = self.pool_identity_effect.get(name) else {
                    continue;
                };
                let _ = writeln!(
                    s,
                    "  {:<12} {:>6.1}%/{:>6.1}%  {:>7} → {:>7}  {:>7} → {:>7}  {:>7} → {:>7}  {:>9} {:>9}",
                    name,
                    100.0 * e.delayed_share_off,
                    100.0 * e.delayed_share_on,
                    secs(e.delayed_median_off_secs),
                    secs(e.delayed_median_on_secs),
                    secs(e.delayed_p95_off_secs),
                    secs(e.delayed_p95_on_secs),
                    secs(e.max_off_secs),
                    secs(e.max_on_secs),
                    signed_secs(e.median_saved_secs),
                    signed_secs(e.p95_saved_secs)
                );
            }
        }
        let sp = &self.spam;
        let _ = writeln!(
            s,
            "spam: {} messages, {:.1} % stopped ({} passed after retrying, {} still retrying at the end)",
            sp.messages,
            100.0 * sp.stopped_share,
            sp.passed,
            sp.pending_at_end
        );
        let h = &self.headroom;
        let _ = writeln!(
            s,
            "headroom: {:.2} M decisions/s on {} threads at {} live triplets (raw strings); \
             peak need {:.0}/s: {:.0}× headroom",
            h.decisions_per_sec / 1e6,
            h.threads,
            h.triplets,
            h.peak_needed_per_sec,
            h.factor
        );
        s
    }
}

/// Seconds as a short duration: `0`, `45s`, `12m`, `3.5h`.
fn secs(s: f64) -> String {
    if s <= 0.0 {
        "0".into()
    } else if s < 120.0 {
        format!("{s:.0}s")
    } else if s < 7200.0 {
        format!("{:.0}m", s / 60.0)
    } else {
        format!("{:.1}h", s / 3600.0)
    }
}

/// [`secs`] with a sign for negative values.
fn signed_secs(s: f64) -> String {
    if s < 0.0 {
        format!("-{}", secs(-s))
    } else {
        secs(s)
    }
}

/// What sends a message: the legitimate types in [`SENDER_TYPES`] order, then spam.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Class {
    Postfix = 0,
    Exim = 1,
    Exchange = 2,
    Sendmail = 3,
    Qmail = 4,
    Courier = 5,
    Momentum = 6,
    MailEnable = 7,
    Pool = 8,
    SpamNever = 9,
    SpamOnce = 10,
    SpamMta = 11,
}

/// Number of classes.
const CLASSES: usize = 12;

impl Class {
    const LEGIT: [Class; LEGIT] = [
        Class::Postfix,
        Class::Exim,
        Class::Exchange,
        Class::Sendmail,
        Class::Qmail,
        Class::Courier,
        Class::Momentum,
        Class::MailEnable,
        Class::Pool,
    ];

    fn is_spam(self) -> bool {
        self as usize >= LEGIT
    }
}

/// One delivery attempt waiting in the calendar.
#[derive(Debug, Clone, Copy)]
struct Attempt {
    net: u64,
    who: u64,
    rcpt: u32,
    first: u32,
    tries: u16,
    class: Class,
}

/// Seconds until the next try after `tries` failed ones (the first attempt counts), `elapsed`
/// after the first. Each schedule is its MTA's documented default; where it has a random part
/// (Postfix's queue scan, pools) that is said.
fn retry_gap(class: Class, tries: u16, elapsed: u32, rng: &mut Rng) -> Option<u32> {
    const MIN: u32 = 60;
    let gap = match class {
        // Postfix: minimal_backoff_time 300 s doubling to maximal_backoff_time 4000 s
        // (postconf(5) defaults); the queue manager's scan (queue_run_delay 300 s, but a
        // deferred message is picked up as soon as its backoff ends within a scan) adds up
        // to a minute here.
        Class::Postfix | Class::SpamMta => {
            (300u32 << (tries - 1).min(4)).min(4000) + rng.below(60) as u32
        }
        // Exim's default retry rule, from the default configure file (spec chapter "Retry
        // configuration"): `* * F,2h,15m; G,16h,1h,1.5; F,4d,6h`. In the G phase the gap
        // is max(1 h, previous gap × 1.5) (retry.c), so 1 h, 1.5 h, 2.25 h … after the
        // 9 attempts of the first 2 h.
        Class::Exim => {
            if elapsed < 2 * 3600 {
                15 * MIN
            } else if elapsed < 16 * 3600 {
                let n = (i32::from(tries) - 9).max(0);
                (3600.0 * 1.5f64.powi(n)) as u32
            } else {
                6 * 3600
            }
        }
        // Exchange: the earlier model of this planner, kept: every minute 4 times,
        // then every 5 min. Not checked against Exchange's transport
        // settings (Set-TransportService retry intervals), which an operator can change.
        Class::Exchange => {
            if tries <= 4 {
                MIN
            } else {
                5 * MIN
            }
        }
        // Sendmail retries at every queue run; the interval is the `-q` flag of the daemon,
        // 15 min as in DESIGN §11 (distributions ship 30 min to 1 h). Queue runs are
        // modelled as starting at the first attempt.
        Class::Sendmail => 15 * MIN,
        // qmail-send (qmail-send.c, `nextretry`): a remote delivery is retried at
        // birth + (⌊√age⌋ + 20)² s, i.e. at (20·n)²: 0, 400 (6:40), 1600 (26:40), 3600,
        // 6400 s …; the gap after n failed tries is 400·(n² − (n−1)²) = 400·(2n − 1).
        Class::Qmail => 400 * (2 * u32::from(tries) - 1),
        // Courier's courierd (courier(8), control files retryalpha 5 min, retrybeta 3,
        // retrygamma 15 min, retrymaxdelta 3): retrybeta tries retryalpha apart, then a wait
        // of retrygamma doubling each round up to retrygamma·2^retrymaxdelta:
        // 5, 10, 15, 30, 35, 40, 70, 75, 80, 140, 145, 150, 270 … min.
        Class::Courier => {
            let i = u32::from(tries);
            if i <= 3 || (i - 1) % 3 != 0 {
                5 * MIN
            } else {
                (15 * MIN) << ((i - 1) / 3 - 1).min(3)
            }
        }
        // Momentum (Message Systems): Retry_Interval default 1200 s; DESIGN §11 lists its
        // attempts as 20, 60, 100, 180 … min, gaps 20, 40, 40, 80: the interval doubles
        // every second retry (the continuation 260, 420 … min is that rule carried on).
        Class::Momentum => (20 * MIN) << (u32::from(tries) / 2).min(10),
        // MailEnable's SMTP connector defaults (mailenable.com Help "SMTP delivery
        // options"): first retry after 15 min, second after 30, third after 60, then every
        // 240 min.
        Class::MailEnable => match tries {
            1 => 15 * MIN,
            2 => 30 * MIN,
            3 => 60 * MIN,
            _ => 240 * MIN,
        },
        // Provider pools (large webmail providers): no published schedule; observed retries
        // come 5–15 min apart, each from another address of the pool.
        Class::Pool => 300 + rng.below(600) as u32,
        Class::SpamOnce => {
            if tries > 1 {
                return None;
            }
            5 + rng.below(56) as u32
        }
        Class::SpamNever => return None,
    };
    Some(gap)
}

fn key_of(net: u64, who: u64, rcpt: u32) -> Key {
    let a = mix2(net, who ^ (u64::from(rcpt) << 32));
    let b = mix2(a, u64::from(rcpt));
    let k = (u128::from(a) << 64) | u128::from(b);
    // The all-zero key marks an empty slot in the table; never produce it.
    Key::from_u128(k.max(1))
}

/// Marks a pool identity's key input, so that it is never a network's.
const POOL_KEY_TAG: u64 = 1 << 63;

fn client_of(net: u64) -> ClientNet {
    ClientNet::V6(Ipv6Addr::from(u128::from(net) << 64))
}

/// Per-class results.
struct Outcome {
    delays: Vec<Histogram<u64>>,
    over_15: [u64; LEGIT],
    not_delivered: [u64; LEGIT],
    spam_messages: u64,
    spam_passed: u64,
}

struct Sim<'a> {
    cfg: &'a PlanConfig,
    engine: Engine,
    /// Draws of the retries (Postfix's jitter, pool gaps and addresses), one generator per
    /// class so that a class's retries draw the same numbers in both pool-identity runs
    /// whatever the pools do; arrivals have their own generator for the same reason.
    rngs: Vec<Rng>,
    ring: Vec<Vec<Attempt>>,
    out: Outcome,
    decisions: u64,
    /// Pool identity on: every address of a pool is keyed as the pool's one client.
    identity: bool,
}

impl Sim<'_> {
    fn attempt(&mut self, mut a: Attempt, t: u32) {
        self.decisions += 1;
        let pool_nets = u64::from(self.cfg.pool_nets);
        // Pool identity on: the engine's `spf` identity path (DESIGN §11). The triplet is
        // keyed by the pool (written there when new), the address's own network is looked up
        // too (an alternate key), and the auto-whitelist counts by the pool.
        let k = if self.identity && a.class == Class::Pool {
            let pool = a.net - a.net % pool_nets;
            let mut k = Keyed::new(key_of(pool | POOL_KEY_TAG, a.who, a.rcpt), client_of(a.net));
            k.alt[0] = key_of(a.net, a.who, a.rcpt);
            k.alts = 1;
            k.awl = Some(Key::from_u128(u128::from(mix2(pool, POOL_KEY_TAG)).max(1)));
            k
        } else {
            Keyed::new(key_of(a.net, a.who, a.rcpt), client_of(a.net))
        };
        let d = self.engine.decide(&k, T0 + t, Mode::Record);
        if let Decision::Pass(_) = d {
            if a.class.is_spam() {
                self.out.spam_passed += 1;
            } else {
                let delay = t - a.first;
                let c = a.class as usize;
                self.out.delays[c].saturating_record(u64::from(delay));
                self.out.over_15[c] += u64::from(delay > 900);
            }
            return;
        }
        a.tries += 1;
        let rng = &mut self.rngs[a.class as usize];
        let Some(gap) = retry_gap(a.class, a.tries, t - a.first, rng) else {
            return;
        };
        if t + gap - a.first > self.cfg.give_up {
            if !a.class.is_spam() {
                self.out.not_delivered[a.class as usize] += 1;
            }
            return;
        }
        if a.class == Class::Pool {
            // The next try comes from another address of the pool, in one of its networks.
            a.net = a.net - a.net % pool_nets + rng.below(pool_nets);
        }
        self.ring[(t + gap) as usize % RING].push(a);
    }
}

/// The legitimate senders in the sample, with the cumulative share of the mail each sends.
struct SampledSenders {
    ids: Vec<u64>,
    cdf: Vec<f64>,
}

impl SampledSenders {
    /// Sender e of n sends the share P(⌊n·u²⌋ = e) = √((e+1)/n) − √(e/n) of the mail (the
    /// top 1 % send 10 %); a sender is in the sample when its hash is 0 modulo k.
    fn new(cfg: &PlanConfig, k: u32) -> Self {
        let n = f64::from(cfg.senders);
        let (mut ids, mut cdf) = (Vec::new(), Vec::new());
        let mut acc = 0.0;
        for e in 0..u64::from(cfg.senders) {
            if k > 1 && mix2(e, cfg.seed) % u64::from(k) != 0 {
                continue;
            }
            acc += ((e + 1) as f64 / n).sqrt() - (e as f64 / n).sqrt();
            ids.push(e);
            cdf.push(acc);
        }
        for c in &mut cdf {
            *c /= acc;
        }
        Self { ids, cdf }
    }

    fn draw(&self, rng: &mut Rng) -> u64 {
        let u = rng.unit();
        let i = self
            .cdf
            .partition_point(|&c| c <= u)
            .min(self.ids.len() - 1);
        self.ids[i]
    }
}

/// Fractional arrivals carried from one second to the next, so a rate of 0.3/s gives three
/// messages every ten seconds rather than none.
#[derive(Debug, Default)]
struct Carry(f64);

impl Carry {
    fn take(&mut self, x: f64) -> u64 {
        self.0 += x;
        let n = self.0.floor();
        self.0 -= n;
        n as u64
    }
}

/// Reads this process's resident memory from `/proc/self/status` (0 where there is none).
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

impl PlanConfig {
    /// Checks ranges; the message names the flag.
    pub fn validate(&self) -> anyhow::Result<()> {
        if !(self.days > 0.0 && self.days <= 366.0) {
            bail!("--days must be above 0 and at most 366");
        }
        if !(self.rate > 0.0 && self.rate.is_finite()) {
            bail!("--rate must be a positive number of messages per second");
        }
        if !(self.peak_ratio >= 1.0 && self.peak_ratio.is_finite()) {
            bail!("--peak-ratio must be at least 1");
        }
        for (name, v) in [
            ("--spam-share", self.spam_share),
            ("--spam-retry-once", self.spam_retry_once),
            ("--spam-mta", self.spam_mta),
        ] {
            if !(0.0..=1.0).contains(&v) {
                bail!("{name} must be between 0 and 1");
            }
        }
        if self.spam_retry_once + self.spam_mta > 1.0 {
            bail!("--spam-retry-once plus --spam-mta must not exceed 1");
        }
        let shares = self.mix.shares();
        if shares.iter().any(|v| !(*v >= 0.0 && v.is_finite())) || shares.iter().sum::<f64>() <= 0.0
        {
            bail!(
                "--postfix/--exim/--exchange/--sendmail/--qmail/--courier/--momentum/--mailenable/--pool \
                 shares must be >= 0 and not all 0"
            );
        }
        if self.senders == 0
            || self.recipients == 0
            || self.fanout == 0
            || self.pool_nets == 0
            || self.spam_mta_nets == 0
            || self.spam_nets == 0
        {
            bail!("--senders, --recipients, --fanout, --pool-nets, --spam-mta-nets, --spam-nets must be > 0");
        }
        if self.sample == Some(0) {
            bail!("--sample must be at least 1");
        }
        if self.give_up as usize >= RING * 64 {
            bail!("--give-up is too long");
        }
        self.policy.validate()?;
        Ok(())
    }

    /// Arrival rate at second `t` of the simulation (messages/s).
    pub fn rate_at(&self, t: u32) -> f64 {
        let a = (self.peak_ratio - 1.0) / (self.peak_ratio + 1.0);
        let day = f64::from(t % 86_400) / 86_400.0;
        // Peak at 15:00 (0.625 of the day), trough at 03:00.
        self.rate * (1.0 + a * (std::f64::consts::TAU * (day - 0.375)).sin())
    }

    fn sample_size(&self) -> u32 {
        self.sample.unwrap_or_else(|| {
            let expected = self.rate * self.days * 86_400.0 * 1.2;
            (expected / AUTO_DECISIONS).ceil().max(1.0) as u32
        })
    }
}

/// Runs the simulation (once per pool-identity setting asked for, on the same arrivals), then
/// the headroom benchmark. `progress` is called with the share done (0–1) now and then.
pub fn plan(cfg: &PlanConfig, mut progress: impl FnMut(f64)) -> anyhow::Result<PlanReport> {
    cfg.validate()?;
    let wall = Instant::now();
    let k = cfg.sample_size();
    let senders = SampledSenders::new(cfg, k);
    if senders.ids.is_empty() {
        bail!(
            "no legitimate sender is in a 1-in-{k} sample of {}: lower --sample or raise --senders",
            cfg.senders
        );
    }
    let modes = cfg.pool_identity.runs();
    let mut runs = Vec::new();
    for (i, &identity) in modes.iter().enumerate() {
        let n = modes.len() as f64;
        runs.push(simulate(cfg, k, &senders, identity, &mut |done| {
            progress((i as f64 + done) / n)
        }));
    }
    let wall_secs = wall.elapsed().as_secs_f64();
    let decisions: u64 = runs.iter().map(|r| r.decisions).sum();
    let legit_by_pool_identity: BTreeMap<String, BTreeMap<String, Delays>> = modes
        .iter()
        .zip(&runs)
        .map(|(&id, r)| (run_name(id).to_string(), r.legit.clone()))
        .collect();
    let mut pool_identity_effect = BTreeMap::new();
    if let (Some(off), Some(on)) = (
        legit_by_pool_identity.get("off"),
        legit_by_pool_identity.get("on"),
    ) {
        for (name, d) in off {
            if let Some(e) = on.get(name) {
                pool_identity_effect.insert(name.clone(), IdentityEffect::new(d, e));
            }
        }
    }
    let first = runs.swap_remove(0);
    drop(runs);
    let peak_live = first
        .timeline
        .iter()
        .map(|p| p.greylisted + p.whitelisted)
        .max()
        .unwrap_or(0);
    let peak_needed = first
        .timeline
        .iter()
        .map(|p| p.decisions_per_sec)
        .fold(0.0, f64::max);
    let mut headroom = headroom(
        peak_live.min(cfg.headroom_max_triplets),
        Duration::from_secs_f64(cfg.headroom_secs),
    );
    headroom.peak_needed_per_sec = peak_needed;
    headroom.factor = headroom.decisions_per_sec / peak_needed.max(1e-9);
    Ok(PlanReport {
        schema: PlanReport::SCHEMA.to_string(),
        config: cfg.clone(),
        sample: k,
        sampled_senders: senders.ids.len() as u64,
        simulated_secs: first.simulated_secs,
        wall_secs,
        decisions_simulated: decisions,
        runs: modes.iter().map(|&id| run_name(id).to_string()).collect(),
        timeline: first.timeline,
        legit_delayed_over_15min_share: first.over_15_share,
        legit: first.legit,
        legit_by_pool_identity,
        pool_identity_effect,
        spam: first.spam,
        headroom,
        delay_cdf: first.delay_cdf,
    })
}

/// What one simulation run found.
struct Run {
    simulated_secs: u64,
    decisions: u64,
    timeline: Vec<Point>,
    legit: BTreeMap<String, Delays>,
    over_15_share: f64,
    spam: SpamOutcome,
    delay_cdf: BTreeMap<String, Vec<(f64, f64)>>,
}

/// One simulation on a fresh engine; `identity` keys every pool address as its pool.
fn simulate(
    cfg: &PlanConfig,
    k: u32,
    senders: &SampledSenders,
    identity: bool,
    progress: &mut dyn FnMut(f64),
) -> Run {
    let kf = u64::from(k);
    let clock = Arc::new(ManualClock::new(T0));
    let engine = Engine::new(
        EngineConfig {
            policy: cfg.policy,
            normalizer: Normalizer::default(),
            secret: HashSecret(*b"plan-secret-key!"),
        },
        clock.clone(),
    );
    let hist = || Histogram::<u64>::new_with_bounds(1, 3_600 * 24 * 30, 3).expect("bounds");
    let mut sim = Sim {
        cfg,
        engine,
        rngs: (0..CLASSES as u64)
            .map(|c| Rng::new(mix2(cfg.seed, c + 1)))
            .collect(),
        ring: (0..RING).map(|_| Vec::new()).collect(),
        out: Outcome {
            delays: (0..LEGIT).map(|_| hist()).collect(),
            over_15: [0; LEGIT],
            not_delivered: [0; LEGIT],
            spam_messages: 0,
            spam_passed: 0,
        },
        decisions: 0,
        identity,
    };
    // Arrivals: their own generator, the same in every run.
    let mut arrive = Rng::new(cfg.seed);
    let shares = cfg.mix.shares();
    let sum: f64 = shares.iter().sum();
    let mut cuts = [0.0; LEGIT];
    let mut acc = 0.0;
    for (c, s) in cuts.iter_mut().zip(shares) {
        acc += s / sum;
        *c = acc;
    }
    let class_of = |e: u64| {
        let u = (mix(e ^ 0x5EED) >> 11) as f64 / (1u64 << 53) as f64;
        let i = cuts.partition_point(|&c| c <= u).min(LEGIT - 1);
        Class::LEGIT[i]
    };
    let total = (cfg.days * 86_400.0).round() as u32;
    let every = cfg
        .report_every
        .unwrap_or_else(|| (total / 200).max(60) / 60 * 60)
        .max(1);
    let (mut legit_carry, mut spam_carry) = (Carry::default(), Carry::default());
    let rss0 = rss_bytes();
    let mut timeline = Vec::new();
    let (mut arrivals, mut last_decisions, mut expired) = (0u64, 0u64, 0u64);
    for t in 0..total {
        let now = T0 + t;
        clock.set(now);
        let mut due = std::mem::take(&mut sim.ring[t as usize % RING]);
        for a in due.drain(..) {
            sim.attempt(a, t);
        }
        sim.ring[t as usize % RING] = due;
        let rate = cfg.rate_at(t);
        // Legitimate mail: 1/k of the arrivals, each from a sampled sender drawn by its
        // popularity, so the cost per simulated second does not grow with the full rate.
        for _ in 0..legit_carry.take(rate * (1.0 - cfg.spam_share) / f64::from(k)) {
            let e = senders.draw(&mut arrive);
            arrivals += 1;
            let class = class_of(e);
            let j = arrive.skewed(cfg.fanout.into());
            let rcpt = (mix2(e, j) % u64::from(cfg.recipients)) as u32;
            let pool = u64::from(cfg.pool_nets);
            // Every sender owns `pool_nets` consecutive network numbers; a single MTA uses
            // the first, a pool all of them.
            let net = e * pool
                + if class == Class::Pool {
                    arrive.below(pool)
                } else {
                    0
                };
            let a = Attempt {
                net,
                who: e,
                rcpt,
                first: t,
                tries: 0,
                class,
            };
            sim.attempt(a, t);
        }
        for _ in 0..spam_carry.take(rate * cfg.spam_share / f64::from(k)) {
            arrivals += 1;
            sim.out.spam_messages += 1;
            let u = arrive.unit();
            let (class, net) = if u < cfg.spam_mta {
                (
                    Class::SpamMta,
                    (1 << 62) + arrive.below(cfg.spam_mta_nets.into()),
                )
            } else if u < cfg.spam_mta + cfg.spam_retry_once {
                (Class::SpamOnce, (1 << 61) + arrive.below(cfg.spam_nets))
            } else {
                (Class::SpamNever, (1 << 61) + arrive.below(cfg.spam_nets))
            };
            let a = Attempt {
                net,
                who: arrive.next_u64(),
                rcpt: arrive.below(cfg.recipients.into()) as u32,
                first: t,
                tries: 0,
                class,
            };
            sim.attempt(a, t);
        }
        if t % 60 == 59 {
            expired += sim.engine.expire(now).removed as u64;
        }
        if (t + 1) % every == 0 || t + 1 == total {
            let s = sim.engine.stats();
            let span = f64::from(if (t + 1) % every == 0 {
                every
            } else {
                (t + 1) % every
            });
            timeline.push(Point {
                hours: f64::from(t + 1) / 3600.0,
                arrivals_per_sec: (arrivals * kf) as f64 / span,
                decisions_per_sec: ((sim.decisions - last_decisions) * kf) as f64 / span,
                greylisted: (s.triplets - s.whitelisted) as u64 * kf,
                whitelisted: s.whitelisted as u64 * kf,
                awl_clients: s.awl_clients as u64 * kf,
                table_bytes: s.table_bytes as u64 * kf,
                rss_bytes: rss_bytes().saturating_sub(rss0),
                expiries_per_sec: (expired * kf) as f64 / span,
            });
            (arrivals, last_decisions, expired) = (0, sim.decisions, 0);
            progress(f64::from(t + 1) / f64::from(total));
        }
    }
    // Messages still in the calendar are neither delivered nor given up.
    let mut pending = [0u64; CLASSES];
    for slot in &sim.ring {
        for a in slot {
            pending[a.class as usize] += 1;
        }
    }
    let mut legit = BTreeMap::new();
    let mut delay_cdf = BTreeMap::new();
    let mut all = hist();
    let mut all_d = Delays::default();
    for (c, name) in SENDER_TYPES.iter().enumerate() {
        let h = &sim.out.delays[c];
        all.add(h).expect("same bounds");
        let d = delays(
            h,
            sim.out.over_15[c],
            sim.out.not_delivered[c],
            pending[c],
            kf,
        );
        all_d.not_delivered += d.not_delivered;
        all_d.pending_at_end += d.pending_at_end;
        legit.insert(name.to_string(), d);
        delay_cdf.insert(name.to_string(), cdf(h));
    }
    let over_15: u64 = sim.out.over_15.iter().sum();
    let mut d = delays(&all, over_15, 0, 0, kf);
    d.not_delivered = all_d.not_delivered;
    d.pending_at_end = all_d.pending_at_end;
    legit.insert("all".to_string(), d);
    let spam_pending = pending[LEGIT..].iter().sum::<u64>() * kf;
    let spam_messages = sim.out.spam_messages * kf;
    let spam_passed = sim.out.spam_passed * kf;
    let stopped = spam_messages - spam_passed - spam_pending;
    let spam = SpamOutcome {
        messages: spam_messages,
        passed: spam_passed,
        stopped,
        pending_at_end: spam_pending,
        stopped_share: stopped as f64 / (spam_messages - spam_pending).max(1) as f64,
    };
    Run {
        simulated_secs: total.into(),
        decisions: sim.decisions,
        timeline,
        legit,
        over_15_share: over_15 as f64 / all.len().max(1) as f64,
        spam,
        delay_cdf,
    }
}

fn delays(h: &Histogram<u64>, over_15: u64, not_delivered: u64, pending: u64, k: u64) -> Delays {
    let n = h.len();
    let zero = h.count_between(0, 0);
    let delayed = n - zero;
    // Quantiles of the delayed messages only: shift past the undelayed ones.
    let dq = |q: f64| {
        if delayed == 0 {
            0.0
        } else {
            let z = zero as f64 / n as f64;
            h.value_at_quantile(z + q * (1.0 - z)) as f64
        }
    };
    let q = |q: f64| {
        if n == 0 {
            0.0
        } else {
            h.value_at_quantile(q) as f64
        }
    };
    Delays {
        delivered: n * k,
        delayed: delayed * k,
        delayed_over_15min: over_15 * k,
        not_delivered: not_delivered * k,
        pending_at_end: pending * k,
        median_secs: q(0.5),
        p90_secs: q(0.9),
        p95_secs: q(0.95),
        delayed_median_secs: dq(0.5),
        delayed_p90_secs: dq(0.9),
        delayed_p95_secs: dq(0.95),
        max_secs: if n == 0 { 0.0 } else { h.max() as f64 },
    }
}

/// Of the delayed messages (those deferred at least once), the share delivered within x
/// seconds, every 2 minutes up to 4 hours. Undelayed mail is left out: it is most of the
/// mail and would flatten every curve against the top of the chart.
fn cdf(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    let delayed = (h.len() - h.count_between(0, 0)).max(1) as f64;
    (0..=120)
        .map(|i| {
            let x = i * 120;
            let within = if x == 0 { 0 } else { h.count_between(1, x) };
            (x as f64, within as f64 / delayed)
        })
        .collect()
}

/// Raw strings for the headroom benchmark: triplet `i` is (a /24 picked by `i`, one of 1000
/// senders of the shapes the normaliser rewrites, one of 1000 recipients), as in the
/// project's engine bench.
struct Strings {
    senders: Vec<String>,
    recipients: Vec<String>,
}

impl Strings {
    fn new() -> Self {
        Self {
            senders: (0..1000)
                .map(|i| match i % 4 {
                    0 => format!("newsletter-{i}@lists.example{i}.com"),
                    1 => format!("bounces+{}-{i}=example.net@sender{i}.example.org", i * 7919),
                    2 => format!("John.Smith{i}@Example{i}.net"),
                    _ => format!("prvs=1234abcdef=user{i}@corp{i}.example"),
                })
                .collect(),
            recipients: (0..1000)
                .map(|i| format!("user{i}@isp{}.example", i % 50))
                .collect(),
        }
    }

    /// Triplet `i` (`i < 2^34`; distinct for distinct `i`).
    fn query(&self, i: u64) -> Query<'_> {
        let net = (((i / 1_000_000) as u32).wrapping_mul(0x9E_3779) & 0x00FF_FFFF) << 8;
        Query::new(
            IpAddr::V4(Ipv4Addr::from(net | 0x21)),
            &self.senders[(i % 1000) as usize],
            &self.recipients[(i / 1000 % 1000) as usize],
        )
    }
}

/// Loads `triplets` live triplets into a fresh engine, then decides for `secs` on every core:
/// 90 % existing triplets, 10 % new ones, from raw strings in batches of 1024, as the server
/// decides them.
pub fn headroom(triplets: u64, secs: Duration) -> Headroom {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let now = T0;
    let clock = Arc::new(ManualClock::new(now));
    let engine = Engine::new(
        EngineConfig {
            policy: Policy::default(),
            normalizer: Normalizer::default(),
            secret: HashSecret(*b"headroom-secret!"),
        },
        clock,
    );
    let w = Strings::new();
    let n = triplets.max(1);
    std::thread::scope(|s| {
        for t in 0..threads as u64 {
            let (engine, w) = (&engine, &w);
            s.spawn(move || {
                let mut chunk = Vec::with_capacity(4096);
                for i in (t..n).step_by(threads) {
                    if let Ok(k) = engine.prepare(&w.query(i)) {
                        chunk.push(TripletRecord::from_parts(
                            k.key,
                            now - 86_400,
                            now - 3600,
                            true,
                        ));
                    }
                    if chunk.len() == chunk.capacity() {
                        engine.load_triplets(chunk.drain(..), now);
                    }
                }
                engine.load_triplets(chunk.drain(..), now);
            });
        }
    });
    let start = Instant::now();
    let total: u64 = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads as u64)
            .map(|t| {
                let (engine, w) = (&engine, &w);
                s.spawn(move || {
                    let mut rng = Rng::new(t + 99);
                    let mut out = Vec::with_capacity(1024);
                    let mut queries = Vec::with_capacity(1024);
                    let mut done = 0u64;
                    while start.elapsed() < secs {
                        queries.clear();
                        for _ in 0..1024 {
                            let i = if rng.below(10) == 0 {
                                n + rng.below(1 << 33)
                            } else {
                                rng.below(n)
                            };
                            queries.push(w.query(i));
                        }
                        engine.check_batch(&queries, Mode::Record, &mut out);
                        done += out.len() as u64;
                    }
                    done
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("bench thread"))
            .sum()
    });
    Headroom {
        triplets: n,
        threads,
        decisions_per_sec: total as f64 / start.elapsed().as_secs_f64(),
        ..Headroom::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postfix_backs_off_from_300_to_4000_seconds() {
        let mut rng = Rng::new(1);
        let gaps: Vec<u32> = (1..=7)
            .map(|t| retry_gap(Class::Postfix, t, 0, &mut rng).unwrap())
            .collect();
        let base = [300, 600, 1200, 2400, 4000, 4000, 4000];
        for (g, b) in gaps.iter().zip(base) {
            assert!((b..b + 60).contains(g), "{gaps:?}");
        }
    }

    #[test]
    fn exchange_exim_and_spam_schedules() {
        let mut rng = Rng::new(1);
        let ex: Vec<u32> = (1..=6)
            .map(|t| retry_gap(Class::Exchange, t, 0, &mut rng).unwrap())
            .collect();
        assert_eq!(ex, [60, 60, 60, 60, 300, 300]);
        assert_eq!(retry_gap(Class::Exim, 1, 0, &mut rng), Some(900));
        assert_eq!(retry_gap(Class::Exim, 8, 2 * 3600, &mut rng), Some(3600));
        assert_eq!(retry_gap(Class::Exim, 10, 3 * 3600, &mut rng), Some(5400));
        assert_eq!(
            retry_gap(Class::Exim, 30, 20 * 3600, &mut rng),
            Some(6 * 3600)
        );
        assert_eq!(retry_gap(Class::SpamNever, 1, 0, &mut rng), None);
        let once = retry_gap(Class::SpamOnce, 1, 0, &mut rng).unwrap();
        assert!((5..=60).contains(&once));
        assert_eq!(retry_gap(Class::SpamOnce, 2, 30, &mut rng), None);
    }

    /// Minutes after the first attempt of the next `n` attempts of `class`.
    fn attempt_minutes(class: Class, n: u16) -> Vec<f64> {
        let mut rng = Rng::new(1);
        let mut at = 0u32;
        (1..=n)
            .map(|tries| {
                at += retry_gap(class, tries, at, &mut rng).unwrap();
                f64::from(at) / 60.0
            })
            .collect()
    }

    #[test]
    fn each_mta_retries_at_its_documented_times() {
        // Sendmail: every queue run, 15 min.
        assert_eq!(
            attempt_minutes(Class::Sendmail, 4),
            [15.0, 30.0, 45.0, 60.0]
        );
        // qmail: 400·n² s: 6:40, 26:40, 1:00:00, 1:46:40, 2:46:40.
        let q: Vec<u32> = attempt_minutes(Class::Qmail, 5)
            .iter()
            .map(|m| (m * 60.0).round() as u32)
            .collect();
        assert_eq!(q, [400, 1600, 3600, 6400, 10_000]);
        // Courier: 5, 10, 15, 30, 35, 40, 70, 75, 80, 140, 145, 150, 270, 275, 280, 400 min.
        assert_eq!(
            attempt_minutes(Class::Courier, 16),
            [
                5.0, 10.0, 15.0, 30.0, 35.0, 40.0, 70.0, 75.0, 80.0, 140.0, 145.0, 150.0, 270.0,
                275.0, 280.0, 400.0
            ]
        );
        // Momentum: 20, 60, 100, 180, then the same rule: 260, 420 min.
        assert_eq!(
            attempt_minutes(Class::Momentum, 6),
            [20.0, 60.0, 100.0, 180.0, 260.0, 420.0]
        );
        // MailEnable: retries 15, 30 and 60 min apart, then every 240 min.
        assert_eq!(
            attempt_minutes(Class::MailEnable, 5),
            [15.0, 45.0, 105.0, 345.0, 585.0]
        );
        // Exim: every 15 min for 2 h, then 1 h, 1.5 h, 2.25 h apart.
        assert_eq!(
            attempt_minutes(Class::Exim, 11),
            [15.0, 30.0, 45.0, 60.0, 75.0, 90.0, 105.0, 120.0, 180.0, 270.0, 405.0]
        );
        // Exchange: every minute 4 times, then every 5 min.
        assert_eq!(
            attempt_minutes(Class::Exchange, 6),
            [1.0, 2.0, 3.0, 4.0, 9.0, 14.0]
        );
    }

    #[test]
    fn every_sender_type_has_a_share_and_a_class() {
        let sum = SenderMix::default().shares().iter().sum::<f64>();
        assert!((sum - 1.0).abs() < 1e-9, "{sum}");
        for (i, c) in Class::LEGIT.iter().enumerate() {
            assert_eq!(*c as usize, i, "{c:?} out of SENDER_TYPES order");
            assert!(!c.is_spam());
        }
        assert!(Class::SpamNever.is_spam());
        assert_eq!("both".parse(), Ok(PoolIdentity::Both));
        assert_eq!("on".parse(), Ok(PoolIdentity::On));
        assert!("yes".parse::<PoolIdentity>().is_err());
        // A configuration from before the new sender types still reads.
        let mut v = serde_json::to_value(PlanConfig::default()).unwrap();
        let mix = v["mix"].as_object_mut().unwrap();
        for k in ["sendmail", "qmail", "courier", "momentum", "mailenable"] {
            mix.remove(k);
        }
        v.as_object_mut().unwrap().remove("pool_identity");
        let back: PlanConfig = serde_json::from_value(v).unwrap();
        assert_eq!(back.mix.qmail, 0.0);
        assert_eq!(back.pool_identity, PoolIdentity::Both);
    }

    #[test]
    fn a_pool_waits_longer_without_an_identity() {
        let cfg = PlanConfig {
            days: 0.25,
            rate: 10.0,
            spam_share: 0.0,
            senders: 100,
            recipients: 1000,
            fanout: 5,
            mix: SenderMix {
                postfix: 0.5,
                exim: 0.0,
                exchange: 0.0,
                sendmail: 0.0,
                qmail: 0.0,
                courier: 0.0,
                momentum: 0.0,
                mailenable: 0.0,
                pool: 0.5,
            },
            sample: Some(1),
            headroom_secs: 0.01,
            headroom_max_triplets: 100,
            ..PlanConfig::default()
        };
        let r = plan(&cfg, |_| {}).unwrap();
        assert_eq!(r.runs, ["off", "on"]);
        let off = r.legit_by_pool_identity["off"]["pool"];
        let on = r.legit_by_pool_identity["on"]["pool"];
        assert_eq!(r.legit["pool"], off, "the first run is the report's");
        assert!(off.delayed > 0 && on.delayed > 0, "{off:?} {on:?}");
        // Without the identity each new address starts its own greylisting.
        assert!(off.delayed > on.delayed, "{off:?} {on:?}");
        assert!(
            off.delayed_median_secs > on.delayed_median_secs,
            "{off:?} {on:?}"
        );
        assert!(off.delayed_p95_secs > on.delayed_p95_secs, "{off:?} {on:?}");
        // With it, the first retry after the delay passes: 5–15 min.
        assert!(on.max_secs <= 900.0, "{on:?}");
        let e = r.pool_identity_effect["pool"];
        assert_eq!(
            e.median_saved_secs,
            off.delayed_median_secs - on.delayed_median_secs
        );
        assert!(e.p95_saved_secs > 0.0);
        // Single MTAs are keyed the same either way, on the same arrivals and draws.
        assert_eq!(
            r.legit_by_pool_identity["off"]["postfix"],
            r.legit_by_pool_identity["on"]["postfix"]
        );
        // One run only when asked.
        let one = plan(
            &PlanConfig {
                pool_identity: PoolIdentity::On,
                ..cfg.clone()
            },
            |_| {},
        )
        .unwrap();
        assert_eq!(one.runs, ["on"]);
        assert!(one.pool_identity_effect.is_empty());
        assert_eq!(one.legit["pool"], on);
    }

    #[test]
    fn daily_curve_has_the_asked_mean_and_peak_ratio() {
        let cfg = PlanConfig {
            rate: 100.0,
            peak_ratio: 3.0,
            ..PlanConfig::default()
        };
        let rates: Vec<f64> = (0..86_400).map(|t| cfg.rate_at(t)).collect();
        let mean = rates.iter().sum::<f64>() / rates.len() as f64;
        let max = rates.iter().cloned().fold(0.0, f64::max);
        let min = rates.iter().cloned().fold(f64::MAX, f64::min);
        assert!((mean - 100.0).abs() < 0.01, "{mean}");
        assert!((max / min - 3.0).abs() < 0.01, "{max} {min}");
        assert!((cfg.rate_at(15 * 3600) - max).abs() < 0.01);
    }

    #[test]
    fn config_json_lists_the_policy_beside_the_other_settings() {
        let text = serde_json::to_string(&PlanConfig::default()).unwrap();
        // The report's form from before the config embedded `Policy`: its fields flat and in
        // place, and no `dry_run` (a simulation never runs dry). A `Value` would sort the keys,
        // so their order is read from the text.
        let at = |key: &str| text.find(&format!("\"{key}\":"));
        let order = [
            "spam_nets",
            "delay",
            "retry_window",
            "whitelist_ttl",
            "awl_clients",
            "awl_interval",
            "awl_ttl",
            "give_up",
        ]
        .map(|key| at(key).unwrap_or_else(|| panic!("{key} missing from {text}")));
        assert!(order.is_sorted(), "{text}");
        assert_eq!((at("policy"), at("dry_run")), (None, None), "{text}");
        let back: PlanConfig = serde_json::from_str(&text).unwrap();
        assert_eq!(back, PlanConfig::default());
    }

    #[test]
    fn carry_keeps_fractions() {
        let mut c = Carry::default();
        let n: u64 = (0..8).map(|_| c.take(0.25)).sum();
        assert_eq!(n, 2);
        // Binary fractions round; over many steps at most one arrival is still carried.
        let n: u64 = (0..1000).map(|_| c.take(0.3)).sum();
        assert!((299..=300).contains(&n), "{n}");
    }

    #[test]
    fn sampled_senders_keep_their_popularity() {
        let cfg = PlanConfig {
            senders: 10_000,
            ..PlanConfig::default()
        };
        let all = SampledSenders::new(&cfg, 1);
        assert_eq!(all.ids.len(), 10_000);
        let mut rng = Rng::new(3);
        // The top 1 % of senders send 10 % of the mail.
        let n = 200_000;
        let top = (0..n).filter(|_| all.draw(&mut rng) < 100).count() as f64 / n as f64;
        assert!((top - 0.1).abs() < 0.005, "{top}");
        let some = SampledSenders::new(&cfg, 10);
        // About a tenth of the senders, each hashing to 0 modulo 10.
        assert!((800..1200).contains(&some.ids.len()), "{}", some.ids.len());
        assert!(some.ids.iter().all(|&e| mix2(e, cfg.seed) % 10 == 0));
        for _ in 0..1000 {
            let e = some.draw(&mut rng);
            assert!(some.ids.binary_search(&e).is_ok());
        }
    }

    #[test]
    fn a_small_plan_greylists_spam_and_delivers_legit_mail() {
        let cfg = PlanConfig {
            days: 0.25,
            rate: 20.0,
            senders: 200,
            recipients: 1000,
            fanout: 5,
            sample: Some(1),
            headroom_secs: 0.05,
            headroom_max_triplets: 1000,
            ..PlanConfig::default()
        };
        let r = plan(&cfg, |_| {}).unwrap();
        assert!(r.spam.messages > 0);
        // Spam that never retries or retries within seconds never passes; only MTA spam can.
        assert!(r.spam.stopped_share > 0.8, "{:?}", r.spam);
        let all = r.legit["all"];
        assert!(all.delivered > 0);
        // Some legit mail is deferred (new triplets), and what is delayed waits at least the
        // greylisting delay.
        assert!(all.delayed > 0, "{all:?}");
        assert!(
            all.delayed_median_secs >= f64::from(cfg.policy.delay),
            "{all:?}"
        );
        // Exchange retries every minute, then every 5 min: its delay is at most delay + 5 min
        // (+ a minute of slack for the second boundary).
        let ex = r.legit["exchange"];
        assert!(ex.max_secs <= f64::from(cfg.policy.delay + 360), "{ex:?}");
        assert!(r.timeline.iter().any(|p| p.greylisted > 0));
        assert!(r.headroom.decisions_per_sec > 0.0);
    }
}
