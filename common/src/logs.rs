//! Guest logs: what a datastore's logs are, and how a log file is published to storage in
//! pieces, sending only bytes not sent before, across rotation (found by inode) and agent
//! restarts (the state is the caller's to persist after every piece).

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::storage::Storage;

/// Largest piece published as one object.
pub const PIECE: u64 = 1_000_000;

/// Where published guest logs live in the storage: `<CONTAINER>/<instance>/<datastore>-<log>/`.
pub const CONTAINER: &str = "database_logs";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogKind {
    /// The tenant's: can be enabled and disabled.
    User,
    /// The system's: always on, publish and discard only (admins).
    Sys,
}

impl LogKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            LogKind::User => "USER",
            LogKind::Sys => "SYS",
        }
    }
}

/// One log of a datastore (or the agent's own).
#[derive(Debug, Clone)]
pub struct LogDef {
    pub name: String,
    pub kind: LogKind,
    pub file: PathBuf,
    /// Server variables that switch it on (live and in the option file); empty for SYS logs.
    pub enable: Vec<(String, String)>,
    pub disable: Vec<(String, String)>,
    /// A log that is part of a file the server shares with other output: only the records
    /// whose first line contains this (with their indented continuation lines) are published.
    pub records: Option<String>,
}

/// The records of `text` (whole lines) whose first line contains `needle`, each with the
/// continuation lines that follow it (starting with a tab or a space).
pub fn select_records(text: &[u8], needle: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut keep = false;
    for line in text.split_inclusive(|&b| b == b'\n') {
        let continuation = matches!(line.first(), Some(b'\t') | Some(b' '));
        if !continuation {
            keep = line
                .windows(needle.len().max(1))
                .any(|w| w == needle.as_bytes());
        }
        if keep {
            out.extend_from_slice(line);
        }
    }
    out
}

/// What has been published of one log (persisted by the agent after every piece).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LogState {
    pub enabled: bool,
    /// Inode of the file the offset is in (0: none yet).
    pub inode: u64,
    /// Bytes of that file already published.
    pub offset: u64,
    /// Bytes published in all (since the last discard).
    pub published: u64,
    /// Number of the next object.
    pub seq: u64,
}

/// Where a file is now: (inode, size), None if it does not exist.
pub fn stat(p: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(p).ok().map(|m| (m.ino(), m.len()))
}

/// The file in `file`'s directory that has inode `ino` (a rotated log, renamed).
pub fn find_by_inode(file: &Path, ino: u64) -> Option<PathBuf> {
    let dir = file.parent()?;
    std::fs::read_dir(dir).ok()?.flatten().find_map(|e| {
        let m = e.metadata().ok()?;
        (m.is_file() && m.ino() == ino).then(|| e.path())
    })
}

/// Status and pending bytes of a log, from its state and where the file is now.
pub fn status(def: &LogDef, st: &LogState, now: Option<(u64, u64)>) -> (&'static str, u64) {
    if def.kind == LogKind::User && !st.enabled {
        return ("Disabled", 0);
    }
    let Some((ino, size)) = now else {
        return if def.kind == LogKind::Sys {
            ("Unavailable", 0)
        } else {
            ("Enabled", 0)
        };
    };
    if st.inode != 0 && ino != st.inode {
        let old = find_by_inode(&def.file, st.inode)
            .and_then(|p| stat(&p))
            .map(|(_, s)| s.saturating_sub(st.offset))
            .unwrap_or(0);
        return ("Rotated", old + size);
    }
    let pending = size.saturating_sub(st.offset);
    let s = if size == 0 && st.published == 0 {
        "Enabled"
    } else if st.published == 0 {
        "Ready"
    } else if pending == 0 {
        "Published"
    } else {
        "Partial"
    };
    (s, pending)
}

/// Publishes what has not been published of `def` under `prefix` (`<prefix>log-<seq>`):
/// first the tail of a rotated-away file (found by inode), then the current file, in pieces of
/// whole lines of at most [`PIECE`] bytes. `save` is called after every committed piece.
pub fn publish(
    def: &LogDef,
    st: &mut LogState,
    storage: &dyn Storage,
    prefix: &str,
    save: &mut dyn FnMut(&LogState),
) -> Result<u64, String> {
    let Some((ino, size)) = stat(&def.file) else {
        return Ok(0);
    };
    let mut sent = 0;
    if st.inode != 0 && st.inode != ino {
        if let Some(old) = find_by_inode(&def.file, st.inode) {
            let old_size = stat(&old).map(|(_, s)| s).unwrap_or(0);
            sent += publish_range(def, &old, st, old_size, storage, prefix, save)?;
        }
        st.inode = ino;
        st.offset = 0;
        save(st);
    }
    if st.inode == 0 || size < st.offset {
        // First publish, or truncated in place: from the start.
        st.inode = ino;
        st.offset = 0;
    }
    sent += publish_range(def, &def.file, st, size, storage, prefix, save)?;
    Ok(sent)
}

