//! What every mode shares: target and key options, token minting, source addresses,
//! clocks, CPU accounting, the runtime and report formatting.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Args;
use ed25519_dalek::SigningKey;
use hdrhistogram::Histogram;
use tickgate::auth::mint::{self, Claims};

#[derive(Args, Debug, Clone)]
pub struct Common {
    /// Server address (loopback only: 127.0.0.0/8 or ::1).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub target: SocketAddr,
    /// PKCS#8 PEM private key (`tickgate keygen` output) to mint tokens with.
    #[arg(long)]
    pub key: PathBuf,
    #[arg(long, default_value = "k1")]
    pub kid: String,
    /// Spread connections over source addresses 127.0.0.1 ..= 127.0.0.N.
    #[arg(long, default_value_t = 1)]
    pub sources: u8,
    /// Tokio worker threads (the generator usually gets one core).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Token lifetime, seconds.
    #[arg(long, default_value_t = 300)]
    pub ttl: u64,
    /// Print one JSON line after the table.
    #[arg(long)]
    pub json: bool,
    /// Label for the report (e.g. the server's name).
    #[arg(long, default_value = "")]
    pub label: String,
    /// Speak TLS (`wss://`) to the target; needs `--ca`.
    #[arg(long)]
    pub tls: bool,
    /// PEM certificate(s) to trust for `--tls`.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Name to verify the server certificate against (SNI) with `--tls`.
    #[arg(long, default_value = "localhost")]
    pub server_name: String,
}

impl Common {
    /// `" [label]"` for report headings, or nothing without `--label`.
    pub fn label_suffix(&self) -> String {
        if self.label.is_empty() {
            String::new()
        } else {
            format!(" [{}]", self.label)
        }
    }
}

pub struct Ctx {
    pub target: SocketAddr,
    pub host: String,
    pub key: SigningKey,
    pub kid: String,
    pub sources: Vec<Ipv4Addr>,
    pub ttl: u64,
    /// `--tls`: the client config and the name to verify.
    pub tls: Option<(Arc<rustls::ClientConfig>, rustls::pki_types::ServerName<'static>)>,
}

impl Ctx {
    /// The same credentials and settings against another server (another node).
    pub fn with_target(&self, target: SocketAddr) -> Ctx {
        Ctx {
            target,
            host: target.to_string(),
            key: self.key.clone(),
            kid: self.kid.clone(),
            sources: self.sources.clone(),
            ttl: self.ttl,
            tls: self.tls.clone(),
        }
    }

    pub fn new(c: &Common) -> Result<Ctx, String> {
        match c.target.ip() {
            IpAddr::V4(ip) if ip.is_loopback() => {}
            IpAddr::V6(ip) if ip.is_loopback() => {}
            other => return Err(format!("--target {other}: loopback only (127.0.0.0/8, ::1)")),
        }
        let key = mint::load_signing_key(&c.key).map_err(|e| format!("--key: {e}"))?;
        let sources = (1..=c.sources.max(1))
            .map(|i| Ipv4Addr::new(127, 0, 0, i))
            .collect();
        let tls = if c.tls {
            let ca = c.ca.as_ref().ok_or("--tls needs --ca FILE")?;
            let cfg = tickgate::tls::client_config_from_ca_file(ca).map_err(|e| format!("--ca {e}"))?;
            let name = rustls::pki_types::ServerName::try_from(c.server_name.clone())
                .map_err(|e| format!("--server-name: {e}"))?;
            Some((cfg, name))
        } else {
            None
        };
        Ok(Ctx {
            target: c.target,
            host: c.target.to_string(),
            key,
            kid: c.kid.clone(),
            sources,
            ttl: c.ttl,
            tls,
        })
    }

    /// Source address for connection `i` (`None`: let the kernel pick, single source).
    pub fn source(&self, i: usize) -> Option<Ipv4Addr> {
        if self.sources.len() <= 1 {
            None
        } else {
            Some(self.sources[i % self.sources.len()])
        }
    }

    pub fn claims(&self, sub: &str, sid: &str, roles: &[&str], ttl: u64) -> Claims {
        let now = tickgate::cli::unix_now();
        Claims {
            sub: sub.into(),
            exp: now + ttl,
            iat: Some(now),
            sid: Some(sid.into()),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            symbols: vec!["*".into()],
            ..Claims::default()
        }
    }

    pub fn token(&self, sub: &str, sid: &str, roles: &[&str], ttl: u64) -> String {
        mint::sign_token(&self.key, &self.kid, &self.claims(sub, sid, roles, ttl))
    }

    /// Tokens for successive reauths, minted ahead of time so the generator's own signing
    /// never stalls it mid-measurement: token k expires `ttl * (k + 2)` seconds from now.
    pub fn reauth_tokens(
        &self,
        sub: &str,
        sid: &str,
        roles: &[&str],
        ttl: u64,
        rounds: usize,
    ) -> Vec<String> {
        (0..rounds as u64)
            .map(|k| {
                let mut c = self.claims(sub, sid, roles, ttl);
                c.exp = c.iat.unwrap_or(c.exp) + ttl * (k + 2);
                mint::sign_token(&self.key, &self.kid, &c)
            })
            .collect()
    }
}

#[inline]
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// User + system CPU of this process.
/// Moves a connection-local count into the shared counter (skipping the atomic when zero):
/// the clients count locally and flush now and then, so the hot loop touches no shared line.
pub fn flush_count(local: &mut u64, global: &std::sync::atomic::AtomicU64) {
    if *local > 0 {
        global.fetch_add(std::mem::take(local), std::sync::atomic::Ordering::Relaxed);
    }
}

pub fn cpu_time() -> Duration {
    // SAFETY: getrusage writes one rusage struct into the zeroed value we pass.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, (t.tv_usec as u32) * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Every mode's start: the context (key, target, source addresses), the mode's own bounds
/// (`Err` names them), then the mode on a runtime of `--threads` workers. Returns the exit
/// code.
pub fn launch<F: std::future::Future<Output = i32>>(
    common: &Common,
    bounds: Result<(), &str>,
    run: impl FnOnce(Arc<Ctx>) -> F,
) -> i32 {
    let ctx = match Ctx::new(common) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            eprintln!("loadgen: {e}");
            return 1;
        }
    };
    if let Err(b) = bounds {
        eprintln!("loadgen: bounds: {b}");
        return 1;
    }
    // One worker (the usual case: the generator gets one core) runs on a current-thread
    // runtime: every task, timer and I/O event on the calling thread, with no hand-offs
    // between a driver and a worker.
    let mut rt = if common.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(common.threads);
        b
    };
    rt.enable_all().build().expect("tokio runtime").block_on(run(ctx))
}

