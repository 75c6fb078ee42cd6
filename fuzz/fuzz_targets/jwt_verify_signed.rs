//! Structured variant: the fuzzer picks the header and payload bytes and `now`, and we
//! sign them with a configured key, so the header checks and the claims parser/checker
//! behind the signature are reached. Nothing may panic, and whatever verifies must
//! satisfy the policy's invariants.
#![no_main]

use ed25519_dalek::SigningKey;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use tickgate::auth::jwt::{Verifier, VerifyPolicy};
use tickgate::auth::keys::KeySet;
use tickgate::auth::mint::sign_jws;

fn setup() -> &'static (Verifier, SigningKey) {
    static V: OnceLock<(Verifier, SigningKey)> = OnceLock::new();
    V.get_or_init(|| {
        let sk = SigningKey::from_bytes(&[1; 32]);
        let mut keys = KeySet::new();
        keys.insert("k1", sk.verifying_key()).unwrap();
        let policy = VerifyPolicy {
            audience: Some("tickgate".into()),
            ..VerifyPolicy::default()
        };
        (Verifier::new(keys, policy), sk)
    })
}

fuzz_target!(|data: &[u8]| {
    let (v, sk) = setup();
    if data.len() < 9 {
        return;
    }
    let (now, rest) = data.split_at(8);
    let now = u64::from_le_bytes(now.try_into().unwrap());
    // First byte picks the header: mostly the valid one, so the payload path is hot.
    let (sel, body) = rest.split_at(1);
    let (header, payload): (&[u8], &[u8]) = if sel[0] < 200 {
        (br#"{"alg":"EdDSA","kid":"k1","typ":"JWT"}"#, body)
    } else {
        let cut = (sel[0] as usize) % (body.len() + 1);
        body.split_at(cut)
    };
    let token = sign_jws(sk, header, payload);
    if let Ok(c) = v.verify(&token, now) {
        let p = v.policy();
        assert!(!c.sub.is_empty() && c.sub.len() <= 256);
        assert!(c.exp.saturating_add(p.leeway_secs) > now);
        let lifetime = match c.iat {
            Some(iat) => c.exp - iat,
            None => c.exp.saturating_sub(now),
        };
        assert!(lifetime <= p.max_lifetime_secs);
        assert!(c.symbols.len() <= 1024 && c.symbols.iter().all(|s| s.len() <= 64));
        assert_eq!(c.kid, "k1");
    }
});
