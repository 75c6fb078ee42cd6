//! `tickgate client`: a deliberately small blocking WebSocket client for the demo, so
//! trying the server needs nothing but this binary. `ws://`, and `wss://` with `--ca FILE`
//! naming the PEM certificate(s) to trust (no system roots are built in).
//!
//! It writes the upgrade request by hand, checks the `101` and `Sec-WebSocket-Accept`,
//! sends one `subscribe`, then prints every text message, answering pings.
//!
//! Recovery (PROTOCOL.md section 10): it keeps the last `seq` of every symbol
//! ([`Resume`]) and, when the connection ends in a way worth retrying (a drain's `1001`,
//! a lost connection, `4000`, `4008`, `1011`), reconnects with backoff, to the next of its
//! URLs (`--url` takes a comma-separated list: the nodes of a cluster), subscribing with
//! `since`, so a rolling restart loses no tick. It says on stderr what it resumed from,
//! and counts gaps and duplicates (there should be none) and resets. A failure before the
//! first session (refused upgrade, TLS, wrong URL) is an error, not retried.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;

use crate::feed::resume::{Resume, Seen};
use crate::proto::frame::{OpCode, encode_client_frame_into};
use crate::proto::http::accept_key;

/// `(tls, host:port, path)`.
fn parse_ws_url(url: &str) -> Result<(bool, String, String), String> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("ws://") {
        (false, r)
    } else if let Some(r) = url.strip_prefix("wss://") {
        (true, r)
    } else {
        return Err("only ws:// and wss:// URLs are supported".into());
    };
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/v1/stream"),
    };
    let host = if host.contains(':') && !host.ends_with(']') {
        host.to_string()
    } else {
        format!("{host}:{}", if tls { 443 } else { 80 })
    };
    Ok((tls, host, path.to_string()))
}

/// The host part of `host:port` (brackets of an IPv6 literal removed) for SNI and checks.
fn server_name(host_port: &str) -> Result<rustls::pki_types::ServerName<'static>, String> {
    let host = match host_port.rfind(':') {
        Some(i) => &host_port[..i],
        None => host_port,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    rustls::pki_types::ServerName::try_from(host.to_string()).map_err(|e| format!("{host}: {e}"))
}

fn tls_client(ca: &Path) -> Result<Arc<rustls::ClientConfig>, String> {
    crate::tls::client_config_from_ca_file(ca).map_err(|e| format!("--ca {e}"))
}

fn mask() -> [u8; 4] {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(7);
    n.to_le_bytes()
}

fn send_text(s: &mut impl Write, text: &str) -> std::io::Result<()> {
    let mut out = Vec::new();
    encode_client_frame_into(OpCode::Text, true, text.as_bytes(), mask(), &mut out);
    s.write_all(&out)
}

/// What `tickgate client` was asked to do.
pub struct ClientArgs<'a> {
    /// One URL, or several separated by commas (tried in turn on reconnects).
    pub url: &'a str,
    pub token: &'a str,
    pub symbols: &'a str,
    /// Stop after this many messages (0 = forever).
    pub count: u64,
    pub ca: Option<&'a Path>,
    /// Reconnect with `since` when a session ends in a retryable way.
    pub reconnect: bool,
}

/// How one session ended.
enum End {
    /// `count` messages printed.
    Done,
    /// The server closed with this code.
    Closed(u16),
}

/// Close codes after which a reconnect can succeed: going away (drain), abnormal (lost),
/// server error, idle, slow consumer.
fn retryable(code: u16) -> bool {
    matches!(code, 1001 | 1006 | 1011 | 1012 | 1013 | 4000 | 4008)
}

/// Consecutive failed reconnects before giving up.
const MAX_RETRIES: u32 = 10;

pub fn run(args: &ClientArgs<'_>) -> Result<(), String> {
    let urls: Vec<&str> = args
        .url
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect();
    if urls.is_empty() {
        return Err("--url is empty".into());
    }
    let symbols = args.symbols.split(',').map(|x| x.trim().to_owned());
    let mut st = State {
        resume: Resume::new(symbols),
        printed: 0,
        count: args.count,
        gaps: 0,
        duplicates: 0,
        resets: 0,
    };
    let mut sessions = 0u32;
    let mut failures = 0u32;
    let mut next = 0usize;
    loop {
        let url = urls[next % urls.len()];
        let before = st.printed;
        let r = connect_once(url, args, &mut st);
        match r {
            Ok(End::Done) => return Ok(()),
            Ok(End::Closed(code)) if !args.reconnect || !retryable(code) => return Ok(()),
            Err(e) if !args.reconnect || sessions == 0 && before == st.printed => return Err(e),
            Ok(End::Closed(_)) => {}
            Err(e) => eprintln!("connection to {url} ended: {e}"),
        }
        if st.printed > before {
            sessions += 1;
            failures = 0;
        } else {
            failures += 1;
            if failures > MAX_RETRIES {
                return Err(format!("gave up after {MAX_RETRIES} failed reconnects"));
            }
        }
        next += 1;
        // 100 ms doubling to 5 s, with up to a third of jitter so a drained node's clients
        // do not all come back in the same millisecond.
        let base = 100u64 << failures.min(6);
        let jitter = u64::from(u32::from_le_bytes(mask())) % (base / 3 + 1);
        std::thread::sleep(std::time::Duration::from_millis(base.min(5_000) + jitter));
        let since = st.resume.subscribe(0);
        eprintln!(
            "reconnecting to {} with since {} (so far: {} gaps, {} duplicates, {} resets)",
            urls[next % urls.len()],
            since
                .get("since")
                .map_or_else(|| "{}".to_string(), |v| v.to_string()),
            st.gaps,
            st.duplicates,
            st.resets
        );
    }
}

