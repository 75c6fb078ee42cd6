//! One shard's long-lived tasks, on a monoio runtime on its own pinned thread (the
//! acceptor is `rt::accept_loop`; connection tasks are in `conn.rs`):
//! - the **dispatcher** drains the shard's hub inbox (ticks and control messages) into the
//!   shard's core, which appends each tick's shared frame to the outbound queue of every
//!   local subscriber; the writers it asks for are started before the next tick. Since it
//!   drains everything available before yielding, the writers that run next find many
//!   frames and write them with one `write` each;
//! - the **ticker** reads the clock, lets the core fire the connection deadlines that are
//!   due (handshake timeout, reauth, heartbeat, idle, slow consumer, hard drop) and does
//!   the periodic housekeeping. There is no timer task per connection. While the shard
//!   stays too busy for its runtime to park (monoio runs timers only then), the due
//!   deadlines are fired from `conn::feeds_first` instead (`conn::fire_timers`);
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

use crate::rt::ctx::ShardCtx;
use crate::rt::io::yield_now;

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
        while crate::rt::conn::fire_timers(&ctx, now) {
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
        ctx.timers_due.set(now + wait);
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

#[cfg(test)]
mod tests {
    use std::os::fd::{AsRawFd, IntoRawFd};
    use std::sync::Arc;

    use super::*;
    use crate::auth::keys::KeySet;
    use crate::auth::mint::generate_signing_key;
    use crate::auth::seclog::SecurityLog;
    use crate::config::Config;
    use crate::state::{AuthState, Shared};

    fn busy_world(
        first_byte_ms: u64,
    ) -> (
        Arc<Shared>,
        crate::rt::verify::VerifyPool,
        monoio::Runtime<monoio::time::TimeDriver<monoio::IoUringDriver>>,
    ) {
        let mut cfg = Config::default_production();
        cfg.server.shards = 1;
        cfg.limits.first_byte_timeout = Duration::from_millis(first_byte_ms);
        let key = generate_signing_key().unwrap();
        let mut ks = KeySet::new();
        ks.insert("k1", key.verifying_key()).unwrap();
        let auth = AuthState::build(&cfg, ks).unwrap();
        let shared = Arc::new(Shared::new(cfg, auth, SecurityLog::discard()));
        let pool = crate::rt::verify::VerifyPool::start(shared.clone(), 1).unwrap();
        let rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .enable_timer()
            .build()
            .expect("io_uring (the server's own driver)");
        (shared, pool, rt)
    }

    /// A control message from another thread (here a revocation from the admin API)
    /// reaches a shard through a wake-up that the runtime takes only when it parks: while
    /// the shard stays busy, `feeds_first` must handle it. Without that the revocation is
    /// never answered and the spinner gives up.
    #[test]
    fn control_messages_are_handled_while_the_shard_never_parks() {
        let (shared, pool, mut rt) = busy_world(2_000);
        let (tx, rx) = crossbeam_channel::bounded(1);
        let answered = rt.block_on(async move {
            let ctx = ShardCtx::new(0, shared.clone(), pool, true).unwrap();
            monoio::spawn(dispatcher(ctx.clone()));
            monoio::spawn(ticker(ctx.clone()));
            let spinner = monoio::spawn(async move {
                let mut sent = false;
                for turn in 0..20_000_000u64 {
                    crate::rt::conn::feeds_first(&ctx);
                    yield_now().await;
                    if turn == 1_000 {
                        // From another thread, as the admin listener sends it.
                        let (shared, tx) = (shared.clone(), tx.clone());
                        std::thread::spawn(move || {
                            shared.hub.broadcast(|| {
                                crate::feed::hub::Control::Revoke(
                                    crate::auth::revocation::RevokeTarget::Sub("nobody".into()),
                                    tx.clone(),
                                )
                            })
                        })
                        .join()
                        .unwrap();
                        sent = true;
                    }
                    if sent && rx.try_recv().is_ok() {
                        return true;
                    }
                }
                false
            });
            spinner.await
        });
        assert!(
            answered,
            "the revocation was never answered while the shard stayed busy"
        );
    }

    /// A shard that never runs out of work never parks its runtime, and monoio runs its
    /// timers (the ticker's sleep) only when it parks. Here a task keeps yielding and
    /// calling `feeds_first`, as the reader and the writers do between connections and
    /// chunks during a reconnect storm; a socket that sends no byte must still be shut
    /// down at its first-byte deadline. Without the timers fired from `feeds_first` the
    /// deadline never comes and the spinner gives up.
    #[test]
    fn deadlines_fire_while_the_shard_never_parks() {
        let (shared, pool, mut rt) = busy_world(20);
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        theirs.set_nonblocking(true).unwrap();
        let shut = rt.block_on(async move {
            let ctx = ShardCtx::new(0, shared, pool, true).unwrap();
            monoio::spawn(ticker(ctx.clone()));
            let now = ctx.now_ms();
            let _ = ctx
                .core
                .borrow_mut()
                .register(now, crate::rt::io::Io::new(ours.into_raw_fd()));
            let spinner = monoio::spawn(async move {
                let mut byte = [0u8; 1];
                for _ in 0..20_000_000u64 {
                    crate::rt::conn::feeds_first(&ctx);
                    yield_now().await;
                    // SAFETY: reads at most one byte into a live buffer from an open socket.
                    let n = unsafe {
                        libc::recv(
                            theirs.as_raw_fd(),
                            byte.as_mut_ptr().cast(),
                            1,
                            libc::MSG_DONTWAIT,
                        )
                    };
                    if n == 0 {
                        return true; // our side was shut down: the deadline fired
                    }
                }
                false
            });
            spinner.await
        });
        assert!(
            shut,
            "the first-byte deadline never fired while the shard stayed busy"
        );
    }
}
