//! The replication API: replica creation (placed here, built by the `replica_build` workflow),
//! detach, and the actions that start the switchover (`promote_to_replica_source`) and
//! failover (`eject_replica_source`) workflows (`crate::workflow::replication`).
//!
//! The source's replication user is created once, on the source, written to its replication
//! stream so every replica has it too and a promoted replica serves the others with the same
//! credentials. Its password is kept sealed to the controller's own key and sealed again to
//! each agent.

use std::sync::Arc;

use coffer_proto::seal;
use serde_json::{json, Value};

use super::{ok, ApiError, ApiResult, Caller};
use crate::ops::datastore;
use crate::status::task;
use crate::store::{InstanceRow, Store};
use crate::workflow::replication::{
    ensure_repl_user, reload, start_detach, start_failover, start_switchover,
};
use crate::App;

/// What a replica create asked for (beyond `replica_of`).
pub(super) struct ReplicaReq {
    pub name: String,
    pub source: String,
    pub count: u32,
    pub configuration: Option<String>,
}

fn busy(r: &InstanceRow, what: &str) -> ApiError {
    ApiError::unprocessable(format!(
        "Instance {} is not currently available for {what} (task {}, status {}).",
        r.id, r.task, r.service_status
    ))
}

fn ready(app: &App, r: &InstanceRow) -> bool {
    r.task == task::NONE && app.fresh(&r.id) && r.service_status == "running"
}

/// `POST /instances` with `replica_of`.
pub(super) async fn create(app: Arc<App>, c: &Caller, req: ReplicaReq) -> ApiResult {
    let source = super::instances::find(&app, c, &req.source).await?;
    if source.replica_of.is_some() {
        return Err(ApiError::unauthorized(format!(
            "Cannot create a replica of a replica ({} replicates from {}).",
            source.id,
            source.replica_of.as_deref().unwrap_or_default()
        )));
    }
    let max = app.cfg.replication.max_replicas;
    if req.count == 0 || req.count > max {
        return Err(ApiError::bad_request(format!(
            "replica_count must be between 1 and {max}."
        )));
    }
    if app.cfg.backup.is_none() {
        return Err(ApiError::unprocessable(
            "Replicas are built from a snapshot: configure backup storage ([backup]) first.",
        ));
    }
    if !ready(&app, &source) {
        return Err(busy(&source, "creating replicas"));
    }
    let version = app
        .store
        .version(&source.datastore_version_id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("the source's datastore version is gone"))?;
    let flavor = app
        .store
        .flavor(&source.flavor_id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("the source's flavor is gone"))?;
    let configuration = req
        .configuration
        .clone()
        .or(source.configuration_id.clone());
    // The group must be the project's and its values must still check (the build applies it).
    match &configuration {
        Some(g) => match app.store.configuration(g).await? {
            Some(cfg) if cfg.project_id == c.project => {
                crate::ops::configurations::check_values(
                    &app,
                    &cfg.datastore_version_id,
                    &cfg.values,
                )
                .await?
            }
            _ => {
                return Err(ApiError::not_found(format!(
                    "Configuration group {g} cannot be found."
                )))
            }
        },
        None => vec![],
    };
    // Created before the snapshot, so every replica restores it.
    ensure_repl_user(&app, &source).await?;
    let strategy = match source.repl_strategy.clone() {
        Some(s) => s,
        None => datastore(&app, &source)
            .await?
            .replication_strategy(&app.cfg.replication.strategy),
    };

    if app.provisioner.key_at_enrolment() {
        return Err(ApiError::not_implemented(
            "Replicas of VM-backed instances are not supported by this Coffer release yet; \
             create them with the process provisioner or enrol the replica hosts.",
        ));
    }
    // Place the replicas (their prepare waits for the snapshot).
    let mut ids = Vec::new();
    for i in 0..req.count {
        let id = uuid::Uuid::new_v4().to_string();
        let name = if req.count > 1 {
            format!("{}-{}", req.name, i + 1)
        } else {
            req.name.clone()
        };
        let (placed, nats_user) = super::instances::place(&app, &id, &version, None).await?;
        let ts = crate::store::now();
        let stored: Result<(), ApiError> = async {
            let mut tx = app.store.begin().await?;
            super::quotas::check(&mut tx, &c.project, flavor.ram, source.volume_size).await?;
            let server_id = Store::next_server_id(&mut tx).await?;
            let row = InstanceRow {
                id: id.clone(),
                project_id: c.project.clone(),
                name,
                flavor_id: flavor.id.clone(),
                datastore_version_id: version.id.clone(),
                volume_size: source.volume_size,
                task: task::BUILDING.into(),
                task_started: ts.clone(),
                service_status: "new".into(),
                fault: None,
                fault_at: None,
                server_id,
                host: Some(placed.host.clone()),
                port: Some(placed.port as i64),
                created: ts.clone(),
                updated: ts,
                deleted: false,
                agent_version: String::new(),
                capabilities: String::new(),
                agent_public_key: seal::to_hex(&placed.public_key),
                agent_nats_user: nats_user,
                configuration_id: configuration.clone(),
                replica_of: Some(source.id.clone()),
                repl_user: None,
                repl_secret: None,
                repl_strategy: Some(strategy.clone()),
                ejected: false,
                placement: "provisioner".into(),
            };
            Store::insert_instance(&mut tx, &row).await?;
            tx.commit().await?;
            Ok(())
        }
        .await;
        if let Err(e) = stored {
            let _ = app.provisioner.destroy(&id).await;
            return Err(e);
        }
        super::instances::start_agent(&app, &id).await?;
        ids.push(id);
    }
    // The build (snapshot, prepares, cleanup) is a workflow: it survives a controller restart.
    crate::workflow::replication::start_replica_build(&app, &source, &ids, configuration).await?;
    let last = app
        .store
        .instance(ids.last().expect("at least one replica"))
        .await?
        .ok_or_else(|| anyhow::anyhow!("replica vanished"))?;
    ok(json!({"instance": super::instances::render(&app, c, &last, true, false).await?}))
}

