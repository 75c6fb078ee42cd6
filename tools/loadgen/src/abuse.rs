//! `abuse` mode: replays one of five denial-of-service attacks against a tickgate build
//! while a well-behaved **watcher** on a second loopback address measures whether the
//! server keeps serving everyone else. Meant to be rerun unchanged against any build, before
//! and after a fix.
//!
//! Timeline: the watcher connects (`--watchers` subscribers of `--watch-symbol` from
//! `--source`, several so that every shard is likely to hold one) and waits for a tick on
//! each; `--baseline` seconds of baseline; the attack from 127.0.0.1 (::1 for an IPv6 URL)
//! for `--duration` seconds; the attack's epilogue (at most ~3 s: reading what the server
//! sent, waiting for closes, the `symbols` checks). Throughout, every 500 ms the watcher
//! also makes a fresh authenticated upgrade and a `GET /healthz` on the admin listener (with
//! `admin`, also `GET /readyz` and an admin-token `POST /admin/revoke` of a made-up `sub`),
//! each with a 2 s timeout. With `--server-pid`, VmRSS is sampled every 100 ms.
//!
//! The attacks (one client each, from 127.0.0.1):
//! - `head`: an endless request head (`GET /v1/stream`, no token, then `X-Junk: ` and 64 KiB
//!   blocks of `A` as fast as the socket takes them). Expected: `400`/`431`, then close,
//!   before the attack's end.
//! - `pings`: an authenticated WebSocket with a 4 KiB `SO_RCVBUF` sending masked 125-byte
//!   pings as fast as possible and never reading. Afterwards it reads what the server sent
//!   and looks for the close frame. Expected: close `4008` or `4029`, or the connection
//!   dropped (a reset or EOF: a close frame cannot always reach a peer that never reads).
//! - `silent`: `--conns` (2100) TCP connections that send nothing. Expected: the server
//!   closes every one of them within the run (this needs `--duration` above the server's
//!   `limits.handshake_timeout`), and upgrades from the watcher keep succeeding.
//! - `admin`: `--conns` (16) admin connections sending `GET /metrics ...` one byte every 2 s
//!   (one refused at once, e.g. because a watcher probe held a slot, reconnects, up to 3
//!   times). Expected: every healthz/readyz/revoke answers 200, and the server closes the slow
//!   connections within the run (a request deadline below `--duration`).
//! - `symbols`: a subscriber entitled to `BTC-*` subscribes and unsubscribes `--rounds`
//!   rounds of 1,024 made-up symbols (`BTC-J<round:03><i:04>`), backing off after a
//!   `rate_limited`. Then a publisher (entitled to `*`) publishes one tick of
//!   `--new-symbol`, which must answer `published`; a fresh subscriber subscribes to it and
//!   must receive the next published tick. `tickgate_symbols` from `/metrics` is reported
//!   before, after the rounds and at the end.
//!
//! Exit status: 0 when the "done" criteria hold, 1 naming the failed ones (or on bad
//! arguments), 2 when the run could not be set up (no watcher ticks, for instance).
//! Criteria: `tick_rate` (every watcher connection's tick rate during the attack within
//! 10 % of its own baseline), `upgrades` (every watcher upgrade during the attack answered
//! `101`), `rss` (server RSS peak minus before under 64 MiB, with `--server-pid`),
//! `expected_answer` (the attack's, above), `admin_endpoints` (`admin` only: every healthz,
//! readyz and revoke answered 200), `baseline` (no watcher probe failed before the attack:
//! otherwise the setup, not the attack, is at fault).

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::{Args, ValueEnum};
use ed25519_dalek::SigningKey;
use serde_json::{Value, json};
use tickgate::auth::mint::{self, Claims};
use tickgate::feed::symbol::is_valid_symbol;
use tickgate::proto::frame::{OpCode, encode_client_frame_into};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Semaphore, oneshot};
use tokio::time::{Instant, sleep, sleep_until, timeout, timeout_at};

use crate::common::{Report, rss_kib};
use crate::lean;

/// Watcher probes: one of each kind every this often.
const PROBE_EVERY: Duration = Duration::from_millis(500);
/// A probe that takes longer fails.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Token lifetime (well under the default 15 min maximum; a run lasts < 1 min).
const TOKEN_TTL: u64 = 300;
/// "Within 10 % of baseline".
const RATE_TOLERANCE: f64 = 0.10;
/// RSS growth bound, MiB.
const RSS_GROWTH_MAX_MIB: f64 = 64.0;
/// After the attack: how long to wait for the server's answer or close.
const GRACE: Duration = Duration::from_secs(1);
/// `admin`: reconnects of a slow request that was refused at once.
const ADMIN_RETRIES: usize = 3;
/// Symbols per `symbols` round (the default `max_symbols_per_connection`).
const ROUND_SYMBOLS: usize = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Attack {
    /// Endless request head, no token.
    Head,
    /// Ping flood on a socket that is never read.
    Pings,
    /// Many TCP connections that send nothing.
    Silent,
    /// Slow requests holding the admin listener.
    Admin,
    /// Subscribe/unsubscribe rounds of made-up symbols (symbol table exhaustion).
    Symbols,
}

impl Attack {
    fn name(self) -> &'static str {
        match self {
            Attack::Head => "head",
            Attack::Pings => "pings",
            Attack::Silent => "silent",
            Attack::Admin => "admin",
            Attack::Symbols => "symbols",
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct AbuseArgs {
    /// The attack to replay.
    #[arg(long, value_enum)]
    pub attack: Attack,
    /// The public listener: `ws://IP:PORT[/path]`, loopback only (path: /v1/stream).
    #[arg(long)]
    pub url: String,
    /// The admin listener: `IP:PORT`, loopback only.
    #[arg(long)]
    pub admin: String,
    /// PKCS#8 PEM private key (`tickgate keygen` output) to mint tokens with.
    #[arg(long)]
    pub key: PathBuf,
    #[arg(long, default_value = "k1")]
    pub kid: String,
    /// Seconds of attack (1..=60).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds of watcher baseline before the attack (1..=10).
    #[arg(long, default_value_t = 3.0)]
    pub baseline: f64,
    /// The server's pid: VmRSS before, after and peak.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// The symbol the watcher subscribes to (the simulator's).
    #[arg(long, default_value = "BTC-USD")]
    pub watch_symbol: String,
    /// The watcher's source address (loopback; the attacker uses 127.0.0.1).
    #[arg(long, default_value = "127.0.0.2")]
    pub source: IpAddr,
    /// Watcher subscriber connections (1..=32; several, so every shard likely has one).
    #[arg(long, default_value_t = 8)]
    pub watchers: usize,
    /// `silent`: TCP connections (default 2100, at most 10000); `admin`: slow requests
    /// (default 16, at most 256).
    #[arg(long)]
    pub conns: Option<usize>,
    /// `symbols`: subscribe/unsubscribe rounds of 1,024 made-up symbols (1..=1000).
    #[arg(long, default_value_t = 100)]
    pub rounds: usize,
    /// `symbols`: the brand-new symbol published after the rounds.
    #[arg(long, default_value = "NEWCOIN-USD")]
    pub new_symbol: String,
    /// `head`, `pings`: stop sending after this many MiB.
    #[arg(long, default_value_t = 2048)]
    pub max_send_mib: u64,
    /// `pings`: stop the flood once the server's RSS grew this many MiB (with
    /// --server-pid; far past the 64 MiB criterion, it only protects the host).
    #[arg(long, default_value_t = 512)]
    pub rss_stop_mib: u64,
    /// Label for the report (e.g. the build's name).
    #[arg(long, default_value = "")]
    pub label: String,
}

/// Everything resolved from the arguments, shared by the attacker and the watcher thread.
struct Setup {
    a: AbuseArgs,
    target: SocketAddr,
    path: String,
    host: String,
    admin: SocketAddr,
    attacker: IpAddr,
    key: SigningKey,
}

impl Setup {
    fn new(a: AbuseArgs) -> Result<Setup, String> {
        let (target, path) = parse_url(&a.url)?;
        let admin = parse_admin(&a.admin)?;
        if !a.source.is_loopback() {
            return Err(format!("--source {}: loopback only", a.source));
        }
        if a.source.is_ipv4() != target.is_ipv4() || admin.is_ipv4() != target.is_ipv4() {
            return Err("--url, --admin and --source must be the same address family".into());
        }
        let attacker = if target.is_ipv4() {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            IpAddr::V6(Ipv6Addr::LOCALHOST)
        };
        if a.source == attacker {
            eprintln!("loadgen abuse: warning: --source {attacker} is the attacker's address too");
        }
        if !(1.0..=60.0).contains(&a.duration) || !(1.0..=10.0).contains(&a.baseline) {
            return Err("bounds: --duration 1..=60 s, --baseline 1..=10 s".into());
        }
        if !(1..=32).contains(&a.watchers) || !(1..=1000).contains(&a.rounds) {
            return Err("bounds: --watchers 1..=32, --rounds 1..=1000".into());
        }
        let max_conns = match a.attack {
            Attack::Admin => 256,
            _ => 10_000,
        };
        if a.conns.is_some_and(|n| n == 0 || n > max_conns) {
            return Err(format!("bounds: --conns 1..={max_conns} for {}", a.attack.name()));
        }
        if a.max_send_mib == 0 || a.max_send_mib > 65_536 {
            return Err("bounds: --max-send-mib 1..=65536".into());
        }
        for (flag, s) in [
            ("--watch-symbol", &a.watch_symbol),
            ("--new-symbol", &a.new_symbol),
        ] {
            if !is_valid_symbol(s) {
                return Err(format!("{flag} {s:?}: not a valid symbol"));
            }
        }
        if let Some(pid) = a.server_pid
            && rss_kib(pid).is_none()
        {
            return Err(format!("--server-pid {pid}: no /proc/{pid}/status VmRSS"));
        }
        let key = mint::load_signing_key(&a.key).map_err(|e| format!("--key: {e}"))?;
        Ok(Setup {
            host: target.to_string(),
            a,
            target,
            path,
            admin,
            attacker,
            key,
        })
    }

    fn token(&self, sub: &str, roles: &[&str], symbols: &[&str]) -> String {
        let now = tickgate::cli::unix_now();
        let c = Claims {
            sub: sub.into(),
            exp: now + TOKEN_TTL,
            iat: Some(now),
            sid: Some(format!("{sub}-s")),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            symbols: symbols.iter().map(|s| s.to_string()).collect(),
            ..Claims::default()
        };
        mint::sign_token(&self.key, &self.a.kid, &c)
    }

    fn conns(&self) -> usize {
        self.a.conns.unwrap_or(match self.a.attack {
            Attack::Admin => 16,
            _ => 2100,
        })
    }

    fn upgrade_request(&self, token: &str) -> Vec<u8> {
        format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Authorization: Bearer {token}\r\n\r\n",
            self.path, self.host
        )
        .into_bytes()
    }
}

fn check_loopback(ip: IpAddr, flag: &str) -> Result<(), String> {
    if ip.is_loopback() {
        Ok(())
    } else {
        Err(format!("{flag} {ip}: loopback only (127.0.0.0/8, ::1)"))
    }
}

/// `ws://IP:PORT[/path]` -> (address, path). Only IP literals: no name resolution.
fn parse_url(u: &str) -> Result<(SocketAddr, String), String> {
    let rest = u
        .strip_prefix("ws://")
        .ok_or_else(|| format!("--url {u}: ws://IP:PORT only (plain, loopback)"))?;
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/v1/stream"),
    };
    let addr: SocketAddr = hostport
        .parse()
        .map_err(|_| format!("--url {u}: the host must be an IP literal with a port"))?;
    check_loopback(addr.ip(), "--url")?;
    Ok((addr, path.to_string()))
}

