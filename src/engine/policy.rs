//! The greylisting settings (delay, retry window, TTLs, auto-whitelist), in engine seconds.

use std::fmt;

/// Longest duration accepted for any setting: ten years. Keeps every `time + duration` well
/// inside the 31-bit record times (see [`super::clock`]).
pub const MAX_DURATION: u32 = 10 * 366 * 86_400;

/// Settings that decide answers. Changing them never invalidates stored records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    pub dry_run: bool,
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
pub struct PolicyError {
    /// The setting's name as in the configuration file.
    pub setting: &'static str,
    /// What is wrong with it.
    pub problem: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.setting, self.problem)
    }
}

impl std::error::Error for PolicyError {}

impl Policy {
    /// Checks the settings against each other and against the record format's limits.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let durations = [
            ("delay", self.delay),
            ("retry-window", self.retry_window),
            ("whitelist-ttl", self.whitelist_ttl),
            ("awl-interval", self.awl_interval),
            ("awl-ttl", self.awl_ttl),
        ];
        for (setting, v) in durations {
            if v > MAX_DURATION {
                return Err(PolicyError {
                    setting,
                    problem: format!(
                        "{v} s is longer than the maximum of {MAX_DURATION} s (10 years)"
                    ),
                });
            }
        }
        if self.retry_window < self.delay {
            return Err(PolicyError {
                setting: "retry-window",
                problem: format!(
                    "{} s is shorter than the delay ({} s): no retry could ever pass",
                    self.retry_window, self.delay
                ),
            });
        }
        if self.whitelist_ttl == 0 {
            return Err(PolicyError {
                setting: "whitelist-ttl",
                problem: "must be at least 1 s".into(),
            });
        }
        if self.awl_clients > u32::from(u16::MAX) {
            return Err(PolicyError {
                setting: "awl-clients",
                problem: format!("{} is more than {}", self.awl_clients, u16::MAX),
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
        assert!(p
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("whitelist-ttl: "));
    }
}
