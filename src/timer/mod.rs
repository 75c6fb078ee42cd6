//! Deadlines for the whole server: a hierarchical timer wheel over `u64` ticks.
//!
//! Every connection carries a handful of deadlines (handshake timeout, heartbeat, idle
//! timeout, reauth deadline, slow-consumer grace), so a shard with 100,000 connections
//! holds several hundred thousand timers, nearly all of which are cancelled or re-armed
//! before they fire. A binary heap would pay `O(log n)` on every re-arm and cannot cancel
//! without a search; the wheel inserts and cancels in `O(1)` and expires in amortised
//! `O(1)` per timer, which is why Kafka, Netty, tokio and monoio all use one.
//!
//! The wheel is sans-IO like the rest of the protocol code: it never reads a clock. The
//! runtime passes `now` (milliseconds since its own epoch, one tick = 1 ms in the server)
//! to [`TimerWheel::advance`] and sleeps until [`TimerWheel::next_deadline`]. Tests drive it
//! on a virtual clock and jump straight to the next deadline, so a 15-minute token
//! lifetime is tested in microseconds.
//!
//! See [`wheel`] for the level layout, ordering guarantees and complexity. A connection
//! files only its earliest deadline in the wheel ([`deadlines`]).

pub mod deadlines;
pub mod pace;
pub mod wheel;

pub use deadlines::DeadlineSet;
pub use wheel::{TimerKey, TimerWheel};
