//! Market data: symbols, entitlements, messages, the per-connection outbound queue, and the
//! cross-core fan-out.
//!
//! # Layout
//! - [`symbol`]: symbol syntax and the server-wide interning table (dense `SymbolId`s).
//! - [`entitlement`]: the token's `symbols` patterns compiled once per connection.
//! - [`json`]: JSON string escaping (a leaf shared by `msg` and `tick`).
//! - [`msg`]: client message parsing (simd-json, strict schema) and server message encoding.
//! - [`tick`]: the tick value and its hot-path JSON encoder.
//! - [`outbound`]: the bounded per-connection queue with conflation (slow consumers).
//! - [`history`]: the per-symbol ring of recent ticks that `since` replays (PROTOCOL.md 10).
//! - [`hub`]: stamping `seq`, encoding once, handing frames to the shards with subscribers.
//! - [`resume`]: the client's side of recovery (last `seq` per symbol, the resuming subscribe).
//! - [`sim`]: the tick simulator of the embedded demo.

pub mod entitlement;
pub mod history;
pub mod hub;
pub mod json;
pub mod msg;
pub mod outbound;
pub mod resume;
pub mod sim;
pub mod symbol;
pub mod tick;
