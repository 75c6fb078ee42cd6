//! The demo page in a real headless Chromium, driven over the DevTools protocol.
//!
//! The test starts the real `tickgate serve` (the embedded demo, on ports chosen at run
//! time) and Debian's `chromium` (`--headless=new`), talks to Chromium's DevTools
//! WebSocket with tokio-tungstenite, and reads the page's state (the JSON it writes into
//! `<pre id="state">`) with `Runtime.evaluate` until what it waits for is there, within a
//! bounded number of attempts (no timing is a pass criterion). It checks: the demo prints
//! the page's URL; the page got a demo token and a ticket, opened the stream and showed
//! ticks with increasing `seq`; it answered `reauth_required` with a fresh demo token; a
//! page served from another origin (a small HTTP server in this test) is refused
//! (`Failed to fetch` for the ticket, `1006` for the stream); on `SIGTERM` the page shows
//! `1001` in words. A screenshot of the page goes to a temporary file whose path is printed.
//! The stream negotiated `permessage-deflate` (the demo turns `compression.enabled` on, and
//! Chromium offers it on every WebSocket), so the ticks the page shows came through the
//! server's compressor and the browser's inflater.
//!
//! Chromium comes from `TG_TEST_CHROMIUM` or `chromium` on the `PATH` (`tools/test.sh`
//! installs Debian's package); without it the test fails and says so, it never skips.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::Duration;

use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const BIN: &str = env!("CARGO_BIN_EXE_tickgate");

/// Attempts at reading a page's state, 100 ms apart: a generous bound (60 s), not a pass
/// criterion.
const ATTEMPTS: usize = 600;

fn chromium_binary() -> PathBuf {
    if let Ok(p) = std::env::var("TG_TEST_CHROMIUM") {
        return PathBuf::from(p);
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join("chromium");
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "chromium not found (looked at TG_TEST_CHROMIUM, then `chromium` on the PATH): run the suite with tools/test.sh (it installs Debian's chromium), or set TG_TEST_CHROMIUM"
    );
}

/// A child process in its own process group, killed (with the group) on drop.
struct Proc {
    child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: kill(2) of the process group this test started (its id is the child's).
        unsafe {
            libc::kill(-(self.child.id() as i32), libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

/// The demo, its banner's lines, on ports chosen at run time. `lifetime.reauth_lead` is
/// close to the demo token's ten minutes, so `reauth_required` comes within seconds.
/// The first demo ticks fast (200 per symbol per second) so that the page's last `seq` is
/// far above what a restarted demo (10 per second) reaches while the page reconnects.
fn start_demo() -> (Proc, Receiver<String>) {
    start_demo_on("127.0.0.1:0", 200)
}

fn start_demo_on(listen: &str, rate: u32) -> (Proc, Receiver<String>) {
    let mut cmd = Command::new(BIN);
    cmd.arg("serve")
        .env("TICKGATE_SERVER_LISTEN", listen)
        .env("TICKGATE_FEED_SIMULATOR_RATE", rate.to_string())
        .env("TICKGATE_ADMIN_LISTEN", "127.0.0.1:0")
        .env("TICKGATE_LOG_SECURITY", "/dev/null")
        .env("TICKGATE_LIFETIME_REAUTH_LEAD", "597s")
        .env("TICKGATE_LIFETIME_REAUTH_SPREAD", "0s")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0);
    let mut child = cmd.spawn().expect("start the tickgate binary");
    let rx = common::line_channel(child.stdout.take().unwrap());
    (Proc { child }, rx)
}

/// The next banner line that starts with `prefix`.
fn banner_line(lines: &Receiver<String>, prefix: &str) -> String {
    loop {
        let l = lines
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("no banner line starting with {prefix:?}"));
        if l.starts_with(prefix) {
            return l;
        }
    }
}

/// Headless Chromium with remote debugging on a port it picks; its browser-level
/// DevTools WebSocket URL (read from stderr).
fn start_chromium(profile: &Path) -> (Proc, String) {
    let bin = chromium_binary();
    let mut child = Command::new(&bin)
        .args([
            "--headless=new",
            // Root (CI) needs it, and containers often lack the namespaces the sandbox
            // uses; the only pages loaded are this test's.
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--window-size=900,800",
            "--remote-debugging-port=0",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start {} ({e}): install Debian's chromium (tools/test.sh does) or set TG_TEST_CHROMIUM",
                bin.display()
            )
        });
    // Read to the end (and dropped once found) so Chromium never blocks on a full pipe.
    let rx = common::line_channel(child.stderr.take().unwrap());
    let proc = Proc { child };
    let mut seen = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(l) => {
                if let Some(i) = l.find("ws://")
                    && l.contains("DevTools listening on")
                {
                    return (proc, l[i..].trim().to_owned());
                }
                seen.push(l);
            }
            Err(_) => panic!(
                "{} did not print `DevTools listening on ws://...`; its stderr:\n{}",
                bin.display(),
                seen.join("\n")
            ),
        }
    }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A DevTools protocol client on the browser's WebSocket (flat sessions).
