//! The connection pump: bytes between a socket and the sans-IO parts.
//!
//! A connection has two parts on its shard, a reader and a writer, and no task of its own
//! once it is established:
//! - the **handshake** is a task per connection (`run`): it owns the accepted `TcpStream`,
//!   parses the request, asks the gate, and writes the response or the `101`. After the
//!   `101` the connection owns the descriptor ([`Io`]) and the task ends.
//! - the **reader**: the descriptor joins the shard's ready set (one level-triggered epoll
//!   set, `rt::io::ReadySet`), and the shard's one reader task (`readers`) reads
//!   each connection that has input with `recv(MSG_DONTWAIT)` into the *shard's* read
//!   buffer. An idle connection pins no read buffer, no task and no pending operation;
//!   only the bytes of an incomplete frame are kept per connection. Publishers are read
//!   ahead of their turn when many connections have input (`read_feeds`).
//! - the **writer** writes inline when the session queued output (`kick`: one
//!   `send(MSG_DONTWAIT)` of the coalesced frames from the shard's loop, as an epoll server
//!   writes; on io_uring the kicks of one `carry_out` are staged and their sends go to
//!   the kernel up to 32 per system call, `flush_sends` with `rt::io::SendRing`); only
//!   when the socket is full, or for TLS and the close, does a writer task
//!   run, on a handle over the same descriptor (`rt::io::WriteHandle`), until the queue is
//!   empty. A writer's writes are `send(MSG_DONTWAIT)` too, at most `WRITE_CHUNK` each,
//!   with the shard's publishers read between them when their time has come
//!   (`feeds_first`); it waits for writability (an io_uring poll, or epoll) only when the
//!   socket is full.
//!
//! **TLS** (when `[tls]` is configured) is rustls driven sans-IO, not a stream wrapper: the
//! per-IP rate limit is charged at accept, before any TLS work (an address over its limit is
//! closed without a handshake, see `gate::pre_tls_rate`); the HTTP phase feeds received
//! ciphertext to the connection's `rustls::ServerConnection`, parses the plaintext it yields
//! and writes its handshake flights and the encrypted response with `write_all_fd`, all
//! under the same handshake deadline as plain HTTP; after the `101` the `ServerConnection`
//! moves into the `Conn`, the reader decrypts into the shard's `plain_buf` before the frame
//! decoder, and the writer encrypts the coalesced buffer it took with
//! [`Session::poll_transmit`]. The fan-out is untouched: frames are still encoded once and
//! shared; only the encryption is per connection.
//!
//! What the bytes mean is not decided here: after the `101` received bytes go to the shard's
//! core ([`crate::core::shard::ShardCore::handle_bytes`]), which decodes them into the
//! session and applies what it asks for; this module then carries out the core's effects
//! (`carry_out`): a `Kick` writes the connection's queued output (or stages it for the
//! batch, or starts its writer task), a `Shutdown` shuts its socket down, an `Audit` writes
//! the security log.
//!
//! Every error path ends the same way: `task_done`, which shuts the socket down (waking
//! the other part) and, when both parts are done, has the core free the slot, the
//! subscriptions, the timers and the per-user cap; the descriptor is closed when the last
//! holder of the connection lets go. Network input never panics: parsers
//! return errors, which become a status code or a close code for this connection only.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, IntoRawFd};
use std::rc::Rc;

use monoio::net::TcpStream;

use rustls::ServerConnection;

use crate::auth::seclog as sec;
use crate::core::shard::{ConnId, Effect};
use crate::gate::{self, Outcome, PeerRate};
use crate::proto::frame::{Decoder, DecoderConfig};
use crate::proto::http::{self, RequestLimits, Response};
use crate::rt::ctx::{ShardCtx, Staged};
use crate::rt::io::{
    Conn, ConnRef, Io, Read, TlsIn, WriteHandle, Writer, ready_key, ready_key_parts, recv, shutdown,
    tls_feed, tls_seal, write_all_fd, yield_now,
};
use crate::session::Session;

/// Largest write, inline from the shard's loop or in a writer task. A live stream's write
/// is far smaller; the bound keeps one connection's backlog (a history replay) from
/// holding the loop: the writer reads the shard's publishers between two of its writes
/// when their time has come (`feeds_first`).
const WRITE_CHUNK: usize = 64 * 1024;

