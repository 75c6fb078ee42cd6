//! Symbol syntax and the process-wide symbol table.
//!
//! Every tick, subscription and conflation slot is keyed by a symbol. Hashing and
//! comparing strings on each of those paths would be wasteful, so a symbol is interned
//! once, at first sight, into a dense [`SymbolId`] (`u32`); everything downstream works
//! on ids and only the edges (parsing a client message, encoding a frame) deal with names.
//!
//! # Design
//!
//! The table is shared by all shards (`&self` methods, `Sync`):
//! - `DashMap<Box<str>, SymbolId>` maps names to ids. It is sharded internally, so
//!   concurrent lookups of *existing* symbols (the overwhelmingly common case) take one
//!   shard read lock and never contend with the other shards.
//! - a `RwLock<Vec<Arc<str>>>` maps ids back to names. Ids are dense, so the name of an
//!   id is one bounds-checked index under a read lock; handing out an `Arc<str>` lets
//!   callers keep the name without holding the lock.
//!
//! The table is bounded (`max_symbols`): publishers choose symbol names, and an unbounded
//! table would let them grow server memory with made-up symbols. A symbol with no
//! subscriber and no tick for `feed.symbol_idle` is retired by the hub's sweep
//! ([`SymbolTable::retire`]): its name stops resolving at once, and its id is reused only
//! after [`QUARANTINE_MS`], so an operation that looked the id up just before (they are
//! synchronous: a publish, a subscribe) finds it retired and resolves the name again, and
//! no tick in flight can carry a reused id.
//!
//! Lock order: the waiting lock, then a DashMap shard lock, then the name table lock, then
//! the recycle lock; `name()` only takes the name table lock, so there is no cycle. Both the bound check and the push
//! happen under the name-table write lock, so the bound is exact even under concurrent
//! interning.
//!
//! # Who creates a symbol
//!
//! Only a published tick (or a configured symbol) takes an entry: [`SymbolTable::intern`]
//! is for publishers and the simulator. A subscriber names symbols with
//! [`SymbolTable::lookup`], and a subscription to a name that does not exist yet is held by
//! its connection, not by this table: the shard registers the name with
//! [`SymbolTable::wait_for`] (a bit per shard, an entry only while some connection waits),
//! and when a publisher interns the name the shards waiting for it are handed to the hub
//! ([`SymbolTable::take_handoff`]) before the first tick goes out, so a subscription made
//! before the first tick still receives that tick. The waiting entries are bounded by the
//! connections' own subscription bounds and freed with them ([`SymbolTable::stop_waiting`]),
//! so subscribing to made-up names can no longer fill the table (issue 14).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

/// Longest valid symbol in bytes (`[A-Z0-9][A-Z0-9._:/-]{0,31}`).
pub const MAX_SYMBOL_LEN: usize = 32;

/// Whether `s` matches `[A-Z0-9][A-Z0-9._:/-]{0,31}` (PROTOCOL.md section 5).
///
/// ASCII only: no lowercase, so case-folding tricks cannot alias two symbols, and every
/// valid symbol is safe to embed in JSON without escaping.
pub fn is_valid_symbol(s: &str) -> bool {
    let b = s.as_bytes();
    match b.split_first() {
        Some((first, rest)) if b.len() <= MAX_SYMBOL_LEN => {
            is_first_char(*first) && rest.iter().all(|c| is_rest_char(*c))
        }
        _ => false,
    }
}

pub(crate) fn is_first_char(c: u8) -> bool {
    c.is_ascii_uppercase() || c.is_ascii_digit()
}

pub(crate) fn is_rest_char(c: u8) -> bool {
    is_first_char(c) || matches!(c, b'.' | b'_' | b':' | b'/' | b'-')
}

/// A poisoned lock only means another thread panicked holding it; the maps stay
/// consistent (every update is a single insert or remove).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Dense id of an interned symbol; valid for the life of its [`SymbolTable`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SymbolId(pub u32);

/// Why a symbol could not be interned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SymbolError {
    /// The name does not match the symbol syntax (reported to the client as `bad_request`).
    #[error("invalid symbol")]
    Invalid,
    /// The table already holds `max_symbols` symbols; existing symbols still work.
    #[error("symbol table full")]
    TableFull,
}

