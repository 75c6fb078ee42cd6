//! What every shard shares: configuration, the reloadable auth state, the gate's tables,
//! the hub, metrics and the security log. Built once by [`Shared::new`], held in an `Arc`.
//!
//! Everything in here is either immutable, atomic, sharded (dashmap) or swapped whole
//! (`RwLock<Arc<AuthState>>`: a reload builds a new `AuthState` aside and swaps the pointer,
//! so a handshake in flight keeps the set it started with and never sees half a reload).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::auth::cidr::CidrSet;
use crate::auth::jwt::{AuthError, VerifiedClaims, Verifier, VerifyPolicy};
use crate::auth::keys::KeySet;
use crate::auth::origin::OriginPolicy;
use crate::auth::ratelimit::IpRateLimiter;
use crate::auth::revocation::RevocationList;
use crate::auth::seclog::{SecurityCounters, SecurityLog};
use crate::auth::tickets::TicketStore;
use crate::auth::usercap::UserCaps;
use crate::config::Config;
use crate::feed::hub::Hub;
use crate::metrics::Metrics;
use crate::session::{ReauthVerifier, SessionConfig};

/// The part of the configuration that `SIGHUP` reloads.
pub struct AuthState {
    pub verifier: Verifier,
    pub origins: OriginPolicy,
    pub proxies: CidrSet,
}

impl AuthState {
    pub fn build(cfg: &Config, keys: KeySet) -> Result<AuthState, String> {
        let policy = VerifyPolicy {
            issuer: cfg.auth.issuer.clone(),
            audience: cfg.auth.audience.clone(),
            max_lifetime_secs: cfg.auth.max_token_lifetime.as_secs(),
            leeway_secs: cfg.auth.leeway.as_secs(),
            ..VerifyPolicy::default()
        };
        let origins = OriginPolicy::new(&cfg.auth.allowed_origins, cfg.auth.allow_missing_origin)
            .map_err(|e| format!("auth.allowed_origins: {e}"))?;
        // CidrSet::parse names the key itself.
        let proxies = CidrSet::parse(&cfg.auth.trusted_proxies)?;
        Ok(AuthState {
            verifier: Verifier::new(keys, policy),
            origins,
            proxies,
        })
    }

    /// Load the key set named by the config from disk.
    pub fn load_keys(cfg: &Config) -> Result<KeySet, String> {
        let files: Vec<(String, std::path::PathBuf)> = cfg
            .auth
            .keys
            .iter()
            .map(|k| (k.kid.clone(), k.path.clone()))
            .collect();
        KeySet::load(&files, cfg.auth.jwks.as_deref()).map_err(|e| format!("auth keys: {e}"))
    }
}

/// Who may connect: the reloadable keys, policy and allow-lists, and the per-IP and
/// per-user limits the gate applies.
pub struct AuthParts {
    /// Keys and verify policy, origins, trusted proxies: swapped whole on `SIGHUP`
    /// ([`Shared::auth`], [`Shared::swap_auth`]).
    pub current: RwLock<Arc<AuthState>>,
    /// Per-IP handshake rate limiter.
    pub rate: IpRateLimiter,
    /// Per-user concurrent connection caps.
    pub caps: Arc<UserCaps>,
}

/// Where security events go: the log (one JSON line each) and the counters behind
/// `tickgate_security_events_total`. Both are written by [`Shared::audit`].
pub struct SecurityParts {
    pub log: SecurityLog,
    pub counters: SecurityCounters,
}

/// This node's lifecycle and the limits every session is built with.
pub struct NodeParts {
    /// Set once by a drain (`SIGTERM`, [`crate::rt::ServerHandle::drain`]): `/readyz` 503.
    pub draining: AtomicBool,
    /// The session limits derived from `[limits]` and `[lifetime]`, shared by every session.
    pub session: Arc<SessionConfig>,
}

/// The one clock: Unix milliseconds at `epoch`, advanced by a monotonic clock (see
/// [`Clock::now_ms`]).
pub struct Clock {
    epoch: Instant,
    epoch_unix_ms: u64,
}

impl Clock {
    /// Starts now.
    pub fn start() -> Clock {
        Clock {
            epoch: Instant::now(),
            epoch_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        }
    }

    /// Milliseconds since the Unix epoch, read from a monotonic clock: a wall-clock step
    /// never makes a deadline fire early or twice. The one clock behind every `now`.
    pub fn now_ms(&self) -> u64 {
        self.epoch_unix_ms + self.epoch.elapsed().as_millis() as u64
    }
}

/// What all shards (and the admin listener) share, in named parts: `cfg`, `auth`,
/// `tickets`, `revocation`, `security` (log and counters), `metrics`, `hub`, `node`
/// (drain state, session limits), `tls`, and the one `clock`.
pub struct Shared {
    pub cfg: Config,
    pub auth: AuthParts,
    pub tickets: TicketStore<VerifiedClaims>,
    pub revocation: RevocationList,
    pub security: SecurityParts,
    pub metrics: Metrics,
    pub hub: Hub,
    pub node: NodeParts,
    /// `[cluster]`: what the shards and the admin listener share with the bus thread.
    pub bus: crate::bus::Link,
    /// `[tls]` loaded: the public listener speaks TLS. Set with [`Shared::with_tls`];
    /// `rt::start` refuses a config with `[tls]` whose state was not loaded.
    pub tls: Option<crate::tls::TlsState>,
    /// The one clock (see [`Shared::now_ms`]).
    pub clock: Clock,
    /// The embedded demo's in-memory signing key, which `POST /v1/demo-token` mints the
    /// demo page's tokens with ([`crate::gate::demo`]). Set with [`Shared::with_demo_key`]
    /// by the embedded demo only: elsewhere `None`, and that endpoint does not exist.
    pub demo_key: Option<ed25519_dalek::SigningKey>,
}

