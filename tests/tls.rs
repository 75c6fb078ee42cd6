//! `wss://`: TLS on the io_uring path (issue 7). A test CA is made here with rcgen; the
//! clients are tokio-tungstenite over rustls trusting that CA (or not), plus raw sockets
//! for the slow-handshake and pre-TLS rate-limit cases.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::json;
use tickgate::auth::keys::KeySet;
use tickgate::auth::seclog::SecurityLog;
use tickgate::config::{Config, TlsConfig};
use tickgate::state::{AuthState, Shared};
use tickgate::tls::TlsState;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{Connector, MaybeTlsStream};

/// A test certificate authority.
struct Ca {
    cert: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = p.self_signed(&key).unwrap();
        Ca {
            cert: cert.der().clone(),
            issuer: Issuer::new(p, key),
        }
    }

    /// A leaf for 127.0.0.1 and localhost: (chain PEM, key PEM, leaf DER).
    fn leaf(&self, cn: &str) -> (String, String, CertificateDer<'static>) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        let ca_pem = pem_of(&self.cert);
        (
            format!("{}{}", cert.pem(), ca_pem),
            key.serialize_pem(),
            cert.der().clone(),
        )
    }

    fn client(&self) -> Arc<rustls::ClientConfig> {
        client_config(&[&self.cert], None)
    }
}

fn pem_of(der: &CertificateDer<'_>) -> String {
    use base64::Engine as _;
    let b = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
    let mut s = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b.as_bytes().chunks(64) {
        s.push_str(std::str::from_utf8(line).unwrap());
        s.push('\n');
    }
    s.push_str("-----END CERTIFICATE-----\n");
    s
}

fn client_config(
    roots: &[&CertificateDer<'static>],
    only: Option<&'static rustls::SupportedProtocolVersion>,
) -> Arc<rustls::ClientConfig> {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add((*r).clone()).unwrap();
    }
    let versions: Vec<&'static rustls::SupportedProtocolVersion> = match only {
        Some(v) => vec![v],
        None => vec![&rustls::version::TLS13, &rustls::version::TLS12],
    };
    let mut cfg = rustls::ClientConfig::builder_with_provider(tickgate::tls::provider())
        .with_protocol_versions(&versions)
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

struct Files {
    _dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
}

impl Files {
    fn new(cert: &str, key: &str) -> Files {
        let dir = tempfile::tempdir().unwrap();
        let f = Files {
            cert: dir.path().join("tls.crt"),
            key: dir.path().join("tls.key"),
            _dir: dir,
        };
        f.write(cert, key);
        f
    }

    fn write(&self, cert: &str, key: &str) {
        write_atomic(&self.key, key);
        write_atomic(&self.cert, cert);
    }
}

/// Replace a file the way deployment tools do (write aside, rename over).
fn write_atomic(p: &Path, text: &str) {
    let tmp = p.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, p).unwrap();
}

fn start_tls(mut cfg: Config, files: &Files) -> TestServer {
    cfg.tls = Some(TlsConfig {
        cert: files.cert.clone(),
        key: files.key.clone(),
    });
    let key = tickgate::auth::mint::generate_signing_key().unwrap();
    let mut ks = KeySet::new();
    ks.insert("k1", key.verifying_key()).unwrap();
    let auth = AuthState::build(&cfg, ks).unwrap();
    let tls = TlsState::load(cfg.tls.as_ref().unwrap()).unwrap();
    let (log, lines) = SecurityLog::memory();
    let shared = Arc::new(Shared::new(cfg, auth, log).with_tls(tls));
    let handle = tickgate::rt::start(shared).unwrap();
    TestServer {
        handle,
        key,
        kid: "k1".into(),
        log: lines,
    }
}

fn wss_url(srv: &TestServer) -> String {
    format!("wss://127.0.0.1:{}/v1/stream", srv.addr().port())
}

async fn wss_connect(srv: &TestServer, client: Arc<rustls::ClientConfig>, token: &str) -> Result<Ws, String> {
    wss_connect_url(&wss_url(srv), client, token).await
}

async fn wss_connect_url(url: &str, client: Arc<rustls::ClientConfig>, token: &str) -> Result<Ws, String> {
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let fut =
        tokio_tungstenite::connect_async_tls_with_config(req, None, false, Some(Connector::Rustls(client)));
    match tokio::time::timeout(Duration::from_secs(10), fut).await {
        Ok(Ok((ws, _))) => Ok(ws),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timeout".into()),
    }
}

