//! The gate: one function from a parsed HTTP request to "upgrade" or "answer with this
//! response" (PROTOCOL.md sections 1-3 and 8).
//!
//! The checks run in the contract's order, each with its status: request shape (405/426/400),
//! per-IP rate limit (429 + `Retry-After`), Origin (403), token (401 with
//! `WWW-Authenticate`), bindings and revocation (401 `invalid_token`), per-user cap (429),
//! subprotocol (400). Only when every check passed does the caller write `101`; the
//! returned [`Admitted`] carries the verified identity and the per-user slot, whose `Drop`
//! releases the cap on every close path.
//!
//! Every outcome is written to the security log (never the token; a short hash at most) and
//! counted for `/metrics`.
//!
//! `/v1/ticket` also speaks CORS, so a page served from an allowed origin can `fetch` a
//! ticket (docs/PROTOCOL.md section 4): `OPTIONS /v1/ticket` is answered as a preflight
//! ([`CORS_MAX_AGE_SECS`] and the other constants below), and every other answer there
//! carries `Vary: Origin` and, for an allowed `Origin`, `Access-Control-Allow-Origin`
//! echoing it. "Allowed" is the upgrade's own check ([`crate::auth::origin::OriginPolicy`]).
//!
//! `GET /` (the live demo page, `server.demo_page`) and `POST /v1/demo-token` (the
//! embedded demo's token for that page) are decided in [`demo`].

use std::net::IpAddr;

use crate::auth::jwt::{AuthError, VerifiedClaims};
use crate::auth::origin::OriginDecision;
use crate::auth::ratelimit::RateDecision;
use crate::auth::seclog::{Event, Outcome as LogOutcome, Reason, SecurityEvent, token_hash};
use crate::auth::tickets::TicketError;
use crate::auth::usercap::{self, UserSlot};
use crate::proto::http::{self, Credential, Request, Response, Route};
use crate::state::Shared;

pub mod demo;
pub mod pending;
#[cfg(test)]
mod testkit;

/// A connection that passed every check: the caller answers `101` with these values.
pub struct Admitted {
    pub claims: VerifiedClaims,
    pub slot: UserSlot,
    pub accept: String,
    pub protocol: Option<&'static str>,
    pub client_ip: IpAddr,
    /// permessage-deflate, when `compression.enabled` and the client offered it.
    pub deflate: Option<crate::proto::deflate::Agreed>,
}

pub enum Outcome {
    Upgrade(Box<Admitted>),
    Respond(Response),
    /// `[cluster]`: a ticket was issued here; the runtime puts it on the bus (so any node
    /// can redeem it once) before answering with `resp`, or forgets it and answers `503`.
    TicketIssued {
        resp: Response,
        ticket: String,
        token: String,
        ttl_ms: u64,
    },
}

/// `[cluster]`: the ticket this upgrade request would redeem, if that is its credential
/// (the runtime takes it from the bus first, see [`Outcome::TicketIssued`]).
pub fn ticket_to_redeem(shared: &Shared, req: &Request) -> Option<String> {
    if http::route(&req.path) != Route::Stream {
        return None;
    }
    let up = http::check_upgrade(req).ok()?;
    match http::extract_credential(req, &up.offered_protocols, shared.cfg.auth.allow_query_token) {
        Credential::Ticket(t) => Some(t),
        _ => None,
    }
}

/// Context for the security log line of one request.
struct Audit<'a> {
    shared: &'a Shared,
    now_ms: u64,
    event: Event,
    ip: IpAddr,
    origin: Option<&'a str>,
}

impl Audit<'_> {
    fn log(
        &self,
        outcome: LogOutcome,
        reason: Reason,
        claims: Option<&VerifiedClaims>,
        status: u16,
        token: Option<&str>,
    ) {
        let hash = token.map(token_hash);
        self.shared.audit(&SecurityEvent {
            ip: Some(self.ip),
            origin: self.origin,
            sub: claims.map(|c| c.sub.as_str()),
            sid: claims.and_then(|c| c.sid.as_deref()),
            status: Some(status),
            token_hash: hash.as_deref(),
            ..SecurityEvent::at(self.now_ms, self.event, outcome, reason)
        });
    }

    fn reject(
        &self,
        resp: Response,
        reason: Reason,
        claims: Option<&VerifiedClaims>,
        token: Option<&str>,
    ) -> Outcome {
        self.log(LogOutcome::Rejected, reason, claims, resp.status, token);
        Outcome::Respond(resp)
    }
}

