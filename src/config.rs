//! The effective configuration of `greyhound serve`: the embedded defaults, then the TOML file
//! given with `--config` (if any), then the command-line flags, validated once at the end.
//!
//! Both the file and the flags are read into one type, [`Overrides`]: it derives
//! `serde::Deserialize` for the file (kebab-case keys, the `[limits]` table) and `clap::Args` for
//! the flags (flattened into `cli::ServeArgs`; the `[limits]` keys are plain flags). One function
//! lays an `Overrides` over a [`Config`], naming the file and key or the flag in its errors; it
//! runs for the file, then for the flags, and [`Config::validate`] runs once after both.
//!
//! Every way a setting can be wrong ends in one [`ConfigError`] whose `Display` is a single line
//! naming the culprit (the file and key, or the flag) and the bad value, so that a failed start
//! tells the administrator exactly what to fix.
//!
//! # Adding a setting
//!
//! The compiler walks you through it, because each step destructures in full:
//! 1. a field in [`Config`] (or in [`Limits`], or in `engine::Policy` if the engine decides with
//!    it), its value in `Default`, and its line in `Config`'s `Debug` (written out, so that it
//!    can hide the Redis password);
//! 2. a field in [`Overrides`] (or [`LimitOverrides`]): `Option<T>` with `#[arg(long, ...)]` and a
//!    doc comment, which is the `--help` text. `T` is the type as written: a number, `bool`,
//!    `String` for what [`Overrides`] parses itself (addresses), [`DurationValue`] for a duration,
//!    `Vec<_>` for a repeatable flag, a type of its own whose `Debug` hides a secret
//!    ([`RedisUrlValue`]). The TOML key and the flag follow from the field's name;
//! 3. one line in `Overrides::apply`, which names the key and how its text is parsed;
//! 4. its check, if it has a range, in [`Config::validate`] (or `Limits::validate`,
//!    `Policy::validate`), which also lists it;
//! 5. its use where the configuration is applied (`serve()` in `main.rs`, destructured in full);
//! 6. the key in `config/greyhound.toml` (a test checks that the example sets every key and is the
//!    defaults) and a row in `docs/OPERATIONS.md`.
//!
//! Tried with a `shutdown-grace` duration (the grace `serve()` gives requests in flight at
//! SIGTERM): 28 lines added in 4 files (15 in this file's code, 7 in its tests, 3 in `main.rs`, 3
//! in the example and 1 in OPERATIONS); steps 3 to 5 were each pointed out by a compile error and
//! step 6 by the example's test. The unit tests' full-value literals (`every_key_config`, the
//! every-flag test) also name each field, so a new setting is tested from file and from flag.
//!
//! Choices made where the design is silent:
//! - Addresses must be literal `IP:port`: host names are rejected, not resolved, because a start
//!   that depends on DNS (and may bind to whichever of several addresses came first) is
//!   surprising for a server.
//! - `--allow` (or `allow` in the file) also accepts a bare IP address as a one-host network, and
//!   a CIDR with host bits set (`192.0.2.7/24`) is stored as its network (`192.0.2.0/24`).
//! - Port 0 is accepted (the OS picks a port), which integration tests rely on.
//! - Addresses and durations are read as text by clap and serde and parsed here, so that a bad
//!   value gives the same one-line message, naming the flag or the key, from either source
//!   (clap's own errors span several lines).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use clap::builder::PossibleValuesParser;
use clap::Args;
use ipnet::IpNet;
use serde::Deserialize;

pub use crate::engine::policy::format_duration;
use crate::engine::policy::{check_duration, InvalidPolicy};
use crate::engine::{Identities, Normalizer, Policy};
pub use crate::proto::policy::DeferAction;
use crate::snapshot::valid_node_id;

/// The longest accepted duration: 10 years of 366 days. It matches the engine's limit, so that a
/// configuration accepted here is never refused later by the engine's own validation.
pub const MAX_DURATION_SECS: u32 = crate::engine::policy::MAX_DURATION;

/// The longest Unix socket path Linux accepts: `sun_path` holds 108 bytes including the final NUL.
/// Checking it here turns an obscure bind failure into a clear start-up error.
pub const MAX_UNIX_PATH: usize = 107;

/// The most connection worker threads (`workers`) accepted: more than any machine has cores.
pub const MAX_WORKERS: usize = 1024;

/// The shortest accepted `ipv4-prefix`: shorter would make one client of too many senders.
pub const MIN_IPV4_PREFIX: u8 = 8;

/// The shortest accepted `ipv6-prefix`.
pub const MIN_IPV6_PREFIX: u8 = 16;

/// The accepted values of `log-level`, from the quietest to the most verbose.
pub const LOG_LEVELS: [&str; 5] = ["error", "warn", "info", "debug", "trace"];

/// The longest accepted `greylist-text`: an SMTP reply line is at most 512 octets
/// (RFC 5321 §4.5.3.1.5), so a longer template could never reach the sender whole.
pub const MAX_GREYLIST_TEXT: usize = 512;

/// The hint appended to every malformed duration, listing the accepted forms.
const DURATION_HINT: &str = "(use 300, 300s, 5m, 2h, 2d, 1w)";

/// The shortest accepted `cluster-retention`: a peer that stalls or restarts for longer than the
/// retention loses records (counted as gaps), and a restart alone takes seconds.
pub const MIN_CLUSTER_RETENTION_SECS: u32 = 60;

/// The longest accepted `cluster-retention`: a stream holds every change made in it, so Redis
/// memory grows with the retention, and a node down for longer is better rebuilt from a snapshot.
pub const MAX_CLUSTER_RETENTION_SECS: u32 = 30 * 86_400;

/// The hint appended to every refused `cluster-redis`, listing the accepted forms (docs/OPERATIONS.md, "Running a cluster").
const REDIS_URL_HINT: &str = "(use redis://[user:password@]host:port[/db], rediss://... for TLS, \
     or unix:///path/to/redis.sock; empty: no cluster)";

/// Where the Postfix policy service listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyAddr {
    /// A TCP listener on this address.
    Tcp(SocketAddr),
    /// A Unix stream socket at this path (written `unix:/run/x.sock` or just `/run/x.sock`).
    Unix(PathBuf),
}

impl FromStr for PolicyAddr {
    type Err = String;

    /// Parses `IP:port`, `/absolute/path` or `unix:path`; the error is a message quoting the input.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let path = if let Some(rest) = s.strip_prefix("unix:") {
            rest
        } else if s.starts_with('/') {
            s
        } else {
            return parse_socket_addr(s).map(PolicyAddr::Tcp);
        };
        if path.is_empty() {
            return Err(format!(
                "{s:?} names no socket path (use unix:/run/greyhound/policy.sock)"
            ));
        }
        let path = PathBuf::from(path);
        check_unix_path(&path).map_err(|problem| format!("{s:?} {problem}"))?;
        Ok(PolicyAddr::Unix(path))
    }
}

impl fmt::Display for PolicyAddr {
    /// Writes the address back in the form the configuration accepts (`unix:` marks a path).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PolicyAddr::Tcp(addr) => write!(f, "{addr}"),
            PolicyAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// Where the admin socket of `greyhound admin` listens (`admin`, DESIGN §13).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminSocket {
    /// `<data-dir>/admin.sock` (the default; written `""` in the file).
    InDataDir,
    /// No admin socket (`off`).
    Off,
    /// This path.
    At(PathBuf),
}

impl AdminSocket {
    /// The socket's path with `data_dir` in force; `None` when off.
    pub fn path(&self, data_dir: &Path) -> Option<PathBuf> {
        match self {
            Self::InDataDir => Some(data_dir.join("admin.sock")),
            Self::Off => None,
            Self::At(p) => Some(p.clone()),
        }
    }
}

impl FromStr for AdminSocket {
    type Err = String;

    /// `off`, `""` (in the data directory), or a path (`unix:` before it is allowed).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "" => Ok(Self::InDataDir),
            "off" => Ok(Self::Off),
            _ => {
                let path = PathBuf::from(s.strip_prefix("unix:").unwrap_or(s));
                if path.as_os_str().is_empty() {
                    return Err(format!(
                        "{s:?} names no socket path (use /run/greyhound/admin.sock, or off)"
                    ));
                }
                check_unix_path(&path).map_err(|problem| format!("{s:?} {problem}"))?;
                Ok(Self::At(path))
            }
        }
    }
}

/// Resource limits that protect the server from oversized or abusive clients (`[limits]` table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Longest line of the native protocol, in bytes (`max-line`, 64..=1024; the protocol says
    /// lines are at most 1024 bytes).
    pub max_line: usize,
    /// Most simultaneous connections on each stream listener — native TCP, policy and metrics
    /// each have this many (`max-connections`), so one port's clients cannot lock out another's.
    pub max_connections: usize,
    /// Seconds an idle connection is kept (`idle-timeout`).
    pub idle_timeout_secs: u32,
    /// Most requests answered from one read before yielding to other connections
    /// (`requests-per-read`), so one pipelining client cannot starve the others.
    pub requests_per_read: usize,
    /// Largest UDP datagram accepted, in bytes (`udp-max-datagram`).
    pub udp_max_datagram: usize,
    /// Largest Postfix policy request block, in bytes (`policy-max-block`).
    pub policy_max_block: usize,
    /// Most attributes in one Postfix policy request (`policy-max-attributes`).
    pub policy_max_attributes: usize,
    /// Most triplet records kept (`max-triplets`): past it a new triplet evicts the oldest
    /// greylisted record, a whitelisted one only if nothing else is left.
    pub max_triplets: usize,
    /// Most new triplet records per client identity per minute (`max-new-per-client`; 0 =
    /// off): past it a new triplet is deferred without being recorded.
    pub max_new_per_client: usize,
}

impl Default for Limits {
    /// The embedded defaults of the `[limits]` table.
    fn default() -> Self {
        Limits {
            max_line: 1024,
            max_connections: 4096,
            // Longer than Postfix's default smtpd_policy_service_max_idle (300 s), so that
            // Postfix, which knows when it is done, is the side that closes.
            idle_timeout_secs: 600,
            requests_per_read: 1024,
            // The largest payload of an IPv4 UDP datagram.
            udp_max_datagram: 65_507,
            policy_max_block: 16_384,
            policy_max_attributes: 128,
            // About 2.5 GB of records (48 B each with the table's slack and the wheel).
            max_triplets: 50_000_000,
            max_new_per_client: 0,
        }
    }
}

/// The effective configuration of `greyhound serve`. Its `Debug` output hides the password of
/// `cluster_redis`, so it may be logged.
#[derive(Clone, PartialEq, Eq)]
pub struct Config {
    /// Native protocol listener, TCP and UDP on the same address (`native`).
    pub native: SocketAddr,
    /// Postfix policy service listener (`policy`).
    pub policy_addr: PolicyAddr,
    /// HTTP metrics listener (`metrics`).
    pub metrics: SocketAddr,
    /// The admin socket (`admin`).
    pub admin: AdminSocket,
    /// Directory of the snapshot files (`data-dir`).
    pub data_dir: PathBuf,
    /// Seconds between two snapshots (`snapshot-interval`).
    pub snapshot_interval_secs: u32,
    /// The greylisting settings, handed to the engine as they are (`delay`, `retry-window`,
    /// `whitelist-ttl`, `awl-clients`, `awl-interval`, `awl-ttl`, `dry-run`).
    pub policy: Policy,
    /// Prefix length that groups IPv4 clients into one network (`ipv4-prefix`).
    pub ipv4_prefix: u8,
    /// Prefix length that groups IPv6 clients into one network (`ipv6-prefix`).
    pub ipv6_prefix: u8,
    /// Networks allowed to query (`allow`).
    pub allow: Vec<IpNet>,
    /// Text of a DEFER; `%s` stands for the sender, `%r` for the recipient (`greylist-text`).
    pub greylist_text: String,
    /// The action of a DEFER answered to Postfix (`defer-action`).
    pub defer_action: DeferAction,
    /// Add an `X-Greylist:` header on the first pass of a triplet (`x-greylist-header`).
    pub x_greylist_header: bool,
    /// Host name written in the `X-Greylist:` header; empty means ask the OS (`hostname`).
    pub hostname: String,
    /// Files of exempt clients; empty means the embedded default list (`whitelist-clients`).
    pub whitelist_clients: Vec<PathBuf>,
    /// Files of exempt senders (`whitelist-senders`).
    pub whitelist_senders: Vec<PathBuf>,
    /// Files of exempt recipients (`whitelist-recipients`).
    pub whitelist_recipients: Vec<PathBuf>,
    /// Files of trusted TLS client certificates (`trusted-certs`): fingerprints and
    /// `subject=` names whose clients pass as `tls`.
    pub trusted_certs: Vec<PathBuf>,
    /// Files of greytrap addresses (`greytrap-recipients`): a client writing to one is trapped.
    pub greytrap_recipients: Vec<PathBuf>,
    /// Seconds a client that wrote to a greytrap stays trapped (`greytrap-ttl`).
    pub greytrap_ttl_secs: u32,
    /// Files of per-recipient-domain policy (`domain-policy`): `<domain> <setting>...` lines.
    pub domain_policy: Vec<PathBuf>,
    /// The client identities, in order (`client-identity`; DESIGN §11).
    pub client_identity: Identities,
    /// The DNS server of SPF lookups (`dns-server`); `None`: the system's resolver.
    pub dns_server: Option<SocketAddr>,
    /// Milliseconds a request waits for an SPF result that is not cached (`spf-timeout`).
    pub spf_timeout_ms: u32,
    /// One of [`LOG_LEVELS`] (`log-level`).
    pub log_level: String,
    /// Threads serving TCP and Unix connections (`workers`); 0: half the cores, at least one.
    pub workers: usize,
    /// Redis URL of the cluster (`cluster-redis`): `redis://`, `rediss://` (TLS) or `unix://`;
    /// `None` (or an empty value given) means clustering is off. Checked, never resolved here.
    pub cluster_redis: Option<String>,
    /// Name of this node in the cluster (`node-id`); empty means the host name.
    pub node_id: String,
    /// Name of the cluster, the prefix of every Redis key (`cluster-name`).
    pub cluster_name: String,
    /// Seconds a node's stream keeps its records (`cluster-retention`).
    pub cluster_retention_secs: u32,
    /// Resource limits (`[limits]`).
    pub limits: Limits,
}

