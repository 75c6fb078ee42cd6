//! `fanout` and `reauth` modes: N lean subscribers x K of S symbols, one publisher at R
//! ticks/s (tokio-tungstenite) or the server's simulator; latency from the tick's `ts` to
//! receipt, delivery against the exact expectation, `seq` gaps, reauth counts.
//!
//! Measurement window: a tick belongs to the window when its `ts` (stamped by the publisher
//! from the same clock) is in `[t0, t1)`. The publisher counts window ticks per symbol; the
//! expected deliveries are `sum(ticks[s] * subscribers[s])`; subscribers count the window
//! ticks they receive until a drain period after `t1`. With `--rates a,b,c` the same
//! connections run several steps in a row (the zero-drop search of compare.sh).

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use clap::Args;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use tickgate::auth::jwt::VerifyPolicy;

use crate::common::{self, Common, Ctx, Report, Scenario, histogram, now_ns, percentiles, us};
use crate::lean;
use crate::plot::HistOut;

#[derive(Args, Debug, Clone)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub scenario: Scenario,
    /// Several rates in a row on the same connections (e.g. 1000,5000,10000); overrides --rate.
    #[arg(long, value_delimiter = ',')]
    pub rates: Vec<u64>,
    /// With --rates: stop after the first step that drops.
    #[arg(long)]
    pub stop_on_drop: bool,
    /// Warm-up seconds per step (ticks sent, not measured).
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Measured seconds per step.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds to wait after a step for in-flight ticks.
    #[arg(long, default_value_t = 1.0)]
    pub drain: f64,
    /// Publisher batch period, ms.
    #[arg(long, default_value_t = 1)]
    pub batch_ms: u64,
    /// Use the server's simulator instead of a publisher (symbols from --sim-symbols).
    #[arg(long)]
    pub simulator: bool,
    #[arg(long, default_value = "BTC-USD,ETH-USD", value_delimiter = ',')]
    pub sim_symbols: Vec<String>,
    /// The simulator's ticks/s per symbol (for the coordinated-omission interval).
    #[arg(long, default_value_t = 10)]
    pub sim_rate: u64,
    /// Concurrent connection attempts while connecting.
    #[arg(long, default_value_t = 128)]
    pub connect_concurrency: usize,
    /// Also apply HdrHistogram's coordinated-omission correction (record_correct with the
    /// per-subscriber expected inter-tick interval, at most 1,000 synthetic values per
    /// sample). Off by default: the publisher is open-loop and stamps late ticks with their
    /// due time, so every tick is measured and nothing is omitted; the correction would
    /// double-count and, at millions of samples per second, starve the client.
    #[arg(long)]
    pub co_correct: bool,
    /// Subscribers offer permessage-deflate (`permessage-deflate; client_max_window_bits`,
    /// what browsers send) and inflate what comes compressed (the server needs
    /// `compression.enabled`); `wire_bytes_per_msg` then shows the saving.
    #[arg(long)]
    pub deflate: bool,
    /// The server's pid: report its CPU and run-queue wait during the window (schedstat).
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Give up connecting after this many seconds.
    #[arg(long, default_value_t = 60.0)]
    pub connect_timeout: f64,
    /// Scheduling of the publisher thread: `fifo` (SCHED_FIFO 1, falling back to nice -10
    /// and then to normal when not permitted), `nice` or `normal`. It shares a core with the
    /// subscribers' runtime; at normal priority its 1 ms timer can wait a whole scheduler
    /// slice behind a busy reader (tens of ms), and since late ticks carry their due time
    /// that wait was reported as server latency.
    #[arg(long, value_enum, default_value_t = PubPriority::Fifo)]
    pub pub_priority: PubPriority,
    /// Several nodes: subscriber i connects to the i-th of [--target, these...] in turn.
    #[arg(long, value_delimiter = ',')]
    pub also_target: Vec<std::net::SocketAddr>,
    /// Feed the ticks through NATS (a tickgate cluster's feed subjects) instead of a
    /// WebSocket publisher: one message per tick on `<nats-prefix>.in.<SYMBOL>`.
    #[arg(long)]
    pub nats: Option<String>,
    #[arg(long, default_value = "tickgate")]
    pub nats_prefix: String,
    #[command(flatten)]
    pub out: HistOut,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum PubPriority {
    Fifo,
    Nice,
    Normal,
}

/// Raises the calling thread's priority as asked; returns what took effect.
fn raise_priority(want: PubPriority) -> &'static str {
    if want == PubPriority::Fifo {
        let p = libc::sched_param { sched_priority: 1 };
        // SAFETY: sched_setscheduler reads one valid sched_param; pid 0 is this thread.
        if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &p) } == 0 {
            return "fifo";
        }
    }
    if want != PubPriority::Normal && tickgate::rt::set_thread_nice(-10) {
        return "nice";
    }
    "normal"
}

/// This thread's nice value (Linux: per thread).
fn current_nice() -> libc::c_int {
    // SAFETY: plain integers; `0` is this thread.
    unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
}

/// Back to SCHED_OTHER at `nice`: the publisher runs on tokio's blocking pool, whose
/// threads are reused.
fn restore_priority(nice: libc::c_int) {
    let p = libc::sched_param { sched_priority: 0 };
    // SAFETY: as in `raise_priority`: one valid sched_param, and `0` is this thread.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_OTHER, &p) };
    tickgate::rt::set_thread_nice(nice);
}

