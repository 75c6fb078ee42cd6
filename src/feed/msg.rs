//! Client messages (parsing) and server messages (encoding), PROTOCOL.md section 5.
//!
//! # Parsing
//!
//! Client text frames are parsed with simd-json into its *tape* (a flat array of nodes) and
//! the tape is walked by hand against a fixed schema. We do not deserialize through serde
//! or build a DOM: the tape lets us see every key in order, which we need to reject
//! duplicates, and walking it costs no allocation beyond the strings we keep.
//! simd-json parses in place, so the caller hands in a mutable copy of the frame text.
//!
//! The schema is strict, and each rule is a decision worth knowing:
//! - The top level must be an object with a string `op`; anything else is `bad_request`
//!   (`id` echoed if it could be read). An unknown `op` is `unknown_op`, with `id` echoed.
//! - `id` is optional; when present it must be a non-negative integer that fits in `u64`.
//!   A malformed `id` is `bad_request` without an `id` (there is nothing safe to echo).
//! - **Unknown fields are rejected** (`bad_request`), both at the top level and in ticks.
//!   A gateway that ignores fields lets a client believe an option it misspelt took effect
//!   (`"snapshots":true`); failing loudly is cheaper to debug. Clients wanting forward
//!   compatibility must check the server version instead.
//! - **Duplicate keys are rejected** (`bad_request`). RFC 8259 leaves their meaning open, and
//!   parsers disagree (first wins, last wins); a proxy or WAF in front of us that reads the
//!   other copy would see a different message than we act on.
//! - `symbols` is an array of strings. Their syntax is *not* checked here (the session answers
//!   per symbol in `rejected`), but each string is bounded to [`MAX_SYMBOL_FIELD_BYTES`]
//!   (a longer one can never be a symbol and rejects the whole message), and the count is
//!   bounded: past `max_symbols_per_message` a `subscribe` gets `too_many_symbols` (the
//!   same code as the per-connection cap, since the outcome, nothing subscribed, is the
//!   same) and an `unsubscribe` gets `bad_request`. Empty arrays are accepted (a no-op).
//! - `snapshot` is an optional bool, default `false`.
//! - `since` (PROTOCOL.md section 10) is an optional object from symbol to the last `seq`
//!   the client processed (a non-negative integer). Every key must also be in `symbols`
//!   (a `since` for a symbol not asked for is a mistake worth reporting), keys are bounded
//!   like `symbols` entries and may not repeat; anything else is `bad_request`.
//! - `reauth` needs a non-empty string `token` of at most `max_token_bytes`.
//! - `publish` needs `ticks`, an array (at most `max_ticks_per_publish`, `bad_request`
//!   past it) of objects with exactly `s` (string), `ts` (non-negative integer, ns),
//!   `bid`, `ask`, `last`, `qty` (finite numbers; integers allowed, converted to `f64`).
//!   A float `ts` (even `1e18`) is rejected: timestamps are integers on the wire.
//!   Sign and ordering of prices are not judged here (negative prices exist in real markets).
//! - Numbers: `NaN`/`Infinity` literals are invalid JSON. simd-json (without its `128bit`
//!   feature) also refuses integer literals outside the `i64`/`u64` range as invalid, so such
//!   a message gets `bad_request` *without* its `id` (write big values as floats, `1e20`);
//!   the same holds for float literals that overflow `f64` (`1e999`). The finiteness check
//!   on prices is kept anyway, as defence in depth.
//!
//! Nesting depth: simd-json's stage 2 is iterative with a heap stack sized by the number of
//! structural characters, so hostile nesting cannot overflow the native stack (memory stays
//! proportional to the frame, which the codec bounds). Our walker descends only into the
//! fixed shapes above (object, array, tick object): a nested value anywhere else is a type
//! error, so no depth pre-scan is needed (checked by a test with 100 000 levels).
//!
//! # Encoding
//!
//! Server messages are small and rare compared to ticks; they are still written by hand
//! (a few `extend_from_slice` calls) so that no serde types are needed, with strings
//! escaped by [`write_json_str`]. `id` is omitted when `None`.

use simd_json::{Buffers, Node, StaticNode};

use super::json::write_json_str;
use super::tick::Tick;

/// A string in `symbols` (or a tick's `s`) longer than this rejects the whole message:
/// symbols are at most 32 bytes, and the bound keeps hostile strings out of the session.
pub const MAX_SYMBOL_FIELD_BYTES: usize = 64;

/// A parsed, schema-checked client message.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientMsg {
    Subscribe {
        id: Option<u64>,
        symbols: Vec<String>,
        snapshot: bool,
        /// Symbol -> the last `seq` the client processed (empty without `since`).
        since: Vec<(String, u64)>,
    },
    Unsubscribe {
        id: Option<u64>,
        symbols: Vec<String>,
    },
    Reauth {
        id: Option<u64>,
        token: String,
    },
    Ping {
        id: Option<u64>,
    },
    Publish {
        id: Option<u64>,
        ticks: Vec<(String, Tick)>,
    },
}

impl ClientMsg {
    /// The request id to echo in the answer.
    pub fn id(&self) -> Option<u64> {
        match self {
            ClientMsg::Subscribe { id, .. }
            | ClientMsg::Unsubscribe { id, .. }
            | ClientMsg::Reauth { id, .. }
            | ClientMsg::Ping { id }
            | ClientMsg::Publish { id, .. } => *id,
        }
    }
}

/// A rejected client message; `id` is recovered when possible so the error can echo it.
/// Never ends the connection: the session answers with an `error` message.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct MsgError {
    pub id: Option<u64>,
    pub code: ErrorCode,
    pub message: String,
}

/// The error codes of PROTOCOL.md section 5.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BadRequest,
    UnknownOp,
    Forbidden,
    RateLimited,
    TooManySymbols,
    NotFound,
    /// `[cluster]`: the bus cannot take a `publish` now.
    Unavailable,
}

impl ErrorCode {
    /// The wire name (`"bad_request"`, ...).
    pub fn as_str(&self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownOp => "unknown_op",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::TooManySymbols => "too_many_symbols",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Unavailable => "unavailable",
        }
    }
}

/// Bounds applied while parsing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsgLimits {
    pub max_symbols_per_message: usize,
    pub max_ticks_per_publish: usize,
    pub max_token_bytes: usize,
}

