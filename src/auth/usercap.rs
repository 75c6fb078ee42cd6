//! Per-user concurrent connection cap across all shards (PROTOCOL.md section 2, check 6;
//! OPS.md `limits.per_user_max_connections`).
//!
//! A slot is an RAII guard: [`acquire`] returns a [`UserSlot`] that the connection owns, and
//! its `Drop` gives the slot back. Whatever way a connection ends (normal close, error,
//! panic unwinding, shard shutdown dropping its connections), the count goes down exactly
//! once, so a cap can never leak and lock a user out.
//!
//! Counts live in a `DashMap<String, usize>`: acquire and release each touch one map shard,
//! and the check-and-increment happens under that shard's lock, so racing shards can never
//! push a user past the cap. An entry is removed when its count drops to zero
//! (`remove_if_mut` decrements and removes atomically), so memory follows live users only.
//! A cap of 0 means unlimited; counts are still kept (they feed metrics and revocation).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;

/// Live connection counts per user.
pub struct UserCaps {
    max_per_user: usize,
    counts: DashMap<String, usize>,
    total: AtomicUsize,
}

impl fmt::Debug for UserCaps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserCaps")
            .field("max_per_user", &self.max_per_user)
            .field("users", &self.counts.len())
            .field("total", &self.total())
            .finish()
    }
}

impl UserCaps {
    /// `max_per_user` live connections per user (0 = unlimited).
    pub fn new(max_per_user: usize) -> Arc<Self> {
        Arc::new(UserCaps {
            max_per_user,
            counts: DashMap::new(),
            total: AtomicUsize::new(0),
        })
    }

    /// Live connections of `user`.
    pub fn count(&self, user: &str) -> usize {
        self.counts.get(user).map_or(0, |c| *c)
    }

    /// Live connections of all users.
    pub fn total(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }

    /// Users with at least one live connection.
    pub fn users(&self) -> usize {
        self.counts.len()
    }

    /// The configured cap (0 = unlimited).
    pub fn max_per_user(&self) -> usize {
        self.max_per_user
    }

    fn release(&self, user: &str) {
        // The closure decrements under the shard lock and asks for removal at zero, so a
        // concurrent acquire sees either the old count or no entry, never a stale zero.
        self.counts.remove_if_mut(user, |_, c| {
            *c = c.saturating_sub(1);
            *c == 0
        });
        self.total.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One live connection's claim on its user's cap. Dropping it releases the claim.
pub struct UserSlot {
    caps: Arc<UserCaps>,
    user: String,
}

impl UserSlot {
    /// The user this slot counts against.
    pub fn user(&self) -> &str {
        &self.user
    }
}

impl fmt::Debug for UserSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserSlot").field("user", &self.user).finish()
    }
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        self.caps.release(&self.user);
    }
}

/// Claims a slot for `user`, or `None` when the user is at the cap (answer `429`).
pub fn acquire(caps: &Arc<UserCaps>, user: &str) -> Option<UserSlot> {
    let max = caps.max_per_user;
    // Fast path without allocating the key: the user already has connections.
    let admitted = match caps.counts.get_mut(user) {
        Some(mut c) => {
            if max != 0 && *c >= max {
                return None;
            }
            *c += 1;
            true
        }
        None => false,
    };
    if !admitted {
        let mut c = caps.counts.entry(user.to_owned()).or_insert(0);
        // Another shard may have created the entry and filled it meanwhile.
        if max != 0 && *c >= max {
            return None;
        }
        *c += 1;
    }
    caps.total.fetch_add(1, Ordering::AcqRel);
    Some(UserSlot {
        caps: Arc::clone(caps),
        user: user.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_and_release_on_drop() {
        let caps = UserCaps::new(2);
        let a = acquire(&caps, "alice").unwrap();
        let b = acquire(&caps, "alice").unwrap();
        assert!(acquire(&caps, "alice").is_none());
        assert_eq!(caps.count("alice"), 2);
        // Other users are independent.
        let c = acquire(&caps, "bob").unwrap();
        assert_eq!(caps.total(), 3);
        drop(a);
        assert_eq!(caps.count("alice"), 1);
        let a2 = acquire(&caps, "alice").unwrap();
        assert!(acquire(&caps, "alice").is_none());
        drop((a2, b, c));
        assert_eq!(caps.count("alice"), 0);
        assert_eq!(caps.count("bob"), 0);
        assert_eq!(caps.total(), 0);
        assert_eq!(caps.users(), 0, "entries are removed at zero");
    }

    #[test]
    fn zero_means_unlimited_but_counted() {
        let caps = UserCaps::new(0);
        let slots: Vec<_> = (0..1_000).map(|_| acquire(&caps, "u").unwrap()).collect();
        assert_eq!(caps.count("u"), 1_000);
        assert_eq!(caps.max_per_user(), 0);
        drop(slots);
        assert_eq!(caps.count("u"), 0);
        assert_eq!(caps.users(), 0);
    }

    #[test]
    fn released_on_panic_unwind() {
        let caps = UserCaps::new(1);
        let c2 = caps.clone();
        let r = std::thread::spawn(move || {
            let _slot = acquire(&c2, "carol").unwrap();
            panic!("connection task failed");
        })
        .join();
        assert!(r.is_err());
        assert_eq!(caps.count("carol"), 0);
        assert!(acquire(&caps, "carol").is_some());
    }

    #[test]
    fn slot_outlives_nothing_it_needs() {
        // The slot holds its own Arc, so dropping every other handle first is fine.
        let caps = UserCaps::new(1);
        let slot = acquire(&caps, "dave").unwrap();
        assert_eq!(slot.user(), "dave");
        drop(caps);
        drop(slot);
    }

    #[test]
    fn concurrent_acquire_never_exceeds_cap() {
        let caps = UserCaps::new(5);
        let barrier = Arc::new(std::sync::Barrier::new(8));
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let caps = caps.clone();
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    barrier.wait();
                    let mut held = Vec::new();
                    let mut max_seen = 0;
                    for i in 0..2_000 {
                        if let Some(s) = acquire(&caps, "eve") {
                            held.push(s);
                        }
                        max_seen = max_seen.max(caps.count("eve"));
                        if i % 3 == 0 {
                            held.pop();
                        }
                    }
                    (held, max_seen)
                })
            })
            .collect();
        let mut all = Vec::new();
        for h in handles {
            let (held, max_seen) = h.join().unwrap();
            assert!(max_seen <= 5, "{max_seen}");
            all.extend(held);
        }
        assert!(all.len() <= 5);
        assert_eq!(caps.count("eve"), all.len());
        assert_eq!(caps.total(), all.len());
        drop(all);
        assert_eq!(caps.count("eve"), 0);
        assert_eq!(caps.total(), 0);
        assert_eq!(caps.users(), 0);
    }
}
