//! IP prefixes for `auth.trusted_proxies` (PROTOCOL.md section 2, check 2).
//!
//! Only a socket peer inside a trusted prefix may speak for the client through
//! `X-Forwarded-For` / `Forwarded`, so a too-wide prefix is a security bug. Parsing is
//! therefore strict: no whitespace, a prefix length in range with no sign or leading zeros,
//! and no host bits set (`10.0.0.1/8` is refused with a message suggesting `10.0.0.0/8`
//! instead of being silently widened; tools disagree on what it means, so we ask).
//!
//! A dual-stack listener reports IPv4 peers as IPv4-mapped IPv6 (`::ffff:a.b.c.d`). Such an
//! address matches IPv4 prefixes, and a plain IPv4 address matches an IPv6 prefix that
//! covers its mapped form, so the same proxy is recognised whichever socket family it
//! arrived on. IPv4-compatible addresses (`::a.b.c.d`, deprecated) are not treated as IPv4.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// Why a prefix did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("invalid IP address in {0:?}")]
    Address(String),
    #[error("invalid prefix length in {0:?} (0-32 for IPv4, 0-128 for IPv6)")]
    PrefixLength(String),
    #[error("host bits set in {given:?}: did you mean {suggest}?")]
    HostBits { given: String, suggest: String },
}

/// One IPv4 or IPv6 prefix. A bare address is a `/32` or `/128`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `ip` lies inside the prefix (see the module docs for mapped addresses).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => v4_match(net, ip, self.prefix),
            (IpAddr::V4(net), IpAddr::V6(ip)) => match ip.to_ipv4_mapped() {
                Some(ip) => v4_match(net, ip, self.prefix),
                None => false,
            },
            (IpAddr::V6(net), IpAddr::V6(ip)) => v6_match(net, ip, self.prefix),
            (IpAddr::V6(net), IpAddr::V4(ip)) => v6_match(net, ip.to_ipv6_mapped(), self.prefix),
        }
    }

    /// The network address (host bits zero).
    pub fn network(&self) -> IpAddr {
        self.net
    }

    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.prefix
    }
}

