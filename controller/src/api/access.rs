//! Databases, users, access and root of an instance (trove-api.md §7–9), carried out by the
//! instance's agent through request/reply calls. Lists are read from the server every time.
//! Passwords go to the agent sealed to its key; root's password comes back sealed to ours.

use axum::body::Bytes;
use axum::extract::{Path, Query};
use axum::http::StatusCode;
use coffer_proto::{seal, v1};
use serde_json::{json, Value};

use super::instances::find;
use super::parse::{
    self, body_as, check_host, check_name, check_password, some_of, DatabaseReq, NameRef, UserReq,
};
use super::{
    accepted, ok, ApiError, ApiResult, AppState, Caller, ItemPath, Page, SubPath, SubSubPath,
};
use crate::status;
use crate::store::InstanceRow;
use crate::App;

/// The instance, if it is ACTIVE and its agent answers these calls; 404 / 422 otherwise.
async fn ready(app: &App, c: &Caller, id: &str) -> Result<InstanceRow, ApiError> {
    let r = find(app, c, id).await?;
    let (st, _) = status::derive(r.task, &r.service_status, app.fresh(&r.id));
    if st != "ACTIVE" {
        return Err(ApiError::unprocessable(format!(
            "Instance {id} is not ready, status: {st}."
        )));
    }
    crate::ops::require(
        &r,
        coffer_proto::CAP_USERS,
        "does not manage databases and users",
    )?;
    Ok(r)
}

pub(super) use crate::agents::{agent_key, call};

/// Has the instance's agent carry out `kind` once the instance is [`ready`]; 202.
async fn act(app: &App, c: &Caller, id: &str, kind: v1::call::Kind) -> ApiResult {
    let r = ready(app, c, id).await?;
    call(app, &r, kind).await?;
    accepted()
}

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

#[derive(serde::Deserialize)]
struct Databases {
    databases: Vec<DatabaseReq>,
}

#[derive(serde::Deserialize)]
struct DatabaseNames {
    databases: Vec<NameRef>,
}

