//! Configuration-group parameters: the rules a value must meet (Trove's
//! `validation-rules.json` format, plus the allowed values where the server has a closed set),
//! and how a tenant's JSON value becomes the one string that goes into the server's
//! configuration. Each datastore's rules are generated from the server itself
//! (`coffer_strategies::config_rules`) and bundled with its description
//! (`coffer_proto::Datastore::bundled_rules`).

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One parameter tenants may set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParamRule {
    pub name: String,
    /// `integer`, `float`, `string` or `boolean`.
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<serde_json::Number>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<serde_json::Number>,
    /// The closed set of values (an enum); for `set` parameters each comma-separated element.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_values: Option<Vec<String>>,
    /// A comma-separated combination of `allowed_values` (a set-typed server variable).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub set: bool,
    pub restart_required: bool,
    /// The server's built-in value, where the datastore cannot put a default back by itself
    /// (one that has no way to reset a setting to its default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<String>,
}

/// A file of rules, as committed and loaded with `manage datastore-parameters-load`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RulesFile {
    #[serde(rename = "configuration-parameters")]
    pub parameters: Vec<ParamRule>,
}

/// Characters a value may have once rendered: nothing that could end a line, start a comment
/// or quote in an option file or SQL literal.
pub fn safe_value(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 1024
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_,.-+:/".contains(c))
}

/// A parameter name as the option file and `SET GLOBAL` take it.
pub fn safe_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

fn num_cmp(v: &serde_json::Number, bound: &serde_json::Number) -> std::cmp::Ordering {
    // Exact for integers of either sign and any width up to u64; floats otherwise.
    let as_i128 = |n: &serde_json::Number| {
        n.as_i64()
            .map(i128::from)
            .or_else(|| n.as_u64().map(i128::from))
    };
    match (as_i128(v), as_i128(bound)) {
        (Some(a), Some(b)) => a.cmp(&b),
        _ => v
            .as_f64()
            .unwrap_or(f64::NAN)
            .partial_cmp(&bound.as_f64().unwrap_or(f64::NAN))
            .unwrap_or(std::cmp::Ordering::Equal),
    }
}

impl ParamRule {
    /// Checks a tenant's value and returns it rendered (`ON`/`OFF` for booleans, decimal for
    /// numbers, the canonical spelling for allowed values).
    pub fn check(&self, v: &Value) -> Result<String, String> {
        let name = &self.name;
        let rendered = match (self.kind.as_str(), v) {
            ("integer", Value::Number(n)) if n.is_i64() || n.is_u64() => {
                self.check_range(n)?;
                n.to_string()
            }
            ("integer", _) => {
                return Err(format!(
                "The value provided for the configuration parameter {name} is not of type integer."
            ))
            }
            ("float", Value::Number(n)) => {
                self.check_range(n)?;
                n.to_string()
            }
            ("float", _) => {
                return Err(format!(
                "The value provided for the configuration parameter {name} is not of type float."
            ))
            }
            ("boolean", Value::Bool(b)) => if *b { "ON" } else { "OFF" }.to_string(),
            ("boolean", Value::Number(n)) if n.as_u64() == Some(0) || n.as_u64() == Some(1) => {
                if n.as_u64() == Some(1) { "ON" } else { "OFF" }.to_string()
            }
            ("boolean", _) => {
                return Err(format!(
                "The value provided for the configuration parameter {name} is not of type boolean."
            ))
            }
            ("string", Value::String(s)) => self.check_string(s)?,
            ("string", _) => {
                return Err(format!(
                "The value provided for the configuration parameter {name} is not of type string."
            ))
            }
            (k, _) => {
                return Err(format!(
                    "The configuration parameter {name} has an unknown type '{k}'."
                ))
            }
        };
        if !safe_value(&rendered) {
            return Err(format!(
                "The value provided for the configuration parameter {name} has characters that are not allowed (only letters, digits and _,.-+:/)."
            ));
        }
        Ok(rendered)
    }

    fn check_range(&self, n: &serde_json::Number) -> Result<(), String> {
        if let Some(min) = &self.min {
            if num_cmp(n, min) == std::cmp::Ordering::Less {
                return Err(format!(
                    "The value for the configuration parameter {} is less than the minimum allowed: {min}",
                    self.name
                ));
            }
        }
        if let Some(max) = &self.max {
            if num_cmp(n, max) == std::cmp::Ordering::Greater {
                return Err(format!(
                    "The value for the configuration parameter {} is greater than the maximum allowed: {max}",
                    self.name
                ));
            }
        }
        Ok(())
    }

