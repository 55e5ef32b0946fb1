//! Backup keys. The operator's keyring (`[backup] keyring_file`) stays with the controller;
//! each backup is sealed with its instance's own key (`coffer_common::backup::instance_key`),
//! issued sealed to the agent with the backup intent, and a restore gets exactly the keys of its
//! chain, sealed to the restoring agent. A leaked agent key opens that instance's backups only.

use coffer_common::backup::{instance_key, load_keyring, split_key_id};
use coffer_common::pipeline::Keyring;
use coffer_proto::{seal, v1};

use crate::error::ApiError;
use crate::store::BackupRow;
use crate::App;

/// The operator keyring, when backups are encrypted (read on each use, so a rotation takes
/// effect without a restart).
fn ring(app: &App) -> Result<Option<Keyring>, ApiError> {
    let Some(cfg) = app.cfg.backup.as_ref().filter(|b| b.encryption) else {
        return Ok(None);
    };
    let path = cfg.keyring_file.as_ref().ok_or_else(|| {
        ApiError::conflict("Backups are encrypted but the controller has no keyring: set [backup] keyring_file (or encryption = false), then retry.")
    })?;
    load_keyring(path).map(Some).map_err(|e| {
        ApiError::conflict(format!(
            "Backups are encrypted but the controller's keyring cannot be used ({e}); fix it, then retry."
        ))
    })
}

/// The key a new backup of `instance` is sealed with: `(key id, key sealed to its agent)`, or
/// None when backups are not encrypted.
pub fn issue(
    app: &App,
    instance: &str,
    agent_key: &[u8],
) -> Result<Option<(String, Vec<u8>)>, ApiError> {
    let Some(ring) = ring(app)? else {
        return Ok(None);
    };
    let master = ring.current.clone().ok_or_else(|| {
        ApiError::conflict(
            "The controller's keyring has no current key: set `current` in the keyring file, then retry.",
        )
    })?;
    let (id, key) = instance_key(&ring, &master, instance).map_err(ApiError::conflict)?;
    let sealed = seal::seal(agent_key, &seal::backup_key_context(instance, &id), &key)
        .map_err(|e| anyhow::anyhow!("sealing a backup key: {e}"))?;
    Ok(Some((id, sealed)))
}

/// Checks that every link's key can be issued (before anything is stored for a restore).
pub fn check_chain(app: &App, chain: &[BackupRow]) -> Result<(), ApiError> {
    let Some(ring) = ring(app)? else {
        return Ok(());
    };
    for b in chain {
        if let Some((master, owner)) = b.key_id.as_deref().and_then(split_key_id) {
            instance_key(&ring, master, owner).map_err(|_| {
                ApiError::conflict(format!(
                    "Backup {} is sealed with operator key '{master}', which is not in the controller's keyring; put it back (a retired key stays in the keyring while backups use it), then retry.",
                    b.id
                ))
            })?;
        }
    }
    Ok(())
}

/// Seals into `restore` each link's key for the restoring agent (`target`, public key `key`).
/// Links without a key id (unencrypted, or sealed with a shared key before keys were per
/// instance) get none.
pub fn seal_chain(
    app: &App,
    restore: &mut v1::RestoreFrom,
    target: &str,
    key: &[u8],
) -> Result<(), ApiError> {
    let Some(ring) = ring(app)? else {
        return Ok(());
    };
    for link in &mut restore.chain {
        let Some((master, owner)) = split_key_id(&link.key_id) else {
            continue;
        };
        let (_, k) = instance_key(&ring, master, owner).map_err(ApiError::conflict)?;
        link.key_sealed = seal::seal(key, &seal::backup_key_context(target, &link.key_id), &k)
            .map_err(|e| anyhow::anyhow!("sealing a backup key: {e}"))?;
    }
    Ok(())
}

/// Seals into a point-in-time restore the keys its archived segments may be sealed with: each
/// segment owner's instance key under every operator key of the keyring (a segment is sealed
/// with the key of the owner's latest backup when it was shipped).
pub fn seal_archive_keys(
    app: &App,
    target: &mut v1::RestoreTarget,
    restoring: &str,
    key: &[u8],
) -> Result<(), ApiError> {
    let Some(ring) = ring(app)? else {
        return Ok(());
    };
    let owners: std::collections::BTreeSet<&str> = target
        .segments
        .iter()
        .map(|s| s.instance_id.as_str())
        .collect();
    let mut keys = vec![];
    for owner in owners {
        for master in ring.ids() {
            let (id, k) = instance_key(&ring, master, owner).map_err(ApiError::conflict)?;
            let sealed = seal::seal(key, &seal::backup_key_context(restoring, &id), &k)
                .map_err(|e| anyhow::anyhow!("sealing a backup key: {e}"))?;
            keys.push(v1::ArchiveKey {
                key_id: id,
                key_sealed: sealed,
            });
        }
    }
    target.keys = keys;
    Ok(())
}
