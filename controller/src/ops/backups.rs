//! Backups as the domain sees them, for the API and the workflows alike: starting one (row and
//! intent in one transaction), a replication snapshot, removing one, and what a restore is
//! bound to and granted.

use anyhow::Context;
use coffer_proto::v1;

use super::Caller;
use crate::error::ApiError;
use crate::status::{self, BackupStatus, Task};
use crate::store::{self, BackupRow, InstanceRow, Store, Tx};
use crate::App;

/// Removes a backup's objects through the storage trait, then its record (and the storage of
/// its deleted instance, when this was the last thing kept there).
pub async fn remove(app: &App, id: &str) -> anyhow::Result<()> {
    let Some(b) = app.store.backup(id).await? else {
        return Ok(());
    };
    crate::objects::delete(app, &b.instance_id, crate::objects::backup_keys(id).into())
        .await
        .context("deleting backup objects")?;
    app.store.soft_delete("backups", id).await?;
    prune_archive(app, &b.instance_id).await?;
    crate::objects::forget_if_unused(app, &b.instance_id).await
}

/// Removes the instance's archived change files that no point of its recovery window needs:
/// those before the oldest kept backup the archive covers (its window starts there).
pub async fn prune_archive(app: &App, instance: &str) -> anyhow::Result<()> {
    let Some(inst) = app
        .store
        .instance(instance)
        .await?
        .filter(|r| r.archive_since_ms.is_some())
    else {
        return Ok(());
    };
    // Its archive from where it took over serves the backups of the sources before it.
    if super::lineage::serves_earlier_backups(app, &inst).await? {
        return Ok(());
    }
    if let Some(file) = app.store.oldest_needed_change_file(instance).await? {
        let n = crate::objects::remove_archive_before(app, instance, &file)
            .await
            .context("removing archived files no backup needs")?;
        if n > 0 {
            tracing::info!(instance, before = %file, removed = n, "archived files no kept backup needs removed");
        }
    }
    Ok(())
}

/// Starts a replication snapshot of `source` (a full backup outside the quota, deleted once
/// its replicas are built).
pub async fn snapshot(
    app: &App,
    source: &InstanceRow,
    for_what: &str,
    id: &str,
) -> anyhow::Result<String> {
    if app.store.backup(id).await?.is_some() {
        // Started already (a workflow running this step again).
        return Ok(id.to_string());
    }
    let tx = app.store.begin().await?;
    let name = format!("Replication snapshot for {for_what}");
    start(app, tx, source, id.to_string(), name, None, None, true)
        .await
        .map(|b| b.id)
        .map_err(|e| anyhow::anyhow!(e.message))
}

/// Records a NEW backup of `r` and queues its intent, inside `tx` (committed here); returns the
/// row as committed (its agent may have moved it on by the time anyone reads it again).
#[allow(clippy::too_many_arguments)]
pub async fn start(
    app: &App,
    mut tx: Tx,
    r: &InstanceRow,
    id: String,
    name: String,
    description: Option<String>,
    parent_id: Option<String>,
    replication_snapshot: bool,
) -> Result<BackupRow, ApiError> {
    let intent_id = uuid::Uuid::new_v4().to_string();
    let ts = store::now();
    let key = super::keys::issue(app, &r.id, &crate::agents::agent_key(r)?)?;
    let row = BackupRow {
        id: id.clone(),
        project_id: r.project_id.clone(),
        instance_id: r.id.clone(),
        name,
        description,
        status: BackupStatus::New,
        parent_id: parent_id.clone(),
        datastore_version_id: r.datastore_version_id.clone(),
        size_bytes: None,
        checksum: None,
        location: None,
        progress: String::new(),
        fault: None,
        intent_id: Some(intent_id.clone()),
        key_id: key.as_ref().map(|k| k.0.clone()),
        created: ts.clone(),
        updated: ts,
        archive_since_ms: None,
        completed_ms: None,
        inventory: None,
        change_file: None,
    };
    Store::insert_backup(&mut tx, &row).await?;
    let backup = v1::intent::Kind::Backup(v1::Backup {
        backup_id: id.clone(),
        parent_id: parent_id.unwrap_or_default(),
        key_id: key.as_ref().map(|k| k.0.clone()).unwrap_or_default(),
        key_sealed: key.map(|k| k.1).unwrap_or_default(),
        replication_snapshot,
    });
    super::intents::enqueue(app, &mut tx, &r.id, &intent_id, backup).await?;
    tx.commit().await?;
    crate::failpoint::hit("backup", "requested");
    app.wake_outbox();
    Ok(row)
}

