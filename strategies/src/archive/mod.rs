//! Continuous archiving of a source's change stream (MariaDB: its binary log) into backup
//! storage, and replaying it on a restored server up to a point in time or a position.
//!
//! The archive is a set of *segments*: byte ranges `[start, end)` of one change file, each
//! starting and ending on a transaction boundary, sealed like a backup (the segment's key is
//! its stream id) and named by file and range (`archive/<file>/<start>-<end>`). A file is
//! archived from its first byte, so a restore can rebuild it exactly. Each segment carries the
//! archiver's *marks*: `(time, position)` pairs saying "everything up to this position was
//! written before this time". A restore to time T stops at the last mark not later than T.
//!
//! The [`Ledger`] is the archiver's own record (kept by the agent across restarts): where the
//! next byte comes from, since when the archive is continuous, and until when everything
//! written is stored. What the server purged before it was shipped is a hole: the ledger
//! starts again, and the window the controller shows starts after it.

pub mod binlog;
pub mod wal;

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::backup::{BackupCtx, BackupError};

/// What a segment says of itself (inside its sealed stream, before the bytes).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SegmentHeader {
    pub file: String,
    pub start: u64,
    pub end: u64,
    /// `(unix µs, position)`, positions increasing: everything up to the position (a
    /// transaction boundary) was written before that time.
    pub marks: Vec<(i64, u64)>,
    /// The datastore's positions of the first and the last transaction in the bytes (empty:
    /// none, or the datastore does not name them).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub first_position: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_position: String,
    /// Small files the datastore needs beside the change files to replay them, `(name,
    /// content)` (PostgreSQL: the timeline's history), carried by a file's first segment.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub companions: Vec<(String, String)>,
}

pub use coffer_common::archive::{parse_segment_key, segment_key};

/// Writes a segment's content: a length-prefixed JSON header, then the bytes.
pub fn write_segment(out: &mut dyn Write, h: &SegmentHeader, bytes: &[u8]) -> std::io::Result<()> {
    let json = serde_json::to_vec(h).map_err(std::io::Error::other)?;
    out.write_all(&(json.len() as u32).to_le_bytes())?;
    out.write_all(&json)?;
    out.write_all(bytes)
}

/// Reads a segment's header from its (opened, authenticated) content; the bytes follow.
pub fn read_segment_header(r: &mut dyn Read) -> std::io::Result<SegmentHeader> {
    let mut n = [0u8; 4];
    r.read_exact(&mut n)?;
    let n = u32::from_le_bytes(n) as usize;
    if n > 64 << 20 {
        return Err(std::io::Error::other("segment header too large"));
    }
    let mut json = vec![0; n];
    r.read_exact(&mut json)?;
    serde_json::from_slice(&json).map_err(std::io::Error::other)
}

/// The archiver's record, kept by the agent between ticks and across restarts.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct Ledger {
    /// The archive is continuous from this time on (unix µs); 0: not started.
    pub since_us: i64,
    /// Everything the server wrote before this time is stored (unix µs).
    pub latest_us: i64,
    /// The next byte to ship: this file, this offset (a transaction boundary).
    pub file: String,
    pub pos: u64,
    /// Times the archive had to start again because unshipped changes were gone.
    pub holes: u32,
    pub shipped_bytes: u64,
    pub segments: u64,
    /// Closed files stored again as one segment each (the controller then removes the
    /// pieces).
    pub compactions: u64,
    /// The file the archive started with (since the last hole): a backup whose position is
    /// in it or a later file can be rolled forward.
    pub first_file: String,
    /// The datastore's positions of the first transaction stored since `since_us` and of the
    /// last one stored (empty: none yet, or the datastore does not name them): where this
    /// archive joins the one of the source it took over from.
    pub first_position: String,
    pub last_position: String,
    /// The archive stopped because the instance became a replica; when it is a source again
    /// it goes on from where it stopped, with a new `since` (what it wrote as a replica is its
    /// source's, archived there).
    pub paused: bool,
}

/// A server's change files, as the archiver reads them.
pub trait ChangeLog: Send {
    /// The change files the server has, oldest first (the last one is being written).
    fn files(&self) -> Result<Vec<String>, String>;
    /// The complete transactions of `file` from `from` (a transaction boundary, 0 for the
    /// file's start) as the file is now, at most about `max` bytes, with the boundaries
    /// found (position, the server's own timestamp of that transaction's last event in
    /// seconds).
    fn read_complete(&mut self, file: &str, from: u64, max: usize) -> Result<Chunk, String>;
    /// Whether a write to `path` (in the data directory) may be a change to archive: what
    /// wakes the archiver.
    fn is_change_file(&self, path: &Path) -> bool;
    /// Where a change file is.
    fn path(&self, file: &str) -> std::path::PathBuf;
    /// The small files a replay of `file` needs beside it, `(name, content)`.
    fn companions(&self, _file: &str) -> Vec<(String, String)> {
        vec![]
    }
}

/// Complete transactions read from a change file.
#[derive(Debug, Default)]
pub struct Chunk {
    pub bytes: Vec<u8>,
    /// `(position, server seconds)` of each transaction boundary in the bytes.
    pub boundaries: Vec<(u64, u32)>,
    /// The datastore's positions of the first and the last complete transaction in the bytes
    /// (empty: none, or not named).
    pub first_position: String,
    pub last_position: String,
}

