//! One shard's long-lived tasks, on a monoio runtime on its own pinned thread (the
//! acceptor is `rt::accept_loop`; connection tasks are in `conn.rs`):
//! - the **dispatcher** drains the shard's hub inbox (ticks and control messages) into the
//!   shard's core, which appends each tick's shared frame to the outbound queue of every
//!   local subscriber; the writers it asks for are started before the next tick. Since it
//!   drains everything available before yielding, the writers that run next find many
//!   frames and write them with one `write` each;
//! - the **ticker** reads the clock, lets the core fire the connection deadlines that are
//!   due (handshake timeout, reauth, heartbeat, idle, slow consumer, hard drop) and does
//!   the periodic housekeeping. There is no timer task per connection;
//! - with `server.busy_poll`, the **busy poller** keeps the shard's thread polling for
//!   work instead of sleeping in the kernel, for that long after its last work.
//!
//! What happens to a tick, a control message or a deadline is decided in
//! [`crate::core::shard::ShardCore`]; these tasks only read the inbox and the clock and
//! carry out the core's effects (`conn::carry_out`).

use std::future::poll_fn;
use std::rc::Rc;
use std::task::Poll;
use std::time::Duration;

use crate::rt::conn::carry_out;
use crate::rt::ctx::ShardCtx;
use crate::rt::io::yield_now;

use crate::rt::ctx::BURST_SLICE;

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
        ctx.note_work();
        if crate::rt::conn::dispatch_pass(&ctx) {
            // More is queued (other shards' publishers keep pushing while this pass runs):
            // let the writers, readers and ticker run, then come back without waiting.
            inbox.pending.store(true, std::sync::atomic::Ordering::Release);
            yield_now().await;
        }
    }
}

/// Busy polling (`server.busy_poll`, io_uring only; nothing when off). While the shard
/// has seen work within the budget, this task polls the runtime over and over
/// (`rt::io::Nudge`): each poll submits what the other tasks queued, reaps the completions, the
/// wake-ups from other threads and the due timers, and runs what they woke, all without
/// sleeping in `io_uring_enter`. A tick then costs no wake-up of the thread, and on a VM
/// no wake-up of the virtual CPU from its halt (about 30 µs on the benchmark VM,
/// perf/RESULTS.md). After a whole budget without work it sleeps until
/// `ShardCtx::note_work` wakes it. The rule is [`crate::timer::pace::BusyPoll`].
pub async fn busy_poll(ctx: Rc<ShardCtx>) {
    use crate::timer::pace::{BusyPoll, Poll as Next};
    let Some(spin) = ctx.spin.as_ref() else {
        return;
    };
    let nudge = match crate::rt::io::Nudge::new() {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(shard = ctx.id, error = %e, "busy polling off: no eventfd");
            return;
        }
    };
    let now = crate::metrics::mono_ns;
    let mut rule = BusyPoll::new(spin.budget_ns, spin.work.get(), now());
    loop {
        match rule.next(spin.work.get(), now()) {
            Next::Again => {
                if let Err(e) = nudge.poll().await {
                    tracing::warn!(shard = ctx.id, error = %e, "busy polling off: cannot poll");
                    return;
                }
            }
            Next::Sleep => {
                let seen = spin.work.get();
                poll_fn(|cx| {
                    if spin.work.get() != seen {
                        Poll::Ready(())
                    } else {
                        spin.waker.set(Some(cx.waker().clone()));
                        Poll::Pending
                    }
                })
                .await;
                rule.wake(spin.work.get(), now());
            }
        }
    }
}

/// Lets the core fire what is due; sleeps until the next deadline, at most 10 ms.
pub async fn ticker(ctx: Rc<ShardCtx>) {
    let mut next_housekeeping = 0u64;
    loop {
        let now = ctx.now_ms();
        ctx.core.borrow_mut().advance_timers(now);
        loop {
            let more = ctx.core.borrow_mut().fire_due(now, BURST_SLICE);
            carry_out(&ctx);
            if !more {
                break;
            }
            yield_now().await;
        }
        if now >= next_housekeeping {
            next_housekeeping = now + 1000;
            housekeeping(&ctx, now);
        }
        // A backstop for the dispatcher's wake-up: should one ever be lost (its `pending`
        // flag left set, so producers no longer wake it), waiting ticks still go out
        // within this task's period (at most 10 ms), not only when a client next sends.
        let inbox = ctx.shared.hub.inbox(ctx.id);
        if !inbox.ticks.is_empty() || !inbox.control_rx.is_empty() {
            inbox.waker.wake();
        }
        let next = ctx.core.borrow().poll_timeout().unwrap_or(u64::MAX);
        let wait = next.saturating_sub(now).clamp(1, 10);
        monoio::time::sleep(Duration::from_millis(wait)).await;
    }
}

fn housekeeping(ctx: &ShardCtx, now: u64) {
    let queued = ctx.core.borrow_mut().housekeeping();
    let g = ctx.shared.metrics.shard(ctx.id);
    g.queued_bytes.store(queued, std::sync::atomic::Ordering::Relaxed);
    g.pending_handshakes.store(
        ctx.core.borrow().pending_len() as u64,
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
        ctx.shared.auth.rate.sweep(now);
        ctx.shared.tickets.sweep(now);
        ctx.shared.revocation.sweep(now);
    }
}

/// Symbols swept per second for idleness (one slice of the table: a full pass over the
/// default 100,000 takes under two minutes, and no turn of shard 0 holds more than this
/// many symbol locks).
const RECLAIM_SLICE: usize = 1024;

/// Retire idle symbols, a slice per call, and free the ids whose quarantine is over.
fn reclaim_symbols(ctx: &ShardCtx, now: u64) {
    let idle_ns = crate::metrics::duration_ns(ctx.shared.cfg.feed.symbol_idle);
    let mono = crate::metrics::mono_ns();
    // The same slice's histories give back what is past `feed.history_age`.
    ctx.shared
        .hub
        .expire_history(mono, ctx.reclaim_cursor.get(), RECLAIM_SLICE);
    let (next, retired) =
        ctx.shared
            .hub
            .reclaim_idle(now, mono, idle_ns, ctx.reclaim_cursor.get(), RECLAIM_SLICE);
    ctx.reclaim_cursor.set(next);
    if retired > 0 {
        ctx.shared
            .metrics
            .symbols_retired
            .fetch_add(retired as u64, std::sync::atomic::Ordering::Relaxed);
    }
    ctx.shared.hub.symbols().recycle(now);
}
