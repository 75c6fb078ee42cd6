//! Process-wide counters for `/metrics` (Prometheus text format).
//!
//! Everything is a relaxed atomic: shards bump them on their own core and the admin
//! listener reads a slightly stale but consistent-enough view. Per-shard gauges live in
//! cache-line padded slots so two cores never bounce one line.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Upper bounds (microseconds) of the latency histograms' buckets: finer between 1 and
/// 10 ms, where a loaded server's p99 lives, so a ratio of two p99s can be read from them.
pub const LATENCY_BUCKETS_US: [u64; 19] = [
    10, 25, 50, 100, 250, 500, 1_000, 1_500, 2_000, 2_500, 3_000, 4_000, 5_000, 7_500, 10_000, 25_000,
    50_000, 100_000, 250_000,
];

/// Nanoseconds on a monotonic clock since the first call in this process. Published ticks
/// carry it from the moment the hub accepts them, so the latency histograms measure the
/// server alone (a publisher's `ts` is on the publisher's clock, which may be skewed).
pub fn mono_ns() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let start = START.get_or_init(std::time::Instant::now);
    duration_ns(start.elapsed())
}

/// A duration in nanoseconds, `u64::MAX` past what a `u64` holds (about 584 years).
pub fn duration_ns(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A Prometheus histogram over [`LATENCY_BUCKETS_US`] (observations in microseconds,
/// rendered in seconds).
#[derive(Default)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl LatencyHistogram {
    pub fn observe_us(&self, us: u64) {
        let i = LATENCY_BUCKETS_US
            .iter()
            .position(|b| us <= *b)
            .unwrap_or(LATENCY_BUCKETS_US.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cum = 0;
        for (i, b) in LATENCY_BUCKETS_US.iter().enumerate() {
            cum += self.buckets[i].load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{}\"}} {cum}", *b as f64 / 1e6);
        }
        cum += self.buckets[LATENCY_BUCKETS_US.len()].load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cum}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_us.load(Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {}", self.count.load(Relaxed));
    }
}

#[derive(Default)]
#[repr(align(128))]
pub struct ShardGauges {
    pub connections: AtomicU64,
    pub queued_bytes: AtomicU64,
    /// Connections in the HTTP upgrade (sampled once a second).
    pub pending_handshakes: AtomicU64,
    pub ticks_out: AtomicU64,
    pub inbox_dropped: AtomicU64,
    /// Sessions that negotiated permessage-deflate (`[compression]`).
    pub compressing: AtomicU64,
}

/// One per-shard series of `/metrics`: which field of [`ShardGauges`] it reads.
type ShardField = fn(&ShardGauges) -> &AtomicU64;

#[derive(Default)]
pub struct Metrics {
    pub shards: Box<[ShardGauges]>,
    pub ticks_in: AtomicU64,
    pub conflated: AtomicU64,
    /// Symbols retired for idleness (`feed.symbol_idle`).
    pub symbols_retired: AtomicU64,
    /// `since` recovery (PROTOCOL.md 10): ticks replayed, and subscriptions answered with
    /// a `reset` snapshot because the history did not reach back.
    pub replayed: AtomicU64,
    pub replay_resets: AtomicU64,
    pub closes: [AtomicU64; CLOSE_CODES.len()],
    /// From the hub accepting a tick to a shard handing it to its subscribers' queues
    /// (a random one tick in 64 per shard is sampled).
    pub publish_to_dispatch: LatencyHistogram,
    /// From the hub accepting a tick to the issue of the socket write that carries it (the
    /// oldest tick of the write; a random one write in 16 per shard is sampled).
    pub publish_to_write: LatencyHistogram,
}

/// Close codes counted individually.
pub const CLOSE_CODES: [u16; 13] = [
    1000, 1001, 1002, 1003, 1007, 1008, 1009, 1011, 4000, 4001, 4003, 4008, 4029,
];

impl Metrics {
    pub fn new(shards: usize) -> Metrics {
        Metrics {
            shards: (0..shards.max(1)).map(|_| ShardGauges::default()).collect(),
            ..Default::default()
        }
    }

    pub fn shard(&self, i: usize) -> &ShardGauges {
        &self.shards[i % self.shards.len()]
    }

    pub fn count_close(&self, code: u16) {
        if let Some(i) = CLOSE_CODES.iter().position(|c| *c == code) {
            self.closes[i].fetch_add(1, Relaxed);
        }
    }

    pub fn render(&self, out: &mut String) {
        let per_shard: [(&str, &str, ShardField); 6] = [
            ("tickgate_connections", "gauge", |s| &s.connections),
            ("tickgate_outbound_queued_bytes", "gauge", |s| &s.queued_bytes),
            ("tickgate_compressing_connections", "gauge", |s| &s.compressing),
            ("tickgate_pending_handshakes", "gauge", |s| &s.pending_handshakes),
            ("tickgate_ticks_out_total", "counter", |s| &s.ticks_out),
            ("tickgate_inbox_dropped_total", "counter", |s| &s.inbox_dropped),
        ];
        for (name, kind, field) in per_shard {
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (i, s) in self.shards.iter().enumerate() {
                let _ = writeln!(out, "{name}{{shard=\"{i}\"}} {}", field(s).load(Relaxed));
            }
        }
        let _ = writeln!(
            out,
            "# TYPE tickgate_ticks_in_total counter\ntickgate_ticks_in_total {}",
            self.ticks_in.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# TYPE tickgate_conflated_ticks_total counter\ntickgate_conflated_ticks_total {}",
            self.conflated.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# TYPE tickgate_symbols_retired_total counter\ntickgate_symbols_retired_total {}",
            self.symbols_retired.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# TYPE tickgate_replayed_ticks_total counter\ntickgate_replayed_ticks_total {}\n# TYPE tickgate_replay_resets_total counter\ntickgate_replay_resets_total {}",
            self.replayed.load(Relaxed),
            self.replay_resets.load(Relaxed)
        );
        out.push_str("# TYPE tickgate_closes_total counter\n");
        for (i, c) in CLOSE_CODES.iter().enumerate() {
            let _ = writeln!(
                out,
                "tickgate_closes_total{{code=\"{c}\"}} {}",
                self.closes[i].load(Relaxed)
            );
        }
        self.publish_to_dispatch.render(
            "tickgate_publish_to_dispatch_seconds",
            "Time from the hub accepting a tick to its dispatch to a shard's subscriber queues (sampled).",
            out,
        );
        self.publish_to_write.render(
            "tickgate_publish_to_write_seconds",
            "Time from the hub accepting a tick to the issue of the socket write carrying it (oldest live tick per write, sampled; replayed ticks are not counted).",
            out,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_histogram_renders_cumulative_buckets_in_seconds() {
        let h = LatencyHistogram::default();
        for us in [5, 10, 30, 2_000, 1_000_000] {
            h.observe_us(us);
        }
        let mut out = String::new();
        h.render("x_seconds", "help", &mut out);
        for line in [
            "# TYPE x_seconds histogram",
            "x_seconds_bucket{le=\"0.00001\"} 2",
            "x_seconds_bucket{le=\"0.00005\"} 3",
            "x_seconds_bucket{le=\"0.0025\"} 4",
            "x_seconds_bucket{le=\"0.25\"} 4",
            "x_seconds_bucket{le=\"+Inf\"} 5",
            "x_seconds_sum 1.002045",
            "x_seconds_count 5",
        ] {
            assert!(out.lines().any(|l| l == line), "{line} missing:\n{out}");
        }
        assert_eq!(h.count(), 5);
    }
}
