//! The PostgreSQL backend of `devid-store`, for one or several server nodes sharing one
//! database: registry, audit and messages on ONE connection pool ([`PostgresStore`]
//! implements both `Registry` and `MessageStore`), the schema migrated once per start, and
//! the `LISTEN` thread that tells a node about state changes other nodes commit; TLS to the
//! database over rustls with libpq's `sslmode`/`sslrootcert` ([`tls`]), the same connector on
//! every connection; the password from the URL or a private file ([`ConnectOptions`]).
//!
//! Invariants: the only crate of the server that links postgres; the connection URL's
//! password never reaches a log line or an error ([`redact_url`]); its methods block and
//! panic on an async executor thread (they drive the socket with a runtime of their own).
#![forbid(unsafe_code)]

mod messages;
mod registry;
pub mod tls;

pub use registry::{
    redact_url, ConnectOptions, PostgresStore, MIGRATIONS, MIGRATION_LOCK, STATE_CHANNEL,
};
pub use tls::{SslMode, TlsSettingsError};
