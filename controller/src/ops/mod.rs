//! The domain layer: rules and operations the API handlers and the workflows share. It imports
//! the store, the agents' calls and the objects, never the API (`api/` parses requests and
//! renders answers on top of it) or the workflows.

use coffer_proto::Datastore;

use crate::error::ApiError;
use crate::store::InstanceRow;
use crate::App;

pub mod backups;
pub mod configurations;
pub mod intents;
pub mod keys;

/// The datastore an instance runs (its version's `manager`).
pub async fn datastore(app: &App, r: &InstanceRow) -> Result<Datastore, ApiError> {
    let version = app
        .store
        .version(&r.datastore_version_id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("instance {} has no datastore version", r.id))?;
    Ok(version.datastore().map_err(anyhow::Error::from)?)
}