impl fmt::Debug for Config {
    /// As derived, except that a password in `cluster_redis` is written `***` (see
    /// [`redact_url`]), so that logging the configuration does not log the Redis password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Destructured in full so that a new setting cannot be left out of the output.
        let Config {
            native,
            policy_addr,
            metrics,
            admin,
            data_dir,
            snapshot_interval_secs,
            policy,
            ipv4_prefix,
            ipv6_prefix,
            allow,
            greylist_text,
            defer_action,
            x_greylist_header,
            hostname,
            whitelist_clients,
            whitelist_senders,
            whitelist_recipients,
            trusted_certs,
            greytrap_recipients,
            greytrap_ttl_secs,
            domain_policy,
            client_identity,
            dns_server,
            spf_timeout_ms,
            log_level,
            workers,
            cluster_redis,
            node_id,
            cluster_name,
            cluster_retention_secs,
            limits,
        } = self;
        f.debug_struct("Config")
            .field("native", native)
            .field("policy_addr", policy_addr)
            .field("metrics", metrics)
            .field("admin", admin)
            .field("data_dir", data_dir)
            .field("snapshot_interval_secs", snapshot_interval_secs)
            .field("policy", policy)
            .field("ipv4_prefix", ipv4_prefix)
            .field("ipv6_prefix", ipv6_prefix)
            .field("allow", allow)
            .field("greylist_text", greylist_text)
            .field("defer_action", defer_action)
            .field("x_greylist_header", x_greylist_header)
            .field("hostname", hostname)
            .field("whitelist_clients", whitelist_clients)
            .field("whitelist_senders", whitelist_senders)
            .field("whitelist_recipients", whitelist_recipients)
            .field("trusted_certs", trusted_certs)
            .field("greytrap_recipients", greytrap_recipients)
            .field("greytrap_ttl_secs", greytrap_ttl_secs)
            .field("domain_policy", domain_policy)
            .field("client_identity", &client_identity.to_string())
            .field("dns_server", dns_server)
            .field("spf_timeout_ms", spf_timeout_ms)
            .field("log_level", log_level)
            .field("workers", workers)
            .field("cluster_redis", &cluster_redis.as_deref().map(redact_url))
            .field("node_id", node_id)
            .field("cluster_name", cluster_name)
            .field("cluster_retention_secs", cluster_retention_secs)
            .field("limits", limits)
            .finish()
    }
}

impl Default for Config {
    /// The embedded defaults: what `greyhound serve` runs with when given no file and no flag.
    fn default() -> Self {
        let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
        Config {
            native: SocketAddr::new(loopback, 10030),
            policy_addr: PolicyAddr::Tcp(SocketAddr::new(loopback, 10023)),
            metrics: SocketAddr::new(loopback, 9470),
            admin: AdminSocket::InDataDir,
            data_dir: PathBuf::from("./greyhound-data"),
            snapshot_interval_secs: 60,
            policy: Policy::default(),
            ipv4_prefix: 24,
            ipv6_prefix: 64,
            // Only this host may query until the administrator says otherwise: a greylisting
            // server open to the world leaks who mails whom.
            allow: vec![
                IpNet::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)), 8).expect("8 <= 32"),
                IpNet::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 128).expect("128 <= 128"),
            ],
            greylist_text: "Greylisted, see https://greylisting.org/; from=%s to=%r".to_owned(),
            defer_action: DeferAction::DeferIfPermit,
            x_greylist_header: true,
            hostname: String::new(),
            whitelist_clients: Vec::new(),
            whitelist_senders: Vec::new(),
            whitelist_recipients: Vec::new(),
            trusted_certs: Vec::new(),
            greytrap_recipients: Vec::new(),
            greytrap_ttl_secs: 86_400,
            domain_policy: Vec::new(),
            client_identity: Identities::default(),
            dns_server: None,
            spf_timeout_ms: 500,
            log_level: "info".to_owned(),
            workers: 0,
            cluster_redis: None,
            node_id: String::new(),
            cluster_name: "greyhound".to_owned(),
            cluster_retention_secs: 3600,
            limits: Limits::default(),
        }
    }
}

/// Why the configuration could not be built. Every variant displays as one line naming the
/// culprit; values taken from the user are quoted with control characters escaped, so no input
/// can split the line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The configuration file could not be read. The I/O error is part of the message and
    /// deliberately not exposed as `source()`, so a reporter walking the chain does not print it
    /// twice.
    #[error("config file {file}: cannot read it: {error}")]
    Read {
        /// The file as given with `--config`.
        file: String,
        /// What the OS said.
        error: std::io::Error,
    },
    /// The file is not valid TOML, or an error could not be tied to a key.
    #[error("config file {file}: line {line}, column {column}: {message}")]
    Parse {
        /// The file as given with `--config`.
        file: String,
        /// 1-based line of the error.
        line: usize,
        /// 1-based column (in characters) of the error.
        column: usize,
        /// What the TOML parser said.
        message: String,
    },
    /// A key the configuration does not know, most often a typo.
    #[error("config file {file}: unknown key {key:?}")]
    UnknownKey {
        /// The file as given with `--config`.
        file: String,
        /// The key, dotted if nested (`limits.max-lines`).
        key: String,
    },
    /// A key of the file has a value of the wrong type or that does not parse.
    #[error("config file {file}: {key}: {message}")]
    FileValue {
        /// The file as given with `--config`.
        file: String,
        /// The key, dotted if nested (`limits.idle-timeout`), with an index for an array item.
        key: String,
        /// What is wrong with the value.
        message: String,
    },
    /// A flag's value does not parse.
    #[error("{flag}: {message}")]
    FlagValue {
        /// The flag, with its dashes (`--delay`).
        flag: String,
        /// What is wrong with the value.
        message: String,
    },
    /// The merged configuration is out of range or inconsistent.
    #[error("{key} {problem}")]
    Invalid {
        /// The setting at fault, as named in the file (`retry-window`, `limits.max-line`).
        key: &'static str,
        /// What is wrong, starting with the value in parentheses where there is one.
        problem: String,
    },
}

impl From<InvalidPolicy> for ConfigError {
    /// The engine names its settings as the file does, and words its problems the same way.
    fn from(e: InvalidPolicy) -> Self {
        ConfigError::Invalid {
            key: e.setting,
            problem: e.problem,
        }
    }
}

/// Parses a duration into seconds: `300` (a bare number is seconds), `300s`, `5m`, `2h`, `2d` or
/// `1w`. Negative, empty, fractional, overflowing (beyond `u32` seconds) and unknown-unit values
/// are refused with a message quoting the input.
pub fn parse_duration(s: &str) -> Result<u32, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err(format!(
            "{s:?} is not a duration: it is empty {DURATION_HINT}"
        ));
    }
    if t.starts_with('-') {
        return Err(format!("{s:?} is not a duration: it is negative"));
    }
    if t.contains(['.', ',']) {
        return Err(format!(
            "{s:?} is not a duration: fractions are not accepted, use a smaller unit (90s, not 1.5m)"
        ));
    }
    let unit_at = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(unit_at);
    let scale: u64 = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(format!("{s:?} is not a duration {DURATION_HINT}")),
    };
    if digits.is_empty() {
        return Err(format!("{s:?} is not a duration {DURATION_HINT}"));
    }
    let too_long = || {
        format!(
            "{s:?} is not a duration: it exceeds {} seconds (about 136 years)",
            u32::MAX
        )
    };
    // `digits` holds ASCII digits only, so the only way parsing fails is overflow.
    let count: u64 = digits.parse().map_err(|_| too_long())?;
    count
        .checked_mul(scale)
        .and_then(|secs| u32::try_from(secs).ok())
        .ok_or_else(too_long)
}

/// Parses a duration given in milliseconds or seconds (`500ms`, `2s`) into milliseconds; a
/// unit is required, since other durations read a bare number as seconds.
pub fn parse_millis(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let (digits, scale) = if let Some(d) = t.strip_suffix("ms") {
        (d, 1u64)
    } else if let Some(d) = t.strip_suffix('s') {
        (d, 1000)
    } else {
        return Err(format!(
            "{s:?} is not a duration in milliseconds or seconds (500ms, 2s)"
        ));
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "{s:?} is not a duration in milliseconds or seconds (500ms, 2s)"
        ));
    }
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .and_then(|ms| u32::try_from(ms).ok())
        .ok_or_else(|| format!("{s:?} is too long"))
}

/// Parses a literal `IP:port` (`127.0.0.1:10030`, `[::1]:10030`). Host names are refused rather
/// than resolved: see the module documentation.
pub fn parse_socket_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if s.parse::<IpAddr>().is_ok() {
        return Err(format!(
            "{s:?} has no port (use IP:port such as 127.0.0.1:10030 or [::1]:10030)"
        ));
    }
    Err(format!(
        "{s:?} must be an IP:port such as 127.0.0.1:10030 or [::1]:10030 (host names are not resolved)"
    ))
}

/// Parses a network allowed to query: a CIDR (`10.0.0.0/8`, `2001:db8::/32`) or a single IP
/// address (a one-host network). Host bits are cleared, so `192.0.2.7/24` gives `192.0.2.0/24`.
pub fn parse_net(s: &str) -> Result<IpNet, String> {
    if let Ok(net) = s.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    if let Ok(addr) = s.parse::<IpAddr>() {
        return Ok(IpNet::from(addr));
    }
    Err(format!(
        "{s:?} is not a network (use a CIDR such as 10.0.0.0/8 or 2001:db8::/32, or an IP address)"
    ))
}

/// Parses `cluster-redis`: empty means no cluster (`None`); otherwise the URL must be one of the
/// forms of docs/OPERATIONS.md section 16, checked by its syntax only (nothing is resolved or connected to here). The
/// error quotes the value with its password hidden.
pub fn parse_cluster_redis(s: &str) -> Result<Option<String>, String> {
    if s.is_empty() {
        return Ok(None);
    }
    check_redis_url(s)?;
    Ok(Some(s.to_owned()))
}

/// Checks a Redis URL: `redis://[user:password@]host[:port][/db]`, `rediss://` (the same over
/// TLS) or `unix:///absolute/path[?db=N]`. What follows the host is left to the Redis client.
fn check_redis_url(url: &str) -> Result<(), String> {
    let shown = redact_url(url);
    if url.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(format!(
            "{shown:?} must not contain spaces or control characters"
        ));
    }
    if let Some(rest) = url
        .strip_prefix("redis://")
        .or_else(|| url.strip_prefix("rediss://"))
    {
        // The host follows the user information (which may itself hold '/' or '?' when a
        // password is not percent-encoded, hence the last '@').
        let after_user = rest.rfind('@').map_or(rest, |at| &rest[at + 1..]);
        let host_end = after_user.find(['/', '?', '#']).unwrap_or(after_user.len());
        let host = &after_user[..host_end];
        if host.is_empty() || host.starts_with(':') {
            return Err(format!("{shown:?} names no host {REDIS_URL_HINT}"));
        }
        return Ok(());
    }
    if let Some(rest) = url.strip_prefix("unix://") {
        let path = rest.split_once('?').map_or(rest, |(path, _)| path);
        if !path.starts_with('/') {
            return Err(format!(
                "{shown:?} must name an absolute socket path, as in unix:///run/redis/redis.sock"
            ));
        }
        return check_unix_path(Path::new(path)).map_err(|problem| format!("{shown:?} {problem}"));
    }
    Err(format!("{shown:?} is not a Redis URL {REDIS_URL_HINT}"))
}

/// Hides the password of a URL's user information for logs and messages:
/// `redis://user:secret@h:1/0` gives `redis://user:***@h:1/0`, `redis://:secret@h` gives
/// `redis://:***@h`; a URL without a password is returned as it is. The user information is taken
/// to end at the last `@`, so a password holding `/`, `?` or `@` unencoded is hidden whole; an `@`
/// later in the URL (rare in a Redis URL) hides more than needed rather than leaking anything.
pub fn redact_url(url: &str) -> String {
    let start = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[start..];
    let Some(at) = rest.rfind('@') else {
        return url.to_owned();
    };
    let Some(colon) = rest[..at].find(':') else {
        return url.to_owned();
    };
    let password_start = start + colon + 1;
    format!("{}***{}", &url[..password_start], &url[start + at..])
}

/// Checks what makes a Unix socket path unusable, so it fails at start rather than at bind.
fn check_unix_path(path: &Path) -> Result<(), String> {
    let len = path.as_os_str().len();
    if path.as_os_str().as_encoded_bytes().contains(&0) {
        return Err("contains a NUL byte, which no socket path can hold".to_owned());
    }
    if len > MAX_UNIX_PATH {
        return Err(format!(
            "is too long for a Unix socket path ({len} bytes, at most {MAX_UNIX_PATH})"
        ));
    }
    Ok(())
}

