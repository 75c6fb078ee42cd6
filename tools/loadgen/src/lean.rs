//! The lean subscriber client: a raw `TcpStream`, a hand-written HTTP upgrade, hand-parsed
//! server frames and a field scanner over the JSON text (no JSON parse), so one client core
//! can absorb millions of messages per second.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;

use tickgate::proto::frame::{OpCode, encode_client_frame_into};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// A fixed, valid `Sec-WebSocket-Key` (16 bytes base64). The server's accept value is not
/// checked: the load generator trusts the server it measures.
const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// `IP_BIND_ADDRESS_NO_PORT` on an IPv4 socket about to be bound to a source address: the
/// port is picked at connect time, per destination, so one source address is not limited
/// to one ephemeral port range for all destinations. Best effort.
pub fn bind_address_no_port(sock: &TcpSocket) {
    set_flag(sock.as_raw_fd(), libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT);
}

/// Turns on an integer socket option (`setsockopt` with 1); false when refused.
fn set_flag(fd: std::os::fd::RawFd, level: libc::c_int, name: libc::c_int) -> bool {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a valid c_int.
    unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) == 0
    }
}

/// Connects to `target`, first binding to `src` (port chosen at connect time, so each
/// source address gets its own ephemeral port space per destination).
pub async fn connect(target: SocketAddr, src: Option<Ipv4Addr>) -> io::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    if let Some(ip) = src {
        bind_address_no_port(&sock);
        sock.bind(SocketAddr::new(ip.into(), 0))?;
    }
    let s = sock.connect(target).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// A subscriber's connection: plain TCP or TLS over it (`--tls`).
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Stream {
    /// Wrap a connected socket per the context (`--tls` does the TLS handshake here).
    pub async fn wrap(ctx: &crate::common::Ctx, tcp: TcpStream) -> io::Result<Stream> {
        match &ctx.tls {
            None => Ok(Stream::Plain(tcp)),
            Some((cfg, name)) => {
                let c = tokio_rustls::TlsConnector::from(cfg.clone());
                Ok(Stream::Tls(Box::new(c.connect(name.clone(), tcp).await?)))
            }
        }
    }

    /// Connect (from `src`) and wrap.
    pub async fn connect(ctx: &crate::common::Ctx, src: Option<Ipv4Addr>) -> io::Result<Stream> {
        let tcp = connect(ctx.target, src).await?;
        Stream::wrap(ctx, tcp).await
    }
}

impl tokio::io::AsyncRead for Stream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Stream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Asks the kernel to stamp every segment this socket receives (`SO_TIMESTAMPNS`,
/// `CLOCK_REALTIME`, the clock ticks are stamped with): [`Stream::read_stamped`] then says
/// when the bytes it read reached this host's TCP stack, before the client's thread got to
/// them. Clients that share a core with other load (a storm's clients, on a 2-core
/// machine) see their own scheduling in the read time; the arrival time leaves it out, as
/// a receive timestamp of a client's NIC would. False when the kernel refused.
pub fn enable_rx_timestamps(s: &Stream) -> bool {
    let Stream::Plain(t) = s else { return false };
    set_flag(t.as_raw_fd(), libc::SOL_SOCKET, libc::SO_TIMESTAMPNS)
}

/// One `recvmsg(MSG_DONTWAIT)`: the bytes read, and the kernel's receive stamp of the last
/// segment they came from (ns since the Unix epoch) when the socket has
/// [`enable_rx_timestamps`].
fn recv_stamped(fd: std::os::fd::RawFd, buf: &mut [u8]) -> io::Result<(usize, Option<u64>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // Room for one `timespec` control message, aligned for `cmsghdr`.
    let mut control = [0u64; 8];
    // SAFETY: an all-zero msghdr is a valid empty one; the fields that matter are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: `msg` points at `iov` (which covers `buf`) and `control`, all alive and
    // writable for the call; the kernel writes at most their lengths.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut stamp = None;
    // SAFETY: the CMSG_* macros walk the control messages the kernel wrote into `control`
    // (bounded by `msg.msg_controllen`, which it set); an `SCM_TIMESTAMPNS` message carries
    // one `timespec`, read unaligned.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                let t: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                stamp = Some(t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64);
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok((n as usize, stamp))
}

impl Stream {
    /// `read`, with when the kernel received the last byte read (see
    /// [`enable_rx_timestamps`]; `None` over TLS or without them).
    pub async fn read_stamped(&mut self, buf: &mut [u8]) -> io::Result<(usize, Option<u64>)> {
        match self {
            Stream::Plain(s) => loop {
                s.readable().await?;
                match s.try_io(tokio::io::Interest::READABLE, || recv_stamped(s.as_raw_fd(), buf)) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    r => return r,
                }
            },
            Stream::Tls(_) => Ok((self.read(buf).await?, None)),
        }
    }
}

