//! The admin listener (`admin.listen`, loopback by default): `/healthz`, `/readyz`,
//! `/metrics` and `POST /admin/revoke` (PROTOCOL.md sections 1 and 7). Revocations are
//! relayed to `admin.peers` ([`crate::cluster`]).
//!
//! It is off the hot path, so it runs on plain threads with blocking sockets: one acceptor
//! and a bounded number of request threads, each request bounded in size and time. It keeps
//! answering while the public listener drains (`/readyz` then says 503).
//!
//! Revocation is the emergency brake, so no client may lock the listener by holding its
//! slots with requests that never end:
//!
//! - a request has `admin.request_timeout` from accept to its last byte (each read waits
//!   only for the time left), and its response as long again to be written;
//! - at most `admin.max_connections` are in flight, at most `admin.max_connections_per_ip`
//!   of them from one peer IP;
//! - at a bound, the oldest connection still sending its request (of that IP for the
//!   per-IP bound) is shut down to make room for the newcomer, which is refused only when
//!   every connection in the way is already being answered. A legitimate request arrives
//!   whole and is answered at once, so on a shared address (loopback) the operator's
//!   request still gets through a slow-request attack from the same IP.
//!
//! Evictions, refusals and timeouts go to the security log as event `admin`, outcome
//! `rejected`, reason `evicted`, `per_ip_limit`, `full` or `timeout`.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::auth::jwt::Role;
use crate::auth::revocation::RevokeTarget;
use crate::auth::seclog::{Event, Outcome, Reason, SecurityEvent, token_hash};
use crate::cluster::RELAY_HEADER;
use crate::feed::hub::Control;
use crate::proto::http::{self, RequestLimits, Response};
use crate::rt::relay::Relay;
use crate::state::Shared;

pub fn start(shared: Arc<Shared>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(shared.cfg.admin.listen)?;
    let addr = listener.local_addr()?;
    let registry = Arc::new(Registry::new(
        shared.cfg.admin.max_connections,
        shared.cfg.admin.max_connections_per_ip,
    ));
    let relay = Relay::start(&shared)?;
    std::thread::Builder::new()
        .name("tickgate-admin".into())
        .spawn(move || {
            loop {
                let Ok((stream, peer)) = listener.accept() else {
                    continue;
                };
                let accepted = Instant::now();
                let Ok(handle) = stream.try_clone() else { continue };
                let id = match registry.admit(peer.ip(), accepted, handle) {
                    Ok((id, evicted)) => {
                        if let Some(old) = evicted {
                            // Its blocked read returns at once and its thread ends.
                            let _ = old.stream.shutdown(Shutdown::Both);
                            reject(&shared, old.ip, Reason::Evicted);
                        }
                        id
                    }
                    Err(why) => {
                        reject(&shared, peer.ip(), why);
                        continue;
                    }
                };
                // Leaves the registry when the thread ends, or when the closure is dropped
                // because the thread could not be started.
                let slot = Slot {
                    registry: registry.clone(),
                    id,
                };
                let shared = shared.clone();
                let relay = relay.clone();
                let _ = std::thread::Builder::new()
                    .name("tickgate-admin-req".into())
                    .spawn(move || {
                        serve(&shared, &relay, &slot, stream, peer, accepted);
                        drop(slot);
                    });
            }
        })?;
    Ok(addr)
}

/// Logs (and counts) a connection this listener closed without answering it.
fn reject(shared: &Shared, ip: IpAddr, why: Reason) {
    shared.audit(&SecurityEvent {
        ip: Some(ip),
        ..SecurityEvent::at(shared.now_ms(), Event::Admin, Outcome::Rejected, why)
    });
}

/// One admin connection in flight.
struct Conn {
    id: u64,
    ip: IpAddr,
    accepted: Instant,
    /// True until the whole request (head and body) has arrived: only such a connection
    /// can be evicted.
    reading: bool,
    /// A clone of the request thread's socket, to shut it down from the acceptor.
    stream: TcpStream,
}

/// The admin connections in flight, shared by the acceptor and the request threads.
struct Registry {
    max_total: usize,
    max_per_ip: usize,
    inner: Mutex<Table>,
}

struct Table {
    next_id: u64,
    conns: Vec<Conn>,
}

impl Table {
    /// Index of the oldest connection still reading its request among those `pick` keeps.
    fn oldest_reading(&self, pick: impl Fn(&Conn) -> bool) -> Option<usize> {
        self.conns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.reading && pick(c))
            .min_by_key(|(_, c)| c.accepted)
            .map(|(i, _)| i)
    }
}

