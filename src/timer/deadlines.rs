//! One owner's several deadlines behind a single wheel entry.
//!
//! An idle session has four deadlines armed at all times (reauth notice, reauth deadline,
//! heartbeat, idle timeout) and a few more come and go (handshake, slow-consumer grace,
//! hard drop). One wheel entry each cost about 170 bytes per connection (the slab node,
//! the slot entry and the slots' spare capacity), close to a tenth of an idle
//! connection. A [`DeadlineSet`] keeps the deadlines inline in its owner and files only
//! the earliest in the wheel: when that entry fires, the owner takes every deadline that
//! is due ([`DeadlineSet::fired`], then [`DeadlineSet::next_due`] in deadline order) and
//! re-files the entry for the next one ([`DeadlineSet::refile`]).
//!
//! Invariant: while the set has a wheel entry, the entry's deadline is at most every
//! armed deadline, so no deadline fires late. Arming an earlier deadline moves the entry
//! (one cancel and one insert, both `O(1)`); arming a later one or disarming leaves it
//! where it is, and an entry that fires with nothing due is simply filed again. That
//! spurious fire is the price of `O(1)` disarm without touching the wheel; a heartbeat
//! re-armed every 15 s meets it at most once per period.
//!
//! Sans-IO like the wheel: it never reads a clock, the caller passes `now`.

use super::wheel::{TimerKey, TimerWheel};

/// Value of an unarmed deadline.
pub const UNARMED: u64 = u64::MAX;

/// Up to `N` (at most 32) deadlines, by slot number, with at most one wheel entry.
#[derive(Debug)]
pub struct DeadlineSet<const N: usize> {
    at: [u64; N],
    key: Option<TimerKey>,
    key_at: u64,
}

impl<const N: usize> Default for DeadlineSet<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> DeadlineSet<N> {
    const CHECK: () = assert!(N <= 32, "the due mask is a u32");

    pub const fn new() -> Self {
        #[allow(clippy::let_unit_value)]
        let _ = Self::CHECK;
        DeadlineSet {
            at: [UNARMED; N],
            key: None,
            key_at: UNARMED,
        }
    }

    /// The deadline of `slot`, or [`UNARMED`].
    pub fn get(&self, slot: usize) -> u64 {
        self.at[slot]
    }

    /// Arms (or moves) `slot`'s deadline. Call [`refile`](Self::refile) afterwards (it is
    /// separate so a handler can arm several deadlines and re-file once).
    pub fn set(&mut self, slot: usize, at: u64) {
        self.at[slot] = at;
    }

    /// Disarms `slot`. The wheel entry stays where it is.
    pub fn clear(&mut self, slot: usize) {
        self.at[slot] = UNARMED;
    }

    /// The earliest armed deadline, or [`UNARMED`].
    pub fn earliest(&self) -> u64 {
        self.at.iter().copied().min().unwrap_or(UNARMED)
    }

    /// The set's wheel entry, if it has one, and that entry's deadline.
    pub fn entry(&self) -> Option<(TimerKey, u64)> {
        self.key.map(|k| (k, self.key_at))
    }

    /// Restores the invariant: files a wheel entry for the earliest armed deadline when
    /// the set has none or its entry is later than that. `value` makes the entry's value.
    pub fn refile<T>(&mut self, wheel: &mut TimerWheel<T>, value: impl FnOnce() -> T) {
        let earliest = self.earliest();
        if earliest == UNARMED || (self.key.is_some() && self.key_at <= earliest) {
            return;
        }
        if let Some(old) = self.key.take() {
            wheel.cancel(old);
        }
        self.key = Some(wheel.insert(earliest, value()));
        self.key_at = earliest;
    }

    /// The wheel delivered `key` at `now`. When it is this set's entry (not one that was
    /// cancelled or replaced while the caller held it), the set forgets it and returns the
    /// mask of slots due at `now`; `None` for a stale key.
    pub fn fired(&mut self, key: TimerKey, now: u64) -> Option<u32> {
        if self.key != Some(key) {
            return None;
        }
        self.key = None;
        self.key_at = UNARMED;
        let mut due = 0u32;
        for (slot, &at) in self.at.iter().enumerate() {
            if at <= now {
                due |= 1 << slot;
            }
        }
        Some(due)
    }

