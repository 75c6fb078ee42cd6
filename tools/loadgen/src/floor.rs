//! `floor` mode: the latency a fan-out gets on this machine with no server at all.
//!
//! One process, two pinned threads, N loopback TCP connections:
//! - the **sender** plays an ideal server: it generates ticks itself at `--rate`
//!   (round-robin over the symbols), appends each tick's fixed-size record to the out
//!   buffer of every subscriber of its symbol, then writes every non-empty buffer with one
//!   non-blocking `send` per connection per turn: tickgate's batching with nothing else (no
//!   publisher hop, no WebSocket, no JSON, no auth, no runtime);
//! - the **receiver** plays ideal clients: it waits in `epoll_wait`, reads every ready
//!   socket and records stamp -> receipt for each record in an HdrHistogram.
//!
//! Stamps follow `fanout`'s publisher: a tick generated within 2 ms of its due time carries
//! the time it was generated, a later one its due time (open loop, no coordinated
//! omission). The sender runs with 1 µs timer slack. Both ends read the monotonic clock.
//!
//! What is left is the kernel's loopback TCP path (the receiver's TCP input runs in the
//! sender's softirq), the wake-ups between cores and the host's scheduling, so its
//! percentiles bound from below what `loadgen fanout` can measure against a server doing
//! the same fan-out on the same cores. `sender_ns_per_send` is the sender's CPU (building
//! ticks, copying, the send and the receive-side work it carries) per successful send.

use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use clap::Args;
use hdrhistogram::Histogram;

use crate::common::{Report, Scenario, assignment, histogram, percentiles};
use crate::plot::HistOut;

#[derive(Args, Debug, Clone)]
pub struct FloorArgs {
    #[command(flatten)]
    pub scenario: Scenario,
    /// Bytes per tick record (tickgate's tick frames are about 110 bytes).
    #[arg(long, default_value_t = 112)]
    pub frame_bytes: usize,
    /// Warm-up seconds (ticks sent, not measured).
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Measured seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// The sender's core, as an index into the CPUs this process may use (so `taskset -c
    /// 2,3` with the defaults puts the sender on 2 and the receiver on 3).
    #[arg(long, default_value_t = 0)]
    pub sender_core: usize,
    /// The receiver's core, an index like `--sender-core`.
    #[arg(long, default_value_t = 1)]
    pub receiver_core: usize,
    /// Per-connection bound on unsent bytes; past it a tick is dropped for that connection
    /// (counted), as a conflating server would.
    #[arg(long, default_value_t = 256 * 1024)]
    pub max_queued: usize,
    /// Send each turn's writes in io_uring batches of 32 (`tickgate::rt::io::SendRing`,
    /// as tickgate's shards do) instead of one `send` each.
    #[arg(long)]
    pub batch: bool,
    /// Print one JSON line after the table.
    #[arg(long)]
    pub json: bool,
    /// Label for the report.
    #[arg(long, default_value = "")]
    pub label: String,
    #[command(flatten)]
    pub out: HistOut,
}

/// Record layout: the stamp (ns on the monotonic clock, little endian), then padding.
const HDR: usize = 8;
/// On schedule within this, a tick carries the time it was generated (as fanout's 2 batch
/// periods of 1 ms).
const ON_TIME_NS: u64 = 2_000_000;

fn bounds(a: &FloorArgs) -> Result<(), String> {
    let ok = (1..=100_000).contains(&a.scenario.subscribers)
        && (1..=100_000).contains(&a.scenario.symbols)
        && (1..=a.scenario.symbols).contains(&a.scenario.per_sub)
        && a.max_queued <= 64 * 1024 * 1024
        && (1..=10_000_000).contains(&a.scenario.rate)
        && (HDR..=64 * 1024).contains(&a.frame_bytes)
        && a.max_queued >= a.frame_bytes
        && (0.0..=120.0).contains(&a.warmup)
        && a.duration > 0.0
        && a.duration <= 600.0;
    if ok {
        Ok(())
    } else {
        Err(
            "subscribers 1..=100000, symbols 1..=100000, rate 1..=10000000, frame_bytes 8..=65536 \
             and <= max_queued, warmup 0..=120 s, duration (0, 600] s"
                .into(),
        )
    }
}

