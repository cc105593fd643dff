//! `greyhound snapshot inspect FILE`: what a snapshot holds and whether it can be trusted.

use std::fmt::{self, Write as _};

use super::format::{self, FormatError, Header};
use super::ClusterState;
use crate::config::format_duration;
use crate::engine::clock::{from_unix, to_unix};
use crate::proto::policy::civil_from_days;

/// Records of a snapshot by state, at a given moment, under the snapshot's own settings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Whitelisted triplets, still within `whitelist-ttl`.
    pub whitelisted: u64,
    /// Greylisted triplets whose delay has not passed.
    pub waiting: u64,
    /// Greylisted triplets whose delay has passed: the next retry passes.
    pub retry_ready: u64,
    /// Triplets that have expired (dropped when loaded).
    pub triplets_expired: u64,
    /// Auto-whitelisted clients.
    pub awl_active: u64,
    /// Clients still counting towards `awl-clients`.
    pub awl_counting: u64,
    /// Clients that have expired.
    pub clients_expired: u64,
}

/// The verdict on one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// File size in bytes.
    pub size: u64,
    /// The header, if it could be decoded and its own checksum holds.
    pub header: Option<Header>,
    /// Counts by state, if the whole file verified.
    pub counts: Option<Counts>,
    /// The replication state, if the whole file verified and its version has a cluster
    /// section (2 and later).
    pub cluster: Option<ClusterState>,
    /// What is wrong, if anything.
    pub problem: Option<FormatError>,
    /// The moment the counts and the age refer to (Unix seconds).
    pub now_unix: u64,
}

impl Report {
    /// Whether the file is a usable snapshot.
    pub fn ok(&self) -> bool {
        self.problem.is_none()
    }
}

/// Examines a snapshot's bytes at Unix time `now_unix`.
pub fn inspect(file: &[u8], now_unix: u64) -> Report {
    let mut r = Report {
        size: file.len() as u64,
        header: None,
        counts: None,
        cluster: None,
        problem: None,
        now_unix,
    };
    match format::verify(file) {
        Ok(view) => {
            let p = view.header.policy;
            let now = u64::from(from_unix(now_unix));
            let mut c = Counts::default();
            for t in view.triplets() {
                if t.alive_until(&p) < now {
                    c.triplets_expired += 1;
                } else if t.is_whitelisted() {
                    c.whitelisted += 1;
                } else if now < u64::from(t.first_seen()) + u64::from(p.delay) {
                    c.waiting += 1;
                } else {
                    c.retry_ready += 1;
                }
            }
            for a in view.clients() {
                if a.alive_until(&p) < now {
                    c.clients_expired += 1;
                } else if a.is_active(now as u32, &p) {
                    c.awl_active += 1;
                } else {
                    c.awl_counting += 1;
                }
            }
            r.counts = Some(c);
            r.cluster = (view.header.version >= 2).then_some(view.cluster);
            r.header = Some(view.header);
        }
        Err(e) => {
            // Show what can still be trusted: a header whose own checksum holds.
            r.header = Header::decode(file).ok();
            r.problem = Some(e);
        }
    }
    r
}

/// `YYYY-MM-DDTHH:MM:SSZ`.
fn iso_utc(unix: u64) -> String {
    let (y, m, d) = civil_from_days(unix / 86_400);
    let s = unix % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

fn age(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    let mut out = String::new();
    for (v, unit) in [(d, "d"), (h, "h"), (m, "m")] {
        if v > 0 || !out.is_empty() {
            let _ = write!(out, "{v}{unit} ");
        }
    }
    let _ = write!(out, "{s}s");
    out
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "size:         {} bytes", self.size)?;
        match &self.problem {
            None => writeln!(f, "checksum:     ok (header and body)")?,
            Some(e) => writeln!(f, "checksum:     BAD: {e}")?,
        }
        let Some(h) = &self.header else {
            return Ok(());
        };
        let p = &h.policy;
        writeln!(f, "version:      {}", h.version)?;
        writeln!(f, "generation:   {}", h.generation)?;
        if self.now_unix >= h.created_unix {
            writeln!(
                f,
                "created:      {} ({} ago)",
                iso_utc(h.created_unix),
                age(self.now_unix - h.created_unix)
            )?;
        } else {
            writeln!(
                f,
                "created:      {} (in the future: {} from now)",
                iso_utc(h.created_unix),
                age(h.created_unix - self.now_unix)
            )?;
        }
        writeln!(f, "key id:       {:016x}", h.key_id)?;
        writeln!(
            f,
            "keys made by: ipv4-prefix {}, ipv6-prefix {}, normalisation {}",
            h.ipv4_prefix, h.ipv6_prefix, h.normalization
        )?;
        writeln!(
            f,
            "settings:     delay {}, retry-window {}, whitelist-ttl {}, awl-clients {}, awl-interval {}, awl-ttl {}",
            format_duration(p.delay),
            format_duration(p.retry_window),
            format_duration(p.whitelist_ttl),
            p.awl_clients,
            format_duration(p.awl_interval),
            format_duration(p.awl_ttl)
        )?;
        match &self.counts {
            Some(c) => {
                writeln!(
                    f,
                    "triplets:     {} ({} whitelisted, {} waiting for their delay, {} retry ready, {} expired)",
                    h.triplets, c.whitelisted, c.waiting, c.retry_ready, c.triplets_expired
                )?;
                writeln!(
                    f,
                    "awl clients:  {} ({} auto-whitelisted, {} counting, {} expired)",
                    h.clients, c.awl_active, c.awl_counting, c.clients_expired
                )?;
                writeln!(
                    f,
                    "states as of: {} (with the snapshot's settings)",
                    iso_utc(self.now_unix)
                )?;
                match &self.cluster {
                    Some(c) => write_cluster(f, c),
                    None => writeln!(f, "cluster:      none (version {} file)", h.version),
                }
            }
            None => {
                writeln!(
                    f,
                    "triplets:     {} (header; records not trusted)",
                    h.triplets
                )?;
                writeln!(
                    f,
                    "awl clients:  {} (header; records not trusted)",
                    h.clients
                )
            }
        }
    }
}

/// The cluster section: what had been published, and per peer the entry to replay from.
fn write_cluster(f: &mut fmt::Formatter<'_>, c: &ClusterState) -> fmt::Result {
    if c.published_through == 0 {
        writeln!(f, "published:    nothing known")?;
    } else {
        writeln!(
            f,
            "published:    every change through {} (engine second {})",
            iso_utc(to_unix(c.published_through)),
            c.published_through
        )?;
    }
    if c.peers.is_empty() {
        return writeln!(f, "peers:        none");
    }
    writeln!(
        f,
        "peers:        {} (last stream entry applied)",
        c.peers.len()
    )?;
    for (id, entry) in &c.peers {
        writeln!(f, "  {id:<24} {entry}")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_and_age() {
        assert_eq!(iso_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(
            iso_utc(1_704_067_200 + 86_400 + 3661),
            "2024-01-02T01:01:01Z"
        );
        assert_eq!(age(0), "0s");
        assert_eq!(age(61), "1m 1s");
        assert_eq!(age(86_400 + 5), "1d 0h 0m 5s");
    }
}
