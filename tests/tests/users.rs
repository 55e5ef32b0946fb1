//! Databases, users, access and root through the API, checked with real client logins.

use std::time::Duration;

use coffer_tests::{Env, StatusCode};
use serde_json::{json, Value};
use sqlx::{ConnectOptions, Connection, Row};

async fn login(
    view: &Value,
    user: &str,
    password: &str,
) -> Result<sqlx::MySqlConnection, sqlx::Error> {
    sqlx::mysql::MySqlConnectOptions::new()
        .host(view["ip"][0].as_str().unwrap())
        .port(view["port"].as_u64().unwrap() as u16)
        .username(user)
        .password(password)
        .connect()
        .await
}

async fn visible_dbs(c: &mut sqlx::MySqlConnection) -> Vec<String> {
    let mut v: Vec<String> = sqlx::query("SHOW DATABASES")
        .fetch_all(&mut *c)
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<String, _>(0))
        .filter(|d| d != "information_schema")
        .collect();
    v.sort();
    v
}

fn names(v: &Value, key: &str) -> Vec<String> {
    v[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap().to_string())
        .collect()
}

/// An ACTIVE instance with no databases or users.
async fn bare(env: &Env) -> (String, Value) {
    let (st, v) = env
        .call(
            "POST",
            "/instances",
            Some(json!({"instance": {"name": "acc", "flavorRef": "1", "volume": {"size": 1}}})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let id = v["instance"]["id"].as_str().unwrap().to_string();
    let view = env
        .wait_status(&id, "ACTIVE", Duration::from_secs(120))
        .await;
    (id, view)
}

/// A connection as the agent's own admin (over the socket), to look behind the API's back.
async fn admin(env: &Env, id: &str) -> sqlx::MySqlConnection {
    let root = env.instance_dir(id).join("state/mariadb");
    let pw = std::fs::read_to_string(root.join("admin.password")).unwrap();
    let sock = if root.join("mysqld.sock").exists() {
        root.join("mysqld.sock")
    } else {
        let cnf = std::fs::read_to_string(root.join("my.cnf")).unwrap();
        cnf.lines()
            .find_map(|l| l.strip_prefix("socket = "))
            .unwrap()
            .into()
    };
    sqlx::mysql::MySqlConnectOptions::new()
        .socket(sock)
        .username("coffer_admin")
        .password(pw.trim())
        .connect()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn databases_users_access_and_root() {
    let env = Env::start().await;
    let (id, view) = bare(&env).await;
    let i = format!("/instances/{id}");

    let (st, v) = env
        .call("POST", &format!("{i}/databases"), Some(json!({"databases": [{"name": "db_a"}, {"name": "db_b", "character_set": "utf8mb4", "collate": "utf8mb4_bin"}]})))
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    let (_, v) = env.call("GET", &format!("{i}/databases"), None).await;
    assert_eq!(
        names(&v, "databases"),
        vec!["db_a", "db_b"],
        "system schemas hidden"
    );
    let (st, v) = env
        .call(
            "POST",
            &format!("{i}/databases"),
            Some(json!({"databases": [{"name": "db_a"}]})),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "existing database: {v}");

    let (st, v) = env
        .call("POST", &format!("{i}/users"), Some(json!({"users": [{"name": "u1", "password": "P1-x", "databases": [{"name": "db_a"}]}]})))
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    let (st, _) = env
        .call(
            "POST",
            &format!("{i}/users"),
            Some(json!({"users": [{"name": "u1", "password": "P1-x"}]})),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "existing user");
    let (_, v) = env.call("GET", &format!("{i}/users"), None).await;
    assert_eq!(
        v["users"],
        json!([{"name": "u1", "host": "%", "databases": [{"name": "db_a"}]}]),
        "{v}"
    );
    let (_, v) = env.call("GET", &format!("{i}/users/u1"), None).await;
    assert_eq!(v["user"]["name"], "u1");

    // Exactly the granted databases.
    let mut c = login(&view, "u1", "P1-x").await.unwrap();
    assert_eq!(visible_dbs(&mut c).await, vec!["db_a"]);
    c.close().await.unwrap();
    let (st, _) = env
        .call(
            "PUT",
            &format!("{i}/users/u1/databases"),
            Some(json!({"databases": [{"name": "db_b"}]})),
        )
        .await;
    assert_eq!(st, StatusCode::ACCEPTED);
    let (_, v) = env
        .call("GET", &format!("{i}/users/u1/databases"), None)
        .await;
    assert_eq!(names(&v, "databases"), vec!["db_a", "db_b"]);
    let mut c = login(&view, "u1", "P1-x").await.unwrap();
    assert_eq!(visible_dbs(&mut c).await, vec!["db_a", "db_b"]);
    c.close().await.unwrap();
    let (st, _) = env
        .call("DELETE", &format!("{i}/users/u1/databases/db_a"), None)
        .await;
    assert_eq!(st, StatusCode::ACCEPTED);
    let mut c = login(&view, "u1", "P1-x").await.unwrap();
    assert!(
        sqlx::query("USE db_a").execute(&mut c).await.is_err(),
        "revoked"
    );
    assert_eq!(visible_dbs(&mut c).await, vec!["db_b"]);
    c.close().await.unwrap();
    let (st, _) = env
        .call("DELETE", &format!("{i}/users/u1/databases/db_a"), None)
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND, "nothing left to revoke");

    // Password change and rename.
    let (st, _) = env
        .call(
            "PUT",
            &format!("{i}/users/u1"),
            Some(json!({"user": {"password": "P2-y"}})),
        )
        .await;
    assert_eq!(st, StatusCode::ACCEPTED);
    assert!(login(&view, "u1", "P1-x").await.is_err());
    login(&view, "u1", "P2-y")
        .await
        .unwrap()
        .close()
        .await
        .unwrap();
    let (st, _) = env
        .call(
            "PUT",
            &format!("{i}/users/u1"),
            Some(json!({"user": {"name": "u2"}})),
        )
        .await;
    assert_eq!(st, StatusCode::ACCEPTED);
    login(&view, "u2", "P2-y")
        .await
        .unwrap()
        .close()
        .await
        .unwrap();
    let (st, _) = env
        .call(
            "PUT",
            &format!("{i}/users"),
            Some(json!({"users": [{"name": "u2", "password": "P3-z"}]})),
        )
        .await;
    assert_eq!(st, StatusCode::ACCEPTED);
    login(&view, "u2", "P3-z")
        .await
        .unwrap()
        .close()
        .await
        .unwrap();
    let (st, _) = env.call("DELETE", &format!("{i}/users/u2"), None).await;
    assert_eq!(st, StatusCode::ACCEPTED);
    assert!(
        login(&view, "u2", "P3-z").await.is_err(),
        "deleted users cannot log in"
    );
    let (st, _) = env.call("DELETE", &format!("{i}/users/u2"), None).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (st, _) = env
        .call("DELETE", &format!("{i}/databases/db_b"), None)
        .await;
    assert_eq!(st, StatusCode::ACCEPTED);
    let (st, _) = env
        .call("DELETE", &format!("{i}/databases/db_b"), None)
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (_, v) = env.call("GET", &format!("{i}/databases"), None).await;
    assert_eq!(names(&v, "databases"), vec!["db_a"]);

    // Root.
    assert_eq!(
        env.call("GET", &format!("{i}/root"), None).await.1["rootEnabled"],
        false
    );
    let (st, _) = env.call("DELETE", &format!("{i}/root"), None).await;
    assert_eq!(st, StatusCode::NOT_FOUND, "never enabled");
    let (st, v) = env.call("POST", &format!("{i}/root"), None).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["user"]["name"], "root");
    let pw1 = v["user"]["password"].as_str().unwrap().to_string();
    let mut root = login(&view, "root", &pw1).await.unwrap();
    sqlx::query("CREATE TABLE db_a.t (i INT)")
        .execute(&mut root)
        .await
        .unwrap();
    // Root's FILE privilege stays inside its own instance: the controller's store and key,
    // another instance's files and the host's are out of reach for LOAD_FILE and INTO OUTFILE.
    for outside in [
        env.store_secret_file(),
        env.dir.path().join("controller/controller.key"),
        std::path::PathBuf::from("/etc/passwd"),
    ] {
        let got: Option<Vec<u8>> = sqlx::query_scalar("SELECT LOAD_FILE(?)")
            .bind(outside.display().to_string())
            .fetch_one(&mut root)
            .await
            .unwrap();
        assert!(got.is_none(), "root read {}", outside.display());
    }
    let out = env.dir.path().join("root-wrote-this");
    let wrote = sqlx::query(&format!("SELECT 'x' INTO OUTFILE '{}'", out.display()))
        .execute(&mut root)
        .await;
    assert!(
        wrote.is_err() && !out.exists(),
        "root wrote outside its instance"
    );
    // read_only holds against root.
    let mut adm = admin(&env, &id).await;
    sqlx::query("SET GLOBAL read_only = ON")
        .execute(&mut adm)
        .await
        .unwrap();
    assert!(
        sqlx::query("INSERT INTO db_a.t VALUES (1)")
            .execute(&mut root)
            .await
            .is_err(),
        "root cannot write while read-only"
    );
    assert!(
        sqlx::query("SET GLOBAL read_only = OFF")
            .execute(&mut root)
            .await
            .is_err(),
        "root cannot lift read_only"
    );
    sqlx::query("SET GLOBAL read_only = OFF")
        .execute(&mut adm)
        .await
        .unwrap();
    root.close().await.unwrap();
    // Enabling again resets the password; a given password is used.
    let (_, v) = env
        .call(
            "POST",
            &format!("{i}/root"),
            Some(json!({"password": "Given-Root-1"})),
        )
        .await;
    assert_eq!(v["user"]["password"], "Given-Root-1");
    assert!(login(&view, "root", &pw1).await.is_err());
    login(&view, "root", "Given-Root-1")
        .await
        .unwrap()
        .close()
        .await
        .unwrap();
    assert_eq!(
        env.call("GET", &format!("{i}/root"), None).await.1["rootEnabled"],
        true
    );
    let (st, v) = env.call("DELETE", &format!("{i}/root"), None).await;
    assert_eq!(st, StatusCode::NO_CONTENT, "{v}");
    assert!(login(&view, "root", "Given-Root-1").await.is_err());
    assert_eq!(
        env.call("GET", &format!("{i}/root"), None).await.1["rootEnabled"],
        false
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_names_are_refused_and_change_nothing() {
    let env = Env::start().await;
    let (st, v) = env
        .call(
            "POST",
            "/instances",
            Some(json!({"instance": {"name": "n", "flavorRef": "1", "volume": {"size": 1}}})),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    let id = v["instance"]["id"].as_str().unwrap().to_string();
    let i = format!("/instances/{id}");
    // Not ACTIVE yet: 422.
    let (st, v) = env
        .call(
            "POST",
            &format!("{i}/databases"),
            Some(json!({"databases": [{"name": "early"}]})),
        )
        .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    let view = env
        .wait_status(&id, "ACTIVE", Duration::from_secs(120))
        .await;
    let mut adm = admin(&env, &id).await;
    let before: Vec<String> =
        sqlx::query("SELECT SCHEMA_NAME FROM information_schema.SCHEMATA ORDER BY 1")
            .fetch_all(&mut adm)
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
    let users_before: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM mysql.user")
        .fetch_one(&mut adm)
        .await
        .unwrap();
    let long = "x".repeat(65);
    for bad in [
        "a`b",
        "x'y",
        "a;b",
        "a%b",
        "ünï",
        "has space",
        "",
        long.as_str(),
        "mysql",
        "information_schema",
        "performance_schema",
        "sys",
        "d`; DROP DATABASE db_a; --",
    ] {
        let (st, v) = env
            .call(
                "POST",
                &format!("{i}/databases"),
                Some(json!({"databases": [{"name": bad}]})),
            )
            .await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "database {bad:?}: {v}");
        assert!(v["badRequest"]["message"].as_str().is_some());
    }
    let long_user = "u".repeat(81);
    for bad in [
        "root",
        "coffer_admin",
        "a'b",
        "x`y",
        "a;b",
        "ünï",
        "has space",
        "",
        long_user.as_str(),
        "u' OR '1'='1",
    ] {
        let (st, v) = env
            .call(
                "POST",
                &format!("{i}/users"),
                Some(json!({"users": [{"name": bad, "password": "Pw-1"}]})),
            )
            .await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "user {bad:?}: {v}");
    }
    for bad_host in ["a'b", "h`x", "h;x", "ü"] {
        let (st, v) = env
            .call(
                "POST",
                &format!("{i}/users"),
                Some(json!({"users": [{"name": "ok1", "password": "Pw-1", "host": bad_host}]})),
            )
            .await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "host {bad_host:?}: {v}");
    }
    // A password with quotes and backslashes is data, not SQL.
    let tricky = "p'w\\\"; DROP USER x; --";
    let (st, v) = env
        .call(
            "POST",
            &format!("{i}/users"),
            Some(json!({"users": [{"name": "tricky", "password": tricky}]})),
        )
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    login(&view, "tricky", tricky)
        .await
        .unwrap()
        .close()
        .await
        .unwrap();
    let (st, _) = env.call("DELETE", &format!("{i}/users/tricky"), None).await;
    assert_eq!(st, StatusCode::ACCEPTED);

    let after: Vec<String> =
        sqlx::query("SELECT SCHEMA_NAME FROM information_schema.SCHEMATA ORDER BY 1")
            .fetch_all(&mut adm)
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
    assert_eq!(before, after, "no database appeared or vanished");
    let users_after: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM mysql.user")
        .fetch_one(&mut adm)
        .await
        .unwrap();
    assert_eq!(users_before, users_after, "no user appeared or vanished");
    // Another project's instance: 404.
    let other = format!(
        "http://127.0.0.1:{}/v1.0/otherproject{i}/databases",
        env.api_port
    );
    let (st, _) = env
        .call_as(&env.other_token.clone(), "GET", &other, None)
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_hold_under_concurrent_creates() {
    let env = Env::start().await;
    let admin = env.admin_token.clone();
    let q = format!("{}/mgmt/quotas/{}", env.base(), env.project);
    let (st, v) = env
        .call_as(
            &env.token.clone(),
            "PUT",
            &q,
            Some(json!({"quotas": {"instances": 2}})),
        )
        .await;
    assert_eq!(st, StatusCode::FORBIDDEN, "only admins update: {v}");
    let (st, v) = env
        .call_as(&admin, "PUT", &q, Some(json!({"quotas": {"instances": 2}})))
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v, json!({"quotas": {"instances": 2}}));
    let (st, _) = env
        .call_as(
            &admin,
            "PUT",
            &q,
            Some(json!({"quotas": {"instances": -2}})),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let (st, _) = env
        .call_as(&admin, "PUT", &q, Some(json!({"quotas": {"gpus": 1}})))
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (st, _) = env
        .call_as(
            &env.other_token.clone(),
            "GET",
            &format!(
                "http://127.0.0.1:{}/v1.0/otherproject/mgmt/quotas/{}",
                env.api_port, env.project
            ),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::FORBIDDEN, "another project's quota");

    let body = json!({"instance": {"name": "q", "flavorRef": "1", "volume": {"size": 1}}});
    let (a, b, c) = tokio::join!(
        env.call("POST", "/instances", Some(body.clone())),
        env.call("POST", "/instances", Some(body.clone())),
        env.call("POST", "/instances", Some(body.clone())),
    );
    let codes: Vec<StatusCode> = [&a, &b, &c].iter().map(|r| r.0).collect();
    assert_eq!(
        codes.iter().filter(|s| **s == StatusCode::OK).count(),
        2,
        "{codes:?}"
    );
    let refused = [&a, &b, &c]
        .into_iter()
        .find(|r| r.0 != StatusCode::OK)
        .unwrap();
    assert_eq!(refused.0, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(
        refused.1["overLimit"]["message"]
            .as_str()
            .unwrap()
            .contains("instances"),
        "{}",
        refused.1
    );
    let (_, list) = env.call("GET", "/instances", None).await;
    let ids: Vec<String> = list["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 2, "the refused create left nothing behind");
    let in_use = |v: &Value, r: &str| {
        v["quotas"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["resource"] == r)
            .unwrap()["in_use"]
            .clone()
    };
    let (_, v) = env
        .call("GET", &format!("/mgmt/quotas/{}", env.project), None)
        .await;
    assert_eq!(in_use(&v, "instances"), 2);
    assert_eq!(in_use(&v, "ram"), 512);
    assert_eq!(in_use(&v, "volumes"), 2);
    let (_, v) = env.call("GET", "/limits", None).await;
    assert_eq!(v["limits"][0]["verb"], "ABSOLUTE");
    assert_eq!(v["limits"][0]["max_instances"], 2);

    for id in &ids {
        env.wait_status(id, "ACTIVE", Duration::from_secs(120))
            .await;
    }
    env.delete_and_wait_gone(&ids[0]).await;
    let (_, v) = env
        .call("GET", &format!("/mgmt/quotas/{}", env.project), None)
        .await;
    assert_eq!(in_use(&v, "instances"), 1, "deleting frees the quota");
    let (st, v) = env.call("POST", "/instances", Some(body)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_on_create_returns_the_password_once() {
    let env = Env::start().await;
    let version = {
        let out = std::process::Command::new("/usr/sbin/mariadbd")
            .arg("--version")
            .output()
            .unwrap();
        let t = String::from_utf8_lossy(&out.stdout).to_string();
        t.split("Ver ")
            .nth(1)
            .unwrap()
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.')
            .collect::<String>()
    };
    let out = std::process::Command::new(coffer_tests::bin("coffer-controller"))
        .arg("--config")
        .arg(env.config_path())
        .args([
            "manage",
            "datastore-version-update",
            "mariadb",
            "rooted",
            "mariadb",
            &version,
            "--root-on-create",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (st, v) = env
        .call(
            "POST",
            "/instances",
            Some(json!({"instance": {"name": "r", "flavorRef": "1", "volume": {"size": 1}, "datastore": {"type": "mariadb", "version": "rooted"}}})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let id = v["instance"]["id"].as_str().unwrap().to_string();
    let pw = v["instance"]["password"]
        .as_str()
        .expect("root password in the create response")
        .to_string();
    let view = env
        .wait_status(&id, "ACTIVE", Duration::from_secs(120))
        .await;
    assert!(
        view.get("password").is_none(),
        "only the create response carries it"
    );
    login(&view, "root", &pw)
        .await
        .unwrap()
        .close()
        .await
        .unwrap();
    assert_eq!(
        env.call("GET", &format!("/instances/{id}/root"), None)
            .await
            .1["rootEnabled"],
        true
    );
}

/// What users do at once: thirty creates across three projects with room for two each, while
/// other clients list and show. No 5xx, every refused create a 413, the quotas exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thirty_concurrent_creates_across_projects_keep_the_api_answering() {
    let env = Env::start().await;
    let projects = [
        (env.project.clone(), env.token.clone()),
        ("otherproject".to_string(), env.other_token.clone()),
        ("thirdproject".to_string(), env.third_token.clone()),
    ];
    for (p, _) in &projects {
        let (st, v) = env
            .call_as(
                &env.admin_token,
                "PUT",
                &format!("{}/mgmt/quotas/{p}", env.base()),
                Some(json!({"quotas": {"instances": 2}})),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{v}");
    }
    let base = |p: &str| format!("http://127.0.0.1:{}/v1.0/{p}", env.api_port);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Readers: list and show, all the while.
    let readers: Vec<_> = projects
        .iter()
        .map(|(p, tok)| {
            let (http, url, tok, stop) = (
                env.http.clone(),
                format!("{}/instances", base(p)),
                tok.clone(),
                stop.clone(),
            );
            tokio::spawn(async move {
                let mut took = vec![];
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let t = std::time::Instant::now();
                    let r = http
                        .get(&url)
                        .header("X-Auth-Token", &tok)
                        .send()
                        .await
                        .expect("list");
                    let st = r.status();
                    let body = r.text().await.unwrap_or_default();
                    assert!(st == StatusCode::OK, "a list answered {st}: {body}");
                    took.push(t.elapsed());
                }
                took
            })
        })
        .collect();
    let body = json!({"instance": {"name": "c", "flavorRef": "1", "volume": {"size": 1}}});
    let creates: Vec<_> = (0..30)
        .map(|i| {
            let (p, tok) = projects[i % 3].clone();
            let url = format!("{}/instances", base(&p));
            let env_http = env.http.clone();
            let body = body.clone();
            tokio::spawn(async move {
                let t = std::time::Instant::now();
                let r = env_http
                    .post(&url)
                    .header("X-Auth-Token", &tok)
                    .header("Content-Type", "application/json")
                    .body(body.to_string())
                    .send()
                    .await
                    .expect("create");
                let st = r.status();
                let v: Value = r.json().await.unwrap_or(Value::Null);
                (p, st, v, t.elapsed())
            })
        })
        .collect();
    let mut results = vec![];
    for c in creates {
        results.push(c.await.unwrap());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut lists = vec![];
    for r in readers {
        lists.extend(r.await.unwrap());
    }
    for (p, _) in &projects {
        let mine: Vec<_> = results.iter().filter(|r| &r.0 == p).collect();
        let ok = mine.iter().filter(|r| r.1 == StatusCode::OK).count();
        assert_eq!(
            ok,
            2,
            "{p}: {:?}",
            mine.iter().map(|r| (r.1, &r.2)).collect::<Vec<_>>()
        );
        for r in mine.iter().filter(|r| r.1 != StatusCode::OK) {
            assert_eq!(r.1, StatusCode::PAYLOAD_TOO_LARGE, "{p}: {}", r.2);
            assert!(
                r.2["overLimit"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("instances")),
                "{}",
                r.2
            );
        }
        let (_, v) = env
            .call_as(
                &env.admin_token,
                "GET",
                &format!("{}/mgmt/quotas/{p}", env.base()),
                None,
            )
            .await;
        let in_use = v["quotas"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["resource"] == "instances")
            .unwrap()["in_use"]
            .clone();
        assert_eq!(in_use, 2, "{p}: {v}");
    }
    lists.sort();
    let refused: Vec<_> = results
        .iter()
        .filter(|r| r.1 != StatusCode::OK)
        .map(|r| r.3)
        .collect();
    // Figures for the reader (the bench measures; tests do not time).
    println!(
        "lists: {} p50 {:?} p99 {:?}; slowest refusal {:?}",
        lists.len(),
        lists[lists.len() / 2],
        lists[lists.len() * 99 / 100],
        refused.iter().max()
    );
}
