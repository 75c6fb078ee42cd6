//! Incremental, fail-fast UTF-8 validation.
//!
//! A text message may arrive in many fragments, and each fragment in many reads; a code point
//! can be cut anywhere. RFC 6455 section 8.1 lets (and Autobahn expects) an endpoint to fail a
//! connection as soon as the bytes seen so far can no longer be the start of valid UTF-8,
//! rather than buffering a whole message first. [`Utf8Validator`] therefore validates each
//! chunk as it is fed and keeps only the (at most 3) bytes of a code point cut at the end of
//! the chunk.
//!
//! The heavy lifting is `std::str::from_utf8`: its `Utf8Error::error_len()` distinguishes a
//! sequence that is already invalid (`Some`) from one merely cut short by the end of input
//! (`None`), and std rejects overlong forms, surrogates and values above U+10FFFF at the
//! earliest byte that betrays them, which is exactly the fail-fast rule we want.

use thiserror::Error;

/// The bytes fed so far cannot be (the start of) valid UTF-8.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
#[error("invalid UTF-8")]
pub struct InvalidUtf8;

/// Validates a byte stream that arrives in chunks. Feed every chunk in order, then call
/// [`finish`](Self::finish) at the end of the message.
#[derive(Clone, Debug, Default)]
pub struct Utf8Validator {
    /// Leading bytes of a code point cut by the end of the previous chunk.
    pending: [u8; 4],
    pending_len: u8,
    failed: bool,
}

impl Utf8Validator {
    pub fn new() -> Self {
        Self::default()
    }

    /// Validates the next chunk. Fails as soon as the input so far cannot become valid UTF-8;
    /// after a failure every call fails until [`reset`](Self::reset).
    pub fn feed(&mut self, chunk: &[u8]) -> Result<(), InvalidUtf8> {
        if self.failed {
            return Err(InvalidUtf8);
        }
        let result = self.feed_inner(chunk);
        if result.is_err() {
            self.failed = true;
        }
        result
    }

    /// Ends the stream: fails if it stopped inside a code point. Resets the validator so the
    /// next message starts clean.
    pub fn finish(&mut self) -> Result<(), InvalidUtf8> {
        let ok = !self.failed && self.pending_len == 0;
        self.reset();
        if ok { Ok(()) } else { Err(InvalidUtf8) }
    }

    pub fn reset(&mut self) {
        self.pending_len = 0;
        self.failed = false;
    }

    /// Whether the stream currently ends inside a code point.
    pub fn is_incomplete(&self) -> bool {
        self.pending_len != 0
    }

    fn feed_inner(&mut self, mut chunk: &[u8]) -> Result<(), InvalidUtf8> {
        if self.pending_len != 0 {
            chunk = self.complete_pending(chunk)?;
            if self.pending_len != 0 {
                // The whole chunk went into the still-unfinished code point.
                return Ok(());
            }
        }
        match std::str::from_utf8(chunk) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_some() => Err(InvalidUtf8),
            Err(e) => {
                // Cut short: std guarantees the tail is a valid prefix of 1..=3 bytes.
                let tail = chunk.get(e.valid_up_to()..).unwrap_or_default();
                self.store_pending(tail)
            }
        }
    }

    /// Tops up the pending code point from `chunk` and returns the unconsumed rest.
    fn complete_pending<'a>(&mut self, chunk: &'a [u8]) -> Result<&'a [u8], InvalidUtf8> {
        let have = usize::from(self.pending_len);
        let width = sequence_width(self.pending[0]).ok_or(InvalidUtf8)?;
        let take = width.saturating_sub(have).min(chunk.len());
        let (head, rest) = chunk.split_at(take);
        let mut seq = self.pending;
        let joined = seq.get_mut(have..have + take).ok_or(InvalidUtf8)?;
        joined.copy_from_slice(head);
        let candidate = seq.get(..have + take).ok_or(InvalidUtf8)?;
        match std::str::from_utf8(candidate) {
            Ok(_) => {
                self.pending_len = 0;
                Ok(rest)
            }
            Err(e) if e.error_len().is_some() => Err(InvalidUtf8),
            Err(_) => {
                self.store_pending(candidate)?;
                Ok(rest)
            }
        }
    }

    fn store_pending(&mut self, tail: &[u8]) -> Result<(), InvalidUtf8> {
        // A cut code point has at most 3 bytes; anything longer would be a logic error.
        if tail.len() > 3 {
            return Err(InvalidUtf8);
        }
        let slot = self.pending.get_mut(..tail.len()).ok_or(InvalidUtf8)?;
        slot.copy_from_slice(tail);
        self.pending_len = tail.len() as u8;
        Ok(())
    }
}

