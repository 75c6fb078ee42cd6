//! Several nodes on NATS with JetStream (PROTOCOL.md section 9, docs/CLUSTER.md): the
//! sans-IO half. Subject and stream names, the ingest parser (every byte from the bus is
//! hostile), the per-symbol sequencer's decisions, and the reconnect backoff are plain
//! functions and data here, unit-tested with no bus; `rt::bus` wires them to `async-nats`
//! on its own thread.
//!
//! # One order per symbol
//!
//! Feed handlers publish raw ticks to `<prefix>.in.<SYMBOL>`. One node at a time, the
//! ingest leader (elected with a key that expires unless refreshed), reads them: NATS
//! keeps one publisher's messages in order to one subscriber, so a feed handler's ticks
//! keep their order. The leader validates each and appends it to the JetStream stream over
//! `<prefix>.t.<SYMBOL>` with two headers: `Tg-Seq` (the symbol's next `seq`, one more
//! than the newest tick of that subject in the stream) and
//! `Nats-Expected-Last-Subject-Sequence` (the stream sequence of that newest message). The
//! stream accepts the append only if nothing else was appended to the subject meanwhile;
//! otherwise the node reads the subject's newest message again and retries
//! ([`Sequencer`]). What queued for a symbol while its previous append was in flight goes
//! as one message of up to [`MAX_BATCH`] ticks with consecutive `seq`s from `Tg-Seq`
//! ([`encode_batch_tick`], [`parse_ordered_payload`]). So two nodes can never give two
//! ticks the same `seq`, and `seq` grows by one per tick in the stream. The stream
//! republishes what it stored on `<prefix>.o.<SYMBOL>`; every node with local subscribers
//! of a symbol holds a plain NATS subscription there (interest-based: taken with the
//! first local subscriber, released with the last), reads `seq` from the header, and
//! never delivers a `seq` at or below the last it delivered. Snapshots come from the
//! last tick of the stream's newest message of the subject, the same on every node.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::feed::symbol::is_valid_symbol;
use crate::feed::tick::Tick;

pub mod names;
pub use simd_json::Buffers;

/// The header carrying the `seq` of an ordered message's first tick on
/// `<prefix>.t.<SYMBOL>` (the others follow +1, [`parse_ordered_payload`]).
pub const SEQ_HEADER: &str = "Tg-Seq";
/// JetStream's optimistic concurrency header (per-subject).
pub const EXPECTED_LAST_SUBJECT_SEQ: &str = "Nats-Expected-Last-Subject-Sequence";
/// A tick payload from the bus larger than this is dropped unread (a valid tick is about
/// 150 bytes; the bound leaves room for whitespace).
pub const MAX_INGEST_BYTES: usize = 1024;
/// The JetStream error code for "wrong last sequence" (someone appended first).
pub const ERR_WRONG_LAST_SEQUENCE: u64 = 10071;
/// Appends of one tick tried before it is dropped as `conflict`.
pub const MAX_APPEND_TRIES: u32 = 8;

pub use names::{check_node_name, check_prefix, check_server_url};

/// A symbol that can be a subject's tail: a valid symbol with no empty NATS token (no
/// `..`, no trailing `.`).
pub fn is_bus_symbol(s: &str) -> bool {
    is_valid_symbol(s) && !s.contains("..") && !s.ends_with('.')
}

/// The subjects and stream of one deployment (one `subject_prefix`).
#[derive(Clone, Debug)]
pub struct Subjects {
    prefix: String,
}

impl Subjects {
    pub fn new(prefix: &str) -> Subjects {
        Subjects {
            prefix: prefix.to_owned(),
        }
    }

    /// Feed handlers publish here (all symbols).
    pub fn ingest_all(&self) -> String {
        format!("{}.in.>", self.prefix)
    }

    /// The queue group the nodes share on [`Self::ingest_all`].
    pub fn ingest_group(&self) -> String {
        format!("{}-ingest", self.prefix)
    }

    /// The symbol a raw tick was published for, from its subject.
    pub fn ingest_symbol<'a>(&self, subject: &'a str) -> Option<&'a str> {
        subject.strip_prefix(self.prefix.as_str())?.strip_prefix(".in.")
    }

    /// The ordered ticks of one symbol (the stream's subject).
    pub fn ordered(&self, symbol: &str) -> String {
        format!("{}.t.{symbol}", self.prefix)
    }

    /// Where the stream republishes what it stored of `symbol`: the nodes subscribe here
    /// (a message refused by the stream's sequence check never appears on it).
    pub fn delivered(&self, symbol: &str) -> String {
        format!("{}.o.{symbol}", self.prefix)
    }

    /// Every republished subject (the stream's republish destination).
    pub fn delivered_all(&self) -> String {
        format!("{}.o.>", self.prefix)
    }

    /// Revocations (one subject, every node follows it).
    pub fn revoke(&self) -> String {
        format!("{}.revoke", self.prefix)
    }

    /// A ticket's subject (`key`: [`ticket_key`]).
    pub fn ticket(&self, key: &str) -> String {
        format!("{}.ticket.{key}", self.prefix)
    }

    /// Every ticket subject.
    pub fn ticket_all(&self) -> String {
        format!("{}.ticket.*", self.prefix)
    }

    /// A user's live connections on one node (`user`: `usercap::user_key`).
    pub fn cap(&self, user: &str, node: &str) -> String {
        format!("{}.cap.{user}.{}", self.prefix, node.replace('.', "_"))
    }

    /// Every node's counts.
    pub fn cap_all(&self) -> String {
        format!("{}.cap.*.*", self.prefix)
    }

    /// `(user key, node token)` of a count's subject.
    pub fn cap_parts<'a>(&self, subject: &'a str) -> Option<(&'a str, &'a str)> {
        let rest = subject
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(".cap.")?;
        let (user, node) = rest.split_once('.')?;
        (user.len() == 32
            && user.bytes().all(|b| b.is_ascii_hexdigit())
            && !node.is_empty()
            && node.len() <= 64)
            .then_some((user, node))
    }

    /// Asks every node to announce its counts again (a node that just connected).
    pub fn cap_sync(&self) -> String {
        format!("{}.capsync", self.prefix)
    }

    /// The ingest leader's claim.
    pub fn leader(&self) -> String {
        format!("{}.leader", self.prefix)
    }

    /// Every ordered subject (the stream's filter).
    pub fn ordered_all(&self) -> String {
        format!("{}.t.>", self.prefix)
    }

    /// The symbol of an ordered subject.
    pub fn ordered_symbol<'a>(&self, subject: &'a str) -> Option<&'a str> {
        subject.strip_prefix(self.prefix.as_str())?.strip_prefix(".t.")
    }

    /// The JetStream stream holding the ordered ticks: the prefix upper-cased, dots and
    /// dashes as `_`, then `_TICKS`.
    pub fn stream(&self) -> String {
        let mut s: String = self
            .prefix
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_uppercase()
                } else {
                    '_'
                }
            })
            .collect();
        s.push_str("_TICKS");
        s
    }
}

