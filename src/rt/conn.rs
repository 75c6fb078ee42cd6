//! The connection pump: bytes between a socket and the sans-IO parts.
//!
//! A connection runs as two tasks on its shard:
//! - the **reader** owns the accepted `TcpStream`. It waits for readiness (an io_uring
//!   `PollAdd`) and then reads with `recv(MSG_DONTWAIT)` into the *shard's* read buffer, so an
//!   idle connection pins no read buffer at all; only the bytes of an incomplete frame are
//!   kept per connection. During the HTTP phase it parses the request, asks the gate, and
//!   writes the response or the `101`.
//! - the **writer** owns a second handle on the same socket (on io_uring an alias of the
//!   descriptor, since io_uring writes need the stream by `&mut`; on epoll the reader's
//!   stream itself, written with `send(2)`). It sleeps until the session's outbound
//!   queue has frames, coalesces everything queued into one buffer and submits one write;
//!   on io_uring the writes of every connection woken in the same loop turn go to the
//!   kernel in one `io_uring_enter`; on epoll each is a `send(2)` and the writer yields
//!   between writes.
//!
//! **TLS** (when `[tls]` is configured) is rustls driven sans-IO, not a stream wrapper: the
//! per-IP rate limit is charged at accept, before any TLS work (an address over its limit is
//! closed without a handshake, see `gate::pre_tls_rate`); the HTTP phase feeds received
//! ciphertext to the connection's `rustls::ServerConnection`, parses the plaintext it yields
//! and writes its handshake flights and the encrypted response with `write_all_fd`, all
//! under the same handshake deadline as plain HTTP; after the `101` the `ServerConnection`
//! moves into the `Conn`, the reader decrypts into the shard's `plain_buf` before the frame
//! decoder, and the writer encrypts the coalesced buffer after `drain_stamped`. The fan-out is
//! untouched: frames are still encoded once and shared; only the encryption is per
//! connection.
//!
//! Every error path ends the same way: `ShardCtx::task_done`, which shuts the socket down
//! (waking the other task) and, when both tasks are gone, frees the slot, the
//! subscriptions, the timers and the per-user cap. Network input never panics: parsers
//! return errors, which become a status code or a close code for this connection only.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::rc::Rc;

use monoio::io::AsyncWriteRentExt;
use monoio::net::TcpStream;

use rustls::ServerConnection;

use crate::gate::{self, Outcome, PeerRate};
use crate::proto::frame::{Decoder, DecoderConfig};
use crate::proto::http::{self, RequestLimits, Response};
use crate::rt::shard::{ConnRef, ShardCtx, shutdown};
use crate::session::Session;

/// Largest coalesced write. Bounded so one connection cannot hog a loop turn.
const MAX_WRITE: usize = 256 * 1024;

enum Read {
    Data(usize),
    WouldBlock,
    Eof,
}

fn recv(fd: i32, buf: &mut [u8]) -> Read {
    loop {
        // SAFETY: `buf` is a valid, exclusively borrowed byte slice for its whole length;
        // recv writes at most `buf.len()` bytes into it and returns how many it wrote.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n > 0 {
            return Read::Data(n as usize);
        }
        if n == 0 {
            return Read::Eof;
        }
        match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) => return Read::WouldBlock,
            _ => return Read::Eof,
        }
    }
}

/// Outcome of feeding received ciphertext to rustls.
enum TlsIn {
    /// Everything consumed; any plaintext was appended.
    Ok,
    /// The peer sent `close_notify`: no more data will come.
    Closed,
    /// A TLS protocol error (rustls has queued an alert for the peer).
    Failed(String),
}

