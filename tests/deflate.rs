//! permessage-deflate (RFC 7692) on a real listener: the negotiation in the `101`, compressed
//! replies and ticks decoded with flate2 directly (an inflater independent of the server's
//! code), compressed client messages, the shared frame of `server_no_context_takeover`
//! subscribers, the inflate bound (`1009`), RSV1 without negotiation (`1002`), and Python
//! `websockets` (which offers the extension by default) streaming through it.
//!
//! tokio-tungstenite 0.28 has no permessage-deflate, so the client here is raw sockets.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use serde_json::{Value, json};
use tickgate::proto::frame::{OpCode, encode_client_frame_into};

const MASK: [u8; 4] = [1, 2, 3, 4];

struct Client {
    s: TcpStream,
    buf: Vec<u8>,
    head: String,
    /// The client's inflater (context kept across messages unless `fresh_each`).
    inflate: Decompress,
    fresh_each: bool,
    deflate: Compress,
    /// Wire bytes of the frames read so far.
    wire: usize,
}

/// `read`, again after `EINTR` (the in-process server's threads take signals).
fn read_retrying(s: &mut TcpStream, buf: &mut [u8]) -> usize {
    loop {
        match s.read(buf) {
            Ok(n) => return n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => panic!("read: {e}"),
        }
    }
}

struct Frame {
    b0: u8,
    payload: Vec<u8>,
    raw: Vec<u8>,
}

impl Client {
    fn connect(addr: std::net::SocketAddr, token: &str, ext: Option<&str>) -> Client {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut extra = format!("Authorization: Bearer {token}\r\n");
        if let Some(e) = ext {
            extra.push_str(&format!("Sec-WebSocket-Extensions: {e}\r\n"));
        }
        s.write_all(&upgrade_req("/v1/stream", &extra)).unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = read_retrying(&mut s, &mut chunk);
            assert!(n > 0, "closed during the upgrade");
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        // The window the server allows this client to compress with.
        let bits = head
            .split("client_max_window_bits=")
            .nth(1)
            .and_then(|r| r.get(..2))
            .and_then(|n| n.trim_end_matches(['\r', ';']).parse().ok())
            .unwrap_or(15);
        Client {
            s,
            buf,
            head,
            inflate: Decompress::new(false),
            fresh_each: false,
            deflate: Compress::new_with_window_bits(Compression::new(6), false, bits),
            wire: 0,
        }
    }

    fn extensions(&self) -> Option<String> {
        self.head
            .lines()
            .find_map(|l| l.strip_prefix("Sec-WebSocket-Extensions: "))
            .map(str::to_owned)
    }