/// A segment cut from what was read, waiting to be stored.
#[derive(Debug, Clone)]
pub struct Segment {
    pub key: String,
    pub header: SegmentHeader,
    pub bytes: Vec<u8>,
}

/// What the storing task does next, in order.
#[derive(Debug, Clone)]
pub enum Job {
    /// Store a segment.
    Segment(Segment),
    /// Store a closed file again as one segment `[0, end)` (read from the server's file),
    /// with every mark of its pieces: fewer objects to keep and to read back.
    Whole {
        key: String,
        header: SegmentHeader,
        path: std::path::PathBuf,
    },
}

/// Reads a change log as it grows and cuts it into segments. Reading ([`Archiver::observe`])
/// never waits on storage, so the marks stay close to when each write happened while earlier
/// segments are being stored ([`Archiver::next_ready`], [`Archiver::shipped`]).
pub struct Archiver {
    log: Box<dyn ChangeLog>,
    /// What is stored: `file`/`pos` is the next byte to store.
    pub ledger: Ledger,
    /// What is read: the next byte to read.
    read_file: String,
    read_pos: u64,
    /// Read and not yet cut, starting at `pending_start` of `read_file`.
    pending: Vec<u8>,
    pending_start: u64,
    marks: Vec<(i64, u64)>,
    /// The first and last transaction positions in `pending`.
    pending_positions: (String, String),
    ready: std::collections::VecDeque<Job>,
    /// Every mark of `read_file` and how many segments were cut from it; `file_whole` says
    /// whether this archiver read it from its first byte (else its marks are partial and it
    /// is not compacted).
    file_marks: Vec<(i64, u64)>,
    file_segments: u32,
    file_whole: bool,
    /// The file a rotation was asked for (once per file).
    rotation_asked: String,
    /// `(time, file, end)` of each look since the last store: everything written before the
    /// time was read by `end` of `file`.
    seen: std::collections::VecDeque<(i64, String, u64)>,
    /// The server's files at the last look, oldest first.
    files: Vec<String>,
    last_cut: Instant,
    /// Cut what is pending at least this often (the archive's RPO while writes go on).
    pub ship_every: Duration,
    /// The first look reads what was written while no archiver watched (after a restart).
    backlog: bool,
}

/// Pending bytes beyond which a look cuts a segment at once.
const SHIP_BYTES: usize = 8 << 20;
/// Read segments waiting to be stored past which reading pauses.
const READY_LIMIT: usize = 64 << 20;

pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

impl Archiver {
    pub fn new(log: Box<dyn ChangeLog>, ledger: Ledger, ship_every: Duration) -> Self {
        let ledger_file_pos = ledger.pos;
        Archiver {
            log,
            read_file: ledger.file.clone(),
            read_pos: ledger.pos,
            pending_start: ledger.pos,
            ledger,
            pending: vec![],
            marks: vec![],
            pending_positions: Default::default(),
            ready: Default::default(),
            file_marks: vec![],
            file_segments: 0,
            file_whole: ledger_file_pos == 0,
            rotation_asked: String::new(),
            seen: Default::default(),
            files: vec![],
            last_cut: Instant::now() - ship_every,
            ship_every,
            backlog: true,
        }
    }

    fn index_of(&self, file: &str) -> Option<usize> {
        self.files.iter().position(|f| f == file)
    }

