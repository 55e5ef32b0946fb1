//! PostgreSQL (tested with 15 from Debian 12): `initdb` with the agent's own admin role
//! (`coffer_admin`, scram-sha-256, a generated password kept 0600 under the instance root),
//! `postgres` run by the supervisor with a rendered `postgresql.conf` sized by the flavor, clients
//! authenticated by scram-sha-256 (`pg_hba.conf`), the agent itself over a Unix socket.
//!
//! Passwords reach the server only as SCRAM verifiers computed here, so no statement the server
//! could log holds one. Identifiers are double-quoted by construction ([`ident`]).
//!
//! Backups are `pg_basebackup` tar streams ([`crate::backup::pg_basebackup`]); a restored data
//! directory's first start trusts the agent's role on the private socket directory only until
//! its password is reset.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use coffer_proto::datastore::parse_lsn;
use serde::Deserialize;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Row};

use tokio::sync::Mutex;

use super::{
    Check, DatabaseSpec, Datastore, DatastoreError, Health, Layout, ServerCommand, Sizing, UserSpec,
};

/// The agent's own superuser.
pub const ADMIN_USER: &str = "coffer_admin";
/// The remote superuser `root enable` creates (Trove's name for it).
pub const ROOT_USER: &str = "root";
/// Roles tenants may not create or change.
pub const RESERVED_USERS: &[&str] = &[ADMIN_USER, "postgres", "public"];
/// Databases tenants may not create or drop.
pub const RESERVED_DATABASES: &[&str] = &["postgres", "template0", "template1"];

/// Binaries (overridable for packaging or tests).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Directory holding `postgres` and `initdb` (default: the newest under
    /// `/usr/lib/postgresql/*/bin`).
    #[serde(default)]
    pub bin_dir: Option<PathBuf>,
    /// PostgreSQL refuses to run as root: an agent running as root runs it as this user
    /// (default `postgres`, which Debian's package creates).
    #[serde(default)]
    pub run_as_user: Option<String>,
}

fn default_bin_dir() -> PathBuf {
    let mut best: Option<(u32, PathBuf)> = None;
    if let Ok(rd) = std::fs::read_dir("/usr/lib/postgresql") {
        for e in rd.flatten() {
            if let Ok(v) = e.file_name().to_string_lossy().parse::<u32>() {
                let bin = e.path().join("bin");
                if bin.join("postgres").exists() && best.as_ref().is_none_or(|(b, _)| v > *b) {
                    best = Some((v, bin));
                }
            }
        }
    }
    best.map(|(_, p)| p)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"))
}

/// One instance's PostgreSQL.
pub struct Postgresql {
    bin_dir: PathBuf,
    /// Who runs initdb and postgres: None = the agent's own user.
    run_as: Option<(u32, u32)>,
    layout: Layout,
    pool: Mutex<Option<PgPool>>,
    version: Mutex<Option<String>>,
}

