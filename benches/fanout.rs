//! Fan-out cost: encode a tick frame once, push the shared `Arc<SharedTick>` to N queues,
//! drain each into its write buffer (one event-loop turn), and client message parsing.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tickgate::feed::msg::{MsgLimits, parse_client_msg};
use tickgate::feed::outbound::{OutboundQueue, SharedTick, encode_tick_frame};
use tickgate::feed::symbol::SymbolId;
use tickgate::feed::tick::{Tick, TickKind};

fn tick(seq: u64) -> Tick {
    Tick {
        ts: 1_732_345_678_123_456_789 + seq,
        bid: 100.25,
        ask: 100.5,
        last: 100.4,
        qty: 3.0,
    }
}

fn bench_encode(c: &mut Criterion) {
    let mut out = Vec::with_capacity(256);
    let t = tick(0);
    c.bench_function("encode_tick_frame", |b| {
        b.iter(|| {
            out.clear();
            encode_tick_frame(TickKind::Tick, black_box("BTC-USD"), 42, &t, 0, &mut out);
            black_box(&out);
        })
    });
}

fn bench_fanout(c: &mut Criterion) {
    let name: Arc<str> = Arc::from("BTC-USD");
    let mut g = c.benchmark_group("fanout_turn");
    for n in [100usize, 1000] {
        let mut queues: Vec<OutboundQueue> = (0..n).map(|_| OutboundQueue::new(1 << 20)).collect();
        let mut bufs: Vec<Vec<u8>> = (0..n).map(|_| Vec::with_capacity(4096)).collect();
        let mut seq = 0u64;
        // Throughput in elements = deliveries, so criterion reports the per-delivery cost;
        // the per-tick cost is the reported time per iteration.
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                seq += 1;
                let shared = Arc::new(SharedTick::new(SymbolId(0), Arc::clone(&name), seq, tick(seq)));
                for q in queues.iter_mut() {
                    black_box(q.push_tick(&shared));
                }
                for (q, buf) in queues.iter_mut().zip(bufs.iter_mut()) {
                    buf.clear();
                    black_box(q.drain_into(buf, 64 * 1024));
                }
            })
        });
    }
    g.finish();
}

/// A slow consumer's cost per offered tick once it conflates: 1,000 queues over their
/// bound, each subscribed to 10 symbols, taking ticks round-robin over the symbols (the
/// newest replaces the queued one). Under overload every offered tick pays this for every
/// conflating subscriber, so it bounds how gracefully the server degrades.
fn bench_conflate(c: &mut Criterion) {
    let names: Vec<Arc<str>> = (0..10).map(|i| Arc::from(format!("S{i:04}"))).collect();
    let n = 1000;
    let mut queues: Vec<OutboundQueue> = (0..n).map(|_| OutboundQueue::new(64)).collect();
    let mut seq = 0u64;
    let mut g = c.benchmark_group("conflate_push");
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function(BenchmarkId::from_parameter(n), |b| {
        b.iter(|| {
            seq += 1;
            let sym = (seq % 10) as u32;
            let shared = Arc::new(SharedTick::new(
                SymbolId(sym),
                Arc::clone(&names[sym as usize]),
                seq,
                tick(seq),
            ));
            for q in queues.iter_mut() {
                black_box(q.push_tick(&shared));
            }
        })
    });
    g.finish();
}

fn bench_parse(c: &mut Criterion) {
    let limits = MsgLimits::default();
    let sub = br#"{"op":"subscribe","id":1,"symbols":["BTC-USD","ETH-USD"],"snapshot":true}"#.to_vec();
    let mut publish = br#"{"op":"publish","id":5,"ticks":["#.to_vec();
    for i in 0..10 {
        if i > 0 {
            publish.push(b',');
        }
        publish.extend_from_slice(
            format!(
                r#"{{"s":"BTC-USD","ts":{},"bid":100.25,"ask":100.5,"last":100.4,"qty":3}}"#,
                1732345678123456789u64 + i
            )
            .as_bytes(),
        );
    }
    publish.extend_from_slice(b"]}");
    let mut scratch = Vec::new();
    c.bench_function("parse_subscribe", |b| {
        b.iter(|| {
            scratch.clear();
            scratch.extend_from_slice(&sub);
            black_box(parse_client_msg(&mut scratch, &limits).is_ok())
        })
    });
    c.bench_function("parse_publish_10", |b| {
        b.iter(|| {
            scratch.clear();
            scratch.extend_from_slice(&publish);
            black_box(parse_client_msg(&mut scratch, &limits).is_ok())
        })
    });
}

criterion_group!(benches, bench_encode, bench_fanout, bench_conflate, bench_parse);
criterion_main!(benches);
