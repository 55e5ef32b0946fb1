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
    /// `source` (has replicas), `replica` or `standalone`.
    role: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    instance: String,
    project: String,
    datastore: String,
    role: String,
    /// Trove's status (ACTIVE, BUILD, ...).
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkflowLabels {
    kind: String,
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
    // Each instance's labels, built once (a source is an instance some other replicates from).
    let sources: std::collections::HashSet<&str> = instances
        .iter()
        .filter_map(|r| r.replica_of.as_deref())
        .collect();
    let labels: HashMap<&str, InstanceLabels> = instances
        .iter()
        .map(|r| {
            let role = if r.replica_of.is_some() {
                "replica"
            } else if sources.contains(r.id.as_str()) {
                "source"
            } else {
                "standalone"
            };
            let l = InstanceLabels {
                instance: r.id.clone(),
                project: r.project_id.clone(),
                datastore: datastores
                    .get(&r.datastore_version_id)
                    .cloned()
                    .unwrap_or_default(),
                role: role.into(),
            };
            (r.id.as_str(), l)
        })
        .collect();
    let labels_of = |id: &str| labels.get(id).cloned();
    fleet(app, &mut reg, &instances, &labels).await?;

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
    control_plane(app, &mut reg).await?;
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &reg)?;
    Ok(out)
}

