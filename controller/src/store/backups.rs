//! Backups and their chains.

use super::*;

/// A backup's record.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct BackupRow {
    pub id: String,
    pub project_id: String,
    pub instance_id: String,
    pub name: String,
    pub description: Option<String>,
    pub status: crate::status::BackupStatus,
    pub parent_id: Option<String>,
    pub datastore_version_id: String,
    pub size_bytes: Option<i64>,
    pub checksum: Option<String>,
    pub location: Option<String>,
    pub progress: String,
    pub fault: Option<String>,
    pub intent_id: Option<String>,
    /// The key the backup is sealed with (`<operator key id>:<instance>`), as issued; None when
    /// unencrypted or taken before keys were per instance.
    pub key_id: Option<String>,
    pub created: String,
    pub updated: String,
    /// The archive's `since` (Unix ms) when the backup's position was in it: a restore from
    /// it can roll forward while the instance's archive still has that `since`.
    #[sqlx(default)]
    pub archive_since_ms: Option<i64>,
    /// When it completed (Unix ms).
    #[sqlx(default)]
    pub completed_ms: Option<i64>,
    /// The tables a restore of it must hold (a JSON list), as its agent recorded them.
    #[sqlx(default)]
    pub inventory: Option<String>,
    /// The change-log file its position is in, as its agent reported it.
    #[sqlx(default)]
    pub change_file: Option<String>,
}