/// Escapes control characters so that text from the user or a library cannot break the one-line
/// promise of [`ConfigError`].
fn one_line(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// A duration as given: a flag's text, or in the file an integer (seconds) or a string such as
/// `"5m"`. It is kept as text and parsed by [`parse_duration`] when applied, so that file and flag
/// share one parser and one set of messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DurationValue(String);

impl DurationValue {
    /// The duration as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<String> for DurationValue {
    /// Takes a flag's text as it is (clap's value parser for this type).
    fn from(text: String) -> Self {
        DurationValue(text)
    }
}

impl<'de> Deserialize<'de> for DurationValue {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = DurationValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration (a number of seconds, or a string such as \"5m\")")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<DurationValue, E> {
                Ok(DurationValue(v.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<DurationValue, E> {
                Ok(DurationValue(v.to_string()))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<DurationValue, E> {
                Ok(DurationValue(v.to_owned()))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// A `cluster-redis` URL as given, before it is checked. A type of its own so that the `Debug`
/// output of [`Overrides`] hides the password, as that of [`Config`] does.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct RedisUrlValue(String);

impl RedisUrlValue {
    /// The URL as written, password included.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<String> for RedisUrlValue {
    /// Takes a flag's text as it is (clap's value parser for this type).
    fn from(text: String) -> Self {
        RedisUrlValue(text)
    }
}

impl fmt::Debug for RedisUrlValue {
    /// The URL with its password written `***` (see [`redact_url`]).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("RedisUrlValue")
            .field(&redact_url(&self.0))
            .finish()
    }
}

/// The settings given in the TOML file or as flags of `greyhound serve`, before they are parsed
/// and laid over the defaults. Each one is optional (a list is `None` until given), so that an
/// absent one leaves the layer below in force. The TOML key is the field's name in kebab-case and
/// the flag is `--` and that key; unknown keys are refused, because a typo silently ignored would
/// leave a default in force.
#[derive(Debug, Default, Clone, Args, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "kebab-case",
    expecting = "a table of Greyhound settings"
)]
pub struct Overrides {
    /// Native protocol address, TCP and UDP [default: 127.0.0.1:10030].
    #[arg(long, value_name = "ADDR", help_heading = "Listeners")]
    pub native: Option<String>,
    /// Postfix policy address: IP:port, or a Unix socket as /path or unix:/path
    /// [default: 127.0.0.1:10023].
    #[arg(long, value_name = "ADDR", help_heading = "Listeners")]
    pub policy: Option<String>,
    /// HTTP metrics address [default: 127.0.0.1:9470].
    #[arg(long, value_name = "ADDR", help_heading = "Listeners")]
    pub metrics: Option<String>,
    /// Admin socket of `greyhound admin` (mode 0600), a path, or `off`
    /// [default: <data-dir>/admin.sock].
    #[arg(long, value_name = "PATH", help_heading = "Listeners")]
    pub admin: Option<String>,
    /// Network allowed to query, as CIDR or IP; repeatable, and replaces the default
    /// [default: 127.0.0.0/8 and ::1/128].
    #[arg(long, value_name = "CIDR", help_heading = "Listeners")]
    pub allow: Option<Vec<String>>,

    /// Data directory: the hash key and the snapshots [default: ./greyhound-data].
    #[arg(long, value_name = "DIR", help_heading = "Storage")]
    pub data_dir: Option<PathBuf>,
    /// Time between two snapshots of the table [default: 60s].
    #[arg(long, value_name = "DURATION", help_heading = "Storage")]
    pub snapshot_interval: Option<DurationValue>,

    /// Time a new triplet is deferred [default: 300s].
    #[arg(long, value_name = "DURATION", help_heading = "Greylisting")]
    pub delay: Option<DurationValue>,
    /// Time after first sight during which a retry passes [default: 2d].
    #[arg(long, value_name = "DURATION", help_heading = "Greylisting")]
    pub retry_window: Option<DurationValue>,
    /// Time a passed triplet stays whitelisted after its last pass [default: 35d].
    #[arg(long, value_name = "DURATION", help_heading = "Greylisting")]
    pub whitelist_ttl: Option<DurationValue>,
    /// Counted passes after which a client is auto-whitelisted; 0 turns this off [default: 5].
    #[arg(long, value_name = "N", help_heading = "Greylisting")]
    pub awl_clients: Option<u32>,
    /// At most one pass per this time counts towards auto-whitelisting [default: 1h].
    #[arg(long, value_name = "DURATION", help_heading = "Greylisting")]
    pub awl_interval: Option<DurationValue>,
    /// Time an auto-whitelisted client stays so after its last pass [default: 35d].
    #[arg(long, value_name = "DURATION", help_heading = "Greylisting")]
    pub awl_ttl: Option<DurationValue>,
    /// Prefix length grouping IPv4 clients into one network [default: 24].
    #[arg(long, value_name = "BITS", help_heading = "Greylisting")]
    pub ipv4_prefix: Option<u8>,
    /// Prefix length grouping IPv6 clients into one network [default: 64].
    #[arg(long, value_name = "BITS", help_heading = "Greylisting")]
    pub ipv6_prefix: Option<u8>,
    /// Answer PASS where the answer would be DEFER, recording as usual.
    // A flag without a value, like a `bool` one, but `None` when absent so that the file's value
    // stays in force; of a pair, clap keeps only the last one given.
    #[arg(
        long,
        help_heading = "Greylisting",
        num_args = 0,
        default_missing_value = "true",
        overrides_with = "no_dry_run"
    )]
    pub dry_run: Option<bool>,
    /// Enforce greylisting even if the config file says dry-run = true.
    #[arg(long, help_heading = "Greylisting", overrides_with = "dry_run")]
    #[serde(skip)]
    pub no_dry_run: bool,
    /// Text of a DEFER; %s is the sender, %r the recipient
    /// [default: "Greylisted, see https://greylisting.org/; from=%s to=%r"].
    // The URL is part of the default text, shown as written in --help, not a link to make.
    #[allow(rustdoc::bare_urls)]
    #[arg(long, value_name = "TEXT", help_heading = "Greylisting")]
    pub greylist_text: Option<String>,
    /// Action of a DEFER answered to Postfix: DEFER_IF_PERMIT, DEFER, 450 or 451 (the last two
    /// answer "450 4.7.1 <text>" / "451 4.7.1 <text>") [default: DEFER_IF_PERMIT].
    #[arg(long, value_name = "ACTION", help_heading = "Greylisting")]
    pub defer_action: Option<String>,
    /// Do not add an X-Greylist: header on the first pass of a triplet.
    #[arg(
        long,
        help_heading = "Greylisting",
        overrides_with = "x_greylist_header"
    )]
    #[serde(skip)]
    pub no_x_greylist_header: bool,
    /// Add the X-Greylist: header even if the config file turns it off.
    #[arg(
        long,
        help_heading = "Greylisting",
        num_args = 0,
        default_missing_value = "true",
        overrides_with = "no_x_greylist_header"
    )]
    pub x_greylist_header: Option<bool>,
    /// Host name written in the X-Greylist: header [default: the OS's host name].
    #[arg(long, value_name = "NAME", help_heading = "Greylisting")]
    pub hostname: Option<String>,

    /// File of exempt clients; repeatable, and replaces the embedded default list.
    #[arg(long, value_name = "FILE", help_heading = "Whitelists")]
    pub whitelist_clients: Option<Vec<PathBuf>>,
    /// File of exempt senders; repeatable.
    #[arg(long, value_name = "FILE", help_heading = "Whitelists")]
    pub whitelist_senders: Option<Vec<PathBuf>>,
    /// File of exempt recipients; repeatable.
    #[arg(long, value_name = "FILE", help_heading = "Whitelists")]
    pub whitelist_recipients: Option<Vec<PathBuf>>,
    /// File of trusted TLS client certificates (fingerprints, subject=<name>); repeatable.
    #[arg(long, value_name = "FILE", help_heading = "Whitelists")]
    pub trusted_certs: Option<Vec<PathBuf>>,

    /// File of greytrap addresses (same forms as recipients); a client writing to one is
    /// deferred for greytrap-ttl; repeatable.
    #[arg(long, value_name = "FILE", help_heading = "Whitelists")]
    pub greytrap_recipients: Option<Vec<PathBuf>>,

    /// Time a client that wrote to a greytrap stays trapped [default: 1d].
    #[arg(long, value_name = "DURATION")]
    pub greytrap_ttl: Option<DurationValue>,

    /// File of per-recipient-domain policy (`<domain> off|dry-run|delay=|retry-window=|
    /// whitelist-ttl=`); repeatable.
    #[arg(long, value_name = "FILE", help_heading = "Whitelists")]
    pub domain_policy: Option<Vec<PathBuf>>,

    /// Client identities, in order, the first that applies keying the triplet: spf, name,
    /// prefix (prefix is always last and added if missing) [default: name,prefix].
    #[arg(long, value_name = "LIST", help_heading = "Client identity")]
    pub client_identity: Option<String>,
    /// DNS server of SPF lookups, ADDR[:PORT] (port 53 if omitted) [default: the system's
    /// resolver].
    #[arg(long, value_name = "ADDR", help_heading = "Client identity")]
    pub dns_server: Option<String>,
    /// Longest a request waits for an SPF result that is not cached, 10ms to 30s; then it falls
    /// back to the next identity [default: 500ms].
    #[arg(long, value_name = "DURATION", help_heading = "Client identity")]
    pub spf_timeout: Option<DurationValue>,

    /// Least severe log messages shown [default: info].
    #[arg(long, value_name = "LEVEL", value_parser = PossibleValuesParser::new(LOG_LEVELS))]
    pub log_level: Option<String>,

    /// Threads serving TCP and Unix connections (native TCP, policy; UDP has one per core);
    /// 0 means half the cores, at least one [default: 0].
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,

    /// Redis URL that turns clustering on: redis://[user:password@]host:port[/db], rediss://...
    /// for TLS, or unix:///path; off when not given or empty.
    // The brackets mark optional parts of the URL, as written in --help, not links to make.
    #[allow(rustdoc::broken_intra_doc_links)]
    #[arg(long, value_name = "URL", help_heading = "Cluster")]
    pub cluster_redis: Option<RedisUrlValue>,
    /// Name of this node in the cluster: 1 to 64 of A-Z a-z 0-9 _ . -
    /// [default: the OS's host name].
    #[arg(long, value_name = "NAME", help_heading = "Cluster")]
    pub node_id: Option<String>,
    /// Name of the cluster, the prefix of every Redis key: 1 to 64 of A-Z a-z 0-9 _ . -
    /// [default: greyhound].
    #[arg(long, value_name = "NAME", help_heading = "Cluster")]
    pub cluster_name: Option<String>,
    /// Time a node's stream keeps its records, 1m to 30d [default: 1h].
    #[arg(long, value_name = "DURATION", help_heading = "Cluster")]
    pub cluster_retention: Option<DurationValue>,

    /// The `[limits]` table; its keys are plain flags (`--max-line`).
    #[command(flatten)]
    #[serde(default)]
    pub limits: LimitOverrides,
}

/// The keys of the `[limits]` table, also flags of `greyhound serve` without a prefix.
#[derive(Debug, Default, Clone, Args, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "kebab-case",
    expecting = "a [limits] table"
)]
pub struct LimitOverrides {
    /// Longest native protocol line in bytes, 64..=1024 [default: 1024].
    #[arg(long, value_name = "BYTES", help_heading = "Limits")]
    pub max_line: Option<usize>,
    /// Most simultaneous connections on each of the native, policy and metrics ports
    /// [default: 4096].
    #[arg(long, value_name = "N", help_heading = "Limits")]
    pub max_connections: Option<usize>,
    /// Time an idle connection is kept [default: 600s].
    #[arg(long, value_name = "DURATION", help_heading = "Limits")]
    pub idle_timeout: Option<DurationValue>,
    /// Most requests answered from one read before serving other connections [default: 1024].
    #[arg(long, value_name = "N", help_heading = "Limits")]
    pub requests_per_read: Option<usize>,
    /// Largest UDP datagram accepted, 512..=65507 bytes [default: 65507].
    #[arg(long, value_name = "BYTES", help_heading = "Limits")]
    pub udp_max_datagram: Option<usize>,
    /// Largest Postfix policy request, 1024..=1048576 bytes [default: 16384].
    #[arg(long, value_name = "BYTES", help_heading = "Limits")]
    pub policy_max_block: Option<usize>,
    /// Most attributes in one Postfix policy request [default: 128].
    #[arg(long, value_name = "N", help_heading = "Limits")]
    pub policy_max_attributes: Option<usize>,
    /// Most triplet records kept, 1000..=4000000000; past it a new triplet evicts the oldest
    /// greylisted one [default: 50000000].
    #[arg(long, value_name = "N", help_heading = "Limits")]
    pub max_triplets: Option<usize>,
    /// Most new triplets per client identity per minute, 0 = off; past it a new triplet is
    /// deferred without being recorded [default: 0].
    #[arg(long, value_name = "N", help_heading = "Limits")]
    pub max_new_per_client: Option<usize>,
}

/// Where a value came from, so that its error names it the way the administrator wrote it.
#[derive(Clone, Copy)]
enum Origin<'a> {
    /// The configuration file of this name; keys are named as in the file (`limits.max-line`).
    File(&'a str),
    /// The command line; keys are named as flags (`--max-line`).
    Flags,
}

impl Origin<'_> {
    /// If `value` was given, parses it into `slot`, or fails naming `key` (as written in the
    /// file) in this origin's terms.
    fn set<T, V>(
        self,
        key: &str,
        slot: &mut T,
        value: Option<V>,
        parse: impl FnOnce(V) -> Result<T, String>,
    ) -> Result<(), ConfigError> {
        if let Some(value) = value {
            *slot = parse(value).map_err(|message| match self {
                Origin::File(file) => ConfigError::FileValue {
                    file: file.to_owned(),
                    key: key.to_owned(),
                    message,
                },
                // The keys of [limits] are flags without the table's name.
                Origin::Flags => ConfigError::FlagValue {
                    flag: format!("--{}", key.strip_prefix("limits.").unwrap_or(key)),
                    message,
                },
            })?;
        }
        Ok(())
    }
}

/// Parses every item of a list, failing on the first bad one.
fn parse_nets(items: &[String]) -> Result<Vec<IpNet>, String> {
    items.iter().map(|s| parse_net(s)).collect()
}

/// Parses a duration given as [`DurationValue`].
fn parse_duration_value(d: DurationValue) -> Result<u32, String> {
    parse_duration(&d.0)
}

impl Overrides {
    /// Reads a TOML document; `file` names it in messages. Unknown keys and values of the wrong
    /// type are refused here, values that do not parse when applied.
    pub fn from_toml(file: &str, text: &str) -> Result<Overrides, ConfigError> {
        // The document is parsed before it is deserialized so that, on an error, the spans of
        // its keys tell which key is at fault.
        let document =
            toml::de::DeTable::parse(text).map_err(|error| parse_error(file, text, &error))?;
        // Serde also reads a struct from an array of its values in order, which would let
        // `limits = [512]` (or `[[limits]]`) mean something; only a table is accepted.
        for (key, value) in document.get_ref() {
            let is_table = matches!(value.get_ref(), toml::de::DeValue::Table(_));
            if key.get_ref() == "limits" && !is_table {
                return Err(ConfigError::FileValue {
                    file: file.to_owned(),
                    key: "limits".to_owned(),
                    message: "must be a table: a [limits] line followed by its keys".to_owned(),
                });
            }
        }
        Overrides::deserialize(toml::de::Deserializer::from(document.clone()))
            .map_err(|error| value_error(file, text, document.get_ref(), &error))
    }

