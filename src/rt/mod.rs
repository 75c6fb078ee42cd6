//! The runtime layer: the only code that touches sockets, threads and clocks.
//!
//! What a shard decides (which connection gets a tick, what a deadline does, who a
//! revocation closes) is in the sans-IO [`crate::core::shard::ShardCore`]; this layer feeds
//! it (bytes read, ticks and control messages from the inbox, the time) and carries out
//! its effects. Modules, each depending only on those listed before it:
//! - `io`: socket-level pieces: a connection's socket state (`Io`, kept in the same
//!   allocation as the core's per-connection state), the writer's socket handle,
//!   non-blocking `recv`/`send`, the batch of sends (`SendRing`), the rustls feed/seal
//!   steps, `shutdown(2)`;
//! - `ctx`: `ShardCtx`, a shard's state shared by its tasks: the core, the shared read
//!   buffers, the write-buffer pool, the send ring and the writes staged for it, the
//!   latency sampler, the accept canceller;
//! - `conn`: the connection pump (HTTP phase, reader, on-demand writer) and `carry_out`,
//!   which performs the core's effects (starting writers, shutting sockets down, logging);
//! - `shard`: the shard's long-lived tasks, the dispatcher and the ticker;
//! - `verify`: the reauth verifier threads;
//! - this file: bootstrap, listeners and the acceptor.
//!
//! [`start`] binds the public listener once per shard with `SO_REUSEPORT` (the first bind
//! resolves port 0, the others reuse the resolved port), starts one pinned thread per shard
//! running a monoio runtime on the io_uring driver (epoll where io_uring is unavailable,
//! with a warning, or with `server.driver = "epoll"`), starts the admin listener, and
//! returns a
//! [`ServerHandle`] with the bound addresses. With `[tls]` it also starts the thread that
//! reloads the certificate when its files change. Tests start servers in-process this way;
//! `tickgate serve` does the same and then waits for signals.

pub mod admin;
pub mod bus;
pub mod client;
pub mod conn;
pub mod ctx;
pub mod io;
pub mod jitter;
pub mod serve;
pub mod shard;
pub mod sim;
pub mod tls_watch;
pub mod verify;

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::feed::hub::Control;
use crate::state::Shared;

/// Which io driver the shards run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Driver {
    IoUring,
    Epoll,
}

impl Driver {
    pub fn detect() -> Driver {
        if monoio::utils::detect_uring() {
            Driver::IoUring
        } else {
            Driver::Epoll
        }
    }

    /// The driver shards run on with this config: `server.driver = "epoll"` forces epoll,
    /// `"auto"` takes io_uring when the kernel allows it.
    pub fn for_config(cfg: &crate::config::Config) -> Driver {
        if cfg.server.driver == "epoll" {
            Driver::Epoll
        } else {
            Driver::detect()
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Driver::IoUring => "io_uring",
            Driver::Epoll => "epoll",
        }
    }
}

pub struct ServerHandle {
    pub public_addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    pub driver: Driver,
    pub shared: Arc<Shared>,
    shards: Vec<JoinHandle<()>>,
}

impl ServerHandle {
    /// Begin draining: `/readyz` turns 503, listeners stop accepting, clients get `1001`.
    pub fn drain(&self) {
        self.shared.node.draining.store(true, Ordering::Release);
        self.shared.hub.broadcast(|| Control::Drain);
    }

    /// Live connections across all shards.
    pub fn connections(&self) -> u64 {
        self.shared
            .metrics
            .shards
            .iter()
            .map(|s| s.connections.load(Ordering::Relaxed))
            .sum()
    }

    /// Drain and wait (up to `timeout`) until every connection is gone.
    pub fn drain_and_wait(&self, timeout: Duration) -> bool {
        self.drain();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.connections() == 0 {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.connections() == 0
    }

    pub fn shard_threads(&self) -> usize {
        self.shards.len()
    }
}

/// Raise the open-file soft limit to the hard limit (one descriptor per connection with
/// either driver).
pub fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read/write the plain struct we pass by pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                lim = want;
            }
        }
    }
    lim.rlim_cur
}

