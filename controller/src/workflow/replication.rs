//! Replication workflows: switchover (`promote_to_replica_source`) and failover
//! (`eject_replica_source`, and the automatic one), plus what the replication API shares with
//! them (the replication user, re-pointing a replica).
//!
//! The source's replication user is created once, on the source, written to its replication
//! stream so every replica has it too and a promoted replica serves the others with the same
//! credentials. Its password is kept sealed to the controller's own key and sealed again to
//! each agent.

use std::sync::Arc;

use coffer_proto::seal;
use coffer_proto::v1;
use coffer_proto::Datastore;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::Flow;
use crate::agents::{agent_key, call};
use crate::error::ApiError;
use crate::ops::datastore;
use crate::status::{serde_name, BackupStatus, Task};
use crate::store::{InstanceRow, Store, Tx};
use crate::App;

pub async fn reload(app: &App, id: &str) -> Result<InstanceRow, ApiError> {
    app.store
        .instance(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("Instance {id} is gone.")))
}

/// Sends a call to the agent of instance `id` (which must still exist).
async fn call_at(app: &App, id: &str, kind: v1::call::Kind) -> Result<v1::CallReply, ApiError> {
    Ok(call(app, &reload(app, id).await?, kind).await?.1)
}

/// Sets the source `id` read-only (its fence) or writable again.
async fn fence_source(app: &App, id: &str, read_only: bool) -> Result<v1::CallReply, ApiError> {
    let set = v1::SetReadOnly {
        read_only,
        kill_connections: false,
    };
    call_at(app, id, v1::call::Kind::SetReadOnly(set)).await
}

