//! The tick simulator (`[feed] simulator*`): a random walk per symbol at a fixed rate,
//! entering through [`Hub::publish`], exactly the path a client's `publish` batch takes.
//!
//! It runs on its own thread (it is a stand-in for an upstream feed, not part of a shard)
//! and paces itself against a monotonic clock so the rate holds on average.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::feed::symbol::SymbolId;
use crate::feed::tick::Tick;
use crate::state::Shared;

/// xorshift64*: deterministic, fast, good enough for a price walk.
struct Rng(u64);

impl Rng {
    fn next_f64(&mut self) -> f64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A symbol's walk state.
struct Walk {
    id: SymbolId,
    mid: f64,
}

fn start_price(name: &str) -> f64 {
    match name {
        "BTC-USD" => 65_000.0,
        "ETH-USD" => 3_200.0,
        "SOL-USD" => 150.0,
        _ => 100.0,
    }
}

/// Round to a cent so the JSON stays short and prices look like prices.
fn cents(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Start the simulator thread; it stops when `stop` is set.
pub fn spawn(
    shared: Arc<Shared>,
    symbols: &[String],
    rate_per_symbol: u32,
    stop: Arc<AtomicBool>,
) -> std::io::Result<()> {
    let mut walks = Vec::new();
    for s in symbols {
        match shared.hub.intern(s) {
            Ok(id) => {
                // A configured symbol: never retired for idleness.
                shared.hub.pin(id);
                walks.push(Walk {
                    id,
                    mid: start_price(s),
                })
            }
            Err(e) => tracing::warn!(symbol = %s, error = ?e, "simulator: symbol skipped"),
        }
    }
    if walks.is_empty() || rate_per_symbol == 0 {
        return Ok(());
    }
    std::thread::Builder::new()
        .name("tickgate-sim".into())
        .spawn(move || {
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
            let period = Duration::from_secs_f64(1.0 / f64::from(rate_per_symbol));
            let mut next = Instant::now();
            let mut batch = Vec::with_capacity(walks.len());
            while !stop.load(Ordering::Relaxed) {
                let ts = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0);
                batch.clear();
                for w in walks.iter_mut() {
                    let step = (rng.next_f64() - 0.5) * w.mid * 0.0004;
                    w.mid = (w.mid + step).max(0.01);
                    let spread = (w.mid * 0.0001).max(0.01);
                    let last = w.mid + (rng.next_f64() - 0.5) * spread;
                    let qty = cents(rng.next_f64() * 5.0 + 0.01);
                    let tick = Tick {
                        ts,
                        bid: cents(w.mid - spread / 2.0),
                        ask: cents(w.mid + spread / 2.0),
                        last: cents(last),
                        qty,
                    };
                    batch.push((w.id, tick));
                }
                let n = shared.hub.publish(&batch);
                shared.metrics.ticks_in.fetch_add(n as u64, Ordering::Relaxed);
                next += period;
                let now = Instant::now();
                if next > now {
                    std::thread::sleep(next - now);
                } else if now - next > Duration::from_secs(1) {
                    // Fell far behind (suspended?): do not burst to catch up.
                    next = now;
                }
            }
        })?;
    Ok(())
}
