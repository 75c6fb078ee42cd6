//! The per-connection outbound queue: bounded, with per-symbol conflation for slow consumers
//! (PROTOCOL.md section 6).
//!
//! # Design
//!
//! Fan-out encodes a tick once into a complete WebSocket frame ([`SharedTick::frame`], a
//! `Bytes`) and hands the same `Arc<SharedTick>` to every subscribed connection, so queuing
//! a tick costs a refcount increment, never a copy or an encode.
//!
//! The queue has two parts:
//! - a FIFO of frames (control frames and ticks) in push order;
//! - a conflation map, used only past the byte bound: newest tick per symbol plus how many
//!   ticks of that symbol it replaced. Its size is bounded by the number of symbols the
//!   connection is subscribed to, whatever the tick rate.
//!
//! A tick goes to the FIFO while the queued bytes plus its frame stay within `max_bytes`;
//! otherwise the queue enters *conflation mode* and every further tick goes to the map
//! until the map has been drained completely. Staying in the mode until then is what keeps
//! per-symbol order: a tick newer than one waiting in the map must never overtake it
//! through the FIFO. Control frames (acks, errors, pings, close) always go to the FIFO:
//! they are small, rare and must never be dropped.
//!
//! [`OutboundQueue::drain_into`] moves whole frames, FIFO first, into the connection's write
//! buffer (many frames coalesced into one write). A map entry that replaced N > 0 ticks is
//! re-encoded on the way out with `"skipped":N` (one encode per slow connection and drain,
//! not per tick); the client sees `seq` jump by N + 1 and the exact count of ticks it missed.
//!
//! # Invariants (checked by the property test against a model)
//! - per symbol, delivered `seq` is strictly increasing;
//! - the newest tick pushed for a symbol is eventually delivered;
//! - per symbol, delivered + sum of `skipped` == pushed (for ticks pushed after the last
//!   `remove_symbol`), and each `skipped` equals the `seq` gap it explains;
//! - control frames keep their relative order;
//! - `queued_bytes() <= max_bytes + control bytes + symbols * max tick frame`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;

use super::symbol::SymbolId;
use super::tick::{Tick, TickKind, encode_tick_json};
use crate::proto::deflate::Deflater;
use crate::proto::frame::deflate_server_frame;

/// One published tick, encoded once and shared by every subscriber's queue.
#[derive(Debug, Clone, PartialEq)]
pub struct SharedTick {
    pub symbol: SymbolId,
    pub seq: u64,
    /// The complete WebSocket text frame of the `tick` message.
    pub frame: Bytes,
    pub tick: Tick,
    pub name: Arc<str>,
    /// When the hub accepted the tick ([`crate::metrics::mono_ns`]); the latency
    /// histograms start here.
    pub accepted_ns: u64,
    /// A bus head, not a live tick (`[cluster]`): the newest tick of a symbol in the
    /// cluster when this node took interest in it. Shards use it as the baseline and the
    /// snapshot of the subscribers waiting for the symbol, and deliver it to no one.
    pub prime: bool,
    /// `frame` compressed on its own (permessage-deflate without context takeover), made
    /// by the first subscriber that needs it and shared by every other one.
    pub deflated: OnceLock<Bytes>,
}

impl SharedTick {
    /// Encodes the tick frame (`"type":"tick"`, no `skipped`) and bundles it.
    pub fn new(symbol: SymbolId, name: Arc<str>, seq: u64, tick: Tick) -> Self {
        let mut frame = Vec::new();
        encode_tick_frame(TickKind::Tick, &name, seq, &tick, 0, &mut frame);
        Self {
            symbol,
            seq,
            frame: Bytes::from(frame),
            tick,
            name,
            accepted_ns: crate::metrics::mono_ns(),
            prime: false,
            deflated: OnceLock::new(),
        }
    }

    /// The tick's frame compressed alone ([`Self::deflated`]), compressing it with
    /// `shared` (a compressor without context takeover, made at `level` when absent) the
    /// first time.
    pub fn deflated_frame(&self, shared: &mut Option<Deflater>, level: u32) -> &Bytes {
        self.deflated.get_or_init(|| {
            let d = shared.get_or_insert_with(|| Deflater::shared(level));
            let mut out = Vec::new();
            deflate_server_frame(d, &self.frame, &mut out);
            Bytes::from(out)
        })
    }
}

/// How [`OutboundQueue::drain_with`] moves frames into the write buffer: copied as they
/// are ([`Plain`], the fan-out's path), or compressed ([`Deflating`]).
pub trait FrameSink {
    /// Frames are copied unchanged (conflated ticks are then encoded straight into `out`).
    const PLAIN: bool;
    /// A frame queued as bytes: replies, snapshots, pings, the close.
    fn frame(&mut self, frame: &[u8], out: &mut Vec<u8>);
    /// A shared tick.
    fn tick(&mut self, t: &SharedTick, out: &mut Vec<u8>);
}

/// Frames go out as they were queued.
pub struct Plain;

