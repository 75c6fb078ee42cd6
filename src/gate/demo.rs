//! The live demo page and the embedded demo's token for it, sans-IO (docs/PROTOCOL.md
//! section 1, "The demo page").
//!
//! - `GET /`, only with `server.demo_page` (the embedded demo turns it on): one small HTML
//!   page compiled into the binary ([`PAGE_HTML`]: no build step, no external resource). It
//!   takes a token from `POST /v1/demo-token` (or, where that does not exist, one typed in),
//!   exchanges it for a ticket at `/v1/ticket`, opens `/v1/stream?ticket=`, and shows a
//!   live table of the symbols, a latency chart, the close code in words, and its state as
//!   JSON in `<pre id="state">` for tests. Served with a Content-Security-Policy that
//!   allows its own inline script and style and connections to its own origin only.
//! - `POST /v1/demo-token`, only in the embedded demo (the only mode with a signing key in
//!   memory, [`crate::state::Shared::demo_key`]; elsewhere the path is `404`): a token for
//!   the page ([`mint::DemoHolder::Page`]: `sub` `demo`, `sid` `demo-page`, subscriber
//!   only, all symbols, ten minutes), so the page can start and can answer
//!   `reauth_required` with a fresh one. Checked like `/v1/ticket` before any token:
//!   the per-IP limit (`429`), the `Origin` allow-list (`403`), the method (`405`); the
//!   answers carry the CORS headers of `/v1/ticket`'s `POST`. Logged as event `demo_token`.

use super::{Audit, Outcome, cors_answer, cors_origin, not_found, too_many};
use crate::auth::mint::{self, DemoHolder};
use crate::auth::origin::OriginDecision;
use crate::auth::ratelimit::RateDecision;
use crate::auth::seclog::{Outcome as LogOutcome, Reason};
use crate::proto::http::{Request, Response};
use crate::state::{AuthState, Shared};

/// The demo page (`src/gate/demo.html`).
pub const PAGE_HTML: &str = include_str!("demo.html");

/// The page's Content-Security-Policy: its own inline script and style, `fetch` and
/// WebSocket to its own origin, nothing else loaded, not framed.
pub const PAGE_CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// `GET /` with `server.demo_page` on: the page (`200`), `405` for another method, `429`
/// over the per-IP limit (the request was counted like every other).
pub(super) fn page(req: &Request, rate: RateDecision) -> Response {
    if let RateDecision::Deny { retry_after_secs } = rate {
        return too_many(retry_after_secs);
    }
    if req.method != "GET" {
        return Response::text(405, "method not allowed\n").with_header("Allow", "GET");
    }
    let mut resp = Response::empty(200);
    resp.body = PAGE_HTML.as_bytes().to_vec();
    resp.with_header("Content-Type", "text/html; charset=utf-8")
        .with_header("Content-Security-Policy", PAGE_CSP)
        .with_header("X-Content-Type-Options", "nosniff")
        .with_header("Referrer-Policy", "no-referrer")
}

/// `POST /v1/demo-token` in the embedded demo (the caller checked that
/// [`Shared::demo_key`] is set): `200 {"token":..,"expires_in":600,"symbols":[..]}`
/// (`symbols`: the simulator's), after the per-IP limit (`429`), the `Origin` allow-list
/// (`403`, no CORS headers) and the method (`405`, `Allow: POST`).
pub(super) fn token(
    shared: &Shared,
    auth: &AuthState,
    req: &Request,
    rate: RateDecision,
    now_ms: u64,
    audit: &Audit<'_>,
) -> Outcome {
    let Some(key) = shared.demo_key.as_ref() else {
        return Outcome::Respond(not_found(rate));
    };
    let origin_header = req.header("origin");
    let decision = auth.origins.check(origin_header);
    let cors = |r: Response| cors_answer(r, cors_origin(decision, origin_header));
    if let RateDecision::Deny { retry_after_secs } = rate {
        return audit.reject(cors(too_many(retry_after_secs)), Reason::RateLimited, None, None);
    }
    if decision == OriginDecision::Rejected {
        return audit.reject(
            cors(Response::text(403, "origin not allowed\n")),
            Reason::Origin,
            None,
            None,
        );
    }
    if req.method != "POST" {
        return audit.reject(
            cors(Response::text(405, "method not allowed\n").with_header("Allow", "POST")),
            Reason::Method,
            None,
            None,
        );
    }
    let token = mint::demo_token(key, DemoHolder::Page, now_ms / 1000);
    let body = serde_json::json!({
        "token": token,
        "expires_in": mint::DEMO_TOKEN_TTL_SECS,
        "symbols": shared.cfg.feed.simulator_symbols,
    });
    audit.log(LogOutcome::Accepted, Reason::Ok, None, 200, Some(&token));
    Outcome::Respond(cors(Response::json(200, body.to_string().as_bytes())))
}

