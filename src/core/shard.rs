//! One shard's decisions, sans-IO: connections, subscriptions, fan-out, deadlines.
//!
//! [`ShardCore`] owns what a shard knows about its connections apart from their sockets:
//! the connection table (slab index + generation), each connection's [`Session`], frame
//! [`Decoder`] and deadlines, the subscription table (symbol -> local subscribers, with
//! the `seq` each is owed), the waiting table (subscribers of names no tick has created
//! yet), the pending-upgrade table and the timer wheel. It is driven like the session:
//!
//! - inputs: [`register`](ShardCore::register) (a new socket),
//!   [`admit_pending`](ShardCore::admit_pending) / [`pending_heard`](ShardCore::pending_heard)
//!   (the upgrade), [`open`](ShardCore::open) (the `101` went out),
//!   [`handle_bytes`](ShardCore::handle_bytes) (received bytes, decoded here),
//!   [`handle_tick`](ShardCore::handle_tick) (a tick from the hub inbox),
//!   [`handle_control`](ShardCore::handle_control) (revoke, drain, reauth results),
//!   [`handle_timeout`](ShardCore::handle_timeout) (the clock advanced),
//!   [`handle_gone`](ShardCore::handle_gone) (the connection's tasks ended). Each takes
//!   `now` (unix milliseconds) from the caller; nothing here reads a clock.
//! - outputs: [`Effect`]s, taken with [`take_effects`](ShardCore::take_effects), that the
//!   runtime carries out in order: [`Effect::Kick`] (output queued and no writer runs:
//!   start one), [`Effect::Shutdown`] (shut the socket down), [`Effect::Audit`] (a
//!   security-log line), [`Effect::StopAccepting`], [`Effect::RevokeDone`] (answer the
//!   revocation's sender); and [`poll_timeout`](ShardCore::poll_timeout),
//!   when to call `handle_timeout` next. Counters (`tickgate_*_total`, gauges) are atomics
//!   in [`Shared::metrics`] and are bumped here directly: they are memory, not I/O.
//!
//! Per connection the core drives the session through its three ways out (see
//! [`crate::session`]): after every input to it (a message, a tick that pushed its queue
//! over budget, a fired deadline, a reauth result, a revocation, the drain) the core
//! carries out what [`Session::poll_event`] yields ([`SessionEvent`]: table changes,
//! publishes, closes, security-log lines), holds the queue to its budget
//! ([`Session::enforce_budget`]), files [`Session::poll_timeout`] if it is not the
//! deadline already filed, and kicks the writer, which takes the frames with
//! [`Session::poll_transmit`]. The session owns its deadlines (reauth notice and deadline,
//! heartbeat, idle, slow consumer); the core keeps only its own per connection, in a
//! three-slot [`DeadlineSet`] behind one wheel entry ([`ConnTimer`]): the handshake
//! deadline before the `101`, the hard drop after a close frame, and the session's
//! earliest deadline as last filed (a number to compare with, not a copy of the
//! session's: when it fires the session decides what is due). The session's deadline
//! only moves earlier on an input the core sees, so a filed deadline is never late; one
//! that moved later (traffic, a drained queue) fires early once, does nothing, and is
//! filed again.
//!
//! Per connection the runtime's socket state (descriptor, TLS, writer handle, partial
//! frame, task count) lives in the same allocation, as the `io` field of [`Conn`]: one
//! `Rc<RefCell<Conn<I>>>` per connection, so the fan-out's hot path stays what it was
//! (one slab look-up and one `RefCell` borrow per delivery, no allocation, no hashing), and
//! a delivery to a connection whose writer runs produces no effect at all (see
//! [`ConnIo::writer_parked`]).
//!
//! The hub ([`Shared::hub`]) is shared memory, not I/O: subscribing, publishing and
//! resolving names go to it directly.

use std::cell::RefCell;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use slab::Slab;

use crate::auth::seclog::{Event, Outcome, Reason, SecurityEvent};
use crate::auth::usercap::UserSlot;
use crate::feed::history::Replay;
use crate::feed::hub::{Control, encode_for_subscriber};
use crate::feed::outbound::SharedTick;
use crate::feed::symbol::{SymbolId, Wait};
use crate::feed::tick::TickKind;
use crate::gate::pending::{Admission, PendingLimits, PendingTable};
use crate::proto::close::CloseCode;
use crate::proto::frame::{Decoder, Incoming};
use crate::session::{Event as SessionEvent, ReauthVerifier, Session};
use crate::state::Shared;
use crate::timer::deadlines::{DeadlineSet, UNARMED};
use crate::timer::wheel::{TimerKey, TimerWheel};

/// A connection's deadlines as the core files them, one slot each behind one wheel entry.
/// The session's own deadlines are the session's: the core only files the earliest one
/// ([`Session::poll_timeout`]) and hands the firing back ([`Session::handle_timeout`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnTimer {
    /// Whatever [`Session::poll_timeout`] said when the core last asked.
    Session,
    Handshake,
    /// After a close frame was queued: the peer gets this long to answer before the socket
    /// is shut down regardless.
    HardDrop,
}

impl ConnTimer {
    const fn slot(self) -> usize {
        match self {
            ConnTimer::Session => 0,
            ConnTimer::Handshake => 1,
            ConnTimer::HardDrop => 2,
        }
    }
}

/// The connection's deadline kinds, in slot order: `CONN_TIMERS[k.slot()] == k`.
const CONN_TIMERS: [ConnTimer; TIMER_SLOTS] = [ConnTimer::Session, ConnTimer::Handshake, ConnTimer::HardDrop];

const TIMER_SLOTS: usize = 3;
/// After our close frame is queued, the peer has this long before the socket goes.
pub const HARD_DROP_MS: u64 = 2_000;

/// A connection's wheel entry: it stands for the earliest of the connection's deadlines.
#[derive(Clone, Copy, Debug)]
pub struct TimerEvent {
    /// The connection's slab index: below `max_connections_per_shard` (at most 10^6), so
    /// 32 bits, which keeps a wheel node at 24 bytes.
    idx: u32,
    generation: u32,
}

