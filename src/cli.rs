//! The `tickgate` command line (OPS.md): argument parsing and the thin glue from each
//! command to the library. Exit codes: 0 ok, 1 bad config or arguments (one line on
//! stderr), 2 runtime failure.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::error::ErrorKind;
use clap::{Parser, Subcommand};

use crate::auth::jwt::Role;
use crate::auth::mint::{self, Claims};
use crate::config::{AuthConfig, Config, format_duration};
use crate::rt::serve;
pub use crate::rt::serve::{demo_config, demo_origins, reload};
use crate::state::AuthState;

#[derive(Parser, Debug)]
#[command(name = "tickgate", version, about = "Market-data WebSocket gateway")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the server: the embedded demo without --config, production mode with it.
    Serve {
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override server.listen.
        #[arg(long)]
        listen: Option<String>,
        /// Override admin.listen.
        #[arg(long)]
        admin_listen: Option<String>,
        /// Override server.shards.
        #[arg(long)]
        shards: Option<String>,
        /// Override any key: --set section.key=value (repeatable). A list value replaces
        /// the list (--set auth.allowed_origins=https://a.example,https://b.example).
        #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
        set: Vec<String>,
        /// The embedded demo only: also accept this Origin, e.g. a page served from
        /// http://127.0.0.1:8000 (repeatable; added to the demo's own origins).
        #[arg(long = "allow-origin", value_name = "ORIGIN")]
        allow_origin: Vec<String>,
    },
    /// Create an Ed25519 key pair: DIR/ID.key, DIR/ID.pub, DIR/jwks.json.
    Keygen {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "k1")]
        kid: String,
    },
    /// Print one signed token.
    Token {
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        sub: String,
        #[arg(long, default_value = "k1")]
        kid: String,
        /// Lifetime in seconds. A server refuses a token that lives longer than its
        /// auth.max_token_lifetime (15m by default); above the default, a warning says so.
        #[arg(long, default_value_t = 300)]
        ttl: u64,
        #[arg(long, default_value = "subscriber")]
        roles: String,
        /// Entitlement patterns, comma-separated ('BTC-*,ETH-USD', '*'). Without any, the
        /// token grants no symbol: every symbol of a subscribe or publish is refused as
        /// forbidden (a warning says so).
        #[arg(long)]
        symbols: Option<String>,
        #[arg(long)]
        sid: Option<String>,
        #[arg(long)]
        did: Option<String>,
        #[arg(long)]
        cip: Option<String>,
        #[arg(long)]
        jti: Option<String>,
        #[arg(long)]
        iss: Option<String>,
        #[arg(long)]
        aud: Option<String>,
    },
    /// Validate a config file and print the effective settings.
    CheckConfig { file: PathBuf },
    /// A minimal stream client: connects, subscribes, prints every message (demo aid);
    /// reconnects with `since` when the connection ends (PROTOCOL.md 10).
    Client {
        /// One URL, or several separated by commas (a cluster's nodes, tried in turn when
        /// reconnecting).
        #[arg(long, default_value = "ws://127.0.0.1:8080/v1/stream")]
        url: String,
        #[arg(long)]
        token: String,
        #[arg(long, default_value = "BTC-USD,ETH-USD")]
        symbols: String,
        /// Stop after this many messages (0 = forever).
        #[arg(long, default_value_t = 0)]
        count: u64,
        /// PEM certificate(s) to trust for a wss:// URL.
        #[arg(long)]
        ca: Option<PathBuf>,
        /// Do not reconnect when the connection ends (by default it reconnects with
        /// `since` after a drain, a lost connection, 4000 or 4008).
        #[arg(long)]
        no_reconnect: bool,
    },
    /// Inspect the host and print what to tune.
    Doctor {
        #[arg(long)]
        config: Option<PathBuf>,
        /// Also spin every usable core for SECS seconds and report how often and how long
        /// the host took the CPU away (burns the cores meanwhile; 0 = skip).
        #[arg(long, default_value_t = 0.0, value_name = "SECS")]
        jitter: f64,
    },
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Parses the command line (the binary passes `std::env::args_os()`). `--help` and
/// `--version` print what clap prints and give `Err(0)`. Any other clap error (an unknown
/// command or flag, a missing or malformed value, no command at all) is a usage error:
/// one line on stderr and `Err(1)`, the exit code of bad arguments (OPS.md).
pub fn parse_args<I, T>(args: I) -> Result<Cli, i32>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    match Cli::try_parse_from(args) {
        Ok(cli) => Ok(cli),
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            let _ = e.print();
            Err(0)
        }
        Err(e) => Err(fail(1, &usage_error_line(&e))),
    }
}

