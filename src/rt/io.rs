//! Socket-level pieces of a connection, below both the connection pump (`conn.rs`) and the
//! shard's state (`ctx.rs`): the per-connection socket state kept beside the core's
//! ([`Io`]), the writer's handle on the socket, non-blocking `recv`/`send`, the rustls
//! feed and seal steps, `shutdown(2)` and a yield.

use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd};

use monoio::net::TcpStream;
use rustls::ServerConnection;

use crate::core::shard::ConnIo;

/// A connection's socket state, the `io` part of its [`crate::core::shard::Conn`] (one
/// allocation holds both).
pub struct Io {
    pub fd: RawFd,
    /// The TLS state machine (TLS listener only), moved in after the `101`: the reader
    /// decrypts through it before the frame decoder, the writer encrypts through it after
    /// draining the session's queue.
    pub tls: Option<Box<ServerConnection>>,
    /// The start of a frame split across reads (boxed: most connections never hold one).
    pub rx_partial: Option<Box<Vec<u8>>>,
    /// Where the connection's writer is. Writers run on demand: an idle connection has no
    /// writer task (and none of its future); queued output makes the core emit a `Kick`,
    /// which writes inline (or stages the write for the dispatch pass's batch of sends) or
    /// spawns a writer (`conn::kick`), and the writer parks again once the queue is empty.
    pub(crate) writer: Writer,
    /// Tasks still running for this connection (the reader's part, the writer's part).
    pub tasks: u8,
    /// The descriptor is in the shard's [`ReadySet`]: the reader's part is running.
    pub(crate) reading: bool,
    /// The `Io` owns the descriptor and closes it when the connection is freed (from the
    /// `101` on; before, the handshake's stream owns it).
    owned: bool,
}

/// Where a connection's writer is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Writer {
    /// No session yet, or the writer's part has ended.
    None,
    /// No writer task runs: a `Kick` writes inline or starts one.
    Parked,
    /// A writer task runs; it looks at the queue again after each write. Also while a
    /// write is staged for the pass's batch (`conn::flush_sends` then plays the writer's
    /// part: it parks the writer or starts a task).
    Running,
}

impl Io {
    pub fn new(fd: RawFd) -> Io {
        Io {
            fd,
            tls: None,
            rx_partial: None,
            writer: Writer::None,
            tasks: 1,
            reading: false,
            owned: false,
        }
    }

    /// From the `101` on the connection owns its descriptor: the handshake's stream gave it
    /// up (`into_raw_fd`), and it is closed when the connection is freed, after every task
    /// that could use it has ended (each holds the connection).
    pub(crate) fn take_ownership(&mut self) {
        self.owned = true;
    }
}

impl Drop for Io {
    fn drop(&mut self) {
        if self.owned {
            // SAFETY: the descriptor is this connection's own (see `take_ownership`); no
            // stream wraps it any more (the writer's alias is released without closing
            // before its task ends) and nothing uses it after the connection is freed.
            unsafe {
                libc::close(self.fd);
            }
        }
    }
}

impl ConnIo for Io {
    fn writer_parked(&self) -> bool {
        self.writer == Writer::Parked
    }
}

/// A connection of this runtime: the core's state and the socket's.
pub type Conn = crate::core::shard::Conn<Io>;
pub type ConnRef = crate::core::shard::ConnRef<Io>;

pub fn shutdown(fd: RawFd, how: libc::c_int) {
    // SAFETY: `shutdown` takes a plain integer and has no memory effects; on a closed or
    // foreign descriptor it fails with EBADF/ENOTSOCK, which is harmless here because the
    // fd stays open (owned by the connection's TcpStream) for as long as the Conn exists.
    unsafe {
        libc::shutdown(fd, how);
    }
}

/// Yield once to the scheduler.
pub async fn yield_now() {
    YieldNow(false).await
}

pub(crate) enum Read {
    Data(usize),
    WouldBlock,
    Eof,
}