fn unauthorized(with_error: bool) -> Response {
    let v = if with_error {
        "Bearer error=\"invalid_token\""
    } else {
        "Bearer"
    };
    Response::text(401, "unauthorized\n").with_header("WWW-Authenticate", v)
}

fn too_many(retry_after_secs: u64) -> Response {
    Response::text(429, "too many requests\n")
        .with_header("Retry-After", &retry_after_secs.max(1).to_string())
}

/// The per-IP rate limit as judged at accept time, before a TLS handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerRate {
    /// Not checked yet: the gate checks (plain listener, or a trusted proxy's socket whose
    /// client IP is only known from the request's forwarding headers).
    Unchecked,
    /// Checked and charged for the socket peer: the gate must not charge this request again.
    Charged,
    /// Over the limit: the caller closes the socket without a TLS handshake.
    Refused,
}

/// The per-IP rate limit before the TLS handshake (the expensive part of an upgrade).
///
/// Over TLS a `429` can only be sent after a completed handshake, which is the very work a
/// flooding address must not get. So an address over its limit is refused by closing the
/// socket before the ServerHello (the client sees the connection end during its handshake);
/// the refusal is logged and counted like the `429` it replaces (`reason: rate_limited`,
/// `status` absent). A socket from a trusted proxy is left to the gate, which knows the real
/// client from the forwarding headers and answers `429` with `Retry-After` as usual.
pub fn pre_tls_rate(shared: &Shared, peer: IpAddr, now_ms: u64) -> PeerRate {
    if shared.auth().proxies.contains(peer) {
        return PeerRate::Unchecked;
    }
    match shared.auth.rate.check(peer, now_ms) {
        RateDecision::Allow => PeerRate::Charged,
        RateDecision::Deny { .. } => {
            shared.audit(&SecurityEvent {
                ip: Some(peer),
                ..SecurityEvent::at(
                    now_ms,
                    Event::Handshake,
                    LogOutcome::Rejected,
                    Reason::RateLimited,
                )
            });
            PeerRate::Refused
        }
    }
}

/// Route and judge one request of the public listener.
pub fn handle_public(shared: &Shared, req: &Request, peer: IpAddr, now_ms: u64) -> Outcome {
    handle_public_with(shared, req, peer, now_ms, PeerRate::Unchecked)
}

/// [`handle_public`] for a request whose socket peer was already charged by
/// [`pre_tls_rate`] (`PeerRate::Charged`): the request is not counted twice.
pub fn handle_public_with(
    shared: &Shared,
    req: &Request,
    peer: IpAddr,
    now_ms: u64,
    peer_rate: PeerRate,
) -> Outcome {
    let auth = shared.auth();
    let ip = http::client_ip(req, peer, |p| auth.proxies.contains(p));
    // Every request counts against the per-IP limit (PROTOCOL.md section 1), once.
    let rate = match peer_rate {
        PeerRate::Charged if ip == peer => RateDecision::Allow,
        PeerRate::Refused => RateDecision::Deny { retry_after_secs: 1 },
        _ => shared.auth.rate.check(ip, now_ms),
    };
    let origin = req.header("origin");
    match http::route(&req.path) {
        Route::Healthz => Outcome::Respond(Response::text(200, "ok\n")),
        Route::Readyz => Outcome::Respond(if shared.is_draining() {
            Response::text(503, "draining\n")
        } else {
            Response::text(200, "ready\n")
        }),
        Route::Stream => {
            let audit = Audit {
                shared,
                now_ms,
                event: Event::Handshake,
                ip,
                origin,
            };
            admit(shared, &auth, req, ip, rate, now_ms, &audit)
        }
        Route::Ticket => {
            let audit = Audit {
                shared,
                now_ms,
                event: Event::Ticket,
                ip,
                origin,
            };
            ticket(shared, &auth, req, ip, rate, now_ms, &audit)
        }
        Route::Page if shared.cfg.server.demo_page => Outcome::Respond(demo::page(req, rate)),
        Route::DemoToken if shared.demo_key.is_some() => {
            let audit = Audit {
                shared,
                now_ms,
                event: Event::DemoToken,
                ip,
                origin,
            };
            demo::token(shared, &auth, req, rate, now_ms, &audit)
        }
        _ => Outcome::Respond(not_found(rate)),
    }
}

