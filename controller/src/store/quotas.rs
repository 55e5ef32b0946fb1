//! Quotas and usage.

use super::*;

/// Trove's quota resources and default limits (-1 = unlimited).
pub const QUOTA_DEFAULTS: &[(&str, i64)] = &[
    ("instances", 10),
    ("ram", -1),
    ("volumes", 40),
    ("backups", 50),
];

impl Store {
    /// A project's limits (defaults where none is set), in Trove's resource order.
    pub async fn quota_limits(&self, project: &str) -> anyhow::Result<Vec<(String, i64)>> {
        Self::quota_limits_with(&self.pool, project).await
    }

    /// A project's limits read through `ex`: a transaction reads them on its own connection
    /// (asking the pool for a second one while holding a write lock starves the pool).
    pub async fn quota_limits_with<'e, E: Exec<'e>>(
        ex: E,
        project: &str,
    ) -> anyhow::Result<Vec<(String, i64)>> {
        let set: Vec<(String, i64)> =
            sqlx::query_as("SELECT resource, hard_limit FROM quotas WHERE project_id = $1")
                .bind(project)
                .fetch_all(ex)
                .await?;
        Ok(QUOTA_DEFAULTS
            .iter()
            .map(|(r, d)| {
                let limit = set.iter().find(|(k, _)| k == r).map_or(*d, |(_, l)| *l);
                (r.to_string(), limit)
            })
            .collect())
    }

    pub async fn set_quota(&self, project: &str, resource: &str, limit: i64) -> anyhow::Result<()> {
        sqlx::query(
            "INSERT INTO quotas (project_id, resource, hard_limit) VALUES ($1, $2, $3) \
             ON CONFLICT (project_id, resource) DO UPDATE SET hard_limit = excluded.hard_limit",
        )
        .bind(project)
        .bind(resource)
        .bind(limit)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// What a project uses: (instances, ram MB, volume GB), from its live instances, read inside
    /// `tx` so a check and the insert that follows it cannot interleave with another create.
    pub async fn usage(tx: &mut Tx, project: &str) -> anyhow::Result<(i64, i64, i64)> {
        Ok(sqlx::query_as(
            "SELECT COUNT(*) AS n, CAST(COALESCE(SUM(f.ram), 0) AS BIGINT) AS ram, CAST(COALESCE(SUM(i.volume_size), 0) AS BIGINT) AS vol \
             FROM instances i LEFT JOIN flavors f ON f.id = i.flavor_id WHERE i.project_id = $1 AND i.deleted = FALSE \
             AND i.id NOT IN (SELECT throwaway_id FROM restore_drills WHERE project_id = $1 AND throwaway_id IS NOT NULL)",
        )
        .bind(project)
        .fetch_one(&mut **tx)
        .await?)
    }
}