/// Why a payload from the bus was dropped (`tickgate_ingest_rejected_total{reason}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reject {
    /// Over [`MAX_INGEST_BYTES`].
    TooLarge,
    /// No bytes.
    Empty,
    /// Not UTF-8 JSON.
    NotJson,
    /// JSON, but not a valid tick (fields, types, a non-finite number).
    BadTick,
    /// The subject's symbol is not a valid symbol.
    BadSymbol,
    /// The tick's `s` is not the subject's symbol.
    SymbolMismatch,
    /// An ordered message without a valid `Tg-Seq` header.
    BadSeq,
    /// The node's symbol table is full.
    TableFull,
    /// The stream kept refusing the append (another node kept winning), or the bus
    /// failed it.
    AppendFailed,
}

impl Reject {
    pub const ALL: [Reject; 9] = [
        Reject::TooLarge,
        Reject::Empty,
        Reject::NotJson,
        Reject::BadTick,
        Reject::BadSymbol,
        Reject::SymbolMismatch,
        Reject::BadSeq,
        Reject::TableFull,
        Reject::AppendFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reject::TooLarge => "too_large",
            Reject::Empty => "empty",
            Reject::NotJson => "not_json",
            Reject::BadTick => "bad_tick",
            Reject::BadSymbol => "bad_symbol",
            Reject::SymbolMismatch => "symbol_mismatch",
            Reject::BadSeq => "bad_seq",
            Reject::TableFull => "table_full",
            Reject::AppendFailed => "append_failed",
        }
    }

    pub fn index(self) -> usize {
        Reject::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

/// Validates one tick payload from the bus for `symbol` (the subject's): exactly what a
/// `publish` tick must be (PROTOCOL.md section 5), with `s` equal to the subject's symbol.
/// `scratch` is copied into (simd-json parses in place) and reused; nothing is allocated
/// beyond [`MAX_INGEST_BYTES`].
pub fn parse_tick_payload(
    symbol: &str,
    payload: &[u8],
    scratch: &mut Vec<u8>,
    buffers: &mut Buffers,
) -> Result<Tick, Reject> {
    if payload.is_empty() {
        return Err(Reject::Empty);
    }
    if payload.len() > MAX_INGEST_BYTES {
        return Err(Reject::TooLarge);
    }
    if !is_bus_symbol(symbol) {
        return Err(Reject::BadSymbol);
    }
    scratch.clear();
    scratch.extend_from_slice(payload);
    let (s, tick) = crate::feed::msg::parse_tick_json(scratch, buffers).map_err(|e| match e {
        crate::feed::msg::TickJsonError::NotJson => Reject::NotJson,
        crate::feed::msg::TickJsonError::Invalid => Reject::BadTick,
    })?;
    if s != symbol {
        return Err(Reject::SymbolMismatch);
    }
    Ok(tick)
}

/// The `seq` of an ordered message, from its `Tg-Seq` header value.
pub fn parse_seq(v: Option<&str>) -> Result<u64, Reject> {
    let v = v.ok_or(Reject::BadSeq)?;
    if v.is_empty() || v.len() > 20 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Reject::BadSeq);
    }
    match v.parse::<u64>() {
        Ok(0) | Err(_) => Err(Reject::BadSeq),
        Ok(n) => Ok(n),
    }
}

/// The canonical payload of a tick on the ordered subjects (the same JSON a feed handler
/// sends, re-encoded from the validated values).
pub fn encode_tick_payload(symbol: &str, t: &Tick, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(b"{\"s\":");
    crate::feed::json::write_json_str(symbol, out);
    out.extend_from_slice(b",\"ts\":");
    out.extend_from_slice(itoa::Buffer::new().format(t.ts).as_bytes());
    for (k, v) in [("bid", t.bid), ("ask", t.ask), ("last", t.last), ("qty", t.qty)] {
        out.extend_from_slice(b",\"");
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(b"\":");
        out.extend_from_slice(ryu::Buffer::new().format_finite(v).as_bytes());
    }
    out.push(b'}');
}

/// Ticks of one symbol carried by one message on the ordered subjects, at most: a node
/// appends what queued for a symbol while its previous append was in flight as one
/// message (its `seq`s consecutive from the `Tg-Seq` header), so under load the bus
/// stores, acknowledges and republishes one message for many ticks. A quiet symbol's
/// messages carry one tick each, exactly as a feed handler's payload.
pub const MAX_BATCH: usize = 64;
/// The largest ordered payload read: [`MAX_BATCH`] ticks of at most
/// [`MAX_INGEST_BYTES`] each, with their separators.
pub const MAX_BATCH_BYTES: usize = MAX_BATCH * (MAX_INGEST_BYTES + 1);

/// Appends the canonical payload of `t` ([`encode_tick_payload`]) to a batch in `out`:
/// ticks are separated by one `\n` (JSON never has a raw newline inside a string, and
/// the canonical payload has none outside one).
pub fn encode_batch_tick(symbol: &str, t: &Tick, out: &mut Vec<u8>, scratch: &mut Vec<u8>) {
    if !out.is_empty() {
        out.push(b'\n');
    }
    encode_tick_payload(symbol, t, scratch);
    out.extend_from_slice(scratch);
}

/// The `seq` of the last tick of an ordered message whose first is `first` (its
/// `Tg-Seq`), from the number of parts alone: what a head is, even when the payload
/// does not parse (a hostile or damaged newest message must not make the next append
/// go back to a `seq` already given). `None` past `u64::MAX`.
pub fn ordered_last_seq(first: u64, payload: &[u8]) -> Option<u64> {
    let newlines = payload.iter().filter(|&&b| b == b'\n').count();
    first.checked_add(u64::try_from(newlines).ok()?)
}

/// Reads an ordered message of `symbol`: `first` is the `seq` of its first tick (its
/// `Tg-Seq` header), the payload one tick or up to [`MAX_BATCH`] ticks separated by `\n`
/// ([`encode_batch_tick`]). Pushes `(seq, tick)` for each onto `out`, or nothing at all
/// when any part is invalid (a message is one append: it is taken whole or not at all).
/// Each tick is checked as [`parse_tick_payload`] checks a feed handler's.
pub fn parse_ordered_payload(
    symbol: &str,
    first: u64,
    payload: &[u8],
    scratch: &mut Vec<u8>,
    buffers: &mut Buffers,
    out: &mut Vec<(u64, Tick)>,
) -> Result<usize, Reject> {
    if payload.len() > MAX_BATCH_BYTES {
        return Err(Reject::TooLarge);
    }
    let start = out.len();
    let mut seq = first;
    for (k, part) in payload.split(|&b| b == b'\n').enumerate() {
        let r = if k >= MAX_BATCH {
            Err(Reject::TooLarge)
        } else if k > 0 && seq == u64::MAX {
            Err(Reject::BadSeq)
        } else {
            if k > 0 {
                seq += 1;
            }
            parse_tick_payload(symbol, part, scratch, buffers)
        };
        match r {
            Ok(t) => out.push((seq, t)),
            Err(why) => {
                out.truncate(start);
                return Err(why);
            }
        }
    }
    Ok(out.len() - start)
}

/// Where a symbol stands in the stream, as far as this node knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    /// The newest tick's `seq` (0: none).
    pub seq: u64,
    /// Its stream sequence (0: the subject is empty).
    pub stream_seq: u64,
}

/// What to append next for a symbol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Append {
    pub seq: u64,
    pub expect_stream_seq: u64,
}