/// A connection as the shard's tables name it: slab index and generation (a slot is
/// reused by later connections with a new generation, so a stale reference finds nothing).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnId {
    pub idx: usize,
    pub generation: u32,
}

/// What the core asks the runtime to do, in order.
#[derive(Debug)]
pub enum Effect {
    /// Output is queued for the connection (or it must end) and no writer task runs for
    /// it: start one. A running writer looks at the queue again after each write, so it
    /// needs no wake-up and gets no `Kick`.
    Kick(ConnId),
    /// Shut the connection's socket down in both directions; its tasks see EOF.
    Shutdown(ConnId),
    /// Count and write a security-log event (boxed: effects are mostly `Kick`s).
    Audit(Box<AuditEvent>),
    /// The shard drains: stop accepting connections.
    StopAccepting,
    /// A revocation was handled here: send `closed` (the sessions it closed) on `reply`.
    /// An effect rather than a send from the core, so the answer goes out after the
    /// effects before it (the closes' security-log lines are written by then).
    RevokeDone {
        reply: crossbeam_channel::Sender<usize>,
        closed: usize,
    },
}

/// A security-log event owned by an [`Effect`] (a [`SecurityEvent`] borrows its strings).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditEvent {
    pub ts_unix_ms: u64,
    pub event: Event,
    pub outcome: Outcome,
    pub reason: Reason,
    pub ip: Option<IpAddr>,
    pub sub: Option<Box<str>>,
    pub sid: Option<Box<str>>,
}

impl AuditEvent {
    fn new(ts_unix_ms: u64, event: Event, outcome: Outcome, reason: Reason) -> Self {
        AuditEvent {
            ts_unix_ms,
            event,
            outcome,
            reason,
            ip: None,
            sub: None,
            sid: None,
        }
    }

    /// The event as the security log takes it.
    pub fn as_event(&self) -> SecurityEvent<'_> {
        SecurityEvent {
            ip: self.ip,
            sub: self.sub.as_deref(),
            sid: self.sid.as_deref(),
            ..SecurityEvent::at(self.ts_unix_ms, self.event, self.outcome, self.reason)
        }
    }
}

/// The runtime's per-connection socket state, kept in the same allocation as the core's.
pub trait ConnIo {
    /// No writer task runs for the connection, so queued output needs an [`Effect::Kick`].
    fn writer_parked(&self) -> bool;
}

/// A connection slot. `session` is `None` during the HTTP phase.
pub struct Conn<I> {
    pub generation: u32,
    pub session: Option<Session>,
    pub decoder: Option<Decoder>,
    /// The connection is finished: its writer must stop.
    pub dead: bool,
    /// The peer's close frame arrived.
    pub peer_closed: bool,
    /// The connection's deadlines, by [`ConnTimer::slot`], behind one wheel entry: the
    /// core's own (handshake, hard drop) and the session's earliest, as filed.
    deadlines: DeadlineSet<TIMER_SLOTS>,
    /// The per-user connection cap's slot, released when the connection is gone.
    pub slot: Option<UserSlot>,
    /// The runtime's socket state (descriptor, TLS, writer handle, partial frame, tasks).
    pub io: I,
}

impl<I> Conn<I> {
    /// The deadline of that kind, if armed (for tests and diagnostics).
    pub fn deadline(&self, kind: ConnTimer) -> Option<u64> {
        let at = self.deadlines.get(kind.slot());
        (at != UNARMED).then_some(at)
    }
}

pub type ConnRef<I> = Rc<RefCell<Conn<I>>>;

struct SubEntry {
    idx: usize,
    generation: u32,
    /// The subscriber is owed ticks with a greater `seq`.
    last_seq: u64,
}

/// What a subscription asked to receive before its live stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Start {
    /// The newest tick as a `snapshot`.
    snapshot: bool,
    /// The last `seq` the client processed: replay what follows (PROTOCOL.md 10).
    since: Option<u64>,
    /// `[cluster]`: the `since` reaches back past what the node holds of a symbol whose
    /// bus history is still being read: only the marker that ends the read (a
    /// [`SharedTick::prime`]) activates it, with the replay up to that marker.
    after_backfill: bool,
}

/// Names awaited by this shard's connections: name -> (connection index, generation,
/// what the subscription asked for first).
type Waiters = std::collections::HashMap<Box<str>, Vec<(usize, u32, Start)>>;

/// One shard's connections, tables and deadlines (see the module documentation).
pub struct ShardCore<I> {
    id: usize,
    shared: Arc<Shared>,
    conns: Slab<ConnRef<I>>,
    table: Vec<Vec<SubEntry>>,
    /// Connections subscribed to names no tick has created yet. Bounded by the
    /// connections' own subscription bounds; an entry lives while one of them waits. The
    /// first tick of the name (or a subscription to it once it exists) turns them into
    /// ordinary subscriptions ([`Self::activate_waiting`]).
    waiting: Waiters,
    /// Subscriptions with `since` to a symbol that had no tick yet, by (connection index,
    /// generation, symbol): its first tick is a `reset` snapshot unless it is `since + 1`
    /// (the order restarted). Consulted only for entries still at `last_seq` 0; an entry
    /// goes with that first tick, or with the subscription.
    since_first: std::collections::HashMap<(usize, u32, SymbolId), u64>,
    wheel: TimerWheel<TimerEvent>,
    /// Wheel entries due at the last [`Self::advance_timers`], not fired yet, from
    /// `fired_pos` on.
    fired: Vec<(TimerKey, TimerEvent)>,
    fired_pos: usize,
    /// Connections still in the HTTP upgrade: who may wait, who gives way.
    pending: PendingTable,
    next_gen: u32,
    draining: bool,
    effects: Vec<Effect>,
}

