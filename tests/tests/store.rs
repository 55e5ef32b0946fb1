//! The controller's store in both dialects: SQLite (the embedded default) and PostgreSQL (the
//! store several controllers share). Every check runs against both; the concurrency checks use
//! separate `Store` handles on one database, as separate controllers would, so what serialises
//! them is the database, not a lock in this process.

use std::future::Future;

use coffer_controller::status::{PlacedBy, Task};
use coffer_controller::store::dialect::redact;
use coffer_controller::store::{
    ClaimLost, Dialect, InstanceRow, ModuleRow, NewRow, Owned, Store, Tx,
};
use coffer_tests::pgstore::PgStore;

/// Runs `check` against a fresh SQLite store and a fresh PostgreSQL database.
async fn on_both<F, Fut>(check: F)
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = ()>,
{
    let dir = tempfile::tempdir().unwrap();
    check(format!("sqlite://{}", dir.path().join("c.db").display())).await;
    let pg = PgStore::start();
    pg.create_db("coffer");
    check(pg.url("coffer")).await;
}

/// Inserts a new instance's row inside `tx` (a create's write).
async fn insert(tx: &mut Tx, project: &str, name: &str) -> InstanceRow {
    let server_id = Store::next_server_id(tx).await.unwrap();
    let id = uuid::Uuid::new_v4().to_string();
    let row = InstanceRow::building(NewRow {
        id: &id,
        project,
        name,
        flavor_id: "1",
        version_id: "v",
        volume_size: 1,
        server_id,
    });
    Store::insert_instance(tx, &row).await.unwrap();
    row
}

async fn new_instance(s: &Store, project: &str, name: &str) -> InstanceRow {
    let mut tx = s.begin().await.unwrap();
    let row = insert(&mut tx, project, name).await;
    tx.commit().await.unwrap();
    row
}

#[tokio::test]
async fn the_schema_round_trips_in_both_dialects() {
    on_both(|url| async move {
        let s = Store::connect(&url).await.unwrap();
        // Opening again applies nothing and keeps what is there.
        let a = new_instance(&s, "p", "a").await;
        drop(s);
        let s = Store::connect(&url).await.unwrap();
        let b = new_instance(&s, "p", "b").await;
        let c = new_instance(&s, "p", "c").await;
        let got = s
            .instance(&a.id)
            .await
            .unwrap()
            .expect("the instance is there");
        assert_eq!(got.task, Task::Building, "{}", redact(&url));
        assert_eq!(got.placement, PlacedBy::Provisioner);
        assert!(!got.deleted && !got.ejected && !got.root_enabled);
        s.set_ejected(&a.id, true).await.unwrap();
        s.set_root_enabled(&a.id, true).await.unwrap();
        let got = s.instance(&a.id).await.unwrap().unwrap();
        assert!(
            got.ejected && got.root_enabled,
            "flags read back set: {}",
            redact(&url)
        );
        // Newest first; rows created in the same second keep their insertion order.
        let names: Vec<String> = s
            .instances_page("p", None, 100)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.name)
            .collect();
        assert_eq!(names, ["c", "b", "a"], "{}", redact(&url));
        // Pages: one after another by marker; an unknown marker gives nothing.
        let page = |marker: Option<String>, n| {
            let s = &s;
            async move {
                s.instances_page("p", marker.as_deref(), n)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|r| (r.id, r.name))
                    .collect::<Vec<_>>()
            }
        };
        let first = page(None, 1).await;
        assert_eq!(first[0].1, "c", "{}", redact(&url));
        let rest = page(Some(first[0].0.clone()), 5).await;
        let rest: Vec<&str> = rest.iter().map(|(_, n)| n.as_str()).collect();
        assert_eq!(rest, ["b", "a"], "{}", redact(&url));
        assert!(page(Some("no-such-id".into()), 5).await.is_empty());
        s.mark_deleted(&b.id).await.unwrap();
        assert!(s.instance(&b.id).await.unwrap().is_none());
        let (n, _, vol) = {
            let mut tx = s.begin_read().await.unwrap();
            Store::usage(&mut tx, "p").await.unwrap()
        };
        assert_eq!(
            (n, vol),
            (2, 2),
            "usage counts live instances: {}",
            redact(&url)
        );
        assert_eq!(s.instance(&c.id).await.unwrap().unwrap().name, "c");
    })
    .await;
}

#[tokio::test]
async fn server_ids_are_never_reused_in_both_dialects() {
    on_both(|url| async move {
        let s = Store::connect(&url).await.unwrap();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..5 {
            let mut tx = s.begin().await.unwrap();
            let id = Store::next_server_id(&mut tx).await.unwrap();
            tx.commit().await.unwrap();
            assert!(seen.insert(id), "{}", redact(&url));
        }
        // A rolled-back allocation does not advance the counter, a committed one always does.
        let mut tx = s.begin().await.unwrap();
        Store::next_server_id(&mut tx).await.unwrap();
        drop(tx);
        let mut tx = s.begin().await.unwrap();
        assert_eq!(
            Store::next_server_id(&mut tx).await.unwrap(),
            6,
            "{}",
            redact(&url)
        );
    })
    .await;
}

