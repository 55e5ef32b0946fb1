//! Backups (trace-api.md §10): create (202 with the NEW backup), list, show, delete, and the
//! instance's backups. The agent takes the backup (a `backup` intent); storage objects are
//! deleted from here through the same `Storage` trait, so a backup outlives its instance.

use axum::body::Bytes;
use axum::extract::{Path, Query};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde_json::{json, Value};

use super::instances::find;
use super::{accepted, ok, parse_body, ApiError, ApiResult, AppState, Caller};
use crate::ops::backups::{remove, start};
use crate::status::{self, task};
use crate::store::{BackupRow, Store};
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
    let limit = match &q.limit {
        None => 20,
        Some(s) => s.parse::<usize>().ok().filter(|n| *n > 0).ok_or_else(|| {
            ApiError::bad_request(format!("limit must be a positive integer, not '{s}'."))
        })?,
    };
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
    Path((_p, id)): Path<(String, String)>,
    Query(q): Query<BackupQuery>,
) -> ApiResult {
    let r = find(&st, &c, &id).await?;
    list_filtered(&st, &c, &q, Some(&r.id)).await
}

async fn find_backup(app: &App, c: &Caller, id: &str) -> Result<BackupRow, ApiError> {
    match app.store.backup(id).await? {
        Some(b) if b.project_id == c.project || c.admin => Ok(b),
        _ => Err(ApiError::not_found(format!(
            "Backup {id} could not be found."
        ))),
    }
}

pub async fn show(st: AppState, c: Caller, Path((_p, id)): Path<(String, String)>) -> ApiResult {
    let b = find_backup(&st, &c, &id).await?;
    ok(json!({"backup": backup_json(&st, &b).await?}))
}

