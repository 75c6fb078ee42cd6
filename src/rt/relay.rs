//! The I/O half of the cross-node revocation relay (see [`crate::cluster`] for the design
//! and the sans-IO decisions): one worker thread and one bounded queue per peer, blocking
//! sockets with deadlines, the security log of each outcome.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::auth::seclog::{self, Event, Reason, SecurityEvent};
use crate::cluster::{
    IO_TIMEOUT, MAX_RESPONSE, Outcome, QUEUE_PER_PEER, Summary, backoff, classify, request_bytes,
};
use crate::state::Shared;

/// One revocation for one peer.
struct Job {
    req: Vec<u8>,
    give_up_at: Instant,
    reply: crossbeam_channel::Sender<Outcome>,
}

/// Relays revocations to `admin.peers`: one worker thread and one bounded queue per
/// peer, so an unreachable peer holds one thread and at most [`QUEUE_PER_PEER`]
/// revocations, and never delays the others.
#[derive(Clone, Default)]
pub struct Relay {
    peers: Arc<[(String, crossbeam_channel::Sender<Job>)]>,
}

impl Relay {
    /// Starts a worker per peer. Workers live as long as the process.
    pub fn start(shared: &Arc<Shared>) -> std::io::Result<Self> {
        let mut peers = Vec::new();
        for peer in &shared.cfg.admin.peers {
            let (tx, rx) = crossbeam_channel::bounded::<Job>(QUEUE_PER_PEER);
            let (shared, name) = (shared.clone(), peer.clone());
            std::thread::Builder::new()
                .name("tickgate-relay".into())
                .spawn(move || {
                    for job in rx.iter() {
                        let out = deliver(&shared, &name, &job.req, job.give_up_at);
                        let _ = job.reply.send(out);
                    }
                })?;
            peers.push((peer.clone(), tx));
        }
        Ok(Relay { peers: peers.into() })
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// Relays `body` with `bearer` to every peer, retrying until `give_up_at` (at least
    /// one attempt each); waits up to `wait` for their answers.
    pub fn relay(
        &self,
        shared: &Shared,
        bearer: &str,
        body: &[u8],
        give_up_at: Instant,
        wait: Duration,
    ) -> Summary {
        let (tx, rx) = crossbeam_channel::unbounded::<Outcome>();
        let mut s = Summary::default();
        let mut queued = 0;
        for (peer, q) in self.peers.iter() {
            let job = Job {
                req: request_bytes(peer, bearer, body),
                give_up_at,
                reply: tx.clone(),
            };
            if q.try_send(job).is_ok() {
                queued += 1;
            } else {
                log(
                    shared,
                    peer,
                    None,
                    seclog::Outcome::Failed,
                    Reason::RelayQueueFull,
                );
                s.refused += 1;
            }
        }
        drop(tx);
        let deadline = Instant::now() + wait;
        let mut answered = 0;
        while answered < queued {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(Outcome::Done { closed }) => {
                    s.reached += 1;
                    s.closed = s.closed.saturating_add(closed);
                }
                Ok(_) => s.refused += 1,
                Err(_) => break,
            }
            answered += 1;
        }
        s.pending = queued - answered;
        s
    }
}

/// One peer, until it answers for good or `give_up_at` (the first attempt is always made).
fn deliver(shared: &Shared, peer: &str, req: &[u8], give_up_at: Instant) -> Outcome {
    let mut attempt = 0u32;
    let mut last = Reason::Unreachable;
    loop {
        let pause = backoff(attempt);
        if attempt > 0 && Instant::now() + pause >= give_up_at {
            log(shared, peer, None, seclog::Outcome::Failed, last);
            return Outcome::GiveUp(0);
        }
        std::thread::sleep(pause);
        attempt += 1;
        let (addr, outcome) = attempt_once(peer, req);
        match outcome {
            Outcome::Done { closed } => {
                log(shared, peer, addr, seclog::Outcome::Accepted, Reason::Ok);
                return Outcome::Done { closed };
            }
            Outcome::GiveUp(code) => {
                log(shared, peer, addr, seclog::Outcome::Rejected, Reason::PeerRefused);
                return Outcome::GiveUp(code);
            }
            Outcome::Retry(why) => last = why,
        }
    }
}

fn attempt_once(peer: &str, req: &[u8]) -> (Option<SocketAddr>, Outcome) {
    let Some(addr) = peer.to_socket_addrs().ok().and_then(|mut a| a.next()) else {
        return (None, Outcome::Retry(Reason::Unresolvable));
    };
    let Ok(mut s) = TcpStream::connect_timeout(&addr, IO_TIMEOUT) else {
        return (Some(addr), Outcome::Retry(Reason::Unreachable));
    };
    let _ = s.set_write_timeout(Some(IO_TIMEOUT));
    if s.write_all(req).is_err() {
        return (Some(addr), Outcome::Retry(Reason::Unreachable));
    }
    // The whole answer within IO_TIMEOUT: a peer trickling bytes cannot hold the worker.
    let end = Instant::now() + IO_TIMEOUT;
    let mut raw = Vec::with_capacity(512);
    let mut chunk = [0u8; 2048];
    while raw.len() < MAX_RESPONSE {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() || s.set_read_timeout(Some(left)).is_err() {
            return (Some(addr), Outcome::Retry(Reason::Slow));
        }
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&chunk[..n.min(MAX_RESPONSE - raw.len())]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return (Some(addr), Outcome::Retry(Reason::Slow)),
        }
    }
    (Some(addr), classify(&raw))
}

fn log(shared: &Shared, peer: &str, addr: Option<SocketAddr>, outcome: seclog::Outcome, reason: Reason) {
    shared.audit(&SecurityEvent {
        ip: addr.map(|a| a.ip()),
        sub: Some(peer),
        ..SecurityEvent::at(shared.now_ms(), Event::RevokeRelay, outcome, reason)
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_or_trickling_peer_is_a_retry_not_a_hang() {
        use std::net::TcpListener;
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            // One byte of an answer, then nothing (the attempt's deadline must end it).
            let _ = s.write_all(b"H");
            std::thread::sleep(IO_TIMEOUT + Duration::from_millis(500));
        });
        let (_, out) = attempt_once(&addr, &request_bytes(&addr, "t", b"{}"));
        assert_eq!(out, Outcome::Retry(Reason::Slow));
        server.join().unwrap();
        // A peer that is not there at all.
        let (_, out) = attempt_once("127.0.0.1:1", b"x");
        assert_eq!(out, Outcome::Retry(Reason::Unreachable));
    }
}
