//! The HTTP/1.1 front door: a sans-IO request parser, request classification and the
//! WebSocket upgrade checks that come before any authentication (PROTOCOL.md sections 1-3).
//!
//! # Design
//!
//! Like tungstenite's handshake machine, parsing works on a byte slice the caller keeps
//! filling: [`try_parse`] answers `Ok(None)` ("need more bytes"), `Ok(Some((consumed,
//! request)))` once the head and the `Content-Length` body are complete, or an
//! [`HttpError`] as soon as the bytes can no longer become a valid request within
//! [`RequestLimits`]. It never reads a socket or a clock; the connection pump owns the
//! buffer and the handshake timeout. Bytes after `consumed` (pipelining, or WebSocket
//! frames a client sent early) are left to the caller.
//!
//! Everything is hostile input, so the parser is deliberately narrow:
//! - the head limit applies to incomplete input as well, so a slowloris feeding an endless
//!   header line is cut off at `max_head_bytes`, not when its line finally ends;
//! - no `Transfer-Encoding` at all (no chunked bodies: our bodies are tiny) and a single
//!   unambiguous `Content-Length`, which removes the classic request-smuggling ambiguity;
//! - singleton headers that security decisions read (`Host`, `Authorization`, `Origin`,
//!   `Sec-WebSocket-Key`, `Sec-WebSocket-Version`, `X-Device-Id`) and repeated query
//!   parameter names are rejected, so no two components can disagree on "which one counts";
//! - the path is kept raw (not percent-decoded, not normalised) and routed by exact match,
//!   so `/v1/%73tream` is a 404 rather than a second spelling of the stream endpoint;
//! - query values are percent-decoded but `+` stays `+`: tokens and tickets are base64url,
//!   and form-decoding would silently corrupt a standard-base64 value into a different one.
//!
//! The upgrade helpers ([`check_upgrade`], [`extract_credential`], [`select_subprotocol`])
//! implement only the *shape* checks of PROTOCOL.md section 2 step 1, the transport order
//! of tokens and step 7; verifying a token is the auth module's job. [`client_ip`] is the
//! pure trusted-proxy rule the rate limiter keys on.
//!
//! # Choices where the contract leaves room
//! - Every [`HttpError`] maps to `400`, including `Transfer-Encoding` (RFC 9112 would allow
//!   `501` for an unknown coding, but we reject even `chunked`, and one status for "we will
//!   not parse this" is simpler to monitor). The connection is closed after any error.
//! - An HTTP/1.0 upgrade request gets `400`: RFC 6455 section 4.1 requires HTTP/1.1, and
//!   `426` would invite a client that cannot speak `Upgrade` at all to retry.
//! - `Expect: 100-continue` is not answered; our only body-carrying endpoints take tiny or
//!   empty bodies, which clients send without waiting.
//!
//! # Layout
//! - `request`: limits, errors, [`Request`], [`try_parse`], query decoding.
//! - `response`: [`Response`] serialisation and the `101` answer.
//! - `upgrade`: routing, the upgrade shape checks, accept key, credentials, subprotocols.
//! - `client_ip`: `X-Forwarded-For` / `Forwarded` handling behind trusted proxies.

mod client_ip;
mod request;
mod response;
mod upgrade;

pub use client_ip::client_ip;
pub use request::{
    HttpError, HttpVersion, MAX_QUERY_PARAM_BYTES, MAX_QUERY_PARAMS, Request, RequestLimits, try_parse,
};
pub use response::{Response, reason_phrase, switching_protocols};
pub use upgrade::{
    Credential, Route, SUBPROTOCOL_JSON, Upgrade, accept_key, check_upgrade, extract_credential, route,
    select_subprotocol,
};