/// The source's replication user and password, created on the source the first time.
pub async fn ensure_repl_user(
    app: &App,
    source: &InstanceRow,
) -> Result<(String, String), ApiError> {
    if let (Some(u), Some(secret)) = (&source.repl_user, &source.repl_secret) {
        let context = seal::kept_replication_context(&source.id);
        let bytes = crate::agents::open_kept(app, secret, &context).ok_or_else(|| {
            anyhow::anyhow!(
                "the kept replication password of {} does not open",
                source.id
            )
        })?;
        return Ok((u.clone(), String::from_utf8_lossy(&bytes).into_owned()));
    }
    let user = format!("repl_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let password = uuid::Uuid::new_v4().simple().to_string();
    call(
        app,
        source,
        v1::call::Kind::CreateReplicationUser(v1::CreateReplicationUser {
            user: user.clone(),
            password_sealed: sealed_for(source, &password)?,
        }),
    )
    .await?;
    let strategy = datastore(app, source)
        .await?
        .replication_strategy(&app.cfg.replication.strategy);
    keep_repl_user(app, &source.id, &user, &password, &strategy).await?;
    Ok((user, password))
}

async fn keep_repl_user(
    app: &App,
    source: &str,
    user: &str,
    password: &str,
    strategy: &str,
) -> Result<(), ApiError> {
    let kept = seal::seal(
        &app.reply_public_key,
        &seal::kept_replication_context(source),
        password.as_bytes(),
    )
    .map_err(|e| anyhow::anyhow!("sealing: {e}"))?;
    app.store
        .set_replication_user(source, user, &seal::to_hex(&kept), strategy)
        .await?;
    Ok(())
}

/// The replication password sealed for `r`'s agent.
fn sealed_for(r: &InstanceRow, password: &str) -> Result<Vec<u8>, ApiError> {
    let context = seal::replication_password_context(&r.id);
    let sealed = seal::seal(&agent_key(r)?, &context, password.as_bytes());
    Ok(sealed.map_err(|e| anyhow::anyhow!("sealing: {e}"))?)
}

/// How `replica` reaches `source`, its password sealed for `replica`'s agent.
pub fn replica_of(
    source: &InstanceRow,
    replica: &InstanceRow,
    user: &str,
    password: &str,
    strategy: &str,
) -> Result<v1::ReplicaOf, ApiError> {
    Ok(v1::ReplicaOf {
        host: source.host.clone().unwrap_or_default(),
        port: source.port.unwrap_or_default() as u32,
        user: user.to_string(),
        password_sealed: sealed_for(replica, password)?,
        strategy: strategy.to_string(),
        ..Default::default()
    })
}

/// The replica `new` stops replicating (`detach`) and becomes the source in `old`'s place: the
/// replication user's kept password moves to it. The handover (`position`: what `new` has of
/// `old`'s stream; `at_ms`: a time before the promotion) joins their archives.
async fn take_over(
    app: &App,
    old: &str,
    new: &str,
    detach: v1::DetachReplica,
    position: &str,
    at_ms: i64,
) -> Result<(), ApiError> {
    let old = reload(app, old).await?;
    let (user, password) = ensure_repl_user(app, &old).await?;
    let new = reload(app, new).await?;
    call(app, &new, v1::call::Kind::DetachReplica(detach)).await?;
    if !position.is_empty() {
        let h = crate::store::HandoverRow {
            instance_id: new.id.clone(),
            from_instance: old.id.clone(),
            position: position.to_string(),
            at_ms: if at_ms > 0 {
                at_ms
            } else {
                crate::ops::schedules::now_ms()
            },
        };
        // The promotion happened: a store error here must not fail the step (the topology
        // would be left half-moved); the window then starts again at the new source.
        if let Err(e) = app.store.record_handover(&h).await {
            warn!(new = %h.instance_id, error = %e, "could not record the handover; restores will not cross it");
        }
    }
    app.store.set_replica_of(&new.id, None).await?;
    let strategy = old.repl_strategy.clone();
    let strategy = strategy.unwrap_or_else(|| app.cfg.replication.strategy.clone());
    keep_repl_user(app, &new.id, &user, &password, &strategy).await
}

/// Re-points `replica` at `source` (by its own applied position when `from_own_position`).
async fn repoint(
    app: &App,
    source: &str,
    replica: &str,
    from_own_position: bool,
) -> Result<(), ApiError> {
    let source = reload(app, source).await?;
    let (user, password) = ensure_repl_user(app, &source).await?;
    let replica = reload(app, replica).await?;
    let strategy = datastore(app, &source).await?.repoint_strategy();
    let mut spec = replica_of(&source, &replica, &user, &password, strategy)?;
    spec.from_own_position = from_own_position;
    let attach = v1::AttachReplica { source: Some(spec) };
    call(app, &replica, v1::call::Kind::AttachReplica(attach)).await?;
    app.store
        .set_replica_of(&replica.id, Some(&source.id))
        .await?;
    Ok(())
}

/// The fault a workflow that failed with `error` leaves: "`what` failed: `error`".
fn failed(what: &str, error: &Option<String>) -> Option<String> {
    error.as_ref().map(|e| format!("{what} failed: {e}"))
}

/// The steps of a switchover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SwitchoverStep {
    /// The old source stops taking writes; its position is the target.
    Fence,
    /// The candidate applies everything up to the target, then becomes the writable source: one
    /// call, the datastore's own action (a state saved as `catch_up` by an older controller
    /// resumes here).
    #[serde(alias = "catch_up")]
    Promote,
    /// The other replicas, then the old source, follow it (one per step).
    Repoint,
    /// Nothing moved: the old source gets its writes back.
    RollBack,
    Done,
}

/// A planned switchover to `candidate` that loses no commit.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Switchover {
    pub step: SwitchoverStep,
    pub source: String,
    pub candidate: String,
    pub members: Vec<String>,
    /// The old source's position once fenced.
    pub target: Option<String>,
    /// Members already following the candidate.
    pub repointed: Vec<String>,
    pub error: Option<String>,
    /// Times the current step was sent again because an agent did not answer.
    #[serde(default)]
    pub unanswered: u32,
    /// When the old source was fenced (Unix ms): the handover's time, before the promotion.
    #[serde(default)]
    pub handover_at_ms: i64,
}

