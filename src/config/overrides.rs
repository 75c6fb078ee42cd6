//! Overrides: `TICKGATE_<SECTION>_<KEY>` environment variables and `--set`/flags, applied
//! to the TOML table typed by [`KEYS`], so an override goes through the same checks as
//! the file.

use super::{Config, ConfigError, ENV_PREFIX, KEYS, KeyKind, from_table, one_line};

impl Config {
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
}

/// The one home of environment overrides: applies the `TICKGATE_` variables of `env` to
/// `table` (other variables are ignored, an unknown `TICKGATE_` one is an error) and
/// builds the config, naming the variable whose value broke it.
pub(super) fn with_env(mut table: toml::Table, env: &[(String, String)]) -> Result<Config, ConfigError> {
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
