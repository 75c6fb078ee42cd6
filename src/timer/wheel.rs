//! A hierarchical timer wheel (Varghese & Lauck), in the shape of monoio's and Kafka's.
//!
//! # Levels
//!
//! Six levels of 64 slots. A slot of level `k` covers `64^k` ticks and the whole level
//! covers `64^(k+1)` ticks (at 1 tick = 1 ms):
//!
//! | level | slot size          | level range            |
//! | ----- | ------------------ | ---------------------- |
//! | 0     | 1 tick (1 ms)      | 64 ticks (64 ms)       |
//! | 1     | 64 ticks (64 ms)   | 4,096 ticks (~4.1 s)   |
//! | 2     | 4,096 (~4.1 s)     | 262,144 (~4.4 min)     |
//! | 3     | 262,144 (~4.4 min) | 16,777,216 (~4.7 h)    |
//! | 4     | 2^24 (~4.7 h)      | 2^30 (~12.4 days)      |
//! | 5     | 2^30 (~12.4 days)  | 2^36 (~795 days)       |
//!
//! A deadline is filed relative to the wheel's current time `now` (the last value given to
//! [`TimerWheel::advance`]): its level is the one whose slot index holds the highest bit
//! in which `deadline` and `now` differ (`deadline ^ now`), its slot is that 6-bit group
//! of `deadline`. So level-0 entries lie in `now`'s own 64-tick block, level-1 entries in
//! `now`'s 4,096-tick block but a later 64-tick block, and so on. This invariant makes
//! the wheel simple:
//!
//! * every entry of level `k` is due before every entry of level `k + 1`, so the next
//!   expiry is the first occupied slot of the lowest non-empty level, found with one
//!   `trailing_zeros` on that level's `u64` occupancy bitmap (empty time is skipped,
//!   whatever its length);
//! * a level-0 slot holds exactly one deadline, so firing a slot fires in deadline order.
//!
//! When time reaches the start of a slot of level `k > 0`, the slot's entries are
//! *cascaded*: re-filed relative to the new time, which puts each of them at a lower
//! level. An entry is cascaded at most once per level (at most 5 times in its life).
//!
//! Deadlines outside `now`'s 2^36-tick block (over 795 days of milliseconds ahead, e.g.
//! `u64::MAX / 2`) go to an *overflow* list. When time enters the 2^36-block of the
//! smallest overflow deadline (a lower bound kept on insert), the list is rescanned and
//! the entries now in range are filed into the wheel. A rescan costs `O(overflow)` and
//! happens only at blocks that hold an overflow deadline, so a far jump never walks
//! empty time. Deadlines `<= now` at insert go to a *ready* list that fires first on the
//! next advance.
//!
//! # Storage
//!
//! Timer values live in a slab (a `Vec` of nodes with a free list). Each slot is a `Vec`
//! of `(deadline, node index)` entries, and each node remembers its slot and position,
//! so cancel finds its entry in `O(1)` and turns it into a hole; a slot whose holes
//! outnumber its live entries is compacted in order (amortised `O(1)` per cancel, since
//! at least as many cancels as live entries paid for it). A [`TimerKey`] is the slab index
//! plus a generation bumped every time the node is freed, so the key of a fired or
//! cancelled timer never reaches the timer that reuses its node (until that one node has
//! been reused 2^32 times).
//!
//! Why not intrusive linked lists, as monoio and Kafka use: walking a list is a chain of
//! dependent loads, one cache miss per timer per cascade once the slab outgrows the cache
//! (measured: ~430 ns per timer to expire 1,000,000 timers spread over an hour). A slot
//! vector carries the deadline inline, so a cascade reads entries sequentially and its
//! writes to the nodes are independent, letting the CPU overlap the misses.
//!
//! # Ordering
//!
//! [`TimerWheel::advance`] delivers values in deadline order, and timers with equal
//! deadlines in insertion order: slots are appended to, compaction keeps order,
//! cascades walk a slot in order, and a slot is always cascaded before a later insert
//! could be filed into its target (the ready list is sorted by deadline with a stable
//! sort).
//!
//! # Complexity
//!
//! `insert`: `O(1)` amortised (vector growth). `cancel`: `O(1)` amortised (compaction).
//! `advance`: `O(fired + cascaded + occupied slots passed)`, never `O(elapsed ticks)`.
//! `next_deadline`: `O(levels)`. Memory: one node per pending timer plus one entry per
//! live timer or hole (holes are at most as many as live entries per slot); slot vectors
//! keep their capacity for reuse.

