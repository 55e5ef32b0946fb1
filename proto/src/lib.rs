//! Wire types shared by `coffer-agent` and `coffer-controller`.
//!
//! Background: the two sides talk only over NATS, and only in protobuf `Envelope`s generated from
//! `proto/coffer/agent/v1/agent.proto`. This crate owns those types, the schema version, the intent
//! kind names and every NATS subject and stream name (see [`subjects`]).
//!
//! Invariant: this crate does no I/O and has no async runtime dependency.

pub mod datastore;
pub mod seal;
pub mod subjects;

pub use datastore::Datastore;

/// Generated protobuf types of package `coffer.agent.v1`.
pub mod v1 {
    #![allow(missing_docs, clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/coffer.agent.v1.rs"));
}

pub use prost::Message;

/// Version of the wire schema this build speaks. Bumped when fields are added.
pub const SCHEMA_VERSION: u32 = 1;

/// This build's software version.
pub const SOFTWARE_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Name of an intent kind as listed in heartbeats and checked by the controller.
pub fn intent_kind_name(kind: &v1::intent::Kind) -> &'static str {
    use v1::intent::Kind;
    match kind {
        Kind::Prepare(_) => "prepare",
        Kind::Restart(_) => "restart",
        Kind::Stop(_) => "stop",
        Kind::Start(_) => "start",
        Kind::Delete(_) => "delete",
        Kind::Backup(_) => "backup",
        Kind::Configure(_) => "configure",
    }
}

/// Every intent kind this schema version defines.
pub const INTENT_KINDS: &[&str] = &[
    "prepare",
    "restart",
    "stop",
    "start",
    "delete",
    "backup",
    "configure",
];

/// Capability an agent lists (with its intent kinds) when it answers database, user and root
/// calls.
pub const CAP_USERS: &str = "users";

/// Capability of an agent whose `DetachReplica` takes `catch_up_to` (a switchover's promotion).
pub const CAP_CATCH_UP_DETACH: &str = "catch_up_detach";

/// How long a source whose lease ran out may take to become read-only before its agent shuts the
/// database down instead (the live fence's bound). The controller's settings must leave room for
/// it: `lease_ms + FENCE_BOUND_MS + FENCE_WATCH_MS + FENCE_MARGIN_MS <= heartbeat_expiry`.
pub const FENCE_BOUND_MS: u64 = 2000;
/// How often the agent's watchdog looks at the lease.
pub const FENCE_WATCH_MS: u64 = 50;
/// The least time between a fenced source and the controller's declaring it lost.
pub const FENCE_MARGIN_MS: u64 = 500;

/// Builds an envelope stamped with the schema and software versions and the current time.
pub fn envelope(id: String, instance_id: &str, body: v1::envelope::Body) -> v1::Envelope {
    v1::Envelope {
        schema_version: SCHEMA_VERSION,
        software_version: SOFTWARE_VERSION.to_string(),
        id,
        instance_id: instance_id.to_string(),
        sent_unix_ms: now_unix_ms(),
        body: Some(body),
    }
}