/// Gives the restoring agent (`target`, public key `key`) what it needs to read `restore`'s
/// chain, and nothing more: a NATS grant for other instances' links, the same through links in
/// local storage, and each link's key sealed to it.
pub fn grant_restore(
    app: &App,
    restore: &mut v1::RestoreFrom,
    target: &str,
    key: &[u8],
) -> Result<(), ApiError> {
    crate::objects::seal_grant(app, restore, target, key)?;
    crate::objects::grant_local(app, restore, target)?;
    if let Some(t) = restore.target.as_mut() {
        super::keys::seal_archive_keys(app, t, target, key)?;
    }
    super::keys::seal_chain(app, restore, target, key)
}

/// What a restore of `backup_id` is bound to: the chain as the controller recorded it (ids,
/// source instances, stream digests), so the agent refuses storage that says otherwise. Every
/// link must be COMPLETED with a digest; `project` (None for the controller's own snapshots)
/// must own each one.
pub async fn restore_point(
    app: &crate::App,
    backup_id: &str,
    project: Option<&str>,
) -> Result<v1::RestoreFrom, ApiError> {
    let chain = app.store.backup_chain(backup_id).await?.ok_or_else(|| {
        ApiError::conflict(format!(
            "Backup {backup_id} cannot be restored: a backup of its chain is missing or deleted."
        ))
    })?;
    let mut links = vec![];
    for b in &chain {
        let sha = b.checksum.clone().filter(|s| !s.is_empty());
        let owned = project.is_none_or(|p| b.project_id == p);
        match sha {
            Some(sha256) if b.status == BackupStatus::Completed && owned => links.push(v1::ChainLink {
                backup_id: b.id.clone(),
                instance_id: b.instance_id.clone(),
                sha256,
                key_id: b.key_id.clone().unwrap_or_default(),
                // Sealed to the restoring agent by `grant_restore`.
                key_sealed: vec![],
            }),
            _ => {
                return Err(ApiError::conflict(format!(
                    "Backup {backup_id} cannot be restored: backup {} of its chain is not a completed backup of this project.",
                    b.id
                )))
            }
        }
    }
    super::keys::check_chain(app, &chain)?;
    Ok(v1::RestoreFrom {
        backup_id: backup_id.to_string(),
        chain: links,
        // Sealed to the restoring agent once its key is known (`grant_restore`).
        grant_sealed: vec![],
        target: None,
    })
}

/// A backup request as the API parsed it.
pub struct BackupSpec {
    pub name: String,
    pub description: Option<String>,
    pub instance: String,
    pub incremental: bool,
    pub parent_id: Option<String>,
    /// Set when a schedule's run asks for it: the run is counted in the transaction that
    /// starts the backup.
    pub schedule: Option<ScheduleRun>,
}

/// A schedule's run: the schedule, when it was due and when it is due next.
pub struct ScheduleRun {
    pub id: String,
    pub due_ms: i64,
    pub next_ms: i64,
}

/// A project's backup by id (404 for another project's).
pub async fn find_backup(app: &App, c: &Caller, id: &str) -> Result<BackupRow, ApiError> {
    match app.store.backup(id).await? {
        Some(b) if b.project_id == c.project || c.admin => Ok(b),
        _ => Err(ApiError::not_found(format!(
            "Backup {id} could not be found."
        ))),
    }
}