/// `IP:PORT` (an `http://` prefix and a trailing `/` are tolerated).
fn parse_admin(s: &str) -> Result<SocketAddr, String> {
    let t = s.strip_prefix("http://").unwrap_or(s).trim_end_matches('/');
    let addr: SocketAddr = t.parse().map_err(|_| format!("--admin {s}: IP:PORT expected"))?;
    check_loopback(addr.ip(), "--admin")?;
    Ok(addr)
}

/// Connects to `target` from `src` (any port), optionally with a small receive buffer.
async fn connect_from(src: IpAddr, target: SocketAddr, rcvbuf: Option<u32>) -> io::Result<TcpStream> {
    let sock = if target.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(n) = rcvbuf {
        sock.set_recv_buffer_size(n)?;
    }
    if src.is_ipv4() {
        crate::lean::bind_address_no_port(&sock);
    }
    sock.bind(SocketAddr::new(src, 0))?;
    let s = sock.connect(target).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionAborted
    )
}

fn io_word(e: &io::Error) -> String {
    if is_reset(e) {
        "reset".into()
    } else if e.kind() == io::ErrorKind::UnexpectedEof {
        "eof".into()
    } else {
        e.to_string()
    }
}

/// The status code of an HTTP response head (`HTTP/1.1 431 ...`).
fn parse_status(head: &[u8]) -> Option<u16> {
    let line = head.split(|&b| b == b'\n').next()?;
    let code = line.split(|&b| b == b' ').nth(1)?;
    std::str::from_utf8(code).ok()?.trim().parse().ok()
}

/// The first line of an HTTP response, for the report.
fn status_line(head: &[u8]) -> String {
    let line = head.split(|&b| b == b'\n').next().unwrap_or(b"");
    String::from_utf8_lossy(line).trim().chars().take(80).collect()
}

/// The code of a close frame's payload.
fn close_code(p: &[u8]) -> Option<u16> {
    (p.len() >= 2).then(|| u16::from_be_bytes([p[0], p[1]]))
}

/// One request on a fresh connection from `src`; (status, body). Reads to the end of the
/// body (`Content-Length`) or EOF.
async fn http_exchange(src: IpAddr, to: SocketAddr, req: &[u8]) -> Result<(u16, String), String> {
    let mut s = connect_from(src, to, None)
        .await
        .map_err(|e| format!("connect: {}", io_word(&e)))?;
    s.write_all(req).await.map_err(|e| io_word(&e))?;
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        if let Some(p) = lean::find(&got, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..p]).to_ascii_lowercase();
            let cl = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok());
            if let Some(cl) = cl
                && got.len() >= p + 4 + cl
            {
                let status = parse_status(&got).ok_or("malformed answer")?;
                return Ok((
                    status,
                    String::from_utf8_lossy(&got[p + 4..p + 4 + cl]).into_owned(),
                ));
            }
        }
        match s.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                if got.len() > 4 << 20 {
                    return Err("answer over 4 MiB".into());
                }
            }
            Err(e) if got.is_empty() => return Err(io_word(&e)),
            Err(_) => break,
        }
    }
    if got.is_empty() {
        return Err("closed without an answer".into());
    }
    let status = parse_status(&got).ok_or("malformed answer")?;
    let body = lean::find(&got, b"\r\n\r\n").map_or(&got[..0], |p| &got[p + 4..]);
    Ok((status, String::from_utf8_lossy(body).into_owned()))
}

fn get_request(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").into_bytes()
}

/// `tickgate_symbols` from the admin `/metrics`.
async fn metrics_symbols(st: &Setup) -> Option<u64> {
    let (status, body) = timeout(
        PROBE_TIMEOUT,
        http_exchange(st.attacker, st.admin, &get_request("/metrics")),
    )
    .await
    .ok()?
    .ok()?;
    if status != 200 {
        return None;
    }
    body.lines()
        .find_map(|l| l.strip_prefix("tickgate_symbols "))
        .and_then(|v| v.trim().parse().ok())
}

/// What the next server frame was.
enum Ev {
    Text(Vec<u8>),
    Close(Option<u16>),
    Eof,
    Reset,
    Err(String),
}

fn io_ev(e: io::Error) -> Ev {
    if is_reset(&e) {
        Ev::Reset
    } else {
        Ev::Err(e.to_string())
    }
}

fn ev_word(e: &Ev) -> String {
    match e {
        Ev::Text(_) => "open".into(),
        Ev::Close(Some(c)) => format!("close {c}"),
        Ev::Close(None) => "close (no code)".into(),
        Ev::Eof => "eof".into(),
        Ev::Reset => "reset".into(),
        Ev::Err(e) => e.clone(),
    }
}

