//! The bus thread (`[cluster]`): `async-nats` on a small tokio runtime of its own, bridged
//! to the shards through the hub (ticks in, interest out) and the shards' control inboxes
//! (`publish` answers). A shard loop never awaits the bus: it only pushes to bounded
//! queues that this thread drains. The decisions (names, parsing, sequencing, backoff)
//! are in [`crate::bus`]; this file only moves messages.
//!
//! - **Connection.** Connects with backoff until NATS answers (the node serves meanwhile,
//!   `/readyz` says 503), makes sure the stream exists, then reports ready. `async-nats`
//!   reconnects by itself and restores the subscriptions; while it is away the node is
//!   not ready and `publish` gets `unavailable`.
//! - **Ingest.** The ingest leader (one node, elected with a short-lived key) reads
//!   `<prefix>.in.>`: each raw tick is validated and appended to the order by the
//!   symbol's append task (one per symbol, a bounded queue each, so one symbol's appends
//!   stay in order and others do not wait for it).
//! - **Interest.** A subscription on `<prefix>.o.<SYMBOL>` per symbol some local
//!   connection wants, taken at the first (with the stream's newest tick of the subject as
//!   the head) and dropped once none wants it; reconciled from the tables every second.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishErrorKind, stream};
use futures_util::StreamExt;
use tokio::sync::{Notify, mpsc, oneshot};

use crate::auth::revocation::RevokeTarget;
use crate::bus::{
    Buffers, EXPECTED_LAST_SUBJECT_SEQ, Head, MAX_APPEND_TRIES, MAX_BATCH, PublishRequest, REVOKED_AT_HEADER,
    Reject, Reorder, SEQ_HEADER, Sequencer, Subjects, TicketOp, backoff, encode_batch_tick,
    encode_revocation, parse_ordered_payload, parse_revocation, parse_seq, parse_tick_payload,
};
use crate::config::ClusterConfig;
use crate::feed::hub::{Control, Ingested, Interest};
use crate::feed::tick::Tick;
use crate::state::Shared;

/// JetStream's de-duplication header.
const MSG_ID: &str = "Nats-Msg-Id";
/// Count changes queued for announcement, at most.
const CAP_QUEUE: usize = 1 << 16;
/// Other nodes' counts held, at most (users x nodes).
const MAX_REMOTE_COUNTS: usize = 1_000_000;
/// Every node announces all its counts this often; a count not announced again within
/// [`COUNT_TTL`] is dropped (its node is gone).
const ANNOUNCE_EVERY: Duration = Duration::from_secs(5);
const COUNT_TTL: Duration = Duration::from_secs(15);

/// Raw ticks queued per symbol for its append task; beyond, they are dropped and counted.
const APPEND_QUEUE: usize = 1024;
/// A symbol's append task ends after this long with nothing to append (the next tick
/// starts a new one, which reads the symbol's head again).
const APPEND_IDLE: Duration = Duration::from_secs(60);
/// How long taking interest in a symbol may spend reading its history from the stream
/// before it settles for what it has (the rest of a replay then becomes a `reset`).
const BACKFILL_TIMEOUT: Duration = Duration::from_secs(2);
/// Interest changes handled per wake-up before the task yields.
const INTEREST_BATCH: usize = 1024;

/// Starts the bus thread when `[cluster]` is configured.
/// `port`: the public listener's bound port (the default node name is host-port).
pub fn spawn(shared: Arc<Shared>, port: u16) -> std::io::Result<()> {
    let Some(cfg) = shared.cfg.cluster.clone() else {
        return Ok(());
    };
    let interest = Arc::new(Notify::new());
    let wake = interest.clone();
    shared.hub.enable_interest(Box::new(move || wake.notify_one()));
    let publish_wake = Arc::new(Notify::new());
    let w = publish_wake.clone();
    let Some(publish_rx) = shared.bus.enable(Box::new(move || w.notify_one())) else {
        return Ok(());
    };
    let Some(revoke_rx) = shared.bus.enable_revocations() else {
        return Ok(());
    };
    let Some(ticket_rx) = shared.bus.enable_tickets() else {
        return Ok(());
    };
    // Every change of a user's count here is announced (dropped when the queue is full:
    // the periodic announcement repairs it).
    let (cap_tx, cap_rx) = crossbeam_channel::bounded::<(String, usize)>(CAP_QUEUE);
    let w = publish_wake.clone();
    shared.auth.caps.enable_cluster(
        MAX_REMOTE_COUNTS,
        Box::new(move |user, n| {
            if cap_tx.try_send((user.to_owned(), n)).is_ok() {
                w.notify_one();
            }
        }),
    );
    std::thread::Builder::new()
        .name("tickgate-bus".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "bus: cannot start its runtime");
                    return;
                }
            };
            let queues = Queues {
                publish: publish_rx,
                revoke: revoke_rx,
                ticket: ticket_rx,
                caps: cap_rx,
            };
            rt.block_on(run(shared, cfg, port, interest, publish_wake, queues));
        })?;
    Ok(())
}

/// What the shards and the admin listener queue for the bus thread.
struct Queues {
    publish: crossbeam_channel::Receiver<PublishRequest>,
    revoke: crossbeam_channel::Receiver<RevokeTarget>,
    ticket: crossbeam_channel::Receiver<TicketOp>,
    caps: crossbeam_channel::Receiver<(String, usize)>,
}

struct Bus {
    shared: Arc<Shared>,
    node: String,
    subjects: Subjects,
    js: jetstream::Context,
    client: async_nats::Client,
    stream_name: String,
    /// Shards with bus ticks waiting in their inboxes, woken once per batch by
    /// [`wake_shards`] (the delivery tasks only mark them here).
    to_wake: std::sync::atomic::AtomicU64,
    wake_batch: Notify,
    /// Ticks taken by the append tasks and not yet answered ([`finish`]).
    appends_waiting: std::sync::atomic::AtomicUsize,
}

async fn run(
    shared: Arc<Shared>,
    cfg: ClusterConfig,
    port: u16,
    interest: Arc<Notify>,
    publish_wake: Arc<Notify>,
    queues: Queues,
) {
    let subjects = Subjects::new(&cfg.subject_prefix);
    let node = if cfg.node.is_empty() {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "tickgate".into());
        // Within what `cluster.node` allows (64 of `[A-Za-z0-9._-]`): other nodes drop
        // announcements from a longer name, and this node's users would not count there.
        crate::bus::names::default_node_name(&host, port)
    } else {
        cfg.node.clone()
    };
    let _ = shared.bus.node.set(node.clone());
    // Connect (and make sure the stream exists) with backoff; serve meanwhile.
    let mut attempt = 0u32;
    let bus = loop {
        match connect(&shared, &cfg, &node, &subjects).await {
            Ok(bus) => break Arc::new(bus),
            Err(e) => {
                tracing::warn!(error = %e, attempt, "bus: NATS not reachable yet");
                tokio::time::sleep(backoff(attempt, rand32())).await;
                attempt = attempt.saturating_add(1);
            }
        }
    };
    shared.bus.metrics.connects.fetch_add(1, Ordering::Relaxed);
    shared.bus.ready.store(true, Ordering::Release);
    tracing::info!(
        node,
        stream = bus.stream_name,
        "bus: connected to NATS, stream ready"
    );

    let appenders = Appenders::new(bus.clone());
    tokio::spawn(wake_shards(bus.clone()));
    tokio::spawn(ingest(bus.clone(), appenders.clone(), node.clone()));
    tokio::spawn(revocations_in(bus.clone()));
    tokio::spawn(streams_kept(bus.clone()));
    tokio::spawn(counts_in(bus.clone()));
    tokio::spawn(publishes(bus.clone(), appenders.clone(), publish_wake, queues));
    interests(bus, interest).await;
}

