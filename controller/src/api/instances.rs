//! `/instances`: create, list, show, rename, delete and actions.

use anyhow::Context;
use axum::body::Bytes;
use axum::extract::{Path, Query};
use coffer_proto::v1;
use serde_json::{json, Map, Value};

use super::{accepted, ok, parse_body, with_next, ApiError, ApiResult, AppState, Caller, Page};
use crate::ops::intents::intent_payload;
use crate::provisioner::Placement;
use crate::status::{self, task};
use crate::store::{self, InstanceRow, Store, VersionRow};
use crate::App;
use tracing::warn;

const CREATE_KEYS: &[&str] = &[
    "name",
    "flavorRef",
    "volume",
    "datastore",
    "nics",
    "databases",
    "users",
    "restorePoint",
    "availability_zone",
    "configuration",
    "replica_of",
    "replica_count",
    "modules",
    "locality",
    "region_name",
    "access",
];
const NOT_YET: &[&str] = &[];

/// Last path segment of an id-or-href, as Trove takes it.
fn id_of(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.rsplit('/').next().unwrap_or(s).to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

pub(super) fn check_name(kind: &str, name: &str, max: usize) -> Result<(), ApiError> {
    if name.is_empty() || name.len() > max {
        return Err(ApiError::validation(format!(
            "{kind} name '{name}' must be 1 to {max} characters"
        )));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "_-.$".contains(c))
    {
        return Err(ApiError::validation(format!(
            "{kind} name '{name}' may only contain letters, digits, '_', '-', '.' and '$'"
        )));
    }
    Ok(())
}

fn str_field<'a>(
    o: &'a Map<String, Value>,
    path: &str,
    key: &str,
) -> Result<Option<&'a str>, ApiError> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(ApiError::validation(format!(
            "{path}['{key}'] {other} is not of type 'string'"
        ))),
    }
}

struct CreateReq {
    name: String,
    flavor_id: String,
    volume_size: i64,
    datastore: Option<String>,
    version: Option<String>,
    databases: Vec<v1::Database>,
    users: Vec<v1::User>,
    restore_from: Option<String>,
    configuration: Option<String>,
    modules: Vec<String>,
}

/// A create with `replica_of`: replicas inherit flavor, volume and version from the source.
fn parse_replica(
    body: &Map<String, Value>,
) -> Result<Option<super::replicas::ReplicaReq>, ApiError> {
    let Some(Value::Object(inst)) = body.get("instance") else {
        return Ok(None);
    };
    let source = match inst.get("replica_of") {
        None | Some(Value::Null) => {
            if inst.get("replica_count").is_some_and(|v| !v.is_null()) {
                return Err(ApiError::bad_request(
                    "replica_count is only allowed with replica_of.",
                ));
            }
            return Ok(None);
        }
        Some(v) => id_of(v).filter(|s| !s.is_empty()).ok_or_else(|| {
            ApiError::validation(format!("instance['replica_of'] {v} is not an instance id"))
        })?,
    };
    for k in inst.keys() {
        if !CREATE_KEYS.contains(&k.as_str()) {
            return Err(ApiError::validation(format!(
                "instance Additional properties are not allowed ('{k}' was unexpected)"
            )));
        }
        if ["databases", "users", "restorePoint", "datastore"].contains(&k.as_str())
            && !inst[k].is_null()
        {
            return Err(ApiError::bad_request(format!(
                "'{k}' cannot be given for a replica (it comes from the source)."
            )));
        }
    }
    let name = match inst.get("name") {
        Some(Value::String(s)) => s.clone(),
        _ => return Err(ApiError::validation("'name' is a required property")),
    };
    check_name("instance", &name, 255)?;
    let count = match inst.get("replica_count") {
        None | Some(Value::Null) => 1,
        Some(v) => v.as_u64().filter(|n| *n >= 1).ok_or_else(|| {
            ApiError::validation(format!(
                "instance['replica_count'] {v} is not a positive integer"
            ))
        })? as u32,
    };
    let configuration = match inst.get("configuration") {
        None | Some(Value::Null) => None,
        Some(v) => Some(id_of(v).filter(|s| !s.is_empty()).ok_or_else(|| {
            ApiError::validation(format!(
                "instance['configuration'] {v} is not a configuration id or href"
            ))
        })?),
    };
    Ok(Some(super::replicas::ReplicaReq {
        name,
        source,
        count,
        configuration,
    }))
}

