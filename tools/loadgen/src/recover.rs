//! `recover` mode: recovery on reconnect (PROTOCOL.md section 10, issue 19) under load.
//!
//! The fan-out scenario of `fanout` (N subscribers x K of S symbols, one publisher at R
//! ticks/s, the same publisher and the same lean client code), and while it runs:
//!
//! - **Reconnects** (`--reconnect-every SECS --reconnect-share F`): a fixed share of the
//!   subscribers (spread evenly over the indices) leaves every SECS seconds of the
//!   measured window, all of them at once, with a close frame or by dropping the socket
//!   (`--reconnect-how`), stays away `--reconnect-pause-ms`, reconnects and re-subscribes
//!   with `"since"` = the last `seq` it processed per symbol. The others stay connected.
//! - **A storm** (`--storm N --storm-back B --storm-at SECS`): N extra clients, each on
//!   `--storm-per-sub` symbols, all connect at once and subscribe with `since` = the
//!   symbol's current `seq` - B (a probe connection reads the current `seq`s from
//!   snapshots just before), so each is owed B ticks per symbol of replay. A storm client
//!   is *served* once it has every tick up to that `seq`; it then leaves (close frame), or
//!   stays to the end with `--storm-stay`.
//!
//! Every client checks its `seq` sequence per symbol end to end, across its reconnects:
//! a *gap* is a jump not explained by `skipped` (conflation) and not after a `reset`
//! snapshot, a *duplicate* a `seq` at or below the last one processed. Resets are counted,
//! not failures (legitimate where the history does not reach back). After the drain a
//! second probe reads every symbol's final `seq`: a client left behind it
//! (`behind_at_end`) lost ticks no gap could show. *Replayed* ticks are, for a
//! reconnecting client, those stamped before it re-subscribed (an estimate: a tick
//! in flight at that instant counts as replayed), for a storm client those up to the
//! probed `seq` (the server's exact count is `tickgate_replayed_ticks_total` on
//! `/metrics`).
//!
//! Latency (from the tick's `ts`, as in `fanout`) and delivery against the exact
//! expectation are reported for the subscribers that stayed (`p50_us` ..., `drops`), with
//! their p99 for each second of the window (`stay_p99_by_s_us`); the reconnecting
//! subscribers' live ticks (stamped after their re-subscribe) separately (`reconn_*`).
//! `--prefill T` publishes T ticks per symbol (fast) before the subscribers connect, so
//! the history reaches back at once.
//!
//! Exit 0 when no client saw a gap or a duplicate, none was behind at the end and every
//! storm client was served; 1 otherwise (the reasons are printed); 2 when the run could
//! not be set up.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

use crate::common::{self, Common, Ctx, Report, Scenario, histogram, now_ns, percentiles, us};
use crate::fanout::{self, PubPriority, PubSpec, Shared};
use crate::lean;

#[derive(Args, Debug, Clone)]
pub struct RecoverArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub scenario: Scenario,
    /// Warm-up seconds (ticks sent, not measured).
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Measured seconds.
    #[arg(long, default_value_t = 20.0)]
    pub duration: f64,
    /// Seconds to wait after the window for in-flight ticks.
    #[arg(long, default_value_t = 1.0)]
    pub drain: f64,
    /// Publisher batch period, ms.
    #[arg(long, default_value_t = 1)]
    pub batch_ms: u64,
    /// Concurrent connection attempts while the subscribers first connect.
    #[arg(long, default_value_t = 128)]
    pub connect_concurrency: usize,
    /// Give up connecting after this many seconds.
    #[arg(long, default_value_t = 60.0)]
    pub connect_timeout: f64,
    /// Scheduling of the publisher thread (as for `fanout`).
    #[arg(long, value_enum, default_value_t = PubPriority::Fifo)]
    pub pub_priority: PubPriority,
    /// Staying subscribers read about one tick frame per `recvmsg`, so the kernel's receive
    /// stamp of each read is its tick's own (`arrival_*` figures exact to one segment);
    /// costs the load generator a system call per tick. Without it the arrival figures are
    /// an upper bound: a read after the client's own stall carries its newest segment's
    /// stamp for every tick in it.
    #[arg(long)]
    pub arrival: bool,
    /// Pin the publisher's thread to this core (default: the cores the load generator was
    /// started on). On a 2-core machine with the server on core 0 and the clients on core
    /// 1, `--pub-core 0` keeps the feed out of the clients' core: what a storm's clients
    /// cost their own core (connects, replays read) then no longer delays the ticks
    /// before the server gets them, as it would not with clients on other machines. The
    /// publisher's own cost on the server's core is small (one `send` per batch).
    #[arg(long)]
    pub pub_core: Option<usize>,
    /// The server's pid: its CPU and run-queue wait during the window and the storm.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Seconds between reconnect rounds in the measured window (0: nobody reconnects).
    #[arg(long, default_value_t = 3.0)]
    pub reconnect_every: f64,
    /// Share of the subscribers that reconnect at each round (the same ones every round).
    #[arg(long, default_value_t = 0.3)]
    pub reconnect_share: f64,
    /// How a reconnecting subscriber leaves.
    #[arg(long, value_enum, default_value_t = How::Alternate)]
    pub reconnect_how: How,
    /// Milliseconds a reconnecting subscriber stays away before it reconnects.
    #[arg(long, default_value_t = 500)]
    pub reconnect_pause_ms: u64,
    /// Ticks per symbol published before the subscribers connect (0: none).
    #[arg(long, default_value_t = 0)]
    pub prefill: u64,
    /// Ticks/s of the prefill.
    #[arg(long, default_value_t = 50_000)]
    pub prefill_rate: u64,
    /// Storm clients (0: no storm).
    #[arg(long, default_value_t = 0)]
    pub storm: usize,
    /// When the storm starts, seconds into the measured window.
    #[arg(long, default_value_t = 3.0)]
    pub storm_at: f64,
    /// How far back the storm clients' `since` is, in ticks per symbol.
    #[arg(long, default_value_t = 500)]
    pub storm_back: u64,
    /// Symbols per storm client (default: --per-sub).
    #[arg(long)]
    pub storm_per_sub: Option<usize>,
    /// The storm clients connect here instead of `--target` (a control: a second server
    /// that the staying subscribers' server shares nothing with, so what the storm still
    /// does to their latency is the load generator's and the host's part). Its history
    /// need not reach back: a `since` it cannot serve gets a reset snapshot.
    #[arg(long)]
    pub storm_target: Option<std::net::SocketAddr>,
    /// Storm clients stay subscribed once served (default: they leave).
    #[arg(long)]
    pub storm_stay: bool,
    /// Seconds after its start by which every storm client must be served.
    #[arg(long, default_value_t = 30.0)]
    pub storm_timeout: f64,
    /// Nice value of the storm clients' thread. They run on a thread and runtime of their
    /// own: on the subscribers' runtime their replay (5,000,000 messages for the issue's
    /// storm) queued the staying subscribers' reads behind it, and the generator's own
    /// backlog was reported as server latency; on a thread of their own the kernel shares
    /// the core in slices of a few ms (`gen_timer_late_max_by_s_ms` shows what is left).
    /// A high value (19) favours the staying subscribers further, but makes the storm
    /// clients slow readers, which costs the server more CPU (more, smaller writes) than
    /// clients reading at wire speed would.
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    pub storm_nice: i32,
    /// Runs the storm clients' thread as `SCHED_IDLE`: it gets the generator's core only
    /// when nothing else there wants it, and any other thread that wakes takes the core
    /// from it at once (nice 19 still shares the core in slices). The storm then costs the
    /// measuring clients as little as a storm on the same core can; clients on other
    /// machines would cost them nothing. The server still sees 1,000 clients at once
    /// (their connects spread over tens of ms instead of a few).
    #[arg(long)]
    pub storm_idle: bool,
    /// Pins the storm clients' thread to this core. With `--storm-idle` and the server's
    /// core (`--storm-core 0` on a 2-core machine), the storm's clients take only the time
    /// the server leaves idle, and the kernel's work for their sockets (connects, the
    /// acknowledgements of what they read) runs on the server's core, as it would for
    /// clients on other machines; the measuring clients' core carries no storm at all.
    #[arg(long)]
    pub storm_core: Option<usize>,
    /// Checks the checker: a reconnecting subscriber asks for `since` = last + N (N > 0
    /// must show gaps, N < 0 duplicates). 0 in any real measurement.
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    pub since_offset: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum How {
    /// Send a close frame (1000), then close the socket.
    Close,
    /// Close the socket without a close frame.
    Drop,
    /// Close frame at odd reconnects, drop at even ones.
    Alternate,
}

