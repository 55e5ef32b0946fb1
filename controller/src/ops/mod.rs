//! The domain layer: rules and operations the API handlers and the workflows share. It imports
//! the store, the agents' calls and the objects, never the API (`api/` parses requests and
//! renders answers on top of it) or the workflows.

pub mod backups;
pub mod configurations;
pub mod intents;
pub mod keys;