/// Each instance's health, load and replication, from its agent's last heartbeat (as this
/// controller received it: every controller sees every heartbeat), and its newest backup.
async fn fleet(
    app: &App,
    reg: &mut Registry,
    instances: &[crate::store::InstanceRow],
    labels: &HashMap<&str, InstanceLabels>,
) -> anyhow::Result<()> {
    let labels_of = |id: &str| labels.get(id).cloned();
    let status: Family<StatusLabels, FloatGauge> = Family::default();
    let (up, age, read_only, fenced) = (family(), family(), family(), family());
    let (connections, cpu, memory, used, total) =
        (family(), family(), family(), family(), family());
    let (lag_s, io, sql) = (family(), family(), family());
    let mut lag_units: std::collections::BTreeMap<
        &'static str,
        Family<InstanceLabels, FloatGauge>,
    > = Default::default();
    // Read under the lock (no await in the loop), not copied: a fleet's heartbeats are many.
    {
        let all = app.live.lock().unwrap();
        for r in instances {
            let Some(l) = labels_of(&r.id) else { continue };
            let hb = all.get(&r.id);
            let fresh = app.fresh_of(hb);
            let service = r.service_status.as_str();
            let (st, _) = crate::status::derive(r.task, service, fresh);
            status
                .get_or_create(&StatusLabels {
                    instance: l.instance.clone(),
                    project: l.project.clone(),
                    datastore: l.datastore.clone(),
                    role: l.role.clone(),
                    status: st.to_string(),
                })
                .set(1.0);
            up.get_or_create(&l).set(if fresh && service == "running" {
                1.0
            } else {
                0.0
            });
            fenced
                .get_or_create(&l)
                .set(if r.ejected { 1.0 } else { 0.0 });
            let Some(live) = hb else { continue };
            let hb = &live.hb;
            age.get_or_create(&l)
                .set(live.last_seen.elapsed().as_secs_f64());
            connections.get_or_create(&l).set(hb.connections as f64);
            cpu.get_or_create(&l).set(hb.cpu_percent as f64 / 100.0);
            memory.get_or_create(&l).set(hb.memory_bytes as f64);
            used.get_or_create(&l).set(hb.volume_used_bytes as f64);
            total.get_or_create(&l).set(hb.volume_total_bytes as f64);
            let Some(rep) = &hb.replication else { continue };
            read_only
                .get_or_create(&l)
                .set(if rep.read_only { 1.0 } else { 0.0 });
            if rep.role == "fenced" {
                fenced.get_or_create(&l).set(1.0);
            }
            if rep.role != "replica" {
                continue;
            }
            io.get_or_create(&l)
                .set(if rep.io_running { 1.0 } else { 0.0 });
            sql.get_or_create(&l)
                .set(if rep.sql_running { 1.0 } else { 0.0 });
            if rep.seconds_behind >= 0 {
                lag_s.get_or_create(&l).set(rep.seconds_behind as f64);
            }
            // In the datastore's own unit, against the source's last reported position.
            let source_pos = r
                .replica_of
                .as_ref()
                .and_then(|s| all.get(s))
                .and_then(|s| s.hb.replication.as_ref())
                .map(|s| s.position.clone());
            if let (Some(p), Ok(ds)) = (source_pos, l.datastore.parse::<coffer_proto::Datastore>())
            {
                lag_units
                    .entry(ds.lag_unit())
                    .or_default()
                    .get_or_create(&l)
                    .set(ds.position_behind(&rep.applied_position, &p) as f64);
            }
        }
    }
    reg.register(
        "instance_status",
        "1 for the instance's status as the API shows it (ACTIVE, BUILD, ERROR, ...)",
        status,
    );
    reg.register(
        "instance_up",
        "Whether the instance's agent reports in and its database server runs (1) or not (0)",
        up,
    );
    reg.register_with_unit(
        "instance_heartbeat_age",
        "Seconds since the instance's agent last reported",
        Unit::Seconds,
        age,
    );
    reg.register(
        "instance_read_only",
        "Whether the instance's database refuses writes (1)",
        read_only,
    );
    reg.register(
        "instance_fenced",
        "Whether the instance is fenced: a source taken out by a failover or an eject (1)",
        fenced,
    );
    reg.register(
        "instance_connections",
        "Client connections to the instance's database",
        connections,
    );
    reg.register(
        "instance_cpu_ratio",
        "CPU the instance's database uses, in cores",
        cpu,
    );
    reg.register_with_unit(
        "instance_memory",
        "Memory the instance's database uses",
        Unit::Bytes,
        memory,
    );
    reg.register_with_unit(
        "instance_volume_used",
        "Bytes used on the instance's volume",
        Unit::Bytes,
        used,
    );
    reg.register_with_unit(
        "instance_volume_size",
        "Size of the instance's volume",
        Unit::Bytes,
        total,
    );
    reg.register(
        "replication_io_running",
        "Whether a replica receives its source's changes (1)",
        io,
    );
    reg.register(
        "replication_sql_running",
        "Whether a replica applies what it received (1)",
        sql,
    );
    reg.register_with_unit(
        "replication_lag",
        "How far a replica's applied changes are behind its source, in time",
        Unit::Seconds,
        lag_s,
    );

    for (unit, lag) in lag_units {
        let unit = match unit {
            "bytes" => Unit::Bytes,
            u => Unit::Other(u.to_string()),
        };
        reg.register_with_unit(
            "replication_lag",
            "How far a replica's applied changes are behind its source, in the datastore's own unit",
            unit,
            lag,
        );
    }
    let (last, size) = (family(), family());
    for (id, at_ms, bytes) in app.store.last_completed_backups().await? {
        let Some(l) = labels_of(&id) else { continue };
        last.get_or_create(&l).set(at_ms as f64 / 1000.0);
        size.get_or_create(&l).set(bytes as f64);
    }
    reg.register_with_unit(
        "backup_last_success_timestamp",
        "When the instance's newest completed backup completed",
        Unit::Seconds,
        last,
    );
    // Backup schedules: the shortest interval of an instance's schedules, and its next run.
    let (interval, next) = (family(), family());
    for sch in app.store.all_schedules().await? {
        let Some(l) = labels_of(&sch.instance_id) else {
            continue;
        };
        let Ok(cron) = crate::ops::schedules::parse(&sch.pattern) else {
            continue;
        };
        let after = crate::ops::schedules::next_after(&cron, sch.next_run_ms);
        if let Some(a) = after {
            let secs = (a - sch.next_run_ms) as f64 / 1000.0;
            let g = interval.get_or_create(&l);
            if g.get() == 0.0 || secs < g.get() {
                g.set(secs);
            }
        }
        let n = next.get_or_create(&l);
        let at = sch.next_run_ms as f64 / 1000.0;
        if n.get() == 0.0 || at < n.get() {
            n.set(at);
        }
    }
    reg.register_with_unit(
        "backup_schedule_interval",
        "The shortest interval between runs of the instance's backup schedules",
        Unit::Seconds,
        interval,
    );
    reg.register_with_unit(
        "backup_schedule_next_run_timestamp",
        "When the instance's next scheduled backup is due",
        Unit::Seconds,
        next,
    );
    reg.register_with_unit(
        "backup_last_size",
        "Stored size of the instance's newest completed backup",
        Unit::Bytes,
        size,
    );
    Ok(())
}