/// How many times a switchover step is sent again when an agent did not answer while every
/// member still heartbeats (each try waits up to a call's timeout).
const UNANSWERED_RETRIES: u32 = 5;

impl Switchover {
    pub(super) async fn step(&mut self, app: &App, cancel: bool) {
        use SwitchoverStep::*;
        if cancel && self.step == Fence {
            self.error = Some("cancelled by reset_status".into());
            self.step = RollBack;
            return;
        }
        let r = match self.step {
            Fence => self.fence(app).await,
            Promote => self.promote(app).await,
            Repoint => self.repoint_next(app).await,
            RollBack => {
                self.roll_back(app).await;
                Ok(())
            }
            Done => Ok(()),
        };
        let Err(e) = r else {
            self.unanswered = 0;
            return;
        };
        // An agent that did not answer while every member still heartbeats (NATS moving it to
        // another server of the cluster, a loaded host): its outcome is unknown, and the step is
        // idempotent, so it is sent again rather than judged.
        if crate::agents::unanswered(&e)
            && self.unanswered < UNANSWERED_RETRIES
            && self.members.iter().all(|m| app.fresh(m))
        {
            self.unanswered += 1;
            warn!(step = serde_name(&self.step), error = %e.message, "switchover step got no answer; sending it again");
            return;
        }
        warn!(step = serde_name(&self.step), error = %e.message, "switchover step failed");
        self.error = Some(e.message);
        // Before the candidate is promoted nothing has moved: undo the fence. After, the
        // candidate is the source and going back would lose its writes: stop with a fault.
        // A promotion that failed moved nothing if the candidate still replicates (it did
        // not catch up in time): ask it.
        let moved = match self.step {
            Fence => false,
            Promote => !self.still_replica(app).await,
            _ => true,
        };
        self.step = if moved { Done } else { RollBack };
    }

    /// Whether the candidate is still a replica (asked after a promotion that failed).
    async fn still_replica(&self, app: &App) -> bool {
        let status = v1::call::Kind::ReplicationStatus(v1::ReplicationStatus {});
        call_at(app, &self.candidate, status)
            .await
            .is_ok_and(|rep| rep.replication.is_some_and(|r| r.role == "replica"))
    }

    async fn fence(&mut self, app: &App) -> Result<(), ApiError> {
        let rep = fence_source(app, &self.source, true).await?;
        self.target = Some(rep.replication.map(|r| r.position).unwrap_or_default());
        self.handover_at_ms = crate::ops::schedules::now_ms();
        self.step = SwitchoverStep::Promote;
        Ok(())
    }

    async fn promote(&mut self, app: &App) -> Result<(), ApiError> {
        let target = self.target.clone().unwrap_or_default();
        let detach = v1::DetachReplica {
            catch_up_to: target.clone(),
            timeout_s: 15,
        };
        let at = self.handover_at_ms;
        take_over(app, &self.source, &self.candidate, detach, &target, at).await?;
        self.step = SwitchoverStep::Repoint;
        Ok(())
    }

    /// Re-points one member: the other replicas first, the old source (from its own written
    /// position) last.
    async fn repoint_next(&mut self, app: &App) -> Result<(), ApiError> {
        let mut order: Vec<&String> = self
            .members
            .iter()
            .filter(|m| **m != self.candidate && **m != self.source)
            .collect();
        order.push(&self.source);
        let Some(next) = order
            .into_iter()
            .find(|m| !self.repointed.contains(m))
            .cloned()
        else {
            info!(old = %self.source, new = %self.candidate, position = ?self.target, "switched over");
            self.step = SwitchoverStep::Done;
            return Ok(());
        };
        repoint(app, &self.candidate, &next, next == self.source).await?;
        self.repointed.push(next);
        Ok(())
    }

    async fn roll_back(&mut self, app: &App) {
        if let Err(e) = fence_source(app, &self.source, false).await {
            let was = self.error.take().unwrap_or_default();
            self.error = Some(format!(
                "{was}; the old source {} stays read-only ({}): retry the switchover or detach its replicas",
                self.source, e.message
            ));
        }
        self.step = SwitchoverStep::Done;
    }

