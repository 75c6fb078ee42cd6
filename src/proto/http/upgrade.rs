//! Routing and the parts of the WebSocket handshake that need no keys or state: the
//! request shape (PROTOCOL.md section 2 step 1), the accept key, where a credential was
//! sent, and subprotocol selection (step 7). Authentication decisions live in `auth`.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

use super::{HttpVersion, Request, Response};

/// The one subprotocol we speak.
pub const SUBPROTOCOL_JSON: &str = "md.v1.json";

/// RFC 6455 section 1.3.
const WEBSOCKET_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Prefix of a `Sec-WebSocket-Protocol` entry that carries a token (browsers cannot set
/// `Authorization` on a WebSocket).
const BEARER_PROTOCOL_PREFIX: &str = "bearer.";

/// What a path is, by exact match (no decoding, no trailing-slash folding).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Stream,
    Ticket,
    Healthz,
    Readyz,
    Metrics,
    AdminRevoke,
    /// `/`: the demo page (`server.demo_page`).
    Page,
    /// `/v1/demo-token`: the embedded demo's token for its page.
    DemoToken,
    NotFound,
}

pub fn route(path: &str) -> Route {
    match path {
        "/v1/stream" => Route::Stream,
        "/v1/ticket" => Route::Ticket,
        "/healthz" => Route::Healthz,
        "/readyz" => Route::Readyz,
        "/metrics" => Route::Metrics,
        "/admin/revoke" => Route::AdminRevoke,
        "/" => Route::Page,
        "/v1/demo-token" => Route::DemoToken,
        _ => Route::NotFound,
    }
}

/// A request that has the shape of a WebSocket upgrade; not yet authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgrade {
    pub key: String,
    /// `Sec-WebSocket-Accept` value for `key`.
    pub accept: String,
    /// `Sec-WebSocket-Protocol` entries over all header lines, trimmed, empties dropped.
    pub offered_protocols: Vec<String>,
    pub origin: Option<String>,
}

/// Checks the shape of a `GET /v1/stream` upgrade, in the contract's order, and returns
/// the response to send when it is wrong:
/// method not `GET`: `405` + `Allow: GET`; HTTP/1.0: `400` (RFC 6455 needs 1.1, see the
/// module docs); no `Upgrade: websocket` + `Connection: Upgrade` pair: `426` + those
/// headers; `Sec-WebSocket-Version` missing or not `13`: `426` + `Sec-WebSocket-Version: 13`;
/// `Sec-WebSocket-Key` not the base64 of exactly 16 bytes: `400`.
pub fn check_upgrade(req: &Request) -> Result<Upgrade, Response> {
    if req.method != "GET" {
        return Err(Response::new(405).with_header("Allow", "GET"));
    }
    if req.version() != HttpVersion::Http11 {
        return Err(Response::new(400));
    }
    let upgrade_ok = has_token(req, "upgrade", "websocket");
    let connection_ok = has_token(req, "connection", "upgrade");
    if !upgrade_ok || !connection_ok {
        return Err(Response::new(426)
            .with_header("Upgrade", "websocket")
            .with_header("Connection", "Upgrade"));
    }
    // Singleton headers were made unique by the parser, so `header` is unambiguous here.
    if req.header("sec-websocket-version") != Some("13") {
        return Err(Response::new(426).with_header("Sec-WebSocket-Version", "13"));
    }
    let key = match req.header("sec-websocket-key") {
        Some(k) if is_valid_key(k) => k,
        _ => return Err(Response::new(400)),
    };
    Ok(Upgrade {
        key: key.to_owned(),
        accept: accept_key(key),
        offered_protocols: list_elements(req, "sec-websocket-protocol")
            .map(str::to_owned)
            .collect(),
        origin: req.header("origin").map(str::to_owned),
    })
}

/// `Sec-WebSocket-Accept` for a client key (RFC 6455 section 4.2.2).
pub fn accept_key(key: &str) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key.as_bytes());
    ctx.update(WEBSOCKET_GUID.as_bytes());
    STANDARD.encode(ctx.finish().as_ref())
}

/// Where the client put its credential; verifying it is not this module's job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    Bearer(String),
    Ticket(String),
    None,
}