impl Postgresql {
    pub fn new(config: Config, layout: Layout) -> Self {
        let run_as = nix::unistd::geteuid().is_root().then(|| {
            let name = config.run_as_user.as_deref().unwrap_or("postgres");
            match nix::unistd::User::from_name(name) {
                Ok(Some(u)) => (u.uid.as_raw(), u.gid.as_raw()),
                // No such user: initdb will say it cannot run as root.
                _ => (0, 0),
            }
        });
        Postgresql {
            bin_dir: config.bin_dir.unwrap_or_else(default_bin_dir),
            run_as: run_as.filter(|(u, _)| *u != 0),
            layout,
            pool: Mutex::new(None),
            version: Mutex::new(None),
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.layout.root.join("data")
    }
    fn config_file(&self) -> PathBuf {
        self.layout.root.join("postgresql.conf")
    }
    fn hba_file(&self) -> PathBuf {
        self.layout.root.join("pg_hba.conf")
    }
    fn overrides_file(&self) -> PathBuf {
        self.layout.root.join("overrides.conf")
    }
    fn password_file(&self) -> PathBuf {
        self.layout.root.join("admin.password")
    }
    /// `primary_conninfo` and the timeline to follow, when a standby (included by the config).
    fn standby_file(&self) -> PathBuf {
        self.layout.root.join("standby.conf")
    }
    /// The replication user's password for `primary_conninfo` (a libpq passfile, 0600).
    fn repl_passfile(&self) -> PathBuf {
        self.layout.root.join("replication.pgpass")
    }
    fn logs_file(&self) -> PathBuf {
        self.layout.root.join("logs.conf")
    }
    fn standby_signal(&self) -> PathBuf {
        self.data_dir().join("standby.signal")
    }
    fn initialized_marker(&self) -> PathBuf {
        self.layout.root.join(".initialized")
    }
    /// The socket directory: short (Unix socket paths are limited to 107 bytes), per instance.
    fn socket_dir(&self) -> PathBuf {
        super::short_runtime_path(&self.layout.root, "coffer-pg")
    }

    /// Hands a file or directory the server must read or write to the user it runs as.
    fn own(&self, path: &Path) -> Result<(), DatastoreError> {
        if let Some((uid, gid)) = self.run_as {
            nix::unistd::chown(
                path,
                Some(nix::unistd::Uid::from_raw(uid)),
                Some(nix::unistd::Gid::from_raw(gid)),
            )
            .map_err(|e| DatastoreError::io(path, e.into()))?;
        }
        Ok(())
    }

    async fn admin_password(&self) -> Result<String, DatastoreError> {
        let p = self.password_file();
        tokio::fs::read_to_string(&p)
            .await
            .map(|s| s.trim().to_string())
            .map_err(|e| DatastoreError::io(&p, e))
    }

    fn options(&self, password: &str, database: &str) -> PgConnectOptions {
        PgConnectOptions::new()
            .socket(self.socket_dir())
            .port(self.layout.port)
            .username(ADMIN_USER)
            .password(password)
            .database(database)
            .log_statements(tracing::log::LevelFilter::Off)
            .log_slow_statements(tracing::log::LevelFilter::Off, Duration::from_secs(3600))
    }

    async fn pool(&self) -> Result<PgPool, DatastoreError> {
        let mut guard = self.pool.lock().await;
        if let Some(p) = guard.as_ref() {
            return Ok(p.clone());
        }
        let password = self.admin_password().await?;
        let pool = PgPoolOptions::new()
            .max_connections(3)
            .min_connections(0)
            .acquire_timeout(Duration::from_secs(3))
            .idle_timeout(Duration::from_secs(60))
            .connect_lazy_with(self.options(&password, "postgres"));
        *guard = Some(pool.clone());
        Ok(pool)
    }

    async fn exec(&self, sql: &str) -> Result<(), DatastoreError> {
        let pool = self.pool().await?;
        sqlx::raw_sql(sql)
            .execute(&pool)
            .await
            .map_err(|e| DatastoreError::Query(e.to_string()))?;
        Ok(())
    }

    /// Runs `sql` connected to `database` (grants on a database's schema are made inside it).
    async fn exec_in(&self, database: &str, sql: &str) -> Result<(), DatastoreError> {
        let password = self.admin_password().await?;
        // A one-connection pool: a bare connection's executor does not fit async-trait's bounds.
        let one = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(self.options(&password, database))
            .await
            .map_err(|e| DatastoreError::Query(e.to_string()))?;
        let r = sqlx::raw_sql(sql).execute(&one).await;
        one.close().await;
        r.map_err(|e| DatastoreError::Query(e.to_string()))?;
        Ok(())
    }

    /// A one-connection pool on `database` (the caller closes it).
    async fn pool_in(&self, database: &str) -> Result<PgPool, DatastoreError> {
        let password = self.admin_password().await?;
        PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(self.options(&password, database))
            .await
            .map_err(|e| DatastoreError::Query(e.to_string()))
    }

    /// Every database that can hold data (all but the templates).
    async fn data_databases(&self) -> Result<Vec<String>, DatastoreError> {
        let pool = self.pool().await?;
        sqlx::query_scalar(
            "SELECT datname::text FROM pg_database WHERE NOT datistemplate AND datallowconn ORDER BY 1",
        )
        .fetch_all(&pool)
        .await
        .map_err(|e| DatastoreError::Query(e.to_string()))
    }

    /// The ordinary tables of the database `pool` is on, as (schema, table).
    async fn tables_in(pool: &PgPool) -> Result<Vec<(String, String)>, DatastoreError> {
        sqlx::query_as(
            "SELECT n.nspname::text, c.relname::text FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
             AND n.nspname NOT LIKE 'pg\\_toast%' ORDER BY 1, 2",
        )
        .fetch_all(pool)
        .await
        .map_err(|e| DatastoreError::Query(e.to_string()))
    }

    /// `amcheck`'s `bt_index_check` (with every heap tuple looked up) on each B-tree index, and
    /// a row count and checksum of each table, in the database `pool` is on.
    async fn verify_in(db: &str, pool: &PgPool) -> Result<Vec<Check>, DatastoreError> {
        let q = |e: sqlx::Error| DatastoreError::Query(e.to_string());
        let mut checks = vec![];
        if let Err(e) = sqlx::raw_sql("CREATE EXTENSION IF NOT EXISTS amcheck")
            .execute(pool)
            .await
        {
            checks.push(Check {
                name: format!("amcheck in {db}"),
                ok: false,
                detail: format!("the amcheck extension is not available: {e}"),
            });
        } else {
            let indexes: Vec<String> = sqlx::query_scalar(
                "SELECT c.oid::regclass::text FROM pg_index i \
                 JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am a ON a.oid = c.relam \
                 JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE a.amname = 'btree' AND i.indisvalid AND i.indisready \
                 AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
                 AND n.nspname NOT LIKE 'pg\\_toast%' ORDER BY 1",
            )
            .fetch_all(pool)
            .await
            .map_err(q)?;
            for ix in indexes {
                let r = sqlx::query("SELECT bt_index_check($1::regclass, true)")
                    .bind(&ix)
                    .execute(pool)
                    .await;
                checks.push(Check {
                    name: format!("index {db}/{ix}"),
                    ok: r.is_ok(),
                    detail: r.map_or_else(|e| e.to_string(), |_| "OK".into()),
                });
            }
        }
        for (schema, table) in Self::tables_in(pool).await? {
            let name = format!("{}.{}", ident(&schema), ident(&table));
            let r: Result<(i64, String), _> = sqlx::query_as(&format!(
                "SELECT count(*), coalesce(md5(string_agg(md5(t::text), '' ORDER BY md5(t::text))), '') \
                 FROM {name} t"
            ))
            .fetch_one(pool)
            .await;
            checks.push(match r {
                Ok((rows, sum)) => Check {
                    name: format!("table {db}/{schema}.{table}"),
                    ok: true,
                    detail: format!("OK; {rows} rows; checksum {sum}"),
                },
                Err(e) => Check {
                    name: format!("table {db}/{schema}.{table}"),
                    ok: false,
                    detail: e.to_string(),
                },
            });
        }
        Ok(checks)
    }

    async fn count(&self, sql: &str, bind: &str) -> Result<i64, DatastoreError> {
        let pool = self.pool().await?;
        sqlx::query_scalar::<_, i64>(sql)
            .bind(bind)
            .fetch_one(&pool)
            .await
            .map_err(|e| DatastoreError::Query(e.to_string()))
    }

    async fn role_exists(&self, name: &str) -> Result<bool, DatastoreError> {
        Ok(self
            .count("SELECT COUNT(*) FROM pg_roles WHERE rolname = $1", name)
            .await?
            > 0)
    }

    async fn database_exists(&self, name: &str) -> Result<bool, DatastoreError> {
        Ok(self
            .count("SELECT COUNT(*) FROM pg_database WHERE datname = $1", name)
            .await?
            > 0)
    }

    /// While this marker exists the agent's own role is trusted on the instance's private socket
    /// directory (0700: only the server's user and root reach it): a restored data directory
    /// and a standby hold another server's password for that role (a standby cannot change it).
    /// The first start of a primary, or a promotion, sets this instance's own password and
    /// removes the marker.
    fn reset_marker(&self) -> PathBuf {
        self.layout.root.join(".reset-admin")
    }

    async fn in_recovery(&self) -> Result<bool, DatastoreError> {
        let pool = self.pool().await?;
        sqlx::query_scalar::<_, bool>("SELECT pg_is_in_recovery()")
            .fetch_one(&pool)
            .await
            .map_err(|e| DatastoreError::Query(e.to_string()))
    }

    /// Where this server is: its own WAL end on a primary, what it replayed on a standby.
    async fn own_position(&self) -> Result<String, DatastoreError> {
        let pool = self.pool().await?;
        sqlx::query_scalar::<_, Option<String>>(
            "SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()::text \
             ELSE pg_current_wal_lsn()::text END",
        )
        .fetch_one(&pool)
        .await
        .map(Option::unwrap_or_default)
        .map_err(|e| DatastoreError::Query(e.to_string()))
    }

    /// Writes the standby settings: following `src` (None: a standby that follows nobody, the
    /// fence) on the newest timeline.
    fn write_standby(&self, src: Option<&super::ReplicationSource>) -> Result<(), DatastoreError> {
        // recovery_target_timeline is 'latest' by default: a standby follows its primary's
        // promotions.
        let mut text =
            String::from("# The replication role, written by coffer-agent (do not edit).\n");
        if let Some(src) = src {
            check_identifier("Replication user", &src.user)?;
            super::check_host(&src.host)?;
            let pass = self.repl_passfile();
            let field = |s: &str| s.replace('\\', "\\\\").replace(':', "\\:");
            write_private(
                &pass,
                &format!("*:*:*:{}:{}\n", field(&src.user), field(&src.password)),
            )?;
            self.own(&pass)?;
            let path = pass.display().to_string();
            if path.contains(['\'', '\\', ' ']) {
                return Err(DatastoreError::Invalid(format!(
                    "the instance path {path} has a quote, backslash or space"
                )));
            }
            text.push_str(&format!(
                "primary_conninfo = 'host={} port={} user={} passfile={path} application_name=coffer connect_timeout=5'\n",
                src.host, src.port, src.user
            ));
        }
        write_private(&self.standby_file(), &text)?;
        self.own(&self.standby_file())?;
        let signal = self.standby_signal();
        std::fs::write(&signal, b"").map_err(|e| DatastoreError::io(&signal, e))?;
        self.own(&signal)
    }

    /// Trusts the agent's role on the private socket (a standby: its password is the
    /// primary's).
    fn trust_admin(&self) -> Result<(), DatastoreError> {
        std::fs::write(self.reset_marker(), b"")
            .map_err(|e| DatastoreError::io(&self.reset_marker(), e))?;
        write_private(&self.hba_file(), &self.render_hba())?;
        self.own(&self.hba_file())
    }

    /// A primary whose agent role was trusted: this instance's own password, then password
    /// authentication again.
    async fn reset_admin(&self) -> Result<(), DatastoreError> {
        if !self.reset_marker().exists() {
            return Ok(());
        }
        let password = self.admin_password().await?;
        self.exec(&format!(
            "ALTER ROLE {} PASSWORD {}",
            ident(ADMIN_USER),
            literal(&verifier(&password))
        ))
        .await?;
        std::fs::remove_file(self.reset_marker())
            .map_err(|e| DatastoreError::io(&self.reset_marker(), e))?;
        write_private(&self.hba_file(), &self.render_hba())?;
        self.own(&self.hba_file())?;
        self.exec("SELECT pg_reload_conf()").await?;
        Ok(())
    }

    /// Polls until `done` holds or `timeout` passes.
    async fn poll_lsn(
        &self,
        sql: &str,
        target: u64,
        timeout: Duration,
    ) -> Result<bool, DatastoreError> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let pool = self.pool().await?;
            let at: Option<String> = sqlx::query_scalar(sql)
                .fetch_one(&pool)
                .await
                .map_err(|e| DatastoreError::Query(e.to_string()))?;
            if at.as_deref().and_then(parse_lsn).unwrap_or(0) >= target {
                return Ok(true);
            }
            if std::time::Instant::now() > deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Reloads the configuration files and waits until this session has read them; an error
    /// PostgreSQL found in `name`'s line of the overrides file is returned.
    async fn reload_checked(&self, name: &str) -> Result<(), DatastoreError> {
        let password = self.admin_password().await?;
        let one = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(self.options(&password, "postgres"))
            .await
            .map_err(|e| DatastoreError::Query(e.to_string()))?;
        let q = |sql: &'static str| sqlx::query_scalar::<_, String>(sql);
        let r = async {
            let before = q("SELECT pg_conf_load_time()::text")
                .fetch_one(&one)
                .await?;
            sqlx::query("SELECT pg_reload_conf()").execute(&one).await?;
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while q("SELECT pg_conf_load_time()::text")
                .fetch_one(&one)
                .await?
                == before
                && std::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            sqlx::query_scalar::<_, String>(
                "SELECT error FROM pg_file_settings WHERE lower(name) = lower($1) \
                 AND sourcefile = $2 AND error IS NOT NULL",
            )
            .bind(name)
            .bind(self.overrides_file().display().to_string())
            .fetch_optional(&one)
            .await
        }
        .await;
        one.close().await;
        match r.map_err(|e| DatastoreError::Query(e.to_string()))? {
            Some(err) => Err(DatastoreError::Invalid(format!(
                "PostgreSQL refused {name}: {err}"
            ))),
            None => Ok(()),
        }
    }

    fn render_hba(&self) -> String {
        let admin = if self.reset_marker().exists() {
            "trust"
        } else {
            "scram-sha-256"
        };
        format!(
            "# Written by coffer-agent (do not edit).\n\
             local all {ADMIN_USER} {admin}\n\
             local replication {ADMIN_USER} {admin}\n\
             local all all scram-sha-256\n\
             host replication all 0.0.0.0/0 scram-sha-256\n\
             host replication all ::/0 scram-sha-256\n\
             host all all 0.0.0.0/0 scram-sha-256\n\
             host all all ::/0 scram-sha-256\n"
        )
    }

    fn write_config(&self, sizing: &Sizing) -> Result<(), DatastoreError> {
        write_private(&self.config_file(), &self.render_config(sizing))?;
        write_private(&self.hba_file(), &self.render_hba())?;
        if !self.overrides_file().exists() {
            write_private(
                &self.overrides_file(),
                "# Configuration group values (written by coffer-agent).\n",
            )?;
        }
        if !self.standby_file().exists() {
            write_private(&self.standby_file(), PRIMARY_ROLE)?;
        }
        if !self.logs_file().exists() {
            self.write_log_settings(&[])?;
        }
        let sock = self.socket_dir();
        std::fs::create_dir_all(&sock).map_err(|e| DatastoreError::io(&sock, e))?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| DatastoreError::io(&sock, e))?;
        }
        for p in [
            self.config_file(),
            self.hba_file(),
            self.overrides_file(),
            self.standby_file(),
            sock,
        ] {
            self.own(&p)?;
        }
        Ok(())
    }
}