use std::mem;
use std::num::NonZeroU32;

/// Bits of a tick count that index one level's slots.
const SLOT_BITS: u32 = 6;
/// Slots per level.
const SLOTS: usize = 1 << SLOT_BITS;
/// Number of levels; the wheel spans `2^(SLOT_BITS * LEVELS)` ticks.
const LEVELS: usize = 6;
/// Bits spanned by the whole wheel (2^36 ticks, ~795 days of milliseconds).
const WHEEL_BITS: u32 = SLOT_BITS * LEVELS as u32;
/// Number of wheel slots; list ids below this are slots (`level * 64 + slot`).
const WHEEL_SLOTS: usize = LEVELS * SLOTS;
/// List id of the overflow list (deadlines beyond the top level's range).
const OVERFLOW: u16 = WHEEL_SLOTS as u16;
/// List id of the ready list (deadlines already due at insert).
const READY: u16 = OVERFLOW + 1;
/// Number of lists: one per slot, plus overflow and ready.
const LISTS: usize = READY as usize + 1;
/// List id of a node that is on the free list.
const FREE: u16 = u16::MAX;
/// End of the free list, and the index of a hole in a slot.
const NIL: u32 = u32::MAX;
/// Most nodes the slab holds. Keeps slot positions (at most twice the live entries,
/// thanks to compaction) within `u32`.
const MAX_NODES: usize = (1 << 31) - 1;
/// Largest drained slot buffer kept for reuse (entries); bigger ones are freed so one
/// burst does not pin memory forever.
const SPARE_MAX: usize = 4096;

/// Handle of a pending timer, for [`TimerWheel::cancel`].
///
/// Carries a generation, so the key of a timer that has fired or been cancelled never
/// cancels a newer timer that reuses the same slab slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TimerKey {
    idx: u32,
    /// Never zero, so `Option<TimerKey>` is 8 bytes (connections keep several).
    generation: NonZeroU32,
}

/// One slab entry: a pending timer (`value` is `Some`) or a free node.
struct Node<T> {
    value: Option<T>,
    generation: NonZeroU32,
    /// Which list holds the node's entry (a slot id, [`OVERFLOW`] or [`READY`]), or
    /// [`FREE`].
    list: u16,
    /// Index of the node's entry in its list; the next free node when free.
    pos: u32,
}

/// A slot's entry; `idx == NIL` marks a hole left by a cancel.
#[derive(Clone, Copy)]
struct Entry {
    deadline: u64,
    idx: u32,
}

#[derive(Default)]
struct Slot {
    entries: Vec<Entry>,
    holes: usize,
}

/// A hierarchical timer wheel over `u64` ticks that never reads a clock.
pub struct TimerWheel<T> {
    nodes: Vec<Node<T>>,
    free_head: u32,
    /// Indexed by list id.
    slots: Box<[Slot]>,
    /// Bit `s` of `occupied[k]` is set iff slot `s` of level `k` has a live entry.
    occupied: [u64; LEVELS],
    /// The wheel's current time: every deadline `<= now` has been delivered or is on the
    /// ready list.
    now: u64,
    len: usize,
    /// Lower bound of the overflow deadlines (`u64::MAX` when there is none); exact after
    /// a rescan, may be stale-low after a cancel, which only causes an early rescan.
    overflow_min: u64,
    /// Lower bound of the ready deadlines, for `next_deadline`.
    ready_min: u64,
    /// An empty buffer swapped in for a slot being drained, so draining allocates nothing.
    spare: Vec<Entry>,
}

