//! RFC 6455 framing for the server side: a decoder for masked client frames and encoders
//! for unmasked server frames (plus a masked client encoder for tests and load generators).
//!
//! # Decoder model
//!
//! [`Decoder::decode`] is sans-IO in the tungstenite `try_parse` style: it looks at the front
//! of the caller's read buffer and answers either "need more bytes" (`(0, None)`), "consumed
//! `n` bytes" (`(n, None)`, a data fragment was absorbed), "consumed `n` bytes and here is a
//! message" (`(n, Some(msg))`) or a [`ProtocolError`] that ends the connection with
//! [`ProtocolError::close_code`].
//!
//! A frame stays in the caller's buffer until all of it has arrived, so the caller's buffer
//! must hold one whole frame (`max_frame_bytes` + 14 header bytes). While it waits, the decoder
//! already unmasks, and for text validates, the part of the payload that has arrived, in place:
//! a peer that sends a broken code point early in a large text frame is failed at once
//! (Autobahn 6.4.x), and the bytes are never unmasked twice because the decoder remembers how
//! far it got (`PartialFrame::unmasked`). The contract that follows: after `(0, None)` the
//! next call must see the same bytes at the front of `buf`, with more appended.
//!
//! # Limits and memory
//!
//! Both limits are checked from the header, before a single payload byte is buffered:
//! `max_frame_bytes` per data frame and `max_message_bytes` summed over the fragments of a
//! message. The only memory the decoder owns is the reassembly buffer of a fragmented message,
//! which never grows past `max_message_bytes`. An unfragmented frame (the common case) is
//! copied exactly once, from the caller's reusable buffer into the `Bytes` it returns.
//!
//! # Errors
//!
//! Every [`ProtocolError`] ends the connection; the decoder is poisoned afterwards and keeps
//! returning the same error. The checks run in the order the bytes arrive (first byte, second
//! byte, extended length, payload), so the outcome does not depend on how reads split a stream.

use bytes::Bytes;
use thiserror::Error;

use super::close::{CloseCode, is_valid_close_code};
use super::deflate::Deflater;
use super::mask::{apply_mask, apply_mask_ascii};
use super::utf8::Utf8Validator;

/// Largest payload of a control frame (RFC 6455 5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;
/// Largest close reason: a control payload minus the 2-byte code.
pub const MAX_CLOSE_REASON: usize = MAX_CONTROL_PAYLOAD - 2;
/// Longest server (unmasked) frame header.
pub const MAX_SERVER_HEADER: usize = 10;
/// Longest client (masked) frame header.
pub const MAX_CLIENT_HEADER: usize = 14;

const FIN_BIT: u8 = 0x80;
const RSV_BITS: u8 = 0x70;
/// RSV1: "this message is compressed" under permessage-deflate (RFC 7692 section 6).
pub const RSV1_BIT: u8 = 0x40;
const MASK_BIT: u8 = 0x80;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpCode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl OpCode {
    /// Maps the 4-bit wire value; reserved values (3-7, 0xB-0xF) are `None`.
    pub fn from_u8(value: u8) -> Option<Self> {
        match value {
            0x0 => Some(Self::Continuation),
            0x1 => Some(Self::Text),
            0x2 => Some(Self::Binary),
            0x8 => Some(Self::Close),
            0x9 => Some(Self::Ping),
            0xA => Some(Self::Pong),
            _ => None,
        }
    }

    pub fn as_u8(self) -> u8 {
        match self {
            Self::Continuation => 0x0,
            Self::Text => 0x1,
            Self::Binary => 0x2,
            Self::Close => 0x8,
            Self::Ping => 0x9,
            Self::Pong => 0xA,
        }
    }

    pub fn is_control(self) -> bool {
        matches!(self, Self::Close | Self::Ping | Self::Pong)
    }
}

/// Inbound size limits. The defaults exist to keep a hostile peer from eating memory.
#[derive(Clone, Copy, Debug)]
pub struct DecoderConfig {
    /// Largest reassembled data message (sum of its fragments' payloads).
    pub max_message_bytes: usize,
    /// Largest payload of one data frame; also bounds the caller's read buffer.
    pub max_frame_bytes: usize,
}

impl Default for DecoderConfig {
    fn default() -> Self {
        Self {
            max_message_bytes: 65536,
            max_frame_bytes: 65536,
        }
    }
}

