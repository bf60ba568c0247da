//! The SQLite backend of `devid-store`: the registry (tokens, devices, audit) in one WAL-mode
//! database file ([`SqliteStore`]), and telemetry in an append-only message log indexed in
//! the same file ([`SqliteMessageStore`]).
//!
//! Invariants: the only crate of the server that links rusqlite; it gets file paths from the
//! composition root and never chooses them; `synchronous = FULL` wherever a write is
//! acknowledged (registry changes), the message log's `fdatasync` for messages.
#![forbid(unsafe_code)]

mod messages;
mod registry;

pub use messages::SqliteMessageStore;
pub use registry::{SqliteStore, SCHEMA};
