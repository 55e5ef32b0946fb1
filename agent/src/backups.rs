//! Backup and restore: the configured strategy's archive goes through the sealing pipeline into
//! the configured storage (and back), on a blocking thread with bounded memory, reporting bytes
//! done as progress events.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use coffer_proto::v1;
use coffer_strategies::backup::{
    load_keyring, BackupConfig, BackupError, BackupKind, Build, Manifest, RestoreMode,
};
use coffer_strategies::pipeline::{self, Keyring, SealParams};
use coffer_strategies::storage::{Access, Storage, StorageKind};
use coffer_strategies::Sizing;
use tracing::info;

use crate::Ctx;

pub(crate) fn config(ctx: &Ctx) -> Result<&BackupConfig, String> {
    ctx.cfg.backup.as_ref().ok_or_else(|| {
        "no backup storage is configured for this agent ([backup] in its config)".to_string()
    })
}

fn keyring(cfg: &BackupConfig) -> Result<Option<Keyring>, String> {
    match &cfg.keyring_file {
        Some(p) => load_keyring(p).map(Some),
        None => Ok(None),
    }
}

/// Where a restore reads each link of its chain: this instance's own objects over its own
/// connection; another instance's (restoring its backup, seeding a replica) through the grant
/// the controller sent with the intent (NATS), or that instance's directory (local).
pub struct Sources {
    /// The chain's keys as the controller issued them (plus a shared keyring the agent may
    /// still hold from before keys were per instance).
    pub(crate) ring: Option<Keyring>,
    kind: StorageKind,
    own: String,
    client: async_nats::Client,
    grant: Option<async_nats::Client>,
    built: std::sync::Mutex<std::collections::HashMap<String, Arc<dyn Storage>>>,
}

impl Sources {
    /// Opens the grant of `from` when a link is another instance's and storage is NATS.
    pub(crate) async fn new(
        ctx: &Ctx,
        cfg: &BackupConfig,
        from: &v1::RestoreFrom,
    ) -> Result<Sources, String> {
        let own = ctx.cfg.instance_id.clone();
        let foreign = from.chain.iter().find(|l| l.instance_id != own);
        let grant = match (&cfg.storage, foreign) {
            (StorageKind::Nats { .. }, Some(link)) => {
                if from.grant_sealed.is_empty() {
                    return Err(format!(
                        "backup {} belongs to instance {} and the controller sent no grant to read it; upgrade the controller, then retry",
                        link.backup_id, link.instance_id
                    ));
                }
                let creds = coffer_proto::seal::open(
                    &ctx.secret_key,
                    &coffer_proto::seal::restore_grant_context(&own),
                    &from.grant_sealed,
                )
                .map_err(|e| format!("opening the restore grant: {e}"))?;
                let creds = String::from_utf8(creds)
                    .map_err(|_| "the restore grant is not a creds file".to_string())?;
                let mut opts = async_nats::ConnectOptions::with_credentials(&creds)
                    .map_err(|e| format!("the restore grant: {e}"))?
                    .custom_inbox_prefix(coffer_proto::subjects::agent_inbox_prefix(&own))
                    .name(format!("coffer-agent {own} restore"));
                if let Some(ca) = &ctx.cfg.nats_ca_file {
                    opts = opts.add_root_certificates(ca.clone()).require_tls(true);
                }
                Some(
                    opts.connect(
                        coffer_common::nats::servers(&ctx.cfg.nats_url)
                            .map_err(|e| e.to_string())?,
                    )
                    .await
                    .map_err(|e| format!("connecting to NATS with the restore grant: {e}"))?,
                )
            }
            _ => None,
        };
        let mut ring = keyring(cfg)?;
        for link in from.chain.iter().filter(|l| !l.key_sealed.is_empty()) {
            let k = open_key(ctx, &link.key_id, &link.key_sealed)?;
            ring.get_or_insert_with(Keyring::default)
                .add(&link.key_id, k);
        }
        // The keys of the archived segments a point-in-time restore replays.
        for k in from.target.iter().flat_map(|t| &t.keys) {
            let key = open_key(ctx, &k.key_id, &k.key_sealed)?;
            ring.get_or_insert_with(Keyring::default)
                .add(&k.key_id, key);
        }
        Ok(Sources {
            ring,
            kind: cfg.storage.clone(),
            own,
            client: ctx.client.clone(),
            grant,
            built: Default::default(),
        })
    }

