//! Tests for the frame codec: one per decoder rule, partial reads, limits, encoders, and
//! property tests (round trip, split-point independence, no panics).

use super::*;
use proptest::prelude::*;

const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

fn client(op: OpCode, fin: bool, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    encode_client_frame_into(op, fin, payload, MASK, &mut v);
    v
}

/// A client frame with an arbitrary first byte (RSV bits, reserved opcodes) and mask choice.
fn raw_frame(b0: u8, masked: bool, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut header = [0u8; 10];
    let n = write_header_bits(b0, if masked { MASK_BIT } else { 0 }, payload.len(), &mut header);
    let mut v = header[..n].to_vec();
    if masked {
        v.extend_from_slice(&mask);
        let start = v.len();
        v.extend_from_slice(payload);
        apply_mask(&mut v[start..], mask, 0);
    } else {
        v.extend_from_slice(payload);
    }
    v
}

type Outcome = Result<Incoming, ProtocolError>;

/// Plays the caller: keeps a Vec, appends each chunk, decodes in a loop, drains consumed
/// bytes. Stops at the first error.
fn feed_chunks(cfg: DecoderConfig, stream: &[u8], cuts: &[usize]) -> Vec<Outcome> {
    let mut dec = Decoder::new(cfg);
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let mut start = 0;
    let ends = cuts.iter().copied().chain(std::iter::once(stream.len()));
    for end in ends {
        buf.extend_from_slice(&stream[start..end]);
        start = end;
        loop {
            match dec.decode(&mut buf) {
                Ok((n, msg)) => {
                    buf.drain(..n);
                    if let Some(m) = msg {
                        out.push(Ok(m));
                    }
                    if n == 0 {
                        break;
                    }
                }
                Err(e) => {
                    out.push(Err(e));
                    return out;
                }
            }
        }
    }
    out
}

fn feed_whole(stream: &[u8]) -> Vec<Outcome> {
    feed_chunks(DecoderConfig::default(), stream, &[])
}

fn first_error(stream: &[u8]) -> ProtocolError {
    match feed_whole(stream).pop() {
        Some(Err(e)) => e,
        other => panic!("expected an error, got {other:?}"),
    }
}

fn text(s: &str) -> Outcome {
    Ok(Incoming::Text(Bytes::copy_from_slice(s.as_bytes())))
}

// ---- single frames ----------------------------------------------------------------------

#[test]
fn rfc_example_masked_hello() {
    let mut frame = [0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58];
    let mut dec = Decoder::new(DecoderConfig::default());
    let (n, msg) = dec.decode(&mut frame).unwrap();
    assert_eq!(n, 11);
    assert_eq!(msg, Some(Incoming::Text(Bytes::from_static(b"Hello"))));
}

#[test]
fn each_data_and_control_kind() {
    let mut s = client(OpCode::Text, true, b"t");
    s.extend(client(OpCode::Binary, true, &[0, 1, 2]));
    s.extend(client(OpCode::Ping, true, b"p"));
    s.extend(client(OpCode::Pong, true, b""));
    s.extend(client(OpCode::Close, true, &[0x03, 0xe8, b'b', b'y', b'e']));
    assert_eq!(
        feed_whole(&s),
        vec![
            text("t"),
            Ok(Incoming::Binary(Bytes::from_static(&[0, 1, 2]))),
            Ok(Incoming::Ping(Bytes::from_static(b"p"))),
            Ok(Incoming::Pong(Bytes::new())),
            Ok(Incoming::Close(Some((1000, "bye".into())))),
        ]
    );
}

#[test]
fn empty_input_needs_more() {
    let mut dec = Decoder::new(DecoderConfig::default());
    assert_eq!(dec.decode(&mut []), Ok((0, None)));
}

#[test]
fn every_header_prefix_needs_more() {
    for len in [0usize, 5, 125, 126, 300, 65535, 65536] {
        let cfg = DecoderConfig {
            max_message_bytes: 1 << 20,
            max_frame_bytes: 1 << 20,
        };
        let frame = client(OpCode::Binary, true, &vec![7u8; len]);
        let mut dec = Decoder::new(cfg);
        let header_len = frame.len() - len;
        for cut in 0..header_len {
            let mut part = frame[..cut].to_vec();
            assert_eq!(dec.decode(&mut part), Ok((0, None)), "len {len} cut {cut}");
        }
    }
}

// ---- rules ------------------------------------------------------------------------------

#[test]
fn unmasked_frame_is_1002() {
    let e = first_error(&raw_frame(0x81, false, b"hi", MASK));
    assert_eq!(e, ProtocolError::UnmaskedFrame);
    assert_eq!(e.close_code(), 1002);
}

