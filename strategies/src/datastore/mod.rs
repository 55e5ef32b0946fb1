//! The [`Datastore`] trait and the registry of datastore implementations.

pub mod mariadb;
pub mod postgresql;
pub mod redis;

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;

/// Errors from datastore operations. Messages never contain secrets.
#[derive(Debug, thiserror::Error)]
pub enum DatastoreError {
    #[error("{tool} failed: {detail}")]
    Tool { tool: String, detail: String },
    #[error("i/o error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("database query failed: {0}")]
    Query(String),
    #[error("invalid input: {0}")]
    Invalid(String),
    #[error("database is not running")]
    NotRunning,
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Exists(String),
}

impl DatastoreError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        DatastoreError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The answer of an operation a datastore does not offer (yet).
pub fn unsupported(datastore: &str, what: &str) -> DatastoreError {
    DatastoreError::Invalid(format!(
        "{what} is not supported for {datastore} by this Coffer release yet"
    ))
}

/// For datastores whose users have no host part (PostgreSQL, Redis): '%' or nothing.
pub fn check_no_host(datastore: &str, host: &str) -> Result<(), DatastoreError> {
    if host.is_empty() || host == "%" {
        return Ok(());
    }
    Err(DatastoreError::Invalid(format!(
        "{datastore} users have no host part; leave host out or use '%'"
    )))
}

/// A replication source's host as a config file or statement may hold it: letters, digits,
/// `.`, `-` and `:` only.
pub fn check_host(host: &str) -> Result<(), DatastoreError> {
    if !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-:".contains(c))
    {
        return Ok(());
    }
    Err(DatastoreError::Invalid(format!("bad source host '{host}'")))
}

/// Reads a file of `name value` settings with the datastore's `parse` (missing = none).
pub fn read_settings(
    path: &Path,
    parse: fn(&str) -> Vec<(String, String)>,
) -> Result<std::collections::BTreeMap<String, String>, DatastoreError> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(parse(&t).into_iter().collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Default::default()),
        Err(e) => Err(DatastoreError::io(path, e)),
    }
}

/// Renders settings under a `header` comment, one `line(name, value)` each, after checking
/// that names and values hold only what [`crate::config_rules`] allows.
pub fn render_settings<'a>(
    header: &str,
    values: impl IntoIterator<Item = (&'a String, &'a String)>,
    line: fn(&str, &str) -> String,
) -> Result<String, DatastoreError> {
    let mut text = format!("# {header} (written by coffer-agent, do not edit).\n");
    for (k, v) in values {
        if !crate::config_rules::safe_name(k) || !crate::config_rules::safe_value(v) {
            return Err(DatastoreError::Invalid(format!(
                "setting '{k}' has characters that are not allowed"
            )));
        }
        text.push_str(&line(k, v));
        text.push('\n');
    }
    Ok(text)
}

/// A short per-instance path under the temp dir (Unix socket paths are limited to 107 bytes).
pub fn short_runtime_path(root: &Path, prefix: &str) -> PathBuf {
    let digest = root
        .to_string_lossy()
        .bytes()
        .fold(0xcbf29ce484222325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100000001b3)
        });
    std::env::temp_dir().join(format!("{prefix}-{digest:016x}"))
}

/// Where one instance's database lives on disk and on the network.
#[derive(Debug, Clone)]
pub struct Layout {
    /// Directory the datastore owns (data dir, config, socket, logs, secrets live below it).
    pub root: PathBuf,
    /// Address clients connect to.
    pub bind_address: String,
    /// Port clients connect to.
    pub port: u16,
}

/// Resources the configuration is sized from (the flavor and volume).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizing {
    pub memory_mb: u64,
    pub vcpus: u32,
    pub volume_gb: u64,
    pub server_id: u32,
}

/// A database to create.
#[derive(Debug, Clone, Default)]
pub struct DatabaseSpec {
    pub name: String,
    pub character_set: Option<String>,
    pub collate: Option<String>,
}

/// A user to create. `Debug` hides the password.
#[derive(Clone, Default)]
pub struct UserSpec {
    pub name: String,
    pub password: String,
    pub host: String,
    pub databases: Vec<String>,
}

impl std::fmt::Debug for UserSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserSpec")
            .field("name", &self.name)
            .field("password", &"***")
            .field("host", &self.host)
            .field("databases", &self.databases)
            .finish()
    }
}

