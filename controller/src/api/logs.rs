//! Guest logs (`/instances/{id}/log`), carried out by the agent; and a tail of a published log
//! (`/instances/{id}/log/{name}/tail?lines=N`, beyond Trove: its CLI reads Swift directly and
//! ours is not Swift), read by the controller from the storage through the same trait.

use axum::body::Bytes;
use axum::extract::{Path, Query};
use axum::http::StatusCode;
use coffer_proto::v1;
use serde_json::{json, Value};

use super::access::call;
use super::parse::{body_as, ZeroOne};
use super::{ok, ApiError, ApiResult, AppState, Caller, ItemPath, SubPath};
use crate::store::InstanceRow;

fn log_json(l: &v1::LogInfo) -> Value {
    json!({
        "name": l.name, "type": l.r#type, "status": l.status,
        "published": l.published, "pending": l.pending,
        "container": l.container, "prefix": l.prefix, "metafile": l.metafile,
    })
}

/// The instance's log `name`, which the caller may `verb` (a system log only an admin).
async fn find_log(
    st: &AppState,
    r: &InstanceRow,
    c: &Caller,
    name: &str,
    verb: &str,
) -> Result<v1::LogInfo, ApiError> {
    let (_, all) = call(st, r, v1::call::Kind::ListLogs(v1::ListLogs {})).await?;
    let Some(log) = all.logs.into_iter().find(|l| l.name == name) else {
        return Err(ApiError::not_found(format!("Log {name} does not exist.")));
    };
    if log.r#type != "USER" && !c.admin {
        return Err(ApiError::forbidden(format!(
            "Log {name} is a system log: only an administrator may {verb}."
        )));
    }
    Ok(log)
}

pub async fn list(st: AppState, c: Caller, Path((_p, id)): ItemPath) -> ApiResult {
    let r = super::instances::find(&st, &c, &id).await?;
    let (_, reply) = call(&st, &r, v1::call::Kind::ListLogs(v1::ListLogs {})).await?;
    // Tenants see their own (USER) logs; admins every log.
    let shown = reply.logs.iter().filter(|l| c.admin || l.r#type == "USER");
    ok(json!({ "logs": shown.map(log_json).collect::<Vec<_>>() }))
}

pub async fn action(st: AppState, c: Caller, Path((_p, id)): ItemPath, body: Bytes) -> ApiResult {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct LogAction {
        name: String,
        enable: Option<ZeroOne>,
        disable: Option<ZeroOne>,
        publish: Option<ZeroOne>,
        discard: Option<ZeroOne>,
    }
    let b = body_as::<LogAction>(&body)?;
    if b.name.is_empty() {
        return Err(ApiError::validation("'name' is a required property"));
    }
    let name = b.name;
    let on = |f: Option<ZeroOne>| f.is_some_and(|x| x.0);
    let (enable, disable, publish, discard) =
        (on(b.enable), on(b.disable), on(b.publish), on(b.discard));
    if enable && disable {
        return Err(ApiError::bad_request(
            "Cannot enable and disable a log at the same time.",
        ));
    }
    let r = super::instances::find(&st, &c, &id).await?;
    find_log(&st, &r, &c, &name, "act on it").await?;
    let chosen = [
        ("enable", enable),
        ("disable", disable),
        ("discard", discard),
        ("publish", publish),
    ];
    let mut actions: Vec<&str> = chosen.iter().filter_map(|x| x.1.then_some(x.0)).collect();
    if actions.is_empty() {
        actions.push("show");
    }
    let mut last = None;
    for a in actions {
        if a == "publish" {
            // The instance's storage exists before its agent writes (older instances included).
            crate::objects::ensure(&st, &r.id).await?;
        }
        let kind = v1::call::Kind::LogAction(v1::LogAction {
            name: name.clone(),
            action: a.into(),
        });
        let (_, reply) = call(&st, &r, kind).await.map_err(|e| match e.status {
            StatusCode::NOT_IMPLEMENTED => {
                ApiError::not_implemented(format!("Logs are not available: {}", e.message))
            }
            _ => e,
        })?;
        if a == "discard" && st.cfg.backup.is_some() {
            // Agents cannot delete stored objects: the published pieces go from here.
            let (prefix, metafile) = storage_keys(&st, &r, &name).await?;
            crate::objects::delete_prefix(&st, &r.id, &prefix, Some(&metafile)).await?;
        }
        last = reply.logs.into_iter().next();
    }
    let l = last.ok_or_else(|| anyhow::anyhow!("the agent answered no log"))?;
    ok(json!({ "log": log_json(&l) }))
}

#[derive(serde::Deserialize)]
pub struct TailQuery {
    lines: Option<String>,
}

/// The most bytes of log text one tail answer carries (older lines are left out past it).
const TAIL_MAX_BYTES: usize = 1 << 20;

pub async fn tail(
    st: AppState,
    c: Caller,
    Path((_p, id, name)): SubPath,
    Query(q): Query<TailQuery>,
) -> ApiResult {
    let r = super::instances::find(&st, &c, &id).await?;
    let n: usize = match &q.lines {
        None => 20,
        Some(s) => s
            .parse()
            .ok()
            .filter(|n| *n > 0 && *n <= 10_000)
            .ok_or_else(|| {
                ApiError::bad_request(format!("lines must be 1 to 10000, not '{s}'."))
            })?,
    };
    let log = find_log(&st, &r, &c, &name, "read it").await?;
    if log.prefix == "None" {
        return ok(json!({"name": name, "lines": []}));
    }
    let cfg = st.cfg.backup.clone().ok_or_else(|| {
        ApiError::not_implemented("Logs are not available: no storage is configured.")
    })?;
    let (prefix, _) = storage_keys(&st, &r, &log.name).await?;
    let client = st.client.clone();
    let owner = r.id.clone();
    let lines = tokio::task::spawn_blocking(move || {
        let storage = cfg.storage.build(
            Some(&client),
            &owner,
            coffer_common::storage::Access::Controller,
        )?;
        coffer_common::logs::tail(storage.as_ref(), &prefix, n, TAIL_MAX_BYTES)
    })
    .await
    .map_err(|e| anyhow::anyhow!("reading the log: {e}"))?
    .map_err(|e| anyhow::anyhow!("reading the log: {e}"))?;
    ok(json!({"name": name, "lines": lines}))
}

/// Where a log's pieces and metafile are stored: the controller's own derivation (this
/// instance's id, its datastore — the version's manager — and the log's name). What an agent
/// says of it is never used, so no agent can point the controller at another instance's objects.
async fn storage_keys(
    st: &AppState,
    r: &InstanceRow,
    name: &str,
) -> Result<(String, String), ApiError> {
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(ApiError::not_found(format!("Log {name} does not exist.")));
    }
    let version = st
        .store
        .version(&r.datastore_version_id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("the instance's datastore version is gone"))?;
    let base = format!(
        "{}/{}/{}-{}",
        coffer_common::logs::CONTAINER,
        r.id,
        version.manager,
        name
    );
    Ok((format!("{base}/"), format!("{base}_metafile")))
}
