//! Replication on the agent: the calls the controller orchestrates replicas, switchover and
//! failover with, the replication state heartbeats carry, and fencing: a source whose lease
//! has run out makes its server read-only by itself (tenant sessions ended first), so two
//! writable sources never exist after an eject.

use std::sync::Arc;
use std::time::{Duration, Instant};

use coffer_proto::seal;
use coffer_proto::v1;
use coffer_strategies::datastore::{ReplicationSource, ReplicationState};
use tracing::{info, warn};

use crate::Ctx;

/// The heartbeat's view of replication (None when the server cannot be asked).
pub async fn info(ctx: &Ctx) -> Option<v1::ReplicationInfo> {
    if ctx.sup.observed.borrow().status != v1::ServiceStatus::Running {
        return None;
    }
    let st = ctx.ds.replication_info().await.ok()?;
    Some(to_proto(ctx, &st))
}

pub fn to_proto(ctx: &Ctx, st: &ReplicationState) -> v1::ReplicationInfo {
    let role = if fenced(ctx) {
        "fenced"
    } else if st.replica {
        "replica"
    } else {
        "source"
    };
    st.to_info(role)
}

/// Opens a `ReplicaOf` sealed for this agent into what the datastore takes.
pub fn source_of(ctx: &Ctx, r: &v1::ReplicaOf) -> Result<ReplicationSource, String> {
    let pw = seal::open(
        &ctx.secret_key,
        &seal::replication_password_context(&ctx.cfg.instance_id),
        &r.password_sealed,
    )
    .map_err(|e| format!("the replication password: {e}"))?;
    let password =
        String::from_utf8(pw).map_err(|_| "the replication password is not UTF-8".to_string())?;
    ReplicationSource::from_spec(r, password)
}

fn role_path(ctx: &Ctx) -> std::path::PathBuf {
    ctx.state.root().join("role")
}
fn fence_path(ctx: &Ctx) -> std::path::PathBuf {
    ctx.state.root().join("fenced")
}

/// The role the controller last gave this instance ("source", "replica" or "").
pub fn role(ctx: &Ctx) -> String {
    std::fs::read_to_string(role_path(ctx)).unwrap_or_default()
}

/// Records a role change made by a call (the next heartbeat reply confirms it).
pub fn set_role(ctx: &Ctx, r: &str) {
    if let Err(e) = std::fs::write(role_path(ctx), r) {
        warn!(error = %e, "could not record the replication role");
    }
}

pub fn fenced(ctx: &Ctx) -> bool {
    fence_path(ctx).exists()
}

fn held_path(ctx: &Ctx) -> std::path::PathBuf {
    ctx.state.root().join("read_only_held")
}

/// Records that the controller made this server read-only by a call (a switchover's fence), or
/// released it: a lease fence lifted later leaves such a server read-only, as the controller
/// asked, until the controller itself releases it (roll-back, promotion or repoint).
pub fn hold_read_only(ctx: &Ctx, held: bool) {
    let r = if held {
        std::fs::write(held_path(ctx), b"")
    } else {
        match std::fs::remove_file(held_path(ctx)) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    };
    if let Err(e) = r {
        warn!(error = %e, "could not record the controller's read-only hold");
    }
}

fn read_only_held(ctx: &Ctx) -> bool {
    held_path(ctx).exists()
}

/// Takes in the controller's view from a heartbeat reply.
pub async fn on_reply(ctx: &Arc<Ctx>, role_now: &str, fence: bool) {
    if role(ctx) != role_now {
        if let Err(e) = std::fs::write(role_path(ctx), role_now) {
            warn!(error = %e, "could not record the replication role");
        }
    }
    if fence && !fenced(ctx) {
        do_fence(ctx, "the controller says this source was ejected").await;
    } else if !fence && fenced(ctx) && role_now != "replica" {
        // Leased again and not ejected: the partition healed before anyone took over. A server
        // the controller itself made read-only (a switchover under way, its controller
        // restarted) stays so: writes taken now would be lost when the switchover completes.
        if read_only_held(ctx) {
            let _ = std::fs::remove_file(fence_path(ctx));
            info!("lease renewed: fence lifted; read-only stays, as the controller asked");
        } else if ctx.sup.observed.borrow().status == v1::ServiceStatus::Running {
            match ctx.ds.set_read_only_persistent(false).await {
                Ok(_) => {
                    let _ = std::fs::remove_file(fence_path(ctx));
                    info!("lease renewed and not ejected: fence lifted, writable again");
                }
                Err(e) => warn!(error = %e, "could not lift the fence"),
            }
        }
    }
}

/// Fences the server: read-only for every start (role file first), tenant sessions ended,
/// `read_only` live; if that does not finish in time, the server is shut down.
async fn do_fence(ctx: &Arc<Ctx>, why: &str) {
    warn!(reason = why, "fencing the database (read-only)");
    let _ = std::fs::write(fence_path(ctx), why);
    use coffer_strategies::datastore::Applied;
    let ds = ctx.ds.clone();
    let work = async move {
        // Read-only first (no new writes), then end the sessions already open (their open
        // transactions cannot commit).
        let applied = ds.set_read_only_persistent(true).await?;
        if applied == Applied::Live {
            ds.kill_tenant_connections().await?;
        }
        Ok::<Applied, coffer_strategies::DatastoreError>(applied)
    };
    let why = match tokio::time::timeout(Duration::from_millis(coffer_proto::FENCE_BOUND_MS), work)
        .await
    {
        Ok(Ok(Applied::Live)) => {
            info!("fenced: the database is read-only");
            return;
        }
        // Read-only only by starting so (a datastore whose replicas start as standbys): the restart stops the
        // server first, which ends every session and every write.
        Ok(Ok(Applied::Restart)) => match ctx.sup.call(crate::supervisor::Cmd::Restart).await {
            Ok(()) => {
                info!("fenced: the database restarted read-only");
                return;
            }
            Err(e) => e,
        },
        Ok(Err(e)) => e.to_string(),
        Err(_) => "timed out".into(),
    };
    warn!(error = %why, "could not fence in time; shutting the database down");
    let _ = ctx.sup.call(crate::supervisor::Cmd::Stop).await;
}

/// Watches the lease: a source (in the controller's last word) whose lease has run out fences
/// itself, well before the controller's heartbeat expiry lets anyone eject it.
pub async fn watchdog(ctx: Arc<Ctx>) {
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(coffer_proto::FENCE_WATCH_MS));
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if role(&ctx) != "source" || fenced(&ctx) {
            continue;
        }
        // The lease the controller grants (until the first reply: three heartbeat periods).
        let lease = match ctx.lease_ms.load(std::sync::atomic::Ordering::Relaxed) {
            0 => Duration::from_millis(ctx.cfg.heartbeat_interval_ms * 3),
            ms => Duration::from_millis(ms),
        };
        if ctx.sup.observed.borrow().status != v1::ServiceStatus::Running {
            continue;
        }
        let age = ctx
            .lease_renewed
            .lock()
            .ok()
            .and_then(|l| *l)
            .map(|t| t.elapsed())
            .unwrap_or_else(|| started.elapsed());
        if age > lease {
            do_fence(
                &ctx,
                &format!("no lease from the controller for {} ms", age.as_millis()),
            )
            .await;
        }
    }
}