/// The monotonic clock both threads stamp and read (the server's own, so records and its
/// histograms share one clock).
fn mono_ns() -> u64 {
    tickgate::metrics::mono_ns()
}

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
    let now = mono_ns();
    if t > now {
        std::thread::sleep(Duration::from_nanos(t - now));
    }
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

/// The measured window `[t0, t1)` on the monotonic clock, fixed before either thread
/// starts, so both count the same records.
#[derive(Clone, Copy)]
struct Window {
    t0: u64,
    t1: u64,
}

impl Window {
    fn has(&self, stamp: u64) -> bool {
        stamp >= self.t0 && stamp < self.t1
    }
}

struct Shared {
    /// Records of the window the sender queued: `u64::MAX` until it is done generating.
    target: AtomicU64,
    /// The receiver's hard stop (it ends by itself once it has `target` records).
    stop: AtomicBool,
}

/// Thread CPU time and a count at the window's edges, sampled once per turn.
#[derive(Default)]
struct WindowCpu {
    at_t0: Option<(u64, u64)>,
    at_t1: Option<(u64, u64)>,
}

impl WindowCpu {
    fn turn(&mut self, now: u64, w: Window, count: u64) {
        if self.at_t0.is_none() && now >= w.t0 {
            self.at_t0 = Some((thread_cpu_ns(), count));
        } else if self.at_t0.is_some() && self.at_t1.is_none() && now >= w.t1 {
            self.at_t1 = Some((thread_cpu_ns(), count));
        }
    }
    /// (CPU ns, count) inside the window; `None` if the thread never saw both edges.
    fn spent(&self) -> Option<(u64, u64)> {
        let (a, b) = (self.at_t0?, self.at_t1?);
        Some((b.0 - a.0, b.1 - a.1))
    }
}

struct SenderStats {
    /// CPU time and successful sends inside the window.
    window: Option<(u64, u64)>,
    /// Window records dropped at the per-connection bound or on a dead connection.
    dropped: u64,
    /// Largest delay of a tick's generation past its due time, inside the window.
    max_lag_ns: u64,
}

/// The sender's per-connection output.
struct Out {
    buf: Vec<u8>,
    sent: usize,
    dirty: bool,
    dead: bool,
}

/// One non-blocking `send` per connection in `dirty` (with `ring`, in io_uring batches);
/// returns the successful sends. Connections whose buffer did not empty stay in `dirty`; a
/// hard error marks one dead.
fn write_turn(
    fds: &[i32],
    out: &mut [Out],
    dirty: &mut Vec<u32>,
    ring: Option<&mut tickgate::rt::io::SendRing>,
    results: &mut Vec<Result<usize, i32>>,
) -> u64 {
    use tickgate::rt::io::SEND_BATCH;
    // What each connection's send did: bytes taken, or the error (a buffer the sender
    // reuses from turn to turn, so a turn allocates nothing).
    results.clear();
    match ring {
        Some(r) => {
            for chunk in dirty.chunks(SEND_BATCH) {
                let mut items: [(i32, &[u8]); SEND_BATCH] = [(-1, &[]); SEND_BATCH];
                for (item, &c) in items.iter_mut().zip(chunk) {
                    let o = &out[c as usize];
                    *item = (fds[c as usize], &o.buf[o.sent..]);
                }
                let items = &items[..chunk.len()];
                let mut taken = [0usize; SEND_BATCH];
                r.send_each(items, &mut taken[..items.len()]);
                // The batch reports 0 for a full socket and for a failed one alike; a dead
                // receiver shows up as drops at the end, as a stuck one would.
                results.extend(taken[..items.len()].iter().map(|&n| Ok(n)));
            }
        }
        None => {
            for &c in dirty.iter() {
                let o = &out[c as usize];
                let b = &o.buf[o.sent..];
                // SAFETY: `b` is an initialised byte slice that outlives the call; send reads
                // at most `b.len()` bytes from it. `fds[c]` belongs to a socket the caller owns.
                let r = unsafe {
                    libc::send(
                        fds[c as usize],
                        b.as_ptr().cast(),
                        b.len(),
                        libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                    )
                };
                results.push(if r >= 0 {
                    Ok(r as usize)
                } else {
                    Err(io::Error::last_os_error().raw_os_error().unwrap_or(0))
                });
            }
        }
    }
    let mut sends = 0;
    let mut i = 0;
    dirty.retain(|&c| {
        let o = &mut out[c as usize];
        let r = results[i];
        i += 1;
        match r {
            Ok(n) if n > 0 => {
                sends += 1;
                o.sent += n;
            }
            Ok(_) | Err(libc::EAGAIN) | Err(libc::EINTR) => {}
            Err(_) => o.dead = true,
        }
        if o.sent == o.buf.len() || o.dead {
            o.buf.clear();
            o.sent = 0;
            o.dirty = false;
            return false;
        }
        if o.sent > o.buf.len() / 2 {
            // Keep a backed-up buffer from growing: drop what is already out.
            o.buf.drain(..o.sent);
            o.sent = 0;
        }
        true
    });
    sends
}

