//! Minting tokens and key material: `tickgate token`, `tickgate keygen`, the embedded
//! demo, tests and the load generator.
//!
//! # Design
//!
//! Real deployments mint tokens in their own auth service; this module exists so the
//! gateway is usable and testable alone. It produces exactly what [`super::jwt`]
//! accepts: compact JWS, header `{"alg":"EdDSA","kid":..,"typ":"JWT"}`, strict
//! base64url without padding. Ed25519 signing is deterministic (RFC 8032), so the same
//! key, header and payload always give the same token (checked against RFC 8037 A.4).
//!
//! Key encodings are written by hand from fixed DER prefixes (RFC 8410): an Ed25519
//! PKCS#8 v1 private key and SPKI public key are a constant prefix plus 32 bytes, so
//! encoding cannot fail and needs no ASN.1 writer. Parsing, where input is untrusted,
//! goes through `ed25519-dalek`'s `pkcs8`/`spki` decoders instead. Tests check both
//! directions against those decoders and against `jsonwebtoken`.
//!
//! [`keygen`] writes the private key with mode 0600 from the moment it exists (the file
//! is created with that mode, then atomically renamed into place), so it is never
//! readable by others, not even between `open` and `chmod`. All files are written to a
//! temporary name and renamed, so a crash never leaves a half-written key or JWKS.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use ed25519_dalek::pkcs8::DecodePrivateKey;
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::Serialize;

use super::b64::B64;
use super::keys::{KeyError, MAX_JWKS_BYTES, check_kid, read_bounded};

/// RFC 8410 PKCS#8 v1 `PrivateKeyInfo` for Ed25519, up to the 32-byte seed.
const PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];
/// RFC 8410 `SubjectPublicKeyInfo` for Ed25519, up to the 32-byte public key.
const SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Claims to put in a token. `None` and empty vectors are left out of the JSON.
#[derive(Serialize, Default, Clone, Debug)]
pub struct Claims {
    /// User.
    pub sub: String,
    /// Expiry, Unix seconds.
    pub exp: u64,
    /// Issued-at, Unix seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// Not-before, Unix seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Token id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    /// Session id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sid: Option<String>,
    /// Device id binding.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub did: Option<String>,
    /// Client IP binding.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cip: Option<String>,
    /// Role names.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
    /// Entitlement patterns.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub symbols: Vec<String>,
    /// Issuer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// Audience.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
}

/// The `kid` of the embedded demo's in-memory key.
pub const DEMO_KID: &str = "demo";

/// How long the embedded demo's tokens live (the banner's and the demo page's), seconds.
pub const DEMO_TOKEN_TTL_SECS: u64 = 600;

/// Whom an embedded-demo token is for (see [`demo_claims`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DemoHolder {
    /// The start banner's token, to try with a client: `sub` `demo`, `sid` `demo-1`,
    /// subscriber and publisher.
    Banner,
    /// The demo page's (`POST /v1/demo-token`, minted for anyone who can reach the demo):
    /// `sub` `demo`, `sid` `demo-page`, subscriber only, so a page cannot publish.
    Page,
}

/// The claims of an embedded-demo token issued at `now` (Unix seconds): all symbols,
/// valid [`DEMO_TOKEN_TTL_SECS`]. Every demo token of one holder has the same `sub` and
/// `sid`, so a fresh one is a valid `reauth` for a connection opened with an older one.
pub fn demo_claims(holder: DemoHolder, now: u64) -> Claims {
    let (sid, roles): (&str, &[&str]) = match holder {
        DemoHolder::Banner => ("demo-1", &["subscriber", "publisher"]),
        DemoHolder::Page => ("demo-page", &["subscriber"]),
    };
    Claims {
        sub: "demo".into(),
        exp: now.saturating_add(DEMO_TOKEN_TTL_SECS),
        iat: Some(now),
        sid: Some(sid.into()),
        roles: roles.iter().map(|r| (*r).to_owned()).collect(),
        symbols: vec!["*".into()],
        ..Claims::default()
    }
}

/// An embedded-demo token ([`demo_claims`]) signed with the demo's key under [`DEMO_KID`].
pub fn demo_token(key: &SigningKey, holder: DemoHolder, now: u64) -> String {
    sign_token(key, DEMO_KID, &demo_claims(holder, now))
}

