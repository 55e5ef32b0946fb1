//! `cargo xtask dist [--out DIR] [--prebuilt BIN_DIR] [--no-compress]`: release binaries packaged as
//! `coffer-agent` and `coffer-controller` .deb files (dpkg-deb) and .rpm files (rpmbuild from a
//! generated spec; `apt-get install rpm` on Debian, done here when missing): the binary, the
//! hardened systemd unit from `packaging/systemd/`, a commented default config under
//! `/etc/coffer/` (a conffile, kept on upgrade) and maintainer scripts that create the `coffer`
//! system user and restart the service on upgrade (the agent's `KillMode=process` leaves the
//! database running). `--prebuilt` packages binaries already built (the test suite does).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

use crate::env;

struct Pkg {
    name: &'static str,
    unit: &'static str,
    config: &'static str,
    state: &'static str,
    depends: &'static str,
    /// The same for RPM-based distributions.
    requires: &'static str,
    summary: &'static str,
}

/// What every package of one `dist` run shares.
struct Job<'a> {
    repo: &'a Path,
    bins: &'a Path,
    out: &'a Path,
    compression: &'a str,
    version: &'a str,
}

impl Job<'_> {
    /// Copies a package's binary, unit (into `unit_dir`) and default config under `root`.
    fn stage(&self, p: &Pkg, root: &Path, unit_dir: &str) -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        for (from, to, mode) in [
            (
                self.bins.join(p.name),
                format!("/usr/bin/{}", p.name),
                0o755,
            ),
            (
                self.repo.join("packaging/systemd").join(p.unit),
                format!("{unit_dir}/{}", p.unit),
                0o644,
            ),
            (
                self.repo.join("packaging/etc").join(p.config),
                format!("/etc/coffer/{}", p.config),
                0o640,
            ),
        ] {
            let dst = root.join(to.trim_start_matches('/'));
            std::fs::create_dir_all(dst.parent().expect("a parent"))?;
            std::fs::copy(&from, &dst).with_context(|| format!("copying {}", from.display()))?;
            std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(mode))?;
        }
        Ok(())
    }
}

const PKGS: &[Pkg] = &[
    Pkg {
        name: "coffer-agent",
        unit: "coffer-agent.service",
        config: "agent.toml",
        state: "/var/lib/coffer/agent",
        depends: "adduser, mariadb-server, mariadb-client, mariadb-backup",
        requires: "shadow-utils, mariadb-server, mariadb, mariadb-backup",
        summary: "Coffer agent: runs beside one database and carries out the controller's intents",
    },
    Pkg {
        name: "coffer-controller",
        unit: "coffer-controller.service",
        config: "controller.toml",
        state: "/var/lib/coffer/controller",
        depends: "adduser",
        requires: "shadow-utils",
        summary: "Coffer controller: a Trove-compatible database-as-a-service API",
    },
];

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let mut out: Option<PathBuf> = None;
    let mut prebuilt: Option<PathBuf> = None;
    let mut compression = "xz";
    let mut version = env!("CARGO_PKG_VERSION").to_string();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--out" => out = Some(it.next().context("--out DIR")?.into()),
            "--prebuilt" => prebuilt = Some(it.next().context("--prebuilt BIN_DIR")?.into()),
            // Packages for a quick look (the test suite): not compressed.
            "--no-compress" => compression = "none",
            // Another package version (the upgrade test packages the same binaries twice).
            "--version" => version = it.next().context("--version VERSION")?.clone(),
            other => bail!(
                "unknown dist option '{other}' (known: --out DIR, --prebuilt BIN_DIR, --no-compress, --version V)"
            ),
        }
    }
    let repo = env::root();
    let bins = match prebuilt {
        Some(b) => b,
        None => env::build_release()?,
    };
    let out = out.unwrap_or_else(|| repo.join("target/dist"));
    std::fs::create_dir_all(&out)?;
    if !env::have("rpmbuild") {
        env::step("installing rpm (rpmbuild) with apt-get");
        env::apt_install(&["rpm"])?;
    }
    let job = Job {
        repo: &repo,
        bins: &bins,
        out: &out,
        compression,
        version: &version,
    };
    for p in PKGS {
        let deb = build_deb(&job, p)?;
        println!("{}", deb.display());
        let rpm = build_rpm(&job, p)?;
        println!("{}", rpm.display());
    }
    Ok(())
}

