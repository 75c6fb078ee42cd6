//! The OPS.md defaults, in one place: the `Default` impls of the sections, gathered by
//! [`Config::default_production`].

use std::net::SocketAddr;
use std::time::Duration;

use super::{
    AdminConfig, AuthConfig, CompressionConfig, Config, FeedConfig, LifetimeConfig, LimitsConfig, LogConfig,
    ServerConfig,
};

/// Default `auth.max_token_lifetime` (also [`crate::auth::jwt::VerifyPolicy::default`]).
pub const DEFAULT_MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(15 * 60);

/// Default `auth.leeway` (also [`crate::auth::jwt::VerifyPolicy::default`]).
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);
impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            shards: 0,
            pin_cores: true,
            io_uring_entries: 4096,
            sqpoll: false,
            drain_timeout: Duration::from_secs(10),
            max_connections_per_shard: 100_000,
            pending_handshakes_per_shard: 1024,
            driver: "auto".to_owned(),
            demo_page: false,
            busy_poll: Duration::ZERO,
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            keys: Vec::new(),
            jwks: None,
            issuer: None,
            audience: None,
            max_token_lifetime: DEFAULT_MAX_TOKEN_LIFETIME,
            leeway: DEFAULT_LEEWAY,
            allow_query_token: true,
            ticket_ttl: Duration::from_secs(30),
            allowed_origins: Vec::new(),
            allow_missing_origin: false,
            trusted_proxies: Vec::new(),
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            handshake_timeout: Duration::from_secs(5),
            per_ip_handshakes_per_sec: 20,
            per_ip_burst: 40,
            per_user_max_connections: 10,
            max_message_bytes: 65536,
            max_symbols_per_connection: 1024,
            inbound_messages_per_sec: 50,
            outbound_queue_bytes: 1_048_576,
            slow_consumer_grace: Duration::from_secs(5),
            max_head_bytes: 8192,
            max_headers: 32,
            first_byte_timeout: Duration::from_secs(2),
            per_ip_pending_handshakes: 256,
        }
    }
}

impl Default for LifetimeConfig {
    fn default() -> Self {
        LifetimeConfig {
            reauth_lead: Duration::from_secs(60),
            reauth_grace: Duration::from_secs(30),
            reauth_spread: Duration::from_secs(10),
            heartbeat: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(45),
        }
    }
}

impl Default for FeedConfig {
    fn default() -> Self {
        FeedConfig {
            simulator: false,
            simulator_symbols: vec!["BTC-USD".to_owned(), "ETH-USD".to_owned()],
            simulator_rate: 10,
            max_symbols: 100_000,
            symbol_idle: Duration::from_secs(600),
            history: 1000,
            history_age: Duration::from_secs(300),
            history_bytes: 256 << 20,
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            enabled: true,
            request_timeout: Duration::from_secs(2),
            max_connections: 64,
            max_connections_per_ip: 16,
        }
    }
}

impl Default for CompressionConfig {
    fn default() -> Self {
        CompressionConfig {
            enabled: false,
            level: 1,
            window_bits: 12,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".to_owned(),
            security: "stdout".to_owned(),
        }
    }
}

impl Config {
    /// All OPS.md defaults: no TLS, no verifying keys, no allowed origins.
    pub fn default_production() -> Config {
        Config::default()
    }
}