/// A path that does not exist here: `404`, or `429` when the client is over its limit.
fn not_found(rate: RateDecision) -> Response {
    match rate {
        RateDecision::Deny { retry_after_secs } => too_many(retry_after_secs),
        RateDecision::Allow => Response::text(404, "not found\n"),
    }
}

/// Steps 2-5 shared by the upgrade and the ticket endpoint: rate, origin, token, bindings,
/// revocation. Returns the verified claims or the rejection already logged.
#[allow(clippy::too_many_arguments)]
fn authenticate(
    shared: &Shared,
    auth: &crate::state::AuthState,
    req: &Request,
    ip: IpAddr,
    rate: RateDecision,
    cred: Credential,
    now_ms: u64,
    audit: &Audit<'_>,
) -> Result<(VerifiedClaims, Option<String>), Outcome> {
    if let RateDecision::Deny { retry_after_secs } = rate {
        return Err(audit.reject(too_many(retry_after_secs), Reason::RateLimited, None, None));
    }
    if auth.origins.check(req.header("origin")) == OriginDecision::Rejected {
        return Err(audit.reject(
            Response::text(403, "origin not allowed\n"),
            Reason::Origin,
            None,
            None,
        ));
    }
    let (claims, token) = match cred {
        Credential::None => return Err(audit.reject(unauthorized(false), Reason::NoToken, None, None)),
        Credential::Bearer(t) => match shared.verify_token(&t, now_ms) {
            Ok(c) => (c, t),
            Err(e) => return Err(audit.reject(unauthorized(true), e.log_reason(), None, Some(&t))),
        },
        Credential::Ticket(t) => match shared.tickets.redeem(&t, now_ms) {
            Ok(c) => {
                // A ticket carries the token's identity and expiry: both still apply.
                let leeway = shared.cfg.auth.leeway.as_secs();
                if c.exp.saturating_add(leeway) <= now_ms / 1000 {
                    return Err(audit.reject(
                        unauthorized(true),
                        AuthError::Expired.log_reason(),
                        Some(&c),
                        Some(&t),
                    ));
                }
                if shared.revocation.revokes(&c, now_ms) {
                    return Err(audit.reject(
                        unauthorized(true),
                        AuthError::Revoked.log_reason(),
                        Some(&c),
                        Some(&t),
                    ));
                }
                (c, t)
            }
            Err(_) => return Err(audit.reject(unauthorized(true), Reason::BadTicket, None, Some(&t))),
        },
    };
    let device = req.header("x-device-id").or_else(|| req.query_param("device"));
    if let Some(did) = &claims.did
        && device != Some(did.as_str())
    {
        return Err(audit.reject(
            unauthorized(true),
            Reason::DeviceBinding,
            Some(&claims),
            Some(&token),
        ));
    }
    if let Some(cip) = claims.cip
        && !same_ip(cip, ip)
    {
        return Err(audit.reject(unauthorized(true), Reason::IpBinding, Some(&claims), Some(&token)));
    }
    Ok((claims, Some(token)))
}

/// IPv4-mapped IPv6 peers compare equal to their IPv4 form.
fn same_ip(a: IpAddr, b: IpAddr) -> bool {
    a.to_canonical() == b.to_canonical()
}

