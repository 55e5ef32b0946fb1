//! TLS for NATS and the HTTP API, configured by file paths: the whole lifecycle runs over it, and
//! plain-text or unverified clients are refused.

use std::process::Command;
use std::time::{Duration, Instant};

use coffer_tests::{Env, Opts};
use serde_json::{json, Value};

/// curl with the test CA; returns (HTTP status, JSON body). Status 0 means no HTTP answer.
fn curl(env: &Env, method: &str, url: &str, body: Option<&Value>, ca: bool) -> (u16, Value) {
    let mut c = Command::new("curl");
    c.args(["-s", "-m", "10", "-w", "\n%{http_code}", "-X", method, "-H"])
        .arg(format!("X-Auth-Token: {}", env.token))
        .args(["-H", "Content-Type: application/json"]);
    if ca {
        c.arg("--cacert").arg(env.dir.path().join("tls/ca.pem"));
    }
    if let Some(b) = body {
        c.arg("-d").arg(b.to_string());
    }
    let out = c.arg(url).output().expect("running curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (
        code.trim().parse().unwrap_or(0),
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_over_tls_and_plain_clients_are_refused() {
    let env = Env::start_with(Opts {
        tls: true,
        ..Default::default()
    })
    .await;
    let base = format!("https://127.0.0.1:{}/v1.0/{}", env.api_port, env.project);
    let (code, v) = curl(
        &env,
        "POST",
        &format!("{base}/instances"),
        Some(&json!({"instance": {"name": "tls1", "flavorRef": "1", "volume": {"size": 1}}})),
        true,
    );
    assert_eq!(code, 200, "{v}");
    let id = v["instance"]["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, v) = curl(&env, "GET", &format!("{base}/instances/{id}"), None, true);
        if v["instance"]["status"] == "ACTIVE" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not ACTIVE over TLS: {v}\n{}",
            env.logs(&id)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The agent reached NATS over TLS (its config names the CA).
    let agent_cfg = std::fs::read_to_string(env.instance_dir(&id).join("agent.toml")).unwrap();
    assert!(agent_cfg.contains("nats_ca_file"), "{agent_cfg}");

    // Plain HTTP to the HTTPS port, and HTTPS without trusting the CA: no answer.
    let (code, _) = curl(
        &env,
        "GET",
        &format!(
            "http://127.0.0.1:{}/v1.0/{}/instances",
            env.api_port, env.project
        ),
        None,
        false,
    );
    assert_eq!(code, 0, "plain HTTP is not served");
    let (code, _) = curl(&env, "GET", &format!("{base}/instances"), None, false);
    assert_eq!(
        code, 0,
        "an unverified certificate is refused by the client"
    );
    // NATS without TLS: refused.
    let plain = async_nats::ConnectOptions::with_credentials_file(
        env.dir.path().join("nats-auth/controller.creds"),
    )
    .await
    .unwrap()
    .connect(env.nats.url())
    .await;
    assert!(plain.is_err(), "NATS requires TLS");
    let _ = env.nats_client().await; // with the CA it works

    // Fifty clients open a TCP connection to the HTTPS port and never speak: their handshakes
    // wait on their own, and a real client is answered at once.
    let idle: Vec<std::net::TcpStream> = (0..50)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", env.api_port)).unwrap())
        .collect();
    let asked = Instant::now();
    let (code, v) = curl(&env, "GET", &format!("{base}/instances"), None, true);
    let took = asked.elapsed();
    assert_eq!(code, 200, "{v}");
    assert!(
        took < Duration::from_secs(1),
        "the API answered only after {took:?} with 50 idle connections open"
    );
    drop(idle);

    let (code, _) = curl(
        &env,
        "DELETE",
        &format!("{base}/instances/{id}"),
        None,
        true,
    );
    assert_eq!(code, 202);
}