impl FrameSink for Plain {
    const PLAIN: bool = true;
    #[inline]
    fn frame(&mut self, frame: &[u8], out: &mut Vec<u8>) {
        out.extend_from_slice(frame);
    }
    #[inline]
    fn tick(&mut self, t: &SharedTick, out: &mut Vec<u8>) {
        out.extend_from_slice(&t.frame);
    }
}

/// permessage-deflate on the way out. With context takeover (`own` set) every data
/// frame of the batch goes through the connection's compressor, one message after the
/// other; without (`own` is `None`) a tick goes out as its shared compressed frame
/// ([`SharedTick::deflated_frame`], compressed once for all such subscribers) and every
/// other frame as it is (RSV1 is chosen per message). Control frames are never compressed.
pub struct Deflating<'a> {
    pub own: Option<&'a mut Deflater>,
    /// The shard's compressor of shared tick frames (made on first use).
    pub shared: &'a mut Option<Deflater>,
    pub level: u32,
}

impl FrameSink for Deflating<'_> {
    const PLAIN: bool = false;
    fn frame(&mut self, frame: &[u8], out: &mut Vec<u8>) {
        match self.own.as_deref_mut() {
            Some(d) => deflate_server_frame(d, frame, out),
            None => out.extend_from_slice(frame),
        }
    }
    fn tick(&mut self, t: &SharedTick, out: &mut Vec<u8>) {
        match self.own.as_deref_mut() {
            Some(d) => deflate_server_frame(d, &t.frame, out),
            None => out.extend_from_slice(t.deflated_frame(self.shared, self.level)),
        }
    }
}

/// Appends an unmasked, final WebSocket text frame (RFC 6455 section 5.2) carrying `payload`.
pub fn text_frame(payload: &[u8], out: &mut Vec<u8>) {
    crate::proto::frame::encode_frame_into(crate::proto::frame::OpCode::Text, payload, out);
}

/// Appends a complete WebSocket text frame carrying the tick JSON (see
/// [`encode_tick_json`]), encoding the JSON in place (no intermediate buffer).
pub fn encode_tick_frame(
    kind: TickKind,
    symbol: &str,
    seq: u64,
    tick: &Tick,
    skipped: u64,
    out: &mut Vec<u8>,
) {
    // Tick JSON is 126..65535 bytes in practice, so reserve a 4-byte header and fix it up
    // afterwards; the rare other sizes shift the payload once.
    let start = out.len();
    out.extend_from_slice(&[0x81, 126, 0, 0]);
    encode_tick_json(kind, symbol, seq, tick, skipped, out);
    let len = out.len() - start - 4;
    if let Ok(l) = u16::try_from(len)
        && len >= 126
    {
        out[start + 2..start + 4].copy_from_slice(&l.to_be_bytes());
    } else {
        let mut header = [0u8; 10];
        let n = crate::proto::frame::write_header(crate::proto::frame::OpCode::Text, len, &mut header);
        out.splice(start..start + 4, header[..n].iter().copied());
    }
}

/// A frame length for the 32-bit control counter (saturating).
fn len32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// What happened to a pushed tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Queued in order, nothing lost.
    Queued,
    /// Kept in the conflation map (possibly replacing an older tick of the same symbol);
    /// the queue was already conflating.
    Conflated,
    /// This push hit the bound and switched the queue into conflation mode (the tick is
    /// kept in the map): arm the slow-consumer timer if it is not armed.
    OverBudget,
}

enum Entry {
    Control(Bytes),
    /// A pong frame: at most one is queued; a newer ping replaces its payload.
    Pong(Bytes),
    /// A tick; `true` when it comes from a replay (`since`): published before this
    /// connection asked for it, so it has no place in the publish-to-write histogram.
    Tick(Arc<SharedTick>, bool),
}

impl Entry {
    fn len(&self) -> usize {
        match self {
            Entry::Control(b) | Entry::Pong(b) => b.len(),
            Entry::Tick(t, _) => t.frame.len(),
        }
    }

    fn is_control(&self) -> bool {
        !matches!(self, Entry::Tick(..))
    }
}

struct Slot {
    tick: Arc<SharedTick>,
    /// Ticks of this symbol replaced (left out) since the last one queued or delivered.
    skipped: u64,
    /// `tick` comes from a replay (see [`Entry::Tick`]).
    replayed: bool,
}

/// A connection's bounded outbound queue with per-symbol conflation.
pub struct OutboundQueue {
    max_bytes: usize,
    fifo: VecDeque<Entry>,
    /// The conflation state, only while a slow consumer has some (boxed: 80 bytes that
    /// every idle connection would otherwise carry).
    conflated: Option<Box<Conflated>>,
    queued_bytes: usize,
    /// Bytes of queued control frames (replies, pings, pongs, close): they are never
    /// conflated, so this is what a client that asks without reading can grow. 32 bits
    /// (saturating): the session closes a connection long before 4 GiB, and the queue then
    /// stays in the connection's 512-byte allocation class.
    control_bytes: u32,
    conflating: bool,
    /// A pong is in the FIFO.
    pong_queued: bool,
    conflated_total: u64,
}

