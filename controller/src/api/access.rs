//! Databases, users, access and root of an instance (trove-api.md §7–9), carried out by the
//! instance's agent through request/reply calls. Lists are read from the server every time.
//! Passwords go to the agent sealed to its key; root's password comes back sealed to ours.

use axum::body::Bytes;
use axum::extract::{Path, Query};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use coffer_proto::{seal, v1};
use serde_json::{json, Map, Value};

use super::instances::{check_name, find};
use super::{accepted, ok, parse_body, with_next, ApiError, ApiResult, AppState, Caller, Page};
use crate::status;
use crate::store::InstanceRow;
use crate::App;

/// The instance, if it is ACTIVE and its agent answers these calls; 404 / 422 otherwise.
async fn ready(app: &App, c: &Caller, id: &str) -> Result<InstanceRow, ApiError> {
    let r = find(app, c, id).await?;
    let (st, _) = status::derive(&r.task, &r.service_status, app.fresh(&r.id));
    if st != "ACTIVE" {
        return Err(ApiError::unprocessable(format!(
            "Instance {id} is not ready, status: {st}."
        )));
    }
    if !r
        .capabilities
        .split(',')
        .any(|k| k == coffer_proto::CAP_USERS)
    {
        return Err(ApiError::unprocessable(format!(
            "The agent of instance {id} (version '{}') does not manage databases and users; upgrade coffer-agent on it.",
            r.agent_version
        )));
    }
    Ok(r)
}

pub(super) use crate::agents::{agent_key, call};

fn sealed(key: &[u8], context: &str, secret: &str) -> Result<Vec<u8>, ApiError> {
    seal::seal(key, context, secret.as_bytes()).map_err(|e| anyhow::anyhow!("sealing: {e}").into())
}

/// `name` or `name@host` from a URL (host defaults to `%`).
fn user_ref(s: &str) -> Result<(String, String), ApiError> {
    let (name, host) = match s.split_once('@') {
        Some((n, h)) => (n.to_string(), h.to_string()),
        None => (s.to_string(), "%".to_string()),
    };
    check_name("user", &name, 80)?;
    check_host(&host)?;
    Ok((name, host))
}

fn check_host(host: &str) -> Result<(), ApiError> {
    if host.is_empty()
        || host.len() > 255
        || !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".%_:-/".contains(c))
    {
        return Err(ApiError::validation(format!(
            "host '{host}' is not a host name, address or pattern"
        )));
    }
    Ok(())
}

fn check_password(p: &str) -> Result<(), ApiError> {
    if p.is_empty() || p.len() > 128 || p.chars().any(|c| c.is_control()) {
        return Err(ApiError::validation(
            "password must be 1 to 128 characters without control characters",
        ));
    }
    Ok(())
}

fn list_of<'a>(body: &'a Map<String, Value>, key: &str) -> Result<&'a Vec<Value>, ApiError> {
    match body.get(key) {
        Some(Value::Array(a)) if !a.is_empty() => {
            super::check_count(&format!("'{key}'"), a.len())?;
            Ok(a)
        }
        Some(Value::Array(_)) => Err(ApiError::validation(format!("'{key}' must not be empty"))),
        _ => Err(ApiError::validation(format!(
            "'{key}' is a required property"
        ))),
    }
}

fn string_of<'a>(o: &'a Value, key: &str, path: &str) -> Result<Option<&'a str>, ApiError> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(ApiError::validation(format!(
            "{path}['{key}'] {v} is not of type 'string'"
        ))),
    }
}

fn db_names(items: &[Value], path: &str) -> Result<Vec<String>, ApiError> {
    super::check_count(path, items.len())?;
    items
        .iter()
        .map(|d| {
            let n = string_of(d, "name", path)?.ok_or_else(|| {
                ApiError::validation(format!("{path} 'name' is a required property"))
            })?;
            check_name("database", n, 64)?;
            Ok(n.to_string())
        })
        .collect()
}

// ---- databases ----------------------------------------------------------------------------------

