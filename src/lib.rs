//! # tickgate
//!
//! A market-data streaming server: clients connect over WebSocket, prove who they are with
//! short-lived Ed25519-signed tokens, subscribe to the symbols they are entitled to, and
//! receive every tick with the lowest latency the hardware allows.
//!
//! ## Design in one paragraph
//!
//! Thread-per-core: one monoio runtime per core on the io_uring driver, each on a pinned
//! thread with its own `SO_REUSEPORT` listener, owning its connections outright. Everything
//! that decides anything is sans-IO: the HTTP upgrade parser, the RFC 6455 codec, the token
//! verifier, the gate's policies, the session state machine, the outbound queue, the timer
//! wheel and the shard core (a shard's connection and subscription tables, fan-out and
//! deadlines) are plain data structures driven with the current time passed in, tested
//! without sockets on a virtual clock. The runtime layer (`rt`) only moves bytes between
//! sockets and those structures, reads the clock, and carries out the effects they ask for. A published tick is stamped and encoded into a WebSocket
//! frame exactly once, then handed through lock-free queues to the shards that have
//! subscribers, which append the same bytes to each subscriber's queue and write each
//! connection's queue with one write per loop turn.
//!
//! ## Layout
//!
//! Module dependencies form no cycle (at the level of top-level modules and their public
//! submodules), and only `rt` (plus `main.rs`) owns sockets or starts threads: both are
//! checked by `tests/layout.rs` (`cargo test --test layout`), which prints any cycle or
//! offender it finds.
//!
//! - `main.rs` / [`cli`]: argument parsing and printing for `serve`, `keygen`, `token`,
//!   `check-config`, `doctor`, `client`; the work is elsewhere (`serve` is [`rt::serve`]).
//! - [`config`]: the TOML configuration of OPS.md, defaults, env/flag overrides, validation.
//! - [`proto`]: wire formats, sans-IO. `http` (bounded request parser, upgrade checks,
//!   credentials, responses), `frame` (RFC 6455 codec), `mask`, `utf8` (incremental
//!   validation), `close` (close codes), `deflate` (permessage-deflate, RFC 7692: the
//!   `Sec-WebSocket-Extensions` negotiation, the compressor, the bounded inflater; a leaf
//!   that `frame` uses).
//! - [`auth`]: `jwt` (EdDSA verification producing [`auth::jwt::VerifiedClaims`], which only
//!   the verifier can construct), `keys` (key sets from PEM/JWKS), `b64` (the strict
//!   base64url engine `jwt`, `keys` and `mint` share), `mint` (keygen, signing), `origin`,
//!   `cidr`, `ratelimit` (per-IP token buckets), `tickets` (one-time tickets), `usercap`
//!   (per-user connection cap with RAII slots), `revocation`, `seclog`.
//! - [`gate`]: the single seam from a parsed request to "upgrade" or "reject with status"
//!   (and the CORS answers of `/v1/ticket`); `gate::demo`: the live demo page (`GET /`,
//!   `server.demo_page`, the HTML compiled in from `gate/demo.html`) and the embedded
//!   demo's `POST /v1/demo-token`.
//! - [`session`]: one connection's state machine after the `101`: `handle_*(now, ..)` in,
//!   frames and [`session::Event`]s out.
//! - [`feed`]: `symbol` (syntax, interning), `entitlement` (compiled patterns), `json` (JSON
//!   string escaping, a leaf shared by `msg` and `tick`), `msg` (client messages, server
//!   message encoding), `tick`, `outbound` (bounded queue with conflation), `hub`
//!   (cross-core fan-out), `history` (per-symbol ring of encoded ticks that `since`
//!   replays), `resume` (the client's side of recovery: last `seq` per symbol, the resuming
//!   `subscribe`), `sim` (the simulator's random walk, one batch per `step(ts)`).
//! - [`timer`]: the hierarchical timer wheel (u64 millisecond ticks, never reads a clock),
//!   `deadlines` (a connection's deadlines behind one wheel entry) and `pace` (the loop's
//!   pacing rules: feeds first every so often, busy polling).
//! - [`core`]: `shard`, one shard's decisions, sans-IO: the connection table (slab index +
//!   generation) with each connection's session, decoder and deadlines; the subscription
//!   table and the waiting table; the fan-out of a tick with `seq`-gap detection; applying
//!   session [`session::Event`]s; revoke and drain; firing deadlines. `handle_*(now, ..)`
//!   in, [`core::shard::Effect`]s out (`Kick`, `Shutdown`, `Audit`, `StopAccepting`).
//! - [`tls`]: the `[tls]` certificate as a swappable rustls `ServerConfig` (reloaded on
//!   SIGHUP and by `rt::tls_watch`); the connection pump drives rustls sans-IO.
//! - [`admin`]: the admin listener's decisions, sans-IO: the connection registry
//!   (admission, eviction), [`admin::route`] (a request in; a response, or a revocation for
//!   `rt::admin` to carry out, out).
//! - [`bus`]: `[cluster]`'s sans-IO half: subject and stream names, the ingest parser,
//!   the per-symbol sequencer and reorder buffer, the reconnect backoff; `names` (the
//!   `[cluster]` keys' syntax, a leaf the configuration uses).
//! - [`state`]: what all shards share ([`state::Shared`], in named parts: `cfg`, `auth`
//!   ([`state::AuthParts`]: the reloadable keys, policy and allow-lists, the rate limiter,
//!   the user caps), `tickets`, `revocation`, `security` ([`state::SecurityParts`]: the
//!   log and its counters), `metrics`, `hub`, `node` ([`state::NodeParts`]: drain state,
//!   session limits), `tls`), and the one clock (`clock`, read through [`state::Shared::now_ms`]:
//!   Unix milliseconds advanced by a monotonic clock).
//! - [`metrics`]; [`doctor`]: host checks (what the jitter probe's gaps mean).
//! - [`rt`]: the only code with sockets and threads: bootstrap and acceptor (`mod.rs`), the
//!   shard's tasks (`shard`: dispatcher, ticker), its runtime state (`ctx`: the core behind
//!   a `RefCell`, read buffers, write-buffer pool, latency sampler), the connection pump
//!   (`conn`: HTTP phase, reader, writer, carrying out the core's effects), socket-level
//!   helpers (`io`), reauth verifier threads (`verify`), `serve` (building [`state::Shared`]
//!   from the config, starting, SIGHUP reload, SIGTERM drain), `admin` (the admin
//!   listener's acceptor and request threads), `bus` (the `[cluster]` thread: `async-nats`
//!   on a small tokio runtime, bridged to the shards through the hub), `tls_watch` (the certificate watcher thread), `sim` (the
//!   simulator thread), `jitter` (doctor's probe threads), `client` (the demo client).
//!
//! Clocks are read in `rt` (deadlines of blocking sockets, pacing, the shard's `now`),
//! in [`state::Shared::now_ms`] (the one clock everything with a `now` argument is fed
//! from), in [`metrics`] (the monotonic nanosecond stamp of latency samples) and in
//! [`cli::unix_now`] (`tickgate token`, the demo banner, the tools). Everything else takes
//! `now` as an argument.

pub mod admin;
pub mod auth;
pub mod bus;
pub mod cli;
pub mod config;
pub mod core;
pub mod doctor;
pub mod feed;
pub mod gate;
pub mod metrics;
pub mod proto;
pub mod rt;
pub mod session;
pub mod state;
pub mod timer;
pub mod tls;
