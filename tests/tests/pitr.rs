//! Point-in-time recovery (MariaDB): the source's binary log is archived continuously from its
//! first backup on; a restore to a time holds exactly the writes acknowledged before it and
//! none begun after it, including what was written while the agent was down (the archive
//! refills from where it stopped); the instance view shows the recovery window, and a time
//! outside it is a 400 naming it.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use coffer_tests::scenario::{self, Store};
use coffer_tests::{Env, Opts, StatusCode};
use serde_json::{json, Value};
use sqlx::Connection;

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

fn rfc3339(us: i64) -> String {
    chrono::DateTime::from_timestamp_micros(us)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

fn parse_ms(v: &Value) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(v.as_str()?)
        .ok()
        .map(|t| t.timestamp_millis())
}

/// Waits until the instance's recovery window reaches `at_us`; returns the window's
/// (earliest, latest) in ms.
async fn window_reaching(env: &Env, id: &str, at_us: i64) -> (i64, i64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, v) = env.show(id).await;
        let r = &v["instance"]["recovery"];
        if let (Some(e), Some(l)) = (parse_ms(&r["earliest"]), parse_ms(&r["latest"])) {
            if l * 1000 >= at_us {
                return (e, l);
            }
        }
        assert!(
            Instant::now() < deadline,
            "the recovery window never reached {}: {v}\n{}",
            rfc3339(at_us),
            env.logs(id)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn restore(env: &Env, name: &str, point: Value) -> (StatusCode, Value) {
    env.call(
        "POST",
        "/instances",
        Some(json!({"instance": {
            "name": name, "flavorRef": "1", "volume": {"size": 1}, "restorePoint": point,
        }})),
    )
    .await
}

async fn restored_rows(env: &Env, name: &str, point: Value) -> Vec<i32> {
    let (st, v) = restore(env, name, point).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let id = v["instance"]["id"].as_str().unwrap().to_string();
    let view = env
        .wait_status(&id, "ACTIVE", Duration::from_secs(180))
        .await;
    env.rows(&view).await
}

/// A time after write `k` was acknowledged, just before the next one began (µs).
fn midway(writes: &[(i32, i64, i64)], k: usize) -> i64 {
    writes[k + 1].1 - 1
}

/// Waits until the archive of `id` has placed everything written before `acked_us` (its
/// agent's ledger: a look begun after it stored all it read). The archive places a write by
/// the look that reads it: on a busy host that can be later than the write, and a restore to
/// a time between the write and its look would leave it out (the archive does not claim it).
/// Writes whose archive watches wait for this before the next one begins, so that a time
/// between two of them is one the archive can restore exactly.
async fn placed(env: &Env, id: &str, acked_us: i64) {
    let ledger = env.instance_dir(id).join("state/archive.json");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let latest = std::fs::read(&ledger)
            .ok()
            .and_then(|t| serde_json::from_slice::<Value>(&t).ok())
            .and_then(|v| v["latest_us"].as_i64())
            .unwrap_or(0);
        if latest >= acked_us {
            return;
        }
        if Instant::now() > deadline {
            let (_, v) = env.show(id).await;
            panic!(
                "the archive of {id} never placed the write acknowledged at {}\nledger: {}\nview: {v}\n{}",
                rfc3339(acked_us),
                std::fs::read_to_string(&ledger).unwrap_or_default(),
                env.logs(id)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Takes a backup of `id` and waits until it completed; returns its id.
async fn backed_up(env: &Env, id: &str, name: &str) -> String {
    completed_backup(env, json!({"backup": {"name": name, "instance": id}})).await
}

/// Posts a backup (`body`) and waits until it completed; returns its id.
async fn completed_backup(env: &Env, body: Value) -> String {
    let (st, v) = env.call("POST", "/backups", Some(body)).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    let bid = v["backup"]["id"].as_str().unwrap().to_string();
    env.wait_backup(&bid, "COMPLETED").await;
    bid
}

/// Writes `rows` through `store` (a connection each) one at a time, each acknowledged before
/// the next begins, every `pace`; returns (row, began, acknowledged) in µs.
/// With `watched` (the environment), each write waits until the instance's archive placed
/// it ([`placed`]).
async fn paced_store_writes(
    store: Store,
    view: &Value,
    rows: std::ops::Range<i32>,
    pace: Duration,
    watched: Option<&Env>,
) -> Vec<(i32, i64, i64)> {
    let mut writes = vec![];
    let mut tick = tokio::time::interval(pace);
    for i in rows {
        tick.tick().await;
        let began = now_us();
        store.try_write(view, i).await.unwrap();
        let acked = now_us();
        writes.push((i, began, acked));
        if let Some(env) = watched {
            placed(env, view["id"].as_str().unwrap(), acked).await;
        }
    }
    writes
}

/// Restores an instance of `store` (of `version`) from `point`, waits for ACTIVE and reads
/// its rows.
async fn restored_in(
    env: &Env,
    store: Store,
    version: &str,
    name: String,
    point: Value,
) -> Vec<i32> {
    let mut body = store.restore_body(&name, version, "");
    body["instance"]["restorePoint"] = point;
    let (st, v) = env.call("POST", "/instances", Some(body)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let rid = v["instance"]["id"].as_str().unwrap().to_string();
    let rview = env
        .wait_status(&rid, "ACTIVE", Duration::from_secs(180))
        .await;
    if store == Store::Postgresql {
        // The restored server is its own: its admin has this instance's password, and the
        // recovery's restore_command and settings are gone.
        use sqlx::{ConnectOptions, Connection};
        let pw = std::fs::read_to_string(
            env.instance_dir(&rid)
                .join("state/postgresql/admin.password"),
        )
        .unwrap();
        let mut c = sqlx::postgres::PgConnectOptions::new()
            .host("127.0.0.1")
            .port(rview["port"].as_u64().unwrap() as u16)
            .username("coffer_admin")
            .password(pw.trim())
            .database("postgres")
            .connect()
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "the restored instance's admin has its own password: {e}\n{}",
                    env.logs(&rid)
                )
            });
        let cmd: String = sqlx::query_scalar("SELECT current_setting('restore_command')")
            .fetch_one(&mut c)
            .await
            .unwrap();
        assert_eq!(cmd, "", "the restore's restore_command was reset");
        // So are the recovery's own settings (no restartpoints while it replayed).
        for (k, during) in [("max_wal_size", "1TB"), ("checkpoint_timeout", "1d")] {
            let v: String = sqlx::query_scalar(&format!("SELECT current_setting('{k}')"))
                .fetch_one(&mut c)
                .await
                .unwrap();
            assert_ne!(v, during, "the restore's {k} was reset");
        }
        c.close().await.unwrap();
    }
    store.read(env, &rview).await
}

async fn pg_restored(env: &Env, version: &str, name: &str, point: Value) -> Vec<i32> {
    restored_in(env, Store::Postgresql, version, name.into(), point).await
}

/// Writes `rows` into `shop.t` one at a time, each acknowledged before the next begins, every
/// `pace`; returns (row, began, acknowledged) in µs. With `watched`, each write waits until
/// the archive placed it ([`placed`]).
async fn paced_writes(
    env: &Env,
    view: &Value,
    rows: std::ops::Range<i32>,
    pace: Duration,
    watched: bool,
) -> Vec<(i32, i64, i64)> {
    let mut c = env.connect(view, "app", "s3cret-Pw", "shop").await;
    let mut writes = vec![];
    let mut tick = tokio::time::interval(pace);
    for i in rows {
        tick.tick().await;
        let began = now_us();
        sqlx::query("INSERT INTO t VALUES (?)")
            .bind(i)
            .execute(&mut c)
            .await
            .unwrap();
        let acked = now_us();
        writes.push((i, began, acked));
        if watched {
            placed(env, view["id"].as_str().unwrap(), acked).await;
        }
    }
    c.close().await.unwrap();
    writes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_to_a_time_holds_exactly_the_writes_before_it() {
    let env = Env::start().await;
    let (id, view) = env.active_with_rows("pitr", &[1, 2]).await;
    // No archive before the first backup (it is sealed with the instance's backup key).
    let (_, v) = env.show(&id).await;
    assert!(v["instance"]["recovery"]["earliest"].is_null(), "{v}");

    let bid = backed_up(&env, &id, "base").await;

    // A writer: one row at a time, each acknowledged before the next begins. The agent is
    // killed half-way: what is written meanwhile is archived when it is back.
    let mut writes = paced_writes(&env, &view, 100..120, Duration::from_millis(120), true).await;
    let pid = env.agent_pid(&id).expect("the agent runs");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL).unwrap();
    writes.extend(paced_writes(&env, &view, 120..140, Duration::from_millis(120), false).await);
    let last_ack = writes.last().unwrap().2;
    let (earliest, latest) = window_reaching(&env, &id, last_ack).await;

    // Between two writes while the agent watched: exactly the rows acknowledged before the
    // time, none begun after it.
    let between = |k: usize| (writes[k - 100].0, midway(&writes, k - 100));
    let (row, t) = between(110);
    let got = restored_rows(
        &env,
        "pitr-110",
        json!({"backupRef": bid, "restore_time": rfc3339(t)}),
    )
    .await;
    let want: Vec<i32> = [1, 2].into_iter().chain(100..=row).collect();
    assert_eq!(
        got,
        want,
        "restored to {} (between rows {row} and {})",
        rfc3339(t),
        row + 1
    );

    // While the agent was down the archive refilled what was written from the server's own
    // clock, which counts seconds: every row acknowledged a second before the time, none
    // begun after it, and no hole.
    let (row, t) = between(125);
    let got = restored_rows(
        &env,
        "pitr-125",
        json!({"backupRef": bid, "restore_time": rfc3339(t)}),
    )
    .await;
    let last = *got.last().unwrap();
    let want: Vec<i32> = [1, 2].into_iter().chain(100..=last).collect();
    assert_eq!(
        got,
        want,
        "restored to {} (near row {row}): a hole",
        rfc3339(t)
    );
    for (r, began, acked) in &writes {
        if *acked <= t - 1_000_000 {
            assert!(
                got.contains(r),
                "row {r} acknowledged a second before {} is missing: {got:?}",
                rfc3339(t)
            );
        }
        if *began > t {
            assert!(
                !got.contains(r),
                "row {r} begun after {} was restored: {got:?}",
                rfc3339(t)
            );
        }
    }

    // The latest restorable time, found from the instance alone: every acknowledged write.
    let got = restored_rows(
        &env,
        "pitr-latest",
        json!({"instance": id, "restore_time": rfc3339(latest * 1000)}),
    )
    .await;
    let want: Vec<i32> = [1, 2].into_iter().chain(100..140).collect();
    assert_eq!(got, want);

    // Outside the window, or malformed: a 400 that names the window, and nothing created.
    let (_, before) = env.call("GET", "/instances", None).await;
    for (point, says) in [
        (
            json!({"backupRef": bid, "restore_time": rfc3339((earliest - 60_000) * 1000)}),
            "recovery window is",
        ),
        (
            json!({"backupRef": bid, "restore_time": rfc3339(now_us() + 3_600_000_000)}),
            "after the latest restorable time",
        ),
        (
            json!({"instance": id, "restore_time": rfc3339((earliest - 60_000) * 1000)}),
            "recovery window is",
        ),
        (
            json!({"backupRef": bid, "restore_time": "yesterday"}),
            "RFC 3339",
        ),
        (json!({"instance": id}), "needs 'restore_time'"),
        (
            json!({"backupRef": bid, "instance": id, "restore_time": rfc3339(latest * 1000)}),
            "not both",
        ),
        (
            json!({"backupRef": bid, "restore_time": rfc3339(latest * 1000), "restore_position": "0-1-5"}),
            "not both",
        ),
    ] {
        let (st, v) = restore(&env, "pitr-bad", point.clone()).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{point}: {v}");
        assert!(v.to_string().contains(says), "{point}: {v}");
    }
    // Nothing was placed (the views' live fields, such as a new instance's first reported
    // position, may move meanwhile).
    let (_, after) = env.call("GET", "/instances", None).await;
    let ids = |v: &Value| -> Vec<Value> {
        v["instances"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| json!([i["id"], i["name"]]))
            .collect()
    };
    assert_eq!(ids(&before), ids(&after));
}

/// A replica promoted by a switchover archives from then on (it was given its key when it was
/// made): a backup of the new source rolls forward to a time as the old one's did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_replica_archives_and_restores_to_a_time() {
    let env = Env::start().await;
    let (src, _) = env.active_with_rows("pitr-src", &[1]).await;
    let (st, v) = env
        .call(
            "POST",
            "/instances",
            Some(json!({"instance": {"name": "pitr-rep", "replica_of": src, "replica_count": 1}})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let (_, s) = env.show(&src).await;
    let rep = s["instance"]["replicas"][0]["id"]
        .as_str()
        .expect("one replica")
        .to_string();
    env.wait_status(&rep, "ACTIVE", Duration::from_secs(120))
        .await;
    let (st, v) = env
        .action(&rep, json!({"promote_to_replica_source": {}}))
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let view = loop {
        let (_, v) = env.show(&rep).await;
        let i = &v["instance"];
        if i.get("replica_of").is_none()
            && i["status"] == "ACTIVE"
            && !i["recovery"]["archive"]["since"].is_null()
        {
            break i.clone();
        }
        assert!(
            Instant::now() < deadline,
            "the promoted replica is not an archiving source: {v}\n{}",
            env.logs(&rep)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    let bid = backed_up(&env, &rep, "new-source").await;
    let writes = paced_writes(&env, &view, 200..210, Duration::from_millis(120), true).await;
    window_reaching(&env, &rep, writes.last().unwrap().2).await;
    let t = midway(&writes, 4);
    let got = restored_rows(
        &env,
        "pitr-after-switchover",
        json!({"backupRef": bid, "restore_time": rfc3339(t)}),
    )
    .await;
    assert_eq!(got, vec![1, 200, 201, 202, 203, 204]);
}

/// Waits until `id` is a writable source (no longer a replica) whose archive runs since after
/// `after_ms` (Unix ms); returns its view.
async fn archiving_source(env: &Env, id: &str, after_ms: i64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (_, v) = env.show(id).await;
        let i = &v["instance"];
        if i.get("replica_of").is_none()
            && i["status"] == "ACTIVE"
            && parse_ms(&i["recovery"]["archive"]["since"]).is_some_and(|s| s > after_ms)
        {
            return i.clone();
        }
        assert!(
            Instant::now() < deadline,
            "{id} is not an archiving source: {v}\n{}",
            env.logs(id)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A source with two replicas is backed up, written to, switched over to one replica, written
/// to, then that one's host dies and a failover elects another: the recovery window of the
/// last source starts at the first source's backup and spans both changes, and a restore to a
/// time in each source's stretch holds exactly the writes acknowledged before it (the backup's
/// source's archive replayed up to where the next took over, then the next one's; PostgreSQL:
/// its recovery follows the timelines).
async fn across_sources(store: Store) {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let env = Env::start_with(Opts {
        respawn_agents: false,
        ..Opts::default()
    })
    .await;
    let version = store.register(&env);
    let (src, sview) = scenario::create_active(&env, store, &version, "lineage-src").await;
    store.write(&env, &sview, 1).await;
    let (st, v) = env
        .call(
            "POST",
            "/instances",
            Some(
                json!({"instance": {"name": "lineage-rep", "replica_of": src, "replica_count": 2}}),
            ),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let (_, s) = env.show(&src).await;
    let reps: Vec<String> = s["instance"]["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(reps.len(), 2, "{s}");
    for r in &reps {
        let view = env.wait_status(r, "ACTIVE", Duration::from_secs(180)).await;
        store.wait_read(&view, &[1]).await;
    }
    let bid = backed_up(&env, &src, "lineage-base").await;
    let pace = Duration::from_millis(150);
    let w1 = paced_store_writes(store, &sview, 100..106, pace, Some(&env)).await;
    window_reaching(&env, &src, w1.last().unwrap().2).await;

    // Switchover to the first replica.
    let first = reps[0].clone();
    let switched_at = now_us() / 1000;
    let (st, v) = env
        .action(&first, json!({"promote_to_replica_source": {}}))
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    let fview = archiving_source(&env, &first, switched_at).await;
    let w2 = paced_store_writes(store, &fview, 200..206, pace, Some(&env)).await;
    window_reaching(&env, &first, w2.last().unwrap().2).await;
    let all2: Vec<i32> = [1].into_iter().chain(100..106).chain(200..206).collect();
    // Both survivors have everything before the first one's host dies.
    for id in [&src, &reps[1]] {
        let view = env.wait_status(id, "ACTIVE", Duration::from_secs(60)).await;
        store.wait_read(&view, &all2).await;
    }
    kill(
        Pid::from_raw(env.agent_pid(&first).unwrap()),
        Signal::SIGKILL,
    )
    .unwrap();
    kill(Pid::from_raw(env.db_pid(&first).unwrap()), Signal::SIGKILL).unwrap();
    env.wait_status(&first, "ERROR", Duration::from_secs(30))
        .await;
    let failed_over_at = now_us() / 1000;
    let (st, v) = env
        .action(&first, json!({"eject_replica_source": {}}))
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    // The most advanced survivor wins: either the first source (now a replica) or the other
    // replica.
    let deadline = Instant::now() + Duration::from_secs(90);
    let winner = loop {
        let mut found = None;
        for id in [&src, &reps[1]] {
            let (_, v) = env.show(id).await;
            if v["instance"].get("replica_of").is_none() && v["instance"]["status"] == "ACTIVE" {
                found = Some(id.clone());
            }
        }
        if let Some(w) = found {
            break w;
        }
        assert!(Instant::now() < deadline, "no survivor became the source");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Writes begin once the winner's archive watches (from then on they are placed
    // precisely; the stretch before is a gap of the window, below).
    let wview = archiving_source(&env, &winner, failed_over_at).await;
    let w3 = paced_store_writes(store, &wview, 300..306, pace, Some(&env)).await;
    let (earliest, latest) = window_reaching(&env, &winner, w3.last().unwrap().2).await;
    let (_, v) = env.show(&winner).await;
    let recovery = &v["instance"]["recovery"];
    assert!(
        earliest * 1000 < w1[0].1,
        "the window starts at the first source's backup: {recovery}"
    );
    assert_eq!(
        recovery["sources"],
        json!([src, first, winner]),
        "the window spans three sources: {recovery}"
    );
    // The failover's stretch (the dead source's archive stopped, the winner's began later) is
    // a gap: a time inside it is refused, naming it.
    // (A switchover whose old source stopped looking before the new one began leaves a short
    // one too, before the new source's first write.)
    let gaps: Vec<(i64, i64)> = recovery["gaps"]
        .as_array()
        .map(|g| {
            g.iter()
                .map(|x| (parse_ms(&x["from"]).unwrap(), parse_ms(&x["to"]).unwrap()))
                .collect()
        })
        .unwrap_or_default();
    let (from, to) = *gaps.last().expect("the failover leaves a gap");
    assert!(
        from * 1000 >= w2.last().unwrap().2 && to * 1000 <= w3[0].1,
        "the gap lies between the writes of the two sources: {recovery}"
    );
    for (a, b) in &gaps[..gaps.len() - 1] {
        assert!(
            *a * 1000 >= w1.last().unwrap().2 && *b * 1000 <= w2[0].1,
            "a switchover's gap lies between the sources' writes: {recovery}"
        );
    }
    if to - from >= 2 {
        let mut body = store.restore_body("lineage-in-gap", &version, "");
        body["instance"]["restorePoint"] =
            json!({"instance": winner, "restore_time": rfc3339((from + 1) * 1000)});
        let (st, v) = env.call("POST", "/instances", Some(body)).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
        assert!(v.to_string().contains("failover"), "{v}");
    }

    // A time in each source's stretch, from the winner (the newest backup before the time that
    // any source took), and from the first backup by reference.
    let rows = |upto: &[(i32, i64, i64)], k: usize, before: &[i32]| -> Vec<i32> {
        before
            .iter()
            .copied()
            .chain(upto[..=k].iter().map(|w| w.0))
            .collect()
    };
    let w1_all: Vec<i32> = [1].into_iter().chain(100..106).collect();
    let cases = [
        (midway(&w1, 2), rows(&w1, 2, &[1])),
        (midway(&w2, 2), rows(&w2, 2, &w1_all)),
        (midway(&w3, 2), rows(&w3, 2, &all2)),
    ];
    let restored = |name: String, point: Value| restored_in(&env, store, &version, name, point);
    for (n, (t, want)) in cases.iter().enumerate() {
        let got = restored(
            format!("lineage-at-{n}"),
            json!({"instance": winner, "restore_time": rfc3339(*t)}),
        )
        .await;
        assert_eq!(&got, want, "restore to the time in stretch {n}");
    }
    let (t, want) = &cases[2];
    let got = restored(
        "lineage-by-backup".into(),
        json!({"backupRef": bid, "restore_time": rfc3339(*t)}),
    )
    .await;
    assert_eq!(
        &got, want,
        "the first backup rolled forward across both changes"
    );
    let everything: Vec<i32> = all2.iter().copied().chain(300..306).collect();
    let got = restored(
        "lineage-latest".into(),
        json!({"instance": winner, "restore_time": rfc3339(latest * 1000)}),
    )
    .await;
    assert_eq!(
        got, everything,
        "the latest restorable time holds every write"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_spanning_a_switchover_and_a_failover_restores_across_the_change_of_source() {
    across_sources(Store::Mariadb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgresql_window_spanning_a_switchover_and_a_failover_restores_across_timelines() {
    across_sources(Store::Postgresql).await;
}

/// The change file being written is closed once it was stored in a few pieces, then stored
/// again whole, and the controller removes the pieces: the archive stays a few objects per
/// file, and a restore to a time reads the whole files as exactly as the pieces.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_stored_in_pieces_are_stored_whole_and_restore_the_same() {
    let env = Env::start_with(Opts {
        backup_extra: "archive_rotate_segments = 3\narchive_ship_ms = 100\n",
        ..Default::default()
    })
    .await;
    let (id, view) = env.active_with_rows("pitr-compact", &[1]).await;
    let bid = backed_up(&env, &id, "base").await;
    let writes = paced_writes(&env, &view, 100..130, Duration::from_millis(150), true).await;
    window_reaching(&env, &id, writes.last().unwrap().2).await;

    // Every file but the one being written: one object, from its first byte.
    let deadline = Instant::now() + Duration::from_secs(60);
    let files = loop {
        let keys: Vec<(String, u64)> = env
            .stored()
            .await
            .iter()
            .filter_map(|k| k.strip_prefix(&format!("{id}/")))
            .filter_map(coffer_common::archive::parse_segment_key)
            .map(|(f, a, _)| (f, a))
            .collect();
        let mut files: Vec<String> = keys.iter().map(|k| k.0.clone()).collect();
        files.sort();
        files.dedup();
        let closed = &files[..files.len().saturating_sub(1)];
        let whole = closed.iter().all(|f| {
            keys.iter()
                .filter(|k| &k.0 == f)
                .map(|k| k.1)
                .collect::<Vec<_>>()
                == [0]
        });
        if closed.len() >= 2 && whole {
            break files;
        }
        assert!(
            Instant::now() < deadline,
            "the closed files are not stored whole: {keys:?}\n{}",
            env.logs(&id)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    let t = midway(&writes, 15);
    let got = restored_rows(
        &env,
        "pitr-compacted",
        json!({"backupRef": bid, "restore_time": rfc3339(t)}),
    )
    .await;
    let want: Vec<i32> = [1].into_iter().chain(100..=115).collect();
    assert_eq!(got, want, "restored to {} over files {files:?}", rfc3339(t));

    // Retention: once the first backup is deleted, the archived files before the oldest kept
    // backup go with it; the window starts at that backup, a time before it is a 400 naming
    // the window, and a restore after it still holds every write.
    let second = backed_up(&env, &id, "second").await;
    let later = paced_writes(&env, &view, 200..206, Duration::from_millis(150), true).await;
    window_reaching(&env, &id, later.last().unwrap().2).await;
    let (st, v) = env.call("DELETE", &format!("/backups/{bid}"), None).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let left = loop {
        let left: Vec<String> = env
            .stored()
            .await
            .iter()
            .filter_map(|k| k.strip_prefix(&format!("{id}/")))
            .filter_map(coffer_common::archive::parse_segment_key)
            .map(|(f, _, _)| f)
            .collect();
        if !left.contains(&files[0]) {
            break left;
        }
        assert!(
            Instant::now() < deadline,
            "archived file {} outlived every backup that needed it: {left:?}\n{}",
            files[0],
            env.controller_log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        left.contains(files.last().unwrap()),
        "the file being written went too: {left:?}"
    );
    let (_, v) = env.show(&id).await;
    let earliest = parse_ms(&v["instance"]["recovery"]["earliest"]).unwrap();
    let (_, b) = env.call("GET", &format!("/backups/{second}"), None).await;
    assert!(
        earliest * 1000 > t,
        "the window still starts before the kept backup: {v} {b}"
    );
    let (st, v) = restore(
        &env,
        "too-early",
        json!({"instance": id, "restore_time": rfc3339(t)}),
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert!(v.to_string().contains("recovery window is"), "{v}");
    let t2 = midway(&later, 3);
    let got = restored_rows(
        &env,
        "pitr-after-retention",
        json!({"instance": id, "restore_time": rfc3339(t2)}),
    )
    .await;
    let want: Vec<i32> = [1].into_iter().chain(100..130).chain(200..=203).collect();
    assert_eq!(got, want, "restored to {} after retention", rfc3339(t2));
}

/// With backups in NATS, an agent cut off from NATS cannot store its archive: it keeps the
/// changes, stores them when it is back (no hole: the archive is continuous from the same
/// time), and the controller's latest restorable time never runs ahead of what is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_cut_during_archiving_leaves_no_hole_and_claims_nothing_unstored() {
    let env = Env::start_with(Opts {
        backup_storage: coffer_tests::BackupStorage::Nats { max_bytes: None },
        backup_extra: "archive_ship_ms = 100\n",
        nats_proxy: true,
        respawn_agents: false,
        ..Default::default()
    })
    .await;
    let (id, view) = env.active_with_rows("pitr-cut", &[1]).await;
    let bid = backed_up(&env, &id, "base").await;
    let before = paced_writes(&env, &view, 100..105, Duration::from_millis(100), true).await;
    window_reaching(&env, &id, before.last().unwrap().2).await;
    let (_, v) = env.show(&id).await;
    let since = v["instance"]["recovery"]["archive"]["since"].clone();
    assert!(since.is_string(), "{v}");

    // Cut off: the database keeps taking writes; nothing of them is stored meanwhile, so the
    // controller's latest restorable time stays before the first of them.
    let proxy = env.proxy.as_ref().unwrap();
    proxy.cut(&id);
    let cut = paced_writes(&env, &view, 200..215, Duration::from_millis(100), false).await;
    let (_, v) = env.show(&id).await;
    let latest = parse_ms(&v["instance"]["recovery"]["latest"]).unwrap();
    assert!(
        latest * 1000 < cut[0].1,
        "the window claims {} while the agent could store nothing after {}: {v}",
        rfc3339(latest * 1000),
        rfc3339(cut[0].1)
    );
    proxy.heal(&id);

    // Back: the first latest restorable time it claims past the cut restores every write
    // acknowledged before it, and none begun after it.
    let (_, claimed) = window_reaching(&env, &id, cut[0].1).await;
    let got = restored_rows(
        &env,
        "pitr-cut-claimed",
        json!({"backupRef": bid, "restore_time": rfc3339(claimed * 1000)}),
    )
    .await;
    for (r, began, acked) in before.iter().chain(&cut) {
        if *acked <= claimed * 1000 {
            assert!(
                got.contains(r),
                "row {r} acknowledged before the claimed {} is missing: {got:?}",
                rfc3339(claimed * 1000)
            );
        }
        if *began > claimed * 1000 {
            assert!(
                !got.contains(r),
                "row {r} begun after {} was restored: {got:?}",
                rfc3339(claimed * 1000)
            );
        }
    }

    // The backlog is stored, the archive still continuous from the same time.
    window_reaching(&env, &id, cut.last().unwrap().2).await;
    let (_, v) = env.show(&id).await;
    let archive = &v["instance"]["recovery"]["archive"];
    assert_eq!(archive["since"], since, "a hole: {v}");
    assert!(archive["fault"].is_null(), "{v}");
    let t = midway(&cut, 9);
    let got = restored_rows(
        &env,
        "pitr-cut-restored",
        json!({"backupRef": bid, "restore_time": rfc3339(t)}),
    )
    .await;
    let want: Vec<i32> = [1].into_iter().chain(100..105).chain(200..=209).collect();
    assert_eq!(got, want, "restored to {} across the cut", rfc3339(t));
}

/// PostgreSQL: the WAL is archived from the first backup on, and a restore to a time holds
/// exactly the transactions committed before it (the server's own recovery replays the archived
/// WAL, cut at the time); to the latest restorable time, every acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_restores_to_a_time_from_its_archived_wal() {
    let env = Env::start().await;
    let pg = Store::Postgresql;
    let version = pg.register(&env);
    let (id, view) = scenario::create_active(&env, pg, &version, "pg-pitr").await;
    pg.write(&env, &view, 1).await;
    let bid = backed_up(&env, &id, "base").await;
    let writes =
        paced_store_writes(pg, &view, 100..120, Duration::from_millis(150), Some(&env)).await;
    let (_, latest) = window_reaching(&env, &id, writes.last().unwrap().2).await;
    // The server keeps the WAL the archive has not stored (a replication slot the archive
    // advances as it stores): the slot's position moves on as the writes are stored.
    let slot = || async {
        let mut c = Store::pg(&view).await.unwrap();
        let v: Option<(String, String)> = sqlx::query_as(
            "SELECT restart_lsn::text, pg_current_wal_flush_lsn()::text FROM pg_replication_slots WHERE slot_name = 'coffer_archive'",
        )
        .fetch_optional(&mut c)
        .await
        .unwrap();
        let _ = c.close().await;
        v
    };
    let lsn = |s: &str| {
        let (a, b) = s.split_once('/').unwrap();
        (u64::from_str_radix(a, 16).unwrap() << 32) | u64::from_str_radix(b, 16).unwrap()
    };
    let (first, _) = slot().await.expect("the archive's slot");
    pg.write(&env, &view, 120).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (now, _) = slot().await.expect("the archive's slot");
        if lsn(&now) > lsn(&first) {
            break;
        }
        assert!(Instant::now() < deadline, "the slot stays at {first}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let restored = |name: &'static str, point: Value| pg_restored(&env, &version, name, point);

    // Between two writes: exactly the rows acknowledged before the time.
    let (row, t) = (writes[10].0, midway(&writes, 10));
    let got = restored(
        "pg-pitr-110",
        json!({"backupRef": bid, "restore_time": rfc3339(t)}),
    )
    .await;
    let want: Vec<i32> = [1].into_iter().chain(100..=row).collect();
    assert_eq!(got, want, "restored to {}", rfc3339(t));

    // Just before the first write after the backup: the backup as it is.
    let got = restored(
        "pg-pitr-first",
        json!({"backupRef": bid, "restore_time": rfc3339(writes[0].1 - 1)}),
    )
    .await;
    assert_eq!(got, [1], "restored to just before the first write");

    // The latest restorable time, from the instance alone: every acknowledged write.
    let got = restored(
        "pg-pitr-latest",
        json!({"instance": id, "restore_time": rfc3339(latest * 1000)}),
    )
    .await;
    let want: Vec<i32> = [1].into_iter().chain(100..120).collect();
    assert_eq!(got, want);
    let want: Vec<i32> = want.into_iter().chain([120]).collect();

    // Incrementals: the WAL since the parent, restored as a chain.
    let incremental = |parent: String| {
        completed_backup(
            &env,
            json!({"backup": {"name": "inc", "instance": id, "parent_id": parent}}),
        )
    };
    let inc1 = incremental(bid.clone()).await;
    pg.write(&env, &view, 200).await;
    let inc2 = incremental(inc1.clone()).await;
    pg.write(&env, &view, 201).await;
    let got = restored("pg-inc1", json!({"backupRef": inc1})).await;
    assert_eq!(got, want, "the first incremental");
    let got = restored("pg-inc2", json!({"backupRef": inc2})).await;
    let want: Vec<i32> = want.into_iter().chain([200]).collect();
    assert_eq!(got, want, "the second incremental, on the first");
}

/// PostgreSQL with its agent killed mid-stream: the server keeps the WAL the archive has not
/// stored (the slot), the respawned agent stores it from where it stopped, the archive stays
/// continuous, and the latest restorable time restores every acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgresql_agent_killed_mid_archive_leaves_no_hole() {
    let env = Env::start().await;
    let pg = Store::Postgresql;
    let version = pg.register(&env);
    let (id, view) = scenario::create_active(&env, pg, &version, "pg-kill").await;
    pg.write(&env, &view, 1).await;
    let bid = backed_up(&env, &id, "base").await;
    let paced =
        |rows, watched| paced_store_writes(pg, &view, rows, Duration::from_millis(120), watched);
    let mut writes = paced(100..110, Some(&env)).await;
    window_reaching(&env, &id, writes.last().unwrap().2).await;
    let (_, v) = env.show(&id).await;
    let since = v["instance"]["recovery"]["archive"]["since"].clone();
    let pid = env.agent_pid(&id).expect("the agent runs");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL).unwrap();
    writes.extend(paced(110..120, None).await);
    let (_, latest) = window_reaching(&env, &id, writes.last().unwrap().2).await;
    let (_, v) = env.show(&id).await;
    let archive = &v["instance"]["recovery"]["archive"];
    assert_eq!(archive["since"], since, "a hole: {v}");
    assert!(archive["fault"].is_null(), "{v}");
    assert_ne!(env.agent_pid(&id), Some(pid), "the agent was respawned");

    let restored = |name: &'static str, point: Value| pg_restored(&env, &version, name, point);
    // Before the kill: exact. The latest: every acknowledged write.
    let got = restored(
        "pg-kill-105",
        json!({"backupRef": bid, "restore_time": rfc3339(midway(&writes, 5))}),
    )
    .await;
    assert_eq!(got, [1].into_iter().chain(100..=105).collect::<Vec<i32>>());
    let got = restored(
        "pg-kill-latest",
        json!({"backupRef": bid, "restore_time": rfc3339(latest * 1000)}),
    )
    .await;
    assert_eq!(got, [1].into_iter().chain(100..120).collect::<Vec<i32>>());
}
