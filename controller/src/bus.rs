//! The controller's side of NATS: streams, the intent outbox publisher, the heartbeat responder,
//! the event consumer, and the timers (build timeout, delete grace).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream::{self, consumer::pull, stream};
use coffer_proto::{subjects, v1, Message};
use futures::StreamExt;
use tracing::{info, warn};

use crate::status::{BackupStatus, Task};
use crate::store::{self, Store};
use crate::App;

/// What the controller remembers of an agent between heartbeats (in memory only).
#[derive(Debug, Clone)]
pub struct Live {
    /// Receipt time on the controller's monotonic clock.
    pub last_seen: Instant,
    /// Receipt time, wall clock (for `service_status_updated`).
    pub last_seen_wall: String,
    pub boot_id: String,
    pub seq: u64,
    pub hb: v1::Heartbeat,
    /// Status last written to the store.
    pub persisted: Option<(String, String)>,
}

/// Creates the streams if they do not exist, with `replicas` copies (raised on existing ones).
pub async fn ensure_streams(js: &jetstream::Context, replicas: usize) -> anyhow::Result<()> {
    for (name, subject, max_consumers) in [
        (
            subjects::INTENT_STREAM,
            subjects::intent_all(),
            INTENT_CONSUMERS,
        ),
        (
            subjects::EVENT_STREAM,
            subjects::event_all(),
            EVENT_CONSUMERS,
        ),
    ] {
        let cfg = stream::Config {
            name: name.to_string(),
            subjects: vec![subject],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            duplicate_window: Duration::from_secs(120),
            num_replicas: replicas,
            max_consumers,
            ..Default::default()
        };
        let s = js
            .get_or_create_stream(cfg.clone())
            .await
            .with_context(|| format!("creating stream {name}"))?;
        let have = &s.cached_info().config;
        if have.num_replicas != replicas || have.max_consumers != max_consumers {
            info!(
                stream = name,
                replicas_from = have.num_replicas,
                replicas_to = replicas,
                max_consumers_from = have.max_consumers,
                max_consumers_to = max_consumers,
                "changing the stream's settings"
            );
            js.update_stream(cfg)
                .await
                .with_context(|| format!("changing the settings of stream {name}"))?;
        }
    }
    Ok(())
}

/// Consumers the intent stream allows: one durable consumer per agent. Set explicitly because
/// nats-server (2.15 on) gives a stream that sets none a limit of 1,000 consumers, which would
/// leave the 1,001st agent without intents (the fleet simulator met it).
const INTENT_CONSUMERS: i32 = 1_000_000;

/// Consumers the event stream allows: the controllers' one shared consumer, with room to spare.
const EVENT_CONSUMERS: i32 = 100;

