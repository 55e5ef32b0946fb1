//! Restore drills: proof, on a schedule or on demand, that an instance's backups restore.
//!
//! A drill restores the instance's latest backup — rolled forward through its archive to the
//! latest restorable time where the datastore archives its changes — into a throwaway instance
//! of the same project (the instance's flavor and volume, at a low CPU and I/O priority), asks
//! that instance's agent to run the datastore's own checks (`Verify`: table checks and
//! checksums, index checks, key counts), compares the tables found with those the backup's agent
//! recorded when it took the backup, deletes the throwaway and keeps a report signed with the
//! controller's drill key (`coffer-controller drill-verify` checks it). The report says how long
//! each phase took (the restore's time is the RTO) and how far back the restored data stands
//! (RPO). A failed drill sets the instance's drill fault; one that passes clears it.
//!
//! Steps: `queue` (drills run one at a time across the deployment), `restore` (the throwaway,
//! created once: its id derives from the drill's), `ready` (waits until it is ACTIVE, or
//! failed), `check`, `cleanup` (deletes it), `record` (signs and stores the report).

use std::sync::Arc;

use coffer_proto::v1;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tracing::{info, warn};

use super::{Flow, Progress};
use crate::error::ApiError;
use crate::ops::instances::{CreateSpec, RestoreBase, RestoreSpec};
use crate::ops::{rfc3339_ms, Caller};
use crate::status::BackupStatus;
use crate::store::{DrillOutcome, DrillRow};
use crate::App;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DrillStep {
    Queue,
    Restore,
    Ready,
    Check,
    Cleanup,
    Record,
    Done,
}

/// One check's outcome, as the report lists it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckOut {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

/// A drill of one instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Drill {
    pub step: DrillStep,
    pub id: String,
    pub project: String,
    pub instance: String,
    pub instance_name: String,
    pub datastore: String,
    pub version: String,
    pub flavor_id: String,
    pub volume_size: i64,
    pub backup: String,
    /// Rolled forward through the archive to this time (Unix ms); None: the backup as it is.
    pub target_ms: Option<i64>,
    /// Where the restored data stands (Unix ms): the target, or when the backup completed.
    pub point_ms: i64,
    /// The tables the backup's agent recorded: the restore must hold each.
    pub inventory: Vec<String>,
    /// The throwaway instance's id (derived from the drill's).
    pub throwaway: String,
    pub started_ms: i64,
    /// When the current phase started (Unix ms), and the finished phases with their seconds.
    pub phase_ms: i64,
    pub phases: Vec<(String, f64)>,
    pub checks: Vec<CheckOut>,
    pub finished_ms: i64,
}

/// Checks that `instance` can be drilled and plans the drill (nothing is written).
pub async fn plan(app: &App, c: &Caller, instance: &str) -> Result<Drill, ApiError> {
    if app.cfg.backup.is_none() {
        return Err(ApiError::unprocessable(
            "Backups are not configured on this deployment ([backup] in the controller config).",
        ));
    }
    let r = crate::ops::find_instance(app, c, instance).await?;
    let version = app
        .store
        .version(&r.datastore_version_id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("instance {} has no datastore version", r.id))?;
    let datastore = version.datastore().map_err(anyhow::Error::from)?;
    // The newest completed backup, rolled forward to the latest restorable time when the
    // archive covers it and has stored past its completion; else as it is.
    let Some(backup) = app
        .store
        .backups_of(&r.project_id)
        .await?
        .into_iter()
        .find(|b| b.instance_id == r.id && b.status == BackupStatus::Completed)
    else {
        return Err(ApiError::bad_request(format!(
            "Instance {} has no completed backup to drill; take a backup first.",
            r.id
        )));
    };
    let mut target_ms = None;
    if datastore.archives_changes()
        && backup.archive_since_ms.is_some()
        && backup.archive_since_ms == r.archive_since_ms
    {
        if let (Some((_, latest)), Some(done)) = (
            crate::ops::lineage::window(app, &r).await?,
            backup.completed_ms,
        ) {
            target_ms = (latest >= done).then_some(latest);
        }
    }
    let id = uuid::Uuid::new_v4().to_string();
    let now = coffer_proto::now_unix_ms();
    Ok(Drill {
        step: DrillStep::Queue,
        throwaway: super::derived_id(&id, "throwaway"),
        id,
        project: r.project_id.clone(),
        instance: r.id.clone(),
        instance_name: r.name.clone(),
        datastore: version.datastore_name.clone(),
        version: version.name.clone(),
        flavor_id: r.flavor_id.clone(),
        volume_size: r.volume_size,
        point_ms: target_ms.or(backup.completed_ms).unwrap_or(now),
        target_ms,
        inventory: backup
            .inventory
            .as_deref()
            .and_then(|t| serde_json::from_str(t).ok())
            .unwrap_or_default(),
        backup: backup.id,
        started_ms: now,
        phase_ms: now,
        phases: vec![],
        checks: vec![],
        finished_ms: 0,
    })
}

