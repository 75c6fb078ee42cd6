//! Arbitrary bytes through the whole front door: parse (default and tiny limits), then the
//! upgrade checks, credential extraction, subprotocol selection and client IP; every
//! response must serialise. Also checks invariants the rest of the server relies on.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};

use libfuzzer_sys::fuzz_target;
use tickgate::proto::http::{
    Credential, RequestLimits, check_upgrade, client_ip, extract_credential, route, select_subprotocol,
    switching_protocols, try_parse,
};

fuzz_target!(|data: &[u8]| {
    let tiny = RequestLimits {
        max_head_bytes: 128,
        max_headers: 3,
        max_body_bytes: 8,
    };
    for limits in [RequestLimits::default(), tiny] {
        let (consumed, req) = match try_parse(data, &limits) {
            Ok(Some(done)) => done,
            Ok(None) => {
                assert!(data.len() < limits.max_head_bytes + limits.max_body_bytes + 4);
                continue;
            }
            Err(e) => {
                assert_eq!(e.status(), 400);
                let _ = e.response().to_bytes();
                continue;
            }
        };
        assert!(consumed <= data.len());
        assert!(req.body.len() <= limits.max_body_bytes);
        // A prefix of a complete request is never an error and never a different request.
        if consumed > 0 {
            assert!(matches!(try_parse(&data[..consumed - 1], &limits), Ok(None)));
        }
        let _ = route(&req.path);
        let peer = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        let _ = client_ip(
            &req,
            peer,
            |ip| matches!(ip, IpAddr::V4(v4) if v4.octets()[0] == 10),
        );
        match check_upgrade(&req) {
            Ok(up) => {
                assert_eq!(up.accept.len(), 28);
                for allow in [true, false] {
                    if let Credential::Bearer(t) | Credential::Ticket(t) =
                        extract_credential(&req, &up.offered_protocols, allow)
                    {
                        assert!(!t.is_empty());
                    }
                }
                if let Ok(p) = select_subprotocol(&up.offered_protocols) {
                    let out = switching_protocols(&up.accept, p, None);
                    assert!(!String::from_utf8_lossy(&out).contains("bearer."));
                }
            }
            Err(resp) => {
                assert!(matches!(resp.status, 400 | 405 | 426));
                let bytes = resp.to_bytes();
                assert_eq!(bytes.windows(4).filter(|w| w == b"\r\n\r\n").count(), 1);
            }
        }
        let _ = extract_credential(&req, &[], true);
    }
});
