//! The outbox of intents to agents and the events they answer with.

use super::*;

/// The largest intent the controller queues: well inside NATS's default `max_payload` (1 MiB),
/// with room for headers.
pub const MAX_INTENT_BYTES: usize = 512 * 1024;

/// An intent too large to send: the request that made it is refused (413) with nothing stored.
#[derive(Debug, thiserror::Error)]
#[error("the {kind} intent this request makes would be {bytes} bytes, more than the {MAX_INTENT_BYTES} bytes an intent may carry; send less in one request")]
pub struct IntentTooLarge {
    pub kind: String,
    pub bytes: usize,
}

/// An intent waiting to be published.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OutboxRow {
    pub seq: i64,
    pub intent_id: String,
    pub instance_id: String,
    pub payload: Vec<u8>,
}

impl Store {
    /// Queues an intent for publication inside the transaction that changed the state. An intent
    /// larger than [`MAX_INTENT_BYTES`] is refused ([`IntentTooLarge`], a 413 to the caller), so
    /// the transaction stores nothing and no intent NATS would refuse ever enters the outbox.
    pub async fn enqueue(
        tx: &mut Tx,
        intent_id: &str,
        instance_id: &str,
        kind: &str,
        payload: &[u8],
    ) -> anyhow::Result<()> {
        if payload.len() > MAX_INTENT_BYTES {
            return Err(IntentTooLarge {
                kind: kind.to_string(),
                bytes: payload.len(),
            }
            .into());
        }
        let ts = now();
        sqlx::query("INSERT INTO outbox (intent_id, instance_id, kind, payload, created) VALUES ($1, $2, $3, $4, $5)")
            .bind(intent_id)
            .bind(instance_id)
            .bind(kind)
            .bind(payload)
            .bind(&ts)
            .execute(&mut **tx)
            .await?;
        sqlx::query(
            "INSERT INTO intents (id, instance_id, kind, state, created, updated) VALUES ($1, $2, $3, 'queued', $4, $5)",
        )
        .bind(intent_id)
        .bind(instance_id)
        .bind(kind)
        .bind(&ts)
        .bind(&ts)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    pub async fn outbox(&self) -> anyhow::Result<Vec<OutboxRow>> {
        Ok(sqlx::query_as(
            "SELECT seq, intent_id, instance_id, payload FROM outbox ORDER BY seq LIMIT 100",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// How many intents wait in the outbox to be published.
    pub async fn outbox_depth(&self) -> anyhow::Result<i64> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM outbox")
            .fetch_one(&self.pool)
            .await?)
    }

    /// Removes a published intent and marks it sent.
    pub async fn published(&self, seq: i64, intent_id: &str) -> anyhow::Result<()> {
        let mut tx = self.begin().await?;
        sqlx::query("DELETE FROM outbox WHERE seq = $1")
            .bind(seq)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "UPDATE intents SET state = 'sent', updated = $1 WHERE id = $2 AND state = 'queued'",
        )
        .bind(now())
        .bind(intent_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Records an event about an intent; returns the intent's kind and whether this was the first
    /// time its final state was recorded.
    /// The instance an intent was sent to.
    pub async fn intent_instance(&self, id: &str) -> anyhow::Result<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT instance_id FROM intents WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    pub async fn intent_event(
        &self,
        id: &str,
        state: &str,
        progress: Option<i64>,
        message: &str,
    ) -> anyhow::Result<Option<(String, bool)>> {
        let mut tx = self.begin().await?;
        let row: Option<(String, String)> =
            sqlx::query_as("SELECT kind, state FROM intents WHERE id = $1")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
        let Some((kind, old)) = row else {
            return Ok(None);
        };
        let old_final = old == "done" || old == "failed";
        if !old_final {
            sqlx::query(
                "UPDATE intents SET state = $1, progress = COALESCE($2, progress), message = $3, updated = $4 WHERE id = $5",
            )
            .bind(state)
            .bind(progress)
            .bind(message)
            .bind(now())
            .bind(id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        let first_final = !old_final && (state == "done" || state == "failed");
        Ok(Some((kind, first_final)))
    }

    /// The latest intent of an instance (for progress display).
    pub async fn latest_intent(
        &self,
        instance_id: &str,
    ) -> anyhow::Result<Option<(String, String, i64, String)>> {
        Ok(sqlx::query_as(
            "SELECT kind, state, progress, message FROM intents WHERE instance_id = $1 ORDER BY created DESC, rowid DESC LIMIT 1",
        )
        .bind(instance_id)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// How many times an intent kind was recorded for an instance (tests: exactly-once checks).
    pub async fn count_intents(&self, instance_id: &str, kind: &str) -> anyhow::Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT COUNT(*) FROM intents WHERE instance_id = $1 AND kind = $2")
                .bind(instance_id)
                .bind(kind)
                .fetch_one(&self.pool)
                .await?,
        )
    }
}
