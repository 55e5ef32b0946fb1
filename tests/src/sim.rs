//! A fleet simulator: thousands of agents in one process that speak the real protocol to a real
//! controller, so the control plane can be measured at fleet size without thousands of
//! databases.
//!
//! Each simulated agent is an instance row in the controller's store (placed as an enrolled host,
//! ACTIVE, with an X25519 key of its own) and a NATS connection under its own user JWT, minted
//! by the controller's NATS authority with the permissions a real agent gets. It sends a
//! heartbeat request every interval with what a real MariaDB agent reports (status, version,
//! metrics, replication state, capabilities, lease age), takes the reply as its lease, and answers
//! every call on its subject as a healthy source would. Agents started with an intent consumer
//! (all of them unless told otherwise) take their intents from the intent stream through a
//! durable consumer of their own, as a real agent does, and report each accepted and done (a
//! backup: failed, as there is no data to back up). A killed agent stops at once, like a host
//! that died.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use coffer_controller::nats_auth::{Authority, NatsAuthConfig};
use coffer_controller::status::{PlacedBy, Task};
use coffer_controller::store::{InstanceRow, NewRow, Store};
use coffer_proto::{subjects, v1, Message};
use futures::StreamExt;

use crate::Env;

/// One simulated agent's identity.
#[derive(Clone)]
pub struct Seeded {
    pub id: String,
    creds: String,
    public_key: Vec<u8>,
}

/// What the fleet measured.
#[derive(Default)]
pub struct Stats {
    /// Heartbeat request → reply, microseconds.
    latencies_us: Mutex<Vec<u32>>,
    /// Intent sent by the controller → delivered to its agent, microseconds.
    intent_latencies_us: Mutex<Vec<u32>>,
    pub sent: AtomicU64,
    pub answered: AtomicU64,
    pub calls: AtomicU64,
    /// Intents taken and reported done (or failed).
    pub intents: AtomicU64,
    /// Agents whose intent consumer is ready.
    pub consuming: AtomicU64,
}

impl Stats {
    /// Takes the heartbeat latencies recorded so far (p50, p99 in ms, count).
    pub fn take_percentiles(&self) -> (f64, f64, usize) {
        Self::take(&self.latencies_us)
    }

    /// Takes the intent delivery latencies recorded so far (p50, p99 in ms, count).
    pub fn take_intent_percentiles(&self) -> (f64, f64, usize) {
        Self::take(&self.intent_latencies_us)
    }

    fn take(v: &Mutex<Vec<u32>>) -> (f64, f64, usize) {
        let taken = std::mem::take(&mut *v.lock().unwrap());
        let mut ms: Vec<f64> = taken.iter().map(|us| *us as f64 / 1000.0).collect();
        (
            percentile(&mut ms, 0.50),
            percentile(&mut ms, 0.99),
            ms.len(),
        )
    }
}

/// The `q` quantile of `v` (sorted here; 0 when empty).
pub fn percentile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 * q) as usize).min(v.len() - 1)]
}

/// The running fleet.
pub struct Fleet {
    pub ids: Vec<String>,
    killed: Vec<Arc<AtomicBool>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    pub stats: Arc<Stats>,
}

