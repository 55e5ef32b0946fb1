//! Replication against real MariaDB processes: replicas from snapshots (both strategies) under
//! writes, detach, failover that elects the most advanced replica, and a partitioned source
//! fencing itself (also against root). The switchover under a continuous writer runs for every
//! datastore in `datastores.rs`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use coffer_tests::{Env, Opts, StatusCode};
use serde_json::{json, Value};
use sqlx::{Connection, Row};

async fn rows(env: &Env, view: &Value) -> Vec<i32> {
    env.rows(view).await
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

async fn wait_rows(env: &Env, view: &Value, want: &[i32]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = rows(env, view).await;
        if got == want {
            return;
        }
        if Instant::now() > deadline {
            let id = view["id"].as_str().unwrap_or_default();
            panic!(
                "rows on {id}: {got:?}, want {want:?}\n{}",
                show(env, id).await["replication"]
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn create_replicas(env: &Env, source: &str, name: &str, count: u32) -> Vec<String> {
    let (st, v) = env
        .call(
            "POST",
            "/instances",
            Some(json!({"instance": {"name": name, "replica_of": source, "replica_count": count}})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let (_, src) = env.show(source).await;
    let ids: Vec<String> = src["instance"]["replicas"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| r["id"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(ids.len() as u32, count, "{src}");
    ids
}

/// A source with row 1 and one ACTIVE replica that has it: (source, its view, [replica], the
/// replica's view).
async fn source_with_a_replica(env: &Env) -> (String, Value, Vec<String>, Value) {
    let (src, sview) = env.active_with_rows("src", &[1]).await;
    let ids = create_replicas(env, &src, "rep", 1).await;
    let rview = env
        .wait_status(&ids[0], "ACTIVE", Duration::from_secs(120))
        .await;
    wait_rows(env, &rview, &[1]).await;
    (src, sview, ids, rview)
}

async fn show(env: &Env, id: &str) -> Value {
    env.show(id).await.1["instance"].clone()
}

/// Waits until the instance's task is done (no PROMOTE/EJECT/DETACH) and it is ACTIVE.
async fn settle(env: &Env, id: &str) -> Value {
    env.wait_status(id, "ACTIVE", Duration::from_secs(60)).await
}

async fn replica_creation(strategy: &'static str) {
    let env = Env::start_with(Opts {
        replication_strategy: strategy,
        ..Opts::default()
    })
    .await;
    let (src, sview) = env.active_with_rows("src", &[1, 2]).await;
    // A writer keeps writing while the replica is built.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, sview) = (stop.clone(), sview.clone());
        let env = &env;
        async move {
            let mut i = 100;
            while !stop.load(Ordering::Relaxed) {
                insert(env, &sview, i).await.unwrap();
                i += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            i
        }
    };
    let build = async {
        let ids = create_replicas(&env, &src, "rep", 1).await;
        let v = env
            .wait_status(&ids[0], "ACTIVE", Duration::from_secs(120))
            .await;
        stop.store(true, Ordering::Relaxed);
        (ids[0].clone(), v)
    };
    let (last, (rep, rview)) = tokio::join!(writer, build);
    assert!(last > 100, "writes happened during the build");
    for i in [1000, 1001] {
        insert(&env, &sview, i).await.unwrap();
    }
    let want = rows(&env, &sview).await;
    wait_rows(&env, &rview, &want).await;

    // Show: the source lists it, it names its source, replication state is visible.
    let s = show(&env, &src).await;
    assert_eq!(s["replicas"][0]["id"], rep.as_str(), "{s}");
    assert_eq!(s["replication"]["role"], "source", "{s}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let r = loop {
        // The replication view comes with the next heartbeat.
        let r = show(&env, &rep).await;
        let x = &r["replication"];
        if x["role"] == "replica" && x["io_running"] == true && x["sql_running"] == true {
            break r;
        }
        assert!(Instant::now() < deadline, "{r}\n{}", env.logs(&rep));
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(r["replica_of"]["id"], src.as_str(), "{r}");
    assert_eq!(r["replication"]["io_running"], true, "{r}");
    assert_eq!(r["replication"]["read_only"], true, "{r}");
    assert!(r["replication"]["lag_transactions"].is_u64(), "{r}");
    // The replication snapshot is gone once used.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, b) = env.call("GET", "/backups", None).await;
        if b["backups"].as_array().unwrap().is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "snapshot left: {b}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Read-only: tenants, root included, cannot write on the replica.
    assert!(insert(&env, &rview, 5000).await.is_err());
    let (st, root) = env
        .call("POST", &format!("/instances/{src}/root"), None)
        .await;
    assert_eq!(st, StatusCode::OK, "{root}");
    let pw = root["user"]["password"].as_str().unwrap().to_string();
    let root_opts = sqlx::mysql::MySqlConnectOptions::new()
        .host("127.0.0.1")
        .port(rview["port"].as_u64().unwrap() as u16)
        .username("root")
        .password(&pw);
    // Root's account and then its grants replicate; a session takes its global privileges
    // when it logs in, so each try is a new session. Until the grants are there, the refusal
    // is a missing privilege (or no account) rather than read-only.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut rc, e) = loop {
        if let Ok(mut c) = sqlx::ConnectOptions::connect(&root_opts).await {
            let e = sqlx::query("INSERT INTO shop.t VALUES (5001)")
                .execute(&mut c)
                .await
                .unwrap_err()
                .to_string();
            if !e.contains("denied") || Instant::now() > deadline {
                break (c, e);
            }
            c.close().await.unwrap();
        }
        assert!(Instant::now() < deadline, "root never reached the replica");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        e.contains("read-only") || e.contains("READ ONLY") || e.contains("read_only"),
        "{e}"
    );
    let e = sqlx::query("SET GLOBAL read_only = OFF")
        .execute(&mut rc)
        .await
        .unwrap_err();
    assert!(!e.to_string().is_empty());
    rc.close().await.unwrap();

    // A source with replicas cannot be deleted.
    let (st, v) = env.call("DELETE", &format!("/instances/{src}"), None).await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{v}");

    // Detach: writable and independent.
    let (st, v) = env
        .call(
            "PUT",
            &format!("/instances/{rep}"),
            Some(json!({"instance": {"replica_of": null}})),
        )
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    let r = settle(&env, &rep).await;
    assert!(r.get("replica_of").is_none(), "{r}");
    insert(&env, &rview, 7000).await.unwrap();
    insert(&env, &sview, 7001).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = rows(&env, &rview).await;
    assert!(got.contains(&7000) && !got.contains(&7001), "{got:?}");
    let s = show(&env, &src).await;
    assert!(s.get("replicas").is_none(), "{s}");
    let (st, _) = env
        .call(
            "PUT",
            &format!("/instances/{rep}"),
            Some(json!({"instance": {"replica_of": null}})),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "not a replica any more");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_by_gtid_follow_the_source_and_detach() {
    replica_creation("mariadb-gtid").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_by_binlog_position_follow_the_source_and_detach() {
    replica_creation("binlog").await;
}

async fn slave_status(c: &mut sqlx::MySqlConnection, col: &str) -> String {
    let r = sqlx::query("SHOW SLAVE STATUS")
        .fetch_one(&mut *c)
        .await
        .unwrap();
    r.try_get::<String, _>(col)
        .or_else(|_| {
            r.try_get::<Vec<u8>, _>(col)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
        })
        .unwrap()
}

async fn gtid(c: &mut sqlx::MySqlConnection, var: &str) -> String {
    sqlx::query_scalar(&format!("SELECT CAST(@@GLOBAL.{var} AS CHAR)"))
        .fetch_one(&mut *c)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eject_elects_the_replica_that_has_received_the_most() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let env = Env::start_with(Opts {
        respawn_agents: false,
        ..Opts::default()
    })
    .await;
    let (src, sview) = env.active_with_rows("src", &[1]).await;
    let ids = create_replicas(&env, &src, "rep", 2).await;
    let (a, b) = (ids[0].clone(), ids[1].clone());
    let aview = env
        .wait_status(&a, "ACTIVE", Duration::from_secs(120))
        .await;
    let bview = env
        .wait_status(&b, "ACTIVE", Duration::from_secs(120))
        .await;
    wait_rows(&env, &aview, &[1]).await;
    wait_rows(&env, &bview, &[1]).await;

    // A healthy source cannot be ejected.
    let eject_path = format!("/instances/{src}/action");
    let eject = || {
        env.call(
            "POST",
            &eject_path,
            Some(json!({"eject_replica_source": {}})),
        )
    };
    let (st, v) = eject().await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");

    // A is truly behind (receives nothing); B has received everything but applied little.
    let mut ac = env.admin_connect(&a).await;
    sqlx::query("STOP SLAVE IO_THREAD")
        .execute(&mut ac)
        .await
        .unwrap();
    let mut bc = env.admin_connect(&b).await;
    sqlx::query("STOP SLAVE SQL_THREAD")
        .execute(&mut bc)
        .await
        .unwrap();
    for i in 10..30 {
        insert(&env, &sview, i).await.unwrap();
    }
    let mut sc = env.admin_connect(&src).await;
    let source_pos = gtid(&mut sc, "gtid_binlog_pos").await;
    sc.close().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while slave_status(&mut bc, "Gtid_IO_Pos").await != source_pos {
        assert!(Instant::now() < deadline, "B never received {source_pos}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(rows(&env, &bview).await, vec![1], "B applied nothing yet");
    ac.close().await.unwrap();
    bc.close().await.unwrap();

    // The source's host dies: agent and database.
    let agent = env.agent_pid(&src).unwrap();
    let db = env.db_pid(&src).unwrap();
    kill(Pid::from_raw(agent), Signal::SIGKILL).unwrap();
    kill(Pid::from_raw(db), Signal::SIGKILL).unwrap();
    env.wait_status(&src, "ERROR", Duration::from_secs(30))
        .await;
    let (st, v) = eject().await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    let bnow = settle(&env, &b).await;
    settle(&env, &a).await;
    assert!(
        bnow.get("replica_of").is_none(),
        "B is the source: {bnow}\n{}",
        std::fs::read_to_string(env.dir.path().join("controller.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("replicas"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let anow = show(&env, &a).await;
    assert_eq!(anow["replica_of"]["id"], b.as_str(), "A follows B: {anow}");
    let old = show(&env, &src).await;
    assert!(
        old["fault"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("Ejected"),
        "{old}"
    );
    // B drained its relay log: it has everything the source shipped; A catches up from B.
    let want: Vec<i32> = std::iter::once(1).chain(10..30).collect();
    assert_eq!(rows(&env, &bview).await, want);
    wait_rows(&env, &aview, &want).await;
    insert(&env, &bview, 500).await.unwrap();
    let want: Vec<i32> = std::iter::once(1).chain(10..30).chain([500]).collect();
    wait_rows(&env, &aview, &want).await;
    let mut ac = env.admin_connect(&a).await;
    assert_eq!(slave_status(&mut ac, "Last_SQL_Error").await, "");
    assert_eq!(slave_status(&mut ac, "Slave_SQL_Running").await, "Yes");
    // No errant transactions on A: everything it has came from B.
    let a_pos = gtid(&mut ac, "gtid_current_pos").await;
    let mut bc = env.admin_connect(&b).await;
    let b_pos = gtid(&mut bc, "gtid_binlog_pos").await;
    assert_eq!(a_pos, b_pos);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_source_fences_itself_and_stays_fenced() {
    let env = Env::start_with(Opts {
        nats_proxy: true,
        respawn_agents: false,
        ..Opts::default()
    })
    .await;
    let proxy = env.proxy.as_ref().unwrap();
    let (src, sview, ids, rview) = source_with_a_replica(&env).await;
    let (st, root) = env
        .call("POST", &format!("/instances/{src}/root"), None)
        .await;
    assert_eq!(st, StatusCode::OK);
    let pw = root["user"]["password"].as_str().unwrap().to_string();
    let root_at = |view: &Value| {
        sqlx::mysql::MySqlConnectOptions::new()
            .host("127.0.0.1")
            .port(view["port"].as_u64().unwrap() as u16)
            .username("root")
            .password(&pw)
    };
    let mut rc = sqlx::ConnectOptions::connect(&root_at(&sview))
        .await
        .unwrap();
    sqlx::query("INSERT INTO shop.t VALUES (2)")
        .execute(&mut rc)
        .await
        .unwrap();

    // Cut the source's agent off from NATS: it fences before the controller declares it lost.
    proxy.cut(&src);
    let deadline = Instant::now() + Duration::from_secs(30);
    for n in 1000.. {
        let lost = show(&env, &src).await["status"] == "ERROR";
        let fenced = sqlx::query("INSERT INTO shop.t VALUES (?)")
            .bind(n)
            .execute(&mut rc)
            .await;
        if fenced.is_err() {
            break;
        }
        assert!(
            !lost,
            "the controller declared the source lost before it fenced itself"
        );
        assert!(Instant::now() < deadline, "the source never fenced itself");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The fence ends the open sessions right after it makes the server read-only: wait for
    // that (this session ends), so the next one opens on a server the fence has finished with
    // (one opened in between is ended too, as it should be).
    let ended = Instant::now() + Duration::from_secs(10);
    while sqlx::query("SELECT 1").execute(&mut rc).await.is_ok() && Instant::now() < ended {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A new root session cannot write either (read_only holds against root).
    let mut rc2 = sqlx::ConnectOptions::connect(&root_at(&sview))
        .await
        .unwrap();
    assert!(
        sqlx::query("INSERT INTO shop.t VALUES (4)")
            .execute(&mut rc2)
            .await
            .is_err(),
        "{}",
        env.logs(&src)
    );
    assert!(sqlx::query("SET GLOBAL read_only = OFF")
        .execute(&mut rc2)
        .await
        .is_err());
    rc2.close().await.unwrap();

    // After expiry: eject; exactly one writable source.
    env.wait_status(&src, "ERROR", Duration::from_secs(30))
        .await;
    let (st, v) = env.action(&src, json!({"eject_replica_source": {}})).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    let r = settle(&env, &ids[0]).await;
    assert!(r.get("replica_of").is_none(), "{r}");
    insert(&env, &rview, 10).await.unwrap();
    assert!(insert(&env, &sview, 11).await.is_err());

    // Healing the partition keeps the old source fenced.
    proxy.heal(&src);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let o = show(&env, &src).await;
        if o["replication"]["role"] == "fenced" && o["service_status_updated"].is_string() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "old source never reported back: {o}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(insert(&env, &sview, 12).await.is_err(), "still fenced");
    let o = show(&env, &src).await;
    assert_eq!(o["status"], "ERROR", "{o}");
    assert_eq!(o["replication"]["role"], "fenced", "{o}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automatic_failover_promotes_a_replica_when_on() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let env = Env::start_with(Opts {
        respawn_agents: false,
        auto_failover: true,
        ..Opts::default()
    })
    .await;
    let (src, _) = env.active_with_rows("src", &[1]).await;
    let ids = create_replicas(&env, &src, "rep", 1).await;
    let rview = env
        .wait_status(&ids[0], "ACTIVE", Duration::from_secs(120))
        .await;
    wait_rows(&env, &rview, &[1]).await;
    kill(Pid::from_raw(env.agent_pid(&src).unwrap()), Signal::SIGKILL).unwrap();
    kill(Pid::from_raw(env.db_pid(&src).unwrap()), Signal::SIGKILL).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = show(&env, &ids[0]).await;
        if r.get("replica_of").is_none() && r["status"] == "ACTIVE" {
            break;
        }
        assert!(Instant::now() < deadline, "no automatic failover: {r}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    insert(&env, &rview, 2).await.unwrap();
}

/// A switchover to a replica that cannot catch up (its applier is stopped) moves nothing: the
/// candidate stays a replica, the old source gets its writes back, and the fault says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchover_to_a_replica_that_cannot_catch_up_rolls_back() {
    let env = Env::start().await;
    let (src, sview, ids, rview) = source_with_a_replica(&env).await;
    let mut rc = env.admin_connect(&ids[0]).await;
    sqlx::query("STOP SLAVE SQL_THREAD")
        .execute(&mut rc)
        .await
        .unwrap();
    insert(&env, &sview, 2).await.unwrap();
    let (st, v) = env
        .call(
            "POST",
            &format!("/instances/{}/action", ids[0]),
            Some(json!({"promote_to_replica_source": {}})),
        )
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    let deadline = Instant::now() + Duration::from_secs(90);
    let sv = loop {
        let v = show(&env, &src).await;
        if v["status"] == "ACTIVE" && !v["fault"].is_null() {
            break v;
        }
        assert!(Instant::now() < deadline, "the switchover did not end: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let fault = sv["fault"]["message"].as_str().unwrap_or_default();
    assert!(fault.contains("was not reached"), "{fault}");
    // Nothing moved: the source takes writes again and the candidate still follows it.
    insert(&env, &sview, 3)
        .await
        .expect("the old source is writable again");
    let rv = show(&env, &ids[0]).await;
    assert_eq!(rv["replica_of"]["id"], src, "{rv}");
    sqlx::query("START SLAVE SQL_THREAD")
        .execute(&mut rc)
        .await
        .unwrap();
    wait_rows(&env, &rview, &[1, 2, 3]).await;
}
