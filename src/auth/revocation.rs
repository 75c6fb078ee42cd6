//! Revocation list (PROTOCOL.md section 7).
//!
//! `POST /admin/revoke` names a `sub`, a `sid` or a `jti`. Afterwards:
//! - a token with a revoked `sid` or `jti` is refused;
//! - a token of a revoked `sub` is refused when it was issued (`iat`, seconds) at or before
//!   the revocation instant `R` (`iat * 1000 <= R`, so a token minted in the same second as
//!   the revocation is also refused: when in doubt, refuse). A token without `iat` cannot
//!   prove it is newer, so it is refused too. A token issued after `R` is valid again: that
//!   is how a user whose stolen session was revoked logs back in;
//! - revoking something again moves `R` forward (never back).
//!
//! # Bounded and self-expiring
//! Every token the verifier accepts satisfies `exp - iat <= max_token_lifetime` (or
//! `exp - now` for tokens without `iat`) and is accepted until `exp + leeway`. A token that a
//! revocation at `R` concerns was issued by `R`, so it is dead by
//! `R + max_token_lifetime + leeway`; after that instant the entry can change no decision and
//! is forgotten (`is_revoked` ignores it at once, `sweep` frees its memory). One caveat,
//! inherent to tokens without `iat`: such a token presented after the entry expired is
//! accepted, because nothing proves it predates the revocation; deployments that revoke
//! should issue `iat`.
//!
//! The list holds at most `max_entries` entries in total. When full (after sweeping expired
//! ones) a new revocation is *refused* with [`RevokeError::Full`] rather than evicting an
//! old one: silently un-revoking a stolen session is worse than telling the operator.
//! Re-revoking an existing entry always succeeds. A slot is reserved with an atomic counter
//! before insertion, so racing admin requests cannot overshoot.
//!
//! Three `DashMap`s (one per target kind) keep lookups on the handshake path to one shard
//! lock each; nothing here reads the clock. Propagation to other nodes is the caller's job.

use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

/// Longest identifier accepted in a revocation (bytes).
pub const MAX_ID_LEN: usize = 1024;
/// Longest `POST /admin/revoke` body accepted by [`RevokeTarget::from_admin_body`].
pub const MAX_BODY_LEN: usize = 4096;

/// What to revoke.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RevokeTarget {
    Sub(String),
    Sid(String),
    Jti(String),
}

impl RevokeTarget {
    /// `"sub"`, `"sid"` or `"jti"` (for logs and metrics).
    pub fn kind(&self) -> &'static str {
        match self {
            RevokeTarget::Sub(_) => "sub",
            RevokeTarget::Sid(_) => "sid",
            RevokeTarget::Jti(_) => "jti",
        }
    }

    /// The identifier.
    pub fn value(&self) -> &str {
        match self {
            RevokeTarget::Sub(v) | RevokeTarget::Sid(v) | RevokeTarget::Jti(v) => v,
        }
    }

    /// Whether a *live* connection with these claims must be closed with `4003`. Every live
    /// connection's token predates the revocation, so `iat` plays no part here.
    pub fn matches(&self, sub: &str, sid: Option<&str>, jti: Option<&str>) -> bool {
        match self {
            RevokeTarget::Sub(v) => v == sub,
            RevokeTarget::Sid(v) => sid == Some(v.as_str()),
            RevokeTarget::Jti(v) => jti == Some(v.as_str()),
        }
    }

    /// Parses the admin body: exactly one of `{"sub":..}`, `{"sid":..}`, `{"jti":..}` with a
    /// non-empty string of at most [`MAX_ID_LEN`] bytes; unknown fields are refused.
    pub fn from_admin_body(body: &[u8]) -> Result<Self, RevokeError> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Body {
            sub: Option<String>,
            sid: Option<String>,
            jti: Option<String>,
        }
        if body.len() > MAX_BODY_LEN {
            return Err(RevokeError::Invalid("body too large"));
        }
        let b: Body = serde_json::from_slice(body)
            .map_err(|_| RevokeError::Invalid("expected {\"sub\"|\"sid\"|\"jti\": string}"))?;
        let t = match (b.sub, b.sid, b.jti) {
            (Some(v), None, None) => RevokeTarget::Sub(v),
            (None, Some(v), None) => RevokeTarget::Sid(v),
            (None, None, Some(v)) => RevokeTarget::Jti(v),
            _ => return Err(RevokeError::Invalid("exactly one of sub, sid, jti")),
        };
        validate_id(t.value())?;
        Ok(t)
    }
}