/// Starts a backup (`POST /backups`): every check, then the row and the `backup` intent in one
/// transaction that re-checks what a concurrent request could have changed. Returns its id.
pub async fn create(app: &App, c: &Caller, req: BackupSpec) -> Result<BackupRow, ApiError> {
    if app.cfg.backup.is_none() {
        return Err(ApiError::unprocessable(
            "Backups are not configured on this deployment ([backup] in the controller config).",
        ));
    }
    let r = super::find_instance(app, c, &req.instance).await?;
    let fresh = app.fresh(&r.id);
    let (st_now, _) = status::derive(r.task, &r.service_status, fresh);
    if r.task != Task::None || st_now != "ACTIVE" || app.store.backup_running(&r.id).await? {
        return Err(super::unavailable(&r.id, format!("status was {st_now}")));
    }
    super::require(&r, "backup", "does not support 'backup'")?;
    // Incremental: on top of the given parent, or of the instance's latest completed backup.
    let parent_id = match req.parent_id {
        None if !req.incremental => None,
        None => {
            let latest = app
                .store
                .backups_of(&c.project)
                .await?
                .into_iter()
                .find(|x| x.instance_id == r.id && x.status == BackupStatus::Completed);
            Some(
                latest
                    .ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "Instance {} has no completed backup to build an incremental on.",
                            r.id
                        ))
                    })?
                    .id,
            )
        }
        Some(p) => {
            let parent = find_backup(app, c, &p).await?;
            if parent.instance_id != r.id {
                return Err(ApiError::bad_request(format!(
                    "Backup {p} is not a backup of instance {}.",
                    r.id
                )));
            }
            if parent.status != BackupStatus::Completed {
                return Err(ApiError::conflict(format!("Backup {p} is not completed.")));
            }
            Some(parent.id)
        }
    };
    if let Some(cfg) = app.cfg.backup.as_ref() {
        let datastore = super::datastore(app, &r).await?;
        let strategy =
            coffer_proto::datastore::BackupMethod::for_datastore(datastore, cfg.strategy);
        match strategy {
            None => {
                return Err(ApiError::bad_request(format!(
                    "Backups of {datastore} instances are not supported."
                )))
            }
            Some(k) if parent_id.is_some() && !k.incremental() => {
                return Err(ApiError::bad_request(format!(
                    "The backup strategy for {datastore} ({}) takes full backups only; omit parent_id and incremental.",
                    k.name()
                )));
            }
            Some(_) => {}
        }
    }
    let mut tx = app.store.begin().await?;
    // Again under the write lock: a restart, a switchover or another backup that started since
    // the first look wins, and this one is refused.
    let task_now = Store::task_in(&mut *tx, &r.id).await?.unwrap_or_default();
    if task_now != Task::None
        || Store::owner_in(&mut *tx, &r.id).await?.is_some()
        || Store::backup_running_in(&mut *tx, &r.id).await?
    {
        return Err(match task_now {
            Task::None => super::unavailable(&r.id, "task status was BACKUP"),
            t => super::busy(&r.id, t),
        });
    }
    let limit = Store::quota_limits_with(&mut *tx, &c.project)
        .await?
        .into_iter()
        .find(|(k, _)| k == "backups")
        .map(|(_, l)| l)
        .unwrap_or(-1);
    if limit >= 0 && Store::count_backups(&mut tx, &c.project).await? + 1 > limit {
        return Err(ApiError::over_limit(
            "Quota exceeded for resources: ['backups'].",
        ));
    }
    let id = uuid::Uuid::new_v4().to_string();
    if let Some(run) = &req.schedule {
        let moved = Store::advance_schedule_in(
            &mut *tx,
            &run.id,
            run.due_ms,
            run.next_ms,
            &format!("started backup {id}"),
        )
        .await?;
        if !moved {
            return Err(ApiError::conflict(format!(
                "Schedule {} has run already.",
                run.id
            )));
        }
        Store::link_scheduled_backup(&mut tx, &id, &run.id).await?;
    }
    start(app, tx, &r, id, req.name, req.description, parent_id, false).await
}