fn publish_range(
    def: &LogDef,
    path: &Path,
    st: &mut LogState,
    end: u64,
    storage: &dyn Storage,
    prefix: &str,
    save: &mut dyn FnMut(&LogState),
) -> Result<u64, String> {
    let mut f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut sent = 0;
    while st.offset < end {
        let want = (end - st.offset).min(PIECE);
        f.seek(SeekFrom::Start(st.offset))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let mut buf = vec![0u8; want as usize];
        f.read_exact(&mut buf)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        // Whole lines only, unless one line is longer than a piece.
        let cut = match buf.iter().rposition(|&b| b == b'\n') {
            Some(i) => i + 1,
            None if want == PIECE => buf.len(),
            None => break,
        };
        let selected;
        let piece = match &def.records {
            Some(needle) => {
                selected = select_records(&buf[..cut], needle);
                &selected[..]
            }
            None => &buf[..cut],
        };
        st.offset += cut as u64;
        if !piece.is_empty() {
            let key = format!("{prefix}log-{:08}", st.seq);
            let mut w = storage.create(&key).map_err(|e| e.to_string())?;
            w.write_all(piece)
                .map_err(|e| format!("writing {key}: {e}"))?;
            w.commit().map_err(|e| e.to_string())?;
            st.published += piece.len() as u64;
            st.seq += 1;
            sent += piece.len() as u64;
        }
        save(st);
    }
    Ok(sent)
}

/// Deletes every published piece under `prefix` and the `metafile`, if any (the controller's:
/// agents cannot delete stored objects).
pub fn discard(storage: &dyn Storage, prefix: &str, metafile: Option<&str>) -> Result<(), String> {
    for k in storage.list(prefix).map_err(|e| e.to_string())? {
        storage.delete(&k).map_err(|e| e.to_string())?;
    }
    match metafile {
        Some(m) => storage.delete(m).map_err(|e| e.to_string()),
        None => Ok(()),
    }
}

/// The last `n` lines of a published log.
/// The last `n` lines published under `prefix`, at most `max_bytes` of them in all (older lines
/// are left out past either bound); only the newest pieces needed are read.
pub fn tail(
    storage: &dyn Storage,
    prefix: &str,
    n: usize,
    max_bytes: usize,
) -> Result<Vec<String>, String> {
    let keys = storage.list(prefix).map_err(|e| e.to_string())?;
    let mut lines: std::collections::VecDeque<String> = Default::default();
    let mut bytes = 0usize;
    'pieces: for k in keys.iter().rev() {
        let mut text = String::new();
        storage
            .open(k)
            .map_err(|e| e.to_string())?
            .take(PIECE + 1)
            .read_to_string(&mut text)
            .map_err(|e| format!("{k}: {e}"))?;
        for line in text.lines().rev() {
            if lines.len() >= n || bytes + line.len() + 1 > max_bytes {
                break 'pieces;
            }
            bytes += line.len() + 1;
            lines.push_front(line.to_string());
        }
    }
    Ok(lines.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::StorageKind;

    #[test]
    fn records_keep_their_continuation_lines() {
        let log = b"t [1] LOG:  duration: 1002 ms  statement: SELECT\n\t1\n\
                    t [2] LOG:  checkpoint starting\n\
                    t [3] LOG:  duration: 5 ms  statement: SELECT 2\n";
        let got = String::from_utf8(select_records(log, "duration:")).unwrap();
        assert_eq!(
            got,
            "t [1] LOG:  duration: 1002 ms  statement: SELECT\n\t1\n\
             t [3] LOG:  duration: 5 ms  statement: SELECT 2\n"
        );
    }

    #[test]
    fn publishes_only_new_bytes_and_survives_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let storage = StorageKind::Local {
            root: dir.path().join("store"),
        }
        .build(None, "inst", crate::storage::Access::Controller)
        .unwrap();
        let file = dir.path().join("slow.log");
        let def = LogDef {
            name: "slow_query".into(),
            kind: LogKind::User,
            file: file.clone(),
            enable: vec![],
            disable: vec![],
            records: None,
        };
        let mut st = LogState {
            enabled: true,
            ..Default::default()
        };
        let mut saves = 0;
        std::fs::write(&file, "one\ntwo\npart").unwrap();
        let n = publish(&def, &mut st, storage.as_ref(), "i/x/", &mut |_| saves += 1).unwrap();
        assert_eq!(n, 8, "whole lines only");
        assert_eq!(status(&def, &st, stat(&file)).0, "Partial");
        std::fs::write(&file, "one\ntwo\npartial\nthree\n").unwrap();
        assert_eq!(
            publish(&def, &mut st, storage.as_ref(), "i/x/", &mut |_| {}).unwrap(),
            14
        );
        assert_eq!(status(&def, &st, stat(&file)), ("Published", 0));
        // Rotation: more lines, then the file is renamed and a new one started.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&file)
            .unwrap();
        f.write_all(b"four\n").unwrap();
        std::fs::rename(&file, dir.path().join("slow.log.1")).unwrap();
        std::fs::write(&file, "five\n").unwrap();
        assert_eq!(status(&def, &st, stat(&file)).0, "Rotated");
        publish(&def, &mut st, storage.as_ref(), "i/x/", &mut |_| {}).unwrap();
        assert_eq!(status(&def, &st, stat(&file)), ("Published", 0));
        assert_eq!(
            tail(storage.as_ref(), "i/x/", 10, 1 << 20).unwrap(),
            vec!["one", "two", "partial", "three", "four", "five"]
        );
        assert_eq!(
            tail(storage.as_ref(), "i/x/", 2, 1 << 20).unwrap(),
            vec!["four", "five"]
        );
        // The byte bound: "four\n" + "five\n" is 10 bytes; 9 leave only the newest line.
        assert_eq!(tail(storage.as_ref(), "i/x/", 10, 9).unwrap(), vec!["five"]);
        discard(storage.as_ref(), "i/x/", Some("i/x_metafile")).unwrap();
        assert!(storage.list("i/").unwrap().is_empty());
        assert!(saves >= 1);
    }
}