/// Sixteen creates race over two store handles for a project with room for five: the
/// check-and-write transaction admits exactly five.
#[tokio::test]
async fn a_quota_check_admits_exactly_the_limit_across_controllers() {
    on_both(|url| async move {
        let a = Store::connect(&url).await.unwrap();
        let b = Store::connect(&url).await.unwrap();
        let mut tasks = vec![];
        for i in 0..16 {
            let s = if i % 2 == 0 { a.clone() } else { b.clone() };
            tasks.push(tokio::spawn(async move {
                let mut tx = s.begin().await.unwrap();
                let (n, _, _) = Store::usage(&mut tx, "q").await.unwrap();
                // Time for another create to read the same count, were it let in.
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                if n >= 5 {
                    return false;
                }
                insert(&mut tx, "q", "x").await;
                tx.commit().await.unwrap();
                true
            }));
        }
        let mut admitted = 0;
        for t in tasks {
            admitted += t.await.unwrap() as usize;
        }
        assert_eq!(admitted, 5, "{}", redact(&url));
        assert_eq!(
            a.instances_page("q", None, 100).await.unwrap().len(),
            5,
            "{}",
            redact(&url)
        );
    })
    .await;
}

/// Two workflows started at once on one instance from two handles: one owns it, the other is
/// told who does.
#[tokio::test]
async fn one_of_two_racing_workflows_owns_an_instance() {
    on_both(|url| async move {
        let a = Store::connect(&url).await.unwrap();
        let b = Store::connect(&url).await.unwrap();
        let member = vec!["i1".to_string()];
        let start = |s: Store, id: &'static str| {
            let member = member.clone();
            tokio::spawn(async move {
                let mut tx = s.begin().await.unwrap();
                let r = Store::insert_workflow(&mut tx, id, "switchover", "{}", &member).await;
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                match r {
                    Ok(()) => tx.commit().await.map_err(anyhow::Error::from),
                    Err(e) => Err(e),
                }
            })
        };
        let (x, y) = tokio::join!(start(a.clone(), "w1"), start(b, "w2"));
        let (x, y) = (x.unwrap(), y.unwrap());
        assert!(
            x.is_ok() != y.is_ok(),
            "exactly one wins: {x:?} {y:?} ({})",
            redact(&url)
        );
        let lost = x.err().or(y.err()).unwrap();
        let owned = lost
            .downcast_ref::<Owned>()
            .expect("the loser learns who owns it");
        assert_eq!(owned.instance, "i1");
        assert_eq!(
            a.workflow_owning("i1").await.unwrap().as_deref(),
            Some(owned.workflow.as_str())
        );
    })
    .await;
}

#[tokio::test]
async fn the_outbox_keeps_order_and_publishing_removes_in_both_dialects() {
    on_both(|url| async move {
        let s = Store::connect(&url).await.unwrap();
        let mut tx = s.begin().await.unwrap();
        for (i, payload) in [b"one".as_slice(), b"two", b"three"].iter().enumerate() {
            Store::enqueue(&mut tx, &format!("n{i}"), "i1", "prepare", payload)
                .await
                .unwrap();
        }
        tx.commit().await.unwrap();
        let rows = s.outbox().await.unwrap();
        let ids: Vec<&str> = rows.iter().map(|r| r.intent_id.as_str()).collect();
        assert_eq!(ids, ["n0", "n1", "n2"], "{}", redact(&url));
        assert_eq!(rows[2].payload, b"three");
        s.published(rows[0].seq, "n0").await.unwrap();
        let left: Vec<String> = s
            .outbox()
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.intent_id)
            .collect();
        assert_eq!(left, ["n1", "n2"], "{}", redact(&url));
        assert_eq!(
            s.latest_intent("i1").await.unwrap().map(|l| l.0),
            Some("prepare".to_string())
        );
    })
    .await;
}

/// Saving a module again (an update) keeps its place in the list.
#[tokio::test]
async fn a_module_saved_again_keeps_its_place_in_both_dialects() {
    on_both(|url| async move {
        let s = Store::connect(&url).await.unwrap();
        let module = |id: &str, name: &str| ModuleRow {
            id: id.into(),
            project_id: Some("p".into()),
            name: name.into(),
            kind: "ping".into(),
            description: None,
            contents_sealed: "00".into(),
            md5: "m".into(),
            datastore: None,
            datastore_version: None,
            auto_apply: false,
            visible: true,
            live_update: false,
            priority_apply: false,
            apply_order: 5,
            is_admin: false,
            created: "2026-01-01T00:00:00".into(),
            updated: "2026-01-01T00:00:00".into(),
        };
        s.save_module(&module("m1", "first")).await.unwrap();
        s.save_module(&module("m2", "second")).await.unwrap();
        s.save_module(&ModuleRow {
            live_update: true,
            ..module("m1", "first, renamed")
        })
        .await
        .unwrap();
        let got = s.modules_for("p").await.unwrap();
        let names: Vec<&str> = got.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["first, renamed", "second"], "{}", redact(&url));
        assert!(got[0].live_update && got[0].visible && !got[0].auto_apply);
    })
    .await;
}

