//! A shard's runtime state, shared by its tasks through `Rc<ShardCtx>`: the sans-IO
//! [`ShardCore`] (connections, subscriptions, deadlines) and what only the runtime needs
//! (the shared read buffers, the write-buffer pool, the accept canceller, the verifier
//! pool, the latency sampler). Nothing here is `Send`, and no borrow of a `RefCell` is
//! ever held across an `.await`.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;

use crate::core::shard::{Effect, ShardCore};
use crate::rt::io::{ConnRef, Io, ReadySet, SendRing};
use crate::state::Shared;

/// Ticks dispatched before the dispatcher yields so writers and readers get their turn.
pub(crate) const DISPATCH_BUDGET: usize = 8192;

/// Timer events fired, and control messages (reauth results, ...) handled, per loop
/// turn before the task yields. Deadlines cluster: 10,000 tokens minted in the same
/// second reach `exp - reauth_lead` in the same millisecond, and their reauth results
/// come back together. Handled in one go, that is 10,000 messages queued and 10,000
/// writes submitted before the dispatcher runs again, and every tick behind them waited
/// (a 30 ms p99 spike with 10,000 connections). In slices, ticks interleave; the burst
/// itself is spread over a few more milliseconds, far inside any reauth lead time.
pub(crate) const BURST_SLICE: usize = 64;

pub struct ShardCtx {
    pub id: usize,
    pub shared: Arc<Shared>,
    /// The shard's decisions. Borrowed for one `handle_*` call at a time; its effects are
    /// carried out after the borrow ends (`conn::carry_out`).
    pub core: RefCell<ShardCore<Io>>,
    /// The spare effect buffer `carry_out` swaps with the core's.
    pub(crate) effects: RefCell<Vec<Effect>>,
    pub read_buf: RefCell<Box<[u8]>>,
    /// Decrypted bytes of the current read (TLS only), shared like `read_buf`.
    pub plain_buf: RefCell<Vec<u8>>,
    pub accept_cancel: RefCell<Option<monoio::io::Canceller>>,
    /// Write buffers shared by the shard's writers (see `take_buffer`).
    write_pool: RefCell<Vec<Vec<u8>>>,
    /// The shard runs on io_uring (not the epoll fallback).
    pub uring: bool,
    /// The established connections, for the shard's reader task (`conn::readers`).
    pub(crate) ready: ReadySet,
    /// The shard's publishers, by slot and generation, read ahead of their turn
    /// (`conn::read_feeds`); at most [`MAX_FEEDS`], the first ones to connect.
    feeds: RefCell<Vec<(usize, u32)>>,
    /// When the feeds are next read ahead of their turn (`conn::feeds_first`).
    pub(crate) feeds_pace: Cell<crate::timer::pace::Every>,
    /// The ms (the shard's clock) at which the ticker's sleep should end; past it,
    /// `conn::feeds_first` fires the due timers itself (`shard::fire_timers`).
    pub(crate) timers_due: Cell<u64>,
    /// Verifier threads for in-band reauth tokens.
    pub verify_pool: crate::rt::verify::VerifyPool,
    /// State of the sampler for the latency histograms (xorshift32, never 0).
    sampler: Cell<u32>,
    /// Where shard 0's sweep for idle symbols goes on (see `shard::reclaim_symbols`).
    pub(crate) reclaim_cursor: Cell<usize>,
    /// The compressor of tick frames shared by the shard's permessage-deflate
    /// subscribers without context takeover (made on first use).
    pub tick_deflate: RefCell<Option<crate::proto::deflate::Deflater>>,
    /// Busy polling (`server.busy_poll`), when on: see `shard::busy_poll`.
    pub(crate) spin: Option<Spin>,
    /// io_uring shards: the ring that sends a dispatch pass's writes in batches
    /// (`conn::flush_sends`); None on epoll, or when the kernel refused it (then each
    /// write is its own `send`).
    pub(crate) send_ring: RefCell<Option<SendRing>>,
    /// Writes prepared by `conn::kick` for the next batch (at most `io::SEND_BATCH`).
    pub(crate) staged: RefCell<Vec<Staged>>,
}

/// One connection's write waiting for its batch: the connection (held, so its descriptor
/// stays open until the batch is sent), its slot and the coalesced frames. While staged,
/// the connection's writer counts as running.
pub(crate) struct Staged {
    pub(crate) conn: ConnRef,
    pub(crate) idx: usize,
    pub(crate) buf: Vec<u8>,
}

/// A busy-polling shard's shared part: the count of work the shard did (bumped by
/// [`ShardCtx::note_work`]) and the poller's waker while it sleeps.
pub(crate) struct Spin {
    pub(crate) budget_ns: u64,
    pub(crate) work: Cell<u64>,
    pub(crate) waker: Cell<Option<std::task::Waker>>,
}

