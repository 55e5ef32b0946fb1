//! python-troveclient (keystoneauth1's token_endpoint plugin, no Keystone) against the API.

use std::process::Command;

use coffer_tests::Env;

const SCRIPT: &str = r#"
import json, os, sys, time
from keystoneauth1 import session
from keystoneauth1.token_endpoint import Token
from troveclient.v1 import client

c = client.Client(session=session.Session(auth=Token(os.environ["EP"], os.environ["TOKEN"])))
out = {}
out["datastores"] = [d.name for d in c.datastores.list()]
ds = c.datastores.get("mariadb")
out["versions"] = [v.name for v in c.datastore_versions.list(ds.id)]
out["flavors"] = [f.name for f in c.flavors.list()]
inst = c.instances.create("tc1", "1", volume={"size": 1}, datastore="mariadb",
                          databases=[{"name": "tcdb"}], users=[{"name": "tcu", "password": "tc-pass-1", "databases": [{"name": "tcdb"}]}])
out["created_status"] = inst.status
deadline = time.time() + 120
while True:
    i = c.instances.get(inst.id)
    if i.status in ("ACTIVE", "ERROR") or time.time() > deadline:
        break
    time.sleep(0.2)
out["status"] = i.status
out["listed"] = [x.id for x in c.instances.list()]
out["ip"] = i.ip
c.databases.create(inst.id, [{"name": "tcdb2"}])
out["dbs"] = sorted(d.name for d in c.databases.list(inst.id))
c.users.create(inst.id, [{"name": "tcu2", "password": "tc-pass-2", "databases": [{"name": "tcdb2"}]}])
out["users"] = sorted(u.name for u in c.users.list(inst.id))
c.users.grant(inst.id, "tcu2", ["tcdb"])
out["access"] = sorted(d.name for d in c.users.list_access(inst.id, "tcu2"))
c.users.revoke(inst.id, "tcu2", "tcdb2")
out["access_after"] = sorted(d.name for d in c.users.list_access(inst.id, "tcu2"))
c.users.delete(inst.id, "tcu2")
c.databases.delete(inst.id, "tcdb2")
out["users_after"] = sorted(u.name for u in c.users.list(inst.id))
out["dbs_after"] = sorted(d.name for d in c.databases.list(inst.id))
user, password = c.root.create(inst.id)
out["root_user"] = user
out["root_pw_len"] = len(password)
out["root_enabled"] = c.root.is_root_enabled(inst.id).rootEnabled
ver = c.datastore_versions.list(ds.id)[0]
out["param_names"] = sorted(p.name for p in c.configuration_parameters.parameters("mariadb", ver.name))
out["param_type"] = c.configuration_parameters.get_parameter("mariadb", ver.name, "wait_timeout").type
cfg = c.configurations.create("tcg", json.dumps({"wait_timeout": 241}), datastore="mariadb")
c.instances.update(inst.id, configuration=cfg.id)
out["cfg_instances"] = [x.id for x in c.configurations.instances(cfg.id)]
c.configurations.edit(cfg.id, json.dumps({"max_connections": 210}))
out["cfg_edited"] = c.configurations.get(cfg.id).values
c.configurations.update(cfg.id, json.dumps({"wait_timeout": 243}))
out["cfg_updated"] = c.configurations.get(cfg.id).values
out["cfg_listed"] = [x.name for x in c.configurations.list()]
out["default_mc"] = c.instances.configuration(inst.id).configuration["max_connections"]
c.instances.update(inst.id, remove_configuration=True)
out["logs"] = sorted(l.name for l in c.instances.log_list(inst.id))
out["log_enabled"] = c.instances.log_action(inst.id, "general", enable=True).status
out["log_published"] = c.instances.log_action(inst.id, "general", publish=True).published
out["log_shown"] = c.instances.log_show(inst.id, "general").status
mod = c.modules.create("tcmod", "ping", "message=hello from troveclient\n")
applied = c.instances.module_apply(inst.id, [mod.id])
out["mod_applied"] = [(m.name, m.status, m.message) for m in applied]
out["mod_listed"] = [m.name for m in c.instances.modules(inst.id)]
c.instances.module_remove(inst.id, mod.id)
out["mod_after"] = [m.name for m in c.instances.modules(inst.id)]
c.modules.delete(mod.id)
out["mods_left"] = [m.name for m in c.modules.list()]
c.configurations.delete(cfg.id)
out["cfg_after"] = [x.name for x in c.configurations.list()]
c.instances.delete(inst.id)
deadline = time.time() + 60
gone = False
while time.time() < deadline:
    try:
        c.instances.get(inst.id)
        time.sleep(0.2)
    except Exception as e:
        gone = type(e).__name__ == "NotFound"
        break
