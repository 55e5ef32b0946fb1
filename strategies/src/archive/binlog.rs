//! MariaDB's binary log as an archived change log: the files are read where the server writes
//! them (beside the agent, as they grow: no second connection, no extra process, and no
//! buffering between the server's write and the archiver's read), cut at transaction
//! boundaries found from the events' headers; replayed with `mariadb-binlog | mariadb`.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::{ChangeLog, Chunk, Rebuilt, Replay};
use crate::backup::{BackupCtx, BackupError};

const HEADER: usize = 19;
const QUERY_EVENT: u8 = 2;
const FORMAT_DESCRIPTION_EVENT: u8 = 15;
const XID_EVENT: u8 = 16;
const GTID_EVENT: u8 = 162;
const XA_PREPARE_LOG_EVENT: u8 = 183;
/// `Gtid_log_event` flag: the transaction is the one event that follows.
const FL_STANDALONE: u8 = 1;

/// The binary log of a server whose `log_bin` base name is `base`, in `dir`.
pub struct BinlogLog {
    dir: PathBuf,
    base: String,
    /// Whether each file's events end with a CRC32 (from its format description).
    checksums: HashMap<String, bool>,
    /// The index as last read, and its modification time and size then.
    index: std::sync::Mutex<Option<IndexSeen>>,
}

/// The index file's (modification time, size) and the files it listed.
type IndexSeen = ((std::time::SystemTime, u64), Vec<String>);

impl BinlogLog {
    pub fn new(dir: PathBuf, base: &str) -> Self {
        BinlogLog {
            dir,
            base: base.to_string(),
            checksums: HashMap::new(),
            index: Default::default(),
        }
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

/// Whether a file's events carry a checksum, from its format description event (None: the
/// file is shorter than that event yet).
fn checksum_of(path: &Path) -> std::io::Result<Option<bool>> {
    let mut f = std::fs::File::open(path)?;
    let mut head = [0u8; 4 + HEADER];
    if f.read(&mut head)? < head.len() {
        return Ok(None);
    }
    if &head[..4] != b"\xfebin" || head[4 + 4] != FORMAT_DESCRIPTION_EVENT {
        return Err(std::io::Error::other(format!(
            "{} is not a binary log",
            path.display()
        )));
    }
    let size = u32_at(&head, 4 + 9) as usize;
    let mut ev = vec![0u8; size];
    f.seek(SeekFrom::Start(4))?;
    if f.read(&mut ev)? < size {
        return Ok(None);
    }
    // The checksum algorithm is the byte before the event's own 4-byte checksum.
    Ok(Some(size >= HEADER + 5 && ev[size - 5] == 1))
}

/// Where a run of events is, for finding transaction boundaries.
#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Outside,
    Standalone,
    Transaction,
}

/// What [`scan`] finds: the end of the last complete transaction, the boundaries, the GTIDs.
pub(crate) type Scanned = (usize, Vec<(u64, u32)>, Vec<Gtid>);

/// A transaction's GTID as [`scan`] finds it, and where its first event starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Gtid {
    pub domain: u32,
    pub server: u32,
    pub seq: u64,
    pub start: u64,
}

impl Gtid {
    fn name(&self) -> String {
        format!("{}-{}-{}", self.domain, self.server, self.seq)
    }
}

/// Scans events in `buf` (starting at file offset `base`, a boundary): returns the end of the
/// last complete transaction, every boundary with the server's timestamp of its last event,
/// and each transaction's GTID as found.
pub(crate) fn scan(buf: &[u8], base: u64, checksum: bool) -> Result<Scanned, String> {
    let mut p = 0usize;
    let mut state = State::Outside;
    let mut last = 0usize;
    let mut bounds = vec![];
    let mut gtids = vec![];
    if base == 0 {
        if buf.len() < 4 {
            return Ok((0, bounds, gtids));
        }
        p = 4;
        last = 4;
    }
    while p + HEADER <= buf.len() {
        let size = u32_at(buf, p + 9) as usize;
        if size < HEADER {
            return Err(format!(
                "a binary log event at {} has size {size}",
                base + p as u64
            ));
        }
        if p + size > buf.len() {
            break;
        }
        let kind = buf[p + 4];
        let when = u32_at(buf, p);
        let ends = match state {
            State::Outside if kind == GTID_EVENT => {
                if size < HEADER + 13 {
                    return Err(format!("a GTID event at {} is too short", base + p as u64));
                }
                let seq = u64::from_le_bytes(buf[p + HEADER..p + HEADER + 8].try_into().unwrap());
                let domain = u32_at(buf, p + HEADER + 8);
                gtids.push(Gtid {
                    domain,
                    server: u32_at(buf, p + 5),
                    seq,
                    start: base + p as u64,
                });
                state = if buf[p + HEADER + 12] & FL_STANDALONE != 0 {
                    State::Standalone
                } else {
                    State::Transaction
                };
                false
            }
            State::Outside | State::Standalone => true,
            State::Transaction => {
                kind == XID_EVENT
                    || kind == XA_PREPARE_LOG_EVENT
                    || (kind == QUERY_EVENT && ends_transaction(&buf[p..p + size], checksum))
            }
        };
        p += size;
        if ends {
            state = State::Outside;
            last = p;
            bounds.push((base + p as u64, when));
        }
    }
    Ok((last, bounds, gtids))
}