impl Registry {
    fn new(max_total: usize, max_per_ip: usize) -> Registry {
        Registry {
            max_total,
            max_per_ip,
            inner: Mutex::new(Table {
                next_id: 0,
                conns: Vec::new(),
            }),
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a new connection from `ip`, making room at a bound by taking out the
    /// oldest connection still reading its request (of `ip` at the per-IP bound, of anyone
    /// at the total bound). Returns the new id and the evicted connection, which the
    /// caller shuts down; or the reason for refusing the newcomer when every connection in
    /// the way is already being answered.
    fn admit(&self, ip: IpAddr, accepted: Instant, stream: TcpStream) -> Result<(u64, Option<Conn>), Reason> {
        let mut t = self.table();
        let from_ip = t.conns.iter().filter(|c| c.ip == ip).count();
        // Taking out one of `ip`'s connections also makes room under the total bound.
        let victim = if from_ip >= self.max_per_ip {
            Some(t.oldest_reading(|c| c.ip == ip).ok_or(Reason::PerIpLimit)?)
        } else if t.conns.len() >= self.max_total {
            Some(t.oldest_reading(|_| true).ok_or(Reason::Full)?)
        } else {
            None
        };
        let evicted = victim.map(|i| t.conns.swap_remove(i));
        let id = t.next_id;
        t.next_id += 1;
        t.conns.push(Conn {
            id,
            ip,
            accepted,
            reading: true,
            stream,
        });
        Ok((id, evicted))
    }

    /// Marks the request as received (no longer evictable). False when the connection was
    /// evicted meanwhile: its socket is shut down, the request is dropped.
    fn received(&self, id: u64) -> bool {
        let mut t = self.table();
        match t.conns.iter_mut().find(|c| c.id == id) {
            Some(c) => {
                c.reading = false;
                true
            }
            None => false,
        }
    }

    fn remove(&self, id: u64) {
        self.table().conns.retain(|c| c.id != id);
    }
}

/// A request thread's place in the [`Registry`], given back on drop.
struct Slot {
    registry: Arc<Registry>,
    id: u64,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.registry.remove(self.id);
    }
}

fn serve(
    shared: &Arc<Shared>,
    relay: &Relay,
    slot: &Slot,
    mut stream: TcpStream,
    peer: SocketAddr,
    accepted: Instant,
) {
    let timeout = shared.cfg.admin.request_timeout;
    let deadline = accepted + timeout;
    let limits = RequestLimits::default();
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let req = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            reject(shared, peer.ip(), Reason::Timeout);
            return;
        }
        if stream.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match stream.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                reject(shared, peer.ip(), Reason::Timeout);
                return;
            }
            Err(_) => return,
        }
        match http::try_parse(&buf, &limits) {
            Ok(Some((_, req))) => break req,
            Ok(None) if buf.len() < limits.max_head_bytes + limits.max_body_bytes => continue,
            Ok(None) => return,
            Err(e) => {
                let resp = Response::text(e.status(), "bad request\n");
                let _ = write_by(&mut stream, &resp.to_bytes(), Instant::now() + timeout);
                return;
            }
        }
    };
    if !slot.registry.received(slot.id) {
        return;
    }
    let resp = route(shared, relay, &req, Some(peer));
    let _ = write_by(&mut stream, &resp.to_bytes(), Instant::now() + timeout);
}