/// What lives across sessions.
struct State {
    resume: Resume,
    printed: u64,
    count: u64,
    gaps: u64,
    duplicates: u64,
    resets: u64,
}

fn connect_once(url: &str, args: &ClientArgs<'_>, st: &mut State) -> Result<End, String> {
    let (tls, host, path) = parse_ws_url(url)?;
    let tcp = TcpStream::connect(&host).map_err(|e| format!("connect {host}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    if !tls {
        let mut s = tcp;
        return stream(&mut s, &host, &path, args.token, st);
    }
    let ca = args
        .ca
        .ok_or("wss:// needs --ca FILE (the PEM certificate(s) to trust)")?;
    let conn =
        rustls::ClientConnection::new(tls_client(ca)?, server_name(&host)?).map_err(|e| e.to_string())?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    stream(&mut s, &host, &path, args.token, st)
}

fn stream(
    s: &mut (impl Read + Write),
    host: &str,
    path: &str,
    token: &str,
    st: &mut State,
) -> Result<End, String> {
    let key = "dGhlIHNhbXBsZSBub25jZQ==";
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: md.v1.json\r\nAuthorization: Bearer {token}\r\n\r\n"
    );
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let head_end = loop {
        let n = s.read(&mut chunk).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err(format!("server closed: {}", String::from_utf8_lossy(&buf)));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 16 * 1024 {
            return Err("response head too large".into());
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    if !head.starts_with("HTTP/1.1 101") {
        return Err(format!("upgrade refused: {}", head.lines().next().unwrap_or("")));
    }
    let expected = accept_key(key);
    if !head
        .lines()
        .any(|l| l.to_ascii_lowercase().starts_with("sec-websocket-accept:") && l.contains(&expected))
    {
        return Err("bad Sec-WebSocket-Accept".into());
    }
    buf.drain(..head_end);
    send_text(s, &st.resume.subscribe(1).to_string()).map_err(|e| e.to_string())?;
    loop {
        // Parse as many server frames (unmasked) as are buffered.
        while buf.len() >= 2 {
            let op = buf[0] & 0x0f;
            let (len, hl) = match buf[1] & 0x7f {
                126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
                127 if buf.len() >= 10 => {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&buf[2..10]);
                    (u64::from_be_bytes(b) as usize, 10)
                }
                126 | 127 => break,
                n => (n as usize, 2),
            };
            if len > 16 * 1024 * 1024 {
                return Err("frame too large".into());
            }
            if buf.len() < hl + len {
                break;
            }
            let payload = buf[hl..hl + len].to_vec();
            buf.drain(..hl + len);
            match op {
                0x1 => {
                    println!("{}", String::from_utf8_lossy(&payload));
                    if let Ok(m) = serde_json::from_slice::<serde_json::Value>(&payload) {
                        match st.resume.observe(&m) {
                            Seen::Gap { expected, got } => {
                                st.gaps += 1;
                                eprintln!("gap: expected seq {expected}, got {got}");
                            }
                            Seen::Duplicate { seq } => {
                                st.duplicates += 1;
                                eprintln!("duplicate: seq {seq} again");
                            }
                            Seen::Snapshot { reset: true } => st.resets += 1,
                            _ => {}
                        }
                    }
                    st.printed += 1;
                    if st.count > 0 && st.printed >= st.count {
                        return Ok(End::Done);
                    }
                }
                0x8 => {
                    let code = if payload.len() >= 2 {
                        u16::from_be_bytes([payload[0], payload[1]])
                    } else {
                        1005
                    };
                    println!(
                        "closed by server: {code} {}",
                        String::from_utf8_lossy(payload.get(2..).unwrap_or(&[]))
                    );
                    return Ok(End::Closed(code));
                }
                0x9 => {
                    let mut out = Vec::new();
                    encode_client_frame_into(OpCode::Pong, true, &payload, mask(), &mut out);
                    s.write_all(&out).map_err(|e| e.to_string())?;
                }
                _ => {}
            }
        }
        let n = s.read(&mut chunk).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}
