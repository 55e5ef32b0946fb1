//! Backup schedules (a Coffer extension): runs on time with a full/incremental mix, never two at
//! once, retention that keeps what kept backups build on, one run for missed due times, and bad
//! input refused with nothing created.

use std::time::{Duration, Instant};

use coffer_tests::{Env, StatusCode};
use serde_json::{json, Value};

async fn schedule(env: &Env, id: &str) -> Value {
    let (st, v) = env
        .call("GET", &format!("/backup_schedules/{id}"), None)
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    v["backup_schedule"].clone()
}

/// The instance's backups, newest first.
async fn backups(env: &Env, instance: &str) -> Vec<Value> {
    let (st, v) = env
        .call("GET", &format!("/instances/{instance}/backups"), None)
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    v["backups"].as_array().unwrap().clone()
}

async fn until<T, F: std::future::Future<Output = Option<T>>>(
    env: &Env,
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(t) = f().await {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "{what} not seen within {timeout:?}\n{}",
            env.controller_log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedules_run_mix_full_and_incremental_and_retention_keeps_what_kept_backups_need() {
    let env = Env::start().await;
    let (id, _) = env.active_with_rows("sched", &[1, 2]).await;

    // Bad input: a clear 4xx, and nothing created.
    for (body, status, says) in [
        (
            json!({"backup_schedule": {"instance": id, "name": "n", "pattern": "61 * * * *"}}),
            400,
            "61 * * * *",
        ),
        (
            json!({"backup_schedule": {"instance": id, "name": "n", "pattern": "daily"}}),
            400,
            "not a cron pattern",
        ),
        (
            json!({"backup_schedule": {"instance": id, "name": "n", "pattern": "* * * * *", "full_every": 0}}),
            400,
            "positive",
        ),
        (
            json!({"backup_schedule": {"instance": id, "name": "n", "pattern": "* * * * *", "keep": 3}}),
            400,
            "keep",
        ),
        (
            json!({"backup_schedule": {"instance": id, "name": "n", "pattern": "* * * * *", "keep_monthly": 0}}),
            400,
            "positive",
        ),
        (
            json!({"backup_schedule": {"instance": id, "name": " ", "pattern": "* * * * *"}}),
            400,
            "name",
        ),
        (
            json!({"backup_schedule": {"instance": "nope", "name": "n", "pattern": "* * * * *"}}),
            404,
            "nope",
        ),
    ] {
        let (st, v) = env
            .call("POST", "/backup_schedules", Some(body.clone()))
            .await;
        assert_eq!(st.as_u16(), status, "{body}: {v}");
        assert!(v.to_string().contains(says), "{body}: {v}");
    }
    let (_, v) = env.call("GET", "/backup_schedules", None).await;
    assert_eq!(v["backup_schedules"], json!([]));

    // Retention tiers are kept and shown (`ops::schedules::expired`'s unit tests apply them).
    let (st, v) = env
        .call(
            "POST",
            "/backup_schedules",
            Some(json!({"backup_schedule": {"instance": id, "name": "tiers", "pattern": "0 3 * * *", "keep_daily": 7, "keep_weekly": 4, "keep_monthly": 12}})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let tiers = v["backup_schedule"]["id"].as_str().unwrap().to_string();
    let got = schedule(&env, &tiers).await;
    assert_eq!(
        (
            &got["keep_daily"],
            &got["keep_weekly"],
            &got["keep_monthly"],
            &got["kind"]
        ),
        (&json!(7), &json!(4), &json!(12), &json!("backup")),
        "{got}"
    );
    let (st, _) = env
        .call("DELETE", &format!("/backup_schedules/{tiers}"), None)
        .await;
    assert_eq!(st, StatusCode::ACCEPTED);

    // Every 2 s, every second run full, keeping the newest completed one (and what it builds on).
    let (st, v) = env
        .call(
            "POST",
            "/backup_schedules",
            Some(json!({"backup_schedule": {"instance": id, "name": "often", "pattern": "*/2 * * * * *", "full_every": 2, "keep_last": 1}})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let sid = v["backup_schedule"]["id"].as_str().unwrap().to_string();
    assert_eq!(v["backup_schedule"]["runs"], 0);
    assert!(v["backup_schedule"]["next_run"].is_string(), "{v}");

    // Watch the runs: never two backups of the instance running at once, never a kept
    // incremental without its parent; until five runs started and retention removed the first
    // two (the newest completed one and what it builds on stay).
    let mut seen: Vec<Value> = vec![];
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let all = backups(&env, &id).await;
        let running = all
            .iter()
            .filter(|b| b["status"] == "NEW" || b["status"] == "BUILDING")
            .count();
        assert!(running <= 1, "two backups ran at once: {all:#?}");
        for b in &all {
            if let Some(p) = b["parent_id"].as_str() {
                assert!(
                    all.iter().any(|k| k["id"] == p),
                    "retention removed {p}, which {} builds on: {all:#?}",
                    b["id"]
                );
            }
            if !seen.iter().any(|s| s["id"] == b["id"]) {
                seen.push(b.clone());
            }
        }
        seen.sort_by(|a, b| a["created"].as_str().cmp(&b["created"].as_str()));
        let gone = |i: usize| seen.len() > i && !all.iter().any(|b| b["id"] == seen[i]["id"]);
        if seen.len() >= 5 && gone(0) && gone(1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "five scheduled backups and retention not seen: {seen:#?}\n{}",
            env.controller_log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Oldest first: full, incremental on it, full, incremental on that, full.
    let kinds: Vec<bool> = seen[..5].iter().map(|b| b["parent_id"].is_null()).collect();
    assert_eq!(kinds, [true, false, true, false, true], "{seen:#?}");
    assert_eq!(seen[1]["parent_id"], seen[0]["id"]);
    assert_eq!(seen[3]["parent_id"], seen[2]["id"]);
    let s = schedule(&env, &sid).await;
    assert!(s["runs"].as_i64().unwrap() >= 5, "{s}");
    assert!(
        s["last_result"]
            .as_str()
            .unwrap()
            .starts_with("started backup")
            || s["last_result"].as_str().unwrap().starts_with("skipped"),
        "{s}"
    );
    // Delete the schedule: it runs no more.
    let (st, v) = env
        .call("DELETE", &format!("/backup_schedules/{sid}"), None)
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    let (st, _) = env
        .call("GET", &format!("/backup_schedules/{sid}"), None)
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);

    // What is kept is complete: every incremental has its parent.
    let kept = until(
        &env,
        "no backup running",
        Duration::from_secs(60),
        || async {
            let all = backups(&env, &id).await;
            all.iter()
                .all(|b| b["status"] == "COMPLETED")
                .then_some(all)
        },
    )
    .await;
    for b in &kept {
        if let Some(p) = b["parent_id"].as_str() {
            assert!(
                kept.iter().any(|k| k["id"] == p),
                "kept incremental {} lost its parent {p}: {kept:#?}",
                b["id"]
            );
        }
    }
    assert!(!kept.is_empty());
    // What is kept restores.
    let newest = kept[0]["id"].as_str().unwrap();
    let (st, v) = env
        .call(
            "POST",
            "/instances",
            Some(json!({"instance": {"name": "back", "flavorRef": "1", "volume": {"size": 1}, "restorePoint": {"backupRef": newest}}})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let rid = v["instance"]["id"].as_str().unwrap().to_string();
    let view = env
        .wait_for(&rid, "ACTIVE", Duration::from_secs(120), |i| {
            i["status"] == "ACTIVE"
        })
        .await;
    assert_eq!(env.rows(&view).await, vec![1, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_missed_while_the_controller_was_killed_starts_once_when_it_is_back() {
    let mut env = Env::start().await;
    let (id, _) = env.active_with_rows("missed", &[1]).await;
    // Due once a minute, a few seconds from now.
    let due = (chrono_second() + 10) % 60;
    let past_due = Instant::now() + Duration::from_secs(12);
    let (st, v) = env
        .call(
            "POST",
            "/backup_schedules",
            Some(json!({"backup_schedule": {"instance": id, "name": "minutely", "pattern": format!("{due} * * * * *")}})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let sid = v["backup_schedule"]["id"].as_str().unwrap().to_string();
    env.kill_controller();
    let runs = "SELECT CAST(runs AS TEXT) FROM backup_schedules WHERE id = $1";
    assert_eq!(
        env.store_text(runs, &sid).await,
        "0",
        "ran before the controller stopped"
    );
    // Down until the due time has passed.
    tokio::time::sleep_until(past_due.into()).await;
    assert_eq!(env.store_text(runs, &sid).await, "0");
    env.start_controller();
    until(&env, "the missed run", Duration::from_secs(30), || async {
        (schedule(&env, &sid).await["runs"] == 1).then_some(())
    })
    .await;
    let all = backups(&env, &id).await;
    assert_eq!(all.len(), 1, "{all:#?}");
    let s = schedule(&env, &sid).await;
    assert_eq!(s["runs"], 1, "{s}");
    assert!(
        s["last_result"]
            .as_str()
            .unwrap()
            .starts_with("started backup"),
        "{s}"
    );
    env.wait_backup(all[0]["id"].as_str().unwrap(), "COMPLETED")
        .await;
}

/// The wall clock's second of the minute (UTC).
fn chrono_second() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        % 60
}
