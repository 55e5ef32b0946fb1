//! Modules: which an instance gets, sealed for its agent.

use coffer_proto::{seal, v1};

use super::Caller;
use crate::error::ApiError;
use crate::store::ModuleRow;
use crate::App;

pub async fn find(app: &App, c: &Caller, id: &str) -> Result<ModuleRow, ApiError> {
    match app.store.module(id).await? {
        Some(m)
            if c.admin || m.project_id.is_none() || m.project_id.as_deref() == Some(&c.project) =>
        {
            Ok(m)
        }
        _ => Err(ApiError::not_found(format!("Module {id} cannot be found."))),
    }
}

/// A module sealed for the agent of `instance` whose public key is `key`.
pub fn spec_sealed(
    app: &App,
    instance: &str,
    key: &[u8],
    m: &ModuleRow,
) -> Result<v1::ModuleSpec, ApiError> {
    let context = seal::kept_module_context(&m.id);
    let kept = crate::agents::open_kept(app, &m.contents_sealed, &context)
        .ok_or_else(|| anyhow::anyhow!("module {} contents do not open", m.id))?;
    Ok(v1::ModuleSpec {
        id: m.id.clone(),
        name: m.name.clone(),
        r#type: m.kind.clone(),
        contents_sealed: seal::seal(key, &seal::module_contents_context(instance, &m.id), &kept)
            .map_err(|e| anyhow::anyhow!("sealing: {e}"))?,
        md5: m.md5.clone(),
        priority_apply: m.priority_apply,
        apply_order: m.apply_order as u32,
        auto_apply: m.auto_apply,
        visible: m.visible,
        is_admin: m.is_admin,
        tenant: m.project_id.clone().unwrap_or_else(|| "all".into()),
        datastore: m.datastore.clone().unwrap_or_else(|| "all".into()),
        datastore_version: m.datastore_version.clone().unwrap_or_else(|| "all".into()),
    })
}

/// The modules an instance of `datastore`/`version` gets at create: the requested ones and
/// every auto_apply module that matches.
pub async fn for_create(
    app: &App,
    c: &Caller,
    requested: &[String],
    datastore: &str,
    version: &str,
) -> Result<Vec<ModuleRow>, ApiError> {
    let mut out = Vec::new();
    for id in requested {
        out.push(find(app, c, id).await?);
    }
    for m in app.store.modules_for(&c.project).await? {
        let matches = m.datastore.as_deref().is_none_or(|d| d == datastore)
            && m.datastore_version.as_deref().is_none_or(|v| v == version);
        if m.auto_apply && matches && !out.iter().any(|x| x.id == m.id) {
            out.push(m);
        }
    }
    Ok(out)
}