fn sender(
    a: &FloorArgs,
    core: Option<usize>,
    socks: Vec<TcpStream>,
    by_sym: Vec<Vec<u32>>,
    w: Window,
    start: u64,
    sh: &Shared,
) -> SenderStats {
    if let Some(c) = core {
        tickgate::rt::pin_to_core(c);
    }
    // 1 µs timer slack (the default 50 µs would show up in every tick's latency).
    // SAFETY: prctl with PR_SET_TIMERSLACK takes plain integers and touches no memory.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1u64, 0u64, 0u64, 0u64) };
    let fds: Vec<i32> = socks.iter().map(|s| s.as_raw_fd()).collect();
    let mut out: Vec<Out> = (0..socks.len())
        .map(|_| Out {
            buf: Vec::new(),
            sent: 0,
            dirty: false,
            dead: false,
        })
        .collect();
    let mut dirty: Vec<u32> = Vec::with_capacity(socks.len());
    let mut results = Vec::with_capacity(socks.len());
    let mut ring = if a.batch {
        match tickgate::rt::io::SendRing::new() {
            Some(r) => Some(r),
            None => {
                eprintln!("floor: --batch needs io_uring, which the kernel refused");
                std::process::exit(2);
            }
        }
    } else {
        None
    };
    let mut rec = vec![0u8; a.frame_bytes];
    let due = |i: u64| start + (i as u128 * 1_000_000_000 / a.scenario.rate as u128) as u64;
    let (mut ticks, mut sends, mut dropped, mut max_lag, mut enqueued) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut wcpu = WindowCpu::default();
    sleep_until(start);
    // Every tick due before t1 is generated, however late the sender runs.
    while due(ticks) < w.t1 {
        let now = mono_ns();
        wcpu.turn(now, w, sends);
        while due(ticks) <= now && due(ticks) < w.t1 {
            let d = due(ticks);
            let lag = now - d;
            let stamp = if lag <= ON_TIME_NS { now } else { d };
            let counted = w.has(stamp);
            if counted {
                max_lag = max_lag.max(lag);
            }
            rec[..HDR].copy_from_slice(&stamp.to_le_bytes());
            for &c in &by_sym[(ticks % by_sym.len() as u64) as usize] {
                let o = &mut out[c as usize];
                if o.dead || o.buf.len() - o.sent + rec.len() > a.max_queued {
                    dropped += counted as u64;
                    continue;
                }
                o.buf.extend_from_slice(&rec);
                enqueued += counted as u64;
                if !o.dirty {
                    o.dirty = true;
                    dirty.push(c);
                }
            }
            ticks += 1;
        }
        sends += write_turn(&fds, &mut out, &mut dirty, ring.as_mut(), &mut results);
        if dirty.is_empty() {
            sleep_until(due(ticks));
        } else {
            // A receiver behind: retry soon (a server would wait for EPOLLOUT).
            sleep_until(due(ticks).min(mono_ns() + 100_000));
        }
    }
    // The window's CPU sample needs a turn at or after t1.
    sleep_until(w.t1);
    // What is still queued gets up to 2 s to go out; the rest counts as dropped.
    let give_up = mono_ns() + 2_000_000_000;
    wcpu.turn(mono_ns(), w, sends);
    while !dirty.is_empty() && mono_ns() < give_up {
        sends += write_turn(&fds, &mut out, &mut dirty, ring.as_mut(), &mut results);
        std::thread::sleep(Duration::from_millis(1));
    }
    wcpu.turn(mono_ns(), w, sends);
    // Records still unsent here were counted as queued: they show up as `target - received`
    // (drops), not twice.
    sh.target.store(enqueued, Ordering::Release);
    SenderStats {
        window: wcpu.spent(),
        dropped,
        max_lag_ns: max_lag,
    }
}