#[cfg(test)]
mod tests {
    //! Routing of `/` and `/v1/demo-token` in and out of the demo, on parsed requests and
    //! a virtual `now`: no socket.

    use super::*;
    use crate::auth::jwt::{Role, Verifier, VerifyPolicy};
    use crate::config::Config;
    use crate::gate::testkit::{GateWorld, header};

    const T0: u64 = 1_800_000_000_000;
    const SELF: &str = "http://127.0.0.1:8080";

    type World = GateWorld;

    /// The embedded demo's configuration (`demo`: with its key) or a production one with
    /// `server.demo_page` as given.
    fn world(demo: bool, page: bool, tweak: impl FnOnce(&mut Config)) -> World {
        let mut cfg = if demo {
            crate::rt::serve::demo_config()
        } else {
            Config::default_production()
        };
        cfg.server.demo_page = page;
        cfg.auth.allowed_origins = vec![SELF.into()];
        cfg.auth.allow_missing_origin = true;
        tweak(&mut cfg);
        GateWorld::new(cfg, mint::DEMO_KID, demo)
    }

    fn get(path: &str) -> String {
        format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")
    }

    fn post(path: &str, extra: &str) -> String {
        format!("POST {path} HTTP/1.1\r\nHost: x\r\n{extra}Content-Length: 0\r\n\r\n")
    }

    #[test]
    fn the_page_is_served_only_when_configured() {
        let w = world(true, true, |_| {});
        let r = w.send(&get("/"), T0);
        assert_eq!(r.status, 200);
        assert_eq!(header(&r, "content-type"), Some("text/html; charset=utf-8"));
        assert_eq!(header(&r, "content-security-policy"), Some(PAGE_CSP));
        assert_eq!(r.body, PAGE_HTML.as_bytes());
        assert!(String::from_utf8_lossy(&r.to_bytes()).contains("Cache-Control: no-store"));
        let r = w.send("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", T0);
        assert_eq!(r.status, 405);
        assert_eq!(header(&r, "allow"), Some("GET"));
        // Off (the production default): the path does not exist; in production too when on.
        assert_eq!(world(true, false, |_| {}).send(&get("/"), T0).status, 404);
        assert_eq!(world(false, false, |_| {}).send(&get("/"), T0).status, 404);
        assert_eq!(world(false, true, |_| {}).send(&get("/"), T0).status, 200);
        // Only `/` exactly.
        for p in ["//", "/index.html", "/?x=1"] {
            let status = w.send(&get(p), T0).status;
            assert_eq!(status, if p == "/?x=1" { 200 } else { 404 }, "{p}");
        }
    }

    #[test]
    fn the_page_is_self_contained() {
        // No external resource: nothing for a CDN to serve, nothing to build.
        for needle in ["http://", "https://", "src=", "@import"] {
            assert!(!PAGE_HTML.contains(needle), "{needle}");
        }
        for needle in [
            "id=\"state\"",
            "/v1/demo-token",
            "/v1/ticket",
            "?ticket=",
            "reauth",
        ] {
            assert!(PAGE_HTML.contains(needle), "{needle}");
        }
    }

