//! The NATS JetStream object store, for agents on other hosts and VMs. Objects are written in the
//! object store's own layout (chunks on `$O.<bucket>.C.<nuid>`, the object's info rolled up on
//! `$O.<bucket>.M.<base64url name>`), so `nats object get` reads them too.
//!
//! Differences from the client library's `put`, both for the invariants of [`super::Storage`]:
//! - the chunk subject is derived from the object's name, so whatever an interrupted writer
//!   published can be found and purged later ([`Storage::discard_partial`]), and an abandoned
//!   writer purges its chunks at once;
//! - chunks are published with a window of outstanding acknowledgements instead of one round
//!   trip per chunk.
//!
//! The trait is synchronous (strategies run on blocking threads); every call here blocks on the
//! runtime handle captured when the backend was built.

use std::collections::VecDeque;
use std::future::IntoFuture;
use std::io::{self, Read, Write};

use async_nats::jetstream::context::PublishAckFuture;
use async_nats::jetstream::object_store::{ObjectInfo, ObjectOptions};
use async_nats::HeaderMap;
use bytes::Bytes;
use tokio::io::AsyncReadExt;
use tokio::runtime::Handle;

use super::{check_key, ObjectWriter, Storage, StorageError};

/// Chunk size: well under NATS's default 1 MiB payload limit.
const CHUNK: usize = 512 * 1024;
/// Chunks in flight before the writer waits for the oldest acknowledgement.
const WINDOW: usize = 16;

pub struct NatsStorage {
    js: async_nats::jetstream::Context,
    bucket: String,
    rt: Handle,
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

impl NatsStorage {
    /// Must be called inside a tokio runtime; the bucket must exist (the controller creates it).
    pub fn new(client: async_nats::Client, bucket: &str) -> NatsStorage {
        NatsStorage {
            js: async_nats::jetstream::new(client),
            bucket: bucket.to_string(),
            rt: Handle::current(),
        }
    }

    /// Creates the bucket when missing (the controller does this at start).
    pub async fn ensure_bucket(
        client: async_nats::Client,
        bucket: &str,
        max_bytes: Option<i64>,
    ) -> Result<(), String> {
        let js = async_nats::jetstream::new(client);
        if js.get_object_store(bucket).await.is_ok() {
            return Ok(());
        }
        js.create_object_store(async_nats::jetstream::object_store::Config {
            bucket: bucket.to_string(),
            description: Some("Coffer backups".into()),
            max_bytes: max_bytes.unwrap_or(-1),
            storage: async_nats::jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map(|_| ())
        .map_err(|e| format!("creating the object store bucket '{bucket}': {e}"))
    }

    fn stream_name(&self) -> String {
        format!("OBJ_{}", self.bucket)
    }

    /// The chunk subject's token for `key`: fixed per name, so leftovers can be found.
    fn nuid(key: &str) -> String {
        let digest = openssl::sha::sha256(key.as_bytes());
        format!("cf{}", data_encoding::HEXLOWER.encode(&digest[..12]))
    }

    fn chunk_subject(&self, key: &str) -> String {
        format!("$O.{}.C.{}", self.bucket, Self::nuid(key))
    }

    fn meta_subject(&self, key: &str) -> String {
        format!(
            "$O.{}.M.{}",
            self.bucket,
            data_encoding::BASE64URL.encode(key.as_bytes())
        )
    }

    async fn purge(
        js: &async_nats::jetstream::Context,
        stream: &str,
        subject: &str,
    ) -> Result<(), StorageError> {
        let s = js
            .get_stream(stream)
            .await
            .map_err(|e| nats_err(stream, e))?;
        s.purge()
            .filter(subject)
            .await
            .map_err(|e| nats_err(subject, e))?;
        Ok(())
    }

    async fn info(&self, key: &str) -> Result<Option<ObjectInfo>, StorageError> {
        let store = self
            .js
            .get_object_store(&self.bucket)
            .await
            .map_err(|e| nats_err(&self.bucket, e))?;
        match store.info(key).await {
            Ok(i) if !i.deleted => Ok(Some(i)),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == async_nats::jetstream::object_store::InfoErrorKind::NotFound => {
                Ok(None)
            }
            Err(e) => Err(nats_err(key, e)),
        }
    }
}

struct NatsWriter {
    js: async_nats::jetstream::Context,
    rt: Handle,
    bucket: String,
    stream: String,
    key: String,
    nuid: String,
    chunk_subject: String,
    meta_subject: String,
    buf: Vec<u8>,
    pending: VecDeque<PublishAckFuture>,
    sha: openssl::sha::Sha256,
    size: usize,
    chunks: usize,
    done: bool,
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
        self.size += payload.len();
        self.chunks += 1;
        let ack = self
            .rt
            .block_on(self.js.publish(self.chunk_subject.clone(), payload))
            .map_err(|e| nats_err(&self.key, e))?;
        self.pending.push_back(ack);
        while self.pending.len() > WINDOW {
            self.wait_one()?;
        }
        Ok(())
    }

    fn wait_one(&mut self) -> Result<(), StorageError> {
        if let Some(ack) = self.pending.pop_front() {
            self.rt.block_on(ack.into_future()).map_err(|e| {
                nats_err(
                    &format!("object store bucket '{}' ({})", self.bucket, self.key),
                    e,
                )
            })?;
        }
        Ok(())
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
        let info = ObjectInfo {
            name: self.key.clone(),
            description: None,
            metadata: Default::default(),
            headers: None,
            options: Some(ObjectOptions {
                link: None,
                max_chunk_size: Some(CHUNK),
            }),
            bucket: self.bucket.clone(),
            nuid: self.nuid.clone(),
            size: self.size,
            chunks: self.chunks,
            modified: Some(time::OffsetDateTime::now_utc()),
            digest: Some(format!(
                "SHA-256={}",
                data_encoding::BASE64URL.encode(&digest)
            )),
            deleted: false,
        };
        let body = serde_json::to_vec(&info).map_err(|e| nats_err(&self.key, e))?;
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Rollup", "sub");
        let ack = self
            .rt
            .block_on(
                self.js
                    .publish_with_headers(self.meta_subject.clone(), headers, body.into()),
            )
            .map_err(|e| nats_err(&self.key, e))?;
        self.rt
            .block_on(ack.into_future())
            .map_err(|e| nats_err(&self.key, e))?;
        self.done = true;
        Ok(())
    }
}

impl Drop for NatsWriter {
    fn drop(&mut self) {
        if !self.done {
            // Abandoned: take back every chunk already published.
            let _ = self.rt.block_on(async {
                for ack in self.pending.drain(..) {
                    let _ = ack.await;
                }
                NatsStorage::purge(&self.js, &self.stream, &self.chunk_subject).await
            });
        }
    }
}

/// A blocking reader over the object store's ordered-consumer reader (which checks the digest).
struct NatsReader {
    rt: Handle,
    obj: async_nats::jetstream::object_store::Object,
}

impl Read for NatsReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.rt.block_on(self.obj.read(buf))
    }
}

