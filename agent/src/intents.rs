//! The intent consumer: a JetStream durable pull consumer filtered to this instance, one intent at
//! a time and in order (`max_ack_pending = 1`), with progress acks while an intent runs so it is
//! never redelivered mid-run, and a record per intent id so a redelivered intent is answered from
//! its recorded result instead of being run twice.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::AckKind;
use coffer_proto::{subjects, v1};
use coffer_strategies::{DatabaseSpec, Sizing, UserSpec};
use futures::StreamExt;
use tracing::{info, info_span, warn, Instrument};

use crate::state::IntentRecord;
use crate::supervisor::Cmd;
use crate::Ctx;

/// Intent kinds that are safe to run again after an agent restart interrupted them.
const RESUMABLE: &[&str] = &["restart", "stop", "start", "delete"];

/// Runs the consumer until shutdown, re-creating it after NATS trouble.
pub async fn run(ctx: Arc<Ctx>) -> anyhow::Result<()> {
    let mut backoff =
        coffer_common::retry::backoff(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        match consume(&ctx).await {
            Ok(()) => return Ok(()),
            Err(e) => {
                warn!(error = %format!("{e:#}"), "intent consumer interrupted; re-creating it");
            }
        }
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(coffer_common::retry::next(&mut backoff)) => {}
        }
    }
}

async fn consumer(ctx: &Ctx) -> anyhow::Result<PullConsumer> {
    let stream = ctx
        .js
        .get_stream(subjects::INTENT_STREAM)
        .await
        .context("intent stream not available yet")?;
    let name = subjects::agent_consumer(&ctx.cfg.instance_id);
    let filter = subjects::intent(&ctx.cfg.instance_id);
    let ack_wait = Duration::from_secs(ctx.cfg.ack_wait_s);
    let mut consumer: PullConsumer = stream
        .get_or_create_consumer(
            &name,
            pull::Config {
                durable_name: Some(name.clone()),
                filter_subject: filter.clone(),
                ack_policy: AckPolicy::Explicit,
                ack_wait,
                max_ack_pending: 1,
                deliver_policy: DeliverPolicy::All,
                max_deliver: -1,
                ..Default::default()
            },
        )
        .await
        .context("creating the intent consumer")?;
    // Read the settings back: a server that silently ignored one we rely on must not be used.
    let info = consumer.info().await.context("reading consumer info")?;
    let c = &info.config;
    if c.durable_name.as_deref() != Some(name.as_str()) {
        bail!("consumer {name} is not durable on this server");
    }
    if c.filter_subject != filter {
        bail!(
            "consumer {name} filters '{}' instead of '{filter}'",
            c.filter_subject
        );
    }
    if c.ack_policy != AckPolicy::Explicit {
        bail!("consumer {name} does not use explicit acks");
    }
    if c.max_ack_pending != 1 {
        bail!(
            "consumer {name} allows {} unacknowledged intents instead of 1",
            c.max_ack_pending
        );
    }
    Ok(consumer)
}

async fn consume(ctx: &Arc<Ctx>) -> anyhow::Result<()> {
    let consumer = consumer(ctx).await?;
    let mut messages = consumer
        .messages()
        .await
        .context("subscribing to intents")?;
    info!("waiting for intents");
    loop {
        let msg = tokio::select! {
            _ = ctx.shutdown.cancelled() => return Ok(()),
            m = messages.next() => match m {
                Some(Ok(m)) => m,
                Some(Err(e)) => bail!("intent stream error: {e}"),
                None => bail!("intent stream ended"),
            },
        };
        handle(ctx, msg).await;
    }
}

fn failed(code: v1::FailureCode, message: String) -> v1::event::Kind {
    v1::event::Kind::Failed(v1::Failed {
        code: code as i32,
        message,
        elapsed_ms: 0,
    })
}