async fn connect(
    shared: &Arc<Shared>,
    cfg: &ClusterConfig,
    node: &str,
    subjects: &Subjects,
) -> Result<Bus, String> {
    let (opts, urls) = nats_options(cfg, &format!("tickgate {node}")).await?;
    let mut opts = opts.max_reconnects(None);
    let s = shared.clone();
    opts = opts.event_callback(move |ev| {
        let s = s.clone();
        async move {
            match ev {
                async_nats::Event::Disconnected => {
                    s.bus.ready.store(false, Ordering::Release);
                    // Revocations made meanwhile are applied after the reconnect before
                    // the node says ready again.
                    s.bus.revocations_loaded.store(false, Ordering::Release);
                    tracing::warn!("bus: disconnected from NATS");
                }
                async_nats::Event::SlowConsumer(_) => {
                    // The client dropped messages of a subscription whose buffer was full.
                    s.bus.metrics.slow_consumer.fetch_add(1, Ordering::Relaxed);
                }
                async_nats::Event::Connected => {
                    s.bus.metrics.connects.fetch_add(1, Ordering::Relaxed);
                    s.bus.ready.store(true, Ordering::Release);
                    tracing::info!("bus: reconnected to NATS");
                }
                _ => {}
            }
        }
    });
    let client = opts.connect(urls.as_slice()).await.map_err(|e| e.to_string())?;
    let js = jetstream::new(client.clone());
    let stream_name = subjects.stream();
    // Updated when it exists: a new `feed.history` takes effect (give every node the same).
    js.create_or_update_stream(ticks_stream(shared, subjects))
        .await
        .map_err(|e| format!("JetStream stream {stream_name}: {e}"))?;
    // Made once here, so no ticket operation waits for it.
    js.get_or_create_stream(ticket_stream(shared, subjects, &stream_name))
        .await
        .map_err(|e| format!("JetStream stream {stream_name}_TICKETS: {e}"))?;
    Ok(Bus {
        shared: shared.clone(),
        node: node.replace('.', "_"),
        subjects: subjects.clone(),
        js,
        client,
        stream_name,
        to_wake: std::sync::atomic::AtomicU64::new(0),
        wake_batch: Notify::new(),
        appends_waiting: std::sync::atomic::AtomicUsize::new(0),
    })
}

/// The ticks: `<prefix>.t.<SYMBOL>`, republished on `<prefix>.o.<SYMBOL>`.
fn ticks_stream(shared: &Shared, subjects: &Subjects) -> stream::Config {
    stream::Config {
        name: subjects.stream(),
        subjects: vec![subjects.ordered_all()],
        // The cluster's history (PROTOCOL.md 10): `feed.history` messages per symbol, each
        // one append of 1 to MAX_BATCH ticks (the head needs one). No age limit on the
        // stream: a quiet symbol keeps its head; the age applies when the history is read.
        max_messages_per_subject: shared.cfg.feed.history.max(1) as i64,
        storage: stream::StorageType::File,
        discard: stream::DiscardPolicy::Old,
        duplicate_window: Duration::from_millis(crate::bus::DUPLICATE_WINDOW_MS),
        republish: Some(stream::Republish {
            source: subjects.ordered_all(),
            destination: subjects.delivered_all(),
            headers_only: false,
        }),
        ..Default::default()
    }
}

/// How often a node checks that the bus still has its streams ([`streams_kept`]).
const STREAMS_CHECK: Duration = Duration::from_secs(1);

/// NATS can come back without a stream: a memory stream (the ingest leader's claim, the
/// tickets) does not survive a restart of nats-server, and a file stream (the ticks, the
/// revocations) does not survive the loss of its store. Without the leader's stream no
/// node could claim the ingest again, and raw feed ticks would go unread for good. Every
/// [`STREAMS_CHECK`], each stream found missing is made again (the revocations' follower
/// then reads its stream from the start, [`revocations_loaded`]). When the ticks' stream
/// is made again empty, the appending node numbers on from the newest `seq` it knows (its
/// own appends, its local subscribers'); a node that delivered higher ones drops the
/// lower as stale until the order passes them (docs/CLUSTER.md, "Faults").
async fn streams_kept(bus: Arc<Bus>) {
    let configs = [
        ticks_stream(&bus.shared, &bus.subjects),
        ticket_stream(&bus.shared, &bus.subjects, &bus.stream_name),
        Leader::new(&bus).config(),
        revocation_stream(&bus),
    ];
    let mut every = tokio::time::interval(STREAMS_CHECK);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut unanswered = 0u32;
    loop {
        every.tick().await;
        let mut answered = false;
        for c in &configs {
            let Ok(r) = tokio::time::timeout(STREAMS_CHECK, bus.js.get_stream(&c.name)).await else {
                // No answer within a second: the others would not get one either.
                break;
            };
            // Any reply is an answer (no JetStream responders, an error: the server is
            // there); only silence counts against the connection.
            answered = true;
            let Err(e) = r else {
                continue;
            };
            if !stream_not_found(&e) {
                continue;
            }
            match bus.js.get_or_create_stream(c.clone()).await {
                Ok(_) => tracing::warn!(stream = %c.name, "bus: NATS had lost a stream; made it again"),
                Err(e) => {
                    tracing::debug!(stream = %c.name, error = %e, "bus: cannot make a lost stream again yet")
                }
            }
        }
        unanswered = if answered { 0 } else { unanswered.saturating_add(1) };
        let connected = bus.client.connection_state() == async_nats::connection::State::Connected;
        if connected && unanswered >= BUS_SILENT_CHECKS {
            // The connection looks open but nothing comes back (a NATS host that died
            // without closing it, a network that drops everything): the client's own
            // pings only start after minutes of silence, since every request resets them.
            tracing::warn!(
                checks = unanswered,
                "bus: NATS does not answer on an open connection; reconnecting"
            );
            bus.shared.bus.ready.store(false, Ordering::Release);
            // Bounded: on a connection whose buffers are full the client may not take the
            // command at once (its own pings end that connection later).
            let _ = tokio::time::timeout(STREAMS_CHECK, bus.client.force_reconnect()).await;
            unanswered = 0;
        } else {
            // Readiness follows the connection even if an event about it was lost.
            bus.shared.bus.ready.store(connected, Ordering::Release);
        }
    }
}

/// Checks in a row ([`STREAMS_CHECK`] apart) with no answer from the bus on an open
/// connection before the node declares it dead and reconnects.
const BUS_SILENT_CHECKS: u32 = 3;

/// The bus answered that the stream does not exist (not merely that it could not answer).
fn stream_not_found(e: &jetstream::context::GetStreamError) -> bool {
    matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(ref j)
        if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
}

/// The client options and server addresses `[cluster]` names (2 s to connect to each).
async fn nats_options(
    cfg: &ClusterConfig,
    name: &str,
) -> Result<(async_nats::ConnectOptions, Vec<async_nats::ServerAddr>), String> {
    let mut opts = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_secs(2))
        // The client's own liveness check (it pings after this long without traffic out).
        .ping_interval(Duration::from_secs(10));
    if !cfg.credentials.is_empty() {
        opts = opts
            .credentials_file(&cfg.credentials)
            .await
            .map_err(|e| format!("cluster.credentials: {e}"))?;
    }
    let urls = cfg
        .nats
        .iter()
        .map(|u| u.parse().map_err(|e| format!("cluster.nats {u:?}: {e}")))
        .collect::<Result<_, _>>()?;
    Ok((opts, urls))
}

fn rand32() -> u32 {
    (crate::metrics::mono_ns() as u32).wrapping_mul(0x9E37_79B9) | 1
}

/// One job for a symbol's append task.
struct Job {
    tick: Tick,
    received: Instant,
    reply: Option<oneshot::Sender<bool>>,
}

/// The append tasks, one per symbol that had a tick to append, each with a bounded queue.
#[derive(Clone)]
struct Appenders {
    bus: Arc<Bus>,
    tasks: Arc<std::sync::Mutex<HashMap<Box<str>, mpsc::Sender<Job>>>>,
}

impl Appenders {
    fn new(bus: Arc<Bus>) -> Appenders {
        Appenders {
            bus,
            tasks: Arc::new(std::sync::Mutex::new(HashMap::new())),
        }
    }

