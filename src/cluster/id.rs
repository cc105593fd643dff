//! Redis stream entry ids (`<milliseconds>-<sequence>`).

use std::fmt;
use std::str::FromStr;

/// A stream entry id. Ids grow within a stream; `0-0` is before every entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamId {
    /// Milliseconds part (the Redis server's clock when the entry was added).
    pub ms: u64,
    /// Sequence within the millisecond.
    pub seq: u64,
}

impl StreamId {
    /// `0-0`: reading from here returns the whole stream.
    pub const ZERO: StreamId = StreamId { ms: 0, seq: 0 };

    /// An id from its two parts.
    pub const fn new(ms: u64, seq: u64) -> Self {
        Self { ms, seq }
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// A string that is not `<u64>-<u64>` (or a bare `<u64>`, which Redis reads as `<u64>-0`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a stream id: {0:?}")]
pub struct BadStreamId(pub String);

impl FromStr for StreamId {
    type Err = BadStreamId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadStreamId(s.chars().take(64).collect());
        let digits = |t: &str| {
            (!t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
                .then(|| t.parse::<u64>().ok())
                .flatten()
        };
        match s.split_once('-') {
            Some((ms, seq)) => Ok(Self::new(
                digits(ms).ok_or_else(bad)?,
                digits(seq).ok_or_else(bad)?,
            )),
            None => Ok(Self::new(digits(s).ok_or_else(bad)?, 0)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let id: StreamId = "1700000000123-7".parse().unwrap();
        assert_eq!(id, StreamId::new(1_700_000_000_123, 7));
        assert_eq!(id.to_string(), "1700000000123-7");
        assert_eq!("42".parse::<StreamId>().unwrap(), StreamId::new(42, 0));
        for bad in [
            "",
            "-",
            "1-",
            "-1",
            "a-1",
            "1-2-3",
            "+1-2",
            "18446744073709551616-0",
        ] {
            assert!(bad.parse::<StreamId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn orders_by_time_then_sequence() {
        assert!(StreamId::new(1, 9) < StreamId::new(2, 0));
        assert!(StreamId::new(2, 0) < StreamId::new(2, 1));
        assert!(StreamId::ZERO < StreamId::new(0, 1));
    }
}
