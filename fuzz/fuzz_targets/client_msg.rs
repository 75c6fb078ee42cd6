#![no_main]
//! parse_client_msg on arbitrary bytes: must never panic, and whatever it accepts must
//! respect the limits; errors must encode to valid JSON.

use libfuzzer_sys::fuzz_target;
use tickgate::feed::msg::{ClientMsg, MsgLimits, encode_msg_error, parse_client_msg};

fuzz_target!(|data: &[u8]| {
    let limits = MsgLimits {
        max_symbols_per_message: 16,
        max_ticks_per_publish: 8,
        max_token_bytes: 64,
    };
    let mut text = data.to_vec();
    match parse_client_msg(&mut text, &limits) {
        Ok(ClientMsg::Subscribe { symbols, .. }) | Ok(ClientMsg::Unsubscribe { symbols, .. }) => {
            assert!(symbols.len() <= limits.max_symbols_per_message);
            assert!(symbols.iter().all(|s| s.len() <= 64));
        }
        Ok(ClientMsg::Reauth { token, .. }) => {
            assert!(!token.is_empty() && token.len() <= limits.max_token_bytes);
        }
        Ok(ClientMsg::Publish { ticks, .. }) => {
            assert!(ticks.len() <= limits.max_ticks_per_publish);
            for (s, t) in &ticks {
                assert!(s.len() <= 64);
                assert!(t.bid.is_finite() && t.ask.is_finite() && t.last.is_finite() && t.qty.is_finite());
            }
        }
        Ok(ClientMsg::Ping { .. }) => {}
        Err(e) => {
            let mut out = Vec::new();
            encode_msg_error(&e, &mut out);
            assert!(std::str::from_utf8(&out).is_ok());
        }
    }
});
