//! Redis (tested with 7.0 from Debian 12): `redis-server` run by the supervisor with a rendered
//! config (port, data dir, `maxmemory` from the flavor) and an ACL file. The agent's own user
//! (`coffer_admin`) reaches it over a Unix socket; the `default` user is off. Tenant users are ACL
//! users that may run every command but the `@admin` and `@dangerous` ones (CONFIG, SHUTDOWN,
//! DEBUG, ACL, ... stay the operator's); root is an ACL user with every command.
//!
//! Passwords reach the server only as SHA-256 hashes (`#<hex>` in ACL rules). Redis has no
//! databases in Trove's sense: the database calls answer a clear "not applicable".
//!
//! Backups are RDB snapshots with the users' ACL rules beside them
//! ([`crate::backup::redis_rdb`]); a restore brings both back around a new admin secret.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use tokio::sync::Mutex;

use super::{
    Check, DatabaseSpec, Datastore, DatastoreError, Health, Layout, ServerCommand, Sizing, UserSpec,
};

/// The agent's own user.
pub const ADMIN_USER: &str = "coffer_admin";
/// The user `root enable` creates.
pub const ROOT_USER: &str = "root";
const RESERVED_USERS: &[&str] = &[ADMIN_USER, ROOT_USER, "default"];
/// What tenant users may run.
const TENANT_RULES: &str = "~* &* +@all -@admin -@dangerous";

/// Binaries (overridable for packaging or tests).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_server")]
    pub server_binary: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server_binary: default_server(),
        }
    }
}

fn default_server() -> PathBuf {
    PathBuf::from("/usr/bin/redis-server")
}

/// One instance's Redis.
pub struct Redis {
    config: Config,
    layout: Layout,
    conn: Mutex<Option<redis::aio::MultiplexedConnection>>,
    version: Mutex<Option<String>>,
}

fn no_databases() -> DatastoreError {
    DatastoreError::Invalid(
        "Redis has no databases to create, list or grant (use its numbered keyspaces through \
         the client)."
            .into(),
    )
}

/// The ACL form of a password: its SHA-256, so the config and ACL files hold no clear text.
fn hashed(password: &str) -> String {
    format!(
        "#{}",
        data_encoding::HEXLOWER.encode(&openssl::sha::sha256(password.as_bytes()))
    )
}

fn query_err(e: redis::RedisError) -> DatastoreError {
    DatastoreError::Query(e.to_string())
}