/// The first credential found in the contract's order: `Authorization: Bearer` (scheme
/// case-insensitive), a `bearer.<jwt>` subprotocol entry, `?access_token=` (only when
/// `allow_query_token`), `?ticket=`. An empty token counts as absent, as does an
/// `Authorization` header with another scheme.
pub fn extract_credential(
    req: &Request,
    offered_protocols: &[String],
    allow_query_token: bool,
) -> Credential {
    if let Some(token) = req.header("authorization").and_then(bearer_token) {
        return Credential::Bearer(token.to_owned());
    }
    if let Some(token) = offered_protocols
        .iter()
        .filter_map(|p| p.strip_prefix(BEARER_PROTOCOL_PREFIX))
        .find(|t| !t.is_empty())
    {
        return Credential::Bearer(token.to_owned());
    }
    if allow_query_token && let Some(token) = req.query_param("access_token").filter(|t| !t.is_empty()) {
        return Credential::Bearer(token.to_owned());
    }
    if let Some(ticket) = req.query_param("ticket").filter(|t| !t.is_empty()) {
        return Credential::Ticket(ticket.to_owned());
    }
    Credential::None
}

/// Step 7. No offer: `Ok(None)` (no header in the `101`, `md.v1.json` semantics). An offer:
/// `md.v1.json` when it is among the entries that are not `bearer.` tokens, else `Err(())`
/// for a `400`. A `bearer.` entry is never selected, so a token is never echoed back.
// The unit error is the contract's API: there is exactly one way to fail and the caller
// maps it straight to `400`.
#[allow(clippy::result_unit_err)]
pub fn select_subprotocol(offered: &[String]) -> Result<Option<&'static str>, ()> {
    if offered.is_empty() {
        return Ok(None);
    }
    if offered
        .iter()
        .filter(|p| !p.starts_with(BEARER_PROTOCOL_PREFIX))
        .any(|p| p == SUBPROTOCOL_JSON)
    {
        Ok(Some(SUBPROTOCOL_JSON))
    } else {
        Err(())
    }
}

/// The token of `Bearer <token>`: scheme case-insensitive (RFC 9110 section 11.1), one or
/// more spaces, a non-empty token with no spaces inside.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, rest) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = rest.trim_start_matches(' ');
    (!token.is_empty() && !token.contains([' ', '\t'])).then_some(token)
}

/// RFC 6455 section 4.2.1 item 5: base64 of exactly 16 bytes, so 24 characters.
fn is_valid_key(key: &str) -> bool {
    key.len() == 24
        && STANDARD
            .decode(key)
            .map(|bytes| bytes.len() == 16)
            .unwrap_or(false)
}

/// Elements of a comma-separated list header over all its lines, trimmed, empties dropped
/// (RFC 9110 section 5.6.1).
fn list_elements<'a>(req: &'a Request, name: &'a str) -> impl Iterator<Item = &'a str> {
    req.headers_all(name)
        .flat_map(|v| v.split(','))
        .map(|e| e.trim_matches([' ', '\t']))
        .filter(|e| !e.is_empty())
}

