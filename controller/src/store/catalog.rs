//! Datastores, their versions and configuration parameters, and flavors (the operator's catalog).

use super::*;

/// A datastore version with its datastore.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct VersionRow {
    pub id: String,
    pub datastore_id: String,
    pub datastore_name: String,
    pub name: String,
    pub version: String,
    pub manager: String,
    #[sqlx(try_from = "Flag")]
    pub active: bool,
    /// Enable root at create and return its password.
    #[sqlx(try_from = "Flag")]
    pub root_on_create: bool,
}

impl VersionRow {
    /// The datastore the version's `manager` names.
    pub fn datastore(
        &self,
    ) -> Result<coffer_proto::Datastore, coffer_proto::datastore::UnknownDatastore> {
        self.manager.parse()
    }
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DatastoreRow {
    pub id: String,
    pub name: String,
    pub default_version_id: Option<String>,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct FlavorRow {
    pub id: String,
    pub name: String,
    pub ram: i64,
    pub vcpus: i64,
    pub disk: i64,
}

const VERSION_SELECT: &str = "SELECT v.id, v.datastore_id, d.name AS datastore_name, v.name, v.version, v.manager, v.active, v.root_on_create \
     FROM datastore_versions v JOIN datastores d ON d.id = v.datastore_id";

impl Store {
    pub async fn datastores(&self) -> anyhow::Result<Vec<DatastoreRow>> {
        Ok(
            sqlx::query_as("SELECT id, name, default_version_id FROM datastores ORDER BY name")
                .fetch_all(&self.pool)
                .await?,
        )
    }

    /// Finds a datastore by id or name.
    pub async fn datastore(&self, id_or_name: &str) -> anyhow::Result<Option<DatastoreRow>> {
        Ok(self
            .datastores()
            .await?
            .into_iter()
            .find(|d| d.id == id_or_name || d.name == id_or_name))
    }

    pub async fn versions_of(&self, datastore_id: &str) -> anyhow::Result<Vec<VersionRow>> {
        Ok(sqlx::query_as(&format!(
            "{VERSION_SELECT} WHERE v.datastore_id = $1 ORDER BY v.name"
        ))
        .bind(datastore_id)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Every datastore version, by id (a page of instances is rendered with one read of them).
    pub async fn versions_by_id(&self) -> anyhow::Result<HashMap<String, VersionRow>> {
        let v: Vec<VersionRow> = sqlx::query_as(VERSION_SELECT).fetch_all(&self.pool).await?;
        Ok(v.into_iter().map(|v| (v.id.clone(), v)).collect())
    }

    pub async fn version(&self, id: &str) -> anyhow::Result<Option<VersionRow>> {
        Ok(sqlx::query_as(&format!("{VERSION_SELECT} WHERE v.id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?)
    }

    pub async fn flavors(&self) -> anyhow::Result<Vec<FlavorRow>> {
        let mut v: Vec<FlavorRow> =
            sqlx::query_as("SELECT id, name, ram, vcpus, disk FROM flavors")
                .fetch_all(&self.pool)
                .await?;
        v.sort_by(|a, b| (a.id.len(), &a.id).cmp(&(b.id.len(), &b.id)));
        Ok(v)
    }

    pub async fn flavor(&self, id: &str) -> anyhow::Result<Option<FlavorRow>> {
        Ok(self.flavors().await?.into_iter().find(|f| f.id == id))
    }

    /// Flavors linked to a version (empty = every flavor is allowed).
    pub async fn version_flavors(&self, version_id: &str) -> anyhow::Result<Vec<String>> {
        Ok(
            sqlx::query_scalar("SELECT flavor_id FROM version_flavors WHERE version_id = $1")
                .bind(version_id)
                .fetch_all(&self.pool)
                .await?,
        )
    }

    /// Replaces the parameters of a datastore version (`manage datastore-parameters-load`).
    pub async fn load_params(
        &self,
        version_id: &str,
        rules: &[coffer_common::config_rules::ParamRule],
    ) -> anyhow::Result<()> {
        let mut tx = self.begin().await?;
        sqlx::query("DELETE FROM config_params WHERE version_id = $1")
            .bind(version_id)
            .execute(&mut *tx)
            .await?;
        for r in rules {
            sqlx::query("INSERT INTO config_params (version_id, name, rule) VALUES ($1, $2, $3)")
                .bind(version_id)
                .bind(&r.name)
                .bind(serde_json::to_string(r)?)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn params(
        &self,
        version_id: &str,
    ) -> anyhow::Result<Vec<coffer_common::config_rules::ParamRule>> {
        let rules: Vec<String> = sqlx::query_scalar(
            "SELECT rule FROM config_params WHERE version_id = $1 ORDER BY name",
        )
        .bind(version_id)
        .fetch_all(&self.pool)
        .await?;
        rules.iter().map(|r| Ok(serde_json::from_str(r)?)).collect()
    }

    pub async fn upsert_datastore(&self, name: &str) -> anyhow::Result<String> {
        if let Some(d) = self.datastore(name).await? {
            return Ok(d.id);
        }
        let id = uuid::Uuid::new_v4().to_string();
        sqlx::query("INSERT INTO datastores (id, name) VALUES ($1, $2)")
            .bind(&id)
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(id)
    }

    pub async fn upsert_version(
        &self,
        datastore: &str,
        name: &str,
        manager: &str,
        version: &str,
        active: bool,
        root_on_create: bool,
    ) -> anyhow::Result<String> {
        let ds = self.datastore(datastore).await?.with_context(|| {
            format!("datastore '{datastore}' does not exist; add it with datastore-update first")
        })?;
        // A version of that name keeps its id.
        Ok(sqlx::query_scalar(
            "INSERT INTO datastore_versions (id, datastore_id, name, version, manager, active, root_on_create) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (datastore_id, name) DO UPDATE SET \
             version = excluded.version, manager = excluded.manager, active = excluded.active, \
             root_on_create = excluded.root_on_create RETURNING id",
        )
        .bind(uuid::Uuid::new_v4().to_string())
        .bind(&ds.id)
        .bind(name)
        .bind(version)
        .bind(manager)
        .bind(active)
        .bind(root_on_create)
        .fetch_one(&self.pool)
        .await?)
    }

    /// A version of a datastore by name or id (admin commands).
    pub async fn named_version(
        &self,
        datastore: &str,
        version: &str,
    ) -> anyhow::Result<VersionRow> {
        let ds = self
            .datastore(datastore)
            .await?
            .with_context(|| format!("datastore '{datastore}' does not exist"))?;
        self.versions_of(&ds.id)
            .await?
            .into_iter()
            .find(|v| v.name == version || v.id == version)
            .with_context(|| format!("datastore '{datastore}' has no version '{version}'"))
    }

    pub async fn set_default_version(&self, datastore: &str, version: &str) -> anyhow::Result<()> {
        let v = self.named_version(datastore, version).await?;
        sqlx::query("UPDATE datastores SET default_version_id = $1 WHERE id = $2")
            .bind(&v.id)
            .bind(&v.datastore_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn upsert_flavor(&self, f: &FlavorRow) -> anyhow::Result<()> {
        sqlx::query(
            "INSERT INTO flavors (id, name, ram, vcpus, disk) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (id) DO UPDATE SET name = excluded.name, ram = excluded.ram, vcpus = excluded.vcpus, disk = excluded.disk",
        )
        .bind(&f.id)
        .bind(&f.name)
        .bind(f.ram)
        .bind(f.vcpus)
        .bind(f.disk)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn link_flavor(
        &self,
        datastore: &str,
        version: &str,
        flavor: &str,
        link: bool,
    ) -> anyhow::Result<()> {
        let v = self.named_version(datastore, version).await?;
        self.flavor(flavor)
            .await?
            .with_context(|| format!("flavor '{flavor}' does not exist"))?;
        let sql = if link {
            "INSERT INTO version_flavors (version_id, flavor_id) VALUES ($1, $2) ON CONFLICT DO NOTHING"
        } else {
            "DELETE FROM version_flavors WHERE version_id = $1 AND flavor_id = $2"
        };
        sqlx::query(sql)
            .bind(&v.id)
            .bind(flavor)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
