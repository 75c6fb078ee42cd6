//! Revocations across nodes (PROTOCOL.md section 7: "in a multi-node deployment the
//! revocation reaches every node").
//!
//! # Design
//!
//! Nodes share their key sets (that is what makes a token good on any of them), so a
//! node can relay the operator's own request: a revocation accepted on one node's admin
//! listener is POSTed, with the same admin bearer token and body, to every node in
//! `admin.peers`, marked with the [`RELAY_HEADER`] so the peer applies it locally and
//! does not relay it again (no loops, no storms, whatever the peer lists say). Each peer
//! checks the token itself: relaying grants nothing a direct request would not.
//!
//! Delivery is at-least-once per peer: each peer has one worker thread and a bounded
//! queue ([`QUEUE_PER_PEER`]); the worker retries each revocation with [`backoff`] until
//! the peer answers. Revoking twice is harmless (the revocation list
//! keeps one entry, and nothing is left to close). It gives up when the peer refuses
//! with a 4xx (a bad request or a token it does not accept: retrying cannot help), or
//! when the admin token expires, leeway included (every peer would refuse it from then
//! on). A full queue (a peer down through thousands of revocations) refuses the new one,
//! logged and reported. Operators see
//! each outcome in the security log (`event: "revoke_relay"`) and in the counters.
//!
//! The admin response waits for the peers for a moment (so `closed` counts what the
//! peers closed too) and says how many answered; the rest keep retrying in the
//! background.
//!
//! This module is the sans-IO half: the parts with decisions in them, [`check_peer`],
//! [`backoff`], [`request_bytes`] and [`classify`], are plain functions with unit tests.
//! `rt::relay::Relay` wires them to blocking sockets and worker threads on the admin
//! side, far from the shards.

use std::time::Duration;

use crate::auth::seclog::Reason;

/// Peers in `admin.peers`, at most.
pub const MAX_PEERS: usize = 64;
/// Marks a relayed revocation: apply it, do not relay it again.
pub const RELAY_HEADER: &str = "x-tickgate-relay";
/// A peer's answer is read up to this size.
pub const MAX_RESPONSE: usize = 16 * 1024;
/// Connecting to a peer, writing to it, and reading its whole answer: each within this.
pub const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Revocations waiting for one peer, at most.
pub const QUEUE_PER_PEER: usize = 4096;

/// Checks one `admin.peers` entry: `host:port`, no scheme, no path.
pub fn check_peer(p: &str) -> Result<(), String> {
    let Some((host, port)) = p.rsplit_once(':') else {
        return Err(format!("{p:?} is not host:port"));
    };
    // IPv6 literals in brackets, as in URLs: "::1:9090" is ambiguous and refused.
    let (host, bracketed) = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(h) => (h, true),
        None => (host, false),
    };
    if host.is_empty()
        || host.contains(['/', '@', ' ', '?', '#', '[', ']'])
        || (host.contains(':') && (!bracketed || host.parse::<std::net::Ipv6Addr>().is_err()))
    {
        return Err(format!("{p:?} is not host:port (no scheme or path)"));
    }
    match port.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("{p:?} has no valid port")),
        Ok(_) => Ok(()),
    }
}

/// Wait before attempt `n` (0-based): none, then 250 ms doubling to a 30 s ceiling.
pub fn backoff(attempt: u32) -> Duration {
    if attempt == 0 {
        return Duration::ZERO;
    }
    let ms = 250u64.saturating_mul(1u64 << (attempt - 1).min(16));
    Duration::from_millis(ms.min(30_000))
}

/// The relayed request.
pub fn request_bytes(peer: &str, bearer: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "POST /admin/revoke HTTP/1.1\r\nHost: {peer}\r\nAuthorization: Bearer {bearer}\r\n\
         {RELAY_HEADER}: 1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// What a peer's answer means for the relay.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Applied there; it closed this many connections.
    Done { closed: u64 },
    /// Try again later (5xx, 429, a cut or garbled answer).
    Retry(Reason),
    /// Refused for good (4xx: bad request, token not accepted there).
    GiveUp(u16),
}

