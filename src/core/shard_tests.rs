//! The shard core on a virtual clock: no sockets, no threads, no io runtime. Every
//! connection is a [`ShardCore`] entry with a stand-in for the runtime's socket state;
//! ticks go through the real hub (publish, then pop from this shard's inbox), and time is
//! a number each test moves forward itself.

use std::time::Duration;

use bytes::Bytes;
use ed25519_dalek::SigningKey;

use super::*;
use crate::auth::keys::KeySet;
use crate::auth::mint::{Claims, generate_signing_key, sign_token};
use crate::auth::revocation::RevokeTarget;
use crate::auth::seclog::SecurityLog;
use crate::config::Config;
use crate::feed::tick::Tick;
use crate::metrics::CLOSE_CODES;
use crate::proto::frame::DecoderConfig;
use crate::session::TimerKind;
use crate::state::{AuthState, Shared};

/// Unix milliseconds at the start of every test.
const T0: u64 = 1_800_000_000_000;

/// The runtime's socket state, reduced to the one thing the core asks of it.
#[derive(Default)]
struct TestIo {
    /// A writer task runs (it will see queued output without a `Kick`).
    writer_running: bool,
}

impl ConnIo for TestIo {
    fn writer_parked(&self) -> bool {
        !self.writer_running
    }
}

struct World {
    core: ShardCore<TestIo>,
    shared: Arc<Shared>,
    key: SigningKey,
    now: u64,
}

fn world() -> World {
    world_with(|_| {})
}

fn world_with(tweak: impl FnOnce(&mut Config)) -> World {
    let mut cfg = Config::default_production();
    cfg.server.shards = 1;
    tweak(&mut cfg);
    let key = generate_signing_key().unwrap();
    let mut ks = KeySet::new();
    ks.insert("k1", key.verifying_key()).unwrap();
    let auth = AuthState::build(&cfg, ks).unwrap();
    let shared = Arc::new(Shared::new(cfg, auth, SecurityLog::discard()));
    // Two symbols exist (a publisher created them); any other name a test subscribes to
    // is one no tick has created yet.
    shared.hub.intern("BTC-USD").unwrap();
    shared.hub.intern("ETH-USD").unwrap();
    World {
        core: ShardCore::new(0, shared.clone(), T0),
        shared,
        key,
        now: T0,
    }
}

fn tick(price: f64) -> Tick {
    Tick {
        ts: 1,
        bid: price,
        ask: price + 1.0,
        last: price,
        qty: 1.0,
    }
}

/// Server frames in `buf` as JSON (text), `{"close":code}`, `{"ping":true}`.
fn frames(buf: &[u8]) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < buf.len() {
        let op = buf[i] & 0x0f;
        let (len, h) = match buf[i + 1] & 0x7f {
            126 => (u16::from_be_bytes([buf[i + 2], buf[i + 3]]) as usize, 4),
            127 => (
                u64::from_be_bytes(buf[i + 2..i + 10].try_into().unwrap()) as usize,
                10,
            ),
            n => (n as usize, 2),
        };
        let p = &buf[i + h..i + h + len];
        out.push(match op {
            1 => serde_json::from_slice(p).unwrap(),
            8 => serde_json::json!({"close": u16::from_be_bytes([p[0], p[1]])}),
            9 => serde_json::json!({"ping": true}),
            10 => serde_json::json!({"pong": true}),
            _ => serde_json::json!({"op": op}),
        });
        i += h + len;
    }
    out
}

fn closes(shared: &Shared, code: u16) -> u64 {
    let i = CLOSE_CODES.iter().position(|c| *c == code).unwrap();
    shared.metrics.closes[i].load(Relaxed)
}

impl World {
    /// A socket admitted to the upgrade (no session yet).
    fn accept(&mut self) -> ConnId {
        let (id, _) = self.core.register(self.now, TestIo::default());
        assert!(
            self.core
                .admit_pending(self.now, id.idx, "10.0.0.1".parse().unwrap())
        );
        id
    }

    /// A socket through the upgrade, open as a session of `sub` (welcome read).
    fn connect(&mut self, sub: &str, sid: &str, jti: &str) -> ConnId {
        let id = self.accept();
        self.core.pending_heard(id.idx, self.now);
        self.core.pending_done(id.idx);
        let secs = self.now / 1000;
        let claims = Claims {
            sub: sub.into(),
            exp: secs + 300,
            iat: Some(secs - 10),
            sid: Some(sid.into()),
            jti: Some(jti.into()),
            roles: vec!["subscriber".into()],
            symbols: vec!["*".into()],
            ..Claims::default()
        };
        let token = sign_token(&self.key, "k1", &claims);
        let verified = self.shared.verify_token(&token, self.now).unwrap();
        let session = Session::new(
            self.shared.node.session.clone(),
            verified,
            "10.0.0.1".parse().unwrap(),
            self.now,
        );
        let decoder = Decoder::new(DecoderConfig {
            max_message_bytes: 1 << 16,
            max_frame_bytes: 1 << 16,
        });
        self.core.open(id, session, decoder);
        assert_eq!(self.out(id)[0]["type"], "welcome");
        self.effects();
        id
    }

    fn text(&mut self, id: ConnId, msg: &str) {
        let m = Incoming::Text(Bytes::copy_from_slice(msg.as_bytes()));
        self.core.handle_message(self.now, id, m, &*self.shared);
    }

