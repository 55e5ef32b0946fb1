//! Redis through the same API and agent traits: create with a user → ACTIVE → the user
//! authenticates (an ACL user whose password the server holds only as a hash) and reads and
//! writes, but the operator's commands (CONFIG, SHUTDOWN, ACL, DEBUG) are refused to it; the
//! `default` user is off; databases answer a clear 400; root enable gives every command; a new
//! agent adopts the running server; operations this release does not cover answer clearly;
//! delete stops the server.

use std::time::Duration;

use coffer_tests::{register_redis, Env, StatusCode};
use serde_json::{json, Value};

async fn client(
    view: &Value,
    user: Option<&str>,
    password: Option<&str>,
) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
    let host = view["ip"][0].as_str().expect("an ip").to_string();
    let port = view["port"].as_u64().expect("a port") as u16;
    let info = redis::ConnectionInfo {
        addr: redis::ConnectionAddr::Tcp(host, port),
        redis: redis::RedisConnectionInfo {
            db: 0,
            username: user.map(str::to_string),
            password: password.map(str::to_string),
            ..Default::default()
        },
    };
    redis::Client::open(info)?
        .get_multiplexed_async_connection()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_instance_serves_acl_users_and_keeps_the_operators_commands() {
    let env = Env::start().await;
    let version = register_redis(env.config_path());
    // Named databases, which Redis does not have, are refused up front: nothing is placed.
    for body in [
        json!({"databases": [{"name": "shop"}], "users": [{"name": "app", "password": "s3cret-Pw"}]}),
        json!({"users": [{"name": "app", "password": "s3cret-Pw", "databases": [{"name": "shop"}]}]}),
    ] {
        let mut inst = json!({"name": "redis-db", "flavorRef": "1", "volume": {"size": 1},
            "datastore": {"type": "redis", "version": version}});
        inst.as_object_mut()
            .unwrap()
            .extend(body.as_object().unwrap().clone());
        let (st, v) = env
            .call("POST", "/instances", Some(json!({ "instance": inst })))
            .await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    }
    let (_, v) = env
        .call(
            "POST",
            "/instances",
            Some(
                json!({"instance": {"name": "redis-db", "flavorRef": "1", "volume": {"size": 1},
                "datastore": {"type": "redis", "version": version},
                "databases": [{"name": "shop"}]}}),
            ),
        )
        .await;
    assert!(
        v["badRequest"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("redis instances have no named databases"),
        "{v}"
    );
    let (_, listed) = env.call("GET", "/instances", None).await;
    assert_eq!(
        listed["instances"],
        json!([]),
        "a refused create left an instance"
    );
    assert!(
        std::fs::read_dir(env.dir.path().join("instances"))
            .map(|d| d.count() == 0)
            .unwrap_or(true),
        "a refused create placed an agent"
    );
    let (st, v) = env
        .call(
            "POST",
            "/instances",
            Some(json!({"instance": {
                "name": "redis-1", "flavorRef": "1", "volume": {"size": 1},
                "datastore": {"type": "redis", "version": version},
                "users": [{"name": "app", "password": "s3cret-Pw"}],
            }})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let id = v["instance"]["id"].as_str().unwrap().to_string();
    let view = env
        .wait_status(&id, "ACTIVE", Duration::from_secs(60))
        .await;
    assert_eq!(view["datastore"]["type"], "redis");

    let mut c = client(&view, Some("app"), Some("s3cret-Pw")).await.unwrap();
    let _: () = redis::cmd("SET")
        .arg("k")
        .arg("v")
        .query_async(&mut c)
        .await
        .unwrap();
    let got: String = redis::cmd("GET")
        .arg("k")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(got, "v");
    for cmd in [
        vec!["CONFIG", "GET", "maxmemory"],
        vec!["ACL", "LIST"],
        vec!["SHUTDOWN"],
        vec!["DEBUG", "SLEEP", "0"],
    ] {
        let mut r = redis::cmd(cmd[0]);
        for a in &cmd[1..] {
            r.arg(*a);
        }
        let e = r.query_async::<Value2>(&mut c).await;
        assert!(e.is_err(), "{cmd:?} allowed to a tenant user");
    }
    // Wrong password, and the default user, are refused.
    assert!(client(&view, Some("app"), Some("wrong")).await.is_err());
    let mut anon = client(&view, None, None).await;
    if let Ok(a) = anon.as_mut() {
        let r: redis::RedisResult<String> = redis::cmd("GET").arg("k").query_async(a).await;
        assert!(r.is_err(), "the default user reads");
    }

    // Users through the API; databases are not applicable.
    let (_, v) = env
        .call("GET", &format!("/instances/{id}/users"), None)
        .await;
    let names: Vec<&str> = v["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["app"], "{v}");
    let (st, v) = env
        .call(
            "POST",
            &format!("/instances/{id}/databases"),
            Some(json!({"databases": [{"name": "db1"}]})),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    let (st, v) = env
        .call(
            "POST",
            &format!("/instances/{id}/users"),
            Some(json!({"users": [{"name": "default", "password": "x-Pw-123"}]})),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");

    // Root: every command.
    let (st, v) = env
        .call("POST", &format!("/instances/{id}/root"), None)
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let pw = v["user"]["password"].as_str().unwrap().to_string();
    let mut r = client(&view, Some("root"), Some(&pw)).await.unwrap();
    let cfg: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory")
        .query_async(&mut r)
        .await
        .unwrap();
    assert_eq!(cfg[0], "maxmemory");
    // ... but nothing that reaches the host as the server's OS user: moving the dump file
    // elsewhere, loading a module, debugging.
    for attack in [
        vec!["CONFIG", "SET", "dir", "/tmp"],
        vec!["CONFIG", "SET", "dbfilename", "authorized_keys"],
        vec!["MODULE", "LOAD", "/tmp/evil.so"],
        vec!["DEBUG", "SLEEP", "0"],
    ] {
        let mut c = redis::cmd(attack[0]);
        for a in &attack[1..] {
            c.arg(*a);
        }
        let r: redis::RedisResult<redis::Value> = c.query_async(&mut r).await;
        assert!(r.is_err(), "root ran {attack:?}: {r:?}");
    }

    // The server's log is a system log: listed, published and tailed by an admin.
    coffer_tests::check_sys_log(&env, &id, "redis", "Ready to accept connections").await;

    // A new agent adopts the running server.
    let pid = env.db_pid(&id).expect("the server's pid");
    env.replace_agent(&id).await;
    env.wait_status(&id, "ACTIVE", Duration::from_secs(60))
        .await;
    assert_eq!(env.db_pid(&id), Some(pid));
    let got: String = redis::cmd("GET")
        .arg("k")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(got, "v");

    env.delete_and_wait_gone(&id).await;
    let port = view["port"].as_u64().unwrap() as u16;
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}

type Value2 = redis::Value;
