//! `cargo xtask image [--out FILE] [--test]`: the Coffer guest image (Debian 12, MariaDB,
//! mariadb-backup, cloud-init and the coffer-agent package; `packaging/image/build-image.sh`),
//! then, with `--test`, the boot → cloud-init → enrol → heartbeat → ACTIVE test against it (the
//! `image` test of the suite's crate, which is ignored in the suite itself).

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};

use crate::env;

/// Installs the image tools; qemu-system must match an installed backported qemu-utils.
fn tools() -> anyhow::Result<()> {
    let mut missing = vec![];
    for (bin, pkg) in [
        ("mmdebstrap", "mmdebstrap"),
        ("mkfs.vfat", "dosfstools"),
        ("mcopy", "mtools"),
        ("qemu-img", "qemu-utils"),
        ("sfdisk", "fdisk"),
    ] {
        if !env::have(bin) {
            missing.push(pkg);
        }
    }
    if !std::path::Path::new("/usr/lib/systemd/boot/efi/systemd-bootx64.efi").exists() {
        missing.push("systemd-boot-efi");
    }
    if !env::have("syslinux") {
        missing.push("syslinux");
    }
    if !std::path::Path::new("/usr/lib/syslinux/mbr/gptmbr.bin").exists() {
        missing.push("syslinux-common");
    }
    if !missing.is_empty() {
        env::step(&format!("installing {}", missing.join(" ")));
        env::apt_install(&missing)?;
    }
    if !env::have("qemu-system-x86_64") {
        let utils = Command::new("dpkg-query")
            .args(["-W", "-f", "${Version}", "qemu-utils"])
            .output()?;
        if String::from_utf8_lossy(&utils.stdout).contains("bpo12") {
            // qemu-system from bookworm breaks a backported qemu-utils: take both from there.
            let list = "/etc/apt/sources.list.d/coffer-backports.sources";
            if !std::path::Path::new(list).exists() {
                env::step("adding Debian's bookworm-backports (qemu-utils here is a backport)");
                std::fs::write(
                    list,
                    "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\n\
                     Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
                )?;
            }
            env::step("installing qemu-system-x86 from bookworm-backports");
            let st = Command::new("apt-get")
                .args(["update", "-q"])
                .status()?
                .success()
                && Command::new("apt-get")
                    .env("DEBIAN_FRONTEND", "noninteractive")
                    .args([
                        "install",
                        "-y",
                        "-q",
                        "--no-install-recommends",
                        "-t",
                        "bookworm-backports",
                        "qemu-system-x86",
                    ])
                    .status()?
                    .success();
            if !st {
                bail!("installing qemu-system-x86 failed; install it by hand");
            }
        } else {
            env::apt_install(&["qemu-system-x86"])?;
        }
    }
    Ok(())
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let mut out: Option<PathBuf> = None;
    let mut test = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--out" => out = Some(it.next().context("--out FILE")?.into()),
            "--test" => test = true,
            other => bail!("unknown image option '{other}' (known: --out FILE, --test)"),
        }
    }
    let repo = env::root();
    let out = out.unwrap_or_else(|| repo.join("target/dist/coffer-guest.qcow2"));
    let t0 = Instant::now();
    tools()?;
    let release = env::build_release()?;
    let dist = repo.join("target/dist");
    crate::dist::run(&[
        "--prebuilt".into(),
        release.display().to_string(),
        "--out".into(),
        dist.display().to_string(),
    ])?;
    let deb = dist.join(format!(
        "coffer-agent_{}_amd64.deb",
        env!("CARGO_PKG_VERSION")
    ));
    env::step("building the guest image");
    let work = env::cache_dir().join("image");
    let st = Command::new("sh")
        .arg(repo.join("packaging/image/build-image.sh"))
        .arg(&deb)
        .arg(&out)
        .arg(&work)
        .env("COFFER_IMAGE_APT_CACHE", env::cache_dir().join("image-apt"))
        .status()
        .context("running build-image.sh")?;
    if !st.success() {
        bail!("building the image failed (see above)");
    }
    let size = std::fs::metadata(&out)?.len();
    eprintln!(
        "xtask: image {} ({:.0} MiB) built in {:.0} s",
        out.display(),
        size as f64 / (1 << 20) as f64,
        t0.elapsed().as_secs_f64()
    );
    if test {
        env::step("boot test: VM → cloud-init → enrol → heartbeat → ACTIVE");
        env::cargo(&["build", "--workspace", "--bins", "--tests"])?;
        let mut c = env::cargo_cmd(&[
            "test",
            "-p",
            "coffer-tests",
            "--test",
            "image",
            "--",
            "--ignored",
            "--nocapture",
        ]);
        env::prepare()?.apply(&mut c);
        c.env("COFFER_GUEST_IMAGE", &out);
        if !c.status()?.success() {
            bail!("the image boot test failed");
        }
    }
    Ok(())
}