/// A small WebSocket client over a raw socket: hand-written upgrade, server frames parsed
/// with the lean client's parser, pings answered.
struct Ws {
    s: TcpStream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Ws {
    async fn open(st: &Setup, src: IpAddr, token: &str, rcvbuf: Option<u32>) -> Result<Ws, String> {
        let mut s = connect_from(src, st.target, rcvbuf)
            .await
            .map_err(|e| format!("connect: {}", io_word(&e)))?;
        let mut buf = vec![0u8; 16 * 1024];
        let (status, end) = lean::upgrade(&mut s, &st.upgrade_request(token), &mut buf)
            .await
            .map_err(|e| io_word(&e))?;
        if status != 101 {
            return Err(format!("HTTP {status}"));
        }
        Ok(Ws {
            s,
            buf,
            start: 0,
            end,
        })
    }

    async fn send_text(&mut self, text: &str) -> io::Result<()> {
        let mut out = Vec::with_capacity(text.len() + 14);
        lean::text_frame(text.as_bytes(), &mut out);
        self.s.write_all(&out).await
    }

    /// The next text or close frame (pings are answered on the way). Cancel-safe between
    /// frames: it only awaits a read or a (tiny) pong write.
    async fn next(&mut self) -> Ev {
        loop {
            if let Some(f) = lean::parse_frame(&self.buf[self.start..self.end]) {
                let (ps, pe) = (self.start + f.start, self.start + f.end);
                self.start += f.end;
                match f.opcode {
                    1 => return Ev::Text(self.buf[ps..pe].to_vec()),
                    8 => return Ev::Close(close_code(&self.buf[ps..pe])),
                    9 => {
                        let mut out = Vec::new();
                        lean::pong_frame(&self.buf[ps..pe], &mut out);
                        if let Err(e) = self.s.write_all(&out).await {
                            return io_ev(e);
                        }
                    }
                    _ => {}
                }
                continue;
            }
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.end == self.buf.len() {
                if self.buf.len() >= 16 << 20 {
                    return Ev::Err("frame over 16 MiB".into());
                }
                self.buf.resize(self.buf.len() * 2, 0);
            }
            match self.s.read(&mut self.buf[self.end..]).await {
                Ok(0) => return Ev::Eof,
                Ok(n) => self.end += n,
                Err(e) => return io_ev(e),
            }
        }
    }

    /// The next text message whose `id` is `id` (or an `error` without an id, such as
    /// `rate_limited`), as JSON; other messages are skipped.
    async fn reply(&mut self, id: u64, wait: Duration) -> Result<Value, String> {
        let deadline = Instant::now() + wait;
        loop {
            match timeout_at(deadline, self.next()).await {
                Err(_) => return Err("no reply".into()),
                Ok(Ev::Text(t)) => {
                    let Ok(v) = serde_json::from_slice::<Value>(&t) else {
                        continue;
                    };
                    let no_id_error = v["type"] == "error" && v.get("id").is_none();
                    if v["id"] == id || no_id_error {
                        return Ok(v);
                    }
                }
                Ok(other) => return Err(ev_word(&other)),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The watcher (its own thread and runtime, so the attacker's busy loop cannot delay it).

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum ProbeKind {
    Upgrade,
    Healthz,
    Readyz,
    Revoke,
}

struct Probe {
    kind: ProbeKind,
    at: Instant,
    latency: Duration,
    result: Result<(), String>,
}

struct WatchState {
    /// Receipt times of the watch symbol's ticks, per watcher connection.
    ticks: Vec<Mutex<Vec<Instant>>>,
    /// How each watcher connection ended (`None`: still open).
    ends: Vec<Mutex<Option<String>>>,
    probes: Mutex<Vec<Probe>>,
    rss: Mutex<Vec<(Instant, u64)>>,
    stop: AtomicBool,
    inflight: AtomicUsize,
}

fn spawn_watcher(
    st: Arc<Setup>,
    ws: Arc<WatchState>,
    ready: oneshot::Sender<Result<(), String>>,
) -> io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("abuse-watcher".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            rt.block_on(watch(st, ws, ready));
        })
}

async fn watch(st: Arc<Setup>, ws: Arc<WatchState>, ready: oneshot::Sender<Result<(), String>>) {
    let n = st.a.watchers;
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        tasks.push(tokio::spawn(tick_watcher(st.clone(), ws.clone(), i)));
    }
    let t = Instant::now();
    loop {
        let ticking = ws.ticks.iter().filter(|v| !v.lock().unwrap().is_empty()).count();
        let ended: Vec<String> = ws
            .ends
            .iter()
            .enumerate()
            .filter_map(|(i, e)| e.lock().unwrap().as_ref().map(|e| format!("#{i}: {e}")))
            .collect();
        if ticking == n {
            let _ = ready.send(Ok(()));
            break;
        }
        if !ended.is_empty() || t.elapsed() > Duration::from_secs(10) {
            let _ = ready.send(Err(format!(
                "{ticking}/{n} watcher connections received a {} tick within {:.1} s{}",
                st.a.watch_symbol,
                t.elapsed().as_secs_f64(),
                if ended.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", ended.join(", "))
                }
            )));
            for t in &tasks {
                t.abort();
            }
            return;
        }
        sleep(Duration::from_millis(20)).await;
    }
    let admin_token = Arc::new(st.token("abuse-admin", &["admin"], &[]));
    let mut kinds = vec![ProbeKind::Upgrade, ProbeKind::Healthz];
    if st.a.attack == Attack::Admin {
        kinds.extend([ProbeKind::Readyz, ProbeKind::Revoke]);
    }
    let mut probe_iv = tokio::time::interval(PROBE_EVERY);
    let mut rss_iv = tokio::time::interval(Duration::from_millis(100));
    let mut seq = 0u64;
    while !ws.stop.load(Relaxed) {
        tokio::select! {
            _ = probe_iv.tick() => {
                seq += 1;
                for &kind in &kinds {
                    let (st, ws, admin_token) = (st.clone(), ws.clone(), admin_token.clone());
                    ws.inflight.fetch_add(1, Relaxed);
                    tokio::spawn(async move {
                        let at = Instant::now();
                        let (latency, result) = probe(&st, kind, seq, &admin_token).await;
                        ws.probes.lock().unwrap().push(Probe { kind, at, latency, result });
                        ws.inflight.fetch_sub(1, Relaxed);
                    });
                }
            }
            _ = rss_iv.tick() => {
                if let Some(kib) = st.a.server_pid.and_then(rss_kib) {
                    ws.rss.lock().unwrap().push((Instant::now(), kib));
                }
            }
        }
    }
    // Let the probes in flight finish (they time out after PROBE_TIMEOUT).
    let t = Instant::now();
    while ws.inflight.load(Relaxed) > 0 && t.elapsed() < PROBE_TIMEOUT + Duration::from_millis(500) {
        sleep(Duration::from_millis(10)).await;
    }
    for t in &tasks {
        t.abort();
    }
}

async fn tick_watcher(st: Arc<Setup>, ws: Arc<WatchState>, i: usize) {
    let end = |why: String| *ws.ends[i].lock().unwrap() = Some(why);
    let sym = st.a.watch_symbol.as_str();
    let token = st.token(&format!("abuse-watch-{i}"), &["subscriber"], &[sym]);
    let mut c = match timeout(PROBE_TIMEOUT * 2, Ws::open(&st, st.a.source, &token, None)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return end(format!("upgrade: {e}")),
        Err(_) => return end("upgrade: timeout".into()),
    };
    let sub = json!({"op": "subscribe", "id": 1, "symbols": [sym]}).to_string();
    if let Err(e) = c.send_text(&sub).await {
        return end(format!("subscribe: {}", io_word(&e)));
    }
    let tick_symbol = format!("\"s\":\"{sym}\"");
    loop {
        if ws.stop.load(Relaxed) {
            return;
        }
        match timeout(Duration::from_millis(200), c.next()).await {
            Err(_) => {}
            Ok(Ev::Text(p)) => match lean::msg_type(&p) {
                Some(b"tick") if lean::find(&p, tick_symbol.as_bytes()).is_some() => {
                    ws.ticks[i].lock().unwrap().push(Instant::now());
                }
                Some(b"subscribed") if lean::find(&p, b"\"rejected\":[{").is_some() => {
                    return end(format!("subscribe rejected: {}", String::from_utf8_lossy(&p)));
                }
                _ => {}
            },
            Ok(other) => return end(ev_word(&other)),
        }
    }
}

/// One probe; (latency, outcome).
async fn probe(st: &Setup, kind: ProbeKind, n: u64, admin_token: &str) -> (Duration, Result<(), String>) {
    // Minting is not part of the measured latency.
    let req = match kind {
        ProbeKind::Upgrade => st.upgrade_request(&st.token(
            &format!("abuse-probe-{n}"),
            &["subscriber"],
            &[&st.a.watch_symbol],
        )),
        ProbeKind::Healthz => get_request("/healthz"),
        ProbeKind::Readyz => get_request("/readyz"),
        ProbeKind::Revoke => {
            let body = format!("{{\"sub\":\"nobody-{n}\"}}");
            format!(
                "POST /admin/revoke HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {admin_token}\r\n\
                 Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .into_bytes()
        }
    };
    let t = Instant::now();
    let work = async {
        let status = if kind == ProbeKind::Upgrade {
            let mut s = connect_from(st.a.source, st.target, None)
                .await
                .map_err(|e| format!("connect: {}", io_word(&e)))?;
            let mut buf = vec![0u8; 1024];
            let (status, _) = lean::upgrade(&mut s, &req, &mut buf)
                .await
                .map_err(|e| io_word(&e))?;
            if status == 101 {
                let mut out = Vec::new();
                crate::lean::close_frame(&mut out);
                let _ = s.write_all(&out).await;
            }
            status
        } else {
            http_exchange(st.a.source, st.admin, &req).await?.0
        };
        let want = if kind == ProbeKind::Upgrade { 101 } else { 200 };
        if status == want {
            Ok(())
        } else {
            Err(format!("HTTP {status}"))
        }
    };
    let result = match timeout(PROBE_TIMEOUT, work).await {
        Ok(r) => r,
        Err(_) => Err("timeout".into()),
    };
    (t.elapsed(), result)
}

// ---------------------------------------------------------------------------------------
// The attacks. Each runs until `deadline` (plus its epilogue) and says what happened to
// its connection(s) and whether that is the expected answer.

struct Outcome {
    rows: Vec<(String, Value)>,
    /// One line: what happened to the attacker.
    attacker: String,
    /// The attack's own criterion: `Err` says why it failed.
    verdict: Result<(), String>,
    /// Set by the flood attacks when they stopped early to protect the host.
    stopped_early: Option<String>,
}

impl Outcome {
    fn new() -> Outcome {
        Outcome {
            rows: vec![],
            attacker: String::new(),
            verdict: Ok(()),
            stopped_early: None,
        }
    }
    fn add(&mut self, k: &str, v: impl Into<Value>) {
        self.rows.push((k.to_string(), v.into()));
    }
    fn fail(mut self, attacker: String, why: String) -> Outcome {
        self.attacker = attacker;
        self.verdict = Err(why);
        self
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 100.0).round() / 100.0
}

async fn attack_head(st: &Setup, t0: Instant, deadline: Instant) -> Outcome {
    let mut o = Outcome::new();
    let s = match connect_from(st.attacker, st.target, None).await {
        Ok(s) => s,
        Err(e) => {
            let w = format!("connect failed: {}", io_word(&e));
            return o.fail(w.clone(), w);
        }
    };
    let (mut rd, mut wr) = s.into_split();
    // The reader: the server's answer (first 4 KiB) and how the connection ended.
    let reader = tokio::spawn(async move {
        let mut head = Vec::new();
        let mut answered = None;
        let mut buf = [0u8; 4096];
        let end = loop {
            match rd.read(&mut buf).await {
                Ok(0) => break "eof".to_string(),
                Ok(n) => {
                    answered.get_or_insert_with(Instant::now);
                    if head.len() < 4096 {
                        head.extend_from_slice(&buf[..n.min(4096 - head.len())]);
                    }
                }
                Err(e) => break io_word(&e),
            }
        };
        (head, answered, end, Instant::now())
    });
    let prefix = b"GET /v1/stream HTTP/1.1\r\nHost: x\r\nX-Junk: ";
    let chunk = vec![b'A'; 64 * 1024];
    let cap = st.a.max_send_mib << 20;
    let mut sent = 0u64;
    let mut write_end = "deadline".to_string();
    let mut data: &[u8] = prefix;
    let mut off = 0usize;
    loop {
        if Instant::now() >= deadline {
            break;
        }
        if sent >= cap {
            write_end = format!("--max-send-mib {} reached", st.a.max_send_mib);
            o.stopped_early = Some(write_end.clone());
            break;
        }
        if reader.is_finished() {
            write_end = "server closed".into();
            break;
        }
        match timeout_at(deadline, wr.write(&data[off..])).await {
            Err(_) => break,
            Ok(Ok(n)) => {
                sent += n as u64;
                off += n;
                if off == data.len() {
                    data = &chunk;
                    off = 0;
                }
            }
            Ok(Err(e)) => {
                write_end = format!("write: {}", io_word(&e));
                break;
            }
        }
    }
    let stopped = Instant::now();
    let mut reader = reader;
    let res = timeout(GRACE * 2, &mut reader).await;
    let (head, answered, end, closed_at) = match res {
        Ok(Ok(r)) => r,
        _ => {
            reader.abort();
            (Vec::new(), None, "still open".to_string(), Instant::now())
        }
    };
    drop(wr);
    let status = parse_status(&head);
    let since = |t: Instant| ms(t.duration_since(t0));
    o.add("head_bytes_accepted", sent);
    o.add(
        "head_mib_accepted",
        (sent as f64 / 1048576.0 * 100.0).round() / 100.0,
    );
    o.add("head_sending_s", secs(stopped.duration_since(t0)));
    o.add("head_sending_ended", write_end);
    o.add(
        "head_answer",
        if head.is_empty() {
            "none".to_string()
        } else {
            status_line(&head)
        },
    );
    if let Some(t) = answered {
        o.add("head_answer_ms", since(t));
    }
    o.add("head_connection", end.clone());
    if end != "still open" {
        o.add("head_closed_ms", since(closed_at));
    }
    let answer = match status {
        Some(s) => format!("HTTP {s}"),
        None if head.is_empty() => "no answer".into(),
        None => "a malformed answer".into(),
    };
    let closed_in_time = end != "still open" && closed_at <= deadline;
    let answered_in_time = answered.is_some_and(|t| t <= deadline);
    o.attacker = match (end.as_str(), answered) {
        ("still open", _) => format!(
            "{answer}, still open {:.1} s after the attack",
            secs(closed_at.duration_since(deadline))
        ),
        (_, Some(t)) => format!(
            "{answer} after {:.0} ms and {} KiB, then {end} at {:.0} ms",
            since(t),
            sent / 1024,
            since(closed_at)
        ),
        (_, None) => format!(
            "{answer}, {end} at {:.0} ms after {} KiB",
            since(closed_at),
            sent / 1024
        ),
    };
    o.verdict = if matches!(status, Some(400 | 431)) && answered_in_time && closed_in_time {
        Ok(())
    } else if matches!(status, Some(400 | 431)) {
        Err(format!("{answer} only after the attack ended ({})", o.attacker))
    } else {
        Err(format!(
            "expected 400/431 and a close during the attack, got {}",
            o.attacker
        ))
    };
    o
}

async fn attack_pings(st: &Setup, t0: Instant, deadline: Instant) -> Outcome {
    let mut o = Outcome::new();
    let token = st.token("abuse-pings", &["subscriber"], &[&st.a.watch_symbol]);
    let mut c = match timeout(PROBE_TIMEOUT * 2, Ws::open(st, st.attacker, &token, Some(4096))).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            let w = format!("upgrade failed: {e}");
            return o.fail(w.clone(), w);
        }
        Err(_) => return o.fail("upgrade timed out".into(), "upgrade timed out".into()),
    };
    // The welcome, then never read again until the flood ends.
    let _ = timeout(PROBE_TIMEOUT, c.next()).await;
    let mut s = c.s;
    const FRAME: usize = 2 + 4 + 125;
    let mut chunk = Vec::with_capacity(512 * FRAME);
    for i in 0..512u32 {
        encode_client_frame_into(OpCode::Ping, true, &[b'p'; 125], i.to_be_bytes(), &mut chunk);
    }
    let cap = st.a.max_send_mib << 20;
    let rss0 = st.a.server_pid.and_then(rss_kib);
    let mut next_rss = Instant::now();
    let mut sent = 0u64;
    let mut off = 0usize;
    let mut write_end = "deadline".to_string();
    let mut dropped_at = None;
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        if sent >= cap {
            write_end = format!("--max-send-mib {} reached", st.a.max_send_mib);
            o.stopped_early = Some(write_end.clone());
            break;
        }
        if now >= next_rss {
            next_rss = now + Duration::from_millis(100);
            if let (Some(r0), Some(r)) = (rss0, st.a.server_pid.and_then(rss_kib))
                && r.saturating_sub(r0) > st.a.rss_stop_mib << 10
            {
                write_end = format!("server RSS grew past --rss-stop-mib {}", st.a.rss_stop_mib);
                o.stopped_early = Some(write_end.clone());
                break;
            }
        }
        match timeout_at(deadline.min(next_rss), s.write(&chunk[off..])).await {
            Err(_) => {}
            Ok(Ok(n)) => {
                sent += n as u64;
                off = (off + n) % chunk.len();
            }
            Ok(Err(e)) => {
                write_end = format!("write: {}", io_word(&e));
                dropped_at = Some(Instant::now());
                break;
            }
        }
    }
    let flood_end = Instant::now();
    // Now read what the server sent: pongs, and maybe a close frame (or a reset).
    let mut buf = vec![0u8; 256 * 1024];
    let (mut start, mut end) = (0usize, 0usize);
    let mut drained = 0u64;
    let mut pongs = 0u64;
    let mut found: Option<String> = None;
    let mut close: Option<Option<u16>> = None;
    let drain_deadline = Instant::now() + GRACE * 3;
    'drain: loop {
        while let Some(f) = lean::parse_frame(&buf[start..end]) {
            match f.opcode {
                10 => pongs += 1,
                8 => {
                    close = Some(close_code(&buf[start + f.start..start + f.end]));
                    break 'drain;
                }
                _ => {}
            }
            start += f.end;
        }
        buf.copy_within(start..end, 0);
        end -= start;
        start = 0;
        if end == buf.len() {
            found = Some("unparsable stream".into());
            break;
        }
        match timeout_at(drain_deadline, s.read(&mut buf[end..])).await {
            Err(_) => {
                found = Some("still open".into());
                break;
            }
            Ok(Ok(0)) => {
                found = Some("eof".into());
                break;
            }
            Ok(Ok(n)) => {
                drained += n as u64;
                end += n;
            }
            Ok(Err(e)) => {
                found = Some(io_word(&e));
                break;
            }
        }
    }
    lean::set_linger_zero(&s);
    drop(s);
    let pings = sent / FRAME as u64;
    o.add("pings_sent", pings);
    o.add(
        "pings_mib_sent",
        (sent as f64 / 1048576.0 * 100.0).round() / 100.0,
    );
    o.add("pings_flood_s", secs(flood_end.duration_since(t0)));
    o.add("pings_flood_ended", write_end.clone());
    o.add("pings_pongs_read_after", pongs);
    o.add("pings_bytes_read_after", drained);
    let when = dropped_at.map_or(String::new(), |t| {
        format!(" (writes failed at {:.0} ms)", ms(t.duration_since(t0)))
    });
    match close {
        Some(code) => {
            let c = code.map_or("close without code".to_string(), |c| format!("close {c}"));
            o.add("pings_close_code", code.map_or(Value::Null, Value::from));
            o.attacker = format!("{c} after {pongs} pongs{when}");
            o.verdict = match code {
                Some(4008 | 4029) => Ok(()),
                _ => Err(format!("expected close 4008/4029, got {c}")),
            };
        }
        None => {
            let f = found.unwrap_or_default();
            o.add("pings_close_code", Value::Null);
            o.attacker = if f == "still open" {
                format!(
                    "still open after the flood ({pongs} pongs read in {:.0} ms, no close frame)",
                    ms(GRACE * 3)
                )
            } else {
                format!("{f} without a close frame after {pongs} pongs{when}")
            };
            // A peer that never reads may not get the close frame: a drop is still a close.
            o.verdict = if f == "reset" || f == "eof" {
                Ok(())
            } else {
                Err(format!("expected close 4008/4029 or a drop, got: {}", o.attacker))
            };
        }
    }
    o
}