pub(crate) fn recv(fd: i32, buf: &mut [u8]) -> Read {
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
pub(crate) enum TlsIn {
    /// Everything consumed; any plaintext was appended.
    Ok,
    /// The peer sent `close_notify`: no more data will come.
    Closed,
    /// A TLS protocol error (rustls has queued an alert for the peer).
    Failed(String),
}

/// Feed `data` to rustls and append the plaintext it yields to `plain`.
pub(crate) fn tls_feed(tls: &mut ServerConnection, mut data: &[u8], plain: &mut Vec<u8>) -> TlsIn {
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
pub(crate) fn tls_seal(
    tls: &mut ServerConnection,
    plain: &[u8],
    close: bool,
    out: &mut Vec<u8>,
) -> std::io::Result<()> {
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

/// One `send(2)` that never blocks (`MSG_DONTWAIT`) nor raises `SIGPIPE`: how many bytes
/// the kernel took (0 when the socket is full or failed; the writer that takes over the
/// rest sees the failure again and ends the connection).
pub fn send_now(fd: RawFd, buf: &[u8]) -> usize {
    loop {
        // SAFETY: `buf` is a live slice for the length given; `fd` is the connection's
        // descriptor, open while its `Conn` lives (the handshake's stream owns it until the
        // `101`, the `Conn` after).
        let n = unsafe {
            libc::send(
                fd,
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n >= 0 {
            return n as usize;
        }
        if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return 0;
        }
    }
}

/// Connections written per [`SendRing::send_each`] call: the ring's size, and how many
/// of a dispatch pass's writes wait for one another before they go out (the first
/// subscriber's bytes wait for the preparation of at most this many writes).
pub const SEND_BATCH: usize = 32;

/// Many connections' writes in one system call (io_uring shards only). A dispatch pass
/// writes to each subscriber that got something, one `send` per connection; on this
/// path the kernel's TCP work is most of the cost, and entering the kernel once per
/// socket is the part a batch removes: the same 100 loopback sends of a tick cost
/// 15-20 % less CPU each as one `io_uring_enter` than as 100 `send(2)` calls on the
/// benchmark VM (perf/RESULTS.md, issue 17). A private ring, apart from the runtime's,
/// used synchronously: every call submits its sends and reaps all their completions
/// before it returns, so nothing of the caller's buffers is in flight afterwards. A ring
/// that fails (the kernel refuses the submission, or a send does not complete at once)
/// is dropped, and every later call sends one by one with [`send_now`]. Public for
/// `loadgen floor --batch`, the machine's floor with the same batches.
pub struct SendRing {
    /// None once the ring failed.
    ring: Option<io_uring::IoUring>,
    /// The sends' flags: `MSG_DONTWAIT | MSG_NOSIGNAL` (tests take `MSG_DONTWAIT` away to
    /// see the ring fail safely).
    flags: i32,
}

/// `io_uring_enter`'s flag to wait for completions (linux/io_uring.h).
const IORING_ENTER_GETEVENTS: u32 = 1;

impl SendRing {
    /// None when the kernel refuses a ring or does not know `IORING_OP_SEND` (the caller
    /// sends one by one instead).
    pub fn new() -> Option<SendRing> {
        let ring = io_uring::IoUring::new(SEND_BATCH as u32).ok()?;
        let mut probe = io_uring::Probe::new();
        ring.submitter().register_probe(&mut probe).ok()?;
        probe
            .is_supported(io_uring::opcode::Send::CODE)
            .then_some(SendRing {
                ring: Some(ring),
                flags: libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            })
    }

    /// Still sending in batches (false once the ring failed and was dropped).
    pub fn healthy(&self) -> bool {
        self.ring.is_some()
    }

    /// For each `(fd, bytes)` of `items` (at most [`SEND_BATCH`], distinct descriptors),
    /// one `send(MSG_DONTWAIT | MSG_NOSIGNAL)`, all submitted at once; `taken[i]` is how
    /// many bytes the kernel took of item `i`, 0 when its socket was full or failed (as
    /// [`send_now`]). A lone item, and items the ring could not send (it failed), are
    /// sent with [`send_now`].
    pub fn send_each(&mut self, items: &[(RawFd, &[u8])], taken: &mut [usize]) {
        let n = items.len().min(SEND_BATCH).min(taken.len());
        let mut done = [false; SEND_BATCH];
        // One write alone costs less as a plain `send`.
        if n > 1
            && let Some(ring) = self.ring.as_mut()
            && !batch(ring, self.flags, &items[..n], &mut taken[..n], &mut done[..n])
        {
            tracing::warn!("the send ring failed: one send per write from now on");
            // Dropping the ring discards the entries it never took; every entry it took
            // has completed (`batch`).
            self.ring = None;
        }
        for i in 0..n {
            if !done[i] {
                taken[i] = send_now(items[i].0, items[i].1);
            }
        }
    }
}

/// One batch through `ring`: pushes a send per item, submits them, and reaps until each
/// has completed (`done[i]`, `taken[i]`). False when the ring failed: the kernel kept
/// refusing the submission, or some send was still pending after a second (it should
/// complete at once, see below). Then every entry the kernel had taken has been cancelled
/// and has completed before this returns, and the entries it never took are left in the
/// queue for the caller to drop with the ring.
fn batch(
    ring: &mut io_uring::IoUring,
    flags: i32,
    items: &[(RawFd, &[u8])],
    taken: &mut [usize],
    done: &mut [bool],
) -> bool {
    let mut pushed = 0;
    {
        let mut sq = ring.submission();
        for (i, &(fd, bytes)) in items.iter().enumerate() {
            let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
            let sqe = io_uring::opcode::Send::new(io_uring::types::Fd(fd), bytes.as_ptr(), len)
                .flags(flags)
                .build()
                .user_data(i as u64);
            // SAFETY: the entry points at `bytes`, which the caller keeps alive and
            // unchanged for this whole call; this function does not return before every
            // entry the kernel took has completed (the loop below; a failed ring cancels
            // what is pending and waits for it), and the entries it did not take are never
            // submitted (the caller drops the ring). `fd` is a descriptor the caller keeps
            // open for the call. The queue is empty on entry (every earlier batch was
            // consumed and reaped, or its ring dropped) and holds `SEND_BATCH` entries, so
            // the push cannot fail.
            if unsafe { sq.push(&sqe) }.is_err() {
                break;
            }
            pushed += 1;
        }
    }
    // MSG_DONTWAIT: a full socket completes at once with EAGAIN instead of waiting for
    // room (io_uring fails a request whose flags forbid waiting rather than park it), so
    // every send completes while the kernel submits it and the first wait returns at once.
    let wait = io_uring::types::Timespec::new().nsec(100_000_000);
    let mut completed = 0;
    let mut refused = 0;
    let mut waits = 0;
    loop {
        for cqe in ring.completion() {
            let i = usize::try_from(cqe.user_data()).unwrap_or(usize::MAX);
            if i < pushed && !done[i] {
                done[i] = true;
                taken[i] = usize::try_from(cqe.result()).unwrap_or(0);
                completed += 1;
            }
        }
        if completed == pushed {
            return refused < 3;
        }
        // Entries the kernel has not taken yet; the others are running.
        let untaken = ring.submission().len();
        let running = pushed - completed - untaken.min(pushed - completed);
        if refused >= 3 || waits >= 10 {
            if running == 0 {
                return false;
            }
            // Pending sends must end before their buffers may go: cancel them (Linux 6.0
            // on) and wait for their completions without submitting anything more.
            let _ = ring
                .submitter()
                .register_sync_cancel(None, io_uring::types::CancelBuilder::any().all());
            // SAFETY: a plain `io_uring_enter` on the ring's own descriptor that submits
            // nothing and waits for one completion; no argument pointer.
            let _ = unsafe {
                ring.submitter()
                    .enter::<libc::sigset_t>(0, 1, IORING_ENTER_GETEVENTS, None)
            };
            refused = refused.max(3);
            continue;
        }
        let args = io_uring::types::SubmitArgs::new().timespec(&wait);
        match ring.submitter().submit_with_args(pushed - completed, &args) {
            Ok(_) => waits += 1,
            Err(e) if e.raw_os_error() == Some(libc::ETIME) => waits += 1,
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(_) => refused += 1,
        }
    }
}

/// Writes all of `bytes` through a shared reference to the stream: `send` until the kernel
/// has it all, waiting for writability when the socket is full. The handshake writes its
/// responses this way (small, into an empty socket buffer: normally at once).
pub(crate) async fn write_all_fd(stream: &TcpStream, bytes: &[u8]) -> std::io::Result<()> {
    send_all(stream, bytes, || {}).await
}

/// [`write_all_fd`] calling `between` after every `send` that the kernel took bytes from.
/// Every write from the shard's thread is a `send(MSG_DONTWAIT)` done right here, so its
/// cost is paid in this task's turn, where `between` can let other work in (the writer
/// reads the shard's publishers there, `conn::feeds_first`), rather than in one
/// `io_uring_enter` that carries every writer's write of the loop turn together.
async fn send_all(stream: &TcpStream, bytes: &[u8], mut between: impl FnMut()) -> std::io::Result<()> {
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
            between();
            continue;
        }
        if n == 0 {
            // Not for a stream socket and a non-empty buffer; never read a stale errno.
            return Err(std::io::ErrorKind::WriteZero.into());
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

/// The writer's handle on the socket, made when a writer task starts and released when it
/// ends, since the runtime's wait for writability (a poll holding a reference to the
/// descriptor) takes a stream of its own; the writes themselves are `send` calls. The
/// connection owns the descriptor and outlives the writer task (which holds it), so the
/// descriptor cannot be closed (and its number reused) while a wait is in flight. The
/// rule the release relies on: a writer task is never dropped while it waits (the
/// shard's runtime never cancels tasks; its thread exits with the process).
/// - io_uring: a `TcpStream` value over the connection's descriptor itself (an
///   allocation, no system call), released with `into_raw_fd`, which does not close.
/// - epoll: a stream over a `dup` of it, registered with the runtime's poller for the
///   writer's run and closed (deregistered) when the run ends. A failed registration then
///   closes the duplicate, never the connection's descriptor.
pub(crate) struct WriteHandle {
    stream: Option<TcpStream>,
    uring: bool,
}

impl WriteHandle {
    pub(crate) fn new(uring: bool, fd: RawFd) -> Option<WriteHandle> {
        let stream = if uring {
            // SAFETY: `fd` is the connection's descriptor, open for as long as the
            // connection, which the writer task holding this handle keeps alive; the alias
            // never closes it (released with `into_raw_fd` when the handle is dropped).
            // On io_uring `from_std` registers nothing and cannot fail (had it failed, it
            // would have closed `fd`).
            TcpStream::from_std(unsafe { std::net::TcpStream::from_raw_fd(fd) }).ok()?
        } else {
            // SAFETY: `dup` takes a descriptor number and returns a new one or -1.
            let dup = unsafe { libc::dup(fd) };
            if dup < 0 {
                return None;
            }
            // SAFETY: `dup` is a fresh descriptor owned by nothing else; the stream takes it
            // (and closes it, only it, if the registration fails).
            TcpStream::from_std(unsafe { std::net::TcpStream::from_raw_fd(dup) }).ok()?
        };
        Some(WriteHandle {
            stream: Some(stream),
            uring,
        })
    }

    /// Writes all of `out`, calling `between` after each `send` that made progress (see
    /// [`send_all`]).
    pub(crate) async fn write_all(&mut self, out: &[u8], between: impl FnMut()) -> std::io::Result<()> {
        let Some(s) = self.stream.as_ref() else {
            return Err(std::io::ErrorKind::NotConnected.into());
        };
        send_all(s, out, between).await
    }
}

impl Drop for WriteHandle {
    /// io_uring: gives the alias's descriptor back without closing it (the connection owns
    /// it). epoll: the duplicate is dropped, which deregisters and closes it.
    fn drop(&mut self) {
        if self.uring
            && let Some(alias) = self.stream.take()
        {
            // No wait is in flight (every one is awaited before the handle is dropped),
            // so the alias is the only reference to its shared fd and `into_raw_fd`
            // succeeds.
            let _ = alias.into_raw_fd();
        }
    }
}

/// The shard's established connections waiting for input: one level-triggered epoll set
/// holding each connection's descriptor under its slot and generation, waited on as a
/// whole by the shard's one reader task (`conn::readers`). An idle connection costs an
/// entry in the kernel's set, not a task, a pending poll operation and their bookkeeping
/// in the process (perf/RESULTS.md, issue 17). Used the same way on io_uring and epoll.
pub(crate) struct ReadySet {
    /// The epoll descriptor, as a [`waiter`]; closed with the shard.
    waiter: TcpStream,
}

/// A pollable descriptor that is not a socket (an epoll set, an eventfd), held as a stream
/// only so that the runtime can wait for it to become readable: monoio waits for readiness
/// on its own socket types, and on io_uring that is a poll operation, which works on any
/// pollable descriptor. No socket call is ever made on it; dropping it closes `fd`.
/// `fd` must be fresh and owned by nothing else.
fn waiter(fd: RawFd) -> std::io::Result<TcpStream> {
    // SAFETY: `fd` is a fresh descriptor that nothing else owns (the caller's contract);
    // the stream takes it (and closes it if `from_std` fails).
    TcpStream::from_std(unsafe { std::net::TcpStream::from_raw_fd(fd) })
}

/// An event's key: a connection's slot and generation.
pub(crate) fn ready_key(idx: usize, generation: u32) -> u64 {
    ((idx as u64) << 32) | u64::from(generation)
}

pub(crate) fn ready_key_parts(key: u64) -> (usize, u32) {
    ((key >> 32) as usize, key as u32)
}

impl ReadySet {
    /// Must run on the shard's runtime thread (the waiter registers with its driver).
    pub(crate) fn new() -> std::io::Result<ReadySet> {
        // SAFETY: takes a flag, returns a new descriptor or -1.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(ReadySet { waiter: waiter(fd)? })
    }

    fn epfd(&self) -> RawFd {
        self.waiter.as_raw_fd()
    }

    /// Watch `fd` for input (and hang-ups) under `key`. False when the kernel refuses
    /// (out of memory, or `max_user_watches`).
    pub(crate) fn add(&self, fd: RawFd, key: u64) -> bool {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: key,
        };
        // SAFETY: `ev` is a valid event for the call's duration; both are descriptors.
        unsafe { libc::epoll_ctl(self.epfd(), libc::EPOLL_CTL_ADD, fd, &mut ev) == 0 }
    }

    /// Stop watching `fd` (its reader is done; a shut-down socket would otherwise stay
    /// readable). Closing the descriptor also takes it out.
    pub(crate) fn remove(&self, fd: RawFd) {
        let mut ev = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: as in `add`; an fd not in the set fails with ENOENT, which is harmless.
        unsafe {
            libc::epoll_ctl(self.epfd(), libc::EPOLL_CTL_DEL, fd, &mut ev);
        }
    }

    /// The keys of the descriptors ready now (without waiting), at most `out.len()`.
    pub(crate) fn collect(&self, out: &mut [libc::epoll_event]) -> usize {
        loop {
            // SAFETY: `out` is a valid, exclusively borrowed buffer of `out.len()` events;
            // the kernel writes at most that many.
            let n = unsafe { libc::epoll_wait(self.epfd(), out.as_mut_ptr(), out.len() as i32, 0) };
            if n >= 0 {
                return n as usize;
            }
            if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                return 0;
            }
        }
    }

    /// Until some descriptor in the set is ready.
    pub(crate) async fn readable(&self) -> std::io::Result<()> {
        self.waiter.readable(false).await
    }
}

/// A descriptor that is always readable (an eventfd whose count is never read), waited
/// on by the busy poller (`shard::busy_poll`) to poll the runtime without sleeping. The
/// runtime (monoio) looks at what only its sleep looks at (completions of readiness
/// polls, wake-ups from other threads, due timers) only when its run queue is empty and
/// it goes to sleep; a task that merely yields keeps the queue non-empty and so would
/// hold all of that back. A task waiting here leaves the queue empty, and the sleep that
/// follows ends at once: on io_uring the poll of a readable descriptor completes as it is
/// submitted. io_uring only: the epoll driver answers a readiness wait on a ready
/// descriptor without sleeping at all.
pub(crate) struct Nudge {
    /// The eventfd, as a [`waiter`]; closed with the nudge.
    waiter: TcpStream,
}

impl Nudge {
    /// Must run on the shard's runtime thread (the waiter registers with its driver).
    pub(crate) fn new() -> std::io::Result<Nudge> {
        // SAFETY: takes an initial count (1: readable from the start) and flags, returns
        // a new descriptor or -1.
        let fd = unsafe { libc::eventfd(1, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Nudge { waiter: waiter(fd)? })
    }

    /// One poll of the runtime: its sleep, for no time.
    pub(crate) async fn poll(&self) -> std::io::Result<()> {
        self.waiter.readable(false).await
    }
}

/// Returns `Pending` once, so the task goes to the back of the run queue.
///
/// The wake-up comes from a task of its own, spawned behind everything runnable now:
/// monoio puts a task that wakes itself while it runs back at the *front* of the queue
/// and polls it again at once, so a plain `wake_by_ref` here let nothing else run (the
/// reader's batches, the dispatcher's passes and the ticker's slices each held the loop
/// until they ran out of work).
pub(crate) struct YieldNow(bool);

impl std::future::Future for YieldNow {
    type Output = ();
    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        if self.0 {
            return std::task::Poll::Ready(());
        }
        self.0 = true;
        let waker = cx.waker().clone();
        monoio::spawn(async move { waker.wake() });
        std::task::Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `body` on a fresh runtime of the shard's driver: io_uring, or the epoll
    /// fallback.
    fn block_on<F: std::future::Future>(uring: bool, body: F) -> F::Output {
        if uring {
            monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
                .enable_timer()
                .build()
                .expect("io_uring (the server's own driver)")
                .block_on(body)
        } else {
            monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
                .enable_timer()
                .build()
                .unwrap()
                .block_on(body)
        }
    }
    use std::io::Read;

    /// A writer's write to a socket that fills (a small send buffer, a reader that takes
    /// its time): every byte arrives in order, the writer waits for room instead of
    /// failing, and `between` runs after each `send` that moved bytes, so the shard gets
    /// to its publishers many times during one large write (`conn::feeds_first`).
    /// A connected loopback pair: (the sending side, non-blocking, with a small send
    /// buffer; the receiving side).
    fn pair() -> (std::net::TcpStream, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        // A fixed receive buffer (inherited by the accepted socket): no autotuning, so a
        // socket filled while its peer does not read stays full.
        set_int(listener.as_raw_fd(), libc::SO_RCVBUF, 16 * 1024);
        let tx = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (rx, _) = listener.accept().unwrap();
        set_int(tx.as_raw_fd(), libc::SO_SNDBUF, 16 * 1024);
        tx.set_nonblocking(true).unwrap();
        rx.set_nonblocking(true).unwrap();
        (tx, rx)
    }

    /// Sets a socket-level int option.
    fn set_int(fd: RawFd, name: libc::c_int, value: i32) {
        // SAFETY: sets an int option on a live socket, from a valid pointer and length.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                name,
                (&value as *const i32).cast(),
                std::mem::size_of::<i32>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0);
    }

    /// Everything readable now from `rx`.
    fn drain(rx: &mut std::net::TcpStream) -> Vec<u8> {
        let mut got = Vec::new();
        let mut chunk = [0u8; 65536];
        while let Ok(n) = rx.read(&mut chunk) {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
        }
        got
    }

    /// The batch sends every item to its own socket, says how much each socket took, and
    /// never waits: a full socket's item comes back with 0 bytes taken (its writer then
    /// waits for room), not as a request parked in the kernel (without `MSG_DONTWAIT` it
    /// parks, and takes bytes once the peer's kernel has made room, or is cancelled after
    /// a second: either fails the test). Several calls in a row reuse the ring.
    #[test]
    fn send_ring_sends_each_item_and_never_waits_for_a_full_socket() {
        let mut ring = SendRing::new().expect("io_uring (the server's own driver)");
        let (full_tx, mut full_rx) = pair();
        // Fill one socket until the kernel takes nothing more.
        let filler = vec![7u8; 65536];
        let mut filled = 0;
        loop {
            let n = send_now(full_tx.as_raw_fd(), &filler);
            if n == 0 {
                break;
            }
            filled += n;
        }
        let mut pairs: Vec<_> = (0..SEND_BATCH + 3).map(|_| pair()).collect();
        for round in 0..3u8 {
            let frames: Vec<Vec<u8>> = (0..pairs.len())
                .map(|i| format!("round {round} socket {i}").into_bytes())
                .collect();
            let mut items: Vec<(RawFd, &[u8])> = vec![(full_tx.as_raw_fd(), b"more")];
            for (p, f) in pairs.iter().zip(&frames).take(SEND_BATCH - 1) {
                items.push((p.0.as_raw_fd(), f));
            }
            let mut taken = vec![usize::MAX; items.len()];
            ring.send_each(&items, &mut taken);
            // A send that waited in the kernel would have been cancelled after a second
            // and the ring dropped.
            assert!(ring.healthy(), "the ring failed in round {round}");
            assert_eq!(taken[0], 0, "a full socket takes nothing");
            for (i, t) in taken.iter().enumerate().skip(1) {
                assert_eq!(*t, items[i].1.len(), "item {i} of round {round}");
            }
            for (p, f) in pairs.iter_mut().zip(&frames).take(SEND_BATCH - 1) {
                assert_eq!(&drain(&mut p.1), f);
            }
        }
        // The full socket got exactly what was sent to it before the batches.
        let mut got = 0;
        for _ in 0..10_000 {
            got += drain(&mut full_rx).len();
            if got >= filled {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(got, filled);
    }

    /// A send that waits in the kernel (here: `MSG_DONTWAIT` taken away, into a socket
    /// whose peer never reads) makes the ring fail safely: the call returns, the pending
    /// send is cancelled before its buffer could go, the other items went out, the ring is
    /// dropped, and later calls send one by one.
    #[test]
    fn a_send_ring_whose_send_waits_cancels_it_and_falls_back() {
        let mut ring = SendRing::new().expect("io_uring (the server's own driver)");
        ring.flags = libc::MSG_NOSIGNAL;
        let (full_tx, _full_rx) = pair();
        // Full for good: the peer's window is closed too (room made by the ACKs of bytes
        // already in flight is taken again, until none comes for a while).
        let filler = vec![7u8; 65536];
        let mut idle = 0;
        while idle < 20 {
            if send_now(full_tx.as_raw_fd(), &filler) > 0 {
                idle = 0;
            } else {
                idle += 1;
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
        let (ok_tx, mut ok_rx) = pair();
        let big = vec![1u8; 4 << 20];
        let items: [(RawFd, &[u8]); 2] = [(full_tx.as_raw_fd(), &big), (ok_tx.as_raw_fd(), b"hello")];
        let mut taken = [usize::MAX; 2];
        ring.send_each(&items, &mut taken);
        assert!(!ring.healthy(), "a send still waiting must fail the ring");
        assert_eq!(taken[1], 5);
        assert_eq!(drain(&mut ok_rx), b"hello");
        // Whatever the cancelled send had taken is reported (it may be a part).
        assert!(taken[0] < big.len());
        drop(big);
        // From now on: one `send` each.
        let mut taken = [usize::MAX; 1];
        ring.send_each(&[(ok_tx.as_raw_fd(), b"again")], &mut taken);
        assert_eq!(taken[0], 5);
        assert_eq!(drain(&mut ok_rx), b"again");
    }

    fn send_all_lets_work_in_between(uring: bool) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let reader = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
                .unwrap();
            let mut got = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                match s.read(&mut chunk) {
                    Ok(0) => return got,
                    Ok(n) => got.extend_from_slice(&chunk[..n]),
                    Err(e) => panic!("reader: {e}"),
                }
                std::thread::yield_now();
            }
        });
        let out: Vec<u8> = (0..(1 << 20)).map(|i: u32| (i % 251) as u8).collect();
        let std_stream = std::net::TcpStream::connect(addr).unwrap();
        set_int(std_stream.as_raw_fd(), libc::SO_SNDBUF, 16 * 1024);
        std_stream.set_nonblocking(true).unwrap();
        let sends = std::cell::Cell::new(0usize);
        let body = async {
            let stream = TcpStream::from_std(std_stream).unwrap();
            send_all(&stream, &out, || sends.set(sends.get() + 1))
                .await
                .unwrap();
            drop(stream);
        };
        block_on(uring, body);
        let got = reader.join().unwrap();
        assert_eq!(got.len(), out.len());
        assert!(got == out, "bytes out of order");
        // 1 MiB through a send buffer of 32 KiB (the kernel doubles the value set): many
        // sends, even when loopback lets one take more than the buffer's size.
        assert!(sends.get() >= 4, "between ran {} times", sends.get());
    }

    /// Two tasks that yield in turn must interleave, on both drivers: the loop's tasks
    /// (reader, dispatcher, ticker, writers) take turns only through [`yield_now`].
    fn yielding_tasks_take_turns(uring: bool) {
        let body = async {
            let log = std::rc::Rc::new(std::cell::RefCell::new(String::new()));
            let task = |c: char, n: usize| {
                let log = log.clone();
                monoio::spawn(async move {
                    for _ in 0..n {
                        log.borrow_mut().push(c);
                        yield_now().await;
                    }
                })
            };
            let (a, b, c) = (task('a', 4), task('b', 4), task('c', 1));
            a.await;
            b.await;
            c.await;
            log.take()
        };
        let order = block_on(uring, body);
        assert_eq!(order, "abcababab");
    }

    #[test]
    fn yielding_tasks_take_turns_on_io_uring() {
        yielding_tasks_take_turns(true);
    }

    #[test]
    fn yielding_tasks_take_turns_on_epoll() {
        yielding_tasks_take_turns(false);
    }

    #[test]
    fn send_all_lets_work_in_between_on_io_uring() {
        send_all_lets_work_in_between(true);
    }

    #[test]
    fn send_all_lets_work_in_between_on_epoll() {
        send_all_lets_work_in_between(false);
    }
}
