//! The admin listener (`admin.listen`, loopback by default): `/healthz`, `/readyz`,
//! `/metrics` and `POST /admin/revoke` (PROTOCOL.md sections 1 and 7). Revocations are
//! relayed to `admin.peers` ([`crate::cluster`]).
//!
//! It is off the hot path, so it runs on plain threads with blocking sockets: one acceptor
//! and a bounded number of request threads, each request bounded in size and time. It keeps
//! answering while the public listener drains (`/readyz` then says 503).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::auth::jwt::Role;
use crate::auth::revocation::RevokeTarget;
use crate::auth::seclog::{SecurityEvent, token_hash};
use crate::cluster::{RELAY_HEADER, Relay};
use crate::feed::hub::Control;
use crate::proto::http::{self, RequestLimits, Response};
use crate::state::Shared;

const MAX_INFLIGHT: usize = 16;

pub fn start(shared: Arc<Shared>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(shared.cfg.admin.listen)?;
    let addr = listener.local_addr()?;
    let inflight = Arc::new(AtomicUsize::new(0));
    let relay = Relay::start(&shared)?;
    std::thread::Builder::new()
        .name("tickgate-admin".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                if inflight.fetch_add(1, Ordering::AcqRel) >= MAX_INFLIGHT {
                    inflight.fetch_sub(1, Ordering::AcqRel);
                    continue;
                }
                let shared = shared.clone();
                let slot = inflight.clone();
                let relay = relay.clone();
                let spawned = std::thread::Builder::new()
                    .name("tickgate-admin-req".into())
                    .spawn(move || {
                        serve(&shared, &relay, stream);
                        slot.fetch_sub(1, Ordering::AcqRel);
                    });
                if spawned.is_err() {
                    // The thread never ran, so its slot is released here.
                    inflight.fetch_sub(1, Ordering::AcqRel);
                }
            }
        })?;
    Ok(addr)
}

fn serve(shared: &Arc<Shared>, relay: &Relay, mut stream: TcpStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
    let limits = RequestLimits::default();
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let req = loop {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        match http::try_parse(&buf, &limits) {
            Ok(Some((_, req))) => break req,
            Ok(None) if buf.len() < limits.max_head_bytes + limits.max_body_bytes => continue,
            Ok(None) => return,
            Err(e) => {
                let _ = stream.write_all(&Response::text(e.status(), "bad request\n").to_bytes());
                return;
            }
        }
    };
    let resp = route(shared, relay, &req, stream.peer_addr().ok());
    let _ = stream.write_all(&resp.to_bytes());
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
                    "# TYPE tickgate_symbols gauge\ntickgate_symbols {}\n# TYPE tickgate_revocations gauge\ntickgate_revocations {}\n",
                    shared.hub.symbols().len(),
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
    let log = |outcome: &'static str, reason: &'static str, sub: Option<&str>, status: u16| {
        let hash = token.map(token_hash);
        shared.audit(&SecurityEvent {
            ip: peer.map(|p| p.ip()),
            sub,
            status: Some(status),
            token_hash: hash.as_deref(),
            ..SecurityEvent::new(now, "revoke", outcome, reason)
        });
    };
    let unauthorized = || {
        Response::text(401, "unauthorized\n")
            .with_header("WWW-Authenticate", "Bearer error=\"invalid_token\"")
    };
    let Some(token) = token else {
        log("rejected", "no_token", None, 401);
        return Response::text(401, "unauthorized\n").with_header("WWW-Authenticate", "Bearer");
    };
    let claims = match shared.verify_token(token, now) {
        Ok(c) => c,
        Err(e) => {
            log("rejected", e.reason(), None, 401);
            return unauthorized();
        }
    };
    if !claims.has_role(Role::Admin) {
        log("rejected", "not_admin", Some(&claims.sub), 403);
        return Response::text(403, "forbidden\n");
    }
    let target = match RevokeTarget::from_admin_body(&req.body) {
        Ok(t) => t,
        Err(_) => {
            log("rejected", "bad_request", Some(&claims.sub), 400);
            return Response::json(
                400,
                br#"{"error":"bad_request","message":"expected {\"sub\"|\"sid\"|\"jti\": string}"}"#,
            );
        }
    };
    if shared.revoked.revoke(target.clone(), now).is_err() {
        log("rejected", "revocation_list_full", Some(&claims.sub), 503);
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
    log("accepted", "ok", Some(&claims.sub), 200);
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
