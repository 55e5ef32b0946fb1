//! Instances: create (process, VM and enrolled placements), delete, restart and reset.

use std::sync::Arc;

use coffer_proto::v1;

use super::intents::{enqueue, intent_payload};
use super::Caller;
use crate::error::ApiError;
use crate::provisioner::Placement;
use crate::status::{self, BackupStatus, PlacedBy, Task};
use crate::store::{self, InstanceRow, Store, VersionRow};
use crate::App;

/// A create request as the API parsed it.
pub struct CreateSpec {
    /// The new instance's id, when the caller chose it (a workflow step that runs again finds
    /// what it made the first time); a new one otherwise.
    pub id: Option<String>,
    pub name: String,
    pub flavor_id: String,
    pub volume_size: i64,
    pub datastore: Option<String>,
    pub version: Option<String>,
    pub databases: Vec<v1::Database>,
    pub users: Vec<v1::User>,
    pub restore_from: Option<RestoreSpec>,
    pub configuration: Option<String>,
    pub modules: Vec<String>,
    /// A restore drill's throwaway instance: it runs at a low CPU and I/O priority, so it does
    /// not starve tenants' instances, and outside the project's quota (drills run one at a
    /// time; a full project can still be drilled, and a drill never blocks a tenant's create).
    pub throwaway: bool,
}

/// What a create restores: a backup, as it is or rolled forward to a time or a position.
pub struct RestoreSpec {
    pub base: RestoreBase,
    /// Roll forward to this time (unix µs).
    pub time_us: Option<i64>,
    /// Roll forward to this position (in the datastore's own terms).
    pub position: Option<String>,
}

pub enum RestoreBase {
    Backup(String),
    /// The newest backup of this instance before the target time.
    Instance(String),
}

/// `reset_status` (admin): a workflow's members are released (and its fences lifted) by the
/// workflow alone, which is asked to stop where it safely can; any other instance's task is
/// cleared and its status is taken from the next heartbeat.
pub async fn reset_status(app: &App, id: &str) -> Result<(), ApiError> {
    if let Some(w) = app.store.workflow_owning(id).await? {
        app.store.cancel_workflow(&w).await?;
        return Ok(());
    }
    let mut tx = app.store.begin().await?;
    Store::set_task(&mut tx, id, Task::None, None).await?;
    Store::forget_service_status_in(&mut tx, id).await?;
    tx.commit().await?;
    if let Some(l) = app.live.lock().unwrap().get_mut(id) {
        l.persisted = None;
    }
    Ok(())
}

pub async fn resolve_version(
    app: &App,
    ds: Option<&str>,
    v: Option<&str>,
) -> Result<VersionRow, ApiError> {
    let all = app.store.datastores().await?;
    let d = match ds {
        Some(name) => all
            .into_iter()
            .find(|d| d.name == name || d.id == name)
            .ok_or_else(|| ApiError::not_found(format!("Datastore '{name}' cannot be found.")))?,
        None => {
            let default = app.cfg.default_datastore.as_deref();
            if let Some(d) = default.and_then(|n| all.iter().find(|d| d.name == n)) {
                d.clone()
            } else if all.len() == 1 {
                all.into_iter().next().unwrap()
            } else {
                return Err(ApiError::bad_request(
                    "Please specify datastore. Default datastore cannot be found.",
                ));
            }
        }
    };
    let versions: Vec<VersionRow> = app
        .store
        .versions_of(&d.id)
        .await?
        .into_iter()
        .filter(|x| x.active)
        .collect();
    match v {
        Some(name) => versions
            .into_iter()
            .find(|x| x.name == name || x.id == name)
            .ok_or_else(|| {
                ApiError::bad_request(format!("Datastore version '{name}' cannot be found."))
            }),
        None => versions
            .into_iter()
            .find(|x| d.default_version_id.as_ref() == Some(&x.id))
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "Default version for datastore '{}' not found.",
                    d.name
                ))
            }),
    }
}