/// How to run the database server.
#[derive(Debug, Clone)]
pub struct ServerCommand {
    pub program: PathBuf,
    pub args: Vec<String>,
    /// Where the server's stdout and stderr go.
    pub output_file: PathBuf,
    /// The pid file the server writes.
    pub pid_file: PathBuf,
    /// A string that must appear in `/proc/<pid>/cmdline` of a server we adopt.
    pub cmdline_marker: String,
    /// Run the server as this uid/gid (servers that refuse root, when the agent is root).
    pub run_as: Option<(u32, u32)>,
    /// The signal that makes the server stop cleanly without waiting for its clients to leave
    /// (SIGTERM for most; PostgreSQL's "fast" shutdown is SIGINT).
    pub stop_signal: nix::sys::signal::Signal,
}

/// How a change reached the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// In effect now.
    Live,
    /// Written for the next start: the agent restarts the server to finish it.
    Restart,
}

/// Result of a health probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Accepting queries.
    Ready { connections: u32 },
    /// Not answering.
    Down(String),
}

/// One check of the data, as [`Datastore::verify`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// What was checked, e.g. "check table `shop`.`orders`".
    pub name: String,
    pub ok: bool,
    /// What it found: a checksum, a count, or the server's message when it failed.
    pub detail: String,
}

