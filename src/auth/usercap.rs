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
    /// `[cluster]`: the other nodes' counts, and who hears of this node's changes.
    cluster: std::sync::OnceLock<ClusterCounts>,
}

/// Tells the bus a user's count on this node changed: `(user, count)`.
pub type OnChange = Box<dyn Fn(&str, usize) + Send + Sync>;

/// `[cluster]`: the counts the other nodes announce (a count per user per node, each
/// good until its expiry unless announced again), summed at admission.
pub struct ClusterCounts {
    remote: DashMap<String, Vec<RemoteCount>>,
    entries: AtomicUsize,
    max_entries: usize,
    on_change: OnChange,
}

#[derive(Debug, Clone)]
struct RemoteCount {
    node: Box<str>,
    count: usize,
    expires_ms: u64,
}

/// The key a user's count travels under on the bus: the first 32 hex digits of the
/// SHA-256 of its `sub` (the `sub` itself is not published).
pub fn user_key(user: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, user.as_bytes());
    let mut out = String::with_capacity(32);
    for b in &d.as_ref()[..16] {
        use std::fmt::Write;
        let _ = write!(out, "{b:02x}");
    }
    out
}

impl ClusterCounts {
    /// The count `node` announced for the user with key `key`, good until `expires_ms`
    /// (0 removes it). False when the table is at its bound (the count is not kept).
    pub fn set(&self, key: &str, node: &str, count: usize, expires_ms: u64) -> bool {
        if count == 0 {
            let mut emptied = false;
            if let Some(mut v) = self.remote.get_mut(key) {
                let before = v.len();
                v.retain(|r| &*r.node != node);
                self.entries.fetch_sub(before - v.len(), Ordering::AcqRel);
                emptied = v.is_empty();
            }
            if emptied {
                self.remote.remove_if(key, |_, v| v.is_empty());
            }
            return true;
        }
        let mut v = self.remote.entry(key.to_owned()).or_default();
        if let Some(r) = v.iter_mut().find(|r| &*r.node == node) {
            r.count = count;
            r.expires_ms = expires_ms;
            return true;
        }
        if self.entries.load(Ordering::Acquire) >= self.max_entries {
            return false;
        }
        self.entries.fetch_add(1, Ordering::AcqRel);
        v.push(RemoteCount {
            node: Box::from(node),
            count,
            expires_ms,
        });
        true
    }

    /// The other nodes' live connections of the user with key `key` at `now_ms`.
    pub fn sum(&self, key: &str, now_ms: u64) -> usize {
        self.remote.get(key).map_or(0, |v| {
            v.iter().filter(|r| r.expires_ms > now_ms).map(|r| r.count).sum()
        })
    }

    /// Drops expired counts (a node that stopped announcing: crashed, or cut off).
    pub fn sweep(&self, now_ms: u64) {
        let mut dropped = 0;
        self.remote.retain(|_, v| {
            let before = v.len();
            v.retain(|r| r.expires_ms > now_ms);
            dropped += before - v.len();
            !v.is_empty()
        });
        self.entries.fetch_sub(dropped, Ordering::AcqRel);
    }

    /// Counts held (users x nodes).
    pub fn len(&self) -> usize {
        self.entries.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
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
            cluster: std::sync::OnceLock::new(),
        })
    }

    /// `[cluster]`: from now on admission adds the other nodes' counts, and `on_change`
    /// hears of every change of a count here. Once.
    pub fn enable_cluster(&self, max_entries: usize, on_change: OnChange) {
        let _ = self.cluster.set(ClusterCounts {
            remote: DashMap::new(),
            entries: AtomicUsize::new(0),
            max_entries,
            on_change,
        });
    }

    /// The other nodes' counts (`[cluster]` only).
    pub fn cluster(&self) -> Option<&ClusterCounts> {
        self.cluster.get()
    }

    /// Every user with live connections here and their count (to announce them again).
    pub fn snapshot(&self) -> Vec<(String, usize)> {
        self.counts
            .iter()
            .map(|e| (e.key().clone(), *e.value()))
            .collect()
    }

    fn changed(&self, user: &str) {
        if let Some(c) = self.cluster.get() {
            (c.on_change)(user, self.count(user));
        }
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
        self.changed(user);
    }
}

/// One live connection's claim on its user's cap. Dropping it releases the claim.
pub struct UserSlot {
    caps: Arc<UserCaps>,
    /// Boxed, not a `String`: 8 bytes less in every connection (see the connection's
    /// size-class test in `rt::ctx`).
    user: Box<str>,
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
    acquire_at(caps, user, 0)
}

/// As [`acquire`]; with `[cluster]` the other nodes' live counts at `now_ms` count too.
/// Two nodes admitting the same user's last slot within one announcement's flight time
/// (well under a millisecond on a LAN) may both admit it: the cap can be exceeded by at
/// most one per other node in such a race.
pub fn acquire_at(caps: &Arc<UserCaps>, user: &str, now_ms: u64) -> Option<UserSlot> {
    let others = match caps.cluster.get() {
        Some(c) if caps.max_per_user != 0 => c.sum(&user_key(user), now_ms),
        _ => 0,
    };
    let max = caps.max_per_user.saturating_sub(others);
    if caps.max_per_user != 0 && max == 0 {
        return None;
    }
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
    caps.changed(user);
    Some(UserSlot {
        caps: Arc::clone(caps),
        user: Box::from(user),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_nodes_counts_are_summed_until_they_expire() {
        let caps = UserCaps::new(3);
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let s2 = seen.clone();
        caps.enable_cluster(
            2,
            Box::new(move |u, n| s2.lock().unwrap().push((u.to_owned(), n))),
        );
        let k = user_key("alice");
        let c = caps.cluster().unwrap();
        assert!(c.set(&k, "node-b", 2, 1_000));
        let a = acquire_at(&caps, "alice", 500).expect("2 there + 1 here = 3");
        assert!(
            acquire_at(&caps, "alice", 500).is_none(),
            "the cap counts node-b's two"
        );
        // node-b's count expires (it crashed): the slots come back.
        let b = acquire_at(&caps, "alice", 1_000).expect("node-b's count expired");
        drop((a, b));
        assert_eq!(
            *seen.lock().unwrap(),
            vec![
                ("alice".into(), 1),
                ("alice".into(), 2),
                ("alice".into(), 1),
                ("alice".into(), 0)
            ]
        );
        // Bounded: a third (user, node) pair is not kept; 0 removes.
        assert!(c.set(&k, "node-c", 1, 2_000));
        assert!(!c.set(&user_key("bob"), "node-b", 1, 2_000));
        assert!(c.set(&k, "node-c", 0, 0));
        c.sweep(5_000);
        assert!(c.is_empty());
    }

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
