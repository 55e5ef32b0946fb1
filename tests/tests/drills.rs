//! Restore drills: the controller restores an instance's latest backup into a throwaway
//! instance (at a low CPU and I/O priority), runs the datastore's checks, deletes the throwaway
//! and keeps a signed report that `coffer-controller drill-verify` checks; a drill of a tampered
//! backup fails, says which check failed and puts a fault on the instance until a drill passes;
//! a drill schedule starts drills. (Every datastore's drill passes in `datastores.rs`; the
//! tampered backup's drill runs with backups in NATS, the others in a directory.)

use std::time::{Duration, Instant};

use coffer_tests::{bin, Env, StatusCode};
use serde_json::{json, Value};

async fn backed_up(env: &Env, id: &str) -> String {
    let (st, v) = env
        .call(
            "POST",
            "/backups",
            Some(json!({"backup": {"name": "b", "instance": id}})),
        )
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    let bid = v["backup"]["id"].as_str().unwrap().to_string();
    env.wait_backup(&bid, "COMPLETED").await;
    bid
}

/// `GET /metrics` with `auth` (a header and its value): the status and the text.
async fn metrics(env: &Env, auth: Option<(&str, String)>) -> (StatusCode, String) {
    let mut rb = env
        .http
        .get(format!("http://127.0.0.1:{}/metrics", env.api_port));
    if let Some((h, v)) = auth {
        rb = rb.header(h, v);
    }
    let resp = rb.send().await.unwrap();
    (resp.status(), resp.text().await.unwrap())
}

/// The value of metric `name` for `instance` in a scrape's text.
fn metric(text: &str, name: &str, instance: &str) -> Option<f64> {
    let label = format!("instance=\"{instance}\"");
    text.lines()
        .find(|l| l.starts_with(&format!("{name}{{")) && l.contains(&label))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The niceness of process `pid` (field 19 of /proc/<pid>/stat).
fn nice_of(pid: i32) -> Option<i64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count from the closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(16)?.parse().ok()
}