/// A complete message or control frame from the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    /// Always valid UTF-8.
    Text(Bytes),
    Binary(Bytes),
    Ping(Bytes),
    Pong(Bytes),
    /// `None` for an empty close payload, else the code and the (valid UTF-8) reason.
    Close(Option<(u16, String)>),
}

/// A violation of RFC 6455 by the peer. Every variant ends the connection with
/// [`close_code`](Self::close_code).
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("client frame is not masked")]
    UnmaskedFrame,
    #[error("reserved bits set without a negotiated extension")]
    ReservedBits,
    #[error("reserved opcode")]
    UnknownOpcode,
    #[error("fragmented control frame")]
    FragmentedControl,
    #[error("control frame payload over 125 bytes")]
    ControlTooLong,
    #[error("continuation frame without a message in progress")]
    UnexpectedContinuation,
    #[error("new data frame while a fragmented message is in progress")]
    ExpectedContinuation,
    #[error("64-bit payload length with the most significant bit set")]
    InvalidLength,
    #[error("frame or message over the size limit")]
    TooBig,
    #[error("invalid UTF-8 in a text message or close reason")]
    InvalidUtf8,
    #[error("close payload of 1 byte")]
    BadClosePayload,
    #[error("invalid close code")]
    InvalidCloseCode,
    #[error("compressed message does not inflate")]
    BadCompressedData,
}

impl ProtocolError {
    /// The close reason to send with [`close_code`](Self::close_code): it names the cause
    /// where the code does (`1009`, `1007`).
    pub fn close_reason(&self) -> &'static str {
        match self {
            Self::TooBig => "message too big",
            Self::InvalidUtf8 => "invalid utf-8",
            Self::BadCompressedData => "invalid compressed data",
            _ => "protocol error",
        }
    }

    /// The close code to send before dropping the connection.
    pub fn close_code(&self) -> u16 {
        match self {
            Self::InvalidUtf8 | Self::BadCompressedData => CloseCode::INVALID_PAYLOAD,
            Self::TooBig => CloseCode::TOO_BIG,
            Self::UnmaskedFrame
            | Self::ReservedBits
            | Self::UnknownOpcode
            | Self::FragmentedControl
            | Self::ControlTooLong
            | Self::UnexpectedContinuation
            | Self::ExpectedContinuation
            | Self::InvalidLength
            | Self::BadClosePayload
            | Self::InvalidCloseCode => CloseCode::PROTOCOL,
        }
    }
}

/// A fully validated frame header.
#[derive(Clone, Copy, Debug)]
struct FrameHeader {
    fin: bool,
    opcode: OpCode,
    mask: [u8; 4],
    header_len: usize,
    payload_len: usize,
}

/// A frame whose header has been accepted but whose payload has not fully arrived.
#[derive(Clone, Copy, Debug)]
struct PartialFrame {
    header: FrameHeader,
    /// Payload bytes already unmasked (and, for text, validated) in the caller's buffer.
    unmasked: usize,
}

/// Outcome of [`Decoder::unmask_whole_frame`].
#[derive(Clone, Copy, Debug)]
enum WholeFrame {
    NotApplicable,
    InvalidUtf8,
    /// Unmasked (and validated, for text) in place.
    Ready {
        is_text: bool,
        header_len: usize,
        payload_len: usize,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MessageKind {
    Text,
    Binary,
}

/// Server-side frame decoder for one connection. See the module docs for the buffer contract.
#[derive(Debug)]
pub struct Decoder {
    /// `DecoderConfig`'s two limits, in 32 bits (the configuration caps them at 16 MiB;
    /// larger values saturate): 8 bytes less in every connection, which keeps it in its
    /// allocation size class (see the test in `rt::ctx`).
    max_message: u32,
    max_frame: u32,
    partial: Option<PartialFrame>,
    /// Kind of the fragmented message being reassembled, if any.
    message: Option<MessageKind>,
    /// Payload of the fragments so far; never longer than `max_message`.
    message_buf: Vec<u8>,
    /// UTF-8 state of the current text message, carried across fragments and partial reads.
    utf8: Utf8Validator,
    poisoned: Option<ProtocolError>,
    /// permessage-deflate, when negotiated (boxed: most connections never have it).
    inflate: Option<Box<Inbound>>,
}

/// The inbound side of permessage-deflate: RSV1 marks the first frame of a compressed
/// message, whose frames are inflated as they complete, the inflated size bounded by
/// `max_message_bytes` (over it: [`ProtocolError::TooBig`], whatever the compressed size).
#[derive(Debug)]
struct Inbound {
    window_bits: u8,
    no_context: bool,
    /// Created at the first compressed message; dropped after each message when the
    /// client keeps no context.
    inflater: Option<InflaterBox>,
    /// The message in progress is compressed.
    compressed: bool,
    /// Compressed payload bytes of that message so far (bounded like a plain message).
    wire: usize,
}

struct InflaterBox(super::deflate::Inflater);

impl std::fmt::Debug for InflaterBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Inflater")
    }
}

