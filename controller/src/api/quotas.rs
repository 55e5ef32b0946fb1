//! Quotas (`/mgmt/quotas/{project}`) and absolute limits (`/limits`), as Trove has them.

use axum::body::Bytes;
use axum::extract::Path;
use serde_json::{json, Value};

use super::parse::body_as;
use super::{ok, ApiError, ApiResult, AppState, Caller, ItemPath};
use crate::store::{Store, QUOTA_DEFAULTS};

pub async fn show(st: AppState, c: Caller, Path((_p, project)): ItemPath) -> ApiResult {
    if project != c.project && !c.admin {
        return Err(ApiError::forbidden(format!(
            "User with tenant id {} cannot access the quotas of project {project}.",
            c.project
        )));
    }
    let limits = st.store.quota_limits(&project).await?;
    let mut tx = st.store.begin_read().await?;
    let (n, ram, vol) = Store::usage(&mut tx, &project).await?;
    tx.rollback().await.map_err(anyhow::Error::from)?;
    let quotas: Vec<Value> = limits
        .iter()
        .map(|(r, l)| {
            let in_use = match r.as_str() {
                "instances" => n,
                "ram" => ram,
                "volumes" => vol,
                _ => 0,
            };
            json!({"resource": r, "in_use": in_use, "reserved": 0, "limit": l})
        })
        .collect();
    ok(json!({"quotas": quotas}))
}

pub async fn update(
    st: AppState,
    c: Caller,
    Path((_p, project)): ItemPath,
    body: Bytes,
) -> ApiResult {
    if !c.admin {
        return Err(ApiError::forbidden(
            "User does not have admin privileges: changing quotas is an administrator's action.",
        ));
    }
    #[derive(serde::Deserialize)]
    struct QuotaBody {
        quotas: serde_json::Map<String, Value>,
    }
    let q = body_as::<QuotaBody>(&body)?.quotas;
    let mut updates = vec![];
    for (k, v) in &q {
        if !QUOTA_DEFAULTS.iter().any(|(r, _)| r == k) {
            return Err(ApiError::not_found(format!(
                "Quota resource {k} cannot be found."
            )));
        }
        let Some(n) = v.as_i64() else {
            return Err(ApiError::validation(format!(
                "quotas['{k}'] {v} is not of type 'integer'"
            )));
        };
        if n < -1 {
            return Err(ApiError::validation(format!(
                "quotas['{k}'] {n} is less than the minimum of -1"
            )));
        }
        updates.push((k.clone(), n));
    }
    for (k, n) in &updates {
        st.store.set_quota(&project, k, *n).await?;
    }
    let out: serde_json::Map<String, Value> =
        updates.into_iter().map(|(k, n)| (k, json!(n))).collect();
    ok(json!({"quotas": out}))
}

pub async fn limits(st: AppState, c: Caller) -> ApiResult {
    let limits = st.store.quota_limits(&c.project).await?;
    let get = |r: &str| limits.iter().find(|(k, _)| k == r).map_or(-1, |(_, v)| *v);
    ok(json!({"limits": [{
        "verb": "ABSOLUTE",
        "max_instances": get("instances"),
        "max_ram": get("ram"),
        "max_backups": get("backups"),
        "max_volumes": get("volumes"),
    }]}))
}
