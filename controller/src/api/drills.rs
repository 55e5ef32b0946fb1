//! `/restore_drills` (a Coffer extension, docs/api.md): start a restore drill of an instance,
//! list drills, show one with its signed report ([`crate::workflow::drill`] runs them).

use axum::body::Bytes;
use axum::extract::{Path, Query};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde_json::{json, Value};

use super::parse::{body_as, Id};
use super::{ok, ApiError, ApiResult, AppState, Caller, ItemPath};
use crate::store::DrillRow;

/// A finished drill's report, parsed (Null while it runs).
pub fn report_of(d: &DrillRow) -> Value {
    d.report
        .as_deref()
        .and_then(|t| serde_json::from_str(t).ok())
        .unwrap_or(Value::Null)
}

/// A drill as the API shows it: its report (parsed, and as signed), signature and signer.
pub fn view(d: &DrillRow) -> Value {
    let report = report_of(d);
    json!({
        "id": d.id, "instance_id": d.instance_id, "project_id": d.project_id,
        "status": d.status, "created": d.created, "finished": d.finished,
        "report": report, "report_text": d.report, "signature": d.signature, "signer": d.signer,
    })
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    restore_drill: CreateDrill,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateDrill {
    instance: Id,
}

/// Starts a drill now (202); it runs after any drill started before it.
pub async fn create(st: AppState, c: Caller, body: Bytes) -> ApiResult {
    let b = body_as::<CreateBody>(&body)?.restore_drill;
    let d = crate::workflow::drill::start(&st, &c, &b.instance.0).await?;
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(json!({"restore_drill": view(&d)})),
    )
        .into_response())
}

#[derive(Debug, Default, serde::Deserialize)]
pub struct ListQuery {
    pub instance_id: Option<String>,
}

pub async fn list(st: AppState, c: Caller, Query(q): Query<ListQuery>) -> ApiResult {
    let mut rows = st.store.drills_of(&c.project).await?;
    if let Some(i) = &q.instance_id {
        rows.retain(|d| d.instance_id == *i);
    }
    ok(json!({"restore_drills": rows.iter().map(view).collect::<Vec<_>>()}))
}

pub async fn show(st: AppState, c: Caller, Path((_p, id)): ItemPath) -> ApiResult {
    match st.store.drill(&id).await? {
        Some(d) if d.project_id == c.project || c.admin => ok(json!({"restore_drill": view(&d)})),
        _ => Err(ApiError::not_found(format!(
            "Restore drill {id} could not be found."
        ))),
    }
}
