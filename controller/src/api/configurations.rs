//! Configuration groups (Trove's `configurations`), their parameters, and attaching them to
//! instances. Values are validated against the version's rules (all bad values named in one
//! 422); an instance's whole set of overrides travels to its agent as a `configure` intent.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Path, Query};
use axum::http::{Method, StatusCode};
use coffer_common::config_rules::ParamRule;
use coffer_proto::v1;
use serde_json::{json, Map, Value};

use super::catalog::{find_version, version_by_id};
use super::parse::{body_as, present, DatastoreReq};
use super::{accepted, ok, ApiError, ApiResult, AppState, Caller, ItemPath, Page};
use crate::ops::configurations::check_values;
use crate::status::Task;
use crate::store::{ConfigurationRow, InstanceRow, Store, VersionRow};
use crate::App;

fn param_json(version_id: &str, r: &ParamRule) -> Value {
    let mut v = json!({
        "name": r.name,
        "datastore_version_id": version_id,
        "restart_required": r.restart_required,
        "type": r.kind,
    });
    if let Some(m) = &r.min {
        v["min"] = Value::Number(m.clone());
    }
    if let Some(m) = &r.max {
        v["max"] = Value::Number(m.clone());
    }
    if let Some(a) = &r.allowed_values {
        v["allowed_values"] = json!(a);
    }
    v
}

/// The version a parameters route names: `{ds}/versions/{v}` or `versions/{vid}`.
async fn version_of(st: &AppState, at: &HashMap<String, String>) -> Result<VersionRow, ApiError> {
    match at.get("vid") {
        Some(vid) => version_by_id(st, vid).await,
        None => find_version(st, &at["ds"], &at["v"]).await,
    }
}

pub async fn list_params(
    st: AppState,
    _c: Caller,
    Path(at): Path<HashMap<String, String>>,
) -> ApiResult {
    let v = version_of(&st, &at).await?;
    let rules = st.store.params(&v.id).await?;
    let list: Vec<Value> = rules.iter().map(|r| param_json(&v.id, r)).collect();
    ok(json!({"configuration-parameters": list}))
}

pub async fn show_param(
    st: AppState,
    _c: Caller,
    Path(at): Path<HashMap<String, String>>,
) -> ApiResult {
    let (v, name) = (version_of(&st, &at).await?, &at["name"]);
    let rules = st.store.params(&v.id).await?;
    match rules.iter().find(|r| r.name.eq_ignore_ascii_case(name)) {
        Some(r) => ok(param_json(&v.id, r)),
        None => Err(ApiError::not_found(format!(
            "No configuration parameter found by name {name}."
        ))),
    }
}

/// Sends an instance its whole set of overrides.
async fn push(app: &App, r: &InstanceRow, overrides: Vec<v1::Override>) -> Result<(), ApiError> {
    let intent_id = uuid::Uuid::new_v4().to_string();
    let payload = crate::ops::intents::intent_payload(
        app,
        &r.id,
        &intent_id,
        v1::intent::Kind::Configure(v1::Configure { overrides }),
    );
    let mut tx = app.store.begin().await?;
    Store::enqueue(&mut tx, &intent_id, &r.id, "configure", &payload).await?;
    tx.commit().await?;
    app.wake_outbox();
    Ok(())
}

