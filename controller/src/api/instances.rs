//! `/instances`: create, list, show, rename, delete and actions.

use axum::body::Bytes;
use axum::extract::{Path, Query};
use coffer_proto::v1;
use serde_json::{json, Map, Value};

use super::{accepted, ok, parse_body, with_next, ApiError, ApiResult, AppState, Caller, Page};
use crate::ops::instances::{self as ops, CreateSpec};
use crate::status::{self, task};
use crate::store::InstanceRow;
use crate::workflow::replicas;
use crate::App;

const CREATE_KEYS: &[&str] = &[
    "name",
    "flavorRef",
    "volume",
    "datastore",
    "nics",
    "databases",
    "users",
    "restorePoint",
    "availability_zone",
    "configuration",
    "replica_of",
    "replica_count",
    "modules",
    "locality",
    "region_name",
    "access",
];
const NOT_YET: &[&str] = &[];

/// Last path segment of an id-or-href, as Trove takes it.
fn id_of(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.rsplit('/').next().unwrap_or(s).to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

pub(super) fn check_name(kind: &str, name: &str, max: usize) -> Result<(), ApiError> {
    if name.is_empty() || name.len() > max {
        return Err(ApiError::validation(format!(
            "{kind} name '{name}' must be 1 to {max} characters"
        )));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "_-.$".contains(c))
    {
        return Err(ApiError::validation(format!(
            "{kind} name '{name}' may only contain letters, digits, '_', '-', '.' and '$'"
        )));
    }
    Ok(())
}

fn str_field<'a>(
    o: &'a Map<String, Value>,
    path: &str,
    key: &str,
) -> Result<Option<&'a str>, ApiError> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(ApiError::validation(format!(
            "{path}['{key}'] {other} is not of type 'string'"
        ))),
    }
}

/// A create with `replica_of`: replicas inherit flavor, volume and version from the source.
fn parse_replica(
    body: &Map<String, Value>,
) -> Result<Option<crate::workflow::replicas::ReplicaReq>, ApiError> {
    let Some(Value::Object(inst)) = body.get("instance") else {
        return Ok(None);
    };
    let source = match inst.get("replica_of") {
        None | Some(Value::Null) => {
            if inst.get("replica_count").is_some_and(|v| !v.is_null()) {
                return Err(ApiError::bad_request(
                    "replica_count is only allowed with replica_of.",
                ));
            }
            return Ok(None);
        }
        Some(v) => id_of(v).filter(|s| !s.is_empty()).ok_or_else(|| {
            ApiError::validation(format!("instance['replica_of'] {v} is not an instance id"))
        })?,
    };
    for k in inst.keys() {
        if !CREATE_KEYS.contains(&k.as_str()) {
            return Err(ApiError::validation(format!(
                "instance Additional properties are not allowed ('{k}' was unexpected)"
            )));
        }
        if ["databases", "users", "restorePoint", "datastore"].contains(&k.as_str())
            && !inst[k].is_null()
        {
            return Err(ApiError::bad_request(format!(
                "'{k}' cannot be given for a replica (it comes from the source)."
            )));
        }
    }
    let name = match inst.get("name") {
        Some(Value::String(s)) => s.clone(),
        _ => return Err(ApiError::validation("'name' is a required property")),
    };
    check_name("instance", &name, 255)?;
    let count = match inst.get("replica_count") {
        None | Some(Value::Null) => 1,
        Some(v) => v.as_u64().filter(|n| *n >= 1).ok_or_else(|| {
            ApiError::validation(format!(
                "instance['replica_count'] {v} is not a positive integer"
            ))
        })? as u32,
    };
    let configuration = match inst.get("configuration") {
        None | Some(Value::Null) => None,
        Some(v) => Some(id_of(v).filter(|s| !s.is_empty()).ok_or_else(|| {
            ApiError::validation(format!(
                "instance['configuration'] {v} is not a configuration id or href"
            ))
        })?),
    };
    Ok(Some(replicas::ReplicaReq {
        name,
        source,
        count,
        configuration,
    }))
}

