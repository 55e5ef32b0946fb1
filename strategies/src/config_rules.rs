//! Configuration-group parameters: the rules a value must meet (Trove's
//! `validation-rules.json` format, plus the allowed values where the server has a closed set),
//! how they are generated from MariaDB's own `information_schema`, and how a tenant's JSON value
//! becomes the one string that goes into the option file and `SET GLOBAL`.

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
    /// A comma-separated combination of `allowed_values` (MariaDB's SET type, e.g. sql_mode).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub set: bool,
    pub restart_required: bool,
    /// The server's built-in value, where the datastore cannot put a default back by itself
    /// (Redis has no `CONFIG SET ... DEFAULT`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<String>,
}

/// A file of rules, as committed and loaded with `manage datastore-parameters-load`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RulesFile {
    #[serde(rename = "configuration-parameters")]
    pub parameters: Vec<ParamRule>,
}

/// The bundled rules for a datastore manager and version, if any.
pub fn bundled(manager: &str, version: &str) -> Option<&'static str> {
    match (
        manager,
        version
            .split('.')
            .take(2)
            .collect::<Vec<_>>()
            .join(".")
            .as_str(),
    ) {
        ("mariadb", "10.11") => Some(include_str!("../rules/mariadb-10.11.json")),
        ("postgresql", v) if v.split('.').next() == Some("15") => {
            Some(include_str!("../rules/postgresql-15.json"))
        }
        ("redis", "7.0") => Some(include_str!("../rules/redis-7.0.json")),
        _ => None,
    }
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

/// The MariaDB parameters tenants may set: the seed's list, Trove's MariaDB rules, and a few
/// more of the same kind. Left out on purpose: what the agent owns (server_id, log_bin,
/// binlog_format, gtid_*, read_only, datadir, paths, ports, general/slow log switches).
pub const MARIADB_TENANT_PARAMETERS: &[&str] = &[
    "auto_increment_increment",
    "auto_increment_offset",
    "autocommit",
    "bulk_insert_buffer_size",
    "character_set_client",
    "character_set_connection",
    "character_set_database",
    "character_set_filesystem",
    "character_set_results",
    "character_set_server",
    "collation_connection",
    "collation_database",
    "collation_server",
    "connect_timeout",
    "div_precision_increment",
    "event_scheduler",
    "explicit_defaults_for_timestamp",
    "group_concat_max_len",
    "innodb_autoinc_lock_mode",
    "innodb_buffer_pool_size",
    "innodb_file_per_table",
    "innodb_flush_log_at_trx_commit",
    "innodb_flush_method",
    "innodb_io_capacity",
    "innodb_lock_wait_timeout",
    "innodb_log_buffer_size",
    "innodb_log_file_size",
    "innodb_open_files",
    "innodb_print_all_deadlocks",
    "innodb_strict_mode",
    "interactive_timeout",
    "join_buffer_size",
    "key_buffer_size",
    "local_infile",
    "lock_wait_timeout",
    "long_query_time",
    "lower_case_table_names",
    "max_allowed_packet",
    "max_connect_errors",
    "max_connections",
    "max_heap_table_size",
    "max_prepared_stmt_count",
    "max_user_connections",
    "myisam_sort_buffer_size",
    "net_read_timeout",
    "net_write_timeout",
    "performance_schema",
    "query_cache_size",
    "query_cache_type",
    "read_buffer_size",
    "read_rnd_buffer_size",
    "sort_buffer_size",
    "sql_mode",
    "sync_binlog",
    "table_definition_cache",
    "table_open_cache",
    "thread_cache_size",
    "tmp_table_size",
    "tx_isolation",
    "wait_timeout",
];

/// The query whose rows [`mariadb_rules`] takes: one row per tenant parameter.
pub const MARIADB_RULES_QUERY: &str = "SELECT CAST(LOWER(VARIABLE_NAME) AS CHAR), \
     CAST(VARIABLE_TYPE AS CHAR), CAST(NUMERIC_MIN_VALUE AS CHAR), CAST(NUMERIC_MAX_VALUE AS CHAR), \
     CAST(ENUM_VALUE_LIST AS CHAR), CAST(READ_ONLY AS CHAR) \
     FROM information_schema.SYSTEM_VARIABLES ORDER BY VARIABLE_NAME";

