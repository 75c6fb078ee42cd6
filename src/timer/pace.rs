//! Small pacing rules of a shard's loop, sans-IO (the caller passes `now`): [`Every`],
//! "at most once per period", which the runtime uses to keep a burst of work on many
//! connections (a reconnect storm) from holding the live stream (`rt::conn::feeds_first`,
//! from the reader, the handshakes and the writers); and
//! [`BusyPoll`], when a shard that polls for work instead of sleeping
//! (`server.busy_poll`) lets its runtime run timers, and when it stops polling.

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

/// What a busy-polling shard does next ([`BusyPoll::next`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Poll {
    /// Poll again: look for completions, wake-ups and due timers without sleeping.
    Again,
    /// Nothing has happened for the whole budget: sleep in the kernel until the next work.
    Sleep,
}

/// The busy-poll rule of a shard (`server.busy_poll`), in nanoseconds of a monotonic
/// clock: keep polling while some work was seen within `budget`.
///
/// Work is a count the runtime bumps whenever the shard handles something (input read,
/// ticks dispatched, a connection accepted); the rule only compares it with the count it
/// saw last, so the runtime pays an add per piece of work and no clock read.
#[derive(Clone, Copy, Debug)]
pub struct BusyPoll {
    budget: u64,
    seen: u64,
    idle_from: u64,
}

impl BusyPoll {
    /// Starts polling at `now`, as if work had just been seen.
    pub const fn new(budget: u64, work: u64, now: u64) -> BusyPoll {
        BusyPoll {
            budget,
            seen: work,
            idle_from: now,
        }
    }

    /// After one poll at `now`, with the shard's work count at `work`.
    pub fn next(&mut self, work: u64, now: u64) -> Poll {
        if work != self.seen {
            self.seen = work;
            self.idle_from = now;
        }
        if now.saturating_sub(self.idle_from) >= self.budget {
            Poll::Sleep
        } else {
            Poll::Again
        }
    }

    /// Woken from sleep by work at `now`: poll again for a whole budget.
    pub fn wake(&mut self, work: u64, now: u64) {
        *self = BusyPoll::new(self.budget, work, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_poll_polls_while_work_comes_and_sleeps_after_the_budget() {
        // Budget 2 ms, on a virtual clock in ns.
        let ms = 1_000_000;
        let mut b = BusyPoll::new(2 * ms, 7, 0);
        assert_eq!(b.next(7, 10), Poll::Again);
        assert_eq!(b.next(7, 2 * ms - 1), Poll::Again);
        // Work at 1.5 ms pushes the sleep to 3.5 ms.
        b = BusyPoll::new(2 * ms, 7, 0);
        assert_eq!(b.next(8, ms + ms / 2), Poll::Again);
        assert_eq!(b.next(8, 3 * ms + ms / 2 - 1), Poll::Again);
        assert_eq!(b.next(8, 3 * ms + ms / 2), Poll::Sleep);
        // Still nothing: still sleep.
        assert_eq!(b.next(8, 9 * ms), Poll::Sleep);
        // Woken by work: a whole budget again.
        b.wake(9, 10 * ms);
        assert_eq!(b.next(9, 12 * ms - 1), Poll::Again);
        assert_eq!(b.next(9, 12 * ms), Poll::Sleep);
        // The count wrapping around is still a change.
        let mut w = BusyPoll::new(ms, u64::MAX, 0);
        assert_eq!(w.next(0, ms - 1), Poll::Again);
        assert_eq!(w.next(0, 2 * ms - 1), Poll::Sleep);
    }

    #[test]
    fn busy_poll_with_steady_work_never_sleeps() {
        let us = 1_000;
        let mut b = BusyPoll::new(100 * us, 0, 0);
        for i in 1..=100_000u64 {
            // Work every 50 µs, a poll every 5 µs: half a second in all.
            assert_eq!(b.next(i / 10, i * 5 * us), Poll::Again, "slept at {i}");
        }
        // Then none: asleep once the budget has passed since the last work.
        let last = 100_000 * 5 * us;
        assert_eq!(b.next(10_000, last + 100 * us - 1), Poll::Again);
        assert_eq!(b.next(10_000, last + 100 * us), Poll::Sleep);
    }

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
}
