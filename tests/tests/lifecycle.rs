//! End to end over HTTP: create with a database and a user → ACTIVE → connect at the API's address
//! and write/read a row → restart → ACTIVE with the row → delete → 404, processes and files gone.

use std::time::Duration;

use coffer_tests::{pid_alive, Env, StatusCode};
use sqlx::{Connection, Row};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_connect_restart_delete() {
    let env = Env::start().await;
    let id = env.create("shop-db").await;
    let view = env
        .wait_status(&id, "ACTIVE", Duration::from_secs(120))
        .await;
    assert_eq!(view["operating_status"], "HEALTHY");
    assert_eq!(view["datastore"]["type"], "mariadb");
    assert!(
        view["volume"]["used"].as_f64().is_some(),
        "volume usage shown: {view}"
    );

    let mut c = env.connect(&view, "app", "s3cret-Pw", "shop").await;
    sqlx::query("CREATE TABLE orders (id INT PRIMARY KEY, item VARCHAR(20))")
        .execute(&mut c)
        .await
        .unwrap();
    sqlx::query("INSERT INTO orders VALUES (1, 'tea')")
        .execute(&mut c)
        .await
        .unwrap();
    c.close().await.unwrap();

    // The user sees only its database; the agent's admin and remote root are not reachable.
    let mut c = env.connect(&view, "app", "s3cret-Pw", "shop").await;
    let dbs: Vec<String> = sqlx::query("SHOW DATABASES")
        .fetch_all(&mut c)
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        dbs.contains(&"shop".to_string()) && !dbs.contains(&"mysql".to_string()),
        "{dbs:?}"
    );
    c.close().await.unwrap();

    let db_pid = env.db_pid(&id).expect("db pid recorded");
    let (st, body) = env.restart(&id).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body, serde_json::Value::Null, "202 has an empty body");
    let (_, v) = env.show(&id).await;
    assert_eq!(v["instance"]["status"], "REBOOT");
    let view = env
        .wait_status(&id, "ACTIVE", Duration::from_secs(60))
        .await;
    let new_pid = env.db_pid(&id).expect("db pid recorded");
    assert_ne!(db_pid, new_pid, "restart restarted the database");
    assert!(!pid_alive(db_pid));

    let mut c = env.connect(&view, "app", "s3cret-Pw", "shop").await;
    let item: String = sqlx::query("SELECT item FROM orders WHERE id = 1")
        .fetch_one(&mut c)
        .await
        .unwrap()
        .get(0);
    assert_eq!(item, "tea");
    c.close().await.unwrap();

    // Rename.
    let (st, _) = env
        .call(
            "PUT",
            &format!("/instances/{id}"),
            Some(serde_json::json!({"instance": {"name": "renamed"}})),
        )
        .await;
    assert_eq!(st, StatusCode::ACCEPTED);
    assert_eq!(env.show(&id).await.1["instance"]["name"], "renamed");

    // Secrets appear in no log and no process argument.
    let admin_pw =
        std::fs::read_to_string(env.instance_dir(&id).join("state/mariadb/admin.password"))
            .unwrap();
    assert!(admin_pw.trim().len() >= 24);
    let mut texts = vec![
        std::fs::read_to_string(env.dir.path().join("controller.log")).unwrap(),
        std::fs::read_to_string(env.instance_dir(&id).join("agent.log")).unwrap(),
        std::fs::read_to_string(env.instance_dir(&id).join("state/mariadb/mariadbd.err")).unwrap(),
    ];
    for pid in [env.agent_pid(&id).unwrap(), env.db_pid(&id).unwrap()] {
        texts.push(
            String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap())
                .to_string(),
        );
        texts.push(
            String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/environ")).unwrap())
                .to_string(),
        );
    }
    for t in &texts {
        assert!(
            !t.contains("s3cret-Pw") && !t.contains(admin_pw.trim()),
            "a secret leaked into: {t}"
        );
    }
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(env.instance_dir(&id).join("state/mariadb/admin.password"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    let agent_pid = env.agent_pid(&id).expect("agent pid");
    env.delete_and_wait_gone(&id).await;
    assert!(!pid_alive(agent_pid), "agent gone");
    assert!(!pid_alive(new_pid), "database gone");
    assert!(!env.instance_dir(&id).exists(), "files gone");
    let (_, list) = env.call("GET", "/instances", None).await;
    assert_eq!(list["instances"].as_array().unwrap().len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_paginates_newest_first() {
    let env = Env::start().await;
    // Instances without databases are enough to check the list; wait for all to be ACTIVE.
    let mut ids = vec![];
    for i in 0..3 {
        ids.push(env.create(&format!("db{i}")).await);
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    let (st, page1) = env.call("GET", "/instances?limit=2", None).await;
    assert_eq!(st, StatusCode::OK);
    let items = page1["instances"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(items[0]["id"], ids[2].as_str());
    let next = page1["links"][0]["href"].as_str().expect("next link");
    assert!(next.contains(&format!("marker={}", ids[1])), "{next}");
    let (_, page2) = env
        .call(
            "GET",
            &format!("/instances?limit=2&marker={}", ids[1]),
            None,
        )
        .await;
    let items = page2["instances"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["id"], ids[0].as_str());
    assert!(
        page2.get("links").is_none(),
        "no next link on the last page"
    );
    for id in &ids {
        env.wait_status(id, "ACTIVE", Duration::from_secs(120))
            .await;
    }
}
