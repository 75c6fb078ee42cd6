//! The stream after the `101` (PROTOCOL.md sections 5 and 6) with real clients: welcome,
//! ping, protocol errors and their close codes, subscriptions across shards, publishing,
//! snapshots, entitlements, slow consumers.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::time::Duration;

use common::*;
use futures_util::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn welcome_and_ping() {
    let srv = start(test_config(1));
    let mut c = srv.claims("alice");
    c.sid = Some("s-1".into());
    let mut ws = connect(&srv.url(), Some(&srv.sign(&c)), &[]).await.unwrap();
    let w = next_json(&mut ws).await;
    assert_eq!(w["type"], "welcome");
    assert_eq!(w["sub"], "alice");
    assert_eq!(w["sid"], "s-1");
    assert_eq!(w["exp"], c.exp);
    assert_eq!(w["heartbeat_ms"], 15000);
    send_json(&mut ws, json!({"op":"ping","id":4})).await;
    assert_eq!(next_json(&mut ws).await, json!({"type":"pong","id":4}));
    // Bad JSON: an error, and the connection stays usable.
    ws.send(Message::Text("{nope".into())).await.unwrap();
    let e = next_json(&mut ws).await;
    assert_eq!(e["type"], "error");
    assert_eq!(e["code"], "bad_request");
    send_json(&mut ws, json!({"op":"dance","id":9})).await;
    let e = next_json(&mut ws).await;
    assert_eq!(e["code"], "unknown_op");
    assert_eq!(e["id"], 9);
    send_json(&mut ws, json!({"op":"ping"})).await;
    assert_eq!(next_json(&mut ws).await, json!({"type":"pong"}));
}

#[tokio::test]
async fn binary_frame_closes_with_1003() {
    let srv = start(test_config(1));
    let mut ws = session(&srv, &srv.token("a")).await;
    ws.send(Message::Binary(vec![1, 2, 3].into())).await.unwrap();
    assert_eq!(close_code(&mut ws, Duration::from_secs(5)).await, Some(1003));
}

/// Raw socket after a real upgrade, to send frames a well-behaved client library won't.
fn raw_session(srv: &TestServer) -> std::net::TcpStream {
    let t = srv.token("raw");
    let mut s = std::net::TcpStream::connect(srv.addr()).unwrap();
    s.write_all(&upgrade_req(
        "/v1/stream",
        &format!("Authorization: Bearer {t}\r\n"),
    ))
    .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).unwrap();
        head.push(b[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"));
    s
}

/// Read server frames until a close; return its code.
fn read_close(s: &mut std::net::TcpStream) -> Option<u16> {
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Ok(0) | Err(_) => break,
            Ok(n) => all.extend_from_slice(&buf[..n]),
        }
        // Walk frames.
        let mut i = 0;
        while i + 2 <= all.len() {
            let op = all[i] & 0x0f;
            let mut len = (all[i + 1] & 0x7f) as usize;
            let mut h = 2;
            if len == 126 {
                if i + 4 > all.len() {
                    break;
                }
                len = u16::from_be_bytes([all[i + 2], all[i + 3]]) as usize;
                h = 4;
            }
            if i + h + len > all.len() {
                break;
            }
            if op == 8 {
                let p = &all[i + h..i + h + len];
                return Some(if p.len() >= 2 {
                    u16::from_be_bytes([p[0], p[1]])
                } else {
                    1005
                });
            }
            i += h + len;
        }
    }
    None
}

fn masked(op: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let code = match op {
        1 => tickgate::proto::frame::OpCode::Text,
        0 => tickgate::proto::frame::OpCode::Continuation,
        9 => tickgate::proto::frame::OpCode::Ping,
        _ => tickgate::proto::frame::OpCode::Binary,
    };
    tickgate::proto::frame::encode_client_frame_into(code, fin, payload, [1, 2, 3, 4], &mut out);
    out
}