    /// Reads what the server wrote since the last look and cuts segments when due. Returns
    /// whether the ledger started again (the caller persists it then).
    pub fn observe(&mut self) -> Result<bool, String> {
        let t0 = now_us();
        self.files = self.log.files()?;
        let Some(newest) = self.files.last().cloned() else {
            return Ok(false);
        };
        let mut restarted = false;
        if self.ledger.file.is_empty()
            || self.index_of(&self.ledger.file).is_none()
            || self.index_of(&self.read_file).is_none()
        {
            if !self.ledger.file.is_empty() {
                tracing::warn!(
                    file = %self.ledger.file,
                    "the server no longer has the change file the archive was storing; the archive starts again (a hole)"
                );
                self.ledger.holes += 1;
            }
            self.ledger = Ledger {
                since_us: t0,
                latest_us: 0,
                file: newest.clone(),
                first_file: newest.clone(),
                pos: 0,
                first_position: String::new(),
                last_position: String::new(),
                paused: false,
                ..std::mem::take(&mut self.ledger)
            };
            self.read_file = newest;
            self.read_pos = 0;
            self.pending_start = 0;
            self.pending.clear();
            self.pending_positions = Default::default();
            self.marks.clear();
            self.ready.clear();
            self.seen.clear();
            self.file_marks.clear();
            self.file_segments = 0;
            self.file_whole = true;
            restarted = true;
        }
        // Storage that does not keep up (cut off, slow) holds reading back: what is not read
        // yet stays in the server's own files, not in this process's memory.
        let waiting: usize = self
            .ready
            .iter()
            .map(|j| match j {
                Job::Segment(s) => s.bytes.len(),
                Job::Whole { .. } => 0,
            })
            .sum();
        if !restarted && waiting >= READY_LIMIT {
            return Ok(false);
        }
        // Whether this look read everything the server had written before `t0`.
        let mut caught_up = false;
        for _ in 0..64 {
            let idx = self.index_of(&self.read_file).unwrap();
            let closed = idx + 1 < self.files.len();
            let chunk = self
                .log
                .read_complete(&self.read_file, self.read_pos, SHIP_BYTES)?;
            let t1 = now_us();
            let got = !chunk.bytes.is_empty();
            if got {
                // What was written while no archiver watched (a backlog after a restart) is
                // placed by the server's own clock, which counts whole seconds: a transaction
                // begun in second S is placed at S + 1 (never later than it was seen).
                if self.backlog {
                    for (pos, secs) in &chunk.boundaries {
                        let t = (*secs as i64 + 1) * 1_000_000;
                        if t < t1 {
                            self.marks.push((t, *pos));
                        }
                    }
                }
                self.read_pos += chunk.bytes.len() as u64;
                self.marks.push((t1, self.read_pos));
                self.pending.extend_from_slice(&chunk.bytes);
                if self.pending_positions.0.is_empty() {
                    self.pending_positions.0 = chunk.first_position;
                }
                if !chunk.last_position.is_empty() {
                    self.pending_positions.1 = chunk.last_position;
                }
            }
            let due = !self.pending.is_empty()
                && ((closed && !got)
                    || self.last_cut.elapsed() >= self.ship_every
                    || self.pending.len() >= SHIP_BYTES);
            if due {
                self.cut();
            }
            if closed && !got && self.pending.is_empty() {
                // A closed file is complete: store it again as one segment when it was cut
                // into several, then go on with the next one.
                if self.file_whole && self.file_segments > 1 {
                    let header = SegmentHeader {
                        file: self.read_file.clone(),
                        start: 0,
                        end: self.read_pos,
                        marks: std::mem::take(&mut self.file_marks),
                        companions: self.log.companions(&self.read_file),
                        ..Default::default()
                    };
                    self.ready.push_back(Job::Whole {
                        key: segment_key(&header.file, 0, header.end),
                        path: self.log.path(&header.file),
                        header,
                    });
                }
                self.file_marks.clear();
                self.file_segments = 0;
                self.file_whole = true;
                self.read_file = self.files[idx + 1].clone();
                self.read_pos = 0;
                self.pending_start = 0;
                continue;
            }
            if !got {
                caught_up = true;
                break;
            }
        }
        self.backlog = false;
        if caught_up {
            self.seen
                .push_back((t0, self.read_file.clone(), self.read_pos));
        }
        self.advance_latest();
        Ok(restarted)
    }

    /// Cuts what is pending into a segment waiting to be stored.
    fn cut(&mut self) {
        let (first_position, last_position) = std::mem::take(&mut self.pending_positions);
        let companions = if self.pending_start == 0 {
            self.log.companions(&self.read_file)
        } else {
            vec![]
        };
        let header = SegmentHeader {
            file: self.read_file.clone(),
            start: self.pending_start,
            end: self.read_pos,
            marks: std::mem::take(&mut self.marks),
            first_position,
            last_position,
            companions,
        };
        self.file_marks.extend_from_slice(&header.marks);
        self.file_segments += 1;
        self.ready.push_back(Job::Segment(Segment {
            key: segment_key(&header.file, header.start, header.end),
            header,
            bytes: std::mem::take(&mut self.pending),
        }));
        self.pending_start = self.read_pos;
        self.last_cut = Instant::now();
    }

    /// The instance stopped being a source: what was read is cut to be stored, and the ledger
    /// says the archive paused (returns whether that is news, for the caller to persist).
    pub fn pause(&mut self) -> bool {
        if !self.pending.is_empty() {
            self.cut();
        }
        let news = !self.ledger.paused && !self.ledger.file.is_empty();
        self.ledger.paused |= news;
        news
    }

    /// The instance is a source again after a pause: the archive goes on from where it stopped
    /// (its files are continuous), as a new period: since now, and its first transaction is
    /// the first one read from now on (returns whether that is news).
    pub fn resume(&mut self) -> bool {
        if !self.ledger.paused {
            return false;
        }
        self.ledger.paused = false;
        self.ledger.since_us = now_us();
        self.ledger.latest_us = 0;
        self.ledger.first_file = self.read_file.clone();
        self.ledger.first_position.clear();
        self.seen.clear();
        true
    }

    /// The oldest job waiting to be stored.
    pub fn next_ready(&self) -> Option<&Job> {
        self.ready.front()
    }

    /// Records that the oldest ready job is stored.
    pub fn shipped(&mut self) {
        match self.ready.pop_front() {
            Some(Job::Segment(s)) => {
                if self.ledger.first_position.is_empty() {
                    self.ledger.first_position = s.header.first_position;
                }
                if !s.header.last_position.is_empty() {
                    self.ledger.last_position = s.header.last_position;
                }
                self.ledger.file = s.header.file;
                self.ledger.pos = s.header.end;
                self.ledger.shipped_bytes += s.bytes.len() as u64;
                self.ledger.segments += 1;
            }
            Some(Job::Whole { .. }) => self.ledger.compactions += 1,
            None => return,
        }
        self.advance_latest();
    }

    /// Drops the oldest ready job unstored: a compaction whose file the server removed
    /// meanwhile (its pieces stay stored and keep serving restores).
    pub fn skip_compaction(&mut self) {
        if matches!(self.ready.front(), Some(Job::Whole { .. })) {
            self.ready.pop_front();
        }
    }