struct RecvStats {
    hist: Histogram<u64>,
    received: u64,
    window_cpu_ns: Option<u64>,
}

fn receiver(
    core: Option<usize>,
    frame: usize,
    socks: Vec<TcpStream>,
    w: Window,
    sh: &Shared,
) -> io::Result<RecvStats> {
    if let Some(c) = core {
        tickgate::rt::pin_to_core(c);
    }
    // SAFETY: epoll_create1 has no memory effects; the result is checked and owned below.
    let raw = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor nothing else owns.
    let ep = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
    for (i, s) in socks.iter().enumerate() {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: i as u64,
        };
        // SAFETY: `ev` is a valid epoll_event for the duration of the call.
        if unsafe { libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, s.as_raw_fd(), &mut ev) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let mut hist = histogram();
    let mut partial: Vec<Vec<u8>> = vec![Vec::new(); socks.len()];
    let mut evs = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
    let mut buf = vec![0u8; 256 * 1024];
    let (mut received, mut open) = (0u64, socks.len());
    let mut wcpu = WindowCpu::default();
    let record = |hist: &mut Histogram<u64>, rec: &[u8], now: u64, received: &mut u64| {
        let stamp = u64::from_le_bytes(rec[..HDR].try_into().expect("HDR bytes"));
        if w.has(stamp) {
            *received += 1;
            hist.record(now.saturating_sub(stamp).max(1)).ok();
        }
    };
    while !sh.stop.load(Ordering::Relaxed) && open > 0 {
        // SAFETY: `evs` has room for `evs.len()` events.
        let k = unsafe { libc::epoll_wait(ep.as_raw_fd(), evs.as_mut_ptr(), evs.len() as i32, 100) };
        wcpu.turn(mono_ns(), w, 0);
        for e in &evs[..k.max(0) as usize] {
            let i = e.u64 as usize;
            let fd = socks[i].as_raw_fd();
            loop {
                // SAFETY: `buf` is a valid, writable buffer of `buf.len()` bytes.
                let r = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
                let err = (r < 0)
                    .then(|| io::Error::last_os_error().raw_os_error())
                    .flatten();
                if err == Some(libc::EINTR) {
                    continue;
                }
                if r == 0 || (r < 0 && err != Some(libc::EAGAIN)) {
                    // The sender is gone (or the connection broke): stop watching it.
                    // SAFETY: a null event pointer is allowed for EPOLL_CTL_DEL.
                    unsafe { libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut()) };
                    open -= 1;
                    break;
                }
                if r < 0 {
                    break;
                }
                let now = mono_ns();
                feed(&mut partial[i], &buf[..r as usize], frame, |rec| {
                    record(&mut hist, rec, now, &mut received)
                });
                if (r as usize) < buf.len() {
                    break;
                }
            }
        }
        if received >= sh.target.load(Ordering::Acquire) {
            break;
        }
    }
    wcpu.turn(mono_ns(), w, 0);
    Ok(RecvStats {
        hist,
        received,
        window_cpu_ns: wcpu.spent().map(|s| s.0),
    })
}

/// Splits a connection's byte stream into `frame`-byte records: completes the record left
/// in `partial` by the previous read, hands every whole record in `data` to `f`, and keeps
/// the tail in `partial`.
fn feed(partial: &mut Vec<u8>, mut data: &[u8], frame: usize, mut f: impl FnMut(&[u8])) {
    if !partial.is_empty() {
        let take = (frame - partial.len()).min(data.len());
        partial.extend_from_slice(&data[..take]);
        data = &data[take..];
        if partial.len() < frame {
            return;
        }
        f(partial);
        partial.clear();
    }
    let whole = data.len() / frame * frame;
    data[..whole].chunks_exact(frame).for_each(&mut f);
    partial.extend_from_slice(&data[whole..]);
}

/// What a run measured.
pub struct Outcome {
    pub hist: Histogram<u64>,
    pub secs: f64,
    /// Window records owed (queued plus dropped) and received.
    pub expected: u64,
    pub received: u64,
    pub cores: (Option<usize>, Option<usize>),
    sender: SenderStats,
    receiver_cpu_ns: Option<u64>,
}

