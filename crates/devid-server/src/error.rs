//! The error of starting and running the server.

use std::net::SocketAddr;

use devid_ca::CaError;
use devid_store::StoreError;

/// Errors starting or running the server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// A file of the data dir could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The TLS files are unusable.
    #[error("TLS setup: {0}")]
    Tls(String),
    /// The CA could not be loaded.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// The database could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The attestation settings are unusable (e.g. an unreadable EK root).
    #[error("attestation.ek_roots: {0}")]
    Attestation(String),
    /// The server stopped because its storage can no longer promise durability (a failed
    /// fdatasync of the message log); a restart recovers from what is on disk.
    #[error("stopped after a fatal storage error: {0}")]
    Fatal(String),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}; is another server running there?")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}