    pub(super) async fn release(&self, tx: &mut Tx) -> anyhow::Result<()> {
        let fault = failed("promote_to_replica_source", &self.error);
        for id in &self.members {
            Store::set_task(tx, id, Task::None, fault.as_deref()).await?;
        }
        Ok(())
    }
}

/// `promote_to_replica_source`: starts a switchover to `candidate` among `members` (the source
/// and all its replicas).
pub async fn start_switchover(
    app: &Arc<App>,
    source: &InstanceRow,
    candidate: &str,
    members: Vec<String>,
) -> Result<String, ApiError> {
    let flow = Flow::Switchover(Switchover {
        step: SwitchoverStep::Fence,
        source: source.id.clone(),
        candidate: candidate.to_string(),
        members: members.clone(),
        target: None,
        repointed: vec![],
        error: None,
        unanswered: 0,
        handover_at_ms: 0,
    });
    super::start(app, None, flow, &members, Some(Task::Promoting)).await
}

/// The steps of a failover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailoverStep {
    /// Every reachable replica stops receiving and applies what it has; the most advanced wins.
    Drain,
    /// The winner becomes the writable source.
    Promote,
    /// The other drained replicas follow it (one per step).
    Repoint,
    Done,
}

/// Ejecting a source whose heartbeat expired: the most advanced replica becomes the source.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Failover {
    pub step: FailoverStep,
    pub source: String,
    pub replicas: Vec<String>,
    /// The drained replicas and their positions.
    pub positions: Vec<(String, String)>,
    pub winner: Option<String>,
    pub repointed: Vec<String>,
    pub error: Option<String>,
    /// When the replicas were drained (Unix ms): the handover's time, before the promotion.
    #[serde(default)]
    pub handover_at_ms: i64,
}

impl Failover {
    pub(super) async fn step(&mut self, app: &App, cancel: bool) {
        use FailoverStep::*;
        if cancel && self.step == Drain {
            self.error = Some("cancelled by reset_status".into());
            self.step = Done;
            return;
        }
        let r = match self.step {
            Drain => self.drain(app).await,
            Promote => self.promote(app).await,
            Repoint => self.repoint_next(app).await,
            Done => Ok(()),
        };
        if let Err(e) = r {
            warn!(step = serde_name(&self.step), error = %e.message, "failover step failed");
            self.error = Some(e.message);
            self.step = Done;
        }
    }

    async fn drain(&mut self, app: &App) -> Result<(), ApiError> {
        let mut positions: Vec<(String, String)> = Vec::new();
        for id in &self.replicas {
            if !app.fresh(id) {
                continue;
            }
            let r = reload(app, id).await?;
            match call(
                app,
                &r,
                v1::call::Kind::DrainRelayLog(v1::DrainRelayLog { timeout_s: 15 }),
            )
            .await
            {
                Ok((_, rep)) => {
                    let pos = rep
                        .replication
                        .map(|x| x.applied_position)
                        .unwrap_or_default();
                    positions.push((r.id.clone(), pos));
                }
                Err(e) => {
                    warn!(replica = %r.id, error = %e.message, "replica could not drain; left out")
                }
            }
        }
        // The winner has everything every other survivor has (in the datastore's own terms,
        // `Datastore::position_covers`).
        let source = reload(app, &self.source).await?;
        let ds = datastore(app, &source).await?;
        let winner = elect(ds, &positions)
            .ok_or_else(|| ApiError::unprocessable("no replica of the source is reachable"))?;
        info!(winner = %winner.0, position = %winner.1, "elected the most advanced replica");
        self.winner = Some(winner.0);
        self.positions = positions;
        self.handover_at_ms = crate::ops::schedules::now_ms();
        self.step = FailoverStep::Promote;
        Ok(())
    }