/// Attaches (`Some`) or detaches (`None`) a group (`PUT /instances/{id}` with `configuration`).
pub(super) async fn attach(
    app: &App,
    c: &Caller,
    r: &InstanceRow,
    group: Option<String>,
) -> Result<(), ApiError> {
    let (status, _) = crate::status::derive(r.task, &r.service_status, app.fresh(&r.id));
    if r.task != Task::None || !matches!(status, "ACTIVE" | "RESTART_REQUIRED") {
        return Err(ApiError::bad_request(format!(
            "Instance {} is not in a state that allows a configuration change (status was {status}).",
            r.id
        )));
    }
    crate::ops::require(r, "configure", "does not support configuration groups")?;
    let overrides = match &group {
        Some(g) => {
            if let Some(cur) = &r.configuration_id {
                return Err(ApiError::bad_request(format!(
                    "Instance {} already has a Configuration Group ({cur}) attached; detach it first.",
                    r.id
                )));
            }
            let cfg = find(app, c, g).await?;
            if cfg.datastore_version_id != r.datastore_version_id {
                return Err(ApiError::bad_request(format!(
                    "The configuration group {} is for another datastore version than instance {}.",
                    cfg.id, r.id
                )));
            }
            check_values(app, &cfg.datastore_version_id, &cfg.values).await?
        }
        None => vec![],
    };
    app.store.set_configuration(&r.id, group.as_deref()).await?;
    push(app, r, overrides).await
}

/// A project's group by id (404 for another project's).
async fn find(app: &App, c: &Caller, id: &str) -> Result<ConfigurationRow, ApiError> {
    match app.store.configuration(id).await? {
        Some(x) if x.project_id == c.project || c.admin => Ok(x),
        _ => Err(ApiError::not_found(format!(
            "Configuration group {id} cannot be found."
        ))),
    }
}

async fn config_json(
    app: &App,
    c: &Caller,
    x: &ConfigurationRow,
    detail: bool,
) -> Result<Value, ApiError> {
    let v = app.store.version(&x.datastore_version_id).await?;
    let mut j = json!({
        "id": x.id, "name": x.name, "description": x.description,
        "created": x.created, "updated": x.updated,
        "datastore_version_id": x.datastore_version_id,
        "datastore_name": v.as_ref().map(|v| v.datastore_name.clone()),
        "datastore_version_name": v.as_ref().map(|v| v.name.clone()),
        "links": c.links("configurations", &x.id),
    });
    if detail {
        j["values"] = Value::Object(x.values.clone());
        j["instance_count"] = json!(app.store.instances_with_configuration(&x.id).await?.len());
        j["datastore_version_number"] = json!(v.map(|v| v.version));
    }
    Ok(j)
}

pub async fn list(st: AppState, c: Caller, Query(page): Query<Page>) -> ApiResult {
    let all = st.store.configurations_of(&c.project).await?;
    let (items, next) = page.apply(all, |x| x.id.clone())?;
    let mut out = Vec::new();
    for x in &items {
        out.push(config_json(&st, &c, x, false).await?);
    }
    next.wrap(&c, "configurations", json!({"configurations": out}))
}

pub async fn show(st: AppState, c: Caller, Path((_p, id)): ItemPath) -> ApiResult {
    let x = find(&st, &c, &id).await?;
    ok(json!({"configuration": config_json(&st, &c, &x, true).await?}))
}

pub async fn instances(
    st: AppState,
    c: Caller,
    Path((_p, id)): ItemPath,
    Query(page): Query<Page>,
) -> ApiResult {
    let x = find(&st, &c, &id).await?;
    let all = st.store.instances_with_configuration(&x.id).await?;
    let (items, next) = page.apply(all, |r| r.id.clone())?;
    let list: Vec<Value> = items
        .iter()
        .map(|r| json!({"id": r.id, "name": r.name}))
        .collect();
    next.wrap(
        &c,
        &format!("configurations/{id}/instances"),
        json!({"instances": list}),
    )
}

/// `POST /configurations`, and `PUT`/`PATCH` (which take fewer keys).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupBody {
    configuration: GroupReq,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupReq {
    name: Option<String>,
    #[serde(default, deserialize_with = "present")]
    description: Option<Option<String>>,
    values: Map<String, Value>,
    datastore: Option<DatastoreReq>,
}

fn group_of(body: &Bytes, allowed: &[&str]) -> Result<GroupReq, ApiError> {
    let g = body_as::<GroupBody>(body)?.configuration;
    let given = [
        ("name", g.name.is_some()),
        ("description", g.description.is_some()),
        ("datastore", g.datastore.is_some()),
    ];
    if let Some((k, _)) = given.iter().find(|(k, on)| *on && !allowed.contains(k)) {
        return Err(ApiError::validation(format!(
            "configuration Additional properties are not allowed ('{k}' was unexpected)"
        )));
    }
    if let Some(n) = &g.name {
        super::check_text("configuration['name']", n, 255)?;
    }
    if let Some(Some(d)) = &g.description {
        super::check_text("configuration['description']", d, 255)?;
    }
    Ok(g)
}

