//! MariaDB (tested with 10.11 from Debian 12): `mariadb-install-db` to initialise, `mariadbd` as the
//! server, admin operations over the local socket as the agent's own admin user.
//!
//! The admin user's password is generated at initialisation, kept 0600 under the instance root
//! (`admin.password`, and `admin.cnf` as a client defaults file for tools such as mariabackup) and
//! created by an `--init-file` read on the first start, so it never appears in a process argument,
//! an environment variable or a log. Statement logging of the SQL driver is off for the same reason.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;

use crate::config_rules;
use serde::Deserialize;
use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions};
use sqlx::{ConnectOptions, Row};
use tokio::sync::Mutex;

use super::{
    Check, DatabaseSpec, Datastore, DatastoreError, Health, Layout, ReplicationSource,
    ReplicationState, ServerCommand, Sizing, UserSpec,
};

/// The agent's own administrative account.
pub const ADMIN_USER: &str = "coffer_admin";

/// Accounts users may not create, drop or change.
pub const RESERVED_USERS: &[&str] = &[ADMIN_USER, "root", "mariadb.sys", "mysql", "PUBLIC"];

/// Databases users may not create or drop.
pub const RESERVED_DATABASES: &[&str] = &[
    "mysql",
    "information_schema",
    "performance_schema",
    "sys",
    "lost+found",
];

/// Binaries (overridable for packaging or tests).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The server binary.
    #[serde(default = "default_server")]
    pub server_binary: PathBuf,
    /// The data directory initialiser.
    #[serde(default = "default_install_db")]
    pub install_db_binary: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server_binary: default_server(),
            install_db_binary: default_install_db(),
        }
    }
}

fn default_server() -> PathBuf {
    PathBuf::from("/usr/sbin/mariadbd")
}
fn default_install_db() -> PathBuf {
    PathBuf::from("/usr/bin/mariadb-install-db")
}

/// One instance's MariaDB.
pub struct Mariadb {
    config: Config,
    layout: Layout,
    pool: Mutex<Option<MySqlPool>>,
    version: Mutex<Option<String>>,
}

impl Mariadb {
    pub fn new(config: Config, layout: Layout) -> Self {
        Mariadb {
            config,
            layout,
            pool: Mutex::new(None),
            version: Mutex::new(None),
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.layout.root.join("data")
    }
    fn config_file(&self) -> PathBuf {
        self.layout.root.join("my.cnf")
    }
    fn pid_file(&self) -> PathBuf {
        self.layout.root.join("mariadbd.pid")
    }
    fn overrides_file(&self) -> PathBuf {
        self.layout.root.join("overrides.cnf")
    }
    fn role_file(&self) -> PathBuf {
        self.layout.root.join("role.cnf")
    }
    fn logs_file(&self) -> PathBuf {
        self.layout.root.join("logs.cnf")
    }
    fn logs_dir(&self) -> PathBuf {
        self.layout.root.join("logs")
    }
    fn confd(&self) -> PathBuf {
        self.layout.root.join("conf.d")
    }

    fn write_role(&self, read_only: bool) -> Result<(), DatastoreError> {
        let text = format!(
            "# The instance's replication role, written by coffer-agent (do not edit).\n[mysqld]\nread_only = {}\n",
            if read_only { "ON" } else { "OFF" }
        );
        write_option_file(&self.role_file(), &text)
    }
    fn init_file(&self) -> PathBuf {
        self.layout.root.join("init.sql")
    }
    fn password_file(&self) -> PathBuf {
        self.layout.root.join("admin.password")
    }
    fn defaults_file(&self) -> PathBuf {
        self.layout.root.join("admin.cnf")
    }
    fn initialized_marker(&self) -> PathBuf {
        self.layout.root.join(".initialized")
    }
    fn tmp_dir(&self) -> PathBuf {
        self.layout.root.join("tmp")
    }
    /// The only directory the server's FILE privilege reaches (`secure_file_priv`): root's
    /// `LOAD_FILE` and `INTO OUTFILE` stay inside this instance.
    fn files_dir(&self) -> PathBuf {
        self.layout.root.join("files")
    }
    /// The socket path; moved to the temp dir when the layout path is too long for `sun_path`.
    pub fn socket(&self) -> PathBuf {
        let p = self.layout.root.join("mysqld.sock");
        if p.as_os_str().len() < 100 {
            return p;
        }
        let mut p = super::short_runtime_path(&self.layout.root, "coffer-mariadb");
        p.set_extension("sock");
        p
    }

    async fn admin_password(&self) -> Result<String, DatastoreError> {
        let p = self.password_file();
        tokio::fs::read_to_string(&p)
            .await
            .map(|s| s.trim().to_string())
            .map_err(|e| DatastoreError::io(&p, e))
    }

    async fn pool(&self) -> Result<MySqlPool, DatastoreError> {
        let mut guard = self.pool.lock().await;
        if let Some(p) = guard.as_ref() {
            return Ok(p.clone());
        }
        let password = self.admin_password().await?;
        let opts = MySqlConnectOptions::new()
            .socket(self.socket())
            .username(ADMIN_USER)
            .password(&password)
            .log_statements(tracing::log::LevelFilter::Off)
            .log_slow_statements(tracing::log::LevelFilter::Off, Duration::from_secs(3600));
        let pool = MySqlPoolOptions::new()
            .max_connections(3)
            .min_connections(0)
            .acquire_timeout(Duration::from_secs(3))
            .idle_timeout(Duration::from_secs(60))
            .connect_lazy_with(opts);
        *guard = Some(pool.clone());
        Ok(pool)
    }

    async fn exec(&self, sql: &str) -> Result<(), DatastoreError> {
        let pool = self.pool().await?;
        sqlx::raw_sql(sql)
            .execute(&pool)
            .await
            .map_err(|e| DatastoreError::Query(redact(&e.to_string())))?;
        Ok(())
    }

    async fn fetch_string(&self, sql: &str) -> Result<String, DatastoreError> {
        let pool = self.pool().await?;
        let row = sqlx::query(sql)
            .fetch_one(&pool)
            .await
            .map_err(|e| DatastoreError::Query(redact(&e.to_string())))?;
        row.try_get::<String, _>(0)
            .map_err(|e| DatastoreError::Query(e.to_string()))
    }

    /// `SELECT COUNT(*)` with bound string parameters.
    async fn count(&self, sql: &str, binds: &[&str]) -> Result<i64, DatastoreError> {
        let pool = self.pool().await?;
        let mut q = sqlx::query_scalar::<_, i64>(sql);
        for b in binds {
            q = q.bind(*b);
        }
        q.fetch_one(&pool)
            .await
            .map_err(|e| DatastoreError::Query(redact(&e.to_string())))
    }

    /// Every base table outside the server's own schemas, as (schema, table).
    async fn user_tables(&self) -> Result<Vec<(String, String)>, DatastoreError> {
        let pool = self.pool().await?;
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT CONVERT(TABLE_SCHEMA USING utf8mb4), CONVERT(TABLE_NAME USING utf8mb4) \
             FROM information_schema.TABLES WHERE TABLE_TYPE = 'BASE TABLE' ORDER BY 1, 2",
        )
        .fetch_all(&pool)
        .await
        .map_err(|e| DatastoreError::Query(redact(&e.to_string())))?;
        Ok(rows
            .into_iter()
            .filter(|(db, _)| !RESERVED_DATABASES.contains(&db.as_str()))
            .collect())
    }

