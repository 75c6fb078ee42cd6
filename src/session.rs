//! One connection's state after the `101`: a plain struct driven by `handle_*(now, ..)`.
//!
//! The session never touches a socket or a clock. The shard feeds it decoded WebSocket
//! messages and the current time (milliseconds since the Unix epoch, derived from a
//! monotonic clock by the runtime). That keeps every rule of PROTOCOL.md sections 5 and 6
//! testable on a virtual clock, in microseconds, without a network. Like `quinn-proto`'s
//! `Connection`, it has inputs (`handle_*`, [`Session::push_tick`],
//! [`Session::push_snapshot`], [`Session::close`]) and exactly three ways out, polled by
//! its driver after every input:
//!
//! - [`Session::poll_transmit`]: moves queued frames (replies, ticks, pings, the close
//!   frame) into the writer's buffer and says what went out ([`Transmit`]: bytes, the
//!   oldest tick's stamp, whether the session is done). It also ends a slow-consumer
//!   episode once the queue is back under its bound. The outbound queue itself is private.
//! - [`Session::poll_timeout`]: the earliest deadline the session wants, if any. The
//!   driver files exactly that one (one timer per connection) and, when it is reached,
//!   calls [`Session::handle_timeout`], which handles every due deadline. The session is
//!   the only owner of its deadlines: `reauth_required` at `exp - reauth_lead` (up to
//!   `reauth_spread` earlier, drawn per token: `reauth_notice_ms`), the `4001` close at
//!   `exp + reauth_grace` exactly (leeway never extends a deadline), the heartbeat every
//!   `heartbeat`, the idle close at `last_rx + idle_timeout`, the slow-consumer close at
//!   the start of an episode plus `slow_consumer_grace`. After any `handle_*` call (and
//!   after a [`Session::push_tick`] that returns `true`) the driver compares
//!   `poll_timeout` with what it filed and re-files when it changed. `poll_transmit` and
//!   [`Session::note_rx`] only ever move the deadline later, so a driver that does not
//!   re-file after them at worst wakes the session early, for nothing.
//! - [`Session::poll_event`]: the things the session cannot do alone, in order
//!   ([`Event`]: subscription-table changes, batches to publish, the close, security-log
//!   entries). The queue lives in the session's rarely-allocated part and is empty
//!   between inputs once the driver has polled it.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::num::NonZeroU64;
use std::sync::Arc;

use bytes::Bytes;

use crate::auth::jwt::{AuthError, Role, VerifiedClaims};
use crate::auth::seclog::{self, Outcome, Reason};
use crate::feed::entitlement::Entitlements;
use crate::feed::msg::{self, ClientMsg, ErrorCode, MsgLimits};
use crate::feed::outbound::{Deflating, OutboundQueue, Pushed, SharedTick};
use crate::feed::symbol::{SymbolId, SymbolTable, is_valid_symbol};
use crate::feed::tick::Tick;
use crate::proto::close::CloseCode;
use crate::proto::deflate::{Agreed, Deflater};
use crate::proto::frame::{Incoming, OpCode, encode_close, encode_frame};

/// Settings a session needs, taken from the `[limits]` and `[lifetime]` config sections.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    pub max_symbols_per_connection: usize,
    pub inbound_messages_per_sec: u32,
    pub outbound_queue_bytes: usize,
    pub reauth_lead_ms: u64,
    pub reauth_grace_ms: u64,
    /// `reauth_required` goes out up to this much earlier than `exp - reauth_lead` (see
    /// `reauth_notice_ms`). 0 in the default (and in tests that expect exact times).
    pub reauth_spread_ms: u64,
    pub heartbeat_ms: u64,
    pub idle_timeout_ms: u64,
    pub slow_consumer_grace_ms: u64,
    pub msg_limits: MsgLimits,
    /// `[cluster]`: a `publish` goes to the bus ([`Event::PublishBus`]) and is acknowledged
    /// once the ticks are in the cluster's order ([`Session::publish_done`]).
    pub cluster: bool,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            max_symbols_per_connection: 1024,
            inbound_messages_per_sec: 50,
            outbound_queue_bytes: 1 << 20,
            reauth_lead_ms: 60_000,
            reauth_grace_ms: 30_000,
            reauth_spread_ms: 0,
            heartbeat_ms: 15_000,
            idle_timeout_ms: 45_000,
            slow_consumer_grace_ms: 5_000,
            msg_limits: MsgLimits::default(),
            cluster: false,
        }
    }
}

/// Verifies an in-band `reauth` token exactly like a handshake token (signature, claims,
/// leeway, revocation). The session itself checks that the identity (`sub`, `sid`, `did`)
/// and the IP binding are unchanged.
pub trait ReauthVerifier {
    fn verify_reauth(&self, token: &str, now_unix_secs: u64) -> Result<VerifiedClaims, AuthError>;

    /// Hand the verification to someone else (the runtime's verifier threads, so a burst
    /// of reauths never stalls a shard's event loop): return `true` when taken, and the
    /// result comes back later through [`Session::finish_reauth`]. The default verifies
    /// inline.
    fn defer_reauth(&self, _id: Option<u64>, _token: &str, _now_unix_secs: u64) -> bool {
        false
    }
}

/// `since` by symbol name (empty: no allocation).
pub type Since = std::collections::HashMap<Box<str>, u64>;

/// What the shard must do on the session's behalf, in order ([`Session::poll_event`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Add these (already acknowledged) symbols to the shard's subscription table; queue
    /// snapshots when asked. `waiting`: acknowledged names that no tick has created yet;
    /// the shard waits for their first tick on this connection's behalf and then calls
    /// [`Session::activate`].
    Subscribe {
        ids: Vec<SymbolId>,
        snapshot: bool,
        waiting: Vec<Box<str>>,
        /// `since` of the symbols newly subscribed here (PROTOCOL.md 10), by name: replay
        /// what the client missed instead of a snapshot. A symbol already subscribed keeps
        /// its stream (its `since` is ignored: every tick after its subscription is on
        /// its way already).
        since: Since,
    },
    /// Remove these symbols (and these waiting names) from the shard's tables.
    Unsubscribe {
        ids: Vec<SymbolId>,
        waiting: Vec<Box<str>>,
    },
    /// Hand a validated, entitled batch to the hub (the ack is already queued).
    Publish { ticks: Vec<(SymbolId, Tick)> },
    /// `[cluster]`: hand a validated, entitled batch to the bus; the answer comes back
    /// through [`Session::publish_done`] with this `id`.
    PublishBus {
        id: Option<u64>,
        ticks: Vec<(Box<str>, Tick)>,
    },
    /// A close frame is queued: flush it, then end the connection.
    Close { code: u16 },
    /// A security-log event (reauth outcomes, policy closes).
    Log {
        event: seclog::Event,
        outcome: Outcome,
        reason: Reason,
    },
}

/// Every [`TimerKind`], in the order equal deadlines are handled.
const TIMER_KINDS: [TimerKind; 5] = [
    TimerKind::ReauthRequired,
    TimerKind::ReauthDeadline,
    TimerKind::Heartbeat,
    TimerKind::Idle,
    TimerKind::SlowConsumer,
];

/// What [`Session::poll_transmit`] moved into the writer's buffer.
#[must_use]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// Bytes appended to the buffer.
    pub bytes: usize,
    /// The oldest `accepted_ns` among the ticks moved (`u64::MAX`: none), for the
    /// publish-to-write histogram.
    pub oldest_tick_ns: u64,
    /// The close frame has gone out with this transmit (or before): nothing more will
    /// ever be queued, the connection can end once these bytes are written.
    pub done: bool,
}

/// A session's deadlines (see the module documentation), for [`Session::deadline`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimerKind {
    ReauthRequired,
    ReauthDeadline,
    Heartbeat,
    Idle,
    SlowConsumer,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Open,
    /// A close frame is queued; everything the client sends from now on is ignored.
    Closing,
}

/// How many `rate_limited` replies within a minute end the connection with `4029`.
const MAX_RATE_LIMITED_REPLIES: usize = 10;
const RATE_LIMITED_WINDOW_MS: u64 = 60_000;

/// What a session keeps of its token: the identity that revocation and reauth compare
/// against, the expiry and the roles. The rest of the claims (`iat`, `nbf`, the symbol
/// patterns, which live compiled in [`Entitlements`], the `kid`, the IP binding, already
/// checked) is dropped at admission: 80 bytes here against 232 for the full claims, and
/// the difference moves an idle connection's state down one allocator size class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub sub: Box<str>,
    pub sid: Option<Box<str>>,
    pub jti: Option<Box<str>>,
    pub did: Option<Box<str>>,
    /// Expiry of the token in force, Unix seconds.
    pub exp: u64,
    roles: u8,
}

fn role_bit(r: Role) -> u8 {
    match r {
        Role::Subscriber => 1,
        Role::Publisher => 2,
        Role::Admin => 4,
    }
}

impl Identity {
    /// Keeps the identity of verified claims and compiles their symbol patterns.
    pub fn from_claims(claims: VerifiedClaims) -> (Identity, Entitlements) {
        let ents = Entitlements::compile(&claims.symbols);
        let roles = claims.roles.iter().fold(0, |acc, r| acc | role_bit(*r));
        let id = Identity {
            sub: claims.sub.into_boxed_str(),
            sid: claims.sid.map(String::into_boxed_str),
            jti: claims.jti.map(String::into_boxed_str),
            did: claims.did.map(String::into_boxed_str),
            exp: claims.exp,
            roles,
        };
        (id, ents)
    }

    /// Whether the token in force grants `r`.
    pub fn has_role(&self, r: Role) -> bool {
        self.roles & role_bit(r) != 0
    }
}

