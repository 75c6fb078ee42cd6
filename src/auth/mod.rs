//! Authentication and the gate's policies (PROTOCOL.md sections 2, 3, 4, 7 and 8).
//!
//! Every structure here is sans-IO: callers pass `now`, nothing reads a clock. The shared
//! ones (rate limiter, tickets, user caps, revocations, counters) are built on `DashMap` or
//! atomics, so a lookup locks one map shard, never a process-wide mutex.
//!
//! # Layout
//! - [`b64`]: the strict base64url engine (a leaf shared by `jwt`, `keys`, `mint`).
//! - [`ed25519`]: strict Ed25519 signature verification with per-key preparation.
//! - [`jwt`]: strict EdDSA (Ed25519) JWS verification producing `VerifiedClaims`, which
//!   only the verifier can construct.
//! - [`keys`]: key sets from SPKI PEM files and JWKS documents; a duplicate kid is an error.
//! - [`mint`]: key generation and token signing (`tickgate keygen` / `tickgate token`).
//! - [`origin`]: exact `scheme://host[:port]` allow-list with strict normalisation.
//! - [`cidr`]: IPv4/IPv6 prefixes (trusted proxies).
//! - [`ratelimit`]: per-IP handshake token bucket with a bounded table.
//! - [`tickets`]: one-time tickets for `POST /v1/ticket`.
//! - [`usercap`]: per-user concurrent connection cap with RAII slots.
//! - [`revocation`]: revoked `sub`/`sid`/`jti`, bounded and self-expiring.
//! - [`seclog`]: security event JSON lines and Prometheus counters.

pub mod b64;
pub mod cidr;
pub mod ed25519;
pub mod jwt;
pub mod keys;
pub mod mint;
pub mod origin;
pub mod ratelimit;
pub mod revocation;
pub mod seclog;
pub mod tickets;
pub mod usercap;
