//! The Coffer controller.
//!
//! Background: a thin, Trove-compatible control plane. It serves the OpenStack Database API v1.0
//! ([`api`]), keeps state in SQLite ([`store`]), places agents through a [`provisioner`], sends
//! intents to agents over JetStream through a transactional outbox and derives instance status
//! from heartbeats and events ([`bus`], [`status`]).
//!
//! Invariants: no SQL of any datastore and no datastore names in code (the datastore a version runs
//! is data: its `manager`); the controller never touches database files or processes.

pub mod agents;
pub mod api;
pub mod bus;
pub mod config;
pub mod error;
pub mod failpoint;
pub mod leases;
pub mod nats_auth;
pub mod objects;
pub mod ops;
pub mod provisioner;
pub mod status;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod workflow;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use config::ControllerConfig;
use nats_auth::Authority;

/// Shared by the HTTP handlers and the background loops.
pub struct App {
    pub cfg: ControllerConfig,
    /// This controller's name among those sharing the store ([`ControllerConfig::controller_id`]).
    pub id: String,
    /// Until when this controller may act as the holder of the `leader` lease: it alone
    /// publishes the outbox and runs the timers ([`leases`]).
    pub leading_until: Mutex<Option<Instant>>,
    /// Workflows this controller is driving.
    pub driving: Mutex<HashSet<String>>,
    pub store: store::Store,
    pub tokens: config::Tokens,
    pub client: async_nats::Client,
    pub js: async_nats::jetstream::Context,
    pub live: Mutex<HashMap<String, bus::Live>>,
    /// Controller start (monotonic): agents get a full expiry period after it to report in.
    pub started: Instant,
    pub outbox_wake: Notify,
    /// Woken when an agent event was handled: workflows waiting on one look again.
    pub workflow_wake: Notify,
    pub provisioner: Box<dyn provisioner::Provisioner>,
    pub deleting: Mutex<HashSet<String>>,
    /// Instances whose storage is known to exist (see [`objects::ensure`]).
    pub storage_ready: Mutex<HashSet<String>>,
    /// Issues and revokes per-agent NATS identities (when `nats_auth` is configured).
    pub authority: Option<Authority>,
    /// The controller's X25519 key pair: secrets in agents' replies are sealed to it.
    pub reply_secret_key: Vec<u8>,
    pub reply_public_key: Vec<u8>,
    /// Signs restore drill reports ([`nats_auth::drill_key`]).
    pub drill_key: nkeys::KeyPair,
    /// This process's counters of the control plane (API, intents, workflows).
    pub telemetry: telemetry::Telemetry,
}

impl App {
    /// Whether this controller leads now ([`leases::renew`]).
    pub fn leads(&self) -> bool {
        self.leading_until
            .lock()
            .unwrap()
            .is_some_and(|t| Instant::now() < t)
    }

    /// An intent was queued: the leader's publisher looks now, whichever controller leads.
    pub fn wake_outbox(&self) {
        self.outbox_wake.notify_one();
        self.tell_peers("outbox");
    }

    /// An agent event was handled: workflows waiting on one look again, on every controller.
    pub fn wake_workflows(&self) {
        self.workflow_wake.notify_waiters();
        self.tell_peers("workflows");
    }

    /// Tells the other controllers (the payload names this one, which ignores its own).
    fn tell_peers(&self, what: &str) {
        let (client, subject) = (
            self.client.clone(),
            coffer_proto::subjects::controller_wake(what),
        );
        let me = bytes::Bytes::from(self.id.clone());
        tokio::spawn(async move {
            let _ = client.publish(subject, me).await;
        });
    }

    /// Pushes the account JWT with every revocation in the store to the NATS servers (nothing
    /// without a NATS authority).
    pub async fn push_account(&self) -> anyhow::Result<()> {
        let Some(a) = &self.authority else {
            return Ok(());
        };
        let rev = self.store.revocations().await?;
        a.push_account(&self.cfg.nats_url, self.cfg.nats_ca_file.as_deref(), &rev)
            .await
    }

    /// Whether the instance's last heartbeat is within the expiry.
    pub fn fresh(&self, id: &str) -> bool {
        self.fresh_of(self.live.lock().unwrap().get(id))
    }

