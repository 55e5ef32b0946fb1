//! `cargo xtask dist [--out DIR] [--prebuilt BIN_DIR] [--no-compress]`: release binaries packaged as
//! `coffer-agent` and `coffer-controller` .deb files (dpkg-deb, no extra tool): the binary, the
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
    summary: &'static str,
}

const PKGS: &[Pkg] = &[
    Pkg {
        name: "coffer-agent",
        unit: "coffer-agent.service",
        config: "agent.toml",
        state: "/var/lib/coffer/agent",
        depends: "adduser, mariadb-server, mariadb-client, mariadb-backup",
        summary: "Coffer agent: runs beside one database and carries out the controller's intents",
    },
    Pkg {
        name: "coffer-controller",
        unit: "coffer-controller.service",
        config: "controller.toml",
        state: "/var/lib/coffer/controller",
        depends: "adduser",
        summary: "Coffer controller: a Trove-compatible database-as-a-service API",
    },
];

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let mut out: Option<PathBuf> = None;
    let mut prebuilt: Option<PathBuf> = None;
    let mut compression = "xz";
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--out" => out = Some(it.next().context("--out DIR")?.into()),
            "--prebuilt" => prebuilt = Some(it.next().context("--prebuilt BIN_DIR")?.into()),
            // Packages for a quick look (the test suite): not compressed.
            "--no-compress" => compression = "none",
            other => bail!(
                "unknown dist option '{other}' (known: --out DIR, --prebuilt BIN_DIR, --no-compress)"
            ),
        }
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("the repository root")?
        .to_path_buf();
    let bins = match prebuilt {
        Some(b) => b,
        None => {
            let tools = env::prepare()?;
            env::step("building release binaries");
            env::cargo(&[
                "build",
                "--release",
                "-p",
                "coffer-agent",
                "-p",
                "coffer-controller",
            ])?;
            tools.target_dir.join("release")
        }
    };
    let out = out.unwrap_or_else(|| repo.join("target/dist"));
    std::fs::create_dir_all(&out)?;
    for p in PKGS {
        let deb = build_deb(&repo, &bins, &out, p, compression)?;
        println!("{}", deb.display());
    }
    Ok(())
}

fn build_deb(
    repo: &Path,
    bins: &Path,
    out: &Path,
    p: &Pkg,
    compression: &str,
) -> anyhow::Result<PathBuf> {
    let version = env!("CARGO_PKG_VERSION");
    let root = out.join(format!("{}-root", p.name));
    let _ = std::fs::remove_dir_all(&root);
    let copy = |from: &Path, to: &str, mode: u32| -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let dst = root.join(to.trim_start_matches('/'));
        std::fs::create_dir_all(dst.parent().expect("a parent"))?;
        std::fs::copy(from, &dst).with_context(|| format!("copying {}", from.display()))?;
        std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(mode))?;
        Ok(())
    };
    copy(&bins.join(p.name), &format!("/usr/bin/{}", p.name), 0o755)?;
    copy(
        &repo.join("packaging/systemd").join(p.unit),
        &format!("/lib/systemd/system/{}", p.unit),
        0o644,
    )?;
    copy(
        &repo.join("packaging/etc").join(p.config),
        &format!("/etc/coffer/{}", p.config),
        0o640,
    )?;
    let script = |name: &str| -> anyhow::Result<()> {
        let text = std::fs::read_to_string(repo.join("packaging/deb").join(name))?
            .replace("@UNIT@", p.unit)
            .replace("@STATE@", p.state);
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
