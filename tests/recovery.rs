//! Recovery with `since` (PROTOCOL.md section 10) on a real single node: replay then live
//! with no gap and no duplicate while a publisher keeps publishing, `since` beyond the
//! history (`reset`), `since` at the head, entitlements, malformed `since`, and the
//! history's memory on `/metrics`.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use serde_json::json;

/// Publishes `n` ticks of `sym` (in batches of 50), waiting for each ack.
async fn publish(p: &mut Ws, sym: &str, from: u64, n: u64) {
    let mut i = 0;
    while i < n {
        let k = (n - i).min(50);
        let ticks: Vec<_> = (0..k)
            .map(|j| json!({"s":sym,"ts":from + i + j,"bid":1.0,"ask":2.0,"last":1.5,"qty":1}))
            .collect();
        send_json(p, json!({"op":"publish","id":1,"ticks":ticks})).await;
        loop {
            let m = next_json(p).await;
            if m["type"] == "published" {
                break;
            }
            assert_ne!(m["type"], "error", "{m}");
        }
        i += k;
    }
}

/// Reads until `pred` holds for a message, returning every `tick`/`snapshot` seen per
/// symbol (in order) and the other messages.
async fn read_until(
    ws: &mut Ws,
    mut pred: impl FnMut(&serde_json::Value) -> bool,
) -> (BTreeMap<String, Vec<serde_json::Value>>, Vec<serde_json::Value>) {
    let mut by_sym: BTreeMap<String, Vec<serde_json::Value>> = BTreeMap::new();
    let mut other = Vec::new();
    loop {
        let m = next_json_within(ws, Duration::from_secs(10))
            .await
            .expect("a message within 10 s");
        let done = pred(&m);
        match m["type"].as_str() {
            Some("tick" | "snapshot") => by_sym
                .entry(m["s"].as_str().unwrap().to_owned())
                .or_default()
                .push(m),
            _ => other.push(m),
        }
        if done {
            return (by_sym, other);
        }
    }
}

fn seqs(v: &[serde_json::Value]) -> Vec<u64> {
    v.iter().map(|m| m["seq"].as_u64().unwrap()).collect()
}

#[tokio::test]
async fn replay_then_live_with_no_gap_while_publishing() {
    let srv = start(test_config(2));
    let mut p = session(&srv, &srv.publisher_token("pub")).await;
    publish(&mut p, "BTC-USD", 0, 200).await;
    // A publisher keeps publishing from another task while the client reconnects.
    let url = srv.url();
    let ptoken = srv.publisher_token("pub2");
    let feeder = tokio::spawn(async move {
        let mut p = connect(&url, Some(&ptoken), &[]).await.unwrap();
        assert_eq!(next_json(&mut p).await["type"], "welcome");
        for round in 0..40 {
            publish(&mut p, "BTC-USD", 1_000 + round * 10, 10).await;
        }
        p
    });
    // Several clients reconnect at different points of the stream, each with `since`.
    for (k, since) in [150u64, 120, 199, 60].into_iter().enumerate() {
        let mut ws = session(&srv, &srv.token(&format!("c{k}"))).await;
        send_json(
            &mut ws,
            json!({"op":"subscribe","id":7,"symbols":["BTC-USD"],"since":{"BTC-USD":since}}),
        )
        .await;
        let ack = next_json(&mut ws).await;
        assert_eq!(ack["type"], "subscribed", "the ack comes first: {ack}");
        // Read 100 ticks: replay and live, across the switch.
        let mut got = Vec::new();
        while got.len() < 100 {
            let m = next_json_within(&mut ws, Duration::from_secs(10)).await.unwrap();
            assert_eq!(m["type"], "tick", "{m}");
            assert!(m.get("skipped").is_none());
            got.push(m["seq"].as_u64().unwrap());
        }
        let want: Vec<u64> = (since + 1..=since + 100).collect();
        assert_eq!(got, want, "client {k}: every seq after since once, in order");
    }
    feeder.await.unwrap();
}

#[tokio::test]
async fn since_beyond_history_is_a_reset_and_since_at_the_head_replays_nothing() {
    let mut cfg = test_config(1);
    cfg.feed.history = 10;
    let srv = start(cfg);
    let mut p = session(&srv, &srv.publisher_token("pub")).await;
    publish(&mut p, "BTC-USD", 0, 30).await;
    publish(&mut p, "ETH-USD", 0, 5).await;
    let mut ws = session(&srv, &srv.token("a")).await;
    send_json(
        &mut ws,
        json!({"op":"subscribe","id":1,"symbols":["BTC-USD","ETH-USD","SOL-USD"],
               "since":{"BTC-USD":5,"ETH-USD":5},"snapshot":true}),
    )
    .await;
    let ack = next_json(&mut ws).await;
    assert_eq!(ack["symbols"], json!(["BTC-USD", "ETH-USD", "SOL-USD"]));
    // BTC: out of reach (history 10, newest 30): the newest as a reset snapshot.
    let r = next_json(&mut ws).await;
    assert_eq!(
        (&r["type"], &r["s"], &r["seq"], &r["reset"]),
        (&json!("snapshot"), &json!("BTC-USD"), &json!(30), &json!(true))
    );
    // ETH: since is the head: nothing. SOL: no tick yet, no since: nothing. A ping proves
    // nothing else was queued.
    send_json(&mut ws, json!({"op":"ping","id":2})).await;
    assert_eq!(next_json(&mut ws).await, json!({"type":"pong","id":2}));
    publish(&mut p, "ETH-USD", 100, 1).await;
    let t = next_json(&mut ws).await;
    assert_eq!((&t["s"], &t["seq"]), (&json!("ETH-USD"), &json!(6)));
    // The edge: since 20 with the newest at 30 and 10 held: all ten replayed.
    let mut ws2 = session(&srv, &srv.token("b")).await;
    send_json(
        &mut ws2,
        json!({"op":"subscribe","symbols":["BTC-USD"],"since":{"BTC-USD":20}}),
    )
    .await;
    let (by, _) = read_until(&mut ws2, |m| m["seq"] == 30).await;
    assert_eq!(seqs(&by["BTC-USD"]), (21..=30).collect::<Vec<_>>());
    // A `since` ahead of the symbol (another server's numbers): a reset.
    let mut ws3 = session(&srv, &srv.token("c")).await;
    send_json(
        &mut ws3,
        json!({"op":"subscribe","symbols":["BTC-USD"],"since":{"BTC-USD":5000}}),
    )
    .await;
    assert_eq!(next_json(&mut ws3).await["type"], "subscribed");
    let r = next_json(&mut ws3).await;
    assert_eq!((&r["seq"], &r["reset"]), (&json!(30), &json!(true)));
    // The history's memory is on /metrics, within its bound.
    let (code, body) = admin_get(srv.admin(), "/metrics");
    assert_eq!(code, 200);
    let ticks = metric(&body, "tickgate_history_ticks");
    assert_eq!(ticks, 10.0 + 6.0, "ten of BTC-USD, six of ETH-USD:\n{body}");
    assert!(metric(&body, "tickgate_history_bytes") > 0.0);
    assert!(metric(&body, "tickgate_history_bytes") <= metric(&body, "tickgate_history_bytes_max"));
    assert_eq!(metric(&body, "tickgate_replayed_ticks_total"), 10.0);
    assert_eq!(metric(&body, "tickgate_replay_resets_total"), 2.0);
}

