//! Where backup streams go. One trait, selected by name in configuration; a new backend is one
//! type implementing [`Storage`] and one [`StorageKind`] variant.
//!
//! Invariant: nothing is visible under an object's key until its writer commits, so a failed or
//! interrupted backup leaves nothing that lists or restores as good.
//!
//! Objects belong to an owner (an instance id): a backend is built for one owner and its keys
//! are that owner's. An agent's backend ([`Access::Agent`]) creates and reads its own owner's
//! objects and nothing else, never deletes, purges or lists; deletion, retention and clean-up of
//! what a failed writer left are the controller's ([`Access::Controller`]). The `nats` backend
//! has the server enforce it (one stream per instance, write-once subjects, per-user subject
//! permissions); the `local` backend keeps each owner's objects in a directory of its own.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub mod nats;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{}{path}: {source}{}",
        if source.kind() == io::ErrorKind::StorageFull { "the backup storage is full: " } else { "storage i/o on " },
        if source.kind() == io::ErrorKind::StorageFull { "; free space or raise its limit, then retry" } else { "" })]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("object {0} does not exist")]
    NotFound(String),
    #[error("invalid object key '{0}'")]
    BadKey(String),
}

/// A writer whose object appears only on commit.
pub trait ObjectWriter: Write + Send {
    /// Makes the object durable and visible.
    fn commit(self: Box<Self>) -> Result<(), StorageError>;
}

/// Who uses a backend: an agent (its own instance's objects, create and read only) or the
/// controller (any owner's, and deletion).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Agent,
    Controller,
}

/// An owner is an instance id: one subject token and one directory name.
pub fn valid_owner(owner: &str) -> bool {
    !owner.is_empty()
        && owner.len() <= 64
        && owner
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

pub trait Storage: Send + Sync {
    fn name(&self) -> &'static str;
    /// Starts an object; dropping the writer without commit removes what was written.
    fn create(&self, key: &str) -> Result<Box<dyn ObjectWriter>, StorageError>;
    fn open(&self, key: &str) -> Result<Box<dyn Read + Send>, StorageError>;
    fn delete(&self, key: &str) -> Result<(), StorageError>;
    fn exists(&self, key: &str) -> bool;
    /// A human-readable location of an object (for the API's `locationRef`).
    fn location(&self, key: &str) -> String;
    /// Removes what an interrupted writer of `key` left behind (the writer's process died).
    fn discard_partial(&self, key: &str);
    /// Keys of the committed objects that start with `prefix`, sorted.
    fn list(&self, prefix: &str) -> Result<Vec<String>, StorageError>;
}

/// Storage backends selectable in configuration.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum StorageKind {
    /// A directory every agent and the controller can reach (the embedded default).
    Local { root: PathBuf },
    /// NATS JetStream (agents on other hosts and VMs): one stream per instance named after
    /// `bucket`, which the controller creates at placement, limited to `max_bytes` per instance
    /// when set; agents reach their own over their own connection.
    Nats {
        bucket: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_bytes: Option<i64>,
    },
}

impl StorageKind {
    /// The backend for `owner`'s objects; `nats` is the caller's connection (needed by the
    /// `nats` kind, which must be built inside a tokio runtime).
    pub fn build(
        &self,
        nats: Option<&async_nats::Client>,
        owner: &str,
        access: Access,
    ) -> Result<Box<dyn Storage>, String> {
        if !valid_owner(owner) {
            return Err(format!("'{owner}' cannot own stored objects"));
        }
        match self {
            StorageKind::Local { root } => Ok(Box::new(LocalStorage {
                root: root.join(owner),
                shared: root.clone(),
            })),
            StorageKind::Nats { bucket, .. } => match nats {
                Some(c) => Ok(Box::new(nats::NatsStorage::new(
                    c.clone(),
                    bucket,
                    owner,
                    access,
                ))),
                None => Err(format!(
                    "backup storage is the NATS object store '{bucket}' but there is no NATS connection"
                )),
            },
        }
    }

