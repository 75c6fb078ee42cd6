//! Recovery (PROTOCOL.md 10): the server's CPU for replaying 1,000 ticks to one client.
//! One iteration is what the shard does for a `subscribe` with `since` 1,000 ticks back:
//! read the baseline and the replay from the symbol's history under its lock (one `Arc`
//! clone per tick), push the 1,000 shared frames into the connection's outbound queue,
//! and drain the queue into write buffers of 64 KiB as the writer would (the copy into the
//! socket's buffer included; the `send` syscalls are not). The target: under 1 ms.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tickgate::feed::history::{HistoryLimits, Replay};
use tickgate::feed::hub::Hub;
use tickgate::feed::outbound::OutboundQueue;
use tickgate::feed::tick::Tick;

fn bench_replay(c: &mut Criterion) {
    let hub = Hub::new(1, 16).with_history(HistoryLimits {
        depth: 1000,
        age_ns: u64::MAX,
        max_bytes: 1 << 30,
    });
    let id = hub.intern("BTC-USD").unwrap();
    for i in 0..1000u64 {
        let t = Tick {
            ts: 1_732_345_678_123_456_789 + i,
            bid: 100.25 + i as f64 * 0.01,
            ask: 100.5,
            last: 100.4,
            qty: 3.0,
        };
        hub.publish(&[(id, t)]);
    }
    let mut g = c.benchmark_group("replay");
    g.throughput(Throughput::Elements(1000));
    let mut buf = Vec::with_capacity(64 * 1024);
    g.bench_function("1000_ticks_to_one_client", |b| {
        b.iter(|| {
            let base = hub
                .subscribe(0, id, false, Some((black_box(0), 1 << 20)))
                .unwrap();
            let Some(Replay::Ticks { ticks, skipped: 0 }) = base.replay else {
                panic!("a whole replay of the held ticks")
            };
            assert_eq!(ticks.len(), 1000);
            let mut q = OutboundQueue::new(1 << 20);
            for t in &ticks {
                black_box(q.push_tick(t));
            }
            let mut written = 0;
            while !q.is_empty() {
                buf.clear();
                written += q.drain_into(&mut buf, 64 * 1024);
            }
            black_box(written)
        })
    });
    g.finish();
}

criterion_group!(benches, bench_replay);
criterion_main!(benches);
