//! `idle` mode: N authenticated connections that do nothing but answer pings, held open for
//! --hold seconds. With --server-pid, the server's VmRSS before connecting and once all are
//! established (after a settle pause) gives the memory per idle connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use clap::Args;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;

use crate::common::{self, Common, Ctx, Report, rss_kib};
use crate::lean;

#[derive(Args, Debug, Clone)]
pub struct IdleArgs {
    #[command(flatten)]
    pub common: Common,
    /// Connections to open.
    #[arg(long, default_value_t = 10_000)]
    pub connections: usize,
    /// Seconds to hold them once established.
    #[arg(long, default_value_t = 5.0)]
    pub hold: f64,
    /// Seconds to wait before the second RSS reading.
    #[arg(long, default_value_t = 1.0)]
    pub settle: f64,
    /// The server's process id (for VmRSS).
    #[arg(long)]
    pub server_pid: Option<u32>,
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,
    #[arg(long, default_value_t = 120.0)]
    pub connect_timeout: f64,
}

#[derive(Default)]
struct Counters {
    up: AtomicU64,
    failed: AtomicU64,
    closed: AtomicU64,
}

pub fn main(a: IdleArgs) -> i32 {
    let bounds = if a.connections == 0 || a.connections > 1_000_000 || a.hold > 600.0 {
        Err("1..=1000000 connections, hold <= 600 s")
    } else {
        Ok(())
    };
    common::launch(&a.common.clone(), bounds, move |ctx| run(a, ctx))
}

async fn run(a: IdleArgs, ctx: Arc<Ctx>) -> i32 {
    let rss0 = a.server_pid.and_then(rss_kib);
    let reqs: Vec<Vec<u8>> = (0..a.connections)
        .map(|i| {
            let t = ctx.token(
                &format!("idle-{i}"),
                &format!("idle-{i}"),
                &["subscriber"],
                ctx.ttl,
            );
            lean::upgrade_request(&ctx.host, &t)
        })
        .collect();
    let c = Arc::new(Counters::default());
    let sem = Arc::new(Semaphore::new(a.connect_concurrency.max(1)));
    let t = Instant::now();
    let mut tasks = Vec::with_capacity(a.connections);
    for (i, req) in reqs.into_iter().enumerate() {
        let (ctx, c, sem) = (ctx.clone(), c.clone(), sem.clone());
        tasks.push(tokio::spawn(async move {
            let permit = sem.acquire_owned().await;
            let Ok(mut s) = lean::Stream::connect(&ctx, ctx.source(i)).await else {
                c.failed.fetch_add(1, Relaxed);
                return;
            };
            let mut buf = vec![0u8; 1024];
            let mut end = match lean::upgrade(&mut s, &req, &mut buf).await {
                Ok((101, rest)) => rest,
                _ => {
                    c.failed.fetch_add(1, Relaxed);
                    return;
                }
            };
            drop(req);
            drop(permit);
            let mut welcomed = false;
            let mut out = Vec::new();
            loop {
                let mut start = 0;
                while let Some(f) = lean::parse_frame(&buf[start..end]) {
                    let p = &buf[start + f.start..start + f.end];
                    match f.opcode {
                        1 if !welcomed && lean::msg_type(p) == Some(&b"welcome"[..]) => {
                            welcomed = true;
                            c.up.fetch_add(1, Relaxed);
                        }
                        9 => lean::pong_frame(p, &mut out),
                        8 => {
                            c.closed.fetch_add(1, Relaxed);
                            return;
                        }
                        _ => {}
                    }
                    start += f.end;
                }
                buf.copy_within(start..end, 0);
                end -= start;
                if end == buf.len() {
                    buf.resize(buf.len() * 2, 0);
                }
                if !out.is_empty() {
                    if s.write_all(&out).await.is_err() {
                        break;
                    }
                    out.clear();
                }
                match s.read(&mut buf[end..]).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => end += n,
                }
            }
            c.closed.fetch_add(1, Relaxed);
        }));
    }
    let deadline = Instant::now() + Duration::from_secs_f64(a.connect_timeout);
    let n = a.connections as u64;
    while c.up.load(Relaxed) + c.failed.load(Relaxed) + c.closed.load(Relaxed) < n
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let connect_secs = t.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs_f64(a.settle)).await;
    let up = c.up.load(Relaxed);
    let rss1 = a.server_pid.and_then(rss_kib);
    let hold_left = (a.hold - a.settle).max(0.0);
    tokio::time::sleep(Duration::from_secs_f64(hold_left)).await;
    let still = up.saturating_sub(c.closed.load(Relaxed));

    let mut r = Report::new("idle", &a.common.label);
    r.add("target", ctx.target.to_string());
    r.add("connections", n);
    r.add("established", up);
    r.add("failed", c.failed.load(Relaxed));
    r.add("open_after_hold", still);
    r.add("connect_s", (connect_secs * 1000.0).round() / 1000.0);
    r.add("connect_per_s", (up as f64 / connect_secs).round());
    if let (Some(r0), Some(r1)) = (rss0, rss1) {
        r.add("server_rss_before_kib", r0);
        r.add("server_rss_after_kib", r1);
        let per = if up > 0 {
            (r1.saturating_sub(r0)) as f64 * 1024.0 / up as f64
        } else {
            0.0
        };
        r.add("rss_per_conn_bytes", per.round());
        r.add("rss_per_conn_kib", (per / 1024.0 * 100.0).round() / 100.0);
    }
    println!("== idle{} ==", a.common.label_suffix());
    r.print(a.common.json);
    for t in &tasks {
        t.abort();
    }
    if up == 0 { 2 } else { 0 }
}
