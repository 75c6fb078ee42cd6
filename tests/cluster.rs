//! Several nodes on a real `nats-server` with JetStream (PROTOCOL.md section 9).
//!
//! Each test starts its own `nats-server -js` on a loopback port chosen at run time, with
//! its own store directory, and two tickgate nodes in this process, and talks to them with
//! tokio-tungstenite and a plain NATS client. `nats-server` comes from `TG_TEST_NATS_SERVER`
//! or the `PATH` (`tools/test.sh` installs Debian's package); without it the tests fail
//! and say so, they never skip.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use serde_json::json;
use tickgate::config::ClusterConfig;

fn nats_binary() -> PathBuf {
    if let Ok(p) = std::env::var("TG_TEST_NATS_SERVER") {
        return PathBuf::from(p);
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join("nats-server");
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "nats-server not found: run the suite with tools/test.sh (it installs Debian's nats-server), or set TG_TEST_NATS_SERVER"
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Nats {
    child: Option<Child>,
    port: u16,
    store: tempfile::TempDir,
}

impl Nats {
    fn start() -> Nats {
        let mut n = Nats {
            child: None,
            port: free_port(),
            store: tempfile::tempdir().unwrap(),
        };
        n.restart();
        n
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// (Re)starts the server on the same port and store.
    fn restart(&mut self) {
        let child = Command::new(nats_binary())
            .args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string(), "-sd"])
            .arg(self.store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        self.child = Some(child);
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("nats-server did not listen on {}", self.port);
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.stop();
    }
}

fn prefix() -> String {
    format!(
        "tg{}",
        std::process::id() as u64 * 1000 + free_port() as u64 % 1000
    )
}

fn node(url: &str, prefix: &str, key: &ed25519_dalek::SigningKey) -> TestServer {
    let mut cfg = test_config(2);
    cfg.cluster = Some(ClusterConfig {
        nats: vec![url.to_owned()],
        node: String::new(),
        subject_prefix: prefix.to_owned(),
        credentials: String::new(),
    });
    start_with_key(cfg, key.clone(), "k1")
}

/// A NATS server and two ready nodes on it, with their prefix and signing key.
struct Pair {
    nats: Nats,
    p: String,
    key: ed25519_dalek::SigningKey,
    a: TestServer,
    b: TestServer,
}

async fn pair() -> Pair {
    let nats = Nats::start();
    let p = prefix();
    let key = tickgate::auth::mint::generate_signing_key().unwrap();
    let (a, b) = (node(&nats.url(), &p, &key), node(&nats.url(), &p, &key));
    ready(&a).await;
    ready(&b).await;
    Pair { nats, p, key, a, b }
}

/// A pair with a subscriber of `sym` on node a (no snapshot) and an ingest leader.
async fn pair_subscribed(sym: &str) -> (Pair, Ws) {
    let pair = pair().await;
    let ws = subscribe(&pair.a, sym, false).await;
    leader(&[&pair.a, &pair.b]).await;
    (pair, ws)
}

async fn wait_until(what: &str, f: impl Fn() -> bool) {
    for _ in 0..400 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for {what}");
}

async fn ready(srv: &TestServer) {
    wait_until("the node to be ready", || srv.handle.shared.bus.is_serving()).await;
}

/// Subscribed, and the node holds its bus subscription for the symbol.
async fn subscribe(srv: &TestServer, sym: &str, snapshot: bool) -> Ws {
    let mut ws = session(srv, &srv.token("sub")).await;
    send_json(
        &mut ws,
        json!({"op":"subscribe","id":1,"symbols":[sym],"snapshot":snapshot}),
    )
    .await;
    let ack = next_json(&mut ws).await;
    assert_eq!(ack["type"], "subscribed", "{ack}");
    let shared = srv.handle.shared.clone();
    wait_until("the bus subscription", move || {
        shared.bus.metrics.subscriptions.load(Ordering::Relaxed) >= 1
    })
    .await;
    // The subscription is taken before the head is read: give the head its moment.
    tokio::time::sleep(Duration::from_millis(100)).await;
    ws
}

/// One of the nodes reads the feed subjects.
async fn leader(nodes: &[&TestServer]) {
    let shared: Vec<_> = nodes.iter().map(|n| n.handle.shared.clone()).collect();
    wait_until("an ingest leader", move || {
        shared
            .iter()
            .any(|s| s.bus.metrics.leader.load(Ordering::Acquire))
    })
    .await;
}

fn tick(sym: &str, n: u64) -> serde_json::Value {
    json!({"s":sym,"ts":n,"bid":100.0 + n as f64,"ask":101.0 + n as f64,"last":100.5,"qty":1.0})
}

/// The next `tick` (skipping anything else), as (seq, bid).
async fn next_tick(ws: &mut Ws) -> (u64, f64) {
    loop {
        let m = next_json(ws).await;
        if m["type"] == "tick" {
            assert!(m.get("skipped").is_none(), "no gap expected: {m}");
            return (m["seq"].as_u64().unwrap(), m["bid"].as_f64().unwrap());
        }
    }
}

async fn publish_ws(ws: &mut Ws, id: u64, t: serde_json::Value) -> serde_json::Value {
    send_json(ws, json!({"op":"publish","id":id,"ticks":[t]})).await;
    loop {
        let m = next_json(ws).await;
        if m["id"] == id {
            return m;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_nats_tick_reaches_every_node_with_the_same_seq() {
    let Pair {
        nats,
        p,
        key: _,
        a,
        b,
    } = pair().await;
    let mut sa = subscribe(&a, "BTC-USD", false).await;
    let mut sb = subscribe(&b, "BTC-USD", false).await;
    leader(&[&a, &b]).await;

    let feed = async_nats::connect(nats.url()).await.unwrap();
    for n in 1..=5u64 {
        feed.publish(format!("{p}.in.BTC-USD"), tick("BTC-USD", n).to_string().into())
            .await
            .unwrap();
    }
    feed.flush().await.unwrap();
    let mut first = None;
    for n in 1..=5u64 {
        let (qa, ba) = next_tick(&mut sa).await;
        let (qb, bb) = next_tick(&mut sb).await;
        assert_eq!(
            (qa, ba),
            (qb, bb),
            "the same tick carries the same seq on both nodes"
        );
        let f = *first.get_or_insert(qa);
        assert_eq!(qa, f + n - 1, "+1 per tick");
        assert_eq!(ba, 100.0 + n as f64, "in the feed handler's order");
    }
}

/// Nodes started at the same moment race for the ingest claim; exactly one may win. Two
/// leaders would each append every raw tick, so subscribers would get it twice, under two
/// seqs (`tools/cluster.sh --check` saw that on most runs). A node that lost the race
/// notices only at its next refresh (a third of the claim's life), so sampling for longer
/// than that catches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_starting_together_never_have_two_ingest_leaders() {
    let nats = Nats::start();
    let key = tickgate::auth::mint::generate_signing_key().unwrap();
    for round in 0..2 {
        let p = prefix();
        // Each on its own thread, at once, so their first claims race.
        let nodes: Vec<TestServer> = std::thread::scope(|s| {
            let started: Vec<_> = (0..3).map(|_| s.spawn(|| node(&nats.url(), &p, &key))).collect();
            started.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let shared: Vec<_> = nodes.iter().map(|n| n.handle.shared.clone()).collect();
        // Sample for at least 2.5 s and until one leads (a loaded machine can take longer
        // to connect and claim; the bound only stops a hung test).
        let start = std::time::Instant::now();
        let mut led = false;
        while start.elapsed() < Duration::from_millis(2500)
            || (!led && start.elapsed() < Duration::from_secs(30))
        {
            let leaders = shared
                .iter()
                .filter(|s| s.bus.metrics.leader.load(Ordering::Acquire))
                .count();
            assert!(leaders <= 1, "round {round}: {leaders} ingest leaders at once");
            led |= leaders == 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(led, "round {round}: no ingest leader");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_through_two_nodes_make_one_order_and_snapshots_agree() {
    let Pair {
        nats: _nats, a, b, ..
    } = pair().await;
    let mut sa = subscribe(&a, "ETH-USD", false).await;
    let mut sb = subscribe(&b, "ETH-USD", false).await;
    let mut pa = session(&a, &a.publisher_token("pa")).await;
    let mut pb = session(&b, &b.publisher_token("pb")).await;
    for n in 0..20u64 {
        let (pubr, id) = if n % 2 == 0 { (&mut pa, n) } else { (&mut pb, n) };
        let r = publish_ws(pubr, id, tick("ETH-USD", n)).await;
        assert_eq!(r["type"], "published", "{r}");
        assert_eq!(r["count"], 1);
    }
    let mut seqs_a = Vec::new();
    let mut seqs_b = Vec::new();
    for _ in 0..20 {
        seqs_a.push(next_tick(&mut sa).await);
        seqs_b.push(next_tick(&mut sb).await);
    }
    assert_eq!(seqs_a, seqs_b, "one order on both nodes");
    for w in seqs_a.windows(2) {
        assert_eq!(w[1].0, w[0].0 + 1, "+1 per tick: {seqs_a:?}");
    }
    // Acknowledged publishes in turn: the order is the publish order.
    let bids: Vec<f64> = seqs_a.iter().map(|t| t.1).collect();
    assert_eq!(bids, (0..20).map(|n| 100.0 + n as f64).collect::<Vec<_>>());

    // A subscriber on a node with no interest in the symbol gets the cluster's newest
    // tick as its snapshot: publish GBP-USD on A, subscribe on B.
    let r = publish_ws(&mut pa, 100, tick("GBP-USD", 7)).await;
    assert_eq!(r["type"], "published", "{r}");
    let mut late = session(&b, &b.token("late")).await;
    send_json(
        &mut late,
        json!({"op":"subscribe","id":1,"symbols":["GBP-USD"],"snapshot":true}),
    )
    .await;
    let ack = next_json(&mut late).await;
    assert_eq!(ack["type"], "subscribed", "{ack}");
    let snap = next_json(&mut late).await;
    assert_eq!(snap["type"], "snapshot", "{snap}");
    assert_eq!(
        (snap["seq"].as_u64(), snap["bid"].as_f64()),
        (Some(1), Some(107.0)),
        "{snap}"
    );
    // And it goes on live with the next seq.
    let r = publish_ws(&mut pa, 101, tick("GBP-USD", 8)).await;
    assert_eq!(r["type"], "published", "{r}");
    assert_eq!(next_tick(&mut late).await, (2, 108.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_on_the_feed_subjects_is_dropped_and_counted() {
    let nats = Nats::start();
    let p = prefix();
    let key = tickgate::auth::mint::generate_signing_key().unwrap();
    let a = node(&nats.url(), &p, &key);
    ready(&a).await;
    let mut sa = subscribe(&a, "SOL-USD", false).await;
    leader(&[&a]).await;
    let feed = async_nats::connect(nats.url()).await.unwrap();
    let subject = format!("{p}.in.SOL-USD");
    let nan = tick("SOL-USD", 1).to_string().replace("101", "NaN");
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let junk: Vec<Vec<u8>> = vec![
        Vec::new(),
        b"not json".to_vec(),
        tick("ETH-USD", 1).to_string().into_bytes(),
        nan.into_bytes(),
        deep.into_bytes(),
        vec![0xff, 0xfe, b'{', b'}'],
        vec![b' '; 1_000_000],
    ];
    for j in &junk {
        feed.publish(subject.clone(), j.clone().into()).await.unwrap();
    }
    feed.publish(
        format!("{p}.in.lower-case"),
        tick("SOL-USD", 1).to_string().into(),
    )
    .await
    .unwrap();
    feed.publish(subject.clone(), tick("SOL-USD", 42).to_string().into())
        .await
        .unwrap();
    feed.flush().await.unwrap();
    let (_, bid) = next_tick(&mut sa).await;
    assert_eq!(bid, 142.0, "the good tick arrives, the junk does not");
    let m = &a.handle.shared.bus.metrics;
    let rejected: u64 = m.rejected.iter().map(|r| r.load(Ordering::Relaxed)).sum();
    assert_eq!(rejected, junk.len() as u64 + 1, "every junk payload counted");
    let metrics = admin_get(a.admin(), "/metrics");
    assert!(
        metrics.contains("tickgate_ingest_rejected_total{reason=\"symbol_mismatch\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tickgate_ingest_rejected_total{reason=\"empty\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("tickgate_bus_up 1"), "{metrics}");
}

fn admin_get(addr: std::net::SocketAddr, path: &str) -> String {
    raw(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_nats_a_node_serves_but_is_not_ready_and_recovers_when_it_comes() {
    // Nothing listens on the port yet.
    let mut nats = Nats {
        child: None,
        port: free_port(),
        store: tempfile::tempdir().unwrap(),
    };
    let p = prefix();
    let key = tickgate::auth::mint::generate_signing_key().unwrap();
    let a = node(&nats.url(), &p, &key);
    let health = admin_get(a.admin(), "/healthz");
    assert_eq!(status_of(&health), 200, "{health}");
    let r = admin_get(a.admin(), "/readyz");
    assert_eq!(status_of(&r), 503, "{r}");
    assert!(r.contains("bus unavailable"), "{r}");
    let mut pa = session(&a, &a.publisher_token("pa")).await;
    let r = publish_ws(&mut pa, 1, tick("ADA-USD", 1)).await;
    assert_eq!(
        (r["type"].as_str(), r["code"].as_str()),
        (Some("error"), Some("unavailable")),
        "{r}"
    );

    nats.restart();
    ready(&a).await;
    let r = admin_get(a.admin(), "/readyz");
    assert_eq!(status_of(&r), 200, "{r}");
    let mut sa = subscribe(&a, "ADA-USD", false).await;
    let r = publish_ws(&mut pa, 2, tick("ADA-USD", 2)).await;
    assert_eq!(r["type"], "published", "{r}");
    assert_eq!(next_tick(&mut sa).await, (1, 102.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restarting_mid_stream_keeps_clients_and_never_goes_back() {
    let mut nats = Nats::start();
    let p = prefix();
    let key = tickgate::auth::mint::generate_signing_key().unwrap();
    let a = node(&nats.url(), &p, &key);
    ready(&a).await;
    let mut sa = subscribe(&a, "XRP-USD", false).await;
    let mut pa = session(&a, &a.publisher_token("pa")).await;
    for n in 1..=3u64 {
        let r = publish_ws(&mut pa, n, tick("XRP-USD", n)).await;
        assert_eq!(r["type"], "published", "{r}");
        assert_eq!(next_tick(&mut sa).await.0, n);
    }

    nats.stop();
    let shared = a.handle.shared.clone();
    wait_until("the node to notice", move || !shared.bus.is_ready()).await;
    let r = admin_get(a.admin(), "/readyz");
    assert_eq!(status_of(&r), 503, "{r}");
    let r = publish_ws(&mut pa, 10, tick("XRP-USD", 10)).await;
    assert_eq!(r["code"], "unavailable", "{r}");
    // The client connections stay: a ping is answered.
    send_json(&mut sa, json!({"op":"ping","id":5})).await;
    let pong = next_json(&mut sa).await;
    assert_eq!(pong["type"], "pong", "{pong}");

    nats.restart();
    ready(&a).await;
    // The subscriptions come back with the connection; the order goes on from the store.
    let mut got = None;
    for n in 11..=40u64 {
        let r = publish_ws(&mut pa, n, tick("XRP-USD", n)).await;
        if r["type"] == "published" {
            got = Some(n);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let n = got.expect("publishing works again after the restart");
    let m = loop {
        let m = next_json(&mut sa).await;
        if m["type"] == "tick" {
            break m;
        }
    };
    assert_eq!(m["bid"].as_f64(), Some(100.0 + n as f64), "{m}");
    assert!(m["seq"].as_u64().unwrap() > 3, "seq never goes back: {m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_on_one_node_closes_on_the_other_and_binds_a_later_node() {
    let Pair { nats, p, key, a, b } = pair().await;
    let shared = b.handle.shared.clone();
    wait_until("node b loaded the revocations", move || shared.bus.is_serving()).await;
    let token = b.token("mallory");
    let mut victim = session(&b, &token).await;
    let mut bystander = session(&b, &b.token("alice")).await;

    let (status, body) = revoke(&a, "mallory");
    assert_eq!(status, 200, "{body}");
    // Within a second on the other node (the bound is generous; it only keeps a broken
    // build from hanging).
    assert_eq!(close_code(&mut victim, Duration::from_secs(5)).await, Some(4003));
    send_json(&mut bystander, json!({"op":"ping","id":1})).await;
    assert_eq!(next_json(&mut bystander).await["type"], "pong");

    // A node started afterwards loads it before it says ready, and refuses the token.
    let c = node(&nats.url(), &p, &key);
    let sc = c.handle.shared.clone();
    wait_until("node c ready with the revocations", move || sc.bus.is_serving()).await;
    let r = admin_get(c.admin(), "/readyz");
    assert_eq!(status_of(&r), 200, "{r}");
    let refused = connect(&c.url(), Some(&token), &[]).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 401),
        other => panic!("the revoked token must be refused: {:?}", other.map(|_| ())),
    }
    assert!(connect(&c.url(), Some(&c.token("alice")), &[]).await.is_ok());
}

/// Revocations expire from the stream with the longest token lifetime: a node that starts
/// after every kept revocation expired has nothing to apply and says ready (the stream's
/// last sequence stays behind them; before the fix it waited for it forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_starting_after_every_revocation_expired_is_ready() {
    let nats = Nats::start();
    let p = prefix();
    let key = tickgate::auth::mint::generate_signing_key().unwrap();
    let subjects = tickgate::bus::Subjects::new(&p);
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    // Made first with a 1 s age (the nodes keep an existing stream's settings), so the
    // test need not wait out a real token lifetime.
    let name = format!("{}_REVOKED", subjects.stream());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: name.clone(),
        subjects: vec![subjects.revoke()],
        max_age: Duration::from_secs(1),
        ..Default::default()
    })
    .await
    .unwrap();
    let a = node(&nats.url(), &p, &key);
    ready(&a).await;
    let (status, body) = revoke(&a, "mallory");
    assert_eq!(status, 200, "{body}");
    // Stored, then expired.
    let mut gone = false;
    for _ in 0..200 {
        let mut s = js.get_stream(&name).await.unwrap();
        let st = s.info().await.unwrap().state.clone();
        if st.last_sequence >= 1 && st.messages == 0 {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gone, "the revocation was stored and expired");
    let c = node(&nats.url(), &p, &key);
    ready(&c).await;
    let r = admin_get(c.admin(), "/readyz");
    assert_eq!(status_of(&r), 200, "{r}");
}

/// nats-server restarted (same store): the ingest leader's claim and the tickets are on
/// file and survive (in memory, as they once were, they were gone: no node led the ingest
/// again), so a node leads the ingest past the claim's lifetime, raw feed ticks go on
/// from the stored order, and tickets are issued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_nats_restarts_the_feed_is_read_again_and_tickets_work() {
    let sym = "DOT-USD";
    let (
        Pair {
            mut nats, p, a, b, ..
        },
        mut sa,
    ) = pair_subscribed(sym).await;
    feed(&nats, &p, sym, 2, 0).await.unwrap();
    assert_eq!(next_tick(&mut sa).await.0, 1);
    assert_eq!(next_tick(&mut sa).await.0, 2);

    nats.stop();
    let (sa_, sb_) = (a.handle.shared.clone(), b.handle.shared.clone());
    wait_until("both nodes notice", move || {
        !sa_.bus.is_ready() && !sb_.bus.is_ready()
    })
    .await;
    nats.restart();
    ready(&a).await;
    ready(&b).await;
    // Past the claim's lifetime (3 s): a leader from before the restart has had to
    // refresh its claim since.
    tokio::time::sleep(Duration::from_secs(4)).await;
    // A leader still, or again.
    let (sa_, sb_) = (a.handle.shared.clone(), b.handle.shared.clone());
    wait_until("an ingest leader after the restart", move || {
        [&sa_, &sb_]
            .iter()
            .any(|s| s.bus.metrics.leader.load(Ordering::Acquire))
    })
    .await;
    // Published until one is read (the leader may take its subscription a moment after
    // the claim); each later one follows it with the next `seq`.
    let pusher = feed_until_read(&nats, &p, sym, 3);
    let m = loop {
        let m = next_json(&mut sa).await;
        if m["type"] == "tick" {
            break m;
        }
    };
    assert_eq!(
        m["seq"].as_u64(),
        Some(3),
        "the order goes on from the store: {m}"
    );
    assert_eq!(next_tick(&mut sa).await.0, 4);
    pusher.abort();
    // Tickets.
    assert_eq!(
        ticket_within_5s(&b).await,
        200,
        "tickets are issued again after the restart"
    );
}

/// An exiting ingest leader (what `SIGTERM` does after the drain) deletes its claim, so
/// another node leads the ingest at once instead of when the claim expires, and the feed
/// goes on through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exiting_ingest_leader_releases_its_claim() {
    let sym = "ATOM-USD";
    let Pair { nats, p, a, b, .. } = pair().await;
    leader(&[&a, &b]).await;
    let (lead, other) = if a.handle.shared.bus.leads_ingest() {
        (&a, &b)
    } else {
        (&b, &a)
    };
    let mut sub = subscribe(other, sym, false).await;
    lead.handle
        .shared
        .bus
        .release_ingest
        .store(true, Ordering::Release);
    let shared = lead.handle.shared.clone();
    wait_until("the leader lets the ingest go", move || {
        !shared.bus.leads_ingest()
    })
    .await;
    // Its claim is gone now, not when it expires (3 s after its last refresh): what the
    // claim subject holds, if anything, is the other node's.
    let subjects = tickgate::bus::Subjects::new(&p);
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let claims = js
        .get_stream(format!("{}_LEADER", subjects.stream()))
        .await
        .unwrap();
    let name = lead.handle.shared.bus.node_name();
    if let Ok(m) = claims.get_last_raw_message_by_subject(&subjects.leader()).await {
        assert_ne!(
            m.payload.as_ref(),
            name.as_bytes(),
            "the exiting node's claim is deleted"
        );
    }
    let shared = other.handle.shared.clone();
    wait_until("the other node leads", move || shared.bus.leads_ingest()).await;
    let pusher = feed_until_read(&nats, &p, sym, 1);
    assert_eq!(next_tick(&mut sub).await.0, 1);
    pusher.abort();
}

/// A symbol first asked for while the bus does not answer (here: node b's connection
/// silently frozen): its head cannot be read then, and is read again once the node has
/// connected again, so the waiting subscriber gets its snapshot without waiting for the
/// symbol's next tick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_that_could_not_be_read_is_read_again_when_the_bus_answers() {
    let sym = "NEAR-USD";
    let nats = Nats::start();
    let proxy = Freezer::start(nats.port).await;
    let p = prefix();
    let key = tickgate::auth::mint::generate_signing_key().unwrap();
    let a = node(&nats.url(), &p, &key);
    let b = node(&proxy.url(), &p, &key);
    ready(&a).await;
    ready(&b).await;
    let mut sa = subscribe(&a, sym, false).await;
    leader(&[&a, &b]).await;
    let pusher = feed_until_read(&nats, &p, sym, 1);
    assert_eq!(next_tick(&mut sa).await.0, 1);
    pusher.abort();
    let _ = pusher.await;
    // Whatever else was appended before the feed stopped: the newest `seq` is the head.
    let mut head = 1;
    while let Some(m) = next_json_within(&mut sa, Duration::from_millis(300)).await {
        if m["type"] == "tick" {
            head = m["seq"].as_u64().unwrap();
        }
    }

    proxy.freeze();
    let mut sb = session(&b, &b.token("late")).await;
    send_json(
        &mut sb,
        json!({"op":"subscribe","id":1,"symbols":[sym],"snapshot":true}),
    )
    .await;
    // The node notices the silence within seconds and connects again.
    let snap = loop {
        let m = next_json_within(&mut sb, Duration::from_secs(30))
            .await
            .expect("a snapshot after the node connected again");
        if m["type"] == "snapshot" {
            break m;
        }
        assert_ne!(m["type"], "tick", "the snapshot comes first: {m}");
    };
    assert_eq!(snap["seq"].as_u64(), Some(head), "{snap}");
}

/// A TCP proxy to nats-server whose connections can be frozen: they stay open and carry
/// nothing (a NATS host that died without closing them, a network that drops every
/// packet). Connections made after the freeze work.
struct Freezer {
    port: u16,
    /// Connections numbered below this are frozen.
    frozen_below: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Connections accepted so far.
    accepted: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Freezer {
    async fn start(upstream: u16) -> Freezer {
        use std::sync::atomic::AtomicU64;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let frozen_below = std::sync::Arc::new(AtomicU64::new(0));
        let accepted = std::sync::Arc::new(AtomicU64::new(0));
        let (fb, acc) = (frozen_below.clone(), accepted.clone());
        let task = tokio::spawn(async move {
            while let Ok((c, _)) = l.accept().await {
                let (id, fb) = (acc.fetch_add(1, Ordering::AcqRel), fb.clone());
                tokio::spawn(async move {
                    let Ok(u) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await else {
                        return;
                    };
                    let (cr, cw) = c.into_split();
                    let (ur, uw) = u.into_split();
                    let up = tokio::spawn(Self::pump(cr, uw, id, fb.clone()));
                    let down = tokio::spawn(Self::pump(ur, cw, id, fb));
                    let _ = tokio::join!(up, down);
                });
            }
        });
        Freezer {
            port,
            frozen_below,
            accepted,
            task,
        }
    }

    async fn pump(
        mut r: tokio::net::tcp::OwnedReadHalf,
        mut w: tokio::net::tcp::OwnedWriteHalf,
        id: u64,
        frozen_below: std::sync::Arc<std::sync::atomic::AtomicU64>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match r.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if id < frozen_below.load(Ordering::Acquire) {
                // Lost on the way; the socket stays open.
                continue;
            }
            if w.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Every connection made so far carries nothing from now on.
    fn freeze(&self) {
        self.frozen_below
            .store(self.accepted.load(Ordering::Acquire), Ordering::Release);
    }
}

impl Drop for Freezer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// NATS stops answering on a connection that stays open: the node notices within a few
/// seconds (its own checks, not the client's pings, which every request postpones), is
/// not ready meanwhile, and connects again; `publish` works once more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_bus_on_an_open_connection_is_noticed_and_left() {
    let nats = Nats::start();
    let proxy = Freezer::start(nats.port).await;
    let p = prefix();
    let key = tickgate::auth::mint::generate_signing_key().unwrap();
    let a = node(&proxy.url(), &p, &key);
    ready(&a).await;
    let connects = a.handle.shared.bus.metrics.connects.load(Ordering::Acquire);
    let mut pa = session(&a, &a.publisher_token("pa")).await;
    assert_eq!(
        publish_ws(&mut pa, 1, tick("LTC-USD", 1)).await["type"],
        "published"
    );

    // The node's connection carries nothing from now on; a new one would work.
    proxy.freeze();
    let shared = a.handle.shared.clone();
    let mut reconnected = false;
    for _ in 0..120 {
        if shared.bus.metrics.connects.load(Ordering::Acquire) > connects && shared.bus.is_serving() {
            reconnected = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(reconnected, "the node connected again");
    let mut ok = false;
    for n in 2..40u64 {
        if publish_ws(&mut pa, n, tick("LTC-USD", n)).await["type"] == "published" {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "publish works again");
}

/// A bus that comes back without its store (the revocations stream gone, its numbers
/// starting again at 1): the nodes make the stream again and apply what is revoked from
/// then on, though they had applied higher numbers before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_bus_lost_its_store_streams_are_made_again_and_revocations_followed() {
    let Pair {
        mut nats, p, a, b, ..
    } = pair().await;
    // Two revocations: both nodes have applied stream sequences 1 and 2.
    for sub in ["mallory", "trudy"] {
        let (status, body) = revoke(&a, sub);
        assert_eq!(status, 200, "{body}");
    }
    let shared = b.handle.shared.clone();
    wait_until("node b applied both", move || {
        shared
            .revocation
            .revoked_at(&tickgate::auth::revocation::RevokeTarget::Sub("trudy".into()))
            .is_some()
    })
    .await;
    // The store is lost.
    nats.stop();
    for e in std::fs::read_dir(nats.store.path()).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            std::fs::remove_dir_all(&p).unwrap();
        } else {
            std::fs::remove_file(&p).unwrap();
        }
    }
    nats.restart();
    let mut victim = session(&b, &b.token("eve")).await;
    // Revoked on node a after the loss: stored as sequence 1 of the new stream, below
    // what both nodes applied before. Node b closes eve's session all the same.
    let mut status = 0;
    for _ in 0..100 {
        let (s, _) = revoke(&a, "eve");
        status = s;
        if s == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, 200);
    assert_eq!(close_code(&mut victim, Duration::from_secs(15)).await, Some(4003));
    // The other streams were made again too: a node claims the ingest in the claim's
    // stream made again, and tickets are issued.
    let subjects = tickgate::bus::Subjects::new(&p);
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let mut claimed = false;
    for _ in 0..100 {
        if let Ok(s) = js.get_stream(format!("{}_LEADER", subjects.stream())).await
            && s.get_last_raw_message_by_subject(&subjects.leader())
                .await
                .is_ok()
        {
            claimed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(claimed, "a node claims the ingest after the loss");
    assert_eq!(
        ticket_within_5s(&b).await,
        200,
        "tickets are issued again after the loss"
    );
}

/// The status of issuing a ticket on `srv`, asked every 100 ms until 200 (at most 50
/// times): the bus may still be coming back.
async fn ticket_within_5s(srv: &TestServer) -> u16 {
    let mut status = 0;
    for _ in 0..50 {
        status = issue_ticket(srv, &srv.token("alice")).0;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    status
}

/// `POST /admin/revoke` of a `sub` on `srv`: the status and the body.
fn revoke(srv: &TestServer, sub: &str) -> (u16, String) {
    admin_post(
        srv.admin(),
        "/admin/revoke",
        Some(&srv.admin_token()),
        &format!(r#"{{"sub":"{sub}"}}"#),
    )
}

/// POST /v1/ticket with a bearer token; the ticket.
fn issue_ticket(srv: &TestServer, token: &str) -> (u16, String) {
    let req = format!(
        "POST /v1/ticket HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\nOrigin: https://app.example.com\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    let r = raw(srv.addr(), req.as_bytes());
    let body = r.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status_of(&r), body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_issued_on_one_node_is_redeemable_once_on_any_node() {
    let Pair {
        nats: _nats, a, b, ..
    } = pair().await;
    let (status, body) = issue_ticket(&a, &a.token("tina"));
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let ticket = v["ticket"].as_str().unwrap().to_string();
    // The ticket is not on the bus in the clear: its stream holds a hash and a sealed token.
    let url = |srv: &TestServer| format!("{}?ticket={ticket}", srv.url());
    let mut ws = connect(&url(&b), None, &[])
        .await
        .expect("redeemed on the other node");
    let w = next_json(&mut ws).await;
    assert_eq!(
        (w["type"].as_str(), w["sub"].as_str()),
        (Some("welcome"), Some("tina")),
        "{w}"
    );
    // Once: neither node takes it again.
    for srv in [&a, &b] {
        match connect(&url(srv), None, &[]).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 401),
            other => panic!("a used ticket must be refused: {:?}", other.map(|_| ())),
        }
    }
    // One issued on A and redeemed on A is gone for B as well.
    let (_, body) = issue_ticket(&a, &a.token("tom"));
    let t2 = serde_json::from_str::<serde_json::Value>(&body).unwrap()["ticket"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        connect(&format!("{}?ticket={t2}", a.url()), None, &[])
            .await
            .is_ok()
    );
    match connect(&format!("{}?ticket={t2}", b.url()), None, &[]).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 401),
        other => panic!("a used ticket must be refused: {:?}", other.map(|_| ())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_user_cap_counts_connections_on_every_node() {
    let nats = Nats::start();
    let p = prefix();
    let key = tickgate::auth::mint::generate_signing_key().unwrap();
    let mk = || {
        let mut cfg = test_config(2);
        cfg.limits.per_user_max_connections = 2;
        cfg.cluster = Some(ClusterConfig {
            nats: vec![nats.url()],
            node: String::new(),
            subject_prefix: p.clone(),
            credentials: String::new(),
        });
        start_with_key(cfg, key.clone(), "k1")
    };
    let (a, b) = (mk(), mk());
    ready(&a).await;
    ready(&b).await;
    let seen_by = |srv: &TestServer, n: usize| {
        let shared = srv.handle.shared.clone();
        move || {
            let key = tickgate::auth::usercap::user_key("carol");
            shared.auth.caps.cluster().unwrap().sum(&key, shared.now_ms()) == n
        }
    };
    let c1 = session(&a, &a.token("carol")).await;
    wait_until("b to hear of carol's connection on a", seen_by(&b, 1)).await;
    let c2 = session(&b, &b.token("carol")).await;
    wait_until("a to hear of carol's connection on b", seen_by(&a, 1)).await;
    for srv in [&a, &b] {
        match connect(&srv.url(), Some(&srv.token("carol")), &[]).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 429),
            other => panic!("the third connection must be refused: {:?}", other.map(|_| ())),
        }
    }
    // Another user is not affected.
    let _d = session(&a, &a.token("dave")).await;
    // One closes on a: b admits again once it hears of it.
    drop(c1);
    wait_until("b to hear carol left a", seen_by(&b, 0)).await;
    let _c3 = session(&b, &b.token("carol")).await;
    drop(c2);
}

#[test]
fn doctor_checks_the_configured_nats_and_jetstream() {
    let nats = Nats::start();
    let dir = tempfile::tempdir().unwrap();
    let doctor = |url: &str| {
        let path = dir.path().join("t.toml");
        std::fs::write(&path, format!("[cluster]\nnats = [\"{url}\"]\n")).unwrap();
        let o = Command::new(env!("CARGO_BIN_EXE_tickgate"))
            .args(["doctor", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(o.status.success());
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .find(|l| l.contains("cluster"))
            .unwrap_or_default()
            .to_string()
    };
    let ok = doctor(&nats.url());
    assert!(
        ok.starts_with("[ok  ]") && ok.contains("JetStream enabled"),
        "{ok}"
    );
    // A server without JetStream, and no server at all.
    let port = free_port();
    let mut plain = Command::new(nats_binary())
        .args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let no_js = doctor(&format!("nats://127.0.0.1:{port}"));
    let _ = plain.kill();
    let _ = plain.wait();
    assert!(
        no_js.starts_with("[WARN]") && no_js.contains("JetStream"),
        "{no_js}"
    );
    let none = doctor(&format!("nats://127.0.0.1:{}", free_port()));
    assert!(
        none.starts_with("[WARN]") && none.contains("cannot connect"),
        "{none}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_publishes_on_two_nodes_never_share_a_seq() {
    let Pair {
        nats: _nats, a, b, ..
    } = pair().await;
    let mut sa = subscribe(&a, "DOGE-USD", false).await;
    let mut sb = subscribe(&b, "DOGE-USD", false).await;
    let mut pa = session(&a, &a.publisher_token("pa")).await;
    let mut pb = session(&b, &b.publisher_token("pb")).await;
    // Both nodes append to the same symbol at once, without waiting for acknowledgements.
    const N: u64 = 40;
    for n in 0..N {
        send_json(
            &mut pa,
            json!({"op":"publish","id":n,"ticks":[tick("DOGE-USD", n)]}),
        )
        .await;
        send_json(
            &mut pb,
            json!({"op":"publish","id":n,"ticks":[tick("DOGE-USD", 1000 + n)]}),
        )
        .await;
    }
    for ws in [&mut pa, &mut pb] {
        let mut acked = 0;
        while acked < N {
            let m = next_json(ws).await;
            assert_eq!(m["type"], "published", "{m}");
            acked += 1;
        }
    }
    let mut got_a = Vec::new();
    let mut got_b = Vec::new();
    for _ in 0..2 * N {
        got_a.push(next_tick(&mut sa).await);
        got_b.push(next_tick(&mut sb).await);
    }
    assert_eq!(got_a, got_b, "one order on both nodes");
    for w in got_a.windows(2) {
        assert_eq!(w[1].0, w[0].0 + 1, "+1 per tick, each seq once: {got_a:?}");
    }
    let mut bids: Vec<u64> = got_a.iter().map(|t| t.1 as u64).collect();
    bids.sort_unstable();
    bids.dedup();
    assert_eq!(bids.len() as u64, 2 * N, "every tick exactly once");
    let conflicts: u64 = [&a, &b]
        .iter()
        .map(|s| s.handle.shared.bus.metrics.conflicts.load(Ordering::Relaxed))
        .sum();
    let reordered: u64 = [&a, &b]
        .iter()
        .map(|s| s.handle.shared.bus.metrics.reordered.load(Ordering::Relaxed))
        .sum();
    eprintln!("append conflicts resolved: {conflicts}; ticks put back in order: {reordered}");
}

/// A feed handler publishing ticks 1..=n of `sym` on `<p>.in.<sym>`, pausing `pause_ms`
/// every ten.
fn feed(nats: &Nats, p: &str, sym: &'static str, n: u64, pause_ms: u64) -> tokio::task::JoinHandle<()> {
    let url = nats.url();
    let subject = format!("{p}.in.{sym}");
    tokio::spawn(async move {
        let feed = async_nats::connect(url).await.unwrap();
        for k in 1..=n {
            feed.publish(subject.clone(), tick(sym, k).to_string().into())
                .await
                .unwrap();
            if k % 10 == 0 {
                feed.flush().await.unwrap();
                tokio::time::sleep(Duration::from_millis(pause_ms)).await;
            }
        }
        feed.flush().await.unwrap();
    })
}

/// Feeds `sym` through NATS, one tick every 25 ms counted from `from`, until aborted (at
/// most 400): for a test that waits until one is read, as a new ingest leader may
/// subscribe a moment after its claim.
fn feed_until_read(nats: &Nats, p: &str, sym: &'static str, from: u64) -> tokio::task::JoinHandle<()> {
    let (url, subject) = (nats.url(), format!("{p}.in.{sym}"));
    tokio::spawn(async move {
        let c = async_nats::connect(url).await.unwrap();
        for k in from..=400u64 {
            c.publish(subject.clone(), tick(sym, k).to_string().into())
                .await
                .unwrap();
            c.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    })
}

/// PROTOCOL.md 10 across nodes: the feed keeps publishing through NATS while a client's
/// node drains; its `1001` says to reconnect with `since`, and on the other node (which
/// never had the symbol: it reads the cluster's history from the stream) the client gets
/// every tick after the last one it processed, then the live ones: nothing missed, nothing
/// twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_of_a_draining_node_resumes_on_the_other_with_since_and_misses_nothing() {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    const N: u64 = 400;
    let sym = "RR-SYM";
    let (Pair { nats, p, a, b, .. }, mut sa) = pair_subscribed(sym).await;
    let feeder = feed(&nats, &p, sym, N, 5);
    let mut got = Vec::new();
    while got.len() < 50 {
        got.push(next_tick(&mut sa).await.0);
    }
    a.handle.drain();
    // What was on its way before the close is processed too.
    let reason = loop {
        match tokio::time::timeout(Duration::from_secs(10), sa.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                let m: serde_json::Value = serde_json::from_str(&t).unwrap();
                if m["type"] == "tick" {
                    assert!(m.get("skipped").is_none(), "{m}");
                    got.push(m["seq"].as_u64().unwrap());
                }
            }
            Ok(Some(Ok(Message::Close(Some(f))))) => {
                assert_eq!(u16::from(f.code), 1001);
                break f.reason.to_string();
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("no close from the draining node: {other:?}"),
        }
    };
    assert!(
        reason.contains("since"),
        "the drain tells to reconnect with since: {reason}"
    );
    let last = *got.last().unwrap();
    assert!(last < N, "the drain came while the feed was still publishing");
    let mut sb = session(&b, &b.token("sub")).await;
    send_json(
        &mut sb,
        json!({"op":"subscribe","id":2,"symbols":[sym],"since":{sym: last}}),
    )
    .await;
    assert_eq!(next_json(&mut sb).await["type"], "subscribed");
    while *got.last().unwrap() < N {
        let m = next_json(&mut sb).await;
        assert_eq!(m["type"], "tick", "a replay, not a reset: {m}");
        assert!(m.get("skipped").is_none(), "{m}");
        got.push(m["seq"].as_u64().unwrap());
    }
    feeder.await.unwrap();
    assert_eq!(got, (1..=N).collect::<Vec<_>>(), "every tick once, in order");
    let m = admin_get(b.admin(), "/metrics");
    assert!(m.contains("tickgate_bus_backfilled_ticks_total "), "{m}");
    assert!(!m.contains("tickgate_bus_backfilled_ticks_total 0\n"), "{m}");
}

/// `tickgate client` does the reconnect itself: given both nodes, it resumes on the second
/// with `since` when the first drains, and prints every tick once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_client_resumes_on_another_node_with_since() {
    const N: u64 = 300;
    let Pair {
        nats,
        p,
        key: _,
        a,
        b,
    } = pair().await;
    let sym = "CLI-SYM";
    let urls = format!("{},{}", a.url(), b.url());
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tickgate"))
        .args([
            "client",
            "--url",
            &urls,
            "--token",
            &a.token("cli"),
            "--symbols",
            sym,
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = line_channel(child.stdout.take().unwrap());
    let err = line_channel(child.stderr.take().unwrap());
    // Subscribed on node a (the symbol waits there for its first tick).
    let lines = tokio::task::spawn_blocking(move || {
        let mut v = Vec::new();
        while let Ok(l) = out.recv_timeout(Duration::from_secs(20)) {
            let done = l.contains("\"type\":\"subscribed\"");
            v.push(l);
            if done {
                break;
            }
        }
        (v, out)
    });
    let (_, out) = lines.await.unwrap();
    leader(&[&a, &b]).await;
    let feeder = feed(&nats, &p, sym, N, 10);
    let seqs = tokio::task::spawn_blocking(move || {
        let mut seqs = Vec::new();
        let mut drained = false;
        while seqs.last() != Some(&N) {
            let l = out.recv_timeout(Duration::from_secs(20)).expect("client output");
            if l.starts_with("closed by server: 1001") {
                continue;
            }
            let m: serde_json::Value = serde_json::from_str(&l).unwrap_or_default();
            match m["type"].as_str() {
                Some("tick") => seqs.push(m["seq"].as_u64().unwrap()),
                Some("snapshot") => panic!("a snapshot, not a replay: {l}"),
                _ => {}
            }
            if seqs.len() == 40 && !drained {
                drained = true;
                a.handle.drain();
            }
        }
        seqs
    })
    .await
    .unwrap();
    feeder.await.unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let stderr: Vec<String> = std::iter::from_fn(|| err.recv_timeout(Duration::from_secs(1)).ok()).collect();
    assert!(
        stderr
            .iter()
            .any(|l| l.contains("reconnecting to ") && l.contains("with since {\"CLI-SYM\":")),
        "{stderr:?}"
    );
    assert_eq!(seqs, (1..=N).collect::<Vec<_>>(), "{stderr:?}");
}

/// A node that takes a symbol for a subscriber without `since` waits only for the stream's
/// head, not for its history (the live ticks of a node taking many symbols at once would
/// wait for up to `feed.history` messages each); the history is read behind the live
/// ticks and put in front of what the node kept, and a `since` from before the node took
/// the symbol waits for that read if it is still under way: replayed in full, not reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_took_a_symbol_from_its_head_still_replays_the_cluster_history() {
    const N: u64 = 120;
    let sym = "HB-SYM";
    let (Pair { nats, p, b, .. }, mut sa) = pair_subscribed(sym).await;
    feed(&nats, &p, sym, N, 1).await.unwrap();
    for n in 1..=N {
        assert_eq!(next_tick(&mut sa).await.0, n);
    }
    // Node b takes the symbol now, from its head (seq N), for a subscriber without since.
    let mut first = subscribe(&b, sym, true).await;
    let snap = next_json(&mut first).await;
    assert_eq!(
        (snap["type"].as_str(), snap["seq"].as_u64()),
        (Some("snapshot"), Some(N)),
        "{snap}"
    );
    // A client that processed tick 10 resumes on b, while b may still be reading the
    // history (then the subscription waits for it): ticks 11..=N, a replay, not a reset.
    let mut late = session(&b, &b.token("sub")).await;
    send_json(
        &mut late,
        json!({"op":"subscribe","id":2,"symbols":[sym],"since":{sym: 10}}),
    )
    .await;
    assert_eq!(next_json(&mut late).await["type"], "subscribed");
    for n in 11..=N {
        let m = next_json(&mut late).await;
        assert_eq!(
            (m["type"].as_str(), m["seq"].as_u64()),
            (Some("tick"), Some(n)),
            "{m}"
        );
        assert!(m.get("skipped").is_none(), "{m}");
    }
    let shared = b.handle.shared.clone();
    wait_until("b to count the history it read behind the head", move || {
        shared.bus.metrics.backfilled.load(Ordering::Relaxed) == N - 1
    })
    .await;
}

/// Under a burst the leader appends what queued for a symbol as one message (up to 64
/// ticks): the stream stores fewer messages than ticks, yet every node delivers each
/// `seq` once and in order, a snapshot read from the stream on another node is the last
/// tick of the last message, and a `since` there is replayed tick by tick from the
/// batched messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_is_appended_in_batches_and_read_back_tick_by_tick() {
    const N: u64 = 2000;
    let sym = "BURST-SYM";
    let (Pair { nats, p, b, .. }, mut sa) = pair_subscribed(sym).await;
    feed(&nats, &p, sym, N, 0).await.unwrap();
    for n in 1..=N {
        let (seq, bid) = next_tick(&mut sa).await;
        assert_eq!(
            (seq, bid),
            (n, 100.0 + n as f64),
            "each seq once, in the feed's order"
        );
    }
    let subjects = tickgate::bus::Subjects::new(&p);
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let mut stream = js.get_stream(subjects.stream()).await.unwrap();
    let appends = stream.info().await.unwrap().state.last_sequence;
    eprintln!("{N} ticks in {appends} appends");
    assert!(
        appends < N,
        "a burst goes in batches: {appends} appends for {N} ticks"
    );
    // Another node reads the newest message for the snapshot, and the history for since.
    let mut snap = subscribe(&b, sym, true).await;
    let m = next_json(&mut snap).await;
    assert_eq!(
        (m["type"].as_str(), m["seq"].as_u64(), m["bid"].as_f64()),
        (Some("snapshot"), Some(N), Some(100.0 + N as f64)),
        "{m}"
    );
    let mut late = session(&b, &b.token("sub")).await;
    send_json(
        &mut late,
        json!({"op":"subscribe","id":2,"symbols":[sym],"since":{sym: N - 300}}),
    )
    .await;
    assert_eq!(next_json(&mut late).await["type"], "subscribed");
    for n in N - 299..=N {
        let m = next_json(&mut late).await;
        assert_eq!(
            (m["type"].as_str(), m["seq"].as_u64(), m["bid"].as_f64()),
            (Some("tick"), Some(n), Some(100.0 + n as f64)),
            "{m}"
        );
    }
}

/// Anyone who may publish on `<prefix>.t.>` can leave a damaged newest message in the
/// stream. Its `Tg-Seq` and line count still say where the order stands, so the next
/// append never reuses a `seq` at or below it, even on a leader that holds no subscriber
/// of the symbol (no local floor): the subscribers on the other node see the order go on,
/// with `skipped` for the damaged message's two, not a `seq` going back and dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_newest_message_never_sends_seq_back() {
    let Pair {
        nats,
        p,
        key: _,
        a,
        b,
    } = pair().await;
    let sym = "DMG-SYM";
    leader(&[&a, &b]).await;
    let (lead, other) = if a.handle.shared.bus.metrics.leader.load(Ordering::Acquire) {
        (&a, &b)
    } else {
        (&b, &a)
    };
    let mut sub = subscribe(other, sym, false).await;
    feed(&nats, &p, sym, 5, 0).await.unwrap();
    for n in 1..=5 {
        assert_eq!(next_tick(&mut sub).await.0, n);
    }
    assert_eq!(
        lead.handle.shared.hub.seq_of(sym),
        0,
        "the leader holds no subscriber of it"
    );
    let subjects = tickgate::bus::Subjects::new(&p);
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Tg-Seq", "6");
    js.publish_with_headers(subjects.ordered(sym), headers, "junk\njunk".into())
        .await
        .unwrap()
        .await
        .unwrap();
    feed(&nats, &p, sym, 1, 0).await.unwrap();
    let m = next_json(&mut sub).await;
    assert_eq!(
        (m["type"].as_str(), m["seq"].as_u64(), m["skipped"].as_u64()),
        (Some("tick"), Some(8), Some(2)),
        "{m}"
    );
}
