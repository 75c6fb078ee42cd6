//! `floor` mode: what this machine's kernel allows a fan-out server at best, with no server.
//!
//! One process, two pinned threads, N loopback TCP connections:
//! - the **sender** (the ideal server) generates ticks itself at `--rate` (round-robin over
//!   the symbols, each stamped with its due time), appends each tick's fixed-size record to
//!   the out buffer of every subscriber of its symbol, and then writes every non-empty buffer
//!   with one non-blocking `send` per connection per turn: the same batching as tickgate, with
//!   nothing else (no publisher hop, no WebSocket, no JSON, no auth, no runtime);
//! - the **receiver** (the ideal client) waits in `epoll_wait`, reads every ready socket and
//!   records due time -> receipt for each record in an HdrHistogram.
//!
//! Its latency percentiles are a floor for `loadgen fanout` against any server on the same
//! machine with the same scenario: the kernel's loopback TCP path, the wake-ups between cores
//! and the host's scheduling are all still in it. The sender's CPU per send is the kernel's
//! price of one delivery write. Subscriber/symbol assignment is `fanout`'s (same seed).

use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use clap::Args;
use hdrhistogram::Histogram;

use crate::common::{Report, Rng, histogram, now_ns, percentiles};

#[derive(Args, Debug, Clone)]
pub struct FloorArgs {
    /// Subscriber connections.
    #[arg(long, default_value_t = 1000)]
    pub subscribers: usize,
    /// Distinct symbols.
    #[arg(long, default_value_t = 100)]
    pub symbols: usize,
    /// Symbols per subscriber.
    #[arg(long, default_value_t = 10)]
    pub per_sub: usize,
    /// Ticks per second (round-robin over the symbols).
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    /// Bytes per tick record (tickgate's tick frames are about 110 bytes).
    #[arg(long, default_value_t = 112)]
    pub frame_bytes: usize,
    /// Warm-up seconds (ticks sent, not measured).
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Measured seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Core for the sender (the server's role).
    #[arg(long, default_value_t = 0)]
    pub sender_core: usize,
    /// Core for the receiver (the clients' role).
    #[arg(long, default_value_t = 1)]
    pub receiver_core: usize,
    /// Per-connection bound on unsent bytes; past it the tick is dropped for that
    /// connection (counted), as a conflating server would.
    #[arg(long, default_value_t = 256 * 1024)]
    pub max_queued: usize,
    /// Seed for the symbol assignment (as `fanout`).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Print one JSON line after the table.
    #[arg(long)]
    pub json: bool,
    /// Label for the report.
    #[arg(long, default_value = "")]
    pub label: String,
}

/// Record layout: due time (ns, little endian) then padding up to `frame_bytes`.
const HDR: usize = 8;

fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn sleep_until(t: u64) {
    let now = now_ns();
    if t > now {
        std::thread::sleep(Duration::from_nanos(t - now));
    }
}

/// The symbol assignment of `fanout` (same seed, same subscribers per symbol).
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

fn pairs(n: usize) -> io::Result<(Vec<TcpStream>, Vec<TcpStream>)> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let (mut srv, mut cli) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        let c = TcpStream::connect(addr)?;
        let (s, _) = l.accept()?;
        for x in [&c, &s] {
            x.set_nodelay(true)?;
            x.set_nonblocking(true)?;
        }
        srv.push(s);
        cli.push(c);
    }
    Ok((srv, cli))
}

struct Shared {
    t0: AtomicU64,
    t1: AtomicU64,
    /// The sender stops generating; it then publishes `sent_window` and sets `sent_done`.
    stop_send: AtomicBool,
    sent_done: AtomicBool,
    sent_window: AtomicU64,
    /// The receiver's hard stop (it ends by itself once it has every window record).
    stop: AtomicBool,
}

struct SenderStats {
    /// CPU time and sends inside the measured window.
    cpu_ns: u64,
    sends: u64,
    dropped: u64,
    max_lag_ns: u64,
}

/// CPU time of the calling thread inside the window `[t0, t1)`, sampled once per turn.
#[derive(Default)]
struct WindowCpu {
    at_t0: Option<(u64, u64)>,
    at_t1: Option<(u64, u64)>,
}

