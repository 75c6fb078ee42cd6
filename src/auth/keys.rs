//! Verifying-key sets: which Ed25519 public key a token's `kid` names.
//!
//! # Design
//!
//! A [`KeySet`] maps `kid` to an [`ed25519_dalek::VerifyingKey`]. It is an `Arc` around
//! an immutable map, so cloning is one atomic increment and a reload (`SIGHUP`) builds a
//! whole new set and swaps it in: a verification in flight keeps the set it started
//! with, and there is never a half-loaded set. Mutation ([`KeySet::insert`]) is only for
//! building; it copies on write if the set is already shared.
//!
//! Keys come from operator-provided files: SPKI PEM (`-----BEGIN PUBLIC KEY-----`) and/or
//! a JWKS document (RFC 7517) holding `OKP`/`Ed25519` keys (RFC 8037). Loading is strict
//! because a silently skipped or misread key is an outage or a hole:
//! - a `kid` present twice, within or across sources, is an error ([`KeyError::DuplicateKid`]),
//!   never "last one wins";
//! - a JWK carrying `d` is refused: private key material does not belong in a public set,
//!   and its presence means someone published the wrong file;
//! - keys of other types or curves (RSA, EC, X25519) are skipped without error, because
//!   shared JWKS endpoints commonly mix algorithms;
//! - weak (small-order) points are refused: `verify_strict` would reject every signature
//!   under them anyway, and an unusable key should fail at load, not at the first login;
//! - every input is bounded in size before it is read or parsed.
//!
//! Errors name the file and/or the `kid` so an operator can fix the config from one line.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use ed25519_dalek::VerifyingKey;

use super::ed25519::PreparedKey;
use ed25519_dalek::pkcs8::DecodePublicKey;

use super::b64::B64;

/// Largest PEM file we read. An Ed25519 SPKI PEM is ~113 bytes; anything near this bound
/// is not a public key.
pub const MAX_PEM_BYTES: u64 = 16 * 1024;
/// Largest JWKS document we read or parse.
pub const MAX_JWKS_BYTES: u64 = 1024 * 1024;
/// Most keys one JWKS document may list (all types counted).
pub const MAX_JWKS_KEYS: usize = 1024;
/// Longest accepted `kid`, in bytes. Tokens with longer ones cannot match any key.
pub const MAX_KID_BYTES: usize = 64;
/// [`is_valid_kid`] in words, for error messages.
pub const KID_RULE: &str = "1 to 64 characters of A-Z a-z 0-9 . _ -, not starting with .";

/// Errors from loading or building key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The same `kid` appears twice (within one source or across files and JWKS).
    #[error("duplicate kid {0:?}")]
    DuplicateKid(String),
    /// A `kid` breaks [`is_valid_kid`].
    #[error("invalid kid {0:?}: must be {KID_RULE}")]
    BadKid(String),
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A file is larger than its bound.
    #[error("{path}: file larger than {limit} bytes")]
    FileTooLarge {
        /// The file.
        path: PathBuf,
        /// The bound.
        limit: u64,
    },
    /// An error inside a named file.
    #[error("{path}: {source}")]
    InFile {
        /// The file.
        path: PathBuf,
        /// What was wrong with it.
        #[source]
        source: Box<KeyError>,
    },
    /// A PEM document is not the expected kind of key.
    #[error("bad {what} PEM: {reason}")]
    Pem {
        /// "SPKI public key" or "PKCS#8 private key".
        what: &'static str,
        /// Parser's reason.
        reason: String,
    },
    /// The JWKS document as a whole is malformed.
    #[error("bad JWKS: {0}")]
    Jwks(String),
    /// One JWK is malformed. `kid` is `None` when the key has no usable `kid`.
    #[error("bad JWK (kid {kid:?}): {reason}")]
    Jwk {
        /// The key's `kid`, when it has one.
        kid: Option<String>,
        /// What is wrong.
        reason: String,
    },
    /// A JWK in a public key set carries the private part `d`.
    #[error("JWK (kid {0:?}) contains a private key (\"d\"): refusing to load it into a public key set")]
    PrivateKeyInJwks(Option<String>),
    /// A small-order (weak) Ed25519 public key.
    #[error("weak (small-order) Ed25519 public key for kid {0:?}")]
    WeakKey(String),
    /// Writing key files failed (keygen).
    #[error("{path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The system random generator failed (keygen).
    #[error("system random number generator failed")]
    Rng,
}

impl KeyError {
    fn in_file(self, path: &Path) -> KeyError {
        KeyError::InFile {
            path: path.to_path_buf(),
            source: Box::new(self),
        }
    }
}

