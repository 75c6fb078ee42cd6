//! The syntax of the `[cluster]` keys (config validation calls these): a leaf, so the
//! configuration does not depend on the bus's other modules.

/// `nats://host:port` (or `tls://`), as `cluster.nats` takes it.
pub fn check_server_url(u: &str) -> Result<(), String> {
    let rest = u
        .strip_prefix("nats://")
        .or_else(|| u.strip_prefix("tls://"))
        .ok_or_else(|| format!("{u:?}: a URL starts with nats:// or tls://"))?;
    let hostport = rest.rsplit('@').next().unwrap_or(rest);
    let (host, port) = hostport
        .rsplit_once(':')
        .ok_or_else(|| format!("{u:?}: host:port expected"))?;
    if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(format!("{u:?}: host:port expected"));
    }
    if u.len() > 256 || u.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("{u:?}: not a URL"));
    }
    Ok(())
}

/// `cluster.node`: empty, or 1-64 of `[A-Za-z0-9._-]`.
pub fn check_node_name(n: &str) -> Result<(), String> {
    if n.len() > 64
        || !n
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
    {
        return Err("up to 64 of A-Z a-z 0-9 . _ -".into());
    }
    Ok(())
}

/// `cluster.subject_prefix`: NATS tokens of `[A-Za-z0-9_-]` joined by dots, at most 64 bytes.
pub fn check_prefix(p: &str) -> Result<(), String> {
    let ok = !p.is_empty()
        && p.len() <= 64
        && p.split('.').all(|t| {
            !t.is_empty()
                && t.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-'))
        });
    if ok {
        Ok(())
    } else {
        Err("dot-separated tokens of A-Z a-z 0-9 _ -, at most 64 bytes".into())
    }
}

/// The node name when `cluster.node` is empty: the host name and the listen port, within
/// what [`check_node_name`] allows (64 of `[A-Za-z0-9._-]`): other nodes drop a longer
/// name's announcements. Shortened, it keeps a hash of the whole name, so two long host
/// names that differ only at the end (a pod's suffix) stay two nodes.
pub fn default_node_name(host: &str, port: u16) -> String {
    let clean: String = host
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        .collect();
    let name = format!("{clean}-{port}");
    if name.len() <= 64 {
        return name;
    }
    let h = ring::digest::digest(&ring::digest::SHA256, name.as_bytes());
    let tag: String = h.as_ref()[..4].iter().map(|b| format!("{b:02x}")).collect();
    let suffix = format!("-{tag}-{port}");
    format!("{}{suffix}", &clean[..64 - suffix.len()])
}

#[cfg(test)]
mod default_name_tests {
    use super::{check_node_name, default_node_name};

    #[test]
    fn the_default_name_is_always_a_valid_one_and_long_ones_stay_apart() {
        assert_eq!(default_node_name("md-1", 8080), "md-1-8080");
        assert_eq!(default_node_name("bad host!", 1), "badhost-1");
        let base = "a".repeat(55);
        let (x, y) = (format!("{base}-pod-x7k2q"), format!("{base}-pod-z9m4r"));
        let (nx, ny) = (default_node_name(&x, 65535), default_node_name(&y, 65535));
        assert!(nx.len() <= 64 && ny.len() <= 64, "{nx} {ny}");
        assert_ne!(nx, ny);
        for n in [nx, ny, default_node_name(&"h".repeat(64), 443)] {
            assert_eq!(check_node_name(&n), Ok(()), "{n}");
        }
    }
}
