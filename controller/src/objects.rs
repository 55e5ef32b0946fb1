//! The controller's side of stored objects (backups, published logs): each instance's storage
//! exists before its agent writes, deletion and clean-up are done here (agents can only create
//! and read their own objects), and a restore of another instance's chain carries a grant that
//! reads exactly that chain. See `coffer_common::storage`.

use anyhow::Context;
use coffer_common::storage::{nats as nats_storage, Access, Storage, StorageKind};
use coffer_proto::v1;

use crate::App;

/// Makes sure `instance`'s storage exists (its NATS stream; nothing for a local directory).
/// Cheap after the first success per controller process.
pub async fn ensure(app: &App, instance: &str) -> anyhow::Result<()> {
    let Some(StorageKind::Nats { bucket, max_bytes }) = app.cfg.backup.as_ref().map(|b| &b.storage)
    else {
        return Ok(());
    };
    if app.storage_ready.lock().unwrap().contains(instance) {
        return Ok(());
    }
    nats_storage::ensure_stream(
        app.client.clone(),
        bucket,
        instance,
        *max_bytes,
        app.cfg.nats_replicas as usize,
    )
    .await
    .map_err(anyhow::Error::msg)?;
    app.storage_ready
        .lock()
        .unwrap()
        .insert(instance.to_string());
    Ok(())
}

/// The objects of a backup: its metafile and its stream.
pub fn backup_keys(id: &str) -> [String; 2] {
    [format!("{id}.json"), format!("{id}.cfbk")]
}

/// Runs `f` on `owner`'s storage, off the async runtime (nothing without backup storage).
async fn with_storage(
    app: &App,
    owner: &str,
    f: impl FnOnce(&dyn Storage) -> anyhow::Result<()> + Send + 'static,
) -> anyhow::Result<()> {
    let Some(cfg) = &app.cfg.backup else {
        return Ok(());
    };
    let (kind, client, owner) = (cfg.storage.clone(), app.client.clone(), owner.to_string());
    tokio::task::spawn_blocking(move || {
        let storage = kind
            .build(Some(&client), &owner, Access::Controller)
            .map_err(anyhow::Error::msg)?;
        f(storage.as_ref())
    })
    .await
    .context("deleting stored objects")?
}

/// Deletes `keys` of `owner`'s objects (whatever state they are in: committed, or chunks a
/// failed writer left).
pub async fn delete(app: &App, owner: &str, keys: Vec<String>) -> anyhow::Result<()> {
    with_storage(app, owner, move |storage| {
        for k in &keys {
            storage
                .delete(k)
                .with_context(|| format!("deleting {}", storage.location(k)))?;
        }
        Ok(())
    })
    .await
}

/// Deletes every object of `owner` whose key starts with `prefix`, then `also` (a published
/// log's pieces and its metafile).
pub async fn delete_prefix(
    app: &App,
    owner: &str,
    prefix: &str,
    also: Option<&str>,
) -> anyhow::Result<()> {
    let (prefix, also) = (prefix.to_string(), also.map(str::to_string));
    with_storage(app, owner, move |storage| {
        coffer_common::logs::discard(storage, &prefix, also.as_deref()).map_err(anyhow::Error::msg)
    })
    .await
}

/// Removes `owner`'s storage once its instance is deleted and none of its backups is kept.
pub async fn forget_if_unused(app: &App, owner: &str) -> anyhow::Result<()> {
    let Some(StorageKind::Nats { bucket, .. }) = app.cfg.backup.as_ref().map(|b| &b.storage) else {
        return Ok(());
    };
    if app.store.instance(owner).await?.is_some() || app.store.has_backups_of(owner).await? {
        return Ok(());
    }
    nats_storage::remove_stream(app.client.clone(), bucket, owner)
        .await
        .map_err(anyhow::Error::msg)?;
    app.storage_ready.lock().unwrap().remove(owner);
    Ok(())
}

fn local_root(app: &App) -> Option<&std::path::Path> {
    match app.cfg.backup.as_ref().map(|b| &b.storage) {
        Some(StorageKind::Local { root }) => Some(root),
        _ => None,
    }
}

/// Makes a stored object root's and world-readable (local storage).
fn take_over(p: &std::path::Path) {
    if nix::unistd::geteuid().is_root() {
        if let Err(e) = std::os::unix::fs::lchown(p, Some(0), Some(0)) {
            tracing::warn!(path = %p.display(), error = %e, "could not take over a stored object");
            return;
        }
    }
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o644));
}

/// Makes a committed local backup the controller's: owned by root and not writable, in the
/// instance's sticky directory, so its agent (running as its own user) can read it but neither
/// replace nor delete it. (The `nats` backend's subjects are write-once by themselves.)
pub fn seal_committed(app: &App, owner: &str, backup_id: &str) {
    let Some(root) = local_root(app) else { return };
    // The stream first, then its metafile.
    for key in backup_keys(backup_id).into_iter().rev() {
        take_over(&root.join(owner).join(&key));
    }
}

/// The directory of `target` where the controller links the objects a restore may read from
/// other instances (`local` storage): `<root>/<target>/granted/<source>/<key>`.
pub fn local_grants_dir(root: &std::path::Path, target: &str) -> std::path::PathBuf {
    root.join(target).join("granted")
}

