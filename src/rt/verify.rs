//! Reauth verification off the shard event loops.
//!
//! An Ed25519 verification costs tens of microseconds. Tokens of connections that opened
//! together expire together, so thousands of in-band `reauth`s can arrive in the same
//! second; verified inline they would stall the shard's loop (and every tick behind it)
//! for the whole burst. Instead the session hands the token to this small pool of threads
//! (bounded queue), and the result comes back through the shard's control inbox as
//! `Control::ReauthDone`, where `Session::finish_reauth` applies it. When the queue is
//! full the session verifies inline: slower, never lost.
//!
//! The threads run at a lower CPU priority (nice +10) than the shards. A reauth has
//! `reauth_lead` (a minute by default) to complete, a tick has microseconds: when a burst
//! of reauths meets ticks on a busy core, the kernel runs the shard first and verifies
//! in the gaps (with nice 10 the threads still get about a tenth of a saturated core,
//! ~5,000 verifications/s, so reauths keep completing under load).

use std::sync::Arc;

use crate::auth::jwt::{AuthError, VerifiedClaims};
use crate::feed::hub::Control;
use crate::session::ReauthVerifier;
use crate::state::Shared;

/// Reauth tokens waiting for a verifier thread, at most.
const QUEUE: usize = 16 * 1024;

struct Job {
    shard: usize,
    idx: usize,
    generation: u32,
    id: Option<u64>,
    token: String,
    now_ms: u64,
}

#[derive(Clone)]
pub struct VerifyPool {
    tx: crossbeam_channel::Sender<Job>,
}

impl VerifyPool {
    pub fn start(shared: Arc<Shared>, threads: usize) -> std::io::Result<VerifyPool> {
        let (tx, rx) = crossbeam_channel::bounded::<Job>(QUEUE);
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("tickgate-verify-{i}"))
                .spawn(move || {
                    // Failure only costs the priority difference.
                    let _ = crate::rt::set_thread_nice(10);
                    for job in rx.iter() {
                        let result = shared.verify_token(&job.token, job.now_ms);
                        let inbox = shared.hub.inbox(job.shard);
                        let _ = inbox.control_tx.send(Control::ReauthDone {
                            idx: job.idx,
                            generation: job.generation,
                            id: job.id,
                            result: Box::new(result),
                        });
                        inbox.notify();
                    }
                })?;
        }
        Ok(VerifyPool { tx })
    }
}

/// The `ReauthVerifier` a shard hands to one connection's session.
pub struct ConnVerifier<'a> {
    pub shared: &'a Shared,
    pub pool: &'a VerifyPool,
    pub shard: usize,
    pub idx: usize,
    pub generation: u32,
}

impl ReauthVerifier for ConnVerifier<'_> {
    fn verify_reauth(&self, token: &str, now_unix_secs: u64) -> Result<VerifiedClaims, AuthError> {
        self.shared.verify_reauth(token, now_unix_secs)
    }

    fn defer_reauth(&self, id: Option<u64>, token: &str, now_unix_secs: u64) -> bool {
        let job = Job {
            shard: self.shard,
            idx: self.idx,
            generation: self.generation,
            id,
            token: token.to_string(),
            now_ms: now_unix_secs.saturating_mul(1000),
        };
        self.pool.tx.try_send(job).is_ok()
    }
}