impl<T> TimerWheel<T> {
    /// An empty wheel whose current time is `now`.
    pub fn new(now: u64) -> Self {
        Self::with_capacity(now, 0)
    }

    /// An empty wheel with room for `cap` timers before the slab reallocates.
    pub fn with_capacity(now: u64, cap: usize) -> Self {
        TimerWheel {
            nodes: Vec::with_capacity(cap.min(MAX_NODES)),
            free_head: NIL,
            slots: (0..LISTS).map(|_| Slot::default()).collect(),
            occupied: [0; LEVELS],
            now,
            len: 0,
            overflow_min: u64::MAX,
            ready_min: u64::MAX,
            spare: Vec::new(),
        }
    }

    /// Arms a timer for `deadline` carrying `value`.
    ///
    /// Deadline in the past or == now fires on the next advance. Returns a key for cancel.
    ///
    /// # Panics
    ///
    /// When 2^31 - 1 timers are already pending (over 60 GiB of them).
    pub fn insert(&mut self, deadline: u64, value: T) -> TimerKey {
        let idx = self.alloc(value);
        let list = if deadline <= self.now {
            READY
        } else {
            self.wheel_list(deadline)
        };
        self.push_entry(list, Entry { deadline, idx });
        self.len += 1;
        TimerKey {
            idx,
            generation: self.nodes[idx as usize].generation,
        }
    }

    /// Disarms a pending timer and gives its value back. A key whose timer has fired or
    /// was cancelled already (or a key of another wheel) yields `None`.
    pub fn cancel(&mut self, key: TimerKey) -> Option<T> {
        let node = self.nodes.get(key.idx as usize)?;
        if node.generation != key.generation || node.value.is_none() {
            return None;
        }
        let (list, pos) = (node.list, node.pos);
        self.remove_entry(list, pos as usize);
        self.len -= 1;
        Some(self.release(key.idx))
    }

    /// Moves time to `now` and pushes every expired (deadline `<= now`) value into `out`.
    ///
    /// Time is monotonic: a `now` smaller than [`Self::now`] moves nothing, but timers
    /// inserted with a deadline already due still fire. Values come in deadline order,
    /// equal deadlines in insertion order. The cost is proportional to the timers fired
    /// or cascaded and the occupied slots passed, not to the ticks elapsed.
    pub fn advance(&mut self, now: u64, out: &mut Vec<(TimerKey, T)>) {
        self.fire_ready(out);
        if now <= self.now {
            return;
        }
        while let Some((list, start)) = self.next_expiration() {
            if start > now {
                break;
            }
            debug_assert!(start >= self.now, "wheel invariant: expiry in the past");
            self.now = start;
            let entries = self.take_list(list);
            if list == OVERFLOW {
                self.overflow_min = u64::MAX;
            }
            if (list as usize) < SLOTS {
                for e in &entries {
                    if e.idx != NIL {
                        self.fire(e.idx, out);
                    }
                }
            } else {
                // Cascade (or overflow rescan): every deadline here is >= start, so it
                // files lower (a deadline == start lands in level 0 at the current slot
                // and fires on the next iteration).
                for &e in &entries {
                    if e.idx != NIL {
                        let target = self.wheel_list(e.deadline);
                        self.push_entry(target, e);
                    }
                }
            }
            self.recycle(entries);
        }
        self.now = now;
    }

    /// A lower bound of the earliest pending deadline, for sleeping until it; `None`
    /// when no timer is pending.
    ///
    /// Exactly:
    /// * when a timer was inserted already due: at most the smallest such deadline
    ///   (`<= now()`: the caller should advance at once);
    /// * else when level 0 holds a timer (due within `now()`'s 64-tick block): the exact
    ///   earliest deadline;
    /// * else the start of the first occupied slot of the lowest occupied level `k`, a
    ///   multiple of `64^k` (advancing to it cascades the slot, after which the answer is
    ///   finer; at most 5 such wake-ups precede a firing);
    /// * else (only overflow timers) a lower bound of the smallest overflow deadline.
    ///
    /// Advancing to the returned value always makes progress.
    pub fn next_deadline(&self) -> Option<u64> {
        if self.live(READY) > 0 {
            return Some(self.ready_min);
        }
        match self.next_expiration() {
            Some((OVERFLOW, _)) => Some(self.overflow_min),
            Some((_, start)) => Some(start),
            None => None,
        }
    }