/// Links into the restoring instance's grant directory exactly the objects of the chain that
/// are other instances' (`local` storage: the same grant as the NATS one, made by hard links;
/// other instances' directories stay closed to it).
pub fn grant_local(app: &App, restore: &v1::RestoreFrom, target: &str) -> anyhow::Result<()> {
    let Some(root) = local_root(app) else {
        return Ok(());
    };
    let grants = local_grants_dir(root, target);
    let segments = restore.target.iter().flat_map(|t| &t.segments);
    for s in segments.filter(|s| s.instance_id != target) {
        let (from, to) = (
            root.join(&s.instance_id).join(&s.key),
            grants.join(&s.instance_id).join(&s.key),
        );
        if let Some(dir) = to.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        // The controller's from now on (as a committed backup): readable by the restoring
        // agent, and neither replaceable nor removable by the one that wrote it.
        take_over(&from);
        let _ = std::fs::remove_file(&to);
        std::fs::hard_link(&from, &to)
            .with_context(|| format!("granting {} to instance {target}", from.display()))?;
    }
    for l in restore.chain.iter().filter(|l| l.instance_id != target) {
        let dir = grants.join(&l.instance_id);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        for key in backup_keys(&l.backup_id).into_iter().rev() {
            let (from, to) = (root.join(&l.instance_id).join(&key), dir.join(&key));
            let _ = std::fs::remove_file(&to);
            std::fs::hard_link(&from, &to)
                .with_context(|| format!("granting {} to instance {target}", from.display()))?;
        }
    }
    Ok(())
}

/// Removes a restore's grant links (after the restore, or with the instance).
pub fn drop_local_grants(app: &App, target: &str) {
    if let Some(root) = local_root(app) {
        let _ = std::fs::remove_dir_all(local_grants_dir(root, target));
    }
}

/// Seals into `restore` the grant its agent (`target`, public key `key`) needs to read the
/// links of the chain that are other instances' (NATS storage only; its own it reads anyway).
pub fn seal_grant(
    app: &App,
    restore: &mut v1::RestoreFrom,
    target: &str,
    key: &[u8],
) -> anyhow::Result<()> {
    let Some(StorageKind::Nats { bucket, .. }) = app.cfg.backup.as_ref().map(|b| &b.storage) else {
        return Ok(());
    };
    let objects: Vec<(String, String)> = restore
        .chain
        .iter()
        .filter(|l| l.instance_id != target)
        .flat_map(|l| backup_keys(&l.backup_id).map(|k| (l.instance_id.clone(), k)))
        .chain(
            restore
                .target
                .iter()
                .flat_map(|t| &t.segments)
                .filter(|s| s.instance_id != target)
                .map(|s| (s.instance_id.clone(), s.key.clone())),
        )
        .collect();
    if objects.is_empty() {
        return Ok(());
    }
    let authority = app
        .authority
        .as_ref()
        .context("restoring another instance's backup from NATS storage needs [nats_auth]")?;
    let creds = authority.restore_grant(target, bucket, &objects)?;
    restore.grant_sealed = coffer_proto::seal::seal(
        key,
        &coffer_proto::seal::restore_grant_context(target),
        creds.as_bytes(),
    )
    .map_err(|e| anyhow::anyhow!("sealing the restore grant: {e}"))?;
    Ok(())
}

/// The archived segments of `owner` (keys), oldest file first: what a point-in-time restore
/// may replay.
pub async fn archive_segments(app: &App, owner: &str) -> anyhow::Result<Vec<String>> {
    let out = std::sync::Arc::new(std::sync::Mutex::new(vec![]));
    let o = out.clone();
    with_storage(app, owner, move |storage| {
        let keys = storage
            .list(coffer_common::archive::PREFIX)
            .context("listing the archive")?;
        *o.lock().unwrap() = keys;
        Ok(())
    })
    .await?;
    let keys = std::mem::take(&mut *out.lock().unwrap());
    Ok(keys)
}

/// Removes `owner`'s archived files that sort before `file` (no kept backup needs them);
/// returns how many objects went.
pub async fn remove_archive_before(app: &App, owner: &str, file: &str) -> anyhow::Result<usize> {
    let file = file.to_string();
    remove_archived(app, owner, move |keys| {
        coffer_common::archive::before(keys, &file)
    })
    .await
}

/// Removes the archived pieces of `owner`'s files that are now stored whole.
pub async fn remove_compacted(app: &App, owner: &str) -> anyhow::Result<()> {
    remove_archived(app, owner, coffer_common::archive::covered)
        .await
        .map(|_| ())
}

/// Removes the archived objects of `owner` that `pick` chooses among its archive's keys;
/// returns how many went.
async fn remove_archived(
    app: &App,
    owner: &str,
    pick: impl FnOnce(&[String]) -> Vec<String> + Send + 'static,
) -> anyhow::Result<usize> {
    let gone = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let g = gone.clone();
    with_storage(app, owner, move |storage| {
        let keys = storage
            .list(coffer_common::archive::PREFIX)
            .context("listing the archive")?;
        for k in pick(&keys) {
            storage
                .delete(&k)
                .with_context(|| format!("deleting {}", storage.location(&k)))?;
            g.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    })
    .await?;
    Ok(gone.load(std::sync::atomic::Ordering::Relaxed))
}
