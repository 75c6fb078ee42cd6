//! Strict EdDSA (Ed25519) JWT verification: RFC 7515 compact JWS, RFC 8037, RFC 7519.
//!
//! # Design
//!
//! [`Verifier::verify`] is the only way to obtain a [`VerifiedClaims`] (it has a private
//! field), so the rest of the server cannot hold an identity that did not pass every
//! check below: "parse, don't validate".
//!
//! The token is hostile until its signature is checked, so the order is fixed and each
//! step touches as little as possible:
//!
//! 1. size bound (`max_token_bytes`) before anything else;
//! 2. exactly three `.`-separated parts;
//! 3. the header: bounded, strict base64url, then JSON into a small typed struct;
//! 4. `alg` must be exactly `EdDSA`. The algorithm is *never* taken from the token to
//!    choose a verification method: there is only one. `none`, `HS256` (the classic
//!    "HMAC keyed with the public key" confusion), `RS256`, `ES256`, `eddsa` ... are
//!    rejected;
//! 5. `crit` present (with any value, even `null`) is rejected: we implement no extension,
//!    and RFC 7515 §4.1.11 says a recipient that does not understand one must reject;
//! 6. `kid` is required and must name a configured key. **Choice:** even when the set
//!    holds exactly one key, a token without `kid` is rejected ([`AuthError::MissingKid`]):
//!    rotation adds a second key at some point, and tokens that silently depended on
//!    "the only key" would then all fail at once; better to fail at the first token;
//! 7. `typ`, if present, must be `JWT` (ASCII case-insensitive);
//! 8. the Ed25519 signature over the ASCII signing input `header.payload`, with
//!    [`PreparedKey::verify`], equivalent to ed25519-dalek's `verify_strict` (rejects
//!    non-canonical `S`, small-order `R` and weak keys, so no signature malleability);
//! 9. only then is the payload decoded and parsed into typed claims, and the claims
//!    checked: time (`exp`, `nbf`, `iat` with leeway), lifetime (no leeway), `iss`/`aud`
//!    when configured, shapes and bounds of the rest.
//!
//! Details that are policy, not accident:
//! - base64url is strict: no padding `=`, no characters outside the URL-safe alphabet,
//!   no non-canonical trailing bits. Two encodings of the same bytes would make
//!   "the same token" ambiguous for logging and revocation by hash.
//! - Duplicate JSON members: for the members we read (`alg`, `kid`, `typ`, `crit` in the
//!   header; every registered/known claim in the payload) a duplicate is an error
//!   ([`AuthError::Malformed`] in the header, [`AuthError::BadClaims`] in the payload),
//!   because "first wins" vs "last wins" differs between parsers and such differentials
//!   have been used to smuggle claims. Duplicates of members we ignore are ignored.
//! - Unknown header parameters (`jwk`, `jku`, `x5u`, `x5c`, ...) and unknown claims are
//!   ignored; keys never come from the token.
//! - JSON nesting is bounded by serde_json's recursion limit (128) and by the size bound.
//! - Numeric claims must be non-negative JSON integers: `1.7e9`, `1700000000.0`, `-1`,
//!   strings are [`AuthError::BadClaims`].
//! - `now` is Unix seconds and comes from the caller: this module never reads a clock.

use base64::engine::Engine;
use serde::Deserialize;

use super::ed25519::PreparedKey;
use super::keys::KeySet;
use super::seclog::Reason;

use super::b64::B64;

/// Largest encoded header we decode. Ours is ~50 bytes; 1 KiB leaves room for a long kid
/// and extra parameters without letting the header dominate the token.
pub const MAX_HEADER_B64_BYTES: usize = 1024;
/// Length of a base64url-encoded 64-byte Ed25519 signature.
const SIG_B64_LEN: usize = 86;
/// Longest accepted `sub`, `jti`, `sid`, `did`, `iss`, one `aud` entry, in bytes.
pub const MAX_ID_BYTES: usize = 256;
/// Most `symbols` entries.
pub const MAX_SYMBOLS: usize = 1024;
/// Longest `symbols` entry, in bytes.
pub const MAX_SYMBOL_BYTES: usize = 64;
/// Most `aud` array entries.
pub const MAX_AUD_ENTRIES: usize = 64;

/// What a token must satisfy beyond a valid signature.
#[derive(Clone, Debug)]
pub struct VerifyPolicy {
    /// Required `iss`, exact match, when set.
    pub issuer: Option<String>,
    /// Required audience (`aud` is it or contains it), when set.
    pub audience: Option<String>,
    /// Largest `exp - iat` (or `exp - now` without `iat`), seconds. No leeway applies.
    pub max_lifetime_secs: u64,
    /// Clock skew tolerance for `exp`, `nbf`, `iat`, seconds.
    pub leeway_secs: u64,
    /// Largest token, bytes, checked before anything else.
    pub max_token_bytes: usize,
}

impl Default for VerifyPolicy {
    fn default() -> Self {
        Self {
            issuer: None,
            audience: None,
            // The config's defaults, so a policy built without a config agrees with one.
            max_lifetime_secs: crate::config::DEFAULT_MAX_TOKEN_LIFETIME.as_secs(),
            leeway_secs: crate::config::DEFAULT_LEEWAY.as_secs(),
            max_token_bytes: 8192,
        }
    }
}

/// A role granted by a token's `roles` claim.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// May subscribe.
    Subscriber,
    /// May publish (to entitled symbols).
    Publisher,
    /// May use the admin endpoints.
    Admin,
}

