//! Heartbeats: a request every `heartbeat_interval_ms` whose reply renews the lease, plus a status
//! event on the event stream the moment the observed status changes.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use coffer_proto::{subjects, v1, Message};
use futures::FutureExt;
use tracing::debug;

use crate::Ctx;

/// What a heartbeat last learnt from the database server.
#[derive(Default)]
pub struct Cache {
    version: String,
    replication: Option<v1::ReplicationInfo>,
}

/// How long a heartbeat waits for the server's answers before it goes out with the last ones:
/// half the interval, so a busy server (a checkpoint, a backup) never delays the lease.
fn server_budget(ctx: &Ctx) -> Duration {
    Duration::from_millis((ctx.cfg.heartbeat_interval_ms / 2).max(50))
}

/// Builds a heartbeat from what the supervisor observes and the process metrics.
pub async fn snapshot(ctx: &Ctx) -> v1::Heartbeat {
    let obs = ctx.sup.observed.borrow().clone();
    let budget = server_budget(ctx);
    let version = match tokio::time::timeout(budget, ctx.ds.version()).await {
        Ok(Ok(v)) => {
            if let Ok(mut c) = ctx.hb_cache.lock() {
                c.version.clone_from(&v);
            }
            v
        }
        _ => ctx
            .hb_cache
            .lock()
            .map(|c| c.version.clone())
            .unwrap_or_default(),
    };
    let replication = match tokio::time::timeout(budget, crate::replication::info(ctx)).await {
        Ok(r) => {
            if let Ok(mut c) = ctx.hb_cache.lock() {
                c.replication.clone_from(&r);
            }
            r
        }
        Err(_) => ctx.hb_cache.lock().ok().and_then(|c| c.replication.clone()),
    };
    let lease_age_ms = ctx
        .lease_renewed
        .lock()
        .ok()
        .and_then(|l| l.map(|t| t.elapsed().as_millis() as u64))
        .unwrap_or(u64::MAX);
    // A configuration change waits for a restart: say so while the server runs.
    let status =
        if obs.status == v1::ServiceStatus::Running && crate::configure::restart_pending(ctx) {
            v1::ServiceStatus::RestartRequired
        } else {
            obs.status
        };
    v1::Heartbeat {
        status: status as i32,
        datastore: ctx.ds.name().to_string(),
        datastore_version: version,
        uptime_s: if obs.pid != 0 {
            crate::supervisor::uptime_secs(obs.pid)
        } else {
            0
        },
        cpu_percent: 0.0,
        memory_bytes: 0,
        volume_used_bytes: 0,
        volume_total_bytes: 0,
        connections: obs.connections,
        intent_kinds: coffer_proto::INTENT_KINDS
            .iter()
            .chain([&coffer_proto::CAP_USERS, &coffer_proto::CAP_CATCH_UP_DETACH])
            .map(|s| s.to_string())
            .collect(),
        strategies: vec![format!("datastore:{}", ctx.ds.name())],
        fault: obs.fault,
        // A wildcard bind says nothing about where clients connect: the controller keeps the
        // address it learnt at placement or enrolment.
        host: match ctx.cfg.advertise_host() {
            "0.0.0.0" | "::" => String::new(),
            h => h.to_string(),
        },
        port: ctx.cfg.listen.port as u32,
        seq: ctx.seq.fetch_add(1, Ordering::SeqCst),
        boot_id: ctx.boot_id.clone(),
        db_pid: obs.pid,
        lease_age_ms,
        public_key: ctx.public_key.clone(),
        replication,
        archive: crate::archive::info(ctx),
    }
}

/// Process and volume metrics, refreshed on each heartbeat (volume usage at most every 10 s).
struct Metrics {
    sys: sysinfo::System,
    volume: (u64, u64),
    volume_at: Option<Instant>,
    volume_job: Option<tokio::task::JoinHandle<(u64, u64)>>,
}

impl Metrics {
    async fn fill(&mut self, ctx: &Ctx, hb: &mut v1::Heartbeat) {
        if hb.db_pid != 0 {
            let pid = sysinfo::Pid::from_u32(hb.db_pid);
            self.sys.refresh_processes_specifics(
                sysinfo::ProcessesToUpdate::Some(&[pid]),
                true,
                sysinfo::ProcessRefreshKind::nothing()
                    .with_cpu()
                    .with_memory(),
            );
            if let Some(p) = self.sys.process(pid) {
                hb.cpu_percent = p.cpu_usage();
                hb.memory_bytes = p.memory();
            }
        }
        // Walking the data directory can take long: it runs on its own, and heartbeats carry
        // the last figure meanwhile.
        if self.volume_job.as_ref().is_some_and(|j| j.is_finished()) {
            if let Some(Ok(v)) = self.volume_job.take().and_then(|j| j.now_or_never()) {
                self.volume = v;
            }
        }
        if self.volume_job.is_none()
            && self
                .volume_at
                .map(|t| t.elapsed() > Duration::from_secs(10))
                .unwrap_or(true)
        {
            let root = ctx.state.datastore_root(ctx.ds.name());
            self.volume_job = Some(tokio::task::spawn_blocking(move || volume_usage(&root)));
            self.volume_at = Some(Instant::now());
        }
        hb.volume_used_bytes = self.volume.0;
        hb.volume_total_bytes = self.volume.1;
    }
}