/// Hashes a [`SymbolId`] (a dense `u32`) with one multiplication, then folds the product's
/// high half into the low bits: the map picks buckets by the low bits, which in the bare
/// product depend only on the id's low bits (ids 128 apart, which a client can pick by
/// subscribing to the right symbols, would share a handful of buckets). SipHash's keyed
/// flooding resistance buys nothing more here: ids are assigned by the server in order of
/// first sight, and every offered tick pays the hash once per conflating subscriber.
#[derive(Default, Clone, Copy)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0 ^ (self.0 >> 32)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.0 = (self.0 ^ u64::from(n)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type IdMap<V> = HashMap<SymbolId, V, std::hash::BuildHasherDefault<IdHasher>>;

/// Newest tick per symbol while conflating.
#[derive(Default)]
struct Conflated {
    slots: IdMap<Slot>,
    /// Symbols in `slots`, oldest first, so conflated symbols are served fairly.
    order: VecDeque<SymbolId>,
}

impl OutboundQueue {
    /// A queue that starts conflating past `max_bytes` (`limits.outbound_queue_bytes`).
    pub fn new(max_bytes: usize) -> Self {
        Self {
            max_bytes,
            fifo: VecDeque::new(),
            conflated: None,
            queued_bytes: 0,
            control_bytes: 0,
            conflating: false,
            pong_queued: false,
            conflated_total: 0,
        }
    }

    /// Queues a control or response frame (acks, errors, close, pings); never dropped,
    /// always in order relative to other control frames, counted in `queued_bytes`.
    pub fn push_control(&mut self, frame: Bytes) {
        self.queued_bytes += frame.len();
        self.control_bytes = self.control_bytes.saturating_add(len32(frame.len()));
        self.fifo.push_back(Entry::Control(frame));
    }

    /// Queues a pong. A pong still waiting is replaced, not joined: it answers the latest
    /// ping (RFC 6455 section 5.5.3 allows answering only the most recent), so a client
    /// that pings without reading holds one pong here, whatever its ping rate.
    pub fn push_pong(&mut self, frame: Bytes) {
        if self.pong_queued
            && let Some(Entry::Pong(old)) = self.fifo.iter_mut().rev().find(|e| matches!(e, Entry::Pong(_)))
        {
            self.queued_bytes = self.queued_bytes - old.len() + frame.len();
            self.control_bytes = self
                .control_bytes
                .saturating_sub(len32(old.len()))
                .saturating_add(len32(frame.len()));
            *old = frame;
            return;
        }
        self.queued_bytes += frame.len();
        self.control_bytes = self.control_bytes.saturating_add(len32(frame.len()));
        self.pong_queued = true;
        self.fifo.push_back(Entry::Pong(frame));
    }

    /// Bytes of control frames waiting (see the field).
    pub fn control_bytes(&self) -> usize {
        self.control_bytes as usize
    }

    /// Queues a tick for this connection (FIFO below the bound, conflated at/over it).
    pub fn push_tick(&mut self, t: &Arc<SharedTick>) -> Pushed {
        self.push(t, false)
    }

    fn push(&mut self, t: &Arc<SharedTick>, replayed: bool) -> Pushed {
        let len = t.frame.len();
        if !self.conflating && self.queued_bytes.saturating_add(len) <= self.max_bytes {
            self.queued_bytes += len;
            self.fifo.push_back(Entry::Tick(Arc::clone(t), replayed));
            return Pushed::Queued;
        }
        self.conflate(t, 0, replayed)
    }

    /// Queues a replayed tick (`since`), as [`Self::push_tick`] does a live one, standing
    /// for `skipped` ticks of its symbol left out right before it (a replay cut to the
    /// budget): as if those ticks had been pushed and conflated, the queue then goes into
    /// conflation mode and `t` goes out with `skipped` counting them. A replayed tick is
    /// left out of the publish-to-write stamp [`Self::drain_stamped`] reports.
    pub fn push_replayed(&mut self, t: &Arc<SharedTick>, skipped: u64) -> Pushed {
        if skipped == 0 {
            return self.push(t, true);
        }
        self.conflate(t, skipped, true)
    }

    /// `t` into the conflation map, replacing its symbol's entry (which then counts as
    /// left out), after `left_out` ticks of the symbol that never reached the queue.
    fn conflate(&mut self, t: &Arc<SharedTick>, left_out: u64, replayed: bool) -> Pushed {
        let len = t.frame.len();
        let entered = !self.conflating;
        self.conflating = true;
        let c = self.conflated.get_or_insert_with(Box::default);
        match c.slots.get_mut(&t.symbol) {
            Some(slot) => {
                self.queued_bytes = self.queued_bytes - slot.tick.frame.len() + len;
                slot.tick = Arc::clone(t);
                slot.replayed = replayed;
                slot.skipped += left_out + 1;
                self.conflated_total += left_out + 1;
            }
            None => {
                self.queued_bytes += len;
                c.slots.insert(
                    t.symbol,
                    Slot {
                        tick: Arc::clone(t),
                        skipped: left_out,
                        replayed,
                    },
                );
                c.order.push_back(t.symbol);
                self.conflated_total += left_out;
            }
        }
        if entered {
            Pushed::OverBudget
        } else {
            Pushed::Conflated
        }
    }