/// One datastore implementation. The agent calls only this trait.
#[async_trait]
pub trait Datastore: Send + Sync {
    /// Short name, e.g. `mariadb`.
    fn name(&self) -> &'static str;
    /// The name people write, e.g. `PostgreSQL` (in messages).
    fn title(&self) -> &'static str {
        self.name()
    }
    /// Installed server version, e.g. `10.11.19`.
    async fn version(&self) -> Result<String, DatastoreError>;
    /// Whether the data directory has been initialised.
    fn is_initialized(&self) -> bool;
    /// Renders the server configuration for `sizing` (pure; also used by the benchmark floor).
    fn render_config(&self, sizing: &Sizing) -> String;
    /// Writes the configuration, creates the data directory and the agent's admin credentials.
    /// After this, the first [`Datastore::server_command`] start bootstraps security.
    async fn initialize(&self, sizing: &Sizing) -> Result<(), DatastoreError>;
    /// The command line that runs the server.
    fn server_command(&self) -> ServerCommand;
    /// Removes first-start-only material (init files) once the server proved ready.
    async fn finish_first_start(&self) -> Result<(), DatastoreError> {
        Ok(())
    }
    /// Asks the server whether it serves queries.
    async fn probe(&self) -> Health;
    /// Drops pooled connections (before a stop or after a crash).
    async fn disconnect(&self);
    /// Creates a database (no error if it exists with the same name).
    async fn create_database(&self, db: &DatabaseSpec) -> Result<(), DatastoreError>;
    /// Creates a user.
    async fn create_user(&self, user: &UserSpec) -> Result<(), DatastoreError>;
    /// Grants a user all privileges on a database.
    async fn grant(&self, user: &str, host: &str, database: &str) -> Result<(), DatastoreError>;
    /// Revokes a user's privileges on a database (NotFound if it had none).
    async fn revoke(&self, user: &str, host: &str, database: &str) -> Result<(), DatastoreError>;
    /// Tenant databases (system schemas hidden), sorted by name.
    async fn list_databases(&self) -> Result<Vec<DatabaseSpec>, DatastoreError>;
    /// Drops a tenant database (NotFound if absent).
    async fn delete_database(&self, name: &str) -> Result<(), DatastoreError>;
    /// Tenant users with the databases they may use, sorted by name and host.
    async fn list_users(&self) -> Result<Vec<UserSpec>, DatastoreError>;
    /// Drops a tenant user (NotFound if absent).
    async fn delete_user(&self, name: &str, host: &str) -> Result<(), DatastoreError>;
    /// Renames a user, moves it to another host and/or sets its password (None keeps a value).
    async fn update_user(
        &self,
        name: &str,
        host: &str,
        new_name: Option<&str>,
        new_host: Option<&str>,
        new_password: Option<&str>,
    ) -> Result<(), DatastoreError>;
    /// Enables the remote superuser with `password` (creating or resetting it).
    async fn enable_root(&self, password: &str) -> Result<(), DatastoreError>;
    /// Removes the remote superuser.
    async fn disable_root(&self) -> Result<(), DatastoreError>;
    /// Makes the server read-only (or writable).
    async fn set_read_only(&self, _read_only: bool) -> Result<(), DatastoreError> {
        Err(unsupported(self.title(), "replication"))
    }
    /// The server's replication position (e.g. a GTID set).
    async fn replication_position(&self) -> Result<String, DatastoreError> {
        Err(unsupported(self.title(), "replication"))
    }
    /// What a backup strategy needs to reach the running server.
    async fn backup_context(&self) -> Result<crate::backup::BackupCtx, DatastoreError> {
        Err(unsupported(self.title(), "backup"))
    }
    /// The (empty, for a restore) data directory.
    fn data_path(&self) -> PathBuf;
    /// Like [`Datastore::initialize`], for a data directory a restore has already filled: writes
    /// the configuration and this instance's own admin credentials (reset on first start).
    async fn initialize_restored(&self, _sizing: &Sizing) -> Result<(), DatastoreError> {
        Err(unsupported(self.title(), "restore"))
    }
    /// SQL run at the end of a logical load: a dump carries the source's accounts, and this puts
    /// this instance's own admin credentials back.
    async fn restore_epilogue(&self) -> Result<String, DatastoreError> {
        Err(unsupported(self.title(), "restore"))
    }
    /// Creates or resets the replication user (REPLICATION SLAVE only). Binlogged, so every
    /// replica has the same user and a promoted replica can serve the others.
    async fn create_replication_user(
        &self,
        _user: &str,
        _password: &str,
    ) -> Result<(), DatastoreError> {
        Err(unsupported(self.title(), "replication"))
    }
    /// The server's replication state.
    async fn replication_info(&self) -> Result<ReplicationState, DatastoreError> {
        Err(unsupported(self.title(), "replication"))
    }
    /// Points the server at a source and starts replicating; the server becomes read-only
    /// (persistently).
    async fn attach_replica(&self, _src: &ReplicationSource) -> Result<Applied, DatastoreError> {
        Err(unsupported(self.title(), "replication"))
    }
    /// A replica restored from its source's snapshot, before its first start: writes what makes
    /// that start a replica already. `true` when done so (nothing to attach after the start);
    /// `false` (the default) attaches once the server runs.
    async fn prepare_replica(&self, _src: &ReplicationSource) -> Result<bool, DatastoreError> {
        Ok(false)
    }
    /// Stops replicating and forgets the source; the server becomes writable.
    async fn detach_replica(&self) -> Result<(), DatastoreError> {
        Err(unsupported(self.title(), "replication"))
    }
    /// Waits until position `gtid` (the datastore's own encoding, see
    /// [`coffer_proto::Datastore::position_covers`]) is applied; `false` on timeout.
    async fn wait_for_position(
        &self,
        _gtid: &str,
        _timeout: Duration,
    ) -> Result<bool, DatastoreError> {
        Err(unsupported(self.title(), "replication"))
    }
    /// Failover: stops receiving and applies everything already received.
    async fn drain_relay_log(&self, _timeout: Duration) -> Result<(), DatastoreError> {
        Err(unsupported(self.title(), "replication"))
    }
    /// Ends every tenant session (not the agent's own, not replication threads).
    async fn kill_tenant_connections(&self) -> Result<u32, DatastoreError> {
        Err(unsupported(self.title(), "replication"))
    }
    /// Makes the server refuse (or take) tenant writes, now or once restarted, and for every
    /// later start: the fence of a source that lost its lease, the first step of a switchover.
    async fn set_read_only_persistent(&self, _read_only: bool) -> Result<Applied, DatastoreError> {
        Err(unsupported(self.title(), "replication"))
    }
    /// The directory of configuration drop-ins (config modules) the server reads.
    fn confd_dir(&self) -> PathBuf;
    /// The change log the agent archives continuously while this server is a source (None:
    /// the datastore offers no point-in-time recovery).
    fn change_log(&self) -> Option<Box<dyn crate::archive::ChangeLog>> {
        None
    }
    /// How archived change files are replayed on a restored server (None as above).
    fn replay(&self) -> Option<Box<dyn crate::archive::Replay>> {
        None
    }
    /// Closes the change file being written and starts a new one (so the archive can store
    /// the closed one whole).
    async fn rotate_change_log(&self) -> Result<(), DatastoreError> {
        Ok(())
    }
    /// The datastore's logs (the agent adds its own).
    ///
    /// By default the server's own output (its [`ServerCommand::output_file`]) is a system log
    /// named after the datastore: published and tailed by admins.
    fn log_definitions(&self) -> Vec<crate::logs::LogDef> {
        vec![crate::logs::LogDef {
            name: self.name().into(),
            kind: crate::logs::LogKind::Sys,
            file: self.server_command().output_file,
            enable: vec![],
            disable: vec![],
            records: None,
        }]
    }
    /// Writes the log settings the server reads at every start (the enabled logs' variables).
    fn write_log_settings(&self, vars: &[(String, String)]) -> Result<(), DatastoreError> {
        if vars.is_empty() {
            return Ok(());
        }
        Err(unsupported(self.title(), "guest logs"))
    }
    /// Switches a guest log live once [`Datastore::write_log_settings`] wrote the settings for
    /// later starts: `vars` are its enable (or disable) variables. By default each is set as a
    /// global variable.
    async fn switch_log_live(&self, vars: &[(String, String)]) -> Result<(), DatastoreError> {
        for (k, v) in vars {
            self.set_global(k, Some(v)).await?;
        }
        Ok(())
    }
    /// The configuration overrides the server reads at its next start (name → value).
    fn overrides(&self) -> Result<std::collections::BTreeMap<String, String>, DatastoreError> {
        Ok(Default::default())
    }
    /// Replaces the overrides file (atomically); names and values are checked again here.
    fn write_overrides(
        &self,
        values: &std::collections::BTreeMap<String, String>,
    ) -> Result<(), DatastoreError> {
        // No group: nothing to write.
        if values.is_empty() {
            return Ok(());
        }
        Err(unsupported(self.title(), "configuration groups"))
    }
    /// Whether the running server can change `name` without a restart.
    async fn is_dynamic(&self, _name: &str) -> Result<bool, DatastoreError> {
        Err(unsupported(self.title(), "configuration groups"))
    }
    /// Sets a global variable on the running server; `None` puts back the instance's default
    /// (the rendered configuration's value, else the server's own default).
    async fn set_global(&self, _name: &str, _value: Option<&str>) -> Result<(), DatastoreError> {
        Err(unsupported(self.title(), "configuration groups"))
    }
    /// Keeps the change files the archive has not stored yet from being removed by the server,
    /// letting go of everything up to `stored` (file, offset); `None` keeps nothing any more
    /// (the archive stopped: the instance became a replica). Datastores whose change files
    /// outlive the archive's pace anyway do nothing.
    async fn hold_change_log(&self, stored: Option<(&str, u64)>) -> Result<(), DatastoreError> {
        let _ = stored;
        Ok(())
    }
    /// The tables (or the datastore's equivalent) the server holds, named so that a restore
    /// of a backup taken now must hold every one; empty when the datastore has no such notion.
    async fn inventory(&self) -> Result<Vec<String>, DatastoreError> {
        Ok(vec![])
    }
    /// Runs the datastore's own checks over all its data (a restore drill's throwaway
    /// instance): one [`Check`] per table, index or keyspace. It may change the server (e.g.
    /// install a checking extension).
    async fn verify(&self) -> Result<Vec<Check>, DatastoreError> {
        Err(unsupported(self.title(), "restore drills"))
    }
    /// The server section of the rendered default configuration (groups do not change it).
    fn default_configuration(&self) -> Result<Vec<(String, String)>, DatastoreError>;
    /// Validates a database name before anything is created.
    fn validate_database_name(&self, name: &str) -> Result<(), DatastoreError>;
    /// Validates a user name and host before anything is created.
    fn validate_user(&self, user: &UserSpec) -> Result<(), DatastoreError>;
}