/// A set of verifying keys by `kid`. Cheap to clone; see the module docs.
#[derive(Clone, Default)]
pub struct KeySet {
    keys: Arc<BTreeMap<String, (VerifyingKey, PreparedKey)>>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Public keys are not secret, but the kid list is what an operator needs to see.
        f.debug_struct("KeySet").field("kids", &self.kids()).finish()
    }
}

impl KeySet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `key` under `kid`. A `kid` already present is an error, never a replacement.
    pub fn insert(&mut self, kid: &str, key: VerifyingKey) -> Result<(), KeyError> {
        check_kid(kid)?;
        let prepared = match PreparedKey::new(&key) {
            Some(p) if !key.is_weak() => p,
            _ => return Err(KeyError::WeakKey(kid.to_owned())),
        };
        let map = Arc::make_mut(&mut self.keys);
        if map.contains_key(kid) {
            return Err(KeyError::DuplicateKid(kid.to_owned()));
        }
        map.insert(kid.to_owned(), (key, prepared));
        Ok(())
    }

    /// The key for `kid`, if any.
    pub fn get(&self, kid: &str) -> Option<&VerifyingKey> {
        self.keys.get(kid).map(|(k, _)| k)
    }

    /// The key for `kid` prepared for verification ([`PreparedKey`]), if any.
    pub fn prepared(&self, kid: &str) -> Option<&PreparedKey> {
        self.keys.get(kid).map(|(_, p)| p)
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the set has no key (a verifier with it rejects every token).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The kids, sorted.
    pub fn kids(&self) -> Vec<String> {
        self.keys.keys().cloned().collect()
    }

    /// Builds a set from config: `files` are `(kid, path to SPKI PEM)`, `jwks` an optional
    /// JWKS file. A kid present twice across both sources is [`KeyError::DuplicateKid`].
    pub fn load(files: &[(String, PathBuf)], jwks: Option<&Path>) -> Result<KeySet, KeyError> {
        let mut set = KeySet::new();
        for (kid, path) in files {
            let pem = read_bounded(path, MAX_PEM_BYTES)?;
            let key = parse_spki_pem(&pem).map_err(|e| e.in_file(path))?;
            set.insert(kid, key).map_err(|e| e.in_file(path))?;
        }
        if let Some(path) = jwks {
            let text = read_bounded(path, MAX_JWKS_BYTES)?;
            let from_jwks = KeySet::from_jwks_str(&text).map_err(|e| e.in_file(path))?;
            for (kid, key) in from_jwks.iter() {
                set.insert(kid, *key).map_err(|e| e.in_file(path))?;
            }
        }
        Ok(set)
    }

    /// Parses a JWKS document (`{"keys":[...]}`), keeping the `OKP`/`Ed25519` keys.
    ///
    /// Each kept key needs `kty`, `crv`, `x` and `kid`. `alg`, when present, must be
    /// `EdDSA` (or the fully-specified `Ed25519` of RFC 9864); `use`, when present, `sig`.
    pub fn from_jwks_str(s: &str) -> Result<KeySet, KeyError> {
        if s.len() as u64 > MAX_JWKS_BYTES {
            return Err(KeyError::Jwks(format!(
                "document larger than {MAX_JWKS_BYTES} bytes"
            )));
        }
        let doc: JwksDoc = serde_json::from_str(s).map_err(|e| KeyError::Jwks(format!("not a JWKS: {e}")))?;
        if doc.keys.len() > MAX_JWKS_KEYS {
            return Err(KeyError::Jwks(format!("more than {MAX_JWKS_KEYS} keys")));
        }
        let mut set = KeySet::new();
        for jwk in &doc.keys {
            if let Some((kid, key)) = parse_jwk(jwk)? {
                set.insert(&kid, key)?;
            }
        }
        Ok(set)
    }

    /// Iterates `(kid, key)` in kid order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &VerifyingKey)> {
        self.keys.iter().map(|(k, (v, _))| (k.as_str(), v))
    }
}

#[derive(serde::Deserialize)]
struct JwksDoc {
    keys: Vec<serde_json::Map<String, serde_json::Value>>,
}

