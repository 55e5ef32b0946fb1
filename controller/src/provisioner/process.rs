//! The `process` provisioner: every instance's agent runs as a local process in its own session,
//! with its own directory (`<instances_dir>/<id>/`) and a port persisted in its config, so that
//! restarting the controller stops neither agents nor databases.
//!
//! Unix identities (`unix_users`, on by default when the controller runs as root): each
//! instance's agent, and so its database, runs as a user of its own (`coffer-<12 hex>`, with a
//! group of the same name and no other), created at placement and removed at delete; its
//! directory is 0700 and its own. Its directory in `local` backup storage is root's, sticky and
//! writable by its group (1770): it creates objects there, the controller takes each committed
//! backup over (root, 0644), so the agent reads but can neither replace nor delete it, and no
//! other instance can reach it. The controller's files stay its own (0700/0600).

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
    /// Run each instance under its own Unix user (needs root; the default when the controller
    /// runs as root). `false` runs every agent as the controller's own user.
    #[serde(default)]
    pub unix_users: Option<bool>,
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
    /// Whether instances get Unix users of their own.
    users: bool,
    /// The `local` backup storage's root, when backups go there.
    local_backup_root: Option<PathBuf>,
}

/// An instance's Unix identity.
#[derive(Debug, Clone, Copy)]
struct Identity {
    uid: u32,
    gid: u32,
}

fn short_hash(s: &str) -> String {
    data_encoding::HEXLOWER.encode(&openssl::sha::sha256(s.as_bytes()))[..12].to_string()
}

/// The Unix user (and group) of an instance.
pub fn user_name(instance: &str) -> String {
    format!("coffer-{}", short_hash(instance))
}

/// Runs a shadow-utils command, again while another holds the password files' lock.
async fn shadow(cmd: &str, args: &[&str]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = tokio::process::Command::new(cmd)
            .args(args)
            .output()
            .await
            .with_context(|| format!("running {cmd}"))?;
        if out.status.success() {
            return Ok(());
        }
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        // 10 (useradd/userdel/groupadd): the files are locked by a concurrent change.
        if (out.status.code() == Some(10) || err.contains("lock")) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        bail!("{cmd} {}: {err}", args.join(" "));
    }
}

/// Whether a path and every directory above it let other users reach it (and, for `exec`, run
/// it).
fn reachable_by_others(path: &Path, exec: bool) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let Ok(abs) = std::path::absolute(path) else {
        return false;
    };
    let mode = |p: &Path| std::fs::metadata(p).map(|m| m.permissions().mode()).ok();
    if exec && mode(&abs).is_none_or(|m| m & 0o005 != 0o005) {
        return false;
    }
    abs.ancestors()
        .skip(1)
        .all(|d| mode(d).is_some_and(|m| m & 0o001 != 0))
}

fn chown_tree(path: &Path, uid: u32, gid: Option<u32>) -> anyhow::Result<()> {
    let mut stack = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        std::os::unix::fs::lchown(&p, Some(uid), gid)
            .with_context(|| format!("changing the owner of {}", p.display()))?;
        if p.symlink_metadata().is_ok_and(|m| m.is_dir()) {
            for e in std::fs::read_dir(&p)?.flatten() {
                stack.push(e.path());
            }
        }
    }
    Ok(())
}

