//! Static greylisting exemptions: clients (by address, network or hostname),
//! envelope senders and envelope recipients that are never greylisted.
//!
//! The lists are loaded from text files at start-up and again on SIGHUP. A
//! reload must never half-apply, so loading goes through
//! [`ExemptionsBuilder`], which produces a brand-new [`Exemptions`]; on any
//! error the caller simply keeps the value it already has. Each `add_*` call
//! is itself all-or-nothing, so even a builder that saw an error holds only
//! whole sources.
//!
//! [`Exemptions::check`] runs for every policy request, so everything that
//! can be decided at load time is: networks become sorted, merged ranges
//! searched by bisection; hostnames and addresses become hash-set probes whose
//! cost depends on the number of labels in the name, not on the list size;
//! all regexes share one [`RegexSet`]. Nothing in `check` allocates.

use std::fmt;
use std::net::IpAddr;
use std::path::Path;

use ahash::AHashSet;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use regex::{RegexBuilder, RegexSet, RegexSetBuilder};

use super::domains::{DomainPolicies, DomainRule};
use super::policy::Policy;
use super::trust::TrustedCerts;

// DEFAULT_CLIENTS_PATH_NOTE: in the main project this file lives at
// src/engine/exempt.rs and the list at config/whitelist_clients, so the path
// below becomes "../../config/whitelist_clients". It is the only place the
// path appears; the tests reach the list through this constant.
/// The default client list (the shipped `config/whitelist_clients`), embedded
/// so that a server whose administrator configured no client list still
/// exempts the large providers that retry from changing addresses.
pub const DEFAULT_CLIENTS: &str = include_str!("../../config/whitelist_clients");

/// Which exemption list matched; Display gives the name used on the wire as `exempt:<name>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExemptList {
    /// The client's IP address is inside a listed address or network.
    Client,
    /// The client's hostname matched a listed hostname, suffix or regex.
    ClientName,
    /// The envelope sender matched the sender list.
    Sender,
    /// The envelope recipient matched the recipient (opt-out) list.
    Recipient,
}

impl ExemptList {
    /// The list's name as it appears on the wire (`exempt:<name>`) and in logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::ClientName => "client-name",
            Self::Sender => "sender",
            Self::Recipient => "recipient",
        }
    }
}

impl fmt::Display for ExemptList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why loading an exemption list failed.
#[derive(Debug, thiserror::Error)]
pub enum ExemptError {
    /// The list file could not be read (missing, unreadable, not UTF-8).
    #[error("cannot read {path}: {source}")]
    Io {
        /// The path as given to [`ExemptionsBuilder::load_file`].
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A line of a list is not a valid entry.
    #[error("{source_name}:{line}: {message}")]
    Parse {
        /// Where the text came from (the file path for files).
        source_name: String,
        /// 1-based line number of the offending line.
        line: usize,
        /// What is wrong, quoting the offending text.
        message: String,
    },
}

/// Number of entries loaded into each list, for the start-up log.
///
/// Entries are counted as written (a duplicate line counts twice), because
/// that is what an administrator comparing the log with the files expects.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExemptCounts {
    /// Address and CIDR entries of the client list.
    pub client_networks: usize,
    /// Hostname, `.suffix` and `/regex/` entries of the client list.
    pub client_names: usize,
    /// Entries of the sender list.
    pub senders: usize,
    /// Entries of the recipient list.
    pub recipients: usize,
    /// Entries of the greytrap list (`greytrap-recipients`).
    pub greytraps: usize,
    /// Entries of the per-domain policy (`domain-policy`).
    pub domains: usize,
}

/// Immutable, cheap to query. Default = empty.
#[derive(Debug, Default)]
pub struct Exemptions {
    clients: NetworkSet,
    client_names: NameSet,
    senders: AddressSet,
    recipients: AddressSet,
    /// Trap addresses: a client that writes to one is trapped (not an exemption, but loaded,
    /// parsed and reloaded with the lists, from files of the same syntax).
    greytraps: AddressSet,
    counts: ExemptCounts,
    /// Not an exemption list but loaded and reloaded with them (`trusted-certs`).
    trusted: TrustedCerts,
    /// Per-recipient-domain policy (`domain-policy`), loaded and reloaded with the lists.
    domains: DomainPolicies,
}

impl Exemptions {
    /// Whether any `domain-policy` entry is loaded (one branch per request when none is).
    pub fn has_domain_policy(&self) -> bool {
        !self.domains.is_empty()
    }

    /// The `domain-policy` rule for a recipient domain (ASCII lower-case), if any.
    pub fn domain_rule(&self, domain: &str) -> Option<DomainRule> {
        self.domains.lookup(domain)
    }

    /// Whether `recipient` (ASCII lower-case) is a greytrap address.
    pub fn is_greytrap(&self, recipient: &str) -> bool {
        self.greytraps.matches(recipient)
    }

    /// Whether any greytrap address is listed.
    pub fn has_greytraps(&self) -> bool {
        !self.greytraps.is_empty()
    }

    /// Starts an empty builder; see [`ExemptionsBuilder`].
    pub fn builder() -> ExemptionsBuilder {
        ExemptionsBuilder::default()
    }

    /// Returns the first list that exempts this request, or `None`.
    ///
    /// `client_name`, `sender` and `recipient` must already be ASCII lower-case (the engine lower-cases once); `sender` "" is the null sender and matches no sender entry.
    /// Checked in this order: Client (IP/CIDR), ClientName, Sender, Recipient; returns the first list that matches.
    pub fn check(
        &self,
        client: IpAddr,
        client_name: Option<&str>,
        sender: &str,
        recipient: &str,
    ) -> Option<ExemptList> {
        if !self.clients.is_empty() && self.clients.contains(client) {
            return Some(ExemptList::Client);
        }
        if client_name.is_some_and(|name| self.client_names.matches(name)) {
            return Some(ExemptList::ClientName);
        }
        if self.senders.matches(sender) {
            return Some(ExemptList::Sender);
        }
        if self.recipients.matches(recipient) {
            return Some(ExemptList::Recipient);
        }
        None
    }

    /// The trusted TLS client certificates.
    pub fn trusted(&self) -> &TrustedCerts {
        &self.trusted
    }

    /// Number of entries per list, for the start-up log.
    pub fn counts(&self) -> ExemptCounts {
        self.counts
    }

    /// True when no list has any entry, i.e. [`check`](Self::check) always returns `None`.
    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
            && self.client_names.is_empty()
            && self.senders.is_empty()
            && self.recipients.is_empty()
            && self.greytraps.is_empty()
    }
}

/// Collects list text and produces an [`Exemptions`].
///
/// Every `add_*` call either takes all entries of its text or, on the first
/// bad line, none of them and returns the error.
#[derive(Debug, Default)]
pub struct ExemptionsBuilder {
    v4: Vec<(u32, u32)>,
    v6: Vec<(u128, u128)>,
    exact_names: AHashSet<Box<str>>,
    name_suffixes: AHashSet<Box<str>>,
    regex_patterns: Vec<String>,
    // Compiled while adding, not in `build`, so that a pattern set too large
    // to compile is reported as a load error instead of making `build` fail.
    regex_set: Option<RegexSet>,
    senders: AddressSet,
    recipients: AddressSet,
    greytraps: AddressSet,
    counts: ExemptCounts,
    trusted: TrustedCerts,
    domains: DomainPolicies,
}