    /// Queue `job` for `symbol`; false when its queue is full or the table of tasks is
    /// at its bound (`feed.max_symbols`).
    fn submit(&self, symbol: &str, job: Job) -> bool {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = tasks.get(symbol) {
            // Counted before the task can take it (and answer it, [`finish`]).
            self.bus.appends_waiting.fetch_add(1, Ordering::AcqRel);
            return match tx.try_send(job) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.bus.appends_waiting.fetch_sub(1, Ordering::AcqRel);
                    false
                }
                Err(mpsc::error::TrySendError::Closed(job)) => {
                    self.bus.appends_waiting.fetch_sub(1, Ordering::AcqRel);
                    tasks.remove(symbol);
                    drop(tasks);
                    self.submit(symbol, job)
                }
            };
        }
        if tasks.len() >= self.bus.shared.cfg.feed.max_symbols {
            // Tasks of symbols gone quiet have ended ([`APPEND_IDLE`]): their places are free.
            tasks.retain(|_, tx| !tx.is_closed());
            if tasks.len() >= self.bus.shared.cfg.feed.max_symbols {
                return false;
            }
        }
        let (tx, rx) = mpsc::channel(APPEND_QUEUE);
        // A new channel has room for one.
        self.bus.appends_waiting.fetch_add(1, Ordering::AcqRel);
        let _ = tx.try_send(job);
        tasks.insert(Box::from(symbol), tx);
        tokio::spawn(append_task(self.bus.clone(), Box::from(symbol), rx));
        true
    }
}

/// Appends one symbol's ticks in the order they came, each after the last. What queued
/// while the previous append was in flight goes as one message (up to
/// [`crate::bus::MAX_BATCH`] ticks, `seq`s consecutive from its `Tg-Seq`), so a quiet
/// symbol appends one tick per message and a busy one many: the bus stores, acknowledges
/// and republishes one message for all of them. Every append carries the per-subject
/// sequence check (it starts where the stream is) and its `Nats-Msg-Id` (`SYMBOL:seq` of
/// its first tick, for a subject's very first append, which servers before 2.10 do not
/// check), so whatever another node appends meanwhile, the stream holds each `seq` once,
/// +1 after +1. An append refused (another node took that `seq`) is tried again with a
/// fresh head; a tick refused [`MAX_APPEND_TRIES`] times is dropped and counted.
async fn append_task(bus: Arc<Bus>, symbol: Box<str>, mut rx: mpsc::Receiver<Job>) {
    let mut seqr = Sequencer::new(1);
    // The newest `seq` this task appended: with the hub's, the floor of a head read again
    // (a stream made again empty, on a node with no subscriber of the symbol, must not
    // number from 1 again).
    let mut appended = 0u64;
    let subject = bus.subjects.ordered(&symbol);
    let mut pending: std::collections::VecDeque<(Job, u32)> = std::collections::VecDeque::new();
    let (mut payload, mut scratch) = (Vec::with_capacity(1024), Vec::with_capacity(256));
    loop {
        if pending.is_empty() {
            // A symbol quiet for APPEND_IDLE gives its task back: symbols that come and go
            // (expired instruments, or a feed handler inventing names) cannot hold the
            // table at `feed.max_symbols` and refuse every new one.
            match tokio::time::timeout(APPEND_IDLE, rx.recv()).await {
                Ok(Some(j)) => pending.push_back((j, 0)),
                Ok(None) => return,
                Err(_) => {
                    rx.close();
                    // Anything queued between the timeout and the close is still appended.
                    match rx.try_recv() {
                        Ok(j) => pending.push_back((j, 0)),
                        Err(_) => return,
                    }
                }
            }
        }
        while pending.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => pending.push_back((j, 0)),
                Err(_) => break,
            }
        }
        let next = match seqr.next(&symbol, bus.shared.now_ms()) {
            Some(next) => Some(next),
            None => match head(&bus, &subject).await {
                Ok(h) => {
                    let floor = bus.shared.hub.seq_of(&symbol).max(appended);
                    seqr.learn(&symbol, h, floor, bus.shared.now_ms());
                    seqr.next(&symbol, bus.shared.now_ms())
                }
                Err(()) => None,
            },
        };
        let Some(next) = next else {
            // The bus cannot say where the symbol stands (or no `seq` is left): this
            // round fails.
            seqr.forget(&symbol);
            retry(&bus, &mut pending, usize::MAX, MAX_APPEND_TRIES);
            continue;
        };
        // At most MAX_BATCH, and never a `seq` past u64::MAX.
        let room = usize::try_from(u64::MAX - next.seq).map_or(usize::MAX, |r| r.saturating_add(1));
        let n = pending.len().min(MAX_BATCH).min(room);
        payload.clear();
        for (job, _) in pending.iter().take(n) {
            encode_batch_tick(&symbol, &job.tick, &mut payload, &mut scratch);
        }
        let mut headers = HeaderMap::new();
        headers.insert(SEQ_HEADER, itoa::Buffer::new().format(next.seq));
        headers.insert(
            EXPECTED_LAST_SUBJECT_SEQ,
            itoa::Buffer::new().format(next.expect_stream_seq),
        );
        // Servers before 2.10 ignore an expected sequence of 0 (a symbol's first
        // append); the duplicate window covers that case.
        headers.insert(MSG_ID, format!("{symbol}:{}", next.seq).as_str());
        let sent = bus
            .js
            .publish_with_headers(subject.clone(), headers, bytes::Bytes::copy_from_slice(&payload))
            .await;
        let outcome = match sent {
            Ok(f) => f.await,
            // Not even sent (the connection is away): the round fails.
            Err(_) => {
                seqr.forget(&symbol);
                retry(&bus, &mut pending, n, MAX_APPEND_TRIES);
                continue;
            }
        };
        let tries = match outcome {
            Ok(ack) if !ack.duplicate => {
                appended = next.seq + n as u64 - 1;
                seqr.appended(&symbol, appended, ack.sequence, bus.shared.now_ms());
                for (job, _) in pending.drain(..n) {
                    finish(&bus, job, true);
                }
                continue;
            }
            Ok(_) => 1,
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => 1,
            Err(e) => {
                tracing::debug!(error = %e, symbol = %symbol, "bus: append failed");
                MAX_APPEND_TRIES
            }
        };
        // Refused (another node appended first) or failed: read the head again, and try
        // these ticks again in their order, each at most MAX_APPEND_TRIES times.
        if tries == 1 {
            bus.shared.bus.metrics.conflicts.fetch_add(1, Ordering::Relaxed);
        }
        seqr.forget(&symbol);
        retry(&bus, &mut pending, n, tries);
    }
}

/// The first `n` pending jobs (all when fewer) failed a round, `tries` more times each:
/// those tried [`MAX_APPEND_TRIES`] times are dropped and answered, the others go first
/// into the next round, in their order.
fn retry(bus: &Bus, pending: &mut std::collections::VecDeque<(Job, u32)>, n: usize, tries: u32) {
    let round: Vec<(Job, u32)> = pending.drain(..n.min(pending.len())).collect();
    for (job, t) in round.into_iter().rev() {
        let t = t.saturating_add(tries);
        if t >= MAX_APPEND_TRIES {
            finish(bus, job, false);
        } else {
            pending.push_front((job, t));
        }
    }
}

/// A job is done: answer its publisher, or count it.
fn finish(bus: &Bus, job: Job, ok: bool) {
    bus.appends_waiting.fetch_sub(1, Ordering::AcqRel);
    let m = &bus.shared.bus.metrics;
    if ok {
        m.append_us_sum
            .fetch_add(job.received.elapsed().as_micros() as u64, Ordering::Relaxed);
        m.append_count.fetch_add(1, Ordering::Relaxed);
    }
    if let Some(r) = job.reply {
        let _ = r.send(ok);
    } else if ok {
        m.ingested.fetch_add(1, Ordering::Relaxed);
    } else {
        m.reject(Reject::AppendFailed);
    }
}

/// The newest tick of an ordered subject: `(seq, stream sequence)`, `None` when empty.
async fn head(bus: &Bus, subject: &str) -> Result<Option<Head>, ()> {
    Ok(newest(bus, subject).await?.map(|(h, _)| h))
}