struct Cdp {
    ws: Ws,
    next_id: u64,
}

impl Cdp {
    async fn connect(url: &str) -> Cdp {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("connect to Chromium's DevTools WebSocket");
        Cdp { ws, next_id: 1 }
    }

    /// One command (`session`: a page's, from `Target.attachToTarget`); its result.
    async fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        self.ws
            .send(Message::text(msg.to_string()))
            .await
            .expect("send to DevTools");
        loop {
            let m = tokio::time::timeout(Duration::from_secs(30), self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("no answer to {method} from DevTools"))
                .expect("DevTools closed")
                .expect("DevTools read");
            let Message::Text(t) = m else { continue };
            let v: Value = serde_json::from_str(&t).expect("DevTools JSON");
            if v["id"] != json!(id) {
                continue; // an event, or another command's answer
            }
            if let Some(e) = v.get("error") {
                panic!("{method}: {e}");
            }
            return v["result"].clone();
        }
    }

    /// A new tab at `url`; its session id.
    async fn open(&mut self, url: &str) -> String {
        let t = self.call(None, "Target.createTarget", json!({"url": url})).await;
        let target = t["targetId"].as_str().expect("targetId").to_owned();
        let s = self
            .call(
                None,
                "Target.attachToTarget",
                json!({"targetId": target, "flatten": true}),
            )
            .await;
        s["sessionId"].as_str().expect("sessionId").to_owned()
    }

    /// The page's `<pre id="state">` parsed as JSON (`null` until there is one).
    async fn state(&mut self, session: &str) -> Value {
        let r = self
            .call(
                Some(session),
                "Runtime.evaluate",
                json!({
                    "expression": "(() => { const e = document.getElementById('state'); return e ? e.textContent : 'null'; })()",
                    "returnByValue": true
                }),
            )
            .await;
        r["result"]["value"]
            .as_str()
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or(Value::Null)
    }

    /// Polls the page's state until `done` says so, at most [`ATTEMPTS`] times, 100 ms
    /// apart; panics with `what` and the last state otherwise.
    async fn wait_for(&mut self, session: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let mut last = Value::Null;
        for _ in 0..ATTEMPTS {
            last = self.state(session).await;
            if done(&last) {
                return last;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the page never showed {what}; its last state: {last}");
    }
}

/// Serves `page` at every path of a loopback port: a page from an origin the demo does
/// not accept. The thread lives as long as the test process.
fn serve_foreign_page(page: String) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut s in l.incoming().map_while(Result::ok) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16384 {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{page}",
                page.len()
            );
            let _ = s.write_all(resp.as_bytes());
        }
    });
    addr
}

