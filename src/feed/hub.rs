//! The cross-core fan-out: ticks in from any shard, encoded once, out to the shards that
//! have subscribers.
//!
//! Per symbol the hub keeps a small mutex-protected `SymbolState`: the server-wide `seq`,
//! the latest tick (for `snapshot`) and the bitmask of shards with at least one local
//! subscriber. Publishing a tick takes that symbol's lock only: it assigns `seq`, encodes the
//! WebSocket frame once (an `Arc<SharedTick>` every subscriber on every shard writes as is)
//! and pushes it into the lock-free inbox of each interested shard *while still holding the
//! lock*. That last point is what makes `seq` order hold across shards: two publishers on
//! different cores serialise on the symbol, so every inbox receives a symbol's ticks in `seq`
//! order. There is no global lock: different symbols never contend.
//!
//! A shard that subscribes its first local connection to a symbol sets its bit under the same
//! lock and reads the current `seq` as the subscription's baseline, so the subscriber is owed
//! exactly the ticks after it (no duplicate of the snapshot, no false gap).
//!
//! Inboxes are bounded (`crossbeam_queue::ArrayQueue`): a shard that falls that far behind
//! loses ticks instead of growing memory; its subscribers then see a `seq` jump, which the
//! shard reports as `skipped`. Control messages (revocation, drain) travel on a separate
//! unbounded channel so they are never dropped.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use atomic_waker::AtomicWaker;
use bytes::Bytes;
use crossbeam_queue::ArrayQueue;

use crate::auth::revocation::RevokeTarget;
use crate::feed::history::{History, HistoryLimits, Replay};
use crate::feed::outbound::{SharedTick, encode_tick_frame};
use crate::feed::symbol::{SymbolError, SymbolId, SymbolTable};
use crate::feed::tick::{MAX_TICK_JSON_LEN, Tick, TickKind};

/// Ticks queued per shard inbox before the hub starts dropping for that shard.
pub const INBOX_CAPACITY: usize = 1 << 16;

/// Messages for a shard that must not be lost.
#[derive(Debug)]
pub enum Control {
    /// Close every live connection matching the target with `4003`; reply with the count.
    Revoke(RevokeTarget, crossbeam_channel::Sender<usize>),
    /// Stop accepting, close every connection with `1001`.
    Drain,
    /// A `reauth` token verified off the event loop, for connection `(idx, generation)`.
    ReauthDone {
        idx: usize,
        generation: u32,
        id: Option<u64>,
        result: Box<Result<crate::auth::jwt::VerifiedClaims, crate::auth::jwt::AuthError>>,
    },
    /// `[cluster]`: the bus's answer to connection `(idx, generation)`'s `publish`.
    Published {
        idx: usize,
        generation: u32,
        id: Option<u64>,
        result: Result<usize, ()>,
    },
}

/// One shard's inbox: ticks, control messages, and the waker of the shard's dispatcher.
pub struct ShardInbox {
    pub ticks: ArrayQueue<Arc<SharedTick>>,
    pub control_tx: crossbeam_channel::Sender<Control>,
    pub control_rx: crossbeam_channel::Receiver<Control>,
    pub waker: AtomicWaker,
    /// Set by producers when they have pushed since the dispatcher last looked: collapses
    /// a burst of pushes into one cross-thread wake-up.
    pub pending: AtomicBool,
    pub dropped: AtomicU64,
}

impl ShardInbox {
    fn new() -> Self {
        let (control_tx, control_rx) = crossbeam_channel::unbounded();
        ShardInbox {
            ticks: ArrayQueue::new(INBOX_CAPACITY),
            control_tx,
            control_rx,
            waker: AtomicWaker::new(),
            pending: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
        }
    }

    /// Wake the shard's dispatcher unless a wake-up is already on its way.
    pub fn notify(&self) {
        if !self.pending.swap(true, Ordering::AcqRel) {
            self.waker.wake();
        }
    }
}

#[derive(Default)]
struct SymbolState {
    seq: u64,
    last: Option<Arc<SharedTick>>,
    /// The recent ticks `since` replays (empty when `feed.history` is 0).
    history: History,
    shard_mask: u64,
    /// The sweep gave the id back ([`Hub::reclaim_idle`]); the next user of the id either
    /// finds it reused for its name (a fresh symbol) or resolves the name again.
    retired: bool,
    /// A configured symbol (the simulator's): never retired.
    pinned: bool,
    /// `[cluster]`: taken from the bus's head alone; the stream's older history is still
    /// being read ([`Hub::ingest_head_before_history`], [`Hub::backfill_older`]). A
    /// `since` it may reach waits for it.
    backfilling: bool,
}