    /// Subscribes and reads the ack.
    fn subscribe(&mut self, id: ConnId, name: &str) {
        self.text(
            id,
            &format!(r#"{{"op":"subscribe","id":1,"symbols":["{name}"]}}"#),
        );
        let out = self.out(id);
        assert_eq!(out[0]["type"], "subscribed", "{out:?}");
        self.effects();
    }

    /// Everything queued for `id`, raw.
    fn out_raw(&self, id: ConnId) -> Vec<u8> {
        let conn = self.core.get(id).unwrap();
        let mut c = conn.borrow_mut();
        let mut buf = Vec::new();
        let t = c.session.as_mut().unwrap().poll_transmit(&mut buf, usize::MAX);
        assert_eq!(t.bytes, buf.len());
        buf
    }

    fn out(&self, id: ConnId) -> Vec<serde_json::Value> {
        frames(&self.out_raw(id))
    }

    fn effects(&mut self) -> Vec<Effect> {
        let mut v = Vec::new();
        self.core.take_effects(&mut v);
        v
    }

    fn publish(&self, name: &str, price: f64) {
        let sym = self.shared.hub.intern(name).unwrap();
        assert_eq!(self.shared.hub.publish(&[(sym, tick(price))]), 1);
    }

    /// Ticks waiting in this shard's inbox.
    fn inbox(&self) -> Vec<Arc<SharedTick>> {
        std::iter::from_fn(|| self.shared.hub.inbox(0).ticks.pop()).collect()
    }

    /// Dispatches everything in the inbox; returns the deliveries.
    fn dispatch(&mut self) -> usize {
        let ticks = self.inbox();
        ticks.iter().map(|t| self.core.handle_tick(self.now, t)).sum()
    }

    fn advance_to(&mut self, now: u64) {
        self.now = now;
        self.core.handle_timeout(now);
    }

    /// A deadline of the core's own (handshake, hard drop, the session's as filed).
    fn deadline(&self, id: ConnId, kind: ConnTimer) -> Option<u64> {
        self.core.get(id).unwrap().borrow().deadline(kind)
    }

    /// A deadline of the session's, as the session owns it. The core has filed the
    /// session's earliest ([`Session::poll_timeout`]) or an earlier one (a deadline that
    /// moved later since is re-filed when the earlier entry fires).
    fn session_deadline(&self, id: ConnId, kind: TimerKind) -> Option<u64> {
        let conn = self.core.get(id).unwrap();
        let c = conn.borrow();
        let s = c.session.as_ref().unwrap();
        let filed = c.deadline(ConnTimer::Session);
        match s.poll_timeout() {
            Some(at) => assert!(filed.is_some_and(|f| f <= at), "filed {filed:?}, wanted {at}"),
            None => assert_eq!(filed, None),
        }
        s.deadline(kind)
    }

    fn is_dead(&self, id: ConnId) -> bool {
        self.core.get(id).unwrap().borrow().dead
    }
}

fn kicks(effects: &[Effect]) -> Vec<ConnId> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Kick(id) => Some(*id),
            _ => None,
        })
        .collect()
}

fn shutdowns(effects: &[Effect]) -> Vec<ConnId> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Shutdown(id) => Some(*id),
            _ => None,
        })
        .collect()
}

fn audits(effects: &[Effect]) -> Vec<&AuditEvent> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Audit(a) => Some(&**a),
            _ => None,
        })
        .collect()
}

#[test]
fn a_tick_reaches_every_local_subscriber_as_the_one_shared_frame_in_seq_order() {
    let mut w = world();
    let ids: Vec<ConnId> = (0..50)
        .map(|i| w.connect(&format!("u{i}"), &format!("s{i}"), &format!("j{i}")))
        .collect();
    for &id in &ids {
        w.subscribe(id, "BTC-USD");
    }
    let sym = w.shared.hub.intern("BTC-USD").unwrap();
    assert_eq!(w.core.subscribers(sym), 50);
    for p in [100.0, 101.0, 102.0] {
        w.publish("BTC-USD", p);
    }
    let ticks = w.inbox();
    assert_eq!(ticks.len(), 3);
    for t in &ticks {
        assert_eq!(w.core.handle_tick(w.now, t), 50);
        // Every subscriber's writer is parked: each delivery asks for one.
        let kicked = kicks(&w.effects());
        assert_eq!(kicked, ids);
    }
    let expected: Vec<u8> = ticks.iter().flat_map(|t| t.frame.to_vec()).collect();
    for &id in &ids {
        let raw = w.out_raw(id);
        assert_eq!(
            raw, expected,
            "each subscriber gets the frames encoded once, as they are"
        );
        let seqs: Vec<u64> = frames(&raw).iter().map(|v| v["seq"].as_u64().unwrap()).collect();
        assert_eq!(seqs, vec![1, 2, 3]);
    }
    assert!(frames(&ticks[0].frame).iter().all(|v| v.get("skipped").is_none()));
}

#[test]
fn a_delivery_to_a_connection_whose_writer_runs_asks_for_nothing() {
    let mut w = world();
    let id = w.connect("alice", "s1", "j1");
    w.subscribe(id, "BTC-USD");
    w.core.get(id).unwrap().borrow_mut().io.writer_running = true;
    w.publish("BTC-USD", 1.0);
    assert_eq!(w.dispatch(), 1);
    assert!(w.effects().is_empty());
    assert_eq!(w.out(id)[0]["seq"], 1);
}

