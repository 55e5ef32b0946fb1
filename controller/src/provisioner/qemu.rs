//! The `qemu` provisioner: every instance is a VM booted from Coffer's guest image (`cargo xtask
//! image`) on this host. Its disk is a copy-on-write overlay of the image; a NoCloud seed (a small
//! FAT volume labelled CIDATA) hands cloud-init the agent's config: the controller's URL and a
//! one-time enrolment token. At first boot the agent makes its key pair and enrols, and the
//! controller seals the instance's secrets to that key (see `api::enrol`).
//!
//! Networking is qemu's user mode: the guest reaches this host's loopback as 10.0.2.2 (set
//! `agent_nats_url` and `controller_url` accordingly) and the database's port is forwarded from
//! a port of this host. qemu runs daemonized, so restarting the controller leaves VMs running.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use async_trait::async_trait;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::Deserialize;
use tokio::process::Command;
use tokio::sync::Mutex;
use tracing::{info, warn};

use super::{Placed, Placement, Provisioner};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The guest image (qcow2) built by `cargo xtask image`.
    pub image: PathBuf,
    /// Where instance directories (disk overlay, seed, console log) live.
    pub instances_dir: PathBuf,
    /// The controller's API as the guest reaches it (user-mode networking: 10.0.2.2 is the host).
    pub controller_url: String,
    /// Host ports forwarded to the guests' databases (inclusive range).
    pub port_min: u16,
    pub port_max: u16,
    /// Host address the forwarded ports bind to, which clients use.
    #[serde(default = "default_bind")]
    pub bind_address: String,
    #[serde(default = "default_qemu")]
    pub qemu_binary: PathBuf,
    /// Firmware to boot with (`-bios`): none means qemu's SeaBIOS, which boots the image through
    /// syslinux; an OVMF build boots it through systemd-boot (UEFI).
    #[serde(default)]
    pub firmware: Option<PathBuf>,
    #[serde(default = "default_memory")]
    pub memory_mb: u64,
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    /// `kvm`, `tcg` (software emulation) or `auto`: KVM when /dev/kvm opens and the CPU has
    /// hardware virtualization (some hosts have a /dev/kvm that runs only paravirtualized
    /// guests), else TCG.
    #[serde(default = "default_accel")]
    pub accel: String,
    /// Extra disk space for the database on top of the image's size.
    #[serde(default = "default_extra_disk")]
    pub disk_extra_gb: u64,
    /// Heartbeat interval of the agents (sent to them at enrolment).
    #[serde(default = "default_hb")]
    pub heartbeat_interval_ms: u64,
}

fn default_bind() -> String {
    "127.0.0.1".into()
}
fn default_qemu() -> PathBuf {
    "qemu-system-x86_64".into()
}
fn default_memory() -> u64 {
    1024
}
fn default_cpus() -> u32 {
    1
}
fn default_accel() -> String {
    "auto".into()
}
fn default_extra_disk() -> u64 {
    2
}
fn default_hb() -> u64 {
    2000
}

pub struct QemuProvisioner {
    cfg: Config,
    alloc: Mutex<()>,
    /// One boot at a time: `start` and the respawn timer's `ensure` never race to two qemus.
    booting: Mutex<()>,
    accel: std::sync::OnceLock<&'static str>,
}

/// What `prepare` keeps in the instance directory for `start` and `ensure`.
#[derive(serde::Serialize, Deserialize)]
struct VmRecord {
    port: u16,
    /// A restore drill's throwaway VM: qemu runs at a low CPU and I/O priority.
    #[serde(default)]
    low_priority: bool,
}

impl QemuProvisioner {
    pub fn new(cfg: Config) -> Self {
        super::warn_if_ephemeral((cfg.port_min, cfg.port_max));
        QemuProvisioner {
            cfg,
            alloc: Mutex::new(()),
            booting: Mutex::new(()),
            accel: std::sync::OnceLock::new(),
        }
    }

    fn dir(&self, id: &str) -> PathBuf {
        self.cfg.instances_dir.join(id)
    }

    fn record(&self, id: &str) -> anyhow::Result<VmRecord> {
        let p = self.dir(id).join("vm.toml");
        let text =
            std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        Ok(toml::from_str(&text)?)
    }

    fn used_ports(&self) -> Vec<u16> {
        let Ok(rd) = std::fs::read_dir(&self.cfg.instances_dir) else {
            return vec![];
        };
        rd.flatten()
            .filter_map(|e| std::fs::read_to_string(e.path().join("vm.toml")).ok())
            .filter_map(|t| toml::from_str::<VmRecord>(&t).ok())
            .map(|r| r.port)
            .collect()
    }

    fn pick_port(&self) -> anyhow::Result<u16> {
        super::free_port(
            &self.cfg.bind_address,
            (self.cfg.port_min, self.cfg.port_max),
            &self.used_ports(),
            "VM",
        )
    }