/// One row of [`MARIADB_RULES_QUERY`].
#[derive(Debug, Clone)]
pub struct SysVar {
    pub name: String,
    pub var_type: String,
    pub min: Option<String>,
    pub max: Option<String>,
    pub enum_values: Option<String>,
    pub read_only: bool,
}

fn number(s: &Option<String>) -> Option<serde_json::Number> {
    let s = s.as_deref()?.trim();
    if let Ok(i) = s.parse::<i64>() {
        return Some(i.into());
    }
    if let Ok(u) = s.parse::<u64>() {
        return Some(u.into());
    }
    s.parse::<f64>().ok().and_then(serde_json::Number::from_f64)
}

/// Builds the rules of the tenant parameters from the server's own description of its
/// variables; `charsets` and `collations` close the sets of the character-set parameters.
pub fn mariadb_rules(
    vars: &[SysVar],
    charsets: &[String],
    collations: &[String],
) -> Result<RulesFile, String> {
    let mut parameters = Vec::new();
    for name in MARIADB_TENANT_PARAMETERS {
        let v = vars
            .iter()
            .find(|v| v.name == *name)
            .ok_or_else(|| format!("the server has no variable '{name}'"))?;
        let t = v.var_type.to_ascii_uppercase();
        let (kind, min, max, allowed, set) = match t.as_str() {
            "BOOLEAN" => ("boolean", None, None, None, false),
            "DOUBLE" => ("float", number(&v.min), number(&v.max), None, false),
            t if t.contains("INT") => ("integer", number(&v.min), number(&v.max), None, false),
            "ENUM" | "SET" => {
                let list: Vec<String> = v
                    .enum_values
                    .as_deref()
                    .unwrap_or_default()
                    .split(',')
                    .filter(|x| !x.is_empty())
                    .map(str::to_string)
                    .collect();
                // Character sets and collations are enums whose values the server lists
                // elsewhere (information_schema.CHARACTER_SETS and COLLATIONS).
                let list = match list.is_empty() {
                    false => list,
                    true if name.starts_with("character_set_") => charsets.to_vec(),
                    true if name.starts_with("collation_") => collations.to_vec(),
                    true => return Err(format!("variable '{name}' is an enum without values")),
                };
                if list.is_empty() {
                    return Err(format!("no values were given for '{name}'"));
                }
                ("string", None, None, Some(list), t == "SET")
            }
            other => return Err(format!("variable '{name}' has type {other}, not handled")),
        };
        parameters.push(ParamRule {
            name: name.to_string(),
            kind: kind.into(),
            min,
            max,
            allowed_values: allowed,
            set,
            restart_required: v.read_only,
            default: None,
        });
    }
    Ok(RulesFile { parameters })
}

/// PostgreSQL parameters tenants may set. Paths, listeners, authentication, replication,
/// preload libraries and the logging the agent owns (its guest logs) are not among them.
pub const POSTGRESQL_TENANT_PARAMETERS: &[&str] = &[
    "autovacuum",
    "autovacuum_analyze_scale_factor",
    "autovacuum_max_workers",
    "autovacuum_naptime",
    "autovacuum_vacuum_cost_delay",
    "autovacuum_vacuum_cost_limit",
    "autovacuum_vacuum_scale_factor",
    "bgwriter_delay",
    "bgwriter_lru_maxpages",
    "checkpoint_completion_target",
    "checkpoint_timeout",
    "commit_delay",
    "cpu_tuple_cost",
    "datestyle",
    "deadlock_timeout",
    "default_statistics_target",
    "default_transaction_isolation",
    "effective_cache_size",
    "effective_io_concurrency",
    "huge_pages",
    "idle_in_transaction_session_timeout",
    "idle_session_timeout",
    "jit",
    "lock_timeout",
    "log_autovacuum_min_duration",
    "log_connections",
    "log_disconnections",
    "log_lock_waits",
    "log_statement",
    "log_temp_files",
    "maintenance_work_mem",
    "max_connections",
    "max_locks_per_transaction",
    "max_parallel_workers",
    "max_parallel_workers_per_gather",
    "max_prepared_transactions",
    "max_wal_size",
    "max_worker_processes",
    "min_wal_size",
    "random_page_cost",
    "seq_page_cost",
    "shared_buffers",
    "statement_timeout",
    "synchronous_commit",
    "temp_buffers",
    "timezone",
    "track_activity_query_size",
    "track_io_timing",
    "wal_buffers",
    "wal_compression",
    "work_mem",
];