/// The part of a session most connections never need.
#[derive(Default)]
struct Rare {
    /// Recent `rate_limited` replies (only a flooding client has any).
    rate_limited_at: VecDeque<u64>,
    /// Subscriptions to names no tick has created yet, acknowledged and held here rather
    /// than in the server-wide symbol table, which only publishers fill; counted against
    /// `max_symbols_per_connection` like the others. See [`Session::activate`].
    waiting: Vec<Box<str>>,
    /// Events not polled yet ([`Session::poll_event`]): empty between inputs.
    events: VecDeque<Event>,
    /// permessage-deflate, when negotiated.
    deflate: Option<OutDeflate>,
}

/// The outbound side of permessage-deflate for one connection.
struct OutDeflate {
    agreed: Agreed,
    level: u32,
    /// The connection's own compressor (context takeover only), made at the first message.
    own: Option<Deflater>,
}

pub struct Session {
    cfg: Arc<SessionConfig>,
    claims: Identity,
    ents: Entitlements,
    client_ip: IpAddr,
    state: State,
    /// Subscribed symbols (a set; small, iterated on narrowing reauth only).
    subs: Vec<SymbolId>,
    outbound: OutboundQueue,
    /// Inbound token bucket: tokens scaled by 1000 to stay in integers.
    bucket_milli: u64,
    bucket_at_ms: u64,
    /// State only some connections ever have (see [`Rare`]). Boxed on purpose: 8 bytes
    /// in every connection instead of 56.
    rare: Option<Box<Rare>>,
    last_rx_ms: u64,
    /// `exp` for which `reauth_required` was already sent (so it goes out once per token).
    reauth_notified_exp: Option<NonZeroU64>,
    /// When `reauth_required` goes out for the token in force (unix ms), drawn when the
    /// token was accepted: see [`reauth_notice_ms`].
    reauth_at_ms: u64,
    /// Since when the outbound queue is over its budget (slow consumer), if it is.
    slow_since_ms: Option<NonZeroU64>,
    /// When the next heartbeat ping goes out (unix ms). The first one goes out up to half
    /// a period early ([`heartbeat_phase`]): connections opened in the same second (a
    /// reconnect storm) would otherwise ping in lockstep, thousands of writes in one loop
    /// turn every `heartbeat`.
    heartbeat_at_ms: u64,
}

impl Session {
    /// A freshly admitted connection: queues `welcome`.
    pub fn new(cfg: Arc<SessionConfig>, claims: VerifiedClaims, client_ip: IpAddr, now_ms: u64) -> Self {
        let (claims, ents) = Identity::from_claims(claims);
        let cfg_heartbeat_ms = cfg.heartbeat_ms;
        let outbound = OutboundQueue::new(cfg.outbound_queue_bytes);
        let burst = u64::from(cfg.inbound_messages_per_sec.max(1)) * 1000;
        let mut s = Session {
            cfg,
            claims,
            ents,
            client_ip,
            state: State::Open,
            subs: Vec::new(),
            outbound,
            bucket_milli: burst,
            bucket_at_ms: now_ms,
            rare: None,
            last_rx_ms: now_ms,
            reauth_notified_exp: None,
            reauth_at_ms: 0,
            slow_since_ms: None,
            heartbeat_at_ms: now_ms + cfg_heartbeat_ms - heartbeat_phase(cfg_heartbeat_ms),
        };
        s.reauth_at_ms = reauth_notice_ms(&s.cfg, s.claims.exp, now_ms, spread_draw());
        s.outbound.push_control(json_frame(|b| {
            msg::encode_welcome(
                &s.claims.sub,
                s.claims.sid.as_deref(),
                s.claims.exp,
                s.cfg.heartbeat_ms,
                b,
            )
        }));
        s
    }

    /// The identity in force (`sub`, `sid`, `jti`, `did`, `exp`, roles).
    pub fn claims(&self) -> &Identity {
        &self.claims
    }

    pub fn subscriptions(&self) -> &[SymbolId] {
        &self.subs
    }

    /// The symbol `id` (named `name`) was retired before the shard could subscribe this
    /// session to it: the subscription waits for the name again. False when the session
    /// does not hold `id`.
    pub fn wait_again(&mut self, id: SymbolId, name: &str) -> bool {
        let Some(pos) = self.subs.iter().position(|s| *s == id) else {
            return false;
        };
        self.subs.swap_remove(pos);
        self.outbound.remove_symbol(id);
        self.rare
            .get_or_insert_with(Box::default)
            .waiting
            .push(Box::from(name));
        true
    }

    /// Subscribed names that no tick has created yet.
    pub fn waiting_subscriptions(&self) -> &[Box<str>] {
        self.rare.as_ref().map_or(&[], |r| &r.waiting)
    }

    /// The symbol `name`, which this session subscribed to before it existed, now exists
    /// as `id`: the subscription becomes an ordinary one. Returns false when the session
    /// no longer waits for `name` (it unsubscribed meanwhile).
    pub fn activate(&mut self, name: &str, id: SymbolId) -> bool {
        let Some(r) = self.rare.as_mut() else { return false };
        let Some(pos) = r.waiting.iter().position(|n| **n == *name) else {
            return false;
        };
        r.waiting.swap_remove(pos);
        if !self.subs.contains(&id) {
            self.subs.push(id);
        }
        true
    }

    pub fn is_closing(&self) -> bool {
        self.state == State::Closing
    }

    pub fn last_rx_ms(&self) -> u64 {
        self.last_rx_ms
    }

    /// The deadline of that kind, if the session wants it (for tests and diagnostics).
    pub fn deadline(&self, kind: TimerKind) -> Option<u64> {
        if self.state == State::Closing {
            return None;
        }
        match kind {
            TimerKind::ReauthRequired => (self.reauth_notified_exp.map(NonZeroU64::get)
                != Some(self.claims.exp))
            .then_some(self.reauth_at_ms),
            TimerKind::ReauthDeadline => Some(self.deadline_ms()),
            TimerKind::Heartbeat => Some(self.heartbeat_at_ms),
            TimerKind::Idle => Some(self.last_rx_ms + self.cfg.idle_timeout_ms),
            TimerKind::SlowConsumer => self
                .slow_since_ms
                .map(|t| t.get() + self.cfg.slow_consumer_grace_ms),
        }
    }

    /// The earliest deadline the session wants (unix ms): call [`Self::handle_timeout`]
    /// then. `None` once the session is closing (the driver's own hard-drop deadline takes
    /// over).
    #[must_use]
    pub fn poll_timeout(&self) -> Option<u64> {
        TIMER_KINDS.iter().filter_map(|&k| self.deadline(k)).min()
    }

    /// `exp + reauth_grace`, exactly: the moment the `4001` close goes out.
    pub fn deadline_ms(&self) -> u64 {
        self.claims
            .exp
            .saturating_mul(1000)
            .saturating_add(self.cfg.reauth_grace_ms)
    }

    /// Give back spare heap capacity (once a second, from the shard's housekeeping): an
    /// idle connection should cost its state and nothing more.
    pub fn trim(&mut self) {
        self.outbound.shrink_if_empty();
        if self.rare.as_ref().is_some_and(|r| {
            r.rate_limited_at.is_empty() && r.waiting.is_empty() && r.events.is_empty() && r.deflate.is_none()
        }) {
            self.rare = None;
        }
    }

    /// Bytes (any frame, even a pong) arrived from the peer.
    pub fn note_rx(&mut self, now_ms: u64) {
        self.last_rx_ms = now_ms;
    }

