//! Durable workflows: operations of several steps (a switchover, a failover) kept in the store
//! step by step, so a controller that stops in the middle resumes them when it starts again.
//!
//! A workflow is a [`Flow`]: plain data naming its step. [`drive`] loops read → step → write:
//! each step acts (calls to agents, store writes) and returns the next state, which is written
//! before the next step runs. Every step is idempotent, so a step interrupted after it acted but
//! before its result was written simply runs again on resume. A workflow owns its member
//! instances while it runs (`workflow_members`): a second operation on one of them is refused
//! (422), and only the workflow itself releases their tasks, and lifts the fences it set, when it
//! ends — completed, or rolled back to a safe state with a fault that says what happened.
//!
//! A test hook, `COFFER_TEST_FAILPOINT=<kind>:<step>`, aborts the controller right after that
//! step acted and before its result is written: the worst moment to die. The single-intent
//! operations (create, delete, backup) name their steps the same way (`create:reserved`,
//! `create:placed`, `delete:requested`, `delete:destroyed`, `backup:requested`, `backup:done`).

pub mod create;
pub mod replicas;
pub mod replication;

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::error::ApiError;
use crate::store::{Owned, Store};
use crate::App;

/// Every kind of workflow, with its state.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Flow {
    Switchover(replication::Switchover),
    Failover(replication::Failover),
    ReplicaBuild(replication::ReplicaBuild),
    Detach(replication::Detach),
    VmBuild(create::VmBuild),
}

/// What a step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Moved on (the new state is written before the next step).
    Moved,
    /// Waits on an agent: nothing to write; look again after the next agent event (or a
    /// short requeue).
    Wait,
}

impl Flow {
    pub fn kind(&self) -> &'static str {
        match self {
            Flow::Switchover(_) => "switchover",
            Flow::Failover(_) => "failover",
            Flow::ReplicaBuild(_) => "replica_build",
            Flow::Detach(_) => "detach",
            Flow::VmBuild(_) => "vm_build",
        }
    }

    fn step_name(&self) -> &'static str {
        match self {
            Flow::Switchover(s) => s.step.name(),
            Flow::Failover(f) => f.step.name(),
            Flow::ReplicaBuild(b) => b.step.name(),
            Flow::Detach(d) => d.step.name(),
            Flow::VmBuild(b) => b.step.name(),
        }
    }

    /// Whether the members are free before the workflow ends: a replica build's replicas
    /// serve (and may be switched over or deleted) while the snapshot is cleaned up.
    fn members_released(&self) -> bool {
        match self {
            Flow::Switchover(_) | Flow::Failover(_) | Flow::Detach(_) | Flow::VmBuild(_) => false,
            Flow::ReplicaBuild(b) => b.step == replication::BuildStep::Cleanup,
        }
    }

    fn done(&self) -> bool {
        match self {
            Flow::Switchover(s) => s.step == replication::SwitchoverStep::Done,
            Flow::Failover(f) => f.step == replication::FailoverStep::Done,
            Flow::ReplicaBuild(b) => b.step == replication::BuildStep::Done,
            Flow::Detach(d) => d.step == replication::DetachStep::Done,
            Flow::VmBuild(b) => b.step == create::VmBuildStep::Done,
        }
    }

    /// Runs the current step and moves to the next; `cancel` asks it to stop where it safely
    /// can.
    async fn step(&mut self, app: &App, cancel: bool) -> Progress {
        match self {
            Flow::Switchover(s) => s.step(app, cancel).await,
            Flow::Failover(f) => f.step(app, cancel).await,
            Flow::ReplicaBuild(b) => return b.step(app, cancel).await,
            Flow::VmBuild(b) => return b.step(app, cancel).await,
            Flow::Detach(d) => d.step(app, cancel).await,
        }
        Progress::Moved
    }

    /// The last step: releases the members (tasks, faults) inside the transaction that ends the
    /// workflow.
    async fn release(
        &self,
        app: &App,
        tx: &mut sqlx::Transaction<'static, sqlx::Sqlite>,
    ) -> anyhow::Result<()> {
        match self {
            Flow::Switchover(s) => s.release(tx).await,
            Flow::Failover(f) => f.release(app, tx).await,
            Flow::ReplicaBuild(b) => b.release(tx).await,
            Flow::Detach(d) => d.release(tx).await,
            Flow::VmBuild(b) => b.release(tx).await,
        }
    }
}

/// Starts a workflow owning `members`, whose tasks become `task` (when given) in the same
/// transaction; 422 when one of them belongs to a running workflow already.
pub async fn start(
    app: &Arc<App>,
    flow: Flow,
    members: &[String],
    task: Option<crate::status::Task>,
) -> Result<String, ApiError> {
    start_as(app, &uuid::Uuid::new_v4().to_string(), flow, members, task).await
}

/// [`start`] with the workflow's id chosen by the caller (a step derives ids from it).
pub async fn start_as(
    app: &Arc<App>,
    id: &str,
    flow: Flow,
    members: &[String],
    task: Option<crate::status::Task>,
) -> Result<String, ApiError> {
    let id = id.to_string();
    let state = serde_json::to_string(&flow).map_err(anyhow::Error::from)?;
    let mut tx = app.store.begin().await?;
    if let Err(e) = Store::insert_workflow(&mut tx, &id, flow.kind(), &state, members).await {
        return Err(match e.downcast::<Owned>() {
            Ok(o) => o.into(),
            Err(e) => e.into(),
        });
    }
    if let Some(task) = task {
        // Again under the write lock: a delete, a restart or another operation that started
        // since the caller looked wins, and this workflow is refused.
        use crate::status::task::*;
        for m in members {
            let now = Store::task_in(&mut *tx, m).await?.unwrap_or_default();
            let in_flight = [
                BUILDING, REBOOTING, DELETING, PROMOTING, EJECTING, DETACHING,
            ];
            if in_flight.contains(&now) {
                return Err(ApiError::unprocessable(format!(
                    "Instance {m} is not currently available for an action to be performed (task status was {}).",
                    now.as_str().to_uppercase()
                )));
            }
        }
        for m in members {
            Store::set_task(&mut tx, m, task, None).await?;
        }
    }
    tx.commit().await?;
    info!(workflow = %id, kind = flow.kind(), members = ?members, "workflow started");
    tokio::spawn(drive(app.clone(), id.clone()));
    Ok(id)
}

