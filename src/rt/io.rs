//! Socket-level pieces of a connection, below both the connection pump (`conn.rs`) and the
//! shard's state (`ctx.rs`): the per-connection socket state kept beside the core's
//! ([`Io`]), the writer's handle on the socket, non-blocking `recv`/`send`, the rustls
//! feed and seal steps, `shutdown(2)` and a yield.

use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd};
use std::rc::Rc;

use monoio::io::AsyncWriteRentExt;
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
    /// The writer's socket handle while no writer task runs. Writers run on demand: an
    /// idle connection has no writer task (and none of its ~0.6 KiB future); queued
    /// output makes the core emit a `Kick`, which spawns one (`conn::kick`), and it parks
    /// the handle here again once the queue is empty.
    pub(crate) whandle: Option<WriteHandle>,
    /// Tasks still running for this connection (reader, writer).
    pub tasks: u8,
}

impl Io {
    pub fn new(fd: RawFd) -> Io {
        Io {
            fd,
            tls: None,
            rx_partial: None,
            whandle: None,
            tasks: 1,
        }
    }
}

impl ConnIo for Io {
    fn writer_parked(&self) -> bool {
        self.whandle.is_some()
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

/// Writes through a shared reference: the reader holds the stream by `&`, so the HTTP
/// phase writes with `send` after waiting for writability (the response is small and the
/// socket buffer empty, so this normally completes at once).
/// One `send(2)` that never blocks (`MSG_DONTWAIT`) nor raises `SIGPIPE`: how many bytes
/// the kernel took (0 when the socket is full or failed; the writer that takes over the
/// rest sees the failure again and ends the connection).
pub(crate) fn send_now(fd: RawFd, buf: &[u8]) -> usize {
    loop {
        // SAFETY: `buf` is a live slice for the length given; `fd` is the connection's
        // descriptor, open while its `Conn` lives (the reader's stream owns it).
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

pub(crate) async fn write_all_fd(stream: &TcpStream, bytes: &[u8]) -> std::io::Result<()> {
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
    pub(crate) fn new(uring: bool, stream: &Rc<TcpStream>) -> Option<WriteHandle> {
        if !uring {
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

    pub(crate) fn fd(&self) -> i32 {
        match self {
            WriteHandle::Alias { _keep, .. } => _keep.as_raw_fd(),
            WriteHandle::Shared(s) => s.as_raw_fd(),
        }
    }

    /// Writes all of `out` and hands the buffer back.
    pub(crate) async fn write_all(&mut self, out: Vec<u8>) -> (std::io::Result<()>, Vec<u8>) {
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
pub(crate) struct YieldNow(bool);

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