/// The query whose rows [`postgresql_rules`] takes (run by any role: `pg_settings` is public).
pub const POSTGRESQL_RULES_QUERY: &str = "SELECT lower(name), vartype, min_val, max_val, \
     array_to_string(enumvals, ','), context FROM pg_settings ORDER BY 1";

/// One row of [`POSTGRESQL_RULES_QUERY`].
#[derive(Debug, Clone)]
pub struct PgSetting {
    pub name: String,
    pub vartype: String,
    pub min: Option<String>,
    pub max: Option<String>,
    pub enumvals: Option<String>,
    pub context: String,
}

/// Whether a `pg_settings.context` means the server must restart to take a new value
/// (`postmaster`); `sighup`, `superuser` and `user` ones change on a reload.
pub fn pg_context_needs_restart(context: &str) -> bool {
    context == "postmaster" || context == "internal"
}

/// Builds the rules of the tenant parameters from PostgreSQL's own `pg_settings`.
pub fn postgresql_rules(settings: &[PgSetting]) -> Result<RulesFile, String> {
    let mut parameters = Vec::new();
    for name in POSTGRESQL_TENANT_PARAMETERS {
        let s = settings
            .iter()
            .find(|s| s.name == *name)
            .ok_or_else(|| format!("the server has no setting '{name}'"))?;
        let (kind, min, max, allowed) = match s.vartype.as_str() {
            "bool" => ("boolean", None, None, None),
            "integer" => ("integer", number(&s.min), number(&s.max), None),
            "real" => ("float", number(&s.min), number(&s.max), None),
            "enum" => {
                let list: Vec<String> = s
                    .enumvals
                    .as_deref()
                    .unwrap_or_default()
                    .split(',')
                    .filter(|x| !x.is_empty())
                    .map(str::to_string)
                    .collect();
                if list.is_empty() {
                    return Err(format!("setting '{name}' is an enum without values"));
                }
                ("string", None, None, Some(list))
            }
            "string" => ("string", None, None, None),
            other => return Err(format!("setting '{name}' has type {other}, not handled")),
        };
        parameters.push(ParamRule {
            name: name.to_string(),
            kind: kind.into(),
            min,
            max,
            allowed_values: allowed,
            set: false,
            restart_required: pg_context_needs_restart(&s.context),
            default: None,
        });
    }
    Ok(RulesFile { parameters })
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

    #[test]
    fn bundled_postgresql_and_redis_rules_parse() {
        let pg: RulesFile = serde_json::from_str(bundled("postgresql", "15.14").unwrap()).unwrap();
        let r = |f: &RulesFile, n: &str| f.parameters.iter().find(|p| p.name == n).cloned();
        assert!(r(&pg, "max_connections").unwrap().restart_required);
        assert!(!r(&pg, "work_mem").unwrap().restart_required);
        let redis: RulesFile = serde_json::from_str(bundled("redis", "7.0.15").unwrap()).unwrap();
        assert!(!r(&redis, "maxmemory-policy").unwrap().restart_required);
        assert!(r(&redis, "databases").unwrap().restart_required);
        for f in [&pg, &redis] {
            for p in &f.parameters {
                assert!(safe_name(&p.name), "{}", p.name);
            }
        }
    }

    #[test]
    fn bundled_rules_parse_and_cover_the_seed() {
        let f: RulesFile = serde_json::from_str(bundled("mariadb", "10.11.19").unwrap()).unwrap();
        for p in [
            "max_connections",
            "wait_timeout",
            "innodb_buffer_pool_size",
            "innodb_open_files",
            "innodb_log_buffer_size",
            "character_set_server",
            "collation_server",
            "long_query_time",
            "sync_binlog",
        ] {
            assert!(f.parameters.iter().any(|r| r.name == p), "{p}");
        }
    }
}