/// The newest message of an ordered subject, with its tick when it parses.
async fn newest(bus: &Bus, subject: &str) -> Result<Option<(Head, Option<Tick>)>, ()> {
    Ok(newest_at(bus, subject).await?.map(|(h, t, _)| (h, t)))
}

/// [`newest`], with when the stream stored it (Unix ns).
async fn newest_at(bus: &Bus, subject: &str) -> Result<Option<(Head, Option<Tick>, i128)>, ()> {
    let stream = bus
        .js
        .get_stream_no_info(&bus.stream_name)
        .await
        .map_err(|_| ())?;
    match stream.get_last_raw_message_by_subject(subject).await {
        Ok(m) => {
            // The newest tick is the last of the newest message (one append).
            let symbol = bus.subjects.ordered_symbol(subject).unwrap_or_default();
            // Its `seq` comes from the header and the number of parts, so a newest message
            // that does not parse still moves the head on (the tick is then unknown).
            let first = parse_seq(m.headers.get(SEQ_HEADER).map(|v| v.as_str())).ok();
            let seq = first.and_then(|f| crate::bus::ordered_last_seq(f, &m.payload));
            let mut ticks = Vec::new();
            let tick = first
                .and_then(|first| {
                    parse_ordered_payload(
                        symbol,
                        first,
                        &m.payload,
                        &mut Vec::new(),
                        &mut Buffers::new(256),
                        &mut ticks,
                    )
                    .ok()
                })
                .and_then(|_| ticks.pop())
                .map(|(_, t)| t);
            if first.is_some() && seq.is_none() {
                // Past u64::MAX: nothing can be appended after it.
                return Err(());
            }
            Ok(Some((
                Head {
                    seq: seq.unwrap_or(0),
                    stream_seq: m.sequence,
                },
                tick,
                m.time.unix_timestamp_nanos(),
            )))
        }
        Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => {
            tracing::debug!(error = %e, subject, "bus: reading the newest message failed");
            Err(())
        }
    }
}

/// How long the ingest leader's claim lives without a refresh; it refreshes at a third.
const LEADER_TTL: Duration = Duration::from_secs(3);

/// Raw ticks from feed handlers. One node at a time reads `<prefix>.in.>` (the ingest
/// leader, elected through a claim that expires unless refreshed, see [`Leader`]),
/// so one feed handler's ticks of a symbol keep their order: NATS delivers one
/// publisher's messages to one subscriber in order, and the leader appends each symbol's
/// in that order. The others stand by and take over within [`LEADER_TTL`] when the
/// leader stops refreshing its claim (it crashed, or lost the bus).
async fn ingest(bus: Arc<Bus>, appenders: Appenders, node: String) {
    let leader = Leader::new(&bus);
    let mut attempt = 0u32;
    while let Err(e) = bus.js.get_or_create_stream(leader.config()).await {
        tracing::warn!(error = %e, "bus: cannot make the leader stream");
        tokio::time::sleep(backoff(attempt, rand32())).await;
        attempt = attempt.saturating_add(1);
    }
    loop {
        // An exiting node claims no more.
        if !bus.shared.bus.release_ingest.load(Ordering::Acquire)
            && let Some(claim) = leader.claim(&bus, &node).await
        {
            tracing::info!(node, "bus: this node leads the ingest");
            bus.shared.bus.metrics.leader.store(true, Ordering::Release);
            lead(&bus, &appenders, &leader, claim, &node).await;
            bus.shared.bus.metrics.leader.store(false, Ordering::Release);
            tracing::warn!(node, "bus: this node no longer leads the ingest");
        }
        tokio::time::sleep(LEADER_TTL / 3).await;
    }
}

/// How long an exiting leader waits for its queued appends before it deletes its claim.
const RELEASE_FLUSH: Duration = Duration::from_secs(1);

/// An exiting ingest leader (it read the feed all through its drain) has stopped reading:
/// what it read goes into the order (its append queues empty, for at most
/// [`RELEASE_FLUSH`]), then its claim is deleted, so the next node's claim (checked every
/// `LEADER_TTL / 3`) succeeds at once instead of when the claim expires. Ticks published
/// between this and the next leader's subscription (about a second) are not ingested.
async fn release_claim(bus: &Bus, leader: &Leader, rev: u64) {
    let until = Instant::now() + RELEASE_FLUSH;
    while bus.appends_waiting.load(Ordering::Acquire) > 0 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    match bus.js.get_stream(&leader.stream).await {
        Ok(s) => {
            if let Err(e) = s.delete_message(rev).await {
                tracing::warn!(error = %e, "bus: could not delete the ingest claim (it expires by itself)");
            }
        }
        Err(e) => tracing::warn!(error = %e, "bus: could not reach the ingest claim's stream"),
    }
    tracing::info!("bus: exiting: the ingest claim is released");
}

/// What a claim is written after (see [`Leader::write`]).
#[derive(Clone, Copy)]
enum ClaimAfter {
    Refresh(u64),
    First(u64),
}

/// The ingest leader's claim: the one message of `<prefix>.leader` in a stream that
/// forgets it after [`LEADER_TTL`], written with the same per-subject sequence check as
/// the ticks, so exactly one node's write wins.
struct Leader {
    stream: String,
    subject: String,
}

impl Leader {
    fn new(bus: &Bus) -> Leader {
        Leader {
            stream: format!("{}_LEADER", bus.stream_name),
            subject: bus.subjects.leader(),
        }
    }

    fn config(&self) -> stream::Config {
        stream::Config {
            name: self.stream.clone(),
            subjects: vec![self.subject.clone()],
            max_messages_per_subject: 1,
            max_age: LEADER_TTL,
            // On file, so a claim outlives a quick restart of nats-server: the leader goes
            // on refreshing it, and no second node claims the ingest meanwhile.
            storage: stream::StorageType::File,
            ..Default::default()
        }
    }

    /// Write the claim: `Refresh(seq)` after this node's live claim at stream sequence
    /// `seq`, `First(last)` when no claim was alive while the stream's last sequence was
    /// `last`. The new sequence, or `None` when another write came first.
    async fn write(&self, bus: &Bus, node: &str, after: ClaimAfter) -> Option<u64> {
        let mut headers = HeaderMap::new();
        match after {
            ClaimAfter::Refresh(seq) => {
                headers.insert(EXPECTED_LAST_SUBJECT_SEQ, itoa::Buffer::new().format(seq));
            }
            ClaimAfter::First(last) => {
                // Servers before 2.10 do not check an expected subject sequence of 0, so
                // the claim is tied to the stream's last sequence as read before the
                // subject was seen empty (any claim written since makes this one fail),
                // and the duplicate window lets one write through when it is 0.
                if last > 0 {
                    headers.insert("Nats-Expected-Last-Sequence", itoa::Buffer::new().format(last));
                }
                headers.insert(MSG_ID, format!("claim:{last}").as_str());
            }
        }
        let f = bus
            .js
            .publish_with_headers(
                self.subject.clone(),
                headers,
                bytes::Bytes::from(node.to_owned().into_bytes()),
            )
            .await
            .ok()?;
        f.await.ok().filter(|ack| !ack.duplicate).map(|ack| ack.sequence)
    }

    /// Becomes the leader when no claim is alive (or the live one is this node's).
    async fn claim(&self, bus: &Bus, node: &str) -> Option<u64> {
        let mut stream = bus.js.get_stream(&self.stream).await.ok()?;
        // Read before looking at the claim: a claim another node writes after this read
        // moves the last sequence on, and the write below is refused.
        let last = stream.info().await.ok()?.state.last_sequence;
        match stream.get_last_raw_message_by_subject(&self.subject).await {
            Ok(m) if m.payload.as_ref() == node.as_bytes() => {
                self.write(bus, node, ClaimAfter::Refresh(m.sequence)).await
            }
            Ok(_) => None,
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {
                self.write(bus, node, ClaimAfter::First(last)).await
            }
            Err(_) => None,
        }
    }
}

