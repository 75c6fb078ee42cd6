//! The real binary: the embedded demo, the CLI commands, SIGTERM drain and SIGHUP reload.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_tickgate");

struct Proc {
    child: Child,
    addr: std::net::SocketAddr,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(args: &[&str], env: &[(&str, &str)]) -> Proc {
    let mut cmd = Command::new(BIN);
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let rx = line_channel(child.stdout.take().unwrap());
    let mut addr = None;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while addr.is_none() && std::time::Instant::now() < deadline {
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(200))
            && let Some(rest) = l.strip_prefix("tickgate listening on ")
        {
            addr = rest.split_whitespace().next().and_then(|a| a.parse().ok());
        }
    }
    Proc {
        child,
        addr: addr.expect("listening line"),
        lines: rx,
    }
}

fn signal(p: &Proc, sig: i32) {
    // SAFETY: kill(2) with a pid we spawned and own.
    unsafe {
        libc::kill(p.child.id() as i32, sig);
    }
}

const DEMO_ENV: [(&str, &str); 3] = [
    ("TICKGATE_SERVER_LISTEN", "127.0.0.1:0"),
    ("TICKGATE_ADMIN_LISTEN", "127.0.0.1:0"),
    ("TICKGATE_LOG_SECURITY", "/dev/null"),
];

/// The demo banner prints a token on its own line after "demo token".
fn demo_token(p: &Proc) -> String {
    loop {
        let l = p.lines.recv_timeout(Duration::from_secs(10)).expect("banner");
        if l.starts_with("demo token") {
            return p.lines.recv_timeout(Duration::from_secs(5)).unwrap();
        }
    }
}

#[tokio::test]
async fn demo_streams_ticks_and_drains_on_sigterm() {
    let mut p = spawn(&["serve"], &DEMO_ENV);
    let token = demo_token(&p);
    let url = format!("ws://{}/v1/stream", p.addr);
    let mut ws = connect(&url, Some(&token), &[]).await.unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "welcome");
    send_json(&mut ws, json!({"op":"ping","id":1})).await;
    assert_eq!(next_json(&mut ws).await, json!({"type":"pong","id":1}));
    send_json(
        &mut ws,
        json!({"op":"subscribe","id":2,"symbols":["BTC-USD","ETH-USD"],"snapshot":true}),
    )
    .await;
    assert_eq!(next_json(&mut ws).await["type"], "subscribed");
    let mut got = std::collections::HashSet::new();
    while got.len() < 2 {
        let m = next_json(&mut ws).await;
        assert!(m["type"] == "tick" || m["type"] == "snapshot", "{m}");
        got.insert(m["s"].as_str().unwrap().to_string());
    }
    signal(&p, libc::SIGTERM);
    assert_eq!(close_code(&mut ws, Duration::from_secs(10)).await, Some(1001));
    let status = tokio::task::spawn_blocking(move || {
        for _ in 0..200 {
            if let Some(s) = p.child.try_wait().unwrap() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    })
    .await
    .unwrap()
    .expect("exited within the drain timeout");
    assert!(status.success(), "{status:?}");
}

#[test]
fn demo_accepts_the_origins_of_its_own_address() {
    // A port chosen by the kernel (the address is known after the bind) and a port given
    // with --listen (known before): both must allow their own origins, and only them.
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let fixed = free.local_addr().unwrap().to_string();
    drop(free);
    for args in [&["serve"][..], &["serve", "--listen", &fixed]] {
        let p = spawn(args, &DEMO_ENV);
        let token = demo_token(&p);
        let port = p.addr.port();
        let status = |origin: Option<String>| {
            let origin = origin.map(|o| format!("Origin: {o}\r\n")).unwrap_or_default();
            let auth = format!("Authorization: Bearer {token}\r\n{origin}");
            status_of(&raw(p.addr, &upgrade_req("/v1/stream", &auth)))
        };
        assert_eq!(status(Some(format!("http://127.0.0.1:{port}"))), 101, "{args:?}");
        assert_eq!(status(Some(format!("http://localhost:{port}"))), 101, "{args:?}");
        assert_eq!(status(None), 101, "{args:?}");
        let other = if port == 8080 { 8081 } else { 8080 };
        assert_eq!(status(Some(format!("http://127.0.0.1:{other}"))), 403, "{args:?}");
        assert_eq!(status(Some(format!("http://localhost:{other}"))), 403, "{args:?}");
    }
}

