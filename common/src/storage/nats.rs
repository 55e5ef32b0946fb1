//! NATS JetStream storage, for agents on other hosts and VMs, scoped per instance by the server.
//!
//! Layout: one stream per owner (instance), `CFS_<bucket>_<owner>` on `cfs.<bucket>.<owner>.>`.
//! An object `key` is
//! - chunks on `cfs.<bucket>.<owner>.<k>.<attempt>.<n>` (`k` the key in base64url, `attempt` a
//!   random token per writer, `n` from 0), then
//! - its commit record on `cfs.<bucket>.<owner>.<k>.m` (JSON: attempt, chunks, size, SHA-256).
//!
//! The stream keeps one message per subject and refuses a second (`discard_new_per_subject`),
//! so a committed object can never be replaced, not even by its own instance's agent. An agent's
//! NATS user may publish on its own stream's subjects and read them by subject with direct gets
//! (`$JS.API.DIRECT.GET.<its stream>.>`); it cannot list, purge, delete or create consumers, nor
//! touch another instance's stream. Reading another instance's backup (a restore, a replica's
//! seed) takes a grant from the controller: short-lived credentials that may direct-get exactly
//! that chain's subjects. The controller creates the streams, deletes objects (a purge of the
//! key's subjects) and removes what a failed writer left.
//!
//! The trait is synchronous (strategies run on blocking threads); every call here blocks on the
//! runtime handle captured when the backend was built.

use std::collections::VecDeque;
use std::future::IntoFuture;
use std::io::{self, Read, Write};