pub async fn run(ctx: Rc<ShardCtx>, stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let fd = stream.as_raw_fd();
    // TLS: charge the rate limit before doing any TLS work.
    let mut peer_rate = PeerRate::Unchecked;
    let mut tls = None;
    if let Some(state) = ctx.shared.tls.as_ref() {
        peer_rate = gate::pre_tls_rate(&ctx.shared, peer.ip(), ctx.now_ms());
        if peer_rate == PeerRate::Refused {
            return;
        }
        match state.accept() {
            Ok(t) => tls = Some(Box::new(t)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start a TLS session");
                return;
            }
        }
    }
    let accepted_ms = ctx.now_ms();
    let (id, conn) = ctx.core.borrow_mut().register(accepted_ms, Io::new(fd));
    let (idx, generation) = (id.idx, id.generation);
    let admitted = ctx.core.borrow_mut().admit_pending(ctx.now_ms(), idx, peer.ip());
    carry_out(&ctx);
    if !admitted {
        task_done(&ctx, idx, generation, true);
        return;
    }
    // Boxed: the HTTP phase's state is freed once it is over instead of staying inline in
    // this (long-lived) future, which keeps an idle connection small.
    let pending = Pending { idx, accepted_ms };
    let admitted = Box::pin(handshake(&ctx, &stream, peer, peer_rate, &mut tls, pending)).await;
    ctx.core.borrow_mut().pending_done(idx);
    let Some((admitted, leftover)) = admitted else {
        task_done(&ctx, idx, generation, true);
        return;
    };
    // The writer's part starts parked.
    conn.borrow_mut().io.writer = Writer::Parked;
    // A plain function, so nothing of the admission (claims, strings) stays in this
    // future's state.
    open_session(&ctx, &conn, id, admitted, tls);
    // From here the connection owns its descriptor (closed when it is freed), and the
    // handshake's stream lets go of it without closing (on epoll this also takes it out
    // of the runtime's poller: the shard's ready set watches it instead).
    let fd = stream.into_raw_fd();
    {
        // The welcome is queued: out it goes (inline, normally).
        let mut c = conn.borrow_mut();
        c.io.take_ownership();
        kick(&ctx, idx, &conn, &mut c, false);
    }
    carry_out(&ctx);
    // The reader's part: the descriptor joins the shard's ready set, where the shard's one
    // reader task (`readers`) finds it when input comes. This task ends here: an idle
    // connection keeps no task, no future and no pending operation.
    if !ctx.ready.add(fd, ready_key(idx, generation)) {
        tracing::warn!("cannot watch a connection for input (epoll: out of memory or max_user_watches)");
        task_done(&ctx, idx, generation, true);
        return;
    }
    conn.borrow_mut().io.reading = true;
    let publisher = conn
        .borrow()
        .session
        .as_ref()
        .is_some_and(|s| s.claims().has_role(crate::auth::jwt::Role::Publisher));
    if publisher {
        ctx.add_feed(idx, generation);
    }
    if !leftover.is_empty() {
        let mut data = leftover;
        process(&ctx, &conn, idx, &mut data);
        reader_check(&ctx, &conn, idx, generation, false);
    } else {
        // A wave of upgrades (a reconnect storm) must not hold the live stream either.
        feeds_first(&ctx);
    }
}

/// Connections read per batch of the shard's ready set before the reader task lets the
/// shard's other tasks (dispatcher, writers, ticker, handshakes) run.
const READY_BATCH: usize = 128;

/// The shard's one reader task, for every established connection of the shard: waits
/// until the ready set has input, then reads each ready connection once (`recv` of up to
/// the shard's 64 KiB read buffer, `MSG_DONTWAIT`) and has the core handle the bytes.
/// A connection with more waiting stays ready (the set is level-triggered) and is read
/// again in the next batch, after the other tasks had a turn: a client that keeps its
/// socket full gets one buffer per batch and cannot hold the loop.
pub(crate) async fn readers(ctx: Rc<ShardCtx>) {
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; READY_BATCH];
    loop {
        let n = ctx.ready.collect(&mut events);
        if n == 0 {
            if let Err(e) = ctx.ready.readable().await {
                // Not expected for an epoll descriptor; back off rather than spin.
                tracing::warn!(error = %e, "waiting on the shard's ready set failed");
                monoio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            continue;
        }
        ctx.note_work();
        for ev in &events[..n] {
            let (idx, generation) = ready_key_parts(ev.u64);
            read_ready(&ctx, idx, generation);
            feeds_first(&ctx);
        }
        yield_now().await;
    }
}

/// Feeds first: when [`crate::rt::ctx::FEEDS_EVERY_NS`] have passed since the shard last
/// read its publishers, reads them now ([`read_feeds`]) and dispatches the ticks waiting,
/// whatever else is queued; and when the ticker is late, fires the due deadlines
/// ([`fire_timers`]). Called after each connection a reader batch handles, after each
/// upgrade, before each handshake's token check, and after each `send` of a writer task.
/// In a reconnect storm a thousand connections want the loop at once (their token checks,
/// their subscribes, the history each replays, about 50-200 µs apiece); read in turn, the
/// publisher's next ticks, and so every staying subscriber's, waited for all of them
/// (perf/RESULTS.md, issue 19). Bounded by time rather than by a count of connections, so
/// a burst of expensive ones (a 60 KB replay each) delays the live stream no more than a
/// burst of cheap ones. Costs a clock read when not due; a shard without publishers reads
/// none.
pub(crate) fn feeds_first(ctx: &Rc<ShardCtx>) {
    let mut pace = ctx.feeds_pace.get();
    let due = pace.due(crate::metrics::mono_ns());
    ctx.feeds_pace.set(pace);
    if !due {
        return;
    }
    read_feeds(ctx);
    // Control messages too (reauth results, revocations, drain): they come from other
    // threads, whose wake-ups the runtime, like its timers, takes only when it parks.
    let inbox = ctx.shared.hub.inbox(ctx.id);
    if !inbox.ticks.is_empty() || !inbox.control_rx.is_empty() {
        dispatch_pass(ctx);
    }
    // The ticker's sleep should have ended: the runtime has not run its timers (it has
    // not parked), so the core's deadlines are fired from here, a slice per millisecond.
    let now = ctx.now_ms();
    if now > ctx.timers_due.get() {
        ctx.timers_due.set(now);
        fire_timers(ctx, now);
    }
}

