//! Durable workflows against real MariaDB processes: the controller dies (aborts, as a SIGKILL
//! would leave it) at every step of a switchover under a continuous writer; started again, it
//! finishes the switchover, every member is released, and no acknowledged write is lost.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use coffer_tests::{Env, Opts, StatusCode};
use serde_json::{json, Value};
use sqlx::Connection;

async fn show(env: &Env, id: &str) -> Value {
    env.show(id).await.1["instance"].clone()
}

async fn insert(env: &Env, view: &Value, i: i32) -> Result<(), sqlx::Error> {
    let mut c = env.connect(view, "app", "s3cret-Pw", "shop").await;
    let r = sqlx::query("INSERT INTO t VALUES (?)")
        .bind(i)
        .execute(&mut c)
        .await
        .map(|_| ());
    let _ = c.close().await;
    r
}

/// Writes ascending rows to the server at `view`'s address until `stop`, a new connection per
/// row as a failing-over application would; returns the rows the server acknowledged.
fn spawn_writer(
    view: &Value,
    first: i32,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<i32>> {
    use sqlx::ConnectOptions;
    let opts = sqlx::mysql::MySqlConnectOptions::new()
        .host(view["ip"][0].as_str().unwrap())
        .port(view["port"].as_u64().unwrap() as u16)
        .username("app")
        .password("s3cret-Pw")
        .database("shop");
    tokio::spawn(async move {
        let mut acked = vec![];
        let mut i = first;
        while !stop.load(Ordering::Relaxed) {
            let ok = match opts.connect().await {
                Ok(mut c) => {
                    let r = sqlx::query("INSERT INTO t VALUES (?)")
                        .bind(i)
                        .execute(&mut c)
                        .await;
                    let _ = c.close().await;
                    r.is_ok()
                }
                Err(_) => false,
            };
            if ok {
                acked.push(i);
            } else {
                // Fenced: the application keeps trying.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            i += 1;
        }
        acked
    })
}

/// Sends a request while a failpoint is set: the operation's first step may abort the
/// controller before the answer is sent, and the client then sees the connection drop, as for
/// any controller killed mid-request. Returns the answer's status, if one came.
async fn send_racing_the_abort(
    env: &Env,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> Option<(StatusCode, String)> {
    let mut req = env
        .http
        .request(method, format!("{}{path}", env.base()))
        .header("X-Auth-Token", &env.token);
    if let Some(b) = body {
        req = req
            .header("Content-Type", "application/json")
            .body(b.to_string());
    }
    let r = req.send().await.ok()?;
    let st = r.status();
    Some((st, r.text().await.ok()?))
}

async fn post_racing_the_abort(env: &Env, path: &str, body: Value) -> Option<(StatusCode, String)> {
    send_racing_the_abort(env, reqwest::Method::POST, path, Some(body)).await
}

/// The ids of the replicas `src` lists (none when it lists none).
async fn replica_ids(env: &Env, src: &str) -> Vec<String> {
    show(env, src).await["replicas"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| r["id"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Two replicas of `src`, ACTIVE.
async fn two_active_replicas(env: &Env, src: &str) -> Vec<String> {
    let (st, v) = env
        .call(
            "POST",
            "/instances",
            Some(json!({"instance": {"name": "rep", "replica_of": src, "replica_count": 2}})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let replicas = replica_ids(env, src).await;
    assert!(
        !replicas.is_empty(),
        "no replica listed after the create: {v}"
    );
    for r in &replicas {
        env.wait_status(r, "ACTIVE", Duration::from_secs(180)).await;
    }
    replicas
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_switchover_survives_the_controller_dying_at_every_step() {
    let env = Env::start().await;
    let (src, _) = env.active_with_rows("src", &[1]).await;
    let replicas = two_active_replicas(&env, &src).await;
    let mut env = env;
    let mut members = vec![src.clone()];
    members.extend(replicas);
    let mut source = src;
    for (round, step) in ["fence", "promote", "repoint"].into_iter().enumerate() {
        let candidate = members.iter().find(|m| **m != source).unwrap().clone();
        env.stop_controller();
        env.start_controller_with(&[("COFFER_TEST_FAILPOINT", &format!("switchover:{step}"))]);
        for m in &members {
            env.wait_status(m, "ACTIVE", Duration::from_secs(60)).await;
        }
        let sview = show(&env, &source).await;
        let (writer, stop) = writing(&env, &sview, 1000 * (round as i32 + 1)).await;
        let path = format!("/instances/{candidate}/action");
        let body = json!({"promote_to_replica_source": {}});
        if let Some((st, text)) = post_racing_the_abort(&env, &path, body).await {
            assert_eq!(st, StatusCode::ACCEPTED, "{text}");
        }
        env.wait_controller_exit(Duration::from_secs(120)).await;
        // A restart slower than the lease: the old source, still a source in the store, fences
        // itself; the controller's next heartbeat reply lifts that fence while the switchover is
        // not finished (slow steps widen that window). The old source must stay read-only.
        wait_self_fenced(&env, &source, round < 2).await;
        env.start_controller_with(&[("COFFER_TEST_STEP_DELAY_MS", "700")]);
        // Started again, the switchover completes and releases every member.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let views = all(&env, &members).await;
            if switched_over(&views, &candidate) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "after the {step} failpoint the switchover did not complete: {views:?}\n{}",
                env.controller_log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        stop.store(true, Ordering::Relaxed);
        let acked = writer.await.unwrap();
        assert!(!acked.is_empty(), "the writer wrote nothing");
        let cview = show(&env, &candidate).await;
        // The new source takes writes (nothing left it fenced) and has every acknowledged one.
        insert(&env, &cview, 900_000 + round as i32)
            .await
            .expect("the new source takes writes");
        let on_new = env.rows(&cview).await;
        let lost: Vec<_> = acked.iter().filter(|i| !on_new.contains(i)).collect();
        assert!(
            lost.is_empty(),
            "after the {step} failpoint {} acknowledged writes were lost, from {:?} to {:?}",
            lost.len(),
            lost.first(),
            lost.last()
        );
        // The old source follows the new one and refuses tenant writes.
        let oview = show(&env, &source).await;
        assert!(
            insert(&env, &oview, 800_000 + round as i32).await.is_err(),
            "the old source took a write after the {step} failpoint"
        );
        source = candidate;
    }
}

/// Waits until the agent of `id` has fenced itself for want of a lease (`must`), or no longer
/// sees itself as a source (the watchdog then leaves it alone).
async fn wait_self_fenced(env: &Env, id: &str, must: bool) {
    let state = env.instance_dir(id).join("state");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if state.join("fenced").exists() {
            return;
        }
        let role = std::fs::read_to_string(state.join("role")).unwrap_or_default();
        if !must && role != "source" {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the source {id} (role {role:?}) did not fence itself without its lease\n{}",
            env.logs(id)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A writer on `view` from row `first` on, once it has written a few rows; stop it with the flag.
async fn writing(
    env: &Env,
    view: &Value,
    first: i32,
) -> (tokio::task::JoinHandle<Vec<i32>>, Arc<AtomicBool>) {
    let before = env.rows(view).await.len();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(view, first, stop.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    while env.rows(view).await.len() <= before + 3 {
        assert!(Instant::now() < deadline, "the writer wrote nothing");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (writer, stop)
}

/// Every member ACTIVE, `candidate` the source and the others following it.
fn switched_over(views: &[Value], candidate: &str) -> bool {
    views.iter().all(|v| v["status"] == "ACTIVE")
        && views.iter().all(|v| {
            (v["id"] == candidate && v.get("replica_of").is_none())
                || v["replica_of"]["id"] == candidate
        })
}

async fn all(env: &Env, ids: &[String]) -> Vec<Value> {
    let mut out = vec![];
    for id in ids {
        out.push(show(env, id).await);
    }
    out
}

/// A source with two replicas, its host killed, ejected with the controller dying at `step`.
async fn eject_survives_the_controller_dying_at(step: &str) {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let mut env = Env::start_with(coffer_tests::Opts {
        respawn_agents: false,
        ..coffer_tests::Opts::default()
    })
    .await;
    let (src, sview) = env.active_with_rows("src", &[1]).await;
    let replicas = two_active_replicas(&env, &src).await;
    for i in 2..20 {
        insert(&env, &sview, i).await.unwrap();
    }
    let acked = env.rows(&sview).await;
    for r in &replicas {
        let view = show(&env, r).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        while env.rows(&view).await != acked {
            assert!(Instant::now() < deadline, "replica {r} did not catch up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    env.stop_controller();
    env.start_controller_with(&[("COFFER_TEST_FAILPOINT", &format!("failover:{step}"))]);
    let agent = env.agent_pid(&src).expect("the source's agent");
    let db = env.db_pid(&src).expect("the source's server");
    kill(Pid::from_raw(agent), Signal::SIGKILL).unwrap();
    kill(Pid::from_raw(db), Signal::SIGKILL).unwrap();
    env.wait_status(&src, "ERROR", Duration::from_secs(30))
        .await;
    let path = format!("/instances/{src}/action");
    let body = json!({"eject_replica_source": {}});
    if let Some((st, text)) = post_racing_the_abort(&env, &path, body).await {
        assert_eq!(st, StatusCode::ACCEPTED, "{text}");
    }
    env.wait_controller_exit(Duration::from_secs(120)).await;
    env.start_controller();
    // Started again, the failover completes: one replica is the source, the other follows it,
    // both are released, and the old source is ejected.
    let deadline = Instant::now() + Duration::from_secs(120);
    let winner = loop {
        let views = all(&env, &replicas).await;
        let winner = views
            .iter()
            .find(|v| v.get("replica_of").is_none())
            .map(|v| v["id"].as_str().unwrap().to_string());
        if let Some(w) = &winner {
            if views.iter().all(|v| v["status"] == "ACTIVE")
                && views
                    .iter()
                    .all(|v| v["id"] == w.as_str() || v["replica_of"]["id"] == w.as_str())
            {
                break w.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "after the {step} failpoint the failover did not complete: {views:?}\n{}",
            env.controller_log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let old = show(&env, &src).await;
    assert!(
        old["fault"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("Ejected")),
        "{old}"
    );
    let wview = show(&env, &winner).await;
    assert_eq!(env.rows(&wview).await, acked, "the new source lost writes");
    insert(&env, &wview, 500)
        .await
        .expect("the new source takes writes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_eject_survives_the_controller_dying_after_the_drain() {
    eject_survives_the_controller_dying_at("drain").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_eject_survives_the_controller_dying_after_the_promotion() {
    eject_survives_the_controller_dying_at("promote").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_eject_survives_the_controller_dying_after_a_repoint() {
    eject_survives_the_controller_dying_at("repoint").await;
}

/// Replicas built while the controller dies at each step of the build: started again, it
/// finishes, the replicas follow the source with its data, and the snapshot is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_build_survives_the_controller_dying_at_every_step() {
    let mut env = Env::start().await;
    let (src, sview) = env.active_with_rows("src", &[1]).await;
    for (round, step) in [
        "snapshot",
        "wait_snapshot",
        "prepare",
        "wait_built",
        "cleanup",
    ]
    .into_iter()
    .enumerate()
    {
        insert(&env, &sview, 10 + round as i32).await.unwrap();
        let want = env.rows(&sview).await;
        env.stop_controller();
        env.start_controller_with(&[("COFFER_TEST_FAILPOINT", &format!("replica_build:{step}"))]);
        let before = replica_ids(&env, &src).await;
        // Without an answer (the controller died first) the replica is found by listing.
        let body = json!({"instance": {"name": format!("rep{round}"), "replica_of": src}});
        if let Some((st, text)) = post_racing_the_abort(&env, "/instances", body).await {
            assert_eq!(st, StatusCode::OK, "{text}");
        }
        env.wait_controller_exit(Duration::from_secs(120)).await;
        env.start_controller();
        let now = replica_ids(&env, &src).await;
        let new: Vec<&String> = now.iter().filter(|r| !before.contains(r)).collect();
        assert_eq!(
            new.len(),
            1,
            "one new replica: {now:?} (before: {before:?})"
        );
        let id = new[0].clone();
        let view = env
            .wait_status(&id, "ACTIVE", Duration::from_secs(120))
            .await;
        assert_eq!(view["replica_of"]["id"], src.as_str(), "{view}");
        let deadline = Instant::now() + Duration::from_secs(60);
        while env.rows(&view).await != want {
            assert!(
                Instant::now() < deadline,
                "after the {step} failpoint the replica lacks the source's rows"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The snapshot goes once the build is over.
        wait_build_over(&env, &format!("after the {step} failpoint")).await;
    }
}

/// Restarts the controller with a failpoint at `kind:step`.
fn arm(env: &mut Env, kind: &str, step: &str) {
    env.stop_controller();
    env.start_controller_with(&[("COFFER_TEST_FAILPOINT", &format!("{kind}:{step}"))]);
}

/// The instances the project lists, by name.
async fn names(env: &Env) -> Vec<String> {
    let (st, v) = env.call("GET", "/instances", None).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    v["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// A create the controller dies in the middle of (after reserving the row, after placing the
/// agent) was never answered: the next controller undoes it, leaving no row, no directory, no
/// Unix user and no quota held (with room for one instance, each next create fits).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_create_cut_short_by_the_controllers_end_is_undone() {
    let mut env = Env::start().await;
    // Room for one instance: each create below fits only if the one before was undone.
    let q = format!("{}/mgmt/quotas/{}", env.base(), env.project);
    let admin = env.admin_token.clone();
    let (st, v) = env
        .call_as(&admin, "PUT", &q, Some(json!({"quotas": {"instances": 1}})))
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let create = |name: &str| {
        json!({"instance": {"name": name, "flavorRef": "1", "volume": {"size": 1},
            "databases": [{"name": "shop"}],
            "users": [{"name": "app", "password": "s3cret-Pw", "databases": [{"name": "shop"}]}]}})
    };
    for step in ["reserved", "placed"] {
        arm(&mut env, "create", step);
        let answer =
            post_racing_the_abort(&env, "/instances", create(&format!("cut-{step}"))).await;
        assert!(answer.is_none(), "the create was answered: {answer:?}");
        env.wait_controller_exit(Duration::from_secs(60)).await;
        // What the dead controller left: its row, and after placing, a directory and a user.
        let left: Vec<String> = std::fs::read_dir(env.dir.path().join("instances"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .collect();
        assert_eq!(left.len(), usize::from(step == "placed"), "{left:?}");
        let users: Vec<_> = left
            .iter()
            .filter_map(|id| coffer_tests::instance_user(id))
            .collect();
        assert_eq!(users.len(), left.len(), "{left:?}");
        env.start_controller();
        assert!(
            names(&env).await.is_empty(),
            "after {step}: {:?}",
            names(&env).await
        );
        for id in &left {
            assert!(
                !env.instance_dir(id).exists(),
                "after {step}: {id}'s directory stayed"
            );
            assert!(
                coffer_tests::instance_user(id).is_none(),
                "after {step}: {id}'s Unix user stayed"
            );
        }
    }
    // Nothing is held: the one instance the quota allows is created and serves.
    let id = env.create("after").await;
    env.wait_status(&id, "ACTIVE", Duration::from_secs(120))
        .await;
    assert_eq!(names(&env).await, vec!["after".to_string()]);
}

/// A delete the controller dies in the middle of (after recording it, after removing the
/// instance's files) finishes once the controller is back: 404, no process, no user, no files.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_delete_survives_the_controller_dying_at_every_step() {
    let mut env = Env::start().await;
    for step in ["requested", "destroyed"] {
        let (id, _) = env.active_with_rows(&format!("del-{step}"), &[1]).await;
        let running = env.running_of(&id);
        arm(&mut env, "delete", step);
        let path = format!("/instances/{id}");
        if let Some((st, text)) =
            send_racing_the_abort(&env, reqwest::Method::DELETE, &path, None).await
        {
            assert_eq!(st, StatusCode::ACCEPTED, "{text}");
        }
        env.wait_controller_exit(Duration::from_secs(60)).await;
        env.start_controller();
        env.wait_gone(running).await;
    }
}

/// A backup the controller dies in the middle of (after recording it, when the agent reports
/// it done) completes once the controller is back, and restores.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_survives_the_controller_dying_at_every_step() {
    let mut env = Env::start().await;
    let (id, view) = env.active_with_rows("src", &[1, 2]).await;
    let mut last = String::new();
    for step in ["requested", "done"] {
        arm(&mut env, "backup", step);
        let name = format!("b-{step}");
        let body = json!({"backup": {"name": name, "instance": id}});
        if let Some((st, text)) = post_racing_the_abort(&env, "/backups", body).await {
            assert_eq!(st, StatusCode::ACCEPTED, "{text}");
        }
        env.wait_controller_exit(Duration::from_secs(60)).await;
        env.start_controller();
        let (_, list) = env.call("GET", "/backups", None).await;
        let bid = list["backups"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == name.as_str())
            .unwrap_or_else(|| panic!("after {step} the backup is not listed: {list}"))["id"]
            .as_str()
            .unwrap()
            .to_string();
        // The agent's report, unacknowledged by the dead controller, comes again (JetStream
        // redelivers it once its ack wait has run out).
        env.wait_backup(&bid, "COMPLETED").await;
        last = bid;
    }
    let body = json!({"instance": {"name": "restored", "flavorRef": "1", "volume": {"size": 1},
        "restorePoint": {"backupRef": last}}});
    let (st, v) = env.call("POST", "/instances", Some(body)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let rid = v["instance"]["id"].as_str().unwrap().to_string();
    let rview = env
        .wait_status(&rid, "ACTIVE", Duration::from_secs(120))
        .await;
    assert_eq!(env.rows(&rview).await, env.rows(&view).await);
}

/// Exactly one of two answers accepted, the other refused with 422; returns whether the first
/// won.
fn one_wins(what: &str, a: &(StatusCode, Value), b: &(StatusCode, Value)) -> bool {
    let ok = |s: StatusCode| s == StatusCode::ACCEPTED;
    match (ok(a.0), ok(b.0)) {
        (true, false) => assert_eq!(b.0, StatusCode::UNPROCESSABLE_ENTITY, "{what}: {}", b.1),
        (false, true) => assert_eq!(a.0, StatusCode::UNPROCESSABLE_ENTITY, "{what}: {}", a.1),
        _ => panic!("{what}: both or neither accepted: {a:?} / {b:?}"),
    }
    ok(a.0)
}

/// Two calls racing on one instance: one wins, the other gets 422, and the state is the
/// winner's alone. A backup against a restart (three rounds, sent together); a switchover
/// against a delete of the replica it promotes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_calls_on_one_instance_one_wins_the_other_gets_422() {
    let env = Env::start().await;
    let (src, sview) = env.active_with_rows("src", &[1]).await;
    for round in 0..3 {
        let body = json!({"backup": {"name": format!("race{round}"), "instance": src}});
        let (b, r) = tokio::join!(env.call("POST", "/backups", Some(body)), env.restart(&src));
        if one_wins("backup vs restart", &b, &r) {
            let bid = b.1["backup"]["id"].as_str().unwrap().to_string();
            env.wait_backup(&bid, "COMPLETED").await;
        } else {
            let (_, list) = env.call("GET", "/backups", None).await;
            assert!(
                !list.to_string().contains(&format!("race{round}")),
                "a refused backup left a record: {list}"
            );
        }
        env.wait_status(&src, "ACTIVE", Duration::from_secs(60))
            .await;
    }
    assert_eq!(env.rows(&sview).await, vec![1]);

    let replicas = two_active_replicas(&env, &src).await;
    let cand = &replicas[0];
    let (action, path) = (
        format!("/instances/{cand}/action"),
        format!("/instances/{cand}"),
    );
    let (p, d) = tokio::join!(
        env.call(
            "POST",
            &action,
            Some(json!({"promote_to_replica_source": {}}))
        ),
        env.call("DELETE", &path, None)
    );
    if one_wins("switchover vs delete", &p, &d) {
        // The candidate became the source and the others follow it.
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let v = show(&env, cand).await;
            if v["status"] == "ACTIVE" && v["replica_of"].is_null() {
                break;
            }
            assert!(Instant::now() < deadline, "{v}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for id in [&src, &replicas[1]] {
            let v = env.wait_status(id, "ACTIVE", Duration::from_secs(60)).await;
            assert_eq!(v["replica_of"]["id"], cand.as_str(), "{v}");
        }
    } else {
        // The replica goes; the source and the other replica are untouched.
        let deadline = Instant::now() + Duration::from_secs(60);
        while env.show(cand).await.0 != StatusCode::NOT_FOUND {
            assert!(Instant::now() < deadline, "the deleted replica stayed");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let v = env
            .wait_status(&src, "ACTIVE", Duration::from_secs(60))
            .await;
        assert!(v["replica_of"].is_null(), "{v}");
        let v = env
            .wait_status(&replicas[1], "ACTIVE", Duration::from_secs(60))
            .await;
        assert_eq!(v["replica_of"]["id"], src.as_str(), "{v}");
    }
}

/// Waits until no replication snapshot is left (the replica build has ended); `what` says
/// when, in the failure.
async fn wait_build_over(env: &Env, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, b) = env.call("GET", "/backups", None).await;
        let left = b["backups"].as_array().unwrap().iter().any(|x| {
            x["name"]
                .as_str()
                .unwrap_or("")
                .contains("Replication snapshot")
        });
        if !left {
            return;
        }
        assert!(Instant::now() < deadline, "{what} a snapshot stayed: {b}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A detach the controller dies in the middle of (the replica detached, nothing recorded yet)
/// finishes when the controller is back: the replica is standalone and takes writes, and the
/// source lists no replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_detach_survives_the_controller_dying_after_the_detach() {
    let mut env = Env::start().await;
    let (src, _) = env.active_with_rows("src", &[1]).await;
    let body = json!({"instance": {"name": "rep", "replica_of": src}});
    let (st, v) = env.call("POST", "/instances", Some(body)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let rep = v["instance"]["id"].as_str().unwrap().to_string();
    let rview = env
        .wait_status(&rep, "ACTIVE", Duration::from_secs(180))
        .await;
    wait_build_over(&env, "after the build").await;
    assert!(
        insert(&env, &rview, 50).await.is_err(),
        "a replica takes no writes"
    );

    arm(&mut env, "detach", "detach");
    let path = format!("/instances/{rep}");
    let body = json!({"instance": {"replica_of": null}});
    if let Some((st, text)) =
        send_racing_the_abort(&env, reqwest::Method::PUT, &path, Some(body)).await
    {
        assert_eq!(st, StatusCode::ACCEPTED, "{text}");
    }
    env.wait_controller_exit(Duration::from_secs(60)).await;
    env.start_controller();
    let v = env
        .wait_for(&rep, "detached and ACTIVE", Duration::from_secs(60), |i| {
            i["status"] == "ACTIVE" && i.get("replica_of").is_none()
        })
        .await;
    assert!(v.get("fault").is_none_or(|f| f.is_null()), "{v}");
    insert(&env, &rview, 51).await.unwrap();
    let s = show(&env, &src).await;
    assert!(s.get("replicas").is_none(), "{s}");
}

/// A VM build (the qemu provisioner, its VMs run by `coffer-fake-qemu`) the controller dies in
/// at every step: started again, the build resumes and the instance becomes ACTIVE with the
/// create's database and user, whose password waited sealed to the controller's key; a delete
/// then powers the VM off and leaves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_vm_build_survives_the_controller_dying_at_every_step() {
    let mut env = Env::start_with(Opts {
        fake_vm: true,
        ..Opts::default()
    })
    .await;
    for step in ["place", "boot", "enrol", "commit"] {
        arm(&mut env, "vm_build", step);
        let name = format!("vm-{step}");
        let body = json!({"instance": {"name": name, "flavorRef": "1", "volume": {"size": 1},
            "databases": [{"name": "shop"}],
            "users": [{"name": "app", "password": "s3cret-Pw", "databases": [{"name": "shop"}]}]}});
        // The create answers before the build's first step ends: it may or may not get out.
        if let Some((st, text)) = post_racing_the_abort(&env, "/instances", body).await {
            assert_eq!(st, StatusCode::OK, "{text}");
        }
        env.wait_controller_exit(Duration::from_secs(120)).await;
        env.start_controller();
        let (st, v) = env.call("GET", "/instances", None).await;
        assert_eq!(st, StatusCode::OK, "{v}");
        let id = v["instances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["name"] == name.as_str())
            .unwrap_or_else(|| panic!("after {step}: no instance {name}: {v}"))["id"]
            .as_str()
            .unwrap()
            .to_string();
        let view = env
            .wait_status(&id, "ACTIVE", Duration::from_secs(120))
            .await;
        // The user the create asked for, with its password, on its database.
        let c = env.connect(&view, "app", "s3cret-Pw", "shop").await;
        c.close().await.unwrap();
        // Delete powers the VM off: nothing runs from its directory, which goes.
        env.delete_and_wait_gone(&id).await;
        let dir = env.instance_dir(&id);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = coffer_tests::processes_mentioning(&dir.to_string_lossy());
            if left.is_empty() && !dir.exists() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "after {step}: the deleted VM left {left:?} (directory there: {})",
                dir.exists()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Two controllers on one PostgreSQL store: the one driving a switchover under a writer dies
/// right after fencing the source; the other adopts the workflow once its claim lapses and
/// completes it, losing no acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchover_moves_to_another_controller_when_its_controller_dies() {
    let mut env = Env::start_with(Opts {
        store_postgres: true,
        ..Opts::default()
    })
    .await;
    let (src, _) = env.active_with_rows("src", &[1]).await;
    let replicas = two_active_replicas(&env, &src).await;
    let peer = env.start_peer_controller("b", &[]);
    env.stop_controller();
    env.start_controller_with(&[("COFFER_TEST_FAILPOINT", "switchover:fence")]);
    let candidate = replicas[0].clone();
    let mut members = vec![src.clone()];
    members.extend(replicas);
    for m in &members {
        env.wait_status(m, "ACTIVE", Duration::from_secs(60)).await;
    }
    let sview = show(&env, &src).await;
    // How the candidate is reached (its address does not change; its controller will be gone).
    let cview = show(&env, &candidate).await;
    let (writer, stop) = writing(&env, &sview, 1000).await;
    let path = format!("/instances/{candidate}/action");
    let body = json!({"promote_to_replica_source": {}});
    if let Some((st, text)) = post_racing_the_abort(&env, &path, body).await {
        assert_eq!(st, StatusCode::ACCEPTED, "{text}");
    }
    env.wait_controller_exit(Duration::from_secs(120)).await;
    // Only the peer runs now: it takes the workflow over and completes it.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut views = vec![];
        for m in &members {
            let (_, v) = env
                .call_as(
                    &env.token.clone(),
                    "GET",
                    &format!("{}/instances/{m}", peer.base),
                    None,
                )
                .await;
            views.push(v["instance"].clone());
        }
        if switched_over(&views, &candidate) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the peer did not complete the switchover: {views:?}\n{}",
            peer.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        peer.log_text().contains("resuming workflow"),
        "the peer adopted it"
    );
    stop.store(true, Ordering::Relaxed);
    let acked = writer.await.unwrap();
    assert!(!acked.is_empty(), "the writer wrote nothing");
    insert(&env, &cview, 900_000)
        .await
        .expect("the new source takes writes");
    let on_new = env.rows(&cview).await;
    let lost: Vec<_> = acked.iter().filter(|i| !on_new.contains(i)).collect();
    assert!(lost.is_empty(), "acknowledged writes were lost: {lost:?}");
}
