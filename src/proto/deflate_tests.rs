use proptest::prelude::*;

use super::*;
use crate::proto::frame::{OpCode, deflate_server_frame, encode_deflated_into, server_frame_parts};

fn cfg(window_bits: u8) -> DeflateConfig {
    DeflateConfig {
        level: 1,
        window_bits,
    }
}

fn answer(lines: &[&str], c: &DeflateConfig) -> Option<String> {
    negotiate(lines.iter().copied(), c).map(|a| a.response())
}

#[test]
fn no_offer_or_other_extensions_only() {
    assert_eq!(answer(&[], &cfg(15)), None);
    assert_eq!(answer(&["x-webkit-deflate-frame"], &cfg(15)), None);
    assert_eq!(answer(&["", " , "], &cfg(15)), None);
}

#[test]
fn browser_offer() {
    // Chromium and Firefox send exactly this.
    let a = negotiate(["permessage-deflate; client_max_window_bits"], &cfg(15)).unwrap();
    assert_eq!(a.response(), "permessage-deflate");
    assert_eq!((a.server_window_bits, a.client_window_bits), (15, 15));
    assert!(!a.server_no_context_takeover && !a.client_no_context_takeover);
    // A smaller configured window is announced both ways.
    let a = negotiate(["permessage-deflate; client_max_window_bits"], &cfg(11)).unwrap();
    assert_eq!(
        a.response(),
        "permessage-deflate; server_max_window_bits=11; client_max_window_bits=11"
    );
}

#[test]
fn python_websockets_offer() {
    let a = negotiate(
        ["permessage-deflate; server_max_window_bits=12; client_max_window_bits=12"],
        &cfg(15),
    )
    .unwrap();
    assert_eq!(
        a.response(),
        "permessage-deflate; server_max_window_bits=12; client_max_window_bits=12"
    );
    assert_eq!((a.server_window_bits, a.client_window_bits), (12, 12));
    // The server's smaller window wins.
    let a = negotiate(["permessage-deflate; server_max_window_bits=14"], &cfg(10)).unwrap();
    assert_eq!(a.response(), "permessage-deflate; server_max_window_bits=10");
}

#[test]
fn no_context_takeover_is_echoed() {
    let a = negotiate(
        ["permessage-deflate; server_no_context_takeover; client_no_context_takeover"],
        &cfg(15),
    )
    .unwrap();
    assert!(a.server_no_context_takeover && a.client_no_context_takeover);
    assert_eq!(
        a.response(),
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
    );
}

#[test]
fn first_acceptable_offer_wins() {
    let line = "permessage-deflate; server_max_window_bits=8, permessage-deflate; foo, \
                permessage-deflate; server_max_window_bits=10, permessage-deflate";
    assert_eq!(
        answer(&[line], &cfg(15)).unwrap(),
        "permessage-deflate; server_max_window_bits=10"
    );
    // Offers continue over several header lines.
    assert_eq!(
        answer(
            &[
                "permessage-deflate; bogus",
                "PerMessage-Deflate; Server_No_Context_Takeover"
            ],
            &cfg(15)
        )
        .unwrap(),
        "permessage-deflate; server_no_context_takeover"
    );
}

#[test]
fn malformed_offers_are_declined() {
    for bad in [
        "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
        "permessage-deflate; client_max_window_bits; client_max_window_bits=10",
        "permessage-deflate; server_no_context_takeover=1",
        "permessage-deflate; client_no_context_takeover=true",
        "permessage-deflate; server_max_window_bits",
        "permessage-deflate; server_max_window_bits=16",
        "permessage-deflate; server_max_window_bits=7",
        "permessage-deflate; server_max_window_bits=010",
        "permessage-deflate; server_max_window_bits=1a",
        "permessage-deflate; client_max_window_bits=0",
        "permessage-deflate; client_max_window_bits=",
        "permessage-deflate; server_max_window_bits=8",
        "permessage-deflate; unknown",
        "permessage-deflate; =1",
        "permessage-deflate;",
        "permessage-deflate; server_max_window_bits=\"1\"0\"",
        "permessage-deflate x",
        "\"permessage-deflate\"",
    ] {
        assert_eq!(answer(&[bad], &cfg(15)), None, "{bad}");
    }
}

#[test]
fn quoted_values() {
    assert_eq!(
        answer(&["permessage-deflate; server_max_window_bits=\"10\""], &cfg(15)).unwrap(),
        "permessage-deflate; server_max_window_bits=10"
    );
    assert_eq!(
        answer(&["permessage-deflate; client_max_window_bits=\"1\\0\""], &cfg(15)).unwrap(),
        "permessage-deflate; client_max_window_bits=10"
    );
    // A comma inside quotes does not split offers.
    assert_eq!(answer(&["x; a=\"b,permessage-deflate\""], &cfg(15)), None);
}