pub async fn list_databases(
    st: AppState,
    c: Caller,
    Path((_p, id)): Path<(String, String)>,
    Query(page): Query<Page>,
) -> ApiResult {
    let r = ready(&st, &c, &id).await?;
    let (_, rep) = call(&st, &r, v1::call::Kind::ListDatabases(v1::ListDatabases {})).await?;
    let (items, next) = page.apply(rep.databases, |d| d.name.clone())?;
    let body =
        json!({"databases": items.iter().map(|d| json!({"name": d.name})).collect::<Vec<_>>()});
    ok(with_next(
        body,
        &c,
        &format!("instances/{id}/databases"),
        &page.limit,
        next,
    ))
}

pub async fn create_databases(
    st: AppState,
    c: Caller,
    Path((_p, id)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    let body = parse_body(&body)?;
    let items = list_of(&body, "databases")?;
    let mut dbs = vec![];
    for d in items {
        let name = string_of(d, "name", "databases")?
            .ok_or_else(|| ApiError::validation("databases 'name' is a required property"))?;
        check_name("database", name, 64)?;
        let cs = string_of(d, "character_set", "databases")?.unwrap_or("");
        let co = string_of(d, "collate", "databases")?.unwrap_or("");
        for (what, v) in [("character_set", cs), ("collate", co)] {
            if v.len() > 64 || !v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(ApiError::validation(format!(
                    "databases {what} '{v}' is not valid"
                )));
            }
        }
        dbs.push(v1::Database {
            name: name.into(),
            character_set: cs.into(),
            collate: co.into(),
        });
    }
    let r = ready(&st, &c, &id).await?;
    call(
        &st,
        &r,
        v1::call::Kind::CreateDatabases(v1::CreateDatabases { databases: dbs }),
    )
    .await?;
    accepted()
}

pub async fn delete_database(
    st: AppState,
    c: Caller,
    Path((_p, id, name)): Path<(String, String, String)>,
) -> ApiResult {
    check_name("database", &name, 64)?;
    let r = ready(&st, &c, &id).await?;
    call(
        &st,
        &r,
        v1::call::Kind::DeleteDatabase(v1::DeleteDatabase { name }),
    )
    .await?;
    accepted()
}

pub async fn show_database() -> ApiResult {
    Err(ApiError::not_implemented(
        "Showing a single database is not implemented (as in Trove); list them instead.",
    ))
}

// ---- users --------------------------------------------------------------------------------------

fn user_json(u: &v1::UserInfo) -> Value {
    json!({"name": u.name, "host": u.host, "databases": u.databases.iter().map(|d| json!({"name": d})).collect::<Vec<_>>()})
}

async fn users_of(app: &App, r: &InstanceRow) -> Result<Vec<v1::UserInfo>, ApiError> {
    Ok(call(app, r, v1::call::Kind::ListUsers(v1::ListUsers {}))
        .await?
        .1
        .users)
}

pub async fn list_users(
    st: AppState,
    c: Caller,
    Path((_p, id)): Path<(String, String)>,
    Query(page): Query<Page>,
) -> ApiResult {
    let r = ready(&st, &c, &id).await?;
    let users = users_of(&st, &r).await?;
    let (items, next) = page.apply(users, |u| u.name.clone())?;
    let body = json!({"users": items.iter().map(user_json).collect::<Vec<_>>()});
    ok(with_next(
        body,
        &c,
        &format!("instances/{id}/users"),
        &page.limit,
        next,
    ))
}

/// Name, password and host (default `%`) of one item of a `users` list, checked.
fn user_entry(u: &Value) -> Result<(String, String, String), ApiError> {
    let name = string_of(u, "name", "users")?
        .ok_or_else(|| ApiError::validation("users 'name' is a required property"))?;
    check_name("user", name, 80)?;
    let password = string_of(u, "password", "users")?
        .ok_or_else(|| ApiError::validation("users 'password' is a required property"))?;
    check_password(password)?;
    let host = string_of(u, "host", "users")?.unwrap_or("%");
    check_host(host)?;
    Ok((name.to_string(), password.to_string(), host.to_string()))
}

