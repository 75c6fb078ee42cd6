//! `handshake` mode: C workers each doing connect + authenticated upgrade + reset, as fast as
//! they can, bounded by --total and --duration. Reports accepted/s, rejections by status and
//! latency percentiles (connect start to the response head). With --invalid-flood, a first
//! phase runs the valid workers alone, a second adds F workers flooding bad-signature tokens
//! from 127.0.0.2, and both valid rates are reported.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;

use crate::common::{self, Common, Ctx, Report, histogram, percentiles};
use crate::lean;

#[derive(Args, Debug, Clone)]
pub struct HandshakeArgs {
    #[command(flatten)]
    pub common: Common,
    /// Concurrent valid workers.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Stop after this many handshakes (0: only the duration bounds it).
    #[arg(long, default_value_t = 0)]
    pub total: u64,
    /// Seconds (per phase with --invalid-flood).
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Distinct users (tokens) to rotate through.
    #[arg(long, default_value_t = 1000)]
    pub users: usize,
    /// Add a concurrent flood of invalid tokens from 127.0.0.2 in a second phase.
    #[arg(long)]
    pub invalid_flood: bool,
    #[arg(long, default_value_t = 32)]
    pub flood_concurrency: usize,
    /// The server's pid: report its CPU and run-queue wait (schedstat).
    #[arg(long)]
    pub server_pid: Option<u32>,
}

#[derive(Default)]
struct Stats {
    ok: AtomicU64,
    rejected: AtomicU64,
    errors: AtomicU64,
    statuses: Mutex<BTreeMap<u16, u64>>,
}

pub fn main(a: HandshakeArgs) -> i32 {
    let bounds = if a.duration > 600.0 || a.concurrency == 0 || a.concurrency > 10_000 {
        Err("duration <= 600 s, 1..=10000 workers")
    } else {
        Ok(())
    };
    common::launch(&a.common.clone(), bounds, move |ctx| run(a, ctx))
}

/// Valid workers use every source except 127.0.0.2 (the flooder's).
fn valid_sources(ctx: &Ctx) -> Vec<Option<Ipv4Addr>> {
    let v: Vec<Option<Ipv4Addr>> = ctx
        .sources
        .iter()
        .filter(|ip| ip.octets()[3] != 2)
        .map(|&ip| Some(ip))
        .collect();
    if ctx.sources.len() <= 1 || v.is_empty() {
        vec![None]
    } else {
        v
    }
}

struct Phase {
    ok: u64,
    rejected: u64,
    errors: u64,
    secs: f64,
    hist: Histogram<u64>,
    statuses: BTreeMap<u16, u64>,
    flood_done: u64,
    flood_statuses: BTreeMap<u16, u64>,
}

async fn run(a: HandshakeArgs, ctx: Arc<Ctx>) -> i32 {
    let users = a.users.max(a.concurrency).max(1);
    let reqs: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..users)
            .map(|i| {
                let t = ctx.token(&format!("hs-{i}"), &format!("hs-{i}"), &["subscriber"], ctx.ttl);
                lean::upgrade_request(&ctx.host, &t)
            })
            .collect(),
    );
    // Invalid: a valid token with the first character of its signature changed.
    let bad = {
        let t = ctx.token("flood", "flood", &["subscriber"], ctx.ttl);
        let sig_start = t.rfind('.').map_or(0, |p| p + 1);
        let mut b = t.into_bytes();
        b[sig_start] = if b[sig_start] == b'A' { b'B' } else { b'A' };
        Arc::new(lean::upgrade_request(&ctx.host, &String::from_utf8_lossy(&b)))
    };
    let cpu0 = common::cpu_time();
    let s0 = a.server_pid.and_then(common::schedstat);
    let p1 = phase(&a, &ctx, &reqs, None).await;
    let s1 = a.server_pid.and_then(common::schedstat);
    let p2 = if a.invalid_flood {
        Some(phase(&a, &ctx, &reqs, Some(bad)).await)
    } else {
        None
    };
    let cpu = common::cpu_time() - cpu0;

    let mut r = Report::new("handshake", &a.common.label);
    r.add("target", ctx.target.to_string());
    r.add("concurrency", a.concurrency as u64);
    let put = |r: &mut Report, pre: &str, p: &Phase| {
        r.add(&format!("{pre}accepted"), p.ok);
        r.add(&format!("{pre}accepted_per_s"), (p.ok as f64 / p.secs).round());
        r.add(&format!("{pre}rejected"), p.rejected);
        r.add(&format!("{pre}errors"), p.errors);
        if !p.statuses.is_empty() {
            r.add(
                &format!("{pre}statuses"),
                p.statuses
                    .iter()
                    .map(|(k, v)| format!("{k}:{v}"))
                    .collect::<Vec<_>>()
                    .join(" "),
            );
        }
        for (name, v) in percentiles(&p.hist) {
            r.add(&format!("{pre}{name}"), v);
        }
    };
    put(&mut r, "", &p1);
    common::add_sched(&mut r, s0, s1, p1.secs);
    if let Some(p2) = &p2 {
        put(&mut r, "flood_", p2);
        r.add("flood_invalid_per_s", (p2.flood_done as f64 / p2.secs).round());
        r.add(
            "flood_invalid_statuses",
            p2.flood_statuses
                .iter()
                .map(|(k, v)| format!("{k}:{v}"))
                .collect::<Vec<_>>()
                .join(" "),
        );
        r.add(
            "valid_rate_ratio_with_flood",
            ((p2.ok as f64 / p2.secs) / (p1.ok as f64 / p1.secs).max(1.0) * 1000.0).round() / 1000.0,
        );
    }
    r.add("client_cpu_s", (cpu.as_secs_f64() * 100.0).round() / 100.0);
    println!("== handshake{} ==", a.common.label_suffix());
    r.print(a.common.json);
    if p1.ok == 0 { 2 } else { 0 }
}