const NHIST: usize = 16;

#[derive(Default)]
struct Counters {
    subscribed: AtomicU64,
    connect_fail: AtomicU64,
    upgrade_fail: AtomicU64,
    closed: AtomicU64,
    window_rx: AtomicU64,
    seq_gaps: AtomicU64,
    seq_backwards: AtomicU64,
    skipped_msgs: AtomicU64,
    errors: AtomicU64,
    reauth_req: AtomicU64,
    reauth_ok: AtomicU64,
    reauth_fail: AtomicU64,
}

/// What the subscribers and the publisher share. `recover.rs` uses it for the publisher
/// only (the window `[t0, t1)` and the publisher's lag).
pub(crate) struct Shared {
    pub(crate) t0: AtomicU64,
    pub(crate) t1: AtomicU64,
    c: Counters,
    interval_ns: AtomicU64,
    co_correct: bool,
    deflate: bool,
    /// Bytes read by the subscribers in the measured window (frames as on the wire).
    wire_bytes: AtomicU64,
    pub(crate) pub_max_lag_ns: AtomicU64,
    hists: Vec<Mutex<Histogram<u64>>>,
    hs_hist: Mutex<Histogram<u64>>,
}

impl Shared {
    /// No window yet (`t0` = `t1` = never).
    pub(crate) fn new(co_correct: bool, deflate: bool) -> Shared {
        Shared {
            t0: AtomicU64::new(u64::MAX),
            t1: AtomicU64::new(u64::MAX),
            c: Counters::default(),
            interval_ns: AtomicU64::new(0),
            co_correct,
            deflate,
            wire_bytes: AtomicU64::new(0),
            pub_max_lag_ns: AtomicU64::new(0),
            hists: (0..NHIST).map(|_| Mutex::new(histogram())).collect(),
            hs_hist: Mutex::new(histogram()),
        }
    }
}

pub fn main(a: FanoutArgs, reauth: bool) -> i32 {
    let bounds = if a.scenario.subscribers == 0
        || a.scenario.subscribers > 200_000
        || a.duration > 600.0
        || a.warmup > 120.0
    {
        Err("1..=200000 subscribers, duration <= 600 s, warmup <= 120 s")
    } else {
        Ok(())
    };
    let steps = if a.simulator { 1 } else { a.rates.len().max(1) };
    if let Err(e) = a.out.check(steps) {
        eprintln!("loadgen: {e}");
        return 1;
    }
    common::launch(&a.common.clone(), bounds, move |ctx| run(a, ctx, reauth))
}

/// Each subscriber's `k` symbols (deterministic from the seed), how many subscribers each
/// symbol has, and `k`.
fn assign(a: &FanoutArgs, names: &[String]) -> (Vec<Vec<usize>>, Vec<u64>, usize) {
    let subs = common::assignment(
        a.scenario.subscribers,
        names.len(),
        a.scenario.per_sub,
        a.scenario.seed,
    );
    let mut per_sym = vec![0u64; names.len()];
    for &m in subs.iter().flatten() {
        per_sym[m] += 1;
    }
    let k = subs.first().map_or(1, Vec::len);
    (subs, per_sym, k)
}

