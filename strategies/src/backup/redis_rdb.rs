//! Redis RDB snapshots: `BGSAVE`, wait until that save (not an earlier one) has finished and
//! succeeded, then stream the `dump.rdb` it wrote. The file is opened once the save is done; a
//! later save replaces it by rename, so the open file stays this snapshot. Restores write the
//! file into the empty data directory, where the server loads it on its first start.

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use super::{pump, BackupCtx, BackupError, BackupStrategy, EnginePosition};

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
            delay = (delay * 2).min(Duration::from_millis(200));
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
        let mut f = std::fs::File::open(ctx.data_dir.join(DUMP_FILE))?;
        pump(&mut f, sink, progress)?;
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
        let path = data_dir.join(DUMP_FILE);
        let mut f = std::fs::File::create(&path)?;
        pump(source, &mut f, progress)?;
        f.sync_all()?;
        let mut head = [0u8; 5];
        std::fs::File::open(&path)?.read_exact(&mut head).ok();
        if &head != b"REDIS" {
            return Err(BackupError::Tool {
                tool: "redis_rdb restore".into(),
                detail: "the archive is not a Redis RDB file".into(),
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