impl Fleet {
    /// Kills the agents `range` (their heartbeats and answers stop at once).
    pub fn kill(&self, range: std::ops::Range<usize>) -> Vec<String> {
        for k in &self.killed[range.clone()] {
            k.store(true, Ordering::SeqCst);
        }
        self.ids[range].to_vec()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Adds `n` simulated instances (named `sim-<i>`) to the project of `env`'s user token, ACTIVE
/// on enrolled hosts, each with its own agent key and NATS identity.
pub async fn seed(env: &Env, n: usize) -> anyhow::Result<Vec<Seeded>> {
    let store = Store::connect(&env.store_url()).await?;
    let authority = Authority::load_or_create(&NatsAuthConfig {
        dir: env.dir.path().join("nats-auth"),
    })?;
    let ds = store
        .datastore("mariadb")
        .await?
        .context("the mariadb datastore is not registered")?;
    let version = store
        .versions_of(&ds.id)
        .await?
        .into_iter()
        .next()
        .context("mariadb has no version")?;
    let mut out = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
        let mut tx = store.begin().await?;
        for i in chunk {
            let id = uuid::Uuid::new_v4().to_string();
            let (creds, user) = authority.agent_creds(&id)?;
            let (_secret, public_key) = coffer_proto::seal::generate()?;
            let server_id = Store::next_server_id(&mut tx).await?;
            let name = format!("sim-{i}");
            let mut row = InstanceRow::building(NewRow {
                id: &id,
                project: &env.project,
                name: &name,
                flavor_id: "1",
                version_id: &version.id,
                volume_size: 1,
                server_id,
            });
            row.task = Task::None;
            row.service_status = "running".into();
            row.host = Some("127.0.0.1".into());
            row.port = Some(3306);
            row.agent_public_key = coffer_proto::seal::to_hex(&public_key);
            row.agent_nats_user = user;
            row.placement = PlacedBy::Enrolled;
            Store::insert_instance(&mut tx, &row).await?;
            out.push(Seeded {
                id,
                creds,
                public_key,
            });
        }
        tx.commit().await?;
    }
    Ok(out)
}

/// Connects every seeded agent (at most 64 connecting at once) and starts its heartbeats, one
/// every `interval`, spread over the interval; the first `consumers` of them also take intents.
pub async fn start(
    env: &Env,
    seeded: Vec<Seeded>,
    interval: Duration,
    consumers: usize,
) -> anyhow::Result<Fleet> {
    let servers: Vec<async_nats::ServerAddr> = env
        .nats_urls()
        .iter()
        .map(|u| u.parse())
        .collect::<Result<_, _>>()?;
    let stats = Arc::new(Stats::default());
    let n = seeded.len().max(1);
    let connected = futures::stream::iter(seeded.into_iter().enumerate())
        .map(|(i, s)| {
            let servers = servers.clone();
            async move {
                let client = async_nats::ConnectOptions::with_credentials(&s.creds)?
                    .custom_inbox_prefix(subjects::agent_inbox_prefix(&s.id))
                    .name(format!("coffer-sim-{i}"))
                    .connect(servers)
                    .await
                    .with_context(|| format!("connecting simulated agent {i}"))?;
                anyhow::Ok((i, s, client))
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await;
    let mut fleet = Fleet {
        ids: vec![],
        killed: vec![],
        tasks: vec![],
        stats: stats.clone(),
    };
    let mut agents = vec![];
    for c in connected {
        agents.push(c?);
    }
    agents.sort_by_key(|(i, _, _)| *i);
    // Consumers are created a few at a time, as a fleet that starts over minutes would.
    let creating = Arc::new(tokio::sync::Semaphore::new(16));
    for (i, s, client) in agents {
        let killed = Arc::new(AtomicBool::new(false));
        let offset = interval.mul_f64(i as f64 / n as f64);
        fleet.ids.push(s.id.clone());
        fleet.killed.push(killed.clone());
        fleet.tasks.push(tokio::spawn(run_agent(
            s,
            client,
            Timing { interval, offset },
            (i < consumers).then(|| creating.clone()),
            killed,
            stats.clone(),
        )));
    }
    Ok(fleet)
}

/// When a simulated agent heartbeats: every `interval`, the first after `offset`.
struct Timing {
    interval: Duration,
    offset: Duration,
}

/// The intents of one agent: its own durable consumer on the intent stream, set up as a real
/// agent's (explicit acks, one at a time).
async fn intent_messages(
    client: &async_nats::Client,
    id: &str,
) -> anyhow::Result<async_nats::jetstream::consumer::pull::Stream> {
    use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
    let js = async_nats::jetstream::new(client.clone());
    let stream = js.get_stream(subjects::INTENT_STREAM).await?;
    let name = subjects::agent_consumer(id);
    let consumer: PullConsumer = stream
        .get_or_create_consumer(
            &name,
            pull::Config {
                durable_name: Some(name.clone()),
                filter_subject: subjects::intent(id),
                ack_policy: AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                max_ack_pending: 1,
                deliver_policy: DeliverPolicy::All,
                max_deliver: -1,
                ..Default::default()
            },
        )
        .await?;
    Ok(consumer.messages().await?)
}

/// Takes one intent: reports it accepted, then done (a backup failed: the simulator keeps no
/// data), and acknowledges it.
async fn take_intent(
    s: &Seeded,
    js: &async_nats::jetstream::Context,
    msg: async_nats::jetstream::Message,
    stats: &Stats,
) {
    let Ok(env) = coffer_proto::decode(&msg.payload) else {
        let _ = msg.ack().await;
        return;
    };
    let delivered_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let us = ((delivered_ms - env.sent_unix_ms).max(0) * 1000).min(u32::MAX as i64) as u32;
    stats.intent_latencies_us.lock().unwrap().push(us);
    let Some(v1::envelope::Body::Intent(intent)) = env.body else {
        let _ = msg.ack().await;
        return;
    };
    let kind = intent
        .kind
        .as_ref()
        .map_or("", coffer_proto::intent_kind_name);
    let result = match intent.kind {
        Some(v1::intent::Kind::Backup(_)) => v1::event::Kind::Failed(v1::Failed {
            code: v1::FailureCode::Error as i32,
            message: "a simulated agent has no data to back up".into(),
            elapsed_ms: 0,
        }),
        _ => v1::event::Kind::Done(v1::Done::default()),
    };
    for (suffix, k) in [
        ("accepted", v1::event::Kind::Accepted(v1::Accepted {})),
        ("result", result),
    ] {
        let ev = coffer_proto::envelope(
            format!("{}:{suffix}", env.id),
            &s.id,
            v1::envelope::Body::Event(v1::Event {
                intent_id: env.id.clone(),
                intent_kind: kind.to_string(),
                kind: Some(k),
            }),
        );
        let publish = async_nats::jetstream::message::PublishMessage::build()
            .payload(ev.encode_to_vec().into())
            .message_id(ev.id.as_str());
        if let Ok(ack) = js.send_publish(subjects::event(&s.id), publish).await {
            let _ = ack.await;
        }
    }
    let _ = msg.ack().await;
    stats.intents.fetch_add(1, Ordering::Relaxed);
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Creates the agent's intent consumer (retried until it exists, as a real agent does: a fleet
/// starting at once asks for more consumers than the server makes within one request's
/// timeout), then takes its intents until killed.
async fn intent_loop(
    s: &Seeded,
    client: &async_nats::Client,
    creating: &tokio::sync::Semaphore,
    killed: &AtomicBool,
    stats: &Stats,
) {
    let js = async_nats::jetstream::new(client.clone());
    let mut wait = Duration::from_millis(200);
    let mut messages = loop {
        let made = {
            let _one = creating.acquire().await;
            intent_messages(client, &s.id).await
        };
        match made {
            Ok(m) => break m,
            Err(_) => {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    };
    stats.consuming.fetch_add(1, Ordering::Relaxed);
    while let Some(m) = messages.next().await {
        if killed.load(Ordering::SeqCst) {
            return;
        }
        // An error is a missed idle heartbeat or the like; the stream carries on.
        if let Ok(msg) = m {
            take_intent(s, &js, msg, stats).await;
        }
    }
}

/// A simulated agent: answers calls and heartbeats, and takes intents, until killed.
async fn run_agent(
    s: Seeded,
    client: async_nats::Client,
    timing: Timing,
    consumes: Option<Arc<tokio::sync::Semaphore>>,
    killed: Arc<AtomicBool>,
    stats: Arc<Stats>,
) {
    let Timing { interval, offset } = timing;
    let Ok(mut calls) = client.subscribe(subjects::call(&s.id)).await else {
        return;
    };
    // Intents run beside heartbeats and calls, as in a real agent; stopped with this task.
    let intents = consumes.map(|creating| {
        let (s, client, killed, stats) = (s.clone(), client.clone(), killed.clone(), stats.clone());
        AbortOnDrop(tokio::spawn(async move {
            intent_loop(&s, &client, &creating, &killed, &stats).await
        }))
    });
    let boot_id = uuid::Uuid::new_v4().to_string();
    let started = Instant::now();
    let mut lease: Option<Instant> = None;
    let mut seq = 0u64;
    tokio::time::sleep(offset).await;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if killed.load(Ordering::SeqCst) {
            // A host lost: nothing more from it, not even a goodbye.
            drop(calls);
            drop(intents);
            drop(client);
            return;
        }
        tokio::select! {
            _ = tick.tick() => {
                if killed.load(Ordering::SeqCst) {
                    // Killed while waiting: not one more heartbeat.
                    continue;
                }
                seq += 1;
                let hb = heartbeat(&s, &boot_id, seq, started, lease);
                let env = coffer_proto::envelope(
                    format!("{boot_id}-{seq}"),
                    &s.id,
                    v1::envelope::Body::Heartbeat(hb),
                );
                let sent = Instant::now();
                stats.sent.fetch_add(1, Ordering::Relaxed);
                let req = client.request(subjects::heartbeat(&s.id), env.encode_to_vec().into());
                if let Ok(Ok(reply)) = tokio::time::timeout(Duration::from_secs(2), req).await {
                    if let Ok(v1::Envelope { body: Some(v1::envelope::Body::HeartbeatReply(_)), .. }) =
                        coffer_proto::decode(&reply.payload)
                    {
                        let us = sent.elapsed().as_micros().min(u32::MAX as u128) as u32;
                        stats.latencies_us.lock().unwrap().push(us);
                        stats.answered.fetch_add(1, Ordering::Relaxed);
                        lease = Some(sent);
                    }
                }
            }
            Some(msg) = calls.next() => {
                stats.calls.fetch_add(1, Ordering::Relaxed);
                if let (Some(reply), Ok(env)) = (msg.reply, coffer_proto::decode(&msg.payload)) {
                    let answer = coffer_proto::envelope(
                        env.id.clone(),
                        &s.id,
                        v1::envelope::Body::CallReply(v1::CallReply {
                            ok: true,
                            replication: Some(replication()),
                            ..Default::default()
                        }),
                    );
                    let _ = client.publish(reply, answer.encode_to_vec().into()).await;
                }
            }
        }
    }
}

/// What a healthy MariaDB source's agent reports.
fn replication() -> v1::ReplicationInfo {
    v1::ReplicationInfo {
        role: "source".into(),
        position: "0-1-1042".into(),
        applied_position: String::new(),
        received_position: String::new(),
        io_running: false,
        sql_running: false,
        seconds_behind: -1,
        last_error: String::new(),
        read_only: false,
        source_host: String::new(),
        source_port: 0,
    }
}

fn heartbeat(
    s: &Seeded,
    boot_id: &str,
    seq: u64,
    started: Instant,
    lease: Option<Instant>,
) -> v1::Heartbeat {
    v1::Heartbeat {
        status: v1::ServiceStatus::Running as i32,
        datastore: "mariadb".into(),
        datastore_version: "10.11.6-MariaDB-0+deb12u1".into(),
        uptime_s: started.elapsed().as_secs() + 3600,
        cpu_percent: 2.5,
        memory_bytes: 180 << 20,
        volume_used_bytes: 230 << 20,
        volume_total_bytes: 1 << 30,
        connections: 3,
        intent_kinds: coffer_proto::INTENT_KINDS
            .iter()
            .chain([&coffer_proto::CAP_USERS, &coffer_proto::CAP_CATCH_UP_DETACH])
            .map(|k| k.to_string())
            .collect(),
        strategies: vec!["datastore:mariadb".into()],
        fault: String::new(),
        host: String::new(),
        port: 3306,
        seq,
        boot_id: boot_id.to_string(),
        db_pid: 4242,
        lease_age_ms: lease.map_or(u64::MAX, |t| t.elapsed().as_millis() as u64),
        public_key: s.public_key.clone(),
        replication: Some(replication()),
        archive: None,
    }
}
