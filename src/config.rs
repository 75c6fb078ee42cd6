//! The server's settings: the TOML file of OPS.md, `TICKGATE_<SECTION>_<KEY>` environment
//! overrides, command-line overrides, defaults and semantic validation.
//!
//! # Design
//!
//! Every section is a plain struct deserialized with serde, `#[serde(deny_unknown_fields)]`
//! and `#[serde(default)]`: a typo is an error, never a silently ignored setting, and an
//! absent key takes the OPS.md default. The defaults live in one place (the `Default`
//! impls, which [`Config::default_production`] gathers) so `check-config` can print the
//! effective settings with [`Config::to_toml_string`], which parses back to an equal
//! [`Config`].
//!
//! Errors are for an operator reading one line on stderr, so every [`ConfigError`]
//! displays as a single line that starts with the key path (`limits.handshake_timeout`) or
//! the variable (`TICKGATE_SERVER_LISTEN`) at fault. toml's own errors are multi-line
//! snippets; to get the key path we first parse the text into a `toml::Table` (syntax
//! errors carry a position, which we turn into `line L, column C`) and then deserialize
//! that table, whose errors carry the path of keys they unwound through.
//!
//! Overrides (environment variables and CLI flags) are applied to the TOML *table*, typed
//! by a static list of keys ([`KEYS`]), and the table is deserialized again: an override
//! goes through exactly the same checks as the file. Loading does not run
//! [`Config::validate`], because CLI flags are applied after [`Config::load`]; the
//! binary calls `validate` once everything is merged.
//!
//! # Values
//!
//! * Durations are strings with an integer amount and a unit: `"250ms"`, `"10s"`, `"15m"`,
//!   `"1h"`. A bare number or a missing unit is an error. They are written back with the
//!   largest unit that is exact (`"90s"`, `"2m"`); sub-millisecond parts (which the parser
//!   never produces) are dropped.
//! * Defaults: the values listed in OPS.md. Keys whose OPS.md value is only an example of
//!   a deployment (`[tls]`, `auth.keys`, `auth.jwks`, `auth.issuer`, `auth.audience`,
//!   `auth.allowed_origins`, `auth.trusted_proxies`) default to absent / empty: no TLS,
//!   no verifying key (nothing refuses such a config, not even `check-config`: every token
//!   is then refused), no issuer or audience check, no browser origin allowed, no trusted
//!   proxy.
//!
//! # Extensions to OPS.md
//!
//! | key | default | meaning |
//! | --- | --- | --- |
//! | `server.max_connections_per_shard` | 100000 | live connections per shard (at most 1,000,000) |
//! | `server.pending_handshakes_per_shard` | 1024 | connections still in the HTTP upgrade, per shard |
//! | `server.driver` | "auto" | `"auto"`: io_uring when the kernel allows it, else epoll; `"epoll"`: always epoll |
//! | `limits.max_head_bytes` | 8192 | bytes of an HTTP request head (request line + headers) |
//! | `limits.max_headers` | 32 | header lines in an HTTP request head |
//! | `limits.first_byte_timeout` | 2s | a new socket must send its first byte within this (at most `handshake_timeout`) |
//! | `limits.per_ip_pending_handshakes` | 64 | connections one address may hold in the HTTP upgrade, per shard (trusted proxies exempt) |
//! | `feed.max_symbols` | 100000 | distinct symbols the feed will track |
//! | `feed.symbol_idle` | 10m | a symbol with no subscriber and no tick for this long gives its entry back (configured symbols never do) |
//! | `admin.enabled` | true | whether the admin listener runs |
//! | `admin.request_timeout` | 2s | whole admin request, accept to last byte of the body (100ms..=60s) |
//! | `admin.max_connections` | 64 | admin connections in flight (1..=4096) |
//! | `admin.max_connections_per_ip` | 16 | admin connections in flight per peer IP (1..=`admin.max_connections`) |
//! | `lifetime.reauth_spread` | 10s | `reauth_required` goes out up to this much before `exp - reauth_lead`, spread per connection (at most half the time left) |
//!
//! # Environment overrides
//!
//! `TICKGATE_<SECTION>_<KEY>` with the section and key upper-cased, e.g.
//! `TICKGATE_LIMITS_MAX_MESSAGE_BYTES=1024`. Values are typed by the key: integers
//! (`1024`), booleans (`true`/`false`), strings (addresses, durations, paths, names, taken
//! verbatim), and lists: comma-separated (`https://a,https://b`, items trimmed, empty
//! items dropped, an empty value is an empty list) or, when the value starts with `[`, a
//! TOML array literal (needed for `auth.keys`: `[{kid="k1",path="/k/k1.pub"}]`). An empty
//! value clears an optional key (`auth.jwks`, `auth.issuer`, `auth.audience`). Every
//! variable that starts with `TICKGATE_` must name a key: an unknown one is an error.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Prefix of the environment variables that override settings.
pub const ENV_PREFIX: &str = "TICKGATE_";

/// A config file larger than this is refused before it is read (it is operator input,
/// but a wrong path such as a log file should not be slurped into memory).
pub const MAX_FILE_BYTES: u64 = 1 << 20;

/// Largest accepted `limits.max_message_bytes` (16 MiB).
pub const MAX_MESSAGE_BYTES_LIMIT: usize = 16 << 20;

/// Default `auth.max_token_lifetime` (also [`crate::auth::jwt::VerifyPolicy::default`]).
pub const DEFAULT_MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(15 * 60);

/// Default `auth.leeway` (also [`crate::auth::jwt::VerifyPolicy::default`]).
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);

/// The type of a key's value, which tells an override how to read its string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// Taken verbatim: addresses, durations, paths, names.
    Str,
    /// Taken verbatim; an empty value removes the key (back to "absent").
    OptStr,
    /// A decimal integer.
    Int,
    /// `true` or `false`.
    Bool,
    /// Comma-separated items, or a TOML array literal when it starts with `[`.
    List,
}

/// Every settable key, by section: what overrides accept, and the typo check for them.
pub const KEYS: &[(&str, &[(&str, KeyKind)])] = {
    use KeyKind::*;
    &[
        (
            "server",
            &[
                ("listen", Str),
                ("shards", Int),
                ("pin_cores", Bool),
                ("io_uring_entries", Int),
                ("sqpoll", Bool),
                ("drain_timeout", Str),
                ("max_connections_per_shard", Int),
                ("pending_handshakes_per_shard", Int),
                ("driver", Str),
            ],
        ),
        ("tls", &[("cert", Str), ("key", Str)]),
        (
            "auth",
            &[
                ("keys", List),
                ("jwks", OptStr),
                ("issuer", OptStr),
                ("audience", OptStr),
                ("max_token_lifetime", Str),
                ("leeway", Str),
                ("allow_query_token", Bool),
                ("ticket_ttl", Str),
                ("allowed_origins", List),
                ("allow_missing_origin", Bool),
                ("trusted_proxies", List),
            ],
        ),
        (
            "limits",
            &[
                ("handshake_timeout", Str),
                ("per_ip_handshakes_per_sec", Int),
                ("per_ip_burst", Int),
                ("per_user_max_connections", Int),
                ("max_message_bytes", Int),
                ("max_symbols_per_connection", Int),
                ("inbound_messages_per_sec", Int),
                ("outbound_queue_bytes", Int),
                ("slow_consumer_grace", Str),
                ("max_head_bytes", Int),
                ("max_headers", Int),
                ("first_byte_timeout", Str),
                ("per_ip_pending_handshakes", Int),
            ],
        ),
        (
            "lifetime",
            &[
                ("reauth_lead", Str),
                ("reauth_grace", Str),
                ("reauth_spread", Str),
                ("heartbeat", Str),
                ("idle_timeout", Str),
            ],
        ),
        (
            "feed",
            &[
                ("simulator", Bool),
                ("simulator_symbols", List),
                ("simulator_rate", Int),
                ("max_symbols", Int),
                ("symbol_idle", Str),
            ],
        ),
        (
            "admin",
            &[
                ("listen", Str),
                ("enabled", Bool),
                ("peers", List),
                ("request_timeout", Str),
                ("max_connections", Int),
                ("max_connections_per_ip", Int),
            ],
        ),
        ("log", &[("level", Str), ("security", Str)]),
    ]
};

