//! `mariabackup` (MariaDB 10.11): `--backup --stream=xbstream` for backups; `mbstream -x` then
//! `--prepare` for restores. Credentials reach it through a 0600 defaults file, never argv.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use super::{pump, BackupCtx, BackupError, BackupStrategy, EnginePosition};

#[derive(Debug, Clone)]
pub struct Mariabackup {
    pub binary: String,
    pub mbstream: String,
}

impl Default for Mariabackup {
    fn default() -> Self {
        Mariabackup {
            binary: "mariabackup".into(),
            mbstream: "mbstream".into(),
        }
    }
}

/// Parses the position mariabackup logs, e.g. `MySQL binlog position: filename 'mysql-bin.000002',
/// position '1234', GTID of the last change '0-1-5'` and `The latest check point (for
/// incremental): '12345'`.
pub fn parse_position(log: &str) -> EnginePosition {
    let quoted = |after: &str, line: &str| -> Option<String> {
        let rest = &line[line.find(after)? + after.len()..];
        let start = rest.find('\'')? + 1;
        let end = start + rest[start..].find('\'')?;
        Some(rest[start..end].to_string())
    };
    let mut p = EnginePosition::default();
    for line in log.lines() {
        if line.contains("binlog position") {
            p.binlog_file = quoted("filename", line).unwrap_or_default();
            p.binlog_pos = quoted(", position", line)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            p.gtid = quoted("GTID of the last change", line).unwrap_or_default();
        }
        if line.contains("latest check point (for incremental)") {
            p.lsn = quoted("incremental)", line).unwrap_or_default();
        }
    }
    p
}

impl BackupStrategy for Mariabackup {
    fn name(&self) -> &'static str {
        "mariabackup"
    }

    fn backup(
        &self,
        ctx: &BackupCtx,
        parent: Option<&EnginePosition>,
        sink: &mut dyn Write,
        progress: &mut dyn FnMut(u64),
    ) -> Result<EnginePosition, BackupError> {
        if let Some(p) = parent {
            if p.lsn.is_empty() {
                return Err(BackupError::Tool {
                    tool: "mariabackup".into(),
                    detail: "the parent backup recorded no LSN; take a full backup".into(),
                });
            }
        }
        let defaults = super::write_defaults(ctx, "mariabackup.cnf", "mariabackup")?;
        let work = ctx.tmp_dir.join("mariabackup-work");
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work)?;
        let log = ctx.tmp_dir.join("mariabackup-backup.log");
        let streamed = super::stream_from_tool(
            Command::new(&self.binary)
                .arg(format!("--defaults-file={}", defaults.display()))
                .arg("--backup")
                .arg("--stream=xbstream")
                .arg(format!("--datadir={}", ctx.data_dir.display()))
                .arg(format!("--target-dir={}", work.display()))
                .args(parent.map(|p| format!("--incremental-lsn={}", p.lsn))),
            "mariabackup --backup",
            &log,
            sink,
            progress,
        );
        let _ = std::fs::remove_file(&defaults);
        let _ = std::fs::remove_dir_all(&work);
        streamed?;
        Ok(parse_position(
            &std::fs::read_to_string(&log).unwrap_or_default(),
        ))
    }

    fn restore(
        &self,
        data_dir: &Path,
        scratch: &Path,
        source: &mut dyn Read,
        progress: &mut dyn FnMut(u64),
    ) -> Result<(), BackupError> {
        self.extract(data_dir, scratch, source, progress)?;
        self.prepare(data_dir, None, scratch)
    }

    fn apply_incremental(
        &self,
        data_dir: &Path,
        scratch: &Path,
        source: &mut dyn Read,
        progress: &mut dyn FnMut(u64),
    ) -> Result<(), BackupError> {
        let inc = scratch.join("incremental");
        let _ = std::fs::remove_dir_all(&inc);
        self.extract(&inc, scratch, source, progress)?;
        let r = self.prepare(data_dir, Some(&inc), scratch);
        let _ = std::fs::remove_dir_all(&inc);
        r
    }
}

impl Mariabackup {
    fn extract(
        &self,
        dir: &Path,
        scratch: &Path,
        source: &mut dyn Read,
        progress: &mut dyn FnMut(u64),
    ) -> Result<(), BackupError> {
        std::fs::create_dir_all(dir)?;
        std::fs::create_dir_all(scratch)?;
        let log = scratch.join("mbstream.log");
        super::stream_to_tool(
            Command::new(&self.mbstream).arg("-x").arg("-C").arg(dir),
            "mbstream -x",
            &log,
            &mut |stdin| pump(source, stdin, progress).map(|_| ()),
        )
    }

    fn prepare(
        &self,
        data_dir: &Path,
        incremental: Option<&Path>,
        scratch: &Path,
    ) -> Result<(), BackupError> {
        let log = scratch.join("mariabackup-prepare.log");
        let status = Command::new(&self.binary)
            .arg("--prepare")
            .arg(format!("--target-dir={}", data_dir.display()))
            .args(incremental.map(|i| format!("--incremental-dir={}", i.display())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .status()?;
        super::exited(status, "mariabackup --prepare", &log)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_is_parsed_from_the_log() {
        let log = "[00] 2026-11-24 10:00:00 MySQL binlog position: filename 'mysql-bin.000002', position '1234', GTID of the last change '0-7-42'\n\
                   [00] 2026-11-24 10:00:00 The latest check point (for incremental): '98765'\n";
        let p = parse_position(log);
        assert_eq!(p.binlog_file, "mysql-bin.000002");
        assert_eq!(p.binlog_pos, 1234);
        assert_eq!(p.gtid, "0-7-42");
        assert_eq!(p.lsn, "98765");
    }
}