/// A nanosecond histogram (1 ns .. 100 s, 3 significant digits).
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("histogram bounds")
}

/// The fan-out scenario's shape, shared by `fanout` and `floor` (same flags, same
/// defaults, same assignment for the same seed).
#[derive(Args, Debug, Clone, Copy)]
pub struct Scenario {
    /// Subscriber connections (`floor` holds both ends: two descriptors each).
    #[arg(long, default_value_t = 1000)]
    pub subscribers: usize,
    /// Distinct symbols (S0000 ..).
    #[arg(long, default_value_t = 100)]
    pub symbols: usize,
    /// Symbols per subscriber.
    #[arg(long, default_value_t = 10)]
    pub per_sub: usize,
    /// Total ticks per second (spread round-robin over the symbols).
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    /// Seed for the symbol assignment.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

/// Which symbols each of `subscribers` subscribes to: `per_sub` distinct ones of `symbols`
/// (clamped to 1..=symbols), drawn with a partial Fisher-Yates shuffle seeded by `seed`.
/// `fanout` and `floor` share it, so the same arguments give the same scenario.
pub fn assignment(subscribers: usize, symbols: usize, per_sub: usize, seed: u64) -> Vec<Vec<usize>> {
    let s = symbols.max(1);
    let k = per_sub.min(s).max(1);
    let mut rng = Rng::new(seed);
    let mut idx: Vec<usize> = (0..s).collect();
    (0..subscribers)
        .map(|_| {
            for j in 0..k {
                let r = j + rng.below(s - j);
                idx.swap(j, r);
            }
            idx[..k].to_vec()
        })
        .collect()
}

/// Deterministic xorshift64*.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Microseconds with 1 decimal from nanoseconds.
pub fn us(ns: u64) -> f64 {
    (ns as f64 / 100.0).round() / 10.0
}

/// Percentiles (in µs) of a ns histogram as (name, value) pairs.
pub fn percentiles(h: &Histogram<u64>) -> Vec<(&'static str, f64)> {
    if h.is_empty() {
        return vec![];
    }
    vec![
        ("p50_us", us(h.value_at_quantile(0.50))),
        ("p90_us", us(h.value_at_quantile(0.90))),
        ("p99_us", us(h.value_at_quantile(0.99))),
        ("p999_us", us(h.value_at_quantile(0.999))),
        ("p9999_us", us(h.value_at_quantile(0.9999))),
        ("max_us", us(h.max())),
    ]
}

/// A report: ordered key/value rows printed as a table and optionally one JSON line.
pub struct Report {
    pub rows: Vec<(String, serde_json::Value)>,
}

impl Report {
    pub fn new(mode: &str, label: &str) -> Report {
        let mut r = Report { rows: vec![] };
        r.add("mode", mode);
        if !label.is_empty() {
            r.add("label", label);
        }
        r
    }
    pub fn add(&mut self, k: &str, v: impl Into<serde_json::Value>) {
        self.rows.push((k.to_string(), v.into()));
    }
    pub fn print(&self, json: bool) {
        let w = self.rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        for (k, v) in &self.rows {
            let v = match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            println!("  {k:<w$}  {v}");
        }
        if json {
            let mut m = serde_json::Map::new();
            for (k, v) in &self.rows {
                m.insert(k.clone(), v.clone());
            }
            println!("{}", serde_json::Value::Object(m));
        }
    }
}

/// Reads VmRSS (KiB) of a process.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Sum over a process's threads of (time on CPU, time waiting on a run queue), ns, from
/// /proc/PID/task/*/schedstat. The wait share shows CPU contention on a shared host.
pub fn schedstat(pid: u32) -> Option<(u64, u64)> {
    let mut run = 0u64;
    let mut wait = 0u64;
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        let s = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
        let mut it = s.split_whitespace().map(|x| x.parse::<u64>().unwrap_or(0));
        run += it.next().unwrap_or(0);
        wait += it.next().unwrap_or(0);
    }
    Some((run, wait))
}

/// Adds `server_cpu_pct` and `server_runq_wait_pct` (of wall time) between two readings.
pub fn add_sched(r: &mut Report, a: Option<(u64, u64)>, b: Option<(u64, u64)>, secs: f64) {
    if let (Some(a), Some(b)) = (a, b) {
        let pct = |ns: u64| (ns as f64 / (secs * 1e9) * 1000.0).round() / 10.0;
        r.add("server_cpu_pct", pct(b.0.saturating_sub(a.0)));
        r.add("server_runq_wait_pct", pct(b.1.saturating_sub(a.1)));
    }
}
