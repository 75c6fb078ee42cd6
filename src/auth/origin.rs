//! `Origin` allow-list (PROTOCOL.md section 2, check 3).
//!
//! Cross-site WebSocket hijacking is stopped only by the `Origin` check, so the match is
//! an exact comparison of *serialised origins* (`scheme://host[:port]`), never a prefix,
//! suffix or substring test: `https://app.example.com.evil.com`,
//! `https://app.example.com@evil.com` and `https://evil.com/?x=https://app.example.com` all
//! fail because they do not serialise to the allowed origin.
//!
//! Both the configured entries and the header go through [`normalize_origin`], which
//! accepts only what a browser would send (RFC 6454 serialisation) and canonicalises the
//! harmless variations: scheme and host are lower-cased, the scheme's default port is
//! dropped and IPv6 literals are written in RFC 5952 form. Anything ambiguous is refused
//! rather than repaired: a path (even a lone `/`), query, fragment, userinfo, percent
//! escapes, whitespace or control bytes, non-ASCII (browsers send punycode), a trailing
//! dot, empty labels, an IPv6 zone id, a numeric host that is not a canonical dotted IPv4
//! address (`http://2130706433`, `http://0x7f.1`, `http://127.1`), ports with leading zeros,
//! and the opaque origin `null`. An IPv4 literal and its IPv4-mapped IPv6 form are different
//! origins, as they are in browsers.
//!
//! The policy is immutable after construction, so shards share it without locking; a
//! reload (SIGHUP) builds a new one and swaps it.

use std::collections::HashSet;
use std::net::{Ipv4Addr, Ipv6Addr};

/// Longest origin we look at. Real origins are scheme + a 253-byte host + a port; anything
/// longer is hostile and is refused before any allocation.
pub const MAX_ORIGIN_LEN: usize = 512;

/// Outcome of [`OriginPolicy::check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OriginDecision {
    /// The header names an allowed origin.
    Allowed,
    /// No header at all, allowed because `allow_missing_origin` is set (non-browser clients).
    Missing,
    /// Anything else: answer `403`.
    Rejected,
}

impl OriginDecision {
    /// Whether the handshake may continue.
    pub fn is_allowed(self) -> bool {
        !matches!(self, OriginDecision::Rejected)
    }
}

/// The configured allow-list of exact origins.
#[derive(Debug, Clone)]
pub struct OriginPolicy {
    allowed: HashSet<String>,
    allow_missing: bool,
}

impl OriginPolicy {
    /// Builds the policy from `auth.allowed_origins`; every entry must pass
    /// [`parse_allowed_origin`] (as the config check does); the error names the first bad
    /// entry.
    pub fn new(allowed: &[String], allow_missing: bool) -> Result<Self, String> {
        let mut set = HashSet::with_capacity(allowed.len());
        for entry in allowed {
            let n = parse_allowed_origin(entry)
                .map_err(|why| format!("invalid origin {entry:?} in auth.allowed_origins: {why}"))?;
            set.insert(n);
        }
        Ok(Self {
            allowed: set,
            allow_missing,
        })
    }

    /// Decides on the `Origin` header value (`None` when the header is absent).
    ///
    /// Surrounding spaces and tabs are optional whitespace in HTTP (RFC 9110 5.5), not part
    /// of the value, so they are ignored; everything else must normalise exactly.
    pub fn check(&self, origin: Option<&str>) -> OriginDecision {
        let Some(raw) = origin else {
            return if self.allow_missing {
                OriginDecision::Missing
            } else {
                OriginDecision::Rejected
            };
        };
        let value = raw.trim_matches(|c| c == ' ' || c == '\t');
        match normalize_origin(value) {
            Some(n) if self.allowed.contains(&n) => OriginDecision::Allowed,
            _ => OriginDecision::Rejected,
        }
    }

    /// Whether a missing header is accepted.
    pub fn allows_missing(&self) -> bool {
        self.allow_missing
    }

    /// The normalised allowed origins, sorted (for `check-config` output and logs).
    pub fn allowed(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.allowed.iter().map(String::as_str).collect();
        v.sort_unstable();
        v
    }
}

/// The one rule for an `auth.allowed_origins` entry (config validation and
/// [`OriginPolicy::new`] both call it): an `http` or `https` origin, lowercase, that
/// [`normalize_origin`] accepts (the stricter of the two checks that used to exist: the
/// config's scheme and case rules and the runtime's host and port rules). Returns the
/// normalised entry, the form a header is compared with.
pub fn parse_allowed_origin(entry: &str) -> Result<String, String> {
    if !(entry.starts_with("https://") || entry.starts_with("http://")) {
        return Err("must start with https:// or http://".to_owned());
    }
    if entry.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err("must be lowercase (origins are compared exactly)".to_owned());
    }
    normalize_origin(entry).ok_or_else(|| {
        "expected scheme://host[:port] with no path, wildcard, userinfo or spaces, e.g. \"https://app.example.com\""
            .to_owned()
    })
}