use async_nats::jetstream::context::{PublishAckFuture, PublishError, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage as Publish;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::runtime::Handle;

use super::{check_key, Access, ObjectWriter, Storage, StorageError};

/// Chunk size: well under the 1 MiB payload an agent may publish.
const CHUNK: usize = 512 * 1024;
/// Chunks in flight (published and not yet acknowledged, or requested and not yet read).
const WINDOW: usize = 16;
/// How long a publish is tried again while JetStream is briefly unavailable (a cluster electing
/// a stream's new leader, the client moving to another server).
const RETRY_FOR: std::time::Duration = std::time::Duration::from_secs(30);

pub struct NatsStorage {
    js: async_nats::jetstream::Context,
    bucket: String,
    owner: String,
    access: Access,
    rt: Handle,
}

/// An object's commit record.
#[derive(Debug, Serialize, Deserialize)]
struct Commit {
    attempt: String,
    chunks: u64,
    size: u64,
    sha256: String,
}

fn nats_err(what: &str, e: impl std::fmt::Display) -> StorageError {
    let msg = e.to_string();
    let kind = if msg.contains("maximum bytes") || msg.contains("insufficient resources") {
        io::ErrorKind::StorageFull
    } else {
        io::ErrorKind::Other
    };
    StorageError::Io {
        path: what.to_string(),
        source: io::Error::new(kind, msg),
    }
}

/// The stream holding `owner`'s objects.
pub fn stream_name(bucket: &str, owner: &str) -> String {
    format!("CFS_{bucket}_{owner}")
}

/// The subjects of `owner`'s objects (`cfs.<bucket>.<owner>`, without the trailing `.>`).
pub fn subject_root(bucket: &str, owner: &str) -> String {
    format!("cfs.{bucket}.{owner}")
}

/// The token(s) naming a key in its subjects: the key in base64url; an archived segment's
/// (`archive/...`) under a token `a` of its own (base64 never gives one character), so one
/// permission (`<root>.a.>`) grants a whole archive however many segments it has.
fn key_token(key: &str) -> String {
    match key.strip_prefix(crate::archive::PREFIX) {
        Some(rest) => format!(
            "{ARCHIVE_TOKEN}.{}",
            data_encoding::BASE64URL_NOPAD.encode(rest.as_bytes())
        ),
        None => data_encoding::BASE64URL_NOPAD.encode(key.as_bytes()),
    }
}

const ARCHIVE_TOKEN: &str = "a";

/// The key a commit record's subject (`<root>.<token(s)>.m`) names.
fn key_of_commit_subject(root: &str, subject: &str) -> Option<String> {
    let toks = subject
        .strip_prefix(root)?
        .strip_prefix('.')?
        .strip_suffix(".m")?;
    let decode = |t: &str| {
        let b = data_encoding::BASE64URL_NOPAD.decode(t.as_bytes()).ok()?;
        String::from_utf8(b).ok()
    };
    match toks.split_once('.') {
        Some((ARCHIVE_TOKEN, rest)) if !rest.contains('.') => {
            Some(format!("{}{}", crate::archive::PREFIX, decode(rest)?))
        }
        Some(_) => None,
        None => decode(toks),
    }
}

/// The subjects of one object (`<root>.<k>`, without `.>` or `.m`).
pub fn object_subject(bucket: &str, owner: &str, key: &str) -> String {
    format!("{}.{}", subject_root(bucket, owner), key_token(key))
}

/// The direct-get API subjects (a permission pattern) through which every archived segment of
/// `owner` is read: a point-in-time restore's grant to its source's archive.
pub fn archive_read_permission(bucket: &str, owner: &str) -> String {
    format!(
        "$JS.API.DIRECT.GET.{}.{}.{ARCHIVE_TOKEN}.>",
        stream_name(bucket, owner),
        subject_root(bucket, owner)
    )
}

/// The direct-get API subjects (a permission pattern) through which one object is read.
pub fn object_read_permission(bucket: &str, owner: &str, key: &str) -> String {
    format!(
        "$JS.API.DIRECT.GET.{}.{}.>",
        stream_name(bucket, owner),
        object_subject(bucket, owner, key)
    )
}

/// What one instance's agent may publish for its own objects (its stream's subjects and their
/// direct gets), for the agent's NATS user.
pub fn agent_publish_permissions(bucket: &str, owner: &str) -> Vec<String> {
    vec![
        format!("{}.>", subject_root(bucket, owner)),
        format!("$JS.API.DIRECT.GET.{}.>", stream_name(bucket, owner)),
    ]
}

/// Creates `owner`'s stream when missing (the controller, at placement and at start).
pub async fn ensure_stream(
    client: async_nats::Client,
    bucket: &str,
    owner: &str,
    max_bytes: Option<i64>,
    replicas: usize,
) -> Result<(), String> {
    if !super::valid_owner(owner) {
        return Err(format!("'{owner}' cannot own stored objects"));
    }
    use async_nats::jetstream::stream::{Config, DiscardPolicy, StorageType};
    let js = async_nats::jetstream::new(client);
    let name = stream_name(bucket, owner);
    let cfg = Config {
        name: name.clone(),
        description: Some(format!("Coffer objects of instance {owner}")),
        subjects: vec![format!("{}.>", subject_root(bucket, owner))],
        max_bytes: max_bytes.unwrap_or(-1),
        max_messages_per_subject: 1,
        discard: DiscardPolicy::New,
        discard_new_per_subject: true,
        allow_direct: true,
        deny_delete: true,
        storage: StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    };
    let existing = match js.get_stream_no_info(&name).await {
        Ok(s) => s.get_info().await.ok(),
        Err(_) => None,
    };
    match existing {
        Some(info) => {
            // The limit or the replicas may have changed in the configuration.
            if info.config.max_bytes != cfg.max_bytes || info.config.num_replicas != replicas {
                js.update_stream(cfg)
                    .await
                    .map_err(|e| format!("updating the stream {name}: {e}"))?;
            }
            Ok(())
        }
        None => js
            .create_stream(cfg)
            .await
            .map(|_| ())
            .map_err(|e| format!("creating the stream {name}: {e}")),
    }
}

/// Deletes `owner`'s stream and everything in it (the controller, once nothing of the owner is
/// kept any more).
pub async fn remove_stream(
    client: async_nats::Client,
    bucket: &str,
    owner: &str,
) -> Result<(), String> {
    let js = async_nats::jetstream::new(client);
    let name = stream_name(bucket, owner);
    match js.delete_stream(&name).await {
        Ok(_) => Ok(()),
        Err(e) if e.to_string().contains("not found") => Ok(()),
        Err(e) => Err(format!("deleting the stream {name}: {e}")),
    }
}

impl NatsStorage {
    /// Must be called inside a tokio runtime; the stream must exist (the controller creates it).
    pub fn new(client: async_nats::Client, bucket: &str, owner: &str, access: Access) -> Self {
        NatsStorage {
            js: async_nats::jetstream::new(client),
            bucket: bucket.to_string(),
            owner: owner.to_string(),
            access,
            rt: Handle::current(),
        }
    }

    fn stream(&self) -> String {
        stream_name(&self.bucket, &self.owner)
    }

    fn object(&self, key: &str) -> String {
        object_subject(&self.bucket, &self.owner, key)
    }

    async fn get(
        js: &async_nats::jetstream::Context,
        stream: &str,
        subject: String,
    ) -> Result<Option<Bytes>, StorageError> {
        let s = js
            .get_stream_no_info(stream)
            .await
            .map_err(|e| nats_err(stream, e))?;
        match s.direct_get_last_for_subject(subject.clone()).await {
            Ok(m) => Ok(Some(m.payload)),
            Err(e) if e.kind() == async_nats::jetstream::stream::DirectGetErrorKind::NotFound => {
                Ok(None)
            }
            Err(e) => Err(nats_err(&subject, e)),
        }
    }

    async fn commit_record(&self, key: &str) -> Result<Option<Commit>, StorageError> {
        let Some(body) =
            Self::get(&self.js, &self.stream(), format!("{}.m", self.object(key))).await?
        else {
            return Ok(None);
        };
        serde_json::from_slice(&body)
            .map(Some)
            .map_err(|e| nats_err(key, format!("a damaged commit record: {e}")))
    }

    async fn purge(&self, subject: String) -> Result<(), StorageError> {
        let s = self
            .js
            .get_stream_no_info(self.stream())
            .await
            .map_err(|e| nats_err(&self.stream(), e))?;
        match s.purge().filter(subject.clone()).await {
            Ok(_) => Ok(()),
            Err(e) if e.to_string().contains("not found") => Ok(()),
            Err(e) => Err(nats_err(&subject, e)),
        }
    }
}

struct NatsWriter {
    js: async_nats::jetstream::Context,
    rt: Handle,
    key: String,
    what: String,
    object: String,
    attempt: String,
    buf: Vec<u8>,
    /// Chunks published and not yet acknowledged: subject, payload (to send again) and ack.
    pending: VecDeque<(String, Bytes, PublishAckFuture)>,
    sha: openssl::sha::Sha256,
    size: u64,
    chunks: u64,
}

fn to_io(e: StorageError) -> io::Error {
    match e {
        StorageError::Io { source, .. } => source,
        other => io::Error::other(other.to_string()),
    }
}

impl NatsWriter {
    fn send_chunk(&mut self) -> Result<(), StorageError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let payload = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        self.sha.update(&payload);
        self.size += payload.len() as u64;
        let subject = format!("{}.{}.{}", self.object, self.attempt, self.chunks);
        self.chunks += 1;
        match self.rt.block_on(
            self.js.send_publish(
                subject.clone(),
                Publish::build()
                    .payload(payload.clone())
                    .message_id(&subject),
            ),
        ) {
            Ok(ack) => self.pending.push_back((subject, payload, ack)),
            Err(e) if passing(&e) => self.publish_again(&subject, payload)?,
            Err(e) => return Err(nats_err(&self.what, e)),
        }
        while self.pending.len() > WINDOW {
            self.wait_one()?;
        }
        Ok(())
    }

    fn wait_one(&mut self) -> Result<(), StorageError> {
        if let Some((subject, payload, ack)) = self.pending.pop_front() {
            match self.rt.block_on(ack.into_future()) {
                Ok(_) => {}
                Err(e) if passing(&e) => self.publish_again(&subject, payload)?,
                Err(e) => return Err(nats_err(&self.what, e)),
            }
        }
        Ok(())
    }

    /// Sends a chunk whose publish or ack failed for a moment again, until acknowledged
    /// ([`publish_acked`]). The message id is the subject: a chunk that was stored and whose ack
    /// was lost is acknowledged as a duplicate, not stored twice.
    fn publish_again(&self, subject: &str, payload: Bytes) -> Result<(), StorageError> {
        publish_acked(&self.js, &self.rt, subject, subject, payload)
            .map_err(|e| nats_err(&self.what, e))
    }
}