    async fn promote(&mut self, app: &App) -> Result<(), ApiError> {
        let winner = self.winner.clone().unwrap_or_default();
        // A winner that is gone is named before the source.
        reload(app, &winner).await?;
        let position = self
            .positions
            .iter()
            .find(|(id, _)| *id == winner)
            .map(|(_, p)| p.clone())
            .unwrap_or_default();
        let (detach, at) = (v1::DetachReplica::default(), self.handover_at_ms);
        take_over(app, &self.source, &winner, detach, &position, at).await?;
        self.step = FailoverStep::Repoint;
        Ok(())
    }

    async fn repoint_next(&mut self, app: &App) -> Result<(), ApiError> {
        let winner = self.winner.clone().unwrap_or_default();
        let next = self
            .positions
            .iter()
            .map(|(id, _)| id)
            .find(|id| **id != winner && !self.repointed.contains(id))
            .cloned();
        reload(app, &winner).await?;
        let Some(next) = next else {
            // Replicas that could not be reached follow the new source in the controller's
            // view; their agents are re-pointed when they return (not automatic yet: they
            // show a fault).
            for r in self
                .replicas
                .iter()
                .filter(|r| !self.positions.iter().any(|(p, _)| p == *r))
            {
                app.store.set_replica_of(r, Some(&winner)).await?;
            }
            app.store.set_ejected(&self.source, true).await?;
            app.store.set_replica_of(&self.source, None).await?;
            info!(old = %self.source, new = %winner, "failover done");
            self.step = FailoverStep::Done;
            return Ok(());
        };
        repoint(app, &winner, &next, false).await?;
        self.repointed.push(next);
        Ok(())
    }

    pub(super) async fn release(&self, tx: &mut Tx) -> anyhow::Result<()> {
        let fault = failed("eject_replica_source", &self.error);
        for id in &self.replicas {
            Store::set_task(tx, id, Task::None, fault.as_deref()).await?;
        }
        match (&fault, &self.winner) {
            (None, Some(winner)) => {
                Store::set_task(
                    tx,
                    &self.source,
                    Task::Ejected,
                    Some(&format!(
                        "Ejected as replica source; {winner} is the source now. This instance stays fenced (read-only): delete it."
                    )),
                )
                .await?
            }
            _ => Store::set_task(tx, &self.source, Task::None, fault.as_deref()).await?,
        }
        Ok(())
    }
}

/// Starts a failover away from `source` (the API's eject and the automatic failover).
pub async fn start_failover(
    app: &Arc<App>,
    source: &InstanceRow,
    replicas: &[InstanceRow],
) -> Result<String, ApiError> {
    let mut members = vec![source.id.clone()];
    members.extend(replicas.iter().map(|r| r.id.clone()));
    let flow = Flow::Failover(Failover {
        step: FailoverStep::Drain,
        source: source.id.clone(),
        replicas: replicas.iter().map(|r| r.id.clone()).collect(),
        positions: vec![],
        winner: None,
        repointed: vec![],
        error: None,
        handover_at_ms: 0,
    });
    super::start(app, None, flow, &members, Some(Task::Ejecting)).await
}

/// The steps of building replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BuildStep {
    /// The source takes a snapshot (a backup that also makes it a source).
    Snapshot,
    /// Until the snapshot is COMPLETED.
    WaitSnapshot,
    /// Each replica is sent its prepare (restore the snapshot, then follow the source).
    Prepare,
    /// Until no replica is building any more.
    WaitBuilt,
    /// The snapshot is deleted.
    Cleanup,
    Done,
}

/// Replicas placed by `POST /instances` with `replica_of`, built from a snapshot of the source.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplicaBuild {
    pub step: BuildStep,
    /// The workflow's own id: the snapshot's and the intents' ids derive from it.
    pub id: String,
    pub source: String,
    pub replicas: Vec<String>,
    pub configuration: Option<String>,
    /// Replicas whose prepare is queued.
    pub prepared: Vec<String>,
    /// Unix seconds after which building replicas are left to the build timeout.
    pub deadline: i64,
    pub error: Option<String>,
}