impl<I: ConnIo> ShardCore<I> {
    pub fn new(id: usize, shared: Arc<Shared>, now: u64) -> Self {
        let pending = PendingTable::new(PendingLimits {
            max: shared.cfg.server.pending_handshakes_per_shard,
            per_ip: shared.cfg.limits.per_ip_pending_handshakes,
        });
        ShardCore {
            id,
            shared,
            conns: Slab::with_capacity(1024),
            table: Vec::new(),
            waiting: Waiters::new(),
            since_first: std::collections::HashMap::new(),
            wheel: TimerWheel::with_capacity(now, 4096),
            fired: Vec::new(),
            fired_pos: 0,
            pending,
            next_gen: 1,
            draining: false,
            effects: Vec::new(),
        }
    }

    pub fn id(&self) -> usize {
        self.id
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Live connections (pending upgrades included).
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Connections still in the HTTP upgrade.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// The shard was told to drain.
    pub fn is_draining(&self) -> bool {
        self.draining
    }

    /// The connection `id`, if it is still there.
    pub fn get(&self, id: ConnId) -> Option<ConnRef<I>> {
        self.conns
            .get(id.idx)
            .filter(|c| c.borrow().generation == id.generation)
            .cloned()
    }

    /// Whatever connection holds slab index `idx` now, whatever its generation (the
    /// caller compares it once it has the connection borrowed anyway).
    pub fn at(&self, idx: usize) -> Option<ConnRef<I>> {
        self.conns.get(idx).cloned()
    }

    /// Local subscribers of `id` (for tests and diagnostics).
    pub fn subscribers(&self, id: SymbolId) -> usize {
        self.table.get(id.0 as usize).map_or(0, Vec::len)
    }

    /// Names this shard's connections wait for (for tests and diagnostics).
    pub fn waiting_names(&self) -> usize {
        self.waiting.len()
    }

    /// Moves the effects produced so far into `out`, in order. `out` is normally empty
    /// (then the two buffers swap, and neither allocates once warm).
    pub fn take_effects(&mut self, out: &mut Vec<Effect>) {
        if out.is_empty() {
            std::mem::swap(&mut self.effects, out);
        } else {
            out.append(&mut self.effects);
        }
    }

    /// When the next deadline is due ([`Self::handle_timeout`]), if any is armed.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.wheel.next_deadline()
    }

    fn audit(&mut self, e: AuditEvent) {
        self.effects.push(Effect::Audit(Box::new(e)));
    }

    /// A new socket: a slot with its first-byte deadline armed.
    pub fn register(&mut self, now: u64, io: I) -> (ConnId, ConnRef<I>) {
        let generation = self.next_gen;
        self.next_gen = generation.wrapping_add(1).max(1);
        let conn = Rc::new(RefCell::new(Conn {
            generation,
            session: None,
            decoder: None,
            dead: false,
            peer_closed: false,
            deadlines: DeadlineSet::new(),
            slot: None,
            io,
        }));
        let idx = self.conns.insert(conn.clone());
        self.shared
            .metrics
            .shard(self.id)
            .connections
            .fetch_add(1, Relaxed);
        let at = self.handshake_deadline(now, false);
        arm(
            &mut self.wheel,
            &mut conn.borrow_mut(),
            idx,
            ConnTimer::Handshake,
            at,
        );
        (ConnId { idx, generation }, conn)
    }

    /// When a socket accepted at `accepted_ms` must have finished its upgrade: within
    /// `first_byte_timeout` (never past `handshake_timeout`) until a byte arrived
    /// (`heard`), then `handshake_timeout` after accept, which later bytes never move.
    fn handshake_deadline(&self, accepted_ms: u64, heard: bool) -> u64 {
        let limits = &self.shared.cfg.limits;
        let d = if heard {
            limits.handshake_timeout
        } else {
            limits.first_byte_timeout.min(limits.handshake_timeout)
        };
        accepted_ms + d.as_millis() as u64
    }

    /// A new socket `idx` from `peer` enters the upgrade: the pending table admits it,
    /// possibly shutting another pending socket down to make room, or refuses it (the
    /// caller then ends it). Refusals and evictions are logged and counted.
    pub fn admit_pending(&mut self, now: u64, idx: usize, peer: IpAddr) -> bool {
        let trusted = self.shared.auth().proxies.contains(peer);
        let answer = self.pending.admit(idx, peer, trusted);
        let log = |ip, reason| AuditEvent {
            ip: Some(ip),
            ..AuditEvent::new(now, Event::Handshake, Outcome::Rejected, reason)
        };
        match answer {
            Admission::Admit => true,
            Admission::RefuseIp => {
                self.audit(log(peer, Reason::PendingPerIp));
                false
            }
            Admission::Evict { idx: victim, ip } => {
                self.audit(log(ip, Reason::PendingEvicted));
                if let Some(c) = self.conns.get(victim) {
                    // The victim's handshake task sees EOF and ends through the runtime's
                    // task accounting, then `handle_gone`.
                    let mut c = c.borrow_mut();
                    c.dead = true;
                    self.effects.push(Effect::Shutdown(ConnId {
                        idx: victim,
                        generation: c.generation,
                    }));
                }
                true
            }
        }
    }

    /// Bytes arrived on pending socket `idx`: on the first, its deadline becomes
    /// `accepted_ms + handshake_timeout` (which later bytes never move).
    pub fn pending_heard(&mut self, idx: usize, accepted_ms: u64) {
        if self.pending.heard(idx)
            && let Some(conn) = self.conns.get(idx)
        {
            let at = self.handshake_deadline(accepted_ms, true);
            arm(
                &mut self.wheel,
                &mut conn.borrow_mut(),
                idx,
                ConnTimer::Handshake,
                at,
            );
        }
    }

    /// The upgrade of `idx` is over, whatever the outcome.
    pub fn pending_done(&mut self, idx: usize) {
        self.pending.remove(idx);
    }

