//! The Coffer guest agent.
//!
//! Background: one agent runs beside one database (in a VM, on a host, or as a local process in the
//! embedded setup). It supervises the database process and carries out the controller's intents,
//! which arrive through a JetStream durable pull consumer; it reports heartbeats (core
//! request/reply, whose reply renews its lease) and events (JetStream).
//!
//! Entry point: [`run`]. Runnables, each stopped by the shared cancellation token: the
//! [`supervisor`], the intent consumer ([`intents`]), the [`heartbeat`] loop and the call responder.
//!
//! Invariant: no datastore-specific name or query language here; everything about the database
//! goes through `coffer_strategies::Datastore`.

pub mod archive;
pub mod backups;
pub mod calls;
pub mod config;
pub mod configure;
pub mod enrol;
pub mod heartbeat;
pub mod intents;
pub mod logs;
pub mod modules;
pub mod replication;
pub mod state;
pub mod supervisor;

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use coffer_proto::{subjects, v1, Message};
use coffer_strategies::{Datastore, Layout};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use config::AgentConfig;

/// Shared by the runnables.
pub struct Ctx {
    pub cfg: AgentConfig,
    pub state: Arc<state::StateDir>,
    pub ds: Arc<dyn Datastore>,
    pub sup: supervisor::Handle,
    pub client: async_nats::Client,
    pub js: async_nats::jetstream::Context,
    /// Sequence number of heartbeats and status events.
    pub seq: AtomicU64,
    /// Random per process start.
    pub boot_id: String,
    /// The agent's X25519 key pair: secrets in intents are sealed to `public_key`.
    pub secret_key: Vec<u8>,
    pub public_key: Vec<u8>,
    /// When the lease was last renewed (monotonic clock).
    pub lease_renewed: Mutex<Option<Instant>>,
    /// The lease length the controller last granted (ms; 0 until the first reply).
    pub lease_ms: AtomicU64,
    /// What the last heartbeat learnt from the server, sent again when the server is slow to
    /// answer, so heartbeats (and the lease) keep their pace.
    pub hb_cache: Mutex<heartbeat::Cache>,
    /// The continuous archive as the last tick left it (None: not archiving).
    pub archive: Mutex<Option<v1::ArchiveInfo>>,
    pub shutdown: CancellationToken,
}

impl Ctx {
    /// Seals a secret answer (e.g. a generated password) to the controller's reply key of call
    /// `call_id`: the reply carries it as `CallReply.sealed_secret`, never in clear.
    pub fn seal_reply(
        &self,
        call_id: &str,
        reply_key: &[u8],
        secret: &[u8],
    ) -> Result<Vec<u8>, String> {
        let context = coffer_proto::seal::reply_context(&self.cfg.instance_id, call_id);
        coffer_proto::seal::seal(reply_key, &context, secret).map_err(|e| e.to_string())
    }

    /// Publishes an event on the event stream, retrying until JetStream acknowledges it (or the
    /// agent shuts down). `msg_id` makes redelivered publishes harmless.
    pub async fn publish_event(&self, msg_id: String, event: v1::Event) {
        let env = coffer_proto::envelope(
            msg_id.clone(),
            &self.cfg.instance_id,
            v1::envelope::Body::Event(event),
        );
        let payload: bytes::Bytes = env.encode_to_vec().into();
        let subject = subjects::event(&self.cfg.instance_id);
        let mut backoff =
            coffer_common::retry::backoff(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let publish = async_nats::jetstream::message::PublishMessage::build()
                .payload(payload.clone())
                .message_id(msg_id.as_str());
            let r = async {
                let ack = self
                    .js
                    .send_publish(subject.clone(), publish)
                    .await
                    .map_err(|e| e.to_string())?;
                ack.await.map_err(|e| e.to_string())
            }
            .await;
            match r {
                Ok(_) => return,
                Err(e) => {
                    warn!(error = %e, "event publish failed; retrying");
                    tokio::select! {
                        _ = self.shutdown.cancelled() => return,
                        _ = tokio::time::sleep(coffer_common::retry::next(&mut backoff)) => {}
                    }
                }
            }
        }
    }
}