impl ReplicaBuild {
    fn snapshot_id(&self) -> String {
        super::derived_id(&self.id, "snapshot")
    }

    pub(super) async fn step(&mut self, app: &App, cancel: bool) -> super::Progress {
        use BuildStep::*;
        if cancel && matches!(self.step, Snapshot | WaitSnapshot | Prepare) {
            self.error = Some("cancelled by reset_status".into());
            self.step = Cleanup;
            return super::Progress::Moved;
        }
        let r = match self.step {
            Snapshot => self.snapshot(app).await,
            WaitSnapshot => self.wait_snapshot(app).await,
            Prepare => self.prepare(app).await,
            WaitBuilt => self.wait_built(app).await,
            Cleanup => self.cleanup(app).await,
            Done => Ok(super::Progress::Moved),
        };
        match r {
            Ok(p) => p,
            Err(e) => {
                warn!(step = serde_name(&self.step), error = %e.message, "replica build step failed");
                self.error = Some(e.message);
                self.step = if self.step == Cleanup { Done } else { Cleanup };
                super::Progress::Moved
            }
        }
    }

    async fn snapshot(&mut self, app: &App) -> Result<super::Progress, ApiError> {
        let source = reload(app, &self.source).await?;
        crate::ops::backups::snapshot(app, &source, &self.replicas.join(", "), &self.snapshot_id())
            .await?;
        info!(source = %self.source, replicas = ?self.replicas, "building replicas");
        self.step = BuildStep::WaitSnapshot;
        Ok(super::Progress::Moved)
    }

    async fn wait_snapshot(&mut self, app: &App) -> Result<super::Progress, ApiError> {
        let b = app.store.backup(&self.snapshot_id()).await?;
        match b.as_ref().map(|b| b.status) {
            Some(BackupStatus::Completed) => {
                self.step = BuildStep::Prepare;
                Ok(super::Progress::Moved)
            }
            Some(BackupStatus::Failed) | None => Err(ApiError::unprocessable(format!(
                "the snapshot of {} failed: {}",
                self.source,
                b.and_then(|b| b.fault).unwrap_or_default()
            ))),
            _ if coffer_proto::now_unix_s() > self.deadline => Err(ApiError::unprocessable(
                "the snapshot did not finish in time",
            )),
            _ => Ok(super::Progress::Wait),
        }
    }

    /// Queues one replica's prepare (the intent's id derives from the workflow: a second run
    /// of this step finds it queued).
    async fn prepare(&mut self, app: &App) -> Result<super::Progress, ApiError> {
        let Some(id) = self
            .replicas
            .iter()
            .find(|r| !self.prepared.contains(r))
            .cloned()
        else {
            self.step = BuildStep::WaitBuilt;
            return Ok(super::Progress::Moved);
        };
        let intent_id = super::derived_id(&self.id, &format!("prepare/{id}"));
        let queued = app.store.intent_exists(&intent_id).await?;
        if let Some(r) = app.store.instance(&id).await?.filter(|_| !queued) {
            let source = reload(app, &self.source).await?;
            let (user, password) = ensure_repl_user(app, &source).await?;
            let strategy = r.repl_strategy.clone().or(source.repl_strategy.clone());
            let strategy = strategy.unwrap_or_else(|| app.cfg.replication.strategy.clone());
            let cfg = match &self.configuration {
                Some(g) => app.store.configuration(g).await?,
                None => None,
            };
            let overrides = match cfg {
                Some(cfg) => {
                    let version = &cfg.datastore_version_id;
                    crate::ops::configurations::check_values(app, version, &cfg.values).await?
                }
                None => vec![],
            };
            let flavor = app.store.flavor(&source.flavor_id).await?;
            let version = app.store.version(&source.datastore_version_id).await?;
            let mut restore =
                crate::ops::backups::restore_point(app, &self.snapshot_id(), None).await?;
            crate::ops::backups::grant_restore(app, &mut restore, &id, &agent_key(&r)?)?;
            // Its key, so that it archives its change stream from the moment it is promoted.
            let archive_key = crate::ops::keys::issue(app, &id, &agent_key(&r)?)?;
            let prepare = v1::intent::Kind::Prepare(v1::Prepare {
                memory_mb: flavor.as_ref().map(|f| f.ram as u64).unwrap_or(256),
                vcpus: flavor.as_ref().map(|f| f.vcpus as u32).unwrap_or(1),
                volume_gb: r.volume_size as u64,
                server_id: r.server_id as u32,
                datastore_version: version.map(|v| v.version).unwrap_or_default(),
                restore: Some(restore),
                overrides,
                replica_of: Some(replica_of(&source, &r, &user, &password, &strategy)?),
                archive_key_id: archive_key
                    .as_ref()
                    .map(|k| k.0.clone())
                    .unwrap_or_default(),
                archive_key_sealed: archive_key.map(|k| k.1).unwrap_or_default(),
                ..Default::default()
            });
            let mut tx = app.store.begin().await?;
            crate::ops::intents::enqueue(app, &mut tx, &id, &intent_id, prepare).await?;
            tx.commit().await?;
            app.wake_outbox();
        }
        self.prepared.push(id);
        Ok(super::Progress::Moved)
    }

