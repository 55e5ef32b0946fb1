//! Creating an instance: a process-placed one at once (`ops::instances::create_placed`), a VM as
//! the `vm_build` workflow, which survives a controller restart at every step.
//!
//! A VM's agent makes its key pair at first boot and sends the public half when it enrols; the
//! users' and root's passwords are sealed to it only then. Until then they wait in the workflow's
//! state, sealed to the controller's own key (never in the clear at rest), with the create's
//! databases, overrides and restore point: `place` (an enrolment token, the VM's disk and seed),
//! `boot`, `enrol` (waits for the agent, woken by its enrolment, until the build timeout), and
//! `commit` (the secrets sealed to the agent and the `prepare` intent, once).

use std::sync::Arc;

use coffer_proto::{seal, v1, Message};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{Flow, Progress};
use crate::error::ApiError;
use crate::ops::instances::{self as ops, Commit, CreateSpec, NewInstance};
use crate::ops::Caller;
use crate::status::{serde_name, Task};
use crate::store::{Store, Tx};
use crate::App;

/// Creates an instance; returns its id and root's password (shown once) when the version
/// enables root on create.
pub async fn create(
    app: &Arc<App>,
    c: &Caller,
    spec: CreateSpec,
) -> Result<(String, Option<String>), ApiError> {
    let n = ops::check_new(app, c, spec).await?;
    if app.provisioner.key_at_enrolment() {
        ops::store_pending(app, &n).await?;
        start_vm_build(app, &n).await?;
    } else {
        ops::create_placed(app, &n).await?;
    }
    Ok((n.id, n.root_password))
}

/// The steps of a VM build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmBuildStep {
    /// An enrolment token, and the VM's disk and seed carrying it.
    Place,
    /// The VM starts.
    Boot,
    /// Its agent enrols (its key arrives).
    Enrol,
    /// The secrets are sealed to the agent's key and `prepare` is queued.
    Commit,
    Done,
}

/// A VM being built for an instance whose row is stored (BUILD, no agent yet).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmBuild {
    pub step: VmBuildStep,
    pub instance: String,
    /// The create's databases, users (passwords in the clear), overrides and restore point as a
    /// `Prepare`, root's password in `root_password_sealed`, all sealed to the controller's key.
    pub sealed: String,
    pub modules: Vec<String>,
    /// When the agent must have enrolled (Unix seconds).
    pub deadline_unix: i64,
    pub error: Option<String>,
    /// A restore drill's throwaway VM: low CPU and I/O priority.
    #[serde(default)]
    pub low_priority: bool,
}

fn secrets_context(instance: &str) -> String {
    format!("coffer vm build secrets v1 instance={instance}")
}

async fn start_vm_build(app: &Arc<App>, n: &NewInstance) -> Result<String, ApiError> {
    let kept = v1::Prepare {
        root_password_sealed: n.root_password.clone().unwrap_or_default().into_bytes(),
        ..ops::prepare_of(n)
    };
    let sealed = seal::seal(
        &app.reply_public_key,
        &secrets_context(&n.id),
        &kept.encode_to_vec(),
    )
    .map_err(|e| anyhow::anyhow!("sealing the build's secrets: {e}"))?;
    let flow = Flow::VmBuild(VmBuild {
        step: VmBuildStep::Place,
        instance: n.id.clone(),
        sealed: seal::to_hex(&sealed),
        modules: n.modules.iter().map(|m| m.id.clone()).collect(),
        deadline_unix: coffer_proto::now_unix_s() + app.cfg.build_timeout_s.max(60) as i64,
        error: None,
        low_priority: n.throwaway,
    });
    super::start(app, None, flow, std::slice::from_ref(&n.id), None).await
}

impl VmBuild {
    pub(super) async fn step(&mut self, app: &App, cancel: bool) -> Progress {
        use VmBuildStep::*;
        if cancel && self.step != Done {
            self.error = Some("cancelled by reset_status".into());
            self.step = Done;
            return Progress::Moved;
        }
        let r = match self.step {
            Place => self.place(app).await,
            Boot => self.boot(app).await,
            Enrol => match self.enrolled(app).await {
                Ok(false) => return Progress::Wait,
                r => r.map(|_| ()),
            },
            Commit => self.commit(app).await,
            Done => Ok(()),
        };
        if let Err(e) = r {
            warn!(instance = %self.instance, step = serde_name(&self.step), error = %e.message, "VM build failed");
            self.error = Some(e.message);
            self.step = Done;
        }
        Progress::Moved
    }

    /// The instance's row, or `None` (and the build ends) when it was deleted meanwhile.
    async fn row(&mut self, app: &App) -> Result<Option<crate::store::InstanceRow>, ApiError> {
        let r = app.store.instance(&self.instance).await?;
        if r.is_none() {
            self.step = VmBuildStep::Done;
        }
        Ok(r)
    }