fn inflate_frame(inf: &mut Inflater, frame: &[u8], limit: usize) -> Result<Vec<u8>, InflateError> {
    let (b0, payload) = server_frame_parts(frame).unwrap();
    let mut out = Vec::new();
    if b0 & crate::proto::frame::RSV1_BIT == 0 {
        return Ok(payload.to_vec());
    }
    inf.feed(payload, &mut out, limit)?;
    inf.finish(&mut out, limit)?;
    Ok(out)
}

fn tick_json(i: u32) -> Vec<u8> {
    format!(
        "{{\"type\":\"tick\",\"s\":\"BTC-USD\",\"seq\":{},\"ts\":17954631{:010},\"bid\":{}.89,\"ask\":{}.39,\"last\":64964.06,\"qty\":1.{}}}",
        i,
        i * 7919,
        64900 + i % 97,
        64905 + i % 89,
        i % 10
    )
    .into_bytes()
}

#[test]
fn context_takeover_round_trip_and_ratio() {
    let mut d = Deflater::new(1, 15, false);
    let mut inf = Inflater::new(15, false);
    let (mut plain, mut wire) = (0, 0);
    for i in 0..200 {
        let msg = tick_json(i);
        let mut frame = Vec::new();
        encode_deflated_into(&mut d, OpCode::Text, &msg, &mut frame);
        assert_eq!(frame[0], 0xC1);
        plain += msg.len() + 2;
        wire += frame.len();
        assert_eq!(inflate_frame(&mut inf, &frame, 65536).unwrap(), msg);
    }
    assert!(wire * 100 <= plain * 50, "{wire} of {plain}");
}

#[test]
fn shared_frame_decodes_to_the_plain_frame() {
    let mut shared = Deflater::new(1, 15, true);
    for i in 0..20 {
        let msg = tick_json(i);
        let plain = crate::proto::frame::encode_frame(OpCode::Text, &msg);
        let mut frame = Vec::new();
        encode_deflated_into(&mut shared, OpCode::Text, &msg, &mut frame);
        // Every subscriber has its own inflater; each decodes the same shared bytes.
        for _ in 0..3 {
            let mut inf = Inflater::new(15, false);
            let out = inflate_frame(&mut inf, &frame, 65536).unwrap();
            assert_eq!(out, server_frame_parts(&plain).unwrap().1);
        }
        // And reframing the plain frame gives the same bytes.
        let mut again = Vec::new();
        deflate_server_frame(&mut shared, &plain, &mut again);
        assert_eq!(again, frame);
    }
}

#[test]
fn control_frames_and_empty_messages_stay_plain() {
    let mut d = Deflater::new(6, 15, false);
    let ping = crate::proto::frame::encode_frame(OpCode::Ping, b"hi");
    let close = crate::proto::frame::encode_close(1000, "bye");
    let mut out = Vec::new();
    deflate_server_frame(&mut d, &ping, &mut out);
    deflate_server_frame(&mut d, &close, &mut out);
    assert_eq!(out, [&ping[..], &close[..]].concat());
    out.clear();
    encode_deflated_into(&mut d, OpCode::Text, b"", &mut out);
    assert_eq!(out, [0x81, 0]);
}

#[test]
fn bomb_is_too_big_and_bounded() {
    let zeros = vec![0u8; 10 << 20];
    let mut d = Deflater::new(9, 15, false);
    let mut frame = Vec::new();
    encode_deflated_into(&mut d, OpCode::Binary, &zeros, &mut frame);
    let (_, payload) = server_frame_parts(&frame).unwrap();
    assert!(payload.len() < 20_000);
    let mut inf = Inflater::new(15, false);
    let mut out = Vec::new();
    assert_eq!(inf.feed(payload, &mut out, 65536), Err(InflateError::TooBig));
    assert!(out.capacity() <= 65536, "{}", out.capacity());
    // Exactly at the bound is fine.
    let mut d = Deflater::new(9, 15, false);
    let mut frame = Vec::new();
    encode_deflated_into(&mut d, OpCode::Binary, &zeros[..1000], &mut frame);
    let mut inf = Inflater::new(15, false);
    assert_eq!(inflate_frame(&mut inf, &frame, 1000).unwrap().len(), 1000);
    let mut inf = Inflater::new(15, false);
    assert_eq!(inflate_frame(&mut inf, &frame, 999), Err(InflateError::TooBig));
}