/// Connect, check the welcome, return the socket and the certificate the server presented.
async fn wss_session(
    srv: &TestServer,
    client: Arc<rustls::ClientConfig>,
    token: &str,
) -> (Ws, CertificateDer<'static>) {
    let mut ws = wss_connect(srv, client, token).await.expect("wss upgrade");
    let leaf = served_leaf(&ws);
    let w = next_json(&mut ws).await;
    assert_eq!(w["type"], "welcome", "{w}");
    (ws, leaf)
}

fn tls_of(ws: &Ws) -> &rustls::ClientConnection {
    match ws.get_ref() {
        MaybeTlsStream::Rustls(s) => s.get_ref().1,
        _ => panic!("not a TLS stream"),
    }
}

fn served_leaf(ws: &Ws) -> CertificateDer<'static> {
    tls_of(ws).peer_certificates().expect("peer certificates")[0]
        .clone()
        .into_owned()
}

async fn subscribe(ws: &mut Ws, sym: &str) {
    send_json(ws, json!({"op":"subscribe","id":1,"symbols":[sym]})).await;
    let ack = next_json(ws).await;
    assert_eq!(ack["type"], "subscribed", "{ack}");
}

async fn publish(p: &mut Ws, sym: &str, id: u64) {
    let ticks =
        json!([{"s":sym,"ts":1_732_345_678_123_456_789u64 + id,"bid":1.0,"ask":1.5,"last":1.25,"qty":2}]);
    send_json(p, json!({"op":"publish","id":id,"ticks":ticks})).await;
    let ack = next_json(p).await;
    assert_eq!(ack, json!({"type":"published","id":id,"count":1}));
}

async fn expect_tick(ws: &mut Ws, sym: &str) -> u64 {
    let m = next_json(ws).await;
    assert_eq!(m["type"], "tick", "{m}");
    assert_eq!(m["s"], sym);
    m["seq"].as_u64().unwrap()
}

#[tokio::test]
async fn wss_client_that_verifies_the_chain_authenticates_and_gets_ticks() {
    let ca = Ca::new("tickgate test CA");
    let (c, k, leaf) = ca.leaf("server-a");
    let files = Files::new(&c, &k);
    let srv = start_tls(test_config(2), &files);
    let (mut sub, served) = wss_session(&srv, ca.client(), &srv.token("alice")).await;
    assert_eq!(served, leaf);
    let t = tls_of(&sub);
    assert_eq!(t.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
    assert_eq!(t.alpn_protocol(), Some(&b"http/1.1"[..]));
    subscribe(&mut sub, "BTC-USD").await;
    let (mut p, _) = wss_session(&srv, ca.client(), &srv.publisher_token("pub")).await;
    for i in 1..=50 {
        publish(&mut p, "BTC-USD", i).await;
    }
    for i in 1..=50 {
        assert_eq!(expect_tick(&mut sub, "BTC-USD").await, i);
    }
    // Ping/pong and a clean close over TLS.
    send_json(&mut sub, json!({"op":"ping","id":9})).await;
    assert_eq!(next_json(&mut sub).await, json!({"type":"pong","id":9}));
    sub.close(None).await.unwrap();
    // The gate still judges over TLS: no token is a 401.
    let e = wss_connect(&srv, ca.client(), "not-a-token").await.unwrap_err();
    assert!(e.contains("401"), "{e}");
}

#[tokio::test]
async fn tls12_client_and_session_resumption() {
    let ca = Ca::new("tickgate test CA");
    let (c, k, _) = ca.leaf("server-a");
    let files = Files::new(&c, &k);
    let srv = start_tls(test_config(1), &files);
    let (ws, _) = wss_session(
        &srv,
        client_config(&[&ca.cert], Some(&rustls::version::TLS12)),
        &srv.token("a"),
    )
    .await;
    let t = tls_of(&ws);
    assert_eq!(t.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_2));
    assert_eq!(t.alpn_protocol(), Some(&b"http/1.1"[..]));
    let suite = format!("{:?}", t.negotiated_cipher_suite().unwrap().suite());
    assert!(suite.contains("GCM") || suite.contains("CHACHA20"), "{suite}");
    drop(ws);
    // One client config = one session store: the second connection resumes (TLS 1.3 ticket).
    let client = ca.client();
    let (first, _) = wss_session(&srv, client.clone(), &srv.token("b")).await;
    assert_eq!(tls_of(&first).handshake_kind(), Some(rustls::HandshakeKind::Full));
    let (second, _) = wss_session(&srv, client, &srv.token("b")).await;
    assert_eq!(
        tls_of(&second).handshake_kind(),
        Some(rustls::HandshakeKind::Resumed)
    );
}

