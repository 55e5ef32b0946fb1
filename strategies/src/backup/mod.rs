//! How a backup stream is produced and consumed (the strategy), crossed with where it goes
//! ([`crate::storage`]) and how it is sealed ([`crate::pipeline`]). Strategies are synchronous:
//! the agent runs them on a blocking thread, streaming with bounded memory.

pub mod mariabackup;
pub mod mariadb_dump;
pub mod pg_basebackup;
pub mod redis_rdb;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{tool} failed: {detail}")]
    Tool { tool: String, detail: String },
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// What a strategy needs to reach the running server.
#[derive(Clone)]
pub struct BackupCtx {
    pub data_dir: PathBuf,
    /// The server's Unix socket (MariaDB, Redis) or socket directory (PostgreSQL).
    pub socket: PathBuf,
    pub port: u16,
    /// Where the datastore's own client tools are (None: on the PATH).
    pub tools_dir: Option<PathBuf>,
    pub admin_user: String,
    pub admin_password: String,
    /// Scratch space for the tool (never the stream itself).
    pub tmp_dir: PathBuf,
}

impl std::fmt::Debug for BackupCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupCtx")
            .field("data_dir", &self.data_dir)
            .field("password", &"***")
            .finish()
    }
}

/// Where the engine was when the backup was taken (what replication and incrementals need).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct EnginePosition {
    pub gtid: String,
    pub binlog_file: String,
    pub binlog_pos: u64,
    pub lsn: String,
}

/// How a strategy's backups come back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreMode {
    /// Files: [`BackupStrategy::restore`] fills an empty data directory before the server starts.
    Files,
    /// Statements: [`BackupStrategy::load`] feeds a freshly initialised, running server.
    Load,
}

pub trait BackupStrategy: Send + Sync {
    fn name(&self) -> &'static str;
    fn restore_mode(&self) -> RestoreMode {
        RestoreMode::Files
    }
    /// Streams a backup of the running server into `sink`: full, or incremental on top of
    /// `parent` (whose recorded position says where it ended). `progress` gets archive bytes.
    fn backup(
        &self,
        ctx: &BackupCtx,
        parent: Option<&EnginePosition>,
        sink: &mut dyn Write,
        progress: &mut dyn FnMut(u64),
    ) -> Result<EnginePosition, BackupError>;
    /// Fills the empty `data_dir` from a full backup's archive and prepares it.
    fn restore(
        &self,
        data_dir: &Path,
        scratch: &Path,
        source: &mut dyn Read,
        progress: &mut dyn FnMut(u64),
    ) -> Result<(), BackupError>;
    /// Applies an incremental backup's archive on top of a restored `data_dir`.
    fn apply_incremental(
        &self,
        data_dir: &Path,
        scratch: &Path,
        source: &mut dyn Read,
        progress: &mut dyn FnMut(u64),
    ) -> Result<(), BackupError>;
    /// [`RestoreMode::Load`] strategies: loads the archive into the running server reached
    /// through `ctx`, then runs `epilogue` (SQL) in the same session.
    fn load(
        &self,
        ctx: &BackupCtx,
        source: &mut dyn Read,
        epilogue: &str,
        progress: &mut dyn FnMut(u64),
    ) -> Result<(), BackupError> {
        let _ = (ctx, source, epilogue, progress);
        Err(BackupError::Tool {
            tool: self.name().into(),
            detail: "this strategy restores files; it cannot load into a running server".into(),
        })
    }
}

/// Strategies selectable by name in configuration. Each backs up one datastore; the first of a
/// datastore's in [`BackupKind::ALL`] is its default.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum BackupKind {
    /// MariaDB, physical (full and incremental), the default.
    #[default]
    Mariabackup,
    /// MariaDB, logical, full only.
    MariadbDump,
    /// PostgreSQL, physical (`pg_basebackup` tar with its WAL), full only.
    PgBasebackup,
    /// Redis, an RDB snapshot (BGSAVE), full only.
    RedisRdb,
}

impl BackupKind {
    pub const ALL: [BackupKind; 4] = [
        BackupKind::Mariabackup,
        BackupKind::MariadbDump,
        BackupKind::PgBasebackup,
        BackupKind::RedisRdb,
    ];

    pub fn build(&self) -> Box<dyn BackupStrategy> {
        match self {
            BackupKind::Mariabackup => Box::new(mariabackup::Mariabackup::default()),
            BackupKind::MariadbDump => Box::new(mariadb_dump::MariadbDump::default()),
            BackupKind::PgBasebackup => Box::new(pg_basebackup::PgBasebackup),
            BackupKind::RedisRdb => Box::new(redis_rdb::RedisRdb::default()),
        }
    }

