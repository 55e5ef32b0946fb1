//! `pg_basebackup` (PostgreSQL 15): the data directory as one tar stream on standard output
//! (`-Ft -D -`) with the WAL needed to make it consistent inside it (`-X fetch`), over the
//! replication protocol on the instance's Unix socket. Restores unpack the tar into an empty data
//! directory; the server replays the included WAL on its first start (the backup label says
//! where from). The password reaches the tool through a 0600 passfile, never argv or the
//! environment's value.
//!
//! An incremental (as Trove's `pg_basebackup` strategy has them) is the WAL since its parent:
//! the agent closes the WAL file being written (`pg_switch_wal()`) and streams, as a tar of
//! `pg_wal/<file>` entries, every WAL file from the one its parent ended in to the one just
//! closed. Applied on a restored parent, the files go into `pg_wal` and the server's recovery
//! at its first start replays them.

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;

use super::{BackupCtx, BackupError, BackupStrategy, EnginePosition};

#[derive(Debug, Clone, Default)]
pub struct PgBasebackup;

/// Writes the admin's passfile (0600) in the scratch directory: the tools read the password
/// there, never from argv or the environment. The caller removes it.
fn passfile(ctx: &BackupCtx, name: &str) -> Result<std::path::PathBuf, BackupError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(&ctx.tmp_dir)?;
    let path = ctx.tmp_dir.join(name);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)?;
    writeln!(
        f,
        "*:*:*:{}:{}",
        pgpass_field(&ctx.admin_user),
        pgpass_field(&ctx.admin_password)
    )?;
    Ok(path)
}

/// A PostgreSQL client tool (from the server's own directory when known) connecting as the
/// admin over the server's socket, with the password from `passfile` only (never prompted).
fn client(ctx: &BackupCtx, name: &str, passfile: &Path) -> Command {
    let tool = match &ctx.tools_dir {
        Some(d) => d.join(name),
        None => name.into(),
    };
    let mut cmd = Command::new(tool);
    cmd.env("PGPASSFILE", passfile)
        .env_remove("PGPASSWORD")
        .arg("-h")
        .arg(&ctx.socket)
        .arg("-p")
        .arg(ctx.port.to_string())
        .arg("-U")
        .arg(&ctx.admin_user)
        .arg("-w");
    cmd
}

/// Escapes a passfile field (`:` and `\`).
fn pgpass_field(s: &str) -> String {
    s.replace('\\', "\\\\").replace(':', "\\:")
}

/// The WAL end point pg_basebackup reports with `-v`, e.g.
/// `pg_basebackup: write-ahead log end point: 0/2000138`.
pub fn parse_end_lsn(log: &str) -> Option<String> {
    log.lines()
        .filter_map(|l| l.split("write-ahead log end point:").nth(1))
        .map(|r| r.split_whitespace().next().unwrap_or("").to_string())
        .find(|s| !s.is_empty())
}

/// The timeline pg_basebackup reports with `-v`, e.g.
/// `pg_basebackup: write-ahead log start point: 0/2000028 on timeline 1`.
pub fn parse_timeline(log: &str) -> Option<u32> {
    log.lines()
        .filter_map(|l| l.split("on timeline ").nth(1))
        .find_map(|r| r.split_whitespace().next()?.parse().ok())
}