#[tokio::test]
async fn client_that_does_not_trust_the_ca_fails() {
    let ca = Ca::new("tickgate test CA");
    let other = Ca::new("someone else");
    let (c, k, _) = ca.leaf("server-a");
    let files = Files::new(&c, &k);
    let srv = start_tls(test_config(1), &files);
    let e = wss_connect(&srv, other.client(), &srv.token("a"))
        .await
        .unwrap_err();
    assert!(e.to_lowercase().contains("certificate"), "{e}");
    // A plain ws:// client gets nothing usable from a TLS listener either.
    assert!(connect(&srv.url(), Some(&srv.token("a")), &[]).await.is_err());
    // The server survives both.
    wss_session(&srv, ca.client(), &srv.token("a")).await;
}

#[tokio::test]
async fn reloaded_certificate_serves_new_connections_while_old_ones_stream() {
    let ca1 = Ca::new("CA one");
    let ca2 = Ca::new("CA two");
    let (c1, k1, leaf1) = ca1.leaf("server-1");
    let files = Files::new(&c1, &k1);
    let srv = start_tls(test_config(2), &files);
    let (mut old, served) = wss_session(&srv, ca1.client(), &srv.token("old")).await;
    assert_eq!(served, leaf1);
    subscribe(&mut old, "ETH-USD").await;
    let (mut p, _) = wss_session(&srv, ca1.client(), &srv.publisher_token("pub")).await;
    publish(&mut p, "ETH-USD", 1).await;
    assert_eq!(expect_tick(&mut old, "ETH-USD").await, 1);

    // Swap the files (another CA, so the two are easy to tell apart) and reload as SIGHUP does.
    let (c2, k2, leaf2) = ca2.leaf("server-2");
    files.write(&c2, &k2);
    tickgate::cli::reload(&srv.handle, None);
    let tls = srv.handle.shared.tls.as_ref().unwrap();
    let (_new, served) = wss_session(&srv, ca2.client(), &srv.token("new")).await;
    assert_eq!(served, leaf2, "new connections get the new certificate");
    assert!(wss_connect(&srv, ca1.client(), &srv.token("x")).await.is_err());
    // The old connections (subscriber and publisher, both on certificate 1) keep streaming.
    for i in 2..=20 {
        publish(&mut p, "ETH-USD", i).await;
    }
    for i in 2..=20 {
        assert_eq!(expect_tick(&mut old, "ETH-USD").await, i);
    }
    assert_eq!(served_leaf(&old), leaf1);

    // A corrupt replacement is refused and certificate 2 stays in force.
    let failures = tls.reload_failures.load(std::sync::atomic::Ordering::Relaxed);
    write_atomic(
        &files.cert,
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    );
    assert!(tls.reload().is_err());
    tickgate::cli::reload(&srv.handle, None);
    assert!(tls.reload_failures.load(std::sync::atomic::Ordering::Relaxed) >= failures + 2);
    let (_again, served) = wss_session(&srv, ca2.client(), &srv.token("again")).await;
    assert_eq!(served, leaf2);
    // A key that does not match the certificate is refused too.
    let (c3, _, _) = ca1.leaf("server-3");
    files.write(&c3, &k2);
    assert!(tls.reload().unwrap_err().contains("certificate/key"));
    let (_again, served) = wss_session(&srv, ca2.client(), &srv.token("again")).await;
    assert_eq!(served, leaf2);
    publish(&mut p, "ETH-USD", 21).await;
    assert_eq!(expect_tick(&mut old, "ETH-USD").await, 21);
}

