//! One shard: a monoio runtime on its own pinned thread, with its own `SO_REUSEPORT`
//! listener, its connections, its subscription table and its timer wheel.
//!
//! Three kinds of tasks run on a shard:
//! - the **acceptor**, which spawns a connection task per accepted socket;
//! - the **dispatcher**, which drains the shard's hub inbox (ticks and control messages)
//!   and appends each tick's shared frame to the outbound queue of every local subscriber,
//!   then wakes their writers; since it drains everything available before yielding, the
//!   writers that run next find many frames and write them with one `write` each;
//! - the **ticker**, which advances the timer wheel and fires connection deadlines
//!   (handshake timeout, reauth, heartbeat, idle, slow consumer, hard drop) and does the
//!   periodic housekeeping. There is no timer task per connection.
//!
//! Connection tasks (see `conn.rs`) share the shard state through `Rc<ShardCtx>`; nothing
//! here is `Send`, and no borrow of a `RefCell` is ever held across an `.await`.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use slab::Slab;

use crate::auth::seclog::SecurityEvent;
use crate::feed::hub::{Control, encode_for_subscriber};
use crate::feed::outbound::SharedTick;
use crate::feed::symbol::{SymbolId, Wait};
use crate::feed::tick::TickKind;
use crate::gate::pending::{Admission, PendingLimits, PendingTable};
use crate::proto::close::CloseCode;
use crate::proto::frame::Decoder;
use crate::session::{Action, Session, TimerKind};
use crate::state::Shared;
use crate::timer::deadlines::DeadlineSet;
use crate::timer::wheel::{TimerKey, TimerWheel};

/// Timers the shard keeps per connection, one slot each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RtTimer {
    Session(TimerKind),
    Handshake,
    /// After a close frame was queued: the peer gets this long to answer before the socket
    /// is shut down regardless.
    HardDrop,
}

/// The connection's deadline kinds, in slot order: `RT_TIMERS[k.slot()] == k`.
const RT_TIMERS: [RtTimer; TIMER_SLOTS] = [
    RtTimer::Session(TimerKind::ReauthRequired),
    RtTimer::Session(TimerKind::ReauthDeadline),
    RtTimer::Session(TimerKind::Heartbeat),
    RtTimer::Session(TimerKind::Idle),
    RtTimer::Session(TimerKind::SlowConsumer),
    RtTimer::Handshake,
    RtTimer::HardDrop,
];

impl RtTimer {
    fn slot(self) -> usize {
        RT_TIMERS
            .iter()
            .position(|&k| k == self)
            .expect("every kind has a slot")
    }
}

const TIMER_SLOTS: usize = 7;
const HARD_DROP_MS: u64 = 2_000;
/// Ticks dispatched before the dispatcher yields so writers and readers get their turn.
const DISPATCH_BUDGET: usize = 8192;

/// Timer events fired, and control messages (reauth results, ...) handled, per loop
/// turn before the task yields. Deadlines cluster: 10,000 tokens minted in the same
/// second reach `exp - reauth_lead` in the same millisecond, and their reauth results
/// come back together. Handled in one go, that is 10,000 messages queued and 10,000
/// writes submitted before the dispatcher runs again, and every tick behind them waited
/// (a 30 ms p99 spike with 10,000 connections). In slices, ticks interleave; the burst
/// itself is spread over a few more milliseconds, far inside any reauth lead time.
const BURST_SLICE: usize = 64;

/// A connection's wheel entry: it stands for the earliest of the connection's deadlines.
#[derive(Clone, Copy, Debug)]
pub struct TimerEvent {
    /// The connection's slab index: below `max_connections_per_shard` (at most 10^6), so
    /// 32 bits, which keeps a wheel node at 24 bytes.
    idx: u32,
    generation: u32,
}

/// A connection slot. `session` is `None` during the HTTP phase.
pub struct Conn {
    pub generation: u32,
    pub fd: RawFd,
    pub session: Option<Session>,
    pub decoder: Option<Decoder>,
    /// The TLS state machine (TLS listener only), moved in after the `101`: the reader
    /// decrypts through it before the frame decoder, the writer encrypts through it after
    /// draining the session's queue.
    pub tls: Option<Box<rustls::ServerConnection>>,
    /// The start of a frame split across reads (boxed: most connections never hold one).
    pub rx_partial: Option<Box<Vec<u8>>>,
    /// The writer's socket handle while no writer task runs. Writers run on demand: an
    /// idle connection has no writer task (and none of its ~0.6 KiB future); queuing
    /// output spawns one ([`ShardCtx::kick`]), and it parks the handle here again once
    /// the queue is empty.
    pub(crate) whandle: Option<crate::rt::conn::WriteHandle>,
    /// The writer must stop (socket broken or connection finished).
    pub dead: bool,
    /// The peer's close frame arrived.
    pub peer_closed: bool,
    /// Tasks still running for this connection (reader, writer).
    pub tasks: u8,
    /// The connection's deadlines, by [`RtTimer::slot`], behind one wheel entry.
    deadlines: DeadlineSet<TIMER_SLOTS>,
    pub slot: Option<crate::auth::usercap::UserSlot>,
}

