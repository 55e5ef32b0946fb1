//! Modules: ping, license and config drivers applied by the agent in Trove's order (priority,
//! apply_order, name), removal, auto_apply on new instances, persistence across an agent
//! restart, and bad input.

use std::time::Duration;

use coffer_tests::{Env, StatusCode};
use serde_json::{json, Value};

fn b64(s: &str) -> String {
    data_encoding::BASE64.encode(s.as_bytes())
}

async fn create_module(env: &Env, token: &str, body: Value) -> (StatusCode, Value) {
    let url = format!("{}/modules", env.base());
    env.call_as(token, "POST", &url, Some(json!({ "module": body })))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modules_apply_in_order_remove_and_auto_apply() {
    let env = Env::start().await;
    let (id, _) = env.active_with_rows("mods", &[]).await;
    let user = env.token.clone();
    let admin = env.admin_token.clone();
    let mk = |body: Value, token: String| {
        let env = &env;
        async move {
            let (st, v) = create_module(env, &token, body).await;
            assert_eq!(st, StatusCode::OK, "{v}");
            v["module"]["id"].as_str().unwrap().to_string()
        }
    };
    // Created in one order, applied in another: priority first, then apply_order, then name.
    let ping = mk(
        json!({"name": "zz-ping", "module_type": "ping", "contents": b64("message=pong from zz\n"), "apply_order": 1}),
        user.clone(),
    )
    .await;
    let license = mk(
        json!({"name": "lic", "module_type": "license", "contents": b64("LICENSE-KEY-123"), "apply_order": 7}),
        user.clone(),
    )
    .await;
    let config = mk(
        json!({"name": "cfg", "module_type": "config", "contents": b64("wait_timeout = 333\n"), "apply_order": 3}),
        user.clone(),
    )
    .await;
    let prio = mk(
        json!({"name": "prio", "module_type": "ping", "contents": b64("message=first\n"), "apply_order": 9, "priority_apply": 1}),
        admin.clone(),
    )
    .await;
    let (st, v) = env
        .call(
            "POST",
            &format!("/instances/{id}/modules"),
            Some(json!({"modules": [{"id": license}, {"id": ping}, {"id": config}, {"id": prio}]})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let mut applied: Vec<(u64, String, String)> = v["modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["apply_sequence"].as_u64().unwrap(),
                m["name"].as_str().unwrap().to_string(),
                m["status"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    applied.sort();
    let order: Vec<&str> = applied.iter().map(|x| x.1.as_str()).collect();
    assert_eq!(order, vec!["prio", "zz-ping", "cfg", "lic"], "{v}");
    assert!(applied.iter().all(|x| x.2 == "OK"), "{v}");
    let ping_result = v["modules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "zz-ping")
        .unwrap()
        .clone();
    assert_eq!(ping_result["message"], "pong from zz");
    // The license is a protected file; the config a drop-in waiting for a restart.
    let lic_file = env
        .instance_dir(&id)
        .join(format!("state/modules/{license}/license"));
    assert_eq!(
        std::fs::read_to_string(&lic_file).unwrap(),
        "LICENSE-KEY-123"
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&lic_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "0600");
    }
    env.wait_status(&id, "RESTART_REQUIRED", Duration::from_secs(30))
        .await;

    // Listed, also after the agent is replaced.
    env.replace_agent(&id).await;
    env.wait_status(&id, "RESTART_REQUIRED", Duration::from_secs(30))
        .await;
    // The status may still be the old agent's: the list is asked of the new one, which answers
    // once it has adopted the database.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let l = loop {
        let (_, l) = env
            .call("GET", &format!("/instances/{id}/modules"), None)
            .await;
        if l["modules"].is_array() || std::time::Instant::now() > deadline {
            break l;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(l["modules"].as_array().map(Vec::len), Some(4), "{l}");
    // The config module is in effect after the restart.
    let (st, _) = env.restart(&id).await;
    assert_eq!(st, StatusCode::ACCEPTED);
    let view = env
        .wait_status(&id, "ACTIVE", Duration::from_secs(60))
        .await;
    let mut c = env.connect(&view, "app", "s3cret-Pw", "shop").await;
    let wt: String = sqlx::query_scalar("SELECT CAST(@@global.wait_timeout AS CHAR)")
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(wt, "333");
    sqlx::Connection::close(c).await.unwrap();

    // Remove the license: the file is gone. A module in use cannot be deleted.
    let (st, v) = env
        .call("DELETE", &format!("/modules/{license}"), None)
        .await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{v}");
    let (st, v) = env
        .call(
            "DELETE",
            &format!("/instances/{id}/modules/{license}"),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert!(!lic_file.exists());
    let (_, l) = env
        .call("GET", &format!("/instances/{id}/modules"), None)
        .await;
    assert_eq!(l["modules"].as_array().unwrap().len(), 3, "{l}");
    let (st, _) = env
        .call("DELETE", &format!("/modules/{license}"), None)
        .await;
    assert_eq!(st, StatusCode::OK);

    // auto_apply (admin): applied to every new instance.
    let auto = mk(
        json!({"name": "auto", "module_type": "ping", "contents": b64("message=auto\n"), "auto_apply": 1}),
        admin.clone(),
    )
    .await;
    // Asked for at create (zz-ping) and auto_apply (auto): both applied by the prepare.
    let (st, v) = env
        .call(
            "POST",
            "/instances",
            Some(
                json!({"instance": {"name": "fresh", "flavorRef": "1", "volume": {"size": 1},
                "modules": [{"id": ping}]}}),
            ),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let fresh = v["instance"]["id"].as_str().unwrap().to_string();
    env.wait_status(&fresh, "ACTIVE", Duration::from_secs(120))
        .await;
    let (_, l) = env
        .call("GET", &format!("/instances/{fresh}/modules"), None)
        .await;
    for want in [&auto, &ping] {
        assert!(
            l["modules"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["id"] == want.as_str() && m["status"] == "OK"),
            "{want}: {l}"
        );
    }
    let (_, m) = env.call("GET", &format!("/modules/{auto}"), None).await;
    assert_eq!(m["module"]["auto_apply"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_modules_are_refused() {
    let env = Env::start().await;
    let user = env.token.clone();
    let (st, v) = create_module(
        &env,
        &user,
        json!({"name": "x", "module_type": "no_such_type", "contents": b64("a")}),
    )
    .await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{v}");
    let (st, v) = create_module(
        &env,
        &user,
        json!({"name": "x", "module_type": "ping", "contents": "%%% not base64 %%%"}),
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    for flag in ["auto_apply", "all_tenants", "priority_apply"] {
        let (st, v) = create_module(
            &env,
            &user,
            json!({"name": "x", "module_type": "ping", "contents": b64("message=x"), flag: 1}),
        )
        .await;
        assert_eq!(st, StatusCode::FORBIDDEN, "{flag}: {v}");
    }
    // A config module is checked like a configuration group.
    let (st, v) = create_module(
        &env,
        &user,
        json!({"name": "x", "module_type": "config", "contents": b64("wait_timeout = 0\n")}),
    )
    .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    let (st, v) = create_module(
        &env,
        &user,
        json!({"name": "x", "module_type": "config", "contents": b64("init_file = /tmp/x\n")}),
    )
    .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    let (_, l) = env.call("GET", "/modules", None).await;
    assert_eq!(l["modules"], json!([]), "nothing was created");
}

/// An update as python-troveclient sends it (`type`, not `module_type`): the name, the type
/// and the contents change; a type that does not exist is refused and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_update_changes_what_it_names() {
    let env = Env::start().await;
    let token = env.token.clone();
    let (st, v) = create_module(
        &env,
        &token,
        json!({"name": "m1", "module_type": "ping", "contents": b64("message=one\n")}),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let id = v["module"]["id"].as_str().unwrap().to_string();
    let md5 = v["module"]["md5"].clone();
    let url = format!("{}/modules/{id}", env.base());
    let put = |body: Value| env.call_as(&token, "PUT", &url, Some(json!({ "module": body })));
    let (st, v) = put(json!({"name": "m2", "type": "license", "contents": b64("KEY-2")})).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let (st, v) = env.call_as(&token, "GET", &url, None).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["module"]["name"], "m2", "{v}");
    assert_eq!(v["module"]["type"], "license", "{v}");
    assert_ne!(v["module"]["md5"], md5, "the contents changed: {v}");
    let (st, e) = put(json!({"type": "no-such-type"})).await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{e}");
    let (_, after) = env.call_as(&token, "GET", &url, None).await;
    assert_eq!(after["module"]["type"], "license", "{after}");
}