    async fn user_exists(&self, name: &str, host: &str) -> Result<bool, DatastoreError> {
        Ok(self
            .count(
                "SELECT COUNT(*) FROM mysql.user WHERE User = ? AND Host = ?",
                &[name, host],
            )
            .await?
            > 0)
    }

    fn validate_name_host(&self, name: &str, host: &str) -> Result<(), DatastoreError> {
        self.validate_user(&UserSpec {
            name: name.to_string(),
            password: "x".into(),
            host: host.to_string(),
            databases: vec![],
        })
    }

    /// Writes my.cnf and the admin credentials (0600); keeps an existing password unless `fresh`.
    async fn write_config_and_credentials(
        &self,
        sizing: &Sizing,
        fresh: bool,
    ) -> Result<String, DatastoreError> {
        for d in [
            self.layout.root.clone(),
            self.tmp_dir(),
            self.files_dir(),
            self.logs_dir(),
            self.confd(),
        ] {
            tokio::fs::create_dir_all(&d)
                .await
                .map_err(|e| DatastoreError::io(&d, e))?;
        }
        let cnf = self.config_file();
        if !self.overrides_file().exists() {
            self.write_overrides(&Default::default())?;
        }
        if !self.role_file().exists() {
            self.write_role(false)?;
        }
        if !self.logs_file().exists() {
            self.write_log_settings(&[])?;
        }
        tokio::fs::write(&cnf, self.render_config(sizing))
            .await
            .map_err(|e| DatastoreError::io(&cnf, e))?;
        let password = match self.admin_password().await {
            Ok(p) if !p.is_empty() && !fresh => p,
            _ => {
                let p = generate_password();
                write_private(&self.password_file(), &p)?;
                p
            }
        };
        write_private(
            &self.defaults_file(),
            &format!(
                "[client]\nuser={ADMIN_USER}\npassword={password}\nsocket={}\n",
                self.socket().display()
            ),
        )?;
        Ok(password)
    }

    fn bootstrap_sql(password: &str) -> String {
        let pw = format!("PASSWORD {}", quote(&native_password_hash(password)));
        format!(
            "SET SESSION sql_log_bin = 0;\n\
             CREATE USER IF NOT EXISTS '{ADMIN_USER}'@'localhost' IDENTIFIED BY {pw};\n\
             ALTER USER '{ADMIN_USER}'@'localhost' IDENTIFIED BY {pw};\n\
             GRANT ALL PRIVILEGES ON *.* TO '{ADMIN_USER}'@'localhost' WITH GRANT OPTION;\n\
             INSERT IGNORE INTO mysql.proxies_priv (Host, User, Proxied_host, Proxied_user, With_grant, Grantor) \
             VALUES ('localhost', '{ADMIN_USER}', '', '', 1, 'root@localhost');\n\
             DELETE FROM mysql.global_priv WHERE User = '';\n\
             DELETE FROM mysql.global_priv WHERE User = 'root' AND Host NOT IN ('localhost');\n\
             FLUSH PRIVILEGES;\n"
        )
    }
}

/// Buffer pool, log and I/O sizing derived from the flavor and volume.
pub fn sizing_values(s: &Sizing) -> (u64, u64, u64, u64) {
    let buffer_pool_mb = (s.memory_mb / 2).max(128);
    let log_file_mb = (buffer_pool_mb / 4).clamp(48, 1024);
    let max_connections = (s.memory_mb / 8).clamp(40, 2000);
    // Network volumes deliver IOPS roughly in proportion to their size; the default of 200 makes
    // a bulk load's dirty pages linger for a minute (and bloat every backup taken meanwhile).
    let io_capacity = (s.volume_gb * 100).clamp(1000, 10000);
    (buffer_pool_mb, log_file_mb, max_connections, io_capacity)
}

/// `mysql_native_password` hash: `*` + upper-case hex of SHA1(SHA1(password)).
pub fn native_password_hash(password: &str) -> String {
    let inner = openssl::sha::sha1(password.as_bytes());
    let outer = openssl::sha::sha1(&inner);
    let mut s = String::with_capacity(41);
    s.push('*');
    for b in outer {
        s.push_str(&format!("{b:02X}"));
    }
    s
}

