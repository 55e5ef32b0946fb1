//! `cargo xtask dist` (with the binaries the suite built): the .deb packages carry the binary,
//! the hardened unit (which `systemd-analyze verify` accepts), the default config as a conffile
//! and maintainer scripts that parse; the packaged binary runs. The .rpm files hold the same,
//! verify (`rpm -K`) and mark the config `%config`.

use std::path::Path;
use std::process::Command;

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("running a packaging tool");
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn dist_builds_debs_with_units_configs_and_scripts() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("dist");
    let bins = coffer_tests::bin_dir();
    run(Command::new(bins.join("xtask"))
        .args(["dist", "--no-compress", "--prebuilt"])
        .arg(&bins)
        .arg("--out")
        .arg(&out));
    for (pkg, unit, config) in [
        ("coffer-agent", "coffer-agent.service", "agent.toml"),
        (
            "coffer-controller",
            "coffer-controller.service",
            "controller.toml",
        ),
    ] {
        let deb = out.join(format!("{pkg}_{}_amd64.deb", env!("CARGO_PKG_VERSION")));
        let info = run(Command::new("dpkg-deb").arg("-I").arg(&deb));
        assert!(info.contains(&format!("Package: {pkg}")), "{info}");
        assert!(info.contains("Depends: adduser"), "{info}");
        let conffiles = run(Command::new("dpkg-deb")
            .args(["-I"])
            .arg(&deb)
            .arg("conffiles"));
        assert_eq!(conffiles.trim(), format!("/etc/coffer/{config}"));
        let files = run(Command::new("dpkg-deb").arg("-c").arg(&deb));
        for f in [
            format!("./usr/bin/{pkg}"),
            format!("./lib/systemd/system/{unit}"),
            format!("./etc/coffer/{config}"),
        ] {
            assert!(files.contains(&f), "{f} in {files}");
        }
        let root = dir.path().join(pkg);
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root));
        let v = run(Command::new(root.join("usr/bin").join(pkg)).arg("--version"));
        assert!(v.contains(env!("CARGO_PKG_VERSION")), "{v}");
        // The unit: hardened, the agent's never kills the database, and systemd accepts it.
        let text = std::fs::read_to_string(root.join("lib/systemd/system").join(unit)).unwrap();
        for d in [
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "ProtectHome=yes",
            "PrivateTmp=yes",
            "Restart=on-failure",
        ] {
            assert!(text.contains(d), "{d} in {unit}");
        }
        if pkg == "coffer-agent" {
            assert!(text.contains("KillMode=process"), "{text}");
        }
        let check = dir.path().join(unit);
        std::fs::write(
            &check,
            text.replace(
                &format!("/usr/bin/{pkg}"),
                &root.join("usr/bin").join(pkg).display().to_string(),
            ),
        )
        .unwrap();
        let v = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&check)
            .output()
            .unwrap();
        assert!(
            v.status.success() && v.stderr.is_empty(),
            "systemd-analyze verify {unit}: {}",
            String::from_utf8_lossy(&v.stderr)
        );
        // Maintainer scripts parse and name their unit.
        let ctl = dir.path().join(format!("{pkg}-control"));
        run(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&ctl));
        for s in ["postinst", "postrm"] {
            run(Command::new("sh").arg("-n").arg(ctl.join(s)));
            assert!(
                !std::fs::read_to_string(ctl.join(s)).unwrap().contains('@'),
                "{s} templated"
            );
        }
        assert!(Path::new(&ctl.join("postinst")).exists());

        // The .rpm: same files, the config marked %config(noreplace), digests that verify,
        // scripts that make the user and restart on upgrade.
        let rpm = out.join(format!("{pkg}-{}-1.x86_64.rpm", env!("CARGO_PKG_VERSION")));
        let files = run(Command::new("rpm").arg("-qlp").arg(&rpm));
        for f in [
            format!("/usr/bin/{pkg}"),
            format!("/usr/lib/systemd/system/{unit}"),
            format!("/etc/coffer/{config}"),
        ] {
            assert!(files.lines().any(|l| l == f), "{f} in {files}");
        }
        let configs = run(Command::new("rpm")
            .arg("-qp")
            .arg("--configfiles")
            .arg(&rpm));
        assert_eq!(configs.trim(), format!("/etc/coffer/{config}"));
        let check = run(Command::new("rpm").arg("-K").arg(&rpm));
        assert!(
            check.contains("digests") && check.trim_end().ends_with("OK"),
            "{check}"
        );
        let info = run(Command::new("rpm").arg("-qip").arg(&rpm));
        assert!(info.contains(&format!("Name        : {pkg}")), "{info}");
        let scripts = run(Command::new("rpm").arg("-qp").arg("--scripts").arg(&rpm));
        assert!(scripts.contains("useradd -r -g coffer"), "{scripts}");
        assert!(
            scripts.contains(&format!("try-restart {unit}")),
            "{scripts}"
        );
        let requires = run(Command::new("rpm").arg("-qpR").arg(&rpm));
        assert!(requires.contains("shadow-utils"), "{requires}");
    }
}