    /// [`App::fresh`] of what this controller remembers of an agent (None: nothing yet).
    pub fn fresh_of(&self, live: Option<&bus::Live>) -> bool {
        let expiry = Duration::from_secs(self.cfg.heartbeat_expiry_s);
        match live {
            Some(l) => l.last_seen.elapsed() < expiry,
            None => self.started.elapsed() < expiry,
        }
    }
}

/// Sets `path`'s mode (the controller's own files: no access for group or others).
fn private(path: &std::path::Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("making {} private", path.display()))
}

/// Runs the controller until `shutdown` fires.
pub async fn run(cfg: ControllerConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating {}", cfg.data_dir.display()))?;
    // The store, the keys and the tokens' users are the controller's alone: nothing a
    // database server runs (as another user, or through a tenant's FILE/COPY) may read them.
    private(&cfg.data_dir, 0o700)?;
    let store = store::Store::connect(&cfg.store_url()?).await?;
    for f in ["coffer.db", "coffer.db-wal", "coffer.db-shm"] {
        let p = cfg.data_dir.join(f);
        if p.exists() {
            private(&p, 0o600)?;
        }
    }
    let tokens = config::load_tokens(&cfg.token_file)?;
    let (reply_secret_key, reply_public_key) = nats_auth::controller_key(&cfg.data_dir)?;
    let drill_key = nats_auth::drill_key(&cfg.data_dir)?;
    let bucket = cfg.backup.as_ref().and_then(|b| b.storage.nats_bucket());
    let authority = cfg.nats_auth.as_ref().map(Authority::load_or_create);
    let authority = authority
        .transpose()?
        .map(|a| a.with_backup_bucket(bucket.map(Into::into)));
    let mut opts = match &cfg.nats_creds {
        Some(p) => async_nats::ConnectOptions::with_credentials_file(p.clone())
            .await
            .with_context(|| format!("reading NATS credentials {}", p.display()))?,
        None => async_nats::ConnectOptions::new(),
    };
    if let Some(ca) = &cfg.nats_ca_file {
        opts = opts.add_root_certificates(ca.clone()).require_tls(true);
    }
    let client = opts
        .name("coffer-controller")
        .retry_on_initial_connect()
        .subscription_capacity(65536)
        .connect(coffer_common::nats::servers(&cfg.nats_url)?)
        .await
        .with_context(|| format!("connecting to NATS at {}", cfg.nats_url))?;
    let js = async_nats::jetstream::new(client.clone());
    // Streams are needed before anything else; wait for NATS if it is not up yet.
    let mut backoff =
        coffer_common::retry::backoff(Duration::from_millis(100), Duration::from_secs(3));
    while let Err(e) = bus::ensure_streams(&js, cfg.nats_replicas as usize).await {
        warn!(error = %format!("{e:#}"), "JetStream not ready; retrying");
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(coffer_common::retry::next(&mut backoff)) => {}
        }
    }
    // NATS authorization is always on: a server that lets anyone in would let a tenant's agent
    // act as any other agent or as the controller.
    if !client.server_info().auth_required {
        anyhow::bail!(
            "the NATS server at {} does not require authentication; run \
             `coffer-controller manage nats-setup` and include the server-auth.conf it writes \
             in the server's configuration (Coffer never runs with NATS open)",
            cfg.nats_url
        );
    }
    let local_backup_root = match cfg.backup.as_ref().map(|b| &b.storage) {
        Some(coffer_common::storage::StorageKind::Local { root }) => Some(root.clone()),
        _ => None,
    };
    let provisioner = cfg.provisioner.build(local_backup_root)?;
    let app = Arc::new(App {
        id: cfg.controller_id(),
        leading_until: Mutex::new(None),
        driving: Mutex::new(HashSet::new()),
        cfg,
        store,
        tokens,
        client,
        js,
        live: Mutex::new(HashMap::new()),
        started: Instant::now(),
        outbox_wake: Notify::new(),
        workflow_wake: Notify::new(),
        provisioner,
        deleting: Mutex::new(HashSet::new()),
        storage_ready: Mutex::new(HashSet::new()),
        authority,
        reply_secret_key,
        reply_public_key,
        telemetry: telemetry::Telemetry::default(),
        drill_key,
    });
    // The server may have restarted from an older preload: make sure it has every revocation
    // (those an older controller kept in its authority directory move into the store first).
    if let Some(a) = &app.authority {
        let pushed = async {
            let legacy = a.legacy_revocations();
            for (key, at) in &legacy {
                app.store.add_revocation(key, *at).await?;
            }
            if !legacy.is_empty() {
                a.legacy_revocations_moved()?;
            }
            app.push_account().await
        };
        if let Err(e) = pushed.await {
            warn!(error = %format!("{e:#}"), "could not push the account JWT");
        }
    }

    // This controller's leases first: alone on its store, it leads at once.
    let leads = leases::renew(&app).await;

    // Creates cut short by this controller's previous run (or by a controller that is gone)
    // are undone before anything else.
    workflow::undo_unfinished_creates(&app).await?;

    // Adopt or respawn the agent of every live instance (the leader's duty: it runs the timers
    // that respawn them too).
    for inst in app.store.live_instances().await? {
        if !leads
            || inst.task == status::Task::Deleting
            || inst.placement == crate::status::PlacedBy::Enrolled
            || !inst.has_agent()
        {
            continue;
        }
        if let Err(e) = app.provisioner.ensure(&inst.id).await {
            warn!(instance = %inst.id, error = %format!("{e:#}"), "could not ensure agent");
        }
    }

    // Operations a previous controller left half done carry on from their last step.
    workflow::adopt(&app).await;

    // The API listens once the controller is ready: agents ensured, workflows resumed (a
    // client that reaches it sees a controller that has taken over).
    let listener = tokio::net::TcpListener::bind(&app.cfg.listen)
        .await
        .with_context(|| format!("binding the API to {}", app.cfg.listen))?;

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(bus::outbox_loop(app.clone()));
    tasks.spawn(leases::leases_loop(app.clone()));
    tasks.spawn(bus::liveness_loop(app.clone()));
    tasks.spawn(leases::wake_loop(app.clone()));
    tasks.spawn(bus::event_loop(app.clone()));
    tasks.spawn(bus::timers_loop(app.clone()));
    let hb = app.clone();
    tasks.spawn(async move {
        if let Err(e) = bus::heartbeat_loop(hb).await {
            warn!(error = %format!("{e:#}"), "heartbeat responder stopped");
        }
    });
    info!(listen = %app.cfg.listen, "coffer-controller serving the Trove API");
    let router = api::router(app.clone());
    let s = shutdown.clone();
    match &app.cfg.tls {
        Some(t) => {
            let tls = tls::TlsListener::new(listener, tls::acceptor(t)?)?;
            axum::serve(tls, router)
                .with_graceful_shutdown(async move { s.cancelled().await })
                .await
                .context("serving HTTPS")?
        }
        None => axum::serve(listener, router)
            .with_graceful_shutdown(async move { s.cancelled().await })
            .await
            .context("serving HTTP")?,
    }
    tasks.shutdown().await;
    leases::step_down(&app).await;
    if app.cfg.stop_agents_on_exit {
        stop_agents(&app).await;
    }
    let _ = app.client.flush().await;
    info!("coffer-controller stopped; agents and databases keep running");
    Ok(())
}