/// Starts a planned drill: its row (RUNNING) and its workflow.
pub async fn launch(app: &Arc<App>, d: Drill) -> Result<DrillRow, ApiError> {
    let id = d.id.clone();
    app.store
        .insert_drill(&id, &d.project, &d.instance, &d.throwaway)
        .await?;
    if let Err(e) = super::start(app, Some(&id), Flow::Drill(d), &[], None).await {
        let _ = app.store.forget_drill(&id).await;
        return Err(e);
    }
    Ok(app
        .store
        .drill(&id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("drill {id} vanished"))?)
}

/// Starts a drill of `instance` (`POST /restore_drills`).
pub async fn start(app: &Arc<App>, c: &Caller, instance: &str) -> Result<DrillRow, ApiError> {
    let d = plan(app, c, instance).await?;
    launch(app, d).await
}

/// Starts the drills of the drill schedules that are due, each with its next run (the leader's
/// timers pass what `ops::schedules::run_due` found, every second). The schedule moves on first (once, whoever leads); a drill that cannot start is
/// recorded on the schedule as skipped, with the reason.
pub async fn run_due(app: &Arc<App>, due: Vec<(crate::store::ScheduleRow, i64)>) {
    for (s, next) in due {
        let c = Caller::project(&s.project_id);
        let planned = plan(app, &c, &s.instance_id).await;
        let result = match &planned {
            Ok(d) => format!("started restore drill {}", d.id),
            Err(e) => format!("skipped: {}", e.message),
        };
        match app
            .store
            .advance_schedule(&s.id, s.next_run_ms, next, &result)
            .await
        {
            Ok(true) => {}
            // Another controller's run moved it first.
            _ => continue,
        }
        match planned {
            Ok(d) => match launch(app, d).await {
                Ok(row) => {
                    info!(schedule = %s.id, instance = %s.instance_id, drill = %row.id, "scheduled restore drill started")
                }
                Err(e) => {
                    warn!(schedule = %s.id, instance = %s.instance_id, reason = %e.message, "scheduled restore drill did not start")
                }
            },
            Err(e) if e.status == axum::http::StatusCode::NOT_FOUND => {
                info!(schedule = %s.id, instance = %s.instance_id, "the schedule's instance is gone; schedule removed");
                let _ = app.store.delete_schedule(&s.id).await;
            }
            Err(e) => {
                warn!(schedule = %s.id, instance = %s.instance_id, reason = %e.message, "scheduled restore drill skipped")
            }
        }
    }
}

impl Drill {
    fn phase(&mut self, name: &str) {
        let now = coffer_proto::now_unix_ms();
        self.phases
            .push((name.into(), (now - self.phase_ms).max(0) as f64 / 1000.0));
        self.phase_ms = now;
    }

    fn failed(&mut self, name: &str, detail: impl Into<String>) {
        self.checks.push(CheckOut {
            name: name.into(),
            ok: false,
            detail: detail.into(),
        });
    }

    fn passed(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(|c| c.ok)
    }

    pub(super) async fn step(&mut self, app: &Arc<App>, cancel: bool) -> Progress {
        use DrillStep::*;
        if cancel && matches!(self.step, Queue | Restore | Ready | Check) {
            self.failed("drill", "cancelled by reset_status");
            self.step = Cleanup;
            return Progress::Moved;
        }
        let r = match self.step {
            Queue => self.queue(app).await,
            Restore => self.restore(app).await,
            Ready => self.ready(app).await,
            Check => self.check(app).await,
            Cleanup => self.cleanup(app).await,
            Record => self.record(app).await.map(|()| Progress::Moved),
            Done => Ok(Progress::Moved),
        };
        match r {
            Ok(p) => p,
            // A store error: the step runs again.
            Err(e) => {
                warn!(drill = %self.id, step = crate::status::serde_name(&self.step), error = %e.message, "restore drill step failed; retrying");
                Progress::Wait
            }
        }
    }

