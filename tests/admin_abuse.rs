//! The admin listener under slow-request abuse: clients that hold connections open with
//! requests that never end must not lock out `/admin/revoke` and `/readyz`.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

/// A request head that never ends, sent one byte at a time (then `a` forever).
const SLOW_HEAD: &[u8] = b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nX-Slow: ";

const LOCALHOST: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 1));
/// A second loopback source address (Linux routes all of 127.0.0.0/8 to `lo`).
const OTHER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));

/// A TCP connection to `to` from source address `from`.
fn connect_from(from: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    s.bind(&SocketAddr::new(from, 0).into())?;
    s.connect(&to.into())?;
    Ok(s.into())
}

/// A client sending [`SLOW_HEAD`] byte by byte (non-blocking, so checks never wait).
struct Slow {
    stream: TcpStream,
    sent: usize,
}

impl Slow {
    fn connect(from: IpAddr, to: SocketAddr) -> std::io::Result<Slow> {
        let stream = connect_from(from, to)?;
        stream.set_nonblocking(true)?;
        let mut s = Slow { stream, sent: 0 };
        s.step();
        Ok(s)
    }

    /// Sends the next byte; false once the server has closed the connection.
    fn step(&mut self) -> bool {
        let byte = SLOW_HEAD.get(self.sent).copied().unwrap_or(b'a');
        match self.stream.write(&[byte]) {
            Ok(_) => self.sent += 1,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(_) => return false,
        }
        !closed(&mut self.stream)
    }
}

/// Whether the server has closed `s`, or answered on it, which ends it too (non-blocking
/// `s`: never waits).
fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 256];
    match s.read(&mut b) {
        Ok(n) => n == 0 || b[..n].starts_with(b"HTTP/"),
        Err(e) => e.kind() != ErrorKind::WouldBlock,
    }
}

/// Keeps `n` slow connections open from 127.0.0.1, one byte each every 200 ms, and opens a
/// new one whenever the server closes one. Says `ready` once the first `n` are connected.
fn attack(to: SocketAddr, n: usize, stop: Arc<AtomicBool>, ready: mpsc::Sender<()>) {
    let mut conns: Vec<Option<Slow>> = (0..n).map(|_| Slow::connect(LOCALHOST, to).ok()).collect();
    let _ = ready.send(());
    while !stop.load(Ordering::Relaxed) {
        thread::sleep(Duration::from_millis(200));
        for c in conns.iter_mut() {
            if !c.as_mut().is_some_and(Slow::step) {
                *c = Slow::connect(LOCALHOST, to).ok();
            }
        }
    }
}

/// Reads until the server closes the connection (or 5 s) and returns the status.
fn read_status(s: &mut TcpStream) -> u16 {
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    common::status_of(&String::from_utf8_lossy(&out))
}

/// Security-log lines of this listener's rejections with `reason`, from `ip` if given.
fn admin_rejections(srv: &common::TestServer, reason: &str, ip: Option<&str>) -> usize {
    srv.log_lines()
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "admin" && v["outcome"] == "rejected" && v["reason"] == reason)
        .filter(|v| ip.is_none_or(|ip| v["ip"] == ip))
        .count()
}

const READYZ: &[u8] = b"GET /readyz HTTP/1.1\r\nHost: localhost\r\n\r\n";