impl WindowCpu {
    fn turn(&mut self, now: u64, sh: &Shared, count: u64) {
        if self.at_t0.is_none() && now >= sh.t0.load(Relaxed) {
            self.at_t0 = Some((thread_cpu_ns(), count));
        } else if self.at_t0.is_some() && self.at_t1.is_none() && now >= sh.t1.load(Relaxed) {
            self.at_t1 = Some((thread_cpu_ns(), count));
        }
    }
    /// (CPU ns, count) spent inside the window.
    fn spent(&self) -> (u64, u64) {
        match (self.at_t0, self.at_t1) {
            (Some(a), Some(b)) => (b.0 - a.0, b.1 - a.1),
            _ => (0, 0),
        }
    }
}

/// One non-blocking `send` per connection with anything queued; returns the sends made.
/// Connections whose buffer did not empty stay in `dirty`.
fn write_turn(
    fds: &[i32],
    out: &mut [Vec<u8>],
    sent_off: &mut [usize],
    dirty: &mut Vec<u32>,
    is_dirty: &mut [bool],
) -> u64 {
    let mut keep = 0;
    let n = dirty.len();
    for i in 0..n {
        let c = dirty[i] as usize;
        let b = &out[c][sent_off[c]..];
        // SAFETY: `b` is an initialised byte slice; send reads at most `b.len()` bytes.
        let r = unsafe {
            libc::send(
                fds[c],
                b.as_ptr().cast(),
                b.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if r > 0 {
            sent_off[c] += r as usize;
        }
        if sent_off[c] == out[c].len() {
            out[c].clear();
            sent_off[c] = 0;
            is_dirty[c] = false;
        } else {
            dirty[keep] = c as u32;
            keep += 1;
        }
    }
    dirty.truncate(keep);
    n as u64
}

fn sender(a: &FloorArgs, socks: Vec<TcpStream>, by_sym: Vec<Vec<u32>>, sh: &Shared) -> SenderStats {
    tickgate::rt::pin_to_core(a.sender_core);
    let n = socks.len();
    let fds: Vec<i32> = socks.iter().map(|s| s.as_raw_fd()).collect();
    let mut out: Vec<Vec<u8>> = vec![Vec::new(); n];
    let mut sent_off = vec![0usize; n];
    let mut dirty: Vec<u32> = Vec::with_capacity(n);
    let mut is_dirty = vec![false; n];
    let mut rec = vec![0u8; a.frame_bytes.max(HDR)];
    let interval = 1_000_000_000 / a.rate.max(1);
    let start = now_ns() + 10_000_000;
    let (mut ticks, mut sends, mut dropped, mut max_lag) = (0u64, 0u64, 0u64, 0u64);
    let mut enqueued = 0u64;
    let mut wcpu = WindowCpu::default();
    sleep_until(start);
    while !sh.stop_send.load(Relaxed) {
        let now = now_ns();
        wcpu.turn(now, sh, sends);
        // Every tick due by now, each stamped with its due time (late ticks count late).
        while start + ticks * interval <= now {
            let due = start + ticks * interval;
            max_lag = max_lag.max(now - due);
            let sym = (ticks % by_sym.len() as u64) as usize;
            rec[..HDR].copy_from_slice(&due.to_le_bytes());
            let (t0, t1) = (sh.t0.load(Relaxed), sh.t1.load(Relaxed));
            let counted = due >= t0 && due < t1;
            for &c in &by_sym[sym] {
                let c = c as usize;
                if out[c].len() - sent_off[c] + rec.len() > a.max_queued {
                    dropped += counted as u64;
                    continue;
                }
                out[c].extend_from_slice(&rec);
                enqueued += counted as u64;
                if !is_dirty[c] {
                    is_dirty[c] = true;
                    dirty.push(c as u32);
                }
            }
            ticks += 1;
        }
        sends += write_turn(&fds, &mut out, &mut sent_off, &mut dirty, &mut is_dirty);
        if dirty.is_empty() {
            sleep_until(start + ticks * interval);
        }
    }
    // What is still queued (a receiver behind) gets up to 2 s to go out.
    let give_up = now_ns() + 2_000_000_000;
    while !dirty.is_empty() && now_ns() < give_up {
        write_turn(&fds, &mut out, &mut sent_off, &mut dirty, &mut is_dirty);
        std::thread::sleep(Duration::from_millis(1));
    }
    sh.sent_window.store(enqueued, Relaxed);
    sh.sent_done.store(true, Relaxed);
    let (cpu_ns, sends) = wcpu.spent();
    SenderStats {
        cpu_ns,
        sends,
        dropped,
        max_lag_ns: max_lag,
    }
}

fn receiver(core: usize, frame: usize, socks: Vec<TcpStream>, sh: &Shared) -> (Histogram<u64>, u64, u64) {
    tickgate::rt::pin_to_core(core);
    let mut h = histogram();
    // SAFETY: epoll_create1 has no memory effects; the result is checked.
    let ep = unsafe { libc::epoll_create1(0) };
    assert!(ep >= 0, "epoll_create1");
    for (i, s) in socks.iter().enumerate() {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: i as u64,
        };
        // SAFETY: `ev` is a valid epoll_event for the duration of the call.
        unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, s.as_raw_fd(), &mut ev) };
    }
    let mut partial: Vec<Vec<u8>> = vec![Vec::new(); socks.len()];
    let mut evs = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
    let mut buf = vec![0u8; 256 * 1024];
    let mut received = 0u64;
    let mut wcpu = WindowCpu::default();
    while !sh.stop.load(Relaxed) {
        // SAFETY: `evs` has room for `evs.len()` events.
        let k = unsafe { libc::epoll_wait(ep, evs.as_mut_ptr(), evs.len() as i32, 100) };
        wcpu.turn(now_ns(), sh, 0);
        let (t0, t1) = (sh.t0.load(Relaxed), sh.t1.load(Relaxed));
        for e in &evs[..k.max(0) as usize] {
            let i = e.u64 as usize;
            let fd = socks[i].as_raw_fd();
            loop {
                // SAFETY: `buf` is a valid, writable buffer of `buf.len()` bytes.
                let r = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
                if r <= 0 {
                    break;
                }
                let now = now_ns();
                let p = &mut partial[i];
                p.extend_from_slice(&buf[..r as usize]);
                let whole = p.len() / frame * frame;
                for rec in p[..whole].chunks_exact(frame) {
                    let due = u64::from_le_bytes(rec[..HDR].try_into().expect("8 bytes"));
                    if due >= t0 && due < t1 {
                        received += 1;
                        h.record(now.saturating_sub(due).max(1)).ok();
                    }
                }
                p.drain(..whole);
                if (r as usize) < buf.len() {
                    break;
                }
            }
        }
        if sh.sent_done.load(Relaxed) && received >= sh.sent_window.load(Relaxed) {
            break;
        }
    }
    // SAFETY: `ep` is our epoll descriptor, closed once.
    unsafe { libc::close(ep) };
    (h, received, wcpu.spent().0)
}