/// Whether a publish failed for a moment only: no stream leader answered (an election, a node
/// lost), no ack in time, or the connection broke. Limits and permissions are final.
fn passing(e: &PublishError) -> bool {
    matches!(
        e.kind(),
        PublishErrorKind::StreamNotFound
            | PublishErrorKind::TimedOut
            | PublishErrorKind::BrokenPipe
    )
}

/// Publishes `payload` on `subject` with message id `id` and waits for its ack, again while
/// JetStream is unavailable for a moment (a cluster electing a stream's new leader, the client
/// moving to another server), up to [`RETRY_FOR`].
fn publish_acked(
    js: &async_nats::jetstream::Context,
    rt: &Handle,
    subject: &str,
    id: &str,
    payload: Bytes,
) -> Result<(), PublishError> {
    let deadline = std::time::Instant::now() + RETRY_FOR;
    let mut backoff = crate::retry::backoff(
        std::time::Duration::from_millis(100),
        std::time::Duration::from_secs(2),
    );
    loop {
        let sent = rt.block_on(async {
            let publish = Publish::build().payload(payload.clone()).message_id(id);
            js.send_publish(subject.to_string(), publish)
                .await?
                .into_future()
                .await
        });
        match sent {
            Ok(_) => return Ok(()),
            Err(e) if passing(&e) && std::time::Instant::now() < deadline => {
                tracing::warn!(subject, error = %e, "publishing again");
                std::thread::sleep(crate::retry::next(&mut backoff));
            }
            Err(e) => return Err(e),
        }
    }
}

