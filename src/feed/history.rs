//! Per-symbol recovery history (PROTOCOL.md section 10): the last `feed.history` ticks of a
//! symbol, at most `feed.history_age` old, kept as the already-encoded [`SharedTick`]s the
//! fan-out made, so a replay costs a reference count per tick and no encoding.
//!
//! Sans-IO: time is the monotonic nanosecond clock of [`SharedTick::accepted_ns`], passed
//! in as `now_ns`. The hub owns one [`History`] per symbol, under the symbol's lock, and
//! asks it for a [`Replay`] in the same critical section that reads the subscription's
//! baseline `seq`: the replay covers `since + 1 ..= baseline` and the live stream every
//! `seq` after the baseline, which is what makes the switch free of gaps and duplicates
//! however fast ticks keep arriving.
//!
//! Memory: each ring holds at most `depth` ticks; the hub also caps the bytes of all rings
//! together ([`HistoryLimits::max_bytes`], `feed.history_bytes`), and a symbol pushing into
//! a full budget gives up its own oldest ticks first (a busy symbol keeps less time, no
//! other symbol loses anything on its account).

use std::collections::VecDeque;
use std::sync::Arc;

use super::outbound::SharedTick;

/// The bounds of every symbol's history.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HistoryLimits {
    /// Ticks kept per symbol; 0 turns recovery off.
    pub depth: usize,
    /// A tick older than this (ns since it was accepted) is no longer replayed.
    pub age_ns: u64,
    /// All symbols' histories together, in bytes ([`entry_bytes`]).
    pub max_bytes: u64,
}

impl HistoryLimits {
    /// Recovery off: no tick kept.
    pub const OFF: HistoryLimits = HistoryLimits {
        depth: 0,
        age_ns: 0,
        max_bytes: 0,
    };
}

/// What a subscriber with `since` gets, decided under the symbol's lock.
#[derive(Debug, Clone, PartialEq)]
pub enum Replay {
    /// Every tick after `since` up to the baseline, in `seq` order, contiguous; or, when
    /// their frames exceed the connection's queue budget, as many as fit and then the
    /// newest, with `skipped` the ticks left out right before it (what the queue would
    /// have conflated anyway, without the work of queuing each: a client cannot make the
    /// shard clone and queue a whole history per symbol and message).
    Ticks {
        ticks: Vec<Arc<SharedTick>>,
        skipped: u64,
    },
    /// The history does not reach back to `since + 1` (or `since` is ahead of the symbol:
    /// the server's order restarted): the newest tick, to be sent as a `snapshot` with
    /// `"reset":true`.
    Reset(Arc<SharedTick>),
    /// `since` is the baseline: nothing missed.
    UpToDate,
    /// The symbol has no tick yet: the live stream starts at its first.
    Nothing,
}

/// The memory one kept tick accounts for: the shared record, its frame and the
/// reference-count header.
pub fn entry_bytes(t: &SharedTick) -> u64 {
    (std::mem::size_of::<SharedTick>() + 2 * std::mem::size_of::<usize>() + t.frame.len()) as u64
}

/// One symbol's ring, oldest first, `seq` strictly increasing.
#[derive(Debug, Default)]
pub struct History {
    ring: VecDeque<Arc<SharedTick>>,
    bytes: u64,
}

impl History {
    /// Ticks held (expired ones included until the next push or [`Self::expire`]).
    pub fn len(&self) -> usize {
        self.ring.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ring.is_empty()
    }

    /// Bytes held ([`entry_bytes`] summed).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The oldest `seq` held, if any.
    pub fn oldest_seq(&self) -> Option<u64> {
        self.ring.front().map(|t| t.seq)
    }