/// Reads the feed subjects while this node's claim holds; returns when it is lost.
async fn lead(bus: &Bus, appenders: &Appenders, leader: &Leader, mut rev: u64, node: &str) {
    let mut sub = match bus.client.subscribe(bus.subjects.ingest_all()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "bus: cannot subscribe to the feed subjects");
            return;
        }
    };
    let mut scratch = Vec::with_capacity(crate::bus::MAX_INGEST_BYTES);
    let mut buffers = Buffers::new(crate::bus::MAX_INGEST_BYTES);
    let mut logged = Instant::now() - Duration::from_secs(10);
    let mut refresh = tokio::time::interval(LEADER_TTL / 3);
    refresh.tick().await;
    // The connection this claim was made on: after a reconnect the subscription comes
    // back by itself, but another node may have claimed the ingest meanwhile (two readers
    // would append every tick twice), so the claim is made again first.
    let mut connection = bus.shared.bus.metrics.connects.load(Ordering::Acquire);
    let mut release_check = tokio::time::interval(Duration::from_millis(50));
    loop {
        let now_connection = bus.shared.bus.metrics.connects.load(Ordering::Acquire);
        if now_connection != connection {
            // The subscription came back with the connection; the claim is confirmed at
            // once (it lives on file, so it normally survived), or the feed is left.
            connection = now_connection;
            match leader.write(bus, node, ClaimAfter::Refresh(rev)).await {
                Some(r) => rev = r,
                None => {
                    let _ = sub.unsubscribe().await;
                    return;
                }
            }
        }
        let msg = tokio::select! {
            _ = release_check.tick() => {
                if bus.shared.bus.release_ingest.load(Ordering::Acquire) {
                    let _ = sub.unsubscribe().await;
                    release_claim(bus, leader, rev).await;
                    return;
                }
                continue;
            }
            m = sub.next() => match m {
                Some(m) => m,
                None => return,
            },
            _ = refresh.tick() => {
                match leader.write(bus, node, ClaimAfter::Refresh(rev)).await {
                    Some(r) => rev = r,
                    None => {
                        let _ = sub.unsubscribe().await;
                        return;
                    }
                }
                continue;
            }
        };
        let m = &bus.shared.bus.metrics;
        let symbol = bus
            .subjects
            .ingest_symbol(msg.subject.as_str())
            .unwrap_or_default();
        let r = parse_tick_payload(symbol, &msg.payload, &mut scratch, &mut buffers).and_then(|tick| {
            let job = Job {
                tick,
                received: Instant::now(),
                reply: None,
            };
            if appenders.submit(symbol, job) {
                Ok(())
            } else {
                Err(Reject::AppendFailed)
            }
        });
        if let Err(why) = r {
            m.reject(why);
            // At most one line a second, however much junk arrives.
            if logged.elapsed() >= Duration::from_secs(1) {
                logged = Instant::now();
                let subject = crate::proto::frame::truncate_to_char_boundary(msg.subject.as_str(), 80);
                tracing::warn!(
                    subject,
                    reason = why.as_str(),
                    bytes = msg.payload.len(),
                    "bus: dropped a feed payload"
                );
            }
        }
    }
}

/// `publish` ops of this node's WebSocket publishers: each batch appended in order, then
/// answered on the publisher's shard.
async fn publishes(bus: Arc<Bus>, appenders: Appenders, wake: Arc<Notify>, queues: Queues) {
    let rx = queues.publish;
    loop {
        while let Ok(t) = queues.revoke.try_recv() {
            tokio::spawn(revocation_out(bus.clone(), t));
        }
        while let Ok(op) = queues.ticket.try_recv() {
            tokio::spawn(ticket_op(bus.clone(), op));
        }
        while let Ok((user, n)) = queues.caps.try_recv() {
            announce(&bus, &user, n).await;
        }
        while let Ok(req) = rx.try_recv() {
            let mut waits = Vec::with_capacity(req.ticks.len());
            let mut ok = true;
            for (symbol, tick) in &req.ticks {
                let (tx, rx) = oneshot::channel();
                let job = Job {
                    tick: *tick,
                    received: Instant::now(),
                    reply: Some(tx),
                };
                if !bus.shared.bus.is_ready() || !appenders.submit(symbol, job) {
                    ok = false;
                    break;
                }
                waits.push(rx);
            }
            let bus = bus.clone();
            tokio::spawn(async move {
                let mut n = 0;
                for w in waits {
                    if w.await.unwrap_or(false) {
                        n += 1;
                    } else {
                        ok = false;
                    }
                }
                if !ok {
                    bus.shared.bus.metrics.unavailable.fetch_add(1, Ordering::Relaxed);
                }
                let inbox = bus.shared.hub.inbox(req.shard);
                let _ = inbox.control_tx.send(Control::Published {
                    idx: req.idx,
                    generation: req.generation,
                    id: req.id,
                    result: if ok { Ok(n) } else { Err(()) },
                });
                inbox.notify();
            });
        }
        wake.notified().await;
    }
}

/// One symbol's delivery subscription.
struct Delivery {
    task: tokio::task::JoinHandle<()>,
}

/// Follows the shards' interest: a delivery subscription per wanted symbol.
async fn interests(bus: Arc<Bus>, wake: Arc<Notify>) {
    let mut subs: HashMap<Box<str>, Delivery> = HashMap::new();
    let (backfills, rx) = mpsc::channel(BACKFILL_QUEUE);
    tokio::spawn(backfiller(bus.clone(), rx));
    let mut changes = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut reconcile = tokio::select! {
            _ = wake.notified() => false,
            _ = tick.tick() => true,
        };
        loop {
            changes.clear();
            reconcile |= bus.shared.hub.take_interest(&mut changes, INTEREST_BATCH);
            let n = changes.len();
            for c in changes.drain(..) {
                match c {
                    Interest::Want { name, history } => {
                        want(&bus, &mut subs, &backfills, name, history).await
                    }
                    Interest::Release(id) => {
                        if let Some(name) = bus.shared.hub.symbols().name(id) {
                            release(&bus, &mut subs, &name);
                        }
                    }
                }
            }
            if n < INTEREST_BATCH {
                break;
            }
            tokio::task::yield_now().await;
        }
        if reconcile {
            // Dropped changes, a failed subscribe, names no longer waited for: the
            // tables say what is wanted.
            for name in bus.shared.hub.wanted_names() {
                want(&bus, &mut subs, &backfills, name, true).await;
            }
            let held: Vec<Box<str>> = subs.keys().cloned().collect();
            for name in held {
                release(&bus, &mut subs, &name);
            }
        }
        bus.shared
            .bus
            .metrics
            .subscriptions
            .store(subs.len() as u64, Ordering::Relaxed);
    }
}

async fn want(
    bus: &Arc<Bus>,
    subs: &mut HashMap<Box<str>, Delivery>,
    backfills: &mpsc::Sender<Box<str>>,
    name: Box<str>,
    history: bool,
) {
    if subs.contains_key(&name) || !crate::bus::is_bus_symbol(&name) {
        return;
    }
    let sub = match bus.client.subscribe(bus.subjects.delivered(&name)).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, symbol = %name, "bus: cannot subscribe (retried within a second)");
            return;
        }
    };
    // Live ticks are subscribed to first and held in the subscription while the head (and
    // the history) is read, then delivered: a tick appended in between is at worst seen
    // twice (the hub keeps the newer), never missed. When a waiting connection asked for
    // `since`, the history reaches the hub before any live tick, so the `since` is
    // replayed up to the head, then goes live. Otherwise only the head is waited for (one
    // read), and the history is read beside the live ticks and put in front of what the
    // hub kept meanwhile: the first subscriber of a symbol does not wait for up to
    // `feed.history` messages, nor do the live ticks of a node that takes interest in
    // many symbols at once ([`backfiller`] reads those histories one after the other).
    // One task per symbol reads its head (and its history when asked first), so a client
    // subscribing to many symbols at once has them read side by side.
    // A read that fails (the bus away, a timeout) is tried again, with a backoff, while the
    // symbol is wanted: the waiting subscribers' snapshot and a `since` depend on it.
    let task = tokio::spawn({
        let (bus, name, backfills) = (bus.clone(), name.clone(), backfills.clone());
        async move {
            let mut attempt = 0u32;
            loop {
                let read = if history || bus.shared.cfg.feed.history == 0 {
                    take_head(&bus, &name).await
                } else {
                    take_head_only(&bus, &name).await.map(|found| {
                        if found && backfills.try_send(name.clone()).is_err() {
                            // Too many queued: a `since` waiting for this one is served
                            // from what the node holds.
                            bus.shared.hub.backfill_older(&name, &[]);
                        }
                    })
                };
                if read.is_ok() || !bus.shared.hub.has_interest(&name) {
                    break;
                }
                tracing::debug!(symbol = %name, attempt, "bus: reading a symbol's head failed; trying again");
                tokio::time::sleep(backoff(attempt, rand32())).await;
                attempt = attempt.saturating_add(1);
            }
            deliver(bus, name, sub).await;
        }
    });
    subs.insert(name, Delivery { task });
}