/// Publishes one queued intent and waits for JetStream to store it.
async fn publish(app: &App, row: &store::OutboxRow) -> Result<(), String> {
    let publish = jetstream::message::PublishMessage::build()
        .payload(row.payload.clone().into())
        .message_id(row.intent_id.as_str());
    let ack = app
        .js
        .send_publish(subjects::intent(&row.instance_id), publish)
        .await
        .map_err(|e| e.to_string())?;
    tokio::time::timeout(Duration::from_secs(5), ack)
        .await
        .map_err(|_| "timed out waiting for JetStream".to_string())?
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// How long an intent may keep failing to publish while others publish fine before it is failed
/// with a fault instead of retried.
const OUTBOX_GIVE_UP: Duration = Duration::from_secs(300);

/// Publishes queued intents until JetStream acknowledges each one; `Nats-Msg-Id` = intent id
/// makes a publish repeated after a crash harmless.
///
/// Intents of one instance go out in order; one instance's stuck intent never holds back
/// another's. An intent NATS can never take (larger than the server's `max_payload`) or that
/// keeps failing for [`OUTBOX_GIVE_UP`] while others go out fails with a fault, as if its agent
/// had failed it.
pub async fn outbox_loop(app: Arc<App>) {
    let backoff =
        || coffer_common::retry::backoff(Duration::from_millis(100), Duration::from_secs(5));
    let mut delay = backoff();
    let mut failing: std::collections::HashMap<i64, Instant> = Default::default();
    loop {
        // Only the leader publishes ([`crate::leases`]): an intent goes out once, in order.
        if !app.leads() {
            tokio::select! {
                _ = app.outbox_wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
            continue;
        }
        let rows = app.store.outbox().await.unwrap_or_else(|e| {
            warn!(error = %e, "reading outbox failed");
            vec![]
        });
        // One intent per instance per round, the round's intents in flight at once; an
        // instance's next intent waits for the next round, after this one is stored, so its
        // intents reach JetStream in order.
        let mut taken: std::collections::HashSet<String> = Default::default();
        let (mut round, mut more, mut errors) = (vec![], false, 0usize);
        let max_payload = app.client.server_info().max_payload;
        for row in rows {
            if !taken.insert(row.instance_id.clone()) {
                more = true;
                continue;
            }
            if max_payload > 0 && row.payload.len() + 512 > max_payload {
                let why = format!(
                    "the intent is {} bytes and NATS takes at most {max_payload}",
                    row.payload.len()
                );
                give_up(&app, &row, &why).await;
                more = true;
                continue;
            }
            // The instance's storage exists before its agent is told to write to it.
            if let Err(e) = crate::objects::ensure(&app, &row.instance_id).await {
                warn!(instance = %row.instance_id, error = %format!("{e:#}"), "creating the instance's storage failed; will retry");
                errors += 1;
                continue;
            }
            round.push(row);
        }
        let results = futures::future::join_all(round.iter().map(|row| publish(&app, row))).await;
        let sent = results.iter().filter(|r| r.is_ok()).count();
        for (row, r) in round.iter().zip(results) {
            match r {
                Ok(()) => {
                    failing.remove(&row.seq);
                    if let Err(e) = app.store.published(row.seq, &row.intent_id).await {
                        warn!(error = %e, "marking intent published failed");
                    }
                }
                Err(e) => {
                    warn!(intent_id = %row.intent_id, error = %e, "publishing intent failed; will retry");
                    errors += 1;
                    let since = *failing.entry(row.seq).or_insert_with(Instant::now);
                    // Only while others go out is this row's failure its own, not NATS's.
                    if sent > 0 && since.elapsed() > OUTBOX_GIVE_UP {
                        failing.remove(&row.seq);
                        give_up(&app, row, &e).await;
                    }
                }
            }
        }
        // Nothing went out: NATS itself is away; forget who failed first.
        if sent == 0 && errors > 0 {
            failing.clear();
        }
        if errors > 0 {
            tokio::time::sleep(coffer_common::retry::next(&mut delay)).await;
            continue;
        }
        delay = backoff();
        if more {
            continue;
        }
        tokio::select! {
            _ = app.outbox_wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

/// Takes an intent that cannot be published out of the outbox and fails it with a fault, the
/// same way an agent's `failed` event would.
async fn give_up(app: &Arc<App>, row: &store::OutboxRow, why: &str) {
    warn!(intent_id = %row.intent_id, instance = %row.instance_id, reason = why, "intent cannot be published; failing it");
    if let Err(e) = app.store.published(row.seq, &row.intent_id).await {
        warn!(error = %e, "removing the intent from the outbox failed");
        return;
    }
    let ev = v1::Event {
        intent_id: row.intent_id.clone(),
        intent_kind: String::new(),
        kind: Some(v1::event::Kind::Failed(v1::Failed {
            code: 0,
            message: format!("the controller could not send this intent: {why}"),
            elapsed_ms: 0,
        })),
    };
    if let Err(e) = handle_event(app, &row.instance_id, "", ev).await {
        warn!(error = %format!("{e:#}"), "recording the failed intent failed");
    }
}

/// Answers heartbeats (queue group, so several controllers share them), in batches: what
/// arrives within [`BATCH_WINDOW`] of a batch's first heartbeat (up to [`store::BATCH`]) is
/// answered with two reads of the store, not two per heartbeat. The window is a few
/// milliseconds against heartbeat intervals of seconds; at fleet size it makes the store's round
/// trips, thread hand-offs and row decoding count per batch instead of per agent.
pub async fn heartbeat_loop(app: Arc<App>) -> anyhow::Result<()> {
    let mut sub = app
        .client
        .queue_subscribe(
            subjects::heartbeat_all(),
            subjects::HEARTBEAT_QUEUE.to_string(),
        )
        .await
        .context("subscribing to heartbeats")?;
    // An agent sends one heartbeat per interval (and one more on a status change); more than
    // that is a flood, dropped here before any decoding or store access, so one agent cannot
    // delay the others' heartbeats (and make their leases lapse).
    let min_gap = Duration::from_millis((app.provisioner.heartbeat_interval_ms() / 4).max(20));
    let mut accepted: std::collections::HashMap<String, Instant> = Default::default();
    let mut dropped: u64 = 0;
    let mut last_report = Instant::now();
    let in_flight = Arc::new(tokio::sync::Semaphore::new(BATCHES_IN_FLIGHT));
    while let Some(first) = sub.next().await {
        let mut msgs = vec![first];
        let until = tokio::time::Instant::now() + BATCH_WINDOW;
        while msgs.len() < store::BATCH {
            match tokio::time::timeout_at(until, sub.next()).await {
                Ok(Some(m)) => msgs.push(m),
                _ => break,
            }
        }
        let now = Instant::now();
        let mut batch = Vec::with_capacity(msgs.len());
        for msg in msgs {
            let Some(from) = subjects::instance_of(msg.subject.as_str()) else {
                continue;
            };
            match accepted.get_mut(from) {
                Some(t) if now.duration_since(*t) < min_gap => {
                    dropped += 1;
                    if last_report.elapsed() > Duration::from_secs(10) {
                        warn!(
                            instance = from,
                            dropped, "heartbeats arriving faster than agents send them; dropped"
                        );
                        dropped = 0;
                        last_report = Instant::now();
                    }
                    continue;
                }
                Some(t) => *t = now,
                None => {
                    accepted.insert(from.to_string(), now);
                }
            }
            let Ok(env) = coffer_proto::decode(&msg.payload) else {
                continue;
            };
            let Some(v1::envelope::Body::Heartbeat(hb)) = env.body else {
                continue;
            };
            // An agent may only speak for its own instance: the payload must name the subject's.
            if from != env.instance_id {
                warn!(subject = %msg.subject, claimed = %env.instance_id, "heartbeat names another instance; ignored");
                continue;
            }
            batch.push(Beat {
                instance_id: env.instance_id,
                agent_version: env.software_version,
                hb,
                reply: msg.reply,
            });
        }
        if accepted.len() > 100_000 {
            accepted.retain(|_, t| now.duration_since(*t) < Duration::from_secs(60));
        }
        if batch.is_empty() {
            continue;
        }
        // Batches are answered concurrently (each waits on the store), a few at once.
        let permit = in_flight.clone().acquire_owned().await?;
        let app = app.clone();
        tokio::spawn(async move {
            answer(&app, batch).await;
            drop(permit);
        });
    }
    Ok(())
}

/// Heartbeat batches answered at once by one controller.
const BATCHES_IN_FLIGHT: usize = 16;

/// How long a heartbeat batch collects after its first heartbeat.
const BATCH_WINDOW: Duration = Duration::from_millis(5);

/// One heartbeat as it arrived.
struct Beat {
    instance_id: String,
    agent_version: String,
    hb: v1::Heartbeat,
    reply: Option<async_nats::Subject>,
}

/// Answers a batch of heartbeats (the lease, the role the store gives each instance and whether
/// it is fenced), then persists what changed. An agent the store does not know is not answered.
async fn answer(app: &Arc<App>, batch: Vec<Beat>) {
    let ids: Vec<&str> = batch.iter().map(|b| b.instance_id.as_str()).collect();
    let (rows, sources) = match app.store.heartbeat_rows(&ids).await {
        Ok(x) => x,
        Err(e) => {
            warn!(error = %e, heartbeats = ids.len(), "reading instances for heartbeats failed");
            return;
        }
    };
    let mut rows: std::collections::HashMap<String, store::HeartbeatRow> =
        rows.into_iter().map(|r| (r.id.clone(), r)).collect();
    let mut known = Vec::with_capacity(batch.len());
    for b in batch {
        let Some(row) = rows.remove(&b.instance_id) else {
            continue;
        };
        let fresh = track(app, &b.instance_id, b.hb.clone());
        if let Some(reply) = b.reply {
            let role = if row.replica_of.is_some() {
                "replica"
            } else if sources.contains(&row.id) {
                "source"
            } else {
                ""
            };
            let env = coffer_proto::envelope(
                uuid::Uuid::new_v4().to_string(),
                &b.instance_id,
                v1::envelope::Body::HeartbeatReply(v1::HeartbeatReply {
                    lease_ms: app.cfg.lease_ms,
                    role: role.into(),
                    fence: row.ejected,
                }),
            );
            let _ = app.client.publish(reply, env.encode_to_vec().into()).await;
        }
        if fresh {
            known.push((row, b.agent_version, b.hb));
        }
    }
    for (row, agent_version, hb) in known {
        persist(app, &row, &agent_version, &hb).await;
    }
}

/// Sees every heartbeat (no queue group), so this controller knows which agents are alive
/// whichever controller answered them: agent-loss detection runs on its own monotonic clock from
/// the moment the heartbeat reached NATS's subscribers, wherever it was answered.
pub async fn liveness_loop(app: Arc<App>) {
    let mut backoff =
        coffer_common::retry::backoff(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        match app.client.subscribe(subjects::heartbeat_all()).await {
            Ok(mut sub) => {
                while let Some(msg) = sub.next().await {
                    let Some(from) = subjects::instance_of(msg.subject.as_str()) else {
                        continue;
                    };
                    let Ok(env) = coffer_proto::decode(&msg.payload) else {
                        continue;
                    };
                    if let Some(v1::envelope::Body::Heartbeat(hb)) = env.body {
                        if env.instance_id == from {
                            track(&app, from, hb);
                        }
                    }
                }
            }
            Err(e) => warn!(error = %e, "subscribing to heartbeats for liveness failed"),
        }
        tokio::time::sleep(coffer_common::retry::next(&mut backoff)).await;
    }
}

/// Records a heartbeat in this controller's view (in memory); false for one older than what it
/// has (only its freshness counts).
fn track(app: &App, instance_id: &str, hb: v1::Heartbeat) -> bool {
    let mut live = app.live.lock().unwrap();
    if let Some(p) = live.get_mut(instance_id) {
        if p.boot_id == hb.boot_id && hb.seq < p.seq {
            p.last_seen = Instant::now();
            return false;
        }
        p.last_seen = Instant::now();
        p.last_seen_wall = store::now();
        p.boot_id = hb.boot_id.clone();
        p.seq = hb.seq;
        p.hb = hb;
        return true;
    }
    live.insert(
        instance_id.to_string(),
        Live {
            last_seen: Instant::now(),
            last_seen_wall: store::now(),
            boot_id: hb.boot_id.clone(),
            seq: hb.seq,
            hb,
            persisted: None,
        },
    );
    true
}

/// Takes in what an agent reports (an event's heartbeat); persists only transitions. Returns
/// the instance (None for an unknown one).
pub async fn observe(
    app: &Arc<App>,
    instance_id: &str,
    agent_version: &str,
    hb: v1::Heartbeat,
) -> Option<store::InstanceRow> {
    let Ok(Some(row)) = app.store.instance(instance_id).await else {
        return None;
    };
    // Older than what we have (an event overtaken by a heartbeat): only freshness counts.
    if track(app, instance_id, hb.clone()) {
        persist(app, &(&row).into(), agent_version, &hb).await;
    }
    Some(row)
}

/// Writes to the store what a (tracked, newest) heartbeat changes of the instance's row: service
/// status and fault, agent version and capabilities, endpoint. Nothing when nothing changed.
async fn persist(
    app: &Arc<App>,
    row: &store::HeartbeatRow,
    agent_version: &str,
    hb: &v1::Heartbeat,
) {
    let instance_id = row.id.as_str();
    // "unknown": a new agent has not looked at its server yet; the status stays what it was.
    let status = match coffer_proto::service_status_name(hb.status()) {
        "unknown" => row.service_status.clone(),
        s => s.to_string(),
    };
    let persisted = app
        .live
        .lock()
        .unwrap()
        .get(instance_id)
        .and_then(|l| l.persisted.clone());
    let now_state = (status.clone(), hb.fault.clone());
    if persisted.as_ref() != Some(&now_state) {
        let changed = row.service_status != status;
        if changed || persisted.is_none() || !hb.fault.is_empty() {
            let fault = (!hb.fault.is_empty()).then_some(hb.fault.as_str());
            if let Err(e) = app
                .store
                .set_service_status(instance_id, &status, fault)
                .await
            {
                warn!(error = %e, "persisting service status failed");
                return;
            }
            if changed {
                info!(instance = instance_id, from = %row.service_status, to = %status, "service status changed");
            }
        }
        if let Some(l) = app.live.lock().unwrap().get_mut(instance_id) {
            l.persisted = Some(now_state);
        }
    }
    if let Some(a) = &hb.archive {
        if row.archive_since_ms != Some(a.since_unix_ms)
            || row.archive_latest_ms != Some(a.latest_unix_ms)
        {
            let fault = (!a.fault.is_empty()).then_some(a.fault.as_str());
            if let Err(e) = app
                .store
                .set_archive(instance_id, a.since_unix_ms, a.latest_unix_ms, fault)
                .await
            {
                warn!(error = %e, "persisting the archive's state failed");
            }
            let period = crate::store::PeriodRow {
                instance_id: instance_id.to_string(),
                since_ms: a.since_unix_ms,
                latest_ms: a.latest_unix_ms,
                first_position: a.first_position.clone(),
                last_position: a.last_position.clone(),
            };
            if let Err(e) = app.store.set_archive_period(&period).await {
                warn!(error = %e, "persisting the archive's period failed");
            }
        }
        if row.archive_compactions.unwrap_or(0) < a.compactions as i64 {
            match app
                .store
                .set_archive_compactions(instance_id, a.compactions as i64)
                .await
            {
                Ok(true) => {
                    let (app, id) = (app.clone(), instance_id.to_string());
                    tokio::spawn(async move {
                        if let Err(e) = crate::objects::remove_compacted(&app, &id).await {
                            warn!(instance = %id, error = %format!("{e:#}"), "removing compacted archive pieces failed");
                        }
                    });
                }
                Ok(false) => {}
                Err(e) => warn!(error = %e, "persisting the archive's state failed"),
            }
        }
    }
    let caps = hb.intent_kinds.join(",");
    if caps != row.capabilities || agent_version != row.agent_version {
        let _ = app
            .store
            .set_agent_info(instance_id, agent_version, &caps)
            .await;
    }
    if !hb.host.is_empty()
        && hb.port != 0
        && (row.host.as_deref() != Some(hb.host.as_str()) || row.port != Some(hb.port as i64))
    {
        let _ = app
            .store
            .set_endpoint(instance_id, &hb.host, hb.port as i64)
            .await;
    }
}

/// Consumes agent events from the event stream.
pub async fn event_loop(app: Arc<App>) {
    let mut backoff =
        coffer_common::retry::backoff(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        if let Err(e) = consume_events(&app).await {
            warn!(error = %format!("{e:#}"), "event consumer interrupted; re-creating it");
        }
        tokio::time::sleep(coffer_common::retry::next(&mut backoff)).await;
    }
}

async fn consume_events(app: &Arc<App>) -> anyhow::Result<()> {
    let stream = app.js.get_stream(subjects::EVENT_STREAM).await?;
    let consumer: jetstream::consumer::PullConsumer = stream
        .get_or_create_consumer(
            subjects::CONTROLLER_EVENT_CONSUMER,
            pull::Config {
                durable_name: Some(subjects::CONTROLLER_EVENT_CONSUMER.to_string()),
                filter_subject: subjects::event_all(),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                ..Default::default()
            },
        )
        .await?;
    let mut messages = consumer.messages().await?;
    while let Some(msg) = messages.next().await {
        let msg = msg?;
        if let Ok(env) = coffer_proto::decode(&msg.payload) {
            let from = subjects::instance_of(msg.subject.as_str());
            if from != Some(env.instance_id.as_str()) {
                warn!(subject = %msg.subject, claimed = %env.instance_id, "event names another instance; ignored");
            } else if let Some(v1::envelope::Body::Event(ev)) = env.body {
                let handled = handle_event(app, &env.instance_id, &env.software_version, ev).await;
                // Workflows waiting on an agent (a snapshot, a build) look again.
                app.wake_workflows();
                if let Err(e) = handled {
                    warn!(error = %format!("{e:#}"), "handling event failed; it will be redelivered");
                    let _ = msg
                        .ack_with(jetstream::AckKind::Nak(Some(Duration::from_secs(1))))
                        .await;
                    continue;
                }
            }
        }
        let _ = msg.ack().await;
    }
    anyhow::bail!("event stream ended")
}

async fn handle_event(
    app: &Arc<App>,
    instance_id: &str,
    agent_version: &str,
    ev: v1::Event,
) -> anyhow::Result<()> {
    use v1::event::Kind;
    let Some(kind) = ev.kind else { return Ok(()) };
    // An event about an intent speaks only for the instance the intent was sent to.
    if !matches!(kind, Kind::Status(_)) {
        match app.store.intent_instance(&ev.intent_id).await? {
            Some(owner) if owner == instance_id => {}
            Some(owner) => {
                warn!(instance = instance_id, intent_id = %ev.intent_id, owner = %owner, "event about another instance's intent; ignored");
                return Ok(());
            }
            None => {}
        }
    }
    match kind {
        Kind::Status(hb) => {
            observe(app, instance_id, agent_version, hb).await;
        }
        Kind::Accepted(_) => {
            app.store
                .intent_event(&ev.intent_id, "running", Some(0), "")
                .await?;
            if let Some(b) = app.store.backup_by_intent(&ev.intent_id).await? {
                app.store
                    .update_backup(&b.id, BackupStatus::Building, None, None, None)
                    .await?;
            }
        }
        Kind::Progress(p) => {
            if let Some(b) = app.store.backup_by_intent(&ev.intent_id).await? {
                app.store
                    .update_backup(&b.id, BackupStatus::Building, Some(&p.message), None, None)
                    .await?;
            }
            app.store
                .intent_event(&ev.intent_id, "running", Some(p.percent as i64), &p.message)
                .await?;
        }
        Kind::Done(d) => {
            if let (Some(b), Some(r)) =
                (app.store.backup_by_intent(&ev.intent_id).await?, &d.backup)
            {
                crate::failpoint::hit("backup", "done");
                // Committed: from now on the agent can neither replace nor delete it.
                crate::objects::seal_committed(app, &b.instance_id, &b.id);
                app.store
                    .update_backup(
                        &b.id,
                        BackupStatus::Completed,
                        Some(""),
                        Some((r.stored_bytes as i64, &r.sha256, &r.location)),
                        None,
                    )
                    .await?;
                app.store
                    .set_backup_archive(
                        &b.id,
                        (r.archive_since_unix_ms > 0).then_some(r.archive_since_unix_ms),
                        coffer_proto::now_unix_ms(),
                    )
                    .await?;
                app.store
                    .set_backup_recorded(
                        &b.id,
                        &serde_json::to_string(&r.inventory)?,
                        &r.change_file,
                    )
                    .await?;
            }
            let Some((kind, first)) = app
                .store
                .intent_event(&ev.intent_id, "done", Some(100), &d.message)
                .await?
            else {
                return Ok(());
            };
            if first {
                let secs = (d.elapsed_ms > 0).then_some(d.elapsed_ms as f64 / 1000.0);
                app.telemetry.intent(&kind, "done", secs);
                if let (Some(r), Some(s)) = (&d.backup, secs) {
                    app.telemetry.backup(r.stored_bytes, s);
                }
                finished(app, instance_id, &kind, None).await?;
            }
        }
        Kind::Failed(f) => {
            if let Some(b) = app.store.backup_by_intent(&ev.intent_id).await? {
                discard_backup(app, &b).await;
                app.store
                    .update_backup(
                        &b.id,
                        BackupStatus::Failed,
                        Some(""),
                        None,
                        Some(&f.message),
                    )
                    .await?;
            }
            let rec = app
                .store
                .intent_event(&ev.intent_id, "failed", None, &f.message)
                .await?;
            if let Some((kind, true)) = rec {
                let secs = (f.elapsed_ms > 0).then_some(f.elapsed_ms as f64 / 1000.0);
                app.telemetry.intent(&kind, "failed", secs);
                finished(app, instance_id, &kind, Some(f.message)).await?;
            }
        }
    }
    Ok(())
}

/// Applies the outcome of an intent to the instance's task.
async fn finished(
    app: &Arc<App>,
    instance_id: &str,
    kind: &str,
    failure: Option<String>,
) -> anyhow::Result<()> {
    let Some(row) = app.store.instance(instance_id).await? else {
        return Ok(());
    };
    info!(
        instance = instance_id,
        kind,
        ok = failure.is_none(),
        "intent finished"
    );
    if kind == "prepare" {
        // A restore's grant ends with it.
        crate::objects::drop_local_grants(app, instance_id);
    }
    let failed = |what: &str| failure.as_ref().map(|m| format!("{what} failed: {m}"));
    let (new_task, fault) = match kind {
        "prepare" if row.task == Task::Building => match failure {
            Some(_) => (Task::BuildingError, failed("prepare")),
            None => (Task::None, None),
        },
        "restart" if row.task == Task::Rebooting => (Task::None, failed("restart")),
        // The instance keeps serving; a configuration it could not take is its fault until the
        // next successful change.
        "configure" => (row.task, failed("configuration")),
        "delete" => {
            let (app, id) = (app.clone(), instance_id.to_string());
            tokio::spawn(async move { finalize_delete(&app, &id).await });
            return Ok(());
        }
        _ => return Ok(()),
    };
    let mut tx = app.store.begin().await?;
    if kind != "configure" || fault.is_some() {
        Store::set_task(&mut tx, instance_id, new_task, fault.as_deref()).await?;
    } else if row
        .fault
        .as_deref()
        .is_some_and(|f| f.starts_with("configuration failed"))
    {
        Store::clear_fault(&mut tx, instance_id).await?;
    }
    Ok(tx.commit().await?)
}

/// Tears an instance down and forgets it (idempotent, concurrent calls collapse).
pub async fn finalize_delete(app: &Arc<App>, id: &str) {
    if !app.deleting.lock().unwrap().insert(id.to_string()) {
        return;
    }
    let result = async {
        let row = app.store.instance(id).await?;
        let nats_user = row
            .as_ref()
            .map(|r| r.agent_nats_user.clone())
            .unwrap_or_default();
        // An enrolled host's agent tore its database down on the delete intent; the controller
        // has no files there to remove.
        if row.is_none_or(|r| r.placement != crate::status::PlacedBy::Enrolled) {
            app.provisioner.destroy(id).await?;
        }
        crate::failpoint::hit("delete", "destroyed");
        if let (Some(_), false) = (&app.authority, nats_user.is_empty()) {
            let now = coffer_proto::now_unix_s();
            app.store.add_revocation(&nats_user, now).await?;
            app.push_account().await?;
        }
        discard_logs(app, id).await?;
        // Its archive goes with it: a point-in-time restore rolls forward from a live source.
        crate::objects::delete_prefix(app, id, "archive/", None)
            .await
            .context("removing the archived change log")?;
        crate::objects::drop_local_grants(app, id);
        if let Ok(stream) = app.js.get_stream(subjects::INTENT_STREAM).await {
            let _ = stream.delete_consumer(&subjects::agent_consumer(id)).await;
            let _ = stream.purge().filter(subjects::intent(id)).await;
        }
        app.store.mark_deleted(id).await?;
        app.live.lock().unwrap().remove(id);
        // Its storage goes too, unless backups taken from it are kept (they outlive it).
        if let Err(e) = crate::objects::forget_if_unused(app, id).await {
            warn!(instance = id, error = %format!("{e:#}"), "removing the instance's storage failed");
        }
        anyhow::Ok(())
    }
    .await;
    match result {
        Ok(()) => info!(instance = id, "instance deleted"),
        Err(e) => warn!(instance = id, error = %format!("{e:#}"), "delete failed; will retry"),
    }
    app.deleting.lock().unwrap().remove(id);
}

/// Removes what a failed backup wrote (agents cannot delete stored objects).
async fn discard_backup(app: &App, b: &store::BackupRow) {
    let keys = vec![format!("{}.cfbk", b.id), format!("{}.json", b.id)];
    if let Err(e) = crate::objects::delete(app, &b.instance_id, keys).await {
        warn!(backup = %b.id, error = %format!("{e:#}"), "removing a failed backup's objects failed");
    }
}

/// Removes an instance's published guest logs from the storage (they go with their instance;
/// backups outlive it).
async fn discard_logs(app: &Arc<App>, id: &str) -> anyhow::Result<()> {
    let prefix = format!("{}/{id}/", coffer_common::logs::CONTAINER);
    crate::objects::delete_prefix(app, id, &prefix, None)
        .await
        .context("removing published logs")
}

/// Sets an instance's task and fault in a transaction of its own.
async fn set_task_alone(app: &App, id: &str, t: Task, fault: &str) -> anyhow::Result<()> {
    let mut tx = app.store.begin().await?;
    Store::set_task(&mut tx, id, t, Some(fault)).await?;
    Ok(tx.commit().await?)
}

/// Periodic checks: builds that never finish, deletes whose agent never answered.
pub async fn timers_loop(app: Arc<App>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut n: u64 = 0;
    loop {
        tick.tick().await;
        if !app.leads() {
            continue;
        }
        n += 1;
        // Each read below is of what may need action (busy instances, sources, running
        // backups), not of the whole fleet: at fleet size a read of every row each second was
        // most of the leader's work.
        if n.is_multiple_of(3) && app.cfg.respawn_agents {
            respawn_agents(&app).await;
        }
        if app.cfg.replication.auto_failover {
            fail_over_lost_sources(&app).await;
        }
        if let Ok(rows) = app.store.busy_instances().await {
            for r in rows {
                let age = store::age_secs(&r.task_started);
                if r.task == Task::Building && age > app.cfg.build_timeout_s as i64 {
                    let msg = format!(
                        "build did not complete within {} s; check the agent log, then reset_status and delete",
                        app.cfg.build_timeout_s
                    );
                    let _ = set_task_alone(&app, &r.id, Task::BuildingError, &msg).await;
                }
                if r.task == Task::Deleting {
                    let agent_lost = !app.fresh(&r.id);
                    if age > app.cfg.delete_grace_s as i64 || (agent_lost && age > 2) {
                        let (app, id) = (app.clone(), r.id.clone());
                        tokio::spawn(async move { finalize_delete(&app, &id).await });
                    }
                }
            }
        }
        let drills = crate::ops::schedules::run_due(&app).await;
        crate::workflow::drill::run_due(&app, drills).await;
        if n.is_multiple_of(5) {
            fail_abandoned_backups(&app).await;
        }
        if n.is_multiple_of(3) {
            crate::ops::schedules::retain(&app).await;
        }
    }
}

/// An agent that died (killed, crashed) is started again; it adopts its database.
async fn respawn_agents(app: &App) {
    let Ok(placed) = app.store.placed_agents().await else {
        return;
    };
    for (id, task) in placed {
        if task == Task::Deleting || app.deleting.lock().unwrap().contains(&id) {
            continue;
        }
        if let Err(e) = app.provisioner.ensure(&id).await {
            warn!(instance = %id, error = %format!("{e:#}"), "could not ensure agent");
        }
    }
}

/// Automatic failover (off by default): a source whose heartbeat expired is ejected.
async fn fail_over_lost_sources(app: &Arc<App>) {
    let Ok(sources) = app.store.sources().await else {
        return;
    };
    for id in sources.iter().filter(|id| !app.fresh(id)) {
        let Ok(Some(r)) = app.store.instance(id).await else {
            continue;
        };
        if r.task != Task::None || r.replica_of.is_some() || r.ejected {
            continue;
        }
        if let Ok(replicas) = app.store.replicas_of(&r.id).await {
            if !replicas.is_empty() {
                warn!(source = %r.id, "source lost: automatic failover");
                if let Err(e) =
                    crate::workflow::replication::start_failover(app, &r, &replicas).await
                {
                    warn!(source = %r.id, error = %e.message, "automatic failover did not start");
                }
            }
        }
    }
}

/// A backup whose agent stopped reporting while it ran, for longer than the backup timeout,
/// fails (its partial objects go).
async fn fail_abandoned_backups(app: &App) {
    let Ok(running) = app.store.running_backups().await else {
        return;
    };
    for b in running.iter().filter(|b| {
        !app.fresh(&b.instance_id) && store::age_secs(&b.updated) > app.cfg.backup_timeout_s as i64
    }) {
        let msg = format!(
            "the agent stopped reporting for more than {} s while the backup ran; take a new backup",
            app.cfg.backup_timeout_s
        );
        let _ = app
            .store
            .update_backup(&b.id, BackupStatus::Failed, Some(""), None, Some(&msg))
            .await;
        discard_backup(app, b).await;
    }
}
