//! PostgreSQL's write-ahead log as a change log: read where the server writes it (`pg_wal`),
//! each look bounded by the position the server has flushed (`pg_current_wal_flush_lsn()`:
//! a committed transaction's commit record is at or before it, and nothing after it is final
//! yet), and replayed by the server itself: the archived files, cut at the target, go into the
//! restored data directory's `pg_wal` before its first start, and the recovery that start runs
//! from the backup's label replays them to their end.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{ChangeLog, Chunk, Rebuilt, Replay};
use crate::backup::{BackupCtx, BackupError};

/// The WAL segment size (`initdb`'s default, which the agent keeps).
pub const SEGMENT: u64 = 16 << 20;
/// Segments per "log id" (the middle eight hex digits of a file's name).
const PER_LOG: u64 = 0x1_0000_0000 / SEGMENT;

/// Asks the server where it has flushed its WAL: (file name, offset in it).
pub type Flushed = Arc<dyn Fn() -> Result<(String, u64), String> + Send + Sync>;

/// Whether `name` is a WAL segment file's name (24 upper-case hex digits).
pub fn is_wal_name(name: &str) -> bool {
    name.len() == 24
        && name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
}

/// A segment's number from its name (timeline aside).
pub fn segno(name: &str) -> u64 {
    let part = |r: std::ops::Range<usize>| {
        name.get(r)
            .and_then(|s| u64::from_str_radix(s, 16).ok())
            .unwrap_or(0)
    };
    part(8..16) * PER_LOG + part(16..24)
}

