//! Full token verification (size/parts/header/alg/kid, strict Ed25519, claims)
//! of a realistic token. Target: >= 30,000 verifications/s per core.

use criterion::{Criterion, Throughput, black_box, criterion_group, criterion_main};
use ed25519_dalek::SigningKey;
use tickgate::auth::jwt::{Verifier, VerifyPolicy, verify_jws_signature};
use tickgate::auth::keys::KeySet;
use tickgate::auth::mint::{Claims, sign_token};

const NOW: u64 = 1_700_000_000;

fn setup() -> (Verifier, String) {
    let sk = SigningKey::from_bytes(&[42; 32]);
    let mut keys = KeySet::new();
    keys.insert("k1", sk.verifying_key()).unwrap();
    keys.insert("k2", SigningKey::from_bytes(&[43; 32]).verifying_key())
        .unwrap();
    let token = sign_token(
        &sk,
        "k1",
        &Claims {
            sub: "alice@example.com".into(),
            exp: NOW + 300,
            iat: Some(NOW),
            sid: Some("s-8f2c1a9e".into()),
            roles: vec!["subscriber".into(), "publisher".into()],
            symbols: vec!["BTC-USD".into(), "ETH-USD".into(), "SOL-*".into()],
            ..Claims::default()
        },
    );
    (Verifier::new(keys, VerifyPolicy::default()), token)
}

fn bench(c: &mut Criterion) {
    let (v, token) = setup();
    assert!(v.verify(&token, NOW).is_ok());
    let mut g = c.benchmark_group("auth");
    g.throughput(Throughput::Elements(1));
    g.bench_function("verify_full", |b| {
        b.iter(|| v.verify(black_box(&token), black_box(NOW)))
    });
    // The signature alone, to show where the time goes.
    let (input, sig) = token.rsplit_once('.').unwrap();
    let key = v.keys().prepared("k1").unwrap().clone();
    g.bench_function("signature_only", |b| {
        b.iter(|| verify_jws_signature(&key, black_box(input.as_bytes()), black_box(sig)))
    });
    // The same check through ed25519-dalek's `verify_strict` (what `signature_only` is
    // differentially tested against), to keep the hand-composed path honest.
    let vk = *v.keys().get("k1").unwrap();
    let raw: [u8; 64] = {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(sig)
            .unwrap()
            .try_into()
            .unwrap()
    };
    let dsig = ed25519_dalek::Signature::from_bytes(&raw);
    g.bench_function("dalek_verify_strict", |b| {
        b.iter(|| vk.verify_strict(black_box(input.as_bytes()), black_box(&dsig)))
    });
    // Rejections before the signature must be cheap (they are the DoS surface).
    let malformed = token.replace('.', "X.");
    g.bench_function("reject_malformed", |b| {
        b.iter(|| v.verify(black_box(&malformed), black_box(NOW)))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