#[derive(serde::Deserialize)]
struct Users {
    users: Vec<UserReq>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct UserChangeBody {
    user: UserChange,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct UserChange {
    name: Option<String>,
    password: Option<String>,
    host: Option<String>,
}

#[derive(serde::Deserialize)]
struct RootBody {
    password: Option<String>,
}

// ---- databases ----------------------------------------------------------------------------------

pub async fn list_databases(
    st: AppState,
    c: Caller,
    Path((_p, id)): ItemPath,
    Query(page): Query<Page>,
) -> ApiResult {
    let r = ready(&st, &c, &id).await?;
    let (_, rep) = call(&st, &r, v1::call::Kind::ListDatabases(v1::ListDatabases {})).await?;
    let (items, next) = page.apply(rep.databases, |d| d.name.clone())?;
    let body =
        json!({"databases": items.iter().map(|d| json!({"name": d.name})).collect::<Vec<_>>()});
    next.wrap(&c, &format!("instances/{id}/databases"), body)
}

pub async fn create_databases(
    st: AppState,
    c: Caller,
    Path((_p, id)): ItemPath,
    body: Bytes,
) -> ApiResult {
    let databases = some_of("databases", body_as::<Databases>(&body)?.databases)?
        .into_iter()
        .map(|d| parse::database(d, "databases"))
        .collect::<Result<Vec<_>, _>>()?;
    let kind = v1::call::Kind::CreateDatabases(v1::CreateDatabases { databases });
    act(&st, &c, &id, kind).await
}

pub async fn delete_database(st: AppState, c: Caller, Path((_p, id, name)): SubPath) -> ApiResult {
    check_name("database", &name, 64)?;
    let kind = v1::call::Kind::DeleteDatabase(v1::DeleteDatabase { name });
    act(&st, &c, &id, kind).await
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
    Path((_p, id)): ItemPath,
    Query(page): Query<Page>,
) -> ApiResult {
    let r = ready(&st, &c, &id).await?;
    let users = users_of(&st, &r).await?;
    let (items, next) = page.apply(users, |u| u.name.clone())?;
    let body = json!({"users": items.iter().map(user_json).collect::<Vec<_>>()});
    next.wrap(&c, &format!("instances/{id}/users"), body)
}

pub async fn create_users(
    st: AppState,
    c: Caller,
    Path((_p, id)): ItemPath,
    body: Bytes,
) -> ApiResult {
    let parsed = some_of("users", body_as::<Users>(&body)?.users)?
        .into_iter()
        .map(parse::user)
        .collect::<Result<Vec<_>, _>>()?;
    let r = ready(&st, &c, &id).await?;
    let key = agent_key(&r)?;
    let mut users = vec![];
    for mut u in parsed {
        let context = seal::user_password_context(&id, &u.name, &u.host);
        u.password_sealed = sealed(&key, &context, &std::mem::take(&mut u.password))?;
        users.push(u);
    }
    let kind = v1::call::Kind::CreateUsers(v1::CreateUsers { users });
    call(&st, &r, kind).await?;
    accepted()
}

/// `PUT .../users`: change the passwords of several users.
pub async fn change_passwords(
    st: AppState,
    c: Caller,
    Path((_p, id)): ItemPath,
    body: Bytes,
) -> ApiResult {
    let mut changes = vec![];
    for u in some_of("users", body_as::<Users>(&body)?.users)? {
        let u = parse::user(u)?;
        changes.push((u.name, u.host, u.password));
    }
    let r = ready(&st, &c, &id).await?;
    let key = agent_key(&r)?;
    for (name, host, password) in changes {
        let context = seal::user_password_context(&id, &name, &host);
        let new_password_sealed = sealed(&key, &context, &password)?;
        let u = v1::UpdateUser {
            name,
            host,
            new_password_sealed,
            ..Default::default()
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

pub async fn show_user(st: AppState, c: Caller, Path((_p, id, user)): SubPath) -> ApiResult {
    let (name, host) = user_ref(&user)?;
    let r = ready(&st, &c, &id).await?;
    let u = one_user(&st, &r, &name, &host).await?;
    ok(json!({"user": user_json(&u)}))
}

pub async fn update_user(
    st: AppState,
    c: Caller,
    Path((_p, id, user)): SubPath,
    body: Bytes,
) -> ApiResult {
    let (name, host) = user_ref(&user)?;
    let u = body_as::<UserChangeBody>(&body)?.user;
    let (new_name, new_host, password) =
        (u.name.as_deref(), u.host.as_deref(), u.password.as_deref());
    if new_name.is_none() && new_host.is_none() && password.is_none() {
        return Err(ApiError::validation(
            "'user' must be an object with at least one of name, password, host",
        ));
    }
    if let Some(n) = new_name {
        check_name("user", n, 80)?;
    }
    if let Some(h) = new_host {
        check_host(h)?;
    }
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

pub async fn delete_user(st: AppState, c: Caller, Path((_p, id, user)): SubPath) -> ApiResult {
    let (name, host) = user_ref(&user)?;
    let kind = v1::call::Kind::DeleteUser(v1::DeleteUser { name, host });
    act(&st, &c, &id, kind).await
}

pub async fn list_access(st: AppState, c: Caller, Path((_p, id, user)): SubPath) -> ApiResult {
    let (name, host) = user_ref(&user)?;
    let r = ready(&st, &c, &id).await?;
    let u = one_user(&st, &r, &name, &host).await?;
    ok(json!({"databases": u.databases.iter().map(|d| json!({"name": d})).collect::<Vec<_>>()}))
}

pub async fn grant_access(
    st: AppState,
    c: Caller,
    Path((_p, id, user)): SubPath,
    body: Bytes,
) -> ApiResult {
    let (name, host) = user_ref(&user)?;
    let databases: Vec<String> = some_of("databases", body_as::<DatabaseNames>(&body)?.databases)?
        .into_iter()
        .map(|d| check_name("database", &d.name, 64).map(|_| d.name))
        .collect::<Result<_, _>>()?;
    let kind = v1::call::Kind::GrantAccess(v1::GrantAccess {
        name,
        host,
        databases,
    });
    act(&st, &c, &id, kind).await
}

pub async fn revoke_access(
    st: AppState,
    c: Caller,
    Path((_p, id, user, database)): SubSubPath,
) -> ApiResult {
    let (name, host) = user_ref(&user)?;
    check_name("database", &database, 64)?;
    let kind = v1::call::Kind::RevokeAccess(v1::RevokeAccess {
        name,
        host,
        database,
    });
    act(&st, &c, &id, kind).await
}

// ---- root ---------------------------------------------------------------------------------------

pub async fn root_show(st: AppState, c: Caller, Path((_p, id)): ItemPath) -> ApiResult {
    let r = find(&st, &c, &id).await?;
    ok(json!({"rootEnabled": r.root_enabled}))
}

pub async fn root_enable(
    st: AppState,
    c: Caller,
    Path((_p, id)): ItemPath,
    body: Bytes,
) -> ApiResult {
    let given = if body.is_empty() {
        None
    } else {
        let p = body_as::<RootBody>(&body)?.password;
        if let Some(p) = &p {
            check_password(p)?;
        }
        p
    };
    let r = ready(&st, &c, &id).await?;
    let password_sealed = match &given {
        Some(p) => sealed(&agent_key(&r)?, &seal::root_password_context(&id), p)?,
        None => vec![],
    };
    let kind = v1::call::Kind::EnableRoot(v1::EnableRoot { password_sealed });
    let (call_id, rep) = call(&st, &r, kind).await?;
    let context = seal::reply_context(&id, &call_id);
    let password = seal::open(&st.reply_secret_key, &context, &rep.sealed_secret)
        .map_err(|e| anyhow::anyhow!("opening the root password from the agent: {e}"))?;
    st.store.set_root_enabled(&r.id, true).await?;
    ok(json!({"user": {"name": "root", "password": String::from_utf8_lossy(&password)}}))
}

pub async fn root_disable(st: AppState, c: Caller, Path((_p, id)): ItemPath) -> ApiResult {
    let r = find(&st, &c, &id).await?;
    if !r.root_enabled {
        return Err(ApiError::not_found(format!(
            "Root was never enabled on instance {id}."
        )));
    }
    let r = ready(&st, &c, &id).await?;
    call(&st, &r, v1::call::Kind::DisableRoot(v1::DisableRoot {})).await?;
    st.store.set_root_enabled(&r.id, false).await?;
    super::empty(StatusCode::NO_CONTENT)
}
