//! Continuous archiving: while this server is a source (or standalone) and backup storage is
//! configured, what it writes to its change log is shipped into storage as sealed segments
//! (`coffer_strategies::archive`), woken by writes in the data directory, at least every
//! quarter second. The ledger (`archive.json` in the state directory) survives restarts: an
//! agent that was down ships what the server wrote meanwhile from where it stopped. Heartbeats
//! carry the archive's window ([`info`]).
//!
//! Segments are sealed with the instance's own backup key, which the controller sends with
//! each backup intent (kept sealed to this agent in `archive.key`): with encryption on, the
//! archive starts with the instance's first backup, which is also the first point a restore
//! can start from.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use coffer_proto::v1;
use coffer_strategies::archive::{self, Archiver, Ledger, SegmentHeader};
use coffer_strategies::backup::BackupConfig;
use coffer_strategies::pipeline::{self, SealParams};
use coffer_strategies::storage::{Access, Storage};
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::Ctx;

/// The key segments are sealed with, as the controller sent it (sealed to this agent).
#[derive(Serialize, Deserialize)]
struct StoredKey {
    key_id: String,
    key_sealed: Vec<u8>,
}

fn key_path(ctx: &Ctx) -> std::path::PathBuf {
    ctx.state.root().join("archive.key")
}
fn ledger_path(ctx: &Ctx) -> std::path::PathBuf {
    ctx.state.root().join("archive.json")
}

/// Keeps the key of a backup intent for the archive (the newest one wins).
pub fn remember_key(ctx: &Ctx, key_id: &str, key_sealed: &[u8]) {
    if key_sealed.is_empty() {
        return;
    }
    let k = StoredKey {
        key_id: key_id.to_string(),
        key_sealed: key_sealed.to_vec(),
    };
    if let Err(e) =
        crate::state::write_atomic(&key_path(ctx), &serde_json::to_vec(&k).unwrap_or_default())
    {
        warn!(error = %e, "could not keep the archive key");
    }
}

/// The key to seal segments with: Ok(None) when backups are not encrypted, Err(()) while the
/// agent has none yet (no backup taken).
fn seal_key(ctx: &Ctx, cfg: &BackupConfig) -> Result<Option<(String, [u8; 32])>, ()> {
    if !cfg.encryption {
        return Ok(None);
    }
    let text = std::fs::read(key_path(ctx)).map_err(|_| ())?;
    let k: StoredKey = serde_json::from_slice(&text).map_err(|_| ())?;
    let key = coffer_proto::seal::open(
        &ctx.secret_key,
        &coffer_proto::seal::backup_key_context(&ctx.cfg.instance_id, &k.key_id),
        &k.key_sealed,
    )
    .map_err(|_| ())?;
    Ok(Some((k.key_id, key.try_into().map_err(|_| ())?)))
}

/// The archive as heartbeats report it (None: not archiving).
pub fn info(ctx: &Ctx) -> Option<v1::ArchiveInfo> {
    ctx.archive.lock().ok().and_then(|a| a.clone())
}