fn parse_create(body: &Map<String, Value>) -> Result<CreateSpec, ApiError> {
    let inst = match body.get("instance") {
        Some(Value::Object(o)) => o,
        Some(_) => return Err(ApiError::validation("instance is not of type 'object'")),
        None => return Err(ApiError::validation("'instance' is a required property")),
    };
    for k in inst.keys() {
        if !CREATE_KEYS.contains(&k.as_str()) {
            return Err(ApiError::validation(format!(
                "instance Additional properties are not allowed ('{k}' was unexpected)"
            )));
        }
        if NOT_YET.contains(&k.as_str()) && !inst[k].is_null() {
            return Err(ApiError::not_implemented(format!(
                "'{k}' is not supported by this Coffer release yet."
            )));
        }
    }
    let name = match inst.get("name") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => {
            return Err(ApiError::validation(
                "instance['name'] is not of type 'string'",
            ))
        }
        None => {
            return Err(ApiError::validation(
                "instance 'name' is a required property",
            ))
        }
    };
    super::check_text("instance['name']", &name, 255)?;
    if name.trim().is_empty() {
        return Err(ApiError::validation(format!(
            "instance['name'] '{name}' is too short"
        )));
    }
    if name.len() > 255 {
        return Err(ApiError::validation("instance['name'] is too long"));
    }
    if !name.chars().any(|c| c.is_ascii_alphanumeric()) {
        return Err(ApiError::validation(format!(
            "instance['name'] '{name}' does not match '^.*[0-9a-zA-Z]+.*$'"
        )));
    }
    let flavor_id = match inst.get("flavorRef") {
        None => {
            return Err(ApiError::validation(
                "instance 'flavorRef' is a required property",
            ))
        }
        Some(v) => id_of(v).filter(|s| !s.is_empty()).ok_or_else(|| {
            ApiError::validation(format!(
                "instance['flavorRef'] {v} is not of type 'string', 'integer'"
            ))
        })?,
    };
    let volume_size = match inst.get("volume") {
        None => {
            return Err(ApiError::validation(
                "instance 'volume' is a required property",
            ))
        }
        Some(Value::Object(v)) => match v.get("size") {
            Some(Value::Number(n)) if n.as_i64().map(|x| x >= 1).unwrap_or(false) => {
                n.as_i64().unwrap()
            }
            Some(Value::String(s)) if s.parse::<i64>().map(|x| x >= 1).unwrap_or(false) => {
                s.parse().unwrap()
            }
            Some(other) => {
                return Err(ApiError::validation(format!(
                    "instance['volume']['size'] {other} is not a positive integer"
                )))
            }
            None => {
                return Err(ApiError::validation(
                    "instance['volume'] 'size' is a required property",
                ))
            }
        },
        Some(other) => {
            return Err(ApiError::validation(format!(
                "instance['volume'] {other} is not of type 'object'"
            )))
        }
    };
    let (datastore, version) = match inst.get("datastore") {
        None | Some(Value::Null) => (None, None),
        Some(Value::Object(d)) => {
            for k in d.keys() {
                if !["type", "version", "version_number"].contains(&k.as_str()) {
                    return Err(ApiError::validation(format!(
                        "instance['datastore'] Additional properties are not allowed ('{k}' was unexpected)"
                    )));
                }
            }
            (
                str_field(d, "instance['datastore']", "type")?.map(String::from),
                str_field(d, "instance['datastore']", "version")?.map(String::from),
            )
        }
        Some(other) => {
            return Err(ApiError::validation(format!(
                "instance['datastore'] {other} is not of type 'object'"
            )))
        }
    };
    let mut databases = vec![];
    if let Some(v) = inst.get("databases") {
        let arr = v
            .as_array()
            .ok_or_else(|| ApiError::validation("instance['databases'] is not of type 'array'"))?;
        super::check_count("instance['databases']", arr.len())?;
        for d in arr {
            let o = d.as_object().ok_or_else(|| {
                ApiError::validation("instance['databases'] item is not of type 'object'")
            })?;
            let name = str_field(o, "instance['databases']", "name")?.ok_or_else(|| {
                ApiError::validation("instance['databases'] 'name' is a required property")
            })?;
            check_name("database", name, 64)?;
            let cs = str_field(o, "instance['databases']", "character_set")?.unwrap_or("");
            let co = str_field(o, "instance['databases']", "collate")?.unwrap_or("");
            for (what, s) in [("character_set", cs), ("collate", co)] {
                if !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') || s.len() > 64 {
                    return Err(ApiError::validation(format!(
                        "instance['databases'] {what} '{s}' is not valid"
                    )));
                }
            }
            if databases.iter().any(|x: &v1::Database| x.name == name) {
                return Err(ApiError::bad_request(format!(
                    "Database '{name}' is listed twice."
                )));
            }
            databases.push(v1::Database {
                name: name.into(),
                character_set: cs.into(),
                collate: co.into(),
            });
        }
    }
    let mut users = vec![];
    if let Some(v) = inst.get("users") {
        let arr = v
            .as_array()
            .ok_or_else(|| ApiError::validation("instance['users'] is not of type 'array'"))?;
        super::check_count("instance['users']", arr.len())?;
        for u in arr {
            let o = u.as_object().ok_or_else(|| {
                ApiError::validation("instance['users'] item is not of type 'object'")
            })?;
            let name = str_field(o, "instance['users']", "name")?.ok_or_else(|| {
                ApiError::validation("instance['users'] 'name' is a required property")
            })?;
            check_name("user", name, 80)?;
            let password = str_field(o, "instance['users']", "password")?.ok_or_else(|| {
                ApiError::validation("instance['users'] 'password' is a required property")
            })?;
            if password.is_empty()
                || password.len() > 128
                || password.chars().any(|c| c.is_control())
            {
                return Err(ApiError::validation(
                    "instance['users'] password must be 1 to 128 characters without control characters",
                ));
            }
            let host = str_field(o, "instance['users']", "host")?.unwrap_or("%");
            if host.is_empty()
                || host.len() > 255
                || !host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || ".%_:-/".contains(c))
            {
                return Err(ApiError::validation(format!(
                    "instance['users'] host '{host}' is not valid"
                )));
            }
            let mut dbs = vec![];
            if let Some(dv) = o.get("databases") {
                let arr = dv.as_array().ok_or_else(|| {
                    ApiError::validation("instance['users']['databases'] is not of type 'array'")
                })?;
                super::check_count("instance['users']['databases']", arr.len())?;
                for d in arr {
                    let n = d.get("name").and_then(|n| n.as_str()).ok_or_else(|| {
                        ApiError::validation(
                            "instance['users']['databases'] 'name' is a required property",
                        )
                    })?;
                    if !databases.iter().any(|x| x.name == n) {
                        return Err(ApiError::bad_request(format!(
                            "Database '{n}' of user '{name}' is not in the instance's 'databases'."
                        )));
                    }
                    dbs.push(n.to_string());
                }
            }
            if users
                .iter()
                .any(|x: &v1::User| x.name == name && x.host == host)
            {
                return Err(ApiError::bad_request(format!(
                    "User '{name}'@'{host}' is listed twice."
                )));
            }
            users.push(v1::User {
                name: name.into(),
                password: password.into(),
                host: host.into(),
                databases: dbs,
                password_sealed: Vec::new(),
            });
        }
    }
    let restore_from = match inst.get("restorePoint") {
        None | Some(Value::Null) => None,
        Some(Value::Object(o)) => Some(
            o.get("backupRef")
                .and_then(id_of)
                .filter(|s| !s.is_empty())
                .ok_or_else(|| {
                    ApiError::validation(
                        "instance['restorePoint'] 'backupRef' is a required property",
                    )
                })?,
        ),
        Some(v) => {
            return Err(ApiError::validation(format!(
                "instance['restorePoint'] {v} is not of type 'object'"
            )))
        }
    };
    let configuration = match inst.get("configuration") {
        None | Some(Value::Null) => None,
        Some(v) => Some(id_of(v).filter(|s| !s.is_empty()).ok_or_else(|| {
            ApiError::validation(format!(
                "instance['configuration'] {v} is not a configuration id or href"
            ))
        })?),
    };
    let modules = match inst.get("modules") {
        None | Some(Value::Null) => vec![],
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.get("id")
                    .and_then(id_of)
                    .filter(|s| !s.is_empty())
                    .ok_or_else(|| ApiError::validation("instance['modules'] items need an 'id'"))
            })
            .collect::<Result<_, _>>()?,
        Some(v) => {
            return Err(ApiError::validation(format!(
                "instance['modules'] {v} is not of type 'array'"
            )))
        }
    };
    Ok(CreateSpec {
        modules,
        configuration,
        restore_from,
        name,
        flavor_id,
        volume_size,
        datastore,
        version,
        databases,
        users,
    })
}