/// Runs the agent until `shutdown` fires or a runnable fails. The database is left running.
pub async fn run(cfg: AgentConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let state = Arc::new(state::StateDir::open(&cfg.state_dir)?);
    let (secret_key, public_key) = state.keypair()?;
    let layout = Layout {
        root: state.datastore_root(cfg.datastore.name()),
        bind_address: cfg.listen.bind_address.clone(),
        port: cfg.listen.port,
    };
    let ds: Arc<dyn Datastore> = Arc::from(cfg.datastore.build(layout));
    let mut opts = match &cfg.nats_creds {
        Some(p) => async_nats::ConnectOptions::with_credentials_file(p.clone())
            .await
            .with_context(|| format!("reading NATS credentials {}", p.display()))?,
        None => async_nats::ConnectOptions::new(),
    };
    // Replies come to this agent's own inbox prefix: its identity may not read any other.
    opts = opts.custom_inbox_prefix(coffer_proto::subjects::agent_inbox_prefix(&cfg.instance_id));
    if let Some(ca) = &cfg.nats_ca_file {
        opts = opts.add_root_certificates(ca.clone()).require_tls(true);
    }
    let client = opts
        .name(format!("coffer-agent {}", cfg.instance_id))
        .retry_on_initial_connect()
        .subscription_capacity(4096)
        .connect(coffer_common::nats::servers(&cfg.nats_url)?)
        .await
        .with_context(|| format!("connecting to NATS at {}", cfg.nats_url))?;
    let js = async_nats::jetstream::new(client.clone());
    let (sup, sup_task) = supervisor::spawn(
        ds.clone(),
        state.clone(),
        Duration::from_secs(cfg.stop_timeout_s),
        shutdown.child_token(),
    );
    let ctx = Arc::new(Ctx {
        cfg,
        state,
        ds,
        sup,
        client,
        js,
        seq: AtomicU64::new(0),
        boot_id: uuid::Uuid::new_v4().simple().to_string(),
        secret_key,
        public_key,
        lease_renewed: Mutex::new(None),
        lease_ms: AtomicU64::new(0),
        hb_cache: Mutex::new(Default::default()),
        archive: Mutex::new(None),
        shutdown: shutdown.clone(),
    });
    info!(instance = %ctx.cfg.instance_id, "coffer-agent started");

    let mut set = tokio::task::JoinSet::new();
    set.spawn(heartbeat::run(ctx.clone()));
    set.spawn({
        let c = ctx.clone();
        async move {
            replication::watchdog(c).await;
            Ok(())
        }
    });
    set.spawn({
        let c = ctx.clone();
        async move {
            logs::watch(c.clone()).await;
            // Without a watcher the sizes are read on demand: keep the set running.
            c.shutdown.cancelled().await;
            Ok(())
        }
    });
    set.spawn({
        let c = ctx.clone();
        async move {
            archive::run(c).await;
            Ok(())
        }
    });
    set.spawn(intents::run(ctx.clone()));
    set.spawn(calls(ctx.clone()));
    let result = tokio::select! {
        _ = shutdown.cancelled() => Ok(()),
        r = set.join_next() => match r {
            Some(Ok(Err(e))) => Err(e),
            Some(Err(e)) => Err(anyhow::anyhow!("runnable panicked: {e}")),
            _ => Ok(()),
        },
    };
    shutdown.cancel();
    set.shutdown().await;
    let _ = sup_task.await;
    let _ = ctx.client.flush().await;
    info!("coffer-agent stopped; the database keeps running");
    result
}

fn reply_to(msg: &async_nats::Message) -> async_nats::Subject {
    msg.reply.clone().unwrap_or_else(|| "_INBOX.none".into())
}

