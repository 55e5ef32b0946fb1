//! Configuration groups.

use super::*;

/// A configuration group.
#[derive(Debug, Clone)]
pub struct ConfigurationRow {
    pub id: String,
    pub project_id: String,
    pub name: String,
    pub description: Option<String>,
    pub datastore_version_id: String,
    /// Parameter name -> the tenant's JSON value.
    pub values: serde_json::Map<String, serde_json::Value>,
    pub created: String,
    pub updated: String,
}

fn configuration_from(r: &sqlx::any::AnyRow) -> ConfigurationRow {
    ConfigurationRow {
        id: r.get("id"),
        project_id: r.get("project_id"),
        name: r.get("name"),
        description: r.get("description"),
        datastore_version_id: r.get("datastore_version_id"),
        values: serde_json::from_str(r.get::<&str, _>("config_values")).unwrap_or_default(),
        created: r.get("created"),
        updated: r.get("updated"),
    }
}

impl Store {
    pub async fn insert_configuration(&self, c: &ConfigurationRow) -> anyhow::Result<()> {
        sqlx::query(
            "INSERT INTO configurations (id, project_id, name, description, datastore_version_id, config_values, created, updated) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&c.id)
        .bind(&c.project_id)
        .bind(&c.name)
        .bind(&c.description)
        .bind(&c.datastore_version_id)
        .bind(serde_json::to_string(&c.values)?)
        .bind(&c.created)
        .bind(&c.updated)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn update_configuration(&self, c: &ConfigurationRow) -> anyhow::Result<()> {
        sqlx::query(
            "UPDATE configurations SET name = $1, description = $2, config_values = $3, updated = $4 WHERE id = $5",
        )
        .bind(&c.name)
        .bind(&c.description)
        .bind(serde_json::to_string(&c.values)?)
        .bind(now())
        .bind(&c.id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn configurations_of(&self, project: &str) -> anyhow::Result<Vec<ConfigurationRow>> {
        let rows = sqlx::query(
            "SELECT * FROM configurations WHERE project_id = $1 AND deleted = FALSE ORDER BY created, rowid",
        )
        .bind(project)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(configuration_from).collect())
    }

    pub async fn configuration(&self, id: &str) -> anyhow::Result<Option<ConfigurationRow>> {
        let row = sqlx::query("SELECT * FROM configurations WHERE id = $1 AND deleted = FALSE")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(configuration_from))
    }

    /// Live instances with the group attached.
    pub async fn instances_with_configuration(&self, id: &str) -> anyhow::Result<Vec<InstanceRow>> {
        Ok(sqlx::query_as(
            "SELECT * FROM instances WHERE configuration_id = $1 AND deleted = FALSE ORDER BY created, rowid",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?)
    }

    pub async fn set_configuration(
        &self,
        id: &str,
        configuration: Option<&str>,
    ) -> anyhow::Result<()> {
        sqlx::query("UPDATE instances SET configuration_id = $1, updated = $2 WHERE id = $3")
            .bind(configuration)
            .bind(now())
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