/// Fires up to [`BURST_SLICE`](crate::rt::ctx::BURST_SLICE) of the core's timer events
/// due at `now` (heartbeats, reauth deadlines, slow-consumer cuts, hard drops) and carries
/// out their effects; true when more are due. The ticker calls it when its sleep ends; so
/// does [`feeds_first`] when the ticker is late, since monoio runs its timers only when it
/// parks, and it parks only once no task is runnable: a shard kept busy (a reconnect
/// storm's writers draining replays, each yielding between chunks) held the ticker back
/// by up to 2.8 s.
pub(crate) fn fire_timers(ctx: &Rc<ShardCtx>, now: u64) -> bool {
    ctx.core.borrow_mut().advance_timers(now);
    let more = ctx.core.borrow_mut().fire_due(now, crate::rt::ctx::BURST_SLICE);
    carry_out(ctx);
    more
}

/// Reads the shard's publishers (connections whose token has the publisher role, up to
/// [`crate::rt::ctx::MAX_FEEDS`]) once each, whether or not their turn in the ready set
/// has come. A publisher with nothing waiting costs a `recv` that finds the socket empty.
fn read_feeds(ctx: &Rc<ShardCtx>) {
    let feeds = ctx.feeds();
    for &(idx, generation) in feeds.iter() {
        read_ready(ctx, idx, generation);
    }
}

/// One ready connection: read once, hand the bytes to the core, and end the reader's part
/// when the input is over or the connection is done.
fn read_ready(ctx: &Rc<ShardCtx>, idx: usize, generation: u32) {
    let Some(conn) = ctx.core.borrow().get(ConnId { idx, generation }) else {
        // Freed since the batch was collected (its descriptor left the set when closed).
        return;
    };
    let (fd, tls) = {
        let c = conn.borrow();
        if !c.io.reading {
            return;
        }
        (c.io.fd, c.io.tls.is_some())
    };
    if reader_check(ctx, &conn, idx, generation, false) {
        return;
    }
    let eof = {
        let mut buf = ctx.read_buf.borrow_mut();
        match recv(fd, &mut buf) {
            Read::Data(n) if tls => !decrypt_and_process(ctx, &conn, idx, &buf[..n]),
            Read::Data(n) => {
                process(ctx, &conn, idx, &mut buf[..n]);
                false
            }
            Read::WouldBlock => false,
            Read::Eof => true,
        }
    };
    reader_check(ctx, &conn, idx, generation, eof);
}

/// Ends the reader's part when the input is over (`eof`), the connection is dead, or the
/// close handshake completed in both directions; true when it has ended.
fn reader_check(ctx: &Rc<ShardCtx>, conn: &ConnRef, idx: usize, generation: u32, eof: bool) -> bool {
    let fd = {
        let mut c = conn.borrow_mut();
        if !c.io.reading {
            return true;
        }
        if !(eof || c.dead || (c.peer_closed && c.io.tasks <= 1)) {
            return false;
        }
        c.io.reading = false;
        c.io.fd
    };
    ctx.ready.remove(fd);
    ctx.remove_feed(idx, generation);
    task_done(ctx, idx, generation, true);
    true
}

/// The connection becomes a session: verified identity, decoder, timers, user slot.
fn open_session(
    ctx: &ShardCtx,
    conn: &ConnRef,
    id: ConnId,
    admitted: Box<gate::Admitted>,
    tls: Option<Box<ServerConnection>>,
) {
    let now = ctx.now_ms();
    let a = *admitted;
    let mut session = Session::new(ctx.shared.node.session.clone(), a.claims, a.client_ip, now);
    let max = ctx.shared.cfg.limits.max_message_bytes;
    let mut decoder = Decoder::new(DecoderConfig {
        max_message_bytes: max,
        max_frame_bytes: max,
    });
    if let Some(d) = a.deflate {
        decoder = decoder.with_inflate(d.client_window_bits, d.client_no_context_takeover);
        session.set_deflate(d, ctx.shared.cfg.compression.level);
    }
    {
        let mut c = conn.borrow_mut();
        c.slot = Some(a.slot);
        c.io.tls = tls;
        c.io.tasks = 2;
    }
    ctx.core.borrow_mut().open(id, session, decoder);
}

/// A connection in the upgrade, for its deadlines.
struct Pending {
    idx: usize,
    accepted_ms: u64,
}