/// Makes the next close send an RST (no TIME_WAIT on the client side).
pub fn set_linger_zero(s: &TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt reads `size_of::<linger>()` bytes from a valid linger struct.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// The upgrade request with a bearer token.
pub fn upgrade_request(host: &str, token: &str) -> Vec<u8> {
    format!(
        "GET /v1/stream HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n"
    )
    .into_bytes()
}

/// Sends the upgrade and reads the response head. Returns the status code; bytes after the
/// head (the first frames) are left in `buf[..len]`, the returned length.
pub async fn upgrade<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    stream: &mut S,
    req: &[u8],
    buf: &mut Vec<u8>,
) -> io::Result<(u16, usize)> {
    stream.write_all(req).await?;
    let mut end = 0usize;
    loop {
        if end == buf.len() {
            if buf.len() >= 64 * 1024 {
                return Err(io::Error::other("response head too large"));
            }
            buf.resize(buf.len() * 2, 0);
        }
        let n = stream.read(&mut buf[end..]).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed during upgrade",
            ));
        }
        end += n;
        if let Some(pos) = find(&buf[..end], b"\r\n\r\n") {
            let head = &buf[..pos];
            let status = head
                .split(|&b| b == b' ')
                .nth(1)
                .and_then(|s| std::str::from_utf8(s).ok())
                .and_then(|s| s.parse::<u16>().ok())
                .unwrap_or(0);
            let rest = end - (pos + 4);
            buf.copy_within(pos + 4..end, 0);
            return Ok((status, rest));
        }
    }
}

/// A parsed server frame: opcode, payload range within the buffer, total length.
pub struct Frame {
    pub opcode: u8,
    /// RSV1: a message compressed with permessage-deflate.
    pub rsv1: bool,
    pub start: usize,
    pub end: usize,
}

/// Parses one (unmasked, server) frame at the start of `buf`. `None` when incomplete.
#[inline]
pub fn parse_frame(buf: &[u8]) -> Option<Frame> {
    if buf.len() < 2 {
        return None;
    }
    let b0 = buf[0];
    let b1 = buf[1];
    let masked = b1 & 0x80 != 0;
    let (len, mut off) = match b1 & 0x7f {
        126 => {
            if buf.len() < 4 {
                return None;
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4)
        }
        127 => {
            if buf.len() < 10 {
                return None;
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(b) as usize, 10)
        }
        n => (n as usize, 2),
    };
    if masked {
        off += 4; // servers never mask; tolerate it anyway (payload is then garbage to us)
    }
    if buf.len() < off + len {
        return None;
    }
    Some(Frame {
        opcode: b0 & 0x0f,
        rsv1: b0 & 0x40 != 0,
        start: off,
        end: off + len,
    })
}

/// Appends a masked client text frame.
pub fn text_frame(payload: &[u8], out: &mut Vec<u8>) {
    encode_client_frame_into(OpCode::Text, true, payload, [0x12, 0x34, 0x56, 0x78], out);
}

/// Appends a masked client pong echoing `payload`.
pub fn pong_frame(payload: &[u8], out: &mut Vec<u8>) {
    encode_client_frame_into(OpCode::Pong, true, payload, [0x9a, 0xbc, 0xde, 0xf0], out);
}

/// Appends a masked client close frame with code 1000 (normal closure).
pub fn close_frame(out: &mut Vec<u8>) {
    encode_client_frame_into(OpCode::Close, true, &1000u16.to_be_bytes(), [1, 2, 3, 4], out);
}

/// First position of `needle` in `hay`.
#[inline]
pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    let first = needle[0];
    let last = hay.len() - needle.len();
    let mut i = 0;
    while i <= last {
        if hay[i] == first && &hay[i..i + needle.len()] == needle {
            return Some(i);
        }
        i += 1;
    }
    None
}