#[test]
fn protocol_violations_close_with_their_codes() {
    let srv = start(test_config(1));
    // Unmasked frame: 1002.
    let mut s = raw_session(&srv);
    s.write_all(&[0x81, 0x02, b'h', b'i']).unwrap();
    assert_eq!(read_close(&mut s), Some(1002));
    // Reserved bit: 1002.
    let mut s = raw_session(&srv);
    let mut f = masked(1, true, b"{}");
    f[0] |= 0x40;
    s.write_all(&f).unwrap();
    assert_eq!(read_close(&mut s), Some(1002));
    // Invalid UTF-8 across fragments: 1007.
    let mut s = raw_session(&srv);
    s.write_all(&masked(1, false, &[0xce])).unwrap();
    s.write_all(&masked(0, true, &[0x28])).unwrap();
    assert_eq!(read_close(&mut s), Some(1007));
    // Too big: 1009, decided from the header before the payload arrives.
    let mut s = raw_session(&srv);
    let mut hdr = vec![0x81u8, 0xff];
    hdr.extend_from_slice(&(10u64 * 1024 * 1024).to_be_bytes());
    hdr.extend_from_slice(&[1, 2, 3, 4]);
    s.write_all(&hdr).unwrap();
    assert_eq!(read_close(&mut s), Some(1009));
    // Fragmented control frame: 1002.
    let mut s = raw_session(&srv);
    s.write_all(&masked(9, false, b"x")).unwrap();
    assert_eq!(read_close(&mut s), Some(1002));
    // The server still serves others.
    assert_eq!(
        status_of(&raw(srv.addr(), b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")),
        200
    );
}

#[tokio::test]
async fn fragmented_text_message_is_reassembled() {
    let srv = start(test_config(1));
    let mut s = raw_session(&srv);
    let msg = br#"{"op":"ping","id":77}"#;
    s.write_all(&masked(1, false, &msg[..5])).unwrap();
    s.write_all(&masked(9, true, b"hb")).unwrap();
    s.write_all(&masked(0, false, &msg[5..10])).unwrap();
    s.write_all(&masked(0, true, &msg[10..])).unwrap();
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        let n = s.read(&mut buf).unwrap();
        all.extend_from_slice(&buf[..n]);
        let txt = String::from_utf8_lossy(&all);
        if txt.contains(r#""id":77"#) {
            // The pong for the interleaved ping came too.
            assert!(
                all.windows(4).any(|w| w == [0x8a, 0x02, b'h', b'b']),
                "pong frame"
            );
            return;
        }
    }
    panic!("no pong: {:?}", String::from_utf8_lossy(&all));
}

/// Several subscribers on several shards and one publisher: every entitled subscriber gets
/// every tick exactly once, in seq order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_across_shards_in_seq_order() {
    fanout_in_seq_order(test_config(2)).await;
}

/// The epoll fallback (`server.driver = "epoll"`, what a kernel without io_uring gets)
/// serves the same fan-out: its listener must be non-blocking, and the shard's ready set
/// and the writers' handles work on it as on io_uring.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_across_shards_on_epoll() {
    let mut cfg = test_config(2);
    cfg.server.driver = "epoll".into();
    tokio::time::timeout(Duration::from_secs(60), fanout_in_seq_order(cfg))
        .await
        .expect("the epoll shard stopped serving");
}

/// Busy polling (`server.busy_poll`): a shard that polls instead of sleeping still sees
/// what only the runtime's sleep used to look at. Here the publisher and the subscribers
/// are spread over two shards, so every tick crosses to the other shard through its inbox
/// and a wake-up from another thread (reaped only when the runtime polls as it would sleep).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_across_shards_with_busy_poll() {
    let mut cfg = test_config(2);
    cfg.server.busy_poll = Duration::from_secs(1);
    tokio::time::timeout(Duration::from_secs(60), fanout_in_seq_order(cfg))
        .await
        .expect("a busy-polling shard stopped serving");
}