/// Waits (a few seconds at most) until the archive runs, when it is configured and this
/// instance is a source: a backup that starts the archive (it brings the key) is then covered
/// by it, however late a busy host runs the archive's first look.
pub async fn wait_started(ctx: &Ctx) {
    let configured = ctx.cfg.backup.as_ref().is_some_and(|b| b.archive)
        && ctx.cfg.datastore.datastore().archives_changes()
        && crate::replication::role(ctx) != "replica";
    if !configured {
        return;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while info(ctx).is_none() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// When a backup whose position is in `file` is covered by the running archive: the time the
/// archive has been continuous since (unix ms), else 0.
pub fn covering_since(ctx: &Ctx, file: &str) -> i64 {
    let Ok(text) = std::fs::read(ledger_path(ctx)) else {
        return 0;
    };
    let Ok(l) = serde_json::from_slice::<Ledger>(&text) else {
        return 0;
    };
    let Some(replay) = ctx.ds.replay() else {
        return 0;
    };
    // A paused archive (the instance became a replica) covers nothing taken since.
    if l.since_us == 0
        || l.paused
        || file.is_empty()
        || replay.order(file) < replay.order(&l.first_file)
    {
        return 0;
    }
    l.since_us / 1000
}

fn ship(
    storage: &dyn Storage,
    key: &str,
    h: &SegmentHeader,
    bytes: &mut dyn std::io::Read,
    seal: &Option<(String, [u8; 32])>,
    level: i32,
) -> Result<(), String> {
    let w = storage.create(key).map_err(|e| e.to_string())?;
    let params = SealParams {
        backup_id: key.to_string(),
        key: seal.clone(),
        zstd_level: Some(level),
        chunk_size: pipeline::DEFAULT_CHUNK,
        fixed: None,
    };
    let mut s = pipeline::SealWriter::new(w, &params).map_err(|e| e.to_string())?;
    archive::write_segment(&mut s, h, &[]).map_err(|e| format!("archiving {key}: {e}"))?;
    let n = std::io::copy(bytes, &mut s).map_err(|e| format!("archiving {key}: {e}"))?;
    if n != h.end - h.start {
        return Err(format!(
            "archiving {key}: {n} bytes read, {} expected",
            h.end - h.start
        ));
    }
    let (mut w, _) = s.finish().map_err(|e| format!("archiving {key}: {e}"))?;
    w.flush().map_err(|e| format!("archiving {key}: {e}"))?;
    w.commit().map_err(|e| e.to_string())
}

/// Whether the archive should run now: the server runs and this instance is not a replica.
fn active(ctx: &Ctx) -> bool {
    ctx.sup.observed.borrow().pid != 0 && crate::replication::role(ctx) != "replica"
}

/// Runs the archive until the agent stops: a look at every write in the data directory (at
/// least every quarter second), and the segments it cuts stored by a task of their own.
pub async fn run(ctx: Arc<Ctx>) {
    let (Some(cfg), Some(log)) = (
        ctx.cfg.backup.clone().filter(|b| b.archive),
        ctx.ds.change_log(),
    ) else {
        ctx.shutdown.cancelled().await;
        return;
    };
    let ledger: Ledger = std::fs::read(ledger_path(&ctx))
        .ok()
        .and_then(|t| serde_json::from_slice(&t).ok())
        .unwrap_or_default();
    let archiver = Arc::new(Mutex::new(Archiver::new(
        log,
        ledger,
        Duration::from_millis(cfg.archive_ship_ms),
    )));
    // Writes in the data directory wake the archive (one wake-up pending at most); watched
    // from when the server runs (the directory may not exist before).
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let mut watcher: Option<notify::RecommendedWatcher> = None;
    let fault = Arc::new(Mutex::new(String::new()));
    let mut storing: Option<tokio::task::JoinHandle<()>> = None;
    let mut failing = String::new();
    // What the server was last told it may let go of (None: nothing held), and when.
    let mut held: Option<(String, u64)> = None;
    let mut held_at = std::time::Instant::now();
    let mut released = false;
    // The latest time last recorded by an idle look, and when.
    let mut quiet_latest = 0i64;
    let mut quiet_at = std::time::Instant::now();
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = rx.recv() => {}
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
        let replica = crate::replication::role(&ctx) == "replica";
        if replica {
            // A source that became a replica: what was read is stored; the ledger says the
            // archive paused (a source again, it goes on from there as a new period; what it
            // wrote meanwhile is its source's, archived there).
            if archiver.lock().unwrap().pause() {
                persist(&ledger_path(&ctx), &archiver.lock().unwrap().ledger);
            }
        } else if archiver.lock().unwrap().resume() {
            persist(&ledger_path(&ctx), &archiver.lock().unwrap().ledger);
        }
        let Ok(seal) = seal_key(&ctx, &cfg) else {
            continue;
        };
        if !active(&ctx) {
            // A replica archives nothing: the server keeps nothing for the archive.
            if !released && ctx.sup.observed.borrow().status == v1::ServiceStatus::Running {
                // Once per stop (a refusal is not retried every look).
                if let Err(e) = ctx.ds.hold_change_log(None).await {
                    warn!(error = %e, "could not tell the server the archive stopped");
                }
                released = true;
                held = None;
            }
            // What was read before the stop is still stored.
            if storing.as_ref().is_none_or(|h| h.is_finished())
                && archiver.lock().unwrap().next_ready().is_some()
            {
                storing = Some(store_ready(&ctx, &cfg, &archiver, &fault, seal));
            }
            let l = archiver.lock().unwrap().ledger.clone();
            report(&ctx, &l, fault.lock().unwrap().clone());
            continue;
        }
        released = false;
        if watcher.is_none() {
            use notify::{RecursiveMode, Watcher};
            let tx = tx.clone();
            let filter = ctx.ds.change_log();
            // Where the change files are written (the data directory, or a directory in it).
            let watched = filter
                .as_ref()
                .and_then(|f| f.path("x").parent().map(std::path::Path::to_path_buf))
                .unwrap_or_else(|| ctx.ds.data_path());
            watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
                let wakes = match (&ev, &filter) {
                    (Ok(ev), Some(f)) => ev.paths.iter().any(|p| f.is_change_file(p)),
                    _ => true,
                };
                if wakes {
                    let _ = tx.try_send(());
                }
            })
            .ok()
            .and_then(|mut w| {
                w.watch(&watched, RecursiveMode::NonRecursive)
                    .ok()
                    .map(|_| w)
            });
        }
        let a = archiver.clone();
        let looked = tokio::task::spawn_blocking(move || a.lock().unwrap().observe())
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
        match looked {
            Ok(true) => persist(&ledger_path(&ctx), &archiver.lock().unwrap().ledger),
            Ok(false) => {
                // An idle look moves the latest time on: recorded at most once a second, so
                // that a restarted agent claims no less than it did (and a write stored by a
                // look begun before it was acknowledged is seen placed by the next look).
                let l = archiver.lock().unwrap().ledger.clone();
                if l.latest_us > quiet_latest && quiet_at.elapsed() >= Duration::from_secs(1) {
                    persist(&ledger_path(&ctx), &l);
                    (quiet_latest, quiet_at) = (l.latest_us, std::time::Instant::now());
                }
            }
            Err(e) => *fault.lock().unwrap() = e,
        }
        // A file stored in many pieces is closed, so that it is stored whole.
        let rotate = archiver
            .lock()
            .unwrap()
            .wants_rotation(cfg.archive_rotate_segments, cfg.archive_rotate_mb << 20);
        if rotate {
            if let Err(e) = ctx.ds.rotate_change_log().await {
                warn!(error = %e, "could not close the change file being written");
            }
        }
        // Storing runs beside the looks, one segment at a time, in order.
        if storing.as_ref().is_none_or(|h| h.is_finished())
            && archiver.lock().unwrap().next_ready().is_some()
        {
            storing = Some(store_ready(&ctx, &cfg, &archiver, &fault, seal));
        }
        let now_failing = fault.lock().unwrap().clone();
        if now_failing != failing {
            if !now_failing.is_empty() {
                warn!(error = %now_failing, "archiving failed; retrying from where it stopped");
            }
            failing = now_failing.clone();
        }
        let l = archiver.lock().unwrap().ledger.clone();
        // The server keeps what is not stored yet, and lets go of the rest (once a second).
        let at = (l.file.clone(), l.pos);
        if !l.file.is_empty()
            && held.as_ref() != Some(&at)
            && (held.is_none() || held_at.elapsed() >= Duration::from_secs(1))
        {
            match ctx.ds.hold_change_log(Some((&at.0, at.1))).await {
                Ok(()) => held = Some(at),
                Err(e) => warn!(error = %e, "could not tell the server what the archive stored"),
            }
            held_at = std::time::Instant::now();
        }
        report(&ctx, &l, now_failing);
        // Writes come in bursts: let those of the next 10 ms gather before the next look
        // (at most 100 looks a second; a mark is then at most that late).
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What heartbeats say of the archive.
fn report(ctx: &Ctx, l: &Ledger, fault: String) {
    if l.since_us != 0 {
        *ctx.archive.lock().unwrap() = Some(v1::ArchiveInfo {
            since_unix_ms: l.since_us / 1000,
            latest_unix_ms: l.latest_us / 1000,
            holes: l.holes,
            shipped_bytes: l.shipped_bytes,
            segments: l.segments,
            fault,
            compactions: l.compactions,
            first_position: l.first_position.clone(),
            last_position: l.last_position.clone(),
        });
    }
}

/// Stores the segments read, one at a time, in order, on a thread of its own.
fn store_ready(
    ctx: &Arc<Ctx>,
    cfg: &BackupConfig,
    archiver: &Arc<Mutex<Archiver>>,
    fault: &Arc<Mutex<String>>,
    seal: Option<(String, [u8; 32])>,
) -> tokio::task::JoinHandle<()> {
    let (a, c, kind, own, f, level, path) = (
        archiver.clone(),
        ctx.client.clone(),
        cfg.storage.clone(),
        ctx.cfg.instance_id.clone(),
        fault.clone(),
        cfg.zstd_level,
        ledger_path(ctx),
    );
    tokio::task::spawn_blocking(move || {
        let storage = match kind.build(Some(&c), &own, Access::Agent) {
            Ok(s) => s,
            Err(e) => {
                *f.lock().unwrap() = e;
                return;
            }
        };
        loop {
            let Some(job) = a.lock().unwrap().next_ready().cloned() else {
                return;
            };
            let stored = match &job {
                archive::Job::Segment(seg) => ship(
                    storage.as_ref(),
                    &seg.key,
                    &seg.header,
                    &mut seg.bytes.as_slice(),
                    &seal,
                    level,
                ),
                archive::Job::Whole { path, .. } if !path.exists() => {
                    // Removed by the server since it closed (purged, recycled): its
                    // pieces stay stored and serve restores as they did.
                    warn!(file = %path.display(), "a closed change file went before it was stored whole; its pieces stay");
                    a.lock().unwrap().skip_compaction();
                    continue;
                }
                archive::Job::Whole { key, header, path } => std::fs::File::open(path)
                    .map_err(|e| format!("{}: {e}", path.display()))
                    .and_then(|file| {
                        use std::io::Read;
                        ship(
                            storage.as_ref(),
                            key,
                            header,
                            &mut file.take(header.end),
                            &seal,
                            level,
                        )
                    }),
            };
            if let Err(e) = stored {
                *f.lock().unwrap() = e;
                return;
            }
            f.lock().unwrap().clear();
            let ledger = {
                let mut a = a.lock().unwrap();
                a.shipped();
                a.ledger.clone()
            };
            persist(&path, &ledger);
        }
    })
}

/// Waits for a fed roll-forward (the server's recovery took the files meanwhile) and removes
/// what the feed set up.
pub async fn fed(
    ctx: &Arc<Ctx>,
    work: tokio::task::JoinHandle<Result<String, String>>,
) -> Result<String, String> {
    let done = work.await.map_err(|e| format!("the replay failed: {e}"))?;
    if let (Some(replay), Ok(bctx)) = (ctx.ds.replay(), ctx.ds.backup_context().await) {
        replay.cleanup_feed(&bctx);
    }
    done
}

/// Refuses a replay to a time after the last mark before a hole (None: to the end), when a
/// hole cut the rebuilt files short.
fn refuse_past_hole(rebuilt: &archive::Rebuilt, time_us: Option<i64>) -> Result<(), String> {
    match (&rebuilt.hole, time_us) {
        (Some(why), None) => Err(format!("{why}; restore to a time before it")),
        (Some(why), Some(t)) if t > rebuilt.last_mark() => {
            Err(format!("{why}; restore to a time before it"))
        }
        _ => Ok(()),
    }
}

fn persist(path: &std::path::Path, ledger: &Ledger) {
    if let Err(e) =
        crate::state::write_atomic(path, &serde_json::to_vec(ledger).unwrap_or_default())
    {
        warn!(error = %e, "could not record the archive's ledger");
    }
}

/// A roll-forward done (where it stopped), or being fed to the server's recovery (the server
/// starts meanwhile; the task says where it stopped).
pub enum Rolled {
    Done(String),
    Feeding(tokio::task::JoinHandle<Result<String, String>>),
}

/// Rolls a restored server forward: replays the archived change stream from the restored
/// backup's position to the restore's target (into the running server, or into the data
/// directory before its first start, or fed to that start's recovery as files complete).
pub async fn roll_forward(
    ctx: &Arc<Ctx>,
    intent_id: &str,
    from: &v1::RestoreFrom,
    restored_at: &coffer_strategies::backup::EnginePosition,
) -> Result<Rolled, String> {
    let Some(target) = from.target.clone() else {
        return Ok(Rolled::Done(String::new()));
    };
    let replay = ctx.ds.replay().ok_or_else(|| {
        format!(
            "{} offers no point-in-time restore; restore the backup without a time",
            ctx.ds.title()
        )
    })?;
    if restored_at.log_file().is_empty() {
        return Err(format!(
            "backup {} records no change-log position to roll forward from; restore it without a time",
            from.backup_id
        ));
    }
    let cfg = crate::backups::config(ctx)?.clone();
    let sources = crate::backups::Sources::new(ctx, &cfg, from).await?;
    let bctx = ctx.ds.backup_context().await.map_err(|e| e.to_string())?;
    let dir = ctx.state.root().join("archive-replay");
    let start_file = restored_at.log_file().to_string();
    let start_pos = restored_at.log_offset();
    let encrypted = cfg.encryption;
    let backup_id = from.backup_id.clone();
    crate::intents::progress(
        ctx,
        intent_id,
        "prepare",
        65,
        "replaying the archived change log",
    )
    .await;
    // The sources in order: the backup's, then each that took over (and where).
    let mut members = vec![(
        from.chain
            .last()
            .map(|l| l.instance_id.clone())
            .unwrap_or_default(),
        String::new(),
    )];
    members.extend(
        target
            .handovers
            .iter()
            .map(|h| (h.instance_id.clone(), h.position.clone())),
    );
    // One source's archive fed to a recovery that takes files as they come.
    let delivery = if replay.feeds() && members.len() == 1 {
        Some(replay.prepare_feed(&bctx).map_err(|e| e.to_string())?)
    } else {
        None
    };
    let feeds = delivery.is_some();
    let work = tokio::task::spawn_blocking(move || -> Result<String, String> {
        let sources = Arc::new(sources);
        // A source's segments of one stream: the backup file's for the first source, the
        // newest one's for the others (a source's own files are one stream while it is one).
        let stored_of = |owner: &str, first: bool| -> Vec<archive::Stored> {
            let mine: Vec<(String, u64, u64, &v1::ArchiveSegment)> = target
                .segments
                .iter()
                .filter(|s| s.instance_id == owner)
                .filter_map(|s| {
                    let (f, a, b) = archive::parse_segment_key(&s.key)?;
                    Some((f, a, b, s))
                })
                .collect();
            let stream = if first {
                start_file.clone()
            } else {
                mine.iter()
                    .map(|x| x.0.clone())
                    .max_by_key(|f| replay.order(f))
                    .unwrap_or_default()
            };
            let mut stored = vec![];
            for (file, start, end, s) in mine {
                if !replay.same_stream(&file, &stream) {
                    continue;
                }
                let (sources, owner, key) = (sources.clone(), s.instance_id.clone(), s.key.clone());
                stored.push(archive::Stored {
                    file,
                    start,
                    end,
                    open: Box::new(move || {
                        let storage = sources.of(&owner)?;
                        let raw = storage.open(&key).map_err(|e| format!("{key}: {e}"))?;
                        let (info, mut r) =
                            pipeline::open_prefetched(raw, sources.ring.as_ref(), None)
                                .map_err(|e| format!("archived segment {key}: {e}"))?;
                        if info.backup_id != key {
                            return Err(format!(
                                "archived segment {key} holds the stream of {}; refused",
                                info.backup_id
                            ));
                        }
                        if encrypted && info.key_id.is_none() {
                            return Err(format!(
                                "archived segment {key} is not encrypted, and this deployment encrypts every backup; refused"
                            ));
                        }
                        let h = archive::read_segment_header(&mut r)
                            .map_err(|e| format!("archived segment {key}: {e}"))?;
                        let r: Box<dyn std::io::Read + Send> = Box::new(r);
                        Ok((h, r))
                    }),
                });
            }
            stored
        };
        let _ = std::fs::remove_dir_all(&dir);
        let started = std::time::Instant::now();
        if let Some(to) = &delivery {
            let order = |f: &str| replay.order(f);
            let fed = (|| {
                let position = match target.position.as_str() {
                    "" => None,
                    p => replay.locate(&start_file, p)?,
                };
                archive::feed(
                    &dir,
                    (&start_file, start_pos),
                    stored_of(&members[0].0, true),
                    &order,
                    target.time_unix_us,
                    position,
                    &mut |file, path, cut| {
                        replay
                            .deliver(&bctx, to, file, path, cut)
                            .map_err(|e| e.to_string())
                    },
                )
            })();
            // Also after a failure: the server's recovery stops waiting.
            replay.end_feed(to);
            let _ = std::fs::remove_dir_all(&dir);
            let (rebuilt, stop) = fed?;
            let mib = rebuilt.files.iter().map(|(_, end)| end).sum::<u64>() as f64 / 1048576.0;
            let took = started.elapsed().as_secs_f64();
            return Ok(match stop {
                Some((f, p)) => format!(
                    "rolled forward to {f}:{p} in {took:.2} s ({mib:.1} MiB of archive, fed to the server's recovery)"
                ),
                None => "nothing was written between the backup and the target".into(),
            });
        }
        let result = (|| {
            let order = |f: &str| replay.order(f);
            let mut mib = 0.0;
            // The position replayed up to (what the next source's archive goes on after).
            let mut done: Option<String> = None;
            let mut last_stop: Option<(String, u64)> = None;
            for (i, (owner, _)) in members.iter().enumerate() {
                let last = i + 1 == members.len();
                let mdir = dir.join(i.to_string());
                let segs = stored_of(owner, i == 0);
                let from_file = if i == 0 {
                    start_file.clone()
                } else {
                    let keys: Vec<(String, u64, u64)> = segs
                        .iter()
                        .map(|s| (s.file.clone(), s.start, s.end))
                        .collect();
                    archive::contiguous_from(&keys, &order).ok_or_else(|| {
                        format!("the archive of instance {owner}, which became the source, holds nothing to replay")
                    })?
                };
                let rebuilt = archive::rebuild(&mdir, &from_file, segs, &order)?;
                mib += rebuilt.files.iter().map(|(_, end)| end).sum::<u64>() as f64 / 1048576.0;
                // A datastore whose own recovery follows the change of source (the files go
                // into the data directory before the first start): each source's files up to
                // the next one's first, which holds the rest of that segment as the next source
                // had it. Otherwise each source's transactions after what was replayed.
                let by_files = replay.before_start() && members.len() > 1;
                let from_at = if i == 0 {
                    if !last && !by_files {
                        done = replay.last_position(
                            &rebuilt,
                            &mdir,
                            Some(&(start_file.clone(), start_pos)),
                        )?;
                    }
                    Some((start_file.clone(), start_pos))
                } else if by_files {
                    Some((from_file.clone(), 0))
                } else {
                    let after = done.clone().unwrap_or_else(|| members[i].1.clone());
                    replay.resume_after(&rebuilt, &mdir, &after)?
                };
                let Some(from_at) = from_at else {
                    // Nothing after what was replayed: the next source, or the end.
                    continue;
                };
                let stop = if !last && by_files {
                    let next = stored_of(&members[i + 1].0, false);
                    let keys: Vec<(String, u64, u64)> = next
                        .iter()
                        .map(|s| (s.file.clone(), s.start, s.end))
                        .collect();
                    let next_first = archive::contiguous_from(&keys, &order).ok_or_else(|| {
                        format!("the archive of instance {}, which became the source, holds nothing to replay", members[i + 1].0)
                    })?;
                    let reaches = rebuilt.files.last().is_some_and(|(f, end)| {
                        order(f) >= order(&next_first)
                            || (order(f) + 1 == order(&next_first)
                                && *end >= replay.file_size().unwrap_or(u64::MAX))
                    });
                    if !reaches {
                        return Err(format!(
                            "the archive of instance {owner} ends before {next_first}, where the next source's begins: a hole at the change of source"
                        ));
                    }
                    Some((next_first, 0))
                } else if !last {
                    // Up to what the next source's position covers (a failover's lost
                    // transactions, written past it, are not replayed).
                    let next_at = &members[i + 1].1;
                    match replay.stop_covered_by(&rebuilt, &mdir, next_at)? {
                        Some(s) => {
                            if let Some(p) = replay.last_position(&rebuilt, &mdir, Some(&s))? {
                                done = Some(p);
                            }
                            Some(s)
                        }
                        // Nothing of it after what was replayed: the next source goes on.
                        None => continue,
                    }
                } else {
                    // The last source: to the target (None inside: to its end).
                    let to_target = if target.time_unix_us > 0 {
                        refuse_past_hole(&rebuilt, Some(target.time_unix_us))?;
                        archive::stop_at_time(
                            &rebuilt,
                            (&from_at.0, from_at.1),
                            target.time_unix_us,
                            &order,
                        )
                        .map(Some)
                    } else if !target.position.is_empty() {
                        let at = replay
                            .stop_at_position(&rebuilt, &mdir, &target.position)?
                            .ok_or_else(|| {
                                format!(
                                    "the archive after backup {backup_id} holds no transaction {}",
                                    target.position
                                )
                            })?;
                        Some(Some(at))
                    } else {
                        refuse_past_hole(&rebuilt, None)?;
                        Some(None)
                    };
                    match to_target {
                        Some(s) => s,
                        // A time before anything was written after the start: nothing of
                        // this archive (no stop would mean all of it) — by files, up to where
                        // its stream branched (what came before is the previous source's).
                        None if by_files => replay
                            .switch_point(&rebuilt)
                            .or(Some((from_at.0.clone(), from_at.1))),
                        None => continue,
                    }
                };
                replay
                    .replay(
                        &bctx,
                        &mdir,
                        &rebuilt,
                        (&from_at.0, from_at.1),
                        stop.clone(),
                    )
                    .map_err(|e| e.to_string())?;
                last_stop = stop.or(Some(from_at));
            }
            let took = started.elapsed().as_secs_f64();
            let across = if members.len() > 1 {
                format!(" across {} sources", members.len())
            } else {
                String::new()
            };
            Ok(match last_stop {
                None => "nothing was written between the backup and the target".into(),
                Some(_) if target.time_unix_us == 0 && target.position.is_empty() => format!(
                    "rolled forward to the end of the archive{across} in {took:.2} s ({mib:.1} MiB of archive)"
                ),
                Some((f, p)) => format!(
                    "rolled forward to {f}:{p}{across} in {took:.2} s ({mib:.1} MiB of archive)"
                ),
            })
        })();
        let _ = std::fs::remove_dir_all(&dir);
        result
    });
    if feeds {
        return Ok(Rolled::Feeding(work));
    }
    Ok(Rolled::Done(
        work.await
            .map_err(|e| format!("the replay failed: {e}"))??,
    ))
}