pub fn run(a: &FloorArgs) -> Result<Outcome, String> {
    bounds(a)?;
    let subs = assignment(
        a.scenario.subscribers,
        a.scenario.symbols,
        a.scenario.per_sub,
        a.scenario.seed,
    );
    let mut by_sym: Vec<Vec<u32>> = vec![Vec::new(); a.scenario.symbols];
    for (i, mine) in subs.iter().enumerate() {
        for &s in mine {
            by_sym[s].push(i as u32);
        }
    }
    let (srv, cli) = pairs(a.scenario.subscribers)
        .map_err(|e| format!("{e} (two descriptors per subscriber: raise the open-file limit?)"))?;
    let usable = tickgate::rt::usable_cores();
    let pick = |i: usize| usable.get(i).copied();
    let cores = (pick(a.sender_core), pick(a.receiver_core));
    let start = mono_ns() + 10_000_000;
    let t0 = start + (a.warmup * 1e9) as u64;
    let w = Window {
        t0,
        t1: t0 + (a.duration * 1e9) as u64,
    };
    let sh = Arc::new(Shared {
        target: AtomicU64::new(u64::MAX),
        stop: AtomicBool::new(false),
    });
    let tx = {
        let (a, sh) = (a.clone(), sh.clone());
        std::thread::spawn(move || sender(&a, cores.0, srv, by_sym, w, start, &sh))
    };
    let rx = {
        let (frame, sh) = (a.frame_bytes, sh.clone());
        std::thread::spawn(move || receiver(cores.1, frame, cli, w, &sh))
    };
    let sender = tx.join().map_err(|_| "sender panicked")?;
    // The receiver ends once it has every queued record of the window; give it 10 s.
    let give_up = mono_ns() + 10_000_000_000;
    while !rx.is_finished() && mono_ns() < give_up {
        std::thread::sleep(Duration::from_millis(10));
    }
    sh.stop.store(true, Ordering::Relaxed);
    let r = rx
        .join()
        .map_err(|_| "receiver panicked")?
        .map_err(|e| format!("receiver: {e}"))?;
    Ok(Outcome {
        hist: r.hist,
        secs: a.duration,
        expected: sh.target.load(Ordering::Acquire) + sender.dropped,
        received: r.received,
        cores,
        sender,
        receiver_cpu_ns: r.window_cpu_ns,
    })
}