    /// The handshake succeeded: the connection becomes a session with its deadlines armed.
    pub fn open(&mut self, id: ConnId, session: Session, decoder: Decoder) {
        let Some(conn) = self.get(id) else { return };
        let mut c = conn.borrow_mut();
        c.deadlines.clear(ConnTimer::Handshake.slot());
        if session.compresses() {
            self.shared
                .metrics
                .shard(self.id)
                .compressing
                .fetch_add(1, Relaxed);
        }
        c.session = Some(session);
        c.decoder = Some(decoder);
        refile_session(&mut self.wheel, &mut c, id.idx);
    }

    /// The connection's tasks have all ended: frees the slot, its subscriptions, its
    /// timers and (by dropping the `UserSlot`) its per-user cap.
    pub fn handle_gone(&mut self, id: ConnId) {
        let Some(conn) = self.get(id) else { return };
        let mut c = conn.borrow_mut();
        c.deadlines.cancel_all(&mut self.wheel);
        if let Some(s) = c.session.take() {
            if s.compresses() {
                self.shared
                    .metrics
                    .shard(self.id)
                    .compressing
                    .fetch_sub(1, Relaxed);
            }
            self.table_remove(id.idx, id.generation, s.subscriptions());
            self.unwait(id.idx, id.generation, s.waiting_subscriptions());
        }
        c.slot = None;
        drop(c);
        self.conns.try_remove(id.idx);
        self.shared
            .metrics
            .shard(self.id)
            .connections
            .fetch_sub(1, Relaxed);
    }

    /// Bytes received on connection `idx` after the `101`: `data`, preceded by what is in
    /// `partial` (the start of a frame split across reads, which the runtime keeps between
    /// reads). Decodes every complete message into the session and carries out what it
    /// asks for; the bytes of an incomplete frame are left in `partial` (emptied, and its
    /// buffer released, when there are none).
    pub fn handle_bytes(
        &mut self,
        now: u64,
        idx: usize,
        data: &mut [u8],
        partial: &mut Vec<u8>,
        verifier: &dyn ReauthVerifier,
    ) {
        let Some(conn) = self.conns.get(idx).cloned() else {
            *partial = Vec::new();
            return;
        };
        let mut c = conn.borrow_mut();
        let mut peer_closed = false;
        {
            let c = &mut *c;
            let (Some(decoder), Some(session)) = (c.decoder.as_mut(), c.session.as_mut()) else {
                *partial = Vec::new();
                return;
            };
            session.note_rx(now);
            if session.is_closing() {
                // After our close frame only the peer's close matters; drop the rest unread.
                partial.clear();
            }
            let buf: &mut [u8] = if partial.is_empty() {
                data
            } else {
                partial.extend_from_slice(data);
                &mut *partial
            };
            let mut off = 0;
            loop {
                match decoder.decode(&mut buf[off..]) {
                    Ok((0, _)) => break,
                    Ok((n, msg)) => {
                        off += n;
                        if let Some(m) = msg {
                            if matches!(m, Incoming::Close(_)) {
                                peer_closed = true;
                            }
                            session.handle_message(now, m, self.shared.hub.symbols(), verifier);
                        }
                    }
                    Err(e) => {
                        session.protocol_error(e.close_code(), e.close_reason());
                        off = buf.len();
                        break;
                    }
                }
            }
            let rest = buf.len() - off;
            if rest > 0 {
                let tail = buf[off..].to_vec();
                partial.clear();
                partial.extend_from_slice(&tail);
            } else {
                // Nothing pending: hold no buffer between messages.
                *partial = Vec::new();
            }
        }
        c.peer_closed |= peer_closed;
        self.apply(idx, &mut c, now);
    }

    /// A decoded message for connection `id`, as [`Self::handle_bytes`] hands each one to
    /// the session (without the framing: for tests and for callers that decode elsewhere).
    pub fn handle_message(&mut self, now: u64, id: ConnId, m: Incoming, verifier: &dyn ReauthVerifier) {
        let Some(conn) = self.get(id) else { return };
        let mut c = conn.borrow_mut();
        {
            let c = &mut *c;
            if let Some(s) = c.session.as_mut() {
                s.note_rx(now);
                c.peer_closed |= matches!(m, Incoming::Close(_));
                s.handle_message(now, m, self.shared.hub.symbols(), verifier);
            }
        }
        self.apply(id.idx, &mut c, now);
    }

    /// Carry out what a session asked for ([`Session::poll_event`]), hold its queue to
    /// its budget, re-file its deadline if [`Session::poll_timeout`] moved, and have its
    /// writer started. Runs with the connection borrowed, after every input to a session.
    fn apply(&mut self, idx: usize, c: &mut Conn<I>, now: u64) {
        loop {
            while let Some(ev) = c.session.as_mut().and_then(Session::poll_event) {
                self.apply_event(idx, c, ev, now);
            }
            // What the events queued (replies, snapshots) counts against the outbound
            // budget; a close it decides is carried out in the next round.
            let Some(s) = c.session.as_mut() else { break };
            s.enforce_budget(now);
            match s.poll_event() {
                Some(ev) => self.apply_event(idx, c, ev, now),
                None => break,
            }
        }
        refile_session(&mut self.wheel, c, idx);
        kick(&mut self.effects, idx, c);
    }