async fn attack_silent(st: &Setup, t0: Instant, deadline: Instant) -> Outcome {
    let mut o = Outcome::new();
    let n = st.conns();
    let sem = Arc::new(Semaphore::new(256));
    let opened = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let closes: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let (sem, opened, failed, closes) = (sem.clone(), opened.clone(), failed.clone(), closes.clone());
        let (src, target) = (st.attacker, st.target);
        tasks.push(tokio::spawn(async move {
            let Ok(permit) = sem.acquire_owned().await else {
                return;
            };
            if Instant::now() >= deadline {
                return;
            }
            let mut s = match timeout_at(
                deadline.min(Instant::now() + PROBE_TIMEOUT),
                connect_from(src, target, None),
            )
            .await
            {
                Ok(Ok(s)) => s,
                _ => {
                    failed.fetch_add(1, Relaxed);
                    return;
                }
            };
            drop(permit);
            lean::set_linger_zero(&s);
            opened.fetch_add(1, Relaxed);
            let mut buf = [0u8; 1024];
            let mut answered = false;
            let how = loop {
                match s.read(&mut buf).await {
                    Ok(0) => break if answered { "answer+eof" } else { "eof" },
                    Ok(_) => answered = true,
                    Err(e) if is_reset(&e) => break if answered { "answer+reset" } else { "reset" },
                    Err(_) => break "error",
                }
            };
            closes.lock().unwrap().push((Instant::now(), how.to_string()));
            // Keep the socket until the end, as a silent client would.
            std::future::pending::<()>().await;
        }));
    }
    let all_opened = async {
        while opened.load(Relaxed) + failed.load(Relaxed) < n as u64 {
            sleep(Duration::from_millis(10)).await;
        }
    };
    let open_ms = match timeout_at(deadline, all_opened).await {
        Ok(()) => Some(ms(t0.elapsed())),
        Err(_) => None,
    };
    sleep_until(deadline + GRACE).await;
    for t in &tasks {
        t.abort();
    }
    let opened = opened.load(Relaxed);
    let closes = closes.lock().unwrap();
    let mut kinds: BTreeMap<&str, u64> = BTreeMap::new();
    for (_, k) in closes.iter() {
        *kinds.entry(k.as_str()).or_default() += 1;
    }
    let first = closes.iter().map(|c| c.0).min();
    let last = closes.iter().map(|c| c.0).max();
    let closed = closes.len() as u64;
    o.add("silent_conns", n as u64);
    o.add("silent_opened", opened);
    o.add("silent_connect_failed", failed.load(Relaxed));
    if let Some(t) = open_ms {
        o.add("silent_all_opened_ms", t);
    }
    o.add("silent_closed_by_server", closed);
    o.add("silent_close_kinds", summarize(&kinds));
    if let (Some(a), Some(b)) = (first, last) {
        o.add("silent_first_close_ms", ms(a.duration_since(t0)));
        o.add("silent_last_close_ms", ms(b.duration_since(t0)));
    }
    o.add("silent_still_open", opened - closed);
    o.attacker = format!(
        "{closed}/{opened} closed by the server ({}){}",
        summarize(&kinds),
        last.map_or(String::new(), |t| format!(
            ", last at {:.0} ms",
            ms(t.duration_since(t0))
        ))
    );
    o.verdict = if opened == 0 {
        Err("no silent connection could be opened".into())
    } else if closed < opened {
        Err(format!(
            "{} of {opened} silent connections still open at the end",
            opened - closed
        ))
    } else {
        Ok(())
    };
    o
}