fn has_token(req: &Request, name: &str, token: &str) -> bool {
    list_elements(req, name).any(|e| e.eq_ignore_ascii_case(token))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::http::{RequestLimits, try_parse};
    use proptest::prelude::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn req(raw: &str) -> Request {
        try_parse(raw.as_bytes(), &RequestLimits::default())
            .unwrap()
            .unwrap()
            .1
    }

    fn upgrade_with(extra: &str) -> Request {
        req(&format!(
            "GET /v1/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n{extra}\r\n"
        ))
    }

    fn header<'a>(r: &'a Response, name: &str) -> Option<&'a str> {
        r.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn rfc6455_accept_vector() {
        assert_eq!(accept_key(KEY), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn routes() {
        assert_eq!(route("/v1/stream"), Route::Stream);
        assert_eq!(route("/v1/ticket"), Route::Ticket);
        assert_eq!(route("/healthz"), Route::Healthz);
        assert_eq!(route("/readyz"), Route::Readyz);
        assert_eq!(route("/metrics"), Route::Metrics);
        assert_eq!(route("/admin/revoke"), Route::AdminRevoke);
        assert_eq!(route("/"), Route::Page);
        assert_eq!(route("/v1/demo-token"), Route::DemoToken);
        for p in [
            "//",
            "/index.html",
            "/v1/demo-token/",
            "/v1/stream/",
            "/v1/%73tream",
            "/V1/STREAM",
            "//v1/stream",
            "",
        ] {
            assert_eq!(route(p), Route::NotFound, "{p}");
        }
    }

    #[test]
    fn valid_upgrade() {
        let u = check_upgrade(&upgrade_with(
            "Origin: https://app.example.com\r\nSec-WebSocket-Protocol: md.v1.json, bearer.abc\r\nSec-WebSocket-Protocol:  x ,, y\r\n",
        ))
        .unwrap();
        assert_eq!(u.key, KEY);
        assert_eq!(u.accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert_eq!(u.origin.as_deref(), Some("https://app.example.com"));
        assert_eq!(u.offered_protocols, ["md.v1.json", "bearer.abc", "x", "y"]);
        let u = check_upgrade(&upgrade_with("")).unwrap();
        assert!(u.offered_protocols.is_empty());
        assert_eq!(u.origin, None);
    }

    #[test]
    fn token_lists_and_case() {
        let r = req(&format!(
            "GET /v1/stream HTTP/1.1\r\nHost: x\r\nUpgrade: h2c, WebSocket\r\n\
             Connection: keep-alive\r\nConnection: keep-alive, UPGRADE\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n\r\n"
        ));
        assert!(check_upgrade(&r).is_ok());
    }

    #[test]
    fn method_405() {
        let r = req(&format!(
            "POST /v1/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n\r\n"
        ));
        let e = check_upgrade(&r).unwrap_err();
        assert_eq!(e.status, 405);
        assert_eq!(header(&e, "allow"), Some("GET"));
        // Method names are case-sensitive.
        let r = req("get /v1/stream HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(check_upgrade(&r).unwrap_err().status, 405);
    }

    #[test]
    fn http10_400() {
        let r = req(&format!(
            "GET /v1/stream HTTP/1.0\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n\r\n"
        ));
        assert_eq!(check_upgrade(&r).unwrap_err().status, 400);
    }

    #[test]
    fn missing_upgrade_pair_426() {
        let cases = [
            "Connection: Upgrade\r\n",
            "Upgrade: websocket\r\n",
            "Upgrade: websocket\r\nConnection: keep-alive\r\n",
            "Upgrade: websockets\r\nConnection: Upgrade\r\n",
            "Upgrade: websocket/13x\r\nConnection: Upgrade\r\n",
            "Upgrade: websocket\r\nConnection: Upgraded\r\n",
            "Upgrade: h2c\r\nConnection: Upgrade\r\n",
            "",
        ];
        for c in cases {
            let r = req(&format!(
                "GET /v1/stream HTTP/1.1\r\nHost: x\r\n{c}Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n\r\n"
            ));
            let e = check_upgrade(&r).unwrap_err();
            assert_eq!(e.status, 426, "{c:?}");
            assert_eq!(header(&e, "upgrade"), Some("websocket"));
            assert_eq!(header(&e, "connection"), Some("Upgrade"));
        }
    }

    #[test]
    fn version_426() {
        for v in [
            "",
            "Sec-WebSocket-Version: 8\r\n",
            "Sec-WebSocket-Version: 13, 8\r\n",
            "Sec-WebSocket-Version: 013\r\n",
        ] {
            let r = req(&format!(
                "GET /v1/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n{v}Sec-WebSocket-Key: {KEY}\r\n\r\n"
            ));
            let e = check_upgrade(&r).unwrap_err();
            assert_eq!(e.status, 426, "{v:?}");
            assert_eq!(header(&e, "sec-websocket-version"), Some("13"));
        }
    }

    #[test]
    fn bad_key_400() {
        for k in [
            "",
            "Sec-WebSocket-Key: \r\n",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ\r\n", // unpadded
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=\r\n", // wrong padding
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZR==\r\n", // non-canonical trailing bits
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZXg=\r\n", // 17 bytes
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25j\r\n",   // 15 bytes
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==AAAA\r\n",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ-_\r\n", // base64url alphabet
            "Sec-WebSocket-Key: !!!!!!!!!!!!!!!!!!!!!!==\r\n",
        ] {
            let r = req(&format!(
                "GET /v1/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n{k}\r\n"
            ));
            assert_eq!(check_upgrade(&r).unwrap_err().status, 400, "{k:?}");
        }
    }

    #[test]
    fn check_order_follows_contract() {
        // Wrong method and everything else wrong: 405 first.
        let r = req("PUT /v1/stream HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(check_upgrade(&r).unwrap_err().status, 405);
        // No upgrade pair and bad version: 426 for the pair (with its headers).
        let r = req("GET /v1/stream HTTP/1.1\r\nHost: x\r\nSec-WebSocket-Version: 8\r\n\r\n");
        let e = check_upgrade(&r).unwrap_err();
        assert_eq!(header(&e, "upgrade"), Some("websocket"));
        // Bad version and bad key: the version's 426.
        let r = req(
            "GET /v1/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 8\r\n\r\n",
        );
        assert_eq!(check_upgrade(&r).unwrap_err().status, 426);
    }

    #[test]
    fn rejection_bodies_leak_nothing() {
        let r = req("GET /v1/stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer secret.jwt.value\r\n\r\n");
        let bytes = check_upgrade(&r).unwrap_err().to_bytes();
        assert!(!String::from_utf8_lossy(&bytes).contains("secret"));
    }

    #[test]
    fn credential_order() {
        let protos = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let all = req(
            "GET /v1/stream?access_token=q.jwt&ticket=tk HTTP/1.1\r\nHost: x\r\nAuthorization: bEaReR   h.jwt\r\n\r\n",
        );
        let p = protos(&["md.v1.json", "bearer.p.jwt"]);
        assert_eq!(
            extract_credential(&all, &p, true),
            Credential::Bearer("h.jwt".into())
        );

        let no_auth = req("GET /v1/stream?access_token=q.jwt&ticket=tk HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(
            extract_credential(&no_auth, &p, true),
            Credential::Bearer("p.jwt".into())
        );
        assert_eq!(
            extract_credential(&no_auth, &[], true),
            Credential::Bearer("q.jwt".into())
        );
        assert_eq!(
            extract_credential(&no_auth, &[], false),
            Credential::Ticket("tk".into())
        );

        let none = req("GET /v1/stream HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(extract_credential(&none, &[], true), Credential::None);
        // `access_token` disabled and no ticket: nothing.
        let q = req("GET /v1/stream?access_token=q.jwt HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(extract_credential(&q, &[], false), Credential::None);
        // Query `+` is kept (base64 / base64url tokens are not form-encoded).
        let plus = req("GET /?access_token=a+b%2Bc HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(
            extract_credential(&plus, &[], true),
            Credential::Bearer("a+b+c".into())
        );
    }

    #[test]
    fn credential_edge_cases() {
        let with_auth = |v: &str| {
            req(&format!(
                "GET /?ticket=tk HTTP/1.1\r\nHost: x\r\nAuthorization: {v}\r\n\r\n"
            ))
        };
        // Other schemes and empty tokens fall through to the next transport.
        for v in [
            "Basic dXNlcjpwdw==",
            "Bearer",
            "Bearer ",
            "Bearerx abc",
            "Bearer a b",
            "bearer\tabc",
        ] {
            assert_eq!(
                extract_credential(&with_auth(v), &[], true),
                Credential::Ticket("tk".into()),
                "{v:?}"
            );
        }
        let empty_proto = vec!["bearer.".to_string(), "Bearer.x".to_string()];
        let r = req("GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(extract_credential(&r, &empty_proto, true), Credential::None);
        let r = req("GET /?access_token=&ticket= HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(extract_credential(&r, &[], true), Credential::None);
    }

    #[test]
    fn subprotocol_selection() {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(select_subprotocol(&[]), Ok(None));
        assert_eq!(select_subprotocol(&s(&["md.v1.json"])), Ok(Some("md.v1.json")));
        assert_eq!(
            select_subprotocol(&s(&["bearer.abc", "md.v1.json"])),
            Ok(Some("md.v1.json"))
        );
        assert_eq!(
            select_subprotocol(&s(&["x", "md.v1.json", "y"])),
            Ok(Some("md.v1.json"))
        );
        assert_eq!(select_subprotocol(&s(&["bearer.abc"])), Err(()));
        assert_eq!(select_subprotocol(&s(&["bearer.md.v1.json"])), Err(()));
        assert_eq!(select_subprotocol(&s(&["MD.V1.JSON"])), Err(()));
        assert_eq!(select_subprotocol(&s(&["chat"])), Err(()));
    }

    #[test]
    fn end_to_end_handshake_bytes() {
        let r = upgrade_with("Sec-WebSocket-Protocol: md.v1.json, bearer.t\r\n");
        let u = check_upgrade(&r).unwrap();
        let p = select_subprotocol(&u.offered_protocols).unwrap();
        let out = String::from_utf8(crate::proto::http::switching_protocols(&u.accept, p, None)).unwrap();
        assert!(out.contains("Sec-WebSocket-Protocol: md.v1.json\r\n"));
        assert!(!out.contains("bearer"));
    }

    proptest! {
        #[test]
        fn selected_protocol_is_never_a_token(offered in proptest::collection::vec("(bearer\\.)?[a-z.0-9]{0,12}", 0..6)) {
            if let Ok(Some(p)) = select_subprotocol(&offered) {
                prop_assert_eq!(p, SUBPROTOCOL_JSON);
                prop_assert!(offered.iter().any(|o| o == SUBPROTOCOL_JSON));
            }
        }

        #[test]
        fn random_16_byte_keys_are_accepted(bytes in proptest::array::uniform16(any::<u8>())) {
            let key = STANDARD.encode(bytes);
            prop_assert!(is_valid_key(&key));
        }
    }
}