    #[test]
    fn demo_token_exists_only_in_the_demo() {
        let w = world(false, true, |_| {});
        let r = w.send(&post("/v1/demo-token", ""), T0);
        assert_eq!(r.status, 404);
        assert!(header(&r, "vary").is_none());
        assert_eq!(w.shared.security.counters.get("demo_token", "accepted", "ok"), 0);
    }

    #[test]
    fn demo_token_mints_a_page_token_that_verifies_and_renews_the_same_session() {
        let w = world(true, true, |_| {});
        let r = w.send(&post("/v1/demo-token", &format!("Origin: {SELF}\r\n")), T0);
        assert_eq!(r.status, 200);
        assert_eq!(header(&r, "access-control-allow-origin"), Some(SELF));
        assert_eq!(header(&r, "vary"), Some("Origin"));
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["expires_in"], 600);
        assert_eq!(
            body["symbols"],
            serde_json::json!(["BTC-USD", "ETH-USD", "SOL-USD", "XRP-USD"])
        );
        let token = body["token"].as_str().unwrap();
        let claims = w.shared.verify_token(token, T0).unwrap();
        assert_eq!(claims.sub, "demo");
        assert_eq!(claims.sid.as_deref(), Some("demo-page"));
        assert_eq!(claims.exp, T0 / 1000 + 600);
        assert_eq!(claims.roles, vec![Role::Subscriber]);
        let line = w.last_log();
        assert!(line.contains("\"event\":\"demo_token\""), "{line}");
        assert!(line.contains("\"outcome\":\"accepted\""), "{line}");
        assert!(!line.contains(token), "{line}");
        // A later one: same identity, later expiry (what a reauth needs).
        let later = w.send(&post("/v1/demo-token", ""), T0 + 120_000);
        let body: serde_json::Value = serde_json::from_slice(&later.body).unwrap();
        let renewed = w
            .shared
            .verify_token(body["token"].as_str().unwrap(), T0 + 120_000)
            .unwrap();
        assert_eq!((renewed.sub, renewed.sid), (claims.sub, claims.sid));
        assert_eq!(renewed.exp, claims.exp + 120);
        // Signed with the demo's key under its kid, which the banner's token uses too.
        let v = Verifier::new(w.shared.auth().verifier.keys().clone(), VerifyPolicy::default());
        assert!(v.verify(token, T0 / 1000).is_ok());
    }

    #[test]
    fn demo_token_refusals() {
        let w = world(true, true, |_| {});
        let r = w.send(&post("/v1/demo-token", "Origin: https://evil.example\r\n"), T0);
        assert_eq!(r.status, 403);
        assert!(header(&r, "access-control-allow-origin").is_none());
        assert!(w.last_log().contains("\"reason\":\"origin\""));
        let r = w.send(&get("/v1/demo-token"), T0);
        assert_eq!(r.status, 405);
        assert_eq!(header(&r, "allow"), Some("POST"));
        assert!(w.last_log().contains("\"reason\":\"method\""));
        // Where a missing Origin is refused, so is a request without one.
        let w = world(true, true, |c| c.auth.allow_missing_origin = false);
        assert_eq!(w.send(&post("/v1/demo-token", ""), T0).status, 403);
    }

    #[test]
    fn page_and_demo_token_count_against_the_per_ip_limit() {
        let w = world(true, true, |c| {
            c.limits.per_ip_handshakes_per_sec = 1;
            c.limits.per_ip_burst = 2;
        });
        assert_eq!(w.send(&get("/"), T0).status, 200);
        assert_eq!(w.send(&post("/v1/demo-token", ""), T0).status, 200);
        let r = w.send(&post("/v1/demo-token", ""), T0);
        assert_eq!(r.status, 429);
        assert!(header(&r, "retry-after").is_some());
        assert!(w.last_log().contains("\"reason\":\"rate_limited\""));
        assert_eq!(w.send(&get("/"), T0).status, 429);
        assert_eq!(w.send(&get("/"), T0 + 1000).status, 200);
    }
}