#[test]
fn reserved_bits_are_1002() {
    for rsv in [0x40, 0x20, 0x10, 0x70] {
        let e = first_error(&raw_frame(0x81 | rsv, true, b"hi", MASK));
        assert_eq!(e, ProtocolError::ReservedBits);
        assert_eq!(e.close_code(), 1002);
    }
}

#[test]
fn reserved_bits_detected_from_first_byte_alone() {
    let mut dec = Decoder::new(DecoderConfig::default());
    assert_eq!(dec.decode(&mut [0xC1]), Err(ProtocolError::ReservedBits));
}

#[test]
fn unknown_opcodes_are_1002() {
    for op in (3..=7).chain(0xB..=0xF) {
        let e = first_error(&raw_frame(0x80 | op, true, b"", MASK));
        assert_eq!(e, ProtocolError::UnknownOpcode, "opcode {op}");
        assert_eq!(e.close_code(), 1002);
    }
}

#[test]
fn fragmented_control_is_1002() {
    for op in [OpCode::Close, OpCode::Ping, OpCode::Pong] {
        let e = first_error(&client(op, false, b""));
        assert_eq!(e, ProtocolError::FragmentedControl);
        assert_eq!(e.close_code(), 1002);
    }
}

#[test]
fn control_payload_limit() {
    for op in [OpCode::Ping, OpCode::Pong] {
        let ok = feed_whole(&client(op, true, &[1u8; 125]));
        assert!(ok[0].is_ok());
        let e = first_error(&client(op, true, &[1u8; 126]));
        assert_eq!(e, ProtocolError::ControlTooLong);
        assert_eq!(e.close_code(), 1002);
    }
    let mut close = vec![0x03, 0xe8];
    close.extend([b'a'; 124]);
    assert_eq!(
        first_error(&client(OpCode::Close, true, &close)),
        ProtocolError::ControlTooLong
    );
    // Detected from the two header bytes, before the extended length arrives.
    let mut dec = Decoder::new(DecoderConfig::default());
    assert_eq!(dec.decode(&mut [0x89, 0xFE]), Err(ProtocolError::ControlTooLong));
}

#[test]
fn continuation_without_start_is_1002() {
    let e = first_error(&client(OpCode::Continuation, true, b"x"));
    assert_eq!(e, ProtocolError::UnexpectedContinuation);
    assert_eq!(e.close_code(), 1002);
    // Also after a completed fragmented message.
    let mut s = client(OpCode::Text, false, b"a");
    s.extend(client(OpCode::Continuation, true, b"b"));
    s.extend(client(OpCode::Continuation, true, b"c"));
    assert_eq!(
        feed_whole(&s),
        vec![text("ab"), Err(ProtocolError::UnexpectedContinuation)]
    );
}

#[test]
fn new_data_frame_during_fragmented_message_is_1002() {
    for op in [OpCode::Text, OpCode::Binary] {
        let mut s = client(OpCode::Binary, false, b"a");
        s.extend(client(op, true, b"b"));
        let e = first_error(&s);
        assert_eq!(e, ProtocolError::ExpectedContinuation);
        assert_eq!(e.close_code(), 1002);
    }
}

#[test]
fn length_msb_set_is_1002() {
    let mut f = vec![0x82, 0xFF];
    f.extend((1u64 << 63).to_be_bytes());
    f.extend(MASK);
    let e = first_error(&f);
    assert_eq!(e, ProtocolError::InvalidLength);
    assert_eq!(e.close_code(), 1002);
}

#[test]
fn fragmentation_with_interleaved_ping() {
    let mut s = client(OpCode::Text, false, b"Hel");
    s.extend(client(OpCode::Ping, true, b"ping!"));
    s.extend(client(OpCode::Continuation, false, b"lo, "));
    s.extend(client(OpCode::Pong, true, b""));
    s.extend(client(OpCode::Continuation, false, b""));
    s.extend(client(OpCode::Close, true, b""));
    s.extend(client(OpCode::Continuation, true, b"world"));
    assert_eq!(
        feed_whole(&s),
        vec![
            Ok(Incoming::Ping(Bytes::from_static(b"ping!"))),
            Ok(Incoming::Pong(Bytes::new())),
            Ok(Incoming::Close(None)),
            text("Hello, world"),
        ]
    );
}

#[test]
fn fragment_returns_consumed_without_message() {
    let mut f = client(OpCode::Binary, false, b"abc");
    let len = f.len();
    let mut dec = Decoder::new(DecoderConfig::default());
    assert_eq!(dec.decode(&mut f), Ok((len, None)));
    assert!(dec.in_message());
    let mut g = client(OpCode::Continuation, true, b"def");
    let (n, m) = dec.decode(&mut g).unwrap();
    assert_eq!(n, g.len());
    assert_eq!(m, Some(Incoming::Binary(Bytes::from_static(b"abcdef"))));
    assert!(!dec.in_message());
}

