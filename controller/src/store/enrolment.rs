//! Enrolment tokens: only a token's SHA-256 is stored; its first use binds it to a key.

use super::*;

/// A stored enrolment token.
#[derive(sqlx::FromRow)]
pub struct TokenRow {
    pub id: String,
    #[sqlx(rename = "project_id")]
    pub project: String,
    pub name: String,
    #[sqlx(rename = "datastore_version_id")]
    pub version_id: String,
    pub flavor_id: String,
    pub volume_size: i64,
    /// The instance being placed (a VM), or the one made at first use (a host).
    pub instance_id: Option<String>,
    pub public_key: Option<String>,
    pub creds_sealed: Option<Vec<u8>>,
    pub expires_unix: i64,
}

impl Store {
    pub async fn insert_token(&self, t: &TokenRow, token_hash: &str) -> anyhow::Result<()> {
        sqlx::query(
            "INSERT INTO enrolment_tokens (id, token_hash, project_id, name, datastore_version_id, \
             flavor_id, volume_size, instance_id, created, expires_unix) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(&t.id)
        .bind(token_hash)
        .bind(&t.project)
        .bind(&t.name)
        .bind(&t.version_id)
        .bind(&t.flavor_id)
        .bind(t.volume_size)
        .bind(&t.instance_id)
        .bind(now())
        .bind(t.expires_unix)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn token_by_hash(&self, token_hash: &str) -> anyhow::Result<Option<TokenRow>> {
        Ok(
            sqlx::query_as("SELECT * FROM enrolment_tokens WHERE token_hash = $1")
                .bind(token_hash)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    /// Binds an unused token to `public_key`; false when another use claimed it first.
    pub async fn claim_token(&self, id: &str, public_key: &str) -> anyhow::Result<bool> {
        let r = sqlx::query(
            "UPDATE enrolment_tokens SET public_key = $1, used_at = $2 WHERE id = $3 AND public_key IS NULL",
        )
        .bind(public_key)
        .bind(now())
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Undoes [`Store::claim_token`] after a first use that failed: the same host may retry.
    pub async fn release_token(&self, id: &str, instance_id: Option<&str>) -> anyhow::Result<()> {
        sqlx::query(
            "UPDATE enrolment_tokens SET public_key = NULL, used_at = NULL, instance_id = $1 WHERE id = $2",
        )
        .bind(instance_id)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records, inside `tx`, the instance a token enrolled and the agent's creds kept for a
    /// retry; false when the token already records another instance.
    pub async fn set_token_enrolled_in(
        tx: &mut Tx,
        id: &str,
        instance_id: &str,
        creds_sealed: Option<&[u8]>,
    ) -> anyhow::Result<bool> {
        let r = sqlx::query(
            "UPDATE enrolment_tokens SET instance_id = $1, creds_sealed = $2 \
             WHERE id = $3 AND (instance_id IS NULL OR instance_id = $1)",
        )
        .bind(instance_id)
        .bind(creds_sealed)
        .bind(id)
        .execute(&mut **tx)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// A VM's agent enrolled: its key and NATS user on the instance, and the token's record of
    /// it, in one transaction. Idempotent for the same key; false when the instance is gone or
    /// holds another agent's key.
    pub async fn enrol_vm(
        &self,
        instance_id: &str,
        key_hex: &str,
        nats_user: &str,
        token_id: &str,
        creds_sealed: Option<&[u8]>,
    ) -> anyhow::Result<bool> {
        let mut tx = self.begin().await?;
        let r = sqlx::query(
            "UPDATE instances SET agent_public_key = $1, agent_nats_user = $2, updated = $3 \
             WHERE id = $4 AND deleted = FALSE AND (agent_public_key = '' OR agent_public_key = $1)",
        )
        .bind(key_hex)
        .bind(nats_user)
        .bind(now())
        .bind(instance_id)
        .execute(&mut *tx)
        .await?;
        if r.rows_affected() != 1
            || !Self::set_token_enrolled_in(&mut tx, token_id, instance_id, creds_sealed).await?
        {
            return Ok(false);
        }
        tx.commit().await?;
        Ok(true)
    }
}