pub struct Hub {
    symbols: SymbolTable,
    states: Box<[Mutex<SymbolState>]>,
    inboxes: Box<[ShardInbox]>,
    published: AtomicU64,
    history_limits: HistoryLimits,
    /// Every symbol's history together: bytes and ticks held (`/metrics`).
    history_bytes: AtomicU64,
    history_ticks: AtomicU64,
    /// `[cluster]` only: what the shards want from the bus ([`Self::want`],
    /// [`Self::unsubscribe_last`]), for the bus thread ([`Self::take_interest`]).
    interest: std::sync::OnceLock<InterestQueue>,
}

/// A change of this node's interest in a symbol, for the bus thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Interest {
    /// A connection waits for this name: take its head and its live ticks. `history`: one
    /// of the connections asked for `since`, so the stream's history is read before any
    /// live tick (else it is read beside them, [`Hub::backfill_older`]).
    Want { name: Box<str>, history: bool },
    /// The last local subscriber of this symbol left: release it if still unused.
    Release(SymbolId),
}

/// Bounded: when full, changes are dropped and `overflowed` is set, and the bus thread
/// reconciles from the tables instead ([`Hub::wanted_names`], [`Hub::has_interest`]).
pub struct InterestQueue {
    queue: ArrayQueue<Interest>,
    overflowed: AtomicBool,
    wake: Box<dyn Fn() + Send + Sync>,
}

/// Interest changes queued for the bus thread before it reconciles instead.
pub const INTEREST_CAPACITY: usize = 1 << 14;

/// What became of a tick from the bus ([`Hub::ingest_ordered`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ingested {
    /// Fanned out to the interested shards (or, for a head, set as the baseline).
    Accepted,
    /// At or below the newest `seq` this node has (a duplicate, or older than the head).
    Stale,
    /// No connection on this node wants the symbol.
    NoInterest,
    /// The symbol table is full.
    TableFull,
}

/// What a shard gets back when it subscribes its first (or any) local connection.
pub struct Baseline {
    /// The subscriber is owed ticks with `seq > baseline`.
    pub seq: u64,
    pub snapshot: Option<Arc<SharedTick>>,
    /// With `since`: what to queue before the live stream (read with `seq`, under the
    /// symbol's lock, so the two meet with no gap and no duplicate).
    pub replay: Option<Replay>,
    /// With `since` from before what is held while the bus's history of the symbol is
    /// still being read: no replay yet; the subscription waits for the marker
    /// [`Hub::backfill_older`] sends ([`SharedTick::prime`], the newest tick).
    pub backfilling: bool,
}

impl Hub {
    pub fn new(shards: usize, max_symbols: usize) -> Self {
        let states = (0..max_symbols)
            .map(|_| Mutex::new(SymbolState::default()))
            .collect();
        let inboxes = (0..shards.max(1)).map(|_| ShardInbox::new()).collect();
        Hub {
            symbols: SymbolTable::new(max_symbols),
            states,
            inboxes,
            published: AtomicU64::new(0),
            history_limits: HistoryLimits::OFF,
            history_bytes: AtomicU64::new(0),
            history_ticks: AtomicU64::new(0),
            interest: std::sync::OnceLock::new(),
        }
    }

    /// Keeps the recent ticks of every symbol for `since` (PROTOCOL.md section 10).
    pub fn with_history(mut self, limits: HistoryLimits) -> Self {
        self.history_limits = limits;
        self
    }

    pub fn history_limits(&self) -> &HistoryLimits {
        &self.history_limits
    }

    /// Bytes and ticks every symbol's history holds.
    pub fn history_held(&self) -> (u64, u64) {
        (
            self.history_bytes.load(Ordering::Relaxed),
            self.history_ticks.load(Ordering::Relaxed),
        )
    }

    /// Keeps `t` in its symbol's history (under the symbol's lock) and accounts for it.
    fn remember(&self, st: &mut SymbolState, t: &Arc<SharedTick>) {
        if self.history_limits.depth == 0 {
            return;
        }
        let before = st.history.len();
        let total = self.history_bytes.load(Ordering::Relaxed);
        let d = st.history.push(t.clone(), &self.history_limits, total);
        self.account(d, st.history.len() as i64 - before as i64);
    }

    fn account(&self, bytes: i64, ticks: i64) {
        add_signed(&self.history_bytes, bytes);
        add_signed(&self.history_ticks, ticks);
    }

    /// Empties a symbol's state (retired), giving its history's memory back.
    fn reset_state(&self, st: &mut SymbolState, retired: bool) {
        let n = st.history.len() as i64;
        let b = st.history.clear();
        self.account(-(b as i64), -n);
        *st = SymbolState {
            retired,
            ..SymbolState::default()
        };
    }