#[test]
fn utf8_split_across_fragments_at_every_position() {
    for s in ["κόσμε", "x😀y", "😀", "€uro κ 😀"] {
        let b = s.as_bytes();
        for i in 0..=b.len() {
            for j in i..=b.len() {
                let mut st = client(OpCode::Text, false, &b[..i]);
                st.extend(client(OpCode::Ping, true, b""));
                st.extend(client(OpCode::Continuation, false, &b[i..j]));
                st.extend(client(OpCode::Continuation, true, &b[j..]));
                let out = feed_whole(&st);
                assert_eq!(out.last(), Some(&text(s)), "{s:?} split {i},{j}");
            }
        }
    }
}

#[test]
fn invalid_utf8_is_1007() {
    let e = first_error(&client(OpCode::Text, true, &[b'a', 0xff, b'b']));
    assert_eq!(e, ProtocolError::InvalidUtf8);
    assert_eq!(e.close_code(), 1007);
    // Cut code point at the end of the final fragment.
    let mut s = client(OpCode::Text, false, "κ".as_bytes());
    s.extend(client(OpCode::Continuation, true, &[0xce]));
    assert_eq!(first_error(&s), ProtocolError::InvalidUtf8);
    // Binary is never checked.
    assert!(feed_whole(&client(OpCode::Binary, true, &[0xff]))[0].is_ok());
}

#[test]
fn invalid_utf8_in_a_fragment_fails_before_the_message_ends() {
    let mut dec = Decoder::new(DecoderConfig::default());
    let mut a = client(OpCode::Text, false, &[b'o', b'k', 0xe0]);
    assert_eq!(dec.decode(&mut a).map(|r| r.1), Ok(None));
    let mut b = client(OpCode::Continuation, false, &[0x80]); // overlong after E0
    assert_eq!(dec.decode(&mut b), Err(ProtocolError::InvalidUtf8));
}

#[test]
fn fail_fast_on_partly_arrived_invalid_text_frame() {
    let mut payload = b"fine so far ".to_vec();
    payload.push(0xc0); // can never start valid UTF-8
    payload.extend(vec![b'z'; 1000]);
    let frame = client(OpCode::Text, true, &payload);
    let header_len = frame.len() - payload.len();
    let mut dec = Decoder::new(DecoderConfig::default());
    let mut part = frame[..header_len + 5].to_vec();
    assert_eq!(dec.decode(&mut part), Ok((0, None)), "valid prefix: wait");
    let mut part = frame[..header_len + 13].to_vec();
    part[..header_len + 5].copy_from_slice(&{
        // The caller's buffer holds what decode left there (already unmasked bytes).
        let mut prev = frame[..header_len + 5].to_vec();
        apply_mask(&mut prev[header_len..], MASK, 0);
        prev
    });
    assert_eq!(dec.decode(&mut part), Err(ProtocolError::InvalidUtf8));
}

#[test]
fn fail_fast_via_caller_loop() {
    // Same as above through the caller model: the error comes long before the frame ends.
    let mut payload = vec![b'a'; 50];
    payload.extend([0xed, 0xa0, 0x80]); // surrogate
    payload.extend(vec![b'a'; 5000]);
    let frame = client(OpCode::Text, true, &payload);
    let out = feed_chunks(DecoderConfig::default(), &frame[..70], &[20, 40]);
    assert_eq!(out, vec![Err(ProtocolError::InvalidUtf8)]);
}

#[test]
fn partial_payload_is_unmasked_once() {
    let payload: Vec<u8> = (0..200u8).collect();
    let frame = client(OpCode::Binary, true, &payload);
    let mut dec = Decoder::new(DecoderConfig::default());
    let header_len = frame.len() - payload.len();
    let mut buf = frame[..50].to_vec();
    assert_eq!(dec.decode(&mut buf), Ok((0, None)));
    assert_eq!(
        &buf[header_len..],
        &payload[..50 - header_len],
        "arrived part unmasked"
    );
    // Calling again with no new bytes must not unmask the arrived part a second time.
    assert_eq!(dec.decode(&mut buf), Ok((0, None)));
    assert_eq!(&buf[header_len..], &payload[..50 - header_len]);
    buf.extend_from_slice(&frame[50..90]);
    assert_eq!(dec.decode(&mut buf), Ok((0, None)));
    assert_eq!(&buf[header_len..], &payload[..90 - header_len]);
    buf.extend_from_slice(&frame[90..]);
    let (n, msg) = dec.decode(&mut buf).unwrap();
    assert_eq!(n, frame.len());
    assert_eq!(msg, Some(Incoming::Binary(Bytes::from(payload))));
}