    /// Whether the file being written should be closed (rotated) now, so that it can be
    /// compacted: it was cut into `segments` pieces or grew to `bytes`. Says so once a file.
    pub fn wants_rotation(&mut self, segments: u32, bytes: u64) -> bool {
        let due = self.file_segments >= segments || self.read_pos >= bytes;
        if due && self.rotation_asked != self.read_file && !self.read_file.is_empty() {
            self.rotation_asked = self.read_file.clone();
            return true;
        }
        false
    }

    /// Whether everything read is stored.
    pub fn idle(&self) -> bool {
        // A compaction waiting does not hold the latest time back.
        self.pending.is_empty() && self.ready.iter().all(|j| matches!(j, Job::Whole { .. }))
    }

    /// Moves the latest restorable time to the last look whose reads are all stored.
    fn advance_latest(&mut self) {
        let stored = (self.index_of(&self.ledger.file), self.ledger.pos);
        let idle = self.idle();
        while let Some((t, f, end)) = self.seen.front() {
            let at = (self.index_of(f), *end);
            if idle || at <= stored {
                self.ledger.latest_us = self.ledger.latest_us.max(*t);
                self.seen.pop_front();
            } else {
                break;
            }
        }
    }
}

/// Where a replay stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Everything archived.
    Latest,
    /// Transactions written up to this time (unix µs).
    Time(i64),
    /// Up to and including this transaction (the datastore's position, e.g. a GTID).
    Position(String),
}

/// The archive's files rebuilt in a directory, ready to replay.
#[derive(Debug, Default)]
pub struct Rebuilt {
    /// The files in order, each complete from its first byte up to `end`.
    pub files: Vec<(String, u64)>,
    pub marks: Vec<(String, i64, u64)>,
    /// The companions the segments carried, `(name, content)`, each name once.
    pub companions: Vec<(String, String)>,
    /// Why the files stop where they do when a hole cut them short (what came after it is
    /// not rebuilt): a replay that needs more is refused with this.
    pub hole: Option<String>,
}

impl Rebuilt {
    /// The time of the last mark (0: none).
    pub fn last_mark(&self) -> i64 {
        self.marks.iter().map(|(_, t, _)| *t).max().unwrap_or(0)
    }
}

/// A stored segment as its key names it, opened only when its turn comes.
pub struct Stored {
    pub file: String,
    pub start: u64,
    pub end: u64,
    #[allow(clippy::type_complexity)]
    pub open: Box<dyn FnOnce() -> Result<(SegmentHeader, Box<dyn Read + Send>), String> + Send>,
}

/// Rebuilds in `dir` the files of `segments` (in any order) from `from_file` on, refusing a
/// hole: every file must be complete from its first byte, and each file must follow the
/// previous one. Each segment's own header must say what its key says.
pub fn rebuild(
    dir: &Path,
    from_file: &str,
    segments: Vec<Stored>,
    order: &dyn Fn(&str) -> u64,
) -> Result<Rebuilt, String> {
    rebuild_each(dir, from_file, segments, order, &mut |_| Ok(true))
}

/// [`rebuild`], calling `done` each time a file is complete (the last of `files`; its marks
/// are in): false stops the rebuild there.
pub fn rebuild_each(
    dir: &Path,
    from_file: &str,
    segments: Vec<Stored>,
    order: &dyn Fn(&str) -> u64,
    done: &mut dyn FnMut(&Rebuilt) -> Result<bool, String>,
) -> Result<Rebuilt, String> {
    let mut segs: Vec<Stored> = segments
        .into_iter()
        .filter(|s| order(&s.file) >= order(from_file))
        .collect();
    // A compacted file's whole segment first; the pieces it covers are not read.
    segs.sort_by_key(|s| (order(&s.file), s.start, std::cmp::Reverse(s.end)));
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut out = Rebuilt::default();
    let mut current: Option<(String, std::fs::File, u64)> = None;
    for s in segs {
        if let Some((f, _, end)) = &current {
            if *f == s.file && s.end <= *end {
                continue;
            }
        }
        let (h, mut r) = (s.open)()?;
        if (h.file.as_str(), h.start, h.end) != (s.file.as_str(), s.start, s.end) {
            return Err(format!(
                "the archived segment {} says it holds {}; refused",
                segment_key(&s.file, s.start, s.end),
                segment_key(&h.file, h.start, h.end)
            ));
        }
        // A hole after the first file ends what is rebuilt: what comes before it serves the
        // points before it (the caller refuses a replay that needs more).
        let hole = match &current {
            Some((f, _, end)) if *f == h.file => (h.start != *end).then(|| {
                format!(
                    "the archive has a hole in {}: bytes {} to {} are missing",
                    h.file, end, h.start
                )
            }),
            _ if current.is_some() || !out.files.is_empty() => {
                let prev = current
                    .as_ref()
                    .map(|(f, _, _)| f.clone())
                    .or_else(|| out.files.last().map(|(f, _)| f.clone()))
                    .unwrap_or_default();
                if h.start != 0 {
                    Some(format!(
                        "the archive has a hole: {} is stored from byte {} only",
                        h.file, h.start
                    ))
                } else if order(&h.file) != order(&prev) + 1 {
                    Some(format!(
                        "the archive has a hole: the files between {prev} and {} are missing",
                        h.file
                    ))
                } else {
                    None
                }
            }
            _ => None,
        };
        if let Some(why) = hole {
            out.hole = Some(why);
            break;
        }
        match &mut current {
            Some((f, _, _)) if *f == h.file => {}
            _ => {
                if let Some((f, _, end)) = current.take() {
                    out.files.push((f, end));
                    if !done(&out)? {
                        return Ok(out);
                    }
                }
                if h.start != 0 {
                    return Err(format!(
                        "the archive has a hole: {} is stored from byte {} only",
                        h.file, h.start
                    ));
                }
                if out.files.is_empty() && h.file != from_file {
                    return Err(format!(
                        "the archive has no copy of {from_file}, where the backup ends; the earliest archived file is {}",
                        h.file
                    ));
                }
                let p = dir.join(&h.file);
                let f = std::fs::File::create(&p).map_err(|e| format!("{}: {e}", p.display()))?;
                current = Some((h.file.clone(), f, 0));
            }
        }
        let (_, f, end) = current.as_mut().unwrap();
        let n = std::io::copy(&mut r, f).map_err(|e| format!("segment of {}: {e}", h.file))?;
        if n != h.end - h.start {
            return Err(format!(
                "segment {} is {} bytes, its header says {}",
                segment_key(&h.file, h.start, h.end),
                n,
                h.end - h.start
            ));
        }
        *end = h.end;
        out.marks
            .extend(h.marks.iter().map(|(t, p)| (h.file.clone(), *t, *p)));
        for c in h.companions {
            if !out.companions.iter().any(|(n, _)| *n == c.0) {
                out.companions.push(c);
            }
        }
    }
    if let Some((f, _, end)) = current.take() {
        out.files.push((f, end));
        done(&out)?;
    }
    if out.files.is_empty() {
        return Err(format!(
            "the archive has no copy of {from_file}, where the backup ends"
        ));
    }
    Ok(out)
}

