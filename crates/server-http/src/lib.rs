//! The HTTPS API as an axum router: enrolment, renewal (mutual TLS), the admin API, the
//! telemetry routes ([`messages`]) and a health check. [`app`] builds it; [`routes`] lists what
//! it serves (the OpenAPI file `openapi.yaml` is checked against that list by a test);
//! [`listener`] serves it over TLS. The admin listener also serves the operators' web
//! [`console`] (HTML pages under `/console/`).
//!
//! Errors are JSON `{"error": "...", "code": "..."}`. Every refusal of an enrolment or renewal
//! and every admin change leaves an audit row. No token, key, CSR or body reaches a log line.
//!
//! Invariants: the only server crate that links axum, hyper and tower, and the only one that
//! knows HTTP status codes and JSON bodies (store records are converted to wire views here);
//! never imports the MQTT ingest (a state change reaches live sessions through
//! [`HttpState::live`], a `devid_store::StateChangeSink`); every registry call runs on the
//! blocking pool ([`blocking`]).
#![forbid(unsafe_code)]

mod admin;
pub mod attest;
mod attest_policy;
mod auth;
pub mod console;
mod enroll;
mod error;
pub mod limits;
pub mod listener;
pub mod messages;
mod request;
mod router;
mod state;

pub use attest::AttestPolicy;
pub use auth::Admin;
pub use console::Sessions as ConsoleSessions;
pub use error::ApiError;
pub use limits::{HttpLimits, HttpMetrics};
pub use router::{app, routes, surface_app, surface_routes, Surface};
pub use state::{device_info, HttpState, MetricsText, PeerInfo, Readiness};
