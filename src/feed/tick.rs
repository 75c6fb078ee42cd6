//! Ticks and their wire encoding, the hot path of fan-out.
//!
//! A tick is encoded once per publish (not once per subscriber) into a frame that every
//! subscribed connection shares, so this encoder runs at the publish rate. It writes
//! JSON by hand with `itoa`/`ryu` instead of going through serde: the shape is fixed and
//! the fields are numbers plus one symbol, so there is nothing a generic serializer would
//! add but cost.
//!
//! Number format: integers (`seq`, `ts`, `skipped`) with `itoa`; prices and quantities always
//! with `ryu`, which writes the shortest text that parses back to the same `f64`
//! (`3.0`, `100.25`, `1e21`). Non-finite values cannot be JSON; they are rejected when a
//! publish is parsed, and should one slip through anyway the encoder writes `null` rather
//! than produce a frame no client can parse.

use super::json::write_json_str;

/// One market-data update as published by a source.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tick {
    /// Source timestamp, nanoseconds since the Unix epoch.
    pub ts: u64,
    pub bid: f64,
    pub ask: f64,
    pub last: f64,
    pub qty: f64,
}

/// Which server message a tick is sent as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TickKind {
    /// A live update (`"type":"tick"`).
    Tick,
    /// The latest known tick sent on subscribe (`"type":"snapshot"`).
    Snapshot,
    /// The latest known tick replacing the client's state for the symbol, when its
    /// `since` is out of the history's reach (`"type":"snapshot"` with `"reset":true`,
    /// PROTOCOL.md 10).
    Reset,
}

impl TickKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            TickKind::Tick => "tick",
            TickKind::Snapshot | TickKind::Reset => "snapshot",
        }
    }
}

/// Upper bound of one encoded tick JSON for a valid symbol (32 bytes): used to size buffers.
///
/// `{"type":"snapshot","s":"` (24) + symbol (32) + `","seq":` (8) + 20 + `,"ts":` (6) + 20
/// + 4 * (`,"bid":` 7 + 24 ryu digits) + `,"skipped":` (11) + 20 + `,"reset":true` (13)
/// + `}` (1) < 400.
pub const MAX_TICK_JSON_LEN: usize = 400;

