//! permessage-deflate (RFC 7692), sans-IO: the negotiation of `Sec-WebSocket-Extensions`
//! in the upgrade, the outbound compressor and the bounded inbound inflater.
//!
//! # Negotiation
//!
//! [`negotiate`] reads every `Sec-WebSocket-Extensions` line of the request (a list of
//! offers, `extension *( ";" param )`, params `name [ "=" token / quoted-string ]`) and
//! accepts the first `permessage-deflate` offer it can honour (RFC 7692 section 5):
//! an offer with an unknown parameter, a parameter given twice, a value where none is
//! allowed or a window size outside 8..=15 (or with a leading zero) is declined, and the
//! next one is tried. Other extensions are ignored. An offer asking for
//! `server_max_window_bits=8` is declined too: zlib cannot compress with a 256-byte
//! window. The answer ([`Agreed::response`]) names what both sides will do.
//!
//! # Compression
//!
//! [`Deflater`] compresses one message per call, ending it with a sync flush whose
//! `00 00 ff ff` tail is cut (section 7.2.1); `proto::frame` puts it in an RSV1 frame
//! (`encode_deflated_into`, `deflate_server_frame`). This module is a leaf: the codec
//! depends on it, not the other way round.
//! With context takeover the same `Compress` carries its window from one message to the
//! next (small ticks then compress to a fraction of their size); with
//! `server_no_context_takeover` it is reset after each message, which is what lets one
//! compressed tick frame be shared by every such subscriber ([`Deflater::shared`]).
//!
//! # Inflation
//!
//! [`Inflater`] inflates a message's frames as they complete into the caller's buffer,
//! never past the caller's bound: a message that would inflate past it is
//! [`InflateError::TooBig`] (close `1009`), whatever its compressed size. Memory grows
//! with the output actually produced, never ahead of it by more than a doubling.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// The extension's name in `Sec-WebSocket-Extensions`.
pub const EXTENSION: &str = "permessage-deflate";
/// The tail a sync flush ends with, cut by the sender and put back by the receiver.
const SYNC_TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];
/// A compressor keeps at most this much output buffer between messages.
const SCRATCH_KEEP: usize = 4096;

/// The server's side of the negotiation (`[compression]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeflateConfig {
    /// zlib level, 0..=9.
    pub level: u32,
    /// The largest LZ77 window (base-2 logarithm, 9..=15) the server compresses with,
    /// and asks clients to compress with when they let it choose.
    pub window_bits: u8,
}

impl Default for DeflateConfig {
    fn default() -> Self {
        Self {
            level: 1,
            window_bits: 15,
        }
    }
}

/// An accepted offer: what the server answers and how both directions work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Agreed {
    /// The server resets its compressor after each message.
    pub server_no_context_takeover: bool,
    /// The client resets its compressor after each message (so may the server's inflater).
    pub client_no_context_takeover: bool,
    /// The window the server compresses with (9..=15).
    pub server_window_bits: u8,
    /// The window the client may use (8..=15): the inflater is sized for it.
    pub client_window_bits: u8,
    /// Whether the answer names `server_max_window_bits` / `client_max_window_bits`.
    answer_server_bits: bool,
    answer_client_bits: bool,
}

impl Agreed {
    /// The value of the `Sec-WebSocket-Extensions` line of the `101`.
    pub fn response(&self) -> String {
        let mut s = String::from(EXTENSION);
        if self.server_no_context_takeover {
            s.push_str("; server_no_context_takeover");
        }
        if self.client_no_context_takeover {
            s.push_str("; client_no_context_takeover");
        }
        if self.answer_server_bits {
            s.push_str(&format!("; server_max_window_bits={}", self.server_window_bits));
        }
        if self.answer_client_bits {
            s.push_str(&format!("; client_max_window_bits={}", self.client_window_bits));
        }
        s
    }
}

/// Accepts the first `permessage-deflate` offer among the values of every
/// `Sec-WebSocket-Extensions` line, or `None` (answer without the extension).
pub fn negotiate<'a>(lines: impl IntoIterator<Item = &'a str>, cfg: &DeflateConfig) -> Option<Agreed> {
    lines
        .into_iter()
        .flat_map(|line| split_outside_quotes(line, b','))
        .filter_map(|offer| parse_offer(offer))
        .filter(|(name, _)| name.eq_ignore_ascii_case(EXTENSION))
        .find_map(|(_, params)| accept(&params, cfg))
}

/// One parameter of an offer: its name and value (unquoted), if any.
type Param<'a> = (&'a str, Option<String>);