async fn handle(ctx: &Arc<Ctx>, msg: async_nats::jetstream::Message) {
    let header_id = msg
        .headers
        .as_ref()
        .and_then(|h| h.get("Nats-Msg-Id"))
        .map(|v| v.to_string())
        .unwrap_or_default();
    let env = match coffer_proto::decode(&msg.payload) {
        Ok(e) => e,
        Err(e) => {
            warn!(intent_id = %header_id, error = %e, "undecodable intent; terminating it");
            let _ = msg.ack_with(AckKind::Term).await;
            report(
                ctx,
                &header_id,
                "",
                failed(
                    v1::FailureCode::Undecodable,
                    format!("undecodable intent: {e}"),
                ),
            )
            .await;
            return;
        }
    };
    let id = if env.id.is_empty() {
        header_id
    } else {
        env.id.clone()
    };
    if env.instance_id != ctx.cfg.instance_id {
        // Never run, never recorded as this instance's: only dropped and logged.
        warn!(intent_id = %id, claimed = %env.instance_id, "an intent names another instance; terminating it");
        let _ = msg.ack_with(AckKind::Term).await;
        return;
    }
    let intent = match env.body {
        Some(v1::envelope::Body::Intent(i)) => i,
        _ => {
            let _ = msg.ack_with(AckKind::Term).await;
            report(
                ctx,
                &id,
                "",
                failed(
                    v1::FailureCode::Undecodable,
                    "message is not an intent".into(),
                ),
            )
            .await;
            return;
        }
    };
    let Some(kind) = intent.kind.clone() else {
        warn!(intent_id = %id, "unknown intent kind; terminating it");
        let rec = IntentRecord {
            kind: String::new(),
            state: "failed".into(),
            code: v1::FailureCode::Unsupported as i32,
            message: format!(
                "this agent ({}) does not know this intent kind (schema {}); upgrade the agent",
                coffer_proto::SOFTWARE_VERSION,
                env.schema_version
            ),
            elapsed_ms: 0,
        };
        if !id.is_empty() {
            let _ = ctx.state.record_intent(&id, &rec);
        }
        let _ = msg.ack_with(AckKind::Term).await;
        republish(ctx, &id, &rec).await;
        return;
    };
    let kind_name = coffer_proto::intent_kind_name(&kind);
    // The trace of the API request behind it, when it is a well-formed one.
    let trace_id = coffer_proto::trace_id(&intent.trace_parent).unwrap_or_default();
    let span = info_span!("intent", intent_id = %id, kind = kind_name, trace_id = %trace_id);
    async {
        // Handled before? Answer from the record.
        if let Some(rec) = ctx.state.intent(&id) {
            match rec.state.as_str() {
                "done" | "failed" => {
                    info!("intent already handled; repeating its result");
                    republish(ctx, &id, &rec).await;
                    let _ = msg.ack().await;
                    return;
                }
                _ if !RESUMABLE.contains(&kind_name) => {
                    let rec = IntentRecord {
                        kind: kind_name.into(),
                        state: "failed".into(),
                        code: v1::FailureCode::Interrupted as i32,
                        message: if kind_name == "backup" {
                            "the backup was interrupted by an agent restart; its partial data was removed; take a new backup".into()
                        } else {
                            format!(
                                "{kind_name} was interrupted by an agent restart and is not safe to repeat; delete the instance and create it again"
                            )
                        },
                        elapsed_ms: 0,
                    };
                    if let v1::intent::Kind::Backup(b) = &kind {
                        crate::backups::discard(ctx, &b.backup_id).await;
                    }
                    let _ = ctx.state.record_intent(&id, &rec);
                    if kind_name == "prepare" {
                        let _ = ctx.sup.call(Cmd::Report(v1::ServiceStatus::Failed, rec.message.clone())).await;
                    }
                    republish(ctx, &id, &rec).await;
                    let _ = msg.ack().await;
                    return;
                }
                _ => info!("resuming interrupted intent"),
            }
        }
        if intent.deadline_unix_ms != 0 && coffer_proto::now_unix_ms() > intent.deadline_unix_ms {
            let rec = IntentRecord {
                kind: kind_name.into(),
                state: "failed".into(),
                code: v1::FailureCode::Expired as i32,
                message: "intent expired before the agent could run it".into(),
                elapsed_ms: 0,
            };
            let _ = ctx.state.record_intent(&id, &rec);
            republish(ctx, &id, &rec).await;
            let _ = msg.ack().await;
            return;
        }
        let started = IntentRecord {
            kind: kind_name.into(),
            state: "started".into(),
            code: 0,
            message: String::new(),
            elapsed_ms: 0,
        };
        if let Err(e) = ctx.state.record_intent(&id, &started) {
            warn!(error = %e, "cannot record intent; leaving it for redelivery");
            let _ = msg.ack_with(AckKind::Nak(Some(Duration::from_secs(5)))).await;
            return;
        }
        let accepted = std::time::Instant::now();
        report(ctx, &id, kind_name, v1::event::Kind::Accepted(v1::Accepted {})).await;
        info!("intent started");

        let work = execute(ctx, &id, kind_name, kind);
        tokio::pin!(work);
        let mut tick = tokio::time::interval(Duration::from_secs(ctx.cfg.ack_wait_s) / 3);
        tick.tick().await;
        let result = loop {
            tokio::select! {
                r = &mut work => break r,
                _ = tick.tick() => { let _ = msg.ack_with(AckKind::Progress).await; }
            }
        };
        let elapsed_ms = accepted.elapsed().as_millis() as u64;
        let rec = match result {
            Ok(m) => IntentRecord { kind: kind_name.into(), state: "done".into(), code: 0, message: m, elapsed_ms },
            Err(m) => IntentRecord {
                kind: kind_name.into(),
                state: "failed".into(),
                code: v1::FailureCode::Error as i32,
                message: m,
                elapsed_ms,
            },
        };
        info!(outcome = %rec.state, "intent finished");
        if let Err(e) = ctx.state.record_intent(&id, &rec) {
            warn!(error = %e, "cannot record intent result");
        }
        republish(ctx, &id, &rec).await;
        let _ = msg.ack().await;
    }
    .instrument(span)
    .await
}

