//! The agent's local state: the exclusive lock on its state dir, intent records (so an intent is
//! handled once, whatever NATS redelivers) and what the database should be doing.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

/// Holds the state dir's lock for as long as it lives.
pub struct StateDir {
    root: PathBuf,
    _lock: Flock<File>,
}

/// What happened to one intent.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct IntentRecord {
    pub kind: String,
    /// `started`, `done` or `failed`.
    pub state: String,
    /// Failure code (see proto FailureCode) when failed.
    #[serde(default)]
    pub code: i32,
    #[serde(default)]
    pub message: String,
    /// Milliseconds from accepting the intent to its outcome (0: not measured).
    #[serde(default)]
    pub elapsed_ms: u64,
}

/// What a finished backup produced.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BackupRecord {
    pub backup_id: String,
    pub stored_bytes: u64,
    pub sha256: String,
    pub location: String,
    pub manifest_json: String,
    #[serde(default)]
    pub archive_since_unix_ms: i64,
    #[serde(default)]
    pub inventory: Vec<String>,
    #[serde(default)]
    pub change_file: String,
}

/// What the database should be doing, persisted across agent restarts.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Desired {
    /// Prepare finished successfully.
    pub prepared: bool,
    /// The database should be running (false after a stop intent).
    pub running: bool,
    /// The instance was deleted.
    #[serde(default)]
    pub deleted: bool,
    /// Sizing given at prepare.
    #[serde(default)]
    pub memory_mb: u64,
    #[serde(default)]
    pub vcpus: u32,
    #[serde(default)]
    pub volume_gb: u64,
    #[serde(default)]
    pub server_id: u32,
}

impl StateDir {
    /// Creates the dir if needed and takes its exclusive lock, or fails saying who holds it.
    pub fn open(root: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(root.join("intents"))
            .with_context(|| format!("creating state dir {}", root.display()))?;
        let lock_path = root.join("agent.lock");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .read(true)
            .open(&lock_path)
            .with_context(|| format!("opening {}", lock_path.display()))?;
        let lock = match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((_, errno)) => {
                let holder = std::fs::read_to_string(root.join("agent.pid")).unwrap_or_default();
                bail!(
                    "another coffer-agent (pid {}) already runs for state dir {} ({errno}); stop it first",
                    holder.trim(),
                    root.display()
                );
            }
        };
        std::fs::write(root.join("agent.pid"), std::process::id().to_string())
            .context("writing agent.pid")?;
        Ok(StateDir {
            root: root.to_path_buf(),
            _lock: lock,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn intent_path(&self, id: &str) -> PathBuf {
        // Intent ids are UUIDs from the controller; anything else is hashed into a safe name.
        let safe: String = id
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        self.root.join("intents").join(format!("{safe}.json"))
    }

    pub fn intent(&self, id: &str) -> Option<IntentRecord> {
        let text = std::fs::read_to_string(self.intent_path(id)).ok()?;
        serde_json::from_str(&text).ok()
    }

    pub fn record_intent(&self, id: &str, rec: &IntentRecord) -> anyhow::Result<()> {
        write_atomic(&self.intent_path(id), &serde_json::to_vec(rec)?)
    }

    pub fn desired(&self) -> Desired {
        std::fs::read_to_string(self.root.join("desired.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default()
    }

    pub fn set_desired(&self, d: &Desired) -> anyhow::Result<()> {
        write_atomic(&self.root.join("desired.json"), &serde_json::to_vec(d)?)
    }

    /// The agent's X25519 secret key (generated on first use, 0600), as `(secret, public)`.
    pub fn keypair(&self) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
        load_or_create_key(&self.root)
    }

    /// Records the result of a backup intent (read back when its result is republished).
    pub fn record_backup(&self, intent_id: &str, r: &BackupRecord) -> anyhow::Result<()> {
        let p = self.intent_path(intent_id).with_extension("backup.json");
        write_atomic(&p, &serde_json::to_vec(r)?)
    }

    pub fn backup_record(&self, intent_id: &str) -> Option<BackupRecord> {
        let p = self.intent_path(intent_id).with_extension("backup.json");
        serde_json::from_slice(&std::fs::read(p).ok()?).ok()
    }

    /// Where the datastore keeps its files.
    pub fn datastore_root(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
}

/// Loads `agent.key` under `root`, creating it (0600) if missing. Does not need the lock, so the
/// provisioner can ask for the public key before the agent first runs (`coffer-agent keygen`).
pub fn load_or_create_key(root: &Path) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = root.join("agent.key");
    if let Ok(text) = std::fs::read_to_string(&path) {
        let secret = coffer_proto::seal::from_hex(text.trim())
            .with_context(|| format!("{} is not a hex key", path.display()))?;
        let public = coffer_proto::seal::public_of(&secret)?;
        return Ok((secret, public));
    }
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    let (secret, public) = coffer_proto::seal::generate()?;
    // A temp file of this process's own, linked into place only if no key is there yet: two
    // processes making the key at once end with the same one (the first), never two.
    let tmp = root.join(format!("agent.key.{}.tmp", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(coffer_proto::seal::to_hex(&secret).as_bytes())?;
    f.sync_all()?;
    let linked = std::fs::hard_link(&tmp, &path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok((secret, public)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let secret = coffer_proto::seal::from_hex(text.trim())
                .with_context(|| format!("{} is not a hex key", path.display()))?;
            let public = coffer_proto::seal::public_of(&secret)?;
            Ok((secret, public))
        }
        Err(e) => Err(e).with_context(|| format!("writing {}", path.display())),
    }
}

/// Writes a file atomically and durably (temp file, fsync, rename).
pub fn write_atomic(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_open_fails_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let first = StateDir::open(dir.path()).unwrap();
        let err = StateDir::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("another coffer-agent"), "{err}");
        drop(first);
        StateDir::open(dir.path()).unwrap();
    }

    #[test]
    fn key_is_created_once_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (s1, p1) = load_or_create_key(dir.path()).unwrap();
        let (s2, p2) = load_or_create_key(dir.path()).unwrap();
        assert_eq!((s1, p1.clone()), (s2, p2));
        assert_eq!(p1.len(), 32);
        let mode = std::fs::metadata(dir.path().join("agent.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn intent_records_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::open(dir.path()).unwrap();
        assert!(s.intent("a").is_none());
        let r = IntentRecord {
            kind: "prepare".into(),
            state: "done".into(),
            code: 0,
            message: "ok".into(),
            elapsed_ms: 0,
        };
        s.record_intent("a", &r).unwrap();
        assert_eq!(s.intent("a"), Some(r));
        let mut d = s.desired();
        assert!(!d.prepared);
        d.prepared = true;
        s.set_desired(&d).unwrap();
        assert!(s.desired().prepared);
    }
}