/// How a slow admin request ended: when, how (`eof`, `reset`, ...) and the status it got.
type SlowEnd = (Instant, String, Option<u16>);

async fn attack_admin(st: &Setup, t0: Instant, deadline: Instant) -> Outcome {
    let mut o = Outcome::new();
    let n = st.conns();
    const REQ: &[u8] = b"GET /metrics HTTP/1.1\r\nHost: x\r\n";
    // Per connection: (when it ended, how, the status it got).
    let results: Arc<Mutex<Vec<SlowEnd>>> = Arc::default();
    let connected = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let (results, connected, failed) = (results.clone(), connected.clone(), failed.clone());
        let (src, admin) = (st.attacker, st.admin);
        let refused = refused.clone();
        tasks.push(tokio::spawn(async move {
            for attempt in 0..=ADMIN_RETRIES {
                let s = match timeout(PROBE_TIMEOUT, connect_from(src, admin, None)).await {
                    Ok(Ok(s)) => s,
                    _ => {
                        failed.fetch_add(1, Relaxed);
                        return;
                    }
                };
                lean::set_linger_zero(&s);
                let opened = Instant::now();
                if attempt == 0 {
                    connected.fetch_add(1, Relaxed);
                }
                let (mut rd, mut wr) = s.into_split();
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                let mut i = 0usize;
                let mut next = Instant::now();
                let how = loop {
                    tokio::select! {
                        r = rd.read(&mut buf) => match r {
                            Ok(0) => break "eof".to_string(),
                            Ok(k) => {
                                if got.len() < 4096 {
                                    got.extend_from_slice(&buf[..k]);
                                }
                            }
                            Err(e) => break io_word(&e),
                        },
                        _ = sleep_until(next), if i < REQ.len() => {
                            if let Err(e) = wr.write_all(&REQ[i..i + 1]).await {
                                break format!("write: {}", io_word(&e));
                            }
                            i += 1;
                            next += Duration::from_secs(2);
                        }
                    }
                };
                let ended = Instant::now();
                // Closed at once without a word (the listener was full, e.g. because a
                // watcher probe held a slot): come back, as an attacker would.
                if got.is_empty()
                    && ended.duration_since(opened) < Duration::from_millis(200)
                    && attempt < ADMIN_RETRIES
                    && ended < deadline
                {
                    refused.fetch_add(1, Relaxed);
                    sleep(Duration::from_millis(50)).await;
                    continue;
                }
                results.lock().unwrap().push((ended, how, parse_status(&got)));
                drop(wr);
                std::future::pending::<()>().await;
            }
        }));
    }
    sleep_until(deadline + GRACE).await;
    for t in &tasks {
        t.abort();
    }
    let connected = connected.load(Relaxed);
    let results = results.lock().unwrap();
    let mut kinds: BTreeMap<String, u64> = BTreeMap::new();
    for (_, how, status) in results.iter() {
        let k = match status {
            Some(s) => format!("HTTP {s} + {how}"),
            None => format!("no answer, {how}"),
        };
        *kinds.entry(k).or_default() += 1;
    }
    let kinds_ref: BTreeMap<&str, u64> = kinds.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    let closed = results.len() as u64;
    let last = results.iter().map(|r| r.0).max();
    o.add("admin_slow_conns", n as u64);
    o.add("admin_slow_connected", connected);
    o.add("admin_slow_connect_failed", failed.load(Relaxed));
    o.add("admin_slow_refused_retried", refused.load(Relaxed));
    o.add("admin_slow_closed_by_server", closed);
    o.add("admin_slow_outcomes", summarize(&kinds_ref));
    if let Some(t) = last {
        o.add("admin_slow_last_close_ms", ms(t.duration_since(t0)));
    }
    o.add("admin_slow_still_open", connected - closed);
    o.attacker = format!(
        "{closed}/{connected} slow requests closed by the server ({})",
        summarize(&kinds_ref)
    );
    o.verdict = if connected == 0 {
        Err("no slow connection could be opened".into())
    } else if closed < connected {
        Err(format!(
            "{} of {connected} slow admin requests still open at the end",
            connected - closed
        ))
    } else {
        Ok(())
    };
    o
}