    fn apply_event(&mut self, idx: usize, c: &mut Conn<I>, ev: SessionEvent, now: u64) {
        match ev {
            SessionEvent::Subscribe {
                ids,
                snapshot,
                waiting,
                since,
            } => {
                self.subscribe(idx, c, &ids, snapshot, &since, now);
                for name in waiting {
                    let start = Start {
                        snapshot,
                        since: since.get(&name).copied(),
                        after_backfill: false,
                    };
                    self.wait(idx, c, name, start, now);
                }
            }
            SessionEvent::Unsubscribe { ids, waiting } => {
                self.table_remove(idx, c.generation, &ids);
                self.unwait(idx, c.generation, &waiting);
            }
            SessionEvent::Publish { ticks } => {
                let n = self.shared.hub.publish(&ticks);
                self.shared.metrics.ticks_in.fetch_add(n as u64, Relaxed);
            }
            SessionEvent::PublishBus { id, ticks } => {
                let r = crate::bus::PublishRequest {
                    shard: self.id,
                    idx,
                    generation: c.generation,
                    id,
                    ticks,
                };
                if let Err(r) = self.shared.bus.publish(r) {
                    self.shared.bus.metrics.unavailable.fetch_add(1, Relaxed);
                    if let Some(s) = c.session.as_mut() {
                        s.publish_done(r.id, Err(()));
                    }
                }
            }
            SessionEvent::Close { code } => {
                // The session wants no deadline of its own any more (`poll_timeout` is
                // `None` once closing): the hard drop takes over.
                self.shared.metrics.count_close(code);
                arm(&mut self.wheel, c, idx, ConnTimer::HardDrop, now + HARD_DROP_MS);
            }
            SessionEvent::Log {
                event,
                outcome,
                reason,
            } => {
                if let Some(s) = &c.session {
                    let cl = s.claims();
                    let e = AuditEvent {
                        sub: Some(cl.sub.clone()),
                        sid: cl.sid.clone(),
                        ..AuditEvent::new(now, event, outcome, reason)
                    };
                    self.audit(e);
                }
            }
        }
    }

    fn table_remove(&mut self, idx: usize, generation: u32, ids: &[SymbolId]) {
        for id in ids {
            if !self.since_first.is_empty() {
                self.since_first.remove(&(idx, generation, *id));
            }
            if let Some(list) = self.table.get_mut(id.0 as usize) {
                let before = list.len();
                list.retain(|e| !(e.idx == idx && e.generation == generation));
                // A subscription waiting for the symbol's bus history keeps the shard on it.
                if before > 0
                    && list.is_empty()
                    && (self.waiting.is_empty()
                        || !self
                            .shared
                            .hub
                            .symbols()
                            .name(*id)
                            .is_some_and(|n| self.waiting.contains_key(&*n)))
                {
                    self.shared.hub.unsubscribe_last(self.id, *id);
                }
            }
        }
    }

    /// The connection subscribed to `name`, which did not exist when its session looked.
    fn wait(&mut self, idx: usize, c: &mut Conn<I>, name: Box<str>, start: Start, now: u64) {
        match self.shared.hub.symbols().wait_for(self.id, &name) {
            Wait::Exists(id) => {
                // Created in between: an ordinary subscription after all.
                if c.session.as_mut().is_some_and(|s| s.activate(&name, id)) {
                    let mut since = crate::session::Since::new();
                    if let Some(q) = start.since {
                        since.insert(name.clone(), q);
                    }
                    self.subscribe(idx, c, &[id], start.snapshot, &since, now);
                }
            }
            Wait::Waiting => {
                // With `[cluster]` the bus is asked for the name (its newest tick, then
                // its live ticks); alone, this is a no-op.
                self.shared.hub.want(&name, start.since.is_some());
                self.waiting
                    .entry(name)
                    .or_default()
                    .push((idx, c.generation, start));
            }
        }
    }

    /// The connection no longer waits for these names (unsubscribe, narrowing, close).
    fn unwait(&mut self, idx: usize, generation: u32, names: &[Box<str>]) {
        for name in names {
            let Some(list) = self.waiting.get_mut(name) else {
                continue;
            };
            list.retain(|&(i, g, _)| !(i == idx && g == generation));
            if !list.is_empty() {
                continue;
            }
            self.waiting.remove(name);
            // The last one here: release the shard's claim on the name, and on the symbol
            // if it was created (and this shard handed to the hub) meanwhile.
            if let Some(id) = self.shared.hub.symbols().stop_waiting(self.id, name)
                && self.table.get(id.0 as usize).is_none_or(|l| l.is_empty())
            {
                self.shared.hub.unsubscribe_last(self.id, id);
            }
        }
    }