pub fn main(a: FloorArgs) -> i32 {
    if let Err(e) = a.out.check(1) {
        eprintln!("loadgen floor: {e}");
        return 1;
    }
    let o = match run(&a) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("loadgen floor: {e}");
            return 1;
        }
    };
    let secs = o.secs;
    let mut r = Report::new("floor", &a.label);
    r.add("subscribers", a.scenario.subscribers as u64);
    r.add("symbols", a.scenario.symbols as u64);
    r.add("per_sub", a.scenario.per_sub.min(a.scenario.symbols) as u64);
    r.add("rate_ticks_per_s", a.scenario.rate);
    r.add("frame_bytes", a.frame_bytes as u64);
    r.add("sends_batched", a.batch);
    r.add("duration_s", secs);
    let core = |c: Option<usize>| c.map_or(serde_json::Value::Null, |c| (c as u64).into());
    r.add("sender_cpu", core(o.cores.0));
    r.add("receiver_cpu", core(o.cores.1));
    for (name, v) in percentiles(&o.hist) {
        r.add(name, v);
    }
    r.add("delivered_per_s", (o.received as f64 / secs).round());
    r.add("expected", o.expected);
    r.add("received", o.received);
    r.add("drops", o.expected.saturating_sub(o.received));
    let pct = |ns: u64| (ns as f64 / (secs * 1e9) * 1000.0).round() / 10.0;
    if let Some((cpu, sends)) = o.sender.window {
        r.add("sender_cpu_pct", pct(cpu));
        r.add("sends", sends);
        r.add("sender_ns_per_send", cpu.checked_div(sends).unwrap_or(0));
    }
    if let Some(cpu) = o.receiver_cpu_ns {
        r.add("receiver_cpu_pct", pct(cpu));
    }
    r.add("sender_max_lag_us", o.sender.max_lag_ns / 1000);
    r.print(a.json);
    if o.received > o.expected {
        eprintln!("loadgen floor: received more window records than were sent (accounting error)");
        return 2;
    }
    let label = if a.label.is_empty() { "floor" } else { &a.label };
    let note = format!(
        "loadgen floor: {} subscribers x {} of {} symbols, {} ticks/s, {} s",
        a.scenario.subscribers,
        a.scenario.per_sub.min(a.scenario.symbols),
        a.scenario.symbols,
        a.scenario.rate,
        a.duration
    );
    a.out.write(
        &[(label.to_string(), o.hist)],
        "Latency by percentile distribution",
        &note,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_run_delivers_every_record_exactly_once() {
        short_run(false);
    }

    #[test]
    fn a_short_run_with_batched_sends_delivers_every_record_exactly_once() {
        short_run(true);
    }

    fn short_run(batch: bool) {
        let a = FloorArgs {
            scenario: Scenario {
                subscribers: 20,
                symbols: 10,
                per_sub: 2,
                rate: 2000,
                seed: 1,
            },
            frame_bytes: 100,
            warmup: 0.05,
            duration: 0.3,
            sender_core: 0,
            receiver_core: 0,
            max_queued: 1 << 20,
            batch,
            json: false,
            label: String::new(),
            out: HistOut::default(),
        };
        let o = run(&a).expect("run");
        assert!(o.expected > 0);
        assert_eq!(o.received, o.expected);
        assert_eq!(o.sender.dropped, 0);
    }

    #[test]
    fn records_are_reassembled_at_every_split() {
        let frame = 10;
        let stream: Vec<u8> = (0..5 * frame as u8).collect();
        for chunk in 1..=stream.len() {
            let mut partial = Vec::new();
            let mut got: Vec<Vec<u8>> = Vec::new();
            for piece in stream.chunks(chunk) {
                feed(&mut partial, piece, frame, |r| got.push(r.to_vec()));
            }
            let want: Vec<Vec<u8>> = stream.chunks(frame).map(<[u8]>::to_vec).collect();
            assert_eq!(got, want, "chunk size {chunk}");
            assert!(partial.is_empty());
        }
        // A trailing partial record stays pending.
        let mut partial = Vec::new();
        let mut n = 0;
        feed(&mut partial, &stream[..25], frame, |_| n += 1);
        assert_eq!((n, partial.len()), (2, 5));
    }

    #[test]
    fn bounds_refuse_what_cannot_run() {
        let ok = FloorArgs {
            scenario: Scenario {
                subscribers: 1,
                symbols: 1,
                per_sub: 1,
                rate: 1,
                seed: 1,
            },
            frame_bytes: 8,
            warmup: 0.0,
            duration: 1.0,
            sender_core: 0,
            receiver_core: 1,
            max_queued: 8,
            batch: false,
            json: false,
            label: String::new(),
            out: HistOut::default(),
        };
        assert!(bounds(&ok).is_ok());
        for bad in [
            FloorArgs {
                scenario: Scenario {
                    rate: 0,
                    ..ok.scenario
                },
                ..ok.clone()
            },
            FloorArgs {
                scenario: Scenario {
                    rate: 20_000_000,
                    ..ok.scenario
                },
                ..ok.clone()
            },
            FloorArgs {
                duration: 0.0,
                ..ok.clone()
            },
            FloorArgs {
                duration: f64::NAN,
                ..ok.clone()
            },
            FloorArgs {
                warmup: -1.0,
                ..ok.clone()
            },
            FloorArgs {
                frame_bytes: 4,
                ..ok.clone()
            },
            FloorArgs {
                max_queued: 4,
                ..ok.clone()
            },
            FloorArgs {
                scenario: Scenario {
                    subscribers: 0,
                    ..ok.scenario
                },
                ..ok.clone()
            },
            FloorArgs {
                scenario: Scenario {
                    per_sub: 0,
                    ..ok.scenario
                },
                ..ok.clone()
            },
            FloorArgs {
                scenario: Scenario {
                    per_sub: 2,
                    ..ok.scenario
                },
                ..ok.clone()
            },
            FloorArgs {
                max_queued: 1 << 30,
                ..ok.clone()
            },
        ] {
            assert!(bounds(&bad).is_err());
        }
    }
}