fn admit(
    shared: &Shared,
    auth: &crate::state::AuthState,
    req: &Request,
    ip: IpAddr,
    rate: RateDecision,
    now_ms: u64,
    audit: &Audit<'_>,
) -> Outcome {
    let up = match http::check_upgrade(req) {
        Ok(u) => u,
        Err(resp) => return audit.reject(resp, Reason::BadRequestShape, None, None),
    };
    if shared.is_draining() {
        return audit.reject(Response::text(503, "draining\n"), Reason::Draining, None, None);
    }
    let cred = http::extract_credential(req, &up.offered_protocols, shared.cfg.auth.allow_query_token);
    let (claims, token) = match authenticate(shared, auth, req, ip, rate, cred, now_ms, audit) {
        Ok(v) => v,
        Err(o) => return o,
    };
    let token = token.as_deref();
    let Some(slot) = usercap::acquire_at(&shared.auth.caps, &claims.sub, now_ms) else {
        return audit.reject(too_many(1), Reason::UserCap, Some(&claims), token);
    };
    let protocol = match http::select_subprotocol(&up.offered_protocols) {
        Ok(p) => p,
        Err(()) => {
            return audit.reject(
                Response::text(400, "unsupported subprotocol\n"),
                Reason::Subprotocol,
                Some(&claims),
                token,
            );
        }
    };
    let deflate = shared.cfg.compression.enabled.then(|| {
        crate::proto::deflate::negotiate(
            req.headers_all("sec-websocket-extensions"),
            &shared.cfg.compression.deflate(),
        )
    });
    audit.log(LogOutcome::Accepted, Reason::Ok, Some(&claims), 101, token);
    Outcome::Upgrade(Box::new(Admitted {
        claims,
        slot,
        accept: up.accept,
        protocol,
        client_ip: ip,
        deflate: deflate.flatten(),
    }))
}

/// How long a browser may cache the answer to a preflight of `/v1/ticket`, in seconds
/// (`Access-Control-Max-Age`). Bounded so that a change to `auth.allowed_origins` reaches
/// pages within ten minutes (browsers cap the value anyway: Chromium at two hours).
pub const CORS_MAX_AGE_SECS: u32 = 600;

/// The request headers a page may send with `POST /v1/ticket`
/// (`Access-Control-Allow-Headers`): the token, a body's type, the device id.
pub const CORS_ALLOW_HEADERS: &str = "Authorization, Content-Type, X-Device-Id";

/// The one method a preflight may ask for (`Access-Control-Allow-Methods`).
pub const CORS_ALLOW_METHODS: &str = "POST";

/// The `Origin` of a request to `/v1/ticket` as `Access-Control-Allow-Origin` echoes it,
/// when the upgrade's check ([`crate::auth::origin::OriginPolicy::check`]) allows it:
/// the value as sent, without the surrounding whitespace the check ignores too. `None`
/// when the header is missing (not a cross-origin request) or refused.
fn cors_origin(decision: OriginDecision, origin: Option<&str>) -> Option<&str> {
    match decision {
        OriginDecision::Allowed => origin.map(|o| o.trim_matches([' ', '\t'])),
        OriginDecision::Missing | OriginDecision::Rejected => None,
    }
}

/// The CORS headers of an answer of `/v1/ticket` that is not a preflight's: `Vary: Origin`
/// always (the answer depends on it), and `Access-Control-Allow-Origin` for an allowed
/// `Origin`, whatever the status, so the page can read a `401` or `429` as well as the ticket.
fn cors_answer(resp: Response, origin: Option<&str>) -> Response {
    let resp = resp.with_header("Vary", "Origin");
    match origin {
        Some(o) => resp.with_header("Access-Control-Allow-Origin", o),
        None => resp,
    }
}

/// `[cluster]`: the `503` when the bus could not take the ticket `issued` was to deliver,
/// with the same CORS headers, so the page sees the `503` too.
pub fn bus_unavailable(issued: &Response) -> Response {
    let mut resp = Response::text(503, "bus unavailable\n");
    for (name, value) in &issued.headers {
        let lower = name.to_ascii_lowercase();
        if lower == "vary" || lower.starts_with("access-control-") {
            resp = resp.with_header(name, value);
        }
    }
    resp
}