/// An .rpm with the same contents: the config is `%config(noreplace)` (kept on upgrade), the
/// user is made in `%pre`, the service restarted on upgrade (`%postun`), state kept on erase
/// (RPM has no purge: remove `/var/lib/coffer` by hand).
fn build_rpm(job: &Job, p: &Pkg) -> anyhow::Result<PathBuf> {
    let (out, compression, version) = (job.out, job.compression, job.version);
    let work = out.join(format!("{}-rpmbuild", p.name));
    let _ = std::fs::remove_dir_all(&work);
    let stage = work.join("stage");
    job.stage(p, &stage, "/usr/lib/systemd/system")?;
    std::fs::create_dir_all(stage.join(p.state.trim_start_matches('/')))?;
    let payload = match compression {
        "none" => "w0.ufdio",
        _ => "w6.xzdio",
    };
    let spec = format!(
        r#"Name: {name}
Version: {version}
Release: 1
Summary: {summary}
License: Apache-2.0
URL: https://example.invalid/coffer
BuildArch: x86_64
AutoReqProv: no
Requires: {requires}
%global _binary_payload {payload}
%global __os_install_post %{{nil}}
%global debug_package %{{nil}}

%description
{summary}.
Part of Coffer, database-as-a-service in the lineage of OpenStack Trove.

%install
cp -a {stage}/. %{{buildroot}}/

%pre
getent group coffer >/dev/null || groupadd -r coffer
getent passwd coffer >/dev/null || useradd -r -g coffer -d /var/lib/coffer -s /sbin/nologin -c "Coffer" coffer
exit 0

%post
if [ -d /run/systemd/system ]; then systemctl daemon-reload >/dev/null 2>&1 || :; fi

%preun
if [ $1 -eq 0 ] && [ -d /run/systemd/system ]; then systemctl --no-reload disable --now {unit} >/dev/null 2>&1 || :; fi

%postun
# An upgrade restarts the service; the agent's KillMode=process leaves the database running.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ $1 -ge 1 ]; then systemctl try-restart {unit} >/dev/null 2>&1 || :; fi
fi

%files
%attr(0755,root,root) /usr/bin/{name}
%attr(0644,root,root) /usr/lib/systemd/system/{unit}
%dir %attr(0750,root,coffer) /etc/coffer
%config(noreplace) %attr(0640,root,coffer) /etc/coffer/{config}
%dir %attr(0750,coffer,coffer) /var/lib/coffer
%dir %attr(0750,coffer,coffer) {state}
"#,
        name = p.name,
        summary = p.summary,
        requires = p.requires,
        unit = p.unit,
        config = p.config,
        state = p.state,
        stage = stage.display(),
    );
    std::fs::create_dir_all(work.join("top"))?;
    let spec_path = work.join(format!("{}.spec", p.name));
    std::fs::write(&spec_path, spec)?;
    let st = Command::new("rpmbuild")
        .arg("-bb")
        .arg("--define")
        .arg(format!("_topdir {}", work.join("top").display()))
        .arg("--define")
        .arg(format!("_rpmdir {}", work.display()))
        .arg("--define")
        .arg("_build_id_links none")
        .arg(&spec_path)
        .output()
        .context("running rpmbuild")?;
    if !st.status.success() {
        bail!(
            "rpmbuild failed for {}: {}",
            p.name,
            String::from_utf8_lossy(&st.stderr)
        );
    }
    let built = work
        .join("x86_64")
        .join(format!("{}-{version}-1.x86_64.rpm", p.name));
    let rpm = out.join(format!("{}-{version}-1.x86_64.rpm", p.name));
    std::fs::rename(&built, &rpm)
        .with_context(|| format!("rpmbuild left no {}", built.display()))?;
    std::fs::remove_dir_all(&work)?;
    Ok(rpm)
}

fn build_deb(job: &Job, p: &Pkg) -> anyhow::Result<PathBuf> {
    let (repo, out, compression, version) = (job.repo, job.out, job.compression, job.version);
    let root = out.join(format!("{}-root", p.name));
    let _ = std::fs::remove_dir_all(&root);
    job.stage(p, &root, "/lib/systemd/system")?;
    let script = |name: &str| -> anyhow::Result<()> {
        let text = std::fs::read_to_string(repo.join("packaging/deb").join(name))?
            .replace("@UNIT@", p.unit)
            .replace("@STATE@", p.state)
            .replace("@CONFIG@", p.config);
        let dst = root.join("DEBIAN").join(name);
        std::fs::create_dir_all(dst.parent().expect("a parent"))?;
        std::fs::write(&dst, text)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755))?;
        Ok(())
    };
    script("postinst")?;
    script("postrm")?;
    std::fs::write(
        root.join("DEBIAN/conffiles"),
        format!("/etc/coffer/{}\n", p.config),
    )?;
    let size_kb = dir_size(&root) / 1024 + 1;
    std::fs::write(
        root.join("DEBIAN/control"),
        format!(
            "Package: {name}\nVersion: {version}\nArchitecture: amd64\nMaintainer: Coffer developers <coffer@localhost>\n\
             Installed-Size: {size_kb}\nDepends: {deps}\nSection: database\nPriority: optional\n\
             Description: {summary}\n Part of Coffer, database-as-a-service in the lineage of OpenStack Trove.\n",
            name = p.name,
            deps = p.depends,
            summary = p.summary,
        ),
    )?;
    let deb = out.join(format!("{}_{version}_amd64.deb", p.name));
    let st = Command::new("dpkg-deb")
        .args(["--root-owner-group", &format!("-Z{compression}"), "--build"])
        .arg(&root)
        .arg(&deb)
        .stdout(std::process::Stdio::null())
        .status()
        .context("running dpkg-deb")?;
    if !st.success() {
        bail!("dpkg-deb failed for {}", p.name);
    }
    std::fs::remove_dir_all(&root)?;
    Ok(deb)
}

fn dir_size(p: &Path) -> u64 {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.flatten()
                .map(|e| match e.file_type() {
                    Ok(t) if t.is_dir() => dir_size(&e.path()),
                    _ => e.metadata().map(|m| m.len()).unwrap_or(0),
                })
                .sum()
        })
        .unwrap_or(0)
}