    /// The clock reached `now` (at or after [`Self::poll_timeout`], or earlier: then
    /// nothing happens). Handles every deadline due at `now`, earliest first (equal ones
    /// in [`TimerKind`] order); a deadline a handler moves to `now` or earlier waits for
    /// the next call.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        let mut due = [false; TIMER_KINDS.len()];
        for (d, &k) in due.iter_mut().zip(&TIMER_KINDS) {
            *d = self.deadline(k).is_some_and(|at| at <= now_ms);
        }
        loop {
            let mut best: Option<(usize, u64)> = None;
            for (i, &k) in TIMER_KINDS.iter().enumerate() {
                if !due[i] {
                    continue;
                }
                if let Some(at) = self.deadline(k)
                    && at <= now_ms
                    && best.is_none_or(|(_, b)| at < b)
                {
                    best = Some((i, at));
                }
            }
            let Some((i, _)) = best else { return };
            due[i] = false;
            self.fire(TIMER_KINDS[i], now_ms);
        }
    }

    /// One due deadline.
    fn fire(&mut self, kind: TimerKind, now_ms: u64) {
        match kind {
            TimerKind::ReauthRequired => {
                let exp = self.claims.exp;
                self.reauth_notified_exp = NonZeroU64::new(exp);
                let deadline_secs = self.deadline_ms() / 1000;
                self.outbound
                    .push_control(json_frame(|b| msg::encode_reauth_required(exp, deadline_secs, b)));
            }
            TimerKind::ReauthDeadline => {
                self.log(seclog::Event::Close, Outcome::Closed, Reason::TokenExpired);
                self.close(CloseCode::TOKEN_EXPIRED, "token expired");
            }
            TimerKind::Heartbeat => {
                self.outbound.push_control(encode_frame(OpCode::Ping, b""));
                self.heartbeat_at_ms = now_ms + self.cfg.heartbeat_ms.max(1);
            }
            TimerKind::Idle => {
                self.log(seclog::Event::Close, Outcome::Closed, Reason::Idle);
                self.close(CloseCode::IDLE, "idle timeout");
            }
            TimerKind::SlowConsumer => {
                if self.outbound.over_budget() || self.outbound.is_conflating() {
                    self.log(seclog::Event::Close, Outcome::Closed, Reason::SlowConsumer);
                    // The queue is what is slow: do not make the close wait behind it.
                    self.outbound.clear();
                    self.close(CloseCode::SLOW_CONSUMER, "slow consumer");
                } else {
                    self.slow_since_ms = None;
                }
            }
        }
    }

    /// A tick from the shard's fan-out. Returns `true` when the queue has just gone over
    /// its budget: a slow-consumer episode started, and [`Self::poll_timeout`] may be
    /// earlier now (the only input on the hot path, so the only one that says so).
    #[must_use]
    pub fn push_tick(&mut self, t: &Arc<SharedTick>, now_ms: u64) -> bool {
        self.push_with(now_ms, |q| q.push_tick(t))
    }

    /// Bytes the outbound queue can still take before it conflates: what a replay is cut
    /// to ([`crate::feed::history::History::replay`]), so queuing a `since` costs at most
    /// a queue's worth of work however many symbols and ticks it names.
    pub fn outbound_room(&self) -> usize {
        self.cfg
            .outbound_queue_bytes
            .saturating_sub(self.outbound.queued_bytes())
    }

    /// [`Self::push_tick`] of a replayed tick (`since`), standing for `skipped` ticks left
    /// out right before it (a replay cut to the queue's budget,
    /// [`crate::feed::history::Replay::Ticks`]). It is not sampled for publish-to-write.
    pub fn push_replayed(&mut self, t: &Arc<SharedTick>, skipped: u64, now_ms: u64) -> bool {
        self.push_with(now_ms, |q| q.push_replayed(t, skipped))
    }

    /// A tick into the outbound queue (none once closing); true when the push started a
    /// slow-consumer episode.
    fn push_with(&mut self, now_ms: u64, push: impl FnOnce(&mut OutboundQueue) -> Pushed) -> bool {
        if self.state == State::Closing {
            return false;
        }
        match push(&mut self.outbound) {
            Pushed::Queued => false,
            Pushed::Conflated | Pushed::OverBudget => {
                if self.slow_since_ms.is_none() {
                    self.slow_since_ms = NonZeroU64::new(now_ms.max(1));
                    true
                } else {
                    false
                }
            }
        }
    }

    /// Holds the outbound queue to its budget after the session queued replies (the shard
    /// calls it after carrying out a batch of [`Event`]s, which may queue snapshots; ticks
    /// go through [`Self::push_tick`]). Every queued byte counts, control frames included:
    /// - past `outbound_queue_bytes` a slow-consumer episode starts (once per episode):
    ///   the `4008` close is due `slow_consumer_grace` later ([`Self::poll_timeout`])
    ///   unless the client has read its way back under the bound by then;
    /// - control frames alone past twice `outbound_queue_bytes` (a client that keeps
    ///   asking and never reads; replies are never conflated, and a reply-heavy client
    ///   could otherwise queue megabytes within the grace) close with `4008` at once, so
    ///   a connection's replies never hold more than twice the bound plus one reply.
    pub fn enforce_budget(&mut self, now_ms: u64) {
        if self.state == State::Closing {
            return;
        }
        if self.outbound.control_bytes() > self.cfg.outbound_queue_bytes.saturating_mul(2) {
            self.log(seclog::Event::Close, Outcome::Closed, Reason::SlowConsumer);
            self.outbound.clear();
            self.close(CloseCode::SLOW_CONSUMER, "slow consumer");
            return;
        }
        if self.outbound.over_budget() && self.slow_since_ms.is_none() {
            self.slow_since_ms = NonZeroU64::new(now_ms.max(1));
        }
    }

    /// Moves whole queued frames into `buf` (reserving room for them first) until `max`
    /// bytes would be exceeded; a first frame larger than `max` still moves, so a small
    /// `max` cannot stall the queue. Once the queue is back under its bound the
    /// slow-consumer episode is over (its deadline goes: [`Self::poll_timeout`] can only
    /// get later here).
    pub fn poll_transmit(&mut self, buf: &mut Vec<u8>, max: usize) -> Transmit {
        self.poll_transmit_with(buf, max, &mut None)
    }

    /// Compresses what goes out with permessage-deflate from now on (negotiated in the
    /// upgrade): with context takeover through a compressor of the connection's own, made
    /// at the first message; without, ticks go out as frames compressed once per tick
    /// for every such subscriber, other messages uncompressed.
    pub fn set_deflate(&mut self, agreed: Agreed, level: u32) {
        self.rare.get_or_insert_with(Box::default).deflate = Some(OutDeflate {
            agreed,
            level,
            own: None,
        });
    }

    /// The session negotiated permessage-deflate.
    pub fn compresses(&self) -> bool {
        self.rare.as_ref().is_some_and(|r| r.deflate.is_some())
    }

    /// [`Self::poll_transmit`], with the shard's compressor of shared tick frames
    /// (used only by connections that negotiated `server_no_context_takeover`).
    pub fn poll_transmit_with(
        &mut self,
        buf: &mut Vec<u8>,
        max: usize,
        shared: &mut Option<Deflater>,
    ) -> Transmit {
        buf.reserve(self.outbound.queued_bytes().min(max));
        let (bytes, oldest_tick_ns) = match self.rare.as_deref_mut().and_then(|r| r.deflate.as_mut()) {
            None => self.outbound.drain_stamped(buf, max),
            Some(d) => {
                let own = if d.agreed.server_no_context_takeover {
                    None
                } else {
                    let (a, level) = (d.agreed, d.level);
                    Some(
                        d.own
                            .get_or_insert_with(|| Deflater::new(level, a.server_window_bits, false)),
                    )
                };
                let mut sink = Deflating {
                    own,
                    shared,
                    level: d.level,
                };
                self.outbound.drain_with(buf, max, &mut sink)
            }
        };
        if !self.outbound.over_budget() && !self.outbound.is_conflating() {
            self.slow_since_ms = None;
        }
        if self.subs.is_empty() {
            // No subscription: what was queued were replies (the welcome, a pong), not a
            // stream that will refill the queue at once. The queue's buffer goes back now
            // rather than at the next once-a-second trim, so a connection that has just
            // been admitted and waits costs its state and nothing more.
            self.outbound.shrink_if_empty();
        }
        Transmit {
            bytes,
            oldest_tick_ns,
            done: self.state == State::Closing && self.outbound.is_empty(),
        }
    }

    /// Frames are waiting for [`Self::poll_transmit`].
    pub fn has_output(&self) -> bool {
        !self.outbound.is_empty()
    }

    /// Bytes of frames waiting (as queued; conflated ticks as originally encoded).
    pub fn queued_bytes(&self) -> usize {
        self.outbound.queued_bytes()
    }

    /// Ticks replaced in the conflation map so far (a running total).
    pub fn conflated_total(&self) -> u64 {
        self.outbound.conflated_total()
    }

    /// What the shard must do next on the session's behalf, in order: poll until `None`
    /// after every input.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.rare.as_mut()?.events.pop_front()
    }

    fn push_event(&mut self, e: Event) {
        self.rare.get_or_insert_with(Box::default).events.push_back(e);
    }

    fn log(&mut self, event: seclog::Event, outcome: Outcome, reason: Reason) {
        self.push_event(Event::Log {
            event,
            outcome,
            reason,
        });
    }

    /// The token in force was revoked: log it and close with `4003`. False when the
    /// session is already closing (then nothing happens).
    pub fn revoke(&mut self) -> bool {
        if self.state == State::Closing {
            return false;
        }
        self.log(seclog::Event::Close, Outcome::Closed, Reason::Revoked);
        self.close(CloseCode::REVOKED, "revoked");
        true
    }

    /// Queue a snapshot frame (after the `subscribed` ack).
    pub fn push_snapshot(&mut self, frame: Bytes) {
        if self.state == State::Open {
            self.outbound.push_control(frame);
        }
    }

    /// Queue a close frame and stop accepting input.
    pub fn close(&mut self, code: u16, reason: &str) {
        if self.state == State::Closing {
            return;
        }
        self.state = State::Closing;
        self.outbound.push_control(encode_close(code, reason));
        self.push_event(Event::Close { code });
    }

    /// A decoded WebSocket message from the client.
    pub fn handle_message(
        &mut self,
        now_ms: u64,
        m: Incoming,
        symbols: &SymbolTable,
        auth: &dyn ReauthVerifier,
    ) {
        self.last_rx_ms = now_ms;
        if self.state == State::Closing {
            return;
        }
        match m {
            Incoming::Text(text) => {
                let allowed = self.take_token(now_ms);
                let mut buf = text.to_vec();
                let parsed = msg::parse_client_msg(&mut buf, &self.cfg.msg_limits);
                if !allowed {
                    // Refused, but with the request's `id`, so a client that correlates
                    // replies learns which request it was.
                    let id = match &parsed {
                        Ok(cm) => cm.id(),
                        Err(e) => e.id,
                    };
                    self.reply_rate_limited(now_ms, id);
                    return;
                }
                match parsed {
                    Ok(cm) => self.handle_client_msg(now_ms, cm, symbols, auth),
                    Err(e) => self.reply_error(e.id, e.code, &e.message),
                }
            }
            Incoming::Binary(_) => {
                self.close(CloseCode::UNSUPPORTED, "binary frames are not supported");
            }
            // Control frames count against the message rate like data frames: a ping costs
            // the server a reply, a pong a wake-up.
            Incoming::Ping(payload) => {
                if self.take_token(now_ms) {
                    self.outbound.push_pong(encode_frame(OpCode::Pong, &payload));
                } else {
                    self.reply_rate_limited(now_ms, None);
                }
            }
            Incoming::Pong(_) => {
                if !self.take_token(now_ms) {
                    self.reply_rate_limited(now_ms, None);
                }
            }
            Incoming::Close(code) => {
                // Echo the peer's code (RFC 6455 5.5.1); a close without a code gets 1000.
                let code = code.map(|(c, _)| c).unwrap_or(CloseCode::NORMAL);
                self.close(code, "");
            }
        }
    }

    /// A protocol violation found by the frame decoder.
    /// Once per connection: after the first, the decoder refuses everything, and later
    /// reads must not log (or close) again.
    pub fn protocol_error(&mut self, code: u16, reason: &str) {
        if self.state == State::Closing {
            return;
        }
        let log_reason = match code {
            CloseCode::TOO_BIG => Reason::MessageTooBig,
            CloseCode::INVALID_PAYLOAD => Reason::InvalidPayload,
            _ => Reason::ProtocolError,
        };
        self.log(seclog::Event::Close, Outcome::Closed, log_reason);
        self.close(code, reason);
    }

    fn handle_client_msg(
        &mut self,
        now_ms: u64,
        m: ClientMsg,
        symbols: &SymbolTable,
        auth: &dyn ReauthVerifier,
    ) {
        match m {
            ClientMsg::Ping { id } => {
                self.outbound
                    .push_control(json_frame(|b| msg::encode_pong(id, b)));
            }
            ClientMsg::Subscribe {
                id,
                symbols: names,
                snapshot,
                since,
            } => self.subscribe(id, names, snapshot, since, symbols),
            ClientMsg::Unsubscribe { id, symbols: names } => self.unsubscribe(id, names, symbols),
            ClientMsg::Publish { id, ticks } => self.publish(id, ticks, symbols),
            ClientMsg::Reauth { id, token } => self.reauth(id, &token, now_ms, symbols, auth),
        }
    }

    fn subscribe(
        &mut self,
        id: Option<u64>,
        names: Vec<String>,
        snapshot: bool,
        since: Vec<(String, u64)>,
        symbols: &SymbolTable,
    ) {
        if !self.claims.has_role(Role::Subscriber) {
            self.reply_error(id, ErrorCode::Forbidden, "the subscriber role is required");
            return;
        }
        let mut accepted: Vec<(SymbolId, &str)> = Vec::new();
        let mut acked: Vec<&str> = Vec::new();
        let mut rejected: Vec<(&str, ErrorCode)> = Vec::new();
        let mut new_ids: Vec<SymbolId> = Vec::new();
        let mut new_waiting: Vec<&str> = Vec::new();
        // `since` counts for what this message subscribes anew (rejected symbols get
        // nothing replayed, held ones keep their stream).
        let asked: std::collections::HashMap<&str, u64> =
            since.iter().map(|(n, q)| (n.as_str(), *q)).collect();
        let mut since = Since::new();
        let mut take_since = |name: &str| {
            if let Some(&q) = asked.get(name) {
                since.insert(Box::from(name), q);
            }
        };
        for name in &names {
            if !is_valid_symbol(name) {
                rejected.push((name, ErrorCode::BadRequest));
                continue;
            }
            if !self.ents.allows(name) {
                rejected.push((name, ErrorCode::Forbidden));
                continue;
            }
            if acked.contains(&name.as_str()) {
                continue;
            }
            acked.push(name);
            // A subscriber never creates a symbol: a name no tick has created yet waits
            // on this connection (see `Rare::waiting`).
            match symbols.lookup(name) {
                _ if self.waiting_subscriptions().iter().any(|w| **w == **name) => {}
                Some(sid) => {
                    accepted.push((sid, name));
                    if !self.subs.contains(&sid) {
                        new_ids.push(sid);
                        take_since(name);
                    }
                }
                None => {
                    new_waiting.push(name);
                    take_since(name);
                }
            }
        }
        let held = self.subs.len() + self.waiting_subscriptions().len();
        if held + new_ids.len() + new_waiting.len() > self.cfg.max_symbols_per_connection {
            let msg = format!(
                "at most {} symbols per connection",
                self.cfg.max_symbols_per_connection
            );
            self.reply_error(id, ErrorCode::TooManySymbols, &msg);
            return;
        }
        self.subs.extend_from_slice(&new_ids);
        let waiting: Vec<Box<str>> = new_waiting.iter().map(|n| Box::from(*n)).collect();
        if !waiting.is_empty() {
            let r = self.rare.get_or_insert_with(Box::default);
            r.waiting.extend(waiting.iter().cloned());
        }
        self.outbound
            .push_control(json_frame(|b| msg::encode_subscribed(id, &acked, &rejected, b)));
        // Already-held symbols are acknowledged again but need no table change; a snapshot
        // is still sent for them when asked, so `snapshot:true` always yields the latest.
        let ids: Vec<SymbolId> = accepted.iter().map(|(s, _)| *s).collect();
        if !ids.is_empty() || !waiting.is_empty() {
            self.push_event(Event::Subscribe {
                ids,
                snapshot,
                waiting,
                since,
            });
        }
    }

    fn unsubscribe(&mut self, id: Option<u64>, names: Vec<String>, symbols: &SymbolTable) {
        let mut removed_ids = Vec::new();
        let mut removed_waiting: Vec<Box<str>> = Vec::new();
        let mut removed: Vec<&str> = Vec::new();
        for name in &names {
            if let Some(r) = self.rare.as_mut()
                && let Some(pos) = r.waiting.iter().position(|w| **w == **name)
            {
                removed_waiting.push(r.waiting.swap_remove(pos));
                removed.push(name);
            } else if let Some(sid) = symbols.lookup(name)
                && let Some(pos) = self.subs.iter().position(|s| *s == sid)
            {
                self.subs.swap_remove(pos);
                self.outbound.remove_symbol(sid);
                removed_ids.push(sid);
                removed.push(name);
            }
        }
        self.outbound
            .push_control(json_frame(|b| msg::encode_unsubscribed(id, &removed, None, b)));
        if !removed_ids.is_empty() || !removed_waiting.is_empty() {
            self.push_event(Event::Unsubscribe {
                ids: removed_ids,
                waiting: removed_waiting,
            });
        }
    }

    fn publish(&mut self, id: Option<u64>, ticks: Vec<(String, Tick)>, symbols: &SymbolTable) {
        if !self.claims.has_role(Role::Publisher) {
            self.reply_error(id, ErrorCode::Forbidden, "the publisher role is required");
            return;
        }
        // All or nothing: every symbol is checked before anything is handed on.
        for (name, _) in &ticks {
            if !is_valid_symbol(name) {
                let m = format!(
                    "invalid symbol {}",
                    crate::proto::frame::truncate_to_char_boundary(name, 40)
                );
                self.reply_error(id, ErrorCode::BadRequest, &m);
                return;
            }
            if !self.ents.allows(name) {
                let m = format!("not entitled to publish {name}");
                self.reply_error(id, ErrorCode::Forbidden, &m);
                return;
            }
        }
        if self.cfg.cluster {
            // Every node orders through the bus; the symbol need not exist on this one.
            for (name, _) in &ticks {
                if !crate::bus::is_bus_symbol(name) {
                    self.reply_error(id, ErrorCode::BadRequest, "symbol not usable on the bus");
                    return;
                }
            }
            let ticks: Vec<(Box<str>, Tick)> = ticks.into_iter().map(|(n, t)| (Box::from(n), t)).collect();
            if !ticks.is_empty() {
                self.push_event(Event::PublishBus { id, ticks });
            } else {
                self.outbound
                    .push_control(json_frame(|b| msg::encode_published(id, 0, b)));
            }
            return;
        }
        let mut batch = Vec::with_capacity(ticks.len());
        for (name, t) in &ticks {
            match symbols.intern(name) {
                Ok(sid) => batch.push((sid, *t)),
                Err(_) => {
                    self.reply_error(id, ErrorCode::NotFound, "symbol table full");
                    return;
                }
            }
        }
        let count = batch.len();
        if count > 0 {
            self.push_event(Event::Publish { ticks: batch });
        }
        self.outbound
            .push_control(json_frame(|b| msg::encode_published(id, count, b)));
    }

    /// The bus's answer to an [`Event::PublishBus`]: `Ok(count)` once the ticks are in the
    /// cluster's order (`published`), `Err(())` when the bus could not take them (`error`
    /// `unavailable`).
    pub fn publish_done(&mut self, id: Option<u64>, result: Result<usize, ()>) {
        if self.state != State::Open {
            return;
        }
        match result {
            Ok(n) => self
                .outbound
                .push_control(json_frame(|b| msg::encode_published(id, n, b))),
            Err(()) => self.reply_error(id, ErrorCode::Unavailable, "the bus is unavailable"),
        }
    }

    fn reauth(
        &mut self,
        id: Option<u64>,
        token: &str,
        now_ms: u64,
        symbols: &SymbolTable,
        auth: &dyn ReauthVerifier,
    ) {
        if auth.defer_reauth(id, token, now_ms / 1000) {
            return;
        }
        let result = auth.verify_reauth(token, now_ms / 1000);
        self.finish_reauth(id, result, now_ms, symbols);
    }

    /// The outcome of verifying a `reauth` token (inline, or from the verifier threads):
    /// identity and binding checks, then the new token takes effect or nothing changes.
    /// `now_ms` is when the result is applied (it places the next `reauth_required`).
    pub fn finish_reauth(
        &mut self,
        id: Option<u64>,
        result: Result<VerifiedClaims, AuthError>,
        now_ms: u64,
        symbols: &SymbolTable,
    ) {
        if self.state == State::Closing {
            return;
        }
        let fresh = match result {
            Ok(c) => c,
            Err(e) => {
                let code = match e {
                    AuthError::Malformed | AuthError::TooLarge => ErrorCode::BadRequest,
                    _ => ErrorCode::Forbidden,
                };
                self.log(seclog::Event::Reauth, Outcome::Rejected, e.log_reason());
                self.reply_error(id, code, "reauth refused");
                return;
            }
        };
        let same_identity = *fresh.sub == *self.claims.sub
            && fresh.sid.as_deref() == self.claims.sid.as_deref()
            && fresh.did.as_deref() == self.claims.did.as_deref();
        let ip_ok = fresh.cip.is_none_or(|ip| ip == self.client_ip);
        if !same_identity || !ip_ok {
            let reason = if same_identity {
                Reason::IpBinding
            } else {
                Reason::IdentityMismatch
            };
            self.log(seclog::Event::Reauth, Outcome::Rejected, reason);
            self.reply_error(id, ErrorCode::Forbidden, "reauth refused");
            return;
        }
        (self.claims, self.ents) = Identity::from_claims(fresh);
        self.reauth_at_ms = reauth_notice_ms(&self.cfg, self.claims.exp, now_ms, spread_draw());
        // Subscriptions the new token no longer allows end now.
        let may_subscribe = self.claims.has_role(Role::Subscriber);
        let mut dropped_ids = Vec::new();
        let mut dropped_names: Vec<Arc<str>> = Vec::new();
        self.subs.retain(|sid| {
            let keep = may_subscribe && symbols.name(*sid).is_some_and(|n| self.ents.allows(&n));
            if !keep {
                dropped_ids.push(*sid);
                if let Some(n) = symbols.name(*sid) {
                    dropped_names.push(n);
                }
            }
            keep
        });
        for sid in &dropped_ids {
            self.outbound.remove_symbol(*sid);
        }
        let mut dropped_waiting: Vec<Box<str>> = Vec::new();
        if let Some(r) = self.rare.as_mut() {
            let ents = &self.ents;
            r.waiting.retain(|n| {
                let keep = may_subscribe && ents.allows(n);
                if !keep {
                    dropped_waiting.push(n.clone());
                }
                keep
            });
        }
        self.outbound
            .push_control(json_frame(|b| msg::encode_reauthed(id, self.claims.exp, b)));
        if !dropped_ids.is_empty() || !dropped_waiting.is_empty() {
            let names: Vec<&str> = dropped_names
                .iter()
                .map(|n| &**n)
                .chain(dropped_waiting.iter().map(|n| &**n))
                .collect();
            self.outbound.push_control(json_frame(|b| {
                msg::encode_unsubscribed(None, &names, Some("entitlement"), b)
            }));
            self.push_event(Event::Unsubscribe {
                ids: dropped_ids,
                waiting: dropped_waiting,
            });
        }
        self.log(seclog::Event::Reauth, Outcome::Accepted, Reason::Ok);
    }

    /// Inbound message token bucket (`inbound_messages_per_sec`, burst of one second).
    fn take_token(&mut self, now_ms: u64) -> bool {
        let rate = u64::from(self.cfg.inbound_messages_per_sec);
        if rate == 0 {
            return true;
        }
        let cap = rate * 1000;
        let elapsed = now_ms.saturating_sub(self.bucket_at_ms);
        self.bucket_at_ms = self.bucket_at_ms.max(now_ms);
        self.bucket_milli = (self.bucket_milli + elapsed.saturating_mul(rate)).min(cap);
        if self.bucket_milli >= 1000 {
            self.bucket_milli -= 1000;
            true
        } else {
            false
        }
    }

    fn reply_rate_limited(&mut self, now_ms: u64, id: Option<u64>) {
        let q = &mut self.rare.get_or_insert_with(Box::default).rate_limited_at;
        while q
            .front()
            .is_some_and(|t| now_ms.saturating_sub(*t) >= RATE_LIMITED_WINDOW_MS)
        {
            q.pop_front();
        }
        if q.len() >= MAX_RATE_LIMITED_REPLIES {
            self.log(seclog::Event::Close, Outcome::Closed, Reason::MessageRate);
            self.close(CloseCode::MESSAGE_RATE, "message rate exceeded");
            return;
        }
        q.push_back(now_ms);
        self.reply_error(id, ErrorCode::RateLimited, "too many messages");
    }

    fn reply_error(&mut self, id: Option<u64>, code: ErrorCode, message: &str) {
        self.outbound
            .push_control(json_frame(|b| msg::encode_error(id, code, message, b)));
    }
}

