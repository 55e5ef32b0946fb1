//! The domain layer: rules and operations the API handlers and the workflows share. It imports
//! the store, the agents' calls and the objects, never the API (`api/` parses requests and
//! renders answers on top of it) or the workflows.

use coffer_proto::Datastore;

use crate::error::ApiError;
use crate::store::InstanceRow;
use crate::App;

pub mod backups;
pub mod configurations;
pub mod enrol;
pub mod instances;
pub mod intents;
pub mod keys;
pub mod lineage;
pub mod modules;
pub mod quotas;
pub mod schedules;

/// Who a request acts for: a project, with or without the admin role.
#[derive(Debug, Clone)]
pub struct Caller {
    pub project: String,
    pub admin: bool,
    /// Request host, for the links the API renders.
    pub host: String,
}

impl Caller {
    /// The project itself, acting with no request behind it (a schedule's run, a workflow).
    pub fn project(project: &str) -> Caller {
        Caller {
            project: project.to_string(),
            admin: false,
            host: String::new(),
        }
    }
}

/// An instance of the caller's project (any project for an admin), or 404.
pub async fn find_instance(app: &App, c: &Caller, id: &str) -> Result<InstanceRow, ApiError> {
    match app.store.instance(id).await? {
        Some(r) if r.project_id == c.project || c.admin => Ok(r),
        _ => Err(ApiError::not_found(format!(
            "Instance {id} could not be found."
        ))),
    }
}

/// The datastore an instance runs (its version's `manager`).
pub async fn datastore(app: &App, r: &InstanceRow) -> Result<Datastore, ApiError> {
    let version = app
        .store
        .version(&r.datastore_version_id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("instance {} has no datastore version", r.id))?;
    Ok(version.datastore().map_err(anyhow::Error::from)?)
}

/// Refuses (422) an action the instance's agent does not list among its capabilities: `what`
/// says what it would have done ("does not support 'restart'").
pub fn require(r: &InstanceRow, capability: &str, what: &str) -> Result<(), ApiError> {
    if r.capabilities.split(',').any(|k| k == capability) {
        return Ok(());
    }
    Err(ApiError::unprocessable(format!(
        "The agent of instance {} (version '{}') {what}; upgrade coffer-agent on it.",
        r.id, r.agent_version
    )))
}

/// 422: the instance cannot take an action now; `why` says what it is doing ("status was BUILD").
pub fn unavailable(id: &str, why: impl std::fmt::Display) -> ApiError {
    ApiError::unprocessable(format!(
        "Instance {id} is not currently available for an action to be performed ({why})."
    ))
}

/// [`unavailable`] because of the instance's task (shown upper-cased).
pub fn busy(id: &str, task: crate::status::Task) -> ApiError {
    unavailable(
        id,
        format!("task status was {}", task.to_string().to_uppercase()),
    )
}

/// An agent's NATS creds and user (none without per-agent identities).
pub fn agent_creds(app: &App, id: &str) -> anyhow::Result<(Option<String>, String)> {
    Ok(match &app.authority {
        Some(a) => a.agent_creds(id).map(|(c, u)| (Some(c), u))?,
        None => (None, String::new()),
    })
}

/// Where agents reach NATS.
pub fn agent_nats_url(app: &App) -> String {
    let cfg = &app.cfg;
    cfg.agent_nats_url
        .clone()
        .unwrap_or_else(|| cfg.nats_url.clone())
}

/// RFC 3339 in UTC with milliseconds (null for a time chrono cannot show).
pub fn rfc3339_ms(ms: i64) -> serde_json::Value {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| serde_json::json!(t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)))
        .unwrap_or(serde_json::Value::Null)
}
