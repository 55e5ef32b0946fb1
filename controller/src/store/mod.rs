//! The controller's state store: SQLite in WAL mode through sqlx, with migrations embedded in the
//! binary (no database needed at compile time). Check-and-write sequences use `BEGIN IMMEDIATE` so
//! two requests cannot both pass a check.

use std::borrow::Cow;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Row, Sqlite, Transaction};

mod workflows;
pub use workflows::{Owned, WorkflowRow};

/// Trove's quota resources and default limits (-1 = unlimited).
pub const QUOTA_DEFAULTS: &[(&str, i64)] = &[
    ("instances", 10),
    ("ram", -1),
    ("volumes", 40),
    ("backups", 50),
];

/// The store's migrations (`migrations/sqlite/`), embedded at build time; a new one is added as
/// the next numbered file, never edited.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite");

#[derive(Clone)]
pub struct Store {
    pub pool: SqlitePool,
}

/// A datastore version with its datastore.
#[derive(Debug, Clone)]
pub struct VersionRow {
    pub id: String,
    pub datastore_id: String,
    pub datastore_name: String,
    pub name: String,
    pub version: String,
    pub manager: String,
    pub active: bool,
    /// Enable root at create and return its password.
    pub root_on_create: bool,
}

impl VersionRow {
    /// The datastore the version's `manager` names.
    pub fn datastore(
        &self,
    ) -> Result<coffer_proto::Datastore, coffer_proto::datastore::UnknownDatastore> {
        self.manager.parse()
    }
}

#[derive(Debug, Clone)]
pub struct DatastoreRow {
    pub id: String,
    pub name: String,
    pub default_version_id: Option<String>,
}

#[derive(Debug, Clone)]
pub struct FlavorRow {
    pub id: String,
    pub name: String,
    pub ram: i64,
    pub vcpus: i64,
    pub disk: i64,
}

#[derive(Debug, Clone)]
pub struct InstanceRow {
    pub id: String,
    pub project_id: String,
    pub name: String,
    pub flavor_id: String,
    pub datastore_version_id: String,
    pub volume_size: i64,
    pub task: String,
    pub task_started: String,
    pub service_status: String,
    pub fault: Option<String>,
    pub fault_at: Option<String>,
    pub server_id: i64,
    pub host: Option<String>,
    pub port: Option<i64>,
    pub created: String,
    pub updated: String,
    pub deleted: bool,
    pub agent_version: String,
    pub capabilities: String,
    /// Hex X25519 public key of the instance's agent.
    pub agent_public_key: String,
    /// Public key of the agent's NATS user (empty without per-agent identities).
    pub agent_nats_user: String,
    /// The attached configuration group.
    pub configuration_id: Option<String>,
    /// The source this instance replicates from.
    pub replica_of: Option<String>,
    /// On a source: its replication user, and that user's password sealed to the controller.
    pub repl_user: Option<String>,
    pub repl_secret: Option<String>,
    pub repl_strategy: Option<String>,
    /// An old source taken out by an eject: stays fenced.
    pub ejected: bool,
    /// `provisioner` (placed by the configured provisioner) or `enrolled` (joined by itself).
    pub placement: String,
}

impl InstanceRow {
    /// Whether its agent exists: a create holds its row keyless while it places the agent,
    /// and a VM's agent sends its key when it enrols.
    pub fn has_agent(&self) -> bool {
        !self.agent_public_key.is_empty()
    }
}

/// A module.
#[derive(Debug, Clone)]
pub struct ModuleRow {
    pub id: String,
    /// None: all tenants.
    pub project_id: Option<String>,
    pub name: String,
    pub kind: String,
    pub description: Option<String>,
    /// Hex, sealed to the controller's key (`kept_module_context`).
    pub contents_sealed: String,
    pub md5: String,
    pub datastore: Option<String>,
    pub datastore_version: Option<String>,
    pub auto_apply: bool,
    pub visible: bool,
    pub live_update: bool,
    pub priority_apply: bool,
    pub apply_order: i64,
    pub is_admin: bool,
    pub created: String,
    pub updated: String,
}

fn module_from(r: &sqlx::sqlite::SqliteRow) -> ModuleRow {
    let b = |c: &str| r.get::<i64, _>(c) != 0;
    ModuleRow {
        id: r.get("id"),
        project_id: r.get("project_id"),
        name: r.get("name"),
        kind: r.get("type"),
        description: r.get("description"),
        contents_sealed: r.get("contents_sealed"),
        md5: r.get("md5"),
        datastore: r.get("datastore"),
        datastore_version: r.get("datastore_version"),
        auto_apply: b("auto_apply"),
        visible: b("visible"),
        live_update: b("live_update"),
        priority_apply: b("priority_apply"),
        apply_order: r.get("apply_order"),
        is_admin: b("is_admin"),
        created: r.get("created"),
        updated: r.get("updated"),
    }
}

/// A configuration group.
#[derive(Debug, Clone)]
pub struct ConfigurationRow {
    pub id: String,
    pub project_id: String,
    pub name: String,
    pub description: Option<String>,
    pub datastore_version_id: String,
    /// Parameter name -> the tenant's JSON value.
    pub values: serde_json::Map<String, serde_json::Value>,
    pub created: String,
    pub updated: String,
}

/// A backup's record.
#[derive(Debug, Clone)]
pub struct BackupRow {
    pub id: String,
    pub project_id: String,
    pub instance_id: String,
    pub name: String,
    pub description: Option<String>,
    pub status: String,
    pub parent_id: Option<String>,
    pub datastore_version_id: String,
    pub size_bytes: Option<i64>,
    pub checksum: Option<String>,
    pub location: Option<String>,
    pub progress: String,
    pub fault: Option<String>,
    pub intent_id: Option<String>,
    /// The key the backup is sealed with (`<operator key id>:<instance>`), as issued; None when
    /// unencrypted or taken before keys were per instance.
    pub key_id: Option<String>,
    pub created: String,
    pub updated: String,
}