async fn phase(
    a: &HandshakeArgs,
    ctx: &Arc<Ctx>,
    reqs: &Arc<Vec<Vec<u8>>>,
    flood: Option<Arc<Vec<u8>>>,
) -> Phase {
    let stats = Arc::new(Stats::default());
    let fstats = Arc::new(Stats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let issued = Arc::new(AtomicU64::new(0));
    let hist = Arc::new(Mutex::new(histogram()));
    let srcs = Arc::new(valid_sources(ctx));
    let t = Instant::now();
    let mut tasks = vec![];
    for w in 0..a.concurrency {
        let (ctx, reqs, stats, stop, issued, hist, srcs) = (
            ctx.clone(),
            reqs.clone(),
            stats.clone(),
            stop.clone(),
            issued.clone(),
            hist.clone(),
            srcs.clone(),
        );
        let total = a.total;
        tasks.push(tokio::spawn(async move {
            let mut local = histogram();
            let mut buf = vec![0u8; 4096];
            let mut k = w;
            while !stop.load(Relaxed) {
                let n = issued.fetch_add(1, Relaxed);
                if total > 0 && n >= total {
                    break;
                }
                k = k.wrapping_add(a_prime());
                let req = &reqs[k % reqs.len()];
                let src = srcs[k % srcs.len()];
                let t = Instant::now();
                one(&ctx, src, req, &mut buf, &stats, Some(&mut local), t).await;
            }
            hist.lock().unwrap().add(&local).ok();
        }));
    }
    let mut ftasks = vec![];
    if let Some(bad) = &flood {
        for _ in 0..a.flood_concurrency {
            let (ctx, bad, fstats, stop) = (ctx.clone(), bad.clone(), fstats.clone(), stop.clone());
            ftasks.push(tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                while !stop.load(Relaxed) {
                    one(
                        &ctx,
                        Some(Ipv4Addr::new(127, 0, 0, 2)),
                        &bad,
                        &mut buf,
                        &fstats,
                        None,
                        Instant::now(),
                    )
                    .await;
                }
            }));
        }
    }
    let deadline = Duration::from_secs_f64(a.duration);
    loop {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let done = a.total > 0 && issued.load(Relaxed) >= a.total && tasks.iter().all(|t| t.is_finished());
        if done || t.elapsed() >= deadline {
            break;
        }
    }
    let secs = t.elapsed().as_secs_f64();
    stop.store(true, Relaxed);
    for tk in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), tk).await;
    }
    for tk in ftasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), tk).await;
    }
    let h = hist.lock().unwrap().clone();
    Phase {
        ok: stats.ok.load(Relaxed),
        rejected: stats.rejected.load(Relaxed),
        errors: stats.errors.load(Relaxed),
        secs,
        hist: h,
        statuses: stats.statuses.lock().unwrap().clone(),
        flood_done: fstats.ok.load(Relaxed) + fstats.rejected.load(Relaxed),
        flood_statuses: fstats.statuses.lock().unwrap().clone(),
    }
}

fn a_prime() -> usize {
    7919
}

async fn one(
    ctx: &Ctx,
    src: Option<Ipv4Addr>,
    req: &[u8],
    buf: &mut Vec<u8>,
    stats: &Stats,
    hist: Option<&mut Histogram<u64>>,
    t: Instant,
) {
    let s = match lean::connect(ctx.target, src).await {
        Ok(s) => s,
        Err(_) => {
            stats.errors.fetch_add(1, Relaxed);
            tokio::time::sleep(Duration::from_millis(1)).await;
            return;
        }
    };
    lean::set_linger_zero(&s);
    let up = async {
        let mut s = lean::Stream::wrap(ctx, s).await?;
        lean::upgrade(&mut s, req, buf).await
    };
    match tokio::time::timeout(Duration::from_secs(10), up).await {
        Ok(Ok((101, _))) => {
            stats.ok.fetch_add(1, Relaxed);
            if let Some(h) = hist {
                h.record(t.elapsed().as_nanos() as u64).ok();
            }
        }
        Ok(Ok((status, _))) => {
            stats.rejected.fetch_add(1, Relaxed);
            *stats.statuses.lock().unwrap().entry(status).or_default() += 1;
        }
        _ => {
            stats.errors.fetch_add(1, Relaxed);
        }
    }
    // Dropping with SO_LINGER 0: an RST, no TIME_WAIT on this side.
}