impl Write for NatsWriter {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let n = b.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&b[..n]);
        if self.buf.len() == CHUNK {
            self.send_chunk().map_err(to_io)?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ObjectWriter for NatsWriter {
    fn commit(mut self: Box<Self>) -> Result<(), StorageError> {
        self.send_chunk()?;
        while !self.pending.is_empty() {
            self.wait_one()?;
        }
        let digest = std::mem::replace(&mut self.sha, openssl::sha::Sha256::new()).finish();
        let record = Commit {
            attempt: self.attempt.clone(),
            chunks: self.chunks,
            size: self.size,
            sha256: data_encoding::HEXLOWER.encode(&digest),
        };
        let body: Bytes = serde_json::to_vec(&record)
            .map_err(|e| nats_err(&self.key, e))?
            .into();
        let subject = format!("{}.m", self.object);
        // The message id names this attempt: a commit sent again after a lost ack is a
        // duplicate, another writer's commit of the same name is refused.
        let id = format!("{subject}.{}", self.attempt);
        let sent = publish_acked(&self.js, &self.rt, &subject, &id, body);
        sent.map_err(|e| {
            let msg = e.to_string();
            if msg.contains("maximum messages per subject") {
                StorageError::Io {
                    path: self.what.clone(),
                    source: io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        "an object of this name is already committed; objects are never replaced",
                    ),
                }
            } else {
                nats_err(&self.what, e)
            }
        })?;
        Ok(())
    }
}