impl Redis {
    pub fn new(config: Config, layout: Layout) -> Self {
        Redis {
            config,
            layout,
            conn: Mutex::new(None),
            version: Mutex::new(None),
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.layout.root.join("data")
    }
    fn config_file(&self) -> PathBuf {
        self.layout.root.join("redis.conf")
    }
    fn acl_file(&self) -> PathBuf {
        self.layout.root.join("users.acl")
    }
    fn password_file(&self) -> PathBuf {
        self.layout.root.join("admin.password")
    }
    fn overrides_file(&self) -> PathBuf {
        self.layout.root.join("overrides.conf")
    }
    /// `replicaof`, `masteruser`/`masterauth` and the fence, read at every start.
    fn role_file(&self) -> PathBuf {
        self.layout.root.join("role.conf")
    }
    /// The replication user's name (hidden from tenants' user lists).
    fn repl_user_file(&self) -> PathBuf {
        self.layout.root.join("replication.user")
    }
    fn pid_file(&self) -> PathBuf {
        self.layout.root.join("redis.pid")
    }
    fn initialized_marker(&self) -> PathBuf {
        self.layout.root.join(".initialized")
    }
    /// Unix socket paths are limited to 107 bytes: a short per-instance path.
    fn socket(&self) -> PathBuf {
        let mut p = super::short_runtime_path(&self.layout.root, "coffer-redis");
        p.set_extension("sock");
        p
    }

    async fn conn(&self) -> Result<redis::aio::MultiplexedConnection, DatastoreError> {
        let mut guard = self.conn.lock().await;
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        let p = self.password_file();
        let password = tokio::fs::read_to_string(&p)
            .await
            .map_err(|e| DatastoreError::io(&p, e))?;
        let info = redis::ConnectionInfo {
            addr: redis::ConnectionAddr::Unix(self.socket()),
            redis: redis::RedisConnectionInfo {
                db: 0,
                username: Some(ADMIN_USER.into()),
                password: Some(password.trim().to_string()),
                ..Default::default()
            },
        };
        let client = redis::Client::open(info).map_err(query_err)?;
        let c = tokio::time::timeout(
            Duration::from_secs(3),
            client.get_multiplexed_async_connection(),
        )
        .await
        .map_err(|_| DatastoreError::Query("connecting to redis timed out".into()))?
        .map_err(query_err)?;
        *guard = Some(c.clone());
        Ok(c)
    }

    async fn cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> Result<T, DatastoreError> {
        let mut c = self.conn().await?;
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        let r = cmd.query_async(&mut c).await;
        if r.is_err() {
            // A broken connection is dropped; the next call reconnects.
            *self.conn.lock().await = None;
        }
        r.map_err(query_err)
    }

    async fn setuser(&self, name: &str, rules: &[&str]) -> Result<(), DatastoreError> {
        let mut args = vec!["ACL", "SETUSER", name];
        args.extend_from_slice(rules);
        self.cmd::<()>(&args).await?;
        self.cmd::<()>(&["ACL", "SAVE"]).await
    }

    /// Writes the role file: replicating from `src`, and/or fenced (every write refused).
    fn write_role(
        &self,
        src: Option<&super::ReplicationSource>,
        fenced: bool,
    ) -> Result<(), DatastoreError> {
        let mut text =
            String::from("# The replication role, written by coffer-agent (do not edit).\n");
        if let Some(s) = src {
            text.push_str(&format!(
                "replicaof {} {}\nmasteruser {}\nmasterauth {}\n",
                s.host, s.port, s.user, s.password
            ));
        }
        if fenced {
            text.push_str(&format!("min-replicas-to-write {FENCE_REPLICAS}\n"));
        }
        write_private(&self.role_file(), &text)
    }

    fn role_text(&self) -> String {
        std::fs::read_to_string(self.role_file()).unwrap_or_default()
    }

    /// Keys per logical database (`INFO keyspace`), for the non-empty ones.
    async fn keyspace(&self) -> Result<Vec<(String, u64)>, DatastoreError> {
        let info: String = self.cmd(&["INFO", "keyspace"]).await?;
        Ok(info
            .lines()
            .filter_map(|l| {
                let (db, rest) = l.trim().split_once(':')?;
                let keys = rest.split(',').find_map(|kv| kv.strip_prefix("keys="))?;
                Some((db.to_string(), keys.parse().ok()?))
            })
            .collect())
    }

    async fn info_replication(&self) -> Result<String, DatastoreError> {
        self.cmd(&["INFO", "replication"]).await
    }

    /// The replication user: may only replicate.
    async fn ensure_repl_user(&self, user: &str, password: &str) -> Result<(), DatastoreError> {
        self.validate_user(&UserSpec {
            name: user.into(),
            password: password.into(),
            ..Default::default()
        })?;
        if !password
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(DatastoreError::Invalid(
                "the replication password must be letters, digits, '-', '_' or '.'".into(),
            ));
        }
        write_private(&self.repl_user_file(), user)?;
        let h = hashed(password);
        self.setuser(
            user,
            &[
                "reset",
                "on",
                &h,
                "resetchannels",
                "-@all",
                "+psync",
                "+replconf",
                "+ping",
            ],
        )
        .await
    }

    async fn user_exists(&self, name: &str) -> Result<bool, DatastoreError> {
        let users: Vec<String> = self.cmd(&["ACL", "USERS"]).await?;
        Ok(users.iter().any(|u| u == name))
    }
}

/// `min-replicas-to-write` of a fenced source: more replicas than can exist, so every write is
/// refused (`NOREPLICAS`) until the fence is lifted.
const FENCE_REPLICAS: u32 = 1_000_000;

/// Parameters `CONFIG SET` cannot change (Redis 7's immutable ones among those tenants see).
const IMMUTABLE: &[&str] = &[
    "databases",
    "io-threads",
    "io-threads-do-reads",
    "daemonize",
];