/// Signs `claims` as a compact JWS with header `{"alg":"EdDSA","kid":kid,"typ":"JWT"}`.
pub fn sign_token(key: &SigningKey, kid: &str, claims: &Claims) -> String {
    let header = serde_json::json!({ "alg": "EdDSA", "kid": kid, "typ": "JWT" }).to_string();
    // Serialising a struct of strings, integers and string vectors into JSON has no
    // failure case (no maps with non-string keys, no custom Serialize impls).
    let payload = serde_json::to_vec(claims).expect("Claims always serialise to JSON");
    sign_jws(key, header.as_bytes(), &payload)
}

/// Raw compact JWS over arbitrary header and payload bytes: no checks at all. For tests,
/// RFC vectors and the fuzzer; use [`sign_token`] for real tokens.
pub fn sign_jws(key: &SigningKey, header: &[u8], payload: &[u8]) -> String {
    let mut out = B64.encode(header);
    out.push('.');
    B64.encode_string(payload, &mut out);
    let sig = key.sign(out.as_bytes());
    out.push('.');
    B64.encode_string(sig.to_bytes(), &mut out);
    out
}

/// A new key from 32 bytes of `ring::rand::SystemRandom`.
pub fn generate_signing_key() -> Result<SigningKey, ring::error::Unspecified> {
    use ring::rand::SecureRandom;
    let mut seed = [0u8; 32];
    ring::rand::SystemRandom::new().fill(&mut seed)?;
    Ok(SigningKey::from_bytes(&seed))
}

/// PKCS#8 v1 DER of an Ed25519 private key (what `jsonwebtoken`'s `EncodingKey::from_ed_der` takes).
pub fn signing_key_to_pkcs8_der(k: &SigningKey) -> Vec<u8> {
    let mut der = PKCS8_PREFIX.to_vec();
    der.extend_from_slice(k.as_bytes());
    der
}

/// SPKI DER of an Ed25519 public key.
pub fn verifying_key_to_spki_der(k: &VerifyingKey) -> Vec<u8> {
    let mut der = SPKI_PREFIX.to_vec();
    der.extend_from_slice(k.as_bytes());
    der
}

/// `-----BEGIN PRIVATE KEY-----` PEM (PKCS#8 v1).
pub fn signing_key_to_pkcs8_pem(k: &SigningKey) -> String {
    pem("PRIVATE KEY", &signing_key_to_pkcs8_der(k))
}

/// Parses a `-----BEGIN PRIVATE KEY-----` PKCS#8 PEM (v1 or v2) holding an Ed25519 key.
pub fn signing_key_from_pkcs8_pem(pem: &str) -> Result<SigningKey, KeyError> {
    if pem.len() > 16 * 1024 {
        return Err(KeyError::Pem {
            what: "PKCS#8 private key",
            reason: "larger than 16384 bytes".into(),
        });
    }
    SigningKey::from_pkcs8_pem(pem.trim()).map_err(|e| KeyError::Pem {
        what: "PKCS#8 private key",
        reason: e.to_string(),
    })
}

/// Reads a PKCS#8 PEM private key file (for `tickgate token --key`).
pub fn load_signing_key(path: &Path) -> Result<SigningKey, KeyError> {
    let text = read_bounded(path, 16 * 1024)?;
    signing_key_from_pkcs8_pem(&text).map_err(|e| KeyError::InFile {
        path: path.to_path_buf(),
        source: Box::new(e),
    })
}