    /// Moves whole frames, FIFO first then conflated ticks, into `out` until `max` bytes
    /// would be exceeded; returns the bytes appended. A first frame larger than `max` is
    /// still moved, so a small `max` cannot stall the queue.
    pub fn drain_into(&mut self, out: &mut Vec<u8>, max: usize) -> usize {
        self.drain_stamped(out, max).0
    }

    /// [`Self::drain_into`], also returning the oldest `accepted_ns` among the live ticks
    /// moved (`u64::MAX` when none was), for the publish-to-write histogram. Replayed ticks
    /// ([`Self::push_replayed`]) are left out: they were published before the connection
    /// asked for them, and a storm of replays would fill the histogram's top bucket.
    pub fn drain_stamped(&mut self, out: &mut Vec<u8>, max: usize) -> (usize, u64) {
        self.drain_with(out, max, &mut Plain)
    }

    /// [`Self::drain_stamped`] through `sink` (compression). `max` counts the frames as
    /// queued, before the sink.
    pub fn drain_with<S: FrameSink>(&mut self, out: &mut Vec<u8>, max: usize, sink: &mut S) -> (usize, u64) {
        let start = out.len();
        // What the queued frames moved add up to (the bound counts them as queued).
        let mut moved = 0usize;
        let mut oldest = u64::MAX;
        while let Some(e) = self.fifo.front() {
            let len = e.len();
            if moved > 0 && moved.saturating_add(len) > max {
                return (out.len() - start, oldest);
            }
            moved += len;
            match self.fifo.pop_front() {
                Some(Entry::Control(b)) => {
                    self.control_bytes = self.control_bytes.saturating_sub(len32(len));
                    sink.frame(&b, out);
                }
                Some(Entry::Pong(b)) => {
                    self.control_bytes = self.control_bytes.saturating_sub(len32(len));
                    self.pong_queued = false;
                    sink.frame(&b, out);
                }
                Some(Entry::Tick(t, replayed)) => {
                    if !replayed {
                        oldest = oldest.min(t.accepted_ns);
                    }
                    sink.tick(&t, out);
                }
                None => break,
            }
            self.queued_bytes -= len;
        }
        let Some(c) = self.conflated.as_deref_mut() else {
            self.conflating = false;
            return (out.len() - start, oldest);
        };
        while let Some(sym) = c.order.front().copied() {
            let Some(slot) = c.slots.get(&sym) else {
                c.order.pop_front();
                continue;
            };
            // Re-encoding adds `,"skipped":N` (at most 31 bytes): estimate conservatively.
            let len = slot.tick.frame.len() + if slot.skipped > 0 { 32 } else { 0 };
            if moved > 0 && moved.saturating_add(len) > max {
                return (out.len() - start, oldest);
            }
            moved += len;
            c.order.pop_front();
            if let Some(slot) = c.slots.remove(&sym) {
                let t = &slot.tick;
                if !slot.replayed {
                    oldest = oldest.min(t.accepted_ns);
                }
                if slot.skipped == 0 {
                    sink.tick(t, out);
                } else if S::PLAIN {
                    encode_tick_frame(TickKind::Tick, &t.name, t.seq, &t.tick, slot.skipped, out);
                } else {
                    let mut frame = Vec::new();
                    encode_tick_frame(TickKind::Tick, &t.name, t.seq, &t.tick, slot.skipped, &mut frame);
                    sink.frame(&frame, out);
                }
                self.queued_bytes -= t.frame.len();
            }
        }
        // Map fully drained (FIFO was drained first): per-symbol order is safe again.
        self.conflating = false;
        (out.len() - start, oldest)
    }

    /// Bytes of frames waiting (FIFO plus conflated ticks, as originally encoded).
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    pub fn is_empty(&self) -> bool {
        self.fifo.is_empty() && self.conflated.as_ref().is_none_or(|c| c.slots.is_empty())
    }

    /// Whether new ticks are being conflated (the queue hit its bound and has not fully
    /// drained since).
    pub fn is_conflating(&self) -> bool {
        self.conflating
    }

    /// Whether the connection is behind: conflating, or past the bound (control frames
    /// alone can push it there). The slow-consumer timer runs while this is true.
    pub fn over_budget(&self) -> bool {
        self.conflating || self.queued_bytes > self.max_bytes
    }

    /// Entries the queue can hold without allocating (its buffer; 0: none held).
    #[cfg(test)]
    pub(crate) fn capacity(&self) -> usize {
        self.fifo.capacity()
    }

