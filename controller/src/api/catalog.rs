//! Flavors, datastores and datastore versions (read-only; operators change them with `manage`).

use axum::extract::Path;
use serde_json::{json, Value};

use super::{ok, ApiError, ApiResult, AppState, Caller, ItemPath, SubPath};
use crate::store::{DatastoreRow, FlavorRow, VersionRow};
use crate::App;

fn flavor_json(c: &Caller, f: &FlavorRow) -> Value {
    let int_id: Value = match f.id.parse::<i64>() {
        Ok(n) if !f.id.starts_with('0') || f.id == "0" => json!(n),
        _ => Value::Null,
    };
    json!({
        "id": int_id, "str_id": f.id, "name": f.name, "ram": f.ram, "vcpus": f.vcpus,
        "disk": f.disk, "ephemeral": 0, "links": c.links("flavors", &f.id),
    })
}

pub async fn list_flavors(st: AppState, c: Caller) -> ApiResult {
    let fl = st.store.flavors().await?;
    ok(json!({"flavors": fl.iter().map(|f| flavor_json(&c, f)).collect::<Vec<_>>()}))
}

pub async fn show_flavor(st: AppState, c: Caller, Path((_p, id)): ItemPath) -> ApiResult {
    match st.store.flavor(&id).await? {
        Some(f) => ok(json!({"flavor": flavor_json(&c, &f)})),
        None => Err(ApiError::not_found(format!(
            "Resource {id} cannot be found."
        ))),
    }
}

fn version_json(c: &Caller, v: &VersionRow, nested: bool) -> Value {
    let mut j = json!({"id": v.id, "name": v.name, "version": v.version, "links": c.links("datastores/versions", &v.id)});
    if !nested {
        j["datastore"] = json!(v.datastore_id);
        if c.admin {
            j["active"] = json!(v.active);
            j["manager"] = json!(v.manager);
            j["packages"] = json!("");
            j["image"] = Value::Null;
        }
    }
    j
}

/// The versions of a datastore the caller may see (active ones; every one for an admin).
async fn versions_json(app: &App, c: &Caller, ds: &str, nested: bool) -> Result<Value, ApiError> {
    let all = app.store.versions_of(ds).await?;
    let shown: Vec<Value> = all
        .iter()
        .filter(|v| v.active || c.admin)
        .map(|v| version_json(c, v, nested))
        .collect();
    Ok(Value::Array(shown))
}

async fn datastore_json(st: &AppState, c: &Caller, d: &DatastoreRow) -> Result<Value, ApiError> {
    let versions = versions_json(st, c, &d.id, true).await?;
    let mut j = json!({"id": d.id, "name": d.name, "links": c.links("datastores", &d.id), "versions": versions});
    if let Some(dv) = &d.default_version_id {
        j["default_version"] = json!(dv);
    }
    Ok(j)
}

pub async fn list_datastores(st: AppState, c: Caller) -> ApiResult {
    let mut out = vec![];
    for d in st.store.datastores().await? {
        let j = datastore_json(&st, &c, &d).await?;
        if c.admin || j["versions"].as_array().is_some_and(|a| !a.is_empty()) {
            out.push(j);
        }
    }
    ok(json!({"datastores": out}))
}

async fn find_datastore(st: &AppState, ds: &str) -> Result<DatastoreRow, ApiError> {
    st.store
        .datastore(ds)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("Datastore '{ds}' cannot be found.")))
}

pub async fn show_datastore(st: AppState, c: Caller, Path((_p, ds)): ItemPath) -> ApiResult {
    let d = find_datastore(&st, &ds).await?;
    ok(json!({"datastore": datastore_json(&st, &c, &d).await?}))
}

pub async fn list_versions(st: AppState, c: Caller, Path((_p, ds)): ItemPath) -> ApiResult {
    let d = find_datastore(&st, &ds).await?;
    ok(json!({"versions": versions_json(&st, &c, &d.id, false).await?}))
}

pub(super) async fn find_version(st: &AppState, ds: &str, v: &str) -> Result<VersionRow, ApiError> {
    let d = find_datastore(st, ds).await?;
    let all = st.store.versions_of(&d.id).await?;
    if let Some(x) = all.iter().find(|x| x.id == v) {
        return Ok(x.clone());
    }
    let by_name: Vec<_> = all.iter().filter(|x| x.name == v).collect();
    match by_name.len() {
        1 => Ok(by_name[0].clone()),
        0 => Err(ApiError::not_found(format!(
            "Datastore version '{v}' cannot be found."
        ))),
        _ => Err(ApiError::bad_request(format!(
            "Multiple datastore versions found for '{v}'."
        ))),
    }
}

/// A version by its id, whatever its datastore.
pub(super) async fn version_by_id(st: &AppState, vid: &str) -> Result<VersionRow, ApiError> {
    st.store
        .version(vid)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("Datastore version '{vid}' cannot be found.")))
}

pub async fn show_version(st: AppState, c: Caller, Path((_p, ds, v)): SubPath) -> ApiResult {
    let v = find_version(&st, &ds, &v).await?;
    ok(json!({"version": version_json(&c, &v, false)}))
}

pub async fn show_version_by_id(st: AppState, c: Caller, Path((_p, vid)): ItemPath) -> ApiResult {
    let v = version_by_id(&st, &vid).await?;
    ok(json!({"version": version_json(&c, &v, false)}))
}

pub async fn version_flavors(st: AppState, c: Caller, Path((_p, ds, v)): SubPath) -> ApiResult {
    let v = find_version(&st, &ds, &v).await?;
    let linked = st.store.version_flavors(&v.id).await?;
    let all = st.store.flavors().await?;
    let usable = |f: &&FlavorRow| linked.is_empty() || linked.contains(&f.id);
    ok(
        json!({"flavors": all.iter().filter(usable).map(|f| flavor_json(&c, f)).collect::<Vec<_>>()}),
    )
}
