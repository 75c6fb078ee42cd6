//! The admin listener (`admin.listen`, loopback by default): `/healthz`, `/readyz`,
//! `/metrics` and `POST /admin/revoke` (PROTOCOL.md sections 1 and 7). With `[cluster]`,
//! a revocation goes to every node through the bus ([`crate::bus`]).
//!
//! This module is the sans-IO half: the connection [`Registry`] (admission and eviction
//! decisions, generic over the socket handle), [`route`] (a parsed request in, a
//! [`Response`] or a [`Revocation`] to carry out, out) and the revocation's answer
//! ([`revoked`]). `rt::admin` owns the rest: it is off the hot path, so it runs on plain
//! threads with blocking sockets: one acceptor and a bounded number of request threads,
//! each request bounded in size and time; it carries out a revocation (the broadcast to
//! the shards, waiting for their counts, the hand-off to the bus). The listener keeps
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

use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Instant;

use crate::auth::jwt::Role;
use crate::auth::revocation::RevokeTarget;
use crate::auth::seclog::{Event, Outcome, Reason, SecurityEvent, token_hash};
use crate::proto::http::{self, Response};
use crate::state::Shared;

/// Logs (and counts) a connection this listener closed without answering it.
pub fn reject(shared: &Shared, ip: IpAddr, why: Reason) {
    shared.audit(&SecurityEvent {
        ip: Some(ip),
        ..SecurityEvent::at(shared.now_ms(), Event::Admin, Outcome::Rejected, why)
    });
}

/// One admin connection in flight; `H` is the handle to its socket.
pub struct Conn<H> {
    id: u64,
    pub ip: IpAddr,
    accepted: Instant,
    /// True until the whole request (head and body) has arrived: only such a connection
    /// can be evicted.
    reading: bool,
    /// A clone of the request thread's socket, to shut it down from the acceptor.
    pub stream: H,
}

/// The admin connections in flight, shared by the acceptor and the request threads.
pub struct Registry<H> {
    max_total: usize,
    max_per_ip: usize,
    inner: Mutex<Table<H>>,
}

struct Table<H> {
    next_id: u64,
    conns: Vec<Conn<H>>,
}

impl<H> Table<H> {
    /// Index of the oldest connection still reading its request among those `pick` keeps.
    fn oldest_reading(&self, pick: impl Fn(&Conn<H>) -> bool) -> Option<usize> {
        self.conns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.reading && pick(c))
            .min_by_key(|(_, c)| c.accepted)
            .map(|(i, _)| i)
    }
}

