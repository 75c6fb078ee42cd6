//! Per-IP handshake rate limit (PROTOCOL.md section 2, check 2; OPS.md
//! `limits.per_ip_handshakes_per_sec` / `limits.per_ip_burst`).
//!
//! A classic token bucket per client: `burst` tokens of capacity, refilled at `rate` tokens
//! per second, one token per request. Tokens are kept in thousandths and time in whole
//! milliseconds, so one millisecond adds exactly `rate` milli-tokens: refill has no
//! rounding and the limiter can never admit more than `burst + rate * elapsed` requests
//! (a property test checks this). A `burst` of 0 is raised to 1, or nothing could pass.
//! A `rate` of 0 disables the limit.
//!
//! # Keys
//! IPv4 clients are keyed by address; IPv4-mapped IPv6 peers (dual-stack sockets) count as
//! the IPv4 address. IPv6 clients are keyed by their /64, since one subscriber usually owns a
//! whole /64 and could otherwise rotate through 2^64 addresses.
//!
//! # Memory bound and the overflow bucket
//! The table never holds more than `max_entries` per-IP buckets: a slot is reserved with an
//! atomic counter *before* insertion, so racing shards cannot overshoot. When the table is
//! full, a new IP is not given a bucket and nothing is evicted; it draws instead from one
//! shared *overflow bucket* with the same rate and burst. A flood from many (possibly
//! spoofed-looking) sources therefore cannot grow memory, cannot push well-behaved clients
//! out of the table, and gets at most one client's worth of handshakes through while the
//! table is full. The price is that newcomers share that bucket during such a flood.
//! `sweep` removes *idle* buckets: untouched for at least the time a bucket takes to refill
//! from empty (`burst / rate` seconds, and at least one second). Such a bucket is full again,
//! so it is indistinguishable from a fresh one and forgetting it changes no decision. Buckets
//! that are full but were used recently are kept on purpose: a well-behaved client making a
//! request every now and then is almost always full, and dropping it at every sweep would
//! send it to the overflow bucket during a flood; keeping it while it is active is what lets
//! it keep working while newcomers share the overflow bucket.
//!
//! Buckets live in a `DashMap`, so a check locks one map shard, never the whole table.
//! `now_ms` comes from the caller; a `now` older than a bucket's last update (shards read
//! the clock at slightly different moments) counts as no time passing.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

/// One token, in the bucket's fixed-point unit.
const TOKEN: u64 = 1000;

/// Result of [`IpRateLimiter::check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateDecision {
    /// Go ahead; one token was consumed.
    Allow,
    /// Answer `429` with `Retry-After: retry_after_secs` (always at least 1).
    Deny { retry_after_secs: u64 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Key {
    V4(u32),
    /// The upper 64 bits of an IPv6 address.
    V6Net(u64),
    /// The shared bucket for clients that found the table full; never counted as an entry.
    Overflow,
}

fn key_of(ip: IpAddr) -> Key {
    match ip {
        IpAddr::V4(a) => Key::V4(u32::from(a)),
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(v4) => Key::V4(u32::from(v4)),
            None => Key::V6Net((u128::from(a) >> 64) as u64),
        },
    }
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    /// Available tokens, in thousandths.
    milli: u64,
    last_ms: u64,
}

#[derive(Clone, Copy, Debug)]
struct Params {
    /// Milli-tokens added per millisecond (= tokens per second).
    rate: u64,
    /// Capacity in milli-tokens.
    cap: u64,
}

impl Bucket {
    fn full(p: Params, now_ms: u64) -> Self {
        Bucket {
            milli: p.cap,
            last_ms: now_ms,
        }
    }

    fn level_at(&self, p: Params, now_ms: u64) -> u64 {
        let elapsed = now_ms.saturating_sub(self.last_ms);
        self.milli
            .saturating_add(elapsed.saturating_mul(p.rate))
            .min(p.cap)
    }

    fn take(&mut self, p: Params, now_ms: u64) -> RateDecision {
        self.milli = self.level_at(p, now_ms);
        self.last_ms = self.last_ms.max(now_ms);
        if self.milli >= TOKEN {
            self.milli -= TOKEN;
            RateDecision::Allow
        } else {
            let deficit = TOKEN - self.milli;
            let wait_ms = deficit.div_ceil(p.rate.max(1));
            RateDecision::Deny {
                retry_after_secs: wait_ms.div_ceil(1000).max(1),
            }
        }
    }