/// Statements slower than this (ms) are the `slow_query` log (Trove's default threshold).
pub const SLOW_QUERY_MS: u32 = 1000;

/// The standby settings of a primary: none.
const PRIMARY_ROLE: &str = "# A primary: no replication role (written by coffer-agent).\n";

/// One `postgresql.conf` line (values single-quoted: right for every type).
fn conf_line(k: &str, v: &str) -> String {
    format!("{k} = '{v}'")
}

/// `name = value` lines of a configuration file (quotes taken off, comments skipped).
fn parse_conf(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| {
            (
                k.trim().to_string(),
                v.trim().trim_matches('\'').to_string(),
            )
        })
        .collect()
}

/// A double-quoted identifier (any `"` doubled): safe for every name by construction.
pub fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// A single-quoted literal (any `'` doubled; standard_conforming_strings is on).
fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The SCRAM-SHA-256 verifier PostgreSQL stores for `password` (RFC 5802/7677, 4096 rounds).
pub fn scram_verifier(password: &str, salt: &[u8]) -> String {
    use openssl::hash::MessageDigest;
    use openssl::pkey::PKey;
    use openssl::sign::Signer;
    const ITERATIONS: usize = 4096;
    let mut salted = [0u8; 32];
    openssl::pkcs5::pbkdf2_hmac(
        password.as_bytes(),
        salt,
        ITERATIONS,
        MessageDigest::sha256(),
        &mut salted,
    )
    .expect("pbkdf2");
    let hmac = |key: &[u8], msg: &[u8]| -> Vec<u8> {
        let k = PKey::hmac(key).expect("hmac key");
        let mut s = Signer::new(MessageDigest::sha256(), &k).expect("hmac");
        s.update(msg).expect("hmac update");
        s.sign_to_vec().expect("hmac sign")
    };
    let client_key = hmac(&salted, b"Client Key");
    let stored_key = openssl::sha::sha256(&client_key);
    let server_key = hmac(&salted, b"Server Key");
    let b64 = data_encoding::BASE64;
    format!(
        "SCRAM-SHA-256${ITERATIONS}:{}${}:{}",
        b64.encode(salt),
        b64.encode(&stored_key),
        b64.encode(&server_key)
    )
}

fn verifier(password: &str) -> String {
    let mut salt = [0u8; 16];
    openssl::rand::rand_bytes(&mut salt).expect("random salt");
    scram_verifier(password, &salt)
}

fn write_private(path: &Path, contents: &str) -> Result<(), DatastoreError> {
    crate::fsutil::write_atomic(path, contents.as_bytes(), 0o600)
        .map_err(|e| DatastoreError::io(path, e))
}