fn v4_mask(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn v6_mask(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

fn v4_match(net: Ipv4Addr, ip: Ipv4Addr, prefix: u8) -> bool {
    let m = v4_mask(prefix);
    u32::from(ip) & m == u32::from(net) & m
}

fn v6_match(net: Ipv6Addr, ip: Ipv6Addr, prefix: u8) -> bool {
    let m = v6_mask(prefix);
    u128::from(ip) & m == u128::from(net) & m
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        // Zone ids (`fe80::1%eth0`) are rejected by the std parser, as we want.
        let net: IpAddr = addr.parse().map_err(|_| CidrError::Address(s.to_string()))?;
        let max = if net.is_ipv4() { 32u8 } else { 128u8 };
        let prefix = match prefix {
            None => max,
            Some(p) => {
                let ok_syntax = !p.is_empty()
                    && p.len() <= 3
                    && p.bytes().all(|b| b.is_ascii_digit())
                    && (p == "0" || !p.starts_with('0'));
                let n: u8 = if ok_syntax { p.parse().ok() } else { None }
                    .ok_or_else(|| CidrError::PrefixLength(s.to_string()))?;
                if n > max {
                    return Err(CidrError::PrefixLength(s.to_string()));
                }
                n
            }
        };
        let masked = match net {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) & v4_mask(prefix))),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) & v6_mask(prefix))),
        };
        if masked != net {
            return Err(CidrError::HostBits {
                given: s.to_string(),
                suggest: format!("{masked}/{prefix}"),
            });
        }
        Ok(Cidr { net, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

/// A list of prefixes, e.g. the trusted proxies. Immutable, so shards share it freely.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CidrSet(Vec<Cidr>);

impl CidrSet {
    /// Parses every item; the error names the first bad one.
    pub fn parse(items: &[String]) -> Result<Self, String> {
        items
            .iter()
            .map(|i| {
                i.parse::<Cidr>()
                    .map_err(|e| format!("auth.trusted_proxies: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(CidrSet)
    }

    /// Whether any prefix contains `ip`.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|c| c.contains(ip))
    }

    /// No prefixes: nobody is trusted.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The prefixes, in configuration order.
    pub fn iter(&self) -> impl Iterator<Item = &Cidr> {
        self.0.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn c(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn v4_prefixes() {
        let n = c("10.0.0.0/8");
        assert!(n.contains(ip("10.0.0.0")));
        assert!(n.contains(ip("10.255.255.255")));
        assert!(!n.contains(ip("11.0.0.0")));
        assert!(!n.contains(ip("9.255.255.255")));
        let n = c("192.168.1.0/24");
        assert!(n.contains(ip("192.168.1.77")));
        assert!(!n.contains(ip("192.168.2.1")));
        let all = c("0.0.0.0/0");
        assert!(all.contains(ip("1.2.3.4")));
        assert!(all.contains(ip("255.255.255.255")));
        assert!(!all.contains(ip("2001:db8::1")), "v4 /0 is not v6 /0");
        let host = c("203.0.113.7");
        assert_eq!(host.prefix_len(), 32);
        assert!(host.contains(ip("203.0.113.7")));
        assert!(!host.contains(ip("203.0.113.8")));
        assert_eq!(c("1.2.3.4/32").to_string(), "1.2.3.4/32");
    }

    #[test]
    fn v6_prefixes() {
        let lo = c("::1/128");
        assert!(lo.contains(ip("::1")));
        assert!(!lo.contains(ip("::2")));
        assert!(!lo.contains(ip("127.0.0.1")));
        let n = c("2001:db8::/32");
        assert!(n.contains(ip("2001:db8:ffff::1")));
        assert!(!n.contains(ip("2001:db9::1")));
        assert_eq!(c("::1").prefix_len(), 128);
        let all = c("::/0");
        assert!(all.contains(ip("2001:db8::1")));
        assert_eq!(c("2001:DB8::/32").to_string(), "2001:db8::/32");
        let odd = c("2001:db8:8000::/33");
        assert!(odd.contains(ip("2001:db8:8000::1")));
        assert!(!odd.contains(ip("2001:db8:7fff::1")));
    }

    #[test]
    fn mapped_addresses_match_across_families() {
        let v4 = c("10.0.0.0/8");
        assert!(v4.contains(ip("::ffff:10.1.2.3")));
        assert!(!v4.contains(ip("::ffff:11.1.2.3")));
        // IPv4-compatible is not mapped.
        assert!(!v4.contains(ip("::10.1.2.3")));
        let mapped_net = c("::ffff:10.0.0.0/104");
        assert!(mapped_net.contains(ip("10.9.9.9")));
        assert!(mapped_net.contains(ip("::ffff:10.9.9.9")));
        assert!(!mapped_net.contains(ip("11.0.0.1")));
        let lo = c("127.0.0.1");
        assert!(lo.contains(ip("::ffff:127.0.0.1")));
    }

    #[test]
    fn strict_parsing() {
        for bad in [
            "",
            "/8",
            "10.0.0.0/",
            "10.0.0.0/33",
            "10.0.0.0/-1",
            "10.0.0.0/+8",
            "10.0.0.0/08",
            "10.0.0.0/8/8",
            "10.0.0.0 /8",
            " 10.0.0.0/8",
            "10.0.0/8",
            "010.0.0.0/8",
            "::1/129",
            "fe80::1%eth0/64",
            "example.com/8",
            "10.0.0.0/1000",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad:?}");
        }
        assert_eq!(
            "10.0.0.1/8".parse::<Cidr>(),
            Err(CidrError::HostBits {
                given: "10.0.0.1/8".into(),
                suggest: "10.0.0.0/8".into()
            })
        );
        assert!("2001:db8::1/32".parse::<Cidr>().is_err());
        assert!("0.0.0.0/0".parse::<Cidr>().is_ok());
        assert!("::/0".parse::<Cidr>().is_ok());
    }

    #[test]
    fn set_parse_and_contains() {
        let items: Vec<String> = ["10.0.0.0/8", "::1/128", "192.0.2.5"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let set = CidrSet::parse(&items).unwrap();
        assert!(set.contains(ip("10.2.3.4")));
        assert!(set.contains(ip("::1")));
        assert!(set.contains(ip("192.0.2.5")));
        assert!(set.contains(ip("::ffff:192.0.2.5")));
        assert!(!set.contains(ip("192.0.2.6")));
        assert_eq!(set.iter().count(), 3);
        let err = CidrSet::parse(&["10.0.0.0/8".into(), "bogus".into()]).unwrap_err();
        assert!(err.contains("bogus"), "{err}");
        let empty = CidrSet::parse(&[]).unwrap();
        assert!(empty.is_empty());
        assert!(!empty.contains(ip("127.0.0.1")));
    }
}