    /// Untouched for `idle_ms`, which is at least the refill time: hence also full.
    fn is_idle(&self, idle_ms: u64, now_ms: u64) -> bool {
        now_ms.saturating_sub(self.last_ms) >= idle_ms
    }
}

/// Per-IP token buckets shared by all shards.
#[derive(Debug)]
pub struct IpRateLimiter {
    params: Params,
    /// See `sweep`: max(time to refill from empty, 1 s).
    idle_ms: u64,
    max_entries: usize,
    buckets: DashMap<Key, Bucket>,
    /// Per-IP slots in use or being inserted; always >= the number of per-IP buckets.
    reserved: AtomicUsize,
}

impl IpRateLimiter {
    /// `rate_per_sec` tokens per second (0 = unlimited), `burst` capacity (0 is taken as 1),
    /// at most `max_entries` per-IP buckets (see the module docs for what happens past it).
    pub fn new(rate_per_sec: u32, burst: u32, max_entries: usize) -> Self {
        let params = Params {
            rate: u64::from(rate_per_sec),
            cap: u64::from(burst.max(1)) * TOKEN,
        };
        IpRateLimiter {
            params,
            idle_ms: params.cap.div_ceil(params.rate.max(1)).max(1000),
            max_entries,
            buckets: DashMap::new(),
            reserved: AtomicUsize::new(0),
        }
    }

    /// Takes one token for `ip` at `now_ms`.
    pub fn check(&self, ip: IpAddr, now_ms: u64) -> RateDecision {
        let p = self.params;
        if p.rate == 0 {
            return RateDecision::Allow;
        }
        let key = key_of(ip);
        if let Some(mut b) = self.buckets.get_mut(&key) {
            return b.take(p, now_ms);
        }
        if self.try_reserve() {
            match self.buckets.entry(key) {
                Entry::Occupied(mut e) => {
                    // Another shard inserted it between our lookup and here.
                    self.reserved.fetch_sub(1, Ordering::AcqRel);
                    e.get_mut().take(p, now_ms)
                }
                Entry::Vacant(v) => {
                    let mut b = Bucket::full(p, now_ms);
                    let d = b.take(p, now_ms);
                    v.insert(b);
                    d
                }
            }
        } else {
            self.buckets
                .entry(Key::Overflow)
                .or_insert_with(|| Bucket::full(p, now_ms))
                .take(p, now_ms)
        }
    }