fn parse_create(body: &Map<String, Value>) -> Result<CreateReq, ApiError> {
    let inst = match body.get("instance") {
        Some(Value::Object(o)) => o,
        Some(_) => return Err(ApiError::validation("instance is not of type 'object'")),
        None => return Err(ApiError::validation("'instance' is a required property")),
    };
    for k in inst.keys() {
        if !CREATE_KEYS.contains(&k.as_str()) {
            return Err(ApiError::validation(format!(
                "instance Additional properties are not allowed ('{k}' was unexpected)"
            )));
        }
        if NOT_YET.contains(&k.as_str()) && !inst[k].is_null() {
            return Err(ApiError::not_implemented(format!(
                "'{k}' is not supported by this Coffer release yet."
            )));
        }
    }
    let name = match inst.get("name") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => {
            return Err(ApiError::validation(
                "instance['name'] is not of type 'string'",
            ))
        }
        None => {
            return Err(ApiError::validation(
                "instance 'name' is a required property",
            ))
        }
    };
    super::check_text("instance['name']", &name, 255)?;
    if name.trim().is_empty() {
        return Err(ApiError::validation(format!(
            "instance['name'] '{name}' is too short"
        )));
    }
    if name.len() > 255 {
        return Err(ApiError::validation("instance['name'] is too long"));
    }
    if !name.chars().any(|c| c.is_ascii_alphanumeric()) {
        return Err(ApiError::validation(format!(
            "instance['name'] '{name}' does not match '^.*[0-9a-zA-Z]+.*$'"
        )));
    }
    let flavor_id = match inst.get("flavorRef") {
        None => {
            return Err(ApiError::validation(
                "instance 'flavorRef' is a required property",
            ))
        }
        Some(v) => id_of(v).filter(|s| !s.is_empty()).ok_or_else(|| {
            ApiError::validation(format!(
                "instance['flavorRef'] {v} is not of type 'string', 'integer'"
            ))
        })?,
    };
    let volume_size = match inst.get("volume") {
        None => {
            return Err(ApiError::validation(
                "instance 'volume' is a required property",
            ))
        }
        Some(Value::Object(v)) => match v.get("size") {
            Some(Value::Number(n)) if n.as_i64().map(|x| x >= 1).unwrap_or(false) => {
                n.as_i64().unwrap()
            }
            Some(Value::String(s)) if s.parse::<i64>().map(|x| x >= 1).unwrap_or(false) => {
                s.parse().unwrap()
            }
            Some(other) => {
                return Err(ApiError::validation(format!(
                    "instance['volume']['size'] {other} is not a positive integer"
                )))
            }
            None => {
                return Err(ApiError::validation(
                    "instance['volume'] 'size' is a required property",
                ))
            }
        },
        Some(other) => {
            return Err(ApiError::validation(format!(
                "instance['volume'] {other} is not of type 'object'"
            )))
        }
    };
    let (datastore, version) = match inst.get("datastore") {
        None | Some(Value::Null) => (None, None),
        Some(Value::Object(d)) => {
            for k in d.keys() {
                if !["type", "version", "version_number"].contains(&k.as_str()) {
                    return Err(ApiError::validation(format!(
                        "instance['datastore'] Additional properties are not allowed ('{k}' was unexpected)"
                    )));
                }
            }
            (
                str_field(d, "instance['datastore']", "type")?.map(String::from),
                str_field(d, "instance['datastore']", "version")?.map(String::from),
            )
        }
        Some(other) => {
            return Err(ApiError::validation(format!(
                "instance['datastore'] {other} is not of type 'object'"
            )))
        }
    };
    let mut databases = vec![];
    if let Some(v) = inst.get("databases") {
        let arr = v
            .as_array()
            .ok_or_else(|| ApiError::validation("instance['databases'] is not of type 'array'"))?;
        super::check_count("instance['databases']", arr.len())?;
        for d in arr {
            let o = d.as_object().ok_or_else(|| {
                ApiError::validation("instance['databases'] item is not of type 'object'")
            })?;
            let name = str_field(o, "instance['databases']", "name")?.ok_or_else(|| {
                ApiError::validation("instance['databases'] 'name' is a required property")
            })?;
            check_name("database", name, 64)?;
            let cs = str_field(o, "instance['databases']", "character_set")?.unwrap_or("");
            let co = str_field(o, "instance['databases']", "collate")?.unwrap_or("");
            for (what, s) in [("character_set", cs), ("collate", co)] {
                if !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') || s.len() > 64 {
                    return Err(ApiError::validation(format!(
                        "instance['databases'] {what} '{s}' is not valid"
                    )));
                }
            }
            if databases.iter().any(|x: &v1::Database| x.name == name) {
                return Err(ApiError::bad_request(format!(
                    "Database '{name}' is listed twice."
                )));
            }
            databases.push(v1::Database {
                name: name.into(),
                character_set: cs.into(),
                collate: co.into(),
            });
        }
    }
    let mut users = vec![];
    if let Some(v) = inst.get("users") {
        let arr = v
            .as_array()
            .ok_or_else(|| ApiError::validation("instance['users'] is not of type 'array'"))?;
        super::check_count("instance['users']", arr.len())?;
        for u in arr {
            let o = u.as_object().ok_or_else(|| {
                ApiError::validation("instance['users'] item is not of type 'object'")
            })?;
            let name = str_field(o, "instance['users']", "name")?.ok_or_else(|| {
                ApiError::validation("instance['users'] 'name' is a required property")
            })?;
            check_name("user", name, 80)?;
            let password = str_field(o, "instance['users']", "password")?.ok_or_else(|| {
                ApiError::validation("instance['users'] 'password' is a required property")
            })?;
            if password.is_empty()
                || password.len() > 128
                || password.chars().any(|c| c.is_control())
            {
                return Err(ApiError::validation(
                    "instance['users'] password must be 1 to 128 characters without control characters",
                ));
            }
            let host = str_field(o, "instance['users']", "host")?.unwrap_or("%");
            if host.is_empty()
                || host.len() > 255
                || !host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || ".%_:-/".contains(c))
            {
                return Err(ApiError::validation(format!(
                    "instance['users'] host '{host}' is not valid"
                )));
            }
            let mut dbs = vec![];
            if let Some(dv) = o.get("databases") {
                let arr = dv.as_array().ok_or_else(|| {
                    ApiError::validation("instance['users']['databases'] is not of type 'array'")
                })?;
                super::check_count("instance['users']['databases']", arr.len())?;
                for d in arr {
                    let n = d.get("name").and_then(|n| n.as_str()).ok_or_else(|| {
                        ApiError::validation(
                            "instance['users']['databases'] 'name' is a required property",
                        )
                    })?;
                    if !databases.iter().any(|x| x.name == n) {
                        return Err(ApiError::bad_request(format!(
                            "Database '{n}' of user '{name}' is not in the instance's 'databases'."
                        )));
                    }
                    dbs.push(n.to_string());
                }
            }
            if users
                .iter()
                .any(|x: &v1::User| x.name == name && x.host == host)
            {
                return Err(ApiError::bad_request(format!(
                    "User '{name}'@'{host}' is listed twice."
                )));
            }
            users.push(v1::User {
                name: name.into(),
                password: password.into(),
                host: host.into(),
                databases: dbs,
                password_sealed: Vec::new(),
            });
        }
    }
    let restore_from = match inst.get("restorePoint") {
        None | Some(Value::Null) => None,
        Some(Value::Object(o)) => Some(
            o.get("backupRef")
                .and_then(id_of)
                .filter(|s| !s.is_empty())
                .ok_or_else(|| {
                    ApiError::validation(
                        "instance['restorePoint'] 'backupRef' is a required property",
                    )
                })?,
        ),
        Some(v) => {
            return Err(ApiError::validation(format!(
                "instance['restorePoint'] {v} is not of type 'object'"
            )))
        }
    };
    let configuration = match inst.get("configuration") {
        None | Some(Value::Null) => None,
        Some(v) => Some(id_of(v).filter(|s| !s.is_empty()).ok_or_else(|| {
            ApiError::validation(format!(
                "instance['configuration'] {v} is not a configuration id or href"
            ))
        })?),
    };
    let modules = match inst.get("modules") {
        None | Some(Value::Null) => vec![],
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.get("id")
                    .and_then(id_of)
                    .filter(|s| !s.is_empty())
                    .ok_or_else(|| ApiError::validation("instance['modules'] items need an 'id'"))
            })
            .collect::<Result<_, _>>()?,
        Some(v) => {
            return Err(ApiError::validation(format!(
                "instance['modules'] {v} is not of type 'array'"
            )))
        }
    };
    Ok(CreateReq {
        modules,
        configuration,
        restore_from,
        name,
        flavor_id,
        volume_size,
        datastore,
        version,
        databases,
        users,
    })
}

