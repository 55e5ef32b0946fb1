//! The backup stream format (version 1): archive bytes → zstd → AES-256-GCM frames → storage,
//! streaming with bounded memory, sha256 over the stored bytes. The format is specified, with
//! test vectors, in `docs/backup-format.md`; this file is its only implementation.
//!
//! - [`SealWriter`] is a `Write`: feed it archive bytes, then `finish()`.
//! - [`open`] returns a `Read` of archive bytes that fails on any tampering, reordering or
//!   truncation (including a cut exactly at a frame boundary) and on a wrong or missing key.

use std::collections::HashMap;
use std::io::{self, Read, Write};

use openssl::sha::Sha256;
use openssl::symm::{decrypt_aead, encrypt_aead, Cipher};

pub const MAGIC: &[u8; 4] = b"CFBK";
pub const VERSION: u8 = 1;
const FLAG_ENCRYPTED: u8 = 1;
const FLAG_ZSTD: u8 = 2;
const FINAL_BIT: u32 = 1 << 31;
/// Default plaintext bytes per frame.
pub const DEFAULT_CHUNK: u32 = 1 << 20;

/// Why a stream cannot be read (messages name the backup where known, never a key).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("not a Coffer backup stream (bad magic)")]
    BadMagic,
    #[error("backup format version {0} is not supported by this agent")]
    UnsupportedVersion(u8),
    #[error("backup {backup} is encrypted with key '{key_id}', which is not in the keyring")]
    UnknownKey { backup: String, key_id: String },
    #[error("backup {backup}: the key '{key_id}' does not open its data key (wrong key?)")]
    WrongKey { backup: String, key_id: String },
    #[error(
        "backup {backup}: frame {index} failed authentication (tampered, reordered or corrupt)"
    )]
    Tampered { backup: String, index: u64 },
    #[error("backup {backup}: the stream is truncated (no final frame)")]
    Truncated { backup: String },
    #[error("backup {backup}: data after the final frame")]
    TrailingData { backup: String },
    #[error("backup is encrypted but no keyring was given")]
    NoKeyring,
    #[error("malformed header: {0}")]
    Header(String),
}

fn io_err(e: FormatError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Extracts a [`FormatError`] from an I/O error produced while reading, if it is one.
pub fn format_error(e: &io::Error) -> Option<&FormatError> {
    e.get_ref().and_then(|i| i.downcast_ref::<FormatError>())
}

/// Operator keys: the current one seals new backups; retired ones still open old backups.
#[derive(Clone, Default)]
pub struct Keyring {
    pub current: Option<String>,
    keys: HashMap<String, [u8; 32]>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("current", &self.current)
            .field("ids", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Keyring {
    pub fn add(&mut self, id: &str, key: [u8; 32]) {
        self.keys.insert(id.to_string(), key);
    }
    pub fn set_current(&mut self, id: &str) {
        self.current = Some(id.to_string());
    }
    pub fn get(&self, id: &str) -> Option<&[u8; 32]> {
        self.keys.get(id)
    }
    /// The ids of every key held.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }
    /// The key that seals new backups.
    pub fn current_key(&self) -> Option<(&str, &[u8; 32])> {
        let id = self.current.as_deref()?;
        Some((id, self.keys.get(id)?))
    }
}

/// How a stream is sealed.
#[derive(Debug, Clone)]
pub struct SealParams {
    pub backup_id: String,
    /// `None` = encryption explicitly off.
    pub key: Option<(String, [u8; 32])>,
    /// zstd level, `None` = no compression.
    pub zstd_level: Option<i32>,
    pub chunk_size: u32,
    /// Fixed data key and wrap nonce (test vectors only); random otherwise.
    pub fixed: Option<([u8; 32], [u8; 12])>,
}

struct Crypto {
    data_key: [u8; 32],
    header_hash: [u8; 32],
}

fn frame_nonce(index: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&index.to_be_bytes());
    n
}

fn frame_aad(header_hash: &[u8; 32], index: u64, last: bool) -> Vec<u8> {
    let mut a = Vec::with_capacity(41);
    a.extend_from_slice(header_hash);
    a.extend_from_slice(&index.to_be_bytes());
    a.push(last as u8);
    a
}

fn wrap_aad(backup_id: &str, key_id: &str) -> Vec<u8> {
    let mut a = b"CFBK1-key".to_vec();
    a.push(backup_id.len() as u8);
    a.extend_from_slice(backup_id.as_bytes());
    a.push(key_id.len() as u8);
    a.extend_from_slice(key_id.as_bytes());
    a
}

/// Counts and hashes what reaches storage.
struct Sink<W: Write> {
    inner: W,
    hash: Sha256,
    bytes: u64,
}

impl<W: Write> Sink<W> {
    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.inner.write_all(b)?;
        self.hash.update(b);
        self.bytes += b.len() as u64;
        Ok(())
    }
}

/// Encrypts, hashes and writes frames on its own thread, so compression (the caller's thread)
/// and encryption + hashing + storage run side by side. The channel is bounded: memory stays at
/// a few frames.
struct FrameWriter<W: Write + Send + 'static> {
    tx: Option<std::sync::mpsc::SyncSender<(Vec<u8>, u64, bool)>>,
    handle: Option<std::thread::JoinHandle<io::Result<Sink<W>>>>,
}