    /// Number of pending timers.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no timer is pending.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The wheel's current time: the largest `now` given to [`Self::advance`] (or to
    /// the constructor).
    pub fn now(&self) -> u64 {
        self.now
    }

    /// The list a deadline `>= self.now` belongs to, relative to the current time.
    fn wheel_list(&self, deadline: u64) -> u16 {
        debug_assert!(deadline >= self.now);
        // `| (SLOTS - 1)` keeps deadline == now (and same-slot deadlines) at level 0.
        let masked = (deadline ^ self.now) | (SLOTS as u64 - 1);
        let significant = 63 - masked.leading_zeros();
        let level = (significant / SLOT_BITS) as usize;
        if level >= LEVELS {
            return OVERFLOW;
        }
        let slot = (deadline >> (level as u32 * SLOT_BITS)) as usize & (SLOTS - 1);
        (level * SLOTS + slot) as u16
    }

    /// The earliest list with a live entry and the tick at which it must be processed.
    fn next_expiration(&self) -> Option<(u16, u64)> {
        for (level, &occ) in self.occupied.iter().enumerate() {
            if occ == 0 {
                continue;
            }
            let shift = level as u32 * SLOT_BITS;
            // By the filing invariant no occupied slot lies before the current one, so
            // the lowest set bit is the next slot due.
            debug_assert_eq!(
                occ & (u64::MAX << ((self.now >> shift) & (SLOTS as u64 - 1))),
                occ,
                "wheel invariant: occupied slot behind the current time"
            );
            let slot = occ.trailing_zeros();
            let block_mask = (1u64 << (shift + SLOT_BITS)) - 1;
            let start = (self.now & !block_mask) + (u64::from(slot) << shift);
            return Some(((level * SLOTS) as u16 + slot as u16, start));
        }
        if self.live(OVERFLOW) > 0 {
            let start = self.overflow_min & !((1u64 << WHEEL_BITS) - 1);
            return Some((OVERFLOW, start.max(self.now)));
        }
        None
    }

    fn live(&self, list: u16) -> usize {
        let s = &self.slots[list as usize];
        s.entries.len() - s.holes
    }

    /// Fires the ready list in deadline order (stable, so ties keep insertion order).
    fn fire_ready(&mut self, out: &mut Vec<(TimerKey, T)>) {
        if self.slots[READY as usize].entries.is_empty() {
            return;
        }
        let mut entries = self.take_list(READY);
        self.ready_min = u64::MAX;
        entries.retain(|e| e.idx != NIL);
        entries.sort_by_key(|e| e.deadline);
        for e in &entries {
            self.fire(e.idx, out);
        }
        self.recycle(entries);
    }

    /// Delivers the node of an entry that has been taken off its list.
    fn fire(&mut self, idx: u32, out: &mut Vec<(TimerKey, T)>) {
        let generation = self.nodes[idx as usize].generation;
        self.len -= 1;
        let value = self.release(idx);
        out.push((TimerKey { idx, generation }, value));
    }

    fn alloc(&mut self, value: T) -> u32 {
        if self.free_head != NIL {
            let idx = self.free_head;
            let node = &mut self.nodes[idx as usize];
            self.free_head = node.pos;
            node.value = Some(value);
            idx
        } else {
            let idx = self.nodes.len();
            assert!(idx < MAX_NODES, "TimerWheel: too many pending timers");
            self.nodes.push(Node {
                value: Some(value),
                generation: NonZeroU32::MIN,
                list: FREE,
                pos: NIL,
            });
            idx as u32
        }
    }

