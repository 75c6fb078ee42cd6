//! `tickgate serve` as a library: the configuration it runs with ([`load_config`]),
//! building [`Shared`] and starting the runtime ([`start`]), then, until a signal ends it
//! ([`Running::wait`]): `SIGHUP` reloads keys, allow-lists and the TLS certificate
//! ([`reload`]), `SIGTERM`/`SIGINT` drain. `cli` only parses arguments and prints.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use crate::auth::keys::KeySet;
use crate::auth::mint;
use crate::auth::origin::parse_allowed_origin;
use crate::auth::seclog::SecurityLog;
use crate::config::Config;
use crate::rt::ServerHandle;
use crate::state::{AuthState, Shared};

/// Why `serve` could not start, and the exit code it means (OPS.md): 1 for a bad
/// configuration, 2 for what the host refused.
#[derive(Debug)]
pub struct Failure {
    pub code: i32,
    pub msg: String,
}

impl Failure {
    fn usage(msg: impl Into<String>) -> Failure {
        Failure {
            code: 1,
            msg: msg.into(),
        }
    }

    fn start(msg: impl Into<String>) -> Failure {
        Failure {
            code: 2,
            msg: msg.into(),
        }
    }
}

/// The process environment, for `TICKGATE_*` overrides.
pub fn env_vars() -> Vec<(String, String)> {
    std::env::vars().collect()
}

/// A started server.
pub struct Running {
    pub handle: ServerHandle,
    /// The embedded demo's in-memory signing key (for the banner's token).
    pub demo_key: Option<ed25519_dalek::SigningKey>,
    signals: signal_hook::iterator::Signals,
    config: Option<PathBuf>,
    _simulator_stop: Arc<AtomicBool>,
}

impl Running {
    /// Serves until `SIGTERM`/`SIGINT` (then drains within `server.drain_timeout`),
    /// reloading on `SIGHUP`; returns the exit code.
    pub fn wait(self) -> i32 {
        wait_for_signals(self.signals, &self.handle, self.config.as_deref())
    }
}

/// The embedded demo's configuration (OPS.md "The embedded demo"). It allows a missing
/// `Origin`; the origins of its own address are added by `serve` once the address is final
/// (after overrides, and after the bind for port 0), see [`demo_origins`], after those
/// given with `--allow-origin` ([`add_extra_origins`]).
pub fn demo_config() -> Config {
    let mut cfg = Config::default_production();
    cfg.server.listen = "127.0.0.1:8080".parse().expect("static address");
    cfg.admin.listen = "127.0.0.1:9090".parse().expect("static address");
    cfg.auth.allow_missing_origin = true;
    cfg.server.demo_page = true;
    cfg.feed.simulator = true;
    cfg.compression.enabled = true;
    cfg.feed.simulator_symbols = vec![
        "BTC-USD".into(),
        "ETH-USD".into(),
        "SOL-USD".into(),
        "XRP-USD".into(),
    ];
    cfg
}

/// The origins a browser sends for pages served from the demo's own address `addr`: the
/// address itself and, when it is a loopback address, `localhost` on the same port. The
/// unspecified address (`0.0.0.0`, `[::]`) stands for every local address, of which the
/// loopback ones are the ones known here: `127.0.0.1` (and `[::1]` for `[::]`) and
/// `localhost`. `https` with `[tls]`. Empty for port 0, which is not an address a browser
/// can use (the port is known after the bind).
pub fn demo_origins(addr: SocketAddr, tls: bool) -> Vec<String> {
    let port = addr.port();
    if port == 0 {
        return Vec::new();
    }
    let scheme = if tls { "https" } else { "http" };
    let ip = addr.ip();
    let hosts: Vec<IpAddr> = match ip {
        IpAddr::V4(v4) if v4.is_unspecified() => vec![Ipv4Addr::LOCALHOST.into()],
        IpAddr::V6(v6) if v6.is_unspecified() => vec![Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()],
        ip => vec![ip],
    };
    // `SocketAddr::new` drops an IPv6 scope id, which an origin cannot carry.
    let mut origins: Vec<String> = hosts
        .into_iter()
        .map(|h| format!("{scheme}://{}", SocketAddr::new(h, port)))
        .collect();
    if ip.is_loopback() || ip.is_unspecified() {
        origins.push(format!("{scheme}://localhost:{port}"));
    }
    origins
}

