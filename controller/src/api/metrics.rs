//! `GET /metrics`: what the controller knows of the fleet, in the Prometheus (OpenMetrics)
//! text format, for an operator's token (`X-Auth-Token`, or `Authorization: Bearer`, as a
//! Prometheus scrape sends it). Everything comes from the state store, which heartbeats and
//! workflows keep: nothing is asked of the guests. Labels are bounded (instance, project,
//! datastore; never an intent's id).

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;

use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use serde_json::Value;

use super::{ApiError, AppState};
use crate::App;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InstanceLabels {
    instance: String,
    project: String,
    datastore: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

fn family() -> Family<InstanceLabels, FloatGauge> {
    Family::default()
}

/// The operator's token of the request, or the answer refusing it.
fn operator(app: &App, h: &HeaderMap) -> Result<(), ApiError> {
    let token = h
        .get("x-auth-token")
        .and_then(|v| v.to_str().ok())
        .or_else(|| {
            h.get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
        })
        .ok_or_else(|| {
            ApiError::unauthorized(
                "The request you have made requires authentication: no X-Auth-Token or Authorization: Bearer header.",
            )
        })?;
    let principal = app.tokens.lookup(token.trim()).ok_or_else(|| {
        ApiError::unauthorized(
            "The request you have made requires authentication: the token is not valid.",
        )
    })?;
    if !principal.admin {
        return Err(ApiError::forbidden(
            "The metrics are the operator's: use an admin token.",
        ));
    }
    Ok(())
}

/// Seconds since the epoch of a store timestamp (UTC, Trove's `2019-12-23T20:58:35`).
fn seconds(ts: &str) -> Option<f64> {
    chrono::NaiveDateTime::parse_from_str(ts, "%Y-%m-%dT%H:%M:%S")
        .ok()
        .map(|t| t.and_utc().timestamp() as f64)
}

/// Renders every metric from the store as it is now.
pub async fn render(app: &App) -> anyhow::Result<String> {
    let mut reg = Registry::with_prefix("coffer");
    let instances = app.store.live_instances().await?;
    let mut datastores: HashMap<String, String> = HashMap::new();
    for r in &instances {
        if !datastores.contains_key(&r.datastore_version_id) {
            let name = app
                .store
                .version(&r.datastore_version_id)
                .await?
                .map(|v| v.datastore_name)
                .unwrap_or_default();
            datastores.insert(r.datastore_version_id.clone(), name);
        }
    }
    let labels_of = |id: &str| {
        instances
            .iter()
            .find(|r| r.id == id)
            .map(|r| InstanceLabels {
                instance: r.id.clone(),
                project: r.project_id.clone(),
                datastore: datastores
                    .get(&r.datastore_version_id)
                    .cloned()
                    .unwrap_or_default(),
            })
    };

    // Point-in-time recovery: how far back the latest restorable time is.
    let latest = family();
    let lag = family();
    let now = crate::ops::schedules::now_ms() as f64 / 1000.0;
    // Sources only (a replica's archive is paused), with a recovery window (a backup the
    // archive covers).
    for r in instances
        .iter()
        .filter(|r| r.replica_of.is_none() && r.archive_latest_ms.is_some())
    {
        let (Some((_, l)), Some(labels)) =
            (crate::ops::lineage::window(app, r).await?, labels_of(&r.id))
        else {
            continue;
        };
        let at = l as f64 / 1000.0;
        latest.get_or_create(&labels).set(at);
        lag.get_or_create(&labels).set((now - at).max(0.0));
    }
    reg.register_with_unit(
        "recovery_latest_timestamp",
        "The latest time a point-in-time restore of the instance can reach (its archive stored everything written before it)",
        Unit::Seconds,
        latest,
    );
    reg.register_with_unit(
        "archive_lag",
        "How far the instance's latest restorable time is behind now",
        Unit::Seconds,
        lag,
    );

    // Restore drills: the newest finished one of each instance.
    let (passed, finished, rto, rpo) = (family(), family(), family(), family());
    for d in app.store.latest_finished_drills().await? {
        let Some(labels) = labels_of(&d.instance_id) else {
            continue;
        };
        passed
            .get_or_create(&labels)
            .set(if d.status == "PASSED" { 1.0 } else { 0.0 });
        if let Some(t) = d.finished.as_deref().and_then(seconds) {
            finished.get_or_create(&labels).set(t);
        }
        let report: Value = d
            .report
            .as_deref()
            .and_then(|r| serde_json::from_str(r).ok())
            .unwrap_or_default();
        if let Some(v) = report["rto_seconds"].as_f64() {
            rto.get_or_create(&labels).set(v);
        }
        if let Some(v) = report["rpo_seconds"].as_f64() {
            rpo.get_or_create(&labels).set(v);
        }
    }
    reg.register(
        "restore_drill_last_passed",
        "Whether the instance's newest finished restore drill passed (1) or failed (0)",
        passed,
    );
    reg.register_with_unit(
        "restore_drill_last_finished_timestamp",
        "When the instance's newest finished restore drill ended",
        Unit::Seconds,
        finished,
    );
    reg.register_with_unit(
        "restore_drill_last_rto",
        "How long the newest drill's restore took until the data was served (recovery time)",
        Unit::Seconds,
        rto,
    );
    reg.register_with_unit(
        "restore_drill_last_rpo",
        "How far back the newest drill's restored data was (recovery point)",
        Unit::Seconds,
        rpo,
    );
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &reg)?;
    Ok(out)
}

/// `GET /metrics`.
pub async fn scrape(axum::extract::State(app): AppState, h: HeaderMap) -> Response {
    if let Err(e) = operator(&app, &h) {
        return e.into_response();
    }
    match render(&app).await {
        Ok(text) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}