pub async fn create_users(
    st: AppState,
    c: Caller,
    Path((_p, id)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    let body = parse_body(&body)?;
    let items = list_of(&body, "users")?;
    let mut parsed = vec![];
    for u in items {
        let (name, password, host) = user_entry(u)?;
        let dbs = match u.get("databases") {
            Some(Value::Array(a)) => db_names(a, "users['databases']")?,
            None | Some(Value::Null) => vec![],
            Some(_) => {
                return Err(ApiError::validation(
                    "users['databases'] is not of type 'array'",
                ))
            }
        };
        parsed.push((name, password, host, dbs));
    }
    let r = ready(&st, &c, &id).await?;
    let key = agent_key(&r)?;
    let mut users = vec![];
    for (name, password, host, databases) in parsed {
        let sealed_pw = sealed(
            &key,
            &seal::user_password_context(&id, &name, &host),
            &password,
        )?;
        users.push(v1::User {
            name,
            password: String::new(),
            host,
            databases,
            password_sealed: sealed_pw,
        });
    }
    call(
        &st,
        &r,
        v1::call::Kind::CreateUsers(v1::CreateUsers { users }),
    )
    .await?;
    accepted()
}

/// `PUT .../users`: change the passwords of several users.
pub async fn change_passwords(
    st: AppState,
    c: Caller,
    Path((_p, id)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    let body = parse_body(&body)?;
    let items = list_of(&body, "users")?;
    let mut changes = vec![];
    for u in items {
        let (name, password, host) = user_entry(u)?;
        changes.push((name, host, password));
    }
    let r = ready(&st, &c, &id).await?;
    let key = agent_key(&r)?;
    for (name, host, password) in changes {
        let new_password_sealed = sealed(
            &key,
            &seal::user_password_context(&id, &name, &host),
            &password,
        )?;
        let u = v1::UpdateUser {
            name,
            host,
            new_name: String::new(),
            new_host: String::new(),
            new_password_sealed,
        };
        call(&st, &r, v1::call::Kind::UpdateUser(u)).await?;
    }
    accepted()
}

async fn one_user(
    app: &App,
    r: &InstanceRow,
    name: &str,
    host: &str,
) -> Result<v1::UserInfo, ApiError> {
    users_of(app, r)
        .await?
        .into_iter()
        .find(|u| u.name == name && u.host == host)
        .ok_or_else(|| ApiError::not_found(format!("User {name} cannot be found on the instance.")))
}

pub async fn show_user(
    st: AppState,
    c: Caller,
    Path((_p, id, user)): Path<(String, String, String)>,
) -> ApiResult {
    let (name, host) = user_ref(&user)?;
    let r = ready(&st, &c, &id).await?;
    let u = one_user(&st, &r, &name, &host).await?;
    ok(json!({"user": user_json(&u)}))
}

pub async fn update_user(
    st: AppState,
    c: Caller,
    Path((_p, id, user)): Path<(String, String, String)>,
    body: Bytes,
) -> ApiResult {
    let (name, host) = user_ref(&user)?;
    let body = parse_body(&body)?;
    let u = match body.get("user") {
        Some(v @ Value::Object(o)) if !o.is_empty() => v,
        _ => {
            return Err(ApiError::validation(
                "'user' must be an object with at least one of name, password, host",
            ))
        }
    };
    for k in u.as_object().unwrap().keys() {
        if !["name", "password", "host"].contains(&k.as_str()) {
            return Err(ApiError::validation(format!(
                "user Additional properties are not allowed ('{k}' was unexpected)"
            )));
        }
    }
    let new_name = string_of(u, "name", "user")?;
    if let Some(n) = new_name {
        check_name("user", n, 80)?;
    }
    let new_host = string_of(u, "host", "user")?;
    if let Some(h) = new_host {
        check_host(h)?;
    }
    let password = string_of(u, "password", "user")?;
    if let Some(p) = password {
        check_password(p)?;
    }
    let r = ready(&st, &c, &id).await?;
    let new_password_sealed = match password {
        Some(p) => {
            let ctx = seal::user_password_context(
                &id,
                new_name.unwrap_or(&name),
                new_host.unwrap_or(&host),
            );
            sealed(&agent_key(&r)?, &ctx, p)?
        }
        None => vec![],
    };
    let upd = v1::UpdateUser {
        name,
        host,
        new_name: new_name.unwrap_or_default().to_string(),
        new_host: new_host.unwrap_or_default().to_string(),
        new_password_sealed,
    };
    call(&st, &r, v1::call::Kind::UpdateUser(upd)).await?;
    accepted()
}

pub async fn delete_user(
    st: AppState,
    c: Caller,
    Path((_p, id, user)): Path<(String, String, String)>,
) -> ApiResult {
    let (name, host) = user_ref(&user)?;
    let r = ready(&st, &c, &id).await?;
    call(
        &st,
        &r,
        v1::call::Kind::DeleteUser(v1::DeleteUser { name, host }),
    )
    .await?;
    accepted()
}

pub async fn list_access(
    st: AppState,
    c: Caller,
    Path((_p, id, user)): Path<(String, String, String)>,
) -> ApiResult {
    let (name, host) = user_ref(&user)?;
    let r = ready(&st, &c, &id).await?;
    let u = one_user(&st, &r, &name, &host).await?;
    ok(json!({"databases": u.databases.iter().map(|d| json!({"name": d})).collect::<Vec<_>>()}))
}

pub async fn grant_access(
    st: AppState,
    c: Caller,
    Path((_p, id, user)): Path<(String, String, String)>,
    body: Bytes,
) -> ApiResult {
    let (name, host) = user_ref(&user)?;
    let body = parse_body(&body)?;
    let databases = db_names(list_of(&body, "databases")?, "databases")?;
    let r = ready(&st, &c, &id).await?;
    call(
        &st,
        &r,
        v1::call::Kind::GrantAccess(v1::GrantAccess {
            name,
            host,
            databases,
        }),
    )
    .await?;
    accepted()
}

pub async fn revoke_access(
    st: AppState,
    c: Caller,
    Path((_p, id, user, db)): Path<(String, String, String, String)>,
) -> ApiResult {
    let (name, host) = user_ref(&user)?;
    check_name("database", &db, 64)?;
    let r = ready(&st, &c, &id).await?;
    call(
        &st,
        &r,
        v1::call::Kind::RevokeAccess(v1::RevokeAccess {
            name,
            host,
            database: db,
        }),
    )
    .await?;
    accepted()
}

// ---- root ---------------------------------------------------------------------------------------

pub async fn root_show(
    st: AppState,
    c: Caller,
    Path((_p, id)): Path<(String, String)>,
) -> ApiResult {
    let r = find(&st, &c, &id).await?;
    ok(json!({"rootEnabled": st.store.root_enabled(&r.id).await?}))
}

pub async fn root_enable(
    st: AppState,
    c: Caller,
    Path((_p, id)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    let given = if body.is_empty() {
        None
    } else {
        let b = parse_body(&body)?;
        match b.get("password") {
            None | Some(Value::Null) => None,
            Some(Value::String(p)) => {
                check_password(p)?;
                Some(p.clone())
            }
            Some(_) => return Err(ApiError::validation("'password' is not of type 'string'")),
        }
    };
    let r = ready(&st, &c, &id).await?;
    let password_sealed = match &given {
        Some(p) => sealed(&agent_key(&r)?, &seal::root_password_context(&id), p)?,
        None => vec![],
    };
    let (call_id, rep) = call(
        &st,
        &r,
        v1::call::Kind::EnableRoot(v1::EnableRoot { password_sealed }),
    )
    .await?;
    let password = seal::open(
        &st.reply_secret_key,
        &seal::reply_context(&id, &call_id),
        &rep.sealed_secret,
    )
    .map_err(|e| anyhow::anyhow!("opening the root password from the agent: {e}"))?;
    st.store.set_root_enabled(&r.id, true).await?;
    ok(json!({"user": {"name": "root", "password": String::from_utf8_lossy(&password)}}))
}

pub async fn root_disable(
    st: AppState,
    c: Caller,
    Path((_p, id)): Path<(String, String)>,
) -> ApiResult {
    let r = find(&st, &c, &id).await?;
    if !st.store.root_enabled(&r.id).await? {
        return Err(ApiError::not_found(format!(
            "Root was never enabled on instance {id}."
        )));
    }
    let r = ready(&st, &c, &id).await?;
    call(&st, &r, v1::call::Kind::DisableRoot(v1::DisableRoot {})).await?;
    st.store.set_root_enabled(&r.id, false).await?;
    Ok((
        StatusCode::NO_CONTENT,
        [(header::CONTENT_TYPE, "application/json")],
    )
        .into_response())
}