impl Drop for NatsWriter {
    fn drop(&mut self) {
        // Chunks already sent stay until the controller removes them (agents cannot purge);
        // without a commit record they are never read.
        let pending: Vec<_> = self.pending.drain(..).collect();
        self.rt.block_on(async {
            for (_, _, ack) in pending {
                let _ = ack.await;
            }
        });
    }
}

/// Reads an object's chunks by subject, `WINDOW` requests ahead, and checks size and digest.
struct NatsReader {
    js: async_nats::jetstream::Context,
    rt: Handle,
    stream: String,
    what: String,
    prefix: String,
    record: Commit,
    next_request: u64,
    inflight: VecDeque<tokio::task::JoinHandle<Result<Option<Bytes>, StorageError>>>,
    current: Bytes,
    read: u64,
    sha: Option<openssl::sha::Sha256>,
}

impl NatsReader {
    fn fill_window(&mut self) {
        while self.inflight.len() < WINDOW && self.next_request < self.record.chunks {
            let js = self.js.clone();
            let stream = self.stream.clone();
            let subject = format!("{}.{}", self.prefix, self.next_request);
            self.next_request += 1;
            self.inflight.push_back(
                self.rt
                    .spawn(async move { NatsStorage::get(&js, &stream, subject).await }),
            );
        }
    }

    fn bad(&self, why: String) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, format!("{}: {why}", self.what))
    }
}

impl Read for NatsReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            self.fill_window();
            let Some(next) = self.inflight.pop_front() else {
                // Everything read: the size and digest must be the committed ones.
                if let Some(sha) = self.sha.take() {
                    let got = data_encoding::HEXLOWER.encode(&sha.finish());
                    if self.read != self.record.size || got != self.record.sha256 {
                        return Err(self.bad(
                            "the stored chunks do not match the object's commit record".into(),
                        ));
                    }
                }
                return Ok(0);
            };
            let chunk = self
                .rt
                .block_on(next)
                .map_err(io::Error::other)?
                .map_err(to_io)?
                .ok_or_else(|| self.bad("a chunk is missing".into()))?;
            if let Some(sha) = self.sha.as_mut() {
                sha.update(&chunk);
            }
            self.read += chunk.len() as u64;
            self.current = chunk;
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        let _ = self.current.split_to(n);
        Ok(n)
    }
}

impl Drop for NatsReader {
    fn drop(&mut self) {
        for h in self.inflight.drain(..) {
            h.abort();
        }
    }
}

