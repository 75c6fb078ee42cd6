//! Interoperability with an independent implementation: the `jsonwebtoken` crate
//! (v10, RustCrypto backend). Tokens must cross in both directions, with keys produced
//! by our `keygen` and read back from the files it writes.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use tickgate::auth::jwt::{AuthError, Role, Verifier, VerifyPolicy};
use tickgate::auth::keys::KeySet;
use tickgate::auth::mint::{Claims, keygen, load_signing_key, sign_token, signing_key_to_pkcs8_der};

/// jsonwebtoken checks `exp` against the real clock, so these tests use it too.
fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

#[derive(Serialize, Deserialize, Debug)]
struct JtClaims {
    sub: String,
    exp: u64,
    iat: u64,
    iss: String,
    aud: Vec<String>,
    sid: String,
    roles: Vec<String>,
    symbols: Vec<String>,
}

fn policy() -> VerifyPolicy {
    VerifyPolicy {
        issuer: Some("https://auth.example.com".into()),
        audience: Some("tickgate".into()),
        ..VerifyPolicy::default()
    }
}

/// DER body of a PEM file (jsonwebtoken's PEM parser is behind a feature we do not enable).
fn pem_body(pem: &str) -> Vec<u8> {
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD.decode(b64).unwrap()
}

#[test]
fn jsonwebtoken_minted_token_verifies_with_ours() {
    let dir = tempfile::tempdir().unwrap();
    let paths = keygen(dir.path(), "k1").unwrap();
    let pem = std::fs::read_to_string(&paths[0]).unwrap();
    let der = pem_body(&pem);
    // Our PEM body is exactly the PKCS#8 DER we would produce from the parsed key.
    assert_eq!(
        der,
        signing_key_to_pkcs8_der(&load_signing_key(&paths[0]).unwrap())
    );

    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some("k1".into());
    let n = now();
    let claims = JtClaims {
        sub: "alice".into(),
        exp: n + 300,
        iat: n,
        iss: "https://auth.example.com".into(),
        aud: vec!["other".into(), "tickgate".into()],
        sid: "s-1".into(),
        roles: vec!["subscriber".into(), "publisher".into()],
        symbols: vec!["BTC-*".into()],
    };
    let token = jsonwebtoken::encode(&header, &claims, &EncodingKey::from_ed_der(&der)).unwrap();

    let keys = KeySet::load(&[], Some(&paths[2])).unwrap();
    let v = Verifier::new(keys, policy()).verify(&token, n).unwrap();
    assert_eq!(v.sub, "alice");
    assert_eq!(v.sid.as_deref(), Some("s-1"));
    assert_eq!(v.roles, vec![Role::Subscriber, Role::Publisher]);
    assert_eq!(v.symbols, vec!["BTC-*"]);
    assert_eq!(v.kid, "k1");

    // The SPKI file works the same as the JWKS.
    let keys = KeySet::load(&[("k1".into(), paths[1].clone())], None).unwrap();
    assert!(Verifier::new(keys, policy()).verify(&token, n).is_ok());

    // Without a kid our verifier refuses it (documented: kid is always required).
    let token = jsonwebtoken::encode(
        &Header::new(Algorithm::EdDSA),
        &claims,
        &EncodingKey::from_ed_der(&der),
    )
    .unwrap();
    let keys = KeySet::load(&[], Some(&paths[2])).unwrap();
    assert_eq!(
        Verifier::new(keys, policy()).verify(&token, n).unwrap_err(),
        AuthError::MissingKid
    );
}

#[test]
fn our_token_verifies_with_jsonwebtoken() {
    let dir = tempfile::tempdir().unwrap();
    let paths = keygen(dir.path(), "k7").unwrap();
    let sk = load_signing_key(&paths[0]).unwrap();
    let vk = sk.verifying_key();
    let n = now();
    let token = sign_token(
        &sk,
        "k7",
        &Claims {
            sub: "bob".into(),
            exp: n + 120,
            iat: Some(n),
            iss: Some("https://auth.example.com".into()),
            aud: Some("tickgate".into()),
            sid: Some("s-2".into()),
            roles: vec!["subscriber".into()],
            symbols: vec!["ETH-USD".into()],
            ..Claims::default()
        },
    );

    let mut validation = Validation::new(Algorithm::EdDSA);
    validation.set_audience(&["tickgate"]);
    validation.set_issuer(&["https://auth.example.com"]);

    #[derive(Deserialize)]
    struct Out {
        sub: String,
        sid: String,
        symbols: Vec<String>,
    }
    let from_der = DecodingKey::from_ed_der(vk.as_bytes());
    let data = jsonwebtoken::decode::<Out>(&token, &from_der, &validation).unwrap();
    assert_eq!(data.claims.sub, "bob");
    assert_eq!(data.claims.sid, "s-2");
    assert_eq!(data.claims.symbols, vec!["ETH-USD"]);
    assert_eq!(data.header.kid.as_deref(), Some("k7"));
    assert_eq!(data.header.alg, Algorithm::EdDSA);

    // Using the JWK's "x" from the jwks.json keygen wrote.
    let jwks: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&paths[2]).unwrap()).unwrap();
    let x = jwks["keys"][0]["x"].as_str().unwrap();
    let from_x = DecodingKey::from_ed_components(x).unwrap();
    let data = jsonwebtoken::decode::<Out>(&token, &from_x, &validation).unwrap();
    assert_eq!(data.claims.sub, "bob");

    // And a tampered signature fails there too.
    let mut bad = token.into_bytes();
    let i = bad.len() - 10;
    bad[i] = if bad[i] == b'A' { b'B' } else { b'A' };
    let bad = String::from_utf8(bad).unwrap();
    assert!(jsonwebtoken::decode::<Out>(&bad, &from_x, &validation).is_err());
}

#[test]
fn jsonwebtoken_hs256_keyed_with_our_public_key_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let paths = keygen(dir.path(), "k1").unwrap();
    let keys = KeySet::load(&[], Some(&paths[2])).unwrap();
    let vk = *keys.get("k1").unwrap();
    let n = now();
    let claims = JtClaims {
        sub: "mallory".into(),
        exp: n + 60,
        iat: n,
        iss: "https://auth.example.com".into(),
        aud: vec!["tickgate".into()],
        sid: "x".into(),
        roles: vec!["admin".into()],
        symbols: vec!["*".into()],
    };
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("k1".into());
    for secret in [
        vk.as_bytes().to_vec(),
        std::fs::read(&paths[1]).unwrap(),
        std::fs::read(&paths[2]).unwrap(),
    ] {
        let token = jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(&secret)).unwrap();
        assert_eq!(
            Verifier::new(keys.clone(), policy())
                .verify(&token, n)
                .unwrap_err(),
            AuthError::BadAlg
        );
    }
}