/// What a create's restorePoint restores, checked: a completed backup of the project of the
/// same datastore; for a point in time, one the source's archive covers and a target inside
/// its recovery window, with the archived segments the agent may replay.
async fn restore_from(
    app: &App,
    project: &str,
    spec: &RestoreSpec,
    manager: &str,
    datastore: coffer_proto::Datastore,
) -> Result<v1::RestoreFrom, ApiError> {
    let pitr = spec.time_us.is_some() || spec.position.is_some();
    if pitr && !datastore.archives_changes() {
        return Err(ApiError::bad_request(format!(
            "Point-in-time restore is not available for {datastore} instances: {}. Restore a backup without 'restore_time' or 'restore_position'.",
            datastore.point_in_time_note()
        )));
    }
    // With an instance to restore: its lineage (the sources before it, joined), the source
    // whose archive reaches the time, and the newest backup before the time that any source up
    // to it took and its archive covers.
    let mut chosen: Option<(Vec<super::lineage::Member>, InstanceRow)> = None;
    let backup = match &spec.base {
        RestoreBase::Backup(b) => app
            .store
            .backup(b)
            .await?
            .filter(|x| x.project_id == project)
            .ok_or_else(|| ApiError::not_found(format!("Backup {b} could not be found.")))?,
        RestoreBase::Instance(i) => {
            let inst = app
                .store
                .instance(i)
                .await?
                .filter(|x| x.project_id == project)
                .ok_or_else(|| ApiError::not_found(format!("Instance {i} could not be found.")))?;
            let t_ms = spec.time_us.unwrap_or_default().div_euclid(1000);
            let members = super::lineage::back(app, &inst, datastore).await?;
            let covers = super::lineage::covers(&members);
            let reach = covers
                .iter()
                .position(|c| *c >= t_ms)
                .unwrap_or(members.len().saturating_sub(1));
            let mut base = None;
            for (k, m) in members.iter().enumerate().take(reach + 1).rev() {
                let (id, since) = (&m.period.instance_id, m.period.since_ms);
                // A backup of a source taken before it handed over.
                let before = if k < reach { covers[k].min(t_ms) } else { t_ms };
                if let Some(b) = app.store.pitr_base(id, since, before).await? {
                    base = Some((k, b));
                    break;
                }
            }
            match base {
                Some((k, b)) => {
                    chosen = Some((members[k..=reach].to_vec(), inst));
                    b
                }
                None => {
                    return Err(window_error(
                        app,
                        &inst,
                        "no backup its archive covers completed before that time",
                    )
                    .await)
                }
            }
        }
    };
    let b = &backup.id;
    if backup.status != BackupStatus::Completed {
        return Err(ApiError::conflict(format!(
            "Backup {b} is not completed (status {}); restore from a completed backup.",
            backup.status
        )));
    }
    let of = app
        .store
        .version(&backup.datastore_version_id)
        .await?
        .map(|v| v.manager)
        .unwrap_or_default();
    if of != manager {
        return Err(ApiError::bad_request(format!(
            "Backup {b} is a {of} backup; restore it into a {of} instance, not {manager}."
        )));
    }
    let mut from = crate::ops::backups::restore_point(app, &backup.id, Some(project)).await?;
    if !pitr {
        return Ok(from);
    }
    let source = app
        .store
        .instance(&backup.instance_id)
        .await?
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "Backup {b} was taken from instance {}, which is deleted: its archive went with it; restore the backup without a time.",
                backup.instance_id
            ))
        })?;
    // The archive period that covers the backup, and the sources after it up to the one whose
    // archive reaches the time (a position is looked for in the backup source's archive).
    let (members, end) = match chosen {
        Some(c) => c,
        None => {
            let periods = app.store.archive_periods(&source.id).await?;
            let current = (source.archive_since_ms == backup.archive_since_ms).then(|| {
                super::lineage::Member {
                    period: crate::store::PeriodRow {
                        instance_id: source.id.clone(),
                        since_ms: source.archive_since_ms.unwrap_or_default(),
                        latest_ms: source.archive_latest_ms.unwrap_or_default(),
                        first_position: String::new(),
                        last_position: String::new(),
                    },
                    took_over_at: String::new(),
                    at_ms: 0,
                }
            });
            // An earlier period of the source serves when it ended by a handover (its files go
            // on, stored, into the next period); one that ended with a hole does not.
            let away = app.store.handovers_from(&source.id).await?;
            let period = backup
                .archive_since_ms
                .and_then(|since| periods.into_iter().find(|p| p.since_ms == since))
                .filter(|p| {
                    Some(p.since_ms) == source.archive_since_ms
                        || away.iter().any(|h| h.at_ms >= p.since_ms)
                });
            let members = match (period, current) {
                (Some(p), _) if spec.time_us.is_some() => {
                    let t_ms = spec.time_us.unwrap_or_default().div_euclid(1000);
                    super::lineage::forward(app, p, datastore, t_ms).await?
                }
                (Some(period), _) => vec![super::lineage::Member {
                    period,
                    took_over_at: String::new(),
                    at_ms: 0,
                }],
                (None, Some(m)) => vec![m],
                (None, None) => {
                    return Err(window_error(
                        app,
                        &source,
                        &format!("backup {b} is not covered by its continuous archive (taken before the archive started, or before a hole in it); choose a later backup"),
                    )
                    .await)
                }
            };
            let last = &members.last().expect("one member at least").period;
            let end = match app.store.instance(&last.instance_id).await? {
                Some(r) => r,
                None => source.clone(),
            };
            (members, end)
        }
    };
    let latest = members.last().map_or(i64::MIN, |m| m.period.latest_ms);
    // A backup of the first source after it handed over is not in the lineage's stream.
    if let (Some(next), Some(done)) = (members.get(1), backup.completed_ms) {
        if done > next.at_ms {
            return Err(window_error(
                app,
                &end,
                &format!("backup {b} was taken after its instance stopped being the source; restore it without a time, or choose a backup of the source of that time"),
            )
            .await);
        }
    }
    if let Some(t) = spec.time_us {
        let completed_us = backup.completed_ms.unwrap_or(i64::MAX).saturating_mul(1000);
        if t < completed_us || t > latest.saturating_mul(1000) {
            let why = if t < completed_us {
                format!(
                    "that is before backup {b} completed ({}); choose an earlier backup or a later time",
                    fmt_ms(backup.completed_ms.unwrap_or_default())
                )
            } else {
                "that is after the latest restorable time".to_string()
            };
            return Err(window_error(app, &end, &why).await);
        }
        let t_ms = t.div_euclid(1000);
        let gap = super::lineage::gaps(&members)
            .into_iter()
            .find(|(a, b)| t_ms > *a && t_ms < *b);
        if let Some((a, b)) = gap {
            let why = format!(
                "that is between {} and {}, while the source changed (a failover): no archive places the writes of that stretch; choose a time before or after it",
                fmt_ms(a),
                fmt_ms(b)
            );
            return Err(window_error(app, &end, &why).await);
        }
    }
    let mut segments = vec![];
    let mut listed = std::collections::BTreeSet::new();
    for m in &members {
        let owner = &m.period.instance_id;
        if !listed.insert(owner.clone()) {
            continue;
        }
        segments.extend(
            crate::objects::archive_segments(app, owner)
                .await?
                .into_iter()
                .map(|key| v1::ArchiveSegment {
                    instance_id: owner.clone(),
                    key,
                }),
        );
    }
    from.target = Some(v1::RestoreTarget {
        time_unix_us: spec.time_us.unwrap_or_default(),
        position: spec.position.clone().unwrap_or_default(),
        segments,
        keys: vec![],
        handovers: members
            .iter()
            .skip(1)
            .map(|m| v1::Handover {
                instance_id: m.period.instance_id.clone(),
                position: m.took_over_at.clone(),
            })
            .collect(),
    });
    Ok(from)
}

