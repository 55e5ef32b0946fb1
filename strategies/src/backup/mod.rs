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

impl EnginePosition {
    /// The change-log file the backup ends in (where archived changes roll it forward from).
    pub fn log_file(&self) -> &str {
        &self.binlog_file
    }
    /// The offset in [`EnginePosition::log_file`].
    pub fn log_offset(&self) -> u64 {
        self.binlog_pos
    }
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

pub use coffer_common::backup::{instance_key, load_keyring, split_key_id, BackupConfig};
/// Backup methods are named in the datastores' description; the strategies build them.
pub use coffer_proto::datastore::BackupMethod as BackupKind;

/// Builds the strategy of a backup method.
pub trait Build {
    fn build(&self) -> Box<dyn BackupStrategy>;
}

impl Build for BackupKind {
    fn build(&self) -> Box<dyn BackupStrategy> {
        match self {
            BackupKind::Mariabackup => Box::new(mariabackup::Mariabackup::default()),
            BackupKind::MariadbDump => Box::new(mariadb_dump::MariadbDump::default()),
            BackupKind::PgBasebackup => Box::new(pg_basebackup::PgBasebackup),
            BackupKind::RedisRdb => Box::new(redis_rdb::RedisRdb::default()),
        }
    }
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
mod tests {
    use super::*;

    #[test]
    fn each_method_builds_the_strategy_its_manifests_name() {
        for k in BackupKind::ALL {
            assert_eq!(k.build().name(), k.name());
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_manifests_parse_or_fail_cleanly(
            text in "\\PC{0,300}|\\{\"backup_id\":\"[a-z]{0,8}\",.{0,200}",
        ) {
            let _ = serde_json::from_str::<Manifest>(&text);
        }
    }
}