    /// The storage of `owner`'s objects (built on a thread inside the runtime).
    pub(crate) fn of(&self, owner: &str) -> Result<Arc<dyn Storage>, String> {
        let mut built = self.built.lock().unwrap();
        if let Some(s) = built.get(owner) {
            return Ok(s.clone());
        }
        let client = if owner == self.own {
            &self.client
        } else {
            self.grant.as_ref().unwrap_or(&self.client)
        };
        // Another instance's local objects: the links the controller made for this restore.
        let kind = match &self.kind {
            StorageKind::Local { root } if owner != self.own => StorageKind::Local {
                root: root.join(&self.own).join("granted"),
            },
            k => k.clone(),
        };
        let s: Arc<dyn Storage> = Arc::from(kind.build(Some(client), owner, Access::Agent)?);
        built.insert(owner.to_string(), s.clone());
        Ok(s)
    }
}

/// Opens a backup key the controller sealed to this agent.
fn open_key(ctx: &Ctx, key_id: &str, sealed: &[u8]) -> Result<[u8; 32], String> {
    let k = coffer_proto::seal::open(
        &ctx.secret_key,
        &coffer_proto::seal::backup_key_context(&ctx.cfg.instance_id, key_id),
        sealed,
    )
    .map_err(|e| format!("opening the key '{key_id}': {e}"))?;
    k.try_into()
        .map_err(|_| format!("the key '{key_id}' is not 32 bytes"))
}

fn data_key(id: &str) -> String {
    format!("{id}.cfbk")
}
fn manifest_key(id: &str) -> String {
    format!("{id}.json")
}

/// Publishes "N MiB" progress every 2 s while `work` runs.
async fn with_progress<T>(
    ctx: &Arc<Ctx>,
    intent_id: &str,
    kind: &str,
    what: &str,
    done: Arc<AtomicU64>,
    work: tokio::task::JoinHandle<T>,
) -> Result<T, String> {
    tokio::pin!(work);
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    tick.tick().await;
    loop {
        tokio::select! {
            r = &mut work => return r.map_err(|e| format!("{what} task failed: {e}")),
            _ = tick.tick() => {
                let mib = done.load(Ordering::Relaxed) / (1 << 20);
                info!(intent_id, mib, "{what} in progress");
                crate::intents::progress(ctx, intent_id, kind, -1, &format!("{what}: {mib} MiB")).await;
            }
        }
    }
}