/// Where a replica replicates from.
#[derive(Clone)]
pub struct ReplicationSource {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    /// GTID (`MASTER_USE_GTID=slave_pos`) rather than file and position.
    pub use_gtid: bool,
    /// Start here: `gtid_slave_pos` (GTID) ...
    pub gtid: Option<String>,
    /// ... or these coordinates (binlog).
    pub binlog_file: Option<String>,
    pub binlog_pos: u64,
    /// Set `gtid_slave_pos` to the server's own binlog position first (an old source joining).
    pub from_own_binlog: bool,
    /// A new replica: restart its binlog at this GTID state (where its data is).
    pub binlog_state: Option<String>,
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

impl ReplicationSource {
    /// What the datastore takes from the controller's `ReplicaOf` (its password opened).
    pub fn from_spec(r: &coffer_proto::v1::ReplicaOf, password: String) -> Result<Self, String> {
        Ok(ReplicationSource {
            host: r.host.clone(),
            port: r.port as u16,
            user: r.user.clone(),
            password,
            use_gtid: strategy_uses_gtid(&r.strategy)?,
            gtid: non_empty(&r.start_position),
            binlog_file: non_empty(&r.start_file),
            binlog_pos: r.start_offset,
            from_own_binlog: r.from_own_position,
            binlog_state: None,
        })
    }

