//! Modules (`/modules`) and instance modules (`/instances/{id}/modules`). Contents arrive
//! base64-encoded (as troveclient sends them), are checked by the type's driver (a `config`
//! module also against the version's configuration parameters), kept sealed to the controller's
//! own key, and reach an agent sealed to its key.

use axum::body::Bytes;
use axum::extract::Path;
use axum::http::StatusCode;
use coffer_proto::{seal, v1};
use serde_json::{json, Map, Value};

use super::access::call;
use super::parse::{body_as, present, some_of, DatastoreReq, IdRef, ZeroOne};
use super::{empty, ok, ApiError, ApiResult, AppState, Caller, ItemPath, SubPath};
use crate::ops::modules::{find, spec_sealed};
use crate::store::ModuleRow;
use crate::App;

fn b64(s: &str) -> Option<Vec<u8>> {
    data_encoding::BASE64
        .decode(s.trim().as_bytes())
        .ok()
        .or_else(|| data_encoding::BASE64_NOPAD.decode(s.trim().as_bytes()).ok())
}

fn module_json(m: &ModuleRow) -> Value {
    json!({
        "id": m.id, "name": m.name, "type": m.kind, "description": m.description,
        "tenant_id": m.project_id, "tenant": m.project_id.clone().unwrap_or_else(|| "all".into()),
        "datastore_id": null, "datastore": m.datastore.clone().unwrap_or_else(|| "all".into()),
        "datastore_version_id": null,
        "datastore_version": m.datastore_version.clone().unwrap_or_else(|| "all".into()),
        "auto_apply": m.auto_apply, "priority_apply": m.priority_apply,
        "apply_order": m.apply_order, "is_admin": m.is_admin, "md5": m.md5,
        "visible": m.visible, "live_update": m.live_update,
        "created": m.created, "updated": m.updated,
    })
}

/// `POST`/`PUT /modules`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ModuleBody {
    module: ModuleReq,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ModuleReq {
    name: Option<String>,
    /// A create names it `module_type`, an update `type` (as python-troveclient sends them).
    #[serde(alias = "type")]
    module_type: Option<String>,
    contents: Option<String>,
    #[serde(default, deserialize_with = "present")]
    description: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    datastore: Option<Option<DatastoreReq>>,
    auto_apply: Option<ZeroOne>,
    all_tenants: Option<ZeroOne>,
    visible: Option<ZeroOne>,
    live_update: Option<ZeroOne>,
    priority_apply: Option<ZeroOne>,
    full_access: Option<ZeroOne>,
    all_datastores: Option<ZeroOne>,
    all_datastore_versions: Option<ZeroOne>,
    apply_order: Option<i64>,
}

fn body_of(body: &Bytes) -> Result<ModuleReq, ApiError> {
    Ok(body_as::<ModuleBody>(body)?.module)
}