/// A page that tries the README's ticket flow against `demo` with `token`, then the
/// token-in-subprotocol stream, and writes what happened into `<pre id="state">`.
fn foreign_page(demo: SocketAddr, token: &str) -> String {
    format!(
        r#"<!doctype html><meta charset="utf-8"><title>elsewhere</title><pre id="state">{{}}</pre>
<script>
const st = {{ticket: null, ticket_error: null, ws_open: false, ws_close: null, done: false}};
const pub = () => document.getElementById("state").textContent = JSON.stringify(st);
(async () => {{
  try {{
    const r = await fetch("http://{demo}/v1/ticket", {{method: "POST", headers: {{Authorization: "Bearer {token}"}}}});
    st.ticket = r.status;
  }} catch (e) {{ st.ticket_error = String(e); }}
  pub();
  const ws = new WebSocket("ws://{demo}/v1/stream", ["md.v1.json", "bearer.{token}"]);
  ws.onopen = () => {{ st.ws_open = true; pub(); }};
  ws.onclose = (ev) => {{ st.ws_close = ev.code; st.done = true; pub(); }};
}})();
</script>"#
    )
}

/// Every symbol's `seq` in the page's recent ticks only goes up.
fn seqs_increase(recent: &Value) -> bool {
    let mut last = std::collections::HashMap::new();
    recent.as_array().into_iter().flatten().all(|p| {
        let (s, seq) = (p[0].as_str().unwrap_or(""), p[1].as_u64().unwrap_or(0));
        last.insert(s.to_owned(), seq).is_none_or(|prev| seq > prev)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_page_in_headless_chromium() {
    let (demo, lines) = start_demo();
    let listening = banner_line(&lines, "tickgate listening on ");
    let addr: SocketAddr = listening["tickgate listening on ".len()..]
        .split_whitespace()
        .next()
        .and_then(|a| a.parse().ok())
        .expect("address in the banner");
    banner_line(&lines, "demo token");
    let token = lines
        .recv_timeout(Duration::from_secs(5))
        .expect("the demo token");
    let page_line = banner_line(&lines, "demo page");
    let url = page_line.rsplit(' ').next().unwrap().to_owned();
    assert_eq!(url, format!("http://{addr}/"), "{page_line}");

    let profile = tempfile::tempdir().unwrap();
    let (_chromium, devtools) = start_chromium(profile.path());
    let mut cdp = Cdp::connect(&devtools).await;

    // The demo page: a demo token, a ticket, the stream, ticks.
    let page = cdp.open(&url).await;
    let st = cdp
        .wait_for(&page, "5 ticks and an answered reauth_required", |s| {
            s["ticks_shown"].as_u64().unwrap_or(0) >= 5 && s["reauths"].as_u64().unwrap_or(0) >= 1
                || s["phase"] == "failed"
                || s["phase"] == "closed"
        })
        .await;
    println!("demo page state: {st}");
    println!("negotiated WebSocket extensions: {}", st["extensions"]);
    assert_eq!(st["phase"], "open", "{st}");
    assert!(
        st["extensions"]
            .as_str()
            .is_some_and(|e| e.starts_with("permessage-deflate")),
        "the demo compresses for a browser that offers it: {st}"
    );
    assert_eq!(st["token_source"], "demo", "{st}");
    assert_eq!(st["ticket_ok"], true, "ticket flow: {st}");
    assert_eq!(st["ticket_status"], 200, "{st}");
    assert_eq!(st["protocol"], "md.v1.json", "{st}");
    assert_eq!(st["sub"], "demo", "{st}");
    assert!(st["ticks_shown"].as_u64().unwrap() >= 5, "{st}");
    assert_eq!(st["seq_increasing"], true, "{st}");
    assert!(seqs_increase(&st["recent"]), "{st}");
    assert!(st["recent"].as_array().is_some_and(|r| r.len() >= 5), "{st}");
    assert!(st["reauth_required"].as_u64().unwrap() >= 1, "{st}");
    assert_eq!(st["reauth_errors"], 0, "{st}");
    assert!(
        st["seq"].as_object().is_some_and(|m| m.contains_key("BTC-USD")),
        "{st}"
    );
    // Ticks keep coming, still in order.
    let before = st["ticks_shown"].as_u64().unwrap();
    let st = cdp
        .wait_for(&page, "more ticks", |s| {
            s["ticks_shown"].as_u64().unwrap_or(0) > before + 5
        })
        .await;
    assert_eq!(st["seq_increasing"], true, "{st}");
    assert!(seqs_increase(&st["recent"]), "{st}");
    cdp.wait_for(&page, "a latency figure", |s| s["latency_ms"]["p50"].is_number())
        .await;

    let shot = cdp
        .call(Some(&page), "Page.captureScreenshot", json!({"format": "png"}))
        .await;
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot["data"].as_str().expect("screenshot data"))
        .expect("screenshot base64");
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    let file = tempfile::Builder::new()
        .prefix("tickgate-demo-page-")
        .suffix(".png")
        .tempfile()
        .unwrap();
    let (mut f, path) = file.keep().unwrap();
    f.write_all(&png).unwrap();
    println!("screenshot of the demo page: {}", path.display());

    // A page served from an origin the demo does not accept: refused, and it shows it.
    let foreign = serve_foreign_page(foreign_page(addr, &token));
    let other = cdp.open(&format!("http://{foreign}/")).await;
    let st = cdp
        .wait_for(&other, "the refusal of the other origin", |s| s["done"] == true)
        .await;
    println!("page from http://{foreign}: {st}");
    assert_eq!(
        st["ticket"],
        Value::Null,
        "a ticket answer reached the page: {st}"
    );
    assert!(
        st["ticket_error"]
            .as_str()
            .is_some_and(|e| e.contains("Failed to fetch")),
        "{st}"
    );
    assert_eq!(st["ws_open"], false, "{st}");
    assert_eq!(st["ws_close"], 1006, "{st}");

    // The demo drains: the page says so in words.
    // SAFETY: kill(2) of the demo process this test started.
    unsafe {
        libc::kill(demo.child.id() as i32, libc::SIGTERM);
    }
    let st = cdp
        .wait_for(&page, "the close after SIGTERM", |s| {
            s["close"]["code"].is_number()
        })
        .await;
    println!("demo page after SIGTERM: {}", st["close"]);
    assert_eq!(st["close"]["code"], 1001, "{st}");
    assert_eq!(st["close"]["reason"], "server draining", "{st}");
    assert!(
        st["close"]["words"].as_str().unwrap().contains("going away"),
        "{st}"
    );

    // The page resumes by itself (PROTOCOL.md 10): when a demo is back on the same
    // address it reconnects with `since`; the restarted demo numbers from 1 again, so
    // each symbol comes back as a `reset` snapshot, and ticks flow again in order.
    let mut demo = demo;
    let _ = demo.child.wait();
    let ticks_before = st["ticks_shown"].as_u64().unwrap();
    let (_demo2, lines2) = start_demo_on(&addr.to_string(), 10);
    banner_line(&lines2, "tickgate listening on ");
    let st = cdp
        .wait_for(&page, "the page to resume on the restarted demo", |s| {
            s["phase"] == "open"
                && s["resets"].as_u64().unwrap_or(0) >= 1
                && s["ticks_shown"].as_u64().unwrap_or(0) > ticks_before + 5
                || s["phase"] == "failed"
        })
        .await;
    println!(
        "demo page after the restart: reconnects {} resets {}",
        st["reconnects"], st["resets"]
    );
    assert_eq!(st["phase"], "open", "{st}");
    assert!(st["reconnects"].as_u64().unwrap() >= 1, "{st}");
    assert_eq!(
        st["seq_increasing"], true,
        "only reset snapshots restart a seq: {st}"
    );
    // Chromium may hang up before it answers: the group is killed on drop anyway.
    let _ = cdp
        .ws
        .send(Message::text(
            json!({"id": 0, "method": "Browser.close"}).to_string(),
        ))
        .await;
}