/// A text frame of the JSON that `encode` writes, built in the thread's scratch buffer (a
/// buffer per session would cost every idle connection 24 bytes and a reallocation after
/// each trim).
fn json_frame(encode: impl FnOnce(&mut Vec<u8>)) -> Bytes {
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    SCRATCH.with_borrow_mut(|buf| {
        buf.clear();
        encode(buf);
        let frame = encode_frame(OpCode::Text, buf);
        if buf.capacity() > 64 * 1024 {
            *buf = Vec::new();
        }
        frame
    })
}

/// When `reauth_required` goes out for a token expiring at `exp` (unix seconds) accepted at
/// `now_ms`: `exp - reauth_lead - offset`, where `offset` is the fraction `draw / 2^32` of
/// the spread window. The window is `reauth_spread`, but at most half of the time from now
/// to `exp - reauth_lead`, so a short token is never asked to refresh at once. Without
/// it, 10,000 tokens minted in the same second (clients that reconnected together)
/// would ask for 10,000 reauths in the same millisecond: three socket operations and a
/// signature check each, all queued in front of the next tick (perf/RESULTS.md).
fn reauth_notice_ms(cfg: &SessionConfig, exp: u64, now_ms: u64, draw: u32) -> u64 {
    let latest = exp.saturating_mul(1000).saturating_sub(cfg.reauth_lead_ms);
    let window = cfg.reauth_spread_ms.min(latest.saturating_sub(now_ms) / 2);
    latest - ((u128::from(window) * u128::from(draw)) >> 32) as u64
}