/// Length of the sequence a leading byte announces, or `None` for a byte that cannot lead.
fn sequence_width(lead: u8) -> Option<usize> {
    match lead {
        0x00..=0x7f => Some(1),
        0xc2..=0xdf => Some(2),
        0xe0..=0xef => Some(3),
        0xf0..=0xf4 => Some(4),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn validate_split(bytes: &[u8], splits: &[usize]) -> Result<(), InvalidUtf8> {
        let mut v = Utf8Validator::new();
        let mut start = 0;
        for &s in splits {
            v.feed(&bytes[start..s])?;
            start = s;
        }
        v.feed(&bytes[start..])?;
        v.finish()
    }

    #[test]
    fn every_single_split_of_valid_text() {
        for s in [
            "κόσμε",
            "a😀b",
            "😀😀",
            "€",
            "plain ascii",
            "",
            "\u{10ffff}\u{7ff}\u{800}",
        ] {
            let b = s.as_bytes();
            for i in 0..=b.len() {
                assert_eq!(validate_split(b, &[i]), Ok(()), "{s:?} at {i}");
                for j in i..=b.len() {
                    assert_eq!(validate_split(b, &[i, j]), Ok(()), "{s:?} at {i},{j}");
                }
            }
        }
    }

    #[test]
    fn byte_by_byte() {
        let b = "κόσμε 😀 €".as_bytes();
        let mut v = Utf8Validator::new();
        for x in b {
            v.feed(std::slice::from_ref(x)).unwrap();
        }
        v.finish().unwrap();
    }

    #[test]
    fn fails_fast_on_first_bad_byte() {
        let mut v = Utf8Validator::new();
        v.feed(b"ok").unwrap();
        v.feed(&[0xe0]).unwrap(); // could still be U+0800..
        assert_eq!(v.feed(&[0x80]), Err(InvalidUtf8)); // overlong: E0 needs A0..BF
        assert_eq!(v.feed(b"a"), Err(InvalidUtf8), "stays failed");
        v.reset();
        v.feed(b"fine").unwrap();
        v.finish().unwrap();
    }

    #[test]
    fn invalid_sequences_rejected_without_more_input() {
        // Each of these is invalid as soon as the shown bytes are seen, even with more to come.
        let cases: &[&[u8]] = &[
            &[0xff],
            &[0xc0],             // overlong lead
            &[0xc1],             // overlong lead
            &[0x80],             // lone continuation
            &[0xed, 0xa0],       // surrogate U+D800
            &[0xf4, 0x90],       // above U+10FFFF
            &[0xf5],             // lead beyond range
            &[0xf0, 0x80],       // overlong 4-byte
            &[0xce, 0xba, 0xe1], // fine so far ...
        ];
        for (i, c) in cases.iter().enumerate() {
            let mut v = Utf8Validator::new();
            let r = v.feed(c);
            if i == cases.len() - 1 {
                assert_eq!(r, Ok(()));
                assert_eq!(v.feed(&[0x41]), Err(InvalidUtf8)); // ... until a non-continuation
            } else {
                assert_eq!(r, Err(InvalidUtf8), "case {c:x?}");
            }
        }
    }

    #[test]
    fn incomplete_at_end_fails_on_finish() {
        let mut v = Utf8Validator::new();
        v.feed(&[0xf0, 0x9f, 0x98]).unwrap();
        assert!(v.is_incomplete());
        assert_eq!(v.finish(), Err(InvalidUtf8));
        // finish resets
        v.feed(b"x").unwrap();
        v.finish().unwrap();
    }

    #[test]
    fn pending_across_empty_chunks() {
        let mut v = Utf8Validator::new();
        v.feed(&[0xe2]).unwrap();
        v.feed(&[]).unwrap();
        v.feed(&[0x82]).unwrap();
        v.feed(&[]).unwrap();
        v.feed(&[0xac, b'x']).unwrap();
        v.finish().unwrap();
    }

    proptest! {
        #[test]
        fn agrees_with_std(bytes in proptest::collection::vec(any::<u8>(), 0..64),
                           mut cuts in proptest::collection::vec(0usize..64, 0..6)) {
            cuts.iter_mut().for_each(|c| *c %= bytes.len() + 1);
            cuts.sort_unstable();
            let expected = std::str::from_utf8(&bytes).is_ok();
            prop_assert_eq!(validate_split(&bytes, &cuts).is_ok(), expected);
        }

        #[test]
        fn valid_strings_any_split(s in "\\PC{0,40}", mut cuts in proptest::collection::vec(any::<usize>(), 0..6)) {
            let b = s.as_bytes();
            cuts.iter_mut().for_each(|c| *c %= b.len() + 1);
            cuts.sort_unstable();
            prop_assert_eq!(validate_split(b, &cuts), Ok(()));
        }

        #[test]
        fn fails_at_the_same_prefix_as_std(bytes in proptest::collection::vec(any::<u8>(), 1..40)) {
            // Feeding byte by byte must fail exactly at the first byte after which no
            // continuation could make the prefix valid.
            let mut v = Utf8Validator::new();
            let failed_at = bytes.iter().position(|b| v.feed(std::slice::from_ref(b)).is_err());
            let viable = |b: &[u8]| match std::str::from_utf8(b) {
                Ok(_) => true,
                Err(e) => e.error_len().is_none(),
            };
            match failed_at {
                None => prop_assert!(viable(&bytes)),
                Some(i) => {
                    prop_assert!(viable(&bytes[..i]));
                    prop_assert!(!viable(&bytes[..=i]));
                }
            }
        }
    }
}