impl Storage for NatsStorage {
    fn name(&self) -> &'static str {
        "nats"
    }

    fn create(&self, key: &str) -> Result<Box<dyn ObjectWriter>, StorageError> {
        check_key(key)?;
        // Leftovers of an earlier attempt under the same name go first.
        self.discard_partial(key);
        Ok(Box::new(NatsWriter {
            js: self.js.clone(),
            rt: self.rt.clone(),
            bucket: self.bucket.clone(),
            stream: self.stream_name(),
            key: key.to_string(),
            nuid: Self::nuid(key),
            chunk_subject: self.chunk_subject(key),
            meta_subject: self.meta_subject(key),
            buf: Vec::with_capacity(CHUNK),
            pending: VecDeque::new(),
            sha: openssl::sha::Sha256::new(),
            size: 0,
            chunks: 0,
            done: false,
        }))
    }

    fn open(&self, key: &str) -> Result<Box<dyn Read + Send>, StorageError> {
        check_key(key)?;
        let obj = self.rt.block_on(async {
            let store = self
                .js
                .get_object_store(&self.bucket)
                .await
                .map_err(|e| nats_err(&self.bucket, e))?;
            store.get(key).await.map_err(|e| {
                if e.kind() == async_nats::jetstream::object_store::GetErrorKind::NotFound {
                    StorageError::NotFound(key.to_string())
                } else {
                    nats_err(key, e)
                }
            })
        })?;
        Ok(Box::new(io::BufReader::with_capacity(
            1 << 20,
            NatsReader {
                rt: self.rt.clone(),
                obj,
            },
        )))
    }

    fn delete(&self, key: &str) -> Result<(), StorageError> {
        check_key(key)?;
        self.rt.block_on(async {
            let stream = self.stream_name();
            if let Some(info) = self.info(key).await? {
                Self::purge(
                    &self.js,
                    &stream,
                    &format!("$O.{}.C.{}", self.bucket, info.nuid),
                )
                .await?;
            }
            // No tombstone either: the name's info goes with the chunks.
            Self::purge(&self.js, &stream, &self.meta_subject(key)).await?;
            Self::purge(&self.js, &stream, &self.chunk_subject(key)).await
        })
    }

    fn exists(&self, key: &str) -> bool {
        check_key(key).is_ok() && matches!(self.rt.block_on(self.info(key)), Ok(Some(_)))
    }

    fn location(&self, key: &str) -> String {
        format!("nats-object-store://{}/{}", self.bucket, key)
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        use futures::TryStreamExt;
        let mut names: Vec<String> = self.rt.block_on(async {
            let store = self
                .js
                .get_object_store(&self.bucket)
                .await
                .map_err(|e| nats_err(&self.bucket, e))?;
            let list = store.list().await.map_err(|e| nats_err(&self.bucket, e))?;
            let infos: Vec<ObjectInfo> = list
                .try_collect()
                .await
                .map_err(|e| nats_err(&self.bucket, e))?;
            Ok::<_, StorageError>(
                infos
                    .into_iter()
                    .filter(|i| !i.deleted && i.name.starts_with(prefix))
                    .map(|i| i.name)
                    .collect(),
            )
        })?;
        names.sort();
        Ok(names)
    }

    fn discard_partial(&self, key: &str) {
        if check_key(key).is_err() {
            return;
        }
        let _ = self.rt.block_on(async {
            // A committed object is never touched; chunks without an info are a dead writer's.
            if let Ok(None) = self.info(key).await {
                Self::purge(&self.js, &self.stream_name(), &self.chunk_subject(key)).await?;
            }
            Ok::<(), StorageError>(())
        });
    }
}