impl<W: Write + Send + 'static> FrameWriter<W> {
    fn start(mut sink: Sink<W>, crypto: Option<Crypto>) -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel::<(Vec<u8>, u64, bool)>(4);
        let handle = std::thread::Builder::new()
            .name("backup-seal".into())
            .spawn(move || -> io::Result<Sink<W>> {
                for (plain, index, last) in rx {
                    let mut len = plain.len() as u32;
                    if last {
                        len |= FINAL_BIT;
                    }
                    match &crypto {
                        Some(c) => {
                            let mut tag = [0u8; 16];
                            let ct = encrypt_aead(
                                Cipher::aes_256_gcm(),
                                &c.data_key,
                                Some(&frame_nonce(index)),
                                &frame_aad(&c.header_hash, index, last),
                                &plain,
                                &mut tag,
                            )
                            .map_err(io::Error::other)?;
                            sink.put(&len.to_be_bytes())?;
                            sink.put(&ct)?;
                            sink.put(&tag)?;
                        }
                        None => {
                            sink.put(&len.to_be_bytes())?;
                            sink.put(&plain)?;
                        }
                    }
                }
                Ok(sink)
            })
            .expect("spawning the backup-seal thread");
        FrameWriter {
            tx: Some(tx),
            handle: Some(handle),
        }
    }

    /// The writer thread's own error, once it has stopped.
    fn failure(&mut self) -> io::Error {
        self.tx = None;
        match self.handle.take().map(|h| h.join()) {
            Some(Ok(Err(e))) => e,
            Some(Err(_)) => io::Error::other("the backup-seal thread panicked"),
            _ => io::Error::other("the backup-seal thread stopped"),
        }
    }

    fn send(&mut self, plain: Vec<u8>, index: u64, last: bool) -> io::Result<()> {
        let sent = match &self.tx {
            Some(tx) => tx.send((plain, index, last)).is_ok(),
            None => false,
        };
        if sent {
            Ok(())
        } else {
            Err(self.failure())
        }
    }

    fn finish(mut self) -> io::Result<Sink<W>> {
        self.tx = None;
        match self.handle.take().map(|h| h.join()) {
            Some(Ok(r)) => r,
            _ => Err(io::Error::other("the backup-seal thread panicked")),
        }
    }
}

/// Cuts the (compressed) stream into frames for the frame writer.
struct Framer<W: Write + Send + 'static> {
    out: FrameWriter<W>,
    buf: Vec<u8>,
    chunk: usize,
    index: u64,
}

impl<W: Write + Send + 'static> Framer<W> {
    fn emit(&mut self, last: bool) -> io::Result<()> {
        let take = self.buf.len().min(self.chunk);
        let plain: Vec<u8> = self.buf.drain(..take).collect();
        self.out.send(plain, self.index, last)?;
        self.index += 1;
        Ok(())
    }
}

impl<W: Write + Send + 'static> Write for Framer<W> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(b);
        while self.buf.len() > self.chunk {
            self.emit(false)?;
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

enum Stage<W: Write + Send + 'static> {
    Zstd(zstd::stream::write::Encoder<'static, Framer<W>>),
    Plain(Framer<W>),
}

/// What a finished stream looked like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    /// Bytes stored (header and frames).
    pub stored_bytes: u64,
    /// sha256 of the stored bytes, hex.
    pub sha256: String,
    /// Archive bytes fed in.
    pub archive_bytes: u64,
    pub frames: u64,
}