impl ExemptionsBuilder {
    /// Per-domain policy text (see [`super::domains`]); all entries or none. `global` is the
    /// configured policy, which a domain's windows may not exceed.
    pub fn add_domain_policy(
        &mut self,
        source_name: &str,
        text: &str,
        global: &Policy,
    ) -> Result<&mut Self, ExemptError> {
        self.counts.domains += self.domains.add_text(source_name, text, global)?;
        Ok(self)
    }

    /// Reads a per-domain policy file; io errors → ExemptError::Io.
    pub fn load_domain_policy(
        &mut self,
        path: &Path,
        global: &Policy,
    ) -> Result<&mut Self, ExemptError> {
        let source_name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ExemptError::Io {
            path: source_name.clone(),
            source,
        })?;
        self.add_domain_policy(&source_name, &text, global)
    }

    /// Client list text (postgrey-style whitelist_clients): one entry per line; `#` starts a comment (whole line or trailing after whitespace); blank lines ignored. Entry forms:
    ///  - IPv4 or IPv6 address, or CIDR (`192.0.2.0/24`, `2001:db8::/32`); a CIDR with host bits set (192.0.2.1/24) is accepted and masked; IPv4-mapped IPv6 entries count as IPv4.
    ///  - `/regex/` matched against the client hostname (case-insensitive, unanchored unless the regex anchors itself).
    ///  - `.example.com` matches any hostname ending in `.example.com` (subdomains, not example.com itself).
    ///  - any other valid hostname (letters, digits, '-', '.', no leading/trailing '.', labels ≤ 63, total ≤ 253): matches that exact hostname.
    ///
    /// A bad line (invalid CIDR like 300.1.1.0/24 or 10.0.0.0/33, invalid regex, unclosed `/regex`, a hostname with bad characters, ...) → ExemptError::Parse with the source name, 1-based line number and a message naming the bad text.
    ///
    /// A `#` inside a regex is only safe when no whitespace precedes it
    /// (`/a#b/`), since `<space>#` always starts a comment. An IPv6 network
    /// that is not inside `::ffff:0:0/96` (such as `::/0`) does not match
    /// IPv4 clients.
    pub fn add_clients(&mut self, source_name: &str, text: &str) -> Result<&mut Self, ExemptError> {
        let mut entries = Vec::new();
        for (line, entry) in entries_of(text) {
            let parsed = parse_client_entry(entry).map_err(|message| ExemptError::Parse {
                source_name: source_name.to_owned(),
                line,
                message,
            })?;
            entries.push((line, parsed));
        }

        let first_regex_line = entries.iter().find_map(|(line, entry)| match entry {
            ClientEntry::Regex(_) => Some(*line),
            _ => None,
        });
        // Individually valid patterns can still exceed the size limit
        // together; blame this source, at its first regex.
        if let Some(line) = first_regex_line {
            let mut patterns = self.regex_patterns.clone();
            patterns.extend(entries.iter().filter_map(|(_, entry)| match entry {
                ClientEntry::Regex(pattern) => Some(pattern.clone()),
                _ => None,
            }));
            let set = compile_regex_set(&patterns).map_err(|err| ExemptError::Parse {
                source_name: source_name.to_owned(),
                line,
                message: format!(
                    "the client regexes cannot be combined: {}",
                    regex_error_reason(&err)
                ),
            })?;
            self.regex_patterns = patterns;
            self.regex_set = Some(set);
        }

        for (_, entry) in entries {
            match entry {
                ClientEntry::Net(net) => {
                    self.counts.client_networks += 1;
                    push_network(&mut self.v4, &mut self.v6, net);
                }
                ClientEntry::Exact(name) => {
                    self.counts.client_names += 1;
                    self.exact_names.insert(name);
                }
                ClientEntry::Suffix(suffix) => {
                    self.counts.client_names += 1;
                    self.name_suffixes.insert(suffix);
                }
                // Already added to `regex_patterns` and the compiled set above.
                ClientEntry::Regex(_) => self.counts.client_names += 1,
            }
        }
        Ok(self)
    }

    /// Sender list: `user@domain` (exact address), `@domain` (any sender at that domain exactly), `@.domain` (any sender at a subdomain of domain). Case-insensitive. Bad line (no '@', empty parts, spaces inside) → Parse error.
    pub fn add_senders(&mut self, source_name: &str, text: &str) -> Result<&mut Self, ExemptError> {
        let added = self.senders.add_text(source_name, text)?;
        self.counts.senders += added;
        Ok(self)
    }

    /// Recipient list (opt-out of greylisting): same forms as senders.
    pub fn add_recipients(
        &mut self,
        source_name: &str,
        text: &str,
    ) -> Result<&mut Self, ExemptError> {
        let added = self.recipients.add_text(source_name, text)?;
        self.counts.recipients += added;
        Ok(self)
    }

    /// Greytrap addresses (`greytrap-recipients`): same forms as recipients; a client that
    /// writes to one is trapped (see `Engine::with_greytrap_ttl`).
    pub fn add_greytraps(
        &mut self,
        source_name: &str,
        text: &str,
    ) -> Result<&mut Self, ExemptError> {
        let added = self.greytraps.add_text(source_name, text)?;
        self.counts.greytraps += added;
        Ok(self)
    }

    /// Reads a greytrap file ([`ExemptionsBuilder::add_greytraps`]); io errors → ExemptError::Io.
    pub fn load_greytraps(&mut self, path: &Path) -> Result<&mut Self, ExemptError> {
        let source_name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ExemptError::Io {
            path: source_name.clone(),
            source,
        })?;
        self.add_greytraps(&source_name, &text)
    }

    /// Read a file and call the matching add_* with the file path as source name; io errors → ExemptError::Io.
    ///
    /// `ExemptList::Client` and `ExemptList::ClientName` both mean the client
    /// file, which holds addresses and hostnames alike.
    pub fn load_file(&mut self, list: ExemptList, path: &Path) -> Result<&mut Self, ExemptError> {
        let source_name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ExemptError::Io {
            path: source_name.clone(),
            source,
        })?;
        match list {
            ExemptList::Client | ExemptList::ClientName => self.add_clients(&source_name, &text),
            ExemptList::Sender => self.add_senders(&source_name, &text),
            ExemptList::Recipient => self.add_recipients(&source_name, &text),
        }
    }

    /// Trusted TLS client list text (see [`super::trust`]); all entries or none.
    pub fn add_trusted_certs(
        &mut self,
        source_name: &str,
        text: &str,
    ) -> Result<&mut Self, ExemptError> {
        self.trusted.add(source_name, text)?;
        Ok(self)
    }

    /// Reads a trusted TLS client file; io errors → ExemptError::Io.
    pub fn load_trusted_certs(&mut self, path: &Path) -> Result<&mut Self, ExemptError> {
        let source_name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ExemptError::Io {
            path: source_name.clone(),
            source,
        })?;
        self.add_trusted_certs(&source_name, &text)
    }

    /// Freezes the collected entries into a queryable [`Exemptions`].
    pub fn build(self) -> Exemptions {
        let mut exact = self.exact_names;
        let mut suffixes = self.name_suffixes;
        exact.shrink_to_fit();
        suffixes.shrink_to_fit();
        Exemptions {
            clients: NetworkSet {
                v4: merge_ranges(self.v4, |x| x.checked_add(1)),
                v6: merge_ranges(self.v6, |x| x.checked_add(1)),
            },
            client_names: NameSet {
                exact,
                suffixes,
                regexes: self.regex_set,
            },
            senders: self.senders.frozen(),
            recipients: self.recipients.frozen(),
            greytraps: self.greytraps.frozen(),
            counts: self.counts,
            trusted: self.trusted,
            domains: self.domains.frozen(),
        }
    }
}