#[test]
fn after_an_inbox_overflow_a_subscriber_gets_the_gap_as_skipped() {
    let mut w = world();
    let a = w.connect("alice", "s1", "j1");
    w.subscribe(a, "BTC-USD");
    for i in 1..=5 {
        w.publish("BTC-USD", f64::from(i));
    }
    assert_eq!(w.dispatch(), 5);
    let seqs: Vec<u64> = w.out(a).iter().map(|v| v["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
    // Ticks 6 and 7 never reach the shard (its inbox was full when they were published).
    w.publish("BTC-USD", 6.0);
    w.publish("BTC-USD", 7.0);
    assert_eq!(w.inbox().len(), 2);
    // A subscriber that joins now is owed only what comes after 7: no gap for it.
    let b = w.connect("bob", "s2", "j2");
    w.subscribe(b, "BTC-USD");
    w.publish("BTC-USD", 8.0);
    let t8 = w.inbox();
    assert_eq!(w.core.handle_tick(w.now, &t8[0]), 2);
    let got_a = w.out(a);
    assert_eq!(got_a.len(), 1);
    assert_eq!(got_a[0]["seq"], 8);
    assert_eq!(got_a[0]["skipped"], 2, "alice had 5, gets 8: 6 and 7 are skipped");
    assert_eq!(w.out_raw(b), t8[0].frame.to_vec(), "bob gets the shared frame");
    // A stale (or repeated) tick is not delivered twice.
    assert_eq!(w.core.handle_tick(w.now, &t8[0]), 0);
}

#[test]
fn revoke_closes_sessions_matching_sub_sid_or_jti_with_4003_and_counts_them() {
    let mut w = world();
    let alice1 = w.connect("alice", "s-a1", "j-a1");
    let alice2 = w.connect("alice", "s-a2", "j-a2");
    let bob = w.connect("bob", "s-b", "j-b");
    let carol = w.connect("carol", "s-c", "j-c");
    let dave = w.connect("dave", "s-d", "j-d");
    // Returns the count answered, and the effects before the answer.
    let revoke_effects = |w: &mut World, target| {
        let (tx, rx) = crossbeam_channel::bounded(1);
        w.core.handle_control(w.now, Control::Revoke(target, tx));
        let mut effects = w.effects();
        // The answer comes last, after the closes' log lines.
        let Some(Effect::RevokeDone { reply, closed }) = effects.pop() else {
            panic!("no answer: {effects:?}");
        };
        reply.send(closed).unwrap();
        (rx.try_recv().unwrap(), effects)
    };
    let revoke = |w: &mut World, target| revoke_effects(w, target).0;
    let (closed, effects) = revoke_effects(&mut w, RevokeTarget::Sub("alice".into()));
    assert_eq!(closed, 2);
    assert_eq!(kicks(&effects), vec![alice1, alice2]);
    let logged: Vec<_> = audits(&effects)
        .iter()
        .map(|a| {
            (
                a.reason.as_str(),
                a.sub.as_deref().unwrap().to_string(),
                a.sid.clone(),
            )
        })
        .collect();
    assert_eq!(
        logged,
        vec![
            ("revoked", "alice".to_string(), Some("s-a1".into())),
            ("revoked", "alice".to_string(), Some("s-a2".into())),
        ]
    );
    assert_eq!(revoke(&mut w, RevokeTarget::Sid("s-b".into())), 1);
    assert_eq!(revoke(&mut w, RevokeTarget::Jti("j-c".into())), 1);
    // Already closing: not closed (nor counted) twice.
    assert_eq!(revoke(&mut w, RevokeTarget::Sub("alice".into())), 0);
    assert_eq!(revoke(&mut w, RevokeTarget::Sub("nobody".into())), 0);
    for id in [alice1, alice2, bob, carol] {
        let out = w.out(id);
        assert_eq!(out.last().unwrap()["close"], 4003, "{out:?}");
        assert_eq!(w.deadline(id, ConnTimer::HardDrop), Some(w.now + HARD_DROP_MS));
        assert_eq!(w.session_deadline(id, TimerKind::Heartbeat), None);
    }
    assert!(w.out(dave).is_empty());
    assert_eq!(closes(&w.shared, 4003), 4);
}

#[test]
fn drain_closes_every_session_with_1001_and_shuts_pending_handshakes_down() {
    let mut w = world();
    let a = w.connect("alice", "s1", "j1");
    let b = w.connect("bob", "s2", "j2");
    let pending = w.accept();
    w.core.handle_control(w.now, Control::Drain);
    assert!(w.core.is_draining());
    let effects = w.effects();
    assert!(matches!(effects[0], Effect::StopAccepting));
    assert_eq!(shutdowns(&effects), vec![pending]);
    assert_eq!(kicks(&effects), vec![a, b]);
    for id in [a, b] {
        assert_eq!(w.out(id), vec![serde_json::json!({"close": 1001})]);
        assert_eq!(w.deadline(id, ConnTimer::HardDrop), Some(w.now + HARD_DROP_MS));
    }
    assert_eq!(closes(&w.shared, 1001), 2);
    // Once.
    w.core.handle_control(w.now, Control::Drain);
    assert!(w.effects().is_empty());
}

#[test]
fn a_slow_consumer_is_conflated_then_closed_with_4008_at_grace_and_dropped_2s_later() {
    let mut w = world_with(|c| {
        c.limits.outbound_queue_bytes = 1024;
        c.limits.slow_consumer_grace = Duration::from_secs(3);
    });
    let slow = w.connect("alice", "s1", "j1");
    let fast = w.connect("bob", "s2", "j2");
    for id in [slow, fast] {
        w.subscribe(id, "BTC-USD");
        w.subscribe(id, "ETH-USD");
    }
    let start = w.now;
    // The slow one never drains; the fast one reads after every tick.
    for i in 0..40 {
        for name in ["BTC-USD", "ETH-USD"] {
            w.publish(name, f64::from(i));
            assert_eq!(w.dispatch(), 2);
            assert!(!w.out(fast).is_empty());
        }
    }
    assert!(w.shared.metrics.conflated.load(Relaxed) > 0);
    let grace = 3_000;
    assert_eq!(
        w.session_deadline(slow, TimerKind::SlowConsumer),
        Some(start + grace)
    );
    assert_eq!(w.session_deadline(fast, TimerKind::SlowConsumer), None);
    w.effects();
    w.advance_to(start + grace - 1);
    assert!(w.effects().is_empty());
    w.advance_to(start + grace);
    let effects = w.effects();
    assert_eq!(kicks(&effects), vec![slow]);
    assert_eq!(audits(&effects)[0].reason.as_str(), "slow_consumer");
    // The queue is what is slow: the close does not wait behind it.
    assert_eq!(w.out(slow), vec![serde_json::json!({"close": 4008})]);
    assert_eq!(closes(&w.shared, 4008), 1);
    assert!(!w.is_dead(slow));
    // The peer never answers the close: the socket goes 2 s later.
    w.advance_to(start + grace + HARD_DROP_MS - 1);
    assert!(shutdowns(&w.effects()).is_empty());
    w.advance_to(start + grace + HARD_DROP_MS);
    assert_eq!(shutdowns(&w.effects()), vec![slow]);
    assert!(w.is_dead(slow));
    assert!(!w.is_dead(fast));
}

#[test]
fn the_handshake_deadline_shuts_a_silent_socket_down_and_logs_it() {
    let mut w = world();
    let silent = w.accept();
    let talking = w.accept();
    // A first byte moves the deadline from first_byte_timeout (2 s) to handshake_timeout
    // (5 s), counted from accept.
    w.core.pending_heard(talking.idx, T0);
    w.advance_to(T0 + 1_999);
    assert!(w.effects().is_empty());
    w.advance_to(T0 + 2_000);
    let effects = w.effects();
    assert_eq!(shutdowns(&effects), vec![silent]);
    let a = audits(&effects);
    assert_eq!(
        (a[0].event.as_str(), a[0].outcome.as_str(), a[0].reason.as_str()),
        ("handshake", "rejected", "timeout")
    );
    assert_eq!(a[0].ip, Some("10.0.0.1".parse().unwrap()));
    assert!(w.is_dead(silent));
    assert!(!w.is_dead(talking));
    w.advance_to(T0 + 5_000);
    assert_eq!(shutdowns(&w.effects()), vec![talking]);
    // The runtime reports both gone: nothing is left armed.
    w.core.pending_done(silent.idx);
    w.core.pending_done(talking.idx);
    w.core.handle_gone(silent);
    w.core.handle_gone(talking);
    assert!(w.core.is_empty());
    assert_eq!(w.core.poll_timeout(), None);
}

#[test]
fn a_heartbeat_ping_is_queued_at_its_time_and_rearmed() {
    let mut w = world();
    let id = w.connect("alice", "s1", "j1");
    let at = w.session_deadline(id, TimerKind::Heartbeat).unwrap();
    assert!(at > T0 && at <= T0 + 15_000);
    assert!(w.core.poll_timeout().is_some_and(|t| t <= at));
    w.advance_to(at - 1);
    assert!(w.out(id).is_empty());
    w.advance_to(at);
    assert_eq!(w.out(id), vec![serde_json::json!({"ping": true})]);
    assert_eq!(kicks(&w.effects()), vec![id]);
    assert_eq!(w.session_deadline(id, TimerKind::Heartbeat), Some(at + 15_000));
}

#[test]
fn a_subscription_waiting_for_a_new_symbol_is_activated_by_its_first_tick() {
    let mut w = world();
    let id = w.connect("alice", "s1", "j1");
    w.subscribe(id, "NEW-SYM");
    assert_eq!(w.core.waiting_names(), 1);
    // A publisher creates the symbol with its first tick.
    w.publish("NEW-SYM", 42.0);
    w.publish("NEW-SYM", 43.0);
    assert_eq!(w.dispatch(), 2);
    let out = w.out(id);
    assert_eq!(out.len(), 2, "{out:?}");
    assert_eq!((&out[0]["s"], &out[0]["seq"]), (&"NEW-SYM".into(), &1.into()));
    assert!(out[0].get("skipped").is_none());
    assert_eq!(out[1]["seq"], 2);
    assert_eq!(w.core.waiting_names(), 0);
    let sym = w.shared.hub.intern("NEW-SYM").unwrap();
    assert_eq!(w.core.subscribers(sym), 1);
}

#[test]
fn a_bus_head_is_the_baseline_and_snapshot_of_waiting_subscribers_and_goes_to_no_one() {
    // `[cluster]`: the node takes interest in a symbol the cluster has ticked 41 times;
    // the head (seq 41) arrives before any live tick.
    let mut w = world();
    let snap = w.connect("alice", "s1", "j1");
    let plain = w.connect("bob", "s2", "j2");
    w.text(
        snap,
        r#"{"op":"subscribe","id":1,"symbols":["CL-SYM"],"snapshot":true}"#,
    );
    assert_eq!(w.out(snap)[0]["type"], "subscribed");
    w.subscribe(plain, "CL-SYM");
    w.effects();
    assert_eq!(w.core.waiting_names(), 1);
    let t = tick(50.0);
    assert_eq!(
        w.shared.hub.ingest_ordered("CL-SYM", 41, &t, true),
        crate::feed::hub::Ingested::Accepted
    );
    assert_eq!(w.dispatch(), 0, "a head is delivered to no one");
    let out = w.out(snap);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(
        (&out[0]["type"], &out[0]["seq"]),
        (&"snapshot".into(), &41.into())
    );
    assert!(w.out(plain).is_empty(), "no snapshot unless asked");
    assert_eq!(w.core.waiting_names(), 0);
    // The next live tick is 42 for both, with no gap; a duplicate or older one is dropped
    // by the hub before any shard sees it.
    assert_eq!(
        w.shared.hub.ingest_ordered("CL-SYM", 42, &t, false),
        crate::feed::hub::Ingested::Accepted
    );
    assert_eq!(
        w.shared.hub.ingest_ordered("CL-SYM", 42, &t, false),
        crate::feed::hub::Ingested::Stale
    );
    assert_eq!(
        w.shared.hub.ingest_ordered("CL-SYM", 40, &t, false),
        crate::feed::hub::Ingested::Stale
    );
    assert_eq!(w.dispatch(), 2);
    for id in [snap, plain] {
        let out = w.out(id);
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0]["seq"], 42);
        assert!(out[0].get("skipped").is_none(), "{out:?}");
    }
    // A jump (ticks lost while the node was away from the bus) shows as `skipped`.
    w.shared.hub.ingest_ordered("CL-SYM", 45, &t, false);
    assert_eq!(w.dispatch(), 2);
    assert_eq!(w.out(plain)[0]["skipped"], 2);
    // Nobody here wants a symbol: its ticks are not taken.
    assert_eq!(
        w.shared.hub.ingest_ordered("NOBODY", 1, &t, false),
        crate::feed::hub::Ingested::NoInterest
    );
}