async fn run(a: FanoutArgs, ctx: Arc<Ctx>, reauth: bool) -> i32 {
    let names: Vec<String> = if a.simulator {
        a.sim_symbols.clone()
    } else {
        (0..a.scenario.symbols.max(1))
            .map(|i| format!("S{i:04}"))
            .collect()
    };
    let (assignment, per_sym, k) = assign(&a, &names);
    let k = k as u64;
    let rates: Vec<u64> = if a.simulator {
        vec![0]
    } else if a.rates.is_empty() {
        vec![a.scenario.rate]
    } else {
        a.rates.clone()
    };
    let mode = if reauth { "reauth" } else { "fanout" };
    let sh = Arc::new(Shared::new(a.co_correct, a.deflate));
    let ttl = if reauth && a.common.ttl == 300 {
        20
    } else {
        a.common.ttl
    };

    // Tokens up front (signing is not what we measure).
    let tokens: Vec<String> = (0..a.scenario.subscribers)
        .map(|i| ctx.token(&format!("lg-{i}"), &format!("s-{i}"), &["subscriber"], ttl))
        .collect();

    // Reauth tokens for the whole run, every step of a rate search included (a reauth at
    // least every ttl/2 seconds), so none runs out mid-measurement. Two caps: token k lives
    // `ttl * (k + 2)` s from now, which must stay within the server's
    // `auth.max_token_lifetime` (its default policy's) or the reauth is refused; and at most
    // 2,000,000 tokens in all. Past either, tokens are minted live when needed.
    let run_s = a.connect_timeout + rates.len() as f64 * (a.warmup + a.duration + a.drain);
    let rounds = ((run_s / (ttl as f64 / 2.0).max(1.0)).ceil() as usize + 2)
        .min((VerifyPolicy::default().max_lifetime_secs / ttl.max(1)).saturating_sub(2) as usize)
        .min(2_000_000 / a.scenario.subscribers.max(1));

    // Several nodes: subscribers are spread over them in turn.
    let mut nodes = vec![ctx.clone()];
    nodes.extend(a.also_target.iter().map(|t| Arc::new(ctx.with_target(*t))));
    let sem = Arc::new(Semaphore::new(a.connect_concurrency.max(1)));
    let cpu0 = common::cpu_time();
    let t_conn = Instant::now();
    let mut tasks = Vec::with_capacity(a.scenario.subscribers);
    for (i, (syms, token)) in assignment.iter().zip(tokens).enumerate() {
        let sub_json = format!(
            r#"{{"op":"subscribe","id":1,"symbols":[{}]}}"#,
            syms.iter()
                .map(|&s| format!("\"{}\"", names[s]))
                .collect::<Vec<_>>()
                .join(",")
        );
        let my: Vec<Vec<u8>> = syms.iter().map(|&s| names[s].clone().into_bytes()).collect();
        tasks.push(tokio::spawn(subscriber(
            i,
            nodes[i % nodes.len()].clone(),
            sh.clone(),
            sem.clone(),
            token,
            sub_json,
            my,
            reauth.then(|| {
                (
                    ttl,
                    ctx.reauth_tokens(
                        &format!("lg-{i}"),
                        &format!("s-{i}"),
                        &["subscriber"],
                        ttl,
                        rounds,
                    ),
                )
            }),
        )));
    }
    let n = a.scenario.subscribers as u64;
    let deadline = Instant::now() + Duration::from_secs_f64(a.connect_timeout);
    loop {
        let c = &sh.c;
        let done = c.subscribed.load(Relaxed)
            + c.connect_fail.load(Relaxed)
            + c.upgrade_fail.load(Relaxed)
            + c.closed.load(Relaxed);
        if done >= n || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let connect_secs = t_conn.elapsed().as_secs_f64();
    let subscribed = sh.c.subscribed.load(Relaxed);
    let hs = sh.hs_hist.lock().unwrap().clone();
    let cpu_connect = common::cpu_time() - cpu0;
    eprintln!(
        "loadgen: {subscribed}/{n} subscribed in {connect_secs:.2} s ({} connect failures, {} upgrade failures)",
        sh.c.connect_fail.load(Relaxed),
        sh.c.upgrade_fail.load(Relaxed)
    );
    if subscribed == 0 {
        eprintln!("loadgen: no subscriber; is the server up at {}?", ctx.target);
        return 2;
    }

    let mut exit = 0;
    let mut best_zero_drop: Option<u64> = None;
    let sched = Arc::new(std::sync::OnceLock::<&'static str>::new());
    // Each step's histogram, for --plot / --save-hist.
    let mut step_hists: Vec<(String, Histogram<u64>)> = Vec::new();
    for (step, &rate) in rates.iter().enumerate() {
        let interval = if a.simulator {
            1_000_000_000 / (a.sim_rate.max(1) * k)
        } else {
            (names.len() as u64 * 1_000_000_000) / (rate.max(1) * k)
        };
        sh.interval_ns.store(interval, Relaxed);
        sh.pub_max_lag_ns.store(0, Relaxed);
        for h in &sh.hists {
            h.lock().unwrap().reset();
        }
        let before = CounterSnapshot::take(&sh.c);
        sh.c.window_rx.store(0, Relaxed);
        sh.wire_bytes.store(0, Relaxed);
        let stop = Arc::new(AtomicBool::new(false));
        let publ = if a.simulator {
            None
        } else {
            Some(spawn_publisher(
                PubSpec {
                    core: None,
                    ctx: ctx.clone(),
                    sh: sh.clone(),
                    names: names.clone(),
                    rate,
                    batch_ms: a.batch_ms,
                    prio: a.pub_priority,
                    nats: a.nats.clone().map(|u| (u, a.nats_prefix.clone())),
                    step,
                },
                sched.clone(),
                stop.clone(),
            ))
        };
        tokio::time::sleep(Duration::from_secs_f64(a.warmup)).await;
        let t0 = now_ns();
        let cpu_a = common::cpu_time();
        let sched_a = a.server_pid.and_then(common::schedstat);
        sh.t0.store(t0, Relaxed);
        sh.t1.store(u64::MAX, Relaxed);
        tokio::time::sleep(Duration::from_secs_f64(a.duration)).await;
        let t1 = now_ns();
        sh.t1.store(t1, Relaxed);
        let sched_b = a.server_pid.and_then(common::schedstat);
        let secs = (t1 - t0) as f64 / 1e9;
        stop.store(true, Relaxed);
        let pstats = match publ {
            Some(p) => match join_publisher(p).await {
                Ok(s) => Some(s),
                Err(e) => {
                    eprintln!("loadgen: {e}");
                    exit = 2;
                    None
                }
            },
            None => None,
        };
        tokio::time::sleep(Duration::from_secs_f64(a.drain)).await;
        let cpu_b = common::cpu_time();
        let after = CounterSnapshot::take(&sh.c);
        let mut h = histogram();
        for x in &sh.hists {
            h.add(&*x.lock().unwrap()).ok();
        }
        let received = sh.c.window_rx.load(Relaxed);
        let mut r = Report::new(mode, &a.common.label);
        r.add("target", ctx.target.to_string());
        r.add("subscribers", n);
        r.add("subscribed", subscribed);
        r.add("symbols", names.len() as u64);
        r.add("per_sub", k);
        if a.simulator {
            r.add("source", "simulator");
        } else {
            r.add("rate_ticks_per_s", rate);
        }
        r.add("duration_s", (secs * 100.0).round() / 100.0);
        for (name, v) in percentiles(&h) {
            r.add(name, v);
        }
        r.add("delivered_per_s", (received as f64 / secs).round());
        if received > 0 {
            let wire = sh.wire_bytes.load(Relaxed) as f64 / received as f64;
            r.add("wire_bytes_per_msg", (wire * 10.0).round() / 10.0);
        }
        r.add("deflate", a.deflate);
        // Deliveries owed in the window: each published tick times its symbol's subscribers.
        let expected: Option<u64> = pstats
            .as_ref()
            .map(|p| p.window_counts.iter().zip(&per_sym).map(|(t, s)| t * s).sum());
        if let (Some(p), Some(expected)) = (&pstats, expected) {
            r.add("published_window", p.window_counts.iter().sum::<u64>());
            r.add("expected", expected);
            r.add("received", received);
            r.add("drops", expected.saturating_sub(received));
            r.add(
                "delivery_pct",
                if expected == 0 {
                    0.0
                } else {
                    (received as f64 * 10000.0 / expected as f64).round() / 100.0
                },
            );
            r.add("pub_acked_ticks", p.acked);
            r.add("pub_errors", p.errors);
            r.add("pub_max_lag_us", us(sh.pub_max_lag_ns.load(Relaxed)));
            r.add("pub_sched", *sched.get().unwrap_or(&"normal"));
            if expected > 0 && received >= expected && p.errors == 0 && after.closed == before.closed {
                best_zero_drop = Some(best_zero_drop.map_or(rate, |b: u64| b.max(rate)));
            }
        } else {
            r.add("received", received);
        }
        let d = after.since(&before);
        r.add("seq_gaps", d.seq_gaps);
        r.add("seq_backwards", d.seq_backwards);
        r.add("skipped_msgs", d.skipped_msgs);
        r.add("errors", d.errors);
        r.add("closed_conns", after.closed);
        if reauth {
            r.add("reauth_required", d.reauth_req);
            r.add("reauthed", d.reauth_ok);
            r.add("reauth_failed", d.reauth_fail);
            r.add("token_ttl_s", ttl);
        }
        r.add("connect_s", (connect_secs * 1000.0).round() / 1000.0);
        r.add("connect_per_s", (subscribed as f64 / connect_secs).round());
        if !hs.is_empty() {
            r.add("handshake_p50_us", us(hs.value_at_quantile(0.5)));
            r.add("handshake_p99_us", us(hs.value_at_quantile(0.99)));
        }
        r.add(
            "client_cpu_pct",
            ((cpu_b - cpu_a).as_secs_f64() * 1000.0 / (secs + a.drain)).round() / 10.0,
        );
        common::add_sched(&mut r, sched_a, sched_b, secs);
        if step == 0 {
            r.add(
                "client_cpu_connect_s",
                (cpu_connect.as_secs_f64() * 100.0).round() / 100.0,
            );
        }
        if rates.len() > 1 {
            r.add("step", step as u64);
        }
        println!("== {mode} step {step}{} ==", a.common.label_suffix());
        r.print(a.common.json);
        if a.out.plot.is_some() || a.out.save_hist.is_some() {
            let base = if a.common.label.is_empty() {
                mode
            } else {
                &a.common.label
            };
            let label = if rates.len() > 1 {
                format!("{base} @ {rate} ticks/s")
            } else {
                base.to_string()
            };
            step_hists.push((label, h));
        }
        let dropped = pstats
            .as_ref()
            .zip(expected)
            .is_some_and(|(p, e)| received < e || p.errors > 0);
        if dropped && a.stop_on_drop {
            break;
        }
    }
    if rates.len() > 1 {
        let best = best_zero_drop.unwrap_or(0);
        let deliveries = best as f64 * k as f64 * n as f64 / names.len() as f64;
        println!(
            "== zero-drop search{} ==\n  max_zero_drop_rate_ticks_per_s  {best}\n  max_zero_drop_deliveries_per_s  {}",
            a.common.label_suffix(),
            deliveries.round()
        );
        if a.common.json {
            println!(
                "{}",
                serde_json::json!({"mode":"search","label":a.common.label,
                    "max_zero_drop_rate_ticks_per_s":best,
                    "max_zero_drop_deliveries_per_s":deliveries.round()})
            );
        }
    }
    for t in &tasks {
        t.abort();
    }
    if a.out.plot.is_some() || a.out.save_hist.is_some() {
        let source = if a.simulator {
            "the server's simulator".to_string()
        } else if rates.len() > 1 {
            format!(
                "{} ticks/s",
                a.rates.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
            )
        } else {
            format!("{} ticks/s", rates[0])
        };
        let note = format!(
            "loadgen {mode}: {n} subscribers x {k} of {} symbols, {source}, {} s per step",
            names.len(),
            a.duration
        );
        let code = a
            .out
            .write(&step_hists, "Latency by percentile distribution", &note);
        if exit == 0 {
            exit = code;
        }
    }
    exit
}

/// The window-relevant counters at one instant; two of them bracket a step.
#[derive(Clone, Copy, Default)]
struct CounterSnapshot {
    seq_gaps: u64,
    seq_backwards: u64,
    skipped_msgs: u64,
    errors: u64,
    closed: u64,
    reauth_req: u64,
    reauth_ok: u64,
    reauth_fail: u64,
}

impl CounterSnapshot {
    fn take(c: &Counters) -> Self {
        Self {
            seq_gaps: c.seq_gaps.load(Relaxed),
            seq_backwards: c.seq_backwards.load(Relaxed),
            skipped_msgs: c.skipped_msgs.load(Relaxed),
            errors: c.errors.load(Relaxed),
            closed: c.closed.load(Relaxed),
            reauth_req: c.reauth_req.load(Relaxed),
            reauth_ok: c.reauth_ok.load(Relaxed),
            reauth_fail: c.reauth_fail.load(Relaxed),
        }
    }

    /// Field-wise `self - earlier`, saturating at zero.
    fn since(&self, earlier: &Self) -> Self {
        Self {
            seq_gaps: self.seq_gaps.saturating_sub(earlier.seq_gaps),
            seq_backwards: self.seq_backwards.saturating_sub(earlier.seq_backwards),
            skipped_msgs: self.skipped_msgs.saturating_sub(earlier.skipped_msgs),
            errors: self.errors.saturating_sub(earlier.errors),
            closed: self.closed.saturating_sub(earlier.closed),
            reauth_req: self.reauth_req.saturating_sub(earlier.reauth_req),
            reauth_ok: self.reauth_ok.saturating_sub(earlier.reauth_ok),
            reauth_fail: self.reauth_fail.saturating_sub(earlier.reauth_fail),
        }
    }
}

/// Per-connection state of a lean subscriber.
struct Conn {
    /// (symbol, last seq seen) for this connection's symbols.
    syms: Vec<(Vec<u8>, u64)>,
    lat: Vec<u64>,
    window_rx: u64,
    gaps: u64,
    backwards: u64,
    skipped: u64,
    errors: u64,
    need_reauth: bool,
    reauth_pending: bool,
}

#[allow(clippy::too_many_arguments)]
async fn subscriber(
    i: usize,
    ctx: Arc<Ctx>,
    sh: Arc<Shared>,
    sem: Arc<Semaphore>,
    token: String,
    sub_json: String,
    syms: Vec<Vec<u8>>,
    reauth_ttl: Option<(u64, Vec<String>)>,
) {
    // Pre-minted reauth tokens, used in order; minted live only if they run out.
    let (reauth_ttl, mut reauth_tokens) = match reauth_ttl {
        Some((ttl, toks)) => (Some(ttl), toks.into_iter()),
        None => (None, Vec::new().into_iter()),
    };
    let c = &sh.c;
    let permit = sem.acquire_owned().await;
    let t = Instant::now();
    let mut s = match lean::Stream::connect(&ctx, ctx.source(i)).await {
        Ok(s) => s,
        Err(_) => {
            c.connect_fail.fetch_add(1, Relaxed);
            return;
        }
    };
    let mut buf = vec![0u8; 4096];
    let mut req = lean::upgrade_request(&ctx.host, &token);
    if sh.deflate {
        // Before the blank line that ends the head.
        req.truncate(req.len() - 2);
        req.extend_from_slice(
            b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n",
        );
    }
    let mut inflater = sh
        .deflate
        .then(|| tickgate::proto::deflate::Inflater::new(15, false));
    let mut inflated = Vec::new();
    drop(token);
    let mut end = match lean::upgrade(&mut s, &req, &mut buf).await {
        Ok((101, rest)) => rest,
        _ => {
            c.upgrade_fail.fetch_add(1, Relaxed);
            return;
        }
    };
    sh.hs_hist
        .lock()
        .unwrap()
        .record(t.elapsed().as_nanos() as u64)
        .ok();
    drop(permit);
    let mut out = Vec::with_capacity(256);
    lean::text_frame(sub_json.as_bytes(), &mut out);
    drop(sub_json);
    if s.write_all(&out).await.is_err() {
        c.closed.fetch_add(1, Relaxed);
        return;
    }
    out.clear();
    buf.resize(128 * 1024, 0);
    let mut st = Conn {
        syms: syms.into_iter().map(|s| (s, 0)).collect(),
        lat: Vec::with_capacity(512),
        window_rx: 0,
        gaps: 0,
        backwards: 0,
        skipped: 0,
        errors: 0,
        need_reauth: false,
        reauth_pending: false,
    };
    let hist = &sh.hists[i % NHIST];
    let mut reauth_id: u64 = 100;
    loop {
        let now = now_ns();
        let t0 = sh.t0.load(Relaxed);
        let t1 = sh.t1.load(Relaxed);
        let mut start = 0usize;
        let mut closed = false;
        let mut wire = 0u64;
        while let Some(f) = lean::parse_frame(&buf[start..end]) {
            let payload = &buf[start + f.start..start + f.end];
            wire += f.end as u64;
            match f.opcode {
                1 | 0 if f.rsv1 => {
                    inflated.clear();
                    let ok = inflater.as_mut().is_some_and(|d| {
                        d.feed(payload, &mut inflated, 1 << 20).is_ok()
                            && d.finish(&mut inflated, 1 << 20).is_ok()
                    });
                    if ok {
                        on_text(&mut st, &inflated, now, t0, t1, c);
                    } else {
                        st.errors += 1;
                    }
                }
                1 | 0 => on_text(&mut st, payload, now, t0, t1, c),
                9 => lean::pong_frame(payload, &mut out),
                8 => closed = true,
                _ => {}
            }
            start += f.end;
        }
        if now >= t0 && now < t1 {
            sh.wire_bytes.fetch_add(wire, Relaxed);
        }
        if start > 0 {
            buf.copy_within(start..end, 0);
            end -= start;
        }
        if end == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        // Flush this batch's counters.
        if !st.lat.is_empty() {
            let mut h = hist.lock().unwrap();
            if sh.co_correct {
                let interval = sh.interval_ns.load(Relaxed);
                for &v in &st.lat {
                    // Bounded: at most 1,000 synthetic values per sample.
                    h.record_correct(v.max(1), interval.max(v / 1000)).ok();
                }
            } else {
                for &v in &st.lat {
                    h.record(v.max(1)).ok();
                }
            }
            drop(h);
            st.lat.clear();
        }
        flush(&mut st, c);
        if st.need_reauth {
            st.need_reauth = false;
            if let Some(ttl) = reauth_ttl {
                let tok = reauth_tokens.next().unwrap_or_else(|| {
                    ctx.token(&format!("lg-{i}"), &format!("s-{i}"), &["subscriber"], ttl)
                });
                reauth_id += 1;
                let m = format!(r#"{{"op":"reauth","id":{reauth_id},"token":"{tok}"}}"#);
                lean::text_frame(m.as_bytes(), &mut out);
                st.reauth_pending = true;
            }
        }
        if !out.is_empty() {
            if s.write_all(&out).await.is_err() {
                closed = true;
            }
            out.clear();
        }
        if closed {
            c.closed.fetch_add(1, Relaxed);
            return;
        }
        match s.read(&mut buf[end..]).await {
            Ok(0) | Err(_) => {
                c.closed.fetch_add(1, Relaxed);
                return;
            }
            Ok(n) => end += n,
        }
    }
}

fn flush(st: &mut Conn, c: &Counters) {
    use crate::common::flush_count as take;
    take(&mut st.window_rx, &c.window_rx);
    take(&mut st.gaps, &c.seq_gaps);
    take(&mut st.backwards, &c.seq_backwards);
    take(&mut st.skipped, &c.skipped_msgs);
    take(&mut st.errors, &c.errors);
}

#[inline]
fn on_text(st: &mut Conn, p: &[u8], now: u64, t0: u64, t1: u64, c: &Counters) {
    let Some(ty) = lean::msg_type(p) else {
        st.errors += 1;
        return;
    };
    match ty {
        b"tick" => {
            let (Some(sym), Some(seq), Some(ts)) = (
                lean::field_str(p, b"\"s\":\""),
                lean::field_u64(p, b"\"seq\":"),
                lean::field_u64(p, b"\"ts\":"),
            ) else {
                st.errors += 1;
                return;
            };
            if let Some(e) = st.syms.iter_mut().find(|e| e.0 == sym) {
                if e.1 != 0 && seq != e.1 + 1 {
                    if seq > e.1 {
                        st.gaps += 1;
                        if lean::find(p, b"\"skipped\":").is_some() {
                            st.skipped += 1;
                        }
                    } else {
                        st.backwards += 1;
                    }
                }
                e.1 = seq;
            }
            if ts >= t0 && ts < t1 {
                st.window_rx += 1;
                st.lat.push(now.saturating_sub(ts));
            }
        }
        b"subscribed" => {
            c.subscribed.fetch_add(1, Relaxed);
        }
        b"reauth_required" => {
            c.reauth_req.fetch_add(1, Relaxed);
            st.need_reauth = true;
        }
        b"reauthed" => {
            c.reauth_ok.fetch_add(1, Relaxed);
            st.reauth_pending = false;
        }
        b"error" => {
            st.errors += 1;
            if st.reauth_pending {
                st.reauth_pending = false;
                c.reauth_fail.fetch_add(1, Relaxed);
            }
        }
        _ => {}
    }
}

pub(crate) struct PubStats {
    /// Ticks per symbol stamped within the window `[t0, t1)`.
    pub(crate) window_counts: Vec<u64>,
    pub(crate) acked: u64,
    pub(crate) errors: u64,
}

/// What a publisher run needs: where, which symbols, how fast, and (for a cluster) the
/// NATS URL and subject prefix instead of a WebSocket.
pub(crate) struct PubSpec {
    pub(crate) ctx: Arc<Ctx>,
    pub(crate) sh: Arc<Shared>,
    pub(crate) names: Vec<String>,
    pub(crate) rate: u64,
    pub(crate) batch_ms: u64,
    pub(crate) prio: PubPriority,
    pub(crate) nats: Option<(String, String)>,
    /// Names the publisher's token (one per step).
    pub(crate) step: usize,
    /// Pin the publisher's thread to this core (`--pub-core`; default: the process's cores).
    pub(crate) core: Option<usize>,
}

/// The calling thread's CPU mask, to put back after pinning (the publisher runs on
/// tokio's blocking pool, whose threads are reused).
fn current_affinity() -> Option<libc::cpu_set_t> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity writes at most its
    // size into it; pid 0 is this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        (libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0).then_some(set)
    }
}

fn restore_affinity(set: &libc::cpu_set_t) {
    // SAFETY: sched_setaffinity reads one valid cpu_set_t; pid 0 is this thread.
    unsafe {
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), set);
    }
}