#[test]
fn byte_at_a_time_delivery() {
    let mut s = client(OpCode::Text, false, "κόσ".as_bytes());
    s.extend(client(OpCode::Ping, true, b"hi"));
    s.extend(client(OpCode::Continuation, true, "με".as_bytes()));
    s.extend(client(OpCode::Binary, true, &[9u8; 300]));
    let cuts: Vec<usize> = (1..s.len()).collect();
    assert_eq!(feed_chunks(DecoderConfig::default(), &s, &cuts), feed_whole(&s));
    assert_eq!(feed_whole(&s).len(), 3);
}

// ---- close payloads ---------------------------------------------------------------------

#[test]
fn close_payload_rules() {
    let close = |p: &[u8]| feed_whole(&client(OpCode::Close, true, p)).remove(0);
    assert_eq!(close(b""), Ok(Incoming::Close(None)));
    assert_eq!(
        close(&[0x03, 0xe8]),
        Ok(Incoming::Close(Some((1000, String::new()))))
    );
    assert_eq!(
        close(&[0x0f, 0xa0, b'o', b'k']),
        Ok(Incoming::Close(Some((4000, "ok".into()))))
    );
    assert_eq!(close(&[0x03]), Err(ProtocolError::BadClosePayload));
    assert_eq!(ProtocolError::BadClosePayload.close_code(), 1002);
    for bad in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535] {
        assert_eq!(
            close(&bad.to_be_bytes()),
            Err(ProtocolError::InvalidCloseCode),
            "{bad}"
        );
    }
    assert_eq!(ProtocolError::InvalidCloseCode.close_code(), 1002);
    let e = close(&[0x03, 0xe8, 0xff]).unwrap_err();
    assert_eq!(e, ProtocolError::InvalidUtf8);
    assert_eq!(e.close_code(), 1007);
}

// ---- limits -----------------------------------------------------------------------------

fn limits(msg: usize, frame: usize) -> DecoderConfig {
    DecoderConfig {
        max_message_bytes: msg,
        max_frame_bytes: frame,
    }
}

#[test]
fn frame_limit_is_inclusive_and_1009() {
    let cfg = limits(1000, 100);
    let ok = feed_chunks(cfg, &client(OpCode::Binary, true, &[0; 100]), &[]);
    assert!(ok[0].is_ok());
    let e = feed_chunks(cfg, &client(OpCode::Binary, true, &[0; 101]), &[]);
    assert_eq!(e, vec![Err(ProtocolError::TooBig)]);
    assert_eq!(ProtocolError::TooBig.close_code(), 1009);
}

#[test]
fn message_limit_sums_fragments() {
    let cfg = limits(10, 100);
    let mut s = client(OpCode::Text, false, b"12345");
    s.extend(client(OpCode::Continuation, true, b"67890"));
    assert_eq!(feed_chunks(cfg, &s, &[]), vec![text("1234567890")]);
    let mut s = client(OpCode::Text, false, b"12345");
    s.extend(client(OpCode::Continuation, false, b"6789"));
    s.extend(client(OpCode::Continuation, true, b"01"));
    assert_eq!(feed_chunks(cfg, &s, &[]), vec![Err(ProtocolError::TooBig)]);
    assert_eq!(
        feed_chunks(cfg, &client(OpCode::Binary, true, &[0; 11]), &[]),
        vec![Err(ProtocolError::TooBig)]
    );
}

#[test]
fn limits_checked_from_header_before_payload() {
    // A header announcing 2^62 bytes fails at once, with no payload present.
    let mut f = vec![0x82, 0xFF];
    f.extend((1u64 << 62).to_be_bytes());
    let mut dec = Decoder::new(DecoderConfig::default());
    assert_eq!(dec.decode(&mut f), Err(ProtocolError::TooBig));
    // Even before the mask key arrives.
    let mut dec = Decoder::new(limits(1000, 200));
    assert_eq!(
        dec.decode(&mut [0x82, 0xFE, 0x01, 0x00]),
        Err(ProtocolError::TooBig)
    );
    // A continuation that would overflow the message is refused from its header too.
    let mut dec = Decoder::new(limits(300, 200));
    let mut a = client(OpCode::Binary, false, &[1; 200]);
    assert!(dec.decode(&mut a).is_ok());
    assert_eq!(
        dec.decode(&mut [0x80, 0xFE, 0x00, 0x65]),
        Err(ProtocolError::TooBig)
    );
}

