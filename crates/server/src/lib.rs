//! The devid server library: the fleet certificate authority, enrolment and renewal, the
//! device registry, the audit log, storage and the HTTPS API.
//!
//! Code map:
//! * [`config`]: `devid-server.toml`, defaults, data-dir layout.
//! * [`ca`]: the fleet CA (ECDSA P-256): device and server certificates.
//! * [`csr`]: parsing and proof-of-possession check of PKCS#10 requests.
//! * [`token`]: one-time enrolment tokens and the admin credential (random, stored hashed).
//! * [`store`]: the [`store::Store`] trait (registry, tokens, audit) and its SQLite backend.
//! * [`api`]: the axum router: enrolment, renewal, admin API.
//! * [`serve`]: the HTTPS listener (rustls, optional client certificates for renewal).
//! * [`init`]: `devid-server init`.
//! * [`ingest`]: MQTT 3.1.1/5 telemetry ingest over mutual TLS, durable acks, live revocation,
//!   the messages API and metrics.
//! * [`admin`]: the blocking HTTPS client the admin subcommands use.
//!
//! Invariants: no private key of a device is ever here; a certificate alone is never trusted
//! (renewal checks the registry state); no token, key, CSR or payload reaches a log line, an
//! error message or the audit log.
#![forbid(unsafe_code)]

pub mod admin;
pub mod api;
pub mod ca;
pub mod config;
pub mod csr;
pub mod ingest;
pub mod init;
pub mod serve;
pub mod store;
pub mod timeutil;
pub mod token;

mod fsutil;

pub use api::{app, AppState};
pub use ca::Ca;
pub use config::ServerConfig;