/// The HTTP phase. Returns the admitted identity and any bytes after the request.
/// With TLS, `req_buf` holds decrypted bytes and the TLS handshake runs inside this loop
/// (its flights are written as rustls produces them), so the handshake deadline armed at
/// accept bounds both.
async fn handshake(
    ctx: &Rc<ShardCtx>,
    stream: &TcpStream,
    peer: SocketAddr,
    peer_rate: PeerRate,
    tls: &mut Option<Box<ServerConnection>>,
    pending: Pending,
) -> Option<(Box<gate::Admitted>, Vec<u8>)> {
    let limits = RequestLimits {
        max_head_bytes: ctx.shared.cfg.limits.max_head_bytes,
        max_headers: ctx.shared.cfg.limits.max_headers,
        ..RequestLimits::default()
    };
    let cap = limits.max_head_bytes + limits.max_body_bytes;
    let mut req_buf: Vec<u8> = Vec::new();
    // Wait for readability only after a read found the socket empty: a client that keeps
    // the socket full is read once per turn (see the yield below), never in a tight loop.
    let mut wait = true;
    let (consumed, req) = loop {
        if wait && stream.readable(false).await.is_err() {
            return None;
        }
        // One read per turn, at most what the request may still need: a head that has not
        // ended within `max_head_bytes` is refused by the parser below as soon as those bytes
        // are here, so an endless head costs one bounded buffer and a few reads, and the
        // handshake deadline (armed at accept, never extended by arriving bytes) can fire
        // between turns.
        let mut tls_end = None;
        let r = {
            let mut buf = ctx.read_buf.borrow_mut();
            let room = match tls {
                // Ciphertext: rustls bounds what it buffers; the plaintext is capped below.
                Some(_) => buf.len(),
                None => cap.saturating_sub(req_buf.len()).clamp(1, buf.len()),
            };
            match recv(stream.as_raw_fd(), &mut buf[..room]) {
                Read::Data(n) => {
                    match tls.as_deref_mut() {
                        Some(t) => match tls_feed(t, &buf[..n], &mut req_buf) {
                            TlsIn::Ok => {}
                            other => tls_end = Some(other),
                        },
                        None => req_buf.extend_from_slice(&buf[..n]),
                    }
                    Read::Data(n)
                }
                other => other,
            }
        };
        match r {
            Read::Eof => return None,
            Read::WouldBlock => {
                wait = true;
                continue;
            }
            _ => {}
        }
        // The first byte: the short first-byte deadline gives way to the handshake
        // deadline, counted from accept.
        ctx.core
            .borrow_mut()
            .pending_heard(pending.idx, pending.accepted_ms);
        if let Some(t) = tls.as_deref_mut() {
            // Handshake flights (and, after an error, the alert) go out as soon as rustls
            // has them.
            if t.wants_write() {
                let mut out = Vec::new();
                let sealed = tls_seal(t, &[], false, &mut out);
                if sealed.is_err() || write_all_fd(stream, &out).await.is_err() {
                    return None;
                }
            }
            match tls_end {
                None => {}
                Some(TlsIn::Failed(e)) => {
                    ctx.shared.security.counters.count(
                        sec::Event::Handshake,
                        sec::Outcome::Rejected,
                        sec::Reason::Tls,
                    );
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return None;
                }
                Some(_) => return None,
            }
        }
        if !req_buf.is_empty() {
            match http::try_parse(&req_buf, &limits) {
                Ok(Some(done)) => break done,
                Ok(None) if req_buf.len() < cap => {}
                Ok(None) => {
                    respond(stream, tls, Response::text(400, "request too large\n")).await;
                    return None;
                }
                Err(e) => {
                    ctx.shared.security.counters.count(
                        sec::Event::Handshake,
                        sec::Outcome::Rejected,
                        sec::Reason::MalformedHttp,
                    );
                    respond(stream, tls, Response::text(e.status(), "bad request\n")).await;
                    return None;
                }
            }
        }
        // More may be waiting: read again after the other tasks of this shard had a turn.
        wait = false;
        yield_now().await;
    };
    // The token check (tens of µs) runs back to back for every request of a storm that
    // arrived in the same turn: the live stream first.
    feeds_first(ctx);
    if ctx.shared.bus.enabled()
        && let Some(ticket) = gate::ticket_to_redeem(&ctx.shared, &req)
    {
        // `[cluster]`: the ticket may come from any node; the bus says whether it is
        // still unused (and takes it), then the gate redeems it here as usual.
        take_ticket(&ctx.shared, &ticket).await;
    }
    let now = ctx.now_ms();
    match gate::handle_public_with(&ctx.shared, &req, peer.ip(), now, peer_rate) {
        Outcome::Respond(resp) => {
            respond(stream, tls, resp).await;
            None
        }
        Outcome::TicketIssued {
            resp,
            ticket,
            token,
            ttl_ms,
        } => {
            let resp = if put_ticket(&ctx.shared, &ticket, &token, ttl_ms).await {
                resp
            } else {
                ctx.shared.tickets.forget(&ticket);
                gate::bus_unavailable(&resp)
            };
            respond(stream, tls, resp).await;
            None
        }
        Outcome::Upgrade(adm) => {
            let ext = adm.deflate.map(|a| a.response());
            let bytes = http::switching_protocols(&adm.accept, adm.protocol, ext.as_deref());
            if send(stream, tls, bytes, false).await.is_err() {
                return None;
            }
            req_buf.drain(..consumed);
            Some((adm, req_buf))
        }
    }
}