impl Decoder {
    pub fn new(cfg: DecoderConfig) -> Self {
        let cap = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
        Self {
            max_message: cap(cfg.max_message_bytes),
            max_frame: cap(cfg.max_frame_bytes),
            partial: None,
            message: None,
            message_buf: Vec::new(),
            utf8: Utf8Validator::new(),
            poisoned: None,
            inflate: None,
        }
    }

    /// Accepts compressed messages (RSV1) as negotiated with permessage-deflate: the
    /// client compresses with at most `2^window_bits` of window, and resets its context
    /// after each message when `no_context`.
    pub fn with_inflate(mut self, window_bits: u8, no_context: bool) -> Self {
        self.inflate = Some(Box::new(Inbound {
            window_bits,
            no_context,
            inflater: None,
            compressed: false,
            wire: 0,
        }));
        self
    }

    /// Whether the message in progress (or the frame being parsed) is compressed.
    fn compressed(&self) -> bool {
        self.inflate.as_ref().is_some_and(|i| i.compressed)
    }

    /// Decode from the front of `buf` (unmasking in place). Returns (bytes consumed, maybe a message).
    ///
    /// `(0, None)` = need more bytes. A consumed data fragment that does not complete a
    /// message returns `(n, None)`. Callers loop while `n > 0`, drop the consumed bytes, and
    /// after `(0, None)` call again with the same unconsumed bytes plus whatever arrived.
    /// After an `Err` the decoder is poisoned (the connection is closed by the caller).
    pub fn decode(&mut self, buf: &mut [u8]) -> Result<(usize, Option<Incoming>), ProtocolError> {
        if self.partial.is_none() && self.message.is_none() && self.poisoned.is_none() {
            match self.unmask_whole_frame(buf) {
                WholeFrame::Ready {
                    is_text,
                    header_len,
                    payload_len,
                } => {
                    let end = header_len + payload_len;
                    let data = Bytes::copy_from_slice(buf.get(header_len..end).unwrap_or_default());
                    let msg = if is_text {
                        Incoming::Text(data)
                    } else {
                        Incoming::Binary(data)
                    };
                    return Ok((end, Some(msg)));
                }
                WholeFrame::InvalidUtf8 => {
                    self.poisoned = Some(ProtocolError::InvalidUtf8);
                    return Err(ProtocolError::InvalidUtf8);
                }
                WholeFrame::NotApplicable => {}
            }
        }
        if let Some(e) = self.poisoned {
            return Err(e);
        }
        match self.decode_frame(buf) {
            Ok(done) => Ok(done),
            Err(e) => {
                self.poisoned = Some(e);
                Err(e)
            }
        }
    }

    /// Whether a fragmented data message is being reassembled.
    pub fn in_message(&self) -> bool {
        self.message.is_some()
    }