/// Whether a query event is a transaction's `COMMIT` or `ROLLBACK`.
fn ends_transaction(ev: &[u8], checksum: bool) -> bool {
    let body = &ev[HEADER..ev.len() - if checksum { 4 } else { 0 }];
    if body.len() < 13 {
        return false;
    }
    let db_len = body[8] as usize;
    let vars = u16::from_le_bytes([body[11], body[12]]) as usize;
    let at = 13 + vars + db_len + 1;
    let q = body.get(at..).unwrap_or_default();
    q.eq_ignore_ascii_case(b"COMMIT") || q.eq_ignore_ascii_case(b"ROLLBACK")
}

impl ChangeLog for BinlogLog {
    fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    fn is_change_file(&self, path: &Path) -> bool {
        path.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
            n.starts_with(&self.base) && n.as_bytes().get(self.base.len()) == Some(&b'.')
        })
    }

    fn files(&self) -> Result<Vec<String>, String> {
        let index = self.dir.join(format!("{}.index", self.base));
        // Read again only when it changed (a look per write would read it each time).
        let stamp = std::fs::metadata(&index)
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.len())));
        if let (Some(stamp), Some((seen, files))) = (stamp, &*self.index.lock().unwrap()) {
            if stamp == *seen {
                return Ok(files.clone());
            }
        }
        let text = match std::fs::read_to_string(&index) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(format!("{}: {e}", index.display())),
        };
        let files: Vec<String> = text
            .lines()
            .filter_map(|l| l.trim().rsplit('/').next())
            .filter(|f| !f.is_empty())
            .map(str::to_string)
            .collect();
        if let Some(stamp) = stamp {
            *self.index.lock().unwrap() = Some((stamp, files.clone()));
        }
        Ok(files)
    }

    fn read_complete(&mut self, file: &str, from: u64, max: usize) -> Result<Chunk, String> {
        let path = self.dir.join(file);
        let checksum = match self.checksums.get(file) {
            Some(c) => *c,
            None => match checksum_of(&path).map_err(|e| format!("{}: {e}", path.display()))? {
                Some(c) => *self.checksums.entry(file.to_string()).or_insert(c),
                None => return Ok(Chunk::default()),
            },
        };
        let mut f = std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let len = f
            .metadata()
            .map_err(|e| format!("{}: {e}", path.display()))?
            .len();
        if len <= from {
            return Ok(Chunk::default());
        }
        f.seek(SeekFrom::Start(from))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let mut buf = vec![];
        // Whole events up to `max`, and the rest of an event that crosses it.
        let want = ((len - from) as usize).min(max.max(1 << 20));
        (&mut f)
            .take(want as u64)
            .read_to_end(&mut buf)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let (end, boundaries, gtids) =
            scan(&buf, from, checksum).map_err(|e| format!("{file}: {e}"))?;
        buf.truncate(end);
        let complete: Vec<&Gtid> = gtids
            .iter()
            .filter(|g| g.start < from + end as u64)
            .collect();
        Ok(Chunk {
            bytes: buf,
            boundaries,
            first_position: complete.first().map(|g| g.name()).unwrap_or_default(),
            last_position: complete.last().map(|g| g.name()).unwrap_or_default(),
        })
    }
}

/// Replays binary logs with `mariadb-binlog | mariadb`.
pub struct BinlogReplay {
    pub binlog_tool: String,
    pub client: String,
}