#[test]
fn a_connection_gone_leaves_no_subscription_waiter_or_timer_behind() {
    let mut w = world();
    let id = w.connect("alice", "s1", "j1");
    w.subscribe(id, "BTC-USD");
    w.subscribe(id, "LATER-1");
    let sym = w.shared.hub.intern("BTC-USD").unwrap();
    assert_eq!((w.core.subscribers(sym), w.core.waiting_names()), (1, 1));
    w.core.handle_gone(id);
    assert_eq!((w.core.subscribers(sym), w.core.waiting_names()), (0, 0));
    assert!(w.core.get(id).is_none());
    assert_eq!(w.core.poll_timeout(), None);
    assert_eq!(w.shared.metrics.shard(0).connections.load(Relaxed), 0);
    // The slot's next tenant is a different connection.
    let next = w.accept();
    assert_eq!(next.idx, id.idx);
    assert_ne!(next.generation, id.generation);
}

#[test]
fn bytes_split_across_reads_are_decoded_once_the_frame_is_whole() {
    use crate::proto::frame::{OpCode, encode_client_frame_into};
    let mut w = world();
    let id = w.connect("alice", "s1", "j1");
    let mut wire = Vec::new();
    let msg = br#"{"op":"subscribe","id":7,"symbols":["BTC-USD"]}"#;
    encode_client_frame_into(OpCode::Text, true, msg, [1, 2, 3, 4], &mut wire);
    encode_client_frame_into(OpCode::Ping, true, b"hi", [5, 6, 7, 8], &mut wire);
    let shared = w.shared.clone();
    let mut partial = Vec::new();
    // The first read ends inside the text frame: nothing is decided, the start is kept.
    let (first, second) = wire.split_at_mut(10);
    w.core.handle_bytes(w.now, id.idx, first, &mut partial, &*shared);
    assert_eq!(partial.len(), 10);
    assert!(w.out(id).is_empty());
    w.core.handle_bytes(w.now, id.idx, second, &mut partial, &*shared);
    assert!(
        partial.is_empty() && partial.capacity() == 0,
        "no buffer held between messages"
    );
    let out = w.out(id);
    assert_eq!(out[0]["type"], "subscribed");
    assert_eq!(out[0]["id"], 7);
    assert_eq!(out[1], serde_json::json!({"pong": true}));
    // One per read (a read that queued nothing asks too, as it always did: the writer
    // finds the queue empty and parks again).
    assert_eq!(kicks(&w.effects()), vec![id, id]);
    let sym = shared.hub.intern("BTC-USD").unwrap();
    assert_eq!(w.core.subscribers(sym), 1);
}