/// Why a revocation was not recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RevokeError {
    /// The list is at `max_entries` live entries: answer `503` and alert.
    #[error("revocation list full")]
    Full,
    /// Empty or oversized identifier, or a malformed admin body: answer `400`.
    #[error("invalid revocation: {0}")]
    Invalid(&'static str),
}

fn validate_id(id: &str) -> Result<(), RevokeError> {
    if id.is_empty() {
        return Err(RevokeError::Invalid("empty identifier"));
    }
    if id.len() > MAX_ID_LEN {
        return Err(RevokeError::Invalid("identifier too long"));
    }
    Ok(())
}

/// Revoked subjects, sessions and token ids, shared by all shards.
#[derive(Debug)]
pub struct RevocationList {
    /// `max_token_lifetime + leeway`: an entry revoked at `R` matters until `R + this`.
    forget_after_ms: u64,
    max_entries: usize,
    /// Identifier -> revocation instant (unix ms, as passed in).
    subs: DashMap<String, u64>,
    sids: DashMap<String, u64>,
    jtis: DashMap<String, u64>,
    /// Entries plus insertions in flight, over all three maps.
    reserved: AtomicUsize,
}

impl RevocationList {
    /// See the module docs for how the bounds are used.
    pub fn new(max_token_lifetime_ms: u64, leeway_ms: u64, max_entries: usize) -> Self {
        RevocationList {
            forget_after_ms: max_token_lifetime_ms.saturating_add(leeway_ms),
            max_entries,
            subs: DashMap::new(),
            sids: DashMap::new(),
            jtis: DashMap::new(),
            reserved: AtomicUsize::new(0),
        }
    }

    fn map(&self, t: &RevokeTarget) -> &DashMap<String, u64> {
        match t {
            RevokeTarget::Sub(_) => &self.subs,
            RevokeTarget::Sid(_) => &self.sids,
            RevokeTarget::Jti(_) => &self.jtis,
        }
    }

    fn live(&self, revoked_at_ms: u64, now_ms: u64) -> bool {
        now_ms < revoked_at_ms.saturating_add(self.forget_after_ms)
    }

    /// Records a revocation at `now_ms`.
    pub fn revoke(&self, t: RevokeTarget, now_ms: u64) -> Result<(), RevokeError> {
        validate_id(t.value())?;
        let map = self.map(&t);
        if let Some(mut at) = map.get_mut(t.value()) {
            *at = (*at).max(now_ms);
            return Ok(());
        }
        if !self.try_reserve() {
            self.sweep(now_ms);
            if !self.try_reserve() {
                return Err(RevokeError::Full);
            }
        }
        let id = match t {
            RevokeTarget::Sub(v) | RevokeTarget::Sid(v) | RevokeTarget::Jti(v) => v,
        };
        match map.entry(id) {
            Entry::Occupied(mut e) => {
                self.reserved.fetch_sub(1, Ordering::AcqRel);
                let at = e.get_mut();
                *at = (*at).max(now_ms);
            }
            Entry::Vacant(v) => {
                v.insert(now_ms);
            }
        }
        Ok(())
    }

