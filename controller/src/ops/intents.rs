//! Intents as the agent receives them: the envelope, with a deadline by kind.

use coffer_proto::{v1, Message};

use crate::store::{Store, Tx};
use crate::App;

/// Deadline for an intent of `kind`, from now.
fn deadline(app: &App, kind: &str) -> i64 {
    let secs = match kind {
        "prepare" => app.cfg.build_timeout_s as i64,
        _ => 600,
    };
    coffer_proto::now_unix_ms() + secs * 1000
}

pub fn intent_payload(
    app: &App,
    instance_id: &str,
    intent_id: &str,
    kind: v1::intent::Kind,
) -> Vec<u8> {
    let name = coffer_proto::intent_kind_name(&kind);
    coffer_proto::envelope(
        intent_id.to_string(),
        instance_id,
        v1::envelope::Body::Intent(v1::Intent {
            deadline_unix_ms: deadline(app, name),
            trace_parent: crate::telemetry::trace_parent(),
            kind: Some(kind),
        }),
    )
    .encode_to_vec()
}

/// Queues intent `intent_id` for `instance` inside `tx` (published once `tx` commits).
pub async fn enqueue(
    app: &App,
    tx: &mut Tx,
    instance: &str,
    intent_id: &str,
    kind: v1::intent::Kind,
) -> anyhow::Result<()> {
    let name = coffer_proto::intent_kind_name(&kind);
    let payload = intent_payload(app, instance, intent_id, kind);
    Store::enqueue(tx, intent_id, instance, name, &payload).await
}
