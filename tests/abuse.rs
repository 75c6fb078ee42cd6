//! The attacks of issue 14, one client each, against a one-shard server (so the attacker
//! and everyone else share one event loop): while each runs, a well-behaved client from
//! another loopback address (`127.0.0.2`) must still upgrade, subscribe and receive a
//! published tick, and the attacker must get the answer the contract names. Every attack is
//! bounded in bytes and time; the only timeouts are generous failure bounds. (The admin
//! listener's attack is in `admin_abuse.rs`.)

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// A client socket from `source` (another loopback address than the attacker's).
fn connect_from(source: [u8; 4], addr: SocketAddr) -> std::io::Result<TcpStream> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    s.bind(&SocketAddr::from((source, 0)).into())?;
    s.connect(&addr.into())?;
    Ok(s.into())
}

/// Upgrade from 127.0.0.2 with tokio-tungstenite and consume the welcome.
async fn session_from_other_address(srv: &TestServer, token: &str) -> Ws {
    let std = connect_from([127, 0, 0, 2], srv.addr()).expect("connect from 127.0.0.2");
    std.set_nonblocking(true).unwrap();
    let tcp = tokio::net::TcpStream::from_std(std).unwrap();
    let mut req = srv.url().into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::client_async(req, tokio_tungstenite::MaybeTlsStream::Plain(tcp))
        .await
        .expect("upgrade from 127.0.0.2");
    assert_eq!(next_json(&mut ws).await["type"], "welcome");
    ws
}

/// The well-behaved client's check: a fresh upgrade from another address, a subscribe,
/// and a tick published through another fresh connection, all within generous bounds.
async fn still_served(srv: &TestServer, symbol: &str) {
    let check = async {
        let mut sub = session_from_other_address(srv, &srv.token("watcher")).await;
        send_json(
            &mut sub,
            serde_json::json!({"op":"subscribe","id":1,"symbols":[symbol]}),
        )
        .await;
        assert_eq!(next_json(&mut sub).await["type"], "subscribed");
        let mut publ = session_from_other_address(srv, &srv.publisher_token("feed")).await;
        let tick = serde_json::json!({"s":symbol,"ts":1,"bid":1.0,"ask":2.0,"last":1.5,"qty":1.0});
        send_json(
            &mut publ,
            serde_json::json!({"op":"publish","id":9,"ticks":[tick]}),
        )
        .await;
        assert_eq!(next_json(&mut publ).await["type"], "published");
        loop {
            let m = next_json(&mut sub).await;
            if m["type"] == "tick" {
                assert_eq!(m["s"], symbol);
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), check)
        .await
        .expect("the well-behaved client was served during the attack");
}

fn one_shard() -> tickgate::config::Config {
    let mut cfg = test_config(1);
    cfg.limits.inbound_messages_per_sec = 50;
    cfg
}

/// Hole 1: an endless request head, no token. The server reads it in bounded turns, answers
/// `400` once `max_head_bytes` are in and closes; the loop serves others meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_head_is_cut_at_the_head_limit_and_never_holds_the_loop() {
    let srv = start(one_shard());
    let addr = srv.addr();
    let stop = Arc::new(AtomicBool::new(false));
    let attacker = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(b"GET /v1/stream HTTP/1.1\r\nHost: x\r\nX-Junk: ")
                .unwrap();
            let junk = vec![b'A'; 64 * 1024];
            let mut sent = 0usize;
            let started = Instant::now();
            // Keep the socket full until the server closes it (or a bound is reached).
            while !stop.load(Ordering::Relaxed)
                && sent < (256 << 20)
                && started.elapsed() < Duration::from_secs(30)
            {
                match s.write(&junk) {
                    Ok(n) => sent += n,
                    Err(_) => break,
                }
            }
            let mut resp = Vec::new();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let _ = s.read_to_end(&mut resp);
            (sent, String::from_utf8_lossy(&resp).into_owned())
        })
    };
    // The first check may run while the attacker is still being read: it must not wait
    // for the attack to end.
    still_served(&srv, "HEAD-1").await;
    stop.store(true, Ordering::Relaxed);
    let (sent, resp) = attacker.join().unwrap();
    // What the kernel buffers plus the head limit; the old loop read 256 MiB one byte at
    // a time and never answered.
    assert!(
        sent < (64 << 20),
        "the attacker wrote {sent} bytes before the close"
    );
    assert!(
        resp.is_empty() || status_of(&resp) == 400,
        "a 400 (or a reset when the answer was lost in unread data): {resp:?}"
    );
    still_served(&srv, "HEAD-2").await;
}

/// Masks a client frame (RFC 6455: clients must mask).
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x80 | opcode];
    let key = [1u8, 2, 3, 4];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    f.extend_from_slice(&key);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    f
}