/// `write_all` that gives up at `deadline`, however slowly the peer reads.
fn write_by(stream: &mut TcpStream, mut bytes: &[u8], deadline: Instant) -> io::Result<()> {
    while !bytes.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        stream.set_write_timeout(Some(left))?;
        match stream.write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = bytes.get(n..).unwrap_or_default(),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn route(shared: &Arc<Shared>, relay: &Relay, req: &http::Request, peer: Option<SocketAddr>) -> Response {
    match req.path.as_str() {
        "/healthz" => Response::text(200, "ok\n"),
        "/readyz" => {
            if shared.is_draining() {
                Response::text(503, "draining\n")
            } else {
                Response::text(200, "ready\n")
            }
        }
        "/metrics" => {
            let mut out = String::with_capacity(4096);
            shared.metrics.render(&mut out);
            shared.sec_counters.render_prometheus(&mut out);
            let _ = std::fmt::Write::write_fmt(
                &mut out,
                format_args!(
                    "# TYPE tickgate_symbols gauge\ntickgate_symbols {}\n# TYPE tickgate_symbols_max gauge\ntickgate_symbols_max {}\n# HELP tickgate_symbols_waiting Names subscribed to before any tick created them (held by their connections).\n# TYPE tickgate_symbols_waiting gauge\ntickgate_symbols_waiting {}\n# TYPE tickgate_revocations gauge\ntickgate_revocations {}\n",
                    shared.hub.symbols().len(),
                    shared.hub.symbols().max_symbols(),
                    shared.hub.symbols().waiting_len(),
                    shared.revoked.len()
                ),
            );
            if let Some(tls) = shared.tls.as_ref() {
                use std::sync::atomic::Ordering::Relaxed;
                let _ = std::fmt::Write::write_fmt(
                    &mut out,
                    format_args!(
                        "# TYPE tickgate_tls_reloads_total counter\ntickgate_tls_reloads_total{{outcome=\"ok\"}} {}\ntickgate_tls_reloads_total{{outcome=\"failed\"}} {}\n",
                        tls.reloads.load(Relaxed),
                        tls.reload_failures.load(Relaxed)
                    ),
                );
            }
            Response::text(200, &out).with_header("Content-Type", "text/plain; version=0.0.4")
        }
        "/admin/revoke" => {
            if req.method != "POST" {
                return Response::text(405, "method not allowed\n").with_header("Allow", "POST");
            }
            revoke(shared, relay, req, peer)
        }
        _ => Response::text(404, "not found\n"),
    }
}

fn revoke(shared: &Arc<Shared>, relay: &Relay, req: &http::Request, peer: Option<SocketAddr>) -> Response {
    let now = shared.now_ms();
    let token = req.header("authorization").and_then(|h| {
        let (scheme, rest) = h.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
    });
    let log = |outcome: Outcome, reason: Reason, sub: Option<&str>, status: u16| {
        let hash = token.map(token_hash);
        shared.audit(&SecurityEvent {
            ip: peer.map(|p| p.ip()),
            sub,
            status: Some(status),
            token_hash: hash.as_deref(),
            ..SecurityEvent::at(now, Event::Revoke, outcome, reason)
        });
    };
    let unauthorized = || {
        Response::text(401, "unauthorized\n")
            .with_header("WWW-Authenticate", "Bearer error=\"invalid_token\"")
    };
    let Some(token) = token else {
        log(Outcome::Rejected, Reason::NoToken, None, 401);
        return Response::text(401, "unauthorized\n").with_header("WWW-Authenticate", "Bearer");
    };
    let claims = match shared.verify_token(token, now) {
        Ok(c) => c,
        Err(e) => {
            log(Outcome::Rejected, e.log_reason(), None, 401);
            return unauthorized();
        }
    };
    if !claims.has_role(Role::Admin) {
        log(Outcome::Rejected, Reason::NotAdmin, Some(&claims.sub), 403);
        return Response::text(403, "forbidden\n");
    }
    let target = match RevokeTarget::from_admin_body(&req.body) {
        Ok(t) => t,
        Err(_) => {
            log(Outcome::Rejected, Reason::BadRequest, Some(&claims.sub), 400);
            return Response::json(
                400,
                br#"{"error":"bad_request","message":"expected {\"sub\"|\"sid\"|\"jti\": string}"}"#,
            );
        }
    };
    if shared.revoked.revoke(target.clone(), now).is_err() {
        log(
            Outcome::Rejected,
            Reason::RevocationListFull,
            Some(&claims.sub),
            503,
        );
        return Response::text(503, "revocation list full\n");
    }
    let (tx, rx) = crossbeam_channel::unbounded();
    let shards = shared.hub.shards();
    shared
        .hub
        .broadcast(|| Control::Revoke(target.clone(), tx.clone()));
    drop(tx);
    let deadline = std::time::Instant::now() + Duration::from_millis(900);
    // A relayed request is applied here and goes no further (no loops between peers).
    let peers = (!relay.is_empty() && req.header(RELAY_HEADER).is_none()).then(|| {
        // Retry while the admin token is good (peers allow the same leeway): once it
        // expires every peer refuses it.
        let left = claims
            .exp
            .saturating_add(shared.cfg.auth.leeway.as_secs())
            .saturating_sub(now / 1000)
            .min(shared.cfg.auth.max_token_lifetime.as_secs());
        relay.relay(
            shared,
            token,
            &req.body,
            std::time::Instant::now() + Duration::from_secs(left),
            Duration::from_millis(1500),
        )
    });
    let mut closed = 0;
    for _ in 0..shards {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(n) => closed += n,
            Err(_) => break,
        }
    }
    log(Outcome::Accepted, Reason::Ok, Some(&claims.sub), 200);
    let body = match peers {
        None => format!("{{\"closed\":{closed}}}"),
        Some(p) => format!(
            "{{\"closed\":{},\"peers\":{{\"reached\":{},\"refused\":{},\"pending\":{}}}}}",
            (closed as u64).saturating_add(p.closed),
            p.reached,
            p.refused,
            p.pending
        ),
    };
    Response::json(200, body.as_bytes())
}
