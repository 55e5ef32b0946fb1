//! Several controllers on one PostgreSQL store: each serves the API, creates made through any of
//! them are built once, a quota holds across them, and when one dies the others carry on: they
//! take over publishing and the timers, and adopt the workflows it drove. Last, three
//! controllers on a three-node NATS cluster lose one controller and one NATS node while
//! operations run, and every operation completes exactly once.

use std::time::{Duration, Instant};

use coffer_tests::{Env, Opts, PeerController, StatusCode};
use serde_json::{json, Value};

fn opts() -> Opts {
    Opts {
        store_postgres: true,
        ..Opts::default()
    }
}

async fn call(
    env: &Env,
    base: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    env.call_as(&env.token.clone(), method, &format!("{base}{path}"), body)
        .await
}

async fn create(env: &Env, base: &str, name: &str) -> (StatusCode, Value) {
    call(
        env,
        base,
        "POST",
        "/instances",
        Some(json!({"instance": {"name": name, "flavorRef": "1", "volume": {"size": 1}}})),
    )
    .await
}

/// Waits until `id` shows `status` through the API at `base`.
async fn wait_status(env: &Env, base: &str, id: &str, status: &str, peer: &PeerController) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (st, v) = call(env, base, "GET", &format!("/instances/{id}"), None).await;
        if st == StatusCode::OK && v["instance"]["status"] == status {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{id} not {status} through {base}: {st} {v}\n--- controller ---\n{}\n--- peer ---\n{}",
            env.controller_log(),
            peer.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controllers_share_the_work_and_the_others_carry_on_when_one_dies() {
    let mut env = Env::start_with(opts()).await;
    let peer = env.start_peer_controller("b", &[]);
    let third = env.start_peer_controller("c", &[]);
    let (a, b, c) = (env.base(), peer.base.clone(), third.base.clone());

    // Creates through either controller are built, and each shows what the other made.
    let (st, v) = create(&env, &a, "via-a").await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let x = v["instance"]["id"].as_str().unwrap().to_string();
    let (st, v) = create(&env, &b, "via-b").await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let y = v["instance"]["id"].as_str().unwrap().to_string();
    wait_status(&env, &b, &x, "ACTIVE", &peer).await;
    wait_status(&env, &a, &y, "ACTIVE", &peer).await;

    // A quota holds when eight creates are spread over three controllers.
    let q = format!("{a}/mgmt/quotas/{}", env.project);
    let (st, v) = env
        .call_as(
            &env.admin_token.clone(),
            "PUT",
            &q,
            Some(json!({"quotas": {"instances": 4}})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let tries = (0..8).map(|i| {
        let base = [&a, &b, &c][i % 3].clone();
        let env = &env;
        async move { create(env, &base, &format!("q{i}")).await }
    });
    let results = futures::future::join_all(tries).await;
    let made: Vec<String> = results
        .iter()
        .filter(|(st, _)| *st == StatusCode::OK)
        .map(|(_, v)| v["instance"]["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        made.len(),
        2,
        "two more fit in the quota of four: {results:?}"
    );
    assert!(
        results
            .iter()
            .all(|(st, _)| *st == StatusCode::OK || *st == StatusCode::PAYLOAD_TOO_LARGE),
        "{results:?}"
    );
    for id in &made {
        wait_status(&env, &b, id, "ACTIVE", &peer).await;
    }
    let (_, list) = call(&env, &b, "GET", "/instances", None).await;
    assert_eq!(list["instances"].as_array().unwrap().len(), 4, "{list}");

    // The first controller (the leader) dies: the other answers at once, takes over
    // publishing intents and the timers, and a delete through it completes.
    env.kill_controller();
    let (st, _) = call(&env, &b, "GET", "/instances", None).await;
    assert_eq!(st, StatusCode::OK);
    let (st, v) = call(&env, &b, "DELETE", &format!("/instances/{x}"), None).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (st, _) = call(&env, &b, "GET", &format!("/instances/{x}"), None).await;
        if st == StatusCode::NOT_FOUND {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the delete never finished after the leader died\n{}",
            peer.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Either survivor may win the lease (whichever renews first after it lapsed).
    let leads = |log: String| log.contains("this controller leads");
    assert!(
        leads(peer.log_text()) || leads(third.log_text()),
        "a survivor took the lead"
    );
}

/// Polls `path` on every base until `stop`; returns every answer that was not 200.
fn keep_listing(
    env: &Env,
    bases: Vec<String>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<Vec<String>> {
    let http = env.http.clone();
    let token = env.token.clone();
    tokio::spawn(async move {
        let mut bad = vec![];
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            for base in &bases {
                let r = http
                    .get(format!("{base}/instances"))
                    .header("X-Auth-Token", &token)
                    .timeout(Duration::from_secs(5))
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status() == StatusCode::OK => {}
                    Ok(r) => bad.push(format!("{base}: {}", r.status())),
                    Err(e) => bad.push(format!("{base}: {e}")),
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bad
    })
}

/// Waits until `check` holds for what `GET path` through `base` answers.
async fn wait_for(
    env: &Env,
    base: &str,
    path: &str,
    what: &str,
    logs: &dyn Fn(&Env) -> String,
    check: impl Fn(StatusCode, &Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let (st, v) = call(env, base, "GET", path, None).await;
        if check(st, &v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {path} answers {st} {v}\n{}",
            logs(env)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_controllers_and_a_nats_cluster_ride_over_losing_one_of_each() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let mut env = Env::start_with(Opts {
        store_postgres: true,
        nats_cluster: true,
        backup_storage: coffer_tests::BackupStorage::Nats { max_bytes: None },
        ..Opts::default()
    })
    .await;
    let b = env.start_peer_controller("b", &[]);
    let c = env.start_peer_controller("c", &[]);
    let (bb, cb) = (b.base.clone(), c.base.clone());
    let a_log = env.dir.path().join("controller.log");
    let (b_log, c_log) = (b.log.clone(), c.log.clone());
    let logs = |env: &Env| {
        let tail = |p: &std::path::Path| {
            let t = std::fs::read_to_string(p).unwrap_or_default();
            let lines: Vec<&str> = t.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        };
        format!(
            "--- a ---\n{}\n--- b ---\n{}\n--- c ---\n{}\n--- agents ---\n{}",
            tail(&a_log),
            tail(&b_log),
            tail(&c_log),
            env.failure_logs()
        )
    };

    // Before the fault: a source with rows and its replica, and an instance to delete.
    let (src, _) = env.active_with_rows("src", &[1, 2, 3]).await;
    let (st, v) = env
        .call(
            "POST",
            "/instances",
            Some(json!({"instance": {"name": "rep", "replica_of": src}})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let rep = v["instance"]["id"].as_str().unwrap().to_string();
    env.wait_status(&rep, "ACTIVE", Duration::from_secs(120))
        .await;
    let doomed = env.create("doomed").await;
    env.wait_status(&doomed, "ACTIVE", Duration::from_secs(120))
        .await;
    let backups_before = env.agent_intents(&src, "backup");

    // While creates, a backup, a switchover and a delete run through the other two
    // controllers, the first controller (the leader) and the first NATS node die.
    let stop = Arc::new(AtomicBool::new(false));
    let lister = keep_listing(&env, vec![bb.clone(), cb.clone()], stop.clone());
    let mut made = vec![];
    for (base, name) in [(&bb, "during-b"), (&cb, "during-c")] {
        let (st, v) = create(&env, base, name).await;
        assert_eq!(st, StatusCode::OK, "{v}");
        made.push(v["instance"]["id"].as_str().unwrap().to_string());
    }
    let body = json!({"backup": {"name": "during", "instance": src}});
    let (st, v) = call(&env, &cb, "POST", "/backups", Some(body)).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    let backup = v["backup"]["id"].as_str().unwrap().to_string();
    let path = format!("/instances/{rep}/action");
    let body = json!({"promote_to_replica_source": {}});
    let (st, v) = call(&env, &bb, "POST", &path, Some(body)).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    let (st, v) = call(&env, &cb, "DELETE", &format!("/instances/{doomed}"), None).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    env.kill_controller();
    env.nats.kill();

    // Every operation completes, through the survivors.
    for id in &made {
        wait_for(
            &env,
            &bb,
            &format!("/instances/{id}"),
            "create",
            &logs,
            |st, v| st == StatusCode::OK && v["instance"]["status"] == "ACTIVE",
        )
        .await;
    }
    let v = wait_for(
        &env,
        &cb,
        &format!("/backups/{backup}"),
        "backup",
        &logs,
        |st, v| {
            st == StatusCode::OK
                && ["COMPLETED", "FAILED"].contains(&v["backup"]["status"].as_str().unwrap_or(""))
        },
    )
    .await;
    assert_eq!(v["backup"]["status"], "COMPLETED", "{v}\n{}", logs(&env));
    let view = wait_for(
        &env,
        &bb,
        &format!("/instances/{rep}"),
        "switchover",
        &logs,
        |st, v| {
            st == StatusCode::OK
                && v["instance"]["status"] == "ACTIVE"
                && v["instance"].get("replica_of").is_none()
                && v["instance"]["replicas"][0]["id"] == src
        },
    )
    .await;
    wait_for(
        &env,
        &cb,
        &format!("/instances/{doomed}"),
        "delete",
        &logs,
        |st, _| st == StatusCode::NOT_FOUND,
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let bad = lister.await.unwrap();
    assert!(bad.is_empty(), "the API did not answer throughout: {bad:?}");

    // Exactly once: one instance per create, one prepare per agent, one backup intent, no
    // workflow left behind; the new source holds the old one's rows.
    let (_, list) = call(&env, &bb, "GET", "/instances", None).await;
    let names: Vec<&str> = list["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    for name in ["during-b", "during-c"] {
        let n = names.iter().filter(|n| **n == name).count();
        assert_eq!(n, 1, "{name} made {n} times: {list}");
    }
    for id in &made {
        assert_eq!(
            env.agent_intents(id, "prepare"),
            1,
            "{id} prepared more than once"
        );
    }
    assert_eq!(
        env.agent_intents(&src, "backup"),
        backups_before + 1,
        "the backup ran more than once, or not at all"
    );
    let open = env
        .store_text(
            "SELECT CAST(COUNT(*) AS TEXT) FROM workflows WHERE done = FALSE AND id <> $1",
            "",
        )
        .await;
    assert_eq!(open, "0", "workflows left unfinished\n{}", logs(&env));
    assert_eq!(env.rows(&view["instance"]).await, vec![1, 2, 3]);
}

/// The fleet simulator against one controller: its agents are ACTIVE through the API, answer
/// the controller's calls, and those killed are seen lost while the rest stay ACTIVE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simulated_fleet_is_seen_alive_answers_calls_and_its_lost_agents_are_seen() {
    let env = Env::start().await;
    let seeded = coffer_tests::sim::seed(&env, 150).await.unwrap();
    let fleet = coffer_tests::sim::start(&env, seeded, Duration::from_millis(500), 150)
        .await
        .unwrap();
    let statuses = |list: &Value| -> Vec<(String, String)> {
        list["instances"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                let id = i["id"].as_str().unwrap().to_string();
                (id, i["status"].as_str().unwrap().to_string())
            })
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (st, list) = env.call("GET", "/instances?limit=1000", None).await;
        assert_eq!(st, StatusCode::OK, "{list}");
        let s = statuses(&list);
        if s.len() == 150 && s.iter().all(|(_, st)| st == "ACTIVE") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the simulated fleet is not ACTIVE: {s:?}\n{}",
            env.controller_log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // ACTIVE comes from the seeded rows and fresh heartbeats; what the agents say they can do
    // is recorded after their heartbeats are answered.
    let deadline = Instant::now() + Duration::from_secs(30);
    let sql = "SELECT CAST(COUNT(*) AS TEXT) FROM instances WHERE capabilities <> $1";
    while env.store_text(sql, "").await != "150" {
        assert!(Instant::now() < deadline, "capabilities not recorded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A call through the API reaches a simulated agent and its answer comes back.
    let id = &fleet.ids[7];
    let (st, v) = env
        .call("GET", &format!("/instances/{id}/databases"), None)
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert!(fleet.stats.calls.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    // Intents reach simulated agents through their own consumers and their results come back:
    // a restart ends ACTIVE, a delete removes the instance.
    let (a, b) = (&fleet.ids[140], &fleet.ids[141]);
    let (st, v) = env.restart(a).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    env.delete_and_wait_gone(b).await;
    env.wait_for(
        a,
        "ACTIVE after the restart",
        Duration::from_secs(30),
        |i| i["status"] == "ACTIVE",
    )
    .await;
    let done = env
        .store_text(
            "SELECT state FROM intents WHERE instance_id = $1 AND kind = 'restart'",
            a,
        )
        .await;
    assert_eq!(done, "done");
    assert_eq!(
        fleet
            .stats
            .intents
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    // Twenty hosts die at once: they are seen lost, the others stay ACTIVE.
    let dead = fleet.kill(0..20);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, list) = env.call("GET", "/instances?limit=1000", None).await;
        let s = statuses(&list);
        let lost: Vec<_> = s.iter().filter(|(_, st)| st != "ACTIVE").collect();
        if lost.len() == 20 {
            assert!(lost
                .iter()
                .all(|(id, st)| dead.contains(id) && st == "ERROR"));
            break;
        }
        assert!(
            lost.len() < 20 || lost.iter().all(|(id, _)| dead.contains(id)),
            "a live agent was seen lost: {lost:?}"
        );
        assert!(
            Instant::now() < deadline,
            "the killed agents were not seen lost: {lost:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (p50, p99, n) = fleet.stats.take_percentiles();
    assert!(n > 150, "few heartbeats answered: {n}");
    println!("heartbeat replies: p50 {p50:.1} ms, p99 {p99:.1} ms over {n}");
}

/// `cargo xtask bench scale` in smoke mode (a tiny fleet, one short run per store): a change
/// that breaks the bench fails here.
#[test]
fn the_scale_bench_runs_in_smoke_mode() {
    let out = std::process::Command::new(coffer_tests::bin("coffer-sim"))
        .args(["bench", "--smoke"])
        .env("COFFER_BIN_DIR", coffer_tests::bin_dir())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for setup in ["sqlite x1", "postgres x2"] {
        assert!(
            text.lines()
                .any(|l| l.trim_start().starts_with("40") && l.contains(setup)),
            "no figures for {setup}:\n{text}"
        );
    }
}

/// The intent stream holds one durable consumer per agent: a stream left by an earlier
/// controller with nats-server's default limit (1,000 consumers, which would leave the 1,001st
/// agent without intents) is raised when a controller starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_intent_stream_takes_a_consumer_per_agent_beyond_the_servers_default() {
    let mut env = Env::start().await;
    let js = async_nats::jetstream::new(env.nats_client().await);
    let limit = |js: async_nats::jetstream::Context| async move {
        let mut s = js
            .get_stream(coffer_proto::subjects::INTENT_STREAM)
            .await
            .unwrap();
        s.info().await.unwrap().config.max_consumers
    };
    assert!(limit(js.clone()).await >= 100_000);
    env.stop_controller();
    let mut cfg = js
        .get_stream(coffer_proto::subjects::INTENT_STREAM)
        .await
        .unwrap()
        .cached_info()
        .config
        .clone();
    cfg.max_consumers = 1000;
    js.update_stream(cfg).await.unwrap();
    assert_eq!(limit(js.clone()).await, 1000);
    env.start_controller();
    let deadline = Instant::now() + Duration::from_secs(30);
    while limit(js.clone()).await < 100_000 {
        assert!(Instant::now() < deadline, "the limit was not raised");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