#[test]
fn an_unmasked_frame_closes_the_connection_with_1002() {
    use crate::proto::frame::{OpCode, encode_frame_into};
    let mut w = world();
    let id = w.connect("alice", "s1", "j1");
    let mut wire = Vec::new();
    encode_frame_into(OpCode::Text, b"{}", &mut wire);
    let shared = w.shared.clone();
    let mut partial = Vec::new();
    w.core
        .handle_bytes(w.now, id.idx, &mut wire, &mut partial, &*shared);
    assert_eq!(w.out(id).last().unwrap()["close"], 1002);
    assert_eq!(w.deadline(id, ConnTimer::HardDrop), Some(w.now + HARD_DROP_MS));
    assert_eq!(closes(&w.shared, 1002), 1);
}

/// The session owns its deadlines; the core files the earliest. A reauth result that moves
/// it earlier (a shorter token, no grace) is filed at once, and the close comes exactly
/// then.
#[test]
fn a_reauth_that_moves_the_session_deadline_earlier_is_filed_and_fires() {
    let mut w = world_with(|c| c.lifetime.reauth_grace = Duration::ZERO);
    let id = w.connect("alice", "s1", "j1");
    let heartbeat = w.session_deadline(id, TimerKind::Heartbeat).unwrap();
    assert_eq!(w.deadline(id, ConnTimer::Session), Some(heartbeat));
    let secs = w.now / 1000;
    let claims = Claims {
        sub: "alice".into(),
        exp: secs + 3,
        iat: Some(secs - 10),
        sid: Some("s1".into()),
        jti: Some("j2".into()),
        roles: vec!["subscriber".into()],
        symbols: vec!["*".into()],
        ..Claims::default()
    };
    let token = sign_token(&w.key, "k1", &claims);
    let verified = w.shared.verify_token(&token, w.now);
    assert!(verified.is_ok());
    w.core.handle_control(
        w.now,
        Control::ReauthDone {
            idx: id.idx,
            generation: id.generation,
            id: Some(1),
            result: Box::new(verified),
        },
    );
    assert_eq!(w.out(id)[0]["type"], "reauthed");
    let deadline = (secs + 3) * 1000;
    assert_eq!(w.session_deadline(id, TimerKind::ReauthDeadline), Some(deadline));
    // The notice is due at once (already inside the lead), then the close.
    let notice = w.session_deadline(id, TimerKind::ReauthRequired).unwrap();
    assert!(notice <= w.now);
    assert_eq!(w.deadline(id, ConnTimer::Session), Some(notice));
    w.effects();
    w.advance_to(w.now);
    assert_eq!(w.out(id)[0]["type"], "reauth_required");
    assert_eq!(w.deadline(id, ConnTimer::Session), Some(deadline));
    w.advance_to(deadline - 1);
    assert!(w.out(id).is_empty());
    w.advance_to(deadline);
    assert_eq!(w.out(id), vec![serde_json::json!({"close": 4001})]);
    assert_eq!(audits(&w.effects())[0].reason.as_str(), "token_expired");
    assert_eq!(w.deadline(id, ConnTimer::Session), None);
    assert_eq!(w.deadline(id, ConnTimer::HardDrop), Some(deadline + HARD_DROP_MS));
}

