//! `loadgen`: the load generator for tickgate and the baseline (same wire protocol).
//!
//! Modes: `fanout` (end-to-end tick latency and delivery), `reauth` (fanout with short
//! tokens refreshed in-band), `handshake` (authenticated upgrade storm, optional invalid-token
//! flood), `idle` (memory per idle authenticated connection), `floor` (no server: the kernel's
//! latency floor for the same fan-out on this machine). Loopback only, every mode
//! bounded in count and time. See `perf/compare.sh` for the scenarios of issue 6.

mod common;
mod fanout;
mod floor;
mod handshake;
mod idle;
mod lean;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "loadgen", about = "Load generator for tickgate (and the baseline)")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand, Debug)]
enum Mode {
    /// N subscribers x K of S symbols, one publisher at R ticks/s (or the server's simulator).
    Fanout(fanout::FanoutArgs),
    /// Fanout with short-lived tokens answered in-band (`reauth_required` -> `reauth`).
    Reauth(fanout::FanoutArgs),
    /// A storm of authenticated upgrades (optionally with a concurrent invalid-token flood).
    Handshake(handshake::HandshakeArgs),
    /// N idle authenticated connections; RSS per connection of --server-pid.
    Idle(idle::IdleArgs),
    /// No server: the kernel's floor for a fan-out on this machine (ideal sender and
    /// receiver threads over loopback TCP, same scenario shape as `fanout`).
    Floor(floor::FloorArgs),
}

fn main() {
    let cli = Cli::parse();
    // The soft open-file limit up to the hard one (the server's own helper).
    let _ = tickgate::rt::raise_nofile();
    let code = match cli.mode {
        Mode::Fanout(a) => fanout::main(a, false),
        Mode::Reauth(a) => fanout::main(a, true),
        Mode::Handshake(a) => handshake::main(a),
        Mode::Idle(a) => idle::main(a),
        Mode::Floor(a) => floor::main(a),
    };
    std::process::exit(code);
}