/// Write `bytes` in the HTTP phase, through TLS when the connection has it.
async fn send(
    stream: &TcpStream,
    tls: &mut Option<Box<ServerConnection>>,
    bytes: Vec<u8>,
    close: bool,
) -> std::io::Result<()> {
    match tls.as_deref_mut() {
        None => write_all_fd(stream, &bytes).await,
        Some(t) => {
            let mut out = Vec::with_capacity(bytes.len() + 64);
            tls_seal(t, &bytes, close, &mut out)?;
            write_all_fd(stream, &out).await
        }
    }
}

async fn respond(stream: &TcpStream, tls: &mut Option<Box<ServerConnection>>, resp: Response) {
    let _ = send(stream, tls, resp.to_bytes(), true).await;
    shutdown(stream.as_raw_fd(), libc::SHUT_WR);
}

/// TLS: decrypt received bytes into the shard's `plain_buf` and process the plaintext.
/// Returns `false` when the connection's input is over (close_notify or a TLS error).
fn decrypt_and_process(ctx: &Rc<ShardCtx>, conn: &ConnRef, idx: usize, cipher: &[u8]) -> bool {
    let mut plain = ctx.plain_buf.borrow_mut();
    plain.clear();
    let fed = {
        let mut c = conn.borrow_mut();
        let Some(t) = c.io.tls.as_deref_mut() else {
            return false;
        };
        let fed = tls_feed(t, cipher, &mut plain);
        if t.wants_write() {
            // Post-handshake messages (key updates, alerts) go out with the next write.
            kick(ctx, idx, conn, &mut c, false);
        }
        fed
    };
    if !plain.is_empty() {
        process(ctx, conn, idx, &mut plain);
    }
    if plain.capacity() > 1024 * 1024 {
        *plain = Vec::new();
    }
    match fed {
        TlsIn::Ok => true,
        TlsIn::Closed => false,
        TlsIn::Failed(e) => {
            tracing::debug!(error = %e, "TLS error on a live connection");
            false
        }
    }
}

/// Feed received bytes to the core (which decodes them into the session), keeping the
/// start of a frame split across reads in the connection's `rx_partial`.
fn process(ctx: &Rc<ShardCtx>, conn: &ConnRef, idx: usize, data: &mut [u8]) {
    let (generation, mut partial) = {
        let mut c = conn.borrow_mut();
        (
            c.generation,
            c.io.rx_partial.take().map(|b| *b).unwrap_or_default(),
        )
    };
    let verifier = crate::rt::verify::ConnVerifier {
        shared: &ctx.shared,
        pool: &ctx.verify_pool,
        shard: ctx.id,
        idx,
        generation,
    };
    ctx.core
        .borrow_mut()
        .handle_bytes(ctx.now_ms(), idx, data, &mut partial, &verifier);
    conn.borrow_mut().io.rx_partial = (!partial.is_empty()).then(|| Box::new(partial));
    carry_out(ctx);
    dispatch_waiting(ctx);
}

/// Output is queued for connection `idx` (or it must end): start its writer unless one
/// is already running (a running writer looks at the queue again after each write, so
/// it needs no wake-up). `batch`: the caller is [`carry_out`], which sends what this
/// stages ([`flush_sends`]) before it returns.
pub(crate) fn kick(ctx: &Rc<ShardCtx>, idx: usize, conn: &ConnRef, c: &mut Conn, batch: bool) {
    if c.io.writer != Writer::Parked {
        return;
    }
    // Most kicks find a socket with room: write right here (or in the pass's batch), no
    // task, no io_uring op of the runtime.
    let first = match send_inline(ctx, idx, conn, c, batch) {
        Inline::Sent | Inline::Idle | Inline::Batched => return,
        Inline::Rest(b) => Some(b),
        Inline::NotTried => None,
    };
    c.io.writer = Writer::Running;
    monoio::spawn(writer(ctx.clone(), conn.clone(), idx, c.generation, first));
}

/// What [`send_inline`] did.
enum Inline {
    /// Everything queued went to the kernel: the writer stays parked.
    Sent,
    /// Part of it did (or the socket was full): the writer takes over with the rest.
    Rest(Vec<u8>),
    /// Not for this path (TLS, a close on its way, a dead connection): the writer does it.
    NotTried,
    /// Nothing queued (an earlier kick of the same turn sent it all).
    Idle,
    /// Prepared for the shard's next batch of sends ([`flush_sends`]).
    Batched,
}