/// Applies a create/update request onto `m`; checks admin-only options and the contents.
async fn fill(
    app: &App,
    c: &Caller,
    m: &mut ModuleRow,
    b: ModuleReq,
    creating: bool,
) -> Result<(), ApiError> {
    let flag = |f: Option<ZeroOne>| f.map(|x| x.0);
    if let Some(n) = &b.name {
        if n.trim().is_empty() {
            return Err(ApiError::validation(
                "module['name'] must be a non-empty string",
            ));
        }
        super::check_text("module['name']", n, 255)?;
        m.name = n.clone();
    } else if creating {
        return Err(ApiError::validation("module 'name' is a required property"));
    }
    if let Some(t) = &b.module_type {
        let t = t.to_ascii_lowercase();
        if !coffer_common::modules::TYPES.contains(&t.as_str()) {
            return Err(ApiError::not_found(format!(
                "Module type '{t}' was not found (known: {}).",
                coffer_common::modules::TYPES.join(", ")
            )));
        }
        m.kind = t;
    } else if creating {
        m.kind = "ping".into();
    }
    if let Some(d) = b.description {
        if let Some(d) = &d {
            super::check_text("module['description']", d, 1024)?;
        }
        m.description = d;
    }
    if let Some(d) = b.datastore {
        (m.datastore, m.datastore_version) = d.map_or((None, None), |d| (d.kind, d.version));
    }
    if flag(b.all_datastores) == Some(true) {
        m.datastore = None;
        m.datastore_version = None;
    }
    if flag(b.all_datastore_versions) == Some(true) {
        m.datastore_version = None;
    }
    // Admin-only options (Trove's ModuleAccessForbidden).
    let admin_only = [
        ("auto_apply", flag(b.auto_apply) == Some(true)),
        ("all_tenants", flag(b.all_tenants) == Some(true)),
        ("visible", flag(b.visible) == Some(false)),
        ("priority_apply", flag(b.priority_apply) == Some(true)),
    ];
    if let Some((k, _)) = admin_only.iter().find(|(_, used)| *used) {
        if !c.admin {
            return Err(ApiError::forbidden(format!(
                "Module option '{k}' is for administrators only."
            )));
        }
    }
    for (given, field) in [
        (b.auto_apply, &mut m.auto_apply),
        (b.visible, &mut m.visible),
        (b.live_update, &mut m.live_update),
        (b.priority_apply, &mut m.priority_apply),
    ] {
        if let Some(v) = flag(given) {
            *field = v;
        }
    }
    if flag(b.all_tenants) == Some(true) {
        m.project_id = None;
    }
    if let Some(o) = b.apply_order {
        if !(0..=9).contains(&o) {
            return Err(ApiError::validation(format!(
                "module['apply_order'] {o} is not 0 to 9"
            )));
        }
        m.apply_order = o;
    }
    m.is_admin = c.admin
        && (m.project_id.is_none() || !m.visible || m.auto_apply || m.priority_apply)
        && flag(b.full_access) != Some(true);
    if let Some(text) = &b.contents {
        let bytes = b64(text).ok_or_else(|| {
            ApiError::bad_request(
                "module['contents'] is not valid base64 (send the file base64-encoded).",
            )
        })?;
        coffer_common::modules::validate(&m.kind, &bytes).map_err(|e| {
            ApiError::bad_request(format!("The {} module's contents: {e}.", m.kind))
        })?;
        if m.kind == "config" {
            // Like a configuration group: every value checked against the version's rules.
            let version = crate::ops::instances::resolve_version(
                app,
                m.datastore.as_deref(),
                m.datastore_version.as_deref(),
            )
            .await?;
            let mut values = Map::new();
            for (k, v) in
                coffer_common::modules::config_values(&bytes).map_err(ApiError::bad_request)?
            {
                let j = v
                    .parse::<i64>()
                    .map(Value::from)
                    .or_else(|_| v.parse::<f64>().map(Value::from))
                    .unwrap_or(Value::String(v));
                values.insert(k, j);
            }
            crate::ops::configurations::check_values(app, &version.id, &values).await?;
        }
        m.md5 = format!("{:x}", md5_of(text.trim().as_bytes()));
        let kept = seal::seal(
            &app.reply_public_key,
            &seal::kept_module_context(&m.id),
            &bytes,
        )
        .map_err(|e| anyhow::anyhow!("sealing: {e}"))?;
        m.contents_sealed = seal::to_hex(&kept);
    } else if creating {
        return Err(ApiError::validation(
            "module 'contents' is a required property",
        ));
    }
    Ok(())
}

/// MD5 as Trove reports it (of the base64 text).
fn md5_of(b: &[u8]) -> u128 {
    let d = openssl::hash::hash(openssl::hash::MessageDigest::md5(), b).expect("md5");
    u128::from_be_bytes(d.as_ref().try_into().expect("16 bytes"))
}

pub async fn create(st: AppState, c: Caller, body: Bytes) -> ApiResult {
    let b = body_of(&body)?;
    let ts = crate::store::now();
    let mut m = ModuleRow {
        id: uuid::Uuid::new_v4().to_string(),
        project_id: Some(c.project.clone()),
        name: String::new(),
        kind: String::new(),
        description: None,
        contents_sealed: String::new(),
        md5: String::new(),
        datastore: None,
        datastore_version: None,
        auto_apply: false,
        visible: true,
        live_update: false,
        priority_apply: false,
        apply_order: 5,
        is_admin: false,
        created: ts.clone(),
        updated: ts,
    };
    fill(&st, &c, &mut m, b, true).await?;
    st.store.save_module(&m).await?;
    counted(&m, 0)
}

/// `{"module": ...}` with its `instance_count`.
fn counted(m: &ModuleRow, instance_count: usize) -> ApiResult {
    let mut j = module_json(m);
    j["instance_count"] = json!(instance_count);
    ok(json!({ "module": j }))
}

/// A module the caller may change (an administrators' module only for an administrator).
async fn find_editable(app: &App, c: &Caller, id: &str) -> Result<ModuleRow, ApiError> {
    let m = find(app, c, id).await?;
    if m.is_admin && !c.admin {
        return Err(ApiError::forbidden(
            "This module is for administrators only.",
        ));
    }
    Ok(m)
}

pub async fn list(st: AppState, c: Caller) -> ApiResult {
    let all = st.store.modules_for(&c.project).await?;
    let shown = all.iter().filter(|m| c.admin || m.visible);
    ok(json!({ "modules": shown.map(module_json).collect::<Vec<_>>() }))
}

pub async fn show(st: AppState, c: Caller, Path((_p, id)): ItemPath) -> ApiResult {
    let m = find(&st, &c, &id).await?;
    counted(&m, st.store.module_instances(&m.id).await?.len())
}