/// Answers quick request/reply calls.
async fn calls(ctx: Arc<Ctx>) -> anyhow::Result<()> {
    let mut sub = ctx
        .client
        .subscribe(subjects::call(&ctx.cfg.instance_id))
        .await
        .context("subscribing to calls")?;
    loop {
        let msg = tokio::select! {
            _ = ctx.shutdown.cancelled() => return Ok(()),
            m = sub.next() => match m { Some(m) => m, None => return Ok(()) },
        };
        let Some(reply) = msg.reply.clone() else {
            continue;
        };
        let decoded = match coffer_proto::decode(&msg.payload) {
            // Only calls about this agent's own instance are carried out, whatever reached the
            // subject (a misrouted or replayed call names another instance).
            Ok(env) if env.instance_id != ctx.cfg.instance_id => {
                warn!(claimed = %env.instance_id, "a call names another instance; refused");
                Err(format!(
                    "this call is for instance {}, and this agent serves {}",
                    env.instance_id, ctx.cfg.instance_id
                ))
            }
            Ok(env) => Ok(env),
            Err(e) => Err(format!("undecodable call: {e}")),
        };
        let answer = match decoded {
            Ok(v1::Envelope {
                body:
                    Some(v1::envelope::Body::Call(v1::Call {
                        kind: Some(v1::call::Kind::Ping(_)),
                        ..
                    })),
                ..
            }) => v1::CallReply {
                ok: true,
                error: String::new(),
                kind: Some(v1::call_reply::Kind::Pong(heartbeat::snapshot(&ctx).await)),
                ..Default::default()
            },
            Ok(v1::Envelope {
                body:
                    Some(v1::envelope::Body::Call(v1::Call {
                        kind: Some(v1::call::Kind::Shutdown(_)),
                        ..
                    })),
                ..
            }) => {
                info!("shutdown requested: stopping the database, then the agent");
                let r = ctx.sup.call(supervisor::Cmd::StopKeepDesired).await;
                let reply = v1::CallReply {
                    ok: r.is_ok(),
                    error: r.err().unwrap_or_default(),
                    kind: None,
                    ..Default::default()
                };
                let env = coffer_proto::envelope(
                    uuid::Uuid::new_v4().to_string(),
                    &ctx.cfg.instance_id,
                    v1::envelope::Body::CallReply(reply),
                );
                let _ = ctx
                    .client
                    .publish(reply_to(&msg), env.encode_to_vec().into())
                    .await;
                let _ = ctx.client.flush().await;
                ctx.shutdown.cancel();
                return Ok(());
            }
            Ok(v1::Envelope {
                id,
                body:
                    Some(v1::envelope::Body::Call(v1::Call {
                        reply_key,
                        kind: Some(kind),
                    })),
                ..
            }) => {
                // A bug in one call must not take the responder (and the agent) down with it.
                use futures::FutureExt;
                std::panic::AssertUnwindSafe(calls::handle(&ctx, &id, &reply_key, kind))
                    .catch_unwind()
                    .await
                    .unwrap_or_else(|_| {
                        warn!("a call handler panicked; answering with an internal error");
                        v1::CallReply {
                            ok: false,
                            error: "the agent failed while handling this call; see its log".into(),
                            error_kind: v1::CallError::Internal as i32,
                            ..Default::default()
                        }
                    })
            }
            Ok(_) => v1::CallReply {
                ok: false,
                error: "unsupported call".into(),
                error_kind: v1::CallError::Unsupported as i32,
                ..Default::default()
            },
            Err(e) => v1::CallReply {
                ok: false,
                error: e,
                error_kind: v1::CallError::Invalid as i32,
                kind: None,
                ..Default::default()
            },
        };
        let env = coffer_proto::envelope(
            uuid::Uuid::new_v4().to_string(),
            &ctx.cfg.instance_id,
            v1::envelope::Body::CallReply(answer),
        );
        let _ = ctx.client.publish(reply, env.encode_to_vec().into()).await;
    }
}
