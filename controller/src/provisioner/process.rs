//! The `process` provisioner: every instance's agent runs as a local process in its own session,
//! with its own directory (`<instances_dir>/<id>/`) and a port persisted in its config, so that
//! restarting the controller stops neither agents nor databases.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use async_trait::async_trait;
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::Deserialize;
use tokio::sync::Mutex;
use tracing::{info, warn};

use super::{Placed, Placement, Provisioner};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The coffer-agent binary.
    pub agent_binary: PathBuf,
    /// Where instance directories live.
    pub instances_dir: PathBuf,
    /// Ports handed to databases (inclusive range).
    pub port_min: u16,
    pub port_max: u16,
    /// Address the databases bind to and clients use.
    #[serde(default = "default_bind")]
    pub bind_address: String,
    /// Heartbeat interval of the agents.
    #[serde(default = "default_hb")]
    pub heartbeat_interval_ms: u64,
    /// Extra TOML appended to each agent's `[datastore]` table (e.g. binary paths).
    #[serde(default)]
    pub datastore_extra: String,
}

fn default_bind() -> String {
    "127.0.0.1".into()
}
fn default_hb() -> u64 {
    2000
}

pub struct ProcessProvisioner {
    cfg: Config,
    alloc: Mutex<()>,
}

#[derive(Deserialize)]
struct AgentToml {
    listen: ListenToml,
}
#[derive(Deserialize)]
struct ListenToml {
    port: u16,
}

impl ProcessProvisioner {
    pub fn new(cfg: Config) -> Self {
        ProcessProvisioner {
            cfg,
            alloc: Mutex::new(()),
        }
    }

    fn dir(&self, id: &str) -> PathBuf {
        self.cfg.instances_dir.join(id)
    }
    fn config_path(&self, id: &str) -> PathBuf {
        self.dir(id).join("agent.toml")
    }
    fn state_dir(&self, id: &str) -> PathBuf {
        self.dir(id).join("state")
    }

    fn used_ports(&self) -> Vec<u16> {
        let Ok(rd) = std::fs::read_dir(&self.cfg.instances_dir) else {
            return vec![];
        };
        rd.flatten()
            .filter_map(|e| std::fs::read_to_string(e.path().join("agent.toml")).ok())
            .filter_map(|t| toml::from_str::<AgentToml>(&t).ok())
            .map(|a| a.listen.port)
            .collect()
    }

    fn pick_port(&self) -> anyhow::Result<u16> {
        super::free_port(
            &self.cfg.bind_address,
            (self.cfg.port_min, self.cfg.port_max),
            &self.used_ports(),
            "database",
        )
    }

    /// Whether an agent holds the instance's state lock.
    fn agent_running(&self, id: &str) -> bool {
        let lock = self.state_dir(id).join("agent.lock");
        let Ok(f) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&lock)
        else {
            return false;
        };
        match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
            Ok(_held) => false,
            Err(_) => true,
        }
    }

    fn agent_pid(&self, id: &str) -> Option<i32> {
        std::fs::read_to_string(self.state_dir(id).join("agent.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn spawn_agent(&self, id: &str) -> anyhow::Result<()> {
        let dir = self.dir(id);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("agent.log"))
            .context("opening agent.log")?;
        let mut cmd = tokio::process::Command::new(&self.cfg.agent_binary);
        cmd.arg("--config")
            .arg(self.config_path(id))
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .kill_on_drop(false);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", self.cfg.agent_binary.display()))?;
        info!(instance = id, pid = child.id(), "agent started");
        // Reap it if it exits while we run; if we exit first it lives on.
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        Ok(())
    }
}