/// Starts the publisher, which runs until `stop`; `sched` records the priority that took
/// effect.
///
/// The publisher gets a thread and runtime of its own: on the subscribers' runtime its 1 ms
/// timer waited behind thousands of ready reader tasks (up to 28 ms with 10,000 subscribers
/// on one worker), and a late publisher stamps ticks with their due time, so the
/// generator's own backlog was reported as server latency. The kernel wakes this thread
/// promptly instead.
pub(crate) fn spawn_publisher(
    p: PubSpec,
    sched: Arc<std::sync::OnceLock<&'static str>>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Result<PubStats, String>> {
    let batch_ms = p.batch_ms.max(1);
    tokio::task::spawn_blocking(move || {
        let nice = current_nice();
        let mask = p.core.and_then(|c| {
            let old = current_affinity();
            if !tickgate::rt::pin_to_core(c) {
                eprintln!("loadgen: could not pin the publisher to core {c}");
            }
            old
        });
        let _ = sched.set(raise_priority(p.prio));
        let r = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("publisher runtime: {e}"))
            .and_then(|rt| {
                rt.block_on(async {
                    match p.nats {
                        Some((url, prefix)) => {
                            nats_publisher(&url, &prefix, p.sh, p.names, p.rate, batch_ms, stop).await
                        }
                        None => publisher(p.ctx, p.sh, p.names, p.rate, batch_ms, stop, p.step).await,
                    }
                })
            });
        restore_priority(nice);
        if let Some(m) = &mask {
            restore_affinity(m);
        }
        r
    })
}