pub(super) async fn resolve_version(
    app: &App,
    ds: Option<&str>,
    v: Option<&str>,
) -> Result<VersionRow, ApiError> {
    let all = app.store.datastores().await?;
    let d = match ds {
        Some(name) => all
            .into_iter()
            .find(|d| d.name == name || d.id == name)
            .ok_or_else(|| ApiError::not_found(format!("Datastore '{name}' cannot be found.")))?,
        None => {
            let default = app.cfg.default_datastore.as_deref();
            if let Some(d) = default.and_then(|n| all.iter().find(|d| d.name == n)) {
                d.clone()
            } else if all.len() == 1 {
                all.into_iter().next().unwrap()
            } else {
                return Err(ApiError::bad_request(
                    "Please specify datastore. Default datastore cannot be found.",
                ));
            }
        }
    };
    let versions: Vec<VersionRow> = app
        .store
        .versions_of(&d.id)
        .await?
        .into_iter()
        .filter(|x| x.active)
        .collect();
    match v {
        Some(name) => versions
            .into_iter()
            .find(|x| x.name == name || x.id == name)
            .ok_or_else(|| {
                ApiError::bad_request(format!("Datastore version '{name}' cannot be found."))
            }),
        None => {
            let dv = d.default_version_id.clone().ok_or_else(|| {
                ApiError::bad_request(format!(
                    "Default version for datastore '{}' not found.",
                    d.name
                ))
            })?;
            versions.into_iter().find(|x| x.id == dv).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "Default version for datastore '{}' not found.",
                    d.name
                ))
            })
        }
    }
}

