//! What agent and controller share beyond the wire (`coffer-proto`), knowing no datastore.
//!
//! Background: the controller deletes stored objects, tails published logs, keeps the operator
//! keyring and checks configuration values and module contents; agents write and read the same
//! objects and streams. That shared part lives here so the controller links no datastore code
//! (`coffer-strategies` holds everything that touches a database).
//!
//! Invariant: nothing here names a datastore; what differs per datastore is described in
//! `coffer_proto::Datastore` or implemented in `coffer-strategies`.

pub mod archive;
pub mod backup;
pub mod config_rules;
pub mod fsutil;
pub mod logging;
pub mod logs;
pub mod modules;
pub mod nats;
pub mod pipeline;
pub mod retry;
pub mod storage;
