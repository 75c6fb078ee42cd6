//! The tick simulator (`[feed] simulator*`): a random walk per symbol at a fixed rate,
//! entering through [`Hub::publish`], exactly the path a client's `publish` batch takes.
//!
//! This module is the sans-IO half: the walk, one batch per [`Simulator::step`] with the
//! timestamp passed in; it never reads a clock. `rt::sim` runs it on its own thread (it
//! is a stand-in for an upstream feed, not part of a shard) and paces it against a
//! monotonic clock so the rate holds on average.
//!
//! [`Hub::publish`]: crate::feed::hub::Hub::publish

use std::time::Duration;

use crate::feed::hub::Hub;
use crate::feed::symbol::SymbolId;
use crate::feed::tick::Tick;

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

/// The simulated feed: one walk per configured symbol.
pub struct Simulator {
    rng: Rng,
    walks: Vec<Walk>,
    rate_per_symbol: u32,
}

impl Simulator {
    /// Interns and pins `symbols` (a configured symbol is never retired for idleness);
    /// `None` when there is nothing to simulate (no valid symbol, or a zero rate).
    pub fn new(hub: &Hub, symbols: &[String], rate_per_symbol: u32) -> Option<Simulator> {
        let mut walks = Vec::new();
        for s in symbols {
            match hub.intern(s) {
                Ok(id) => {
                    hub.pin(id);
                    walks.push(Walk {
                        id,
                        mid: start_price(s),
                    })
                }
                Err(e) => tracing::warn!(symbol = %s, error = ?e, "simulator: symbol skipped"),
            }
        }
        if walks.is_empty() || rate_per_symbol == 0 {
            return None;
        }
        Some(Simulator {
            rng: Rng(0x9E37_79B9_7F4A_7C15),
            walks,
            rate_per_symbol,
        })
    }

    /// Time between two batches.
    pub fn period(&self) -> Duration {
        Duration::from_secs_f64(1.0 / f64::from(self.rate_per_symbol))
    }

    /// Symbols simulated (the size of a batch).
    pub fn len(&self) -> usize {
        self.walks.len()
    }

    /// Always false: a simulator has at least one symbol.
    pub fn is_empty(&self) -> bool {
        self.walks.is_empty()
    }

    /// Advances every walk one step and writes the batch, stamped `ts` (Unix nanoseconds),
    /// into `batch` (cleared first).
    pub fn step(&mut self, ts: u64, batch: &mut Vec<(SymbolId, Tick)>) {
        batch.clear();
        let rng = &mut self.rng;
        for w in self.walks.iter_mut() {
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_is_one_tick_per_symbol_stamped_as_told() {
        let hub = Hub::new(1, 64);
        assert!(Simulator::new(&hub, &["BTC-USD".into()], 0).is_none());
        assert!(Simulator::new(&hub, &[], 10).is_none());
        let mut sim = Simulator::new(&hub, &["BTC-USD".into(), "ETH-USD".into()], 4).unwrap();
        assert_eq!(sim.period(), Duration::from_millis(250));
        let mut batch = Vec::new();
        sim.step(7, &mut batch);
        assert_eq!(batch.len(), 2);
        for (_, t) in &batch {
            assert_eq!(t.ts, 7);
            assert!(t.bid <= t.ask && t.bid > 0.0 && t.qty > 0.0);
        }
        sim.step(8, &mut batch);
        assert_eq!(batch.len(), 2, "cleared, not appended");
    }
}