async fn fanout_in_seq_order(cfg: tickgate::config::Config) {
    let want = if cfg.server.driver == "epoll" {
        Some(tickgate::rt::Driver::Epoll)
    } else {
        None
    };
    let srv = start(cfg);
    if let Some(d) = want {
        assert_eq!(srv.handle.driver, d);
    }
    let mut subs = Vec::new();
    for i in 0..6 {
        let mut ws = session(&srv, &srv.token(&format!("sub{i}"))).await;
        send_json(
            &mut ws,
            json!({"op":"subscribe","id":1,"symbols":["BTC-USD","ETH-USD"]}),
        )
        .await;
        let ack = next_json(&mut ws).await;
        assert_eq!(ack["type"], "subscribed");
        assert_eq!(ack["symbols"], json!(["BTC-USD", "ETH-USD"]));
        subs.push(ws);
    }
    let mut p = session(&srv, &srv.publisher_token("pub")).await;
    const N: u64 = 200;
    for i in 0..N {
        let ticks = json!([
            {"s":"BTC-USD","ts":4_000_000_000_000_000_000u64 + i,"bid":100.25,"ask":100.5,"last":100.4,"qty":3},
            {"s":"ETH-USD","ts":4_000_000_000_000_000_000u64 + i,"bid":1.5,"ask":1.75,"last":1.5,"qty":0.5}
        ]);
        send_json(&mut p, json!({"op":"publish","id":i,"ticks":ticks})).await;
        let ack = next_json(&mut p).await;
        assert_eq!(ack, json!({"type":"published","id":i,"count":2}));
    }
    for ws in subs.iter_mut() {
        let mut seqs: HashMap<String, Vec<u64>> = HashMap::new();
        while seqs.values().map(|v| v.len() as u64).sum::<u64>() < 2 * N {
            let m = next_json(ws).await;
            assert_eq!(m["type"], "tick", "{m}");
            assert!(m.get("skipped").is_none(), "{m}");
            seqs.entry(m["s"].as_str().unwrap().to_string())
                .or_default()
                .push(m["seq"].as_u64().unwrap());
        }
        for (_, v) in seqs {
            assert_eq!(v, (1..=N).collect::<Vec<_>>());
        }
    }
    // The latency histograms saw these ticks: they start at the server's own stamp, not
    // at the publisher's `ts` (here in 2096, which a `ts`-based measure would skip).
    let m = &srv.handle.shared.metrics;
    assert!(m.publish_to_dispatch.count() > 0);
    assert!(m.publish_to_write.count() > 0);
}