/// A `Write` that seals archive bytes into `inner`.
pub struct SealWriter<W: Write + Send + 'static> {
    stage: Stage<W>,
    archive_bytes: u64,
}

impl<W: Write + Send + 'static> SealWriter<W> {
    pub fn new(inner: W, p: &SealParams) -> io::Result<Self> {
        if p.backup_id.is_empty() || p.backup_id.len() > 255 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "backup id must be 1-255 bytes",
            ));
        }
        let mut header = Vec::with_capacity(128);
        header.extend_from_slice(MAGIC);
        header.push(VERSION);
        let mut flags = 0;
        if p.key.is_some() {
            flags |= FLAG_ENCRYPTED;
        }
        if p.zstd_level.is_some() {
            flags |= FLAG_ZSTD;
        }
        header.push(flags);
        header.extend_from_slice(&p.chunk_size.to_be_bytes());
        header.push(p.backup_id.len() as u8);
        header.extend_from_slice(p.backup_id.as_bytes());
        let mut data_key = [0u8; 32];
        if let Some((key_id, kek)) = &p.key {
            if key_id.is_empty() || key_id.len() > 255 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "key id must be 1-255 bytes",
                ));
            }
            let mut wrap_nonce = [0u8; 12];
            match p.fixed {
                Some((dk, wn)) => {
                    data_key = dk;
                    wrap_nonce = wn;
                }
                None => {
                    openssl::rand::rand_bytes(&mut data_key).map_err(io::Error::other)?;
                    openssl::rand::rand_bytes(&mut wrap_nonce).map_err(io::Error::other)?;
                }
            }
            let mut tag = [0u8; 16];
            let wrapped = encrypt_aead(
                Cipher::aes_256_gcm(),
                kek,
                Some(&wrap_nonce),
                &wrap_aad(&p.backup_id, key_id),
                &data_key,
                &mut tag,
            )
            .map_err(io::Error::other)?;
            header.push(key_id.len() as u8);
            header.extend_from_slice(key_id.as_bytes());
            header.extend_from_slice(&wrap_nonce);
            header.extend_from_slice(&wrapped);
            header.extend_from_slice(&tag);
        }
        let header_hash = openssl::sha::sha256(&header);
        let mut sink = Sink {
            inner,
            hash: Sha256::new(),
            bytes: 0,
        };
        sink.put(&header)?;
        let crypto = p.key.as_ref().map(|_| Crypto {
            data_key,
            header_hash,
        });
        let framer = Framer {
            out: FrameWriter::start(sink, crypto),
            buf: Vec::with_capacity(p.chunk_size as usize + 64 * 1024),
            chunk: p.chunk_size.max(1) as usize,
            index: 0,
        };
        let stage = match p.zstd_level {
            Some(level) => {
                let mut e = zstd::stream::write::Encoder::new(framer, level)?;
                // One compression worker, as `zstd -T1` has: the caller's thread goes back to
                // reading the archive while a job compresses, so the tool never waits on us.
                e.multithread(1)?;
                Stage::Zstd(e)
            }
            None => Stage::Plain(framer),
        };
        Ok(SealWriter {
            stage,
            archive_bytes: 0,
        })
    }

    /// Archive bytes written so far.
    pub fn archive_bytes(&self) -> u64 {
        self.archive_bytes
    }

    /// Writes the final frame and returns the totals; the inner writer is returned unflushed.
    pub fn finish(self) -> io::Result<(W, Sealed)> {
        let mut framer = match self.stage {
            Stage::Zstd(e) => e.finish()?,
            Stage::Plain(f) => f,
        };
        while framer.buf.len() > framer.chunk {
            framer.emit(false)?;
        }
        framer.emit(true)?;
        let frames = framer.index;
        let sink = framer.out.finish()?;
        let sha = sink.hash.finish();
        let sealed = Sealed {
            stored_bytes: sink.bytes,
            sha256: sha.iter().map(|b| format!("{b:02x}")).collect(),
            archive_bytes: self.archive_bytes,
            frames,
        };
        Ok((sink.inner, sealed))
    }
}

impl<W: Write + Send + 'static> Write for SealWriter<W> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let n = match &mut self.stage {
            Stage::Zstd(e) => e.write(b)?,
            Stage::Plain(f) => f.write(b)?,
        };
        self.archive_bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Header facts of a stored stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderInfo {
    pub backup_id: String,
    pub key_id: Option<String>,
    pub compressed: bool,
    pub chunk_size: u32,
}