/// Everything that can be wrong with a configuration. Each displays as one line that
/// names the key, value or variable at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read config file: {message}")]
    Read { path: String, message: String },
    /// The text is not TOML.
    #[error("line {line}, column {column}: {message}")]
    Syntax {
        line: usize,
        column: usize,
        message: String,
    },
    /// A key has a bad value, is missing, or fails a semantic check.
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
    /// A key that does not exist (overrides).
    #[error("{key}: unknown key")]
    UnknownKey { key: String },
    /// A `TICKGATE_` environment variable that names no key.
    #[error("{var}: unknown environment variable (expected TICKGATE_<SECTION>_<KEY> naming a config key)")]
    UnknownEnv { var: String },
    /// An environment variable whose value is rejected.
    #[error("{var}: {source}")]
    Env {
        var: String,
        #[source]
        source: Box<ConfigError>,
    },
}

impl ConfigError {
    fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            message: one_line(&message.into()),
        }
    }
}

/// The whole configuration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    /// Absent: plain `ws://` (only behind a TLS-terminating proxy).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    pub auth: AuthConfig,
    pub limits: LimitsConfig,
    pub lifetime: LifetimeConfig,
    pub feed: FeedConfig,
    pub admin: AdminConfig,
    pub log: LogConfig,
}

/// `[server]`: the public listener and the thread-per-core runtime.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Public listener address. Default `0.0.0.0:8080`.
    pub listen: SocketAddr,
    /// Shard (core) count; 0 = one per available core. At most 64. Default 0.
    pub shards: usize,
    /// Pin each shard's thread to its core. Default true.
    pub pin_cores: bool,
    /// io_uring submission queue size, a power of two in 2..=32768. Default 4096.
    pub io_uring_entries: u32,
    /// io_uring SQPOLL kernel thread. Default false.
    pub sqpoll: bool,
    /// Time given to live connections to close on SIGTERM. Default 10s.
    #[serde(with = "duration_serde")]
    pub drain_timeout: Duration,
    /// Extension: live connections per shard, at most 1,000,000. Default 100000.
    pub max_connections_per_shard: usize,
    /// Extension: connections still in the upgrade, per shard. Default 1024.
    pub pending_handshakes_per_shard: usize,
    /// Extension: the I/O driver, `"auto"` (io_uring when the kernel allows it, else epoll)
    /// or `"epoll"` (always epoll, e.g. to compare, or where io_uring is audited). Default
    /// `"auto"`.
    pub driver: String,
}

/// `[tls]`: both files are required when the section is present.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// One verifying key file of `auth.keys`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRef {
    /// The `kid` that selects this key in a token header.
    pub kid: String,
    /// SPKI PEM Ed25519 public key.
    pub path: PathBuf,
}

/// `[auth]`: token verification and the upgrade's origin and proxy checks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Verifying key files. Default none.
    pub keys: Vec<KeyRef>,
    /// JWKS document with more verifying keys. Default none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwks: Option<PathBuf>,
    /// Required `iss`, when set. Default none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// Required `aud` (string or array member), when set. Default none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    /// Longest accepted token lifetime. Default 15m.
    #[serde(with = "duration_serde")]
    pub max_token_lifetime: Duration,
    /// Clock leeway for `exp`, `nbf`, `iat`. Default 30s.
    #[serde(with = "duration_serde")]
    pub leeway: Duration,
    /// Accept `?access_token=`. Default true.
    pub allow_query_token: bool,
    /// One-time ticket lifetime, in (0, 60s]. Default 30s.
    #[serde(with = "duration_serde")]
    pub ticket_ttl: Duration,
    /// Exact `scheme://host[:port]` origins. Default none.
    pub allowed_origins: Vec<String>,
    /// Accept a request without `Origin` (non-browser clients). Default false.
    pub allow_missing_origin: bool,
    /// Peers whose `X-Forwarded-For` / `Forwarded` is believed: IPs or CIDRs. Default none.
    pub trusted_proxies: Vec<String>,
}

/// `[limits]`: per-IP, per-user and per-connection bounds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Whole upgrade, first byte to `101`. Default 5s.
    #[serde(with = "duration_serde")]
    pub handshake_timeout: Duration,
    /// Token-bucket rate of requests per client IP. Default 20.
    pub per_ip_handshakes_per_sec: u32,
    /// Token-bucket size per client IP. Default 40.
    pub per_ip_burst: u32,
    /// Concurrent connections per `sub`. Default 10.
    pub per_user_max_connections: usize,
    /// Largest inbound message, in 125..=16 MiB. Default 65536.
    pub max_message_bytes: usize,
    /// Subscriptions per connection. Default 1024.
    pub max_symbols_per_connection: usize,
    /// Inbound messages per second per connection. Default 50.
    pub inbound_messages_per_sec: u32,
    /// Outbound queue bound per connection, at least 4096. Default 1048576.
    pub outbound_queue_bytes: usize,
    /// Time a conflating connection gets to drain under the bound. Default 5s.
    #[serde(with = "duration_serde")]
    pub slow_consumer_grace: Duration,
    /// Extension: HTTP request head bytes. Default 8192.
    pub max_head_bytes: usize,
    /// Extension: HTTP header lines. Default 32.
    pub max_headers: usize,
    /// Extension: a new socket must send its first byte within this (then
    /// `handshake_timeout`, counted from accept, applies). At most `handshake_timeout`.
    /// Default 2s.
    #[serde(with = "duration_serde")]
    pub first_byte_timeout: Duration,
    /// Extension: connections one client address may hold in the HTTP upgrade, per shard
    /// (sockets from `auth.trusted_proxies` are exempt). Default 64.
    pub per_ip_pending_handshakes: usize,
}

/// `[lifetime]`: reauth and liveness.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LifetimeConfig {
    /// `reauth_required` goes out this long before `exp`. Default 60s.
    #[serde(with = "duration_serde")]
    pub reauth_lead: Duration,
    /// Close with 4001 at `exp + reauth_grace`. Default 30s.
    #[serde(with = "duration_serde")]
    pub reauth_grace: Duration,
    /// Extension: `reauth_required` goes out between `reauth_lead` and `reauth_lead +
    /// reauth_spread` before `exp`, at a point drawn per connection and per token, so
    /// tokens that all expire in the same second (a reconnect storm an hour ago) are not
    /// refreshed in the same millisecond. Never more than half of the time left before
    /// `exp - reauth_lead` early, so any value is safe with short tokens. `0s` sends it at
    /// exactly `exp - reauth_lead`. At most 24h. Default 10s.
    #[serde(with = "duration_serde")]
    pub reauth_spread: Duration,
    /// WebSocket ping interval. Default 15s.
    #[serde(with = "duration_serde")]
    pub heartbeat: Duration,
    /// Close with 4000 after this long without input. Default 45s.
    #[serde(with = "duration_serde")]
    pub idle_timeout: Duration,
}

/// `[feed]`: symbols and the built-in simulator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FeedConfig {
    /// Run the demo tick generator. Default false.
    pub simulator: bool,
    /// Symbols the simulator ticks. Default `["BTC-USD", "ETH-USD"]`.
    pub simulator_symbols: Vec<String>,
    /// Ticks per second per symbol. Default 10.
    pub simulator_rate: u32,
    /// Extension: distinct symbols tracked. Default 100000.
    pub max_symbols: usize,
    /// Extension: a symbol with no subscriber (and none waiting for it) and no tick for
    /// this long gives its entry back; configured symbols never do. Default 10m.
    #[serde(with = "duration_serde")]
    pub symbol_idle: Duration,
}

