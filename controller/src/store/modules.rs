//! Modules and which instances have them.

use super::*;

/// A module.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ModuleRow {
    pub id: String,
    /// None: all tenants.
    pub project_id: Option<String>,
    pub name: String,
    #[sqlx(rename = "type")]
    pub kind: String,
    pub description: Option<String>,
    /// Hex, sealed to the controller's key (`kept_module_context`).
    pub contents_sealed: String,
    pub md5: String,
    pub datastore: Option<String>,
    pub datastore_version: Option<String>,
    #[sqlx(try_from = "Flag")]
    pub auto_apply: bool,
    #[sqlx(try_from = "Flag")]
    pub visible: bool,
    #[sqlx(try_from = "Flag")]
    pub live_update: bool,
    #[sqlx(try_from = "Flag")]
    pub priority_apply: bool,
    pub apply_order: i64,
    #[sqlx(try_from = "Flag")]
    pub is_admin: bool,
    pub created: String,
    pub updated: String,
}

impl Store {
    /// Inserts or replaces a module.
    pub async fn save_module(&self, m: &ModuleRow) -> anyhow::Result<()> {
        sqlx::query(
            "INSERT INTO modules (id, project_id, name, type, description, contents_sealed, md5, datastore, \
             datastore_version, auto_apply, visible, live_update, priority_apply, apply_order, is_admin, created, updated) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17) \
             ON CONFLICT (id) DO UPDATE SET project_id = excluded.project_id, name = excluded.name, type = excluded.type, \
             description = excluded.description, contents_sealed = excluded.contents_sealed, md5 = excluded.md5, \
             datastore = excluded.datastore, datastore_version = excluded.datastore_version, auto_apply = excluded.auto_apply, \
             visible = excluded.visible, live_update = excluded.live_update, priority_apply = excluded.priority_apply, \
             apply_order = excluded.apply_order, is_admin = excluded.is_admin, created = excluded.created, \
             updated = excluded.updated, deleted = FALSE",
        )
        .bind(&m.id)
        .bind(&m.project_id)
        .bind(&m.name)
        .bind(&m.kind)
        .bind(&m.description)
        .bind(&m.contents_sealed)
        .bind(&m.md5)
        .bind(&m.datastore)
        .bind(&m.datastore_version)
        .bind(m.auto_apply)
        .bind(m.visible)
        .bind(m.live_update)
        .bind(m.priority_apply)
        .bind(m.apply_order)
        .bind(m.is_admin)
        .bind(&m.created)
        .bind(&m.updated)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Modules a project can see: its own and the all-tenant ones.
    pub async fn modules_for(&self, project: &str) -> anyhow::Result<Vec<ModuleRow>> {
        Ok(sqlx::query_as(
            "SELECT * FROM modules WHERE deleted = FALSE AND (project_id = $1 OR project_id IS NULL) ORDER BY created, rowid",
        )
        .bind(project)
        .fetch_all(&self.pool)
        .await?)
    }

    pub async fn module(&self, id: &str) -> anyhow::Result<Option<ModuleRow>> {
        Ok(
            sqlx::query_as("SELECT * FROM modules WHERE id = $1 AND deleted = FALSE")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    pub async fn record_instance_module(
        &self,
        instance: &str,
        module: &str,
        md5: &str,
        status: &str,
        message: &str,
        removed: bool,
    ) -> anyhow::Result<()> {
        sqlx::query(
            "INSERT INTO instance_modules (instance_id, module_id, md5, status, message, updated, removed) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (instance_id, module_id) DO UPDATE SET \
             md5 = excluded.md5, status = excluded.status, message = excluded.message, updated = excluded.updated, \
             removed = excluded.removed",
        )
        .bind(instance)
        .bind(module)
        .bind(md5)
        .bind(status)
        .bind(message)
        .bind(now())
        .bind(removed)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Live instances that have the module applied.
    pub async fn module_instances(&self, module: &str) -> anyhow::Result<Vec<InstanceRow>> {
        Ok(sqlx::query_as(
            "SELECT i.* FROM instances i JOIN instance_modules m ON m.instance_id = i.id \
             WHERE m.module_id = $1 AND m.removed = FALSE AND i.deleted = FALSE ORDER BY i.created",
        )
        .bind(module)
        .fetch_all(&self.pool)
        .await?)
    }
}