    async fn wait_built(&mut self, app: &App) -> Result<super::Progress, ApiError> {
        let mut building = false;
        for id in &self.replicas {
            if let Some(r) = app.store.instance(id).await? {
                building |= r.task == Task::Building;
            }
        }
        if building && coffer_proto::now_unix_s() <= self.deadline {
            return Ok(super::Progress::Wait);
        }
        self.step = BuildStep::Cleanup;
        Ok(super::Progress::Moved)
    }

    /// The snapshot is deleted once every replica has restored it (or given up).
    async fn cleanup(&mut self, app: &App) -> Result<super::Progress, ApiError> {
        let snapshot = self.snapshot_id();
        if let Err(e) = crate::ops::backups::remove(app, &snapshot).await {
            warn!(error = %format!("{e:#}"), snapshot = %snapshot, "could not delete the replication snapshot");
        }
        self.step = BuildStep::Done;
        Ok(super::Progress::Moved)
    }

    /// Replicas still building when the build failed show why; the others' status is their
    /// prepare's own.
    pub(super) async fn release(&self, tx: &mut Tx) -> anyhow::Result<()> {
        if let Some(e) = &self.error {
            for id in &self.replicas {
                if Store::task_in(&mut **tx, id).await? == Some(Task::Building) {
                    Store::set_task(
                        tx,
                        id,
                        Task::BuildingError,
                        Some(&format!("building the replica failed: {e}")),
                    )
                    .await?;
                }
            }
        }
        Ok(())
    }
}

/// Starts building `replicas` (placed, BUILDING) of `source`.
pub async fn start_replica_build(
    app: &Arc<App>,
    source: &InstanceRow,
    replicas: &[String],
    configuration: Option<String>,
) -> Result<String, ApiError> {
    let id = uuid::Uuid::new_v4().to_string();
    let flow = Flow::ReplicaBuild(ReplicaBuild {
        step: BuildStep::Snapshot,
        id: id.clone(),
        source: source.id.clone(),
        replicas: replicas.to_vec(),
        configuration,
        prepared: vec![],
        deadline: coffer_proto::now_unix_s() + app.cfg.build_timeout_s as i64,
        error: None,
    });
    super::start(app, Some(&id), flow, replicas, None).await
}

/// The steps of a detach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DetachStep {
    /// The replica stops replicating and becomes writable (the datastore's detach, which is
    /// idempotent: run again after a controller restart it finds the work done).
    Detach,
    Done,
}

/// A replica detached from its source (`replica_of` removed by an update): standalone and
/// writable once it ends; the instance's record forgets the source in the same transaction that
/// releases its task.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Detach {
    pub step: DetachStep,
    pub replica: String,
    pub detached: bool,
    pub error: Option<String>,
}