    /// `name` exists now as `id` (its first tick is being dispatched, or a connection just
    /// subscribed to it): this shard's connections waiting for it become ordinary
    /// subscribers. `first` is the tick that created it on this shard, if that is why: the
    /// subscribers are owed that tick and every later one (the shard was handed to the hub
    /// before it, so none has passed it by), or, for a bus head ([`SharedTick::prime`]),
    /// every tick after it, with the head as their snapshot when they asked for one.
    /// With `since`, a head brings the replay of what the bus history holds up to it; a
    /// first tick that does not follow `since` (the symbol restarted, or the history was
    /// gone) is sent as a `reset` snapshot instead of a tick.
    /// `current` is the connection the caller already holds borrowed, if any.
    fn activate_waiting(
        &mut self,
        name: &str,
        id: SymbolId,
        mut current: Option<(usize, &mut Conn<I>)>,
        first: Option<&Arc<SharedTick>>,
        now: u64,
    ) {
        let Some(list) = self.waiting.remove(name) else {
            return;
        };
        // The shard's claim moves from the name to the symbol's entry in the hub.
        let _ = self.shared.hub.symbols().stop_waiting(self.id, name);
        let i = id.0 as usize;
        if self.table.len() <= i {
            self.table.resize_with(i + 1, Vec::new);
        }
        let last_seq = match first {
            Some(t) if t.prime => t.seq,
            Some(t) => t.seq.saturating_sub(1),
            None => 0,
        };
        let head = first.filter(|t| t.prime);
        let hub = &self.shared.hub;
        let backfilling = list.iter().any(|(_, _, s)| s.since.is_some()) && hub.backfilling(id);
        let mut kept = Vec::new();
        for (widx, generation, start) in list {
            // A `since` on a symbol whose bus history is still being read waits for the
            // marker that ends the read (or, if the head arrives after it, for the head).
            let wait = match start.after_backfill {
                true => head.is_none() || backfilling,
                false => start.since.is_some() && backfilling,
            };
            if wait {
                kept.push((
                    widx,
                    generation,
                    Start {
                        after_backfill: true,
                        ..start
                    },
                ));
                continue;
            }
            let go = |c: &mut Conn<I>, effects: &mut Vec<Effect>, wheel: &mut TimerWheel<TimerEvent>| {
                if c.generation != generation {
                    return None;
                }
                let s = c.session.as_mut()?;
                if !s.activate(name, id) {
                    return None;
                }
                let mut owed = last_seq;
                match (start.since, first) {
                    (Some(since), Some(t)) if t.prime => {
                        let budget = s.outbound_room();
                        let replay = hub.replay(id, since, t, budget).unwrap_or(Replay::Nothing);
                        if queue_replay(s, replay, now, &self.shared.metrics) {
                            refile_session(wheel, c, widx);
                        }
                    }
                    (Some(since), Some(t)) if since.checked_add(1) != Some(t.seq) => {
                        // The symbol's first tick here does not follow what the client
                        // had: its state is replaced, and the tick is not sent twice.
                        self.shared.metrics.replay_resets.fetch_add(1, Relaxed);
                        s.push_snapshot(encode_for_subscriber(TickKind::Reset, t, 0));
                        owed = t.seq;
                    }
                    _ => {
                        if let Some(t) = head
                            && start.snapshot
                        {
                            s.push_snapshot(encode_for_subscriber(TickKind::Snapshot, t, 0));
                        }
                    }
                }
                kick(effects, widx, c);
                Some(owed)
            };
            let activated = match current.as_mut() {
                Some((cidx, c)) if *cidx == widx => go(c, &mut self.effects, &mut self.wheel),
                _ => self
                    .conns
                    .get(widx)
                    .and_then(|conn| go(&mut conn.borrow_mut(), &mut self.effects, &mut self.wheel)),
            };
            if let Some(last_seq) = activated {
                self.table[i].push(SubEntry {
                    idx: widx,
                    generation,
                    last_seq,
                });
            }
        }
        if !kept.is_empty() {
            // Still waiting: the shard keeps receiving the symbol's ticks for the marker.
            self.waiting.insert(Box::from(name), kept);
        } else if self.table[i].is_empty() {
            self.shared.hub.unsubscribe_last(self.id, id);
        }
    }

    fn subscribe(
        &mut self,
        idx: usize,
        c: &mut Conn<I>,
        ids: &[SymbolId],
        snapshot: bool,
        since: &crate::session::Since,
        now: u64,
    ) {
        if !self.waiting.is_empty() {
            for id in ids {
                if let Some(name) = self.shared.hub.symbols().name(*id) {
                    self.activate_waiting(&name, *id, Some((idx, &mut *c)), None, now);
                }
            }
        }
        let generation = c.generation;
        let Some(session) = c.session.as_mut() else { return };
        let mut retired = Vec::new();
        let mut backfilling = Vec::new();
        for id in ids {
            let i = id.0 as usize;
            if self.table.len() <= i {
                self.table.resize_with(i + 1, Vec::new);
            }
            let list = &mut self.table[i];
            let already = list.iter().any(|e| e.idx == idx && e.generation == generation);
            let snap = if already {
                self.shared.hub.latest(*id)
            } else {
                let since_of = match since.is_empty() {
                    true => None,
                    false => self
                        .shared
                        .hub
                        .symbols()
                        .name(*id)
                        .and_then(|n| since.get(&*n).copied()),
                };
                let budget = session.outbound_room();
                let Some(base) =
                    self.shared
                        .hub
                        .subscribe(self.id, *id, list.is_empty(), since_of.map(|q| (q, budget)))
                else {
                    retired.push(*id);
                    continue;
                };
                if base.backfilling {
                    // The `since` reaches past what this node holds while the bus's
                    // history is still being read: the subscription waits for the read's
                    // marker (the shard now receives the symbol's ticks).
                    backfilling.push((*id, since_of));
                    continue;
                }
                list.push(SubEntry {
                    idx,
                    generation,
                    last_seq: base.seq,
                });
                if let Some(replay) = base.replay {
                    if let (Replay::Nothing, Some(&s)) = (&replay, since_of.as_ref().filter(|s| **s > 0)) {
                        self.since_first.insert((idx, generation, *id), s);
                    }
                    // A slow-consumer deadline this starts is filed by `apply`.
                    let _ = queue_replay(session, replay, now, &self.shared.metrics);
                    continue;
                }
                base.snapshot
            };
            if snapshot && let Some(t) = snap {
                session.push_snapshot(encode_for_subscriber(TickKind::Snapshot, &t, 0));
            }
        }
        for (id, since_of) in backfilling {
            let name = self.shared.hub.symbols().name(id);
            if let (Some(name), Some(s)) = (name, c.session.as_mut())
                && s.wait_again(id, &name)
            {
                self.waiting.entry(Box::from(&*name)).or_default().push((
                    idx,
                    generation,
                    Start {
                        snapshot,
                        since: since_of,
                        after_backfill: true,
                    },
                ));
            } else if self.table.get(id.0 as usize).is_none_or(|l| l.is_empty()) {
                // Nothing waits after all: the shard does not stay on the symbol for it.
                self.shared.hub.unsubscribe_last(self.id, id);
            }
        }
        // Retired between the session's look-up and now (it was idle for
        // `feed.symbol_idle`): the subscription waits for the name like any other.
        for id in retired {
            let name = self.shared.hub.symbols().name(id);
            if let (Some(name), Some(s)) = (name, c.session.as_mut())
                && s.wait_again(id, &name)
            {
                let start = Start {
                    snapshot,
                    since: since.get(&*name).copied(),
                    after_backfill: false,
                };
                self.wait(idx, c, Box::from(&*name), start, now);
            }
        }
    }

