//! The client address the rate limiter and IP binding key on.
//!
//! Forwarding headers are attacker-controlled unless a proxy we trust wrote them, and a
//! proxy only ever *appends* the address it saw. So the chain is walked from the right
//! (the hop closest to us) past trusted proxies, and the first untrusted address is the
//! client; whatever lies further left was written by that client and is never parsed.
//! Garbage in that part therefore cannot push the result back onto the proxy's address,
//! which would let one client exhaust the rate limit shared by everyone behind the proxy.
//! If the walk itself meets something unparsable, we fall back to the socket peer.

use std::net::{IpAddr, SocketAddr};

use super::Request;

/// Longest trusted chain we follow; real deployments have one to three hops.
const MAX_HOPS: usize = 32;

/// Client IP: the socket peer, unless the peer is trusted (the callback says so), in which
/// case the right-most untrusted address of `X-Forwarded-For` (all lines, comma lists) is
/// used, or `Forwarded: for=` (RFC 7239, quoted IPv6 with brackets and optional port) when
/// XFF is absent; malformed headers fall back to the peer. When every hop is trusted the
/// left-most one is the client. IPv4-mapped IPv6 addresses are returned as IPv4.
pub fn client_ip(req: &Request, peer: IpAddr, is_trusted: impl Fn(IpAddr) -> bool) -> IpAddr {
    let peer = peer.to_canonical();
    if !is_trusted(peer) {
        return peer;
    }
    let xff: Vec<&str> = req
        .headers_all("x-forwarded-for")
        .flat_map(|v| v.split(','))
        .collect();
    let hops: Vec<&str> = if xff.is_empty() {
        match forwarded_for(req) {
            Some(f) => f,
            None => return peer,
        }
    } else {
        xff
    };
    walk(&hops, &is_trusted).unwrap_or(peer)
}

/// Right-to-left over the hops: the first untrusted address, or the left-most if all are
/// trusted. `None` when a hop we had to read is malformed or the chain is too long.
fn walk(hops: &[&str], is_trusted: &impl Fn(IpAddr) -> bool) -> Option<IpAddr> {
    let mut last = None;
    for (i, hop) in hops.iter().rev().enumerate() {
        if i == MAX_HOPS {
            return None;
        }
        let ip = parse_node(hop.trim_matches([' ', '\t']))?.to_canonical();
        if !is_trusted(ip) {
            return Some(ip);
        }
        last = Some(ip);
    }
    last
}

/// The `for=` values of every `Forwarded` element, in order. Elements without `for` are
/// skipped; `None` if no element has one. An element naming `for` twice yields an empty
/// entry, which `walk` treats as malformed if it gets that far.
fn forwarded_for(req: &Request) -> Option<Vec<&str>> {
    let mut out = Vec::new();
    for element in req.headers_all("forwarded").flat_map(|v| v.split(',')) {
        let mut found: Option<&str> = None;
        let mut repeated = false;
        for pair in element.split(';') {
            let Some((name, value)) = pair.split_once('=') else {
                continue;
            };
            if name.trim_matches([' ', '\t']).eq_ignore_ascii_case("for") {
                repeated |= found.is_some();
                found = Some(value);
            }
        }
        match (found, repeated) {
            (Some(_), true) => out.push(""),
            (Some(v), false) => out.push(v),
            (None, _) => {}
        }
    }
    (!out.is_empty()).then_some(out)
}