    /// Frees a node whose entry is gone, bumping its generation so keys go stale.
    fn release(&mut self, idx: u32) -> T {
        let node = &mut self.nodes[idx as usize];
        node.generation = node.generation.checked_add(1).unwrap_or(NonZeroU32::MIN);
        node.list = FREE;
        node.pos = self.free_head;
        self.free_head = idx;
        match node.value.take() {
            Some(v) => v,
            // Only pending nodes (with an entry) are released; a free node has no value.
            None => unreachable!("TimerWheel: released a free node"),
        }
    }

    fn push_entry(&mut self, list: u16, e: Entry) {
        let slot = &mut self.slots[list as usize];
        let node = &mut self.nodes[e.idx as usize];
        node.list = list;
        node.pos = slot.entries.len() as u32;
        slot.entries.push(e);
        match list {
            OVERFLOW => self.overflow_min = self.overflow_min.min(e.deadline),
            READY => self.ready_min = self.ready_min.min(e.deadline),
            slot => self.occupied[slot as usize / SLOTS] |= 1 << (slot as usize % SLOTS),
        }
    }

    /// Turns an entry into a hole; empties or compacts the slot when holes dominate.
    fn remove_entry(&mut self, list: u16, pos: usize) {
        let slot = &mut self.slots[list as usize];
        slot.entries[pos].idx = NIL;
        slot.holes += 1;
        let live = slot.entries.len() - slot.holes;
        if live == 0 {
            slot.entries.clear();
            slot.holes = 0;
            match list {
                OVERFLOW => self.overflow_min = u64::MAX,
                READY => self.ready_min = u64::MAX,
                s => self.occupied[s as usize / SLOTS] &= !(1 << (s as usize % SLOTS)),
            }
        } else if slot.holes > live {
            let mut w = 0;
            for r in 0..slot.entries.len() {
                let e = slot.entries[r];
                if e.idx != NIL {
                    slot.entries[w] = e;
                    self.nodes[e.idx as usize].pos = w as u32;
                    w += 1;
                }
            }
            slot.entries.truncate(w);
            slot.holes = 0;
        }
    }

    /// Detaches a list's entries (holes included), leaving it empty.
    fn take_list(&mut self, list: u16) -> Vec<Entry> {
        let slot = &mut self.slots[list as usize];
        slot.holes = 0;
        let entries = mem::replace(&mut slot.entries, mem::take(&mut self.spare));
        if (list as usize) < WHEEL_SLOTS {
            self.occupied[list as usize / SLOTS] &= !(1 << (list as usize % SLOTS));
        }
        entries
    }

    /// Keeps a drained buffer for the next `take_list`, unless it is large.
    fn recycle(&mut self, mut entries: Vec<Entry>) {
        if entries.capacity() <= SPARE_MAX && entries.capacity() > self.spare.capacity() {
            entries.clear();
            self.spare = entries;
        }
    }
}