impl BackupStrategy for PgBasebackup {
    fn name(&self) -> &'static str {
        "pg_basebackup"
    }

    fn backup(
        &self,
        ctx: &BackupCtx,
        parent: Option<&EnginePosition>,
        sink: &mut dyn Write,
        progress: &mut dyn FnMut(u64),
    ) -> Result<EnginePosition, BackupError> {
        if let Some(parent) = parent {
            return wal_since(ctx, parent, sink, progress);
        }
        let passfile = passfile(ctx, "pgpass")?;
        let log = ctx.tmp_dir.join("pg_basebackup.log");
        let streamed = super::stream_from_tool(
            client(ctx, "pg_basebackup", &passfile).args([
                "-D",
                "-",
                "-Ft",
                "-X",
                "fetch",
                "--checkpoint=fast",
                "-v",
            ]),
            "pg_basebackup",
            &log,
            sink,
            progress,
        );
        let _ = std::fs::remove_file(&passfile);
        streamed?;
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lsn = parse_end_lsn(&text).unwrap_or_default();
        // The WAL file the backup ends in: archived WAL rolls it forward from there.
        let (binlog_file, binlog_pos) = crate::archive::wal::lsn_file(
            &format!("{:08X}", parse_timeline(&text).unwrap_or(1)),
            &lsn,
        )
        .unwrap_or_default();
        Ok(EnginePosition {
            lsn,
            binlog_file,
            binlog_pos,
            ..Default::default()
        })
    }

    fn restore(
        &self,
        data_dir: &Path,
        _scratch: &Path,
        source: &mut dyn Read,
        progress: &mut dyn FnMut(u64),
    ) -> Result<(), BackupError> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(data_dir)?;
        // PostgreSQL refuses a data directory others can read.
        std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o700))?;
        let mut reader = counted(source, progress);
        let mut archive = tar::Archive::new(&mut reader);
        archive.set_preserve_permissions(true);
        archive.set_overwrite(false);
        archive.unpack(data_dir)?;
        // Read to the end (the tar's padding): the stream is only proven whole there.
        std::io::copy(&mut reader, &mut std::io::sink())?;
        if !data_dir.join("PG_VERSION").exists() || !data_dir.join("backup_label").exists() {
            return Err(BackupError::Tool {
                tool: "pg_basebackup restore".into(),
                detail:
                    "the archive is not a PostgreSQL base backup (no PG_VERSION or backup_label)"
                        .into(),
            });
        }
        Ok(())
    }

    /// Puts the incremental's WAL files into the restored parent's `pg_wal` (replacing the
    /// shorter copies the parent had of the file it ended in).
    fn apply_incremental(
        &self,
        data_dir: &Path,
        _scratch: &Path,
        source: &mut dyn Read,
        progress: &mut dyn FnMut(u64),
    ) -> Result<(), BackupError> {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let wal = data_dir.join("pg_wal");
        let owner = std::fs::metadata(&wal)?;
        let mut reader = counted(source, progress);
        let mut archive = tar::Archive::new(&mut reader);
        for entry in archive.entries()? {
            let mut entry = entry?;
            let path = entry.path()?.into_owned();
            let name = path
                .strip_prefix("pg_wal")
                .ok()
                .and_then(|p| p.to_str())
                .filter(|n| crate::archive::wal::is_wal_name(n))
                .map(str::to_string)
                .ok_or_else(|| BackupError::Tool {
                    tool: "pg_basebackup restore".into(),
                    detail: format!(
                        "the incremental holds {}, not a WAL file; refused",
                        path.display()
                    ),
                })?;
            let tmp = wal.join(format!("{name}.coffer"));
            let mut out = std::fs::File::create(&tmp)?;
            std::io::copy(&mut entry, &mut out)?;
            out.sync_all()?;
            let _ = std::os::unix::fs::chown(&tmp, Some(owner.uid()), Some(owner.gid()));
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
            std::fs::rename(&tmp, wal.join(&name))?;
        }
        std::io::copy(&mut reader, &mut std::io::sink())?;
        Ok(())
    }
}