    async fn place(&mut self, app: &App) -> Result<(), ApiError> {
        let Some(r) = self.row(app).await? else {
            return Ok(());
        };
        let version = app
            .store
            .version(&r.datastore_version_id)
            .await?
            .ok_or_else(|| anyhow::anyhow!("the datastore version is gone"))?;
        let token = crate::ops::enrol::create_token(
            &app.store,
            &crate::ops::enrol::TokenSpec {
                project: r.project_id.clone(),
                name: r.name.clone(),
                version_id: version.id.clone(),
                flavor_id: r.flavor_id.clone(),
                volume_size: r.volume_size,
                instance_id: Some(r.id.clone()),
                ttl_s: (self.deadline_unix - coffer_proto::now_unix_s()).max(60),
            },
        )
        .await?;
        let (placed, _) =
            ops::place(app, &r.id, &version, Some(token.token), self.low_priority).await?;
        app.store
            .set_endpoint(&r.id, &placed.host, placed.port as i64)
            .await?;
        self.step = VmBuildStep::Boot;
        Ok(())
    }

    async fn boot(&mut self, app: &App) -> Result<(), ApiError> {
        if self.row(app).await?.is_none() {
            return Ok(());
        }
        app.provisioner
            .start(&self.instance)
            .await
            .map_err(|e| e.context("booting the VM failed"))?;
        self.step = VmBuildStep::Enrol;
        Ok(())
    }

    /// Whether the agent enrolled (then the next step is the commit).
    async fn enrolled(&mut self, app: &App) -> Result<bool, ApiError> {
        let Some(r) = self.row(app).await? else {
            return Ok(true);
        };
        if r.has_agent() {
            self.step = VmBuildStep::Commit;
            return Ok(true);
        }
        if coffer_proto::now_unix_s() > self.deadline_unix {
            return Err(ApiError::unprocessable(format!(
                "the VM's agent did not enrol within {} s; check the VM's console log \
                 (console.log in its instance directory) and that it reaches the controller",
                app.cfg.build_timeout_s.max(60)
            )));
        }
        Ok(false)
    }

    async fn commit(&mut self, app: &App) -> Result<(), ApiError> {
        let Some(r) = self.row(app).await? else {
            return Ok(());
        };
        // Once: a commit that ran before the controller died queued its prepare already.
        if app.store.count_intents(&r.id, "prepare").await? == 0 {
            let kept = crate::agents::open_kept(app, &self.sealed, &secrets_context(&r.id))
                .and_then(|b| v1::Prepare::decode(b.as_slice()).ok())
                .ok_or_else(|| anyhow::anyhow!("the build's sealed secrets do not open"))?;
            let version = app
                .store
                .version(&r.datastore_version_id)
                .await?
                .ok_or_else(|| anyhow::anyhow!("the datastore version is gone"))?;
            let flavor = app
                .store
                .flavor(&r.flavor_id)
                .await?
                .ok_or_else(|| anyhow::anyhow!("the flavor is gone"))?;
            let mut modules = vec![];
            for m in &self.modules {
                modules.extend(app.store.module(m).await?);
            }
            let n = NewInstance {
                id: r.id.clone(),
                project: r.project_id.clone(),
                name: r.name.clone(),
                flavor,
                version,
                volume_size: r.volume_size,
                databases: kept.databases,
                users: kept.users,
                restore_from: kept.restore,
                overrides: kept.overrides,
                modules,
                configuration: r.configuration_id.clone(),
                root_password: (!kept.root_password_sealed.is_empty())
                    .then(|| String::from_utf8_lossy(&kept.root_password_sealed).into_owned()),
                throwaway: self.low_priority,
            };
            let key = seal::from_hex(&r.agent_public_key)
                .ok_or_else(|| anyhow::anyhow!("the enrolled key is not hex"))?;
            let (host, port) = (r.host.clone().unwrap_or_default(), r.port.unwrap_or(0));
            ops::commit_new(
                app,
                &n,
                &key,
                &r.agent_nats_user,
                (&host, port as u16),
                Commit::Complete,
            )
            .await?;
            app.wake_outbox();
        }
        info!(instance = %r.id, "VM enrolled; prepare queued");
        self.step = VmBuildStep::Done;
        Ok(())
    }

    /// Ends the build: a failed one leaves the instance in ERROR with what happened.
    pub(super) async fn release(&self, tx: &mut Tx) -> anyhow::Result<()> {
        if let Some(e) = &self.error {
            Store::set_task(tx, &self.instance, Task::BuildingError, Some(e)).await?;
        }
        Ok(())
    }
}
