//! The one base64url engine of the crate: tokens (`jwt`), JWKS keys and thumbprints
//! (`keys`) and minted tokens (`mint`) all use it. A leaf, so that `jwt` and `keys` need
//! not import each other for it.

use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};

/// Strict base64url without padding (RFC 7515 §2 "Base64url Encoding"): padding is
/// refused and trailing bits must be zero. Spelled out rather than relying on the
/// crate's `URL_SAFE_NO_PAD` defaults so the strictness is visible here.
pub(crate) const B64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::RequireNone)
        .with_decode_allow_trailing_bits(false),
);