    /// The running qemu of an instance, if any.
    fn qemu_pid(&self, id: &str) -> Option<i32> {
        let pid: i32 = std::fs::read_to_string(self.dir(id).join("qemu.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let dir = self.dir(id);
        let needle = dir.to_string_lossy();
        String::from_utf8_lossy(&cmdline)
            .contains(needle.as_ref())
            .then_some(pid)
    }

    fn accel(&self) -> &'static str {
        match self.cfg.accel.as_str() {
            "kvm" => "kvm",
            "tcg" => "tcg",
            _ => self.accel.get_or_init(|| {
                let kvm = kvm_usable();
                info!(kvm, "qemu acceleration probed");
                if kvm {
                    "kvm"
                } else {
                    "tcg"
                }
            }),
        }
    }

    /// Boots the VM unless it runs; from then on `ensure` keeps it running.
    async fn boot(&self, id: &str) -> anyhow::Result<()> {
        let _one = self.booting.lock().await;
        if self.qemu_pid(id).is_some() {
            return Ok(());
        }
        let dir = self.dir(id);
        let rec = self.record(id)?;
        let accel = self.accel();
        let mut cmd = Command::new(&self.cfg.qemu_binary);
        cmd.arg("-name")
            .arg(format!("coffer-{id}"))
            .args(["-machine", &format!("q35,accel={accel}")])
            .args(["-cpu", if accel == "kvm" { "host" } else { "max" }])
            // Software emulation runs one host thread per vCPU (multi-threaded TCG).
            .args(["-m", &self.cfg.memory_mb.to_string()])
            .args(["-smp", &self.cfg.cpus.to_string()]);
        if let Some(fw) = &self.cfg.firmware {
            cmd.arg("-bios").arg(fw);
        }
        cmd.arg("-drive")
            .arg(format!(
                "file={},if=virtio,format=qcow2,discard=unmap",
                dir.join("disk.qcow2").display()
            ))
            .arg("-drive")
            .arg(format!(
                "file={},if=virtio,format=raw,readonly=on",
                dir.join("seed.img").display()
            ))
            .arg("-netdev")
            .arg(format!(
                "user,id=n0,hostfwd=tcp:{}:{}-:3306",
                self.cfg.bind_address, rec.port
            ))
            .args(["-device", "virtio-net-pci,netdev=n0"])
            .args(["-device", "virtio-rng-pci"])
            .args(["-display", "none", "-monitor", "none"])
            .arg("-serial")
            .arg(format!("file:{}", dir.join("console.log").display()))
            .arg("-pidfile")
            .arg(dir.join("qemu.pid"))
            .arg("-daemonize")
            .stdin(std::process::Stdio::null());
        if rec.low_priority {
            // SAFETY: only async-signal-safe system calls between fork and exec.
            #[allow(unsafe_code)]
            unsafe {
                cmd.pre_exec(super::lower_priority);
            }
        }
        let out = cmd
            .output()
            .await
            .with_context(|| format!("running {}", self.cfg.qemu_binary.display()))?;
        if !out.status.success() {
            bail!(
                "qemu failed to start the VM: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        std::fs::write(dir.join("booted"), b"")?;
        info!(instance = id, accel, port = rec.port, "VM booting");
        Ok(())
    }
}

/// Whether KVM can run an ordinary guest here: /dev/kvm opens and the CPU has hardware
/// virtualization (vmx or svm). A /dev/kvm without them (e.g. the `kvm_pvm` module, which runs
/// only paravirtualized guest kernels) fails on the first firmware or boot-loader instruction.
fn kvm_usable() -> bool {
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let hw = std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| {
            c.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
        })
        .unwrap_or(false);
    dev && hw
}

async fn run(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The NoCloud seed: cloud-init writes the agent's config (controller URL, token file) and the
/// image's coffer-agent unit, ordered after cloud-init, enrols and runs the database.
fn user_data(controller_url: &str, token: &str) -> String {
    let indent = |s: &str| {
        s.lines()
            .map(|l| format!("      {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    // The guest reaches the controller through qemu's user-mode network (10.0.2.2 is this
    // host), so a plain-http controller never leaves the host; anything else must be https.
    let insecure = if controller_url.starts_with("http://10.0.2.2:") {
        "insecure = true\n"
    } else {
        ""
    };
    let agent_toml = format!(
        "# Written by cloud-init from the coffer-controller's NoCloud seed.\n\
         [listen]\nbind_address = \"0.0.0.0\"\nport = 3306\n\n\
         [enrol]\ncontroller_url = {controller_url:?}\ntoken_file = \"/etc/coffer/enrol-token\"\n{insecure}"
    );
    format!(
        "#cloud-config\n\
         write_files:\n\
         \x20 - path: /etc/coffer/enrol-token\n\
         \x20   owner: root:coffer\n\
         \x20   permissions: '0640'\n\
         \x20   content: {token}\n\
         \x20 - path: /etc/coffer/agent.toml\n\
         \x20   owner: root:coffer\n\
         \x20   permissions: '0640'\n\
         \x20   content: |\n{}\n",
        indent(&agent_toml)
    )
}

#[async_trait]
impl Provisioner for QemuProvisioner {
    async fn prepare(&self, p: &Placement) -> anyhow::Result<Placed> {
        let token = p
            .enrol_token
            .as_deref()
            .context("the qemu provisioner needs an enrolment token")?;
        if !self.cfg.image.exists() {
            bail!(
                "the guest image {} does not exist; build it with `cargo xtask image`",
                self.cfg.image.display()
            );
        }
        let _g = self.alloc.lock().await;
        let dir = self.dir(&p.instance_id);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let port = self.pick_port()?;
        std::fs::write(
            dir.join("vm.toml"),
            toml::to_string(&VmRecord {
                port,
                low_priority: p.low_priority,
            })?,
        )?;
        drop(_g);
        // The disk: a copy-on-write overlay of the image, grown by cloud-init's growpart.
        let image_size = {
            let out = Command::new("qemu-img")
                .args(["info", "--output=json"])
                .arg(&self.cfg.image)
                .output()
                .await
                .context("running qemu-img info")?;
            let v: serde_json::Value =
                serde_json::from_slice(&out.stdout).context("qemu-img info printed no JSON")?;
            v["virtual-size"].as_u64().context("image size")?
        };
        run(
            Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
                .arg(&self.cfg.image)
                .arg(dir.join("disk.qcow2"))
                .arg((image_size + (self.cfg.disk_extra_gb << 30)).to_string()),
            "qemu-img create",
        )
        .await?;
        // The seed: a FAT volume labelled CIDATA, written without mounting (mtools).
        let seed = dir.join("seed.img");
        let _ = std::fs::remove_file(&seed);
        run(
            Command::new("mkfs.vfat")
                .args(["-n", "CIDATA", "-C"])
                .arg(&seed)
                .arg("2048"),
            "mkfs.vfat",
        )
        .await?;
        let files = dir.join("seed");
        std::fs::create_dir_all(&files)?;
        let meta = format!(
            "instance-id: {id}\nlocal-hostname: coffer-{short}\n",
            id = p.instance_id,
            short = &p.instance_id[..8.min(p.instance_id.len())]
        );
        super::process::write_private(&files.join("meta-data"), &meta)?;
        super::process::write_private(
            &files.join("user-data"),
            &user_data(&self.cfg.controller_url, token),
        )?;
        run(
            Command::new("mcopy")
                .env("MTOOLS_SKIP_CHECK", "1")
                .arg("-i")
                .arg(&seed)
                .arg(files.join("meta-data"))
                .arg(files.join("user-data"))
                .arg("::"),
            "mcopy",
        )
        .await?;
        std::fs::remove_dir_all(&files)?;
        Ok(Placed {
            host: self.cfg.bind_address.clone(),
            port,
            public_key: vec![],
        })
    }

    async fn start(&self, id: &str) -> anyhow::Result<()> {
        self.boot(id).await
    }

    async fn ensure(&self, id: &str) -> anyhow::Result<()> {
        if !self.dir(id).join("disk.qcow2").exists() {
            bail!(
                "instance {id} has no VM disk under {}",
                self.dir(id).display()
            );
        }
        if !self.dir(id).join("booted").exists() {
            // Placed but not started yet: the build starts it.
            return Ok(());
        }
        if self.qemu_pid(id).is_some() {
            return Ok(());
        }
        warn!(instance = id, "VM not running; booting it again");
        self.boot(id).await
    }

    async fn destroy(&self, id: &str) -> anyhow::Result<()> {
        let dir = self.dir(id);
        if !dir.exists() {
            return Ok(());
        }
        if let Some(pid) = self.qemu_pid(id) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.qemu_pid(id).is_some() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if self.qemu_pid(id).is_some() {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        match tokio::fs::remove_dir_all(&dir).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing {}", dir.display())),
        }
    }

    fn placed(&self) -> Vec<String> {
        super::dirs_in(&self.cfg.instances_dir)
    }

    fn heartbeat_interval_ms(&self) -> u64 {
        self.cfg.heartbeat_interval_ms
    }

    fn key_at_enrolment(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_is_cloud_config_with_the_agent_config() {
        let u = user_data("http://10.0.2.2:8779", "coffer-enrol-abc");
        assert!(u.starts_with("#cloud-config\n"));
        assert!(u.contains("    content: coffer-enrol-abc\n"));
        assert!(u.contains("      controller_url = \"http://10.0.2.2:8779\"\n"));
        assert!(u.contains("      token_file = \"/etc/coffer/enrol-token\"\n"));
    }
}