fn generate_password() -> String {
    let mut b = [0u8; 24];
    openssl::rand::rand_bytes(&mut b).expect("random password");
    data_encoding::HEXLOWER.encode(&b)
}

fn check_word(what: &str, s: &str) -> Result<(), DatastoreError> {
    if s.is_empty()
        || s.len() > 64
        || !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        return Err(DatastoreError::Invalid(format!(
            "{what} '{s}' may hold only letters, digits, '_', '-' and '.'"
        )));
    }
    Ok(())
}

/// PostgreSQL truncates identifiers at 63 bytes; refusing longer ones avoids two names meeting.
fn check_identifier(what: &str, name: &str) -> Result<(), DatastoreError> {
    if name.is_empty() || name.len() > 63 || name.chars().any(|c| c.is_control()) {
        return Err(DatastoreError::Invalid(format!(
            "{what} name must be 1-63 bytes without control characters"
        )));
    }
    Ok(())
}

/// Extracts `15.14` from `postgres (PostgreSQL) 15.14 (Debian 15.14-0+deb12u1)`.
pub fn parse_version(text: &str) -> Option<String> {
    let v = text
        .split("(PostgreSQL) ")
        .nth(1)?
        .split_whitespace()
        .next()?;
    Some(v.to_string())
}

#[async_trait]
impl Datastore for Postgresql {
    fn title(&self) -> &'static str {
        "PostgreSQL"
    }

    fn name(&self) -> &'static str {
        "postgresql"
    }

    async fn version(&self) -> Result<String, DatastoreError> {
        if let Some(v) = self.version.lock().await.clone() {
            return Ok(v);
        }
        let bin = self.bin_dir.join("postgres");
        let out = tokio::process::Command::new(&bin)
            .arg("--version")
            .output()
            .await
            .map_err(|e| DatastoreError::io(&bin, e))?;
        let v = parse_version(&String::from_utf8_lossy(&out.stdout)).ok_or_else(|| {
            DatastoreError::Tool {
                tool: "postgres --version".into(),
                detail: "no version in its output".into(),
            }
        })?;
        *self.version.lock().await = Some(v.clone());
        Ok(v)
    }

    fn is_initialized(&self) -> bool {
        self.initialized_marker().exists()
    }

    fn render_config(&self, s: &Sizing) -> String {
        let mem = s.memory_mb.max(128);
        let shared_buffers = (mem / 4).max(16);
        let cache = (mem * 3 / 4).max(32);
        let max_connections = (mem / 4).clamp(20, 500);
        format!(
            "# Rendered by coffer-agent from the flavor ({mem} MB, {vcpus} vCPU); do not edit.\n\
             data_directory = {data}\n\
             hba_file = {hba}\n\
             ident_file = {ident}\n\
             listen_addresses = {bind}\n\
             port = {port}\n\
             unix_socket_directories = {sock}\n\
             max_connections = {max_connections}\n\
             shared_buffers = {shared_buffers}MB\n\
             effective_cache_size = {cache}MB\n\
             password_encryption = scram-sha-256\n\
             wal_level = replica\n\
             max_wal_senders = 10\n\
             # Backups (pg_basebackup -X fetch) and replicas need the WAL written meanwhile.\n\
             wal_keep_size = {wal_keep}MB\n\
             hot_standby = on\n\
             logging_collector = off\n\
             log_destination = stderr\n\
             dynamic_shared_memory_type = posix\n\
             # The replication role (written by coffer-agent).\n\
             include_if_exists = {standby}\n\
             # Guest log switches (written by coffer-agent).\n\
             include_if_exists = {logs}\n\
             # Configuration group values (written by coffer-agent), last so they win.\n\
             include_if_exists = {overrides}\n",
            vcpus = s.vcpus,
            wal_keep = (s.volume_gb * 1024 / 16).clamp(64, 1024),
            data = literal(&self.data_dir().display().to_string()),
            hba = literal(&self.hba_file().display().to_string()),
            ident = literal(&self.data_dir().join("pg_ident.conf").display().to_string()),
            bind = literal(&self.layout.bind_address),
            port = self.layout.port,
            sock = literal(&self.socket_dir().display().to_string()),
            overrides = literal(&self.overrides_file().display().to_string()),
            standby = literal(&self.standby_file().display().to_string()),
            logs = literal(&self.logs_file().display().to_string()),
        )
    }

    async fn initialize(&self, sizing: &Sizing) -> Result<(), DatastoreError> {
        let root = &self.layout.root;
        std::fs::create_dir_all(root).map_err(|e| DatastoreError::io(root, e))?;
        self.own(root)?;
        let data = self.data_dir();
        if data.exists() {
            // A half-finished earlier attempt: start over.
            std::fs::remove_dir_all(&data).map_err(|e| DatastoreError::io(&data, e))?;
        }
        let password = generate_password();
        write_private(&self.password_file(), &password)?;
        // initdb reads the admin's password from a file, never from its arguments.
        let pwfile = root.join("initdb.pw");
        write_private(&pwfile, &password)?;
        self.own(&pwfile)?;
        let log = root.join("initdb.log");
        let log_file = std::fs::File::create(&log).map_err(|e| DatastoreError::io(&log, e))?;
        let log_err = log_file
            .try_clone()
            .map_err(|e| DatastoreError::io(&log, e))?;
        let initdb = self.bin_dir.join("initdb");
        let mut cmd = tokio::process::Command::new(&initdb);
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
        let status = cmd
            .arg("-D")
            .arg(&data)
            .args(["-U", ADMIN_USER, "--auth=scram-sha-256", "-E", "UTF8"])
            .args(["--locale=C.UTF-8", "--no-instructions"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .stdin(std::process::Stdio::null())
            .stdout(log_file)
            .stderr(log_err)
            .status()
            .await
            .map_err(|e| DatastoreError::io(&initdb, e));
        let _ = std::fs::remove_file(&pwfile);
        let status = status?;
        if !status.success() {
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(5).collect();
            return Err(DatastoreError::Tool {
                tool: "initdb".into(),
                detail: format!(
                    "{status}; see {}: {}",
                    log.display(),
                    tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                ),
            });
        }
        self.write_config(sizing)?;
        let marker = self.initialized_marker();
        std::fs::write(&marker, b"").map_err(|e| DatastoreError::io(&marker, e))?;
        Ok(())
    }

    fn server_command(&self) -> ServerCommand {
        let cnf = self.config_file();
        ServerCommand {
            program: self.bin_dir.join("postgres"),
            args: vec![format!("--config-file={}", cnf.display())],
            output_file: self.layout.root.join("postgres.log"),
            // postmaster.pid holds more than the pid: the supervisor then relies on its record.
            pid_file: self.data_dir().join("postmaster.pid"),
            cmdline_marker: format!("--config-file={}", cnf.display()),
            run_as: self.run_as,
            stop_signal: nix::sys::signal::Signal::SIGINT,
        }
    }

    async fn probe(&self) -> Health {
        let pool = match self.pool().await {
            Ok(p) => p,
            Err(e) => return Health::Down(e.to_string()),
        };
        let fut = async {
            sqlx::query_scalar::<_, i64>(
                "SELECT COUNT(*) FROM pg_stat_activity WHERE backend_type = 'client backend'",
            )
            .fetch_one(&pool)
            .await
        };
        match tokio::time::timeout(Duration::from_secs(3), fut).await {
            Ok(Ok(n)) => Health::Ready {
                connections: n.max(0) as u32,
            },
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
        if self.database_exists(&db.name).await? {
            return Err(DatastoreError::Exists(format!(
                "Database '{}' already exists.",
                db.name
            )));
        }
        let mut sql = format!("CREATE DATABASE {}", ident(&db.name));
        if let Some(cs) = db.character_set.as_deref().filter(|s| !s.is_empty()) {
            check_word("character_set", cs)?;
            sql.push_str(&format!(" ENCODING {} TEMPLATE template0", literal(cs)));
        }
        if let Some(co) = db.collate.as_deref().filter(|s| !s.is_empty()) {
            check_word("collate", co)?;
            sql.push_str(&format!(
                " LC_COLLATE {} LC_CTYPE {}",
                literal(co),
                literal(co)
            ));
            if db.character_set.as_deref().is_none_or(str::is_empty) {
                sql.push_str(" TEMPLATE template0");
            }
        }
        self.exec(&sql).await
    }

    async fn create_user(&self, user: &UserSpec) -> Result<(), DatastoreError> {
        self.validate_user(user)?;
        if self.role_exists(&user.name).await? {
            return Err(DatastoreError::Exists(format!(
                "User '{}' already exists.",
                user.name
            )));
        }
        for db in &user.databases {
            if !self.database_exists(db).await? {
                return Err(DatastoreError::NotFound(format!(
                    "Database '{db}' cannot be found on the instance."
                )));
            }
        }
        self.exec(&format!(
            "CREATE ROLE {} LOGIN PASSWORD {}",
            ident(&user.name),
            literal(&verifier(&user.password))
        ))
        .await?;
        for db in &user.databases {
            self.grant(&user.name, "%", db).await?;
        }
        Ok(())
    }

    async fn grant(&self, user: &str, _host: &str, database: &str) -> Result<(), DatastoreError> {
        self.validate_database_name(database)?;
        if !self.database_exists(database).await? {
            return Err(DatastoreError::NotFound(format!(
                "Database '{database}' cannot be found on the instance."
            )));
        }
        self.exec(&format!(
            "GRANT ALL PRIVILEGES ON DATABASE {} TO {}",
            ident(database),
            ident(user)
        ))
        .await?;
        // PostgreSQL 15 no longer lets everyone create in `public`: grant it inside the database.
        self.exec_in(
            database,
            &format!("GRANT ALL ON SCHEMA public TO {}", ident(user)),
        )
        .await
    }

    async fn revoke(&self, user: &str, _host: &str, database: &str) -> Result<(), DatastoreError> {
        self.validate_database_name(database)?;
        self.exec(&format!(
            "REVOKE ALL PRIVILEGES ON DATABASE {} FROM {}",
            ident(database),
            ident(user)
        ))
        .await?;
        self.exec_in(
            database,
            &format!("REVOKE ALL ON SCHEMA public FROM {}", ident(user)),
        )
        .await
    }

    async fn inventory(&self) -> Result<Vec<String>, DatastoreError> {
        let mut names = vec![];
        for db in self.data_databases().await? {
            let pool = self.pool_in(&db).await?;
            let tables = Self::tables_in(&pool).await;
            pool.close().await;
            names.extend(tables?.into_iter().map(|(s, t)| format!("{db}/{s}.{t}")));
        }
        Ok(names)
    }

    async fn verify(&self) -> Result<Vec<Check>, DatastoreError> {
        let mut checks = vec![];
        for db in self.data_databases().await? {
            let pool = self.pool_in(&db).await?;
            let r = Self::verify_in(&db, &pool).await;
            pool.close().await;
            checks.extend(r?);
        }
        Ok(checks)
    }

    async fn list_databases(&self) -> Result<Vec<DatabaseSpec>, DatastoreError> {
        let pool = self.pool().await?;
        let rows = sqlx::query(
            "SELECT datname, pg_encoding_to_char(encoding) AS enc, datcollate FROM pg_database \
             WHERE NOT datistemplate AND datname <> 'postgres' ORDER BY datname",
        )
        .fetch_all(&pool)
        .await
        .map_err(|e| DatastoreError::Query(e.to_string()))?;
        Ok(rows
            .iter()
            .map(|r| DatabaseSpec {
                name: r.get("datname"),
                character_set: Some(r.get::<String, _>("enc")),
                collate: Some(r.get::<String, _>("datcollate")),
            })
            .collect())
    }

    async fn delete_database(&self, name: &str) -> Result<(), DatastoreError> {
        self.validate_database_name(name)?;
        if !self.database_exists(name).await? {
            return Err(DatastoreError::NotFound(format!(
                "Database '{name}' cannot be found on the instance."
            )));
        }
        self.exec(&format!("DROP DATABASE {} WITH (FORCE)", ident(name)))
            .await
    }

    async fn list_users(&self) -> Result<Vec<UserSpec>, DatastoreError> {
        let pool = self.pool().await?;
        let rows = sqlx::query(
            "SELECT r.rolname, COALESCE(array_agg(d.datname ORDER BY d.datname) \
               FILTER (WHERE d.datname IS NOT NULL), '{}') AS dbs \
             FROM pg_roles r \
             LEFT JOIN pg_database d ON NOT d.datistemplate AND d.datname <> 'postgres' \
               AND EXISTS (SELECT 1 FROM aclexplode(d.datacl) a WHERE a.grantee = r.oid \
                           AND a.privilege_type = 'CREATE') \
             WHERE r.rolcanlogin AND NOT r.rolreplication AND r.rolname NOT LIKE 'pg\\_%' \
               AND r.rolname <> ALL($1) \
             GROUP BY r.rolname ORDER BY r.rolname",
        )
        .bind(
            [ADMIN_USER, ROOT_USER, "postgres"]
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>(),
        )
        .fetch_all(&pool)
        .await
        .map_err(|e| DatastoreError::Query(e.to_string()))?;
        Ok(rows
            .iter()
            .map(|r| UserSpec {
                name: r.get("rolname"),
                password: String::new(),
                host: "%".into(),
                databases: r.get::<Vec<String>, _>("dbs"),
            })
            .collect())
    }

    async fn delete_user(&self, name: &str, host: &str) -> Result<(), DatastoreError> {
        self.validate_user(&UserSpec {
            name: name.into(),
            password: "x".into(),
            host: host.into(),
            databases: vec![],
        })?;
        if !self.role_exists(name).await? {
            return Err(DatastoreError::NotFound(format!(
                "User '{name}' cannot be found on the instance."
            )));
        }
        // Its grants go with it, in every database.
        for db in self.list_databases().await? {
            self.exec_in(&db.name, &format!("DROP OWNED BY {}", ident(name)))
                .await?;
        }
        self.exec(&format!("DROP ROLE {}", ident(name))).await
    }

    async fn update_user(
        &self,
        name: &str,
        _host: &str,
        new_name: Option<&str>,
        new_host: Option<&str>,
        new_password: Option<&str>,
    ) -> Result<(), DatastoreError> {
        super::check_no_host(self.title(), new_host.unwrap_or(""))?;
        if !self.role_exists(name).await? {
            return Err(DatastoreError::NotFound(format!(
                "User '{name}' cannot be found on the instance."
            )));
        }
        if let Some(pw) = new_password {
            self.exec(&format!(
                "ALTER ROLE {} PASSWORD {}",
                ident(name),
                literal(&verifier(pw))
            ))
            .await?;
        }
        if let Some(n) = new_name.filter(|n| *n != name) {
            self.validate_user(&UserSpec {
                name: n.into(),
                password: "x".into(),
                host: "%".into(),
                databases: vec![],
            })?;
            if self.role_exists(n).await? {
                return Err(DatastoreError::Exists(format!(
                    "User '{n}' already exists."
                )));
            }
            self.exec(&format!(
                "ALTER ROLE {} RENAME TO {}",
                ident(name),
                ident(n)
            ))
            .await?;
            // Renaming clears an MD5 password; SCRAM verifiers survive, as set above.
        }
        Ok(())
    }

    async fn enable_root(&self, password: &str) -> Result<(), DatastoreError> {
        let verb = if self.role_exists(ROOT_USER).await? {
            "ALTER"
        } else {
            "CREATE"
        };
        // Not a superuser: a superuser reaches the server's host (COPY ... TO PROGRAM, file
        // reads) as the server's OS user, which on a shared host is everyone's. Root reads and
        // writes every table and creates databases, as a cloud's master user does; without
        // CREATEROLE, which on PostgreSQL 15 could grant it pg_execute_server_program.
        self.exec(&format!(
            "{verb} ROLE {} LOGIN NOSUPERUSER CREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS PASSWORD {}",
            ident(ROOT_USER),
            literal(&verifier(password))
        ))
        .await?;
        self.exec(&format!(
            "GRANT pg_read_all_data, pg_write_all_data, pg_monitor, pg_signal_backend TO {}",
            ident(ROOT_USER)
        ))
        .await
    }

    async fn disable_root(&self) -> Result<(), DatastoreError> {
        if self.role_exists(ROOT_USER).await? {
            self.exec(&format!("ALTER ROLE {} NOLOGIN", ident(ROOT_USER)))
                .await?;
        }
        Ok(())
    }

    async fn backup_context(&self) -> Result<crate::backup::BackupCtx, DatastoreError> {
        Ok(crate::backup::BackupCtx {
            data_dir: self.data_dir(),
            socket: self.socket_dir(),
            port: self.layout.port,
            tools_dir: Some(self.bin_dir.clone()),
            admin_user: ADMIN_USER.into(),
            admin_password: self.admin_password().await?,
            tmp_dir: self.layout.root.join("tmp"),
        })
    }

    async fn initialize_restored(&self, sizing: &Sizing) -> Result<(), DatastoreError> {
        let root = &self.layout.root;
        std::fs::create_dir_all(root).map_err(|e| DatastoreError::io(root, e))?;
        self.own(root)?;
        // The restored files become the server's.
        let data = self.data_dir();
        if let Some((uid, gid)) = self.run_as {
            let out = std::process::Command::new("chown")
                .arg("-R")
                .arg(format!("{uid}:{gid}"))
                .arg(&data)
                .output()
                .map_err(|e| DatastoreError::io(&data, e))?;
            if !out.status.success() {
                return Err(DatastoreError::Tool {
                    tool: "chown".into(),
                    detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
                });
            }
        }
        // The source's server identity files must not be reused as-is.
        for stale in ["postmaster.pid", "postmaster.opts"] {
            let _ = std::fs::remove_file(data.join(stale));
        }
        write_private(&self.password_file(), &generate_password())?;
        std::fs::write(self.reset_marker(), b"")
            .map_err(|e| DatastoreError::io(&self.reset_marker(), e))?;
        self.write_config(sizing)?;
        let marker = self.initialized_marker();
        std::fs::write(&marker, b"").map_err(|e| DatastoreError::io(&marker, e))?;
        Ok(())
    }

    async fn finish_first_start(&self) -> Result<(), DatastoreError> {
        // A point-in-time restore runs an archive recovery: the server answers read-only
        // meanwhile, removes the signal file as the recovery ends and takes writes a moment
        // later; it is ready then. (A server that stops answering for a minute meanwhile ended
        // its recovery badly.)
        // The server may already have removed the signal file, still in recovery for a
        // moment: anything in recovery that is not a standby is waited for.
        let signal = self.data_dir().join("recovery.signal");
        let mut answered = std::time::Instant::now();
        let mut recovering = !self.standby_signal().exists();
        while recovering {
            match self.in_recovery().await {
                Ok(false) if !signal.exists() => recovering = false,
                Ok(_) => answered = std::time::Instant::now(),
                Err(e) if answered.elapsed() > std::time::Duration::from_secs(60) => return Err(e),
                Err(_) => {}
            }
            if recovering {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
        // The restore's placeholder (`restore_command = 'false'`, put there for that recovery)
        // is not this server's setting.
        let auto = self.data_dir().join("postgresql.auto.conf");
        let placeholder = std::fs::read_to_string(&auto).is_ok_and(|c| {
            c.lines().any(|l| {
                l.trim() == "restore_command = 'false'"
                    || (l.trim_start().starts_with("restore_command")
                        && l.contains(crate::archive::wal::FEED_SCRIPT))
            })
        });
        if placeholder {
            let settings = crate::archive::wal::FEED_SETTINGS.iter().map(|(k, _)| *k);
            for k in std::iter::once("restore_command").chain(settings) {
                if let Err(e) = self.exec(&format!("ALTER SYSTEM RESET {k}")).await {
                    tracing::warn!(error = %e, "could not remove the restore's {k}");
                }
            }
            let _ = self.exec("SELECT pg_reload_conf()").await;
        }
        if !self.reset_marker().exists() || self.in_recovery().await? {
            // A standby keeps the primary's password for the agent's role: trusted until
            // promoted.
            return Ok(());
        }
        self.reset_admin().await
    }

    /// The server log (SYS), and `slow_query` (USER): the statements that ran longer than
    /// [`SLOW_QUERY_MS`], which PostgreSQL writes into the same output
    /// (`log_min_duration_statement`): published are only those records.
    /// The WAL in `pg_wal`, each look bounded by the server's flush position (asked on a
    /// connection of its own, opened at the first look: the server may not run yet).
    fn change_log(&self) -> Option<Box<dyn crate::archive::ChangeLog>> {
        let handle = tokio::runtime::Handle::try_current().ok()?;
        let (password_file, opts) = (self.password_file(), self.options("", "postgres"));
        let pool: std::sync::Mutex<Option<PgPool>> = std::sync::Mutex::new(None);
        let flushed = move || -> Result<(String, u64), String> {
            let pool = {
                let mut p = pool.lock().unwrap();
                if p.is_none() {
                    let pw = std::fs::read_to_string(&password_file)
                        .map_err(|e| format!("{}: {e}", password_file.display()))?;
                    *p = Some(
                        PgPoolOptions::new()
                            .max_connections(1)
                            .acquire_timeout(Duration::from_secs(3))
                            .idle_timeout(Duration::from_secs(60))
                            .connect_lazy_with(opts.clone().password(pw.trim())),
                    );
                }
                p.clone().unwrap()
            };
            let (file, offset): (String, i64) = handle
                .block_on(
                    sqlx::query_as(
                        "SELECT file_name, file_offset::bigint \
                         FROM pg_walfile_name_offset(pg_current_wal_flush_lsn())",
                    )
                    .fetch_one(&pool),
                )
                .map_err(|e| format!("asking where the WAL is flushed: {e}"))?;
            Ok((file, offset.max(0) as u64))
        };
        Some(Box::new(crate::archive::wal::WalLog::new(
            self.data_dir().join("pg_wal"),
            std::sync::Arc::new(flushed),
        )))
    }

    fn replay(&self) -> Option<Box<dyn crate::archive::Replay>> {
        Some(Box::new(crate::archive::wal::WalReplay))
    }

    async fn rotate_change_log(&self) -> Result<(), DatastoreError> {
        self.exec("SELECT pg_switch_wal()").await
    }

    /// A physical replication slot (`coffer_archive`) keeps the WAL the archive has not stored
    /// from being recycled at checkpoints (else a hole); it is advanced as segments are stored
    /// and dropped when the archive stops.
    async fn hold_change_log(&self, stored: Option<(&str, u64)>) -> Result<(), DatastoreError> {
        let pool = self.pool().await?;
        let q = |e: sqlx::Error| DatastoreError::Query(e.to_string());
        let Some((file, pos)) = stored else {
            sqlx::query(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                 WHERE slot_name = 'coffer_archive'",
            )
            .execute(&pool)
            .await
            .map_err(q)?;
            return Ok(());
        };
        sqlx::query(
            "SELECT pg_create_physical_replication_slot('coffer_archive', true) \
             WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = 'coffer_archive')",
        )
        .execute(&pool)
        .await
        .map_err(q)?;
        let v = crate::archive::wal::segno(file) * crate::archive::wal::SEGMENT + pos;
        let lsn = format!("{:X}/{:X}", v >> 32, v & 0xFFFF_FFFF);
        sqlx::query(
            "SELECT pg_replication_slot_advance('coffer_archive', $1::pg_lsn) FROM pg_replication_slots \
             WHERE slot_name = 'coffer_archive' AND restart_lsn < $1::pg_lsn",
        )
        .bind(&lsn)
        .execute(&pool)
        .await
        .map_err(q)?;
        Ok(())
    }

    fn log_definitions(&self) -> Vec<crate::logs::LogDef> {
        use crate::logs::{LogDef, LogKind};
        let file = self.server_command().output_file;
        vec![
            LogDef {
                name: self.name().into(),
                kind: LogKind::Sys,
                file: file.clone(),
                enable: vec![],
                disable: vec![],
                records: None,
            },
            LogDef {
                name: "slow_query".into(),
                kind: LogKind::User,
                file,
                enable: vec![(
                    "log_min_duration_statement".into(),
                    SLOW_QUERY_MS.to_string(),
                )],
                disable: vec![("log_min_duration_statement".into(), "-1".into())],
                records: Some("duration:".into()),
            },
        ]
    }

    fn write_log_settings(&self, vars: &[(String, String)]) -> Result<(), DatastoreError> {
        let text = super::render_settings(
            "Guest log switches",
            vars.iter().map(|(k, v)| (k, v)),
            conf_line,
        )?;
        write_private(&self.logs_file(), &text)?;
        self.own(&self.logs_file())
    }

    /// The settings file is already written: a reload switches the log.
    async fn switch_log_live(&self, vars: &[(String, String)]) -> Result<(), DatastoreError> {
        match vars.first() {
            Some((name, _)) => self.reload_checked(name).await,
            None => Ok(()),
        }
    }

    async fn create_replication_user(
        &self,
        user: &str,
        password: &str,
    ) -> Result<(), DatastoreError> {
        check_identifier("Replication user", user)?;
        let verb = if self.role_exists(user).await? {
            "ALTER"
        } else {
            "CREATE"
        };
        self.exec(&format!(
            "{verb} ROLE {} WITH REPLICATION LOGIN PASSWORD {}",
            ident(user),
            literal(&verifier(password))
        ))
        .await
    }

    async fn replication_position(&self) -> Result<String, DatastoreError> {
        self.own_position().await
    }

    async fn replication_info(&self) -> Result<super::ReplicationState, DatastoreError> {
        let pool = self.pool().await?;
        let r = sqlx::query(
            "SELECT pg_is_in_recovery() AS rec, \
               CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn()::text END AS cur, \
               pg_last_wal_replay_lsn()::text AS replay, pg_last_wal_receive_lsn()::text AS recv, \
               (SELECT status FROM pg_stat_wal_receiver LIMIT 1) AS wr_status, \
               (SELECT sender_host FROM pg_stat_wal_receiver LIMIT 1) AS wr_host, \
               (SELECT sender_port FROM pg_stat_wal_receiver LIMIT 1) AS wr_port, \
               EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp())::bigint AS lag, \
               current_setting('primary_conninfo') AS conninfo, \
               CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused() ELSE false END AS paused",
        )
        .fetch_one(&pool)
        .await
        .map_err(|e| DatastoreError::Query(e.to_string()))?;
        let rec: bool = r.get("rec");
        let replay: Option<String> = r.get("replay");
        let recv: Option<String> = r.get("recv");
        let conninfo: String = r.get("conninfo");
        let lag: Option<i64> = r.get("lag");
        let caught_up = replay.is_some()
            && replay.as_deref().and_then(parse_lsn) >= recv.as_deref().and_then(parse_lsn);
        Ok(super::ReplicationState {
            replica: rec && !conninfo.is_empty(),
            gtid_binlog_pos: if rec {
                replay.clone().unwrap_or_default()
            } else {
                r.get::<Option<String>, _>("cur").unwrap_or_default()
            },
            gtid_slave_pos: replay.unwrap_or_default(),
            gtid_io_pos: recv.unwrap_or_default(),
            io_running: r.get::<Option<String>, _>("wr_status").as_deref() == Some("streaming"),
            sql_running: rec && !r.get::<bool, _>("paused"),
            seconds_behind: if !rec {
                None
            } else if caught_up {
                Some(0)
            } else {
                lag
            },
            last_error: String::new(),
            last_sql_error: String::new(),
            read_only: rec,
            source_host: r.get::<Option<String>, _>("wr_host").unwrap_or_default(),
            source_port: r.get::<Option<i32>, _>("wr_port").unwrap_or(0).max(0) as u16,
        })
    }

    async fn prepare_replica(
        &self,
        src: &super::ReplicationSource,
    ) -> Result<bool, DatastoreError> {
        self.write_standby(Some(src))?;
        self.trust_admin()?;
        Ok(true)
    }

    async fn attach_replica(
        &self,
        src: &super::ReplicationSource,
    ) -> Result<super::Applied, DatastoreError> {
        self.write_standby(Some(src))?;
        self.trust_admin()?;
        if self.in_recovery().await.unwrap_or(false) {
            // A standby already (fenced, or following another primary): a reload re-points it.
            self.exec("SELECT pg_reload_conf()").await?;
            return Ok(super::Applied::Live);
        }
        // A primary becomes a standby only by starting as one.
        Ok(super::Applied::Restart)
    }

    async fn detach_replica(&self) -> Result<(), DatastoreError> {
        if self.in_recovery().await? {
            let pool = self.pool().await?;
            let promoted: bool = sqlx::query_scalar("SELECT pg_promote(true, 60)")
                .fetch_one(&pool)
                .await
                .map_err(|e| DatastoreError::Query(e.to_string()))?;
            if !promoted {
                return Err(DatastoreError::Tool {
                    tool: "pg_promote".into(),
                    detail: "the standby did not finish promotion within 60 s".into(),
                });
            }
        }
        write_private(&self.standby_file(), PRIMARY_ROLE)?;
        self.own(&self.standby_file())?;
        let _ = std::fs::remove_file(self.standby_signal());
        let _ = std::fs::remove_file(self.repl_passfile());
        self.reset_admin().await?;
        self.exec("SELECT pg_reload_conf()").await
    }

    async fn wait_for_position(
        &self,
        gtid: &str,
        timeout: Duration,
    ) -> Result<bool, DatastoreError> {
        let target = parse_lsn(gtid)
            .ok_or_else(|| DatastoreError::Invalid(format!("bad WAL position '{gtid}'")))?;
        self.poll_lsn(
            "SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()::text \
             ELSE pg_current_wal_lsn()::text END",
            target,
            timeout,
        )
        .await
    }

    /// Failover: stop receiving (no `primary_conninfo`), then replay everything received.
    async fn drain_relay_log(&self, timeout: Duration) -> Result<(), DatastoreError> {
        if !self.in_recovery().await? {
            return Ok(());
        }
        self.write_standby(None)?;
        self.exec("SELECT pg_reload_conf()").await?;
        let pool = self.pool().await?;
        let recv: Option<String> = sqlx::query_scalar("SELECT pg_last_wal_receive_lsn()::text")
            .fetch_one(&pool)
            .await
            .map_err(|e| DatastoreError::Query(e.to_string()))?;
        let target = recv.as_deref().and_then(parse_lsn).unwrap_or(0);
        if self
            .poll_lsn("SELECT pg_last_wal_replay_lsn()::text", target, timeout)
            .await?
        {
            Ok(())
        } else {
            Err(DatastoreError::Tool {
                tool: "replay".into(),
                detail: format!("the received WAL was not replayed within {timeout:?}"),
            })
        }
    }

    /// The fence is a standby that follows nobody: it starts (or stays) in recovery, where no
    /// session can write and none can undo it. Lifting it promotes.
    async fn set_read_only_persistent(
        &self,
        read_only: bool,
    ) -> Result<super::Applied, DatastoreError> {
        let standby = self.in_recovery().await?;
        if read_only {
            self.write_standby(None)?;
            if standby {
                self.exec("SELECT pg_reload_conf()").await?;
                return Ok(super::Applied::Live);
            }
            return Ok(super::Applied::Restart);
        }
        if standby {
            self.detach_replica().await?;
        }
        Ok(super::Applied::Live)
    }

    fn data_path(&self) -> PathBuf {
        self.data_dir()
    }

    async fn kill_tenant_connections(&self) -> Result<u32, DatastoreError> {
        let pool = self.pool().await?;
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE backend_type = 'client backend' AND usename <> $1 AND pid <> pg_backend_pid()) t",
        )
        .bind(ADMIN_USER)
        .fetch_one(&pool)
        .await
        .map_err(|e| DatastoreError::Query(e.to_string()))?;
        Ok(n.max(0) as u32)
    }

    fn confd_dir(&self) -> PathBuf {
        self.layout.root.join("conf.d")
    }

    fn overrides(&self) -> Result<std::collections::BTreeMap<String, String>, DatastoreError> {
        super::read_settings(&self.overrides_file(), parse_conf)
    }

    fn write_overrides(
        &self,
        values: &std::collections::BTreeMap<String, String>,
    ) -> Result<(), DatastoreError> {
        let text = super::render_settings("Configuration group values", values, conf_line)?;
        write_private(&self.overrides_file(), &text)?;
        self.own(&self.overrides_file())
    }

    async fn is_dynamic(&self, name: &str) -> Result<bool, DatastoreError> {
        let pool = self.pool().await?;
        let context: Option<String> =
            sqlx::query_scalar("SELECT context FROM pg_settings WHERE lower(name) = lower($1)")
                .bind(name)
                .fetch_optional(&pool)
                .await
                .map_err(|e| DatastoreError::Query(e.to_string()))?;
        match context {
            Some(c) => Ok(!crate::config_rules::pg_context_needs_restart(&c)),
            None => Err(DatastoreError::Invalid(format!(
                "the server has no setting '{name}'"
            ))),
        }
    }

    /// PostgreSQL changes settings by reloading its files: the value goes into the overrides
    /// file (None takes it out, back to the rendered or built-in value), the server reloads,
    /// and a value the server refused is taken back out and reported.
    async fn set_global(&self, name: &str, value: Option<&str>) -> Result<(), DatastoreError> {
        let mut all = self.overrides()?;
        let before = all.clone();
        match value {
            Some(v) => all.insert(name.to_string(), v.to_string()),
            None => all.remove(name),
        };
        self.write_overrides(&all)?;
        if let Err(e) = self.reload_checked(name).await {
            self.write_overrides(&before)?;
            let _ = self.reload_checked(name).await;
            return Err(e);
        }
        Ok(())
    }

    fn default_configuration(&self) -> Result<Vec<(String, String)>, DatastoreError> {
        let text = std::fs::read_to_string(self.config_file())
            .map_err(|e| DatastoreError::io(&self.config_file(), e))?;
        Ok(parse_conf(&text)
            .into_iter()
            .filter(|(k, _)| k != "include_if_exists")
            .collect())
    }

    fn validate_database_name(&self, name: &str) -> Result<(), DatastoreError> {
        check_identifier("Database", name)?;
        if RESERVED_DATABASES.contains(&name) {
            return Err(DatastoreError::Invalid(format!(
                "Database '{name}' is reserved."
            )));
        }
        Ok(())
    }

    fn validate_user(&self, user: &UserSpec) -> Result<(), DatastoreError> {
        check_identifier("User", &user.name)?;
        let lower = user.name.to_ascii_lowercase();
        if RESERVED_USERS.contains(&lower.as_str())
            || lower == ROOT_USER
            || lower.starts_with("pg_")
        {
            return Err(DatastoreError::Invalid(format!(
                "User '{}' is reserved.",
                user.name
            )));
        }
        super::check_no_host(self.title(), &user.host)?;
        if user.password.is_empty() {
            return Err(DatastoreError::Invalid("A password is required.".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scram_verifier_has_postgresqls_shape() {
        // That PostgreSQL accepts these verifiers is what the end-to-end logins check.
        let v = scram_verifier("pencil", b"0123456789abcdef");
        assert!(
            v.starts_with("SCRAM-SHA-256$4096:MDEyMzQ1Njc4OWFiY2RlZg==$"),
            "{v}"
        );
        assert_eq!(v.matches(':').count(), 2);
    }

    #[test]
    fn identifiers_and_literals_are_quoted_by_construction() {
        assert_eq!(ident(r#"a"b"#), r#""a""b""#);
        assert_eq!(literal("it's"), "'it''s'");
    }

    #[test]
    fn version_is_parsed() {
        assert_eq!(
            parse_version("postgres (PostgreSQL) 15.14 (Debian 15.14-0+deb12u1)\n").as_deref(),
            Some("15.14")
        );
    }
}