struct SubEntry {
    idx: usize,
    generation: u32,
    /// The subscriber is owed ticks with a greater `seq`.
    last_seq: u64,
}

pub struct ShardCtx {
    pub id: usize,
    /// Itself, for spawning writers from `&self` methods.
    me: std::rc::Weak<ShardCtx>,
    pub shared: Arc<Shared>,
    pub conns: RefCell<Slab<Rc<RefCell<Conn>>>>,
    table: RefCell<Vec<Vec<SubEntry>>>,
    /// Connections subscribed to names no tick has created yet: name -> (idx, generation).
    /// Bounded by the connections' own subscription bounds; an entry lives while one of
    /// them waits. The first tick of the name (or a subscription to it once it exists)
    /// turns them into ordinary subscriptions ([`Self::activate_waiting`]).
    waiting: RefCell<Waiters>,
    wheel: RefCell<TimerWheel<TimerEvent>>,
    pub read_buf: RefCell<Box<[u8]>>,
    /// Decrypted bytes of the current read (TLS only), shared like `read_buf`.
    pub plain_buf: RefCell<Vec<u8>>,
    /// Connections still in the HTTP upgrade: who may wait, who gives way.
    pub pending: RefCell<PendingTable>,
    next_gen: Cell<u32>,
    pub draining: Cell<bool>,
    pub accept_cancel: RefCell<Option<monoio::io::Canceller>>,
    actions: RefCell<Vec<Action>>,
    /// Write buffers shared by the shard's writers (see `take_buffer`).
    write_pool: RefCell<Vec<Vec<u8>>>,
    /// The shard runs on io_uring (not the epoll fallback).
    pub uring: bool,
    /// Verifier threads for in-band reauth tokens.
    pub verify_pool: crate::rt::verify::VerifyPool,
    /// State of the sampler for the latency histograms (xorshift32, never 0).
    sampler: Cell<u32>,
    /// Where shard 0's sweep for idle symbols goes on (see `reclaim_symbols`).
    reclaim_cursor: Cell<usize>,
}

/// Buffers kept in a shard's pool, and the largest one worth keeping.
const POOL_BUFFERS: usize = 256;
const POOL_MAX_CAPACITY: usize = 1 << 20;

pub type ConnRef = Rc<RefCell<Conn>>;

/// Names awaited by this shard's connections: name -> (connection index, generation).
type Waiters = std::collections::HashMap<Box<str>, Vec<(usize, u32)>>;

impl ShardCtx {
    /// `uring`: the shard's runtime runs on io_uring (the writer aliases the reader's
    /// descriptor) rather than epoll (the writer shares the reader's stream).
    pub fn new(
        id: usize,
        shared: Arc<Shared>,
        verify_pool: crate::rt::verify::VerifyPool,
        uring: bool,
    ) -> Rc<ShardCtx> {
        let now = shared.now_ms();
        let pending = PendingTable::new(PendingLimits {
            max: shared.cfg.server.pending_handshakes_per_shard,
            per_ip: shared.cfg.limits.per_ip_pending_handshakes,
        });
        Rc::new_cyclic(|me| ShardCtx {
            me: me.clone(),
            id,
            shared,
            conns: RefCell::new(Slab::with_capacity(1024)),
            table: RefCell::new(Vec::new()),
            waiting: RefCell::new(std::collections::HashMap::new()),
            wheel: RefCell::new(TimerWheel::with_capacity(now, 4096)),
            read_buf: RefCell::new(vec![0u8; 64 * 1024].into_boxed_slice()),
            plain_buf: RefCell::new(Vec::new()),
            pending: RefCell::new(pending),
            next_gen: Cell::new(1),
            draining: Cell::new(false),
            accept_cancel: RefCell::new(Some(monoio::io::Canceller::new())),
            actions: RefCell::new(Vec::new()),
            write_pool: RefCell::new(Vec::new()),
            verify_pool,
            uring,
            sampler: Cell::new((0x9E37_79B9 ^ (id as u32).wrapping_mul(0x85EB_CA6B)) | 1),
            reclaim_cursor: Cell::new(0),
        })
    }

