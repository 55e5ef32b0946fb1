//! Quick request/reply calls: databases, users, access and root. Each reads or changes the server
//! directly (what the API shows is what the server has). Secrets arrive sealed to this agent and
//! leave sealed to the controller's reply key.

use coffer_proto::seal;
use coffer_proto::v1::{self, call::Kind, CallError, CallReply};
use coffer_strategies::{DatabaseSpec, DatastoreError, UserSpec};

use crate::Ctx;

fn fail(kind: CallError, error: impl Into<String>) -> CallReply {
    CallReply {
        ok: false,
        error: error.into(),
        error_kind: kind as i32,
        ..Default::default()
    }
}

/// Waits until this server has applied `position` (1 to 15 s); the call's failure otherwise.
async fn reach(ctx: &Ctx, position: &str, timeout_s: u32) -> Result<(), CallReply> {
    let t = std::time::Duration::from_secs(timeout_s.clamp(1, 15) as u64);
    match ctx.ds.wait_for_position(position, t).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(fail(
            CallError::Internal,
            format!("position {position} was not reached within {t:?}"),
        )),
        Err(e) => Err(from_ds(e)),
    }
}

fn from_ds(e: DatastoreError) -> CallReply {
    let kind = match &e {
        DatastoreError::Invalid(_) => CallError::Invalid,
        DatastoreError::NotFound(_) => CallError::NotFound,
        DatastoreError::Exists(_) => CallError::Exists,
        DatastoreError::NotRunning => CallError::NotRunning,
        _ => CallError::Internal,
    };
    fail(kind, e.to_string())
}

fn ok() -> CallReply {
    CallReply {
        ok: true,
        ..Default::default()
    }
}

fn host_or_any(h: &str) -> &str {
    if h.is_empty() {
        "%"
    } else {
        h
    }
}

// The error is the call's reply itself, returned to the caller at once: boxing it buys nothing.
#[allow(clippy::result_large_err)]
fn open_secret(ctx: &Ctx, context: &str, sealed: &[u8], what: &str) -> Result<String, CallReply> {
    let bytes = seal::open(&ctx.secret_key, context, sealed)
        .map_err(|e| fail(CallError::Invalid, format!("{what}: {e}")))?;
    String::from_utf8(bytes).map_err(|_| fail(CallError::Invalid, format!("{what} is not UTF-8")))
}

async fn replication_reply(ctx: &Ctx) -> CallReply {
    match ctx.ds.replication_info().await {
        Ok(st) => CallReply {
            ok: true,
            replication: Some(crate::replication::to_proto(ctx, &st)),
            ..Default::default()
        },
        Err(e) => from_ds(e),
    }
}

/// The checks of a Verify: none yet, running, or their outcome (kept until asked for).
static VERIFY: std::sync::Mutex<Option<Option<CallReply>>> = std::sync::Mutex::new(None);

/// Starts the datastore's checks (they can run for minutes: longer than a call waits) and
/// replies pending until a later call finds them done.
fn verify(ctx: &Ctx) -> CallReply {
    let mut slot = VERIFY.lock().unwrap();
    match slot.take() {
        Some(Some(done)) => return done,
        Some(None) => {
            *slot = Some(None);
        }
        None => {
            *slot = Some(None);
            let ds = ctx.ds.clone();
            tokio::spawn(async move {
                let checks = ds.verify().await;
                let inventory = ds.inventory().await;
                let reply = match (checks, inventory) {
                    (Ok(checks), Ok(inventory)) => CallReply {
                        ok: true,
                        checks: checks
                            .into_iter()
                            .map(|c| v1::Check {
                                name: c.name,
                                ok: c.ok,
                                detail: c.detail,
                            })
                            .collect(),
                        inventory,
                        ..Default::default()
                    },
                    (Err(e), _) | (_, Err(e)) => from_ds(e),
                };
                *VERIFY.lock().unwrap() = Some(Some(reply));
            });
        }
    }
    CallReply {
        ok: true,
        pending: true,
        ..Default::default()
    }
}