impl Default for MsgLimits {
    fn default() -> Self {
        Self {
            max_symbols_per_message: 1024,
            max_ticks_per_publish: 1024,
            max_token_bytes: 8192,
        }
    }
}

/// Parses one client text frame. `text` is used as scratch space (simd-json unescapes in place).
pub fn parse_client_msg(text: &mut [u8], limits: &MsgLimits) -> Result<ClientMsg, MsgError> {
    let mut buffers = Buffers::new(text.len());
    parse_client_msg_with_buffers(text, limits, &mut buffers)
}

/// As [`parse_client_msg`], reusing simd-json's scratch buffers across calls (one per shard).
pub fn parse_client_msg_with_buffers(
    text: &mut [u8],
    limits: &MsgLimits,
    buffers: &mut Buffers,
) -> Result<ClientMsg, MsgError> {
    let tape = simd_json::to_tape_with_buffers(text, buffers)
        .map_err(|_| err(None, ErrorCode::BadRequest, "invalid JSON"))?;
    parse_tape(&tape.0, limits)
}

/// Why [`parse_tick_json`] refused a payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TickJsonError {
    /// Not UTF-8 JSON.
    NotJson,
    /// JSON, but not one valid tick object.
    Invalid,
}

/// One tick object on its own (a feed handler's payload on the bus): exactly the rules of
/// a tick in `publish`. `text` is scratch space, as for [`parse_client_msg`].
pub fn parse_tick_json(text: &mut [u8], buffers: &mut Buffers) -> Result<(String, Tick), TickJsonError> {
    let tape = simd_json::to_tape_with_buffers(text, buffers).map_err(|_| TickJsonError::NotJson)?;
    parse_tick(&tape.0).map_err(|_| TickJsonError::Invalid)
}

fn err(id: Option<u64>, code: ErrorCode, message: &str) -> MsgError {
    MsgError {
        id,
        code,
        message: message.to_owned(),
    }
}

/// Number of tape nodes `v` spans (itself plus its nested nodes).
fn span(v: &Node<'_>) -> usize {
    match v {
        Node::Object { count, .. } | Node::Array { count, .. } => count.saturating_add(1),
        _ => 1,
    }
}

/// Iterates the `(key, value)` pairs of the object whose header is `nodes[0]`; each value
/// is the slice of nodes it spans. Stops (returns `None`) on a malformed tape instead of
/// panicking, which the caller turns into an error.
struct ObjIter<'t, 'i> {
    nodes: &'t [Node<'i>],
    left: usize,
}

impl<'t, 'i> ObjIter<'t, 'i> {
    fn new(nodes: &'t [Node<'i>]) -> Option<(usize, Self)> {
        match nodes.first()? {
            Node::Object { len, .. } => Some((
                *len,
                Self {
                    nodes: nodes.get(1..)?,
                    left: *len,
                },
            )),
            _ => None,
        }
    }
}

impl<'t, 'i> Iterator for ObjIter<'t, 'i> {
    type Item = Option<(&'i str, &'t [Node<'i>])>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let item = (|| {
            let (k, rest) = self.nodes.split_first()?;
            let Node::String(k) = k else { return None };
            let n = span(rest.first()?);
            let v = rest.get(..n)?;
            self.nodes = rest.get(n..)?;
            Some((*k, v))
        })();
        if item.is_none() {
            self.left = 0;
        }
        Some(item)
    }
}

/// Iterates the elements of the array whose header is `nodes[0]`.
fn array_elems<'t, 'i>(
    nodes: &'t [Node<'i>],
) -> Option<(usize, impl Iterator<Item = Option<&'t [Node<'i>]>>)> {
    let Node::Array { len, .. } = nodes.first()? else {
        return None;
    };
    let mut rest = nodes.get(1..)?;
    let it = (0..*len).map(move |_| {
        let n = span(rest.first()?);
        let v = rest.get(..n)?;
        rest = rest.get(n..)?;
        Some(v)
    });
    Some((*len, it))
}

fn as_u64(v: &[Node<'_>]) -> Option<u64> {
    match v.first()? {
        Node::Static(StaticNode::U64(n)) => Some(*n),
        Node::Static(StaticNode::I64(n)) => u64::try_from(*n).ok(),
        _ => None,
    }
}

fn as_finite_f64(v: &[Node<'_>]) -> Option<f64> {
    let f = match v.first()? {
        Node::Static(StaticNode::F64(f)) => *f,
        Node::Static(StaticNode::I64(n)) => *n as f64,
        Node::Static(StaticNode::U64(n)) => *n as f64,
        _ => return None,
    };
    f.is_finite().then_some(f)
}

fn as_str<'i>(v: &[Node<'i>]) -> Option<&'i str> {
    match v.first()? {
        Node::String(s) => Some(s),
        _ => None,
    }
}

#[derive(Default)]
struct TopFields<'t, 'i> {
    op: Option<&'t [Node<'i>]>,
    id: Option<&'t [Node<'i>]>,
    symbols: Option<&'t [Node<'i>]>,
    snapshot: Option<&'t [Node<'i>]>,
    since: Option<&'t [Node<'i>]>,
    token: Option<&'t [Node<'i>]>,
    ticks: Option<&'t [Node<'i>]>,
    unknown: bool,
    duplicate: bool,
    id_duplicate: bool,
}