/// What this node starts a symbol from: the stream's history of it (kept as the symbol's
/// history, its newest as the head), or just the head when there is no recent history.
/// `Err` when the bus could not say (nothing was taken).
async fn take_head(bus: &Bus, name: &str) -> Result<(), ()> {
    let subject = bus.subjects.ordered(name);
    let held = match bus.shared.cfg.feed.history {
        0 => Vec::new(),
        _ => history(bus, &subject, name).await?,
    };
    if !held.is_empty() {
        bus.shared.hub.backfill(name, &held);
        bus.shared
            .bus
            .metrics
            .backfilled
            .fetch_add(held.len() as u64, Ordering::Relaxed);
    } else if let Some((h, Some(tick))) = newest(bus, &subject).await? {
        bus.shared.hub.ingest_ordered(name, h.seq, &tick, true);
    }
    Ok(())
}

/// The stream's newest tick of `name` as this node's head for it, its history to be read
/// later ([`backfiller`]). `Ok(false)` when the stream has none, `Err` when the bus could
/// not say.
async fn take_head_only(bus: &Bus, name: &str) -> Result<bool, ()> {
    match newest(bus, &bus.subjects.ordered(name)).await? {
        Some((h, Some(tick))) => {
            bus.shared.hub.ingest_head_before_history(name, h.seq, &tick);
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Symbols whose history waits to be read behind their live ticks (more are left to a
/// later `since`, which reads it first).
const BACKFILL_QUEUE: usize = 4096;

/// Reads the stream's history of the symbols taken from their head alone, one symbol at a
/// time, into the hub's history of each ([`crate::feed::hub::Hub::backfill_older`]): a
/// node that takes interest in many symbols at once gets their live ticks first, and its
/// connection to NATS never carries more than one symbol's history at once ahead of them.
async fn backfiller(bus: Arc<Bus>, mut rx: mpsc::Receiver<Box<str>>) {
    while let Some(name) = rx.recv().await {
        if !bus.shared.hub.has_interest(&name) {
            bus.shared.hub.backfill_older(&name, &[]);
            continue;
        }
        let subject = bus.subjects.ordered(&name);
        let held = history(&bus, &subject, &name).await.unwrap_or_default();
        let n = bus.shared.hub.backfill_older(&name, &held);
        bus.shared.bus.metrics.backfilled.fetch_add(n, Ordering::Relaxed);
    }
}

fn unix_ns_now() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128)
}

/// What the stream holds of an ordered subject for recovery (PROTOCOL.md 10): at most
/// `feed.history` ticks, none stored longer than `feed.history_age` ago, oldest first, up
/// to its newest at the time of asking; each with its `seq` and its age in ns. Empty when
/// the subject is, or holds nothing that recent (the head path then takes over).
async fn history(bus: &Bus, subject: &str, symbol: &str) -> Result<Vec<(u64, Tick, u64)>, ()> {
    use async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
    let f = &bus.shared.cfg.feed;
    let now = unix_ns_now();
    let since = now - f.history_age.as_nanos() as i128;
    let Some((head, _, stored)) = newest_at(bus, subject).await? else {
        return Ok(Vec::new());
    };
    if stored < since {
        return Ok(Vec::new());
    }
    let start_time = time::OffsetDateTime::from_unix_timestamp_nanos(since).map_err(|_| ())?;
    let stream = bus
        .js
        .get_stream_no_info(&bus.stream_name)
        .await
        .map_err(|_| ())?;
    let consumer = stream
        .create_consumer(OrderedConfig {
            filter_subject: subject.to_owned(),
            deliver_policy: DeliverPolicy::ByStartTime { start_time },
            ..Default::default()
        })
        .await
        .map_err(|e| tracing::debug!(error = %e, subject, "bus: reading the history failed"))?;
    let mut msgs = consumer.messages().await.map_err(|_| ())?;
    let mut out: std::collections::VecDeque<(u64, Tick, u64)> =
        std::collections::VecDeque::with_capacity(f.history.min(1024));
    let mut scratch = Vec::new();
    let mut buffers = Buffers::new(crate::bus::MAX_INGEST_BYTES);
    let mut ticks = Vec::with_capacity(MAX_BATCH);
    let deadline = tokio::time::sleep(BACKFILL_TIMEOUT);
    tokio::pin!(deadline);
    loop {
        let m = tokio::select! {
            m = msgs.next() => m,
            _ = &mut deadline => {
                tracing::warn!(subject, "bus: reading the history took too long; kept what arrived");
                break;
            }
        };
        let Some(Ok(m)) = m else { break };
        let Ok(info) = m.info() else { break };
        let (stream_seq, pending) = (info.stream_sequence, info.pending);
        let ago = (now - info.published.unix_timestamp_nanos()).max(0) as u64;
        let seq = parse_seq(
            m.headers
                .as_ref()
                .and_then(|h| h.get(SEQ_HEADER))
                .map(|v| v.as_str()),
        );
        ticks.clear();
        if let Ok(first) = seq
            && parse_ordered_payload(symbol, first, &m.payload, &mut scratch, &mut buffers, &mut ticks)
                .is_ok()
        {
            for &(seq, tick) in &ticks {
                if out.len() == f.history {
                    out.pop_front();
                }
                out.push_back((seq, tick, ago));
            }
        }
        if stream_seq >= head.stream_seq || pending == 0 {
            break;
        }
    }
    Ok(out.into())
}

fn release(bus: &Bus, subs: &mut HashMap<Box<str>, Delivery>, name: &str) {
    if bus.shared.hub.has_interest(name) {
        return;
    }
    if let Some(id) = bus.shared.hub.symbols().lookup(name)
        && !bus.shared.hub.release(id, bus.shared.now_ms())
    {
        return;
    }
    if let Some(d) = subs.remove(name) {
        d.task.abort();
    }
}

/// Wakes the shards the delivery tasks marked. Notified by the first mark of a batch, it
/// runs after the tasks already woken by the same read from NATS (the runtime queues tasks
/// in order), so a burst of ticks wakes each shard once instead of once per tick.
async fn wake_shards(bus: Arc<Bus>) {
    loop {
        bus.wake_batch.notified().await;
        let mask = bus.to_wake.swap(0, Ordering::AcqRel);
        bus.shared.hub.wake_shards(mask);
    }
}

/// The republished ticks of one symbol into the hub.
async fn deliver(bus: Arc<Bus>, name: Box<str>, mut sub: async_nats::Subscriber) {
    let mut scratch = Vec::with_capacity(crate::bus::MAX_INGEST_BYTES);
    let mut buffers = Buffers::new(crate::bus::MAX_INGEST_BYTES);
    let mut order = Reorder::new(bus.shared.hub.seq_of(&name), REORDER_MAX, REORDER_WAIT_MS);
    let mut ready: Vec<(u64, Tick)> = Vec::new();
    let mut ticks = Vec::with_capacity(MAX_BATCH);
    loop {
        let msg = match order.deadline() {
            None => sub.next().await,
            Some(at) => {
                let left = at.saturating_sub(bus.shared.now_ms());
                tokio::select! {
                    m = sub.next() => m,
                    _ = tokio::time::sleep(Duration::from_millis(left)) => {
                        order.expire(bus.shared.now_ms(), &mut ready);
                        hand_over(&bus, &name, &mut ready);
                        continue;
                    }
                }
            }
        };
        let Some(msg) = msg else { break };
        let m = &bus.shared.bus.metrics;
        let seq = parse_seq(
            msg.headers
                .as_ref()
                .and_then(|h| h.get(SEQ_HEADER))
                .map(|v| v.as_str()),
        );
        ticks.clear();
        let r = seq.and_then(|first| {
            parse_ordered_payload(&name, first, &msg.payload, &mut scratch, &mut buffers, &mut ticks)
        });
        match r {
            Ok(n) => {
                m.received.fetch_add(n as u64, Ordering::Relaxed);
                for &(seq, tick) in &ticks {
                    if order.push(seq, tick, bus.shared.now_ms(), &mut ready) {
                        m.reordered.fetch_add(1, Ordering::Relaxed);
                    }
                }
                hand_over(&bus, &name, &mut ready);
            }
            Err(why) => m.reject(why),
        }
    }
}

/// Ordered ticks of one symbol held at most this long for an earlier one ([`Reorder`]).
const REORDER_WAIT_MS: u64 = 20;
/// And at most this many.
const REORDER_MAX: usize = 1024;

/// Ticks of `name` in `seq` order into the hub; the shards are woken once per batch.
fn hand_over(bus: &Bus, name: &str, ready: &mut Vec<(u64, Tick)>) {
    let m = &bus.shared.bus.metrics;
    for (seq, tick) in ready.drain(..) {
        let mut wake = 0;
        let ingested = bus
            .shared
            .hub
            .ingest_ordered_deferred(name, seq, &tick, false, &mut wake);
        if wake != 0 && bus.to_wake.fetch_or(wake, Ordering::AcqRel) == 0 {
            bus.wake_batch.notify_one();
        }
        match ingested {
            Ingested::Accepted => {
                bus.shared.metrics.ticks_in.fetch_add(1, Ordering::Relaxed);
            }
            Ingested::Stale => {
                m.stale.fetch_add(1, Ordering::Relaxed);
            }
            Ingested::TableFull => m.reject(Reject::TableFull),
            Ingested::NoInterest => {}
        }
    }
}

/// The revocations stream: `<prefix>.revoke`, each kept for as long as a token issued
/// before it can live (`auth.max_token_lifetime` plus `auth.leeway`).
fn revocation_stream(bus: &Bus) -> stream::Config {
    let a = &bus.shared.cfg.auth;
    stream::Config {
        name: format!("{}_REVOKED", bus.stream_name),
        subjects: vec![bus.subjects.revoke()],
        max_age: a.max_token_lifetime + a.leeway + Duration::from_secs(1),
        max_messages: 100_000,
        discard: stream::DiscardPolicy::Old,
        storage: stream::StorageType::File,
        ..Default::default()
    }
}

/// Publishes one revocation accepted on this node, retrying until the bus has it (while
/// the bus is away, every node's own list still has what it was told directly).
async fn revocation_out(bus: Arc<Bus>, t: RevokeTarget) {
    let payload = bytes::Bytes::from(encode_revocation(&t));
    let at = bus.shared.now_ms();
    let mut attempt = 0u32;
    loop {
        let mut headers = HeaderMap::new();
        headers.insert(REVOKED_AT_HEADER, itoa::Buffer::new().format(at));
        let r = match bus
            .js
            .publish_with_headers(bus.subjects.revoke(), headers, payload.clone())
            .await
        {
            Ok(f) => f.await.map(|_| ()).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match r {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, kind = t.kind(), "bus: revocation not on the bus yet, retrying");
                tokio::time::sleep(backoff(attempt, rand32())).await;
                attempt = attempt.saturating_add(1);
                if at.saturating_add(bus.shared.revocation_horizon_ms()) < bus.shared.now_ms() {
                    return;
                }
            }
        }
    }
}

/// Every node applies every revocation on the bus: those kept from before it started
/// (then it reports ready) and each new one (closing matching sessions with `4003`). Should
/// the consumer's stream ever end, or keep failing, the node follows the stream again from
/// the first revocation it has not applied, after a backoff; should the stream's numbers go
/// back (a bus that lost its store made it again), from its start. A node never silently
/// stops applying revocations.
async fn revocations_in(bus: Arc<Bus>) {
    let applied = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let renumbered = Arc::new(tokio::sync::Notify::new());
    tokio::spawn(revocations_loaded(
        bus.clone(),
        applied.clone(),
        renumbered.clone(),
    ));
    let mut attempt = 0u32;
    loop {
        let before = applied.load(Ordering::Acquire);
        let why = tokio::select! {
            why = follow_revocations(&bus, &applied) => why,
            _ = renumbered.notified() => {
                // The consumer is dropped with the future above: nothing applies a message
                // of the old numbering after this.
                applied.store(0, Ordering::Release);
                attempt = 0;
                "the revocations stream's numbers went back (made again by a bus that lost its store): reading it from the start".to_string()
            }
        };
        if applied.load(Ordering::Acquire) > before {
            attempt = 0;
        }
        tracing::warn!(error = %why, "bus: following the revocations again");
        tokio::time::sleep(backoff(attempt, rand32())).await;
        attempt = attempt.saturating_add(1);
    }
}

/// Consecutive errors from the revocations' consumer before [`follow_revocations`] starts
/// over with a fresh one.
const REVOCATION_ERRORS_MAX: u32 = 8;

/// Applies the revocations after the newest in `applied` until the consumer ends or keeps
/// failing; returns why it stopped.
async fn follow_revocations(bus: &Arc<Bus>, applied: &std::sync::atomic::AtomicU64) -> String {
    let after = applied.load(Ordering::Acquire);
    let deliver_policy = if after == 0 {
        jetstream::consumer::DeliverPolicy::All
    } else {
        jetstream::consumer::DeliverPolicy::ByStartSequence {
            start_sequence: after + 1,
        }
    };
    let consumer = async {
        let stream = bus
            .js
            .get_or_create_stream(revocation_stream(bus))
            .await
            .map_err(|e| e.to_string())?;
        stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                deliver_policy,
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())
    }
    .await;
    let consumer = match consumer {
        Ok(c) => c,
        Err(e) => return format!("cannot follow the revocations: {e}"),
    };
    let mut msgs = match consumer.messages().await {
        Ok(m) => m,
        Err(e) => return format!("cannot read the revocations: {e}"),
    };
    let mut errors = 0u32;
    while let Some(m) = msgs.next().await {
        let m = match m {
            Ok(m) => m,
            Err(e) => {
                // Never a tight loop on a consumer that only fails.
                errors += 1;
                if errors >= REVOCATION_ERRORS_MAX {
                    return format!("reading the revocations failed {errors} times in a row: {e}");
                }
                tokio::time::sleep(backoff(errors, rand32())).await;
                continue;
            }
        };
        errors = 0;
        let seq = m.info().map(|i| i.stream_sequence).unwrap_or(0);
        if seq != 0 && seq <= applied.load(Ordering::Acquire) {
            // Read again (the client library re-made its consumer from the start): applied.
            continue;
        }
        let at = m
            .headers
            .as_ref()
            .and_then(|h| h.get(REVOKED_AT_HEADER))
            .map(|v| v.as_str());
        match parse_revocation(&m.payload, at) {
            Ok((t, at)) => {
                let _ = bus.shared.revocation.revoke(t.clone(), at);
                // Live sessions: each shard closes its matches (no one waits for counts).
                let (tx, _rx) = crossbeam_channel::bounded(0);
                bus.shared
                    .hub
                    .broadcast(|| Control::Revoke(t.clone(), tx.clone()));
            }
            Err(why) => bus.shared.bus.metrics.reject(why),
        }
        applied.fetch_max(seq, Ordering::AcqRel);
    }
    "the revocations' consumer ended".to_string()
}

