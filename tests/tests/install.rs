//! The coffer-agent .deb in a fresh Debian 12 root (mmdebstrap, chroot in a private mount
//! namespace): install (files, user, unit, state dir, `--version`), enrolment of the host, the
//! packaged agent running as the `coffer` user until ACTIVE, an upgrade that keeps the edited
//! config and restarts the agent but not the database (same mariadbd pid), then remove (state
//! kept) and purge (state, config and user gone).

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use coffer_tests::debroot::DebianRoot;
use coffer_tests::{alloc_ports, bin, bin_dir, pid_alive, Env, StatusCode};
use serde_json::{json, Value};

fn dist(out: &Path, version: Option<&str>) -> PathBuf {
    let mut c = std::process::Command::new(bin("xtask"));
    c.args(["dist", "--no-compress", "--prebuilt"])
        .arg(bin_dir())
        .arg("--out")
        .arg(out);
    if let Some(v) = version {
        c.args(["--version", v]);
    }
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v = version.unwrap_or(env!("CARGO_PKG_VERSION"));
    out.join(format!("coffer-agent_{v}_amd64.deb"))
}

struct Agent(Child);
impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The packaged agent, as its unit runs it (user coffer).
fn start_agent(root: &DebianRoot, log: &Path) -> Agent {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Agent(
        root.cmd(
            Some("coffer:coffer"),
            &[
                "/usr/bin/coffer-agent",
                "--config",
                "/etc/coffer/agent.toml",
                "run",
            ],
        )
        .stdin(Stdio::null())
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .spawn()
        .unwrap(),
    )
}

fn db_pid(root: &DebianRoot) -> Option<i32> {
    let v: Value = serde_json::from_str(
        &std::fs::read_to_string(root.at("/var/lib/coffer/agent/db.json")).ok()?,
    )
    .ok()?;
    v["pid"].as_i64().map(|p| p as i32)
}