/// The fan-out's common case done without a writer task: a plain connection whose
/// writer is parked, with output queued and no close pending, gets its coalesced frames
/// in one `send(MSG_DONTWAIT)` from the shard's loop, as an epoll server writes. What the
/// kernel does not take (a full socket) goes to a writer task, which waits for room as
/// before. Compared with spawning the writer for every kick this saves a task, an
/// io_uring operation and its completion per write (perf/RESULTS.md, issue 17).
///
/// On io_uring, a kick from [`carry_out`] (`batch`) stages the write instead: the pass's
/// writes then go to the kernel [`SEND_BATCH`](crate::rt::io::SEND_BATCH) at a time in one
/// system call ([`flush_sends`]), and until then the connection's writer counts as
/// running (the core emits no more kicks for it; the flush looks at its queue again).
fn send_inline(ctx: &Rc<ShardCtx>, idx: usize, conn: &ConnRef, c: &mut Conn, batch: bool) -> Inline {
    if c.dead || c.io.tls.is_some() {
        return Inline::NotTried;
    }
    let Some(s) = c.session.as_mut() else {
        return Inline::NotTried;
    };
    if s.is_closing() {
        return Inline::NotTried;
    }
    if !s.has_output() {
        return Inline::Idle;
    }
    let mut buf = ctx.take_buffer();
    let t = s.poll_transmit_with(&mut buf, WRITE_CHUNK, &mut ctx.tick_deflate.borrow_mut());
    if buf.is_empty() {
        ctx.put_buffer(buf);
        return Inline::NotTried;
    }
    ctx.note_tick_write(t.oldest_tick_ns);
    if batch && ctx.send_ring.borrow().is_some() {
        c.io.writer = Writer::Running;
        ctx.staged.borrow_mut().push(Staged {
            conn: conn.clone(),
            idx,
            buf,
        });
        return Inline::Batched;
    }
    let sent = crate::rt::io::send_now(c.io.fd, &buf);
    let more = s.has_output();
    match after_send(ctx, buf, sent, more) {
        None => Inline::Sent,
        Some(rest) if rest.is_empty() => {
            ctx.put_buffer(rest);
            Inline::NotTried
        }
        Some(rest) => Inline::Rest(rest),
    }
}

/// After a write of `buf` of which the kernel took `sent` bytes: None when the connection's
/// writer may park (all of it went and nothing more is queued; the buffer is back in the
/// pool), else what the writer task must send first (empty when only more queued output
/// is left for it).
fn after_send(ctx: &ShardCtx, mut buf: Vec<u8>, sent: usize, more: bool) -> Option<Vec<u8>> {
    if sent >= buf.len() && !more {
        ctx.put_buffer(buf);
        return None;
    }
    buf.drain(..sent.min(buf.len()));
    Some(buf)
}

/// Sends the staged writes ([`send_inline`]), [`SEND_BATCH`](crate::rt::io::SEND_BATCH)
/// per system call, and settles each connection's writer as a kick would have: parked
/// when all of it went and nothing more is queued, else a writer task started with the
/// rest (a full socket, more output, or a connection that died meanwhile).
pub(crate) fn flush_sends(ctx: &Rc<ShardCtx>) {
    use crate::rt::io::SEND_BATCH;
    let mut staged = std::mem::take(&mut *ctx.staged.borrow_mut());
    if staged.is_empty() {
        *ctx.staged.borrow_mut() = staged;
        return;
    }
    let mut start = 0;
    while start < staged.len() {
        let end = staged.len().min(start + SEND_BATCH);
        let mut taken = [0usize; SEND_BATCH];
        {
            let mut items: [(std::os::fd::RawFd, &[u8]); SEND_BATCH] = [(-1, &[]); SEND_BATCH];
            for (item, w) in items.iter_mut().zip(&staged[start..end]) {
                *item = (w.conn.borrow().io.fd, &w.buf);
            }
            let items = &items[..end - start];
            let taken = &mut taken[..end - start];
            // Writes are staged only while the shard has a ring.
            if let Some(r) = ctx.send_ring.borrow_mut().as_mut() {
                r.send_each(items, taken);
            }
        }
        for (w, &sent) in staged[start..end].iter_mut().zip(&taken) {
            settle(ctx, w, sent);
        }
        start = end;
    }
    staged.clear();
    let mut slot = ctx.staged.borrow_mut();
    if slot.is_empty() {
        *slot = staged;
    }
}

/// A staged write went out (`sent` bytes of it): the connection's writer parks, or a
/// writer task takes over with the rest (see [`flush_sends`]).
fn settle(ctx: &Rc<ShardCtx>, w: &mut Staged, sent: usize) {
    let buf = std::mem::take(&mut w.buf);
    let mut c = w.conn.borrow_mut();
    // A connection that died since is handed to a writer, which ends its part.
    let more = c.dead || c.session.as_ref().is_none_or(|s| s.has_output());
    match after_send(ctx, buf, sent, more) {
        None => c.io.writer = Writer::Parked,
        Some(rest) => {
            let first = if rest.is_empty() {
                ctx.put_buffer(rest);
                None
            } else {
                Some(rest)
            };
            let generation = c.generation;
            monoio::spawn(writer(ctx.clone(), w.conn.clone(), w.idx, generation, first));
        }
    }
}