    /// One drill at a time: this one waits for every drill started before it.
    async fn queue(&mut self, app: &App) -> Result<Progress, ApiError> {
        let me = app.store.drill(&self.id).await?;
        let Some(me) = me else {
            self.step = DrillStep::Done;
            return Ok(Progress::Moved);
        };
        let earlier =
            app.store.running_drills().await?.into_iter().any(|d| {
                (d.created.as_str(), d.id.as_str()) < (me.created.as_str(), me.id.as_str())
            });
        if earlier {
            return Ok(Progress::Wait);
        }
        self.phase("queue");
        self.step = DrillStep::Restore;
        Ok(Progress::Moved)
    }

    /// Creates the throwaway instance from the backup (once).
    async fn restore(&mut self, app: &Arc<App>) -> Result<Progress, ApiError> {
        if app.store.instance(&self.throwaway).await?.is_none() {
            let c = Caller::project(&self.project);
            let spec = CreateSpec {
                id: Some(self.throwaway.clone()),
                name: format!("drill-{}", &self.id[..8]),
                flavor_id: self.flavor_id.clone(),
                volume_size: self.volume_size,
                datastore: Some(self.datastore.clone()),
                version: Some(self.version.clone()),
                databases: vec![],
                users: vec![],
                restore_from: Some(RestoreSpec {
                    base: RestoreBase::Backup(self.backup.clone()),
                    time_us: self.target_ms.map(|t| t.saturating_mul(1000)),
                    position: None,
                }),
                configuration: None,
                modules: vec![],
                throwaway: true,
            };
            if let Err(e) = super::create::create(app, &c, spec).await {
                if e.status.is_server_error() {
                    return Err(e);
                }
                self.failed("restore", e.message);
                self.phase("restore");
                self.step = DrillStep::Cleanup;
                return Ok(Progress::Moved);
            }
        }
        self.step = DrillStep::Ready;
        Ok(Progress::Moved)
    }

    /// Waits until the throwaway is ACTIVE (restored), or failed.
    async fn ready(&mut self, app: &App) -> Result<Progress, ApiError> {
        let Some(r) = app.store.instance(&self.throwaway).await? else {
            self.failed(
                "restore",
                "the throwaway instance was deleted during the drill",
            );
            self.phase("restore");
            self.step = DrillStep::Record;
            return Ok(Progress::Moved);
        };
        let (status, _) = crate::status::derive(r.task, &r.service_status, app.fresh(&r.id));
        match status {
            "ACTIVE" => {
                self.phase("restore");
                self.step = DrillStep::Check;
            }
            "ERROR" => {
                let why = r
                    .fault
                    .unwrap_or_else(|| "the throwaway instance ended in ERROR".into());
                self.failed("restore", why);
                self.phase("restore");
                self.step = DrillStep::Cleanup;
            }
            _ => return Ok(Progress::Wait),
        }
        Ok(Progress::Moved)
    }