    /// A tick from the shard's inbox: fan it out to this shard's subscribers of its symbol.
    /// Each gets the shared frame, or, when its `seq` shows ticks it never got (the inbox
    /// overflowed), a copy re-encoded with `"skipped"`. Returns how many got it.
    pub fn handle_tick(&mut self, now: u64, t: &Arc<SharedTick>) -> usize {
        if !self.waiting.is_empty() {
            self.activate_waiting(&t.name, t.symbol, None, Some(t), now);
        }
        let Some(list) = self.table.get_mut(t.symbol.0 as usize) else {
            return 0;
        };
        if t.prime {
            // The bus head of a symbol this node just took interest in: the baseline of
            // subscribers that have had nothing yet, not a tick to deliver.
            for e in list.iter_mut().filter(|e| e.last_seq == 0) {
                e.last_seq = t.seq;
            }
            return 0;
        }
        let mut delivered = 0;
        for e in list.iter_mut() {
            if t.seq <= e.last_seq {
                continue;
            }
            let restarted = e.last_seq == 0
                && !self.since_first.is_empty()
                && self
                    .since_first
                    .remove(&(e.idx, e.generation, t.symbol))
                    .is_some_and(|since| since.checked_add(1) != Some(t.seq));
            let gap = t.seq - e.last_seq - 1;
            e.last_seq = t.seq;
            let Some(conn) = self.conns.get(e.idx) else {
                continue;
            };
            let mut c = conn.borrow_mut();
            if c.generation != e.generation {
                continue;
            }
            let Some(s) = c.session.as_mut() else { continue };
            if restarted {
                // The symbol's first tick does not follow the client's `since`: its state
                // is replaced (PROTOCOL.md 10), the tick is not sent twice.
                self.shared.metrics.replay_resets.fetch_add(1, Relaxed);
                s.push_snapshot(encode_for_subscriber(TickKind::Reset, t, 0));
                kick(&mut self.effects, e.idx, &mut c);
                delivered += 1;
                continue;
            }
            let conflated_before = s.conflated_total();
            let slow = if gap == 0 {
                s.push_tick(t, now)
            } else {
                // This shard's inbox overflowed: ticks never reached this subscriber.
                let frame = encode_for_subscriber(TickKind::Tick, t, gap);
                let one = Arc::new(SharedTick {
                    frame,
                    deflated: std::sync::OnceLock::new(),
                    ..(**t).clone()
                });
                s.push_tick(&one, now)
            };
            let conflated = s.conflated_total() - conflated_before;
            if conflated > 0 {
                self.shared.metrics.conflated.fetch_add(conflated, Relaxed);
            }
            if slow {
                // A slow-consumer episode started: the session's deadline may be earlier.
                refile_session(&mut self.wheel, &mut c, e.idx);
            }
            kick(&mut self.effects, e.idx, &mut c);
            delivered += 1;
        }
        delivered
    }

    /// Takes every wheel entry due at `now` for [`Self::fire_due`].
    pub fn advance_timers(&mut self, now: u64) {
        self.wheel.advance(now, &mut self.fired);
    }

    /// Handles up to `max` of the entries taken by [`Self::advance_timers`] (the runtime
    /// yields between slices of a burst). Returns whether some are left.
    pub fn fire_due(&mut self, now: u64, max: usize) -> bool {
        let end = self.fired.len().min(self.fired_pos.saturating_add(max));
        while self.fired_pos < end {
            let (key, ev) = self.fired[self.fired_pos];
            self.fired_pos += 1;
            self.fire(key, ev, now);
        }
        if self.fired_pos >= self.fired.len() {
            self.fired.clear();
            self.fired_pos = 0;
            return false;
        }
        true
    }

    /// The clock reached `now`: every deadline due fires (handshake and hard-drop
    /// deadlines shut the socket down, a session's goes to [`Session::handle_timeout`]).
    pub fn handle_timeout(&mut self, now: u64) {
        self.advance_timers(now);
        while self.fire_due(now, usize::MAX) {}
    }

    /// A connection's wheel entry taken off the wheel: handles every deadline of the
    /// connection that is due, earliest first, then files the entry for the next one.
    /// `key` must still be the connection's key: the runtime yields between slices of a
    /// burst, and the entry can be cancelled or re-filed in between.
    fn fire(&mut self, key: TimerKey, ev: TimerEvent, now: u64) {
        let idx = ev.idx as usize;
        let Some(conn) = self.conns.get(idx).cloned() else {
            return;
        };
        let mut c = conn.borrow_mut();
        if c.generation != ev.generation {
            return;
        }
        let Some(mut due) = c.deadlines.fired(key, now) else {
            return;
        };
        while let Some(slot) = c.deadlines.next_due(&mut due, now) {
            let kind = CONN_TIMERS[slot];
            match kind {
                ConnTimer::Handshake | ConnTimer::HardDrop => {
                    if kind == ConnTimer::Handshake && c.session.is_none() {
                        let e = AuditEvent {
                            ip: self.pending.ip_of(idx),
                            ..AuditEvent::new(now, Event::Handshake, Outcome::Rejected, Reason::Timeout)
                        };
                        self.audit(e);
                    }
                    self.effects.push(Effect::Shutdown(ConnId {
                        idx,
                        generation: c.generation,
                    }));
                    c.dead = true;
                    kick(&mut self.effects, idx, &mut c);
                }
                ConnTimer::Session => {
                    // Every deadline of the session due at `now`; `apply` files its next.
                    if let Some(s) = c.session.as_mut() {
                        s.handle_timeout(now);
                    }
                    self.apply(idx, &mut c, now);
                }
            }
        }
        refile(&mut self.wheel, &mut c, idx);
    }

