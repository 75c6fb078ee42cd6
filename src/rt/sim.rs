//! The simulator's thread: runs [`crate::feed::sim::Simulator`] at its rate, stamping each
//! batch with the wall clock and pacing against the monotonic one, and publishes through
//! the hub exactly as a client's `publish` batch does.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::feed::sim::Simulator;
use crate::state::Shared;

/// Start the simulator thread; it stops when `stop` is set.
pub fn spawn(
    shared: Arc<Shared>,
    symbols: &[String],
    rate_per_symbol: u32,
    stop: Arc<AtomicBool>,
) -> std::io::Result<()> {
    let Some(mut sim) = Simulator::new(&shared.hub, symbols, rate_per_symbol) else {
        return Ok(());
    };
    std::thread::Builder::new()
        .name("tickgate-sim".into())
        .spawn(move || {
            let period = sim.period();
            let mut next = Instant::now();
            let mut batch = Vec::with_capacity(sim.len());
            while !stop.load(Ordering::Relaxed) {
                let ts = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0);
                sim.step(ts, &mut batch);
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
