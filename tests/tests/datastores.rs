//! The scenarios every datastore passes, written once in `coffer_tests::scenario` and run here
//! for MariaDB, PostgreSQL and Redis against real servers and their real clients.

use coffer_tests::scenario::{self, Store};
use coffer_tests::Env;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_backup_restores_the_acknowledged_data() {
    scenario::backup_and_restore(&Env::start().await, Store::Mariadb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_backup_restores_the_acknowledged_data() {
    scenario::backup_and_restore(&Env::start().await, Store::Postgresql).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_backup_restores_the_acknowledged_data() {
    scenario::backup_and_restore(&Env::start().await, Store::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_configuration_applies_live_and_after_restart() {
    scenario::configuration_live_and_restart(&Env::start().await, Store::Postgresql).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_configuration_applies_live_and_after_restart() {
    scenario::configuration_live_and_restart(&Env::start().await, Store::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_configuration_applies_live_and_after_restart() {
    scenario::configuration_live_and_restart(&Env::start().await, Store::Mariadb).await;
}

/// The committed PostgreSQL rules are what the installed server's `pg_settings` says
/// (`cargo xtask gen-rules` rewrites them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_parameter_rules_match_the_server_for_postgresql() {
    use coffer_strategies::config_rules::{postgresql_rules, PgSetting, POSTGRESQL_RULES_QUERY};
    use sqlx::{ConnectOptions, Connection, Row};
    let env = Env::start().await;
    let version = Store::Postgresql.register(&env);
    let (id, view) = scenario::create_active(&env, Store::Postgresql, &version, "rules").await;
    let mut c = sqlx::postgres::PgConnectOptions::new()
        .host(view["ip"][0].as_str().unwrap())
        .port(view["port"].as_u64().unwrap() as u16)
        .username(scenario::USER)
        .password(scenario::PASSWORD)
        .database("shop")
        .connect()
        .await
        .unwrap();
    let settings: Vec<PgSetting> = sqlx::query(POSTGRESQL_RULES_QUERY)
        .fetch_all(&mut c)
        .await
        .unwrap()
        .iter()
        .map(|r| PgSetting {
            name: r.get(0),
            vartype: r.get(1),
            min: r.get(2),
            max: r.get(3),
            enumvals: r.get(4),
            context: r.get(5),
        })
        .collect();
    c.close().await.unwrap();
    let text = serde_json::to_string_pretty(&postgresql_rules(&settings).unwrap()).unwrap() + "\n";
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("../proto/rules/postgresql-{version}.json"));
    if std::env::var("COFFER_UPDATE_RULES").as_deref() == Ok("1") {
        std::fs::write(&path, &text).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == text,
        "{} is not what the installed server describes; regenerate it with `cargo xtask gen-rules` and review the diff",
        path.display()
    );
    env.delete_and_wait_gone(&id).await;
}

fn no_respawn() -> coffer_tests::Opts {
    coffer_tests::Opts {
        respawn_agents: false,
        ..coffer_tests::Opts::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_replicas_switch_over_and_fail_over() {
    scenario::replication(&Env::start_with(no_respawn()).await, Store::Postgresql).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_replicas_switch_over_and_fail_over() {
    scenario::replication(&Env::start_with(no_respawn()).await, Store::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_replicas_switch_over_and_fail_over() {
    scenario::replication(&Env::start_with(no_respawn()).await, Store::Mariadb).await;
}

fn partitionable() -> coffer_tests::Opts {
    coffer_tests::Opts {
        nats_proxy: true,
        respawn_agents: false,
        ..coffer_tests::Opts::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_partitioned_source_fences_itself() {
    scenario::fencing(&Env::start_with(partitionable()).await, Store::Postgresql).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_partitioned_source_fences_itself() {
    scenario::fencing(&Env::start_with(partitionable()).await, Store::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_partitioned_source_fences_itself() {
    scenario::fencing(&Env::start_with(partitionable()).await, Store::Mariadb).await;
}
