//! Databases, users, access and root of an instance (trove-api.md §7–9), carried out by the
//! instance's agent through request/reply calls. Lists are read from the server every time.
//! Passwords go to the agent sealed to its key; root's password comes back sealed to ours.

use axum::body::Bytes;
use axum::extract::{Path, Query};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use coffer_proto::{seal, v1};
use serde_json::{json, Value};

use super::instances::find;
use super::parse::{
    self, body_as, check_host, check_name, check_password, some_of, DatabaseReq, NameRef, UserReq,
};
use super::{accepted, ok, with_next, ApiError, ApiResult, AppState, Caller, Page};
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
    let dbs = some_of("databases", body_as::<Databases>(&body)?.databases)?
        .into_iter()
        .map(|d| parse::database(d, "databases"))
        .collect::<Result<Vec<_>, _>>()?;
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

pub async fn create_users(
    st: AppState,
    c: Caller,
    Path((_p, id)): Path<(String, String)>,
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
    let mut changes = vec![];
    for u in some_of("users", body_as::<Users>(&body)?.users)? {
        let u = parse::user(u)?;
        changes.push((u.name, u.host, u.password));
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
    let databases: Vec<String> = some_of("databases", body_as::<DatabaseNames>(&body)?.databases)?
        .into_iter()
        .map(|d| check_name("database", &d.name, 64).map(|_| d.name))
        .collect::<Result<_, _>>()?;
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
