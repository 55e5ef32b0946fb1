//! End-to-end scenarios written once and run for every datastore. A [`Store`] says how a tenant
//! reaches its datastore with that datastore's real client (sqlx for MariaDB and PostgreSQL, the
//! redis crate for Redis) using only what the API shows (ip, port) and the tenant's own
//! credentials; the scenarios are the same for all.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::{Env, StatusCode};

/// The tenant user every scenario creates.
pub const USER: &str = "app";
pub const PASSWORD: &str = "s3cret-Pw";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    Mariadb,
    Postgresql,
    Redis,
}

impl Store {
    pub fn name(self) -> &'static str {
        match self {
            Store::Mariadb => "mariadb",
            Store::Postgresql => "postgresql",
            Store::Redis => "redis",
        }
    }

    /// Registers the datastore in the environment's catalogue; returns its version label.
    pub fn register(self, env: &Env) -> String {
        match self {
            // The environment registers MariaDB itself.
            Store::Mariadb => String::new(),
            Store::Postgresql => crate::register_postgresql(env.config_path()),
            Store::Redis => crate::register_redis(env.config_path()),
        }
    }

    fn datastore(self, version: &str) -> Value {
        if version.is_empty() {
            json!({"type": self.name()})
        } else {
            json!({"type": self.name(), "version": version})
        }
    }

    fn user(self) -> Value {
        match self {
            Store::Redis => json!({"name": USER, "password": PASSWORD}),
            _ => json!({"name": USER, "password": PASSWORD, "databases": [{"name": "shop"}]}),
        }
    }

    /// The body of `POST /instances` for an instance with the tenant's user (and database).
    pub fn create_body(self, name: &str, version: &str) -> Value {
        let mut i = json!({
            "name": name, "flavorRef": "1", "volume": {"size": 1},
            "datastore": self.datastore(version),
            "users": [self.user()],
        });
        if self != Store::Redis {
            i["databases"] = json!([{"name": "shop"}]);
        }
        json!({ "instance": i })
    }

    /// The body of a restore. Redis users live outside the snapshot: the restore names them
    /// again; SQL users come back with the data.
    pub fn restore_body(self, name: &str, version: &str, backup: &str) -> Value {
        let mut i = json!({
            "name": name, "flavorRef": "1", "volume": {"size": 1},
            "datastore": self.datastore(version),
            "restorePoint": {"backupRef": backup},
        });
        if self == Store::Redis {
            i["users"] = json!([self.user()]);
        }
        json!({ "instance": i })
    }

    fn addr(view: &Value) -> (String, u16) {
        let host = view["ip"][0].as_str().expect("the API shows an ip");
        let port = view["port"].as_u64().expect("the API shows a port") as u16;
        (host.to_string(), port)
    }

    async fn redis(view: &Value) -> redis::aio::MultiplexedConnection {
        let (host, port) = Self::addr(view);
        let info = redis::ConnectionInfo {
            addr: redis::ConnectionAddr::Tcp(host.clone(), port),
            redis: redis::RedisConnectionInfo {
                db: 0,
                username: Some(USER.into()),
                password: Some(PASSWORD.into()),
                ..Default::default()
            },
        };
        redis::Client::open(info)
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|e| panic!("connecting to redis {host}:{port} as {USER}: {e}"))
    }

    async fn pg(view: &Value) -> sqlx::PgConnection {
        use sqlx::ConnectOptions;
        let (host, port) = Self::addr(view);
        sqlx::postgres::PgConnectOptions::new()
            .host(&host)
            .port(port)
            .username(USER)
            .password(PASSWORD)
            .database("shop")
            .connect()
            .await
            .unwrap_or_else(|e| panic!("connecting to postgresql {host}:{port} as {USER}: {e}"))
    }

    /// Writes `i` as the tenant (a row of `shop.t`, or a member of the Redis set `t`); returns
    /// once the server acknowledged it.
    pub async fn write(self, env: &Env, view: &Value, i: i32) {
        use sqlx::Connection;
        match self {
            Store::Mariadb => {
                let mut c = env.connect(view, USER, PASSWORD, "shop").await;
                sqlx::query("CREATE TABLE IF NOT EXISTS t (i INT PRIMARY KEY)")
                    .execute(&mut c)
                    .await
                    .unwrap();
                sqlx::query("INSERT INTO t VALUES (?)")
                    .bind(i)
                    .execute(&mut c)
                    .await
                    .unwrap();
                c.close().await.unwrap();
            }
            Store::Postgresql => {
                let mut c = Self::pg(view).await;
                sqlx::query("CREATE TABLE IF NOT EXISTS t (i INT PRIMARY KEY)")
                    .execute(&mut c)
                    .await
                    .unwrap();
                sqlx::query("INSERT INTO t VALUES ($1)")
                    .bind(i)
                    .execute(&mut c)
                    .await
                    .unwrap();
                c.close().await.unwrap();
            }
            Store::Redis => {
                let mut c = Self::redis(view).await;
                let _: i64 = redis::cmd("SADD")
                    .arg("t")
                    .arg(i)
                    .query_async(&mut c)
                    .await
                    .unwrap();
            }
        }
    }

    /// What the tenant reads back, sorted.
    pub async fn read(self, env: &Env, view: &Value) -> Vec<i32> {
        use sqlx::Connection;
        let mut v: Vec<i32> = match self {
            Store::Mariadb => env.rows(view).await,
            Store::Postgresql => {
                let mut c = Self::pg(view).await;
                let v = sqlx::query_scalar("SELECT i FROM t")
                    .fetch_all(&mut c)
                    .await
                    .unwrap();
                c.close().await.unwrap();
                v
            }
            Store::Redis => {
                let mut c = Self::redis(view).await;
                redis::cmd("SMEMBERS")
                    .arg("t")
                    .query_async(&mut c)
                    .await
                    .unwrap()
            }
        };
        v.sort();
        v
    }
}

