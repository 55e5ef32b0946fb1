//! Which database holds the controller's own state, and everything that differs between them:
//! SQLite (the embedded default: one controller, a file under its data directory) or PostgreSQL
//! (several controllers sharing one store). The SQL of `store/` is written once, in the subset
//! both take (`$1` parameters, `TRUE`/`FALSE` flags, `ON CONFLICT`, `RETURNING`); the URL, the
//! migrations, the connection settings and how a check-and-write transaction serialises live here.

use std::time::Duration;

use anyhow::Context;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::Migrator;
use sqlx::AnyPool;
use sqlx::Executor;

use sqlx::any::{Any, AnyTypeInfo, AnyTypeInfoKind};
use sqlx::error::BoxDynError;
use sqlx::{Decode, Type, ValueRef};

use super::Tx;

/// The store's migrations, embedded at build time: one numbered file per change in each dialect
/// (`migrations/sqlite/`, `migrations/postgres/`), the same tables and columns in both; a new one
/// is added as the next number in both directories, never edited.
pub static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/sqlite");
pub static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/postgres");

/// The key of the advisory lock a PostgreSQL write transaction takes ("coffer" in ASCII).
const WRITE_LOCK: i64 = 0x636f_6666_6572;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    /// The dialect a store URL names (`sqlite://PATH`, `postgres://...` or `postgresql://...`).
    pub fn of(url: &str) -> anyhow::Result<Dialect> {
        match url.split_once("://").map(|(scheme, _)| scheme) {
            Some("sqlite") => Ok(Dialect::Sqlite),
            Some("postgres" | "postgresql") => Ok(Dialect::Postgres),
            _ => anyhow::bail!(
                "the store URL must start with sqlite:// or postgres:// (got '{}')",
                redact(url)
            ),
        }
    }

    /// The store's clock, Unix milliseconds, as an SQL expression (leases run on it, so the
    /// controllers' own clocks need not agree).
    pub fn now_ms(self) -> &'static str {
        match self {
            Dialect::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)",
            Dialect::Postgres => "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
        }
    }

    pub fn migrations(self) -> &'static Migrator {
        match self {
            Dialect::Sqlite => &SQLITE_MIGRATIONS,
            Dialect::Postgres => &POSTGRES_MIGRATIONS,
        }
    }

    /// A pool on `url`. SQLite: the file is created if missing, in WAL mode, and a writer waits
    /// up to 10 s for another. PostgreSQL: the database must exist.
    pub(super) async fn connect(self, url: &str) -> anyhow::Result<AnyPool> {
        sqlx::any::install_default_drivers();
        let (url, max) = match self {
            Dialect::Sqlite if url.contains('?') => (url.to_string(), 16),
            Dialect::Sqlite => (format!("{url}?mode=rwc"), 16),
            Dialect::Postgres => (url.to_string(), 16),
        };
        let opts: AnyConnectOptions = url
            .parse()
            .with_context(|| format!("the store URL '{}' does not parse", redact(&url)))?;
        let mut pool = AnyPoolOptions::new()
            .max_connections(max)
            .acquire_timeout(Duration::from_secs(30));
        if self == Dialect::Sqlite {
            pool = pool.after_connect(|conn, _| {
                Box::pin(async move {
                    conn.execute(
                        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
                         PRAGMA busy_timeout = 10000; PRAGMA foreign_keys = ON;",
                    )
                    .await?;
                    Ok(())
                })
            });
        }
        pool.connect_with(opts)
            .await
            .with_context(|| format!("opening the store {}", redact(&url)))
    }

    /// A check-and-write transaction: no other one runs beside it, on any controller sharing
    /// the store. SQLite takes its write lock at `BEGIN IMMEDIATE`; PostgreSQL takes a
    /// transaction-scoped advisory lock, released at commit or rollback (also when the
    /// controller holding it dies and its connection closes).
    pub(super) async fn begin(self, pool: &AnyPool) -> anyhow::Result<Tx> {
        Ok(match self {
            Dialect::Sqlite => pool.begin_with("BEGIN IMMEDIATE").await?,
            Dialect::Postgres => {
                let mut tx = pool.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(WRITE_LOCK)
                    .execute(&mut *tx)
                    .await?;
                tx
            }
        })
    }

    /// A read-only transaction: one consistent snapshot, no write lock taken.
    pub(super) async fn begin_read(self, pool: &AnyPool) -> anyhow::Result<Tx> {
        Ok(match self {
            Dialect::Sqlite => pool.begin().await?,
            Dialect::Postgres => {
                pool.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    .await?
            }
        })
    }
}

/// A flag column read back: `BOOLEAN` in PostgreSQL, an `INTEGER` 0/1 in SQLite. Row fields stay
/// `bool` with `#[sqlx(try_from = "Flag")]`.
pub struct Flag(bool);

impl From<Flag> for bool {
    fn from(f: Flag) -> bool {
        f.0
    }
}

impl Type<Any> for Flag {
    fn type_info() -> AnyTypeInfo {
        <bool as Type<Any>>::type_info()
    }

    fn compatible(ty: &AnyTypeInfo) -> bool {
        ty.kind() == AnyTypeInfoKind::Bool || ty.kind().is_integer()
    }
}

impl<'r> Decode<'r, Any> for Flag {
    fn decode(v: <Any as sqlx::Database>::ValueRef<'r>) -> Result<Self, BoxDynError> {
        Ok(Flag(if v.type_info().kind() == AnyTypeInfoKind::Bool {
            <bool as Decode<Any>>::decode(v)?
        } else {
            <i64 as Decode<Any>>::decode(v)? != 0
        }))
    }
}

/// `url` with any password replaced by `***` (for errors and logs).
pub fn redact(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.split_once('@') {
            Some((userinfo, host)) => {
                let user = userinfo.split(':').next().unwrap_or("");
                format!("{scheme}://{user}:***@{host}")
            }
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_their_dialect_and_passwords_never_show() {
        assert_eq!(
            Dialect::of("sqlite:///var/lib/c.db").unwrap(),
            Dialect::Sqlite
        );
        assert_eq!(
            Dialect::of("postgres://c:pw@db/coffer").unwrap(),
            Dialect::Postgres
        );
        let e = Dialect::of("oracle://c:secret@db/coffer")
            .unwrap_err()
            .to_string();
        assert!(e.contains("sqlite:// or postgres://"), "{e}");
        assert!(!e.contains("secret"), "{e}");
        assert_eq!(
            redact("postgres://c:pw@db:5432/x"),
            "postgres://c:***@db:5432/x"
        );
    }
}