#[tokio::test]
async fn entitlements_roles_snapshot_unsubscribe() {
    let srv = start(test_config(2));
    let mut c = srv.claims("ent");
    c.symbols = vec!["BTC-*".into()];
    let mut ws = session(&srv, &srv.sign(&c)).await;
    send_json(
        &mut ws,
        json!({"op":"subscribe","id":1,"symbols":["BTC-USD","ETH-USD","bad sym"]}),
    )
    .await;
    let ack = next_json(&mut ws).await;
    assert_eq!(ack["symbols"], json!(["BTC-USD"]));
    assert_eq!(
        ack["rejected"],
        json!([{"symbol":"ETH-USD","code":"forbidden"},{"symbol":"bad sym","code":"bad_request"}])
    );
    // Subscriber-only token cannot publish.
    send_json(
        &mut ws,
        json!({"op":"publish","id":2,"ticks":[{"s":"BTC-USD","ts":1,"bid":1,"ask":2,"last":1,"qty":1}]}),
    )
    .await;
    let e = next_json(&mut ws).await;
    assert_eq!(e["code"], "forbidden");
    // A publisher entitled to ETH only: a batch with BTC is refused whole.
    let mut pc = srv.claims("pub");
    pc.roles = vec!["publisher".into()];
    pc.symbols = vec!["ETH-USD".into()];
    let mut p = session(&srv, &srv.sign(&pc)).await;
    send_json(
        &mut p,
        json!({"op":"publish","id":3,"ticks":[
        {"s":"ETH-USD","ts":1,"bid":1,"ask":2,"last":1,"qty":1},
        {"s":"BTC-USD","ts":1,"bid":1,"ask":2,"last":1,"qty":1}]}),
    )
    .await;
    let e = next_json(&mut p).await;
    assert_eq!(e["code"], "forbidden");
    assert!(
        next_json_within(&mut ws, Duration::from_millis(300))
            .await
            .is_none(),
        "nothing delivered"
    );
    // A real publish, then snapshot for a late subscriber.
    let mut p2 = session(&srv, &srv.publisher_token("pub2")).await;
    send_json(
        &mut p2,
        json!({"op":"publish","ticks":[{"s":"BTC-USD","ts":5,"bid":10.5,"ask":11,"last":10.75,"qty":2}]}),
    )
    .await;
    assert_eq!(next_json(&mut p2).await["type"], "published");
    let t = next_json(&mut ws).await;
    assert_eq!(t["type"], "tick");
    assert_eq!(t["seq"], 1);
    let mut late = session(&srv, &srv.token("late")).await;
    send_json(
        &mut late,
        json!({"op":"subscribe","id":5,"symbols":["BTC-USD"],"snapshot":true}),
    )
    .await;
    assert_eq!(next_json(&mut late).await["type"], "subscribed");
    let s = next_json(&mut late).await;
    assert_eq!(s["type"], "snapshot");
    assert_eq!(s["seq"], 1);
    assert_eq!(s["bid"], 10.5);
    // Unsubscribe stops delivery.
    send_json(&mut ws, json!({"op":"unsubscribe","id":6,"symbols":["BTC-USD"]})).await;
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type":"unsubscribed","id":6,"symbols":["BTC-USD"]})
    );
    send_json(
        &mut p2,
        json!({"op":"publish","ticks":[{"s":"BTC-USD","ts":6,"bid":10.5,"ask":11,"last":10.75,"qty":2}]}),
    )
    .await;
    assert_eq!(next_json(&mut p2).await["type"], "published");
    assert_eq!(next_json(&mut late).await["seq"], 2);
    assert!(
        next_json_within(&mut ws, Duration::from_millis(300))
            .await
            .is_none()
    );
}

#[tokio::test]
async fn too_many_symbols_subscribes_nothing() {
    let mut cfg = test_config(1);
    cfg.limits.max_symbols_per_connection = 2;
    let srv = start(cfg);
    let mut ws = session(&srv, &srv.token("x")).await;
    send_json(
        &mut ws,
        json!({"op":"subscribe","id":1,"symbols":["A1","A2","A3"]}),
    )
    .await;
    let e = next_json(&mut ws).await;
    assert_eq!(e["code"], "too_many_symbols");
    send_json(&mut ws, json!({"op":"subscribe","id":2,"symbols":["A1","A2"]})).await;
    assert_eq!(next_json(&mut ws).await["symbols"], json!(["A1", "A2"]));
}

#[tokio::test]
async fn message_rate_limit_then_4029() {
    let mut cfg = test_config(1);
    cfg.limits.inbound_messages_per_sec = 5;
    let srv = start(cfg);
    let mut ws = session(&srv, &srv.token("flood")).await;
    for i in 0..40 {
        if ws
            .send(Message::Text(json!({"op":"ping","id":i}).to_string().into()))
            .await
            .is_err()
        {
            break;
        }
    }
    let mut limited = 0;
    loop {
        match tokio::time::timeout(Duration::from_secs(5), futures_util::StreamExt::next(&mut ws)).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                if t.contains("rate_limited") {
                    limited += 1;
                }
            }
            Ok(Some(Ok(Message::Close(Some(f))))) => {
                assert_eq!(u16::from(f.code), 4029);
                break;
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("no 4029 close: {other:?}"),
        }
    }
    assert_eq!(limited, 10);
}

