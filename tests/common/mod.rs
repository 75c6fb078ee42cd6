//! Shared helpers for the integration tests: an in-process server on loopback (port 0),
//! token minting, raw HTTP and tokio-tungstenite clients.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ed25519_dalek::SigningKey;
use futures_util::{SinkExt, StreamExt};
use tickgate::auth::keys::KeySet;
use tickgate::auth::mint::{self, Claims};
use tickgate::auth::seclog::SecurityLog;
use tickgate::config::Config;
use tickgate::rt::ServerHandle;
use tickgate::state::{AuthState, Shared};
use tokio::net::TcpStream as TokioTcp;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<TokioTcp>>;

pub struct TestServer {
    pub handle: ServerHandle,
    pub key: SigningKey,
    pub kid: String,
    pub log: Arc<Mutex<Vec<String>>>,
}

pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// A test configuration: loopback, port 0, admin on port 0, generous limits.
pub fn test_config(shards: usize) -> Config {
    let mut cfg = Config::default_production();
    cfg.server.listen = "127.0.0.1:0".parse().unwrap();
    cfg.server.shards = shards;
    cfg.server.pin_cores = false;
    cfg.admin.listen = "127.0.0.1:0".parse().unwrap();
    cfg.auth.allow_missing_origin = true;
    cfg.auth.allowed_origins = vec!["https://app.example.com".into()];
    cfg.limits.per_ip_handshakes_per_sec = 10_000;
    cfg.limits.per_ip_burst = 10_000;
    cfg.limits.inbound_messages_per_sec = 10_000;
    cfg
}

pub fn start(cfg: Config) -> TestServer {
    let key = mint::generate_signing_key().unwrap();
    start_with_key(cfg, key, "k1")
}

pub fn start_with_key(cfg: Config, key: SigningKey, kid: &str) -> TestServer {
    let mut ks = KeySet::new();
    ks.insert(kid, key.verifying_key()).unwrap();
    let auth = AuthState::build(&cfg, ks).unwrap();
    let (log, lines) = SecurityLog::memory();
    let shared = Arc::new(Shared::new(cfg, auth, log));
    let handle = tickgate::rt::start(shared).unwrap();
    TestServer {
        handle,
        key,
        kid: kid.to_string(),
        log: lines,
    }
}

impl TestServer {
    pub fn addr(&self) -> SocketAddr {
        self.handle.public_addr
    }

    pub fn admin(&self) -> SocketAddr {
        self.handle.admin_addr.unwrap()
    }

    pub fn claims(&self, sub: &str) -> Claims {
        let n = now();
        Claims {
            sub: sub.into(),
            exp: n + 300,
            iat: Some(n),
            sid: Some(format!("{sub}-s1")),
            roles: vec!["subscriber".into()],
            symbols: vec!["*".into()],
            ..Claims::default()
        }
    }

    pub fn sign(&self, c: &Claims) -> String {
        mint::sign_token(&self.key, &self.kid, c)
    }

    pub fn token(&self, sub: &str) -> String {
        self.sign(&self.claims(sub))
    }

    pub fn publisher_token(&self, sub: &str) -> String {
        let mut c = self.claims(sub);
        c.roles = vec!["publisher".into(), "subscriber".into()];
        self.sign(&c)
    }

    pub fn admin_token(&self) -> String {
        let mut c = self.claims("ops");
        c.roles = vec!["admin".into()];
        self.sign(&c)
    }

    pub fn url(&self) -> String {
        format!("ws://{}/v1/stream", self.addr())
    }

    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

/// Send raw bytes, read the whole response until the server closes (or 5 s).
pub fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                // A 101 keeps the socket open: stop at the end of the head.
                if out.starts_with(b"HTTP/1.1 101") && out.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn status_of(resp: &str) -> u16 {
    resp.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// A well-formed upgrade request with extra header lines (each ending in \r\n).
pub fn upgrade_req(path: &str, extra: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
    .into_bytes()
}

pub async fn connect(
    url: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
) -> Result<Ws, tungstenite::Error> {
    let mut req = url.into_client_request()?;
    if let Some(t) = token {
        req.headers_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    for (k, v) in headers {
        let name: tokio_tungstenite::tungstenite::http::HeaderName = k.parse().unwrap();
        req.headers_mut().insert(name, v.parse().unwrap());
    }
    let (ws, _resp) = tokio_tungstenite::connect_async(req).await?;
    Ok(ws)
}

/// Next text message as JSON (skipping pings), with a timeout.
pub async fn next_json(ws: &mut Ws) -> serde_json::Value {
    next_json_within(ws, Duration::from_secs(10))
        .await
        .expect("a JSON message")
}

pub async fn next_json_within(ws: &mut Ws, d: Duration) -> Option<serde_json::Value> {
    let deadline = tokio::time::Instant::now() + d;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return Some(serde_json::from_str(&t).unwrap()),
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            _ => return None,
        }
    }
}

/// Wait for the close frame; returns its code.
pub async fn close_code(ws: &mut Ws, d: Duration) -> Option<u16> {
    let deadline = tokio::time::Instant::now() + d;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, ws.next()).await {
            Ok(Some(Ok(Message::Close(Some(f))))) => return Some(f.code.into()),
            Ok(Some(Ok(Message::Close(None)))) => return Some(1005),
            Ok(Some(Ok(_))) => continue,
            _ => return None,
        }
    }
}

pub async fn send_json(ws: &mut Ws, v: serde_json::Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

/// Connect and consume the welcome.
pub async fn session(srv: &TestServer, token: &str) -> Ws {
    let mut ws = connect(&srv.url(), Some(token), &[]).await.expect("upgrade");
    let w = next_json(&mut ws).await;
    assert_eq!(w["type"], "welcome", "{w}");
    ws
}

/// Admin HTTP request (blocking).
pub fn admin_post(addr: SocketAddr, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let r = raw(addr, req.as_bytes());
    let body = r.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status_of(&r), body)
}

/// The lines of a child's pipe (its stdout or stderr), read on a thread of their own. The
/// thread drains the pipe to its end even once the receiver is gone, so the child never
/// blocks on a full pipe.
pub fn line_channel(pipe: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    rx
}
