//! `mariadb-dump` (logical, full only): every user database plus the accounts (`--system=users`,
//! as `CREATE USER IF NOT EXISTS` and `GRANT` statements), in one consistent snapshot
//! (`--single-transaction`), with the binlog position and GTID written as comments that are read
//! back out of the stream for the manifest. Restored by loading it into a freshly initialised,
//! running server. Credentials reach both tools through a 0600 defaults file, never argv.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use super::{pump, BackupCtx, BackupError, BackupStrategy, EnginePosition, RestoreMode};

#[derive(Debug, Clone)]
pub struct MariadbDump {
    pub dump: String,
    pub client: String,
}

impl Default for MariadbDump {
    fn default() -> Self {
        MariadbDump {
            dump: "mariadb-dump".into(),
            client: "mariadb".into(),
        }
    }
}

const SYSTEM_SCHEMAS: &[&str] = &["mysql", "information_schema", "performance_schema", "sys"];

fn tool_err(tool: &str, detail: impl std::fmt::Display) -> BackupError {
    BackupError::Tool {
        tool: tool.into(),
        detail: detail.to_string(),
    }
}

/// Watches a dump stream go by and keeps the position comments `--master-data=2 --gtid` writes:
/// `-- CHANGE MASTER TO MASTER_LOG_FILE='mysql-bin.000002', MASTER_LOG_POS=1234;` near the top
/// and `-- SET GLOBAL gtid_slave_pos='0-1-5';` at the end. Only lines that start with `-- ` are
/// looked at (a data line never does: the dump escapes newlines inside values).
#[derive(Default)]
pub struct PositionScanner {
    at_line_start: bool,
    line: Option<Vec<u8>>,
    pub position: EnginePosition,
}

impl PositionScanner {
    pub fn new() -> Self {
        PositionScanner {
            at_line_start: true,
            ..Default::default()
        }
    }

    pub fn feed(&mut self, mut b: &[u8]) {
        while !b.is_empty() {
            if let Some(line) = &mut self.line {
                let end = b.iter().position(|&c| c == b'\n');
                let take = end.unwrap_or(b.len());
                if line.len() < 512 {
                    line.extend_from_slice(&b[..take.min(512 - line.len())]);
                }
                if end.is_some() {
                    let l = self.line.take().unwrap_or_default();
                    self.parse(&String::from_utf8_lossy(&l));
                    self.at_line_start = true;
                    b = &b[take + 1..];
                } else {
                    return;
                }
            } else if self.at_line_start {
                if b[0] == b'-' {
                    self.line = Some(Vec::new());
                } else {
                    self.at_line_start = false;
                }
            } else {
                match b.iter().position(|&c| c == b'\n') {
                    Some(i) => {
                        self.at_line_start = true;
                        b = &b[i + 1..];
                    }
                    None => return,
                }
            }
        }
    }

    fn parse(&mut self, line: &str) {
        let quoted = |after: &str| -> Option<String> {
            let rest = &line[line.find(after)? + after.len()..];
            let end = rest.find('\'')?;
            Some(rest[..end].to_string())
        };
        if line.starts_with("-- CHANGE MASTER TO MASTER_LOG_FILE=") {
            self.position.binlog_file = quoted("MASTER_LOG_FILE='").unwrap_or_default();
            self.position.binlog_pos = line
                .split("MASTER_LOG_POS=")
                .nth(1)
                .map(|s| s.trim_end_matches(';').trim())
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
        } else if line.starts_with("-- SET GLOBAL gtid_slave_pos=") {
            self.position.gtid = quoted("gtid_slave_pos='").unwrap_or_default();
        }
    }
}

/// A writer that shows every byte to a [`PositionScanner`] on its way to `inner`.
struct Scanned<'a> {
    inner: &'a mut dyn Write,
    scanner: PositionScanner,
}

