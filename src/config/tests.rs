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

[cluster]                       # absent = a single node with no dependency (PROTOCOL.md 9)
nats = ["nats://127.0.0.1:4222"]  # NATS servers, JetStream enabled
node = ""                       # this node's name; "" = host name and listen port
subject_prefix = "tickgate"     # feed handlers publish ticks to <prefix>.in.<SYMBOL>
credentials = ""                # optional NATS credentials file

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
    assert!(!c.server.demo_page);
    assert_eq!(c.server.busy_poll, Duration::ZERO);
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
    assert_eq!(l.per_ip_pending_handshakes, 256);
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
    want.cluster = Some(crate::config::ClusterConfig::default());
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
    let e =
        Config::from_toml_str("[auth]\nkeys = [{ kid = \"k1\", path = \"/p\", alg = \"x\" }]").unwrap_err();
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
    c.apply_override("server", "busy_poll", "250ms").unwrap();
    assert_eq!(c.server.busy_poll, Duration::from_millis(250));
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
        (Box::new(|c| c.server.busy_poll = secs(11)), "server.busy_poll"),
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
}

#[test]
fn admin_peers_is_gone() {
    // The revocation relay gave way to the bus ([cluster]): a file that still names it is
    // refused, not silently ignored.
    let e = Config::from_toml_str("[admin]\npeers = [\"n2:9090\"]\n").unwrap_err();
    assert!(e.to_string().contains("peers"), "{e}");
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

#[test]
fn the_cluster_section() {
    assert_eq!(
        Config::default_production().cluster,
        None,
        "absent: one node, no bus"
    );
    let c = Config::from_toml_str("[cluster]\n").unwrap();
    assert_eq!(c.cluster, Some(crate::config::ClusterConfig::default()));
    let d = c.cluster.unwrap();
    assert_eq!(d.nats, vec!["nats://127.0.0.1:4222".to_string()]);
    assert_eq!(
        (d.node.as_str(), d.subject_prefix.as_str(), d.credentials.as_str()),
        ("", "tickgate", "")
    );
    let ops = "[cluster]\nnats = [\"nats://10.0.0.1:4222\", \"tls://n2:4222\"]\nnode = \"a-1\"\nsubject_prefix = \"md.prod\"\ncredentials = \"\"\n";
    assert!(Config::from_toml_str(ops).unwrap().validate().is_ok());
    for (bad, key) in [
        ("[cluster]\nnats = []\n", "cluster.nats"),
        ("[cluster]\nnats = [\"127.0.0.1:4222\"]\n", "cluster.nats"),
        ("[cluster]\nnode = \"a b\"\n", "cluster.node"),
        ("[cluster]\nsubject_prefix = \"a.>\"\n", "cluster.subject_prefix"),
        ("[cluster]\nsubject_prefix = \"\"\n", "cluster.subject_prefix"),
        ("[cluster]\nbus = 1\n", "bus"),
        ("[feed]\nsimulator = true\n[cluster]\n", "feed.simulator"),
    ] {
        let e = Config::from_toml_str(bad)
            .and_then(|c| c.validate().map(|()| c))
            .unwrap_err()
            .to_string();
        assert!(e.contains(key), "{bad}: {e}");
    }
    // Overrides create the section like [tls]'s.
    let c = Config::from_toml_str("").unwrap();
    let mut c2 = c.clone();
    c2.apply_override("cluster", "subject_prefix", "x").unwrap();
    assert_eq!(c2.cluster.unwrap().subject_prefix, "x");
}