    /// Keeps `t` (newer than everything held; an older or equal `seq` is ignored), then
    /// drops what is past the depth or the age. `total` is every symbol's bytes together
    /// (this ring's included): while it is above the budget this ring gives up its oldest
    /// ticks, down to the newest one. Returns the change of this ring's bytes (added
    /// minus freed), which the caller applies to `total`'s source.
    pub fn push(&mut self, t: Arc<SharedTick>, lim: &HistoryLimits, total: u64) -> i64 {
        if lim.depth == 0 || self.ring.back().is_some_and(|b| b.seq >= t.seq) {
            return 0;
        }
        let now_ns = t.accepted_ns;
        let added = entry_bytes(&t);
        self.ring.push_back(t);
        self.bytes += added;
        let mut freed = 0;
        let mut total = total.saturating_add(added);
        while self.ring.len() > lim.depth
            || (self.ring.len() > 1 && total > lim.max_bytes)
            || self.front_expired(now_ns, lim.age_ns)
        {
            let Some(old) = self.ring.pop_front() else { break };
            let b = entry_bytes(&old);
            self.bytes -= b;
            freed += b;
            total = total.saturating_sub(b);
        }
        added as i64 - freed as i64
    }

    /// Puts `older` (oldest first) in front of what is held: the run of it that ends right
    /// before the oldest `seq` held (ticks at or above it are ignored, and so is everything
    /// when the run does not reach it: a ring never holds a gap). Taken newest first while
    /// the depth, the byte budget (`total`, as in [`Self::push`]) and the age at `now_ns`
    /// allow; an empty ring takes the run as it is. Returns the bytes added.
    pub fn prepend(
        &mut self,
        older: &[Arc<SharedTick>],
        lim: &HistoryLimits,
        total: u64,
        now_ns: u64,
    ) -> u64 {
        if lim.depth == 0 {
            return 0;
        }
        let end = match self.ring.front() {
            Some(f) => older.partition_point(|t| t.seq < f.seq),
            None => older.len(),
        };
        let run = &older[..end];
        if let (Some(f), Some(last)) = (self.ring.front(), run.last())
            && last.seq + 1 != f.seq
        {
            return 0;
        }
        let mut added = 0u64;
        let mut next: Option<u64> = None;
        for t in run.iter().rev() {
            let b = entry_bytes(t);
            if self.ring.len() >= lim.depth
                || total.saturating_add(added).saturating_add(b) > lim.max_bytes
                || now_ns.saturating_sub(t.accepted_ns) > lim.age_ns
                || next.is_some_and(|n| t.seq + 1 != n)
            {
                break;
            }
            next = Some(t.seq);
            self.ring.push_front(t.clone());
            self.bytes += b;
            added += b;
        }
        added
    }

    fn front_expired(&self, now_ns: u64, age_ns: u64) -> bool {
        self.ring
            .front()
            .is_some_and(|f| now_ns.saturating_sub(f.accepted_ns) > age_ns)
    }

    /// Drops ticks older than the age at `now_ns` (a symbol that stopped ticking still
    /// gives its memory back). Returns the bytes freed.
    pub fn expire(&mut self, now_ns: u64, age_ns: u64) -> u64 {
        let mut freed = 0;
        while self.front_expired(now_ns, age_ns) {
            if let Some(old) = self.ring.pop_front() {
                let b = entry_bytes(&old);
                self.bytes -= b;
                freed += b;
            }
        }
        freed
    }

    /// Empties the ring; returns the bytes freed.
    pub fn clear(&mut self) -> u64 {
        self.ring.clear();
        std::mem::take(&mut self.bytes)
    }

