//! One-time tickets (PROTOCOL.md section 3).
//!
//! Browsers cannot set `Authorization` on a WebSocket, and a bearer token in a query string
//! ends up in proxy logs. `POST /v1/ticket` therefore trades a token for a short-lived,
//! single-use ticket that the page puts in `?ticket=`: a logged ticket is worthless after
//! its first use or after its TTL.
//!
//! - A ticket is 192 bits from `ring::rand::SystemRandom` (the brief asks for at least 128),
//!   encoded base64url without padding: exactly [`TICKET_LEN`] characters. 24 bytes encode to
//!   32 characters with no leftover bits, so each ticket has exactly one spelling.
//! - The store is keyed by the decoded bytes. `redeem` first checks length and alphabet, so
//!   garbage never reaches the map, then removes the entry with `DashMap::remove`: the
//!   removal is atomic, so when two shards race on one ticket exactly one of them gets it.
//! - Memory is bounded by `max_tickets`, enforced with an atomic reservation counter taken
//!   before insertion (no overshoot under concurrency). When full, `issue` first sweeps
//!   expired tickets and only then refuses with [`TicketError::Full`].
//! - The payload (identity, entitlements, bindings of the originating token) is the caller's
//!   type; the store never logs or prints tickets (`Debug` shows counts only).

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use ring::rand::{SecureRandom, SystemRandom};

/// Random bytes per ticket.
pub const TICKET_BYTES: usize = 24;
/// Length of a ticket string.
pub const TICKET_LEN: usize = 32;

/// Why a ticket could not be issued or redeemed. Every redeem error is a `401`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    #[error("too many outstanding tickets")]
    Full,
    #[error("ticket expired")]
    Expired,
    #[error("unknown or already used ticket")]
    Unknown,
    /// Wrong length or alphabet: rejected without a lookup.
    #[error("malformed ticket")]
    Malformed,
    #[error("random number generator failure")]
    Rng,
}

/// What a ticket stands for until it is redeemed.
#[derive(Clone, Debug)]
pub struct TicketGrant<T: Clone> {
    pub payload: T,
    pub expires_at_ms: u64,
}

/// Outstanding tickets, shared by all shards.
pub struct TicketStore<T: Clone + Send + Sync> {
    ttl_ms: u64,
    max_tickets: usize,
    tickets: DashMap<[u8; TICKET_BYTES], TicketGrant<T>>,
    /// Live tickets plus insertions in flight; always >= `tickets.len()`.
    reserved: AtomicUsize,
    rng: SystemRandom,
}

impl<T: Clone + Send + Sync> fmt::Debug for TicketStore<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TicketStore")
            .field("ttl_ms", &self.ttl_ms)
            .field("max_tickets", &self.max_tickets)
            .field("len", &self.tickets.len())
            .finish()
    }
}

impl<T: Clone + Send + Sync> TicketStore<T> {
    /// `ttl_ms` is the ticket lifetime (config bounds it to 60 s; 0 is taken as 1 ms),
    /// `max_tickets` the most live tickets held at once.
    pub fn new(ttl_ms: u64, max_tickets: usize) -> Self {
        TicketStore {
            ttl_ms: ttl_ms.max(1),
            max_tickets,
            tickets: DashMap::new(),
            reserved: AtomicUsize::new(0),
            rng: SystemRandom::new(),
        }
    }

    /// Issues a ticket valid for the TTL from `now_ms`.
    pub fn issue(&self, payload: T, now_ms: u64) -> Result<String, TicketError> {
        self.issue_until(payload, now_ms, u64::MAX)
    }

    /// Like [`issue`](Self::issue), but the ticket also expires no later than
    /// `not_after_ms` (pass the originating token's `exp`, so a ticket never outlives it).
    pub fn issue_until(&self, payload: T, now_ms: u64, not_after_ms: u64) -> Result<String, TicketError> {
        let expires_at_ms = now_ms.saturating_add(self.ttl_ms).min(not_after_ms);
        if expires_at_ms <= now_ms {
            return Err(TicketError::Expired);
        }
        if !self.try_reserve() {
            self.sweep(now_ms);
            if !self.try_reserve() {
                return Err(TicketError::Full);
            }
        }
        let grant = TicketGrant {
            payload,
            expires_at_ms,
        };
        // A collision of 192 random bits does not happen; the loop only makes sure a
        // broken RNG cannot overwrite a live ticket.
        for _ in 0..4 {
            let mut bytes = [0u8; TICKET_BYTES];
            if self.rng.fill(&mut bytes).is_err() {
                break;
            }
            if let Entry::Vacant(v) = self.tickets.entry(bytes) {
                v.insert(grant);
                return Ok(URL_SAFE_NO_PAD.encode(bytes));
            }
        }
        self.reserved.fetch_sub(1, Ordering::AcqRel);
        Err(TicketError::Rng)
    }