impl Shared {
    pub fn new(cfg: Config, auth: AuthState, seclog: SecurityLog) -> Shared {
        let shards = cfg.server.shards.max(1);
        let l = &cfg.limits;
        let session_cfg = SessionConfig {
            max_symbols_per_connection: l.max_symbols_per_connection,
            inbound_messages_per_sec: l.inbound_messages_per_sec,
            outbound_queue_bytes: l.outbound_queue_bytes,
            reauth_lead_ms: cfg.lifetime.reauth_lead.as_millis() as u64,
            reauth_grace_ms: cfg.lifetime.reauth_grace.as_millis() as u64,
            reauth_spread_ms: cfg.lifetime.reauth_spread.as_millis() as u64,
            heartbeat_ms: cfg.lifetime.heartbeat.as_millis() as u64,
            idle_timeout_ms: cfg.lifetime.idle_timeout.as_millis() as u64,
            slow_consumer_grace_ms: l.slow_consumer_grace.as_millis() as u64,
            msg_limits: Default::default(),
            cluster: cfg.cluster.is_some(),
        };
        let leeway_ms = cfg.auth.leeway.as_millis() as u64;
        let max_life_ms = cfg.auth.max_token_lifetime.as_millis() as u64;
        Shared {
            auth: AuthParts {
                current: RwLock::new(Arc::new(auth)),
                rate: IpRateLimiter::new(l.per_ip_handshakes_per_sec, l.per_ip_burst, 100_000),
                caps: UserCaps::new(l.per_user_max_connections),
            },
            tickets: TicketStore::new(cfg.auth.ticket_ttl.as_millis() as u64, 100_000),
            revocation: RevocationList::new(max_life_ms, leeway_ms, 100_000),
            security: SecurityParts {
                log: seclog,
                counters: SecurityCounters::new(),
            },
            metrics: Metrics::new(shards),
            hub: Hub::new(shards, cfg.feed.max_symbols).with_history(crate::feed::history::HistoryLimits {
                depth: cfg.feed.history,
                age_ns: crate::metrics::duration_ns(cfg.feed.history_age),
                max_bytes: cfg.feed.history_bytes,
            }),
            node: NodeParts {
                draining: AtomicBool::new(false),
                session: Arc::new(session_cfg),
            },
            bus: crate::bus::Link::default(),
            tls: None,
            clock: Clock::start(),
            demo_key: None,
            cfg,
        }
    }

    /// Counts a security event (`tickgate_security_events_total`) and writes its log line.
    pub fn audit(&self, e: &crate::auth::seclog::SecurityEvent<'_>) {
        self.security.counters.record(e);
        self.security.log.write(e);
    }

    /// Milliseconds since the Unix epoch, read from a monotonic clock: a wall-clock step
    /// never makes a deadline fire early or twice. The one clock behind every `now`.
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// Attach the loaded `[tls]` state (see [`crate::tls::TlsState::load`]).
    pub fn with_tls(mut self, tls: crate::tls::TlsState) -> Shared {
        self.tls = Some(tls);
        self
    }

    /// The embedded demo's signing key (see [`Shared::demo_key`]).
    pub fn with_demo_key(mut self, key: ed25519_dalek::SigningKey) -> Shared {
        self.demo_key = Some(key);
        self
    }

    pub fn auth(&self) -> Arc<AuthState> {
        self.auth
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn swap_auth(&self, new: AuthState) {
        *self.auth.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(new);
    }

    /// How long a revocation matters: a token issued before it lives at most this much
    /// longer (`auth.max_token_lifetime` plus `auth.leeway`), in milliseconds.
    pub fn revocation_horizon_ms(&self) -> u64 {
        (self.cfg.auth.max_token_lifetime + self.cfg.auth.leeway).as_millis() as u64
    }

    pub fn is_draining(&self) -> bool {
        self.node.draining.load(Ordering::Acquire)
    }

    /// Verify a token and check it against the revocation list (handshake, ticket, reauth).
    pub fn verify_token(&self, token: &str, now_ms: u64) -> Result<VerifiedClaims, AuthError> {
        let claims = self.auth().verifier.verify(token, now_ms / 1000)?;
        if self.revocation.revokes(&claims, now_ms) {
            return Err(AuthError::Revoked);
        }
        Ok(claims)
    }
}

impl ReauthVerifier for Shared {
    fn verify_reauth(&self, token: &str, now_unix_secs: u64) -> Result<VerifiedClaims, AuthError> {
        self.verify_token(token, now_unix_secs.saturating_mul(1000))
    }
}