/// The file and offset of an LSN (`X/Y`) on timeline `tli` (eight hex digits).
pub fn lsn_file(tli: &str, lsn: &str) -> Option<(String, u64)> {
    let (hi, lo) = lsn.trim().split_once('/')?;
    let v = (u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?;
    let seg = v / SEGMENT;
    Some((
        format!("{tli}{:08X}{:08X}", seg / PER_LOG, seg % PER_LOG),
        v % SEGMENT,
    ))
}

/// The LSN (`X/Y`) of `offset` in WAL file `file`.
pub fn file_lsn(file: &str, offset: u64) -> String {
    let v = segno(file) * SEGMENT + offset;
    format!("{:X}/{:X}", v >> 32, v & 0xffff_ffff)
}

/// The timeline of a WAL file's name (its first eight hex digits).
pub fn timeline(file: &str) -> u32 {
    file.get(..8)
        .and_then(|t| u32::from_str_radix(t, 16).ok())
        .unwrap_or(0)
}

/// The history files recovery needs to follow `newest` (the content of the newest timeline's
/// history file, `tli`): each timeline's file from 2 up, the older ones being the first lines
/// of the newest (a history file lists every switch before its timeline).
pub fn histories(tli: u32, newest: &str) -> Vec<(String, String)> {
    let lines: Vec<&str> = newest
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .collect();
    (2..=tli)
        .map(|t| {
            let upto = (t as usize - 1).min(lines.len());
            let mut text = lines[..upto].join("\n");
            text.push('\n');
            (format!("{t:08X}.history"), text)
        })
        .collect()
}

/// The WAL in a data directory's `pg_wal`.
pub struct WalLog {
    dir: PathBuf,
    flushed: Flushed,
    /// Where the server had flushed at the last [`ChangeLog::files`].
    now: Mutex<Option<(String, u64)>>,
}

impl WalLog {
    pub fn new(pg_wal: PathBuf, flushed: Flushed) -> Self {
        WalLog {
            dir: pg_wal,
            flushed,
            now: Mutex::new(None),
        }
    }
}

impl ChangeLog for WalLog {
    /// The files of the current timeline up to the one being written (`pg_wal` also holds
    /// recycled files named for the future, with old contents: never listed).
    fn files(&self) -> Result<Vec<String>, String> {
        let (cur, off) = (self.flushed)()?;
        *self.now.lock().unwrap() = Some((cur.clone(), off));
        let rd =
            std::fs::read_dir(&self.dir).map_err(|e| format!("{}: {e}", self.dir.display()))?;
        let mut files: Vec<String> = rd
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|n| is_wal_name(n) && n[..8] == cur[..8] && segno(n) <= segno(&cur))
            .collect();
        if !files.contains(&cur) {
            files.push(cur);
        }
        files.sort_by_key(|n| segno(n));
        Ok(files)
    }

    fn read_complete(&mut self, file: &str, from: u64, max: usize) -> Result<Chunk, String> {
        let limit = match &*self.now.lock().unwrap() {
            Some((cur, off)) if cur == file => *off,
            _ => SEGMENT,
        };
        if from >= limit {
            return Ok(Chunk::default());
        }
        let want = (limit - from).min(max as u64);
        let path = self.dir.join(file);
        let mut f = std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        f.seek(SeekFrom::Start(from))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let mut bytes = Vec::with_capacity(want as usize);
        f.take(want)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        // No transaction boundaries to report: the server's recovery stops at a record. The
        // positions are the LSNs the bytes span.
        let end = from + bytes.len() as u64;
        Ok(Chunk {
            first_position: file_lsn(file, from),
            last_position: file_lsn(file, end),
            bytes,
            ..Default::default()
        })
    }

    fn is_change_file(&self, path: &Path) -> bool {
        path.parent() == Some(self.dir.as_path())
            && path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(is_wal_name)
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// A file of a timeline after the first needs its history to be replayed.
    fn companions(&self, file: &str) -> Vec<(String, String)> {
        let tli = timeline(file);
        if tli < 2 {
            return vec![];
        }
        let name = format!("{tli:08X}.history");
        std::fs::read_to_string(self.dir.join(&name))
            .map(|text| vec![(name, text)])
            .unwrap_or_default()
    }
}

/// Where a fed restore delivers WAL files, and its `restore_command` (in the data directory,
/// removed once the recovery ended).
pub const FEED_DIR: &str = "coffer-restore";
pub const FEED_SCRIPT: &str = "coffer-restore.sh";

/// Settings of a fed restore's recovery only (reset with its `restore_command` once it ended):
/// no restartpoints while it replays (each one writes and syncs every dirty buffer, a third
/// of the replay's time; a recovery that stops is started again from the backup).
pub const FEED_SETTINGS: [(&str, &str); 2] =
    [("max_wal_size", "1TB"), ("checkpoint_timeout", "1d")];

/// The `restore_command` of a fed restore: a WAL file is moved into place once the agent
/// delivered it (waiting for it); a file not delivered once `END` exists is not in the
/// archive (the recovery ends there); a history file only if it is there.
fn feed_script(dir: &Path) -> String {
    format!(
        "#!/bin/sh\n\
         # A point-in-time restore's restore_command: each WAL file as the agent delivers it.\n\
         d='{}'\n\
         case \"$1\" in\n\
         *.history) [ -f \"$d/$1\" ] && exec cp \"$d/$1\" \"$2\"; exit 1 ;;\n\
         ????????????????????????) ;;\n\
         *) exit 1 ;;\n\
         esac\n\
         i=0\n\
         while [ ! -f \"$d/$1\" ]; do\n\
         \x20 [ -f \"$d/END\" ] && [ ! -f \"$d/$1\" ] && exit 1\n\
         \x20 i=$((i+1)); [ \"$i\" -gt 180000 ] && exit 1\n\
         \x20 sleep 0.01\n\
         done\n\
         exec mv \"$d/$1\" \"$2\"\n",
        dir.display()
    )
}

/// Puts the archived WAL into a restored data directory, cut at the target: the server's
/// recovery at its first start replays it.
pub struct WalReplay;

impl Replay for WalReplay {
    fn order(&self, file: &str) -> u64 {
        segno(file)
    }

    fn stop_at_position(
        &self,
        rebuilt: &Rebuilt,
        _dir: &Path,
        position: &str,
    ) -> Result<Option<(String, u64)>, String> {
        let Some((first, _)) = rebuilt.files.first() else {
            return Ok(None);
        };
        let (file, off) = lsn_file(&first[..8], position)
            .ok_or_else(|| format!("'{position}' is not a PostgreSQL LSN (e.g. 0/3000148)"))?;
        Ok(rebuilt
            .files
            .iter()
            .find(|(f, end)| *f == file && off <= *end)
            .map(|_| (file, off)))
    }

    fn before_start(&self) -> bool {
        true
    }

    fn feeds(&self) -> bool {
        true
    }

    /// The delivery directory and a `restore_command` that waits for each file there (moved
    /// into place as the agent completes it; `END` says nothing more comes), with
    /// `recovery.signal`: the server's archive recovery replays each file as it arrives.
    fn prepare_feed(&self, ctx: &BackupCtx) -> Result<PathBuf, BackupError> {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let wal = ctx.data_dir.join("pg_wal");
        let m = std::fs::metadata(&wal)?;
        let owner = |p: &Path| {
            let _ = std::os::unix::fs::chown(p, Some(m.uid()), Some(m.gid()));
        };
        let to = ctx.data_dir.join(FEED_DIR);
        let _ = std::fs::remove_dir_all(&to);
        std::fs::create_dir(&to)?;
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o700))?;
        owner(&to);
        let script = ctx.data_dir.join(FEED_SCRIPT);
        std::fs::write(&script, feed_script(&to))?;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o700))?;
        owner(&script);
        let signal = ctx.data_dir.join("recovery.signal");
        std::fs::write(&signal, b"")?;
        owner(&signal);
        let auto = ctx.data_dir.join("postgresql.auto.conf");
        let mut conf: String = std::fs::read_to_string(&auto)
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                let l = l.trim_start();
                !l.starts_with("restore_command")
                    && !FEED_SETTINGS.iter().any(|(k, _)| l.starts_with(k))
            })
            .map(|l| format!("{l}\n"))
            .collect();
        conf.push_str(&format!(
            "restore_command = '\"{}\" \"%f\" \"%p\"'\n",
            script.display()
        ));
        for (k, v) in FEED_SETTINGS {
            conf.push_str(&format!("{k} = '{v}'\n"));
        }
        std::fs::write(&auto, conf)?;
        owner(&auto);
        Ok(to)
    }

    fn deliver(
        &self,
        ctx: &BackupCtx,
        to: &Path,
        file: &str,
        path: &Path,
        cut: super::Cut,
    ) -> Result<(), BackupError> {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        {
            let f = std::fs::OpenOptions::new().write(true).open(path)?;
            if let super::Cut::At(p) = cut {
                f.set_len(p)?;
            }
            // The rest of the segment is zeros: where the replay ends.
            f.set_len(SEGMENT)?;
        }
        let m = std::fs::metadata(ctx.data_dir.join("pg_wal"))?;
        let _ = std::os::unix::fs::chown(path, Some(m.uid()), Some(m.gid()));
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        let dest = to.join(file);
        if std::fs::rename(path, &dest).is_err() {
            // Another filesystem: copied, then put in place at once.
            let tmp = to.join(format!(".{file}"));
            std::fs::copy(path, &tmp)?;
            let _ = std::os::unix::fs::chown(&tmp, Some(m.uid()), Some(m.gid()));
            std::fs::rename(&tmp, &dest)?;
            let _ = std::fs::remove_file(path);
        }
        Ok(())
    }

    fn end_feed(&self, to: &Path) {
        let _ = std::fs::write(to.join("END"), b"");
    }

    fn cleanup_feed(&self, ctx: &BackupCtx) {
        let _ = std::fs::remove_dir_all(ctx.data_dir.join(FEED_DIR));
        let _ = std::fs::remove_file(ctx.data_dir.join(FEED_SCRIPT));
    }

    fn locate(&self, from_file: &str, position: &str) -> Result<Option<(String, u64)>, String> {
        lsn_file(&from_file[..8.min(from_file.len())], position)
            .map(Some)
            .ok_or_else(|| format!("'{position}' is not a PostgreSQL LSN (e.g. 0/3000148)"))
    }

    fn switch_point(&self, rebuilt: &Rebuilt) -> Option<(String, u64)> {
        let (first, _) = rebuilt.files.first()?;
        let tli = timeline(first);
        let name = format!("{tli:08X}.history");
        let (_, text) = rebuilt.companions.iter().find(|(n, _)| *n == name)?;
        // The last line: the parent timeline and the LSN this one branched at.
        let line = text
            .lines()
            .rfind(|l| !l.trim().is_empty() && !l.starts_with('#'))?;
        let lsn = line.split_whitespace().nth(1)?;
        lsn_file(&first[..8], lsn)
    }

    fn file_size(&self) -> Option<u64> {
        Some(SEGMENT)
    }

    fn same_stream(&self, a: &str, b: &str) -> bool {
        timeline(a) == timeline(b)
    }

    fn replay(
        &self,
        ctx: &BackupCtx,
        dir: &Path,
        rebuilt: &Rebuilt,
        from: (&str, u64),
        stop: Option<(String, u64)>,
    ) -> Result<(), BackupError> {
        let wal = ctx.data_dir.join("pg_wal");
        for (file, end) in &rebuilt.files {
            if segno(file) < segno(from.0) {
                continue;
            }
            let upto = match &stop {
                Some((f, _)) if segno(file) > segno(f) => break,
                Some((f, p)) if segno(f) == segno(file) => (*p).min(*end),
                _ => *end,
            };
            if upto == 0 && file != from.0 {
                // Cut at its start: the next source's file of that segment follows.
                break;
            }
            let tmp = wal.join(format!("{file}.coffer"));
            {
                let mut out = std::fs::File::create(&tmp)?;
                let mut src = std::fs::File::open(dir.join(file))?;
                std::io::copy(&mut (&mut src).take(upto), &mut out)?;
                // The rest of the segment is zeros: where the replay ends.
                out.set_len(SEGMENT)?;
                out.flush()?;
                out.sync_all()?;
            }
            // The server's, as the rest of its WAL (the agent may run as another user).
            {
                use std::os::unix::fs::{MetadataExt, PermissionsExt};
                let m = std::fs::metadata(&wal)?;
                let _ = std::os::unix::fs::chown(&tmp, Some(m.uid()), Some(m.gid()));
                std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
            }
            std::fs::rename(&tmp, wal.join(file))?;
        }
        // Files of a later timeline than the backup's (a restore across a change of source):
        // the history files, and an archive recovery that follows them to the newest timeline
        // (a crash recovery stays on the backup's). Nothing comes from an archive: the files
        // are in pg_wal.
        let newest = rebuilt
            .companions
            .iter()
            .filter_map(|(n, c)| {
                let tli = u32::from_str_radix(n.strip_suffix(".history")?, 16).ok()?;
                Some((tli, c))
            })
            .max_by_key(|(t, _)| *t);
        let started_on = std::fs::read_to_string(ctx.data_dir.join("backup_label"))
            .ok()
            .and_then(|l| {
                l.lines()
                    .find_map(|x| x.strip_prefix("START TIMELINE:"))
                    .and_then(|t| t.trim().parse::<u32>().ok())
            })
            .unwrap_or_else(|| timeline(from.0));
        if let Some((tli, text)) = newest.filter(|(t, _)| *t > started_on) {
            use std::os::unix::fs::MetadataExt;
            let m = std::fs::metadata(&wal)?;
            for (name, content) in histories(tli, text) {
                let p = wal.join(&name);
                if !p.exists() {
                    std::fs::write(&p, content)?;
                    let _ = std::os::unix::fs::chown(&p, Some(m.uid()), Some(m.gid()));
                }
            }
            let signal = ctx.data_dir.join("recovery.signal");
            std::fs::write(&signal, b"")?;
            let _ = std::os::unix::fs::chown(&signal, Some(m.uid()), Some(m.gid()));
            let auto = ctx.data_dir.join("postgresql.auto.conf");
            let mut conf = std::fs::read_to_string(&auto).unwrap_or_default();
            if !conf.contains("restore_command") {
                conf.push_str("restore_command = 'false'\n");
                std::fs::write(&auto, conf)?;
                let _ = std::os::unix::fs::chown(&auto, Some(m.uid()), Some(m.gid()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_timeline_gets_its_history_from_the_newest() {
        let newest = "1\t0/3000148\tno recovery target specified\n\n2\t0/5000000\tno recovery target specified\n";
        let h = histories(3, newest);
        assert_eq!(h.len(), 2);
        assert_eq!(h[0].0, "00000002.history");
        assert_eq!(h[0].1, "1\t0/3000148\tno recovery target specified\n");
        assert_eq!(h[1].0, "00000003.history");
        assert_eq!(h[1].1.lines().count(), 2);
        assert_eq!(file_lsn("000000020000000000000005", 0x148), "0/5000148");
        assert_eq!(timeline("000000020000000000000005"), 2);
    }

    #[test]
    fn names_numbers_and_lsns_agree() {
        assert!(is_wal_name("000000010000000000000003"));
        assert!(!is_wal_name("000000010000000000000003.partial"));
        assert!(!is_wal_name("00000001000000000000000a"));
        assert_eq!(segno("000000010000000000000003"), 3);
        assert_eq!(segno("0000000100000001000000FF"), 256 + 255);
        assert_eq!(
            lsn_file("00000001", "0/3000148"),
            Some(("000000010000000000000003".into(), 0x148))
        );
        assert_eq!(
            lsn_file("00000002", "1/FF000010"),
            Some(("0000000200000001000000FF".into(), 0x10))
        );
        assert_eq!(lsn_file("00000001", "nope"), None);
    }
}
