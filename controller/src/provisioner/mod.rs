//! Provisioners place an agent beside a database: as a local process (the embedded default), in a
//! VM booted from our image, or on an enrolled host. The controller only calls this trait.

pub mod process;

use async_trait::async_trait;
use serde::Deserialize;

/// What a provisioner needs to place an agent.
#[derive(Debug, Clone)]
pub struct Placement {
    pub instance_id: String,
    /// The datastore manager the agent runs (from the datastore version).
    pub manager: String,
    pub nats_url: String,
}

/// Where clients reach the placed database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
}

#[async_trait]
pub trait Provisioner: Send + Sync {
    /// Places (and starts) an agent for a new instance.
    async fn place(&self, p: &Placement) -> anyhow::Result<Endpoint>;
    /// Makes sure the agent of a live instance runs: adopts a running one, or starts it again.
    async fn ensure(&self, instance_id: &str) -> anyhow::Result<()>;
    /// Stops the agent (and, if it is still up, the database) and removes the instance's files.
    async fn destroy(&self, instance_id: &str) -> anyhow::Result<()>;
    /// Heartbeat interval the placed agents use.
    fn heartbeat_interval_ms(&self) -> u64;
}

/// Provisioners selectable in configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ProvisionerConfig {
    Process(process::Config),
}

impl ProvisionerConfig {
    pub fn build(&self) -> Box<dyn Provisioner> {
        match self {
            ProvisionerConfig::Process(c) => Box::new(process::ProcessProvisioner::new(c.clone())),
        }
    }

    pub fn heartbeat_interval_ms(&self) -> u64 {
        match self {
            ProvisionerConfig::Process(c) => c.heartbeat_interval_ms,
        }
    }
}