    fn try_reserve(&self) -> bool {
        self.reserved
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_entries).then_some(n + 1)
            })
            .is_ok()
    }

    /// Whether a token with these claims is revoked at `now_ms` (see the module docs).
    pub fn is_revoked(
        &self,
        sub: &str,
        sid: Option<&str>,
        jti: Option<&str>,
        iat_secs: Option<u64>,
        now_ms: u64,
    ) -> bool {
        let hit = |map: &DashMap<String, u64>, id: Option<&str>| {
            id.and_then(|id| map.get(id).map(|at| *at))
                .is_some_and(|at| self.live(at, now_ms))
        };
        if hit(&self.jtis, jti) || hit(&self.sids, sid) {
            return true;
        }
        let Some(revoked_at) = self.subs.get(sub).map(|at| *at) else {
            return false;
        };
        if !self.live(revoked_at, now_ms) {
            return false;
        }
        match iat_secs {
            None => true,
            Some(iat) => iat.saturating_mul(1000) <= revoked_at,
        }
    }

    /// The one revocation check of a verified token (handshake, ticket redemption,
    /// reauth): [`RevocationList::is_revoked`] on its `sub`, `sid`, `jti` and `iat`.
    pub fn revokes(&self, c: &crate::auth::jwt::VerifiedClaims, now_ms: u64) -> bool {
        self.is_revoked(&c.sub, c.sid.as_deref(), c.jti.as_deref(), c.iat, now_ms)
    }

    /// Forgets entries that can no longer change a decision; returns how many.
    pub fn sweep(&self, now_ms: u64) -> usize {
        let mut removed = 0usize;
        for map in [&self.subs, &self.sids, &self.jtis] {
            map.retain(|_, at| {
                let keep = self.live(*at, now_ms);
                if !keep {
                    removed += 1;
                }
                keep
            });
        }
        self.reserved.fetch_sub(removed, Ordering::AcqRel);
        removed
    }

    /// Entries held (live or awaiting a sweep).
    pub fn len(&self) -> usize {
        self.subs.len() + self.sids.len() + self.jtis.len()
    }

    /// Nothing is revoked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// When `t` was last revoked, if its entry is still held.
    pub fn revoked_at(&self, t: &RevokeTarget) -> Option<u64> {
        self.map(t).get(t.value()).map(|at| *at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const MIN15: u64 = 15 * 60 * 1000;
    const LEEWAY: u64 = 30_000;

    fn list() -> RevocationList {
        RevocationList::new(MIN15, LEEWAY, 100)
    }

    #[test]
    fn sid_and_jti_are_revoked_regardless_of_iat() {
        let l = list();
        let now = 1_700_000_000_000;
        l.revoke(RevokeTarget::Sid("s-1".into()), now).unwrap();
        l.revoke(RevokeTarget::Jti("j-1".into()), now).unwrap();
        let later_iat = Some(now / 1000 + 60);
        assert!(l.is_revoked("alice", Some("s-1"), None, later_iat, now + 1));
        assert!(l.is_revoked("alice", None, Some("j-1"), later_iat, now + 1));
        assert!(l.is_revoked("bob", Some("s-2"), Some("j-1"), None, now + 1));
        assert!(!l.is_revoked("alice", Some("s-2"), Some("j-2"), later_iat, now + 1));
        assert!(!l.is_revoked("alice", None, None, None, now + 1));
        // A sid value is not a sub value.
        assert!(!l.is_revoked("s-1", None, None, None, now + 1));
    }

    #[test]
    fn sub_respects_iat() {
        let l = list();
        let r = 1_700_000_000_500; // revoked half-way through second 1_700_000_000
        l.revoke(RevokeTarget::Sub("alice".into()), r).unwrap();
        assert!(l.is_revoked("alice", None, None, Some(1_699_999_000), r));
        // Same second as the revocation: iat*1000 <= R, refused.
        assert!(l.is_revoked("alice", None, None, Some(1_700_000_000), r));
        // Issued after the revocation: valid again.
        assert!(!l.is_revoked("alice", None, None, Some(1_700_000_001), r + 1_000));
        // No iat: cannot prove it is newer.
        assert!(l.is_revoked("alice", None, None, None, r + 1_000));
        assert!(!l.is_revoked("bob", None, None, None, r));
        // Absurd iat values do not overflow.
        assert!(!l.is_revoked("alice", None, None, Some(u64::MAX), r));
        assert!(l.is_revoked("alice", None, None, Some(0), r));
    }

    #[test]
    fn re_revoking_moves_the_instant_forward_only() {
        let l = list();
        l.revoke(RevokeTarget::Sub("alice".into()), 10_000_000).unwrap();
        assert!(!l.is_revoked("alice", None, None, Some(10_001), 10_002_000));
        l.revoke(RevokeTarget::Sub("alice".into()), 10_005_000).unwrap();
        assert!(l.is_revoked("alice", None, None, Some(10_001), 10_006_000));
        l.revoke(RevokeTarget::Sub("alice".into()), 1_000).unwrap();
        assert_eq!(l.revoked_at(&RevokeTarget::Sub("alice".into())), Some(10_005_000));
        assert_eq!(l.len(), 1);
    }

    #[test]
    fn entries_expire_after_lifetime_plus_leeway() {
        let l = list();
        let r = 1_000_000;
        l.revoke(RevokeTarget::Jti("j".into()), r).unwrap();
        l.revoke(RevokeTarget::Sub("alice".into()), r).unwrap();
        let end = r + MIN15 + LEEWAY;
        assert!(l.is_revoked("x", None, Some("j"), None, end - 1));
        assert!(l.is_revoked("alice", None, None, Some(1), end - 1));
        // From `end` on, the entries are ignored even before a sweep.
        assert!(!l.is_revoked("x", None, Some("j"), None, end));
        assert!(!l.is_revoked("alice", None, None, Some(1), end));
        assert_eq!(l.sweep(end - 1), 0);
        assert_eq!(l.len(), 2);
        assert_eq!(l.sweep(end), 2);
        assert!(l.is_empty());
    }

    #[test]
    fn bounded_refuses_new_entries_when_full() {
        let l = RevocationList::new(1_000, 0, 3);
        l.revoke(RevokeTarget::Sub("a".into()), 0).unwrap();
        l.revoke(RevokeTarget::Sid("b".into()), 0).unwrap();
        l.revoke(RevokeTarget::Jti("c".into()), 500).unwrap();
        assert_eq!(
            l.revoke(RevokeTarget::Sub("d".into()), 500),
            Err(RevokeError::Full)
        );
        // Old entries are kept, not evicted.
        assert!(l.is_revoked("a", None, None, None, 500));
        // Refreshing an existing entry still works when full.
        l.revoke(RevokeTarget::Sub("a".into()), 600).unwrap();
        // Once the old ones expire, `revoke` sweeps them and makes room.
        l.revoke(RevokeTarget::Sub("d".into()), 1_000).unwrap();
        assert_eq!(l.len(), 3); // a (refreshed at 600), c (500), d
        assert!(l.is_revoked("d", None, None, Some(0), 1_000));
        assert!(!l.is_revoked("z", Some("b"), None, None, 1_000));
    }

    #[test]
    fn invalid_ids_are_refused() {
        let l = list();
        assert!(matches!(
            l.revoke(RevokeTarget::Sub(String::new()), 0),
            Err(RevokeError::Invalid(_))
        ));
        assert!(matches!(
            l.revoke(RevokeTarget::Jti("x".repeat(MAX_ID_LEN + 1)), 0),
            Err(RevokeError::Invalid(_))
        ));
        assert!(l.is_empty());
    }

    #[test]
    fn admin_body_parsing() {
        assert_eq!(
            RevokeTarget::from_admin_body(br#"{"sub":"alice"}"#),
            Ok(RevokeTarget::Sub("alice".into()))
        );
        assert_eq!(
            RevokeTarget::from_admin_body(br#"{"sid":"s-1"}"#),
            Ok(RevokeTarget::Sid("s-1".into()))
        );
        assert_eq!(
            RevokeTarget::from_admin_body(br#"{"jti":"j"}"#),
            Ok(RevokeTarget::Jti("j".into()))
        );
        for bad in [
            &br#"{}"#[..],
            br#"{"sub":"a","sid":"b"}"#,
            br#"{"sub":""}"#,
            br#"{"sub":1}"#,
            br#"{"user":"a"}"#,
            br#"["sub"]"#,
            b"",
            b"\xff",
        ] {
            assert!(RevokeTarget::from_admin_body(bad).is_err(), "{bad:?}");
        }
        let huge = format!(r#"{{"sub":"{}"}}"#, "a".repeat(MAX_BODY_LEN));
        assert!(RevokeTarget::from_admin_body(huge.as_bytes()).is_err());
    }

    #[test]
    fn target_matches_live_connections() {
        let t = RevokeTarget::Sub("alice".into());
        assert!(t.matches("alice", Some("s"), None));
        assert!(!t.matches("bob", None, None));
        let t = RevokeTarget::Sid("s-1".into());
        assert!(t.matches("x", Some("s-1"), None));
        assert!(!t.matches("s-1", None, None));
        let t = RevokeTarget::Jti("j".into());
        assert!(t.matches("x", None, Some("j")));
        assert_eq!((t.kind(), t.value()), ("jti", "j"));
    }

    #[test]
    fn concurrent_revokes_respect_the_bound() {
        let l = Arc::new(RevocationList::new(MIN15, LEEWAY, 50));
        let handles: Vec<_> = (0..8)
            .map(|t| {
                let l = l.clone();
                std::thread::spawn(move || {
                    (0..40)
                        .filter(|i| l.revoke(RevokeTarget::Jti(format!("{t}-{i}")), 0).is_ok())
                        .count()
                })
            })
            .collect();
        let ok: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(ok, 50);
        assert_eq!(l.len(), 50);
    }
}
