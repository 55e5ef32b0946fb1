//! Guest logs against real MariaDB: the slow query log enabled live, published in pieces that
//! hold only new bytes, across a rotation (rename + FLUSH SLOW LOGS), discarded; the guest log;
//! errors.

use std::time::{Duration, Instant};

use coffer_tests::{Env, StatusCode};
use serde_json::{json, Value};
use sqlx::Connection;

async fn log(env: &Env, id: &str, body: Value) -> (StatusCode, Value) {
    env.call("POST", &format!("/instances/{id}/log"), Some(body))
        .await
}

async fn slow_query(env: &Env, view: &Value, marker: &str) {
    let mut c = env.connect(view, "app", "s3cret-Pw", "shop").await;
    sqlx::query(&format!("SELECT SLEEP(0.3), '{marker}'"))
        .execute(&mut c)
        .await
        .unwrap();
    c.close().await.unwrap();
}

/// The published pieces of a log, in order, from the local storage.
fn pieces(env: &Env, id: &str, log: &str) -> Vec<String> {
    let dir = env
        .dir
        .path()
        .join(format!("backups/{id}/database_logs/{id}/mariadb-{log}"));
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect()
}

async fn wait_log_status(env: &Env, id: &str, name: &str, want: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (st, v) = log(env, id, json!({"name": name})).await;
        // A new agent answers 422 until it has adopted the database.
        assert!(
            st == StatusCode::OK || st == StatusCode::UNPROCESSABLE_ENTITY,
            "{v}"
        );
        if st == StatusCode::OK && v["log"]["status"] == want {
            return v["log"].clone();
        }
        assert!(Instant::now() < deadline, "log {name} not {want}: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_query_log_publishes_new_bytes_across_rotation() {
    let env = Env::start().await;
    let (id, view) = env.active_with_rows("logs", &[]).await;
    // A small long_query_time, through a configuration group.
    let (st, g) = env
        .call(
            "POST",
            "/configurations",
            Some(json!({"configuration": {"name": "slow", "values": {"long_query_time": 0.1}}})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{g}");
    let gid = g["configuration"]["id"].as_str().unwrap();
    let (st, _) = env
        .call(
            "PUT",
            &format!("/instances/{id}"),
            Some(json!({"instance": {"configuration": gid}})),
        )
        .await;
    assert_eq!(st, StatusCode::ACCEPTED);

    let (_, l) = log(&env, &id, json!({"name": "slow_query"})).await;
    assert_eq!(l["log"]["status"], "Disabled", "{l}");
    assert_eq!(l["log"]["type"], "USER");
    let (st, l) = log(&env, &id, json!({"name": "slow_query", "enable": 1})).await;
    assert_eq!(st, StatusCode::OK, "{l}");
    assert!(
        ["Enabled", "Ready"].contains(&l["log"]["status"].as_str().unwrap()),
        "switched on live, no restart: {l}"
    );
    let (_, shown) = env.show(&id).await;
    assert_eq!(shown["instance"]["status"], "ACTIVE");
    // The group's long_query_time has reached the server before the first slow query.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut c = env.connect(&view, "app", "s3cret-Pw", "shop").await;
        let v: String = sqlx::query_scalar("SELECT CAST(@@global.long_query_time AS CHAR)")
            .fetch_one(&mut c)
            .await
            .unwrap();
        c.close().await.unwrap();
        if v.starts_with("0.1") {
            break;
        }
        assert!(Instant::now() < deadline, "long_query_time {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    slow_query(&env, &view, "marker-one").await;
    wait_log_status(&env, &id, "slow_query", "Ready").await;
    let (st, l) = log(&env, &id, json!({"name": "slow_query", "publish": 1})).await;
    assert_eq!(st, StatusCode::OK, "{l}");
    assert_eq!(l["log"]["status"], "Published", "{l}");
    assert_eq!(l["log"]["container"], "database_logs");
    assert_eq!(
        l["log"]["prefix"],
        format!("{id}/mariadb-slow_query/").as_str()
    );
    let first = l["log"]["published"].as_u64().unwrap();
    assert!(first > 0);
    let p = pieces(&env, &id, "slow_query");
    assert!(p.iter().any(|x| x.contains("marker-one")), "{p:?}");

    // The agent is replaced: what was published stays published.
    env.replace_agent(&id).await;
    env.wait_status(&id, "ACTIVE", Duration::from_secs(30))
        .await;
    wait_log_status(&env, &id, "slow_query", "Published").await;

    // More: only the new bytes go out.
    slow_query(&env, &view, "marker-two").await;
    wait_log_status(&env, &id, "slow_query", "Partial").await;
    let (_, l) = log(&env, &id, json!({"name": "slow_query", "publish": 1})).await;
    let p = pieces(&env, &id, "slow_query");
    let last = p.last().unwrap();
    assert!(
        last.contains("marker-two") && !last.contains("marker-one"),
        "{p:?}"
    );
    let total: usize = p.iter().map(|x| x.len()).sum();
    assert_eq!(l["log"]["published"].as_u64().unwrap() as usize, total);

    // Rotation: lines written after the last publish, then rename + FLUSH SLOW LOGS.
    slow_query(&env, &view, "marker-three").await;
    let file = env
        .instance_dir(&id)
        .join("state/mariadb/logs/mariadb-slow_query.log");
    std::fs::rename(&file, file.with_extension("log.1")).unwrap();
    let mut admin = env.admin_connect(&id).await;
    sqlx::query("FLUSH SLOW LOGS")
        .execute(&mut admin)
        .await
        .unwrap();
    admin.close().await.unwrap();
    slow_query(&env, &view, "marker-four").await;
    wait_log_status(&env, &id, "slow_query", "Rotated").await;
    let (_, l) = log(&env, &id, json!({"name": "slow_query", "publish": 1})).await;
    assert_eq!(l["log"]["status"], "Published", "{l}");
    let all = pieces(&env, &id, "slow_query").join("");
    for m in ["marker-one", "marker-two", "marker-three", "marker-four"] {
        assert_eq!(all.matches(m).count(), 1, "{m} once: {all}");
    }
    let (st, t) = env
        .call(
            "GET",
            &format!("/instances/{id}/log/slow_query/tail?lines=400"),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{t}");
    let lines = t["lines"].as_array().unwrap();
    assert!(
        lines
            .iter()
            .any(|x| x.as_str().unwrap().contains("marker-four")),
        "{t}"
    );

    // Discard: nothing left in storage.
    let (st, l) = log(&env, &id, json!({"name": "slow_query", "discard": 1})).await;
    assert_eq!(st, StatusCode::OK, "{l}");
    assert_eq!(l["log"]["published"], 0, "{l}");
    assert!(pieces(&env, &id, "slow_query").is_empty());
    assert!(!env
        .dir
        .path()
        .join(format!(
            "backups/{id}/database_logs/{id}/mariadb-slow_query_metafile"
        ))
        .exists());

    // Published again, and switched off live.
    slow_query(&env, &view, "marker-five").await;
    let (st, l) = log(&env, &id, json!({"name": "slow_query", "publish": 1})).await;
    assert_eq!(st, StatusCode::OK, "{l}");
    assert!(!pieces(&env, &id, "slow_query").is_empty(), "{l}");
    let (_, l) = log(&env, &id, json!({"name": "slow_query", "disable": 1})).await;
    assert_eq!(l["log"]["status"], "Disabled", "{l}");

    // The instance is deleted: its published logs go with it.
    let (st, _) = env.call("DELETE", &format!("/instances/{id}"), None).await;
    assert_eq!(st, StatusCode::ACCEPTED);
    let logs_dir = env.dir.path().join(format!("backups/database_logs/{id}"));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while walk(&logs_dir) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "published logs outlived their instance"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Files below `dir` (0 when it does not exist).
fn walk(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| {
                    if e.path().is_dir() {
                        walk(&e.path())
                    } else {
                        1
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_log_and_errors() {
    let env = Env::start().await;
    let id = env.create("g").await;
    env.wait_status(&id, "ACTIVE", Duration::from_secs(120))
        .await;
    // Tenants see their logs; admins also the system's.
    let (_, l) = env.call("GET", &format!("/instances/{id}/log"), None).await;
    let names: Vec<&str> = l["logs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["general", "slow_query"], "{l}");
    let admin = env.admin_token.clone();
    let base = format!("{}/instances/{id}/log", env.base());
    let (_, l) = env.call_as(&admin, "GET", &base, None).await;
    let names: Vec<&str> = l["logs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"guest") && names.contains(&"error"), "{l}");
    let (st, g) = env
        .call_as(
            &admin,
            "POST",
            &base,
            Some(json!({"name": "guest", "publish": 1})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{g}");
    assert_eq!(g["log"]["type"], "SYS");
    assert!(g["log"]["published"].as_u64().unwrap() > 0, "{g}");
    // Errors.
    let (st, _) = log(&env, &id, json!({"name": "nope"})).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (st, _) = log(&env, &id, json!({"name": "guest", "publish": 1})).await;
    assert_eq!(st, StatusCode::FORBIDDEN, "a tenant on a system log");
    let (st, _) = log(
        &env,
        &id,
        json!({"name": "general", "enable": 1, "disable": 1}),
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let (st, _) = log(&env, &id, json!({"name": "general", "enable": true})).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "flags are 0/1 integers");
    let (st, _) = env
        .call_as(
            &admin,
            "POST",
            &base,
            Some(json!({"name": "error", "enable": 1})),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "system logs are always on");
}

/// On NATS storage: a published log tails, a second publish leaves the first metafile in place
/// (stored objects are never replaced), a discard removes the pieces from the controller's
/// side (agents cannot delete), publishing works again after it, and the instance's storage
/// goes with the instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_logs_on_nats_tail_discard_and_go_with_the_instance() {
    let env = Env::start_with(coffer_tests::Opts {
        backup_storage: coffer_tests::BackupStorage::Nats { max_bytes: None },
        ..Default::default()
    })
    .await;
    let id = env.create("n").await;
    env.wait_status(&id, "ACTIVE", Duration::from_secs(120))
        .await;
    let admin = env.admin_token.clone();
    let base = format!("{}/instances/{id}/log", env.base());
    let publish = || async {
        let (st, g) = env
            .call_as(
                &admin,
                "POST",
                &base,
                Some(json!({"name": "guest", "publish": 1})),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{g}");
        g
    };
    let g = publish().await;
    assert!(g["log"]["published"].as_u64().unwrap() > 0, "{g}");
    let meta = format!("{id}/database_logs/{id}/mariadb-guest_metafile");
    let stored = env.stored().await;
    assert!(stored.contains(&meta), "{stored:?}");
    assert!(
        stored
            .iter()
            .any(|k| k.starts_with(&format!("{id}/database_logs/{id}/mariadb-guest/log-"))),
        "{stored:?}"
    );
    let tail = format!("{base}/guest/tail?lines=5");
    let (st, t) = env.call_as(&admin, "GET", &tail, None).await;
    assert_eq!(st, StatusCode::OK, "{t}");
    assert!(!t["lines"].as_array().unwrap().is_empty(), "{t}");
    // More lines, published again: new pieces, the same metafile.
    env.restart(&id).await;
    env.wait_status(&id, "ACTIVE", Duration::from_secs(60))
        .await;
    let again = publish().await;
    assert!(
        again["log"]["published"].as_u64() > g["log"]["published"].as_u64(),
        "{again}"
    );
    // Discard: the controller removes every piece and the metafile.
    let (st, d) = env
        .call_as(
            &admin,
            "POST",
            &base,
            Some(json!({"name": "guest", "discard": 1})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{d}");
    let left = env.stored().await;
    assert!(
        !left.iter().any(|k| k.contains("mariadb-guest")),
        "{left:?}"
    );
    publish().await;
    assert!(env.stored().await.contains(&meta));
    // Deleted with its instance: nothing of it stays in storage.
    env.delete_and_wait_gone(&id).await;
    let left = env.stored().await;
    assert!(left.is_empty(), "{left:?}");
}