    /// Release the queue's spare capacity when it is empty (an idle connection then holds
    /// no heap memory here). Called from the shard's once-a-second housekeeping, not on the
    /// hot path, so a busy queue does not regrow every turn.
    pub fn shrink_if_empty(&mut self) {
        if self.fifo.is_empty() {
            self.fifo = VecDeque::new();
        }
        if self.conflated.as_ref().is_some_and(|c| c.slots.is_empty()) {
            self.conflated = None;
        }
    }

    /// Drops everything queued (the connection is being cut as a slow consumer: its close
    /// frame must not wait behind the backlog).
    pub fn clear(&mut self) {
        self.fifo.clear();
        self.conflated = None;
        self.queued_bytes = 0;
        self.control_bytes = 0;
        self.pong_queued = false;
        self.conflating = false;
    }

    /// Ticks left out by conflation so far (for metrics).
    pub fn conflated_total(&self) -> u64 {
        self.conflated_total
    }

    /// Drops queued ticks of `symbol` (on unsubscribe); control frames stay.
    pub fn remove_symbol(&mut self, symbol: SymbolId) {
        let mut freed = 0;
        self.fifo.retain(|e| match e {
            Entry::Tick(t, _) if t.symbol == symbol => {
                freed += t.frame.len();
                false
            }
            _ => true,
        });
        let mut none_conflated = true;
        if let Some(c) = self.conflated.as_deref_mut() {
            if let Some(slot) = c.slots.remove(&symbol) {
                freed += slot.tick.frame.len();
                c.order.retain(|s| *s != symbol);
            }
            none_conflated = c.slots.is_empty();
        }
        self.queued_bytes -= freed;
        if none_conflated && self.fifo.iter().all(Entry::is_control) {
            // Nothing conflated and no ticks in flight: no order to protect any more.
            self.conflating = false;
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn symbol_ids_spaced_apart_still_spread_over_buckets() {
        use std::hash::{BuildHasher, BuildHasherDefault};
        let b = BuildHasherDefault::<IdHasher>::default();
        for stride in [1u32, 64, 128, 1024] {
            let mut buckets = std::collections::HashSet::new();
            for i in 0..780u32 {
                buckets.insert(b.hash_one(SymbolId(i * stride)) & 1023);
            }
            // 780 keys over 1,024 buckets: about 550 distinct when hashed uniformly.
            assert!(buckets.len() > 450, "stride {stride}: {} buckets", buckets.len());
        }
    }

    use super::*;
    use proptest::prelude::*;

    fn tick(px: f64) -> Tick {
        Tick {
            ts: 1_700_000_000_000_000_000,
            bid: px,
            ask: px + 0.5,
            last: px,
            qty: 1.0,
        }
    }

    fn shared(sym: u32, seq: u64) -> Arc<SharedTick> {
        let name: Arc<str> = Arc::from(format!("SYM{sym}").as_str());
        Arc::new(SharedTick::new(
            SymbolId(sym),
            name,
            seq,
            tick(100.0 + seq as f64),
        ))
    }

    /// Splits a buffer of unmasked server frames into payloads.
    fn frames(mut b: &[u8]) -> Vec<serde_json::Value> {
        let mut v = Vec::new();
        while !b.is_empty() {
            assert_eq!(b[0], 0x81);
            let (len, hdr) = match b[1] {
                126 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
                127 => (u64::from_be_bytes(b[2..10].try_into().unwrap()) as usize, 10),
                n => (n as usize, 2),
            };
            v.push(serde_json::from_slice(&b[hdr..hdr + len]).unwrap());
            b = &b[hdr + len..];
        }
        v
    }

    fn control(k: u64) -> Bytes {
        let mut p = Vec::new();
        crate::feed::msg::encode_pong(Some(k), &mut p);
        let mut f = Vec::new();
        text_frame(&p, &mut f);
        Bytes::from(f)
    }

    #[test]
    fn text_frame_lengths() {
        for (n, hdr) in [(0, 2), (125, 2), (126, 4), (65535, 4), (65536, 10)] {
            let mut out = Vec::new();
            text_frame(&vec![b'x'; n], &mut out);
            assert_eq!(out.len(), n + hdr);
            assert_eq!(out[0], 0x81);
        }
        let mut out = Vec::new();
        text_frame(&[b'a'; 200], &mut out);
        assert_eq!(&out[..4], &[0x81, 126, 0, 200]);
        let mut out = Vec::new();
        text_frame(&vec![b'a'; 70000], &mut out);
        assert_eq!(&out[..2], &[0x81, 127]);
        assert_eq!(u64::from_be_bytes(out[2..10].try_into().unwrap()), 70000);
    }

    #[test]
    fn tick_frame_matches_text_frame() {
        for name in ["A", "BTC-USD", &"X".repeat(32), &"Y".repeat(70_000)] {
            let t = tick(1.0);
            let mut json = Vec::new();
            encode_tick_json(TickKind::Tick, name, 9, &t, 3, &mut json);
            let mut want = b"pre".to_vec();
            text_frame(&json, &mut want);
            let mut got = b"pre".to_vec();
            encode_tick_frame(TickKind::Tick, name, 9, &t, 3, &mut got);
            assert_eq!(got, want, "{}", name.len());
        }
    }

    #[test]
    fn fifo_below_bound() {
        let mut q = OutboundQueue::new(10_000);
        assert!(q.is_empty());
        q.push_control(control(1));
        assert_eq!(q.push_tick(&shared(0, 1)), Pushed::Queued);
        assert_eq!(q.push_tick(&shared(0, 2)), Pushed::Queued);
        assert!(!q.is_conflating() && !q.over_budget());
        let mut out = Vec::new();
        let n = q.drain_into(&mut out, usize::MAX);
        assert_eq!(n, out.len());
        assert_eq!(q.queued_bytes(), 0);
        assert!(q.is_empty());
        let f = frames(&out);
        assert_eq!(f[0]["type"], "pong");
        assert_eq!(f[1]["seq"], 1);
        assert_eq!(f[2]["seq"], 2);
        assert!(f[2].get("skipped").is_none());
    }

    #[test]
    fn conflation_keeps_newest_and_counts_skipped() {
        let flen = shared(0, 1).frame.len();
        let mut q = OutboundQueue::new(flen * 2);
        assert_eq!(q.push_tick(&shared(0, 1)), Pushed::Queued);
        assert_eq!(q.push_tick(&shared(0, 2)), Pushed::Queued);
        assert_eq!(q.push_tick(&shared(0, 3)), Pushed::OverBudget);
        assert!(q.is_conflating() && q.over_budget());
        for seq in 4..=10 {
            assert_eq!(q.push_tick(&shared(0, seq)), Pushed::Conflated);
        }
        assert_eq!(q.push_tick(&shared(1, 1)), Pushed::Conflated);
        q.push_control(control(7));
        assert_eq!(q.conflated_total(), 7);
        let mut out = Vec::new();
        q.drain_into(&mut out, usize::MAX);
        let f = frames(&out);
        let seqs: Vec<_> = f.iter().map(|v| (v["type"].clone(), v["seq"].clone())).collect();
        assert_eq!(f.len(), 5, "{seqs:?}");
        assert_eq!(f[0]["seq"], 1);
        assert_eq!(f[1]["seq"], 2);
        assert_eq!(f[2]["type"], "pong");
        assert_eq!(f[3]["seq"], 10);
        assert_eq!(f[3]["skipped"], 7);
        assert_eq!(f[4]["s"], "SYM1");
        assert!(f[4].get("skipped").is_none());
        assert!(!q.is_conflating() && q.is_empty() && q.queued_bytes() == 0);
        // Back to FIFO.
        assert_eq!(q.push_tick(&shared(0, 11)), Pushed::Queued);
    }

    #[test]
    fn drain_stamped_reports_the_oldest_tick_moved() {
        let stamped = |sym: u32, seq: u64, at: u64| {
            let mut t = (*shared(sym, seq)).clone();
            t.accepted_ns = at;
            Arc::new(t)
        };
        let flen = shared(0, 1).frame.len();
        let mut q = OutboundQueue::new(flen * 2);
        let mut out = Vec::new();
        q.push_control(control(1));
        assert_eq!(q.drain_stamped(&mut out, usize::MAX).1, u64::MAX);
        // FIFO ticks: the oldest stamp, whatever the order they were queued in.
        q.push_tick(&stamped(0, 1, 500));
        q.push_tick(&stamped(1, 1, 300));
        assert_eq!(q.drain_stamped(&mut out, usize::MAX).1, 300);
        // A partial drain reports only what it moved.
        q.push_tick(&stamped(0, 2, 900));
        q.push_tick(&stamped(1, 2, 700));
        assert_eq!(q.drain_stamped(&mut out, flen).1, 900);
        assert_eq!(q.drain_stamped(&mut out, usize::MAX).1, 700);
        // Conflated ticks count too: the slot delivers the newest tick, hence its stamp.
        q.push_tick(&stamped(0, 3, 10));
        q.push_tick(&stamped(0, 4, 20));
        q.push_tick(&stamped(0, 5, 30));
        q.push_tick(&stamped(0, 6, 40));
        assert!(q.is_conflating());
        // The FIFO part (seq 3 and 4) first, then the conflated slot (seq 6, stamp 40).
        assert_eq!(q.drain_stamped(&mut out, flen * 2).1, 10);
        let (moved, oldest) = q.drain_stamped(&mut out, usize::MAX);
        assert!(moved > 0 && q.is_empty());
        assert_eq!(oldest, 40);
        // Replayed ticks carry no stamp, queued or conflated; a live one after them does.
        let mut q = OutboundQueue::new(flen * 2);
        q.push_replayed(&stamped(0, 1, 5), 0);
        assert_eq!(q.drain_stamped(&mut out, usize::MAX).1, u64::MAX);
        q.push_replayed(&stamped(0, 2, 6), 0);
        q.push_tick(&stamped(1, 1, 800));
        assert_eq!(q.drain_stamped(&mut out, usize::MAX).1, 800);
        q.push_replayed(&stamped(0, 9, 7), 6);
        assert!(q.is_conflating());
        assert_eq!(q.drain_stamped(&mut out, usize::MAX).1, u64::MAX);
        // A live tick replacing a replayed one in its slot brings its stamp.
        q.push_replayed(&stamped(0, 12, 8), 2);
        q.push_tick(&stamped(0, 13, 900));
        assert_eq!(q.drain_stamped(&mut out, usize::MAX).1, 900);
        assert!(q.is_empty());
    }

    #[test]
    fn stays_conflating_until_map_drained() {
        let flen = shared(0, 1).frame.len();
        let mut q = OutboundQueue::new(flen);
        q.push_tick(&shared(0, 1));
        q.push_tick(&shared(0, 2)); // map
        let mut out = Vec::new();
        // Drain only the FIFO frame: map still holds seq 2.
        q.drain_into(&mut out, flen);
        assert!(q.is_conflating());
        // Under the bound now, but seq 3 must not overtake seq 2 through the FIFO.
        assert_eq!(q.push_tick(&shared(0, 3)), Pushed::Conflated);
        q.drain_into(&mut out, usize::MAX);
        let f = frames(&out);
        assert_eq!(f.len(), 2);
        assert_eq!(f[1]["seq"], 3);
        assert_eq!(f[1]["skipped"], 1);
    }

    #[test]
    fn drain_respects_max_but_always_progresses() {
        let mut q = OutboundQueue::new(1 << 20);
        for s in 1..=4 {
            q.push_tick(&shared(0, s));
        }
        let flen = shared(0, 1).frame.len();
        let mut out = Vec::new();
        assert_eq!(q.drain_into(&mut out, 1), flen);
        assert_eq!(q.drain_into(&mut out, flen * 2 + 1), flen * 2);
        assert_eq!(q.drain_into(&mut out, 0), flen);
        assert_eq!(q.drain_into(&mut out, 100), 0);
    }

    #[test]
    fn remove_symbol_keeps_control() {
        let flen = shared(0, 1).frame.len();
        let mut q = OutboundQueue::new(flen * 2);
        q.push_tick(&shared(0, 1));
        q.push_control(control(1));
        q.push_tick(&shared(1, 1));
        q.push_tick(&shared(0, 2)); // conflated
        q.push_tick(&shared(0, 3)); // conflated, replaces
        q.remove_symbol(SymbolId(0));
        let mut out = Vec::new();
        q.drain_into(&mut out, usize::MAX);
        let f = frames(&out);
        assert_eq!(f.len(), 2);
        assert_eq!(f[0]["type"], "pong");
        assert_eq!(f[1]["s"], "SYM1");
        assert_eq!(q.queued_bytes(), 0);
    }

    #[test]
    fn control_over_budget_without_ticks() {
        let mut q = OutboundQueue::new(10);
        q.push_control(control(1));
        assert!(q.over_budget() && !q.is_conflating());
        let mut out = Vec::new();
        q.drain_into(&mut out, usize::MAX);
        assert!(!q.over_budget());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Tick(u32),
        /// A replayed tick standing for this many left out before it.
        Replayed(u32, u64),
        Control,
        Drain(usize),
        Remove(u32),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            8 => (0u32..4).prop_map(Op::Tick),
            2 => ((0u32..4), prop_oneof![3 => Just(0u64), 1 => 1u64..5]).prop_map(|(s, k)| Op::Replayed(s, k)),
            1 => Just(Op::Control),
            2 => (0usize..1200).prop_map(Op::Drain),
            1 => (0u32..4).prop_map(Op::Remove),
        ]
    }

    #[derive(Default, Clone)]
    struct SymModel {
        next_seq: u64,
        /// First seq of the current subscription epoch (after the last remove).
        epoch_start: u64,
        pushed_in_epoch: u64,
        accounted_in_epoch: u64,
        last_delivered: u64,
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn queue_matches_model(max in 0usize..1500, ops in proptest::collection::vec(op(), 0..200)) {
            const NSYM: usize = 4;
            let max_frame = (0..NSYM as u32).map(|s| shared(s, u64::MAX).frame.len()).max().unwrap();
            let mut q = OutboundQueue::new(max);
            let mut m = vec![SymModel::default(); NSYM];
            for s in &mut m { s.next_seq = 1; s.epoch_start = 1; }
            let mut next_control = 0u64;
            let mut next_expected_control = 0u64;
            let mut pending_control_bytes = 0usize;
            let mut control_lens: VecDeque<usize> = VecDeque::new();
            let mut check = |out: &[u8], m: &mut Vec<SymModel>, pcb: &mut usize, cl: &mut VecDeque<usize>| -> Result<(), TestCaseError> {
                for f in frames(out) {
                    if f["type"] == "pong" {
                        prop_assert_eq!(f["id"].as_u64(), Some(next_expected_control));
                        next_expected_control += 1;
                        *pcb -= cl.pop_front().unwrap();
                        continue;
                    }
                    prop_assert_eq!(&f["type"], "tick");
                    let sym: usize = f["s"].as_str().unwrap()[3..].parse().unwrap();
                    let seq = f["seq"].as_u64().unwrap();
                    let skipped = f.get("skipped").map(|v| v.as_u64().unwrap()).unwrap_or(0);
                    let sm = &mut m[sym];
                    prop_assert!(seq > sm.last_delivered, "reordered or duplicate");
                    prop_assert!(seq >= sm.epoch_start, "delivered a removed tick");
                    prop_assert!(seq < sm.next_seq);
                    // The gap since the previous delivery in this epoch is exactly `skipped`.
                    let prev = sm.last_delivered.max(sm.epoch_start - 1);
                    prop_assert_eq!(seq - prev - 1, skipped);
                    sm.last_delivered = seq;
                    sm.accounted_in_epoch += 1 + skipped;
                }
                Ok(())
            };
            for o in ops {
                match o {
                    Op::Tick(s) => {
                        let sm = &mut m[s as usize];
                        let t = shared(s, sm.next_seq);
                        sm.next_seq += 1;
                        sm.pushed_in_epoch += 1;
                        q.push_tick(&t);
                    }
                    Op::Replayed(s, skipped) => {
                        let sm = &mut m[s as usize];
                        sm.next_seq += skipped;
                        let t = shared(s, sm.next_seq);
                        sm.next_seq += 1;
                        sm.pushed_in_epoch += 1 + skipped;
                        q.push_replayed(&t, skipped);
                    }
                    Op::Control => {
                        let c = control(next_control);
                        next_control += 1;
                        pending_control_bytes += c.len();
                        control_lens.push_back(c.len());
                        q.push_control(c);
                    }
                    Op::Drain(n) => {
                        let mut out = Vec::new();
                        let moved = q.drain_into(&mut out, n);
                        prop_assert_eq!(moved, out.len());
                        check(&out, &mut m, &mut pending_control_bytes, &mut control_lens)?;
                    }
                    Op::Remove(s) => {
                        q.remove_symbol(SymbolId(s));
                        let sm = &mut m[s as usize];
                        sm.epoch_start = sm.next_seq;
                        sm.pushed_in_epoch = 0;
                        sm.accounted_in_epoch = 0;
                    }
                }
                prop_assert!(q.queued_bytes() <= max + pending_control_bytes + NSYM * max_frame,
                    "queued {} max {} control {}", q.queued_bytes(), max, pending_control_bytes);
            }
            let mut out = Vec::new();
            q.drain_into(&mut out, usize::MAX);
            check(&out, &mut m, &mut pending_control_bytes, &mut control_lens)?;
            prop_assert!(q.is_empty());
            prop_assert_eq!(q.queued_bytes(), 0);
            prop_assert_eq!(next_expected_control, next_control);
            for sm in &m {
                prop_assert_eq!(sm.pushed_in_epoch, sm.accounted_in_epoch);
                if sm.pushed_in_epoch > 0 {
                    prop_assert_eq!(sm.last_delivered, sm.next_seq - 1, "newest not delivered");
                }
            }
        }
    }

    /// A tick standing for `skipped` left-out ones is what pushing those and it one by one
    /// into a conflating queue gives: same frames out, same `skipped`, same counters.
    #[test]
    fn push_replayed_is_pushing_the_left_out_ticks_one_by_one() {
        let name: Arc<str> = Arc::from("A");
        let t = |seq| {
            Arc::new(SharedTick::new(
                SymbolId(1),
                name.clone(),
                seq,
                Tick {
                    ts: seq,
                    bid: 1.0,
                    ask: 2.0,
                    last: 1.5,
                    qty: 1.0,
                },
            ))
        };
        for pre in [0u64, 3] {
            for skipped in [1u64, 5] {
                let mut one_by_one = OutboundQueue::new(4096);
                let mut at_once = OutboundQueue::new(4096);
                for q in [&mut one_by_one, &mut at_once] {
                    for s in 1..=pre {
                        q.push_tick(&t(s));
                    }
                }
                for s in pre + 1..=pre + skipped {
                    // Past the bound: these conflate.
                    one_by_one.conflating = true;
                    one_by_one.push_tick(&t(s));
                }
                one_by_one.push_tick(&t(pre + skipped + 1));
                at_once.push_replayed(&t(pre + skipped + 1), skipped);
                let (mut a, mut b) = (Vec::new(), Vec::new());
                one_by_one.drain_into(&mut a, usize::MAX);
                at_once.drain_into(&mut b, usize::MAX);
                assert_eq!(a, b, "pre {pre} skipped {skipped}");
                assert_eq!(one_by_one.conflated_total(), at_once.conflated_total());
            }
        }
    }
}