/// `OPTIONS /v1/ticket`, answered only as a CORS preflight (never needs a token), in this
/// order: the per-IP limit (`429`: the request was counted like any other); the upgrade's
/// `Origin` check (`403`, no CORS headers); then it must be a preflight, with an `Origin`
/// and exactly one `Access-Control-Request-Method: POST` (else `400`); then `204` with
/// every `Access-Control-Allow-*` header. Logged as a `ticket` event (reason `preflight`
/// when accepted), never counted as a ticket.
fn preflight(
    req: &Request,
    rate: RateDecision,
    decision: OriginDecision,
    origin: Option<&str>,
    audit: &Audit<'_>,
) -> Outcome {
    let vary = |r: Response| r.with_header("Vary", "Origin");
    if let RateDecision::Deny { retry_after_secs } = rate {
        return audit.reject(vary(too_many(retry_after_secs)), Reason::RateLimited, None, None);
    }
    if decision == OriginDecision::Rejected {
        return audit.reject(
            vary(Response::text(403, "origin not allowed\n")),
            Reason::Origin,
            None,
            None,
        );
    }
    let mut asked = req.headers_all("access-control-request-method");
    let method = match (asked.next(), asked.next()) {
        (Some(m), None) => Some(m.trim_matches([' ', '\t'])),
        _ => None,
    };
    let Some(origin) = origin.filter(|_| method == Some(CORS_ALLOW_METHODS)) else {
        return audit.reject(
            vary(Response::text(400, "not a cors preflight for post\n")),
            Reason::BadRequestShape,
            None,
            None,
        );
    };
    audit.log(LogOutcome::Accepted, Reason::Preflight, None, 204, None);
    Outcome::Respond(
        Response::empty(204)
            .with_header("Access-Control-Allow-Origin", origin)
            .with_header("Access-Control-Allow-Methods", CORS_ALLOW_METHODS)
            .with_header("Access-Control-Allow-Headers", CORS_ALLOW_HEADERS)
            .with_header("Access-Control-Max-Age", &CORS_MAX_AGE_SECS.to_string())
            .with_header("Vary", "Origin"),
    )
}

/// `/v1/ticket`: a preflight ([`preflight`]), or a ticket for a bearer token
/// ([`issue_ticket`]) with the CORS headers of [`cors_answer`].
fn ticket(
    shared: &Shared,
    auth: &crate::state::AuthState,
    req: &Request,
    ip: IpAddr,
    rate: RateDecision,
    now_ms: u64,
    audit: &Audit<'_>,
) -> Outcome {
    let origin_header = req.header("origin");
    let decision = auth.origins.check(origin_header);
    let origin = cors_origin(decision, origin_header);
    if req.method == "OPTIONS" {
        return preflight(req, rate, decision, origin, audit);
    }
    match issue_ticket(shared, auth, req, ip, rate, now_ms, audit) {
        Outcome::Respond(resp) => Outcome::Respond(cors_answer(resp, origin)),
        Outcome::TicketIssued {
            resp,
            ticket,
            token,
            ttl_ms,
        } => Outcome::TicketIssued {
            resp: cors_answer(resp, origin),
            ticket,
            token,
            ttl_ms,
        },
        up @ Outcome::Upgrade(_) => up,
    }
}