/// The `seq`s of `tick` messages in `out` (after the `subscribed` ack).
fn tick_seqs(out: &[serde_json::Value]) -> Vec<u64> {
    out.iter()
        .filter(|v| v["type"] == "tick")
        .map(|v| v["seq"].as_u64().unwrap())
        .collect()
}

/// PROTOCOL.md 10: `since` replays what is held after it, then the live stream takes
/// over with no gap and no duplicate while ticks keep arriving: ticks published before the
/// subscribe but still in the shard's inbox, and ticks published after it.
#[test]
fn since_replays_then_goes_live_without_gap_or_duplicate_under_publishing() {
    let mut w = world();
    let a = w.connect("alice", "s1", "j1");
    w.subscribe(a, "BTC-USD");
    for i in 1..=10 {
        w.publish("BTC-USD", f64::from(i));
    }
    assert_eq!(w.dispatch(), 10);
    assert_eq!(tick_seqs(&w.out(a)), (1..=10).collect::<Vec<_>>());
    // Two more are published and wait in the shard's inbox when bob subscribes.
    w.publish("BTC-USD", 11.0);
    w.publish("BTC-USD", 12.0);
    let b = w.connect("bob", "s2", "j2");
    w.text(
        b,
        r#"{"op":"subscribe","id":7,"symbols":["BTC-USD"],"since":{"BTC-USD":4}}"#,
    );
    let first = w.out(b);
    assert_eq!(first[0]["type"], "subscribed", "the ack comes before the replay");
    assert_eq!(tick_seqs(&first), (5..=12).collect::<Vec<_>>());
    // The replayed frames are the shared ones (no re-encoding).
    w.publish("BTC-USD", 13.0);
    w.publish("BTC-USD", 14.0);
    w.dispatch();
    assert_eq!(tick_seqs(&w.out(b)), vec![13, 14]);
    assert_eq!(tick_seqs(&w.out(a)), vec![11, 12, 13, 14]);
    assert_eq!(w.shared.metrics.replayed.load(Relaxed), 8);
}

#[test]
fn since_out_of_reach_is_a_reset_snapshot_and_since_at_the_head_replays_nothing() {
    let mut w = world_with(|c| c.feed.history = 5);
    for i in 1..=20 {
        w.publish("BTC-USD", f64::from(i));
    }
    let a = w.connect("alice", "s1", "j1");
    w.text(
        a,
        r#"{"op":"subscribe","symbols":["BTC-USD","ETH-USD"],"since":{"BTC-USD":3}}"#,
    );
    let out = w.out(a);
    assert_eq!(out.len(), 2, "{out:?}");
    assert_eq!(out[1]["type"], "snapshot");
    assert_eq!(out[1]["seq"], 20);
    assert_eq!(out[1]["reset"], true);
    assert_eq!(w.shared.metrics.replay_resets.load(Relaxed), 1);
    // Exactly at the edge of the history: replayed.
    let b = w.connect("bob", "s2", "j2");
    w.text(
        b,
        r#"{"op":"subscribe","symbols":["BTC-USD"],"since":{"BTC-USD":15}}"#,
    );
    assert_eq!(tick_seqs(&w.out(b)), vec![16, 17, 18, 19, 20]);
    // At the head: nothing but the ack; live ticks follow.
    let c = w.connect("carol", "s3", "j3");
    w.text(
        c,
        r#"{"op":"subscribe","symbols":["BTC-USD"],"since":{"BTC-USD":20}}"#,
    );
    assert_eq!(w.out(c).len(), 1);
    w.inbox();
    w.publish("BTC-USD", 21.0);
    w.dispatch();
    for id in [a, b, c] {
        assert_eq!(tick_seqs(&w.out(id)), vec![21]);
    }
    // Ahead of the symbol (the server restarted and its order with it): a reset.
    let d = w.connect("dave", "s4", "j4");
    w.text(
        d,
        r#"{"op":"subscribe","symbols":["BTC-USD"],"since":{"BTC-USD":900}}"#,
    );
    let out = w.out(d);
    assert_eq!(
        (out[1]["seq"].as_u64(), &out[1]["reset"]),
        (Some(21), &true.into())
    );
}

#[test]
fn since_on_a_symbol_already_subscribed_keeps_its_stream() {
    let mut w = world();
    let a = w.connect("alice", "s1", "j1");
    w.subscribe(a, "BTC-USD");
    for i in 1..=3 {
        w.publish("BTC-USD", f64::from(i));
    }
    w.dispatch();
    assert_eq!(tick_seqs(&w.out(a)), vec![1, 2, 3]);
    w.text(
        a,
        r#"{"op":"subscribe","symbols":["BTC-USD"],"since":{"BTC-USD":0}}"#,
    );
    let out = w.out(a);
    assert_eq!(out.len(), 1, "only the ack: no tick twice on one connection");
}

/// Age expiry on the virtual clock of the ticks: a tick older than `history_age` is not
/// replayed (the subscriber gets a reset), and the sweep gives its memory back.
#[test]
fn since_does_not_reach_past_history_age() {
    let w = world_with(|c| c.feed.history_age = Duration::from_secs(1));
    let sym = w.shared.hub.intern("BTC-USD").unwrap();
    w.publish("BTC-USD", 1.0);
    w.publish("BTC-USD", 2.0);
    let held = w.shared.hub.history_held();
    assert_eq!(held.1, 2);
    assert!(held.0 > 0);
    let t1 = w.shared.hub.latest(sym).unwrap().accepted_ns;
    // The sweep two seconds later frees both (virtual monotonic time).
    w.shared.hub.expire_history(t1 + 2_000_000_000, 0, 16);
    assert_eq!(w.shared.hub.history_held(), (0, 0));
}