    /// The object store bucket, when backups go there.
    pub fn nats_bucket(&self) -> Option<&str> {
        match self {
            StorageKind::Nats { bucket, .. } => Some(bucket),
            StorageKind::Local { .. } => None,
        }
    }
}

/// Keys are `/`-separated segments of letters, digits and `-_.`, none empty or starting
/// with a dot (so nothing climbs out of a local root or hides as a partial file).
pub(crate) fn check_key(key: &str) -> Result<(), StorageError> {
    let ok = !key.is_empty()
        && key.len() <= 200
        && key.split('/').all(|seg| {
            !seg.is_empty()
                && !seg.starts_with('.')
                && seg
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        });
    if ok {
        Ok(())
    } else {
        Err(StorageError::BadKey(key.to_string()))
    }
}

/// A directory per owner under the configured root. Objects an earlier layout kept directly in
/// the root (before owners) are still read and deleted there.
pub struct LocalStorage {
    pub root: PathBuf,
    shared: PathBuf,
}

fn io_at(p: &Path) -> impl Fn(io::Error) -> StorageError + '_ {
    move |source| StorageError::Io {
        path: p.display().to_string(),
        source,
    }
}

struct LocalWriter {
    file: Option<std::fs::File>,
    partial: PathBuf,
    target: PathBuf,
    /// Write-behind: a thread flushing what is written so far, so the commit's fsync only
    /// waits for the tail instead of the whole object.
    syncer: Option<(std::sync::mpsc::SyncSender<()>, std::thread::JoinHandle<()>)>,
    unsynced: u64,
}

/// Bytes written between two write-behind flushes.
const SYNC_EVERY: u64 = 64 << 20;

impl LocalWriter {
    fn kick_syncer(&mut self) {
        if self.syncer.is_none() {
            let Some(Ok(f)) = self.file.as_ref().map(|f| f.try_clone()) else {
                return;
            };
            let (tx, rx) = std::sync::mpsc::sync_channel::<()>(1);
            let h = std::thread::Builder::new()
                .name("backup-sync".into())
                .spawn(move || {
                    for () in rx {
                        let _ = f.sync_data();
                    }
                });
            if let Ok(h) = h {
                self.syncer = Some((tx, h));
            }
        }
        if let Some((tx, _)) = &self.syncer {
            let _ = tx.try_send(());
        }
    }

    fn stop_syncer(&mut self) {
        if let Some((tx, h)) = self.syncer.take() {
            drop(tx);
            let _ = h.join();
        }
    }
}

impl Write for LocalWriter {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let n = self.file.as_mut().expect("open until commit").write(b)?;
        self.unsynced += n as u64;
        if self.unsynced >= SYNC_EVERY {
            self.unsynced = 0;
            self.kick_syncer();
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.as_mut().expect("open until commit").flush()
    }
}

impl ObjectWriter for LocalWriter {
    fn commit(mut self: Box<Self>) -> Result<(), StorageError> {
        self.stop_syncer();
        let f = self.file.take().expect("committed once");
        f.sync_all().map_err(io_at(&self.partial))?;
        drop(f);
        std::fs::rename(&self.partial, &self.target).map_err(io_at(&self.target))?;
        Ok(())
    }
}

impl Drop for LocalWriter {
    fn drop(&mut self) {
        self.stop_syncer();
        if self.file.is_some() {
            let _ = std::fs::remove_file(&self.partial);
        }
    }
}