/// Where a replay fed to a running recovery stops in a file, decided as files complete.
pub enum Cut {
    /// The whole file.
    Whole,
    /// Up to this position; nothing after.
    At(u64),
}

/// Feeds the files of `segments` from `from` to the server's recovery as each one is complete
/// (`deliver(file, its rebuilt path, cut)`), up to the target: a time (the last mark not
/// later than it, decided once a later file's marks are known: a file is whole when a mark
/// of a later one is not later than the time), a position (`(file, offset)`), or everything.
/// Returns the rebuilt files and where the feed stopped (None: nothing after `from`).
#[allow(clippy::type_complexity)]
pub fn feed(
    dir: &Path,
    from: (&str, u64),
    segments: Vec<Stored>,
    order: &dyn Fn(&str) -> u64,
    time_us: i64,
    position: Option<(String, u64)>,
    deliver: &mut dyn FnMut(&str, &Path, Cut) -> Result<(), String>,
) -> Result<(Rebuilt, Option<(String, u64)>), String> {
    let after_from = |f: &str, p: u64| (order(f), p) > (order(from.0), from.1);
    // The last mark of `file` not later than the time, after `from`.
    let last_mark = |r: &Rebuilt, file: &str| {
        r.marks
            .iter()
            .filter(|(f, t, p)| f == file && *t <= time_us && after_from(f, *p))
            .map(|(_, _, p)| *p)
            .max()
    };
    let mut pending: Option<(String, u64)> = None;
    let mut stop: Option<(String, u64)> = None;
    let mut finished = false;
    let rebuilt = {
        let mut on_file = |r: &Rebuilt| -> Result<bool, String> {
            let (file, end) = r.files.last().cloned().expect("a complete file");
            if let Some((pf, off)) = &position {
                if order(&file) < order(pf) {
                    deliver(&file, &dir.join(&file), Cut::Whole)?;
                    stop = Some((file, end));
                    return Ok(true);
                }
                if file == *pf {
                    let at = (*off).min(end);
                    deliver(&file, &dir.join(&file), Cut::At(at))?;
                    stop = Some((file, at));
                    finished = true;
                }
                return Ok(false);
            }
            if let Some((pf, pend)) = pending.take() {
                // The file before: whole when a mark of this one is not later than the time.
                let whole =
                    time_us == 0 || r.marks.iter().any(|(f, t, _)| *f == file && *t <= time_us);
                if whole {
                    deliver(&pf, &dir.join(&pf), Cut::Whole)?;
                    stop = Some((pf, pend));
                } else {
                    if let Some(p) = last_mark(r, &pf) {
                        deliver(&pf, &dir.join(&pf), Cut::At(p))?;
                        stop = Some((pf, p));
                    }
                    finished = true;
                    return Ok(false);
                }
            }
            pending = Some((file, end));
            Ok(true)
        };
        rebuild_each(dir, from.0, segments, order, &mut on_file)?
    };
    if position.is_some() && !finished {
        let (f, off) = position.clone().unwrap_or_default();
        return Err(format!(
            "the archive holds no position {} (file {f}, offset {off})",
            rebuilt.files.last().map(|x| x.0.as_str()).unwrap_or("")
        ));
    }
    // The last file: up to its last mark not later than the time (all of it for everything).
    if let (false, Some((pf, pend))) = (finished, pending.take()) {
        if time_us == 0 {
            deliver(&pf, &dir.join(&pf), Cut::Whole)?;
            stop = Some((pf, pend));
        } else if let Some(p) = last_mark(&rebuilt, &pf) {
            let cut = if p >= pend { Cut::Whole } else { Cut::At(p) };
            deliver(&pf, &dir.join(&pf), cut)?;
            stop = Some((pf, p));
        }
    }
    if let (Some(why), false) = (&rebuilt.hole, finished) {
        // The target lies past a hole (everything, a time after the last mark before it).
        if time_us == 0 || time_us > rebuilt.last_mark() {
            return Err(format!("{why}; restore to a time before it"));
        }
    }
    Ok((rebuilt, stop))
}