/// Round `r`'s symbol `i`: `BTC-J` + 3-digit round + 4-digit index (valid syntax).
fn made_up_symbol(r: usize, i: usize) -> String {
    format!("BTC-J{:03}{:04}", r % 1000, i % 10_000)
}

async fn attack_symbols(st: &Setup, t0: Instant, deadline: Instant, before: Option<u64>) -> Outcome {
    let mut o = Outcome::new();
    let opt = |v: Option<u64>| v.map_or(Value::Null, Value::from);
    o.add("symbols_metric_before", opt(before));
    let token = st.token("abuse-symbols", &["subscriber"], &["BTC-*"]);
    let mut c = match timeout(PROBE_TIMEOUT * 2, Ws::open(st, st.attacker, &token, None)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            let w = format!("upgrade failed: {e}");
            return o.fail(w.clone(), w);
        }
        Err(_) => return o.fail("upgrade timed out".into(), "upgrade timed out".into()),
    };
    let mut rounds_done = 0usize;
    let mut accepted = 0u64;
    let mut rejected: BTreeMap<String, u64> = BTreeMap::new();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut rate_limited = 0u64;
    let mut attacker_end: Option<String> = None;
    'rounds: for r in 0..st.a.rounds {
        let syms: Vec<String> = (0..ROUND_SYMBOLS).map(|i| made_up_symbol(r, i)).collect();
        for (k, op) in ["subscribe", "unsubscribe"].into_iter().enumerate() {
            let id = (2 * r + k + 1) as u64;
            let msg = json!({"op": op, "id": id, "symbols": syms}).to_string();
            loop {
                if Instant::now() >= deadline {
                    break 'rounds;
                }
                if let Err(e) = c.send_text(&msg).await {
                    attacker_end = Some(io_word(&e));
                    break 'rounds;
                }
                match c.reply(id, Duration::from_secs(3)).await {
                    Err(e) => {
                        attacker_end = Some(e);
                        break 'rounds;
                    }
                    Ok(v) if v["type"] == "error" && v["code"] == "rate_limited" => {
                        // Back off until the bucket (a second's worth) refills, then resend.
                        rate_limited += 1;
                        sleep(Duration::from_millis(1100)).await;
                    }
                    Ok(v) => {
                        if v["type"] == "subscribed" {
                            accepted += v["symbols"].as_array().map_or(0, |a| a.len() as u64);
                            for x in v["rejected"].as_array().into_iter().flatten() {
                                let code = x["code"].as_str().unwrap_or("?").to_string();
                                *rejected.entry(code).or_default() += 1;
                            }
                        } else if v["type"] == "error" {
                            let e = format!(
                                "{} {}",
                                v["code"].as_str().unwrap_or("?"),
                                v["message"].as_str().unwrap_or("")
                            );
                            *errors.entry(e).or_default() += 1;
                        }
                        break;
                    }
                }
            }
        }
        rounds_done = r + 1;
    }
    let rounds_s = secs(t0.elapsed());
    let after_rounds = metrics_symbols(st).await;
    // The checks: a brand-new symbol can still be published and subscribed to.
    let check = new_symbol_check(st).await;
    let after = metrics_symbols(st).await;
    // Hold the attacker's connection to the end of the window, noting if it is closed.
    if attacker_end.is_none() {
        loop {
            match timeout_at(deadline, c.next()).await {
                Err(_) => break,
                Ok(Ev::Text(_)) => {}
                Ok(other) => {
                    attacker_end = Some(ev_word(&other));
                    break;
                }
            }
        }
    }
    let sum = |m: &BTreeMap<String, u64>| {
        summarize(
            &m.iter()
                .map(|(k, v)| (k.as_str(), *v))
                .collect::<BTreeMap<&str, u64>>(),
        )
    };
    o.add("symbols_rounds_done", rounds_done as u64);
    o.add("symbols_rounds_s", rounds_s);
    o.add("symbols_subscribed", accepted);
    o.add("symbols_rejected", sum(&rejected));
    o.add("symbols_errors", sum(&errors));
    o.add("symbols_rate_limited_replies", rate_limited);
    o.add("symbols_metric_after_rounds", opt(after_rounds));
    o.add("symbols_metric_after", opt(after));
    o.add("symbols_new_symbol", st.a.new_symbol.clone());
    o.add("symbols_publish", check.publish.clone());
    o.add("symbols_fresh_subscriber", check.fresh.clone());
    if let (Some(a), Some(b)) = (after_rounds, after)
        && check.publish == "published"
        && a == b
    {
        o.add(
            "symbols_note",
            format!(
                "{} already existed before the publish (a rerun against the same server?)",
                st.a.new_symbol
            ),
        );
    }
    o.attacker = format!(
        "{} after {rounds_done} rounds",
        attacker_end.as_deref().unwrap_or("still open")
    );
    o.verdict = if check.publish != "published" {
        Err(format!("publish {}: {}", st.a.new_symbol, check.publish))
    } else if check.fresh != "received the tick" {
        Err(format!(
            "fresh subscriber to {}: {}",
            st.a.new_symbol, check.fresh
        ))
    } else {
        Ok(())
    };
    o
}

struct NewSymbolCheck {
    /// `published`, or what came back instead.
    publish: String,
    /// `received the tick`, or what went wrong.
    fresh: String,
}