    fn frame(&mut self) -> Frame {
        loop {
            if self.buf.len() >= 2 {
                let len7 = usize::from(self.buf[1] & 0x7f);
                let (len, hl) = match len7 {
                    126 if self.buf.len() >= 4 => {
                        (usize::from(u16::from_be_bytes([self.buf[2], self.buf[3]])), 4)
                    }
                    127 if self.buf.len() >= 10 => (
                        u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize,
                        10,
                    ),
                    126 | 127 => (usize::MAX, 0),
                    n => (n, 2),
                };
                if len != usize::MAX && self.buf.len() >= hl + len {
                    let raw: Vec<u8> = self.buf.drain(..hl + len).collect();
                    self.wire += raw.len();
                    return Frame {
                        b0: raw[0],
                        payload: raw[hl..].to_vec(),
                        raw,
                    };
                }
            }
            let mut chunk = [0u8; 65536];
            let n = read_retrying(&mut self.s, &mut chunk);
            assert!(n > 0, "server closed");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next data message, inflated when RSV1 is set; also whether it was compressed.
    fn message(&mut self) -> (Vec<u8>, bool) {
        let f = self.frame();
        assert_eq!(f.b0 & 0x80, 0x80, "server frames are final");
        if f.b0 & 0x40 == 0 {
            return (f.payload, false);
        }
        assert!(
            matches!(f.b0 & 0x0f, 1 | 2),
            "RSV1 only on data frames: {:#x}",
            f.b0
        );
        if self.fresh_each {
            self.inflate = Decompress::new(false);
        }
        let mut input = f.payload.clone();
        input.extend_from_slice(&[0, 0, 0xff, 0xff]);
        let mut out = Vec::with_capacity(65536);
        self.inflate
            .decompress_vec(&input, &mut out, FlushDecompress::Sync)
            .unwrap();
        (out, true)
    }

    fn json(&mut self) -> (Value, bool) {
        let (m, z) = self.message();
        (serde_json::from_slice(&m).unwrap(), z)
    }

    fn send_compressed(&mut self, payload: &[u8]) {
        let mut z = Vec::with_capacity(payload.len() + 64);
        self.deflate
            .compress_vec(payload, &mut z, FlushCompress::Sync)
            .unwrap();
        assert!(z.ends_with(&[0, 0, 0xff, 0xff]));
        z.truncate(z.len() - 4);
        let mut f = Vec::new();
        encode_client_frame_into(OpCode::Text, true, &z, MASK, &mut f);
        f[0] |= 0x40;
        self.s.write_all(&f).unwrap();
    }

    fn send_plain(&mut self, payload: &[u8]) {
        let mut f = Vec::new();
        encode_client_frame_into(OpCode::Text, true, payload, MASK, &mut f);
        self.s.write_all(&f).unwrap();
    }

    /// Reads until a close frame; its code.
    fn close_code(&mut self) -> u16 {
        loop {
            let f = self.frame();
            if f.b0 & 0x0f == 0x8 {
                return u16::from_be_bytes([f.payload[0], f.payload[1]]);
            }
        }
    }
}

fn deflate_config() -> tickgate::config::Config {
    let mut cfg = test_config(1);
    cfg.compression.enabled = true;
    cfg
}

fn tick(i: u64) -> Value {
    json!({"s":"BTC-USD","ts":1_795_463_154_524_859_518u64 + i * 100_000_000,
           "bid": 64959.89 + (i % 7) as f64, "ask": 64966.39 + (i % 5) as f64,
           "last": 64964.06 + (i % 3) as f64, "qty": 1.6})
}

#[test]
fn context_takeover_compresses_replies_and_ticks_and_inflates_client_messages() {
    let srv = start(deflate_config());
    let mut c = Client::connect(
        srv.addr(),
        &srv.publisher_token("z"),
        Some("permessage-deflate; client_max_window_bits"),
    );
    assert_eq!(
        c.extensions().as_deref(),
        Some("permessage-deflate; server_max_window_bits=12; client_max_window_bits=12")
    );
    let (welcome, z) = c.json();
    assert_eq!(welcome["type"], "welcome");
    assert!(z, "the welcome is compressed");
    // A compressed subscribe, then a plain one: both are read.
    c.send_compressed(br#"{"op":"subscribe","id":1,"symbols":["BTC-USD"]}"#);
    assert_eq!(c.json().0["type"], "subscribed");
    c.send_plain(br#"{"op":"subscribe","id":2,"symbols":["ETH-USD"]}"#);
    assert_eq!(c.json().0["id"], 2);
    let n = 200;
    let (mut plain, mut wire) = (0usize, 0usize);
    let mut seq = 0;
    for i in 0..n {
        c.send_compressed(
            json!({"op":"publish","id":100 + i,"ticks":[tick(i)]})
                .to_string()
                .as_bytes(),
        );
        // The tick and the `published` ack, in either order.
        for _ in 0..2 {
            let before = c.wire;
            let (m, z) = c.message();
            let v: Value = serde_json::from_slice(&m)
                .unwrap_or_else(|e| panic!("{e}: {:?} z={z} i={i}", String::from_utf8_lossy(&m)));
            assert!(z);
            if v["type"] == "tick" {
                assert!(v["seq"].as_u64().unwrap() > seq);
                seq = v["seq"].as_u64().unwrap();
                plain += m.len() + if m.len() < 126 { 2 } else { 4 };
                wire += c.wire - before;
            } else {
                assert_eq!(v["type"], "published");
            }
        }
    }
    assert_eq!(seq, n);
    println!(
        "ticks: {wire} bytes on the wire for {plain} plain ({} %)",
        wire * 100 / plain
    );
    assert!(wire * 100 <= plain * 35, "{wire} of {plain}");
}

#[test]
fn no_context_takeover_subscribers_share_one_compressed_frame() {
    let srv = start(deflate_config());
    let offer = "permessage-deflate; server_no_context_takeover; client_max_window_bits=10";
    let mut subs: Vec<Client> = (0..2)
        .map(|i| {
            let mut c = Client::connect(srv.addr(), &srv.token(&format!("s{i}")), Some(offer));
            c.fresh_each = true;
            assert_eq!(
                c.extensions().as_deref(),
                Some("permessage-deflate; server_no_context_takeover; server_max_window_bits=12; client_max_window_bits=10")
            );
            assert_eq!(c.json().0["type"], "welcome");
            c.send_plain(br#"{"op":"subscribe","id":1,"symbols":["BTC-USD"]}"#);
            assert_eq!(c.json().0["type"], "subscribed");
            c
        })
        .collect();
    let mut p = Client::connect(srv.addr(), &srv.publisher_token("p"), None);
    assert_eq!(p.extensions(), None);
    let (welcome, z) = p.json();
    assert!(welcome["type"] == "welcome" && !z, "plain without the extension");
    for i in 0..20 {
        p.send_plain(
            json!({"op":"publish","id":i,"ticks":[tick(i)]})
                .to_string()
                .as_bytes(),
        );
        assert_eq!(p.json().0["type"], "published");
        let frames: Vec<Vec<u8>> = subs
            .iter_mut()
            .map(|c| {
                let f = c.frame();
                assert_eq!(f.b0, 0xC1, "a compressed text frame");
                // Decodes on its own, with a fresh inflater.
                let mut d = Decompress::new(false);
                let mut input = f.payload.clone();
                input.extend_from_slice(&[0, 0, 0xff, 0xff]);
                let mut out = Vec::with_capacity(4096);
                d.decompress_vec(&input, &mut out, FlushDecompress::Sync).unwrap();
                let v: Value = serde_json::from_slice(&out).unwrap();
                assert_eq!(v["seq"], i + 1);
                f.raw
            })
            .collect();
        assert_eq!(frames[0], frames[1], "the same compressed bytes for both");
    }
}

/// `tickgate_compressing_connections`, summed over the shards.
fn compressing(srv: &TestServer) -> u64 {
    let r = raw(srv.admin(), b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    r.lines()
        .filter(|l| l.starts_with("tickgate_compressing_connections{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn metrics_count_the_compressing_connections() {
    let srv = start(deflate_config());
    assert_eq!(compressing(&srv), 0);
    let mut plain = Client::connect(srv.addr(), &srv.token("p"), None);
    assert_eq!(plain.json().0["type"], "welcome");
    let mut z = Client::connect(srv.addr(), &srv.token("z"), Some("permessage-deflate"));
    assert_eq!(z.json().0["type"], "welcome");
    assert_eq!(compressing(&srv), 1, "the plain session is not counted");
    drop(z);
    // The server sees the socket close on its own time: look a bounded number of times.
    let mut n = 1;
    for _ in 0..500 {
        n = compressing(&srv);
        if n == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(n, 0, "the closed session is counted out");
}

#[test]
fn off_by_default_and_rsv1_without_it_is_1002() {
    let srv = start(test_config(1));
    let mut c = Client::connect(srv.addr(), &srv.token("x"), Some("permessage-deflate"));
    assert_eq!(c.extensions(), None);
    let (welcome, z) = c.json();
    assert!(welcome["type"] == "welcome" && !z, "plain without the extension");
    c.send_compressed(br#"{"op":"ping"}"#);
    assert_eq!(c.close_code(), 1002);
}

#[test]
fn a_compressed_bomb_closes_with_1009() {
    let mut cfg = deflate_config();
    cfg.limits.max_message_bytes = 4096;
    let srv = start(cfg);
    let mut c = Client::connect(srv.addr(), &srv.token("b"), Some("permessage-deflate"));
    assert_eq!(
        c.extensions().as_deref(),
        Some("permessage-deflate; server_max_window_bits=12")
    );
    assert_eq!(c.json().0["type"], "welcome");
    // 1 MiB of spaces compresses to about a kilobyte: under the limit on the wire.
    let mut bomb = b"{\"op\":\"ping\",\"x\":\"".to_vec();
    bomb.resize(1 << 20, b' ');
    c.send_compressed(&bomb);
    assert_eq!(c.close_code(), 1009);
}

#[test]
fn python_websockets_negotiates_and_streams() {
    let py = std::env::var("TG_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let srv = start(deflate_config());
    let script = r#"
import asyncio, json, sys
import websockets

async def main(url, token):
    async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {token}"}) as ws:
        ext = ws.response.headers.get("Sec-WebSocket-Extensions")
        print("EXT", ext, flush=True)
        await ws.send(json.dumps({"op": "subscribe", "id": 1, "symbols": ["BTC-USD"]}))
        print(await ws.recv(), flush=True)
        print(await ws.recv(), flush=True)
        for i in range(30):
            await ws.send(json.dumps({"op": "publish", "id": 10 + i, "ticks": [
                {"s": "BTC-USD", "ts": 1795463154524859518 + i, "bid": 1.5, "ask": 2.5, "last": 2.0, "qty": 1.0}]}))
        seqs = []
        while len(seqs) < 30:
            m = json.loads(await ws.recv())
            if m["type"] == "tick":
                seqs.append(m["seq"])
        print("SEQS", seqs[0], seqs[-1], len(seqs), flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"#;
    let out = Command::new(&py)
        .args(["-c", script, &srv.url(), &srv.publisher_token("py")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap_or_else(|e| panic!("{py}: {e} (run with tools/test.sh or set TG_TEST_PYTHON)"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "python failed: {stdout}\n{stderr}");
    let ext = stdout
        .lines()
        .find_map(|l| l.strip_prefix("EXT "))
        .unwrap_or_default();
    assert!(ext.starts_with("permessage-deflate"), "{stdout}");
    assert!(stdout.contains("\"subscribed\""), "{stdout}");
    assert!(stdout.contains("SEQS 1 30 30"), "{stdout}");
}