/// `-----BEGIN PUBLIC KEY-----` PEM (SPKI).
pub fn verifying_key_to_spki_pem(k: &VerifyingKey) -> String {
    pem("PUBLIC KEY", &verifying_key_to_spki_der(k))
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    // RFC 7468: 64-character lines. base64 output is ASCII, so byte chunks are chars.
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn jwk_value(kid: &str, key: &VerifyingKey) -> serde_json::Value {
    serde_json::json!({
        "kty": "OKP",
        "crv": "Ed25519",
        "kid": kid,
        "x": B64.encode(key.as_bytes()),
        "alg": "EdDSA",
        "use": "sig",
    })
}

/// `{"keys":[{"kty":"OKP","crv":"Ed25519","kid":..,"x":..,"alg":"EdDSA","use":"sig"}]}`.
pub fn jwks_json(keys: &[(String, VerifyingKey)]) -> String {
    let keys: Vec<_> = keys.iter().map(|(kid, k)| jwk_value(kid, k)).collect();
    serde_json::json!({ "keys": keys }).to_string()
}

/// `tickgate keygen`: creates `dir` (and parents), writes `dir/KID.key` (PKCS#8 PEM,
/// mode 0600 from creation), `dir/KID.pub` (SPKI PEM) and `dir/jwks.json` (an existing
/// one keeps its other keys; a key with this kid is replaced). Returns the three paths.
pub fn keygen(dir: &Path, kid: &str) -> Result<Vec<PathBuf>, KeyError> {
    // The kid becomes a file name: the kid rule keeps out separators and hidden names.
    check_kid(kid)?;
    std::fs::create_dir_all(dir).map_err(|source| KeyError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let sk = generate_signing_key().map_err(|_| KeyError::Rng)?;
    let vk = sk.verifying_key();

    let jwks_path = dir.join("jwks.json");
    let jwks = merged_jwks(&jwks_path, kid, &vk)?;

    let key_path = dir.join(format!("{kid}.key"));
    let pub_path = dir.join(format!("{kid}.pub"));
    write_atomic(&key_path, signing_key_to_pkcs8_pem(&sk).as_bytes(), 0o600)?;
    write_atomic(&pub_path, verifying_key_to_spki_pem(&vk).as_bytes(), 0o644)?;
    write_atomic(&jwks_path, jwks.as_bytes(), 0o644)?;
    Ok(vec![key_path, pub_path, jwks_path])
}

/// The JWKS text after adding/replacing `kid`. An existing file that is not a JWKS is an
/// error rather than something to overwrite.
fn merged_jwks(path: &Path, kid: &str, vk: &VerifyingKey) -> Result<String, KeyError> {
    let mut keys = match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        _ => {
            let text = read_bounded(path, MAX_JWKS_BYTES)?;
            let in_file = |reason: String| KeyError::InFile {
                path: path.to_path_buf(),
                source: Box::new(KeyError::Jwks(reason)),
            };
            let mut doc: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| in_file(e.to_string()))?;
            match doc.get_mut("keys").map(serde_json::Value::take) {
                Some(serde_json::Value::Array(keys)) => keys,
                _ => return Err(in_file("no \"keys\" array".into())),
            }
        }
    };
    keys.retain(|k| k.get("kid").and_then(serde_json::Value::as_str) != Some(kid));
    keys.push(jwk_value(kid, vk));
    let mut text = serde_json::to_string_pretty(&serde_json::json!({ "keys": keys }))
        .map_err(|e| KeyError::Jwks(e.to_string()))?;
    text.push('\n');
    Ok(text)
}