    /// The datastore (its short name) this strategy backs up.
    pub fn datastore(&self) -> &'static str {
        match self {
            BackupKind::Mariabackup | BackupKind::MariadbDump => "mariadb",
            BackupKind::PgBasebackup => "postgresql",
            BackupKind::RedisRdb => "redis",
        }
    }

    /// The strategy for `datastore`: the configured one when it is that datastore's, else the
    /// datastore's default; None for a datastore no strategy backs up.
    pub fn for_datastore(datastore: &str, configured: &BackupKind) -> Option<BackupKind> {
        if configured.datastore() == datastore {
            return Some(configured.clone());
        }
        Self::ALL.into_iter().find(|k| k.datastore() == datastore)
    }

    /// The strategy a manifest names (restores follow the backup, not the agent's setting).
    pub fn from_name(name: &str) -> Option<BackupKind> {
        Self::ALL.into_iter().find(|k| k.build().name() == name)
    }

    /// Whether the strategy can take incremental backups.
    pub fn incremental(&self) -> bool {
        matches!(self, BackupKind::Mariabackup)
    }
}

/// Backup settings shared by the controller (which hands them to agents) and the agents.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BackupConfig {
    /// Where backups are stored.
    pub storage: crate::storage::StorageKind,
    /// Operator keys (TOML: `current = "id"` and a `[keys]` table of id = 64 hex chars), 0600.
    #[serde(default)]
    pub keyring_file: Option<PathBuf>,
    /// Encrypt backups (default). Turning it off must be explicit. Agents get no keyring: the
    /// controller issues each backup the instance's own key ([`instance_key`]) and a restore
    /// exactly the keys of its chain.
    #[serde(default = "default_true")]
    pub encryption: bool,
    /// zstd level (1 is fast and, on database pages, as small as 3).
    #[serde(default = "default_level")]
    pub zstd_level: i32,
    /// The strategy for its datastore's instances (e.g. `mariadb_dump` for MariaDB); instances
    /// of the other datastores use their own default strategy.
    #[serde(default)]
    pub strategy: BackupKind,
}

fn default_true() -> bool {
    true
}
fn default_level() -> i32 {
    1
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyringFile {
    current: Option<String>,
    #[serde(default)]
    keys: std::collections::BTreeMap<String, String>,
}

/// Reads a keyring file (never logs or echoes a key).
pub fn load_keyring(path: &Path) -> Result<crate::pipeline::Keyring, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("reading keyring {}: {e}", path.display()))?;
    let f: KeyringFile = toml::from_str(&text)
        .map_err(|e| format!("parsing keyring {}: {}", path.display(), e.message()))?;
    let mut ring = crate::pipeline::Keyring::default();
    for (id, hex) in &f.keys {
        let bytes: Option<Vec<u8>> = (0..hex.len())
            .step_by(2)
            .map(|i| {
                hex.get(i..i + 2)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
            })
            .collect();
        let key: [u8; 32] = bytes
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| format!("key '{id}' in {} is not 64 hex characters", path.display()))?;
        ring.add(id, key);
    }
    if let Some(c) = &f.current {
        if ring.get(c).is_none() {
            return Err(format!("current key '{c}' is not in {}", path.display()));
        }
        ring.set_current(c);
    }
    Ok(ring)
}

/// The key one instance's backups are sealed with under operator key `master_id` of `ring`:
/// `(<master_id>:<instance>, HMAC-SHA256(master, context ‖ instance))`. A leaked instance key
/// opens that instance's backups and nothing else; the operator's keyring never leaves the
/// controller.
pub fn instance_key(
    ring: &crate::pipeline::Keyring,
    master_id: &str,
    instance: &str,
) -> Result<(String, [u8; 32]), String> {
    let master = ring
        .get(master_id)
        .ok_or_else(|| format!("the operator key '{master_id}' is not in the keyring"))?;
    let derive = || -> Result<Vec<u8>, openssl::error::ErrorStack> {
        let pkey = openssl::pkey::PKey::hmac(master)?;
        let mut s = openssl::sign::Signer::new(openssl::hash::MessageDigest::sha256(), &pkey)?;
        s.update(b"coffer instance backup key v1\0")?;
        s.update(instance.as_bytes())?;
        s.sign_to_vec()
    };
    let k = derive().map_err(|e| format!("deriving an instance key: {e}"))?;
    let mut key = [0u8; 32];
    key.copy_from_slice(&k[..32]);
    Ok((format!("{master_id}:{instance}"), key))
}

/// The operator key and instance of a key id [`instance_key`] made (None for an operator key
/// used directly, as backups were sealed before keys were per instance).
pub fn split_key_id(key_id: &str) -> Option<(&str, &str)> {
    key_id.split_once(':')
}

/// The manifest stored beside each backup (`<id>.json`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub backup_id: String,
    pub instance_id: String,
    pub datastore: String,
    pub datastore_version: String,
    pub strategy: String,
    pub parent_id: Option<String>,
    pub position: EnginePosition,
    pub archive_bytes: u64,
    pub stored_bytes: u64,
    pub sha256: String,
    pub compression: Option<String>,
    pub encrypted: bool,
    pub key_id: Option<String>,
    pub format_version: u8,
    pub created_unix: u64,
}