/// How long what a node knows of a symbol's head is trusted without reading it again.
/// An append to a subject believed empty carries an expected subject sequence of 0, which
/// servers before 2.10 do not check, so only its `Nats-Msg-Id` guards it; the head it
/// builds on must be younger than the stream's duplicate window
/// ([`DUPLICATE_WINDOW_MS`]), or a `seq` another node appended long ago could be stored a
/// second time.
pub const HEAD_FRESH_MS: u64 = 1_000;

/// The ticks stream's duplicate window: it must cover [`HEAD_FRESH_MS`] plus the time an
/// append is in flight. Small, because the server keeps every id in it in memory (at
/// 20,000 ticks/s a two-minute window holds 2.4 million ids).
pub const DUPLICATE_WINDOW_MS: u64 = 10_000;
// The window the first appends rely on covers the freshness and then some flight.
const _: () = assert!(DUPLICATE_WINDOW_MS >= 5 * HEAD_FRESH_MS);

/// The per-symbol sequencer's memory: the head of each symbol this node appended to and
/// when it learned it, bounded (a full table forgets everything and reads heads again,
/// which costs one look-up per symbol and is always correct).
pub struct Sequencer {
    heads: HashMap<Box<str>, (Head, u64)>,
    max: usize,
}

impl Sequencer {
    pub fn new(max: usize) -> Sequencer {
        Sequencer {
            heads: HashMap::new(),
            max: max.max(1),
        }
    }

    /// The append for `symbol` at `now_ms`, or `None` when its head must be read first
    /// ([`Self::learn`]): never read, or learned more than [`HEAD_FRESH_MS`] ago. Also
    /// `None` right after a read when the head is at `u64::MAX` (only a hostile message
    /// can put it there): no `seq` is left to give.
    pub fn next(&self, symbol: &str, now_ms: u64) -> Option<Append> {
        let (h, _) = self
            .heads
            .get(symbol)
            .filter(|(_, at)| now_ms.saturating_sub(*at) <= HEAD_FRESH_MS)?;
        Some(Append {
            seq: h.seq.checked_add(1)?,
            expect_stream_seq: h.stream_seq,
        })
    }

    /// The head read from the stream (`None`: the subject is empty). `floor` is the
    /// newest `seq` this node has seen for the symbol: a stream that lost its messages
    /// (a bus restarted without its store) never makes `seq` go back.
    pub fn learn(&mut self, symbol: &str, head: Option<Head>, floor: u64, now_ms: u64) {
        let head = head.unwrap_or(Head {
            seq: 0,
            stream_seq: 0,
        });
        let head = Head {
            seq: head.seq.max(floor),
            stream_seq: head.stream_seq,
        };
        if self.heads.len() >= self.max && !self.heads.contains_key(symbol) {
            self.heads.clear();
        }
        self.heads.insert(Box::from(symbol), (head, now_ms));
    }

    /// The stream stored `seq` at `stream_seq`.
    /// An append was stored (its acknowledgement came back at `now_ms`).
    pub fn appended(&mut self, symbol: &str, seq: u64, stream_seq: u64, now_ms: u64) {
        if let Some(h) = self.heads.get_mut(symbol) {
            *h = (Head { seq, stream_seq }, now_ms);
        }
    }

    /// The append was refused (another node appended first) or failed: read the head
    /// again before the next try.
    pub fn forget(&mut self, symbol: &str) {
        self.heads.remove(symbol);
    }

    pub fn len(&self) -> usize {
        self.heads.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heads.is_empty()
    }
}

/// Revocations: everything the stream holds is applied, given the newest stream sequence
/// applied and the stream's first and last sequence. Expired messages leave their numbers
/// behind (`first` moves past them, `last` stays), and none of them can still come: a
/// node that starts after every revocation expired is loaded at once.
pub fn revocations_loaded(applied: u64, first: u64, last: u64) -> bool {
    applied.max(first.saturating_sub(1)) >= last
}

/// Revocations: the stream's numbers went back (it was made again, empty, by a bus that
/// lost its store): what was applied says nothing of the new numbering, so the stream
/// must be read again from its start.
pub fn revocations_renumbered(applied: u64, last: u64) -> bool {
    last < applied
}

/// Reconnect / retry delay after `attempt` failures: 100 ms doubling to 5 s, with up to
/// 25 % jitter from `rand` (any u32) so nodes do not retry in step.
pub fn backoff(attempt: u32, rand: u32) -> Duration {
    let base = 100u64.saturating_mul(1 << attempt.min(6)).min(5000);
    let jitter = base / 4 * u64::from(rand % 1000) / 1000;
    Duration::from_millis(base + jitter)
}

/// A `publish` from a WebSocket publisher on this node, on its way to the bus.
#[derive(Debug)]
pub struct PublishRequest {
    pub shard: usize,
    pub idx: usize,
    pub generation: u32,
    pub id: Option<u64>,
    pub ticks: Vec<(Box<str>, Tick)>,
}

/// The header carrying a revocation's instant (Unix milliseconds) on `<prefix>.revoke`.
pub const REVOKED_AT_HEADER: &str = "Tg-Revoked-At";
/// Revocations queued for the bus thread, at most (each is also applied here at once).
pub const REVOKE_QUEUE: usize = 4096;

/// A revocation as the bus carries it: the admin request's body (`{"sub":..}` and so on)
/// with the instant in [`REVOKED_AT_HEADER`].
pub fn encode_revocation(t: &crate::auth::revocation::RevokeTarget) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + t.value().len());
    out.extend_from_slice(b"{\"");
    out.extend_from_slice(t.kind().as_bytes());
    out.extend_from_slice(b"\":");
    crate::feed::json::write_json_str(t.value(), &mut out);
    out.push(b'}');
    out
}

/// A revocation from the bus, checked by the same rules as the admin request.
pub fn parse_revocation(
    payload: &[u8],
    at: Option<&str>,
) -> Result<(crate::auth::revocation::RevokeTarget, u64), Reject> {
    let t = crate::auth::revocation::RevokeTarget::from_admin_body(payload).map_err(|_| Reject::BadTick)?;
    let at = parse_seq(at)?;
    Ok((t, at))
}

/// The bus key of a ticket: the hex SHA-256 of the ticket string (the ticket itself is
/// never on the bus).
pub fn ticket_key(ticket: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, ticket.as_bytes());
    let mut out = String::with_capacity(64);
    for b in d.as_ref() {
        use std::fmt::Write;
        let _ = write!(out, "{b:02x}");
    }
    out
}

fn ticket_cipher(ticket: &str) -> Option<ring::aead::LessSafeKey> {
    let salt = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, b"tickgate ticket v1");
    let prk = salt.extract(ticket.as_bytes());
    let info: [&[u8]; 1] = [b"token"];
    let okm = prk.expand(&info, &ring::aead::CHACHA20_POLY1305).ok()?;
    Some(ring::aead::LessSafeKey::new(ring::aead::UnboundKey::from(okm)))
}