async fn new_symbol_check(st: &Setup) -> NewSymbolCheck {
    let sym = st.a.new_symbol.as_str();
    let mut out = NewSymbolCheck {
        publish: "not tried".into(),
        fresh: "not tried".into(),
    };
    let ptoken = st.token("abuse-publisher", &["publisher"], &["*"]);
    let mut p = match timeout(PROBE_TIMEOUT * 2, Ws::open(st, st.attacker, &ptoken, None)).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            out.publish = format!("publisher upgrade failed: {e}");
            return out;
        }
        Err(_) => {
            out.publish = "publisher upgrade timed out".into();
            return out;
        }
    };
    let tick = |id: u64, px: f64| {
        json!({"op": "publish", "id": id, "ticks": [{
            "s": sym, "ts": crate::common::now_ns(), "bid": px, "ask": px + 0.5, "last": px + 0.25, "qty": 1
        }]})
        .to_string()
    };
    let publish = async |p: &mut Ws, id: u64, px: f64| -> String {
        if let Err(e) = p.send_text(&tick(id, px)).await {
            return format!("send: {}", io_word(&e));
        }
        match p.reply(id, PROBE_TIMEOUT).await {
            Ok(v) if v["type"] == "published" => "published".into(),
            Ok(v) if v["type"] == "error" => format!(
                "error {} {:?}",
                v["code"].as_str().unwrap_or("?"),
                v["message"].as_str().unwrap_or("")
            ),
            Ok(v) => format!("unexpected {v}"),
            Err(e) => e,
        }
    };
    out.publish = publish(&mut p, 1, 100.0).await;
    let stoken = st.token("abuse-fresh", &["subscriber"], &["*"]);
    let mut s = match timeout(PROBE_TIMEOUT * 2, Ws::open(st, st.attacker, &stoken, None)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            out.fresh = format!("upgrade failed: {e}");
            return out;
        }
        Err(_) => {
            out.fresh = "upgrade timed out".into();
            return out;
        }
    };
    let sub = json!({"op": "subscribe", "id": 7, "symbols": [sym]}).to_string();
    if let Err(e) = s.send_text(&sub).await {
        out.fresh = format!("subscribe: {}", io_word(&e));
        return out;
    }
    match s.reply(7, PROBE_TIMEOUT).await {
        Ok(v)
            if v["type"] == "subscribed"
                && v["symbols"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|x| x == sym)) => {}
        Ok(v) => {
            out.fresh = format!("subscribe answered {v}");
            return out;
        }
        Err(e) => {
            out.fresh = format!("subscribe: {e}");
            return out;
        }
    }
    let second = publish(&mut p, 2, 101.0).await;
    if second != "published" {
        out.fresh = format!("second publish: {second}");
        return out;
    }
    let want = format!("\"s\":\"{sym}\"");
    let until = Instant::now() + PROBE_TIMEOUT;
    out.fresh = loop {
        match timeout_at(until, s.next()).await {
            Err(_) => break "no tick within 2 s".into(),
            Ok(Ev::Text(t)) => {
                if lean::msg_type(&t) == Some(&b"tick"[..]) && lean::find(&t, want.as_bytes()).is_some() {
                    break "received the tick".into();
                }
            }
            Ok(other) => break ev_word(&other),
        }
    };
    out
}

