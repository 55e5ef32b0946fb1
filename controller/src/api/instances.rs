//! `/instances`: create, list, show, rename, delete and actions.

use std::collections::{HashMap, HashSet};

use axum::body::Bytes;
use axum::extract::{Path, Query};
use axum::http::{Method, Uri};
use coffer_proto::v1;
use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::parse::{self, present, typed, DatabaseReq, Id, IdRef, Positive, UserReq, Volume};
use super::{accepted, ok, parse_body, ApiError, ApiResult, AppState, Caller, ItemPath, Page};
use crate::ops::instances::{self as ops, CreateSpec};
use crate::status::{self, Task};
use crate::store::{InstanceRow, VersionRow};
use crate::workflow::replicas;
use crate::App;

/// `POST /instances`: Trove's create body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    instance: CreateInstance,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct CreateInstance {
    name: String,
    #[serde(rename = "flavorRef")]
    flavor_ref: Option<Id>,
    volume: Option<Volume>,
    datastore: Option<DatastoreRef>,
    databases: Option<Vec<DatabaseReq>>,
    users: Option<Vec<UserReq>>,
    #[serde(rename = "restorePoint")]
    restore_point: Option<RestorePoint>,
    configuration: Option<Id>,
    replica_of: Option<Id>,
    replica_count: Option<Positive>,
    modules: Option<Vec<IdRef>>,
    // Accepted and not used: one network, one zone, one region.
    nics: Option<IgnoredAny>,
    availability_zone: Option<IgnoredAny>,
    locality: Option<IgnoredAny>,
    region_name: Option<IgnoredAny>,
    access: Option<IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct DatastoreRef {
    #[serde(rename = "type")]
    kind: Option<String>,
    version: Option<String>,
    version_number: Option<IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RestorePoint {
    #[serde(rename = "backupRef")]
    backup_ref: Option<Id>,
    /// Point-in-time (a Coffer extension): the newest backup of this instance before the time.
    instance: Option<Id>,
    restore_time: Option<String>,
    restore_position: Option<String>,
}

impl RestorePoint {
    fn parse(self) -> Result<crate::ops::instances::RestoreSpec, ApiError> {
        use crate::ops::instances::{RestoreBase, RestoreSpec};
        let base = match (self.backup_ref, self.instance) {
            (Some(b), None) => RestoreBase::Backup(b.0),
            (None, Some(i)) => RestoreBase::Instance(i.0),
            (None, None) => {
                return Err(ApiError::validation(
                    "instance['restorePoint'] 'backupRef' is a required property",
                ))
            }
            (Some(_), Some(_)) => {
                return Err(ApiError::bad_request(
                    "instance['restorePoint'] takes 'backupRef' or 'instance', not both.",
                ))
            }
        };
        let time_us = match &self.restore_time {
            Some(t) => Some(
                chrono::DateTime::parse_from_rfc3339(t)
                    .map_err(|_| {
                        ApiError::bad_request(format!(
                            "instance['restorePoint'] 'restore_time' '{t}' is not an RFC 3339 time (e.g. 2026-12-01T10:30:00.250Z)."
                        ))
                    })?
                    .timestamp_micros(),
            ),
            None => None,
        };
        let position = self.restore_position.filter(|p| !p.is_empty());
        if time_us.is_some() && position.is_some() {
            return Err(ApiError::bad_request(
                "instance['restorePoint'] takes 'restore_time' or 'restore_position', not both.",
            ));
        }
        if matches!(base, RestoreBase::Instance(_)) && time_us.is_none() {
            return Err(ApiError::bad_request(
                "instance['restorePoint'] with 'instance' needs 'restore_time': the newest backup of that instance before the time is restored and rolled forward to it.",
            ));
        }
        if let Some(p) = &position {
            super::check_text("instance['restorePoint']['restore_position']", p, 255)?;
        }
        Ok(RestoreSpec {
            base,
            time_us,
            position,
        })
    }
}

/// An instance's name as Trove checks it.
fn check_instance_name(name: &str) -> Result<(), ApiError> {
    super::check_text("instance['name']", name, 255)?;
    if name.trim().is_empty() {
        return Err(ApiError::validation(format!(
            "instance['name'] '{name}' is too short"
        )));
    }
    if !name.chars().any(|c| c.is_ascii_alphanumeric()) {
        return Err(ApiError::validation(format!(
            "instance['name'] '{name}' does not match '^.*[0-9a-zA-Z]+.*$'"
        )));
    }
    Ok(())
}

/// A create body: a replica (`replica_of`, which inherits flavor, volume and version from its
/// source) or a new instance.
enum Create {
    Replica(replicas::ReplicaReq),
    Instance(Box<CreateSpec>),
}

fn parse_create(body: Map<String, Value>) -> Result<Create, ApiError> {
    let i = typed::<CreateBody>(body)?.instance;
    check_instance_name(&i.name)?;
    let configuration = i.configuration.map(|x| x.0);
    if let Some(source) = i.replica_of {
        let inherited = [
            ("databases", i.databases.is_some()),
            ("users", i.users.is_some()),
            ("restorePoint", i.restore_point.is_some()),
            ("datastore", i.datastore.is_some()),
        ];
        if let Some((k, _)) = inherited.iter().find(|(_, given)| *given) {
            return Err(ApiError::bad_request(format!(
                "'{k}' cannot be given for a replica (it comes from the source)."
            )));
        }
        return Ok(Create::Replica(replicas::ReplicaReq {
            name: i.name,
            source: source.0,
            count: i
                .replica_count
                .map_or(1, |n| n.0.min(u32::MAX as i64) as u32),
            configuration,
        }));
    }
    if i.replica_count.is_some() {
        return Err(ApiError::bad_request(
            "replica_count is only allowed with replica_of.",
        ));
    }
    let required = |k: &str| ApiError::validation(format!("instance '{k}' is a required property"));
    let flavor_id = i.flavor_ref.ok_or_else(|| required("flavorRef"))?.0;
    let volume_size = i.volume.ok_or_else(|| required("volume"))?.size.0;
    let (datastore, version) = i.datastore.map_or((None, None), |d| (d.kind, d.version));
    let reqs = i.databases.unwrap_or_default();
    super::check_count("instance['databases']", reqs.len())?;
    let mut databases: Vec<v1::Database> = vec![];
    for d in reqs {
        let d = parse::database(d, "instance['databases']")?;
        if databases.iter().any(|x| x.name == d.name) {
            return Err(ApiError::bad_request(format!(
                "Database '{}' is listed twice.",
                d.name
            )));
        }
        databases.push(d);
    }
    let reqs = i.users.unwrap_or_default();
    super::check_count("instance['users']", reqs.len())?;
    let mut users: Vec<v1::User> = vec![];
    for u in reqs {
        let u = parse::user(u)?;
        if let Some(n) = u
            .databases
            .iter()
            .find(|n| !databases.iter().any(|x| &x.name == *n))
        {
            return Err(ApiError::bad_request(format!(
                "Database '{n}' of user '{}' is not in the instance's 'databases'.",
                u.name
            )));
        }
        if users.iter().any(|x| x.name == u.name && x.host == u.host) {
            return Err(ApiError::bad_request(format!(
                "User '{}'@'{}' is listed twice.",
                u.name, u.host
            )));
        }
        users.push(u);
    }
    Ok(Create::Instance(Box::new(CreateSpec {
        id: None,
        name: i.name,
        flavor_id,
        volume_size,
        datastore,
        version,
        databases,
        users,
        restore_from: i.restore_point.map(RestorePoint::parse).transpose()?,
        configuration,
        modules: i.modules.into_iter().flatten().map(|m| m.id.0).collect(),
        throwaway: false,
    })))
}

/// What rendering instances reads besides their rows, read once for a whole page (a fixed
/// handful of statements, not several per instance).
pub(super) struct Seen {
    versions: HashMap<String, VersionRow>,
    backing_up: HashSet<String>,
    replicas: HashMap<String, Vec<String>>,
    configurations: HashMap<String, String>,
}

impl Seen {
    pub(super) async fn of(app: &App, rows: &[InstanceRow]) -> Result<Seen, ApiError> {
        let mut seen = Seen {
            versions: app.store.versions_by_id().await?,
            backing_up: HashSet::new(),
            replicas: HashMap::new(),
            configurations: HashMap::new(),
        };
        for chunk in rows.chunks(crate::store::BATCH) {
            let ids: Vec<&str> = chunk.iter().map(|r| r.id.as_str()).collect();
            seen.backing_up
                .extend(app.store.backups_running_among(&ids).await?);
            seen.replicas
                .extend(app.store.replicas_of_each(&ids).await?);
        }
        let groups: HashSet<&String> = rows
            .iter()
            .filter_map(|r| r.configuration_id.as_ref())
            .collect();
        for id in groups {
            let name = app.store.configuration(id).await?.map(|g| g.name);
            seen.configurations
                .insert(id.clone(), name.unwrap_or_default());
        }
        Ok(seen)
    }
}

/// Renders an instance in Trove's list or detail form.
/// The point-in-time recovery window of an archiving instance (a Coffer extension): from the
/// first backup its archive covers to the latest time whose writes are all stored.
async fn recovery(app: &App, r: &InstanceRow) -> Result<Value, ApiError> {
    let spanned = crate::ops::lineage::window_and_sources(app, r).await?;
    let (window, sources) = (spanned.window, spanned.sources);
    let mut v = json!({
        "earliest": window.map(|w| crate::ops::rfc3339_ms(w.0)),
        "latest": window.map(|w| crate::ops::rfc3339_ms(w.1)),
        "archive": {
            "since": r.archive_since_ms.map(crate::ops::rfc3339_ms),
            "stored_until": r.archive_latest_ms.map(crate::ops::rfc3339_ms),
        },
    });
    if let Some(f) = &r.archive_fault {
        v["archive"]["fault"] = json!(f);
    }
    // The window spans a change of source (switchover, failover): the sources in order.
    if sources.len() > 1 {
        v["sources"] = json!(sources);
    }
    // Stretches no archive places precisely (a failover's): a restore to a time in one is
    // refused.
    if !spanned.gaps.is_empty() {
        v["gaps"] = json!(spanned
            .gaps
            .iter()
            .map(|(a, b)| json!({"from": crate::ops::rfc3339_ms(*a), "to": crate::ops::rfc3339_ms(*b)}))
            .collect::<Vec<_>>());
    }
    if window.is_none() {
        v["message"] = json!("No backup is covered by the archive yet: the window opens when the next backup completes.");
    }
    Ok(v)
}

/// The latest restore drill, as the instance view shows it (`GET /restore_drills/{id}` has the
/// whole signed report).
fn drill_summary(d: &crate::store::DrillRow) -> Value {
    let report = super::drills::report_of(d);
    json!({
        "id": d.id, "status": d.status, "created": d.created, "finished": d.finished,
        "backup_id": report["backup_id"], "restored_point": report["restored_point"],
        "rto_seconds": report["rto_seconds"], "rpo_seconds": report["rpo_seconds"],
        "failed_checks": report["failed_checks"],
    })
}

pub(super) async fn render(
    app: &App,
    c: &Caller,
    seen: &Seen,
    r: &InstanceRow,
    detail: bool,
    with_usage: bool,
) -> Result<Value, ApiError> {
    let fresh = app.fresh(&r.id);
    let (mut status, mut op) = status::derive(r.task, &r.service_status, fresh);
    if status == "ACTIVE" && seen.backing_up.contains(&r.id) {
        // Trove: a running backup shows as BACKUP (the database stays online).
        (status, op) = ("BACKUP", "");
    }
    let version = seen.versions.get(&r.datastore_version_id);
    let (ds_type, ds_version, ds_number) = match &version {
        Some(v) => (json!(v.datastore_name), json!(v.name), json!(v.version)),
        None => (Value::Null, Value::Null, Value::Null),
    };
    let mut j = json!({
        "id": r.id,
        "name": r.name,
        "status": status,
        "operating_status": op,
        "links": c.links("instances", &r.id),
        "flavor": {"id": r.flavor_id, "links": c.links("flavors", &r.flavor_id)},
        "datastore": {"type": ds_type, "version": ds_version},
        "region": "RegionOne",
        "access": {"is_public": false, "allowed_cidrs": []},
        "volume": {"size": r.volume_size},
    });
    if let Some(host) = &r.host {
        j["ip"] = json!([host]);
        j["addresses"] = json!([{"address": host, "type": "private"}]);
    }
    if let Some(port) = r.port {
        j["port"] = json!(port);
    }
    if c.admin {
        j["tenant_id"] = json!(r.project_id);
    }
    let replicas = seen
        .replicas
        .get(&r.id)
        .map(Vec::as_slice)
        .unwrap_or_default();
    super::replicas::view(app, c, r, replicas, version, &mut j)?;
    if let Some(cid) = &r.configuration_id {
        let name = seen.configurations.get(cid).cloned().unwrap_or_default();
        j["configuration"] =
            json!({"id": cid, "name": name, "links": c.links("configurations", cid)});
    }
    if detail {
        j["created"] = json!(r.created);
        j["updated"] = json!(r.updated);
        j["datastore"]["version_number"] = ds_number;
        let live = app.live.lock().unwrap().get(&r.id).cloned();
        if let Some(l) = &live {
            j["service_status_updated"] = json!(l.last_seen_wall);
        }
        if r.archive_since_ms.is_some() {
            j["recovery"] = recovery(app, r).await?;
        }
        if detail {
            if let Some(d) = app.store.latest_drill(&r.id).await? {
                j["recovery"]["drill"] = drill_summary(&d);
            }
        }
        if let Some(f) = &r.fault {
            j["fault"] = json!({"message": f, "created": r.fault_at, "details": null});
        } else if status == "ERROR" && !fresh && r.task == Task::None {
            j["fault"] = json!({
                "message": format!(
                    "The guest agent has not reported for more than {} s; check that coffer-agent runs for this instance.",
                    app.cfg.heartbeat_expiry_s
                ),
                "created": null, "details": null,
            });
        } else if let Some(f) = &r.drill_fault {
            // The instance serves; its latest restore drill did not pass.
            j["fault"] = json!({"message": f, "created": null, "details": null});
        }
        if with_usage
            && ![
                "BUILD", "REBOOT", "RESIZE", "PROMOTE", "EJECT", "UPGRADE", "SHUTDOWN",
            ]
            .contains(&status)
        {
            if let Some(l) = live {
                let gb = l.hb.volume_used_bytes as f64 / (1u64 << 30) as f64;
                j["volume"]["used"] = json!((gb * 1000.0).round() / 1000.0);
                j["volume"]["used_percent"] =
                    json!(((gb / r.volume_size.max(1) as f64) * 10000.0).round() / 100.0);
            }
        }
        if r.task == Task::Building || r.task == Task::Rebooting || r.task == Task::Deleting {
            if let Some((kind, state, progress, message)) = app.store.latest_intent(&r.id).await? {
                j["progress"] = json!({"action": kind, "state": state, "percent": progress, "message": message});
            }
        }
    }
    Ok(j)
}

pub(super) use crate::ops::find_instance as find;

pub async fn create(st: AppState, c: Caller, body: Bytes) -> ApiResult {
    let (id, root_password) = match parse_create(parse_body(&body)?)? {
        Create::Replica(r) => (replicas::create(st.0.clone(), &c, r).await?, None),
        Create::Instance(spec) => crate::workflow::create::create(&st.0, &c, *spec).await?,
    };
    let row = st
        .store
        .instance(&id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("instance vanished"))?;
    let seen = Seen::of(&st, std::slice::from_ref(&row)).await?;
    let mut view = render(&st, &c, &seen, &row, true, false).await?;
    if let Some(pw) = root_password {
        // Trove returns root's password in the create response only (root_on_create).
        view["password"] = json!(pw);
    }
    ok(json!({ "instance": view }))
}

pub async fn delete(st: AppState, c: Caller, Path((_p, id)): ItemPath) -> ApiResult {
    ops::delete(&st, &find(&st, &c, &id).await?).await?;
    accepted()
}

/// `GET /instances` and `GET /instances/detail`.
pub async fn list(st: AppState, c: Caller, uri: Uri, Query(page): Query<Page>) -> ApiResult {
    let detail = uri.path().ends_with("/detail");
    let (store, project) = (&st.store, &c.project);
    let read = |marker: Option<String>, n| async move {
        store.instances_page(project, marker.as_deref(), n).await
    };
    let (rows, next) = page.fetch(read, |r| r.id.clone()).await?;
    let seen = Seen::of(&st, &rows).await?;
    let mut out = vec![];
    for r in &rows {
        out.push(render(&st, &c, &seen, r, detail, false).await?);
    }
    next.wrap(&c, "instances", json!({"instances": out}))
}

pub async fn show(st: AppState, c: Caller, Path((_p, id)): ItemPath) -> ApiResult {
    let r = find(&st, &c, &id).await?;
    let seen = Seen::of(&st, std::slice::from_ref(&r)).await?;
    ok(json!({"instance": render(&st, &c, &seen, &r, true, true).await?}))
}

/// `PUT`/`PATCH /instances/{id}`: a rename, and one of attach/detach a configuration group or
/// detach from the source (`replica_of`, `slave_of`: the key's presence counts, whatever value).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateBody {
    instance: UpdateInstance,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateInstance {
    name: Option<String>,
    #[serde(default, deserialize_with = "present")]
    configuration: Option<Option<Id>>,
    #[serde(default, deserialize_with = "present")]
    replica_of: Option<IgnoredAny>,
    #[serde(default, deserialize_with = "present")]
    slave_of: Option<IgnoredAny>,
    #[serde(default, deserialize_with = "present")]
    datastore_version: Option<IgnoredAny>,
    #[serde(default, deserialize_with = "present")]
    access: Option<IgnoredAny>,
}

pub async fn update(
    st: AppState,
    c: Caller,
    method: Method,
    Path((_p, id)): ItemPath,
    body: Bytes,
) -> ApiResult {
    let body = parse_body(&body)?;
    let r = find(&st, &c, &id).await?;
    let i = typed::<UpdateBody>(body)?.instance;
    // PUT takes `access`, PATCH takes `slave_of`, as Trove's two schemas do.
    let only_other = if method == Method::PATCH {
        ("access", i.access.is_some())
    } else {
        ("slave_of", i.slave_of.is_some())
    };
    if only_other.1 {
        return Err(ApiError::validation(format!(
            "instance Additional properties are not allowed ('{}' was unexpected)",
            only_other.0
        )));
    }
    let others = [
        ("configuration", i.configuration.is_some()),
        ("replica_of", i.replica_of.is_some() || i.slave_of.is_some()),
        ("datastore_version", i.datastore_version.is_some()),
        ("access", i.access.is_some()),
    ];
    let mut given = others.iter().filter(|(_, g)| *g).map(|(k, _)| *k);
    let (first, more) = (given.next(), given.next());
    if more.is_some() {
        return Err(ApiError::bad_request(
            "Only one attribute (except 'name') is allowed to update.",
        ));
    }
    if let Some(k @ ("datastore_version" | "access")) = first {
        return Err(ApiError::not_implemented(format!(
            "Updating '{k}' is not supported by this Coffer release yet."
        )));
    }
    if let Some(n) = &i.name {
        super::check_text("instance['name']", n, 255)?;
        if n.trim().is_empty() || !n.chars().any(|c| c.is_ascii_alphanumeric()) {
            return Err(ApiError::validation(format!(
                "instance['name'] '{n}' is not a valid name"
            )));
        }
        st.store.rename(&r.id, n).await?;
    }
    if first == Some("replica_of") {
        replicas::detach(&st.0, &r).await?;
        return accepted();
    }
    // `configuration`: attach (an id or href), detach (null); `{"instance": {}}` also detaches.
    let group = match i.configuration {
        Some(g) => Some(g.map(|g| g.0)),
        None if i.name.is_none() => Some(None),
        None => None,
    };
    match group {
        Some(None) if r.configuration_id.is_none() => {}
        Some(g) => super::configurations::attach(&st, &c, &r, g).await?,
        None => {}
    }
    accepted()
}

pub async fn action(st: AppState, c: Caller, Path((_p, id)): ItemPath, body: Bytes) -> ApiResult {
    let app = st.0.clone();
    let body = parse_body(&body)?;
    let r = find(&app, &c, &id).await?;
    if body.len() != 1 {
        return Err(ApiError::bad_request(
            "An action body must contain exactly one action.",
        ));
    }
    let (key, _arg) = body.iter().next().unwrap();
    match key.as_str() {
        "restart" => ops::restart(&app, &r).await?,
        "reset_status" if !c.admin => {
            return Err(ApiError::forbidden(
                "Policy doesn't allow instance:reset_status to be performed.",
            ))
        }
        "reset_status" => ops::reset_status(&app, &id).await?,
        "promote_to_replica_source" => replicas::promote(app, &r).await?,
        "eject_replica_source" => replicas::eject(app, &r).await?,
        "resize" => {
            return Err(ApiError::not_implemented(format!(
                "The '{key}' action is not supported by this Coffer release yet."
            )))
        }
        other => {
            return Err(ApiError::bad_request(format!(
                "Invalid instance action: '{other}'."
            )))
        }
    }
    accepted()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;

    fn create(body: Value) -> Result<CreateSpec, ApiError> {
        match parse_create(body.as_object().expect("a JSON object").clone())? {
            Create::Instance(spec) => Ok(*spec),
            Create::Replica(_) => panic!("a replica create"),
        }
    }

    /// Trove create bodies and the exact answer each gets: the error's status and text, or
    /// what was parsed.
    /// Replica creates and instance updates: what each body becomes, or its exact refusal.
    #[test]
    fn replica_and_update_bodies_are_typed_or_refused_with_troves_texts() {
        let parse = |body: Value| parse_create(body.as_object().unwrap().clone());
        match parse(
            json!({"instance": {"name": "r", "replica_of": "https://h/v1.0/p/instances/abc", "replica_count": "2"}}),
        ) {
            Ok(Create::Replica(r)) => {
                assert_eq!(
                    (r.source.as_str(), r.count, r.name.as_str()),
                    ("abc", 2, "r")
                )
            }
            _ => panic!("not a replica"),
        }
        let v = "Validation error: ";
        let table: Vec<(Value, String)> = vec![
            (
                json!({"instance": {"name": "r", "replica_of": "a", "databases": []}}),
                "'databases' cannot be given for a replica (it comes from the source).".into(),
            ),
            (
                json!({"instance": {"name": "r", "flavorRef": "1", "volume": {"size": 1}, "replica_count": 2}}),
                "replica_count is only allowed with replica_of.".into(),
            ),
            (
                json!({"instance": {"name": "r", "replica_of": "a", "replica_count": 0}}),
                format!("{v}instance['replica_count'] 0 is not a positive integer"),
            ),
            (
                json!({"instance": {"name": "n", "flavorRef": [], "volume": {"size": 1}}}),
                format!("{v}instance['flavorRef'] is not of type 'string', 'integer'"),
            ),
            (
                json!({"instance": {"name": "n", "flavorRef": "1", "volume": {"size": 1}, "restorePoint": {}}}),
                format!("{v}instance['restorePoint'] 'backupRef' is a required property"),
            ),
            (
                json!({"instance": {"name": "n", "flavorRef": "1", "volume": {"size": 1}, "modules": [{"name": "m"}]}}),
                format!("{v}instance['modules'] 'id' is a required property"),
            ),
        ];
        for (body, message) in table {
            let e = parse(body.clone()).map(|_| ()).unwrap_err();
            assert_eq!(e.message, message, "{body}");
        }

        let update = |body: Value| {
            typed::<UpdateBody>(body.as_object().unwrap().clone()).map(|b| b.instance)
        };
        let u = update(json!({"instance": {"configuration": null}})).unwrap();
        assert!(matches!(u.configuration, Some(None)), "null detaches");
        let u = update(json!({"instance": {"configuration": "https://h/v1.0/p/configurations/g"}}))
            .unwrap();
        assert!(matches!(u.configuration, Some(Some(Id(ref g))) if g == "g"));
        let u = update(json!({"instance": {"replica_of": null}})).unwrap();
        assert!(u.replica_of.is_some(), "the key's presence detaches");
        let e = update(json!({"instance": {"colour": 1}}))
            .map(|_| ())
            .unwrap_err();
        assert_eq!(
            e.message,
            format!("{v}instance Additional properties are not allowed ('colour' was unexpected)")
        );
    }

    #[test]
    fn create_bodies_are_parsed_or_refused_with_troves_texts() {
        let ok = json!({"instance": {"name": "db-1", "flavorRef": "1", "volume": {"size": 2},
            "datastore": {"type": "any-store", "version": "1.0"},
            "databases": [{"name": "shop"}],
            "users": [{"name": "app", "password": "pw", "databases": [{"name": "shop"}]}]}});
        let r = create(ok).unwrap();
        assert_eq!(
            (r.name.as_str(), r.flavor_id.as_str(), r.volume_size),
            ("db-1", "1", 2)
        );
        assert_eq!(r.databases.len(), 1);
        assert_eq!(r.users[0].host, "%");
        assert_eq!(r.users[0].databases, vec!["shop".to_string()]);
        // A numeric flavorRef and a string size, as python-troveclient sends them.
        let r = create(json!({"instance": {"name": "n", "flavorRef": 7, "volume": {"size": "3"}}}))
            .unwrap();
        assert_eq!((r.flavor_id.as_str(), r.volume_size), ("7", 3));

        let bad = |body: Value| create(body).map(|_| ()).unwrap_err();
        let v = "Validation error: ";
        let table: Vec<(Value, StatusCode, String)> = vec![
            (json!({}), StatusCode::BAD_REQUEST, format!("{v}'instance' is a required property")),
            (json!({"instance": []}), StatusCode::BAD_REQUEST, format!("{v}instance is not of type 'object'")),
            (
                json!({"instance": {"name": "n", "flavorRef": "1", "volume": {"size": 1}, "colour": 1}}),
                StatusCode::BAD_REQUEST,
                format!("{v}instance Additional properties are not allowed ('colour' was unexpected)"),
            ),
            (
                json!({"instance": {"flavorRef": "1", "volume": {"size": 1}}}),
                StatusCode::BAD_REQUEST,
                format!("{v}instance 'name' is a required property"),
            ),
            (
                json!({"instance": {"name": 5, "flavorRef": "1", "volume": {"size": 1}}}),
                StatusCode::BAD_REQUEST,
                format!("{v}instance['name'] is not of type 'string'"),
            ),
            (
                json!({"instance": {"name": "--", "flavorRef": "1", "volume": {"size": 1}}}),
                StatusCode::BAD_REQUEST,
                format!("{v}instance['name'] '--' does not match '^.*[0-9a-zA-Z]+.*$'"),
            ),
            (
                json!({"instance": {"name": "n", "volume": {"size": 1}}}),
                StatusCode::BAD_REQUEST,
                format!("{v}instance 'flavorRef' is a required property"),
            ),
            (
                json!({"instance": {"name": "n", "flavorRef": "1"}}),
                StatusCode::BAD_REQUEST,
                format!("{v}instance 'volume' is a required property"),
            ),
            (
                json!({"instance": {"name": "n", "flavorRef": "1", "volume": {"size": 0}}}),
                StatusCode::BAD_REQUEST,
                format!("{v}instance['volume']['size'] 0 is not a positive integer"),
            ),
            (
                json!({"instance": {"name": "n", "flavorRef": "1", "volume": {}}}),
                StatusCode::BAD_REQUEST,
                format!("{v}instance['volume'] 'size' is a required property"),
            ),
            (
                json!({"instance": {"name": "n", "flavorRef": "1", "volume": {"size": 1},
                    "datastore": {"type": "any-store", "colour": "x"}}}),
                StatusCode::BAD_REQUEST,
                format!("{v}instance['datastore'] Additional properties are not allowed ('colour' was unexpected)"),
            ),
            (
                json!({"instance": {"name": "n", "flavorRef": "1", "volume": {"size": 1},
                    "databases": [{"name": "a"}, {"name": "a"}]}}),
                StatusCode::BAD_REQUEST,
                "Database 'a' is listed twice.".into(),
            ),
            (
                json!({"instance": {"name": "n", "flavorRef": "1", "volume": {"size": 1},
                    "users": [{"name": "u"}]}}),
                StatusCode::BAD_REQUEST,
                format!("{v}instance['users'] 'password' is a required property"),
            ),
            (
                json!({"instance": {"name": "n", "flavorRef": "1", "volume": {"size": 1},
                    "users": [{"name": "u", "password": ""}]}}),
                StatusCode::BAD_REQUEST,
                format!("{v}password must be 1 to 128 characters without control characters"),
            ),
            (
                json!({"instance": {"name": "n", "flavorRef": "1", "volume": {"size": 1},
                    "users": [{"name": "u", "password": "p", "host": "a b"}]}}),
                StatusCode::BAD_REQUEST,
                format!("{v}host 'a b' is not a host name, address or pattern"),
            ),
            (
                json!({"instance": {"name": "n", "flavorRef": "1", "volume": {"size": 1},
                    "users": [{"name": "u", "password": "p", "databases": [{"name": "x"}]}]}}),
                StatusCode::BAD_REQUEST,
                "Database 'x' of user 'u' is not in the instance's 'databases'.".into(),
            ),
            (
                json!({"instance": {"name": "n", "flavorRef": "1", "volume": {"size": 1},
                    "users": [{"name": "u", "password": "p"}, {"name": "u", "password": "q"}]}}),
                StatusCode::BAD_REQUEST,
                "User 'u'@'%' is listed twice.".into(),
            ),
        ];
        for (body, status, message) in table {
            let e = bad(body.clone());
            assert_eq!(
                (e.status, e.message.as_str()),
                (status, message.as_str()),
                "{body}"
            );
        }
    }
}