/// A point spread evenly over `u32`, fresh at each call: a Weyl sequence over a counter
/// (deterministic, no clock, no RNG). Spreads each token's reauth notice and each
/// session's first heartbeat.
fn spread_draw() -> u32 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    (n.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as u32
}

/// A spread of first-heartbeat offsets over half a period.
fn heartbeat_phase(heartbeat_ms: u64) -> u64 {
    match heartbeat_ms / 2 {
        0 => 0,
        spread => u64::from(spread_draw()) % spread,
    }
}

#[cfg(test)]
mod tests {
    //! The session on a virtual clock: every deadline is a number we pass in, so reauth and
    //! expiry tests run in microseconds and cannot flake.
    use super::*;
    use crate::auth::jwt::{Verifier, VerifyPolicy};
    use crate::auth::keys::KeySet;
    use crate::auth::mint::{Claims, generate_signing_key, sign_token};
    use crate::proto::frame::{Decoder, DecoderConfig};
    use ed25519_dalek::SigningKey;

    const T0: u64 = 1_800_000_000; // unix seconds at the start of every test

    struct World {
        key: SigningKey,
        verifier: Verifier,
        symbols: SymbolTable,
    }

    impl ReauthVerifier for World {
        fn verify_reauth(&self, token: &str, now: u64) -> Result<VerifiedClaims, AuthError> {
            self.verifier.verify(token, now)
        }
    }

    fn world() -> World {
        let key = generate_signing_key().unwrap();
        let mut ks = KeySet::new();
        ks.insert("k1", key.verifying_key()).unwrap();
        // Two symbols exist (a publisher created them); any other name a test subscribes
        // to is one no tick has created yet.
        let symbols = SymbolTable::new(64);
        symbols.intern("BTC-USD").unwrap();
        symbols.intern("ETH-USD").unwrap();
        World {
            key,
            verifier: Verifier::new(ks, VerifyPolicy::default()),
            symbols,
        }
    }

    fn claims(exp: u64) -> Claims {
        Claims {
            sub: "alice".into(),
            exp,
            iat: Some(exp - 300),
            sid: Some("s-1".into()),
            roles: vec!["subscriber".into(), "publisher".into()],
            symbols: vec!["*".into()],
            ..Claims::default()
        }
    }

    fn verified(w: &World, c: &Claims) -> VerifiedClaims {
        w.verifier
            .verify(&sign_token(&w.key, "k1", c), c.exp - 10)
            .unwrap()
    }

    fn cfg() -> SessionConfig {
        SessionConfig {
            reauth_lead_ms: 60_000,
            reauth_grace_ms: 30_000,
            ..SessionConfig::default()
        }
    }

    fn open(w: &World, exp: u64) -> Session {
        let mut s = Session::new(
            Arc::new(cfg()),
            verified(w, &claims(exp)),
            "127.0.0.1".parse().unwrap(),
            T0 * 1000,
        );
        let out = drain(&mut s);
        assert_eq!(out[0]["type"], "welcome");
        s
    }

    /// Decode everything the session queued into JSON values (text) or `{"close":code}`.
    fn drain(s: &mut Session) -> Vec<serde_json::Value> {
        let mut buf = Vec::new();
        let _ = s.poll_transmit(&mut buf, usize::MAX);
        let mut out = Vec::new();
        let mut i = 0;
        while i < buf.len() {
            let op = buf[i] & 0x0f;
            let (len, h) = match buf[i + 1] & 0x7f {
                126 => (u16::from_be_bytes([buf[i + 2], buf[i + 3]]) as usize, 4),
                n => (n as usize, 2),
            };
            let p = &buf[i + h..i + h + len];
            match op {
                1 => out.push(serde_json::from_slice(p).unwrap()),
                8 => out.push(serde_json::json!({"close": u16::from_be_bytes([p[0], p[1]])})),
                9 => out.push(serde_json::json!({"ping": true})),
                10 => out.push(serde_json::json!({"pong": true})),
                _ => {}
            }
            i += h + len;
        }
        out
    }

