//! Codec micro-benchmarks: the per-message cost the gateway pays on every inbound and
//! outbound frame. Targets on the 2-core reference machine: parse+unmask < 50 ns, encode < 30 ns.
//!
//! The machine is shared with other jobs, so wall-clock figures include time the benchmark
//! thread spent descheduled. Each benchmark therefore also runs under "[cpu]", timed with the
//! thread's own CPU clock (`CLOCK_THREAD_CPUTIME_ID`), which counts only time actually spent
//! running this code and is the figure to compare with the targets on a busy machine.

use std::hint::black_box;

use criterion::{Bencher, Criterion, criterion_group, criterion_main};
use tickgate::proto::frame::{
    Decoder, DecoderConfig, OpCode, encode_client_frame_into, encode_frame, encode_frame_into,
};

fn payload_128() -> Vec<u8> {
    // A realistic-looking JSON subscribe, padded to exactly 128 bytes.
    let mut p = br#"{"op":"subscribe","symbols":["AAPL","MSFT","GOOG","BTC-USD"],"id":42}"#.to_vec();
    p.resize(128, b' ');
    p
}

#[path = "support/cpu_time.rs"]
mod cpu_time;
use cpu_time::thread_cpu_time;

/// Runs `f` under both clocks: criterion's wall clock and the thread CPU clock.
fn both_clocks(c: &mut Criterion, name: &str, mut f: impl FnMut()) {
    c.bench_function(name, |b: &mut Bencher| b.iter(&mut f));
    c.bench_function(&format!("{name} [cpu]"), |b: &mut Bencher| {
        b.iter_custom(|iters| {
            let start = thread_cpu_time();
            for _ in 0..iters {
                f();
            }
            thread_cpu_time().saturating_sub(start)
        })
    });
}

fn bench_decode(c: &mut Criterion) {
    let mut frame = Vec::new();
    encode_client_frame_into(OpCode::Text, true, &payload_128(), [1, 2, 3, 4], &mut frame);
    let mut buf = frame.clone();
    let mut dec = Decoder::new(DecoderConfig::default());
    both_clocks(c, "parse+unmask 128B masked text", || {
        buf.copy_from_slice(&frame);
        let out = dec.decode(black_box(&mut buf));
        let _ = black_box(out);
    });
}

fn bench_encode(c: &mut Criterion) {
    let payload = payload_128();
    let mut out = Vec::with_capacity(256);
    both_clocks(c, "encode 128B server text frame (into Vec)", || {
        out.clear();
        encode_frame_into(OpCode::Text, black_box(&payload), &mut out);
        black_box(&out);
    });
    both_clocks(c, "encode 128B server text frame (Bytes)", || {
        black_box(encode_frame(OpCode::Text, black_box(&payload)));
    });
}

criterion_group!(benches, bench_decode, bench_encode);
criterion_main!(benches);
