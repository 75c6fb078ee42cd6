//! `loadgen`: the load generator for tickgate and the baseline (same wire protocol).
//!
//! Modes: `fanout` (end-to-end tick latency and delivery), `reauth` (fanout with short
//! tokens refreshed in-band), `recover` (fanout while clients reconnect with `since`, or a
//! reconnect storm; gaps and duplicates checked end to end, see `perf/recovery.sh`),
//! `handshake` (authenticated upgrade storm, optional invalid-token flood), `idle` (memory
//! per idle authenticated connection), `floor` (no server: the kernel's latency floor for
//! the same fan-out on this machine), `abuse` (replays one of five denial-of-service
//! attacks while a watcher measures the server's service to others).
//! Loopback only, every mode bounded in count and time. See `perf/compare.sh` for the
//! scenarios of issue 6.
//!
//! ## Latency plots
//!
//! ```text
//! loadgen fanout ... --plot run.svg --save-hist run.hist     # also `floor`
//! loadgen plot --out latency.svg --series tickgate=tg.hist --series floor=floor.hist \
//!     [--title T] [--note "scenario, machine"]
//! ```
//!
//! `--plot` draws the run's latency by percentile distribution (HdrHistogram's classic
//! plot: x = percentile on a log scale of 1/(1-p), y = ms) as a self-contained SVG;
//! `--save-hist` keeps the histogram (HdrHistogram V2 encoding, base64) and `plot` draws several on one
//! SVG with a legend (`perf/compare.sh` does it for scenario (A)). Details in `plot.rs`.
//!
//! ## `abuse`: rerunning the denial-of-service attacks against any build
//!
//! ```text
//! loadgen abuse --attack head|pings|silent|admin|symbols --url ws://127.0.0.1:18080 \
//!     --admin 127.0.0.1:19090 --key keys/k1.key --kid k1 [--duration 10] [--server-pid PID] \
//!     [--watch-symbol BTC-USD] [--source 127.0.0.2] [--conns N] [--rounds 100] [--label L]
//! ```
//!
//! The attack runs from 127.0.0.1; a watcher on `--source` holds subscribers of the watch
//! symbol (3 s baseline, then during the attack), makes a fresh upgrade and a `/healthz`
//! every 500 ms, and with `--server-pid` samples the server's VmRSS. `head`: an endless
//! request head (expects 400/431 and a close); `pings`: a never-reading ping flood (expects
//! a bounded server and close 4008/4029 or a drop); `silent`: 2,100 idle TCP connections
//! (expects them closed and other upgrades unharmed); `admin`: 16 one-byte-every-2-s
//! `/metrics` requests (expects healthz, readyz and revoke to keep answering 200); `symbols`:
//! 100 rounds of 1,024 made-up `BTC-J...` subscribes (expects a new symbol to remain
//! publishable and subscribable). It prints a table, one JSON line, then `PASS` (exit 0)
//! or `FAIL` with the failed criteria (exit 1): tick rate within 10 % of baseline, every
//! upgrade ok, RSS growth < 64 MiB, the expected answer to the attacker. Exit 2: could not
//! set up (no ticks). Details in `abuse.rs`.

mod abuse;
mod common;
mod fanout;
mod floor;
mod handshake;
mod idle;
mod lean;
mod plot;
mod recover;

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
    /// Replays a denial-of-service attack (head, pings, silent, admin, symbols) while a
    /// watcher from a second loopback address measures whether others are still served.
    Abuse(abuse::AbuseArgs),
    /// Recovery on reconnect (`since`, issue 19): fanout's load while a share of the
    /// subscribers reconnects with `since`, and/or a storm of clients subscribing with
    /// `since` far back; every client checks its `seq`s end to end (details in recover.rs).
    Recover(recover::RecoverArgs),
    /// Draws saved histograms (`--save-hist`) on one latency-by-percentile SVG plot.
    Plot(plot::PlotArgs),
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
        Mode::Abuse(a) => abuse::main(a),
        Mode::Recover(a) => recover::main(a),
        Mode::Plot(a) => plot::main(a),
    };
    std::process::exit(code);
}
