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

use std::net::IpAddr;

use crate::auth::jwt::{AuthError, VerifiedClaims};
use crate::auth::origin::OriginDecision;
use crate::auth::ratelimit::RateDecision;
use crate::auth::seclog::{Event, Outcome as LogOutcome, Reason, SecurityEvent, token_hash};
use crate::auth::tickets::TicketError;
use crate::auth::usercap::{self, UserSlot};
use crate::proto::http::{self, Credential, Request, Response, Route};
use crate::state::Shared;

pub mod pending;

/// A connection that passed every check: the caller answers `101` with these values.
pub struct Admitted {
    pub claims: VerifiedClaims,
    pub slot: UserSlot,
    pub accept: String,
    pub protocol: Option<&'static str>,
    pub client_ip: IpAddr,
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
        _ => match rate {
            RateDecision::Deny { retry_after_secs } => Outcome::Respond(too_many(retry_after_secs)),
            RateDecision::Allow => Outcome::Respond(Response::text(404, "not found\n")),
        },
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
    audit.log(LogOutcome::Accepted, Reason::Ok, Some(&claims), 101, token);
    Outcome::Upgrade(Box::new(Admitted {
        claims,
        slot,
        accept: up.accept,
        protocol,
        client_ip: ip,
    }))
}

fn ticket(
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
            Response::text(405, "method not allowed\n").with_header("Allow", "POST"),
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