    fn try_reserve(&self) -> bool {
        self.reserved
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_entries).then_some(n + 1)
            })
            .is_ok()
    }

    /// Drops every idle bucket: one untouched for at least the refill time (so it is full
    /// again and would behave exactly like a new one). Returns how many per-IP buckets were
    /// removed. Call it periodically (e.g. every few seconds) from one place.
    pub fn sweep(&self, now_ms: u64) -> usize {
        let idle_ms = self.idle_ms;
        let mut removed = 0usize;
        self.buckets.retain(|k, b| {
            if b.is_idle(idle_ms, now_ms) {
                if *k != Key::Overflow {
                    removed += 1;
                }
                false
            } else {
                true
            }
        });
        self.reserved.fetch_sub(removed, Ordering::AcqRel);
        removed
    }

    /// Number of per-IP buckets held (the overflow bucket is not counted).
    pub fn len(&self) -> usize {
        let overflow = usize::from(self.buckets.contains_key(&Key::Overflow));
        self.buckets.len().saturating_sub(overflow)
    }

    /// No per-IP bucket is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The configured bound on per-IP buckets.
    pub fn max_entries(&self) -> usize {
        self.max_entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn burst_then_deny_then_refill() {
        let l = IpRateLimiter::new(2, 5, 100);
        let a = ip("192.0.2.1");
        for _ in 0..5 {
            assert_eq!(l.check(a, 1_000), RateDecision::Allow);
        }
        assert_eq!(l.check(a, 1_000), RateDecision::Deny { retry_after_secs: 1 });
        // 499 ms at 2/s = 0.998 tokens: still denied.
        assert!(matches!(l.check(a, 1_499), RateDecision::Deny { .. }));
        // 500 ms = exactly one token.
        assert_eq!(l.check(a, 1_500), RateDecision::Allow);
        assert!(matches!(l.check(a, 1_500), RateDecision::Deny { .. }));
        // A long idle refills only up to the burst.
        for _ in 0..5 {
            assert_eq!(l.check(a, 1_000_000), RateDecision::Allow);
        }
        assert!(matches!(l.check(a, 1_000_000), RateDecision::Deny { .. }));
    }

    #[test]
    fn retry_after_is_rounded_up_and_at_least_one() {
        // 1 token per second: empty bucket needs 1 s.
        let l = IpRateLimiter::new(1, 1, 10);
        let a = ip("192.0.2.1");
        assert_eq!(l.check(a, 0), RateDecision::Allow);
        assert_eq!(l.check(a, 0), RateDecision::Deny { retry_after_secs: 1 });
        assert_eq!(l.check(a, 999), RateDecision::Deny { retry_after_secs: 1 });
        // Fast refill still reports at least one second.
        let l = IpRateLimiter::new(1000, 1, 10);
        assert_eq!(l.check(a, 0), RateDecision::Allow);
        assert_eq!(l.check(a, 0), RateDecision::Deny { retry_after_secs: 1 });
        assert_eq!(l.check(a, 1), RateDecision::Allow);
    }

    #[test]
    fn retry_after_for_slow_rates_is_never_zero_or_too_short() {
        // rate 1/s but we need to wait for a whole token from zero: exactly 1 s; after 300 ms
        // 700 ms remain, reported as 1 s. Rates under 1/s are not expressible, so check a
        // large deficit with the smallest rate instead.
        let l = IpRateLimiter::new(1, 3, 10);
        let a = ip("192.0.2.9");
        for _ in 0..3 {
            assert_eq!(l.check(a, 10), RateDecision::Allow);
        }
        match l.check(a, 310) {
            RateDecision::Deny { retry_after_secs } => assert_eq!(retry_after_secs, 1),
            d => panic!("{d:?}"),
        }
        assert_eq!(l.check(a, 1_010), RateDecision::Allow);
    }

    #[test]
    fn rate_zero_is_unlimited_and_keeps_no_state() {
        let l = IpRateLimiter::new(0, 0, 10);
        for i in 0..10_000u32 {
            assert_eq!(l.check(IpAddr::V4(Ipv4Addr::from(i)), 0), RateDecision::Allow);
        }
        assert_eq!(l.len(), 0);
        assert!(l.is_empty());
    }

    #[test]
    fn burst_zero_means_one() {
        let l = IpRateLimiter::new(10, 0, 10);
        let a = ip("192.0.2.1");
        assert_eq!(l.check(a, 0), RateDecision::Allow);
        assert!(matches!(l.check(a, 0), RateDecision::Deny { .. }));
        assert_eq!(l.check(a, 100), RateDecision::Allow);
    }

    #[test]
    fn clients_are_independent() {
        let l = IpRateLimiter::new(1, 1, 10);
        assert_eq!(l.check(ip("192.0.2.1"), 0), RateDecision::Allow);
        assert!(matches!(l.check(ip("192.0.2.1"), 0), RateDecision::Deny { .. }));
        assert_eq!(l.check(ip("192.0.2.2"), 0), RateDecision::Allow);
        assert_eq!(l.len(), 2);
    }

    #[test]
    fn ipv6_keyed_by_slash_64_and_mapped_v4_by_address() {
        let l = IpRateLimiter::new(1, 1, 10);
        assert_eq!(l.check(ip("2001:db8:1:2::1"), 0), RateDecision::Allow);
        assert!(matches!(
            l.check(ip("2001:db8:1:2:ffff::9"), 0),
            RateDecision::Deny { .. }
        ));
        assert_eq!(l.check(ip("2001:db8:1:3::1"), 0), RateDecision::Allow);
        assert_eq!(l.check(ip("198.51.100.7"), 0), RateDecision::Allow);
        assert!(matches!(
            l.check(ip("::ffff:198.51.100.7"), 0),
            RateDecision::Deny { .. }
        ));
        assert_eq!(l.len(), 3);
    }

    #[test]
    fn clock_going_backwards_adds_nothing() {
        let l = IpRateLimiter::new(1, 1, 10);
        let a = ip("192.0.2.1");
        assert_eq!(l.check(a, 10_000), RateDecision::Allow);
        assert!(matches!(l.check(a, 5_000), RateDecision::Deny { .. }));
        assert!(matches!(l.check(a, 10_500), RateDecision::Deny { .. }));
        assert_eq!(l.check(a, 11_000), RateDecision::Allow);
    }

    #[test]
    fn sweep_drops_only_idle_buckets() {
        // rate 10, burst 10: a bucket refills from empty in 1 s, so idle means 1 s untouched.
        let l = IpRateLimiter::new(10, 10, 100);
        let a = ip("192.0.2.1");
        let b = ip("192.0.2.2");
        assert_eq!(l.check(a, 0), RateDecision::Allow);
        for _ in 0..10 {
            assert_eq!(l.check(b, 500), RateDecision::Allow);
        }
        assert_eq!(l.len(), 2);
        // `a` is full again at 100 ms but was used recently: kept.
        assert_eq!(l.sweep(600), 0);
        assert_eq!(l.sweep(1_000), 1);
        assert_eq!(l.len(), 1);
        assert_eq!(l.sweep(1_499), 0);
        assert_eq!(l.sweep(1_500), 1);
        assert_eq!(l.len(), 0);
        assert!(l.is_empty());
        // A swept client starts again with a full bucket, as if it had never left.
        for _ in 0..10 {
            assert_eq!(l.check(b, 1_500), RateDecision::Allow);
        }
        // Slots were returned: the table can be refilled to its bound.
        let l = IpRateLimiter::new(1, 1, 3);
        for i in 0..3u32 {
            l.check(IpAddr::V4(Ipv4Addr::from(i)), 0);
        }
        assert_eq!(l.len(), 3);
        assert_eq!(l.max_entries(), 3);
        assert_eq!(l.sweep(1_000), 3);
        for i in 10..13u32 {
            l.check(IpAddr::V4(Ipv4Addr::from(i)), 1_000);
        }
        assert_eq!(l.len(), 3);
    }

    #[test]
    fn slow_rates_idle_for_the_whole_refill_time() {
        // burst 40 at 1/s: 40 s to refill from empty.
        let l = IpRateLimiter::new(1, 40, 10);
        l.check(ip("192.0.2.1"), 0);
        assert_eq!(l.sweep(39_999), 0);
        assert_eq!(l.sweep(40_000), 1);
    }

    #[test]
    fn overflow_bucket_is_shared_when_table_is_full() {
        let l = IpRateLimiter::new(1, 2, 1);
        assert_eq!(l.check(ip("192.0.2.1"), 0), RateDecision::Allow);
        // Table full: the next two newcomers share one bucket of burst 2.
        assert_eq!(l.check(ip("192.0.2.2"), 0), RateDecision::Allow);
        assert_eq!(l.check(ip("192.0.2.3"), 0), RateDecision::Allow);
        assert!(matches!(l.check(ip("192.0.2.4"), 0), RateDecision::Deny { .. }));
        // The tracked client is unaffected.
        assert_eq!(l.check(ip("192.0.2.1"), 0), RateDecision::Allow);
        assert_eq!(l.len(), 1);
        // After a sweep frees the slot, a newcomer gets its own bucket again.
        assert_eq!(l.sweep(10_000), 1);
        assert_eq!(l.check(ip("192.0.2.4"), 10_000), RateDecision::Allow);
        assert_eq!(l.check(ip("192.0.2.4"), 10_000), RateDecision::Allow);
        assert_eq!(l.len(), 1);
    }

    #[test]
    fn flood_of_distinct_ips_is_bounded_and_good_client_keeps_working() {
        let max = 1_000;
        let l = IpRateLimiter::new(5, 10, max);
        let good = ip("203.0.113.10");
        let mut now = 0u64;
        assert_eq!(l.check(good, now), RateDecision::Allow);
        let mut flood_allowed = 0u64;
        for i in 0..1_000_000u32 {
            // Half IPv4, half IPv6 from distinct /64s.
            let addr = if i % 2 == 0 {
                IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))
            } else {
                IpAddr::V6(Ipv6Addr::from((0x2001_0db8_0000_0000u128 + u128::from(i)) << 64))
            };
            if l.check(addr, now) == RateDecision::Allow {
                flood_allowed += 1;
            }
            if i % 1000 == 0 {
                now += 200;
                // The good client makes one request per second (well under its rate of 5/s
                // and within the idle time, so its bucket is never swept): always allowed.
                if i % 5000 == 0 {
                    assert_eq!(l.check(good, now), RateDecision::Allow, "at {i}");
                }
                assert!(l.len() <= max);
            }
            if i % 100_000 == 99_999 {
                l.sweep(now);
                assert!(l.len() <= max);
            }
        }
        assert!(l.len() <= max, "len {}", l.len());
        // Flood traffic beyond the first `max` distinct IPs after each sweep shares one
        // bucket: bounded by the table slots plus one client's rate.
        let elapsed_s = now / 1000 + 1;
        let sweeps = 10;
        let bound = (max as u64) * (sweeps + 1) + 10 + 5 * elapsed_s;
        assert!(flood_allowed <= bound, "{flood_allowed} > {bound}");
    }

    #[test]
    fn concurrent_checks_respect_the_bound() {
        let l = std::sync::Arc::new(IpRateLimiter::new(1, 100, 50));
        let allowed = std::sync::Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let l = l.clone();
                let allowed = allowed.clone();
                std::thread::spawn(move || {
                    for i in 0..2_000u32 {
                        let a = IpAddr::V4(Ipv4Addr::from(t * 10_000 + i));
                        l.check(a, 0);
                        if l.check(ip("192.0.2.200"), 0) == RateDecision::Allow {
                            allowed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(l.len() <= 50);
        assert!(allowed.load(Ordering::Relaxed) <= 100);
    }

    proptest! {
        /// Per IP, over any window [t_i, t_j] of allowed requests:
        /// count <= burst + rate * (t_j - t_i) / 1000, sweeps included.
        #[test]
        fn never_more_than_burst_plus_rate_times_elapsed(
            rate in 1u32..50,
            burst in 1u32..20,
            events in proptest::collection::vec((0u8..6, 0u64..400, any::<bool>()), 1..400),
        ) {
            let l = IpRateLimiter::new(rate, burst, 1_000);
            let mut now = 0u64;
            let mut allowed: HashMap<u8, Vec<u64>> = HashMap::new();
            for (who, dt, sweep) in events {
                now += dt;
                if sweep {
                    l.sweep(now);
                }
                let addr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, who));
                if l.check(addr, now) == RateDecision::Allow {
                    allowed.entry(who).or_default().push(now);
                }
            }
            for times in allowed.values() {
                for i in 0..times.len() {
                    for j in i..times.len() {
                        let n = (j - i + 1) as u64;
                        let budget = u64::from(burst) * 1000 + u64::from(rate) * (times[j] - times[i]);
                        prop_assert!(n * 1000 <= budget, "{n} in {}ms", times[j] - times[i]);
                    }
                }
            }
        }

        /// With a tiny table, everything beyond it shares the overflow bucket: the total is
        /// bounded by (table + 1) buckets' worth.
        #[test]
        fn overflow_is_bounded_too(
            events in proptest::collection::vec((0u8..20, 0u64..300), 1..300),
        ) {
            let (rate, burst, max) = (3u64, 4u64, 2usize);
            let l = IpRateLimiter::new(rate as u32, burst as u32, max);
            let mut now = 0u64;
            let mut times = Vec::new();
            for (who, dt) in events {
                now += dt;
                if l.check(IpAddr::V4(Ipv4Addr::new(198, 51, 100, who)), now) == RateDecision::Allow {
                    times.push(now);
                }
                prop_assert!(l.len() <= max);
            }
            let buckets = max as u64 + 1;
            if let (Some(first), Some(last)) = (times.first(), times.last()) {
                let budget = buckets * (burst * 1000 + rate * (last - first));
                prop_assert!(times.len() as u64 * 1000 <= budget);
            }
        }
    }
}