/// Where to stop replaying `rebuilt` (started at `from`) for `Target::Time(t)`: the last mark
/// at or before `t` (None: nothing after `from` was written by then).
pub fn stop_at_time(
    rebuilt: &Rebuilt,
    from: (&str, u64),
    t: i64,
    order: &dyn Fn(&str) -> u64,
) -> Option<(String, u64)> {
    let key = |f: &str, p: u64| (order(f), p);
    let start = key(from.0, from.1);
    let mut stop = None;
    for (f, mt, p) in &rebuilt.marks {
        if key(f, *p) <= start {
            continue;
        }
        if *mt > t {
            break;
        }
        stop = Some((f.clone(), *p));
    }
    stop
}

/// The earliest file from which `segments` (file, start, end) hold every file up to the newest
/// one complete from its first byte, without a gap: where the archive of a source that took
/// over from another can be rebuilt from (older files, before a hole, are left out).
pub fn contiguous_from(
    segments: &[(String, u64, u64)],
    order: &dyn Fn(&str) -> u64,
) -> Option<String> {
    let mut files: std::collections::BTreeMap<u64, (String, Vec<(u64, u64)>)> = Default::default();
    for (f, s, e) in segments {
        files
            .entry(order(f))
            .or_insert_with(|| (f.clone(), vec![]))
            .1
            .push((*s, *e));
    }
    let mut earliest = None;
    let mut next_order: Option<u64> = None;
    for (o, (f, mut ranges)) in files.into_iter().rev() {
        if next_order.is_some_and(|n| n != o + 1) {
            break;
        }
        ranges.sort();
        let mut end = 0;
        for (s, e) in ranges {
            if s > end {
                break;
            }
            end = end.max(e);
        }
        // Complete from byte 0 up to its last stored byte: the pieces join.
        let last = segments
            .iter()
            .filter(|(g, _, _)| *g == f)
            .map(|x| x.2)
            .max()
            .unwrap_or(0);
        if end < last {
            break;
        }
        earliest = Some(f);
        next_order = Some(o);
    }
    earliest
}

/// How a datastore replays its archived change files on a restored, running server.
pub trait Replay: Send + Sync {
    /// The order of a change file's name (files follow each other by one).
    fn order(&self, file: &str) -> u64;
    /// Where a source's archive stops for the next source that took over at `position`: the
    /// boundary after the last transaction `position` covers (None: none is in the files).
    /// A failover's lost transactions, written past it, are not replayed.
    fn stop_covered_by(
        &self,
        rebuilt: &Rebuilt,
        dir: &Path,
        position: &str,
    ) -> Result<Option<(String, u64)>, String> {
        self.stop_at_position(rebuilt, dir, position)
    }
    /// Where to stop for a position target: the boundary after that transaction (None: not
    /// in the files).
    fn stop_at_position(
        &self,
        rebuilt: &Rebuilt,
        dir: &Path,
        position: &str,
    ) -> Result<Option<(String, u64)>, String>;
    /// Where the first transaction after `position` starts (None: the files hold none after
    /// it): where the archive of a source that took over at `position` is replayed from. An
    /// error when the files start after it (what came between is in no archive given).
    fn resume_after(
        &self,
        _rebuilt: &Rebuilt,
        _dir: &Path,
        _position: &str,
    ) -> Result<Option<(String, u64)>, String> {
        Err("a restore across a change of source is not available for this datastore yet; restore to a time before the change, or from a backup taken since".into())
    }
    /// The position of the last transaction in the files that ends at or before `upto` (all of
    /// them when None); None when there is none or the datastore does not name them.
    fn last_position(
        &self,
        _rebuilt: &Rebuilt,
        _dir: &Path,
        _upto: Option<&(String, u64)>,
    ) -> Result<Option<String>, String> {
        Ok(None)
    }
    /// Where the newest stream of `rebuilt` branched from the one before (None: it did not, or
    /// the datastore's files do not say): a replay of it holds at least that much.
    fn switch_point(&self, _rebuilt: &Rebuilt) -> Option<(String, u64)> {
        None
    }
    /// The size every closed change file has (None: they vary).
    fn file_size(&self) -> Option<u64> {
        None
    }
    /// Whether two change files are of one stream (files of different streams never follow
    /// each other: PostgreSQL's timelines).
    fn same_stream(&self, _a: &str, _b: &str) -> bool {
        true
    }
    /// Whether the server's own recovery can take the files as they are rebuilt ([`feed`]):
    /// fetching the archive overlaps with replaying it.
    fn feeds(&self) -> bool {
        false
    }
    /// Sets a restored data directory up (before its first start) to take the files as they
    /// are delivered; returns where they are delivered.
    fn prepare_feed(&self, _ctx: &BackupCtx) -> Result<std::path::PathBuf, BackupError> {
        Err(BackupError::Io(std::io::Error::other(
            "this datastore's replay is not fed",
        )))
    }
    /// Delivers a complete rebuilt file (moved from `path`), cut as decided.
    fn deliver(
        &self,
        _ctx: &BackupCtx,
        _to: &Path,
        _file: &str,
        _path: &Path,
        _cut: Cut,
    ) -> Result<(), BackupError> {
        Ok(())
    }
    /// Says nothing more comes (also after a failure: the server stops waiting).
    fn end_feed(&self, _to: &Path) {}
    /// Removes what the feed set up, once the server's recovery ended.
    fn cleanup_feed(&self, _ctx: &BackupCtx) {}
    /// Where a position target lies in the files from `from_file` on, when that is known
    /// without reading them (None: find it in the files).
    fn locate(&self, _from_file: &str, _position: &str) -> Result<Option<(String, u64)>, String> {
        Ok(None)
    }
    /// Whether the replay goes into the restored data directory before the server's first
    /// start (the server's own recovery replays it), rather than into the running server.
    fn before_start(&self) -> bool {
        false
    }
    /// Replays the files from `from` to `stop` (None: to their end) into the server.
    fn replay(
        &self,
        ctx: &BackupCtx,
        dir: &Path,
        rebuilt: &Rebuilt,
        from: (&str, u64),
        stop: Option<(String, u64)>,
    ) -> Result<(), BackupError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_keys_round_trip_and_refuse_others() {
        let k = segment_key("mysql-bin.000003", 4, 1200);
        assert_eq!(k, "archive/mysql-bin.000003/000000000004-000000001200");
        assert_eq!(
            parse_segment_key(&k),
            Some(("mysql-bin.000003".into(), 4, 1200))
        );
        assert_eq!(parse_segment_key("b1.json"), None);
        assert_eq!(parse_segment_key("archive/x/5-5"), None);
        assert_eq!(parse_segment_key("archive/a/b/1-2"), None);
    }

