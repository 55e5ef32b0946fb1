//! Backups and restore end to end: mariabackup (and mariadb-dump) through the sealed pipeline
//! into storage, restored into a new instance; failures end FAILED or ERROR with the reason,
//! never ACTIVE with bad data. Every scenario runs on both storage backends (`local::*` and
//! `nats::*`, generated at the end of this file).

use std::time::{Duration, Instant};

use coffer_tests::{BackupStorage, Env, Opts, StatusCode};
use serde_json::{json, Value};
use sqlx::Connection;

/// `POST /backups` with `body` (the `backup` object wrapped), expecting 202 and NEW; returns the id.
async fn post_backup(env: &Env, body: Value) -> String {
    let (st, v) = env.call("POST", "/backups", Some(body)).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["backup"]["status"], "NEW", "{v}");
    v["backup"]["id"].as_str().unwrap().to_string()
}

async fn rows(env: &Env, view: &Value) -> Vec<i32> {
    env.rows(view).await
}

async fn restore(env: &Env, backup: &str, name: &str) -> (StatusCode, Value) {
    env.call(
        "POST",
        "/instances",
        Some(json!({"instance": {"name": name, "flavorRef": "1", "volume": {"size": 1}, "restorePoint": {"backupRef": backup}}})),
    )
    .await
}

async fn env_on(storage: BackupStorage) -> Env {
    Env::start_with(Opts {
        backup_storage: storage,
        ..Opts::default()
    })
    .await
}

async fn backup_and_restore_into_a_new_instance(storage: BackupStorage) {
    let env = env_on(storage).await;
    let (id, view) = env.active_with_rows("src", &[1, 2]).await;
    let mut c = env.connect(&view, "app", "s3cret-Pw", "shop").await;

    let (st, v) = env
        .call(
            "POST",
            "/backups",
            Some(json!({"backup": {"name": "b1", "instance": id, "description": "first"}})),
        )
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["backup"]["status"], "NEW");
    let bid = v["backup"]["id"].as_str().unwrap().to_string();
    // The database stays writable while the backup runs.
    sqlx::query("INSERT INTO t VALUES (3)")
        .execute(&mut c)
        .await
        .unwrap();
    let b = env.wait_backup(&bid, "COMPLETED").await;
    assert!(b["size"].as_f64().unwrap() > 0.0, "{b}");
    assert_eq!(b["checksum"].as_str().unwrap().len(), 64);
    assert!(b["locationRef"]
        .as_str()
        .unwrap()
        .ends_with(&format!("{bid}.cfbk")));
    assert_eq!(b["instance_id"], id.as_str());
    env.wait_status(&id, "ACTIVE", Duration::from_secs(10))
        .await;
    sqlx::query("INSERT INTO t VALUES (4)")
        .execute(&mut c)
        .await
        .unwrap();
    c.close().await.unwrap();
    let (_, list) = env
        .call("GET", &format!("/instances/{id}/backups"), None)
        .await;
    assert_eq!(list["backups"].as_array().unwrap().len(), 1);
    // The stored object is ciphertext: the table's marker string is not in it.
    let stored = env.read_object(&id, &format!("{bid}.cfbk")).await;
    assert_eq!(&stored[..4], b"CFBK");
    let manifest: Value =
        serde_json::from_slice(&env.read_object(&id, &format!("{bid}.json")).await).unwrap();
    assert_eq!(manifest["strategy"], "mariabackup");
    assert_eq!(manifest["encrypted"], true);
    // Sealed with the instance's own key, derived from the operator's current one.
    assert_eq!(manifest["key_id"], format!("k1:{id}"));
    assert_eq!(manifest["sha256"], b["checksum"]);
    assert!(
        !manifest["position"]["gtid"].as_str().unwrap().is_empty(),
        "GTID recorded: {manifest}"
    );
    assert!(
        manifest["position"]["binlog_file"]
            .as_str()
            .unwrap()
            .starts_with("mysql-bin."),
        "{manifest}"
    );

    let (st, v) = restore(&env, &bid, "copy").await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let copy = v["instance"]["id"].as_str().unwrap().to_string();
    let cview = env
        .wait_status(&copy, "ACTIVE", Duration::from_secs(120))
        .await;
    let got = rows(&env, &cview).await;
    assert!(
        got.starts_with(&[1, 2]) && !got.contains(&4),
        "restored rows: {got:?}"
    );
    // Its admin credentials are its own.
    let pw = |i: &str| {
        std::fs::read_to_string(env.instance_dir(i).join("state/mariadb/admin.password")).unwrap()
    };
    assert_ne!(pw(&id), pw(&copy));
    assert_eq!(
        rows(&env, &view).await,
        vec![1, 2, 3, 4],
        "the source is untouched"
    );

    // Deleting the source leaves the backup; deleting the backup removes its objects.
    env.delete_and_wait_gone(&id).await;
    assert_eq!(
        env.call("GET", &format!("/backups/{bid}"), None).await.0,
        StatusCode::OK
    );
    let (st, _) = env.call("DELETE", &format!("/backups/{bid}"), None).await;
    assert_eq!(st, StatusCode::ACCEPTED);
    assert_eq!(
        env.call("GET", &format!("/backups/{bid}"), None).await.0,
        StatusCode::NOT_FOUND
    );
    let left = env.stored().await;
    assert!(left.is_empty(), "objects left: {left:?}");
}

