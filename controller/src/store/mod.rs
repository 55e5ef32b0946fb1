//! The controller's state store: SQLite in WAL mode through sqlx, with migrations embedded in the
//! binary (no database needed at compile time). Check-and-write sequences use `BEGIN IMMEDIATE` so
//! two requests cannot both pass a check.

use std::borrow::Cow;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Row, Sqlite, Transaction};

mod backups;
mod catalog;
mod configurations;
mod enrolment;
mod instances;
mod intents;
mod modules;
mod quotas;
mod workflows;
pub use backups::BackupRow;
pub use catalog::{DatastoreRow, FlavorRow, VersionRow};
pub use configurations::ConfigurationRow;
pub use enrolment::TokenRow;
pub use instances::{InstanceRow, NewRow};
pub use intents::{IntentTooLarge, OutboxRow, MAX_INTENT_BYTES};
pub use modules::ModuleRow;
pub use quotas::QUOTA_DEFAULTS;
pub use workflows::{Owned, WorkflowRow};

/// The store's migrations (`migrations/sqlite/`), embedded at build time; a new one is added as
/// the next numbered file, never edited.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite");

/// A transaction on the store.
pub type Tx = Transaction<'static, Sqlite>;

#[derive(Clone)]
pub struct Store {
    pool: SqlitePool,
}

fn migrator(upto: usize) -> Migrator {
    Migrator {
        migrations: Cow::Owned(MIGRATOR.migrations[..upto].to_vec()),
        ..Migrator::DEFAULT
    }
}

/// Current UTC time in Trove's format (`2019-12-23T20:58:35`).
pub fn now() -> String {
    let f = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]");
    time::OffsetDateTime::now_utc()
        .format(&f)
        .unwrap_or_default()
}

/// Seconds since a timestamp written by [`now`] (0 if unparsable).
pub fn age_secs(ts: &str) -> i64 {
    let f = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]");
    match time::PrimitiveDateTime::parse(ts, &f) {
        Ok(t) => (time::OffsetDateTime::now_utc() - t.assume_utc()).whole_seconds(),
        Err(_) => 0,
    }
}

impl Store {
    /// Opens (creating if needed) the store at `path` and applies all migrations.
    pub async fn open(path: &Path) -> anyhow::Result<Store> {
        let s = Self::open_unmigrated(path).await?;
        s.migrate(MIGRATOR.migrations.len()).await?;
        Ok(s)
    }

    /// Opens without migrating (tests of the migration path).
    pub async fn open_unmigrated(path: &Path) -> anyhow::Result<Store> {
        let opts = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(16)
            .connect_with(opts)
            .await
            .with_context(|| format!("opening store {}", path.display()))?;
        Ok(Store { pool })
    }

    /// Applies the first `upto` migrations.
    pub async fn migrate(&self, upto: usize) -> anyhow::Result<()> {
        migrator(upto)
            .run(&self.pool)
            .await
            .context("migrating the store")
    }

    /// Starts a write transaction that takes the write lock at once.
    pub async fn begin(&self) -> anyhow::Result<Tx> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }

    /// A read-only transaction: one consistent snapshot, no write lock taken.
    pub async fn begin_read(&self) -> anyhow::Result<Tx> {
        Ok(self.pool.begin().await?)
    }

    /// Marks a row of `table` (`backups`, `configurations`, `modules`: always one of the
    /// store's own names, never input) deleted.
    pub async fn soft_delete(&self, table: &'static str, id: &str) -> anyhow::Result<()> {
        sqlx::query(&format!(
            "UPDATE {table} SET deleted = 1, updated = ? WHERE id = ?"
        ))
        .bind(now())
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_store_from_the_previous_migration_set_is_upgraded_with_its_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        {
            let s = Store::open_unmigrated(&path).await.unwrap();
            s.migrate(MIGRATOR.migrations.len() - 1).await.unwrap();
            sqlx::query(
                "INSERT INTO instances (id, project_id, name, flavor_id, datastore_version_id, volume_size, task, \
                 task_started, service_status, server_id, created, updated) \
                 VALUES ('i1', 'p', 'old', '1', 'v', 1, 'none', 't', 'running', 7, 't', 't')",
            )
            .execute(&s.pool)
            .await
            .unwrap();
            s.pool.close().await;
        }
        let s = Store::open(&path).await.unwrap();
        let i = s.instance("i1").await.unwrap().unwrap();
        assert_eq!(i.name, "old");
        assert_eq!(i.server_id, 7);
        assert_eq!(i.capabilities, "");
        s.set_agent_info("i1", "0.1.0", "prepare,restart")
            .await
            .unwrap();
        assert_eq!(
            s.instance("i1").await.unwrap().unwrap().capabilities,
            "prepare,restart"
        );
        // Opening again is a no-op.
        drop(s);
        Store::open(&path).await.unwrap();
    }

    #[tokio::test]
    async fn server_ids_are_never_reused() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("c.db")).await.unwrap();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..5 {
            let mut tx = s.begin().await.unwrap();
            let id = Store::next_server_id(&mut tx).await.unwrap();
            tx.commit().await.unwrap();
            assert!(seen.insert(id));
        }
        // A rolled-back allocation does not advance the counter, a committed one always does.
        let mut tx = s.begin().await.unwrap();
        Store::next_server_id(&mut tx).await.unwrap();
        drop(tx);
        let mut tx = s.begin().await.unwrap();
        assert_eq!(Store::next_server_id(&mut tx).await.unwrap(), 6);
    }
}