    /// Fast path for the common case: a complete, unfragmented, masked text or binary frame
    /// with a 7- or 16-bit length, within the limits, while nothing else is in progress.
    /// Unmasks and validates it in place and says where its payload is; returns
    /// [`WholeFrame::NotApplicable`] (having changed nothing) for anything else, and the
    /// general path then applies every rule, including producing the right error.
    ///
    /// It returns positions rather than the message so the message is built once, in
    /// `decode`'s return value, instead of being moved through an extra `Option<Result<..>>`.
    #[inline]
    fn unmask_whole_frame(&self, buf: &mut [u8]) -> WholeFrame {
        let [b0, b1, rest @ ..] = buf else {
            return WholeFrame::NotApplicable;
        };
        let is_text = match *b0 {
            0x81 => true,
            0x82 => false,
            _ => return WholeFrame::NotApplicable,
        };
        if *b1 & MASK_BIT == 0 {
            return WholeFrame::NotApplicable;
        }
        let (payload_len, header_len, rest) = match *b1 & 0x7f {
            126 => match rest.split_first_chunk_mut::<2>() {
                Some((len, rest)) => (usize::from(u16::from_be_bytes(*len)), 8, rest),
                None => return WholeFrame::NotApplicable,
            },
            127 => return WholeFrame::NotApplicable,
            n => (usize::from(n), 6, rest),
        };
        if payload_len > (self.max_frame as usize) || payload_len > (self.max_message as usize) {
            return WholeFrame::NotApplicable;
        }
        let Some((mask, rest)) = rest.split_first_chunk_mut::<4>() else {
            return WholeFrame::NotApplicable;
        };
        let Some(payload) = rest.get_mut(..payload_len) else {
            return WholeFrame::NotApplicable;
        };
        let ascii = apply_mask_ascii(payload, *mask, 0);
        if is_text && !ascii && std::str::from_utf8(payload).is_err() {
            return WholeFrame::InvalidUtf8;
        }
        WholeFrame::Ready {
            is_text,
            header_len,
            payload_len,
        }
    }

    fn decode_frame(&mut self, buf: &mut [u8]) -> Result<(usize, Option<Incoming>), ProtocolError> {
        let (header, unmasked) = match self.partial.take() {
            Some(p) => (p.header, p.unmasked),
            None => match self.parse_header(buf)? {
                Some(h) => (h, 0),
                None => return Ok((0, None)),
            },
        };
        // Cannot overflow in practice (payload_len is bounded by the limits), but a limit of
        // usize::MAX must not wrap: a saturated end simply never arrives.
        let frame_end = header.header_len.saturating_add(header.payload_len);
        let arrived_end = buf.len().min(frame_end);
        let Some(fresh) = buf.get_mut(header.header_len + unmasked..arrived_end) else {
            // Fewer bytes than last time: the caller broke the contract. Wait, change nothing.
            self.partial = Some(PartialFrame { header, unmasked });
            return Ok((0, None));
        };
        // ASCII needs no validation unless it has to finish a code point cut earlier.
        let ascii = apply_mask_ascii(fresh, header.mask, unmasked);
        if self.is_text(header.opcode) && (!ascii || self.utf8.is_incomplete()) {
            self.utf8.feed(fresh).map_err(|_| ProtocolError::InvalidUtf8)?;
        }
        if arrived_end < frame_end {
            self.partial = Some(PartialFrame {
                header,
                unmasked: unmasked + fresh.len(),
            });
            return Ok((0, None));
        }
        let payload = buf.get(header.header_len..frame_end).unwrap_or_default();
        let message = self.complete_frame(header, payload)?;
        Ok((frame_end, message))
    }