impl Storage for LocalStorage {
    fn name(&self) -> &'static str {
        "local"
    }

    fn create(&self, key: &str) -> Result<Box<dyn ObjectWriter>, StorageError> {
        check_key(key)?;
        let partial = self.partial_path(key);
        let dir = partial.parent().unwrap_or(&self.root).to_path_buf();
        std::fs::create_dir_all(&dir).map_err(io_at(&dir))?;
        let file = std::fs::File::create(&partial).map_err(io_at(&partial))?;
        Ok(Box::new(LocalWriter {
            file: Some(file),
            partial,
            target: self.root.join(key),
            syncer: None,
            unsynced: 0,
        }))
    }

    fn open(&self, key: &str) -> Result<Box<dyn Read + Send>, StorageError> {
        check_key(key)?;
        let mut p = self.root.join(key);
        if !p.exists() && self.shared.join(key).is_file() {
            p = self.shared.join(key);
        }
        match std::fs::File::open(&p) {
            Ok(f) => Ok(Box::new(io::BufReader::with_capacity(1 << 20, f))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(StorageError::NotFound(key.into()))
            }
            Err(e) => Err(io_at(&p)(e)),
        }
    }

    fn delete(&self, key: &str) -> Result<(), StorageError> {
        check_key(key)?;
        for p in [self.root.join(key), self.shared.join(key)] {
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_at(&p)(e)),
            }
        }
        Ok(())
    }

    fn exists(&self, key: &str) -> bool {
        check_key(key).is_ok() && (self.root.join(key).exists() || self.shared.join(key).is_file())
    }

    fn location(&self, key: &str) -> String {
        format!("file://{}", self.root.join(key).display())
    }

    fn discard_partial(&self, key: &str) {
        if check_key(key).is_ok() {
            let _ = std::fs::remove_file(self.partial_path(key));
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
            let Ok(rd) = std::fs::read_dir(dir) else {
                return;
            };
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') {
                    continue;
                }
                let p = e.path();
                match e.file_type() {
                    Ok(t) if t.is_dir() => walk(root, &p, out),
                    Ok(t) if t.is_file() => {
                        if let Ok(rel) = p.strip_prefix(root) {
                            out.push(rel.to_string_lossy().into_owned());
                        }
                    }
                    _ => {}
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.root, &self.root, &mut out);
        out.retain(|k| k.starts_with(prefix));
        out.sort();
        Ok(out)
    }
}

impl LocalStorage {
    /// Where `key` is written until it commits: a hidden file beside the object.
    fn partial_path(&self, key: &str) -> PathBuf {
        let target = self.root.join(key);
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        target.with_file_name(format!(".{name}.partial"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_appear_only_on_commit() {
        let dir = tempfile::tempdir().unwrap();
        let s = StorageKind::Local {
            root: dir.path().join("b"),
        }
        .build(None, "i1", Access::Agent)
        .unwrap();
        let mut w = s.create("x1.cfbk").unwrap();
        w.write_all(b"hello").unwrap();
        assert!(!s.exists("x1.cfbk"));
        w.commit().unwrap();
        assert!(s.exists("x1.cfbk"));
        let mut r = String::new();
        s.open("x1.cfbk").unwrap().read_to_string(&mut r).unwrap();
        assert_eq!(r, "hello");
        // Abandoned: nothing left, not even the partial file.
        let mut w = s.create("x2.cfbk").unwrap();
        w.write_all(b"half").unwrap();
        drop(w);
        assert!(!s.exists("x2.cfbk"));
        assert_eq!(
            std::fs::read_dir(dir.path().join("b/i1")).unwrap().count(),
            1
        );
        s.delete("x1.cfbk").unwrap();
        assert!(matches!(s.open("x1.cfbk"), Err(StorageError::NotFound(_))));
        assert!(s.create("../evil").is_err());
        // Owners are one path segment.
        let kind = StorageKind::Local {
            root: dir.path().join("b"),
        };
        assert!(kind.build(None, "../x", Access::Agent).is_err());
        assert!(kind.build(None, "", Access::Agent).is_err());
        // An object of the flat layout (before owners) still reads.
        std::fs::write(dir.path().join("b/old.cfbk"), b"old").unwrap();
        let mut r = String::new();
        s.open("old.cfbk").unwrap().read_to_string(&mut r).unwrap();
        assert_eq!(r, "old");
    }
}