#[tokio::test]
async fn forbidden_symbols_are_not_replayed_and_malformed_since_is_bad_request() {
    let srv = start(test_config(1));
    let mut p = session(&srv, &srv.publisher_token("pub")).await;
    publish(&mut p, "BTC-USD", 0, 5).await;
    publish(&mut p, "SECRET-1", 0, 5).await;
    let mut c = srv.claims("limited");
    c.symbols = vec!["BTC-*".into()];
    let mut ws = session(&srv, &srv.sign(&c)).await;
    send_json(
        &mut ws,
        json!({"op":"subscribe","id":3,"symbols":["BTC-USD","SECRET-1"],
               "since":{"BTC-USD":3,"SECRET-1":0}}),
    )
    .await;
    let ack = next_json(&mut ws).await;
    assert_eq!(ack["symbols"], json!(["BTC-USD"]));
    assert_eq!(ack["rejected"], json!([{"symbol":"SECRET-1","code":"forbidden"}]));
    let (by, _) = read_until(&mut ws, |m| m["seq"] == 5).await;
    assert_eq!(seqs(&by["BTC-USD"]), vec![4, 5]);
    assert!(!by.contains_key("SECRET-1"));
    for bad in [
        json!({"op":"subscribe","id":4,"symbols":["BTC-USD"],"since":{"BTC-USD":"3"}}),
        json!({"op":"subscribe","id":4,"symbols":["BTC-USD"],"since":{"BTC-USD":-1}}),
        json!({"op":"subscribe","id":4,"symbols":["BTC-USD"],"since":[3]}),
        json!({"op":"subscribe","id":4,"symbols":["BTC-USD"],"since":{"ETH-USD":3}}),
    ] {
        send_json(&mut ws, bad.clone()).await;
        let e = next_json(&mut ws).await;
        assert_eq!(
            (&e["type"], &e["code"], &e["id"]),
            (&json!("error"), &json!("bad_request"), &json!(4)),
            "{bad}"
        );
    }
    // The connection stays usable.
    send_json(&mut ws, json!({"op":"ping","id":5})).await;
    assert_eq!(next_json(&mut ws).await, json!({"type":"pong","id":5}));
}

/// A client that cannot take its own replay is conflated like any slow consumer: the
/// replay goes through the bounded outbound queue, and what it leaves out shows as
/// `skipped` (every tick accounted for, `seq` increasing, the newest delivered).
#[tokio::test]
async fn a_replay_counts_against_the_outbound_queue() {
    let mut cfg = test_config(1);
    cfg.feed.history = 5_000;
    cfg.limits.outbound_queue_bytes = 4096;
    let srv = start(cfg);
    let mut p = session(&srv, &srv.publisher_token("pub")).await;
    publish(&mut p, "BTC-USD", 0, 2_000).await;
    let mut ws = session(&srv, &srv.token("small-queue")).await;
    send_json(
        &mut ws,
        json!({"op":"subscribe","symbols":["BTC-USD"],"since":{"BTC-USD":0}}),
    )
    .await;
    assert_eq!(next_json(&mut ws).await["type"], "subscribed");
    let (by, _) = read_until(&mut ws, |m| m["seq"] == 2000).await;
    let got = &by["BTC-USD"];
    let mut accounted = 0;
    let mut last = 0;
    for m in got {
        let seq = m["seq"].as_u64().unwrap();
        let skipped = m["skipped"].as_u64().unwrap_or(0);
        assert_eq!(seq, last + skipped + 1, "each jump explained by skipped: {m}");
        accounted += skipped + 1;
        last = seq;
    }
    assert_eq!(accounted, 2000);
    assert!(got.len() < 2000, "the queue's bound conflated the replay");
    let m = tickgate_admin_metrics(&srv);
    assert!(metric(&m, "tickgate_conflated_ticks_total") > 0.0, "{m}");
}

fn tickgate_admin_metrics(srv: &TestServer) -> String {
    admin_get(srv.admin(), "/metrics").1
}

fn admin_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let resp = raw(addr, format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status_of(&resp), body)
}

fn metric(body: &str, name: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics"))
}