/// The token a ticket stands for, sealed with a key derived from the ticket: the bus
/// holds nothing a reader without the ticket can use. Each ticket seals once (its key is
/// its own), so a fixed nonce is safe.
pub fn seal_token(ticket: &str, token: &str) -> Option<Vec<u8>> {
    let key = ticket_cipher(ticket)?;
    let mut data = token.as_bytes().to_vec();
    key.seal_in_place_append_tag(
        ring::aead::Nonce::assume_unique_for_key([0; 12]),
        ring::aead::Aad::from(b"tickgate ticket"),
        &mut data,
    )
    .ok()?;
    Some(data)
}

/// Opens [`seal_token`]'s output (any bytes from the bus: `None` unless genuine).
pub fn open_token(ticket: &str, sealed: &[u8]) -> Option<String> {
    if sealed.len() > 16 * 1024 {
        return None;
    }
    let key = ticket_cipher(ticket)?;
    let mut data = sealed.to_vec();
    let plain = key
        .open_in_place(
            ring::aead::Nonce::assume_unique_for_key([0; 12]),
            ring::aead::Aad::from(b"tickgate ticket"),
            &mut data,
        )
        .ok()?;
    String::from_utf8(plain.to_vec()).ok()
}

/// A ticket operation for the bus thread.
pub enum TicketOp {
    /// Keep `sealed` under `key` for `ttl_ms`; reply whether the bus has it.
    Put {
        key: String,
        sealed: Vec<u8>,
        ttl_ms: u64,
        reply: tokio::sync::oneshot::Sender<bool>,
    },
    /// Take (read and delete, once) what is kept under `key`; `None`: nothing there, or
    /// someone took it first.
    Take {
        key: String,
        reply: tokio::sync::oneshot::Sender<Option<Vec<u8>>>,
    },
}

/// Ticket operations queued for the bus thread, at most.
pub const TICKET_QUEUE: usize = 4096;

/// Wakes the bus thread.
pub type Wake = Box<dyn Fn() + Send + Sync>;

/// `publish` requests waiting for the bus thread, at most; beyond, `unavailable`.
pub const PUBLISH_QUEUE: usize = 4096;

/// What the shards and the admin listener share with the bus thread (`Shared::bus`):
/// readiness, the publish queue and the counters. Inert without `[cluster]`.
#[derive(Default)]
pub struct Link {
    tx: std::sync::OnceLock<(crossbeam_channel::Sender<PublishRequest>, Wake)>,
    revoke_tx: std::sync::OnceLock<crossbeam_channel::Sender<crate::auth::revocation::RevokeTarget>>,
    ticket_tx: std::sync::OnceLock<crossbeam_channel::Sender<TicketOp>>,
    /// Connected to NATS with the streams in place.
    pub ready: AtomicBool,
    /// Every revocation the bus holds is applied here (at start, and after a reconnect).
    pub revocations_loaded: AtomicBool,
    /// The process is about to exit: an ingest leader stops reading the feed and deletes
    /// its claim, so another node claims the ingest at once instead of when the claim
    /// expires; no node claims it here any more.
    pub release_ingest: AtomicBool,
    /// This node's name on the bus (`cluster.node`, or the default), once connected.
    pub node: std::sync::OnceLock<String>,
    pub metrics: BusMetrics,
}

impl Link {
    /// `[cluster]` is configured: the bus thread receives on the returned queue and is
    /// woken by `wake`.
    pub fn enable(
        &self,
        wake: Box<dyn Fn() + Send + Sync>,
    ) -> Option<crossbeam_channel::Receiver<PublishRequest>> {
        let (tx, rx) = crossbeam_channel::bounded(PUBLISH_QUEUE);
        self.tx.set((tx, wake)).ok()?;
        self.metrics.enabled.store(true, Ordering::Release);
        Some(rx)
    }

    /// This node's name on the bus ("" before it is known).
    pub fn node_name(&self) -> String {
        self.node.get().cloned().unwrap_or_default()
    }

    /// This node reads the feed subjects now.
    pub fn leads_ingest(&self) -> bool {
        self.metrics.leader.load(Ordering::Acquire)
    }

    pub fn enabled(&self) -> bool {
        self.tx.get().is_some()
    }

    /// Connected; `/readyz` also waits for [`Self::revocations_loaded`]
    /// ([`Self::is_serving`]).
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Connected and every revocation on the bus applied: `/readyz` says 200.
    pub fn is_serving(&self) -> bool {
        self.is_ready() && self.revocations_loaded.load(Ordering::Acquire)
    }

    /// The queue the bus thread publishes revocations from.
    pub fn enable_revocations(
        &self,
    ) -> Option<crossbeam_channel::Receiver<crate::auth::revocation::RevokeTarget>> {
        let (tx, rx) = crossbeam_channel::bounded(REVOKE_QUEUE);
        self.revoke_tx.set(tx).ok()?;
        Some(rx)
    }

    /// The queue the bus thread serves ticket operations from.
    pub fn enable_tickets(&self) -> Option<crossbeam_channel::Receiver<TicketOp>> {
        let (tx, rx) = crossbeam_channel::bounded(TICKET_QUEUE);
        self.ticket_tx.set(tx).ok()?;
        Some(rx)
    }

    /// Queues a ticket operation; false when there is no bus, it is away, or the queue is
    /// full (the reply sender is dropped then).
    pub fn ticket(&self, op: TicketOp) -> bool {
        let (Some(tx), Some((_, wake))) = (self.ticket_tx.get(), self.tx.get()) else {
            return false;
        };
        if !self.is_ready() {
            return false;
        }
        let ok = tx.try_send(op).is_ok();
        wake();
        ok
    }

    /// Hands a revocation (already applied on this node) to the bus for every node; false
    /// when there is no bus or its queue is full.
    pub fn revoke(&self, t: &crate::auth::revocation::RevokeTarget) -> bool {
        let (Some(tx), Some((_, wake))) = (self.revoke_tx.get(), self.tx.get()) else {
            return false;
        };
        let ok = tx.try_send(t.clone()).is_ok();
        wake();
        ok
    }

    /// Queue a publish for the bus; gives it back when the bus is down or the queue full
    /// (the publisher then gets `unavailable`).
    pub fn publish(&self, r: PublishRequest) -> Result<(), PublishRequest> {
        let Some((tx, wake)) = self.tx.get() else {
            return Err(r);
        };
        if !self.is_ready() {
            return Err(r);
        }
        match tx.try_send(r) {
            Ok(()) => {
                wake();
                Ok(())
            }
            Err(e) => Err(e.into_inner()),
        }
    }
}

/// Puts one symbol's ordered ticks back in `seq` order when the bus hands them over out of
/// order (NATS 2.9's republish can swap two messages stored back to back by different
/// connections): a tick ahead of the next expected `seq` is held until the missing ones
/// arrive, for at most `wait_ms` and `max` ticks; then everything held goes out in order
/// and what is still missing stays a gap (`skipped` for subscribers). Sans-IO: the caller
/// passes `now_ms` and sleeps until [`Self::deadline`].
pub struct Reorder<T> {
    /// The newest `seq` handed out (0: none yet; the first tick sets it).
    last: u64,
    held: std::collections::BTreeMap<u64, T>,
    /// When the oldest held tick arrived.
    since_ms: Option<u64>,
    max: usize,
    wait_ms: u64,
}

