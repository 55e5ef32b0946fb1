//! Faults: a killed agent, a killed database, a stopped agent, a controller restart and a NATS
//! restart lose no data and end in a truthful status.

use std::time::{Duration, Instant};

use coffer_tests::{pid_alive, Env, StatusCode};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use sqlx::{Connection, Row};

async fn uptime(c: &mut sqlx::MySqlConnection) -> u64 {
    let r = sqlx::query("SHOW GLOBAL STATUS LIKE 'Uptime'")
        .fetch_one(&mut *c)
        .await
        .unwrap();
    r.get::<String, _>(1).parse().unwrap()
}

async fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "{what} not seen within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_agent_leaves_the_database_running_and_is_replaced() {
    let env = Env::start().await;
    let id = env.create("adopt").await;
    let view = env
        .wait_status(&id, "ACTIVE", Duration::from_secs(120))
        .await;
    let mut c = env.connect(&view, "app", "s3cret-Pw", "shop").await;
    let up_before = uptime(&mut c).await;
    let db_pid = env.db_pid(&id).unwrap();
    let agent = env.agent_pid(&id).unwrap();

    kill(Pid::from_raw(agent), Signal::SIGKILL).unwrap();
    wait_until("agent death", Duration::from_secs(5), || !pid_alive(agent)).await;
    // The controller notices and starts a new agent, which adopts the running server.
    wait_until("a new agent", Duration::from_secs(30), || {
        env.agent_pid(&id)
            .map(|p| p != agent && pid_alive(p))
            .unwrap_or(false)
    })
    .await;
    // It has looked at the server: adopted it (the first agent started it, never adopted).
    let log = env.instance_dir(&id).join("agent.log");
    wait_until(
        "the new agent to adopt the server",
        Duration::from_secs(30),
        || {
            std::fs::read_to_string(&log)
                .is_ok_and(|l| l.contains("adopted running database server"))
        },
    )
    .await;
    env.wait_status(&id, "ACTIVE", Duration::from_secs(30))
        .await;
    assert_eq!(
        env.db_pid(&id),
        Some(db_pid),
        "the database was not restarted"
    );
    assert!(pid_alive(db_pid));
    // The connection opened before still works, and the server kept running all along.
    let up_after = uptime(&mut c).await;
    // Not reset (a restarted server counts from 0 again); it need not have grown a whole
    // second since, the test no longer sleeps.
    assert!(up_after >= up_before, "uptime {up_before} -> {up_after}");
    let log = std::fs::read_to_string(env.instance_dir(&id).join("agent.log")).unwrap();
    assert!(log.contains("adopted running database server"), "{log}");
    c.close().await.unwrap();
}