/// Writes `data` to `path` via a fresh temporary file created with `mode`, then renames.
fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), KeyError> {
    use ring::rand::SecureRandom;
    let werr = |source| KeyError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut nonce = [0u8; 8];
    ring::rand::SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| KeyError::Rng)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", B64.encode(nonce)));
    let result = (|| {
        // create_new: never follow or reuse a file someone else planted at that name.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask can only have removed bits; set the exact mode (still never wider).
        f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(werr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::keys::{KeySet, parse_spki_pem};
    use ed25519_dalek::pkcs8::{EncodePrivateKey, EncodePublicKey};
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn der_matches_dalek_encoder() {
        let sk = SigningKey::from_bytes(&[7; 32]);
        // dalek writes PKCS#8 v2 (with the public key); ours is v1. Both decode to the same key.
        let dalek = sk.to_pkcs8_der().unwrap();
        let ours = signing_key_to_pkcs8_der(&sk);
        assert_eq!(
            SigningKey::from_pkcs8_der(dalek.as_bytes()).unwrap().as_bytes(),
            sk.as_bytes()
        );
        assert_eq!(
            SigningKey::from_pkcs8_der(&ours).unwrap().as_bytes(),
            sk.as_bytes()
        );
        assert_eq!(dalek.as_bytes()[5..16], ours[5..16]); // same algorithm id and key wrapping
        let spki = sk.verifying_key().to_public_key_der().unwrap();
        assert_eq!(
            spki.as_bytes(),
            verifying_key_to_spki_der(&sk.verifying_key()).as_slice()
        );
        let pem = sk
            .verifying_key()
            .to_public_key_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF)
            .unwrap();
        assert_eq!(pem, verifying_key_to_spki_pem(&sk.verifying_key()));
    }

    #[test]
    fn pems_roundtrip() {
        let sk = generate_signing_key().unwrap();
        let pem = signing_key_to_pkcs8_pem(&sk);
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        assert_eq!(
            signing_key_from_pkcs8_pem(&pem).unwrap().as_bytes(),
            sk.as_bytes()
        );
        let pubpem = verifying_key_to_spki_pem(&sk.verifying_key());
        assert!(pubpem.starts_with("-----BEGIN PUBLIC KEY-----\n"));
        assert_eq!(parse_spki_pem(&pubpem).unwrap(), sk.verifying_key());
        // Labels are not interchangeable.
        assert!(parse_spki_pem(&pem).is_err());
        assert!(signing_key_from_pkcs8_pem(&pubpem).is_err());
        assert_ne!(generate_signing_key().unwrap().as_bytes(), sk.as_bytes());
    }

    #[test]
    fn claims_skip_empty() {
        let c = Claims {
            sub: "a".into(),
            exp: 5,
            ..Claims::default()
        };
        assert_eq!(serde_json::to_string(&c).unwrap(), r#"{"sub":"a","exp":5}"#);
        let t = sign_token(&SigningKey::from_bytes(&[1; 32]), "k\"1", &c);
        let h = B64.decode(t.split('.').next().unwrap()).unwrap();
        assert_eq!(h, br#"{"alg":"EdDSA","kid":"k\"1","typ":"JWT"}"#);
    }

    #[test]
    fn jwks_json_parses() {
        let a = SigningKey::from_bytes(&[1; 32]).verifying_key();
        let b = SigningKey::from_bytes(&[2; 32]).verifying_key();
        let s = jwks_json(&[("a".into(), a), ("b".into(), b)]);
        let set = KeySet::from_jwks_str(&s).unwrap();
        assert_eq!(set.kids(), vec!["a", "b"]);
        assert_eq!(set.get("b"), Some(&b));
    }

    #[test]
    fn keygen_writes_files_with_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b/keys");
        let paths = keygen(&dir, "k1").unwrap();
        assert_eq!(
            paths,
            vec![dir.join("k1.key"), dir.join("k1.pub"), dir.join("jwks.json")]
        );
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&paths[0]), 0o600);
        assert_eq!(mode(&paths[1]) & 0o077 & !0o044, 0);
        let sk = load_signing_key(&paths[0]).unwrap();
        let vk = parse_spki_pem(&std::fs::read_to_string(&paths[1]).unwrap()).unwrap();
        assert_eq!(sk.verifying_key(), vk);
        let set = KeySet::from_jwks_str(&std::fs::read_to_string(&paths[2]).unwrap()).unwrap();
        assert_eq!(set.get("k1"), Some(&vk));
        // No temporary files left behind.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 3);

        // A second kid is added; re-running a kid replaces it, keeping the other.
        keygen(&dir, "k2").unwrap();
        let set = KeySet::from_jwks_str(&std::fs::read_to_string(&paths[2]).unwrap()).unwrap();
        assert_eq!(set.kids(), vec!["k1", "k2"]);
        let k2_before = set.get("k2").copied().unwrap();
        keygen(&dir, "k2").unwrap();
        let set = KeySet::from_jwks_str(&std::fs::read_to_string(&paths[2]).unwrap()).unwrap();
        assert_eq!(set.kids(), vec!["k1", "k2"]);
        assert_eq!(set.get("k1"), Some(&vk));
        assert_ne!(set.get("k2"), Some(&k2_before));
        assert_eq!(mode(&dir.join("k2.key")), 0o600);

        // Files and JWKS with the same kid conflict at load.
        let err = KeySet::load(&[("k1".into(), paths[1].clone())], Some(&paths[2])).unwrap_err();
        assert!(err.to_string().contains("duplicate kid \"k1\""), "{err}");
        // Files alone, or JWKS alone, load fine.
        assert_eq!(
            KeySet::load(&[("k1".into(), paths[1].clone())], None)
                .unwrap()
                .len(),
            1
        );
        assert_eq!(KeySet::load(&[], Some(&paths[2])).unwrap().len(), 2);
    }

    #[test]
    fn keygen_refuses_bad_kids_and_foreign_jwks() {
        let tmp = tempfile::tempdir().unwrap();
        for kid in ["", "../x", "a/b", ".hidden", "a b"] {
            assert!(keygen(tmp.path(), kid).is_err(), "{kid:?}");
        }
        std::fs::write(tmp.path().join("jwks.json"), "[1,2]").unwrap();
        assert!(keygen(tmp.path(), "k1").is_err());
        assert!(!tmp.path().join("k1.key").exists());
    }

    #[test]
    fn keygen_keeps_foreign_entries() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(
            tmp.path().join("jwks.json"),
            r#"{"keys":[{"kty":"RSA","kid":"r","n":"AQAB","e":"AQAB"}]}"#,
        )
        .unwrap();
        keygen(tmp.path(), "k1").unwrap();
        let text = std::fs::read_to_string(tmp.path().join("jwks.json")).unwrap();
        assert!(text.contains("\"RSA\""));
        assert_eq!(KeySet::from_jwks_str(&text).unwrap().kids(), vec!["k1"]);
    }
}