impl Default for BinlogReplay {
    fn default() -> Self {
        BinlogReplay {
            binlog_tool: "mariadb-binlog".into(),
            client: "mariadb".into(),
        }
    }
}

/// The sequence number of a binary log file's name (`mysql-bin.000012` → 12).
pub fn file_order(file: &str) -> u64 {
    file.rsplit('.')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Parses a GTID `domain-server-seq`.
pub fn parse_gtid(s: &str) -> Option<(u32, u64)> {
    let mut it = s.trim().split('-');
    let (d, _server, seq) = (it.next()?, it.next()?, it.next()?);
    if it.next().is_some() {
        return None;
    }
    let _: u32 = _server.parse().ok()?;
    Some((d.parse().ok()?, seq.parse().ok()?))
}

/// A GTID position two archives are joined at: each domain's last sequence number.
fn join_position(position: &str) -> Result<std::collections::BTreeMap<u32, (u32, u64)>, String> {
    let p = coffer_proto::datastore::parse_gtids(position);
    if p.is_empty() {
        return Err(format!(
            "'{position}' is not a GTID position; the archives cannot be joined there"
        ));
    }
    Ok(p)
}

/// Every complete transaction of the rebuilt files, in order: its file, GTID and end.
fn transactions(rebuilt: &Rebuilt, dir: &Path) -> Result<Vec<(String, Gtid, u64)>, String> {
    let mut out = vec![];
    for (file, end) in &rebuilt.files {
        let path = dir.join(file);
        let checksum = checksum_of(&path)
            .map_err(|e| format!("{file}: {e}"))?
            .unwrap_or(true);
        let mut buf = std::fs::read(&path).map_err(|e| format!("{file}: {e}"))?;
        buf.truncate(*end as usize);
        let (_, bounds, gtids) = scan(&buf, 0, checksum)?;
        for g in gtids {
            if let Some(end) = bounds.iter().map(|(p, _)| *p).find(|p| *p > g.start) {
                out.push((file.clone(), g, end));
            }
        }
    }
    Ok(out)
}

impl Replay for BinlogReplay {
    fn order(&self, file: &str) -> u64 {
        file_order(file)
    }

    fn stop_at_position(
        &self,
        rebuilt: &Rebuilt,
        dir: &Path,
        position: &str,
    ) -> Result<Option<(String, u64)>, String> {
        let (domain, seq) = parse_gtid(position).ok_or_else(|| {
            format!("'{position}' is not a GTID (domain-server-sequence, e.g. 0-1-42)")
        })?;
        Ok(transactions(rebuilt, dir)?
            .into_iter()
            .find(|(_, g, _)| g.domain == domain && g.seq == seq)
            .map(|(file, _, end)| (file, end)))
    }

    fn stop_covered_by(
        &self,
        rebuilt: &Rebuilt,
        dir: &Path,
        position: &str,
    ) -> Result<Option<(String, u64)>, String> {
        let upto = join_position(position)?;
        Ok(transactions(rebuilt, dir)?
            .into_iter()
            .rfind(|(_, g, _)| upto.get(&g.domain).is_some_and(|x| g.seq <= x.1))
            .map(|(file, _, end)| (file, end)))
    }

    fn resume_after(
        &self,
        rebuilt: &Rebuilt,
        dir: &Path,
        position: &str,
    ) -> Result<Option<(String, u64)>, String> {
        let after = join_position(position)?;
        let txs = transactions(rebuilt, dir)?;
        // Each domain's first archived transaction must come at most right after the
        // position: else what came between is in neither archive.
        let mut seen = std::collections::BTreeSet::new();
        for (_, g, _) in &txs {
            if seen.insert(g.domain) {
                let known = after.get(&g.domain).map_or(0, |x| x.1);
                if g.seq > known + 1 {
                    return Err(format!(
                        "the archive that follows {position} starts at {}: the transactions between are in no archive (a hole at the change of source)",
                        g.name()
                    ));
                }
            }
        }
        let next = txs
            .into_iter()
            .find(|(_, g, _)| g.seq > after.get(&g.domain).map_or(0, |x| x.1));
        // The transaction right after the position, not a later one (a hole within).
        if let Some((_, g, _)) = &next {
            if let Some(x) = after.get(&g.domain) {
                if g.seq != x.1 + 1 {
                    return Err(format!(
                        "the archive that follows {position} goes on at {}: the transactions between are in no archive (a hole at the change of source)",
                        g.name()
                    ));
                }
            }
        }
        Ok(next.map(|(file, g, _)| (file, g.start)))
    }

    fn last_position(
        &self,
        rebuilt: &Rebuilt,
        dir: &Path,
        upto: Option<&(String, u64)>,
    ) -> Result<Option<String>, String> {
        let key = |f: &str, p: u64| (file_order(f), p);
        Ok(transactions(rebuilt, dir)?
            .into_iter()
            .rfind(|(f, _, end)| upto.is_none_or(|(uf, up)| key(f, *end) <= key(uf, *up)))
            .map(|(_, g, _)| g.name()))
    }

    fn replay(
        &self,
        ctx: &BackupCtx,
        dir: &Path,
        rebuilt: &Rebuilt,
        from: (&str, u64),
        stop: Option<(String, u64)>,
    ) -> Result<(), BackupError> {
        let stop_order = stop.as_ref().map(|(f, _)| file_order(f));
        let files: Vec<&String> = rebuilt
            .files
            .iter()
            .map(|(f, _)| f)
            .filter(|f| file_order(f) >= file_order(from.0))
            .filter(|f| stop_order.is_none_or(|s| file_order(f) <= s))
            .collect();
        if files.is_empty()
            || stop
                .as_ref()
                .is_some_and(|(f, p)| f == from.0 && *p <= from.1)
        {
            return Ok(());
        }
        let mut tool = Command::new(&self.binlog_tool);
        tool.arg(format!("--start-position={}", from.1.max(4)));
        if let Some((_, p)) = &stop {
            tool.arg(format!("--stop-position={p}"));
        }
        tool.args(files.iter().map(|f| dir.join(f)));
        let defaults = crate::backup::write_defaults(ctx, "mariadb-replay.cnf", "client")?;
        let log = ctx.tmp_dir.join("mariadb-replay.log");
        let tool_log = ctx.tmp_dir.join("mariadb-binlog.log");
        let result = (|| {
            let mut child = tool
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(std::fs::File::create(&tool_log)?)
                .spawn()
                .map_err(|e| BackupError::Tool {
                    tool: self.binlog_tool.clone(),
                    detail: format!("cannot start: {e}"),
                })?;
            let mut out = child.stdout.take().expect("piped");
            let fed = crate::backup::stream_to_tool(
                Command::new(&self.client)
                    .arg(format!("--defaults-file={}", defaults.display()))
                    .args(["--binary-mode", "--max-allowed-packet=1G", "--batch"]),
                "mariadb (replaying the archived binary log)",
                &log,
                &mut |stdin: &mut dyn Write| std::io::copy(&mut out, stdin).map(|_| ()),
            );
            if fed.is_err() {
                let _ = child.kill();
            }
            let status = child.wait()?;
            fed?;
            crate::backup::exited(status, "mariadb-binlog", &tool_log)
        })();
        let _ = std::fs::remove_file(&defaults);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: u8, when: u32, body: &[u8], checksum: bool) -> Vec<u8> {
        let size = HEADER + body.len() + if checksum { 4 } else { 0 };
        let mut e = vec![];
        e.extend_from_slice(&when.to_le_bytes());
        e.push(kind);
        e.extend_from_slice(&1u32.to_le_bytes());
        e.extend_from_slice(&(size as u32).to_le_bytes());
        e.extend_from_slice(&0u32.to_le_bytes());
        e.extend_from_slice(&0u16.to_le_bytes());
        e.extend_from_slice(body);
        if checksum {
            e.extend_from_slice(&[0; 4]);
        }
        e
    }

    fn gtid(seq: u64, standalone: bool) -> Vec<u8> {
        let mut b = seq.to_le_bytes().to_vec();
        b.extend_from_slice(&0u32.to_le_bytes());
        b.push(if standalone { FL_STANDALONE } else { 0 });
        event(GTID_EVENT, 10, &b, true)
    }

    fn query(q: &str) -> Vec<u8> {
        let mut b = vec![0u8; 8];
        b.push(1); // db_len
        b.extend_from_slice(&[0, 0]);
        b.extend_from_slice(&0u16.to_le_bytes());
        b.extend_from_slice(b"t\0");
        b.extend_from_slice(q.as_bytes());
        event(QUERY_EVENT, 11, &b, true)
    }

    #[test]
    fn boundaries_fall_between_transactions_only() {
        let mut f = b"\xfebin".to_vec();
        f.extend(event(FORMAT_DESCRIPTION_EVENT, 9, &[0; 10], true));
        let after_fd = f.len();
        f.extend(gtid(1, true));
        f.extend(query("CREATE TABLE t (id INT)"));
        let after_ddl = f.len();
        f.extend(gtid(2, false));
        f.extend(event(19, 12, &[0; 8], true)); // table map
        f.extend(event(23, 12, &[0; 8], true)); // write rows
        f.extend(event(XID_EVENT, 12, &[0; 8], true));
        let after_trx = f.len();
        f.extend(gtid(3, false));
        f.extend(query("BEGIN"));
        f.extend(query("INSERT INTO t VALUES (1)"));
        f.extend(query("COMMIT"));
        let after_myisam = f.len();
        f.extend(gtid(4, false));
        f.extend(event(23, 13, &[0; 8], true));
        let (end, bounds, gtids) = scan(&f, 0, true).unwrap();
        assert_eq!(end, after_myisam, "an open transaction is never cut");
        let at: Vec<u64> = bounds.iter().map(|b| b.0).collect();
        assert_eq!(
            at,
            vec![
                after_fd as u64,
                after_ddl as u64,
                after_trx as u64,
                after_myisam as u64
            ]
        );
        assert_eq!(
            gtids.iter().map(|g| g.seq).collect::<Vec<_>>(),
            vec![1, 2, 3, 4]
        );
        // A torn event is not read past, from the middle of the file too.
        let (end, _, _) = scan(&f[after_ddl..after_trx - 3], after_ddl as u64, true).unwrap();
        assert_eq!(end, 0);
        let (end, _, _) = scan(&f[after_ddl..after_trx], after_ddl as u64, true).unwrap();
        assert_eq!(end, after_trx - after_ddl);
    }

    #[test]
    fn archives_join_after_the_position_a_source_took_over_at() {
        let dir = tempfile::tempdir().unwrap();
        let file = |seqs: &[u64]| {
            let mut f = b"\xfebin".to_vec();
            f.extend(event(FORMAT_DESCRIPTION_EVENT, 9, &[0; 10], true));
            let mut starts = vec![];
            for s in seqs {
                starts.push(f.len() as u64);
                f.extend(gtid(*s, true));
                f.extend(query("CREATE TABLE t (id INT)"));
            }
            (f, starts)
        };
        let (f, starts) = file(&[4, 5, 6]);
        std::fs::write(dir.path().join("b.000002"), &f).unwrap();
        let rebuilt = Rebuilt {
            files: vec![("b.000002".into(), f.len() as u64)],
            ..Default::default()
        };
        let r = BinlogReplay::default();
        let at = |p: &str| r.resume_after(&rebuilt, dir.path(), p);
        assert_eq!(at("0-1-4").unwrap(), Some(("b.000002".into(), starts[1])));
        assert_eq!(at("0-7-3").unwrap(), Some(("b.000002".into(), starts[0])));
        assert_eq!(at("0-1-6").unwrap(), None, "nothing after it");
        assert_eq!(
            r.stop_covered_by(&rebuilt, dir.path(), "0-9-5").unwrap(),
            Some(("b.000002".into(), starts[2])),
            "the transactions up to 5, whoever wrote them"
        );
        assert_eq!(
            r.stop_covered_by(&rebuilt, dir.path(), "0-1-3").unwrap(),
            None
        );
        let hole = at("0-1-2").unwrap_err();
        assert!(hole.contains("0-1-4") && hole.contains("hole"), "{hole}");
        assert!(at("x").is_err());
        assert_eq!(
            r.last_position(&rebuilt, dir.path(), None).unwrap(),
            Some("0-1-6".into())
        );
        assert_eq!(
            r.last_position(&rebuilt, dir.path(), Some(&("b.000002".into(), starts[2])))
                .unwrap(),
            Some("0-1-5".into())
        );
        assert_eq!(
            r.stop_at_position(&rebuilt, dir.path(), "0-1-5").unwrap(),
            Some(("b.000002".into(), starts[2]))
        );
    }

    #[test]
    fn gtids_and_file_orders_parse() {
        assert_eq!(parse_gtid("0-1-42"), Some((0, 42)));
        assert_eq!(parse_gtid("0-1"), None);
        assert_eq!(parse_gtid("a-1-2"), None);
        assert_eq!(file_order("mysql-bin.000012"), 12);
    }
}