#[tokio::test]
async fn certificate_changed_on_disk_is_picked_up_without_a_signal() {
    let ca = Ca::new("tickgate test CA");
    let (c1, k1, leaf1) = ca.leaf("server-1");
    let files = Files::new(&c1, &k1);
    let srv = start_tls(test_config(1), &files);
    let (_ws, served) = wss_session(&srv, ca.client(), &srv.token("a")).await;
    assert_eq!(served, leaf1);
    let (c2, k2, leaf2) = ca.leaf("server-2");
    files.write(&c2, &k2);
    // The watcher polls every few seconds; allow it a generous while.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_ws, served) = wss_session(&srv, ca.client(), &srv.token("a")).await;
        if served == leaf2 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the watcher never reloaded"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The first flight of a real client (a ClientHello), as bytes.
fn client_hello(ca: &Ca) -> Vec<u8> {
    let mut c =
        rustls::ClientConnection::new(ca.client(), ServerName::try_from("localhost").unwrap()).unwrap();
    let mut out = Vec::new();
    while c.wants_write() {
        c.write_tls(&mut out).unwrap();
    }
    out
}

/// Read until EOF (or a reset); returns the bytes received before it, or `None` on timeout.
fn read_to_close(s: &mut std::net::TcpStream, timeout: Duration) -> Option<Vec<u8>> {
    s.set_read_timeout(Some(timeout)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Some(got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Some(got),
            Err(_) => return None,
        }
    }
}

#[test]
fn slow_tls_handshake_is_cut_by_the_handshake_timeout() {
    let ca = Ca::new("tickgate test CA");
    let (c, k, _) = ca.leaf("server-a");
    let files = Files::new(&c, &k);
    let mut cfg = test_config(1);
    cfg.limits.handshake_timeout = Duration::from_millis(300);
    let srv = start_tls(cfg, &files);
    let hello = client_hello(&ca);
    let mut s = std::net::TcpStream::connect(srv.addr()).unwrap();
    s.write_all(&hello[..hello.len() / 2]).unwrap();
    // Half a ClientHello, then nothing: the server answers nothing and closes at the deadline.
    let got = read_to_close(&mut s, Duration::from_secs(20)).expect("the server closes the socket");
    assert!(got.is_empty(), "no ServerHello for half a ClientHello");
    let counters = &srv.handle.shared.security.counters;
    assert_eq!(counters.get("handshake", "rejected", "timeout"), 1);
    // A complete TLS handshake that never sends its HTTP request is cut the same way.
    let client = ca.client();
    let mut conn = rustls::ClientConnection::new(client, ServerName::try_from("localhost").unwrap()).unwrap();
    let mut s = std::net::TcpStream::connect(srv.addr()).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut s).unwrap();
    }
    read_to_close(&mut s, Duration::from_secs(20)).expect("the server closes the socket");
    assert_eq!(counters.get("handshake", "rejected", "timeout"), 2);
}

#[test]
fn rate_limit_is_applied_before_the_tls_handshake() {
    let ca = Ca::new("tickgate test CA");
    let (c, k, _) = ca.leaf("server-a");
    let files = Files::new(&c, &k);
    let mut cfg = test_config(1);
    cfg.limits.per_ip_handshakes_per_sec = 1;
    cfg.limits.per_ip_burst = 1;
    let srv = start_tls(cfg, &files);
    let hello = client_hello(&ca);
    // The bucket holds one token and refills one a second: of a quick burst of attempts,
    // the first gets a ServerHello and at least one other is closed before any TLS work.
    let mut answered = 0;
    let mut refused = 0;
    for _ in 0..6 {
        let mut s = std::net::TcpStream::connect(srv.addr()).unwrap();
        let _ = s.write_all(&hello);
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 5];
        match s.read(&mut buf) {
            Ok(n) if n > 0 => {
                assert_eq!(buf[0], 0x16, "a TLS handshake record");
                answered += 1;
            }
            _ => refused += 1,
        }
    }
    assert!(answered >= 1, "answered {answered}");
    assert!(refused >= 1, "refused {refused}");
    let logs = srv.log_lines();
    let line = logs
        .iter()
        .find(|l| l.contains("rate_limited"))
        .expect("a security log line");
    assert!(line.contains("\"ip\":\"127.0.0.1\""), "{line}");
    let counted = srv
        .handle
        .shared
        .security
        .counters
        .get("handshake", "rejected", "rate_limited");
    assert_eq!(counted, refused);
}

const BIN: &str = env!("CARGO_BIN_EXE_tickgate");