async fn republish(ctx: &Ctx, id: &str, rec: &IntentRecord) {
    let kind = if rec.state == "done" {
        let backup = ctx.state.backup_record(id).map(|b| v1::BackupResult {
            backup_id: b.backup_id,
            stored_bytes: b.stored_bytes,
            sha256: b.sha256,
            location: b.location,
            manifest_json: b.manifest_json,
            archive_since_unix_ms: b.archive_since_unix_ms,
            inventory: b.inventory,
            change_file: b.change_file,
        });
        v1::event::Kind::Done(v1::Done {
            message: rec.message.clone(),
            backup,
            elapsed_ms: rec.elapsed_ms,
        })
    } else {
        v1::event::Kind::Failed(v1::Failed {
            code: rec.code,
            message: rec.message.clone(),
            elapsed_ms: rec.elapsed_ms,
        })
    };
    report(ctx, id, &rec.kind, kind).await;
}

async fn report(ctx: &Ctx, intent_id: &str, kind_name: &str, kind: v1::event::Kind) {
    let suffix = match &kind {
        v1::event::Kind::Accepted(_) => "accepted".to_string(),
        v1::event::Kind::Progress(p) => format!("progress-{}", p.percent),
        _ => "result".to_string(),
    };
    let ev = v1::Event {
        intent_id: intent_id.to_string(),
        intent_kind: kind_name.to_string(),
        kind: Some(kind),
    };
    ctx.publish_event(format!("{intent_id}:{suffix}"), ev).await;
}

pub(crate) async fn progress(ctx: &Ctx, id: &str, kind: &str, percent: i32, message: &str) {
    report(
        ctx,
        id,
        kind,
        v1::event::Kind::Progress(v1::Progress {
            percent,
            message: message.to_string(),
        }),
    )
    .await;
}

async fn execute(
    ctx: &Arc<Ctx>,
    id: &str,
    kind_name: &str,
    kind: v1::intent::Kind,
) -> Result<String, String> {
    use v1::intent::Kind;
    let desired = ctx.state.desired();
    if !matches!(kind, Kind::Prepare(_) | Kind::Delete(_)) && !desired.prepared {
        return Err(format!(
            "cannot {kind_name}: the instance was never prepared successfully"
        ));
    }
    match kind {
        Kind::Prepare(p) => {
            let r = prepare(ctx, id, p).await;
            if let Err(e) = &r {
                let _ = ctx
                    .sup
                    .call(Cmd::Report(v1::ServiceStatus::Failed, e.clone()))
                    .await;
            }
            r
        }
        Kind::Restart(_) => {
            set_running(ctx, true)?;
            ctx.sup.call(Cmd::Restart).await?;
            Ok("restarted".into())
        }
        Kind::Stop(_) => {
            set_running(ctx, false)?;
            ctx.sup.call(Cmd::Stop).await?;
            Ok("stopped".into())
        }
        Kind::Start(_) => {
            set_running(ctx, true)?;
            ctx.sup.call(Cmd::Start).await?;
            Ok("started".into())
        }
        Kind::Backup(b) => {
            if ctx.sup.observed.borrow().status != v1::ServiceStatus::Running {
                return Err("cannot back up: the database is not running".into());
            }
            if b.replication_snapshot && crate::replication::role(ctx) != "replica" {
                // A replica can exist once this snapshot is done: from now on this server
                // fences itself when its lease runs out, whatever the next reply says.
                crate::replication::set_role(ctx, "source");
            }
            let r = crate::backups::backup(ctx, id, b).await?;
            let rec = crate::state::BackupRecord {
                backup_id: r.backup_id.clone(),
                stored_bytes: r.stored_bytes,
                sha256: r.sha256.clone(),
                location: r.location.clone(),
                manifest_json: r.manifest_json.clone(),
                archive_since_unix_ms: r.archive_since_unix_ms,
                inventory: r.inventory.clone(),
                change_file: r.change_file.clone(),
            };
            ctx.state
                .record_backup(id, &rec)
                .map_err(|e| e.to_string())?;
            Ok(format!(
                "backup {} stored ({} bytes)",
                r.backup_id, r.stored_bytes
            ))
        }
        Kind::Configure(c) => crate::configure::configure(ctx, c).await,
        Kind::Delete(_) => {
            let mut d = ctx.state.desired();
            d.running = false;
            d.deleted = true;
            ctx.state.set_desired(&d).map_err(|e| e.to_string())?;
            ctx.sup.call(Cmd::Stop).await?;
            let root = ctx.state.datastore_root(ctx.ds.name());
            if root.exists() {
                tokio::fs::remove_dir_all(&root)
                    .await
                    .map_err(|e| format!("removing {}: {e}", root.display()))?;
            }
            ctx.sup
                .call(Cmd::Report(v1::ServiceStatus::Deleted, String::new()))
                .await?;
            Ok("deleted".into())
        }
    }
}