/// `name value` lines of a Redis configuration file.
fn parse_conf(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.trim().split_once(' '))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

/// The built-in value of a tenant parameter, from the bundled rules.
fn builtin_default(name: &str) -> Option<String> {
    let text = crate::config_rules::bundled("redis", "7.0")?;
    let f: crate::config_rules::RulesFile = serde_json::from_str(text).ok()?;
    f.parameters
        .into_iter()
        .find(|p| p.name == name)
        .and_then(|p| p.default)
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

/// Extracts `7.0.15` from `Redis server v=7.0.15 sha=...`.
pub fn parse_version(text: &str) -> Option<String> {
    Some(
        text.split("v=")
            .nth(1)?
            .split_whitespace()
            .next()?
            .to_string(),
    )
}

#[async_trait]
impl Datastore for Redis {
    fn title(&self) -> &'static str {
        "Redis"
    }

    fn name(&self) -> &'static str {
        "redis"
    }

    async fn version(&self) -> Result<String, DatastoreError> {
        if let Some(v) = self.version.lock().await.clone() {
            return Ok(v);
        }
        let out = tokio::process::Command::new(&self.config.server_binary)
            .arg("--version")
            .output()
            .await
            .map_err(|e| DatastoreError::io(&self.config.server_binary, e))?;
        let v = parse_version(&String::from_utf8_lossy(&out.stdout)).ok_or_else(|| {
            DatastoreError::Tool {
                tool: "redis-server --version".into(),
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
        let maxmemory = (s.memory_mb.max(64) / 2).max(32);
        format!(
            "# Rendered by coffer-agent from the flavor ({mem} MB); do not edit.\n\
             bind {bind}\n\
             port {port}\n\
             protected-mode no\n\
             unixsocket {sock}\n\
             unixsocketperm 700\n\
             daemonize no\n\
             pidfile {pid}\n\
             logfile \"\"\n\
             dir {data}\n\
             dbfilename dump.rdb\n\
             save 900 1 300 10 60 10000\n\
             appendonly no\n\
             maxmemory {maxmemory}mb\n\
             maxmemory-policy noeviction\n\
             aclfile {acl}\n\
             # Nobody, root included, may move files (dir, dbfilename), load modules or debug:\n\
             # those reach the host as the server's OS user.\n\
             enable-protected-configs no\n\
             enable-module-command no\n\
             enable-debug-command no\n\
             # The replication role (written by coffer-agent).\n\
             include {role}\n\
             # Configuration group values (written by coffer-agent), last so they win.\n\
             include {overrides}\n",
            mem = s.memory_mb,
            bind = self.layout.bind_address,
            port = self.layout.port,
            sock = self.socket().display(),
            pid = self.pid_file().display(),
            data = self.data_dir().display(),
            acl = self.acl_file().display(),
            overrides = self.overrides_file().display(),
            role = self.role_file().display(),
        )
    }

    async fn initialize(&self, sizing: &Sizing) -> Result<(), DatastoreError> {
        let root = &self.layout.root;
        let data = self.data_dir();
        std::fs::create_dir_all(&data).map_err(|e| DatastoreError::io(&data, e))?;
        let password = generate_password();
        write_private(&self.password_file(), &password)?;
        write_private(
            &self.acl_file(),
            &format!(
                "user default off\nuser {ADMIN_USER} on {} ~* &* +@all\n",
                hashed(&password)
            ),
        )?;
        write_private(&self.config_file(), &self.render_config(sizing))?;
        if !self.overrides_file().exists() {
            self.write_overrides(&Default::default())?;
        }
        if !self.role_file().exists() {
            self.write_role(None, false)?;
        }
        let marker = self.initialized_marker();
        std::fs::write(&marker, b"").map_err(|e| DatastoreError::io(&marker, e))?;
        let _ = root;
        Ok(())
    }

    fn server_command(&self) -> ServerCommand {
        let cnf = self.config_file();
        ServerCommand {
            program: self.config.server_binary.clone(),
            args: vec![cnf.display().to_string()],
            output_file: self.layout.root.join("redis.log"),
            pid_file: self.pid_file(),
            cmdline_marker: format!(":{}", self.layout.port),
            run_as: None,
            stop_signal: nix::sys::signal::Signal::SIGTERM,
        }
    }

    async fn probe(&self) -> Health {
        let fut = async {
            let info: String = self.cmd(&["INFO", "clients", "persistence"]).await?;
            // Redis answers INFO while it loads its dataset, and refuses everything else.
            if info.lines().any(|l| l.trim() == "loading:1") {
                return Err(DatastoreError::Query(
                    "loading the dataset into memory".into(),
                ));
            }
            let n = info
                .lines()
                .find_map(|l| l.strip_prefix("connected_clients:"))
                .and_then(|v| v.trim().parse::<u32>().ok())
                .unwrap_or(0);
            Ok::<_, DatastoreError>(n.saturating_sub(1))
        };
        match tokio::time::timeout(Duration::from_secs(3), fut).await {
            Ok(Ok(connections)) => Health::Ready { connections },
            Ok(Err(e)) => {
                *self.conn.lock().await = None;
                Health::Down(e.to_string())
            }
            Err(_) => {
                *self.conn.lock().await = None;
                Health::Down("probe timed out".into())
            }
        }
    }

    async fn disconnect(&self) {
        *self.conn.lock().await = None;
    }

    async fn create_database(&self, _db: &DatabaseSpec) -> Result<(), DatastoreError> {
        Err(no_databases())
    }

    async fn create_user(&self, user: &UserSpec) -> Result<(), DatastoreError> {
        self.validate_user(user)?;
        if !user.databases.is_empty() {
            return Err(no_databases());
        }
        if self.user_exists(&user.name).await? {
            return Err(DatastoreError::Exists(format!(
                "User '{}' already exists.",
                user.name
            )));
        }
        let pw = hashed(&user.password);
        let mut rules = vec!["reset", "on", pw.as_str()];
        rules.extend(TENANT_RULES.split(' '));
        self.setuser(&user.name, &rules).await
    }

    async fn grant(&self, _u: &str, _h: &str, _d: &str) -> Result<(), DatastoreError> {
        Err(no_databases())
    }

    async fn revoke(&self, _u: &str, _h: &str, _d: &str) -> Result<(), DatastoreError> {
        Err(no_databases())
    }

    async fn inventory(&self) -> Result<Vec<String>, DatastoreError> {
        Ok(self
            .keyspace()
            .await?
            .into_iter()
            .map(|(db, _)| db)
            .collect())
    }

    /// Key counts per database, against the keys the server loaded from its dump at start
    /// (a dump that loaded fewer keys than it holds, or none at all, fails).
    async fn verify(&self) -> Result<Vec<Check>, DatastoreError> {
        let info: String = self.cmd(&["INFO", "persistence"]).await?;
        let field = |k: &str| {
            info.lines()
                .find_map(|l| l.trim().strip_prefix(k)?.strip_prefix(':'))
                .map(str::to_string)
        };
        let spaces = self.keyspace().await?;
        let held: u64 = spaces.iter().map(|(_, n)| n).sum();
        let mut checks: Vec<Check> = spaces
            .into_iter()
            .map(|(db, n)| Check {
                name: format!("keys {db}"),
                ok: true,
                detail: format!("{n} keys"),
            })
            .collect();
        let loaded = field("rdb_last_load_keys_loaded").and_then(|v| v.parse::<u64>().ok());
        let expired = field("rdb_last_load_keys_expired")
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        checks.push(match (field("loading").as_deref(), loaded) {
            (Some("0"), Some(loaded)) => Check {
                name: "dump loaded".into(),
                // Keys that expire after loading leave fewer than were loaded, never more.
                ok: held <= loaded,
                detail: format!(
                    "{loaded} keys loaded from the dump ({expired} already expired), {held} held now"
                ),
            },
            (loading, _) => Check {
                name: "dump loaded".into(),
                ok: false,
                detail: format!(
                    "the server does not report a finished load (loading: {})",
                    loading.unwrap_or("unknown")
                ),
            },
        });
        Ok(checks)
    }

    async fn list_databases(&self) -> Result<Vec<DatabaseSpec>, DatastoreError> {
        Err(no_databases())
    }

    async fn delete_database(&self, _name: &str) -> Result<(), DatastoreError> {
        Err(no_databases())
    }

    async fn list_users(&self) -> Result<Vec<UserSpec>, DatastoreError> {
        let users: Vec<String> = self.cmd(&["ACL", "USERS"]).await?;
        let repl = std::fs::read_to_string(self.repl_user_file()).unwrap_or_default();
        Ok(users
            .into_iter()
            .filter(|u| !RESERVED_USERS.contains(&u.as_str()) && *u != repl)
            .map(|name| UserSpec {
                name,
                password: String::new(),
                host: "%".into(),
                databases: vec![],
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
        if !self.user_exists(name).await? {
            return Err(DatastoreError::NotFound(format!(
                "User '{name}' cannot be found on the instance."
            )));
        }
        self.cmd::<i64>(&["ACL", "DELUSER", name]).await?;
        self.cmd::<()>(&["ACL", "SAVE"]).await
    }

    async fn update_user(
        &self,
        name: &str,
        _host: &str,
        new_name: Option<&str>,
        new_host: Option<&str>,
        new_password: Option<&str>,
    ) -> Result<(), DatastoreError> {
        if new_name.is_some_and(|n| n != name) {
            return Err(DatastoreError::Invalid(
                "Redis cannot rename a user; create a new one and delete this one".into(),
            ));
        }
        super::check_no_host(self.title(), new_host.unwrap_or(""))?;
        if !self.user_exists(name).await? {
            return Err(DatastoreError::NotFound(format!(
                "User '{name}' cannot be found on the instance."
            )));
        }
        if let Some(pw) = new_password {
            let h = hashed(pw);
            self.setuser(name, &["resetpass", h.as_str()]).await?;
        }
        Ok(())
    }

    async fn enable_root(&self, password: &str) -> Result<(), DatastoreError> {
        let h = hashed(password);
        self.setuser(ROOT_USER, &["reset", "on", h.as_str(), "~*", "&*", "+@all"])
            .await
    }

    async fn disable_root(&self) -> Result<(), DatastoreError> {
        if self.user_exists(ROOT_USER).await? {
            self.setuser(ROOT_USER, &["off"]).await?;
        }
        Ok(())
    }

    async fn backup_context(&self) -> Result<crate::backup::BackupCtx, DatastoreError> {
        let p = self.password_file();
        let password = tokio::fs::read_to_string(&p)
            .await
            .map_err(|e| DatastoreError::io(&p, e))?;
        Ok(crate::backup::BackupCtx {
            data_dir: self.data_dir(),
            socket: self.socket(),
            port: self.layout.port,
            tools_dir: None,
            admin_user: ADMIN_USER.into(),
            admin_password: password.trim().to_string(),
            tmp_dir: self.layout.root.join("tmp"),
        })
    }

    async fn initialize_restored(&self, sizing: &Sizing) -> Result<(), DatastoreError> {
        // This instance's own admin secret and configuration around the restored dump, and
        // the backed-up users (tenants, root) taken into its ACL file.
        self.initialize(sizing).await?;
        let restored = self
            .data_dir()
            .join(crate::backup::redis_rdb::RESTORED_USERS);
        let text = match std::fs::read_to_string(&restored) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(DatastoreError::io(&restored, e)),
        };
        let mut acl = std::fs::read_to_string(self.acl_file())
            .map_err(|e| DatastoreError::io(&self.acl_file(), e))?;
        for line in text.lines() {
            let mut words = line.split_whitespace();
            let (Some("user"), Some(name)) = (words.next(), words.next()) else {
                continue;
            };
            let reserved = [ADMIN_USER, "default"].contains(&name);
            let valid = name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
            if !reserved && valid && !line.contains(['\r', '\0']) {
                acl.push_str(line.trim());
                acl.push('\n');
            }
        }
        write_private(&self.acl_file(), &acl)?;
        let _ = std::fs::remove_file(&restored);
        Ok(())
    }

    fn data_path(&self) -> PathBuf {
        self.data_dir()
    }

    fn confd_dir(&self) -> PathBuf {
        self.layout.root.join("conf.d")
    }

    async fn create_replication_user(
        &self,
        user: &str,
        password: &str,
    ) -> Result<(), DatastoreError> {
        self.ensure_repl_user(user, password).await
    }

    async fn replication_position(&self) -> Result<String, DatastoreError> {
        let info = self.info_replication().await?;
        Ok(crate::backup::redis_rdb::info_field(&info, "master_repl_offset").unwrap_or_default())
    }

    async fn replication_info(&self) -> Result<super::ReplicationState, DatastoreError> {
        use crate::backup::redis_rdb::info_field;
        let info = self.info_replication().await?;
        let f = |k: &str| info_field(&info, k).unwrap_or_default();
        let replica = f("role") == "slave";
        let up = f("master_link_status") == "up";
        let fence: Vec<String> = self
            .cmd(&["CONFIG", "GET", "min-replicas-to-write"])
            .await?;
        let fenced = fence
            .get(1)
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
            >= FENCE_REPLICAS;
        let applied = if replica {
            f("slave_repl_offset")
        } else {
            String::new()
        };
        let received =
            info_field(&info, "slave_read_repl_offset").unwrap_or_else(|| applied.clone());
        Ok(super::ReplicationState {
            replica,
            gtid_binlog_pos: f("master_repl_offset"),
            gtid_slave_pos: applied,
            gtid_io_pos: if replica { received } else { String::new() },
            io_running: replica && up,
            sql_running: replica && up,
            seconds_behind: (replica && up).then_some(0),
            last_error: String::new(),
            last_sql_error: String::new(),
            read_only: replica || fenced,
            source_host: f("master_host"),
            source_port: f("master_port").parse().unwrap_or(0),
        })
    }

    async fn attach_replica(
        &self,
        src: &super::ReplicationSource,
    ) -> Result<super::Applied, DatastoreError> {
        super::check_host(&src.host)?;
        // The same replication user here: once promoted, this server serves the others.
        self.ensure_repl_user(&src.user, &src.password).await?;
        self.write_role(Some(src), false)?;
        self.cmd::<()>(&["CONFIG", "SET", "masteruser", &src.user])
            .await?;
        self.cmd::<()>(&["CONFIG", "SET", "masterauth", &src.password])
            .await?;
        self.cmd::<()>(&["CONFIG", "SET", "min-replicas-to-write", "0"])
            .await?;
        let port = src.port.to_string();
        self.cmd::<()>(&["REPLICAOF", &src.host, &port]).await?;
        Ok(super::Applied::Live)
    }

    async fn detach_replica(&self) -> Result<(), DatastoreError> {
        self.cmd::<()>(&["REPLICAOF", "NO", "ONE"]).await?;
        self.cmd::<()>(&["CONFIG", "SET", "min-replicas-to-write", "0"])
            .await?;
        self.write_role(None, false)
    }

    async fn wait_for_position(
        &self,
        gtid: &str,
        timeout: Duration,
    ) -> Result<bool, DatastoreError> {
        use crate::backup::redis_rdb::info_field;
        let target: u64 = gtid
            .trim()
            .parse()
            .map_err(|_| DatastoreError::Invalid(format!("bad replication offset '{gtid}'")))?;
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let info = self.info_replication().await?;
            let key = if info_field(&info, "role").as_deref() == Some("slave") {
                "slave_repl_offset"
            } else {
                "master_repl_offset"
            };
            let at: u64 = info_field(&info, key)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if at >= target {
                return Ok(true);
            }
            if std::time::Instant::now() > deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A replica applies the stream as it reads it: nothing is waiting to be applied.
    async fn drain_relay_log(&self, _timeout: Duration) -> Result<(), DatastoreError> {
        Ok(())
    }

    async fn kill_tenant_connections(&self) -> Result<u32, DatastoreError> {
        let mut n = 0;
        for u in self.list_users().await? {
            n += self
                .cmd::<u32>(&["CLIENT", "KILL", "USER", &u.name])
                .await
                .unwrap_or(0);
        }
        if self.user_exists(ROOT_USER).await? {
            n += self
                .cmd::<u32>(&["CLIENT", "KILL", "USER", ROOT_USER])
                .await
                .unwrap_or(0);
        }
        Ok(n)
    }

    /// The fence: writes paused at once (`CLIENT PAUSE ... WRITE`), then refused for good by a
    /// `min-replicas-to-write` no source can meet (kept in the role file for every start);
    /// the pause is lifted, so paused writers get the refusal instead of a hang.
    async fn set_read_only_persistent(
        &self,
        read_only: bool,
    ) -> Result<super::Applied, DatastoreError> {
        let replicaof = self
            .role_text()
            .lines()
            .any(|l| l.starts_with("replicaof "));
        if read_only {
            self.cmd::<()>(&["CLIENT", "PAUSE", "60000", "WRITE"])
                .await?;
            let fenced = async {
                let n = FENCE_REPLICAS.to_string();
                self.cmd::<()>(&["CONFIG", "SET", "min-replicas-to-write", &n])
                    .await?;
                if !replicaof {
                    self.write_role(None, true)?;
                }
                Ok::<(), DatastoreError>(())
            }
            .await;
            self.cmd::<()>(&["CLIENT", "UNPAUSE"]).await?;
            fenced?;
        } else {
            self.cmd::<()>(&["CONFIG", "SET", "min-replicas-to-write", "0"])
                .await?;
            if !replicaof {
                self.write_role(None, false)?;
            }
        }
        Ok(super::Applied::Live)
    }

    fn overrides(&self) -> Result<std::collections::BTreeMap<String, String>, DatastoreError> {
        super::read_settings(&self.overrides_file(), parse_conf)
    }

    fn write_overrides(
        &self,
        values: &std::collections::BTreeMap<String, String>,
    ) -> Result<(), DatastoreError> {
        let text = super::render_settings("Configuration group values", values, |k, v| {
            format!("{k} {v}")
        })?;
        write_private(&self.overrides_file(), &text)
    }

    async fn is_dynamic(&self, name: &str) -> Result<bool, DatastoreError> {
        Ok(!IMMUTABLE.contains(&name))
    }

    async fn set_global(&self, name: &str, value: Option<&str>) -> Result<(), DatastoreError> {
        if !crate::config_rules::safe_name(name) {
            return Err(DatastoreError::Invalid(format!(
                "bad parameter name '{name}'"
            )));
        }
        // None: the rendered configuration's value, else the server's built-in one.
        let fallback = || -> Result<Option<String>, DatastoreError> {
            if let Some((_, v)) = self
                .default_configuration()?
                .into_iter()
                .find(|(k, _)| k == name)
            {
                return Ok(Some(v));
            }
            Ok(builtin_default(name))
        };
        let v = match value {
            Some(v) => v.to_string(),
            None => fallback()?.ok_or_else(|| {
                DatastoreError::Invalid(format!(
                    "no default is known for '{name}'; restart the instance to reset it"
                ))
            })?,
        };
        let _: () = self.cmd(&["CONFIG", "SET", name, &v]).await?;
        Ok(())
    }

    fn default_configuration(&self) -> Result<Vec<(String, String)>, DatastoreError> {
        let text = std::fs::read_to_string(self.config_file())
            .map_err(|e| DatastoreError::io(&self.config_file(), e))?;
        Ok(parse_conf(&text)
            .into_iter()
            .filter(|(k, _)| k != "include")
            .collect())
    }

    fn validate_database_name(&self, _name: &str) -> Result<(), DatastoreError> {
        Err(no_databases())
    }

    fn validate_user(&self, user: &UserSpec) -> Result<(), DatastoreError> {
        let n = &user.name;
        if n.is_empty()
            || n.len() > 64
            || !n
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        {
            return Err(DatastoreError::Invalid(format!(
                "User name '{n}' must be 1-64 letters, digits, '_', '-' or '.'"
            )));
        }
        if RESERVED_USERS.contains(&n.to_ascii_lowercase().as_str()) {
            return Err(DatastoreError::Invalid(format!("User '{n}' is reserved.")));
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
    fn passwords_become_acl_hashes() {
        assert_eq!(
            hashed("pw"),
            "#30c952fab122c3f9759f02a6d95c3758b246b4fee239957b2d4fee46e26170c4"
        );
    }

    #[test]
    fn version_is_parsed() {
        assert_eq!(
            parse_version("Redis server v=7.0.15 sha=00000000:0 malloc=jemalloc-5.3.0").as_deref(),
            Some("7.0.15")
        );
    }
}