    /// What a subscriber that processed `since` is owed so that the live stream can take
    /// over after `upto` (the subscription's baseline): the ticks `since + 1 ..= upto`
    /// when every one of them is held and younger than the age at `now_ns`, else a reset
    /// to `newest` (the tick with `seq == upto`). `budget`: the bytes of frames worth
    /// queuing (the connection's outbound bound); past it, only the newest follows.
    pub fn replay(
        &self,
        since: u64,
        upto: u64,
        newest: Option<&Arc<SharedTick>>,
        now_ns: u64,
        age_ns: u64,
        budget: usize,
    ) -> Replay {
        let Some(newest) = newest.filter(|_| upto > 0) else {
            return Replay::Nothing;
        };
        if since == upto {
            return Replay::UpToDate;
        }
        if since > upto {
            return Replay::Reset(newest.clone());
        }
        let from = self.ring.partition_point(|t| t.seq <= since);
        let to = self.ring.partition_point(|t| t.seq <= upto);
        let want = upto - since;
        let complete = (to - from) as u64 == want
            && self
                .ring
                .get(from)
                .is_some_and(|t| t.seq == since + 1 && now_ns.saturating_sub(t.accepted_ns) <= age_ns);
        if !complete {
            return Replay::Reset(newest.clone());
        }
        let mut ticks = Vec::new();
        let mut bytes = 0usize;
        for t in self.ring.range(from..to) {
            bytes = bytes.saturating_add(t.frame.len());
            if bytes > budget {
                break;
            }
            ticks.push(t.clone());
        }
        let skipped = (to - from - ticks.len()) as u64;
        if skipped > 0 {
            // The newest stands for what did not fit.
            ticks.push(newest.clone());
            return Replay::Ticks {
                ticks,
                skipped: skipped - 1,
            };
        }
        Replay::Ticks { ticks, skipped: 0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::feed::symbol::SymbolId;
    use crate::feed::tick::Tick;

    const MS: u64 = 1_000_000;

    fn t(seq: u64, at_ms: u64) -> Arc<SharedTick> {
        let tick = Tick {
            ts: seq,
            bid: seq as f64,
            ask: seq as f64 + 1.0,
            last: seq as f64,
            qty: 1.0,
        };
        let mut s = SharedTick::new(SymbolId(0), Arc::from("BTC-USD"), seq, tick);
        s.accepted_ns = at_ms * MS;
        Arc::new(s)
    }

    fn lim(depth: usize) -> HistoryLimits {
        HistoryLimits {
            depth,
            age_ns: 60_000 * MS,
            max_bytes: u64::MAX,
        }
    }

    fn seqs(r: &Replay) -> Vec<u64> {
        match r {
            Replay::Ticks { ticks, skipped: 0 } => ticks.iter().map(|t| t.seq).collect(),
            other => panic!("not a whole replay: {other:?}"),
        }
    }

    /// A small world: the ring plus the symbol's newest tick and `seq`, as the hub keeps them.
    struct Sym {
        h: History,
        last: Option<Arc<SharedTick>>,
        seq: u64,
        total: u64,
        lim: HistoryLimits,
    }

    impl Sym {
        fn new(lim: HistoryLimits) -> Self {
            Sym {
                h: History::default(),
                last: None,
                seq: 0,
                total: 0,
                lim,
            }
        }
        fn tick(&mut self, at_ms: u64) -> Arc<SharedTick> {
            self.seq += 1;
            let x = t(self.seq, at_ms);
            let d = self.h.push(x.clone(), &self.lim, self.total);
            self.total = (self.total as i64 + d) as u64;
            self.last = Some(x.clone());
            x
        }
        fn replay(&self, since: u64, now_ms: u64) -> Replay {
            self.h.replay(
                since,
                self.seq,
                self.last.as_ref(),
                now_ms * MS,
                self.lim.age_ns,
                usize::MAX,
            )
        }
    }

    #[test]
    fn replays_exactly_the_ticks_after_since() {
        let mut s = Sym::new(lim(10));
        assert_eq!(s.replay(0, 0), Replay::Nothing);
        assert_eq!(s.replay(5, 0), Replay::Nothing, "no tick: nothing to reset to");
        for i in 0..5 {
            s.tick(i);
        }
        assert_eq!(seqs(&s.replay(2, 5)), vec![3, 4, 5]);
        assert_eq!(seqs(&s.replay(0, 5)), vec![1, 2, 3, 4, 5]);
        assert_eq!(s.replay(5, 5), Replay::UpToDate);
        // Ahead of the symbol (the order restarted): a reset to the newest tick.
        assert!(matches!(s.replay(9, 5), Replay::Reset(ref n) if n.seq == 5));
    }

    /// `[cluster]`: the bus's older history arrives after the head and live ticks.
    #[test]
    fn older_ticks_go_in_front_only_as_a_run_that_meets_the_oldest_held() {
        let older: Vec<_> = (1..=6).map(|q| t(q, q)).collect();
        // Held: 5, 6, 7 (the head 5, then live); the run 1..=4 goes in front, 5 and 6
        // are ignored.
        let mut s = Sym::new(lim(10));
        s.seq = 4;
        for i in 5..=7 {
            s.tick(i);
        }
        let added = s.h.prepend(&older, &s.lim, s.total, 10 * MS);
        assert_eq!(added, older[..4].iter().map(|t| entry_bytes(t)).sum::<u64>());
        assert_eq!(seqs(&s.replay(0, 10)), (1..=7).collect::<Vec<_>>());
        assert_eq!(s.h.bytes(), (1..=7).map(|q| entry_bytes(&t(q, 0))).sum::<u64>());
        // A run that stops short of the oldest held (a gap) is not taken.
        let mut s = Sym::new(lim(10));
        s.seq = 5;
        s.tick(6);
        assert_eq!(s.h.prepend(&older[..4], &s.lim, s.total, 10 * MS), 0);
        assert_eq!(s.h.len(), 1);
        // The depth keeps the newest of the run; so do the age and the byte budget. Each
        // case: tick 7 held (accepted at `at_ms`), the run 1..=6 offered at 10 ms.
        let oldest_after = |lim: HistoryLimits, at_ms: u64| {
            let mut s = Sym::new(lim);
            s.seq = 6;
            s.tick(at_ms);
            s.h.prepend(&older, &s.lim, s.total, 10 * MS);
            (s.h.oldest_seq(), s.h.len())
        };
        assert_eq!(oldest_after(lim(4), 7), (Some(4), 4));
        let aged = HistoryLimits {
            age_ns: 7 * MS,
            ..lim(10)
        };
        assert_eq!(
            oldest_after(aged, 10).0,
            Some(3),
            "1 and 2 are past the age at 10 ms"
        );
        let b = entry_bytes(&older[0]);
        let budget = HistoryLimits {
            max_bytes: 3 * b,
            ..lim(10)
        };
        assert_eq!(oldest_after(budget, 7).0, Some(5), "room for two more");
        // An empty ring takes the whole run; depth 0 takes nothing.
        let mut h = History::default();
        h.prepend(&older, &lim(10), 0, 10 * MS);
        assert_eq!((h.len(), h.oldest_seq()), (6, Some(1)));
        let mut h = History::default();
        assert_eq!(h.prepend(&older, &HistoryLimits::OFF, 0, 10 * MS), 0);
        assert!(h.is_empty());
    }

    proptest::proptest! {
        /// Whatever is held and whatever run the bus brings back: the ring stays strictly
        /// increasing and gap-free, within its depth, its bytes add up, and a `since`
        /// replays exactly the ticks after it or resets.
        #[test]
        fn prepend_keeps_the_ring_whole(
            held_from in 1u64..60,
            held_n in 0usize..8,
            run_from in 1u64..60,
            run_n in 0usize..60,
            depth in 1usize..40,
            since in 0u64..80,
        ) {
            let mut s = Sym::new(lim(depth));
            s.seq = held_from - 1;
            for _ in 0..held_n {
                s.tick(1);
            }
            let run: Vec<_> = (run_from..run_from + run_n as u64).map(|q| t(q, 1)).collect();
            s.h.prepend(&run, &s.lim, s.total, 2 * MS);
            let seqs: Vec<u64> = s.h.ring.iter().map(|t| t.seq).collect();
            proptest::prop_assert!(seqs.len() <= depth.max(held_n));
            proptest::prop_assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{:?}", seqs);
            proptest::prop_assert_eq!(s.h.bytes(), s.h.ring.iter().map(|t| entry_bytes(t)).sum::<u64>());
            if held_n > 0 {
                proptest::prop_assert_eq!(seqs.last().copied(), Some(s.seq));
                match s.replay(since.min(s.seq), 2) {
                    Replay::Ticks { ticks, skipped: 0 } => {
                        let got: Vec<u64> = ticks.iter().map(|t| t.seq).collect();
                        let want: Vec<u64> = (since.min(s.seq) + 1..=s.seq).collect();
                        proptest::prop_assert_eq!(got, want);
                    }
                    Replay::Reset(n) => {
                        proptest::prop_assert_eq!(n.seq, s.seq);
                        proptest::prop_assert!(seqs.first().is_none_or(|&f| f > since.min(s.seq) + 1));
                    }
                    Replay::UpToDate => proptest::prop_assert_eq!(since.min(s.seq), s.seq),
                    other => proptest::prop_assert!(false, "{:?}", other),
                }
            }
        }
    }

    #[test]
    fn wrapping_and_depth() {
        let mut s = Sym::new(lim(4));
        for i in 0..10 {
            s.tick(i);
        }
        assert_eq!(s.h.len(), 4);
        assert_eq!(s.h.oldest_seq(), Some(7));
        assert_eq!(seqs(&s.replay(6, 10)), vec![7, 8, 9, 10]);
        // One short of reaching back: a reset, never a replay with a hole.
        assert!(matches!(s.replay(5, 10), Replay::Reset(ref n) if n.seq == 10));
        assert!(matches!(s.replay(0, 10), Replay::Reset(_)));
    }

    #[test]
    fn age_expiry_on_push_on_sweep_and_on_read() {
        let mut s = Sym::new(HistoryLimits {
            depth: 100,
            age_ns: 1_000 * MS,
            max_bytes: u64::MAX,
        });
        s.tick(0);
        s.tick(500);
        s.tick(900);
        // At 1.2 s the first tick is past the age: the read does not use it.
        assert!(matches!(s.replay(0, 1_200), Replay::Reset(_)));
        assert_eq!(seqs(&s.replay(1, 1_200)), vec![2, 3]);
        // A push at 1.6 s drops what is past the age then.
        s.tick(1_600);
        assert_eq!(s.h.oldest_seq(), Some(3));
        // A symbol that stops: the sweep frees everything past the age.
        let before = s.h.bytes();
        let freed = s.h.expire(3_000 * MS, 1_000 * MS);
        assert_eq!(freed, before);
        assert!(s.h.is_empty());
        assert_eq!(s.h.bytes(), 0);
        // Nothing held: any `since` behind the newest is a reset.
        assert!(matches!(s.replay(3, 3_000), Replay::Reset(ref n) if n.seq == 4));
        assert_eq!(s.replay(4, 3_000), Replay::UpToDate);
    }

    #[test]
    fn the_byte_budget_takes_from_the_symbol_that_pushes() {
        let one = entry_bytes(&t(1, 0));
        let mut s = Sym::new(HistoryLimits {
            depth: 100,
            age_ns: u64::MAX,
            max_bytes: one * 3 + 32,
        });
        for i in 0..10 {
            s.tick(i);
        }
        assert_eq!(s.h.len(), 3);
        assert_eq!(s.total, s.h.bytes());
        assert!(s.total <= one * 3 + 32);
        // Another symbol's bytes fill the budget: this one keeps its newest tick only.
        let mut other = History::default();
        other.push(t(1, 0), &s.lim, 0);
        let d = s.h.push(t(11, 11), &s.lim, one * 100);
        assert!(d < 0);
        assert_eq!(s.h.len(), 1);
        assert_eq!(s.h.oldest_seq(), Some(11));
    }

    /// A replay bigger than the connection's queue budget: the ticks that fit, then the
    /// newest standing for the rest (`skipped`), so the work is bounded by the budget.
    #[test]
    fn a_replay_past_the_queue_budget_is_cut_to_what_fits_and_the_newest() {
        let mut s = Sym::new(lim(1000));
        for i in 0..1000 {
            s.tick(i);
        }
        let one = s.h.ring[0].frame.len();
        let r =
            s.h.replay(0, 1000, s.last.as_ref(), 0, u64::MAX, one * 10 + one / 2);
        let Replay::Ticks { ticks, skipped } = r else {
            panic!("{r:?}")
        };
        let got: Vec<u64> = ticks.iter().map(|t| t.seq).collect();
        let n = got.len();
        assert!((9..=11).contains(&n), "{n}");
        assert_eq!(got[..n - 1], (1..n as u64).collect::<Vec<_>>()[..]);
        assert_eq!(got[n - 1], 1000);
        // Every tick accounted for: the listed ones plus the skipped.
        assert_eq!(n as u64 + skipped, 1000);
        // No room at all: the newest alone, standing for all the others.
        let r = s.h.replay(0, 1000, s.last.as_ref(), 0, u64::MAX, 0);
        assert!(
            matches!(r, Replay::Ticks { ref ticks, skipped: 999 } if ticks.len() == 1 && ticks[0].seq == 1000)
        );
        // Within the budget: all of them, nothing skipped.
        let r = s.h.replay(990, 1000, s.last.as_ref(), 0, u64::MAX, one * 100);
        assert_eq!(seqs(&r), (991..=1000).collect::<Vec<_>>());
    }

    #[test]
    fn off_keeps_nothing_and_old_or_equal_seq_is_ignored() {
        let mut h = History::default();
        assert_eq!(h.push(t(1, 0), &HistoryLimits::OFF, 0), 0);
        assert!(h.is_empty());
        let l = lim(10);
        assert!(h.push(t(5, 0), &l, 0) > 0);
        assert_eq!(h.push(t(5, 0), &l, 0), 0);
        assert_eq!(h.push(t(3, 0), &l, 0), 0);
        assert_eq!(h.len(), 1);
        assert_eq!(h.clear(), entry_bytes(&t(5, 0)));
        assert_eq!(h.bytes(), 0);
    }

    /// A gap in what the node holds (cluster: a jump in the bus order) is never replayed
    /// across: the subscriber gets a reset instead of a silent hole.
    #[test]
    fn a_hole_in_the_ring_means_reset() {
        let mut h = History::default();
        let l = lim(10);
        for seq in [1, 2, 3, 7, 8] {
            h.push(t(seq, 0), &l, 0);
        }
        let newest = t(8, 0);
        let r = |since| h.replay(since, 8, Some(&newest), 0, l.age_ns, usize::MAX);
        assert_eq!(seqs(&r(6)), vec![7, 8]);
        assert!(matches!(r(2), Replay::Reset(_)));
        assert!(matches!(r(4), Replay::Reset(_)));
    }

    /// The switch from replay to live, on a virtual clock, with ticks arriving while the
    /// replay is read and queued: the replay is cut at the baseline read in the same step,
    /// and the live stream delivers only `seq > baseline`. Every interleaving of "ticks
    /// arrive" and "subscriber reads" gives each `seq` exactly once, wrapping included.
    #[test]
    fn replay_then_live_has_no_gap_and_no_duplicate_while_ticks_arrive() {
        for depth in [3usize, 8, 50] {
            for since in 0..20u64 {
                for before in 0..20u64 {
                    let mut s = Sym::new(lim(depth));
                    let mut live_inbox = Vec::new();
                    for i in 0..before {
                        s.tick(i);
                    }
                    // The subscribe: baseline and replay read together.
                    let baseline = s.seq;
                    let replay = s.replay(since.min(before), before);
                    // Ticks keep arriving while the replay is being queued (they go to
                    // the shard's inbox, as for every subscriber of the symbol).
                    for i in 0..7 {
                        live_inbox.push(s.tick(before + i));
                    }
                    let since = since.min(before);
                    let mut got: Vec<u64> = match replay {
                        Replay::Ticks { ticks, .. } => ticks.iter().map(|t| t.seq).collect(),
                        Replay::Reset(n) => {
                            assert!(since + (depth as u64) < before, "reset only when out of reach");
                            assert_eq!(n.seq, baseline);
                            vec![]
                        }
                        Replay::UpToDate => {
                            assert_eq!(since, baseline);
                            vec![]
                        }
                        Replay::Nothing => {
                            assert_eq!(baseline, 0);
                            vec![]
                        }
                    };
                    let reset = got.is_empty() && since < baseline;
                    got.extend(live_inbox.iter().map(|t| t.seq).filter(|&q| q > baseline));
                    let first = if reset { baseline + 1 } else { since + 1 };
                    let want: Vec<u64> = (first..=s.seq).collect();
                    assert_eq!(got, want, "depth {depth} since {since} before {before}");
                }
            }
        }
    }
}