    /// A new replica starts where the snapshot it restored was taken (`at`, from the
    /// backup's manifest), unless the controller named a start.
    pub fn start_at_snapshot(
        &mut self,
        strategy: &str,
        at: &crate::backup::EnginePosition,
    ) -> Result<(), String> {
        self.binlog_state = non_empty(&at.gtid);
        if self.use_gtid {
            self.gtid = self.gtid.take().or_else(|| non_empty(&at.gtid));
        } else if self.binlog_file.is_none() && strategy_starts_at_binlog_position(strategy) {
            if at.binlog_file.is_empty() {
                return Err("the snapshot recorded no binlog position to replicate from".into());
            }
            self.binlog_file = Some(at.binlog_file.clone());
            self.binlog_pos = at.binlog_pos;
        }
        Ok(())
    }
}

impl std::fmt::Debug for ReplicationSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationSource")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &"***")
            .finish()
    }
}

impl ReplicationState {
    /// The state as the agent reports it, with the role it holds.
    pub fn to_info(&self, role: &str) -> coffer_proto::v1::ReplicationInfo {
        coffer_proto::v1::ReplicationInfo {
            role: role.into(),
            position: self.gtid_binlog_pos.clone(),
            applied_position: self.gtid_slave_pos.clone(),
            received_position: self.gtid_io_pos.clone(),
            io_running: self.io_running,
            sql_running: self.sql_running,
            seconds_behind: self.seconds_behind.unwrap_or(-1),
            last_error: self.last_error.clone(),
            read_only: self.read_only,
            source_host: self.source_host.clone(),
            source_port: self.source_port as u32,
        }
    }
}

/// The server's replication state.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReplicationState {
    /// Replication is configured (a replica).
    pub replica: bool,
    pub gtid_binlog_pos: String,
    pub gtid_slave_pos: String,
    pub gtid_io_pos: String,
    pub io_running: bool,
    pub sql_running: bool,
    pub seconds_behind: Option<i64>,
    pub last_error: String,
    /// The SQL (applier) thread's own error.
    pub last_sql_error: String,
    pub read_only: bool,
    pub source_host: String,
    pub source_port: u16,
}

pub use coffer_proto::datastore::{gtid_behind, parse_gtids};

/// Whether GTID position `a` has everything `b` has (per domain).
pub fn gtid_covers(a: &str, b: &str) -> bool {
    gtid_behind(a, b) == 0
}

/// Whether a replication strategy positions by GTID (`Ok(true)`), by the datastore's own
/// coordinates (`Ok(false)`), or is unknown.
pub fn strategy_uses_gtid(strategy: &str) -> Result<bool, String> {
    match strategy {
        "" | "mariadb-gtid" => Ok(true),
        "binlog" | "postgresql-streaming" | "redis-replicaof" => Ok(false),
        other => Err(format!("unknown replication strategy '{other}'")),
    }
}

/// Whether a new replica of this strategy starts from the snapshot's binlog file and position.
pub fn strategy_starts_at_binlog_position(strategy: &str) -> bool {
    strategy == "binlog"
}

/// The registry of datastores, selected by name in configuration.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum DatastoreKind {
    Mariadb(mariadb::Config),
    Postgresql(postgresql::Config),
    Redis(redis::Config),
}

impl DatastoreKind {
    /// Builds the implementation for one instance's layout.
    pub fn build(&self, layout: Layout) -> Box<dyn Datastore> {
        match self {
            DatastoreKind::Mariadb(c) => Box::new(mariadb::Mariadb::new(c.clone(), layout)),
            DatastoreKind::Postgresql(c) => {
                Box::new(postgresql::Postgresql::new(c.clone(), layout))
            }
            DatastoreKind::Redis(c) => Box::new(redis::Redis::new(c.clone(), layout)),
        }
    }

    /// Which datastore this is.
    pub fn datastore(&self) -> coffer_proto::Datastore {
        use coffer_proto::Datastore as D;
        match self {
            DatastoreKind::Mariadb(_) => D::Mariadb,
            DatastoreKind::Postgresql(_) => D::Postgresql,
            DatastoreKind::Redis(_) => D::Redis,
        }
    }

    /// Short name of the datastore.
    pub fn name(&self) -> &'static str {
        self.datastore().id()
    }
}