fn accept(params: &[Param<'_>], cfg: &DeflateConfig) -> Option<Agreed> {
    let mut server_nct = false;
    let mut client_nct = false;
    let mut server_bits: Option<u8> = None;
    // Outer None: not offered; Some(None): offered without a value.
    let mut client_bits: Option<Option<u8>> = None;
    for (i, (name, value)) in params.iter().enumerate() {
        if params[..i].iter().any(|(n, _)| n.eq_ignore_ascii_case(name)) {
            return None;
        }
        match name.to_ascii_lowercase().as_str() {
            "server_no_context_takeover" if value.is_none() => server_nct = true,
            "client_no_context_takeover" if value.is_none() => client_nct = true,
            "server_max_window_bits" => server_bits = Some(window_bits(value.as_deref()?)?),
            "client_max_window_bits" => {
                client_bits = Some(match value {
                    None => None,
                    Some(v) => Some(window_bits(v)?),
                })
            }
            _ => return None,
        }
    }
    let server_window_bits = match server_bits {
        Some(8) => return None,
        Some(n) => n.min(cfg.window_bits),
        None => cfg.window_bits,
    };
    let (client_window_bits, answer_client_bits) = match client_bits {
        None => (15, false),
        Some(None) => (cfg.window_bits, cfg.window_bits < 15),
        Some(Some(n)) => (n.min(cfg.window_bits), true),
    };
    Some(Agreed {
        server_no_context_takeover: server_nct,
        client_no_context_takeover: client_nct,
        server_window_bits,
        client_window_bits,
        answer_server_bits: server_bits.is_some() || server_window_bits < 15,
        answer_client_bits,
    })
}

/// A window size: a decimal 8..=15 without leading zeros (RFC 7692 sections 7.1.2.1-2).
fn window_bits(v: &str) -> Option<u8> {
    if v.len() > 2 || v.starts_with('0') || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse::<u8>().ok().filter(|n| (8..=15).contains(n))
}

/// Splits at `sep` outside quoted strings (a quoted string runs to the next unescaped `"`).
fn split_outside_quotes(s: &str, sep: u8) -> impl Iterator<Item = &str> {
    let mut rest = Some(s);
    std::iter::from_fn(move || {
        let s = rest?;
        let b = s.as_bytes();
        let mut quoted = false;
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'\\' if quoted => i += 1,
                b'"' => quoted = !quoted,
                c if c == sep && !quoted => {
                    rest = s.get(i + 1..);
                    return s.get(..i);
                }
                _ => {}
            }
            i += 1;
        }
        rest = None;
        Some(s)
    })
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(is_tchar)
}

fn trim_ows(s: &str) -> &str {
    s.trim_matches([' ', '\t'])
}

/// Parses one offer, `name *( ";" param )`; `None` when it is malformed (or empty).
fn parse_offer(offer: &str) -> Option<(&str, Vec<Param<'_>>)> {
    let mut parts = split_outside_quotes(offer, b';');
    let name = trim_ows(parts.next()?);
    if !is_token(name) {
        return None;
    }
    let mut params = Vec::new();
    for p in parts {
        let (n, v) = match p.split_once('=') {
            Some((n, v)) => (trim_ows(n), Some(param_value(trim_ows(v))?)),
            None => (trim_ows(p), None),
        };
        if !is_token(n) {
            return None;
        }
        params.push((n, v));
    }
    Some((name, params))
}

/// A parameter value: a token, or a quoted string (unescaped) whose content is a token
/// (RFC 6455 section 9.1).
fn param_value(v: &str) -> Option<String> {
    if is_token(v) {
        return Some(v.to_owned());
    }
    let inner = v.strip_prefix('"')?.strip_suffix('"')?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.push(chars.next()?),
            '"' => return None,
            c => out.push(c),
        }
    }
    is_token(&out).then_some(out)
}

/// One direction's compressor (raw deflate, the negotiated window).
pub struct Deflater {
    c: Compress,
    no_context: bool,
    scratch: Vec<u8>,
}

impl Deflater {
    /// `window_bits` in 9..=15 (clamped), `level` in 0..=9 (clamped).
    pub fn new(level: u32, window_bits: u8, no_context: bool) -> Self {
        Self {
            c: Compress::new_with_window_bits(
                Compression::new(level.min(9)),
                false,
                window_bits.clamp(9, 15),
            ),
            no_context,
            scratch: Vec::new(),
        }
    }

    /// The compressor of frames shared by every subscriber without context takeover: a
    /// 512-byte window, within any window a client can have asked for (8 is declined).
    pub fn shared(level: u32) -> Self {
        Self::new(level, 9, true)
    }

    /// The compressor of an agreement (the server's side).
    pub fn for_server(a: &Agreed, cfg: &DeflateConfig) -> Self {
        Self::new(cfg.level, a.server_window_bits, a.server_no_context_takeover)
    }