/// A subscription with `since` to a name that does not exist (the server restarted, the
/// symbol was retired): its first tick is a reset snapshot, not a `seq` going backwards.
#[test]
fn since_on_a_waiting_name_turns_a_restarted_order_into_a_reset() {
    let mut w = world();
    let a = w.connect("alice", "s1", "j1");
    let b = w.connect("bob", "s2", "j2");
    w.text(
        a,
        r#"{"op":"subscribe","symbols":["NEW-SYM"],"since":{"NEW-SYM":7}}"#,
    );
    w.text(
        b,
        r#"{"op":"subscribe","symbols":["NEW-SYM"],"since":{"NEW-SYM":0}}"#,
    );
    w.out(a);
    w.out(b);
    w.publish("NEW-SYM", 1.0);
    w.publish("NEW-SYM", 2.0);
    w.dispatch();
    let out = w.out(a);
    assert_eq!(
        (&out[0]["type"], &out[0]["seq"], &out[0]["reset"]),
        (&"snapshot".into(), &1.into(), &true.into())
    );
    assert_eq!(tick_seqs(&out), vec![2]);
    // `since` 0 on a new symbol: seq 1 follows it, an ordinary tick.
    assert_eq!(tick_seqs(&w.out(b)), vec![1, 2]);
}

/// `[cluster]`: a node takes interest in a symbol and backfills it from the bus's stream;
/// a waiting subscriber with `since` gets the replay up to the head, then the live ticks.
#[test]
fn a_bus_backfill_is_replayed_to_a_waiting_since_subscriber() {
    let mut w = world();
    let a = w.connect("alice", "s1", "j1");
    let b = w.connect("bob", "s2", "j2");
    w.text(
        a,
        r#"{"op":"subscribe","symbols":["CL-SYM"],"since":{"CL-SYM":38}}"#,
    );
    w.text(
        b,
        r#"{"op":"subscribe","symbols":["CL-SYM"],"since":{"CL-SYM":2}}"#,
    );
    w.out(a);
    w.out(b);
    assert_eq!(w.core.waiting_names(), 1);
    let held: Vec<(u64, Tick, u64)> = (35..=41).map(|q| (q, tick(q as f64), 1_000)).collect();
    assert_eq!(
        w.shared.hub.backfill("CL-SYM", &held),
        crate::feed::hub::Ingested::Accepted
    );
    // A live tick arrives right behind the head.
    assert_eq!(
        w.shared.hub.ingest_ordered("CL-SYM", 42, &tick(42.0), false),
        crate::feed::hub::Ingested::Accepted
    );
    w.dispatch();
    assert_eq!(tick_seqs(&w.out(a)), vec![39, 40, 41, 42]);
    let out = w.out(b);
    assert_eq!(
        (out[0]["seq"].as_u64(), &out[0]["reset"]),
        (Some(41), &true.into())
    );
    assert_eq!(tick_seqs(&out), vec![42]);
}

/// `[cluster]`: a node took a symbol from the bus's head alone (its first subscriber had
/// no `since`), the live ticks flow, and the stream's history is still being read. A
/// `since` from before the head waits for that read (no reset, no tick yet), then gets
/// every tick after it: the older history, the head, the live ones meanwhile, then live.
#[test]
fn a_since_waits_for_the_bus_history_read_behind_the_live_ticks() {
    let mut w = world();
    let a = w.connect("alice", "s1", "j1");
    let b = w.connect("bob", "s2", "j2");
    w.subscribe(a, "CL-SYM");
    w.effects();
    assert_eq!(
        w.shared.hub.ingest_head_before_history("CL-SYM", 41, &tick(41.0)),
        crate::feed::hub::Ingested::Accepted
    );
    assert_eq!(w.dispatch(), 0, "a head is delivered to no one");
    w.shared.hub.ingest_ordered("CL-SYM", 42, &tick(42.0), false);
    w.dispatch();
    assert_eq!(tick_seqs(&w.out(a)), vec![42]);
    // Since 36, before the head: it waits.
    w.text(
        b,
        r#"{"op":"subscribe","symbols":["CL-SYM"],"since":{"CL-SYM":36}}"#,
    );
    let out = w.out(b);
    assert_eq!((out.len(), &out[0]["type"]), (1, &"subscribed".into()), "{out:?}");
    assert_eq!(w.core.waiting_names(), 1);
    w.shared.hub.ingest_ordered("CL-SYM", 43, &tick(43.0), false);
    w.dispatch();
    assert_eq!(tick_seqs(&w.out(a)), vec![43]);
    assert!(w.out(b).is_empty(), "nothing before the history is in");
    // Since 41, the head: what the node holds is enough, no wait.
    let c = w.connect("carol", "s3", "j3");
    w.text(
        c,
        r#"{"op":"subscribe","symbols":["CL-SYM"],"since":{"CL-SYM":41}}"#,
    );
    assert_eq!(tick_seqs(&w.out(c)), vec![42, 43]);
    // The read ends: 30..=40 go in front of the head (41 is held already).
    let held: Vec<(u64, Tick, u64)> = (30..=41).map(|q| (q, tick(q as f64), 1_000)).collect();
    assert_eq!(w.shared.hub.backfill_older("CL-SYM", &held), 11);
    assert_eq!(w.dispatch(), 0, "the read's marker is delivered to no one");
    assert_eq!(tick_seqs(&w.out(b)), (37..=43).collect::<Vec<_>>());
    assert_eq!(w.core.waiting_names(), 0);
    w.shared.hub.ingest_ordered("CL-SYM", 44, &tick(44.0), false);
    assert_eq!(w.dispatch(), 3);
    for id in [a, b, c] {
        let out = w.out(id);
        assert_eq!(tick_seqs(&out), vec![44], "{out:?}");
        assert!(out[0].get("skipped").is_none(), "{out:?}");
    }
}