/// The throwaway instance of a running drill and its database's niceness, once it runs.
async fn throwaway_nice(env: &Env, drill: &str) -> (String, i64) {
    let name = format!("drill-{}", &drill[..8]);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, v) = env.call("GET", "/instances", None).await;
        let found = v["instances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["name"] == json!(name))
            .map(|i| i["id"].as_str().unwrap().to_string());
        if let Some(id) = found {
            if let Some(n) = env.db_pid(&id).and_then(nice_of) {
                return (id, n);
            }
        }
        let (_, d) = env
            .call("GET", &format!("/restore_drills/{drill}"), None)
            .await;
        assert_eq!(
            d["restore_drill"]["status"], "RUNNING",
            "the drill ended before its throwaway's database was seen: {d}"
        );
        assert!(Instant::now() < deadline, "no throwaway instance {name}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn verify(env: &Env, file: &std::path::Path, signer: Option<&str>) -> (bool, String) {
    let mut cmd = std::process::Command::new(bin("coffer-controller"));
    cmd.arg("--config")
        .arg(env.config_path())
        .arg("drill-verify")
        .arg(file);
    if let Some(s) = signer {
        cmd.args(["--signer", s]);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

async fn gone_from_list(env: &Env, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, v) = env.call("GET", "/instances", None).await;
        if !v["instances"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["id"] == json!(id))
        {
            return;
        }
        assert!(Instant::now() < deadline, "throwaway {id} not deleted: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drill_restores_the_latest_backup_checks_it_and_signs_its_report() {
    let env = Env::start().await;
    let (id, _) = env.active_with_rows("src", &[1, 2, 3]).await;

    // Bad input: a clear 4xx, and no drill.
    for (body, status, says) in [
        (
            json!({"restore_drill": {"instance": id}}),
            400,
            "no completed backup",
        ),
        (json!({"restore_drill": {"instance": "nope"}}), 404, "nope"),
        (json!({"restore_drill": {"instance": id, "x": 1}}), 400, "x"),
        (json!({"drill": {}}), 400, "'drill' was unexpected"),
    ] {
        let (st, v) = env
            .call("POST", "/restore_drills", Some(body.clone()))
            .await;
        assert_eq!(st.as_u16(), status, "{body}: {v}");
        assert!(v.to_string().contains(says), "{body}: {v}");
    }
    let (_, v) = env.call("GET", "/restore_drills", None).await;
    assert_eq!(v["restore_drills"], json!([]));

    let bid = backed_up(&env, &id).await;
    // A project with no room for another instance is drilled all the same: the throwaway is
    // outside its quota.
    let (st, v) = env
        .call_as(
            &env.admin_token,
            "PUT",
            &format!("{}/mgmt/quotas/{}", env.base(), env.project),
            Some(json!({"quotas": {"instances": 1}})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let drill = env.start_drill(&id).await;
    // The throwaway's database runs at a low priority (niceness 10), not the tenants'.
    let (throwaway, nice) = throwaway_nice(&env, &drill).await;
    assert_eq!(nice, 10, "the drill's database runs at niceness {nice}");
    let src_nice = nice_of(env.db_pid(&id).unwrap()).unwrap();
    assert_eq!(src_nice, 0, "the tenant's own database keeps its priority");

    let v = env.wait_drill(&drill).await;
    let d = &v["restore_drill"];
    assert_eq!(d["status"], "PASSED", "{v}\n{}", env.controller_log());
    let r = &d["report"];
    assert_eq!(r["backup_id"], json!(bid));
    assert_eq!(r["instance_id"], json!(id));
    assert_eq!(r["passed"], true);
    assert_eq!(r["failed_checks"], json!([]));
    let checks = r["checks"].as_array().unwrap();
    let table = checks
        .iter()
        .find(|c| c["name"] == "check table `shop`.`t`")
        .unwrap_or_else(|| panic!("no check of shop.t: {v}"));
    assert_eq!(table["ok"], true, "{v}");
    assert!(table["detail"].as_str().unwrap().contains("3 rows"), "{v}");
    let inv = checks.iter().find(|c| c["name"] == "inventory").unwrap();
    assert_eq!(inv["ok"], true, "{v}");
    assert!(
        inv["detail"].as_str().unwrap().contains("all 1 tables"),
        "{v}"
    );
    for phase in ["queue", "restore", "check", "cleanup"] {
        assert!(r["phases"][phase].is_number(), "no {phase} phase: {v}");
    }
    assert!(r["rto_seconds"].as_f64().unwrap() > 0.0, "{v}");
    assert!(r["rpo_seconds"].as_f64().unwrap() >= 0.0, "{v}");
    gone_from_list(&env, &throwaway).await;

    // The instance view shows the drill, and no fault.
    let (_, view) = env.show(&id).await;
    assert_eq!(
        view["instance"]["recovery"]["drill"]["id"],
        json!(drill),
        "{view}"
    );
    assert_eq!(view["instance"]["recovery"]["drill"]["status"], "PASSED");
    assert!(view["instance"]["fault"].is_null(), "{view}");

    // The signed report verifies against the controller's drill key, and only as signed.
    let file = env.dir.path().join("drill.json");
    std::fs::write(&file, v.to_string()).unwrap();
    let (ok, out) = verify(&env, &file, None);
    assert!(
        ok && out.contains("signature OK") && out.contains("PASSED"),
        "{out}"
    );
    let key = std::process::Command::new(bin("coffer-controller"))
        .arg("--config")
        .arg(env.config_path())
        .args(["manage", "drill-key"])
        .output()
        .unwrap();
    let key = String::from_utf8_lossy(&key.stdout).trim().to_string();
    assert_eq!(
        json!(key),
        d["signer"],
        "manage drill-key prints the signer"
    );
    let (ok, out) = verify(&env, &file, Some(&key));
    assert!(ok, "{out}");
    let mut forged = v.clone();
    forged["restore_drill"]["report_text"] = json!(d["report_text"]
        .as_str()
        .unwrap()
        .replace("\"rto_seconds\":", "\"rto_seconds\":0.001,\"was\":"));
    std::fs::write(&file, forged.to_string()).unwrap();
    let (ok, out) = verify(&env, &file, None);
    assert!(!ok && out.contains("does not match"), "{out}");
    std::fs::write(&file, v.to_string()).unwrap();
    let other = "ABCRZEZBEQUA7LFUM3SCWWMKDXYVVNSXGN7JWBGGP3CSLN7PWYN3KRXI";
    let (ok, out) = verify(&env, &file, Some(other));
    assert!(!ok && out.contains("not by the trusted key"), "{out}");

    // A drill schedule starts drills; bad schedules are refused.
    for (extra, says) in [
        (json!({"kind": "drill", "keep_last": 2}), "drill schedule"),
        (json!({"kind": "nightly"}), "'backup' or 'drill'"),
    ] {
        let mut body =
            json!({"backup_schedule": {"instance": id, "name": "d", "pattern": "* * * * * *"}});
        for (k, x) in extra.as_object().unwrap() {
            body["backup_schedule"][k] = x.clone();
        }
        let (st, v) = env.call("POST", "/backup_schedules", Some(body)).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
        assert!(v.to_string().contains(says), "{v}");
    }
    let (st, v) = env
        .call(
            "POST",
            "/backup_schedules",
            Some(json!({"backup_schedule": {"instance": id, "name": "drills", "pattern": "* * * * * *", "kind": "drill"}})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["backup_schedule"]["kind"], "drill");
    let sid = v["backup_schedule"]["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    let scheduled = loop {
        let (_, s) = env
            .call("GET", &format!("/backup_schedules/{sid}"), None)
            .await;
        if let Some(d) = s["backup_schedule"]["last_result"]
            .as_str()
            .and_then(|r| r.strip_prefix("started restore drill "))
        {
            break d.to_string();
        }
        assert!(Instant::now() < deadline, "no scheduled drill: {s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (st, _) = env
        .call("DELETE", &format!("/backup_schedules/{sid}"), None)
        .await;
    assert_eq!(st, StatusCode::ACCEPTED);
    let v = env.wait_drill(&scheduled).await;
    assert_eq!(v["restore_drill"]["status"], "PASSED", "{v}");
    // Every drill the schedule started ends, one after the other, and leaves no instance.
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let (_, v) = env.call("GET", "/restore_drills", None).await;
        let all = v["restore_drills"].as_array().unwrap().clone();
        if all.iter().all(|d| d["status"] != "RUNNING") {
            assert!(all.iter().all(|d| d["status"] == "PASSED"), "{v}");
            break;
        }
        assert!(Instant::now() < deadline, "drills still running: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, v) = env.call("GET", "/instances", None).await;
        let left: Vec<Value> = v["instances"].as_array().unwrap().clone();
        if left.len() == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "throwaways left: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drill_of_a_tampered_backup_fails_says_why_and_faults_the_instance() {
    // Backups in NATS: the throwaway reads its source's backup and archive through a grant.
    let env = Env::start_with(coffer_tests::Opts {
        backup_storage: coffer_tests::BackupStorage::Nats { max_bytes: None },
        ..Default::default()
    })
    .await;
    let (id, _) = env.active_with_rows("src", &[1]).await;
    let bid = backed_up(&env, &id).await;
    // Flip one byte in the middle of the stored stream.
    let key = format!("{bid}.cfbk");
    let mut bytes = env.read_object(&id, &key).await;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    env.write_object(&id, &key, &bytes).await;

    let drill = env.start_drill(&id).await;
    let v = env.wait_drill(&drill).await;
    let d = &v["restore_drill"];
    assert_eq!(d["status"], "FAILED", "{v}");
    let r = &d["report"];
    assert_eq!(r["passed"], false);
    assert_eq!(r["failed_checks"], json!(["restore"]), "{v}");
    assert!(
        r["rto_seconds"].is_null(),
        "a failed restore has no RTO: {v}"
    );
    let restore = &r["checks"][0];
    assert!(
        restore["detail"]
            .as_str()
            .unwrap()
            .contains("failed authentication"),
        "{v}"
    );
    // The instance serves, with a fault naming the drill and what failed.
    let (_, view) = env.show(&id).await;
    let i = &view["instance"];
    assert_eq!(i["status"], "ACTIVE", "{view}");
    let fault = i["fault"]["message"].as_str().unwrap_or_default();
    assert!(
        fault.contains(&drill) && fault.contains("restore: ") && fault.contains(&bid),
        "{view}"
    );
    assert_eq!(i["recovery"]["drill"]["status"], "FAILED");
    assert_eq!(i["recovery"]["drill"]["failed_checks"], json!(["restore"]));
    // The operator's metrics say so (a Prometheus scrape sends a bearer token); a tenant's
    // token and no token are refused.
    let bearer = Some(("Authorization", format!("Bearer {}", env.admin_token)));
    let (st, text) = metrics(&env, bearer.clone()).await;
    assert_eq!(st, StatusCode::OK, "{text}");
    assert_eq!(
        metric(&text, "coffer_restore_drill_last_passed", &id),
        Some(0.0),
        "{text}"
    );
    assert!(
        metric(
            &text,
            "coffer_restore_drill_last_finished_timestamp_seconds",
            &id
        )
        .is_some(),
        "{text}"
    );
    let (st, text) = metrics(&env, Some(("X-Auth-Token", env.token.clone()))).await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{text}");
    assert!(!text.contains("coffer_"), "{text}");
    let (st, _) = metrics(&env, None).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    // The report of a failed drill is signed too.
    let file = env.dir.path().join("failed.json");
    std::fs::write(&file, v.to_string()).unwrap();
    let (ok, out) = verify(&env, &file, None);
    assert!(ok && out.contains("FAILED"), "{out}");

    // A new backup and a drill that passes clear the fault.
    backed_up(&env, &id).await;
    let drill = env.start_drill(&id).await;
    let v = env.wait_drill(&drill).await;
    assert_eq!(v["restore_drill"]["status"], "PASSED", "{v}");
    let (_, view) = env.show(&id).await;
    assert!(view["instance"]["fault"].is_null(), "{view}");
    let (_, text) = metrics(&env, bearer).await;
    assert_eq!(
        metric(&text, "coffer_restore_drill_last_passed", &id),
        Some(1.0),
        "{text}"
    );
    assert!(
        metric(&text, "coffer_restore_drill_last_rto_seconds", &id).is_some_and(|s| s > 0.0),
        "{text}"
    );
    // No throwaway is left behind, failed or passed.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, v) = env.call("GET", "/instances", None).await;
        if v["instances"].as_array().unwrap().len() == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "throwaways left: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
