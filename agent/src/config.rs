//! Agent configuration: a TOML file (unknown keys rejected) plus a few command-line overrides.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use coffer_strategies::DatastoreKind;
use serde::Deserialize;

/// Everything one agent needs to know. Parsed and validated once at start-up.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The instance this agent serves (a subject token: letters, digits, '-' and '_').
    pub instance_id: String,
    /// Directory the agent owns: lock, intent records, the database's files.
    pub state_dir: PathBuf,
    /// NATS server URL.
    pub nats_url: String,
    /// This agent's own NATS credentials (creds file, 0600), when the server requires them.
    #[serde(default)]
    pub nats_creds: Option<PathBuf>,
    /// CA certificate (PEM) of the NATS server: connect with TLS and verify it.
    #[serde(default)]
    pub nats_ca_file: Option<PathBuf>,
    /// Where this agent's own log goes (the `guest` log), when it is a file.
    #[serde(default)]
    pub guest_log_file: Option<PathBuf>,
    /// How often to send a heartbeat.
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_interval_ms: u64,
    /// How long the database gets to shut down cleanly before it is killed.
    #[serde(default = "default_stop_timeout")]
    pub stop_timeout_s: u64,
    /// JetStream ack wait of the intent consumer; progress acks are sent at a third of it.
    #[serde(default = "default_ack_wait")]
    pub ack_wait_s: u64,
    /// Where the database listens.
    pub listen: ListenConfig,
    /// Which datastore this agent runs.
    pub datastore: DatastoreKind,
    /// Backup storage, keys and strategy (none: backups are refused with a clear error).
    #[serde(default)]
    pub backup: Option<coffer_strategies::backup::BackupConfig>,
}

/// Network placement of the database.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    /// Address the database binds to.
    pub bind_address: String,
    /// Port the database listens on.
    pub port: u16,
    /// Address clients are told to connect to (defaults to `bind_address`).
    #[serde(default)]
    pub advertise_host: Option<String>,
}

fn default_heartbeat_ms() -> u64 {
    2000
}
fn default_stop_timeout() -> u64 {
    60
}
fn default_ack_wait() -> u64 {
    30
}

impl AgentConfig {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading agent config {}", path.display()))?;
        let cfg: AgentConfig = toml::from_str(&text)
            .with_context(|| format!("parsing agent config {}", path.display()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks values that serde cannot.
    pub fn validate(&self) -> anyhow::Result<()> {
        if !coffer_proto::subjects::valid_token(&self.instance_id) {
            bail!(
                "instance_id '{}' must be 1-64 letters, digits, '-' or '_'",
                self.instance_id
            );
        }
        if self.heartbeat_interval_ms < 100 {
            bail!("heartbeat_interval_ms must be at least 100");
        }
        if self.ack_wait_s < 3 {
            bail!("ack_wait_s must be at least 3");
        }
        if self.listen.port == 0 {
            bail!("listen.port must not be 0");
        }
        Ok(())
    }

    /// Host clients should use.
    pub fn advertise_host(&self) -> &str {
        self.listen
            .advertise_host
            .as_deref()
            .unwrap_or(&self.listen.bind_address)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
instance_id = "abc-1"
state_dir = "/tmp/x"
nats_url = "nats://127.0.0.1:4222"
[listen]
bind_address = "127.0.0.1"
port = 3307
[datastore]
kind = "mariadb"
"#;

    #[test]
    fn parses_and_defaults() {
        let c: AgentConfig = toml::from_str(GOOD).unwrap();
        c.validate().unwrap();
        assert_eq!(c.heartbeat_interval_ms, 2000);
        assert_eq!(c.advertise_host(), "127.0.0.1");
        assert_eq!(c.datastore.name(), "mariadb");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let bad = GOOD.replace("[listen]", "colour = \"red\"\n[listen]");
        assert!(toml::from_str::<AgentConfig>(&bad).is_err());
        let bad = GOOD.replace("kind = \"mariadb\"", "kind = \"mariadb\"\nfoo = 1");
        assert!(toml::from_str::<AgentConfig>(&bad).is_err());
    }

    #[test]
    fn bad_instance_id_is_rejected() {
        let c: AgentConfig = toml::from_str(&GOOD.replace("abc-1", "a.b")).unwrap();
        assert!(c.validate().is_err());
    }
}