/// Returns `Ok(None)` for keys of other types or curves.
fn parse_jwk(
    jwk: &serde_json::Map<String, serde_json::Value>,
) -> Result<Option<(String, VerifyingKey)>, KeyError> {
    let kid = match jwk.get("kid") {
        None => None,
        Some(serde_json::Value::String(k)) => Some(k.clone()),
        Some(_) => {
            return Err(KeyError::Jwk {
                kid: None,
                reason: "\"kid\" is not a string".into(),
            });
        }
    };
    let bad = |reason: &str| KeyError::Jwk {
        kid: kid.clone(),
        reason: reason.to_owned(),
    };
    // Checked before the type filter: a private key of any type in a public set is a
    // publishing mistake the operator must hear about.
    if jwk.contains_key("d") {
        return Err(KeyError::PrivateKeyInJwks(kid));
    }
    let str_member = |name: &str| -> Result<Option<&str>, KeyError> {
        match jwk.get(name) {
            None => Ok(None),
            Some(serde_json::Value::String(v)) => Ok(Some(v.as_str())),
            Some(_) => Err(bad(&format!("\"{name}\" is not a string"))),
        }
    };
    let kty = str_member("kty")?.ok_or_else(|| bad("missing \"kty\""))?;
    if kty != "OKP" {
        return Ok(None);
    }
    let crv = str_member("crv")?.ok_or_else(|| bad("missing \"crv\""))?;
    if crv != "Ed25519" {
        return Ok(None);
    }
    let kid = kid.clone().ok_or_else(|| bad("missing \"kid\""))?;
    check_kid(&kid)?;
    if let Some(alg) = str_member("alg")?
        && alg != "EdDSA"
        && alg != "Ed25519"
    {
        return Err(bad(&format!("\"alg\" {alg:?} is not EdDSA")));
    }
    if let Some(usage) = str_member("use")?
        && usage != "sig"
    {
        return Err(bad(&format!("\"use\" {usage:?} is not sig")));
    }
    let x = str_member("x")?.ok_or_else(|| bad("missing \"x\""))?;
    let raw = B64
        .decode(x)
        .map_err(|e| bad(&format!("\"x\" is not strict base64url: {e}")))?;
    let raw: [u8; 32] = raw
        .as_slice()
        .try_into()
        .map_err(|_| bad("\"x\" is not 32 bytes"))?;
    let key = VerifyingKey::from_bytes(&raw).map_err(|_| bad("\"x\" is not a valid Ed25519 point"))?;
    if key.is_weak() {
        return Err(KeyError::WeakKey(kid));
    }
    Ok(Some((kid, key)))
}

/// Parses an SPKI PEM (`-----BEGIN PUBLIC KEY-----`) holding an Ed25519 key.
pub fn parse_spki_pem(pem: &str) -> Result<VerifyingKey, KeyError> {
    if pem.len() as u64 > MAX_PEM_BYTES {
        return Err(KeyError::Pem {
            what: "SPKI public key",
            reason: format!("larger than {MAX_PEM_BYTES} bytes"),
        });
    }
    let key = VerifyingKey::from_public_key_pem(pem.trim()).map_err(|e| KeyError::Pem {
        what: "SPKI public key",
        reason: e.to_string(),
    })?;
    if key.is_weak() {
        return Err(KeyError::Pem {
            what: "SPKI public key",
            reason: "weak (small-order) Ed25519 point".into(),
        });
    }
    Ok(key)
}

/// RFC 7638 JWK thumbprint of an Ed25519 key (base64url SHA-256 over the canonical
/// `{"crv":"Ed25519","kty":"OKP","x":"..."}`). Handy as a default `kid`.
pub fn jwk_thumbprint(key: &VerifyingKey) -> String {
    let canonical = format!(
        r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#,
        B64.encode(key.as_bytes())
    );
    let digest = ring::digest::digest(&ring::digest::SHA256, canonical.as_bytes());
    B64.encode(digest.as_ref())
}

