//! `baseline`: the comparison server, written the way a typical Rust service would be.
//!
//! tokio multi-thread runtime, tokio-tungstenite, one task per connection, and a
//! `Mutex<HashMap<symbol, SymState>>` holding each symbol's `seq` and the
//! `mpsc::UnboundedSender`s of its subscribers. It speaks the subset of tickgate's wire
//! contract the load generator uses: `Authorization: Bearer` verified with tickgate's
//! `Verifier` (EdDSA, kid, exp/iat/lifetime), `welcome`, `subscribe`/`subscribed`,
//! `unsubscribe`/`unsubscribed`, `publish`/`published` (per-symbol `seq`), `tick` messages of
//! the same JSON shape, `ping`/`pong`, `reauth`/`reauthed`. No origin checks, rate limits,
//! caps, timers or conflation: it is the yardstick, not a product.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use tickgate::auth::jwt::{Role, VerifiedClaims, Verifier, VerifyPolicy};
use tickgate::auth::keys::KeySet;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

#[derive(Parser, Debug)]
#[command(
    name = "baseline",
    about = "Typical tokio + tokio-tungstenite market-data server (comparison)"
)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: SocketAddr,
    /// Directory with KID.pub (`tickgate keygen` output); used when --pub is not given.
    #[arg(long)]
    key_dir: Option<PathBuf>,
    /// SPKI PEM public key file.
    #[arg(long = "pub")]
    pub_file: Option<PathBuf>,
    #[arg(long, default_value = "k1")]
    kid: String,
    /// Tokio worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

type Tx = mpsc::UnboundedSender<Message>;

#[derive(Default)]
struct SymState {
    seq: u64,
    subs: Vec<(u64, Tx)>,
}

struct App {
    verifier: Verifier,
    symbols: Mutex<HashMap<String, SymState>>,
    next_id: AtomicU64,
}

fn main() {
    let args = Args::parse();
    let path = match (&args.pub_file, &args.key_dir) {
        (Some(p), _) => p.clone(),
        (None, Some(d)) => d.join(format!("{}.pub", args.kid)),
        (None, None) => {
            eprintln!("baseline: --pub FILE or --key-dir DIR is required");
            std::process::exit(1);
        }
    };
    let keys = match KeySet::load(&[(args.kid.clone(), path)], None) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("baseline: {e}");
            std::process::exit(1);
        }
    };
    let app = Arc::new(App {
        verifier: Verifier::new(keys, VerifyPolicy::default()),
        symbols: Mutex::new(HashMap::new()),
        next_id: AtomicU64::new(1),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let listener = match TcpListener::bind(args.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("baseline: bind {}: {e}", args.listen);
                std::process::exit(2);
            }
        };
        eprintln!("baseline: listening on {}", args.listen);
        loop {
            if let Ok((stream, _)) = listener.accept().await {
                let app = app.clone();
                tokio::spawn(async move {
                    let _ = stream.set_nodelay(true);
                    handle(app, stream).await;
                });
            }
        }
    });
}

fn reject(status: StatusCode) -> ErrorResponse {
    let mut r = ErrorResponse::new(None);
    *r.status_mut() = status;
    r
}

// tungstenite's handshake callback returns its (large) `ErrorResponse` by value.
#[allow(clippy::result_large_err)]
async fn handle(app: Arc<App>, stream: TcpStream) {
    let mut claims: Option<VerifiedClaims> = None;
    let cb = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        if req.uri().path() != "/v1/stream" {
            return Err(reject(StatusCode::NOT_FOUND));
        }
        let token = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| reject(StatusCode::UNAUTHORIZED))?;
        match app.verifier.verify(token, tickgate::cli::unix_now()) {
            Ok(c) => {
                claims = Some(c);
                Ok(resp)
            }
            Err(_) => Err(reject(StatusCode::UNAUTHORIZED)),
        }
    };
    let Ok(ws) = tokio_tungstenite::accept_hdr_async(stream, cb).await else {
        return;
    };
    let Some(mut claims) = claims else { return };
    let id = app.next_id.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
    let (mut sink, mut stream) = ws.split();
    let welcome =
        json!({"type":"welcome","sub":claims.sub,"sid":claims.sid,"exp":claims.exp,"heartbeat_ms":15000});
    if sink
        .send(Message::Text(welcome.to_string().into()))
        .await
        .is_err()
    {
        return;
    }
    let mut mine: Vec<String> = Vec::new();
    loop {
        tokio::select! {
            m = stream.next() => {
                let text = match m {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                    Some(Ok(Message::Binary(_))) | Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                };
                let reply = on_message(&app, id, &tx, &mut claims, &mut mine, &text);
                if let Some(r) = reply && sink.send(Message::Text(r.into())).await.is_err() {
                    break;
                }
            }
            Some(m) = rx.recv() => {
                if sink.send(m).await.is_err() {
                    break;
                }
            }
        }
    }
    let mut map = app.symbols.lock().unwrap();
    for s in &mine {
        if let Some(st) = map.get_mut(s) {
            st.subs.retain(|(c, _)| *c != id);
        }
    }
}