async fn tampered_backups_and_missing_keys_never_restore(storage: BackupStorage) {
    let env = env_on(storage).await;
    let (id, _) = env.active_with_rows("src", &[]).await;
    let bid = post_backup(&env, json!({"backup": {"name": "b", "instance": id}})).await;
    env.wait_backup(&bid, "COMPLETED").await;

    // Flip one byte in the middle of the stored stream.
    let key = format!("{bid}.cfbk");
    let mut bytes = env.read_object(&id, &key).await;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    env.write_object(&id, &key, &bytes).await;
    let (st, v) = restore(&env, &bid, "bad").await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let bad = v["instance"]["id"].as_str().unwrap().to_string();
    let e = env
        .wait_status(&bad, "ERROR", Duration::from_secs(60))
        .await;
    let msg = e["fault"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains(&bid) && msg.contains("failed authentication"),
        "{e}"
    );
    assert!(env.db_pid(&bad).is_none(), "nothing was started");

    // Truncate it (cut the final frame off).
    bytes[mid] ^= 0x01;
    env.write_object(&id, &key, &bytes[..bytes.len() - 20])
        .await;
    let (_, v) = restore(&env, &bid, "cut").await;
    let cut = v["instance"]["id"].as_str().unwrap().to_string();
    let e = env
        .wait_status(&cut, "ERROR", Duration::from_secs(60))
        .await;
    assert!(
        e["fault"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("truncated"),
        "{e}"
    );

    // Without the operator key the backup's key derives from: refused before anything is
    // stored, saying what to do.
    env.write_object(&id, &key, &bytes).await;
    coffer_tests::write_keyring(
        &env.dir.path().join("keyring.toml"),
        &[("k9", &coffer_tests::random_key_hex())],
        "k9",
    );
    let (_, before) = env.call("GET", "/instances", None).await;
    let (st, v) = restore(&env, &bid, "nokey").await;
    assert_eq!(st, StatusCode::CONFLICT, "{v}");
    let msg = v["conflict"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("'k1'") && msg.contains("not in the controller's keyring"),
        "{v}"
    );
    let (_, after) = env.call("GET", "/instances", None).await;
    assert_eq!(before, after, "nothing stored");

    // No keyring at all: a backup is refused (409, nothing stored), not sent without a key.
    std::fs::remove_file(env.dir.path().join("keyring.toml")).unwrap();
    let (st, v) = env
        .call(
            "POST",
            "/backups",
            Some(json!({"backup": {"name": "nokey", "instance": id}})),
        )
        .await;
    assert_eq!(st, StatusCode::CONFLICT, "{v}");
    assert!(
        v["conflict"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("keyring"),
        "{v}"
    );
    let (_, list) = env
        .call("GET", &format!("/instances/{id}/backups"), None)
        .await;
    assert_eq!(list["backups"].as_array().unwrap().len(), 1, "{list}");
    let stored = env.stored().await;
    assert!(
        !stored
            .iter()
            .any(|n| n.contains("partial") || n.contains("orphan")),
        "no partial object: {stored:?}"
    );
    env.wait_status(&id, "ACTIVE", Duration::from_secs(10))
        .await;
}

/// A restore follows the controller's record of the backup, not what storage says: a manifest
/// naming another backup, a stream and manifest swapped in together, and a manifest that claims
/// another instance are each refused before anything starts, with the reason; the real backup
/// still restores afterwards.
async fn restores_are_bound_to_the_controllers_record(storage: BackupStorage) {
    let env = env_on(storage).await;
    let (id, _) = env.active_with_rows("src", &[1]).await;
    let a = post_backup(&env, json!({"backup": {"name": "a", "instance": id}})).await;
    env.wait_backup(&a, "COMPLETED").await;
    let b = post_backup(&env, json!({"backup": {"name": "b", "instance": id}})).await;
    env.wait_backup(&b, "COMPLETED").await;
    let (a_json, b_json) = (
        env.read_object(&id, &format!("{a}.json")).await,
        env.read_object(&id, &format!("{b}.json")).await,
    );
    let (a_data, b_data) = (
        env.read_object(&id, &format!("{a}.cfbk")).await,
        env.read_object(&id, &format!("{b}.cfbk")).await,
    );
    let refused = |name: &'static str, needle: &'static str| {
        let env = &env;
        let b = b.clone();
        async move {
            let (st, v) = restore(env, &b, name).await;
            assert_eq!(st, StatusCode::OK, "{v}");
            let rid = v["instance"]["id"].as_str().unwrap().to_string();
            let e = env
                .wait_status(&rid, "ERROR", Duration::from_secs(60))
                .await;
            let msg = e["fault"]["message"].as_str().unwrap_or_default();
            assert!(msg.contains(needle), "{name}: {e}");
            assert!(env.db_pid(&rid).is_none(), "{name}: nothing was started");
        }
    };

    // B's manifest replaced by A's.
    env.write_object(&id, &format!("{b}.json"), &a_json).await;
    refused("other-manifest", "names backup").await;

    // A's stream and manifest swapped in as B (the manifest renamed to B to fit).
    let mut forged: Value = serde_json::from_slice(&a_json).unwrap();
    forged["backup_id"] = json!(b);
    env.write_object(&id, &format!("{b}.json"), forged.to_string().as_bytes())
        .await;
    env.write_object(&id, &format!("{b}.cfbk"), &a_data).await;
    refused("swapped", "was replaced").await;

    // B as it was, but its manifest claims another instance.
    env.write_object(&id, &format!("{b}.cfbk"), &b_data).await;
    let mut foreign: Value = serde_json::from_slice(&b_json).unwrap();
    foreign["instance_id"] = json!("another-instance");
    env.write_object(&id, &format!("{b}.json"), foreign.to_string().as_bytes())
        .await;
    refused("foreign", "taken from instance another-instance").await;

    // Put back, B restores with its own data.
    env.write_object(&id, &format!("{b}.json"), &b_json).await;
    let (st, v) = restore(&env, &b, "good").await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let good = v["instance"]["id"].as_str().unwrap().to_string();
    let view = env
        .wait_status(&good, "ACTIVE", Duration::from_secs(120))
        .await;
    assert_eq!(rows(&env, &view).await, vec![1]);
}

async fn key_rotation_keeps_old_backups_restorable(storage: BackupStorage) {
    let env = env_on(storage).await;
    let (id, _) = env.active_with_rows("rot", &[10]).await;
    let old = post_backup(&env, json!({"backup": {"name": "old", "instance": id}})).await;
    env.wait_backup(&old, "COMPLETED").await;

    // Rotate: k2 becomes current, k1 stays in the ring as a retired key.
    let ring_path = env.dir.path().join("keyring.toml");
    let ring = std::fs::read_to_string(&ring_path).unwrap();
    let k1 = ring
        .lines()
        .find_map(|l| l.strip_prefix("k1 = \""))
        .unwrap()
        .trim_end_matches('"')
        .to_string();
    coffer_tests::write_keyring(
        &ring_path,
        &[("k1", &k1), ("k2", &coffer_tests::random_key_hex())],
        "k2",
    );
    let new = post_backup(&env, json!({"backup": {"name": "new", "instance": id}})).await;
    env.wait_backup(&new, "COMPLETED").await;
    let manifest = |b: String| {
        let (env, id) = (&env, id.clone());
        async move {
            serde_json::from_slice::<Value>(&env.read_object(&id, &format!("{b}.json")).await)
                .unwrap()
        }
    };
    assert_eq!(manifest(old.clone()).await["key_id"], format!("k1:{id}"));
    assert_eq!(manifest(new.clone()).await["key_id"], format!("k2:{id}"));

    let (st, v) = restore(&env, &old, "from-old").await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let r = v["instance"]["id"].as_str().unwrap().to_string();
    let rview = env
        .wait_status(&r, "ACTIVE", Duration::from_secs(120))
        .await;
    assert_eq!(rows(&env, &rview).await, vec![10]);
}

async fn incremental_chains_restore_from_any_link_and_delete_together(storage: BackupStorage) {
    let env = env_on(storage).await;
    let (id, view) = env.active_with_rows("chain", &[1]).await;
    let mut c = env.connect(&view, "app", "s3cret-Pw", "shop").await;
    let backup = |body: Value| {
        let env = &env;
        async move {
            let bid = post_backup(env, json!({ "backup": body })).await;
            env.wait_backup(&bid, "COMPLETED").await;
            bid
        }
    };
    let full = backup(json!({"name": "full", "instance": id})).await;
    sqlx::query("INSERT INTO t VALUES (2)")
        .execute(&mut c)
        .await
        .unwrap();
    let inc1 = backup(json!({"name": "inc1", "instance": id, "parent_id": full})).await;
    sqlx::query("INSERT INTO t VALUES (3)")
        .execute(&mut c)
        .await
        .unwrap();
    let inc2 = backup(json!({"name": "inc2", "instance": id, "incremental": 1})).await;
    sqlx::query("INSERT INTO t VALUES (4)")
        .execute(&mut c)
        .await
        .unwrap();
    c.close().await.unwrap();
    let (_, v) = env.call("GET", &format!("/backups/{inc2}"), None).await;
    assert_eq!(
        v["backup"]["parent_id"],
        inc1.as_str(),
        "incremental: 1 builds on the latest backup"
    );

    for (from, want) in [(&inc2, vec![1, 2, 3]), (&inc1, vec![1, 2])] {
        let (st, v) = restore(&env, from, "r").await;
        assert_eq!(st, StatusCode::OK, "{v}");
        let r = v["instance"]["id"].as_str().unwrap().to_string();
        let rview = env
            .wait_status(&r, "ACTIVE", Duration::from_secs(120))
            .await;
        assert_eq!(rows(&env, &rview).await, want, "restored from {from}");
        env.delete_and_wait_gone(&r).await;
    }

    // Deleting the full backup deletes the chain built on it.
    let (st, _) = env.call("DELETE", &format!("/backups/{full}"), None).await;
    assert_eq!(st, StatusCode::ACCEPTED);
    for b in [&full, &inc1, &inc2] {
        assert_eq!(
            env.call("GET", &format!("/backups/{b}"), None).await.0,
            StatusCode::NOT_FOUND
        );
    }
    // What is left is the live instance's archived change log (it goes with the instance).
    let left = backup_objects(&env).await;
    assert!(left.is_empty(), "objects left: {left:?}");

    // The backups quota.
    let q = format!("{}/mgmt/quotas/{}", env.base(), env.project);
    let (st, _) = env
        .call_as(
            &env.admin_token.clone(),
            "PUT",
            &q,
            Some(json!({"quotas": {"backups": 1}})),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    backup(json!({"name": "one", "instance": id})).await;
    let (st, v) = env
        .call(
            "POST",
            "/backups",
            Some(json!({"backup": {"name": "two", "instance": id}})),
        )
        .await;
    assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    assert!(v["overLimit"]["message"]
        .as_str()
        .unwrap()
        .contains("backups"));
}

async fn logical_backups_restore_data_and_accounts(storage: BackupStorage) {
    let env = Env::start_with(Opts {
        backup_storage: storage,
        backup_strategy: "mariadb_dump",
        ..Opts::default()
    })
    .await;
    let (id, view) = env.active_with_rows("logical", &[1, 2]).await;
    let mut c = env.connect(&view, "app", "s3cret-Pw", "shop").await;
    let bid = post_backup(&env, json!({"backup": {"name": "dump", "instance": id}})).await;
    sqlx::query("INSERT INTO t VALUES (3)")
        .execute(&mut c)
        .await
        .unwrap();
    env.wait_backup(&bid, "COMPLETED").await;
    sqlx::query("INSERT INTO t VALUES (4)")
        .execute(&mut c)
        .await
        .unwrap();
    c.close().await.unwrap();
    let manifest: Value =
        serde_json::from_slice(&env.read_object(&id, &format!("{bid}.json")).await).unwrap();
    assert_eq!(manifest["strategy"], "mariadb-dump");
    assert!(
        !manifest["position"]["gtid"].as_str().unwrap().is_empty()
            && manifest["position"]["binlog_file"]
                .as_str()
                .unwrap()
                .starts_with("mysql-bin.")
            && manifest["position"]["binlog_pos"].as_u64().unwrap() > 0,
        "position recorded: {manifest}"
    );
    // Logical backups are full only: asking for an incremental is refused up front.
    let (st, v) = env
        .call(
            "POST",
            "/backups",
            Some(json!({"backup": {"name": "inc", "instance": id, "parent_id": bid}})),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["badRequest"]["message"]
            .as_str()
            .unwrap()
            .contains("full backups only"),
        "{v}"
    );

    // Restored: the data, and the accounts (app logs in with its own password).
    let (st, v) = restore(&env, &bid, "copy").await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let copy = v["instance"]["id"].as_str().unwrap().to_string();
    let cview = env
        .wait_status(&copy, "ACTIVE", Duration::from_secs(120))
        .await;
    let got = rows(&env, &cview).await;
    assert!(
        got.starts_with(&[1, 2]) && !got.contains(&4),
        "restored rows: {got:?}"
    );
    let (_, users) = env
        .call("GET", &format!("/instances/{copy}/users"), None)
        .await;
    assert!(
        users["users"]
            .as_array()
            .unwrap()
            .iter()
            .any(|u| u["name"] == "app"),
        "{users}"
    );
    let pw = |i: &str| {
        std::fs::read_to_string(env.instance_dir(i).join("state/mariadb/admin.password")).unwrap()
    };
    assert_ne!(
        pw(&id),
        pw(&copy),
        "the copy's admin credentials are its own"
    );
    // The restored instance is fully managed with them: a new database works.
    let (st, v) = env
        .call(
            "POST",
            &format!("/instances/{copy}/databases"),
            Some(json!({"databases": [{"name": "after_restore"}]})),
        )
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");

    // A damaged dump is refused before anything is loaded or started.
    let key = format!("{bid}.cfbk");
    let mut bytes = env.read_object(&id, &key).await;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    env.write_object(&id, &key, &bytes).await;
    let (_, v) = restore(&env, &bid, "bad").await;
    let bad = v["instance"]["id"].as_str().unwrap().to_string();
    let e = env
        .wait_status(&bad, "ERROR", Duration::from_secs(60))
        .await;
    let msg = e["fault"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains(&bid) && msg.contains("failed authentication"),
        "{e}"
    );
    assert!(env.db_pid(&bad).is_none(), "nothing was started");
}

/// Unmounts a tmpfs when dropped.
struct Tmpfs(std::path::PathBuf);
impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// The stored objects but the live instances' archived change logs.
async fn backup_objects(env: &Env) -> Vec<String> {
    env.stored()
        .await
        .into_iter()
        .filter(|k| !k.contains("/archive/"))
        .collect()
}

async fn full_storage_fails_the_backup_and_nothing_else(storage: BackupStorage) {
    // A full disk for `local` (a 64 KiB tmpfs), a bucket limited to 64 KiB for `nats`.
    let storage = match storage {
        BackupStorage::Nats { .. } => BackupStorage::Nats {
            max_bytes: Some(64 * 1024),
        },
        local => local,
    };
    let env = env_on(storage).await;
    let id = env.create("full").await;
    let view = env
        .wait_status(&id, "ACTIVE", Duration::from_secs(120))
        .await;
    let _guard = if storage == BackupStorage::Local {
        let root = env.dir.path().join("backups");
        std::fs::create_dir_all(&root).unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
            .arg(&root)
            .status()
            .unwrap();
        assert!(
            st.success(),
            "mounting a tiny tmpfs (the suite runs as root)"
        );
        Some(Tmpfs(root))
    } else {
        None
    };
    let bid = post_backup(&env, json!({"backup": {"name": "nospace", "instance": id}})).await;
    let f = env.wait_backup(&bid, "FAILED").await;
    assert!(
        f["fault"]
            .as_str()
            .unwrap_or_default()
            .contains("the backup storage is full"),
        "{f}"
    );
    // The instance's archive (it starts with the first backup, and stops when storage is
    // full) is not the failed backup's.
    let left = backup_objects(&env).await;
    assert!(
        left.is_empty(),
        "nothing left in the full storage: {left:?}"
    );
    env.wait_status(&id, "ACTIVE", Duration::from_secs(10))
        .await;
    let mut c = env.connect(&view, "app", "s3cret-Pw", "shop").await;
    sqlx::query("CREATE TABLE t (i INT)")
        .execute(&mut c)
        .await
        .unwrap();
    c.close().await.unwrap();
}

fn find_pid(needle: &[&str]) -> Option<i32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_string_lossy().parse().ok()?;
        let cmd = String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).ok()?)
            .replace('\0', " ");
        needle.iter().all(|n| cmd.contains(n)).then_some(pid)
    })
}

