//! Process-wide counters for `/metrics` (Prometheus text format).
//!
//! Everything is a relaxed atomic: shards bump them on their own core and the admin
//! listener reads a slightly stale but consistent-enough view. Per-shard gauges live in
//! cache-line padded slots so two cores never bounce one line.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Upper bounds (microseconds) of the publish-to-write latency histogram buckets.
pub const LATENCY_BUCKETS_US: [u64; 12] = [
    10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 50_000, 250_000,
];

#[derive(Default)]
#[repr(align(128))]
pub struct ShardGauges {
    pub connections: AtomicU64,
    pub queued_bytes: AtomicU64,
    pub ticks_out: AtomicU64,
    pub inbox_dropped: AtomicU64,
}

#[derive(Default)]
pub struct Metrics {
    pub shards: Box<[ShardGauges]>,
    pub ticks_in: AtomicU64,
    pub conflated: AtomicU64,
    pub closes: [AtomicU64; CLOSE_CODES.len()],
    pub latency_buckets: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    pub latency_sum_us: AtomicU64,
    pub latency_count: AtomicU64,
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

    /// One publish-to-write latency observation.
    pub fn observe_latency_us(&self, us: u64) {
        let i = LATENCY_BUCKETS_US
            .iter()
            .position(|b| us <= *b)
            .unwrap_or(LATENCY_BUCKETS_US.len());
        self.latency_buckets[i].fetch_add(1, Relaxed);
        self.latency_sum_us.fetch_add(us, Relaxed);
        self.latency_count.fetch_add(1, Relaxed);
    }

    pub fn render(&self, out: &mut String) {
        out.push_str("# TYPE tickgate_connections gauge\n");
        for (i, s) in self.shards.iter().enumerate() {
            let _ = writeln!(
                out,
                "tickgate_connections{{shard=\"{i}\"}} {}",
                s.connections.load(Relaxed)
            );
        }
        out.push_str("# TYPE tickgate_outbound_queued_bytes gauge\n");
        for (i, s) in self.shards.iter().enumerate() {
            let _ = writeln!(
                out,
                "tickgate_outbound_queued_bytes{{shard=\"{i}\"}} {}",
                s.queued_bytes.load(Relaxed)
            );
        }
        out.push_str("# TYPE tickgate_ticks_out_total counter\n");
        for (i, s) in self.shards.iter().enumerate() {
            let _ = writeln!(
                out,
                "tickgate_ticks_out_total{{shard=\"{i}\"}} {}",
                s.ticks_out.load(Relaxed)
            );
        }
        out.push_str("# TYPE tickgate_inbox_dropped_total counter\n");
        for (i, s) in self.shards.iter().enumerate() {
            let _ = writeln!(
                out,
                "tickgate_inbox_dropped_total{{shard=\"{i}\"}} {}",
                s.inbox_dropped.load(Relaxed)
            );
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
        out.push_str("# TYPE tickgate_closes_total counter\n");
        for (i, c) in CLOSE_CODES.iter().enumerate() {
            let _ = writeln!(
                out,
                "tickgate_closes_total{{code=\"{c}\"}} {}",
                self.closes[i].load(Relaxed)
            );
        }
        out.push_str("# TYPE tickgate_publish_to_dispatch_seconds histogram\n");
        let mut cum = 0;
        for (i, b) in LATENCY_BUCKETS_US.iter().enumerate() {
            cum += self.latency_buckets[i].load(Relaxed);
            let _ = writeln!(
                out,
                "tickgate_publish_to_dispatch_seconds_bucket{{le=\"{}\"}} {cum}",
                *b as f64 / 1e6
            );
        }
        cum += self.latency_buckets[LATENCY_BUCKETS_US.len()].load(Relaxed);
        let _ = writeln!(
            out,
            "tickgate_publish_to_dispatch_seconds_bucket{{le=\"+Inf\"}} {cum}"
        );
        let _ = writeln!(
            out,
            "tickgate_publish_to_dispatch_seconds_sum {}",
            self.latency_sum_us.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(
            out,
            "tickgate_publish_to_dispatch_seconds_count {}",
            self.latency_count.load(Relaxed)
        );
    }
}