/// Normalises a serialised origin, or `None` when it is not one a browser would send.
/// See the module documentation for exactly what is accepted. Idempotent: a normalised
/// origin normalises to itself.
pub fn normalize_origin(s: &str) -> Option<String> {
    if s.is_empty() || s.len() > MAX_ORIGIN_LEN || !s.is_ascii() {
        return None;
    }
    let (scheme, authority) = s.split_once("://")?;
    let scheme = normalize_scheme(scheme)?;
    // Every delimiter that could start a path, query, fragment or userinfo, plus escapes,
    // whitespace and control bytes: an origin has none of them.
    if authority.is_empty()
        || authority
            .bytes()
            .any(|b| b <= 0x20 || b == 0x7f || b"/?#@\\%".contains(&b))
    {
        return None;
    }
    let (host, port) = split_host_port(authority)?;
    let host = normalize_host(host)?;
    let port = normalize_port(port)?;
    let port = match port {
        Some(p) if Some(p) == default_port(&scheme) => None,
        other => other,
    };
    let mut out = String::with_capacity(scheme.len() + 3 + host.len() + 6);
    out.push_str(&scheme);
    out.push_str("://");
    out.push_str(&host);
    if let Some(p) = port {
        out.push(':');
        out.push_str(&p.to_string());
    }
    Some(out)
}

fn normalize_scheme(scheme: &str) -> Option<String> {
    let mut bytes = scheme.bytes();
    let first = bytes.next()?;
    if !first.is_ascii_alphabetic()
        || !bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
        || scheme.len() > 32
    {
        return None;
    }
    Some(scheme.to_ascii_lowercase())
}

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" | "ws" => Some(80),
        "https" | "wss" => Some(443),
        _ => None,
    }
}

/// Splits `host[:port]` / `[v6][:port]`. More than one colon outside brackets is refused.
fn split_host_port(authority: &str) -> Option<(&str, Option<&str>)> {
    if authority.starts_with('[') {
        let close = authority.find(']')?;
        let (host, rest) = authority.split_at(close + 1);
        if rest.is_empty() {
            Some((host, None))
        } else {
            Some((host, Some(rest.strip_prefix(':')?)))
        }
    } else {
        match authority.split_once(':') {
            None => Some((authority, None)),
            Some((h, p)) if !p.contains(':') => Some((h, Some(p))),
            Some(_) => None,
        }
    }
}

fn normalize_host(host: &str) -> Option<String> {
    if let Some(inner) = host.strip_prefix('[') {
        let inner = inner.strip_suffix(']')?;
        // `%` (zone ids) was refused earlier; Ipv6Addr rejects anything else odd.
        let addr: Ipv6Addr = inner.parse().ok()?;
        return Some(format!("[{addr}]"));
    }
    if host.is_empty() || host.len() > 253 {
        return None;
    }
    let host = host.to_ascii_lowercase();
    let mut last_label = "";
    for label in host.split('.') {
        if label.is_empty()
            || label.len() > 63
            || label.starts_with('-')
            || label.ends_with('-')
            || !label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            // Also catches the trailing-dot form `app.example.com.` (empty last label).
            return None;
        }
        last_label = label;
    }
    // WHATWG URL parsing treats a host whose last label is numeric (or hex) as an IPv4
    // address in any of its legacy spellings; only the canonical dotted quad is accepted so
    // that one address has exactly one spelling.
    let numeric_last = last_label.bytes().all(|b| b.is_ascii_digit()) || last_label.starts_with("0x");
    if numeric_last {
        let addr: Ipv4Addr = host.parse().ok()?;
        if addr.to_string() != host {
            return None;
        }
    }
    Some(host)
}