impl Store {
    /// Records when a backup completed and whether the archive covers its position.
    pub async fn set_backup_archive(
        &self,
        id: &str,
        archive_since_ms: Option<i64>,
        completed_ms: i64,
    ) -> anyhow::Result<()> {
        sqlx::query("UPDATE backups SET archive_since_ms = $1, completed_ms = $2 WHERE id = $3")
            .bind(archive_since_ms)
            .bind(completed_ms)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The newest completed backup of `instance` that its archive (continuous since
    /// `since_ms`) covers, completed at or before `at_ms`: where a restore to `at_ms` starts.
    pub async fn pitr_base(
        &self,
        instance: &str,
        since_ms: i64,
        at_ms: i64,
    ) -> anyhow::Result<Option<BackupRow>> {
        Ok(sqlx::query_as(
            "SELECT * FROM backups WHERE instance_id = $1 AND status = 'COMPLETED' AND deleted = FALSE \
             AND archive_since_ms = $2 AND completed_ms <= $3 ORDER BY completed_ms DESC, rowid DESC LIMIT 1",
        )
        .bind(instance)
        .bind(since_ms)
        .bind(at_ms)
        .fetch_optional(&self.pool)
        .await?)
    }

    pub async fn backups_of(&self, project: &str) -> anyhow::Result<Vec<BackupRow>> {
        Ok(sqlx::query_as("SELECT * FROM backups WHERE project_id = $1 AND deleted = FALSE ORDER BY created DESC, rowid DESC")
            .bind(project)
            .fetch_all(&self.pool)
            .await?)
    }

    /// Whether any backup taken from `instance` is kept.
    pub async fn has_backups_of(&self, instance: &str) -> anyhow::Result<bool> {
        let row: Option<i64> = sqlx::query_scalar(
            "SELECT 1 FROM backups WHERE instance_id = $1 AND deleted = FALSE LIMIT 1",
        )
        .bind(instance)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.is_some())
    }

    pub async fn backup(&self, id: &str) -> anyhow::Result<Option<BackupRow>> {
        Ok(
            sqlx::query_as("SELECT * FROM backups WHERE id = $1 AND deleted = FALSE")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    /// The chain that restores backup `id`: its full backup first, `id` last (None if a link is
    /// missing, deleted, or the chain loops).
    pub async fn backup_chain(&self, id: &str) -> anyhow::Result<Option<Vec<BackupRow>>> {
        let mut chain = vec![];
        let mut next = Some(id.to_string());
        while let Some(b) = next {
            if chain.len() > 1000 || chain.iter().any(|x: &BackupRow| x.id == b) {
                return Ok(None);
            }
            let Some(row) = self.backup(&b).await? else {
                return Ok(None);
            };
            next = row.parent_id.clone();
            chain.push(row);
        }
        chain.reverse();
        Ok(Some(chain))
    }

    pub async fn backup_by_intent(&self, intent_id: &str) -> anyhow::Result<Option<BackupRow>> {
        Ok(sqlx::query_as("SELECT * FROM backups WHERE intent_id = $1")
            .bind(intent_id)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// Each instance's newest completed backup: (instance, completed at (Unix ms), size).
    pub async fn last_completed_backups(&self) -> anyhow::Result<Vec<(String, i64, i64)>> {
        Ok(sqlx::query_as(
            "SELECT b.instance_id, b.completed_ms, COALESCE(b.size_bytes, 0) FROM backups b \
             WHERE b.deleted = FALSE AND b.status = 'COMPLETED' AND b.completed_ms = \
             (SELECT MAX(c.completed_ms) FROM backups c WHERE c.instance_id = b.instance_id \
              AND c.deleted = FALSE AND c.status = 'COMPLETED')",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// Every backup NEW or BUILDING, of any instance.
    pub async fn running_backups(&self) -> anyhow::Result<Vec<BackupRow>> {
        Ok(sqlx::query_as(
            "SELECT * FROM backups WHERE deleted = FALSE AND status IN ('NEW', 'BUILDING')",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// Whether a backup of the instance is NEW or BUILDING.
    pub async fn backup_running(&self, instance_id: &str) -> anyhow::Result<bool> {
        Self::backup_running_in(&self.pool, instance_id).await
    }

    /// Which of `instances` (up to [`super::BATCH`]) have a backup NEW or BUILDING.
    pub async fn backups_running_among(
        &self,
        instances: &[&str],
    ) -> anyhow::Result<std::collections::HashSet<String>> {
        if instances.is_empty() {
            return Ok(Default::default());
        }
        let (marks, args) = super::padded(instances)?;
        let sql = format!(
            "SELECT DISTINCT instance_id FROM backups WHERE instance_id IN ({marks}) AND deleted = FALSE AND status IN ('NEW', 'BUILDING')"
        );
        let v: Vec<String> = sqlx::query_scalar_with(&sql, args)
            .fetch_all(&self.pool)
            .await?;
        Ok(v.into_iter().collect())
    }

    /// [`Store::backup_running`] read through `ex` (a transaction's own, for a check that
    /// must hold when the transaction commits).
    pub async fn backup_running_in<'e, E: Exec<'e>>(
        ex: E,
        instance_id: &str,
    ) -> anyhow::Result<bool> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM backups WHERE instance_id = $1 AND deleted = FALSE AND status IN ('NEW', 'BUILDING')",
        )
        .bind(instance_id)
        .fetch_one(ex)
        .await?;
        Ok(n > 0)
    }

    pub async fn insert_backup(tx: &mut Tx, b: &BackupRow) -> anyhow::Result<()> {
        sqlx::query(
            "INSERT INTO backups (id, project_id, instance_id, name, description, status, parent_id, datastore_version_id, \
             intent_id, key_id, created, updated) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        )
        .bind(&b.id)
        .bind(&b.project_id)
        .bind(&b.instance_id)
        .bind(&b.name)
        .bind(&b.description)
        .bind(b.status)
        .bind(&b.parent_id)
        .bind(&b.datastore_version_id)
        .bind(&b.intent_id)
        .bind(&b.key_id)
        .bind(&b.created)
        .bind(&b.updated)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// Records a backup's progress or outcome.
    pub async fn update_backup(
        &self,
        id: &str,
        status: crate::status::BackupStatus,
        progress: Option<&str>,
        result: Option<(i64, &str, &str)>,
        fault: Option<&str>,
    ) -> anyhow::Result<()> {
        sqlx::query(
            "UPDATE backups SET status = $1, progress = COALESCE($2, progress), size_bytes = COALESCE($3, size_bytes), \
             checksum = COALESCE($4, checksum), location = COALESCE($5, location), fault = COALESCE($6, fault), updated = $7 \
             WHERE id = $8 AND status NOT IN ('COMPLETED', 'FAILED')",
        )
        .bind(status)
        .bind(progress)
        .bind(result.map(|r| r.0))
        .bind(result.map(|r| r.1))
        .bind(result.map(|r| r.2))
        .bind(fault)
        .bind(now())
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn count_backups(tx: &mut Tx, project: &str) -> anyhow::Result<i64> {
        Ok(sqlx::query_scalar(
            "SELECT COUNT(*) FROM backups WHERE project_id = $1 AND deleted = FALSE",
        )
        .bind(project)
        .fetch_one(&mut **tx)
        .await?)
    }
}
