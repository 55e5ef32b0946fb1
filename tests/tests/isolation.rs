//! OS isolation with the process provisioner (the suite runs as root, so each instance gets a
//! Unix user of its own): distinct uids for each instance's agent and database, read from
//! /proc; an instance's uid reads nothing of another instance's or of the controller's files;
//! in `local` storage it can neither replace nor delete its own committed backups, and no other
//! instance reaches them (a restore elsewhere reads them through the grant); the user goes with
//! its instance.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::{Duration, Instant};

use coffer_tests::{Env, StatusCode};
use serde_json::json;

/// The real uid of a process.
fn uid_of(pid: i32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap()
}

/// Whether `uid` (with its groups, as its agent runs) can read `path`.
fn can_read(uid: u32, path: &Path) -> bool {
    run_as(uid, &["cat", &path.display().to_string()])
}

/// Whether a command run as `uid` (with its groups, as its agent runs) succeeds.
#[allow(unsafe_code)]
fn run_as(uid: u32, argv: &[&str]) -> bool {
    let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .unwrap()
        .unwrap();
    let name = std::ffi::CString::new(user.name.clone()).unwrap();
    let groups = nix::unistd::getgrouplist(&name, user.gid).unwrap();
    let gid = user.gid;
    let mut cmd = std::process::Command::new(argv[0]);
    cmd.args(&argv[1..])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: only system calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setgroups(&groups)?;
            nix::unistd::setgid(gid)?;
            nix::unistd::setuid(nix::unistd::Uid::from_raw(uid))?;
            Ok(())
        });
    }
    cmd.status().unwrap().success()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_run_as_their_own_unix_users() {
    let env = Env::start().await;
    let a = env.create("alpha").await;
    let b = env.create("beta").await;
    // Another project's instance.
    let other = format!("http://127.0.0.1:{}/v1.0/otherproject", env.api_port);
    let (st, v) = env
        .call_as(
            &env.other_token,
            "POST",
            &format!("{other}/instances"),
            Some(json!({"instance": {"name": "gamma", "flavorRef": "1", "volume": {"size": 1}}})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let c = v["instance"]["id"].as_str().unwrap().to_string();
    for id in [&a, &b] {
        env.wait_status(id, "ACTIVE", Duration::from_secs(120))
            .await;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, v) = env
            .call_as(
                &env.other_token,
                "GET",
                &format!("{other}/instances/{c}"),
                None,
            )
            .await;
        if v["instance"]["status"] == "ACTIVE" {
            break;
        }
        assert!(Instant::now() < deadline, "{v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let uid = |id: &str| {
        let agent = uid_of(env.agent_pid(id).unwrap());
        let db = uid_of(env.db_pid(id).unwrap());
        assert_eq!(agent, db, "{id}: the database runs as its agent's user");
        agent
    };
    let (ua, ub, uc) = (uid(&a), uid(&b), uid(&c));
    assert!(ua != 0 && ub != 0 && uc != 0, "no instance runs as root");
    assert!(ua != ub && ub != uc && ua != uc, "one uid per instance");
    let user_a = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(ua))
        .unwrap()
        .unwrap()
        .name;
    assert!(user_a.starts_with("coffer-"), "{user_a}");
    let dir_a = env.instance_dir(&a);
    let meta = std::fs::metadata(&dir_a).unwrap();
    assert_eq!(meta.uid(), ua);
    assert_eq!(meta.permissions().mode() & 0o777, 0o700);

    // A's uid reads its own credentials, and nothing of B's or of the controller's.
    assert!(can_read(ua, &env.agent_creds(&a)), "positive control");
    let d = env.dir.path();
    for p in [
        env.agent_creds(&b),
        env.instance_dir(&b).join("agent.toml"),
        env.store_secret_file(),
        d.join("nats-auth/account.nk"),
        d.join("nats-auth/operator.nk"),
        d.join("controller/controller.key"),
        d.join("keyring.toml"),
        d.join("tokens.toml"),
    ] {
        assert!(p.exists(), "{}", p.display());
        assert!(!can_read(ua, &p), "A's uid reads {}", p.display());
    }

    // Local backups: its own to read, not to replace or delete; nobody else's to read.
    let (st, v) = env
        .call(
            "POST",
            "/backups",
            Some(json!({"backup": {"name": "b", "instance": a}})),
        )
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    let bid = v["backup"]["id"].as_str().unwrap().to_string();
    let stream = d.join(format!("backups/{a}/{bid}.cfbk"));
    env.wait_backup(&bid, "COMPLETED").await;
    assert!(can_read(ua, &stream), "its own backup reads");
    assert!(
        !can_read(ub, &stream),
        "the project's other instance does not reach it"
    );
    assert!(
        !can_read(uc, &stream),
        "another project's instance does not"
    );
    let before = std::fs::read(&stream).unwrap();
    for args in [
        vec!["rm", "-f"],
        vec!["truncate", "-s", "0"],
        vec!["mv", "-f"],
    ] {
        let mut cmd = args.clone();
        let target = stream.display().to_string();
        let moved = format!("{target}.moved");
        cmd.push(&target);
        if args[0] == "mv" {
            cmd.push(&moved);
        }
        assert!(!run_as(ua, &cmd), "A's uid could {cmd:?}");
    }
    assert_eq!(
        std::fs::read(&stream).unwrap(),
        before,
        "the backup is unchanged"
    );
    // A restore into another instance reads it through the controller's grant.
    let (st, v) = env
        .call(
            "POST",
            "/instances",
            Some(
                json!({"instance": {"name": "copy", "flavorRef": "1", "volume": {"size": 1},
                "restorePoint": {"backupRef": bid}}}),
            ),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let copy = v["instance"]["id"].as_str().unwrap().to_string();
    env.wait_status(&copy, "ACTIVE", Duration::from_secs(120))
        .await;
    assert!(
        !d.join(format!("backups/{copy}/granted")).exists(),
        "the grant ends with the restore"
    );

    // The user goes with its instance; what it leaves in storage is root's.
    env.delete_and_wait_gone(&a).await;
    assert!(nix::unistd::User::from_name(&user_a).unwrap().is_none());
    assert_eq!(std::fs::metadata(&stream).unwrap().uid(), 0);
    assert_eq!(
        std::fs::metadata(d.join(format!("backups/{a}")))
            .unwrap()
            .gid(),
        0
    );
}
