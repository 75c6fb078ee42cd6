//! The client's side of recovery (PROTOCOL.md section 10), sans-IO: the last `seq`
//! processed per symbol, the `subscribe` that resumes from it after a reconnect, and the
//! check that what arrives continues it (no gap, no duplicate). `tickgate client` uses it;
//! it is also the reference for client authors (docs/PROTOCOL.md section 10).

use std::collections::BTreeMap;

/// What a server message did to the resumed state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// A tick that continues the symbol (`skipped` counts ticks conflated away).
    Tick { skipped: u64 },
    /// A snapshot: the symbol's state is replaced (`reset`: the history did not reach
    /// back to what the client had).
    Snapshot { reset: bool },
    /// A tick whose `seq` does not follow the last one (missing ticks nobody explained).
    Gap { expected: u64, got: u64 },
    /// A tick at or below the last `seq` processed (already seen).
    Duplicate { seq: u64 },
    /// Not a tick or snapshot.
    Other,
}

/// Last `seq` per symbol, for the symbols a client wants.
#[derive(Debug, Clone, Default)]
pub struct Resume {
    symbols: Vec<String>,
    last: BTreeMap<String, u64>,
}

impl Resume {
    pub fn new(symbols: impl IntoIterator<Item = String>) -> Self {
        Resume {
            symbols: symbols.into_iter().collect(),
            last: BTreeMap::new(),
        }
    }

    /// The last `seq` processed of `symbol`, if any.
    pub fn last(&self, symbol: &str) -> Option<u64> {
        self.last.get(symbol).copied()
    }

    /// The `subscribe` to send on every (re)connect: `since` for the symbols with a last
    /// `seq`, `snapshot` for the others.
    pub fn subscribe(&self, id: u64) -> serde_json::Value {
        let since: serde_json::Map<String, serde_json::Value> = self
            .symbols
            .iter()
            .filter_map(|s| self.last.get(s).map(|q| (s.clone(), (*q).into())))
            .collect();
        let mut m = serde_json::json!({
            "op": "subscribe",
            "id": id,
            "symbols": self.symbols,
            "snapshot": true,
        });
        if !since.is_empty() {
            m["since"] = serde_json::Value::Object(since);
        }
        m
    }

    /// Takes a server message into account.
    pub fn observe(&mut self, m: &serde_json::Value) -> Seen {
        let (Some(kind), Some(sym), Some(seq)) = (m["type"].as_str(), m["s"].as_str(), m["seq"].as_u64())
        else {
            return Seen::Other;
        };
        match kind {
            "snapshot" => {
                self.last.insert(sym.to_owned(), seq);
                Seen::Snapshot {
                    reset: m["reset"] == true,
                }
            }
            "tick" => {
                let skipped = m["skipped"].as_u64().unwrap_or(0);
                let prev = self.last.get(sym).copied();
                match prev {
                    Some(p) if seq <= p => return Seen::Duplicate { seq },
                    _ => {}
                }
                self.last.insert(sym.to_owned(), seq);
                match prev {
                    Some(p) if seq != p + 1 + skipped => Seen::Gap {
                        expected: p + 1,
                        got: seq,
                    },
                    _ => Seen::Tick { skipped },
                }
            }
            _ => Seen::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn resumes_from_the_last_seq_and_checks_continuity() {
        let mut r = Resume::new(["A".to_string(), "B".to_string()]);
        assert_eq!(
            r.subscribe(1),
            json!({"op":"subscribe","id":1,"symbols":["A","B"],"snapshot":true})
        );
        assert_eq!(
            r.observe(&json!({"type":"snapshot","s":"A","seq":40})),
            Seen::Snapshot { reset: false }
        );
        assert_eq!(
            r.observe(&json!({"type":"tick","s":"A","seq":41})),
            Seen::Tick { skipped: 0 }
        );
        assert_eq!(
            r.observe(&json!({"type":"tick","s":"A","seq":45,"skipped":3})),
            Seen::Tick { skipped: 3 }
        );
        assert_eq!(
            r.subscribe(2),
            json!({"op":"subscribe","id":2,"symbols":["A","B"],"snapshot":true,"since":{"A":45}})
        );
        assert_eq!(
            r.observe(&json!({"type":"tick","s":"A","seq":45})),
            Seen::Duplicate { seq: 45 }
        );
        assert_eq!(
            r.observe(&json!({"type":"tick","s":"A","seq":48})),
            Seen::Gap {
                expected: 46,
                got: 48
            }
        );
        assert_eq!(
            r.observe(&json!({"type":"snapshot","s":"A","seq":900,"reset":true})),
            Seen::Snapshot { reset: true }
        );
        assert_eq!(r.last("A"), Some(900));
        // A first tick of a symbol with no snapshot is a start, not a gap.
        assert_eq!(
            r.observe(&json!({"type":"tick","s":"B","seq":7})),
            Seen::Tick { skipped: 0 }
        );
        assert_eq!(r.observe(&json!({"type":"pong","id":1})), Seen::Other);
    }
}
