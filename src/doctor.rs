//! `tickgate doctor`: inspect the host and say what to tune (see perf/TUNING.md).
//!
//! Each check reads a kernel interface, compares it with what a gateway holding tens of
//! thousands of sockets per core wants, and prints `ok`, `warn` or `info` with the command
//! that fixes it. Doctor never changes anything and exits 0 unless it cannot run at all.
//! `--jitter SECS` adds a probe that pins one spinning thread per usable core for SECS
//! seconds (it burns those cores meanwhile) and reports how long the host took them away.

use std::fmt::Write as _;
use std::path::Path;

use crate::config::Config;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Ok,
    Info,
    Warn,
}

#[derive(Debug, Clone)]
pub struct Finding {
    pub level: Level,
    pub check: &'static str,
    pub detail: String,
}

fn read(p: &str) -> Option<String> {
    std::fs::read_to_string(p).ok().map(|s| s.trim().to_string())
}

fn f(level: Level, check: &'static str, detail: impl Into<String>) -> Finding {
    Finding {
        level,
        check,
        detail: detail.into(),
    }
}

/// The `[cluster]` check, from the outcome of `rt::bus::probe`.
pub fn cluster_finding(probe: Result<String, String>) -> Finding {
    match probe {
        Ok(what) => f(Level::Ok, "cluster", format!("NATS reachable: {what}")),
        Err(why) => f(
            Level::Warn,
            "cluster",
            format!("{why}; the node would start, answer /readyz 503 and keep retrying"),
        ),
    }
}

/// Run every check. `cfg`, when given, adds the config-dependent ones.
pub fn run(cfg: Option<&Config>) -> Vec<Finding> {
    let mut out = Vec::new();
    // io_uring
    let disabled = read("/proc/sys/kernel/io_uring_disabled").and_then(|s| s.parse::<u32>().ok());
    let driver = crate::rt::Driver::detect();
    if cfg.is_some_and(|c| c.server.driver == "epoll") {
        out.push(f(
            Level::Info,
            "io_uring",
            "server.driver=\"epoll\": shards run on epoll by configuration",
        ));
    } else if driver == crate::rt::Driver::IoUring {
        out.push(f(
            Level::Ok,
            "io_uring",
            "available: shards run on the io_uring driver",
        ));
    } else {
        out.push(f(
            Level::Warn,
            "io_uring",
            format!(
                "unavailable (kernel.io_uring_disabled={}): shards fall back to epoll; enable with `sysctl -w kernel.io_uring_disabled=0` or run on kernel >= 5.11",
                disabled.map(|d| d.to_string()).unwrap_or_else(|| "?".into())
            ),
        ));
    }
    // cores
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let shards = cfg.map(|c| c.server.shards).unwrap_or(0);
    out.push(f(
        Level::Info,
        "cores",
        format!(
            "{cores} usable cores; server.shards={} ({}). For the lowest latency give each shard a core of its own and keep IRQs and the load generator off them",
            shards,
            if shards == 0 { "one per core" } else { "fixed" }
        ),
    ));
    // nofile
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass by pointer.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0;
    if ok {
        // One descriptor per WebSocket with either driver (the writer shares the reader's).
        let conns = lim.rlim_max;
        let level = if lim.rlim_max < 200_000 {
            Level::Warn
        } else {
            Level::Ok
        };
        out.push(f(
            level,
            "nofile",
            format!(
                "open files soft={} hard={} (tickgate raises soft to hard at start: room for ~{conns} connections); raise with `ulimit -n 1048576` or LimitNOFILE=1048576 in the systemd unit",
                lim.rlim_cur, lim.rlim_max
            ),
        ));
    }
    // somaxconn
    if let Some(v) = read("/proc/sys/net/core/somaxconn").and_then(|s| s.parse::<u64>().ok()) {
        let level = if v < 4096 { Level::Warn } else { Level::Ok };
        out.push(f(level, "somaxconn", format!("net.core.somaxconn={v} (listen backlog is 4096; set `sysctl -w net.core.somaxconn=65535` for connection storms)")));
    }
    if let Some(v) = read("/proc/sys/net/ipv4/tcp_max_syn_backlog") {
        out.push(f(
            Level::Info,
            "syn_backlog",
            format!("net.ipv4.tcp_max_syn_backlog={v} (65535 recommended for reconnect storms)"),
        ));
    }
    // port range (matters for load generators and for proxies in front)
    if let Some(v) = read("/proc/sys/net/ipv4/ip_local_port_range") {
        let parts: Vec<u64> = v.split_whitespace().filter_map(|x| x.parse().ok()).collect();
        let span = if parts.len() == 2 {
            parts[1].saturating_sub(parts[0])
        } else {
            0
        };
        let level = if span < 28_000 { Level::Warn } else { Level::Info };
        out.push(f(level, "port_range", format!("net.ipv4.ip_local_port_range={v} ({span} ports per source address; a proxy or load generator needs `sysctl -w net.ipv4.ip_local_port_range=\"1024 65535\"` or several source addresses)")));
    }
    // TCP buffers
    for (key, path) in [
        ("tcp_wmem", "/proc/sys/net/ipv4/tcp_wmem"),
        ("tcp_rmem", "/proc/sys/net/ipv4/tcp_rmem"),
    ] {
        if let Some(v) = read(path) {
            out.push(f(Level::Info, key, format!("net.ipv4.{key}={v} (the middle value is the per-socket default; fan-out to many small consumers prefers modest defaults, e.g. \"4096 65536 4194304\")")));
        }
    }
    // THP
    if let Some(v) = read("/sys/kernel/mm/transparent_hugepage/enabled") {
        let level = if v.contains("[always]") {
            Level::Warn
        } else {
            Level::Ok
        };
        out.push(f(level, "thp", format!("transparent_hugepage: {v} (`always` can add compaction stalls to tail latency; prefer madvise: `echo madvise > /sys/kernel/mm/transparent_hugepage/enabled`)")));
    }
    // CPU governor
    match read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor") {
        Some(g) => {
            let level = if g == "performance" {
                Level::Ok
            } else {
                Level::Warn
            };
            out.push(f(level, "governor", format!("cpu0 scaling_governor={g} (use `cpupower frequency-set -g performance` for stable latency)")));
        }
        None => out.push(f(
            Level::Info,
            "governor",
            "no cpufreq interface (a VM or a fixed-frequency host): nothing to tune",
        )),
    }
    // IRQ balance
    let irqbalance = Path::new("/proc").read_dir().ok().is_some_and(|d| {
        d.filter_map(|e| e.ok())
            .any(|e| std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == "irqbalance"))
    });
    out.push(f(
        Level::Info,
        "irq_affinity",
        if irqbalance {
            "irqbalance is running: for pinned shards, steer NIC queues to cores without shards (/proc/irq/*/smp_affinity_list) or keep irqbalance away from shard cores".to_string()
        } else {
            "irqbalance not running: check /proc/irq/*/smp_affinity_list keeps NIC interrupts off the shard cores".to_string()
        },
    ));
    if let Some(cfg) = cfg {
        if cfg.server.sqpoll {
            out.push(f(Level::Info, "sqpoll", "server.sqpoll=true: each shard gets a kernel polling thread that burns a core while busy; worth it only with spare cores"));
        }
        if cfg.tls.is_none() && !cfg.server.listen.ip().is_loopback() {
            out.push(f(
                Level::Warn,
                "tls",
                format!(
                    "[tls] is absent and server.listen={} is not loopback: tokens travel in clear text unless a TLS-terminating proxy is in front",
                    cfg.server.listen
                ),
            ));
        }
    }
    out
}

