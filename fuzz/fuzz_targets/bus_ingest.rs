//! Everything the bus thread (`rt::bus`) does with bytes it did not write: a feed
//! handler's raw tick on `<prefix>.in.<SYMBOL>` (subject and payload), an ordered tick's
//! `Tg-Seq` header, and a revocation's payload with its `Tg-Revoked-At` header. All of them
//! come from anyone allowed to publish on the NATS account, so none may panic.
//!
//! Input layout: `[flags, subject_len, header_len, subject.., header.., payload..]`; the
//! lengths are clamped to what is there, subject and header go through lossy UTF-8 (NATS
//! hands them over as `&str`). Flag bit 0 puts `tickgate.in.` in front of the subject, so
//! the symbol path is reached without the fuzzer having to find the prefix first.
//!
//! Checks, beyond "no panic":
//! - `ingest_symbol` only answers for `tickgate.in.<symbol>`, and gives exactly the tail;
//! - a tick that parses (for the subject's symbol, or for a fixed valid symbol) has finite
//!   numbers and a valid bus symbol, and round-trips: `encode_tick_payload` then
//!   `parse_tick_payload` gives the same tick back, and re-encoding gives the same bytes
//!   (the canonical payload is a fixed point);
//! - `parse_seq` accepts only 1-20 ASCII digits with a value from 1 to `u64::MAX`;
//! - an ordered message (one tick, or a batch of up to `MAX_BATCH` separated by `\n`) is
//!   taken whole or not at all: its ticks carry consecutive `seq`s from the header's,
//!   each is what `parse_tick_payload` gives for its part, and re-encoding the batch with
//!   `encode_batch_tick` reads back the same, and `ordered_last_seq` (the head from the
//!   number of parts alone) is its last tick's `seq`;
//! - a revocation that parses round-trips through `encode_revocation`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tickgate::bus::{
    Buffers, MAX_BATCH, MAX_INGEST_BYTES, Subjects, encode_batch_tick, encode_revocation, encode_tick_payload,
    is_bus_symbol, ordered_last_seq, parse_ordered_payload, parse_revocation, parse_seq, parse_tick_payload,
};

/// A valid symbol, for payloads whose subject did not yield one.
const FIXED_SYMBOL: &str = "BTC-USD";

/// Parses `payload` for `symbol` the way the ingest loop does, and checks the round trip.
fn tick(symbol: &str, payload: &[u8], scratch: &mut Vec<u8>, buffers: &mut Buffers) {
    let Ok(t) = parse_tick_payload(symbol, payload, scratch, buffers) else {
        return;
    };
    assert!(is_bus_symbol(symbol), "accepted for {symbol:?}");
    assert!(payload.len() <= MAX_INGEST_BYTES);
    for v in [t.bid, t.ask, t.last, t.qty] {
        assert!(v.is_finite(), "{t:?}");
    }
    let mut out = Vec::new();
    encode_tick_payload(symbol, &t, &mut out);
    let back = parse_tick_payload(symbol, &out, scratch, buffers);
    assert_eq!(
        back,
        Ok(t),
        "round trip of {:?} via {:?}",
        String::from_utf8_lossy(payload),
        String::from_utf8_lossy(&out)
    );
    let mut again = Vec::new();
    encode_tick_payload(symbol, &back.unwrap(), &mut again);
    assert_eq!(
        String::from_utf8_lossy(&out),
        String::from_utf8_lossy(&again),
        "canonical payload not stable"
    );
}