/// The same when the `since` waited for the name before the head came, beside a
/// subscriber without `since` that made the node take the head alone; and when the read
/// brings nothing (it failed), the wait ends in a `reset`, not in silence.
#[test]
fn a_since_waiting_for_a_new_name_waits_for_the_history_too_and_a_failed_read_resets() {
    for held in [true, false] {
        let mut w = world();
        let a = w.connect("alice", "s1", "j1");
        let b = w.connect("bob", "s2", "j2");
        w.subscribe(a, "CL-SYM");
        w.text(
            b,
            r#"{"op":"subscribe","symbols":["CL-SYM"],"since":{"CL-SYM":38}}"#,
        );
        w.out(a);
        w.out(b);
        w.shared.hub.ingest_head_before_history("CL-SYM", 41, &tick(41.0));
        w.shared.hub.ingest_ordered("CL-SYM", 42, &tick(42.0), false);
        w.dispatch();
        assert_eq!(tick_seqs(&w.out(a)), vec![42]);
        assert!(w.out(b).is_empty());
        let older: Vec<(u64, Tick, u64)> = match held {
            true => (35..=40).map(|q| (q, tick(q as f64), 1_000)).collect(),
            false => Vec::new(),
        };
        w.shared.hub.backfill_older("CL-SYM", &older);
        w.dispatch();
        let out = w.out(b);
        if held {
            assert_eq!(tick_seqs(&out), vec![39, 40, 41, 42]);
        } else {
            assert_eq!(
                (&out[0]["type"], &out[0]["seq"], &out[0]["reset"]),
                (&"snapshot".into(), &42.into(), &true.into()),
                "{out:?}"
            );
            assert_eq!(out.len(), 1, "{out:?}");
        }
        w.shared.hub.ingest_ordered("CL-SYM", 43, &tick(43.0), false);
        w.dispatch();
        assert_eq!(tick_seqs(&w.out(b)), vec![43]);
    }
}

/// The same for a symbol that exists but has had no tick (a configured symbol of a server
/// that just restarted): the first tick is a reset unless it follows `since`.
#[test]
fn since_on_a_symbol_without_ticks_turns_a_restarted_order_into_a_reset() {
    let mut w = world();
    let a = w.connect("alice", "s1", "j1");
    let b = w.connect("bob", "s2", "j2");
    w.text(
        a,
        r#"{"op":"subscribe","symbols":["BTC-USD"],"since":{"BTC-USD":50}}"#,
    );
    w.text(
        b,
        r#"{"op":"subscribe","symbols":["BTC-USD"],"since":{"BTC-USD":0}}"#,
    );
    assert_eq!(w.out(a).len(), 1, "only the ack: nothing to replay yet");
    w.out(b);
    w.publish("BTC-USD", 1.0);
    w.publish("BTC-USD", 2.0);
    w.dispatch();
    let out = w.out(a);
    assert_eq!(
        (out[0]["seq"].as_u64(), &out[0]["reset"]),
        (Some(1), &true.into()),
        "{out:?}"
    );
    assert_eq!(tick_seqs(&out), vec![2]);
    assert_eq!(tick_seqs(&w.out(b)), vec![1, 2]);
    // An unsubscribe (or the close) forgets what was asked.
    assert!(w.core.since_first.is_empty());
    w.text(
        a,
        r#"{"op":"subscribe","symbols":["ETH-USD"],"since":{"ETH-USD":9}}"#,
    );
    assert_eq!(w.core.since_first.len(), 1);
    w.text(a, r#"{"op":"unsubscribe","symbols":["ETH-USD"]}"#);
    assert!(w.core.since_first.is_empty());
    w.text(
        b,
        r#"{"op":"subscribe","symbols":["ETH-USD"],"since":{"ETH-USD":9}}"#,
    );
    assert_eq!(w.core.since_first.len(), 1);
    w.core.handle_gone(b);
    assert!(w.core.since_first.is_empty());
}

/// A `since` costs at most a queue's worth of work: past the connection's outbound room a
/// symbol's replay is its newest tick standing for the rest (`skipped`), so one message
/// naming many symbols with long histories cannot make the shard queue all of them. Every
/// tick is still accounted for: per symbol, delivered + skipped = what it missed.
#[test]
fn a_since_over_many_symbols_is_bounded_by_the_queue_and_accounts_for_every_tick() {
    let mut w = world_with(|c| c.limits.outbound_queue_bytes = 8192);
    let names: Vec<String> = (0..20).map(|i| format!("SYM-{i}")).collect();
    for n in &names {
        for k in 0..200 {
            w.publish(n, f64::from(k));
        }
    }
    let a = w.connect("alice", "s1", "j1");
    let since: serde_json::Map<String, serde_json::Value> =
        names.iter().map(|n| (n.clone(), 0.into())).collect();
    w.text(
        a,
        &serde_json::json!({"op":"subscribe","symbols":names,"since":since}).to_string(),
    );
    let out = w.out(a);
    assert!(
        out.len() < 120,
        "bounded by the queue, not 4,000 ticks: {}",
        out.len()
    );
    let mut per: std::collections::HashMap<String, (u64, u64)> = Default::default();
    for m in out.iter().filter(|m| m["type"] == "tick") {
        let e = per.entry(m["s"].as_str().unwrap().to_owned()).or_default();
        let seq = m["seq"].as_u64().unwrap();
        let skipped = m["skipped"].as_u64().unwrap_or(0);
        assert_eq!(seq, e.0 + skipped + 1, "each jump explained: {m}");
        e.0 = seq;
        e.1 += 1;
    }
    assert_eq!(per.len(), 20);
    assert!(per.values().all(|(last, _)| *last == 200), "{per:?}");
    assert_eq!(w.shared.metrics.replayed.load(Relaxed), 20 * 200);
}