/// Interns symbols to dense ids at first sight, bounded by `max_symbols`, shared by all shards.
pub struct SymbolTable {
    ids: DashMap<Box<str>, SymbolId>,
    names: RwLock<Vec<Arc<str>>>,
    max_symbols: usize,
    /// Names some shard's connections subscribed to before they existed: name -> mask of
    /// those shards. Also guards the interning of new names (see [`Self::intern`]).
    waiting: Mutex<HashMap<Box<str>, u64>>,
    /// Shards waiting for a symbol interned since, until its first tick takes them
    /// ([`Self::take_handoff`]): id -> shard mask.
    handoff: Mutex<HashMap<SymbolId, u64>>,
    /// `handoff` is not empty (a lock-free check for the publish path).
    handoff_pending: AtomicBool,
    /// Ids given back by [`Self::retire`]: quarantined, then reused.
    recycle: Mutex<Recycle>,
    /// Ids not in use (quarantined or free): `names.len() - retired` symbols exist.
    retired: AtomicUsize,
}

/// How long a retired id stays unused before another name may take it: far longer than
/// any operation that looked the id up before it was retired can take to finish (they
/// are synchronous), so such an operation finds the id retired, never reused.
pub const QUARANTINE_MS: u64 = 60_000;

#[derive(Default)]
struct Recycle {
    /// (id, retired at, unix ms), oldest first.
    quarantine: std::collections::VecDeque<(u32, u64)>,
    free: Vec<u32>,
}

/// What [`SymbolTable::wait_for`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// The symbol exists now: subscribe to it as usual.
    Exists(SymbolId),
    /// The shard is registered as waiting for the name.
    Waiting,
}

impl SymbolTable {
    /// An empty table that will hold at most `max_symbols` symbols (capped at `u32::MAX`).
    pub fn new(max_symbols: usize) -> Self {
        Self {
            ids: DashMap::new(),
            names: RwLock::new(Vec::new()),
            max_symbols: max_symbols.min(u32::MAX as usize),
            waiting: Mutex::new(HashMap::new()),
            handoff: Mutex::new(HashMap::new()),
            handoff_pending: AtomicBool::new(false),
            recycle: Mutex::new(Recycle::default()),
            retired: AtomicUsize::new(0),
        }
    }

    /// The id of `s`, interning it if it is new.
    ///
    /// Fails with [`SymbolError::Invalid`] if `s` is not a valid symbol and with
    /// [`SymbolError::TableFull`] if it is new and the table is at its bound.
    pub fn intern(&self, s: &str) -> Result<SymbolId, SymbolError> {
        // Fast path first: existing symbols only need a shard read lock. Only valid
        // symbols are ever inserted, so a hit needs no syntax check.
        if let Some(id) = self.ids.get(s) {
            return Ok(*id);
        }
        if !is_valid_symbol(s) {
            return Err(SymbolError::Invalid);
        }
        // A new name: under the waiting lock, so a shard registering as waiting for it
        // either sees it interned or is handed over with it, never neither.
        let mut waiting = lock(&self.waiting);
        let id = self.insert_new(s)?;
        if let Some(mask) = waiting.remove(s) {
            let mut handoff = lock(&self.handoff);
            *handoff.entry(id).or_insert(0) |= mask;
            self.handoff_pending.store(true, Ordering::Release);
        }
        drop(waiting);
        Ok(id)
    }

    fn insert_new(&self, s: &str) -> Result<SymbolId, SymbolError> {
        match self.ids.entry(Box::from(s)) {
            // Another shard interned it between our lookup and the entry lock.
            Entry::Occupied(e) => Ok(*e.get()),
            Entry::Vacant(v) => {
                let mut names = self.names.write().unwrap_or_else(|p| p.into_inner());
                let reused = lock(&self.recycle).free.pop();
                let id = match reused {
                    Some(id) => {
                        names[id as usize] = Arc::from(s);
                        self.retired.fetch_sub(1, Ordering::Relaxed);
                        id
                    }
                    None if names.len() >= self.max_symbols => return Err(SymbolError::TableFull),
                    None => {
                        let id = u32::try_from(names.len()).map_err(|_| SymbolError::TableFull)?;
                        names.push(Arc::from(s));
                        id
                    }
                };
                v.insert(SymbolId(id));
                Ok(SymbolId(id))
            }
        }
    }