fuzz_target!(|data: &[u8]| {
    let Some((&[flags, subject_len, header_len], rest)) = data.split_first_chunk::<3>() else {
        return;
    };
    let (subject, rest) = rest.split_at(usize::from(subject_len).min(rest.len()));
    let (header, payload) = rest.split_at(usize::from(header_len).min(rest.len()));
    let mut subject = String::from_utf8_lossy(subject).into_owned();
    if flags & 1 != 0 {
        subject.insert_str(0, "tickgate.in.");
    }
    let header = String::from_utf8_lossy(header);

    let mut scratch = Vec::with_capacity(MAX_INGEST_BYTES);
    let mut buffers = Buffers::new(MAX_INGEST_BYTES);

    // A raw tick from a feed handler (rt::bus::ingest: no prefix match gives "").
    let subjects = Subjects::new("tickgate");
    let symbol = subjects.ingest_symbol(&subject);
    if let Some(s) = symbol {
        assert_eq!(format!("tickgate.in.{s}"), subject);
    } else {
        assert!(!subject.starts_with("tickgate.in."));
    }
    tick(symbol.unwrap_or_default(), payload, &mut scratch, &mut buffers);
    // The same payload for a valid symbol (rt::bus::deliver and the snapshot read use
    // the symbol the node subscribed for).
    tick(FIXED_SYMBOL, payload, &mut scratch, &mut buffers);
    if let Some(s) = subjects.ordered_symbol(&subject) {
        tick(s, payload, &mut scratch, &mut buffers);
    }

    // An ordered tick's Tg-Seq header.
    let digits = !header.is_empty() && header.len() <= 20 && header.bytes().all(|b| b.is_ascii_digit());
    match parse_seq(Some(&header)) {
        Ok(n) => {
            assert!(digits && n >= 1, "{header:?} -> {n}");
            assert_eq!(header.parse::<u64>(), Ok(n));
        }
        Err(_) => assert!(!digits || !matches!(header.parse::<u64>(), Ok(1..))),
    }
    assert!(parse_seq(None).is_err());

    // An ordered message: the header's seq (or 1) and one tick or a batch. Flag bit 1
    // makes a batch of the payload repeated 1-64 times (bits 2-7), so batches of valid
    // ticks are reached without the fuzzer having to find the separator first.
    let first = parse_seq(Some(&header)).unwrap_or(1);
    let batch: Vec<u8>;
    let payload = if flags & 2 != 0 {
        let k = usize::from(flags >> 2) + 1;
        batch = vec![payload; k].join(&b'\n');
        &batch[..]
    } else {
        payload
    };
    let last = ordered_last_seq(first, payload);
    let mut got = Vec::new();
    match parse_ordered_payload(FIXED_SYMBOL, first, payload, &mut scratch, &mut buffers, &mut got) {
        Ok(n) => {
            assert!(n == got.len() && (1..=MAX_BATCH).contains(&n));
            assert_eq!(last, got.last().map(|&(seq, _)| seq), "the head from the parts alone");
            let parts: Vec<&[u8]> = payload.split(|&b| b == b'\n').collect();
            assert_eq!(parts.len(), n);
            let (mut again, mut enc) = (Vec::new(), Vec::new());
            for (k, ((seq, t), part)) in got.iter().zip(&parts).enumerate() {
                assert_eq!(*seq, first + k as u64);
                assert_eq!(parse_tick_payload(FIXED_SYMBOL, part, &mut scratch, &mut buffers), Ok(*t));
                encode_batch_tick(FIXED_SYMBOL, t, &mut again, &mut enc);
            }
            let mut back = Vec::new();
            let r = parse_ordered_payload(FIXED_SYMBOL, first, &again, &mut scratch, &mut buffers, &mut back);
            assert_eq!((r, back), (Ok(n), got));
        }
        Err(_) => assert!(got.is_empty(), "a refused message leaves nothing"),
    }

    // A revocation with its Tg-Revoked-At header (and without one).
    assert!(parse_revocation(payload, None).is_err());
    if let Ok((t, at)) = parse_revocation(payload, Some(&header)) {
        let enc = encode_revocation(&t);
        let at_s = at.to_string();
        assert_eq!(
            parse_revocation(&enc, Some(&at_s)),
            Ok((t, at)),
            "revocation round trip via {:?}",
            String::from_utf8_lossy(&enc)
        );
    }
});