/// The database dies while a new agent is adopting it (the agent was replaced, the server
/// could not answer yet): it is started again like any crash, not left down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_dies_while_being_adopted_is_started_again() {
    let env = Env::start().await;
    let (id, _) = env.active_with_rows("adopt-dies", &[5]).await;
    let db = env.db_pid(&id).unwrap();
    let agent = env.agent_pid(&id).unwrap();
    // The server hangs (it cannot answer the new agent's probes) and the agent dies.
    kill(Pid::from_raw(db), Signal::SIGSTOP).unwrap();
    kill(Pid::from_raw(agent), Signal::SIGKILL).unwrap();
    let log = env.instance_dir(&id).join("agent.log");
    wait_until(
        "a new agent adopting the server",
        Duration::from_secs(60),
        || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("adopted running database server")
        },
    )
    .await;
    // While it adopts, the server dies.
    kill(Pid::from_raw(db), Signal::SIGKILL).unwrap();
    wait_until("a new database server", Duration::from_secs(60), || {
        env.db_pid(&id).is_some_and(|p| p != db && pid_alive(p))
    })
    .await;
    let view = env
        .wait_status(&id, "ACTIVE", Duration::from_secs(60))
        .await;
    assert_eq!(env.rows(&view).await, vec![5]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_database_is_reported_and_restarted() {
    let env = Env::start().await;
    let (id, _) = env.active_with_rows("crashy", &[7]).await;
    let db_pid = env.db_pid(&id).unwrap();

    kill(Pid::from_raw(db_pid), Signal::SIGKILL).unwrap();
    let down = env
        .wait_for(&id, "status leaving ACTIVE", Duration::from_secs(10), |v| {
            v["status"] != "ACTIVE"
        })
        .await;
    assert_eq!(down["status"], "SHUTDOWN", "{down}");
    assert_eq!(down["operating_status"], "SHUTDOWN");
    assert!(
        down["fault"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("killed by signal SIGKILL"),
        "{down}"
    );
    let view = env
        .wait_status(&id, "ACTIVE", Duration::from_secs(60))
        .await;
    let new_pid = env.db_pid(&id).unwrap();
    assert_ne!(new_pid, db_pid);
    let mut c = env.connect(&view, "app", "s3cret-Pw", "shop").await;
    let v: i32 = sqlx::query("SELECT i FROM t")
        .fetch_one(&mut c)
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_agent_turns_error_after_expiry_and_recovers() {
    let env = Env::start().await; // expiry 4 s, heartbeat 0.5 s
    let id = env.create("quiet").await;
    env.wait_status(&id, "ACTIVE", Duration::from_secs(120))
        .await;
    let agent = env.agent_pid(&id).unwrap();
    kill(Pid::from_raw(agent), Signal::SIGSTOP).unwrap();
    let t0 = Instant::now();
    let err = env.wait_status(&id, "ERROR", Duration::from_secs(15)).await;
    assert!(
        t0.elapsed() >= Duration::from_secs(2),
        "ERROR came too early: {:?}",
        t0.elapsed()
    );
    assert_eq!(err["operating_status"], "ERROR");
    assert!(
        err["fault"]["message"]
            .as_str()
            .unwrap()
            .contains("has not reported"),
        "{err}"
    );
    // Restart is refused while the agent is lost.
    let (st, body) = env.restart(&id).await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    kill(Pid::from_raw(agent), Signal::SIGCONT).unwrap();
    env.wait_status(&id, "ACTIVE", Duration::from_secs(15))
        .await;
    assert_eq!(
        env.agent_pid(&id),
        Some(agent),
        "same agent, not a replacement"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_restart_loses_nothing() {
    let mut env = Env::start().await;
    let id = env.create("durable").await;
    let view = env
        .wait_status(&id, "ACTIVE", Duration::from_secs(120))
        .await;
    let mut c = env.connect(&view, "app", "s3cret-Pw", "shop").await;
    sqlx::query("CREATE TABLE t (i INT PRIMARY KEY)")
        .execute(&mut c)
        .await
        .unwrap();
    sqlx::query("INSERT INTO t VALUES (1)")
        .execute(&mut c)
        .await
        .unwrap();
    let agent = env.agent_pid(&id).unwrap();
    let db = env.db_pid(&id).unwrap();

    env.stop_controller();
    assert!(
        pid_alive(agent) && pid_alive(db),
        "agent and database survive the controller"
    );
    sqlx::query("INSERT INTO t VALUES (2)")
        .execute(&mut c)
        .await
        .unwrap();
    env.start_controller();
    let view = env
        .wait_status(&id, "ACTIVE", Duration::from_secs(30))
        .await;
    assert_eq!(
        env.agent_pid(&id),
        Some(agent),
        "the running agent was adopted"
    );
    assert_eq!(env.db_pid(&id), Some(db));
    assert_eq!(view["name"], "durable");
    let n: i64 = sqlx::query("SELECT COUNT(*) FROM t")
        .fetch_one(&mut c)
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
    // And it still acts: a restart goes through.
    let (st, _) = env.restart(&id).await;
    assert_eq!(st, StatusCode::ACCEPTED);
    env.wait_for(&id, "REBOOT then ACTIVE", Duration::from_secs(60), |v| {
        v["status"] == "ACTIVE" && env.db_pid(&id) != Some(db)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intent_sent_while_nats_is_down_runs_exactly_once() {
    let mut env = Env::start_with(coffer_tests::Opts {
        heartbeat_expiry_s: 30,
        ..Default::default()
    })
    .await;
    let id = env.create("outbox").await;
    env.wait_status(&id, "ACTIVE", Duration::from_secs(120))
        .await;
    let db = env.db_pid(&id).unwrap();
    let spawned = |env: &Env| {
        std::fs::read_to_string(env.instance_dir(&id).join("agent.log"))
            .unwrap_or_default()
            .matches("database server spawned")
            .count()
    };
    assert_eq!(spawned(&env), 1);

    env.nats.stop();
    let (st, body) = env.restart(&id).await;
    assert_eq!(
        st,
        StatusCode::ACCEPTED,
        "the API accepts while NATS is down: {body}"
    );
    assert_eq!(env.show(&id).await.1["instance"]["status"], "REBOOT");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(pid_alive(db), "nothing happened while NATS was down");
    env.nats.resume();
    env.wait_for(&id, "restart done", Duration::from_secs(90), |v| {
        v["status"] == "ACTIVE" && env.db_pid(&id) != Some(db)
    })
    .await;
    // Give a duplicate every chance to show up.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(env.agent_intents(&id, "restart"), 1);
    assert_eq!(spawned(&env), 2, "prepare + exactly one restart");
    env.wait_status(&id, "ACTIVE", Duration::from_secs(10))
        .await;
}