/// A clap usage error as one line: clap's message without its `error: ` prefix, with the
/// indented lines that belong to it (the missing arguments) joined on, its `tip:` when it
/// has one, and the command whose `--help` explains the rest. clap's multi-line usage
/// block is left to `--help`.
fn usage_error_line(e: &clap::Error) -> String {
    let text = e.to_string();
    let flat = |block: &str| {
        block
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" ")
    };
    let blocks: Vec<String> = text.split("\n\n").map(flat).filter(|b| !b.is_empty()).collect();
    let command = blocks
        .iter()
        .find_map(|b| b.strip_prefix("Usage: "))
        .map(|u| {
            u.split_whitespace()
                .take_while(|w| !w.starts_with(['-', '[', '<']))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| "tickgate".to_owned());
    let mut line = if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        // clap's "error" here is the whole help text.
        "a command is required".to_owned()
    } else {
        let first = blocks.first().map(String::as_str).unwrap_or("invalid arguments");
        first.strip_prefix("error: ").unwrap_or(first).to_owned()
    };
    if let Some(tip) = blocks.iter().find(|b| b.starts_with("tip: ")) {
        line = format!("{line} ({tip})");
    }
    format!("{line}; see '{command} --help'")
}

fn env_vars() -> Vec<(String, String)> {
    crate::rt::serve::env_vars()
}

/// Run a parsed command; returns the process exit code.
pub fn run(cli: Cli) -> i32 {
    match cli.command {
        Command::Keygen { out, kid } => match mint::keygen(&out, &kid) {
            Ok(paths) => {
                for p in paths {
                    println!("{}", p.display());
                }
                0
            }
            Err(e) => fail(1, &e.to_string()),
        },
        Command::Token {
            key,
            sub,
            kid,
            ttl,
            roles,
            symbols,
            sid,
            did,
            cip,
            jti,
            iss,
            aud,
        } => {
            let pem = match std::fs::read_to_string(&key) {
                Ok(p) => p,
                Err(e) => return fail(1, &format!("--key {}: {e}", key.display())),
            };
            let sk = match mint::signing_key_from_pkcs8_pem(&pem) {
                Ok(k) => k,
                Err(e) => return fail(1, &format!("--key {}: {e}", key.display())),
            };
            let now = unix_now();
            let split = |s: &str| {
                s.split(',')
                    .map(|x| x.trim().to_string())
                    .filter(|x| !x.is_empty())
                    .collect::<Vec<_>>()
            };
            let claims = Claims {
                sub,
                exp: now + ttl,
                iat: Some(now),
                jti,
                sid,
                did,
                cip,
                roles: split(&roles),
                symbols: symbols.as_deref().map(split).unwrap_or_default(),
                iss,
                aud,
                ..Claims::default()
            };
            // Warnings go to stderr: stdout carries the token alone.
            let max = AuthConfig::default().max_token_lifetime;
            if Duration::from_secs(ttl) > max {
                eprintln!(
                    "tickgate: warning: --ttl {ttl} is above the default auth.max_token_lifetime ({}): a server with that default refuses this token (too_long_lived)",
                    format_duration(max)
                );
            }
            let streams_symbols = claims
                .roles
                .iter()
                .any(|r| matches!(Role::from_name(r), Some(Role::Subscriber | Role::Publisher)));
            if streams_symbols && claims.symbols.is_empty() {
                eprintln!(
                    "tickgate: warning: no --symbols: the token grants no symbol, so every symbol of a subscribe or publish is refused as forbidden"
                );
            }
            println!("{}", mint::sign_token(&sk, &kid, &claims));
            0
        }
        Command::CheckConfig { file } => {
            let cfg = match Config::load(&file, &env_vars()).and_then(|c| {
                c.validate()?;
                c.validate_files()?;
                Ok(c)
            }) {
                Ok(c) => c,
                Err(e) => return fail(1, &e.to_string()),
            };
            if let Err(e) = AuthState::load_keys(&cfg).and_then(|k| AuthState::build(&cfg, k)) {
                return fail(1, &e);
            }
            print!("{}", cfg.to_toml_string());
            0
        }
        Command::Doctor { config, jitter } => {
            let cfg = match config.map(|p| Config::load(&p, &env_vars())).transpose() {
                Ok(c) => c,
                Err(e) => return fail(1, &e.to_string()),
            };
            if !(0.0..=600.0).contains(&jitter) {
                return fail(1, "--jitter takes 0 to 600 seconds");
            }
            let mut found = crate::doctor::run(cfg.as_ref());
            if let Some(c) = cfg.as_ref().and_then(|c| c.cluster.as_ref()) {
                found.push(crate::doctor::cluster_finding(crate::rt::bus::probe(c)));
            }
            if jitter > 0.0 {
                let stats = crate::rt::jitter::measure_all(std::time::Duration::from_secs_f64(jitter));
                found.extend(crate::doctor::jitter_findings(&stats));
            } else {
                found.push(crate::doctor::jitter_not_measured());
            }
            print!("{}", crate::doctor::render(&found));
            0
        }
        Command::Client {
            url,
            token,
            symbols,
            count,
            ca,
            no_reconnect,
        } => match crate::rt::client::run(&crate::rt::client::ClientArgs {
            url: &url,
            token: &token,
            symbols: &symbols,
            count,
            ca: ca.as_deref(),
            reconnect: !no_reconnect,
        }) {
            Ok(()) => 0,
            Err(e) => fail(2, &e),
        },
        Command::Serve {
            config,
            listen,
            admin_listen,
            shards,
            set,
            allow_origin,
        } => serve(config, listen, admin_listen, shards, set, allow_origin),
    }
}

