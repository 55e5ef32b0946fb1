//! Replication requests: replica creation (placed here, built by the `replica_build` workflow),
//! detach, and the actions that start the switchover (`promote_to_replica_source`) and failover
//! (`eject_replica_source`) workflows (`super::replication`), each after the checks its request
//! must pass.
//!
//! The source's replication user is created once, on the source, written to its replication
//! stream so every replica has it too and a promoted replica serves the others with the same
//! credentials. Its password is kept sealed to the controller's own key and sealed again to
//! each agent.

use std::sync::Arc;

use coffer_proto::seal;

use super::replication::{
    ensure_repl_user, reload, start_detach, start_failover, start_switchover,
};
use crate::error::ApiError;
use crate::ops::{self, datastore, Caller};
use crate::status::Task;
use crate::store::{InstanceRow, NewRow, Store};
use crate::App;

/// What a replica create asked for (beyond `replica_of`).
pub struct ReplicaReq {
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
    r.task == Task::None && app.fresh(&r.id) && r.service_status == "running"
}

/// `POST /instances` with `replica_of`.
/// Returns the id of the last replica placed.
pub async fn create(app: Arc<App>, c: &Caller, req: ReplicaReq) -> Result<String, ApiError> {
    let source = ops::find_instance(&app, c, &req.source).await?;
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
    if let Some(g) = &configuration {
        match app.store.configuration(g).await? {
            Some(cfg) if cfg.project_id == c.project => {
                let version = &cfg.datastore_version_id;
                crate::ops::configurations::check_values(&app, version, &cfg.values).await?;
            }
            _ => {
                return Err(ApiError::not_found(format!(
                    "Configuration group {g} cannot be found."
                )))
            }
        }
    }
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
        let (placed, nats_user) = ops::instances::place(&app, &id, &version, None, false).await?;
        let stored: Result<(), ApiError> = async {
            let mut tx = app.store.begin().await?;
            ops::quotas::check(&mut tx, &c.project, flavor.ram, source.volume_size).await?;
            let server_id = Store::next_server_id(&mut tx).await?;
            let row = InstanceRow {
                host: Some(placed.host.clone()),
                port: Some(placed.port as i64),
                agent_public_key: seal::to_hex(&placed.public_key),
                agent_nats_user: nats_user,
                configuration_id: configuration.clone(),
                replica_of: Some(source.id.clone()),
                repl_strategy: Some(strategy.clone()),
                ..InstanceRow::building(NewRow {
                    id: &id,
                    project: &c.project,
                    name: &name,
                    flavor_id: &flavor.id,
                    version_id: &version.id,
                    volume_size: source.volume_size,
                    server_id,
                })
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
        ops::instances::start_agent(&app, &id).await?;
        ids.push(id);
    }
    // The build (snapshot, prepares, cleanup) is a workflow: it survives a controller restart.
    crate::workflow::replication::start_replica_build(&app, &source, &ids, configuration).await?;
    Ok(ids.pop().expect("at least one replica"))
}

/// `PUT /instances/{id}` with `replica_of: null`: a standalone, writable instance.
pub async fn detach(app: &Arc<App>, r: &InstanceRow) -> Result<(), ApiError> {
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
pub async fn promote(app: Arc<App>, candidate: &InstanceRow) -> Result<(), ApiError> {
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
    ops::require(
        candidate,
        coffer_proto::CAP_CATCH_UP_DETACH,
        "cannot be promoted by this controller",
    )?;
    let ids: Vec<String> = members.iter().map(|m| m.id.clone()).collect();
    start_switchover(&app, &source, &candidate.id, ids).await?;
    Ok(())
}

/// `eject_replica_source` on a source whose heartbeat has expired: elect the most advanced
/// replica and make it the source.
pub async fn eject(app: Arc<App>, source: &InstanceRow) -> Result<(), ApiError> {
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
    if matches!(source.task, Task::Ejecting | Task::Promoting) {
        return Err(busy(source, "an eject"));
    }
    start_failover(&app, source, &replicas).await?;
    Ok(())
}