/// Bytes used below `root`, and the size of the filesystem holding it.
fn volume_usage(root: &std::path::Path) -> (u64, u64) {
    fn du(p: &std::path::Path) -> u64 {
        let Ok(rd) = std::fs::read_dir(p) else {
            return 0;
        };
        rd.flatten()
            .map(|e| match e.file_type() {
                Ok(t) if t.is_dir() => du(&e.path()),
                Ok(t) if t.is_file() => e.metadata().map(|m| m.len()).unwrap_or(0),
                _ => 0,
            })
            .sum()
    }
    let total = nix::sys::statvfs::statvfs(root)
        .map(|s| s.blocks() * s.fragment_size())
        .unwrap_or(0);
    (du(root), total)
}

/// The heartbeat loop.
pub async fn run(ctx: Arc<Ctx>) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(Duration::from_millis(ctx.cfg.heartbeat_interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut observed = ctx.sup.observed.clone();
    let mut metrics = Metrics {
        sys: sysinfo::System::new(),
        volume: (0, 0),
        volume_at: None,
        volume_job: None,
    };
    let mut last_status = None;
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {}
            r = observed.changed() => {
                if r.is_err() {
                    return Ok(());
                }
            }
        }
        let mut hb = snapshot(&ctx).await;
        metrics.fill(&ctx, &mut hb).await;
        let status = (hb.status, hb.fault.clone());
        if last_status.as_ref() != Some(&status) {
            // A transition: push it durably now rather than at the next tick.
            last_status = Some(status);
            let id = format!("{}-{}", hb.boot_id, hb.seq);
            let ev = v1::Event {
                intent_id: String::new(),
                intent_kind: String::new(),
                kind: Some(v1::event::Kind::Status(hb.clone())),
            };
            let c = ctx.clone();
            tokio::spawn(async move { c.publish_event(id, ev).await });
        }
        // Not awaited: a slow answer must not hold back the next heartbeat (the lease is renewed
        // by whichever answer comes, from the time its heartbeat was sent).
        let c = ctx.clone();
        tokio::spawn(async move { send(&c, hb).await });
    }
}

async fn send(ctx: &Arc<Ctx>, hb: v1::Heartbeat) {
    let env = coffer_proto::envelope(
        format!("{}-{}", hb.boot_id, hb.seq),
        &ctx.cfg.instance_id,
        v1::envelope::Body::Heartbeat(hb),
    );
    // The lease runs from when this heartbeat was sent, not from when its reply arrives: the
    // controller's expiry runs from when it received the heartbeat, which is never earlier, so a
    // slow reply (a busy controller, a loaded machine) cannot stretch the lease past the expiry.
    let sent = Instant::now();
    let req = ctx.client.request(
        subjects::heartbeat(&ctx.cfg.instance_id),
        env.encode_to_vec().into(),
    );
    match tokio::time::timeout(Duration::from_secs(2), req).await {
        Ok(Ok(reply)) => {
            if let Ok(v1::Envelope {
                body: Some(v1::envelope::Body::HeartbeatReply(r)),
                instance_id,
                ..
            }) = coffer_proto::decode(&reply.payload)
            {
                if instance_id != ctx.cfg.instance_id {
                    debug!(claimed = %instance_id, "a heartbeat reply names another instance; ignored");
                    return;
                }
                if let Ok(mut l) = ctx.lease_renewed.lock() {
                    // Replies can overtake each other: only a later send renews.
                    if l.is_none_or(|t| t < sent) {
                        *l = Some(sent);
                    }
                }
                ctx.lease_ms
                    .store(r.lease_ms, std::sync::atomic::Ordering::Relaxed);
                let c = ctx.clone();
                tokio::spawn(
                    async move { crate::replication::on_reply(&c, &r.role, r.fence).await },
                );
            }
        }
        Ok(Err(e)) => debug!(error = %e, "heartbeat not answered"),
        Err(_) => debug!("heartbeat timed out"),
    }
}