    /// The id of `s` if it was interned before; never inserts.
    pub fn lookup(&self, s: &str) -> Option<SymbolId> {
        self.ids.get(s).map(|id| *id)
    }

    /// Shard `shard` has connections subscribed to `name` (a valid symbol), which may not
    /// exist yet. Only for shards 0..64 (the hub's shard masks).
    pub fn wait_for(&self, shard: usize, name: &str) -> Wait {
        if let Some(id) = self.lookup(name) {
            return Wait::Exists(id);
        }
        let mut waiting = lock(&self.waiting);
        if let Some(id) = self.lookup(name) {
            return Wait::Exists(id);
        }
        if shard < 64 {
            *waiting.entry(Box::from(name)).or_insert(0) |= 1 << shard;
        }
        Wait::Waiting
    }

    /// Some shard waits for `name` (not interned yet).
    pub fn is_waited(&self, name: &str) -> bool {
        lock(&self.waiting).contains_key(name)
    }

    /// The names some shard waits for.
    pub fn waiting_names(&self) -> Vec<Box<str>> {
        lock(&self.waiting).keys().cloned().collect()
    }

    /// Some shard waited for `id` before it existed and has not had its first tick.
    pub fn has_handoff(&self, id: SymbolId) -> bool {
        self.handoff_pending.load(Ordering::Acquire) && lock(&self.handoff).contains_key(&id)
    }

    /// Shard `shard` no longer has connections waiting for `name`. When the name was
    /// interned meanwhile, returns its id: the shard may have been handed to the hub
    /// already, and must then leave the symbol there too (`Hub::unsubscribe_last`).
    pub fn stop_waiting(&self, shard: usize, name: &str) -> Option<SymbolId> {
        let bit = if shard < 64 { 1u64 << shard } else { 0 };
        let mut waiting = lock(&self.waiting);
        if let Some(mask) = waiting.get_mut(name) {
            *mask &= !bit;
            if *mask == 0 {
                waiting.remove(name);
            }
            return None;
        }
        let id = self.lookup(name)?;
        let mut handoff = lock(&self.handoff);
        if let Some(mask) = handoff.get_mut(&id) {
            *mask &= !bit;
            if *mask == 0 {
                handoff.remove(&id);
            }
        }
        Some(id)
    }

    /// The shards that waited for `id` before it existed (once; 0 when none). The hub
    /// calls it under the symbol's lock before sending a tick.
    pub fn take_handoff(&self, id: SymbolId) -> u64 {
        if !self.handoff_pending.load(Ordering::Acquire) {
            return 0;
        }
        let mut handoff = lock(&self.handoff);
        let mask = handoff.remove(&id).unwrap_or(0);
        if handoff.is_empty() {
            self.handoff_pending.store(false, Ordering::Release);
        }
        mask
    }

