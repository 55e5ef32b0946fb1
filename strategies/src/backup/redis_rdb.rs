//! Redis RDB snapshots: `BGSAVE`, wait until that save (not an earlier one) has finished and
//! succeeded, then stream the `dump.rdb` it wrote. The file is opened once the save is done; a
//! later save replaces it by rename, so the open file stays this snapshot. Users are not in an
//! RDB file: the archive is a tar of `dump.rdb` and `users.acl` (the ACL rules of the users who
//! may run commands: tenants and root, as `ACL LIST` gives them, passwords as hashes). Restores
//! put the dump into the empty data directory, where the server loads it on its first start,
//! and the users beside it ([`RESTORED_USERS`]) for the datastore to take in.

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use super::{BackupCtx, BackupError, BackupStrategy, EnginePosition};

#[derive(Debug, Clone)]
pub struct RedisRdb {
    /// How long a snapshot may take.
    pub timeout: Duration,
}

impl Default for RedisRdb {
    fn default() -> Self {
        RedisRdb {
            timeout: Duration::from_secs(6 * 3600),
        }
    }
}

pub const DUMP_FILE: &str = "dump.rdb";
const USERS_ENTRY: &str = "users.acl";
/// Where a restore leaves the backed-up users' ACL rules (in the data directory).
pub const RESTORED_USERS: &str = "users.acl.restored";

/// The `ACL LIST` lines worth restoring: users that may run commands (tenants, root), not the
/// agent's own, not `default`, not replication-only users.
pub fn restorable_users(acl_list: &[String], admin: &str) -> Vec<String> {
    acl_list
        .iter()
        .filter(|l| {
            let name = l.split_whitespace().nth(1).unwrap_or("");
            l.starts_with("user ") && name != admin && name != "default" && l.contains("+@all")
        })
        .cloned()
        .collect()
}

fn err(detail: impl std::fmt::Display) -> BackupError {
    BackupError::Tool {
        tool: "redis BGSAVE".into(),
        detail: detail.to_string(),
    }
}

/// `field:value` lines of an `INFO` section.
pub fn info_field(info: &str, field: &str) -> Option<String> {
    info.lines()
        .filter_map(|l| l.trim().split_once(':'))
        .find(|(k, _)| *k == field)
        .map(|(_, v)| v.trim().to_string())
}

impl RedisRdb {
    fn connect(ctx: &BackupCtx) -> Result<redis::Connection, BackupError> {
        let info = redis::ConnectionInfo {
            addr: redis::ConnectionAddr::Unix(ctx.socket.clone()),
            redis: redis::RedisConnectionInfo {
                db: 0,
                username: Some(ctx.admin_user.clone()),
                password: Some(ctx.admin_password.clone()),
                ..Default::default()
            },
        };
        let client = redis::Client::open(info).map_err(err)?;
        let c = client
            .get_connection_with_timeout(Duration::from_secs(5))
            .map_err(err)?;
        Ok(c)
    }

    fn persistence(c: &mut redis::Connection) -> Result<String, BackupError> {
        redis::cmd("INFO")
            .arg("persistence")
            .query::<String>(c)
            .map_err(err)
    }