    fn text(w: &World, s: &mut Session, now_ms: u64, v: serde_json::Value, events: &mut Vec<Event>) {
        s.handle_message(now_ms, Incoming::Text(v.to_string().into()), &w.symbols, w);
        events.extend(polled(s));
    }

    /// Traffic at `now_ms` (no idle close soon) and no heartbeat: for tests about other
    /// deadlines.
    fn quiet(s: &mut Session, now_ms: u64) {
        s.note_rx(now_ms);
        s.heartbeat_at_ms = u64::MAX / 2;
    }

    /// Every event the session has queued, in order.
    fn polled(s: &mut Session) -> Vec<Event> {
        std::iter::from_fn(|| s.poll_event()).collect()
    }

    /// When the session wants its deadline of that kind.
    fn due(s: &Session, kind: TimerKind) -> u64 {
        s.deadline(kind).unwrap()
    }

    /// Fire the session's deadlines the way the shard does: `handle_timeout`, then the
    /// events it queued. Returns the next deadline the shard would file.
    fn timeout(s: &mut Session, now_ms: u64, events: &mut Vec<Event>) -> Option<u64> {
        s.handle_timeout(now_ms);
        events.extend(polled(s));
        s.poll_timeout()
    }

    #[test]
    fn a_session_without_subscriptions_gives_back_its_queue_once_drained() {
        let w = world();
        let now = T0 * 1000;
        let mut s = open(&w, T0 + 300);
        // The welcome went out: an admitted connection that waits holds no queue buffer.
        assert_eq!(s.outbound.capacity(), 0);
        let mut events = Vec::new();
        text(
            &w,
            &mut s,
            now,
            serde_json::json!({"op":"ping","id":1}),
            &mut events,
        );
        assert_eq!(drain(&mut s)[0]["type"], "pong");
        assert_eq!(s.outbound.capacity(), 0);
        // A subscriber keeps it between writes (its stream refills it); the once-a-second
        // trim gives it back when it is empty.
        let sub = serde_json::json!({"op":"subscribe","id":2,"symbols":["BTC-USD"]});
        text(&w, &mut s, now, sub, &mut events);
        assert_eq!(drain(&mut s)[0]["type"], "subscribed");
        assert!(s.outbound.capacity() > 0);
        s.trim();
        assert_eq!(s.outbound.capacity(), 0);
    }

    #[test]
    fn reauth_required_then_4001_exactly_at_exp_plus_grace() {
        let w = world();
        let exp = T0 + 300;
        let mut s = open(&w, exp);
        let mut a = Vec::new();
        let at = due(&s, TimerKind::ReauthRequired);
        assert_eq!(at, (exp - 60) * 1000);
        assert!(s.poll_timeout() < Some(at), "heartbeat and idle come first");
        // Heartbeats are not what this test is about; traffic keeps the idle close away.
        quiet(&mut s, at - 1);
        assert_eq!(s.poll_timeout(), Some(at));
        // A timeout that comes early (a stale wheel slot) does nothing.
        assert_eq!(timeout(&mut s, at - 1, &mut a), Some(at));
        assert!(drain(&mut s).is_empty());
        let deadline = due(&s, TimerKind::ReauthDeadline);
        assert_eq!(deadline, (exp + 30) * 1000);
        // Once sent, the notice is no longer wanted: the next deadline is the 4001.
        timeout(&mut s, at, &mut a);
        assert_eq!(s.deadline(TimerKind::ReauthRequired), None);
        assert_eq!(
            drain(&mut s),
            vec![serde_json::json!({"type":"reauth_required","exp":exp,"deadline":exp + 30})]
        );
        quiet(&mut s, deadline - 1);
        assert_eq!(s.poll_timeout(), Some(deadline));
        assert_eq!(timeout(&mut s, deadline - 1, &mut a), Some(deadline));
        assert!(!s.is_closing());
        assert!(a.is_empty());
        assert_eq!(timeout(&mut s, deadline, &mut a), None);
        assert!(s.is_closing());
        assert!(a.contains(&Event::Close { code: 4001 }));
        assert_eq!(drain(&mut s), vec![serde_json::json!({"close": 4001})]);
    }

    #[test]
    fn reauth_moves_the_deadline_and_narrows_subscriptions() {
        let w = world();
        let exp = T0 + 300;
        let mut s = open(&w, exp);
        let mut a = Vec::new();
        text(
            &w,
            &mut s,
            T0 * 1000,
            serde_json::json!({"op":"subscribe","id":1,"symbols":["BTC-USD","ETH-USD"]}),
            &mut a,
        );
        assert_eq!(
            drain(&mut s)[0]["symbols"],
            serde_json::json!(["BTC-USD", "ETH-USD"])
        );
        a.clear();
        let now = (exp - 50) * 1000;
        let mut fresh = claims(exp + 600);
        fresh.iat = Some(exp - 50);
        fresh.symbols = vec!["BTC-*".into()];
        let tok = sign_token(&w.key, "k1", &fresh);
        text(
            &w,
            &mut s,
            now,
            serde_json::json!({"op":"reauth","id":3,"token":tok}),
            &mut a,
        );
        let out = drain(&mut s);
        assert_eq!(
            out[0],
            serde_json::json!({"type":"reauthed","id":3,"exp":exp + 600})
        );
        assert_eq!(
            out[1],
            serde_json::json!({"type":"unsubscribed","symbols":["ETH-USD"],"reason":"entitlement"})
        );
        let eth = w.symbols.lookup("ETH-USD").unwrap();
        assert!(a.contains(&Event::Unsubscribe {
            ids: vec![eth],
            waiting: vec![]
        }));
        // The new token's deadlines are in force.
        assert_eq!(s.deadline(TimerKind::ReauthRequired), Some((exp + 540) * 1000));
        assert_eq!(s.deadline(TimerKind::ReauthDeadline), Some((exp + 630) * 1000));
        assert_eq!(s.subscriptions().len(), 1);
        // The old deadline no longer closes: the session wants the new one.
        let old_deadline = (exp + 30) * 1000;
        quiet(&mut s, old_deadline);
        let mut a2 = Vec::new();
        timeout(&mut s, old_deadline, &mut a2);
        assert!(!s.is_closing());
        assert!(a2.is_empty(), "{a2:?}");
        assert_eq!(s.deadline(TimerKind::ReauthDeadline), Some((exp + 630) * 1000));
    }

    #[test]
    fn refused_reauth_keeps_the_old_deadline() {
        let w = world();
        let exp = T0 + 300;
        let mut s = open(&w, exp);
        let mut a = Vec::new();
        let now = (exp - 50) * 1000;
        // Another user's token.
        let mut other = claims(exp + 600);
        other.sub = "bob".into();
        other.iat = Some(exp - 50);
        text(
            &w,
            &mut s,
            now,
            serde_json::json!({"op":"reauth","id":1,"token":sign_token(&w.key, "k1", &other)}),
            &mut a,
        );
        // Another session's token.
        let mut other_sid = claims(exp + 600);
        other_sid.sid = Some("s-2".into());
        other_sid.iat = Some(exp - 50);
        text(
            &w,
            &mut s,
            now,
            serde_json::json!({"op":"reauth","id":2,"token":sign_token(&w.key, "k1", &other_sid)}),
            &mut a,
        );
        // A malformed one.
        text(
            &w,
            &mut s,
            now,
            serde_json::json!({"op":"reauth","id":3,"token":"x"}),
            &mut a,
        );
        // One signed by an unknown key.
        let stranger = generate_signing_key().unwrap();
        let mut fine = claims(exp + 600);
        fine.iat = Some(exp - 50);
        text(
            &w,
            &mut s,
            now,
            serde_json::json!({"op":"reauth","id":4,"token":sign_token(&stranger, "k1", &fine)}),
            &mut a,
        );
        let codes: Vec<_> = drain(&mut s)
            .iter()
            .map(|v| (v["id"].clone(), v["code"].clone()))
            .collect();
        assert_eq!(
            codes,
            vec![
                (1.into(), "forbidden".into()),
                (2.into(), "forbidden".into()),
                (3.into(), "bad_request".into()),
                (4.into(), "forbidden".into())
            ]
        );
        assert_eq!(s.deadline(TimerKind::ReauthRequired), Some((exp - 60) * 1000));
        assert_eq!(s.deadline_ms(), (exp + 30) * 1000);
        quiet(&mut s, (exp + 30) * 1000 - 1);
        timeout(&mut s, (exp + 30) * 1000, &mut a);
        assert!(a.contains(&Event::Close { code: 4001 }));
    }

    /// A verifier that takes the token away (like the runtime's verifier threads).
    struct Deferring(std::cell::RefCell<Vec<(Option<u64>, String)>>);

    impl ReauthVerifier for Deferring {
        fn verify_reauth(&self, _: &str, _: u64) -> Result<VerifiedClaims, AuthError> {
            unreachable!("deferred")
        }
        fn defer_reauth(&self, id: Option<u64>, token: &str, _: u64) -> bool {
            self.0.borrow_mut().push((id, token.to_string()));
            true
        }
    }