/// Appends `{"type":"tick","s":..,"seq":..,"ts":..,"bid":..,"ask":..,"last":..,"qty":..}`
/// (or `"snapshot"`) to `out`, with `,"skipped":N` before the closing brace when `skipped > 0`,
/// and `,"reset":true` for [`TickKind::Reset`].
pub fn encode_tick_json(
    kind: TickKind,
    symbol: &str,
    seq: u64,
    tick: &Tick,
    skipped: u64,
    out: &mut Vec<u8>,
) {
    let mut ints = itoa::Buffer::new();
    let mut floats = ryu::Buffer::new();
    out.reserve(MAX_TICK_JSON_LEN.min(160 + symbol.len()));
    out.extend_from_slice(b"{\"type\":\"");
    out.extend_from_slice(kind.as_str().as_bytes());
    out.extend_from_slice(b"\",\"s\":");
    write_json_str(symbol, out);
    out.extend_from_slice(b",\"seq\":");
    out.extend_from_slice(ints.format(seq).as_bytes());
    out.extend_from_slice(b",\"ts\":");
    out.extend_from_slice(ints.format(tick.ts).as_bytes());
    for (key, v) in [
        (&b",\"bid\":"[..], tick.bid),
        (b",\"ask\":", tick.ask),
        (b",\"last\":", tick.last),
        (b",\"qty\":", tick.qty),
    ] {
        out.extend_from_slice(key);
        if v.is_finite() {
            out.extend_from_slice(floats.format_finite(v).as_bytes());
        } else {
            out.extend_from_slice(b"null");
        }
    }
    if skipped > 0 {
        out.extend_from_slice(b",\"skipped\":");
        out.extend_from_slice(ints.format(skipped).as_bytes());
    }
    if kind == TickKind::Reset {
        out.extend_from_slice(b",\"reset\":true");
    }
    out.push(b'}');
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tick() -> Tick {
        Tick {
            ts: 1732345678123456789,
            bid: 100.25,
            ask: 100.5,
            last: 100.4,
            qty: 3.0,
        }
    }

    #[test]
    fn exact_bytes() {
        let mut out = Vec::new();
        encode_tick_json(TickKind::Tick, "BTC-USD", 42, &tick(), 0, &mut out);
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"type":"tick","s":"BTC-USD","seq":42,"ts":1732345678123456789,"bid":100.25,"ask":100.5,"last":100.4,"qty":3.0}"#
        );
        out.clear();
        encode_tick_json(TickKind::Reset, "BTC-USD", 41, &tick(), 0, &mut out);
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"type":"snapshot","s":"BTC-USD","seq":41,"ts":1732345678123456789,"bid":100.25,"ask":100.5,"last":100.4,"qty":3.0,"reset":true}"#
        );
        out.clear();
        encode_tick_json(TickKind::Snapshot, "BTC-USD", 41, &tick(), 7, &mut out);
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"type":"snapshot","s":"BTC-USD","seq":41,"ts":1732345678123456789,"bid":100.25,"ask":100.5,"last":100.4,"qty":3.0,"skipped":7}"#
        );
    }

    #[test]
    fn appends_and_escapes() {
        let mut out = b"prefix".to_vec();
        encode_tick_json(TickKind::Tick, "A\"\\\n", 1, &tick(), 0, &mut out);
        assert!(out.starts_with(b"prefix{"));
        let v: serde_json::Value = serde_json::from_slice(&out[6..]).unwrap();
        assert_eq!(v["s"], "A\"\\\n");
    }

    #[test]
    fn non_finite_never_breaks_json() {
        let t = Tick {
            bid: f64::NAN,
            ask: f64::INFINITY,
            ..tick()
        };
        let mut out = Vec::new();
        encode_tick_json(TickKind::Tick, "X", 1, &t, 0, &mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert!(v["bid"].is_null() && v["ask"].is_null());
    }

    #[test]
    fn max_len_bound_holds() {
        let t = Tick {
            ts: u64::MAX,
            bid: -1.2345678901234567e-300,
            ask: -f64::MAX,
            last: f64::MIN_POSITIVE,
            qty: -2.2250738585072014e-308,
        };
        let mut out = Vec::new();
        encode_tick_json(
            TickKind::Snapshot,
            &"A".repeat(32),
            u64::MAX,
            &t,
            u64::MAX,
            &mut out,
        );
        assert!(out.len() <= MAX_TICK_JSON_LEN, "{}", out.len());
    }

    proptest! {
        #[test]
        fn round_trips(
            seq in any::<u64>(), ts in any::<u64>(), skipped in any::<u64>(),
            bid in any::<f64>().prop_filter("finite", |f| f.is_finite()),
            ask in -1e12f64..1e12, last in any::<i32>(), qty in 0f64..1e9,
        ) {
            let t = Tick { ts, bid, ask, last: f64::from(last), qty };
            let mut out = Vec::new();
            encode_tick_json(TickKind::Tick, "BTC-USD", seq, &t, skipped, &mut out);
            let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
            prop_assert_eq!(v["seq"].as_u64(), Some(seq));
            prop_assert_eq!(v["ts"].as_u64(), Some(ts));
            prop_assert_eq!(v["bid"].as_f64(), Some(bid));
            prop_assert_eq!(v["ask"].as_f64(), Some(ask));
            prop_assert_eq!(v["last"].as_f64(), Some(f64::from(last)));
            prop_assert_eq!(v["qty"].as_f64(), Some(qty));
            if skipped > 0 {
                prop_assert_eq!(v["skipped"].as_u64(), Some(skipped));
            } else {
                prop_assert!(v.get("skipped").is_none());
            }
        }
    }
}