#[test]
fn doctor_warns_when_tls_is_absent_on_a_public_listener() {
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain.toml");
    std::fs::write(&plain, "[server]\nlisten = \"0.0.0.0:8080\"\n").unwrap();
    let with_tls = dir.path().join("tls.toml");
    std::fs::write(
        &with_tls,
        "[server]\nlisten = \"0.0.0.0:8443\"\n[tls]\ncert = \"/etc/tickgate/tls.crt\"\nkey = \"/etc/tickgate/tls.key\"\n",
    )
    .unwrap();
    let loopback = dir.path().join("lo.toml");
    std::fs::write(&loopback, "[server]\nlisten = \"127.0.0.1:8080\"\n").unwrap();
    let doctor = |p: &Path| {
        let out = std::process::Command::new(BIN)
            .args(["doctor", "--config"])
            .arg(p)
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    let out = doctor(&plain);
    assert!(
        out.lines()
            .any(|l| l.starts_with("[WARN] tls") && l.contains("0.0.0.0:8080")),
        "{out}"
    );
    assert!(!doctor(&with_tls).lines().any(|l| l.contains("] tls ")));
    assert!(!doctor(&loopback).lines().any(|l| l.contains("] tls ")));
}

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn sighup_reloads_the_certificate_of_the_running_binary() {
    use std::io::BufRead as _;
    let ca1 = Ca::new("CA one");
    let ca2 = Ca::new("CA two");
    let (c1, k1, leaf1) = ca1.leaf("server-1");
    let files = Files::new(&c1, &k1);
    let dir = tempfile::tempdir().unwrap();
    tickgate::auth::mint::keygen(dir.path(), "k1").unwrap();
    let sk_pem = std::fs::read_to_string(dir.path().join("k1.key")).unwrap();
    let sk = tickgate::auth::mint::signing_key_from_pkcs8_pem(&sk_pem).unwrap();
    let cfg_path = dir.path().join("tickgate.toml");
    std::fs::write(
        &cfg_path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nshards = 1\npin_cores = false\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             [tls]\ncert = {:?}\nkey = {:?}\n[auth]\nkeys = [{{ kid = \"k1\", path = {:?} }}]\nallow_missing_origin = true\n\
             [log]\nsecurity = \"/dev/null\"\n",
            files.cert,
            files.key,
            dir.path().join("k1.pub")
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&cfg_path)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    for pipe in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
    }
    let child = Child(child);
    let mut addr: Option<std::net::SocketAddr> = None;
    while addr.is_none() {
        let l = rx.recv_timeout(Duration::from_secs(20)).expect("listening line");
        if let Some(rest) = l.strip_prefix("tickgate listening on ") {
            assert!(rest.contains("tls"), "{rest}");
            addr = rest.split_whitespace().next().and_then(|a| a.parse().ok());
        }
    }
    let url = format!("wss://{}/v1/stream", addr.unwrap());
    let now = now();
    let token = tickgate::auth::mint::sign_token(
        &sk,
        "k1",
        &tickgate::auth::mint::Claims {
            sub: "ops".into(),
            exp: now + 300,
            iat: Some(now),
            roles: vec!["subscriber".into(), "publisher".into()],
            symbols: vec!["*".into()],
            ..Default::default()
        },
    );
    let mut old = wss_connect_url(&url, ca1.client(), &token).await.unwrap();
    assert_eq!(served_leaf(&old), leaf1);
    assert_eq!(next_json(&mut old).await["type"], "welcome");
    subscribe(&mut old, "BTC-USD").await;

    let (c2, k2, leaf2) = ca2.leaf("server-2");
    files.write(&c2, &k2);
    // SAFETY: kill(2) with the pid of the child we spawned and still own.
    unsafe {
        libc::kill(child.0.id() as i32, libc::SIGHUP);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let l = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("a reload log line");
        if l.contains("TLS certificate reloaded") && l.contains("SIGHUP") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no SIGHUP reload logged");
    }
    let mut new = wss_connect_url(&url, ca2.client(), &token).await.unwrap();
    assert_eq!(served_leaf(&new), leaf2);
    assert_eq!(next_json(&mut new).await["type"], "welcome");
    // The connection made before the reload keeps streaming.
    publish(&mut new, "BTC-USD", 1).await;
    assert_eq!(expect_tick(&mut old, "BTC-USD").await, 1);
}

#[test]
fn demo_client_speaks_wss_with_a_ca_file() {
    let ca = Ca::new("tickgate test CA");
    let (c, k, _) = ca.leaf("server-a");
    let files = Files::new(&c, &k);
    let srv = start_tls(test_config(1), &files);
    let ca_file = files.cert.with_file_name("ca.pem");
    std::fs::write(&ca_file, pem_of(&ca.cert)).unwrap();
    let url = format!("wss://localhost:{}/v1/stream", srv.addr().port());
    let run = |ca: Option<&Path>| {
        let mut cmd = std::process::Command::new(BIN);
        cmd.args([
            "client",
            "--url",
            &url,
            "--token",
            &srv.token("cli"),
            "--count",
            "2",
        ]);
        if let Some(ca) = ca {
            cmd.arg("--ca").arg(ca);
        }
        cmd.output().unwrap()
    };
    let out = run(Some(&ca_file));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("\"type\":\"welcome\""), "{stdout}");
    assert!(stdout.contains("\"type\":\"subscribed\""), "{stdout}");
    // Without --ca (or trusting the wrong CA) it refuses.
    assert!(!run(None).status.success());
    std::fs::write(&ca_file, pem_of(&Ca::new("other").cert)).unwrap();
    assert!(!run(Some(&ca_file)).status.success());
}