/// How long other work may run between two looks at the shard's publishers
/// (`conn::feeds_first`) while many connections want the loop at once.
pub(crate) const FEEDS_EVERY_NS: u64 = 200_000;

/// Publishers per shard read ahead of their turn; more are read in their turn only.
pub(crate) const MAX_FEEDS: usize = 16;

/// Buffers kept in a shard's pool, and the largest one worth keeping.
const POOL_BUFFERS: usize = 256;
const POOL_MAX_CAPACITY: usize = 1 << 20;

impl ShardCtx {
    /// `uring`: the shard's runtime runs on io_uring rather than epoll (see
    /// `rt::io::WriteHandle`). Runs on the shard's runtime thread; fails when the
    /// kernel will not give it an epoll set.
    pub fn new(
        id: usize,
        shared: Arc<Shared>,
        verify_pool: crate::rt::verify::VerifyPool,
        uring: bool,
    ) -> std::io::Result<Rc<ShardCtx>> {
        let now = shared.now_ms();
        let ready = ReadySet::new()?;
        let busy_poll = shared.cfg.server.busy_poll;
        Ok(Rc::new(ShardCtx {
            id,
            core: RefCell::new(ShardCore::new(id, shared.clone(), now)),
            shared,
            effects: RefCell::new(Vec::new()),
            read_buf: RefCell::new(vec![0u8; 64 * 1024].into_boxed_slice()),
            plain_buf: RefCell::new(Vec::new()),
            accept_cancel: RefCell::new(Some(monoio::io::Canceller::new())),
            write_pool: RefCell::new(Vec::new()),
            verify_pool,
            uring,
            ready,
            feeds: RefCell::new(Vec::new()),
            feeds_pace: Cell::new(crate::timer::pace::Every::new(FEEDS_EVERY_NS)),
            timers_due: Cell::new(u64::MAX),
            sampler: Cell::new((0x9E37_79B9 ^ (id as u32).wrapping_mul(0x85EB_CA6B)) | 1),
            reclaim_cursor: Cell::new(0),
            tick_deflate: RefCell::new(None),
            // The epoll driver cannot poll its runtime without sleeping (`io::Nudge`).
            spin: (uring && !busy_poll.is_zero()).then(|| Spin {
                budget_ns: crate::metrics::duration_ns(busy_poll),
                work: Cell::new(0),
                waker: Cell::new(None),
            }),
            send_ring: RefCell::new(if uring { SendRing::new() } else { None }),
            staged: RefCell::new(Vec::with_capacity(crate::rt::io::SEND_BATCH)),
        }))
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
    pub fn one_in(&self, n: u32) -> bool {
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

    /// A publisher's connection joined the shard (ignored past [`MAX_FEEDS`]).
    pub(crate) fn add_feed(&self, idx: usize, generation: u32) {
        let mut f = self.feeds.borrow_mut();
        if f.len() < MAX_FEEDS {
            f.push((idx, generation));
        }
    }

    /// A connection's reader ended: it is no longer a feed, if it was one.
    pub(crate) fn remove_feed(&self, idx: usize, generation: u32) {
        self.feeds.borrow_mut().retain(|&f| f != (idx, generation));
    }

    /// The shard handled something (input read, ticks dispatched, a connection accepted):
    /// a busy-polling shard keeps polling for a whole `server.busy_poll` from now, and a
    /// sleeping poller is woken. Nothing when busy polling is off.
    pub(crate) fn note_work(&self) {
        if let Some(s) = &self.spin {
            s.work.set(s.work.get().wrapping_add(1));
            if let Some(w) = s.waker.take() {
                w.wake();
            }
        }
    }

    /// The shard's feeds now (a copy: reading one may end it and change the list).
    pub(crate) fn feeds(&self) -> Vec<(usize, u32)> {
        self.feeds.borrow().clone()
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
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    /// Every connection is one `Rc<RefCell<Conn>>` allocation: the core's state and the
    /// socket's ([`Io`]) together. mimalloc rounds it up to its size class (448, 512, 640,
    /// 768 bytes...): at 10,000 idle connections a field that pushes it over 512 costs
    /// 128 bytes per connection, an eighth of the 1 KiB budget (issue 17). A new field
    /// needs an old one to shrink.
    #[test]
    fn a_connection_fits_the_512_byte_size_class() {
        let rc_box = 2 * std::mem::size_of::<usize>() + std::mem::size_of::<RefCell<crate::rt::io::Conn>>();
        assert!(rc_box <= 512, "Rc<RefCell<Conn>> is {rc_box} bytes");
    }
}