/// Writes the admin credentials for a tool into a 0600 options file in the scratch dir (never
/// argv), under `[section]`; the caller removes it when the tool is done.
pub fn write_defaults(
    ctx: &BackupCtx,
    name: &str,
    section: &str,
) -> Result<std::path::PathBuf, BackupError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(&ctx.tmp_dir)?;
    let p = ctx.tmp_dir.join(name);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&p)?;
    writeln!(
        f,
        "[{section}]\nuser={}\npassword={}\nsocket={}\n",
        ctx.admin_user,
        ctx.admin_password,
        ctx.socket.display()
    )?;
    Ok(p)
}

/// Runs a tool whose standard output is the archive and streams it into `sink` (through a wide
/// pipe), stderr to `log`. The tool is killed if the sink fails; a failed exit is reported as
/// `what` with the tail of its log.
pub fn stream_from_tool(
    cmd: &mut std::process::Command,
    what: &str,
    log: &Path,
    sink: &mut dyn Write,
    progress: &mut dyn FnMut(u64),
) -> Result<(), BackupError> {
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log)?)
        .spawn()
        .map_err(|e| cannot_start(cmd, e))?;
    let mut out = child.stdout.take().expect("piped");
    widen_pipe(&out);
    let pumped = pump(&mut out, sink, progress);
    if pumped.is_err() {
        let _ = child.kill();
    }
    let status = child.wait()?;
    pumped?;
    exited(status, what, log)
}

/// Runs a tool that reads the archive on its standard input; `feed` writes it there (through
/// a wide pipe). The tool is killed if feeding fails; a failed exit is reported as `what`.
pub fn stream_to_tool(
    cmd: &mut std::process::Command,
    what: &str,
    log: &Path,
    feed: &mut dyn FnMut(&mut dyn Write) -> std::io::Result<()>,
) -> Result<(), BackupError> {
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?)
        .spawn()
        .map_err(|e| cannot_start(cmd, e))?;
    let mut stdin = child.stdin.take().expect("piped");
    widen_pipe(&stdin);
    let fed = feed(&mut stdin);
    drop(stdin);
    if fed.is_err() {
        let _ = child.kill();
    }
    let status = child.wait()?;
    fed?;
    exited(status, what, log)
}

fn cannot_start(cmd: &std::process::Command, e: std::io::Error) -> BackupError {
    BackupError::Tool {
        tool: cmd.get_program().to_string_lossy().into_owned(),
        detail: format!("cannot start: {e}"),
    }
}

/// A tool's exit: failure reported as `what` with the tail of its log.
pub fn exited(status: std::process::ExitStatus, what: &str, log: &Path) -> Result<(), BackupError> {
    if status.success() {
        Ok(())
    } else {
        Err(BackupError::Tool {
            tool: what.into(),
            detail: format!("{status}: {}", log_tail(log)),
        })
    }
}

/// The last lines of a tool's log (blank lines skipped), for an error message.
pub fn log_tail(path: &Path) -> String {
    let t = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = t.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(4)..].join(" | ")
}

/// Gives a pipe to or from a tool a 1 MiB buffer (the default 64 KiB makes the tool and the
/// pipeline take turns instead of running side by side). Best effort.
pub fn widen_pipe(fd: &impl std::os::fd::AsRawFd) {
    let _ = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETPIPE_SZ(1 << 20));
}

/// Copies `from` into `to` in 1 MiB pieces, reporting running totals.
pub fn pump(
    from: &mut dyn Read,
    to: &mut dyn Write,
    progress: &mut dyn FnMut(u64),
) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
        total += n as u64;
        progress(total);
    }
}

#[cfg(test)]
mod key_tests {
    use super::*;

    #[test]
    fn instance_keys_are_per_instance_and_per_operator_key() {
        let mut ring = crate::pipeline::Keyring::default();
        ring.add("k1", [7u8; 32]);
        ring.add("k2", [9u8; 32]);
        let (id, a) = instance_key(&ring, "k1", "inst-a").unwrap();
        assert_eq!(id, "k1:inst-a");
        assert_eq!(split_key_id(&id), Some(("k1", "inst-a")));
        assert_eq!(
            instance_key(&ring, "k1", "inst-a").unwrap().1,
            a,
            "deterministic"
        );
        assert_ne!(instance_key(&ring, "k1", "inst-b").unwrap().1, a);
        assert_ne!(instance_key(&ring, "k2", "inst-a").unwrap().1, a);
        assert_ne!(a, [7u8; 32], "never the operator key itself");
        assert!(instance_key(&ring, "k9", "inst-a").is_err());
        assert_eq!(split_key_id("k1"), None);
    }
}
