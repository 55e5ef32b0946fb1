//! `cargo xtask demo`: stop it with SIGINT (everything it started stops, databases cleanly) and run
//! it again: the same instance comes back with the row written before.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use coffer_tests::{bin, pid_alive, StatusCode};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use sqlx::{ConnectOptions, Connection, Row};

/// A running demo. Dropped while a test panics, it is stopped (SIGINT, then SIGKILL for it and
/// whatever still runs from its directory), so a failed test leaves no server behind; a test
/// that gets through stops it with [`stop_demo`], which checks the stop.
struct Demo {
    child: Option<Child>,
    dir: std::path::PathBuf,
    /// Held while the demo runs: see [`one_demo_at_a_time`].
    _turn: std::fs::File,
}

impl Drop for Demo {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(60);
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        for (pid, _) in running_from(&self.dir) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// The demo gives its instances ports from one fixed range (13306..13405): two demos at once on
/// one machine can hand the same port to two servers, so the demo tests take turns (a lock on
/// a file, across test processes).
fn one_demo_at_a_time() -> std::fs::File {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(std::env::temp_dir().join("coffer-demo-tests.lock"))
        .unwrap();
    f.lock().unwrap();
    f
}

/// Live processes whose command line names `dir` (pid, command line).
fn running_from(dir: &Path) -> Vec<(i32, String)> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
        .filter(|p| pid_alive(*p))
        .filter_map(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .ok()
                .map(|c| (p, String::from_utf8_lossy(&c).replace('\0', " ")))
        })
        .filter(|(_, c)| c.contains(&*dir.to_string_lossy()))
        .collect()
}

fn start_demo(dir: &Path) -> Demo {
    start_demo_with(dir, &[])
}