    /// A write is about to be issued; `oldest_ns` is the oldest `accepted_ns` of the
    /// ticks it carries (`u64::MAX`: none). A random one such write in 16 goes into the
    /// publish-to-write histogram: sampling keeps cores off the shared histogram's cache
    /// lines, and drawing at random (not every 16th) keeps the fan-out order from always
    /// picking the same subscribers.
    pub fn note_tick_write(&self, oldest_ns: u64) {
        if oldest_ns != u64::MAX && self.one_in(16) {
            let us = crate::metrics::mono_ns().saturating_sub(oldest_ns) / 1000;
            self.shared.metrics.publish_to_write.observe_us(us);
        }
    }

    /// True with probability 1/`n` (`n` a power of two): xorshift32 over a per-shard state.
    fn one_in(&self, n: u32) -> bool {
        let mut x = self.sampler.get();
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.sampler.set(x);
        x & (n - 1) == 0
    }

    pub fn now_ms(&self) -> u64 {
        self.shared.now_ms()
    }

    /// Output is queued for connection `idx` (or it must end): start its writer unless
    /// one is already running (a running writer looks at the queue again after each
    /// write, so it needs no wake-up).
    pub fn kick(&self, idx: usize, c: &mut Conn) {
        let Some(handle) = c.whandle.take() else { return };
        let conn = self.conns.borrow().get(idx).cloned();
        match (self.me.upgrade(), conn) {
            (Some(me), Some(conn)) => {
                monoio::spawn(crate::rt::conn::writer(me, conn, idx, c.generation, handle));
            }
            _ => c.whandle = Some(handle),
        }
    }

    /// The shard's action buffer (empty, possibly with capacity). It is taken, not
    /// borrowed, so a nested user finds no borrow to trip over, only a fresh buffer. Take,
    /// run the session, `apply`, then hand it back with [`Self::put_actions`].
    pub fn take_actions(&self) -> Vec<Action> {
        std::mem::take(&mut *self.actions.borrow_mut())
    }

    /// Return the buffer from [`Self::take_actions`] (already drained by `apply`).
    pub fn put_actions(&self, mut actions: Vec<Action>) {
        actions.clear();
        *self.actions.borrow_mut() = actions;
    }

    /// A write buffer from the shard's pool (empty, possibly with capacity).
    pub fn take_buffer(&self) -> Vec<u8> {
        self.write_pool.borrow_mut().pop().unwrap_or_default()
    }

    /// Return a buffer to the pool; buffers beyond the pool's bounds are freed.
    pub fn put_buffer(&self, mut buf: Vec<u8>) {
        if buf.capacity() == 0 || buf.capacity() > POOL_MAX_CAPACITY {
            return;
        }
        let mut pool = self.write_pool.borrow_mut();
        if pool.len() < POOL_BUFFERS {
            buf.clear();
            pool.push(buf);
        }
    }

    /// A new socket: a slot with its handshake deadline armed.
    pub fn register(&self, fd: RawFd) -> (usize, u32, ConnRef) {
        let generation = self.next_gen.get();
        self.next_gen.set(generation.wrapping_add(1).max(1));
        let conn = Rc::new(RefCell::new(Conn {
            generation,
            fd,
            session: None,
            decoder: None,
            tls: None,
            rx_partial: None,
            whandle: None,
            dead: false,
            peer_closed: false,
            tasks: 1,
            deadlines: DeadlineSet::new(),
            slot: None,
        }));
        let idx = self.conns.borrow_mut().insert(conn.clone());
        self.shared
            .metrics
            .shard(self.id)
            .connections
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let limits = &self.shared.cfg.limits;
        let first = limits.first_byte_timeout.min(limits.handshake_timeout);
        let at = self.now_ms() + first.as_millis() as u64;
        self.arm(&mut conn.borrow_mut(), idx, RtTimer::Handshake, at);
        (idx, generation, conn)
    }

    /// A new socket `idx` from `peer` enters the upgrade: the pending table admits it,
    /// possibly closing another pending socket to make room, or refuses it (the caller
    /// then ends it). Refusals and evictions are logged and counted.
    pub fn admit_pending(&self, idx: usize, peer: std::net::IpAddr) -> bool {
        let trusted = self.shared.auth().proxies.contains(peer);
        let answer = self.pending.borrow_mut().admit(idx, peer, trusted);
        let now = self.now_ms();
        let log = |ip, reason| {
            self.shared.audit(&SecurityEvent {
                ip: Some(ip),
                ..SecurityEvent::new(now, "handshake", "rejected", reason)
            });
        };
        match answer {
            Admission::Admit => true,
            Admission::RefuseIp => {
                log(peer, "pending_per_ip");
                false
            }
            Admission::Evict { idx: victim, ip } => {
                log(ip, "pending_evicted");
                if let Some(c) = self.conns.borrow().get(victim) {
                    // The victim's handshake task sees EOF and ends through `task_done`.
                    let mut c = c.borrow_mut();
                    shutdown(c.fd, libc::SHUT_RDWR);
                    c.dead = true;
                }
                true
            }
        }
    }