/// The three kinds of client, for the counters.
const STAY: usize = 0;
const RECONN: usize = 1;
const STORM: usize = 2;
const GROUPS: [&str; 3] = ["stay", "reconn", "storm"];

/// The control channel's value that ends every client (others are reconnect rounds).
const FINISH: u64 = u64::MAX;

/// A group's counters (connection-local [`Tally`]s are added in after each read).
#[derive(Default)]
struct Totals {
    ticks: AtomicU64,
    window_rx: AtomicU64,
    gaps: AtomicU64,
    gap_ticks: AtomicU64,
    dups: AtomicU64,
    resets: AtomicU64,
    snapshots: AtomicU64,
    skipped_msgs: AtomicU64,
    skipped_ticks: AtomicU64,
    replayed: AtomicU64,
    errors: AtomicU64,
    lost: AtomicU64,
}

#[derive(Default)]
struct Tally {
    ticks: u64,
    window_rx: u64,
    gaps: u64,
    gap_ticks: u64,
    dups: u64,
    resets: u64,
    snapshots: u64,
    skipped_msgs: u64,
    skipped_ticks: u64,
    replayed: u64,
    errors: u64,
}

impl Tally {
    fn flush(&mut self, t: &Totals) {
        use crate::common::flush_count as take;
        take(&mut self.ticks, &t.ticks);
        take(&mut self.window_rx, &t.window_rx);
        take(&mut self.gaps, &t.gaps);
        take(&mut self.gap_ticks, &t.gap_ticks);
        take(&mut self.dups, &t.dups);
        take(&mut self.resets, &t.resets);
        take(&mut self.snapshots, &t.snapshots);
        take(&mut self.skipped_msgs, &t.skipped_msgs);
        take(&mut self.skipped_ticks, &t.skipped_ticks);
        take(&mut self.replayed, &t.replayed);
        take(&mut self.errors, &t.errors);
    }
}

/// A reading of the server's schedstat (run, wait ns), when there is one.
type Sched = Option<(u64, u64)>;

/// What every client task shares.
struct Env {
    sh: Arc<Shared>,
    groups: [Totals; 3],
    /// Subscribers whose first `subscribed` arrived.
    subscribed: AtomicU64,
    connect_fail: AtomicU64,
    upgrade_fail: AtomicU64,
    /// Disconnections made on purpose, and re-subscriptions answered.
    reconnects: AtomicU64,
    reconnected: AtomicU64,
    /// Failed connection attempts while reconnecting (each retried).
    reconnect_fail: AtomicU64,
    /// From the start of a reconnect's connect to its `subscribed`.
    resub_hist: Mutex<Histogram<u64>>,
    /// Window latency of the subscribers that stay connected, over the window and per
    /// second of it (by the tick's `ts`).
    stay_hist: Mutex<Histogram<u64>>,
    stay_by_s: Vec<Mutex<Histogram<u64>>>,
    /// The same ticks' latency to their arrival in the client's kernel
    /// ([`lean::enable_rx_timestamps`]), over the window and per second.
    stay_arrival_hist: Mutex<Histogram<u64>>,
    stay_arrival_by_s: Vec<Mutex<Histogram<u64>>>,
    /// `--arrival`: staying subscribers read [`STAMPED_READ`] bytes at a time.
    stamp_small_reads: bool,
    /// Reads of the staying subscribers, and those the kernel stamped.
    stay_reads: AtomicU64,
    stay_reads_stamped: AtomicU64,
    /// Window latency of the reconnecting subscribers' live ticks.
    reconn_hist: Mutex<Histogram<u64>>,
    storm_n: u64,
    storm_stay: bool,
    storm_subscribed: AtomicU64,
    storm_fail: AtomicU64,
    storm_served: AtomicU64,
    /// From the storm's start to each client's last owed tick.
    storm_hist: Mutex<Histogram<u64>>,
    storm_last_served_ns: AtomicU64,
    server_pid: Option<u32>,
    /// The server's schedstat when the storm started and when its last client was served.
    storm_sched: Mutex<(Sched, Sched)>,
    /// Anomalies written to stderr so far (the first few only).
    printed: AtomicU64,
    /// `--since-offset`.
    since_offset: i64,
    /// How late a 1 ms timer of the subscribers' runtime fired, the worst per second of the
    /// window (ns): the generator's own stalls, to tell them from the server's.
    stall_by_s: Vec<AtomicU64>,
}

