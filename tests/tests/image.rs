//! The guest image boots to ACTIVE: `POST /instances` with the qemu provisioner boots a VM from
//! the image with a NoCloud seed; cloud-init writes the agent's enrolment config, the agent makes
//! its key pair, enrols, prepares MariaDB and heartbeats; the database answers on the forwarded
//! port. Slow (a VM boot; minutes under software emulation), so outside the suite:
//! `cargo xtask image --test` builds the image and runs this with COFFER_GUEST_IMAGE set.

use std::time::{Duration, Instant};

use coffer_tests::{Env, Opts, StatusCode};
use sqlx::Connection;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "boots a VM: run by `cargo xtask image --test`"]
async fn a_vm_from_the_guest_image_boots_enrols_and_becomes_active() {
    let image = std::env::var("COFFER_GUEST_IMAGE")
        .expect("COFFER_GUEST_IMAGE: the image to boot (cargo xtask image --test sets it)");
    let env = Env::start_with(Opts {
        qemu_image: Some(image.into()),
        heartbeat_interval_ms: 2000,
        lease_ms: 4000,
        heartbeat_expiry_s: 20,
        build_timeout_s: 1800,
        backup_storage: coffer_tests::BackupStorage::Nats { max_bytes: None },
        ..Opts::default()
    })
    .await;
    let t0 = Instant::now();
    let id = env.create("vm-1").await;
    let deadline = Instant::now() + Duration::from_secs(1800);
    let view = loop {
        let (st, v) = env.show(&id).await;
        assert_eq!(st, StatusCode::OK, "{v}");
        match v["instance"]["status"].as_str() {
            Some("ACTIVE") => break v["instance"].clone(),
            Some("ERROR") => panic!("the VM build failed: {v}\n{}", console(&env, &id)),
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "not ACTIVE in time: {v}\n{}",
            console(&env, &id)
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let boot = t0.elapsed();
    println!("boot-to-ACTIVE: {:.1} s", boot.as_secs_f64());
    // The user given at create works through the forwarded port.
    let mut c = env.connect(&view, "app", "s3cret-Pw", "shop").await;
    sqlx::query("CREATE TABLE t (i INT PRIMARY KEY)")
        .execute(&mut c)
        .await
        .unwrap();
    sqlx::query("INSERT INTO t VALUES (1), (2)")
        .execute(&mut c)
        .await
        .unwrap();
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM t")
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(n, 2);
    c.close().await.unwrap();
    // The image's mariadb.service is masked; the agent's server is the only one.
    let log = console(&env, &id);
    assert!(!log.contains("Started mariadb.service"), "{log}");
    env.delete_and_wait_gone(&id).await;
    assert!(
        !env.instance_dir(&id).exists(),
        "the VM's directory is removed"
    );
}

fn console(env: &Env, id: &str) -> String {
    let text =
        std::fs::read_to_string(env.instance_dir(id).join("console.log")).unwrap_or_default();
    let start = text.len().saturating_sub(6000);
    text[text.floor_char_boundary(start)..].to_string()
}