impl Storage for NatsStorage {
    fn name(&self) -> &'static str {
        "nats"
    }

    fn create(&self, key: &str) -> Result<Box<dyn ObjectWriter>, StorageError> {
        check_key(key)?;
        let mut nonce = [0u8; 8];
        openssl::rand::rand_bytes(&mut nonce).map_err(|e| nats_err(key, e))?;
        Ok(Box::new(NatsWriter {
            js: self.js.clone(),
            rt: self.rt.clone(),
            key: key.to_string(),
            what: self.location(key),
            object: self.object(key),
            attempt: format!("a{}", data_encoding::HEXLOWER.encode(&nonce)),
            buf: Vec::with_capacity(CHUNK),
            pending: VecDeque::new(),
            sha: openssl::sha::Sha256::new(),
            size: 0,
            chunks: 0,
        }))
    }

    fn open(&self, key: &str) -> Result<Box<dyn Read + Send>, StorageError> {
        check_key(key)?;
        let record = self
            .rt
            .block_on(self.commit_record(key))?
            .ok_or_else(|| StorageError::NotFound(key.to_string()))?;
        if !record.attempt.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(nats_err(key, "a damaged commit record"));
        }
        Ok(Box::new(io::BufReader::with_capacity(
            1 << 20,
            NatsReader {
                js: self.js.clone(),
                rt: self.rt.clone(),
                stream: self.stream(),
                what: self.location(key),
                prefix: format!("{}.{}", self.object(key), record.attempt),
                record,
                next_request: 0,
                inflight: VecDeque::new(),
                current: Bytes::new(),
                read: 0,
                sha: Some(openssl::sha::Sha256::new()),
            },
        )))
    }

    /// The controller's: every attempt's chunks and the commit record go. An agent cannot.
    fn delete(&self, key: &str) -> Result<(), StorageError> {
        check_key(key)?;
        if self.access == Access::Agent {
            return Ok(());
        }
        self.rt
            .block_on(self.purge(format!("{}.>", self.object(key))))
    }

    fn exists(&self, key: &str) -> bool {
        check_key(key).is_ok() && matches!(self.rt.block_on(self.commit_record(key)), Ok(Some(_)))
    }

    fn location(&self, key: &str) -> String {
        format!("nats://{}/{}", self.stream(), key)
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        if self.access == Access::Agent {
            return Err(nats_err(
                &self.stream(),
                "an agent cannot list stored objects",
            ));
        }
        use futures::TryStreamExt;
        let root = subject_root(&self.bucket, &self.owner);
        let archive = crate::archive::PREFIX;
        // Commit records only (one subject per object), of the namespaces the prefix reaches.
        let mut filters = vec![];
        if !prefix.starts_with(archive) {
            filters.push(format!("{root}.*.m"));
        }
        if prefix.starts_with(archive) || archive.starts_with(prefix) {
            filters.push(format!("{root}.{ARCHIVE_TOKEN}.*.m"));
        }
        let subjects: Vec<(String, usize)> = self.rt.block_on(async {
            let s = match self.js.get_stream_no_info(self.stream()).await {
                Ok(s) => s,
                Err(e) => return Err(nats_err(&self.stream(), e)),
            };
            let mut subjects = vec![];
            for filter in filters {
                match s.info_with_subjects(filter).await {
                    Ok(list) => subjects.extend(
                        list.try_collect::<Vec<_>>()
                            .await
                            .map_err(|e| nats_err(&self.stream(), e))?,
                    ),
                    Err(e) if e.to_string().contains("not found") => {}
                    Err(e) => return Err(nats_err(&self.stream(), e)),
                }
            }
            Ok(subjects)
        })?;
        let mut names: Vec<String> = subjects
            .into_iter()
            .filter_map(|(subject, _)| key_of_commit_subject(&root, &subject))
            .filter(|k| k.starts_with(prefix))
            .collect();
        names.sort();
        Ok(names)
    }

    /// The controller's: chunks without a commit record are a dead writer's.
    fn discard_partial(&self, key: &str) {
        if check_key(key).is_err() || self.access == Access::Agent {
            return;
        }
        let _ = self.rt.block_on(async {
            if let Ok(None) = self.commit_record(key).await {
                self.purge(format!("{}.>", self.object(key))).await?;
            }
            Ok::<(), StorageError>(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_their_commit_subjects() {
        let root = subject_root("b", "owner1");
        for key in [
            "1f0c.cfbk",
            "1f0c.json",
            &crate::archive::segment_key("mysql-bin.000002", 0, 4096),
        ] {
            let subject = format!("{}.m", object_subject("b", "owner1", key));
            assert_eq!(key_of_commit_subject(&root, &subject).as_deref(), Some(key));
        }
        // An archived segment sits under the archive's own token: one permission reads them all
        // and nothing else.
        let seg = object_subject("b", "o", &crate::archive::segment_key("f.1", 0, 9));
        assert!(
            seg.starts_with(&format!("{}.a.", subject_root("b", "o"))),
            "{seg}"
        );
        let all = archive_read_permission("b", "o");
        assert!(
            all.ends_with(&format!("{}.a.>", subject_root("b", "o"))),
            "{all}"
        );
        let backup = object_subject("b", "o", "x.cfbk");
        assert!(!backup.starts_with(&format!("{}.a.", subject_root("b", "o"))));
        assert_eq!(
            key_of_commit_subject(&root, &format!("{root}.a.b.c.m")),
            None
        );
    }
}