/// Loaded once everything in the stream when last looked is applied
/// ([`crate::bus::revocations_loaded`]); checked four times a second, so a reconnect (when
/// the stream may have grown) is covered too. Tells [`revocations_in`] when the stream's
/// numbers went back.
async fn revocations_loaded(
    bus: Arc<Bus>,
    applied: Arc<std::sync::atomic::AtomicU64>,
    renumbered: Arc<tokio::sync::Notify>,
) {
    let name = revocation_stream(&bus).name;
    // When the stream was made: another time is another stream (a bus that lost its
    // store made it again), even if it has grown past what was applied.
    let mut created: Option<i128> = None;
    loop {
        // First after a pause: the follower makes the stream if it is missing.
        tokio::time::sleep(Duration::from_millis(250)).await;
        // Read before the stream's state: anything applied was stored before, so only a
        // stream made again can have a last sequence below it.
        let a = applied.load(Ordering::Acquire);
        match bus.js.get_stream(&name).await {
            Ok(mut s) => {
                if let Ok(info) = s.info().await {
                    let (first, last) = (info.state.first_sequence, info.state.last_sequence);
                    let made = info.created.unix_timestamp_nanos();
                    let remade = created.is_some_and(|c| c != made);
                    created = Some(made);
                    let loaded = if remade || crate::bus::revocations_renumbered(a, last) {
                        renumbered.notify_one();
                        false
                    } else {
                        crate::bus::revocations_loaded(a, first, last)
                    };
                    bus.shared.bus.revocations_loaded.store(loaded, Ordering::Release);
                }
            }
            // The bus lost its store: the stream is made again when it is followed again.
            Err(e) if stream_not_found(&e) => {
                bus.shared.bus.revocations_loaded.store(false, Ordering::Release);
                renumbered.notify_one();
            }
            Err(_) => {}
        }
    }
}