    /// Lays the settings given here over `config`, without validating; `origin` names them in
    /// the errors of values that do not parse.
    fn apply(self, config: &mut Config, origin: Origin<'_>) -> Result<(), ConfigError> {
        // Destructured in full so that a new setting that is not applied here fails to compile.
        let Overrides {
            native,
            policy,
            metrics,
            admin,
            allow,
            data_dir,
            snapshot_interval,
            delay,
            retry_window,
            whitelist_ttl,
            awl_clients,
            awl_interval,
            awl_ttl,
            ipv4_prefix,
            ipv6_prefix,
            dry_run,
            no_dry_run,
            greylist_text,
            defer_action,
            no_x_greylist_header,
            x_greylist_header,
            hostname,
            whitelist_clients,
            whitelist_senders,
            whitelist_recipients,
            trusted_certs,
            greytrap_recipients,
            greytrap_ttl,
            domain_policy,
            client_identity,
            dns_server,
            spf_timeout,
            log_level,
            workers,
            cluster_redis,
            node_id,
            cluster_name,
            cluster_retention,
            limits,
        } = self;
        let LimitOverrides {
            max_line,
            max_connections,
            idle_timeout,
            requests_per_read,
            udp_max_datagram,
            policy_max_block,
            policy_max_attributes,
            max_triplets,
            max_new_per_client,
        } = limits;
        // The `--no-` flags exist only on the command line; clap keeps only the last of a pair.
        let dry_run = if no_dry_run { Some(false) } else { dry_run };
        let x_greylist_header = if no_x_greylist_header {
            Some(false)
        } else {
            x_greylist_header
        };
        let o = origin;
        let dur = parse_duration_value;
        let addr = |s: String| parse_socket_addr(&s);
        let c = config;
        o.set("native", &mut c.native, native, addr)?;
        o.set("policy", &mut c.policy_addr, policy, |s| s.parse())?;
        o.set("metrics", &mut c.metrics, metrics, addr)?;
        o.set("admin", &mut c.admin, admin, |s| s.parse())?;
        // A list given replaces the whole list below it: flags are not merged with the file.
        o.set("allow", &mut c.allow, allow, |v| parse_nets(&v))?;
        o.set("data-dir", &mut c.data_dir, data_dir, Ok)?;
        o.set(
            "snapshot-interval",
            &mut c.snapshot_interval_secs,
            snapshot_interval,
            dur,
        )?;
        let p = &mut c.policy;
        o.set("delay", &mut p.delay, delay, dur)?;
        o.set("retry-window", &mut p.retry_window, retry_window, dur)?;
        o.set("whitelist-ttl", &mut p.whitelist_ttl, whitelist_ttl, dur)?;
        o.set("awl-clients", &mut p.awl_clients, awl_clients, Ok)?;
        o.set("awl-interval", &mut p.awl_interval, awl_interval, dur)?;
        o.set("awl-ttl", &mut p.awl_ttl, awl_ttl, dur)?;
        o.set("dry-run", &mut p.dry_run, dry_run, Ok)?;
        o.set("ipv4-prefix", &mut c.ipv4_prefix, ipv4_prefix, Ok)?;
        o.set("ipv6-prefix", &mut c.ipv6_prefix, ipv6_prefix, Ok)?;
        o.set("greylist-text", &mut c.greylist_text, greylist_text, Ok)?;
        o.set("defer-action", &mut c.defer_action, defer_action, |s| {
            s.parse()
        })?;
        o.set(
            "x-greylist-header",
            &mut c.x_greylist_header,
            x_greylist_header,
            Ok,
        )?;
        o.set("hostname", &mut c.hostname, hostname, Ok)?;
        o.set(
            "whitelist-clients",
            &mut c.whitelist_clients,
            whitelist_clients,
            Ok,
        )?;
        o.set(
            "whitelist-senders",
            &mut c.whitelist_senders,
            whitelist_senders,
            Ok,
        )?;
        o.set(
            "whitelist-recipients",
            &mut c.whitelist_recipients,
            whitelist_recipients,
            Ok,
        )?;
        o.set("trusted-certs", &mut c.trusted_certs, trusted_certs, Ok)?;
        o.set(
            "greytrap-recipients",
            &mut c.greytrap_recipients,
            greytrap_recipients,
            Ok,
        )?;
        o.set("greytrap-ttl", &mut c.greytrap_ttl_secs, greytrap_ttl, dur)?;
        o.set("domain-policy", &mut c.domain_policy, domain_policy, Ok)?;
        o.set(
            "client-identity",
            &mut c.client_identity,
            client_identity,
            |s| Identities::parse(&s).map_err(|e| e.to_string()),
        )?;
        o.set("dns-server", &mut c.dns_server, dns_server, |s| {
            // Empty: the system's resolver (the example file's way of saying the default).
            if s.trim().is_empty() {
                Ok(None)
            } else {
                crate::spf::parse_dns_server(s.trim())
                    .map(Some)
                    .map_err(|e| e.to_string())
            }
        })?;
        o.set("spf-timeout", &mut c.spf_timeout_ms, spf_timeout, |d| {
            parse_millis(&d.0)
        })?;
        o.set("log-level", &mut c.log_level, log_level, Ok)?;
        o.set("workers", &mut c.workers, workers, Ok)?;
        o.set("cluster-redis", &mut c.cluster_redis, cluster_redis, |u| {
            parse_cluster_redis(u.as_str())
        })?;
        o.set("node-id", &mut c.node_id, node_id, Ok)?;
        o.set("cluster-name", &mut c.cluster_name, cluster_name, Ok)?;
        o.set(
            "cluster-retention",
            &mut c.cluster_retention_secs,
            cluster_retention,
            dur,
        )?;
        let l = &mut c.limits;
        o.set("limits.max-line", &mut l.max_line, max_line, Ok)?;
        o.set(
            "limits.max-connections",
            &mut l.max_connections,
            max_connections,
            Ok,
        )?;
        o.set(
            "limits.idle-timeout",
            &mut l.idle_timeout_secs,
            idle_timeout,
            dur,
        )?;
        o.set(
            "limits.requests-per-read",
            &mut l.requests_per_read,
            requests_per_read,
            Ok,
        )?;
        o.set(
            "limits.udp-max-datagram",
            &mut l.udp_max_datagram,
            udp_max_datagram,
            Ok,
        )?;
        o.set(
            "limits.policy-max-block",
            &mut l.policy_max_block,
            policy_max_block,
            Ok,
        )?;
        o.set(
            "limits.policy-max-attributes",
            &mut l.policy_max_attributes,
            policy_max_attributes,
            Ok,
        )?;
        o.set("limits.max-triplets", &mut l.max_triplets, max_triplets, Ok)?;
        o.set(
            "limits.max-new-per-client",
            &mut l.max_new_per_client,
            max_new_per_client,
            Ok,
        )?;
        Ok(())
    }
}

impl Config {
    /// Builds the effective configuration: the defaults, then the TOML file at `file` (if any),
    /// then the `flags`. Validates at the end, so a flag may repair what the file alone would get
    /// wrong.
    pub fn load(file: Option<&Path>, flags: &Overrides) -> Result<Config, ConfigError> {
        let text = match file {
            Some(path) => {
                let name = one_line(&path.display().to_string());
                let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
                    file: name.clone(),
                    error,
                })?;
                Some((name, text))
            }
            None => None,
        };
        let file = text
            .as_ref()
            .map(|(name, text)| (name.as_str(), text.as_str()));
        Config::layered(file, flags.clone())
    }

    /// Parses TOML text over the defaults and validates the result; `source` names the text in
    /// messages (normally the file's path).
    pub fn from_toml(source: &str, text: &str) -> Result<Config, ConfigError> {
        Config::layered(Some((&one_line(source), text)), Overrides::default())
    }

    /// The defaults, then the file (its name and text) if any, then the flags; then validation.
    fn layered(file: Option<(&str, &str)>, flags: Overrides) -> Result<Config, ConfigError> {
        let mut config = Config::default();
        if let Some((name, text)) = file {
            Overrides::from_toml(name, text)?.apply(&mut config, Origin::File(name))?;
        }
        flags.apply(&mut config, Origin::Flags)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every setting's range and the settings against each other: the engine's
    /// [`Policy::validate`] (retry-window >= delay, TTLs >= 1s, durations <= 10 years,
    /// awl-clients <= 65535), prefixes 0..=32 and 0..=128 as the [`Normalizer`] takes them, the
    /// limits' ranges, a non-empty `allow`, a printable `greylist-text` and `hostname`, a known
    /// `log-level`, usable socket paths, no two listeners on the same TCP port, and the cluster
    /// settings: a Redis URL of an accepted form, node id and cluster name of
    /// `[A-Za-z0-9_.-]{1,64}` (an empty node id stands for the host name), a retention of 1m to
    /// 30d. The cluster settings are checked even when clustering is off, so that a typo shows
    /// the day they are set, not the day clustering is turned on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        // Destructured in full so that a new setting cannot be added without a thought here.
        let Config {
            native,
            policy_addr,
            metrics,
            // Checked while parsing.
            admin: _,
            data_dir,
            snapshot_interval_secs,
            policy,
            ipv4_prefix,
            ipv6_prefix,
            allow,
            greylist_text,
            // Every value of its type is valid.
            defer_action: _,
            x_greylist_header: _,
            hostname,
            whitelist_clients,
            whitelist_senders,
            whitelist_recipients,
            trusted_certs,
            greytrap_recipients,
            greytrap_ttl_secs,
            domain_policy,
            // Parsed into valid values; a server given for a resolver that is never used is
            // harmless.
            client_identity: _,
            dns_server: _,
            spf_timeout_ms,
            log_level,
            workers,
            cluster_redis,
            node_id,
            cluster_name,
            cluster_retention_secs,
            limits,
        } = self;
        let invalid =
            |key: &'static str, problem: String| Err(ConfigError::Invalid { key, problem });

        // A zero here would snapshot in a busy loop.
        check_duration("snapshot-interval", *snapshot_interval_secs, true)?;
        policy.validate()?;
        // A shorter prefix groups so many senders into one client that one pass through the
        // auto-whitelist lets a whole region of the Internet through: /0 is every IPv4 host.
        // /8 and /16 are the widest groupings any real sender pool needs.
        for (key, prefix, min, max) in [
            ("ipv4-prefix", *ipv4_prefix, MIN_IPV4_PREFIX, 32),
            ("ipv6-prefix", *ipv6_prefix, MIN_IPV6_PREFIX, 128),
        ] {
            if !(min..=max).contains(&prefix) {
                return invalid(
                    key,
                    format!("({prefix}) must be between {min} and {max}: a shorter prefix makes one client of too many senders"),
                );
            }
        }
        if let Err(e) = Normalizer::new(*ipv4_prefix, *ipv6_prefix) {
            return invalid("ipv4-prefix", e.to_string());
        }
        // Every sender that retries at all would pass its first retry: no greylisting, but
        // answers that say DEFER 0. Watching without deferring is what dry-run is for.
        if policy.delay == 0 && !policy.dry_run {
            return invalid(
                "delay",
                "(0) would let every retry through; use at least 1s, or dry-run to record without deferring".to_owned(),
            );
        }
        if allow.is_empty() {
            return invalid(
                "allow",
                "is empty: nobody could query (loopback only is 127.0.0.0/8 and ::1/128)"
                    .to_owned(),
            );
        }
        if greylist_text.is_empty() {
            return invalid(
                "greylist-text",
                "is empty: a DEFER needs a reason".to_owned(),
            );
        }
        // A control character (a newline above all) would end the answer line early and let the
        // rest be read as another answer or header.
        if greylist_text.chars().any(char::is_control) {
            return invalid(
                "greylist-text",
                format!("({greylist_text:?}) must not contain control characters"),
            );
        }
        if greylist_text.len() > MAX_GREYLIST_TEXT {
            return invalid(
                "greylist-text",
                format!(
                    "is {} bytes long, more than the {MAX_GREYLIST_TEXT} an SMTP reply line holds",
                    greylist_text.len()
                ),
            );
        }
        // The host name goes into a mail header: anything but printable ASCII could corrupt it.
        if !hostname.chars().all(|c| c.is_ascii_graphic()) || hostname.len() > 253 {
            return invalid(
                "hostname",
                format!(
                    "({hostname:?}) must be at most 253 printable ASCII characters without spaces"
                ),
            );
        }
        if !LOG_LEVELS.contains(&log_level.as_str()) {
            return invalid(
                "log-level",
                format!("({log_level:?}) must be one of {}", LOG_LEVELS.join(", ")),
            );
        }
        if *workers > MAX_WORKERS {
            return invalid(
                "workers",
                format!("({workers}) must be at most {MAX_WORKERS} (0: half the cores)"),
            );
        }
        if data_dir.as_os_str().is_empty() {
            return invalid("data-dir", "is empty".to_owned());
        }
        if let Some(url) = cluster_redis {
            check_redis_url(url).or_else(|problem| invalid("cluster-redis", problem))?;
        }
        // Both names are parts of Redis keys (`<cluster-name>:ev:<node-id>`) and the node id is
        // also written into snapshots, whose reader applies the same rule.
        const NAME_RULE: &str = "must be 1 to 64 characters among A-Z a-z 0-9 _ . -";
        if !node_id.is_empty() && !valid_node_id(node_id.as_bytes()) {
            return invalid(
                "node-id",
                format!("({node_id:?}) {NAME_RULE} (leave it empty for the host name)"),
            );
        }
        if !valid_node_id(cluster_name.as_bytes()) {
            return invalid("cluster-name", format!("({cluster_name:?}) {NAME_RULE}"));
        }
        if !(60..=MAX_CLUSTER_RETENTION_SECS).contains(greytrap_ttl_secs) {
            return invalid(
                "greytrap-ttl",
                format!(
                    "({}) must be between 1m and {}",
                    format_duration(*greytrap_ttl_secs),
                    format_duration(MAX_CLUSTER_RETENTION_SECS)
                ),
            );
        }
        if !(10..=30_000).contains(spf_timeout_ms) {
            return invalid(
                "spf-timeout",
                format!("({spf_timeout_ms}ms) must be between 10ms and 30s"),
            );
        }
        let retention = MIN_CLUSTER_RETENTION_SECS..=MAX_CLUSTER_RETENTION_SECS;
        if !retention.contains(cluster_retention_secs) {
            return invalid(
                "cluster-retention",
                format!(
                    "({}) must be between {} and {}",
                    format_duration(*cluster_retention_secs),
                    format_duration(MIN_CLUSTER_RETENTION_SECS),
                    format_duration(MAX_CLUSTER_RETENTION_SECS)
                ),
            );
        }
        let lists = [
            ("whitelist-clients", whitelist_clients),
            ("whitelist-senders", whitelist_senders),
            ("whitelist-recipients", whitelist_recipients),
            ("trusted-certs", trusted_certs),
            ("greytrap-recipients", greytrap_recipients),
            ("domain-policy", domain_policy),
        ];
        for (key, paths) in lists {
            if paths.iter().any(|p| p.as_os_str().is_empty()) {
                return invalid(key, "contains an empty path".to_owned());
            }
        }
        if let PolicyAddr::Unix(path) = policy_addr {
            check_unix_path(path)
                .or_else(|problem| invalid("policy", format!("({}) {problem}", path.display())))?;
        }
        limits.validate()?;

        // Two listeners on one TCP port would fail to bind with an OS error that names neither
        // setting; the native listener also binds UDP, but only it does, so TCP is what clashes.
        let mut tcp = vec![("native", *native), ("metrics", *metrics)];
        if let PolicyAddr::Tcp(addr) = policy_addr {
            tcp.push(("policy", *addr));
        }
        for (i, (key_a, a)) in tcp.iter().enumerate() {
            for (key_b, b) in &tcp[i + 1..] {
                if clash(*a, *b) {
                    return invalid(
                        key_a,
                        format!("({a}) uses the same TCP port as {key_b} ({b})"),
                    );
                }
            }
        }
        Ok(())
    }
}