async fn killing_the_agent_mid_backup_fails_it_cleanly(storage: BackupStorage) {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let env = env_on(storage).await;
    let id = env.create("midway").await;
    let view = env
        .wait_status(&id, "ACTIVE", Duration::from_secs(120))
        .await;
    let agent = env.agent_pid(&id).unwrap();
    let bid = post_backup(&env, json!({"backup": {"name": "cut", "instance": id}})).await;
    // Freeze mariabackup as soon as it runs, so the backup is surely in flight.
    let dir = env.instance_dir(&id).display().to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    let tool = loop {
        if let Some(p) = find_pid(&["mariabackup", "--backup", &dir]) {
            let _ = kill(Pid::from_raw(p), Signal::SIGSTOP);
            break p;
        }
        assert!(Instant::now() < deadline, "mariabackup never started");
        std::thread::sleep(Duration::from_millis(2));
    };
    kill(Pid::from_raw(agent), Signal::SIGKILL).unwrap();
    let _ = kill(Pid::from_raw(tool), Signal::SIGKILL);
    // The controller starts a new agent; the redelivered intent is reported interrupted.
    let f = env.wait_backup(&bid, "FAILED").await;
    assert!(
        f["fault"]
            .as_str()
            .unwrap_or_default()
            .contains("interrupted"),
        "{f}"
    );
    let left = backup_objects(&env).await;
    assert!(left.is_empty(), "no partial object: {left:?}");
    // A failed backup cannot be restored from.
    let (st, v) = restore(&env, &bid, "never").await;
    assert_eq!(st, StatusCode::CONFLICT, "{v}");
    // The database served throughout and still does.
    let view2 = env
        .wait_status(&id, "ACTIVE", Duration::from_secs(30))
        .await;
    assert_eq!(view2["port"], view["port"]);
    let mut c = env.connect(&view, "app", "s3cret-Pw", "shop").await;
    sqlx::query("CREATE TABLE after_cut (i INT)")
        .execute(&mut c)
        .await
        .unwrap();
    c.close().await.unwrap();
}

