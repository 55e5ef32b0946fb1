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
    /// Enrolment of a host the controller did not provision: `run` enrols first when the host
    /// has no instance yet (see `coffer-agent enroll`).
    #[serde(default)]
    pub enrol: Option<EnrolConfig>,
}

/// `[enrol]`: where to enrol and with which one-time token.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrolConfig {
    /// The controller's API, e.g. `http://controller.example:8779`.
    pub controller_url: String,
    /// A file holding the one-time token (kept out of process arguments and of this file).
    pub token_file: PathBuf,
    /// CA certificate (PEM) to verify an `https` controller with.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Allow an `http://` controller (the token then crosses the network in the clear).
    #[serde(default)]
    pub insecure: bool,
}

/// Where an installed agent keeps its state unless told otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/coffer/agent";
/// The file enrolment writes into the state dir: the identity the controller assigned.
pub const ENROLMENT_FILE: &str = "enrolment.toml";

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

/// Reads a config file as a table, with the installed defaults (state dir, `[listen]` on
/// 0.0.0.0:3306) and, after enrolment, the identity in `<state_dir>/enrolment.toml` filled in
/// where the file itself says nothing. A missing file is an empty one (a host about to enrol).
pub fn effective_table(path: &Path) -> anyhow::Result<toml::Table> {
    let mut t: toml::Table = match std::fs::read_to_string(path) {
        Ok(text) => toml::from_str(&text)
            .with_context(|| format!("parsing agent config {}", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => toml::Table::new(),
        Err(e) => {
            return Err(e).with_context(|| format!("reading agent config {}", path.display()))
        }
    };
    t.entry("state_dir")
        .or_insert_with(|| toml::Value::String(DEFAULT_STATE_DIR.into()));
    t.entry("listen").or_insert_with(|| {
        let mut l = toml::Table::new();
        l.insert("bind_address".into(), "0.0.0.0".into());
        l.insert("port".into(), 3306.into());
        toml::Value::Table(l)
    });
    let state_dir = PathBuf::from(
        t["state_dir"]
            .as_str()
            .context("state_dir is not a string")?,
    );
    let enrolled = state_dir.join(ENROLMENT_FILE);
    if let Ok(text) = std::fs::read_to_string(&enrolled) {
        let e: toml::Table =
            toml::from_str(&text).with_context(|| format!("parsing {}", enrolled.display()))?;
        for (k, v) in e {
            t.entry(k).or_insert(v);
        }
    }
    Ok(t)
}

impl AgentConfig {
    /// Reads and validates a config file (with [`effective_table`]'s defaults and enrolment).
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let t = effective_table(path)?;
        if !t.contains_key("instance_id") {
            bail!(
                "{} names no instance_id and this host is not enrolled: run `coffer-agent enroll \
                 --controller URL --token-file FILE` with a token from the controller's \
                 administrator, or add an [enrol] section",
                path.display()
            );
        }
        Self::from_table(t).with_context(|| format!("agent config {}", path.display()))
    }

    /// Deserializes and validates an effective table.
    pub fn from_table(t: toml::Table) -> anyhow::Result<Self> {
        let cfg: AgentConfig = t.try_into()?;
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

    /// A good config for the default datastore.
    fn good() -> String {
        format!(
            r#"
instance_id = "abc-1"
state_dir = "/tmp/x"
nats_url = "nats://127.0.0.1:4222"
[listen]
bind_address = "127.0.0.1"
port = 3307
[datastore]
kind = "{}"
"#,
            coffer_proto::Datastore::DEFAULT.id()
        )
    }

    #[test]
    fn parses_and_defaults() {
        let c: AgentConfig = toml::from_str(&good()).unwrap();
        c.validate().unwrap();
        assert_eq!(c.heartbeat_interval_ms, 2000);
        assert_eq!(c.advertise_host(), "127.0.0.1");
        assert_eq!(c.datastore.datastore(), coffer_proto::Datastore::DEFAULT);
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let bad = good().replace("[listen]", "colour = \"red\"\n[listen]");
        assert!(toml::from_str::<AgentConfig>(&bad).is_err());
        let kind = format!("kind = \"{}\"", coffer_proto::Datastore::DEFAULT.id());
        let bad = good().replace(&kind, &format!("{kind}\nfoo = 1"));
        assert!(toml::from_str::<AgentConfig>(&bad).is_err());
    }

    #[test]
    fn bad_instance_id_is_rejected() {
        let c: AgentConfig = toml::from_str(&good().replace("abc-1", "a.b")).unwrap();
        assert!(c.validate().is_err());
    }
}
