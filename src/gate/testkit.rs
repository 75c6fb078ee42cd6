//! What the gate's sans-IO tests share (`gate::tests`, `gate::demo::tests`): a `Shared`
//! built from a config and one verifying key, with the security log kept in memory, and
//! parsed requests answered from one address at a given `now`. No socket.

use std::sync::{Arc, Mutex};

use ed25519_dalek::SigningKey;

use super::{Outcome, handle_public};
use crate::auth::keys::KeySet;
use crate::auth::mint;
use crate::auth::seclog::SecurityLog;
use crate::config::Config;
use crate::proto::http::{RequestLimits, Response, try_parse};
use crate::state::{AuthState, Shared};

pub struct GateWorld {
    pub shared: Shared,
    /// The key whose public half `kid` names in the key set.
    pub key: SigningKey,
    log: Arc<Mutex<Vec<String>>>,
}

impl GateWorld {
    /// `cfg` with a fresh key pair under `kid`; `demo_key`: the server also holds the
    /// private half, as the embedded demo does.
    pub fn new(cfg: Config, kid: &str, demo_key: bool) -> GateWorld {
        let key = mint::generate_signing_key().unwrap();
        let mut ks = KeySet::new();
        ks.insert(kid, key.verifying_key()).unwrap();
        let auth = AuthState::build(&cfg, ks).unwrap();
        let (log, lines) = SecurityLog::memory();
        let mut shared = Shared::new(cfg, auth, log);
        if demo_key {
            shared = shared.with_demo_key(key.clone());
        }
        GateWorld {
            shared,
            key,
            log: lines,
        }
    }

    /// One request from 192.0.2.1 at `now`: its answer (an upgrade panics).
    pub fn send(&self, raw: &str, now: u64) -> Response {
        let (_, req) = try_parse(raw.as_bytes(), &RequestLimits::default())
            .unwrap()
            .unwrap();
        match handle_public(&self.shared, &req, "192.0.2.1".parse().unwrap(), now) {
            Outcome::Respond(r) => r,
            Outcome::TicketIssued { resp, .. } => resp,
            Outcome::Upgrade(_) => panic!("upgrade"),
        }
    }

    /// The newest security-log line.
    pub fn last_log(&self) -> String {
        self.log.lock().unwrap().last().cloned().unwrap_or_default()
    }
}

/// The value of header `name` (any case) in `r`.
pub fn header<'a>(r: &'a Response, name: &str) -> Option<&'a str> {
    r.headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}
