//! The request parser fed the way a connection loop feeds it: bytes arrive in chunks, each
//! chunk is appended to one growing buffer and `try_parse` is called again, until the first
//! `Ok(Some)` or `Err`. The first input bytes pick the limits and the chunk sizes.
//!
//! Checks the contract in `try_parse`'s doc comment:
//! - splitting never changes the answer: the outcome equals parsing the concatenated prefix
//!   at once, and equals parsing all the bytes at once (a final answer is final: more bytes
//!   after it neither turn an error into something else nor change a complete request);
//! - `Ok(Some((consumed, _)))` used exactly the first `consumed` bytes: those bytes alone give
//!   the same answer and one byte fewer is still incomplete;
//! - the head limit applies to incomplete input: `Ok(None)` never happens once the buffer
//!   holds `max_head_bytes + max_body_bytes` bytes, and past `max_head_bytes` it only means
//!   "the head is complete, waiting for the body" (so a body's worth of bytes completes it);
//! - every error is a 400 and its response serialises.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tickgate::proto::http::{HttpError, Request, RequestLimits, try_parse};

type Outcome = Result<Option<(usize, Request)>, HttpError>;

/// Bytes at the front of the input that configure the run (limits selector and parameters).
const CONFIG_BYTES: usize = 4;
/// At most this many chunk sizes; they are used in turn, cyclically.
const MAX_SPLITS: usize = 16;

fn limits(cfg: [u8; CONFIG_BYTES]) -> RequestLimits {
    match cfg[0] % 3 {
        0 => RequestLimits::default(),
        // The small limits the other HTTP target uses.
        1 => RequestLimits {
            max_head_bytes: 128,
            max_headers: 3,
            max_body_bytes: 8,
        },
        // Small limits chosen by the input, including the zero edge cases.
        _ => RequestLimits {
            max_head_bytes: usize::from(cfg[1]),
            max_headers: usize::from(cfg[2] % 8),
            max_body_bytes: usize::from(cfg[3] % 32),
        },
    }
}

/// A chunk size byte: 1..=128 for short reads, multiples of 64 up to 8192 for long ones.
fn chunk_len(b: u8) -> usize {
    if b < 128 {
        usize::from(b) + 1
    } else {
        usize::from(b - 127) * 64
    }
}

/// Feeds `data` in chunks of the given sizes (cyclically; all at once if there are none),
/// calling `try_parse` after every chunk. Returns the outcome and the bytes buffered then.
fn feed(data: &[u8], sizes: &[usize], limits: &RequestLimits) -> (Outcome, usize) {
    let mut buf: Vec<u8> = Vec::new();
    let mut rest = data;
    let mut i = 0;
    loop {
        let n = match sizes.get(i % sizes.len().max(1)) {
            Some(&n) => n.min(rest.len()),
            None => rest.len(),
        };
        i += 1;
        let (chunk, tail) = rest.split_at(n);
        buf.extend_from_slice(chunk);
        rest = tail;
        let out = try_parse(&buf, limits);
        match &out {
            Ok(None) => {
                // (b): an incomplete answer is bounded by the limits.
                assert!(
                    buf.len() < limits.max_head_bytes + limits.max_body_bytes,
                    "Ok(None) with {} bytes buffered, limits {limits:?}",
                    buf.len()
                );
                if rest.is_empty() {
                    return (out, buf.len());
                }
            }
            Ok(Some(_)) | Err(_) => return (out, buf.len()),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((cfg, data)) = data.split_first_chunk::<CONFIG_BYTES>() else {
        return;
    };
    let limits = limits(*cfg);
    let Some((&count, data)) = data.split_first() else {
        return;
    };
    let count = usize::from(count) % (MAX_SPLITS + 1);
    let (split_bytes, data) = data.split_at(count.min(data.len()));
    let sizes: Vec<usize> = split_bytes.iter().map(|&b| chunk_len(b)).collect();

    let (split, buffered) = feed(data, &sizes, &limits);

    // (a) The answer is the one for the concatenated prefix parsed at once...
    assert_eq!(
        split,
        try_parse(&data[..buffered], &limits),
        "prefix of {buffered} bytes"
    );
    // ...and, since a final answer is final, the one for all the bytes at once (which no
    // split can influence).
    let whole = try_parse(data, &limits);
    assert_eq!(split, whole, "split {sizes:?} after {buffered} bytes vs whole");

    match split {
        Ok(Some((consumed, req))) => {
            assert!(consumed <= buffered);
            assert!(req.body.len() <= limits.max_body_bytes);
            assert!(consumed <= limits.max_head_bytes + limits.max_body_bytes);
            // The request is exactly the first `consumed` bytes: nothing earlier completes it.
            assert_eq!(try_parse(&data[..consumed], &limits), Ok(Some((consumed, req))));
            if consumed > 0 {
                assert_eq!(try_parse(&data[..consumed - 1], &limits), Ok(None));
            }
        }
        Ok(None) => {
            assert_eq!(buffered, data.len());
            // Past max_head_bytes an incomplete answer can only be a complete head waiting for
            // its body, and a body is at most max_body_bytes: adding that many bytes must give
            // a final answer.
            if buffered >= limits.max_head_bytes {
                let mut more = data.to_vec();
                more.resize(buffered + limits.max_body_bytes, b'x');
                assert!(
                    matches!(try_parse(&more, &limits), Ok(Some(_))),
                    "incomplete head accepted past max_head_bytes ({buffered} bytes, {limits:?})"
                );
            }
        }
        Err(e) => {
            // (c)
            assert_eq!(e.status(), 400);
            assert_eq!(e.response().status, 400);
            let _ = e.response().to_bytes();
        }
    }
});