/// The one rule for a `kid` ([`KID_RULE`]): `auth.keys` in the config, the key loader
/// (files and JWKS) and `tickgate keygen` all call it. A kid is used in logs and becomes
/// a file name (keygen), so it is bounded, has no separators, spaces or control
/// characters, and is not a hidden or relative name.
pub fn is_valid_kid(kid: &str) -> bool {
    (1..=MAX_KID_BYTES).contains(&kid.len())
        && !kid.starts_with('.')
        && kid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// [`is_valid_kid`] as a [`KeyError::BadKid`].
pub(crate) fn check_kid(kid: &str) -> Result<(), KeyError> {
    if !is_valid_kid(kid) {
        return Err(KeyError::BadKid(kid.to_owned()));
    }
    Ok(())
}

/// Reads a whole file, refusing more than `limit` bytes without reading them.
pub(crate) fn read_bounded(path: &Path, limit: u64) -> Result<String, KeyError> {
    let io = |source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut buf = Vec::new();
    // Read one byte past the limit so "exactly at the limit" and "over it" differ.
    file.take(limit + 1).read_to_end(&mut buf).map_err(io)?;
    if buf.len() as u64 > limit {
        return Err(KeyError::FileTooLarge {
            path: path.to_path_buf(),
            limit,
        });
    }
    String::from_utf8(buf).map_err(|_| io(std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;

    // RFC 8037 Appendix A.
    const RFC_D: &str = "nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A";
    const RFC_X: &str = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo";
    const RFC_THUMB: &str = "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k";

    fn rfc_signing_key() -> SigningKey {
        let d: [u8; 32] = B64.decode(RFC_D).unwrap().try_into().unwrap();
        SigningKey::from_bytes(&d)
    }

    fn key(n: u8) -> VerifyingKey {
        SigningKey::from_bytes(&[n; 32]).verifying_key()
    }

    #[test]
    fn rfc8037_a1_a2_public_from_private() {
        let sk = rfc_signing_key();
        assert_eq!(B64.encode(sk.verifying_key().as_bytes()), RFC_X);
    }

    #[test]
    fn rfc8037_a3_thumbprint() {
        let sk = rfc_signing_key();
        assert_eq!(jwk_thumbprint(&sk.verifying_key()), RFC_THUMB);
    }

    #[test]
    fn rfc8037_a2_jwk_loads() {
        let jwks = format!(r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","kid":"rfc","x":"{RFC_X}"}}]}}"#);
        let set = KeySet::from_jwks_str(&jwks).unwrap();
        assert_eq!(set.kids(), vec!["rfc".to_string()]);
        assert_eq!(set.get("rfc").unwrap(), &rfc_signing_key().verifying_key());
    }

    #[test]
    fn insert_duplicate_kid_errors() {
        let mut s = KeySet::new();
        s.insert("a", key(1)).unwrap();
        assert!(matches!(s.insert("a", key(2)), Err(KeyError::DuplicateKid(k)) if k == "a"));
        s.insert("b", key(2)).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s.kids(), vec!["a", "b"]);
        assert!(s.get("c").is_none());
    }

    #[test]
    fn clone_is_snapshot() {
        let mut a = KeySet::new();
        a.insert("a", key(1)).unwrap();
        let b = a.clone();
        a.insert("b", key(2)).unwrap();
        assert_eq!(b.len(), 1);
        assert_eq!(a.len(), 2);
    }

    #[test]
    fn bad_kids_refused() {
        let mut s = KeySet::new();
        assert!(matches!(s.insert("", key(1)), Err(KeyError::BadKid(_))));
        assert!(matches!(s.insert("a\nb", key(1)), Err(KeyError::BadKid(_))));
        assert!(matches!(
            s.insert(&"k".repeat(65), key(1)),
            Err(KeyError::BadKid(_))
        ));
        for bad in ["a b", "a/b", ".hidden", "k\u{e9}", "k:1"] {
            assert!(
                matches!(s.insert(bad, key(1)), Err(KeyError::BadKid(_))),
                "{bad:?}"
            );
        }
        s.insert(&"k".repeat(64), key(1)).unwrap();
        s.insert("a.b_c-1", key(2)).unwrap();
    }

    #[test]
    fn weak_key_refused() {
        // The identity point (y = 1) has small order.
        let mut id = [0u8; 32];
        id[0] = 1;
        let weak = VerifyingKey::from_bytes(&id).unwrap();
        assert!(matches!(
            KeySet::new().insert("w", weak),
            Err(KeyError::WeakKey(_))
        ));
        let jwks = format!(
            r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","kid":"w","x":"{}"}}]}}"#,
            B64.encode(id)
        );
        assert!(matches!(KeySet::from_jwks_str(&jwks), Err(KeyError::WeakKey(_))));
    }

    #[test]
    fn jwks_skips_other_types_and_refuses_private() {
        let x = B64.encode(key(1).as_bytes());
        let doc = format!(
            r#"{{"keys":[
              {{"kty":"RSA","kid":"r","n":"AQAB","e":"AQAB"}},
              {{"kty":"EC","crv":"P-256","kid":"e","x":"AA","y":"AA"}},
              {{"kty":"OKP","crv":"X25519","kid":"x","x":"{x}"}},
              {{"kty":"OKP","crv":"Ed25519","kid":"ok","x":"{x}","alg":"EdDSA","use":"sig"}}
            ]}}"#
        );
        let s = KeySet::from_jwks_str(&doc).unwrap();
        assert_eq!(s.kids(), vec!["ok"]);

        let private =
            format!(r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","kid":"p","x":"{x}","d":"{RFC_D}"}}]}}"#);
        let err = KeySet::from_jwks_str(&private).unwrap_err();
        assert!(matches!(err, KeyError::PrivateKeyInJwks(Some(ref k)) if k == "p"));
        assert!(err.to_string().contains("\"p\""));
        // Even a private key of another type is refused.
        let rsa_private = r#"{"keys":[{"kty":"RSA","kid":"r","n":"AQAB","e":"AQAB","d":"AQAB"}]}"#;
        assert!(matches!(
            KeySet::from_jwks_str(rsa_private),
            Err(KeyError::PrivateKeyInJwks(_))
        ));
    }

    #[test]
    fn jwks_strictness() {
        let x = B64.encode(key(1).as_bytes());
        let cases = [
            format!(r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","x":"{x}"}}]}}"#), // no kid
            r#"{"keys":[{"kty":"OKP","crv":"Ed25519","kid":"a"}]}"#.to_string(),  // no x
            format!(r#"{{"keys":[{{"crv":"Ed25519","kid":"a","x":"{x}"}}]}}"#),   // no kty
            format!(r#"{{"keys":[{{"kty":"OKP","kid":"a","x":"{x}"}}]}}"#),       // no crv
            format!(r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","kid":"a","x":"{x}="}}]}}"#),
            format!(
                r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","kid":"a","x":"{}"}}]}}"#,
                &x[..40]
            ),
            format!(r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","kid":"a","x":"{x}","alg":"RS256"}}]}}"#),
            format!(r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","kid":"a","x":"{x}","use":"enc"}}]}}"#),
            format!(r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","kid":7,"x":"{x}"}}]}}"#),
            format!(
                r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","kid":"a","x":"{x}"}},{{"kty":"OKP","crv":"Ed25519","kid":"a","x":"{x}"}}]}}"#
            ),
            r#"{"nokeys":[]}"#.to_string(),
            r#"[]"#.to_string(),
            "not json".to_string(),
        ];
        for c in &cases {
            assert!(KeySet::from_jwks_str(c).is_err(), "accepted: {c}");
        }
        assert!(KeySet::from_jwks_str(r#"{"keys":[]}"#).unwrap().is_empty());
    }

    #[test]
    fn spki_pem_parse() {
        let pem = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=\n-----END PUBLIC KEY-----\n";
        let k = parse_spki_pem(pem).unwrap();
        assert_eq!(B64.encode(k.as_bytes()), RFC_X);
        assert!(parse_spki_pem("-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIJ1hsZ3v/VpguoRK9JLsLMREScVpezJpGXA7rAMcrn9g\n-----END PRIVATE KEY-----\n").is_err());
        assert!(parse_spki_pem("garbage").is_err());
        assert!(parse_spki_pem("").is_err());
    }

    #[test]
    fn load_files_and_jwks_duplicate_across_sources() {
        let dir = tempfile::tempdir().unwrap();
        let pem = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=\n-----END PUBLIC KEY-----\n";
        let p = dir.path().join("k1.pub");
        std::fs::write(&p, pem).unwrap();
        let j = dir.path().join("jwks.json");
        let x = B64.encode(key(9).as_bytes());
        std::fs::write(
            &j,
            format!(r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","kid":"k2","x":"{x}"}}]}}"#),
        )
        .unwrap();
        let s = KeySet::load(&[("k1".into(), p.clone())], Some(&j)).unwrap();
        assert_eq!(s.kids(), vec!["k1", "k2"]);

        let err = KeySet::load(&[("k2".into(), p.clone())], Some(&j)).unwrap_err();
        assert!(err.to_string().contains("k2"), "{err}");
        assert!(err.to_string().contains("jwks.json"), "{err}");

        let err = KeySet::load(&[("k1".into(), p.clone()), ("k1".into(), p.clone())], None).unwrap_err();
        assert!(
            matches!(err, KeyError::InFile { ref source, .. } if matches!(**source, KeyError::DuplicateKid(_)))
        );

        let missing = dir.path().join("nope.pub");
        let err = KeySet::load(&[("k1".into(), missing)], None).unwrap_err();
        assert!(err.to_string().contains("nope.pub"), "{err}");

        let big = dir.path().join("big.pub");
        std::fs::write(&big, vec![b'a'; MAX_PEM_BYTES as usize + 1]).unwrap();
        assert!(matches!(
            KeySet::load(&[("k1".into(), big)], None),
            Err(KeyError::FileTooLarge { .. })
        ));
    }
}