/// A stopped publisher's figures, waiting at most 5 s for it to finish.
pub(crate) async fn join_publisher(
    mut p: tokio::task::JoinHandle<Result<PubStats, String>>,
) -> Result<PubStats, String> {
    match tokio::time::timeout(Duration::from_secs(5), &mut p).await {
        Ok(Ok(Ok(s))) => Ok(s),
        Ok(Ok(Err(e))) => Err(format!("publisher: {e}")),
        Ok(Err(e)) => Err(format!("publisher task: {e}")),
        Err(_) => {
            p.abort();
            Err("publisher: publisher did not stop within 5 s (server not reading?)".into())
        }
    }
}

/// The publisher: paced batches every `batch_ms`, the number of ticks due so far at `rate`,
/// round-robin over the symbols, `ts` = now (ns) at batch build.
async fn publisher(
    ctx: Arc<Ctx>,
    sh: Arc<Shared>,
    names: Vec<String>,
    rate: u64,
    batch_ms: u64,
    stop: Arc<AtomicBool>,
    step: usize,
) -> Result<PubStats, String> {
    let token = ctx.token(
        &format!("lg-pub-{step}"),
        &format!("pub-{step}"),
        &["publisher"],
        ctx.ttl.max(60),
    );
    let url = match &ctx.tls {
        Some(_) => format!("wss://{}:{}/v1/stream", ctx_server_name(&ctx), ctx.target.port()),
        None => format!("ws://{}/v1/stream", ctx.host),
    };
    let mut req = url.into_client_request().map_err(|e| e.to_string())?;
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().map_err(|_| "header")?,
    );
    // disable_nagle = true: with Nagle on, small batches wait for the server's delayed ACK
    // (tens of ms of fake latency).
    let tcp = lean::connect(ctx.target, None)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let connector = ctx
        .tls
        .as_ref()
        .map(|(cfg, _)| tokio_tungstenite::Connector::Rustls(cfg.clone()));
    let (ws, _) = tokio_tungstenite::client_async_tls_with_config(req, tcp, None, connector)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut sink, mut stream) = ws.split();
    let acked = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let (ack2, err2) = (acked.clone(), errors.clone());
    let reader = tokio::spawn(async move {
        while let Some(Ok(m)) = stream.next().await {
            if let Message::Text(t) = m {
                let b = t.as_bytes();
                match lean::msg_type(b) {
                    Some(b"published") => {
                        ack2.fetch_add(lean::field_u64(b, b"\"count\":").unwrap_or(0), Relaxed);
                    }
                    Some(b"error") if err2.fetch_add(1, Relaxed) < 3 => {
                        eprintln!("loadgen: publisher got {t}");
                    }
                    _ => {}
                }
            }
        }
    });
    let n = names.len();
    let mut counts = vec![0u64; n];
    let mut pace = Pace::new(rate, batch_ms);
    let mut next = 0usize;
    let mut id: u64 = 0;
    const PER_MSG: u64 = 400;
    while !stop.load(Relaxed) {
        let Some(b) = pace.next(&sh).await else { continue };
        let (t0, t1) = (sh.t0.load(Relaxed), sh.t1.load(Relaxed));
        let mut left = b.due;
        while left > 0 {
            let m = left.min(PER_MSG);
            id += 1;
            // Built in place and handed over (no copy per message); ~100 bytes a tick.
            let mut msg = String::with_capacity(32 + m as usize * 100);
            msg.push_str(r#"{"op":"publish","id":"#);
            let _ = std::fmt::Write::write_fmt(&mut msg, format_args!("{id}"));
            msg.push_str(r#","ticks":["#);
            for j in 0..m {
                if j > 0 {
                    msg.push(',');
                }
                let px = 100.0 + ((pace.sent + j) % 100) as f64 / 100.0;
                let ts = pace.stamp(&b, j);
                use std::fmt::Write;
                let _ = write!(
                    msg,
                    r#"{{"s":"{}","ts":{ts},"bid":{px},"ask":{},"last":{px},"qty":3}}"#,
                    names[next],
                    px + 0.25
                );
                if ts >= t0 && ts < t1 {
                    counts[next] += 1;
                }
                next = (next + 1) % n;
            }
            msg.push_str("]}");
            sink.feed(Message::Text(msg.into()))
                .await
                .map_err(|e| format!("send: {e}"))?;
            left -= m;
        }
        sink.flush().await.map_err(|e| format!("send: {e}"))?;
        pace.sent += b.due;
    }
    // Let the last acks arrive, then close.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = sink.send(Message::Close(None)).await;
    reader.abort();
    Ok(PubStats {
        window_counts: counts,
        acked: acked.load(Relaxed),
        errors: errors.load(Relaxed),
    })
}

/// The publisher for a cluster: the same open-loop schedule and stamping as
/// [`publisher`], one NATS message per tick on the feed subjects (what a feed handler
/// does). Nothing acknowledges a feed tick, so `acked` is what was sent.
async fn nats_publisher(
    url: &str,
    prefix: &str,
    sh: Arc<Shared>,
    names: Vec<String>,
    rate: u64,
    batch_ms: u64,
    stop: Arc<AtomicBool>,
) -> Result<PubStats, String> {
    let client = async_nats::connect(url).await.map_err(|e| format!("nats: {e}"))?;
    let subjects: Vec<String> = names.iter().map(|s| format!("{prefix}.in.{s}")).collect();
    let n = names.len();
    let mut counts = vec![0u64; n];
    let mut pace = Pace::new(rate, batch_ms);
    let mut next = 0usize;
    while !stop.load(Relaxed) {
        let Some(b) = pace.next(&sh).await else { continue };
        let (t0, t1) = (sh.t0.load(Relaxed), sh.t1.load(Relaxed));
        for j in 0..b.due {
            let px = 100.0 + ((pace.sent + j) % 100) as f64 / 100.0;
            let ts = pace.stamp(&b, j);
            let payload = format!(
                r#"{{"s":"{}","ts":{ts},"bid":{px},"ask":{},"last":{px},"qty":3}}"#,
                names[next],
                px + 0.25
            );
            client
                .publish(subjects[next].clone(), payload.into())
                .await
                .map_err(|e| format!("nats publish: {e}"))?;
            if ts >= t0 && ts < t1 {
                counts[next] += 1;
            }
            next = (next + 1) % n;
        }
        client.flush().await.map_err(|e| format!("nats flush: {e}"))?;
        pace.sent += b.due;
    }
    Ok(PubStats {
        window_counts: counts,
        acked: pace.sent,
        errors: 0,
    })
}

/// The open-loop schedule both publishers keep: a tick is due at start + i/rate, checked
/// every `batch_ms`. On schedule (lag within two batch periods) a tick carries `now`; a
/// late publisher (blocked by TCP backpressure or the CPU) stamps each tick with its due
/// time, so the delay counts as latency (no coordinated omission).
struct Pace {
    start: Instant,
    start_ns: u64,
    rate: u64,
    batch_ms: u64,
    /// Ticks sent so far (the caller adds each batch once sent).
    sent: u64,
    iv: tokio::time::Interval,
}

/// One batch of [`Pace`]: how many ticks are due, and how to stamp them.
struct Batch {
    due: u64,
    now: u64,
    late: bool,
}

impl Pace {
    fn new(rate: u64, batch_ms: u64) -> Pace {
        let mut iv = tokio::time::interval(Duration::from_millis(batch_ms));
        iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        Pace {
            start: Instant::now(),
            start_ns: now_ns(),
            rate: rate.max(1),
            batch_ms,
            sent: 0,
            iv,
        }
    }

    /// Waits for the next period; `None` when nothing is due yet. Records the lag.
    async fn next(&mut self, sh: &Shared) -> Option<Batch> {
        self.iv.tick().await;
        let target = (self.rate as u128 * self.start.elapsed().as_nanos() / 1_000_000_000) as u64;
        let due = target.saturating_sub(self.sent).min(self.rate);
        if due == 0 {
            return None;
        }
        let now = now_ns();
        let lag = now.saturating_sub(self.due_ns(self.sent + 1));
        sh.pub_max_lag_ns.fetch_max(lag, Relaxed);
        Some(Batch {
            due,
            now,
            late: lag > 2 * self.batch_ms * 1_000_000,
        })
    }

    fn due_ns(&self, i: u64) -> u64 {
        self.start_ns + (i as u128 * 1_000_000_000 / self.rate as u128) as u64
    }

    /// The `ts` of tick `j` of batch `b` (counted from the ticks sent before it).
    fn stamp(&self, b: &Batch, j: u64) -> u64 {
        if b.late {
            self.due_ns(self.sent + j + 1)
        } else {
            b.now
        }
    }
}

/// The name the publisher's `wss://` URL carries (SNI and certificate check).
fn ctx_server_name(ctx: &Ctx) -> String {
    match &ctx.tls {
        Some((_, rustls::pki_types::ServerName::DnsName(n))) => n.as_ref().to_string(),
        Some((_, rustls::pki_types::ServerName::IpAddress(ip))) => std::net::IpAddr::from(*ip).to_string(),
        _ => "localhost".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_difference_is_field_wise_and_saturating() {
        let before = CounterSnapshot {
            seq_gaps: 1,
            closed: 5,
            reauth_fail: 9,
            ..Default::default()
        };
        let after = CounterSnapshot {
            seq_gaps: 4,
            closed: 5,
            reauth_ok: 2,
            ..Default::default()
        };
        let d = after.since(&before);
        assert_eq!(d.seq_gaps, 3);
        assert_eq!(d.closed, 0);
        assert_eq!(d.reauth_ok, 2);
        assert_eq!(d.reauth_fail, 0);
    }
}