/// Renders an instance in Trove's list or detail form.
pub(super) async fn render(
    app: &App,
    c: &Caller,
    r: &InstanceRow,
    detail: bool,
    with_usage: bool,
) -> Result<Value, ApiError> {
    let fresh = app.fresh(&r.id);
    let (mut status, mut op) = status::derive(&r.task, &r.service_status, fresh);
    if status == "ACTIVE" && app.store.backup_running(&r.id).await? {
        // Trove: a running backup shows as BACKUP (the database stays online).
        (status, op) = ("BACKUP", "");
    }
    let version = app.store.version(&r.datastore_version_id).await?;
    let (ds_type, ds_version, ds_number) = match &version {
        Some(v) => (json!(v.datastore_name), json!(v.name), json!(v.version)),
        None => (Value::Null, Value::Null, Value::Null),
    };
    let mut j = json!({
        "id": r.id,
        "name": r.name,
        "status": status,
        "operating_status": op,
        "links": c.links("instances", &r.id),
        "flavor": {"id": r.flavor_id, "links": c.links("flavors", &r.flavor_id)},
        "datastore": {"type": ds_type, "version": ds_version},
        "region": "RegionOne",
        "access": {"is_public": false, "allowed_cidrs": []},
        "volume": {"size": r.volume_size},
    });
    if let Some(host) = &r.host {
        j["ip"] = json!([host]);
        j["addresses"] = json!([{"address": host, "type": "private"}]);
    }
    if let Some(port) = r.port {
        j["port"] = json!(port);
    }
    if c.admin {
        j["tenant_id"] = json!(r.project_id);
    }
    super::replicas::view(app, c, r, &mut j).await?;
    if let Some(cid) = &r.configuration_id {
        let name = app
            .store
            .configuration(cid)
            .await?
            .map(|x| x.name)
            .unwrap_or_default();
        j["configuration"] =
            json!({"id": cid, "name": name, "links": c.links("configurations", cid)});
    }
    if detail {
        j["created"] = json!(r.created);
        j["updated"] = json!(r.updated);
        j["datastore"]["version_number"] = ds_number;
        let live = app.live.lock().unwrap().get(&r.id).cloned();
        if let Some(l) = &live {
            j["service_status_updated"] = json!(l.last_seen_wall);
        }
        if let Some(f) = &r.fault {
            j["fault"] = json!({"message": f, "created": r.fault_at, "details": null});
        } else if status == "ERROR" && !fresh && r.task == task::NONE {
            j["fault"] = json!({
                "message": format!(
                    "The guest agent has not reported for more than {} s; check that coffer-agent runs for this instance.",
                    app.cfg.heartbeat_expiry_s
                ),
                "created": null, "details": null,
            });
        }
        if with_usage
            && ![
                "BUILD", "REBOOT", "RESIZE", "PROMOTE", "EJECT", "UPGRADE", "SHUTDOWN",
            ]
            .contains(&status)
        {
            if let Some(l) = live {
                let gb = l.hb.volume_used_bytes as f64 / (1u64 << 30) as f64;
                j["volume"]["used"] = json!((gb * 1000.0).round() / 1000.0);
                j["volume"]["used_percent"] =
                    json!(((gb / r.volume_size.max(1) as f64) * 10000.0).round() / 100.0);
            }
        }
        if r.task == task::BUILDING || r.task == task::REBOOTING || r.task == task::DELETING {
            if let Some((kind, state, progress, message)) = app.store.latest_intent(&r.id).await? {
                j["progress"] = json!({"action": kind, "state": state, "percent": progress, "message": message});
            }
        }
    }
    Ok(j)
}