/// Server frames (unmasked) in `buf`: (opcode, payload) pairs, as far as they are complete.
fn server_frames(buf: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i + 2 <= buf.len() {
        let op = buf[i] & 0x0f;
        let (len, h) = match buf[i + 1] & 0x7f {
            126 if i + 4 <= buf.len() => (u16::from_be_bytes([buf[i + 2], buf[i + 3]]) as usize, 4),
            127 if i + 10 <= buf.len() => (
                u64::from_be_bytes(buf[i + 2..i + 10].try_into().unwrap()) as usize,
                10,
            ),
            n if n < 126 => (n as usize, 2),
            _ => break,
        };
        if i + h + len > buf.len() {
            break;
        }
        out.push((op, buf[i + h..i + h + len].to_vec()));
        i += h + len;
    }
    out
}

/// Hole 2: a client that pings as fast as it can and never reads. Pongs are coalesced and
/// pings count against the message rate: the connection ends with `4029` after ten
/// `rate_limited` replies, holding one pong at a time, instead of growing gigabytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ping_flood_that_never_reads_is_closed_with_4029() {
    let srv = start(one_shard());
    let addr = srv.addr();
    let token = srv.token("pinger");
    let attacker = std::thread::spawn(move || {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_recv_buffer_size(4096).unwrap();
        s.connect(&addr.into()).unwrap();
        let mut s: TcpStream = s.into();
        s.write_all(&upgrade_req(
            "/v1/stream",
            &format!("Authorization: Bearer {token}\r\n"),
        ))
        .unwrap();
        let mut head = [0u8; 12];
        s.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"HTTP/1.1 101");
        let ping = client_frame(0x9, &[7u8; 125]);
        let burst: Vec<u8> = ping.iter().copied().cycle().take(ping.len() * 64).collect();
        s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
        let started = Instant::now();
        let mut sent = 0usize;
        while started.elapsed() < Duration::from_secs(3) && sent < (64 << 20) {
            match s.write(&burst) {
                Ok(n) => sent += n,
                Err(_) => break,
            }
        }
        // Now read what the server sent (it is in our receive buffer, or on its way).
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        buf
    });
    still_served(&srv, "PING-1").await;
    let buf = attacker.join().unwrap();
    // Skip the rest of the 101 head.
    let start = buf.windows(4).position(|w| w == b"\r\n\r\n").map_or(0, |p| p + 4);
    let frames = server_frames(&buf[start..]);
    let pongs = frames.iter().filter(|(op, _)| *op == 0xA).count();
    let close = frames
        .iter()
        .find(|(op, _)| *op == 0x8)
        .map(|(_, p)| u16::from_be_bytes([p[0], p[1]]));
    assert_eq!(close, Some(4029), "frames: {} pongs of {}", pongs, frames.len());
    // The burst (50 messages) plus the refill over the flood, never one pong per ping.
    assert!(pongs <= 200, "{pongs} pongs");
    still_served(&srv, "PING-2").await;
}