impl<T> std::fmt::Debug for TimerWheel<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TimerWheel")
            .field("now", &self.now)
            .field("len", &self.len)
            .field("next_deadline", &self.next_deadline())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn drain<T>(w: &mut TimerWheel<T>, now: u64) -> Vec<T> {
        let mut out = Vec::new();
        w.advance(now, &mut out);
        out.into_iter().map(|(_, v)| v).collect()
    }

    /// Tick-by-tick advance, checking each value fires exactly at its deadline.
    fn step_until(w: &mut TimerWheel<u64>, from: u64, to: u64) -> Vec<(u64, u64)> {
        let mut fired = Vec::new();
        let mut out = Vec::new();
        for t in from..=to {
            w.advance(t, &mut out);
            fired.extend(out.drain(..).map(|(_, v)| (t, v)));
        }
        fired
    }

    #[test]
    fn insert_cancel_fire() {
        let mut w = TimerWheel::new(0);
        let a = w.insert(10, "a");
        let b = w.insert(20, "b");
        let _c = w.insert(30, "c");
        assert_eq!(w.len(), 3);
        assert_eq!(w.cancel(b), Some("b"));
        assert_eq!(w.cancel(b), None);
        assert_eq!(w.len(), 2);
        assert_eq!(drain(&mut w, 9), Vec::<&str>::new());
        assert_eq!(w.next_deadline(), Some(10));
        assert_eq!(drain(&mut w, 10), vec!["a"]);
        assert_eq!(w.cancel(a), None, "cancel after fire");
        assert_eq!(drain(&mut w, 1000), vec!["c"]);
        assert!(w.is_empty());
        assert_eq!(w.next_deadline(), None);
        assert_eq!(w.now(), 1000);
    }

    #[test]
    fn past_and_now_deadlines_fire_on_next_advance_in_order() {
        let mut w = TimerWheel::new(100);
        w.insert(100, 3);
        w.insert(50, 1);
        w.insert(99, 2);
        w.insert(50, 11);
        w.insert(101, 4);
        assert_eq!(w.next_deadline(), Some(50));
        // A smaller now does not move time but still fires what is due.
        assert_eq!(drain(&mut w, 7), vec![1, 11, 2, 3]);
        assert_eq!(w.now(), 100);
        assert_eq!(w.next_deadline(), Some(101));
        assert_eq!(drain(&mut w, 101), vec![4]);
    }

    #[test]
    fn fires_exactly_at_deadline_tick_by_tick() {
        let mut w = TimerWheel::new(0);
        let deadlines = [1u64, 2, 63, 64, 65, 127, 128, 4095, 4096, 4097, 5000, 70_000];
        for &d in &deadlines {
            w.insert(d, d);
        }
        let fired = step_until(&mut w, 0, 70_000);
        assert_eq!(fired.len(), deadlines.len());
        for (t, v) in fired {
            assert_eq!(t, v);
        }
    }

    #[test]
    fn cascade_across_every_level() {
        for level in 0..LEVELS as u32 {
            for &start in &[0u64, 1, 63, 12_345, (1 << 36) - 3] {
                let mut w = TimerWheel::new(start);
                let span = 1u64 << (SLOT_BITS * (level + 1));
                let deadlines = [
                    start + (span >> SLOT_BITS).max(1),
                    start + span / 2 + 1,
                    start + span - 1,
                    start + span + 7,
                ];
                for &d in &deadlines {
                    w.insert(d, d);
                }
                let mut fired = Vec::new();
                // Jump from deadline hint to deadline hint, as the runtime does.
                while let Some(next) = w.next_deadline() {
                    let mut out = Vec::new();
                    w.advance(next, &mut out);
                    for (_, d) in out {
                        assert_eq!(d, next, "fired at {next}, deadline {d}");
                        fired.push(d);
                    }
                }
                let mut want = deadlines.to_vec();
                want.sort();
                assert_eq!(fired, want, "level {level} start {start}");
            }
        }
    }

    #[test]
    fn many_deadlines_in_one_slot_keep_insertion_order() {
        let mut w = TimerWheel::new(0);
        for i in 0..10_000u64 {
            w.insert(300_000, i);
        }
        w.insert(299_999, u64::MAX);
        let out = drain(&mut w, 299_999);
        assert_eq!(out, vec![u64::MAX]);
        let out = drain(&mut w, 300_000);
        assert_eq!(out, (0..10_000).collect::<Vec<_>>());
        assert!(w.is_empty());
    }

    #[test]
    fn far_future_deadlines_use_overflow() {
        let mut w = TimerWheel::new(0);
        let top = 1u64 << WHEEL_BITS;
        let deadlines = [
            top - 1,
            top,
            top + 5,
            3 * top + 17,
            u64::MAX / 2,
            u64::MAX - 1,
            u64::MAX,
        ];
        let mut keys = Vec::new();
        for &d in deadlines.iter().rev() {
            keys.push(w.insert(d, d));
        }
        assert_eq!(w.next_deadline(), Some(top - (1 << 30)));
        assert_eq!(drain(&mut w, top - 2), Vec::<u64>::new());
        assert_eq!(drain(&mut w, top), vec![top - 1, top]);
        let mut fired = Vec::new();
        let mut hops = 0;
        while let Some(next) = w.next_deadline() {
            hops += 1;
            assert!(hops < 100, "next_deadline must make progress");
            let mut out = Vec::new();
            w.advance(next, &mut out);
            for (_, d) in out {
                assert_eq!(d, next);
                fired.push(d);
            }
        }
        assert_eq!(fired, deadlines[2..].to_vec());
        assert_eq!(w.now(), u64::MAX);
    }

    #[test]
    fn huge_jump_is_not_linear_in_elapsed_time() {
        let mut w = TimerWheel::new(0);
        w.insert(u64::MAX / 2, 1);
        w.insert(u64::MAX / 2 + 1, 2);
        w.insert(1 << 40, 0);
        // Would take forever if advance walked ticks or 2^36-blocks.
        assert_eq!(drain(&mut w, u64::MAX / 2), vec![0, 1]);
        assert_eq!(drain(&mut w, u64::MAX), vec![2]);
    }

    #[test]
    fn cancel_in_overflow_and_ready_lists() {
        let mut w = TimerWheel::new(10);
        let far = w.insert(u64::MAX / 2, 1);
        let past = w.insert(3, 2);
        let near = w.insert(20, 3);
        assert_eq!(w.cancel(far), Some(1));
        assert_eq!(w.cancel(past), Some(2));
        assert_eq!(w.next_deadline(), Some(20));
        assert_eq!(w.cancel(near), Some(3));
        assert_eq!(w.next_deadline(), None);
        assert!(drain(&mut w, u64::MAX).is_empty());
    }

    #[test]
    fn stale_key_does_not_cancel_reused_node() {
        let mut w = TimerWheel::new(0);
        let k1 = w.insert(5, 1);
        assert_eq!(w.cancel(k1), Some(1));
        let k2 = w.insert(5, 2);
        assert_eq!(k1.idx, k2.idx, "node is reused");
        assert_ne!(k1, k2);
        assert_eq!(w.cancel(k1), None);
        let mut out = Vec::new();
        w.advance(5, &mut out);
        assert_eq!(out, vec![(k2, 2)]);
        let k3 = w.insert(6, 3);
        assert_eq!(k3.idx, k2.idx);
        assert_eq!(w.cancel(k2), None, "fired key is stale");
        assert_eq!(w.cancel(k3), Some(3));
        // A key from another (bigger) wheel is out of range: no panic.
        let mut other = TimerWheel::new(0);
        for i in 0..10 {
            other.insert(1, i);
        }
        let foreign = other.insert(1, 10);
        assert_eq!(w.cancel(foreign), None);
    }

    #[test]
    fn compaction_keeps_order_and_keys() {
        let mut w = TimerWheel::new(0);
        let keys: Vec<_> = (0..1000u64).map(|i| w.insert(500_000, i)).collect();
        // Cancel 3 of every 4: compaction runs several times along the way.
        for (i, k) in keys.iter().enumerate() {
            if i % 4 != 0 {
                assert_eq!(w.cancel(*k), Some(i as u64));
            }
        }
        assert!(w.slots.iter().all(|s| s.holes <= s.entries.len() - s.holes));
        // Surviving keys still cancel the right timer after their entries moved.
        assert_eq!(w.cancel(keys[400]), Some(400));
        assert_eq!(w.cancel(keys[401]), None);
        let want: Vec<u64> = (0..1000).filter(|i| i % 4 == 0 && *i != 400).collect();
        assert_eq!(drain(&mut w, 500_000), want);
        assert!(w.is_empty());
    }

    #[test]
    fn cancel_middle_head_tail_of_a_slot() {
        let mut w = TimerWheel::new(0);
        let keys: Vec<_> = (0..5).map(|i| w.insert(1000, i)).collect();
        assert_eq!(w.cancel(keys[2]), Some(2));
        assert_eq!(w.cancel(keys[0]), Some(0));
        assert_eq!(w.cancel(keys[4]), Some(4));
        assert_eq!(drain(&mut w, 1000), vec![1, 3]);
        let keys: Vec<_> = (0..3).map(|i| w.insert(2000, i)).collect();
        for k in keys {
            w.cancel(k);
        }
        assert_eq!(w.next_deadline(), None, "occupancy bit cleared");
    }

    #[test]
    fn big_jumps_equal_tick_by_tick() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut a = TimerWheel::new(0);
        let mut b = TimerWheel::new(0);
        for i in 0..2000u64 {
            let d = rnd() % 300_000;
            a.insert(d, i);
            b.insert(d, i);
        }
        let ticked: Vec<u64> = step_until(&mut a, 0, 300_000)
            .into_iter()
            .map(|(_, v)| v)
            .collect();
        let mut jumped = Vec::new();
        let mut t = 0;
        while t < 300_000 {
            t = (t + rnd() % 50_000).min(300_000);
            jumped.extend(drain(&mut b, t));
        }
        assert_eq!(ticked.len(), 2000);
        assert_eq!(ticked, jumped);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64),
        Cancel(usize),
        Advance(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => prop_oneof![
                0u64..100,
                0u64..5_000,
                0u64..400_000,
                0u64..(1 << 40),
                Just(u64::MAX / 2),
                (1u64 << 36)..(1u64 << 37),
            ]
            .prop_map(Op::Insert),
            2 => any::<usize>().prop_map(Op::Cancel),
            3 => prop_oneof![0u64..70, 0u64..5_000, 0u64..300_000, 0u64..(1 << 38), Just(u64::MAX / 2)]
                .prop_map(Op::Advance),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn matches_btreemap_model(start in prop_oneof![Just(0u64), 0u64..1_000_000], ops in proptest::collection::vec(op(), 1..200)) {
            let mut w = TimerWheel::new(start);
            let mut model: BTreeMap<(u64, u64), u64> = BTreeMap::new();
            let mut keys: Vec<(TimerKey, (u64, u64))> = Vec::new();
            let mut model_now = start;
            let mut seq = 0u64;
            for op in ops {
                match op {
                    Op::Insert(delta) => {
                        // Deltas relative to now, occasionally in the past.
                        let d = if delta % 7 == 0 { model_now.saturating_sub(delta % 50) } else { model_now.saturating_add(delta) };
                        let k = w.insert(d, seq);
                        model.insert((d, seq), seq);
                        keys.push((k, (d, seq)));
                        seq += 1;
                    }
                    Op::Cancel(i) => {
                        if keys.is_empty() { continue; }
                        let (k, mk) = keys[i % keys.len()];
                        prop_assert_eq!(w.cancel(k), model.remove(&mk));
                    }
                    Op::Advance(delta) => {
                        let now = if delta % 5 == 0 { model_now.saturating_sub(delta) } else { model_now.saturating_add(delta) };
                        model_now = model_now.max(now);
                        let mut out = Vec::new();
                        w.advance(now, &mut out);
                        let mut want = Vec::new();
                        while let Some((&(d, s), _)) = model.first_key_value() {
                            if d > model_now { break; }
                            model.remove(&(d, s));
                            want.push(s);
                        }
                        let got: Vec<u64> = out.iter().map(|&(_, v)| v).collect();
                        prop_assert_eq!(got, want);
                        for (k, _) in out {
                            prop_assert_eq!(w.cancel(k), None);
                        }
                    }
                }
                prop_assert_eq!(w.len(), model.len());
                prop_assert_eq!(w.now(), model_now);
                match (w.next_deadline(), model.first_key_value()) {
                    (None, None) => {}
                    (Some(hint), Some((&(d, _), _))) => prop_assert!(hint <= d, "hint {} > earliest {}", hint, d),
                    (h, m) => prop_assert!(false, "next_deadline {:?} vs model {:?}", h, m),
                }
            }
        }
    }
}
