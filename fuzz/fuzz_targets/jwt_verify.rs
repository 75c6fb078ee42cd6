//! Arbitrary bytes as a token against a fixed key set: nothing may panic, and nothing
//! unsigned may ever verify.
#![no_main]

use ed25519_dalek::SigningKey;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use tickgate::auth::jwt::{Verifier, VerifyPolicy};
use tickgate::auth::keys::KeySet;

fn verifier() -> &'static Verifier {
    static V: OnceLock<Verifier> = OnceLock::new();
    V.get_or_init(|| {
        let mut keys = KeySet::new();
        keys.insert("k1", SigningKey::from_bytes(&[1; 32]).verifying_key())
            .unwrap();
        keys.insert("k2", SigningKey::from_bytes(&[2; 32]).verifying_key())
            .unwrap();
        Verifier::new(keys, VerifyPolicy::default())
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        // Forging an Ed25519 signature by fuzzing is not a thing; an Ok here is a bug.
        assert!(verifier().verify(s, 1_700_000_000).is_err());
    }
});