#[test]
fn control_frames_ignore_data_limits() {
    let cfg = limits(4, 4);
    let out = feed_chunks(cfg, &client(OpCode::Ping, true, &[1; 125]), &[]);
    assert_eq!(out, vec![Ok(Incoming::Ping(Bytes::from(vec![1; 125])))]);
}

#[test]
fn reassembly_buffer_never_exceeds_limit() {
    let cfg = limits(1000, 1000);
    let mut dec = Decoder::new(cfg);
    let mut first = client(OpCode::Binary, false, &[0; 600]);
    dec.decode(&mut first).unwrap();
    let mut second = client(OpCode::Continuation, false, &[0; 300]);
    dec.decode(&mut second).unwrap();
    assert!(
        dec.message_buf.capacity() <= 1000,
        "{}",
        dec.message_buf.capacity()
    );
}

// ---- lengths ----------------------------------------------------------------------------

#[test]
fn sixteen_and_sixty_four_bit_lengths() {
    let cfg = limits(1 << 20, 1 << 20);
    for len in [125usize, 126, 127, 1000, 65535, 65536, 70000] {
        let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let frame = client(OpCode::Binary, true, &payload);
        let expected_header = match len {
            0..=125 => 6,
            126..=65535 => 8,
            _ => 14,
        };
        assert_eq!(frame.len(), expected_header + len);
        let out = feed_chunks(cfg, &frame, &[]);
        assert_eq!(out, vec![Ok(Incoming::Binary(Bytes::from(payload)))], "len {len}");
    }
}

#[test]
fn non_minimal_lengths_are_accepted() {
    // 3-byte payload with a 16-bit and with a 64-bit length.
    let mut f16 = vec![0x82, 0xFE, 0x00, 0x03];
    f16.extend([0, 0, 0, 0, 1, 2, 3]);
    let mut f64 = vec![0x82, 0xFF];
    f64.extend(3u64.to_be_bytes());
    f64.extend([0, 0, 0, 0, 1, 2, 3]);
    for f in [f16, f64] {
        assert_eq!(
            feed_whole(&f),
            vec![Ok(Incoming::Binary(Bytes::from_static(&[1, 2, 3])))]
        );
    }
}

// ---- poisoning --------------------------------------------------------------------------

#[test]
fn decoder_is_poisoned_after_error() {
    let mut dec = Decoder::new(DecoderConfig::default());
    assert_eq!(dec.decode(&mut [0x83, 0x80]), Err(ProtocolError::UnknownOpcode));
    let mut ok = client(OpCode::Text, true, b"hi");
    assert_eq!(dec.decode(&mut ok), Err(ProtocolError::UnknownOpcode));
}

#[test]
fn decoder_is_poisoned_after_fast_path_error() {
    let mut dec = Decoder::new(DecoderConfig::default());
    let mut bad = client(OpCode::Text, true, &[0xff]);
    assert_eq!(dec.decode(&mut bad), Err(ProtocolError::InvalidUtf8));
    let mut ok = client(OpCode::Text, true, b"hi");
    assert_eq!(dec.decode(&mut ok), Err(ProtocolError::InvalidUtf8));
}

#[test]
fn fast_path_leaves_trailing_bytes() {
    let mut s = client(OpCode::Text, true, b"one");
    let first = s.len();
    s.extend(client(OpCode::Binary, true, &[1; 200]));
    s.extend_from_slice(&[0x81]);
    let mut dec = Decoder::new(DecoderConfig::default());
    let (n, m) = dec.decode(&mut s).unwrap();
    assert_eq!((n, m), (first, Some(Incoming::Text(Bytes::from_static(b"one")))));
    s.drain(..n);
    let (n, m) = dec.decode(&mut s).unwrap();
    assert_eq!(n, 208);
    assert_eq!(m, Some(Incoming::Binary(Bytes::from(vec![1; 200]))));
    s.drain(..n);
    assert_eq!(dec.decode(&mut s), Ok((0, None)));
}

// ---- encoders ---------------------------------------------------------------------------

#[test]
fn header_lengths_at_boundaries() {
    let mut h = [0u8; 10];
    assert_eq!(write_header(OpCode::Text, 0, &mut h), 2);
    assert_eq!(h[..2], [0x81, 0]);
    assert_eq!(write_header(OpCode::Binary, 125, &mut h), 2);
    assert_eq!(h[..2], [0x82, 125]);
    assert_eq!(write_header(OpCode::Text, 126, &mut h), 4);
    assert_eq!(h[..4], [0x81, 126, 0, 126]);
    assert_eq!(write_header(OpCode::Text, 65535, &mut h), 4);
    assert_eq!(h[..4], [0x81, 126, 0xff, 0xff]);
    assert_eq!(write_header(OpCode::Text, 65536, &mut h), 10);
    assert_eq!(h, [0x81, 127, 0, 0, 0, 0, 0, 1, 0, 0]);
    assert_eq!(write_header(OpCode::Pong, 3, &mut h), 2);
    assert_eq!(h[0], 0x8A);
}

