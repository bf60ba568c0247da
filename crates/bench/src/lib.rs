//! devid's benchmark harness: `devid-server`'s MQTT ingest against Mosquitto 2, side by side,
//! on one machine, in one run.
//!
//! The harness starts both servers itself on 127.0.0.1 ([`servers`]) with the same fleet CA,
//! server certificate and device certificates; enrols N simulated devices through devid's real
//! enrolment API ([`fleet`]); drives them with a tokio + rustls (ring) MQTT load generator
//! ([`client`], [`scenarios`]); samples server CPU and memory from `/proc` ([`procfs`]);
//! measures the crypto lower bound of one mTLS handshake in-process ([`crypto`]); and writes a
//! Markdown report with SVG charts ([`report`]). [`run::run`] ties it together; the
//! `devid-bench` binary is a thin command line over it and `scripts/bench` the one command
//! that regenerates `docs/benchmarks.md`.
#![forbid(unsafe_code)]

pub mod client;
pub mod crypto;
pub mod fleet;
pub mod procfs;
pub mod report;
pub mod run;
pub mod scenarios;
pub mod servers;

/// Errors of the harness. Messages never contain a key, token or payload.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BenchError {
    /// A file or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A server could not be set up or started.
    #[error("server setup failed: {0}")]
    Server(String),
    /// Enrolling a simulated device failed.
    #[error("enrolment failed: {0}")]
    Enrol(String),
    /// TLS client setup or handshake failed.
    #[error("tls: {0}")]
    Tls(String),
    /// The MQTT exchange failed.
    #[error("mqtt: {0}")]
    Mqtt(String),
    /// A scenario could not produce a valid measurement.
    #[error("scenario failed: {0}")]
    Scenario(String),
}

impl BenchError {
    /// An [`BenchError::Io`] with context.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
        let what = what.into();
        move |source| BenchError::Io { what, source }
    }
}