fn parse_tape(nodes: &[Node<'_>], limits: &MsgLimits) -> Result<ClientMsg, MsgError> {
    let bad = |id, m| err(id, ErrorCode::BadRequest, m);
    let Some((_, iter)) = ObjIter::new(nodes) else {
        return Err(bad(None, "message must be a JSON object"));
    };
    let mut f = TopFields::default();
    let mut malformed = false;
    for item in iter {
        let Some((k, v)) = item else {
            malformed = true;
            break;
        };
        let slot = match k {
            "op" => &mut f.op,
            "id" => &mut f.id,
            "symbols" => &mut f.symbols,
            "snapshot" => &mut f.snapshot,
            "since" => &mut f.since,
            "token" => &mut f.token,
            "ticks" => &mut f.ticks,
            _ => {
                f.unknown = true;
                continue;
            }
        };
        if slot.is_some() {
            f.duplicate = true;
            f.id_duplicate |= k == "id";
        }
        *slot = Some(v);
    }
    if malformed {
        return Err(bad(None, "malformed message"));
    }

    // The id comes first so every later error can echo it.
    let id = match f.id {
        None => None,
        Some(_) if f.id_duplicate => return Err(bad(None, "duplicate field")),
        Some(v) => match as_u64(v) {
            Some(id) => Some(id),
            None => return Err(bad(None, "id must be a non-negative integer")),
        },
    };
    if f.duplicate {
        return Err(bad(id, "duplicate field"));
    }
    let op = match f.op.map(as_str) {
        Some(Some(op)) => op,
        Some(None) => return Err(bad(id, "op must be a string")),
        None => return Err(bad(id, "missing op")),
    };
    // Fields each op accepts besides `op` and `id`.
    let allowed: [bool; 5] = match op {
        // [symbols, snapshot, since, token, ticks]
        "subscribe" => [true, true, true, false, false],
        "unsubscribe" => [true, false, false, false, false],
        "reauth" => [false, false, false, true, false],
        "ping" => [false, false, false, false, false],
        "publish" => [false, false, false, false, true],
        _ => return Err(err(id, ErrorCode::UnknownOp, "unknown op")),
    };
    let present = [
        f.symbols.is_some(),
        f.snapshot.is_some(),
        f.since.is_some(),
        f.token.is_some(),
        f.ticks.is_some(),
    ];
    if f.unknown || present.iter().zip(allowed).any(|(p, a)| *p && !a) {
        return Err(bad(id, "unknown field"));
    }

    match op {
        "subscribe" => {
            let symbols = parse_symbols(f.symbols, id, limits, ErrorCode::TooManySymbols)?;
            let snapshot = match f.snapshot.map(|v| v.first()) {
                None => false,
                Some(Some(Node::Static(StaticNode::Bool(b)))) => *b,
                Some(_) => return Err(bad(id, "snapshot must be a boolean")),
            };
            let since = match f.since {
                None => Vec::new(),
                Some(v) => parse_since(v, &symbols).map_err(|m| bad(id, m))?,
            };
            Ok(ClientMsg::Subscribe {
                id,
                symbols,
                snapshot,
                since,
            })
        }
        "unsubscribe" => {
            let symbols = parse_symbols(f.symbols, id, limits, ErrorCode::BadRequest)?;
            Ok(ClientMsg::Unsubscribe { id, symbols })
        }
        "reauth" => {
            let token = match f.token.map(as_str) {
                Some(Some(t)) if !t.is_empty() && t.len() <= limits.max_token_bytes => t,
                Some(Some(t)) if !t.is_empty() => return Err(bad(id, "token too long")),
                Some(_) => return Err(bad(id, "token must be a non-empty string")),
                None => return Err(bad(id, "missing token")),
            };
            Ok(ClientMsg::Reauth {
                id,
                token: token.to_owned(),
            })
        }
        "ping" => Ok(ClientMsg::Ping { id }),
        _ => {
            let ticks = parse_ticks(f.ticks, id, limits)?;
            Ok(ClientMsg::Publish { id, ticks })
        }
    }
}

fn parse_symbols(
    v: Option<&[Node<'_>]>,
    id: Option<u64>,
    limits: &MsgLimits,
    too_many: ErrorCode,
) -> Result<Vec<String>, MsgError> {
    let bad = |m| err(id, ErrorCode::BadRequest, m);
    let v = v.ok_or_else(|| bad("missing symbols"))?;
    let (len, elems) = array_elems(v).ok_or_else(|| bad("symbols must be an array"))?;
    if len > limits.max_symbols_per_message {
        return Err(err(id, too_many, "too many symbols in one message"));
    }
    let mut out = Vec::with_capacity(len);
    for e in elems {
        let s = e.and_then(as_str).ok_or_else(|| bad("symbols must be strings"))?;
        if s.len() > MAX_SYMBOL_FIELD_BYTES {
            return Err(bad("symbol too long"));
        }
        out.push(s.to_owned());
    }
    Ok(out)
}

/// `since`: an object from symbol (one of `symbols`, once) to a `seq`. Its size is bounded
/// by `symbols`' (already checked).
fn parse_since(v: &[Node<'_>], symbols: &[String]) -> Result<Vec<(String, u64)>, &'static str> {
    let (len, iter) = ObjIter::new(v).ok_or("since must be an object")?;
    if len > symbols.len() {
        return Err("since names a symbol not in symbols");
    }
    // Hash sets: a message may carry `max_symbols_per_message` of each.
    let asked: std::collections::HashSet<&str> = symbols.iter().map(String::as_str).collect();
    let mut seen = std::collections::HashSet::with_capacity(len);
    let mut out: Vec<(String, u64)> = Vec::with_capacity(len);
    for item in iter {
        let (k, v) = item.ok_or("malformed message")?;
        if k.len() > MAX_SYMBOL_FIELD_BYTES {
            return Err("symbol too long");
        }
        if !asked.contains(k) {
            return Err("since names a symbol not in symbols");
        }
        if !seen.insert(k) {
            return Err("duplicate symbol in since");
        }
        let seq = as_u64(v).ok_or("since values must be non-negative integers")?;
        out.push((k.to_owned(), seq));
    }
    Ok(out)
}

fn parse_ticks(
    v: Option<&[Node<'_>]>,
    id: Option<u64>,
    limits: &MsgLimits,
) -> Result<Vec<(String, Tick)>, MsgError> {
    let bad = |m| err(id, ErrorCode::BadRequest, m);
    let v = v.ok_or_else(|| bad("missing ticks"))?;
    let (len, elems) = array_elems(v).ok_or_else(|| bad("ticks must be an array"))?;
    if len > limits.max_ticks_per_publish {
        return Err(bad("too many ticks in one message"));
    }
    let mut out = Vec::with_capacity(len);
    for e in elems {
        let e = e.ok_or_else(|| bad("malformed message"))?;
        out.push(parse_tick(e).map_err(bad)?);
    }
    Ok(out)
}

fn parse_tick(v: &[Node<'_>]) -> Result<(String, Tick), &'static str> {
    let (_, iter) = ObjIter::new(v).ok_or("a tick must be an object")?;
    // s, ts, bid, ask, last, qty
    let mut slots: [Option<&[Node<'_>]>; 6] = [None; 6];
    for item in iter {
        let (k, v) = item.ok_or("malformed message")?;
        let i = match k {
            "s" => 0,
            "ts" => 1,
            "bid" => 2,
            "ask" => 3,
            "last" => 4,
            "qty" => 5,
            _ => return Err("unknown field in tick"),
        };
        let slot = slots.get_mut(i).ok_or("malformed message")?;
        if slot.replace(v).is_some() {
            return Err("duplicate field in tick");
        }
    }
    let [Some(s), Some(ts), Some(bid), Some(ask), Some(last), Some(qty)] = slots else {
        return Err("a tick needs s, ts, bid, ask, last and qty");
    };
    let s = as_str(s).ok_or("tick s must be a string")?;
    if s.len() > MAX_SYMBOL_FIELD_BYTES {
        return Err("symbol too long");
    }
    let ts = as_u64(ts).ok_or("tick ts must be a non-negative integer")?;
    let num = |v| as_finite_f64(v).ok_or("tick prices and qty must be finite numbers");
    let tick = Tick {
        ts,
        bid: num(bid)?,
        ask: num(ask)?,
        last: num(last)?,
        qty: num(qty)?,
    };
    Ok((s.to_owned(), tick))
}

// ---------------------------------------------------------------------------------------
// Server messages

fn open(kind: &str, id: Option<u64>, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"type\":\"");
    out.extend_from_slice(kind.as_bytes());
    out.push(b'"');
    if let Some(id) = id {
        out.extend_from_slice(b",\"id\":");
        out.extend_from_slice(itoa::Buffer::new().format(id).as_bytes());
    }
}

fn field_u64(key: &str, v: u64, out: &mut Vec<u8>) {
    out.extend_from_slice(b",\"");
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(b"\":");
    out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
}

fn field_str(key: &str, v: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(b",\"");
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(b"\":");
    write_json_str(v, out);
}

fn str_array(key: &str, items: &[&str], out: &mut Vec<u8>) {
    out.extend_from_slice(b",\"");
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(b"\":[");
    for (i, s) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_json_str(s, out);
    }
    out.push(b']');
}

/// `{"type":"welcome","sub":..,"sid":..|null,"exp":..,"heartbeat_ms":..}`
pub fn encode_welcome(sub: &str, sid: Option<&str>, exp: u64, heartbeat_ms: u64, out: &mut Vec<u8>) {
    open("welcome", None, out);
    field_str("sub", sub, out);
    match sid {
        Some(sid) => field_str("sid", sid, out),
        None => out.extend_from_slice(b",\"sid\":null"),
    }
    field_u64("exp", exp, out);
    field_u64("heartbeat_ms", heartbeat_ms, out);
    out.push(b'}');
}

/// `{"type":"subscribed","id":..,"symbols":[..],"rejected":[{"symbol":..,"code":..}]}`;
/// `rejected` is always present (possibly empty) so clients need not special-case it.
pub fn encode_subscribed(
    id: Option<u64>,
    symbols: &[&str],
    rejected: &[(&str, ErrorCode)],
    out: &mut Vec<u8>,
) {
    open("subscribed", id, out);
    str_array("symbols", symbols, out);
    out.extend_from_slice(b",\"rejected\":[");
    for (i, (s, code)) in rejected.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"symbol\":");
        write_json_str(s, out);
        field_str("code", code.as_str(), out);
        out.push(b'}');
    }
    out.extend_from_slice(b"]}");
}

/// `{"type":"unsubscribed","id":..,"symbols":[..]}` plus `"reason":..` when given
/// (`"entitlement"` when a reauth narrowed the token).
pub fn encode_unsubscribed(id: Option<u64>, symbols: &[&str], reason: Option<&str>, out: &mut Vec<u8>) {
    open("unsubscribed", id, out);
    str_array("symbols", symbols, out);
    if let Some(r) = reason {
        field_str("reason", r, out);
    }
    out.push(b'}');
}

/// `{"type":"reauth_required","exp":..,"deadline":..}`
pub fn encode_reauth_required(exp: u64, deadline: u64, out: &mut Vec<u8>) {
    open("reauth_required", None, out);
    field_u64("exp", exp, out);
    field_u64("deadline", deadline, out);
    out.push(b'}');
}

/// `{"type":"reauthed","id":..,"exp":..}`
pub fn encode_reauthed(id: Option<u64>, exp: u64, out: &mut Vec<u8>) {
    open("reauthed", id, out);
    field_u64("exp", exp, out);
    out.push(b'}');
}

/// `{"type":"pong","id":..}`
pub fn encode_pong(id: Option<u64>, out: &mut Vec<u8>) {
    open("pong", id, out);
    out.push(b'}');
}

/// `{"type":"published","id":..,"count":..}`
pub fn encode_published(id: Option<u64>, count: usize, out: &mut Vec<u8>) {
    open("published", id, out);
    field_u64("count", count as u64, out);
    out.push(b'}');
}

/// `{"type":"error","id":..,"code":..,"message":..}`
pub fn encode_error(id: Option<u64>, code: ErrorCode, message: &str, out: &mut Vec<u8>) {
    open("error", id, out);
    field_str("code", code.as_str(), out);
    field_str("message", message, out);
    out.push(b'}');
}

/// Encodes the `error` answering a rejected message.
pub fn encode_msg_error(e: &MsgError, out: &mut Vec<u8>) {
    encode_error(e.id, e.code, &e.message, out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(s: &str) -> Result<ClientMsg, MsgError> {
        let mut b = s.as_bytes().to_vec();
        parse_client_msg(&mut b, &MsgLimits::default())
    }

    fn parse_err(s: &str) -> (Option<u64>, ErrorCode) {
        let e = parse(s).expect_err(s);
        (e.id, e.code)
    }

    const BAD: ErrorCode = ErrorCode::BadRequest;

    #[test]
    fn protocol_examples() {
        assert_eq!(
            parse(r#"{"op":"subscribe","id":1,"symbols":["BTC-USD","ETH-USD"],"snapshot":true}"#),
            Ok(ClientMsg::Subscribe {
                id: Some(1),
                symbols: vec!["BTC-USD".into(), "ETH-USD".into()],
                snapshot: true,
                since: vec![]
            })
        );
        assert_eq!(
            parse(
                r#"{"op":"subscribe","id":7,"symbols":["BTC-USD","ETH-USD"],"since":{"BTC-USD":41,"ETH-USD":17}}"#
            ),
            Ok(ClientMsg::Subscribe {
                id: Some(7),
                symbols: vec!["BTC-USD".into(), "ETH-USD".into()],
                snapshot: false,
                since: vec![("BTC-USD".into(), 41), ("ETH-USD".into(), 17)]
            })
        );
        assert_eq!(
            parse(r#"{"op":"unsubscribe","id":2,"symbols":["BTC-USD"]}"#),
            Ok(ClientMsg::Unsubscribe {
                id: Some(2),
                symbols: vec!["BTC-USD".into()]
            })
        );
        assert_eq!(
            parse(r#"{"op":"reauth","id":3,"token":"aaa.bbb.ccc"}"#),
            Ok(ClientMsg::Reauth {
                id: Some(3),
                token: "aaa.bbb.ccc".into()
            })
        );
        assert_eq!(
            parse(r#"{"op":"ping","id":4}"#),
            Ok(ClientMsg::Ping { id: Some(4) })
        );
        assert_eq!(
            parse(
                r#"{"op":"publish","id":5,"ticks":[{"s":"BTC-USD","ts":1732345678123456789,"bid":100.25,"ask":100.5,"last":100.4,"qty":3}]}"#
            ),
            Ok(ClientMsg::Publish {
                id: Some(5),
                ticks: vec![(
                    "BTC-USD".into(),
                    Tick {
                        ts: 1732345678123456789,
                        bid: 100.25,
                        ask: 100.5,
                        last: 100.4,
                        qty: 3.0
                    }
                )]
            })
        );
    }

    /// `since` (PROTOCOL.md 10): every malformed shape is `bad_request` with the id echoed.
    #[test]
    fn since_is_strict() {
        assert!(matches!(
            parse(r#"{"op":"subscribe","symbols":["A"],"since":{"A":0},"snapshot":true}"#),
            Ok(ClientMsg::Subscribe { ref since, snapshot: true, .. }) if since == &[("A".to_string(), 0)]
        ));
        assert!(matches!(
            parse(r#"{"op":"subscribe","symbols":["A","B"],"since":{}}"#),
            Ok(ClientMsg::Subscribe { ref since, .. }) if since.is_empty()
        ));
        for bad in [
            r#"{"op":"subscribe","id":9,"symbols":["A"],"since":[1]}"#,
            r#"{"op":"subscribe","id":9,"symbols":["A"],"since":5}"#,
            r#"{"op":"subscribe","id":9,"symbols":["A"],"since":null}"#,
            r#"{"op":"subscribe","id":9,"symbols":["A"],"since":{"A":-1}}"#,
            r#"{"op":"subscribe","id":9,"symbols":["A"],"since":{"A":1.5}}"#,
            r#"{"op":"subscribe","id":9,"symbols":["A"],"since":{"A":"41"}}"#,
            r#"{"op":"subscribe","id":9,"symbols":["A"],"since":{"A":{"seq":1}}}"#,
            r#"{"op":"subscribe","id":9,"symbols":["A"],"since":{"B":1}}"#,
            r#"{"op":"subscribe","id":9,"symbols":["A"],"since":{"A":1,"A":2}}"#,
            r#"{"op":"subscribe","id":9,"symbols":["A"],"since":{"A":1},"since":{"A":1}}"#,
            r#"{"op":"unsubscribe","id":9,"symbols":["A"],"since":{"A":1}}"#,
        ] {
            assert_eq!(parse_err(bad), (Some(9), BAD), "{bad}");
        }
        let long = "X".repeat(MAX_SYMBOL_FIELD_BYTES + 1);
        let m = format!(r#"{{"op":"subscribe","id":9,"symbols":["A"],"since":{{"{long}":1}}}}"#);
        assert_eq!(parse_err(&m), (Some(9), BAD));
        // More keys than symbols: refused before any is looked at.
        let keys: Vec<String> = (0..100).map(|i| format!(r#""S{i}":1"#)).collect();
        let m = format!(
            r#"{{"op":"subscribe","id":9,"symbols":["S1"],"since":{{{}}}}}"#,
            keys.join(",")
        );
        assert_eq!(parse_err(&m), (Some(9), BAD));
    }

    #[test]
    fn optional_fields_and_whitespace() {
        assert_eq!(parse(r#"{"op":"ping"}"#), Ok(ClientMsg::Ping { id: None }));
        assert_eq!(
            parse(" \n{ \"symbols\" : [ ] , \"op\" : \"subscribe\" }\t"),
            Ok(ClientMsg::Subscribe {
                id: None,
                symbols: vec![],
                snapshot: false,
                since: vec![]
            })
        );
        assert_eq!(
            parse(r#"{"op":"publish","ticks":[]}"#),
            Ok(ClientMsg::Publish {
                id: None,
                ticks: vec![]
            })
        );
        assert_eq!(
            parse(r#"{"op":"ping","id":18446744073709551615}"#),
            Ok(ClientMsg::Ping { id: Some(u64::MAX) })
        );
        assert_eq!(parse(r#"{"op":"ping","id":0}"#).unwrap().id(), Some(0));
        // Escapes are decoded; syntax is the session's business.
        assert_eq!(
            parse(r#"{"op":"unsubscribe","symbols":["BTC\u002dUSD","bad sym",""]}"#),
            Ok(ClientMsg::Unsubscribe {
                id: None,
                symbols: vec!["BTC-USD".into(), "bad sym".into(), "".into()]
            })
        );
    }

    #[test]
    fn invalid_json_and_non_objects() {
        for s in [
            "",
            " ",
            "{",
            "}",
            "nul",
            "{\"op\":\"ping\",}",
            "{\"op\":\"ping\"} trailing",
            "{\"op\":\"ping\"}{\"op\":\"ping\"}",
            "{\"op\":'ping'}",
            "{op:\"ping\"}",
            "{\"op\":\"ping\",\"id\":NaN}",
            "{\"op\":\"ping\",\"id\":Infinity}",
            "{\"op\":\"ping\",\"id\":01}",
            "{\"op\":\"ping\",\"id\":1.}",
            "{\"op\":\"ping\",\"id\":+1}",
            "{\"op\":\"pi\\xng\"}",
        ] {
            assert_eq!(parse_err(s), (None, BAD), "{s:?}");
        }
        for s in ["null", "1", "\"ping\"", "[]", "[{\"op\":\"ping\"}]", "true"] {
            assert_eq!(parse_err(s), (None, BAD), "{s:?}");
        }
        // Invalid UTF-8 never gets past simd-json.
        let mut b = b"{\"op\":\"ping\",\"x\":\"\xff\"}".to_vec();
        assert_eq!(
            parse_client_msg(&mut b, &MsgLimits::default()).unwrap_err().code,
            BAD
        );
    }

    #[test]
    fn id_handling() {
        for s in [
            r#"{"op":"ping","id":-1}"#,
            r#"{"op":"ping","id":1.5}"#,
            r#"{"op":"ping","id":1e3}"#,
            r#"{"op":"ping","id":"1"}"#,
            r#"{"op":"ping","id":null}"#,
            r#"{"op":"ping","id":[1]}"#,
            r#"{"op":"ping","id":18446744073709551616}"#,
            r#"{"op":"ping","id":1,"id":1}"#,
            r#"{"op":"nope","id":true}"#,
        ] {
            assert_eq!(parse_err(s), (None, BAD), "{s}");
        }
        // Errors after a good id echo it.
        assert_eq!(
            parse_err(r#"{"id":9,"op":"nope"}"#),
            (Some(9), ErrorCode::UnknownOp)
        );
        assert_eq!(parse_err(r#"{"id":9}"#), (Some(9), BAD));
        assert_eq!(parse_err(r#"{"id":9,"op":5}"#), (Some(9), BAD));
        assert_eq!(parse_err(r#"{"op":"ping","id":9,"x":1}"#), (Some(9), BAD));
    }

    #[test]
    fn unknown_op_and_fields() {
        assert_eq!(parse_err(r#"{"op":"PING"}"#), (None, ErrorCode::UnknownOp));
        assert_eq!(parse_err(r#"{"op":""}"#), (None, ErrorCode::UnknownOp));
        assert_eq!(
            parse_err(r#"{"op":"subscribe\u0000","id":3}"#),
            (Some(3), ErrorCode::UnknownOp)
        );
        for s in [
            r#"{"op":"ping","id":1,"extra":1}"#,
            r#"{"op":"ping","id":1,"symbols":[]}"#,
            r#"{"op":"subscribe","id":1,"symbols":[],"snapshots":true}"#,
            r#"{"op":"unsubscribe","id":1,"symbols":[],"snapshot":true}"#,
            r#"{"op":"reauth","id":1,"token":"t","symbols":[]}"#,
            r#"{"op":"publish","id":1,"ticks":[],"token":"t"}"#,
            r#"{"op":"subscribe","id":1,"symbols":[],"Symbols":[]}"#,
        ] {
            assert_eq!(parse_err(s), (Some(1), BAD), "{s}");
        }
    }

    #[test]
    fn duplicate_keys_rejected() {
        assert_eq!(parse_err(r#"{"op":"ping","op":"ping","id":2}"#), (Some(2), BAD));
        assert_eq!(
            parse_err(r#"{"op":"subscribe","id":2,"symbols":["A"],"symbols":["B"]}"#),
            (Some(2), BAD)
        );
        assert_eq!(
            parse_err(
                r#"{"op":"publish","id":2,"ticks":[{"s":"A","s":"B","ts":1,"bid":1,"ask":1,"last":1,"qty":1}]}"#
            ),
            (Some(2), BAD)
        );
    }

    #[test]
    fn wrong_types() {
        for s in [
            r#"{"op":"subscribe","id":1}"#,
            r#"{"op":"subscribe","id":1,"symbols":"BTC-USD"}"#,
            r#"{"op":"subscribe","id":1,"symbols":[1]}"#,
            r#"{"op":"subscribe","id":1,"symbols":[["A"]]}"#,
            r#"{"op":"subscribe","id":1,"symbols":[null]}"#,
            r#"{"op":"subscribe","id":1,"symbols":{"A":1}}"#,
            r#"{"op":"subscribe","id":1,"symbols":["A"],"snapshot":1}"#,
            r#"{"op":"subscribe","id":1,"symbols":["A"],"snapshot":"true"}"#,
            r#"{"op":"subscribe","id":1,"symbols":["A"],"snapshot":null}"#,
            r#"{"op":"unsubscribe","id":1}"#,
            r#"{"op":"reauth","id":1}"#,
            r#"{"op":"reauth","id":1,"token":""}"#,
            r#"{"op":"reauth","id":1,"token":5}"#,
            r#"{"op":"publish","id":1}"#,
            r#"{"op":"publish","id":1,"ticks":{}}"#,
            r#"{"op":"publish","id":1,"ticks":[1]}"#,
            r#"{"op":"publish","id":1,"ticks":[[]]}"#,
        ] {
            assert_eq!(parse_err(s), (Some(1), BAD), "{s}");
        }
        assert_eq!(
            parse(r#"{"op":"subscribe","symbols":["A"],"snapshot":false}"#)
                .unwrap()
                .id(),
            None
        );
    }

    fn tick_msg(fields: &str) -> String {
        format!(r#"{{"op":"publish","id":7,"ticks":[{{{fields}}}]}}"#)
    }

    #[test]
    fn tick_validation() {
        let ok = r#""s":"A","ts":0,"bid":-1.5,"ask":2,"last":1e3,"qty":0"#;
        let m = parse(&tick_msg(ok)).unwrap();
        let ClientMsg::Publish { ticks, .. } = m else {
            panic!()
        };
        assert_eq!(ticks[0].1.ask, 2.0);
        assert_eq!(ticks[0].1.last, 1000.0);
        for f in [
            r#""ts":0,"bid":1,"ask":2,"last":1,"qty":0"#,
            r#""s":"A","bid":1,"ask":2,"last":1,"qty":0"#,
            r#""s":"A","ts":0,"ask":2,"last":1,"qty":0"#,
            r#""s":"A","ts":0,"bid":1,"ask":2,"last":1"#,
            r#""s":"A","ts":0,"bid":1,"ask":2,"last":1,"qty":0,"x":1"#,
            r#""s":1,"ts":0,"bid":1,"ask":2,"last":1,"qty":0"#,
            r#""s":"A","ts":-1,"bid":1,"ask":2,"last":1,"qty":0"#,
            r#""s":"A","ts":1.0,"bid":1,"ask":2,"last":1,"qty":0"#,
            r#""s":"A","ts":1e18,"bid":1,"ask":2,"last":1,"qty":0"#,
            r#""s":"A","ts":"1","bid":1,"ask":2,"last":1,"qty":0"#,
            r#""s":"A","ts":0,"bid":"1","ask":2,"last":1,"qty":0"#,
            r#""s":"A","ts":0,"bid":null,"ask":2,"last":1,"qty":0"#,
            r#""s":"A","ts":0,"bid":true,"ask":2,"last":1,"qty":0"#,
            r#""s":"A","ts":0,"bid":[1],"ask":2,"last":1,"qty":0"#,
        ] {
            let e = parse(&tick_msg(f)).expect_err(f);
            assert_eq!((e.id, e.code), (Some(7), BAD), "{f}");
        }
        // simd-json (without its `128bit` feature) refuses integer literals beyond the
        // i64/u64 range, and floats overflowing f64, as invalid JSON: bad_request without id.
        for f in [
            r#""s":"A","ts":99999999999999999999,"bid":1,"ask":2,"last":1,"qty":0"#,
            r#""s":"A","ts":1,"bid":1,"ask":99999999999999999999999,"last":1,"qty":0"#,
            r#""s":"A","ts":1,"bid":1,"ask":-9223372036854775809,"last":1,"qty":0"#,
            r#""s":"A","ts":0,"bid":1e999,"ask":2,"last":1,"qty":0"#,
            r#""s":"A","ts":0,"bid":-1e400,"ask":2,"last":1,"qty":0"#,
        ] {
            assert_eq!(parse_err(&tick_msg(f)), (None, BAD), "{f}");
        }
        // Huge but finite numbers are fine.
        let m = parse(&tick_msg(
            r#""s":"A","ts":18446744073709551615,"bid":1.7976931348623157e308,"ask":9.9e22,"last":5e-324,"qty":0"#,
        ))
        .unwrap();
        let ClientMsg::Publish { ticks, .. } = m else {
            panic!()
        };
        assert_eq!(ticks[0].1.ts, u64::MAX);
        assert_eq!(ticks[0].1.bid, f64::MAX);
        assert_eq!(ticks[0].1.ask, 9.9e22);
        assert_eq!(ticks[0].1.last, 5e-324);
    }

    #[test]
    fn bounds() {
        let limits = MsgLimits {
            max_symbols_per_message: 2,
            max_ticks_per_publish: 1,
            max_token_bytes: 4,
        };
        let p = |s: &str| {
            let mut b = s.as_bytes().to_vec();
            parse_client_msg(&mut b, &limits).map_err(|e| (e.id, e.code))
        };
        assert!(p(r#"{"op":"subscribe","symbols":["A","B"]}"#).is_ok());
        assert_eq!(
            p(r#"{"op":"subscribe","id":1,"symbols":["A","B","C"]}"#),
            Err((Some(1), ErrorCode::TooManySymbols))
        );
        assert_eq!(
            p(r#"{"op":"unsubscribe","id":1,"symbols":["A","B","C"]}"#),
            Err((Some(1), BAD))
        );
        assert!(p(r#"{"op":"reauth","token":"abcd"}"#).is_ok());
        assert_eq!(
            p(r#"{"op":"reauth","id":1,"token":"abcde"}"#),
            Err((Some(1), BAD))
        );
        let t = r#"{"s":"A","ts":0,"bid":1,"ask":2,"last":1,"qty":0}"#;
        assert!(p(&format!(r#"{{"op":"publish","ticks":[{t}]}}"#)).is_ok());
        assert_eq!(
            p(&format!(r#"{{"op":"publish","id":1,"ticks":[{t},{t}]}}"#)),
            Err((Some(1), BAD))
        );
        let long = "A".repeat(MAX_SYMBOL_FIELD_BYTES + 1);
        let ok = "A".repeat(MAX_SYMBOL_FIELD_BYTES);
        assert!(p(&format!(r#"{{"op":"subscribe","symbols":["{ok}"]}}"#)).is_ok());
        assert_eq!(
            p(&format!(r#"{{"op":"subscribe","id":1,"symbols":["{long}"]}}"#)),
            Err((Some(1), BAD))
        );
        let tl = t.replace("\"A\"", &format!("\"{long}\""));
        assert_eq!(
            p(&format!(r#"{{"op":"publish","id":1,"ticks":[{tl}]}}"#)),
            Err((Some(1), BAD))
        );
    }

    #[test]
    fn deep_nesting_is_harmless() {
        for depth in [9, 1000, 100_000] {
            let nested = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
            assert_eq!(parse_err(&nested), (None, BAD));
            let in_field = format!(r#"{{"op":"ping","id":1,"x":{nested}}}"#);
            assert_eq!(parse_err(&in_field), (Some(1), BAD));
            let in_symbols = format!(r#"{{"op":"subscribe","id":1,"symbols":{nested}}}"#);
            assert_eq!(parse_err(&in_symbols), (Some(1), BAD));
            let objs = format!("{}{}", r#"{"a":"#.repeat(depth), "}".repeat(depth));
            assert_eq!(parse_err(&objs).1, BAD);
            // Unbalanced: invalid JSON.
            assert_eq!(parse_err(&"[".repeat(depth)), (None, BAD));
        }
    }

    #[test]
    fn reusable_buffers() {
        let mut buffers = Buffers::default();
        for i in 0..3u64 {
            let mut b = format!(r#"{{"op":"ping","id":{i}}}"#).into_bytes();
            let m = parse_client_msg_with_buffers(&mut b, &MsgLimits::default(), &mut buffers);
            assert_eq!(m, Ok(ClientMsg::Ping { id: Some(i) }));
        }
    }

    fn json(out: &[u8]) -> serde_json::Value {
        serde_json::from_slice(out).unwrap()
    }

    #[test]
    fn server_messages_exact() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                {
                    let mut o = vec![];
                    encode_welcome("alice", Some("s-1"), 1732346000, 15000, &mut o);
                    o
                },
                r#"{"type":"welcome","sub":"alice","sid":"s-1","exp":1732346000,"heartbeat_ms":15000}"#,
            ),
            (
                {
                    let mut o = vec![];
                    encode_welcome("bob", None, 1, 2, &mut o);
                    o
                },
                r#"{"type":"welcome","sub":"bob","sid":null,"exp":1,"heartbeat_ms":2}"#,
            ),
            (
                {
                    let mut o = vec![];
                    encode_subscribed(
                        Some(1),
                        &["BTC-USD"],
                        &[("ETH-USD", ErrorCode::Forbidden)],
                        &mut o,
                    );
                    o
                },
                r#"{"type":"subscribed","id":1,"symbols":["BTC-USD"],"rejected":[{"symbol":"ETH-USD","code":"forbidden"}]}"#,
            ),
            (
                {
                    let mut o = vec![];
                    encode_subscribed(None, &["A", "B"], &[], &mut o);
                    o
                },
                r#"{"type":"subscribed","symbols":["A","B"],"rejected":[]}"#,
            ),
            (
                {
                    let mut o = vec![];
                    encode_unsubscribed(Some(2), &["BTC-USD"], None, &mut o);
                    o
                },
                r#"{"type":"unsubscribed","id":2,"symbols":["BTC-USD"]}"#,
            ),
            (
                {
                    let mut o = vec![];
                    encode_unsubscribed(None, &["A"], Some("entitlement"), &mut o);
                    o
                },
                r#"{"type":"unsubscribed","symbols":["A"],"reason":"entitlement"}"#,
            ),
            (
                {
                    let mut o = vec![];
                    encode_reauth_required(1732346000, 1732346030, &mut o);
                    o
                },
                r#"{"type":"reauth_required","exp":1732346000,"deadline":1732346030}"#,
            ),
            (
                {
                    let mut o = vec![];
                    encode_reauthed(Some(3), 1732346900, &mut o);
                    o
                },
                r#"{"type":"reauthed","id":3,"exp":1732346900}"#,
            ),
            (
                {
                    let mut o = vec![];
                    encode_pong(Some(4), &mut o);
                    o
                },
                r#"{"type":"pong","id":4}"#,
            ),
            (
                {
                    let mut o = vec![];
                    encode_pong(None, &mut o);
                    o
                },
                r#"{"type":"pong"}"#,
            ),
            (
                {
                    let mut o = vec![];
                    encode_published(Some(5), 1, &mut o);
                    o
                },
                r#"{"type":"published","id":5,"count":1}"#,
            ),
            (
                {
                    let mut o = vec![];
                    encode_error(Some(1), ErrorCode::BadRequest, "bad \"x\"", &mut o);
                    o
                },
                r#"{"type":"error","id":1,"code":"bad_request","message":"bad \"x\""}"#,
            ),
        ];
        for (got, want) in cases {
            assert_eq!(std::str::from_utf8(&got).unwrap(), want);
            json(&got);
        }
    }

    #[test]
    fn error_codes() {
        let all = [
            (ErrorCode::BadRequest, "bad_request"),
            (ErrorCode::UnknownOp, "unknown_op"),
            (ErrorCode::Forbidden, "forbidden"),
            (ErrorCode::RateLimited, "rate_limited"),
            (ErrorCode::TooManySymbols, "too_many_symbols"),
            (ErrorCode::NotFound, "not_found"),
        ];
        for (c, s) in all {
            assert_eq!(c.as_str(), s);
        }
        let e = parse(r#"{"op":"x","id":3}"#).unwrap_err();
        let mut o = vec![];
        encode_msg_error(&e, &mut o);
        let v = json(&o);
        assert_eq!(v["id"], 3);
        assert_eq!(v["code"], "unknown_op");
    }

    proptest! {
        #[test]
        fn json_str_round_trips(s in "\\PC*|[\\x00-\\x7f]{0,20}") {
            let mut o = vec![];
            write_json_str(&s, &mut o);
            let back: String = serde_json::from_slice(&o).unwrap();
            prop_assert_eq!(back, s);
        }

        #[test]
        fn subscribe_round_trip(id in proptest::option::of(any::<u64>()),
                                syms in proptest::collection::vec("[ -~]{0,20}", 0..10),
                                snapshot in any::<bool>()) {
            let mut o = br#"{"op":"subscribe""#.to_vec();
            if let Some(id) = id { o.extend_from_slice(format!(r#","id":{id}"#).as_bytes()); }
            str_array("symbols", &syms.iter().map(|s| s.as_str()).collect::<Vec<_>>(), &mut o);
            o.extend_from_slice(format!(r#","snapshot":{snapshot}}}"#).as_bytes());
            let m = parse_client_msg(&mut o, &MsgLimits::default());
            prop_assert_eq!(m, Ok(ClientMsg::Subscribe { id, symbols: syms, snapshot, since: vec![] }));
        }

        /// `since` as a client library would write it (serde_json, any symbols, any u64)
        /// reads back exactly, in order.
        #[test]
        fn since_round_trip(entries in proptest::collection::btree_map("[A-Z0-9][A-Z0-9._:/-]{0,31}", any::<u64>(), 0..20)) {
            let syms: Vec<String> = entries.keys().cloned().collect();
            let since: serde_json::Map<String, serde_json::Value> =
                entries.iter().map(|(k, v)| (k.clone(), (*v).into())).collect();
            let msg = serde_json::json!({"op":"subscribe","id":1,"symbols":syms,"since":since});
            let mut o = serde_json::to_vec(&msg).unwrap();
            let m = parse_client_msg(&mut o, &MsgLimits::default());
            let want: Vec<(String, u64)> = entries.into_iter().collect();
            prop_assert_eq!(m, Ok(ClientMsg::Subscribe { id: Some(1), symbols: syms, snapshot: false, since: want }));
        }

        #[test]
        fn publish_numbers_round_trip(ts in any::<u64>(),
                                      px in proptest::collection::vec(
                                          any::<f64>().prop_filter("finite", |f| f.is_finite()), 4)) {
            let mut o = Vec::new();
            let t = Tick { ts, bid: px[0], ask: px[1], last: px[2], qty: px[3] };
            crate::feed::tick::encode_tick_json(crate::feed::tick::TickKind::Tick, "A", 1, &t, 0, &mut o);
            // Reuse the tick encoder's number format as the client's, minus the extra keys.
            let v: serde_json::Value = serde_json::from_slice(&o).unwrap();
            let body = format!(
                r#"{{"op":"publish","ticks":[{{"s":"A","ts":{},"bid":{},"ask":{},"last":{},"qty":{}}}]}}"#,
                v["ts"], v["bid"], v["ask"], v["last"], v["qty"]
            );
            let mut b = body.into_bytes();
            let m = parse_client_msg(&mut b, &MsgLimits::default());
            prop_assert_eq!(m, Ok(ClientMsg::Publish { id: None, ticks: vec![("A".into(), t)] }));
        }

        #[test]
        fn never_panics(s in "[\\[\\]{}\":,a-z0-9 .eE+-]{0,64}") {
            let _ = parse(&s);
        }
    }
}