    /// Frees what is past `feed.history_age` in symbols `from..from + budget` (a slice per
    /// call, like [`Self::reclaim_idle`]); a symbol that stopped ticking gives its
    /// history back. Returns where the next call starts.
    pub fn expire_history(&self, mono_ns: u64, from: usize, budget: usize) -> usize {
        if self.history_limits.depth == 0 {
            return 0;
        }
        let slots = self.symbols.slots().min(self.states.len());
        let from = if from >= slots { 0 } else { from };
        let to = from.saturating_add(budget).min(slots);
        for state in &self.states[from..to] {
            let mut st = lock(state);
            let n = st.history.len();
            let freed = st.history.expire(mono_ns, self.history_limits.age_ns);
            if freed > 0 {
                let gone = n - st.history.len();
                self.account(-(freed as i64), -(gone as i64));
            }
        }
        to
    }

    /// The replay owed to a subscriber of `id` that processed `since`, up to `head` (the
    /// tick its live stream starts after), or `None` when the symbol is not live. For a
    /// connection activated by a bus head ([`SharedTick::prime`]) after waiting.
    /// `budget`: the subscriber's outbound bound in bytes ([`History::replay`]).
    pub fn replay(&self, id: SymbolId, since: u64, head: &Arc<SharedTick>, budget: usize) -> Option<Replay> {
        let (_, _, st) = self.lock_live(id, false)?;
        Some(st.history.replay(
            since,
            head.seq,
            Some(head),
            crate::metrics::mono_ns(),
            self.history_limits.age_ns,
            budget,
        ))
    }

    /// `[cluster]`: from now on interest changes are queued for the bus thread, which
    /// `wake` wakes. Once; later calls are ignored.
    pub fn enable_interest(&self, wake: Box<dyn Fn() + Send + Sync>) {
        let _ = self.interest.set(InterestQueue {
            queue: ArrayQueue::new(INTEREST_CAPACITY),
            overflowed: AtomicBool::new(false),
            wake,
        });
    }

    fn note_interest(&self, i: Interest) {
        if let Some(q) = self.interest.get() {
            if q.queue.push(i).is_err() {
                q.overflowed.store(true, Ordering::Release);
            }
            (q.wake)();
        }
    }

    /// A connection waits for `name` (it does not exist on this node yet); `since`: it
    /// asked to resume after a `seq` ([`Interest::Want`]).
    pub fn want(&self, name: &str, since: bool) {
        if self.interest.get().is_some() {
            self.note_interest(Interest::Want {
                name: Box::from(name),
                history: since,
            });
        }
    }

    /// The queued interest changes, and whether some were dropped since the last call
    /// (then reconcile from [`Self::wanted_names`] and [`Self::has_interest`]).
    pub fn take_interest(&self, out: &mut Vec<Interest>, max: usize) -> bool {
        let Some(q) = self.interest.get() else {
            return false;
        };
        while out.len() < max {
            match q.queue.pop() {
                Some(i) => out.push(i),
                None => break,
            }
        }
        q.overflowed.swap(false, Ordering::AcqRel)
    }

    /// Names some shard waits for (bounded by the connections' own subscription bounds).
    pub fn wanted_names(&self) -> Vec<Box<str>> {
        self.symbols.waiting_names()
    }

    /// Some shard subscribes to `name`, waits for it, or was handed it.
    pub fn has_interest(&self, name: &str) -> bool {
        if self.symbols.is_waited(name) {
            return true;
        }
        let Some(id) = self.symbols.lookup(name) else {
            return false;
        };
        self.state(id).is_some_and(|s| lock(s).shard_mask != 0) || self.symbols.has_handoff(id)
    }

    /// A tick from the bus with its cluster-wide `seq` (`[cluster]`). Delivered only when
    /// newer than everything this node has for the symbol (never a `seq` twice or
    /// backwards); a jump shows as `skipped` to subscribers. `head`: the symbol's newest
    /// tick, read when this node took interest: it becomes the baseline and the snapshot,
    /// and is delivered to no one.
    pub fn ingest_ordered(&self, name: &str, seq: u64, tick: &Tick, head: bool) -> Ingested {
        let mut wake = 0;
        let r = self.ingest_ordered_deferred(name, seq, tick, head, &mut wake);
        self.wake_shards(wake);
        r
    }