/// Asks every agent to stop its database cleanly and exit; waits for all of them.
async fn stop_agents(app: &App) {
    use coffer_proto::{subjects, v1, Message};
    let Ok(instances) = app.store.live_instances().await else {
        return;
    };
    let calls = instances.iter().map(|inst| async move {
        let env = coffer_proto::envelope(
            uuid::Uuid::new_v4().to_string(),
            &inst.id,
            v1::envelope::Body::Call(v1::Call {
                reply_key: app.reply_public_key.clone(),
                kind: Some(v1::call::Kind::Shutdown(v1::Shutdown {})),
            }),
        );
        let req = app
            .client
            .request(subjects::call(&inst.id), env.encode_to_vec().into());
        match tokio::time::timeout(Duration::from_secs(120), req).await {
            Ok(Ok(_)) => {
                // Record it now: the agent's own status event may not get out before it exits.
                let _ = app
                    .store
                    .set_service_status(&inst.id, "shutdown", None)
                    .await;
                info!(instance = %inst.id, "database stopped and agent exited");
            }
            Ok(Err(e)) => {
                warn!(instance = %inst.id, error = %e, "agent did not answer the shutdown call")
            }
            Err(_) => warn!(instance = %inst.id, "agent shutdown timed out"),
        }
    });
    futures::future::join_all(calls).await;
}
