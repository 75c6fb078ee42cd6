//! Arbitrary `Sec-WebSocket-Extensions` lines through the permessage-deflate negotiation
//! (`proto::deflate::negotiate`), then, for an accepted offer, the answer and a compressed
//! round trip with the agreed windows; plus arbitrary bytes through the bounded inflater.
//! Never a panic; the answer is a valid header value that is itself an acceptable offer;
//! the windows are within the offer's and the server's; the inflater never passes its bound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tickgate::proto::deflate::{DeflateConfig, Deflater, Inflater, negotiate};
use tickgate::proto::frame::{OpCode, encode_deflated_into, server_frame_parts};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    // Lines as a client sends them: split on newlines, several header lines.
    let lines: Vec<&str> = text.split('\n').collect();
    for window_bits in [9u8, 12, 15] {
        let cfg = DeflateConfig { level: 1, window_bits };
        let Some(a) = negotiate(lines.iter().copied(), &cfg) else { continue };
        assert!((9..=window_bits).contains(&a.server_window_bits));
        assert!((8..=15).contains(&a.client_window_bits));
        let answer = a.response();
        assert!(answer.bytes().all(|b| b.is_ascii_graphic() || b == b' '));
        assert!(negotiate([answer.as_str()], &DeflateConfig::default()).is_some());
        let mut d = Deflater::for_server(&a, &cfg);
        let mut inf = Inflater::new(a.server_window_bits, a.server_no_context_takeover);
        let mut frame = Vec::new();
        encode_deflated_into(&mut d, OpCode::Binary, data, &mut frame);
        if let Some((b0, payload)) = server_frame_parts(&frame) {
            if b0 & 0x40 != 0 {
                let mut out = Vec::new();
                inf.feed(payload, &mut out, data.len()).unwrap();
                inf.finish(&mut out, data.len()).unwrap();
                assert_eq!(out, data);
            }
        }
    }
    for limit in [0usize, 100, 4096] {
        let mut inf = Inflater::new(15, false);
        let mut out = Vec::new();
        let _ = inf.feed(data, &mut out, limit).and_then(|()| inf.finish(&mut out, limit));
        assert!(out.len() <= limit);
    }
});
