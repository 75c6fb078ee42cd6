//! Client-to-server payload masking (RFC 6455 section 5.3).
//!
//! Every byte a client sends is XORed with a 4-byte key: byte `i` of the payload with
//! `mask[i % 4]`. Masking is the hottest loop of the decoder, so [`apply_mask`] works eight
//! bytes at a time on `u64` words (the compiler vectorises it further); [`apply_mask_simple`]
//! is the obvious byte loop that the fast path is tested against.
//!
//! Both take `offset`, the position of `buf[0]` within the frame payload, because the decoder
//! unmasks a frame piece by piece as it arrives and must keep the key phase across calls.

/// Unmasks (or masks: XOR is its own inverse) `buf` in place, eight bytes at a time.
///
/// `offset` is the position of `buf[0]` within the payload, so a payload can be processed in
/// pieces: `apply_mask(&mut p[..k], m, 0)` then `apply_mask(&mut p[k..], m, k)` equals one call.
pub fn apply_mask(buf: &mut [u8], mask: [u8; 4], offset: usize) {
    // Rotating the key once lets every word below start at key phase 0.
    let rotated = rotate_key(mask, offset);
    let word = u64::from_ne_bytes([
        rotated[0], rotated[1], rotated[2], rotated[3], rotated[0], rotated[1], rotated[2], rotated[3],
    ]);
    let (words, tail) = buf.as_chunks_mut::<8>();
    for chunk in words {
        *chunk = (u64::from_ne_bytes(*chunk) ^ word).to_ne_bytes();
    }
    // The tail starts at a multiple of 8 bytes, i.e. at key phase 0 again.
    for (b, k) in tail.iter_mut().zip(rotated.iter().cycle()) {
        *b ^= k;
    }
}

/// [`apply_mask`] that also reports whether every unmasked byte is ASCII.
///
/// Most inbound text is ASCII JSON; OR-ing the words while they are in registers anyway lets
/// the decoder skip a second pass for UTF-8 validation in that case.
pub fn apply_mask_ascii(buf: &mut [u8], mask: [u8; 4], offset: usize) -> bool {
    let rotated = rotate_key(mask, offset);
    let word = u64::from_ne_bytes([
        rotated[0], rotated[1], rotated[2], rotated[3], rotated[0], rotated[1], rotated[2], rotated[3],
    ]);
    let (words, tail) = buf.as_chunks_mut::<8>();
    let mut seen = 0u64;
    for chunk in words {
        let plain = u64::from_ne_bytes(*chunk) ^ word;
        seen |= plain;
        *chunk = plain.to_ne_bytes();
    }
    let mut seen_tail = 0u8;
    for (b, k) in tail.iter_mut().zip(rotated.iter().cycle()) {
        *b ^= k;
        seen_tail |= *b;
    }
    seen & 0x8080_8080_8080_8080 == 0 && seen_tail < 0x80
}

/// Byte-at-a-time reference implementation of [`apply_mask`].
pub fn apply_mask_simple(buf: &mut [u8], mask: [u8; 4], offset: usize) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b ^= mask[offset.wrapping_add(i) & 3];
    }
}

/// The key as seen from a payload position `offset`: `rotate_key(m, o)[j] == m[(o + j) % 4]`.
fn rotate_key(mask: [u8; 4], offset: usize) -> [u8; 4] {
    let r = offset & 3;
    [mask[r], mask[(r + 1) & 3], mask[(r + 2) & 3], mask[(r + 3) & 3]]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_vector_rfc_example() {
        // RFC 6455 5.7: a masked "Hello" with key 37 fa 21 3d.
        let mut data = [0x7f, 0x9f, 0x4d, 0x51, 0x58];
        apply_mask(&mut data, [0x37, 0xfa, 0x21, 0x3d], 0);
        assert_eq!(&data, b"Hello");
    }

    #[test]
    fn empty_and_short_buffers() {
        let mut empty: [u8; 0] = [];
        apply_mask(&mut empty, [1, 2, 3, 4], 7);
        for len in 0..20 {
            let mut a: Vec<u8> = (0..len as u8).collect();
            let mut b = a.clone();
            apply_mask(&mut a, [9, 8, 7, 6], 3);
            apply_mask_simple(&mut b, [9, 8, 7, 6], 3);
            assert_eq!(a, b, "len {len}");
        }
    }

    #[test]
    fn ascii_detection_every_position() {
        for len in 0..40 {
            for hot in 0..len {
                let mut plain = vec![b'a'; len];
                plain[hot] = 0x80;
                let mask = [0x11, 0x22, 0x33, 0x44];
                for offset in 0..4 {
                    let mut buf = plain.clone();
                    apply_mask_simple(&mut buf, mask, offset);
                    assert!(!apply_mask_ascii(&mut buf, mask, offset), "len {len} hot {hot}");
                    assert_eq!(buf, plain);
                }
            }
            let mut buf = vec![b'z'; len];
            assert!(apply_mask_ascii(&mut buf, [0; 4], 0));
        }
    }

    #[test]
    fn split_equals_whole() {
        let orig: Vec<u8> = (0..=255u8).collect();
        let mask = [0xde, 0xad, 0xbe, 0xef];
        let mut whole = orig.clone();
        apply_mask(&mut whole, mask, 0);
        for k in 0..orig.len() {
            let mut parts = orig.clone();
            let (a, b) = parts.split_at_mut(k);
            apply_mask(a, mask, 0);
            apply_mask(b, mask, k);
            assert_eq!(parts, whole, "split at {k}");
        }
    }

    proptest! {
        #[test]
        fn fast_matches_simple(
            data in proptest::collection::vec(any::<u8>(), 0..600),
            mask in any::<[u8; 4]>(),
            offset in any::<usize>(),
        ) {
            let mut fast = data.clone();
            let mut simple = data.clone();
            apply_mask(&mut fast, mask, offset);
            apply_mask_simple(&mut simple, mask, offset);
            prop_assert_eq!(&fast, &simple);
            let mut fused = data.clone();
            let ascii = apply_mask_ascii(&mut fused, mask, offset);
            prop_assert_eq!(&fused, &simple);
            prop_assert_eq!(ascii, simple.is_ascii());
            apply_mask(&mut fast, mask, offset);
            prop_assert_eq!(fast, data);
        }
    }
}