pub async fn create(st: AppState, c: Caller, body: Bytes) -> ApiResult {
    let app = st.0.clone();
    let body = parse_body(&body)?;
    if let Some(r) = parse_replica(&body)? {
        return super::replicas::create(app, &c, r).await;
    }
    let req = parse_create(&body)?;
    let version = resolve_version(&app, req.datastore.as_deref(), req.version.as_deref()).await?;
    // What the datastore cannot honor is refused before anything is placed.
    let datastore = version
        .datastore()
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    if !datastore.has_named_databases()
        && (!req.databases.is_empty() || req.users.iter().any(|u| !u.databases.is_empty()))
    {
        return Err(ApiError::bad_request(format!(
            "{datastore} instances have no named databases; create the instance without 'databases' and without databases in its users."
        )));
    }
    let flavor = app.store.flavor(&req.flavor_id).await?.ok_or_else(|| {
        ApiError::bad_request(format!("Flavor '{}' could not be found.", req.flavor_id))
    })?;
    // restorePoint: a COMPLETED backup of this project.
    let restore_from = match &req.restore_from {
        Some(b) => {
            let backup = app
                .store
                .backup(b)
                .await?
                .filter(|x| x.project_id == c.project)
                .ok_or_else(|| ApiError::not_found(format!("Backup {b} could not be found.")))?;
            if backup.status != "COMPLETED" {
                return Err(ApiError::new(
                    axum::http::StatusCode::CONFLICT,
                    "conflict",
                    format!(
                        "Backup {b} is not completed (status {}); restore from a completed backup.",
                        backup.status
                    ),
                ));
            }
            let of = app
                .store
                .version(&backup.datastore_version_id)
                .await?
                .map(|v| v.manager)
                .unwrap_or_default();
            if of != version.manager {
                return Err(ApiError::bad_request(format!(
                    "Backup {b} is a {of} backup; restore it into a {of} instance, not {}.",
                    version.manager
                )));
            }
            Some(crate::ops::backups::restore_point(&app, &backup.id, Some(&c.project)).await?)
        }
        None => None,
    };
    // A configuration group: the project's, for this version, with values that still check.
    let overrides = match &req.configuration {
        Some(g) => {
            let cfg = app
                .store
                .configuration(g)
                .await?
                .filter(|x| x.project_id == c.project)
                .ok_or_else(|| {
                    ApiError::not_found(format!("Configuration group {g} cannot be found."))
                })?;
            if cfg.datastore_version_id != version.id {
                return Err(ApiError::bad_request(format!(
                    "The configuration group {g} is for another datastore version."
                )));
            }
            crate::ops::configurations::check_values(&app, &cfg.datastore_version_id, &cfg.values)
                .await?
        }
        None => vec![],
    };
    let modules = super::modules::for_create(
        &app,
        &c,
        &req.modules,
        &version.datastore_name,
        &version.name,
    )
    .await?;
    // Quota: a cheap check before placing anything; the binding one runs in the transaction.
    {
        let mut tx = app.store.begin_read().await?;
        super::quotas::check(&mut tx, &c.project, flavor.ram, req.volume_size).await?;
    }
    let linked = app.store.version_flavors(&version.id).await?;
    if !linked.is_empty() && !linked.contains(&flavor.id) {
        return Err(ApiError::bad_request(format!(
            "Flavor '{}' is not supported for datastore version '{}' of '{}'.",
            flavor.id, version.name, version.datastore_name
        )));
    }

    let id = uuid::Uuid::new_v4().to_string();
    let root_password = version
        .root_on_create
        .then(|| uuid::Uuid::new_v4().simple().to_string());
    let n = NewInstance {
        id: id.clone(),
        project: c.project.clone(),
        name: req.name,
        flavor,
        version,
        volume_size: req.volume_size,
        databases: req.databases,
        users: req.users,
        restore_from,
        overrides,
        modules,
        configuration: req.configuration,
        root_password: root_password.clone(),
    };
    // An intent too large to send is refused before anything is placed (a Unix user, a VM).
    check_prepare_size(&app, &n)?;
    if app.provisioner.key_at_enrolment() {
        // A VM: its agent makes its key pair at first boot and sends the public half when it
        // enrols; the secrets are sealed to it then. The instance shows as BUILD meanwhile.
        store_pending(&app, &n).await?;
        tokio::spawn(build_vm(app.clone(), n));
    } else {
        // The row first, with the binding quota check: concurrent creates past the quota are
        // refused before any of them places an agent (a Unix user, a port). Then the agent,
        // whose public key seals the secrets, and the prepare intent.
        store_pending(&app, &n).await?;
        crate::failpoint::hit("create", "reserved");
        let committed = async {
            let (placed, nats_user) = place(&app, &id, &n.version, None).await?;
            crate::failpoint::hit("create", "placed");
            commit_new(
                &app,
                &n,
                &placed.public_key,
                &nats_user,
                (&placed.host, placed.port),
                Commit::Placed("provisioner"),
            )
            .await
        }
        .await;
        if let Err(e) = committed {
            let _ = app.provisioner.destroy(&id).await;
            app.store.forget_instance(&id).await?;
            return Err(e);
        }
        app.outbox_wake.notify_one();
        start_agent(&app, &id).await?;
    }
    let row = app
        .store
        .instance(&id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("instance vanished"))?;
    let mut view = render(&app, &c, &row, true, false).await?;
    if let Some(pw) = root_password {
        // Trove returns root's password in the create response only (root_on_create).
        view["password"] = json!(pw);
    }
    ok(json!({ "instance": view }))
}

/// Refuses (413) a create whose prepare intent could never be sent. The estimate carries the
/// passwords in the clear, which is smaller than sealed, so what passes here may still be refused
/// by [`Store::enqueue`] once sealed; what fails here would fail there, after placing an agent.
fn check_prepare_size(app: &App, n: &NewInstance) -> Result<(), ApiError> {
    let estimate = v1::intent::Kind::Prepare(v1::Prepare {
        memory_mb: n.flavor.ram as u64,
        vcpus: n.flavor.vcpus as u32,
        volume_gb: n.volume_size as u64,
        server_id: 0,
        databases: n.databases.clone(),
        users: n.users.clone(),
        datastore_version: n.version.version.clone(),
        root_password_sealed: vec![],
        restore: n.restore_from.clone(),
        overrides: n.overrides.clone(),
        replica_of: None,
        modules: vec![],
    });
    let bytes = intent_payload(app, &n.id, &n.id, estimate).len();
    if bytes > store::MAX_INTENT_BYTES {
        return Err(anyhow::Error::from(store::IntentTooLarge {
            kind: "prepare".into(),
            bytes,
        })
        .into());
    }
    Ok(())
}

/// A new (non-replica) instance, checked and ready to be committed once its agent's key is known.
pub(super) struct NewInstance {
    pub id: String,
    pub project: String,
    pub name: String,
    pub flavor: store::FlavorRow,
    pub version: VersionRow,
    pub volume_size: i64,
    pub databases: Vec<v1::Database>,
    /// Passwords in the clear until [`commit_new`] seals them.
    pub users: Vec<v1::User>,
    /// The backup chain to restore, as the controller recorded it.
    pub restore_from: Option<v1::RestoreFrom>,
    pub overrides: Vec<v1::Override>,
    pub modules: Vec<store::ModuleRow>,
    pub configuration: Option<String>,
    pub root_password: Option<String>,
}

