//! Time as the engine sees it: whole seconds, injected through [`Clock`].
//!
//! Records store times as `u32` seconds since [`EPOCH_UNIX`] (2024-01-01T00:00:00Z) rather than
//! Unix seconds: the triplet record keeps its whitelisted flag in the top bit of `first_seen`,
//! so a time must fit in 31 bits, which this epoch stretches to the year 2092. Keeping records
//! at 24 bytes is what holds memory under 64 bytes per live triplet (see `docs/BENCHMARKS.md`).

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Engine time: seconds since [`EPOCH_UNIX`].
pub type Secs = u32;

/// Unix time of engine second 0 (2024-01-01T00:00:00Z).
pub const EPOCH_UNIX: u64 = 1_704_067_200;

/// Largest engine time a record can hold (31 bits).
pub const MAX_SECS: Secs = (1 << 31) - 1;

/// Converts Unix seconds to engine seconds, clamped to the representable range.
pub fn from_unix(unix: u64) -> Secs {
    unix.saturating_sub(EPOCH_UNIX).min(u64::from(MAX_SECS)) as Secs
}

/// Converts engine seconds to Unix seconds.
pub fn to_unix(secs: Secs) -> u64 {
    EPOCH_UNIX + u64::from(secs)
}

/// A source of the current time. The engine never reads the system clock directly, so tests
/// and the capacity planner can move time by days without sleeping.
pub trait Clock: Send + Sync + 'static {
    /// The current time in engine seconds.
    fn now(&self) -> Secs;
}

/// The wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Secs {
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        from_unix(unix)
    }
}

/// A clock that moves only when told to; shared between a test and the engine.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU32);

impl ManualClock {
    /// A clock standing at `start`.
    pub fn new(start: Secs) -> Self {
        Self(AtomicU32::new(start))
    }

    /// Sets the time.
    pub fn set(&self, now: Secs) {
        self.0.store(now.min(MAX_SECS), Ordering::Relaxed);
    }

    /// Moves the time forward by `secs`, saturating at [`MAX_SECS`].
    pub fn advance(&self, secs: u32) {
        let now = self.0.load(Ordering::Relaxed);
        self.set(now.saturating_add(secs));
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Secs {
        self.0.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_conversion_round_trips_and_clamps() {
        assert_eq!(from_unix(EPOCH_UNIX), 0);
        assert_eq!(from_unix(EPOCH_UNIX - 1), 0);
        assert_eq!(from_unix(EPOCH_UNIX + 86_400), 86_400);
        assert_eq!(to_unix(86_400), EPOCH_UNIX + 86_400);
        assert_eq!(from_unix(u64::MAX), MAX_SECS);
        // 2026-11-23T00:00:00Z
        assert_eq!(to_unix(from_unix(1_795_392_000)), 1_795_392_000);
    }

    #[test]
    fn system_clock_is_after_2026() {
        // 2026-01-01 is 63_158_400 s after the engine epoch.
        assert!(SystemClock.now() > 63_158_400);
    }

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = ManualClock::new(100);
        assert_eq!(c.now(), 100);
        c.advance(299);
        assert_eq!(c.now(), 399);
        c.set(5);
        assert_eq!(c.now(), 5);
        c.set(MAX_SECS);
        c.advance(10);
        assert_eq!(c.now(), MAX_SECS);
    }
}
