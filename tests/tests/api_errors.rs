//! Bad input: each case gets Trove's status code and error body, and changes nothing.

use std::time::Duration;

use coffer_tests::{Env, StatusCode};
use serde_json::{json, Value};

#[track_caller]
fn assert_fault(status: StatusCode, body: &Value, want: StatusCode, key: &str) {
    assert_eq!(status, want, "body: {body}");
    let inner = &body[key];
    assert_eq!(
        inner["code"],
        want.as_u16(),
        "expected {key} body, got {body}"
    );
    assert!(
        inner["message"]
            .as_str()
            .map(|m| !m.is_empty())
            .unwrap_or(false),
        "{body}"
    );
}

async fn count(env: &Env) -> usize {
    env.call("GET", "/instances", None).await.1["instances"]
        .as_array()
        .unwrap()
        .len()
}

fn good() -> Value {
    json!({"instance": {"name": "x1", "flavorRef": "1", "volume": {"size": 1}}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_trove_errors_and_change_nothing() {
    let env = Env::start().await;
    let cases: Vec<(&str, Value, StatusCode, &str)> = vec![
        (
            "unknown flavor",
            json!({"instance": {"name": "a", "flavorRef": "99", "volume": {"size": 1}}}),
            StatusCode::BAD_REQUEST,
            "badRequest",
        ),
        (
            "unknown datastore",
            json!({"instance": {"name": "a", "flavorRef": "1", "volume": {"size": 1}, "datastore": {"type": "nope"}}}),
            StatusCode::NOT_FOUND,
            "itemNotFound",
        ),
        (
            "unknown version",
            json!({"instance": {"name": "a", "flavorRef": "1", "volume": {"size": 1}, "datastore": {"type": "mariadb", "version": "0.1"}}}),
            StatusCode::BAD_REQUEST,
            "badRequest",
        ),
        (
            "missing name",
            json!({"instance": {"flavorRef": "1", "volume": {"size": 1}}}),
            StatusCode::BAD_REQUEST,
            "badRequest",
        ),
        (
            "empty name",
            json!({"instance": {"name": "", "flavorRef": "1", "volume": {"size": 1}}}),
            StatusCode::BAD_REQUEST,
            "badRequest",
        ),
        (
            "no volume",
            json!({"instance": {"name": "a", "flavorRef": "1"}}),
            StatusCode::BAD_REQUEST,
            "badRequest",
        ),
        (
            "zero volume",
            json!({"instance": {"name": "a", "flavorRef": "1", "volume": {"size": 0}}}),
            StatusCode::BAD_REQUEST,
            "badRequest",
        ),
        (
            "unknown key",
            json!({"instance": {"name": "a", "flavorRef": "1", "volume": {"size": 1}, "colour": "red"}}),
            StatusCode::BAD_REQUEST,
            "badRequest",
        ),
        (
            "bad db name",
            json!({"instance": {"name": "a", "flavorRef": "1", "volume": {"size": 1}, "databases": [{"name": "a`b"}]}}),
            StatusCode::BAD_REQUEST,
            "badRequest",
        ),
        (
            "user db not listed",
            json!({"instance": {"name": "a", "flavorRef": "1", "volume": {"size": 1}, "users": [{"name": "u", "password": "p", "databases": [{"name": "zz"}]}]}}),
            StatusCode::BAD_REQUEST,
            "badRequest",
        ),
        (
            "no instance key",
            json!({"name": "a"}),
            StatusCode::BAD_REQUEST,
            "badRequest",
        ),
    ];
    for (what, body, want, key) in cases {
        let (st, v) = env.call("POST", "/instances", Some(body)).await;
        assert_fault(st, &v, want, key);
        assert_eq!(count(&env).await, 0, "{what} created something");
    }
    let (st, v) = env.raw("POST", "/instances", "{not json").await;
    assert_fault(st, &v, StatusCode::BAD_REQUEST, "badRequest");
    assert!(v["badRequest"]["message"]
        .as_str()
        .unwrap()
        .contains("Malformed request body"));
    assert_eq!(count(&env).await, 0);

    // Auth.
    let url = format!("{}/instances", env.base());
    let resp = env.http.get(&url).send().await.unwrap();
    let st = resp.status();
    assert_fault(
        st,
        &resp.json().await.unwrap(),
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    let (st, v) = env.call_as("not-a-token-at-all", "GET", &url, None).await;
    assert_fault(st, &v, StatusCode::UNAUTHORIZED, "unauthorized");
    let (st, v) = env
        .call_as(&env.other_token.clone(), "GET", &url, None)
        .await;
    assert_fault(st, &v, StatusCode::FORBIDDEN, "forbidden");
    let (st, v) = env
        .call_as(&env.other_token.clone(), "POST", &url, Some(good()))
        .await;
    assert_fault(st, &v, StatusCode::FORBIDDEN, "forbidden");
    assert_eq!(count(&env).await, 0);

    // Routes.
    let (st, v) = env.call("GET", "/nothing-here", None).await;
    assert_fault(st, &v, StatusCode::NOT_FOUND, "itemNotFound");
    let (st, v) = env.call("DELETE", "/flavors", None).await;
    assert_fault(st, &v, StatusCode::NOT_FOUND, "itemNotFound");
    let (st, v) = env.call("GET", "/instances/not-a-uuid", None).await;
    assert_fault(st, &v, StatusCode::NOT_FOUND, "itemNotFound");
    let (st, v) = env.call("GET", "/flavors/nope", None).await;
    assert_fault(st, &v, StatusCode::NOT_FOUND, "itemNotFound");
    let (st, v) = env.call("GET", "/datastores/nope", None).await;
    assert_fault(st, &v, StatusCode::NOT_FOUND, "itemNotFound");
    let (st, v) = env.call("GET", "/instances?limit=abc", None).await;
    assert_fault(st, &v, StatusCode::BAD_REQUEST, "badRequest");

    // An instance to act on.
    let (st, v) = env.call("POST", "/instances", Some(good())).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let id = v["instance"]["id"].as_str().unwrap().to_string();
    // Busy while building.
    let (st, v) = env.restart(&id).await;
    assert_fault(
        st,
        &v,
        StatusCode::UNPROCESSABLE_ENTITY,
        "unprocessableEntity",
    );
    let (st, v) = env.call("DELETE", &format!("/instances/{id}"), None).await;
    assert_fault(
        st,
        &v,
        StatusCode::UNPROCESSABLE_ENTITY,
        "unprocessableEntity",
    );
    env.wait_status(&id, "ACTIVE", Duration::from_secs(120))
        .await;

    // Another project's instance id under its own path is 404.
    let other_url = format!(
        "http://127.0.0.1:{}/v1.0/otherproject/instances/{id}",
        env.api_port
    );
    let (st, v) = env
        .call_as(&env.other_token.clone(), "GET", &other_url, None)
        .await;
    assert_fault(st, &v, StatusCode::NOT_FOUND, "itemNotFound");
    let (st, v) = env
        .call_as(&env.other_token.clone(), "DELETE", &other_url, None)
        .await;
    assert_fault(st, &v, StatusCode::NOT_FOUND, "itemNotFound");

    // Actions.
    let act = format!("/instances/{id}/action");
    let (st, v) = env.call("POST", &act, Some(json!({"dance": {}}))).await;
    assert_fault(st, &v, StatusCode::BAD_REQUEST, "badRequest");
    let (st, v) = env.raw("POST", &act, "[").await;
    assert_fault(st, &v, StatusCode::BAD_REQUEST, "badRequest");
    let (st, v) = env
        .call("POST", &act, Some(json!({"reset_status": {}})))
        .await;
    assert_fault(st, &v, StatusCode::FORBIDDEN, "forbidden");
    let (st, v) = env
        .call(
            "PUT",
            &format!("/instances/{id}"),
            Some(json!({"instance": {"name": ""}})),
        )
        .await;
    assert_fault(st, &v, StatusCode::BAD_REQUEST, "badRequest");
    let (st, v) = env
        .call(
            "PUT",
            &format!("/instances/{id}"),
            Some(json!({"instance": {"colour": "x"}})),
        )
        .await;
    assert_fault(st, &v, StatusCode::BAD_REQUEST, "badRequest");
    let view = env.show(&id).await.1;
    assert_eq!(view["instance"]["name"], "x1");
    assert_eq!(view["instance"]["status"], "ACTIVE");
    // Busy: a second restart while the first runs.
    let (st, _) = env.restart(&id).await;
    assert_eq!(st, StatusCode::ACCEPTED);
    let (st, v) = env.restart(&id).await;
    assert_fault(
        st,
        &v,
        StatusCode::UNPROCESSABLE_ENTITY,
        "unprocessableEntity",
    );
    env.wait_status(&id, "ACTIVE", Duration::from_secs(60))
        .await;
    assert_eq!(
        env.agent_intents(&id, "restart"),
        1,
        "the refused restart changed nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_reset_status_lets_a_building_instance_be_deleted() {
    // Delete is refused while building; an admin's reset_status clears the task so it can go.
    let env = Env::start().await;
    let (st, v) = env.call("POST", "/instances", Some(good())).await;
    assert_eq!(st, StatusCode::OK);
    let id = v["instance"]["id"].as_str().unwrap().to_string();
    let (st, v) = env.call("DELETE", &format!("/instances/{id}"), None).await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    let admin = env.admin_token.clone();
    let (st, v) = env
        .call_as(
            &admin,
            "POST",
            &format!("{}/instances/{id}/action", env.base()),
            Some(json!({"reset_status": {}})),
        )
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    env.delete_and_wait_gone(&id).await;
    assert!(!env.instance_dir(&id).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_routes_answer_in_trove_shape() {
    let env = Env::start().await;
    let (st, v) = env.call("GET", "/flavors", None).await;
    assert_eq!(st, StatusCode::OK);
    let f = &v["flavors"][0];
    assert_eq!(f["id"], 1);
    assert_eq!(f["str_id"], "1");
    assert_eq!(f["ram"], 256);
    let (_, v) = env.call("GET", "/datastores", None).await;
    let ds = &v["datastores"][0];
    assert_eq!(ds["name"], "mariadb");
    let vid = ds["default_version"].as_str().unwrap().to_string();
    let (st, v) = env.call("GET", "/datastores/mariadb/versions", None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["versions"][0]["id"], vid.as_str());
    let (st, v) = env
        .call("GET", &format!("/datastores/versions/{vid}"), None)
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["version"]["datastore"], ds["id"]);
    let root = env
        .http
        .get(format!("http://127.0.0.1:{}/", env.api_port))
        .send()
        .await
        .unwrap();
    let body: Value = root.json().await.unwrap();
    assert_eq!(body["versions"][0]["id"], "v1.0");
}

/// What a stranger can send that the framework, not a handler, would answer: every answer is
/// Trove's JSON error, and nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_trove_errors_and_store_nothing() {
    let env = Env::start().await;
    let url = format!("{}/instances", env.base());
    let send = |ct: Option<&'static str>, body: Vec<u8>| {
        let mut rb = env
            .http
            .post(&url)
            .header("X-Auth-Token", &env.token)
            .body(body);
        if let Some(ct) = ct {
            rb = rb.header("Content-Type", ct);
        }
        async move {
            let r = rb.send().await.unwrap();
            let st = r.status();
            let ct = r
                .headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default();
            let v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap_or(Value::Null);
            (st, ct, v)
        }
    };
    let good = good().to_string().into_bytes();
    // A body not declared JSON: 415, nothing created.
    for ct in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        None,
    ] {
        let (st, ctype, v) = send(ct, good.clone()).await;
        assert_fault(
            st,
            &v,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupportedMediaType",
        );
        assert!(ctype.starts_with("application/json"), "{ctype}");
    }
    // JSON with a charset parameter is JSON.
    let (st, _, v) = send(Some("application/json; charset=utf-8"), b"{}".to_vec()).await;
    assert_fault(st, &v, StatusCode::BAD_REQUEST, "badRequest");
    // Past the 1 MiB the API reads: Trove's 413, in JSON. (Its own client: the server closes
    // a connection whose body it did not read, which a pooled client might otherwise reuse.)
    let r = reqwest::Client::new()
        .post(&url)
        .header("X-Auth-Token", &env.token)
        .header("Content-Type", "application/json")
        .body(vec![b' '; 2 << 20])
        .send()
        .await
        .unwrap();
    let st = r.status();
    let v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap_or(Value::Null);
    assert_fault(st, &v, StatusCode::PAYLOAD_TOO_LARGE, "overLimit");
    // Unknown routes and methods.
    let (st, v) = env.call("GET", "/no/such/route", None).await;
    assert_fault(st, &v, StatusCode::NOT_FOUND, "itemNotFound");
    let (st, v) = env.call("PATCH", "/flavors", None).await;
    assert_fault(st, &v, StatusCode::NOT_FOUND, "itemNotFound");

    // Names that would read differently from what they are.
    for name in [
        "a\u{0}b",
        "a\nb",
        "a\u{202E}gpj.exe",
        "a\u{2066}b",
        "ab\u{200B}",
    ] {
        let (st, v) = env
            .call(
                "POST",
                "/instances",
                Some(json!({"instance": {"name": name, "flavorRef": "1", "volume": {"size": 1}}})),
            )
            .await;
        assert_fault(st, &v, StatusCode::BAD_REQUEST, "badRequest");
        assert!(
            !v.to_string().contains(name),
            "the refusal echoes the name back: {v}"
        );
    }
    // Too many users in one request: 413 before anything is placed.
    let users: Vec<Value> = (0..101)
        .map(|i| json!({"name": format!("u{i}"), "password": "pw-123456"}))
        .collect();
    let (st, v) = env
        .call(
            "POST",
            "/instances",
            Some(json!({"instance": {"name": "many", "flavorRef": "1", "volume": {"size": 1}, "users": users}})),
        )
        .await;
    assert_fault(st, &v, StatusCode::PAYLOAD_TOO_LARGE, "overLimit");
    // Within the counts but an intent larger than any agent message: 413, nothing stored.
    let dbs: Vec<Value> = (0..100)
        .map(|i| json!({"name": format!("{i:0>64}")}))
        .collect();
    let users: Vec<Value> = (0..100)
        .map(|i| json!({"name": format!("u{i}"), "password": "pw-123456", "databases": dbs}))
        .collect();
    let (st, v) = env
        .call(
            "POST",
            "/instances",
            Some(
                json!({"instance": {"name": "huge", "flavorRef": "1", "volume": {"size": 1},
                        "databases": dbs, "users": users}}),
            ),
        )
        .await;
    assert_fault(st, &v, StatusCode::PAYLOAD_TOO_LARGE, "overLimit");
    assert_eq!(count(&env).await, 0, "a refused create stored an instance");

    // A tenant changing quotas: 403 (a valid token without the right), not 401.
    let (st, v) = env
        .call(
            "PUT",
            &format!("/mgmt/quotas/{}", env.project),
            Some(json!({"quotas": {"instances": 100}})),
        )
        .await;
    assert_fault(st, &v, StatusCode::FORBIDDEN, "forbidden");

    // After all that, a normal create still reaches ACTIVE.
    let id = env.create("after").await;
    env.wait_status(&id, "ACTIVE", Duration::from_secs(120))
        .await;
}
