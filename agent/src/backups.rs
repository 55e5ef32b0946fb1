//! Backup and restore: the configured strategy's archive goes through the sealing pipeline into
//! the configured storage (and back), on a blocking thread with bounded memory, reporting bytes
//! done as progress events.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use coffer_proto::v1;
use coffer_strategies::backup::{load_keyring, BackupConfig, Manifest};
use coffer_strategies::pipeline::{self, Keyring, SealParams};
use coffer_strategies::Sizing;
use tracing::info;

use crate::Ctx;

fn config(ctx: &Ctx) -> Result<&BackupConfig, String> {
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

    let key = if cfg.encryption {
        let ring = keyring(&cfg)?.ok_or("backups are encrypted but no keyring_file is configured; configure one or set encryption = false")?;
        let (id, k) = ring
            .current_key()
            .ok_or("the keyring has no current key; set `current` in the keyring file")?;
        Some((id.to_string(), *k))
    } else {
        None
    };
    let bctx = ctx.ds.backup_context().await.map_err(|e| e.to_string())?;
    let version = ctx.ds.version().await.unwrap_or_default();
    let datastore = ctx.ds.name().to_string();
    let instance = ctx.cfg.instance_id.clone();
    let backup_id = b.backup_id.clone();
    let parent_id = b.parent_id.clone();
    let done = Arc::new(AtomicU64::new(0));
    let done2 = done.clone();
    let work = tokio::task::spawn_blocking(move || -> Result<v1::BackupResult, String> {
        let storage = cfg.storage.build();
        let strategy = cfg.strategy.build();
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
            .map_err(|e| e.to_string())?;
        let (mut writer, sealed) = sealer
            .finish()
            .map_err(|e| format!("sealing the backup: {e}"))?;
        writer
            .flush()
            .map_err(|e| format!("writing the backup: {e}"))?;
        writer.commit().map_err(|e| e.to_string())?;
        let manifest = Manifest {
            backup_id: backup_id.clone(),
            instance_id: instance,
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
        })
    });
    with_progress(ctx, intent_id, "backup", "backup", done, work).await?
}

/// Removes whatever an interrupted backup left (a partial stream, a stream without manifest).
pub async fn discard(ctx: &Arc<Ctx>, backup_id: &str) {
    let Ok(cfg) = config(ctx) else { return };
    let storage = cfg.storage.build();
    let id = backup_id.to_string();
    let _ = tokio::task::spawn_blocking(move || {
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
    serde_json::from_str(&s).map_err(|e| format!("backup {id}: bad manifest: {e}"))
}

/// Fills the data directory from a backup (fetched, authenticated, decrypted, checked, prepared)
/// and writes this instance's own configuration and credentials.
pub async fn restore(
    ctx: &Arc<Ctx>,
    intent_id: &str,
    backup_id: &str,
    sizing: &Sizing,
) -> Result<(), String> {
    let cfg = config(ctx)?.clone();
    let ring = keyring(&cfg)?;
    let data_dir = ctx.ds.data_path();
    let scratch = ctx.state.root().join("restore-scratch");
    let id = backup_id.to_string();
    let done = Arc::new(AtomicU64::new(0));
    let done2 = done.clone();
    let dd = data_dir.clone();
    let work = tokio::task::spawn_blocking(move || -> Result<(), String> {
        let storage = cfg.storage.build();
        let strategy = cfg.strategy.build();
        // The chain, full backup first.
        let mut chain = vec![read_manifest(storage.as_ref(), &id)?];
        while let Some(parent) = chain.last().and_then(|m| m.parent_id.clone()) {
            if chain.len() > 1000 {
                return Err(format!("backup {id}: the chain is longer than 1000 links"));
            }
            chain.push(read_manifest(storage.as_ref(), &parent)?);
        }
        chain.reverse();
        let _ = std::fs::remove_dir_all(&dd);
        let result = (|| -> Result<(), String> {
            for (i, m) in chain.iter().enumerate() {
                let bid = &m.backup_id;
                let raw = storage
                    .open(&data_key(bid))
                    .map_err(|e| format!("backup {bid}: {e}"))?;
                // Reading, authentication, decryption and the checksum run on their own thread.
                let (info, mut reader) =
                    pipeline::open_prefetched(raw, ring.as_ref(), Some(m.sha256.clone())).map_err(
                        |e| match pipeline::format_error(&e) {
                            Some(f) => f.to_string(),
                            None => format!("backup {bid}: {e}"),
                        },
                    )?;
                if info.backup_id != *bid {
                    return Err(format!(
                        "backup {bid}: the stored stream belongs to backup {}",
                        info.backup_id
                    ));
                }
                let mut report = |n: u64| done2.store(n, Ordering::Relaxed);
                let applied = if i == 0 {
                    strategy.restore(&dd, &scratch, &mut reader, &mut report)
                } else {
                    strategy.apply_incremental(&dd, &scratch, &mut reader, &mut report)
                };
                applied.map_err(|e| match e {
                    coffer_strategies::backup::BackupError::Io(io) => {
                        match pipeline::format_error(&io) {
                            Some(f) => f.to_string(),
                            None => format!("backup {bid}: {io}"),
                        }
                    }
                    other => format!("backup {bid}: {other}"),
                })?;
            }
            Ok(())
        })();
        let _ = std::fs::remove_dir_all(&scratch);
        if let Err(e) = result {
            let _ = std::fs::remove_dir_all(&dd);
            return Err(e);
        }
        Ok(())
    });
    with_progress(ctx, intent_id, "prepare", "restore", done, work).await??;
    ctx.ds
        .initialize_restored(sizing)
        .await
        .map_err(|e| e.to_string())
}
