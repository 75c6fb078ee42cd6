//! The sans-IO parts of a shard that are larger than one connection.
//!
//! [`shard::ShardCore`] is one shard's connection table, subscription table, waiting table,
//! fan-out and timer bookkeeping as a plain struct: the runtime (`rt`) feeds it inputs with
//! the current time passed in (`handle_*(now, ..)`) and carries out the [`shard::Effect`]s
//! it asks for (wake a writer, shut a socket down, write a security-log line). It never
//! touches a socket, a thread, a clock or the io runtime, so its rules are tested without
//! sockets on a virtual clock (see `shard_tests.rs`).

pub mod shard;