impl<T> Reorder<T> {
    pub fn new(last: u64, max: usize, wait_ms: u64) -> Self {
        Reorder {
            last,
            held: std::collections::BTreeMap::new(),
            since_ms: None,
            max: max.max(1),
            wait_ms,
        }
    }

    /// Ticks held, waiting for an earlier one.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Takes a tick; appends to `out`, in order, what can be handed out now (a tick at or
    /// below what was handed out is passed through: the hub drops it as stale). True when
    /// this tick was held.
    pub fn push(&mut self, seq: u64, item: T, now_ms: u64, out: &mut Vec<(u64, T)>) -> bool {
        if self.last != 0 && seq > self.last.saturating_add(1) {
            if self.held.insert(seq, item).is_none() && self.since_ms.is_none() {
                self.since_ms = Some(now_ms);
            }
            if self.held.len() > self.max {
                self.flush(out);
            }
            return true;
        }
        out.push((seq, item));
        if seq > self.last {
            self.last = seq;
            self.drain_contiguous(out);
        }
        false
    }

    fn drain_contiguous(&mut self, out: &mut Vec<(u64, T)>) {
        while let Some(e) = self.held.first_entry() {
            if *e.key() > self.last.saturating_add(1) {
                break;
            }
            let (seq, item) = e.remove_entry();
            if seq > self.last {
                self.last = seq;
            }
            out.push((seq, item));
        }
        if self.held.is_empty() {
            self.since_ms = None;
        }
    }

    fn flush(&mut self, out: &mut Vec<(u64, T)>) {
        for (seq, item) in std::mem::take(&mut self.held) {
            self.last = self.last.max(seq);
            out.push((seq, item));
        }
        self.since_ms = None;
    }

    /// When the held ticks stop waiting, if any are held.
    pub fn deadline(&self) -> Option<u64> {
        self.since_ms.map(|t| t.saturating_add(self.wait_ms))
    }

    /// Past the deadline: hands out everything held, in order (the missing ones are lost).
    pub fn expire(&mut self, now_ms: u64, out: &mut Vec<(u64, T)>) {
        if self.deadline().is_some_and(|d| now_ms >= d) {
            self.flush(out);
        }
    }
}

#[cfg(test)]
mod reorder_tests {
    use super::Reorder;

    fn seqs(v: &[(u64, char)]) -> Vec<u64> {
        v.iter().map(|(s, _)| *s).collect()
    }

    #[test]
    fn swapped_ticks_go_out_in_order_and_a_real_gap_waits_only_so_long() {
        let mut r = Reorder::new(10, 8, 20);
        let mut out = Vec::new();
        assert!(!r.push(11, 'a', 0, &mut out));
        // 13 before 12: held until 12 comes.
        assert!(r.push(13, 'c', 1, &mut out));
        assert_eq!(seqs(&out), vec![11]);
        assert_eq!(r.deadline(), Some(21));
        r.push(12, 'b', 2, &mut out);
        assert_eq!(seqs(&out), vec![11, 12, 13]);
        assert_eq!(r.deadline(), None);
        // A stale one passes through (the hub drops it).
        r.push(12, 'x', 3, &mut out);
        assert_eq!(seqs(&out), vec![11, 12, 13, 12]);
        // 14 never comes: 15 and 16 wait 20 ms, then go out.
        out.clear();
        r.push(15, 'e', 10, &mut out);
        r.push(16, 'f', 15, &mut out);
        r.expire(29, &mut out);
        assert!(out.is_empty());
        r.expire(30, &mut out);
        assert_eq!(seqs(&out), vec![15, 16]);
        out.clear();
        r.push(17, 'g', 31, &mut out);
        assert_eq!(seqs(&out), vec![17]);
    }

    #[test]
    fn held_ticks_are_bounded_and_the_first_tick_sets_the_start() {
        let mut r = Reorder::new(0, 3, 1_000);
        let mut out = Vec::new();
        r.push(41, 'a', 0, &mut out);
        assert_eq!(seqs(&out), vec![41]);
        out.clear();
        for s in [43, 44, 45] {
            assert!(r.push(s, 'x', 0, &mut out));
        }
        assert!(out.is_empty());
        assert_eq!(r.held(), 3);
        // One more than the bound: everything held goes out, in order.
        r.push(46, 'y', 0, &mut out);
        assert_eq!(seqs(&out), vec![43, 44, 45, 46]);
        assert_eq!(r.held(), 0);
    }

    use proptest::prelude::*;

    proptest! {
        /// One sequencer's order (consecutive `seq`s, one tick or a batch per message)
        /// never waits: nothing is held and no deadline is set, at any time.
        #[test]
        fn a_gapless_order_is_never_held(
            start in 0u64..1_000_000,
            batches in proptest::collection::vec(1usize..=64, 1..50),
            gaps_ms in proptest::collection::vec(0u64..200, 1..50),
        ) {
            let mut r = Reorder::new(start, 1024, 20);
            let (mut out, mut next, mut now) = (Vec::new(), start + 1, 0u64);
            for (i, n) in batches.iter().enumerate() {
                now += gaps_ms[i % gaps_ms.len()];
                for _ in 0..*n {
                    prop_assert!(!r.push(next, (), now, &mut out));
                    next += 1;
                }
                prop_assert_eq!(r.held(), 0);
                prop_assert_eq!(r.deadline(), None);
            }
            let want: Vec<u64> = (start + 1..next).collect();
            prop_assert_eq!(out.iter().map(|(s, _)| *s).collect::<Vec<_>>(), want);
        }

        /// Any arrival order: every `seq` that came in goes out once the deadline has
        /// passed (stale ones pass straight through; the hub drops them), at most the
        /// bound is held, and a hold never outlasts its deadline.
        #[test]
        fn any_order_goes_out_whole_and_never_waits_past_the_deadline(
            seqs_in in proptest::collection::vec(1u64..200, 1..200),
            step_ms in 0u64..10,
        ) {
            let mut r = Reorder::new(0, 64, 20);
            let (mut out, mut now) = (Vec::new(), 0u64);
            for &s in &seqs_in {
                now += step_ms;
                r.expire(now, &mut out);
                // Whatever was due went out: what is still held waits for a later time.
                prop_assert!(r.deadline().is_none_or(|d| d > now));
                r.push(s, (), now, &mut out);
                prop_assert!(r.held() <= 64);
            }
            r.expire(now + 20, &mut out);
            prop_assert_eq!(r.held(), 0);
            let mut seen: Vec<u64> = out.iter().map(|(s, _)| *s).collect();
            seen.sort_unstable();
            seen.dedup();
            let mut all = seqs_in.clone();
            all.sort_unstable();
            all.dedup();
            prop_assert_eq!(seen, all);
        }
    }
}

#[cfg(test)]
mod sequencer_tests {
    use super::{Head, Sequencer};
    use proptest::prelude::*;

