//! The devid server's composition root: the only crate that knows the data dir's layout, the
//! configuration file and the concrete backends, and the only place the HTTPS API and the
//! MQTT ingest meet.
//!
//! Start reading at [`run::run`]: [`run::prepare`] opens the CA and the stores
//! ([`backend::open`]), starts the ingest and hands the HTTPS API its state; [`tls`] builds
//! both listeners' TLS configs; [`init`] creates a data dir. `main.rs` is the command line.
#![forbid(unsafe_code)]

pub mod backend;
pub mod cli;
pub mod error;
pub mod init;
pub mod run;
pub mod tls;

pub use error::RunError;
pub use run::{prepare, run, serve_until};