// ---------------------------------------------------------------------------
// Networks

/// Inclusive, sorted, non-overlapping, non-adjacent ranges, so that a lookup
/// is one bisection however many networks are listed.
#[derive(Debug, Default)]
struct NetworkSet {
    v4: Vec<(u32, u32)>,
    v6: Vec<(u128, u128)>,
}

impl NetworkSet {
    fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    fn contains(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(v4) => in_ranges(&self.v4, u32::from(v4)),
            // Dual-stack sockets report IPv4 peers in mapped form; they must
            // hit the same entries as the plain IPv4 address.
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => in_ranges(&self.v4, u32::from(v4)),
                None => in_ranges(&self.v6, u128::from(v6)),
            },
        }
    }
}

fn in_ranges<T: Copy + Ord>(ranges: &[(T, T)], x: T) -> bool {
    // Ranges are disjoint and sorted, so only the last one starting at or
    // before `x` can contain it.
    let i = ranges.partition_point(|&(start, _)| start <= x);
    i > 0 && ranges[i - 1].1 >= x
}

/// Sorts and coalesces overlapping and adjacent ranges. `next` is `x + 1`,
/// or `None` at the type's maximum (where everything after overlaps anyway).
fn merge_ranges<T: Copy + Ord>(mut ranges: Vec<(T, T)>, next: fn(T) -> Option<T>) -> Vec<(T, T)> {
    ranges.sort_unstable();
    let mut merged: Vec<(T, T)> = Vec::with_capacity(ranges.len());
    for (start, end) in ranges {
        if let Some(last) = merged.last_mut() {
            let touches = next(last.1).is_none_or(|after_last| start <= after_last);
            if touches {
                last.1 = last.1.max(end);
                continue;
            }
        }
        merged.push((start, end));
    }
    merged.shrink_to_fit();
    merged
}

fn push_network(v4: &mut Vec<(u32, u32)>, v6: &mut Vec<(u128, u128)>, net: IpNet) {
    match net.trunc() {
        IpNet::V4(net) => v4.push((u32::from(net.network()), u32::from(net.broadcast()))),
        IpNet::V6(net) => {
            // Only a network entirely inside ::ffff:0:0/96 is an IPv4 network
            // written in mapped form; a wider one (::/0) is meant as IPv6.
            if let Some(mapped) = net.network().to_ipv4_mapped() {
                if let Some(Ok(net)) = net
                    .prefix_len()
                    .checked_sub(96)
                    .map(|len| Ipv4Net::new(mapped, len))
                {
                    v4.push((u32::from(net.network()), u32::from(net.broadcast())));
                    return;
                }
            }
            v6.push((u128::from(net.network()), u128::from(net.broadcast())));
        }
    }
}

// ---------------------------------------------------------------------------
// Hostnames

#[derive(Debug, Default)]
struct NameSet {
    exact: AHashSet<Box<str>>,
    /// Stored with their leading dot (".example.com").
    suffixes: AHashSet<Box<str>>,
    regexes: Option<RegexSet>,
}

impl NameSet {
    fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.suffixes.is_empty() && self.regexes.is_none()
    }

    fn matches(&self, name: &str) -> bool {
        if name.is_empty() {
            return false;
        }
        if !self.exact.is_empty() && self.exact.contains(name) {
            return true;
        }
        if !self.suffixes.is_empty() && has_listed_suffix(&self.suffixes, name) {
            return true;
        }
        // Last because it is by far the most expensive test.
        self.regexes.as_ref().is_some_and(|set| set.is_match(name))
    }
}

/// Whether any `.suffix` of `name` (starting at one of its dots) is listed;
/// the cost grows with the labels of `name`, not with the size of the list.
fn has_listed_suffix(suffixes: &AHashSet<Box<str>>, name: &str) -> bool {
    name.match_indices('.')
        .any(|(i, _)| suffixes.contains(&name[i..]))
}

// ---------------------------------------------------------------------------
// Sender and recipient addresses

#[derive(Debug, Default)]
struct AddressSet {
    /// Whole addresses ("user@example.com").
    addresses: AHashSet<Box<str>>,
    /// Domains matched exactly ("example.com").
    domains: AHashSet<Box<str>>,
    /// Parent domains with their leading dot (".example.com").
    subdomains: AHashSet<Box<str>>,
}

impl AddressSet {
    fn is_empty(&self) -> bool {
        self.addresses.is_empty() && self.domains.is_empty() && self.subdomains.is_empty()
    }

    fn matches(&self, address: &str) -> bool {
        // The null sender ("") is bounces and auto-replies; no entry names it.
        if address.is_empty() || self.is_empty() {
            return false;
        }
        if !self.addresses.is_empty() && self.addresses.contains(address) {
            return true;
        }
        // The last '@', because a quoted local part may itself contain '@'.
        let Some(at) = address.rfind('@') else {
            return false;
        };
        let domain = &address[at + 1..];
        if !self.domains.is_empty() && self.domains.contains(domain) {
            return true;
        }
        !self.subdomains.is_empty() && has_listed_suffix(&self.subdomains, domain)
    }

    /// Parses all of `text` first and only then inserts, so that an error
    /// leaves the set untouched. Returns the number of entries added.
    fn add_text(&mut self, source_name: &str, text: &str) -> Result<usize, ExemptError> {
        let mut entries = Vec::new();
        for (line, entry) in entries_of(text) {
            let parsed = parse_address_entry(entry).map_err(|message| ExemptError::Parse {
                source_name: source_name.to_owned(),
                line,
                message,
            })?;
            entries.push(parsed);
        }
        let added = entries.len();
        for entry in entries {
            match entry {
                AddressEntry::Address(address) => self.addresses.insert(address),
                AddressEntry::Domain(domain) => self.domains.insert(domain),
                AddressEntry::Subdomains(suffix) => self.subdomains.insert(suffix),
            };
        }
        Ok(added)
    }

    fn frozen(mut self) -> Self {
        self.addresses.shrink_to_fit();
        self.domains.shrink_to_fit();
        self.subdomains.shrink_to_fit();
        self
    }
}

// ---------------------------------------------------------------------------
// Parsing

enum ClientEntry {
    Net(IpNet),
    Exact(Box<str>),
    /// Lower-cased, with its leading dot.
    Suffix(Box<str>),
    /// The pattern between the slashes.
    Regex(String),
}

enum AddressEntry {
    Address(Box<str>),
    Domain(Box<str>),
    /// Lower-cased, with its leading dot.
    Subdomains(Box<str>),
}

/// The non-empty entries of a list with their 1-based line numbers, comments
/// and surrounding whitespace removed.
pub(crate) fn entries_of(text: &str) -> impl Iterator<Item = (usize, &str)> {
    // Editors on some systems prepend a byte-order mark that would otherwise
    // make the first entry invalid.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    text.lines().enumerate().filter_map(|(index, line)| {
        let entry = strip_comment(line).trim();
        (!entry.is_empty()).then_some((index + 1, entry))
    })
}

/// Cuts a `#` comment that starts the line or follows whitespace; a `#` glued
/// to other text is kept, as regexes may need one.
fn strip_comment(line: &str) -> &str {
    let bytes = line.as_bytes();
    let cut = bytes
        .iter()
        .enumerate()
        .find(|&(i, &b)| b == b'#' && (i == 0 || bytes[i - 1].is_ascii_whitespace()))
        .map(|(i, _)| i);
    match cut {
        Some(i) => &line[..i],
        None => line,
    }
}

