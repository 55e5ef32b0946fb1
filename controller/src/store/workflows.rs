//! Durable workflows (see [`crate::workflow`]): one row per workflow, its state as JSON, and the
//! instances it owns while it runs.

use super::{now, Exec, Flag, Store, Tx};

/// A stored workflow.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct WorkflowRow {
    pub id: String,
    pub kind: String,
    pub state: String,
    #[sqlx(try_from = "Flag")]
    pub done: bool,
    #[sqlx(try_from = "Flag")]
    pub cancel: bool,
}

/// A workflow's claim passed to another controller while this one ran a step: its result is not
/// recorded, and this controller stops driving it.
#[derive(Debug, thiserror::Error)]
#[error("another controller took this workflow over")]
pub struct ClaimLost;

/// Another workflow already owns an instance the new one needs.
#[derive(Debug, thiserror::Error)]
#[error("instance {instance} is owned by workflow {workflow}")]
pub struct Owned {
    pub instance: String,
    pub workflow: String,
}

impl Store {
    /// Records a new workflow owning `members`, inside the transaction that sets their tasks.
    /// Fails with [`Owned`] when one of them already belongs to a running workflow.
    pub async fn insert_workflow(
        tx: &mut Tx,
        id: &str,
        kind: &str,
        state: &str,
        members: &[String],
    ) -> anyhow::Result<()> {
        for m in members {
            if let Some(w) = Self::owner_in(&mut **tx, m).await? {
                return Err(Owned {
                    instance: m.clone(),
                    workflow: w,
                }
                .into());
            }
        }
        sqlx::query(
            "INSERT INTO workflows (id, kind, state, created, updated) VALUES ($1, $2, $3, $4, $4)",
        )
        .bind(id)
        .bind(kind)
        .bind(state)
        .bind(now())
        .execute(&mut **tx)
        .await?;
        for m in members {
            sqlx::query("INSERT INTO workflow_members (instance_id, workflow_id) VALUES ($1, $2)")
                .bind(m)
                .bind(id)
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }

    /// The running workflow that owns `instance`, read through `ex` (a transaction's own).
    pub async fn owner_in<'e, E: Exec<'e>>(
        ex: E,
        instance: &str,
    ) -> anyhow::Result<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT workflow_id FROM workflow_members WHERE instance_id = $1")
                .bind(instance)
                .fetch_optional(ex)
                .await?,
        )
    }

    /// The running workflow that owns `instance`, if any.
    pub async fn workflow_owning(&self, instance: &str) -> anyhow::Result<Option<String>> {
        Self::owner_in(&self.pool, instance).await
    }

    pub async fn workflow(&self, id: &str) -> anyhow::Result<Option<WorkflowRow>> {
        Ok(sqlx::query_as("SELECT * FROM workflows WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// Saves a workflow's state, if `owner` still holds its claim ([`ClaimLost`] otherwise: another
    /// controller adopted it, and this one must stop).
    pub async fn save_workflow(&self, id: &str, owner: &str, state: &str) -> anyhow::Result<()> {
        let n = sqlx::query(
            "UPDATE workflows SET state = $1, updated = $2 WHERE id = $3 AND (owner IS NULL OR owner = $4)",
        )
        .bind(state)
        .bind(now())
        .bind(id)
        .bind(owner)
        .execute(&self.pool)
        .await?
        .rows_affected();
        if n == 0 {
            return Err(ClaimLost.into());
        }
        Ok(())
    }

    /// Records a workflow's next state inside `tx` (the one that releases its members' tasks) and
    /// frees its members: it runs on without them, or ends (`done`) owning nothing any more.
    pub async fn free_members(
        tx: &mut Tx,
        id: &str,
        owner: &str,
        state: &str,
        done: bool,
    ) -> anyhow::Result<()> {
        let n = sqlx::query(
            "UPDATE workflows SET state = $1, done = done OR $2, updated = $3 \
             WHERE id = $4 AND (owner IS NULL OR owner = $5)",
        )
        .bind(state)
        .bind(done)
        .bind(now())
        .bind(id)
        .bind(owner)
        .execute(&mut **tx)
        .await?
        .rows_affected();
        if n == 0 {
            return Err(ClaimLost.into());
        }
        sqlx::query("DELETE FROM workflow_members WHERE workflow_id = $1")
            .bind(id)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    /// Whether an intent with this id was ever queued.
    pub async fn intent_exists(&self, id: &str) -> anyhow::Result<bool> {
        Ok(
            sqlx::query_scalar::<_, i64>("SELECT 1 FROM intents WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?
                .is_some(),
        )
    }

    /// An instance's task, read through `ex`.
    pub async fn task_in<'e, E: Exec<'e>>(
        ex: E,
        id: &str,
    ) -> anyhow::Result<Option<crate::status::Task>> {
        Ok(
            sqlx::query_scalar("SELECT task FROM instances WHERE id = $1")
                .bind(id)
                .fetch_optional(ex)
                .await?,
        )
    }

    /// How many workflows run, by kind.
    pub async fn running_workflows(&self) -> anyhow::Result<Vec<(String, i64)>> {
        Ok(sqlx::query_as(
            "SELECT kind, COUNT(*) FROM workflows WHERE done = FALSE GROUP BY kind ORDER BY kind",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// Asks a running workflow to stop where it safely can (an administrator's reset_status).
    pub async fn cancel_workflow(&self, id: &str) -> anyhow::Result<()> {
        sqlx::query(
            "UPDATE workflows SET cancel = TRUE, updated = $1 WHERE id = $2 AND done = FALSE",
        )
        .bind(now())
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}