impl Env {
    fn new(sh: Arc<Shared>, a: &RecoverArgs) -> Env {
        let secs_n = a.duration.ceil() as usize + 1;
        Env {
            sh,
            groups: Default::default(),
            subscribed: AtomicU64::new(0),
            connect_fail: AtomicU64::new(0),
            upgrade_fail: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            reconnected: AtomicU64::new(0),
            reconnect_fail: AtomicU64::new(0),
            resub_hist: Mutex::new(histogram()),
            stay_hist: Mutex::new(histogram()),
            stay_by_s: (0..secs_n)
                .map(|_| Mutex::new(Histogram::new_with_bounds(1_000, 100_000_000_000, 2).expect("bounds")))
                .collect(),
            stay_arrival_hist: Mutex::new(histogram()),
            stay_arrival_by_s: (0..secs_n)
                .map(|_| Mutex::new(Histogram::new_with_bounds(1_000, 100_000_000_000, 2).expect("bounds")))
                .collect(),
            stamp_small_reads: a.arrival,
            stay_reads: AtomicU64::new(0),
            stay_reads_stamped: AtomicU64::new(0),
            reconn_hist: Mutex::new(histogram()),
            storm_n: a.storm as u64,
            storm_stay: a.storm_stay,
            storm_subscribed: AtomicU64::new(0),
            storm_fail: AtomicU64::new(0),
            storm_served: AtomicU64::new(0),
            storm_hist: Mutex::new(histogram()),
            storm_last_served_ns: AtomicU64::new(0),
            server_pid: a.server_pid,
            storm_sched: Mutex::new((None, None)),
            printed: AtomicU64::new(0),
            since_offset: a.since_offset,
            stall_by_s: (0..secs_n).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn note(&self, what: std::fmt::Arguments) {
        if self.printed.fetch_add(1, Relaxed) < 10 {
            eprintln!("loadgen: {what}");
        }
    }
}

/// One symbol of a client: the last `seq` processed (`None`: none yet), and for a storm
/// client the `seq` up to which it is owed the replay.
struct Sym {
    name: String,
    last: Option<u64>,
    head: u64,
}

/// A client's state, which outlives its connections.
struct Client {
    i: usize,
    group: usize,
    syms: Vec<Sym>,
    tally: Tally,
    /// (ts, latency at the read, latency at the kernel's arrival) of window ticks to record.
    lat: Vec<(u64, u64, u64)>,
    /// Ticks stamped before this (the last re-subscribe, ns) count as replayed.
    live_from_ns: u64,
    subscribed_once: bool,
    /// A reconnect's start, until its `subscribed`.
    resub_start: Option<Instant>,
    /// A storm client: when the storm started, and whether it has been served.
    storm_start: Option<Instant>,
    served: bool,
}

impl Client {
    fn new(i: usize, group: usize, names: Vec<String>) -> Client {
        Client {
            i,
            group,
            syms: names
                .into_iter()
                .map(|name| Sym {
                    name,
                    last: None,
                    head: 0,
                })
                .collect(),
            tally: Tally::default(),
            lat: Vec::with_capacity(256),
            live_from_ns: 0,
            subscribed_once: false,
            resub_start: None,
            storm_start: None,
            served: false,
        }
    }

    /// The subscribe for every symbol, with `since` for those with a `seq` processed.
    /// `offset` moves every `since` (`--since-offset`, to check the checker).
    fn subscribe_json(&self, with_since: bool, offset: i64) -> String {
        let list: Vec<String> = self.syms.iter().map(|s| format!("\"{}\"", s.name)).collect();
        let since: Vec<String> = self
            .syms
            .iter()
            .filter_map(|s| {
                let l = s.last?.saturating_add_signed(offset);
                Some(format!("\"{}\":{l}", s.name))
            })
            .collect();
        let mut m = format!(r#"{{"op":"subscribe","id":1,"symbols":[{}]"#, list.join(","));
        if with_since && !since.is_empty() {
            m.push_str(&format!(r#","since":{{{}}}"#, since.join(",")));
        }
        m.push('}');
        m
    }

    /// A storm client has every tick it was owed (with `subscribed`, it is served).
    fn caught_up(&self) -> bool {
        self.syms.iter().all(|s| s.last.is_some_and(|l| l >= s.head))
    }

    /// `now`: when the bytes were read; `arrived`: when the kernel received them (`now`
    /// when unknown).
    fn on_text(&mut self, p: &[u8], now: u64, arrived: u64, t0: u64, t1: u64, env: &Env) {
        let Some(ty) = lean::msg_type(p) else {
            self.tally.errors += 1;
            return;
        };
        match ty {
            b"tick" | b"snapshot" => {
                let (Some(sym), Some(seq), Some(ts)) = (
                    lean::field_str(p, b"\"s\":\""),
                    lean::field_u64(p, b"\"seq\":"),
                    lean::field_u64(p, b"\"ts\":"),
                ) else {
                    self.tally.errors += 1;
                    return;
                };
                let Some(e) = self.syms.iter_mut().find(|e| e.name.as_bytes() == sym) else {
                    self.tally.errors += 1;
                    return;
                };
                if ty == b"snapshot" {
                    // The client's state for the symbol is replaced: the sequence restarts
                    // from this `seq`.
                    if lean::find(p, b"\"reset\":true").is_some() {
                        self.tally.resets += 1;
                    } else {
                        self.tally.snapshots += 1;
                    }
                    e.last = Some(seq);
                    return;
                }
                self.tally.ticks += 1;
                if let Some(l) = e.last {
                    if seq <= l {
                        self.tally.dups += 1;
                        env.note(format_args!(
                            "duplicate: {} client {} {} seq {seq} after {l}",
                            GROUPS[self.group], self.i, e.name
                        ));
                        return;
                    }
                    let missing = seq - l - 1;
                    let skipped = lean::field_u64(p, b"\"skipped\":");
                    if let Some(k) = skipped {
                        self.tally.skipped_msgs += 1;
                        self.tally.skipped_ticks += k;
                    }
                    if missing > 0 && skipped != Some(missing) {
                        self.tally.gaps += 1;
                        self.tally.gap_ticks += missing.saturating_sub(skipped.unwrap_or(0));
                        env.note(format_args!(
                            "gap: {} client {} {} seq {seq} after {l} (skipped {skipped:?})",
                            GROUPS[self.group], self.i, e.name
                        ));
                    }
                }
                e.last = Some(seq);
                match self.group {
                    STORM if seq <= e.head => self.tally.replayed += 1,
                    STORM => {}
                    _ if ts < self.live_from_ns => self.tally.replayed += 1,
                    _ if ts >= t0 && ts < t1 => {
                        self.tally.window_rx += 1;
                        self.lat
                            .push((ts, now.saturating_sub(ts), arrived.saturating_sub(ts)));
                    }
                    _ => {}
                }
            }
            b"subscribed" => {
                if !self.subscribed_once {
                    self.subscribed_once = true;
                    if self.group == STORM {
                        env.storm_subscribed.fetch_add(1, Relaxed);
                    } else {
                        env.subscribed.fetch_add(1, Relaxed);
                    }
                }
                if let Some(t) = self.resub_start.take() {
                    env.reconnected.fetch_add(1, Relaxed);
                    env.resub_hist
                        .lock()
                        .unwrap()
                        .record(t.elapsed().as_nanos() as u64)
                        .ok();
                }
            }
            b"error" => {
                self.tally.errors += 1;
                env.note(format_args!(
                    "{} client {} got {}",
                    GROUPS[self.group],
                    self.i,
                    String::from_utf8_lossy(p)
                ));
            }
            _ => {}
        }
    }

    /// Moves the connection-local counts and latencies into the shared ones.
    fn flush(&mut self, env: &Env, t0: u64) {
        self.tally.flush(&env.groups[self.group]);
        if self.lat.is_empty() {
            return;
        }
        if self.group == STAY {
            let mut h = env.stay_hist.lock().unwrap();
            for &(_, v, _) in &self.lat {
                h.record(v.max(1)).ok();
            }
            drop(h);
            let mut h = env.stay_arrival_hist.lock().unwrap();
            for &(_, _, a) in &self.lat {
                h.record(a.max(1)).ok();
            }
            drop(h);
            for &(ts, v, a) in &self.lat {
                let s = (ts.saturating_sub(t0) / 1_000_000_000) as usize;
                if let Some(h) = env.stay_by_s.get(s) {
                    h.lock().unwrap().record(v.max(1_000)).ok();
                }
                if let Some(h) = env.stay_arrival_by_s.get(s) {
                    h.lock().unwrap().record(a.max(1_000)).ok();
                }
            }
        } else {
            let mut h = env.reconn_hist.lock().unwrap();
            for &(_, v, _) in &self.lat {
                h.record(v.max(1)).ok();
            }
        }
        self.lat.clear();
    }
}

/// The p99 of each second that has ticks, µs.
fn p99_by_s(by_s: &[Mutex<Histogram<u64>>]) -> Vec<f64> {
    by_s.iter()
        .map(|h| h.lock().unwrap())
        .filter(|h| !h.is_empty())
        .map(|h| us(h.value_at_quantile(0.99)))
        .collect()
}

/// Bytes per read of a staying subscriber with `--arrival` (about one tick frame).
const STAMPED_READ: usize = 256;

/// How a connection's reading ended.
enum End {
    /// The control channel asked this client to reconnect.
    Reconnect,
    /// The run is over.
    Finish,
    /// A storm client got every tick it was owed and leaves.
    Served,
    /// The server closed the connection (or it failed).
    Lost,
}

/// Connects and upgrades; `Err(true)` when the TCP connect failed, `Err(false)` when the
/// upgrade did. Bytes after the `101`'s head are left in `buf[..end]`, the returned `end`.
/// `stamps`: the kernel stamps what the connection receives ([`lean::enable_rx_timestamps`]).
async fn open(
    ctx: &Ctx,
    src: usize,
    token: &str,
    buf: &mut Vec<u8>,
    stamps: bool,
) -> Result<(lean::Stream, usize), bool> {
    let mut s = lean::Stream::connect(ctx, ctx.source(src))
        .await
        .map_err(|_| true)?;
    let req = lean::upgrade_request(&ctx.host, token);
    match lean::upgrade(&mut s, &req, buf).await {
        Ok((101, end)) => {
            if stamps {
                lean::enable_rx_timestamps(&s);
            }
            if buf.len() < 128 * 1024 {
                buf.resize(128 * 1024, 0);
            }
            Ok((s, end))
        }
        _ => Err(false),
    }
}

async fn send_text(s: &mut lean::Stream, text: &str) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(text.len() + 16);
    lean::text_frame(text.as_bytes(), &mut out);
    s.write_all(&out).await
}

/// Sends a close frame (1000) and closes the socket.
async fn close(mut s: lean::Stream) {
    let mut out = Vec::with_capacity(8);
    lean::close_frame(&mut out);
    let _ = s.write_all(&out).await;
    let _ = s.shutdown().await;
}

/// Reads and checks one connection's frames until it ends (see [`End`]).
async fn pump(
    s: &mut lean::Stream,
    buf: &mut Vec<u8>,
    mut end: usize,
    cl: &mut Client,
    env: &Env,
    ctl: &mut watch::Receiver<u64>,
) -> End {
    let mut out = Vec::new();
    // When the kernel received the bytes of the last read (`None`: not stamped).
    let mut stamp: Option<u64> = None;
    loop {
        let now = now_ns();
        let arrived = stamp.map_or(now, |t| t.min(now));
        let (t0, t1) = (env.sh.t0.load(Relaxed), env.sh.t1.load(Relaxed));
        let mut start = 0usize;
        let mut closed = false;
        while let Some(f) = lean::parse_frame(&buf[start..end]) {
            let payload = &buf[start + f.start..start + f.end];
            match f.opcode {
                1 | 0 => cl.on_text(payload, now, arrived, t0, t1, env),
                9 => lean::pong_frame(payload, &mut out),
                8 => closed = true,
                _ => {}
            }
            start += f.end;
        }
        if start > 0 {
            buf.copy_within(start..end, 0);
            end -= start;
        }
        if end == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        cl.flush(env, t0);
        if !out.is_empty() {
            if s.write_all(&out).await.is_err() {
                closed = true;
            }
            out.clear();
        }
        if closed {
            return End::Lost;
        }
        if cl.group == STORM && !cl.served && cl.subscribed_once && cl.caught_up() {
            cl.served = true;
            if let Some(t) = cl.storm_start {
                env.storm_hist
                    .lock()
                    .unwrap()
                    .record(t.elapsed().as_nanos() as u64)
                    .ok();
            }
            if env.storm_served.fetch_add(1, Relaxed) + 1 == env.storm_n {
                env.storm_last_served_ns.store(now_ns(), Relaxed);
                env.storm_sched.lock().unwrap().1 = env.server_pid.and_then(common::schedstat);
            }
            if !env.storm_stay {
                return End::Served;
            }
        }
        // A staying subscriber reads one tick's worth at a time when the kernel stamps its
        // segments: the stamp is that of the last segment a read touched, so a bigger read
        // after a stall of the client's own thread would give its older ticks the newest
        // segment's arrival time.
        let read_to = if cl.group == STAY && env.stamp_small_reads {
            (end + STAMPED_READ).min(buf.len())
        } else {
            buf.len()
        };
        tokio::select! {
            r = s.read_stamped(&mut buf[end..read_to]) => match r {
                Ok((0, _)) | Err(_) => return End::Lost,
                Ok((n, t)) => {
                    end += n;
                    stamp = t;
                    if cl.group == STAY {
                        env.stay_reads.fetch_add(1, Relaxed);
                        env.stay_reads_stamped.fetch_add(u64::from(t.is_some()), Relaxed);
                    }
                }
            },
            c = ctl.changed() => {
                let v = if c.is_err() { FINISH } else { *ctl.borrow_and_update() };
                if v == FINISH {
                    return End::Finish;
                }
                if cl.group == RECONN {
                    return End::Reconnect;
                }
            }
        }
    }
}

/// A subscriber of the scenario: connects, subscribes, and (a reconnecting one) leaves and
/// comes back with `since` at every round. Returns its state at the end.
#[allow(clippy::too_many_arguments)]
async fn subscriber(
    ctx: Arc<Ctx>,
    env: Arc<Env>,
    sem: Arc<Semaphore>,
    token: String,
    mut cl: Client,
    mut ctl: watch::Receiver<u64>,
    how: How,
    pause: Duration,
) -> Client {
    let mut buf = vec![0u8; 4096];
    let permit = sem.acquire_owned().await;
    let (mut s, mut end) = match open(&ctx, cl.i, &token, &mut buf, cl.group == STAY).await {
        Ok(x) => x,
        Err(tcp) => {
            if tcp {
                env.connect_fail.fetch_add(1, Relaxed);
            } else {
                env.upgrade_fail.fetch_add(1, Relaxed);
            }
            return cl;
        }
    };
    drop(permit);
    if send_text(&mut s, &cl.subscribe_json(false, 0)).await.is_err() {
        env.groups[cl.group].lost.fetch_add(1, Relaxed);
        return cl;
    }
    let mut rounds = 0u64;
    loop {
        match pump(&mut s, &mut buf, end, &mut cl, &env, &mut ctl).await {
            End::Finish | End::Served => return cl,
            End::Lost => {
                env.groups[cl.group].lost.fetch_add(1, Relaxed);
                env.note(format_args!(
                    "{} client {} lost its connection",
                    GROUPS[cl.group], cl.i
                ));
                return cl;
            }
            End::Reconnect => {
                rounds += 1;
                env.reconnects.fetch_add(1, Relaxed);
                let with_close = match how {
                    How::Close => true,
                    How::Drop => false,
                    How::Alternate => rounds % 2 == 1,
                };
                if with_close {
                    close(s).await;
                } else {
                    drop(s);
                }
                tokio::time::sleep(pause).await;
                let t = Instant::now();
                let mut next = None;
                for _ in 0..50 {
                    if let Ok((mut s2, e2)) = open(&ctx, cl.i, &token, &mut buf, false).await {
                        let sub = cl.subscribe_json(true, env.since_offset);
                        cl.live_from_ns = now_ns();
                        cl.resub_start = Some(t);
                        if send_text(&mut s2, &sub).await.is_ok() {
                            next = Some((s2, e2));
                            break;
                        }
                    }
                    env.reconnect_fail.fetch_add(1, Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                let Some((s2, e2)) = next else {
                    env.groups[cl.group].lost.fetch_add(1, Relaxed);
                    env.note(format_args!("reconn client {} could not reconnect", cl.i));
                    return cl;
                };
                (s, end) = (s2, e2);
                // Rounds that fired while it was away are not owed.
                if *ctl.borrow_and_update() == FINISH {
                    return cl;
                }
            }
        }
    }
}

/// A storm client: subscribes with its `since`, reads its replay and (unless
/// `--storm-stay`) leaves once served.
async fn storm_client(
    ctx: Arc<Ctx>,
    env: Arc<Env>,
    src: usize,
    token: String,
    mut cl: Client,
    mut ctl: watch::Receiver<u64>,
) -> Client {
    let mut buf = vec![0u8; 4096];
    let (mut s, end) = match open(&ctx, src, &token, &mut buf, false).await {
        Ok(x) => x,
        Err(_) => {
            env.storm_fail.fetch_add(1, Relaxed);
            return cl;
        }
    };
    if send_text(&mut s, &cl.subscribe_json(true, 0)).await.is_err() {
        env.storm_fail.fetch_add(1, Relaxed);
        return cl;
    }
    match pump(&mut s, &mut buf, end, &mut cl, &env, &mut ctl).await {
        End::Served => close(s).await,
        End::Lost => {
            env.groups[STORM].lost.fetch_add(1, Relaxed);
        }
        End::Finish | End::Reconnect => {}
    }
    cl
}

/// Starts the storm's clients, all at once, on a thread and runtime of their own at `nice`
/// (see `--storm-nice`); their states come back on the channel once every one has ended.
fn spawn_storm(
    ctx: Arc<Ctx>,
    env: Arc<Env>,
    clients: Vec<(usize, String, Client)>,
    ctl: watch::Receiver<u64>,
    nice: i32,
    idle: bool,
    core: Option<usize>,
) -> std::io::Result<tokio::sync::oneshot::Receiver<Vec<Client>>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new().name("storm".into()).spawn(move || {
        if let Some(c) = core
            && !tickgate::rt::pin_to_core(c)
        {
            eprintln!("loadgen: storm thread: could not pin to core {c}");
        }
        if nice != 0 && !tickgate::rt::set_thread_nice(nice) {
            eprintln!("loadgen: storm thread: could not set nice {nice}");
        }
        if idle {
            let p = libc::sched_param { sched_priority: 0 };
            // SAFETY: sched_setscheduler reads one valid sched_param; pid 0 is this thread.
            if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &p) } != 0 {
                eprintln!("loadgen: storm thread: could not set SCHED_IDLE");
            }
        }
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("loadgen: storm runtime: {e}");
                return;
            }
        };
        let out = rt.block_on(async move {
            let handles: Vec<JoinHandle<Client>> = clients
                .into_iter()
                .map(|(src, token, cl)| {
                    tokio::spawn(storm_client(
                        ctx.clone(),
                        env.clone(),
                        src,
                        token,
                        cl,
                        ctl.clone(),
                    ))
                })
                .collect();
            let mut v = Vec::with_capacity(handles.len());
            for h in handles {
                if let Ok(c) = h.await {
                    v.push(c);
                }
            }
            v
        });
        let _ = tx.send(out);
    })?;
    Ok(rx)
}

/// Measures the generator's own stalls: how late a 1 ms timer of the subscribers' runtime
/// fires, the worst per second of the window.
async fn stall_probe(env: Arc<Env>) {
    let period = Duration::from_millis(1);
    let mut next = tokio::time::Instant::now();
    loop {
        next += period;
        tokio::time::sleep_until(next).await;
        let late = next.elapsed();
        let (t0, now) = (env.sh.t0.load(Relaxed), now_ns());
        if now >= t0
            && let Some(m) = env.stall_by_s.get(((now - t0) / 1_000_000_000) as usize)
        {
            m.fetch_max(late.as_nanos() as u64, Relaxed);
        }
        if late > period {
            next = tokio::time::Instant::now();
        }
    }
}

/// Every symbol's current `seq` (0 where none arrived within 5 s), read from the snapshots
/// of one subscribe to all of `names`.
async fn probe_heads(ctx: &Ctx, token: &str, names: &[String]) -> Result<Vec<u64>, String> {
    let mut buf = vec![0u8; 4096];
    let (mut s, mut end) = open(ctx, 0, token, &mut buf, false)
        .await
        .map_err(|_| "probe: could not connect".to_string())?;
    let list: Vec<String> = names.iter().map(|n| format!("\"{n}\"")).collect();
    let sub = format!(
        r#"{{"op":"subscribe","id":1,"symbols":[{}],"snapshot":true}}"#,
        list.join(",")
    );
    send_text(&mut s, &sub).await.map_err(|e| format!("probe: {e}"))?;
    let mut heads = vec![0u64; names.len()];
    let mut seen = 0usize;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while seen < names.len() {
        let mut start = 0usize;
        while let Some(f) = lean::parse_frame(&buf[start..end]) {
            let p = &buf[start + f.start..start + f.end];
            if f.opcode == 1
                && let (Some(b"snapshot" | b"tick"), Some(sym), Some(seq)) = (
                    lean::msg_type(p),
                    lean::field_str(p, b"\"s\":\""),
                    lean::field_u64(p, b"\"seq\":"),
                )
                && let Some(k) = names.iter().position(|n| n.as_bytes() == sym)
            {
                if heads[k] == 0 {
                    seen += 1;
                }
                heads[k] = heads[k].max(seq);
            }
            start += f.end;
        }
        buf.copy_within(start..end, 0);
        end -= start;
        if seen == names.len() {
            break;
        }
        match tokio::time::timeout_at(deadline, s.read(&mut buf[end..])).await {
            Ok(Ok(n)) if n > 0 => end += n,
            Ok(_) => return Err("probe: connection closed".into()),
            Err(_) => break,
        }
    }
    close(s).await;
    Ok(heads)
}

pub fn main(a: RecoverArgs) -> i32 {
    let bounds = if a.scenario.subscribers == 0
        || a.scenario.subscribers > 200_000
        || a.storm > 100_000
        || a.duration > 600.0
        || a.warmup > 120.0
        || a.prefill > 100_000
        || !(0.0..=1.0).contains(&a.reconnect_share)
        || (a.reconnect_every != 0.0 && a.reconnect_every < 0.1)
    {
        Err(
            "1..=200000 subscribers, storm <= 100000, duration <= 600 s, warmup <= 120 s, \
             prefill <= 100000, reconnect share in 0..=1, reconnect-every 0 or >= 0.1 s",
        )
    } else {
        Ok(())
    };
    common::launch(&a.common.clone(), bounds, move |ctx| run(a, ctx))
}

/// Subscriber `i` of `n` reconnects: `share` of them, spread evenly over the indices.
fn reconnects(i: usize, share: f64) -> bool {
    ((i + 1) as f64 * share).floor() > (i as f64 * share).floor()
}

fn ms(ns: u64) -> f64 {
    (ns as f64 / 10_000.0).round() / 100.0
}

/// A scheduled event of the window.
enum Ev {
    Round,
    Storm,
}

async fn run(a: RecoverArgs, ctx: Arc<Ctx>) -> i32 {
    let names: Vec<String> = (0..a.scenario.symbols.max(1))
        .map(|i| format!("S{i:04}"))
        .collect();
    let n = a.scenario.subscribers;
    let assignment = common::assignment(n, names.len(), a.scenario.per_sub, a.scenario.seed);
    let k = assignment.first().map_or(1, Vec::len);
    let reconn_on = a.reconnect_every > 0.0 && a.reconnect_share > 0.0;
    let group = |i: usize| {
        if reconn_on && reconnects(i, a.reconnect_share) {
            RECONN
        } else {
            STAY
        }
    };
    let mut stay_per_sym = vec![0u64; names.len()];
    for (i, syms) in assignment.iter().enumerate() {
        if group(i) == STAY {
            for &m in syms {
                stay_per_sym[m] += 1;
            }
        }
    }
    let n_stay = (0..n).filter(|&i| group(i) == STAY).count();
    let storm_assign = common::assignment(
        a.storm,
        names.len(),
        a.storm_per_sub.unwrap_or(a.scenario.per_sub),
        a.scenario.seed ^ 0x5707_3A11,
    );
    let storm_k = storm_assign.first().map_or(0, Vec::len);
    let ttl = a.common.ttl;
    let tokens: Vec<String> = (0..n)
        .map(|i| ctx.token(&format!("lg-{i}"), &format!("s-{i}"), &["subscriber"], ttl))
        .collect();
    let storm_tokens: Vec<String> = (0..a.storm)
        .map(|j| {
            ctx.token(
                &format!("lg-storm-{j}"),
                &format!("storm-{j}"),
                &["subscriber"],
                ttl,
            )
        })
        .collect();
    let probe_token = ctx.token("lg-probe", "probe", &["subscriber"], ttl);

    let sh = Arc::new(Shared::new(false, false));
    let env = Arc::new(Env::new(sh.clone(), &a));
    let sched = Arc::new(OnceLock::<&'static str>::new());
    let pub_spec = |rate: u64, step: usize| PubSpec {
        core: a.pub_core,
        ctx: ctx.clone(),
        sh: sh.clone(),
        names: names.clone(),
        rate,
        batch_ms: a.batch_ms,
        prio: a.pub_priority,
        nats: None,
        step,
    };

    // The prefill: the history reaches back before anyone connects.
    let mut prefilled = 0;
    if a.prefill > 0 {
        let stop = Arc::new(AtomicBool::new(false));
        let rate = a.prefill_rate.max(1);
        let p = fanout::spawn_publisher(pub_spec(rate, 0), sched.clone(), stop.clone());
        let total = a.prefill * names.len() as u64;
        tokio::time::sleep(Duration::from_secs_f64(total as f64 / rate as f64 + 0.05)).await;
        stop.store(true, Relaxed);
        match fanout::join_publisher(p).await {
            Ok(s) if s.errors == 0 => prefilled = s.acked,
            Ok(s) => {
                eprintln!("loadgen: prefill: {} publish errors", s.errors);
                return 2;
            }
            Err(e) => {
                eprintln!("loadgen: prefill: {e}");
                return 2;
            }
        }
        eprintln!(
            "loadgen: prefilled {prefilled} ticks (~{} per symbol)",
            prefilled / names.len() as u64
        );
    }

    // The subscribers.
    let (ctl_tx, ctl_rx) = watch::channel(0u64);
    let sem = Arc::new(Semaphore::new(a.connect_concurrency.max(1)));
    let pause = Duration::from_millis(a.reconnect_pause_ms);
    let t_conn = Instant::now();
    let mut tasks: Vec<JoinHandle<Client>> = Vec::with_capacity(n);
    for (i, (syms, token)) in assignment.iter().zip(tokens).enumerate() {
        let cl = Client::new(i, group(i), syms.iter().map(|&s| names[s].clone()).collect());
        tasks.push(tokio::spawn(subscriber(
            ctx.clone(),
            env.clone(),
            sem.clone(),
            token,
            cl,
            ctl_rx.clone(),
            a.reconnect_how,
            pause,
        )));
    }
    let deadline = Instant::now() + Duration::from_secs_f64(a.connect_timeout);
    loop {
        let done = env.subscribed.load(Relaxed)
            + env.connect_fail.load(Relaxed)
            + env.upgrade_fail.load(Relaxed)
            + env.groups.iter().map(|g| g.lost.load(Relaxed)).sum::<u64>();
        if done >= n as u64 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let subscribed = env.subscribed.load(Relaxed);
    eprintln!(
        "loadgen: {subscribed}/{n} subscribed in {:.2} s ({} connect failures, {} upgrade failures)",
        t_conn.elapsed().as_secs_f64(),
        env.connect_fail.load(Relaxed),
        env.upgrade_fail.load(Relaxed)
    );
    if subscribed == 0 {
        eprintln!("loadgen: no subscriber; is the server up at {}?", ctx.target);
        return 2;
    }

    // The publisher, the warm-up, then the window with its rounds and the storm.
    let stop = Arc::new(AtomicBool::new(false));
    let publ = fanout::spawn_publisher(pub_spec(a.scenario.rate, 1), sched.clone(), stop.clone());
    tokio::time::sleep(Duration::from_secs_f64(a.warmup)).await;
    sh.pub_max_lag_ns.store(0, Relaxed);
    let t0 = now_ns();
    let cpu_a = common::cpu_time();
    let sched_a = a.server_pid.and_then(common::schedstat);
    sh.t0.store(t0, Relaxed);
    let start = tokio::time::Instant::now();
    let mut events: Vec<(f64, Ev)> = Vec::new();
    if reconn_on {
        // A round only where the reconnect can finish inside the window.
        let mut t = a.reconnect_every;
        while t + pause.as_secs_f64() + 1.0 < a.duration {
            events.push((t, Ev::Round));
            t += a.reconnect_every;
        }
    }
    if a.storm > 0 {
        events.push((a.storm_at.clamp(0.0, a.duration), Ev::Storm));
    }
    events.sort_by(|x, y| x.0.total_cmp(&y.0));
    let mut rounds = 0u64;
    let mut storm: Option<(Instant, tokio::sync::oneshot::Receiver<Vec<Client>>)> = None;
    let stall = tokio::spawn(stall_probe(env.clone()));
    let mut storm_owed = 0u64;
    let mut storm_start_ns = 0u64;
    let mut exit = 0;
    for (at, ev) in events {
        tokio::time::sleep_until(start + Duration::from_secs_f64(at)).await;
        match ev {
            Ev::Round => {
                rounds += 1;
                let _ = ctl_tx.send(rounds);
            }
            Ev::Storm => {
                let t_probe = Instant::now();
                let heads = match probe_heads(&ctx, &probe_token, &names).await {
                    Ok(h) => h,
                    Err(e) => {
                        eprintln!("loadgen: storm: {e}");
                        exit = 2;
                        continue;
                    }
                };
                let storm_start = Instant::now();
                storm_start_ns = now_ns();
                eprintln!(
                    "loadgen: storm: {} clients, since {} back (probe {:.1} ms)",
                    a.storm,
                    a.storm_back,
                    (storm_start - t_probe).as_secs_f64() * 1000.0
                );
                env.storm_sched.lock().unwrap().0 = a.server_pid.and_then(common::schedstat);
                let mut clients = Vec::with_capacity(a.storm);
                for (j, (syms, token)) in storm_assign.iter().zip(storm_tokens.iter()).enumerate() {
                    let mut cl = Client::new(j, STORM, syms.iter().map(|&s| names[s].clone()).collect());
                    for (e, &m) in cl.syms.iter_mut().zip(syms) {
                        e.head = heads[m];
                        e.last = Some(heads[m].saturating_sub(a.storm_back));
                        storm_owed += heads[m] - heads[m].saturating_sub(a.storm_back);
                    }
                    cl.storm_start = Some(storm_start);
                    clients.push((n + j, token.clone(), cl));
                }
                let storm_ctx = match a.storm_target {
                    Some(t) => Arc::new(ctx.with_target(t)),
                    None => ctx.clone(),
                };
                match spawn_storm(
                    storm_ctx,
                    env.clone(),
                    clients,
                    ctl_rx.clone(),
                    a.storm_nice,
                    a.storm_idle,
                    a.storm_core,
                ) {
                    Ok(rx) => storm = Some((storm_start, rx)),
                    Err(e) => {
                        eprintln!("loadgen: storm thread: {e}");
                        exit = 2;
                    }
                }
            }
        }
    }
    tokio::time::sleep_until(start + Duration::from_secs_f64(a.duration)).await;
    let t1 = now_ns();
    sh.t1.store(t1, Relaxed);
    let sched_b = a.server_pid.and_then(common::schedstat);
    let secs = (t1 - t0) as f64 / 1e9;
    stop.store(true, Relaxed);
    let pstats = match fanout::join_publisher(publ).await {
        Ok(s) => Some(s),
        Err(e) => {
            eprintln!("loadgen: {e}");
            exit = 2;
            None
        }
    };
    tokio::time::sleep(Duration::from_secs_f64(a.drain)).await;
    let cpu_b = common::cpu_time();

    stall.abort();
    // The storm's clients that leave are done by now, or get until the storm's timeout.
    let mut storm_clients: Option<Vec<Client>> = None;
    if let Some((st, rx)) = &mut storm
        && !a.storm_stay
    {
        let until = tokio::time::Instant::from_std(*st + Duration::from_secs_f64(a.storm_timeout));
        if let Ok(Ok(v)) = tokio::time::timeout_at(until, rx).await {
            storm_clients = Some(v);
        }
    }
    // The final seq of every symbol, then every client's state.
    let final_heads = probe_heads(&ctx, &probe_token, &names).await;
    let _ = ctl_tx.send(FINISH);
    let mut clients = Vec::with_capacity(n);
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    for h in tasks {
        if let Ok(Ok(c)) = tokio::time::timeout_at(until, h).await {
            clients.push(c);
        }
    }
    if let Some((_, rx)) = &mut storm
        && storm_clients.is_none()
        && let Ok(Ok(v)) = tokio::time::timeout_at(until, rx).await
    {
        storm_clients = Some(v);
    }
    let storm_clients = storm_clients.unwrap_or_default();
    let (behind, behind_ticks) = match &final_heads {
        Ok(heads) => {
            let mut pairs = 0u64;
            let mut ticks = 0u64;
            let stayers = clients
                .iter()
                .chain(storm_clients.iter().filter(|_| a.storm_stay));
            for c in stayers {
                for s in &c.syms {
                    let Some(m) = names.iter().position(|x| *x == s.name) else {
                        continue;
                    };
                    let last = s.last.unwrap_or(0);
                    if last < heads[m] {
                        pairs += 1;
                        ticks += heads[m] - last;
                    }
                }
            }
            (Some(pairs), Some(ticks))
        }
        Err(e) => {
            eprintln!("loadgen: final {e}");
            (None, None)
        }
    };

    // The report.
    let mut r = Report::new("recover", &a.common.label);
    r.add("target", ctx.target.to_string());
    r.add("subscribers", n as u64);
    r.add("subscribed", subscribed);
    r.add("stay_subscribers", n_stay as u64);
    r.add("reconn_subscribers", (n - n_stay) as u64);
    r.add("symbols", names.len() as u64);
    r.add("per_sub", k as u64);
    r.add("rate_ticks_per_s", a.scenario.rate);
    r.add("prefill_ticks", prefilled);
    r.add("duration_s", (secs * 100.0).round() / 100.0);
    let h = env.stay_hist.lock().unwrap().clone();
    for (name, v) in percentiles(&h) {
        r.add(name, v);
    }
    r.add("stay_p99_by_s_us", p99_by_s(&env.stay_by_s));
    // The same ticks at their arrival in the clients' kernel: without the time they waited
    // for the client's thread (the storm's clients share its core on this machine).
    let h = env.stay_arrival_hist.lock().unwrap().clone();
    for (name, v) in percentiles(&h) {
        r.add(&format!("arrival_{name}"), v);
    }
    r.add("stay_arrival_p99_by_s_us", p99_by_s(&env.stay_arrival_by_s));
    let reads = env.stay_reads.load(Relaxed).max(1);
    r.add(
        "stay_reads_stamped_pct",
        (env.stay_reads_stamped.load(Relaxed) as f64 * 1000.0 / reads as f64).round() / 10.0,
    );
    let stalls: Vec<f64> = env
        .stall_by_s
        .iter()
        .map(|m| ms(m.load(Relaxed)))
        .take(secs.ceil() as usize)
        .collect();
    r.add("gen_timer_late_max_by_s_ms", stalls);
    let stay = &env.groups[STAY];
    let received = stay.window_rx.load(Relaxed);
    r.add("delivered_per_s", (received as f64 / secs).round());
    if let Some(p) = &pstats {
        let expected: u64 = p
            .window_counts
            .iter()
            .zip(&stay_per_sym)
            .map(|(t, s)| t * s)
            .sum();
        r.add("published_window", p.window_counts.iter().sum::<u64>());
        r.add("expected", expected);
        r.add("received", received);
        r.add("drops", expected.saturating_sub(received));
        r.add("pub_acked_ticks", p.acked);
        r.add("pub_errors", p.errors);
    }
    r.add("pub_max_lag_us", us(sh.pub_max_lag_ns.load(Relaxed)));
    r.add("pub_sched", *sched.get().unwrap_or(&"normal"));
    if reconn_on {
        r.add("reconnect_every_s", a.reconnect_every);
        r.add("reconnect_share", a.reconnect_share);
        r.add("reconnect_how", format!("{:?}", a.reconnect_how).to_lowercase());
        r.add("reconnect_pause_ms", a.reconnect_pause_ms);
        if a.since_offset != 0 {
            r.add("since_offset", a.since_offset);
        }
        r.add("rounds", rounds);
        r.add("reconnects", env.reconnects.load(Relaxed));
        r.add("reconnected", env.reconnected.load(Relaxed));
        r.add("reconnect_fail", env.reconnect_fail.load(Relaxed));
        let rh = env.resub_hist.lock().unwrap();
        if !rh.is_empty() {
            r.add("resubscribe_p50_ms", ms(rh.value_at_quantile(0.5)));
            r.add("resubscribe_p99_ms", ms(rh.value_at_quantile(0.99)));
        }
        drop(rh);
        let lh = env.reconn_hist.lock().unwrap();
        if !lh.is_empty() {
            r.add("reconn_live_p50_us", us(lh.value_at_quantile(0.5)));
            r.add("reconn_live_p99_us", us(lh.value_at_quantile(0.99)));
        }
    }
    let sum = |f: fn(&Totals) -> &AtomicU64| env.groups.iter().map(|g| f(g).load(Relaxed)).sum::<u64>();
    let (gaps, dups) = (sum(|g| &g.gaps), sum(|g| &g.dups));
    r.add("gaps", gaps);
    r.add("dups", dups);
    r.add("resets", sum(|g| &g.resets));
    r.add("replayed", sum(|g| &g.replayed));
    r.add("skipped_msgs", sum(|g| &g.skipped_msgs));
    r.add("skipped_ticks", sum(|g| &g.skipped_ticks));
    let used: &[usize] = match (reconn_on, a.storm > 0) {
        (true, true) => &[STAY, RECONN, STORM],
        (true, false) => &[STAY, RECONN],
        (false, true) => &[STAY, STORM],
        (false, false) => &[STAY],
    };
    for &g in used {
        let t = &env.groups[g];
        let name = GROUPS[g];
        r.add(&format!("{name}_ticks"), t.ticks.load(Relaxed));
        r.add(&format!("{name}_gaps"), t.gaps.load(Relaxed));
        r.add(&format!("{name}_gap_ticks"), t.gap_ticks.load(Relaxed));
        r.add(&format!("{name}_dups"), t.dups.load(Relaxed));
        r.add(&format!("{name}_resets"), t.resets.load(Relaxed));
        r.add(&format!("{name}_replayed"), t.replayed.load(Relaxed));
        r.add(&format!("{name}_skipped_ticks"), t.skipped_ticks.load(Relaxed));
        r.add(&format!("{name}_errors"), t.errors.load(Relaxed));
        r.add(&format!("{name}_lost_conns"), t.lost.load(Relaxed));
    }
    if let Some(b) = behind {
        r.add("behind_at_end", b);
        r.add("behind_ticks", behind_ticks.unwrap_or(0));
    }
    let mut storm_unserved = 0;
    if a.storm > 0 {
        let served = env.storm_served.load(Relaxed);
        storm_unserved = (a.storm as u64).saturating_sub(served);
        r.add("storm_clients", a.storm as u64);
        r.add("storm_per_sub", storm_k as u64);
        r.add("storm_back", a.storm_back);
        r.add("storm_at_s", a.storm_at);
        r.add("storm_stay", a.storm_stay);
        r.add("storm_subscribed", env.storm_subscribed.load(Relaxed));
        r.add("storm_fail", env.storm_fail.load(Relaxed));
        r.add("storm_served", served);
        r.add("storm_owed_replay", storm_owed);
        let sh_ = env.storm_hist.lock().unwrap();
        if !sh_.is_empty() {
            r.add("storm_served_p50_ms", ms(sh_.value_at_quantile(0.5)));
            r.add("storm_served_p99_ms", ms(sh_.value_at_quantile(0.99)));
            r.add("storm_served_max_ms", ms(sh_.max()));
        }
        drop(sh_);
        // The server's CPU from the storm's start to its last client served.
        let (sa, sb) = *env.storm_sched.lock().unwrap();
        let (s0, s1) = (storm_start_ns, env.storm_last_served_ns.load(Relaxed));
        if let (Some(sa), Some(sb)) = (sa, sb)
            && s1 > s0
        {
            let cpu = sb.0.saturating_sub(sa.0);
            r.add("storm_server_cpu_ms", ms(cpu));
            r.add(
                "storm_server_cpu_pct",
                (cpu as f64 * 1000.0 / (s1 - s0) as f64).round() / 10.0,
            );
        }
    }
    r.add("errors", sum(|g| &g.errors));
    r.add(
        "client_cpu_pct",
        ((cpu_b - cpu_a).as_secs_f64() * 1000.0 / (secs + a.drain)).round() / 10.0,
    );
    common::add_sched(&mut r, sched_a, sched_b, secs);
    let mut fails = Vec::new();
    if gaps > 0 {
        fails.push("gaps");
    }
    if dups > 0 {
        fails.push("duplicates");
    }
    if behind.is_some_and(|b| b > 0) {
        fails.push("behind at the end");
    }
    if storm_unserved > 0 {
        fails.push("storm clients not served");
    }
    r.add(
        "result",
        if fails.is_empty() {
            "PASS".to_string()
        } else {
            format!("FAIL: {}", fails.join(", "))
        },
    );
    println!("== recover{} ==", a.common.label_suffix());
    r.print(a.common.json);
    if exit == 0 && !fails.is_empty() {
        exit = 1;
    }
    exit
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: RecoverArgs,
    }

    fn env() -> Env {
        let a = T::parse_from(["t", "--key", "k"]).a;
        Env::new(Arc::new(Shared::new(false, false)), &a)
    }

    fn tick(s: &str, seq: u64, extra: &str) -> Vec<u8> {
        format!(r#"{{"type":"tick","s":"{s}","seq":{seq},"ts":5,"bid":1.0{extra}}}"#).into_bytes()
    }

    #[test]
    fn the_checker_tells_gaps_duplicates_conflation_and_resets_apart() {
        let env = env();
        let mut c = Client::new(0, RECONN, vec!["A".into(), "B".into()]);
        let feed = |c: &mut Client, m: Vec<u8>| c.on_text(&m, 10, 10, 0, u64::MAX, &env);
        // The first tick of a symbol is its baseline, whatever its seq.
        feed(&mut c, tick("A", 7, ""));
        feed(&mut c, tick("A", 8, ""));
        feed(&mut c, tick("B", 1, ""));
        // A jump explained by `skipped`: conflation, not a gap.
        feed(&mut c, tick("A", 11, r#","skipped":2"#));
        assert_eq!(
            (c.tally.gaps, c.tally.skipped_msgs, c.tally.skipped_ticks),
            (0, 1, 2)
        );
        // A jump not explained, or explained only in part: gaps.
        feed(&mut c, tick("A", 14, ""));
        feed(&mut c, tick("A", 20, r#","skipped":1"#));
        assert_eq!((c.tally.gaps, c.tally.gap_ticks), (2, 2 + 4));
        // At or below the last seq: duplicates, and the last seq stays.
        feed(&mut c, tick("A", 20, ""));
        feed(&mut c, tick("A", 3, ""));
        assert_eq!(c.tally.dups, 2);
        assert_eq!(c.syms[0].last, Some(20));
        // A reset snapshot replaces the state, even backwards; the next tick follows it.
        feed(
            &mut c,
            br#"{"type":"snapshot","s":"B","seq":40,"ts":5,"bid":1.0,"reset":true}"#.to_vec(),
        );
        feed(&mut c, tick("B", 41, ""));
        assert_eq!((c.tally.resets, c.tally.gaps), (1, 2));
        // Ticks stamped before the re-subscribe are replayed; the others are live.
        c.live_from_ns = 6;
        feed(&mut c, tick("B", 42, ""));
        assert_eq!(c.tally.replayed, 1);
        assert_eq!(c.lat.len(), 7, "live window ticks measured (duplicates not)");
        assert_eq!(c.tally.errors, 0);
        feed(&mut c, tick("Z", 1, ""));
        assert_eq!(c.tally.errors, 1, "a symbol not subscribed to");
    }

    #[test]
    fn a_storm_client_is_served_at_its_head_and_resubscribes_with_since() {
        let env = env();
        let mut c = Client::new(0, STORM, vec!["A".into(), "B".into()]);
        for (s, h) in c.syms.iter_mut().zip([10, 20]) {
            s.head = h;
            s.last = Some(h - 2);
        }
        assert_eq!(
            c.subscribe_json(true, 0),
            r#"{"op":"subscribe","id":1,"symbols":["A","B"],"since":{"A":8,"B":18}}"#
        );
        assert_eq!(
            c.subscribe_json(true, -1),
            r#"{"op":"subscribe","id":1,"symbols":["A","B"],"since":{"A":7,"B":17}}"#
        );
        for m in [tick("A", 9, ""), tick("A", 10, ""), tick("B", 19, "")] {
            c.on_text(&m, 10, 10, 0, u64::MAX, &env);
        }
        assert!(!c.caught_up());
        c.on_text(&tick("B", 20, ""), 10, 10, 0, u64::MAX, &env);
        assert!(c.caught_up());
        assert_eq!((c.tally.replayed, c.tally.gaps), (4, 0));
        // No since before any tick.
        let fresh = Client::new(1, RECONN, vec!["A".into()]);
        assert_eq!(
            fresh.subscribe_json(true, 0),
            r#"{"op":"subscribe","id":1,"symbols":["A"]}"#
        );
    }

    #[test]
    fn the_reconnecting_share_is_exact_and_spread() {
        let picked: Vec<usize> = (0..200).filter(|&i| reconnects(i, 0.3)).collect();
        assert_eq!(picked.len(), 60);
        assert!(picked.windows(2).all(|w| w[1] - w[0] <= 4));
        assert_eq!((0..10).filter(|&i| reconnects(i, 1.0)).count(), 10);
        assert_eq!((0..10).filter(|&i| reconnects(i, 0.0)).count(), 0);
    }
}