fn backup_from(r: &sqlx::sqlite::SqliteRow) -> BackupRow {
    BackupRow {
        id: r.get("id"),
        project_id: r.get("project_id"),
        instance_id: r.get("instance_id"),
        name: r.get("name"),
        description: r.get("description"),
        status: r.get("status"),
        parent_id: r.get("parent_id"),
        datastore_version_id: r.get("datastore_version_id"),
        size_bytes: r.get("size_bytes"),
        checksum: r.get("checksum"),
        location: r.get("location"),
        progress: r.get("progress"),
        fault: r.get("fault"),
        intent_id: r.get("intent_id"),
        key_id: r.get("key_id"),
        created: r.get("created"),
        updated: r.get("updated"),
    }
}

/// An intent waiting to be published.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    pub seq: i64,
    pub intent_id: String,
    pub instance_id: String,
    pub payload: Vec<u8>,
}

fn migrator(upto: usize) -> Migrator {
    Migrator {
        migrations: Cow::Owned(MIGRATOR.migrations[..upto].to_vec()),
        ..Migrator::DEFAULT
    }
}

/// Current UTC time in Trove's format (`2019-12-23T20:58:35`).
/// The largest intent the controller queues: well inside NATS's default `max_payload` (1 MiB),
/// with room for headers.
pub const MAX_INTENT_BYTES: usize = 512 * 1024;

/// An intent too large to send: the request that made it is refused (413) with nothing stored.
#[derive(Debug, thiserror::Error)]
#[error("the {kind} intent this request makes would be {bytes} bytes, more than the {MAX_INTENT_BYTES} bytes an intent may carry; send less in one request")]
pub struct IntentTooLarge {
    pub kind: String,
    pub bytes: usize,
}

pub fn now() -> String {
    let f = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]");
    time::OffsetDateTime::now_utc()
        .format(&f)
        .unwrap_or_default()
}

/// Seconds since a timestamp written by [`now`] (0 if unparsable).
pub fn age_secs(ts: &str) -> i64 {
    let f = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]");
    match time::PrimitiveDateTime::parse(ts, &f) {
        Ok(t) => (time::OffsetDateTime::now_utc() - t.assume_utc()).whole_seconds(),
        Err(_) => 0,
    }
}

fn instance_from(r: &sqlx::sqlite::SqliteRow) -> InstanceRow {
    InstanceRow {
        id: r.get("id"),
        project_id: r.get("project_id"),
        name: r.get("name"),
        flavor_id: r.get("flavor_id"),
        datastore_version_id: r.get("datastore_version_id"),
        volume_size: r.get("volume_size"),
        task: r.get("task"),
        task_started: r.get("task_started"),
        service_status: r.get("service_status"),
        fault: r.get("fault"),
        fault_at: r.get("fault_at"),
        server_id: r.get("server_id"),
        host: r.get("host"),
        port: r.get("port"),
        created: r.get("created"),
        updated: r.get("updated"),
        deleted: r.get::<i64, _>("deleted") != 0,
        agent_version: r.get("agent_version"),
        capabilities: r.get("capabilities"),
        agent_public_key: r.get("agent_public_key"),
        agent_nats_user: r.get("agent_nats_user"),
        configuration_id: r.get("configuration_id"),
        replica_of: r.get("replica_of"),
        repl_user: r.get("repl_user"),
        repl_secret: r.get("repl_secret"),
        repl_strategy: r.get("repl_strategy"),
        ejected: r.get::<i64, _>("ejected") != 0,
        placement: r.get("placement"),
    }
}

fn configuration_from(r: &sqlx::sqlite::SqliteRow) -> ConfigurationRow {
    ConfigurationRow {
        id: r.get("id"),
        project_id: r.get("project_id"),
        name: r.get("name"),
        description: r.get("description"),
        datastore_version_id: r.get("datastore_version_id"),
        values: serde_json::from_str(r.get::<&str, _>("config_values")).unwrap_or_default(),
        created: r.get("created"),
        updated: r.get("updated"),
    }
}

fn version_from(r: &sqlx::sqlite::SqliteRow) -> VersionRow {
    VersionRow {
        id: r.get("id"),
        datastore_id: r.get("datastore_id"),
        datastore_name: r.get("datastore_name"),
        name: r.get("name"),
        version: r.get("version"),
        manager: r.get("manager"),
        active: r.get::<i64, _>("active") != 0,
        root_on_create: r.get::<i64, _>("root_on_create") != 0,
    }
}

const VERSION_SELECT: &str = "SELECT v.id, v.datastore_id, d.name AS datastore_name, v.name, v.version, v.manager, v.active, v.root_on_create \
     FROM datastore_versions v JOIN datastores d ON d.id = v.datastore_id";

impl Store {
    /// Opens (creating if needed) the store at `path` and applies all migrations.
    pub async fn open(path: &Path) -> anyhow::Result<Store> {
        let s = Self::open_unmigrated(path).await?;
        s.migrate(MIGRATOR.migrations.len()).await?;
        Ok(s)
    }

    /// Opens without migrating (tests of the migration path).
    pub async fn open_unmigrated(path: &Path) -> anyhow::Result<Store> {
        let opts = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(16)
            .connect_with(opts)
            .await
            .with_context(|| format!("opening store {}", path.display()))?;
        Ok(Store { pool })
    }

    /// Applies the first `upto` migrations.
    pub async fn migrate(&self, upto: usize) -> anyhow::Result<()> {
        migrator(upto)
            .run(&self.pool)
            .await
            .context("migrating the store")
    }

    /// Starts a write transaction that takes the write lock at once.
    pub async fn begin(&self) -> anyhow::Result<Transaction<'static, Sqlite>> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }

    /// A read-only transaction: one consistent snapshot, no write lock taken.
    pub async fn begin_read(&self) -> anyhow::Result<Transaction<'static, Sqlite>> {
        Ok(self.pool.begin().await?)
    }

    // ---- datastores, versions, flavors -------------------------------------------------------

    pub async fn datastores(&self) -> anyhow::Result<Vec<DatastoreRow>> {
        let rows = sqlx::query("SELECT id, name, default_version_id FROM datastores ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .map(|r| DatastoreRow {
                id: r.get("id"),
                name: r.get("name"),
                default_version_id: r.get("default_version_id"),
            })
            .collect())
    }

    /// Finds a datastore by id or name.
    pub async fn datastore(&self, id_or_name: &str) -> anyhow::Result<Option<DatastoreRow>> {
        Ok(self
            .datastores()
            .await?
            .into_iter()
            .find(|d| d.id == id_or_name || d.name == id_or_name))
    }

    pub async fn versions_of(&self, datastore_id: &str) -> anyhow::Result<Vec<VersionRow>> {
        let rows = sqlx::query(&format!(
            "{VERSION_SELECT} WHERE v.datastore_id = ? ORDER BY v.name"
        ))
        .bind(datastore_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(version_from).collect())
    }

    pub async fn version(&self, id: &str) -> anyhow::Result<Option<VersionRow>> {
        let row = sqlx::query(&format!("{VERSION_SELECT} WHERE v.id = ?"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(version_from))
    }

    pub async fn flavors(&self) -> anyhow::Result<Vec<FlavorRow>> {
        let rows = sqlx::query("SELECT id, name, ram, vcpus, disk FROM flavors")
            .fetch_all(&self.pool)
            .await?;
        let mut v: Vec<FlavorRow> = rows
            .iter()
            .map(|r| FlavorRow {
                id: r.get("id"),
                name: r.get("name"),
                ram: r.get("ram"),
                vcpus: r.get("vcpus"),
                disk: r.get("disk"),
            })
            .collect();
        v.sort_by(|a, b| (a.id.len(), &a.id).cmp(&(b.id.len(), &b.id)));
        Ok(v)
    }

    pub async fn flavor(&self, id: &str) -> anyhow::Result<Option<FlavorRow>> {
        Ok(self.flavors().await?.into_iter().find(|f| f.id == id))
    }

    /// Flavors linked to a version (empty = every flavor is allowed).
    pub async fn version_flavors(&self, version_id: &str) -> anyhow::Result<Vec<String>> {
        let rows = sqlx::query("SELECT flavor_id FROM version_flavors WHERE version_id = ?")
            .bind(version_id)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(|r| r.get("flavor_id")).collect())
    }

    // ---- instances ----------------------------------------------------------------------------

    pub async fn instance(&self, id: &str) -> anyhow::Result<Option<InstanceRow>> {
        let row = sqlx::query("SELECT * FROM instances WHERE id = ? AND deleted = 0")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(instance_from))
    }

    /// A project's live instances, newest first.
    pub async fn instances_of(&self, project: &str) -> anyhow::Result<Vec<InstanceRow>> {
        let rows = sqlx::query(
            "SELECT * FROM instances WHERE project_id = ? AND deleted = 0 ORDER BY created DESC, rowid DESC",
        )
        .bind(project)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(instance_from).collect())
    }

    /// Every live instance (for provisioner reconciliation and timers).
    pub async fn live_instances(&self) -> anyhow::Result<Vec<InstanceRow>> {
        let rows = sqlx::query("SELECT * FROM instances WHERE deleted = 0")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(instance_from).collect())
    }

    /// Allocates the next server id (never reused) inside `tx`.
    pub async fn next_server_id(tx: &mut Transaction<'static, Sqlite>) -> anyhow::Result<i64> {
        let v: i64 = sqlx::query_scalar(
            "UPDATE counters SET value = value + 1 WHERE name = 'server_id' RETURNING value",
        )
        .fetch_one(&mut **tx)
        .await?;
        Ok(v)
    }

    pub async fn insert_instance(
        tx: &mut Transaction<'static, Sqlite>,
        i: &InstanceRow,
    ) -> anyhow::Result<()> {
        sqlx::query(
            "INSERT INTO instances (id, project_id, name, flavor_id, datastore_version_id, volume_size, task, \
             task_started, service_status, fault, fault_at, server_id, host, port, created, updated, deleted, agent_public_key, agent_nats_user, configuration_id, replica_of, repl_strategy) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?, ?)",
        )
        .bind(&i.id)
        .bind(&i.project_id)
        .bind(&i.name)
        .bind(&i.flavor_id)
        .bind(&i.datastore_version_id)
        .bind(i.volume_size)
        .bind(&i.task)
        .bind(&i.task_started)
        .bind(&i.service_status)
        .bind(&i.fault)
        .bind(&i.fault_at)
        .bind(i.server_id)
        .bind(&i.host)
        .bind(i.port)
        .bind(&i.created)
        .bind(&i.updated)
        .bind(&i.agent_public_key)
        .bind(&i.agent_nats_user)
        .bind(&i.configuration_id)
        .bind(&i.replica_of)
        .bind(&i.repl_strategy)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// Sets an instance's task (and clears or sets its fault) inside `tx`.
    pub async fn set_task(
        tx: &mut Transaction<'static, Sqlite>,
        id: &str,
        task: &str,
        fault: Option<&str>,
    ) -> anyhow::Result<()> {
        let ts = now();
        sqlx::query(
            "UPDATE instances SET task = ?, task_started = ?, updated = ?, \
             fault = COALESCE(?, fault), fault_at = CASE WHEN ? IS NULL THEN fault_at ELSE ? END WHERE id = ?",
        )
        .bind(task)
        .bind(&ts)
        .bind(&ts)
        .bind(fault)
        .bind(fault)
        .bind(&ts)
        .bind(id)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    pub async fn clear_fault(
        tx: &mut Transaction<'static, Sqlite>,
        id: &str,
    ) -> anyhow::Result<()> {
        sqlx::query("UPDATE instances SET fault = NULL, fault_at = NULL WHERE id = ?")
            .bind(id)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    pub async fn set_service_status(
        &self,
        id: &str,
        status: &str,
        fault: Option<&str>,
    ) -> anyhow::Result<()> {
        let ts = now();
        // A database that runs again clears a fault its agent reported (a crash); the fault of a
        // failed build stays with the building_error task, whatever arrives after it.
        sqlx::query(
            "UPDATE instances SET service_status = ?, updated = ?, \
             fault = CASE WHEN ? = 'running' AND task = 'none' THEN NULL \
                          WHEN task = 'building_error' THEN fault ELSE COALESCE(?, fault) END, \
             fault_at = CASE WHEN ? = 'running' AND task = 'none' THEN NULL \
                             WHEN task = 'building_error' OR ? IS NULL THEN fault_at ELSE ? END \
             WHERE id = ?",
        )
        .bind(status)
        .bind(&ts)
        .bind(status)
        .bind(fault)
        .bind(status)
        .bind(fault)
        .bind(&ts)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn set_agent_info(
        &self,
        id: &str,
        version: &str,
        capabilities: &str,
    ) -> anyhow::Result<()> {
        sqlx::query("UPDATE instances SET agent_version = ?, capabilities = ? WHERE id = ?")
            .bind(version)
            .bind(capabilities)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Completes a reserved instance row with its placed agent (key, NATS user, address,
    /// placement); returns its server id. Fails when the row is gone (deleted meanwhile).
    pub async fn complete_placement(
        tx: &mut Transaction<'static, Sqlite>,
        id: &str,
        key: &[u8],
        nats_user: &str,
        host: &str,
        port: u16,
        placement: &str,
    ) -> anyhow::Result<i64> {
        let server_id: Option<i64> = sqlx::query_scalar(
            "UPDATE instances SET agent_public_key = ?, agent_nats_user = ?, host = ?, port = ?, \
             placement = ?, updated = ? WHERE id = ? AND deleted = 0 RETURNING server_id",
        )
        .bind(coffer_proto::seal::to_hex(key))
        .bind(nats_user)
        .bind(host)
        .bind(port as i64)
        .bind(placement)
        .bind(now())
        .bind(id)
        .fetch_optional(&mut **tx)
        .await?;
        server_id.with_context(|| format!("instance {id} was deleted while it was placed"))
    }

    /// Removes a create that did not complete (its placement failed): nothing of it stays.
    pub async fn forget_instance(&self, id: &str) -> anyhow::Result<()> {
        let mut tx = self.begin().await?;
        let gone = sqlx::query("DELETE FROM instances WHERE id = ? AND agent_public_key = ''")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        if gone.rows_affected() > 0 {
            sqlx::query("DELETE FROM instance_modules WHERE instance_id = ?")
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn set_endpoint(&self, id: &str, host: &str, port: i64) -> anyhow::Result<()> {
        sqlx::query("UPDATE instances SET host = ?, port = ? WHERE id = ?")
            .bind(host)
            .bind(port)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Replaces the parameters of a datastore version (`manage datastore-parameters-load`).
    pub async fn load_params(
        &self,
        version_id: &str,
        rules: &[coffer_common::config_rules::ParamRule],
    ) -> anyhow::Result<()> {
        let mut tx = self.begin().await?;
        sqlx::query("DELETE FROM config_params WHERE version_id = ?")
            .bind(version_id)
            .execute(&mut *tx)
            .await?;
        for r in rules {
            sqlx::query("INSERT INTO config_params (version_id, name, rule) VALUES (?, ?, ?)")
                .bind(version_id)
                .bind(&r.name)
                .bind(serde_json::to_string(r)?)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn params(
        &self,
        version_id: &str,
    ) -> anyhow::Result<Vec<coffer_common::config_rules::ParamRule>> {
        let rows = sqlx::query("SELECT rule FROM config_params WHERE version_id = ? ORDER BY name")
            .bind(version_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok(serde_json::from_str(r.get::<&str, _>("rule"))?))
            .collect()
    }

    pub async fn insert_configuration(&self, c: &ConfigurationRow) -> anyhow::Result<()> {
        sqlx::query(
            "INSERT INTO configurations (id, project_id, name, description, datastore_version_id, config_values, created, updated) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&c.id)
        .bind(&c.project_id)
        .bind(&c.name)
        .bind(&c.description)
        .bind(&c.datastore_version_id)
        .bind(serde_json::to_string(&c.values)?)
        .bind(&c.created)
        .bind(&c.updated)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn update_configuration(&self, c: &ConfigurationRow) -> anyhow::Result<()> {
        sqlx::query(
            "UPDATE configurations SET name = ?, description = ?, config_values = ?, updated = ? WHERE id = ?",
        )
        .bind(&c.name)
        .bind(&c.description)
        .bind(serde_json::to_string(&c.values)?)
        .bind(now())
        .bind(&c.id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn configurations_of(&self, project: &str) -> anyhow::Result<Vec<ConfigurationRow>> {
        let rows = sqlx::query(
            "SELECT * FROM configurations WHERE project_id = ? AND deleted = 0 ORDER BY created, rowid",
        )
        .bind(project)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(configuration_from).collect())
    }

    pub async fn configuration(&self, id: &str) -> anyhow::Result<Option<ConfigurationRow>> {
        let row = sqlx::query("SELECT * FROM configurations WHERE id = ? AND deleted = 0")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(configuration_from))
    }

    pub async fn delete_configuration(&self, id: &str) -> anyhow::Result<()> {
        sqlx::query("UPDATE configurations SET deleted = 1, updated = ? WHERE id = ?")
            .bind(now())
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Live instances with the group attached.
    pub async fn instances_with_configuration(&self, id: &str) -> anyhow::Result<Vec<InstanceRow>> {
        let rows = sqlx::query(
            "SELECT * FROM instances WHERE configuration_id = ? AND deleted = 0 ORDER BY created, rowid",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(instance_from).collect())
    }

    pub async fn set_configuration(
        &self,
        id: &str,
        configuration: Option<&str>,
    ) -> anyhow::Result<()> {
        sqlx::query("UPDATE instances SET configuration_id = ?, updated = ? WHERE id = ?")
            .bind(configuration)
            .bind(now())
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Inserts or replaces a module.
    pub async fn save_module(&self, m: &ModuleRow) -> anyhow::Result<()> {
        sqlx::query(
            "INSERT OR REPLACE INTO modules (id, project_id, name, type, description, contents_sealed, md5, datastore, \
             datastore_version, auto_apply, visible, live_update, priority_apply, apply_order, is_admin, created, updated) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&m.id)
        .bind(&m.project_id)
        .bind(&m.name)
        .bind(&m.kind)
        .bind(&m.description)
        .bind(&m.contents_sealed)
        .bind(&m.md5)
        .bind(&m.datastore)
        .bind(&m.datastore_version)
        .bind(m.auto_apply as i64)
        .bind(m.visible as i64)
        .bind(m.live_update as i64)
        .bind(m.priority_apply as i64)
        .bind(m.apply_order)
        .bind(m.is_admin as i64)
        .bind(&m.created)
        .bind(&m.updated)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Modules a project can see: its own and the all-tenant ones.
    pub async fn modules_for(&self, project: &str) -> anyhow::Result<Vec<ModuleRow>> {
        let rows = sqlx::query(
            "SELECT * FROM modules WHERE deleted = 0 AND (project_id = ? OR project_id IS NULL) ORDER BY created, rowid",
        )
        .bind(project)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(module_from).collect())
    }

    pub async fn module(&self, id: &str) -> anyhow::Result<Option<ModuleRow>> {
        let row = sqlx::query("SELECT * FROM modules WHERE id = ? AND deleted = 0")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(module_from))
    }

    pub async fn delete_module(&self, id: &str) -> anyhow::Result<()> {
        sqlx::query("UPDATE modules SET deleted = 1, updated = ? WHERE id = ?")
            .bind(now())
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn record_instance_module(
        &self,
        instance: &str,
        module: &str,
        md5: &str,
        status: &str,
        message: &str,
        removed: bool,
    ) -> anyhow::Result<()> {
        sqlx::query(
            "INSERT OR REPLACE INTO instance_modules (instance_id, module_id, md5, status, message, updated, removed) \
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(instance)
        .bind(module)
        .bind(md5)
        .bind(status)
        .bind(message)
        .bind(now())
        .bind(removed as i64)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Live instances that have the module applied.
    pub async fn module_instances(&self, module: &str) -> anyhow::Result<Vec<InstanceRow>> {
        let rows = sqlx::query(
            "SELECT i.* FROM instances i JOIN instance_modules m ON m.instance_id = i.id \
             WHERE m.module_id = ? AND m.removed = 0 AND i.deleted = 0 ORDER BY i.created",
        )
        .bind(module)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(instance_from).collect())
    }

    /// Live replicas of a source.
    pub async fn replicas_of(&self, source: &str) -> anyhow::Result<Vec<InstanceRow>> {
        let rows = sqlx::query(
            "SELECT * FROM instances WHERE replica_of = ? AND deleted = 0 ORDER BY created, rowid",
        )
        .bind(source)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(instance_from).collect())
    }

    pub async fn has_replicas(&self, source: &str) -> anyhow::Result<bool> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM instances WHERE replica_of = ? AND deleted = 0",
        )
        .bind(source)
        .fetch_one(&self.pool)
        .await?;
        Ok(n > 0)
    }

    pub async fn set_replica_of(&self, id: &str, source: Option<&str>) -> anyhow::Result<()> {
        Self::set_replica_of_in(&self.pool, id, source).await
    }

    /// [`Store::set_replica_of`] through `ex` (a transaction's own).
    pub async fn set_replica_of_in<'e, E: sqlx::SqliteExecutor<'e>>(
        ex: E,
        id: &str,
        source: Option<&str>,
    ) -> anyhow::Result<()> {
        sqlx::query("UPDATE instances SET replica_of = ?, updated = ? WHERE id = ?")
            .bind(source)
            .bind(now())
            .bind(id)
            .execute(ex)
            .await?;
        Ok(())
    }

    pub async fn set_replication_user(
        &self,
        id: &str,
        user: &str,
        secret: &str,
        strategy: &str,
    ) -> anyhow::Result<()> {
        sqlx::query(
            "UPDATE instances SET repl_user = ?, repl_secret = ?, repl_strategy = ?, updated = ? WHERE id = ?",
        )
        .bind(user)
        .bind(secret)
        .bind(strategy)
        .bind(now())
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn set_ejected(&self, id: &str, ejected: bool) -> anyhow::Result<()> {
        sqlx::query("UPDATE instances SET ejected = ?, updated = ? WHERE id = ?")
            .bind(ejected as i64)
            .bind(now())
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn rename(&self, id: &str, name: &str) -> anyhow::Result<()> {
        sqlx::query("UPDATE instances SET name = ?, updated = ? WHERE id = ?")
            .bind(name)
            .bind(now())
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn mark_deleted(&self, id: &str) -> anyhow::Result<()> {
        let mut tx = self.begin().await?;
        sqlx::query("UPDATE instances SET deleted = 1, task = 'none', updated = ? WHERE id = ?")
            .bind(now())
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM outbox WHERE instance_id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    // ---- outbox and intents -------------------------------------------------------------------

    /// Queues an intent for publication inside the transaction that changed the state. An intent
    /// larger than [`MAX_INTENT_BYTES`] is refused ([`IntentTooLarge`], a 413 to the caller), so
    /// the transaction stores nothing and no intent NATS would refuse ever enters the outbox.
    pub async fn enqueue(
        tx: &mut Transaction<'static, Sqlite>,
        intent_id: &str,
        instance_id: &str,
        kind: &str,
        payload: &[u8],
    ) -> anyhow::Result<()> {
        if payload.len() > MAX_INTENT_BYTES {
            return Err(IntentTooLarge {
                kind: kind.to_string(),
                bytes: payload.len(),
            }
            .into());
        }
        let ts = now();
        sqlx::query("INSERT INTO outbox (intent_id, instance_id, kind, payload, created) VALUES (?, ?, ?, ?, ?)")
            .bind(intent_id)
            .bind(instance_id)
            .bind(kind)
            .bind(payload)
            .bind(&ts)
            .execute(&mut **tx)
            .await?;
        sqlx::query(
            "INSERT INTO intents (id, instance_id, kind, state, created, updated) VALUES (?, ?, ?, 'queued', ?, ?)",
        )
        .bind(intent_id)
        .bind(instance_id)
        .bind(kind)
        .bind(&ts)
        .bind(&ts)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    pub async fn outbox(&self) -> anyhow::Result<Vec<OutboxRow>> {
        let rows = sqlx::query(
            "SELECT seq, intent_id, instance_id, payload FROM outbox ORDER BY seq LIMIT 100",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| OutboxRow {
                seq: r.get("seq"),
                intent_id: r.get("intent_id"),
                instance_id: r.get("instance_id"),
                payload: r.get("payload"),
            })
            .collect())
    }

    /// Removes a published intent and marks it sent.
    pub async fn published(&self, seq: i64, intent_id: &str) -> anyhow::Result<()> {
        let mut tx = self.begin().await?;
        sqlx::query("DELETE FROM outbox WHERE seq = ?")
            .bind(seq)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "UPDATE intents SET state = 'sent', updated = ? WHERE id = ? AND state = 'queued'",
        )
        .bind(now())
        .bind(intent_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Records an event about an intent; returns the intent's kind and whether this was the first
    /// time its final state was recorded.
    /// The instance an intent was sent to.
    pub async fn intent_instance(&self, id: &str) -> anyhow::Result<Option<String>> {
        let row = sqlx::query("SELECT instance_id FROM intents WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.get("instance_id")))
    }

    pub async fn intent_event(
        &self,
        id: &str,
        state: &str,
        progress: Option<i64>,
        message: &str,
    ) -> anyhow::Result<Option<(String, bool)>> {
        let mut tx = self.begin().await?;
        let row = sqlx::query("SELECT kind, state FROM intents WHERE id = ?")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let kind: String = row.get("kind");
        let old: String = row.get("state");
        let old_final = old == "done" || old == "failed";
        if !old_final {
            sqlx::query(
                "UPDATE intents SET state = ?, progress = COALESCE(?, progress), message = ?, updated = ? WHERE id = ?",
            )
            .bind(state)
            .bind(progress)
            .bind(message)
            .bind(now())
            .bind(id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        let first_final = !old_final && (state == "done" || state == "failed");
        Ok(Some((kind, first_final)))
    }

    /// The latest intent of an instance (for progress display).
    pub async fn latest_intent(
        &self,
        instance_id: &str,
    ) -> anyhow::Result<Option<(String, String, i64, String)>> {
        let row = sqlx::query(
            "SELECT kind, state, progress, message FROM intents WHERE instance_id = ? ORDER BY created DESC, rowid DESC LIMIT 1",
        )
        .bind(instance_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| {
            (
                r.get("kind"),
                r.get("state"),
                r.get("progress"),
                r.get("message"),
            )
        }))
    }

    /// How many times an intent kind was recorded for an instance (tests: exactly-once checks).
    pub async fn count_intents(&self, instance_id: &str, kind: &str) -> anyhow::Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT COUNT(*) FROM intents WHERE instance_id = ? AND kind = ?")
                .bind(instance_id)
                .bind(kind)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    pub async fn root_enabled(&self, id: &str) -> anyhow::Result<bool> {
        let v: i64 = sqlx::query_scalar("SELECT root_enabled FROM instances WHERE id = ?")
            .bind(id)
            .fetch_one(&self.pool)
            .await?;
        Ok(v != 0)
    }

    pub async fn set_root_enabled(&self, id: &str, enabled: bool) -> anyhow::Result<()> {
        sqlx::query("UPDATE instances SET root_enabled = ? WHERE id = ?")
            .bind(enabled as i64)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    // ---- backups ------------------------------------------------------------------------------

    pub async fn backups_of(&self, project: &str) -> anyhow::Result<Vec<BackupRow>> {
        let rows = sqlx::query("SELECT * FROM backups WHERE project_id = ? AND deleted = 0 ORDER BY created DESC, rowid DESC")
            .bind(project)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(backup_from).collect())
    }

    /// Whether any backup taken from `instance` is kept.
    pub async fn has_backups_of(&self, instance: &str) -> anyhow::Result<bool> {
        let row =
            sqlx::query("SELECT 1 FROM backups WHERE instance_id = ? AND deleted = 0 LIMIT 1")
                .bind(instance)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.is_some())
    }

    pub async fn backup(&self, id: &str) -> anyhow::Result<Option<BackupRow>> {
        let row = sqlx::query("SELECT * FROM backups WHERE id = ? AND deleted = 0")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(backup_from))
    }

    /// The chain that restores backup `id`: its full backup first, `id` last (None if a link is
    /// missing, deleted, or the chain loops).
    pub async fn backup_chain(&self, id: &str) -> anyhow::Result<Option<Vec<BackupRow>>> {
        let mut chain = vec![];
        let mut next = Some(id.to_string());
        while let Some(b) = next {
            if chain.len() > 1000 || chain.iter().any(|x: &BackupRow| x.id == b) {
                return Ok(None);
            }
            let Some(row) = self.backup(&b).await? else {
                return Ok(None);
            };
            next = row.parent_id.clone();
            chain.push(row);
        }
        chain.reverse();
        Ok(Some(chain))
    }

    pub async fn backup_by_intent(&self, intent_id: &str) -> anyhow::Result<Option<BackupRow>> {
        let row = sqlx::query("SELECT * FROM backups WHERE intent_id = ?")
            .bind(intent_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(backup_from))
    }

    /// Whether a backup of the instance is NEW or BUILDING.
    pub async fn backup_running(&self, instance_id: &str) -> anyhow::Result<bool> {
        Self::backup_running_in(&self.pool, instance_id).await
    }

    /// [`Store::backup_running`] read through `ex` (a transaction's own, for a check that
    /// must hold when the transaction commits).
    pub async fn backup_running_in<'e, E: sqlx::SqliteExecutor<'e>>(
        ex: E,
        instance_id: &str,
    ) -> anyhow::Result<bool> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM backups WHERE instance_id = ? AND deleted = 0 AND status IN ('NEW', 'BUILDING')",
        )
        .bind(instance_id)
        .fetch_one(ex)
        .await?;
        Ok(n > 0)
    }

    pub async fn insert_backup(
        tx: &mut Transaction<'static, Sqlite>,
        b: &BackupRow,
    ) -> anyhow::Result<()> {
        sqlx::query(
            "INSERT INTO backups (id, project_id, instance_id, name, description, status, parent_id, datastore_version_id, \
             intent_id, key_id, created, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&b.id)
        .bind(&b.project_id)
        .bind(&b.instance_id)
        .bind(&b.name)
        .bind(&b.description)
        .bind(&b.status)
        .bind(&b.parent_id)
        .bind(&b.datastore_version_id)
        .bind(&b.intent_id)
        .bind(&b.key_id)
        .bind(&b.created)
        .bind(&b.updated)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// Records a backup's progress or outcome.
    pub async fn update_backup(
        &self,
        id: &str,
        status: &str,
        progress: Option<&str>,
        result: Option<(i64, &str, &str)>,
        fault: Option<&str>,
    ) -> anyhow::Result<()> {
        sqlx::query(
            "UPDATE backups SET status = ?, progress = COALESCE(?, progress), size_bytes = COALESCE(?, size_bytes), \
             checksum = COALESCE(?, checksum), location = COALESCE(?, location), fault = COALESCE(?, fault), updated = ? \
             WHERE id = ? AND status NOT IN ('COMPLETED', 'FAILED')",
        )
        .bind(status)
        .bind(progress)
        .bind(result.map(|r| r.0))
        .bind(result.map(|r| r.1))
        .bind(result.map(|r| r.2))
        .bind(fault)
        .bind(now())
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn mark_backup_deleted(&self, id: &str) -> anyhow::Result<()> {
        sqlx::query("UPDATE backups SET deleted = 1, updated = ? WHERE id = ?")
            .bind(now())
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn count_backups(
        tx: &mut Transaction<'static, Sqlite>,
        project: &str,
    ) -> anyhow::Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT COUNT(*) FROM backups WHERE project_id = ? AND deleted = 0")
                .bind(project)
                .fetch_one(&mut **tx)
                .await?,
        )
    }

    // ---- quotas -------------------------------------------------------------------------------

    /// A project's limits (defaults where none is set), in Trove's resource order.
    pub async fn quota_limits(&self, project: &str) -> anyhow::Result<Vec<(String, i64)>> {
        Self::quota_limits_with(&self.pool, project).await
    }

    /// A project's limits read through `ex`: a transaction reads them on its own connection
    /// (asking the pool for a second one while holding a write lock starves the pool).
    pub async fn quota_limits_with<'e, E: sqlx::SqliteExecutor<'e>>(
        ex: E,
        project: &str,
    ) -> anyhow::Result<Vec<(String, i64)>> {
        let rows = sqlx::query("SELECT resource, hard_limit FROM quotas WHERE project_id = ?")
            .bind(project)
            .fetch_all(ex)
            .await?;
        Ok(QUOTA_DEFAULTS
            .iter()
            .map(|(r, d)| {
                let set = rows
                    .iter()
                    .find(|row| row.get::<String, _>("resource") == *r);
                (
                    r.to_string(),
                    set.map(|row| row.get("hard_limit")).unwrap_or(*d),
                )
            })
            .collect())
    }

    pub async fn set_quota(&self, project: &str, resource: &str, limit: i64) -> anyhow::Result<()> {
        sqlx::query(
            "INSERT INTO quotas (project_id, resource, hard_limit) VALUES (?, ?, ?) \
             ON CONFLICT (project_id, resource) DO UPDATE SET hard_limit = excluded.hard_limit",
        )
        .bind(project)
        .bind(resource)
        .bind(limit)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// What a project uses: (instances, ram MB, volume GB), from its live instances, read inside
    /// `tx` so a check and the insert that follows it cannot interleave with another create.
    pub async fn usage(
        tx: &mut Transaction<'static, Sqlite>,
        project: &str,
    ) -> anyhow::Result<(i64, i64, i64)> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n, COALESCE(SUM(f.ram), 0) AS ram, COALESCE(SUM(i.volume_size), 0) AS vol \
             FROM instances i LEFT JOIN flavors f ON f.id = i.flavor_id WHERE i.project_id = ? AND i.deleted = 0",
        )
        .bind(project)
        .fetch_one(&mut **tx)
        .await?;
        Ok((row.get("n"), row.get("ram"), row.get("vol")))
    }

    // ---- admin (manage) -----------------------------------------------------------------------

    pub async fn upsert_datastore(&self, name: &str) -> anyhow::Result<String> {
        if let Some(d) = self.datastore(name).await? {
            return Ok(d.id);
        }
        let id = uuid::Uuid::new_v4().to_string();
        sqlx::query("INSERT INTO datastores (id, name) VALUES (?, ?)")
            .bind(&id)
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(id)
    }

    pub async fn upsert_version(
        &self,
        datastore: &str,
        name: &str,
        manager: &str,
        version: &str,
        active: bool,
        root_on_create: bool,
    ) -> anyhow::Result<String> {
        let ds = self.datastore(datastore).await?.with_context(|| {
            format!("datastore '{datastore}' does not exist; add it with datastore-update first")
        })?;
        let existing = self
            .versions_of(&ds.id)
            .await?
            .into_iter()
            .find(|v| v.name == name);
        if let Some(v) = existing {
            sqlx::query(
                "UPDATE datastore_versions SET manager = ?, version = ?, active = ?, root_on_create = ? WHERE id = ?",
            )
            .bind(manager)
            .bind(version)
            .bind(active as i64)
            .bind(root_on_create as i64)
            .bind(&v.id)
            .execute(&self.pool)
            .await?;
            return Ok(v.id);
        }
        let id = uuid::Uuid::new_v4().to_string();
        sqlx::query(
            "INSERT INTO datastore_versions (id, datastore_id, name, version, manager, active, root_on_create) \
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&id)
        .bind(&ds.id)
        .bind(name)
        .bind(version)
        .bind(manager)
        .bind(active as i64)
        .bind(root_on_create as i64)
        .execute(&self.pool)
        .await?;
        Ok(id)
    }

    /// A version of a datastore by name or id (admin commands).
    pub async fn named_version(
        &self,
        datastore: &str,
        version: &str,
    ) -> anyhow::Result<VersionRow> {
        let ds = self
            .datastore(datastore)
            .await?
            .with_context(|| format!("datastore '{datastore}' does not exist"))?;
        self.versions_of(&ds.id)
            .await?
            .into_iter()
            .find(|v| v.name == version || v.id == version)
            .with_context(|| format!("datastore '{datastore}' has no version '{version}'"))
    }

    pub async fn set_default_version(&self, datastore: &str, version: &str) -> anyhow::Result<()> {
        let v = self.named_version(datastore, version).await?;
        sqlx::query("UPDATE datastores SET default_version_id = ? WHERE id = ?")
            .bind(&v.id)
            .bind(&v.datastore_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn upsert_flavor(&self, f: &FlavorRow) -> anyhow::Result<()> {
        sqlx::query(
            "INSERT INTO flavors (id, name, ram, vcpus, disk) VALUES (?, ?, ?, ?, ?) \
             ON CONFLICT (id) DO UPDATE SET name = excluded.name, ram = excluded.ram, vcpus = excluded.vcpus, disk = excluded.disk",
        )
        .bind(&f.id)
        .bind(&f.name)
        .bind(f.ram)
        .bind(f.vcpus)
        .bind(f.disk)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn link_flavor(
        &self,
        datastore: &str,
        version: &str,
        flavor: &str,
        link: bool,
    ) -> anyhow::Result<()> {
        let v = self.named_version(datastore, version).await?;
        self.flavor(flavor)
            .await?
            .with_context(|| format!("flavor '{flavor}' does not exist"))?;
        let sql = if link {
            "INSERT OR IGNORE INTO version_flavors (version_id, flavor_id) VALUES (?, ?)"
        } else {
            "DELETE FROM version_flavors WHERE version_id = ? AND flavor_id = ?"
        };
        sqlx::query(sql)
            .bind(&v.id)
            .bind(flavor)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_store_from_the_previous_migration_set_is_upgraded_with_its_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        {
            let s = Store::open_unmigrated(&path).await.unwrap();
            s.migrate(MIGRATOR.migrations.len() - 1).await.unwrap();
            sqlx::query(
                "INSERT INTO instances (id, project_id, name, flavor_id, datastore_version_id, volume_size, task, \
                 task_started, service_status, server_id, created, updated) \
                 VALUES ('i1', 'p', 'old', '1', 'v', 1, 'none', 't', 'running', 7, 't', 't')",
            )
            .execute(&s.pool)
            .await
            .unwrap();
            s.pool.close().await;
        }
        let s = Store::open(&path).await.unwrap();
        let i = s.instance("i1").await.unwrap().unwrap();
        assert_eq!(i.name, "old");
        assert_eq!(i.server_id, 7);
        assert_eq!(i.capabilities, "");
        s.set_agent_info("i1", "0.1.0", "prepare,restart")
            .await
            .unwrap();
        assert_eq!(
            s.instance("i1").await.unwrap().unwrap().capabilities,
            "prepare,restart"
        );
        // Opening again is a no-op.
        drop(s);
        Store::open(&path).await.unwrap();
    }

    #[tokio::test]
    async fn server_ids_are_never_reused() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("c.db")).await.unwrap();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..5 {
            let mut tx = s.begin().await.unwrap();
            let id = Store::next_server_id(&mut tx).await.unwrap();
            tx.commit().await.unwrap();
            assert!(seen.insert(id));
        }
        // A rolled-back allocation does not advance the counter, a committed one always does.
        let mut tx = s.begin().await.unwrap();
        Store::next_server_id(&mut tx).await.unwrap();
        drop(tx);
        let mut tx = s.begin().await.unwrap();
        assert_eq!(Store::next_server_id(&mut tx).await.unwrap(), 6);
    }
}