/// Carries out one call.
pub async fn handle(ctx: &Ctx, call_id: &str, reply_key: &[u8], kind: Kind) -> CallReply {
    if !matches!(
        kind,
        Kind::Ping(_) | Kind::Shutdown(_) | Kind::DefaultConfiguration(_)
    ) && ctx.sup.observed.borrow().status != v1::ServiceStatus::Running
    {
        return fail(CallError::NotRunning, "the database is not running");
    }
    let ds = &ctx.ds;
    let instance = ctx.cfg.instance_id.as_str();
    match kind {
        Kind::Ping(_) | Kind::Shutdown(_) => fail(CallError::Unsupported, "handled elsewhere"),
        Kind::Verify(_) => verify(ctx),
        Kind::ListDatabases(_) => match ds.list_databases().await {
            Ok(dbs) => CallReply {
                ok: true,
                databases: dbs
                    .into_iter()
                    .map(|d| v1::Database {
                        name: d.name,
                        character_set: d.character_set.unwrap_or_default(),
                        collate: d.collate.unwrap_or_default(),
                    })
                    .collect(),
                ..Default::default()
            },
            Err(e) => from_ds(e),
        },
        Kind::CreateDatabases(c) => {
            let specs: Vec<DatabaseSpec> = c
                .databases
                .iter()
                .map(|d| DatabaseSpec {
                    name: d.name.clone(),
                    character_set: Some(d.character_set.clone()).filter(|s| !s.is_empty()),
                    collate: Some(d.collate.clone()).filter(|s| !s.is_empty()),
                })
                .collect();
            for d in &specs {
                if let Err(e) = ds.validate_database_name(&d.name) {
                    return from_ds(e);
                }
            }
            for d in &specs {
                if let Err(e) = ds.create_database(d).await {
                    return from_ds(e);
                }
            }
            ok()
        }
        Kind::DeleteDatabase(d) => ds
            .delete_database(&d.name)
            .await
            .map(|_| ok())
            .unwrap_or_else(from_ds),
        Kind::ListUsers(_) => match ds.list_users().await {
            Ok(users) => CallReply {
                ok: true,
                users: users
                    .into_iter()
                    .map(|u| v1::UserInfo {
                        name: u.name,
                        host: u.host,
                        databases: u.databases,
                    })
                    .collect(),
                ..Default::default()
            },
            Err(e) => from_ds(e),
        },
        Kind::CreateUsers(c) => {
            let mut specs = vec![];
            for u in &c.users {
                if !u.password.is_empty() {
                    return fail(
                        CallError::Invalid,
                        "clear-text passwords are refused; seal them to the agent",
                    );
                }
                let host = host_or_any(&u.host);
                let context = seal::user_password_context(instance, &u.name, host);
                let password = match open_secret(ctx, &context, &u.password_sealed, "the password")
                {
                    Ok(p) => p,
                    Err(r) => return r,
                };
                let spec = UserSpec {
                    name: u.name.clone(),
                    password,
                    host: host.into(),
                    databases: u.databases.clone(),
                };
                if let Err(e) = ds.validate_user(&spec) {
                    return from_ds(e);
                }
                specs.push(spec);
            }
            for spec in &specs {
                if let Err(e) = ds.create_user(spec).await {
                    return from_ds(e);
                }
            }
            ok()
        }
        Kind::DeleteUser(d) => ds
            .delete_user(&d.name, host_or_any(&d.host))
            .await
            .map(|_| ok())
            .unwrap_or_else(from_ds),
        Kind::UpdateUser(u) => {
            let host = host_or_any(&u.host);
            let new_name = Some(u.new_name.as_str()).filter(|s| !s.is_empty());
            let new_host = Some(u.new_host.as_str()).filter(|s| !s.is_empty());
            let password = if u.new_password_sealed.is_empty() {
                None
            } else {
                let context = seal::user_password_context(
                    instance,
                    new_name.unwrap_or(&u.name),
                    new_host.unwrap_or(host),
                );
                match open_secret(ctx, &context, &u.new_password_sealed, "the new password") {
                    Ok(p) => Some(p),
                    Err(r) => return r,
                }
            };
            ds.update_user(&u.name, host, new_name, new_host, password.as_deref())
                .await
                .map(|_| ok())
                .unwrap_or_else(from_ds)
        }
        Kind::GrantAccess(g) => {
            let host = host_or_any(&g.host);
            if let Err(e) = ds.validate_user(&UserSpec {
                name: g.name.clone(),
                password: "x".into(),
                host: host.into(),
                databases: g.databases.clone(),
            }) {
                return from_ds(e);
            }
            match ds.list_users().await {
                Ok(users) if users.iter().any(|u| u.name == g.name && u.host == host) => {}
                Ok(_) => {
                    return fail(
                        CallError::NotFound,
                        format!("User {} cannot be found on the instance.", g.name),
                    )
                }
                Err(e) => return from_ds(e),
            }
            match ds.list_databases().await {
                Ok(dbs) => {
                    if let Some(missing) = g
                        .databases
                        .iter()
                        .find(|n| !dbs.iter().any(|d| &d.name == *n))
                    {
                        return fail(
                            CallError::NotFound,
                            format!("Database {missing} cannot be found on the instance."),
                        );
                    }
                }
                Err(e) => return from_ds(e),
            }
            for db in &g.databases {
                if let Err(e) = ds.grant(&g.name, host, db).await {
                    return from_ds(e);
                }
            }
            ok()
        }
        Kind::RevokeAccess(r) => ds
            .revoke(&r.name, host_or_any(&r.host), &r.database)
            .await
            .map(|_| ok())
            .unwrap_or_else(from_ds),
        Kind::EnableRoot(e) => {
            if reply_key.len() != 32 {
                return fail(
                    CallError::Invalid,
                    "no reply key: the root password would travel in clear",
                );
            }
            let password = if e.password_sealed.is_empty() {
                uuid::Uuid::new_v4().simple().to_string()
            } else {
                match open_secret(
                    ctx,
                    &seal::root_password_context(instance),
                    &e.password_sealed,
                    "the root password",
                ) {
                    Ok(p) => p,
                    Err(r) => return r,
                }
            };
            if let Err(e) = ds.enable_root(&password).await {
                return from_ds(e);
            }
            match ctx.seal_reply(call_id, reply_key, password.as_bytes()) {
                Ok(sealed) => CallReply {
                    ok: true,
                    sealed_secret: sealed,
                    ..Default::default()
                },
                Err(e) => fail(
                    CallError::Internal,
                    format!("sealing the root password: {e}"),
                ),
            }
        }
        Kind::DisableRoot(_) => ds
            .disable_root()
            .await
            .map(|_| ok())
            .unwrap_or_else(from_ds),
        Kind::CreateReplicationUser(u) => {
            let pw = match open_secret(
                ctx,
                &seal::replication_password_context(instance),
                &u.password_sealed,
                "the replication password",
            ) {
                Ok(p) => p,
                Err(r) => return r,
            };
            match ds.create_replication_user(&u.user, &pw).await {
                Ok(()) => replication_reply(ctx).await,
                Err(e) => from_ds(e),
            }
        }
        Kind::ReplicationStatus(_) => replication_reply(ctx).await,
        Kind::SetReadOnly(r) => {
            let done = async {
                let applied = ds.set_read_only_persistent(r.read_only).await?;
                if r.kill_connections {
                    ds.kill_tenant_connections().await?;
                }
                Ok::<_, DatastoreError>(applied)
            };
            match done.await {
                Ok(applied) => match finish(ctx, applied).await {
                    Ok(()) => {
                        crate::replication::hold_read_only(ctx, r.read_only);
                        replication_reply(ctx).await
                    }
                    Err(e) => fail(CallError::Internal, e),
                },
                Err(e) => from_ds(e),
            }
        }
        Kind::WaitForPosition(w) => match reach(ctx, &w.position, w.timeout_s).await {
            Ok(()) => replication_reply(ctx).await,
            Err(failed) => failed,
        },
        Kind::AttachReplica(a) => {
            let Some(src) = a.source else {
                return fail(CallError::Invalid, "no source given");
            };
            let src = match crate::replication::source_of(ctx, &src) {
                Ok(s) => s,
                Err(e) => return fail(CallError::Invalid, e),
            };
            let _ = std::fs::remove_file(ctx.state.root().join("fenced"));
            crate::replication::hold_read_only(ctx, false);
            crate::replication::set_role(ctx, "replica");
            match ds.attach_replica(&src).await {
                Ok(applied) => match finish(ctx, applied).await {
                    Ok(()) => replication_reply(ctx).await,
                    Err(e) => fail(CallError::Internal, e),
                },
                Err(e) => from_ds(e),
            }
        }
        Kind::DetachReplica(d) => {
            let replica = crate::replication::role(ctx) == "replica";
            if replica && !d.catch_up_to.is_empty() {
                if let Err(failed) = reach(ctx, &d.catch_up_to, d.timeout_s).await {
                    return failed;
                }
            }
            match ds.detach_replica().await {
                Ok(()) => {
                    let _ = std::fs::remove_file(ctx.state.root().join("fenced"));
                    crate::replication::hold_read_only(ctx, false);
                    crate::replication::set_role(ctx, "");
                    replication_reply(ctx).await
                }
                Err(e) => from_ds(e),
            }
        }
        Kind::DrainRelayLog(d) => {
            let t = std::time::Duration::from_secs(d.timeout_s.clamp(1, 15) as u64);
            match ds.drain_relay_log(t).await {
                Ok(()) => replication_reply(ctx).await,
                Err(e) => from_ds(e),
            }
        }
        Kind::ApplyModules(a) => CallReply {
            ok: true,
            modules: crate::modules::apply(ctx, a.modules),
            ..Default::default()
        },
        Kind::ListModules(_) => CallReply {
            ok: true,
            modules: crate::modules::list(ctx),
            ..Default::default()
        },
        Kind::RemoveModule(r) => match crate::modules::remove(ctx, &r.id) {
            Ok(m) => CallReply {
                ok: true,
                modules: vec![m],
                ..Default::default()
            },
            Err((kind, e)) => fail(kind, e),
        },
        Kind::ListLogs(_) => CallReply {
            ok: true,
            logs: crate::logs::list(ctx),
            ..Default::default()
        },
        Kind::LogAction(a) => match crate::logs::action(ctx, &a.name, &a.action).await {
            Ok(info) => CallReply {
                ok: true,
                logs: vec![info],
                ..Default::default()
            },
            Err((kind, e)) => fail(kind, e),
        },
        Kind::DefaultConfiguration(_) => match ds.default_configuration() {
            Ok(values) => CallReply {
                ok: true,
                configuration: values
                    .into_iter()
                    .map(|(name, value)| v1::Override { name, value })
                    .collect(),
                ..Default::default()
            },
            Err(e) => from_ds(e),
        },
    }
}

/// Finishes a change the datastore wrote for the next start: restarts the server.
async fn finish(ctx: &Ctx, applied: coffer_strategies::datastore::Applied) -> Result<(), String> {
    if applied == coffer_strategies::datastore::Applied::Restart {
        tracing::info!("restarting the database server to apply its new replication role");
        ctx.sup
            .call(crate::supervisor::Cmd::Restart)
            .await
            .map_err(|e| format!("restarting the server for its new role: {e}"))?;
    }
    Ok(())
}
