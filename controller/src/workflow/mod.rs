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
pub mod drill;
pub mod replicas;
pub mod replication;

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::error::ApiError;
use crate::status::Task;
use crate::store::{Owned, Store, Tx};
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
    Drill(drill::Drill),
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
    /// A field of the stored state: `kind` (`switchover`, ...) or `step` (`fence`, ...).
    fn stored(&self, field: &str) -> String {
        let state = serde_json::to_value(self).unwrap_or_default();
        state[field].as_str().unwrap_or_default().to_string()
    }

    /// Whether the members are free before the workflow ends: a replica build's replicas
    /// serve (and may be switched over or deleted) while the snapshot is cleaned up.
    fn members_released(&self) -> bool {
        matches!(self, Flow::ReplicaBuild(b) if b.step == replication::BuildStep::Cleanup)
    }

    fn done(&self) -> bool {
        self.stored("step") == "done"
    }

    /// Runs the current step and moves to the next; `cancel` asks it to stop where it safely
    /// can.
    async fn step(&mut self, app: &Arc<App>, cancel: bool) -> Progress {
        match self {
            Flow::Drill(d) => return d.step(app, cancel).await,
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
    async fn release(&self, tx: &mut Tx) -> anyhow::Result<()> {
        match self {
            Flow::Switchover(s) => s.release(tx).await,
            Flow::Failover(f) => f.release(tx).await,
            Flow::ReplicaBuild(b) => b.release(tx).await,
            Flow::Detach(d) => d.release(tx).await,
            Flow::VmBuild(b) => b.release(tx).await,
            Flow::Drill(_) => Ok(()),
        }
    }
}

/// Starts a workflow owning `members`, whose tasks become `task` (when given) in the same
/// transaction; 422 when one of them belongs to a running workflow already. Its id is `id` when
/// the caller chose it (a step derives ids from it), a new one otherwise.
pub async fn start(
    app: &Arc<App>,
    id: Option<&str>,
    flow: Flow,
    members: &[String],
    task: Option<Task>,
) -> Result<String, ApiError> {
    let id = id.map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_string);
    let state = serde_json::to_string(&flow).map_err(anyhow::Error::from)?;
    let kind = flow.stored("kind");
    let mut tx = app.store.begin().await?;
    if let Err(e) = Store::insert_workflow(&mut tx, &id, &kind, &state, members).await {
        return Err(match e.downcast::<Owned>() {
            Ok(o) => o.into(),
            Err(e) => e.into(),
        });
    }
    if let Some(task) = task {
        use Task::{Building, Deleting, Detaching, Ejecting, Promoting, Rebooting};
        // Again under the write lock: a delete, a restart or another operation that started
        // since the caller looked wins, and this workflow is refused.
        for m in members {
            let now = Store::task_in(&mut *tx, m).await?.unwrap_or_default();
            if matches!(
                now,
                Building | Rebooting | Deleting | Promoting | Ejecting | Detaching
            ) {
                return Err(crate::ops::busy(m, now));
            }
        }
        for m in members {
            Store::set_task(&mut tx, m, task, None).await?;
        }
    }
    tx.commit().await?;
    info!(workflow = %id, kind, members = ?members, "workflow started");
    app.driving.lock().unwrap().insert(id.clone());
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
    let live = app.store.live_instances().await?;
    // Another controller's create in progress is its own; one whose controller is gone is
    // undone here.
    let others: Vec<String> = app
        .store
        .live_controllers()
        .await?
        .into_iter()
        .filter(|c| *c != app.id)
        .collect();
    let ours = |r: &&crate::store::InstanceRow| {
        r.placing_by
            .as_ref()
            .is_none_or(|c| *c == app.id || !others.contains(c))
    };
    for r in live
        .iter()
        .filter(|r| !r.has_agent() && r.placement != crate::status::PlacedBy::Enrolled)
        .filter(ours)
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
        } else if r.task == Task::Building && app.store.workflow_owning(&r.id).await?.is_none() {
            warn!(instance = %r.id, "a VM build was cut short by a controller restart");
            let mut tx = app.store.begin().await?;
            Store::set_task(
                &mut tx,
                &r.id,
                Task::BuildingError,
                Some(
                    "the controller restarted while this VM was building, before its users' \
                     passwords were sealed to it; delete it and create it again",
                ),
            )
            .await?;
            tx.commit().await?;
        }
    }
    // A placement with no row may be another controller's create in progress: only a controller
    // alone on the store removes such placements.
    if !others.is_empty() {
        return Ok(());
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

/// Drives every running workflow this controller may take: its own (from a previous run),
/// unclaimed ones, and those whose controller's claim lapsed ([`crate::leases`]).
pub async fn adopt(app: &Arc<App>) {
    let ids = match app.store.workflows_to_adopt(&app.id).await {
        Ok(ids) => ids,
        Err(e) => {
            warn!(error = %format!("{e:#}"), "listing workflows to adopt failed");
            return;
        }
    };
    for id in ids {
        if app.driving.lock().unwrap().insert(id.clone()) {
            info!(workflow = %id, "resuming workflow");
            tokio::spawn(drive(app.clone(), id));
        }
    }
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
///
/// Boxed: a step may start another workflow (a drill creates a VM), whose driver is this
/// function again; the box names a `Send` future instead of one that contains itself.
fn drive(
    app: Arc<App>,
    id: String,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    Box::pin(async move {
        drive_claimed(&app, &id).await;
        app.driving.lock().unwrap().remove(&id);
    })
}

async fn drive_claimed(app: &Arc<App>, id: &str) {
    let backoff =
        || coffer_common::retry::backoff(Duration::from_millis(200), Duration::from_secs(5));
    let mut delay = backoff();
    loop {
        let row = match app.store.workflow(id).await {
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
        // Only while this controller holds the workflow's claim (renewed at every step).
        match app
            .store
            .claim_workflow(id, &app.id, crate::leases::WORKFLOW_CLAIM_MS)
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                info!(workflow = %id, "another controller drives this workflow");
                return;
            }
            Err(e) => {
                warn!(workflow = %id, error = %format!("{e:#}"), "claiming the workflow failed; retrying");
                tokio::time::sleep(coffer_common::retry::next(&mut delay)).await;
                continue;
            }
        }
        let mut flow: Flow = match serde_json::from_str(&row.state) {
            Ok(f) => f,
            Err(e) => {
                warn!(workflow = %id, error = %e, "unreadable workflow state; left for an operator");
                return;
            }
        };
        let (kind, step) = (flow.stored("kind"), flow.stored("step"));
        // Made before the step looks: an event handled while it looks still wakes it.
        let woken = app.workflow_wake.notified();
        crate::failpoint::slow_step().await;
        if flow.step(app, row.cancel).await == Progress::Wait {
            let _ = tokio::time::timeout(Duration::from_secs(2), woken).await;
            continue;
        }
        crate::failpoint::hit(&kind, &step);
        app.telemetry.workflow_step(&kind, &step);
        let saved = async {
            let state = serde_json::to_string(&flow)?;
            if flow.done() || flow.members_released() {
                let mut tx = app.store.begin().await?;
                flow.release(&mut tx).await?;
                Store::free_members(&mut tx, id, &app.id, &state, flow.done()).await?;
                tx.commit().await?;
            } else {
                app.store.save_workflow(id, &app.id, &state).await?;
            }
            anyhow::Ok(())
        }
        .await;
        match saved {
            Ok(()) if flow.done() => {
                info!(workflow = %id, kind, "workflow ended");
                return;
            }
            Ok(()) => delay = backoff(),
            Err(e) if e.is::<crate::store::ClaimLost>() => {
                warn!(workflow = %id, "another controller took this workflow over; its step's result is left to it");
                return;
            }
            Err(e) => {
                warn!(workflow = %id, error = %format!("{e:#}"), "recording the workflow's step failed; retrying");
                tokio::time::sleep(coffer_common::retry::next(&mut delay)).await;
            }
        }
    }
}