/// Classifies a peer's raw HTTP answer.
pub fn classify(raw: &[u8]) -> Outcome {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let body_at = match resp.parse(raw) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Outcome::Retry(Reason::Truncated),
        Err(_) => return Outcome::Retry(Reason::Garbled),
    };
    match resp.code {
        Some(200) => {
            let closed = serde_json::from_slice::<serde_json::Value>(&raw[body_at..])
                .ok()
                .and_then(|v| v.get("closed").and_then(|c| c.as_u64()));
            match closed {
                Some(closed) => Outcome::Done { closed },
                None => Outcome::Retry(Reason::Garbled),
            }
        }
        Some(429) => Outcome::Retry(Reason::Busy),
        Some(c) if (400..500).contains(&c) => Outcome::GiveUp(c),
        _ => Outcome::Retry(Reason::ServerError),
    }
}

/// What the admin response reports about the peers.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Peers that applied the revocation in time.
    pub reached: usize,
    /// Connections those peers closed.
    pub closed: u64,
    /// Peers that refused it (4xx), or whose relay queue was full: not retried.
    pub refused: usize,
    /// Peers still being retried in the background.
    pub pending: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_are_host_and_port() {
        for ok in [
            "10.0.0.2:9090",
            "node-b.internal:9090",
            "[::1]:9090",
            "localhost:1",
        ] {
            assert_eq!(check_peer(ok), Ok(()), "{ok}");
        }
        for bad in [
            "10.0.0.2",
            "http://10.0.0.2:9090",
            "10.0.0.2:9090/admin",
            ":9090",
            "10.0.0.2:0",
            "10.0.0.2:70000",
            "user@host:9090",
            "::1:9090",
            "",
        ] {
            assert!(check_peer(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn backoff_starts_at_once_and_is_capped() {
        let waits: Vec<u64> = (0..12).map(|n| backoff(n).as_millis() as u64).collect();
        assert_eq!(&waits[..6], &[0, 250, 500, 1000, 2000, 4000]);
        assert!(waits.iter().all(|&w| w <= 30_000));
        assert_eq!(backoff(u32::MAX), Duration::from_secs(30));
    }

    #[test]
    fn relayed_request_is_marked_and_sized() {
        let r = request_bytes("n2:9090", "tok", br#"{"sub":"a"}"#);
        let mut h = [httparse::EMPTY_HEADER; 16];
        let mut req = httparse::Request::new(&mut h);
        let n = match req.parse(&r).unwrap() {
            httparse::Status::Complete(n) => n,
            _ => panic!("incomplete"),
        };
        assert_eq!(req.method, Some("POST"));
        assert_eq!(req.path, Some("/admin/revoke"));
        let get = |k: &str| {
            req.headers
                .iter()
                .find(|x| x.name.eq_ignore_ascii_case(k))
                .map(|x| x.value.to_vec())
        };
        assert_eq!(get(RELAY_HEADER).as_deref(), Some(&b"1"[..]));
        assert_eq!(get("authorization").as_deref(), Some(&b"Bearer tok"[..]));
        assert_eq!(&r[n..], br#"{"sub":"a"}"#);
    }

    #[test]
    fn answers_are_classified() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n{\"closed\":3}";
        assert_eq!(classify(ok), Outcome::Done { closed: 3 });
        assert_eq!(
            classify(b"HTTP/1.1 401 Unauthorized\r\n\r\n"),
            Outcome::GiveUp(401)
        );
        assert_eq!(classify(b"HTTP/1.1 400 Bad\r\n\r\n"), Outcome::GiveUp(400));
        assert_eq!(
            classify(b"HTTP/1.1 429 Busy\r\n\r\n"),
            Outcome::Retry(Reason::Busy)
        );
        assert_eq!(
            classify(b"HTTP/1.1 503 Full\r\n\r\n"),
            Outcome::Retry(Reason::ServerError)
        );
        assert_eq!(
            classify(b"HTTP/1.1 200 OK\r\n"),
            Outcome::Retry(Reason::Truncated)
        );
        assert_eq!(classify(b""), Outcome::Retry(Reason::Truncated));
        assert_eq!(
            classify(b"\x00\x01garbage\r\n\r\n"),
            Outcome::Retry(Reason::Garbled)
        );
        assert_eq!(
            classify(b"HTTP/1.1 200 OK\r\n\r\nnot json"),
            Outcome::Retry(Reason::Garbled)
        );
    }
}