pub(super) use crate::ops::find_instance as find;

pub async fn create(st: AppState, c: Caller, body: Bytes) -> ApiResult {
    let body = parse_body(&body)?;
    let (id, root_password) = match parse_replica(&body)? {
        Some(r) => (replicas::create(st.0.clone(), &c, r).await?, None),
        None => ops::create(&st.0, &c, parse_create(&body)?).await?,
    };
    let row = st
        .store
        .instance(&id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("instance vanished"))?;
    let mut view = render(&st, &c, &row, true, false).await?;
    if let Some(pw) = root_password {
        // Trove returns root's password in the create response only (root_on_create).
        view["password"] = json!(pw);
    }
    ok(json!({ "instance": view }))
}

pub async fn delete(st: AppState, c: Caller, Path((_p, id)): Path<(String, String)>) -> ApiResult {
    ops::delete(&st, &find(&st, &c, &id).await?).await?;
    accepted()
}

async fn list_impl(st: AppState, c: Caller, page: Page, detail: bool) -> ApiResult {
    let rows = st.store.instances_of(&c.project).await?;
    let (rows, next) = page.apply(rows, |r| r.id.clone())?;
    let mut out = vec![];
    for r in &rows {
        out.push(render(&st, &c, r, detail, false).await?);
    }
    ok(with_next(
        json!({"instances": out}),
        &c,
        "instances",
        &page.limit,
        next,
    ))
}