fn issue_ticket(
    shared: &Shared,
    auth: &crate::state::AuthState,
    req: &Request,
    ip: IpAddr,
    rate: RateDecision,
    now_ms: u64,
    audit: &Audit<'_>,
) -> Outcome {
    if req.method != "POST" {
        return audit.reject(
            Response::text(405, "method not allowed\n").with_header("Allow", "POST, OPTIONS"),
            Reason::Method,
            None,
            None,
        );
    }
    // Tickets are minted from a header token only: a ticket must not buy a ticket, and a
    // query token would defeat the point of tickets (keeping tokens out of URLs).
    let cred = match req.header("authorization").and_then(bearer_of) {
        Some(t) => Credential::Bearer(t.to_string()),
        None => Credential::None,
    };
    let (claims, token) = match authenticate(shared, auth, req, ip, rate, cred, now_ms, audit) {
        Ok(v) => v,
        Err(o) => return o,
    };
    // A ticket never outlives the token it was made from.
    let leeway_ms = shared.cfg.auth.leeway.as_millis() as u64;
    let not_after_ms = claims.exp.saturating_mul(1000).saturating_add(leeway_ms);
    match shared.tickets.issue_until(claims.clone(), now_ms, not_after_ms) {
        Ok(t) => {
            audit.log(
                LogOutcome::Accepted,
                Reason::Ok,
                Some(&claims),
                200,
                token.as_deref(),
            );
            let ttl_ms = shared.tickets.ttl_ms().min(not_after_ms.saturating_sub(now_ms));
            let body = format!("{{\"ticket\":\"{t}\",\"expires_in\":{}}}", ttl_ms / 1000);
            let resp = Response::json(200, body.as_bytes());
            match token {
                Some(token) if shared.bus.enabled() => Outcome::TicketIssued {
                    resp,
                    ticket: t,
                    token,
                    ttl_ms,
                },
                _ => Outcome::Respond(resp),
            }
        }
        Err(TicketError::Full) => audit.reject(
            too_many(1),
            Reason::TicketStoreFull,
            Some(&claims),
            token.as_deref(),
        ),
        Err(_) => audit.reject(
            unauthorized(true),
            Reason::Expired,
            Some(&claims),
            token.as_deref(),
        ),
    }
}