#[test]
fn demo_allow_origin_lets_a_page_served_elsewhere_get_a_ticket_and_stream() {
    let page = "http://127.0.0.1:8000";
    let p = spawn(&["serve", "--allow-origin", page], &DEMO_ENV);
    let token = demo_token(&p);
    let port = p.addr.port();
    let banner = loop {
        let l = p
            .lines
            .recv_timeout(Duration::from_secs(10))
            .expect("origins line");
        if l.starts_with("accepted origins: ") {
            break l;
        }
    };
    for o in [
        page.to_owned(),
        format!("http://127.0.0.1:{port}"),
        format!("http://localhost:{port}"),
    ] {
        assert!(banner.split([' ', ',']).any(|w| w == o), "{o} in {banner}");
    }
    assert!(banner.contains("requests without Origin"), "{banner}");
    // What the page's fetch sends: the preflight, then the POST; then the stream.
    let r = raw(
        p.addr,
        format!("OPTIONS /v1/ticket HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: {page}\r\nAccess-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: authorization\r\n\r\n").as_bytes(),
    );
    assert_eq!(status_of(&r), 204, "{r}");
    assert!(
        r.contains(&format!("\r\nAccess-Control-Allow-Origin: {page}\r\n")),
        "{r}"
    );
    let r = raw(
        p.addr,
        format!("POST /v1/ticket HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: {page}\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\n\r\n").as_bytes(),
    );
    assert_eq!(status_of(&r), 200, "{r}");
    assert!(
        r.contains(&format!("\r\nAccess-Control-Allow-Origin: {page}\r\n")),
        "{r}"
    );
    let v: serde_json::Value = serde_json::from_str(r.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    let ticket = v["ticket"].as_str().unwrap();
    let r = raw(
        p.addr,
        &upgrade_req(
            &format!("/v1/stream?ticket={ticket}"),
            &format!("Origin: {page}\r\n"),
        ),
    );
    assert_eq!(status_of(&r), 101, "{r}");
    // Another page is still refused.
    let r = raw(
        p.addr,
        b"OPTIONS /v1/ticket HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: http://127.0.0.1:8001\r\nAccess-Control-Request-Method: POST\r\n\r\n",
    );
    assert_eq!(status_of(&r), 403, "{r}");
    assert!(!r.contains("Access-Control-"), "{r}");
}

fn run(args: &[&str]) -> (i32, String, String) {
    let o = Command::new(BIN).args(args).output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

#[test]
fn keygen_token_and_check_config() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let (code, _, err) = run(&["keygen", "--out", d, "--kid", "k7"]);
    assert_eq!(code, 0, "{err}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("k7.key"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let key = format!("{d}/k7.key");
    let (code, out, err) = run(&[
        "token",
        "--key",
        &key,
        "--sub",
        "alice",
        "--kid",
        "k7",
        "--ttl",
        "120",
        "--roles",
        "subscriber,publisher",
        "--symbols",
        "BTC-*,ETH-USD",
        "--sid",
        "s-1",
        "--did",
        "d-1",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 1);
    let tok = out.trim();
    assert_eq!(tok.split('.').count(), 3);
    // It verifies against the written public key.
    let pubkey = std::fs::read_to_string(dir.path().join("k7.pub")).unwrap();
    let mut ks = tickgate::auth::keys::KeySet::new();
    ks.insert("k7", tickgate::auth::keys::parse_spki_pem(&pubkey).unwrap())
        .unwrap();
    let v = tickgate::auth::jwt::Verifier::new(ks, Default::default());
    let c = v.verify(tok, now()).unwrap();
    assert_eq!(c.sub, "alice");
    assert_eq!(c.sid.as_deref(), Some("s-1"));
    assert_eq!(c.did.as_deref(), Some("d-1"));
    assert_eq!(c.symbols, vec!["BTC-*".to_string(), "ETH-USD".to_string()]);
    // check-config: effective settings with defaults; unknown keys fail with one line.
    let cfgp = dir.path().join("tg.toml");
    std::fs::write(
        &cfgp,
        format!("[auth]\nkeys = [{{ kid = \"k7\", path = \"{d}/k7.pub\" }}]\n"),
    )
    .unwrap();
    let (code, out, err) = run(&["check-config", cfgp.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("handshake_timeout = \"5s\""), "{out}");
    std::fs::write(&cfgp, "[limits]\nhandshake_timeuot = \"5s\"\n").unwrap();
    let (code, _, err) = run(&["check-config", cfgp.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("handshake_timeuot"), "{err}");
    let (code, out, _) = run(&["doctor"]);
    assert_eq!(code, 0);
    assert!(out.contains("io_uring"), "{out}");
    let (code, _, err) = run(&["serve", "--config", "/nonexistent.toml"]);
    assert_eq!(code, 1, "{err}");
}

#[test]
fn usage_errors_exit_1_with_one_line() {
    for (args, names) in [
        (&["keygen"][..], "--out"),
        (&["token", "--sub", "alice"][..], "--key"),
        (&["token", "--key", "k1.key"][..], "--sub"),
        (&["frobnicate"][..], "frobnicate"),
        (&["serve", "--frob"][..], "--frob"),
        (
            &["token", "--key", "k", "--sub", "a", "--ttl", "soon"][..],
            "soon",
        ),
        (&[][..], "command"),
        (
            &["serve", "--allow-origin", "http://127.0.0.1:8000/"][..],
            "--allow-origin http://127.0.0.1:8000/",
        ),
        (
            &[
                "serve",
                "--config",
                "/nonexistent/tickgate.toml",
                "--allow-origin",
                "http://127.0.0.1:8000",
            ][..],
            "auth.allowed_origins",
        ),
    ] {
        let (code, out, err) = run(args);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: one line, got {err:?}");
        assert!(
            err.starts_with("tickgate: ") && err.contains(names),
            "{args:?}: {err}"
        );
        assert!(out.is_empty(), "{args:?}: {out}");
    }
    // Help and version are not errors: stdout, exit 0, as clap prints them.
    for args in [
        &["--help"][..],
        &["keygen", "--help"],
        &["help", "token"],
        &["--version"],
    ] {
        let (code, out, err) = run(args);
        assert_eq!(code, 0, "{args:?}: {err}");
        assert!(err.is_empty(), "{args:?}: {err}");
        assert!(
            out.contains("Usage:") || out.starts_with("tickgate "),
            "{args:?}: {out}"
        );
    }
}

#[test]
fn token_warns_on_stderr_when_the_default_server_would_refuse_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    assert_eq!(run(&["keygen", "--out", d]).0, 0);
    let key = format!("{d}/k1.key");
    let token = |extra: &[&str]| {
        let mut args = vec!["token", "--key", &key, "--sub", "alice"];
        args.extend_from_slice(extra);
        let (code, out, err) = run(&args);
        assert_eq!(code, 0, "{extra:?}: {err}");
        assert_eq!(
            out.lines().count(),
            1,
            "{extra:?}: the token alone on stdout: {out}"
        );
        assert_eq!(out.trim().split('.').count(), 3, "{out}");
        err
    };
    // Above the default auth.max_token_lifetime (15m): the default server says too_long_lived.
    let err = token(&["--ttl", "3600", "--symbols", "*"]);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("warning") && err.contains("auth.max_token_lifetime"),
        "{err}"
    );
    // No --symbols: every subscribe is refused.
    let err = token(&[]);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("warning") && err.contains("--symbols") && err.contains("forbidden"),
        "{err}"
    );
    let err = token(&["--ttl", "3600"]);
    assert_eq!(err.lines().count(), 2, "both warnings: {err}");
    // Nothing to say: at the limit, with symbols; or an admin token, which needs none.
    assert_eq!(token(&["--ttl", "900", "--symbols", "BTC-*"]), "");
    assert_eq!(token(&["--roles", "admin"]), "");
    let (code, help, _) = run(&["token", "--help"]);
    assert_eq!(code, 0);
    let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        help.contains("every symbol of a subscribe or publish is refused"),
        "{help}"
    );
    assert!(help.contains("max_token_lifetime"), "{help}");
}

#[tokio::test]
async fn sighup_rotates_keys_without_dropping_connections() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap().to_string();
    assert_eq!(run(&["keygen", "--out", &d, "--kid", "old"]).0, 0);
    assert_eq!(run(&["keygen", "--out", &d, "--kid", "new"]).0, 0);
    let cfgp = dir.path().join("tg.toml");
    let write_cfg = |kids: &[&str]| {
        let keys: Vec<String> = kids
            .iter()
            .map(|k| format!("{{ kid = \"{k}\", path = \"{d}/{k}.pub\" }}"))
            .collect();
        std::fs::write(
            &cfgp,
            format!(
                "[server]\nlisten = \"127.0.0.1:0\"\nshards = 2\npin_cores = false\n[admin]\nlisten = \"127.0.0.1:0\"\n[auth]\nallow_missing_origin = true\nkeys = [{}]\n[log]\nsecurity = \"/dev/null\"\n",
                keys.join(", ")
            ),
        )
        .unwrap();
    };
    write_cfg(&["old"]);
    let p = spawn(&["serve", "--config", cfgp.to_str().unwrap()], &[]);
    let tok = |kid: &str| {
        run(&[
            "token",
            "--key",
            &format!("{d}/{kid}.key"),
            "--kid",
            kid,
            "--sub",
            "rot",
        ])
        .1
        .trim()
        .to_string()
    };
    let url = format!("ws://{}/v1/stream", p.addr);
    let mut live = connect(&url, Some(&tok("old")), &[]).await.unwrap();
    assert_eq!(next_json(&mut live).await["type"], "welcome");
    assert!(connect(&url, Some(&tok("new")), &[]).await.is_err());
    write_cfg(&["new"]);
    signal(&p, libc::SIGHUP);
    let mut rotated = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if connect(&url, Some(&tok("new")), &[]).await.is_ok() {
            rotated = true;
            break;
        }
    }
    assert!(rotated, "new key accepted after SIGHUP");
    let r = raw(
        p.addr,
        &upgrade_req("/v1/stream", &format!("Authorization: Bearer {}\r\n", tok("old"))),
    );
    assert_eq!(status_of(&r), 401, "removed key rejected");
    send_json(&mut live, json!({"op":"ping","id":9})).await;
    assert_eq!(next_json(&mut live).await, json!({"type":"pong","id":9}));
}

