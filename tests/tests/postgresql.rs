//! PostgreSQL through the same API and agent traits as MariaDB: create with a database and a
//! user → ACTIVE → the user logs in with its password (a SCRAM verifier made by the agent) and
//! writes; databases and users list; datastore-specific bad names are refused with 400 and change
//! nothing; root enable gives the master user (not a superuser); the slow_query guest log holds only slow statements;
//! delete stops the server. Backups, configuration and
//! the other scenarios shared with MariaDB and Redis are in `datastores.rs`.

use std::time::Duration;

use coffer_tests::{register_postgresql, Env, StatusCode};
use serde_json::{json, Value};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};

async fn connect(view: &Value, user: &str, password: &str, db: &str) -> sqlx::PgConnection {
    let host = view["ip"][0].as_str().expect("an ip");
    let port = view["port"].as_u64().expect("a port") as u16;
    PgConnectOptions::new()
        .host(host)
        .port(port)
        .username(user)
        .password(password)
        .database(db)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connecting to {host}:{port} as {user}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_instance_serves_its_users_and_databases() {
    let env = Env::start().await;
    let version = register_postgresql(env.config_path());
    let (st, v) = env
        .call(
            "POST",
            "/instances",
            Some(json!({"instance": {
                "name": "pg-1", "flavorRef": "1", "volume": {"size": 1},
                "datastore": {"type": "postgresql", "version": version},
                "databases": [{"name": "shop"}],
                "users": [{"name": "app", "password": "s3cret-Pw'\"", "databases": [{"name": "shop"}]}],
            }})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let id = v["instance"]["id"].as_str().unwrap().to_string();
    let view = env
        .wait_status(&id, "ACTIVE", Duration::from_secs(120))
        .await;
    assert_eq!(view["datastore"]["type"], "postgresql");

    // The user logs in to its database and can create and write there.
    let mut c = connect(&view, "app", "s3cret-Pw'\"", "shop").await;
    sqlx::query("CREATE TABLE t (i INT PRIMARY KEY)")
        .execute(&mut c)
        .await
        .unwrap();
    sqlx::query("INSERT INTO t VALUES (1), (2)")
        .execute(&mut c)
        .await
        .unwrap();
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM t")
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(n, 2);
    let su: String = sqlx::query_scalar("SELECT current_setting('is_superuser')")
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(su, "off");
    c.close().await.unwrap();
    // A wrong password is refused.
    let host = view["ip"][0].as_str().unwrap();
    let port = view["port"].as_u64().unwrap() as u16;
    assert!(PgConnectOptions::new()
        .host(host)
        .port(port)
        .username("app")
        .password("wrong")
        .database("shop")
        .connect()
        .await
        .is_err());

    // A new agent adopts the running server (same pid), as for MariaDB.
    let pid = env.db_pid(&id).expect("the server's pid");
    env.replace_agent(&id).await;
    env.wait_status(&id, "ACTIVE", Duration::from_secs(60))
        .await;
    assert_eq!(env.db_pid(&id), Some(pid));
    assert!(coffer_tests::pid_alive(pid));
    // The status may still be the old agent's: wait until the new one answers calls.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (st, _) = env
            .call("GET", &format!("/instances/{id}/databases"), None)
            .await;
        if st == StatusCode::OK || std::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Databases and users through the same API.
    let (st, v) = env
        .call(
            "POST",
            &format!("/instances/{id}/databases"),
            Some(json!({"databases": [{"name": "Sales-2026"}]})),
        )
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    let (_, v) = env
        .call("GET", &format!("/instances/{id}/databases"), None)
        .await;
    let names: Vec<&str> = v["databases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["Sales-2026", "shop"], "{v}");
    let (_, v) = env
        .call("GET", &format!("/instances/{id}/users"), None)
        .await;
    let users = v["users"].as_array().unwrap();
    assert_eq!(users.len(), 1, "{v}");
    assert_eq!(users[0]["name"], "app");
    assert_eq!(users[0]["databases"][0]["name"], "shop", "{v}");

    // PostgreSQL's reserved names: 400, nothing created.
    for (path, body) in [
        ("databases", json!({"databases": [{"name": "template1"}]})),
        (
            "users",
            json!({"users": [{"name": "pg_monitor", "password": "x-Pw-123"}]}),
        ),
        (
            "users",
            json!({"users": [{"name": "coffer_admin", "password": "x-Pw-123"}]}),
        ),
    ] {
        let (st, v) = env
            .call("POST", &format!("/instances/{id}/{path}"), Some(body))
            .await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{path}: {v}");
    }
    let (_, v) = env
        .call("GET", &format!("/instances/{id}/users"), None)
        .await;
    assert_eq!(v["users"].as_array().unwrap().len(), 1, "{v}");

    // Root: the master user (every table, new databases) with a generated password, but not a
    // superuser: nothing of the host is reachable through it.
    let (st, v) = env
        .call("POST", &format!("/instances/{id}/root"), None)
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let pw = v["user"]["password"].as_str().unwrap().to_string();
    let mut r = connect(&view, "root", &pw, "postgres").await;
    let su: String = sqlx::query_scalar("SELECT current_setting('is_superuser')")
        .fetch_one(&mut r)
        .await
        .unwrap();
    assert_eq!(su, "off");
    sqlx::query("CREATE DATABASE root_made")
        .execute(&mut r)
        .await
        .unwrap();
    let key = env.dir.path().join("controller/controller.key");
    let out = env.dir.path().join("root-ran-this");
    for attack in [
        format!(
            "COPY (SELECT 1) TO PROGRAM 'cat {} > {}'",
            key.display(),
            out.display()
        ),
        format!("SELECT pg_read_file('{}')", key.display()),
        format!(
            "SELECT pg_read_binary_file('{}')",
            env.store_secret_file().display()
        ),
        "SELECT pg_ls_dir('/')".to_string(),
        format!("COPY (SELECT 1) TO '{}'", out.display()),
        "GRANT pg_execute_server_program TO root".to_string(),
        "CREATE ROLE other LOGIN SUPERUSER".to_string(),
    ] {
        let r = sqlx::query(&attack).execute(&mut r).await;
        assert!(r.is_err(), "root ran {attack}");
    }
    assert!(!out.exists(), "root wrote on the host");
    r.close().await.unwrap();
    let mut r = connect(&view, "root", &pw, "shop").await;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM information_schema.tables")
        .fetch_one(&mut r)
        .await
        .unwrap();
    assert!(n > 0);
    r.close().await.unwrap();

    // The server's log is a system log: listed, published and tailed by an admin.
    coffer_tests::check_sys_log(
        &env,
        &id,
        "postgresql",
        "database system is ready to accept connections",
    )
    .await;

    // The slow_query log: the tenant enables it; only statements over the threshold are in it.
    let log_path = format!("/instances/{id}/log");
    let log = |body: Value| env.call("POST", &log_path, Some(body));
    let (st, v) = log(json!({"name": "slow_query", "enable": 1})).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["log"]["type"], "USER", "{v}");
    let mut c = connect(&view, "app", "s3cret-Pw'\"", "shop").await;
    sqlx::query("SELECT pg_sleep(1.2), 'slow-one'")
        .execute(&mut c)
        .await
        .unwrap();
    sqlx::query("SELECT 'fast-one'")
        .execute(&mut c)
        .await
        .unwrap();
    let (st, v) = log(json!({"name": "slow_query", "publish": 1})).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let tail = || async {
        let (st, t) = env
            .call(
                "GET",
                &format!("/instances/{id}/log/slow_query/tail?lines=100"),
                None,
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{t}");
        t["lines"].as_array().cloned().unwrap_or_default()
    };
    let lines = tail().await;
    let has = |lines: &[Value], s: &str| lines.iter().any(|l| l.as_str().unwrap_or("").contains(s));
    assert!(
        has(&lines, "slow-one") && has(&lines, "duration:"),
        "{lines:?}"
    );
    assert!(
        !has(&lines, "fast-one"),
        "a fast statement in slow_query: {lines:?}"
    );
    assert!(
        !has(&lines, "ready to accept connections"),
        "server messages in slow_query: {lines:?}"
    );
    // Disabled: slow statements are no longer logged.
    let (st, v) = log(json!({"name": "slow_query", "disable": 1})).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    sqlx::query("SELECT pg_sleep(1.2), 'slow-two'")
        .execute(&mut c)
        .await
        .unwrap();
    c.close().await.unwrap();
    let (st, _) = log(json!({"name": "slow_query", "enable": 1})).await;
    assert_eq!(st, StatusCode::OK);
    let (st, v) = log(json!({"name": "slow_query", "publish": 1})).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert!(!has(&tail().await, "slow-two"), "logged while disabled");

    env.delete_and_wait_gone(&id).await;
    assert!(
        std::net::TcpStream::connect((host, port)).is_err(),
        "postgres still listens after delete"
    );
}