#[test]
fn encode_frame_matches_encode_into_and_is_exact() {
    for len in [0usize, 1, 125, 126, 65535, 65536] {
        let payload = vec![0x5a; len];
        let b = encode_frame(OpCode::Text, &payload);
        let mut v = vec![0xEE];
        encode_frame_into(OpCode::Text, &payload, &mut v);
        assert_eq!(&v[1..], &b[..]);
        assert!(b.ends_with(&payload));
    }
    assert_eq!(&encode_frame(OpCode::Text, b"Hello")[..], b"\x81\x05Hello");
}

#[test]
fn encode_close_truncates_on_char_boundary() {
    let f = encode_close(1000, "bye");
    assert_eq!(&f[..], &[0x88, 5, 0x03, 0xe8, b'b', b'y', b'e']);
    // 122 ASCII bytes + a 2-byte char would be 124 > 123: the char is dropped whole.
    let reason = format!("{}é", "a".repeat(122));
    let f = encode_close(CloseCode::POLICY, &reason);
    assert_eq!(f[1] as usize, 2 + 122);
    assert_eq!(f.len(), 2 + 2 + 122);
    let long = "😀".repeat(40);
    let f = encode_close(4001, &long);
    assert_eq!(f[1] as usize, 2 + 120);
    assert!(std::str::from_utf8(&f[4..]).is_ok());
    assert_eq!(encode_close(1000, &"x".repeat(123))[1], 125);
}

#[test]
fn encode_close_is_decodable_after_masking() {
    let f = encode_close(4008, "slow consumer");
    let mut masked = Vec::new();
    encode_client_frame_into(OpCode::Close, true, &f[2..], MASK, &mut masked);
    assert_eq!(
        feed_whole(&masked),
        vec![Ok(Incoming::Close(Some((4008, "slow consumer".into()))))]
    );
}

#[test]
fn client_encoder_sets_bits() {
    let f = client(OpCode::Text, false, b"ab");
    assert_eq!(f[0], 0x01);
    assert_eq!(f[1], 0x82);
    assert_eq!(&f[2..6], &MASK);
    let f = client(OpCode::Continuation, true, b"");
    assert_eq!(&f[..2], &[0x80, 0x80]);
}

// ---- property tests ---------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Msg {
    Text(String),
    Binary(Vec<u8>),
}

fn msg_strategy() -> impl Strategy<Value = Msg> {
    prop_oneof![
        "\\PC{0,60}".prop_map(Msg::Text),
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(Msg::Binary),
    ]
}

/// Splits `len` into fragments at the given (normalised) cut points.
fn fragments(len: usize, cuts: &[usize]) -> Vec<(usize, usize)> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (len + 1)).collect();
    points.sort_unstable();
    let mut out = Vec::new();
    let mut start = 0;
    for p in points {
        out.push((start, p));
        start = p;
    }
    out.push((start, len));
    out
}

/// One frame for the split-point property: mostly valid, sometimes not.
#[derive(Clone, Debug)]
struct RawSpec {
    b0: u8,
    masked: bool,
    payload: Vec<u8>,
    mask: [u8; 4],
}

