//! The admin listener's sockets and threads (see [`crate::admin`] for what it answers and
//! the limits it keeps): one acceptor thread, a bounded number of request threads with
//! blocking sockets and deadlines, and carrying out a revocation [`admin::route`] accepted
//! (the broadcast to the shards, waiting for their counts, and with `[cluster]` the hand-off
//! to the bus, which takes it to every node).

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::admin::{self, Registry, Revocation, Routed};
use crate::auth::seclog::Reason;
use crate::feed::hub::Control;
use crate::proto::http::{self, RequestLimits, Response};
use crate::state::Shared;

/// Binds `admin.listen` and starts the acceptor thread.
pub fn start(shared: Arc<Shared>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(shared.cfg.admin.listen)?;
    let addr = listener.local_addr()?;
    let registry = Arc::new(Registry::<TcpStream>::new(
        shared.cfg.admin.max_connections,
        shared.cfg.admin.max_connections_per_ip,
    ));
    std::thread::Builder::new()
        .name("tickgate-admin".into())
        .spawn(move || {
            loop {
                let Ok((stream, peer)) = listener.accept() else {
                    continue;
                };
                let accepted = Instant::now();
                let Ok(handle) = stream.try_clone() else { continue };
                let id = match registry.admit(peer.ip(), accepted, handle) {
                    Ok((id, evicted)) => {
                        if let Some(old) = evicted {
                            // Its blocked read returns at once and its thread ends.
                            let _ = old.stream.shutdown(Shutdown::Both);
                            admin::reject(&shared, old.ip, Reason::Evicted);
                        }
                        id
                    }
                    Err(why) => {
                        admin::reject(&shared, peer.ip(), why);
                        continue;
                    }
                };
                // Leaves the registry when the thread ends, or when the closure is dropped
                // because the thread could not be started.
                let slot = Slot {
                    registry: registry.clone(),
                    id,
                };
                let shared = shared.clone();
                let _ = std::thread::Builder::new()
                    .name("tickgate-admin-req".into())
                    .spawn(move || {
                        serve(&shared, &slot, stream, peer, accepted);
                        drop(slot);
                    });
            }
        })?;
    Ok(addr)
}

/// A request thread's place in the [`Registry`], given back on drop.
struct Slot {
    registry: Arc<Registry<TcpStream>>,
    id: u64,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.registry.remove(self.id);
    }
}

fn serve(shared: &Arc<Shared>, slot: &Slot, mut stream: TcpStream, peer: SocketAddr, accepted: Instant) {
    let timeout = shared.cfg.admin.request_timeout;
    let deadline = accepted + timeout;
    let limits = RequestLimits::default();
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let req = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            admin::reject(shared, peer.ip(), Reason::Timeout);
            return;
        }
        if stream.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match stream.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                admin::reject(shared, peer.ip(), Reason::Timeout);
                return;
            }
            Err(_) => return,
        }
        match http::try_parse(&buf, &limits) {
            Ok(Some((_, req))) => break req,
            Ok(None) if buf.len() < limits.max_head_bytes + limits.max_body_bytes => continue,
            Ok(None) => return,
            Err(e) => {
                let resp = Response::text(e.status(), "bad request\n");
                let _ = write_by(&mut stream, &resp.to_bytes(), Instant::now() + timeout);
                return;
            }
        }
    };
    if !slot.registry.received(slot.id) {
        return;
    }
    let resp = match admin::route(shared, &req, Some(peer), shared.now_ms()) {
        Routed::Reply(resp) => resp,
        Routed::Revoke(r) => revoke(shared, &r),
    };
    let _ = write_by(&mut stream, &resp.to_bytes(), Instant::now() + timeout);
}

/// `write_all` that gives up at `deadline`, however slowly the peer reads.
fn write_by(stream: &mut TcpStream, mut bytes: &[u8], deadline: Instant) -> io::Result<()> {
    while !bytes.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        stream.set_write_timeout(Some(left))?;
        match stream.write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = bytes.get(n..).unwrap_or_default(),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Carries out an accepted revocation: every shard closes what it revoked (their counts
/// are awaited up to 900 ms); with `[cluster]` the bus takes it to every node (and keeps
/// it for nodes that start later); then the answer, with this node's count.
fn revoke(shared: &Arc<Shared>, r: &Revocation) -> Response {
    let (tx, rx) = crossbeam_channel::unbounded();
    let shards = shared.hub.shards();
    shared
        .hub
        .broadcast(|| Control::Revoke(r.target.clone(), tx.clone()));
    drop(tx);
    let deadline = Instant::now() + Duration::from_millis(900);
    if shared.bus.enabled() && !shared.bus.revoke(&r.target) {
        tracing::warn!(
            kind = r.target.kind(),
            "revocation applied here but the bus queue is full"
        );
    }
    let mut closed = 0;
    for _ in 0..shards {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(n) => closed += n,
            Err(_) => break,
        }
    }
    admin::revoked(shared, r, closed)
}
