//! permessage-deflate: what it saves and what it costs, on the demo's simulated BTC-USD ticks.
//!
//! Printed first (not timed): bytes on the wire per tick, plain and compressed (a
//! per-connection context at the configured level and window, and one frame per tick
//! without context takeover), and the heap a compressing connection holds (counted by
//! this binary's allocator). Then criterion: the cost of one delivery (a tick pushed to a
//! connection's queue and drained into its write buffer), plain and compressed, with the
//! connection's batch of 1 or 10 ticks per drain.
//!
//! `cargo bench --bench deflate`

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tickgate::feed::hub::Hub;
use tickgate::feed::outbound::{Deflating, OutboundQueue, SharedTick};
use tickgate::feed::sim::Simulator;
use tickgate::proto::deflate::{Deflater, Inflater};
use tickgate::proto::frame::{deflate_server_frame, server_frame_parts};

/// Resident memory of this process, in bytes (Linux).
fn rss() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// `n` simulated BTC-USD ticks, 100 ms apart, as the fan-out shares them.
fn ticks(n: usize) -> Vec<Arc<SharedTick>> {
    let hub = Hub::new(1, 16);
    let mut sim = Simulator::new(&hub, &["BTC-USD".to_string()], 10).expect("simulator");
    let name: Arc<str> = Arc::from("BTC-USD");
    let mut batch = Vec::new();
    (0..n)
        .map(|i| {
            sim.step(1_795_463_154_524_859_518 + i as u64 * 100_000_000, &mut batch);
            let (id, t) = batch[0];
            Arc::new(SharedTick::new(id, Arc::clone(&name), i as u64 + 1, t))
        })
        .collect()
}

fn report() {
    let ts = ticks(200);
    let plain: usize = ts.iter().map(|t| t.frame.len()).sum();
    let json: usize = ts
        .iter()
        .map(|t| server_frame_parts(&t.frame).unwrap().1.len())
        .sum();
    println!(
        "deflate: 200 simulated BTC-USD ticks, {} bytes of JSON each on average",
        json / 200
    );
    println!("  plain frames: {:.1} bytes/tick", plain as f64 / 200.0);
    for (level, bits) in [(1, 12), (1, 15), (6, 12), (1, 9)] {
        let mut d = Deflater::new(level, bits, false);
        let mut out = Vec::new();
        for t in &ts {
            deflate_server_frame(&mut d, &t.frame, &mut out);
        }
        println!(
            "  context takeover, level {level}, window {bits}: {:.1} bytes/tick ({:.0} % of plain)",
            out.len() as f64 / 200.0,
            out.len() as f64 * 100.0 / plain as f64
        );
    }
    let mut shared = None;
    let z: usize = ts.iter().map(|t| t.deflated_frame(&mut shared, 1).len()).sum();
    println!(
        "  no context takeover (one shared frame per tick): {:.1} bytes/tick ({:.0} % of plain)",
        z as f64 / 200.0,
        z as f64 * 100.0 / plain as f64
    );
    // Memory: 200 connections' worth, each having compressed (or inflated) a tick, so
    // the pages are touched; resident memory per connection.
    // Everything stays allocated until the end, so no measurement reuses memory another
    // one freed.
    const N: usize = 200;
    let mut keep: Vec<Box<dyn std::any::Any>> = Vec::new();
    for (level, bits) in [(1, 12), (1, 15), (1, 9), (6, 12)] {
        let before = rss();
        let ds: Vec<Deflater> = (0..N)
            .map(|_| {
                let mut d = Deflater::new(level, bits, false);
                let mut out = Vec::new();
                deflate_server_frame(&mut d, &ts[0].frame, &mut out);
                d
            })
            .collect();
        let per = (rss().saturating_sub(before)) as f64 / N as f64 / 1024.0;
        println!(
            "  resident memory of a connection's compressor, level {level}, window {bits}: {per:.0} KiB"
        );
        drop(ds);
    }
    let mut d = Deflater::new(1, 15, false);
    let mut z = Vec::new();
    deflate_server_frame(&mut d, &ts[0].frame, &mut z);
    let payload = server_frame_parts(&z).unwrap().1.to_vec();
    for bits in [12, 15] {
        let before = rss();
        let is: Vec<Inflater> = (0..N)
            .map(|_| {
                let mut i = Inflater::new(bits, false);
                let mut out = Vec::new();
                i.feed(&payload, &mut out, 65536).unwrap();
                i.finish(&mut out, 65536).unwrap();
                i
            })
            .collect();
        let per = (rss().saturating_sub(before)) as f64 / N as f64 / 1024.0;
        println!("  resident memory of a connection's inflater, window {bits}: {per:.0} KiB");
        keep.push(Box::new(is));
    }
}

fn bench_delivery(c: &mut Criterion) {
    report();
    let ts = ticks(1000);
    let mut g = c.benchmark_group("delivery");
    for batch in [1usize, 10] {
        g.throughput(Throughput::Elements(batch as u64));
        let mut q = OutboundQueue::new(1 << 20);
        let mut buf = Vec::with_capacity(64 * 1024);
        let mut i = 0;
        g.bench_with_input(BenchmarkId::new("plain", batch), &batch, |b, &n| {
            b.iter(|| {
                for _ in 0..n {
                    q.push_tick(&ts[i % ts.len()]);
                    i += 1;
                }
                buf.clear();
                black_box(q.drain_into(&mut buf, 64 * 1024));
            })
        });
        let mut own = Deflater::new(1, 12, false);
        let mut shared = None;
        g.bench_with_input(
            BenchmarkId::new("deflate_context_l1_w12", batch),
            &batch,
            |b, &n| {
                b.iter(|| {
                    for _ in 0..n {
                        q.push_tick(&ts[i % ts.len()]);
                        i += 1;
                    }
                    buf.clear();
                    let mut sink = Deflating {
                        own: Some(&mut own),
                        shared: &mut shared,
                        level: 1,
                    };
                    black_box(q.drain_with(&mut buf, 64 * 1024, &mut sink));
                })
            },
        );
    }
    // Without context takeover a tick is compressed once for all of a shard's such
    // subscribers: this is that one compression (per tick, not per delivery).
    let mut shared = Deflater::shared(1);
    let mut i = 0;
    g.throughput(Throughput::Elements(1));
    g.bench_function("shared_compress_per_tick", |b| {
        b.iter(|| {
            i += 1;
            black_box(shared.compress(server_frame_parts(&ts[i % ts.len()].frame).unwrap().1));
        })
    });
    g.finish();
}

criterion_group!(benches, bench_delivery);
criterion_main!(benches);
