//! Two small pacing rules of a shard's loop, sans-IO (the caller passes `now`):
//! [`Every`], "at most once per period", and [`WindowBudget`], "at most so many bytes per
//! window". The runtime uses them to keep a burst of work on many connections (a
//! reconnect storm) from holding the live stream (`rt::conn::feeds_first`,
//! `rt::conn::writer`).

/// Due at most once per `period` (in the caller's time unit).
#[derive(Clone, Copy, Debug)]
pub struct Every {
    period: u64,
    last: Option<u64>,
}

impl Every {
    pub const fn new(period: u64) -> Every {
        Every { period, last: None }
    }

    /// True (and counted as done at `now`) when `period` has passed since the last time it
    /// was due, or it never was.
    pub fn due(&mut self, now: u64) -> bool {
        if self.last.is_some_and(|l| now.saturating_sub(l) < self.period) {
            return false;
        }
        self.last = Some(now);
        true
    }
}

/// At most about `limit` bytes per window (windows are numbered by the caller, e.g. the
/// millisecond): [`Self::open`] says whether the current window has room, [`Self::spend`]
/// counts a write. One write may overshoot the limit; the next window starts from zero.
#[derive(Clone, Copy, Debug)]
pub struct WindowBudget {
    limit: usize,
    window: u64,
    spent: usize,
}

impl WindowBudget {
    pub const fn new(limit: usize) -> WindowBudget {
        WindowBudget {
            limit,
            window: 0,
            spent: 0,
        }
    }

    /// True when window `now` still has room (a new window starts empty).
    pub fn open(&mut self, now: u64) -> bool {
        if now != self.window {
            self.window = now;
            self.spent = 0;
        }
        self.spent < self.limit
    }

    /// `n` bytes went out in the current window.
    pub fn spend(&mut self, n: usize) {
        self.spent = self.spent.saturating_add(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_is_due_once_per_period() {
        let mut e = Every::new(200);
        assert!(e.due(1_000));
        assert!(!e.due(1_000));
        assert!(!e.due(1_199));
        assert!(e.due(1_200));
        assert!(!e.due(1_300));
        // A clock read that goes back (never from a monotonic clock) is not due.
        assert!(!e.due(900));
        assert!(e.due(5_000));
    }

    #[test]
    fn a_window_budget_closes_when_spent_and_opens_with_the_next_window() {
        let mut b = WindowBudget::new(1024);
        assert!(b.open(7));
        b.spend(600);
        assert!(b.open(7));
        b.spend(600); // one write may overshoot
        assert!(!b.open(7));
        assert!(b.open(8));
        b.spend(usize::MAX);
        b.spend(1);
        assert!(!b.open(8));
        assert!(b.open(9));
    }
}