    proptest! {
        /// One writer: whatever the stream says of its head, whenever it is read again,
        /// and whatever is forgotten, the next append is one past the last one stored,
        /// and never at or below a `seq` this node has seen.
        #[test]
        fn one_writer_appends_one_past_the_last(
            ops in proptest::collection::vec((0u8..3, prop_oneof![4 => 0u64..50, 1 => 900u64..2_000]), 1..200),
            first_head in 0u64..1_000,
        ) {
            let mut s = Sequencer::new(16);
            let (mut stored_seq, mut stored_stream, mut now) = (first_head, first_head, 0u64);
            let mut learned_at = now;
            s.learn("A", Some(Head { seq: stored_seq, stream_seq: stored_stream }), 0, now);
            for (op, wait_ms) in ops {
                now += wait_ms;
                match op {
                    // Append what `next` says; the stream stores it.
                    0 | 1 => {
                        let Some(a) = s.next("A", now) else {
                            // Only a head older than HEAD_FRESH_MS must be read again.
                            prop_assert!(now - learned_at > super::HEAD_FRESH_MS);
                            s.learn("A", Some(Head { seq: stored_seq, stream_seq: stored_stream }), stored_seq, now);
                            learned_at = now;
                            continue;
                        };
                        prop_assert!(now - learned_at <= super::HEAD_FRESH_MS);
                        prop_assert_eq!(a.seq, stored_seq + 1);
                        prop_assert_eq!(a.expect_stream_seq, stored_stream);
                        stored_seq = a.seq;
                        stored_stream += 1;
                        s.appended("A", stored_seq, stored_stream, now);
                        learned_at = now;
                    }
                    // The append failed: read the head again.
                    _ => {
                        s.forget("A");
                        prop_assert!(s.next("A", now).is_none());
                        s.learn("A", Some(Head { seq: stored_seq, stream_seq: stored_stream }), stored_seq, now);
                        learned_at = now;
                    }
                }
            }
        }

        /// A stream that lost its messages never sends `seq` back: the floor wins.
        #[test]
        fn the_floor_wins_over_a_head_behind_it(floor in 1u64..u64::MAX / 2, head in 0u64..1_000) {
            let mut s = Sequencer::new(4);
            s.learn("A", Some(Head { seq: head, stream_seq: 3 }), floor, 0);
            let a = s.next("A", 0).expect("fresh head");
            prop_assert_eq!(a.seq, floor.max(head) + 1);
        }
    }
}

/// The bus's counters for `/metrics` (rendered only with `[cluster]`).
#[derive(Default)]
pub struct BusMetrics {
    pub enabled: AtomicBool,
    /// Raw ticks taken from `<prefix>.in.>` and appended to the order.
    pub ingested: AtomicU64,
    /// Dropped payloads by [`Reject`] reason.
    pub rejected: [AtomicU64; Reject::ALL.len()],
    /// Appends the stream refused because another node appended first (then retried).
    pub conflicts: AtomicU64,
    /// Ordered ticks received for local subscribers.
    pub received: AtomicU64,
    /// Ordered ticks at or below the newest `seq` already delivered (duplicates).
    pub stale: AtomicU64,
    /// Ordered ticks that arrived ahead of an earlier one and were held to restore the
    /// order ([`Reorder`]).
    pub reordered: AtomicU64,
    /// Symbols this node holds a bus subscription for.
    pub subscriptions: AtomicU64,
    /// Ticks read back from the stream's history when taking interest in a symbol
    /// (PROTOCOL.md 10: what `since` replays on this node).
    pub backfilled: AtomicU64,
    /// Connections to the bus made (the first, then every reconnect).
    pub connects: AtomicU64,
    /// This node is the ingest leader (it reads `<prefix>.in.>`).
    pub leader: AtomicBool,
    /// Times the NATS client dropped messages of a full subscription buffer (the bus sent
    /// faster than this node took them; each subscription buffers at most 65,536).
    pub slow_consumer: AtomicU64,
    /// `publish` ops answered `unavailable`.
    pub unavailable: AtomicU64,
    /// Sum and count of append round trips (receipt to the stream's ack), microseconds.
    pub append_us_sum: AtomicU64,
    pub append_count: AtomicU64,
}