fn read_exact_or<R: Read>(r: &mut R, buf: &mut [u8], what: &str) -> io::Result<()> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            io_err(FormatError::Header(format!(
                "stream ends inside the {what}"
            )))
        } else {
            e
        }
    })
}

/// Reads frames and yields authenticated plaintext.
struct Deframer<R: Read> {
    inner: R,
    crypto: Option<Crypto>,
    backup: String,
    chunk: u32,
    index: u64,
    out: Vec<u8>,
    pos: usize,
    done: bool,
}

impl<R: Read> Deframer<R> {
    fn next_frame(&mut self) -> io::Result<()> {
        let mut len_b = [0u8; 4];
        // EOF before a length = truncated at a frame boundary.
        let mut got = 0;
        while got < 4 {
            let n = self.inner.read(&mut len_b[got..])?;
            if n == 0 {
                return Err(io_err(FormatError::Truncated {
                    backup: self.backup.clone(),
                }));
            }
            got += n;
        }
        let raw = u32::from_be_bytes(len_b);
        let last = raw & FINAL_BIT != 0;
        let len = raw & !FINAL_BIT;
        if len > self.chunk {
            return Err(io_err(FormatError::Tampered {
                backup: self.backup.clone(),
                index: self.index,
            }));
        }
        // Grown with the bytes that really arrive, never sized by the length field alone: a
        // forged length costs the reader only what the stream actually holds.
        let mut payload = Vec::with_capacity((len as usize).min(1 << 20));
        (&mut self.inner)
            .take(u64::from(len))
            .read_to_end(&mut payload)?;
        if payload.len() < len as usize {
            return Err(io_err(FormatError::Truncated {
                backup: self.backup.clone(),
            }));
        }
        self.out = match &self.crypto {
            Some(c) => {
                let mut tag = [0u8; 16];
                self.inner.read_exact(&mut tag).map_err(|e| {
                    if e.kind() == io::ErrorKind::UnexpectedEof {
                        io_err(FormatError::Truncated {
                            backup: self.backup.clone(),
                        })
                    } else {
                        e
                    }
                })?;
                decrypt_aead(
                    Cipher::aes_256_gcm(),
                    &c.data_key,
                    Some(&frame_nonce(self.index)),
                    &frame_aad(&c.header_hash, self.index, last),
                    &payload,
                    &tag,
                )
                .map_err(|_| {
                    io_err(FormatError::Tampered {
                        backup: self.backup.clone(),
                        index: self.index,
                    })
                })?
            }
            None => payload,
        };
        self.pos = 0;
        self.index += 1;
        if last {
            self.done = true;
            let mut extra = [0u8; 1];
            if self.inner.read(&mut extra)? != 0 {
                return Err(io_err(FormatError::TrailingData {
                    backup: self.backup.clone(),
                }));
            }
        }
        Ok(())
    }
}

impl<R: Read> Read for Deframer<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.pos < self.out.len() {
                let n = (self.out.len() - self.pos).min(buf.len());
                buf[..n].copy_from_slice(&self.out[self.pos..self.pos + n]);
                self.pos += n;
                return Ok(n);
            }
            if self.done {
                return Ok(0);
            }
            self.next_frame()?;
        }
    }
}