/// The unsigned integer right after `key` (e.g. `"seq":`).
#[inline]
pub fn field_u64(hay: &[u8], key: &[u8]) -> Option<u64> {
    let p = find(hay, key)? + key.len();
    let mut v: u64 = 0;
    let mut any = false;
    for &b in &hay[p..] {
        if b.is_ascii_digit() {
            v = v.wrapping_mul(10).wrapping_add((b - b'0') as u64);
            any = true;
        } else {
            break;
        }
    }
    any.then_some(v)
}

/// The string value right after `key` (e.g. `"s":"`), without the closing quote.
#[inline]
pub fn field_str<'a>(hay: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    let p = find(hay, key)? + key.len();
    let rest = &hay[p..];
    let q = rest.iter().position(|&b| b == b'"')?;
    Some(&rest[..q])
}

/// The message type (`"type":"..."`).
#[inline]
pub fn msg_type(hay: &[u8]) -> Option<&[u8]> {
    // Fast path: tickgate puts `type` first. The baseline's `json!` objects come out with
    // their keys sorted (serde_json without `preserve_order`), so its messages take the
    // scan below: a few dozen bytes more per message on the generator's side.
    if let Some(rest) = hay.strip_prefix(b"{\"type\":\"") {
        let q = rest.iter().position(|&b| b == b'"')?;
        return Some(&rest[..q]);
    }
    field_str(hay, b"\"type\":\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scans_fields() {
        let m = br#"{"type":"tick","s":"S0001","seq":42,"ts":1732345678123456789,"bid":1.0,"skipped":3}"#;
        assert_eq!(msg_type(m), Some(&b"tick"[..]));
        assert_eq!(field_str(m, b"\"s\":\""), Some(&b"S0001"[..]));
        assert_eq!(field_u64(m, b"\"seq\":"), Some(42));
        assert_eq!(field_u64(m, b"\"ts\":"), Some(1732345678123456789));
        assert_eq!(field_u64(m, b"\"skipped\":"), Some(3));
        assert_eq!(field_u64(m, b"\"nope\":"), None);
        let m2 = br#"{"id":1,"type":"subscribed"}"#;
        assert_eq!(msg_type(m2), Some(&b"subscribed"[..]));
    }

    #[test]
    fn parses_frames() {
        let mut f = vec![0x81, 5];
        f.extend_from_slice(b"hello");
        f.push(0x89);
        let fr = parse_frame(&f).unwrap();
        assert_eq!((fr.opcode, fr.start, fr.end), (1, 2, 7));
        assert!(parse_frame(&f[..6]).is_none());
        let mut big = vec![0x81, 126, 1, 0];
        big.extend(std::iter::repeat_n(b'x', 256));
        let fr = parse_frame(&big).unwrap();
        assert_eq!((fr.start, fr.end), (4, 260));
    }

    /// The kernel's receive stamp comes back with the bytes, on the clock ticks carry, and
    /// between the send and the read; without `enable_rx_timestamps` there is none.
    #[tokio::test]
    async fn reads_carry_the_kernels_receive_stamp() {
        use tokio::io::AsyncWriteExt;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (c, s) = tokio::join!(connect(addr, None), l.accept());
        let mut stamped = Stream::Plain(c.unwrap());
        let mut server = s.unwrap().0;
        assert!(enable_rx_timestamps(&stamped));
        let before = crate::common::now_ns();
        server.write_all(b"one tick").await.unwrap();
        let mut buf = [0u8; 64];
        let (n, stamp) = stamped.read_stamped(&mut buf).await.unwrap();
        let after = crate::common::now_ns();
        assert_eq!(&buf[..n], b"one tick");
        let stamp = stamp.expect("a stamp");
        assert!(
            before <= stamp && stamp <= after,
            "{before} <= {stamp} <= {after}"
        );

        let (c, s) = tokio::join!(connect(addr, None), l.accept());
        let mut plain = Stream::Plain(c.unwrap());
        s.unwrap().0.write_all(b"x").await.unwrap();
        let (n, stamp) = plain.read_stamped(&mut buf).await.unwrap();
        assert_eq!((n, stamp), (1, None));
    }
}