/// What a spinning thread saw of its core: the gaps between consecutive clock reads that
/// were long enough to mean the thread was not running (an interrupt, another task, or, in a
/// VM, the host descheduling the vCPU). Sans-IO: [`JitterStats::gap`] takes the gaps,
/// `rt::jitter::measure` produces them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JitterStats {
    pub core: usize,
    /// Wall time observed.
    pub spun_ns: u64,
    /// Sum of the gaps of at least [`JitterStats::STALL_NS`].
    pub stalled_ns: u64,
    pub max_ns: u64,
    pub over_100us: u64,
    pub over_1ms: u64,
    pub over_5ms: u64,
    /// Whether the probe thread was pinned to `core` (unpinned probes can share a core and
    /// see each other as stalls).
    pub pinned: bool,
}

impl JitterStats {
    /// A gap counts as a stall from here: a timer interrupt or a clock read costs far less.
    pub const STALL_NS: u64 = 10_000;

    pub fn new(core: usize) -> JitterStats {
        JitterStats {
            core,
            ..JitterStats::default()
        }
    }

    /// One gap between consecutive clock reads.
    pub fn gap(&mut self, ns: u64) {
        self.spun_ns += ns;
        if ns < Self::STALL_NS {
            return;
        }
        self.stalled_ns += ns;
        self.max_ns = self.max_ns.max(ns);
        self.over_100us += (ns > 100_000) as u64;
        self.over_1ms += (ns > 1_000_000) as u64;
        self.over_5ms += (ns > 5_000_000) as u64;
    }

    /// Stalled share of the observed time, percent.
    pub fn stalled_pct(&self) -> f64 {
        if self.spun_ns == 0 {
            return 0.0;
        }
        self.stalled_ns as f64 * 100.0 / self.spun_ns as f64
    }
}

/// When `--jitter` was not given.
pub fn jitter_not_measured() -> Finding {
    f(
        Level::Info,
        "jitter",
        "not measured: `tickgate doctor --jitter 10` spins every core for 10 s and reports how long the host takes the CPU away",
    )
}