/// Feed `data` to rustls and append the plaintext it yields to `plain`.
fn tls_feed(tls: &mut ServerConnection, mut data: &[u8], plain: &mut Vec<u8>) -> TlsIn {
    use std::io::BufRead as _;
    while !data.is_empty() {
        if let Err(e) = tls.read_tls(&mut data) {
            // Backpressure cannot happen (plaintext is drained after every record batch),
            // so this is an oversized or malformed stream.
            return TlsIn::Failed(e.to_string());
        }
        if let Err(e) = tls.process_new_packets() {
            return TlsIn::Failed(e.to_string());
        }
        loop {
            let mut rd = tls.reader();
            match rd.fill_buf() {
                Ok([]) => return TlsIn::Closed,
                Ok(chunk) => {
                    let n = chunk.len();
                    plain.extend_from_slice(chunk);
                    rd.consume(n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => return TlsIn::Closed,
            }
        }
    }
    TlsIn::Ok
}

/// Encrypt `plain` (and a `close_notify` when `close`), appending the records to `out`.
fn tls_seal(tls: &mut ServerConnection, plain: &[u8], close: bool, out: &mut Vec<u8>) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut off = 0;
    loop {
        while tls.wants_write() {
            tls.write_tls(out)?;
        }
        if off >= plain.len() {
            break;
        }
        // rustls bounds its pending ciphertext; write_tls above empties it each round.
        let n = tls.writer().write(&plain[off..])?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        off += n;
    }
    if close {
        tls.send_close_notify();
        while tls.wants_write() {
            tls.write_tls(out)?;
        }
    }
    Ok(())
}

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
    let (idx, generation, conn) = ctx.register(fd);
    if !ctx.admit_pending(idx, peer.ip()) {
        ctx.task_done(idx, generation, true);
        return;
    }
    // Boxed: the HTTP phase's state is freed once it is over instead of staying inline in
    // this (long-lived) future, which keeps an idle connection small.
    let pending = Pending {
        idx,
        conn: &conn,
        accepted_ms,
    };
    let admitted = Box::pin(handshake(&ctx, &stream, peer, peer_rate, &mut tls, pending)).await;
    ctx.pending.borrow_mut().remove(idx);
    let Some((admitted, leftover)) = admitted else {
        ctx.task_done(idx, generation, true);
        return;
    };
    let stream = Rc::new(stream);
    let Some(whandle) = WriteHandle::new(&ctx, &stream) else {
        ctx.task_done(idx, generation, true);
        return;
    };
    // A plain function, so nothing of the admission (claims, strings) stays in this
    // long-lived future's state while the reader waits.
    open_session(&ctx, &conn, idx, admitted, tls);
    monoio::spawn(writer(ctx.clone(), conn.clone(), idx, generation, whandle));
    if !leftover.is_empty() {
        let mut data = leftover;
        process(&ctx, &conn, idx, &mut data);
    }
    // The reader is a task of its own: this future's state (the admission's locals keep
    // their storage until the end of the function, about 0.9 KiB) is freed here, and an
    // idle connection keeps only the reader's ~0.2 KiB future.
    monoio::spawn(reader_task(ctx, stream, conn, idx, generation));
}

async fn reader_task(ctx: Rc<ShardCtx>, stream: Rc<TcpStream>, conn: ConnRef, idx: usize, generation: u32) {
    reader(&ctx, &stream, &conn, idx).await;
    ctx.task_done(idx, generation, true);
}

/// The connection becomes a session: verified identity, decoder, timers, user slot.
fn open_session(
    ctx: &ShardCtx,
    conn: &ConnRef,
    idx: usize,
    admitted: Box<gate::Admitted>,
    tls: Option<Box<ServerConnection>>,
) {
    let now = ctx.now_ms();
    let a = *admitted;
    let session = Session::new(ctx.shared.session_cfg.clone(), a.claims, a.client_ip, now);
    let max = ctx.shared.cfg.limits.max_message_bytes;
    let decoder = Decoder::new(DecoderConfig {
        max_message_bytes: max,
        max_frame_bytes: max,
    });
    let mut c = conn.borrow_mut();
    c.slot = Some(a.slot);
    c.tls = tls;
    ctx.open(idx, &mut c, session, decoder);
}

