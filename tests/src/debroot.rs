//! A fresh Debian 12 root to install Coffer's packages into: made once per machine with
//! mmdebstrap (minbase plus what coffer-agent depends on, from Debian's archive) and kept as a
//! tarball in the cache dir; every test unpacks its own copy into a temp dir. Commands run in it
//! through `chroot` inside a private mount namespace (`unshare -m`) with /proc and /dev mounted,
//! so nothing is left mounted on the machine when they end.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Bump when the package list changes (a new tarball is built).
const ROOT_VERSION: &str = "bookworm-v1";
const INCLUDE: &str = "adduser,mariadb-server,mariadb-client,mariadb-backup,ca-certificates";

/// The same cache dir as `cargo xtask` uses.
fn cache_dir() -> PathBuf {
    if let Ok(x) = std::env::var("XDG_CACHE_HOME") {
        return PathBuf::from(x).join("coffer");
    }
    PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/tmp".into())).join(".cache/coffer")
}

/// The cached root tarball, built now if missing (a few minutes, once).
fn tarball() -> PathBuf {
    use nix::fcntl::{Flock, FlockArg};
    let dir = cache_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let tar = dir.join(format!("debian-root-{ROOT_VERSION}.tar"));
    let lock = std::fs::File::create(dir.join("debian-root.lock")).unwrap();
    let _held = Flock::lock(lock, FlockArg::LockExclusive).unwrap();
    if tar.exists() {
        return tar;
    }
    let partial = dir.join(format!("debian-root-{ROOT_VERSION}.tar.partial"));
    eprintln!("building a Debian 12 root with mmdebstrap (once per machine)...");
    let out = Command::new("mmdebstrap")
        .args([
            "--variant=minbase",
            "--mode=root",
            "--format=tar",
            "--aptopt=APT::Install-Recommends \"false\"",
        ])
        .arg(format!("--include={INCLUDE}"))
        .args(["bookworm"])
        .arg(&partial)
        .output()
        .expect("running mmdebstrap (cargo xtask test installs it)");
    assert!(
        out.status.success(),
        "mmdebstrap failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::rename(&partial, &tar).unwrap();
    tar
}

/// A fresh root unpacked under `dir`.
pub struct DebianRoot {
    pub path: PathBuf,
}

impl DebianRoot {
    pub fn new(dir: &Path) -> DebianRoot {
        let path = dir.join("root");
        std::fs::create_dir_all(&path).unwrap();
        let st = Command::new("tar")
            .arg("-C")
            .arg(&path)
            .arg("-xf")
            .arg(tarball())
            .status()
            .unwrap();
        assert!(st.success(), "unpacking the Debian root");
        DebianRoot { path }
    }

    /// `args` run inside the root (as `user`, default root), with /proc and /dev mounted in a
    /// private mount namespace.
    pub fn cmd(&self, user: Option<&str>, args: &[&str]) -> Command {
        let mut c = Command::new("unshare");
        c.args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(
                "r=\"$1\"; u=\"$2\"; shift 2; \
                 mount -t proc proc \"$r/proc\" && mount --rbind /dev \"$r/dev\" && \
                 if [ -n \"$u\" ]; then exec chroot --userspec=\"$u\" \"$r\" \"$@\"; \
                 else exec chroot \"$r\" \"$@\"; fi",
            )
            .arg("sh")
            .arg(&self.path)
            .arg(user.unwrap_or(""))
            .args(args)
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("DEBIAN_FRONTEND", "noninteractive");
        c
    }

    /// Runs a command in the root; panics with its output when it fails.
    pub fn run(&self, args: &[&str]) -> String {
        let out = self.cmd(None, args).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?} in the Debian root: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A path inside the root, seen from outside.
    pub fn at(&self, p: &str) -> PathBuf {
        self.path.join(p.trim_start_matches('/'))
    }

    /// Copies a file into the root's /tmp; returns its path inside.
    pub fn copy_in(&self, file: &Path) -> String {
        let name = file.file_name().unwrap().to_string_lossy().to_string();
        std::fs::copy(file, self.at("/tmp").join(&name)).unwrap();
        format!("/tmp/{name}")
    }
}