/// The CPU ids the calling thread may run on (its affinity mask), ascending. Empty only if
/// the mask cannot be read.
pub fn usable_cores() -> Vec<usize> {
    // SAFETY: `set` is a plain bit set on the stack; sched_getaffinity writes at most
    // `size_of::<cpu_set_t>()` bytes into it, and CPU_ISSET only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// Pins the calling thread to one CPU. Returns whether the kernel accepted it.
pub fn pin_to_core(core: usize) -> bool {
    if core >= libc::CPU_SETSIZE as usize {
        return false;
    }
    // SAFETY: `set` is a plain bit set on the stack, zeroed and then given one bit (`core`
    // is below CPU_SETSIZE); sched_setaffinity only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

/// Sets the calling thread's nice value; false when not permitted. On Linux the nice value
/// is per thread (`who = 0` is the calling thread), not per process as POSIX has it.
pub fn set_thread_nice(nice: i32) -> bool {
    // SAFETY: setpriority takes plain integers and touches no memory.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) == 0 }
}

fn bind_reuseport(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.bind(&addr.into())?;
    s.listen(4096)?;
    Ok(s.into())
}

/// Start every shard and the admin listener.
pub fn start(shared: Arc<Shared>) -> std::io::Result<ServerHandle> {
    raise_nofile();
    let cfg = &shared.cfg;
    if cfg.tls.is_some() && shared.tls.is_none() {
        // Never serve plain text on a listener configured for TLS.
        return Err(std::io::Error::other(
            "[tls] is configured but not loaded (Shared::with_tls)",
        ));
    }
    let shards = shared.hub.shards();
    let first = bind_reuseport(cfg.server.listen)?;
    let public_addr = first.local_addr()?;
    let mut listeners = vec![first];
    for _ in 1..shards {
        listeners.push(bind_reuseport(public_addr)?);
    }
    let driver = Driver::for_config(cfg);
    if driver == Driver::Epoll && cfg.server.driver == "auto" {
        tracing::warn!("io_uring is unavailable (kernel, sysctl or seccomp): shards run on epoll");
    }
    // Shard i goes to the i-th CPU this process may use (so `taskset -c 2,3 tickgate
    // serve` puts shards on 2 and 3, not on 0 and 1).
    let cores = usable_cores();
    let mut threads = Vec::new();
    let (ready_tx, ready_rx) = crossbeam_channel::bounded::<Result<(), String>>(shards);
    let pool = verify::VerifyPool::start(shared.clone(), shards.div_ceil(2))?;
    for (id, l) in listeners.into_iter().enumerate() {
        let shared = shared.clone();
        let ready = ready_tx.clone();
        let pool = pool.clone();
        let core = (!cores.is_empty()).then(|| cores[id % cores.len()]);
        let t = std::thread::Builder::new()
            .name(format!("tickgate-shard-{id}"))
            .spawn(move || {
                if shared.cfg.server.pin_cores
                    && let Some(core) = core
                {
                    pin_to_core(core);
                }
                run_shard(id, shared, l, ready, pool, driver);
            })?;
        threads.push(t);
    }
    drop(ready_tx);
    for _ in 0..shards {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(std::io::Error::other(e)),
            Err(_) => return Err(std::io::Error::other("a shard thread died during start-up")),
        }
    }
    if shared.tls.is_some() {
        tls_watch::spawn(Arc::downgrade(&shared), crate::tls::WATCH_INTERVAL)?;
    }
    // `[cluster]`: the bus thread (nothing without it).
    bus::spawn(shared.clone(), public_addr.port())?;
    let admin_addr = if cfg.admin.enabled {
        Some(admin::start(shared.clone())?)
    } else {
        None
    };
    Ok(ServerHandle {
        public_addr,
        admin_addr,
        driver,
        shared,
        shards: threads,
    })
}

fn run_shard(
    id: usize,
    shared: Arc<Shared>,
    listener: std::net::TcpListener,
    ready: crossbeam_channel::Sender<Result<(), String>>,
    pool: verify::VerifyPool,
    driver: Driver,
) {
    let rt = match driver {
        Driver::IoUring => {
            let mut urb = io_uring::IoUring::builder();
            if shared.cfg.server.sqpoll {
                urb.setup_sqpoll(2000);
            }
            monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
                .with_entries(shared.cfg.server.io_uring_entries)
                .uring_builder(urb)
                .enable_timer()
                .build()
        }
        Driver::Epoll => monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .map(Into::into),
    };
    // epoll accepts with a plain accept(2): on a blocking listener it would block the
    // whole shard until the next connection.
    if driver == Driver::Epoll
        && let Err(e) = listener.set_nonblocking(true)
    {
        let _ = ready.send(Err(format!("shard {id}: listener: {e}")));
        return;
    }
    let mut rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(format!("shard {id}: cannot build the runtime: {e}")));
            return;
        }
    };
    rt.block_on(async move {
        let listener = match monoio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                let _ = ready.send(Err(format!("shard {id}: listener: {e}")));
                return;
            }
        };
        let ctx = match ctx::ShardCtx::new(id, shared, pool, driver == Driver::IoUring) {
            Ok(c) => c,
            Err(e) => {
                let _ = ready.send(Err(format!("shard {id}: cannot create its epoll set: {e}")));
                return;
            }
        };
        monoio::spawn(shard::dispatcher(ctx.clone()));
        monoio::spawn(conn::readers(ctx.clone()));
        monoio::spawn(shard::ticker(ctx.clone()));
        if ctx.spin.is_some() {
            monoio::spawn(shard::busy_poll(ctx.clone()));
        } else if id == 0 && !ctx.shared.cfg.server.busy_poll.is_zero() {
            tracing::warn!("server.busy_poll is ignored on the epoll driver (io_uring only)");
        }
        let _ = ready.send(Ok(()));
        drop(ready);
        accept_loop(ctx, listener).await;
        // Keep serving the connections being drained; the process exits from main.
        std::future::pending::<()>().await;
    });
}