/// Quotes a string as a MariaDB literal (default SQL mode: backslash escapes are active).
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        match c {
            '\'' => out.push_str("\\'"),
            '\\' => out.push_str("\\\\"),
            '\0' => out.push_str("\\0"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// Column `i` of a row as text, whether the server sent it as characters or bytes.
fn text(row: &sqlx::mysql::MySqlRow, i: usize) -> String {
    row.try_get::<String, _>(i)
        .or_else(|_| {
            row.try_get::<Vec<u8>, _>(i)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
        })
        .unwrap_or_default()
}

/// Quotes an identifier with backticks.
fn ident(s: &str) -> String {
    format!("`{}`", s.replace('`', "``"))
}

/// Removes anything after `IDENTIFIED` from a driver error, in case it echoes a statement.
fn redact(msg: &str) -> String {
    let upper = msg.to_ascii_uppercase();
    match ["IDENTIFIED", "MASTER_PASSWORD"]
        .iter()
        .filter_map(|w| upper.find(w).map(|i| (i, *w)))
        .min()
    {
        Some((i, w)) => format!("{}{w} ***", &msg[..i]),
        None => msg.to_string(),
    }
}

/// `key = value` lines of the `[mysqld]` section of an option file (comments, directives and
/// other sections skipped).
pub fn parse_server_section(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut in_server = false;
    for line in text.lines().map(str::trim) {
        if line.is_empty()
            || line.starts_with('#')
            || line.starts_with(';')
            || line.starts_with('!')
        {
            continue;
        }
        if line.starts_with('[') {
            in_server = line == "[mysqld]" || line == "[mariadb]" || line == "[server]";
            continue;
        }
        if in_server {
            let (k, v) = match line.split_once('=') {
                Some((k, v)) => (k.trim(), v.trim()),
                None => (line, "ON"),
            };
            out.push((k.to_string(), v.to_string()));
        }
    }
    out
}

/// A value as SQL: numbers (with a K/M/G/T size suffix turned into bytes) and ON/OFF bare,
/// anything else quoted.
fn sql_value(v: &str) -> String {
    let upper = v.to_ascii_uppercase();
    if upper == "ON" || upper == "OFF" {
        return upper;
    }
    if v.parse::<f64>().is_ok() {
        return v.to_string();
    }
    let (digits, unit) = v.split_at(v.len().saturating_sub(1));
    let mult: Option<u64> = match unit.to_ascii_uppercase().as_str() {
        "K" => Some(1 << 10),
        "M" => Some(1 << 20),
        "G" => Some(1 << 30),
        "T" => Some(1 << 40),
        _ => None,
    };
    if let (Some(m), Ok(n)) = (mult, digits.parse::<u64>()) {
        return (n * m).to_string();
    }
    quote(v)
}

fn write_private(path: &Path, contents: &str) -> Result<(), DatastoreError> {
    crate::fsutil::write_atomic(path, contents.as_bytes(), 0o600)
        .map_err(|e| DatastoreError::io(path, e))
}

/// Writes an option file the server reads (readable by its OS user).
fn write_option_file(path: &Path, contents: &str) -> Result<(), DatastoreError> {
    crate::fsutil::write_atomic(path, contents.as_bytes(), 0o644)
        .map_err(|e| DatastoreError::io(path, e))
}

fn generate_password() -> String {
    use rand::distr::{Alphanumeric, SampleString};
    Alphanumeric.sample_string(&mut rand::rng(), 32)
}

fn os_user() -> String {
    nix::unistd::User::from_uid(nix::unistd::geteuid())
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| "mysql".to_string())
}

#[async_trait]
impl Datastore for Mariadb {
    fn name(&self) -> &'static str {
        "mariadb"
    }

    async fn version(&self) -> Result<String, DatastoreError> {
        let mut cached = self.version.lock().await;
        if let Some(v) = cached.as_ref() {
            return Ok(v.clone());
        }
        let out = tokio::process::Command::new(&self.config.server_binary)
            .arg("--version")
            .output()
            .await
            .map_err(|e| DatastoreError::io(&self.config.server_binary, e))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let v = parse_version(&text).ok_or_else(|| DatastoreError::Tool {
            tool: "mariadbd --version".into(),
            detail: format!("unexpected output: {}", text.trim()),
        })?;
        *cached = Some(v.clone());
        Ok(v)
    }

    fn is_initialized(&self) -> bool {
        self.initialized_marker().exists()
    }

    fn render_config(&self, s: &Sizing) -> String {
        let (buffer_pool_mb, log_file_mb, max_connections, io_capacity) = sizing_values(s);
        format!(
            "# Rendered by coffer-agent; overrides belong in configuration groups.\n\
             [mysqld]\n\
             user = {user}\n\
             datadir = {datadir}\n\
             socket = {socket}\n\
             pid-file = {pid}\n\
             tmpdir = {tmp}\n\
             secure_file_priv = {files}\n\
             local_infile = OFF\n\
             log-error = {errlog}\n\
             bind-address = {bind}\n\
             port = {port}\n\
             server_id = {server_id}\n\
             log_bin = mysql-bin\n\
             relay_log = relay-bin\n\
             log_slave_updates = ON\n\
             binlog_format = ROW\n\
             gtid_strict_mode = ON\n\
             expire_logs_days = 7\n\
             skip_name_resolve = ON\n\
             performance_schema = OFF\n\
             character_set_server = utf8mb4\n\
             collation_server = utf8mb4_general_ci\n\
             max_connections = {max_connections}\n\
             innodb_buffer_pool_size = {buffer_pool_mb}M\n\
             innodb_log_file_size = {log_file_mb}M\n\
             innodb_io_capacity = {io_capacity}\n\
             innodb_io_capacity_max = {io_capacity_max}\n\
             innodb_flush_log_at_trx_commit = 1\n\
             sync_binlog = 1\n\
             # Configuration group values (written by coffer-agent), last so they win.\n\
             !include {overrides}\n\
             # Config modules' drop-ins.\n\
             !includedir {confd}\n\
             # Guest logs switched on through the API.\n\
             !include {logs}\n\
             # The replication role (read_only on replicas and fenced sources).\n\
             !include {role}\n",
            logs = self.logs_file().display(),
            confd = self.confd().display(),
            overrides = self.overrides_file().display(),
            role = self.role_file().display(),
            user = os_user(),
            datadir = self.data_dir().display(),
            socket = self.socket().display(),
            pid = self.pid_file().display(),
            tmp = self.tmp_dir().display(),
            files = self.files_dir().display(),
            errlog = self.layout.root.join("mariadbd.err").display(),
            bind = self.layout.bind_address,
            port = self.layout.port,
            server_id = s.server_id,
            io_capacity_max = io_capacity * 2,
        )
    }

    async fn backup_context(&self) -> Result<crate::backup::BackupCtx, DatastoreError> {
        Ok(crate::backup::BackupCtx {
            data_dir: self.data_dir(),
            socket: self.socket(),
            port: self.layout.port,
            tools_dir: None,
            admin_user: ADMIN_USER.into(),
            admin_password: self.admin_password().await?,
            tmp_dir: self.tmp_dir(),
        })
    }

    fn data_path(&self) -> PathBuf {
        self.data_dir()
    }

    async fn initialize_restored(&self, sizing: &Sizing) -> Result<(), DatastoreError> {
        // A fresh password: the restored grant tables hold the source's, and the init file
        // resets it on the first start.
        let password = self.write_config_and_credentials(sizing, true).await?;
        write_private(&self.init_file(), &Self::bootstrap_sql(&password))?;
        let marker = self.initialized_marker();
        tokio::fs::write(&marker, b"")
            .await
            .map_err(|e| DatastoreError::io(&marker, e))?;
        Ok(())
    }

    fn confd_dir(&self) -> PathBuf {
        self.confd()
    }

    fn change_log(&self) -> Option<Box<dyn crate::archive::ChangeLog>> {
        Some(Box::new(crate::archive::binlog::BinlogLog::new(
            self.data_dir(),
            "mysql-bin",
        )))
    }

    fn replay(&self) -> Option<Box<dyn crate::archive::Replay>> {
        Some(Box::new(crate::archive::binlog::BinlogReplay::default()))
    }

    async fn rotate_change_log(&self) -> Result<(), DatastoreError> {
        self.exec("FLUSH BINARY LOGS").await
    }

    fn log_definitions(&self) -> Vec<crate::logs::LogDef> {
        use crate::logs::{LogDef, LogKind};
        // Their own directory, not the data directory: watching it sees only log writes.
        let dir = self.logs_dir();
        let user = |name: &str, switch: &str, file_var: &str| {
            let file = dir.join(format!("mariadb-{name}.log"));
            LogDef {
                name: name.into(),
                kind: LogKind::User,
                enable: vec![
                    ("log_output".into(), "FILE".into()),
                    (file_var.into(), file.display().to_string()),
                    (switch.into(), "ON".into()),
                ],
                disable: vec![(switch.into(), "OFF".into())],
                records: None,
                file,
            }
        };
        vec![
            user("general", "general_log", "general_log_file"),
            user("slow_query", "slow_query_log", "slow_query_log_file"),
            LogDef {
                name: "error".into(),
                kind: LogKind::Sys,
                file: self.layout.root.join("mariadbd.err"),
                enable: vec![],
                disable: vec![],
                records: None,
            },
        ]
    }

    fn write_log_settings(&self, vars: &[(String, String)]) -> Result<(), DatastoreError> {
        let mut text = String::from(
            "# Guest logs switched on through the API, written by coffer-agent (do not edit).\n[mysqld]\n",
        );
        for (k, v) in vars {
            if !config_rules::safe_name(k) || v.contains(['\n', '#', '\'', '"']) {
                return Err(DatastoreError::Invalid(format!("bad log setting '{k}'")));
            }
            text.push_str(&format!("{k} = {v}\n"));
        }
        write_option_file(&self.logs_file(), &text)
    }

    fn overrides(&self) -> Result<BTreeMap<String, String>, DatastoreError> {
        let p = self.overrides_file();
        match std::fs::read_to_string(&p) {
            Ok(t) => Ok(parse_server_section(&t).into_iter().collect()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(DatastoreError::io(&p, e)),
        }
    }

    fn write_overrides(&self, values: &BTreeMap<String, String>) -> Result<(), DatastoreError> {
        let mut text = String::from(
            "# Configuration group values, written by coffer-agent (do not edit).\n[mysqld]\n",
        );
        for (k, v) in values {
            if !config_rules::safe_name(k) || !config_rules::safe_value(v) {
                return Err(DatastoreError::Invalid(format!(
                    "configuration override '{k}' has characters that are not allowed"
                )));
            }
            text.push_str(&format!("{k} = {v}\n"));
        }
        write_option_file(&self.overrides_file(), &text)
    }

    async fn is_dynamic(&self, name: &str) -> Result<bool, DatastoreError> {
        let pool = self.pool().await?;
        let row: Option<(String,)> = sqlx::query_as(
            "SELECT CAST(READ_ONLY AS CHAR) FROM information_schema.SYSTEM_VARIABLES WHERE VARIABLE_NAME = UPPER(?)",
        )
        .bind(name)
        .fetch_optional(&pool)
        .await
        .map_err(|e| DatastoreError::Query(redact(&e.to_string())))?;
        match row {
            Some((ro,)) => Ok(ro.eq_ignore_ascii_case("NO")),
            None => Err(DatastoreError::Invalid(format!(
                "the server has no variable '{name}'"
            ))),
        }
    }

    async fn set_global(&self, name: &str, value: Option<&str>) -> Result<(), DatastoreError> {
        if !config_rules::safe_name(name) {
            return Err(DatastoreError::Invalid(format!(
                "bad variable name '{name}'"
            )));
        }
        let rendered_default = self
            .default_configuration()?
            .into_iter()
            .find(|(k, _)| k.replace('-', "_") == name)
            .map(|(_, v)| v);
        let literal = match value.map(str::to_string).or(rendered_default) {
            None => "DEFAULT".to_string(),
            Some(v) => sql_value(&v),
        };
        self.exec(&format!("SET GLOBAL {name} = {literal}")).await
    }

    fn default_configuration(&self) -> Result<Vec<(String, String)>, DatastoreError> {
        let p = self.config_file();
        let t = std::fs::read_to_string(&p).map_err(|e| DatastoreError::io(&p, e))?;
        Ok(parse_server_section(&t))
    }

    async fn restore_epilogue(&self) -> Result<String, DatastoreError> {
        Ok(Self::bootstrap_sql(&self.admin_password().await?))
    }

    async fn initialize(&self, sizing: &Sizing) -> Result<(), DatastoreError> {
        let root = &self.layout.root;
        let cnf = self.config_file();
        // A previous attempt may have died half-way: start from an empty data dir.
        let data = self.data_dir();
        if data.exists() {
            tokio::fs::remove_dir_all(&data)
                .await
                .map_err(|e| DatastoreError::io(&data, e))?;
        }
        let password = self.write_config_and_credentials(sizing, false).await?;
        let log = root.join("install-db.log");
        let log_file = std::fs::File::create(&log).map_err(|e| DatastoreError::io(&log, e))?;
        let log_err = log_file
            .try_clone()
            .map_err(|e| DatastoreError::io(&log, e))?;
        let status = tokio::process::Command::new(&self.config.install_db_binary)
            .arg(format!("--defaults-file={}", cnf.display()))
            .arg(format!("--datadir={}", data.display()))
            .arg("--auth-root-authentication-method=socket")
            // The second socket-authenticated root account is named `mysql` (reserved, never
            // listed), whatever OS user the server runs as (an instance's own user).
            .arg("--auth-root-socket-user=mysql")
            .arg("--skip-test-db")
            // Accounts are the agent's own (by socket or '%'), so the host's name need not
            // resolve: a fresh VM or host may not have itself in /etc/hosts yet. (`--force`
            // skips only that DNS check.)
            .arg("--force")
            .stdin(std::process::Stdio::null())
            .stdout(log_file)
            .stderr(log_err)
            .status()
            .await
            .map_err(|e| DatastoreError::io(&self.config.install_db_binary, e))?;
        if !status.success() {
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: String = tail
                .lines()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join(" | ");
            return Err(DatastoreError::Tool {
                tool: "mariadb-install-db".into(),
                detail: format!("{status}; see {}: {tail}", log.display()),
            });
        }
        write_private(&self.init_file(), &Self::bootstrap_sql(&password))?;
        let marker = self.initialized_marker();
        tokio::fs::write(&marker, b"")
            .await
            .map_err(|e| DatastoreError::io(&marker, e))?;
        Ok(())
    }

    fn server_command(&self) -> ServerCommand {
        let cnf = self.config_file();
        let mut args = vec![format!("--defaults-file={}", cnf.display())];
        if self.init_file().exists() {
            args.push(format!("--init-file={}", self.init_file().display()));
        }
        ServerCommand {
            program: self.config.server_binary.clone(),
            args,
            output_file: self.layout.root.join("mariadbd.out"),
            pid_file: self.pid_file(),
            cmdline_marker: format!("--defaults-file={}", cnf.display()),
            run_as: None,
            stop_signal: nix::sys::signal::Signal::SIGTERM,
        }
    }

    async fn finish_first_start(&self) -> Result<(), DatastoreError> {
        let p = self.init_file();
        match tokio::fs::remove_file(&p).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(DatastoreError::io(&p, e)),
        }
    }

    async fn probe(&self) -> Health {
        let pool = match self.pool().await {
            Ok(p) => p,
            Err(e) => return Health::Down(e.to_string()),
        };
        let fut = async {
            let row = sqlx::query("SHOW GLOBAL STATUS LIKE 'Threads_connected'")
                .fetch_one(&pool)
                .await?;
            let v: String = row.try_get(1)?;
            Ok::<_, sqlx::Error>(v.parse::<u32>().unwrap_or(0))
        };
        match tokio::time::timeout(Duration::from_secs(3), fut).await {
            Ok(Ok(connections)) => Health::Ready { connections },
            Ok(Err(e)) => Health::Down(e.to_string()),
            Err(_) => Health::Down("probe timed out".into()),
        }
    }

    async fn disconnect(&self) {
        if let Some(p) = self.pool.lock().await.take() {
            p.close().await;
        }
    }

    async fn create_database(&self, db: &DatabaseSpec) -> Result<(), DatastoreError> {
        self.validate_database_name(&db.name)?;
        if self
            .count(
                "SELECT COUNT(*) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = ?",
                &[&db.name],
            )
            .await?
            > 0
        {
            return Err(DatastoreError::Exists(format!(
                "Database '{}' already exists.",
                db.name
            )));
        }
        let mut sql = format!("CREATE DATABASE {}", ident(&db.name));
        if let Some(cs) = db.character_set.as_deref().filter(|s| !s.is_empty()) {
            check_word("character_set", cs)?;
            sql.push_str(&format!(" CHARACTER SET {cs}"));
        }
        if let Some(co) = db.collate.as_deref().filter(|s| !s.is_empty()) {
            check_word("collate", co)?;
            sql.push_str(&format!(" COLLATE {co}"));
        }
        self.exec(&sql).await
    }

    async fn create_user(&self, user: &UserSpec) -> Result<(), DatastoreError> {
        self.validate_user(user)?;
        // Only the hash goes into the statement, so the binary log (and replicas' relay logs)
        // never hold the clear password.
        if self
            .user_exists(&user.name, host_or_any(&user.host))
            .await?
        {
            return Err(DatastoreError::Exists(format!(
                "User '{}'@'{}' already exists.",
                user.name,
                host_or_any(&user.host)
            )));
        }
        for db in &user.databases {
            if self
                .count(
                    "SELECT COUNT(*) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = ?",
                    &[db],
                )
                .await?
                == 0
            {
                return Err(DatastoreError::NotFound(format!(
                    "Database '{db}' cannot be found on the instance."
                )));
            }
        }
        let sql = format!(
            "CREATE USER {}@{} IDENTIFIED BY PASSWORD {}",
            quote(&user.name),
            quote(host_or_any(&user.host)),
            quote(&native_password_hash(&user.password))
        );
        self.exec(&sql).await?;
        for db in &user.databases {
            self.grant(&user.name, host_or_any(&user.host), db).await?;
        }
        Ok(())
    }

    async fn grant(&self, user: &str, host: &str, database: &str) -> Result<(), DatastoreError> {
        self.validate_database_name(database)?;
        let sql = format!(
            "GRANT ALL PRIVILEGES ON {}.* TO {}@{}",
            ident(&grant_pattern(database)),
            quote(user),
            quote(host_or_any(host))
        );
        self.exec(&sql).await
    }

    async fn revoke(&self, user: &str, host: &str, database: &str) -> Result<(), DatastoreError> {
        self.validate_name_host(user, host)?;
        self.validate_database_name(database)?;
        if !self.user_exists(user, host).await? {
            return Err(DatastoreError::NotFound(format!(
                "User {user} cannot be found on the instance."
            )));
        }
        let pattern = grant_pattern(database);
        if self
            .count(
                "SELECT COUNT(*) FROM mysql.db WHERE User = ? AND Host = ? AND Db = ?",
                &[user, host, &pattern],
            )
            .await?
            == 0
        {
            return Err(DatastoreError::NotFound(format!(
                "User {user} has no access to database {database}."
            )));
        }
        self.exec(&format!(
            "REVOKE ALL PRIVILEGES ON {}.* FROM {}@{}",
            ident(&pattern),
            quote(user),
            quote(host)
        ))
        .await
    }

    async fn inventory(&self) -> Result<Vec<String>, DatastoreError> {
        Ok(self
            .user_tables()
            .await?
            .into_iter()
            .map(|(db, t)| format!("{db}.{t}"))
            .collect())
    }

    /// `CHECK TABLE`, `CHECKSUM TABLE` and a row count for every user table.
    async fn verify(&self) -> Result<Vec<Check>, DatastoreError> {
        let pool = self.pool().await?;
        let q = |e: sqlx::Error| DatastoreError::Query(redact(&e.to_string()));
        let mut checks = vec![];
        for (db, t) in self.user_tables().await? {
            let name = format!("{}.{}", ident(&db), ident(&t));
            let rows = sqlx::raw_sql(&format!("CHECK TABLE {name}"))
                .fetch_all(&pool)
                .await
                .map_err(q)?;
            let said: Vec<(String, String)> =
                rows.iter().map(|r| (text(r, 2), text(r, 3))).collect();
            let ok = !said
                .iter()
                .any(|(kind, _)| kind.eq_ignore_ascii_case("error"))
                && said
                    .iter()
                    .any(|(kind, msg)| kind.eq_ignore_ascii_case("status") && msg == "OK");
            if !ok {
                let msg: Vec<String> = said.into_iter().map(|(k, m)| format!("{k}: {m}")).collect();
                checks.push(Check {
                    name: format!("check table {name}"),
                    ok: false,
                    detail: msg.join("; "),
                });
                continue;
            }
            let sum: Option<i64> = sqlx::raw_sql(&format!("CHECKSUM TABLE {name}"))
                .fetch_one(&pool)
                .await
                .map_err(q)?
                .try_get(1)
                .unwrap_or(None);
            let rows: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {name}"))
                .fetch_one(&pool)
                .await
                .map_err(q)?;
            checks.push(Check {
                name: format!("check table {name}"),
                ok: true,
                detail: format!(
                    "OK; {rows} rows; checksum {}",
                    sum.map_or("none".into(), |s| s.to_string())
                ),
            });
        }
        Ok(checks)
    }

    async fn list_databases(&self) -> Result<Vec<DatabaseSpec>, DatastoreError> {
        let pool = self.pool().await?;
        let rows: Vec<(String, Option<String>, Option<String>)> = sqlx::query_as(
            "SELECT CONVERT(SCHEMA_NAME USING utf8mb4), CONVERT(DEFAULT_CHARACTER_SET_NAME USING utf8mb4), \
             CONVERT(DEFAULT_COLLATION_NAME USING utf8mb4) FROM information_schema.SCHEMATA ORDER BY 1",
        )
        .fetch_all(&pool)
        .await
        .map_err(|e| DatastoreError::Query(e.to_string()))?;
        Ok(rows
            .into_iter()
            .map(|(name, character_set, collate)| DatabaseSpec {
                name,
                character_set,
                collate,
            })
            .filter(|d| !RESERVED_DATABASES.contains(&d.name.as_str()))
            .collect())
    }

    async fn delete_database(&self, name: &str) -> Result<(), DatastoreError> {
        self.validate_database_name(name)?;
        if self
            .count(
                "SELECT COUNT(*) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = ?",
                &[name],
            )
            .await?
            == 0
        {
            return Err(DatastoreError::NotFound(format!(
                "Database {name} cannot be found on the instance."
            )));
        }
        self.exec(&format!("DROP DATABASE {}", ident(name))).await
    }

    async fn list_users(&self) -> Result<Vec<UserSpec>, DatastoreError> {
        let pool = self.pool().await?;
        let q = |e: sqlx::Error| DatastoreError::Query(e.to_string());
        // The grant tables use binary collations: convert, so names decode as text.
        let users: Vec<(String, String)> = sqlx::query_as(
            "SELECT CONVERT(User USING utf8mb4), CONVERT(Host USING utf8mb4) FROM mysql.user ORDER BY 1, 2",
        )
        .fetch_all(&pool)
        .await
        .map_err(q)?;
        let grants: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT CONVERT(User USING utf8mb4), CONVERT(Host USING utf8mb4), CONVERT(Db USING utf8mb4) \
             FROM mysql.db ORDER BY 3",
        )
        .fetch_all(&pool)
        .await
        .map_err(q)?;
        Ok(users
            .into_iter()
            .filter(|(u, _)| {
                !u.is_empty() && !RESERVED_USERS.iter().any(|x| x.eq_ignore_ascii_case(u))
            })
            .map(|(u, h)| {
                let databases = grants
                    .iter()
                    .filter(|(gu, gh, _)| *gu == u && *gh == h)
                    .map(|(_, _, db)| db.replace("\\_", "_").replace("\\%", "%"))
                    .collect();
                UserSpec {
                    name: u,
                    password: String::new(),
                    host: h,
                    databases,
                }
            })
            .collect())
    }

    async fn delete_user(&self, name: &str, host: &str) -> Result<(), DatastoreError> {
        self.validate_name_host(name, host)?;
        if !self.user_exists(name, host).await? {
            return Err(DatastoreError::NotFound(format!(
                "User {name} cannot be found on the instance."
            )));
        }
        self.exec(&format!("DROP USER {}@{}", quote(name), quote(host)))
            .await
    }

    async fn update_user(
        &self,
        name: &str,
        host: &str,
        new_name: Option<&str>,
        new_host: Option<&str>,
        new_password: Option<&str>,
    ) -> Result<(), DatastoreError> {
        self.validate_name_host(name, host)?;
        let to_name = new_name.unwrap_or(name);
        let to_host = new_host.unwrap_or(host);
        self.validate_user(&UserSpec {
            name: to_name.into(),
            password: new_password.unwrap_or("x").into(),
            host: to_host.into(),
            databases: vec![],
        })?;
        if !self.user_exists(name, host).await? {
            return Err(DatastoreError::NotFound(format!(
                "User {name} cannot be found on the instance."
            )));
        }
        if (to_name, to_host) != (name, host) {
            if self.user_exists(to_name, to_host).await? {
                return Err(DatastoreError::Exists(format!(
                    "User '{to_name}'@'{to_host}' already exists."
                )));
            }
            self.exec(&format!(
                "RENAME USER {}@{} TO {}@{}",
                quote(name),
                quote(host),
                quote(to_name),
                quote(to_host)
            ))
            .await?;
        }
        if let Some(pw) = new_password {
            self.exec(&format!(
                "ALTER USER {}@{} IDENTIFIED BY PASSWORD {}",
                quote(to_name),
                quote(to_host),
                quote(&native_password_hash(pw))
            ))
            .await?;
        }
        Ok(())
    }

    async fn enable_root(&self, password: &str) -> Result<(), DatastoreError> {
        let hash = quote(&native_password_hash(password));
        // Every privilege the server has but READ_ONLY ADMIN, granted in one statement (never
        // ALL then a revoke: replicas would apply the window in between), so read_only keeps
        // holding against root on replicas and fenced sources.
        let pool = self.pool().await?;
        // The admin holds every privilege the server has (ALL): its list is the server's.
        let privileges: Vec<String> = sqlx::query_scalar::<_, String>(&format!(
            "SELECT CAST(PRIVILEGE_TYPE AS CHAR) FROM information_schema.USER_PRIVILEGES \
             WHERE GRANTEE = \"'{ADMIN_USER}'@'localhost'\""
        ))
        .fetch_all(&pool)
        .await
        .map_err(|e| DatastoreError::Query(redact(&e.to_string())))?
        .into_iter()
        .map(|p| p.to_ascii_uppercase())
        .filter(|p| {
            !["USAGE", "GRANT OPTION", "PROXY", "READ_ONLY ADMIN"].contains(&p.as_str())
                && p.chars()
                    .all(|c| c.is_ascii_uppercase() || c == ' ' || c == '_')
        })
        .collect();
        if privileges.is_empty() {
            return Err(DatastoreError::Query(
                "the server listed no privileges".into(),
            ));
        }
        self.exec(&format!(
            "CREATE USER IF NOT EXISTS 'root'@'%' IDENTIFIED BY PASSWORD {hash}; \
             ALTER USER 'root'@'%' IDENTIFIED BY PASSWORD {hash}; \
             GRANT {} ON *.* TO 'root'@'%' WITH GRANT OPTION",
            privileges.join(", ")
        ))
        .await
    }

    async fn disable_root(&self) -> Result<(), DatastoreError> {
        self.exec("DROP USER IF EXISTS 'root'@'%'").await
    }

    async fn set_read_only(&self, read_only: bool) -> Result<(), DatastoreError> {
        self.exec(if read_only {
            "SET GLOBAL read_only = ON"
        } else {
            "SET GLOBAL read_only = OFF"
        })
        .await
    }

    async fn create_replication_user(
        &self,
        user: &str,
        password: &str,
    ) -> Result<(), DatastoreError> {
        check_word("replication user", user)?;
        let pw = format!("PASSWORD {}", quote(&native_password_hash(password)));
        self.exec(&format!(
            "CREATE USER IF NOT EXISTS '{user}'@'%' IDENTIFIED BY {pw}; \
             ALTER USER '{user}'@'%' IDENTIFIED BY {pw}; \
             GRANT REPLICATION SLAVE ON *.* TO '{user}'@'%'"
        ))
        .await
    }

    async fn replication_info(&self) -> Result<ReplicationState, DatastoreError> {
        let pool = self.pool().await?;
        let q = |e: sqlx::Error| DatastoreError::Query(redact(&e.to_string()));
        let (binlog, slave, ro): (String, String, i64) = sqlx::query_as(
            "SELECT CAST(@@GLOBAL.gtid_binlog_pos AS CHAR), CAST(@@GLOBAL.gtid_slave_pos AS CHAR), @@GLOBAL.read_only",
        )
        .fetch_one(&pool)
        .await
        .map_err(q)?;
        let mut st = ReplicationState {
            gtid_binlog_pos: binlog,
            gtid_slave_pos: slave,
            read_only: ro != 0,
            ..Default::default()
        };
        let rows = sqlx::query("SHOW SLAVE STATUS")
            .fetch_all(&pool)
            .await
            .map_err(q)?;
        if let Some(r) = rows.first() {
            let text = |name: &str| -> String {
                r.try_get::<String, _>(name)
                    .or_else(|_| {
                        r.try_get::<Vec<u8>, _>(name)
                            .map(|b| String::from_utf8_lossy(&b).into_owned())
                    })
                    .unwrap_or_default()
            };
            st.replica = !text("Master_Host").is_empty();
            st.source_host = text("Master_Host");
            st.source_port = r
                .try_get::<u32, _>("Master_Port")
                .or_else(|_| r.try_get::<i64, _>("Master_Port").map(|v| v as u32))
                .unwrap_or(0) as u16;
            st.io_running = text("Slave_IO_Running") == "Yes";
            st.sql_running = text("Slave_SQL_Running") == "Yes";
            st.gtid_io_pos = text("Gtid_IO_Pos");
            st.seconds_behind = r
                .try_get::<Option<u64>, _>("Seconds_Behind_Master")
                .ok()
                .flatten()
                .map(|v| v as i64)
                .or_else(|| {
                    r.try_get::<Option<i64>, _>("Seconds_Behind_Master")
                        .ok()
                        .flatten()
                });
            let (io_err, sql_err) = (text("Last_IO_Error"), text("Last_SQL_Error"));
            st.last_sql_error = sql_err.clone();
            st.last_error = [io_err, sql_err]
                .into_iter()
                .filter(|e| !e.is_empty())
                .collect::<Vec<_>>()
                .join("; ");
        }
        Ok(st)
    }

    async fn attach_replica(
        &self,
        src: &ReplicationSource,
    ) -> Result<super::Applied, DatastoreError> {
        check_word("replication user", &src.user)?;
        super::check_host(&src.host)?;
        self.set_read_only_persistent(true).await?;
        self.exec("STOP SLAVE").await?;
        if let Some(state) = &src.binlog_state {
            // A fresh replica's own binlog starts where its data does, so that it can serve
            // other replicas from that position once promoted.
            if !state
                .chars()
                .all(|c| c.is_ascii_digit() || ",-".contains(c))
            {
                return Err(DatastoreError::Invalid(format!(
                    "bad GTID position '{state}'"
                )));
            }
            self.exec("RESET MASTER").await?;
            self.exec(&format!("SET GLOBAL gtid_binlog_state = '{state}'"))
                .await?;
        }
        if src.from_own_binlog {
            self.exec("SET GLOBAL gtid_slave_pos = @@GLOBAL.gtid_binlog_pos")
                .await?;
        }
        if let (true, Some(g)) = (src.use_gtid, &src.gtid) {
            if !g.chars().all(|c| c.is_ascii_digit() || ",-".contains(c)) {
                return Err(DatastoreError::Invalid(format!("bad GTID position '{g}'")));
            }
            self.exec(&format!("SET GLOBAL gtid_slave_pos = '{g}'"))
                .await?;
        }
        let position = if src.use_gtid {
            "MASTER_USE_GTID = slave_pos".to_string()
        } else {
            match &src.binlog_file {
                Some(f) => {
                    if f.is_empty()
                        || !f
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
                    {
                        return Err(DatastoreError::Invalid(format!("bad binlog file '{f}'")));
                    }
                    format!(
                        "MASTER_USE_GTID = no, MASTER_LOG_FILE = '{f}', MASTER_LOG_POS = {}",
                        src.binlog_pos
                    )
                }
                None => "MASTER_USE_GTID = no".to_string(),
            }
        };
        self.exec(&format!(
            "CHANGE MASTER TO MASTER_HOST = '{}', MASTER_PORT = {}, MASTER_USER = '{}', \
             MASTER_PASSWORD = {}, MASTER_CONNECT_RETRY = 1, {position}",
            src.host,
            src.port,
            src.user,
            quote(&src.password)
        ))
        .await?;
        self.exec("START SLAVE").await?;
        Ok(super::Applied::Live)
    }

    async fn detach_replica(&self) -> Result<(), DatastoreError> {
        self.exec("STOP SLAVE").await?;
        self.exec("RESET SLAVE ALL").await?;
        self.set_read_only_persistent(false).await.map(|_| ())
    }

    async fn wait_for_position(
        &self,
        gtid: &str,
        timeout: Duration,
    ) -> Result<bool, DatastoreError> {
        if !gtid.chars().all(|c| c.is_ascii_digit() || ",-".contains(c)) {
            return Err(DatastoreError::Invalid(format!(
                "bad GTID position '{gtid}'"
            )));
        }
        let pool = self.pool().await?;
        let r: i64 = sqlx::query_scalar(&format!(
            "SELECT MASTER_GTID_WAIT('{gtid}', {})",
            timeout.as_secs_f64()
        ))
        .fetch_one(&pool)
        .await
        .map_err(|e| DatastoreError::Query(redact(&e.to_string())))?;
        Ok(r == 0)
    }

    async fn drain_relay_log(&self, timeout: Duration) -> Result<(), DatastoreError> {
        // The applier first, while the receiver still exists: with both threads stopped, a
        // GTID replica may discard its relay log at the next start (it would fetch it again
        // from a source that is gone).
        self.exec("START SLAVE SQL_THREAD").await?;
        self.exec("STOP SLAVE IO_THREAD").await?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let st = self.replication_info().await?;
            if st.gtid_io_pos.is_empty() || super::gtid_covers(&st.gtid_slave_pos, &st.gtid_io_pos)
            {
                return Ok(());
            }
            if !st.sql_running {
                if !st.last_sql_error.is_empty() {
                    return Err(DatastoreError::Query(format!(
                        "the SQL thread stopped: {}",
                        st.last_sql_error
                    )));
                }
                tracing::info!(applied = %st.gtid_slave_pos, received = %st.gtid_io_pos, "applier not running yet");
            }
            if tokio::time::Instant::now() > deadline {
                return Err(DatastoreError::Query(format!(
                    "the relay log was not applied within {timeout:?} (applied {}, received {})",
                    st.gtid_slave_pos, st.gtid_io_pos
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn kill_tenant_connections(&self) -> Result<u32, DatastoreError> {
        let pool = self.pool().await?;
        let ids: Vec<(i64,)> = sqlx::query_as(
            "SELECT CAST(ID AS SIGNED) FROM information_schema.PROCESSLIST \
             WHERE ID <> CONNECTION_ID() AND USER NOT IN (?, 'system user', 'event_scheduler') \
             AND COMMAND NOT IN ('Binlog Dump', 'Binlog Dump GTID', 'Daemon')",
        )
        .bind(ADMIN_USER)
        .fetch_all(&pool)
        .await
        .map_err(|e| DatastoreError::Query(redact(&e.to_string())))?;
        let mut n = 0;
        for (id,) in ids {
            if self.exec(&format!("KILL CONNECTION {id}")).await.is_ok() {
                n += 1;
            }
        }
        Ok(n)
    }

    async fn set_read_only_persistent(
        &self,
        read_only: bool,
    ) -> Result<super::Applied, DatastoreError> {
        self.write_role(read_only)?;
        self.set_read_only(read_only).await?;
        Ok(super::Applied::Live)
    }

    async fn replication_position(&self) -> Result<String, DatastoreError> {
        self.fetch_string("SELECT @@GLOBAL.gtid_binlog_pos").await
    }

    fn validate_database_name(&self, name: &str) -> Result<(), DatastoreError> {
        if name.is_empty() || name.len() > 64 {
            return Err(DatastoreError::Invalid(format!(
                "database name '{name}' must be 1 to 64 characters"
            )));
        }
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '$')
        {
            return Err(DatastoreError::Invalid(format!(
                "database name '{name}' may only contain letters, digits, '_', '-' and '$'"
            )));
        }
        if RESERVED_DATABASES.contains(&name) {
            return Err(DatastoreError::Invalid(format!(
                "database name '{name}' is reserved"
            )));
        }
        Ok(())
    }

    fn validate_user(&self, user: &UserSpec) -> Result<(), DatastoreError> {
        let name = &user.name;
        if name.is_empty() || name.len() > 80 {
            return Err(DatastoreError::Invalid(format!(
                "user name '{name}' must be 1 to 80 characters"
            )));
        }
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
        {
            return Err(DatastoreError::Invalid(format!(
                "user name '{name}' may only contain letters, digits, '_', '-' and '.'"
            )));
        }
        if RESERVED_USERS.iter().any(|r| r.eq_ignore_ascii_case(name)) {
            return Err(DatastoreError::Invalid(format!(
                "user name '{name}' is reserved"
            )));
        }
        let host = host_or_any(&user.host);
        if host.len() > 255
            || !host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || ".%_:-/".contains(c))
        {
            return Err(DatastoreError::Invalid(format!(
                "host '{host}' is not a host name, address or pattern"
            )));
        }
        if user.password.is_empty() || user.password.len() > 128 {
            return Err(DatastoreError::Invalid(
                "password must be 1 to 128 characters".into(),
            ));
        }
        if user.password.chars().any(|c| c.is_control()) {
            return Err(DatastoreError::Invalid(
                "password may not contain control characters".into(),
            ));
        }
        for db in &user.databases {
            self.validate_database_name(db)?;
        }
        Ok(())
    }
}

/// A database name as a grant pattern: `_` and `%` are wildcards in grants, so they are escaped
/// to grant exactly the named database.
fn grant_pattern(db: &str) -> String {
    db.replace('_', "\\_").replace('%', "\\%")
}

fn host_or_any(h: &str) -> &str {
    if h.is_empty() {
        "%"
    } else {
        h
    }
}

fn check_word(what: &str, s: &str) -> Result<(), DatastoreError> {
    if s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        Ok(())
    } else {
        Err(DatastoreError::Invalid(format!(
            "{what} '{s}' is not valid"
        )))
    }
}

/// Extracts `10.11.19` from `mariadbd  Ver 10.11.19-MariaDB-0+deb12u1 for debian-linux-gnu ...`.
pub fn parse_version(text: &str) -> Option<String> {
    let after = text.split("Ver ").nth(1)?;
    let v: String = after
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    if v.is_empty() {
        None
    } else {
        Some(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db(root: &Path) -> Mariadb {
        Mariadb::new(
            Config::default(),
            Layout {
                root: root.to_path_buf(),
                bind_address: "127.0.0.1".into(),
                port: 3307,
            },
        )
    }

    #[test]
    fn quoting_escapes_everything_that_ends_a_literal() {
        assert_eq!(quote("a'b"), "'a\\'b'");
        assert_eq!(quote("a\\'; DROP"), "'a\\\\\\'; DROP'");
        assert_eq!(ident("a`b"), "`a``b`");
    }

    #[test]
    fn grants_name_exactly_one_database() {
        assert_eq!(grant_pattern("shop_1"), "shop\\_1");
        assert_eq!(ident(&grant_pattern("a_b")), "`a\\_b`");
    }

    #[test]
    fn version_is_parsed() {
        assert_eq!(
            parse_version(
                "/usr/sbin/mariadbd  Ver 10.11.19-MariaDB-0+deb12u1 for debian-linux-gnu on x86_64"
            ),
            Some("10.11.19".into())
        );
        assert_eq!(parse_version("garbage"), None);
    }

    #[test]
    fn config_is_sized_and_ready_for_replication() {
        let m = db(Path::new("/x"));
        let s = Sizing {
            memory_mb: 2048,
            vcpus: 1,
            volume_gb: 20,
            server_id: 7,
        };
        let cnf = m.render_config(&s);
        for line in [
            "server_id = 7",
            "log_bin = mysql-bin",
            "relay_log = relay-bin",
            "log_slave_updates = ON",
            "binlog_format = ROW",
            "gtid_strict_mode = ON",
            "innodb_buffer_pool_size = 1024M",
            "innodb_io_capacity = 2000",
            "port = 3307",
        ] {
            assert!(cnf.contains(line), "missing {line} in\n{cnf}");
        }
        let small = Sizing {
            memory_mb: 256,
            vcpus: 1,
            volume_gb: 1,
            server_id: 1,
        };
        assert_eq!(sizing_values(&small), (128, 48, 40, 1000));
    }

    #[test]
    fn names_are_validated() {
        let m = db(Path::new("/x"));
        assert!(m.validate_database_name("shop_1").is_ok());
        assert!(m.validate_database_name("a`b").is_err());
        assert!(m.validate_database_name("mysql").is_err());
        assert!(m.validate_database_name("").is_err());
        let mut u = UserSpec {
            name: "app".into(),
            password: "pw".into(),
            host: "%".into(),
            databases: vec![],
        };
        assert!(m.validate_user(&u).is_ok());
        u.name = "root".into();
        assert!(m.validate_user(&u).is_err());
        u.name = "x'y".into();
        assert!(m.validate_user(&u).is_err());
        u.name = "app".into();
        u.host = "10.0.0.%".into();
        assert!(m.validate_user(&u).is_ok());
        u.host = "a'b".into();
        assert!(m.validate_user(&u).is_err());
        assert!(!format!("{u:?}").contains("pw\""));
    }

    #[test]
    fn long_roots_get_a_short_socket() {
        let long = "/".to_string() + &"d".repeat(120);
        let m = db(Path::new(&long));
        assert!(m.socket().as_os_str().len() < 100);
        assert_eq!(m.socket(), db(Path::new(&long)).socket());
    }

    #[test]
    fn bootstrap_sql_carries_only_the_hash() {
        let sql = Mariadb::bootstrap_sql("p'w");
        assert!(!sql.contains("p'w") && !sql.contains("p\\'w"));
        assert!(sql.contains(&format!(
            "IDENTIFIED BY PASSWORD '{}'",
            native_password_hash("p'w")
        )));
        assert!(sql.contains("User = ''"));
    }

    #[test]
    fn native_hash_matches_mariadb() {
        // SELECT PASSWORD('secret') on MariaDB 10.11.
        assert_eq!(
            native_password_hash("secret"),
            "*14E65567ABDB5135D0CFD9A70B3032C179A49EE7"
        );
    }
}