impl Write for Scanned<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(b)?;
        self.scanner.feed(&b[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl MariadbDump {
    fn user_databases(&self, defaults: &Path) -> Result<Vec<String>, BackupError> {
        let out = Command::new(&self.client)
            .arg(format!("--defaults-file={}", defaults.display()))
            .args(["--batch", "--skip-column-names", "-e", "SHOW DATABASES"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| tool_err("mariadb", format!("cannot start: {e}")))?;
        if !out.status.success() {
            return Err(tool_err(
                "mariadb (listing databases)",
                String::from_utf8_lossy(&out.stderr).trim(),
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .filter(|d| !SYSTEM_SCHEMAS.contains(&d.as_str()))
            .collect())
    }
}

impl BackupStrategy for MariadbDump {
    fn name(&self) -> &'static str {
        "mariadb-dump"
    }

    fn restore_mode(&self) -> RestoreMode {
        RestoreMode::Load
    }

    fn backup(
        &self,
        ctx: &BackupCtx,
        parent: Option<&EnginePosition>,
        sink: &mut dyn Write,
        progress: &mut dyn FnMut(u64),
    ) -> Result<EnginePosition, BackupError> {
        if parent.is_some() {
            return Err(tool_err(
                "mariadb-dump",
                "logical backups are full only; take a full backup (no parent_id or incremental)",
            ));
        }
        let defaults = super::write_defaults(ctx, "mariadb-dump.cnf", "client")?;
        let result = (|| {
            let dbs = self.user_databases(&defaults)?;
            let log = ctx.tmp_dir.join("mariadb-dump.log");
            let mut cmd = Command::new(&self.dump);
            cmd.arg(format!("--defaults-file={}", defaults.display()))
                .args([
                    "--single-transaction",
                    "--master-data=2",
                    "--gtid",
                    "--routines",
                    "--events",
                    "--triggers",
                    "--hex-blob",
                    "--insert-ignore",
                    "--skip-dump-date",
                    "--system=users",
                ]);
            if !dbs.is_empty() {
                cmd.arg("--databases").args(&dbs);
            }
            let mut scanned = Scanned {
                inner: sink,
                scanner: PositionScanner::new(),
            };
            super::stream_from_tool(&mut cmd, "mariadb-dump", &log, &mut scanned, progress)?;
            Ok(scanned.scanner.position)
        })();
        let _ = std::fs::remove_file(&defaults);
        result
    }

    fn restore(
        &self,
        _data_dir: &Path,
        _scratch: &Path,
        _source: &mut dyn Read,
        _progress: &mut dyn FnMut(u64),
    ) -> Result<(), BackupError> {
        Err(tool_err(
            "mariadb-dump",
            "a logical backup is loaded into a running server, not extracted",
        ))
    }

    fn apply_incremental(
        &self,
        _data_dir: &Path,
        _scratch: &Path,
        _source: &mut dyn Read,
        _progress: &mut dyn FnMut(u64),
    ) -> Result<(), BackupError> {
        Err(tool_err(
            "mariadb-dump",
            "logical backups have no incrementals",
        ))
    }

    fn load(
        &self,
        ctx: &BackupCtx,
        source: &mut dyn Read,
        epilogue: &str,
        progress: &mut dyn FnMut(u64),
    ) -> Result<(), BackupError> {
        let defaults = super::write_defaults(ctx, "mariadb-load.cnf", "client")?;
        let result = (|| {
            let log = ctx.tmp_dir.join("mariadb-load.log");
            super::stream_to_tool(
                Command::new(&self.client)
                    .arg(format!("--defaults-file={}", defaults.display()))
                    .args(["--binary-mode", "--max-allowed-packet=1G", "--batch"]),
                "mariadb (loading the dump)",
                &log,
                // The load is not replicated history of this server: keep it out of the binlog.
                &mut |stdin| {
                    stdin.write_all(b"SET SESSION sql_log_bin=0;\n")?;
                    pump(source, stdin, progress)?;
                    stdin.write_all(format!("\n{epilogue}\n").as_bytes())
                },
            )?;
            Ok(())
        })();
        let _ = std::fs::remove_file(&defaults);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_comments_are_found_across_any_split() {
        let dump = "-- MariaDB dump 10.19\n--\n-- CHANGE MASTER TO MASTER_USE_GTID=slave_pos;\n\
                    -- CHANGE MASTER TO MASTER_LOG_FILE='mysql-bin.000003', MASTER_LOG_POS=1412;\n\
                    INSERT INTO `t` VALUES ('-- SET GLOBAL gtid_slave_pos=\\'9-9-9\\';'),\n(2);\n\
                    -- SET GLOBAL gtid_slave_pos='0-1-7';\n-- Dump completed\n";
        for split in [1, 2, 3, 7, 64, dump.len()] {
            let mut s = PositionScanner::new();
            for piece in dump.as_bytes().chunks(split) {
                s.feed(piece);
            }
            assert_eq!(s.position.binlog_file, "mysql-bin.000003", "split {split}");
            assert_eq!(s.position.binlog_pos, 1412);
            assert_eq!(s.position.gtid, "0-1-7");
        }
    }
}