/// One hop: `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1`, `[2001:db8::1]`, `[2001:db8::1]:80`,
/// optionally in double quotes (RFC 7239 requires them around brackets and ports).
/// `unknown` and obfuscated identifiers carry no address and count as malformed.
fn parse_node(s: &str) -> Option<IpAddr> {
    let s = match s.strip_prefix('"') {
        Some(inner) => inner.strip_suffix('"')?,
        None => s,
    };
    if s.contains(['"', '\\']) {
        return None;
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Some(rest) = s.strip_prefix('[') {
        if let Some(inner) = rest.strip_suffix(']') {
            return inner.parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6);
        }
        // `[v6]:port`
        return s.parse::<SocketAddr>().ok().map(|a| a.ip());
    }
    // `v4:port`; a bare v6 with a port must be bracketed, and SocketAddr enforces that.
    s.parse::<SocketAddr>().ok().map(|a| a.ip())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::http::{RequestLimits, try_parse};
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn req(headers: &str) -> Request {
        let raw = format!("GET / HTTP/1.1\r\nHost: x\r\n{headers}\r\n");
        try_parse(raw.as_bytes(), &RequestLimits::default())
            .unwrap()
            .unwrap()
            .1
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// 10.0.0.0/8 and fd00::/8 are our proxies.
    fn trusted(a: IpAddr) -> bool {
        match a {
            IpAddr::V4(v4) => v4.octets()[0] == 10,
            IpAddr::V6(v6) => v6.octets()[0] == 0xfd,
        }
    }

    const PROXY: &str = "10.0.0.1";

    #[test]
    fn untrusted_peer_spoofed_headers_ignored() {
        let r = req("X-Forwarded-For: 1.1.1.1\r\nForwarded: for=2.2.2.2\r\n");
        assert_eq!(client_ip(&r, ip("9.9.9.9"), trusted), ip("9.9.9.9"));
    }

    #[test]
    fn trusted_peer_without_headers() {
        assert_eq!(client_ip(&req(""), ip(PROXY), trusted), ip(PROXY));
    }

    #[test]
    fn xff_single_and_chain() {
        let r = req("X-Forwarded-For: 203.0.113.7\r\n");
        assert_eq!(client_ip(&r, ip(PROXY), trusted), ip("203.0.113.7"));
        // client -> proxy 10.0.0.2 -> proxy 10.0.0.1 -> us
        let r = req("X-Forwarded-For: 203.0.113.7, 10.0.0.2\r\n");
        assert_eq!(client_ip(&r, ip(PROXY), trusted), ip("203.0.113.7"));
        // Multiple header lines form one list, in order.
        let r = req("X-Forwarded-For: 203.0.113.7\r\nX-Forwarded-For: 10.0.0.3, 10.0.0.2\r\n");
        assert_eq!(client_ip(&r, ip(PROXY), trusted), ip("203.0.113.7"));
    }

    #[test]
    fn xff_spoofed_prefix_is_ignored() {
        // The client sent `X-Forwarded-For: 6.6.6.6, junk`; our proxy appended its real address.
        let r = req("X-Forwarded-For: 6.6.6.6, not-an-ip, 198.51.100.9, 10.0.0.2\r\n");
        assert_eq!(client_ip(&r, ip(PROXY), trusted), ip("198.51.100.9"));
        // A client claiming to be a trusted proxy only moves the answer to itself.
        let r = req("X-Forwarded-For: 10.9.9.9, 198.51.100.9\r\n");
        assert_eq!(client_ip(&r, ip(PROXY), trusted), ip("198.51.100.9"));
    }

    #[test]
    fn xff_all_trusted_gives_leftmost() {
        let r = req("X-Forwarded-For: 10.0.0.5, 10.0.0.4\r\n");
        assert_eq!(client_ip(&r, ip(PROXY), trusted), ip("10.0.0.5"));
    }

    #[test]
    fn xff_malformed_falls_back_to_peer() {
        for v in [
            "junk",
            "1.2.3.4, ",
            "",
            "1.2.3.4,,10.0.0.2",
            "unknown",
            "1.2.3.4:99999",
            "[::1",
        ] {
            let r = req(&format!("X-Forwarded-For: {v}\r\n"));
            assert_eq!(client_ip(&r, ip(PROXY), trusted), ip(PROXY), "{v:?}");
        }
    }

    #[test]
    fn xff_with_ports_and_v6() {
        let r = req("X-Forwarded-For: 203.0.113.7:5555\r\n");
        assert_eq!(client_ip(&r, ip(PROXY), trusted), ip("203.0.113.7"));
        let r = req("X-Forwarded-For: 2001:db8::7, fd00::2\r\n");
        assert_eq!(client_ip(&r, ip("fd00::1"), trusted), ip("2001:db8::7"));
        let r = req("X-Forwarded-For: [2001:db8::7]:443\r\n");
        assert_eq!(client_ip(&r, ip(PROXY), trusted), ip("2001:db8::7"));
    }

    #[test]
    fn xff_takes_precedence_over_forwarded() {
        let r = req("Forwarded: for=192.0.2.1\r\nX-Forwarded-For: 203.0.113.7\r\n");
        assert_eq!(client_ip(&r, ip(PROXY), trusted), ip("203.0.113.7"));
    }

    #[test]
    fn forwarded_rfc7239_forms() {
        let cases = [
            ("for=192.0.2.60;proto=http;by=203.0.113.43", "192.0.2.60"),
            ("For=\"[2001:db8:cafe::17]:4711\"", "2001:db8:cafe::17"),
            ("for=\"[2001:db8:cafe::17]\"", "2001:db8:cafe::17"),
            ("for=\"192.0.2.43:47011\"", "192.0.2.43"),
            ("for=192.0.2.43, for=198.51.100.17", "198.51.100.17"),
            ("for=192.0.2.43, for=10.0.0.9", "192.0.2.43"),
            ("proto=https;for=192.0.2.43 , by=10.0.0.1", "192.0.2.43"),
            ("for = 192.0.2.43", "192.0.2.43"),
        ];
        for (h, want) in cases {
            let r = req(&format!("Forwarded: {h}\r\n"));
            assert_eq!(client_ip(&r, ip(PROXY), trusted), ip(want), "{h}");
        }
        let r = req("Forwarded: for=192.0.2.43\r\nForwarded: for=\"[fd00::3]:1\"\r\n");
        assert_eq!(client_ip(&r, ip("fd00::1"), trusted), ip("192.0.2.43"));
    }

    #[test]
    fn forwarded_malformed_falls_back_to_peer() {
        for h in [
            "for=unknown",
            "for=_hidden",
            "for=\"[2001:db8::1]",
            "for=[2001:db8::1]x",
            "for=\"a\\\"b\"",
            "for=1.2.3.4;for=5.6.7.8",
            "proto=https",
            "for=",
        ] {
            let r = req(&format!("Forwarded: {h}\r\n"));
            assert_eq!(client_ip(&r, ip(PROXY), trusted), ip(PROXY), "{h}");
        }
    }

    #[test]
    fn mapped_addresses_are_canonical() {
        let mapped = IpAddr::V6(Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped());
        let r = req("X-Forwarded-For: ::ffff:203.0.113.7\r\n");
        assert_eq!(client_ip(&r, mapped, trusted), ip("203.0.113.7"));
        let untrusted = IpAddr::V6(Ipv4Addr::new(9, 9, 9, 9).to_ipv6_mapped());
        assert_eq!(client_ip(&r, untrusted, trusted), ip("9.9.9.9"));
    }

    #[test]
    fn long_trusted_chains_are_bounded() {
        let chain: Vec<String> = (0..40).map(|i| format!("10.0.1.{i}")).collect();
        let r = req(&format!("X-Forwarded-For: {}\r\n", chain.join(",")));
        assert_eq!(client_ip(&r, ip(PROXY), trusted), ip(PROXY));
        let r = req(&format!("X-Forwarded-For: 1.2.3.4,{}\r\n", chain[..31].join(",")));
        assert_eq!(client_ip(&r, ip(PROXY), trusted), ip("1.2.3.4"));
    }

    proptest! {
        #[test]
        fn untrusted_peer_always_wins(xff in "[ -~]{0,64}", fwd in "[ -~]{0,64}", a in any::<u32>()) {
            let peer = IpAddr::V4(Ipv4Addr::from(a | 0x0100_0000));
            prop_assume!(!trusted(peer));
            let r = req(&format!("X-Forwarded-For: {xff}\r\nForwarded: {fwd}\r\n"));
            prop_assert_eq!(client_ip(&r, peer, trusted), peer);
        }

        #[test]
        fn appended_address_is_found(prefix in "[ -+--~]{0,40}", a in any::<u32>(), proxies in 0usize..4) {
            // Whatever the client wrote (no commas in `prefix`), an untrusted address appended
            // by a trusted proxy is the answer.
            let client = Ipv4Addr::from(a);
            prop_assume!(!trusted(IpAddr::V4(client)));
            let mut chain = vec![prefix, client.to_string()];
            chain.extend((0..proxies).map(|i| format!("10.0.0.{}", i + 2)));
            let r = req(&format!("X-Forwarded-For: {}\r\n", chain.join(", ")));
            prop_assert_eq!(client_ip(&r, ip(PROXY), trusted), IpAddr::V4(client));
        }

        #[test]
        fn never_panics_on_v6(segs in proptest::array::uniform8(any::<u16>()), port in any::<u16>()) {
            let v6 = Ipv6Addr::from(segs);
            let r = req(&format!("Forwarded: for=\"[{v6}]:{port}\"\r\n"));
            let got = client_ip(&r, ip(PROXY), trusted);
            // Untrusted: it is the client. Trusted: the whole chain is, so the left-most wins.
            prop_assert_eq!(got, IpAddr::V6(v6).to_canonical());
        }
    }
}