    fn order(f: &str) -> u64 {
        f.rsplit('.').next().unwrap().parse().unwrap()
    }

    fn seg(file: &str, start: u64, end: u64, marks: &[(i64, u64)]) -> Stored {
        let h = SegmentHeader {
            file: file.into(),
            start,
            end,
            marks: marks.to_vec(),
            ..Default::default()
        };
        Stored {
            file: file.into(),
            start,
            end,
            open: Box::new(move || {
                let r: Box<dyn Read + Send> =
                    Box::new(std::io::Cursor::new(vec![7u8; (end - start) as usize]));
                Ok((h, r))
            }),
        }
    }

    #[test]
    fn rebuild_refuses_holes_and_finds_the_stop() {
        let dir = tempfile::tempdir().unwrap();
        let ok = rebuild(
            dir.path(),
            "b.000002",
            vec![
                seg("b.000003", 0, 50, &[(300, 50)]),
                seg("b.000002", 100, 200, &[(150, 200)]),
                seg("b.000002", 0, 100, &[(100, 60), (120, 100)]),
                seg("b.000001", 0, 10, &[(1, 10)]),
            ],
            &order,
        )
        .unwrap();
        assert_eq!(
            ok.files,
            vec![("b.000002".into(), 200), ("b.000003".into(), 50)]
        );
        assert_eq!(
            std::fs::metadata(dir.path().join("b.000002"))
                .unwrap()
                .len(),
            200
        );
        let at = |t| stop_at_time(&ok, ("b.000002", 60), t, &order);
        assert_eq!(at(50), None);
        assert_eq!(at(120), Some(("b.000002".into(), 100)));
        assert_eq!(at(299), Some(("b.000002".into(), 200)));
        assert_eq!(at(1000), Some(("b.000003".into(), 50)));

        // A compacted file: its whole segment, and the pieces it covers are not read.
        let compacted = rebuild(
            dir.path(),
            "b.000002",
            vec![
                seg("b.000002", 0, 100, &[(100, 60)]),
                seg("b.000002", 0, 200, &[(100, 60), (150, 200)]),
                seg("b.000002", 100, 200, &[(150, 200)]),
            ],
            &order,
        )
        .unwrap();
        assert_eq!(compacted.files, vec![("b.000002".into(), 200)]);
        assert_eq!(compacted.marks.len(), 2);

        // A hole ends what is rebuilt, and says so.
        let hole = rebuild(
            dir.path(),
            "b.000002",
            vec![seg("b.000002", 0, 100, &[]), seg("b.000002", 120, 200, &[])],
            &order,
        )
        .unwrap();
        assert_eq!(hole.files, vec![("b.000002".into(), 100)]);
        assert!(hole.hole.unwrap().contains("bytes 100 to 120"));
        let missing_file = rebuild(
            dir.path(),
            "b.000002",
            vec![seg("b.000002", 0, 100, &[]), seg("b.000004", 0, 200, &[])],
            &order,
        )
        .unwrap();
        assert_eq!(missing_file.files, vec![("b.000002".into(), 100)]);
        assert!(missing_file
            .hole
            .unwrap()
            .contains("between b.000002 and b.000004"));
        let late = rebuild(
            dir.path(),
            "b.000002",
            vec![seg("b.000003", 0, 1, &[])],
            &order,
        );
        assert!(late.unwrap_err().contains("no copy of b.000002"));
        let mut lying = seg("b.000002", 0, 100, &[]);
        lying.end = 90;
        let lying = rebuild(dir.path(), "b.000002", vec![lying], &order);
        assert!(lying.unwrap_err().contains("refused"));
    }

