//! NATS subject and stream names. Nothing else in the workspace spells a `coffer.v1.` subject.

/// JetStream stream holding intents (controller → agent).
pub const INTENT_STREAM: &str = "COFFER_INTENTS";
/// JetStream stream holding events (agent → controller).
pub const EVENT_STREAM: &str = "COFFER_EVENTS";
/// Queue group the controllers answer heartbeats in.
pub const HEARTBEAT_QUEUE: &str = "coffer-controllers";
/// Durable consumer name the controllers share on the event stream.
pub const CONTROLLER_EVENT_CONSUMER: &str = "controller-events";

/// Intents for one instance.
pub fn intent(instance: &str) -> String {
    format!("coffer.v1.intent.{instance}")
}
/// Every intent subject (the intent stream's subject filter).
pub fn intent_all() -> String {
    "coffer.v1.intent.>".to_string()
}
/// Quick request/reply calls for one instance.
pub fn call(instance: &str) -> String {
    format!("coffer.v1.call.{instance}")
}
/// Heartbeats from one instance's agent.
pub fn heartbeat(instance: &str) -> String {
    format!("coffer.v1.hb.{instance}")
}
/// Controllers sharing a store tell each other there is work: `outbox` (an intent was queued),
/// `workflows` (an agent event a workflow may wait on was handled). Only controllers may publish
/// or subscribe here (agents' permissions name their own subjects only).
pub fn controller_wake(what: &str) -> String {
    format!("coffer.v1.ctl.wake.{what}")
}
pub fn controller_wake_all() -> String {
    "coffer.v1.ctl.wake.*".to_string()
}
/// Every heartbeat subject (what the controllers subscribe to).
pub fn heartbeat_all() -> String {
    "coffer.v1.hb.*".to_string()
}
/// Events from one instance's agent.
pub fn event(instance: &str) -> String {
    format!("coffer.v1.event.{instance}")
}
/// Every event subject (the event stream's subject filter).
pub fn event_all() -> String {
    "coffer.v1.event.>".to_string()
}
/// Durable consumer name of one instance's agent on the intent stream.
pub fn agent_consumer(instance: &str) -> String {
    format!("agent-{instance}")
}

/// Reply inbox prefix of one instance's agent (its NATS identity may only receive there).
pub fn agent_inbox_prefix(instance: &str) -> String {
    format!("_INBOX.{instance}")
}

/// The instance token of a `coffer.v1.<kind>.<instance>` subject.
pub fn instance_of(subject: &str) -> Option<&str> {
    let mut it = subject.splitn(4, '.');
    match (it.next(), it.next(), it.next(), it.next()) {
        (Some("coffer"), Some("v1"), Some(_), Some(inst)) if valid_token(inst) => Some(inst),
        _ => None,
    }
}

/// Whether `s` may be used as an instance token in a subject (no dots, wildcards or spaces).
pub fn valid_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_scoped_by_instance() {
        assert_eq!(intent("abc"), "coffer.v1.intent.abc");
        assert_eq!(heartbeat("abc"), "coffer.v1.hb.abc");
        assert_eq!(event("abc"), "coffer.v1.event.abc");
        assert_eq!(call("abc"), "coffer.v1.call.abc");
        assert!(valid_token("0d5c-aa_1"));
        assert!(!valid_token("a.b"));
        assert!(!valid_token("a*"));
        assert!(!valid_token(""));
        assert_eq!(instance_of("coffer.v1.hb.abc"), Some("abc"));
        assert_eq!(instance_of("coffer.v1.hb.a.b"), None);
        assert_eq!(instance_of("other.v1.hb.abc"), None);
    }
}