#[async_trait]
impl Provisioner for ProcessProvisioner {
    async fn prepare(&self, p: &Placement) -> anyhow::Result<Placed> {
        let _g = self.alloc.lock().await;
        let dir = self.dir(&p.instance_id);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let port = self.pick_port()?;
        let extra = self.cfg.datastore_extra.trim();
        let creds_line = match &p.nats_creds {
            Some(c) => {
                let path = dir.join("agent.creds");
                write_private(&path, c)?;
                format!("nats_creds = {:?}\n", path.display().to_string())
            }
            None => String::new(),
        };
        let ca_line = match &p.nats_ca_file {
            Some(ca) => format!("nats_ca_file = {:?}\n", ca.display().to_string()),
            None => String::new(),
        };
        let toml = format!(
            "# Written by the coffer-controller process provisioner.\n\
             instance_id = {id:?}\n\
             state_dir = {state:?}\n\
             nats_url = {nats:?}\n\
             {creds_line}{ca_line}\
             heartbeat_interval_ms = {hb}\n\
             guest_log_file = {guest_log:?}\n\
             \n[listen]\nbind_address = {bind:?}\nport = {port}\n\
             \n[datastore]\nkind = {kind:?}\n{extra}\n{backup}",
            id = p.instance_id,
            state = self.state_dir(&p.instance_id).display().to_string(),
            nats = p.nats_url,
            hb = self.cfg.heartbeat_interval_ms,
            guest_log = self
                .dir(&p.instance_id)
                .join("agent.log")
                .display()
                .to_string(),
            bind = self.cfg.bind_address,
            kind = p.manager,
            backup = p
                .backup_toml
                .as_ref()
                .map(|t| format!("\n{t}"))
                .unwrap_or_default(),
        );
        write_private(&self.config_path(&p.instance_id), &toml)?;
        // The agent makes its own key pair; we learn only the public half.
        let out = tokio::process::Command::new(&self.cfg.agent_binary)
            .arg("--config")
            .arg(self.config_path(&p.instance_id))
            .arg("keygen")
            .output()
            .await
            .with_context(|| format!("running {} keygen", self.cfg.agent_binary.display()))?;
        if !out.status.success() {
            bail!(
                "coffer-agent keygen failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let public_key = coffer_proto::seal::from_hex(String::from_utf8_lossy(&out.stdout).trim())
            .filter(|k| k.len() == 32)
            .context("coffer-agent keygen printed no hex key")?;
        Ok(Placed {
            host: self.cfg.bind_address.clone(),
            port,
            public_key,
        })
    }

    async fn start(&self, id: &str) -> anyhow::Result<()> {
        self.spawn_agent(id)
    }

    async fn ensure(&self, id: &str) -> anyhow::Result<()> {
        if !self.config_path(id).exists() {
            bail!(
                "instance {id} has no agent config under {}",
                self.dir(id).display()
            );
        }
        if self.agent_running(id) {
            info!(instance = id, pid = ?self.agent_pid(id), "adopted running agent");
            return Ok(());
        }
        self.spawn_agent(id)
    }

    async fn destroy(&self, id: &str) -> anyhow::Result<()> {
        let dir = self.dir(id);
        if !dir.exists() {
            return Ok(());
        }
        if self.agent_running(id) {
            if let Some(pid) = self.agent_pid(id) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
                let deadline = Instant::now() + Duration::from_secs(10);
                while self.agent_running(id) && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                if self.agent_running(id) {
                    warn!(instance = id, pid, "agent ignored SIGTERM; killing it");
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        // The agent normally stopped the database already; this catches one it never reached.
        let out = tokio::process::Command::new(&self.cfg.agent_binary)
            .arg("--config")
            .arg(self.config_path(id))
            .arg("teardown")
            .output()
            .await;
        if let Ok(o) = out {
            if !o.status.success() {
                warn!(instance = id, stderr = %String::from_utf8_lossy(&o.stderr), "agent teardown failed");
            }
        }
        remove_tree(&dir).await
    }

    fn heartbeat_interval_ms(&self) -> u64 {
        self.cfg.heartbeat_interval_ms
    }
}

pub(super) fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

async fn remove_tree(dir: &Path) -> anyhow::Result<()> {
    match tokio::fs::remove_dir_all(dir).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", dir.display())),
    }
}