/// The first file named `name` below `dir`, not looking into directories named `skip`.
fn find_file(dir: &std::path::Path, name: &str, skip: &str) -> Option<std::path::PathBuf> {
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        if p.is_dir() {
            if e.file_name() != skip {
                if let Some(f) = find_file(&p, name, skip) {
                    return Some(f);
                }
            }
        } else if e.file_name() == name {
            return Some(p);
        }
    }
    None
}

/// Creates an instance of `store` with the tenant's user; waits for ACTIVE; returns (id, view).
pub async fn create_active(env: &Env, store: Store, version: &str, name: &str) -> (String, Value) {
    let (st, v) = env
        .call("POST", "/instances", Some(store.create_body(name, version)))
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let id = v["instance"]["id"].as_str().unwrap().to_string();
    let view = env
        .wait_status(&id, "ACTIVE", Duration::from_secs(120))
        .await;
    assert_eq!(view["datastore"]["type"], store.name(), "{view}");
    (id, view)
}

/// Posts a backup of `instance` and waits for it to end in `want` (COMPLETED or FAILED).
pub async fn backup(env: &Env, instance: &str, want: &str) -> Value {
    let (st, v) = env
        .call(
            "POST",
            "/backups",
            Some(json!({"backup": {"name": "scenario", "instance": instance}})),
        )
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    let id = v["backup"]["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let (_, v) = env.call("GET", &format!("/backups/{id}"), None).await;
        let s = v["backup"]["status"].as_str().unwrap_or_default();
        if s == want {
            return v["backup"].clone();
        }
        assert!(
            s != "FAILED" && s != "COMPLETED",
            "backup {id} ended {s}, not {want}: {v}"
        );
        assert!(Instant::now() < deadline, "backup {id} not {want}: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Backup → restore into a new instance has exactly the data acknowledged before the backup;
/// the source keeps its later writes; a backup restored as another datastore is refused (400)
/// and creates nothing.
pub async fn backup_and_restore(env: &Env, store: Store) {
    let version = store.register(env);
    let (src, view) = create_active(env, store, &version, "scn-src").await;
    store.write(env, &view, 1).await;
    store.write(env, &view, 2).await;
    let b = backup(env, &src, "COMPLETED").await;
    let bid = b["id"].as_str().unwrap().to_string();
    assert_eq!(b["checksum"].as_str().map(str::len), Some(64), "{b}");
    store.write(env, &view, 3).await;

    // Into another datastore: 400, nothing created.
    let (_, before) = env.call("GET", "/instances", None).await;
    let other = if store == Store::Mariadb {
        Store::Postgresql
    } else {
        Store::Mariadb
    };
    let other_version = other.register(env);
    let (st, v) = env
        .call(
            "POST",
            "/instances",
            Some(other.restore_body("scn-wrong", &other_version, &bid)),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    let (_, after) = env.call("GET", "/instances", None).await;
    assert_eq!(
        before["instances"].as_array().map(Vec::len),
        after["instances"].as_array().map(Vec::len)
    );

    let (st, v) = env
        .call(
            "POST",
            "/instances",
            Some(store.restore_body("scn-restored", &version, &bid)),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let rid = v["instance"]["id"].as_str().unwrap().to_string();
    let rview = env
        .wait_status(&rid, "ACTIVE", Duration::from_secs(180))
        .await;
    assert_eq!(store.read(env, &rview).await, vec![1, 2]);
    assert_eq!(store.read(env, &view).await, vec![1, 2, 3]);
    if store == Store::Postgresql {
        // The agent's role was trusted on its private socket only for the first start.
        let hba = find_file(&env.instance_dir(&rid), "pg_hba.conf", "data")
            .expect("the restored instance's pg_hba.conf");
        let text = std::fs::read_to_string(&hba).unwrap();
        assert!(!text.contains("trust"), "{}: {text}", hba.display());
    }
    // The restored instance is a full instance: it takes writes and restarts with them.
    store.write(env, &rview, 4).await;
    let (st, v) = env.restart(&rid).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    let rview = env
        .wait_status(&rid, "ACTIVE", Duration::from_secs(120))
        .await;
    assert_eq!(store.read(env, &rview).await, vec![1, 2, 4]);
    env.delete_and_wait_gone(&rid).await;
    env.delete_and_wait_gone(&src).await;
}

/// A configuration-group case: a parameter the server changes live, one that needs a restart
/// (name, value, how the server then shows it), and a value the rules refuse.
struct CfgCase {
    live: (&'static str, Value, &'static str),
    restart: (&'static str, Value, &'static str),
    bad: (&'static str, Value),
}

impl Store {
    fn cfg_case(self) -> CfgCase {
        match self {
            Store::Mariadb => CfgCase {
                live: ("wait_timeout", json!(240), "240"),
                restart: ("innodb_open_files", json!(514), "514"),
                bad: ("wait_timeout", json!("soon")),
            },
            Store::Postgresql => CfgCase {
                live: ("work_mem", json!(8192), "8192"),
                restart: ("max_connections", json!(150), "150"),
                bad: ("work_mem", json!(1)),
            },
            Store::Redis => CfgCase {
                live: ("maxmemory-policy", json!("allkeys-lru"), "allkeys-lru"),
                restart: ("databases", json!(32), "32"),
                bad: ("maxmemory-policy", json!("sometimes")),
            },
        }
    }

    /// The server's current value of `name`, as the tenant sees it (MariaDB's `@@global`,
    /// PostgreSQL's `pg_settings`), or as root where tenants may not look (Redis CONFIG GET).
    pub async fn setting(self, view: &Value, root_pw: &str, name: &str) -> String {
        use sqlx::{Connection, Row};
        let deadline = Instant::now() + Duration::from_secs(30);
        // Right after a restart the server may not listen yet: try for a while.
        loop {
            let got: Result<String, String> = async {
                match self {
                    Store::Mariadb => {
                        use sqlx::ConnectOptions;
                        let (host, port) = Self::addr(view);
                        let mut c = sqlx::mysql::MySqlConnectOptions::new()
                            .host(&host)
                            .port(port)
                            .username(USER)
                            .password(PASSWORD)
                            .database("shop")
                            .connect()
                            .await
                            .map_err(|e| e.to_string())?;
                        let v: String =
                            sqlx::query(&format!("SELECT CAST(@@global.{name} AS CHAR)"))
                                .fetch_one(&mut c)
                                .await
                                .map_err(|e| e.to_string())?
                                .get(0);
                        let _ = c.close().await;
                        Ok(v)
                    }
                    Store::Postgresql => {
                        use sqlx::ConnectOptions;
                        let (host, port) = Self::addr(view);
                        let mut c = sqlx::postgres::PgConnectOptions::new()
                            .host(&host)
                            .port(port)
                            .username(USER)
                            .password(PASSWORD)
                            .database("shop")
                            .connect()
                            .await
                            .map_err(|e| e.to_string())?;
                        let v: String =
                            sqlx::query_scalar("SELECT setting FROM pg_settings WHERE name = $1")
                                .bind(name)
                                .fetch_one(&mut c)
                                .await
                                .map_err(|e| e.to_string())?;
                        let _ = c.close().await;
                        Ok(v)
                    }
                    Store::Redis => {
                        let (host, port) = Self::addr(view);
                        let info = redis::ConnectionInfo {
                            addr: redis::ConnectionAddr::Tcp(host, port),
                            redis: redis::RedisConnectionInfo {
                                db: 0,
                                username: Some("root".into()),
                                password: Some(root_pw.into()),
                                ..Default::default()
                            },
                        };
                        let mut c = redis::Client::open(info)
                            .map_err(|e| e.to_string())?
                            .get_multiplexed_async_connection()
                            .await
                            .map_err(|e| e.to_string())?;
                        let v: Vec<String> = redis::cmd("CONFIG")
                            .arg("GET")
                            .arg(name)
                            .query_async(&mut c)
                            .await
                            .map_err(|e| e.to_string())?;
                        v.get(1).cloned().ok_or_else(|| format!("no {name}"))
                    }
                }
            }
            .await;
            match got {
                Ok(v) => return v,
                Err(e) => assert!(Instant::now() < deadline, "reading {name}: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn wait_setting(self, view: &Value, root_pw: &str, name: &str, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let got = self.setting(view, root_pw, name).await;
            if got == want {
                return;
            }
            assert!(Instant::now() < deadline, "{name} is {got}, not {want}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn restart_and_wait(env: &Env, id: &str) {
    let (st, v) = env.restart(id).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    env.wait_status(id, "ACTIVE", Duration::from_secs(120))
        .await;
}

/// Configuration groups: a value the rules refuse is a 4xx that creates nothing; attaching a
/// group applies the dynamic value live and leaves the other pending (RESTART_REQUIRED) until
/// a restart; detaching puts the defaults back the same way.
pub async fn configuration_live_and_restart(env: &Env, store: Store) {
    let version = store.register(env);
    let (id, view) = create_active(env, store, &version, "scn-cfg").await;
    let version = view["datastore"]["version"].as_str().unwrap().to_string();
    let case = store.cfg_case();
    let (st, v) = env
        .call("POST", &format!("/instances/{id}/root"), None)
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let root_pw = v["user"]["password"].as_str().unwrap().to_string();
    let default_live = store.setting(&view, &root_pw, case.live.0).await;
    let default_restart = store.setting(&view, &root_pw, case.restart.0).await;
    assert_ne!(default_live, case.live.2);
    assert_ne!(default_restart, case.restart.2);

    let ds = json!({"type": store.name(), "version": version});
    let (_, before) = env.call("GET", "/configurations", None).await;
    let (st, v) = env
        .call(
            "POST",
            "/configurations",
            Some(json!({"configuration": {"name": "bad", "datastore": ds,
                "values": {case.bad.0: case.bad.1}}})),
        )
        .await;
    assert!(st.is_client_error(), "{st}: {v}");
    assert!(v.to_string().contains(case.bad.0), "{v}");
    let (_, after) = env.call("GET", "/configurations", None).await;
    assert_eq!(before, after, "a refused group was kept");

    let (st, v) = env
        .call(
            "POST",
            "/configurations",
            Some(json!({"configuration": {"name": "scn", "datastore": ds,
                "values": {case.live.0: case.live.1, case.restart.0: case.restart.1}}})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let gid = v["configuration"]["id"].as_str().unwrap().to_string();
    let path = format!("/instances/{id}");
    let attach = |g: Value| {
        env.call(
            "PUT",
            &path,
            Some(json!({"instance": {"configuration": g}})),
        )
    };
    let (st, v) = attach(json!(gid)).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    store
        .wait_setting(&view, &root_pw, case.live.0, case.live.2)
        .await;
    env.wait_status(&id, "RESTART_REQUIRED", Duration::from_secs(30))
        .await;
    assert_eq!(
        store.setting(&view, &root_pw, case.restart.0).await,
        default_restart,
        "not before the restart"
    );
    restart_and_wait(env, &id).await;
    assert_eq!(
        store.setting(&view, &root_pw, case.restart.0).await,
        case.restart.2
    );
    assert_eq!(
        store.setting(&view, &root_pw, case.live.0).await,
        case.live.2
    );

    // Detached: the defaults come back, live where they can, after a restart for the rest.
    let (st, v) = attach(Value::Null).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    store
        .wait_setting(&view, &root_pw, case.live.0, &default_live)
        .await;
    env.wait_status(&id, "RESTART_REQUIRED", Duration::from_secs(30))
        .await;
    restart_and_wait(env, &id).await;
    assert_eq!(
        store.setting(&view, &root_pw, case.restart.0).await,
        default_restart
    );
    env.delete_and_wait_gone(&id).await;
}
