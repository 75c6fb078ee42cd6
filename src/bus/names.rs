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