    /// [`Self::ingest_ordered`] without waking anyone: the shards to wake are ORed into
    /// `wake`, for the caller to wake once for a whole batch ([`Self::wake_shards`]). A
    /// shard woken per tick runs per tick; one woken per batch writes each subscriber's
    /// share of the batch at once.
    pub fn ingest_ordered_deferred(
        &self,
        name: &str,
        seq: u64,
        tick: &Tick,
        head: bool,
        wake: &mut u64,
    ) -> Ingested {
        let id = match self.bus_symbol(name) {
            Ok(id) => id,
            Err(r) => return r,
        };
        let Some((id, name, mut st)) = self.lock_live(id, true) else {
            return Ingested::TableFull;
        };
        let handoff = self.symbols.take_handoff(id);
        st.shard_mask |= handoff;
        if seq <= st.seq {
            // Shards handed the symbol just now still get the head they wait for.
            if handoff != 0
                && let Some(last) = st.last.clone()
            {
                self.push_to(handoff, &as_prime(&last));
                *wake |= handoff;
            }
            return Ingested::Stale;
        }
        st.seq = seq;
        let shared = stamp(id, name, seq, tick, crate::metrics::mono_ns(), head);
        let mask = st.shard_mask;
        self.push_to(mask, &shared);
        self.remember(&mut st, &shared);
        st.last = Some(shared);
        drop(st);
        if !head {
            self.published.fetch_add(1, Ordering::Relaxed);
        }
        *wake |= mask;
        Ingested::Accepted
    }

    /// The symbol a tick from the bus is for: one that exists, or one a shard waits for
    /// (created now); else why it is not taken.
    fn bus_symbol(&self, name: &str) -> Result<SymbolId, Ingested> {
        match self.symbols.lookup(name) {
            Some(id) => Ok(id),
            None if self.symbols.is_waited(name) => {
                self.symbols.intern(name).map_err(|_| Ingested::TableFull)
            }
            None => Err(Ingested::NoInterest),
        }
    }

    /// `[cluster]`: what the bus's stream still holds of a symbol this node just took
    /// interest in, oldest first, each with its `seq` and how long ago (ns) the bus took
    /// it. Kept as the symbol's history (so `since` reaches back as far as the cluster's
    /// history does), and the newest becomes the head ([`SharedTick::prime`]): the
    /// baseline and snapshot of the subscribers waiting for it, delivered to no one.
    /// Ticks at or below what the node has are skipped.
    pub fn backfill(&self, name: &str, ticks: &[(u64, Tick, u64)]) -> Ingested {
        let Some(&(last_seq, ref last_tick, _)) = ticks.last() else {
            return Ingested::Stale;
        };
        let id = match self.bus_symbol(name) {
            Ok(id) => id,
            Err(r) => return r,
        };
        let Some((id, arc_name, mut st)) = self.lock_live(id, true) else {
            return Ingested::TableFull;
        };
        if last_seq <= st.seq {
            drop(st);
            // Nothing newer: the head path still hands waiting shards their baseline.
            return self.ingest_ordered(name, last_seq, last_tick, true);
        }
        let now = crate::metrics::mono_ns();
        for (seq, tick, ago_ns) in &ticks[..ticks.len() - 1] {
            if *seq <= st.seq {
                continue;
            }
            let t = stamp(
                id,
                arc_name.clone(),
                *seq,
                tick,
                now.saturating_sub(*ago_ns),
                false,
            );
            self.remember(&mut st, &t);
            st.seq = *seq;
            st.last = Some(t);
        }
        drop(st);
        self.ingest_ordered(name, last_seq, last_tick, true)
    }

    /// `[cluster]`: the stream's history of a symbol this node took interest in from its
    /// head alone (no subscriber asked for `since`), read while the live ticks already
    /// flowed: the run that ends right before the oldest tick kept goes in front of the
    /// symbol's history, within `feed.history`, `feed.history_age` and the byte budget, so
    /// a later `since` reaches back as far as the cluster's history. Returns how many were
    /// taken (none when the symbol is gone, or the run does not meet what is kept).
    /// Ends the read either way (also with no tick, when it failed): the subscriptions
    /// with `since` that waited for it get a marker, the newest tick as a
    /// [`SharedTick::prime`], and are replayed up to it.
    pub fn backfill_older(&self, name: &str, ticks: &[(u64, Tick, u64)]) -> u64 {
        let Some(id) = self.symbols.lookup(name) else {
            return 0;
        };
        let Some((id, arc_name, mut st)) = self.lock_live(id, false) else {
            return 0;
        };
        let mut taken = 0;
        if self.history_limits.depth > 0 && !ticks.is_empty() {
            let now = crate::metrics::mono_ns();
            let oldest = st.history.oldest_seq().unwrap_or(u64::MAX);
            let older: Vec<Arc<SharedTick>> = ticks
                .iter()
                .filter(|(seq, _, _)| *seq < oldest)
                .map(|(seq, tick, ago_ns)| {
                    stamp(
                        id,
                        arc_name.clone(),
                        *seq,
                        tick,
                        now.saturating_sub(*ago_ns),
                        false,
                    )
                })
                .collect();
            let before = st.history.len();
            let total = self.history_bytes.load(Ordering::Relaxed);
            let added = st.history.prepend(&older, &self.history_limits, total, now);
            taken = st.history.len() - before;
            self.account(added as i64, taken as i64);
        }
        // Then the marker, with the history complete.
        let mut mask = 0;
        if std::mem::take(&mut st.backfilling)
            && let Some(last) = &st.last
        {
            mask = st.shard_mask;
            self.push_to(mask, &as_prime(last));
        }
        drop(st);
        self.wake_shards(mask);
        taken as u64
    }