/// Undoes the creates a previous controller died in the middle of. A create the provisioner
/// places answers only once its row holds the agent's key, so a row without one was never
/// answered: its placement goes, and the row with its quota reservation. A VM's build is a
/// workflow that resumes; a VM row that no workflow owns (left by an older controller, which
/// kept the secrets in memory) ends in error, saying so. A placement with
/// no live instance (a replica placed before its row was stored, a delete cut short) goes.
pub async fn undo_unfinished_creates(app: &Arc<App>) -> anyhow::Result<()> {
    use crate::status::task;
    let live = app.store.live_instances().await?;
    for r in live
        .iter()
        .filter(|r| !r.has_agent() && r.placement != crate::status::PlacedBy::Enrolled)
    {
        if !app.provisioner.key_at_enrolment() {
            warn!(instance = %r.id, "undoing a create the previous controller never answered");
            match app.provisioner.destroy(&r.id).await {
                Ok(()) => app.store.forget_instance(&r.id).await?,
                // Kept (and counted in the quota) until the next start removes it.
                Err(e) => {
                    warn!(instance = %r.id, error = %format!("{e:#}"), "could not remove its placement")
                }
            }
        } else if r.task == task::BUILDING && app.store.workflow_owning(&r.id).await?.is_none() {
            warn!(instance = %r.id, "a VM build was cut short by a controller restart");
            let mut tx = app.store.begin().await?;
            Store::set_task(
                &mut tx,
                &r.id,
                task::BUILD_ERROR,
                Some(
                    "the controller restarted while this VM was building, before its users' \
                     passwords were sealed to it; delete it and create it again",
                ),
            )
            .await?;
            tx.commit().await?;
        }
    }
    let live: std::collections::HashSet<&str> = live.iter().map(|r| r.id.as_str()).collect();
    for id in app.provisioner.placed() {
        if !live.contains(id.as_str()) {
            warn!(instance = %id, "removing a placement that has no instance");
            if let Err(e) = app.provisioner.destroy(&id).await {
                warn!(instance = %id, error = %format!("{e:#}"), "could not remove the placement");
            }
        }
    }
    Ok(())
}

/// Resumes every workflow a previous controller left running.
pub async fn resume_all(app: &Arc<App>) -> anyhow::Result<()> {
    for w in app.store.running_workflows().await? {
        info!(workflow = %w.id, kind = %w.kind, "resuming workflow");
        tokio::spawn(drive(app.clone(), w.id));
    }
    Ok(())
}

/// An id derived from a workflow's id and a name (a snapshot, an intent): a step that runs
/// again finds what it made the first time instead of making it twice.
pub fn derived_id(workflow: &str, what: &str) -> String {
    let d = openssl::sha::sha256(format!("{workflow}/{what}").as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&d[..16]);
    uuid::Builder::from_random_bytes(b).into_uuid().to_string()
}

/// Runs a workflow to its end. Store errors are retried (the step runs again: it is
/// idempotent); the workflow's own failures are states it handles.
async fn drive(app: Arc<App>, id: String) {
    let backoff =
        || coffer_common::retry::backoff(Duration::from_millis(200), Duration::from_secs(5));
    let mut delay = backoff();
    loop {
        let row = match app.store.workflow(&id).await {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                warn!(workflow = %id, error = %format!("{e:#}"), "reading the workflow failed; retrying");
                tokio::time::sleep(coffer_common::retry::next(&mut delay)).await;
                continue;
            }
        };
        if row.done {
            return;
        }
        let mut flow: Flow = match serde_json::from_str(&row.state) {
            Ok(f) => f,
            Err(e) => {
                warn!(workflow = %id, error = %e, "unreadable workflow state; left for an operator");
                return;
            }
        };
        let step = flow.step_name();
        // Made before the step looks: an event handled while it looks still wakes it.
        let woken = app.workflow_wake.notified();
        if flow.step(&app, row.cancel).await == Progress::Wait {
            let _ = tokio::time::timeout(Duration::from_secs(2), woken).await;
            continue;
        }
        crate::failpoint::hit(flow.kind(), step);
        let saved = async {
            let state = serde_json::to_string(&flow)?;
            if flow.done() {
                let mut tx = app.store.begin().await?;
                flow.release(&app, &mut tx).await?;
                Store::finish_workflow(&mut tx, &id, &state).await?;
                tx.commit().await?;
            } else if flow.members_released() {
                let mut tx = app.store.begin().await?;
                flow.release(&app, &mut tx).await?;
                Store::release_members(&mut tx, &id, &state).await?;
                tx.commit().await?;
            } else {
                app.store.save_workflow(&id, &state).await?;
            }
            anyhow::Ok(())
        }
        .await;
        match saved {
            Ok(()) if flow.done() => {
                info!(workflow = %id, kind = flow.kind(), "workflow ended");
                return;
            }
            Ok(()) => delay = backoff(),
            Err(e) => {
                warn!(workflow = %id, error = %format!("{e:#}"), "recording the workflow's step failed; retrying");
                tokio::time::sleep(coffer_common::retry::next(&mut delay)).await;
            }
        }
    }
}
