//! Enrolment requests (`crate::ops::enrol` holds how tokens and first uses work).

use axum::body::Bytes;
use axum::extract::Path;
use serde_json::json;

use super::parse::{body_as, DatastoreReq, Id, Positive, Volume};
use super::{ok, ApiError, ApiResult, AppState, Caller};
use crate::ops::enrol::{create_token, rfc3339, EnrolReq, TokenSpec};

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenBody {
    enrolment_token: TokenReq,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenReq {
    name: String,
    #[serde(rename = "flavorRef")]
    flavor_ref: Id,
    volume: Option<Volume>,
    datastore: Option<DatastoreReq>,
    ttl: Option<Positive>,
    project_id: Option<String>,
}

/// `POST /v1.0/{project}/mgmt/enrolment-tokens` (admin):
/// `{"enrolment_token": {"name", "flavorRef", "volume": {"size"}, "datastore": {"type", "version"}, "ttl"}}`.
pub async fn create(st: AppState, c: Caller, Path(_p): Path<String>, body: Bytes) -> ApiResult {
    if !c.admin {
        return Err(ApiError::forbidden(
            "Creating enrolment tokens is an administrator's action (admin role required).",
        ));
    }
    let t = body_as::<TokenBody>(&body)?.enrolment_token;
    let name = t.name;
    super::parse::check_name("Instance name", &name, 255)?;
    let flavor = st.store.flavor(&t.flavor_ref.0).await?.ok_or_else(|| {
        ApiError::bad_request(format!("Flavor '{}' could not be found.", t.flavor_ref.0))
    })?;
    let volume_size = t.volume.map_or(1, |v| v.size.0);
    if volume_size > 10_000 {
        return Err(ApiError::validation(
            "enrolment_token['volume']['size'] must be 1-10000",
        ));
    }
    let (ds, ver) = t.datastore.map_or((None, None), |d| (d.kind, d.version));
    let version =
        crate::ops::instances::resolve_version(&st, ds.as_deref(), ver.as_deref()).await?;
    let ttl = t.ttl.map_or(3600, |t| t.0);
    if !(60..=7 * 86_400).contains(&ttl) {
        return Err(ApiError::validation(
            "enrolment_token['ttl'] must be 60-604800 seconds",
        ));
    }
    let project = t.project_id.unwrap_or_else(|| c.project.clone());
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