fn bearer_of(h: &str) -> Option<&str> {
    let (scheme, rest) = h.split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") {
        let t = rest.trim();
        (!t.is_empty()).then_some(t)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    //! The CORS decisions of `/v1/ticket`, driven with `now` and parsed requests: no socket.

    use super::testkit::{GateWorld, header};
    use super::*;
    use crate::auth::mint::{self, Claims};
    use crate::config::Config;

    const T0: u64 = 1_800_000_000_000;
    const APP: &str = "https://app.example.com";

    type World = GateWorld;

    fn world(tweak: impl FnOnce(&mut Config)) -> World {
        let mut cfg = Config::default_production();
        cfg.auth.allowed_origins = vec![APP.into()];
        cfg.auth.allow_missing_origin = true;
        cfg.limits.per_ip_handshakes_per_sec = 1000;
        cfg.limits.per_ip_burst = 1000;
        tweak(&mut cfg);
        GateWorld::new(cfg, "k1", false)
    }

    fn token(w: &World) -> String {
        let now = T0 / 1000;
        let claims = Claims {
            sub: "alice".into(),
            exp: now + 300,
            iat: Some(now),
            roles: vec!["subscriber".into()],
            symbols: vec!["*".into()],
            ..Claims::default()
        };
        mint::sign_token(&w.key, "k1", &claims)
    }

    fn preflight_req(extra: &str) -> String {
        format!("OPTIONS /v1/ticket HTTP/1.1\r\nHost: x\r\n{extra}\r\n")
    }

    fn allowed_preflight() -> String {
        preflight_req(&format!(
            "Origin: {APP}\r\nAccess-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: authorization\r\n"
        ))
    }

    fn no_cors(r: &Response) -> bool {
        !r.headers
            .iter()
            .any(|(n, _)| n.to_ascii_lowercase().starts_with("access-control-"))
    }

    #[test]
    fn allowed_preflight_gets_every_header_and_no_token_is_needed() {
        let w = world(|_| {});
        let r = w.send(&allowed_preflight(), T0);
        assert_eq!(r.status, 204);
        assert!(r.body.is_empty());
        assert_eq!(header(&r, "access-control-allow-origin"), Some(APP));
        assert_eq!(header(&r, "access-control-allow-methods"), Some("POST"));
        assert_eq!(
            header(&r, "access-control-allow-headers"),
            Some("Authorization, Content-Type, X-Device-Id")
        );
        assert_eq!(header(&r, "access-control-max-age"), Some("600"));
        assert_eq!(header(&r, "vary"), Some("Origin"));
        let line = w.last_log();
        assert!(line.contains("\"event\":\"ticket\""), "{line}");
        assert!(line.contains("\"reason\":\"preflight\""), "{line}");
        assert!(line.contains("\"status\":204"), "{line}");
        // A preflight is not a ticket.
        assert_eq!(w.shared.security.counters.get("ticket", "accepted", "ok"), 0);
    }

    #[test]
    fn allow_origin_echoes_the_origin_never_a_wildcard() {
        let w = world(|c| {
            c.auth.allowed_origins = vec![APP.into(), "http://127.0.0.1:8000".into()];
        });
        let r = w.send(
            &preflight_req("Origin: http://127.0.0.1:8000\r\nAccess-Control-Request-Method: POST\r\n"),
            T0,
        );
        assert_eq!(r.status, 204);
        assert_eq!(
            header(&r, "access-control-allow-origin"),
            Some("http://127.0.0.1:8000")
        );
        assert!(r.headers.iter().all(|(_, v)| v != "*"));
    }

    #[test]
    fn disallowed_origin_gets_403_and_no_cors_headers() {
        let w = world(|_| {});
        for origin in [
            "https://evil.example",
            "https://app.example.com.evil.example",
            "null",
            "*",
        ] {
            let r = w.send(
                &preflight_req(&format!(
                    "Origin: {origin}\r\nAccess-Control-Request-Method: POST\r\n"
                )),
                T0,
            );
            assert_eq!(r.status, 403, "{origin}");
            assert!(no_cors(&r), "{origin}: {r:?}");
            assert!(w.last_log().contains("\"reason\":\"origin\""));
            let post = format!(
                "POST /v1/ticket HTTP/1.1\r\nHost: x\r\nOrigin: {origin}\r\nAuthorization: Bearer {}\r\nContent-Length: 0\r\n\r\n",
                token(&w)
            );
            let r = w.send(&post, T0);
            assert_eq!(r.status, 403, "{origin}");
            assert!(no_cors(&r), "{origin}: {r:?}");
        }
    }

    #[test]
    fn a_preflight_must_ask_for_post_once() {
        let w = world(|_| {});
        for extra in [
            format!("Origin: {APP}\r\n"),
            format!("Origin: {APP}\r\nAccess-Control-Request-Method: PUT\r\n"),
            format!("Origin: {APP}\r\nAccess-Control-Request-Method: post\r\n"),
            format!("Origin: {APP}\r\nAccess-Control-Request-Method: \r\n"),
            format!(
                "Origin: {APP}\r\nAccess-Control-Request-Method: POST\r\nAccess-Control-Request-Method: POST\r\n"
            ),
            // No Origin (allowed here for non-browser clients): not a preflight.
            "Access-Control-Request-Method: POST\r\n".to_owned(),
        ] {
            let r = w.send(&preflight_req(&extra), T0);
            assert_eq!(r.status, 400, "{extra:?}");
            assert!(no_cors(&r), "{extra:?}");
            assert!(w.last_log().contains("\"reason\":\"bad_request_shape\""));
        }
        // Where a missing Origin is refused, the upgrade's rule answers first: 403.
        let w = world(|c| c.auth.allow_missing_origin = false);
        let r = w.send(&preflight_req("Access-Control-Request-Method: POST\r\n"), T0);
        assert_eq!(r.status, 403);
        assert!(no_cors(&r));
    }

    #[test]
    fn preflights_count_against_the_per_ip_limit() {
        let w = world(|c| {
            c.limits.per_ip_handshakes_per_sec = 1;
            c.limits.per_ip_burst = 2;
        });
        assert_eq!(w.send(&allowed_preflight(), T0).status, 204);
        assert_eq!(w.send(&allowed_preflight(), T0).status, 204);
        let r = w.send(&allowed_preflight(), T0);
        assert_eq!(r.status, 429);
        assert!(header(&r, "retry-after").is_some());
        assert!(no_cors(&r));
        assert!(w.last_log().contains("\"reason\":\"rate_limited\""));
        // The bucket the preflights emptied is the one the POST draws from.
        let post = format!(
            "POST /v1/ticket HTTP/1.1\r\nHost: x\r\nOrigin: {APP}\r\nAuthorization: Bearer {}\r\nContent-Length: 0\r\n\r\n",
            token(&w)
        );
        assert_eq!(w.send(&post, T0).status, 429);
        // One second later, one token is back.
        assert_eq!(w.send(&allowed_preflight(), T0 + 1000).status, 204);
        assert_eq!(w.send(&allowed_preflight(), T0 + 1000).status, 429);
    }

    #[test]
    fn post_from_an_allowed_origin_carries_allow_origin_and_vary() {
        let w = world(|_| {});
        let post = |origin: &str, auth: &str| {
            format!("POST /v1/ticket HTTP/1.1\r\nHost: x\r\n{origin}{auth}Content-Length: 0\r\n\r\n")
        };
        let bearer = format!("Authorization: Bearer {}\r\n", token(&w));
        let r = w.send(&post(&format!("Origin: {APP}\r\n"), &bearer), T0);
        assert_eq!(r.status, 200);
        assert!(r.body.starts_with(b"{\"ticket\":\""));
        assert_eq!(header(&r, "access-control-allow-origin"), Some(APP));
        assert_eq!(header(&r, "vary"), Some("Origin"));
        // Whitespace around the header is not part of the value (RFC 9110 5.5).
        let r = w.send(&post(&format!("Origin:  {APP}\t\r\n"), &bearer), T0);
        assert_eq!(header(&r, "access-control-allow-origin"), Some(APP));
        // A refusal the page must be able to read carries it too.
        let r = w.send(&post(&format!("Origin: {APP}\r\n"), ""), T0);
        assert_eq!(r.status, 401);
        assert_eq!(header(&r, "access-control-allow-origin"), Some(APP));
        // No Origin (allowed here): a ticket, no CORS headers, still Vary.
        let r = w.send(&post("", &bearer), T0);
        assert_eq!(r.status, 200);
        assert!(no_cors(&r));
        assert_eq!(header(&r, "vary"), Some("Origin"));
        // Another method: 405 naming both.
        let r = w.send(
            &format!("GET /v1/ticket HTTP/1.1\r\nHost: x\r\nOrigin: {APP}\r\n\r\n"),
            T0,
        );
        assert_eq!(r.status, 405);
        assert_eq!(header(&r, "allow"), Some("POST, OPTIONS"));
    }

    #[test]
    fn bus_unavailable_keeps_the_cors_headers() {
        let issued = cors_answer(Response::json(200, b"{}"), Some(APP));
        let r = bus_unavailable(&issued);
        assert_eq!(r.status, 503);
        assert_eq!(header(&r, "access-control-allow-origin"), Some(APP));
        assert_eq!(header(&r, "vary"), Some("Origin"));
        assert_eq!(header(&r, "content-type"), Some("text/plain; charset=utf-8"));
        let r = bus_unavailable(&cors_answer(Response::json(200, b"{}"), None));
        assert!(no_cors(&r));
    }

    #[test]
    fn options_elsewhere_is_unchanged() {
        let w = world(|_| {});
        let cors = format!("Origin: {APP}\r\nAccess-Control-Request-Method: POST\r\n");
        let r = w.send(
            &format!("OPTIONS /v1/stream HTTP/1.1\r\nHost: x\r\n{cors}\r\n"),
            T0,
        );
        assert_eq!(r.status, 405);
        assert!(no_cors(&r));
        let r = w.send(&format!("OPTIONS /nope HTTP/1.1\r\nHost: x\r\n{cors}\r\n"), T0);
        assert_eq!(r.status, 404);
        assert!(no_cors(&r) && header(&r, "vary").is_none());
        let r = w.send(&format!("OPTIONS /healthz HTTP/1.1\r\nHost: x\r\n{cors}\r\n"), T0);
        assert_eq!(r.status, 200);
        assert!(no_cors(&r));
    }
}