    /// Runs one BGSAVE to completion; returns the replication offset it covers.
    fn snapshot(&self, c: &mut redis::Connection) -> Result<String, BackupError> {
        let deadline = Instant::now() + self.timeout;
        let saves = |info: &str| {
            info_field(info, "rdb_saves")
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        // A save already running (the server's own `save` schedule) may predate our writes:
        // wait for it, then take ours.
        loop {
            let info = Self::persistence(c)?;
            if info_field(&info, "rdb_bgsave_in_progress").as_deref() != Some("1") {
                break;
            }
            if Instant::now() > deadline {
                return Err(err("an earlier background save did not finish in time"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let before = saves(&Self::persistence(c)?);
        let offset = redis::cmd("INFO")
            .arg("replication")
            .query::<String>(c)
            .ok()
            .and_then(|i| info_field(&i, "master_repl_offset"))
            .unwrap_or_default();
        redis::cmd("BGSAVE").query::<String>(c).map_err(err)?;
        let mut delay = Duration::from_millis(10);
        loop {
            let info = Self::persistence(c)?;
            if info_field(&info, "rdb_bgsave_in_progress").as_deref() == Some("0")
                && saves(&info) > before
            {
                return match info_field(&info, "rdb_last_bgsave_status").as_deref() {
                    Some("ok") => Ok(offset),
                    other => Err(err(format!(
                        "the background save failed (status {}); see the Redis log (disk full?)",
                        other.unwrap_or("unknown")
                    ))),
                };
            }
            if Instant::now() > deadline {
                return Err(err(format!(
                    "the background save did not finish within {:?}",
                    self.timeout
                )));
            }
            std::thread::sleep(delay);
            // INFO is cheap: notice the end of the save within 20 ms.
            delay = (delay * 2).min(Duration::from_millis(20));
        }
    }
}

impl BackupStrategy for RedisRdb {
    fn name(&self) -> &'static str {
        "redis_rdb"
    }

    fn backup(
        &self,
        ctx: &BackupCtx,
        parent: Option<&EnginePosition>,
        sink: &mut dyn Write,
        progress: &mut dyn FnMut(u64),
    ) -> Result<EnginePosition, BackupError> {
        if parent.is_some() {
            return Err(err("Redis backups are full snapshots; omit the parent"));
        }
        let mut c = Self::connect(ctx)?;
        let offset = self.snapshot(&mut c)?;
        let acl: Vec<String> = redis::cmd("ACL").arg("LIST").query(&mut c).map_err(err)?;
        let users = restorable_users(&acl, &ctx.admin_user).join("\n") + "\n";
        let mut f = std::fs::File::open(ctx.data_dir.join(DUMP_FILE))?;
        let size = f.metadata()?.len();
        let mut tar = tar::Builder::new(sink);
        let mut header = tar::Header::new_gnu();
        header.set_size(size);
        header.set_mode(0o600);
        header.set_cksum();
        // The file's size is fixed (a later save replaces it by rename): exactly `size` bytes.
        let mut limited = super::pg_basebackup::counted(&mut f, progress).take(size);
        tar.append_data(&mut header, DUMP_FILE, &mut limited)?;
        let mut header = tar::Header::new_gnu();
        header.set_size(users.len() as u64);
        header.set_mode(0o600);
        header.set_cksum();
        tar.append_data(&mut header, USERS_ENTRY, users.as_bytes())?;
        tar.into_inner()?.flush()?;
        Ok(EnginePosition {
            lsn: offset,
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
        std::fs::create_dir_all(data_dir)?;
        let mut reader = super::pg_basebackup::counted(source, progress);
        let mut archive = tar::Archive::new(&mut reader);
        let mut have_dump = false;
        for entry in archive.entries()? {
            let mut entry = entry?;
            let name = entry.path()?.to_string_lossy().into_owned();
            let target = match name.as_str() {
                DUMP_FILE => data_dir.join(DUMP_FILE),
                USERS_ENTRY => data_dir.join(RESTORED_USERS),
                _ => continue,
            };
            let mut f = std::fs::File::create(&target)?;
            std::io::copy(&mut entry, &mut f)?;
            f.sync_all()?;
            have_dump |= name == DUMP_FILE;
        }
        // Read to the end: the stream is only proven whole there.
        std::io::copy(&mut reader, &mut std::io::sink())?;
        let mut head = [0u8; 5];
        if have_dump {
            std::fs::File::open(data_dir.join(DUMP_FILE))?.read_exact(&mut head)?;
        }
        if &head != b"REDIS" {
            return Err(BackupError::Tool {
                tool: "redis_rdb restore".into(),
                detail: "the archive holds no Redis RDB file".into(),
            });
        }
        Ok(())
    }

    fn apply_incremental(
        &self,
        _data_dir: &Path,
        _scratch: &Path,
        _source: &mut dyn Read,
        _progress: &mut dyn FnMut(u64),
    ) -> Result<(), BackupError> {
        Err(err(
            "Redis backups are full snapshots; there is no incremental to apply",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_users_that_run_commands_are_restored() {
        let acl: Vec<String> = [
            "user app on #ab ~* &* +@all -@admin -@dangerous",
            "user coffer_admin on #cd ~* &* +@all",
            "user default off resetchannels -@all",
            "user repl_1 on #ef resetchannels -@all +psync +replconf +ping",
            "user root on #01 ~* &* +@all",
        ]
        .map(String::from)
        .to_vec();
        let kept = restorable_users(&acl, "coffer_admin");
        assert_eq!(kept.len(), 2);
        assert!(kept[0].starts_with("user app ") && kept[1].starts_with("user root "));
    }

    #[test]
    fn info_fields_are_read() {
        let info = "# Persistence\r\nloading:0\r\nrdb_saves:3\r\nrdb_bgsave_in_progress:0\r\n";
        assert_eq!(info_field(info, "rdb_saves").as_deref(), Some("3"));
        assert_eq!(
            info_field(info, "rdb_bgsave_in_progress").as_deref(),
            Some("0")
        );
        assert_eq!(info_field(info, "missing"), None);
    }
}