/// Carries out the effects the shard's core produced, in order. Called after every
/// `handle_*` call on the core, with no borrow of the core or of a connection held.
pub(crate) fn carry_out(ctx: &Rc<ShardCtx>) {
    let mut effects = std::mem::take(&mut *ctx.effects.borrow_mut());
    loop {
        ctx.core.borrow_mut().take_effects(&mut effects);
        if effects.is_empty() {
            break;
        }
        for e in effects.drain(..) {
            if !matches!(e, Effect::Kick(_)) {
                // Effects go out in order: the writes staged so far first.
                flush_sends(ctx);
            }
            match e {
                Effect::Kick(id) => {
                    // The hot path's one effect: one look-up, one borrow, then the spawn.
                    let conn = ctx.core.borrow().at(id.idx);
                    if let Some(conn) = conn {
                        let mut c = conn.borrow_mut();
                        if c.generation == id.generation {
                            kick(ctx, id.idx, &conn, &mut c, true);
                        }
                    }
                    if ctx.staged.borrow().len() >= crate::rt::io::SEND_BATCH {
                        flush_sends(ctx);
                    }
                }
                Effect::Shutdown(id) => {
                    let conn = ctx.core.borrow().get(id);
                    if let Some(conn) = conn {
                        shutdown(conn.borrow().io.fd, libc::SHUT_RDWR);
                    }
                }
                Effect::Audit(e) => ctx.shared.audit(&e.as_event()),
                Effect::StopAccepting => {
                    if let Some(c) = ctx.accept_cancel.borrow_mut().take() {
                        c.cancel();
                    }
                }
                Effect::RevokeDone { reply, closed } => {
                    let _ = reply.send(closed);
                }
            }
        }
        flush_sends(ctx);
    }
    *ctx.effects.borrow_mut() = effects;
}

/// One pass over the inbox: control messages, then up to [`DISPATCH_BUDGET`](crate::rt::ctx::DISPATCH_BUDGET) ticks to
/// the subscribers' queues, then their writes. True when more is queued. Run by the
/// dispatcher, and by a reader that just did a burst of work while ticks waited
/// ([`dispatch_waiting`]).
pub(crate) fn dispatch_pass(ctx: &Rc<ShardCtx>) -> bool {
    let inbox = ctx.shared.hub.inbox(ctx.id);
    for m in inbox.control_rx.try_iter().take(crate::rt::ctx::BURST_SLICE) {
        let now = ctx.now_ms();
        ctx.core.borrow_mut().handle_control(now, m);
        carry_out(ctx);
    }
    let now = ctx.now_ms();
    let mut n = 0;
    let mut delivered = 0u64;
    while n < crate::rt::ctx::DISPATCH_BUDGET {
        let Some(t) = inbox.ticks.pop() else { break };
        delivered += ctx.core.borrow_mut().handle_tick(now, &t) as u64;
        if ctx.one_in(64) {
            let us = crate::metrics::mono_ns().saturating_sub(t.accepted_ns) / 1000;
            ctx.shared.metrics.publish_to_dispatch.observe_us(us);
        }
        n += 1;
    }
    // Write to the subscribers that got something, once each for the whole pass
    // (in batches of sends, inline, or by starting their writers): a subscriber of
    // several of the pass's ticks gets them in one write.
    carry_out(ctx);
    let g = ctx.shared.metrics.shard(ctx.id);
    g.ticks_out
        .fetch_add(delivered, std::sync::atomic::Ordering::Relaxed);
    !inbox.ticks.is_empty() || !inbox.control_rx.is_empty()
}

/// Ticks first: called by a connection's reader after it handled what it read. When
/// ticks wait in the inbox they are dispatched now instead of after every other ready
/// task of the turn, so a burst of work on many connections at once (a reconnect storm
/// replaying history, a wave of subscribes) does not hold the live stream of everyone
/// else for the length of the burst (perf/RESULTS.md, issue 19's storm).
pub(crate) fn dispatch_waiting(ctx: &Rc<ShardCtx>) {
    if !ctx.shared.hub.inbox(ctx.id).ticks.is_empty() {
        dispatch_pass(ctx);
    }
}

/// One of the connection's tasks ended; when it was the last, the core frees the slot,
/// its subscriptions, its timers and its per-user cap. `force` shuts the socket down so
/// the other task ends too; the writer passes `false` after a graceful close so the
/// reader can still receive the peer's close frame.
pub(crate) fn task_done(ctx: &Rc<ShardCtx>, idx: usize, generation: u32, force: bool) {
    let id = ConnId { idx, generation };
    let Some(conn) = ctx.core.borrow().get(id) else {
        return;
    };
    {
        let mut c = conn.borrow_mut();
        c.io.tasks = c.io.tasks.saturating_sub(1);
        if force {
            c.dead = true;
            shutdown(c.io.fd, libc::SHUT_RDWR);
            kick(ctx, idx, &conn, &mut c, false);
        }
        if c.io.tasks > 0 {
            return;
        }
        // Every part has ended: no writer will start again.
        c.io.writer = Writer::None;
    }
    ctx.core.borrow_mut().handle_gone(id);
    carry_out(ctx);
}