fn fmt_ms(ms: i64) -> String {
    super::rfc3339_ms(ms)
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// A point-in-time target the instance cannot give, naming its recovery window.
async fn window_error(app: &App, inst: &InstanceRow, why: &str) -> ApiError {
    let window = match super::lineage::window(app, inst).await {
        Ok(Some((e, l))) => format!(
            "Its recovery window is {} to {}.",
            fmt_ms(e),
            fmt_ms(l)
        ),
        Ok(None) if inst.archive_since_ms.is_none() => "Its change stream is not archived (the archive starts with the instance's first backup).".to_string(),
        Ok(None) => "It has no recovery window yet: it opens when a backup the archive covers completes.".to_string(),
        Err(e) => return ApiError::from(e),
    };
    ApiError::bad_request(format!(
        "Instance {} cannot be restored to that point: {why}. {window}",
        inst.id
    ))
}

/// Checks a create (nothing is placed for a refused one) and makes the new instance it describes,
/// with root's password when the version enables root on create.
pub async fn check_new(
    app: &Arc<App>,
    c: &Caller,
    req: CreateSpec,
) -> Result<NewInstance, ApiError> {
    let project = c.project.as_str();
    let version = resolve_version(app, req.datastore.as_deref(), req.version.as_deref()).await?;
    // What the datastore cannot honor is refused before anything is placed.
    let datastore = version
        .datastore()
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    if !datastore.has_named_databases()
        && (!req.databases.is_empty() || req.users.iter().any(|u| !u.databases.is_empty()))
    {
        return Err(ApiError::bad_request(format!(
            "{datastore} instances have no named databases; create the instance without 'databases' and without databases in its users."
        )));
    }
    let flavor = app.store.flavor(&req.flavor_id).await?.ok_or_else(|| {
        ApiError::bad_request(format!("Flavor '{}' could not be found.", req.flavor_id))
    })?;
    // restorePoint: a COMPLETED backup of this project (rolled forward when a time or a
    // position is asked for).
    let restore_from = match &req.restore_from {
        Some(spec) => Some(restore_from(app, project, spec, &version.manager, datastore).await?),
        None => None,
    };
    // A configuration group: the project's, for this version, with values that still check.
    let overrides = match &req.configuration {
        Some(g) => {
            let cfg = app
                .store
                .configuration(g)
                .await?
                .filter(|x| x.project_id == project)
                .ok_or_else(|| {
                    ApiError::not_found(format!("Configuration group {g} cannot be found."))
                })?;
            if cfg.datastore_version_id != version.id {
                return Err(ApiError::bad_request(format!(
                    "The configuration group {g} is for another datastore version."
                )));
            }
            super::configurations::check_values(app, &cfg.datastore_version_id, &cfg.values).await?
        }
        None => vec![],
    };
    let modules =
        super::modules::for_create(app, c, &req.modules, &version.datastore_name, &version.name)
            .await?;
    // Quota: a cheap check before placing anything; the binding one runs in the transaction.
    if !req.throwaway {
        let mut tx = app.store.begin_read().await?;
        super::quotas::check(&mut tx, project, flavor.ram, req.volume_size).await?;
    }
    let linked = app.store.version_flavors(&version.id).await?;
    if !linked.is_empty() && !linked.contains(&flavor.id) {
        return Err(ApiError::bad_request(format!(
            "Flavor '{}' is not supported for datastore version '{}' of '{}'.",
            flavor.id, version.name, version.datastore_name
        )));
    }

    let id = req.id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let root_password = version
        .root_on_create
        .then(|| uuid::Uuid::new_v4().simple().to_string());
    let n = NewInstance {
        id: id.clone(),
        project: project.to_string(),
        name: req.name,
        flavor,
        version,
        volume_size: req.volume_size,
        databases: req.databases,
        users: req.users,
        restore_from,
        overrides,
        modules,
        configuration: req.configuration,
        root_password,
        throwaway: req.throwaway,
    };
    // An intent too large to send is refused before anything is placed (a Unix user, a VM).
    check_prepare_size(app, &n)?;
    Ok(n)
}

/// Creates an instance the provisioner places at once (a local process): the row with the
/// binding quota check first, so concurrent creates past the quota are refused before any of
/// them places an agent (a Unix user, a port); then the agent, whose public key seals the
/// secrets, and the prepare intent.
pub async fn create_placed(app: &App, n: &NewInstance) -> Result<(), ApiError> {
    let id = &n.id;
    store_pending(app, n).await?;
    crate::failpoint::hit("create", "reserved");
    let committed = async {
        let (placed, nats_user) = place(app, id, &n.version, None, n.throwaway).await?;
        crate::failpoint::hit("create", "placed");
        commit_new(
            app,
            n,
            &placed.public_key,
            &nats_user,
            (&placed.host, placed.port),
            Commit::Placed(PlacedBy::Provisioner),
        )
        .await
    }
    .await;
    if let Err(e) = committed {
        let _ = app.provisioner.destroy(id).await;
        app.store.forget_instance(id).await?;
        return Err(e);
    }
    app.wake_outbox();
    start_agent(app, id).await
}

/// Refuses (413) a create whose prepare intent could never be sent. The estimate carries the
/// passwords in the clear, which is smaller than sealed, so what passes here may still be refused
/// by [`Store::enqueue`] once sealed; what fails here would fail there, after placing an agent.
fn check_prepare_size(app: &App, n: &NewInstance) -> Result<(), ApiError> {
    let estimate = v1::intent::Kind::Prepare(prepare_of(n));
    let bytes = intent_payload(app, &n.id, &n.id, estimate).len();
    if bytes > store::MAX_INTENT_BYTES {
        return Err(anyhow::Error::from(store::IntentTooLarge {
            kind: "prepare".into(),
            bytes,
        })
        .into());
    }
    Ok(())
}

/// The `prepare` of a new instance as it describes it: passwords in the clear, no server id,
/// nothing sealed yet.
pub fn prepare_of(n: &NewInstance) -> v1::Prepare {
    v1::Prepare {
        memory_mb: n.flavor.ram as u64,
        vcpus: n.flavor.vcpus as u32,
        volume_gb: n.volume_size as u64,
        databases: n.databases.clone(),
        users: n.users.clone(),
        datastore_version: n.version.version.clone(),
        restore: n.restore_from.clone(),
        overrides: n.overrides.clone(),
        ..Default::default()
    }
}

/// A new (non-replica) instance, checked and ready to be committed once its agent's key is known.
pub struct NewInstance {
    pub id: String,
    pub project: String,
    pub name: String,
    pub flavor: store::FlavorRow,
    pub version: VersionRow,
    pub volume_size: i64,
    pub databases: Vec<v1::Database>,
    /// Passwords in the clear until [`commit_new`] seals them.
    pub users: Vec<v1::User>,
    /// The backup chain to restore, as the controller recorded it.
    pub restore_from: Option<v1::RestoreFrom>,
    pub overrides: Vec<v1::Override>,
    pub modules: Vec<store::ModuleRow>,
    pub configuration: Option<String>,
    pub root_password: Option<String>,
    pub throwaway: bool,
}

/// The enrolment token an instance is made by, written with the instance.
pub struct TokenBinding {
    pub token_id: String,
    /// The agent's NATS creds, sealed to the controller's key, for a retry's answer.
    pub creds_sealed: Option<Vec<u8>>,
}

/// How [`commit_new`] stores the instance.
pub enum Commit {
    /// Insert the row, with this placement (`provisioner` or `enrolled`), and record it on the
    /// enrolment token that made it.
    Insert(PlacedBy, Option<TokenBinding>),
    /// Complete the row [`store_pending`] stored while the VM booted.
    Complete,
    /// Complete the row [`store_pending`] reserved, with the placed agent's key and address
    /// and this placement.
    Placed(PlacedBy),
}

fn row_of(n: &NewInstance, server_id: i64, key: &[u8], nats_user: &str) -> InstanceRow {
    InstanceRow {
        agent_public_key: coffer_proto::seal::to_hex(key),
        agent_nats_user: nats_user.to_string(),
        configuration_id: n.configuration.clone(),
        ..InstanceRow::building(store::NewRow {
            id: &n.id,
            project: &n.project,
            name: &n.name,
            flavor_id: &n.flavor.id,
            version_id: &n.version.id,
            volume_size: n.volume_size,
            server_id,
        })
    }
}

/// Stores a new instance before its agent exists (BUILD, no key, no address yet), with the
/// binding quota check: the reservation a create holds while its agent is placed.
pub async fn store_pending(app: &App, n: &NewInstance) -> Result<(), ApiError> {
    let mut tx = app.store.begin().await?;
    if !n.throwaway {
        super::quotas::check(&mut tx, &n.project, n.flavor.ram, n.volume_size).await?;
    }
    let server_id = Store::next_server_id(&mut tx).await?;
    let row = InstanceRow {
        placing_by: Some(app.id.clone()),
        ..row_of(n, server_id, &[], "")
    };
    Store::insert_instance(&mut tx, &row).await?;
    tx.commit().await?;
    Ok(())
}

/// Seals a new instance's secrets to its agent's key, stores it and queues its `prepare` intent,
/// in one transaction (with the binding quota check).
pub async fn commit_new(
    app: &App,
    n: &NewInstance,
    key: &[u8],
    nats_user: &str,
    (host, port): (&str, u16),
    how: Commit,
) -> Result<(), ApiError> {
    let id = &n.id;
    let mut prepare = prepare_of(n);
    for u in &mut prepare.users {
        let context = coffer_proto::seal::user_password_context(id, &u.name, &u.host);
        u.password_sealed = coffer_proto::seal::seal(key, &context, u.password.as_bytes())
            .map_err(|e| anyhow::anyhow!("sealing a password: {e}"))?;
        u.password.clear();
    }
    if let Some(pw) = &n.root_password {
        prepare.root_password_sealed = coffer_proto::seal::seal(
            key,
            &coffer_proto::seal::root_password_context(id),
            pw.as_bytes(),
        )
        .map_err(|e| anyhow::anyhow!("sealing the root password: {e}"))?;
    }
    prepare.modules = n
        .modules
        .iter()
        .map(|m| super::modules::spec_sealed(app, id, key, m))
        .collect::<Result<Vec<_>, _>>()?;
    for m in &n.modules {
        app.store
            .record_instance_module(id, &m.id, &m.md5, "PENDING", "", false)
            .await?;
    }
    let intent_id = uuid::Uuid::new_v4().to_string();
    let mut tx = app.store.begin().await?;
    let server_id = match how {
        Commit::Insert(placement, ref token) => {
            if !n.throwaway {
                super::quotas::check(&mut tx, &n.project, n.flavor.ram, n.volume_size).await?;
            }
            let server_id = Store::next_server_id(&mut tx).await?;
            let mut row = row_of(n, server_id, key, nats_user);
            row.host = Some(host.to_string());
            row.port = Some(port as i64);
            row.placement = placement;
            Store::insert_instance(&mut tx, &row).await?;
            if let Some(t) = token {
                if !Store::set_token_enrolled_in(
                    &mut tx,
                    &t.token_id,
                    id,
                    t.creds_sealed.as_deref(),
                )
                .await?
                {
                    return Err(ApiError::conflict(
                        "This token's enrolment is already complete; retry to get its answer.",
                    ));
                }
            }
            server_id
        }
        Commit::Placed(placement) => {
            Store::complete_placement(&mut tx, id, key, nats_user, host, port, placement).await?
        }
        Commit::Complete => Store::server_id_in(&mut tx, id)
            .await?
            .ok_or_else(|| anyhow::anyhow!("instance {id} was deleted while it built"))?,
    };
    prepare.server_id = server_id as u32;
    if let Some(r) = prepare.restore.as_mut() {
        crate::ops::backups::grant_restore(app, r, id, key)?;
    }
    enqueue(
        app,
        &mut tx,
        id,
        &intent_id,
        v1::intent::Kind::Prepare(prepare),
    )
    .await?;
    if n.root_password.is_some() {
        Store::set_root_enabled_in(&mut *tx, id, true).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Places an instance's agent (its identity and configuration); returns what the provisioner
/// placed and the agent's NATS user.
pub async fn place(
    app: &App,
    id: &str,
    version: &VersionRow,
    enrol_token: Option<String>,
    low_priority: bool,
) -> Result<(crate::provisioner::Placed, String), ApiError> {
    let (nats_creds, nats_user) = match enrol_token {
        // An agent that enrols gets its NATS identity then, sealed to its own key.
        Some(_) => (None, String::new()),
        None => super::agent_creds(app, id)?,
    };
    let placement = Placement {
        instance_id: id.to_string(),
        manager: version.manager.clone(),
        nats_url: super::agent_nats_url(app),
        nats_creds,
        nats_ca_file: app.cfg.nats_ca_file.clone(),
        enrol_token,
        backup_toml: agent_backup_toml(app)?,
        low_priority,
    };
    let placed = app.provisioner.prepare(&placement).await.map_err(|e| {
        ApiError::from(e.context("placing the agent failed; check the provisioner configuration"))
    })?;
    Ok((placed, nats_user))
}

/// The agent's `[backup]` table (TOML), when backups are configured.
pub fn agent_backup_toml(app: &App) -> Result<Option<String>, ApiError> {
    #[derive(serde::Serialize)]
    struct AgentBackup<'a> {
        backup: &'a coffer_common::backup::BackupConfig,
    }
    match &app.cfg.backup {
        Some(b) => {
            // The operator's keyring stays here: agents get per-instance keys with each intent.
            let b = coffer_common::backup::BackupConfig {
                keyring_file: None,
                ..b.clone()
            };
            Ok(Some(
                toml::to_string(&AgentBackup { backup: &b }).map_err(anyhow::Error::from)?,
            ))
        }
        None => Ok(None),
    }
}

/// Starts a placed agent; a failure ends the build in ERROR.
pub async fn start_agent(app: &App, id: &str) -> Result<(), ApiError> {
    if let Err(e) = app.provisioner.start(id).await {
        let mut tx = app.store.begin().await?;
        Store::set_task(
            &mut tx,
            id,
            Task::BuildingError,
            Some(&format!("starting the agent failed: {e:#}")),
        )
        .await?;
        tx.commit().await?;
    }
    Ok(())
}

/// Restarts the database (`restart` action).
pub async fn restart(app: &App, r: &InstanceRow) -> Result<(), ApiError> {
    let busy = || super::busy(&r.id, r.task);
    let backing_up = || {
        ApiError::unprocessable(format!(
            "Instance {} is not currently available for an action to be performed (status was BACKUP); retry once its backup ends.",
            r.id
        ))
    };
    if r.task != Task::None {
        return Err(busy());
    }
    if app.store.backup_running(&r.id).await? {
        return Err(backing_up());
    }
    if !app.fresh(&r.id) || !status::action_allowed(&r.service_status) {
        let (st, _) = status::derive(r.task, &r.service_status, app.fresh(&r.id));
        return Err(super::unavailable(&r.id, format!("status was {st}")));
    }
    super::require(r, "restart", "does not support 'restart'")?;
    let intent_id = uuid::Uuid::new_v4().to_string();
    let mut tx = app.store.begin().await?;
    let cur = Store::task_in(&mut *tx, &r.id).await?.unwrap_or_default();
    if cur != Task::None {
        return Err(busy());
    }
    if Store::backup_running_in(&mut *tx, &r.id).await? {
        return Err(backing_up());
    }
    Store::set_task(&mut tx, &r.id, Task::Rebooting, None).await?;
    Store::clear_fault(&mut tx, &r.id).await?;
    let restart = v1::intent::Kind::Restart(v1::Restart {});
    enqueue(app, &mut tx, &r.id, &intent_id, restart).await?;
    tx.commit().await?;
    app.wake_outbox();
    Ok(())
}

/// Deletes an instance: the agent stops and removes its database, then the controller removes
/// the agent (see the `delete` workflow's steps in `bus.rs`).
pub async fn delete(app: &App, r: &InstanceRow) -> Result<(), ApiError> {
    let id = r.id.clone();
    let building =
        || ApiError::unprocessable(format!("Instance {id} is not ready. (Status is BUILD)."));
    if r.task == Task::Building {
        return Err(building());
    }
    if r.task == Task::Deleting {
        return Ok(());
    }
    if app.store.has_replicas(&r.id).await? {
        return Err(ApiError::forbidden(
            "Detach replicas before deleting replica source.",
        ));
    }
    let intent_id = uuid::Uuid::new_v4().to_string();
    let mut tx = app.store.begin().await?;
    // Re-check inside the write lock.
    let cur = Store::task_in(&mut *tx, &id).await?.unwrap_or_default();
    if cur == Task::Building {
        return Err(building());
    }
    if let Some(workflow) = Store::owner_in(&mut *tx, &id).await? {
        let instance = id.clone();
        return Err(store::Owned { instance, workflow }.into());
    }
    Store::set_task(&mut tx, &id, Task::Deleting, None).await?;
    let delete = v1::intent::Kind::Delete(v1::Delete {});
    enqueue(app, &mut tx, &id, &intent_id, delete).await?;
    tx.commit().await?;
    crate::failpoint::hit("delete", "requested");
    app.wake_outbox();
    Ok(())
}