fn parse_client_entry(entry: &str) -> Result<ClientEntry, String> {
    if let Some(rest) = entry.strip_prefix('/') {
        let Some(pattern) = rest.strip_suffix('/') else {
            return Err(format!("unclosed regex \"{entry}\" (expected /pattern/)"));
        };
        if pattern.is_empty() {
            // An empty regex matches every hostname; surely not intended.
            return Err(format!("empty regex \"{entry}\""));
        }
        return match RegexBuilder::new(pattern).case_insensitive(true).build() {
            Ok(_) => Ok(ClientEntry::Regex(pattern.to_owned())),
            Err(err) => Err(format!(
                "invalid regex \"{entry}\": {}",
                regex_error_reason(&err)
            )),
        };
    }
    if entry.contains(char::is_whitespace) {
        return Err(format!("unexpected whitespace in \"{entry}\""));
    }
    if let Some((address, prefix)) = entry.split_once('/') {
        return parse_network(address, prefix)
            .map(ClientEntry::Net)
            .map_err(|reason| format!("invalid network \"{entry}\": {reason}"));
    }
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Ok(ClientEntry::Net(IpNet::from(ip)));
    }
    // Digits-and-dots or anything with ':' was meant as an address; saying so
    // is more helpful than complaining about a hostname.
    if entry.contains(':')
        || (entry.bytes().any(|b| b.is_ascii_digit())
            && entry.bytes().all(|b| b.is_ascii_digit() || b == b'.'))
    {
        return Err(format!("invalid IP address \"{entry}\""));
    }
    if let Some(domain) = entry.strip_prefix('.') {
        check_hostname(domain)
            .map_err(|reason| format!("invalid hostname suffix \"{entry}\": {reason}"))?;
        return Ok(ClientEntry::Suffix(entry.to_ascii_lowercase().into()));
    }
    check_hostname(entry).map_err(|reason| format!("invalid hostname \"{entry}\": {reason}"))?;
    Ok(ClientEntry::Exact(entry.to_ascii_lowercase().into()))
}

fn parse_network(address: &str, prefix: &str) -> Result<IpNet, String> {
    let ip: IpAddr = address
        .parse()
        .map_err(|_| format!("\"{address}\" is not an IP address"))?;
    let max = match ip {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    };
    // u8::from_str would also take "+8"; only plain digits are a prefix.
    let len: u8 =
        if !prefix.is_empty() && prefix.len() <= 3 && prefix.bytes().all(|b| b.is_ascii_digit()) {
            prefix
                .parse()
                .map_err(|_| format!("bad prefix length \"{prefix}\""))?
        } else {
            return Err(format!("bad prefix length \"{prefix}\""));
        };
    if len > max {
        return Err(format!("prefix length {len} is larger than {max}"));
    }
    let net = match ip {
        IpAddr::V4(v4) => Ipv4Net::new(v4, len).map(IpNet::V4),
        IpAddr::V6(v6) => Ipv6Net::new(v6, len).map(IpNet::V6),
    };
    net.map_err(|_| format!("prefix length {len} is larger than {max}"))
}

/// Hostname syntax as the client list accepts it; the error is the reason.
fn check_hostname(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty name".to_owned());
    }
    if name.len() > 253 {
        return Err(format!("{} characters, more than 253", name.len()));
    }
    if let Some(bad) = name
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || c == '-' || c == '.'))
    {
        return Err(format!("character '{bad}' is not allowed"));
    }
    if name.starts_with('.') || name.ends_with('.') {
        return Err("leading or trailing '.'".to_owned());
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err("empty label".to_owned());
        }
        if label.len() > 63 {
            return Err(format!("label \"{label}\" is longer than 63 characters"));
        }
    }
    // No top-level domain is numeric; such a name is a mistyped address.
    if name
        .rsplit('.')
        .next()
        .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err("the last label is numeric".to_owned());
    }
    Ok(())
}

fn parse_address_entry(entry: &str) -> Result<AddressEntry, String> {
    if entry.contains(char::is_whitespace) {
        return Err(format!("unexpected whitespace in \"{entry}\""));
    }
    let Some(at) = entry.rfind('@') else {
        return Err(format!(
            "missing '@' in \"{entry}\" (expected user@domain, @domain or @.domain)"
        ));
    };
    let (local, domain) = (&entry[..at], &entry[at + 1..]);
    if domain.is_empty() {
        return Err(format!("missing domain after '@' in \"{entry}\""));
    }
    if local.is_empty() {
        if let Some(parent) = domain.strip_prefix('.') {
            check_mail_domain(parent)
                .map_err(|reason| format!("invalid domain in \"{entry}\": {reason}"))?;
            return Ok(AddressEntry::Subdomains(domain.to_ascii_lowercase().into()));
        }
        check_mail_domain(domain)
            .map_err(|reason| format!("invalid domain in \"{entry}\": {reason}"))?;
        return Ok(AddressEntry::Domain(domain.to_ascii_lowercase().into()));
    }
    // A second '@' is only legitimate inside a quoted local part.
    if local.contains('@') && !local.starts_with('"') {
        return Err(format!("more than one '@' in \"{entry}\""));
    }
    check_mail_domain(domain)
        .map_err(|reason| format!("invalid domain in \"{entry}\": {reason}"))?;
    Ok(AddressEntry::Address(entry.to_ascii_lowercase().into()))
}

/// Looser than [`check_hostname`]: envelope domains may be address literals
/// or internationalised, so only structure is checked.
fn check_mail_domain(domain: &str) -> Result<(), String> {
    if domain.is_empty() {
        return Err("empty domain".to_owned());
    }
    if let Some(bad) = domain.chars().find(|c| c.is_control()) {
        return Err(format!("control character {bad:?}"));
    }
    if domain.split('.').any(str::is_empty) {
        return Err("empty label (leading, trailing or doubled '.')".to_owned());
    }
    Ok(())
}

fn compile_regex_set(patterns: &[String]) -> Result<RegexSet, regex::Error> {
    RegexSetBuilder::new(patterns)
        .case_insensitive(true)
        .build()
}

