//! The reference docs against the code: docs/CONFIG.md's key tables list exactly the keys
//! of `config::KEYS`, with the defaults the code has, and its example configuration passes
//! `tickgate check-config` as it stands.

use std::path::Path;
use std::process::Command;

use tickgate::config::{Config, KEYS, parse_duration};

const BIN: &str = env!("CARGO_BIN_EXE_tickgate");

/// Written on the line before the example's ```toml fence in docs/CONFIG.md.
const EXAMPLE_MARKER: &str = "<!-- example-config";

/// The commands docs/CONFIG.md gives to go with the example, run here as given.
const KEYGEN: [&str; 5] = ["keygen", "--out", "keys", "--kid", "k1"];
const CHECK: [&str; 2] = ["check-config", "tickgate.toml"];

fn config_md() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/CONFIG.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn cells(line: &str) -> Vec<&str> {
    let inner = line.trim().trim_start_matches('|').trim_end_matches('|');
    inner.split('|').map(str::trim).collect()
}

/// `(section.key, default cell)` for every row of the key tables: the tables whose header
/// starts with `| key | default |`.
fn key_rows(md: &str) -> Vec<(String, String)> {
    let mut rows = Vec::new();
    let mut in_key_table = false;
    let mut prev_was_table = false;
    for line in md.lines() {
        let is_table = line.trim_start().starts_with('|');
        if is_table && !prev_was_table {
            // A header row.
            let h = cells(line);
            in_key_table = h.len() >= 2 && h[0] == "key" && h[1] == "default";
        } else if is_table && in_key_table {
            let c = cells(line);
            if c[0].starts_with("---") {
                continue;
            }
            let key = c[0].trim_matches('`');
            assert!(
                c[0].starts_with('`') && key.split_once('.').is_some(),
                "key table row without a `section.key`: {line}"
            );
            rows.push((key.to_owned(), c[1].to_owned()));
        }
        prev_was_table = is_table;
    }
    rows
}

#[test]
fn config_md_lists_every_key_with_its_default() {
    let md = config_md();
    let rows = key_rows(&md);
    let documented: Vec<&str> = rows.iter().map(|(k, _)| k.as_str()).collect();
    let in_code: Vec<String> = KEYS
        .iter()
        .flat_map(|(section, keys)| keys.iter().map(move |(k, _)| format!("{section}.{k}")))
        .collect();
    for key in &in_code {
        assert!(
            documented.contains(&key.as_str()),
            "config key {key} (src/config/keys.rs KEYS) is missing from the key tables of docs/CONFIG.md"
        );
    }
    for key in &documented {
        assert!(
            in_code.iter().any(|k| k == key),
            "docs/CONFIG.md documents {key}, which src/config/keys.rs KEYS does not have"
        );
    }
    let mut seen = std::collections::HashSet::new();
    for key in &documented {
        assert!(seen.insert(key), "docs/CONFIG.md documents {key} twice");
    }

    // The default column is the TOML value `check-config` prints for an empty file, or
    // `absent` for a key it leaves out.
    // An optional section (`[cluster]`) documents the defaults it has when present.
    let mut with_sections = Config::default_production();
    with_sections.cluster = Some(Default::default());
    let defaults: toml::Table = with_sections
        .to_toml_string()
        .parse()
        .expect("the effective settings are TOML");
    for (key, cell) in &rows {
        let (section, name) = key.split_once('.').unwrap();
        let actual = defaults.get(section).and_then(|s| s.get(name));
        if cell == "absent" {
            assert_eq!(actual, None, "{key}: documented as absent by default");
            continue;
        }
        let literal = cell
            .strip_prefix('`')
            .and_then(|c| c.strip_suffix('`'))
            .unwrap_or_else(|| panic!("{key}: default {cell:?} is neither `value` nor absent"));
        let want: toml::Table = format!("v = {literal}")
            .parse()
            .unwrap_or_else(|e| panic!("{key}: default {literal} is not a TOML value: {e}"));
        let same = match (actual, want.get("v")) {
            // Durations compare by value: `"60s"` is the `"1m"` that check-config prints.
            (Some(toml::Value::String(a)), Some(toml::Value::String(w)))
                if parse_duration(a).is_ok() && parse_duration(w).is_ok() =>
            {
                parse_duration(a) == parse_duration(w)
            }
            (a, w) => a == w,
        };
        assert!(
            same,
            "{key}: docs/CONFIG.md says the default is {literal}, the code has {actual:?}"
        );
    }
}

#[test]
fn config_md_example_passes_check_config() {
    let md = config_md();
    let (_, after) = md
        .split_once(EXAMPLE_MARKER)
        .expect("docs/CONFIG.md has the example marker");
    let (_, fenced) = after
        .split_once("```toml\n")
        .expect("a ```toml block after the marker");
    let (example, _) = fenced.split_once("\n```").expect("the block is closed");
    for command in [KEYGEN.join(" "), CHECK.join(" ")] {
        assert!(
            md.contains(&format!("tickgate {command}")),
            "docs/CONFIG.md gives `tickgate {command}` with the example"
        );
    }

    // The commands of the doc, in a fresh directory, through the real binary: the same
    // load, validation, file and key checks as an operator's `check-config`.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tickgate.toml"), example).unwrap();
    let run = |args: &[&str]| {
        let mut cmd = Command::new(BIN);
        cmd.args(args).current_dir(dir.path());
        for (var, _) in std::env::vars().filter(|(v, _)| v.starts_with("TICKGATE_")) {
            cmd.env_remove(var);
        }
        cmd.output().unwrap()
    };
    let keygen = run(&KEYGEN);
    assert!(keygen.status.success(), "{keygen:?}");
    let out = run(&CHECK);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "check-config refused the example: {stderr}"
    );
    assert!(stderr.is_empty(), "{stderr}");
    // What it prints is the example's settings (every value the example gives is kept).
    let printed = Config::from_toml_str(&String::from_utf8_lossy(&out.stdout)).unwrap();
    assert_eq!(printed, Config::from_toml_str(example).unwrap());
}