    #[test]
    fn deferred_reauth_completes_later() {
        let w = world();
        let exp = T0 + 300;
        let mut s = open(&w, exp);
        let d = Deferring(Default::default());
        let mut a = Vec::new();
        let mut fresh = claims(exp + 600);
        fresh.iat = Some(exp - 50);
        let tok = sign_token(&w.key, "k1", &fresh);
        s.handle_message(
            (exp - 50) * 1000,
            Incoming::Text(
                serde_json::json!({"op":"reauth","id":7,"token":tok})
                    .to_string()
                    .into(),
            ),
            &w.symbols,
            &d,
        );
        a.extend(polled(&mut s));
        // Nothing happens until the result comes back.
        assert!(drain(&mut s).is_empty());
        assert_eq!(s.deadline_ms(), (exp + 30) * 1000);
        let (id, token) = d.0.borrow_mut().pop().unwrap();
        s.finish_reauth(
            id,
            w.verifier.verify(&token, exp - 50),
            (exp - 50) * 1000,
            &w.symbols,
        );
        a.extend(polled(&mut s));
        assert_eq!(
            drain(&mut s),
            vec![serde_json::json!({"type":"reauthed","id":7,"exp":exp + 600})]
        );
        assert_eq!(s.deadline(TimerKind::ReauthRequired), Some((exp + 540) * 1000));
        assert_eq!(s.deadline_ms(), (exp + 630) * 1000);
    }

    #[test]
    fn reauth_notices_are_spread_before_the_lead() {
        let c = SessionConfig {
            reauth_lead_ms: 60_000,
            reauth_spread_ms: 10_000,
            ..SessionConfig::default()
        };
        let exp = T0 + 900;
        let latest = exp * 1000 - 60_000;
        // Evenly spread over the whole window, never after exp - lead.
        let mut at: Vec<u64> = (0..1000u32)
            .map(|i| reauth_notice_ms(&c, exp, T0 * 1000, i.wrapping_mul(0x9E37_79B9)))
            .collect();
        assert!(at.iter().all(|&t| t <= latest && t > latest - 10_000));
        at.sort_unstable();
        let per_second = |k: u64| at.iter().filter(|&&t| (latest - t) / 1000 == k).count();
        for k in 0..10 {
            assert!(
                (80..=120).contains(&per_second(k)),
                "second {k}: {}",
                per_second(k)
            );
        }
        // A short token: at most half the time left is taken, so no notice goes out at once.
        let short = T0 + 70; // exp - lead is 10 s away
        assert_eq!(
            reauth_notice_ms(&c, short, T0 * 1000, u32::MAX),
            T0 * 1000 + 10_000 - 4_999
        );
        assert_eq!(reauth_notice_ms(&c, short, T0 * 1000, 0), T0 * 1000 + 10_000);
        // Already inside the lead: exactly exp - lead (in the past, so at once).
        assert_eq!(
            reauth_notice_ms(&c, T0 + 30, T0 * 1000, u32::MAX),
            (T0 + 30) * 1000 - 60_000
        );
        // No spread configured: exactly exp - lead.
        assert_eq!(reauth_notice_ms(&cfg(), exp, T0 * 1000, u32::MAX), latest);
    }

    #[test]
    fn a_session_and_its_reauth_draw_their_notice_in_the_window() {
        let w = world();
        let c = Arc::new(SessionConfig {
            reauth_lead_ms: 60_000,
            reauth_spread_ms: 10_000,
            ..cfg()
        });
        let exp = T0 + 300;
        let mut s = Session::new(
            c,
            verified(&w, &claims(exp)),
            "127.0.0.1".parse().unwrap(),
            T0 * 1000,
        );
        drain(&mut s);
        let due = |s: &Session| due(s, TimerKind::ReauthRequired);
        let first = due(&s);
        assert!(
            first <= exp * 1000 - 60_000 && first > exp * 1000 - 70_000,
            "{first}"
        );
        let mut actions = Vec::new();
        quiet(&mut s, first);
        timeout(&mut s, first, &mut actions);
        assert_eq!(s.deadline(TimerKind::ReauthRequired), None, "sent once");
        assert_eq!(drain(&mut s)[0]["type"], "reauth_required");
        // A fresh token moves the notice into its own window.
        let fresh = verified(&w, &claims(exp + 600));
        s.finish_reauth(Some(1), Ok(fresh), first + 5, &w.symbols);
        actions.extend(polled(&mut s));
        let next = due(&s);
        assert!(
            next <= (exp + 600) * 1000 - 60_000 && next > (exp + 600) * 1000 - 70_000,
            "{next}"
        );
    }

    #[test]
    fn first_heartbeats_are_spread_over_half_a_period() {
        let w = world();
        let dues: Vec<u64> = (0..64)
            .map(|_| due(&open(&w, T0 + 300), TimerKind::Heartbeat))
            .collect();
        for d in &dues {
            assert!((T0 * 1000 + 7_500..=T0 * 1000 + 15_000).contains(d), "{d}");
        }
        let distinct: std::collections::HashSet<_> = dues.iter().collect();
        assert!(distinct.len() > 32, "phases collapse: {distinct:?}");
    }

    #[test]
    fn idle_and_heartbeat() {
        let w = world();
        let mut s = open(&w, T0 + 300);
        let mut a = Vec::new();
        let hb = due(&s, TimerKind::Heartbeat);
        assert_eq!(s.poll_timeout(), Some(hb));
        timeout(&mut s, hb - 1, &mut a);
        assert!(drain(&mut s).is_empty());
        assert_eq!(timeout(&mut s, hb, &mut a), Some(hb + 15_000));
        assert_eq!(s.deadline(TimerKind::Heartbeat), Some(hb + 15_000));
        assert_eq!(drain(&mut s), vec![serde_json::json!({"ping": true})]);
        // Traffic pushes the idle deadline.
        let idle = due(&s, TimerKind::Idle);
        s.note_rx(idle - 1000);
        timeout(&mut s, idle, &mut a);
        assert!(!s.is_closing());
        assert_eq!(s.deadline(TimerKind::Idle), Some(idle - 1000 + 45_000));
        assert!(a.is_empty(), "{a:?}");
        timeout(&mut s, idle - 1000 + 45_000, &mut a);
        assert!(a.contains(&Event::Close { code: 4000 }));
        assert_eq!(s.poll_timeout(), None, "closing: no deadline of its own");
    }

    fn session_with(w: &World, c: SessionConfig) -> Session {
        let mut s = Session::new(
            Arc::new(c),
            verified(w, &claims(T0 + 300)),
            "127.0.0.1".parse().unwrap(),
            T0 * 1000,
        );
        drain(&mut s);
        s
    }

    /// Issue 14, hole 2: a client that pings and never reads. Its pongs are coalesced (one
    /// waits, answering the latest ping), pings count against the message rate, and the
    /// connection ends with `4029` instead of growing a queue of pongs.
    #[test]
    fn a_ping_flood_holds_one_pong_and_ends_with_4029() {
        let w = world();
        let mut c = cfg();
        c.inbound_messages_per_sec = 50;
        let mut s = session_with(&w, c);
        let mut a = Vec::new();
        let now = T0 * 1000;
        for i in 0..10_000u32 {
            let payload = Bytes::from(vec![(i % 251) as u8; 125]);
            s.handle_message(now + u64::from(i / 1000), Incoming::Ping(payload), &w.symbols, &w);
            a.extend(polled(&mut s));
            if s.is_closing() {
                break;
            }
        }
        assert!(a.contains(&Event::Close { code: 4029 }), "{a:?}");
        // One pong (125 bytes + 2 header), ten `rate_limited` replies and the close.
        assert!(s.queued_bytes() < 2048, "{}", s.queued_bytes());
        let out = drain(&mut s);
        assert_eq!(out.iter().filter(|v| v["pong"] == true).count(), 1);
        assert_eq!(out.iter().filter(|v| v["code"] == "rate_limited").count(), 10);
        assert_eq!(out.last(), Some(&serde_json::json!({"close": 4029})));
    }

    #[test]
    fn the_waiting_pong_answers_the_latest_ping() {
        let w = world();
        let mut s = session_with(&w, cfg());
        let mut a = Vec::new();
        for p in [&b"one"[..], b"two", b"three"] {
            s.handle_message(
                T0 * 1000,
                Incoming::Ping(Bytes::copy_from_slice(p)),
                &w.symbols,
                &w,
            );
            a.extend(polled(&mut s));
        }
        let mut buf = Vec::new();
        let t = s.poll_transmit(&mut buf, usize::MAX);
        assert_eq!(buf, [&[0x8a, 5][..], b"three"].concat());
        assert_eq!(t.bytes, buf.len());
        assert!(!t.done);
        // Once written, the next ping gets its own pong.
        s.handle_message(
            T0 * 1000,
            Incoming::Ping(Bytes::from_static(b"four")),
            &w.symbols,
            &w,
        );
        a.extend(polled(&mut s));
        assert_eq!(s.queued_bytes(), 6);
    }

    /// Issue 14, hole 2 with replies: requests that each cost a reply, from a client that
    /// never reads, start the slow-consumer episode past the bound and, once the replies
    /// alone exceed it, close with `4008` at once.
    #[test]
    fn unread_replies_count_against_the_outbound_bound() {
        let w = world();
        let mut c = cfg();
        c.inbound_messages_per_sec = 1_000_000;
        c.outbound_queue_bytes = 4096;
        let mut s = session_with(&w, c);
        let mut a = Vec::new();
        let now = T0 * 1000;
        let mut armed = None;
        for i in 0..10_000u64 {
            text(&w, &mut s, now, serde_json::json!({"op":"ping","id":i}), &mut a);
            s.enforce_budget(now);
            a.extend(polled(&mut s));
            if let Some(at) = s.deadline(TimerKind::SlowConsumer) {
                match armed {
                    None => armed = Some((at, s.queued_bytes())),
                    Some((first, _)) => assert_eq!(first, at, "armed once per episode"),
                }
            }
            if s.is_closing() {
                break;
            }
        }
        let (at, queued) = armed.expect("the slow-consumer timer was armed");
        assert_eq!(at, now + 5_000);
        assert!(queued > 4096 && queued < 4096 + 64, "{queued}");
        assert!(a.contains(&Event::Close { code: 4008 }), "{a:?}");
        // The backlog was dropped: only the close frame waits.
        assert_eq!(drain(&mut s), vec![serde_json::json!({"close": 4008})]);
    }