/// Reads and checks the header; unwraps the data key with the keyring.
fn read_header<R: Read>(
    r: &mut R,
    keyring: Option<&Keyring>,
) -> io::Result<(HeaderInfo, Option<Crypto>)> {
    let mut fixed = [0u8; 11];
    read_exact_or(r, &mut fixed, "header")?;
    if &fixed[..4] != MAGIC {
        return Err(io_err(FormatError::BadMagic));
    }
    if fixed[4] != VERSION {
        return Err(io_err(FormatError::UnsupportedVersion(fixed[4])));
    }
    let flags = fixed[5];
    let chunk = u32::from_be_bytes([fixed[6], fixed[7], fixed[8], fixed[9]]);
    if chunk == 0 || chunk > (1 << 30) {
        return Err(io_err(FormatError::Header(format!("chunk size {chunk}"))));
    }
    let mut header = fixed.to_vec();
    let mut id = vec![0u8; fixed[10] as usize];
    read_exact_or(r, &mut id, "backup id")?;
    header.extend_from_slice(&id);
    let backup = String::from_utf8(id)
        .map_err(|_| io_err(FormatError::Header("backup id is not UTF-8".into())))?;
    let mut key_id = None;
    let mut crypto = None;
    if flags & FLAG_ENCRYPTED != 0 {
        let mut l = [0u8; 1];
        read_exact_or(r, &mut l, "key id")?;
        let mut kid = vec![0u8; l[0] as usize];
        read_exact_or(r, &mut kid, "key id")?;
        let mut wrap = [0u8; 12 + 32 + 16];
        read_exact_or(r, &mut wrap, "wrapped key")?;
        header.push(l[0]);
        header.extend_from_slice(&kid);
        header.extend_from_slice(&wrap);
        let kid = String::from_utf8(kid)
            .map_err(|_| io_err(FormatError::Header("key id is not UTF-8".into())))?;
        let ring = keyring.ok_or_else(|| io_err(FormatError::NoKeyring))?;
        let kek = ring.get(&kid).ok_or_else(|| {
            io_err(FormatError::UnknownKey {
                backup: backup.clone(),
                key_id: kid.clone(),
            })
        })?;
        let dk = decrypt_aead(
            Cipher::aes_256_gcm(),
            kek,
            Some(&wrap[..12]),
            &wrap_aad(&backup, &kid),
            &wrap[12..44],
            &wrap[44..],
        )
        .map_err(|_| {
            io_err(FormatError::WrongKey {
                backup: backup.clone(),
                key_id: kid.clone(),
            })
        })?;
        let mut data_key = [0u8; 32];
        data_key.copy_from_slice(&dk);
        crypto = Some(Crypto {
            data_key,
            header_hash: openssl::sha::sha256(&header),
        });
        key_id = Some(kid);
    }
    let info = HeaderInfo {
        backup_id: backup.clone(),
        key_id,
        compressed: flags & FLAG_ZSTD != 0,
        chunk_size: chunk,
    };
    Ok((info, crypto))
}

/// Opens a stored stream: returns its header facts and a reader of the archive bytes.
pub fn open<'a, R: Read + 'a>(
    mut r: R,
    keyring: Option<&Keyring>,
) -> io::Result<(HeaderInfo, Box<dyn Read + 'a>)> {
    let (info, crypto) = read_header(&mut r, keyring)?;
    let backup = info.backup_id.clone();
    let chunk = info.chunk_size;
    let deframer = Deframer {
        inner: r,
        crypto,
        backup,
        chunk,
        index: 0,
        out: vec![],
        pos: 0,
        done: false,
    };
    let reader: Box<dyn Read + 'a> = if info.compressed {
        Box::new(zstd::stream::read::Decoder::new(deframer)?)
    } else {
        Box::new(deframer)
    };
    Ok((info, reader))
}

/// Hashes everything read through it.
struct HashingReader<R: Read> {
    inner: R,
    hash: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(b)?;
        self.hash.update(&b[..n]);
        Ok(n)
    }
}

/// Yields what the prefetch thread sends.
struct ChannelReader {
    rx: std::sync::mpsc::Receiver<io::Result<Vec<u8>>>,
    cur: Vec<u8>,
    pos: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.pos < self.cur.len() {
                let n = (self.cur.len() - self.pos).min(b.len());
                b[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
                self.pos += n;
                return Ok(n);
            }
            match self.rx.recv() {
                Ok(Ok(v)) => {
                    self.cur = v;
                    self.pos = 0;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(0),
            }
        }
    }
}

