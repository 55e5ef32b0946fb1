//! The agent protocol's edges: failed and never-finishing prepares, expired, undecodable and
//! unknown intents, and actions an agent does not support.

use std::time::{Duration, Instant};

use coffer_proto::{subjects, v1, Message};
use coffer_tests::{Env, Opts, StatusCode};
use futures::StreamExt;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

fn record(env: &Env, id: &str, intent: &str) -> Option<Value> {
    let p = env
        .instance_dir(id)
        .join(format!("state/intents/{intent}.json"));
    serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()
}

async fn wait_record(env: &Env, id: &str, intent: &str) -> Value {
    for _ in 0..500 {
        if let Some(r) = record(env, id, intent) {
            if r["state"] != "started" {
                return r;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no result recorded for intent {intent}\n{}", env.logs(id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_prepare_is_error_with_the_reason() {
    let env = Env::start_with(Opts {
        datastore_extra: "install_db_binary = \"/bin/false\"".into(),
        ..Default::default()
    })
    .await;
    let id = env.create("broken").await;
    let v = env.wait_status(&id, "ERROR", Duration::from_secs(60)).await;
    let msg = v["fault"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("prepare failed") && msg.contains("mariadb-install-db failed"),
        "{v}"
    );
    assert!(!msg.contains("s3cret"), "no secret in the fault");
    // It can be deleted.
    let (st, _) = env.call("DELETE", &format!("/instances/{id}"), None).await;
    assert_eq!(st, StatusCode::ACCEPTED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_that_never_completes_ends_in_error() {
    let scripts = tempfile::tempdir().unwrap();
    let hang = scripts.path().join("hang-install-db");
    std::fs::write(&hang, "#!/bin/sh\nexec sleep 20\n").unwrap();
    std::os::unix::fs::PermissionsExt::set_mode(
        &mut std::fs::metadata(&hang).unwrap().permissions(),
        0o755,
    );
    std::fs::set_permissions(&hang, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let env = Env::start_with(Opts {
        build_timeout_s: 3,
        datastore_extra: format!("install_db_binary = {:?}", hang.display().to_string()),
        ..Default::default()
    })
    .await;
    let id = env.create("slow").await;
    let v = env.wait_status(&id, "ERROR", Duration::from_secs(30)).await;
    assert!(
        v["fault"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("did not complete within 3 s"),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_undecodable_and_unknown_intents_fail_without_running() {
    let env = Env::start().await;
    let id = env.create("edges").await;
    env.wait_status(&id, "ACTIVE", Duration::from_secs(120))
        .await;
    let db = env.db_pid(&id).unwrap();
    let client = env.nats_client().await;
    let js = async_nats::jetstream::new(client);
    let publish = |msg_id: &str, payload: Vec<u8>| {
        let js = js.clone();
        let subject = subjects::intent(&id);
        let msg_id = msg_id.to_string();
        async move {
            js.send_publish(
                subject,
                async_nats::jetstream::message::PublishMessage::build()
                    .payload(payload.into())
                    .message_id(msg_id),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        }
    };
    // Undecodable: terminated, reported, and the consumer moves on.
    publish("junk-1", b"\xff\xfe not protobuf".to_vec()).await;
    // Unknown kind (as a newer controller would send).
    let unknown = coffer_proto::envelope(
        "unknown-1".into(),
        &id,
        v1::envelope::Body::Intent(v1::Intent {
            deadline_unix_ms: 0,
            trace_parent: String::new(),
            kind: None,
        }),
    );
    publish("unknown-1", unknown.encode_to_vec()).await;
    // Past its deadline.
    let late = coffer_proto::envelope(
        "late-1".into(),
        &id,
        v1::envelope::Body::Intent(v1::Intent {
            deadline_unix_ms: coffer_proto::now_unix_ms() - 1000,
            trace_parent: String::new(),
            kind: Some(v1::intent::Kind::Restart(v1::Restart {})),
        }),
    );
    publish("late-1", late.encode_to_vec()).await;

    let r = wait_record(&env, &id, "late-1").await;
    assert_eq!(r["state"], "failed");
    assert_eq!(r["code"], v1::FailureCode::Expired as i32);
    let r = record(&env, &id, "unknown-1").expect("the unknown intent is recorded as failed");
    assert_eq!(r["state"], "failed", "{r}");
    assert_eq!(r["code"], v1::FailureCode::Unsupported as i32);
    let log = std::fs::read_to_string(env.instance_dir(&id).join("agent.log")).unwrap();
    assert!(log.contains("undecodable intent; terminating it"), "{log}");
    assert!(log.contains("unknown intent kind; terminating it"), "{log}");
    assert_eq!(env.db_pid(&id), Some(db), "nothing was restarted");
    // The consumer is not stuck: a real restart still goes through.
    let (st, _) = env.restart(&id).await;
    assert_eq!(st, StatusCode::ACCEPTED);
    env.wait_for(&id, "restarted", Duration::from_secs(60), |v| {
        v["status"] == "ACTIVE" && env.db_pid(&id) != Some(db)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn action_the_agent_does_not_support_is_refused() {
    let env = Env::start_with(Opts {
        heartbeat_expiry_s: 30,
        ..Default::default()
    })
    .await;
    let id = env.create("oldagent").await;
    env.wait_status(&id, "ACTIVE", Duration::from_secs(120))
        .await;
    let agent = env.agent_pid(&id).unwrap();
    // The agent's boot and sequence as it last reported, taken just before it is stopped: the
    // older agent below speaks for the same boot with a later sequence, so a report the real
    // agent sent before it stopped, arriving late (under load), is older and ignored.
    let client = env.nats_client().await;
    let mut beats = client.subscribe(subjects::heartbeat(&id)).await.unwrap();
    let last = loop {
        let m = tokio::time::timeout(Duration::from_secs(30), beats.next())
            .await
            .expect("the agent reports")
            .unwrap();
        if let Ok(v1::Envelope {
            body: Some(v1::envelope::Body::Heartbeat(hb)),
            ..
        }) = coffer_proto::decode(&m.payload)
        {
            break hb;
        }
    };
    kill(Pid::from_raw(agent), Signal::SIGSTOP).unwrap();
    drop(beats);
    // Speak as an older agent that knows only prepare.
    let hb = v1::Heartbeat {
        status: v1::ServiceStatus::Running as i32,
        intent_kinds: vec!["prepare".into()],
        boot_id: last.boot_id.clone(),
        seq: last.seq + 3,
        host: "127.0.0.1".into(),
        ..Default::default()
    };
    let mut env_msg =
        coffer_proto::envelope("hb-old".into(), &id, v1::envelope::Body::Heartbeat(hb));
    env_msg.software_version = "0.0.1".into();
    let reply = coffer_tests::heartbeat_request(&client, &id, env_msg.encode_to_vec()).await;
    assert!(
        !reply.payload.is_empty(),
        "the controller answered the heartbeat"
    );
    let (st, v) = env.restart(&id).await;
    kill(Pid::from_raw(agent), Signal::SIGCONT).unwrap();
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    let msg = v["unprocessableEntity"]["message"].as_str().unwrap();
    assert!(
        msg.contains("does not support 'restart'") && msg.contains("0.0.1"),
        "{msg}"
    );
    assert_eq!(
        env.show(&id).await.1["instance"]["status"],
        "ACTIVE",
        "nothing changed"
    );
    // The real agent's next heartbeats (past the older one's sequence) restore its
    // capabilities; a refused restart changes nothing, so it is asked again until then.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (st, v) = env.restart(&id).await;
        if st == StatusCode::ACCEPTED {
            break;
        }
        assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
        assert!(
            Instant::now() < deadline,
            "the real agent's capabilities never came back: {v}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    env.wait_status(&id, "ACTIVE", Duration::from_secs(60))
        .await;
}