    /// Bytes arrived on pending socket `idx`: on the first, its deadline becomes
    /// `accepted_ms + handshake_timeout` (which later bytes never move).
    pub fn pending_heard(&self, idx: usize, conn: &ConnRef, accepted_ms: u64) {
        if self.pending.borrow_mut().heard(idx) {
            let at = accepted_ms + self.shared.cfg.limits.handshake_timeout.as_millis() as u64;
            self.arm(&mut conn.borrow_mut(), idx, RtTimer::Handshake, at);
        }
    }

    /// Arms (or moves) the connection's deadline of that kind.
    pub fn arm(&self, c: &mut Conn, idx: usize, kind: RtTimer, at: u64) {
        c.deadlines.set(kind.slot(), at);
        self.refile(c, idx);
    }

    /// Disarms the connection's deadline of that kind (the wheel entry stays, see
    /// [`DeadlineSet`]).
    pub fn disarm(&self, c: &mut Conn, kind: RtTimer) {
        c.deadlines.clear(kind.slot());
    }

    fn refile(&self, c: &mut Conn, idx: usize) {
        let generation = c.generation;
        c.deadlines.refile(&mut self.wheel.borrow_mut(), || TimerEvent {
            idx: idx as u32,
            generation,
        });
    }

    /// The handshake succeeded: the connection becomes a session with its deadlines armed.
    pub fn open(&self, idx: usize, c: &mut Conn, session: Session, decoder: Decoder) {
        self.disarm(c, RtTimer::Handshake);
        for (kind, at) in session.timers() {
            self.arm(c, idx, RtTimer::Session(kind), at);
        }
        c.session = Some(session);
        c.decoder = Some(decoder);
        c.tasks = 2;
    }

