//! Instances: their rows, tasks and service status, placement, replication links.

use super::*;
use crate::status::{PlacedBy, Task};

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct InstanceRow {
    pub id: String,
    pub project_id: String,
    pub name: String,
    pub flavor_id: String,
    pub datastore_version_id: String,
    pub volume_size: i64,
    pub task: Task,
    pub task_started: String,
    pub service_status: String,
    pub fault: Option<String>,
    pub fault_at: Option<String>,
    pub server_id: i64,
    pub host: Option<String>,
    pub port: Option<i64>,
    pub created: String,
    pub updated: String,
    #[sqlx(try_from = "Flag")]
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
    #[sqlx(try_from = "Flag")]
    pub ejected: bool,
    /// `provisioner` (placed by the configured provisioner) or `enrolled` (joined by itself).
    pub placement: PlacedBy,
    #[sqlx(try_from = "Flag")]
    pub root_enabled: bool,
    /// The controller placing it while the create runs (see `workflow::undo_unfinished_creates`).
    pub placing_by: Option<String>,
    /// The agent's continuous archive: continuous since, everything stored until (Unix ms),
    /// and why it is failing now.
    #[sqlx(default)]
    pub archive_since_ms: Option<i64>,
    #[sqlx(default)]
    pub archive_latest_ms: Option<i64>,
    #[sqlx(default)]
    pub archive_fault: Option<String>,
    #[sqlx(default)]
    pub archive_compactions: Option<i64>,
    /// Why the instance's last restore drill failed.
    #[sqlx(default)]
    pub drill_fault: Option<String>,
}

/// What answering a heartbeat reads of an instance (a few columns: a batch of whole rows costs
/// more to decode than to query).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct HeartbeatRow {
    pub id: String,
    pub service_status: String,
    pub host: Option<String>,
    pub port: Option<i64>,
    pub agent_version: String,
    pub capabilities: String,
    pub replica_of: Option<String>,
    #[sqlx(try_from = "Flag")]
    pub ejected: bool,
    pub archive_since_ms: Option<i64>,
    pub archive_latest_ms: Option<i64>,
    pub archive_compactions: Option<i64>,
}

impl From<&InstanceRow> for HeartbeatRow {
    fn from(r: &InstanceRow) -> HeartbeatRow {
        HeartbeatRow {
            id: r.id.clone(),
            service_status: r.service_status.clone(),
            host: r.host.clone(),
            port: r.port,
            agent_version: r.agent_version.clone(),
            capabilities: r.capabilities.clone(),
            replica_of: r.replica_of.clone(),
            ejected: r.ejected,
            archive_since_ms: r.archive_since_ms,
            archive_latest_ms: r.archive_latest_ms,
            archive_compactions: r.archive_compactions,
        }
    }
}

/// What a create knows of a new instance; [`InstanceRow::building`] makes its row.
pub struct NewRow<'a> {
    pub id: &'a str,
    pub project: &'a str,
    pub name: &'a str,
    pub flavor_id: &'a str,
    pub version_id: &'a str,
    pub volume_size: i64,
    pub server_id: i64,
}

impl InstanceRow {
    /// A new instance's row: BUILD, no agent, no address yet (the create fills in what it
    /// knows with `..`).
    pub fn building(n: NewRow<'_>) -> InstanceRow {
        let ts = now();
        InstanceRow {
            id: n.id.to_string(),
            project_id: n.project.to_string(),
            name: n.name.to_string(),
            flavor_id: n.flavor_id.to_string(),
            datastore_version_id: n.version_id.to_string(),
            volume_size: n.volume_size,
            task: Task::Building,
            task_started: ts.clone(),
            service_status: "new".into(),
            fault: None,
            fault_at: None,
            server_id: n.server_id,
            host: None,
            port: None,
            created: ts.clone(),
            updated: ts,
            deleted: false,
            agent_version: String::new(),
            capabilities: String::new(),
            agent_public_key: String::new(),
            agent_nats_user: String::new(),
            configuration_id: None,
            replica_of: None,
            repl_user: None,
            repl_secret: None,
            repl_strategy: None,
            ejected: false,
            placement: PlacedBy::Provisioner,
            root_enabled: false,
            placing_by: None,
            archive_since_ms: None,
            archive_latest_ms: None,
            archive_fault: None,
            archive_compactions: None,
            drill_fault: None,
        }
    }

