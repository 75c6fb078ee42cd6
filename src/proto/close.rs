//! WebSocket close codes (RFC 6455 section 7.4 and the IANA registry).
//!
//! Codes are plain `u16`s rather than an enum: peers may send any registered or private code
//! (3000-4999), and the gateway only needs to tell valid from invalid and name the ones it
//! sends itself. [`CloseCode`] is a namespace for the latter.

/// Close codes used by tickgate (see PROTOCOL.md, "Close codes").
pub struct CloseCode;

impl CloseCode {
    pub const NORMAL: u16 = 1000;
    /// Server draining / shutting down.
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL: u16 = 1002;
    /// Unsupported data type (a binary frame on the JSON text protocol).
    pub const UNSUPPORTED: u16 = 1003;
    /// Invalid UTF-8 (or, at the session layer, invalid JSON).
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const INTERNAL: u16 = 1011;
    pub const IDLE: u16 = 4000;
    /// Token expired or reauthentication failed.
    pub const TOKEN_EXPIRED: u16 = 4001;
    pub const REVOKED: u16 = 4003;
    pub const SLOW_CONSUMER: u16 = 4008;
    pub const MESSAGE_RATE: u16 = 4029;
}

/// Whether a peer may put `code` in a close frame.
///
/// 1004 is reserved, 1005/1006/1015 are reserved for local use and must never be sent,
/// 1016-2999 are unassigned protocol codes, 3000-3999 are registered with IANA and 4000-4999
/// are private; everything else is out of range.
pub fn is_valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validity_table() {
        for code in 0..=u16::MAX {
            let expected = match code {
                0..=999 => false,
                1000..=1003 => true,
                1004..=1006 => false,
                1007..=1014 => true,
                1015 => false,
                1016..=2999 => false,
                3000..=4999 => true,
                _ => false,
            };
            assert_eq!(is_valid_close_code(code), expected, "code {code}");
        }
    }

    #[test]
    fn our_codes_are_sendable() {
        for c in [
            CloseCode::NORMAL,
            CloseCode::GOING_AWAY,
            CloseCode::PROTOCOL,
            CloseCode::UNSUPPORTED,
            CloseCode::INVALID_PAYLOAD,
            CloseCode::POLICY,
            CloseCode::TOO_BIG,
            CloseCode::INTERNAL,
            CloseCode::IDLE,
            CloseCode::TOKEN_EXPIRED,
            CloseCode::REVOKED,
            CloseCode::SLOW_CONSUMER,
            CloseCode::MESSAGE_RATE,
        ] {
            assert!(is_valid_close_code(c), "{c}");
        }
    }
}
