//! The controller's state store through sqlx's `Any` driver: SQLite (the default, in WAL mode) or
//! a database server that several controllers share, chosen by URL ([`dialect`]), with migrations
//! embedded in the binary (no database needed at compile time). Check-and-write sequences run in [`Store::begin`]'s transaction, so
//! two requests cannot both pass a check, on one controller or several.

use std::collections::{HashMap, HashSet};

use anyhow::Context;
use sqlx::any::{Any, AnyArguments, AnyTypeInfo};
use sqlx::error::BoxDynError;
use sqlx::migrate::Migrator;
use sqlx::AnyPool;
use sqlx::{Decode, Row, Transaction, Type};

mod archive;
mod backups;
mod catalog;
mod configurations;
pub mod dialect;
mod drills;
mod enrolment;
mod instances;
mod intents;
mod leases;
mod modules;
mod quotas;
mod schedules;
mod workflows;
pub use archive::{HandoverRow, PeriodRow};
pub use backups::BackupRow;
pub use catalog::{DatastoreRow, FlavorRow, VersionRow};
pub use configurations::ConfigurationRow;
pub use dialect::{Dialect, Flag};
pub use drills::{DrillOutcome, DrillRow};
pub use enrolment::TokenRow;
pub use instances::HeartbeatRow;
pub use instances::{InstanceRow, NewRow};
pub use intents::{IntentTooLarge, OutboxRow, MAX_INTENT_BYTES};
pub use modules::ModuleRow;
pub use quotas::QUOTA_DEFAULTS;
pub use schedules::ScheduleRow;
pub use workflows::{ClaimLost, Owned, WorkflowRow};

/// A transaction on the store.
pub type Tx = Transaction<'static, Any>;

/// Anything a store query runs on: the pool or a transaction.
pub trait Exec<'e>: sqlx::Executor<'e, Database = Any> {}
impl<'e, T: sqlx::Executor<'e, Database = Any>> Exec<'e> for T {}

/// Text-valued enums (`sqlx::Type` derived with renamed variants) stored as `TEXT` in both
/// dialects: the derive encodes for any driver but
/// types and decodes for each driver but `Any`; decoding goes through their serde names, which
/// are the same.
macro_rules! text_type {
    ($($t:ty),*) => {$(
        impl Type<Any> for $t {
            fn type_info() -> AnyTypeInfo {
                <str as Type<Any>>::type_info()
            }
        }
        impl<'r> Decode<'r, Any> for $t {
            fn decode(v: <Any as sqlx::Database>::ValueRef<'r>) -> Result<Self, BoxDynError> {
                let s = <&str as Decode<Any>>::decode(v)?;
                Ok(serde_json::from_value(serde_json::Value::String(s.into()))?)
            }
        }
    )*};
}
text_type!(
    crate::status::Task,
    crate::status::PlacedBy,
    crate::status::BackupStatus
);

#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    dialect: Dialect,
}

/// Ids read in one statement at most (a longer list is read in several).
pub const BATCH: usize = 256;

/// For reads of many rows by id (heartbeat batches, list pages): the `IN (...)` placeholders
/// and the arguments binding the ids to them. The count is rounded up to a power of two by
/// repeating the last id, so nine statement shapes serve every batch and the prepared-statement
/// caches hold them all. `ids` must be 1..=[`BATCH`] long.
pub(crate) fn padded<'q>(ids: &[&'q str]) -> anyhow::Result<(String, AnyArguments<'q>)> {
    use sqlx::Arguments;
    let n = ids.len().next_power_of_two();
    let mut args = AnyArguments::default();
    for i in 0..n {
        args.add(ids[i.min(ids.len() - 1)])
            .map_err(|e| anyhow::anyhow!(e))?;
    }
    let marks = (1..=n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ");
    Ok((marks, args))
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
    /// Opens the store at `url` (`sqlite://PATH`, created if missing, or a server's: [`dialect`]) and
    /// applies all migrations.
    pub async fn connect(url: &str) -> anyhow::Result<Store> {
        let s = Self::connect_unmigrated(url).await?;
        s.migrate(s.dialect.migrations().migrations.len()).await?;
        Ok(s)
    }

    /// Opens without migrating (tests of the migration path).
    pub async fn connect_unmigrated(url: &str) -> anyhow::Result<Store> {
        let dialect = Dialect::of(url)?;
        let pool = dialect.connect(url).await?;
        Ok(Store { pool, dialect })
    }

    /// The SQLite store at `path`.
    pub async fn open(path: &std::path::Path) -> anyhow::Result<Store> {
        Self::connect(&format!("sqlite://{}", path.display())).await
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// Applies the first `upto` migrations.
    pub async fn migrate(&self, upto: usize) -> anyhow::Result<()> {
        let all = self.dialect.migrations();
        let m = Migrator {
            migrations: std::borrow::Cow::Owned(all.migrations[..upto].to_vec()),
            ..Migrator::DEFAULT
        };
        m.run(&self.pool).await.context("migrating the store")
    }

    /// Starts a check-and-write transaction: it runs alone ([`Dialect::begin`]).
    pub async fn begin(&self) -> anyhow::Result<Tx> {
        self.dialect.begin(&self.pool).await
    }

    /// A read-only transaction: one consistent snapshot, no write lock taken.
    pub async fn begin_read(&self) -> anyhow::Result<Tx> {
        self.dialect.begin_read(&self.pool).await
    }

    /// Marks a row of `table` (`backups`, `configurations`, `modules`: always one of the
    /// store's own names, never input) deleted.
    pub async fn soft_delete(&self, table: &'static str, id: &str) -> anyhow::Result<()> {
        sqlx::query(&format!(
            "UPDATE {table} SET deleted = TRUE, updated = $1 WHERE id = $2"
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
            let url = format!("sqlite://{}", path.display());
            let s = Store::connect_unmigrated(&url).await.unwrap();
            s.migrate(dialect::SQLITE_MIGRATIONS.migrations.len() - 1)
                .await
                .unwrap();
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