pub async fn list(st: AppState, c: Caller, Query(page): Query<Page>) -> ApiResult {
    list_impl(st, c, page, false).await
}

pub async fn list_detail(st: AppState, c: Caller, Query(page): Query<Page>) -> ApiResult {
    list_impl(st, c, page, true).await
}

pub async fn show(st: AppState, c: Caller, Path((_p, id)): Path<(String, String)>) -> ApiResult {
    let r = find(&st, &c, &id).await?;
    ok(json!({"instance": render(&st, &c, &r, true, true).await?}))
}

async fn update_impl(st: AppState, c: Caller, id: String, body: Bytes, patch: bool) -> ApiResult {
    let body = parse_body(&body)?;
    let r = find(&st, &c, &id).await?;
    let inst = match body.get("instance") {
        Some(Value::Object(o)) => o,
        _ => return Err(ApiError::validation("'instance' is a required property")),
    };
    let allowed: &[&str] = if patch {
        &[
            "name",
            "configuration",
            "replica_of",
            "slave_of",
            "datastore_version",
        ]
    } else {
        &[
            "name",
            "configuration",
            "replica_of",
            "datastore_version",
            "access",
        ]
    };
    for k in inst.keys() {
        if !allowed.contains(&k.as_str()) {
            return Err(ApiError::validation(format!(
                "instance Additional properties are not allowed ('{k}' was unexpected)"
            )));
        }
    }
    let others: Vec<&String> = inst.keys().filter(|k| *k != "name").collect();
    if others.len() > 1 {
        return Err(ApiError::bad_request(
            "Only one attribute (except 'name') is allowed to update.",
        ));
    }
    if let Some(k) = others.first() {
        if !["configuration", "replica_of", "slave_of"].contains(&k.as_str()) {
            return Err(ApiError::not_implemented(format!(
                "Updating '{k}' is not supported by this Coffer release yet."
            )));
        }
    }
    if let Some(n) = inst.get("name") {
        let n = n
            .as_str()
            .ok_or_else(|| ApiError::validation("instance['name'] is not of type 'string'"))?;
        super::check_text("instance['name']", n, 255)?;
        if n.trim().is_empty() || n.len() > 255 || !n.chars().any(|c| c.is_ascii_alphanumeric()) {
            return Err(ApiError::validation(format!(
                "instance['name'] '{n}' is not a valid name"
            )));
        }
        st.store.rename(&r.id, n).await?;
    }
    // `replica_of` / `slave_of` (any value: the key's presence counts): detach from the source.
    if inst.contains_key("replica_of") || inst.contains_key("slave_of") {
        replicas::detach(&st.0, &r).await?;
        return accepted();
    }
    // `configuration`: attach (an id or href), detach (null); `{"instance": {}}` also detaches.
    match inst.get("configuration") {
        Some(Value::Null) => {
            if r.configuration_id.is_some() {
                super::configurations::attach(&st, &c, &r, None).await?;
            }
        }
        Some(v) => {
            let g = id_of(v).filter(|s| !s.is_empty()).ok_or_else(|| {
                ApiError::validation(format!(
                    "instance['configuration'] {v} is not a configuration id or href"
                ))
            })?;
            super::configurations::attach(&st, &c, &r, Some(g)).await?;
        }
        None if inst.is_empty() && r.configuration_id.is_some() => {
            super::configurations::attach(&st, &c, &r, None).await?;
        }
        None => {}
    }
    accepted()
}

