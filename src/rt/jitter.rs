//! `tickgate doctor --jitter`: the probe threads that spin on each usable core reading the
//! monotonic clock. What the gaps mean is decided in [`crate::doctor::JitterStats`].

use crate::doctor::JitterStats;

/// Spin on `core` (pinned) for `dur`, reading the monotonic clock, and collect the gaps.
/// Burns the core for `dur`: doctor runs it only when asked (`--jitter SECS`).
pub fn measure(core: usize, dur: std::time::Duration) -> JitterStats {
    let mut st = JitterStats::new(core);
    st.pinned = super::pin_to_core(core);
    let start = std::time::Instant::now();
    let mut last = start;
    loop {
        let now = std::time::Instant::now();
        st.gap(now.duration_since(last).as_nanos() as u64);
        last = now;
        if now.duration_since(start) >= dur {
            return st;
        }
    }
}

/// The usable cores spun at once for `dur` (as a loaded server's shards would run). At
/// most as many as `available_parallelism` allows, which also counts a cgroup CPU quota:
/// spinning more threads than the quota would report the throttling as host stalls.
pub fn measure_all(dur: std::time::Duration) -> Vec<JitterStats> {
    let quota = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cores = super::usable_cores();
    let handles: Vec<_> = cores
        .into_iter()
        .take(quota)
        .map(|c| std::thread::spawn(move || measure(c, dur)))
        .collect();
    handles.into_iter().filter_map(|h| h.join().ok()).collect()
}
