//! Module types and what their contents must be: checked by the controller before anything is
//! stored, and again by the agent's drivers (`coffer_strategies::modules`) before they apply.
//!
//! - `ping`: any contents; the result's message is the contents' `message=` line.
//! - `license`: contents that are not empty.
//! - `config`: `key = value` lines, each checked like a configuration-group value.

use crate::config_rules::{safe_name, safe_value};

/// Types of module this release knows.
pub const TYPES: &[&str] = &["ping", "license", "config"];

/// Checks a module's contents for its type; an unknown type is refused with the known ones.
pub fn validate(kind: &str, contents: &[u8]) -> Result<(), String> {
    match kind {
        "ping" => Ok(()),
        "license" if contents.is_empty() => Err("a license module needs contents".into()),
        "license" => Ok(()),
        "config" => {
            for (k, v) in config_values(contents)? {
                if !safe_name(&k) || !safe_value(&v) {
                    return Err(format!("'{k} = {v}' has characters that are not allowed"));
                }
            }
            Ok(())
        }
        other => Err(format!(
            "module type '{other}' is not one of {}",
            TYPES.join(", ")
        )),
    }
}

/// `key = value` lines (blank lines and `#` comments skipped).
pub fn config_values(contents: &[u8]) -> Result<Vec<(String, String)>, String> {
    let text = std::str::from_utf8(contents)
        .map_err(|_| "config module contents are not UTF-8".to_string())?;
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| format!("'{line}' is not key = value"))?;
        out.push((k.trim().to_string(), v.trim().to_string()));
    }
    if out.is_empty() {
        return Err("a config module needs at least one key = value line".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contents_are_checked_per_type() {
        assert!(validate("ping", b"").is_ok());
        assert!(validate("license", b"").is_err());
        assert!(validate("license", b"k").is_ok());
        assert!(validate("config", b"max_connections = 90\n# c\n").is_ok());
        assert!(validate("config", b"# only a comment").is_err());
        assert!(validate("config", b"init_file = /x;y").is_err());
        let e = validate("nope", b"x").unwrap_err();
        assert!(e.contains("ping, license, config"), "{e}");
    }
}
