//! The schema of settable keys: what an override may name and how its string is read.

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
                ("demo_page", Bool),
                ("busy_poll", Str),
            ],
        ),
        ("tls", &[("cert", Str), ("key", Str)]),
        (
            "cluster",
            &[
                ("nats", List),
                ("node", Str),
                ("subject_prefix", Str),
                ("credentials", Str),
            ],
        ),
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
                ("history", Int),
                ("history_age", Str),
                ("history_bytes", Int),
            ],
        ),
        (
            "admin",
            &[
                ("listen", Str),
                ("enabled", Bool),
                ("request_timeout", Str),
                ("max_connections", Int),
                ("max_connections_per_ip", Int),
            ],
        ),
        (
            "compression",
            &[("enabled", Bool), ("level", Int), ("window_bits", Int)],
        ),
        ("log", &[("level", Str), ("security", Str)]),
    ]
};
