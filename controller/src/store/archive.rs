//! The lineage of archives: each instance's archive periods and the handovers between
//! sources, from which a restore crosses a switchover or a failover ([`crate::ops::lineage`]).

use super::Store;

/// One continuous period of an instance's archive.
#[derive(Debug, Clone, sqlx::FromRow, PartialEq, Eq)]
pub struct PeriodRow {
    pub instance_id: String,
    pub since_ms: i64,
    pub latest_ms: i64,
    /// The datastore's positions of the first and last transactions stored in it.
    pub first_position: String,
    pub last_position: String,
}

/// A replica that became the source.
#[derive(Debug, Clone, sqlx::FromRow, PartialEq, Eq)]
pub struct HandoverRow {
    pub instance_id: String,
    pub from_instance: String,
    pub position: String,
    pub at_ms: i64,
}

impl Store {
    /// Records what the agent reports of its archive's current period.
    pub async fn set_archive_period(&self, p: &PeriodRow) -> anyhow::Result<()> {
        sqlx::query(
            "INSERT INTO archive_periods (instance_id, since_ms, latest_ms, first_position, last_position) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (instance_id, since_ms) DO UPDATE SET \
             latest_ms = excluded.latest_ms, first_position = excluded.first_position, \
             last_position = excluded.last_position",
        )
        .bind(&p.instance_id)
        .bind(p.since_ms)
        .bind(p.latest_ms)
        .bind(&p.first_position)
        .bind(&p.last_position)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The archive periods of `instance`, oldest first.
    pub async fn archive_periods(&self, instance: &str) -> anyhow::Result<Vec<PeriodRow>> {
        Ok(
            sqlx::query_as(
                "SELECT * FROM archive_periods WHERE instance_id = $1 ORDER BY since_ms",
            )
            .bind(instance)
            .fetch_all(&self.pool)
            .await?,
        )
    }

    /// Records that `instance` took over from `from` at `position` (idempotent: a resumed
    /// step records it again at the same time).
    pub async fn record_handover(&self, h: &HandoverRow) -> anyhow::Result<()> {
        sqlx::query(
            "INSERT INTO archive_handovers (instance_id, from_instance, position, at_ms) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (instance_id, at_ms) DO NOTHING",
        )
        .bind(&h.instance_id)
        .bind(&h.from_instance)
        .bind(&h.position)
        .bind(h.at_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The handovers into `instance` (it became the source), oldest first.
    pub async fn handovers_into(&self, instance: &str) -> anyhow::Result<Vec<HandoverRow>> {
        Ok(
            sqlx::query_as("SELECT * FROM archive_handovers WHERE instance_id = $1 ORDER BY at_ms")
                .bind(instance)
                .fetch_all(&self.pool)
                .await?,
        )
    }

    /// The handovers away from `instance` (another became the source), oldest first.
    pub async fn handovers_from(&self, instance: &str) -> anyhow::Result<Vec<HandoverRow>> {
        Ok(sqlx::query_as(
            "SELECT * FROM archive_handovers WHERE from_instance = $1 ORDER BY at_ms",
        )
        .bind(instance)
        .fetch_all(&self.pool)
        .await?)
    }

    /// When the first completed backup of `instance` that its archive period begun at
    /// `since_ms` covers completed (Unix ms).
    pub async fn earliest_covered(
        &self,
        instance: &str,
        since_ms: i64,
    ) -> anyhow::Result<Option<i64>> {
        let row: Option<Option<i64>> = sqlx::query_scalar(
            "SELECT CAST(MIN(completed_ms) AS BIGINT) FROM backups WHERE instance_id = $1 \
             AND status = 'COMPLETED' AND deleted = FALSE AND archive_since_ms = $2 \
             AND completed_ms IS NOT NULL",
        )
        .bind(instance)
        .bind(since_ms)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.flatten())
    }
}