    /// Parses and checks a header at the front of `buf`, in wire order, failing as soon as
    /// the bytes seen so far are invalid. `Ok(None)` means the header is incomplete.
    fn parse_header(&mut self, buf: &[u8]) -> Result<Option<FrameHeader>, ProtocolError> {
        let Some(&b0) = buf.first() else {
            return Ok(None);
        };
        let rsv = b0 & RSV_BITS;
        let opcode = OpCode::from_u8(b0 & 0x0f);
        // RSV1 is allowed on the first frame of a data message, when negotiated.
        let data_start = matches!(opcode, Some(OpCode::Text | OpCode::Binary));
        if rsv != 0 && !(rsv == RSV1_BIT && data_start && self.inflate.is_some()) {
            return Err(ProtocolError::ReservedBits);
        }
        let fin = b0 & FIN_BIT != 0;
        let opcode = opcode.ok_or(ProtocolError::UnknownOpcode)?;
        match opcode {
            OpCode::Continuation if self.message.is_none() => {
                return Err(ProtocolError::UnexpectedContinuation);
            }
            OpCode::Text | OpCode::Binary if self.message.is_some() => {
                return Err(ProtocolError::ExpectedContinuation);
            }
            OpCode::Close | OpCode::Ping | OpCode::Pong if !fin => {
                return Err(ProtocolError::FragmentedControl);
            }
            _ => {}
        }

        let Some(&b1) = buf.get(1) else {
            return Ok(None);
        };
        if b1 & MASK_BIT == 0 {
            return Err(ProtocolError::UnmaskedFrame);
        }
        let len7 = b1 & 0x7f;
        if opcode.is_control() && usize::from(len7) > MAX_CONTROL_PAYLOAD {
            return Err(ProtocolError::ControlTooLong);
        }
        let (payload_len, len_end) = match len7 {
            126 => match buf.get(2..).and_then(|s| s.first_chunk::<2>()) {
                Some(b) => (u64::from(u16::from_be_bytes(*b)), 4),
                None => return Ok(None),
            },
            127 => match buf.get(2..).and_then(|s| s.first_chunk::<8>()) {
                Some(b) => {
                    let len = u64::from_be_bytes(*b);
                    if len >> 63 != 0 {
                        return Err(ProtocolError::InvalidLength);
                    }
                    (len, 10)
                }
                None => return Ok(None),
            },
            // Non-minimal length encodings are accepted: RFC 6455 asks senders for the
            // minimal form but gives receivers no reason to fail on it.
            n => (u64::from(n), 2),
        };
        let payload_len = usize::try_from(payload_len).map_err(|_| ProtocolError::TooBig)?;
        if !opcode.is_control() {
            // A compressed message counts its compressed bytes here (its inflated bytes
            // are bounded as they are produced).
            let so_far = match self.inflate.as_deref() {
                _ if data_start => 0,
                Some(i) if i.compressed => i.wire,
                _ => self.message_buf.len(),
            };
            // Only now, before any payload is buffered, is the size known: check it here.
            if payload_len > (self.max_frame as usize)
                || so_far.saturating_add(payload_len) > (self.max_message as usize)
            {
                return Err(ProtocolError::TooBig);
            }
        }
        let Some(mask) = buf.get(len_end..).and_then(|s| s.first_chunk::<4>()) else {
            return Ok(None);
        };
        if opcode == OpCode::Text {
            self.utf8.reset();
        }
        if data_start && let Some(i) = self.inflate.as_deref_mut() {
            i.compressed = rsv != 0;
            i.wire = 0;
        }
        Ok(Some(FrameHeader {
            fin,
            opcode,
            mask: *mask,
            header_len: len_end + 4,
            payload_len,
        }))
    }

    /// Whether payload bytes of a frame with this opcode are text to validate incrementally.
    fn is_text(&self, opcode: OpCode) -> bool {
        match opcode {
            // A compressed message is validated once inflated.
            _ if self.compressed() && !opcode.is_control() => false,
            OpCode::Text => true,
            OpCode::Continuation => self.message == Some(MessageKind::Text),
            _ => false,
        }
    }

    /// Acts on a frame whose payload is complete, unmasked and (for text) fed to `utf8`.
    fn complete_frame(
        &mut self,
        header: FrameHeader,
        payload: &[u8],
    ) -> Result<Option<Incoming>, ProtocolError> {
        let kind = match header.opcode {
            OpCode::Ping => return Ok(Some(Incoming::Ping(Bytes::copy_from_slice(payload)))),
            OpCode::Pong => return Ok(Some(Incoming::Pong(Bytes::copy_from_slice(payload)))),
            OpCode::Close => return parse_close_payload(payload).map(|c| Some(Incoming::Close(c))),
            OpCode::Text => MessageKind::Text,
            OpCode::Binary => MessageKind::Binary,
            OpCode::Continuation => self.message.ok_or(ProtocolError::UnexpectedContinuation)?,
        };
        if self.compressed() {
            return self.inflate_frame(kind, header.fin, payload);
        }
        if header.opcode != OpCode::Continuation && header.fin {
            // The fast, common case: one frame, one copy.
            if kind == MessageKind::Text {
                self.utf8.finish().map_err(|_| ProtocolError::InvalidUtf8)?;
            }
            return Ok(Some(message(kind, Bytes::copy_from_slice(payload))));
        }
        self.message = Some(kind);
        self.append_fragment(payload);
        if !header.fin {
            return Ok(None);
        }
        self.message = None;
        if kind == MessageKind::Text {
            self.utf8.finish().map_err(|_| ProtocolError::InvalidUtf8)?;
        }
        let data = std::mem::take(&mut self.message_buf);
        Ok(Some(message(kind, Bytes::from(data))))
    }

