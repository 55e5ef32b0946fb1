//! Configuration groups end to end against real MariaDB: the seed's walkthrough (defaults, attach
//! live, patch, restart-required, detach), bad input that changes nothing, persistence across
//! agent and database restarts, and the committed parameter rules checked against the server.

use std::time::{Duration, Instant};

use coffer_tests::{Env, StatusCode};
use serde_json::{json, Value};
use sqlx::{Connection, Row};

/// `@@global.<name>` as text, read by a client.
async fn global(_env: &Env, view: &Value, name: &str) -> String {
    // Right after a restart the server may not listen yet: try for a while.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut c = loop {
        use sqlx::ConnectOptions;
        let o = sqlx::mysql::MySqlConnectOptions::new()
            .host(view["ip"][0].as_str().unwrap())
            .port(view["port"].as_u64().unwrap() as u16)
            .username("app")
            .password("s3cret-Pw")
            .database("shop");
        match o.connect().await {
            Ok(c) => break c,
            Err(e) => assert!(Instant::now() < deadline, "connecting: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let v: String = sqlx::query(&format!("SELECT CAST(@@global.{name} AS CHAR)"))
        .fetch_one(&mut c)
        .await
        .unwrap()
        .get(0);
    c.close().await.unwrap();
    v
}

async fn wait_global(env: &Env, view: &Value, name: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = global(env, view, name).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "@@global.{name} is {got}, not {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn create_group(env: &Env, name: &str, values: Value) -> String {
    let (st, v) = env
        .call(
            "POST",
            "/configurations",
            Some(json!({"configuration": {"name": name, "values": values}})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    v["configuration"]["id"].as_str().unwrap().to_string()
}

async fn attach(env: &Env, id: &str, group: Value) -> (StatusCode, Value) {
    env.call(
        "PUT",
        &format!("/instances/{id}"),
        Some(json!({"instance": {"configuration": group}})),
    )
    .await
}

async fn restart_and_wait(env: &Env, id: &str) {
    let (st, v) = env.restart(id).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    env.wait_status(id, "ACTIVE", Duration::from_secs(60)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_walkthrough() {
    let env = Env::start().await;
    let (id, view) = env.active_with_rows("cfg", &[]).await;
    let version = view["datastore"]["version"].as_str().unwrap().to_string();

    // The defaults: the rendered template, and the live values.
    let (st, d) = env
        .call("GET", &format!("/instances/{id}/configuration"), None)
        .await;
    assert_eq!(st, StatusCode::OK, "{d}");
    let default_mc = d["instance"]["configuration"]["max_connections"]
        .as_i64()
        .expect("max_connections is in the rendered defaults");
    assert_eq!(
        global(&env, &view, "max_connections").await,
        default_mc.to_string()
    );
    let default_wt = global(&env, &view, "wait_timeout").await;
    assert_eq!(default_wt, "28800");
    let default_iof = global(&env, &view, "innodb_open_files").await;

    // The parameters of the version, in Trove's shapes.
    let (st, p) = env
        .call(
            "GET",
            &format!("/datastores/mariadb/versions/{version}/parameters"),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{p}");
    let wt = p["configuration-parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == "wait_timeout")
        .unwrap()
        .clone();
    assert_eq!(wt["type"], "integer");
    assert_eq!(wt["restart_required"], false);
    assert!(wt["min"].is_number() && wt["max"].is_number(), "{wt}");
    let (st, one) = env
        .call(
            "GET",
            &format!("/datastores/mariadb/versions/{version}/parameters/innodb_open_files"),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(one["name"], "innodb_open_files");
    assert_eq!(one["restart_required"], true, "{one}");

    // Create and attach: applied live, no restart.
    let gid = create_group(
        &env,
        "group1",
        json!({"wait_timeout": 240, "max_connections": 200}),
    )
    .await;
    let (st, v) = attach(&env, &id, json!(gid)).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    wait_global(&env, &view, "wait_timeout", "240").await;
    wait_global(&env, &view, "max_connections", "200").await;
    let (_, shown) = env.show(&id).await;
    assert_eq!(shown["instance"]["status"], "ACTIVE");
    assert_eq!(shown["instance"]["configuration"]["id"], gid.as_str());
    let (_, insts) = env
        .call("GET", &format!("/configurations/{gid}/instances"), None)
        .await;
    assert_eq!(insts["instances"], json!([{"id": id, "name": "cfg"}]));
    let (_, g) = env
        .call("GET", &format!("/configurations/{gid}"), None)
        .await;
    assert_eq!(g["configuration"]["instance_count"], 1);

    // Patch merges, and reaches the instance.
    let (st, v) = env
        .raw(
            "PATCH",
            &format!("/configurations/{gid}"),
            &json!({"configuration": {"values": {"max_connections": 300}}}).to_string(),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    wait_global(&env, &view, "max_connections", "300").await;
    assert_eq!(global(&env, &view, "wait_timeout").await, "240");

    // A value that needs a restart: RESTART_REQUIRED until restarted, then in effect.
    let (st, _) = env
        .raw(
            "PATCH",
            &format!("/configurations/{gid}"),
            &json!({"configuration": {"values": {"innodb_open_files": 514}}}).to_string(),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    env.wait_status(&id, "RESTART_REQUIRED", Duration::from_secs(30))
        .await;
    assert_eq!(
        global(&env, &view, "innodb_open_files").await,
        default_iof,
        "not before the restart"
    );
    restart_and_wait(&env, &id).await;
    assert_eq!(global(&env, &view, "innodb_open_files").await, "514");
    assert_eq!(global(&env, &view, "wait_timeout").await, "240");
    assert_eq!(global(&env, &view, "max_connections").await, "300");

    // Attached: cannot be deleted, and a second group cannot be attached.
    let (st, v) = env
        .call("DELETE", &format!("/configurations/{gid}"), None)
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    let other = create_group(&env, "group2", json!({"wait_timeout": 100})).await;
    let (st, v) = attach(&env, &id, json!(other)).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(global(&env, &view, "wait_timeout").await, "240");

    // Detach: the defaults come back (live where they can, after a restart for the rest).
    let (st, v) = attach(&env, &id, Value::Null).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    wait_global(&env, &view, "wait_timeout", &default_wt).await;
    wait_global(&env, &view, "max_connections", &default_mc.to_string()).await;
    env.wait_status(&id, "RESTART_REQUIRED", Duration::from_secs(30))
        .await;
    restart_and_wait(&env, &id).await;
    assert_eq!(global(&env, &view, "innodb_open_files").await, default_iof);
    let (_, shown) = env.show(&id).await;
    assert!(shown["instance"].get("configuration").is_none(), "{shown}");
    let (_, d2) = env
        .call("GET", &format!("/instances/{id}/configuration"), None)
        .await;
    assert_eq!(d2, d, "the default configuration is unchanged by groups");

    // Detached: delete works.
    let (st, _) = env
        .call("DELETE", &format!("/configurations/{gid}"), None)
        .await;
    assert_eq!(st, StatusCode::ACCEPTED);
    assert_eq!(
        env.call("GET", &format!("/configurations/{gid}"), None)
            .await
            .0,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_values_are_refused_and_change_nothing() {
    let env = Env::start().await;
    let (id, view) = env.active_with_rows("bad", &[]).await;
    let bad = |values: Value| {
        let env = &env;
        async move {
            let (st, v) = env
                .call(
                    "POST",
                    "/configurations",
                    Some(json!({"configuration": {"name": "bad", "values": values}})),
                )
                .await;
            assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
            v["unprocessableEntity"]["message"]
                .as_str()
                .unwrap()
                .to_string()
        }
    };
    assert!(bad(json!({"no_such_parameter": 1}))
        .await
        .contains("no_such_parameter"));
    assert!(bad(json!({"wait_timeout": "240"}))
        .await
        .contains("not of type integer"));
    assert!(bad(json!({"wait_timeout": 0})).await.contains("minimum"));
    assert!(bad(json!({"max_connections": 100_000_000}))
        .await
        .contains("maximum"));
    assert!(bad(json!({"autocommit": "yes"})).await.contains("boolean"));
    // Meant to inject into the option file: refused.
    let m = bad(json!({"character_set_server": "utf8mb4\ninit_file=/tmp/x"})).await;
    assert!(m.contains("character_set_server"), "{m}");
    bad(json!({"sql_mode": "STRICT_TRANS_TABLES # x"})).await;
    bad(json!({"collation_server": "utf8mb4_general_ci#"})).await;
    // Every bad value is named in one answer.
    let m = bad(json!({"wait_timeout": -1, "bogus": 1, "max_connections": "x"})).await;
    assert!(
        m.contains("wait_timeout") && m.contains("bogus") && m.contains("max_connections"),
        "{m}"
    );
    let (_, list) = env.call("GET", "/configurations", None).await;
    assert_eq!(list["configurations"], json!([]), "nothing was created");

    // A bad patch leaves the group and the instance as they were.
    let gid = create_group(&env, "good", json!({"wait_timeout": 300})).await;
    let (st, _) = attach(&env, &id, json!(gid)).await;
    assert_eq!(st, StatusCode::ACCEPTED);
    wait_global(&env, &view, "wait_timeout", "300").await;
    let (st, v) = env
        .raw(
            "PATCH",
            &format!("/configurations/{gid}"),
            &json!({"configuration": {"values": {"wait_timeout": "1\nsecure_file_priv=/"}}})
                .to_string(),
        )
        .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    let (_, g) = env
        .call("GET", &format!("/configurations/{gid}"), None)
        .await;
    assert_eq!(g["configuration"]["values"], json!({"wait_timeout": 300}));
    // The agent applies a value live first and then keeps it in the option file: wait for
    // the file too.
    let cnf_path = env.instance_dir(&id).join("state/mariadb/overrides.cnf");
    let deadline = Instant::now() + Duration::from_secs(30);
    let cnf = loop {
        let cnf = std::fs::read_to_string(&cnf_path).unwrap();
        if cnf.contains("wait_timeout = 300") || Instant::now() > deadline {
            break cnf;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        cnf.contains("wait_timeout = 300") && !cnf.contains("secure_file_priv"),
        "{cnf}"
    );
    assert_eq!(global(&env, &view, "wait_timeout").await, "300");
    // Not ACTIVE (still building): attaching is refused.
    let building = env.create("building").await;
    let (st, v) = attach(&env, &building, json!(gid)).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    // Unknown group: 404; wrong shapes: 400.
    let (st, _) = env
        .call(
            "POST",
            "/configurations",
            Some(json!({"configuration": {"values": {}}})),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let (st, _) = env
        .call(
            "GET",
            "/configurations/00000000-0000-0000-0000-000000000000",
            None,
        )
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overrides_survive_agent_and_database_restarts() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let env = Env::start().await;
    let gid = create_group(&env, "keep", json!({"wait_timeout": 250})).await;
    // Attached at create: in effect from the first start.
    let (st, v) = env
        .call(
            "POST",
            "/instances",
            Some(json!({"instance": {"name": "keep", "flavorRef": "1", "volume": {"size": 1},
                "configuration": gid,
                "databases": [{"name": "shop"}],
                "users": [{"name": "app", "password": "s3cret-Pw", "databases": [{"name": "shop"}]}]}})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let id = v["instance"]["id"].as_str().unwrap().to_string();
    let view = env
        .wait_status(&id, "ACTIVE", Duration::from_secs(120))
        .await;
    assert_eq!(global(&env, &view, "wait_timeout").await, "250");
    assert_eq!(view["configuration"]["id"], gid.as_str());

    // The agent dies and is replaced: the database and its overrides carry on.
    env.replace_agent(&id).await;
    env.wait_status(&id, "ACTIVE", Duration::from_secs(30))
        .await;
    assert_eq!(global(&env, &view, "wait_timeout").await, "250");

    // The database crashes and is restarted by the agent: still in effect.
    let db = env.db_pid(&id).unwrap();
    kill(Pid::from_raw(db), Signal::SIGKILL).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while env
        .db_pid(&id)
        .is_none_or(|p| p == db || !coffer_tests::pid_alive(p))
    {
        assert!(
            Instant::now() < deadline,
            "database not restarted\n{}",
            env.logs(&id)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    env.wait_status(&id, "ACTIVE", Duration::from_secs(60))
        .await;
    assert_eq!(global(&env, &view, "wait_timeout").await, "250");
}

/// The committed MariaDB rules are what the installed server says about its variables.
/// `COFFER_UPDATE_RULES=1` rewrites the file instead (`cargo xtask gen-rules`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_parameter_rules_match_the_server() {
    use coffer_strategies::config_rules::{mariadb_rules, SysVar, MARIADB_RULES_QUERY};
    let env = Env::start().await;
    let (_, view) = env.active_with_rows("rules", &[]).await;
    let mut c = env.connect(&view, "app", "s3cret-Pw", "shop").await;
    let vars: Vec<SysVar> = sqlx::query(MARIADB_RULES_QUERY)
        .fetch_all(&mut c)
        .await
        .unwrap()
        .iter()
        .map(|r| SysVar {
            name: r.get(0),
            var_type: r.get(1),
            min: r.get(2),
            max: r.get(3),
            enum_values: r.get(4),
            read_only: r.get::<String, _>(5) == "YES",
        })
        .collect();
    let mut names = Vec::new();
    for sql in [
        "SELECT CAST(CHARACTER_SET_NAME AS CHAR) FROM information_schema.CHARACTER_SETS ORDER BY 1",
        "SELECT CAST(COLLATION_NAME AS CHAR) FROM information_schema.COLLATIONS ORDER BY 1",
    ] {
        names.push(
            sqlx::query(sql)
                .fetch_all(&mut c)
                .await
                .unwrap()
                .iter()
                .map(|r| r.get::<String, _>(0))
                .collect::<Vec<String>>(),
        );
    }
    let (charsets, collations) = (&names[0], &names[1]);
    c.close().await.unwrap();
    let rules = mariadb_rules(&vars, charsets, collations).unwrap();
    let text = serde_json::to_string_pretty(&rules).unwrap() + "\n";
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto/rules/mariadb-10.11.json");
    if std::env::var("COFFER_UPDATE_RULES").as_deref() == Ok("1") {
        std::fs::write(&path, &text).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap();
    assert!(
        committed == text,
        "{} is not what the installed server describes; regenerate it with `cargo xtask gen-rules` and review the diff",
        path.display()
    );
}
