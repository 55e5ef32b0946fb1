//! Enrolment of hosts the controller did not provision: an administrator's one-time token, the
//! agent's `enroll` (key first, then the token binds to it), the instance in the API, ACTIVE
//! once the agent runs; retries get the same instance and credentials; a second host, an unknown
//! or expired token, and a host whose database port is taken are refused and change nothing.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use coffer_tests::{alloc_ports, bin, Env, StatusCode};
use serde_json::{json, Value};
use sqlx::Connection;

/// A host's agent config: its own state dir and database port, nothing else.
fn host(dir: &Path, name: &str, port: u16) -> PathBuf {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    let cfg = d.join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "state_dir = {:?}\nguest_log_file = {:?}\n[listen]\nbind_address = \"127.0.0.1\"\nport = {port}\n",
            d.join("state").display().to_string(),
            d.join("agent.log").display().to_string(),
        ),
    )
    .unwrap();
    cfg
}

fn enroll(env: &Env, cfg: &Path, token_file: &Path) -> (bool, String) {
    let out = Command::new(bin("coffer-agent"))
        .arg("--config")
        .arg(cfg)
        .args(["enroll", "--insecure", "--patience-s", "5", "--controller"])
        .arg(format!("http://127.0.0.1:{}", env.api_port))
        .arg("--token-file")
        .arg(token_file)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

async fn new_token(env: &Env, name: &str) -> String {
    let (st, v) = env
        .call_as(
            &env.admin_token,
            "POST",
            &format!("{}/mgmt/enrolment-tokens", env.base()),
            Some(
                json!({"enrolment_token": {"name": name, "flavorRef": "1", "volume": {"size": 2}}}),
            ),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let t = v["enrolment_token"]["token"].as_str().unwrap().to_string();
    assert!(t.starts_with("coffer-enrol-"), "{v}");
    t
}

async fn instance_count(env: &Env) -> usize {
    let (_, v) = env.call("GET", "/instances", None).await;
    v["instances"].as_array().unwrap().len()
}

struct Agent(Child);
impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_enrols_with_a_one_time_token_and_becomes_an_instance() {
    let env = Env::start().await;
    let dir = env.dir.path().join("hosts");
    let ports = alloc_ports(3);

    // Only an administrator creates tokens; bad input is refused.
    let body = json!({"enrolment_token": {"name": "db-host-1", "flavorRef": "1"}});
    let (st, v) = env
        .call("POST", "/mgmt/enrolment-tokens", Some(body.clone()))
        .await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{v}");
    let (st, v) = env
        .call_as(
            &env.admin_token,
            "POST",
            &format!("{}/mgmt/enrolment-tokens", env.base()),
            Some(json!({"enrolment_token": {"name": "x", "flavorRef": "nope"}})),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    let token = new_token(&env, "db-host-1").await;
    let token_file = dir.join("token");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(&token_file, format!("{token}\n")).unwrap();

    // An unknown token: refused, nothing created.
    let bogus = dir.join("bogus");
    std::fs::write(&bogus, "coffer-enrol-00ff").unwrap();
    let a = host(&dir, "a", ports[0]);
    let (ok, out) = enroll(&env, &a, &bogus);
    assert!(!ok && out.contains("not known"), "{out}");
    assert_eq!(instance_count(&env).await, 0);

    // A host whose database port already has a server: refused before contacting anyone.
    let busy = std::net::TcpListener::bind(("127.0.0.1", ports[2])).unwrap();
    let b = host(&dir, "busy", ports[2]);
    let (ok, out) = enroll(&env, &b, &token_file);
    assert!(
        !ok && out.contains("already has a server listening"),
        "{out}"
    );
    drop(busy);
    assert_eq!(instance_count(&env).await, 0);

    // Host A enrols: the instance appears, named by the token.
    let (ok, out) = enroll(&env, &a, &token_file);
    assert!(ok, "{out}");
    let id = out
        .split("enrolled as instance ")
        .nth(1)
        .and_then(|s| s.split(';').next())
        .unwrap()
        .to_string();
    let (st, v) = env.show(&id).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["instance"]["name"], "db-host-1");
    assert_eq!(v["instance"]["volume"]["size"], 2);
    assert_eq!(v["instance"]["port"], ports[0]);
    let state = dir.join("a/state");
    let creds = std::fs::read_to_string(state.join("nats.creds")).unwrap();
    assert!(creds.contains("NATS USER JWT"), "{creds}");
    let key = std::fs::read(state.join("agent.key")).unwrap();

    // A retry (the answer was lost): same key, same instance, same credentials.
    std::fs::remove_file(state.join("enrolment.toml")).unwrap();
    std::fs::remove_file(state.join("nats.creds")).unwrap();
    let (ok, out) = enroll(&env, &a, &token_file);
    assert!(ok, "{out}");
    assert!(out.contains(&id), "{out}");
    assert_eq!(
        std::fs::read_to_string(state.join("nats.creds")).unwrap(),
        creds
    );
    assert_eq!(std::fs::read(state.join("agent.key")).unwrap(), key);
    assert_eq!(instance_count(&env).await, 1);

    // The token is single-use: another host (another key) is refused.
    let c = host(&dir, "c", ports[1]);
    let (ok, out) = enroll(&env, &c, &token_file);
    assert!(!ok && out.contains("already used by another host"), "{out}");
    assert_eq!(instance_count(&env).await, 1);

    // The agent runs: it prepares the database and the instance becomes ACTIVE.
    let log = std::fs::File::create(dir.join("a/agent.out")).unwrap();
    let _agent = Agent(
        Command::new(bin("coffer-agent"))
            .arg("--config")
            .arg(&a)
            .arg("run")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let view = wait_active(&env, &id, &dir.join("a/agent.out")).await;
    // Root, enabled through the API, reaches the enrolled host's database.
    let (st, v) = env
        .call("POST", &format!("/instances/{id}/root"), None)
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let pw = v["user"]["password"].as_str().unwrap().to_string();
    let mut conn = env.connect(&view, "root", &pw, "mysql").await;
    let one: i64 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(one, 1);
    conn.close().await.unwrap();

    // Deleting it stops the database on the host; the controller forgets it.
    env.delete_and_wait_gone(&id).await;
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", ports[0])).is_err(),
        "the database still listens after delete"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_is_refused() {
    let env = Env::start().await;
    let out = Command::new(bin("coffer-controller"))
        .arg("--config")
        .arg(env.config_path())
        .args([
            "manage",
            "enrolment-token-create",
            "--project",
            &env.project,
            "--name",
            "late",
            "--flavor",
            "1",
            "--version",
        ])
        .arg(mariadb_label())
        .args(["--ttl", "1"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let dir = env.dir.path().join("hosts");
    std::fs::create_dir_all(&dir).unwrap();
    let token_file = dir.join("token");
    std::fs::write(&token_file, &token).unwrap();
    let a = host(&dir, "a", alloc_ports(1)[0]);
    let (ok, out) = enroll(&env, &a, &token_file);
    assert!(!ok && out.contains("expired"), "{out}");
    assert_eq!(instance_count(&env).await, 0);
}

async fn wait_active(env: &Env, id: &str, agent_log: &Path) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let (_, v) = env.show(id).await;
        if v["instance"]["status"] == "ACTIVE" {
            return v["instance"].clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not ACTIVE: {v}\n{}",
            std::fs::read_to_string(agent_log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn mariadb_label() -> String {
    let out = Command::new("/usr/sbin/mariadbd")
        .arg("--version")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    text.split("Ver ")
        .nth(1)
        .unwrap_or("")
        .split('.')
        .take(2)
        .collect::<Vec<_>>()
        .join(".")
}