impl Detach {
    pub(super) async fn step(&mut self, app: &App, cancel: bool) {
        if cancel {
            self.error = Some("cancelled by reset_status".into());
        } else {
            let detach = v1::call::Kind::DetachReplica(v1::DetachReplica::default());
            match call_at(app, &self.replica, detach).await {
                Ok(_) => self.detached = true,
                Err(e) => self.error = Some(e.message),
            }
        }
        self.step = DetachStep::Done;
    }

    pub(super) async fn release(&self, tx: &mut Tx) -> anyhow::Result<()> {
        if self.detached {
            Store::set_replica_of_in(&mut **tx, &self.replica, None).await?;
        }
        let fault = failed("detaching", &self.error);
        Store::set_task(tx, &self.replica, Task::None, fault.as_deref()).await
    }
}

/// Starts detaching `replica` from its source.
pub async fn start_detach(app: &Arc<App>, replica: &InstanceRow) -> Result<String, ApiError> {
    let flow = Flow::Detach(Detach {
        step: DetachStep::Detach,
        replica: replica.id.clone(),
        detached: false,
        error: None,
    });
    let members = std::slice::from_ref(&replica.id);
    super::start(app, None, flow, members, Some(Task::Detaching)).await
}

/// The failover's decision: among the drained replicas' positions, the one that has everything
/// every other has; when none does (diverged histories), the one least behind the others in
/// total. None when no replica answered.
pub fn elect(ds: Datastore, positions: &[(String, String)]) -> Option<(String, String)> {
    positions
        .iter()
        .find(|(_, p)| positions.iter().all(|(_, q)| ds.position_covers(p, q)))
        .or_else(|| {
            positions.iter().min_by_key(|(_, p)| {
                positions
                    .iter()
                    .map(|(_, q)| ds.position_behind(p, q))
                    .sum::<u64>()
            })
        })
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A switchover an older controller saved between its fence and its separate catch-up
    /// step resumes at the promotion, which catches up first.
    #[test]
    fn a_switchover_saved_at_the_old_catch_up_step_resumes_at_the_promotion() {
        let saved = serde_json::json!({"kind": "switchover", "step": "catch_up", "source": "s",
            "candidate": "c", "members": ["s", "c"], "target": "0-1-9", "repointed": [],
            "error": null});
        match serde_json::from_value::<Flow>(saved).unwrap() {
            Flow::Switchover(s) => {
                assert_eq!(s.step, SwitchoverStep::Promote);
                assert_eq!(s.target.as_deref(), Some("0-1-9"));
            }
            other => panic!("not a switchover: {other:?}"),
        }
    }

    fn at(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn the_failover_elects_the_replica_that_has_everything() {
        let d = Datastore::ALL[0];
        // Transactions per domain: b has everything a and c have.
        let got = elect(d, &at(&[("a", "0-1-5"), ("b", "0-1-9"), ("c", "0-1-7")]));
        assert_eq!(got.unwrap().0, "b");
        // Diverged (each has what the other lacks): the least behind in total.
        let got = elect(
            d,
            &at(&[("a", "0-1-9,1-2-1"), ("b", "0-1-5,1-2-2"), ("c", "0-1-1")]),
        );
        assert_eq!(got.unwrap().0, "a");
        // Every datastore's positions (whichever of these forms it reads) elect the same way.
        for d in Datastore::ALL {
            let (lo, hi) = [("10", "20"), ("0/10", "0/20"), ("0-1-10", "0-1-20")]
                .into_iter()
                .find(|(lo, hi)| d.position_behind(lo, hi) > 0 && d.position_covers(hi, lo))
                .unwrap_or_else(|| panic!("no position form for {d}"));
            let got = elect(d, &at(&[("a", lo), ("b", hi), ("c", lo)]));
            assert_eq!(got.unwrap().0, "b", "{d}");
        }
        assert_eq!(elect(d, &[]), None);
    }
}