    /// One of the connection's tasks ended; the last one frees the slot, its
    /// subscriptions, its timers and (by dropping the `UserSlot`) its per-user cap.
    /// `force` shuts the socket down so the other task ends too; the writer passes `false`
    /// after a graceful close so the reader can still receive the peer's close frame.
    pub fn task_done(&self, idx: usize, generation: u32, force: bool) {
        let conn = match self.conns.borrow().get(idx) {
            Some(c) if c.borrow().generation == generation => c.clone(),
            _ => return,
        };
        let mut c = conn.borrow_mut();
        c.tasks = c.tasks.saturating_sub(1);
        if force {
            c.dead = true;
            shutdown(c.fd, libc::SHUT_RDWR);
            self.kick(idx, &mut c);
        }
        if c.tasks > 0 {
            return;
        }
        // Every task has ended, so no writer holds the handle; a parked one is released
        // (without closing the descriptor the reader's stream owns).
        drop(c.whandle.take());
        c.deadlines.cancel_all(&mut self.wheel.borrow_mut());
        if let Some(s) = c.session.take() {
            self.table_remove(idx, generation, s.subscriptions());
            self.unwait(idx, generation, s.waiting_subscriptions());
        }
        c.slot = None;
        drop(c);
        self.conns.borrow_mut().try_remove(idx);
        self.shared
            .metrics
            .shard(self.id)
            .connections
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn table_remove(&self, idx: usize, generation: u32, ids: &[SymbolId]) {
        let mut table = self.table.borrow_mut();
        for id in ids {
            if let Some(list) = table.get_mut(id.0 as usize) {
                let before = list.len();
                list.retain(|e| !(e.idx == idx && e.generation == generation));
                if before > 0 && list.is_empty() {
                    self.shared.hub.unsubscribe_last(self.id, *id);
                }
            }
        }
    }

    /// Carry out what a session asked for. Runs with the connection borrowed.
    pub fn apply(&self, idx: usize, c: &mut Conn, actions: &mut Vec<Action>) {
        let now = self.now_ms();
        loop {
            self.apply_once(idx, c, actions, now);
            // What the actions queued (replies, snapshots) counts against the outbound
            // budget; a close it decides is applied in the next round.
            let arm = c.session.as_mut().and_then(|s| s.enforce_budget(now, actions));
            if let Some(at) = arm {
                self.arm(c, idx, RtTimer::Session(TimerKind::SlowConsumer), at);
            }
            if actions.is_empty() {
                break;
            }
        }
        self.kick(idx, c);
    }

    fn apply_once(&self, idx: usize, c: &mut Conn, actions: &mut Vec<Action>, now: u64) {
        for a in actions.drain(..) {
            match a {
                Action::Subscribe {
                    ids,
                    snapshot,
                    waiting,
                } => {
                    self.subscribe(idx, c, &ids, snapshot);
                    for name in waiting {
                        self.wait(idx, c, name, snapshot);
                    }
                }
                Action::Unsubscribe { ids, waiting } => {
                    self.table_remove(idx, c.generation, &ids);
                    self.unwait(idx, c.generation, &waiting);
                }
                Action::Publish { ticks } => {
                    let n = self.shared.hub.publish(&ticks);
                    self.shared
                        .metrics
                        .ticks_in
                        .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                }
                Action::DeadlinesChanged => {
                    if let Some(s) = &c.session {
                        let timers = s.timers();
                        for (kind, at) in timers {
                            if matches!(kind, TimerKind::ReauthRequired | TimerKind::ReauthDeadline) {
                                self.arm(c, idx, RtTimer::Session(kind), at);
                            }
                        }
                    }
                }
                Action::Close { code } => {
                    self.shared.metrics.count_close(code);
                    for kind in RT_TIMERS {
                        if matches!(kind, RtTimer::Session(_)) {
                            self.disarm(c, kind);
                        }
                    }
                    self.arm(c, idx, RtTimer::HardDrop, now + HARD_DROP_MS);
                }
                Action::Log {
                    event,
                    outcome,
                    reason,
                } => {
                    if let Some(s) = &c.session {
                        let cl = s.claims();
                        self.shared.audit(&SecurityEvent {
                            sub: Some(&cl.sub),
                            sid: cl.sid.as_deref(),
                            ..SecurityEvent::new(now, event, outcome, reason)
                        });
                    }
                }
            }
        }
    }

    /// The connection subscribed to `name`, which did not exist when its session looked.
    fn wait(&self, idx: usize, c: &mut Conn, name: Box<str>, snapshot: bool) {
        match self.shared.hub.symbols().wait_for(self.id, &name) {
            Wait::Exists(id) => {
                // Created in between: an ordinary subscription after all.
                if c.session.as_mut().is_some_and(|s| s.activate(&name, id)) {
                    self.subscribe(idx, c, &[id], snapshot);
                }
            }
            Wait::Waiting => self
                .waiting
                .borrow_mut()
                .entry(name)
                .or_default()
                .push((idx, c.generation)),
        }
    }

    /// The connection no longer waits for these names (unsubscribe, narrowing, close).
    fn unwait(&self, idx: usize, generation: u32, names: &[Box<str>]) {
        if names.is_empty() {
            return;
        }
        let mut waiting = self.waiting.borrow_mut();
        for name in names {
            let Some(list) = waiting.get_mut(name) else {
                continue;
            };
            list.retain(|&(i, g)| !(i == idx && g == generation));
            if !list.is_empty() {
                continue;
            }
            waiting.remove(name);
            // The last one here: release the shard's claim on the name, and on the symbol
            // if it was created (and this shard handed to the hub) meanwhile.
            if let Some(id) = self.shared.hub.symbols().stop_waiting(self.id, name)
                && self
                    .table
                    .borrow()
                    .get(id.0 as usize)
                    .is_none_or(|l| l.is_empty())
            {
                self.shared.hub.unsubscribe_last(self.id, id);
            }
        }
    }

    /// `name` exists now as `id` (its first tick is being dispatched, or a connection just
    /// subscribed to it): this shard's connections waiting for it become ordinary
    /// subscribers, owed every tick from `seq` 1 (the shard was handed to the hub before
    /// the first tick, so none has passed it by). `current` is the connection the caller
    /// already holds borrowed, if any.
    fn activate_waiting(&self, name: &str, id: SymbolId, mut current: Option<(usize, &mut Conn)>) {
        let Some(list) = self.waiting.borrow_mut().remove(name) else {
            return;
        };
        // The shard's claim moves from the name to the symbol's entry in the hub.
        let _ = self.shared.hub.symbols().stop_waiting(self.id, name);
        let conns = self.conns.borrow();
        let mut table = self.table.borrow_mut();
        let i = id.0 as usize;
        if table.len() <= i {
            table.resize_with(i + 1, Vec::new);
        }
        for (widx, generation) in list {
            let activated = match current.as_mut() {
                Some((cidx, c)) if *cidx == widx => {
                    c.generation == generation && c.session.as_mut().is_some_and(|s| s.activate(name, id))
                }
                _ => conns.get(widx).is_some_and(|conn| {
                    let mut c = conn.borrow_mut();
                    c.generation == generation && c.session.as_mut().is_some_and(|s| s.activate(name, id))
                }),
            };
            if activated {
                table[i].push(SubEntry {
                    idx: widx,
                    generation,
                    last_seq: 0,
                });
            }
        }
        if table[i].is_empty() {
            drop(table);
            self.shared.hub.unsubscribe_last(self.id, id);
        }
    }

    fn subscribe(&self, idx: usize, c: &mut Conn, ids: &[SymbolId], snapshot: bool) {
        if !self.waiting.borrow().is_empty() {
            for id in ids {
                if let Some(name) = self.shared.hub.symbols().name(*id) {
                    self.activate_waiting(&name, *id, Some((idx, &mut *c)));
                }
            }
        }
        let generation = c.generation;
        let Some(session) = c.session.as_mut() else { return };
        let mut table = self.table.borrow_mut();
        let mut retired = Vec::new();
        for id in ids {
            let i = id.0 as usize;
            if table.len() <= i {
                table.resize_with(i + 1, Vec::new);
            }
            let list = &mut table[i];
            let already = list.iter().any(|e| e.idx == idx && e.generation == generation);
            let snap = if already {
                self.shared.hub.latest(*id)
            } else {
                let Some(base) = self.shared.hub.subscribe(self.id, *id, list.is_empty()) else {
                    retired.push(*id);
                    continue;
                };
                list.push(SubEntry {
                    idx,
                    generation,
                    last_seq: base.seq,
                });
                base.snapshot
            };
            if snapshot && let Some(t) = snap {
                session.push_snapshot(encode_for_subscriber(TickKind::Snapshot, &t, 0));
            }
        }
        drop(table);
        // Retired between the session's look-up and now (it was idle for
        // `feed.symbol_idle`): the subscription waits for the name like any other.
        for id in retired {
            let name = self.shared.hub.symbols().name(id);
            if let (Some(name), Some(s)) = (name, c.session.as_mut())
                && s.wait_again(id, &name)
            {
                self.wait(idx, c, Box::from(&*name), snapshot);
            }
        }
    }

    /// Fan one tick out to this shard's subscribers of its symbol.
    fn dispatch(&self, t: &Arc<SharedTick>, now: u64) -> usize {
        if !self.waiting.borrow().is_empty() {
            self.activate_waiting(&t.name, t.symbol, None);
        }
        let mut table = self.table.borrow_mut();
        let Some(list) = table.get_mut(t.symbol.0 as usize) else {
            return 0;
        };
        let conns = self.conns.borrow();
        let mut delivered = 0;
        for e in list.iter_mut() {
            if t.seq <= e.last_seq {
                continue;
            }
            let gap = t.seq - e.last_seq - 1;
            e.last_seq = t.seq;
            let Some(conn) = conns.get(e.idx) else { continue };
            let mut c = conn.borrow_mut();
            if c.generation != e.generation {
                continue;
            }
            let Some(s) = c.session.as_mut() else { continue };
            let conflated_before = s.outbound.conflated_total();
            let arm = if gap == 0 {
                s.push_tick(t, now)
            } else {
                // This shard's inbox overflowed: ticks never reached this subscriber.
                let frame = encode_for_subscriber(TickKind::Tick, t, gap);
                let one = Arc::new(SharedTick {
                    frame,
                    ..(**t).clone()
                });
                s.push_tick(&one, now)
            };
            let conflated = s.outbound.conflated_total() - conflated_before;
            if conflated > 0 {
                self.shared
                    .metrics
                    .conflated
                    .fetch_add(conflated, std::sync::atomic::Ordering::Relaxed);
            }
            if let Some(at) = arm {
                self.arm(&mut c, e.idx, RtTimer::Session(TimerKind::SlowConsumer), at);
            }
            self.kick(e.idx, &mut c);
            delivered += 1;
        }
        delivered
    }

    /// A connection's wheel entry taken off the wheel: handles every deadline of the
    /// connection that is due, earliest first, then files the entry for the next one.
    /// `key` must still be the connection's key: the ticker yields between slices of a
    /// burst, and the entry can be cancelled or re-filed in between.
    fn fire(&self, key: TimerKey, ev: TimerEvent, now: u64) {
        let idx = ev.idx as usize;
        let conn = match self.conns.borrow().get(idx) {
            Some(c) => c.clone(),
            None => return,
        };
        let mut c = conn.borrow_mut();
        if c.generation != ev.generation {
            return;
        }
        let Some(mut due) = c.deadlines.fired(key, now) else {
            return;
        };
        while let Some(slot) = c.deadlines.next_due(&mut due, now) {
            let kind = RT_TIMERS[slot];
            match kind {
                RtTimer::Handshake | RtTimer::HardDrop => {
                    if kind == RtTimer::Handshake && c.session.is_none() {
                        self.shared.audit(&SecurityEvent {
                            ip: self.pending.borrow().ip_of(idx),
                            ..SecurityEvent::new(now, "handshake", "rejected", "timeout")
                        });
                    }
                    shutdown(c.fd, libc::SHUT_RDWR);
                    c.dead = true;
                    self.kick(idx, &mut c);
                }
                RtTimer::Session(tk) => {
                    let mut actions = self.take_actions();
                    let rearm = match c.session.as_mut() {
                        Some(s) => s.handle_timer(tk, now, &mut actions),
                        None => None,
                    };
                    if let Some(at) = rearm {
                        c.deadlines.set(slot, at);
                    }
                    self.apply(idx, &mut c, &mut actions);
                    self.put_actions(actions);
                }
            }
        }
        self.refile(&mut c, idx);
    }

    fn control(&self, msg: Control) {
        match msg {
            Control::Revoke(target, reply) => {
                let mut closed = 0;
                let conns: Vec<(usize, ConnRef)> =
                    self.conns.borrow().iter().map(|(i, c)| (i, c.clone())).collect();
                let mut actions = self.take_actions();
                for (idx, conn) in conns {
                    let mut c = conn.borrow_mut();
                    let hit = !c.dead
                        && c.session
                            .as_ref()
                            .map(|s| s.claims())
                            .is_some_and(|cl| target.matches(&cl.sub, cl.sid.as_deref(), cl.jti.as_deref()));
                    if hit
                        && let Some(s) = c.session.as_mut()
                        && !s.is_closing()
                    {
                        actions.push(Action::Log {
                            event: "close",
                            outcome: "closed",
                            reason: "revoked",
                        });
                        s.close(CloseCode::REVOKED, "revoked", &mut actions);
                        self.apply(idx, &mut c, &mut actions);
                        closed += 1;
                    }
                }
                self.put_actions(actions);
                let _ = reply.send(closed);
            }
            Control::Drain => self.drain(),
            Control::ReauthDone {
                idx,
                generation,
                id,
                result,
            } => {
                let conn = match self.conns.borrow().get(idx) {
                    Some(c) => c.clone(),
                    None => return,
                };
                let mut c = conn.borrow_mut();
                if c.generation != generation {
                    return;
                }
                let mut actions = self.take_actions();
                if let Some(s) = c.session.as_mut() {
                    s.finish_reauth(
                        id,
                        *result,
                        self.now_ms(),
                        self.shared.hub.symbols(),
                        &mut actions,
                    );
                }
                self.apply(idx, &mut c, &mut actions);
                self.put_actions(actions);
            }
        }
    }

    fn drain(&self) {
        if self.draining.replace(true) {
            return;
        }
        if let Some(c) = self.accept_cancel.borrow_mut().take() {
            c.cancel();
        }
        let conns: Vec<(usize, ConnRef)> = self.conns.borrow().iter().map(|(i, c)| (i, c.clone())).collect();
        let mut actions = self.take_actions();
        for (idx, conn) in conns {
            let mut c = conn.borrow_mut();
            match c.session.as_mut() {
                Some(s) => {
                    s.close(CloseCode::GOING_AWAY, "server draining", &mut actions);
                    self.apply(idx, &mut c, &mut actions);
                }
                None => {
                    shutdown(c.fd, libc::SHUT_RDWR);
                }
            }
        }
        self.put_actions(actions);
    }
}

pub fn shutdown(fd: RawFd, how: libc::c_int) {
    // SAFETY: `shutdown` takes a plain integer and has no memory effects; on a closed or
    // foreign descriptor it fails with EBADF/ENOTSOCK, which is harmless here because the
    // fd stays open (owned by the connection's TcpStream) for as long as the Conn exists.
    unsafe {
        libc::shutdown(fd, how);
    }
}

/// Drains the hub inbox: control messages first, then ticks.
pub async fn dispatcher(ctx: Rc<ShardCtx>) {
    let inbox = ctx.shared.hub.inbox(ctx.id);
    loop {
        poll_fn(|cx| {
            inbox.waker.register(cx.waker());
            if inbox.pending.load(std::sync::atomic::Ordering::Acquire)
                || !inbox.ticks.is_empty()
                || !inbox.control_rx.is_empty()
            {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
        inbox.pending.store(false, std::sync::atomic::Ordering::Release);
        for m in inbox.control_rx.try_iter().take(BURST_SLICE) {
            ctx.control(m);
        }
        let now = ctx.now_ms();
        let mut n = 0;
        let mut delivered = 0u64;
        while n < DISPATCH_BUDGET {
            let Some(t) = inbox.ticks.pop() else { break };
            delivered += ctx.dispatch(&t, now) as u64;
            if ctx.one_in(64) {
                let us = crate::metrics::mono_ns().saturating_sub(t.accepted_ns) / 1000;
                ctx.shared.metrics.publish_to_dispatch.observe_us(us);
            }
            n += 1;
        }
        let g = ctx.shared.metrics.shard(ctx.id);
        g.ticks_out
            .fetch_add(delivered, std::sync::atomic::Ordering::Relaxed);
        if !inbox.ticks.is_empty() || !inbox.control_rx.is_empty() {
            // More is queued (other shards' publishers keep pushing while this pass runs):
            // let the writers, readers and ticker run, then come back without waiting.
            inbox.pending.store(true, std::sync::atomic::Ordering::Release);
            yield_now().await;
        }
    }
}

/// Advances the wheel; sleeps until the next deadline, at most 10 ms.
pub async fn ticker(ctx: Rc<ShardCtx>) {
    let mut fired = Vec::new();
    let mut next_housekeeping = 0u64;
    loop {
        let now = ctx.now_ms();
        ctx.wheel.borrow_mut().advance(now, &mut fired);
        for (i, (key, ev)) in fired.drain(..).enumerate() {
            if i > 0 && i % BURST_SLICE == 0 {
                yield_now().await;
            }
            ctx.fire(key, ev, now);
        }
        if now >= next_housekeeping {
            next_housekeeping = now + 1000;
            housekeeping(&ctx, now);
        }
        let next = ctx.wheel.borrow().next_deadline().unwrap_or(u64::MAX);
        let wait = next.saturating_sub(now).clamp(1, 10);
        monoio::time::sleep(Duration::from_millis(wait)).await;
    }
}

fn housekeeping(ctx: &ShardCtx, now: u64) {
    let mut queued = 0u64;
    for (_, c) in ctx.conns.borrow().iter() {
        if let Ok(mut c) = c.try_borrow_mut()
            && let Some(s) = c.session.as_mut()
        {
            queued += s.outbound.queued_bytes() as u64;
            s.trim();
        }
    }
    let g = ctx.shared.metrics.shard(ctx.id);
    g.queued_bytes.store(queued, std::sync::atomic::Ordering::Relaxed);
    g.pending_handshakes.store(
        ctx.pending.borrow().len() as u64,
        std::sync::atomic::Ordering::Relaxed,
    );
    g.inbox_dropped.store(
        ctx.shared
            .hub
            .inbox(ctx.id)
            .dropped
            .load(std::sync::atomic::Ordering::Relaxed),
        std::sync::atomic::Ordering::Relaxed,
    );
    if ctx.id == 0 {
        reclaim_symbols(ctx, now);
        ctx.shared.rate.sweep(now);
        ctx.shared.tickets.sweep(now);
        ctx.shared.revoked.sweep(now);
    }
}

/// Symbols swept per second for idleness (one slice of the table: a full pass over the
/// default 100,000 takes under two minutes, and no turn of shard 0 holds more than this
/// many symbol locks).
const RECLAIM_SLICE: usize = 1024;

/// Retire idle symbols, a slice per call, and free the ids whose quarantine is over.
fn reclaim_symbols(ctx: &ShardCtx, now: u64) {
    let idle_ns = ctx
        .shared
        .cfg
        .feed
        .symbol_idle
        .as_nanos()
        .min(u128::from(u64::MAX)) as u64;
    let (next, retired) = ctx.shared.hub.reclaim_idle(
        now,
        crate::metrics::mono_ns(),
        idle_ns,
        ctx.reclaim_cursor.get(),
        RECLAIM_SLICE,
    );
    ctx.reclaim_cursor.set(next);
    if retired > 0 {
        ctx.shared
            .metrics
            .symbols_retired
            .fetch_add(retired as u64, std::sync::atomic::Ordering::Relaxed);
    }
    ctx.shared.hub.symbols().recycle(now);
}

/// Yield once to the scheduler.
pub async fn yield_now() {
    let mut yielded = false;
    poll_fn(|cx| {
        if yielded {
            Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    })
    .await
}
#[cfg(test)]
mod tests {
    use super::*;

    /// Every connection is one `Rc<RefCell<Conn>>` allocation. mimalloc rounds it up to
    /// its size class (640, 768, 896, 1024 bytes...): at 10,000 idle connections a field
    /// that pushes it over 640 costs 128 bytes per connection, 6 % of the 2 KiB budget.
    /// It is exactly 640 now: a new field needs an old one to shrink.
    #[test]
    fn a_connection_fits_the_640_byte_size_class() {
        let rc_box = 2 * std::mem::size_of::<usize>() + std::mem::size_of::<RefCell<Conn>>();
        assert!(rc_box <= 640, "Rc<RefCell<Conn>> is {rc_box} bytes");
    }
}