pub async fn create(st: AppState, c: Caller, body: Bytes) -> ApiResult {
    let g = group_of(&body, &["name", "description", "datastore"])?;
    let name = g
        .name
        .filter(|n| !n.trim().is_empty())
        .ok_or_else(|| ApiError::validation("configuration 'name' is a required property"))?;
    let (ds, ver) = g.datastore.map_or((None, None), |d| (d.kind, d.version));
    let version =
        crate::ops::instances::resolve_version(&st, ds.as_deref(), ver.as_deref()).await?;
    let values = g.values;
    check_values(&st, &version.id, &values).await?;
    let ts = crate::store::now();
    let row = ConfigurationRow {
        id: uuid::Uuid::new_v4().to_string(),
        project_id: c.project.clone(),
        name,
        description: g.description.flatten(),
        datastore_version_id: version.id.clone(),
        values,
        created: ts.clone(),
        updated: ts,
    };
    st.store.insert_configuration(&row).await?;
    ok(json!({"configuration": config_json(&st, &c, &row, true).await?}))
}

/// PUT replaces the values (202), PATCH merges them (200, empty); both reach every attached
/// instance.
pub async fn update(
    st: AppState,
    c: Caller,
    method: Method,
    Path((_p, id)): ItemPath,
    body: Bytes,
) -> ApiResult {
    let merge = method == Method::PATCH;
    let g = group_of(&body, if merge { &[] } else { &["name", "description"] })?;
    let mut x = find(&st, &c, &id).await?;
    let values = g.values;
    if merge {
        for (k, v) in values {
            // The stored key keeps one spelling per parameter.
            let existing = x
                .values
                .keys()
                .find(|e| e.eq_ignore_ascii_case(&k))
                .cloned();
            if let Some(e) = existing {
                x.values.remove(&e);
            }
            x.values.insert(k, v);
        }
    } else {
        x.values = values;
        if let Some(n) = g.name {
            x.name = n;
        }
        if let Some(d) = g.description {
            x.description = d;
        }
    }
    let overrides = check_values(&st, &x.datastore_version_id, &x.values).await?;
    st.store.update_configuration(&x).await?;
    for r in st.store.instances_with_configuration(&x.id).await? {
        push(&st, &r, overrides.clone()).await?;
    }
    if merge {
        super::empty(StatusCode::OK)
    } else {
        accepted()
    }
}

pub async fn delete(st: AppState, c: Caller, Path((_p, id)): ItemPath) -> ApiResult {
    let x = find(&st, &c, &id).await?;
    let users = st.store.instances_with_configuration(&x.id).await?;
    if let Some(r) = users.first() {
        return Err(ApiError::bad_request(format!(
            "Configuration group {} is attached to instance {} and cannot be deleted; detach it first.",
            x.id, r.id
        )));
    }
    st.store.soft_delete("configurations", &x.id).await?;
    accepted()
}

/// `GET /instances/{id}/configuration`: the rendered default configuration, as the agent has it.
pub async fn instance_default(st: AppState, c: Caller, Path((_p, id)): ItemPath) -> ApiResult {
    let r = super::instances::find(&st, &c, &id).await?;
    let kind = v1::call::Kind::DefaultConfiguration(v1::DefaultConfiguration {});
    let (_, reply) = super::access::call(&st, &r, kind).await?;
    let mut m = Map::new();
    for o in reply.configuration {
        let v = o
            .value
            .parse::<i64>()
            .map(Value::from)
            .unwrap_or(Value::String(o.value));
        m.insert(o.name, v);
    }
    ok(json!({"instance": {"configuration": m}}))
}
