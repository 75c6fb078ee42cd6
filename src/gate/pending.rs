//! The shard's table of connections still in the HTTP upgrade: who may wait for a `101`,
//! and who gives way when the table is full. Sans-IO: the runtime calls
//! [`PendingTable::admit`] at accept, [`PendingTable::heard`] when the first byte arrives and
//! [`PendingTable::remove`] when the upgrade ends (`101`, a rejection, a timeout or an
//! eviction), and carries out what the table answers (close this socket, re-arm that
//! deadline).
//!
//! # Why
//!
//! A socket that connects and sends nothing costs a slot until its deadline. With a plain
//! first-come bound (`server.pending_handshakes_per_shard`), a few thousand silent sockets
//! from one address fill every slot, and each newcomer is refused until they time out: one
//! client locks everyone out without ever presenting a token. So:
//!
//! - **a per-IP bound** (`limits.per_ip_pending_handshakes`): an address holding that many
//!   pending upgrades on this shard cannot open another; sockets from a trusted proxy
//!   (`auth.trusted_proxies`) are exempt, since they carry many clients whose addresses are
//!   only known from the request's forwarding headers;
//! - **eviction instead of refusal**: when the table is full, the address holding most of
//!   it loses its oldest silent socket (no byte received), or its oldest socket when none is
//!   silent, and the newcomer takes the place. A flood only ever displaces itself while other
//!   addresses hold fewer slots than it;
//! - **a first-byte deadline** (`limits.first_byte_timeout`, enforced by the runtime's
//!   handshake timer): a socket that sends nothing is closed early; the first byte moves the
//!   deadline to `handshake_timeout` after accept, which arriving bytes never extend.
//!
//! Memory is bounded by the table's capacity: one entry per pending socket, one counter per
//! address that holds at least one.

use std::collections::HashMap;
use std::net::IpAddr;

/// The table's bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingLimits {
    /// Pending upgrades on the shard (`server.pending_handshakes_per_shard`).
    pub max: usize,
    /// Pending upgrades per client address on the shard (`limits.per_ip_pending_handshakes`).
    pub per_ip: usize,
}

/// What the runtime must do with a new socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Go ahead.
    Admit,
    /// Go ahead, and close the pending socket `idx` (of address `ip`) to make room.
    Evict { idx: usize, ip: IpAddr },
    /// The address already holds its share: close the new socket.
    RefuseIp,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    ip: IpAddr,
    /// Accept order, for "oldest" (times can tie; this cannot).
    order: u64,
    /// A byte has arrived.
    heard: bool,
}

/// Connections in the HTTP upgrade on one shard, keyed by the runtime's connection index.
#[derive(Debug)]
pub struct PendingTable {
    limits: PendingLimits,
    entries: HashMap<usize, Entry>,
    per_ip: HashMap<IpAddr, u32>,
    next_order: u64,
}

impl PendingTable {
    pub fn new(limits: PendingLimits) -> Self {
        PendingTable {
            limits: PendingLimits {
                max: limits.max.max(1),
                per_ip: limits.per_ip.max(1),
            },
            entries: HashMap::new(),
            per_ip: HashMap::new(),
            next_order: 0,
        }
    }

    /// Pending upgrades now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Pending upgrades of `ip` now.
    pub fn of_ip(&self, ip: IpAddr) -> usize {
        self.per_ip.get(&ip).map_or(0, |&n| n as usize)
    }

    /// The address of a pending socket.
    pub fn ip_of(&self, idx: usize) -> Option<IpAddr> {
        self.entries.get(&idx).map(|e| e.ip)
    }

    /// A new socket `idx` from `ip` (the socket peer). `trusted`: the peer is a trusted
    /// proxy, exempt from the per-IP bound.
    pub fn admit(&mut self, idx: usize, ip: IpAddr, trusted: bool) -> Admission {
        if !trusted && self.of_ip(ip) >= self.limits.per_ip {
            return Admission::RefuseIp;
        }
        let mut answer = Admission::Admit;
        if self.entries.len() >= self.limits.max
            && let Some(victim) = self.victim()
        {
            let ip = self.remove(victim).unwrap_or(ip);
            answer = Admission::Evict { idx: victim, ip };
        }
        self.next_order += 1;
        let previous = self.entries.insert(
            idx,
            Entry {
                ip,
                order: self.next_order,
                heard: false,
            },
        );
        if let Some(old) = previous {
            // The runtime reused an index it never removed: keep the counts exact anyway.
            self.uncount(old.ip);
        }
        *self.per_ip.entry(ip).or_insert(0) += 1;
        answer
    }

    /// A byte arrived on `idx`. True the first time (the runtime then moves the deadline
    /// from the first-byte timeout to the handshake timeout).
    pub fn heard(&mut self, idx: usize) -> bool {
        match self.entries.get_mut(&idx) {
            Some(e) if !e.heard => {
                e.heard = true;
                true
            }
            _ => false,
        }
    }

    /// The upgrade of `idx` ended, whatever the outcome. Returns its address.
    pub fn remove(&mut self, idx: usize) -> Option<IpAddr> {
        let e = self.entries.remove(&idx)?;
        self.uncount(e.ip);
        Some(e.ip)
    }