async fn accept_loop(ctx: Rc<ctx::ShardCtx>, listener: monoio::net::TcpListener) {
    let Some(handle) = ctx.accept_cancel.borrow().as_ref().map(|c| c.handle()) else {
        return;
    };
    let max_conns = ctx.shared.cfg.server.max_connections_per_shard;
    loop {
        let accepted = listener.cancelable_accept(handle.clone()).await;
        if ctx.core.borrow().is_draining() {
            return;
        }
        ctx.note_work();
        match accepted {
            Ok((stream, peer)) => {
                if ctx.core.borrow().len() >= max_conns {
                    // Over capacity: refuse at once rather than queue unbounded work. (A
                    // full pending table is not a refusal: see `ShardCore::admit_pending`.)
                    use crate::auth::seclog::{Event, Outcome, Reason, SecurityEvent};
                    ctx.shared.audit(&SecurityEvent {
                        ip: Some(peer.ip()),
                        ..SecurityEvent::at(
                            ctx.now_ms(),
                            Event::Handshake,
                            Outcome::Rejected,
                            Reason::ShardFull,
                        )
                    });
                    drop(stream);
                    continue;
                }
                monoio::spawn(conn::run(ctx.clone(), stream, peer));
            }
            Err(e) => {
                tracing::warn!(shard = ctx.id, error = %e, "accept failed");
                // EMFILE and friends: back off instead of spinning.
                monoio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinning_follows_the_affinity_mask() {
        let cores = usable_cores();
        assert!(!cores.is_empty());
        assert!(cores.windows(2).all(|w| w[0] < w[1]));
        let last = *cores.last().unwrap();
        let seen = std::thread::spawn(move || {
            assert!(pin_to_core(last));
            usable_cores()
        })
        .join()
        .unwrap();
        assert_eq!(seen, vec![last]);
        assert!(!pin_to_core(libc::CPU_SETSIZE as usize));
    }
}
