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

    /// The body of a restore: the users come back with the data.
    pub fn restore_body(self, name: &str, version: &str, backup: &str) -> Value {
        json!({ "instance": {
            "name": name, "flavorRef": "1", "volume": {"size": 1},
            "datastore": self.datastore(version),
            "restorePoint": {"backupRef": backup},
        }})
    }

    fn addr(view: &Value) -> (String, u16) {
        let host = view["ip"][0].as_str().expect("the API shows an ip");
        let port = view["port"].as_u64().expect("the API shows a port") as u16;
        (host.to_string(), port)
    }

    async fn redis(view: &Value) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
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
        redis::Client::open(info)?
            .get_multiplexed_async_connection()
            .await
    }

    /// The tenant's connection to a PostgreSQL instance's `shop` database.
    pub async fn pg(view: &Value) -> Result<sqlx::PgConnection, sqlx::Error> {
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
    }

    async fn mysql(view: &Value) -> Result<sqlx::MySqlConnection, String> {
        use sqlx::ConnectOptions;
        let (host, port) = Self::addr(view);
        sqlx::mysql::MySqlConnectOptions::new()
            .host(&host)
            .port(port)
            .username(USER)
            .password(PASSWORD)
            .database("shop")
            .connect()
            .await
            .map_err(|e| format!("connecting to mariadb {host}:{port} as {USER}: {e}"))
    }

    /// Writes `i` as the tenant (a row of `shop.t`, or a member of the Redis set `t`); Ok once
    /// the server acknowledged it.
    pub async fn try_write(self, view: &Value, i: i32) -> Result<(), String> {
        use sqlx::Connection;
        let e = |e: &dyn std::fmt::Display| e.to_string();
        match self {
            Store::Mariadb => {
                let mut c = Self::mysql(view).await?;
                sqlx::query("CREATE TABLE IF NOT EXISTS t (i INT PRIMARY KEY)")
                    .execute(&mut c)
                    .await
                    .map_err(|x| e(&x))?;
                let r = sqlx::query("INSERT INTO t VALUES (?)")
                    .bind(i)
                    .execute(&mut c)
                    .await
                    .map_err(|x| e(&x));
                let _ = c.close().await;
                r.map(|_| ())
            }
            Store::Postgresql => {
                let mut c = Self::pg(view).await.map_err(|x| e(&x))?;
                sqlx::query("CREATE TABLE IF NOT EXISTS t (i INT PRIMARY KEY)")
                    .execute(&mut c)
                    .await
                    .map_err(|x| e(&x))?;
                let r = sqlx::query("INSERT INTO t VALUES ($1)")
                    .bind(i)
                    .execute(&mut c)
                    .await
                    .map_err(|x| e(&x));
                let _ = c.close().await;
                r.map(|_| ())
            }
            Store::Redis => {
                let mut c = Self::redis(view).await.map_err(|x| e(&x))?;
                redis::cmd("SADD")
                    .arg("t")
                    .arg(i)
                    .query_async::<i64>(&mut c)
                    .await
                    .map(|_| ())
                    .map_err(|x| e(&x))
            }
        }
    }

    /// Writes `i` as the tenant; panics if the server does not acknowledge it.
    pub async fn write(self, _env: &Env, view: &Value, i: i32) {
        if let Err(e) = self.try_write(view, i).await {
            panic!("writing {i}: {e}");
        }
    }

    /// What the tenant reads back, sorted.
    pub async fn try_read(self, view: &Value) -> Result<Vec<i32>, String> {
        use sqlx::Connection;
        let e = |e: &dyn std::fmt::Display| e.to_string();
        let mut v: Vec<i32> = match self {
            Store::Mariadb => {
                let mut c = Self::mysql(view).await?;
                let v = sqlx::query_scalar("SELECT i FROM t")
                    .fetch_all(&mut c)
                    .await
                    .map_err(|x| e(&x));
                let _ = c.close().await;
                v?
            }
            Store::Postgresql => {
                let mut c = Self::pg(view).await.map_err(|x| e(&x))?;
                let v = sqlx::query_scalar("SELECT i FROM t")
                    .fetch_all(&mut c)
                    .await
                    .map_err(|x| e(&x));
                let _ = c.close().await;
                v?
            }
            Store::Redis => {
                let mut c = Self::redis(view).await.map_err(|x| e(&x))?;
                redis::cmd("SMEMBERS")
                    .arg("t")
                    .query_async(&mut c)
                    .await
                    .map_err(|x| e(&x))?
            }
        };
        v.sort();
        Ok(v)
    }

    pub async fn read(self, _env: &Env, view: &Value) -> Vec<i32> {
        self.try_read(view)
            .await
            .unwrap_or_else(|e| panic!("reading: {e}"))
    }

    /// Waits until the tenant reads exactly `want` (a replica catching up).
    pub async fn wait_read(self, view: &Value, want: &[i32]) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let got = self.try_read(view).await;
            if got.as_deref() == Ok(want) {
                return;
            }
            assert!(Instant::now() < deadline, "read {got:?}, not {want:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
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

    // A point in time where no change stream is archived: 400 saying what is offered.
    if store == Store::Redis {
        let mut body = store.restore_body("scn-pitr", &version, &bid);
        body["instance"]["restorePoint"]["restore_time"] =
            json!(format!("{}Z", crate::now_rfc3339()));
        let (st, v) = env.call("POST", "/instances", Some(body)).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
        assert!(
            v.to_string()
                .contains("Point-in-time restore is not available"),
            "{v}"
        );
    }
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

    // A restore drill of the source restores that backup into a throwaway instance, runs the
    // datastore's own checks on it and passes.
    let drill = env.start_drill(&src).await;
    let v = env.wait_drill(&drill).await;
    let d = &v["restore_drill"];
    assert_eq!(d["status"], "PASSED", "{v}");
    let report = &d["report"];
    assert_eq!(report["backup_id"], json!(bid), "{v}");
    assert_eq!(report["failed_checks"], json!([]), "{v}");
    let checks = report["checks"].as_array().unwrap();
    let has = |prefix: &str| {
        checks
            .iter()
            .any(|c| c["name"].as_str().unwrap().starts_with(prefix) && c["ok"] == true)
    };
    match store {
        Store::Mariadb => assert!(has("check table"), "{v}"),
        Store::Postgresql => assert!(has("index ") && has("table "), "{v}"),
        Store::Redis => assert!(has("dump loaded") && has("keys "), "{v}"),
    }
    assert!(has("inventory"), "{v}");
    assert!(report["rto_seconds"].as_f64().unwrap() > 0.0, "{v}");
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

async fn instance(env: &Env, id: &str) -> Value {
    env.show(id).await.1["instance"].clone()
}

/// `POST /instances/{id}/action` with `{name: {}}`, expecting 202.
async fn action(env: &Env, id: &str, name: &str) {
    let (st, v) = env
        .call(
            "POST",
            &format!("/instances/{id}/action"),
            Some(json!({ name: {} })),
        )
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{name}: {v}");
}

/// Waits until `id` is a source (no `replica_of`) and ACTIVE.
async fn wait_source(env: &Env, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let n = instance(env, id).await;
        if n.get("replica_of").is_none() && n["status"] == "ACTIVE" {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "{id} did not become the source: {n}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Writes as the tenant, round-robin over `views` whenever one refuses, until `stop`; returns
/// the values the servers acknowledged.
fn spawn_writer(
    store: Store,
    views: Vec<Value>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<Vec<i32>> {
    tokio::spawn(async move {
        let mut acked = Vec::new();
        let (mut i, mut cur) = (10_000, 0);
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            if store.try_write(&views[cur], i).await.is_ok() {
                acked.push(i);
                i += 1;
            } else {
                cur = (cur + 1) % views.len();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        acked
    })
}

/// Replication: replicas built from a snapshot catch up and refuse tenant writes; a switchover
/// under a continuous writer loses no acknowledged write and the old source follows the new
/// one, read-only; after the new source's host dies, eject elects a replica and the survivor
/// follows it. Needs an environment whose agents are not respawned.
pub async fn replication(env: &Env, store: Store) {
    let version = store.register(env);
    let (src, sview) = create_active(env, store, &version, "scn-src").await;
    store.write(env, &sview, 1).await;
    let (st, v) = env
        .call(
            "POST",
            "/instances",
            Some(json!({"instance": {"name": "scn-rep", "replica_of": src, "replica_count": 2}})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let ids: Vec<String> = instance(env, &src).await["replicas"]
        .as_array()
        .expect("the source lists its replicas")
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 2);
    let mut views = vec![sview.clone()];
    for id in &ids {
        let v = env
            .wait_status(id, "ACTIVE", Duration::from_secs(180))
            .await;
        assert_eq!(v["replica_of"]["id"], src.as_str(), "{v}");
        views.push(v);
    }
    // They catch up, show their role, and refuse tenant writes.
    store.write(env, &sview, 2).await;
    for v in &views[1..] {
        store.wait_read(v, &[1, 2]).await;
        assert!(
            store.try_write(v, 3).await.is_err(),
            "a replica took a tenant write"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = instance(env, &ids[0]).await;
        if r["replication"]["role"] == "replica" {
            break;
        }
        assert!(Instant::now() < deadline, "no replica role shown: {r}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Switchover under a continuous writer.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = spawn_writer(store, views.clone(), stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let new = ids[0].clone();
    action(env, &new, "promote_to_replica_source").await;
    wait_source(env, &new).await;
    for id in [&src, &ids[1]] {
        env.wait_status(id, "ACTIVE", Duration::from_secs(120))
            .await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acked = writer.await.unwrap();
    assert!(acked.len() > 10, "the writer wrote only {}", acked.len());
    let n = instance(env, &new).await;
    assert_eq!(n["replication"]["role"], "source", "{n}");
    assert_eq!(instance(env, &src).await["replica_of"]["id"], new.as_str());
    assert_eq!(
        instance(env, &ids[1]).await["replica_of"]["id"],
        new.as_str()
    );
    let on_new = store.read(env, &views[1]).await;
    let lost: Vec<_> = acked.iter().filter(|i| !on_new.contains(i)).collect();
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    // The old source and the other replica follow the new source; the old one is read-only.
    store.write(env, &views[1], 99_999).await;
    let want = store.read(env, &views[1]).await;
    store.wait_read(&sview, &want).await;
    store.wait_read(&views[2], &want).await;
    assert!(
        store.try_write(&sview, 99_998).await.is_err(),
        "the old source took a tenant write"
    );

    // The new source's host dies: eject elects a replica; the other follows it.
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let agent = env.agent_pid(&new).expect("the new source's agent");
    let db = env.db_pid(&new).expect("the new source's server");
    kill(Pid::from_raw(agent), Signal::SIGKILL).unwrap();
    kill(Pid::from_raw(db), Signal::SIGKILL).unwrap();
    env.wait_status(&new, "ERROR", Duration::from_secs(30))
        .await;
    action(env, &new, "eject_replica_source").await;
    let survivors = [
        (src.clone(), sview.clone()),
        (ids[1].clone(), views[2].clone()),
    ];
    let deadline = Instant::now() + Duration::from_secs(120);
    let (wview, other, oview) = loop {
        let a = instance(env, &survivors[0].0).await;
        let b = instance(env, &survivors[1].0).await;
        let settled = |x: &Value| x["status"] == "ACTIVE";
        if settled(&a) && settled(&b) {
            if a.get("replica_of").is_none() && b["replica_of"]["id"] == survivors[0].0.as_str() {
                break (&survivors[0].1, &survivors[1].0, &survivors[1].1);
            }
            if b.get("replica_of").is_none() && a["replica_of"]["id"] == survivors[1].0.as_str() {
                break (&survivors[1].1, &survivors[0].0, &survivors[0].1);
            }
        }
        assert!(
            Instant::now() < deadline,
            "no new source elected:\n{a}\n{b}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let old = instance(env, &new).await;
    assert!(
        old["fault"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("Ejected"),
        "{old}"
    );
    // Nothing acknowledged before the failure is lost; the winner takes writes and the other
    // replicates them.
    let have = store.read(env, wview).await;
    assert!(
        want.iter().all(|i| have.contains(i)),
        "the winner lost writes: {have:?}"
    );
    store.write(env, wview, 77_777).await;
    let want = store.read(env, wview).await;
    store.wait_read(oview, &want).await;
    assert!(
        store.try_write(oview, 77_778).await.is_err(),
        "{other} took a write"
    );
}

impl Store {
    /// How the server words its refusal of a write on a read-only (fenced) server.
    fn refusal(self) -> &'static str {
        match self {
            Store::Mariadb => "read-only",
            Store::Postgresql => "read-only transaction",
            Store::Redis => "NOREPLICAS",
        }
    }

    /// A tenant tries to lift the fence from its own session, then to write; Err is the write's
    /// refusal.
    async fn undo_fence_and_write(self, view: &Value, i: i32) -> Result<(), String> {
        use sqlx::Connection;
        let e = |e: &dyn std::fmt::Display| e.to_string();
        match self {
            Store::Mariadb => {
                let mut c = Self::mysql(view).await?;
                let _ = sqlx::query("SET GLOBAL read_only = OFF")
                    .execute(&mut c)
                    .await;
                let r = sqlx::query("INSERT INTO t VALUES (?)")
                    .bind(i)
                    .execute(&mut c)
                    .await;
                let _ = c.close().await;
                r.map(|_| ()).map_err(|x| e(&x))
            }
            Store::Postgresql => {
                let mut c = Self::pg(view).await.map_err(|x| e(&x))?;
                let _ = sqlx::query("SET default_transaction_read_only = off")
                    .execute(&mut c)
                    .await;
                let _ = sqlx::query("SET transaction_read_only = off")
                    .execute(&mut c)
                    .await;
                let r = sqlx::query("INSERT INTO t VALUES ($1)")
                    .bind(i)
                    .execute(&mut c)
                    .await;
                let _ = c.close().await;
                r.map(|_| ()).map_err(|x| e(&x))
            }
            Store::Redis => {
                let mut c = Self::redis(view).await.map_err(|x| e(&x))?;
                let _ = redis::cmd("CONFIG")
                    .arg("SET")
                    .arg("min-replicas-to-write")
                    .arg("0")
                    .query_async::<()>(&mut c)
                    .await;
                let _ = redis::cmd("CLIENT")
                    .arg("UNPAUSE")
                    .query_async::<()>(&mut c)
                    .await;
                redis::cmd("SADD")
                    .arg("t")
                    .arg(i)
                    .query_async::<i64>(&mut c)
                    .await
                    .map(|_| ())
                    .map_err(|x| e(&x))
            }
        }
    }

    /// Waits until a tenant write is refused the way a read-only server refuses it (not merely
    /// failing to connect, as while a server restarts).
    async fn wait_refused(self, view: &Value, i: i32) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.undo_fence_and_write(view, i).await {
                Err(e) if e.contains(self.refusal()) => return,
                other => assert!(
                    Instant::now() < deadline,
                    "a tenant write is not refused as read-only: {other:?}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Fencing: a source cut off from the controller makes itself read-only before the controller
/// declares it lost, in a way no tenant session can undo; after the eject the replica is the
/// only writable server, and the old source stays fenced once the partition heals. Needs an
/// environment with the NATS proxy and no agent respawns.
pub async fn fencing(env: &Env, store: Store) {
    let proxy = env
        .proxy
        .as_ref()
        .expect("an environment with the NATS proxy");
    let version = store.register(env);
    let (src, sview) = create_active(env, store, &version, "scn-fence").await;
    store.write(env, &sview, 1).await;
    let (st, v) = env
        .call(
            "POST",
            "/instances",
            Some(json!({"instance": {"name": "scn-fence-rep", "replica_of": src}})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let rid = instance(env, &src).await["replicas"][0]["id"]
        .as_str()
        .expect("a replica")
        .to_string();
    let rview = env
        .wait_status(&rid, "ACTIVE", Duration::from_secs(180))
        .await;
    store.wait_read(&rview, &[1]).await;

    proxy.cut(&src);
    let deadline = Instant::now() + Duration::from_secs(30);
    for n in 1000.. {
        let seen = instance(env, &src).await;
        let lost = seen["status"] == "ERROR";
        if store.try_write(&sview, n).await.is_err() {
            break;
        }
        assert!(
            !lost,
            "the controller declared the source lost before it fenced itself: {seen}\n--- the source's agent log ---\n{}",
            env.logs(&src)
        );
        assert!(Instant::now() < deadline, "the source never fenced itself");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Refused as read-only, even after the tenant tries to lift it.
    store.wait_refused(&sview, 2).await;

    env.wait_status(&src, "ERROR", Duration::from_secs(30))
        .await;
    action(env, &src, "eject_replica_source").await;
    wait_source(env, &rid).await;
    store.write(env, &rview, 10).await;

    // Healed: the old source reports back fenced and stays so.
    proxy.heal(&src);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let o = instance(env, &src).await;
        if o["replication"]["role"] == "fenced" && o["service_status_updated"].is_string() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the old source never reported back: {o}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    store.wait_refused(&sview, 12).await;
    assert_eq!(instance(env, &src).await["status"], "ERROR");
}