/// The control plane: this process's counters, the outbox, running workflows, NATS.
async fn control_plane(app: &App, reg: &mut Registry) -> anyhow::Result<()> {
    app.telemetry.register(reg);
    let depth: Gauge = Gauge::default();
    depth.set(app.store.outbox_depth().await?);
    reg.register(
        "outbox_depth",
        "Intents waiting in the outbox to be published to agents",
        depth,
    );
    let running: Family<WorkflowLabels, Gauge> = Family::default();
    for (kind, n) in app.store.running_workflows().await? {
        running.get_or_create(&WorkflowLabels { kind }).set(n);
    }
    reg.register(
        "workflows_running",
        "Workflows in progress (switchover, failover, replica build, ...), by kind",
        running,
    );
    let connects = app
        .client
        .statistics()
        .connects
        .load(std::sync::atomic::Ordering::Relaxed);
    reg.register(
        "nats_reconnects",
        "Times this controller's NATS connection was established again after a loss",
        prometheus_client::metrics::counter::ConstCounter::new(connects.saturating_sub(1)),
    );
    let leads: Gauge = Gauge::default();
    leads.set(app.leads() as i64);
    reg.register(
        "controller_leader",
        "Whether this controller holds the leader lease (publishes intents, runs timers)",
        leads,
    );
    Ok(())
}

/// The Prometheus text format (0.0.4) of an OpenMetrics text, for clients that do not ask for
/// OpenMetrics (promtool, curl): a counter's family is named with its `_total`, and the
/// `# UNIT` and `# EOF` lines go.
fn text_format(om: &str) -> String {
    let counters: std::collections::HashSet<&str> = om
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(om.len());
    for l in om.lines() {
        if l.starts_with("# UNIT ") || l == "# EOF" {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| l.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((p, rest)) => {
                let name = rest.split(' ').next().unwrap_or_default();
                if counters.contains(name) {
                    out.push_str(&format!("{p}{name}_total{}\n", &rest[name.len()..]));
                } else {
                    out.push_str(l);
                    out.push('\n');
                }
            }
            None => {
                out.push_str(l);
                out.push('\n');
            }
        }
    }
    out
}

/// `GET /metrics`: OpenMetrics when asked for it (as Prometheus does), else the Prometheus
/// text format.
pub async fn scrape(axum::extract::State(app): AppState, h: HeaderMap) -> Response {
    if let Err(e) = operator(&app, &h) {
        return e.into_response();
    }
    let openmetrics = h
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    match render(&app).await {
        Ok(text) if openmetrics => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Ok(text) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text_format(&text),
        )
            .into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_text_format_names_counters_with_their_total() {
        let om =
            "# HELP x_requests Requests.\n# TYPE x_requests counter\nx_requests_total{a=\"b\"} 3\n\
                  # HELP x_age Age.\n# TYPE x_age gauge\n# UNIT x_age seconds\nx_age 1.5\n# EOF\n";
        assert_eq!(
            super::text_format(om),
            "# HELP x_requests_total Requests.\n# TYPE x_requests_total counter\nx_requests_total{a=\"b\"} 3\n\
             # HELP x_age Age.\n# TYPE x_age gauge\nx_age 1.5\n"
        );
    }
}
