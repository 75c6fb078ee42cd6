//! Tokens expire, sessions end (PROTOCOL.md sections 6 and 7) on loopback with real
//! short-lived tokens: reauth, 4001, revocation by sub/sid/jti on every shard.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

fn short_config() -> tickgate::config::Config {
    let mut cfg = test_config(2);
    cfg.lifetime.reauth_lead = Duration::from_secs(2);
    cfg.lifetime.reauth_grace = Duration::from_secs(1);
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reauth_keeps_the_session_and_no_reauth_ends_with_4001() {
    let srv = start(short_config());
    let mut c = srv.claims("ren");
    c.exp = now() + 3;
    let mut keeper = session(&srv, &srv.sign(&c)).await;
    let mut lapser = session(&srv, &srv.sign(&c)).await;
    // reauth_required arrives about exp - lead.
    let r = next_json_within(&mut keeper, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(r["type"], "reauth_required", "{r}");
    assert_eq!(r["exp"], c.exp);
    assert_eq!(r["deadline"], c.exp + 1);
    let mut fresh = c.clone();
    fresh.iat = Some(now());
    fresh.exp = now() + 60;
    send_json(
        &mut keeper,
        json!({"op":"reauth","id":3,"token":srv.sign(&fresh)}),
    )
    .await;
    let ok = next_json(&mut keeper).await;
    assert_eq!(ok, json!({"type":"reauthed","id":3,"exp":fresh.exp}));
    // The one that did not reauth is closed with 4001 at exp + grace.
    assert_eq!(close_code(&mut lapser, Duration::from_secs(8)).await, Some(4001));
    // The keeper outlives its first token.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    send_json(&mut keeper, json!({"op":"ping","id":1})).await;
    assert_eq!(next_json(&mut keeper).await, json!({"type":"pong","id":1}));
}

#[tokio::test]
async fn refused_reauth_changes_nothing() {
    let srv = start(short_config());
    let c = srv.claims("ana");
    let mut ws = session(&srv, &srv.sign(&c)).await;
    let mut other = srv.claims("bob");
    other.sid = c.sid.clone();
    send_json(&mut ws, json!({"op":"reauth","id":1,"token":srv.sign(&other)})).await;
    assert_eq!(next_json(&mut ws).await["code"], "forbidden");
    send_json(&mut ws, json!({"op":"reauth","id":2,"token":"garbage"})).await;
    assert_eq!(next_json(&mut ws).await["code"], "bad_request");
    send_json(&mut ws, json!({"op":"ping","id":3})).await;
    assert_eq!(next_json(&mut ws).await["type"], "pong");
}

#[tokio::test]
async fn narrower_reauth_unsubscribes_with_reason() {
    let srv = start(short_config());
    let c = srv.claims("nar");
    let mut ws = session(&srv, &srv.sign(&c)).await;
    send_json(
        &mut ws,
        json!({"op":"subscribe","id":1,"symbols":["BTC-USD","ETH-USD"]}),
    )
    .await;
    assert_eq!(next_json(&mut ws).await["type"], "subscribed");
    let mut n = c.clone();
    n.symbols = vec!["BTC-*".into()];
    send_json(&mut ws, json!({"op":"reauth","id":2,"token":srv.sign(&n)})).await;
    assert_eq!(next_json(&mut ws).await["type"], "reauthed");
    let u = next_json(&mut ws).await;
    assert_eq!(
        u,
        json!({"type":"unsubscribed","symbols":["ETH-USD"],"reason":"entitlement"})
    );
}

/// `POST /admin/revoke` with `body` to `srv`'s admin listener, off the test's runtime (its
/// sessions keep being served meanwhile): the status and the response body.
async fn revoke(srv: &TestServer, body: &str) -> (u16, String) {
    let (admin, tok, body) = (srv.admin(), srv.admin_token(), body.to_string());
    tokio::task::spawn_blocking(move || admin_post(admin, "/admin/revoke", Some(&tok), &body))
        .await
        .unwrap()
}

async fn revoke_case(
    body: serde_json::Value,
    make: impl Fn(&TestServer, usize) -> tickgate::auth::mint::Claims,
) {
    let srv = start(test_config(2));
    let mut victims = Vec::new();
    for i in 0..4 {
        victims.push(session(&srv, &srv.sign(&make(&srv, i))).await);
    }
    let mut bystander = session(&srv, &srv.token("bystander")).await;
    let (st, resp) = revoke(&srv, &body.to_string()).await;
    assert_eq!(st, 200, "{resp}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&resp).unwrap(),
        json!({"closed":4})
    );
    for v in victims.iter_mut() {
        assert_eq!(close_code(v, Duration::from_secs(1)).await, Some(4003));
    }
    // New handshakes for the revoked identity fail.
    let r = raw(
        srv.addr(),
        &upgrade_req(
            "/v1/stream",
            &format!("Authorization: Bearer {}\r\n", srv.sign(&make(&srv, 0))),
        ),
    );
    assert_eq!(status_of(&r), 401, "{r}");
    send_json(&mut bystander, json!({"op":"ping","id":1})).await;
    assert_eq!(next_json(&mut bystander).await["type"], "pong");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_by_sub() {
    revoke_case(json!({"sub":"mallory"}), |s, i| {
        let mut c = s.claims("mallory");
        c.sid = Some(format!("s{i}"));
        c
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_by_sid() {
    revoke_case(json!({"sid":"shared-sid"}), |s, i| {
        let mut c = s.claims(&format!("u{i}"));
        c.sid = Some("shared-sid".into());
        c
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_by_jti() {
    revoke_case(json!({"jti":"j-42"}), |s, i| {
        let mut c = s.claims(&format!("v{i}"));
        c.jti = Some("j-42".into());
        c
    })
    .await;
}

#[test]
fn revoke_needs_an_admin_token() {
    let srv = start(test_config(1));
    let (st, _) = admin_post(srv.admin(), "/admin/revoke", None, r#"{"sub":"x"}"#);
    assert_eq!(st, 401);
    let (st, _) = admin_post(
        srv.admin(),
        "/admin/revoke",
        Some(&srv.token("x")),
        r#"{"sub":"x"}"#,
    );
    assert_eq!(st, 403);
    let (st, _) = admin_post(
        srv.admin(),
        "/admin/revoke",
        Some(&srv.admin_token()),
        r#"{"nope":"x"}"#,
    );
    assert_eq!(st, 400);
}

#[test]
fn metrics_endpoint_speaks_prometheus() {
    let srv = start(test_config(2));
    raw(srv.addr(), &upgrade_req("/v1/stream", ""));
    let r = raw(srv.admin(), b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status_of(&r), 200);
    for m in [
        "tickgate_connections{shard=\"1\"}",
        "tickgate_ticks_in_total",
        "tickgate_closes_total{code=\"4001\"}",
        "tickgate_publish_to_dispatch_seconds_bucket",
        "tickgate_publish_to_write_seconds_bucket",
        "tickgate_security_events_total",
    ] {
        assert!(r.contains(m), "{m} missing:\n{r}");
    }
    assert_eq!(
        status_of(&raw(srv.admin(), b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")),
        200
    );
}

#[tokio::test]
async fn idle_peer_is_closed_with_4000() {
    let mut cfg = test_config(1);
    cfg.lifetime.heartbeat = Duration::from_millis(200);
    cfg.lifetime.idle_timeout = Duration::from_millis(600);
    let srv = start(cfg);
    // A raw client that never answers pings.
    use std::io::{Read, Write};
    let t = srv.token("idle");
    let mut s = std::net::TcpStream::connect(srv.addr()).unwrap();
    s.write_all(&upgrade_req(
        "/v1/stream",
        &format!("Authorization: Bearer {t}\r\n"),
    ))
    .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Ok(0) | Err(_) => break,
            Ok(n) => all.extend_from_slice(&buf[..n]),
        }
    }
    let code = 4000u16.to_be_bytes();
    assert!(
        all.windows(4).any(|w| w[0] == 0x88 && w[2..4] == code),
        "no 4000 close"
    );
    assert!(all.windows(2).any(|w| w == [0x89, 0x00]), "no ping before it");
}

/// Deadlines that fall in the same millisecond are fired in slices (the shard yields
/// between them so ticks interleave), and reauth results come back through the control
/// inbox in slices too: every connection must still get its `reauth_required` and its
/// `reauthed`, across several slices on each shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_simultaneous_expiries_is_fully_served() {
    const N: usize = 300;
    let mut cfg = test_config(2);
    cfg.lifetime.reauth_lead = Duration::from_secs(2);
    cfg.lifetime.reauth_grace = Duration::from_secs(20);
    let srv = start(cfg);
    let exp = now() + 8;
    let mut conns = Vec::with_capacity(N);
    for i in 0..N {
        let mut c = srv.claims(&format!("burst-{i}"));
        c.exp = exp;
        conns.push((session(&srv, &srv.sign(&c)).await, c));
    }
    for (ws, _) in conns.iter_mut() {
        let r = next_json_within(ws, Duration::from_secs(15)).await.unwrap();
        assert_eq!(r["type"], "reauth_required", "{r}");
        assert_eq!(r["exp"], exp);
    }
    for (ws, c) in conns.iter_mut() {
        let mut fresh = c.clone();
        fresh.iat = Some(now());
        fresh.exp = now() + 120;
        send_json(ws, json!({"op":"reauth","id":7,"token":srv.sign(&fresh)})).await;
    }
    for (ws, _) in conns.iter_mut() {
        let r = next_json_within(ws, Duration::from_secs(15)).await.unwrap();
        assert_eq!(r["type"], "reauthed", "{r}");
        assert_eq!(r["id"], 7);
    }
}
