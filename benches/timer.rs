//! Timer wheel costs with 1,000,000 deadlines spread over one hour of 1 ms ticks.
//!
//! Each measured iteration handles all 1,000,000 timers; criterion's throughput line
//! (elements/s) gives the per-deadline cost (1 / throughput).

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use tickgate::timer::{TimerKey, TimerWheel};

const N: usize = 1_000_000;
const HOUR_MS: u64 = 3_600_000;

/// Deterministic deadlines, uniform over 1..=1h (xorshift: no rand dependency).
fn deadlines() -> Vec<u64> {
    let mut s = 0x2545_f491_4f6c_dd1du64;
    (0..N)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            1 + s % HOUR_MS
        })
        .collect()
}

fn filled(ds: &[u64]) -> (TimerWheel<u64>, Vec<TimerKey>) {
    let mut w = TimerWheel::with_capacity(0, ds.len());
    let keys = ds.iter().map(|&d| w.insert(d, d)).collect();
    (w, keys)
}

fn bench(c: &mut Criterion) {
    let ds = deadlines();
    let mut g = c.benchmark_group("timer_1M_over_1h");
    g.sample_size(10);
    g.throughput(Throughput::Elements(N as u64));

    g.bench_function("insert", |b| {
        b.iter_batched(
            || TimerWheel::<u64>::with_capacity(0, N),
            |mut w| {
                for &d in &ds {
                    black_box(w.insert(d, d));
                }
                w
            },
            BatchSize::LargeInput,
        )
    });

    g.bench_function("cancel", |b| {
        b.iter_batched(
            || filled(&ds),
            |(mut w, keys)| {
                for &k in &keys {
                    black_box(w.cancel(k));
                }
                w
            },
            BatchSize::LargeInput,
        )
    });

    g.bench_function("expire_one_jump", |b| {
        b.iter_batched(
            || (filled(&ds).0, Vec::with_capacity(N)),
            |(mut w, mut out)| {
                w.advance(HOUR_MS, &mut out);
                assert_eq!(out.len(), N);
                (w, out)
            },
            BatchSize::LargeInput,
        )
    });

    // The server's pattern: advance every millisecond for the whole hour
    // (3.6M advance calls, most of them firing nothing).
    g.bench_function("expire_tick_by_tick", |b| {
        b.iter_batched(
            || (filled(&ds).0, Vec::with_capacity(64)),
            |(mut w, mut out)| {
                let mut fired = 0;
                for t in 1..=HOUR_MS {
                    w.advance(t, &mut out);
                    fired += out.len();
                    out.clear();
                }
                assert_eq!(fired, N);
                w
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