/// `"a ×3, b ×1"` from counts.
fn summarize(m: &BTreeMap<&str, u64>) -> String {
    if m.is_empty() {
        return "none".into();
    }
    m.iter()
        .map(|(k, v)| format!("{k} ×{v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------------------------------
// Measurement.

/// One watcher connection's ticks against the windows: (ticks in the baseline
/// `[b0, a0)`, ticks in the attack `[a0, a1)`, the longest gap between ticks (or from the
/// last tick to `end`) over `[a0, end]`).
fn window_stats(
    ticks: &[Instant],
    b0: Instant,
    a0: Instant,
    a1: Instant,
    end: Instant,
) -> (u64, u64, Duration) {
    let base = ticks.iter().filter(|&&t| t >= b0 && t < a0).count() as u64;
    let during = ticks.iter().filter(|&&t| t >= a0 && t < a1).count() as u64;
    let mut prev = ticks.iter().rev().find(|&&t| t < a0).copied().unwrap_or(a0);
    let mut gap = Duration::ZERO;
    for &t in ticks.iter().filter(|&&t| t >= a0 && t <= end) {
        gap = gap.max(t.duration_since(prev));
        prev = t;
    }
    gap = gap.max(end.saturating_duration_since(prev));
    (base, during, gap)
}

fn mib(kib: u64) -> f64 {
    (kib as f64 / 1024.0 * 10.0).round() / 10.0
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

pub fn main(a: AbuseArgs) -> i32 {
    let st = match Setup::new(a) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            eprintln!("loadgen abuse: {e}");
            return 1;
        }
    };
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(run(st))
}

async fn run(st: Arc<Setup>) -> i32 {
    let a = &st.a;
    let n = a.watchers;
    let ws = Arc::new(WatchState {
        ticks: (0..n).map(|_| Mutex::new(Vec::new())).collect(),
        ends: (0..n).map(|_| Mutex::new(None)).collect(),
        probes: Mutex::new(Vec::new()),
        rss: Mutex::new(Vec::new()),
        stop: AtomicBool::new(false),
        inflight: AtomicUsize::new(0),
    });
    let (tx, rx) = oneshot::channel();
    let handle = match spawn_watcher(st.clone(), ws.clone(), tx) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("loadgen abuse: watcher thread: {e}");
            return 2;
        }
    };
    let join = |h: std::thread::JoinHandle<()>| async move {
        let _ = tokio::task::spawn_blocking(move || h.join()).await;
    };
    let ready = rx
        .await
        .unwrap_or_else(|_| Err("the watcher thread ended".into()));
    if let Err(e) = ready {
        ws.stop.store(true, Relaxed);
        join(handle).await;
        eprintln!("loadgen abuse: setup: {e}");
        return 2;
    }
    let b0 = Instant::now();
    let symbols_before = if a.attack == Attack::Symbols {
        metrics_symbols(&st).await
    } else {
        None
    };
    sleep_until(b0 + Duration::from_secs_f64(a.baseline)).await;
    let a0 = Instant::now();
    let rss0 = a.server_pid.and_then(rss_kib);
    let a1 = a0 + Duration::from_secs_f64(a.duration);
    eprintln!(
        "loadgen abuse: {} for {:.0} s from {} (watcher: {} connections from {})",
        a.attack.name(),
        a.duration,
        st.attacker,
        n,
        a.source
    );
    let out = match a.attack {
        Attack::Head => attack_head(&st, a0, a1).await,
        Attack::Pings => attack_pings(&st, a0, a1).await,
        Attack::Silent => attack_silent(&st, a0, a1).await,
        Attack::Admin => attack_admin(&st, a0, a1).await,
        Attack::Symbols => attack_symbols(&st, a0, a1, symbols_before).await,
    };
    // Let the watcher see the aftermath until the window's end (attacks that end early).
    sleep_until(a1).await;
    let end = Instant::now();
    let rss1 = a.server_pid.and_then(rss_kib);
    ws.stop.store(true, Relaxed);
    join(handle).await;

    // Tick rates and gaps, per watcher connection.
    let base_s = a0.duration_since(b0).as_secs_f64();
    let during_s = a1.duration_since(a0).as_secs_f64();
    let mut base_rates = Vec::new();
    let mut during_rates = Vec::new();
    let mut worst_ratio: Option<f64> = None;
    let mut max_gap = Duration::ZERO;
    let mut base_gap = Duration::ZERO;
    for t in &ws.ticks {
        let t = t.lock().unwrap();
        let (b, d, gap) = window_stats(&t, b0, a0, a1, end);
        let (_, _, bgap) = window_stats(&t, b0, b0, b0, a0);
        base_gap = base_gap.max(bgap);
        max_gap = max_gap.max(gap);
        let br = b as f64 / base_s;
        let dr = d as f64 / during_s;
        base_rates.push(br);
        during_rates.push(dr);
        let ratio = if br > 0.0 { dr / br } else { 0.0 };
        if worst_ratio.is_none_or(|w| (ratio - 1.0).abs() > (w - 1.0).abs()) {
            worst_ratio = Some(ratio);
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    let worst_ratio = worst_ratio.unwrap_or(0.0);
    let watcher_ends: Vec<String> = ws
        .ends
        .iter()
        .enumerate()
        .filter_map(|(i, e)| e.lock().unwrap().as_ref().map(|e| format!("#{i} {e}")))
        .collect();

    // Probes: during = started in [a0, end); baseline = [b0, a0).
    let probes = ws.probes.lock().unwrap();
    let tally = |kind: ProbeKind, from: Instant, to: Instant| {
        let mut ok = 0u64;
        let mut fails: BTreeMap<&str, u64> = BTreeMap::new();
        let mut lat: Vec<Duration> = Vec::new();
        for p in probes
            .iter()
            .filter(|p| p.kind == kind && p.at >= from && p.at < to)
        {
            match &p.result {
                Ok(()) => {
                    ok += 1;
                    lat.push(p.latency);
                }
                Err(e) => *fails.entry(e.as_str()).or_default() += 1,
            }
        }
        lat.sort();
        (ok, fails, lat)
    };
    let (up_ok, up_fail, up_lat) = tally(ProbeKind::Upgrade, a0, end);
    let (hz_ok, hz_fail, _) = tally(ProbeKind::Healthz, a0, end);
    let up_failed: u64 = up_fail.values().sum();
    let hz_failed: u64 = hz_fail.values().sum();
    let mut baseline_failed = 0u64;
    for k in [ProbeKind::Upgrade, ProbeKind::Healthz] {
        baseline_failed += tally(k, b0, a0).1.values().sum::<u64>();
    }

    // RSS.
    let rss_peak = ws
        .rss
        .lock()
        .unwrap()
        .iter()
        .filter(|(t, _)| *t >= a0 && *t <= end)
        .map(|&(_, k)| k)
        .chain(rss0)
        .chain(rss1)
        .max();

    // The report.
    let mut r = Report::new("abuse", &a.label);
    r.add("attack", a.attack.name());
    r.add("url", format!("ws://{}{}", st.target, st.path));
    r.add("admin", st.admin.to_string());
    r.add("attacker_source", st.attacker.to_string());
    r.add("watcher_source", a.source.to_string());
    r.add("watchers", n as u64);
    r.add("baseline_s", round2(base_s));
    r.add("duration_s", round2(during_s));
    r.add("tick_rate_baseline", round2(mean(&base_rates)));
    r.add("tick_rate_during", round2(mean(&during_rates)));
    r.add("tick_rate_during_min", round2(min(&during_rates)));
    r.add("tick_ratio_worst", round2(worst_ratio));
    r.add("max_gap_ms", ms(max_gap));
    r.add("baseline_max_gap_ms", ms(base_gap));
    r.add("watchers_closed", watcher_ends.len() as u64);
    if !watcher_ends.is_empty() {
        r.add("watcher_ends", watcher_ends.join("; "));
    }
    r.add("upgrades_ok", up_ok);
    r.add("upgrades_failed", up_failed);
    if !up_fail.is_empty() {
        r.add("upgrade_failures", summarize(&up_fail));
    }
    if !up_lat.is_empty() {
        r.add("upgrade_p50_ms", ms(up_lat[up_lat.len() / 2]));
        r.add("upgrade_max_ms", ms(*up_lat.last().unwrap()));
    }
    r.add("healthz_ok", hz_ok);
    r.add("healthz_failed", hz_failed);
    if !hz_fail.is_empty() {
        r.add("healthz_failures", summarize(&hz_fail));
    }
    let mut admin_failed = Vec::new();
    if a.attack == Attack::Admin {
        if hz_failed > 0 {
            admin_failed.push(format!("healthz {hz_failed}"));
        }
        for (kind, name) in [(ProbeKind::Readyz, "readyz"), (ProbeKind::Revoke, "revoke")] {
            let (ok, fail, _) = tally(kind, a0, end);
            let failed: u64 = fail.values().sum();
            r.add(&format!("{name}_ok"), ok);
            r.add(&format!("{name}_failed"), failed);
            if failed > 0 {
                r.add(&format!("{name}_failures"), summarize(&fail));
                admin_failed.push(format!("{name} {failed}"));
            }
        }
    }
    if baseline_failed > 0 {
        r.add("baseline_probes_failed", baseline_failed);
    }
    let opt_mib = |k: Option<u64>| k.map_or(Value::Null, |k| Value::from(mib(k)));
    let growth = match (rss0, rss_peak) {
        (Some(r0), Some(p)) => Some(p.saturating_sub(r0)),
        _ => None,
    };
    if a.server_pid.is_some() {
        r.add("server_rss_before_mib", opt_mib(rss0));
        r.add("server_rss_after_mib", opt_mib(rss1));
        r.add("server_rss_peak_mib", opt_mib(rss_peak));
        r.add("server_rss_growth_mib", opt_mib(growth));
        if rss1.is_none() {
            r.add("server_exited", true);
        }
    }
    for (k, v) in out.rows {
        r.add(&k, v);
    }
    if let Some(s) = &out.stopped_early {
        r.add("stopped_early", s.clone());
    }
    r.add("attacker", out.attacker.clone());

    // The criteria.
    let mut failed: Vec<String> = Vec::new();
    let mut why: Vec<String> = Vec::new();
    if base_rates.contains(&0.0)
        || during_rates
            .iter()
            .zip(&base_rates)
            .any(|(d, b)| (d / b - 1.0).abs() > RATE_TOLERANCE)
    {
        failed.push("tick_rate".into());
        why.push(format!(
            "tick_rate: worst watcher at {:.0} % of its baseline (limit ±{:.0} %)",
            worst_ratio * 100.0,
            RATE_TOLERANCE * 100.0
        ));
    }
    if up_failed > 0 || up_ok == 0 {
        failed.push("upgrades".into());
        why.push(format!(
            "upgrades: {up_failed} failed ({}), {up_ok} ok",
            summarize(&up_fail)
        ));
    }
    match growth {
        Some(g) if mib(g) >= RSS_GROWTH_MAX_MIB => {
            failed.push("rss".into());
            why.push(format!(
                "rss: grew {:.1} MiB (limit {RSS_GROWTH_MAX_MIB:.0})",
                mib(g)
            ));
        }
        None if a.server_pid.is_some() => {
            failed.push("rss".into());
            why.push("rss: the server process is gone".into());
        }
        _ => {}
    }
    if !admin_failed.is_empty() {
        failed.push("admin_endpoints".into());
        why.push(format!("admin_endpoints: not 200: {}", admin_failed.join(", ")));
    }
    if let Err(e) = &out.verdict {
        failed.push("expected_answer".into());
        why.push(format!("expected_answer: {e}"));
    }
    if baseline_failed > 0 {
        failed.push("baseline".into());
        why.push(format!(
            "baseline: {baseline_failed} probes failed before the attack (setup?)"
        ));
    }
    let pass = failed.is_empty();
    r.add("pass", pass);
    r.add("failed", Value::from(failed.clone()));
    if a.server_pid.is_none() {
        r.add("note", "no --server-pid: RSS not measured");
    }
    println!(
        "== abuse {}{} ==",
        a.attack.name(),
        if a.label.is_empty() {
            String::new()
        } else {
            format!(" [{}]", a.label)
        }
    );
    r.print(true);
    if pass {
        println!("PASS");
        0
    } else {
        println!("FAIL: {}", failed.join(", "));
        for w in &why {
            println!("  - {w}");
        }
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_loopback_ip_literals() {
        let (a, p) = parse_url("ws://127.0.0.1:18080").unwrap();
        assert_eq!(
            (a.to_string().as_str(), p.as_str()),
            ("127.0.0.1:18080", "/v1/stream")
        );
        let (a, p) = parse_url("ws://[::1]:8080/v1/stream").unwrap();
        assert_eq!((a.port(), p.as_str()), (8080, "/v1/stream"));
        assert!(parse_url("ws://127.9.9.9:1/x").is_ok());
        assert!(parse_url("ws://10.0.0.1:8080").is_err());
        assert!(parse_url("ws://localhost:8080").is_err());
        assert!(parse_url("wss://127.0.0.1:8080").is_err());
        assert!(parse_url("ws://[::ffff:127.0.0.1]:8080").is_err());
        assert!(parse_admin("127.0.0.1:19090").is_ok());
        assert!(parse_admin("http://127.0.0.1:19090/").is_ok());
        assert!(parse_admin("192.168.1.1:19090").is_err());
    }

    #[test]
    fn made_up_symbols_are_valid_and_distinct() {
        let mut all = std::collections::HashSet::new();
        for r in [0, 1, 99, 999] {
            for i in [0, 1, 1023] {
                let s = made_up_symbol(r, i);
                assert!(is_valid_symbol(&s), "{s}");
                assert!(s.starts_with("BTC-J"));
                assert!(all.insert(s));
            }
        }
        assert_eq!(made_up_symbol(7, 42), "BTC-J0070042");
        assert!(is_valid_symbol("NEWCOIN-USD"));
    }

    #[test]
    fn statuses_and_close_codes() {
        assert_eq!(
            parse_status(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"),
            Some(431)
        );
        assert_eq!(parse_status(b"HTTP/1.1 200 OK"), Some(200));
        assert_eq!(parse_status(b"garbage"), None);
        assert_eq!(close_code(&[0x0f, 0xa8, b'x']), Some(4008));
        assert_eq!(close_code(&[0x0f]), None);
    }

    #[test]
    fn windows_and_gaps() {
        let b0 = Instant::now();
        let at = |ms: u64| b0 + Duration::from_millis(ms);
        let ticks: Vec<Instant> = [0, 100, 200, 300, 400, 900, 1000].into_iter().map(at).collect();
        let (base, during, gap) = window_stats(&ticks, b0, at(300), at(1000), at(1200));
        assert_eq!((base, during), (3, 3));
        // 400 -> 900 is the longest gap; the tail 1000 -> 1200 is shorter.
        assert_eq!(gap, Duration::from_millis(500));
        // No tick after 400: the gap runs to the end.
        let (_, _, gap) = window_stats(&ticks[..5], b0, at(300), at(1000), at(2000));
        assert_eq!(gap, Duration::from_millis(1600));
    }
}