    /// A frame of a compressed message: inflate it into the reassembly buffer (never past
    /// `max_message_bytes`); at the last frame, validate and hand out the message.
    fn inflate_frame(
        &mut self,
        kind: MessageKind,
        fin: bool,
        payload: &[u8],
    ) -> Result<Option<Incoming>, ProtocolError> {
        use super::deflate::{InflateError, Inflater};
        let max = self.max_message as usize;
        let Some(i) = self.inflate.as_deref_mut() else {
            return Err(ProtocolError::ReservedBits);
        };
        let inf = &mut i
            .inflater
            .get_or_insert_with(|| InflaterBox(Inflater::new(i.window_bits, i.no_context)))
            .0;
        let err = |e| match e {
            InflateError::TooBig => ProtocolError::TooBig,
            InflateError::Invalid => ProtocolError::BadCompressedData,
        };
        inf.feed(payload, &mut self.message_buf, max).map_err(err)?;
        i.wire = i.wire.saturating_add(payload.len());
        self.message = Some(kind);
        if !fin {
            return Ok(None);
        }
        inf.finish(&mut self.message_buf, max).map_err(err)?;
        if i.no_context {
            i.inflater = None;
        }
        i.compressed = false;
        self.message = None;
        let data = std::mem::take(&mut self.message_buf);
        if kind == MessageKind::Text && std::str::from_utf8(&data).is_err() {
            return Err(ProtocolError::InvalidUtf8);
        }
        Ok(Some(message(kind, Bytes::from(data))))
    }

    /// Appends to the reassembly buffer, growing geometrically but never past the limit
    /// (which `parse_header` already guaranteed the total respects).
    fn append_fragment(&mut self, payload: &[u8]) {
        let need = self.message_buf.len() + payload.len();
        if need > self.message_buf.capacity() {
            let target = need
                .max(self.message_buf.capacity().saturating_mul(2))
                .min((self.max_message as usize).max(need));
            self.message_buf.reserve_exact(target - self.message_buf.len());
        }
        self.message_buf.extend_from_slice(payload);
    }
}

fn message(kind: MessageKind, data: Bytes) -> Incoming {
    match kind {
        MessageKind::Text => Incoming::Text(data),
        MessageKind::Binary => Incoming::Binary(data),
    }
}

/// Parses a complete, unmasked close payload (RFC 6455 5.5.1).
pub fn parse_close_payload(payload: &[u8]) -> Result<Option<(u16, String)>, ProtocolError> {
    match payload {
        [] => Ok(None),
        [_] => Err(ProtocolError::BadClosePayload),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !is_valid_close_code(code) {
                return Err(ProtocolError::InvalidCloseCode);
            }
            let reason = std::str::from_utf8(reason).map_err(|_| ProtocolError::InvalidUtf8)?;
            Ok(Some((code, reason.to_owned())))
        }
    }
}

/// Writes a server frame header (FIN set, unmasked) and returns its length (2, 4 or 10).
pub fn write_header(opcode: OpCode, payload_len: usize, out: &mut [u8; 10]) -> usize {
    write_header_bits(FIN_BIT | opcode.as_u8(), 0, payload_len, out)
}

fn write_header_bits(b0: u8, mask_bit: u8, payload_len: usize, out: &mut [u8; 10]) -> usize {
    out[0] = b0;
    if payload_len < 126 {
        out[1] = mask_bit | payload_len as u8;
        2
    } else if let Ok(len) = u16::try_from(payload_len) {
        out[1] = mask_bit | 126;
        out[2..4].copy_from_slice(&len.to_be_bytes());
        4
    } else {
        out[1] = mask_bit | 127;
        out[2..10].copy_from_slice(&(payload_len as u64).to_be_bytes());
        10
    }
}

/// Appends an unmasked server frame with FIN set.
///
/// Control frames must carry at most [`MAX_CONTROL_PAYLOAD`] bytes; that is the caller's duty.
pub fn encode_frame_into(opcode: OpCode, payload: &[u8], out: &mut Vec<u8>) {
    let mut header = [0u8; MAX_SERVER_HEADER];
    let n = write_header(opcode, payload.len(), &mut header);
    out.reserve(n + payload.len());
    out.extend_from_slice(&header[..n]);
    out.extend_from_slice(payload);
}

/// Appends an unmasked server frame with FIN and RSV1 set: a message compressed with
/// permessage-deflate (RFC 7692 section 6), `payload` already deflated. Data frames only.
pub fn encode_compressed_frame_into(opcode: OpCode, payload: &[u8], out: &mut Vec<u8>) {
    let mut header = [0u8; MAX_SERVER_HEADER];
    let n = write_header_bits(FIN_BIT | RSV1_BIT | opcode.as_u8(), 0, payload.len(), &mut header);
    out.reserve(n + payload.len());
    out.extend_from_slice(&header[..n]);
    out.extend_from_slice(payload);
}

