//! CORS on `/v1/ticket` (docs/PROTOCOL.md section 4) on a real listener, in raw HTTP over a
//! `TcpStream`, as a browser's `fetch` from another origin sends it: the preflight
//! (`OPTIONS`), the `POST`, refusals for an Origin not on the list, the per-IP limit
//! counting preflights, and `OPTIONS` elsewhere unchanged.

mod common;

use common::*;

const APP: &str = "https://app.example.com";

/// The response head's fields, names lower-cased.
fn headers(resp: &str) -> Vec<(String, String)> {
    let head = resp.split("\r\n\r\n").next().unwrap_or("");
    head.lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect()
}

fn header(resp: &str, name: &str) -> Option<String> {
    headers(resp).into_iter().find(|(n, _)| n == name).map(|(_, v)| v)
}

fn no_cors(resp: &str) -> bool {
    !headers(resp)
        .iter()
        .any(|(n, _)| n.starts_with("access-control-"))
}

fn preflight(origin: &str) -> Vec<u8> {
    format!(
        "OPTIONS /v1/ticket HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: {origin}\r\nAccess-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: authorization\r\n\r\n"
    )
    .into_bytes()
}

fn post(origin: &str, token: &str) -> Vec<u8> {
    format!(
        "POST /v1/ticket HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: {origin}\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\n\r\n"
    )
    .into_bytes()
}

#[test]
fn allowed_origin_preflight_then_post_then_stream() {
    let srv = start(test_config(1));
    let r = raw(srv.addr(), &preflight(APP));
    assert_eq!(status_of(&r), 204, "{r}");
    assert_eq!(
        header(&r, "access-control-allow-origin").as_deref(),
        Some(APP),
        "{r}"
    );
    assert_eq!(
        header(&r, "access-control-allow-methods").as_deref(),
        Some("POST")
    );
    assert_eq!(
        header(&r, "access-control-allow-headers").as_deref(),
        Some("Authorization, Content-Type, X-Device-Id")
    );
    assert_eq!(header(&r, "access-control-max-age").as_deref(), Some("600"));
    assert_eq!(header(&r, "vary").as_deref(), Some("Origin"));
    assert_eq!(header(&r, "content-length"), None, "a 204 has no length: {r}");
    assert!(r.ends_with("\r\n\r\n"), "a 204 has no body: {r:?}");

    let r = raw(srv.addr(), &post(APP, &srv.token("alice")));
    assert_eq!(status_of(&r), 200, "{r}");
    assert_eq!(
        header(&r, "access-control-allow-origin").as_deref(),
        Some(APP),
        "{r}"
    );
    assert_eq!(header(&r, "vary").as_deref(), Some("Origin"));
    let body = r.split("\r\n\r\n").nth(1).unwrap();
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    let ticket = v["ticket"].as_str().unwrap();

    // The page then opens the stream with the ticket, from the same origin.
    let r = raw(
        srv.addr(),
        &upgrade_req(
            &format!("/v1/stream?ticket={ticket}"),
            &format!("Origin: {APP}\r\n"),
        ),
    );
    assert_eq!(status_of(&r), 101, "{r}");

    let log = srv.log_lines().join("\n");
    assert!(log.contains("\"reason\":\"preflight\""), "{log}");
    assert_eq!(
        srv.handle
            .shared
            .security
            .counters
            .get("ticket", "accepted", "ok"),
        1,
        "the preflight is not a ticket"
    );
}

#[test]
fn disallowed_origin_gets_403_without_cors_headers() {
    let srv = start(test_config(1));
    for origin in [
        "https://evil.example",
        "https://app.example.com.evil.example",
        "null",
    ] {
        let r = raw(srv.addr(), &preflight(origin));
        assert_eq!(status_of(&r), 403, "{origin}: {r}");
        assert!(no_cors(&r), "{origin}: {r}");
        let r = raw(srv.addr(), &post(origin, &srv.token("alice")));
        assert_eq!(status_of(&r), 403, "{origin}: {r}");
        assert!(no_cors(&r), "{origin}: {r}");
    }
    // A preflight that does not ask for POST: 400, no CORS headers.
    let r = raw(
        srv.addr(),
        format!("OPTIONS /v1/ticket HTTP/1.1\r\nHost: x\r\nOrigin: {APP}\r\n\r\n").as_bytes(),
    );
    assert_eq!(status_of(&r), 400, "{r}");
    assert!(no_cors(&r), "{r}");
}

#[test]
fn preflights_count_against_the_per_ip_limit() {
    let mut cfg = test_config(1);
    cfg.limits.per_ip_handshakes_per_sec = 1;
    cfg.limits.per_ip_burst = 3;
    let srv = start(cfg);
    // The bucket starts full and only preflights draw from it: the first three pass
    // whatever the time, and a 429 comes within a few more unless each of them took a
    // second (one token a second is all that comes back).
    let mut codes = Vec::new();
    let mut refused = None;
    for _ in 0..20 {
        let r = raw(srv.addr(), &preflight(APP));
        codes.push(status_of(&r));
        if status_of(&r) == 429 {
            refused = Some(r);
            break;
        }
    }
    assert_eq!(&codes[..3], &[204, 204, 204], "{codes:?}");
    let r = refused.unwrap_or_else(|| panic!("no 429 in {codes:?}"));
    assert!(header(&r, "retry-after").is_some(), "{r}");
    assert!(no_cors(&r), "{r}");
    let log = srv.log_lines().join("\n");
    assert!(
        log.contains("\"event\":\"ticket\",\"outcome\":\"rejected\",\"reason\":\"rate_limited\""),
        "{log}"
    );
}

#[test]
fn options_elsewhere_is_unchanged() {
    let srv = start(test_config(1));
    let cors = format!("Origin: {APP}\r\nAccess-Control-Request-Method: POST\r\n");
    let ask = |path: &str| {
        raw(
            srv.addr(),
            format!("OPTIONS {path} HTTP/1.1\r\nHost: x\r\n{cors}\r\n").as_bytes(),
        )
    };
    let r = ask("/v1/stream");
    assert_eq!(status_of(&r), 405, "{r}");
    assert_eq!(header(&r, "allow").as_deref(), Some("GET"));
    assert!(no_cors(&r), "{r}");
    for (path, want) in [
        ("/nope", 404),
        ("/v1/ticket/", 404),
        ("/healthz", 200),
        ("/readyz", 200),
    ] {
        let r = ask(path);
        assert_eq!(status_of(&r), want, "{path}: {r}");
        assert!(no_cors(&r), "{path}: {r}");
        assert_eq!(header(&r, "vary"), None, "{path}: {r}");
    }
}
