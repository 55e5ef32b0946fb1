//! `/backup_schedules` (a Coffer extension, docs/api.md): create, list, show and delete an
//! instance's backup schedules ([`crate::ops::schedules`] runs them).

use axum::body::Bytes;
use axum::extract::{Path, Query};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde_json::{json, Value};

use super::parse::{body_as, Id, Positive};
use super::{accepted, ok, ApiError, ApiResult, AppState, Caller, ItemPath};
use crate::ops::schedules::{self as ops, ScheduleSpec};
use crate::store::ScheduleRow;

fn view(s: &ScheduleRow) -> Value {
    let next = (s.next_run_ms < i64::MAX)
        .then(|| chrono::DateTime::from_timestamp_millis(s.next_run_ms))
        .flatten()
        .map(|t| t.format("%Y-%m-%dT%H:%M:%S").to_string());
    json!({
        "id": s.id, "name": s.name, "instance_id": s.instance_id, "project_id": s.project_id,
        "pattern": s.pattern, "full_every": s.full_every,
        "keep_last": s.keep_last, "keep_days": s.keep_days,
        "keep_daily": s.keep_daily, "keep_weekly": s.keep_weekly, "keep_monthly": s.keep_monthly,
        "next_run": next, "runs": s.runs, "last_run": s.last_run, "last_result": s.last_result,
        "created": s.created,
        "kind": if s.drills() { "drill" } else { "backup" },
    })
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    backup_schedule: CreateSchedule,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateSchedule {
    instance: Id,
    name: String,
    pattern: String,
    full_every: Option<Positive>,
    keep_last: Option<Positive>,
    keep_days: Option<Positive>,
    keep_daily: Option<Positive>,
    keep_weekly: Option<Positive>,
    keep_monthly: Option<Positive>,
    /// `backup` (the default) or `drill`.
    kind: Option<String>,
}

pub async fn create(st: AppState, c: Caller, body: Bytes) -> ApiResult {
    let b = body_as::<CreateBody>(&body)?.backup_schedule;
    if b.name.trim().is_empty() {
        return Err(ApiError::validation(
            "backup_schedule 'name' is a required property (1 to 255 characters)",
        ));
    }
    super::check_text("backup_schedule['name']", &b.name, 255)?;
    super::check_text("backup_schedule['pattern']", &b.pattern, 255)?;
    let drill = match b.kind.as_deref() {
        None | Some("backup") => false,
        Some("drill") => true,
        Some(k) => {
            return Err(ApiError::bad_request(format!(
                "backup_schedule 'kind' is 'backup' or 'drill', not '{k}'."
            )))
        }
    };
    let spec = ScheduleSpec {
        drill,
        instance: b.instance.0,
        name: b.name,
        pattern: b.pattern,
        full_every: b.full_every.map_or(1, |n| n.0),
        keep_last: b.keep_last.map(|n| n.0),
        keep_days: b.keep_days.map(|n| n.0),
        keep_daily: b.keep_daily.map(|n| n.0),
        keep_weekly: b.keep_weekly.map(|n| n.0),
        keep_monthly: b.keep_monthly.map(|n| n.0),
    };
    let s = ops::create(&st, &c, spec).await?;
    Ok((
        StatusCode::OK,
        axum::Json(json!({"backup_schedule": view(&s)})),
    )
        .into_response())
}

#[derive(Debug, Default, serde::Deserialize)]
pub struct ListQuery {
    pub instance_id: Option<String>,
}

pub async fn list(st: AppState, c: Caller, Query(q): Query<ListQuery>) -> ApiResult {
    let mut rows = st.store.schedules_of(&c.project).await?;
    if let Some(i) = &q.instance_id {
        rows.retain(|s| s.instance_id == *i);
    }
    ok(json!({"backup_schedules": rows.iter().map(view).collect::<Vec<_>>()}))
}

pub async fn show(st: AppState, c: Caller, Path((_p, id)): ItemPath) -> ApiResult {
    let s = ops::find(&st, &c, &id).await?;
    ok(json!({"backup_schedule": view(&s)}))
}

/// Deletes the schedule; the backups it took stay (delete them as any backup).
pub async fn delete(st: AppState, c: Caller, Path((_p, id)): ItemPath) -> ApiResult {
    let s = ops::find(&st, &c, &id).await?;
    st.store.delete_schedule(&s.id).await?;
    accepted()
}