/// The demo page's address for a listener bound to `addr`: the first of its own origins
/// ([`demo_origins`], so the page's origin is one the demo accepts) and `/`. `None` for
/// port 0.
pub fn demo_page_url(addr: SocketAddr, tls: bool) -> Option<String> {
    demo_origins(addr, tls).into_iter().next().map(|o| o + "/")
}

/// Adds the origins of `addr` ([`demo_origins`]) to the allow-list, after any the operator
/// configured.
pub fn add_demo_origins(cfg: &mut Config, addr: SocketAddr) {
    for o in demo_origins(addr, cfg.tls.is_some()) {
        if !cfg.auth.allowed_origins.contains(&o) {
            cfg.auth.allowed_origins.push(o);
        }
    }
}

/// Adds `extra` (the demo's `--allow-origin`s) to the allow-list, after any configured.
/// Each must be an origin `auth.allowed_origins` accepts; the error names the first that
/// is not.
pub fn add_extra_origins(cfg: &mut Config, extra: &[String]) -> Result<(), String> {
    for o in extra {
        parse_allowed_origin(o).map_err(|why| format!("--allow-origin {o}: {why}"))?;
        if !cfg.auth.allowed_origins.contains(o) {
            cfg.auth.allowed_origins.push(o.clone());
        }
    }
    Ok(())
}

/// The configuration `serve` runs with: the file (or the embedded demo's when there is
/// none), then the environment, then `overrides` (`section`, `key`, `value`: the command
/// line's), `server.shards = 0` made the core count, the demo's `extra_origins`
/// (`--allow-origin`, demo only: with a file they are an error) and its own origins,
/// validated. An override of `auth.allowed_origins` replaces the list it is given (the
/// file's, or the demo's empty one); the demo's origins are added after it.
pub fn load_config(
    config: Option<&Path>,
    env: &[(String, String)],
    overrides: &[(String, String, String)],
    extra_origins: &[String],
) -> Result<Config, Failure> {
    let demo = config.is_none();
    if !demo && !extra_origins.is_empty() {
        return Err(Failure::usage(
            "--allow-origin is for the embedded demo (no --config); with a config file list the origin in auth.allowed_origins",
        ));
    }
    let mut cfg = match config {
        Some(p) => Config::load(p, env).map_err(|e| Failure::usage(e.to_string()))?,
        None => {
            let mut c = demo_config();
            c.apply_env(env).map_err(|e| Failure::usage(e.to_string()))?;
            c
        }
    };
    for (section, key, value) in overrides {
        cfg.apply_override(section, key, value)
            .map_err(|e| Failure::usage(e.to_string()))?;
    }
    if cfg.server.shards == 0 {
        cfg.server.shards = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(64);
    }
    if demo {
        add_extra_origins(&mut cfg, extra_origins).map_err(Failure::usage)?;
        let listen = cfg.server.listen;
        add_demo_origins(&mut cfg, listen);
    }
    cfg.validate().map_err(|e| Failure::usage(e.to_string()))?;
    Ok(cfg)
}

