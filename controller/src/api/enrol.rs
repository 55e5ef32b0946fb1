//! Enrolment requests (`crate::ops::enrol` holds how tokens and first uses work).

use axum::body::Bytes;
use axum::extract::Path;
use serde_json::{json, Value};

use super::{ok, parse_body, ApiError, ApiResult, AppState, Caller};
use crate::ops::enrol::{create_token, rfc3339, EnrolReq, TokenSpec};

/// `POST /v1.0/{project}/mgmt/enrolment-tokens` (admin):
/// `{"enrolment_token": {"name", "flavorRef", "volume": {"size"}, "datastore": {"type", "version"}, "ttl"}}`.
pub async fn create(st: AppState, c: Caller, Path(_p): Path<String>, body: Bytes) -> ApiResult {
    if !c.admin {
        return Err(ApiError::forbidden(
            "Creating enrolment tokens is an administrator's action (admin role required).",
        ));
    }
    let body = parse_body(&body)?;
    let t = match body.get("enrolment_token") {
        Some(Value::Object(o)) => o,
        _ => {
            return Err(ApiError::validation(
                "'enrolment_token' is a required property",
            ))
        }
    };
    const KEYS: &[&str] = &[
        "name",
        "flavorRef",
        "volume",
        "datastore",
        "ttl",
        "project_id",
    ];
    if let Some(k) = t.keys().find(|k| !KEYS.contains(&k.as_str())) {
        return Err(ApiError::validation(format!(
            "enrolment_token Additional properties are not allowed ('{k}' was unexpected)"
        )));
    }
    let name = match t.get("name") {
        Some(Value::String(s)) => s.clone(),
        _ => {
            return Err(ApiError::validation(
                "enrolment_token['name'] is a required string",
            ))
        }
    };
    super::instances::check_name("Instance name", &name, 255)?;
    let flavor = match t.get("flavorRef") {
        Some(Value::String(s)) => Some(s.rsplit('/').next().unwrap_or(s).to_string()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    }
    .ok_or_else(|| ApiError::validation("enrolment_token['flavorRef'] is required"))?;
    let flavor =
        st.store.flavor(&flavor).await?.ok_or_else(|| {
            ApiError::bad_request(format!("Flavor '{flavor}' could not be found."))
        })?;
    let volume_size = t
        .get("volume")
        .and_then(|v| v.get("size"))
        .and_then(Value::as_i64)
        .unwrap_or(1);
    if !(1..=10_000).contains(&volume_size) {
        return Err(ApiError::validation(
            "enrolment_token['volume']['size'] must be 1-10000",
        ));
    }
    let ds = t.get("datastore");
    let version = crate::ops::instances::resolve_version(
        &st,
        ds.and_then(|d| d.get("type")).and_then(Value::as_str),
        ds.and_then(|d| d.get("version")).and_then(Value::as_str),
    )
    .await?;
    let ttl = match t.get("ttl") {
        None | Some(Value::Null) => 3600,
        Some(v) => v
            .as_i64()
            .filter(|n| (60..=7 * 86_400).contains(n))
            .ok_or_else(|| {
                ApiError::validation("enrolment_token['ttl'] must be 60-604800 seconds")
            })?,
    };
    let project = match t.get("project_id") {
        Some(Value::String(p)) => p.clone(),
        _ => c.project.clone(),
    };
    let spec = TokenSpec {
        project,
        name: name.clone(),
        version_id: version.id.clone(),
        flavor_id: flavor.id.clone(),
        volume_size,
        instance_id: None,
        ttl_s: ttl,
    };
    let tok = create_token(&st.store, &spec).await?;
    ok(json!({"enrolment_token": {
        "id": tok.id,
        "name": name,
        "token": tok.token,
        "tenant_id": spec.project,
        "expires": rfc3339(tok.expires_unix),
        "datastore": {"type": version.datastore_name, "version": version.name},
        "flavor": {"id": flavor.id},
        "volume": {"size": volume_size},
    }}))
}

/// `POST /v1.0/agents/enrol`: the token is the authorisation.
pub async fn enrol(st: AppState, body: Bytes) -> ApiResult {
    let req: EnrolReq = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("Invalid enrolment request: {e}")))?;
    let e = crate::ops::enrol::enrol(&st, req).await?;
    ok(json!({ "enrolment": e }))
}