/// Like [`open`], but reading, authenticating, decrypting and hashing run on their own thread
/// (a bounded channel of 4 frames) beside decompression, and the stored bytes' SHA-256 is
/// checked against `expected_sha256` at the end of the stream.
pub fn open_prefetched<R: Read + Send + 'static>(
    r: R,
    keyring: Option<&Keyring>,
    expected_sha256: Option<String>,
) -> io::Result<(HeaderInfo, Box<dyn Read + Send>)> {
    let mut hashing = HashingReader {
        inner: r,
        hash: Sha256::new(),
    };
    let (info, crypto) = read_header(&mut hashing, keyring)?;
    let mut deframer = Deframer {
        inner: hashing,
        crypto,
        backup: info.backup_id.clone(),
        chunk: info.chunk_size,
        index: 0,
        out: vec![],
        pos: 0,
        done: false,
    };
    let (tx, rx) = std::sync::mpsc::sync_channel::<io::Result<Vec<u8>>>(4);
    let backup = info.backup_id.clone();
    std::thread::Builder::new()
        .name("backup-open".into())
        .spawn(move || {
            loop {
                if let Err(e) = deframer.next_frame() {
                    let _ = tx.send(Err(e));
                    return;
                }
                let frame = std::mem::take(&mut deframer.out);
                if tx.send(Ok(frame)).is_err() {
                    return;
                }
                if deframer.done {
                    break;
                }
            }
            if let Some(want) = expected_sha256 {
                let got: String = deframer
                    .inner
                    .hash
                    .finish()
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                if got != want {
                    let _ = tx.send(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "backup {backup}: checksum mismatch (stored {got}, manifest {want})"
                        ),
                    )));
                }
            }
        })?;
    let plain = ChannelReader {
        rx,
        cur: vec![],
        pos: 0,
    };
    let reader: Box<dyn Read + Send> = if info.compressed {
        Box::new(zstd::stream::read::Decoder::new(plain)?)
    } else {
        Box::new(plain)
    };
    Ok((info, reader))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vector_params() -> SealParams {
        SealParams {
            backup_id: "b1".into(),
            key: Some(("k1".into(), [1u8; 32])),
            zstd_level: None,
            chunk_size: 16,
            fixed: Some(([2u8; 32], [3u8; 12])),
        }
    }

    fn seal(p: &SealParams, data: &[u8]) -> (Vec<u8>, Sealed) {
        let mut w = SealWriter::new(Vec::new(), p).unwrap();
        w.write_all(data).unwrap();
        let (out, s) = w.finish().unwrap();
        (out, s)
    }

    fn ring() -> Keyring {
        let mut k = Keyring::default();
        k.add("k1", [1u8; 32]);
        k.set_current("k1");
        k
    }

    fn read_all(stored: &[u8], ring: Option<&Keyring>) -> Result<Vec<u8>, FormatError> {
        let mut out = vec![];
        let r = open(stored, ring).and_then(|(_, mut r)| r.read_to_end(&mut out));
        match r {
            Ok(_) => Ok(out),
            Err(e) => Err(format_error(&e)
                .cloned()
                .unwrap_or(FormatError::Header(e.to_string()))),
        }
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    /// The test vector of docs/backup-format.md: 48 bytes of plaintext in 16-byte frames.
    const VECTOR_PLAIN: &[u8] = b"coffer backup format v1 test vector: 3 frames!!!";

    #[test]
    fn test_vector_is_stable() {
        let (stored, s) = seal(&vector_params(), VECTOR_PLAIN);
        // Header: magic, version, flags (encrypted), chunk 16, id "b1", key id "k1", wrap.
        assert_eq!(hex(&stored), VECTOR_HEX);
        assert_eq!(&stored[..4], b"CFBK");
        assert_eq!(s.frames, 3, "three full frames, the last one final");
        assert_eq!(
            s.sha256, VECTOR_SHA256,
            "the format changed: update docs/backup-format.md and the version"
        );
        assert_eq!(read_all(&stored, Some(&ring())).unwrap(), VECTOR_PLAIN);
    }

    const VECTOR_HEX: &str = "4346424b010100000010026231026b31030303030303030303030303fa631698fd86356baffee465ce1b26aaba31a34f85cdc0b0ae12bf44a8488471c0976869c6284751b911a61f51c4fe5500000010391d5ca8805e7ec24af1c8d610e0f3faaf3993589c88ee1a47eb1697a7adfe73000000103e31e9359c97a82974305bb08c60d235bdaab5a303a235e977ebafb22fdc815d800000108124416e29c3d183a3d6ddad233bb04641fdad47172f01737e279fa01deb837e";
    const VECTOR_SHA256: &str = "944aa0d23a11ea72d566ea69194dd61a4261154575cc449a837897f5d7bb8cab";

    #[test]
    fn tampering_reordering_and_truncation_are_detected() {
        let (stored, _) = seal(&vector_params(), VECTOR_PLAIN);
        let header_len = 4 + 1 + 1 + 4 + 1 + 2 + 1 + 2 + 12 + 32 + 16;
        let frame = 4 + 16 + 16;
        assert_eq!(stored.len(), header_len + 3 * frame);
        // Flip a byte in the second frame's ciphertext.
        let mut bad = stored.clone();
        bad[header_len + frame + 6] ^= 0x40;
        assert_eq!(
            read_all(&bad, Some(&ring())),
            Err(FormatError::Tampered {
                backup: "b1".into(),
                index: 1
            })
        );
        // Swap the two full frames.
        let mut swapped = stored[..header_len].to_vec();
        swapped.extend_from_slice(&stored[header_len + frame..header_len + 2 * frame]);
        swapped.extend_from_slice(&stored[header_len..header_len + frame]);
        swapped.extend_from_slice(&stored[header_len + 2 * frame..]);
        assert!(matches!(
            read_all(&swapped, Some(&ring())),
            Err(FormatError::Tampered { index: 0, .. })
        ));
        // Cut exactly at a frame boundary (drop the final frame).
        let cut = &stored[..header_len + 2 * frame];
        assert_eq!(
            read_all(cut, Some(&ring())),
            Err(FormatError::Truncated {
                backup: "b1".into()
            })
        );
        // Cut inside a frame.
        assert_eq!(
            read_all(&stored[..stored.len() - 3], Some(&ring())),
            Err(FormatError::Truncated {
                backup: "b1".into()
            })
        );
        // Mark a middle frame final (drop what follows): its tag no longer matches.
        let mut fake_final = stored[..header_len + frame].to_vec();
        fake_final[header_len] |= 0x80;
        assert!(matches!(
            read_all(&fake_final, Some(&ring())),
            Err(FormatError::Tampered { index: 0, .. })
        ));
        // Trailing garbage.
        let mut trailing = stored.clone();
        trailing.push(0);
        assert_eq!(
            read_all(&trailing, Some(&ring())),
            Err(FormatError::TrailingData {
                backup: "b1".into()
            })
        );
        // A changed header (chunk size) breaks every frame.
        let mut hdr = stored.clone();
        hdr[9] = 17;
        assert!(read_all(&hdr, Some(&ring())).is_err());
    }

    #[test]
    fn prefetched_open_reads_the_same_and_checks_the_checksum() {
        let (stored, sealed) = seal(&vector_params(), VECTOR_PLAIN);
        let read = |bytes: Vec<u8>, sha: Option<String>| -> Result<Vec<u8>, String> {
            let mut out = vec![];
            open_prefetched(std::io::Cursor::new(bytes), Some(&ring()), sha)
                .and_then(|(_, mut r)| r.read_to_end(&mut out))
                .map(|_| out)
                .map_err(|e| e.to_string())
        };
        assert_eq!(
            read(stored.clone(), Some(sealed.sha256.clone())).unwrap(),
            VECTOR_PLAIN
        );
        let err = read(stored.clone(), Some("00".repeat(32))).unwrap_err();
        assert!(err.contains("checksum mismatch"), "{err}");
        let mut bad = stored.clone();
        let n = bad.len();
        bad[n - 20] ^= 1;
        assert!(read(bad, None)
            .unwrap_err()
            .contains("failed authentication"));
        assert!(read(stored[..stored.len() - 36].to_vec(), None)
            .unwrap_err()
            .contains("truncated"));
    }

    #[test]
    fn keys_must_match_and_rotation_keeps_old_backups_readable() {
        let (stored, _) = seal(&vector_params(), VECTOR_PLAIN);
        assert_eq!(read_all(&stored, None), Err(FormatError::NoKeyring));
        let mut other = Keyring::default();
        other.add("k2", [9u8; 32]);
        assert_eq!(
            read_all(&stored, Some(&other)),
            Err(FormatError::UnknownKey {
                backup: "b1".into(),
                key_id: "k1".into()
            })
        );
        let mut wrong = Keyring::default();
        wrong.add("k1", [9u8; 32]);
        assert_eq!(
            read_all(&stored, Some(&wrong)),
            Err(FormatError::WrongKey {
                backup: "b1".into(),
                key_id: "k1".into()
            })
        );
        // Rotation: k2 is current, k1 retired but kept.
        let mut rotated = ring();
        rotated.add("k2", [5u8; 32]);
        rotated.set_current("k2");
        assert_eq!(read_all(&stored, Some(&rotated)).unwrap(), VECTOR_PLAIN);
        let (id, _) = rotated.current_key().unwrap();
        assert_eq!(id, "k2");
    }

    #[test]
    fn large_compressed_streams_round_trip_with_random_keys() {
        let mut data = Vec::with_capacity(3 << 20);
        let mut x: u32 = 7;
        for i in 0..(3 << 20) {
            x = x.wrapping_mul(1103515245).wrapping_add(12345);
            data.push(if i % 7 == 0 {
                (x >> 24) as u8
            } else {
                b'a' + (i % 13) as u8
            });
        }
        let p = SealParams {
            backup_id: "big".into(),
            key: Some(("k1".into(), [1u8; 32])),
            zstd_level: Some(1),
            chunk_size: 64 * 1024,
            fixed: None,
        };
        let (stored, s) = seal(&p, &data);
        assert!(
            s.stored_bytes < data.len() as u64 / 2,
            "compressed: {}",
            s.stored_bytes
        );
        assert_eq!(s.archive_bytes, data.len() as u64);
        assert_eq!(s.sha256, hex(&openssl::sha::sha256(&stored)));
        assert_eq!(read_all(&stored, Some(&ring())).unwrap(), data);
        // Two seals of the same data differ (random data key).
        let (again, _) = seal(&p, &data);
        assert_ne!(again, stored);
        // Unencrypted (explicitly off) still detects truncation.
        let plain = SealParams { key: None, ..p };
        let (stored, _) = seal(&plain, &data);
        assert_eq!(read_all(&stored, None).unwrap(), data);
        let last_len = 4;
        assert!(read_all(&stored[..stored.len() - last_len], None).is_err());
    }

    // Property tests: whatever storage hands the reader, it answers with data or an error,
    // never a panic, and never allocates beyond what the input holds. `PROPTEST_CASES` sets
    // the number of cases (`cargo xtask test --slow` runs many more).
    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        fn small_params(id: &str) -> SealParams {
            SealParams {
                backup_id: id.into(),
                key: Some(("k1".into(), [1u8; 32])),
                zstd_level: Some(1),
                chunk_size: 64,
                fixed: None,
            }
        }

        /// A header that passes the fixed checks, so the fuzzer reaches frames.
        fn plausible(tail: &[u8], chunk: u32, encrypted: bool) -> Vec<u8> {
            let mut v = MAGIC.to_vec();
            v.push(VERSION);
            v.push(if encrypted { FLAG_ENCRYPTED } else { 0 });
            v.extend_from_slice(&chunk.to_be_bytes());
            v.extend_from_slice(tail);
            v
        }

        proptest! {
            #[test]
            fn arbitrary_streams_are_refused_cleanly(
                bytes in proptest::collection::vec(any::<u8>(), 0..2048),
                chunk in prop_oneof![Just(1u32 << 30), 1u32..100_000],
                encrypted in any::<bool>(),
                framed in any::<bool>(),
            ) {
                let input = if framed { plausible(&bytes, chunk, encrypted) } else { bytes };
                let _ = read_all(&input, Some(&ring()));
                let _ = read_all(&input, None);
            }

            #[test]
            fn a_changed_stream_never_reads_as_data(
                data in proptest::collection::vec(any::<u8>(), 1..600),
                at in any::<prop::sample::Index>(),
                how in 0u8..3,
                byte in any::<u8>(),
            ) {
                let (stored, _) = seal(&small_params("b1"), &data);
                let i = at.index(stored.len());
                let mut changed = stored.clone();
                match how {
                    0 => changed[i] ^= byte | 1,
                    1 => changed.truncate(i),
                    _ => changed.insert(i, byte),
                }
                prop_assert!(read_all(&changed, Some(&ring())).is_err());
                prop_assert_eq!(read_all(&stored, Some(&ring())).unwrap(), data);
            }

            #[test]
            fn forged_frame_lengths_are_refused_as_truncated(
                len in 1u32..(1 << 30),
                present in proptest::collection::vec(any::<u8>(), 0..256),
            ) {
                // An unencrypted stream whose first frame claims up to 1 GiB: the reader must
                // fail on truncation having held no more than the bytes that were there.
                let mut v = plausible(&[2, b'b', b'1'], 1 << 30, false);
                v.extend_from_slice(&len.to_be_bytes());
                v.extend_from_slice(&present);
                let r = read_all(&v, None);
                if (present.len() as u32) < len {
                    prop_assert!(r.is_err());
                }
            }
        }
    }
}