/// Runs one query with `psql` on the server's socket (the password through a 0600 passfile);
/// returns its unaligned output.
fn psql(ctx: &BackupCtx, sql: &str) -> Result<String, BackupError> {
    let passfile = passfile(ctx, "pgpass-psql")?;
    let out = client(ctx, "psql", &passfile)
        .args(["-X", "-At", "-d", "postgres", "-c", sql])
        .output();
    let _ = std::fs::remove_file(&passfile);
    let out = out?;
    if !out.status.success() {
        return Err(BackupError::Tool {
            tool: "psql".into(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// An incremental: closes the WAL file being written and streams every WAL file from the one
/// `parent` ended in to the one just closed.
fn wal_since(
    ctx: &BackupCtx,
    parent: &EnginePosition,
    sink: &mut dyn Write,
    progress: &mut dyn FnMut(u64),
) -> Result<EnginePosition, BackupError> {
    use crate::archive::wal::{segno, SEGMENT};
    let tool_err = |detail: String| BackupError::Tool {
        tool: "pg_basebackup incremental".into(),
        detail,
    };
    let first = parent.log_file().to_string();
    if first.is_empty() {
        return Err(tool_err(
            "the parent backup records no WAL position; take a full backup".into(),
        ));
    }
    let row = psql(
        ctx,
        "SELECT l::text || ' ' || n.file_name || ' ' || n.file_offset \
         FROM (SELECT pg_switch_wal() AS l) s, pg_walfile_name_offset(s.l) n",
    )?;
    let mut it = row.split_whitespace();
    let (Some(lsn), Some(last), Some(off)) = (it.next(), it.next(), it.next()) else {
        return Err(tool_err(format!(
            "unexpected answer from pg_switch_wal(): {row}"
        )));
    };
    let off: u64 = off.parse().unwrap_or(0);
    if segno(last) < segno(&first) || last[..8] != first[..8] {
        return Err(tool_err(format!(
            "the server's WAL ({last}) does not follow the parent's ({first}): the instance was restored or promoted since; take a full backup"
        )));
    }
    let wal = ctx.data_dir.join("pg_wal");
    let mut tar = tar::Builder::new(CountedWrite {
        inner: sink,
        n: 0,
        progress,
    });
    for n in segno(&first)..=segno(last) {
        let name = format!(
            "{}{:08X}{:08X}",
            &first[..8],
            n / (0x1_0000_0000 / SEGMENT),
            n % (0x1_0000_0000 / SEGMENT)
        );
        let path = wal.join(&name);
        let mut f = std::fs::File::open(&path).map_err(|_| {
            tool_err(format!(
                "WAL file {name}, written since the parent backup, is no longer on the server (recycled after a checkpoint); take a full backup"
            ))
        })?;
        tar.append_file(format!("pg_wal/{name}"), &mut f)?;
    }
    tar.into_inner()?.flush()?;
    Ok(EnginePosition {
        lsn: lsn.to_string(),
        binlog_file: last.to_string(),
        binlog_pos: off,
        ..Default::default()
    })
}

/// A writer that reports running totals.
struct CountedWrite<'a> {
    inner: &'a mut dyn Write,
    n: u64,
    progress: &'a mut dyn FnMut(u64),
}

impl Write for CountedWrite<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let k = self.inner.write(buf)?;
        self.n += k as u64;
        (self.progress)(self.n);
        Ok(k)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// A reader that reports running totals.
struct Counted<'a> {
    inner: &'a mut dyn Read,
    n: u64,
    progress: &'a mut dyn FnMut(u64),
}

impl Read for Counted<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let k = self.inner.read(buf)?;
        self.n += k as u64;
        (self.progress)(self.n);
        Ok(k)
    }
}

/// Counts bytes read for progress, for strategies that unpack in-process.
pub(crate) fn counted<'a>(
    inner: &'a mut dyn Read,
    progress: &'a mut dyn FnMut(u64),
) -> impl Read + 'a {
    Counted {
        inner,
        n: 0,
        progress,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_lsn_is_parsed() {
        let log = "pg_basebackup: initiating base backup, waiting for checkpoint to complete\n\
                   pg_basebackup: write-ahead log start point: 0/2000028 on timeline 1\n\
                   pg_basebackup: write-ahead log end point: 0/2000100\n";
        assert_eq!(parse_end_lsn(log).as_deref(), Some("0/2000100"));
        assert_eq!(parse_end_lsn("nothing"), None);
        let log = "pg_basebackup: write-ahead log start point: 0/2000028 on timeline 3\n";
        assert_eq!(parse_timeline(log), Some(3));
        assert_eq!(parse_timeline("nothing"), None);
    }

    #[test]
    fn passfile_fields_are_escaped() {
        assert_eq!(pgpass_field(r"a:b\c"), r"a\:b\\c");
    }
}