pub async fn update(st: AppState, c: Caller, Path((_p, id)): ItemPath, body: Bytes) -> ApiResult {
    let b = body_of(&body)?;
    let mut m = find_editable(&st, &c, &id).await?;
    if !m.live_update && !st.store.module_instances(&m.id).await?.is_empty() && b.contents.is_some()
    {
        return Err(ApiError::bad_request(
            "The module is applied to instances and is not live_update: remove it from them first.",
        ));
    }
    fill(&st, &c, &mut m, b, false).await?;
    m.updated = crate::store::now();
    st.store.save_module(&m).await?;
    counted(&m, st.store.module_instances(&m.id).await?.len())
}

pub async fn delete(st: AppState, c: Caller, Path((_p, id)): ItemPath) -> ApiResult {
    let m = find_editable(&st, &c, &id).await?;
    if let Some(i) = st.store.module_instances(&m.id).await?.first() {
        return Err(ApiError::forbidden(format!(
            "Module {} is applied to instance {}; remove it there first.",
            m.id, i.id
        )));
    }
    st.store.soft_delete("modules", &m.id).await?;
    empty(StatusCode::OK)
}

pub async fn instances(st: AppState, c: Caller, Path((_p, id)): ItemPath) -> ApiResult {
    let m = find(&st, &c, &id).await?;
    let all = st.store.module_instances(&m.id).await?;
    // A public module is shared; the instances it is applied to are not.
    let shown = all.iter().filter(|r| c.admin || r.project_id == c.project);
    let list: Vec<Value> = shown.map(|r| json!({"id": r.id, "name": r.name})).collect();
    ok(json!({ "instances": list }))
}

fn guest_json(r: &v1::ModuleResult) -> Value {
    let m = r.module.clone().unwrap_or_default();
    json!({
        "id": m.id, "name": m.name, "type": m.r#type, "md5": m.md5,
        "datastore": m.datastore, "datastore_version": m.datastore_version, "tenant": m.tenant,
        "auto_apply": m.auto_apply, "visible": m.visible, "is_admin": m.is_admin,
        "status": r.status, "message": r.message, "created": r.created, "updated": r.updated,
        "removed": if r.removed.is_empty() { Value::Null } else { json!(r.removed) },
        "apply_sequence": r.sequence,
        "contents": null,
    })
}

pub async fn instance_list(st: AppState, c: Caller, Path((_p, id)): ItemPath) -> ApiResult {
    let r = super::instances::find(&st, &c, &id).await?;
    let (_, reply) = call(&st, &r, v1::call::Kind::ListModules(v1::ListModules {})).await?;
    let shown = |x: &&v1::ModuleResult| {
        x.removed.is_empty() && (c.admin || x.module.as_ref().is_some_and(|m| m.visible))
    };
    let list: Vec<Value> = reply.modules.iter().filter(shown).map(guest_json).collect();
    ok(json!({ "modules": list }))
}

pub async fn instance_apply(
    st: AppState,
    c: Caller,
    Path((_p, id)): ItemPath,
    body: Bytes,
) -> ApiResult {
    let r = super::instances::find(&st, &c, &id).await?;
    #[derive(serde::Deserialize)]
    struct Apply {
        modules: Vec<IdRef>,
    }
    let ids: Vec<String> = some_of("modules", body_as::<Apply>(&body)?.modules)?
        .into_iter()
        .map(|m| m.id.0)
        .collect();
    let mut specs = Vec::new();
    for mid in &ids {
        let m = find(&st, &c, mid).await?;
        specs.push(spec_sealed(&st, &r.id, &crate::agents::agent_key(&r)?, &m)?);
    }
    let kind = v1::call::Kind::ApplyModules(v1::ApplyModules { modules: specs });
    let (_, reply) = call(&st, &r, kind).await?;
    for x in &reply.modules {
        let m = x.module.clone().unwrap_or_default();
        st.store
            .record_instance_module(&r.id, &m.id, &m.md5, &x.status, &x.message, false)
            .await?;
    }
    ok(json!({ "modules": reply.modules.iter().map(guest_json).collect::<Vec<_>>() }))
}

pub async fn instance_remove(st: AppState, c: Caller, Path((_p, id, mid)): SubPath) -> ApiResult {
    let r = super::instances::find(&st, &c, &id).await?;
    if !coffer_proto::subjects::valid_token(&mid) {
        return Err(ApiError::not_found(format!(
            "Module {mid} cannot be found."
        )));
    }
    let kind = v1::call::Kind::RemoveModule(v1::RemoveModule { id: mid.clone() });
    let (_, reply) = call(&st, &r, kind).await?;
    if let Some(x) = reply.modules.first() {
        st.store
            .record_instance_module(&r.id, &mid, "", &x.status, &x.message, true)
            .await?;
    }
    empty(StatusCode::OK)
}