/// Hole 3: silent sockets from one address. The per-IP bound stops them at their share,
/// a full table evicts the flood's oldest silent socket for a newcomer, the first-byte
/// deadline closes what stays silent, and every refusal is in the security log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sockets_cannot_lock_out_other_addresses() {
    let mut cfg = one_shard();
    cfg.server.pending_handshakes_per_shard = 64;
    cfg.limits.per_ip_pending_handshakes = 64;
    cfg.limits.first_byte_timeout = Duration::from_secs(3);
    let srv = start(cfg);
    // 200 silent sockets from 127.0.0.1: far more than the table.
    let silent: Vec<TcpStream> = (0..200)
        .map(|_| TcpStream::connect(srv.addr()).unwrap())
        .collect();
    // The table is full of them, yet another address upgrades and is served.
    still_served(&srv, "SILENT-1").await;
    let log = srv.log_lines().join("\n");
    assert!(log.contains("\"reason\":\"pending_evicted\""), "{log}");
    // The silent ones are closed: evicted, or at the first-byte deadline.
    let mut closed = 0;
    for mut s in silent {
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut b = [0u8; 1];
        if matches!(s.read(&mut b), Ok(0) | Err(_)) {
            closed += 1;
        }
    }
    assert_eq!(closed, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_ip_pending_bound_refuses_only_that_address() {
    let mut cfg = one_shard();
    cfg.server.pending_handshakes_per_shard = 64;
    cfg.limits.per_ip_pending_handshakes = 8;
    let srv = start(cfg);
    let silent: Vec<TcpStream> = (0..8).map(|_| TcpStream::connect(srv.addr()).unwrap()).collect();
    // Give the shard a moment to accept them all (a complete exchange on the same loop).
    still_served(&srv, "PERIP-1").await;
    // The ninth from the same address is closed at once (no response).
    let mut ninth = TcpStream::connect(srv.addr()).unwrap();
    ninth.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut b = [0u8; 1];
    assert!(matches!(ninth.read(&mut b), Ok(0) | Err(_)));
    let log = srv.log_lines().join("\n");
    assert!(log.contains("\"reason\":\"pending_per_ip\""), "{log}");
    assert!(log.contains("\"ip\":\"127.0.0.1\""), "{log}");
    drop(silent);
}

/// Hole 5: a subscriber entitled to `BTC-*` subscribes and unsubscribes rounds of made-up
/// symbols. Nothing reaches the server-wide table (it stays at the published symbols), a
/// new symbol can still be published, and a subscription made before a symbol's first
/// tick still receives that tick, on either shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_cannot_fill_the_symbol_table() {
    let mut cfg = test_config(2);
    cfg.feed.max_symbols = 100;
    cfg.limits.max_symbols_per_connection = 50;
    let srv = start(cfg);
    let mut c = srv.claims("mallory");
    c.symbols = vec!["BTC-*".into()];
    let mut ws = session(&srv, &srv.sign(&c)).await;
    for round in 0..20 {
        let names: Vec<String> = (0..50).map(|i| format!("BTC-J{round:03}{i:04}")).collect();
        send_json(&mut ws, serde_json::json!({"op":"subscribe","symbols":names})).await;
        let ack = next_json(&mut ws).await;
        assert_eq!(ack["symbols"].as_array().unwrap().len(), 50, "{ack}");
        send_json(&mut ws, serde_json::json!({"op":"unsubscribe","symbols":names})).await;
        assert_eq!(next_json(&mut ws).await["type"], "unsubscribed");
    }
    assert_eq!(
        srv.handle.shared.hub.symbols().len(),
        0,
        "no tick published, no symbol"
    );
    assert_eq!(
        srv.handle.shared.hub.symbols().waiting_len(),
        0,
        "released on unsubscribe"
    );
    // Subscribers on both shards wait for a symbol that does not exist yet...
    let mut early = Vec::new();
    for i in 0..6 {
        let mut s = session(&srv, &srv.token(&format!("early{i}"))).await;
        send_json(
            &mut s,
            serde_json::json!({"op":"subscribe","symbols":["NEWCOIN-USD"]}),
        )
        .await;
        assert_eq!(
            next_json(&mut s).await["symbols"],
            serde_json::json!(["NEWCOIN-USD"])
        );
        early.push(s);
    }
    // ...its first tick is published (the table has room: it was never filled)...
    let mut publ = session(&srv, &srv.publisher_token("feed")).await;
    let tick = serde_json::json!({"s":"NEWCOIN-USD","ts":1,"bid":1.0,"ask":2.0,"last":1.5,"qty":1.0});
    send_json(
        &mut publ,
        serde_json::json!({"op":"publish","id":1,"ticks":[tick]}),
    )
    .await;
    assert_eq!(next_json(&mut publ).await["type"], "published");
    // ...and every early subscriber receives it, as seq 1.
    for s in &mut early {
        let t = next_json(s).await;
        assert_eq!(
            (t["type"].as_str(), t["seq"].as_u64()),
            (Some("tick"), Some(1)),
            "{t}"
        );
    }
    assert_eq!(srv.handle.shared.hub.symbols().len(), 1);
    // A connection that leaves while waiting releases its wait.
    let mut gone = session(&srv, &srv.token("gone")).await;
    send_json(
        &mut gone,
        serde_json::json!({"op":"subscribe","symbols":["NEVER-1"]}),
    )
    .await;
    next_json(&mut gone).await;
    assert_eq!(srv.handle.shared.hub.symbols().waiting_len(), 1);
    drop(gone);
    let deadline = Instant::now() + Duration::from_secs(10);
    while srv.handle.shared.hub.symbols().waiting_len() != 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(srv.handle.shared.hub.symbols().waiting_len(), 0);
}

/// Issue 15 defect: a message over `max_message_bytes` closes once with `1009` and a reason
/// naming the cause, and is logged once, however much of it keeps arriving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_too_big_closes_once_with_its_reason() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let srv = start(one_shard());
    let mut ws = session(&srv, &srv.token("big")).await;
    let big = "x".repeat(2 << 20);
    let _ = ws.send(Message::Text(big.into())).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut close = None;
    while let Ok(Some(Ok(m))) = tokio::time::timeout_at(deadline, ws.next()).await {
        if let Message::Close(Some(f)) = m {
            close = Some((u16::from(f.code), f.reason.to_string()));
            break;
        }
    }
    assert_eq!(close, Some((1009, "message too big".to_string())));
    drop(ws);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lines: Vec<String> = srv
        .log_lines()
        .into_iter()
        .filter(|l| l.contains("\"event\":\"close\""))
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("\"reason\":\"message_too_big\""), "{lines:?}");
}