    fn check_string(&self, s: &str) -> Result<String, String> {
        let Some(allowed) = &self.allowed_values else {
            return if safe_value(s) {
                Ok(s.to_string())
            } else {
                Err(format!(
                    "The value provided for the configuration parameter {} has characters that are not allowed (only letters, digits and _,.-+:/).",
                    self.name
                ))
            };
        };
        let find = |x: &str| allowed.iter().find(|a| a.eq_ignore_ascii_case(x)).cloned();
        let out = if self.set {
            let parts: Vec<&str> = if s.is_empty() {
                vec![]
            } else {
                s.split(',').collect()
            };
            let mut canon = Vec::new();
            for p in parts {
                canon.push(find(p.trim()).ok_or_else(|| {
                    format!(
                        "The value provided for the configuration parameter {}: '{p}' is not one of the allowed values.",
                        self.name
                    )
                })?);
            }
            canon.join(",")
        } else {
            find(s).ok_or_else(|| {
                format!(
                    "The value provided for the configuration parameter {} is not one of the allowed values.",
                    self.name
                )
            })?
        };
        if out.is_empty() {
            return Err(format!(
                "The value provided for the configuration parameter {} is empty.",
                self.name
            ));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    proptest::proptest! {
        /// Whatever a tenant sends as a value, what reaches an option file is a safe string.
        #[test]
        fn rendered_values_are_always_safe(
            kind in proptest::prop_oneof![
                proptest::strategy::Just("integer"), proptest::strategy::Just("float"),
                proptest::strategy::Just("string"), proptest::strategy::Just("boolean")],
            text in ".{0,80}",
            n in proptest::prelude::any::<i64>(),
            f in proptest::prelude::any::<f64>(),
            pick in 0u8..4,
        ) {
            let v = match pick {
                0 => json!(text),
                1 => json!(n),
                2 => serde_json::Number::from_f64(f).map(serde_json::Value::Number).unwrap_or(json!(null)),
                _ => json!(text.len() % 2 == 0),
            };
            let mut r = rule(kind);
            r.min = None;
            r.max = None;
            if let Ok(out) = r.check(&v) {
                proptest::prop_assert!(safe_value(&out), "{kind} {v} rendered as {out:?}");
            }
        }
    }

    fn rule(kind: &str) -> ParamRule {
        ParamRule {
            name: "p".into(),
            kind: kind.into(),
            min: Some(1.into()),
            max: Some(u64::MAX.into()),
            allowed_values: None,
            set: false,
            restart_required: false,
            default: None,
        }
    }

    #[test]
    fn values_are_checked_and_rendered() {
        let i = rule("integer");
        assert_eq!(i.check(&json!(240)).unwrap(), "240");
        assert_eq!(i.check(&json!(u64::MAX)).unwrap(), u64::MAX.to_string());
        assert!(i
            .check(&json!(0))
            .unwrap_err()
            .contains("less than the minimum"));
        assert!(i.check(&json!(-5)).is_err());
        assert!(i
            .check(&json!("240"))
            .unwrap_err()
            .contains("not of type integer"));
        assert!(i.check(&json!(2.5)).is_err());
        let f = rule("float");
        assert_eq!(f.check(&json!(2.5)).unwrap(), "2.5");
        assert_eq!(f.check(&json!(2)).unwrap(), "2");
        let b = rule("boolean");
        assert_eq!(b.check(&json!(true)).unwrap(), "ON");
        assert_eq!(b.check(&json!(0)).unwrap(), "OFF");
        assert!(b.check(&json!("yes")).is_err());
        let mut e = rule("string");
        e.allowed_values = Some(vec!["utf8mb4".into(), "latin1".into()]);
        assert_eq!(e.check(&json!("UTF8MB4")).unwrap(), "utf8mb4");
        assert!(e.check(&json!("utf8mb4\ninit_file=/x")).is_err());
        let mut s = e.clone();
        s.set = true;
        s.allowed_values = Some(vec!["STRICT_TRANS_TABLES".into(), "NO_ZERO_DATE".into()]);
        assert_eq!(
            s.check(&json!("strict_trans_tables,NO_ZERO_DATE")).unwrap(),
            "STRICT_TRANS_TABLES,NO_ZERO_DATE"
        );
        assert!(s.check(&json!("STRICT_TRANS_TABLES,#")).is_err());
        let free = rule("string");
        assert!(free.check(&json!("a b")).is_err());
        assert!(free.check(&json!("x#y")).is_err());
        assert!(free.check(&json!("it's")).is_err());
    }
}