/// Appends one message compressed with `d` (permessage-deflate) as a frame with RSV1 set;
/// an empty message goes out uncompressed (RSV1 is chosen per message, RFC 7692 section 6).
pub fn encode_deflated_into(d: &mut Deflater, opcode: OpCode, payload: &[u8], out: &mut Vec<u8>) {
    if payload.is_empty() {
        encode_frame_into(opcode, payload, out);
    } else {
        encode_compressed_frame_into(opcode, d.compress(payload), out);
    }
}

/// A queued server frame on its way out of a compressing connection: a text or binary
/// frame is compressed with `d` ([`encode_deflated_into`]); a control frame (never
/// compressed), or anything that is not one whole server frame, is copied as it is.
pub fn deflate_server_frame(d: &mut Deflater, frame: &[u8], out: &mut Vec<u8>) {
    match server_frame_parts(frame) {
        Some((b0, payload)) if b0 & 0x0f == OpCode::Text.as_u8() => {
            encode_deflated_into(d, OpCode::Text, payload, out)
        }
        Some((b0, payload)) if b0 & 0x0f == OpCode::Binary.as_u8() => {
            encode_deflated_into(d, OpCode::Binary, payload, out)
        }
        _ => out.extend_from_slice(frame),
    }
}

/// Splits a complete server frame (unmasked, as the encoders above write it) into its
/// first byte and its payload; `None` if `frame` is not exactly one such frame.
pub fn server_frame_parts(frame: &[u8]) -> Option<(u8, &[u8])> {
    let (&b0, rest) = frame.split_first()?;
    let (&b1, rest) = rest.split_first()?;
    if b1 & MASK_BIT != 0 {
        return None;
    }
    let (len, rest) = match b1 & 0x7f {
        126 => {
            let (l, rest) = rest.split_first_chunk::<2>()?;
            (usize::from(u16::from_be_bytes(*l)), rest)
        }
        127 => {
            let (l, rest) = rest.split_first_chunk::<8>()?;
            (usize::try_from(u64::from_be_bytes(*l)).ok()?, rest)
        }
        n => (usize::from(n), rest),
    };
    (rest.len() == len).then_some((b0, rest))
}

/// An unmasked server frame with FIN set, in one exactly sized allocation.
pub fn encode_frame(opcode: OpCode, payload: &[u8]) -> Bytes {
    let mut header = [0u8; MAX_SERVER_HEADER];
    let n = write_header(opcode, payload.len(), &mut header);
    let mut out = Vec::with_capacity(n + payload.len());
    out.extend_from_slice(&header[..n]);
    out.extend_from_slice(payload);
    // len == capacity, so this hands the allocation over without copying.
    Bytes::from(out)
}

/// A close frame with `code` and `reason`, the reason cut on a char boundary to fit the
/// 125-byte control payload. The caller picks a sendable code (never 1005/1006/1015).
pub fn encode_close(code: u16, reason: &str) -> Bytes {
    let reason = truncate_to_char_boundary(reason, MAX_CLOSE_REASON);
    let mut payload = [0u8; MAX_CONTROL_PAYLOAD];
    let len = 2 + reason.len();
    payload[..2].copy_from_slice(&code.to_be_bytes());
    payload[2..len].copy_from_slice(reason.as_bytes());
    encode_frame(OpCode::Close, &payload[..len])
}

/// The longest prefix of `s` of at most `max` bytes that ends on a char boundary.
pub fn truncate_to_char_boundary(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Appends a masked client frame (for tests and the load generator).
pub fn encode_client_frame_into(opcode: OpCode, fin: bool, payload: &[u8], mask: [u8; 4], out: &mut Vec<u8>) {
    let mut header = [0u8; MAX_SERVER_HEADER];
    let b0 = if fin { FIN_BIT } else { 0 } | opcode.as_u8();
    let n = write_header_bits(b0, MASK_BIT, payload.len(), &mut header);
    out.reserve(n + 4 + payload.len());
    out.extend_from_slice(&header[..n]);
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    if let Some(body) = out.get_mut(start..) {
        apply_mask(body, mask, 0);
    }
}

#[cfg(test)]
#[path = "frame_tests.rs"]
mod tests;
