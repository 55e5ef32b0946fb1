//! Per-agent NATS identities: an agent's credentials reach only its own subjects, and a deleted
//! instance's credentials are revoked. The controller ignores payloads that name another instance
//! than their subject.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use coffer_proto::{subjects, v1, Message};
use coffer_tests::Env;

async fn connect_as(
    env: &Env,
    creds: &std::path::Path,
    instance: &str,
) -> (async_nats::Client, Arc<Mutex<Vec<String>>>) {
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let s = seen.clone();
    let client = async_nats::ConnectOptions::with_credentials_file(creds.to_path_buf())
        .await
        .unwrap()
        .custom_inbox_prefix(subjects::agent_inbox_prefix(instance))
        .event_callback(move |e| {
            let s = s.clone();
            async move {
                s.lock().unwrap().push(e.to_string());
            }
        })
        .connect(env.nats.url())
        .await
        .expect("an agent's own credentials connect");
    (client, seen)
}

async fn wait_event(seen: &Arc<Mutex<Vec<String>>>, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if seen.lock().unwrap().iter().any(|e| e.contains(needle)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no server error containing {needle:?}; saw {:?}",
            seen.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_identity_reaches_only_its_own_instance_and_is_revoked_on_delete() {
    let env = Env::start().await;
    let a = env.create("alpha").await;
    let b = env.create("beta").await;
    env.wait_status(&a, "ACTIVE", Duration::from_secs(120))
        .await;
    env.wait_status(&b, "ACTIVE", Duration::from_secs(120))
        .await;
    let creds_copy = env.dir.path().join("alpha.creds");
    std::fs::copy(env.agent_creds(&a), &creds_copy).unwrap();
    let (client, seen) = connect_as(&env, &creds_copy, &a).await;

    // B's calls, B's inbox, everyone's inboxes: refused.
    let _s1 = client.subscribe(subjects::call(&b)).await.unwrap();
    wait_event(
        &seen,
        &format!("Subscription to \"{}\"", subjects::call(&b)),
    )
    .await;
    let _s2 = client
        .subscribe(format!("{}.>", subjects::agent_inbox_prefix(&b)))
        .await
        .unwrap();
    wait_event(&seen, &format!("Subscription to \"_INBOX.{b}.>\"")).await;
    let _s3 = client.subscribe("_INBOX.>").await.unwrap();
    wait_event(&seen, "Subscription to \"_INBOX.>\"").await;
    // Speaking for B: heartbeat and event, refused by the server.
    let hb = coffer_proto::envelope(
        "forged".into(),
        &b,
        v1::envelope::Body::Heartbeat(v1::Heartbeat {
            status: v1::ServiceStatus::Crashed as i32,
            ..Default::default()
        }),
    );
    client
        .publish(subjects::heartbeat(&b), hb.encode_to_vec().into())
        .await
        .unwrap();
    wait_event(
        &seen,
        &format!("Publish to \"{}\"", subjects::heartbeat(&b)),
    )
    .await;
    client
        .publish(subjects::event(&b), hb.encode_to_vec().into())
        .await
        .unwrap();
    wait_event(&seen, &format!("Publish to \"{}\"", subjects::event(&b))).await;
    // Reading B's consumer: refused.
    let next = format!(
        "$JS.API.CONSUMER.MSG.NEXT.{}.{}",
        subjects::INTENT_STREAM,
        subjects::agent_consumer(&b)
    );
    client.publish(next.clone(), "1".into()).await.unwrap();
    wait_event(&seen, &format!("Publish to \"{next}\"")).await;
    assert_eq!(
        env.show(&b).await.1["instance"]["status"],
        "ACTIVE",
        "B is untouched"
    );

    // Its own heartbeat subject works.
    let own = coffer_proto::envelope(
        "own".into(),
        &a,
        v1::envelope::Body::Heartbeat(v1::Heartbeat {
            status: v1::ServiceStatus::Running as i32,
            boot_id: "probe".into(),
            intent_kinds: coffer_proto::INTENT_KINDS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            ..Default::default()
        }),
    );
    // Answered (asked again if the flood limiter drops it next to the agent's own).
    coffer_tests::heartbeat_request(&client, &a, own.encode_to_vec()).await;

    // Delete A: its identity is revoked, the open connection is cut and new ones are refused.
    env.delete_and_wait_gone(&a).await;
    wait_event(&seen, "Revoked").await;
    let again = async_nats::ConnectOptions::with_credentials_file(creds_copy.clone())
        .await
        .unwrap()
        .connect(env.nats.url())
        .await;
    assert!(again.is_err(), "a revoked identity cannot connect");
    env.wait_status(&b, "ACTIVE", Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_ignores_payloads_naming_another_instance() {
    let env = Env::start().await;
    let a = env.create("alpha").await;
    let b = env.create("beta").await;
    env.wait_status(&a, "ACTIVE", Duration::from_secs(120))
        .await;
    env.wait_status(&b, "ACTIVE", Duration::from_secs(120))
        .await;
    let client = env.nats_client().await;
    // On A's subject, a payload that claims to be B and says B crashed.
    let forged = coffer_proto::envelope(
        "forged".into(),
        &b,
        v1::envelope::Body::Heartbeat(v1::Heartbeat {
            status: v1::ServiceStatus::Crashed as i32,
            boot_id: "forger".into(),
            fault: "forged".into(),
            ..Default::default()
        }),
    );
    // Sent several times, 0.7 s apart, so that some pass the flood limiter (which drops
    // heartbeats close behind the agent's own) and reach the instance check.
    for _ in 0..6 {
        let r = tokio::time::timeout(
            coffer_tests::HEARTBEAT_RETRY,
            client.request(subjects::heartbeat(&a), forged.encode_to_vec().into()),
        )
        .await;
        assert!(
            !matches!(r, Ok(Ok(_))),
            "no answer to a mismatched heartbeat"
        );
    }
    let v = env.show(&b).await.1;
    assert_eq!(v["instance"]["status"], "ACTIVE", "{v}");
    assert!(v["instance"].get("fault").is_none(), "{v}");

    // An event on A's subject, naming A, about B's pending backup intent: dropped.
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let b_agent = Pid::from_raw(env.agent_pid(&b).unwrap());
    kill(b_agent, Signal::SIGSTOP).unwrap();
    let (st, v) = env
        .call(
            "POST",
            "/backups",
            Some(serde_json::json!({"backup": {"name": "pending", "instance": b}})),
        )
        .await;
    assert_eq!(st, coffer_tests::StatusCode::ACCEPTED, "{v}");
    let bid = v["backup"]["id"].as_str().unwrap().to_string();
    let intent_id = env
        .store_text("SELECT intent_id FROM backups WHERE id = $1", &bid)
        .await;
    let forged = coffer_proto::envelope(
        "forged-event".into(),
        &a,
        v1::envelope::Body::Event(v1::Event {
            intent_id: intent_id.clone(),
            intent_kind: "backup".into(),
            kind: Some(v1::event::Kind::Failed(v1::Failed {
                message: "forged by A".into(),
                ..Default::default()
            })),
        }),
    );
    client
        .publish(subjects::event(&a), forged.encode_to_vec().into())
        .await
        .unwrap();
    client.flush().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    kill(b_agent, Signal::SIGCONT).unwrap();
    loop {
        let (_, v) = env.call("GET", &format!("/backups/{bid}"), None).await;
        let s = v["backup"]["status"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert_ne!(s, "FAILED", "A's event failed B's backup: {v}");
        if s == "COMPLETED" {
            break;
        }
        assert!(Instant::now() < deadline, "{v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A call that reaches an agent's subject but names another instance is refused by the agent,
/// whoever managed to send it; the agent's own instance is unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_refuses_calls_naming_another_instance() {
    let env = Env::start().await;
    let a = env.create("alpha").await;
    env.wait_status(&a, "ACTIVE", Duration::from_secs(120))
        .await;
    let client = env.nats_client().await;
    let ask = |named: String| {
        let client = client.clone();
        let subject = subjects::call(&a);
        async move {
            let env = coffer_proto::envelope(
                "c1".into(),
                &named,
                v1::envelope::Body::Call(v1::Call {
                    reply_key: vec![],
                    kind: Some(v1::call::Kind::ListDatabases(v1::ListDatabases {})),
                }),
            );
            let reply = tokio::time::timeout(
                Duration::from_secs(20),
                client.request(subject, env.encode_to_vec().into()),
            )
            .await
            .expect("the agent answers")
            .expect("a reply");
            match coffer_proto::decode(&reply.payload).unwrap().body {
                Some(v1::envelope::Body::CallReply(r)) => r,
                other => panic!("not a call reply: {other:?}"),
            }
        }
    };
    let refused = ask("some-other-instance".into()).await;
    assert!(!refused.ok, "{refused:?}");
    assert!(
        refused
            .error
            .contains("is for instance some-other-instance"),
        "{refused:?}"
    );
    assert!(refused.databases.is_empty());
    // The same call naming the agent's own instance is carried out.
    let own = ask(a.clone()).await;
    assert!(own.ok, "{own:?}");
    assert!(own.databases.iter().any(|d| d.name == "shop"), "{own:?}");
}

/// One agent floods its heartbeat subject for 10 s with its own credentials: the controller
/// drops the excess before doing any work, so no other instance changes status and a source
/// keeps its lease (never fences).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_agents_heartbeat_flood_leaves_the_others_alone() {
    let env = Env::start().await;
    let a = env.create("flooder").await;
    let b = env.create("victim").await;
    env.wait_status(&a, "ACTIVE", Duration::from_secs(120))
        .await;
    env.wait_status(&b, "ACTIVE", Duration::from_secs(120))
        .await;
    let (st, v) = env
        .call(
            "POST",
            "/instances",
            Some(serde_json::json!({"instance": {"name": "victim-rep", "replica_of": b}})),
        )
        .await;
    assert!(st.is_success(), "{v}");
    let rep = v["instance"]["id"].as_str().unwrap().to_string();
    env.wait_status(&rep, "ACTIVE", Duration::from_secs(180))
        .await;
    let creds = env.dir.path().join("flooder.creds");
    std::fs::copy(env.agent_creds(&a), &creds).unwrap();
    let (client, _) = connect_as(&env, &creds, &a).await;
    let hb = coffer_proto::envelope(
        "flood".into(),
        &a,
        v1::envelope::Body::Heartbeat(v1::Heartbeat {
            status: v1::ServiceStatus::Running as i32,
            boot_id: "flood".into(),
            ..Default::default()
        }),
    )
    .encode_to_vec();
    // 10,000 heartbeats a second (5,000 times an agent's rate) for 10 s. An unpaced flood can
    // also starve the shared NATS server and controller of CPU on a small machine, which no
    // per-user limit of NATS prevents (see docs/security.md).
    let flood = tokio::spawn(async move {
        let until = Instant::now() + Duration::from_secs(10);
        let mut pace = tokio::time::interval(Duration::from_millis(10));
        let mut sent = 0u64;
        while Instant::now() < until {
            pace.tick().await;
            for _ in 0..100 {
                let _ = client
                    .publish(subjects::heartbeat(&a), hb.clone().into())
                    .await;
            }
            let _ = client.flush().await;
            sent += 100;
        }
        sent
    });
    let mut checks = 0;
    while !flood.is_finished() {
        for id in [&b, &rep] {
            let v = env.show(id).await.1;
            assert_eq!(v["instance"]["status"], "ACTIVE", "during the flood: {v}");
            assert_ne!(
                v["instance"]["replication"]["role"], "fenced",
                "a source fenced during another agent's flood: {v}"
            );
        }
        checks += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let sent = flood.await.unwrap();
    assert!(sent > 50_000, "the flood was real: {sent} heartbeats");
    assert!(checks > 10);
    // For a lease's worth of time past the flood, still the same.
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        for id in [&b, &rep] {
            let v = env.show(id).await.1;
            assert_eq!(v["instance"]["status"], "ACTIVE", "after the flood: {v}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn backup_of(env: &Env, instance: &str) -> String {
    let (st, v) = env
        .call(
            "POST",
            "/backups",
            Some(serde_json::json!({"backup": {"name": "b", "instance": instance}})),
        )
        .await;
    assert_eq!(st, coffer_tests::StatusCode::ACCEPTED, "{v}");
    let bid = v["backup"]["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, v) = env.call("GET", &format!("/backups/{bid}"), None).await;
        if v["backup"]["status"] == "COMPLETED" {
            return bid;
        }
        assert!(
            v["backup"]["status"] != "FAILED" && Instant::now() < deadline,
            "{v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// With backups in NATS, one agent's own credentials (as a tenant with root in its VM has them)
/// reach nothing of another instance's storage, and cannot purge, list, delete or replace even
/// its own; the other instance's backup still restores afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_identity_reaches_no_other_instances_storage() {
    use coffer_strategies::storage::nats::{object_subject, stream_name};
    use coffer_tests::{BackupStorage, Opts, BACKUP_BUCKET};
    let env = Env::start_with(Opts {
        backup_storage: BackupStorage::Nats { max_bytes: None },
        ..Opts::default()
    })
    .await;
    let a = env.create("alpha").await;
    let (b, _) = env.active_with_rows("beta", &[7, 8]).await;
    env.wait_status(&a, "ACTIVE", Duration::from_secs(120))
        .await;
    let a_backup = backup_of(&env, &a).await;
    let b_backup = backup_of(&env, &b).await;
    let b_stored = env.stored().await;
    assert!(
        b_stored.contains(&format!("{b}/{b_backup}.cfbk")),
        "{b_stored:?}"
    );

    let creds = env.dir.path().join("alpha.creds");
    std::fs::copy(env.agent_creds(&a), &creds).unwrap();
    let (client, seen) = connect_as(&env, &creds, &a).await;
    let (sa, sb) = (
        stream_name(BACKUP_BUCKET, &a),
        stream_name(BACKUP_BUCKET, &b),
    );
    let b_meta = format!(
        "{}.m",
        object_subject(BACKUP_BUCKET, &b, &format!("{b_backup}.json"))
    );
    let a_meta = format!(
        "{}.m",
        object_subject(BACKUP_BUCKET, &a, &format!("{a_backup}.json"))
    );
    // Each refused by the server: purging (B's stream, even its own), listing, reading,
    // overwriting and deleting B's objects, consumers on either stream (a push consumer could
    // deliver stored bytes to any subject), speaking to B or reading its intents.
    let refused = [
        format!("$JS.API.STREAM.PURGE.{sb}"),
        format!("$JS.API.STREAM.PURGE.{sa}"),
        format!("$JS.API.STREAM.INFO.{sb}"),
        format!("$JS.API.STREAM.INFO.{sa}"),
        "$JS.API.STREAM.NAMES".to_string(),
        "$JS.API.STREAM.LIST".to_string(),
        format!("$JS.API.STREAM.DELETE.{sb}"),
        format!("$JS.API.STREAM.MSG.DELETE.{sb}"),
        format!("$JS.API.STREAM.MSG.DELETE.{sa}"),
        format!("$JS.API.STREAM.MSG.GET.{sb}"),
        format!("$JS.API.DIRECT.GET.{sb}.{b_meta}"),
        format!("$JS.API.DIRECT.GET.{sb}"),
        b_meta.clone(),
        format!("$JS.API.CONSUMER.CREATE.{sb}"),
        format!("$JS.API.CONSUMER.CREATE.{sa}"),
        format!("$JS.API.CONSUMER.CREATE.{sa}.x.{a_meta}"),
        format!("$JS.API.CONSUMER.DURABLE.CREATE.{sa}.x"),
        subjects::call(&b),
        subjects::intent(&b),
        format!("$O.{BACKUP_BUCKET}.M.x"),
    ];
    for subject in &refused {
        client.publish(subject.clone(), "{}".into()).await.unwrap();
        wait_event(&seen, &format!("Publish to \"{subject}\"")).await;
    }
    let _s = client.subscribe(subjects::intent(&b)).await.unwrap();
    wait_event(
        &seen,
        &format!("Subscription to \"{}\"", subjects::intent(&b)),
    )
    .await;
    // Its own objects: readable by subject, but a committed one is never replaced.
    let js = async_nats::jetstream::new(client.clone());
    let own = js.get_stream_no_info(&sa).await.unwrap();
    let record = own.direct_get_last_for_subject(a_meta.clone()).await;
    assert!(record.is_ok(), "its own objects read back: {record:?}");
    let replaced = async {
        js.publish(a_meta.clone(), "{\"attempt\":\"x\"}".into())
            .await?
            .await
    }
    .await;
    assert!(replaced.is_err(), "a committed object cannot be replaced");
    assert_eq!(
        own.direct_get_last_for_subject(a_meta.clone())
            .await
            .unwrap()
            .payload,
        record.unwrap().payload
    );

    // Everything of B's is where it was, and its backup restores (through the grant the
    // controller gives the new instance for exactly that chain).
    assert_eq!(env.stored().await, b_stored);
    let (st, v) = env
        .call(
            "POST",
            "/instances",
            Some(
                serde_json::json!({"instance": {"name": "copy", "flavorRef": "1",
                "volume": {"size": 1}, "restorePoint": {"backupRef": b_backup}}}),
            ),
        )
        .await;
    assert_eq!(st, coffer_tests::StatusCode::OK, "{v}");
    let copy = v["instance"]["id"].as_str().unwrap().to_string();
    let view = env
        .wait_status(&copy, "ACTIVE", Duration::from_secs(120))
        .await;
    assert_eq!(env.rows(&view).await, vec![7, 8]);
}