    /// Issue 15 defect: `rate_limited` echoes the refused request's `id`.
    #[test]
    fn rate_limited_echoes_the_id() {
        let w = world();
        let mut c = cfg();
        c.inbound_messages_per_sec = 1;
        let mut s = session_with(&w, c);
        let mut a = Vec::new();
        text(
            &w,
            &mut s,
            T0 * 1000,
            serde_json::json!({"op":"ping","id":1}),
            &mut a,
        );
        text(
            &w,
            &mut s,
            T0 * 1000,
            serde_json::json!({"op":"subscribe","id":77,"symbols":["BTC-USD"]}),
            &mut a,
        );
        let out = drain(&mut s);
        assert_eq!(out[1]["code"], "rate_limited");
        assert_eq!(out[1]["id"], 77);
    }

    /// Issue 14, hole 5: subscribing to names no tick has created never touches the
    /// server-wide table; the subscriptions wait on the connection, count against its
    /// bound, and are released by unsubscribe.
    #[test]
    fn subscribers_never_create_symbols() {
        let w = world();
        let mut s = open(&w, T0 + 300);
        let mut a = Vec::new();
        for round in 0..100u64 {
            // A second per round: the message rate is not what this test is about.
            let now = T0 * 1000 + round * 1000;
            let names: Vec<String> = (0..1024).map(|i| format!("BTC-J{round:03}{i:04}")).collect();
            text(
                &w,
                &mut s,
                now,
                serde_json::json!({"op":"subscribe","symbols":names}),
                &mut a,
            );
            assert_eq!(s.waiting_subscriptions().len(), 1024);
            let out = drain(&mut s);
            assert_eq!(out[0]["symbols"].as_array().unwrap().len(), 1024, "acknowledged");
            assert!(
                matches!(a.pop(), Some(Event::Subscribe { ref ids, ref waiting, .. }) if ids.is_empty() && waiting.len() == 1024)
            );
            // The bound counts waiting subscriptions.
            text(
                &w,
                &mut s,
                now,
                serde_json::json!({"op":"subscribe","id":2,"symbols":["BTC-USD"]}),
                &mut a,
            );
            assert_eq!(drain(&mut s)[0]["code"], "too_many_symbols");
            text(
                &w,
                &mut s,
                now,
                serde_json::json!({"op":"unsubscribe","symbols":names}),
                &mut a,
            );
            assert!(
                matches!(a.pop(), Some(Event::Unsubscribe { ref ids, ref waiting }) if ids.is_empty() && waiting.len() == 1024)
            );
            assert_eq!(drain(&mut s)[0]["symbols"].as_array().unwrap().len(), 1024);
            assert!(s.waiting_subscriptions().is_empty());
        }
        assert_eq!(w.symbols.len(), 2, "only the published symbols exist");
    }

    #[test]
    fn a_waiting_subscription_activates_and_narrows() {
        let w = world();
        let mut s = open(&w, T0 + 300);
        let mut a = Vec::new();
        text(
            &w,
            &mut s,
            T0 * 1000,
            serde_json::json!({"op":"subscribe","symbols":["NEW-1","NEW-2"]}),
            &mut a,
        );
        drain(&mut s);
        // A publisher creates NEW-1: the shard activates the waiting subscription.
        let id = w.symbols.intern("NEW-1").unwrap();
        assert!(s.activate("NEW-1", id));
        assert!(!s.activate("NEW-1", id), "once");
        assert_eq!(s.subscriptions().last(), Some(&id));
        assert_eq!(s.waiting_subscriptions(), &[Box::<str>::from("NEW-2")]);
        // A reauth that no longer allows `NEW-*` ends both kinds.
        let mut fresh = claims(T0 + 600);
        fresh.iat = Some(T0);
        fresh.symbols = vec!["BTC-*".into()];
        let tok = sign_token(&w.key, "k1", &fresh);
        a.clear();
        text(
            &w,
            &mut s,
            T0 * 1000,
            serde_json::json!({"op":"reauth","token":tok}),
            &mut a,
        );
        let out = drain(&mut s);
        assert_eq!(out[1]["symbols"], serde_json::json!(["NEW-1", "NEW-2"]));
        assert!(a.contains(&Event::Unsubscribe {
            ids: vec![id],
            waiting: vec!["NEW-2".into()]
        }));
        assert!(s.waiting_subscriptions().is_empty());
    }

    #[test]
    fn rate_limit_replies_then_4029() {
        let w = world();
        let mut c = cfg();
        c.inbound_messages_per_sec = 2;
        let mut s = Session::new(
            Arc::new(c),
            verified(&w, &claims(T0 + 300)),
            "127.0.0.1".parse().unwrap(),
            T0 * 1000,
        );
        drain(&mut s);
        let mut a = Vec::new();
        let now = T0 * 1000;
        // 2 pass, 10 get `rate_limited`, the 11th excess message closes.
        for i in 0..13 {
            text(&w, &mut s, now, serde_json::json!({"op":"ping","id":i}), &mut a);
        }
        let out = drain(&mut s);
        assert_eq!(out.iter().filter(|v| v["type"] == "pong").count(), 2);
        assert_eq!(out.iter().filter(|v| v["code"] == "rate_limited").count(), 10);
        assert!(a.contains(&Event::Close { code: 4029 }));
        // The bucket refills with (virtual) time.
        let mut s2 = Session::new(
            Arc::new(cfg()),
            verified(&w, &claims(T0 + 300)),
            "127.0.0.1".parse().unwrap(),
            T0 * 1000,
        );
        drain(&mut s2);
        for i in 0..200u64 {
            text(
                &w,
                &mut s2,
                now + i * 100,
                serde_json::json!({"op":"ping"}),
                &mut a,
            );
        }
        assert!(drain(&mut s2).iter().all(|v| v["type"] == "pong"));
    }

    #[test]
    fn publish_is_all_or_nothing_and_needs_the_role() {
        let w = world();
        let mut c = claims(T0 + 300);
        c.symbols = vec!["BTC-*".into()];
        let mut s = Session::new(
            Arc::new(cfg()),
            verified(&w, &c),
            "127.0.0.1".parse().unwrap(),
            T0 * 1000,
        );
        drain(&mut s);
        let mut a = Vec::new();
        let tick = |sym: &str| serde_json::json!({"s":sym,"ts":1,"bid":1.0,"ask":2.0,"last":1.5,"qty":1});
        text(
            &w,
            &mut s,
            T0 * 1000,
            serde_json::json!({"op":"publish","id":1,"ticks":[tick("BTC-USD"), tick("ETH-USD")]}),
            &mut a,
        );
        assert!(a.is_empty());
        assert_eq!(drain(&mut s)[0]["code"], "forbidden");
        text(
            &w,
            &mut s,
            T0 * 1000,
            serde_json::json!({"op":"publish","id":2,"ticks":[tick("BTC-USD"), tick("BTC-EUR")]}),
            &mut a,
        );
        assert!(matches!(&a[0], Event::Publish { ticks } if ticks.len() == 2));
        assert_eq!(
            drain(&mut s)[0],
            serde_json::json!({"type":"published","id":2,"count":2})
        );
        // Without the publisher role.
        let mut sub_only = claims(T0 + 300);
        sub_only.roles = vec!["subscriber".into()];
        let mut s = Session::new(
            Arc::new(cfg()),
            verified(&w, &sub_only),
            "127.0.0.1".parse().unwrap(),
            T0 * 1000,
        );
        drain(&mut s);
        a.clear();
        text(
            &w,
            &mut s,
            T0 * 1000,
            serde_json::json!({"op":"publish","ticks":[tick("BTC-USD")]}),
            &mut a,
        );
        assert!(a.is_empty());
        assert_eq!(drain(&mut s)[0]["code"], "forbidden");
    }

    #[test]
    fn close_and_binary() {
        let w = world();
        let mut s = open(&w, T0 + 300);
        let mut a = Vec::new();
        s.handle_message(
            T0 * 1000,
            Incoming::Binary(bytes::Bytes::from_static(b"x")),
            &w.symbols,
            &w,
        );
        a.extend(polled(&mut s));
        assert_eq!(a, vec![Event::Close { code: 1003 }]);
        // Nothing is processed after our close.
        text(&w, &mut s, T0 * 1000, serde_json::json!({"op":"ping"}), &mut a);
        assert_eq!(drain(&mut s), vec![serde_json::json!({"close": 1003})]);
        let mut s = open(&w, T0 + 300);
        let mut a = Vec::new();
        s.handle_message(
            T0 * 1000,
            Incoming::Close(Some((4321, String::new()))),
            &w.symbols,
            &w,
        );
        a.extend(polled(&mut s));
        assert_eq!(drain(&mut s), vec![serde_json::json!({"close": 4321})]);
    }

    #[test]
    fn decoder_and_session_compose() {
        // A client frame through the real decoder into the session.
        let w = world();
        let mut s = open(&w, T0 + 300);
        let mut d = Decoder::new(DecoderConfig::default());
        let mut wire = Vec::new();
        crate::proto::frame::encode_client_frame_into(
            OpCode::Text,
            true,
            br#"{"op":"ping","id":9}"#,
            [9, 8, 7, 6],
            &mut wire,
        );
        let (n, m) = d.decode(&mut wire).unwrap();
        assert_eq!(n, wire.len());
        let mut a = Vec::new();
        s.handle_message(T0 * 1000, m.unwrap(), &w.symbols, &w);
        a.extend(polled(&mut s));
        assert_eq!(drain(&mut s), vec![serde_json::json!({"type":"pong","id":9})]);
    }
}
