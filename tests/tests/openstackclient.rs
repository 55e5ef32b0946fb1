//! The `openstack database ...` commands (python-openstackclient with troveclient's plugin),
//! with token auth and no Keystone (keystoneauth1's `admin_token` plugin: a token and the
//! endpoint): list, create, show, backup, restore and delete work as against Trove.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use coffer_tests::Env;
use serde_json::Value;

fn openstack() -> PathBuf {
    let python = std::env::var("COFFER_PYTHON").unwrap_or_else(|_| {
        format!(
            "{}/.cache/coffer/venv/bin/python",
            std::env::var("HOME").unwrap_or_default()
        )
    });
    PathBuf::from(python).with_file_name("openstack")
}

/// Runs `openstack database <args>` as the tenant; returns what it printed.
async fn run(env: &Env, args: &[&str]) -> String {
    let (ep, token) = (env.base(), env.token.clone());
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let shown = args.join(" ");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(openstack())
            .arg("database")
            .args(&args)
            .env("OS_AUTH_TYPE", "admin_token")
            .env("OS_ENDPOINT", ep)
            .env("OS_TOKEN", token)
            .output()
    })
    .await
    .unwrap()
    .expect("running openstack (cargo xtask test installs python-openstackclient)");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "openstack database {shown}: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Runs `openstack database <args> -f json`; returns its JSON answer.
async fn os(env: &Env, args: &[&str]) -> Value {
    let stdout = run(env, &[args, &["-f", "json"]].concat()).await;
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

/// `openstack database instance create <name>` of a tiny MariaDB instance, with `extra`
/// options.
async fn create(env: &Env, name: &str, extra: &[&str]) -> Value {
    let base = [
        "instance",
        "create",
        name,
        "--flavor",
        "1",
        "--size",
        "1",
        "--datastore",
        "mariadb",
    ];
    os(env, &[&base[..], extra].concat()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openstack_database_lists_creates_shows_backs_up_restores_and_deletes() {
    let env = Env::start().await;
    let v = create(&env, "osc1", &["--databases", "shop"]).await;
    let id = v["id"].as_str().unwrap().to_string();
    assert_eq!(v["status"], "BUILD", "{v}");
    env.wait_status(&id, "ACTIVE", Duration::from_secs(120))
        .await;
    let v = os(&env, &["instance", "show", &id]).await;
    assert_eq!(v["status"], "ACTIVE", "{v}");
    assert_eq!(v["name"], "osc1", "{v}");
    let v = os(&env, &["instance", "list"]).await;
    assert!(
        v.as_array()
            .unwrap()
            .iter()
            .any(|i| i["ID"] == id.as_str() && i["Status"] == "ACTIVE"),
        "{v}"
    );

    let b = os(&env, &["backup", "create", "osc-b1", "-i", &id]).await;
    let bid = b["id"].as_str().unwrap().to_string();
    env.wait_backup(&bid, "COMPLETED").await;
    let v = os(&env, &["backup", "list"]).await;
    assert!(
        v.as_array()
            .unwrap()
            .iter()
            .any(|x| x["ID"] == bid.as_str()),
        "{v}"
    );

    let r = create(&env, "osc2", &["--backup", &bid]).await;
    let rid = r["id"].as_str().unwrap().to_string();
    env.wait_status(&rid, "ACTIVE", Duration::from_secs(120))
        .await;
    let dbs = os(&env, &["db", "list", &rid]).await;
    assert!(
        dbs.as_array().unwrap().iter().any(|d| d["Name"] == "shop"),
        "the restore holds the backup's database: {dbs}"
    );

    for i in [&id, &rid] {
        run(&env, &["instance", "delete", i]).await;
    }
    for i in [&id, &rid] {
        env.wait_for(i, "gone", Duration::from_secs(60), |v| v.is_null())
            .await;
    }
}