pub async fn update(
    st: AppState,
    c: Caller,
    Path((_p, id)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    update_impl(st, c, id, body, false).await
}

pub async fn update_patch(
    st: AppState,
    c: Caller,
    Path((_p, id)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    update_impl(st, c, id, body, true).await
}

pub async fn action(
    st: AppState,
    c: Caller,
    Path((_p, id)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    let app = st.0.clone();
    let body = parse_body(&body)?;
    let r = find(&app, &c, &id).await?;
    if body.len() != 1 {
        return Err(ApiError::bad_request(
            "An action body must contain exactly one action.",
        ));
    }
    let (key, _arg) = body.iter().next().unwrap();
    match key.as_str() {
        "restart" => ops::restart(&app, &r).await.and_then(|_| accepted()),
        "reset_status" => {
            if !c.admin {
                return Err(ApiError::forbidden(
                    "Policy doesn't allow instance:reset_status to be performed.",
                ));
            }
            ops::reset_status(&app, &id).await?;
            accepted()
        }
        "promote_to_replica_source" => {
            replicas::promote(app, &r).await?;
            accepted()
        }
        "eject_replica_source" => {
            replicas::eject(app, &r).await?;
            accepted()
        }
        "resize" => Err(ApiError::not_implemented(format!(
            "The '{key}' action is not supported by this Coffer release yet."
        ))),
        other => Err(ApiError::bad_request(format!(
            "Invalid instance action: '{other}'."
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;

    fn create(body: Value) -> Result<CreateSpec, ApiError> {
        parse_create(body.as_object().expect("a JSON object"))
    }

    /// Trove create bodies and the exact answer each gets: the error's status and text, or
    /// what was parsed.
    #[test]
    fn create_bodies_are_parsed_or_refused_with_troves_texts() {
        let ok = json!({"instance": {"name": "db-1", "flavorRef": "1", "volume": {"size": 2},
            "datastore": {"type": "any-store", "version": "1.0"},
            "databases": [{"name": "shop"}],
            "users": [{"name": "app", "password": "pw", "databases": [{"name": "shop"}]}]}});
        let r = create(ok).unwrap();
        assert_eq!(
            (r.name.as_str(), r.flavor_id.as_str(), r.volume_size),
            ("db-1", "1", 2)
        );
        assert_eq!(r.databases.len(), 1);
        assert_eq!(r.users[0].host, "%");
        assert_eq!(r.users[0].databases, vec!["shop".to_string()]);
        // A numeric flavorRef and a string size, as python-troveclient sends them.
        let r = create(json!({"instance": {"name": "n", "flavorRef": 7, "volume": {"size": "3"}}}))
            .unwrap();
        assert_eq!((r.flavor_id.as_str(), r.volume_size), ("7", 3));

        let bad = |body: Value| create(body).map(|_| ()).unwrap_err();
        let v = "Validation error: ";
        let table: Vec<(Value, StatusCode, String)> = vec![
            (json!({}), StatusCode::BAD_REQUEST, format!("{v}'instance' is a required property")),
            (json!({"instance": []}), StatusCode::BAD_REQUEST, format!("{v}instance is not of type 'object'")),
            (
                json!({"instance": {"name": "n", "flavorRef": "1", "volume": {"size": 1}, "colour": 1}}),
                StatusCode::BAD_REQUEST,
                format!("{v}instance Additional properties are not allowed ('colour' was unexpected)"),
            ),
            (
                json!({"instance": {"flavorRef": "1", "volume": {"size": 1}}}),
                StatusCode::BAD_REQUEST,
                format!("{v}instance 'name' is a required property"),
            ),
            (
                json!({"instance": {"name": 5, "flavorRef": "1", "volume": {"size": 1}}}),
                StatusCode::BAD_REQUEST,
                format!("{v}instance['name'] is not of type 'string'"),
            ),
            (
                json!({"instance": {"name": "--", "flavorRef": "1", "volume": {"size": 1}}}),
                StatusCode::BAD_REQUEST,
                format!("{v}instance['name'] '--' does not match '^.*[0-9a-zA-Z]+.*$'"),
            ),
            (
                json!({"instance": {"name": "n", "volume": {"size": 1}}}),
                StatusCode::BAD_REQUEST,
                format!("{v}instance 'flavorRef' is a required property"),
            ),
            (
                json!({"instance": {"name": "n", "flavorRef": "1"}}),
                StatusCode::BAD_REQUEST,
                format!("{v}instance 'volume' is a required property"),
            ),
            (
                json!({"instance": {"name": "n", "flavorRef": "1", "volume": {"size": 0}}}),
                StatusCode::BAD_REQUEST,
                format!("{v}instance['volume']['size'] 0 is not a positive integer"),
            ),
            (
                json!({"instance": {"name": "n", "flavorRef": "1", "volume": {}}}),
                StatusCode::BAD_REQUEST,
                format!("{v}instance['volume'] 'size' is a required property"),
            ),
            (
                json!({"instance": {"name": "n", "flavorRef": "1", "volume": {"size": 1},
                    "datastore": {"type": "any-store", "colour": "x"}}}),
                StatusCode::BAD_REQUEST,
                format!("{v}instance['datastore'] Additional properties are not allowed ('colour' was unexpected)"),
            ),
            (
                json!({"instance": {"name": "n", "flavorRef": "1", "volume": {"size": 1},
                    "databases": [{"name": "a"}, {"name": "a"}]}}),
                StatusCode::BAD_REQUEST,
                "Database 'a' is listed twice.".into(),
            ),
            (
                json!({"instance": {"name": "n", "flavorRef": "1", "volume": {"size": 1},
                    "users": [{"name": "u"}]}}),
                StatusCode::BAD_REQUEST,
                format!("{v}instance['users'] 'password' is a required property"),
            ),
            (
                json!({"instance": {"name": "n", "flavorRef": "1", "volume": {"size": 1},
                    "users": [{"name": "u", "password": ""}]}}),
                StatusCode::BAD_REQUEST,
                format!("{v}instance['users'] password must be 1 to 128 characters without control characters"),
            ),
            (
                json!({"instance": {"name": "n", "flavorRef": "1", "volume": {"size": 1},
                    "users": [{"name": "u", "password": "p", "host": "a b"}]}}),
                StatusCode::BAD_REQUEST,
                format!("{v}instance['users'] host 'a b' is not valid"),
            ),
            (
                json!({"instance": {"name": "n", "flavorRef": "1", "volume": {"size": 1},
                    "users": [{"name": "u", "password": "p", "databases": [{"name": "x"}]}]}}),
                StatusCode::BAD_REQUEST,
                "Database 'x' of user 'u' is not in the instance's 'databases'.".into(),
            ),
            (
                json!({"instance": {"name": "n", "flavorRef": "1", "volume": {"size": 1},
                    "users": [{"name": "u", "password": "p"}, {"name": "u", "password": "q"}]}}),
                StatusCode::BAD_REQUEST,
                "User 'u'@'%' is listed twice.".into(),
            ),
        ];
        for (body, status, message) in table {
            let e = bad(body.clone());
            assert_eq!(
                (e.status, e.message.as_str()),
                (status, message.as_str()),
                "{body}"
            );
        }
    }
}
