//! Several controllers on one store: which one does what. Every controller serves the API,
//! answers heartbeats (a NATS queue group: each heartbeat reaches one) and also sees every
//! heartbeat to keep its own view of which agents are alive (`bus::liveness_loop`), and takes
//! agent events from one shared durable consumer. The holder of the `leader` lease alone
//! publishes the outbox and runs the timers; a workflow is driven by the controller that claimed
//! it (`Store::claim_workflow`, renewed at every step). A controller that dies loses the
//! leadership within [`LEASE_MS`] and its workflows within [`WORKFLOW_CLAIM_MS`]; another takes
//! them over ([`renew`], [`crate::workflow::adopt`]). One controller alone takes everything at
//! once: the leases it finds are its own (same `controller_id`) or none.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::App;

/// The lease of the controller that publishes the outbox and runs the timers.
pub const LEADER: &str = "leader";
/// How long a lease lasts without renewal.
pub const LEASE_MS: i64 = 10_000;
/// How often a controller renews its leases and looks for workflows to adopt.
pub const RENEW: Duration = Duration::from_secs(2);
/// How long a workflow's claim lasts without renewal: longer than its longest step (an agent
/// call is bounded at 20 s).
pub const WORKFLOW_CLAIM_MS: i64 = 30_000;

/// The lease a controller holds on its own name while it lives.
pub fn alive(id: &str) -> String {
    format!("controller:{id}")
}

/// Takes or renews this controller's leases; returns whether it leads. It counts itself leader
/// only until the lease would lapse from when the renewal started, so a controller that stalls
/// stops acting as leader before another may take over.
pub async fn renew(app: &App) -> bool {
    let started = Instant::now();
    if let Err(e) = app
        .store
        .take_lease(&alive(&app.id), &app.id, LEASE_MS)
        .await
    {
        warn!(error = %format!("{e:#}"), "renewing this controller's lease failed");
    }
    let lead = match app.store.take_lease(LEADER, &app.id, LEASE_MS).await {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %format!("{e:#}"), "renewing the leader lease failed");
            false
        }
    };
    let until = lead.then(|| started + Duration::from_millis(LEASE_MS as u64) - RENEW);
    let was = std::mem::replace(&mut *app.leading_until.lock().unwrap(), until).is_some();
    if lead && !was {
        info!(controller = %app.id, "this controller leads: it publishes intents and runs the timers");
        app.outbox_wake.notify_one();
    } else if !lead && was {
        info!(controller = %app.id, "this controller no longer leads");
    }
    lead
}

/// Renews the leases and adopts orphaned workflows, every [`RENEW`].
pub async fn leases_loop(app: Arc<App>) {
    loop {
        tokio::time::sleep(RENEW).await;
        renew(&app).await;
        crate::workflow::adopt(&app).await;
    }
}

/// Gives the leases up (a clean stop): another controller takes over without waiting.
pub async fn step_down(app: &App) {
    *app.leading_until.lock().unwrap() = None;
    for name in [LEADER.to_string(), alive(&app.id)] {
        let _ = app.store.drop_lease(&name, &app.id).await;
    }
}

/// Wakes this controller's outbox publisher and workflows when another controller says so
/// ([`App::wake_outbox`], [`App::wake_workflows`]).
pub async fn wake_loop(app: Arc<App>) {
    use futures::StreamExt;
    loop {
        match app
            .client
            .subscribe(coffer_proto::subjects::controller_wake_all())
            .await
        {
            Ok(mut sub) => {
                while let Some(msg) = sub.next().await {
                    // Its own wake-ups it has acted on already.
                    if msg.payload == app.id.as_bytes() {
                        continue;
                    }
                    if msg.subject.ends_with(".outbox") {
                        app.outbox_wake.notify_one();
                    } else {
                        app.workflow_wake.notify_waiters();
                    }
                }
            }
            Err(e) => warn!(error = %e, "subscribing to the controllers' wake-ups failed"),
        }
        tokio::time::sleep(RENEW).await;
    }
}