fn start_demo_with(dir: &Path, extra: &[&str]) -> Demo {
    let turn = one_demo_at_a_time();
    let _ = std::fs::remove_file(dir.join("demo.env"));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("xtask.log"))
        .unwrap();
    let child = Command::new(bin("xtask"))
        .args(["demo", "--no-build"])
        .args(extra)
        .arg("--dir")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !dir.join("demo.env").exists() {
        assert!(
            Instant::now() < deadline,
            "demo did not come up: {}",
            std::fs::read_to_string(dir.join("xtask.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Demo {
        child: Some(child),
        dir: dir.to_path_buf(),
        _turn: turn,
    }
}

fn stop_demo(mut demo: Demo, dir: &Path) {
    let mut child = demo.child.take().unwrap();
    kill(Pid::from_raw(child.id() as i32), Signal::SIGINT).unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            assert!(st.success(), "demo exited with {st}");
            break;
        }
        assert!(Instant::now() < deadline, "demo did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Nothing it started is left.
    let leftovers: Vec<String> = running_from(dir)
        .into_iter()
        .map(|(p, c)| format!("{p}: {c}"))
        .collect();
    assert!(leftovers.is_empty(), "processes left behind: {leftovers:?}");
    // The instances still there were shut down cleanly.
    for e in std::fs::read_dir(dir.join("instances")).unwrap().flatten() {
        let err_log = std::fs::read_to_string(e.path().join("state/mariadb/mariadbd.err"))
            .unwrap_or_default();
        assert!(
            err_log.contains("Shutdown complete"),
            "databases were shut down cleanly: {err_log}"
        );
    }
}

fn env_of(dir: &Path) -> (String, String) {
    let text = std::fs::read_to_string(dir.join("demo.env")).unwrap();
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap()
            .to_string()
    };
    (get("COFFER_ENDPOINT"), get("COFFER_TOKEN"))
}

/// `POST /instances` with `body`: the new instance's id and URL.
async fn create(
    http: &reqwest::Client,
    endpoint: &str,
    token: &str,
    body: Value,
) -> (String, String) {
    let r = http
        .post(format!("{endpoint}/instances"))
        .header("X-Auth-Token", token)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let id = r.json::<Value>().await.unwrap()["instance"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let url = format!("{endpoint}/instances/{id}");
    (id, url)
}

async fn wait_active(http: &reqwest::Client, url: &str, token: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let r = http
            .get(url)
            .header("X-Auth-Token", token)
            .send()
            .await
            .unwrap();
        let v: Value = r.json().await.unwrap();
        if v["instance"]["status"] == "ACTIVE" {
            return v["instance"].clone();
        }
        assert!(Instant::now() < deadline, "not ACTIVE: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn connect(v: &Value) -> sqlx::MySqlConnection {
    sqlx::mysql::MySqlConnectOptions::new()
        .host(v["ip"][0].as_str().unwrap())
        .port(v["port"].as_u64().unwrap() as u16)
        .username("app")
        .password("pw-demo-1")
        .database("shop")
        .connect()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_stops_cleanly_and_resumes_with_the_data() {
    let tmp = tempfile::Builder::new()
        .prefix("coffer-demo-")
        .tempdir()
        .unwrap();
    let dir = tmp.path();
    let http = reqwest::Client::new();

    let demo = start_demo(dir);
    let (endpoint, token) = env_of(dir);
    // NATS runs with authorization on: no credentials, no connection.
    let state = std::fs::read_to_string(dir.join("demo.state")).unwrap();
    let nats_port = state
        .lines()
        .find_map(|l| l.strip_prefix("nats_port="))
        .unwrap();
    let anonymous = async_nats::connect(format!("nats://127.0.0.1:{nats_port}")).await;
    assert!(
        anonymous.is_err(),
        "the demo's NATS refuses clients without credentials"
    );
    let (id, url) = create(&http, &endpoint, &token, json!({"instance": {"name": "demo1", "flavorRef": "1", "volume": {"size": 1},
            "databases": [{"name": "shop"}], "users": [{"name": "app", "password": "pw-demo-1", "databases": [{"name": "shop"}]}]}})).await;
    let v = wait_active(&http, &url, &token).await;
    // The demo runs as root; its database does not (each instance has a Unix user of its own).
    let inst_dir = dir.join("instances").join(&id).display().to_string();
    let server_uid = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .find_map(|e| {
            use std::os::unix::fs::MetadataExt;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            (cmd.contains("mariadbd") && cmd.contains(&inst_dir))
                .then(|| e.metadata().ok().map(|m| m.uid()))
                .flatten()
        })
        .expect("the demo instance's mariadbd runs");
    assert_ne!(
        server_uid, 0,
        "the demo's mariadbd runs as its instance's user"
    );
    let mut c = connect(&v).await;
    sqlx::query("CREATE TABLE t (s VARCHAR(10))")
        .execute(&mut c)
        .await
        .unwrap();
    sqlx::query("INSERT INTO t VALUES ('kept')")
        .execute(&mut c)
        .await
        .unwrap();
    c.close().await.unwrap();
    stop_demo(demo, dir);

    let demo = start_demo(dir);
    let (endpoint2, token2) = env_of(dir);
    assert_eq!(
        (endpoint2, token2.clone()),
        (endpoint, token.clone()),
        "ports and tokens persist"
    );
    let v = wait_active(&http, &url, &token2).await;
    let mut c = connect(&v).await;
    let s: String = sqlx::query("SELECT s FROM t")
        .fetch_one(&mut c)
        .await
        .unwrap()
        .get(0);
    assert_eq!(s, "kept");
    c.close().await.unwrap();
    // Deleted: its Unix user goes with it (nothing of the test stays on the machine).
    delete_and_wait_gone(&http, &url, &token2).await;
    stop_demo(demo, dir);
}

/// `--store postgres`: the controller's store on a PostgreSQL server the demo runs (as the
/// postgres user), stopped with it and found again, with its instances, on the next run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_on_a_postgresql_store_of_its_own() {
    let tmp = tempfile::Builder::new()
        .prefix("coffer-demo-pg-")
        .tempdir()
        .unwrap();
    let dir = tmp.path();
    let http = reqwest::Client::new();
    let demo = start_demo_with(dir, &["--store", "postgres"]);
    let (endpoint, token) = env_of(dir);
    let config = std::fs::read_to_string(dir.join("controller.toml")).unwrap();
    assert!(config.contains("[store]"), "{config}");
    let password = std::fs::read_to_string(dir.join("store.password")).unwrap();
    assert!(
        !config.contains(password.trim()),
        "the password stays out of the config"
    );
    let (_, url) = create(
        &http,
        &endpoint,
        &token,
        json!({"instance": {"name": "pgdemo", "flavorRef": "1", "volume": {"size": 1}}}),
    )
    .await;
    wait_active(&http, &url, &token).await;
    stop_demo(demo, dir);

    // Started again, the store (and so the instance) is there.
    let demo = start_demo_with(dir, &["--store", "postgres"]);
    wait_active(&http, &url, &token).await;
    delete_and_wait_gone(&http, &url, &token).await;
    stop_demo(demo, dir);
}

/// Deletes the instance at `url` (202) and waits until it answers 404.
async fn delete_and_wait_gone(http: &reqwest::Client, url: &str, token: &str) {
    let r = http
        .delete(url)
        .header("X-Auth-Token", token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = http
            .get(url)
            .header("X-Auth-Token", token)
            .send()
            .await
            .unwrap();
        if r.status() == StatusCode::NOT_FOUND {
            break;
        }
        assert!(Instant::now() < deadline, "the instance was not deleted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