#[test]
fn slow_requests_from_the_same_ip_do_not_lock_out_revocation() {
    let mut cfg = common::test_config(1);
    // As many slots as the listener used to have, all of them takeable by one IP, and
    // no help from the request deadline: only eviction can make room.
    cfg.admin.max_connections = 16;
    cfg.admin.max_connections_per_ip = 16;
    cfg.admin.request_timeout = Duration::from_secs(60);
    let srv = common::start(cfg);
    let admin = srv.admin();
    let token = srv.admin_token();

    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = mpsc::channel();
    let attacker = thread::spawn({
        let stop = stop.clone();
        move || attack(admin, 16, stop, ready_tx)
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("attack started");

    // The attack's connections are queued before ours, so the first request finds every
    // slot taken (and must evict); between rounds the attacker takes freed slots back.
    for round in 0..5 {
        let (status, body) = common::admin_post(admin, "/admin/revoke", Some(&token), r#"{"sub":"mallory"}"#);
        assert_eq!(status, 200, "round {round}: revoke answered {body:?}");
        let r = common::raw(admin, READYZ);
        assert_eq!(common::status_of(&r), 200, "round {round}: readyz answered {r:?}");
        thread::sleep(Duration::from_millis(300));
    }
    stop.store(true, Ordering::Relaxed);
    attacker.join().unwrap();

    assert!(admin_rejections(&srv, "evicted", Some("127.0.0.1")) >= 1);
    let metrics = common::raw(admin, b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert!(
        metrics.contains(
            "tickgate_security_events_total{event=\"admin\",outcome=\"rejected\",reason=\"evicted\"}"
        ),
        "{metrics}"
    );
}

#[test]
fn request_deadline_closes_silent_and_trickling_connections() {
    let mut cfg = common::test_config(1);
    cfg.admin.request_timeout = Duration::from_millis(500);
    let srv = common::start(cfg);
    let admin = srv.admin();

    let mut silent = TcpStream::connect(admin).unwrap();
    silent.set_nonblocking(true).unwrap();
    let mut trickle = Slow::connect(LOCALHOST, admin).unwrap();
    let (mut silent_open, mut trickle_open) = (true, true);
    // Generous against the 500 ms deadline, and below the 5 s a single read may wait.
    let give_up = Instant::now() + Duration::from_secs(3);
    while (silent_open || trickle_open) && Instant::now() < give_up {
        thread::sleep(Duration::from_millis(100));
        silent_open = silent_open && !closed(&mut silent);
        trickle_open = trickle_open && trickle.step();
    }
    assert!(!silent_open, "a connection that sends nothing is still open");
    assert!(
        !trickle_open,
        "a connection that sends a byte every 100 ms is still open"
    );
    assert_eq!(admin_rejections(&srv, "timeout", Some("127.0.0.1")), 2);

    // The listener still answers.
    assert_eq!(common::status_of(&common::raw(admin, READYZ)), 200);
}

#[test]
fn per_ip_bound_keeps_one_ip_from_displacing_another() {
    let mut cfg = common::test_config(1);
    cfg.admin.max_connections = 16;
    cfg.admin.max_connections_per_ip = 2;
    cfg.admin.request_timeout = Duration::from_secs(60);
    let srv = common::start(cfg);
    let admin = srv.admin();

    // A slow but honest client on 127.0.0.2, connected first: the oldest connection.
    let mut honest = connect_from(OTHER, admin).unwrap();
    honest.write_all(b"GET /readyz HTTP/1.1\r\n").unwrap();
    // 127.0.0.1 opens more slow connections than the whole listener has slots.
    let flood: Vec<Slow> = (0..20)
        .map(|_| Slow::connect(LOCALHOST, admin).unwrap())
        .collect();

    // Another request from 127.0.0.2 is answered...
    let mut probe = connect_from(OTHER, admin).unwrap();
    probe.write_all(READYZ).unwrap();
    assert_eq!(read_status(&mut probe), 200);
    // ...and the honest one was not evicted for 127.0.0.1's connections: it completes.
    honest.write_all(b"Host: localhost\r\n\r\n").unwrap();
    assert_eq!(read_status(&mut honest), 200);

    // 127.0.0.1 was held at 2: each of its 18 extra connections evicted its own oldest.
    assert_eq!(admin_rejections(&srv, "evicted", Some("127.0.0.1")), 18);
    assert_eq!(admin_rejections(&srv, "evicted", Some("127.0.0.2")), 0);
    drop(flood);
}