/// The trace id of a W3C traceparent (`00-<32 hex>-<16 hex>-<2 hex>`, lower-case, not all
/// zeros), if it is one: what the controller takes from a request and an agent logs of an intent.
pub fn trace_id(tp: &str) -> Option<&str> {
    let parts: Vec<&str> = tp.split('-').collect();
    let hex = |s: &str, n: usize| {
        s.len() == n && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    (parts.len() == 4
        && hex(parts[0], 2)
        && hex(parts[1], 32)
        && hex(parts[2], 16)
        && hex(parts[3], 2)
        && parts[1] != "0".repeat(32))
    .then(|| parts[1])
}

/// Milliseconds since the Unix epoch (wall clock; used only for deadlines and ordering hints).
pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Seconds since the Unix epoch (wall clock: expiries and deadlines kept across restarts).
pub fn now_unix_s() -> i64 {
    now_unix_ms() / 1000
}

/// Decodes an envelope from bytes.
pub fn decode(bytes: &[u8]) -> Result<v1::Envelope, prost::DecodeError> {
    v1::Envelope::decode(bytes)
}

/// Lower-case name of a service status, as shown in logs and faults.
pub fn service_status_name(s: v1::ServiceStatus) -> &'static str {
    use v1::ServiceStatus as S;
    match s {
        S::Unspecified => "unspecified",
        S::New => "new",
        S::Building => "building",
        S::Running => "running",
        S::Blocked => "blocked",
        S::Shutdown => "shutdown",
        S::Crashed => "crashed",
        S::Failed => "failed",
        S::RestartRequired => "restart_required",
        S::Promoting => "promoting",
        S::Ejecting => "ejecting",
        S::Logging => "logging",
        S::Unknown => "unknown",
        S::Deleted => "deleted",
        S::Restarting => "restarting",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_round_trips() {
        let env = envelope(
            "i-1".into(),
            "inst",
            v1::envelope::Body::Intent(v1::Intent {
                deadline_unix_ms: 5,
                trace_parent: String::new(),
                kind: Some(v1::intent::Kind::Restart(v1::Restart {})),
            }),
        );
        let bytes = env.encode_to_vec();
        let back = decode(&bytes).unwrap();
        assert_eq!(back, env);
        assert_eq!(back.schema_version, SCHEMA_VERSION);
    }

    proptest::proptest! {
        /// Whatever reaches a subject, decoding answers a value or an error: no panic, and
        /// prost's allocations are bounded by the input's own length.
        #[test]
        fn arbitrary_bytes_decode_or_fail_cleanly(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..4096),
        ) {
            let _ = decode(&bytes);
        }

        /// A valid envelope with bytes changed decodes to something or fails; never panics.
        #[test]
        fn changed_envelopes_decode_or_fail_cleanly(
            at in proptest::prelude::any::<proptest::sample::Index>(),
            byte in proptest::prelude::any::<u8>(),
        ) {
            let env = envelope(
                "i-1".into(),
                "inst",
                v1::envelope::Body::Intent(v1::Intent {
                    deadline_unix_ms: 5,
                    trace_parent: String::new(),
                    kind: Some(v1::intent::Kind::Prepare(v1::Prepare {
                        databases: vec![v1::Database { name: "d".into(), ..Default::default() }],
                        ..Default::default()
                    })),
                }),
            );
            let mut bytes = env.encode_to_vec();
            let i = at.index(bytes.len());
            bytes[i] = byte;
            let _ = decode(&bytes);
        }
    }

    #[test]
    fn every_kind_is_listed() {
        use v1::intent::Kind;
        let kinds = [
            Kind::Prepare(Default::default()),
            Kind::Restart(v1::Restart {}),
            Kind::Stop(v1::Stop {}),
            Kind::Start(v1::Start {}),
            Kind::Delete(v1::Delete {}),
            Kind::Backup(v1::Backup::default()),
            Kind::Configure(v1::Configure::default()),
        ];
        for k in kinds {
            assert!(INTENT_KINDS.contains(&intent_kind_name(&k)));
        }
    }
}

#[cfg(test)]
mod wire_fixtures {
    use super::*;

    /// Bytes of a schema-1 restart intent, written out by hand from the field numbers. Every
    /// later schema must still decode them to the same values (fields are only ever added).
    const RESTART_V1: &[u8] = &[
        0x08, 0x01, // schema_version = 1
        0x12, 0x05, b'0', b'.', b'1', b'.', b'0', // software_version = "0.1.0"
        0x1a, 0x01, b'i', // id = "i"
        0x22, 0x01, b'x', // instance_id = "x"
        0x28, 0x05, // sent_unix_ms = 5
        0x52, 0x04, 0x08, 0x07, 0x5a, 0x00, // intent { deadline_unix_ms = 7, restart {} }
    ];

    #[test]
    fn schema_1_bytes_still_decode() {
        let env = decode(RESTART_V1).unwrap();
        assert_eq!(env.schema_version, 1);
        assert_eq!(env.software_version, "0.1.0");
        assert_eq!(env.id, "i");
        assert_eq!(env.instance_id, "x");
        assert_eq!(env.sent_unix_ms, 5);
        match env.body {
            Some(v1::envelope::Body::Intent(v1::Intent {
                deadline_unix_ms: 7,
                kind: Some(v1::intent::Kind::Restart(_)),
                ..
            })) => {}
            other => panic!("decoded {other:?}"),
        }
        assert_eq!(env.encode_to_vec(), RESTART_V1, "encoding is stable");
    }
}
