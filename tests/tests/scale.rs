//! Several controllers on one PostgreSQL store and one NATS: each serves the API, creates made
//! through any of them are built once, a quota holds across them, and when one dies the other
//! carries on: it takes over publishing and the timers, and adopts the workflows it drove.

use std::time::{Duration, Instant};

use coffer_tests::{Env, Opts, PeerController, StatusCode};
use serde_json::{json, Value};

fn opts() -> Opts {
    Opts {
        store_postgres: true,
        ..Opts::default()
    }
}

async fn call(
    env: &Env,
    base: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    env.call_as(&env.token.clone(), method, &format!("{base}{path}"), body)
        .await
}

async fn create(env: &Env, base: &str, name: &str) -> (StatusCode, Value) {
    call(
        env,
        base,
        "POST",
        "/instances",
        Some(json!({"instance": {"name": name, "flavorRef": "1", "volume": {"size": 1}}})),
    )
    .await
}

/// Waits until `id` shows `status` through the API at `base`.
async fn wait_status(env: &Env, base: &str, id: &str, status: &str, peer: &PeerController) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (st, v) = call(env, base, "GET", &format!("/instances/{id}"), None).await;
        if st == StatusCode::OK && v["instance"]["status"] == status {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{id} not {status} through {base}: {st} {v}\n--- controller ---\n{}\n--- peer ---\n{}",
            env.controller_log(),
            peer.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_controllers_share_the_work_and_one_carries_on_when_the_other_dies() {
    let mut env = Env::start_with(opts()).await;
    let peer = env.start_peer_controller("b", &[]);
    let (a, b) = (env.base(), peer.base.clone());

    // Creates through either controller are built, and each shows what the other made.
    let (st, v) = create(&env, &a, "via-a").await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let x = v["instance"]["id"].as_str().unwrap().to_string();
    let (st, v) = create(&env, &b, "via-b").await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let y = v["instance"]["id"].as_str().unwrap().to_string();
    wait_status(&env, &b, &x, "ACTIVE", &peer).await;
    wait_status(&env, &a, &y, "ACTIVE", &peer).await;

    // A quota holds when eight creates are spread over both controllers.
    let q = format!("{a}/mgmt/quotas/{}", env.project);
    let (st, v) = env
        .call_as(
            &env.admin_token.clone(),
            "PUT",
            &q,
            Some(json!({"quotas": {"instances": 4}})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let tries = (0..8).map(|i| {
        let base = if i % 2 == 0 { a.clone() } else { b.clone() };
        let env = &env;
        async move { create(env, &base, &format!("q{i}")).await }
    });
    let results = futures::future::join_all(tries).await;
    let made: Vec<String> = results
        .iter()
        .filter(|(st, _)| *st == StatusCode::OK)
        .map(|(_, v)| v["instance"]["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        made.len(),
        2,
        "two more fit in the quota of four: {results:?}"
    );
    assert!(
        results
            .iter()
            .all(|(st, _)| *st == StatusCode::OK || *st == StatusCode::PAYLOAD_TOO_LARGE),
        "{results:?}"
    );
    for id in &made {
        wait_status(&env, &b, id, "ACTIVE", &peer).await;
    }
    let (_, list) = call(&env, &b, "GET", "/instances", None).await;
    assert_eq!(list["instances"].as_array().unwrap().len(), 4, "{list}");

    // The first controller (the leader) dies: the other answers at once, takes over
    // publishing intents and the timers, and a delete through it completes.
    env.kill_controller();
    let (st, _) = call(&env, &b, "GET", "/instances", None).await;
    assert_eq!(st, StatusCode::OK);
    let (st, v) = call(&env, &b, "DELETE", &format!("/instances/{x}"), None).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (st, _) = call(&env, &b, "GET", &format!("/instances/{x}"), None).await;
        if st == StatusCode::NOT_FOUND {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the delete never finished after the leader died\n{}",
            peer.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        peer.log_text().contains("this controller leads"),
        "the survivor took the lead"
    );
}