    /// A control message from the hub: revocation, drain, or a reauth result.
    pub fn handle_control(&mut self, now: u64, msg: Control) {
        match msg {
            Control::Revoke(target, reply) => {
                let mut closed = 0;
                let conns: Vec<(usize, ConnRef<I>)> =
                    self.conns.iter().map(|(i, c)| (i, c.clone())).collect();
                for (idx, conn) in conns {
                    let mut c = conn.borrow_mut();
                    let hit = !c.dead
                        && c.session
                            .as_ref()
                            .map(|s| s.claims())
                            .is_some_and(|cl| target.matches(&cl.sub, cl.sid.as_deref(), cl.jti.as_deref()));
                    if hit && c.session.as_mut().is_some_and(Session::revoke) {
                        self.apply(idx, &mut c, now);
                        closed += 1;
                    }
                }
                self.effects.push(Effect::RevokeDone { reply, closed });
            }
            Control::Drain => self.drain(now),
            Control::ReauthDone {
                idx,
                generation,
                id,
                result,
            } => {
                let shared = self.shared.clone();
                self.answer(ConnId { idx, generation }, now, |s| {
                    s.finish_reauth(id, *result, now, shared.hub.symbols())
                });
            }
            Control::Published {
                idx,
                generation,
                id,
                result,
            } => self.answer(ConnId { idx, generation }, now, |s| s.publish_done(id, result)),
        }
    }

    /// An answer that came back from off the loop (a reauth verified, a publish ordered
    /// by the bus) for connection `id`, if it is still there.
    fn answer(&mut self, id: ConnId, now: u64, f: impl FnOnce(&mut Session)) {
        let Some(conn) = self.get(id) else { return };
        let mut c = conn.borrow_mut();
        if let Some(s) = c.session.as_mut() {
            f(s);
        }
        self.apply(id.idx, &mut c, now);
    }

    /// Stop accepting; every session closes with `1001`, every pending upgrade is shut
    /// down. Once: later drains do nothing.
    fn drain(&mut self, now: u64) {
        if std::mem::replace(&mut self.draining, true) {
            return;
        }
        self.effects.push(Effect::StopAccepting);
        // With `[cluster]` another node holds the same history: say so (PROTOCOL.md 10).
        let reason = match self.shared.bus.enabled() {
            true => DRAIN_REASON_CLUSTER,
            false => "server draining",
        };
        let conns: Vec<(usize, ConnRef<I>)> = self.conns.iter().map(|(i, c)| (i, c.clone())).collect();
        for (idx, conn) in conns {
            let mut c = conn.borrow_mut();
            match c.session.as_mut() {
                Some(s) => {
                    s.close(CloseCode::GOING_AWAY, reason);
                    self.apply(idx, &mut c, now);
                }
                None => self.effects.push(Effect::Shutdown(ConnId {
                    idx,
                    generation: c.generation,
                })),
            }
        }
    }

    /// Once a second: gives back the sessions' spare capacity; returns the bytes queued
    /// across the shard's connections. Connections borrowed elsewhere are skipped.
    pub fn housekeeping(&mut self) -> u64 {
        let mut queued = 0u64;
        for (_, c) in self.conns.iter() {
            if let Ok(mut c) = c.try_borrow_mut()
                && let Some(s) = c.session.as_mut()
            {
                queued += s.queued_bytes() as u64;
                s.trim();
            }
        }
        queued
    }
}

/// Arms (or moves) the connection's deadline of that kind.
/// The `1001` reason of a draining node of a cluster: any other node serves the client
/// with no tick lost when it reconnects with `since`.
pub const DRAIN_REASON_CLUSTER: &str = "server draining: reconnect with since";

/// Queues what a `since` is owed ahead of the live stream: the held ticks through the
/// outbound queue like live ones (so a client that cannot take its own replay is
/// conflated and cut like any slow consumer), or the `reset` snapshot. True when this
/// started a slow-consumer episode (the session's deadline may be earlier: re-file it).
fn queue_replay(s: &mut Session, replay: Replay, now: u64, metrics: &crate::metrics::Metrics) -> bool {
    match replay {
        Replay::Ticks { ticks, skipped } => {
            let mut slow = false;
            let conflated_before = s.conflated_total();
            let n = ticks.len();
            for (i, t) in ticks.iter().enumerate() {
                let left_out = if i + 1 == n { skipped } else { 0 };
                slow |= s.push_replayed(t, left_out, now);
            }
            metrics.replayed.fetch_add(n as u64 + skipped, Relaxed);
            let conflated = s.conflated_total() - conflated_before;
            if conflated > 0 {
                metrics.conflated.fetch_add(conflated, Relaxed);
            }
            slow
        }
        Replay::Reset(t) => {
            metrics.replay_resets.fetch_add(1, Relaxed);
            s.push_snapshot(encode_for_subscriber(TickKind::Reset, &t, 0));
            false
        }
        Replay::UpToDate | Replay::Nothing => false,
    }
}

fn arm<I>(wheel: &mut TimerWheel<TimerEvent>, c: &mut Conn<I>, idx: usize, kind: ConnTimer, at: u64) {
    c.deadlines.set(kind.slot(), at);
    refile(wheel, c, idx);
}

/// Files the session's deadline ([`Session::poll_timeout`]) if it is not the one filed:
/// after every input to the session (cheap when nothing moved: one comparison).
fn refile_session<I>(wheel: &mut TimerWheel<TimerEvent>, c: &mut Conn<I>, idx: usize) {
    let at = c
        .session
        .as_ref()
        .and_then(Session::poll_timeout)
        .unwrap_or(UNARMED);
    let slot = ConnTimer::Session.slot();
    if c.deadlines.get(slot) != at {
        c.deadlines.set(slot, at);
        refile(wheel, c, idx);
    }
}

fn refile<I>(wheel: &mut TimerWheel<TimerEvent>, c: &mut Conn<I>, idx: usize) {
    let generation = c.generation;
    c.deadlines.refile(wheel, || TimerEvent {
        idx: idx as u32,
        generation,
    });
}

/// Output is queued for connection `idx` (or it must end): have its writer started
/// unless one runs already.
fn kick<I: ConnIo>(effects: &mut Vec<Effect>, idx: usize, c: &mut Conn<I>) {
    if c.io.writer_parked() {
        effects.push(Effect::Kick(ConnId {
            idx,
            generation: c.generation,
        }));
    }
}

#[cfg(test)]
#[path = "shard_tests.rs"]
mod tests;