    /// Takes the earliest deadline among the slots in `due` that is still due at `now`
    /// (equal deadlines in slot order): clears its bit in `due`, disarms it and returns
    /// its slot. `None` when nothing in `due` is due any more (a handler disarmed or moved
    /// it). Deadlines armed at or before `now` by a handler are not in `due`: they fire on
    /// the wheel's next advance, so a handler that keeps re-arming cannot loop forever.
    pub fn next_due(&mut self, due: &mut u32, now: u64) -> Option<usize> {
        let mut best: Option<usize> = None;
        for slot in 0..N {
            if *due & (1 << slot) != 0
                && self.at[slot] <= now
                && best.is_none_or(|b| self.at[slot] < self.at[b])
            {
                best = Some(slot);
            }
        }
        match best {
            Some(slot) => {
                *due &= !(1 << slot);
                self.at[slot] = UNARMED;
                Some(slot)
            }
            None => {
                *due = 0;
                None
            }
        }
    }

    /// Disarms everything and removes the wheel entry.
    pub fn cancel_all<T>(&mut self, wheel: &mut TimerWheel<T>) {
        self.at = [UNARMED; N];
        self.key_at = UNARMED;
        if let Some(k) = self.key.take() {
            wheel.cancel(k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Advances `wheel` to `now` and handles every fired entry of `set` the way the shard
    /// does, recording `(slot, deadline, fired_at)`.
    fn run(wheel: &mut TimerWheel<()>, set: &mut DeadlineSet<4>, now: u64, log: &mut Vec<(usize, u64, u64)>) {
        let mut fired = Vec::new();
        wheel.advance(now, &mut fired);
        for (key, ()) in fired {
            let Some(mut due) = set.fired(key, now) else {
                continue;
            };
            while let Some(slot) = {
                let before = set.at;
                set.next_due(&mut due, now).map(|s| (s, before[s]))
            } {
                log.push((slot.0, slot.1, now));
            }
            set.refile(wheel, || ());
        }
    }

    /// Arms `slot` at `at` and restores the invariant, as the shard's `arm` does.
    /// An empty wheel at 0 and an empty set of four deadlines.
    fn fresh() -> (TimerWheel<()>, DeadlineSet<4>) {
        (TimerWheel::new(0), DeadlineSet::new())
    }

    fn arm(set: &mut DeadlineSet<4>, wheel: &mut TimerWheel<()>, slot: usize, at: u64) {
        set.set(slot, at);
        set.refile(wheel, || ());
    }

    #[test]
    fn one_wheel_entry_for_many_deadlines() {
        let (mut wheel, mut set) = fresh();
        for (slot, at) in [(0, 500), (1, 100), (2, 300), (3, 200)] {
            arm(&mut set, &mut wheel, slot, at);
        }
        assert_eq!(wheel.len(), 1);
        assert_eq!(set.entry().map(|e| e.1), Some(100));
        let mut log = Vec::new();
        for t in [100, 200, 300, 500] {
            run(&mut wheel, &mut set, t, &mut log);
        }
        assert_eq!(
            log,
            vec![(1, 100, 100), (3, 200, 200), (2, 300, 300), (0, 500, 500)]
        );
        assert!(wheel.is_empty());
        assert_eq!(set.entry(), None);
    }

    #[test]
    fn due_together_fire_in_deadline_then_slot_order() {
        let (mut wheel, mut set) = fresh();
        for (slot, at) in [(3, 50), (2, 40), (0, 50), (1, 60)] {
            set.set(slot, at);
        }
        set.refile(&mut wheel, || ());
        let mut log = Vec::new();
        run(&mut wheel, &mut set, 55, &mut log);
        assert_eq!(log, vec![(2, 40, 55), (0, 50, 55), (3, 50, 55)]);
        assert_eq!(set.entry().map(|e| e.1), Some(60));
        assert_eq!(wheel.len(), 1);
    }

    #[test]
    fn earlier_arm_moves_the_entry_and_disarm_leaves_it() {
        let (mut wheel, mut set) = fresh();
        arm(&mut set, &mut wheel, 0, 1000);
        arm(&mut set, &mut wheel, 1, 10);
        assert_eq!(set.entry().map(|e| e.1), Some(10));
        assert_eq!(wheel.len(), 1);
        set.clear(1);
        set.refile(&mut wheel, || ());
        assert_eq!(set.entry().map(|e| e.1), Some(10), "disarm is lazy");
        let mut log = Vec::new();
        run(&mut wheel, &mut set, 10, &mut log);
        assert!(log.is_empty(), "the spurious fire handles nothing");
        assert_eq!(set.entry().map(|e| e.1), Some(1000));
        run(&mut wheel, &mut set, 1000, &mut log);
        assert_eq!(log, vec![(0, 1000, 1000)]);
    }

    #[test]
    fn a_stale_key_is_ignored() {
        let (mut wheel, mut set) = fresh();
        arm(&mut set, &mut wheel, 0, 100);
        let (old, _) = set.entry().unwrap();
        arm(&mut set, &mut wheel, 1, 50);
        assert_eq!(set.fired(old, 100), None);
        assert!(set.entry().is_some());
    }

    #[test]
    fn a_handler_re_arming_at_now_fires_on_the_next_advance() {
        let (mut wheel, mut set) = fresh();
        arm(&mut set, &mut wheel, 0, 5);
        let mut fired = Vec::new();
        wheel.advance(5, &mut fired);
        let (key, ()) = fired.pop().unwrap();
        let mut due = set.fired(key, 5).unwrap();
        assert_eq!(set.next_due(&mut due, 5), Some(0));
        set.set(0, 5); // the handler asks again for now
        assert_eq!(set.next_due(&mut due, 5), None);
        set.refile(&mut wheel, || ());
        wheel.advance(5, &mut fired);
        assert_eq!(fired.len(), 1);
    }

    #[test]
    fn cancel_all_removes_the_entry() {
        let (mut wheel, mut set) = fresh();
        arm(&mut set, &mut wheel, 2, 7);
        set.cancel_all(&mut wheel);
        assert!(wheel.is_empty());
        assert_eq!(set.earliest(), UNARMED);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Set(usize, u64),
        Clear(usize),
        Advance(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..4usize, 0..2_000u64).prop_map(|(s, d)| Op::Set(s, d)),
            (0..4usize).prop_map(Op::Clear),
            (0..300u64).prop_map(Op::Advance),
        ]
    }

    proptest! {
        /// Against a model of four independent timers: every armed deadline fires exactly
        /// once, at the first advance that reaches it, and only the set's one entry is
        /// ever in the wheel.
        #[test]
        fn matches_independent_timers(ops in proptest::collection::vec(op(), 1..200)) {
            let (mut wheel, mut set) = fresh();
            let mut model = [UNARMED; 4];
            let mut now = 0u64;
            for op in ops {
                match op {
                    Op::Set(s, d) => {
                        let at = now + d;
                        arm(&mut set, &mut wheel, s, at);
                        model[s] = at;
                    }
                    Op::Clear(s) => {
                        set.clear(s);
                        model[s] = UNARMED;
                    }
                    Op::Advance(d) => {
                        now += d;
                        let mut log = Vec::new();
                        run(&mut wheel, &mut set, now, &mut log);
                        let mut want: Vec<(usize, u64, u64)> = (0..4)
                            .filter(|&s| model[s] <= now)
                            .map(|s| (s, model[s], now))
                            .collect();
                        want.sort_by_key(|&(s, at, _)| (at, s));
                        for &(s, _, _) in &want {
                            model[s] = UNARMED;
                        }
                        prop_assert_eq!(log, want);
                    }
                }
                prop_assert!(wheel.len() <= 1);
                if let Some((_, key_at)) = set.entry() {
                    prop_assert!(key_at <= set.earliest());
                } else {
                    prop_assert_eq!(set.earliest(), UNARMED);
                }
            }
        }
    }
}