/// Takes a backup; returns the result the controller records.
pub async fn backup(
    ctx: &Arc<Ctx>,
    intent_id: &str,
    b: v1::Backup,
) -> Result<v1::BackupResult, String> {
    let cfg = config(ctx)?.clone();

    // The instance's own key, issued with the intent; an agent placed before keys were per
    // instance may still hold the shared keyring (used only when the controller sent no key).
    let key = if !b.key_sealed.is_empty() {
        Some((b.key_id.clone(), open_key(ctx, &b.key_id, &b.key_sealed)?))
    } else if cfg.encryption {
        let ring = keyring(&cfg)?.ok_or("backups are encrypted but the controller sent no key with the backup; upgrade the controller, then retry")?;
        let (id, k) = ring
            .current_key()
            .ok_or("the keyring has no current key; set `current` in the keyring file")?;
        Some((id.to_string(), *k))
    } else {
        None
    };
    // The archive seals its segments with the instance's newest key (and starts with the
    // instance's first backup, whose position it then covers).
    crate::archive::remember_key(ctx, &b.key_id, &b.key_sealed);
    crate::archive::wait_started(ctx).await;
    // What a restore must hold: the tables there both before and after the backup ran.
    let before = ctx.ds.inventory().await.unwrap_or_default();
    let bctx = ctx.ds.backup_context().await.map_err(|e| e.to_string())?;
    let version = ctx.ds.version().await.unwrap_or_default();
    let datastore = ctx.ds.name().to_string();
    let strategy = BackupKind::for_datastore(ctx.cfg.datastore.datastore(), cfg.strategy)
        .ok_or_else(|| format!("no backup strategy backs up {}", ctx.ds.title()))?;
    let instance = ctx.cfg.instance_id.clone();
    let backup_id = b.backup_id.clone();
    let parent_id = b.parent_id.clone();
    let done = Arc::new(AtomicU64::new(0));
    let done2 = done.clone();
    let client = ctx.client.clone();
    let work = tokio::task::spawn_blocking(move || -> Result<v1::BackupResult, String> {
        let storage = cfg.storage.build(Some(&client), &instance, Access::Agent)?;
        let strategy = strategy.build();
        let parent = if parent_id.is_empty() {
            None
        } else {
            Some(read_manifest(storage.as_ref(), &parent_id)?)
        };
        let writer = storage
            .create(&data_key(&backup_id))
            .map_err(|e| e.to_string())?;
        let params = SealParams {
            backup_id: backup_id.clone(),
            key: key.clone(),
            zstd_level: Some(cfg.zstd_level),
            chunk_size: pipeline::DEFAULT_CHUNK,
            fixed: None,
        };
        let mut sealer = pipeline::SealWriter::new(writer, &params).map_err(|e| e.to_string())?;
        let position = strategy
            .backup(
                &bctx,
                parent.as_ref().map(|m| &m.position),
                &mut sealer,
                &mut |n| done2.store(n, Ordering::Relaxed),
            )
            .map_err(|e| match e {
                BackupError::Io(io) => storage_error("writing the backup", &io),
                other => other.to_string(),
            })?;
        let (mut writer, sealed) = sealer
            .finish()
            .map_err(|e| storage_error("sealing the backup", &e))?;
        writer
            .flush()
            .map_err(|e| storage_error("writing the backup", &e))?;
        writer.commit().map_err(|e| e.to_string())?;
        let manifest = Manifest {
            backup_id: backup_id.clone(),
            instance_id: instance.clone(),
            datastore,
            datastore_version: version,
            strategy: strategy.name().into(),
            parent_id: parent.map(|m| m.backup_id),
            position,
            archive_bytes: sealed.archive_bytes,
            stored_bytes: sealed.stored_bytes,
            sha256: sealed.sha256.clone(),
            compression: Some(format!("zstd-{}", cfg.zstd_level)),
            encrypted: key.is_some(),
            key_id: key.map(|k| k.0),
            format_version: pipeline::VERSION,
            created_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        let manifest_json = serde_json::to_string_pretty(&manifest).map_err(|e| e.to_string())?;
        let written = (|| -> Result<(), String> {
            let mut m = storage
                .create(&manifest_key(&backup_id))
                .map_err(|e| e.to_string())?;
            m.write_all(manifest_json.as_bytes())
                .map_err(|e| e.to_string())?;
            m.commit().map_err(|e| e.to_string())
        })();
        if let Err(e) = written {
            // Without its manifest the stream must not look like a backup.
            let _ = storage.delete(&data_key(&backup_id));
            return Err(format!("writing the manifest: {e}"));
        }
        Ok(v1::BackupResult {
            backup_id: backup_id.clone(),
            stored_bytes: sealed.stored_bytes,
            sha256: sealed.sha256,
            location: storage.location(&data_key(&backup_id)),
            manifest_json,
            archive_since_unix_ms: 0,
            inventory: vec![],
            change_file: String::new(),
        })
    });
    let mut result = with_progress(ctx, intent_id, "backup", "backup", done, work).await??;
    let after = ctx.ds.inventory().await.unwrap_or_default();
    result.inventory = before.into_iter().filter(|t| after.contains(t)).collect();
    if let Ok(m) = serde_json::from_str::<Manifest>(&result.manifest_json) {
        result.archive_since_unix_ms = crate::archive::covering_since(ctx, m.position.log_file());
        result.change_file = m.position.log_file().to_string();
    }
    Ok(result)
}

/// An i/o failure on the way to storage, saying so when the storage is full.
fn storage_error(what: &str, e: &std::io::Error) -> String {
    if e.kind() == std::io::ErrorKind::StorageFull {
        format!(
            "{what}: the backup storage is full ({e}); free space or raise its limit, then retry"
        )
    } else {
        format!("{what}: {e}")
    }
}

/// Removes whatever an interrupted backup left (a partial stream, a stream without manifest)
/// where the agent may (a local directory); NATS storage leaves that to the controller.
pub async fn discard(ctx: &Arc<Ctx>, backup_id: &str) {
    let Ok(cfg) = config(ctx) else { return };
    let cfg = cfg.clone();
    let client = ctx.client.clone();
    let id = backup_id.to_string();
    let own = ctx.cfg.instance_id.clone();
    let _ = tokio::task::spawn_blocking(move || {
        let Ok(storage) = cfg.storage.build(Some(&client), &own, Access::Agent) else {
            return;
        };
        storage.discard_partial(&data_key(&id));
        storage.discard_partial(&manifest_key(&id));
        if !storage.exists(&manifest_key(&id)) {
            let _ = storage.delete(&data_key(&id));
        }
    })
    .await;
}

fn read_manifest(
    storage: &dyn coffer_strategies::storage::Storage,
    id: &str,
) -> Result<Manifest, String> {
    let mut s = String::new();
    storage
        .open(&manifest_key(id))
        .map_err(|e| format!("backup {id}: {e}"))?
        .read_to_string(&mut s)
        .map_err(|e| format!("backup {id}: reading the manifest: {e}"))?;
    let m: Manifest =
        serde_json::from_str(&s).map_err(|e| format!("backup {id}: bad manifest: {e}"))?;
    if m.backup_id != id {
        return Err(format!(
            "backup {id}: the stored manifest names backup {}; refusing a manifest that was replaced",
            m.backup_id
        ));
    }
    Ok(m)
}

/// The chain to restore: exactly the links the controller recorded (full backup first), each
/// stored manifest checked against them: the instance it came from, the stream digest, its
/// parent. A restore queued without a recorded chain (by an older controller) follows the
/// stored parents.
fn chain_of(sources: &Sources, from: &v1::RestoreFrom) -> Result<Vec<Manifest>, String> {
    let id = &from.backup_id;
    if from.chain.is_empty() {
        let own = sources.of(&sources.own)?;
        let storage = own.as_ref();
        let mut chain = vec![read_manifest(storage, id)?];
        while let Some(parent) = chain.last().and_then(|m| m.parent_id.clone()) {
            if chain.len() > 1000 {
                return Err(format!("backup {id}: the chain is longer than 1000 links"));
            }
            chain.push(read_manifest(storage, &parent)?);
        }
        chain.reverse();
        return Ok(chain);
    }
    if from.chain.last().map(|l| &l.backup_id) != Some(id) {
        return Err(format!(
            "backup {id}: the recorded chain does not end with it"
        ));
    }
    let mut chain: Vec<Manifest> = vec![];
    for link in &from.chain {
        let m = read_manifest(sources.of(&link.instance_id)?.as_ref(), &link.backup_id)?;
        let bid = &link.backup_id;
        if m.instance_id != link.instance_id {
            return Err(format!(
                "backup {bid}: the stored manifest says it was taken from instance {}, the controller recorded {}; refused",
                m.instance_id, link.instance_id
            ));
        }
        if !m.sha256.eq_ignore_ascii_case(&link.sha256) {
            return Err(format!(
                "backup {bid}: the stored manifest's digest is not the one the controller recorded; the backup was replaced, refused"
            ));
        }
        if !link.key_id.is_empty() && m.key_id.as_deref() != Some(link.key_id.as_str()) {
            return Err(format!(
                "backup {bid}: the stored manifest names key {}, the controller issued {}; refused",
                m.key_id.as_deref().unwrap_or("none"),
                link.key_id
            ));
        }
        let parent = chain.last().map(|p| p.backup_id.as_str());
        if m.parent_id.as_deref() != parent {
            return Err(format!(
                "backup {bid}: the stored manifest names parent {}, the controller recorded {}; refused",
                m.parent_id.as_deref().unwrap_or("none"),
                parent.unwrap_or("none")
            ));
        }
        chain.push(m);
    }
    Ok(chain)
}

/// What is left to do of a restore once the server runs.
pub enum Restored {
    /// The data directory holds the backup's files, as of this position.
    Files(coffer_strategies::backup::EnginePosition),
    /// A logical backup, loaded into the running server by [`load`] (from these sources).
    Load(Box<(Manifest, Sources)>),
}

/// Opens one stored backup: fetched, authenticated, decrypted and checked against its manifest
/// on a reading thread of its own.
fn open_link(
    storage: &dyn coffer_strategies::storage::Storage,
    ring: Option<&Keyring>,
    encrypted: bool,
    m: &Manifest,
) -> Result<Box<dyn Read + Send>, String> {
    let bid = &m.backup_id;
    if let (true, Some(k)) = (m.encrypted, m.key_id.as_deref()) {
        if ring.is_none_or(|r| r.get(k).is_none()) {
            return Err(if coffer_strategies::backup::split_key_id(k).is_some() {
                format!("backup {bid} is encrypted with key '{k}', which the controller did not issue for this restore")
            } else {
                format!("backup {bid} is encrypted with key '{k}', which is not in the keyring: it was sealed with a shared operator key before keys were per instance, and agents no longer hold the operator's keyring; restore it on an agent configured with that keyring")
            });
        }
    }
    let raw = storage
        .open(&data_key(bid))
        .map_err(|e| format!("backup {bid}: {e}"))?;
    let (info, reader) =
        pipeline::open_prefetched(raw, ring, Some(m.sha256.clone())).map_err(|e| {
            match pipeline::format_error(&e) {
                Some(f) => f.to_string(),
                None => format!("backup {bid}: {e}"),
            }
        })?;
    if info.backup_id != *bid {
        return Err(format!(
            "backup {bid}: the stored stream belongs to backup {}",
            info.backup_id
        ));
    }
    // While backups are encrypted, a plaintext stream is never one of ours.
    if encrypted && info.key_id.is_none() {
        return Err(format!(
            "backup {bid}: the stored stream is not encrypted, and this deployment encrypts every backup; refused"
        ));
    }
    if m.encrypted != info.key_id.is_some() || (m.encrypted && m.key_id != info.key_id) {
        return Err(format!(
            "backup {bid}: the stored stream's encryption does not match its manifest; refused"
        ));
    }
    Ok(Box::new(reader))
}

/// A strategy's failure on a backup's stream, naming the backup (or the stream's own fault).
fn link_error(bid: &str, e: BackupError) -> String {
    match e {
        BackupError::Io(io) => match pipeline::format_error(&io) {
            Some(f) => f.to_string(),
            None => format!("backup {bid}: {io}"),
        },
        other => format!("backup {bid}: {other}"),
    }
}

fn strategy_of(m: &Manifest) -> Result<BackupKind, String> {
    BackupKind::from_name(&m.strategy).ok_or_else(|| {
        format!(
            "backup {}: strategy '{}' is unknown to this agent",
            m.backup_id, m.strategy
        )
    })
}

/// Fills the data directory from a backup (fetched, authenticated, decrypted, checked, prepared)
/// and writes this instance's own configuration and credentials. A logical backup instead gets
/// a freshly initialised data directory and is loaded by [`load`] once the server runs.
pub async fn restore(
    ctx: &Arc<Ctx>,
    intent_id: &str,
    from: &v1::RestoreFrom,
    sizing: &Sizing,
) -> Result<Restored, String> {
    let cfg = config(ctx)?.clone();
    let encrypted = cfg.encryption;
    let from = from.clone();
    let data_dir = ctx.ds.data_path();
    let scratch = ctx.state.root().join("restore-scratch");
    let id = from.backup_id.clone();
    let datastore = ctx.ds.name().to_string();
    let done = Arc::new(AtomicU64::new(0));
    let done2 = done.clone();
    let dd = data_dir.clone();
    let sources = Sources::new(ctx, &cfg, &from).await?;
    let work = tokio::task::spawn_blocking(move || -> Result<Restored, String> {
        // The chain, full backup first, bound to the controller's record.
        let mut chain = chain_of(&sources, &from)?;
        if let Some(m) = chain.iter().find(|m| m.datastore != datastore) {
            return Err(format!(
                "backup {} is a {} backup; it cannot be restored into a {datastore} instance",
                m.backup_id, m.datastore
            ));
        }
        let strategy = strategy_of(&chain[0])?.build();
        if strategy.restore_mode() == RestoreMode::Load {
            if chain.len() > 1 {
                return Err(format!(
                    "backup {id}: a {} backup cannot have a parent",
                    strategy.name()
                ));
            }
            // Authenticate the whole stream before anything is initialised, so a wrong key or
            // a damaged stream fails here instead of half-way through the load.
            let storage = sources.of(&chain[0].instance_id)?;
            let mut reader = open_link(
                storage.as_ref(),
                sources.ring.as_ref(),
                encrypted,
                &chain[0],
            )?;
            let mut report = |n: u64| done2.store(n, Ordering::Relaxed);
            coffer_strategies::backup::pump(&mut reader, &mut std::io::sink(), &mut report)
                .map_err(|e| link_error(&chain[0].backup_id, BackupError::Io(e)))?;
            drop(reader);
            return Ok(Restored::Load(Box::new((chain.remove(0), sources))));
        }
        let _ = std::fs::remove_dir_all(&dd);
        let result = (|| -> Result<(), String> {
            for (i, m) in chain.iter().enumerate() {
                let storage = sources.of(&m.instance_id)?;
                let mut reader = open_link(storage.as_ref(), sources.ring.as_ref(), encrypted, m)?;
                let mut report = |n: u64| done2.store(n, Ordering::Relaxed);
                let applied = if i == 0 {
                    strategy.restore(&dd, &scratch, &mut reader, &mut report)
                } else {
                    strategy_of(m)?.build().apply_incremental(
                        &dd,
                        &scratch,
                        &mut reader,
                        &mut report,
                    )
                };
                applied.map_err(|e| link_error(&m.backup_id, e))?;
            }
            Ok(())
        })();
        let _ = std::fs::remove_dir_all(&scratch);
        if let Err(e) = result {
            let _ = std::fs::remove_dir_all(&dd);
            return Err(e);
        }
        Ok(Restored::Files(
            chain.last().map(|m| m.position.clone()).unwrap_or_default(),
        ))
    });
    let restored = with_progress(ctx, intent_id, "prepare", "restore", done, work).await??;
    match &restored {
        Restored::Files(_) => ctx.ds.initialize_restored(sizing).await,
        Restored::Load(..) => ctx.ds.initialize(sizing).await,
    }
    .map_err(|e| e.to_string())?;
    Ok(restored)
}

/// Loads a logical backup into the running server (the second half of [`restore`]).
pub async fn load(
    ctx: &Arc<Ctx>,
    intent_id: &str,
    m: Manifest,
    sources: Sources,
) -> Result<(), String> {
    let cfg = config(ctx)?.clone();
    let bctx = ctx.ds.backup_context().await.map_err(|e| e.to_string())?;
    let epilogue = ctx.ds.restore_epilogue().await.map_err(|e| e.to_string())?;
    let done = Arc::new(AtomicU64::new(0));
    let done2 = done.clone();
    let work = tokio::task::spawn_blocking(move || -> Result<(), String> {
        let storage = sources.of(&m.instance_id)?;
        let strategy = strategy_of(&m)?.build();
        let mut reader = open_link(storage.as_ref(), sources.ring.as_ref(), cfg.encryption, &m)?;
        strategy
            .load(&bctx, &mut reader, &epilogue, &mut |n| {
                done2.store(n, Ordering::Relaxed)
            })
            .map_err(|e| link_error(&m.backup_id, e))
    });
    let r = with_progress(ctx, intent_id, "prepare", "restore", done, work).await?;
    // The admin's connections may have been opened before the load changed its password.
    ctx.ds.disconnect().await;
    r
}