/// `PUT /instances/{id}` with `replica_of: null`: a standalone, writable instance.
pub(super) async fn detach(app: &Arc<App>, r: &InstanceRow) -> Result<(), ApiError> {
    if r.replica_of.is_none() {
        return Err(ApiError::bad_request(format!(
            "Instance {} is not a replica.",
            r.id
        )));
    }
    if !ready(app, r) {
        return Err(busy(r, "detaching"));
    }
    // A workflow: a controller that dies in the middle finishes it when it starts again.
    start_detach(app, r).await.map(|_| ())
}

/// `promote_to_replica_source` on a replica: a planned switchover without losing a commit.
pub(super) async fn promote(app: Arc<App>, candidate: &InstanceRow) -> ApiResult {
    let Some(source_id) = candidate.replica_of.clone() else {
        return Err(ApiError::bad_request(format!(
            "Instance {} is not a replica.",
            candidate.id
        )));
    };
    let source = reload(&app, &source_id).await?;
    let mut members = vec![source.clone()];
    members.extend(app.store.replicas_of(&source.id).await?);
    if let Some(r) = members.iter().find(|m| !ready(&app, m)) {
        return Err(busy(r, "a switchover"));
    }
    let ids: Vec<String> = members.iter().map(|m| m.id.clone()).collect();
    start_switchover(&app, &source, &candidate.id, ids).await?;
    super::accepted()
}

/// `eject_replica_source` on a source whose heartbeat has expired: elect the most advanced
/// replica and make it the source.
pub(super) async fn eject(app: Arc<App>, source: &InstanceRow) -> ApiResult {
    let replicas = app.store.replicas_of(&source.id).await?;
    if replicas.is_empty() {
        return Err(ApiError::bad_request(format!(
            "Instance {} is not a replica source.",
            source.id
        )));
    }
    if app.fresh(&source.id) {
        return Err(ApiError::bad_request(format!(
            "Replica source {} cannot be ejected as it has a current heartbeat.",
            source.id
        )));
    }
    if matches!(source.task.as_str(), task::EJECTING | task::PROMOTING) {
        return Err(busy(source, "an eject"));
    }
    start_failover(&app, source, &replicas).await?;
    super::accepted()
}

/// The replication view of an instance for `GET /instances/{id}`.
pub(super) async fn view(
    app: &App,
    c: &Caller,
    r: &InstanceRow,
    j: &mut Value,
) -> Result<(), ApiError> {
    if let Some(s) = &r.replica_of {
        j["replica_of"] = json!({"id": s, "links": c.links("instances", s)});
    }
    let replicas = app.store.replicas_of(&r.id).await?;
    if !replicas.is_empty() {
        j["replicas"] = Value::Array(
            replicas
                .iter()
                .map(|x| json!({"id": x.id, "links": c.links("instances", &x.id)}))
                .collect(),
        );
    }
    let (mine, source_pos) = {
        let live = app.live.lock().unwrap();
        let mine = live.get(&r.id).and_then(|l| l.hb.replication.clone());
        let source_pos = r
            .replica_of
            .as_ref()
            .and_then(|s| live.get(s))
            .and_then(|l| l.hb.replication.as_ref().map(|x| x.position.clone()));
        (mine, source_pos)
    };
    if let Some(m) = mine {
        let applied = if m.role == "replica" {
            m.applied_position.clone()
        } else {
            m.position.clone()
        };
        let mut v = json!({
            "role": m.role,
            "position": applied,
            "read_only": m.read_only,
        });
        if m.role == "replica" {
            v["io_running"] = json!(m.io_running);
            v["sql_running"] = json!(m.sql_running);
            v["lag_seconds"] = if m.seconds_behind >= 0 {
                json!(m.seconds_behind)
            } else {
                Value::Null
            };
            let ds = datastore(app, r).await?;
            // In the datastore's own unit (`lag_transactions`, `lag_bytes`).
            let lag_key = format!("lag_{}", ds.lag_unit());
            v[lag_key.as_str()] = match &source_pos {
                Some(p) => json!(ds.position_behind(&m.applied_position, p)),
                None => Value::Null,
            };
            v["received_position"] = json!(m.received_position);
            if !m.last_error.is_empty() {
                v["last_error"] = json!(m.last_error);
            }
        }
        j["replication"] = v;
    }
    Ok(())
}