#[test]
fn garbage_is_invalid() {
    let mut inf = Inflater::new(15, false);
    let mut out = Vec::new();
    // BTYPE 11 is reserved.
    assert_eq!(
        inf.feed(&[0xff, 0xff, 0xff], &mut out, 1000),
        Err(InflateError::Invalid)
    );
}

#[test]
fn bfinal_block_starts_a_new_stream() {
    // A sender may end a message with a final block, followed by one 0x00 byte so that
    // the tail the receiver appends is a whole empty stored block (RFC 7692 section
    // 7.2.3.4, whose example this is).
    let buf = [0xf3, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00, 0x00];
    let mut inf = Inflater::new(15, false);
    for _ in 0..2 {
        let mut out = Vec::new();
        inf.feed(&buf, &mut out, 100).unwrap();
        inf.finish(&mut out, 100).unwrap();
        assert_eq!(out, b"Hello");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn negotiate_never_panics(lines in proptest::collection::vec("[ -~]{0,80}", 0..4)) {
        let a = negotiate(lines.iter().map(String::as_str), &cfg(12));
        if let Some(a) = a {
            // The answer is itself an acceptable offer, and within the offer and the config.
            prop_assert!(a.server_window_bits <= 12 && a.server_window_bits >= 9);
            prop_assert!(negotiate([a.response().as_str()], &cfg(15)).is_some());
        }
    }

    #[test]
    fn offers_built_from_parts(
        snct in any::<bool>(), cnct in any::<bool>(),
        sbits in proptest::option::of(9u8..=15), cbits in proptest::option::of(proptest::option::of(8u8..=15)),
        server_cfg in 9u8..=15, order in any::<bool>(),
    ) {
        let mut parts = vec!["permessage-deflate".to_owned()];
        let mut ps = Vec::new();
        if snct { ps.push("server_no_context_takeover".to_owned()) }
        if cnct { ps.push("client_no_context_takeover".to_owned()) }
        if let Some(b) = sbits { ps.push(format!("server_max_window_bits={b}")) }
        match cbits { Some(Some(b)) => ps.push(format!("client_max_window_bits={b}")), Some(None) => ps.push("client_max_window_bits".into()), None => {} }
        if order { ps.reverse() }
        parts.extend(ps);
        let a = negotiate([parts.join("; ").as_str()], &cfg(server_cfg)).unwrap();
        prop_assert_eq!(a.server_no_context_takeover, snct);
        prop_assert_eq!(a.client_no_context_takeover, cnct);
        prop_assert!(a.server_window_bits <= sbits.unwrap_or(15).min(server_cfg));
        match cbits {
            None => prop_assert_eq!(a.client_window_bits, 15),
            Some(b) => prop_assert!(a.client_window_bits <= b.unwrap_or(15).min(server_cfg)),
        }
        prop_assert_eq!(a.response().contains("client_max_window_bits"), cbits.is_some() && (cbits != Some(None) || server_cfg < 15));
    }

    #[test]
    fn round_trip_at_every_split_point(
        msgs in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 1..6),
        level in 0u32..=9, bits in 9u8..=15, no_context in any::<bool>(),
    ) {
        let mut d = Deflater::new(level, bits, no_context);
        let mut frames = Vec::new();
        for m in &msgs {
            let mut f = Vec::new();
            encode_deflated_into(&mut d, OpCode::Binary, m, &mut f);
            frames.push(f);
        }
        // The last message's compressed payload, split at every point, after the others
        // went through the same inflater (the context carries over).
        let last = frames.len() - 1;
        let (_, payload) = server_frame_parts(&frames[last]).unwrap();
        for split in 0..=payload.len() {
            let mut inf = Inflater::new(bits, false);
            for (m, f) in msgs.iter().zip(&frames).take(last) {
                prop_assert_eq!(&inflate_frame(&mut inf, f, 1 << 16).unwrap(), m);
            }
            if msgs[last].is_empty() {
                break;
            }
            let mut out = Vec::new();
            inf.feed(&payload[..split], &mut out, 1 << 16).unwrap();
            inf.feed(&payload[split..], &mut out, 1 << 16).unwrap();
            inf.finish(&mut out, 1 << 16).unwrap();
            prop_assert_eq!(&out, &msgs[last]);
        }
    }

    #[test]
    fn inflate_never_exceeds_its_bound(data in proptest::collection::vec(any::<u8>(), 0..400), limit in 0usize..600) {
        let mut inf = Inflater::new(15, false);
        let mut out = Vec::new();
        let _ = inf.feed(&data, &mut out, limit).and_then(|()| inf.finish(&mut out, limit));
        prop_assert!(out.len() <= limit && out.capacity() <= limit.max(out.len()));
    }
}
