//! Everything that touches a database's files, processes and query language.
//!
//! Background: the agent supervises one database server; *how* to initialise it, render its
//! configuration, start it, probe it and manage its users is datastore knowledge and lives here,
//! behind the [`Datastore`] trait. The agent only calls the trait.
//!
//! Invariants: this crate knows nothing about HTTP or the controller; operations are typed
//! (`create_database`, `create_user`, ...), never SQL strings handed in from outside.
//!
//! Adding a datastore: a module under `datastore/` implementing [`Datastore`], one variant in
//! [`DatastoreKind`] and one arm in [`DatastoreKind::build`].

pub mod archive;
pub mod backup;
pub mod config_rules;
pub mod datastore;
pub mod modules;

/// The shared, datastore-free parts (storage, the sealed stream, published logs), here under
/// their old paths.
pub use coffer_common::{fsutil, logs, pipeline, storage};

pub use datastore::{
    DatabaseSpec, Datastore, DatastoreError, DatastoreKind, Health, Layout, ServerCommand, Sizing,
    UserSpec,
};
