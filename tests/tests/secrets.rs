//! Nothing in clear: the passwords given at create (and root's, the backup key, the admin's, the
//! replication user's) appear in no process argument or environment, no log, not in the
//! controller's SQLite store and not in JetStream's store; they reach the agent sealed to its key.

use std::path::Path;
use std::time::Duration;

use coffer_tests::{pid_alive, Env, StatusCode};
use serde_json::json;
use sqlx::Connection;

fn scan_files(dir: &Path, secrets: &[&str], hits: &mut Vec<String>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        let Ok(t) = e.file_type() else { continue };
        if t.is_dir() {
            scan_files(&p, secrets, hits);
        } else if t.is_file() {
            let Ok(bytes) = std::fs::read(&p) else {
                continue;
            };
            for s in secrets {
                if bytes.windows(s.len()).any(|w| w == s.as_bytes()) {
                    hits.push(format!("{} in {}", s, p.display()));
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_are_nowhere_in_clear() {
    // Every process Coffer starts logs at the most verbose level for this test: no level may
    // print a secret. (Each test runs in its own process under nextest.)
    std::env::set_var("RUST_LOG", "trace");
    let env = Env::start().await;
    let secrets = ["Pw-one-7Qz", "Pw-two-9Xk"];
    let (st, v) = env
        .call(
            "POST",
            "/instances",
            Some(
                json!({"instance": {"name": "secretive", "flavorRef": "1", "volume": {"size": 1},
                "databases": [{"name": "shop"}],
                "users": [
                    {"name": "one", "password": secrets[0], "databases": [{"name": "shop"}]},
                    {"name": "two", "password": secrets[1], "host": "127.0.0.1"}
                ]}}),
            ),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let id = v["instance"]["id"].as_str().unwrap().to_string();
    let view = env
        .wait_status(&id, "ACTIVE", Duration::from_secs(120))
        .await;
    // The sealed passwords arrived intact.
    env.connect(&view, "one", secrets[0], "shop")
        .await
        .close()
        .await
        .unwrap();
    let admin_pw =
        std::fs::read_to_string(env.instance_dir(&id).join("state/mariadb/admin.password"))
            .unwrap();
    let admin_pw = admin_pw.trim().to_string();
    // The users and root routes take and return passwords too.
    let i = format!("/instances/{id}");
    let (st, v) = env
        .call(
            "POST",
            &format!("{i}/users"),
            Some(json!({"users": [{"name": "three", "password": "Pw-three-4Rt"}]})),
        )
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    let (st, _) = env
        .call(
            "PUT",
            &format!("{i}/users/three"),
            Some(json!({"user": {"password": "Pw-changed-8Yu"}})),
        )
        .await;
    assert_eq!(st, StatusCode::ACCEPTED);
    let (st, _) = env
        .call(
            "PUT",
            &format!("{i}/users"),
            Some(json!({"users": [{"name": "one", "password": "Pw-bulk-2Wq"}]})),
        )
        .await;
    assert_eq!(st, StatusCode::ACCEPTED);
    let (_, v) = env.call("POST", &format!("{i}/root"), None).await;
    let generated_root = v["user"]["password"].as_str().unwrap().to_string();
    let (_, v) = env
        .call(
            "POST",
            &format!("{i}/root"),
            Some(json!({"password": "Pw-root-6Op"})),
        )
        .await;
    assert_eq!(v["user"]["password"], "Pw-root-6Op");
    // A backup: mariabackup gets the admin credentials, the pipeline the operator key.
    let (st, v) = env
        .call(
            "POST",
            "/backups",
            Some(json!({"backup": {"name": "scan", "instance": id}})),
        )
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    let bid = v["backup"]["id"].as_str().unwrap().to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while env.call("GET", &format!("/backups/{bid}"), None).await.1["backup"]["status"]
        != "COMPLETED"
    {
        assert!(
            std::time::Instant::now() < deadline,
            "backup did not complete"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A replica: the replication user's password reaches both agents sealed; MariaDB itself
    // keeps it in the replica's master.info (the only place it may be in clear).
    let (st, v) = env
        .call(
            "POST",
            "/instances",
            Some(json!({"instance": {"name": "copy", "replica_of": id}})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let rep = v["instance"]["id"].as_str().unwrap().to_string();
    env.wait_status(&rep, "ACTIVE", Duration::from_secs(120))
        .await;
    let master_info = std::fs::read_to_string(
        env.instance_dir(&rep)
            .join("state/mariadb/data/master.info"),
    )
    .unwrap();
    let repl_pw = master_info.lines().nth(5).unwrap().to_string();
    assert!(repl_pw.len() >= 16, "{master_info}");
    let keyring = std::fs::read_to_string(env.dir.path().join("keyring.toml")).unwrap();
    let backup_key = keyring
        .lines()
        .find_map(|l| l.strip_prefix("k1 = \""))
        .unwrap()
        .trim_end_matches('"')
        .to_string();
    let mut all: Vec<&str> = secrets.to_vec();
    all.push(&backup_key);
    all.extend([
        "Pw-three-4Rt",
        "Pw-changed-8Yu",
        "Pw-bulk-2Wq",
        "Pw-root-6Op",
        generated_root.as_str(),
    ]);
    all.push(&admin_pw);
    all.push(&repl_pw);

    for log in [
        env.dir.path().join("controller.log"),
        env.instance_dir(&id).join("agent.log"),
    ] {
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(
            text.contains("TRACE"),
            "{} was not written at trace level",
            log.display()
        );
    }
    let mut hits = vec![];
    // Every process Coffer started (their command lines name the test dir).
    let dir = env.dir.path().to_string_lossy().to_string();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if !pid_alive(pid) {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if !String::from_utf8_lossy(&cmdline).contains(&dir) {
            continue;
        }
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        for s in &all {
            for (what, bytes) in [("cmdline", &cmdline), ("environ", &environ)] {
                if bytes.windows(s.len()).any(|w| w == s.as_bytes()) {
                    hits.push(format!("{s} in /proc/{pid}/{what}"));
                }
            }
        }
    }
    // Every file: logs, the SQLite store (and its WAL), the JetStream store, the agent's state.
    // The admin password legitimately lives in its two 0600 files, the backup key in the keyring.
    let mut file_hits = vec![];
    scan_files(env.dir.path(), &all, &mut file_hits);
    hits.extend(file_hits.into_iter().filter(|h| {
        !(h.starts_with(&admin_pw) && (h.ends_with("admin.password") || h.ends_with("admin.cnf")))
            && !(h.starts_with(&backup_key) && h.ends_with("keyring.toml"))
            && !(h.starts_with(&repl_pw) && h.ends_with("master.info"))
    }));
    assert!(hits.is_empty(), "secrets found in clear: {hits:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_intent_sealed_to_another_agent_cannot_be_opened() {
    let env = Env::start().await;
    let a = env.create("first").await;
    let b = env.create("second").await;
    env.wait_status(&a, "ACTIVE", Duration::from_secs(120))
        .await;
    env.wait_status(&b, "ACTIVE", Duration::from_secs(120))
        .await;
    let key_of = |id: &str| {
        let hex = std::fs::read_to_string(env.instance_dir(id).join("state/agent.key")).unwrap();
        (0..hex.trim().len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect::<Vec<u8>>()
    };
    let (ka, kb) = (key_of(&a), key_of(&b));
    let pub_a = coffer_proto::seal::public_of(&ka).unwrap();
    let ctx = coffer_proto::seal::user_password_context(&a, "app", "%");
    let sealed = coffer_proto::seal::seal(&pub_a, &ctx, b"for-a-only").unwrap();
    assert_eq!(
        coffer_proto::seal::open(&ka, &ctx, &sealed).unwrap(),
        b"for-a-only"
    );
    assert!(
        coffer_proto::seal::open(&kb, &ctx, &sealed).is_err(),
        "b cannot open a's secret"
    );
    let ctx_b = coffer_proto::seal::user_password_context(&b, "app", "%");
    assert!(
        coffer_proto::seal::open(&ka, &ctx_b, &sealed).is_err(),
        "bound to its instance"
    );
}