pub async fn create(st: AppState, c: Caller, body: Bytes) -> ApiResult {
    let app = st.0.clone();
    let body = parse_body(&body)?;
    let Some(Value::Object(b)) = body.get("backup") else {
        return Err(ApiError::validation("'backup' is a required property"));
    };
    for k in b.keys() {
        if ![
            "name",
            "instance",
            "description",
            "parent_id",
            "incremental",
            "swift_container",
            "storage_driver",
            "restore_from",
        ]
        .contains(&k.as_str())
        {
            return Err(ApiError::validation(format!(
                "backup Additional properties are not allowed ('{k}' was unexpected)"
            )));
        }
    }
    let name = match b.get("name") {
        Some(Value::String(s)) if !s.trim().is_empty() && s.len() <= 255 => s.clone(),
        _ => {
            return Err(ApiError::validation(
                "backup 'name' is a required property (1 to 255 characters)",
            ))
        }
    };
    super::check_text("backup['name']", &name, 255)?;
    let description = b
        .get("description")
        .and_then(|v| v.as_str())
        .map(String::from);
    if let Some(d) = &description {
        super::check_text("backup['description']", d, 1024)?;
    }
    let instance = b
        .get("instance")
        .and_then(|v| v.as_str())
        .ok_or_else(|| ApiError::validation("backup 'instance' is a required property"))?;
    let incremental = match b.get("incremental") {
        None | Some(Value::Null) => false,
        Some(Value::Number(n)) if n.as_i64() == Some(0) => false,
        Some(Value::Number(n)) if n.as_i64() == Some(1) => true,
        Some(v) => {
            return Err(ApiError::validation(format!(
                "backup['incremental'] {v} is not one of [0, 1]"
            )))
        }
    };

    if b.contains_key("restore_from") {
        return Err(ApiError::not_implemented(
            "Importing external backups is not supported.",
        ));
    }
    if app.cfg.backup.is_none() {
        return Err(ApiError::unprocessable(
            "Backups are not configured on this deployment ([backup] in the controller config).",
        ));
    }
    let r = find(&app, &c, instance).await?;
    let fresh = app.fresh(&r.id);
    let (st_now, _) = status::derive(&r.task, &r.service_status, fresh);
    if r.task != task::NONE || st_now != "ACTIVE" || app.store.backup_running(&r.id).await? {
        return Err(ApiError::unprocessable(format!(
            "Instance {} is not currently available for an action to be performed (status was {st_now}).",
            r.id
        )));
    }
    if !r.capabilities.split(',').any(|k| k == "backup") {
        return Err(ApiError::unprocessable(format!(
            "The agent of instance {} (version '{}') does not support 'backup'; upgrade coffer-agent on it.",
            r.id, r.agent_version
        )));
    }
    // Incremental: on top of the given parent, or of the instance's latest completed backup.
    let parent_id = match b.get("parent_id") {
        None | Some(Value::Null) if !incremental => None,
        None | Some(Value::Null) => {
            let latest = app
                .store
                .backups_of(&c.project)
                .await?
                .into_iter()
                .find(|x| x.instance_id == r.id && x.status == "COMPLETED");
            Some(
                latest
                    .ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "Instance {} has no completed backup to build an incremental on.",
                            r.id
                        ))
                    })?
                    .id,
            )
        }
        Some(Value::String(p)) => {
            let parent = find_backup(&app, &c, p).await?;
            if parent.instance_id != r.id {
                return Err(ApiError::bad_request(format!(
                    "Backup {p} is not a backup of instance {}.",
                    r.id
                )));
            }
            if parent.status != "COMPLETED" {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "conflict",
                    format!("Backup {p} is not completed."),
                ));
            }
            Some(parent.id)
        }
        Some(v) => {
            return Err(ApiError::validation(format!(
                "backup['parent_id'] {v} is not of type 'string'"
            )))
        }
    };
    if let Some(cfg) = app.cfg.backup.as_ref() {
        let datastore = crate::ops::datastore(&app, &r).await?;
        let strategy =
            coffer_proto::datastore::BackupMethod::for_datastore(datastore, cfg.strategy);
        match strategy {
            None => {
                return Err(ApiError::bad_request(format!(
                    "Backups of {datastore} instances are not supported."
                )))
            }
            Some(k) if parent_id.is_some() && !k.incremental() => {
                return Err(ApiError::bad_request(format!(
                    "The backup strategy for {datastore} ({}) takes full backups only; omit parent_id and incremental.",
                    k.name()
                )));
            }
            Some(_) => {}
        }
    }
    let mut tx = app.store.begin().await?;
    // Again under the write lock: a restart, a switchover or another backup that started since
    // the first look wins, and this one is refused.
    let task_now = Store::task_in(&mut *tx, &r.id).await?.unwrap_or_default();
    if task_now != task::NONE
        || Store::owner_in(&mut *tx, &r.id).await?.is_some()
        || Store::backup_running_in(&mut *tx, &r.id).await?
    {
        let shown = if task_now == task::NONE {
            "BACKUP".to_string()
        } else {
            task_now.to_uppercase()
        };
        return Err(ApiError::unprocessable(format!(
            "Instance {} is not currently available for an action to be performed (task status was {shown}).",
            r.id
        )));
    }
    let limit = Store::quota_limits_with(&mut *tx, &c.project)
        .await?
        .into_iter()
        .find(|(k, _)| k == "backups")
        .map(|(_, l)| l)
        .unwrap_or(-1);
    if limit >= 0 && Store::count_backups(&mut tx, &c.project).await? + 1 > limit {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "overLimit",
            "Quota exceeded for resources: ['backups'].",
        ));
    }
    let id = start(
        &app,
        tx,
        &r,
        uuid::Uuid::new_v4().to_string(),
        name,
        description,
        parent_id,
        false,
    )
    .await?;
    let b = app
        .store
        .backup(&id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("backup vanished"))?;
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(json!({"backup": backup_json(&app, &b).await?})),
    )
        .into_response())
}

pub async fn delete(st: AppState, c: Caller, Path((_p, id)): Path<(String, String)>) -> ApiResult {
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
    if let Some(running) = doomed
        .iter()
        .find(|x| x.status == "NEW" || x.status == "BUILDING")
    {
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