fn raw_spec_strategy() -> impl Strategy<Value = RawSpec> {
    let b0 = prop_oneof![
        6 => prop::sample::select(vec![0x81u8, 0x01, 0x80, 0x00, 0x82, 0x02, 0x88, 0x89, 0x8A]),
        1 => any::<u8>(),
    ];
    let payload = prop_oneof![
        "\\PC{0,40}".prop_map(String::into_bytes),
        proptest::collection::vec(any::<u8>(), 0..200),
        Just(vec![0x03, 0xe8]),
        Just(vec![0xce, 0xba, 0xe1]),
    ];
    (b0, prop::bool::weighted(0.95), payload, any::<[u8; 4]>()).prop_map(|(b0, masked, payload, mask)| {
        RawSpec {
            b0,
            masked,
            payload,
            mask,
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// (1) encode_client_frame_into then decode round-trips messages in arbitrary fragments,
    /// with pings between fragments, whole or in arbitrary reads.
    #[test]
    fn prop_round_trip(
        msgs in proptest::collection::vec(
            (msg_strategy(), proptest::collection::vec(any::<usize>(), 0..4), any::<[u8; 4]>(), any::<bool>()),
            0..8),
        read_cuts in proptest::collection::vec(any::<usize>(), 0..8),
    ) {
        let mut stream = Vec::new();
        let mut expected = Vec::new();
        for (m, cuts, mask, ping) in &msgs {
            let (op, data) = match m {
                Msg::Text(s) => (OpCode::Text, s.as_bytes()),
                Msg::Binary(b) => (OpCode::Binary, b.as_slice()),
            };
            let frags = fragments(data.len(), cuts);
            let last = frags.len() - 1;
            for (i, (a, b)) in frags.into_iter().enumerate() {
                let fop = if i == 0 { op } else { OpCode::Continuation };
                encode_client_frame_into(fop, i == last, &data[a..b], *mask, &mut stream);
                if *ping && i != last {
                    encode_client_frame_into(OpCode::Ping, true, &[i as u8], *mask, &mut stream);
                    expected.push(Ok(Incoming::Ping(Bytes::from(vec![i as u8]))));
                }
            }
            expected.push(Ok(match m {
                Msg::Text(s) => Incoming::Text(Bytes::from(s.clone().into_bytes())),
                Msg::Binary(b) => Incoming::Binary(Bytes::from(b.clone())),
            }));
        }
        prop_assert_eq!(&feed_whole(&stream), &expected);
        let mut cuts: Vec<usize> = read_cuts.iter().map(|c| c % (stream.len() + 1)).collect();
        cuts.sort_unstable();
        prop_assert_eq!(&feed_chunks(DecoderConfig::default(), &stream, &cuts), &expected);
    }

    /// (2) The outcome sequence does not depend on how reads split the byte stream.
    #[test]
    fn prop_split_points_do_not_matter(
        specs in proptest::collection::vec(raw_spec_strategy(), 0..10),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..3),
        read_cuts in proptest::collection::vec(any::<usize>(), 0..12),
    ) {
        let mut stream = Vec::new();
        for s in &specs {
            stream.extend(raw_frame(s.b0, s.masked, &s.payload, s.mask));
        }
        if !stream.is_empty() {
            for (at, x) in &flips {
                let i = at % stream.len();
                stream[i] ^= x;
            }
        }
        let cfg = limits(300, 150);
        let mut cuts: Vec<usize> = read_cuts.iter().map(|c| c % (stream.len() + 1)).collect();
        cuts.sort_unstable();
        prop_assert_eq!(feed_chunks(cfg, &stream, &cuts), feed_chunks(cfg, &stream, &[]));
    }

    /// (3) Arbitrary bytes never panic, whole or split.
    #[test]
    fn prop_never_panics(
        bytes in proptest::collection::vec(any::<u8>(), 0..600),
        read_cuts in proptest::collection::vec(any::<usize>(), 0..8),
        small in any::<bool>(),
    ) {
        let cfg = if small { limits(64, 32) } else { DecoderConfig::default() };
        let mut cuts: Vec<usize> = read_cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
        cuts.sort_unstable();
        let _ = feed_chunks(cfg, &bytes, &cuts);
        // Force the mask bit and clear RSV so random input gets past the first checks.
        let mut tamed = bytes.clone();
        for (i, b) in tamed.iter_mut().enumerate() {
            if i % 7 == 0 { *b &= 0x8F; }
            if i % 7 == 1 { *b |= 0x80; }
        }
        let _ = feed_chunks(cfg, &tamed, &cuts);
    }
}

// ---- permessage-deflate -----------------------------------------------------------------

fn feed_inflating(cfg: DecoderConfig, stream: &[u8], cuts: &[usize]) -> Vec<Outcome> {
    let mut dec = Decoder::new(cfg).with_inflate(15, false);
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let mut start = 0;
    for end in cuts.iter().copied().chain(std::iter::once(stream.len())) {
        buf.extend_from_slice(&stream[start..end]);
        start = end;
        loop {
            match dec.decode(&mut buf) {
                Ok((n, msg)) => {
                    buf.drain(..n);
                    out.extend(msg.map(Ok));
                    if n == 0 {
                        break;
                    }
                }
                Err(e) => {
                    out.push(Err(e));
                    return out;
                }
            }
        }
    }
    out
}

/// `msg` compressed by a client (with `d`'s context) into frames of `chunk` bytes each.
fn compressed_client(
    d: &mut crate::proto::deflate::Deflater,
    op: OpCode,
    msg: &[u8],
    chunk: usize,
) -> Vec<u8> {
    let mut f = Vec::new();
    encode_deflated_into(d, op, msg, &mut f);
    let (_, z) = server_frame_parts(&f).unwrap();
    // An empty message compresses to one 0x00 byte (RFC 7692 section 7.2.3.6).
    let z = if z.is_empty() { &[0u8][..] } else { z };
    let parts: Vec<&[u8]> = z.chunks(chunk.max(1)).collect();
    let mut out = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        let fin = i + 1 == parts.len();
        let first = if i == 0 { RSV1_BIT | op.as_u8() } else { 0 };
        out.extend(raw_frame(first | if fin { FIN_BIT } else { 0 }, true, p, MASK));
    }
    out
}

#[test]
fn rsv1_without_negotiation_is_1002() {
    let mut d = crate::proto::deflate::Deflater::new(1, 15, false);
    let s = compressed_client(&mut d, OpCode::Text, b"hello hello hello", 100);
    assert_eq!(first_error(&s), ProtocolError::ReservedBits);
    assert_eq!(ProtocolError::ReservedBits.close_code(), 1002);
}

#[test]
fn rsv1_on_control_continuation_or_rsv2_is_1002_even_when_negotiated() {
    let cfg = DecoderConfig::default();
    let ping = raw_frame(FIN_BIT | RSV1_BIT | 0x9, true, b"x", MASK);
    assert_eq!(
        feed_inflating(cfg, &ping, &[]),
        vec![Err(ProtocolError::ReservedBits)]
    );
    let rsv2 = raw_frame(FIN_BIT | 0x20 | 0x1, true, b"x", MASK);
    assert_eq!(
        feed_inflating(cfg, &rsv2, &[]),
        vec![Err(ProtocolError::ReservedBits)]
    );
    let mut s = raw_frame(0x1, true, b"a", MASK);
    s.extend(raw_frame(FIN_BIT | RSV1_BIT, true, b"b", MASK));
    assert_eq!(
        feed_inflating(cfg, &s, &[]),
        vec![Err(ProtocolError::ReservedBits)]
    );
}

#[test]
fn compressed_messages_mixed_with_plain_ones() {
    let mut d = crate::proto::deflate::Deflater::new(6, 15, false);
    let mut s = compressed_client(&mut d, OpCode::Text, "héllo héllo héllo".as_bytes(), 4);
    s.extend(client(OpCode::Text, true, b"plain"));
    s.extend(client(OpCode::Ping, true, b"p"));
    s.extend(compressed_client(&mut d, OpCode::Binary, &[7u8; 3000], 1000));
    s.extend(compressed_client(&mut d, OpCode::Text, b"", 10));
    let want = vec![
        text("héllo héllo héllo"),
        text("plain"),
        Ok(Incoming::Ping(Bytes::from_static(b"p"))),
        Ok(Incoming::Binary(Bytes::from(vec![7u8; 3000]))),
        text(""),
    ];
    let cfg = DecoderConfig::default();
    for cut in 0..=s.len() {
        assert_eq!(feed_inflating(cfg, &s, &[cut]), want, "cut at {cut}");
    }
}

#[test]
fn compressed_bomb_is_1009_and_bad_data_1007() {
    let mut d = crate::proto::deflate::Deflater::new(9, 15, false);
    let s = compressed_client(&mut d, OpCode::Binary, &vec![0u8; 1 << 20], 1 << 20);
    assert!(s.len() < 4096);
    let out = feed_inflating(DecoderConfig::default(), &s, &[]);
    assert_eq!(out, vec![Err(ProtocolError::TooBig)]);
    assert_eq!(ProtocolError::TooBig.close_code(), 1009);
    let bad = raw_frame(FIN_BIT | RSV1_BIT | 0x1, true, &[0xff, 0xff], MASK);
    let out = feed_inflating(DecoderConfig::default(), &bad, &[]);
    assert_eq!(out, vec![Err(ProtocolError::BadCompressedData)]);
    assert_eq!(ProtocolError::BadCompressedData.close_code(), 1007);
    // Invalid UTF-8 inside a compressed text message is 1007 too.
    let mut d = crate::proto::deflate::Deflater::new(1, 15, false);
    let s = compressed_client(&mut d, OpCode::Text, &[0xc3, 0x28], 10);
    assert_eq!(
        feed_inflating(DecoderConfig::default(), &s, &[]),
        vec![Err(ProtocolError::InvalidUtf8)]
    );
}

proptest! {
    #[test]
    fn compressed_round_trip_any_split(
        msgs in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 1..4),
        chunk in 1usize..64, cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..3),
    ) {
        let mut d = crate::proto::deflate::Deflater::new(1, 15, false);
        let mut s = Vec::new();
        for m in &msgs {
            s.extend(compressed_client(&mut d, OpCode::Binary, m, chunk));
        }
        let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(s.len() + 1)).collect();
        cuts.sort_unstable();
        let want: Vec<Outcome> = msgs.iter().map(|m| Ok(Incoming::Binary(Bytes::from(m.clone())))).collect();
        prop_assert_eq!(feed_inflating(DecoderConfig::default(), &s, &cuts), want);
    }
}