#[test]
fn demo_serves_its_page_and_page_tokens_and_production_does_not() {
    let p = spawn(&["serve"], &DEMO_ENV);
    let line = loop {
        let l = p
            .lines
            .recv_timeout(Duration::from_secs(10))
            .expect("demo page line");
        if l.starts_with("demo page") {
            break l;
        }
    };
    assert!(line.ends_with(&format!(" http://{}/", p.addr)), "{line}");
    let r = raw(p.addr, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    assert_eq!(status_of(&r), 200, "{r}");
    assert!(
        r.contains("\r\nContent-Type: text/html; charset=utf-8\r\n"),
        "{r}"
    );
    assert!(r.contains("<pre id=\"state\">"), "{r}");
    // The page's token: from its own origin, a subscriber token the stream accepts.
    let origin = format!("http://{}", p.addr);
    let r = raw(
        p.addr,
        format!(
            "POST /v1/demo-token HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: {origin}\r\nContent-Length: 0\r\n\r\n"
        )
        .as_bytes(),
    );
    assert_eq!(status_of(&r), 200, "{r}");
    let v: serde_json::Value = serde_json::from_str(r.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    let token = v["token"].as_str().unwrap();
    let auth = format!("Authorization: Bearer {token}\r\nOrigin: {origin}\r\n");
    assert_eq!(status_of(&raw(p.addr, &upgrade_req("/v1/stream", &auth))), 101);
    // From another origin: refused.
    let r = raw(
        p.addr,
        b"POST /v1/demo-token HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: http://127.0.0.1:1\r\nContent-Length: 0\r\n\r\n",
    );
    assert_eq!(status_of(&r), 403, "{r}");
    drop(p);

    // The demo with the page turned off: no page (the token endpoint stays).
    let p = spawn(&["serve", "--set", "server.demo_page=false"], &DEMO_ENV);
    assert_eq!(status_of(&raw(p.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")), 404);
    drop(p);

    // A config file: the page only when configured, never the demo's token endpoint.
    let dir = tempfile::tempdir().unwrap();
    let cfgp = dir.path().join("tg.toml");
    std::fs::write(
        &cfgp,
        "[server]\nlisten = \"127.0.0.1:0\"\nshards = 1\npin_cores = false\ndemo_page = true\n[admin]\nlisten = \"127.0.0.1:0\"\n[auth]\nallow_missing_origin = true\n[log]\nsecurity = \"/dev/null\"\n",
    )
    .unwrap();
    let p = spawn(&["serve", "--config", cfgp.to_str().unwrap()], &[]);
    assert_eq!(status_of(&raw(p.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")), 200);
    let r = raw(
        p.addr,
        b"POST /v1/demo-token HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    );
    assert_eq!(status_of(&r), 404, "{r}");
    drop(p);
    let p = spawn(
        &[
            "serve",
            "--config",
            cfgp.to_str().unwrap(),
            "--set",
            "server.demo_page=false",
        ],
        &[],
    );
    assert_eq!(status_of(&raw(p.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")), 404);
}