impl Role {
    /// Parses the wire name; `None` for names we do not know (ignored, not an error, so an
    /// issuer can add roles for other services before we know them).
    pub fn from_name(s: &str) -> Option<Role> {
        match s {
            "subscriber" => Some(Role::Subscriber),
            "publisher" => Some(Role::Publisher),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    /// The wire name.
    pub fn name(self) -> &'static str {
        match self {
            Role::Subscriber => "subscriber",
            Role::Publisher => "publisher",
            Role::Admin => "admin",
        }
    }
}

/// The identity and entitlements of a token that passed [`Verifier::verify`].
/// Only the verifier can build one (the `_sealed` field is private).
// A private field rather than `#[non_exhaustive]`: the attribute only stops other
// crates, while the point is that no module of this crate but the verifier can build one.
#[allow(clippy::manual_non_exhaustive)]
#[derive(Clone, Debug)]
pub struct VerifiedClaims {
    /// The user.
    pub sub: String,
    /// Expiry, Unix seconds.
    pub exp: u64,
    /// Issued-at, Unix seconds.
    pub iat: Option<u64>,
    /// Not-before, Unix seconds.
    pub nbf: Option<u64>,
    /// Token id (revocation by jti).
    pub jti: Option<String>,
    /// Session id.
    pub sid: Option<String>,
    /// Device id binding.
    pub did: Option<String>,
    /// Client IP binding.
    pub cip: Option<std::net::IpAddr>,
    /// Known roles, deduplicated, in token order.
    pub roles: Vec<Role>,
    /// Entitlement patterns, as given.
    pub symbols: Vec<String>,
    /// The key that signed it.
    pub kid: String,
    _sealed: (),
}

impl VerifiedClaims {
    /// Whether the token grants `r`.
    pub fn has_role(&self, r: Role) -> bool {
        self.roles.contains(&r)
    }
}

/// Why a token was rejected. Every variant means "401 invalid_token" at the handshake
/// (or `forbidden` on reauth); [`AuthError::reason`] is the security-log reason.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// Not three strict-base64url parts, or a header that is not the expected JSON.
    #[error("malformed token")]
    Malformed,
    /// Over `max_token_bytes` (or the header bound).
    #[error("token too large")]
    TooLarge,
    /// `alg` missing or not exactly `EdDSA`.
    #[error("unsupported or missing alg")]
    BadAlg,
    /// A `crit` header parameter is present.
    #[error("crit header not supported")]
    Crit,
    /// No `kid` in the header.
    #[error("missing kid")]
    MissingKid,
    /// `kid` names no configured key.
    #[error("unknown kid")]
    UnknownKid,
    /// `typ` present and not `JWT`.
    #[error("bad typ")]
    BadType,
    /// The signature does not verify under the key `kid` names.
    #[error("bad signature")]
    BadSignature,
    /// The token's `sub`, `sid` or `jti` is on the revocation list (checked by the server
    /// after verification, PROTOCOL.md section 7).
    #[error("token revoked")]
    Revoked,
    /// `exp + leeway <= now`.
    #[error("token expired")]
    Expired,
    /// `nbf > now + leeway`.
    #[error("token not yet valid")]
    NotYetValid,
    /// `iat > now + leeway`.
    #[error("token issued in the future")]
    IssuedInFuture,
    /// Lifetime over `max_lifetime_secs`.
    #[error("token lifetime too long")]
    TooLongLived,
    /// `iss` missing or not the configured issuer.
    #[error("bad issuer")]
    BadIssuer,
    /// `aud` missing or not containing the configured audience.
    #[error("bad audience")]
    BadAudience,
    /// `sub` missing or empty.
    #[error("missing sub")]
    MissingSub,
    /// `exp` missing.
    #[error("missing exp")]
    MissingExp,
    /// The payload is not a JSON object of well-typed, bounded claims.
    #[error("bad claims")]
    BadClaims,
}

impl AuthError {
    /// The reason written to the security log.
    pub fn log_reason(&self) -> Reason {
        match self {
            AuthError::Malformed => Reason::Malformed,
            AuthError::TooLarge => Reason::TooLarge,
            AuthError::BadAlg => Reason::BadAlg,
            AuthError::Crit => Reason::Crit,
            AuthError::MissingKid => Reason::MissingKid,
            AuthError::UnknownKid => Reason::UnknownKid,
            AuthError::BadType => Reason::BadTyp,
            AuthError::BadSignature => Reason::BadSignature,
            AuthError::Expired => Reason::Expired,
            AuthError::NotYetValid => Reason::NotYetValid,
            AuthError::IssuedInFuture => Reason::IssuedInFuture,
            AuthError::TooLongLived => Reason::TooLongLived,
            AuthError::BadIssuer => Reason::BadIssuer,
            AuthError::BadAudience => Reason::BadAudience,
            AuthError::MissingSub => Reason::MissingSub,
            AuthError::MissingExp => Reason::MissingExp,
            AuthError::BadClaims => Reason::BadClaims,
            AuthError::Revoked => Reason::Revoked,
        }
    }

    /// [`AuthError::log_reason`] as its string.
    pub fn reason(&self) -> &'static str {
        self.log_reason().as_str()
    }
}

/// The header members we read; everything else is ignored (see module docs).
#[derive(Deserialize)]
struct Header {
    alg: Option<serde_json::Value>,
    kid: Option<String>,
    /// Absent: `None`; present: whether it is `"JWT"` (case-insensitive). `null` counts
    /// as present and wrong; a non-string is a parse error.
    #[serde(default, deserialize_with = "typ_is_jwt")]
    typ: Option<bool>,
    #[serde(default, deserialize_with = "present")]
    crit: bool,
}

fn typ_is_jwt<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    let v = Option::<String>::deserialize(d)?;
    Ok(Some(v.is_some_and(|t| t.eq_ignore_ascii_case("JWT"))))
}

/// `true` whenever the member exists, whatever its value (including `null`).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    serde::de::IgnoredAny::deserialize(d).map(|_| true)
}

/// The claims we read. Unknown claims are ignored; duplicates of these are errors.
#[derive(Deserialize)]
struct RawClaims {
    sub: Option<String>,
    exp: Option<u64>,
    iat: Option<u64>,
    nbf: Option<u64>,
    iss: Option<String>,
    aud: Option<Audience>,
    jti: Option<String>,
    sid: Option<String>,
    did: Option<String>,
    cip: Option<String>,
    roles: Option<Vec<String>>,
    symbols: Option<Vec<String>>,
}

/// `aud`: a string or an array of strings (RFC 7519 §4.1.3).
enum Audience {
    One(String),
    Many(Vec<String>),
}

impl<'de> Deserialize<'de> for Audience {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Audience;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string or an array of strings")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Audience, E> {
                Ok(Audience::One(v.to_owned()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Audience, A::Error> {
                let mut out = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    if out.len() == MAX_AUD_ENTRIES {
                        return Err(serde::de::Error::custom("too many aud entries"));
                    }
                    out.push(s);
                }
                Ok(Audience::Many(out))
            }
        }
        d.deserialize_any(V)
    }
}

impl Audience {
    fn contains(&self, want: &str) -> bool {
        match self {
            Audience::One(a) => a == want,
            Audience::Many(v) => v.iter().any(|a| a == want),
        }
    }
}

/// Checks an Ed25519 JWS signature at the raw layer: `sig_b64` (strict base64url) over
/// the ASCII `signing_input` (`BASE64URL(header) || '.' || BASE64URL(payload)`), with
/// strict Ed25519 ([`PreparedKey::verify`], which agrees with ed25519-dalek's
/// `verify_strict`). No header or claim semantics; [`Verifier::verify`] uses this after
/// its header checks, and the RFC 8037 A.4 vector (whose payload is not claims) tests it.
pub fn verify_jws_signature(key: &PreparedKey, signing_input: &[u8], sig_b64: &str) -> Result<(), AuthError> {
    if sig_b64.len() != SIG_B64_LEN {
        // Both "not base64" and "wrong length" are possible here; a wrong-length part
        // that is valid base64 is still not an Ed25519 signature.
        return Err(if B64.decode(sig_b64.as_bytes()).is_ok() {
            AuthError::BadSignature
        } else {
            AuthError::Malformed
        });
    }
    // 86 chars decode to 64 bytes; decode_slice wants room for its 66-byte estimate.
    let mut buf = [0u8; 66];
    let n = B64
        .decode_slice(sig_b64.as_bytes(), &mut buf)
        .map_err(|_| AuthError::Malformed)?;
    let bytes: [u8; 64] = buf
        .get(..n)
        .and_then(|s| s.try_into().ok())
        .ok_or(AuthError::BadSignature)?;
    if key.verify(signing_input, &bytes) {
        Ok(())
    } else {
        Err(AuthError::BadSignature)
    }
}