#[derive(Deserialize)]
struct ClientMsg {
    op: String,
    id: Option<Value>,
    #[serde(default)]
    symbols: Vec<String>,
    #[serde(default)]
    ticks: Vec<TickIn>,
    token: Option<String>,
}

#[derive(Deserialize)]
struct TickIn {
    s: String,
    ts: u64,
    bid: f64,
    ask: f64,
    last: f64,
    qty: f64,
}

fn entitled(c: &VerifiedClaims, sym: &str) -> bool {
    c.symbols.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => sym.starts_with(prefix),
        None => p == sym,
    })
}

fn error(id: &Option<Value>, code: &str, message: &str) -> String {
    json!({"type":"error","id":id,"code":code,"message":message}).to_string()
}

fn on_message(
    app: &App,
    conn: u64,
    tx: &Tx,
    claims: &mut VerifiedClaims,
    mine: &mut Vec<String>,
    text: &str,
) -> Option<String> {
    let msg: ClientMsg = match serde_json::from_str(text) {
        Ok(m) => m,
        Err(e) => return Some(error(&None, "bad_request", &e.to_string())),
    };
    match msg.op.as_str() {
        "ping" => Some(json!({"type":"pong","id":msg.id}).to_string()),
        "subscribe" => {
            if !claims.has_role(Role::Subscriber) {
                return Some(error(&msg.id, "forbidden", "subscriber role required"));
            }
            let mut ok = vec![];
            let mut rejected = vec![];
            let mut map = app.symbols.lock().unwrap();
            for s in msg.symbols {
                if !entitled(claims, &s) {
                    rejected.push(json!({"symbol":s,"code":"forbidden"}));
                } else if !mine.contains(&s) {
                    map.entry(s.clone()).or_default().subs.push((conn, tx.clone()));
                    mine.push(s.clone());
                    ok.push(s);
                } else {
                    ok.push(s);
                }
            }
            Some(json!({"type":"subscribed","id":msg.id,"symbols":ok,"rejected":rejected}).to_string())
        }
        "unsubscribe" => {
            let mut map = app.symbols.lock().unwrap();
            for s in &msg.symbols {
                if let Some(st) = map.get_mut(s) {
                    st.subs.retain(|(c, _)| *c != conn);
                }
                mine.retain(|m| m != s);
            }
            Some(json!({"type":"unsubscribed","id":msg.id,"symbols":msg.symbols}).to_string())
        }
        "publish" => {
            if !claims.has_role(Role::Publisher) {
                return Some(error(&msg.id, "forbidden", "publisher role required"));
            }
            if msg.ticks.iter().any(|t| !entitled(claims, &t.s)) {
                return Some(error(&msg.id, "forbidden", "not entitled"));
            }
            let count = msg.ticks.len();
            let mut map = app.symbols.lock().unwrap();
            for t in msg.ticks {
                let st = map.entry(t.s.clone()).or_default();
                st.seq += 1;
                let out = json!({"type":"tick","s":t.s,"seq":st.seq,"ts":t.ts,
                    "bid":t.bid,"ask":t.ask,"last":t.last,"qty":t.qty})
                .to_string();
                let bytes = Utf8Bytes::from(out);
                st.subs
                    .retain(|(_, s)| s.send(Message::Text(bytes.clone())).is_ok());
            }
            Some(json!({"type":"published","id":msg.id,"count":count}).to_string())
        }
        "reauth" => {
            let Some(tok) = msg.token else {
                return Some(error(&msg.id, "bad_request", "token required"));
            };
            match app.verifier.verify(&tok, tickgate::cli::unix_now()) {
                Ok(c) if c.sub == claims.sub && c.sid == claims.sid => {
                    let exp = c.exp;
                    *claims = c;
                    Some(json!({"type":"reauthed","id":msg.id,"exp":exp}).to_string())
                }
                _ => Some(error(&msg.id, "forbidden", "reauth refused")),
            }
        }
        _ => Some(error(&msg.id, "unknown_op", "unknown op")),
    }
}