fn fail(code: i32, msg: &str) -> i32 {
    eprintln!("tickgate: {}", msg.lines().next().unwrap_or(msg));
    code
}

/// `tickgate serve`: the flags become overrides, [`crate::rt::serve`] does the rest; this
/// prints what the operator sees.
fn serve(
    config: Option<PathBuf>,
    listen: Option<String>,
    admin_listen: Option<String>,
    shards: Option<String>,
    set: Vec<String>,
    allow_origin: Vec<String>,
) -> i32 {
    let mut overrides: Vec<(String, String, String)> = Vec::new();
    if let Some(v) = listen {
        overrides.push(("server".into(), "listen".into(), v));
    }
    if let Some(v) = admin_listen {
        overrides.push(("admin".into(), "listen".into(), v));
    }
    if let Some(v) = shards {
        overrides.push(("server".into(), "shards".into(), v));
    }
    for s in set {
        let Some((path, value)) = s.split_once('=') else {
            return fail(1, &format!("--set {s}: expected section.key=value"));
        };
        let Some((section, key)) = path.split_once('.') else {
            return fail(1, &format!("--set {s}: expected section.key=value"));
        };
        overrides.push((section.into(), key.into(), value.into()));
    }
    let cfg = match serve::load_config(config.as_deref(), &env_vars(), &overrides, &allow_origin) {
        Ok(c) => c,
        Err(e) => return fail(e.code, &e.msg),
    };
    init_tracing(&cfg.log.level);
    let running = match serve::start(cfg, config) {
        Ok(r) => r,
        Err(e) => return fail(e.code, &e.msg),
    };
    let (handle, shared) = (&running.handle, &running.handle.shared);
    println!(
        "tickgate listening on {} ({} shards, driver {}{}), admin on {}",
        handle.public_addr,
        handle.shard_threads(),
        handle.driver.name(),
        if shared.tls.is_some() { ", tls" } else { "" },
        handle
            .admin_addr
            .map(|a| a.to_string())
            .unwrap_or_else(|| "-".into())
    );
    if let Some(sk) = &running.demo_key {
        print_demo_banner(sk, handle.public_addr);
        println!("{}", demo_origins_line(&shared.auth().origins));
        if shared.cfg.server.demo_page
            && let Some(url) = serve::demo_page_url(handle.public_addr, shared.tls.is_some())
        {
            println!("demo page (live ticks and latency in a browser): {url}");
        }
    }
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    running.wait()
}

fn print_demo_banner(sk: &ed25519_dalek::SigningKey, addr: std::net::SocketAddr) {
    let token = mint::demo_token(sk, mint::DemoHolder::Banner, unix_now());
    println!("demo token (sub=demo, subscriber+publisher, all symbols, valid 10 minutes):");
    println!("{token}");
    println!("try it (in another terminal):");
    println!(
        "  cargo run --release -- client --url ws://{addr}/v1/stream --token {token} --symbols BTC-USD,ETH-USD"
    );
    println!(
        "or with websocat: websocat -H 'Authorization: Bearer {token}' ws://{addr}/v1/stream  and type {{\"op\":\"subscribe\",\"symbols\":[\"BTC-USD\"]}}"
    );
}