/// Verifies tokens against a key set and a policy. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Verifier {
    keys: KeySet,
    policy: VerifyPolicy,
}

impl Verifier {
    /// A verifier for `keys` under `policy`.
    pub fn new(keys: KeySet, policy: VerifyPolicy) -> Self {
        Self { keys, policy }
    }

    /// The key set in use.
    pub fn keys(&self) -> &KeySet {
        &self.keys
    }

    /// The policy in use.
    pub fn policy(&self) -> &VerifyPolicy {
        &self.policy
    }

    /// Swaps in a reloaded key set (tokens being verified elsewhere keep the old one).
    pub fn set_keys(&mut self, keys: KeySet) {
        self.keys = keys;
    }

    /// Verifies `token` at `now` (Unix seconds). See the module docs for the order.
    pub fn verify(&self, token: &str, now: u64) -> Result<VerifiedClaims, AuthError> {
        if token.len() > self.policy.max_token_bytes {
            return Err(AuthError::TooLarge);
        }
        let mut parts = token.split('.');
        let (Some(h64), Some(p64), Some(s64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(AuthError::Malformed);
        };

        // Header.
        if h64.len() > MAX_HEADER_B64_BYTES {
            return Err(AuthError::TooLarge);
        }
        let mut hbuf = [0u8; MAX_HEADER_B64_BYTES / 4 * 3 + 3];
        let hn = B64
            .decode_slice(h64.as_bytes(), &mut hbuf)
            .map_err(|_| AuthError::Malformed)?;
        let header_json = hbuf.get(..hn).ok_or(AuthError::Malformed)?;
        let header: Header = serde_json::from_slice(header_json).map_err(|_| AuthError::Malformed)?;
        match &header.alg {
            Some(serde_json::Value::String(a)) if a == "EdDSA" => {}
            _ => return Err(AuthError::BadAlg),
        }
        if header.crit {
            return Err(AuthError::Crit);
        }
        let kid = header.kid.ok_or(AuthError::MissingKid)?;
        let key = self.keys.prepared(&kid).ok_or(AuthError::UnknownKid)?;
        if header.typ == Some(false) {
            return Err(AuthError::BadType);
        }

        // Signature, over the exact ASCII bytes received.
        let signing_input = token
            .get(..h64.len() + 1 + p64.len())
            .ok_or(AuthError::Malformed)?;
        verify_jws_signature(key, signing_input.as_bytes(), s64)?;

        // Only now is the payload trusted enough to parse.
        let payload = B64.decode(p64.as_bytes()).map_err(|_| AuthError::Malformed)?;
        let raw: RawClaims = serde_json::from_slice(&payload).map_err(|_| AuthError::BadClaims)?;
        self.check_claims(raw, kid, now)
    }

    fn check_claims(&self, raw: RawClaims, kid: String, now: u64) -> Result<VerifiedClaims, AuthError> {
        let p = &self.policy;
        let sub = raw.sub.ok_or(AuthError::MissingSub)?;
        if sub.is_empty() {
            return Err(AuthError::MissingSub);
        }
        if sub.len() > MAX_ID_BYTES {
            return Err(AuthError::BadClaims);
        }
        let exp = raw.exp.ok_or(AuthError::MissingExp)?;

        // Clock checks, with leeway.
        if exp.saturating_add(p.leeway_secs) <= now {
            return Err(AuthError::Expired);
        }
        let now_plus = now.saturating_add(p.leeway_secs);
        if raw.nbf.is_some_and(|nbf| nbf > now_plus) {
            return Err(AuthError::NotYetValid);
        }
        if raw.iat.is_some_and(|iat| iat > now_plus) {
            return Err(AuthError::IssuedInFuture);
        }
        // Lifetime, without leeway: leeway forgives clock skew, not long-lived tokens.
        let lifetime = match raw.iat {
            Some(iat) => exp.checked_sub(iat).ok_or(AuthError::BadClaims)?,
            None => exp.saturating_sub(now),
        };
        if lifetime > p.max_lifetime_secs {
            return Err(AuthError::TooLongLived);
        }

        if let Some(want) = &p.issuer
            && raw.iss.as_deref() != Some(want.as_str())
        {
            return Err(AuthError::BadIssuer);
        }
        if let Some(want) = &p.audience
            && !raw.aud.as_ref().is_some_and(|a| a.contains(want))
        {
            return Err(AuthError::BadAudience);
        }

        // Shapes and bounds of what the rest of the server will use.
        let id_ok = |s: &Option<String>| s.as_ref().is_none_or(|v| v.len() <= MAX_ID_BYTES);
        if !id_ok(&raw.jti) || !id_ok(&raw.sid) || !id_ok(&raw.did) {
            return Err(AuthError::BadClaims);
        }
        let cip = match &raw.cip {
            None => None,
            Some(s) => Some(s.parse::<std::net::IpAddr>().map_err(|_| AuthError::BadClaims)?),
        };
        let mut roles = Vec::new();
        for name in raw.roles.iter().flatten() {
            if let Some(r) = Role::from_name(name)
                && !roles.contains(&r)
            {
                roles.push(r);
            }
        }
        let symbols = raw.symbols.unwrap_or_default();
        if symbols.len() > MAX_SYMBOLS || symbols.iter().any(|s| s.len() > MAX_SYMBOL_BYTES) {
            return Err(AuthError::BadClaims);
        }

        Ok(VerifiedClaims {
            sub,
            exp,
            iat: raw.iat,
            nbf: raw.nbf,
            jti: raw.jti,
            sid: raw.sid,
            did: raw.did,
            cip,
            roles,
            symbols,
            kid,
            _sealed: (),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::mint::{Claims, sign_jws, sign_token};
    use ed25519_dalek::{Signer, SigningKey};

    const NOW: u64 = 1_700_000_000;

    // RFC 8037 Appendix A.
    const RFC_D: &str = "nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A";
    /// As printed in RFC 8037 A.4 (and in other JOSE libraries' vector files).
    const RFC_A4: &str = "eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc.hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylGjg5BhVsPt9g7sVvpAr_MuM0KAg";
    /// A copy of the vector with the last signature characters altered (it circulated in
    /// our task brief); it must NOT verify.
    const RFC_A4_ALTERED: &str = "eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc.hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylGjg5BhVsPt9g7sVvpAr_MecxKBA";

    fn rfc_key() -> SigningKey {
        let d: [u8; 32] = B64.decode(RFC_D).unwrap().try_into().unwrap();
        SigningKey::from_bytes(&d)
    }
    fn sk(n: u8) -> SigningKey {
        SigningKey::from_bytes(&[n; 32])
    }
    fn verifier() -> Verifier {
        verifier_with(VerifyPolicy::default())
    }
    fn verifier_with(policy: VerifyPolicy) -> Verifier {
        let mut ks = KeySet::new();
        ks.insert("k1", sk(1).verifying_key()).unwrap();
        ks.insert("k2", sk(2).verifying_key()).unwrap();
        Verifier::new(ks, policy)
    }
    fn claims() -> Claims {
        Claims {
            sub: "alice".into(),
            exp: NOW + 300,
            iat: Some(NOW),
            sid: Some("s-1".into()),
            roles: vec!["subscriber".into()],
            symbols: vec!["BTC-USD".into()],
            ..Claims::default()
        }
    }
    fn good() -> String {
        sign_token(&sk(1), "k1", &claims())
    }
    /// Signs arbitrary header and payload JSON with key `n`.
    fn raw(n: u8, header: &str, payload: &str) -> String {
        sign_jws(&sk(n), header.as_bytes(), payload.as_bytes())
    }
    fn h() -> &'static str {
        r#"{"alg":"EdDSA","kid":"k1","typ":"JWT"}"#
    }
    fn payload(extra: &str) -> String {
        format!(r#"{{"sub":"alice","exp":{},"iat":{NOW}{extra}}}"#, NOW + 300)
    }
    fn err(t: &str) -> AuthError {
        verifier().verify(t, NOW).unwrap_err()
    }

    #[test]
    fn rfc8037_a4_signature_is_byte_identical() {
        let jws = sign_jws(&rfc_key(), br#"{"alg":"EdDSA"}"#, b"Example of Ed25519 signing");
        assert_eq!(jws, RFC_A4);
    }

    #[test]
    fn rfc8037_a5_verification() {
        let vk = rfc_key().verifying_key();
        let pk = PreparedKey::new(&vk).unwrap();
        let (input, sig) = RFC_A4.rsplit_once('.').unwrap();
        verify_jws_signature(&pk, input.as_bytes(), sig).unwrap();
        let (input2, sig2) = RFC_A4_ALTERED.rsplit_once('.').unwrap();
        assert_eq!(input, input2);
        assert_eq!(
            verify_jws_signature(&pk, input2.as_bytes(), sig2),
            Err(AuthError::BadSignature)
        );
        // One flipped bit of the input, and of the signature.
        let mut bad = input.as_bytes().to_vec();
        bad[30] ^= 1;
        assert_eq!(verify_jws_signature(&pk, &bad, sig), Err(AuthError::BadSignature));
        let mut s = sig.to_string();
        s.replace_range(0..1, "i");
        assert_eq!(
            verify_jws_signature(&pk, input.as_bytes(), &s),
            Err(AuthError::BadSignature)
        );
        // Through the full verifier the A.4 token fails only for lack of a kid.
        let mut ks = KeySet::new();
        ks.insert("rfc", vk).unwrap();
        let v = Verifier::new(ks, VerifyPolicy::default());
        assert_eq!(v.verify(RFC_A4, NOW).unwrap_err(), AuthError::MissingKid);
    }

    #[test]
    fn accepts_valid_token() {
        let mut c = claims();
        c.jti = Some("j-1".into());
        c.did = Some("dev".into());
        c.cip = Some("2001:db8::1".into());
        c.nbf = Some(NOW - 10);
        c.roles = vec![
            "subscriber".into(),
            "publisher".into(),
            "wizard".into(),
            "subscriber".into(),
        ];
        c.symbols = vec!["BTC-*".into(), "ETH-USD".into(), "*".into()];
        let v = verifier().verify(&sign_token(&sk(2), "k2", &c), NOW).unwrap();
        assert_eq!(v.sub, "alice");
        assert_eq!(v.exp, NOW + 300);
        assert_eq!(v.iat, Some(NOW));
        assert_eq!(v.nbf, Some(NOW - 10));
        assert_eq!(v.jti.as_deref(), Some("j-1"));
        assert_eq!(v.sid.as_deref(), Some("s-1"));
        assert_eq!(v.did.as_deref(), Some("dev"));
        assert_eq!(v.cip, Some("2001:db8::1".parse().unwrap()));
        assert_eq!(v.roles, vec![Role::Subscriber, Role::Publisher]);
        assert!(v.has_role(Role::Publisher) && !v.has_role(Role::Admin));
        assert_eq!(v.symbols, vec!["BTC-*", "ETH-USD", "*"]);
        assert_eq!(v.kid, "k2");
    }

    #[test]
    fn alg_none_rejected() {
        let p = B64.encode(payload(""));
        let hn = B64.encode(r#"{"alg":"none","kid":"k1"}"#);
        assert_eq!(err(&format!("{hn}.{p}.")), AuthError::BadAlg);
        assert_eq!(err(&format!("{hn}.{p}")), AuthError::Malformed); // two parts
        let good = good();
        let sig = good.rsplit('.').next().unwrap();
        assert_eq!(err(&format!("{hn}.{p}.{sig}")), AuthError::BadAlg);
        assert_eq!(
            err(&raw(1, r#"{"alg":"None","kid":"k1"}"#, &payload(""))),
            AuthError::BadAlg
        );
        assert_eq!(err(&raw(1, r#"{"kid":"k1"}"#, &payload(""))), AuthError::BadAlg);
        assert_eq!(
            err(&raw(1, r#"{"alg":null,"kid":"k1"}"#, &payload(""))),
            AuthError::BadAlg
        );
        assert_eq!(
            err(&raw(1, r#"{"alg":["EdDSA"],"kid":"k1"}"#, &payload(""))),
            AuthError::BadAlg
        );
    }

    #[test]
    fn hs256_with_public_key_as_secret_rejected() {
        let pk = sk(1).verifying_key();
        let hk = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, pk.as_bytes());
        let input = format!(
            "{}.{}",
            B64.encode(r#"{"alg":"HS256","kid":"k1","typ":"JWT"}"#),
            B64.encode(payload(""))
        );
        let tag = ring::hmac::sign(&hk, input.as_bytes());
        let t = format!("{input}.{}", B64.encode(tag.as_ref()));
        assert_eq!(err(&t), AuthError::BadAlg);
        // Also with the SPKI DER as the "secret".
        let der = crate::auth::mint::verifying_key_to_spki_der(&pk);
        let hk = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &der);
        let tag = ring::hmac::sign(&hk, input.as_bytes());
        assert_eq!(
            err(&format!("{input}.{}", B64.encode(tag.as_ref()))),
            AuthError::BadAlg
        );
    }

    #[test]
    fn other_algs_rejected() {
        for alg in [
            "ES256", "RS256", "PS256", "HS512", "eddsa", "EDDSA", "Ed25519", "EdDSA ", " EdDSA", "ES256K",
        ] {
            let t = raw(1, &format!(r#"{{"alg":"{alg}","kid":"k1"}}"#), &payload(""));
            assert_eq!(err(&t), AuthError::BadAlg, "{alg}");
        }
    }

    #[test]
    fn escaped_alg_is_the_same_string() {
        // JSON string equality is after unescaping; "EdDS\u0041" is "EdDSA".
        let t = raw(1, r#"{"alg":"EdDS\u0041","kid":"k1"}"#, &payload(""));
        assert!(verifier().verify(&t, NOW).is_ok());
    }

    #[test]
    fn tampered_payload_and_header_rejected() {
        let t = good();
        let mut parts: Vec<String> = t.split('.').map(str::to_owned).collect();
        let mut other = claims();
        other.sub = "mallory".into();
        let forged = sign_token(&sk(1), "k1", &other);
        parts[1] = forged.split('.').nth(1).unwrap().to_owned();
        assert_eq!(err(&parts.join(".")), AuthError::BadSignature);

        let mut parts: Vec<String> = t.split('.').map(str::to_owned).collect();
        parts[0] = B64.encode(r#"{"alg":"EdDSA","kid":"k1"}"#); // typ dropped
        assert_eq!(err(&parts.join(".")), AuthError::BadSignature);

        // A single flipped bit of the signature.
        let mut b = t.into_bytes();
        let last = b.len() - 10;
        b[last] = if b[last] == b'A' { b'B' } else { b'A' };
        assert_eq!(err(&String::from_utf8(b).unwrap()), AuthError::BadSignature);
    }

    #[test]
    fn kid_handling() {
        // Wrong kid: signed by k1's key but names k2.
        assert_eq!(err(&sign_token(&sk(1), "k2", &claims())), AuthError::BadSignature);
        assert_eq!(err(&sign_token(&sk(1), "k9", &claims())), AuthError::UnknownKid);
        assert_eq!(
            err(&raw(1, r#"{"alg":"EdDSA"}"#, &payload(""))),
            AuthError::MissingKid
        );
        assert_eq!(
            err(&raw(1, r#"{"alg":"EdDSA","kid":7}"#, &payload(""))),
            AuthError::Malformed
        );
        // Same kid, another key (an attacker's key published under our kid elsewhere).
        assert_eq!(err(&sign_token(&sk(3), "k1", &claims())), AuthError::BadSignature);
        // A single-key set still requires kid (documented choice).
        let mut ks = KeySet::new();
        ks.insert("only", sk(1).verifying_key()).unwrap();
        let v = Verifier::new(ks, VerifyPolicy::default());
        assert_eq!(
            v.verify(&raw(1, r#"{"alg":"EdDSA"}"#, &payload("")), NOW)
                .unwrap_err(),
            AuthError::MissingKid
        );
        // Empty key set rejects everything.
        let v = Verifier::new(KeySet::new(), VerifyPolicy::default());
        assert_eq!(v.verify(&good(), NOW).unwrap_err(), AuthError::UnknownKid);
    }

    #[test]
    fn key_reload_swaps_set() {
        let mut v = verifier();
        assert!(v.verify(&good(), NOW).is_ok());
        let mut ks = KeySet::new();
        ks.insert("k3", sk(3).verifying_key()).unwrap();
        v.set_keys(ks);
        assert_eq!(v.verify(&good(), NOW).unwrap_err(), AuthError::UnknownKid);
        assert!(v.verify(&sign_token(&sk(3), "k3", &claims()), NOW).is_ok());
    }

    #[test]
    fn typ_and_crit() {
        for typ in ["JWT", "jwt", "Jwt"] {
            let t = raw(
                1,
                &format!(r#"{{"alg":"EdDSA","kid":"k1","typ":"{typ}"}}"#),
                &payload(""),
            );
            assert!(verifier().verify(&t, NOW).is_ok(), "{typ}");
        }
        for typ in ["JOSE", "at+jwt", "application/jwt", ""] {
            let t = raw(
                1,
                &format!(r#"{{"alg":"EdDSA","kid":"k1","typ":"{typ}"}}"#),
                &payload(""),
            );
            assert_eq!(err(&t), AuthError::BadType, "{typ}");
        }
        let t = raw(1, r#"{"alg":"EdDSA","kid":"k1","typ":null}"#, &payload(""));
        assert_eq!(err(&t), AuthError::BadType);
        let t = raw(1, r#"{"alg":"EdDSA","kid":"k1","typ":1}"#, &payload(""));
        assert_eq!(err(&t), AuthError::Malformed);
        let t = raw(
            1,
            r#"{"alg":"EdDSA","kid":"k1","typ":"JWT","typ":"JWT"}"#,
            &payload(""),
        );
        assert_eq!(err(&t), AuthError::Malformed);
        for crit in [r#"["exp"]"#, "[]", "null", r#""b64""#] {
            let t = raw(
                1,
                &format!(r#"{{"alg":"EdDSA","kid":"k1","crit":{crit}}}"#),
                &payload(""),
            );
            assert_eq!(err(&t), AuthError::Crit, "{crit}");
        }
        // Unknown header parameters are ignored; keys never come from the token.
        let t = raw(
            1,
            r#"{"alg":"EdDSA","kid":"k1","jku":"https://evil","x5u":"x","jwk":{"kty":"OKP"}}"#,
            &payload(""),
        );
        assert!(verifier().verify(&t, NOW).is_ok());
        // Header must be an object.
        assert_eq!(err(&raw(1, r#"["EdDSA"]"#, &payload(""))), AuthError::Malformed);
        assert_eq!(err(&raw(1, "", &payload(""))), AuthError::Malformed);
    }

    #[test]
    fn time_checks() {
        let v = verifier();
        let mk = |exp: u64, iat: Option<u64>, nbf: Option<u64>| {
            sign_token(
                &sk(1),
                "k1",
                &Claims {
                    sub: "a".into(),
                    exp,
                    iat,
                    nbf,
                    ..Claims::default()
                },
            )
        };
        // Expired beyond leeway vs within leeway.
        assert_eq!(
            v.verify(&mk(NOW - 30, Some(NOW - 100), None), NOW).unwrap_err(),
            AuthError::Expired
        );
        assert_eq!(
            v.verify(&mk(NOW - 31, Some(NOW - 100), None), NOW).unwrap_err(),
            AuthError::Expired
        );
        assert!(v.verify(&mk(NOW - 29, Some(NOW - 100), None), NOW).is_ok());
        assert!(v.verify(&mk(NOW, Some(NOW - 100), None), NOW).is_ok());
        // nbf
        assert!(v.verify(&mk(NOW + 100, None, Some(NOW + 30)), NOW).is_ok());
        assert_eq!(
            v.verify(&mk(NOW + 100, None, Some(NOW + 31)), NOW).unwrap_err(),
            AuthError::NotYetValid
        );
        // iat
        assert!(v.verify(&mk(NOW + 100, Some(NOW + 30), None), NOW).is_ok());
        assert_eq!(
            v.verify(&mk(NOW + 100, Some(NOW + 31), None), NOW).unwrap_err(),
            AuthError::IssuedInFuture
        );
        // Lifetime: exactly the max is fine, one more second is not, and leeway does not help.
        assert!(v.verify(&mk(NOW + 900, Some(NOW), None), NOW).is_ok());
        assert_eq!(
            v.verify(&mk(NOW + 901, Some(NOW), None), NOW).unwrap_err(),
            AuthError::TooLongLived
        );
        assert_eq!(
            v.verify(&mk(NOW + 20 + 901, Some(NOW + 20), None), NOW)
                .unwrap_err(),
            AuthError::TooLongLived
        );
        // Without iat: exp - now.
        assert!(v.verify(&mk(NOW + 900, None, None), NOW).is_ok());
        assert_eq!(
            v.verify(&mk(NOW + 901, None, None), NOW).unwrap_err(),
            AuthError::TooLongLived
        );
        assert_eq!(
            v.verify(&mk(u64::MAX, None, None), NOW).unwrap_err(),
            AuthError::TooLongLived
        );
        // iat after exp is nonsense.
        assert_eq!(
            v.verify(&mk(NOW + 10, Some(NOW + 20), None), NOW).unwrap_err(),
            AuthError::BadClaims
        );
        // Overflow-prone values do not panic.
        assert_eq!(
            v.verify(&mk(u64::MAX, Some(0), Some(0)), u64::MAX - 100)
                .unwrap_err(),
            AuthError::TooLongLived
        );
        assert_eq!(
            v.verify(&mk(0, None, None), u64::MAX).unwrap_err(),
            AuthError::Expired
        );
        assert_eq!(
            v.verify(&mk(u64::MAX, Some(0), Some(0)), u64::MAX).unwrap_err(),
            AuthError::Expired
        );
    }

    #[test]
    fn issuer_and_audience() {
        let v = verifier_with(VerifyPolicy {
            issuer: Some("https://auth.example.com".into()),
            audience: Some("tickgate".into()),
            ..VerifyPolicy::default()
        });
        let t = |extra: &str| raw(1, h(), &payload(extra));
        assert!(
            v.verify(&t(r#","iss":"https://auth.example.com","aud":"tickgate""#), NOW)
                .is_ok()
        );
        assert!(
            v.verify(
                &t(r#","iss":"https://auth.example.com","aud":["x","tickgate"]"#),
                NOW
            )
            .is_ok()
        );
        assert_eq!(
            v.verify(&t(r#","iss":"https://evil.example.com","aud":"tickgate""#), NOW)
                .unwrap_err(),
            AuthError::BadIssuer
        );
        assert_eq!(
            v.verify(&t(r#","aud":"tickgate""#), NOW).unwrap_err(),
            AuthError::BadIssuer
        );
        assert_eq!(
            v.verify(&t(r#","iss":"https://auth.example.com","aud":"tickgate2""#), NOW)
                .unwrap_err(),
            AuthError::BadAudience
        );
        assert_eq!(
            v.verify(&t(r#","iss":"https://auth.example.com","aud":["x","y"]"#), NOW)
                .unwrap_err(),
            AuthError::BadAudience
        );
        assert_eq!(
            v.verify(&t(r#","iss":"https://auth.example.com","aud":[]"#), NOW)
                .unwrap_err(),
            AuthError::BadAudience
        );
        assert_eq!(
            v.verify(&t(r#","iss":"https://auth.example.com""#), NOW)
                .unwrap_err(),
            AuthError::BadAudience
        );
        assert_eq!(
            v.verify(&t(r#","iss":"https://auth.example.com","aud":"TICKGATE""#), NOW)
                .unwrap_err(),
            AuthError::BadAudience
        );
        assert_eq!(
            v.verify(&t(r#","iss":"https://auth.example.com","aud":7"#), NOW)
                .unwrap_err(),
            AuthError::BadClaims
        );
        assert_eq!(
            v.verify(
                &t(r#","iss":"https://auth.example.com","aud":["tickgate",7]"#),
                NOW
            )
            .unwrap_err(),
            AuthError::BadClaims
        );
        // Unconfigured: iss/aud not required but still typed.
        assert!(
            verifier()
                .verify(&t(r#","iss":"anyone","aud":["a"]"#), NOW)
                .is_ok()
        );
        assert_eq!(err(&t(r#","iss":5"#)), AuthError::BadClaims);
    }

    #[test]
    fn claim_shapes() {
        let t = |p: &str| raw(1, h(), p);
        let e = NOW + 300;
        assert_eq!(err(&t(&format!(r#"{{"exp":{e}}}"#))), AuthError::MissingSub);
        assert_eq!(
            err(&t(&format!(r#"{{"sub":"","exp":{e}}}"#))),
            AuthError::MissingSub
        );
        assert_eq!(
            err(&t(&format!(r#"{{"sub":null,"exp":{e}}}"#))),
            AuthError::MissingSub
        );
        assert_eq!(
            err(&t(&format!(r#"{{"sub":7,"exp":{e}}}"#))),
            AuthError::BadClaims
        );
        assert_eq!(
            err(&t(&format!(r#"{{"sub":"{}","exp":{e}}}"#, "a".repeat(257)))),
            AuthError::BadClaims
        );
        assert!(
            verifier()
                .verify(&t(&format!(r#"{{"sub":"{}","exp":{e}}}"#, "a".repeat(256))), NOW)
                .is_ok()
        );
        assert_eq!(err(&t(r#"{"sub":"a"}"#)), AuthError::MissingExp);
        assert_eq!(
            err(&t(&format!(r#"{{"sub":"a","exp":{e}.0}}"#))),
            AuthError::BadClaims
        );
        assert_eq!(
            err(&t(&format!(r#"{{"sub":"a","exp":{e}.5}}"#))),
            AuthError::BadClaims
        );
        assert_eq!(err(&t(r#"{"sub":"a","exp":1.7e9}"#)), AuthError::BadClaims);
        assert_eq!(
            err(&t(&format!(r#"{{"sub":"a","exp":"{e}"}}"#))),
            AuthError::BadClaims
        );
        assert_eq!(err(&t(r#"{"sub":"a","exp":-1}"#)), AuthError::BadClaims);
        assert_eq!(
            err(&t(r#"{"sub":"a","exp":99999999999999999999999}"#)),
            AuthError::BadClaims
        );
        assert_eq!(
            err(&t(&format!(r#"{{"sub":"a","exp":{e},"iat":{NOW}.0}}"#))),
            AuthError::BadClaims
        );
        assert_eq!(
            err(&t(&format!(r#"{{"sub":"a","exp":{e},"nbf":1.5}}"#))),
            AuthError::BadClaims
        );
        // roles
        assert_eq!(
            err(&t(&format!(r#"{{"sub":"a","exp":{e},"roles":"admin"}}"#))),
            AuthError::BadClaims
        );
        assert_eq!(
            err(&t(&format!(r#"{{"sub":"a","exp":{e},"roles":["admin",1]}}"#))),
            AuthError::BadClaims
        );
        let v = verifier()
            .verify(
                &t(&format!(
                    r#"{{"sub":"a","exp":{e},"roles":["Admin","root","admin"]}}"#
                )),
                NOW,
            )
            .unwrap();
        assert_eq!(v.roles, vec![Role::Admin]);
        // symbols
        assert_eq!(
            err(&t(&format!(r#"{{"sub":"a","exp":{e},"symbols":"BTC-USD"}}"#))),
            AuthError::BadClaims
        );
        assert_eq!(
            err(&t(&format!(r#"{{"sub":"a","exp":{e},"symbols":[null]}}"#))),
            AuthError::BadClaims
        );
        let long = format!(r#"{{"sub":"a","exp":{e},"symbols":["{}"]}}"#, "A".repeat(65));
        assert_eq!(err(&t(&long)), AuthError::BadClaims);
        let many: Vec<String> = (0..1025).map(|i| format!("\"{i}\"")).collect();
        let big = VerifyPolicy {
            max_token_bytes: 64 * 1024,
            ..VerifyPolicy::default()
        };
        let p = format!(r#"{{"sub":"a","exp":{e},"symbols":[{}]}}"#, many.join(","));
        assert_eq!(
            verifier_with(big.clone()).verify(&t(&p), NOW).unwrap_err(),
            AuthError::BadClaims
        );
        let p = format!(
            r#"{{"sub":"a","exp":{e},"symbols":[{}]}}"#,
            many[..1024].join(",")
        );
        assert_eq!(
            verifier_with(big).verify(&t(&p), NOW).unwrap().symbols.len(),
            1024
        );
        // cip
        assert_eq!(
            err(&t(&format!(r#"{{"sub":"a","exp":{e},"cip":"1.2.3"}}"#))),
            AuthError::BadClaims
        );
        assert_eq!(
            err(&t(&format!(r#"{{"sub":"a","exp":{e},"cip":"1.2.3.4:80"}}"#))),
            AuthError::BadClaims
        );
        assert_eq!(
            err(&t(&format!(r#"{{"sub":"a","exp":{e},"cip":16909060}}"#))),
            AuthError::BadClaims
        );
        assert!(
            verifier()
                .verify(&t(&format!(r#"{{"sub":"a","exp":{e},"cip":"1.2.3.4"}}"#)), NOW)
                .is_ok()
        );
        // Other ids: typed and bounded.
        assert_eq!(
            err(&t(&format!(r#"{{"sub":"a","exp":{e},"sid":5}}"#))),
            AuthError::BadClaims
        );
        assert_eq!(
            err(&t(&format!(
                r#"{{"sub":"a","exp":{e},"jti":"{}"}}"#,
                "j".repeat(257)
            ))),
            AuthError::BadClaims
        );
        // Payload must be a JSON object, nothing after it.
        assert_eq!(err(&t("[]")), AuthError::BadClaims);
        assert_eq!(err(&t("")), AuthError::BadClaims);
        assert_eq!(
            err(&t(&format!(r#"{{"sub":"a","exp":{e}}} x"#))),
            AuthError::BadClaims
        );
        assert_eq!(
            err(&t(&format!("\u{feff}{{\"sub\":\"a\",\"exp\":{e}}}"))),
            AuthError::BadClaims
        );
        // Unknown claims are ignored, whatever their shape.
        assert!(
            verifier()
                .verify(
                    &t(&format!(r#"{{"sub":"a","exp":{e},"x":{{"y":[1,2.5,null]}}}}"#)),
                    NOW
                )
                .is_ok()
        );
    }

    #[test]
    fn invalid_utf8_payload_rejected() {
        let mut p = payload("").into_bytes();
        p[9] = 0xff; // inside "alice"
        let t = sign_jws(&sk(1), h().as_bytes(), &p);
        assert_eq!(err(&t), AuthError::BadClaims);
    }

    #[test]
    fn duplicate_members_rejected() {
        let e = NOW + 300;
        // Payload: duplicate known claim -> BadClaims (no first/last-wins ambiguity).
        let t = raw(1, h(), &format!(r#"{{"sub":"alice","sub":"admin","exp":{e}}}"#));
        assert_eq!(err(&t), AuthError::BadClaims);
        let t = raw(
            1,
            h(),
            &format!(r#"{{"sub":"a","exp":{e},"roles":[],"roles":["admin"]}}"#),
        );
        assert_eq!(err(&t), AuthError::BadClaims);
        // Duplicate unknown claims are ignored.
        let t = raw(1, h(), &format!(r#"{{"sub":"a","exp":{e},"x":1,"x":2}}"#));
        assert!(verifier().verify(&t, NOW).is_ok());
        // Header: duplicate alg/kid -> Malformed.
        let t = raw(1, r#"{"alg":"none","alg":"EdDSA","kid":"k1"}"#, &payload(""));
        assert_eq!(err(&t), AuthError::Malformed);
        let t = raw(1, r#"{"alg":"EdDSA","kid":"k1","kid":"k2"}"#, &payload(""));
        assert_eq!(err(&t), AuthError::Malformed);
    }

    #[test]
    fn base64_strictness() {
        let t = good();
        let parts: Vec<&str> = t.split('.').collect();
        // Padding '=' in each part. Header/signature fail decoding; for the payload we
        // re-sign over the padded input so that only the base64 rule can reject it.
        assert_eq!(
            err(&format!("{}=.{}.{}", parts[0], parts[1], parts[2])),
            AuthError::Malformed
        );
        assert_eq!(
            err(&format!("{}.{}.{}=", parts[0], parts[1], parts[2])),
            AuthError::Malformed
        );
        assert_eq!(
            err(&format!("{}.{}.{}==", parts[0], parts[1], parts[2])),
            AuthError::Malformed
        );
        let padded = {
            // Choose a payload whose encoding needs padding (length not a multiple of 3).
            let mut p = payload("");
            while p.len().is_multiple_of(3) {
                p.insert(1, ' ');
            }
            let input = format!("{}.{}=", parts[0], B64.encode(&p));
            let sig = sk(1).sign(input.as_bytes());
            format!("{input}.{}", B64.encode(sig.to_bytes()))
        };
        assert_eq!(err(&padded), AuthError::Malformed);
        // Standard-alphabet characters and junk.
        for bad in ["+", "/", " ", "\n", "*", "é"] {
            let t2 = format!("{}{bad}.{}.{}", parts[0], parts[1], parts[2]);
            assert_eq!(err(&t2), AuthError::Malformed, "{bad:?}");
        }
        let mut sig = parts[2].to_string();
        sig.replace_range(0..1, "+");
        assert_eq!(
            err(&format!("{}.{}.{sig}", parts[0], parts[1])),
            AuthError::Malformed
        );
        // Non-canonical trailing bits: the last char of an 86-char signature carries 2
        // bits of padding; 'B' sets one of them where 'A' would not.
        let sig = parts[2];
        let last = sig.chars().last().unwrap();
        let idx = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
            .find(last)
            .unwrap();
        assert_eq!(idx & 0b1111, 0, "canonical encoding has zero trailing bits");
        let noncanon =
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_".as_bytes()[idx | 1] as char;
        let sig2 = format!("{}{noncanon}", &sig[..sig.len() - 1]);
        assert_eq!(
            err(&format!("{}.{}.{sig2}", parts[0], parts[1])),
            AuthError::Malformed
        );
        // Wrong signature length (valid base64) and empty signature.
        assert_eq!(
            err(&format!("{}.{}.{}", parts[0], parts[1], &sig[..84])),
            AuthError::BadSignature
        );
        assert_eq!(
            err(&format!("{}.{}.", parts[0], parts[1])),
            AuthError::BadSignature
        );
        assert_eq!(
            err(&format!("{}.{}.{sig}AAAA", parts[0], parts[1])),
            AuthError::BadSignature
        );
    }

    #[test]
    fn part_counts() {
        let t = good();
        assert_eq!(err(&format!("{t}.")), AuthError::Malformed);
        assert_eq!(err(&format!("{t}.AAAA")), AuthError::Malformed);
        let two: Vec<&str> = t.split('.').take(2).collect();
        assert_eq!(err(&two.join(".")), AuthError::Malformed);
        assert_eq!(err(""), AuthError::Malformed);
        assert_eq!(err("."), AuthError::Malformed);
        assert_eq!(err(".."), AuthError::Malformed);
        assert_eq!(err("abc"), AuthError::Malformed);
        // JWE-shaped (5 parts).
        assert_eq!(err("a.b.c.d.e"), AuthError::Malformed);
    }

    #[test]
    fn size_bounds() {
        let pad = "x".repeat(9000);
        let t = raw(1, h(), &payload(&format!(r#","pad":"{pad}""#)));
        assert_eq!(err(&t), AuthError::TooLarge);
        assert_eq!(err(&"A".repeat(8193)), AuthError::TooLarge);
        // Exactly at the bound is not TooLarge.
        assert_eq!(err(&"A".repeat(8192)), AuthError::Malformed);
        // Oversized header within the token bound.
        let hdr = format!(r#"{{"alg":"EdDSA","kid":"k1","x":"{}"}}"#, "y".repeat(800));
        assert_eq!(err(&raw(1, &hdr, &payload(""))), AuthError::TooLarge);
    }

    #[test]
    fn deep_nesting_is_bounded_and_never_overflows() {
        // Over the header bound: TooLarge before any parsing.
        let deep = format!(
            r#"{{"alg":"EdDSA","kid":"k1","x":{}{}}}"#,
            "[".repeat(500),
            "]".repeat(500)
        );
        assert_eq!(err(&raw(1, &deep, &payload(""))), AuthError::TooLarge);
        // Nesting inside `alg` goes through serde_json's recursive Value parser, which
        // stops at its recursion limit (128) with an error, not a stack overflow.
        let deep = format!(r#"{{"alg":{}{},"kid":"k1"}}"#, "[".repeat(300), "]".repeat(300));
        assert_eq!(err(&raw(1, &deep, &payload(""))), AuthError::Malformed);
        // Nesting inside an ignored member is skipped by serde_json's iterative skipper
        // (no recursion), so it is harmless and the member is simply ignored.
        let deep = format!(
            r#"{{"alg":"EdDSA","kid":"k1","x":{}{}}}"#,
            "[".repeat(300),
            "]".repeat(300)
        );
        assert!(verifier().verify(&raw(1, &deep, &payload("")), NOW).is_ok());
        let big = VerifyPolicy {
            max_token_bytes: 1 << 20,
            ..VerifyPolicy::default()
        };
        let p = payload(&format!(r#","x":{}{}"#, "[".repeat(50_000), "]".repeat(50_000)));
        assert!(verifier_with(big.clone()).verify(&raw(1, h(), &p), NOW).is_ok());
        // Unbalanced deep nesting is an error, also without recursion.
        let p = payload(&format!(r#","x":{}"#, "[".repeat(50_000)));
        assert_eq!(
            verifier_with(big.clone())
                .verify(&raw(1, h(), &p), NOW)
                .unwrap_err(),
            AuthError::BadClaims
        );
        // Nesting inside a claim we read is a type error at the first level.
        let e = NOW + 300;
        let p = format!(
            r#"{{"sub":"a","exp":{e},"roles":{}{}}}"#,
            "[".repeat(50_000),
            "]".repeat(50_000)
        );
        assert_eq!(
            verifier_with(big.clone())
                .verify(&raw(1, h(), &p), NOW)
                .unwrap_err(),
            AuthError::BadClaims
        );
        let p = format!(
            r#"{{"sub":"a","exp":{e},"aud":{}{}}}"#,
            "[".repeat(50_000),
            "]".repeat(50_000)
        );
        assert_eq!(
            verifier_with(big).verify(&raw(1, h(), &p), NOW).unwrap_err(),
            AuthError::BadClaims
        );
    }

    #[test]
    fn reasons_are_snake_case_and_distinct() {
        let all = [
            AuthError::Malformed,
            AuthError::TooLarge,
            AuthError::BadAlg,
            AuthError::Crit,
            AuthError::MissingKid,
            AuthError::UnknownKid,
            AuthError::BadType,
            AuthError::BadSignature,
            AuthError::Expired,
            AuthError::NotYetValid,
            AuthError::IssuedInFuture,
            AuthError::TooLongLived,
            AuthError::BadIssuer,
            AuthError::BadAudience,
            AuthError::MissingSub,
            AuthError::MissingExp,
            AuthError::BadClaims,
        ];
        let mut seen = std::collections::HashSet::new();
        for e in all {
            let r = e.reason();
            assert!(r.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'), "{r}");
            assert!(seen.insert(r), "{r}");
        }
        assert_eq!(AuthError::Expired.reason(), "expired");
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn b64url() -> impl Strategy<Value = String> {
            proptest::string::string_regex("[A-Za-z0-9_=+/-]{0,200}").unwrap()
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]
            #[test]
            fn never_panics_on_any_string(s in ".{0,400}") {
                let _ = verifier().verify(&s, NOW);
            }

            #[test]
            fn never_panics_on_three_parts(a in b64url(), b in b64url(), c in b64url()) {
                let _ = verifier().verify(&format!("{a}.{b}.{c}"), NOW);
            }

            #[test]
            fn never_panics_on_encoded_json(hdr in ".{0,100}", body in ".{0,200}", c in b64url()) {
                let t = format!("{}.{}.{c}", B64.encode(&hdr), B64.encode(&body));
                let _ = verifier().verify(&t, NOW);
                // And with a real signature so the claims parser runs.
                let _ = verifier().verify(&raw(1, h(), &body), NOW);
                let _ = verifier().verify(&raw(1, &hdr, &body), NOW);
            }

            #[test]
            fn valid_tokens_roundtrip(sub in "[a-z]{1,20}", ttl in 1u64..900, skew in 0u64..30) {
                let c = Claims { sub: sub.clone(), exp: NOW + ttl, iat: Some(NOW + skew), ..Claims::default() };
                let t = sign_token(&sk(1), "k1", &c);
                if ttl >= skew {
                    prop_assert_eq!(verifier().verify(&t, NOW).unwrap().sub, sub);
                }
            }
        }
    }
}