    fn try_reserve(&self) -> bool {
        self.reserved
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_tickets).then_some(n + 1)
            })
            .is_ok()
    }

    /// Consumes a ticket: the first valid redeem gets the payload, every later one `Unknown`.
    /// Valid while `now_ms < expires_at_ms`.
    pub fn redeem(&self, ticket: &str, now_ms: u64) -> Result<T, TicketError> {
        let key = decode_ticket(ticket).ok_or(TicketError::Malformed)?;
        let (_, grant) = self.tickets.remove(&key).ok_or(TicketError::Unknown)?;
        self.reserved.fetch_sub(1, Ordering::AcqRel);
        if now_ms >= grant.expires_at_ms {
            return Err(TicketError::Expired);
        }
        Ok(grant.payload)
    }

    /// `[cluster]`: holds `ticket` (issued by another node, just taken from the bus) for
    /// one redemption here. False when malformed, already held, or the store is full.
    pub fn admit(&self, ticket: &str, payload: T, expires_at_ms: u64) -> bool {
        let Some(key) = decode_ticket(ticket) else {
            return false;
        };
        if !self.try_reserve() {
            return false;
        }
        match self.tickets.entry(key) {
            Entry::Vacant(v) => {
                v.insert(TicketGrant {
                    payload,
                    expires_at_ms,
                });
                true
            }
            Entry::Occupied(_) => {
                self.reserved.fetch_sub(1, Ordering::AcqRel);
                false
            }
        }
    }

    /// `[cluster]`: drops `ticket` here (it was taken on another node, or the bus cannot
    /// say): it is never redeemed twice.
    pub fn forget(&self, ticket: &str) {
        if let Some(key) = decode_ticket(ticket)
            && self.tickets.remove(&key).is_some()
        {
            self.reserved.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Whether `ticket` is held here.
    pub fn holds(&self, ticket: &str) -> bool {
        decode_ticket(ticket).is_some_and(|k| self.tickets.contains_key(&k))
    }

    /// Removes expired tickets; returns how many.
    pub fn sweep(&self, now_ms: u64) -> usize {
        let mut removed = 0usize;
        self.tickets.retain(|_, g| {
            let keep = now_ms < g.expires_at_ms;
            if !keep {
                removed += 1;
            }
            keep
        });
        self.reserved.fetch_sub(removed, Ordering::AcqRel);
        removed
    }

    /// Live (not yet redeemed or swept) tickets.
    pub fn len(&self) -> usize {
        self.tickets.len()
    }

    /// No ticket is held.
    pub fn is_empty(&self) -> bool {
        self.tickets.is_empty()
    }

    /// The configured TTL (for `expires_in` in the response).
    pub fn ttl_ms(&self) -> u64 {
        self.ttl_ms
    }
}

/// Checks length and alphabet before decoding, so attacker input costs nothing.
fn decode_ticket(ticket: &str) -> Option<[u8; TICKET_BYTES]> {
    if ticket.len() != TICKET_LEN
        || !ticket
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return None;
    }
    let mut out = [0u8; TICKET_BYTES];
    match URL_SAFE_NO_PAD.decode_slice(ticket, &mut out) {
        Ok(TICKET_BYTES) => Some(out),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[derive(Clone, Debug, PartialEq)]
    struct Who {
        sub: String,
    }

    fn who(s: &str) -> Who {
        Who { sub: s.into() }
    }

    #[test]
    fn issue_and_redeem_once() {
        let s = TicketStore::new(30_000, 10);
        let t = s.issue(who("alice"), 1_000).unwrap();
        assert_eq!(t.len(), TICKET_LEN);
        assert!(
            t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        assert_eq!(s.len(), 1);
        assert_eq!(s.redeem(&t, 2_000), Ok(who("alice")));
        assert_eq!(s.redeem(&t, 2_001), Err(TicketError::Unknown));
        assert_eq!(s.len(), 0);
        assert_eq!(s.ttl_ms(), 30_000);
    }

    #[test]
    fn tickets_are_distinct_and_random() {
        let s = TicketStore::new(30_000, 1_000);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1_000 {
            assert!(seen.insert(s.issue((), 0).unwrap()));
        }
        assert_eq!(s.len(), 1_000);
    }

    #[test]
    fn expiry_boundary() {
        let s = TicketStore::new(30_000, 10);
        let t = s.issue(1u32, 0).unwrap();
        assert_eq!(s.redeem(&t, 29_999), Ok(1));
        let t = s.issue(2u32, 0).unwrap();
        assert_eq!(s.redeem(&t, 30_000), Err(TicketError::Expired));
        // Expired tickets are removed too.
        assert_eq!(s.redeem(&t, 30_000), Err(TicketError::Unknown));
        assert!(s.is_empty());
    }

    #[test]
    fn issue_until_caps_at_token_expiry() {
        let s = TicketStore::new(30_000, 10);
        let t = s.issue_until(7u8, 0, 5_000).unwrap();
        assert_eq!(s.redeem(&t, 5_000), Err(TicketError::Expired));
        assert_eq!(s.issue_until(7u8, 5_000, 5_000), Err(TicketError::Expired));
        assert!(s.is_empty());
    }

    #[test]
    fn malformed_tickets_are_rejected_before_lookup() {
        let s = TicketStore::new(30_000, 10);
        let t = s.issue((), 0).unwrap();
        let too_long = format!("{t}A");
        let bad = [
            "",
            "short",
            &t[..TICKET_LEN - 1],
            too_long.as_str(),
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA+",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA/",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA ",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAé",
        ];
        for b in bad {
            assert_eq!(s.redeem(b, 0), Err(TicketError::Malformed), "{b:?}");
        }
        assert_eq!(
            s.redeem("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", 0),
            Err(TicketError::Unknown)
        );
        // The real ticket survived all of that.
        assert_eq!(s.redeem(&t, 1), Ok(()));
    }

    #[test]
    fn full_store_refuses_then_recovers_by_expiry_and_use() {
        let s = TicketStore::new(1_000, 3);
        let a = s.issue(1, 0).unwrap();
        s.issue(2, 0).unwrap();
        s.issue(3, 500).unwrap();
        assert_eq!(s.issue(4, 500), Err(TicketError::Full));
        assert_eq!(s.redeem(&a, 600), Ok(1));
        let d = s.issue(4, 600).unwrap();
        assert_eq!(s.issue(5, 600), Err(TicketError::Full));
        // At 1000 the remaining ticket from t=0 expired: issue sweeps it opportunistically.
        s.issue(5, 1_000).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s.issue(6, 1_000), Err(TicketError::Full));
        assert_eq!(s.redeem(&d, 1_001), Ok(4));
    }

    #[test]
    fn sweep_removes_expired_only() {
        let s = TicketStore::new(1_000, 10);
        s.issue((), 0).unwrap();
        s.issue((), 0).unwrap();
        let keep = s.issue((), 500).unwrap();
        assert_eq!(s.sweep(999), 0);
        assert_eq!(s.sweep(1_000), 2);
        assert_eq!(s.len(), 1);
        assert_eq!(s.redeem(&keep, 1_400), Ok(()));
        // Slots came back.
        for _ in 0..10 {
            s.issue((), 2_000).unwrap();
        }
        assert_eq!(s.issue((), 2_000), Err(TicketError::Full));
    }

    #[test]
    fn concurrent_redeem_exactly_one_wins() {
        for _ in 0..20 {
            let s = Arc::new(TicketStore::new(30_000, 10));
            let t = Arc::new(s.issue(who("bob"), 0).unwrap());
            let barrier = Arc::new(std::sync::Barrier::new(8));
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    let (s, t, barrier) = (s.clone(), t.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        s.redeem(&t, 1)
                    })
                })
                .collect();
            let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
            assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1);
            assert!(
                results
                    .iter()
                    .all(|r| r.is_ok() || *r == Err(TicketError::Unknown))
            );
        }
    }

    #[test]
    fn concurrent_issue_never_exceeds_bound() {
        let s = Arc::new(TicketStore::new(30_000, 100));
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let s = s.clone();
                std::thread::spawn(move || (0..50).filter(|_| s.issue((), 0).is_ok()).count())
            })
            .collect();
        let ok: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(ok, 100);
        assert_eq!(s.len(), 100);
    }

    #[test]
    fn debug_does_not_print_tickets() {
        let s = TicketStore::new(30_000, 10);
        let t = s.issue(who("carol"), 0).unwrap();
        let dbg = format!("{s:?}");
        assert!(!dbg.contains(&t));
        assert!(!dbg.contains("carol"));
    }
}