/// Each instance's backups are sealed with its own key: A's key (as a tenant with root in A's
/// VM could take it from a backup intent) opens A's backups and not B's, under either key id;
/// no agent is given the operator's keyring.
async fn an_instance_key_opens_its_own_backups_only(storage: BackupStorage) {
    use coffer_strategies::backup::{instance_key, load_keyring};
    use coffer_strategies::pipeline::{open_prefetched, Keyring};
    let env = env_on(storage).await;
    let (a, _) = env.active_with_rows("a", &[1]).await;
    let (b, _) = env.active_with_rows("b", &[2]).await;
    let ba = post_backup(&env, json!({"backup": {"name": "a", "instance": a}})).await;
    env.wait_backup(&ba, "COMPLETED").await;
    let bb = post_backup(&env, json!({"backup": {"name": "b", "instance": b}})).await;
    env.wait_backup(&bb, "COMPLETED").await;
    let ring = load_keyring(&env.dir.path().join("keyring.toml")).unwrap();
    let (a_id, a_key) = instance_key(&ring, "k1", &a).unwrap();
    let open = |bytes: Vec<u8>, ring: Keyring| -> Result<Vec<u8>, String> {
        let (_, mut r) = open_prefetched(std::io::Cursor::new(bytes), Some(&ring), None)
            .map_err(|e| e.to_string())?;
        let mut out = vec![];
        std::io::Read::read_to_end(&mut r, &mut out).map_err(|e| e.to_string())?;
        Ok(out)
    };
    let mut leaked = Keyring::default();
    leaked.add(&a_id, a_key);
    let a_stream = env.read_object(&a, &format!("{ba}.cfbk")).await;
    assert!(
        open(a_stream, leaked.clone()).is_ok(),
        "A's key opens A's backup"
    );
    let b_stream = env.read_object(&b, &format!("{bb}.cfbk")).await;
    let e = open(b_stream.clone(), leaked).unwrap_err();
    assert!(
        e.contains(&format!("k1:{b}")) && e.contains("not in the keyring"),
        "{e}"
    );
    let mut forged = Keyring::default();
    forged.add(&format!("k1:{b}"), a_key);
    let e = open(b_stream, forged).unwrap_err();
    assert!(e.contains("does not open"), "{e}");
    for id in [&a, &b] {
        let cfg = std::fs::read_to_string(env.instance_dir(id).join("agent.toml")).unwrap();
        assert!(!cfg.contains("keyring"), "{cfg}");
    }
}

/// Each scenario above, once per storage backend.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod local {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(BackupStorage::Local).await
                }
            )*
        }
        mod nats {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(BackupStorage::Nats { max_bytes: None }).await
                }
            )*
        }
    };
}

on_both_backends!(
    backup_and_restore_into_a_new_instance,
    tampered_backups_and_missing_keys_never_restore,
    restores_are_bound_to_the_controllers_record,
    key_rotation_keeps_old_backups_restorable,
    incremental_chains_restore_from_any_link_and_delete_together,
    full_storage_fails_the_backup_and_nothing_else,
    killing_the_agent_mid_backup_fails_it_cleanly,
    logical_backups_restore_data_and_accounts,
    an_instance_key_opens_its_own_backups_only,
);