    fn uncount(&mut self, ip: IpAddr) {
        if let Some(n) = self.per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&ip);
            }
        }
    }

    /// The socket to give way: of the address holding most entries (ties: the one whose
    /// oldest entry is oldest), the oldest silent one, else its oldest.
    fn victim(&self) -> Option<usize> {
        let top = self.per_ip.values().copied().max()?;
        let mut best: Option<(bool, u64, usize)> = None;
        for (&idx, e) in &self.entries {
            if self.per_ip.get(&e.ip).copied() != Some(top) {
                continue;
            }
            // Silent before heard, then oldest first.
            let key = (e.heard, e.order, idx);
            if best.is_none_or(|b| (key.0, key.1) < (b.0, b.1)) {
                best = Some(key);
            }
        }
        best.map(|(_, _, idx)| idx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    fn table(max: usize, per_ip: usize) -> PendingTable {
        PendingTable::new(PendingLimits { max, per_ip })
    }

    /// The attack of issue 14 (hole 3): one address fills the shard with silent sockets.
    /// Today's rule refused every newcomer; now the flood displaces itself.
    #[test]
    fn a_silent_flood_gives_way_to_a_newcomer() {
        let mut t = table(8, 100);
        for i in 0..8 {
            assert_eq!(t.admit(i, ip(1), false), Admission::Admit);
        }
        // The newcomer from another address gets in; the flood's oldest socket goes.
        assert_eq!(t.admit(100, ip(2), false), Admission::Evict { idx: 0, ip: ip(1) });
        assert_eq!(t.len(), 8);
        assert_eq!(t.of_ip(ip(1)), 7);
        // The flood keeps coming: it only ever evicts itself.
        for i in 8..40 {
            match t.admit(i, ip(1), false) {
                Admission::Evict { ip: victim, .. } => assert_eq!(victim, ip(1)),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(t.ip_of(100), Some(ip(2)));
    }

    #[test]
    fn silent_sockets_go_before_talking_ones() {
        let mut t = table(3, 100);
        t.admit(0, ip(1), false);
        t.admit(1, ip(1), false);
        t.admit(2, ip(1), false);
        assert!(t.heard(0));
        assert!(!t.heard(0), "only the first byte counts");
        assert_eq!(t.admit(3, ip(2), false), Admission::Evict { idx: 1, ip: ip(1) });
        // Only talking sockets left for ip 1 beside 2: the oldest silent one is 2.
        assert_eq!(t.admit(4, ip(3), false), Admission::Evict { idx: 2, ip: ip(1) });
        // Now ip 1 holds one socket (heard), like ips 2 and 3: the oldest entry overall
        // that is silent goes first.
        assert_eq!(t.admit(5, ip(4), false), Admission::Evict { idx: 3, ip: ip(2) });
    }

    #[test]
    fn per_ip_bound_refuses_but_not_for_trusted_proxies() {
        let mut t = table(100, 2);
        assert_eq!(t.admit(0, ip(1), false), Admission::Admit);
        assert_eq!(t.admit(1, ip(1), false), Admission::Admit);
        assert_eq!(t.admit(2, ip(1), false), Admission::RefuseIp);
        assert_eq!(t.of_ip(ip(1)), 2, "a refused socket takes no slot");
        t.remove(0);
        assert_eq!(t.admit(3, ip(1), false), Admission::Admit);
        for i in 10..20 {
            assert_eq!(t.admit(i, ip(9), true), Admission::Admit);
        }
        assert_eq!(t.of_ip(ip(9)), 10);
    }

    proptest! {
        /// Whatever the sequence, the table never exceeds its bounds, its counts match its
        /// entries, and a full table never refuses an address that holds fewer entries than
        /// the largest holder.
        #[test]
        fn bounds_and_counts_hold(ops in proptest::collection::vec((0u8..3, 0usize..40, 1u8..5), 1..400)) {
            let mut t = table(10, 4);
            let mut live: std::collections::HashSet<usize> = Default::default();
            for (op, idx, who) in ops {
                match op {
                    0 if !live.contains(&idx) => {
                        let before = t.per_ip.clone();
                        let top = before.values().copied().max().unwrap_or(0);
                        let mine = t.of_ip(ip(who));
                        match t.admit(idx, ip(who), false) {
                            Admission::Admit => { live.insert(idx); }
                            Admission::Evict { idx: v, ip: vip } => {
                                prop_assert!(live.remove(&v));
                                prop_assert!(v != idx);
                                // The victim's address held the most.
                                prop_assert_eq!(before.get(&vip).copied(), Some(top));
                                live.insert(idx);
                            }
                            Admission::RefuseIp => prop_assert!(mine >= 4),
                        }
                    }
                    1 => { if t.remove(idx).is_some() { live.remove(&idx); } }
                    _ => { t.heard(idx); }
                }
                prop_assert!(t.len() <= 10);
                prop_assert_eq!(t.len(), live.len());
                let sum: u32 = t.per_ip.values().sum();
                prop_assert_eq!(sum as usize, t.len());
                prop_assert!(t.per_ip.values().all(|&n| n as usize <= 4));
            }
        }
    }
}