fn normalize_port(port: Option<&str>) -> Option<Option<u16>> {
    let Some(p) = port else {
        return Some(None);
    };
    if p.is_empty() || p.len() > 5 || p.starts_with('0') || !p.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u16 = p.parse().ok()?;
    Some(Some(n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy(list: &[&str], missing: bool) -> OriginPolicy {
        let v: Vec<String> = list.iter().map(|s| s.to_string()).collect();
        OriginPolicy::new(&v, missing).unwrap()
    }

    #[test]
    fn normalises_case_and_default_ports() {
        let cases = [
            ("https://app.example.com", Some("https://app.example.com")),
            ("HTTPS://APP.EXAMPLE.COM:443", Some("https://app.example.com")),
            ("http://Example.COM:80", Some("http://example.com")),
            ("http://example.com:443", Some("http://example.com:443")),
            ("https://example.com:80", Some("https://example.com:80")),
            ("https://example.com:8443", Some("https://example.com:8443")),
            ("wss://example.com:443", Some("wss://example.com")),
            ("http://127.0.0.1:8080", Some("http://127.0.0.1:8080")),
            ("http://[::1]:8080", Some("http://[::1]:8080")),
            ("http://[0:0:0:0:0:0:0:1]", Some("http://[::1]")),
            ("http://[2001:DB8::1]", Some("http://[2001:db8::1]")),
            ("chrome-extension://abcdef", Some("chrome-extension://abcdef")),
            (
                "https://xn--bcher-kva.example",
                Some("https://xn--bcher-kva.example"),
            ),
            ("http://localhost:8080", Some("http://localhost:8080")),
        ];
        for (input, want) in cases {
            assert_eq!(normalize_origin(input).as_deref(), want, "{input}");
        }
    }

    #[test]
    fn refuses_non_origins() {
        let bad = [
            "",
            "null",
            "https://",
            "https://app.example.com/",
            "https://app.example.com/path",
            "https://app.example.com?x=1",
            "https://app.example.com#frag",
            "https://user@app.example.com",
            "https://app.example.com@evil.com",
            "https://user:pw@app.example.com",
            "https://evil.com/?x=https://app.example.com",
            "https://app.example.com.",
            "https://app..example.com",
            "https://.app.example.com",
            "https://app.example.com:",
            "https://app.example.com:0",
            "https://app.example.com:0443",
            "https://app.example.com:65536",
            "https://app.example.com:443:443",
            "https://app.example.com:-1",
            "https://app.exa mple.com",
            "https://app.example.com\r\nX: y",
            "https://app.example.com\0",
            "https://app%2eexample.com",
            "https://app.example.com\\@evil.com",
            "https://bücher.example",
            "https://-app.example.com",
            "http://2130706433",
            "http://0x7f.0.0.1",
            "http://app.0x",
            "http://127.1",
            "http://127.000.000.001",
            "http://256.0.0.1",
            "http://1.2.3.4.5",
            "http://[::1",
            "http://[::1]x",
            "http://[fe80::1%25eth0]",
            "http://[not-v6]",
            "http://::1",
            "app.example.com",
            "//app.example.com",
            "1http://app.example.com",
            "ht_tp://app.example.com",
            "https://app.example.com https://evil.com",
        ];
        for input in bad {
            assert_eq!(normalize_origin(input), None, "{input:?}");
        }
        assert_eq!(normalize_origin(&"a".repeat(MAX_ORIGIN_LEN + 1)), None);
    }

    #[test]
    fn look_alikes_are_rejected() {
        let p = policy(&["https://app.example.com"], false);
        let table = [
            ("https://app.example.com", OriginDecision::Allowed),
            ("HTTPS://APP.EXAMPLE.COM:443", OriginDecision::Allowed),
            ("https://App.Example.Com", OriginDecision::Allowed),
            (" https://app.example.com\t", OriginDecision::Allowed),
            ("https://app.example.com.evil.com", OriginDecision::Rejected),
            (
                "https://evil.com/?x=https://app.example.com",
                OriginDecision::Rejected,
            ),
            ("https://app.example.com@evil.com", OriginDecision::Rejected),
            ("https://evil.com@app.example.com", OriginDecision::Rejected),
            ("https://evilapp.example.com", OriginDecision::Rejected),
            ("https://evil-app.example.com", OriginDecision::Rejected),
            ("https://sub.app.example.com", OriginDecision::Rejected),
            ("https://example.com", OriginDecision::Rejected),
            ("http://app.example.com", OriginDecision::Rejected),
            ("wss://app.example.com", OriginDecision::Rejected),
            ("https://app.example.com:8443", OriginDecision::Rejected),
            ("https://app.example.com.", OriginDecision::Rejected),
            ("https://app.example.com/", OriginDecision::Rejected),
            ("https://app.example.co", OriginDecision::Rejected),
            ("https://app.example.comm", OriginDecision::Rejected),
            ("null", OriginDecision::Rejected),
            ("", OriginDecision::Rejected),
            ("*", OriginDecision::Rejected),
        ];
        for (origin, want) in table {
            assert_eq!(p.check(Some(origin)), want, "{origin:?}");
        }
        assert_eq!(p.check(None), OriginDecision::Rejected);
    }

    #[test]
    fn missing_origin_only_when_configured() {
        let p = policy(&["https://app.example.com"], true);
        assert_eq!(p.check(None), OriginDecision::Missing);
        assert!(p.check(None).is_allowed());
        // An empty or `null` header is present, not missing.
        assert_eq!(p.check(Some("")), OriginDecision::Rejected);
        assert_eq!(p.check(Some("null")), OriginDecision::Rejected);
        assert!(!p.check(Some("null")).is_allowed());
        assert!(p.allows_missing());
    }

    #[test]
    fn ip_literals_match_exactly() {
        let p = policy(&["http://127.0.0.1:8080", "http://[::1]:8080"], false);
        assert_eq!(p.check(Some("http://127.0.0.1:8080")), OriginDecision::Allowed);
        assert_eq!(p.check(Some("http://[::1]:8080")), OriginDecision::Allowed);
        assert_eq!(p.check(Some("http://[0000::0001]:8080")), OriginDecision::Allowed);
        assert_eq!(
            p.check(Some("http://[::ffff:127.0.0.1]:8080")),
            OriginDecision::Rejected
        );
        assert_eq!(p.check(Some("http://localhost:8080")), OriginDecision::Rejected);
        assert_eq!(p.check(Some("http://127.0.0.2:8080")), OriginDecision::Rejected);
        assert_eq!(p.check(Some("http://2130706433:8080")), OriginDecision::Rejected);
        assert_eq!(p.check(Some("http://127.0.0.1")), OriginDecision::Rejected);
    }

    #[test]
    fn config_errors_name_the_entry() {
        let bad = vec![
            "https://ok.example.com".to_string(),
            "https://x.example.com/".to_string(),
        ];
        let err = OriginPolicy::new(&bad, false).unwrap_err();
        assert!(err.contains("https://x.example.com/"), "{err}");
        for e in ["*", "null", "app.example.com", "https://a.example.com/app"] {
            let err = OriginPolicy::new(&[e.to_string()], false).unwrap_err();
            assert!(err.contains(e), "{err}");
        }
        // Entries are lowercase http(s) origins; the header is normalised, not only them.
        for (e, want) in [
            ("HTTPS://B.example.com:443", "must start with https://"),
            ("https://B.example.com:443", "must be lowercase"),
            ("wss://b.example.com", "must start with https://"),
            ("https://b.example.com.", "expected scheme://host[:port]"),
        ] {
            let err = OriginPolicy::new(&[e.to_string()], false).unwrap_err();
            assert!(err.contains(want), "{err}");
        }
        let p = policy(&["https://b.example.com:443", "https://a.example.com"], false);
        assert_eq!(
            p.allowed(),
            vec!["https://a.example.com", "https://b.example.com"]
        );
        assert_eq!(
            p.check(Some("HTTPS://B.example.com:443")),
            OriginDecision::Allowed
        );
    }

    #[test]
    fn empty_allow_list_rejects_every_header() {
        let p = policy(&[], true);
        assert_eq!(p.check(Some("https://app.example.com")), OriginDecision::Rejected);
        assert_eq!(p.check(None), OriginDecision::Missing);
    }

    proptest! {
        #[test]
        fn normalise_never_panics_and_is_idempotent(s in "\\PC{0,80}") {
            if let Some(n) = normalize_origin(&s) {
                prop_assert_eq!(normalize_origin(&n), Some(n.clone()));
            }
        }

        #[test]
        fn normalise_idempotent_on_origin_like_input(
            scheme in "(?i)(https?|wss?|[a-z][a-z0-9+.-]{0,5})",
            host in "[a-zA-Z0-9._\\-\\[\\]:]{0,30}",
            port in proptest::option::of("[0-9]{0,6}"),
            tail in "[/?#@%\\\\ ]?[a-z]{0,3}",
        ) {
            let s = match port {
                Some(p) => format!("{scheme}://{host}:{p}{tail}"),
                None => format!("{scheme}://{host}{tail}"),
            };
            if let Some(n) = normalize_origin(&s) {
                prop_assert_eq!(normalize_origin(&n), Some(n.clone()));
                prop_assert!(!n.contains('/') || n.matches('/').count() == 2);
                prop_assert!(!n.contains('@') && !n.contains('?') && !n.contains('#'));
                prop_assert_eq!(n.clone(), n.to_ascii_lowercase());
            }
        }

        #[test]
        fn appended_suffixes_never_match(suffix in "[./@?#:a-z0-9]{1,20}") {
            let p = OriginPolicy::new(&["https://app.example.com".to_string()], false).unwrap();
            let candidate = format!("https://app.example.com{suffix}");
            if p.check(Some(&candidate)) == OriginDecision::Allowed {
                // Only the explicit default port may spell the same origin.
                prop_assert_eq!(suffix, ":443");
            }
        }
    }
}
