//! Talking to agents: request/reply calls on an instance's call subject.

use std::time::Duration;

use axum::http::StatusCode;
use coffer_proto::{seal, subjects, v1, Message};

use crate::error::ApiError;
use crate::store::InstanceRow;
use crate::App;

/// How long a call waits for the agent's answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);

/// What a call's error says when the agent did not answer (its outcome is unknown).
const UNANSWERED: &str = "did not answer within";

/// Whether `e` is a call the agent did not answer: it may not have reached the agent, or its
/// answer may have been lost; an idempotent call can be sent again.
pub fn unanswered(e: &ApiError) -> bool {
    e.message.contains(UNANSWERED)
}

/// Sends a call to the instance's agent and maps its answer to Trove's errors.
pub async fn call(
    app: &App,
    r: &InstanceRow,
    kind: v1::call::Kind,
) -> Result<(String, v1::CallReply), ApiError> {
    let call_id = uuid::Uuid::new_v4().to_string();
    let env = coffer_proto::envelope(
        call_id.clone(),
        &r.id,
        v1::envelope::Body::Call(v1::Call {
            reply_key: app.reply_public_key.clone(),
            kind: Some(kind),
        }),
    );
    let payload: bytes::Bytes = env.encode_to_vec().into();
    let deadline = tokio::time::Instant::now() + CALL_TIMEOUT;
    let mut backoff =
        coffer_common::retry::backoff(Duration::from_millis(50), Duration::from_millis(500));
    let msg = loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        // The client's own request timeout (10 s by default) would end a call first.
        let req = app.client.send_request(
            subjects::call(&r.id),
            async_nats::Request::new()
                .payload(payload.clone())
                .timeout(Some(left.max(Duration::from_millis(100)))),
        );
        match tokio::time::timeout(left + Duration::from_secs(1), req).await {
            Ok(Ok(m)) => break m,
            // Nobody listens on the agent's subject right now (it is moving to another server
            // of the cluster, or reconnecting): the call reached no one, so sending it again is
            // safe.
            Ok(Err(e))
                if e.kind() == async_nats::RequestErrorKind::NoResponders
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(coffer_common::retry::next(&mut backoff)).await;
            }
            _ => {
                return Err(ApiError::unprocessable(format!(
                    "The agent of instance {} {UNANSWERED} {} s; check that it runs, then retry.",
                    r.id,
                    CALL_TIMEOUT.as_secs()
                )))
            }
        }
    };
    let reply = match coffer_proto::decode(&msg.payload) {
        Ok(v1::Envelope {
            body: Some(v1::envelope::Body::CallReply(rep)),
            ..
        }) => rep,
        _ => return Err(anyhow::anyhow!("undecodable reply from the agent of {}", r.id).into()),
    };
    if reply.ok {
        return Ok((call_id, reply));
    }
    let e = reply.error.clone();
    Err(
        match v1::CallError::try_from(reply.error_kind).unwrap_or(v1::CallError::Unspecified) {
            v1::CallError::Invalid | v1::CallError::Exists => ApiError::bad_request(e),
            v1::CallError::NotFound => ApiError::not_found(e),
            v1::CallError::NotRunning => {
                ApiError::unprocessable(format!("Instance {} is not ready: {e}.", r.id))
            }
            v1::CallError::Unsupported => ApiError::not_implemented(e),
            _ => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "serverError",
                format!("The agent failed: {e}"),
            ),
        },
    )
}

/// The instance agent's X25519 public key, to seal secrets to.
pub fn agent_key(r: &InstanceRow) -> Result<Vec<u8>, ApiError> {
    seal::from_hex(&r.agent_public_key)
        .filter(|k| k.len() == 32)
        .ok_or_else(|| anyhow::anyhow!("instance {} has no agent key", r.id).into())
}

/// Opens a secret the controller kept sealed to its own key (hex), or None.
pub fn open_kept(app: &App, hex: &str, context: &str) -> Option<Vec<u8>> {
    seal::from_hex(hex).and_then(|b| seal::open(&app.reply_secret_key, context, &b).ok())
}