/// Writes what the session queued, coalesced, until the queue is empty; then parks (the
/// next [`kick`] writes inline or starts a new run) and ends. It ends for good,
/// releasing the writer's part of the connection, when the connection is dead or its
/// close frame is out.
pub(crate) async fn writer(
    ctx: Rc<ShardCtx>,
    conn: ConnRef,
    idx: usize,
    generation: u32,
    first: Option<Vec<u8>>,
) {
    let fd = conn.borrow().io.fd;
    let Some(mut handle) = WriteHandle::new(ctx.uring, fd) else {
        // epoll: the runtime could not register the descriptor; the connection cannot write.
        if let Some(b) = first {
            ctx.put_buffer(b);
        }
        task_done(&ctx, idx, generation, true);
        return;
    };
    let mut graceful = false;
    // The rest of a write the kick began inline ([`send_inline`]): out first, in order.
    if let Some(rest) = first {
        let res = handle.write_all(&rest, || feeds_first(&ctx)).await;
        ctx.put_buffer(rest);
        if res.is_err() {
            task_done(&ctx, idx, generation, true);
            drop(handle);
            return;
        }
    }
    loop {
        // Buffers come from the shard's pool and go back after the write: a busy
        // connection never regrows one, an idle one holds none.
        let mut buf;
        let mut sealed = Vec::new();
        let oldest_tick;
        let closing_done;
        let encrypted;
        {
            let mut c = conn.borrow_mut();
            if c.dead {
                break;
            }
            let c = &mut *c;
            let Some(s) = c.session.as_mut() else { break };
            if !s.has_output() && !c.io.tls.as_ref().is_some_and(|t| t.wants_write()) {
                c.io.writer = Writer::Parked;
                return;
            }
            buf = ctx.take_buffer();
            let t = s.poll_transmit_with(&mut buf, WRITE_CHUNK, &mut ctx.tick_deflate.borrow_mut());
            oldest_tick = t.oldest_tick_ns;
            closing_done = t.done;
            encrypted = match c.io.tls.as_deref_mut() {
                Some(t) => {
                    // The frames were encoded once for every subscriber; only this step
                    // is per connection.
                    sealed = ctx.take_buffer();
                    if tls_seal(t, &buf, closing_done, &mut sealed).is_err() {
                        ctx.put_buffer(buf);
                        ctx.put_buffer(sealed);
                        break;
                    }
                    true
                }
                None => false,
            };
        }
        let out = if encrypted {
            std::mem::take(&mut sealed)
        } else {
            std::mem::take(&mut buf)
        };
        let mut failed = false;
        let out = if out.is_empty() {
            out
        } else {
            ctx.note_tick_write(oldest_tick);
            failed = handle.write_all(&out, || feeds_first(&ctx)).await.is_err();
            out
        };
        ctx.put_buffer(out);
        ctx.put_buffer(buf);
        if failed {
            break;
        }
        // No yield between chunks: the writer goes on until its queue is empty or its
        // socket full (then it waits for room), as it always has; the publishers and the
        // due deadlines are served between its sends (`feeds_first`). Yielding after each
        // chunk put a thousand replaying writers' turns between the reader's, and the
        // staying subscribers' p99 in a reconnect storm rose (perf/RESULTS.md, issue 19).
        if closing_done {
            // Our close frame is out. If the peer closed first, the handshake is complete
            // and the server closes TCP first (RFC 6455 7.1.1). Otherwise half-close and let
            // the reader wait for the peer's close frame (the hard-drop timer bounds that).
            if !conn.borrow().peer_closed {
                shutdown(fd, libc::SHUT_WR);
                graceful = true;
            }
            break;
        }
    }
    // The handle is released before `conn`: the connection (which owns the descriptor)
    // outlives the alias.
    task_done(&ctx, idx, generation, !graceful);
    drop(handle);
}

/// `[cluster]`: puts a ticket issued here on the bus, sealed with a key only the ticket
/// gives (see [`crate::bus::seal_token`]). False when the bus could not take it.
async fn put_ticket(shared: &crate::state::Shared, ticket: &str, token: &str, ttl_ms: u64) -> bool {
    let Some(sealed) = crate::bus::seal_token(ticket, token) else {
        return false;
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    let op = crate::bus::TicketOp::Put {
        key: crate::bus::ticket_key(ticket),
        sealed,
        ttl_ms,
        reply: tx,
    };
    shared.bus.ticket(op) && rx.await.unwrap_or(false)
}

/// `[cluster]`: takes a ticket off the bus before the gate redeems it. Taken (it was
/// unused): the token it stands for is verified again (signature, expiry, revocation)
/// and the ticket is held here for this one redemption. Not taken (used elsewhere,
/// expired, or the bus cannot say): it is dropped here too, so the gate refuses it.
async fn take_ticket(shared: &crate::state::Shared, ticket: &str) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let op = crate::bus::TicketOp::Take {
        key: crate::bus::ticket_key(ticket),
        reply: tx,
    };
    let sealed = if shared.bus.ticket(op) {
        rx.await.ok().flatten()
    } else {
        None
    };
    let now = shared.now_ms();
    let claims = sealed
        .and_then(|s: Vec<u8>| crate::bus::open_token(ticket, &s))
        .and_then(|token| shared.verify_token(&token, now).ok());
    match claims {
        Some(c) => {
            if !shared.tickets.holds(ticket) {
                // Redeemed by the gate right after this; held for a second at most.
                shared.tickets.admit(ticket, c, now + 1000);
            }
        }
        None => shared.tickets.forget(ticket),
    }
}
