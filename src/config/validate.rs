//! Semantic checks across keys. Each rule whose subject has a home elsewhere (a `kid`, a
//! symbol, an origin, a CIDR) calls that home's function, so config and runtime agree.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use super::{Config, ConfigError, MAX_MESSAGE_BYTES_LIMIT, format_duration};

impl Config {
    /// Semantic checks across keys; the first failure is returned.
    ///
    /// Does not touch the file system (see [`Config::validate_files`]); a `kid` present
    /// both in `auth.keys` and in the JWKS file is caught by the key loader.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_server()?;
        self.validate_tls()?;
        self.validate_auth()?;
        self.validate_limits()?;
        self.validate_lifetime()?;
        self.validate_feed()?;
        self.validate_cluster()?;
        self.validate_compression()?;
        self.validate_admin_log()
    }

    fn validate_compression(&self) -> Result<(), ConfigError> {
        let c = &self.compression;
        if c.level > 9 {
            return Err(ConfigError::invalid(
                "compression.level",
                format!("{} is not in 0..=9", c.level),
            ));
        }
        if !(9..=15).contains(&c.window_bits) {
            return Err(ConfigError::invalid(
                "compression.window_bits",
                format!("{} is not in 9..=15", c.window_bits),
            ));
        }
        Ok(())
    }

    fn validate_cluster(&self) -> Result<(), ConfigError> {
        let Some(c) = &self.cluster else { return Ok(()) };
        if self.feed.simulator {
            return Err(ConfigError::invalid(
                "feed.simulator",
                "not with [cluster]: feed ticks through NATS (<prefix>.in.<SYMBOL>)",
            ));
        }
        if c.nats.is_empty() || c.nats.len() > 16 {
            return Err(ConfigError::invalid("cluster.nats", "1 to 16 server URLs"));
        }
        for u in &c.nats {
            crate::bus::names::check_server_url(u).map_err(|e| ConfigError::invalid("cluster.nats", e))?;
        }
        crate::bus::names::check_node_name(&c.node).map_err(|e| ConfigError::invalid("cluster.node", e))?;
        crate::bus::names::check_prefix(&c.subject_prefix)
            .map_err(|e| ConfigError::invalid("cluster.subject_prefix", e))?;
        Ok(())
    }

    /// Checks that the files the config names exist (TLS cert and key, key files, JWKS):
    /// for `check-config`, so a typo in a path shows before a deploy.
    pub fn validate_files(&self) -> Result<(), ConfigError> {
        let mut files: Vec<(String, &Path)> = Vec::new();
        if let Some(tls) = &self.tls {
            files.push(("tls.cert".to_owned(), &tls.cert));
            files.push(("tls.key".to_owned(), &tls.key));
        }
        for (i, k) in self.auth.keys.iter().enumerate() {
            files.push((format!("auth.keys[{i}].path"), &k.path));
        }
        if let Some(jwks) = &self.auth.jwks {
            files.push(("auth.jwks".to_owned(), jwks));
        }
        if let Some(c) = &self.cluster
            && !c.credentials.is_empty()
        {
            files.push(("cluster.credentials".to_owned(), Path::new(&c.credentials)));
        }
        for (key, path) in files {
            if !path.is_file() {
                return Err(ConfigError::invalid(
                    key,
                    format!("{:?} is not a readable file", path.display().to_string()),
                ));
            }
        }
        Ok(())
    }

    fn validate_server(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        if s.shards > 64 {
            return Err(ConfigError::invalid(
                "server.shards",
                format!("{} is above 64 (0 = one per core)", s.shards),
            ));
        }
        let e = s.io_uring_entries;
        if !(2..=32768).contains(&e) || !e.is_power_of_two() {
            return Err(ConfigError::invalid(
                "server.io_uring_entries",
                format!("{e} is not a power of two in 2..=32768"),
            ));
        }
        if !(1..=1_000_000).contains(&s.max_connections_per_shard) {
            return Err(ConfigError::invalid(
                "server.max_connections_per_shard",
                format!("{} is not in 1..=1000000", s.max_connections_per_shard),
            ));
        }
        if s.pending_handshakes_per_shard == 0 || s.pending_handshakes_per_shard > s.max_connections_per_shard
        {
            return Err(ConfigError::invalid(
                "server.pending_handshakes_per_shard",
                format!(
                    "{} is not in 1..=server.max_connections_per_shard ({})",
                    s.pending_handshakes_per_shard, s.max_connections_per_shard
                ),
            ));
        }
        if s.drain_timeout > Duration::from_secs(3600) {
            return Err(ConfigError::invalid("server.drain_timeout", "must be at most 1h"));
        }
        if s.busy_poll > Duration::from_secs(10) {
            return Err(ConfigError::invalid("server.busy_poll", "must be at most 10s"));
        }
        if !matches!(s.driver.as_str(), "auto" | "epoll") {
            return Err(ConfigError::invalid(
                "server.driver",
                format!("{:?} is neither \"auto\" nor \"epoll\"", s.driver),
            ));
        }
        Ok(())
    }

    fn validate_tls(&self) -> Result<(), ConfigError> {
        if let Some(tls) = &self.tls {
            if tls.cert.as_os_str().is_empty() {
                return Err(ConfigError::invalid("tls.cert", "empty path"));
            }
            if tls.key.as_os_str().is_empty() {
                return Err(ConfigError::invalid("tls.key", "empty path"));
            }
            if tls.cert == tls.key {
                return Err(ConfigError::invalid("tls.key", "is the same file as tls.cert"));
            }
        }
        Ok(())
    }

    fn validate_auth(&self) -> Result<(), ConfigError> {
        let a = &self.auth;
        let mut kids = HashSet::new();
        for (i, k) in a.keys.iter().enumerate() {
            if !crate::auth::keys::is_valid_kid(&k.kid) {
                return Err(ConfigError::invalid(
                    format!("auth.keys[{i}].kid"),
                    format!("{:?} is not {}", k.kid, crate::auth::keys::KID_RULE),
                ));
            }
            if !kids.insert(k.kid.as_str()) {
                return Err(ConfigError::invalid(
                    format!("auth.keys[{i}].kid"),
                    format!("kid {:?} is given twice", k.kid),
                ));
            }
            if k.path.as_os_str().is_empty() {
                return Err(ConfigError::invalid(format!("auth.keys[{i}].path"), "empty path"));
            }
        }
        if a.jwks.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
            return Err(ConfigError::invalid("auth.jwks", "empty path"));
        }
        if a.issuer.as_ref().is_some_and(|s| s.is_empty()) {
            return Err(ConfigError::invalid("auth.issuer", "empty string"));
        }
        if a.audience.as_ref().is_some_and(|s| s.is_empty()) {
            return Err(ConfigError::invalid("auth.audience", "empty string"));
        }
        if a.max_token_lifetime.is_zero() || a.max_token_lifetime > Duration::from_secs(86_400) {
            return Err(ConfigError::invalid(
                "auth.max_token_lifetime",
                "must be above 0 and at most 24h (tokens are short-lived)",
            ));
        }
        if a.leeway > Duration::from_secs(300) {
            return Err(ConfigError::invalid("auth.leeway", "must be at most 5m"));
        }
        if a.ticket_ttl.is_zero() || a.ticket_ttl > Duration::from_secs(60) {
            return Err(ConfigError::invalid(
                "auth.ticket_ttl",
                format!("{} is not above 0 and at most 60s", format_duration(a.ticket_ttl)),
            ));
        }
        for (i, o) in a.allowed_origins.iter().enumerate() {
            if let Err(why) = crate::auth::origin::parse_allowed_origin(o) {
                return Err(ConfigError::invalid(
                    format!("auth.allowed_origins[{i}]"),
                    format!("{o:?}: {why}"),
                ));
            }
        }
        for (i, p) in a.trusted_proxies.iter().enumerate() {
            if let Err(why) = p.parse::<crate::auth::cidr::Cidr>() {
                return Err(ConfigError::invalid(
                    format!("auth.trusted_proxies[{i}]"),
                    why.to_string(),
                ));
            }
        }
        Ok(())
    }

    fn validate_limits(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        if l.handshake_timeout.is_zero() || l.handshake_timeout > Duration::from_secs(300) {
            return Err(ConfigError::invalid(
                "limits.handshake_timeout",
                "must be above 0 and at most 5m",
            ));
        }
        let positive: [(&str, u64); 5] = [
            (
                "limits.per_ip_handshakes_per_sec",
                u64::from(l.per_ip_handshakes_per_sec),
            ),
            ("limits.per_ip_burst", u64::from(l.per_ip_burst)),
            (
                "limits.per_user_max_connections",
                l.per_user_max_connections as u64,
            ),
            (
                "limits.inbound_messages_per_sec",
                u64::from(l.inbound_messages_per_sec),
            ),
            (
                "limits.max_symbols_per_connection",
                l.max_symbols_per_connection as u64,
            ),
        ];
        for (key, v) in positive {
            if v == 0 {
                return Err(ConfigError::invalid(key, "must be at least 1"));
            }
        }
        if !(125..=MAX_MESSAGE_BYTES_LIMIT).contains(&l.max_message_bytes) {
            return Err(ConfigError::invalid(
                "limits.max_message_bytes",
                format!("{} is not in 125..=16777216", l.max_message_bytes),
            ));
        }
        if l.max_symbols_per_connection > self.feed.max_symbols {
            return Err(ConfigError::invalid(
                "limits.max_symbols_per_connection",
                format!(
                    "{} is above feed.max_symbols ({})",
                    l.max_symbols_per_connection, self.feed.max_symbols
                ),
            ));
        }
        if !(4096..=1 << 30).contains(&l.outbound_queue_bytes) {
            return Err(ConfigError::invalid(
                "limits.outbound_queue_bytes",
                format!("{} is not in 4096..=1073741824", l.outbound_queue_bytes),
            ));
        }
        if l.first_byte_timeout.is_zero() || l.first_byte_timeout > Duration::from_secs(300) {
            return Err(ConfigError::invalid(
                "limits.first_byte_timeout",
                "must be above 0 and at most 5m",
            ));
        }
        if l.per_ip_pending_handshakes == 0 {
            return Err(ConfigError::invalid(
                "limits.per_ip_pending_handshakes",
                "must be at least 1",
            ));
        }
        if l.slow_consumer_grace.is_zero() {
            return Err(ConfigError::invalid(
                "limits.slow_consumer_grace",
                "must be above 0",
            ));
        }
        if !(1024..=65536).contains(&l.max_head_bytes) {
            return Err(ConfigError::invalid(
                "limits.max_head_bytes",
                format!("{} is not in 1024..=65536", l.max_head_bytes),
            ));
        }
        if !(8..=128).contains(&l.max_headers) {
            return Err(ConfigError::invalid(
                "limits.max_headers",
                format!("{} is not in 8..=128", l.max_headers),
            ));
        }
        Ok(())
    }

    fn validate_lifetime(&self) -> Result<(), ConfigError> {
        let t = &self.lifetime;
        if t.reauth_lead.is_zero() || t.reauth_lead >= self.auth.max_token_lifetime {
            return Err(ConfigError::invalid(
                "lifetime.reauth_lead",
                format!(
                    "{} must be above 0 and below auth.max_token_lifetime ({})",
                    format_duration(t.reauth_lead),
                    format_duration(self.auth.max_token_lifetime)
                ),
            ));
        }
        if t.reauth_spread > Duration::from_secs(24 * 3600) {
            return Err(ConfigError::invalid(
                "lifetime.reauth_spread",
                format!("{} is above 24h", format_duration(t.reauth_spread)),
            ));
        }
        if t.reauth_grace > self.auth.max_token_lifetime {
            return Err(ConfigError::invalid(
                "lifetime.reauth_grace",
                "must be at most auth.max_token_lifetime",
            ));
        }
        if t.heartbeat.is_zero() {
            return Err(ConfigError::invalid("lifetime.heartbeat", "must be above 0"));
        }
        if t.idle_timeout <= t.heartbeat {
            return Err(ConfigError::invalid(
                "lifetime.idle_timeout",
                format!(
                    "{} must be above lifetime.heartbeat ({})",
                    format_duration(t.idle_timeout),
                    format_duration(t.heartbeat)
                ),
            ));
        }
        Ok(())
    }

    fn validate_feed(&self) -> Result<(), ConfigError> {
        let f = &self.feed;
        if !(1..=10_000_000).contains(&f.max_symbols) {
            return Err(ConfigError::invalid(
                "feed.max_symbols",
                format!("{} is not in 1..=10000000", f.max_symbols),
            ));
        }
        if f.symbol_idle < Duration::from_secs(1) || f.symbol_idle > Duration::from_secs(30 * 86_400) {
            return Err(ConfigError::invalid(
                "feed.symbol_idle",
                "must be at least 1s and at most 30 days",
            ));
        }
        if f.history > 100_000 {
            return Err(ConfigError::invalid(
                "feed.history",
                format!("{} is not in 0..=100000", f.history),
            ));
        }
        if f.history_age < Duration::from_secs(1) || f.history_age > Duration::from_secs(86_400) {
            return Err(ConfigError::invalid(
                "feed.history_age",
                "must be at least 1s and at most 24h",
            ));
        }
        if !((1 << 20)..=(1 << 40)).contains(&f.history_bytes) {
            return Err(ConfigError::invalid(
                "feed.history_bytes",
                format!("{} is not in 1048576..=1099511627776", f.history_bytes),
            ));
        }
        let mut seen = HashSet::new();
        for (i, s) in f.simulator_symbols.iter().enumerate() {
            if !crate::feed::symbol::is_valid_symbol(s) {
                return Err(ConfigError::invalid(
                    format!("feed.simulator_symbols[{i}]"),
                    format!("{s:?} does not match [A-Z0-9][A-Z0-9._:/-]{{0,31}}"),
                ));
            }
            if !seen.insert(s.as_str()) {
                return Err(ConfigError::invalid(
                    format!("feed.simulator_symbols[{i}]"),
                    format!("{s:?} is given twice"),
                ));
            }
        }
        if f.simulator_symbols.len() > f.max_symbols {
            return Err(ConfigError::invalid(
                "feed.simulator_symbols",
                "has more entries than feed.max_symbols",
            ));
        }
        if f.simulator && !(1..=100_000).contains(&f.simulator_rate) {
            return Err(ConfigError::invalid(
                "feed.simulator_rate",
                format!("{} is not in 1..=100000", f.simulator_rate),
            ));
        }
        Ok(())
    }

    fn validate_admin_log(&self) -> Result<(), ConfigError> {
        if self.admin.enabled && self.admin.listen.port() != 0 && self.admin.listen == self.server.listen {
            return Err(ConfigError::invalid(
                "admin.listen",
                format!("{} is also server.listen", self.admin.listen),
            ));
        }
        let a = &self.admin;
        if !(Duration::from_millis(100)..=Duration::from_secs(60)).contains(&a.request_timeout) {
            return Err(ConfigError::invalid(
                "admin.request_timeout",
                format!("{} is not in 100ms..=60s", format_duration(a.request_timeout)),
            ));
        }
        if !(1..=4096).contains(&a.max_connections) {
            return Err(ConfigError::invalid(
                "admin.max_connections",
                format!("{} is not in 1..=4096", a.max_connections),
            ));
        }
        if a.max_connections_per_ip == 0 || a.max_connections_per_ip > a.max_connections {
            return Err(ConfigError::invalid(
                "admin.max_connections_per_ip",
                format!(
                    "{} is not in 1..=admin.max_connections ({})",
                    a.max_connections_per_ip, a.max_connections
                ),
            ));
        }
        if !["trace", "debug", "info", "warn", "error"].contains(&self.log.level.as_str()) {
            return Err(ConfigError::invalid(
                "log.level",
                format!(
                    "{:?} is not one of trace, debug, info, warn, error",
                    self.log.level
                ),
            ));
        }
        if self.log.security.is_empty() || self.log.security.contains('\0') {
            return Err(ConfigError::invalid(
                "log.security",
                "must be stdout, stderr or a file path",
            ));
        }
        Ok(())
    }
}