    #[test]
    fn a_feed_delivers_each_file_once_the_next_one_says_where_the_time_stops() {
        let dir = tempfile::tempdir().unwrap();
        let segs = || {
            vec![
                seg("b.000001", 0, 100, &[(10, 50), (20, 100)]),
                seg("b.000002", 0, 100, &[(30, 40), (40, 100)]),
                seg("b.000003", 0, 100, &[(50, 60), (60, 100)]),
            ]
        };
        let run = |t: i64, position: Option<(String, u64)>| {
            let mut got = vec![];
            let (_, stop) = feed(
                dir.path(),
                ("b.000001", 10),
                segs(),
                &order,
                t,
                position,
                &mut |f, _, cut| {
                    got.push((
                        f.to_string(),
                        match cut {
                            Cut::Whole => None,
                            Cut::At(p) => Some(p),
                        },
                    ));
                    Ok(())
                },
            )
            .unwrap();
            (got, stop)
        };
        let s = |f: &str, p: Option<u64>| (f.to_string(), p);
        // Between two marks of the second file.
        let (got, stop) = run(35, None);
        assert_eq!(got, vec![s("b.000001", None), s("b.000002", Some(40))]);
        assert_eq!(stop, Some(("b.000002".into(), 40)));
        // Before the second file's first mark: the first file up to its last mark.
        let (got, _) = run(25, None);
        assert_eq!(got, vec![s("b.000001", Some(100))]);
        // After everything: all of it, the last file whole.
        let (got, _) = run(1000, None);
        assert_eq!(got.len(), 3);
        assert_eq!(got[2], s("b.000003", None));
        // Everything (no time), and a position.
        assert_eq!(run(0, None).0.len(), 3);
        let (got, stop) = run(0, Some(("b.000002".into(), 70)));
        assert_eq!(got, vec![s("b.000001", None), s("b.000002", Some(70))]);
        assert_eq!(stop, Some(("b.000002".into(), 70)));
        // Before anything after the backup: nothing.
        assert_eq!(run(5, None).0, vec![]);
    }

    #[test]
    fn a_taken_over_archive_is_rebuilt_from_its_contiguous_files() {
        let s = |f: &str, a: u64, b: u64| (f.to_string(), a, b);
        // b.000002 has a gap: the run that reaches the newest file starts at b.000003.
        let segs = vec![
            s("b.000001", 0, 10),
            s("b.000002", 0, 10),
            s("b.000002", 20, 30),
            s("b.000003", 0, 10),
            s("b.000003", 10, 25),
            s("b.000004", 0, 5),
        ];
        assert_eq!(contiguous_from(&segs, &order).as_deref(), Some("b.000003"));
        // A file missing breaks the run too.
        let segs = vec![s("b.000001", 0, 10), s("b.000003", 0, 10)];
        assert_eq!(contiguous_from(&segs, &order).as_deref(), Some("b.000003"));
        let segs = vec![s("b.000001", 0, 10), s("b.000002", 0, 10)];
        assert_eq!(contiguous_from(&segs, &order).as_deref(), Some("b.000001"));
        // The newest file stored from the middle only: nothing to rebuild from.
        assert_eq!(contiguous_from(&[s("b.000005", 4, 9)], &order), None);
        assert_eq!(contiguous_from(&[], &order), None);
    }

    #[test]
    fn a_paused_archive_resumes_as_a_new_period_from_where_it_stopped() {
        struct Grows(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl ChangeLog for Grows {
            fn files(&self) -> Result<Vec<String>, String> {
                Ok(vec!["b.000001".into()])
            }
            fn read_complete(&mut self, _: &str, from: u64, _: usize) -> Result<Chunk, String> {
                let all = self.0.lock().unwrap();
                let bytes = all[from as usize..].to_vec();
                Ok(Chunk {
                    boundaries: vec![(all.len() as u64, 0)],
                    first_position: format!("0-1-{}", from + 1),
                    last_position: format!("0-1-{}", all.len()),
                    bytes,
                })
            }
            fn is_change_file(&self, _: &Path) -> bool {
                true
            }
            fn path(&self, f: &str) -> std::path::PathBuf {
                f.into()
            }
        }
        let log = std::sync::Arc::new(std::sync::Mutex::new(vec![1u8; 4]));
        let mut a = Archiver::new(
            Box::new(Grows(log.clone())),
            Ledger::default(),
            Duration::from_secs(3600),
        );
        a.observe().unwrap();
        a.shipped();
        log.lock().unwrap().extend([2u8; 6]);
        a.observe().unwrap();
        // Read, not cut yet (the ship interval is long): the pause cuts it to be stored.
        assert!(a.next_ready().is_none());
        assert!(a.pause());
        assert!(!a.pause(), "said once");
        a.shipped();
        assert_eq!(a.ledger.pos, 10);
        assert_eq!(a.ledger.first_position, "0-1-1");
        assert_eq!(a.ledger.last_position, "0-1-10");
        let since = a.ledger.since_us;
        std::thread::sleep(Duration::from_millis(2));
        assert!(a.resume());
        assert!(a.ledger.since_us > since);
        assert_eq!(a.ledger.first_position, "");
        assert_eq!((a.ledger.file.as_str(), a.ledger.pos), ("b.000001", 10));
    }
}
