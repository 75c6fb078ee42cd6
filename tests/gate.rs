//! PROTOCOL.md sections 1-3 and 8 on a real listener: every status code of the gate,
//! tickets, origins, rate limit and per-user cap, and no token in any response or log.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn routes_and_request_shape() {
    let srv = start(test_config(1));
    let a = srv.addr();
    assert_eq!(
        status_of(&raw(a, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")),
        200
    );
    assert_eq!(
        status_of(&raw(a, b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")),
        200
    );
    assert_eq!(status_of(&raw(a, b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")), 404);
    // Not an upgrade: 426.
    let r = raw(a, b"GET /v1/stream HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status_of(&r), 426, "{r}");
    // Another method: 405.
    assert_eq!(
        status_of(&raw(
            a,
            b"POST /v1/stream HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
        )),
        405
    );
    // Wrong version: 426 with Sec-WebSocket-Version: 13.
    let r = raw(
        a,
        b"GET /v1/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n",
    );
    assert_eq!(status_of(&r), 426);
    assert!(
        r.to_ascii_lowercase().contains("sec-websocket-version: 13"),
        "{r}"
    );
    // Bad key: 400.
    let r = raw(
        a,
        b"GET /v1/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: short\r\nSec-WebSocket-Version: 13\r\n\r\n",
    );
    assert_eq!(status_of(&r), 400);
    // Oversized headers: 400.
    let big = format!(
        "GET /v1/stream HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    assert_eq!(status_of(&raw(a, big.as_bytes())), 400);
    // Garbage: 400.
    assert_eq!(status_of(&raw(a, b"\x16\x03\x01\x00\xa5garbage\r\n\r\n")), 400);
}

#[test]
fn token_checks_and_www_authenticate() {
    let srv = start(test_config(1));
    let a = srv.addr();
    let r = raw(a, &upgrade_req("/v1/stream", ""));
    assert_eq!(status_of(&r), 401);
    assert!(r.contains("WWW-Authenticate: Bearer\r\n"), "{r}");
    let r = raw(
        a,
        &upgrade_req("/v1/stream", "Authorization: Bearer not.a.token\r\n"),
    );
    assert_eq!(status_of(&r), 401);
    assert!(
        r.contains("WWW-Authenticate: Bearer error=\"invalid_token\""),
        "{r}"
    );
    // Expired token.
    let mut c = srv.claims("alice");
    c.iat = Some(now() - 600);
    c.exp = now() - 120;
    let r = raw(
        a,
        &upgrade_req(
            "/v1/stream",
            &format!("Authorization: Bearer {}\r\n", srv.sign(&c)),
        ),
    );
    assert_eq!(status_of(&r), 401);
    // Good token: 101, md.v1.json selected when offered.
    let t = srv.token("alice");
    let r = raw(
        a,
        &upgrade_req(
            "/v1/stream",
            &format!("Authorization: Bearer {t}\r\nSec-WebSocket-Protocol: md.v1.json\r\n"),
        ),
    );
    assert_eq!(status_of(&r), 101, "{r}");
    assert!(
        r.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        "{r}"
    );
    assert!(
        r.to_ascii_lowercase()
            .contains("sec-websocket-protocol: md.v1.json"),
        "{r}"
    );
    // Token in the subprotocol: selected md.v1.json, never echoes bearer.
    let r = raw(
        a,
        &upgrade_req(
            "/v1/stream",
            &format!("Sec-WebSocket-Protocol: md.v1.json, bearer.{t}\r\n"),
        ),
    );
    assert_eq!(status_of(&r), 101, "{r}");
    assert!(!r.contains("bearer."), "{r}");
    // Only bearer.<jwt> offered: 400.
    let r = raw(
        a,
        &upgrade_req("/v1/stream", &format!("Sec-WebSocket-Protocol: bearer.{t}\r\n")),
    );
    assert_eq!(status_of(&r), 400, "{r}");
    // Query token.
    let r = raw(a, &upgrade_req(&format!("/v1/stream?access_token={t}"), ""));
    assert_eq!(status_of(&r), 101, "{r}");
    // Signed by an unknown key: 401.
    let other = tickgate::auth::mint::generate_signing_key().unwrap();
    let bad = tickgate::auth::mint::sign_token(&other, "k1", &srv.claims("alice"));
    let r = raw(
        a,
        &upgrade_req("/v1/stream", &format!("Authorization: Bearer {bad}\r\n")),
    );
    assert_eq!(status_of(&r), 401);
    // No response body and no log line contains a token.
    for line in srv.log_lines() {
        assert!(!line.contains(&t), "token in log: {line}");
        assert!(!line.contains(&bad[..40]), "token in log: {line}");
    }
}

#[test]
fn query_token_can_be_disabled() {
    let mut cfg = test_config(1);
    cfg.auth.allow_query_token = false;
    let srv = start(cfg);
    let t = srv.token("alice");
    let r = raw(
        srv.addr(),
        &upgrade_req(&format!("/v1/stream?access_token={t}"), ""),
    );
    assert_eq!(status_of(&r), 401);
    assert!(!r.contains(&t));
}

#[test]
fn origin_allow_list_rejects_look_alikes() {
    let mut cfg = test_config(1);
    cfg.auth.allow_missing_origin = false;
    let srv = start(cfg);
    let t = srv.token("alice");
    let with = |origin: Option<&str>| {
        let o = origin.map(|o| format!("Origin: {o}\r\n")).unwrap_or_default();
        status_of(&raw(
            srv.addr(),
            &upgrade_req("/v1/stream", &format!("{o}Authorization: Bearer {t}\r\n")),
        ))
    };
    assert_eq!(with(Some("https://app.example.com")), 101);
    assert_eq!(with(Some("https://APP.example.com:443")), 101);
    assert_eq!(with(None), 403);
    for evil in [
        "https://app.example.com.evil.com",
        "https://evil.com",
        "null",
        "http://app.example.com",
        "https://app.example.com@evil.com",
        "https://app.example.com:8443",
        "https://evilapp.example.com",
    ] {
        assert_eq!(with(Some(evil)), 403, "{evil}");
    }
}

#[test]
fn device_and_ip_binding() {
    let srv = start(test_config(1));
    let mut c = srv.claims("alice");
    c.did = Some("dev-1".into());
    let t = srv.sign(&c);
    let st = |extra: &str, q: &str| {
        status_of(&raw(
            srv.addr(),
            &upgrade_req(
                &format!("/v1/stream{q}"),
                &format!("Authorization: Bearer {t}\r\n{extra}"),
            ),
        ))
    };
    assert_eq!(st("", ""), 401);
    assert_eq!(st("X-Device-Id: dev-2\r\n", ""), 401);
    assert_eq!(st("X-Device-Id: dev-1\r\n", ""), 101);
    assert_eq!(st("", "?device=dev-1"), 101);
    let mut c = srv.claims("bob");
    c.cip = Some("10.1.2.3".into());
    let t2 = srv.sign(&c);
    assert_eq!(
        status_of(&raw(
            srv.addr(),
            &upgrade_req("/v1/stream", &format!("Authorization: Bearer {t2}\r\n"))
        )),
        401
    );
    c.cip = Some("127.0.0.1".into());
    let t3 = srv.sign(&c);
    assert_eq!(
        status_of(&raw(
            srv.addr(),
            &upgrade_req("/v1/stream", &format!("Authorization: Bearer {t3}\r\n"))
        )),
        101
    );
}

#[test]
fn per_ip_rate_limit_answers_429_with_retry_after() {
    let mut cfg = test_config(1);
    cfg.limits.per_ip_handshakes_per_sec = 1;
    cfg.limits.per_ip_burst = 3;
    let srv = start(cfg);
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(raw(srv.addr(), b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"));
    }
    let codes: Vec<u16> = statuses.iter().map(|r| status_of(r)).collect();
    assert_eq!(&codes[..3], &[404, 404, 404], "{codes:?}");
    assert!(codes[3..].iter().all(|c| *c == 429), "{codes:?}");
    assert!(statuses[5].contains("Retry-After: "), "{}", statuses[5]);
    let t = srv.token("alice");
    let r = raw(
        srv.addr(),
        &upgrade_req("/v1/stream", &format!("Authorization: Bearer {t}\r\n")),
    );
    assert_eq!(status_of(&r), 429);
}

#[tokio::test]
async fn per_user_cap_is_enforced_and_released_on_every_close() {
    let mut cfg = test_config(2);
    cfg.limits.per_user_max_connections = 2;
    let srv = start(cfg);
    let t = srv.token("carol");
    let mut a = session(&srv, &t).await;
    let b = session(&srv, &t).await;
    let r = raw(
        srv.addr(),
        &upgrade_req("/v1/stream", &format!("Authorization: Bearer {t}\r\n")),
    );
    assert_eq!(status_of(&r), 429, "{r}");
    // Another user is unaffected.
    let _d = session(&srv, &srv.token("dave")).await;
    // A clean close releases one slot...
    a.close(None).await.unwrap();
    drop(a);
    // ...and an abnormal one (TCP dropped without a close frame) the other.
    drop(b);
    let mut ok = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if srv.handle.shared.auth.caps.count("carol") == 0 {
            ok = true;
            break;
        }
    }
    assert!(ok, "cap leaked: {}", srv.handle.shared.auth.caps.count("carol"));
    let _e = session(&srv, &t).await;
    let _f = session(&srv, &t).await;
}

fn ticket_for(srv: &TestServer, token: &str) -> (u16, String) {
    let req = format!(
        "POST /v1/ticket HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\n\r\n"
    );
    let r = raw(srv.addr(), req.as_bytes());
    let body = r.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status_of(&r), body)
}

#[test]
fn tickets_are_single_use() {
    let srv = start(test_config(2));
    let t = srv.token("erin");
    let (st, body) = ticket_for(&srv, &t);
    assert_eq!(st, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let ticket = v["ticket"].as_str().unwrap().to_string();
    assert!(ticket.len() >= 22, "at least 128 bits: {ticket}");
    assert_eq!(v["expires_in"], 30);
    let up = |q: &str| {
        status_of(&raw(
            srv.addr(),
            &upgrade_req(&format!("/v1/stream?ticket={q}"), ""),
        ))
    };
    assert_eq!(up(&ticket), 101);
    assert_eq!(up(&ticket), 401, "replay");
    assert_eq!(up("AAAAAAAAAAAAAAAAAAAAAA"), 401, "unknown");
    // No token: 401; GET: 405.
    let r = raw(
        srv.addr(),
        b"POST /v1/ticket HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    );
    assert_eq!(status_of(&r), 401);
    assert_eq!(
        status_of(&raw(srv.addr(), b"GET /v1/ticket HTTP/1.1\r\nHost: x\r\n\r\n")),
        405
    );
    // Concurrent redemption from many connections (both shards): exactly one wins.
    let (_, body) = ticket_for(&srv, &t);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let ticket = v["ticket"].as_str().unwrap().to_string();
    let addr = srv.addr();
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let tk = ticket.clone();
            std::thread::spawn(move || {
                status_of(&raw(addr, &upgrade_req(&format!("/v1/stream?ticket={tk}"), "")))
            })
        })
        .collect();
    let codes: Vec<u16> = threads.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(codes.iter().filter(|c| **c == 101).count(), 1, "{codes:?}");
    assert_eq!(codes.iter().filter(|c| **c == 401).count(), 7, "{codes:?}");
    for line in srv.log_lines() {
        assert!(!line.contains(&ticket), "ticket in log: {line}");
    }
}

#[test]
fn tickets_expire() {
    let mut cfg = test_config(1);
    cfg.auth.ticket_ttl = Duration::from_secs(1);
    let srv = start(cfg);
    let (st, body) = ticket_for(&srv, &srv.token("erin"));
    assert_eq!(st, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let ticket = v["ticket"].as_str().unwrap();
    std::thread::sleep(Duration::from_millis(1300));
    assert_eq!(
        status_of(&raw(
            srv.addr(),
            &upgrade_req(&format!("/v1/stream?ticket={ticket}"), "")
        )),
        401
    );
}

#[test]
fn ticket_keeps_the_device_binding() {
    let srv = start(test_config(1));
    let mut c = srv.claims("fay");
    c.did = Some("phone".into());
    let (st, body) = ticket_for(&srv, &srv.sign(&c));
    // The ticket request itself must carry the device id.
    assert_eq!(st, 401, "{body}");
    let req = format!(
        "POST /v1/ticket HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nX-Device-Id: phone\r\nContent-Length: 0\r\n\r\n",
        srv.sign(&c)
    );
    let r = raw(srv.addr(), req.as_bytes());
    assert_eq!(status_of(&r), 200, "{r}");
    let body = r.split("\r\n\r\n").nth(1).unwrap();
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    let ticket = v["ticket"].as_str().unwrap();
    let r = raw(
        srv.addr(),
        &upgrade_req(&format!("/v1/stream?ticket={ticket}"), ""),
    );
    assert_eq!(
        status_of(&r),
        401,
        "a ticket from a did token needs the device id"
    );
    let (_, body) = {
        let r = raw(srv.addr(), req.as_bytes());
        (status_of(&r), r.split("\r\n\r\n").nth(1).unwrap().to_string())
    };
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let ticket = v["ticket"].as_str().unwrap();
    let r = raw(
        srv.addr(),
        &upgrade_req(&format!("/v1/stream?ticket={ticket}"), "X-Device-Id: phone\r\n"),
    );
    assert_eq!(status_of(&r), 101, "{r}");
}

#[test]
fn slowloris_is_cut_by_the_handshake_timeout() {
    use std::io::{Read, Write};
    let mut cfg = test_config(1);
    cfg.limits.handshake_timeout = Duration::from_millis(500);
    let srv = start(cfg);
    let mut s = std::net::TcpStream::connect(srv.addr()).unwrap();
    s.write_all(b"GET /v1/stream HTTP/1.1\r\nHost: x\r\n").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let t0 = std::time::Instant::now();
    let mut buf = [0u8; 64];
    // Keep trickling bytes; the server must still close us.
    let mut closed = false;
    for _ in 0..40 {
        let _ = s.write_all(b"X-A: b\r\n");
        s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        match s.read(&mut buf) {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
            }
            Err(_) => {
                closed = true;
                break;
            }
        }
    }
    assert!(closed, "still open after {:?}", t0.elapsed());
    // Everyone else is still served.
    assert_eq!(
        status_of(&raw(srv.addr(), b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")),
        200
    );
}

#[test]
fn partial_requests_are_assembled() {
    use std::io::{Read, Write};
    let srv = start(test_config(1));
    let t = srv.token("gil");
    let req = upgrade_req("/v1/stream", &format!("Authorization: Bearer {t}\r\n"));
    let mut s = std::net::TcpStream::connect(srv.addr()).unwrap();
    s.set_nodelay(true).unwrap();
    for chunk in req.chunks(7) {
        s.write_all(chunk).unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
}

#[test]
fn security_log_has_the_contract_fields() {
    let srv = start(test_config(1));
    let t = srv.token("hal");
    raw(
        srv.addr(),
        &upgrade_req(
            "/v1/stream",
            &format!("Authorization: Bearer {t}\r\nOrigin: https://app.example.com\r\n"),
        ),
    );
    raw(
        srv.addr(),
        &upgrade_req("/v1/stream", "Authorization: Bearer x.y.z\r\n"),
    );
    let lines = srv.log_lines();
    let parsed: Vec<serde_json::Value> = lines.iter().map(|l| serde_json::from_str(l).unwrap()).collect();
    let ok = parsed
        .iter()
        .find(|v| v["outcome"] == "accepted")
        .expect("accepted line");
    for f in ["ts", "event", "outcome", "reason", "ip", "origin", "sub", "sid"] {
        assert!(ok.get(f).is_some(), "{f} missing in {ok}");
    }
    assert_eq!(ok["sub"], "hal");
    assert_eq!(ok["origin"], "https://app.example.com");
    assert!(
        parsed
            .iter()
            .any(|v| v["outcome"] == "rejected" && v["event"] == "handshake")
    );
}