    /// Whether its agent exists: a create holds its row keyless while it places the agent,
    /// and a VM's agent sends its key when it enrols.
    pub fn has_agent(&self) -> bool {
        !self.agent_public_key.is_empty()
    }
}

impl Store {
    pub async fn instance(&self, id: &str) -> anyhow::Result<Option<InstanceRow>> {
        Ok(
            sqlx::query_as("SELECT * FROM instances WHERE id = $1 AND deleted = FALSE")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    /// One page of a project's instances, newest first: up to `limit` after the instance
    /// `marker` (none when the marker is not one of them), read by index rather than whole.
    pub async fn instances_page(
        &self,
        project: &str,
        marker: Option<&str>,
        limit: usize,
    ) -> anyhow::Result<Vec<InstanceRow>> {
        Ok(sqlx::query_as(
            "SELECT * FROM instances WHERE project_id = $1 AND deleted = FALSE \
             AND (CAST($2 AS TEXT) IS NULL OR (created, rowid) < \
                  (SELECT created, rowid FROM instances m \
                   WHERE m.id = $2 AND m.project_id = $1 AND m.deleted = FALSE)) \
             ORDER BY created DESC, rowid DESC LIMIT $3",
        )
        .bind(project)
        .bind(marker)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Every live instance (for provisioner reconciliation and timers).
    pub async fn live_instances(&self) -> anyhow::Result<Vec<InstanceRow>> {
        Ok(
            sqlx::query_as("SELECT * FROM instances WHERE deleted = FALSE")
                .fetch_all(&self.pool)
                .await?,
        )
    }

    /// Live instances with a task under way (few at any time: what the timers look at each
    /// second, without reading the whole fleet).
    pub async fn busy_instances(&self) -> anyhow::Result<Vec<InstanceRow>> {
        Ok(
            sqlx::query_as("SELECT * FROM instances WHERE deleted = FALSE AND task <> 'none'")
                .fetch_all(&self.pool)
                .await?,
        )
    }

    /// The live instances that have a live replica (the sources automatic failover watches).
    pub async fn sources(&self) -> anyhow::Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT DISTINCT replica_of FROM instances WHERE replica_of IS NOT NULL AND deleted = FALSE",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// The live instances whose agent the provisioner placed (and must keep running), with
    /// their task.
    pub async fn placed_agents(&self) -> anyhow::Result<Vec<(String, Task)>> {
        Ok(sqlx::query_as(
            "SELECT id, task FROM instances WHERE deleted = FALSE AND placement = 'provisioner' AND agent_public_key <> ''",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// Allocates the next server id (never reused) inside `tx`.
    pub async fn next_server_id(tx: &mut Tx) -> anyhow::Result<i64> {
        let v: i64 = sqlx::query_scalar(
            "UPDATE counters SET value = value + 1 WHERE name = 'server_id' RETURNING value",
        )
        .fetch_one(&mut **tx)
        .await?;
        Ok(v)
    }

    pub async fn insert_instance(tx: &mut Tx, i: &InstanceRow) -> anyhow::Result<()> {
        sqlx::query(
            "INSERT INTO instances (id, project_id, name, flavor_id, datastore_version_id, volume_size, task, \
             task_started, service_status, fault, fault_at, server_id, host, port, created, updated, deleted, agent_public_key, agent_nats_user, configuration_id, replica_of, repl_strategy, placement, placing_by) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, FALSE, $17, $18, $19, $20, $21, $22, $23)",
        )
        .bind(&i.id)
        .bind(&i.project_id)
        .bind(&i.name)
        .bind(&i.flavor_id)
        .bind(&i.datastore_version_id)
        .bind(i.volume_size)
        .bind(i.task)
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
        .bind(i.placement)
        .bind(&i.placing_by)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// Sets an instance's task (and clears or sets its fault) inside `tx`.
    pub async fn set_task(
        tx: &mut Tx,
        id: &str,
        task: Task,
        fault: Option<&str>,
    ) -> anyhow::Result<()> {
        sqlx::query(
            "UPDATE instances SET task = $1, task_started = $2, updated = $2, \
             fault = COALESCE($3, fault), fault_at = CASE WHEN $3 IS NULL THEN fault_at ELSE $2 END WHERE id = $4",
        )
        .bind(task)
        .bind(now())
        .bind(fault)
        .bind(id)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    pub async fn clear_fault(tx: &mut Tx, id: &str) -> anyhow::Result<()> {
        sqlx::query("UPDATE instances SET fault = NULL, fault_at = NULL WHERE id = $1")
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
        // A database that runs again clears a fault its agent reported (a crash); the fault of a
        // failed build stays with the building_error task, whatever arrives after it.
        sqlx::query(
            "UPDATE instances SET service_status = $1, updated = $2, \
             fault = CASE WHEN $1 = 'running' AND task = 'none' THEN NULL \
                          WHEN task = 'building_error' THEN fault ELSE COALESCE($3, fault) END, \
             fault_at = CASE WHEN $1 = 'running' AND task = 'none' THEN NULL \
                             WHEN task = 'building_error' OR $3 IS NULL THEN fault_at ELSE $2 END \
             WHERE id = $4",
        )
        .bind(status)
        .bind(now())
        .bind(fault)
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
        sqlx::query("UPDATE instances SET agent_version = $1, capabilities = $2 WHERE id = $3")
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
        tx: &mut Tx,
        id: &str,
        key: &[u8],
        nats_user: &str,
        host: &str,
        port: u16,
        placement: PlacedBy,
    ) -> anyhow::Result<i64> {
        let server_id: Option<i64> = sqlx::query_scalar(
            "UPDATE instances SET agent_public_key = $1, agent_nats_user = $2, host = $3, port = $4, \
             placement = $5, updated = $6 WHERE id = $7 AND deleted = FALSE RETURNING server_id",
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
        let gone = sqlx::query("DELETE FROM instances WHERE id = $1 AND agent_public_key = ''")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        if gone.rows_affected() > 0 {
            sqlx::query("DELETE FROM instance_modules WHERE instance_id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// What the agent reports of its continuous archive.
    pub async fn set_archive(
        &self,
        id: &str,
        since_ms: i64,
        latest_ms: i64,
        fault: Option<&str>,
    ) -> anyhow::Result<()> {
        sqlx::query(
            "UPDATE instances SET archive_since_ms = $1, archive_latest_ms = $2, archive_fault = $3 WHERE id = $4",
        )
        .bind(since_ms)
        .bind(latest_ms)
        .bind(fault)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records how many files the agent has compacted; true when that is news (the caller
    /// then removes the pieces).
    pub async fn set_archive_compactions(&self, id: &str, n: i64) -> anyhow::Result<bool> {
        let r = sqlx::query(
            "UPDATE instances SET archive_compactions = $1 WHERE id = $2 \
             AND (archive_compactions IS NULL OR archive_compactions < $1)",
        )
        .bind(n)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() > 0)
    }

    pub async fn set_endpoint(&self, id: &str, host: &str, port: i64) -> anyhow::Result<()> {
        sqlx::query("UPDATE instances SET host = $1, port = $2 WHERE id = $3")
            .bind(host)
            .bind(port)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Live replicas of a source.
    pub async fn replicas_of(&self, source: &str) -> anyhow::Result<Vec<InstanceRow>> {
        Ok(sqlx::query_as(
            "SELECT * FROM instances WHERE replica_of = $1 AND deleted = FALSE ORDER BY created, rowid",
        )
        .bind(source)
        .fetch_all(&self.pool)
        .await?)
    }

    /// The live rows of `ids` (up to [`super::BATCH`]) and which of them are sources with a
    /// live replica: what answering a batch of heartbeats needs, in two statements.
    pub async fn heartbeat_rows(
        &self,
        ids: &[&str],
    ) -> anyhow::Result<(Vec<HeartbeatRow>, HashSet<String>)> {
        if ids.is_empty() {
            return Ok(Default::default());
        }
        let (marks, args) = super::padded(ids)?;
        let sql = format!(
            "SELECT id, service_status, host, port, agent_version, capabilities, replica_of, ejected, \
             archive_since_ms, archive_latest_ms, archive_compactions \
             FROM instances WHERE id IN ({marks}) AND deleted = FALSE"
        );
        let rows: Vec<HeartbeatRow> = sqlx::query_as_with(&sql, args)
            .fetch_all(&self.pool)
            .await?;
        let (_, args) = super::padded(ids)?;
        let sql = format!(
            "SELECT DISTINCT replica_of FROM instances WHERE replica_of IN ({marks}) AND deleted = FALSE"
        );
        let sources: Vec<String> = sqlx::query_scalar_with(&sql, args)
            .fetch_all(&self.pool)
            .await?;
        Ok((rows, sources.into_iter().collect()))
    }

    /// The live replicas of each of `sources` (up to [`super::BATCH`]), oldest first.
    pub async fn replicas_of_each(
        &self,
        sources: &[&str],
    ) -> anyhow::Result<HashMap<String, Vec<String>>> {
        let mut out: HashMap<String, Vec<String>> = HashMap::new();
        if sources.is_empty() {
            return Ok(out);
        }
        let (marks, args) = super::padded(sources)?;
        let sql = format!(
            "SELECT replica_of, id FROM instances WHERE replica_of IN ({marks}) AND deleted = FALSE ORDER BY created, rowid"
        );
        let pairs: Vec<(String, String)> = sqlx::query_as_with(&sql, args)
            .fetch_all(&self.pool)
            .await?;
        for (source, id) in pairs {
            out.entry(source).or_default().push(id);
        }
        Ok(out)
    }

    /// Whether a source has a live replica (without reading the replicas' rows).
    pub async fn has_replicas(&self, source: &str) -> anyhow::Result<bool> {
        let one: Option<i64> = sqlx::query_scalar(
            "SELECT 1 FROM instances WHERE replica_of = $1 AND deleted = FALSE LIMIT 1",
        )
        .bind(source)
        .fetch_optional(&self.pool)
        .await?;
        Ok(one.is_some())
    }

    pub async fn set_replica_of(&self, id: &str, source: Option<&str>) -> anyhow::Result<()> {
        Self::set_replica_of_in(&self.pool, id, source).await
    }

    /// [`Store::set_replica_of`] through `ex` (a transaction's own).
    pub async fn set_replica_of_in<'e, E: Exec<'e>>(
        ex: E,
        id: &str,
        source: Option<&str>,
    ) -> anyhow::Result<()> {
        sqlx::query("UPDATE instances SET replica_of = $1, updated = $2 WHERE id = $3")
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
            "UPDATE instances SET repl_user = $1, repl_secret = $2, repl_strategy = $3, updated = $4 WHERE id = $5",
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
        sqlx::query("UPDATE instances SET ejected = $1, updated = $2 WHERE id = $3")
            .bind(ejected)
            .bind(now())
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn rename(&self, id: &str, name: &str) -> anyhow::Result<()> {
        sqlx::query("UPDATE instances SET name = $1, updated = $2 WHERE id = $3")
            .bind(name)
            .bind(now())
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn mark_deleted(&self, id: &str) -> anyhow::Result<()> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "UPDATE instances SET deleted = TRUE, task = 'none', updated = $1 WHERE id = $2",
        )
        .bind(now())
        .bind(id)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM outbox WHERE instance_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn set_root_enabled(&self, id: &str, enabled: bool) -> anyhow::Result<()> {
        Self::set_root_enabled_in(&self.pool, id, enabled).await
    }

    /// [`Store::set_root_enabled`] through `ex` (a transaction's own).
    pub async fn set_root_enabled_in<'e, E: Exec<'e>>(
        ex: E,
        id: &str,
        enabled: bool,
    ) -> anyhow::Result<()> {
        sqlx::query("UPDATE instances SET root_enabled = $1 WHERE id = $2")
            .bind(enabled)
            .bind(id)
            .execute(ex)
            .await?;
        Ok(())
    }

    /// A live instance's server id, inside `tx`.
    pub async fn server_id_in(tx: &mut Tx, id: &str) -> anyhow::Result<Option<i64>> {
        Ok(
            sqlx::query_scalar("SELECT server_id FROM instances WHERE id = $1 AND deleted = FALSE")
                .bind(id)
                .fetch_optional(&mut **tx)
                .await?,
        )
    }

    /// Forgets the service status (`reset_status`): the next heartbeat sets it.
    pub async fn forget_service_status_in(tx: &mut Tx, id: &str) -> anyhow::Result<()> {
        sqlx::query("UPDATE instances SET service_status = 'unknown' WHERE id = $1")
            .bind(id)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}
