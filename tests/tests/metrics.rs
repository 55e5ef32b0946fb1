//! The operator's `/metrics` as Prometheus scrapes it: the series move with what happens to the
//! fleet (a backup resets the backup age, a replica's lag rises and falls, a failover fences the
//! old source), the text passes `promtool check metrics`, and the alert rules and the Grafana
//! dashboard in packaging/monitoring name only series the controller serves.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use coffer_tests::{Env, Opts};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use reqwest::StatusCode;
use serde_json::{json, Value};

fn promtool() -> PathBuf {
    std::env::var_os("COFFER_PROMTOOL")
        .map(PathBuf::from)
        .expect("COFFER_PROMTOOL names promtool (cargo xtask test sets it)")
}

fn monitoring(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../packaging/monitoring")
        .join(file)
}

/// A scrape with the operator's token, as Prometheus sends it.
async fn scrape(env: &Env) -> String {
    let resp = env
        .http
        .get(format!("http://127.0.0.1:{}/metrics", env.api_port))
        .bearer_auth(&env.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let text = resp.text().await.unwrap();
    SEEN.lock().unwrap().extend(families(&text));
    text
}

/// Every family the scrapes of this process declared (a family appears once it has a series).
static SEEN: std::sync::Mutex<BTreeSet<String>> = std::sync::Mutex::new(BTreeSet::new());

/// The value of `name` for `instance` (None: no such series).
fn value(text: &str, name: &str, instance: &str) -> Option<f64> {
    let label = format!("instance=\"{instance}\"");
    text.lines()
        .find(|l| l.starts_with(&format!("{name}{{")) && l.contains(&label))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Scrapes until `name` of `instance` satisfies `pred`; returns its value.
async fn wait_metric(
    env: &Env,
    name: &str,
    instance: &str,
    what: &str,
    pred: impl Fn(f64) -> bool,
) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let text = scrape(env).await;
        if let Some(v) = value(&text, name, instance).filter(|v| pred(*v)) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{name} of {instance}: {what} not seen; last scrape:\n{}",
            text.lines()
                .filter(|l| l.starts_with(name))
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn insert(env: &Env, view: &Value, i: i32) {
    let mut c = env.connect(view, "app", "s3cret-Pw", "shop").await;
    sqlx::query("INSERT INTO t VALUES (?)")
        .bind(i)
        .execute(&mut c)
        .await
        .unwrap();
}

async fn backup(env: &Env, id: &str, name: &str) {
    let (st, v) = env
        .call(
            "POST",
            "/backups",
            Some(json!({"backup": {"name": name, "instance": id}})),
        )
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    env.wait_backup(v["backup"]["id"].as_str().unwrap(), "COMPLETED")
        .await;
}

/// `promtool check metrics` on a scrape's text: the format and Prometheus's naming rules.
fn promtool_accepts(text: &str) {
    let mut p = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    p.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = p.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The series a scrape declares (its `# TYPE` names).
fn families(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_string)
        .collect()
}

/// Every `coffer_...` name in `text` whose family the scrape does not declare.
fn unknown_names(text: &str, declared: &BTreeSet<String>) -> Vec<String> {
    let mut out = vec![];
    let mut rest = text;
    while let Some(i) = rest.find("coffer_") {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[i + name.len()..];
        let family = ["_total", "_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name);
        if !declared.contains(family) && !declared.contains(&name) {
            out.push(name);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_series_follow_backups_replicas_and_a_failover() {
    // A dead host stays dead (its agent is not started again).
    let env = Env::start_with(Opts {
        respawn_agents: false,
        ..Opts::default()
    })
    .await;
    let (src, sview) = env.active_with_rows("metrics-src", &[1]).await;
    wait_metric(&env, "coffer_instance_up", &src, "up", |v| v == 1.0).await;
    let text = scrape(&env).await;
    assert!(
        text.lines()
            .any(|l| l.starts_with("coffer_instance_status{")
                && l.contains(&format!("instance=\"{src}\""))
                && l.contains("status=\"ACTIVE\"")),
        "{text}"
    );

    // A backup: its time and size appear, and a later one moves the time on.
    backup(&env, &src, "m1").await;
    let first = wait_metric(
        &env,
        "coffer_backup_last_success_timestamp_seconds",
        &src,
        "a first backup",
        |_| true,
    )
    .await;
    assert!(value(&scrape(&env).await, "coffer_backup_last_size_bytes", &src).unwrap() > 0.0);
    insert(&env, &sview, 2).await;
    backup(&env, &src, "m2").await;
    wait_metric(
        &env,
        "coffer_backup_last_success_timestamp_seconds",
        &src,
        "the second backup's time",
        |t| t > first,
    )
    .await;
    let text = scrape(&env).await;
    assert!(
        text.lines().any(|l| l
            .starts_with("coffer_intents_total{kind=\"backup\",outcome=\"done\"}")
            && l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) >= Some(2.0)),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("coffer_intent_duration_seconds_count{kind=\"backup\"}")),
        "{text}"
    );
    // Routes are templates: no id of anything in a label but the instance's own.
    assert!(
        text.lines()
            .any(|l| l.starts_with("coffer_api_requests_total{")
                && l.contains("route=\"/v1.0/{project}/backups\"")),
        "{text}"
    );
    for l in text.lines().filter(|l| l.contains("route=")) {
        assert!(!l.contains(&src), "an id in a route label: {l}");
    }

    // A daily schedule: its interval and next run; a drill: its result.
    let (st, v) = env
        .call(
            "POST",
            "/backup_schedules",
            Some(json!({"backup_schedule": {"instance": src, "name": "daily", "pattern": "0 3 * * *", "keep_last": 7}})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    wait_metric(
        &env,
        "coffer_backup_schedule_interval_seconds",
        &src,
        "a day between runs",
        |v| v == 86400.0,
    )
    .await;
    assert!(
        value(
            &scrape(&env).await,
            "coffer_backup_schedule_next_run_timestamp_seconds",
            &src
        )
        .unwrap()
            > first
    );
    let drill = env.start_drill(&src).await;
    let d = env.wait_drill(&drill).await;
    assert_eq!(d["restore_drill"]["status"], "PASSED", "{d}");
    wait_metric(
        &env,
        "coffer_restore_drill_last_passed",
        &src,
        "passed",
        |v| v == 1.0,
    )
    .await;

    // A replica: its lag rises while it does not apply, and falls when it applies again.
    let (st, v) = env
        .call(
            "POST",
            "/instances",
            Some(json!({"instance": {"name": "metrics-rep", "replica_of": src}})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let rep = v["instance"]["id"].as_str().unwrap().to_string();
    env.wait_status(&rep, "ACTIVE", Duration::from_secs(120))
        .await;
    wait_metric(
        &env,
        "coffer_replication_sql_running",
        &rep,
        "applying",
        |v| v == 1.0,
    )
    .await;
    let text = scrape(&env).await;
    assert!(
        text.lines().any(|l| l.starts_with("coffer_instance_up{")
            && l.contains(&format!("instance=\"{rep}\""))
            && l.contains("role=\"replica\"")),
        "{text}"
    );
    assert!(
        text.lines().any(|l| l.starts_with("coffer_instance_up{")
            && l.contains(&format!("instance=\"{src}\""))
            && l.contains("role=\"source\"")),
        "{text}"
    );
    // Caught up: no lag in time (the server knows none while it does not apply).
    wait_metric(
        &env,
        "coffer_replication_lag_seconds",
        &rep,
        "no lag in time",
        |v| v == 0.0,
    )
    .await;
    let mut rc = env.admin_connect(&rep).await;
    sqlx::query("STOP SLAVE SQL_THREAD")
        .execute(&mut rc)
        .await
        .unwrap();
    for i in 10..15 {
        insert(&env, &sview, i).await;
    }
    wait_metric(
        &env,
        "coffer_replication_lag_transactions",
        &rep,
        "lag while not applying",
        |v| v >= 5.0,
    )
    .await;
    wait_metric(
        &env,
        "coffer_replication_sql_running",
        &rep,
        "not applying",
        |v| v == 0.0,
    )
    .await;
    sqlx::query("START SLAVE SQL_THREAD")
        .execute(&mut rc)
        .await
        .unwrap();
    drop(rc);
    wait_metric(
        &env,
        "coffer_replication_lag_transactions",
        &rep,
        "lag gone once applying",
        |v| v == 0.0,
    )
    .await;
    assert_eq!(
        value(&scrape(&env).await, "coffer_instance_fenced", &src),
        Some(0.0)
    );

    // The source's host dies; the eject promotes the replica and fences the old source.
    kill(Pid::from_raw(env.agent_pid(&src).unwrap()), Signal::SIGKILL).unwrap();
    kill(Pid::from_raw(env.db_pid(&src).unwrap()), Signal::SIGKILL).unwrap();
    wait_metric(&env, "coffer_instance_up", &src, "down", |v| v == 0.0).await;
    env.wait_status(&src, "ERROR", Duration::from_secs(30))
        .await;
    let (st, v) = env.action(&src, json!({"eject_replica_source": {}})).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    wait_metric(&env, "coffer_instance_fenced", &src, "fenced", |v| v == 1.0).await;
    env.wait_status(&rep, "ACTIVE", Duration::from_secs(60))
        .await;
    let text = scrape(&env).await;
    assert!(
        text.lines()
            .any(|l| l.starts_with("coffer_workflow_steps_total{")),
        "{text}"
    );

    // The format, and the names the packaged rules and dashboard use (every family seen).
    promtool_accepts(&text);
    let declared = SEEN.lock().unwrap().clone();
    for file in ["coffer-alerts.yml", "coffer-dashboard.json"] {
        let body = std::fs::read_to_string(monitoring(file)).unwrap();
        let unknown = unknown_names(&body, &declared);
        assert!(
            unknown.is_empty(),
            "{file} names series /metrics does not serve: {unknown:?}"
        );
    }
}

#[test]
fn the_alert_rules_pass_promtool_and_the_dashboard_is_json() {
    let out = Command::new(promtool())
        .args(["check", "rules"])
        .arg(monitoring("coffer-alerts.yml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let d: Value = serde_json::from_str(
        &std::fs::read_to_string(monitoring("coffer-dashboard.json")).unwrap(),
    )
    .unwrap();
    let panels = d["panels"].as_array().unwrap();
    let rows: Vec<&str> = panels
        .iter()
        .filter(|p| p["type"] == "row")
        .filter_map(|p| p["title"].as_str())
        .collect();
    assert_eq!(rows, ["Fleet", "Instance $instance", "Control plane"]);
    for p in panels.iter().filter(|p| p["type"] != "row") {
        assert!(
            p["targets"].as_array().is_some_and(|t| !t.is_empty()),
            "a panel without a query: {p}"
        );
    }
}

/// `COFFER_LOG_FORMAT=json`: the controller's and the agents' logs are one JSON object a line,
/// carrying the instance's and the intent's ids, and the trace of the API request behind an
/// intent (W3C `traceparent`, carried in the intent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_instance_intent_and_trace_ids() {
    let mut env = Env::start().await;
    env.stop_controller();
    // The agents it places inherit its environment.
    env.start_controller_with(&[("COFFER_LOG_FORMAT", "json")]);
    // The caller's trace: the answer names it (with a span of the controller's own), and the
    // agent's log of the intent the request queued carries it.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let resp = env
        .http
        .post(format!("{}/instances", env.base()))
        .header("X-Auth-Token", &env.token)
        .header("traceparent", format!("00-{trace}-00f067aa0ba902b7-01"))
        .json(&json!({"instance": {"name": "json-logs", "flavorRef": "1", "volume": {"size": 1}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let answered = resp.headers()["traceparent"].to_str().unwrap().to_string();
    assert!(
        answered.starts_with(&format!("00-{trace}-")) && !answered.contains("00f067aa0ba902b7"),
        "{answered}"
    );
    let v: Value = resp.json().await.unwrap();
    let id = v["instance"]["id"].as_str().unwrap().to_string();
    env.wait_status(&id, "ACTIVE", Duration::from_secs(120))
        .await;
    // A request without one starts a trace of its own.
    let resp = env
        .http
        .get(format!("{}/instances", env.base()))
        .header("X-Auth-Token", &env.token)
        .send()
        .await
        .unwrap();
    let own = resp.headers()["traceparent"].to_str().unwrap().to_string();
    assert!(own.len() == 55 && !own.contains(trace), "{own}");
    let parse = |text: &str| -> Vec<Value> {
        text.lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    };
    let agent = std::fs::read_to_string(env.instance_dir(&id).join("agent.log")).unwrap();
    assert!(
        agent
            .lines()
            .all(|l| l.trim().is_empty() || l.starts_with('{')),
        "every agent line is JSON:\n{agent}"
    );
    let finished = parse(&agent)
        .into_iter()
        .find(|l| l["message"] == "intent finished")
        .unwrap_or_else(|| panic!("no intent finished:\n{agent}"));
    assert_eq!(finished["span"]["kind"], "prepare", "{finished}");
    assert!(
        finished["span"]["intent_id"]
            .as_str()
            .is_some_and(|s| s.len() == 36),
        "{finished}"
    );
    assert_eq!(finished["outcome"], "done", "{finished}");
    assert_eq!(finished["span"]["trace_id"], trace, "{finished}");
    let controller = parse(&env.controller_log());
    assert!(
        controller
            .iter()
            .any(|l| l["instance"] == id.as_str() && l["message"] == "intent finished"),
        "{controller:?}"
    );
}