fn chmod(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))
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
    pub fn new(cfg: Config, local_backup_root: Option<PathBuf>) -> anyhow::Result<Self> {
        let root = nix::unistd::geteuid().is_root();
        let reachable = reachable_by_others(&cfg.agent_binary, true)
            && std::fs::create_dir_all(&cfg.instances_dir).is_ok()
            && reachable_by_others(&cfg.instances_dir.join("x"), false);
        let users = match cfg.unix_users {
            Some(true) if !root => bail!(
                "[provisioner] unix_users = true needs the controller to run as root"
            ),
            Some(true) if !reachable => bail!(
                "[provisioner] unix_users = true, but other users cannot reach {} or run {} (every directory above them needs o+x); move them or set unix_users = false",
                cfg.instances_dir.display(),
                cfg.agent_binary.display()
            ),
            Some(u) => u,
            None if root && !reachable => {
                warn!(
                    instances_dir = %cfg.instances_dir.display(),
                    agent_binary = %cfg.agent_binary.display(),
                    "instances run as the controller's own user: other users cannot reach the instances directory or the agent binary (every directory above them needs o+x); move them to give each instance its own Unix user"
                );
                false
            }
            None => root,
        };
        if users {
            chmod(&cfg.instances_dir, 0o711)?;
        }
        super::warn_if_ephemeral((cfg.port_min, cfg.port_max));
        Ok(ProcessProvisioner {
            cfg,
            alloc: Mutex::new(()),
            users,
            local_backup_root,
        })
    }

    /// The Unix identity of an instance placed with its own user (None: the controller's).
    fn identity(&self, id: &str) -> anyhow::Result<Option<Identity>> {
        if !self.users {
            return Ok(None);
        }
        let name = user_name(id);
        let u = nix::unistd::User::from_name(&name)?
            .with_context(|| format!("instance {id} has no Unix user {name}"))?;
        Ok(Some(Identity {
            uid: u.uid.as_raw(),
            gid: u.gid.as_raw(),
        }))
    }

    /// Creates the instance's user if missing.
    async fn create_identity(&self, id: &str) -> anyhow::Result<Identity> {
        let name = user_name(id);
        if nix::unistd::User::from_name(&name)?.is_none() {
            // A range of its own: the usual system range (100-999) is too small for a host
            // of instances, and these ids never meet a person's or a package's.
            shadow(
                "useradd",
                &[
                    "--system",
                    "-K",
                    "SYS_UID_MIN=500000",
                    "-K",
                    "SYS_UID_MAX=599999",
                    "-K",
                    "SYS_GID_MIN=500000",
                    "-K",
                    "SYS_GID_MAX=599999",
                    "--user-group",
                    "--no-create-home",
                    "--home-dir",
                    "/nonexistent",
                    "--shell",
                    "/usr/sbin/nologin",
                    "--comment",
                    &format!("Coffer instance {id}"),
                    &name,
                ],
            )
            .await?;
        }
        self.identity(id)?
            .context("the instance's user vanished after it was made")
    }

    /// The command for the agent, as the instance's user when it has one.
    #[allow(unsafe_code)]
    fn agent_command(&self, id: &str) -> anyhow::Result<tokio::process::Command> {
        let mut cmd = tokio::process::Command::new(&self.cfg.agent_binary);
        cmd.arg("--config").arg(self.config_path(id));
        if self.low_priority_marker(id).exists() {
            // SAFETY: only async-signal-safe system calls between fork and exec.
            unsafe {
                cmd.pre_exec(super::lower_priority);
            }
        }
        if let Some(who) = self.identity(id)? {
            let dir = self.dir(id);
            cmd.env("HOME", &dir).current_dir(&dir);
            // SAFETY: only async-signal-safe system calls between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    use nix::unistd::{setgid, setgroups, setuid, Gid, Uid};
                    setgroups(&[])?;
                    setgid(Gid::from_raw(who.gid))?;
                    setuid(Uid::from_raw(who.uid))?;
                    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o027));
                    Ok(())
                });
            }
        }
        Ok(cmd)
    }

    fn dir(&self, id: &str) -> PathBuf {
        self.cfg.instances_dir.join(id)
    }
    /// Present when the instance runs at a low priority ([`Placement::low_priority`]).
    fn low_priority_marker(&self, id: &str) -> PathBuf {
        self.cfg.instances_dir.join(format!("{id}.low-priority"))
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
        let mut cmd = self.agent_command(id)?;
        cmd.stdin(std::process::Stdio::null())
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
        // Several controllers may place on this host (sharing a store): one placement at a time
        // across processes too, or two pick the same port.
        // The lock is the instances directory's own (no file among the instances').
        std::fs::create_dir_all(&self.cfg.instances_dir)?;
        let lock = std::fs::File::open(&self.cfg.instances_dir)
            .context("opening the instances directory")?;
        let _placing = Flock::lock(lock, FlockArg::LockExclusive)
            .map_err(|(_, e)| anyhow::anyhow!("locking the instances directory: {e}"))?;
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
        // Beside the instance's directory (which its user owns), so only we can change it.
        if p.low_priority {
            write_private(&self.low_priority_marker(&p.instance_id), "")?;
        }
        if self.users {
            let who = self.create_identity(&p.instance_id).await?;
            chown_tree(&dir, who.uid, Some(who.gid))?;
            chmod(&dir, 0o700)?;
            // Its directory in local backup storage: root's, sticky, its group may create
            // there (committed backups are then taken over by the controller); nobody else's.
            if let Some(root) = &self.local_backup_root {
                let own = root.join(&p.instance_id);
                std::fs::create_dir_all(&own)
                    .with_context(|| format!("creating {}", own.display()))?;
                chmod(root, 0o711)?;
                std::os::unix::fs::lchown(&own, Some(0), Some(who.gid))
                    .with_context(|| format!("changing the owner of {}", own.display()))?;
                chmod(&own, 0o1770)?;
            }
        }
        // The agent makes its own key pair; we learn only the public half.
        let out = self
            .agent_command(&p.instance_id)?
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
            // Checked every few seconds by the leader: only a start is news.
            tracing::debug!(instance = id, pid = ?self.agent_pid(id), "agent runs");
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
        let who = self.identity(id).ok().flatten();
        if let Ok(mut cmd) = self.agent_command(id) {
            if let Ok(o) = cmd.arg("teardown").output().await {
                if !o.status.success() {
                    warn!(instance = id, stderr = %String::from_utf8_lossy(&o.stderr), "agent teardown failed");
                }
            }
        }
        remove_tree(&dir).await?;
        let _ = std::fs::remove_file(self.low_priority_marker(id));
        if let Some(who) = who {
            self.remove_identity(id, who).await?;
        }
        Ok(())
    }

    fn placed(&self) -> Vec<String> {
        super::dirs_in(&self.cfg.instances_dir)
    }

    fn heartbeat_interval_ms(&self) -> u64 {
        self.cfg.heartbeat_interval_ms
    }
}

impl ProcessProvisioner {
    /// Ends whatever still runs as the instance's user, hands what it leaves in local backup
    /// storage to root (backups outlive their instance, and a later user or group given the
    /// same id must not own them), and removes the user.
    async fn remove_identity(&self, id: &str, who: Identity) -> anyhow::Result<()> {
        let name = user_name(id);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = processes_of(who.uid);
            if left.is_empty() {
                break;
            }
            for pid in left {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            if Instant::now() > deadline {
                bail!("processes of {name} survive SIGKILL");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if let Some(root) = &self.local_backup_root {
            let own = root.join(id);
            if own.exists() {
                chown_tree(&own, 0, Some(0))?;
            }
        }
        if nix::unistd::User::from_name(&name)?.is_some() {
            shadow("userdel", &[&name]).await?;
        }
        Ok(())
    }
}

/// Processes running as `uid` (not zombies: those are gone but for their parent's wait).
fn processes_of(uid: u32) -> Vec<i32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let state = stat.rsplit_once(") ")?.1.chars().next()?;
            (e.metadata().ok()?.uid() == uid && state != 'Z').then_some(pid)
        })
        .collect()
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