/// What a run measured.
pub struct Outcome {
    pub hist: Histogram<u64>,
    pub secs: f64,
    /// Deliveries owed in the window (queued plus dropped at the bound) and received.
    pub expected: u64,
    pub received: u64,
    sender: SenderStats,
    receiver_cpu_ns: u64,
}

pub fn run(a: &FloorArgs) -> Result<Outcome, String> {
    let subs = assignment(a.subscribers, a.symbols, a.per_sub, a.seed);
    let mut by_sym: Vec<Vec<u32>> = vec![Vec::new(); a.symbols.max(1)];
    for (i, mine) in subs.iter().enumerate() {
        for &s in mine {
            by_sym[s].push(i as u32);
        }
    }
    let (srv, cli) = pairs(a.subscribers).map_err(|e| format!("{e} (raise the open-file limit?)"))?;
    let sh = Arc::new(Shared {
        t0: AtomicU64::new(u64::MAX),
        t1: AtomicU64::new(u64::MAX),
        stop_send: AtomicBool::new(false),
        sent_done: AtomicBool::new(false),
        sent_window: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let frame = a.frame_bytes.max(HDR);
    let tx = {
        let (a, sh) = (a.clone(), sh.clone());
        std::thread::spawn(move || sender(&a, srv, by_sym, &sh))
    };
    let rx = {
        let (core, sh) = (a.receiver_core, sh.clone());
        std::thread::spawn(move || receiver(core, frame, cli, &sh))
    };
    std::thread::sleep(Duration::from_secs_f64(a.warmup));
    let t0 = now_ns();
    sh.t0.store(t0, Relaxed);
    std::thread::sleep(Duration::from_secs_f64(a.duration));
    let t1 = now_ns();
    sh.t1.store(t1, Relaxed);
    // The window's last ticks are written within a turn of t1; the receiver then ends as
    // soon as it has every record of the window, or after 10 s (those missing are drops).
    std::thread::sleep(Duration::from_millis(100));
    sh.stop_send.store(true, Relaxed);
    let sender = tx.join().map_err(|_| "sender panicked")?;
    let give_up = now_ns() + 10_000_000_000;
    while !rx.is_finished() && now_ns() < give_up {
        std::thread::sleep(Duration::from_millis(10));
    }
    sh.stop.store(true, Relaxed);
    let (hist, received, receiver_cpu_ns) = rx.join().map_err(|_| "receiver panicked")?;
    Ok(Outcome {
        hist,
        secs: (t1 - t0) as f64 / 1e9,
        expected: sh.sent_window.load(Relaxed) + sender.dropped,
        received,
        sender,
        receiver_cpu_ns,
    })
}

pub fn main(a: FloorArgs) -> i32 {
    let o = match run(&a) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("loadgen floor: {e}");
            return 1;
        }
    };
    let secs = o.secs;
    let mut r = Report::new("floor", &a.label);
    r.add("subscribers", a.subscribers as u64);
    r.add("symbols", a.symbols as u64);
    r.add("per_sub", a.per_sub as u64);
    r.add("rate_ticks_per_s", a.rate);
    r.add("frame_bytes", a.frame_bytes.max(HDR) as u64);
    r.add("duration_s", (secs * 100.0).round() / 100.0);
    for (name, v) in percentiles(&o.hist) {
        r.add(name, v);
    }
    r.add("delivered_per_s", (o.received as f64 / secs).round());
    r.add("expected", o.expected);
    r.add("received", o.received);
    r.add("drops", o.expected.saturating_sub(o.received));
    let pct = |ns: u64| (ns as f64 / (secs * 1e9) * 1000.0).round() / 10.0;
    r.add("sender_cpu_pct", pct(o.sender.cpu_ns));
    r.add("receiver_cpu_pct", pct(o.receiver_cpu_ns));
    r.add("sends", o.sender.sends);
    r.add(
        "sender_ns_per_send",
        o.sender.cpu_ns.checked_div(o.sender.sends).unwrap_or(0),
    );
    r.add("sender_max_lag_us", o.sender.max_lag_ns / 1000);
    r.print(a.json);
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignment_gives_each_subscriber_k_distinct_symbols() {
        let a = assignment(200, 100, 10, 42);
        assert_eq!(a.len(), 200);
        for mine in &a {
            let mut m = mine.clone();
            m.sort();
            m.dedup();
            assert_eq!(m.len(), 10);
            assert!(m.iter().all(|&s| s < 100));
        }
    }

    #[test]
    fn a_short_run_delivers_every_record() {
        let a = FloorArgs {
            subscribers: 20,
            symbols: 10,
            per_sub: 2,
            rate: 2000,
            frame_bytes: 64,
            warmup: 0.1,
            duration: 0.3,
            sender_core: 0,
            receiver_core: 0,
            max_queued: 1 << 20,
            seed: 1,
            json: false,
            label: String::new(),
        };
        let o = run(&a).expect("run");
        // 2000 ticks/s round-robin over 10 symbols with 4 subscribers each (20 x 2 / 10):
        // about 0.3 s x 2000 x 4 deliveries in the window, every one received.
        assert!(o.expected > 1000, "expected {}", o.expected);
        assert_eq!(o.received, o.expected);
        assert_eq!(o.hist.len(), o.received);
    }
}