/// Findings from a jitter probe, one per core: a warning when the core lost the CPU for
/// more than 1 ms at a time (a latency target below the longest stall cannot be met at
/// that percentile on this host, whatever the server does); `info` when only short
/// interruptions took more than 1 % of the time; `ok` otherwise.
pub fn jitter_findings(stats: &[JitterStats]) -> Vec<Finding> {
    stats
        .iter()
        .map(|st| {
            let (level, advice) = if !st.pinned {
                (
                    Level::Info,
                    " (could not pin the probe to this core: other probes may have shared it, so the figures are not the host's alone)",
                )
            } else if st.max_ns > 1_000_000 {
                (
                    Level::Warn,
                    " (a VM's vCPU descheduled by its host, or another task on this core: use dedicated cores or a dedicated host, isolcpus/nohz_full for shard cores; tail latency cannot beat these stalls)",
                )
            } else if st.stalled_pct() > 1.0 {
                (
                    Level::Info,
                    " (many short interruptions: timer ticks or interrupts, each a VM exit in a guest; nohz_full and IRQ affinity keep them off shard cores)",
                )
            } else {
                (Level::Ok, "")
            };
            f(
                level,
                "jitter",
                format!(
                    "core {}: spun {:.1} s, lost the CPU {:.2} % of the time, longest {:.2} ms; stalls > 0.1 ms: {}, > 1 ms: {}, > 5 ms: {}{advice}",
                    st.core,
                    st.spun_ns as f64 / 1e9,
                    st.stalled_pct(),
                    st.max_ns as f64 / 1e6,
                    st.over_100us,
                    st.over_1ms,
                    st.over_5ms,
                ),
            )
        })
        .collect()
}

pub fn render(findings: &[Finding]) -> String {
    let mut s = String::new();
    for x in findings {
        let tag = match x.level {
            Level::Ok => "ok  ",
            Level::Info => "info",
            Level::Warn => "WARN",
        };
        let _ = writeln!(s, "[{tag}] {:<13} {}", x.check, x.detail);
    }
    let warns = findings.iter().filter(|x| x.level == Level::Warn).count();
    let _ = writeln!(
        s,
        "{warns} warning(s). See perf/TUNING.md for the reasoning behind each setting."
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_counts_only_stalls_and_classifies_them() {
        let mut st = JitterStats::new(3);
        st.pinned = true;
        for _ in 0..1000 {
            st.gap(50); // clock reads: not stalls
        }
        st.gap(9_999);
        assert_eq!(st.stalled_ns, 0);
        st.gap(20_000);
        st.gap(150_000);
        st.gap(2_000_000);
        st.gap(6_000_000);
        assert_eq!(
            st.spun_ns,
            1000 * 50 + 9_999 + 20_000 + 150_000 + 2_000_000 + 6_000_000
        );
        assert_eq!(st.stalled_ns, 20_000 + 150_000 + 2_000_000 + 6_000_000);
        assert_eq!(st.max_ns, 6_000_000);
        assert_eq!((st.over_100us, st.over_1ms, st.over_5ms), (3, 2, 1));
        let warn = jitter_findings(std::slice::from_ref(&st));
        assert_eq!(warn[0].level, Level::Warn);
        assert!(warn[0].detail.starts_with("core 3:"), "{}", warn[0].detail);
        // A quiet core: short stalls only, well under 1 % of the time.
        let mut quiet = JitterStats::new(0);
        quiet.pinned = true;
        for _ in 0..10 {
            for _ in 0..200_000 {
                quiet.gap(50); // 10 ms of clock reads
            }
            quiet.gap(20_000);
        }
        assert!(quiet.stalled_pct() < 1.0);
        assert_eq!(jitter_findings(&[quiet])[0].level, Level::Ok);
        // Many short stalls (none over 1 ms) are worth a note, not a warning.
        let mut busy = JitterStats::new(1);
        busy.pinned = true;
        for _ in 0..100 {
            busy.gap(100_000);
            busy.gap(50_000);
        }
        assert!(busy.stalled_pct() > 1.0);
        assert_eq!(jitter_findings(std::slice::from_ref(&busy))[0].level, Level::Info);
        // An unpinned probe is never blamed on the host.
        busy.pinned = false;
        busy.gap(8_000_000);
        let unpinned = jitter_findings(&[busy]);
        assert_eq!(unpinned[0].level, Level::Info);
        assert!(unpinned[0].detail.contains("could not pin"));
    }

    #[test]
    fn warns_about_plain_text_on_a_public_address() {
        let mut cfg = Config::default_production();
        cfg.server.listen = "0.0.0.0:8080".parse().unwrap();
        let found = run(Some(&cfg));
        assert!(found.iter().any(|x| x.check == "tls" && x.level == Level::Warn));
        cfg.server.listen = "127.0.0.1:8080".parse().unwrap();
        assert!(!run(Some(&cfg)).iter().any(|x| x.check == "tls"));
        assert!(render(&found).contains("warning(s)"));
        // With [tls] a public address is fine.
        cfg.server.listen = "0.0.0.0:8443".parse().unwrap();
        cfg.tls = Some(crate::config::TlsConfig {
            cert: "/etc/tickgate/tls.crt".into(),
            key: "/etc/tickgate/tls.key".into(),
        });
        assert!(!run(Some(&cfg)).iter().any(|x| x.check == "tls"));
        // IPv6 wildcard without [tls] warns too.
        cfg.tls = None;
        cfg.server.listen = "[::]:8080".parse().unwrap();
        assert!(
            run(Some(&cfg))
                .iter()
                .any(|x| x.check == "tls" && x.level == Level::Warn)
        );
    }
}
