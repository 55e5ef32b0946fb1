//! Configuration-group rules per datastore: how they are generated from each server's own
//! catalog (MariaDB's `information_schema`, PostgreSQL's `pg_settings`) and the rules bundled
//! with each datastore. The rules' format and value checks are `coffer_common::config_rules`.

pub use coffer_common::config_rules::*;

/// The bundled rules for a datastore manager and version, if any.
pub fn bundled(manager: &str, version: &str) -> Option<&'static str> {
    manager
        .parse::<coffer_proto::Datastore>()
        .ok()?
        .bundled_rules(version)
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