/// The demo banner's line of accepted origins (the allow-list in force, after the bind).
fn demo_origins_line(policy: &crate::auth::origin::OriginPolicy) -> String {
    let list = policy.allowed().join(" ");
    let list = if list.is_empty() { "none" } else { &list };
    let missing = if policy.allows_missing() {
        ", and requests without Origin"
    } else {
        ""
    };
    format!("accepted origins: {list}{missing} (a page served elsewhere: --allow-origin http://HOST:PORT)")
}

fn init_tracing(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::keys::KeySet;
    use crate::rt::serve::add_demo_origins;

    fn origins(addr: &str, tls: bool) -> Vec<String> {
        demo_origins(addr.parse().unwrap(), tls)
    }

    #[test]
    fn demo_origins_follow_the_listen_address() {
        assert_eq!(
            origins("127.0.0.1:8082", false),
            ["http://127.0.0.1:8082", "http://localhost:8082"]
        );
        assert_eq!(
            origins("127.0.0.2:80", true),
            ["https://127.0.0.2:80", "https://localhost:80"]
        );
        assert_eq!(
            origins("[::1]:9000", false),
            ["http://[::1]:9000", "http://localhost:9000"]
        );
        assert_eq!(
            origins("0.0.0.0:8080", false),
            ["http://127.0.0.1:8080", "http://localhost:8080"]
        );
        assert_eq!(
            origins("[::]:8080", false),
            [
                "http://127.0.0.1:8080",
                "http://[::1]:8080",
                "http://localhost:8080"
            ]
        );
        assert_eq!(origins("192.0.2.7:8443", true), ["https://192.0.2.7:8443"]);
        assert_eq!(origins("[fe80::1%2]:8080", false), ["http://[fe80::1]:8080"]);
        assert!(origins("127.0.0.1:0", false).is_empty());
    }

    #[test]
    fn demo_page_url_is_an_origin_the_demo_accepts() {
        let url = |a: &str, tls| serve::demo_page_url(a.parse().unwrap(), tls);
        assert_eq!(
            url("127.0.0.1:8080", false).as_deref(),
            Some("http://127.0.0.1:8080/")
        );
        assert_eq!(
            url("0.0.0.0:8080", false).as_deref(),
            Some("http://127.0.0.1:8080/")
        );
        assert_eq!(url("[::1]:8443", true).as_deref(), Some("https://[::1]:8443/"));
        assert_eq!(url("127.0.0.1:0", false), None);
        for a in ["127.0.0.1:8080", "[::]:9000", "192.0.2.7:80"] {
            let page = url(a, false).unwrap();
            assert!(
                origins(a, false).contains(&page.trim_end_matches('/').to_owned()),
                "{a}"
            );
        }
        // The demo serves it; production only when configured.
        assert!(demo_config().server.demo_page);
        assert!(!Config::default_production().server.demo_page);
    }

    #[test]
    fn demo_origins_pass_the_config_and_origin_checks() {
        let mut cfg = demo_config();
        cfg.server.listen = "[::]:8082".parse().unwrap();
        cfg.auth.allowed_origins = vec!["https://app.example.com".into()];
        let listen = cfg.server.listen;
        add_demo_origins(&mut cfg, listen);
        add_demo_origins(&mut cfg, listen);
        assert_eq!(
            cfg.auth.allowed_origins.len(),
            4,
            "{:?}",
            cfg.auth.allowed_origins
        );
        cfg.validate().unwrap();
        let auth = AuthState::build(&cfg, KeySet::new()).unwrap();
        use crate::auth::origin::OriginDecision;
        for o in [
            "http://localhost:8082",
            "http://[::1]:8082",
            "https://app.example.com",
        ] {
            assert_eq!(auth.origins.check(Some(o)), OriginDecision::Allowed, "{o}");
        }
        assert_eq!(
            auth.origins.check(Some("http://localhost:8080")),
            OriginDecision::Rejected
        );
        assert_eq!(auth.origins.check(None), OriginDecision::Missing);
    }

    fn set(section: &str, key: &str, value: &str) -> (String, String, String) {
        (section.into(), key.into(), value.into())
    }

    #[test]
    fn allow_origin_adds_to_the_demo_origins() {
        let extra = ["http://127.0.0.1:8000".to_owned()];
        let cfg = serve::load_config(None, &[], &[], &extra).unwrap();
        assert_eq!(
            cfg.auth.allowed_origins,
            [
                "http://127.0.0.1:8000",
                "http://127.0.0.1:8080",
                "http://localhost:8080"
            ]
        );
        // --set replaces the list it is given (the demo's is empty); --allow-origin and
        // the demo's own origins are added after it.
        let overrides = [set(
            "auth",
            "allowed_origins",
            "https://a.example,https://b.example",
        )];
        let cfg = serve::load_config(None, &[], &overrides, &extra).unwrap();
        assert_eq!(
            cfg.auth.allowed_origins,
            [
                "https://a.example",
                "https://b.example",
                "http://127.0.0.1:8000",
                "http://127.0.0.1:8080",
                "http://localhost:8080"
            ]
        );
        // Given twice, or the demo's own: listed once.
        let twice = [
            "http://localhost:8080".to_owned(),
            "http://127.0.0.1:8000".to_owned(),
            "http://127.0.0.1:8000".to_owned(),
        ];
        let cfg = serve::load_config(None, &[], &[], &twice).unwrap();
        assert_eq!(
            cfg.auth.allowed_origins.len(),
            3,
            "{:?}",
            cfg.auth.allowed_origins
        );
        let auth = AuthState::build(&cfg, KeySet::new()).unwrap();
        let line = demo_origins_line(&auth.origins);
        assert_eq!(
            line,
            "accepted origins: http://127.0.0.1:8000 http://127.0.0.1:8080 http://localhost:8080, and requests without Origin (a page served elsewhere: --allow-origin http://HOST:PORT)"
        );
    }

    #[test]
    fn allow_origin_takes_only_origins_and_only_in_the_demo() {
        for bad in [
            "http://127.0.0.1:8000/",
            "127.0.0.1:8000",
            "*",
            "null",
            "HTTP://Example.com",
        ] {
            let e = serve::load_config(None, &[], &[], &[bad.to_owned()]).unwrap_err();
            assert_eq!(e.code, 1, "{bad}");
            assert!(e.msg.starts_with(&format!("--allow-origin {bad}: ")), "{}", e.msg);
        }
        let f = tempfile::NamedTempFile::new().unwrap();
        let e =
            serve::load_config(Some(f.path()), &[], &[], &["http://127.0.0.1:8000".to_owned()]).unwrap_err();
        assert_eq!(e.code, 1);
        assert!(e.msg.contains("auth.allowed_origins"), "{}", e.msg);
    }

    #[test]
    fn set_replaces_a_configured_allow_list() {
        use std::io::Write as _;
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "[auth]\nallowed_origins = [\"https://a.example\"]").unwrap();
        let overrides = [set("auth", "allowed_origins", "https://b.example")];
        let cfg = serve::load_config(Some(f.path()), &[], &overrides, &[]).unwrap();
        assert_eq!(cfg.auth.allowed_origins, ["https://b.example"]);
    }

    fn usage_error(args: &[&str]) -> (ErrorKind, String) {
        let e = Cli::try_parse_from(std::iter::once("tickgate").chain(args.iter().copied())).unwrap_err();
        (e.kind(), usage_error_line(&e))
    }

    #[test]
    fn usage_errors_are_one_line() {
        for (args, want) in [
            (
                &["keygen"][..],
                "the following required arguments were not provided: --out <OUT>; see 'tickgate keygen --help'",
            ),
            (
                &["token", "--sub", "a"][..],
                "the following required arguments were not provided: --key <KEY>; see 'tickgate token --help'",
            ),
            (&[][..], "a command is required; see 'tickgate --help'"),
            (
                &["serv"][..],
                "unrecognized subcommand 'serv' (tip: a similar subcommand exists: 'serve'); see 'tickgate --help'",
            ),
        ] {
            let (_, line) = usage_error(args);
            assert_eq!(line, want, "{args:?}");
        }
        for args in [
            &["serve", "--frob"][..],
            &["token", "--key", "k", "--sub", "a", "--ttl", "soon"],
            &["doctor", "--jitter"],
        ] {
            let (kind, line) = usage_error(args);
            assert!(
                !line.contains('\n') && !line.starts_with("error"),
                "{kind:?}: {line}"
            );
            assert!(line.ends_with("--help'"), "{kind:?}: {line}");
        }
    }
}