    /// Gives `id` back (the hub found it idle: no subscriber, no recent tick): its name no
    /// longer resolves, and after [`QUARANTINE_MS`] another name may take the id. False
    /// when a shard was handed the id and waits for its first tick, or it is not live.
    pub fn retire(&self, id: SymbolId, now_ms: u64) -> bool {
        let Some(name) = self.name(id) else { return false };
        if lock(&self.handoff).contains_key(&id) {
            return false;
        }
        if self.ids.remove_if(&*name, |_, v| *v == id).is_none() {
            return false;
        }
        lock(&self.recycle).quarantine.push_back((id.0, now_ms));
        self.retired.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Frees the ids whose quarantine is over (the shard's housekeeping calls it).
    pub fn recycle(&self, now_ms: u64) {
        let mut r = lock(&self.recycle);
        while let Some(&(id, at)) = r.quarantine.front() {
            if now_ms.saturating_sub(at) < QUARANTINE_MS {
                break;
            }
            r.quarantine.pop_front();
            r.free.push(id);
        }
    }

    /// Ids handed out so far, live or retired (the hub's sweep walks `0..slots()`).
    pub fn slots(&self) -> usize {
        self.names.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Names some connection waits for (for `/metrics`).
    pub fn waiting_len(&self) -> usize {
        lock(&self.waiting).len()
    }

    /// The name of an interned symbol.
    pub fn name(&self, id: SymbolId) -> Option<Arc<str>> {
        let names = self.names.read().unwrap_or_else(|p| p.into_inner());
        names.get(id.0 as usize).cloned()
    }

    /// Number of symbols that exist (interned and not retired).
    pub fn len(&self) -> usize {
        self.slots().saturating_sub(self.retired.load(Ordering::Relaxed))
    }

    /// Whether no symbol was interned yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The configured bound.
    pub fn max_symbols(&self) -> usize {
        self.max_symbols
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn syntax_edge_cases() {
        for ok in [
            "A",
            "0",
            "BTC-USD",
            "ES.Z24",
            "X:Y/Z_1-2.3",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", // 32
            "9/",
        ] {
            assert!(is_valid_symbol(ok), "{ok}");
        }
        for bad in [
            "",
            "btc-usd",
            "Btc",
            "-BTC",
            ".A",
            "_A",
            ":A",
            "/A",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", // 33
            "BTC USD",
            "BTC*",
            "*",
            "BTC\0",
            "BTC\n",
            "ÄBC",
            "AÉ",
            "A\u{200b}",
            "BTC,USD",
            "BTC\"",
        ] {
            assert!(!is_valid_symbol(bad), "{bad:?}");
        }
    }

    #[test]
    fn interning_is_dense_and_stable() {
        let t = SymbolTable::new(10);
        assert!(t.is_empty());
        let a = t.intern("BTC-USD").unwrap();
        let b = t.intern("ETH-USD").unwrap();
        assert_eq!(a, SymbolId(0));
        assert_eq!(b, SymbolId(1));
        assert_eq!(t.intern("BTC-USD").unwrap(), a);
        assert_eq!(t.lookup("ETH-USD"), Some(b));
        assert_eq!(t.lookup("SOL-USD"), None);
        assert_eq!(t.name(a).as_deref(), Some("BTC-USD"));
        assert_eq!(t.name(SymbolId(7)), None);
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn interning_rejects_invalid_without_growing() {
        let t = SymbolTable::new(10);
        assert_eq!(t.intern("btc"), Err(SymbolError::Invalid));
        assert_eq!(t.intern(""), Err(SymbolError::Invalid));
        assert_eq!(t.len(), 0);
        assert_eq!(t.lookup("btc"), None);
    }

    #[test]
    fn interning_bound_is_exact() {
        let t = SymbolTable::new(3);
        for s in ["A", "B", "C"] {
            t.intern(s).unwrap();
        }
        assert_eq!(t.intern("D"), Err(SymbolError::TableFull));
        assert_eq!(t.lookup("D"), None);
        // Existing symbols keep working when full.
        assert_eq!(t.intern("B"), Ok(SymbolId(1)));
        assert_eq!(t.len(), 3);
        let z = SymbolTable::new(0);
        assert_eq!(z.intern("A"), Err(SymbolError::TableFull));
    }

    #[test]
    fn concurrent_interning_respects_bound_and_agrees() {
        let t = Arc::new(SymbolTable::new(50));
        let handles: Vec<_> = (0..4)
            .map(|k| {
                let t = Arc::clone(&t);
                std::thread::spawn(move || {
                    let mut got = Vec::new();
                    for i in 0..100 {
                        let name = format!("S{}", (i * 7 + k) % 80);
                        got.push((name.clone(), t.intern(&name)));
                    }
                    got
                })
            })
            .collect();
        let mut all = Vec::new();
        for h in handles {
            all.extend(h.join().unwrap());
        }
        assert_eq!(t.len(), 50);
        for (name, r) in all {
            if let Ok(id) = r {
                assert_eq!(t.name(id).as_deref(), Some(name.as_str()));
                assert_eq!(t.lookup(&name), Some(id));
            } else {
                assert_eq!(r, Err(SymbolError::TableFull));
            }
        }
    }

    fn naive_valid(s: &str) -> bool {
        let chars: Vec<char> = s.chars().collect();
        !chars.is_empty()
            && chars.len() <= 32
            && (chars[0].is_ascii_uppercase() || chars[0].is_ascii_digit())
            && chars[1..]
                .iter()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || "._:/-".contains(*c))
    }

    proptest! {
        #[test]
        fn syntax_matches_naive(s in "[A-Za-z0-9._:/*\\- é]{0,40}") {
            prop_assert_eq!(is_valid_symbol(&s), naive_valid(&s));
        }
    }
}