/// Tickets: `<prefix>.ticket.<sha256 of the ticket>`, the token sealed with a key from the
/// ticket, kept for `auth.ticket_ttl`.
fn ticket_stream(shared: &Shared, subjects: &Subjects, stream_name: &str) -> stream::Config {
    stream::Config {
        name: format!("{stream_name}_TICKETS"),
        subjects: vec![subjects.ticket_all()],
        max_age: shared.cfg.auth.ticket_ttl + Duration::from_secs(1),
        max_messages_per_subject: 1,
        max_messages: 1_000_000,
        discard: stream::DiscardPolicy::Old,
        // On file: a ticket outlives a restart of nats-server (it is sealed: useless
        // without the ticket itself).
        storage: stream::StorageType::File,
        ..Default::default()
    }
}

/// When a ticket on the bus stops being good (Unix milliseconds).
const EXPIRES_HEADER: &str = "Tg-Expires-At";

/// How long a ticket operation may take before the connection waiting for it is told no.
const TICKET_OP_TIMEOUT: Duration = Duration::from_secs(2);

async fn ticket_op(bus: Arc<Bus>, op: TicketOp) {
    match op {
        TicketOp::Put {
            key,
            sealed,
            ttl_ms,
            reply,
        } => {
            let expires = bus.shared.now_ms().saturating_add(ttl_ms);
            let done = tokio::time::timeout(TICKET_OP_TIMEOUT, async {
                let mut headers = HeaderMap::new();
                headers.insert(EXPIRES_HEADER, itoa::Buffer::new().format(expires));
                let f = bus
                    .js
                    .publish_with_headers(bus.subjects.ticket(&key), headers, bytes::Bytes::from(sealed))
                    .await
                    .ok()?;
                f.await.ok().map(|_| ())
            })
            .await;
            let _ = reply.send(matches!(done, Ok(Some(()))));
        }
        TicketOp::Take { key, reply } => {
            let got = tokio::time::timeout(TICKET_OP_TIMEOUT, async {
                let stream = bus
                    .js
                    .get_stream_no_info(format!("{}_TICKETS", bus.stream_name))
                    .await
                    .ok()?;
                let m = stream
                    .get_last_raw_message_by_subject(&bus.subjects.ticket(&key))
                    .await
                    .ok()?;
                let expires = parse_seq(m.headers.get(EXPIRES_HEADER).map(|v| v.as_str())).ok()?;
                // Whoever deletes it first has it: a second delete of that sequence fails.
                match stream.delete_message(m.sequence).await {
                    Ok(true) if bus.shared.now_ms() < expires => Some(m.payload.to_vec()),
                    _ => None,
                }
            })
            .await;
            let _ = reply.send(got.ok().flatten());
        }
    }
}

/// Announces this node's count of `user` (core NATS: counts are refreshed, not kept).
async fn announce(bus: &Bus, user: &str, n: usize) {
    let subject = bus.subjects.cap(&crate::auth::usercap::user_key(user), &bus.node);
    let _ = bus
        .client
        .publish(subject, bytes::Bytes::from(n.to_string().into_bytes()))
        .await;
}

async fn announce_all(bus: &Bus) {
    for (user, n) in bus.shared.auth.caps.snapshot() {
        announce(bus, &user, n).await;
    }
}

/// The other nodes' per-user counts: kept, refreshed, summed at admission
/// (`usercap::acquire_at`). On start this node asks every node to announce its counts,
/// and announces its own every [`ANNOUNCE_EVERY`].
async fn counts_in(bus: Arc<Bus>) {
    let Some(counts) = bus.shared.auth.caps.cluster() else {
        return;
    };
    let (mut sub, mut sync) = loop {
        let a = bus.client.subscribe(bus.subjects.cap_all()).await;
        let b = bus.client.subscribe(bus.subjects.cap_sync()).await;
        match (a, b) {
            (Ok(a), Ok(b)) => break (a, b),
            _ => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    };
    let _ = bus
        .client
        .publish(bus.subjects.cap_sync(), bytes::Bytes::new())
        .await;
    let mut every = tokio::time::interval(ANNOUNCE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let ttl = COUNT_TTL.as_millis() as u64;
    loop {
        tokio::select! {
            m = sub.next() => {
                let Some(m) = m else { return };
                let Some((user, node)) = bus.subjects.cap_parts(m.subject.as_str()) else { continue };
                if node == bus.node {
                    continue;
                }
                let n = std::str::from_utf8(&m.payload).ok().and_then(|s| s.parse::<u32>().ok());
                if let Some(n) = n {
                    counts.set(user, node, n as usize, bus.shared.now_ms() + ttl);
                }
            }
            s = sync.next() => {
                if s.is_none() { return }
                announce_all(&bus).await;
            }
            _ = every.tick() => {
                counts.sweep(bus.shared.now_ms());
                announce_all(&bus).await;
            }
        }
    }
}

/// `tickgate doctor --config`: connects to the configured NATS (2 s per server), checks
/// that JetStream answers, and says which server it reached. Runs its own small runtime.
pub fn probe(cfg: &ClusterConfig) -> Result<String, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let (opts, urls) = nats_options(cfg, "tickgate doctor").await?;
        let client = tokio::time::timeout(Duration::from_secs(5), opts.connect(urls.as_slice()))
            .await
            .map_err(|_| "no NATS server answered within 5 s".to_string())?
            .map_err(|e| format!("cannot connect: {e}"))?;
        let info = client.server_info();
        // The account-info request of the JetStream API, read loosely (its shape varies
        // across server versions): an answer without `error` means JetStream is there.
        let r = tokio::time::timeout(
            Duration::from_secs(2),
            client.request("$JS.API.INFO", bytes::Bytes::new()),
        )
        .await
        .map_err(|_| "JetStream did not answer within 2 s (start nats-server with -js)".to_string())?
        .map_err(|e| format!("JetStream is not enabled: {e} (start nats-server with -js)"))?;
        let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap_or_default();
        if let Some(e) = v.get("error") {
            return Err(format!("JetStream refused: {e}"));
        }
        Ok(format!(
            "{}:{} (nats-server {}), JetStream enabled",
            info.host, info.port, info.version
        ))
    })
}