impl BusMetrics {
    pub fn reject(&self, r: Reject) {
        self.rejected[r.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn render(&self, ready: bool, out: &mut String) {
        use std::fmt::Write;
        if !self.enabled.load(Ordering::Acquire) {
            return;
        }
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let one = |out: &mut String, name: &str, kind: &str, help: Option<&str>, v: u64| {
            if let Some(h) = help {
                let _ = writeln!(out, "# HELP {name} {h}");
            }
            let _ = writeln!(out, "# TYPE {name} {kind}\n{name} {v}");
        };
        one(
            out,
            "tickgate_bus_up",
            "gauge",
            Some("1 when connected to NATS with the stream in place"),
            u64::from(ready),
        );
        one(
            out,
            "tickgate_bus_connects_total",
            "counter",
            None,
            g(&self.connects),
        );
        one(
            out,
            "tickgate_bus_ingest_leader",
            "gauge",
            Some("1 on the node that reads the feed subjects"),
            u64::from(self.leader.load(Ordering::Relaxed)),
        );
        one(out, "tickgate_ingest_total", "counter", None, g(&self.ingested));
        let _ = writeln!(out, "# TYPE tickgate_ingest_rejected_total counter");
        for r in Reject::ALL {
            let _ = writeln!(
                out,
                "tickgate_ingest_rejected_total{{reason=\"{}\"}} {}",
                r.as_str(),
                g(&self.rejected[r.index()])
            );
        }
        one(
            out,
            "tickgate_bus_append_conflicts_total",
            "counter",
            None,
            g(&self.conflicts),
        );
        let _ = writeln!(
            out,
            "# TYPE tickgate_bus_append_seconds summary\ntickgate_bus_append_seconds_sum {}\ntickgate_bus_append_seconds_count {}",
            g(&self.append_us_sum) as f64 / 1e6,
            g(&self.append_count)
        );
        for (name, kind, v) in [
            ("tickgate_bus_received_total", "counter", &self.received),
            ("tickgate_bus_stale_total", "counter", &self.stale),
            ("tickgate_bus_reordered_total", "counter", &self.reordered),
            ("tickgate_bus_subscriptions", "gauge", &self.subscriptions),
            ("tickgate_bus_backfilled_ticks_total", "counter", &self.backfilled),
            ("tickgate_bus_slow_consumer_total", "counter", &self.slow_consumer),
            ("tickgate_bus_unavailable_total", "counter", &self.unavailable),
        ] {
            one(out, name, kind, None, g(v));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(sym: &str, p: &[u8]) -> Result<Tick, Reject> {
        parse_tick_payload(sym, p, &mut Vec::new(), &mut Buffers::new(64))
    }

    const GOOD: &str = r#"{"s":"BTC-USD","ts":1,"bid":1.5,"ask":2.5,"last":2,"qty":0.1}"#;

    #[test]
    fn a_good_tick_passes_and_round_trips() {
        let t = parse("BTC-USD", GOOD.as_bytes()).unwrap();
        assert_eq!((t.ts, t.bid, t.ask, t.last, t.qty), (1, 1.5, 2.5, 2.0, 0.1));
        let mut out = Vec::new();
        encode_tick_payload("BTC-USD", &t, &mut out);
        assert_eq!(parse("BTC-USD", &out).unwrap(), t);
    }

    #[test]
    fn junk_is_rejected_with_its_reason() {
        assert_eq!(parse("BTC-USD", b""), Err(Reject::Empty));
        assert_eq!(parse("BTC-USD", b"not json"), Err(Reject::NotJson));
        assert_eq!(parse("BTC-USD", b"\xff\xfe{}"), Err(Reject::NotJson));
        assert_eq!(
            parse("BTC-USD", &vec![b' '; MAX_INGEST_BYTES + 1]),
            Err(Reject::TooLarge)
        );
        assert_eq!(parse("ETH-USD", GOOD.as_bytes()), Err(Reject::SymbolMismatch));
        assert_eq!(parse("btc", GOOD.as_bytes()), Err(Reject::BadSymbol));
        assert_eq!(parse("A..B", GOOD.as_bytes()), Err(Reject::BadSymbol));
        let nan = GOOD.replace("1.5", "NaN");
        assert_eq!(parse("BTC-USD", nan.as_bytes()), Err(Reject::NotJson));
        let huge = GOOD.replace("1.5", "1e999");
        assert!(parse("BTC-USD", huge.as_bytes()).is_err());
        let deep = format!("{}{}", "[".repeat(500), "]".repeat(500));
        assert!(parse("BTC-USD", deep.as_bytes()).is_err());
        assert_eq!(parse("BTC-USD", b"[1,2]"), Err(Reject::BadTick));
        let extra = GOOD.replace("}", r#","x":1}"#);
        assert_eq!(parse("BTC-USD", extra.as_bytes()), Err(Reject::BadTick));
    }

    #[test]
    fn revocations_round_trip_and_junk_is_refused() {
        use crate::auth::revocation::RevokeTarget;
        let t = RevokeTarget::Sid("s-\"1".into());
        let p = encode_revocation(&t);
        assert_eq!(
            parse_revocation(&p, Some("1700000000000")),
            Ok((t, 1_700_000_000_000))
        );
        assert!(parse_revocation(&p, None).is_err());
        assert!(parse_revocation(b"{}", Some("1")).is_err());
        assert!(parse_revocation(br#"{"sub":"a","sid":"b"}"#, Some("1")).is_err());
        assert!(parse_revocation(&vec![b'{'; 5000], Some("1")).is_err());
    }

    #[test]
    fn a_sealed_token_opens_only_with_its_ticket() {
        let sealed = seal_token("ticket-a", "eyJ.token.sig").unwrap();
        assert!(!sealed.windows(5).any(|w| w == b"token"), "not in the clear");
        assert_eq!(open_token("ticket-a", &sealed).as_deref(), Some("eyJ.token.sig"));
        assert_eq!(open_token("ticket-b", &sealed), None);
        let mut bad = sealed.clone();
        bad[0] ^= 1;
        assert_eq!(open_token("ticket-a", &bad), None);
        assert_eq!(open_token("ticket-a", b""), None);
        assert_eq!(ticket_key("x").len(), 64);
        assert_ne!(ticket_key("x"), ticket_key("y"));
    }

    #[test]
    fn seq_headers() {
        assert_eq!(parse_seq(Some("42")), Ok(42));
        for bad in [
            None,
            Some(""),
            Some("0"),
            Some("-1"),
            Some("1.5"),
            Some("99999999999999999999999"),
        ] {
            assert_eq!(parse_seq(bad), Err(Reject::BadSeq), "{bad:?}");
        }
    }

    #[test]
    fn names() {
        let s = Subjects::new("tickgate");
        assert_eq!(s.ingest_all(), "tickgate.in.>");
        assert_eq!(s.ingest_symbol("tickgate.in.BRK.B"), Some("BRK.B"));
        assert_eq!(s.ingest_symbol("other.in.X"), None);
        assert_eq!(s.ordered("BTC-USD"), "tickgate.t.BTC-USD");
        assert_eq!(s.ordered_symbol("tickgate.t.BTC-USD"), Some("BTC-USD"));
        assert_eq!(s.delivered("BTC-USD"), "tickgate.o.BTC-USD");
        assert_eq!(s.delivered_all(), "tickgate.o.>");
        let k = "0123456789abcdef0123456789abcdef";
        assert_eq!(s.cap(k, "n.1"), format!("tickgate.cap.{k}.n_1"));
        assert_eq!(s.cap_parts(&s.cap(k, "n.1")), Some((k, "n_1")));
        assert_eq!(s.cap_parts("tickgate.cap.xyz.n"), None);
        assert_eq!(s.cap_parts("tickgate.cap.a.b.c"), None);
        assert_eq!(Subjects::new("md.prod-1").stream(), "MD_PROD_1_TICKS");
        assert!(check_prefix("md.prod").is_ok());
        for bad in ["", "a..b", "a.>", "a b", "a.*"] {
            assert!(check_prefix(bad).is_err(), "{bad}");
        }
        assert!(check_server_url("nats://127.0.0.1:4222").is_ok());
        assert!(check_server_url("tls://user:pw@nats.example.com:4222").is_ok());
        for bad in [
            "127.0.0.1:4222",
            "nats://",
            "nats://h:0",
            "nats://h:x",
            "http://h:1",
        ] {
            assert!(check_server_url(bad).is_err(), "{bad}");
        }
        assert!(check_node_name("").is_ok() && check_node_name("node-1.a").is_ok());
        assert!(check_node_name("a b").is_err());
    }

    #[test]
    fn the_sequencer_reads_heads_appends_and_never_goes_back() {
        let mut q = Sequencer::new(2);
        assert_eq!(q.next("A", 0), None);
        q.learn(
            "A",
            Some(Head {
                seq: 7,
                stream_seq: 70,
            }),
            0,
            0,
        );
        assert_eq!(
            q.next("A", 0),
            Some(Append {
                seq: 8,
                expect_stream_seq: 70
            })
        );
        q.appended("A", 8, 75, 0);
        assert_eq!(
            q.next("A", 0),
            Some(Append {
                seq: 9,
                expect_stream_seq: 75
            })
        );
        // Refused: another node appended; read again.
        q.forget("A");
        assert_eq!(q.next("A", 0), None);
        // The stream lost its messages but this node saw seq 9: it goes on from 10.
        q.learn("A", None, 9, 0);
        assert_eq!(
            q.next("A", 0),
            Some(Append {
                seq: 10,
                expect_stream_seq: 0
            })
        );
        // Bounded: a third symbol clears the table.
        q.learn("B", None, 0, 0);
        q.learn("C", None, 0, 0);
        assert!(q.len() <= 2);
    }

    #[test]
    fn a_head_learned_long_ago_is_read_again_before_appending() {
        let mut q = Sequencer::new(8);
        let h = Head {
            seq: 7,
            stream_seq: 70,
        };
        q.learn("A", Some(h), 0, 1_000);
        assert!(q.next("A", 1_000 + HEAD_FRESH_MS).is_some());
        assert_eq!(q.next("A", 1_001 + HEAD_FRESH_MS), None, "stale: read again");
        // An acknowledgement refreshes it.
        q.appended("A", 8, 75, 5_000);
        assert_eq!(q.next("A", 5_500).map(|a| a.seq), Some(9));
    }

    fn batch(first: u64, p: &[u8]) -> Result<Vec<(u64, Tick)>, Reject> {
        let zero = Tick {
            ts: 0,
            bid: 0.0,
            ask: 0.0,
            last: 0.0,
            qty: 0.0,
        };
        let mut out = vec![(9, zero)];
        let r = parse_ordered_payload(
            "BTC-USD",
            first,
            p,
            &mut Vec::new(),
            &mut Buffers::new(64),
            &mut out,
        );
        let got = out.split_off(1);
        assert_eq!(out, vec![(9, zero)], "what was there stays");
        match r {
            Ok(n) => {
                assert_eq!(n, got.len());
                Ok(got)
            }
            Err(e) => {
                assert!(got.is_empty(), "nothing pushed on {e:?}");
                Err(e)
            }
        }
    }

    #[test]
    fn a_batch_carries_consecutive_seqs_and_is_taken_whole_or_not_at_all() {
        let t = |ts| Tick {
            ts,
            bid: 1.5,
            ask: 2.5,
            last: 2.0,
            qty: 0.1,
        };
        let (mut out, mut scratch) = (Vec::new(), Vec::new());
        for ts in 1..=3 {
            encode_batch_tick("BTC-USD", &t(ts), &mut out, &mut scratch);
        }
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 2);
        assert_eq!(batch(41, &out), Ok(vec![(41, t(1)), (42, t(2)), (43, t(3))]));
        // One tick is a feed handler's payload, as it always was.
        assert_eq!(batch(7, GOOD.as_bytes()).unwrap().len(), 1);
        // A bad part, an empty part, a foreign symbol: nothing at all.
        let mut bad = out.clone();
        bad.extend_from_slice(b"\nnot json");
        assert_eq!(batch(41, &bad), Err(Reject::NotJson));
        let mut empty = out.clone();
        empty.push(b'\n');
        assert_eq!(batch(41, &empty), Err(Reject::Empty));
        assert_eq!(batch(41, b""), Err(Reject::Empty));
        let eth = GOOD.replace("BTC-USD", "ETH-USD");
        assert_eq!(
            batch(1, format!("{GOOD}\n{eth}").as_bytes()),
            Err(Reject::SymbolMismatch)
        );
        // Seqs cannot run past u64::MAX.
        assert_eq!(batch(u64::MAX, GOOD.as_bytes()).unwrap()[0].0, u64::MAX);
        assert_eq!(
            batch(u64::MAX, format!("{GOOD}\n{GOOD}").as_bytes()),
            Err(Reject::BadSeq)
        );
        // At most MAX_BATCH ticks, and MAX_BATCH_BYTES, in a message.
        let full = vec![GOOD; MAX_BATCH].join("\n");
        assert_eq!(batch(1, full.as_bytes()).unwrap().len(), MAX_BATCH);
        let over = vec![GOOD; MAX_BATCH + 1].join("\n");
        assert_eq!(batch(1, over.as_bytes()), Err(Reject::TooLarge));
        assert_eq!(batch(1, &vec![b'\n'; MAX_BATCH_BYTES + 1]), Err(Reject::TooLarge));
    }

    #[test]
    fn a_head_counts_the_parts_even_when_they_do_not_parse() {
        assert_eq!(ordered_last_seq(7, GOOD.as_bytes()), Some(7));
        assert_eq!(
            ordered_last_seq(7, format!("{GOOD}\n{GOOD}\n{GOOD}").as_bytes()),
            Some(9)
        );
        assert_eq!(ordered_last_seq(7, b"junk\njunk"), Some(8));
        assert_eq!(ordered_last_seq(u64::MAX, b"x"), Some(u64::MAX));
        assert_eq!(ordered_last_seq(u64::MAX, b"x\ny"), None);
        // And the sequencer gives nothing past u64::MAX.
        let mut s = Sequencer::new(4);
        let head = |seq| Some(Head { seq, stream_seq: 5 });
        s.learn("A", head(u64::MAX - 1), 0, 0);
        assert_eq!(s.next("A", 0).map(|a| a.seq), Some(u64::MAX));
        s.learn("A", head(u64::MAX), 0, 0);
        assert_eq!(s.next("A", 0), None);
    }

    #[test]
    fn revocations_are_loaded_when_nothing_older_can_come() {
        // Nothing ever revoked.
        assert!(revocations_loaded(0, 0, 0));
        // Three kept, two applied.
        assert!(!revocations_loaded(2, 1, 3));
        assert!(revocations_loaded(3, 1, 3));
        // All three expired (first = last + 1): nothing to apply, loaded at once.
        assert!(revocations_loaded(0, 4, 3));
        // Two expired, the third kept and not applied yet.
        assert!(!revocations_loaded(0, 3, 3));
        // The stream's numbers went back below what was applied.
        assert!(revocations_renumbered(7, 2));
        assert!(!revocations_renumbered(7, 7) && !revocations_renumbered(0, 0));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff(0, 0), Duration::from_millis(100));
        assert!(backoff(3, 999) <= Duration::from_millis(1000));
        assert!(backoff(30, u32::MAX) <= Duration::from_millis(6250));
    }

    proptest! {
        #[test]
        fn any_payload_is_handled(p in proptest::collection::vec(any::<u8>(), 0..1200)) {
            let _ = parse("BTC-USD", &p);
        }

        #[test]
        fn any_finite_tick_round_trips(
            ts in any::<u64>(),
            bits in proptest::array::uniform4(any::<u64>()),
        ) {
            let [bid, ask, last, qty] = bits.map(f64::from_bits);
            prop_assume!([bid, ask, last, qty].iter().all(|v| v.is_finite()));
            let t = Tick { ts, bid, ask, last, qty };
            let mut out = Vec::new();
            encode_tick_payload("BTC-USD", &t, &mut out);
            prop_assert_eq!(parse("BTC-USD", &out), Ok(t), "{}", String::from_utf8_lossy(&out));
        }

        #[test]
        fn any_batch_round_trips_and_any_bytes_are_handled(
            ticks in proptest::collection::vec(
                (any::<u64>(), proptest::array::uniform4(-1e12f64..1e12)),
                1..=MAX_BATCH,
            ),
            first in 1u64..u64::MAX / 2,
            junk in proptest::collection::vec(any::<u8>(), 0..300),
            at in any::<prop::sample::Index>(),
        ) {
            let ticks: Vec<Tick> = ticks
                .into_iter()
                .map(|(ts, [bid, ask, last, qty])| Tick { ts, bid, ask, last, qty })
                .collect();
            let (mut out, mut scratch) = (Vec::new(), Vec::new());
            for t in &ticks {
                encode_batch_tick("BTC-USD", t, &mut out, &mut scratch);
            }
            let want: Vec<(u64, Tick)> = (first..).zip(ticks.iter().copied()).collect();
            prop_assert_eq!(batch(first, &out), Ok(want));
            // Any bytes spliced in anywhere: the whole message or nothing, never a panic.
            let cut = at.index(out.len() + 1);
            let mut spliced = out[..cut].to_vec();
            spliced.extend_from_slice(&junk);
            spliced.extend_from_slice(&out[cut..]);
            if let Ok(got) = batch(first, &spliced) {
                prop_assert!(!got.is_empty() && got.len() <= MAX_BATCH);
                for (k, (seq, _)) in got.iter().enumerate() {
                    prop_assert_eq!(*seq, first + k as u64);
                }
            }
        }

        #[test]
        fn any_header_is_handled(h in ".{0,30}") {
            let _ = parse_seq(Some(&h));
        }
    }
}
