//! Restore drills ([`crate::workflow::drill`]) and what they found.

use super::{now, Store};

/// A restore drill: running, or finished with its signed report.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DrillRow {
    pub id: String,
    pub project_id: String,
    pub instance_id: String,
    /// RUNNING, PASSED or FAILED.
    pub status: String,
    /// The report as signed (JSON text), its signature (hex) and the signer's public key.
    pub report: Option<String>,
    pub signature: Option<String>,
    pub signer: Option<String>,
    pub created: String,
    pub finished: Option<String>,
}

/// A finished drill's outcome, written with the instance's drill fault in one transaction.
pub struct DrillOutcome<'a> {
    pub passed: bool,
    pub report: &'a str,
    pub signature: &'a str,
    pub signer: &'a str,
    /// What failed (set on the instance), or None when the drill passed (cleared).
    pub fault: Option<&'a str>,
}

impl Store {
    /// Records a RUNNING drill of `instance` and the id its throwaway instance will have
    /// (outside the project's quota).
    pub async fn insert_drill(
        &self,
        id: &str,
        project: &str,
        instance: &str,
        throwaway: &str,
    ) -> anyhow::Result<()> {
        sqlx::query(
            "INSERT INTO restore_drills (id, project_id, instance_id, status, created, throwaway_id) \
             VALUES ($1, $2, $3, 'RUNNING', $4, $5)",
        )
        .bind(id)
        .bind(project)
        .bind(instance)
        .bind(now())
        .bind(throwaway)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn forget_drill(&self, id: &str) -> anyhow::Result<()> {
        sqlx::query("DELETE FROM restore_drills WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn drill(&self, id: &str) -> anyhow::Result<Option<DrillRow>> {
        Ok(sqlx::query_as("SELECT * FROM restore_drills WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// A project's drills, newest first.
    pub async fn drills_of(&self, project: &str) -> anyhow::Result<Vec<DrillRow>> {
        Ok(sqlx::query_as(
            "SELECT * FROM restore_drills WHERE project_id = $1 ORDER BY created DESC, id",
        )
        .bind(project)
        .fetch_all(&self.pool)
        .await?)
    }

    /// The instance's newest drill.
    pub async fn latest_drill(&self, instance: &str) -> anyhow::Result<Option<DrillRow>> {
        Ok(sqlx::query_as(
            "SELECT * FROM restore_drills WHERE instance_id = $1 ORDER BY created DESC, id LIMIT 1",
        )
        .bind(instance)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// The newest finished drill of every live instance that has one.
    pub async fn latest_finished_drills(&self) -> anyhow::Result<Vec<DrillRow>> {
        Ok(sqlx::query_as(
            "SELECT d.* FROM restore_drills d JOIN instances i ON i.id = d.instance_id \
             WHERE i.deleted = FALSE AND d.status <> 'RUNNING' AND d.finished IS NOT NULL \
             AND NOT EXISTS (SELECT 1 FROM restore_drills e WHERE e.instance_id = d.instance_id \
             AND e.status <> 'RUNNING' AND e.finished IS NOT NULL \
             AND (e.finished > d.finished OR (e.finished = d.finished AND e.id > d.id)))",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// Drills running anywhere (drills run one at a time, so they do not starve tenants).
    pub async fn running_drills(&self) -> anyhow::Result<Vec<DrillRow>> {
        Ok(
            sqlx::query_as("SELECT * FROM restore_drills WHERE status = 'RUNNING'")
                .fetch_all(&self.pool)
                .await?,
        )
    }

    /// Ends a drill and sets (or clears) the instance's drill fault.
    pub async fn finish_drill(
        &self,
        id: &str,
        instance: &str,
        o: &DrillOutcome<'_>,
    ) -> anyhow::Result<()> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "UPDATE restore_drills SET status = $1, report = $2, signature = $3, signer = $4, \
             finished = $5 WHERE id = $6",
        )
        .bind(if o.passed { "PASSED" } else { "FAILED" })
        .bind(o.report)
        .bind(o.signature)
        .bind(o.signer)
        .bind(now())
        .bind(id)
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE instances SET drill_fault = $1 WHERE id = $2")
            .bind(o.fault)
            .bind(instance)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// What the backup's agent recorded: the tables a restore must hold (a JSON list) and the
    /// change-log file its position is in.
    pub async fn set_backup_recorded(
        &self,
        id: &str,
        inventory: &str,
        change_file: &str,
    ) -> anyhow::Result<()> {
        sqlx::query("UPDATE backups SET inventory = $1, change_file = $2 WHERE id = $3")
            .bind(inventory)
            .bind((!change_file.is_empty()).then_some(change_file))
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The change-log file of the oldest kept backup the instance's archive covers: archived
    /// files before it serve no point of the recovery window. None when there is no such
    /// backup, or one whose file is not known (taken by an older agent): nothing may go then.
    pub async fn oldest_needed_change_file(
        &self,
        instance: &str,
    ) -> anyhow::Result<Option<String>> {
        let files: Vec<(Option<String>,)> = sqlx::query_as(
            "SELECT b.change_file FROM backups b JOIN instances i ON i.id = b.instance_id \
             WHERE b.instance_id = $1 AND b.status = 'COMPLETED' AND b.deleted = FALSE \
             AND b.archive_since_ms IS NOT NULL AND i.archive_since_ms IS NOT NULL \
             ORDER BY b.completed_ms, b.created",
        )
        .bind(instance)
        .fetch_all(&self.pool)
        .await?;
        if files
            .iter()
            .any(|(f,)| f.as_deref().unwrap_or_default().is_empty())
        {
            return Ok(None);
        }
        Ok(files.into_iter().next().and_then(|(f,)| f))
    }
}