    /// Compresses one message: the raw deflate data of `payload` up to and including a
    /// sync flush, without its `00 00 ff ff` tail (RFC 7692 section 7.2.1), ready to be
    /// the payload of an RSV1 frame. Empty for an empty message (send that one plain).
    pub fn compress(&mut self, payload: &[u8]) -> &[u8] {
        if self.scratch.capacity() > SCRATCH_KEEP {
            self.scratch = Vec::new();
        }
        self.scratch.clear();
        if payload.is_empty() {
            return &self.scratch;
        }
        let mut input = payload;
        loop {
            self.scratch.reserve(input.len() / 2 + 64);
            let before_in = self.c.total_in();
            let res = self.c.compress_vec(input, &mut self.scratch, FlushCompress::Sync);
            let used = usize::try_from(self.c.total_in() - before_in).unwrap_or(input.len());
            input = input.get(used..).unwrap_or_default();
            let room_left = self.scratch.len() < self.scratch.capacity();
            if res.is_err() || (input.is_empty() && room_left) {
                break;
            }
        }
        if self.scratch.ends_with(&SYNC_TAIL) {
            self.scratch.truncate(self.scratch.len() - SYNC_TAIL.len());
        }
        if self.no_context {
            self.c.reset();
        }
        &self.scratch
    }

    /// Whether the context is reset after each message (its output can be shared).
    pub fn no_context(&self) -> bool {
        self.no_context
    }
}

/// Why a compressed message could not be inflated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InflateError {
    /// It inflates past the bound (close `1009`).
    TooBig,
    /// Not a valid raw deflate stream.
    Invalid,
}

/// The server's inflater for one connection's compressed messages.
pub struct Inflater {
    d: Decompress,
    no_context: bool,
}

impl Inflater {
    /// Sized for the client's window (8..=15; zlib needs at least 9, which also reads 8).
    pub fn new(window_bits: u8, no_context: bool) -> Self {
        let window_bits = window_bits.clamp(9, 15);
        Self {
            d: Decompress::new_with_window_bits(false, window_bits),
            no_context,
        }
    }

    /// The inflater of an agreement (the client's side as the server reads it).
    pub fn for_server(a: &Agreed) -> Self {
        Self::new(a.client_window_bits, a.client_no_context_takeover)
    }

    /// Inflates one frame's compressed payload, appending to `out`, which never grows past
    /// `limit` bytes.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>, limit: usize) -> Result<(), InflateError> {
        self.run(input, out, limit)
    }

    /// Ends a message: inflates the sync tail the sender cut (and resets the context when
    /// the client does not keep one).
    pub fn finish(&mut self, out: &mut Vec<u8>, limit: usize) -> Result<(), InflateError> {
        let r = self.run(&SYNC_TAIL, out, limit);
        if self.no_context {
            self.d.reset(false);
        }
        r
    }

    fn run(&mut self, mut input: &[u8], out: &mut Vec<u8>, limit: usize) -> Result<(), InflateError> {
        loop {
            if out.len() >= limit {
                // Full: any further output means the message is over the bound.
                let mut probe = [0u8; 1];
                let (used, produced, status) = self.step(input, &mut probe)?;
                if produced > 0 {
                    return Err(InflateError::TooBig);
                }
                input = input.get(used..).unwrap_or_default();
                if input.is_empty() {
                    return Ok(());
                }
                if used == 0 && status != Status::StreamEnd {
                    return Err(InflateError::Invalid);
                }
                continue;
            }
            if out.len() == out.capacity() {
                let want = out.capacity().saturating_mul(2).max(out.len() + 256).min(limit);
                out.reserve_exact(want - out.len());
            }
            let len = out.len();
            let spare = out.capacity().min(limit) - len;
            out.resize(len + spare, 0);
            let r = self.step(input, &mut out[len..]);
            let (used, produced, status) = match r {
                Ok(v) => v,
                Err(e) => {
                    out.truncate(len);
                    return Err(e);
                }
            };
            out.truncate(len + produced);
            input = input.get(used..).unwrap_or_default();
            // Output space left over means the inflater has nothing more for this input.
            if input.is_empty() && produced < spare {
                return Ok(());
            }
            if used == 0 && produced == 0 && status != Status::StreamEnd {
                return Err(InflateError::Invalid);
            }
        }
    }

    /// One inflate call; a stream that ended (a block with BFINAL, RFC 7692 section
    /// 7.2.3) starts over, the rest of the input being a new stream.
    fn step(&mut self, input: &[u8], output: &mut [u8]) -> Result<(usize, usize, Status), InflateError> {
        let (in0, out0) = (self.d.total_in(), self.d.total_out());
        let status = self
            .d
            .decompress(input, output, FlushDecompress::Sync)
            .map_err(|_| InflateError::Invalid)?;
        let used = usize::try_from(self.d.total_in() - in0).map_err(|_| InflateError::Invalid)?;
        let produced = usize::try_from(self.d.total_out() - out0).map_err(|_| InflateError::Invalid)?;
        if status == Status::StreamEnd {
            self.d.reset(false);
        }
        Ok((used, produced, status))
    }
}

#[cfg(test)]
#[path = "deflate_tests.rs"]
mod tests;