fn set_running(ctx: &Ctx, running: bool) -> Result<(), String> {
    let mut d = ctx.state.desired();
    d.running = running;
    ctx.state.set_desired(&d).map_err(|e| e.to_string())
}

async fn prepare(ctx: &Arc<Ctx>, id: &str, p: v1::Prepare) -> Result<String, String> {
    let ds = &ctx.ds;
    let sizing = Sizing {
        memory_mb: p.memory_mb,
        vcpus: p.vcpus,
        volume_gb: p.volume_gb,
        server_id: p.server_id,
    };
    // Validate everything before touching anything.
    let dbs: Vec<DatabaseSpec> = p
        .databases
        .iter()
        .map(|d| DatabaseSpec {
            name: d.name.clone(),
            character_set: Some(d.character_set.clone()).filter(|s| !s.is_empty()),
            collate: Some(d.collate.clone()).filter(|s| !s.is_empty()),
        })
        .collect();
    let mut users: Vec<UserSpec> = Vec::with_capacity(p.users.len());
    for u in &p.users {
        if !u.password.is_empty() {
            return Err(format!(
                "user '{}' came with a clear-text password; this agent accepts only sealed secrets",
                u.name
            ));
        }
        let host = if u.host.is_empty() {
            "%"
        } else {
            u.host.as_str()
        };
        let context =
            coffer_proto::seal::user_password_context(&ctx.cfg.instance_id, &u.name, host);
        let password = coffer_proto::seal::open(&ctx.secret_key, &context, &u.password_sealed)
            .map_err(|e| format!("the password of user '{}': {e}", u.name))?;
        let password = String::from_utf8(password)
            .map_err(|_| format!("the password of user '{}' is not UTF-8", u.name))?;
        users.push(UserSpec {
            name: u.name.clone(),
            password,
            host: host.to_string(),
            databases: u.databases.clone(),
        });
    }
    for d in &dbs {
        ds.validate_database_name(&d.name)
            .map_err(|e| e.to_string())?;
    }
    for u in &users {
        ds.validate_user(u).map_err(|e| e.to_string())?;
    }
    crate::archive::remember_key(ctx, &p.archive_key_id, &p.archive_key_sealed);
    ctx.sup
        .call(Cmd::Report(v1::ServiceStatus::Building, String::new()))
        .await?;
    progress(ctx, id, "prepare", 10, "initializing the data directory").await;
    let mut pending_load = None;
    let mut restored_at = None;
    if !ds.is_initialized() {
        match &p.restore {
            Some(r) => {
                progress(
                    ctx,
                    id,
                    "prepare",
                    10,
                    &format!("restoring backup {}", r.backup_id),
                )
                .await;
                match crate::backups::restore(ctx, id, r, &sizing).await? {
                    crate::backups::Restored::Load(load) => {
                        let (m, sources) = *load;
                        restored_at = Some(m.position.clone());
                        pending_load = Some((m, sources));
                    }
                    crate::backups::Restored::Files(pos) => restored_at = Some(pos),
                }
            }
            None => ds.initialize(&sizing).await.map_err(|e| e.to_string())?,
        }
    }
    let desired = crate::state::Desired {
        prepared: false,
        running: true,
        deleted: false,
        memory_mb: p.memory_mb,
        vcpus: p.vcpus,
        volume_gb: p.volume_gb,
        server_id: p.server_id,
    };
    ctx.state.set_desired(&desired).map_err(|e| e.to_string())?;
    crate::configure::write_initial(ctx, &p.overrides)?;
    // A replica some datastores make before its first start (one that starts as a standby).
    let mut attached = false;
    if let Some(r) = &p.replica_of {
        let src = crate::replication::source_of(ctx, r)?;
        attached = ds.prepare_replica(&src).await.map_err(|e| e.to_string())?;
        if attached {
            crate::replication::set_role(ctx, "replica");
        }
    }
    // A datastore whose own recovery replays archived changes gets them before it starts.
    let replays_at_start = ds.replay().is_some_and(|r| r.before_start());
    let mut feeding = None;
    if let (Some(r), Some(at), true) = (
        p.restore.as_ref().filter(|r| r.target.is_some()),
        &restored_at,
        replays_at_start,
    ) {
        match crate::archive::roll_forward(ctx, id, r, at).await? {
            crate::archive::Rolled::Done(done) => tracing::info!(intent_id = id, "{done}"),
            crate::archive::Rolled::Feeding(work) => feeding = Some(work),
        }
    }
    progress(ctx, id, "prepare", 50, "starting the database server").await;
    let started = ctx.sup.call(Cmd::Start).await;
    // The server's recovery took the archive as it was fed (its start waited for it).
    if let Some(work) = feeding {
        let done = crate::archive::fed(ctx, work).await?;
        tracing::info!(intent_id = id, "{done}");
    }
    started?;
    if let Some((m, sources)) = pending_load {
        progress(
            ctx,
            id,
            "prepare",
            60,
            &format!("loading backup {}", m.backup_id),
        )
        .await;
        crate::backups::load(ctx, id, m, sources).await?;
    }
    if let (Some(r), Some(at), false) = (
        p.restore.as_ref().filter(|r| r.target.is_some()),
        &restored_at,
        replays_at_start,
    ) {
        if let crate::archive::Rolled::Done(done) =
            crate::archive::roll_forward(ctx, id, r, at).await?
        {
            tracing::info!(intent_id = id, "{done}");
        }
    }
    if let Some(r) = p.replica_of.as_ref().filter(|_| !attached) {
        progress(ctx, id, "prepare", 70, "starting replication").await;
        let mut src = crate::replication::source_of(ctx, r)?;
        // Replication starts where the snapshot was taken.
        src.start_at_snapshot(&r.strategy, &restored_at.unwrap_or_default())?;
        crate::replication::set_role(ctx, "replica");
        if ds.attach_replica(&src).await.map_err(|e| e.to_string())?
            == coffer_strategies::datastore::Applied::Restart
        {
            ctx.sup.call(Cmd::Restart).await?;
        }
    }
    progress(ctx, id, "prepare", 80, "creating databases and users").await;
    for d in &dbs {
        ds.create_database(d).await.map_err(|e| e.to_string())?;
    }
    for u in &users {
        ds.create_user(u).await.map_err(|e| e.to_string())?;
    }
    if !p.root_password_sealed.is_empty() {
        let root = coffer_proto::seal::open(
            &ctx.secret_key,
            &coffer_proto::seal::root_password_context(&ctx.cfg.instance_id),
            &p.root_password_sealed,
        )
        .map_err(|e| format!("the root password: {e}"))?;
        let root =
            String::from_utf8(root).map_err(|_| "the root password is not UTF-8".to_string())?;
        ds.enable_root(&root).await.map_err(|e| e.to_string())?;
    }
    if !p.modules.is_empty() {
        progress(ctx, id, "prepare", 90, "applying modules").await;
        // A module that fails is recorded as such; it never fails the instance.
        for r in crate::modules::apply(ctx, p.modules.clone()) {
            if r.status != "OK" {
                tracing::warn!(module = ?r.module.map(|m| m.name), message = %r.message, "module failed");
            }
        }
    }
    let mut desired = desired;
    desired.prepared = true;
    ctx.state.set_desired(&desired).map_err(|e| e.to_string())?;
    Ok(format!(
        "prepared {} {}",
        ds.name(),
        ds.version().await.unwrap_or_default()
    ))
}