/// Whether two listeners would fight over one port: same family and port (other than 0, which
/// lets the OS choose), and the same address or a wildcard on either side.
fn clash(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

impl Limits {
    /// Checks each limit's range; the comments say why the bounds are where they are.
    fn validate(&self) -> Result<(), ConfigError> {
        let Limits {
            max_line,
            max_connections,
            idle_timeout_secs,
            requests_per_read,
            udp_max_datagram,
            policy_max_block,
            policy_max_attributes,
            max_triplets,
            max_new_per_client,
        } = self;
        // A zero would drop every connection at once.
        check_duration("limits.idle-timeout", *idle_timeout_secs, true)?;
        let ranges: [(&'static str, usize, usize, usize); 8] = [
            // The protocol says a line is at most 1024 bytes; below 64 no real request fits.
            ("limits.max-line", *max_line, 64, 1024),
            // Past a million the OS runs out of descriptors first: likely a typo.
            ("limits.max-connections", *max_connections, 1, 1 << 20),
            ("limits.requests-per-read", *requests_per_read, 1, 1 << 16),
            // 512 bytes is the smallest datagram every host must accept; 65507 is the largest
            // IPv4 UDP payload.
            ("limits.udp-max-datagram", *udp_max_datagram, 512, 65_507),
            // Postfix's own requests are a few hundred bytes; a megabyte is already abusive.
            ("limits.policy-max-block", *policy_max_block, 1024, 1 << 20),
            // Postfix 3.x sends about 30 attributes per request: fewer would refuse them all.
            (
                "limits.policy-max-attributes",
                *policy_max_attributes,
                32,
                4096,
            ),
            // Below a thousand records the table cannot hold a day of any real traffic (and
            // 0 would keep nothing); four billion is ~200 GB of records, likely a typo.
            ("limits.max-triplets", *max_triplets, 1000, 4_000_000_000),
            // A million new triplets per client per minute is no limit at all.
            (
                "limits.max-new-per-client",
                *max_new_per_client,
                0,
                1_000_000,
            ),
        ];
        for (key, value, min, max) in ranges {
            if !(min..=max).contains(&value) {
                return Err(ConfigError::Invalid {
                    key,
                    problem: format!("({value}) must be between {min} and {max}"),
                });
            }
        }
        Ok(())
    }
}

/// Places a TOML error (whose own `Display` spans several lines) at a line and column of `file`.
fn parse_error(file: &str, text: &str, error: &toml::de::Error) -> ConfigError {
    let offset = error.span().map_or(0, |span| span.start).min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    ConfigError::Parse {
        file: file.to_owned(),
        line: before.matches('\n').count() + 1,
        column: before[line_start..].chars().count() + 1,
        message: one_line(error.message()),
    }
}

/// Turns a deserialization error into one line naming the file and the key at fault, found by
/// the error's position in `document`.
fn value_error(
    file: &str,
    text: &str,
    document: &toml::de::DeTable<'_>,
    error: &toml::de::Error,
) -> ConfigError {
    let message = one_line(error.message());
    let key = error.span().and_then(|span| key_at(document, span.start));
    let file = file.to_owned();
    match key {
        Some(key) if message.starts_with("unknown field") => ConfigError::UnknownKey { file, key },
        Some(key) => ConfigError::FileValue { file, key, message },
        None => parse_error(&file, text, error),
    }
}

/// The dotted path of the key whose name or value covers byte `offset` (`limits.max-line`,
/// `allow[1]` for an array item), if any.
fn key_at(table: &toml::de::DeTable<'_>, offset: usize) -> Option<String> {
    for (key, value) in table {
        let name = one_line(key.get_ref());
        if key.span().contains(&offset) {
            return Some(name);
        }
        // A table's span may not cover its keys (a `[table]` header's span is the header), so
        // tables are searched whatever their span.
        if let toml::de::DeValue::Table(inner) = value.get_ref() {
            if let Some(inner_key) = key_at(inner, offset) {
                return Some(format!("{name}.{inner_key}"));
            }
        }
        if value.span().contains(&offset) {
            if let toml::de::DeValue::Array(items) = value.get_ref() {
                if let Some(i) = items.iter().position(|v| v.span().contains(&offset)) {
                    return Some(format!("{name}[{i}]"));
                }
            }
            return Some(name);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// The command line of `greyhound serve` as `cli::ServeArgs` has it: `--config` and the
    /// settings (repeated here so that this module does not depend on `cli`).
    #[derive(Debug, Parser)]
    struct Serve {
        #[arg(long, short = 'c')]
        config: Option<PathBuf>,
        #[command(flatten)]
        settings: Overrides,
    }

    /// Parses a `greyhound serve ...` command line and loads the configuration it gives.
    fn load(flags: &[&str]) -> Result<Config, ConfigError> {
        let argv = ["serve"].iter().chain(flags);
        let args = Serve::try_parse_from(argv).expect("command line parses");
        Config::load(args.config.as_deref(), &args.settings)
    }

    fn net(s: &str) -> IpNet {
        s.parse().expect("test CIDR parses")
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test address parses")
    }

    /// A file in the temporary directory, removed when dropped.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(name: &str, text: &str) -> TempFile {
            let path = std::env::temp_dir().join(format!(
                "greyhound-config-test-{}-{name}.toml",
                std::process::id()
            ));
            std::fs::write(&path, text).expect("temporary file is writable");
            TempFile(path)
        }

        fn path(&self) -> &str {
            self.0.to_str().expect("temporary path is UTF-8")
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn file_error(text: &str) -> ConfigError {
        Config::from_toml("g.toml", text).expect_err("the file must be refused")
    }

    fn invalid_key(config: &Config) -> &'static str {
        match config.validate() {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("expected an Invalid error, got {other:?}"),
        }
    }

    /// A file that sets every key to a value other than its default.
    const EVERY_KEY: &str = r#"
native = "0.0.0.0:11030"
policy = "unix:/run/greyhound/policy.sock"
metrics = "[::1]:9999"
admin = "/run/greyhound/admin.sock"
data-dir = "/var/lib/greyhound"
snapshot-interval = "2m"
delay = 600
retry-window = "3d"
whitelist-ttl = "5w"
awl-clients = 0
awl-interval = "2h"
awl-ttl = "10d"
ipv4-prefix = 32
ipv6-prefix = 48
allow = ["10.0.0.0/8", "192.0.2.7"]
dry-run = true
greylist-text = "Try later"
defer-action = "451"
x-greylist-header = false
hostname = "mx.example.net"
whitelist-clients = ["/etc/greyhound/clients"]
whitelist-senders = ["/etc/greyhound/senders"]
whitelist-recipients = ["/etc/greyhound/recipients", "/etc/greyhound/more"]
trusted-certs = ["/etc/greyhound/trusted_certs"]
greytrap-recipients = ["/etc/greyhound/traps"]
greytrap-ttl = "2d"
domain-policy = ["/etc/greyhound/domains"]
client-identity = "spf,name"
dns-server = "192.0.2.53:5353"
spf-timeout = "2s"
log-level = "debug"
workers = 3
cluster-redis = "redis://greyhound:s3cret@10.0.0.5:6379/2"
node-id = "mx1.example.net"
cluster-name = "prod_eu-1"
cluster-retention = "2h"

[limits]
max-line = 512
max-connections = 100
idle-timeout = "1m"
requests-per-read = 64
udp-max-datagram = 1500
policy-max-block = 4096
policy-max-attributes = 64
max-triplets = 2000000
max-new-per-client = 50
"#;

    fn every_key_config() -> Config {
        Config {
            native: addr("0.0.0.0:11030"),
            policy_addr: PolicyAddr::Unix(PathBuf::from("/run/greyhound/policy.sock")),
            metrics: addr("[::1]:9999"),
            admin: AdminSocket::At(PathBuf::from("/run/greyhound/admin.sock")),
            data_dir: PathBuf::from("/var/lib/greyhound"),
            snapshot_interval_secs: 120,
            policy: Policy {
                delay: 600,
                retry_window: 3 * 86_400,
                whitelist_ttl: 35 * 86_400,
                awl_clients: 0,
                awl_interval: 7200,
                awl_ttl: 10 * 86_400,
                dry_run: true,
            },
            ipv4_prefix: 32,
            ipv6_prefix: 48,
            allow: vec![net("10.0.0.0/8"), net("192.0.2.7/32")],
            greylist_text: "Try later".to_owned(),
            defer_action: DeferAction::Code451,
            x_greylist_header: false,
            hostname: "mx.example.net".to_owned(),
            whitelist_clients: vec![PathBuf::from("/etc/greyhound/clients")],
            whitelist_senders: vec![PathBuf::from("/etc/greyhound/senders")],
            whitelist_recipients: vec![
                PathBuf::from("/etc/greyhound/recipients"),
                PathBuf::from("/etc/greyhound/more"),
            ],
            trusted_certs: vec![PathBuf::from("/etc/greyhound/trusted_certs")],
            greytrap_recipients: vec![PathBuf::from("/etc/greyhound/traps")],
            greytrap_ttl_secs: 2 * 86_400,
            domain_policy: vec![PathBuf::from("/etc/greyhound/domains")],
            client_identity: Identities::parse("spf,name,prefix").unwrap(),
            dns_server: Some(addr("192.0.2.53:5353")),
            spf_timeout_ms: 2000,
            log_level: "debug".to_owned(),
            workers: 3,
            cluster_redis: Some("redis://greyhound:s3cret@10.0.0.5:6379/2".to_owned()),
            node_id: "mx1.example.net".to_owned(),
            cluster_name: "prod_eu-1".to_owned(),
            cluster_retention_secs: 7200,
            limits: Limits {
                max_line: 512,
                max_connections: 100,
                idle_timeout_secs: 60,
                requests_per_read: 64,
                udp_max_datagram: 1500,
                policy_max_block: 4096,
                policy_max_attributes: 64,
                max_triplets: 2_000_000,
                max_new_per_client: 50,
            },
        }
    }

    #[test]
    fn admin_socket_values() {
        let d = Path::new("/var/lib/g");
        assert_eq!(
            Config::default().admin.path(d),
            Some(PathBuf::from("/var/lib/g/admin.sock"))
        );
        let c = load(&["--admin", "off"]).unwrap();
        assert_eq!(c.admin.path(d), None);
        let c = load(&["--admin", "unix:/run/g/a.sock"]).unwrap();
        assert_eq!(c.admin.path(d), Some(PathBuf::from("/run/g/a.sock")));
        let c = Config::from_toml("g.toml", "admin = \"\"").unwrap();
        assert_eq!(c.admin, AdminSocket::InDataDir);
        let err = load(&["--admin", "unix:"]).unwrap_err().to_string();
        assert!(err.starts_with("--admin: \"unix:\""), "{err}");
    }

    #[test]
    fn defaults_are_the_contract() {
        let c = Config::default();
        assert_eq!(c.native, addr("127.0.0.1:10030"));
        assert_eq!(c.policy_addr, PolicyAddr::Tcp(addr("127.0.0.1:10023")));
        assert_eq!(c.metrics, addr("127.0.0.1:9470"));
        assert_eq!(c.data_dir, PathBuf::from("./greyhound-data"));
        assert_eq!(c.snapshot_interval_secs, 60);
        assert_eq!(c.policy.delay, 300);
        assert_eq!(c.policy.retry_window, 172_800);
        assert_eq!(c.policy.whitelist_ttl, 3_024_000);
        assert_eq!(c.policy.awl_clients, 5);
        assert_eq!(c.policy.awl_interval, 3600);
        assert_eq!(c.policy.awl_ttl, 3_024_000);
        assert_eq!((c.ipv4_prefix, c.ipv6_prefix), (24, 64));
        assert_eq!(c.allow, vec![net("127.0.0.0/8"), net("::1/128")]);
        assert!(!c.policy.dry_run);
        assert_eq!(
            c.greylist_text,
            "Greylisted, see https://greylisting.org/; from=%s to=%r"
        );
        assert!(c.x_greylist_header);
        assert_eq!(c.hostname, "");
        assert!(c.whitelist_clients.is_empty());
        assert!(c.whitelist_senders.is_empty());
        assert!(c.whitelist_recipients.is_empty());
        assert!(c.greytrap_recipients.is_empty());
        assert_eq!(c.greytrap_ttl_secs, 86_400);
        assert_eq!(c.log_level, "info");
        assert_eq!(c.workers, 0);
        assert_eq!(c.cluster_redis, None);
        assert_eq!(c.node_id, "");
        assert_eq!(c.cluster_name, "greyhound");
        assert_eq!(c.cluster_retention_secs, 3600);
        assert_eq!(
            c.limits,
            Limits {
                max_line: 1024,
                max_connections: 4096,
                idle_timeout_secs: 600,
                requests_per_read: 1024,
                udp_max_datagram: 65_507,
                policy_max_block: 16_384,
                policy_max_attributes: 128,
                max_triplets: 50_000_000,
                max_new_per_client: 0,
            }
        );
        c.validate().expect("the defaults are valid");
    }

    #[test]
    fn no_file_and_no_flag_gives_the_defaults() {
        assert_eq!(load(&[]).unwrap(), Config::default());
        assert_eq!(
            Config::load(None, &Overrides::default()).unwrap(),
            Config::default()
        );
        assert_eq!(Config::from_toml("empty", "").unwrap(), Config::default());
    }

    #[test]
    fn file_overrides_every_default() {
        assert_eq!(
            Config::from_toml("every", EVERY_KEY).unwrap(),
            every_key_config()
        );
        let file = TempFile::new("every", EVERY_KEY);
        let loaded = load(&["--config", file.path()]).unwrap();
        assert_eq!(loaded, every_key_config());
    }

    #[test]
    fn file_keys_left_out_keep_their_default() {
        let c = Config::from_toml("g.toml", "delay = \"10m\"\n[limits]\nmax-line = 100\n").unwrap();
        let expected = Config {
            policy: Policy {
                delay: 600,
                ..Policy::default()
            },
            limits: Limits {
                max_line: 100,
                ..Limits::default()
            },
            ..Config::default()
        };
        assert_eq!(c, expected);
    }

    #[test]
    fn every_flag_overrides_the_file() {
        let file = TempFile::new("flags", EVERY_KEY);
        let loaded = load(&[
            "--config",
            file.path(),
            "--native",
            "127.0.0.2:1",
            "--policy",
            "/tmp/p.sock",
            "--metrics",
            "127.0.0.2:3",
            "--admin",
            "off",
            "--data-dir",
            "/srv/g",
            "--snapshot-interval",
            "30",
            "--delay",
            "1m",
            "--retry-window",
            "1h",
            "--whitelist-ttl",
            "1d",
            "--awl-clients",
            "7",
            "--awl-interval",
            "10m",
            "--awl-ttl",
            "1w",
            "--ipv4-prefix",
            "16",
            "--ipv6-prefix",
            "56",
            "--allow",
            "198.51.100.0/24",
            "--dry-run",
            "--greylist-text",
            "Later, %s",
            "--defer-action",
            "DEFER",
            "--no-x-greylist-header",
            "--hostname",
            "mx2.example.net",
            "--whitelist-clients",
            "/a",
            "--whitelist-senders",
            "/b",
            "--whitelist-recipients",
            "/c",
            "--trusted-certs",
            "/d",
            "--greytrap-recipients",
            "/t",
            "--greytrap-ttl",
            "3h",
            "--domain-policy",
            "/p",
            "--client-identity",
            "prefix",
            "--dns-server",
            "::1",
            "--spf-timeout",
            "250ms",
            "--log-level",
            "trace",
            "--workers",
            "5",
            "--cluster-redis",
            "unix:///run/redis/redis.sock",
            "--node-id",
            "mx2",
            "--cluster-name",
            "staging",
            "--cluster-retention",
            "1d",
            "--max-line",
            "256",
            "--max-connections",
            "10",
            "--idle-timeout",
            "5m",
            "--requests-per-read",
            "8",
            "--udp-max-datagram",
            "9000",
            "--policy-max-block",
            "2048",
            "--policy-max-attributes",
            "40",
            "--max-triplets",
            "1000",
            "--max-new-per-client",
            "7",
        ]);
        let expected = Config {
            native: addr("127.0.0.2:1"),
            policy_addr: PolicyAddr::Unix(PathBuf::from("/tmp/p.sock")),
            metrics: addr("127.0.0.2:3"),
            admin: AdminSocket::Off,
            data_dir: PathBuf::from("/srv/g"),
            snapshot_interval_secs: 30,
            policy: Policy {
                delay: 60,
                retry_window: 3600,
                whitelist_ttl: 86_400,
                awl_clients: 7,
                awl_interval: 600,
                awl_ttl: 604_800,
                dry_run: true,
            },
            ipv4_prefix: 16,
            ipv6_prefix: 56,
            allow: vec![net("198.51.100.0/24")],
            greylist_text: "Later, %s".to_owned(),
            defer_action: DeferAction::Defer,
            x_greylist_header: false,
            hostname: "mx2.example.net".to_owned(),
            whitelist_clients: vec![PathBuf::from("/a")],
            whitelist_senders: vec![PathBuf::from("/b")],
            whitelist_recipients: vec![PathBuf::from("/c")],
            trusted_certs: vec![PathBuf::from("/d")],
            greytrap_recipients: vec![PathBuf::from("/t")],
            greytrap_ttl_secs: 3 * 3600,
            domain_policy: vec![PathBuf::from("/p")],
            client_identity: Identities::PREFIX_ONLY,
            dns_server: Some(addr("[::1]:53")),
            spf_timeout_ms: 250,
            log_level: "trace".to_owned(),
            workers: 5,
            cluster_redis: Some("unix:///run/redis/redis.sock".to_owned()),
            node_id: "mx2".to_owned(),
            cluster_name: "staging".to_owned(),
            cluster_retention_secs: 86_400,
            limits: Limits {
                max_line: 256,
                max_connections: 10,
                idle_timeout_secs: 300,
                requests_per_read: 8,
                udp_max_datagram: 9000,
                policy_max_block: 2048,
                policy_max_attributes: 40,
                max_triplets: 1000,
                max_new_per_client: 7,
            },
        };
        assert_eq!(loaded.unwrap(), expected);
    }

    #[test]
    fn absent_boolean_flags_keep_the_file_value() {
        let file = TempFile::new("bools", "dry-run = true\nx-greylist-header = false\n");
        let c = load(&["--config", file.path()]).unwrap();
        assert!(c.policy.dry_run);
        assert!(!c.x_greylist_header);
        // And the flags alone switch the defaults.
        let c = load(&["--dry-run", "--no-x-greylist-header"]).unwrap();
        assert!(c.policy.dry_run);
        assert!(!c.x_greylist_header);
        // The opposite flags override the file.
        let c = load(&[
            "--config",
            file.path(),
            "--no-dry-run",
            "--x-greylist-header",
        ])
        .unwrap();
        assert!(!c.policy.dry_run);
        assert!(c.x_greylist_header);
        // Of a pair given twice, the last one wins.
        let c = load(&["--no-dry-run", "--dry-run"]).unwrap();
        assert!(c.policy.dry_run);
    }

    #[test]
    fn allow_flag_replaces_the_default_and_repeats() {
        let c = load(&["--allow", "10.0.0.0/8"]).unwrap();
        assert_eq!(c.allow, vec![net("10.0.0.0/8")]);
        let c = load(&[
            "--allow",
            "10.0.0.0/8",
            "--allow",
            "2001:db8::/32",
            "--allow",
            "192.0.2.7/24",
        ])
        .unwrap();
        assert_eq!(
            c.allow,
            vec![net("10.0.0.0/8"), net("2001:db8::/32"), net("192.0.2.0/24")]
        );
        // Over a file's list too: the flags' list wins whole, not merged.
        let file = TempFile::new("allow", "allow = [\"172.16.0.0/12\", \"::1\"]\n");
        let c = load(&["--config", file.path(), "--allow", "203.0.113.0/24"]).unwrap();
        assert_eq!(c.allow, vec![net("203.0.113.0/24")]);
        let c = load(&["--config", file.path()]).unwrap();
        assert_eq!(c.allow, vec![net("172.16.0.0/12"), net("::1/128")]);
    }

    #[test]
    fn durations_in_every_form() {
        let cases = [
            ("300", 300),
            ("300s", 300),
            ("5m", 300),
            ("2h", 7200),
            ("2d", 172_800),
            ("1w", 604_800),
            ("0", 0),
            (" 45s ", 45),
            ("4294967295", u32::MAX),
        ];
        for (text, secs) in cases {
            assert_eq!(parse_duration(text), Ok(secs), "{text:?}");
        }
        // In the file, as an integer or as a string.
        assert_eq!(
            Config::from_toml("g", "delay = 300").unwrap().policy.delay,
            300
        );
        assert_eq!(
            Config::from_toml("g", "delay = \"7m\"")
                .unwrap()
                .policy
                .delay,
            420
        );
    }

    #[test]
    fn bad_durations_are_refused_with_a_reason() {
        let cases = [
            ("", "\"\" is not a duration: it is empty (use 300, 300s, 5m, 2h, 2d, 1w)"),
            ("-5", "\"-5\" is not a duration: it is negative"),
            ("5x", "\"5x\" is not a duration (use 300, 300s, 5m, 2h, 2d, 1w)"),
            ("1.5m", "\"1.5m\" is not a duration: fractions are not accepted, use a smaller unit (90s, not 1.5m)"),
            ("99999999999", "\"99999999999\" is not a duration: it exceeds 4294967295 seconds (about 136 years)"),
            ("4294967296", "\"4294967296\" is not a duration: it exceeds 4294967295 seconds (about 136 years)"),
            ("99999999999999999999999", "\"99999999999999999999999\" is not a duration: it exceeds 4294967295 seconds (about 136 years)"),
            ("m", "\"m\" is not a duration (use 300, 300s, 5m, 2h, 2d, 1w)"),
            ("5M", "\"5M\" is not a duration (use 300, 300s, 5m, 2h, 2d, 1w)"),
            ("1h30m", "\"1h30m\" is not a duration (use 300, 300s, 5m, 2h, 2d, 1w)"),
            ("+5", "\"+5\" is not a duration (use 300, 300s, 5m, 2h, 2d, 1w)"),
        ];
        for (text, message) in cases {
            assert_eq!(parse_duration(text), Err(message.to_owned()), "{text:?}");
        }
    }

    #[test]
    fn bad_duration_names_the_flag_or_the_key() {
        let err = load(&["--delay", "5x"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--delay: \"5x\" is not a duration (use 300, 300s, 5m, 2h, 2d, 1w)"
        );
        let err = load(&["--idle-timeout=-1"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--idle-timeout: \"-1\" is not a duration: it is negative"
        );
        assert_eq!(
            file_error("delay = -5").to_string(),
            "config file g.toml: delay: \"-5\" is not a duration: it is negative"
        );
        assert_eq!(
            file_error("[limits]\nidle-timeout = \"1.5m\"").to_string(),
            "config file g.toml: limits.idle-timeout: \"1.5m\" is not a duration: fractions are not accepted, use a smaller unit (90s, not 1.5m)"
        );
        assert_eq!(
            file_error("delay = 1.5").to_string(),
            "config file g.toml: delay: invalid type: floating point `1.5`, expected a duration (a number of seconds, or a string such as \"5m\")"
        );
    }

    #[test]
    fn bad_defer_action_names_the_flag_or_the_key() {
        assert_eq!(
            load(&["--defer-action", "REJECT"]).unwrap_err().to_string(),
            "--defer-action: \"REJECT\" is not one of DEFER_IF_PERMIT, DEFER, 450, 451"
        );
        assert_eq!(
            file_error("defer-action = \"452\"").to_string(),
            "config file g.toml: defer-action: \"452\" is not one of DEFER_IF_PERMIT, DEFER, 450, 451"
        );
        assert_eq!(
            load(&["--defer-action", "defer_if_permit"])
                .unwrap()
                .defer_action,
            DeferAction::DeferIfPermit
        );
        assert_eq!(
            load(&["--defer-action", "450"]).unwrap().defer_action,
            DeferAction::Code450
        );
    }

    #[test]
    fn format_duration_reads_back() {
        let cases = [
            (0, "0s"),
            (90, "90s"),
            (300, "5m"),
            (7200, "2h"),
            (172_800, "2d"),
            (3_024_000, "5w"),
        ];
        for (secs, text) in cases {
            assert_eq!(format_duration(secs), text);
            assert_eq!(parse_duration(text), Ok(secs));
        }
    }

    #[test]
    fn policy_address_forms() {
        assert_eq!(
            "127.0.0.1:10023".parse::<PolicyAddr>(),
            Ok(PolicyAddr::Tcp(addr("127.0.0.1:10023")))
        );
        assert_eq!(
            "[::1]:10023".parse::<PolicyAddr>(),
            Ok(PolicyAddr::Tcp(addr("[::1]:10023")))
        );
        assert_eq!(
            "/run/greyhound/policy.sock".parse::<PolicyAddr>(),
            Ok(PolicyAddr::Unix(PathBuf::from(
                "/run/greyhound/policy.sock"
            )))
        );
        assert_eq!(
            "unix:/tmp/p.sock".parse::<PolicyAddr>(),
            Ok(PolicyAddr::Unix(PathBuf::from("/tmp/p.sock")))
        );
        // Host names are refused, not resolved.
        assert_eq!(
            "localhost:10023".parse::<PolicyAddr>(),
            Err("\"localhost:10023\" must be an IP:port such as 127.0.0.1:10030 or [::1]:10030 (host names are not resolved)".to_owned())
        );
        assert_eq!(
            "unix:".parse::<PolicyAddr>(),
            Err("\"unix:\" names no socket path (use unix:/run/greyhound/policy.sock)".to_owned())
        );
        let long = format!("/{}", "x".repeat(MAX_UNIX_PATH));
        assert_eq!(
            long.parse::<PolicyAddr>(),
            Err(format!(
                "{long:?} is too long for a Unix socket path (108 bytes, at most 107)"
            ))
        );
        let longest = format!("/{}", "x".repeat(MAX_UNIX_PATH - 1));
        assert_eq!(
            longest.parse::<PolicyAddr>(),
            Ok(PolicyAddr::Unix(PathBuf::from(&longest)))
        );
        // Display writes back a form that parses to the same address.
        for text in ["127.0.0.1:10023", "[::1]:10023", "unix:/tmp/p.sock"] {
            let parsed: PolicyAddr = text.parse().unwrap();
            assert_eq!(parsed.to_string(), text);
        }
    }

    #[test]
    fn address_errors_name_the_flag_or_key() {
        let err = load(&["--native", "localhost:10030"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--native: \"localhost:10030\" must be an IP:port such as 127.0.0.1:10030 or [::1]:10030 (host names are not resolved)"
        );
        let err = load(&["--metrics", "127.0.0.1"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--metrics: \"127.0.0.1\" has no port (use IP:port such as 127.0.0.1:10030 or [::1]:10030)"
        );
        assert_eq!(
            file_error("policy = \"example.org:25\"").to_string(),
            "config file g.toml: policy: \"example.org:25\" must be an IP:port such as 127.0.0.1:10030 or [::1]:10030 (host names are not resolved)"
        );
        let err = load(&["--allow", "10.0.0.0/33"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--allow: \"10.0.0.0/33\" is not a network (use a CIDR such as 10.0.0.0/8 or 2001:db8::/32, or an IP address)"
        );
        assert_eq!(
            file_error("allow = [\"10.0.0.0/8\", \"nope\"]").to_string(),
            "config file g.toml: allow: \"nope\" is not a network (use a CIDR such as 10.0.0.0/8 or 2001:db8::/32, or an IP address)"
        );
    }

    #[test]
    fn unknown_key_names_the_file_and_key() {
        let file = TempFile::new("unknown", "delay = 300\ndely = 600\n");
        let err = load(&["--config", file.path()]).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("config file {}: unknown key \"dely\"", file.path())
        );
        match file_error("[limits]\nmax-lines = 100\n") {
            ConfigError::UnknownKey { file, key } => {
                assert_eq!(
                    (file.as_str(), key.as_str()),
                    ("g.toml", "limits.max-lines")
                );
            }
            other => panic!("expected UnknownKey, got {other:?}"),
        }
        // Inline and dotted tables are located as well as a [limits] section.
        for text in ["limits = { max-lines = 3 }", "limits.max-lines = 3"] {
            assert_eq!(
                file_error(text).to_string(),
                "config file g.toml: unknown key \"limits.max-lines\"",
                "{text:?}"
            );
        }
        assert_eq!(
            file_error("[foo]\nbar = 1").to_string(),
            "config file g.toml: unknown key \"foo\""
        );
        // Flag spellings are not keys: `dry_run` is a typo for `dry-run`.
        assert_eq!(
            file_error("dry_run = true").to_string(),
            "config file g.toml: unknown key \"dry_run\""
        );
        // The `--no-` flags are flags only, not keys.
        assert_eq!(
            file_error("no-dry-run = true").to_string(),
            "config file g.toml: unknown key \"no-dry-run\""
        );
    }

    #[test]
    fn wrong_type_names_the_key() {
        assert_eq!(
            file_error("dry-run = \"yes\"").to_string(),
            "config file g.toml: dry-run: invalid type: string \"yes\", expected a boolean"
        );
        assert_eq!(
            file_error("delay = true").to_string(),
            "config file g.toml: delay: invalid type: boolean `true`, expected a duration (a number of seconds, or a string such as \"5m\")"
        );
        match file_error("[limits]\nmax-line = \"big\"\n") {
            ConfigError::FileValue { key, .. } => assert_eq!(key, "limits.max-line"),
            other => panic!("expected FileValue, got {other:?}"),
        }
        match file_error("allow = [\"10.0.0.0/8\", 5]") {
            ConfigError::FileValue { key, .. } => assert_eq!(key, "allow[1]"),
            other => panic!("expected FileValue, got {other:?}"),
        }
        match file_error("ipv4-prefix = 300") {
            ConfigError::FileValue { key, message, .. } => {
                assert_eq!(key, "ipv4-prefix");
                assert_eq!(message, "invalid value: integer `300`, expected u8");
            }
            other => panic!("expected FileValue, got {other:?}"),
        }
        // Serde alone would read `limits = [512]` as `max-line = 512`: only a table is taken.
        for text in ["limits = 5", "limits = [512]", "[[limits]]\nmax-line = 512"] {
            assert_eq!(
                file_error(text).to_string(),
                "config file g.toml: limits: must be a table: a [limits] line followed by its keys",
                "{text:?}"
            );
        }
    }

    #[test]
    fn syntax_error_gives_line_and_column() {
        match file_error("delay = 300\nnative = \n") {
            ConfigError::Parse { file, line, .. } => {
                assert_eq!((file.as_str(), line), ("g.toml", 2));
            }
            other => panic!("expected Parse, got {other:?}"),
        }
        match file_error("delay = 300\ndelay = 400\n") {
            ConfigError::Parse { line, column, .. } => assert_eq!((line, column), (2, 1)),
            other => panic!("expected Parse, got {other:?}"),
        }
    }

    #[test]
    fn missing_file_names_it() {
        let missing = std::env::temp_dir().join("greyhound-no-such-dir/none.toml");
        match load(&["--config", missing.to_str().unwrap()]).unwrap_err() {
            ConfigError::Read { file, error } => {
                assert_eq!(file, missing.display().to_string());
                assert_eq!(error.kind(), std::io::ErrorKind::NotFound);
            }
            other => panic!("expected Read, got {other:?}"),
        }
    }

    #[test]
    fn validation_boundaries() {
        let ok = Config::default;
        let mut c = ok();
        c.ipv4_prefix = 32;
        c.ipv6_prefix = 128;
        assert!(c.validate().is_ok());
        c.ipv4_prefix = 33;
        assert_eq!(invalid_key(&c), "ipv4-prefix");
        let mut c = ok();
        c.ipv6_prefix = 129;
        assert_eq!(invalid_key(&c), "ipv6-prefix");
        // Prefixes that would make one client of a large part of the Internet.
        let mut c = ok();
        c.ipv4_prefix = 8;
        c.ipv6_prefix = 16;
        assert!(c.validate().is_ok());
        c.ipv4_prefix = 7;
        assert_eq!(invalid_key(&c), "ipv4-prefix");
        c.ipv4_prefix = 8;
        c.ipv6_prefix = 15;
        assert_eq!(invalid_key(&c), "ipv6-prefix");
        // A zero delay only in dry-run.
        let mut c = ok();
        c.policy.delay = 0;
        assert_eq!(invalid_key(&c), "delay");
        c.policy.dry_run = true;
        assert!(c.validate().is_ok());

        let mut c = ok();
        c.limits.max_line = 1024;
        assert!(c.validate().is_ok());
        c.limits.max_line = 1025;
        assert_eq!(invalid_key(&c), "limits.max-line");
        c.limits.max_line = 64;
        assert!(c.validate().is_ok());
        c.limits.max_line = 63;
        assert_eq!(invalid_key(&c), "limits.max-line");

        let mut c = ok();
        c.policy.retry_window = c.policy.delay;
        assert!(c.validate().is_ok());
        c.policy.retry_window = c.policy.delay - 1;
        assert_eq!(invalid_key(&c), "retry-window");

        let mut c = ok();
        c.policy.whitelist_ttl = 1;
        assert!(c.validate().is_ok());
        c.policy.whitelist_ttl = 0;
        assert_eq!(invalid_key(&c), "whitelist-ttl");

        let mut c = ok();
        c.policy.awl_ttl = MAX_DURATION_SECS;
        assert!(c.validate().is_ok());
        c.policy.awl_ttl = MAX_DURATION_SECS + 1;
        assert_eq!(invalid_key(&c), "awl-ttl");

        let mut c = ok();
        c.policy.awl_clients = 65_535;
        assert!(c.validate().is_ok());
        c.policy.awl_clients = 65_536;
        assert_eq!(invalid_key(&c), "awl-clients");

        let mut c = ok();
        c.snapshot_interval_secs = 1;
        assert!(c.validate().is_ok());
        c.snapshot_interval_secs = 0;
        assert_eq!(invalid_key(&c), "snapshot-interval");

        let mut c = ok();
        c.limits.udp_max_datagram = 512;
        assert!(c.validate().is_ok());
        c.limits.udp_max_datagram = 511;
        assert_eq!(invalid_key(&c), "limits.udp-max-datagram");
        c.limits.udp_max_datagram = 65_508;
        assert_eq!(invalid_key(&c), "limits.udp-max-datagram");

        let mut c = ok();
        c.limits.policy_max_block = 1_048_576;
        assert!(c.validate().is_ok());
        c.limits.policy_max_block = 1_048_577;
        assert_eq!(invalid_key(&c), "limits.policy-max-block");
        c.limits.policy_max_block = 1023;
        assert_eq!(invalid_key(&c), "limits.policy-max-block");

        let mut c = ok();
        c.limits.max_connections = 0;
        assert_eq!(invalid_key(&c), "limits.max-connections");
        let mut c = ok();
        c.limits.requests_per_read = 0;
        assert_eq!(invalid_key(&c), "limits.requests-per-read");
        let mut c = ok();
        c.limits.policy_max_attributes = 31;
        assert_eq!(invalid_key(&c), "limits.policy-max-attributes");
        let mut c = ok();
        c.limits.idle_timeout_secs = 0;
        assert_eq!(invalid_key(&c), "limits.idle-timeout");

        let mut c = ok();
        c.limits.max_triplets = 1000;
        assert!(c.validate().is_ok());
        c.limits.max_triplets = 0;
        assert_eq!(invalid_key(&c), "limits.max-triplets");
        c.limits.max_triplets = 999;
        assert_eq!(invalid_key(&c), "limits.max-triplets");
        c.limits.max_triplets = 4_000_000_000;
        assert!(c.validate().is_ok());
        c.limits.max_triplets = 4_000_000_001;
        assert_eq!(invalid_key(&c), "limits.max-triplets");
        let mut c = ok();
        c.limits.max_new_per_client = 0;
        assert!(c.validate().is_ok());
        c.limits.max_new_per_client = 1_000_000;
        assert!(c.validate().is_ok());
        c.limits.max_new_per_client = 1_000_001;
        assert_eq!(invalid_key(&c), "limits.max-new-per-client");
    }

    #[test]
    fn validation_of_texts_and_lists() {
        let mut c = Config::default();
        c.allow.clear();
        assert_eq!(invalid_key(&c), "allow");

        let mut c = Config::default();
        c.greylist_text.clear();
        assert_eq!(invalid_key(&c), "greylist-text");
        c.greylist_text = "line one\r\nX-Injected: yes".to_owned();
        assert_eq!(invalid_key(&c), "greylist-text");
        c.greylist_text = "x".repeat(MAX_GREYLIST_TEXT);
        assert!(c.validate().is_ok());
        c.greylist_text.push('x');
        assert_eq!(invalid_key(&c), "greylist-text");

        let mut c = Config {
            hostname: "mx1.example.net".to_owned(),
            ..Config::default()
        };
        assert!(c.validate().is_ok());
        c.hostname = "mx1 example".to_owned();
        assert_eq!(invalid_key(&c), "hostname");

        let mut c = Config {
            log_level: "verbose".to_owned(),
            ..Config::default()
        };
        assert_eq!(invalid_key(&c), "log-level");
        for level in LOG_LEVELS {
            c.log_level = level.to_owned();
            assert!(c.validate().is_ok(), "{level}");
        }

        let c = Config {
            data_dir: PathBuf::new(),
            ..Config::default()
        };
        assert_eq!(invalid_key(&c), "data-dir");

        let c = Config {
            whitelist_senders: vec![PathBuf::from("/ok"), PathBuf::new()],
            ..Config::default()
        };
        assert_eq!(invalid_key(&c), "whitelist-senders");
    }

    #[test]
    fn listeners_on_one_port_are_refused() {
        let mut c = Config {
            metrics: addr("127.0.0.1:10030"),
            ..Config::default()
        };
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "native (127.0.0.1:10030) uses the same TCP port as metrics (127.0.0.1:10030)"
        );
        c.metrics = addr("0.0.0.0:10023");
        assert_eq!(invalid_key(&c), "metrics");
        // Another address, another family, or port 0 (the OS chooses) do not clash.
        c.metrics = addr("127.0.0.2:10030");
        assert!(c.validate().is_ok());
        c.metrics = addr("[::]:10030");
        assert!(c.validate().is_ok());
        c.native = addr("127.0.0.1:0");
        c.metrics = addr("127.0.0.1:0");
        c.policy_addr = PolicyAddr::Tcp(addr("127.0.0.1:0"));
        assert!(c.validate().is_ok());
    }

    #[test]
    fn validation_messages_read_as_designed() {
        let err = Config::from_toml("g.toml", "retry-window = \"1m\"\ndelay = \"5m\"").unwrap_err();
        assert_eq!(
            err.to_string(),
            "retry-window (1m) is shorter than delay (5m): no retry could ever pass"
        );
        // A flag can repair what the file alone gets wrong: validation comes last.
        let file = TempFile::new("repair", "retry-window = \"1m\"\n");
        let c = load(&["--config", file.path(), "--delay", "30s"]).unwrap();
        assert_eq!((c.policy.delay, c.policy.retry_window), (30, 60));
        let err = load(&["--ipv4-prefix", "33"]).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("ipv4-prefix (33) must be between 8 and 32"),
            "{err}"
        );
    }

    #[test]
    fn every_error_is_one_line() {
        let nasty = "a\nb";
        let errors = vec![
            Config::from_toml("dir/with\nnewline.toml", "dely = 1").unwrap_err(),
            file_error("\"bad\nkey\" = 1"),
            file_error("delay = \"5\n\"\"\""),
            file_error("native = \"a\\nb\""),
            file_error("[limits]\nmax-line = \"x\""),
            file_error("delay = 300\ndelay ="),
            file_error("greylist-text = \"a\\u0007b\""),
            file_error("hostname = \"mx\\nX-Evil: 1\""),
            load(&["--native", nasty]).unwrap_err(),
            load(&["--delay", nasty]).unwrap_err(),
            load(&["--policy", "unix:/a\0b"]).unwrap_err(),
            load(&["--greylist-text", nasty]).unwrap_err(),
            load(&["--config", "/nonexistent/\n.toml"]).unwrap_err(),
            load(&["--cluster-redis", "redis://a\nb"]).unwrap_err(),
            load(&["--node-id", nasty]).unwrap_err(),
            file_error("cluster-name = \"a\\nb\""),
        ];
        for err in errors {
            let text = err.to_string();
            assert!(!text.is_empty());
            assert!(!text.contains(['\n', '\r']), "{text:?}");
        }
    }

    #[test]
    fn workers_bounds() {
        // 0 is "half the cores"; the largest count is accepted, one more is refused.
        for ok in [0, 1, MAX_WORKERS] {
            let c = Config {
                workers: ok,
                ..Config::default()
            };
            assert!(c.validate().is_ok(), "{ok}");
        }
        let c = Config {
            workers: MAX_WORKERS + 1,
            ..Config::default()
        };
        assert_eq!(invalid_key(&c), "workers");
        let err = load(&["--workers", "1025"]).unwrap_err().to_string();
        assert!(
            err.starts_with("workers (1025)") && err.contains("1024"),
            "{err}"
        );
    }

    #[test]
    fn redact_url_hides_only_the_password() {
        let cases = [
            ("redis://user:secret@h:1/0", "redis://user:***@h:1/0"),
            ("redis://:secret@h", "redis://:***@h"),
            ("rediss://u:p@[::1]:6380", "rediss://u:***@[::1]:6380"),
            // A password with unencoded '/', '@' or ':' is hidden whole.
            ("redis://u:a/b@c:d@h:1/0", "redis://u:***@h:1/0"),
            // Nothing to hide.
            ("redis://user@h:1/0", "redis://user@h:1/0"),
            ("redis://h:6379/0", "redis://h:6379/0"),
            ("unix:///run/redis.sock", "unix:///run/redis.sock"),
            ("localhost:6379", "localhost:6379"),
            ("", ""),
            // Without a scheme the user information is still recognised.
            ("u:p@h", "u:***@h"),
        ];
        for (url, redacted) in cases {
            assert_eq!(redact_url(url), redacted, "{url}");
        }
    }

    #[test]
    fn cluster_redis_forms() {
        let accepted = [
            "redis://127.0.0.1:6379",
            "redis://redis.example.net",
            "redis://user:secret@10.0.0.5:6379/3",
            "redis://:secret@[::1]:6379",
            "rediss://node-a:pw@redis.example.net:6380/0",
            "unix:///run/redis/redis.sock",
            "unix:///run/redis/redis.sock?db=2",
        ];
        for url in accepted {
            let c = load(&["--cluster-redis", url]).unwrap();
            assert_eq!(c.cluster_redis.as_deref(), Some(url));
            let c = Config::from_toml("g.toml", &format!("cluster-redis = {url:?}")).unwrap();
            assert_eq!(c.cluster_redis.as_deref(), Some(url));
        }
        // Empty is off, from the file and from the flag, which also turns off the file's.
        let c = Config::from_toml("g.toml", "cluster-redis = \"\"").unwrap();
        assert_eq!(c.cluster_redis, None);
        let file = TempFile::new("redis", "cluster-redis = \"redis://h:1\"\n");
        let c = load(&["--config", file.path()]).unwrap();
        assert_eq!(c.cluster_redis.as_deref(), Some("redis://h:1"));
        let c = load(&["--config", file.path(), "--cluster-redis", ""]).unwrap();
        assert_eq!(c.cluster_redis, None);
    }

    #[test]
    fn bad_cluster_redis_names_the_flag_or_key_and_hides_the_password() {
        let refused = [
            "http://u:secret@h:6379",
            "localhost:6379",
            "REDIS://h:6379",
            "redis+unix:///run/r.sock",
            "redis://",
            "redis://u:secret@",
            "redis://:6379",
            "unix://run/redis.sock",
            "unix://",
            "redis://h:6379 ",
        ];
        for url in refused {
            let err = load(&["--cluster-redis", url]).unwrap_err().to_string();
            assert!(err.starts_with("--cluster-redis: "), "{err}");
            assert!(!err.contains("secret"), "{err}");
            let err = file_error(&format!("cluster-redis = {url:?}")).to_string();
            assert!(
                err.starts_with("config file g.toml: cluster-redis: "),
                "{err}"
            );
            assert!(!err.contains("secret"), "{err}");
        }
        assert_eq!(
            load(&["--cluster-redis", "http://u:secret@h"])
                .unwrap_err()
                .to_string(),
            "--cluster-redis: \"http://u:***@h\" is not a Redis URL (use \
             redis://[user:password@]host:port[/db], rediss://... for TLS, or \
             unix:///path/to/redis.sock; empty: no cluster)"
        );
        // A Config built in code is held to the same forms.
        let c = Config {
            cluster_redis: Some("tcp://h:6379".to_owned()),
            ..Config::default()
        };
        assert_eq!(invalid_key(&c), "cluster-redis");
        let c = Config {
            cluster_redis: Some(String::new()),
            ..Config::default()
        };
        assert_eq!(invalid_key(&c), "cluster-redis");
    }

    #[test]
    fn debug_output_hides_the_redis_password() {
        let c = Config {
            cluster_redis: Some("redis://node:secret@h:6379/0".to_owned()),
            ..Config::default()
        };
        let text = format!("{c:?}");
        assert!(!text.contains("secret"), "{text}");
        assert!(text.contains("redis://node:***@h:6379/0"), "{text}");
        let args = Serve::try_parse_from(["serve", "--cluster-redis", "redis://:secret@h"])
            .expect("command line parses");
        let text = format!("{args:?}");
        assert!(!text.contains("secret"), "{text}");
        assert!(text.contains("redis://:***@h"), "{text}");
        let o = Overrides::from_toml("g.toml", "cluster-redis = \"rediss://u:secret@h\"").unwrap();
        assert!(!format!("{o:?}").contains("secret"));
    }

    #[test]
    fn node_id_and_cluster_name_syntax() {
        let longest = "a".repeat(64);
        for name in ["a", "mx1.example.net", "node_2-b", longest.as_str()] {
            let c = load(&["--node-id", name, "--cluster-name", name]).unwrap();
            assert_eq!((c.node_id.as_str(), c.cluster_name.as_str()), (name, name));
        }
        // An empty node id is the host name; an empty cluster name is refused.
        assert_eq!(load(&["--node-id", ""]).unwrap().node_id, "");
        let too_long = "a".repeat(65);
        for bad in [
            "mx 1",
            "mx:1",
            "mx/1",
            "n\u{e9}ud",
            "a\nb",
            too_long.as_str(),
        ] {
            let err = load(&["--node-id", bad]).unwrap_err().to_string();
            assert!(err.starts_with("node-id ("), "{err}");
            assert!(err.contains("A-Z a-z 0-9 _ . -"), "{err}");
            let err = file_error(&format!("cluster-name = {bad:?}")).to_string();
            assert!(err.starts_with("cluster-name ("), "{err}");
        }
        let err = load(&["--cluster-name", ""]).unwrap_err().to_string();
        assert!(err.starts_with("cluster-name (\"\")"), "{err}");
        assert_eq!(
            load(&["--node-id", "mx 1"]).unwrap_err().to_string(),
            "node-id (\"mx 1\") must be 1 to 64 characters among A-Z a-z 0-9 _ . - \
             (leave it empty for the host name)"
        );
    }

    #[test]
    fn cluster_retention_bounds() {
        for (text, secs) in [("60", 60), ("1m", 60), ("1h", 3600), ("30d", 30 * 86_400)] {
            let c = load(&["--cluster-retention", text]).unwrap();
            assert_eq!(c.cluster_retention_secs, secs, "{text}");
            let toml = format!("cluster-retention = {text:?}");
            let c = Config::from_toml("g.toml", &toml).unwrap();
            assert_eq!(c.cluster_retention_secs, secs, "{text}");
        }
        assert_eq!(
            load(&["--cluster-retention", "59s"])
                .unwrap_err()
                .to_string(),
            "cluster-retention (59s) must be between 1m and 30d"
        );
        let c = Config {
            cluster_retention_secs: MAX_CLUSTER_RETENTION_SECS + 1,
            ..Config::default()
        };
        assert_eq!(invalid_key(&c), "cluster-retention");
        let err = file_error("cluster-retention = \"5w\"").to_string();
        assert_eq!(err, "cluster-retention (5w) must be between 1m and 30d");
        // A malformed duration names the flag or the key, as every duration does.
        let err = load(&["--cluster-retention", "1y"])
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("--cluster-retention: \"1y\""), "{err}");
        let err = file_error("cluster-retention = \"-1h\"").to_string();
        assert!(
            err.starts_with("config file g.toml: cluster-retention: "),
            "{err}"
        );
    }

    #[test]
    fn client_identity_dns_server_and_spf_timeout_are_checked() {
        let c = load(&["--client-identity", "spf", "--spf-timeout", "1s"]).unwrap();
        assert_eq!(c.client_identity.to_string(), "spf,prefix");
        assert_eq!(c.spf_timeout_ms, 1000);
        assert_eq!(
            load(&["--dns-server", "192.0.2.53"]).unwrap().dns_server,
            Some(addr("192.0.2.53:53"))
        );
        assert_eq!(
            load(&["--dns-server", "[2001:db8::53]:5353"])
                .unwrap()
                .dns_server,
            Some(addr("[2001:db8::53]:5353"))
        );
        for (argv, starts) in [
            (
                &["--client-identity", "name,ptr"][..],
                "--client-identity: ",
            ),
            (&["--client-identity", "prefix,name"], "--client-identity: "),
            (&["--client-identity", "spf,spf"], "--client-identity: "),
            (
                &["--dns-server", "dns.example"],
                "--dns-server: bad DNS server \"dns.example\"",
            ),
            (&["--spf-timeout", "500"], "--spf-timeout: \"500\""),
            (&["--spf-timeout", "1.5s"], "--spf-timeout: "),
            (&["--spf-timeout", "5ms"], "spf-timeout "),
            (&["--spf-timeout", "31s"], "spf-timeout "),
        ] {
            let err = load(argv).unwrap_err().to_string();
            assert!(err.starts_with(starts), "{argv:?}: {err}");
            assert!(!err.contains('\n'), "one line: {err}");
        }
        let err = file_error("client-identity = \"name,dns\"").to_string();
        assert!(
            err.starts_with("config file g.toml: client-identity: "),
            "{err}"
        );
    }

    #[test]
    fn help_shows_the_true_defaults() {
        use clap::CommandFactory;
        // `--help` states each default in words; given as the flag's value, it must change
        // nothing, or the help and `Config::default` disagree.
        let command = Serve::command();
        let mut checked = Vec::new();
        for arg in command.get_arguments() {
            let (Some(long), Some(help)) = (arg.get_long(), arg.get_help()) else {
                continue;
            };
            let help = help.to_string();
            let Some((_, default)) = help.split_once("[default: ") else {
                continue;
            };
            let default = default
                .strip_suffix(']')
                .expect("[default: ...] ends the help");
            if default == "the OS's host name" {
                let c = Config::default();
                let value = if long == "node-id" {
                    c.node_id
                } else {
                    c.hostname
                };
                assert_eq!(value, "", "--{long}");
                continue;
            }
            if default == "<data-dir>/admin.sock" {
                assert_eq!(Config::default().admin, AdminSocket::InDataDir, "--{long}");
                continue;
            }
            if default == "the system's resolver" {
                assert_eq!(Config::default().dns_server, None, "--{long}");
                continue;
            }
            let flag = format!("--{long}");
            let mut argv = Vec::new();
            for value in default.trim_matches('"').split(" and ") {
                argv.extend([flag.as_str(), value]);
            }
            assert_eq!(load(&argv).unwrap(), Config::default(), "{flag}");
            checked.push(long);
        }
        // Every flag with a value but `--admin`, `--hostname`, `--node-id`, `--dns-server`,
        // `--cluster-redis`, the three whitelist lists, `--trusted-certs` and the greytrap list,
        // which have no default to state.
        assert_eq!(checked.len(), 32, "{checked:?}");
    }

    #[test]
    fn shipped_example_is_the_defaults_and_sets_every_key() {
        let example = include_str!("../config/greyhound.toml");
        assert_eq!(
            Config::from_toml("greyhound.toml", example).unwrap(),
            Config::default()
        );
        // Destructured in full so that a new key fails here until the example documents it.
        let Overrides {
            native,
            policy,
            metrics,
            admin,
            allow,
            data_dir,
            snapshot_interval,
            delay,
            retry_window,
            whitelist_ttl,
            awl_clients,
            awl_interval,
            awl_ttl,
            ipv4_prefix,
            ipv6_prefix,
            dry_run,
            // Flags only: not keys of the file.
            no_dry_run: _,
            greylist_text,
            defer_action,
            no_x_greylist_header: _,
            x_greylist_header,
            hostname,
            whitelist_clients,
            whitelist_senders,
            whitelist_recipients,
            trusted_certs,
            greytrap_recipients,
            greytrap_ttl,
            domain_policy,
            client_identity,
            dns_server,
            spf_timeout,
            log_level,
            workers,
            cluster_redis,
            node_id,
            cluster_name,
            cluster_retention,
            limits,
        } = Overrides::from_toml("greyhound.toml", example).unwrap();
        let LimitOverrides {
            max_line,
            max_connections,
            idle_timeout,
            requests_per_read,
            udp_max_datagram,
            policy_max_block,
            policy_max_attributes,
            max_triplets,
            max_new_per_client,
        } = limits;
        let present = [
            ("native", native.is_some()),
            ("policy", policy.is_some()),
            ("metrics", metrics.is_some()),
            ("admin", admin.is_some()),
            ("data-dir", data_dir.is_some()),
            ("snapshot-interval", snapshot_interval.is_some()),
            ("delay", delay.is_some()),
            ("retry-window", retry_window.is_some()),
            ("whitelist-ttl", whitelist_ttl.is_some()),
            ("awl-clients", awl_clients.is_some()),
            ("awl-interval", awl_interval.is_some()),
            ("awl-ttl", awl_ttl.is_some()),
            ("ipv4-prefix", ipv4_prefix.is_some()),
            ("ipv6-prefix", ipv6_prefix.is_some()),
            ("allow", allow.is_some()),
            ("dry-run", dry_run.is_some()),
            ("greylist-text", greylist_text.is_some()),
            ("defer-action", defer_action.is_some()),
            ("x-greylist-header", x_greylist_header.is_some()),
            ("hostname", hostname.is_some()),
            ("whitelist-clients", whitelist_clients.is_some()),
            ("whitelist-senders", whitelist_senders.is_some()),
            ("whitelist-recipients", whitelist_recipients.is_some()),
            ("trusted-certs", trusted_certs.is_some()),
            ("client-identity", client_identity.is_some()),
            ("dns-server", dns_server.is_some()),
            ("spf-timeout", spf_timeout.is_some()),
            ("greytrap-recipients", greytrap_recipients.is_some()),
            ("greytrap-ttl", greytrap_ttl.is_some()),
            ("domain-policy", domain_policy.is_some()),
            ("log-level", log_level.is_some()),
            ("workers", workers.is_some()),
            ("cluster-redis", cluster_redis.is_some()),
            ("node-id", node_id.is_some()),
            ("cluster-name", cluster_name.is_some()),
            ("cluster-retention", cluster_retention.is_some()),
            ("limits.max-line", max_line.is_some()),
            ("limits.max-connections", max_connections.is_some()),
            ("limits.idle-timeout", idle_timeout.is_some()),
            ("limits.requests-per-read", requests_per_read.is_some()),
            ("limits.udp-max-datagram", udp_max_datagram.is_some()),
            ("limits.policy-max-block", policy_max_block.is_some()),
            (
                "limits.policy-max-attributes",
                policy_max_attributes.is_some(),
            ),
            ("limits.max-triplets", max_triplets.is_some()),
            ("limits.max-new-per-client", max_new_per_client.is_some()),
        ];
        let missing: Vec<&str> = present
            .iter()
            .filter(|(_, is_set)| !is_set)
            .map(|(key, _)| *key)
            .collect();
        assert_eq!(missing, Vec::<&str>::new(), "keys missing from the example");
    }
}
