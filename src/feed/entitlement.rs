//! Entitlement matching: which symbols a token lets its holder subscribe to or publish.
//!
//! A token's `symbols` claim lists patterns (PROTOCOL.md section 4):
//! - an exact symbol (`BTC-USD`),
//! - a prefix ending in `*` (`BTC-*`): every symbol that starts with the prefix,
//!   *including* a symbol equal to the prefix itself (`BTC-*` allows `BTC-`, since `*`
//!   matches the empty string), but not a shorter one (`BTC-*` does not allow `BTC`),
//! - `*` alone: every symbol.
//!
//! # Never widen access
//!
//! Patterns are compiled once per connection (and again on reauth). A pattern that does not
//! fit this grammar is *ignored*, never interpreted loosely: `*BTC`, `B*C`, `BTC**`, `""`,
//! lowercase `btc-*`, a prefix with characters outside the symbol alphabet, or an exact
//! pattern that is not a valid symbol all grant nothing. An ignored pattern can only make the
//! set narrower than its author meant, which fails closed.
//!
//! # Speed
//!
//! `allows` runs on every subscribe and on every symbol of every publish, so it must be cheap:
//! exact patterns are sorted (one binary search: O(log e) comparisons of short strings,
//! as quick as hashing one); prefixes are sorted and minimised (a prefix covered by a
//! shorter one is dropped). In a minimised sorted set at most one prefix can match a symbol,
//! and if one does it is the greatest prefix `<=` the symbol, so one binary search and one
//! `starts_with` decide it: O(log p) for p prefixes.

use super::symbol::{MAX_SYMBOL_LEN, is_first_char, is_rest_char, is_valid_symbol};

/// A compiled set of entitlement patterns.
///
/// Every connection keeps one, so it is compact: 40 bytes plus the pattern strings (boxed
/// slices rather than a hash set and a vector, which took 80 bytes even when empty).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Entitlements {
    all: bool,
    /// Sorted, deduplicated, none covered by a prefix.
    exact: Box<[Box<str>]>,
    /// Sorted, and no element is a prefix of another.
    prefixes: Box<[Box<str>]>,
}

impl Entitlements {
    /// Compiles the patterns of a token's `symbols` claim; invalid patterns are ignored.
    pub fn compile(patterns: &[String]) -> Self {
        let mut all = false;
        let mut exact: Vec<Box<str>> = Vec::new();
        let mut prefixes: Vec<Box<str>> = Vec::new();
        for p in patterns {
            if p == "*" {
                all = true;
            } else if let Some(prefix) = p.strip_suffix('*') {
                if is_valid_prefix(prefix) {
                    prefixes.push(prefix.into());
                }
            } else if is_valid_symbol(p) {
                exact.push(Box::from(p.as_str()));
            }
        }
        if all {
            // `*` subsumes everything; keep the representation canonical.
            return Self {
                all,
                ..Self::default()
            };
        }
        prefixes.sort_unstable();
        prefixes.dedup();
        // After sorting, a prefix that extends another comes right after it (or after
        // other extensions of it), so comparing against the last kept one suffices.
        let mut minimal: Vec<Box<str>> = Vec::with_capacity(prefixes.len());
        for p in prefixes {
            match minimal.last() {
                Some(last) if p.starts_with(&**last) => {}
                _ => minimal.push(p),
            }
        }
        let mut this = Self {
            all,
            exact: Box::default(),
            prefixes: minimal.into_boxed_slice(),
        };
        // Exact patterns already covered by a prefix are redundant.
        exact.retain(|e| !this.prefix_allows(e));
        exact.sort_unstable();
        exact.dedup();
        this.exact = exact.into_boxed_slice();
        this
    }

    /// Entitlements that allow nothing (a token without a `symbols` claim).
    pub fn none() -> Self {
        Self::default()
    }

    /// Whether `symbol` is allowed. Does not check the symbol's syntax.
    pub fn allows(&self, symbol: &str) -> bool {
        self.all || self.prefix_allows(symbol) || self.exact.binary_search_by(|e| (**e).cmp(symbol)).is_ok()
    }

    fn prefix_allows(&self, symbol: &str) -> bool {
        let i = self.prefixes.partition_point(|p| &**p <= symbol);
        i > 0 && self.prefixes.get(i - 1).is_some_and(|p| symbol.starts_with(&**p))
    }

    /// Whether the set contains `*`.
    pub fn all(&self) -> bool {
        self.all
    }

    /// Whether nothing at all is allowed.
    pub fn is_empty(&self) -> bool {
        !self.all && self.exact.is_empty() && self.prefixes.is_empty()
    }

    /// Whether every symbol `self` allows is also allowed by `other`.
    ///
    /// Conservative: it may answer `false` for a prefix that `other` covers only through
    /// an exhaustive list of exact symbols (e.g. a 32-byte `prefix*` and the same exact
    /// symbol), but it never answers `true` wrongly, so a caller that skips re-checking
    /// subscriptions on `true` stays safe.
    pub fn is_subset_of(&self, other: &Entitlements) -> bool {
        if other.all {
            return true;
        }
        if self.all {
            return false;
        }
        self.exact.iter().all(|e| other.allows(e)) && self.prefixes.iter().all(|p| other.prefix_allows(p))
    }
}