/// A subscriber that stops reading is conflated, then cut with 4008, while a healthy
/// subscriber on the same shard keeps receiving every tick; memory stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_conflated_then_cut() {
    conflated_then_cut(test_config(1)).await;
}

/// On epoll the stalled writer waits for writability on its own registration (a `dup` of
/// the connection's descriptor, held while it waits).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_conflated_then_cut_on_epoll() {
    let mut cfg = test_config(1);
    cfg.server.driver = "epoll".into();
    tokio::time::timeout(Duration::from_secs(60), conflated_then_cut(cfg))
        .await
        .expect("the epoll shard stopped serving");
}

/// A busy-polling shard (`server.busy_poll`) still fires its deadlines: the slow
/// consumer's grace and the hard drop are the ticker's, whose sleep is one of the
/// runtime's timers, which turn only when the runtime polls as it would sleep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_conflated_then_cut_with_busy_poll() {
    let mut cfg = test_config(1);
    cfg.server.busy_poll = Duration::from_secs(1);
    tokio::time::timeout(Duration::from_secs(60), conflated_then_cut(cfg))
        .await
        .expect("the busy-polling shard stopped serving");
}

async fn conflated_then_cut(mut cfg: tickgate::config::Config) {
    let epoll = cfg.server.driver == "epoll";
    cfg.limits.outbound_queue_bytes = 64 * 1024;
    cfg.limits.slow_consumer_grace = Duration::from_millis(800);
    let srv = start(cfg);
    assert_eq!(srv.handle.driver == tickgate::rt::Driver::Epoll, epoll);
    // The stalled client: raw socket with a tiny receive buffer that never reads.
    let t = srv.token("stall");
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&srv.addr().into()).unwrap();
    let mut stalled: std::net::TcpStream = sock.into();
    stalled
        .write_all(&upgrade_req(
            "/v1/stream",
            &format!("Authorization: Bearer {t}\r\n"),
        ))
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    stalled
        .write_all(&masked(1, true, br#"{"op":"subscribe","symbols":["BTC-USD"]}"#))
        .unwrap();
    let mut healthy = session(&srv, &srv.token("ok")).await;
    send_json(&mut healthy, json!({"op":"subscribe","symbols":["BTC-USD"]})).await;
    assert_eq!(next_json(&mut healthy).await["type"], "subscribed");
    let mut p = session(&srv, &srv.publisher_token("p")).await;
    // Flood: large batches so the stalled queue overflows quickly.
    let reader = tokio::spawn(async move {
        let mut last = 0u64;
        let mut n = 0u64;
        while let Some(m) = next_json_within(&mut healthy, Duration::from_secs(3)).await {
            if m["type"] == "tick" {
                let seq = m["seq"].as_u64().unwrap();
                assert_eq!(seq, last + 1, "healthy subscriber lost ticks: {m}");
                last = seq;
                n += 1;
            }
        }
        n
    });
    let batches = 1000u64;
    for b in 0..batches {
        let ticks: Vec<_> = (0..50)
            .map(|i| json!({"s":"BTC-USD","ts":b * 1000 + i,"bid":100.0,"ask":100.5,"last":100.25,"qty":1}))
            .collect();
        send_json(&mut p, json!({"op":"publish","ticks":ticks})).await;
        let _ = next_json(&mut p).await;
        if b % 50 == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // The stalled client is cut with 4008 once the grace has passed.
    let m = &srv.handle.shared.metrics;
    let idx_4008 = tickgate::metrics::CLOSE_CODES
        .iter()
        .position(|c| *c == 4008)
        .unwrap();
    let mut cut = false;
    for _ in 0..100 {
        if m.closes[idx_4008].load(std::sync::atomic::Ordering::Relaxed) == 1 {
            cut = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(cut, "no 4008 close");
    // Without reading a byte (so its writer stays blocked on a full socket), the stalled
    // connection is torn down by the hard-drop timer: the shutdown must wake that writer
    // (on epoll it waits for writability on the reader's registration). Left: the healthy
    // subscriber and the publisher.
    let mut gone = false;
    for _ in 0..200 {
        if srv.handle.connections() == 2 {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        gone,
        "stalled connection still held: {}",
        srv.handle.connections()
    );
    // Its socket ends (close frame then EOF, or a reset after the hard-drop timer).
    stalled.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 65536];
    let mut received = 0usize;
    loop {
        match stalled.read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                assert_ne!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock,
                    "stalled socket never closed"
                );
                break;
            }
            Ok(0) => break,
            Ok(n) => received += n,
        }
    }
    // Bounded: what reached the client is at most the queue bound plus what the kernel
    // buffers and one coalesced write held, far less than the 7 MB published.
    assert!(received < 6 * 1024 * 1024, "received {received}");
    assert!(
        m.conflated.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "no conflation counted"
    );
    let delivered = reader.await.unwrap();
    assert_eq!(delivered, batches * 50, "healthy subscriber got every tick");
}

fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = s
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

/// Stalled clients and a flood of ticks: server memory stays bounded (the in-process
/// server's RSS is this process's RSS).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_bounded_under_a_flood_with_stalled_clients() {
    let mut cfg = test_config(2);
    cfg.limits.outbound_queue_bytes = 256 * 1024;
    cfg.limits.slow_consumer_grace = Duration::from_secs(30);
    // What is measured is the queues' bound; the recovery history (its own bound,
    // `feed.history_bytes`, tests/recovery.rs) would add up to 5 MB here.
    cfg.feed.history = 0;
    let srv = start(cfg);
    let mut stalled = Vec::new();
    for i in 0..4 {
        let t = srv.token(&format!("stall{i}"));
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        sock.connect(&srv.addr().into()).unwrap();
        let mut s: std::net::TcpStream = sock.into();
        s.write_all(&upgrade_req(
            "/v1/stream",
            &format!("Authorization: Bearer {t}\r\n"),
        ))
        .unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let syms: Vec<String> = (0..20).map(|k| format!("\"S{k}\"")).collect();
        let sub = format!("{{\"op\":\"subscribe\",\"symbols\":[{}]}}", syms.join(","));
        s.write_all(&masked(1, true, sub.as_bytes())).unwrap();
        stalled.push(s);
    }
    let mut p = session(&srv, &srv.publisher_token("p")).await;
    // Warm up allocator arenas and buffers before the baseline reading.
    let batch = |b: u64| {
        let ticks: Vec<_> = (0..400)
            .map(|i| json!({"s":format!("S{}", i % 20),"ts":b * 1000 + i,"bid":100.0,"ask":100.5,"last":100.25,"qty":1}))
            .collect();
        json!({"op":"publish","ticks":ticks})
    };
    for b in 0..20 {
        send_json(&mut p, batch(b)).await;
        let _ = next_json(&mut p).await;
    }
    let before = rss_bytes();
    let total_batches = 500u64;
    for b in 20..total_batches {
        send_json(&mut p, batch(b)).await;
        let _ = next_json(&mut p).await;
    }
    let after = rss_bytes();
    // 200,000 ticks of ~130 bytes to each of 4 stalled clients would be ~100 MB if queued;
    // bounded queues hold 256 KiB + conflation slots each.
    let growth = after.saturating_sub(before);
    eprintln!("rss growth {} KiB", growth / 1024);
    assert!(
        growth < 40 * 1024 * 1024,
        "RSS grew by {} MiB",
        growth / (1024 * 1024)
    );
    assert!(
        srv.handle
            .shared
            .metrics
            .conflated
            .load(std::sync::atomic::Ordering::Relaxed)
            > 100_000
    );
}