async fn wait_active_and_fresh(
    env: &Env,
    root: &DebianRoot,
    id: &str,
    after: &str,
    agent: &mut Agent,
    log: &Path,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(Some(st)) = agent.0.try_wait() {
            panic!(
                "the packaged agent exited ({st}):\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        let (_, v) = env.show(id).await;
        let i = &v["instance"];
        if i["status"] == "ACTIVE" && i["service_status_updated"].as_str() > Some(after) {
            return i.clone();
        }
        assert!(
            Instant::now() < deadline && i["status"] != "ERROR",
            "not ACTIVE: {v}\n{}\n{}",
            std::fs::read_to_string(log).unwrap_or_default(),
            std::fs::read_to_string(root.at("/var/lib/coffer/agent/mariadb/install-db.log"))
                .unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn uid_of(root: &DebianRoot, user: &str) -> Option<u32> {
    std::fs::read_to_string(root.at("/etc/passwd"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with(&format!("{user}:")))
        .and_then(|l| l.split(':').nth(2))
        .and_then(|u| u.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_deb_installs_enrols_upgrades_without_touching_the_database_and_purges() {
    use std::os::unix::fs::MetadataExt;
    let env = Env::start().await;
    let tmp = env.dir.path();
    let deb1 = dist(&tmp.join("dist1"), None);
    let v2 = format!("{}+upgrade1", env!("CARGO_PKG_VERSION"));
    let deb2 = dist(&tmp.join("dist2"), Some(&v2));
    let root = DebianRoot::new(tmp);

    // Install: binary, unit, conffile, user, state dir.
    let d1 = root.copy_in(&deb1);
    root.run(&["dpkg", "-i", &d1]);
    for f in [
        "/usr/bin/coffer-agent",
        "/lib/systemd/system/coffer-agent.service",
        "/etc/coffer/agent.toml",
    ] {
        assert!(root.at(f).exists(), "{f} installed");
    }
    let coffer = uid_of(&root, "coffer").expect("the coffer system user");
    assert!(coffer < 1000, "a system uid: {coffer}");
    let state = std::fs::metadata(root.at("/var/lib/coffer/agent")).unwrap();
    assert_eq!(state.uid(), coffer);
    assert_eq!(state.mode() & 0o777, 0o750);
    // The config is the service user's to read, nobody else's.
    let conf = std::fs::metadata(root.at("/etc/coffer/agent.toml")).unwrap();
    let coffer_gid = std::fs::metadata(root.at("/var/lib/coffer")).unwrap().gid();
    assert_eq!(
        (conf.uid(), conf.gid(), conf.mode() & 0o777),
        (0, coffer_gid, 0o640)
    );
    let v = root.run(&["coffer-agent", "--version"]);
    assert!(v.contains(env!("CARGO_PKG_VERSION")), "{v}");
    // An installed, unenrolled agent says what to do.
    let o = root.cmd(None, &["coffer-agent", "run"]).output().unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("coffer-agent enroll"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // The operator edits the config, then enrols the host with an administrator's token.
    let port = alloc_ports(1)[0];
    let edited = format!(
        "# edited by the operator\n[listen]\nbind_address = \"127.0.0.1\"\nport = {port}\n"
    );
    std::fs::write(root.at("/etc/coffer/agent.toml"), &edited).unwrap();
    let (st, t) = env
        .call_as(
            &env.admin_token,
            "POST",
            &format!("{}/mgmt/enrolment-tokens", env.base()),
            Some(json!({"enrolment_token": {"name": "packaged", "flavorRef": "1"}})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{t}");
    std::fs::write(
        root.at("/etc/coffer/enrol-token"),
        t["enrolment_token"]["token"].as_str().unwrap(),
    )
    .unwrap();
    let out = root.run(&[
        "coffer-agent",
        "enroll",
        "--insecure",
        "--controller",
        &format!("http://127.0.0.1:{}", env.api_port),
        "--token-file",
        "/etc/coffer/enrol-token",
        "--patience-s",
        "10",
    ]);
    let id = out
        .split("enrolled as instance ")
        .nth(1)
        .and_then(|s| s.split(';').next())
        .unwrap_or_else(|| panic!("{out}"))
        .to_string();
    // Enrolled by root, the identity belongs to the service's user.
    for f in ["agent.key", "nats.creds", "enrolment.toml"] {
        let m = std::fs::metadata(root.at("/var/lib/coffer/agent").join(f)).unwrap();
        assert_eq!((m.uid(), m.mode() & 0o077), (coffer, 0), "{f}");
    }

    let log = tmp.join("agent.log");
    let before = coffer_tests::now_rfc3339();
    let mut agent = start_agent(&root, &log);
    wait_active_and_fresh(&env, &root, &id, &before, &mut agent, &log).await;
    let db = db_pid(&root).expect("the database's pid");
    assert!(pid_alive(db));

    // Upgrade: the edited config is kept; the agent restarts (what systemd's try-restart does
    // with KillMode=process: SIGTERM to the agent alone) and the database keeps running.
    let d2 = root.copy_in(&deb2);
    root.run(&["dpkg", "-i", &d2]);
    assert!(root
        .run(&["dpkg-query", "-W", "coffer-agent"])
        .contains(&v2));
    assert_eq!(
        std::fs::read_to_string(root.at("/etc/coffer/agent.toml")).unwrap(),
        edited
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let _ = agent.0.wait();
    assert!(pid_alive(db), "stopping the agent stopped the database");
    let before = coffer_tests::now_rfc3339();
    let mut agent = start_agent(&root, &log);
    wait_active_and_fresh(&env, &root, &id, &before, &mut agent, &log).await;
    assert_eq!(
        db_pid(&root),
        Some(db),
        "the upgraded agent adopted the same mariadbd"
    );
    assert!(pid_alive(db));

    // Remove keeps the state; purge removes state, config and the user.
    env.delete_and_wait_gone(&id).await;
    drop(agent);
    assert!(!pid_alive(db), "delete stopped the database");
    root.run(&["dpkg", "-r", "coffer-agent"]);
    assert!(!root.at("/usr/bin/coffer-agent").exists());
    assert!(
        root.at("/var/lib/coffer/agent/agent.key").exists(),
        "remove keeps state"
    );
    assert!(
        root.at("/etc/coffer/agent.toml").exists(),
        "remove keeps the config"
    );
    root.run(&["dpkg", "--purge", "coffer-agent"]);
    assert!(
        !root.at("/var/lib/coffer/agent").exists(),
        "purge removes state"
    );
    assert!(
        !root.at("/etc/coffer/agent.toml").exists(),
        "purge removes the config"
    );
    assert_eq!(uid_of(&root, "coffer"), None, "purge removes the user");
}