/// `[admin]`: the metrics / health / revocation listener.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Default `127.0.0.1:9090`.
    pub listen: SocketAddr,
    /// Extension: run the admin listener. Default true.
    pub enabled: bool,
    /// Extension: the admin listeners (`host:port`) of the other nodes of a multi-node
    /// deployment. A revocation accepted here is relayed to each of them (PROTOCOL.md
    /// section 7, "the revocation reaches every node"). Default empty (single node).
    pub peers: Vec<String>,
    /// Extension: time a connection gets to send its whole request (head and body), from
    /// accept; the response gets as long again to be written. In 100ms..=60s. Default 2s.
    #[serde(with = "duration_serde")]
    pub request_timeout: Duration,
    /// Extension: admin connections in flight, in 1..=4096. When full, the oldest one still
    /// sending its request is closed to make room. Default 64.
    pub max_connections: usize,
    /// Extension: admin connections in flight per peer IP, in
    /// 1..=`admin.max_connections`. Default 16.
    pub max_connections_per_ip: usize,
}

/// `[log]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `trace`, `debug`, `info`, `warn` or `error`. Default `info`.
    pub level: String,
    /// Security log destination: `stdout`, `stderr` or a file path (JSON lines).
    /// Default `stdout`.
    pub security: String,
}

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
            per_ip_pending_handshakes: 64,
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
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            enabled: true,
            peers: Vec::new(),
            request_timeout: Duration::from_secs(2),
            max_connections: 64,
            max_connections_per_ip: 16,
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

    /// Parses a TOML document. Absent keys take their defaults; unknown keys, bad values
    /// and a `[tls]` without both files are errors. Does not run [`Config::validate`].
    pub fn from_toml_str(s: &str) -> Result<Config, ConfigError> {
        from_table(parse_table(s)?)
    }

    /// Reads the file at `path`, then applies the `TICKGATE_<SECTION>_<KEY>` variables of
    /// `env` (pass `std::env::vars().collect()`); other variables are ignored, an unknown
    /// `TICKGATE_` one is an error. Does not run [`Config::validate`] (CLI flags come
    /// later): call it once everything is applied.
    pub fn load(path: &Path, env: &[(String, String)]) -> Result<Config, ConfigError> {
        let text = read_bounded(path)?;
        let table = parse_table(&text)?;
        // Reject file errors first, naming the file's key rather than a variable.
        from_table(table.clone())?;
        with_env(table, env)
    }

    /// Applies the `TICKGATE_<SECTION>_<KEY>` variables of `env` to a config that did not
    /// come from a file (the demo): the same rules and errors as [`Config::load`].
    pub fn apply_env(&mut self, env: &[(String, String)]) -> Result<(), ConfigError> {
        *self = with_env(self.to_table()?, env)?;
        Ok(())
    }

    /// Sets `section.key` from its string form, typed as [`KEYS`] says (see the module
    /// doc for lists and optional keys). The result goes through the same checks as the
    /// file; on error `self` is unchanged.
    pub fn apply_override(&mut self, section: &str, key: &str, value: &str) -> Result<(), ConfigError> {
        let mut table = self.to_table()?;
        set_in_table(&mut table, section, key, value)?;
        *self = from_table(table)?;
        Ok(())
    }

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
        self.validate_admin_log()
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

    /// The effective settings as TOML, defaults included (what `check-config` prints).
    /// Absent optional keys are omitted. Parses back to an equal `Config`.
    pub fn to_toml_string(&self) -> String {
        match toml::to_string(self) {
            Ok(s) => s,
            // Every field is a string, integer, bool, array or table: serialization of
            // this shape cannot fail.
            Err(e) => unreachable!("config serialization failed: {e}"),
        }
    }

    fn to_table(&self) -> Result<toml::Table, ConfigError> {
        toml::Table::try_from(self).map_err(|e| ConfigError::invalid("config", e.to_string()))
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
        if l.first_byte_timeout.is_zero() || l.first_byte_timeout > l.handshake_timeout {
            return Err(ConfigError::invalid(
                "limits.first_byte_timeout",
                "must be above 0 and at most limits.handshake_timeout",
            ));
        }
        if l.per_ip_pending_handshakes == 0
            || l.per_ip_pending_handshakes > self.server.pending_handshakes_per_shard
        {
            return Err(ConfigError::invalid(
                "limits.per_ip_pending_handshakes",
                format!(
                    "{} is not in 1..=server.pending_handshakes_per_shard ({})",
                    l.per_ip_pending_handshakes, self.server.pending_handshakes_per_shard
                ),
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
        if self.admin.peers.len() > crate::cluster::MAX_PEERS {
            return Err(ConfigError::invalid(
                "admin.peers",
                format!("at most {} peers", crate::cluster::MAX_PEERS),
            ));
        }
        for (i, p) in self.admin.peers.iter().enumerate() {
            if let Err(why) = crate::cluster::check_peer(p) {
                return Err(ConfigError::invalid(format!("admin.peers[{i}]"), why));
            }
        }
        if !self.admin.peers.is_empty() && !self.admin.enabled {
            return Err(ConfigError::invalid(
                "admin.peers",
                "relaying revocations needs the admin listener (admin.enabled = true)",
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

/// Collapses a possibly multi-line message (toml's) into one line.
fn one_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

fn read_bounded(path: &Path) -> Result<String, ConfigError> {
    let err = |message: String| ConfigError::Read {
        path: path.display().to_string(),
        message: one_line(&message),
    };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(err(format!(
            "{} bytes is larger than {MAX_FILE_BYTES}",
            meta.len()
        )));
    }
    std::fs::read_to_string(path).map_err(|e| err(e.to_string()))
}

/// Parses TOML syntax only; a syntax error becomes `line L, column C: message`.
fn parse_table(s: &str) -> Result<toml::Table, ConfigError> {
    s.parse::<toml::Table>().map_err(|e| {
        let (line, column) = match e.span() {
            Some(span) => line_column(s, span.start),
            None => (1, 1),
        };
        ConfigError::Syntax {
            line,
            column,
            message: one_line(e.message()),
        }
    })
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(s: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(s.len());
    while !s.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &s[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// Deserializes a parsed table, turning toml's error into `key.path: message`.
fn from_table(table: toml::Table) -> Result<Config, ConfigError> {
    Config::deserialize(toml::Value::Table(table)).map_err(|e| de_error(&e))
}

/// toml's error (from a `Value`, so without a source snippet) displays as the message
/// followed by a line "in `a.b`" naming the keys it unwound through; that line is the
/// only public way to the key path.
fn de_error(e: &toml::de::Error) -> ConfigError {
    let message = e.message().trim().to_owned();
    let display = e.to_string();
    let path = display
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("in `")?.strip_suffix('`'))
        .unwrap_or("")
        .to_owned();
    let join = |leaf: &str| {
        if path.is_empty() {
            leaf.to_owned()
        } else {
            format!("{path}.{leaf}")
        }
    };
    // serde names the offending key inside the message for these two; move it into
    // the path so the line starts with the full key.
    if let Some((field, tail)) = message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split_once('`'))
    {
        let tail = tail.trim_start_matches(',').trim();
        let message = if tail.is_empty() {
            "unknown key".to_owned()
        } else {
            format!("unknown key, {tail}")
        };
        return ConfigError::invalid(join(field), message);
    }
    if let Some((field, _)) = message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split_once('`'))
    {
        return ConfigError::invalid(join(field), "missing key");
    }
    let key = if path.is_empty() {
        "config".to_owned()
    } else {
        path
    };
    ConfigError::invalid(key, message)
}

/// The one home of environment overrides: applies the `TICKGATE_` variables of `env` to
/// `table` (other variables are ignored, an unknown `TICKGATE_` one is an error) and
/// builds the config, naming the variable whose value broke it.
fn with_env(mut table: toml::Table, env: &[(String, String)]) -> Result<Config, ConfigError> {
    let mut applied: Vec<(&str, String)> = Vec::new();
    for (var, value) in env {
        let Some(rest) = var.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let (section, key) =
            split_env_name(rest).ok_or_else(|| ConfigError::UnknownEnv { var: var.clone() })?;
        set_in_table(&mut table, &section, &key, value).map_err(|e| match e {
            ConfigError::UnknownKey { .. } => ConfigError::UnknownEnv { var: var.clone() },
            other => ConfigError::Env {
                var: var.clone(),
                source: Box::new(other),
            },
        })?;
        applied.push((var.as_str(), format!("{section}.{key}")));
    }
    from_table(table).map_err(|e| match &e {
        // Point at the variable whose value broke it.
        ConfigError::Invalid { key, .. } => {
            match applied.iter().rev().find(|(_, k)| key.starts_with(k.as_str())) {
                Some((var, _)) => ConfigError::Env {
                    var: (*var).to_owned(),
                    source: Box::new(e),
                },
                None => e,
            }
        }
        _ => e,
    })
}

/// `SERVER_MAX_CONNECTIONS_PER_SHARD` -> (`server`, `max_connections_per_shard`).
/// Section names contain no `_`, so the first one separates section and key.
fn split_env_name(rest: &str) -> Option<(String, String)> {
    let (section, key) = rest.split_once('_')?;
    if section.is_empty() || key.is_empty() {
        return None;
    }
    Some((section.to_ascii_lowercase(), key.to_ascii_lowercase()))
}

fn key_kind(section: &str, key: &str) -> Option<KeyKind> {
    KEYS.iter()
        .find(|(s, _)| *s == section)?
        .1
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, kind)| *kind)
}

/// Writes an override into the table, typed by [`KEYS`].
fn set_in_table(table: &mut toml::Table, section: &str, key: &str, raw: &str) -> Result<(), ConfigError> {
    let path = format!("{section}.{key}");
    let kind = key_kind(section, key).ok_or_else(|| ConfigError::UnknownKey { key: path.clone() })?;
    let value = match kind {
        KeyKind::Str => Some(toml::Value::String(raw.to_owned())),
        KeyKind::OptStr if raw.is_empty() => None,
        KeyKind::OptStr => Some(toml::Value::String(raw.to_owned())),
        KeyKind::Int => {
            let n = raw
                .trim()
                .parse::<i64>()
                .map_err(|_| ConfigError::invalid(&path, format!("invalid integer {raw:?}")))?;
            Some(toml::Value::Integer(n))
        }
        KeyKind::Bool => match raw.trim() {
            "true" => Some(toml::Value::Boolean(true)),
            "false" => Some(toml::Value::Boolean(false)),
            _ => {
                return Err(ConfigError::invalid(
                    &path,
                    format!("invalid boolean {raw:?} (expected true or false)"),
                ));
            }
        },
        KeyKind::List => Some(parse_list(raw).map_err(|m| ConfigError::invalid(&path, m))?),
    };
    let entry = table
        .entry(section.to_owned())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let toml::Value::Table(sect) = entry else {
        return Err(ConfigError::invalid(section, "is not a table"));
    };
    match value {
        Some(v) => {
            sect.insert(key.to_owned(), v);
        }
        None => {
            sect.remove(key);
        }
    }
    Ok(())
}

/// A list override: a TOML array literal when it starts with `[`, else comma-separated
/// strings (trimmed, empty items dropped).
fn parse_list(raw: &str) -> Result<toml::Value, String> {
    let trimmed = raw.trim();
    if trimmed.starts_with('[') {
        let doc = format!("v = {trimmed}");
        let mut t: toml::Table = doc
            .parse()
            .map_err(|e: toml::de::Error| format!("invalid TOML array: {}", one_line(e.message())))?;
        return match t.remove("v") {
            Some(v @ toml::Value::Array(_)) => Ok(v),
            _ => Err("invalid TOML array".to_owned()),
        };
    }
    Ok(toml::Value::Array(
        trimmed
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| toml::Value::String(s.to_owned()))
            .collect(),
    ))
}

/// Parses `"250ms"`, `"10s"`, `"15m"`, `"1h"`: an integer amount and a unit, nothing else.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("invalid duration {s:?} (expected a number with a unit: ms, s, m, h)");
    if s.len() > 32 {
        return Err(bad());
    }
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    if digits.is_empty() {
        return Err(bad());
    }
    let factor: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(bad()),
    };
    let amount: u64 = digits.parse().map_err(|_| bad())?;
    let ms = amount
        .checked_mul(factor)
        .ok_or_else(|| format!("duration {s:?} is too large"))?;
    Ok(Duration::from_millis(ms))
}

/// Writes a duration with the largest unit that is exact (`"90s"`, `"15m"`, `"250ms"`).
pub fn format_duration(d: Duration) -> String {
    let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    if ms == 0 {
        "0s".to_owned()
    } else if ms % 3_600_000 == 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms % 60_000 == 0 {
        format!("{}m", ms / 60_000)
    } else if ms % 1_000 == 0 {
        format!("{}s", ms / 1_000)
    } else {
        format!("{ms}ms")
    }
}

mod duration_serde {
    use super::{format_duration, parse_duration};
    use serde::de::{self, Visitor};
    use serde::{Deserializer, Serializer};
    use std::fmt;
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_duration(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        d.deserialize_any(DurationVisitor)
    }

    struct DurationVisitor;

    impl DurationVisitor {
        fn bare<E: de::Error>(v: impl fmt::Display) -> E {
            E::custom(format!(
                "invalid duration {v} (expected a string with a unit such as \"{v}s\": ms, s, m, h)"
            ))
        }
    }

    impl Visitor<'_> for DurationVisitor {
        type Value = Duration;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a duration string with a unit (ms, s, m, h)")
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
            parse_duration(v).map_err(E::custom)
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
            Err(Self::bare(v))
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
            Err(Self::bare(v))
        }

        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Duration, E> {
            Err(Self::bare(v))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of OPS.md, verbatim.
    const OPS_EXAMPLE: &str = r#"
[server]
listen = "0.0.0.0:8080"
shards = 0                      # 0 = one per available core
pin_cores = true
io_uring_entries = 4096
sqpoll = false                  # io_uring SQPOLL thread
drain_timeout = "10s"

[tls]                           # absent = plain ws:// (only behind a TLS-terminating proxy)
cert = "/etc/tickgate/tls.crt"
key = "/etc/tickgate/tls.key"

[auth]
keys = [{ kid = "k1", path = "/etc/tickgate/k1.pub" }]   # and/or:
jwks = "/etc/tickgate/jwks.json"
issuer = "https://auth.example.com"      # optional
audience = "tickgate"                    # optional
max_token_lifetime = "15m"
leeway = "30s"
allow_query_token = true
ticket_ttl = "30s"
allowed_origins = ["https://app.example.com"]
allow_missing_origin = false
trusted_proxies = ["10.0.0.0/8"]

[limits]
handshake_timeout = "5s"
per_ip_handshakes_per_sec = 20
per_ip_burst = 40
per_user_max_connections = 10
max_message_bytes = 65536
max_symbols_per_connection = 1024
inbound_messages_per_sec = 50
outbound_queue_bytes = 1048576
slow_consumer_grace = "5s"

[lifetime]
reauth_lead = "60s"
reauth_grace = "30s"
heartbeat = "15s"
idle_timeout = "45s"

[feed]
simulator = false               # the demo's tick generator
simulator_symbols = ["BTC-USD", "ETH-USD"]
simulator_rate = 10             # ticks per second per symbol

[admin]
listen = "127.0.0.1:9090"       # /metrics, /healthz, /readyz, /admin/*

[log]
level = "info"
security = "stdout"             # or a file path: JSON lines, one per security event
"#;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
        vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn write_tmp(text: &str) -> tempfile::NamedTempFile {
        use std::io::Write;
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    fn err_line(e: &ConfigError) -> String {
        let s = e.to_string();
        assert!(!s.contains('\n'), "multi-line error: {s:?}");
        s
    }

    #[test]
    fn defaults_are_the_ops_values() {
        let c = Config::default_production();
        assert_eq!(c.server.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(c.server.shards, 0);
        assert!(c.server.pin_cores);
        assert_eq!(c.server.io_uring_entries, 4096);
        assert!(!c.server.sqpoll);
        assert_eq!(c.server.driver, "auto");
        assert_eq!(c.server.drain_timeout, secs(10));
        assert_eq!(c.server.max_connections_per_shard, 100_000);
        assert_eq!(c.server.pending_handshakes_per_shard, 1024);
        assert_eq!(c.tls, None);
        assert!(c.auth.keys.is_empty());
        assert_eq!(c.auth.jwks, None);
        assert_eq!(c.auth.issuer, None);
        assert_eq!(c.auth.audience, None);
        assert_eq!(c.auth.max_token_lifetime, secs(15 * 60));
        assert_eq!(c.auth.leeway, secs(30));
        assert!(c.auth.allow_query_token);
        assert_eq!(c.auth.ticket_ttl, secs(30));
        assert!(c.auth.allowed_origins.is_empty());
        assert!(!c.auth.allow_missing_origin);
        assert!(c.auth.trusted_proxies.is_empty());
        let l = &c.limits;
        assert_eq!(l.handshake_timeout, secs(5));
        assert_eq!(l.per_ip_handshakes_per_sec, 20);
        assert_eq!(l.per_ip_burst, 40);
        assert_eq!(l.per_user_max_connections, 10);
        assert_eq!(l.max_message_bytes, 65536);
        assert_eq!(l.max_symbols_per_connection, 1024);
        assert_eq!(l.inbound_messages_per_sec, 50);
        assert_eq!(l.outbound_queue_bytes, 1_048_576);
        assert_eq!(l.slow_consumer_grace, secs(5));
        assert_eq!(l.max_head_bytes, 8192);
        assert_eq!(l.max_headers, 32);
        assert_eq!(l.first_byte_timeout, secs(2));
        assert_eq!(l.per_ip_pending_handshakes, 64);
        assert_eq!(c.lifetime.reauth_lead, secs(60));
        assert_eq!(c.lifetime.reauth_grace, secs(30));
        assert_eq!(c.lifetime.heartbeat, secs(15));
        assert_eq!(c.lifetime.idle_timeout, secs(45));
        assert!(!c.feed.simulator);
        assert_eq!(c.feed.simulator_symbols, vec!["BTC-USD", "ETH-USD"]);
        assert_eq!(c.feed.simulator_rate, 10);
        assert_eq!(c.feed.max_symbols, 100_000);
        assert_eq!(c.feed.symbol_idle, secs(600));
        assert_eq!(c.admin.listen, "127.0.0.1:9090".parse().unwrap());
        assert!(c.admin.enabled);
        assert_eq!(c.admin.request_timeout, secs(2));
        assert_eq!(c.admin.max_connections, 64);
        assert_eq!(c.admin.max_connections_per_ip, 16);
        assert_eq!(c.log.level, "info");
        assert_eq!(c.log.security, "stdout");
        c.validate().unwrap();
        assert_eq!(Config::from_toml_str("").unwrap(), c, "empty file = defaults");
    }

    #[test]
    fn ops_example_parses() {
        let c = Config::from_toml_str(OPS_EXAMPLE).unwrap();
        let mut want = Config::default_production();
        want.tls = Some(TlsConfig {
            cert: "/etc/tickgate/tls.crt".into(),
            key: "/etc/tickgate/tls.key".into(),
        });
        want.auth.keys = vec![KeyRef {
            kid: "k1".into(),
            path: "/etc/tickgate/k1.pub".into(),
        }];
        want.auth.jwks = Some("/etc/tickgate/jwks.json".into());
        want.auth.issuer = Some("https://auth.example.com".into());
        want.auth.audience = Some("tickgate".into());
        want.auth.allowed_origins = vec!["https://app.example.com".into()];
        want.auth.trusted_proxies = vec!["10.0.0.0/8".into()];
        assert_eq!(c, want);
        c.validate().unwrap();
    }

    #[test]
    fn round_trip_through_toml() {
        for c in [
            Config::default_production(),
            Config::from_toml_str(OPS_EXAMPLE).unwrap(),
        ] {
            let text = c.to_toml_string();
            assert_eq!(Config::from_toml_str(&text).unwrap(), c, "{text}");
        }
        let mut c = Config::from_toml_str(OPS_EXAMPLE).unwrap();
        c.auth.keys.push(KeyRef {
            kid: "k2".into(),
            path: "/k2.pub".into(),
        });
        c.lifetime.reauth_grace = Duration::from_millis(1500);
        c.server.drain_timeout = secs(7200);
        c.limits.handshake_timeout = secs(90);
        let text = c.to_toml_string();
        assert!(text.contains("reauth_grace = \"1500ms\""), "{text}");
        assert!(text.contains("drain_timeout = \"2h\""), "{text}");
        assert!(text.contains("handshake_timeout = \"90s\""), "{text}");
        assert!(text.contains("max_token_lifetime = \"15m\""), "{text}");
        assert_eq!(Config::from_toml_str(&text).unwrap(), c, "{text}");
    }

    #[test]
    fn keys_table_matches_the_structs() {
        let mut c = Config::from_toml_str(OPS_EXAMPLE).unwrap();
        c.auth.keys.clear();
        let t = c.to_table().unwrap();
        let mut sections: Vec<&str> = t.keys().map(String::as_str).collect();
        sections.sort();
        let mut want: Vec<&str> = KEYS.iter().map(|(s, _)| *s).collect();
        want.sort();
        assert_eq!(sections, want);
        for (section, keys) in KEYS {
            let toml::Value::Table(st) = &t[*section] else {
                panic!("{section}")
            };
            assert_eq!(st.len(), keys.len(), "{section}");
            for (key, kind) in *keys {
                let v = &st[*key];
                let ok = match kind {
                    KeyKind::Str | KeyKind::OptStr => v.is_str(),
                    KeyKind::Int => v.is_integer(),
                    KeyKind::Bool => v.is_bool(),
                    KeyKind::List => v.is_array(),
                };
                assert!(ok, "{section}.{key} is {kind:?} but serializes as {v:?}");
            }
        }
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let e = Config::from_toml_str("bogus = 1").unwrap_err();
        let s = err_line(&e);
        assert!(s.starts_with("bogus: unknown key"), "{s}");
        let e = Config::from_toml_str("[servre]\nlisten = \"1.2.3.4:5\"").unwrap_err();
        assert!(err_line(&e).starts_with("servre: unknown key"), "{e}");
        let e = Config::from_toml_str("[limits]\nmax_mesage_bytes = 5").unwrap_err();
        let s = err_line(&e);
        assert!(s.starts_with("limits.max_mesage_bytes: unknown key"), "{s}");
        let e = Config::from_toml_str("[auth]\nkeys = [{ kid = \"k1\", path = \"/p\", alg = \"x\" }]")
            .unwrap_err();
        assert!(err_line(&e).starts_with("auth.keys.alg: unknown key"), "{e}");
        let e = Config::from_toml_str("[tls]\ncert = \"/c\"\nkey = \"/k\"\nca = \"/x\"").unwrap_err();
        assert!(err_line(&e).starts_with("tls.ca: unknown key"), "{e}");
    }

    #[test]
    fn missing_tls_file_names_the_key() {
        let e = Config::from_toml_str("[tls]\ncert = \"/c\"").unwrap_err();
        assert_eq!(err_line(&e), "tls.key: missing key");
    }

    #[test]
    fn bad_values_name_the_key() {
        let cases = [
            (
                "[limits]\nhandshake_timeout = \"5\"",
                "limits.handshake_timeout: invalid duration \"5\" (expected a number with a unit: ms, s, m, h)",
            ),
            (
                "[limits]\nhandshake_timeout = 5",
                "limits.handshake_timeout: invalid duration 5",
            ),
            (
                "[lifetime]\nheartbeat = \"15 s\"",
                "lifetime.heartbeat: invalid duration \"15 s\"",
            ),
            (
                "[lifetime]\nheartbeat = \"1.5s\"",
                "lifetime.heartbeat: invalid duration",
            ),
            (
                "[lifetime]\nheartbeat = \"s\"",
                "lifetime.heartbeat: invalid duration",
            ),
            (
                "[lifetime]\nheartbeat = \"-1s\"",
                "lifetime.heartbeat: invalid duration",
            ),
            (
                "[lifetime]\nheartbeat = \"10d\"",
                "lifetime.heartbeat: invalid duration",
            ),
            (
                "[lifetime]\nheartbeat = \"99999999999999999999h\"",
                "lifetime.heartbeat: invalid duration",
            ),
            (
                "[lifetime]\nheartbeat = \"9999999999999999h\"",
                "lifetime.heartbeat: duration \"9999999999999999h\" is too large",
            ),
            ("[server]\nlisten = \"nope\"", "server.listen: "),
            ("[server]\nshards = -1", "server.shards: "),
            ("[server]\npin_cores = \"yes\"", "server.pin_cores: "),
            ("[limits]\nper_ip_burst = 5000000000", "limits.per_ip_burst: "),
            (
                "[feed]\nsimulator_symbols = \"BTC-USD\"",
                "feed.simulator_symbols: ",
            ),
            ("[auth]\nkeys = [{ kid = \"k1\" }]", "auth.keys.path: missing key"),
            ("server = 5", "server: "),
        ];
        for (text, want) in cases {
            let e = Config::from_toml_str(text).unwrap_err();
            let s = err_line(&e);
            assert!(s.starts_with(want), "{text:?}: got {s:?}, want {want:?}");
        }
    }

    #[test]
    fn syntax_errors_are_one_line_with_position() {
        let e = Config::from_toml_str("[server]\nlisten = \"x\"\nshards = = 1").unwrap_err();
        let s = err_line(&e);
        assert!(s.starts_with("line 3, column "), "{s}");
        let e = Config::from_toml_str("[server]\nshards = 1\nshards = 2").unwrap_err();
        assert!(err_line(&e).starts_with("line "), "{e}");
        let e = Config::from_toml_str("[server").unwrap_err();
        assert!(err_line(&e).starts_with("line 1"), "{e}");
    }

    #[test]
    fn durations_parse_and_format() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(secs(10)));
        assert_eq!(parse_duration("15m"), Ok(secs(900)));
        assert_eq!(parse_duration("1h"), Ok(secs(3600)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        for bad in [
            "", "5", "ms", "5 s", " 5s", "5S", "5sec", "+5s", "5.0s", "1e3ms", "5µs",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        for (d, s) in [
            (Duration::ZERO, "0s"),
            (Duration::from_millis(250), "250ms"),
            (Duration::from_millis(1500), "1500ms"),
            (secs(10), "10s"),
            (secs(90), "90s"),
            (secs(900), "15m"),
            (secs(3600), "1h"),
            (secs(5400), "90m"),
        ] {
            assert_eq!(format_duration(d), s);
            assert_eq!(parse_duration(s), Ok(d));
        }
    }

    #[test]
    fn overrides_of_every_type() {
        let mut c = Config::default_production();
        c.apply_override("server", "listen", "0.0.0.0:9000").unwrap();
        assert_eq!(c.server.listen, "0.0.0.0:9000".parse().unwrap());
        c.apply_override("server", "sqpoll", "true").unwrap();
        assert!(c.server.sqpoll);
        c.apply_override("server", "driver", "epoll").unwrap();
        assert_eq!(c.server.driver, "epoll");
        c.apply_override("admin", "request_timeout", "500ms").unwrap();
        assert_eq!(c.admin.request_timeout, Duration::from_millis(500));
        c.apply_override("admin", "max_connections_per_ip", "4").unwrap();
        assert_eq!(c.admin.max_connections_per_ip, 4);
        c.validate().unwrap();
        c.apply_override("limits", "max_message_bytes", "1024").unwrap();
        assert_eq!(c.limits.max_message_bytes, 1024);
        c.apply_override("lifetime", "heartbeat", "250ms").unwrap();
        assert_eq!(c.lifetime.heartbeat, Duration::from_millis(250));
        c.apply_override("auth", "allowed_origins", "https://a, https://b,")
            .unwrap();
        assert_eq!(c.auth.allowed_origins, vec!["https://a", "https://b"]);
        c.apply_override("auth", "allowed_origins", "[\"https://c\"]")
            .unwrap();
        assert_eq!(c.auth.allowed_origins, vec!["https://c"]);
        c.apply_override("auth", "allowed_origins", "").unwrap();
        assert!(c.auth.allowed_origins.is_empty());
        c.apply_override("auth", "keys", "[{kid=\"k9\",path=\"/k9.pub\"}]")
            .unwrap();
        assert_eq!(c.auth.keys[0].kid, "k9");
        c.apply_override("auth", "issuer", "https://iss").unwrap();
        assert_eq!(c.auth.issuer.as_deref(), Some("https://iss"));
        c.apply_override("auth", "issuer", "").unwrap();
        assert_eq!(c.auth.issuer, None);
        c.validate().unwrap();

        let before = c.clone();
        for (section, key, value, want) in [
            ("server", "listen", "nope", "server.listen: "),
            ("server", "pin_cores", "yes", "server.pin_cores: invalid boolean"),
            ("server", "shards", "many", "server.shards: invalid integer"),
            ("server", "shards", "-3", "server.shards: "),
            (
                "lifetime",
                "heartbeat",
                "15",
                "lifetime.heartbeat: invalid duration \"15\"",
            ),
            ("auth", "keys", "k1", "auth.keys: "),
            ("auth", "keys", "[1,", "auth.keys: invalid TOML array"),
            ("server", "nope", "1", "server.nope: unknown key"),
            ("nope", "listen", "1", "nope.listen: unknown key"),
            ("tls", "cert", "/c", "tls.key: missing key"),
        ] {
            let e = c.apply_override(section, key, value).unwrap_err();
            let s = err_line(&e);
            assert!(s.starts_with(want), "{section}.{key}={value:?}: {s}");
            assert_eq!(c, before, "failed override changed the config");
        }
    }

    #[test]
    fn load_applies_env_after_file() {
        let f = write_tmp(OPS_EXAMPLE);
        let c = Config::load(
            f.path(),
            &env(&[
                ("PATH", "/bin"),
                ("TICKGATE_SERVER_LISTEN", "0.0.0.0:9000"),
                ("TICKGATE_LIMITS_MAX_MESSAGE_BYTES", "1024"),
                ("TICKGATE_AUTH_ALLOWED_ORIGINS", "https://a,https://b"),
                ("TICKGATE_AUTH_ALLOW_MISSING_ORIGIN", "true"),
                ("TICKGATE_LIFETIME_IDLE_TIMEOUT", "2m"),
                ("TICKGATE_TLS_CERT", "/other.crt"),
                ("TICKGATE_AUTH_AUDIENCE", ""),
            ]),
        )
        .unwrap();
        assert_eq!(c.server.listen, "0.0.0.0:9000".parse().unwrap());
        assert_eq!(c.limits.max_message_bytes, 1024);
        assert_eq!(c.auth.allowed_origins, vec!["https://a", "https://b"]);
        assert!(c.auth.allow_missing_origin);
        assert_eq!(c.lifetime.idle_timeout, secs(120));
        assert_eq!(c.tls.as_ref().unwrap().cert, PathBuf::from("/other.crt"));
        assert_eq!(c.auth.audience, None);
        assert_eq!(c.log.level, "info", "file values kept");
        c.validate().unwrap();

        // Both TLS files from the environment on top of a file without [tls].
        let f2 = write_tmp("[log]\nlevel = \"warn\"\n");
        let c = Config::load(
            f2.path(),
            &env(&[("TICKGATE_TLS_CERT", "/c"), ("TICKGATE_TLS_KEY", "/k")]),
        )
        .unwrap();
        assert_eq!(
            c.tls,
            Some(TlsConfig {
                cert: "/c".into(),
                key: "/k".into()
            })
        );
        assert_eq!(c.log.level, "warn");
    }

    #[test]
    fn load_errors() {
        let f = write_tmp(OPS_EXAMPLE);
        for var in [
            "TICKGATE_SERVER_LISTN",
            "TICKGATE_SERVERLISTEN",
            "TICKGATE_",
            "TICKGATE_NOPE_LISTEN",
            "TICKGATE_CONFIG",
        ] {
            let e = Config::load(f.path(), &env(&[(var, "1")])).unwrap_err();
            assert_eq!(e, ConfigError::UnknownEnv { var: var.into() });
            assert!(err_line(&e).starts_with(var));
        }
        let e = Config::load(f.path(), &env(&[("TICKGATE_LIFETIME_HEARTBEAT", "15")])).unwrap_err();
        assert_eq!(
            err_line(&e),
            "TICKGATE_LIFETIME_HEARTBEAT: lifetime.heartbeat: invalid duration \"15\" (expected a number with a unit: ms, s, m, h)"
        );
        let e = Config::load(f.path(), &env(&[("TICKGATE_SERVER_LISTEN", "x")])).unwrap_err();
        assert!(
            err_line(&e).starts_with("TICKGATE_SERVER_LISTEN: server.listen: "),
            "{e}"
        );
        let e = Config::load(f.path(), &env(&[("TICKGATE_SERVER_SQPOLL", "on")])).unwrap_err();
        assert!(
            err_line(&e).starts_with("TICKGATE_SERVER_SQPOLL: server.sqpoll: "),
            "{e}"
        );

        let e = Config::load(Path::new("/nonexistent/tickgate.toml"), &[]).unwrap_err();
        assert!(
            err_line(&e).starts_with("/nonexistent/tickgate.toml: cannot read"),
            "{e}"
        );
        let bad = write_tmp("[limits]\nhandshake_timeout = \"5\"\n");
        let e = Config::load(bad.path(), &[]).unwrap_err();
        assert!(
            err_line(&e).starts_with("limits.handshake_timeout: invalid duration"),
            "{e}"
        );
    }

    #[test]
    fn validate_rejects_each_rule_in_one_line() {
        let base = Config::from_toml_str(OPS_EXAMPLE).unwrap();
        type Mutation = Box<dyn Fn(&mut Config)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (
                Box::new(|c| c.lifetime.reauth_spread = secs(24 * 3600 + 1)),
                "lifetime.reauth_spread",
            ),
            (Box::new(|c| c.auth.ticket_ttl = secs(61)), "auth.ticket_ttl"),
            (
                Box::new(|c| c.auth.ticket_ttl = Duration::ZERO),
                "auth.ticket_ttl",
            ),
            (
                Box::new(|c| c.lifetime.reauth_lead = secs(15 * 60)),
                "lifetime.reauth_lead",
            ),
            (
                Box::new(|c| c.lifetime.idle_timeout = secs(15)),
                "lifetime.idle_timeout",
            ),
            (
                Box::new(|c| c.lifetime.heartbeat = Duration::ZERO),
                "lifetime.heartbeat",
            ),
            (
                Box::new(|c| c.server.io_uring_entries = 1000),
                "server.io_uring_entries",
            ),
            (
                Box::new(|c| c.server.io_uring_entries = 65536),
                "server.io_uring_entries",
            ),
            (
                Box::new(|c| c.server.io_uring_entries = 1),
                "server.io_uring_entries",
            ),
            (Box::new(|c| c.server.shards = 65), "server.shards"),
            (
                Box::new(|c| c.limits.outbound_queue_bytes = 4095),
                "limits.outbound_queue_bytes",
            ),
            (
                Box::new(|c| c.limits.max_message_bytes = 124),
                "limits.max_message_bytes",
            ),
            (
                Box::new(|c| c.limits.max_message_bytes = (16 << 20) + 1),
                "limits.max_message_bytes",
            ),
            (Box::new(|c| c.limits.per_ip_burst = 0), "limits.per_ip_burst"),
            (Box::new(|c| c.limits.max_headers = 1000), "limits.max_headers"),
            (
                Box::new(|c| c.limits.max_head_bytes = 100),
                "limits.max_head_bytes",
            ),
            (
                Box::new(|c| c.limits.handshake_timeout = Duration::ZERO),
                "limits.handshake_timeout",
            ),
            (
                Box::new(|c| {
                    c.auth.keys.push(KeyRef {
                        kid: "k1".into(),
                        path: "/x".into(),
                    })
                }),
                "auth.keys[1].kid: kid \"k1\" is given twice",
            ),
            (
                Box::new(|c| c.auth.keys[0].kid = "bad kid\n".into()),
                "auth.keys[0].kid",
            ),
            (
                Box::new(|c| {
                    c.tls = Some(TlsConfig {
                        cert: "".into(),
                        key: "/k".into(),
                    })
                }),
                "tls.cert",
            ),
            (
                Box::new(|c| {
                    c.tls = Some(TlsConfig {
                        cert: "/a".into(),
                        key: "/a".into(),
                    })
                }),
                "tls.key",
            ),
            (
                Box::new(|c| c.auth.allowed_origins = vec!["https://app.example.com/".into()]),
                "auth.allowed_origins[0]",
            ),
            (
                Box::new(|c| c.auth.allowed_origins = vec!["app.example.com".into()]),
                "auth.allowed_origins[0]",
            ),
            (
                Box::new(|c| c.auth.allowed_origins = vec!["https://App.example.com".into()]),
                "auth.allowed_origins[0]",
            ),
            (
                Box::new(|c| c.auth.allowed_origins = vec!["https://a:99999".into()]),
                "auth.allowed_origins[0]",
            ),
            (
                Box::new(|c| c.auth.trusted_proxies = vec!["10.0.0.0/33".into()]),
                "auth.trusted_proxies[0]",
            ),
            (
                Box::new(|c| c.auth.trusted_proxies = vec!["proxy.local".into()]),
                "auth.trusted_proxies[0]",
            ),
            (
                Box::new(|c| c.feed.simulator_symbols = vec!["btc-usd".into()]),
                "feed.simulator_symbols[0]",
            ),
            (Box::new(|c| c.admin.listen = c.server.listen), "admin.listen"),
            (Box::new(|c| c.log.level = "verbose".into()), "log.level"),
            (
                Box::new(|c| c.server.pending_handshakes_per_shard = 0),
                "server.pending_handshakes_per_shard",
            ),
            (
                Box::new(|c| c.server.max_connections_per_shard = 2_000_000),
                "server.max_connections_per_shard",
            ),
            (Box::new(|c| c.server.driver = "uring".into()), "server.driver"),
            (Box::new(|c| c.server.driver = "EPOLL".into()), "server.driver"),
            (
                Box::new(|c| c.limits.max_symbols_per_connection = 200_000),
                "limits.max_symbols_per_connection",
            ),
            (
                Box::new(|c| c.admin.peers = vec!["10.0.0.2:9090".into(), "http://n3:9090".into()]),
                "admin.peers[1]",
            ),
            (
                Box::new(|c| c.admin.peers = vec!["n2:9090".into(); 65]),
                "admin.peers",
            ),
            (
                Box::new(|c| {
                    c.admin.peers = vec!["n2:9090".into()];
                    c.admin.enabled = false;
                }),
                "admin.peers",
            ),
            (
                Box::new(|c| c.admin.request_timeout = Duration::from_millis(99)),
                "admin.request_timeout",
            ),
            (
                Box::new(|c| c.admin.request_timeout = secs(61)),
                "admin.request_timeout",
            ),
            (Box::new(|c| c.admin.max_connections = 0), "admin.max_connections"),
            (
                Box::new(|c| c.admin.max_connections = 4097),
                "admin.max_connections",
            ),
            (
                Box::new(|c| c.admin.max_connections_per_ip = 0),
                "admin.max_connections_per_ip",
            ),
            (
                Box::new(|c| {
                    c.admin.max_connections = 8;
                    c.admin.max_connections_per_ip = 9;
                }),
                "admin.max_connections_per_ip: 9 is not in 1..=admin.max_connections (8)",
            ),
        ];
        for (mutate, want) in cases {
            let mut c = base.clone();
            mutate(&mut c);
            let e = c.validate().unwrap_err();
            let s = err_line(&e);
            assert!(s.starts_with(want), "want {want:?}, got {s:?}");
        }
        // Edges that are fine.
        let mut c = base.clone();
        c.auth.ticket_ttl = secs(60);
        c.server.io_uring_entries = 2;
        c.server.shards = 64;
        c.limits.outbound_queue_bytes = 4096;
        c.limits.max_message_bytes = 125;
        c.auth.allowed_origins = vec![
            "http://127.0.0.1:8080".into(),
            "https://[::1]:443".into(),
            "https://a.example".into(),
        ];
        c.auth.trusted_proxies = vec!["192.168.1.1".into(), "fd00::/8".into()];
        c.admin.enabled = false;
        c.admin.listen = c.server.listen;
        c.admin.request_timeout = Duration::from_millis(100);
        c.admin.max_connections = 4096;
        c.admin.max_connections_per_ip = 4096;
        c.validate().unwrap();
        c.admin.request_timeout = secs(60);
        c.admin.max_connections = 1;
        c.admin.max_connections_per_ip = 1;
        c.validate().unwrap();
        let mut c = base.clone();
        c.admin.peers = vec![
            "10.0.0.2:9090".into(),
            "node-c.internal:9090".into(),
            "[fd00::3]:9090".into(),
        ];
        c.validate().unwrap();
    }

    #[test]
    fn validate_files_checks_paths() {
        let c = Config::from_toml_str(OPS_EXAMPLE).unwrap();
        let e = c.validate_files().unwrap_err();
        assert!(err_line(&e).starts_with("tls.cert: "), "{e}");
        let cert = write_tmp("c");
        let key = write_tmp("k");
        let mut c = Config::default_production();
        c.tls = Some(TlsConfig {
            cert: cert.path().into(),
            key: key.path().into(),
        });
        c.validate_files().unwrap();
        c.auth.jwks = Some("/nonexistent/jwks.json".into());
        assert!(err_line(&c.validate_files().unwrap_err()).starts_with("auth.jwks: "));
    }

    /// Config validation and the runtime call one function per rule; these check that they
    /// still agree, on arbitrary strings and on the edges of each rule.
    mod rules_agree {
        use super::*;
        use crate::auth::cidr::CidrSet;
        use crate::auth::keys::KeySet;
        use crate::auth::origin::OriginPolicy;
        use proptest::prelude::*;

        fn config_accepts(edit: impl FnOnce(&mut Config)) -> bool {
            let mut c = Config::default();
            edit(&mut c);
            c.validate().is_ok()
        }

        fn config_accepts_kid(kid: &str) -> bool {
            config_accepts(|c| {
                c.auth.keys = vec![KeyRef {
                    kid: kid.to_owned(),
                    path: "/k.pub".into(),
                }]
            })
        }

        fn loader_accepts_kid(kid: &str) -> bool {
            let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]).verifying_key();
            KeySet::new().insert(kid, key).is_ok()
        }

        fn keygen_accepts_kid(kid: &str) -> bool {
            let dir = tempfile::tempdir().unwrap();
            crate::auth::mint::keygen(dir.path(), kid).is_ok()
        }

        fn config_accepts_symbol(s: &str) -> bool {
            config_accepts(|c| c.feed.simulator_symbols = vec![s.to_owned()])
        }

        fn runtime_accepts_symbol(s: &str) -> bool {
            crate::feed::symbol::is_valid_symbol(s)
        }

        fn config_accepts_origin(o: &str) -> bool {
            config_accepts(|c| c.auth.allowed_origins = vec![o.to_owned()])
        }

        fn runtime_accepts_origin(o: &str) -> bool {
            OriginPolicy::new(&[o.to_owned()], false).is_ok()
        }

        fn config_accepts_proxy(p: &str) -> bool {
            config_accepts(|c| c.auth.trusted_proxies = vec![p.to_owned()])
        }

        fn runtime_accepts_proxy(p: &str) -> bool {
            CidrSet::parse(&[p.to_owned()]).is_ok()
        }

        #[test]
        fn edges() {
            let long_kid = "k".repeat(64);
            for kid in [
                "k1",
                "a.b_c-D9",
                long_kid.as_str(),
                "",
                ".k",
                "a b",
                "a/b",
                "k:1",
                "\u{e9}",
            ] {
                let want = config_accepts_kid(kid);
                assert_eq!(loader_accepts_kid(kid), want, "{kid:?}");
                assert_eq!(keygen_accepts_kid(kid), want, "{kid:?}");
            }
            assert!(!config_accepts_kid(&"k".repeat(65)));
            assert!(!loader_accepts_kid(&"k".repeat(65)));
            for s in ["BTC-USD", "A", "9:X/Y.Z_", "btc", "-A", "", &"A".repeat(33)] {
                assert_eq!(config_accepts_symbol(s), runtime_accepts_symbol(s), "{s:?}");
            }
            for o in [
                "https://app.example.com",
                "http://127.0.0.1:8080",
                "http://[::1]:8080",
                "https://App.example.com",
                "https://app.example.com:443",
                "https://app.example.com/",
                "http://127.1",
                "https://app.example.com.",
                "wss://app.example.com",
                "https://a:99999",
            ] {
                assert_eq!(config_accepts_origin(o), runtime_accepts_origin(o), "{o:?}");
            }
            for p in [
                "10.0.0.0/8",
                "192.168.1.1",
                "fd00::/8",
                "10.0.0.1/8",
                "10.0.0.0/08",
                "10.0.0.0/33",
                "10.0.0.0/",
                "proxy.local",
            ] {
                assert_eq!(config_accepts_proxy(p), runtime_accepts_proxy(p), "{p:?}");
            }
        }

        proptest! {
            #[test]
            fn kid(kid in "[A-Za-z0-9._ /:-]{0,70}|\\PC{0,10}") {
                prop_assert_eq!(config_accepts_kid(&kid), loader_accepts_kid(&kid));
            }

            #[test]
            fn symbol(s in "[A-Za-z0-9._:/ -]{0,34}|\\PC{0,10}") {
                prop_assert_eq!(config_accepts_symbol(&s), runtime_accepts_symbol(&s));
            }

            #[test]
            fn origin(o in "(https?|wss)://[A-Za-z0-9.:\\[\\]/@-]{0,24}|\\PC{0,20}") {
                prop_assert_eq!(config_accepts_origin(&o), runtime_accepts_origin(&o));
            }

            #[test]
            fn proxy(p in "[0-9a-f.:]{1,20}(/[0-9]{0,4})?|\\PC{0,12}") {
                prop_assert_eq!(config_accepts_proxy(&p), runtime_accepts_proxy(&p));
            }
        }

        #[test]
        fn env_overrides_are_one_rule_with_or_without_a_file() {
            let file = write_tmp("");
            for vars in [
                env(&[("TICKGATE_NOPE", "1")]),
                env(&[("TICKGATE_SERVER_NOPE", "1")]),
                env(&[("TICKGATE_AUTH_LEEWAY", "5 s")]),
                env(&[("TICKGATE_SERVER_SHARDS", "x")]),
                env(&[("TICKGATE_FEED_MAX_SYMBOLS", "0")]),
            ] {
                let from_file = Config::load(file.path(), &vars).and_then(|c| c.validate());
                let mut demo = Config::default();
                let without = demo.apply_env(&vars).and_then(|()| demo.validate());
                assert_eq!(
                    from_file.unwrap_err().to_string(),
                    without.unwrap_err().to_string(),
                    "{vars:?}"
                );
            }
            let mut demo = Config::default();
            demo.apply_env(&env(&[("TICKGATE_SERVER_SHARDS", "3"), ("OTHER", "x")]))
                .unwrap();
            assert_eq!(demo.server.shards, 3);
        }
    }
}