#[tokio::test]
async fn nats_revocations_are_shared_by_every_controller_in_both_dialects() {
    on_both(|url| async move {
        // Two handles, as two controllers: what one revokes the other pushes.
        let (a, b) = (
            Store::connect(&url).await.unwrap(),
            Store::connect(&url).await.unwrap(),
        );
        a.add_revocation("UKEY1", 100).await.unwrap();
        b.add_revocation("UKEY2", 200).await.unwrap();
        // Revoked again (a delete retried): the first time stays.
        b.add_revocation("UKEY1", 300).await.unwrap();
        let got = a.revocations().await.unwrap();
        let want = [("UKEY1".to_string(), 100), ("UKEY2".to_string(), 200)];
        assert_eq!(got, want.into_iter().collect(), "{}", redact(&url));
    })
    .await;
}

#[test]
fn store_urls_name_their_dialect() {
    assert_eq!(Dialect::of("sqlite:///x.db").unwrap(), Dialect::Sqlite);
    assert!(Dialect::of("ftp://x").is_err());
}

/// A controller whose store is PostgreSQL serves what users do: a backup restored into a new
/// instance, and replicas with a switchover and an eject (durable workflows).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_on_postgresql_backs_up_restores_and_switches_over() {
    let env = coffer_tests::Env::start_with(coffer_tests::Opts {
        store_postgres: true,
        // The scenario's failover needs the dead source's host to stay dead.
        respawn_agents: false,
        ..Default::default()
    })
    .await;
    let store = coffer_tests::scenario::Store::Mariadb;
    coffer_tests::scenario::backup_and_restore(&env, store).await;
    coffer_tests::scenario::replication(&env, store).await;
}

/// Leases: one holder at a time, renewed by it, taken by another once lapsed or given up; a
/// workflow's claim the same.
#[tokio::test]
async fn leases_have_one_holder_until_they_lapse_in_both_dialects() {
    on_both(|url| async move {
        let a = Store::connect(&url).await.unwrap();
        let b = Store::connect(&url).await.unwrap();
        assert!(a.take_lease("leader", "c1", 60_000).await.unwrap());
        assert!(
            a.take_lease("leader", "c1", 60_000).await.unwrap(),
            "renewed"
        );
        assert!(!b.take_lease("leader", "c2", 60_000).await.unwrap(), "held");
        a.drop_lease("leader", "c2").await.unwrap();
        assert!(
            !b.take_lease("leader", "c2", 60_000).await.unwrap(),
            "not c2's to drop"
        );
        a.drop_lease("leader", "c1").await.unwrap();
        assert!(b.take_lease("leader", "c2", 300).await.unwrap(), "given up");
        // A short lease lapses unless renewed.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !a.take_lease("leader", "c1", 60_000).await.unwrap() {
            assert!(std::time::Instant::now() < deadline, "never lapsed");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert!(a.lease_held("leader").await.unwrap());
        assert!(!a.lease_held("nobody").await.unwrap());

        let mut tx = a.begin().await.unwrap();
        Store::insert_workflow(&mut tx, "w1", "detach", "{}", &["i1".to_string()])
            .await
            .unwrap();
        tx.commit().await.unwrap();
        assert_eq!(
            b.workflows_to_adopt("c2").await.unwrap(),
            ["w1"],
            "unclaimed"
        );
        assert!(a.claim_workflow("w1", "c1", 300).await.unwrap());
        assert!(
            !b.claim_workflow("w1", "c2", 60_000).await.unwrap(),
            "c1 drives it"
        );
        assert_eq!(a.workflows_to_adopt("c1").await.unwrap(), ["w1"], "its own");
        while !b.claim_workflow("w1", "c2", 60_000).await.unwrap() {
            assert!(
                std::time::Instant::now() < deadline,
                "the claim never lapsed"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert!(
            a.workflows_to_adopt("c1").await.unwrap().is_empty(),
            "c2 drives it now"
        );
        // The old driver's step result is refused; the new driver's is kept.
        let lost = a
            .save_workflow("w1", "c1", "{\"late\":1}")
            .await
            .unwrap_err();
        assert!(lost.is::<ClaimLost>(), "{lost}");
        b.save_workflow("w1", "c2", "{\"step\":2}").await.unwrap();
        assert_eq!(
            a.workflow("w1").await.unwrap().unwrap().state,
            "{\"step\":2}"
        );
    })
    .await;
}