    /// `[cluster]`: [`Self::ingest_ordered`] of a bus head when the symbol's history is
    /// to be read after it, beside the live ticks: until [`Self::backfill_older`] a
    /// `since` that reaches back past what is held waits instead of being reset.
    pub fn ingest_head_before_history(&self, name: &str, seq: u64, tick: &Tick) -> Ingested {
        if self.history_limits.depth > 0
            && let Ok(id) = self.bus_symbol(name)
            && let Some((_, _, mut st)) = self.lock_live(id, true)
        {
            st.backfilling = true;
        }
        let r = self.ingest_ordered(name, seq, tick, true);
        if let Some(id) = self.symbols.lookup(name)
            && let Some(state) = self.state(id)
        {
            // No head taken after all: nothing for a marker to carry, nothing to wait for.
            let mut st = lock(state);
            if st.last.is_none() {
                st.backfilling = false;
            }
        }
        r
    }

    /// The symbol's bus history is still being read ([`Self::ingest_head_before_history`]).
    pub fn backfilling(&self, id: SymbolId) -> bool {
        self.state(id).is_some_and(|s| lock(s).backfilling)
    }

    fn push_to(&self, mask: u64, t: &Arc<SharedTick>) {
        let mut m = mask;
        while m != 0 {
            let shard = m.trailing_zeros() as usize;
            m &= m - 1;
            if let Some(inbox) = self.inboxes.get(shard)
                && inbox.ticks.push(t.clone()).is_err()
            {
                inbox.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Wake the shards in `mask` (also a batch's worth from
    /// [`Self::ingest_ordered_deferred`]).
    pub fn wake_shards(&self, mask: u64) {
        let mut m = mask;
        while m != 0 {
            let shard = m.trailing_zeros() as usize;
            m &= m - 1;
            if let Some(inbox) = self.inboxes.get(shard) {
                inbox.notify();
            }
        }
    }

    /// The newest `seq` this node has for `name` (0: none).
    pub fn seq_of(&self, name: &str) -> u64 {
        self.symbols
            .lookup(name)
            .and_then(|id| self.state(id))
            .map_or(0, |s| lock(s).seq)
    }

    /// `[cluster]`: gives `id` back when no shard subscribes to it or waits for it any
    /// more, so the next subscriber waits for a fresh head from the bus. True when it was
    /// released (the bus thread then drops its subscription).
    pub fn release(&self, id: SymbolId, now_ms: u64) -> bool {
        let Some(state) = self.state(id) else { return false };
        let mut st = lock(state);
        if st.retired || st.pinned || st.shard_mask != 0 {
            return false;
        }
        if self.symbols.retire(id, now_ms) {
            self.reset_state(&mut st, true);
            return true;
        }
        false
    }

    pub fn symbols(&self) -> &SymbolTable {
        &self.symbols
    }

    pub fn intern(&self, name: &str) -> Result<SymbolId, SymbolError> {
        self.symbols.intern(name)
    }

    pub fn inbox(&self, shard: usize) -> &ShardInbox {
        &self.inboxes[shard % self.inboxes.len()]
    }

    pub fn shards(&self) -> usize {
        self.inboxes.len()
    }

    pub fn published_total(&self) -> u64 {
        self.published.load(Ordering::Relaxed)
    }

    fn state(&self, id: SymbolId) -> Option<&Mutex<SymbolState>> {
        self.states.get(id.0 as usize)
    }

    /// The state of `id`, locked, once it is live: a retired id that the table reused for
    /// its current name starts afresh; one still in quarantine hands over to the name's
    /// new id when `follow` (a publish), else there is none (a subscribe falls back to
    /// waiting for the name).
    fn lock_live(
        &self,
        id: SymbolId,
        follow: bool,
    ) -> Option<(SymbolId, Arc<str>, std::sync::MutexGuard<'_, SymbolState>)> {
        let mut id = id;
        for _ in 0..2 {
            let (state, name) = (self.state(id)?, self.symbols.name(id)?);
            let mut st = lock(state);
            if !st.retired {
                return Some((id, name, st));
            }
            if self.symbols.lookup(&name) == Some(id) {
                self.reset_state(&mut st, false);
                return Some((id, name, st));
            }
            drop(st);
            if !follow {
                return None;
            }
            id = self.symbols.intern(&name).ok()?;
        }
        None
    }

    /// A configured symbol: never retired by [`Self::reclaim_idle`].
    pub fn pin(&self, id: SymbolId) {
        if let Some(state) = self.state(id) {
            lock(state).pinned = true;
        }
    }

    /// Retires idle symbols among ids `from..from + budget` (the caller walks the table a
    /// slice per call, so no call holds a shard for long): no shard subscribed, no shard
    /// waiting for a first tick, not pinned, and no tick accepted for `idle_ns` (monotonic
    /// clock). Returns where the next call starts and how many were retired.
    pub fn reclaim_idle(
        &self,
        now_ms: u64,
        mono_ns: u64,
        idle_ns: u64,
        from: usize,
        budget: usize,
    ) -> (usize, usize) {
        let slots = self.symbols.slots().min(self.states.len());
        let from = if from >= slots { 0 } else { from };
        let to = from.saturating_add(budget).min(slots);
        let mut retired = 0;
        for i in from..to {
            let mut st = lock(&self.states[i]);
            if st.retired || st.pinned || st.shard_mask != 0 {
                continue;
            }
            let idle = st
                .last
                .as_ref()
                .is_none_or(|t| mono_ns.saturating_sub(t.accepted_ns) >= idle_ns);
            if idle && self.symbols.retire(SymbolId(i as u32), now_ms) {
                self.reset_state(&mut st, true);
                retired += 1;
            }
        }
        (to, retired)
    }

    /// Stamp, encode once and fan out a validated batch. Returns how many ticks went out.
    pub fn publish(&self, batch: &[(SymbolId, Tick)]) -> usize {
        let mut wake_mask = 0u64;
        let mut count = 0;
        let accepted_ns = crate::metrics::mono_ns();
        for (id, tick) in batch {
            let Some((id, name, mut st)) = self.lock_live(*id, true) else {
                continue;
            };
            // Shards whose connections subscribed before the symbol existed get its first
            // tick (and every later one) like any subscribed shard.
            st.shard_mask |= self.symbols.take_handoff(id);
            st.seq += 1;
            let seq = st.seq;
            let shared = stamp(id, name, seq, tick, accepted_ns, false);
            let mask = st.shard_mask;
            self.push_to(mask, &shared);
            self.remember(&mut st, &shared);
            st.last = Some(shared);
            drop(st);
            wake_mask |= mask;
            count += 1;
        }
        self.published.fetch_add(count as u64, Ordering::Relaxed);
        self.wake_shards(wake_mask);
        count
    }

    /// A shard subscribes a connection. `first_on_shard` sets the shard's bit. `None`:
    /// the symbol was retired since the connection looked it up (it must wait for the name
    /// instead).
    /// With `since` the baseline comes with the [`Replay`] of the ticks after it, cut to
    /// `budget` bytes of frames (the subscriber's outbound bound, [`History::replay`]).
    pub fn subscribe(
        &self,
        shard: usize,
        id: SymbolId,
        first_on_shard: bool,
        since: Option<(u64, usize)>,
    ) -> Option<Baseline> {
        let (_, _, mut st) = self.lock_live(id, false)?;
        if first_on_shard && shard < 64 {
            st.shard_mask |= 1 << shard;
        }
        if let Some((since, _)) = since
            && st.backfilling
            && st
                .history
                .oldest_seq()
                .is_none_or(|o| since.saturating_add(1) < o)
        {
            return Some(Baseline {
                seq: st.seq,
                snapshot: None,
                replay: None,
                backfilling: true,
            });
        }
        let replay = since.map(|(since, budget)| {
            st.history.replay(
                since,
                st.seq,
                st.last.as_ref(),
                crate::metrics::mono_ns(),
                self.history_limits.age_ns,
                budget,
            )
        });
        Some(Baseline {
            seq: st.seq,
            snapshot: st.last.clone(),
            replay,
            backfilling: false,
        })
    }

    /// The shard's last local subscriber of `id` left.
    pub fn unsubscribe_last(&self, shard: usize, id: SymbolId) {
        if let Some(state) = self.state(id)
            && shard < 64
        {
            let mut st = lock(state);
            st.shard_mask &= !(1 << shard);
            if st.shard_mask == 0 && self.interest.get().is_some() {
                drop(st);
                self.note_interest(Interest::Release(id));
            }
        }
    }

    /// Latest tick of a symbol, if any.
    pub fn latest(&self, id: SymbolId) -> Option<Arc<SharedTick>> {
        self.state(id).and_then(|s| lock(s).last.clone())
    }

    /// Send a control message to every shard and wake them.
    pub fn broadcast(&self, make: impl Fn() -> Control) {
        for inbox in self.inboxes.iter() {
            let _ = inbox.control_tx.send(make());
            inbox.notify();
        }
    }
}

fn add_signed(a: &AtomicU64, d: i64) {
    if d >= 0 {
        a.fetch_add(d as u64, Ordering::Relaxed);
    } else {
        a.fetch_sub(d.unsigned_abs(), Ordering::Relaxed);
    }
}

/// A poisoned symbol lock only means another thread panicked while holding it; the state
/// (a counter and an `Arc`) is still consistent, so keep serving.
fn lock(m: &Mutex<SymbolState>) -> std::sync::MutexGuard<'_, SymbolState> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A tick in the order with its `seq`, its frame encoded once for every subscriber.
/// A copy of `t` that is a head: a baseline or a marker, delivered to no one
/// ([`SharedTick::prime`]).
fn as_prime(t: &SharedTick) -> Arc<SharedTick> {
    Arc::new(SharedTick {
        prime: true,
        ..t.clone()
    })
}

fn stamp(
    id: SymbolId,
    name: Arc<str>,
    seq: u64,
    tick: &Tick,
    accepted_ns: u64,
    prime: bool,
) -> Arc<SharedTick> {
    Arc::new(SharedTick {
        symbol: id,
        seq,
        frame: tick_frame(TickKind::Tick, &name, seq, tick, 0),
        tick: *tick,
        name,
        accepted_ns,
        prime,
        deflated: std::sync::OnceLock::new(),
    })
}

/// A tick's WebSocket frame, encoded in one pass into one allocation.
fn tick_frame(kind: TickKind, name: &str, seq: u64, tick: &Tick, skipped: u64) -> Bytes {
    let mut v = Vec::with_capacity(MAX_TICK_JSON_LEN + 10);
    encode_tick_frame(kind, name, seq, tick, skipped, &mut v);
    Bytes::from(v)
}

/// The frame of a tick re-encoded for one subscriber (snapshot, or a tick after a gap).
pub fn encode_for_subscriber(kind: TickKind, t: &SharedTick, skipped: u64) -> Bytes {
    tick_frame(kind, &t.name, t.seq, &t.tick, skipped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tick(p: f64) -> Tick {
        Tick {
            ts: 1,
            bid: p,
            ask: p + 1.0,
            last: p,
            qty: 1.0,
        }
    }

    /// `[cluster]`: ticks from the bus are pushed at once but each shard is woken once for
    /// the whole batch, by whoever ends the batch.
    #[test]
    fn a_batch_of_bus_ticks_wakes_each_shard_once_at_its_end() {
        let hub = Hub::new(2, 16);
        let a = hub.intern("A").unwrap();
        let b = hub.intern("B").unwrap();
        hub.subscribe(0, a, true, None).unwrap();
        hub.subscribe(0, b, true, None).unwrap();
        hub.subscribe(1, b, true, None).unwrap();
        let mut wake = 0;
        for seq in 1..=3 {
            for name in ["A", "B"] {
                let r = hub.ingest_ordered_deferred(name, seq, &tick(1.0), false, &mut wake);
                assert_eq!(r, Ingested::Accepted);
            }
        }
        assert_eq!(wake, 0b11);
        assert_eq!(hub.inboxes[0].ticks.len(), 6);
        assert_eq!(hub.inboxes[1].ticks.len(), 3);
        assert!(
            hub.inboxes.iter().all(|i| !i.pending.load(Ordering::Acquire)),
            "nobody woken mid-batch"
        );
        hub.wake_shards(wake);
        assert!(hub.inboxes.iter().all(|i| i.pending.load(Ordering::Acquire)));
        // A stale tick wakes nobody.
        let mut again = 0;
        assert_eq!(
            hub.ingest_ordered_deferred("A", 2, &tick(1.0), false, &mut again),
            Ingested::Stale
        );
        assert_eq!(again, 0);
    }

    /// Issue 14, hole 5 (the publisher's side): a symbol with no subscriber and no recent
    /// tick gives its entry back, a later tick creates it afresh, a stale id follows its
    /// name, and the id is reused only after the quarantine. Time is virtual: the sweep is
    /// given the monotonic "now" and the idle threshold.
    #[test]
    fn idle_symbols_are_retired_and_their_ids_reused_after_quarantine() {
        let hub = Hub::new(2, 5);
        let ids: Vec<SymbolId> = ["A", "B", "C", "D", "X"]
            .iter()
            .map(|n| hub.intern(n).unwrap())
            .collect();
        hub.publish(&[(ids[0], tick(1.0)), (ids[1], tick(1.0))]);
        assert_eq!(hub.intern("E"), Err(SymbolError::TableFull));
        // B has a subscriber, C is pinned (configured): neither ever goes.
        hub.subscribe(0, ids[1], true, None).unwrap();
        hub.pin(ids[2]);
        let now_ms = 1_000_000;
        let t_a = hub.latest(ids[0]).unwrap().accepted_ns;
        // An hour's threshold, a minute after A's tick: only what never had a tick goes
        // (D and X, interned by publishes that never went through).
        let hour = 3_600 * 1_000_000_000;
        let (next, retired) = hub.reclaim_idle(now_ms, t_a + 60_000_000_000, hour, 0, 16);
        assert_eq!((next, retired), (5, 2));
        assert_eq!(hub.symbols().lookup("D"), None);
        assert_eq!(hub.symbols().lookup("X"), None);
        assert!(hub.symbols().lookup("A").is_some());
        // Past the threshold A goes too.
        let (_, retired) = hub.reclaim_idle(now_ms, t_a + hour, hour, 0, 16);
        assert_eq!(retired, 1);
        assert_eq!(hub.symbols().len(), 2);
        // A stale subscribe to a retired id is refused (the shard then waits for the name).
        assert!(hub.subscribe(1, ids[0], true, None).is_none());
        // A stale publish follows the name; the table is full (5 slots, 3 in quarantine)...
        assert_eq!(hub.publish(&[(ids[0], tick(2.0))]), 0);
        assert_eq!(hub.intern("E"), Err(SymbolError::TableFull));
        // ...until the quarantine is over: then ids are reused, as fresh symbols.
        hub.symbols().recycle(now_ms + crate::feed::symbol::QUARANTINE_MS);
        assert_eq!(hub.publish(&[(ids[0], tick(2.0))]), 1);
        let a2 = hub.symbols().lookup("A").unwrap();
        assert_eq!(hub.latest(a2).unwrap().seq, 1, "a new symbol starts at seq 1");
        let e = hub.intern("E").unwrap();
        assert!([ids[0], ids[3], ids[4]].contains(&e), "a recycled id");
        assert!(hub.latest(e).is_none(), "no tick of the old symbol");
        hub.publish(&[(e, tick(3.0))]);
        assert_eq!(hub.latest(e).unwrap().seq, 1);
        assert_eq!(hub.latest(e).unwrap().name.as_ref(), "E");
        assert_eq!(hub.symbols().len(), 4);
    }

    #[test]
    fn seq_is_per_symbol_and_reaches_only_subscribed_shards() {
        let hub = Hub::new(3, 16);
        let a = hub.intern("BTC-USD").unwrap();
        let b = hub.intern("ETH-USD").unwrap();
        let base = hub.subscribe(1, a, true, None).unwrap();
        assert_eq!(base.seq, 0);
        assert!(base.snapshot.is_none());
        assert_eq!(hub.publish(&[(a, tick(1.0)), (b, tick(2.0)), (a, tick(3.0))]), 3);
        assert!(hub.inbox(0).ticks.is_empty());
        assert!(hub.inbox(2).ticks.is_empty());
        let got: Vec<u64> = std::iter::from_fn(|| hub.inbox(1).ticks.pop())
            .map(|t| t.seq)
            .collect();
        assert_eq!(got, vec![1, 2]);
        let snap = hub.subscribe(2, b, true, None).unwrap();
        assert_eq!(snap.seq, 1);
        assert_eq!(snap.snapshot.unwrap().tick.bid, 2.0);
        hub.unsubscribe_last(1, a);
        hub.publish(&[(a, tick(4.0))]);
        assert!(hub.inbox(1).ticks.is_empty());
        assert_eq!(hub.latest(a).unwrap().seq, 3);
    }

    #[test]
    fn concurrent_publishers_keep_seq_order_per_inbox() {
        let hub = Arc::new(Hub::new(2, 4));
        let a = hub.intern("BTC-USD").unwrap();
        hub.subscribe(0, a, true, None);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let hub = hub.clone();
                std::thread::spawn(move || {
                    for i in 0..2000 {
                        hub.publish(&[(a, tick(i as f64))]);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let seqs: Vec<u64> = std::iter::from_fn(|| hub.inbox(0).ticks.pop())
            .map(|t| t.seq)
            .collect();
        assert_eq!(seqs.len(), 8000);
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1));
    }

    #[test]
    fn frame_is_a_text_frame_holding_the_json() {
        let hub = Hub::new(1, 4);
        let a = hub.intern("BTC-USD").unwrap();
        hub.subscribe(0, a, true, None);
        hub.publish(&[(a, tick(1.5))]);
        let t = hub.inbox(0).ticks.pop().unwrap();
        assert_eq!(t.frame[0], 0x81);
        let len = t.frame[1] as usize;
        let json: serde_json::Value = serde_json::from_slice(&t.frame[2..2 + len]).unwrap();
        assert_eq!(json["type"], "tick");
        assert_eq!(json["s"], "BTC-USD");
        assert_eq!(json["seq"], 1);
        assert_eq!(json["bid"], 1.5);
    }
}
