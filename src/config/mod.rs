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
//! | `server.demo_page` | false | serve the live demo page at `GET /` of the public listener (the embedded demo: on) |
//! | `server.busy_poll` | 0s | how long a shard keeps polling for work after its last piece of work before it sleeps in the kernel (0s: off; at most 10s) |
//! | `limits.max_head_bytes` | 8192 | bytes of an HTTP request head (request line + headers) |
//! | `limits.max_headers` | 32 | header lines in an HTTP request head |
//! | `limits.first_byte_timeout` | 2s | a new socket must send its first byte within this (above `handshake_timeout` it never binds) |
//! | `limits.per_ip_pending_handshakes` | 256 | connections one address may hold in the HTTP upgrade, per shard (trusted proxies exempt) |
//! | `feed.max_symbols` | 100000 | distinct symbols the feed will track |
//! | `feed.symbol_idle` | 10m | a symbol with no subscriber and no tick for this long gives its entry back (configured symbols never do) |
//! | `feed.history_bytes` | 268435456 | bytes all symbols' recovery histories may hold together (1 MiB..=1 TiB); a symbol pushing into a full budget gives up its own oldest ticks |
//! | `admin.enabled` | true | whether the admin listener runs |
//! | `admin.request_timeout` | 2s | whole admin request, accept to last byte of the body (100ms..=60s) |
//! | `admin.max_connections` | 64 | admin connections in flight (1..=4096) |
//! | `admin.max_connections_per_ip` | 16 | admin connections in flight per peer IP (1..=`admin.max_connections`) |
//! | `compression.enabled` | false | accept permessage-deflate (RFC 7692) when a client offers it (the demo turns it on) |
//! | `compression.level` | 1 | zlib level of outbound messages (0..=9) |
//! | `compression.window_bits` | 12 | base-2 log of the server's LZ77 window, also asked of clients that let it choose (9..=15) |
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

//!
//! # Layout
//!
//! * `mod.rs`: [`Config`] and its sections, [`ConfigError`], reading and parsing.
//! * `keys.rs`: the schema of settable keys ([`KEYS`], [`KeyKind`]).
//! * `defaults.rs`: the OPS.md defaults (the `Default` impls).
//! * `validate.rs`: [`Config::validate`] and [`Config::validate_files`].
//! * `overrides.rs`: environment and command-line overrides.
//! * `duration.rs`: duration strings ([`parse_duration`], [`format_duration`]).

mod defaults;
mod duration;
mod keys;
mod overrides;
mod validate;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use defaults::{DEFAULT_LEEWAY, DEFAULT_MAX_TOKEN_LIFETIME};
use duration::duration_serde;
pub use duration::{format_duration, parse_duration};
pub use keys::{KEYS, KeyKind};
use overrides::with_env;

/// Prefix of the environment variables that override settings.
pub const ENV_PREFIX: &str = "TICKGATE_";

/// A config file larger than this is refused before it is read (it is operator input,
/// but a wrong path such as a log file should not be slurped into memory).
pub const MAX_FILE_BYTES: u64 = 1 << 20;

/// Largest accepted `limits.max_message_bytes` (16 MiB).
pub const MAX_MESSAGE_BYTES_LIMIT: usize = 16 << 20;
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
    /// Extension: permessage-deflate.
    pub compression: CompressionConfig,
    /// Absent: one node alone, with no bus (PROTOCOL.md section 9).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterConfig>,
    pub log: LogConfig,
}

/// `[cluster]`: several nodes on one NATS deployment with JetStream (docs/CLUSTER.md).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// NATS server URLs (`nats://host:port`), 1 to 16. Default `["nats://127.0.0.1:4222"]`.
    pub nats: Vec<String>,
    /// This node's name on the bus; empty: host name and listen port. Default "".
    pub node: String,
    /// Subject prefix: feed handlers publish to `<prefix>.in.<SYMBOL>`. Default "tickgate".
    pub subject_prefix: String,
    /// NATS credentials file (`.creds`); empty: none. Default "".
    pub credentials: String,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            nats: vec!["nats://127.0.0.1:4222".to_owned()],
            node: String::new(),
            subject_prefix: "tickgate".to_owned(),
            credentials: String::new(),
        }
    }
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
    /// Extension: serve the live demo page (`GET /`, a page compiled into the binary) on
    /// the public listener. Default false; the embedded demo turns it on.
    pub demo_page: bool,
    /// Extension: busy polling. After its last piece of work a shard keeps polling for
    /// more this long (its core at 100 %) instead of sleeping in the kernel, so the next
    /// tick does not wait for the thread (on a VM, the virtual CPU) to be woken. `0s`: off.
    /// At most 10s. Default `0s`.
    #[serde(with = "duration_serde")]
    pub busy_poll: Duration,
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
    /// `handshake_timeout`, counted from accept, applies); above `handshake_timeout` it
    /// never binds. Default 2s.
    #[serde(with = "duration_serde")]
    pub first_byte_timeout: Duration,
    /// Extension: connections one client address may hold in the HTTP upgrade, per shard
    /// (sockets from `auth.trusted_proxies` are exempt). Above
    /// `server.pending_handshakes_per_shard` it never binds. Default 256.
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
    /// Ticks kept per symbol for `since` recovery (PROTOCOL.md 10); 0 = off. Default 1000.
    pub history: usize,
    /// A kept tick older than this is not replayed (and its memory goes). Default 5m.
    #[serde(with = "duration_serde")]
    pub history_age: Duration,
    /// Extension: bytes all symbols' histories may hold together (a symbol pushing into a
    /// full budget gives up its own oldest ticks). Default 268435456 (256 MiB).
    pub history_bytes: u64,
}

/// `[admin]`: the metrics / health / revocation listener.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Default `127.0.0.1:9090`.
    pub listen: SocketAddr,
    /// Extension: run the admin listener. Default true.
    pub enabled: bool,
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

/// `[compression]` (extension): permessage-deflate (RFC 7692), negotiated per connection.
/// The inflated size of an inbound compressed message is bounded by
/// `limits.max_message_bytes`, like a plain one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CompressionConfig {
    /// Accept the extension when offered. Default false (the demo turns it on).
    pub enabled: bool,
    /// zlib level of outbound messages, 0..=9. Default 1.
    pub level: u32,
    /// Base-2 logarithm of the server's LZ77 window, 9..=15; clients that let the server
    /// choose theirs are asked for the same. Default 12.
    pub window_bits: u8,
}

impl CompressionConfig {
    /// The negotiation's view of these settings.
    pub fn deflate(&self) -> crate::proto::deflate::DeflateConfig {
        crate::proto::deflate::DeflateConfig {
            level: self.level,
            window_bits: self.window_bits,
        }
    }
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

impl Config {
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
