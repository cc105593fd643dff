//! UDP requests in flight, matched to replies by request ID.
//!
//! UDP loses, duplicates and (rarely) reorders datagrams, so a reply is matched by the ID the
//! server echoes, never by position. IDs are handed out in sequence, so the requests in flight
//! are a window `[base, base + len)` kept in a ring: matching a reply and retiring the oldest
//! are O(1). A request with no answer after the timeout is counted lost and retired; a reply
//! that comes after that finds nothing and is counted `unmatched`, never twice.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// One request in flight.
#[derive(Debug, Clone, Copy)]
struct Pending {
    /// When it should have been sent (open loop) or was sent (closed loop): latency origin.
    intended: Instant,
    /// When it was really sent: the timeout runs from here.
    sent: Instant,
    /// A flag of the caller's, given back with the answer (the client's: the request must
    /// pass).
    flag: bool,
}

/// Requests in flight, by ID.
#[derive(Debug, Default)]
pub struct Outstanding {
    base: u64,
    slots: VecDeque<Option<Pending>>,
    live: usize,
}

impl Outstanding {
    /// An empty window whose first ID will be `first_id`.
    pub fn new(first_id: u64) -> Self {
        Self {
            base: first_id,
            ..Self::default()
        }
    }

    /// The ID the next request gets; call [`Outstanding::push`] after sending it.
    pub fn next_id(&self) -> u64 {
        self.base + self.slots.len() as u64
    }

    /// Records a sent request (it takes [`Outstanding::next_id`]).
    pub fn push(&mut self, intended: Instant, sent: Instant) -> u64 {
        self.push_flagged(intended, sent, false)
    }

    /// [`Outstanding::push`] with a flag that [`Outstanding::answer_flagged`] gives back.
    pub fn push_flagged(&mut self, intended: Instant, sent: Instant, flag: bool) -> u64 {
        let id = self.next_id();
        self.slots.push_back(Some(Pending {
            intended,
            sent,
            flag,
        }));
        self.live += 1;
        id
    }

    /// Requests still waiting for an answer.
    pub fn live(&self) -> usize {
        self.live
    }

    /// Matches a reply: the request's intended send time, or `None` if the ID is not in
    /// flight (never sent, answered already, or timed out).
    pub fn answer(&mut self, id: u64) -> Option<Instant> {
        self.answer_flagged(id).map(|(intended, _)| intended)
    }

    /// [`Outstanding::answer`], with the flag the request was pushed with.
    pub fn answer_flagged(&mut self, id: u64) -> Option<(Instant, bool)> {
        let i = usize::try_from(id.checked_sub(self.base)?).ok()?;
        let p = self.slots.get_mut(i)?.take()?;
        self.live -= 1;
        self.trim();
        Some((p.intended, p.flag))
    }

    /// Retires requests sent more than `timeout` before `now`; returns how many.
    pub fn expire(&mut self, now: Instant, timeout: Duration) -> u64 {
        let mut lost = 0;
        while let Some(front) = self.slots.front() {
            match front {
                Some(p) if now.saturating_duration_since(p.sent) < timeout => break,
                Some(_) => {
                    lost += 1;
                    self.live -= 1;
                }
                None => {}
            }
            self.slots.pop_front();
            self.base += 1;
        }
        lost
    }

    /// Retires everything still in flight (end of run); returns how many.
    pub fn abandon(&mut self) -> u64 {
        let lost = self.live as u64;
        self.base += self.slots.len() as u64;
        self.slots.clear();
        self.live = 0;
        lost
    }

    /// Drops answered slots at the front so the ring stays as short as what is in flight.
    fn trim(&mut self) {
        while let Some(None) = self.slots.front() {
            self.slots.pop_front();
            self.base += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn flags_come_back_with_their_answer() {
        let t0 = Instant::now();
        let mut o = Outstanding::new(1);
        let a = o.push_flagged(t0, t0, true);
        let b = o.push_flagged(t0, t0, false);
        let c = o.push(t0, t0);
        assert_eq!(o.answer_flagged(b), Some((t0, false)));
        assert_eq!(o.answer_flagged(a), Some((t0, true)));
        assert_eq!(o.answer_flagged(a), None);
        assert_eq!(o.answer_flagged(c), Some((t0, false)));
    }

    #[test]
    fn answers_match_once_in_any_order() {
        let t0 = Instant::now();
        let mut o = Outstanding::new(100);
        let ids: Vec<u64> = (0..5).map(|_| o.push(t0, t0)).collect();
        assert_eq!(ids, vec![100, 101, 102, 103, 104]);
        assert!(o.answer(103).is_some());
        assert!(o.answer(103).is_none(), "a duplicate reply must not match");
        assert!(o.answer(99).is_none());
        assert!(o.answer(105).is_none());
        assert!(o.answer(100).is_some());
        assert_eq!(o.live(), 3);
        assert_eq!(o.abandon(), 3);
        assert_eq!(o.live(), 0);
        assert_eq!(o.next_id(), 105);
    }

    #[test]
    fn expiry_counts_unanswered_only_and_late_replies_do_not_match() {
        let t0 = Instant::now();
        let mut o = Outstanding::new(0);
        for _ in 0..4 {
            o.push(t0, t0);
        }
        let later = t0 + Duration::from_millis(10);
        o.push(later, later);
        assert!(o.answer(1).is_some());
        // Just below the timeout nothing expires; at it, the three unanswered old ones do.
        assert_eq!(
            o.expire(t0 + Duration::from_millis(99), Duration::from_millis(100)),
            0
        );
        assert_eq!(
            o.expire(t0 + Duration::from_millis(100), Duration::from_millis(100)),
            3
        );
        assert_eq!(o.live(), 1);
        assert!(
            o.answer(2).is_none(),
            "a reply after its timeout is unmatched"
        );
        assert!(o.answer(4).is_some());
    }

    proptest! {
        /// Every request ends exactly once: answered, or lost at expiry/abandon.
        #[test]
        fn every_request_is_accounted_once(ops in proptest::collection::vec((0u8..4, 0u64..64), 1..300)) {
            let t0 = Instant::now();
            let mut o = Outstanding::new(0);
            let (mut sent, mut answered, mut lost) = (0u64, 0u64, 0u64);
            let mut clock = 0u64;
            for (op, x) in ops {
                match op {
                    0 | 1 => { o.push(t0 + Duration::from_millis(clock), t0 + Duration::from_millis(clock)); sent += 1; }
                    2 => { if o.answer(x).is_some() { answered += 1; } }
                    _ => { clock += x; lost += o.expire(t0 + Duration::from_millis(clock), Duration::from_millis(20)); }
                }
                prop_assert_eq!(sent, answered + lost + o.live() as u64);
            }
            lost += o.abandon();
            prop_assert_eq!(sent, answered + lost);
        }
    }
}