impl<H> Registry<H> {
    pub fn new(max_total: usize, max_per_ip: usize) -> Registry<H> {
        Registry {
            max_total,
            max_per_ip,
            inner: Mutex::new(Table {
                next_id: 0,
                conns: Vec::new(),
            }),
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table<H>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a new connection from `ip`, making room at a bound by taking out the
    /// oldest connection still reading its request (of `ip` at the per-IP bound, of anyone
    /// at the total bound). Returns the new id and the evicted connection, which the
    /// caller shuts down; or the reason for refusing the newcomer when every connection in
    /// the way is already being answered.
    pub fn admit(&self, ip: IpAddr, accepted: Instant, stream: H) -> Result<(u64, Option<Conn<H>>), Reason> {
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
    pub fn received(&self, id: u64) -> bool {
        let mut t = self.table();
        match t.conns.iter_mut().find(|c| c.id == id) {
            Some(c) => {
                c.reading = false;
                true
            }
            None => false,
        }
    }

    pub fn remove(&self, id: u64) {
        self.table().conns.retain(|c| c.id != id);
    }
}

/// What a request asks of the listener.
pub enum Routed {
    /// Answer with this.
    Reply(Response),
    /// An accepted revocation, already in the revocation list: `rt::admin` broadcasts it to
    /// the shards (and with `[cluster]` to the bus), and answers with [`revoked`].
    Revoke(Revocation),
}

/// An accepted `POST /admin/revoke`, to be carried out.
pub struct Revocation {
    pub target: RevokeTarget,
    /// The admin token's `sub`, for the log.
    pub sub: String,
    /// The admin token (its hash goes into the log).
    pub token: String,
    /// `now` when the request was routed (Unix milliseconds).
    pub now: u64,
    pub peer: Option<SocketAddr>,
}

/// Routes a parsed admin request at `now` (Unix milliseconds, [`Shared::now_ms`]).
pub fn route(shared: &Shared, req: &http::Request, peer: Option<SocketAddr>, now: u64) -> Routed {
    match req.path.as_str() {
        "/healthz" => Routed::Reply(Response::text(200, "ok\n")),
        "/readyz" => Routed::Reply(if shared.is_draining() {
            Response::text(503, "draining\n")
        } else if shared.bus.enabled() && !shared.bus.is_serving() {
            Response::text(503, "bus unavailable\n")
        } else {
            Response::text(200, "ready\n")
        }),
        "/metrics" => {
            let mut out = String::with_capacity(4096);
            shared.metrics.render(&mut out);
            shared.security.counters.render_prometheus(&mut out);
            shared.bus.metrics.render(shared.bus.is_serving(), &mut out);
            let _ = std::fmt::Write::write_fmt(
                &mut out,
                format_args!(
                    "# TYPE tickgate_symbols gauge\ntickgate_symbols {}\n# TYPE tickgate_symbols_max gauge\ntickgate_symbols_max {}\n# HELP tickgate_symbols_waiting Names subscribed to before any tick created them (held by their connections).\n# TYPE tickgate_symbols_waiting gauge\ntickgate_symbols_waiting {}\n# TYPE tickgate_revocations gauge\ntickgate_revocations {}\n",
                    shared.hub.symbols().len(),
                    shared.hub.symbols().max_symbols(),
                    shared.hub.symbols().waiting_len(),
                    shared.revocation.len()
                ),
            );
            let (bytes, ticks) = shared.hub.history_held();
            let _ = std::fmt::Write::write_fmt(
                &mut out,
                format_args!(
                    "# HELP tickgate_history_bytes Memory of the recovery history (feed.history), all symbols.\n# TYPE tickgate_history_bytes gauge\ntickgate_history_bytes {bytes}\n# TYPE tickgate_history_bytes_max gauge\ntickgate_history_bytes_max {}\n# TYPE tickgate_history_ticks gauge\ntickgate_history_ticks {ticks}\n",
                    shared.hub.history_limits().max_bytes
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
            Routed::Reply(Response::text(200, &out).with_header("Content-Type", "text/plain; version=0.0.4"))
        }
        "/admin/revoke" => {
            if req.method != "POST" {
                return Routed::Reply(
                    Response::text(405, "method not allowed\n").with_header("Allow", "POST"),
                );
            }
            match revoke(shared, req, peer, now) {
                Ok(r) => Routed::Revoke(r),
                Err(resp) => Routed::Reply(resp),
            }
        }
        _ => Routed::Reply(Response::text(404, "not found\n")),
    }
}

fn bearer(req: &http::Request) -> Option<&str> {
    req.header("authorization").and_then(|h| {
        let (scheme, rest) = h.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
    })
}

#[allow(clippy::too_many_arguments)]
fn log_revoke(
    shared: &Shared,
    peer: Option<SocketAddr>,
    token: Option<&str>,
    now: u64,
    outcome: Outcome,
    reason: Reason,
    sub: Option<&str>,
    status: u16,
) {
    let hash = token.map(token_hash);
    shared.audit(&SecurityEvent {
        ip: peer.map(|p| p.ip()),
        sub,
        status: Some(status),
        token_hash: hash.as_deref(),
        ..SecurityEvent::at(now, Event::Revoke, outcome, reason)
    });
}

/// Checks and applies (to the revocation list) a `POST /admin/revoke`: the revocation to
/// carry out, or the refusal.
fn revoke(
    shared: &Shared,
    req: &http::Request,
    peer: Option<SocketAddr>,
    now: u64,
) -> Result<Revocation, Response> {
    let token = bearer(req);
    let log = |outcome: Outcome, reason: Reason, sub: Option<&str>, status: u16| {
        log_revoke(shared, peer, token, now, outcome, reason, sub, status)
    };
    let unauthorized = || {
        Response::text(401, "unauthorized\n")
            .with_header("WWW-Authenticate", "Bearer error=\"invalid_token\"")
    };
    let Some(token) = token else {
        log(Outcome::Rejected, Reason::NoToken, None, 401);
        return Err(Response::text(401, "unauthorized\n").with_header("WWW-Authenticate", "Bearer"));
    };
    let claims = match shared.verify_token(token, now) {
        Ok(c) => c,
        Err(e) => {
            log(Outcome::Rejected, e.log_reason(), None, 401);
            return Err(unauthorized());
        }
    };
    if !claims.has_role(Role::Admin) {
        log(Outcome::Rejected, Reason::NotAdmin, Some(&claims.sub), 403);
        return Err(Response::text(403, "forbidden\n"));
    }
    let target = match RevokeTarget::from_admin_body(&req.body) {
        Ok(t) => t,
        Err(_) => {
            log(Outcome::Rejected, Reason::BadRequest, Some(&claims.sub), 400);
            return Err(Response::json(
                400,
                br#"{"error":"bad_request","message":"expected {\"sub\"|\"sid\"|\"jti\": string}"}"#,
            ));
        }
    };
    if shared.revocation.revoke(target.clone(), now).is_err() {
        log(
            Outcome::Rejected,
            Reason::RevocationListFull,
            Some(&claims.sub),
            503,
        );
        return Err(Response::text(503, "revocation list full\n"));
    }
    Ok(Revocation {
        target,
        sub: claims.sub.clone(),
        token: token.to_owned(),
        now,
        peer,
    })
}

/// The answer to a revocation carried out: `closed` connections on this node. Logs it as
/// accepted.
pub fn revoked(shared: &Shared, r: &Revocation, closed: usize) -> Response {
    log_revoke(
        shared,
        r.peer,
        Some(&r.token),
        r.now,
        Outcome::Accepted,
        Reason::Ok,
        Some(&r.sub),
        200,
    );
    let body = format!("{{\"closed\":{closed}}}");
    Response::json(200, body.as_bytes())
}