/// A prefix is valid if some valid symbol starts with it: non-empty, symbol alphabet,
/// at most [`MAX_SYMBOL_LEN`] bytes.
fn is_valid_prefix(prefix: &str) -> bool {
    let b = prefix.as_bytes();
    match b.split_first() {
        Some((first, rest)) if b.len() <= MAX_SYMBOL_LEN => {
            is_first_char(*first) && rest.iter().all(|c| is_rest_char(*c))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ents(p: &[&str]) -> Entitlements {
        Entitlements::compile(&p.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn exact_prefix_and_all() {
        let e = ents(&["ETH-USD", "BTC-*"]);
        assert!(e.allows("ETH-USD"));
        assert!(!e.allows("ETH-USDT"));
        assert!(e.allows("BTC-USD"));
        assert!(e.allows("BTC-"));
        assert!(!e.allows("BTC"));
        assert!(!e.allows("BTCX"));
        assert!(!e.allows("btc-usd"));
        assert!(!e.all());
        let a = ents(&["*"]);
        assert!(a.all() && a.allows("ANYTHING"));
        assert!(ents(&[]).is_empty());
        assert!(!ents(&[]).allows("BTC-USD"));
    }

    #[test]
    fn invalid_patterns_never_widen() {
        let e = ents(&[
            "*BTC", "B*C", "", "**", "BTC**", "btc-*", " BTC-*", "BTC -*", "-*", "*-", "BTC-USD ", "ÄB*",
        ]);
        assert!(e.is_empty(), "{e:?}");
        for s in ["BTC", "BTC-USD", "BXC", "B", "XBTC", "BTC*", "A"] {
            assert!(!e.allows(s), "{s}");
        }
        // 33-byte prefix can never match a valid symbol.
        assert!(ents(&[&format!("{}*", "A".repeat(33))]).is_empty());
        assert!(!ents(&[&format!("{}*", "A".repeat(32))]).is_empty());
    }

    #[test]
    fn minimisation_keeps_semantics() {
        let e = ents(&["BTC-*", "BTC-U*", "B*", "BX-1", "C*", "CA*", "C"]);
        assert_eq!(&*e.prefixes, &["B".into(), "C".into()] as &[Box<str>]);
        assert!(e.exact.is_empty());
        assert!(e.allows("BX-1") && e.allows("C") && e.allows("CAT") && !e.allows("D"));
    }

    #[test]
    fn subset() {
        let wide = ents(&["BTC-*", "ETH-USD"]);
        assert!(ents(&["BTC-USD"]).is_subset_of(&wide));
        assert!(ents(&["BTC-U*", "ETH-USD"]).is_subset_of(&wide));
        assert!(!ents(&["BTC*"]).is_subset_of(&wide));
        assert!(!ents(&["SOL-USD"]).is_subset_of(&wide));
        assert!(!ents(&["*"]).is_subset_of(&wide));
        assert!(wide.is_subset_of(&ents(&["*"])));
        assert!(ents(&[]).is_subset_of(&ents(&[])));
    }

    fn naive_allows(patterns: &[String], s: &str) -> bool {
        patterns.iter().any(|p| {
            if p == "*" {
                return true;
            }
            if let Some(pre) = p.strip_suffix('*') {
                return !pre.is_empty()
                    && pre.len() <= 32
                    && !pre.contains('*')
                    && is_valid_symbol(&pre[..1])
                    && pre.bytes().skip(1).all(is_rest_char)
                    && s.starts_with(pre);
            }
            is_valid_symbol(p) && p == s
        })
    }

    fn pattern() -> impl Strategy<Value = String> {
        prop_oneof![
            "[AB][AB-]{0,3}",
            "[AB][AB-]{0,3}\\*",
            "[AB*-]{0,4}",
            Just("*".to_string()),
            "[a-b]{1,2}\\*",
        ]
    }

    proptest! {
        #[test]
        fn matches_naive_model(
            pats in proptest::collection::vec(pattern(), 0..6),
            syms in proptest::collection::vec("[AB-]{0,5}", 1..10),
        ) {
            // Drop the `*` pattern most of the time so prefix logic gets exercised.
            let pats: Vec<String> = if pats.len() % 3 == 0 { pats } else {
                pats.into_iter().filter(|p| p != "*").collect()
            };
            let e = Entitlements::compile(&pats);
            for s in &syms {
                prop_assert_eq!(e.allows(s), naive_allows(&pats, s), "pats {:?} sym {}", pats, s);
            }
        }

        #[test]
        fn subset_is_sound(
            a in proptest::collection::vec(pattern(), 0..4),
            b in proptest::collection::vec(pattern(), 0..4),
            syms in proptest::collection::vec("[AB-]{1,5}", 1..20),
        ) {
            let (ea, eb) = (Entitlements::compile(&a), Entitlements::compile(&b));
            if ea.is_subset_of(&eb) {
                for s in &syms {
                    prop_assert!(!ea.allows(s) || eb.allows(s));
                }
            }
        }
    }
}