    /// The datastore's checks on the throwaway, and the recorded tables against those found.
    async fn check(&mut self, app: &App) -> Result<Progress, ApiError> {
        let Some(r) = app.store.instance(&self.throwaway).await? else {
            self.failed(
                "checks",
                "the throwaway instance was deleted during the drill",
            );
            self.step = DrillStep::Record;
            return Ok(Progress::Moved);
        };
        let reply = match crate::agents::call(app, &r, v1::call::Kind::Verify(v1::Verify {})).await
        {
            Ok((_, reply)) if reply.pending => return Ok(Progress::Wait),
            Ok((_, reply)) => reply,
            Err(e) if crate::agents::unanswered(&e) => return Ok(Progress::Wait),
            Err(e) => {
                self.failed("checks", e.message);
                self.phase("check");
                self.step = DrillStep::Cleanup;
                return Ok(Progress::Moved);
            }
        };
        self.checks
            .extend(reply.checks.into_iter().map(|c| CheckOut {
                name: c.name,
                ok: c.ok,
                detail: c.detail,
            }));
        let missing: Vec<&String> = self
            .inventory
            .iter()
            .filter(|t| !reply.inventory.contains(t))
            .collect();
        self.checks.push(CheckOut {
            name: "inventory".into(),
            ok: missing.is_empty(),
            detail: if missing.is_empty() {
                format!(
                    "all {} tables recorded when the backup was taken are present ({} found)",
                    self.inventory.len(),
                    reply.inventory.len()
                )
            } else {
                format!(
                    "recorded when the backup was taken but missing after the restore: {}",
                    missing
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            },
        });
        self.phase("check");
        self.step = DrillStep::Cleanup;
        Ok(Progress::Moved)
    }

    /// Deletes the throwaway (one still building is deleted once its build ends).
    async fn cleanup(&mut self, app: &App) -> Result<Progress, ApiError> {
        if let Some(r) = app.store.instance(&self.throwaway).await? {
            match crate::ops::instances::delete(app, &r).await {
                Ok(()) => {}
                Err(e) if e.status.is_server_error() => return Err(e),
                // Still building: deletable once the build ends (ACTIVE, or ERROR at its
                // timeout).
                Err(_) => return Ok(Progress::Wait),
            }
        }
        self.phase("cleanup");
        self.step = DrillStep::Record;
        Ok(Progress::Moved)
    }

    /// The report as it is signed.
    pub fn report(&self, signer: &str) -> Value {
        let failed: Vec<&str> = self
            .checks
            .iter()
            .filter(|c| !c.ok)
            .map(|c| c.name.as_str())
            .collect();
        let phases: serde_json::Map<String, Value> = self
            .phases
            .iter()
            .map(|(n, s)| (n.clone(), json!(s)))
            .collect();
        // A restore that failed recovered nothing: no RTO to report.
        let restored = !self.checks.iter().any(|c| c.name == "restore" && !c.ok);
        let rto = self
            .phases
            .iter()
            .find(|(n, _)| n == "restore" && restored)
            .map(|(_, s)| *s);
        json!({
            "drill_id": self.id,
            "project_id": self.project,
            "instance_id": self.instance,
            "instance_name": self.instance_name,
            "datastore": {"type": self.datastore, "version": self.version},
            "backup_id": self.backup,
            "restore_time": self.target_ms.map(rfc3339_ms),
            "restored_point": rfc3339_ms(self.point_ms),
            "started": rfc3339_ms(self.started_ms),
            "finished": rfc3339_ms(self.finished_ms),
            "passed": self.passed(),
            "rto_seconds": rto,
            "rpo_seconds": (self.started_ms - self.point_ms).max(0) as f64 / 1000.0,
            "phases": phases,
            "checks": self.checks,
            "failed_checks": failed,
            "signer": signer,
        })
    }

    /// Signs and stores the report; sets or clears the instance's drill fault.
    async fn record(&mut self, app: &App) -> Result<(), ApiError> {
        if self.finished_ms == 0 {
            self.finished_ms = coffer_proto::now_unix_ms();
        }
        let signer = app.drill_key.public_key();
        let text = self.report(&signer).to_string();
        let signature = app
            .drill_key
            .sign(text.as_bytes())
            .map_err(|e| anyhow::anyhow!("signing the drill report: {e}"))?;
        let failed: Vec<String> = self
            .checks
            .iter()
            .filter(|c| !c.ok)
            .map(|c| format!("{}: {}", c.name, c.detail))
            .collect();
        let fault = (!self.passed()).then(|| {
            format!(
                "Restore drill {} of backup {} failed: {}",
                self.id,
                self.backup,
                failed.join("; ")
            )
        });
        app.store
            .finish_drill(
                &self.id,
                &self.instance,
                &DrillOutcome {
                    passed: self.passed(),
                    report: &text,
                    signature: &coffer_proto::seal::to_hex(&signature),
                    signer: &signer,
                    fault: fault.as_deref(),
                },
            )
            .await?;
        info!(drill = %self.id, instance = %self.instance, passed = self.passed(), "restore drill finished");
        self.step = DrillStep::Done;
        Ok(())
    }
}

/// Checks a drill report's signature: `text` as stored, `signature` in hex, by `signer` (a
/// public key). Used by `coffer-controller drill-verify`.
pub fn verify_report(text: &str, signature: &str, signer: &str) -> anyhow::Result<()> {
    let key = nkeys::KeyPair::from_public_key(signer)
        .map_err(|e| anyhow::anyhow!("'{signer}' is not a drill signing key: {e}"))?;
    let sig = coffer_proto::seal::from_hex(signature)
        .ok_or_else(|| anyhow::anyhow!("the signature is not hex"))?;
    key.verify(text.as_bytes(), &sig).map_err(|_| {
        anyhow::anyhow!(
            "the signature does not match the report: it was changed, or signed by another key"
        )
    })
}