/// How [`commit_new`] stores the instance.
pub(super) enum Commit<'a> {
    /// Insert the row, with this placement (`provisioner` or `enrolled`).
    Insert(&'a str),
    /// Complete the row [`store_pending`] stored while the VM booted.
    Complete,
    /// Complete the row [`store_pending`] reserved, with the placed agent's key and address
    /// and this placement.
    Placed(&'a str),
}

fn row_of(n: &NewInstance, server_id: i64, key: &[u8], nats_user: &str) -> InstanceRow {
    let ts = store::now();
    InstanceRow {
        id: n.id.clone(),
        project_id: n.project.clone(),
        name: n.name.clone(),
        flavor_id: n.flavor.id.clone(),
        datastore_version_id: n.version.id.clone(),
        volume_size: n.volume_size,
        task: task::BUILDING.into(),
        task_started: ts.clone(),
        service_status: "new".into(),
        fault: None,
        fault_at: None,
        server_id,
        host: None,
        port: None,
        created: ts.clone(),
        updated: ts,
        deleted: false,
        agent_version: String::new(),
        capabilities: String::new(),
        agent_public_key: coffer_proto::seal::to_hex(key),
        agent_nats_user: nats_user.to_string(),
        configuration_id: n.configuration.clone(),
        replica_of: None,
        repl_user: None,
        repl_secret: None,
        repl_strategy: None,
        ejected: false,
        placement: "provisioner".into(),
    }
}

/// Stores a new instance before its agent exists (BUILD, no key, no address yet), with the
/// binding quota check: the reservation a create holds while its agent is placed.
async fn store_pending(app: &App, n: &NewInstance) -> Result<(), ApiError> {
    let mut tx = app.store.begin().await?;
    super::quotas::check(&mut tx, &n.project, n.flavor.ram, n.volume_size).await?;
    let server_id = Store::next_server_id(&mut tx).await?;
    Store::insert_instance(&mut tx, &row_of(n, server_id, &[], "")).await?;
    tx.commit().await?;
    Ok(())
}

/// Boots a VM-backed instance: places it (the provisioner boots the VM with an enrolment token),
/// waits for its agent to enrol, then seals the secrets to the agent's key and queues `prepare`.
async fn build_vm(app: std::sync::Arc<App>, n: NewInstance) {
    let id = n.id.clone();
    let result: anyhow::Result<()> = async {
        let ttl = app.cfg.build_timeout_s.max(60) as i64;
        let token = super::enrol::create_token(
            &app.store,
            &super::enrol::TokenSpec {
                project: n.project.clone(),
                name: n.name.clone(),
                version_id: n.version.id.clone(),
                flavor_id: n.flavor.id.clone(),
                volume_size: n.volume_size,
                instance_id: Some(id.clone()),
                ttl_s: ttl,
            },
        )
        .await?;
        let (placed, _) = place(&app, &id, &n.version, Some(token.token))
            .await
            .map_err(|e| anyhow::anyhow!("{}", e.message))?;
        app.store
            .set_endpoint(&id, &placed.host, placed.port as i64)
            .await?;
        app.provisioner
            .start(&id)
            .await
            .map_err(|e| e.context("booting the VM failed"))?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(ttl as u64);
        let (key, nats_user) = loop {
            match app.store.instance(&id).await? {
                None => return Ok(()), // deleted while booting
                Some(r) if r.has_agent() => {
                    let key = coffer_proto::seal::from_hex(&r.agent_public_key)
                        .context("the enrolled key is not hex")?;
                    break (key, r.agent_nats_user);
                }
                Some(_) => {}
            }
            if std::time::Instant::now() > deadline {
                anyhow::bail!(
                    "the VM's agent did not enrol within {ttl} s; check the VM's console log \
                     (console.log in its instance directory) and that it reaches the controller"
                );
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        };
        commit_new(
            &app,
            &n,
            &key,
            &nats_user,
            (&placed.host, placed.port),
            Commit::Complete,
        )
        .await
        .map_err(|e| anyhow::anyhow!("{}", e.message))?;
        app.outbox_wake.notify_one();
        Ok(())
    }
    .await;
    if let Err(e) = result {
        warn!(instance = %id, error = %format!("{e:#}"), "VM build failed");
        if let Ok(mut tx) = app.store.begin().await {
            let _ = Store::set_task(&mut tx, &id, task::BUILD_ERROR, Some(&format!("{e:#}"))).await;
            let _ = tx.commit().await;
        }
    }
}

/// Seals a new instance's secrets to its agent's key, stores it and queues its `prepare` intent,
/// in one transaction (with the binding quota check).
pub(super) async fn commit_new(
    app: &App,
    n: &NewInstance,
    key: &[u8],
    nats_user: &str,
    (host, port): (&str, u16),
    how: Commit<'_>,
) -> Result<(), ApiError> {
    let id = &n.id;
    let mut users = n.users.clone();
    for u in &mut users {
        let context = coffer_proto::seal::user_password_context(id, &u.name, &u.host);
        u.password_sealed = coffer_proto::seal::seal(key, &context, u.password.as_bytes())
            .map_err(|e| anyhow::anyhow!("sealing a password: {e}"))?;
        u.password.clear();
    }
    let root_password_sealed = match &n.root_password {
        Some(pw) => coffer_proto::seal::seal(
            key,
            &coffer_proto::seal::root_password_context(id),
            pw.as_bytes(),
        )
        .map_err(|e| anyhow::anyhow!("sealing the root password: {e}"))?,
        None => vec![],
    };
    let module_specs = n
        .modules
        .iter()
        .map(|m| super::modules::spec_sealed(app, id, key, m))
        .collect::<Result<Vec<_>, _>>()?;
    for m in &n.modules {
        app.store
            .record_instance_module(id, &m.id, &m.md5, "PENDING", "", false)
            .await?;
    }
    let intent_id = uuid::Uuid::new_v4().to_string();
    let mut tx = app.store.begin().await?;
    let server_id = match how {
        Commit::Insert(placement) => {
            super::quotas::check(&mut tx, &n.project, n.flavor.ram, n.volume_size).await?;
            let server_id = Store::next_server_id(&mut tx).await?;
            let mut row = row_of(n, server_id, key, nats_user);
            row.host = Some(host.to_string());
            row.port = Some(port as i64);
            Store::insert_instance(&mut tx, &row).await?;
            sqlx::query("UPDATE instances SET placement = ? WHERE id = ?")
                .bind(placement)
                .bind(id)
                .execute(&mut *tx)
                .await?;
            server_id
        }
        Commit::Placed(placement) => {
            let server_id =
                Store::complete_placement(&mut tx, id, key, nats_user, host, port, placement)
                    .await?;
            server_id
        }
        Commit::Complete => {
            let r = sqlx::query("SELECT server_id FROM instances WHERE id = ? AND deleted = 0")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or_else(|| anyhow::anyhow!("instance {id} was deleted while it built"))?;
            sqlx::Row::get(&r, "server_id")
        }
    };
    let mut restore = n.restore_from.clone();
    if let Some(r) = restore.as_mut() {
        crate::ops::backups::grant_restore(app, r, id, key)?;
    }
    let prepare = v1::intent::Kind::Prepare(v1::Prepare {
        memory_mb: n.flavor.ram as u64,
        vcpus: n.flavor.vcpus as u32,
        volume_gb: n.volume_size as u64,
        server_id: server_id as u32,
        databases: n.databases.clone(),
        users,
        datastore_version: n.version.version.clone(),
        root_password_sealed,
        restore,
        overrides: n.overrides.clone(),
        replica_of: None,
        modules: module_specs,
    });
    let payload = intent_payload(app, id, &intent_id, prepare);
    Store::enqueue(&mut tx, &intent_id, id, "prepare", &payload).await?;
    if n.root_password.is_some() {
        sqlx::query("UPDATE instances SET root_enabled = 1 WHERE id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Places an instance's agent (its identity and configuration); returns what the provisioner
/// placed and the agent's NATS user.
pub(super) async fn place(
    app: &App,
    id: &str,
    version: &VersionRow,
    enrol_token: Option<String>,
) -> Result<(crate::provisioner::Placed, String), ApiError> {
    let (nats_creds, nats_user) = match &app.authority {
        // An agent that enrols gets its NATS identity then, sealed to its own key.
        _ if enrol_token.is_some() => (None, String::new()),
        Some(a) => {
            let (creds, user) = a.agent_creds(id)?;
            (Some(creds), user)
        }
        None => (None, String::new()),
    };
    let placement = Placement {
        instance_id: id.to_string(),
        manager: version.manager.clone(),
        nats_url: app
            .cfg
            .agent_nats_url
            .clone()
            .unwrap_or_else(|| app.cfg.nats_url.clone()),
        nats_creds,
        nats_ca_file: app.cfg.nats_ca_file.clone(),
        enrol_token,
        backup_toml: agent_backup_toml(app)?,
    };
    let placed = app.provisioner.prepare(&placement).await.map_err(|e| {
        ApiError::from(e.context("placing the agent failed; check the provisioner configuration"))
    })?;
    Ok((placed, nats_user))
}

/// The agent's `[backup]` table (TOML), when backups are configured.
pub(super) fn agent_backup_toml(app: &App) -> Result<Option<String>, ApiError> {
    #[derive(serde::Serialize)]
    struct AgentBackup<'a> {
        backup: &'a coffer_common::backup::BackupConfig,
    }
    match &app.cfg.backup {
        Some(b) => {
            // The operator's keyring stays here: agents get per-instance keys with each intent.
            let b = coffer_common::backup::BackupConfig {
                keyring_file: None,
                ..b.clone()
            };
            Ok(Some(
                toml::to_string(&AgentBackup { backup: &b }).map_err(anyhow::Error::from)?,
            ))
        }
        None => Ok(None),
    }
}

/// Starts a placed agent; a failure ends the build in ERROR.
pub(super) async fn start_agent(app: &App, id: &str) -> Result<(), ApiError> {
    if let Err(e) = app.provisioner.start(id).await {
        let mut tx = app.store.begin().await?;
        Store::set_task(
            &mut tx,
            id,
            task::BUILD_ERROR,
            Some(&format!("starting the agent failed: {e:#}")),
        )
        .await?;
        tx.commit().await?;
    }
    Ok(())
}

/// Renders an instance in Trove's list or detail form.
pub(super) async fn render(
    app: &App,
    c: &Caller,
    r: &InstanceRow,
    detail: bool,
    with_usage: bool,
) -> Result<Value, ApiError> {
    let fresh = app.fresh(&r.id);
    let (mut status, mut op) = status::derive(&r.task, &r.service_status, fresh);
    if status == "ACTIVE" && app.store.backup_running(&r.id).await? {
        // Trove: a running backup shows as BACKUP (the database stays online).
        (status, op) = ("BACKUP", "");
    }
    let version = app.store.version(&r.datastore_version_id).await?;
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
    super::replicas::view(app, c, r, &mut j).await?;
    if let Some(cid) = &r.configuration_id {
        let name = app
            .store
            .configuration(cid)
            .await?
            .map(|x| x.name)
            .unwrap_or_default();
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
        if let Some(f) = &r.fault {
            j["fault"] = json!({"message": f, "created": r.fault_at, "details": null});
        } else if status == "ERROR" && !fresh && r.task == task::NONE {
            j["fault"] = json!({
                "message": format!(
                    "The guest agent has not reported for more than {} s; check that coffer-agent runs for this instance.",
                    app.cfg.heartbeat_expiry_s
                ),
                "created": null, "details": null,
            });
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
        if r.task == task::BUILDING || r.task == task::REBOOTING || r.task == task::DELETING {
            if let Some((kind, state, progress, message)) = app.store.latest_intent(&r.id).await? {
                j["progress"] = json!({"action": kind, "state": state, "percent": progress, "message": message});
            }
        }
    }
    Ok(j)
}

pub(super) async fn find(app: &App, c: &Caller, id: &str) -> Result<InstanceRow, ApiError> {
    match app.store.instance(id).await? {
        Some(r) if r.project_id == c.project || c.admin => Ok(r),
        _ => Err(ApiError::not_found(format!(
            "Instance {id} could not be found."
        ))),
    }
}

async fn list_impl(st: AppState, c: Caller, page: Page, detail: bool) -> ApiResult {
    let rows = st.store.instances_of(&c.project).await?;
    let (rows, next) = page.apply(rows, |r| r.id.clone())?;
    let mut out = vec![];
    for r in &rows {
        out.push(render(&st, &c, r, detail, false).await?);
    }
    ok(with_next(
        json!({"instances": out}),
        &c,
        "instances",
        &page.limit,
        next,
    ))
}

pub async fn list(st: AppState, c: Caller, Query(page): Query<Page>) -> ApiResult {
    list_impl(st, c, page, false).await
}

pub async fn list_detail(st: AppState, c: Caller, Query(page): Query<Page>) -> ApiResult {
    list_impl(st, c, page, true).await
}

pub async fn show(st: AppState, c: Caller, Path((_p, id)): Path<(String, String)>) -> ApiResult {
    let r = find(&st, &c, &id).await?;
    ok(json!({"instance": render(&st, &c, &r, true, true).await?}))
}

async fn update_impl(st: AppState, c: Caller, id: String, body: Bytes, patch: bool) -> ApiResult {
    let body = parse_body(&body)?;
    let r = find(&st, &c, &id).await?;
    let inst = match body.get("instance") {
        Some(Value::Object(o)) => o,
        _ => return Err(ApiError::validation("'instance' is a required property")),
    };
    let allowed: &[&str] = if patch {
        &[
            "name",
            "configuration",
            "replica_of",
            "slave_of",
            "datastore_version",
        ]
    } else {
        &[
            "name",
            "configuration",
            "replica_of",
            "datastore_version",
            "access",
        ]
    };
    for k in inst.keys() {
        if !allowed.contains(&k.as_str()) {
            return Err(ApiError::validation(format!(
                "instance Additional properties are not allowed ('{k}' was unexpected)"
            )));
        }
    }
    let others: Vec<&String> = inst.keys().filter(|k| *k != "name").collect();
    if others.len() > 1 {
        return Err(ApiError::bad_request(
            "Only one attribute (except 'name') is allowed to update.",
        ));
    }
    if let Some(k) = others.first() {
        if !["configuration", "replica_of", "slave_of"].contains(&k.as_str()) {
            return Err(ApiError::not_implemented(format!(
                "Updating '{k}' is not supported by this Coffer release yet."
            )));
        }
    }
    if let Some(n) = inst.get("name") {
        let n = n
            .as_str()
            .ok_or_else(|| ApiError::validation("instance['name'] is not of type 'string'"))?;
        super::check_text("instance['name']", n, 255)?;
        if n.trim().is_empty() || n.len() > 255 || !n.chars().any(|c| c.is_ascii_alphanumeric()) {
            return Err(ApiError::validation(format!(
                "instance['name'] '{n}' is not a valid name"
            )));
        }
        st.store.rename(&r.id, n).await?;
    }
    // `replica_of` / `slave_of` (any value: the key's presence counts): detach from the source.
    if inst.contains_key("replica_of") || inst.contains_key("slave_of") {
        super::replicas::detach(&st.0, &r).await?;
        return accepted();
    }
    // `configuration`: attach (an id or href), detach (null); `{"instance": {}}` also detaches.
    match inst.get("configuration") {
        Some(Value::Null) => {
            if r.configuration_id.is_some() {
                super::configurations::attach(&st, &c, &r, None).await?;
            }
        }
        Some(v) => {
            let g = id_of(v).filter(|s| !s.is_empty()).ok_or_else(|| {
                ApiError::validation(format!(
                    "instance['configuration'] {v} is not a configuration id or href"
                ))
            })?;
            super::configurations::attach(&st, &c, &r, Some(g)).await?;
        }
        None if inst.is_empty() && r.configuration_id.is_some() => {
            super::configurations::attach(&st, &c, &r, None).await?;
        }
        None => {}
    }
    accepted()
}

pub async fn update(
    st: AppState,
    c: Caller,
    Path((_p, id)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    update_impl(st, c, id, body, false).await
}

pub async fn update_patch(
    st: AppState,
    c: Caller,
    Path((_p, id)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    update_impl(st, c, id, body, true).await
}

pub async fn delete(st: AppState, c: Caller, Path((_p, id)): Path<(String, String)>) -> ApiResult {
    let app = st.0.clone();
    let r = find(&app, &c, &id).await?;
    if r.task == task::BUILDING {
        return Err(ApiError::unprocessable(format!(
            "Instance {id} is not ready. (Status is BUILD)."
        )));
    }
    if r.task == task::DELETING {
        return accepted();
    }
    if app.store.has_replicas(&r.id).await? {
        return Err(ApiError::forbidden(
            "Detach replicas before deleting replica source.",
        ));
    }
    let intent_id = uuid::Uuid::new_v4().to_string();
    let mut tx = app.store.begin().await?;
    // Re-check inside the write lock.
    let cur: String = sqlx::query_scalar("SELECT task FROM instances WHERE id = ?")
        .bind(&id)
        .fetch_one(&mut *tx)
        .await
        .map_err(anyhow::Error::from)?;
    if cur == task::BUILDING {
        return Err(ApiError::unprocessable(format!(
            "Instance {id} is not ready. (Status is BUILD)."
        )));
    }
    if let Some(workflow) = Store::owner_in(&mut *tx, &id).await? {
        return Err(crate::store::Owned {
            instance: id,
            workflow,
        }
        .into());
    }
    Store::set_task(&mut tx, &id, task::DELETING, None).await?;
    let payload = intent_payload(
        &app,
        &id,
        &intent_id,
        v1::intent::Kind::Delete(v1::Delete {}),
    );
    Store::enqueue(&mut tx, &intent_id, &id, "delete", &payload).await?;
    tx.commit().await?;
    crate::failpoint::hit("delete", "requested");
    app.outbox_wake.notify_one();
    accepted()
}

pub async fn action(
    st: AppState,
    c: Caller,
    Path((_p, id)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
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
        "restart" => restart(&app, &r).await,
        "reset_status" => {
            if !c.admin {
                return Err(ApiError::forbidden(
                    "Policy doesn't allow instance:reset_status to be performed.",
                ));
            }
            // A workflow's members are released (and its fences lifted) by the workflow
            // alone: ask it to stop where it safely can.
            if let Some(w) = app.store.workflow_owning(&id).await? {
                app.store.cancel_workflow(&w).await?;
                return accepted();
            }
            let mut tx = app.store.begin().await?;
            Store::set_task(&mut tx, &id, task::NONE, None).await?;
            sqlx::query("UPDATE instances SET service_status = 'unknown' WHERE id = ?")
                .bind(&id)
                .execute(&mut *tx)
                .await
                .map_err(anyhow::Error::from)?;
            tx.commit().await?;
            if let Some(l) = app.live.lock().unwrap().get_mut(&id) {
                l.persisted = None;
            }
            accepted()
        }
        "promote_to_replica_source" => super::replicas::promote(app, &r).await,
        "eject_replica_source" => super::replicas::eject(app, &r).await,
        "resize" => Err(ApiError::not_implemented(format!(
            "The '{key}' action is not supported by this Coffer release yet."
        ))),
        other => Err(ApiError::bad_request(format!(
            "Invalid instance action: '{other}'."
        ))),
    }
}

async fn restart(app: &App, r: &InstanceRow) -> ApiResult {
    let busy = || {
        ApiError::unprocessable(format!(
            "Instance {} is not currently available for an action to be performed (task status was {}).",
            r.id,
            r.task.to_uppercase()
        ))
    };
    let backing_up = || {
        ApiError::unprocessable(format!(
            "Instance {} is not currently available for an action to be performed (status was BACKUP); retry once its backup ends.",
            r.id
        ))
    };
    if r.task != task::NONE {
        return Err(busy());
    }
    if app.store.backup_running(&r.id).await? {
        return Err(backing_up());
    }
    if !app.fresh(&r.id) || !status::action_allowed(&r.service_status) {
        return Err(ApiError::unprocessable(format!(
            "Instance {} is not currently available for an action to be performed (status was {}).",
            r.id,
            status::derive(&r.task, &r.service_status, app.fresh(&r.id)).0
        )));
    }
    if !r.capabilities.split(',').any(|k| k == "restart") {
        return Err(ApiError::unprocessable(format!(
            "The agent of instance {} (version '{}') does not support 'restart'; upgrade coffer-agent on it.",
            r.id, r.agent_version
        )));
    }
    let intent_id = uuid::Uuid::new_v4().to_string();
    let mut tx = app.store.begin().await?;
    let cur: String = sqlx::query_scalar("SELECT task FROM instances WHERE id = ?")
        .bind(&r.id)
        .fetch_one(&mut *tx)
        .await
        .map_err(anyhow::Error::from)?;
    if cur != task::NONE {
        return Err(busy());
    }
    if Store::backup_running_in(&mut *tx, &r.id).await? {
        return Err(backing_up());
    }
    Store::set_task(&mut tx, &r.id, task::REBOOTING, None).await?;
    Store::clear_fault(&mut tx, &r.id).await?;
    let payload = intent_payload(
        app,
        &r.id,
        &intent_id,
        v1::intent::Kind::Restart(v1::Restart {}),
    );
    Store::enqueue(&mut tx, &intent_id, &r.id, "restart", &payload).await?;
    tx.commit().await?;
    app.outbox_wake.notify_one();
    accepted()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;

    fn create(body: Value) -> Result<CreateReq, ApiError> {
        parse_create(body.as_object().expect("a JSON object"))
    }

    /// Trove create bodies and the exact answer each gets: the error's status and text, or
    /// what was parsed.
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
                format!("{v}instance['users'] password must be 1 to 128 characters without control characters"),
            ),
            (
                json!({"instance": {"name": "n", "flavorRef": "1", "volume": {"size": 1},
                    "users": [{"name": "u", "password": "p", "host": "a b"}]}}),
                StatusCode::BAD_REQUEST,
                format!("{v}instance['users'] host 'a b' is not valid"),
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