/// A connection in the upgrade, for its deadlines.
struct Pending<'a> {
    idx: usize,
    conn: &'a ConnRef,
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
    pending: Pending<'_>,
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
        ctx.pending_heard(pending.idx, pending.conn, pending.accepted_ms);
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
                    ctx.shared.sec_counters.inc("handshake", "rejected", "tls");
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
                    ctx.shared
                        .sec_counters
                        .inc("handshake", "rejected", "malformed_http");
                    respond(stream, tls, Response::text(e.status(), "bad request\n")).await;
                    return None;
                }
            }
        }
        // More may be waiting: read again after the other tasks of this shard had a turn.
        wait = false;
        crate::rt::shard::yield_now().await;
    };
    let now = ctx.now_ms();
    match gate::handle_public_with(&ctx.shared, &req, peer.ip(), now, peer_rate) {
        Outcome::Respond(resp) => {
            respond(stream, tls, resp).await;
            None
        }
        Outcome::Upgrade(adm) => {
            let bytes = http::switching_protocols(&adm.accept, adm.protocol);
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

/// Writes through a shared reference: the reader holds the stream by `&`, so the HTTP
/// phase writes with `send` after waiting for writability (the response is small and the
/// socket buffer empty, so this normally completes at once).
async fn write_all_fd(stream: &TcpStream, bytes: &[u8]) -> std::io::Result<()> {
    let fd = stream.as_raw_fd();
    let mut off = 0;
    while off < bytes.len() {
        // SAFETY: the pointer/length pair denotes the initialised tail of `bytes`.
        let n = unsafe {
            libc::send(
                fd,
                bytes[off..].as_ptr().cast(),
                bytes.len() - off,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n > 0 {
            off += n as usize;
            continue;
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) => stream.writable(false).await?,
            _ => return Err(err),
        }
    }
    Ok(())
}

async fn respond(stream: &TcpStream, tls: &mut Option<Box<ServerConnection>>, resp: Response) {
    let _ = send(stream, tls, resp.to_bytes(), true).await;
    shutdown(stream.as_raw_fd(), libc::SHUT_WR);
}

async fn reader(ctx: &Rc<ShardCtx>, stream: &TcpStream, conn: &ConnRef, idx: usize) {
    let fd = stream.as_raw_fd();
    let tls = conn.borrow().tls.is_some();
    loop {
        {
            let c = conn.borrow();
            // Done once the close handshake completed in both directions.
            if c.dead || (c.peer_closed && c.tasks <= 1) {
                return;
            }
        }
        if stream.readable(false).await.is_err() {
            return;
        }
        loop {
            let r = {
                let mut buf = ctx.read_buf.borrow_mut();
                match recv(fd, &mut buf) {
                    Read::Data(n) if tls => {
                        if decrypt_and_process(ctx, conn, idx, &buf[..n]) {
                            Read::Data(n)
                        } else {
                            Read::Eof
                        }
                    }
                    Read::Data(n) => {
                        process(ctx, conn, idx, &mut buf[..n]);
                        Read::Data(n)
                    }
                    other => other,
                }
            };
            match r {
                Read::Eof => return,
                Read::WouldBlock => break,
                Read::Data(n) if n < ctx.read_buf.borrow().len() => break,
                // A full buffer: more is likely waiting. Read it on the next turn, after
                // the shard's other tasks, so a client that keeps its socket full gets one
                // buffer per turn and cannot hold the loop.
                Read::Data(_) => crate::rt::shard::yield_now().await,
            }
        }
    }
}

/// TLS: decrypt received bytes into the shard's `plain_buf` and process the plaintext.
/// Returns `false` when the connection's input is over (close_notify or a TLS error).
fn decrypt_and_process(ctx: &ShardCtx, conn: &ConnRef, idx: usize, cipher: &[u8]) -> bool {
    let mut plain = ctx.plain_buf.borrow_mut();
    plain.clear();
    let fed = {
        let mut c = conn.borrow_mut();
        let Some(t) = c.tls.as_deref_mut() else {
            return false;
        };
        let fed = tls_feed(t, cipher, &mut plain);
        if t.wants_write() {
            // Post-handshake messages (key updates, alerts) go out with the next write.
            ctx.kick(idx, &mut c);
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

/// Feed received bytes to the decoder and the session.
fn process(ctx: &ShardCtx, conn: &ConnRef, idx: usize, data: &mut [u8]) {
    let mut c = conn.borrow_mut();
    let now = ctx.now_ms();
    let mut actions = ctx.take_actions();
    let mut partial = c.rx_partial.take().map(|b| *b).unwrap_or_default();
    let mut peer_closed = false;
    let conn_generation = c.generation;
    {
        let c = &mut *c;
        let (Some(decoder), Some(session)) = (c.decoder.as_mut(), c.session.as_mut()) else {
            ctx.put_actions(actions);
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
            &mut partial
        };
        let mut off = 0;
        loop {
            match decoder.decode(&mut buf[off..]) {
                Ok((0, _)) => break,
                Ok((n, msg)) => {
                    off += n;
                    if let Some(m) = msg {
                        if matches!(m, crate::proto::frame::Incoming::Close(_)) {
                            peer_closed = true;
                        }
                        let verifier = crate::rt::verify::ConnVerifier {
                            shared: &ctx.shared,
                            pool: &ctx.verify_pool,
                            shard: ctx.id,
                            idx,
                            generation: conn_generation,
                        };
                        session.handle_message(now, m, ctx.shared.hub.symbols(), &verifier, &mut actions);
                    }
                }
                Err(e) => {
                    session.protocol_error(e.close_code(), e.close_reason(), &mut actions);
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
            partial = Vec::new();
        }
    }
    c.rx_partial = (!partial.is_empty()).then(|| Box::new(partial));
    c.peer_closed |= peer_closed;
    ctx.apply(idx, &mut c, &mut actions);
    ctx.put_actions(actions);
}

/// The writer's handle on the socket. Parked in the `Conn` between writer runs.
pub(crate) enum WriteHandle {
    /// io_uring: a second `TcpStream` value over the *same* descriptor (no extra fd per
    /// connection), since io_uring writes take the stream by `&mut`. `_keep` holds the
    /// reader's stream alive, so the descriptor cannot be closed (and its number reused)
    /// while a write is in flight; when the handle goes, the alias is released with
    /// `into_raw_fd`, which does not close (see `Drop`).
    Alias {
        stream: Option<TcpStream>,
        _keep: Rc<TcpStream>,
    },
    /// epoll: the reader's own stream. The writer sends with `send(2)` and, when the socket
    /// is full, waits for writability on it; monoio's epoll driver keeps a reader and a
    /// writer waker per descriptor, so the two tasks wait on one registration (an alias
    /// would register the fd twice). One descriptor per connection, as on io_uring.
    Shared(Rc<TcpStream>),
}

impl WriteHandle {
    fn new(ctx: &ShardCtx, stream: &Rc<TcpStream>) -> Option<WriteHandle> {
        if !ctx.uring {
            return Some(WriteHandle::Shared(stream.clone()));
        }
        let fd = stream.as_raw_fd();
        // SAFETY: `fd` is open and stays open for as long as `keep` (the reader's stream)
        // lives, which outlives every use of the alias; the alias never closes it
        // (released with `into_raw_fd` when the handle is dropped).
        let alias = TcpStream::from_std(unsafe { std::net::TcpStream::from_raw_fd(fd) }).ok()?;
        Some(WriteHandle::Alias {
            stream: Some(alias),
            _keep: stream.clone(),
        })
    }

    fn fd(&self) -> i32 {
        match self {
            WriteHandle::Alias { _keep, .. } => _keep.as_raw_fd(),
            WriteHandle::Shared(s) => s.as_raw_fd(),
        }
    }

    /// Writes all of `out` and hands the buffer back.
    async fn write_all(&mut self, out: Vec<u8>) -> (std::io::Result<()>, Vec<u8>) {
        match self {
            WriteHandle::Alias { stream, .. } => {
                let s = stream.as_mut().expect("alias present until drop");
                let (res, b) = s.write_all(out).await;
                (res.map(|_| ()), b)
            }
            WriteHandle::Shared(s) => {
                let res = write_all_fd(s, &out).await;
                (res, out)
            }
        }
    }
}

impl Drop for WriteHandle {
    /// Gives an alias's descriptor back without closing it (the reader's stream owns it).
    fn drop(&mut self) {
        if let WriteHandle::Alias { stream, .. } = self
            && let Some(alias) = stream.take()
        {
            // No operation is in flight (every write is awaited before the handle is
            // parked or dropped), so the alias is the only reference to its shared fd
            // and `into_raw_fd` succeeds.
            let _ = alias.into_raw_fd();
        }
    }
}

/// Returns `Pending` once (waking itself), so the task goes to the back of the run queue.
struct YieldNow(bool);

impl std::future::Future for YieldNow {
    type Output = ();
    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        if self.0 {
            return std::task::Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    }
}

/// Writes what the session queued, coalesced, until the queue is empty; then parks its
/// handle in the `Conn` and ends (the next [`ShardCtx::kick`] starts a new run). It ends
/// for good, releasing the writer's part of the connection, when the connection is dead
/// or its close frame is out.
pub(crate) async fn writer(
    ctx: Rc<ShardCtx>,
    conn: ConnRef,
    idx: usize,
    generation: u32,
    mut handle: WriteHandle,
) {
    let mut graceful = false;
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
            if s.outbound.is_empty() && !c.tls.as_ref().is_some_and(|t| t.wants_write()) {
                c.whandle = Some(handle);
                return;
            }
            buf = ctx.take_buffer();
            buf.reserve(s.outbound.queued_bytes().min(MAX_WRITE));
            oldest_tick = s.outbound.drain_stamped(&mut buf, MAX_WRITE).1;
            s.note_drained();
            closing_done = s.is_closing() && s.outbound.is_empty();
            encrypted = match c.tls.as_deref_mut() {
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
            let (res, b) = handle.write_all(out).await;
            failed = res.is_err();
            b
        };
        ctx.put_buffer(out);
        ctx.put_buffer(buf);
        if failed {
            break;
        }
        if !ctx.uring
            && !closing_done
            && conn
                .borrow()
                .session
                .as_ref()
                .is_some_and(|s| !s.outbound.is_empty())
        {
            // epoll: a `send` that did not block never yielded; let the rest of the turn
            // run before this connection's next `MAX_WRITE`.
            YieldNow(false).await;
        }
        if closing_done {
            // Our close frame is out. If the peer closed first, the handshake is complete
            // and the server closes TCP first (RFC 6455 7.1.1). Otherwise half-close and let
            // the reader wait for the peer's close frame (the hard-drop timer bounds that).
            if !conn.borrow().peer_closed {
                shutdown(handle.fd(), libc::SHUT_WR);
                graceful = true;
            }
            break;
        }
    }
    // `task_done` may shut `Conn::fd` down: it runs while this handle still keeps that
    // descriptor open (the reader may have ended and dropped its stream already).
    ctx.task_done(idx, generation, !graceful);
    drop(handle);
}
