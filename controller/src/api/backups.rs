//! Backups (trace-api.md §10): create (202 with the NEW backup), list, show, delete, and the
//! instance's backups. The agent takes the backup (a `backup` intent); storage objects are
//! deleted from here through the same `Storage` trait, so a backup outlives its instance.

use axum::body::Bytes;
use axum::extract::{Path, Query};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde_json::{json, Value};

use serde::de::IgnoredAny;

use super::instances::find;
use super::parse::{body_as, present, Id, ZeroOne};
use super::{accepted, ok, ApiError, ApiResult, AppState, Caller, ItemPath};
use crate::ops::backups::{find_backup, remove, BackupSpec};
use crate::store::BackupRow;
use crate::App;

#[derive(Debug, Default, serde::Deserialize)]
pub struct BackupQuery {
    pub instance_id: Option<String>,
    pub datastore: Option<String>,
    pub limit: Option<String>,
    pub marker: Option<String>,
}

async fn backup_json(app: &App, b: &BackupRow) -> Result<Value, ApiError> {
    let v = app.store.version(&b.datastore_version_id).await?;
    let mut j = json!({
        "id": b.id, "name": b.name, "description": b.description,
        "locationRef": b.location, "instance_id": b.instance_id,
        "created": b.created, "updated": b.updated,
        "size": b.size_bytes.map(|s| ((s as f64 / (1u64 << 30) as f64) * 10000.0).round() / 10000.0),
        "status": b.status, "parent_id": b.parent_id, "project_id": b.project_id,
        "datastore": {
            "type": v.as_ref().map(|v| v.datastore_name.clone()),
            "version": v.as_ref().map(|v| v.name.clone()),
            "version_id": b.datastore_version_id,
        },
    });
    if !b.progress.is_empty() {
        j["progress"] = json!(b.progress);
    }
    if let Some(f) = &b.fault {
        j["fault"] = json!(f);
    }
    if let Some(c) = &b.checksum {
        j["checksum"] = json!(c);
    }
    Ok(j)
}

async fn list_filtered(
    app: &App,
    c: &Caller,
    q: &BackupQuery,
    instance: Option<&str>,
) -> ApiResult {
    let mut rows = app.store.backups_of(&c.project).await?;
    if let Some(i) = instance.or(q.instance_id.as_deref()) {
        rows.retain(|b| b.instance_id == i);
    }
    if let Some(ds) = &q.datastore {
        let mut keep = vec![];
        for b in rows {
            if let Some(v) = app.store.version(&b.datastore_version_id).await? {
                if v.datastore_name == *ds || v.datastore_id == *ds {
                    keep.push(b);
                }
            }
        }
        rows = keep;
    }
    // Trove pages backups by integer offset.
    let limit = super::limit_of(q.limit.as_deref())?;
    let offset = match &q.marker {
        None => 0,
        Some(s) => s.parse::<usize>().map_err(|_| {
            ApiError::bad_request(format!("marker must be an integer offset, not '{s}'."))
        })?,
    };
    let total = rows.len();
    let mut out = vec![];
    for b in rows.iter().skip(offset).take(limit) {
        out.push(backup_json(app, b).await?);
    }
    let mut body = json!({"backups": out});
    if offset + limit < total {
        body["links"] = json!([{"rel": "next", "href": format!("https://{}/v1.0/{}/backups?limit={limit}&marker={}", c.host, c.project, offset + limit)}]);
    }
    ok(body)
}

pub async fn list(st: AppState, c: Caller, Query(q): Query<BackupQuery>) -> ApiResult {
    list_filtered(&st, &c, &q, None).await
}

pub async fn list_for_instance(
    st: AppState,
    c: Caller,
    Path((_p, id)): ItemPath,
    Query(q): Query<BackupQuery>,
) -> ApiResult {
    let r = find(&st, &c, &id).await?;
    list_filtered(&st, &c, &q, Some(&r.id)).await
}

pub async fn show(st: AppState, c: Caller, Path((_p, id)): ItemPath) -> ApiResult {
    let b = find_backup(&st, &c, &id).await?;
    ok(json!({"backup": backup_json(&st, &b).await?}))
}

/// `POST /backups`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    backup: CreateBackup,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct CreateBackup {
    name: String,
    instance: Id,
    description: Option<String>,
    parent_id: Option<String>,
    incremental: Option<ZeroOne>,
    swift_container: Option<IgnoredAny>,
    storage_driver: Option<IgnoredAny>,
    #[serde(default, deserialize_with = "present")]
    restore_from: Option<IgnoredAny>,
}

pub async fn create(st: AppState, c: Caller, body: Bytes) -> ApiResult {
    let b = body_as::<CreateBody>(&body)?.backup;
    if b.name.trim().is_empty() {
        return Err(ApiError::validation(
            "backup 'name' is a required property (1 to 255 characters)",
        ));
    }
    super::check_text("backup['name']", &b.name, 255)?;
    if let Some(d) = &b.description {
        super::check_text("backup['description']", d, 1024)?;
    }
    if b.restore_from.is_some() {
        return Err(ApiError::not_implemented(
            "Importing external backups is not supported.",
        ));
    }
    let spec = BackupSpec {
        name: b.name,
        description: b.description,
        instance: b.instance.0,
        incremental: b.incremental.is_some_and(|x| x.0),
        parent_id: b.parent_id,
        schedule: None,
    };
    // Shown as created (NEW), whatever its agent has done with it since.
    let b = crate::ops::backups::create(&st, &c, spec).await?;
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(json!({"backup": backup_json(&st, &b).await?})),
    )
        .into_response())
}

pub async fn delete(st: AppState, c: Caller, Path((_p, id)): ItemPath) -> ApiResult {
    let b = find_backup(&st, &c, &id).await?;
    // The backup and every backup built on it (Trove deletes child incrementals too).
    let all = st.store.backups_of(&b.project_id).await?;
    let mut doomed = vec![b.clone()];
    let mut i = 0;
    while i < doomed.len() {
        let parent = doomed[i].id.clone();
        doomed.extend(
            all.iter()
                .filter(|x| x.parent_id.as_deref() == Some(parent.as_str()))
                .cloned(),
        );
        i += 1;
    }
    if let Some(running) = doomed.iter().find(|x| x.status.running()) {
        return Err(ApiError::unprocessable(format!(
            "Backup {} is running; delete when it has finished.",
            running.id
        )));
    }
    for d in doomed.iter().rev() {
        remove(&st, &d.id).await?;
    }
    accepted()
}