/// The regex crate's syntax errors span several lines (pattern, caret,
/// message); a log line wants just the message.
fn regex_error_reason(err: &regex::Error) -> String {
    match err {
        regex::Error::Syntax(text) => text
            .lines()
            .rev()
            .map(str::trim)
            .find(|line| !line.is_empty())
            .map(|line| line.strip_prefix("error: ").unwrap_or(line).to_owned())
            .unwrap_or_else(|| text.clone()),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::path::PathBuf;

    /// A client address that no test list covers, for the non-client checks.
    const OTHER_IP: &str = "203.0.113.77";

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn clients(text: &str) -> Exemptions {
        let mut builder = Exemptions::builder();
        builder.add_clients("clients", text).unwrap();
        builder.build()
    }

    fn senders(text: &str) -> Exemptions {
        let mut builder = Exemptions::builder();
        builder.add_senders("senders", text).unwrap();
        builder.build()
    }

    fn recipients(text: &str) -> Exemptions {
        let mut builder = Exemptions::builder();
        builder.add_recipients("recipients", text).unwrap();
        builder.build()
    }

    fn by_ip(ex: &Exemptions, addr: &str) -> Option<ExemptList> {
        ex.check(ip(addr), None, "", "")
    }

    fn by_name(ex: &Exemptions, name: &str) -> Option<ExemptList> {
        ex.check(ip(OTHER_IP), Some(name), "", "")
    }

    fn by_sender(ex: &Exemptions, sender: &str) -> Option<ExemptList> {
        ex.check(ip(OTHER_IP), None, sender, "someone@example.net")
    }

    fn by_recipient(ex: &Exemptions, recipient: &str) -> Option<ExemptList> {
        ex.check(ip(OTHER_IP), None, "someone@example.net", recipient)
    }

    fn v4(text: &str) -> u32 {
        u32::from(text.parse::<Ipv4Addr>().unwrap())
    }

    fn v6(text: &str) -> u128 {
        u128::from(text.parse::<Ipv6Addr>().unwrap())
    }

    fn client_error(text: &str) -> String {
        Exemptions::builder()
            .add_clients("clients.txt", text)
            .map(|_| ())
            .unwrap_err()
            .to_string()
    }

    fn sender_error(text: &str) -> String {
        Exemptions::builder()
            .add_senders("senders.txt", text)
            .map(|_| ())
            .unwrap_err()
            .to_string()
    }

    fn recipient_error(text: &str) -> String {
        Exemptions::builder()
            .add_recipients("recipients.txt", text)
            .map(|_| ())
            .unwrap_err()
            .to_string()
    }

    const CLIENT: Option<ExemptList> = Some(ExemptList::Client);
    const NAME: Option<ExemptList> = Some(ExemptList::ClientName);
    const SENDER: Option<ExemptList> = Some(ExemptList::Sender);
    const RECIPIENT: Option<ExemptList> = Some(ExemptList::Recipient);

    #[test]
    fn list_names_on_the_wire() {
        assert_eq!(ExemptList::Client.as_str(), "client");
        assert_eq!(ExemptList::ClientName.as_str(), "client-name");
        assert_eq!(ExemptList::Sender.as_str(), "sender");
        assert_eq!(ExemptList::Recipient.as_str(), "recipient");
        assert_eq!(
            format!("exempt:{}", ExemptList::ClientName),
            "exempt:client-name"
        );
    }

    #[test]
    fn empty_exemptions_match_nothing() {
        let ex = Exemptions::default();
        assert!(ex.is_empty());
        assert_eq!(ex.counts(), ExemptCounts::default());
        assert_eq!(
            ex.check(
                ip("192.0.2.1"),
                Some("mail.example.com"),
                "a@example.com",
                "b@example.com"
            ),
            None
        );
        let built = Exemptions::builder().build();
        assert!(built.is_empty());
        assert_eq!(by_ip(&built, "::1"), None);
    }

    #[test]
    fn ipv4_cidr_boundaries() {
        let ex = clients("192.0.2.0/24\n");
        assert_eq!(by_ip(&ex, "192.0.1.255"), None);
        assert_eq!(by_ip(&ex, "192.0.2.0"), CLIENT);
        assert_eq!(by_ip(&ex, "192.0.2.255"), CLIENT);
        assert_eq!(by_ip(&ex, "192.0.3.0"), None);
    }

    #[test]
    fn ipv6_cidr_boundaries() {
        let ex = clients("2001:db8:1::/48\n");
        assert_eq!(by_ip(&ex, "2001:db8:0:ffff:ffff:ffff:ffff:ffff"), None);
        assert_eq!(by_ip(&ex, "2001:db8:1::"), CLIENT);
        assert_eq!(by_ip(&ex, "2001:db8:1:ffff:ffff:ffff:ffff:ffff"), CLIENT);
        assert_eq!(by_ip(&ex, "2001:db8:2::"), None);
    }

    #[test]
    fn single_addresses_and_host_routes() {
        let ex = clients("198.51.100.7\n198.51.100.9/32\n2001:db8::7\n2001:db8::9/128\n");
        assert_eq!(by_ip(&ex, "198.51.100.6"), None);
        assert_eq!(by_ip(&ex, "198.51.100.7"), CLIENT);
        assert_eq!(by_ip(&ex, "198.51.100.8"), None);
        assert_eq!(by_ip(&ex, "198.51.100.9"), CLIENT);
        assert_eq!(by_ip(&ex, "198.51.100.10"), None);
        assert_eq!(by_ip(&ex, "2001:db8::6"), None);
        assert_eq!(by_ip(&ex, "2001:db8::7"), CLIENT);
        assert_eq!(by_ip(&ex, "2001:db8::8"), None);
        assert_eq!(by_ip(&ex, "2001:db8::9"), CLIENT);
        assert_eq!(by_ip(&ex, "2001:db8::a"), None);
        assert_eq!(ex.counts().client_networks, 4);
    }

    #[test]
    fn host_bits_are_masked() {
        let ex = clients("192.0.2.77/24\n2001:db8::1234/64\n");
        assert_eq!(ex.clients.v4, vec![(v4("192.0.2.0"), v4("192.0.2.255"))]);
        assert_eq!(
            ex.clients.v6,
            vec![(v6("2001:db8::"), v6("2001:db8::ffff:ffff:ffff:ffff"))]
        );
        assert_eq!(by_ip(&ex, "192.0.2.1"), CLIENT);
    }

    #[test]
    fn nested_networks_merge_into_the_outer_one() {
        let ex = clients("10.1.2.0/24\n10.0.0.0/8\n10.1.0.0/16\n10.200.0.1\n");
        assert_eq!(ex.clients.v4, vec![(v4("10.0.0.0"), v4("10.255.255.255"))]);
        assert_eq!(by_ip(&ex, "9.255.255.255"), None);
        assert_eq!(by_ip(&ex, "10.0.0.0"), CLIENT);
        assert_eq!(by_ip(&ex, "10.255.255.255"), CLIENT);
        assert_eq!(by_ip(&ex, "11.0.0.0"), None);
        assert_eq!(ex.counts().client_networks, 4);
    }

    #[test]
    fn adjacent_networks_merge_and_gaps_stay() {
        let ex = clients("192.0.2.128/25\n192.0.2.0/25\n192.0.3.0/24\n192.0.4.1\n");
        assert_eq!(
            ex.clients.v4,
            vec![
                (v4("192.0.2.0"), v4("192.0.3.255")),
                (v4("192.0.4.1"), v4("192.0.4.1")),
            ]
        );
        assert_eq!(by_ip(&ex, "192.0.2.127"), CLIENT);
        assert_eq!(by_ip(&ex, "192.0.2.128"), CLIENT);
        assert_eq!(by_ip(&ex, "192.0.4.0"), None);
        assert_eq!(by_ip(&ex, "192.0.4.1"), CLIENT);
        assert_eq!(by_ip(&ex, "192.0.4.2"), None);

        let ex = clients("2001:db8::/33\n2001:db8:8000::/33\n2001:db9::1\n");
        assert_eq!(
            ex.clients.v6,
            vec![
                (
                    v6("2001:db8::"),
                    v6("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff")
                ),
                (v6("2001:db9::1"), v6("2001:db9::1")),
            ]
        );
        assert_eq!(by_ip(&ex, "2001:db9::"), None);
    }

    #[test]
    fn overlapping_networks_merge() {
        // Partial overlap is impossible between CIDRs, but a range that
        // starts inside the previous one and ends beyond it must extend it.
        let ranges = merge_ranges(
            vec![(5u32, 10), (1, 6), (12, 20), (11, 11), (30, 40)],
            |x| x.checked_add(1),
        );
        assert_eq!(ranges, vec![(1, 20), (30, 40)]);
        let at_top = merge_ranges(
            vec![(u32::MAX, u32::MAX), (u32::MAX - 1, u32::MAX - 1)],
            |x| x.checked_add(1),
        );
        assert_eq!(at_top, vec![(u32::MAX - 1, u32::MAX)]);
    }

    #[test]
    fn duplicates_merge_but_count_as_written() {
        let ex = clients("192.0.2.0/24\n192.0.2.0/24\n192.0.2.5\n");
        assert_eq!(ex.clients.v4, vec![(v4("192.0.2.0"), v4("192.0.2.255"))]);
        assert_eq!(ex.counts().client_networks, 3);
    }

    #[test]
    fn whole_address_space() {
        let ex = clients("192.0.2.0/24\n0.0.0.0/0\n10.0.0.0/8\n");
        assert_eq!(ex.clients.v4, vec![(0, u32::MAX)]);
        assert_eq!(by_ip(&ex, "0.0.0.0"), CLIENT);
        assert_eq!(by_ip(&ex, "255.255.255.255"), CLIENT);
        assert_eq!(by_ip(&ex, "2001:db8::1"), None);

        let ex = clients("::/0\n2001:db8::/32\n");
        assert_eq!(ex.clients.v6, vec![(0, u128::MAX)]);
        assert_eq!(by_ip(&ex, "::"), CLIENT);
        assert_eq!(
            by_ip(&ex, "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
            CLIENT
        );
        // ::/0 is an IPv6 entry; IPv4 clients (plain or mapped) are not in it.
        assert_eq!(by_ip(&ex, "192.0.2.1"), None);
        assert_eq!(by_ip(&ex, "::ffff:192.0.2.1"), None);
    }

    #[test]
    fn mapped_client_is_looked_up_as_ipv4() {
        let ex = clients("192.0.2.0/24\n");
        assert_eq!(by_ip(&ex, "::ffff:192.0.2.1"), CLIENT);
        assert_eq!(by_ip(&ex, "::ffff:192.0.3.1"), None);
    }

    #[test]
    fn mapped_entries_count_as_ipv4() {
        let ex = clients("::ffff:198.51.100.0/120\n::ffff:203.0.113.5\n");
        assert_eq!(
            ex.clients.v4,
            vec![
                (v4("198.51.100.0"), v4("198.51.100.255")),
                (v4("203.0.113.5"), v4("203.0.113.5")),
            ]
        );
        assert!(ex.clients.v6.is_empty());
        assert_eq!(by_ip(&ex, "198.51.100.200"), CLIENT);
        assert_eq!(by_ip(&ex, "::ffff:198.51.100.200"), CLIENT);
        assert_eq!(by_ip(&ex, "198.51.101.0"), None);
        assert_eq!(by_ip(&ex, "203.0.113.5"), CLIENT);
        assert_eq!(ex.counts().client_networks, 2);
    }

    #[test]
    fn exact_hostname() {
        let ex = clients("Mail.Example.COM\n");
        assert_eq!(by_name(&ex, "mail.example.com"), NAME);
        assert_eq!(by_name(&ex, "example.com"), None);
        assert_eq!(by_name(&ex, "x.mail.example.com"), None);
        assert_eq!(by_name(&ex, "mail.example.com.au"), None);
        assert_eq!(by_ip(&ex, OTHER_IP), None);
    }

    #[test]
    fn hostname_suffix() {
        let ex = clients(".example.com\n");
        assert_eq!(by_name(&ex, "mail.example.com"), NAME);
        assert_eq!(by_name(&ex, "a.b.example.com"), NAME);
        assert_eq!(by_name(&ex, "example.com"), None);
        assert_eq!(by_name(&ex, "badexample.com"), None);
        assert_eq!(by_name(&ex, "mail.badexample.com"), None);
        assert_eq!(by_name(&ex, "mail.example.com.evil.test"), None);
        assert_eq!(by_name(&ex, ""), None);
    }

    #[test]
    fn hostname_regex() {
        let ex = clients("/^mx[0-9]+\\.example\\.org$/\n/outbound/\n");
        assert_eq!(by_name(&ex, "mx12.example.org"), NAME);
        // The set is case-insensitive even though the engine lower-cases.
        assert_eq!(by_name(&ex, "MX3.Example.ORG"), NAME);
        assert_eq!(by_name(&ex, "mx.example.org"), None);
        assert_eq!(by_name(&ex, "mx12.example.org.evil.test"), None);
        // Unanchored unless the pattern anchors itself.
        assert_eq!(by_name(&ex, "a-outbound-7.mailer.test"), NAME);
        assert_eq!(by_name(&ex, "inbound.mailer.test"), None);
        assert_eq!(ex.counts().client_names, 2);
    }

    #[test]
    fn regexes_from_several_sources_are_combined() {
        let mut builder = Exemptions::builder();
        builder.add_clients("one", "/^a\\./\n").unwrap();
        builder
            .add_clients("two", "/^b\\./\n.example.net\n")
            .unwrap();
        let ex = builder.build();
        assert_eq!(by_name(&ex, "a.test"), NAME);
        assert_eq!(by_name(&ex, "b.test"), NAME);
        assert_eq!(by_name(&ex, "c.test"), None);
        assert_eq!(by_name(&ex, "mx.example.net"), NAME);
        assert_eq!(ex.counts().client_names, 3);
    }

    #[test]
    fn no_client_name_matches_no_name_entry() {
        let ex = clients(".example.com\n/./\nmail.example.com\n");
        assert_eq!(ex.check(ip(OTHER_IP), None, "", ""), None);
    }

    #[test]
    fn sender_forms() {
        let ex = senders("Alice@Example.COM\n@example.org\n@.example.net\n");
        assert_eq!(by_sender(&ex, "alice@example.com"), SENDER);
        assert_eq!(by_sender(&ex, "bob@example.com"), None);
        assert_eq!(by_sender(&ex, "alice@mail.example.com"), None);
        assert_eq!(by_sender(&ex, "anyone@example.org"), SENDER);
        assert_eq!(by_sender(&ex, "anyone@sub.example.org"), None);
        assert_eq!(by_sender(&ex, "anyone@badexample.org"), None);
        assert_eq!(by_sender(&ex, "anyone@sub.example.net"), SENDER);
        assert_eq!(by_sender(&ex, "anyone@a.b.example.net"), SENDER);
        assert_eq!(by_sender(&ex, "anyone@example.net"), None);
        assert_eq!(by_sender(&ex, "anyone@badexample.net"), None);
        assert_eq!(by_sender(&ex, "no-at-sign"), None);
        assert_eq!(ex.counts().senders, 3);
    }

    #[test]
    fn null_sender_matches_nothing() {
        let ex = senders("@example.org\n@.example.org\nuser@example.org\n");
        assert_eq!(by_sender(&ex, ""), None);
    }

    #[test]
    fn address_is_split_at_the_last_at_sign() {
        let ex = senders("@example.org\n\"a@b\"@example.net\n");
        assert_eq!(by_sender(&ex, "\"x@evil.test\"@example.org"), SENDER);
        assert_eq!(by_sender(&ex, "x@example.org@evil.test"), None);
        assert_eq!(by_sender(&ex, "\"a@b\"@example.net"), SENDER);
    }

    #[test]
    fn recipient_forms() {
        let ex = recipients("postmaster@example.com\n@example.org\n@.example.net\n");
        assert_eq!(by_recipient(&ex, "postmaster@example.com"), RECIPIENT);
        assert_eq!(by_recipient(&ex, "info@example.com"), None);
        assert_eq!(by_recipient(&ex, "info@example.org"), RECIPIENT);
        assert_eq!(by_recipient(&ex, "info@lists.example.net"), RECIPIENT);
        assert_eq!(by_recipient(&ex, "info@example.net"), None);
        assert_eq!(by_recipient(&ex, ""), None);
        // Sender and recipient lists are separate.
        assert_eq!(
            ex.check(
                ip(OTHER_IP),
                None,
                "postmaster@example.com",
                "x@example.test"
            ),
            None
        );
        assert_eq!(ex.counts().recipients, 3);
    }

    #[test]
    fn precedence_client_name_sender_recipient() {
        let mut builder = Exemptions::builder();
        builder
            .add_clients("clients", "192.0.2.0/24\n.example.com\n")
            .unwrap()
            .add_senders("senders", "@example.org\n")
            .unwrap()
            .add_recipients("recipients", "@example.net\n")
            .unwrap();
        let ex = builder.build();
        let name = Some("mx.example.com");
        let (sender, recipient) = ("a@example.org", "b@example.net");
        assert_eq!(ex.check(ip("192.0.2.1"), name, sender, recipient), CLIENT);
        assert_eq!(ex.check(ip(OTHER_IP), name, sender, recipient), NAME);
        assert_eq!(ex.check(ip(OTHER_IP), None, sender, recipient), SENDER);
        assert_eq!(ex.check(ip(OTHER_IP), None, "", recipient), RECIPIENT);
        assert_eq!(ex.check(ip(OTHER_IP), None, "", "b@example.test"), None);
        assert!(!ex.is_empty());
        assert_eq!(
            ex.counts(),
            ExemptCounts {
                client_networks: 1,
                client_names: 1,
                senders: 1,
                recipients: 1,
                greytraps: 0,
                domains: 0,
            }
        );
    }

    #[test]
    fn comments_and_blank_lines() {
        let text = "# whole-line comment\n\
                    \n\
                    \t   \n\
                    192.0.2.1   # trailing comment\n\
                    \t# indented comment\n\
                    .example.com\t# tab before comment\n\
                    /a#b/\n\
                    198.51.100.0/24#glued\n";
        // The glued '#' is not a comment, so the last line is a bad network.
        assert_eq!(
            client_error(text),
            "clients.txt:8: invalid network \"198.51.100.0/24#glued\": bad prefix length \"24#glued\""
        );
        let ex = clients(&text.replace("198.51.100.0/24#glued\n", "203.0.113.1\r\n"));
        assert_eq!(by_ip(&ex, "192.0.2.1"), CLIENT);
        assert_eq!(by_ip(&ex, "203.0.113.1"), CLIENT);
        assert_eq!(by_name(&ex, "mx.example.com"), NAME);
        assert_eq!(by_name(&ex, "xa#by.test"), NAME);
        assert_eq!(ex.counts().client_networks, 2);
        assert_eq!(ex.counts().client_names, 2);

        let ex = senders("# senders\n\nuser@example.org # boss\n\n");
        assert_eq!(by_sender(&ex, "user@example.org"), SENDER);
        assert_eq!(ex.counts().senders, 1);
    }

    #[test]
    fn byte_order_mark_is_ignored() {
        let ex = clients("\u{feff}192.0.2.1\n");
        assert_eq!(by_ip(&ex, "192.0.2.1"), CLIENT);
    }

    #[test]
    fn client_errors_name_source_line_and_text() {
        let cases = [
            (
                "192.0.2.1\n300.1.1.0/24\n",
                "clients.txt:2: invalid network \"300.1.1.0/24\": \"300.1.1.0\" is not an IP address",
            ),
            (
                "# c\n\n10.0.0.0/33\n",
                "clients.txt:3: invalid network \"10.0.0.0/33\": prefix length 33 is larger than 32",
            ),
            (
                "2001:db8::/129\n",
                "clients.txt:1: invalid network \"2001:db8::/129\": prefix length 129 is larger than 128",
            ),
            (
                "10.0.0.0/\n",
                "clients.txt:1: invalid network \"10.0.0.0/\": bad prefix length \"\"",
            ),
            (
                "10.0.0.0/+8\n",
                "clients.txt:1: invalid network \"10.0.0.0/+8\": bad prefix length \"+8\"",
            ),
            ("300.1.1.1\n", "clients.txt:1: invalid IP address \"300.1.1.1\""),
            ("2001:db8::zz\n", "clients.txt:1: invalid IP address \"2001:db8::zz\""),
            ("ok.example\n/a(b/\n", "clients.txt:2: invalid regex \"/a(b/\": unclosed group"),
            (
                "/unclosed\n",
                "clients.txt:1: unclosed regex \"/unclosed\" (expected /pattern/)",
            ),
            ("/\n", "clients.txt:1: unclosed regex \"/\" (expected /pattern/)"),
            ("//\n", "clients.txt:1: empty regex \"//\""),
            (
                "bad_host.example.com\n",
                "clients.txt:1: invalid hostname \"bad_host.example.com\": character '_' is not allowed",
            ),
            (
                "mail.example.com.\n",
                "clients.txt:1: invalid hostname \"mail.example.com.\": leading or trailing '.'",
            ),
            (
                "a..example.com\n",
                "clients.txt:1: invalid hostname \"a..example.com\": empty label",
            ),
            (
                "..example.com\n",
                "clients.txt:1: invalid hostname suffix \"..example.com\": leading or trailing '.'",
            ),
            (".\n", "clients.txt:1: invalid hostname suffix \".\": empty name"),
            (
                "mail.example.com extra\n",
                "clients.txt:1: unexpected whitespace in \"mail.example.com extra\"",
            ),
            (
                "host.123\n",
                "clients.txt:1: invalid hostname \"host.123\": the last label is numeric",
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(client_error(text), expected, "for {text:?}");
        }
    }

    #[test]
    fn hostname_length_limits() {
        let label63 = "a".repeat(63);
        let label64 = "a".repeat(64);
        assert_eq!(
            by_name(
                &clients(&format!("{label63}.test\n")),
                &format!("{label63}.test")
            ),
            NAME
        );
        assert_eq!(
            client_error(&format!("{label64}.test\n")),
            format!("clients.txt:1: invalid hostname \"{label64}.test\": label \"{label64}\" is longer than 63 characters")
        );
        // 4 * 63 + 3 dots = 255 characters.
        let long = [label63.as_str(); 4].join(".");
        assert_eq!(
            client_error(&format!("{long}\n")),
            format!("clients.txt:1: invalid hostname \"{long}\": 255 characters, more than 253")
        );
    }

    #[test]
    fn address_errors_name_source_line_and_text() {
        let cases = [
            (
                "ok@example.org\nexample.org\n",
                "senders.txt:2: missing '@' in \"example.org\" (expected user@domain, @domain or @.domain)",
            ),
            ("user@\n", "senders.txt:1: missing domain after '@' in \"user@\""),
            ("@\n", "senders.txt:1: missing domain after '@' in \"@\""),
            (
                "@.\n",
                "senders.txt:1: invalid domain in \"@.\": empty domain",
            ),
            (
                "\n\nuser @example.org\n",
                "senders.txt:3: unexpected whitespace in \"user @example.org\"",
            ),
            (
                "user@example..org\n",
                "senders.txt:1: invalid domain in \"user@example..org\": empty label (leading, trailing or doubled '.')",
            ),
            (
                "user@.example.org\n",
                "senders.txt:1: invalid domain in \"user@.example.org\": empty label (leading, trailing or doubled '.')",
            ),
            (
                "@example.org.\n",
                "senders.txt:1: invalid domain in \"@example.org.\": empty label (leading, trailing or doubled '.')",
            ),
            ("a@b@example.org\n", "senders.txt:1: more than one '@' in \"a@b@example.org\""),
        ];
        for (text, expected) in cases {
            assert_eq!(sender_error(text), expected, "for {text:?}");
        }
        assert_eq!(
            recipient_error("postmaster@example.org\n# x\nnobody\n"),
            "recipients.txt:3: missing '@' in \"nobody\" (expected user@domain, @domain or @.domain)"
        );
    }

    #[test]
    fn failed_add_changes_nothing() {
        let mut builder = Exemptions::builder();
        builder.add_clients("good", "192.0.2.0/24\n").unwrap();
        let err = builder
            .add_clients("bad", "198.51.100.0/24\n.example.com\n/^x/\n10.0.0.0/33\n")
            .map(|_| ())
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "bad:4: invalid network \"10.0.0.0/33\": prefix length 33 is larger than 32"
        );
        builder.add_senders("s", "@example.org\n").unwrap();
        assert!(builder.add_senders("s2", "@example.net\nbroken\n").is_err());
        builder.add_recipients("r", "@example.org\n").unwrap();
        assert!(builder
            .add_recipients("r2", "@example.net\nbroken\n")
            .is_err());
        let ex = builder.build();
        assert_eq!(by_ip(&ex, "192.0.2.1"), CLIENT);
        assert_eq!(by_ip(&ex, "198.51.100.1"), None);
        assert_eq!(by_name(&ex, "mx.example.com"), None);
        assert_eq!(by_name(&ex, "x.test"), None);
        assert_eq!(by_sender(&ex, "a@example.net"), None);
        assert_eq!(by_recipient(&ex, "a@example.net"), None);
        assert_eq!(
            ex.counts(),
            ExemptCounts {
                client_networks: 1,
                client_names: 0,
                senders: 1,
                recipients: 1,
                greytraps: 0,
                domains: 0,
            }
        );
    }

    /// Removes the file when the test ends, even by panic.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(tag: &str, contents: &str) -> Self {
            let path = std::env::temp_dir().join(format!(
                "greyhound-exempt-{}-{}-{tag}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos())
            ));
            std::fs::write(&path, contents).unwrap();
            Self(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn load_file_reads_each_kind() {
        let clients_file = TempFile::new("clients", "# mine\n192.0.2.0/24\n.example.com\n");
        let senders_file = TempFile::new("senders", "@example.org\n");
        let recipients_file = TempFile::new("recipients", "abuse@example.net\n");
        let names_file = TempFile::new("names", "mx.example.test\n");
        let mut builder = Exemptions::builder();
        builder
            .load_file(ExemptList::Client, &clients_file.0)
            .unwrap()
            .load_file(ExemptList::ClientName, &names_file.0)
            .unwrap()
            .load_file(ExemptList::Sender, &senders_file.0)
            .unwrap()
            .load_file(ExemptList::Recipient, &recipients_file.0)
            .unwrap();
        let ex = builder.build();
        assert_eq!(by_ip(&ex, "192.0.2.9"), CLIENT);
        assert_eq!(by_name(&ex, "a.example.com"), NAME);
        assert_eq!(by_name(&ex, "mx.example.test"), NAME);
        assert_eq!(by_sender(&ex, "x@example.org"), SENDER);
        assert_eq!(by_recipient(&ex, "abuse@example.net"), RECIPIENT);
        assert_eq!(
            ex.counts(),
            ExemptCounts {
                client_networks: 1,
                client_names: 2,
                senders: 1,
                recipients: 1,
                greytraps: 0,
                domains: 0,
            }
        );
    }

    #[test]
    fn load_file_parse_error_names_the_path() {
        let file = TempFile::new("bad", "192.0.2.1\n\nnot valid!\n");
        let err = Exemptions::builder()
            .load_file(ExemptList::Client, &file.0)
            .map(|_| ())
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{}:3: unexpected whitespace in \"not valid!\"",
                file.0.display()
            )
        );
    }

    #[test]
    fn load_file_missing_path_is_an_io_error() {
        let path = std::env::temp_dir().join(format!(
            "greyhound-exempt-{}-does-not-exist",
            std::process::id()
        ));
        let err = Exemptions::builder()
            .load_file(ExemptList::Sender, &path)
            .map(|_| ())
            .unwrap_err();
        let message = err.to_string();
        assert!(
            message.starts_with(&format!("cannot read {}: ", path.display())),
            "{message}"
        );
        match err {
            ExemptError::Io {
                path: reported,
                source,
            } => {
                assert_eq!(reported, path.display().to_string());
                assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
            }
            other => panic!("expected an Io error, got {other:?}"),
        }
    }

    #[test]
    fn shipped_client_list_parses_and_matches_providers() {
        let mut builder = Exemptions::builder();
        builder
            .add_clients("whitelist_clients", DEFAULT_CLIENTS)
            .unwrap();
        let ex = builder.build();

        // Every non-comment line must have become an entry.
        let lines = DEFAULT_CLIENTS
            .lines()
            .filter(|line| !strip_comment(line).trim().is_empty())
            .count();
        let counts = ex.counts();
        assert_eq!(counts.client_networks + counts.client_names, lines);
        assert!(counts.client_networks >= 80, "{counts:?}");
        assert!(counts.client_names >= 20, "{counts:?}");
        assert_eq!((counts.senders, counts.recipients), (0, 0));

        // Gmail outbound servers (mail-sor-f41.google.com and friends).
        assert_eq!(by_ip(&ex, "209.85.220.41"), CLIENT);
        assert_eq!(by_ip(&ex, "2a00:1450:4864:20::535"), CLIENT);
        assert_eq!(by_name(&ex, "mail-sor-f41.google.com"), NAME);
        // Exchange Online / Outlook.com.
        assert_eq!(by_ip(&ex, "40.107.243.66"), CLIENT);
        assert_eq!(by_ip(&ex, "2a01:111:f403:c000::1"), CLIENT);
        assert_eq!(
            by_name(&ex, "mail-dm6nam12on2066.outbound.protection.outlook.com"),
            NAME
        );
        // Amazon SES, SendGrid, Mailgun, Mandrill, iCloud, GMX.
        assert_eq!(by_ip(&ex, "54.240.11.174"), CLIENT);
        assert_eq!(by_name(&ex, "a11-174.smtp-out.amazonses.com"), NAME);
        assert_eq!(by_ip(&ex, "167.89.18.14"), CLIENT);
        assert_eq!(by_ip(&ex, "198.61.254.9"), CLIENT);
        assert_eq!(by_name(&ex, "mail136-9.atl41.mandrillapp.com"), NAME);
        assert_eq!(by_ip(&ex, "17.58.6.52"), CLIENT);
        assert_eq!(by_name(&ex, "mout.gmx.net"), NAME);
        assert_eq!(by_ip(&ex, "::ffff:212.227.17.22"), CLIENT);

        // Nothing else is exempt by accident.
        assert_eq!(by_ip(&ex, "192.0.2.1"), None);
        assert_eq!(by_ip(&ex, "2001:db8::1"), None);
        assert_eq!(by_name(&ex, "mail.example.org"), None);
        assert_eq!(by_name(&ex, "google.com.evil.test"), None);
        assert_eq!(by_name(&ex, "gmx.net"), None);
    }

    #[test]
    fn exemptions_can_be_shared_between_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Exemptions>();
        assert_send_sync::<ExemptError>();
    }
}