/// Builds [`Shared`] from `cfg` (keys from the files it names, or, for the embedded demo
/// (`config` is `None`), one made in memory; the security log; `[tls]`), installs the
/// signal handlers, starts the runtime (and the simulator when configured).
pub fn start(cfg: Config, config: Option<PathBuf>) -> Result<Running, Failure> {
    let demo = config.is_none();
    // Keys: from the config, or (demo) one made in memory.
    let mut demo_key = None;
    let keys = if demo {
        let sk = match mint::generate_signing_key() {
            Ok(k) => k,
            Err(_) => {
                return Err(Failure::start(
                    "cannot generate a key: the OS random source failed",
                ));
            }
        };
        let mut ks = KeySet::new();
        if ks.insert(mint::DEMO_KID, sk.verifying_key()).is_err() {
            return Err(Failure::start("demo key set"));
        }
        demo_key = Some(sk);
        ks
    } else {
        match AuthState::load_keys(&cfg) {
            Ok(k) => k,
            Err(e) => return Err(Failure::usage(e)),
        }
    };
    let auth = match AuthState::build(&cfg, keys) {
        Ok(a) => a,
        Err(e) => return Err(Failure::usage(e)),
    };
    let seclog = match SecurityLog::open(&cfg.log.security) {
        Ok(l) => l,
        Err(e) => return Err(Failure::usage(format!("log.security: {}: {e}", cfg.log.security))),
    };
    let tls = match cfg.tls.as_ref().map(crate::tls::TlsState::load).transpose() {
        Ok(t) => t,
        Err(e) => return Err(Failure::usage(e)),
    };
    // Handlers go in before the listener opens, so a SIGTERM that arrives as soon as the
    // first client is served still drains instead of killing the process.
    let signals = {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        match signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP]) {
            Ok(s) => s,
            Err(e) => return Err(Failure::start(format!("signals: {e}"))),
        }
    };
    let mut shared = Shared::new(cfg, auth, seclog);
    if let Some(t) = tls {
        shared = shared.with_tls(t);
    }
    if let Some(k) = &demo_key {
        shared = shared.with_demo_key(k.clone());
    }
    let shared = Arc::new(shared);
    let handle = match super::start(shared.clone()) {
        Ok(h) => h,
        Err(e) => return Err(Failure::start(format!("cannot start: {e}"))),
    };
    if demo && shared.cfg.server.listen.port() == 0 {
        // Only now is the port known: allow the origins of the bound address.
        let mut cfg = shared.cfg.clone();
        add_demo_origins(&mut cfg, handle.public_addr);
        match AuthState::build(&cfg, shared.auth().verifier.keys().clone()) {
            Ok(auth) => shared.swap_auth(auth),
            Err(e) => return Err(Failure::start(e)),
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    if shared.cfg.feed.simulator
        && let Err(e) = super::sim::spawn(
            shared.clone(),
            &shared.cfg.feed.simulator_symbols,
            shared.cfg.feed.simulator_rate,
            stop.clone(),
        )
    {
        return Err(Failure::start(format!("simulator: {e}")));
    }
    tracing::info!(
        tls = shared.tls.is_some(),
        shards = handle.shard_threads(),
        driver = handle.driver.name(),
        entries = shared.cfg.server.io_uring_entries,
        sqpoll = shared.cfg.server.sqpoll,
        "tickgate started"
    );
    Ok(Running {
        handle,
        demo_key,
        signals,
        config,
        _simulator_stop: stop,
    })
}

/// How long an exiting node waits for the bus thread to release the ingest.
const INGEST_RELEASE_WAIT: Duration = Duration::from_secs(2);

fn wait_for_signals(
    mut signals: signal_hook::iterator::Signals,
    handle: &ServerHandle,
    config: Option<&Path>,
) -> i32 {
    use signal_hook::consts::SIGHUP;
    for sig in signals.forever() {
        match sig {
            SIGHUP => reload(handle, config),
            _ => {
                tracing::info!("draining");
                let timeout = handle.shared.cfg.server.drain_timeout;
                let clean = handle.drain_and_wait(timeout);
                // `[cluster]`: an ingest leader (which read the feed all through the drain)
                // deletes its claim before the process goes, so the next node claims the
                // ingest within a second instead of when the claim expires (3 s later).
                handle
                    .shared
                    .bus
                    .release_ingest
                    .store(true, std::sync::atomic::Ordering::Release);
                let until = std::time::Instant::now() + INGEST_RELEASE_WAIT;
                while handle.shared.bus.leads_ingest() && std::time::Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(10));
                }
                // Give the last close frames a moment to reach the wire.
                std::thread::sleep(Duration::from_millis(50));
                tracing::info!(clean, "drained, exiting");
                return 0;
            }
        }
    }
    0
}

/// SIGHUP: reload keys and allow-lists from the config file and the TLS certificate from
/// its files; live connections stay (they keep the keys' verdict and the TLS session they
/// have). Each part is reloaded on its own: a bad certificate does not block a key rotation
/// and vice versa. The certificate is re-read from the paths the server started with.
pub fn reload(handle: &ServerHandle, config: Option<&Path>) {
    if let Some(tls) = handle.shared.tls.as_ref() {
        tls.reload_logged("SIGHUP");
    }
    let Some(path) = config else {
        tracing::info!("SIGHUP: the embedded demo has nothing to reload");
        return;
    };
    let result = Config::load(path, &env_vars())
        .map_err(|e| e.to_string())
        .and_then(|cfg| AuthState::load_keys(&cfg).and_then(|k| AuthState::build(&cfg, k)));
    match result {
        Ok(auth) => {
            let kids = auth.verifier.keys().kids();
            handle.shared.swap_auth(auth);
            tracing::info!(?kids, "SIGHUP: keys and allow-lists reloaded");
        }
        Err(e) => {
            tracing::error!(error = %e, "SIGHUP: reload failed, keeping the previous keys and allow-lists")
        }
    }
}