out["deleted"] = gone
out["id"] = inst.id
print(json.dumps(out))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn troveclient_lists_creates_shows_and_deletes() {
    let env = Env::start().await;
    let python = std::env::var("COFFER_PYTHON").unwrap_or_else(|_| {
        format!(
            "{}/.cache/coffer/venv/bin/python",
            std::env::var("HOME").unwrap_or_default()
        )
    });
    let out = tokio::task::spawn_blocking({
        let ep = env.base();
        let token = env.token.clone();
        move || {
            Command::new(&python)
                .args(["-c", SCRIPT])
                .env("EP", ep)
                .env("TOKEN", token)
                .output()
        }
    })
    .await
    .unwrap()
    .expect("running python with troveclient (cargo xtask test installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "troveclient script failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(stdout.trim().lines().last().unwrap()).unwrap();
    assert_eq!(v["datastores"], serde_json::json!(["mariadb"]));
    assert_eq!(v["flavors"][0], "coffer.tiny");
    assert_eq!(v["created_status"], "BUILD");
    assert_eq!(v["status"], "ACTIVE", "{v}");
    assert!(v["listed"].as_array().unwrap().contains(&v["id"]));
    assert_eq!(v["ip"], serde_json::json!(["127.0.0.1"]));
    assert_eq!(v["deleted"], true, "{v}");
    assert_eq!(v["dbs"], serde_json::json!(["tcdb", "tcdb2"]), "{v}");
    assert_eq!(v["users"], serde_json::json!(["tcu", "tcu2"]), "{v}");
    assert_eq!(v["access"], serde_json::json!(["tcdb", "tcdb2"]), "{v}");
    assert_eq!(v["access_after"], serde_json::json!(["tcdb"]), "{v}");
    assert_eq!(v["users_after"], serde_json::json!(["tcu"]), "{v}");
    assert_eq!(v["dbs_after"], serde_json::json!(["tcdb"]), "{v}");
    assert_eq!(v["root_user"], "root");
    assert!(v["root_pw_len"].as_u64().unwrap() >= 16);
    assert_eq!(v["root_enabled"], true);
    assert!(v["param_names"]
        .as_array()
        .unwrap()
        .contains(&serde_json::json!("wait_timeout")));
    assert_eq!(v["param_type"], "integer");
    assert_eq!(v["cfg_instances"], serde_json::json!([v["id"].clone()]));
    assert_eq!(
        v["cfg_edited"],
        serde_json::json!({"wait_timeout": 241, "max_connections": 210})
    );
    assert_eq!(v["cfg_updated"], serde_json::json!({"wait_timeout": 243}));
    assert_eq!(v["cfg_listed"], serde_json::json!(["tcg"]));
    assert!(v["default_mc"].as_i64().unwrap() > 0, "{v}");
    assert_eq!(v["cfg_after"], serde_json::json!([]));
    assert_eq!(
        v["logs"],
        serde_json::json!(["general", "slow_query"]),
        "{v}"
    );
    assert!(
        ["Enabled", "Ready"].contains(&v["log_enabled"].as_str().unwrap()),
        "{v}"
    );
    assert!(v["log_published"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(
        v["mod_applied"],
        serde_json::json!([["tcmod", "OK", "hello from troveclient"]]),
        "{v}"
    );
    assert_eq!(v["mod_listed"], serde_json::json!(["tcmod"]), "{v}");
    assert_eq!(v["mod_after"], serde_json::json!([]), "{v}");
    assert_eq!(v["mods_left"], serde_json::json!([]), "{v}");
    // The general log keeps growing (the agent's own queries land in it too).
    assert!(
        ["Published", "Partial"].contains(&v["log_shown"].as_str().unwrap()),
        "{v}"
    );
}
