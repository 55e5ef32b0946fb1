//! Backup schedules and the backups each one took.

use super::*;

/// A backup schedule.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ScheduleRow {
    pub id: String,
    pub project_id: String,
    pub instance_id: String,
    pub name: String,
    /// A cron pattern (five fields, or six with seconds), in UTC.
    pub pattern: String,
    /// Every how many runs a full backup is taken (1: always full).
    pub full_every: i64,
    pub keep_last: Option<i64>,
    pub keep_days: Option<i64>,
    /// When the next run is due (Unix ms).
    pub next_run_ms: i64,
    /// Runs so far (started or skipped).
    pub runs: i64,
    pub last_run: Option<String>,
    /// What the last run did (the backup it started, or why it was skipped).
    pub last_result: Option<String>,
    pub created: String,
    /// Retention tiers: the newest backup of each of the last N days, ISO weeks, months.
    #[sqlx(default)]
    pub keep_daily: Option<i64>,
    #[sqlx(default)]
    pub keep_weekly: Option<i64>,
    #[sqlx(default)]
    pub keep_monthly: Option<i64>,
    /// What a run does: `backup` (or empty, for a schedule made before drills) or `drill`.
    #[sqlx(default)]
    pub kind: String,
}

impl ScheduleRow {
    /// Whether its runs are restore drills rather than backups.
    pub fn drills(&self) -> bool {
        self.kind == "drill"
    }

    /// Whether any retention rule is set (else its backups stay until deleted by hand).
    pub fn retains(&self) -> bool {
        [
            self.keep_last,
            self.keep_days,
            self.keep_daily,
            self.keep_weekly,
            self.keep_monthly,
        ]
        .iter()
        .any(Option::is_some)
    }
}

impl Store {
    pub async fn insert_schedule(&self, s: &ScheduleRow) -> anyhow::Result<()> {
        sqlx::query(
            "INSERT INTO backup_schedules (id, project_id, instance_id, name, pattern, full_every, keep_last, keep_days, \
             next_run_ms, runs, created, kind, keep_daily, keep_weekly, keep_monthly) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 0, $10, $11, $12, $13, $14)",
        )
        .bind(&s.id)
        .bind(&s.project_id)
        .bind(&s.instance_id)
        .bind(&s.name)
        .bind(&s.pattern)
        .bind(s.full_every)
        .bind(s.keep_last)
        .bind(s.keep_days)
        .bind(s.next_run_ms)
        .bind(&s.created)
        .bind(if s.kind.is_empty() { "backup" } else { &s.kind })
        .bind(s.keep_daily)
        .bind(s.keep_weekly)
        .bind(s.keep_monthly)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// A project's schedules, oldest first.
    pub async fn schedules_of(&self, project: &str) -> anyhow::Result<Vec<ScheduleRow>> {
        Ok(sqlx::query_as(
            "SELECT * FROM backup_schedules WHERE project_id = $1 ORDER BY created, id",
        )
        .bind(project)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Every schedule (retention looks at each).
    pub async fn all_schedules(&self) -> anyhow::Result<Vec<ScheduleRow>> {
        Ok(sqlx::query_as("SELECT * FROM backup_schedules")
            .fetch_all(&self.pool)
            .await?)
    }

    pub async fn schedule(&self, id: &str) -> anyhow::Result<Option<ScheduleRow>> {
        Ok(
            sqlx::query_as("SELECT * FROM backup_schedules WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    pub async fn delete_schedule(&self, id: &str) -> anyhow::Result<()> {
        sqlx::query("DELETE FROM backup_schedules WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The schedules due at `now_ms`.
    pub async fn due_schedules(&self, now_ms: i64) -> anyhow::Result<Vec<ScheduleRow>> {
        Ok(
            sqlx::query_as("SELECT * FROM backup_schedules WHERE next_run_ms <= $1")
                .bind(now_ms)
                .fetch_all(&self.pool)
                .await?,
        )
    }

    /// Moves a schedule that was due at `due_ms` on to `next_ms`, counting the run and saying
    /// what it did; false when another run moved it first (nothing changed).
    pub async fn advance_schedule_in<'e, E: Exec<'e>>(
        ex: E,
        id: &str,
        due_ms: i64,
        next_ms: i64,
        result: &str,
    ) -> anyhow::Result<bool> {
        let done = sqlx::query(
            "UPDATE backup_schedules SET next_run_ms = $1, runs = runs + 1, last_run = $2, last_result = $3 \
             WHERE id = $4 AND next_run_ms = $5",
        )
        .bind(next_ms)
        .bind(now())
        .bind(result)
        .bind(id)
        .bind(due_ms)
        .execute(ex)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// [`Store::advance_schedule_in`] on its own (a run that started nothing).
    pub async fn advance_schedule(
        &self,
        id: &str,
        due_ms: i64,
        next_ms: i64,
        result: &str,
    ) -> anyhow::Result<bool> {
        Self::advance_schedule_in(&self.pool, id, due_ms, next_ms, result).await
    }

    /// Records that `schedule` took `backup` (in the transaction that starts it).
    pub async fn link_scheduled_backup(
        tx: &mut Tx,
        backup: &str,
        schedule: &str,
    ) -> anyhow::Result<()> {
        sqlx::query("INSERT INTO scheduled_backups (backup_id, schedule_id) VALUES ($1, $2)")
            .bind(backup)
            .bind(schedule)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    /// The live backups a schedule took, newest first.
    pub async fn backups_of_schedule(&self, schedule: &str) -> anyhow::Result<Vec<BackupRow>> {
        Ok(sqlx::query_as(
            "SELECT b.* FROM backups b JOIN scheduled_backups s ON s.backup_id = b.id \
             WHERE s.schedule_id = $1 AND b.deleted = FALSE ORDER BY b.created DESC, b.rowid DESC",
        )
        .bind(schedule)
        .fetch_all(&self.pool)
        .await?)
    }
}
