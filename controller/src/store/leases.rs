//! Leases: what runs on one controller at a time when several share the store. A lease is held
//! until a time on the store's own clock (so controllers' clocks need not agree); its holder
//! renews it, and once it lapses another controller may take it.

use super::Store;

impl Store {
    fn now_ms(&self) -> &'static str {
        self.dialect.now_ms()
    }

    /// Takes or renews lease `name` for `holder` for `ttl_ms`; true while `holder` holds it.
    pub async fn take_lease(&self, name: &str, holder: &str, ttl_ms: i64) -> anyhow::Result<bool> {
        let now = self.now_ms();
        let sql = format!(
            "INSERT INTO leases (name, holder, expires_ms) VALUES ($1, $2, {now} + $3) \
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_ms = excluded.expires_ms \
             WHERE leases.holder = excluded.holder OR leases.expires_ms < {now} RETURNING holder"
        );
        let got: Option<String> = sqlx::query_scalar(&sql)
            .bind(name)
            .bind(holder)
            .bind(ttl_ms)
            .fetch_optional(&self.pool)
            .await?;
        Ok(got.is_some())
    }

    /// Gives lease `name` up, if `holder` has it (another controller may take it at once).
    pub async fn drop_lease(&self, name: &str, holder: &str) -> anyhow::Result<()> {
        sqlx::query("DELETE FROM leases WHERE name = $1 AND holder = $2")
            .bind(name)
            .bind(holder)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Whether lease `name` is held by anyone now.
    pub async fn lease_held(&self, name: &str) -> anyhow::Result<bool> {
        let sql = format!(
            "SELECT holder FROM leases WHERE name = $1 AND expires_ms >= {}",
            self.now_ms()
        );
        let got: Option<String> = sqlx::query_scalar(&sql)
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(got.is_some())
    }

    /// Claims or renews running workflow `id` for `holder` for `ttl_ms`: true while `holder`
    /// drives it (no other controller does until the claim lapses).
    pub async fn claim_workflow(
        &self,
        id: &str,
        holder: &str,
        ttl_ms: i64,
    ) -> anyhow::Result<bool> {
        let now = self.now_ms();
        let sql = format!(
            "UPDATE workflows SET owner = $1, lease_ms = {now} + $2 \
             WHERE id = $3 AND done = FALSE AND (owner IS NULL OR owner = $1 OR lease_ms < {now}) RETURNING id"
        );
        let got: Option<String> = sqlx::query_scalar(&sql)
            .bind(holder)
            .bind(ttl_ms)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(got.is_some())
    }

    /// Running workflows that `holder` may drive: its own, unclaimed ones, and those whose
    /// driver's claim lapsed.
    pub async fn workflows_to_adopt(&self, holder: &str) -> anyhow::Result<Vec<String>> {
        let sql = format!(
            "SELECT id FROM workflows WHERE done = FALSE AND (owner IS NULL OR owner = $1 OR lease_ms < {}) \
             ORDER BY created",
            self.now_ms()
        );
        Ok(sqlx::query_scalar(&sql)
            .bind(holder)
            .fetch_all(&self.pool)
            .await?)
    }

    /// The controllers whose own lease is live (`controller:<id>`), this one included.
    pub async fn live_controllers(&self) -> anyhow::Result<Vec<String>> {
        let sql = format!(
            "SELECT holder FROM leases WHERE name LIKE 'controller:%' AND expires_ms >= {}",
            self.now_ms()
        );
        Ok(sqlx::query_scalar(&sql).fetch_all(&self.pool).await?)
    }

    /// Adds a revoked NATS user key (once; a second revoke keeps the first time).
    pub async fn add_revocation(&self, user_key: &str, at_s: i64) -> anyhow::Result<()> {
        sqlx::query(
            "INSERT INTO nats_revocations (user_key, revoked_at) VALUES ($1, $2) \
             ON CONFLICT (user_key) DO NOTHING",
        )
        .bind(user_key)
        .bind(at_s)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Every revoked NATS user key, with when (Unix s).
    pub async fn revocations(&self) -> anyhow::Result<std::collections::BTreeMap<String, i64>> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT user_key, revoked_at FROM nats_revocations")
                .fetch_all(&self.pool)
                .await?;
        Ok(rows.into_iter().collect())
    }
}
