//! The greylisting settings (delay, retry window, TTLs, auto-whitelist), in engine seconds.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest duration accepted for any setting: ten years. Keeps every `time + duration` well
/// inside the 31-bit record times (see [`super::clock`]).
pub const MAX_DURATION: u32 = 10 * 366 * 86_400;

/// Settings that decide answers. Changing them never invalidates stored records.
///
/// Serialized with its field names (the load generator's `plan` report embeds it); `dry_run` is
/// left out while false, so a report of a simulation, which never runs dry, lists only the
/// settings that shape it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Seconds a new triplet is deferred (default 300).
    pub delay: u32,
    /// Seconds after first sight during which a retry passes (default 2 days).
    pub retry_window: u32,
    /// Seconds a passed triplet stays whitelisted after its last pass (default 35 days).
    pub whitelist_ttl: u32,
    /// Passed triplets after which a client is auto-whitelisted; 0 turns the AWL off (default 5).
    pub awl_clients: u32,
    /// At most one pass per this many seconds counts towards the AWL (default 1 hour).
    pub awl_interval: u32,
    /// Seconds an auto-whitelisted client stays so after its last pass (default 35 days).
    pub awl_ttl: u32,
    /// Answer PASS `dry-run` where the answer would be DEFER, recording as usual.
    #[serde(default, skip_serializing_if = "is_false")]
    pub dry_run: bool,
}

/// Whether a flag is off, for `skip_serializing_if`.
fn is_false(flag: &bool) -> bool {
    !*flag
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            delay: 300,
            retry_window: 2 * 86_400,
            whitelist_ttl: 35 * 86_400,
            awl_clients: 5,
            awl_interval: 3600,
            awl_ttl: 35 * 86_400,
            dry_run: false,
        }
    }
}

/// A setting out of range, named so the administrator can find it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidPolicy {
    /// The setting's name as in the configuration file (`retry-window`).
    pub setting: &'static str,
    /// What is wrong with it, starting with the value in parentheses (`(0s) must be at least
    /// 1s`), so that `setting problem` reads as one sentence.
    pub problem: String,
}

impl fmt::Display for InvalidPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.setting, self.problem)
    }
}

impl std::error::Error for InvalidPolicy {}

/// Writes seconds in the largest unit that divides them exactly (`300` → `5m`, `90` → `90s`), the
/// form the configuration reads back; used to show durations in messages as they were written.
pub fn format_duration(secs: u32) -> String {
    const UNITS: [(u32, &str); 4] = [(7 * 86_400, "w"), (86_400, "d"), (3600, "h"), (60, "m")];
    if secs != 0 {
        for (size, unit) in UNITS {
            if secs % size == 0 {
                return format!("{}{unit}", secs / size);
            }
        }
    }
    format!("{secs}s")
}

/// Checks one duration setting against the bounds all durations share: at most
/// [`MAX_DURATION`], and at least 1 s if `nonzero`. The server's own durations (snapshot interval,
/// idle timeout) are checked with it too, so the rule and its wording exist once.
pub fn check_duration(
    setting: &'static str,
    secs: u32,
    nonzero: bool,
) -> Result<(), InvalidPolicy> {
    let problem = if secs > MAX_DURATION {
        format!(
            "({}) is longer than the maximum of 10 years ({MAX_DURATION}s)",
            format_duration(secs)
        )
    } else if nonzero && secs == 0 {
        "(0s) must be at least 1s".to_owned()
    } else {
        return Ok(());
    };
    Err(InvalidPolicy { setting, problem })
}

impl Policy {
    /// Checks the settings against each other and against the record format's limits.
    pub fn validate(&self) -> Result<(), InvalidPolicy> {
        // Destructured in full so that a new setting cannot be added without a thought here.
        let Policy {
            delay,
            retry_window,
            whitelist_ttl,
            awl_clients,
            awl_interval,
            awl_ttl,
            dry_run: _,
        } = *self;
        // A zero TTL or window would expire entries the moment they are made.
        let durations = [
            ("delay", delay, false),
            ("retry-window", retry_window, true),
            ("whitelist-ttl", whitelist_ttl, true),
            ("awl-interval", awl_interval, false),
            ("awl-ttl", awl_ttl, true),
        ];
        for (setting, secs, nonzero) in durations {
            check_duration(setting, secs, nonzero)?;
        }
        if retry_window < delay {
            return Err(InvalidPolicy {
                setting: "retry-window",
                problem: format!(
                    "({}) is shorter than delay ({}): no retry could ever pass",
                    format_duration(retry_window),
                    format_duration(delay)
                ),
            });
        }
        // The engine keeps the AWL count in 16 bits.
        if awl_clients > u32::from(u16::MAX) {
            return Err(InvalidPolicy {
                setting: "awl-clients",
                problem: format!("({awl_clients}) must be between 0 and {}", u16::MAX),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_contract_and_valid() {
        let p = Policy::default();
        assert_eq!(
            (
                p.delay,
                p.retry_window,
                p.whitelist_ttl,
                p.awl_clients,
                p.awl_interval,
                p.awl_ttl
            ),
            (300, 172_800, 3_024_000, 5, 3600, 3_024_000)
        );
        assert_eq!(p.validate(), Ok(()));
    }

    #[test]
    fn rejects_impossible_settings() {
        let p = Policy {
            retry_window: 299,
            ..Policy::default()
        };
        assert_eq!(p.validate().unwrap_err().setting, "retry-window");
        let p = Policy {
            retry_window: 300,
            ..Policy::default()
        };
        assert_eq!(p.validate(), Ok(()));
        let p = Policy {
            whitelist_ttl: MAX_DURATION + 1,
            ..Policy::default()
        };
        assert_eq!(p.validate().unwrap_err().setting, "whitelist-ttl");
        let p = Policy {
            whitelist_ttl: MAX_DURATION,
            ..Policy::default()
        };
        assert_eq!(p.validate(), Ok(()));
        let p = Policy {
            awl_clients: 65_536,
            ..Policy::default()
        };
        assert_eq!(p.validate().unwrap_err().setting, "awl-clients");
        let p = Policy {
            whitelist_ttl: 0,
            ..Policy::default()
        };
        assert_eq!(
            p.validate().unwrap_err().to_string(),
            "whitelist-ttl (0s) must be at least 1s"
        );
        let p = Policy {
            awl_ttl: 0,
            ..Policy::default()
        };
        assert_eq!(p.validate().unwrap_err().setting, "awl-ttl");
        // A zero delay is allowed: greylisting that only records.
        let p = Policy {
            delay: 0,
            awl_interval: 0,
            ..Policy::default()
        };
        assert_eq!(p.validate(), Ok(()));
    }
}
