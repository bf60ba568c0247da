//! What the handlers share ([`HttpState`], built by the composition root) and what the
//! listener tells them about a connection ([`PeerInfo`]).

use std::net::SocketAddr;
use std::sync::Arc;

use devid_proto::DeviceInfo;
use rustls::pki_types::CertificateDer;

use devid_ca::Ca;
use devid_server_config::ServerConfig;
use devid_stdx::rfc3339;
use devid_store::{
    Attestation, DeviceRecord, LiveMessage, MessageStore, Registry, StateChangeSink,
};
use tokio::sync::broadcast;

/// Encodes the process's metrics as OpenMetrics text (`GET /metrics`); the composition root
/// owns the registries behind it.
pub type MetricsText = Arc<dyn Fn() -> String + Send + Sync>;

/// What the handlers share: built by the composition root.
#[derive(Clone)]
pub struct HttpState {
    /// Registry, tokens, audit.
    pub registry: Arc<dyn Registry>,
    /// The fleet CA.
    pub ca: Arc<Ca>,
    /// Settings.
    pub config: Arc<ServerConfig>,
    /// Told about every state change this node commits (the MQTT ingest cuts the device's live
    /// session).
    pub live: Arc<dyn StateChangeSink>,
    /// Stored telemetry.
    pub messages: Arc<dyn MessageStore>,
    /// Messages as they are stored, for `GET /v1/stream`.
    pub stream: broadcast::Sender<Arc<LiveMessage>>,
    /// `GET /metrics`.
    pub metrics: MetricsText,
    /// Per-source limits and the refusal audit's aggregation.
    pub limits: Arc<crate::limits::HttpLimits>,
    /// The HTTPS API's own counters (appended to `GET /metrics` by the root).
    pub http_metrics: Arc<crate::limits::HttpMetrics>,
    /// TPM key attestation: mode and EK trust bundle.
    pub attest: Arc<crate::attest_policy::AttestPolicy>,
    /// What the root knows about readiness besides the database (`GET /readyz`): `Err(check)`
    /// names what is down (e.g. `mqtt_listener`).
    pub readiness: Readiness,
    /// Which devices have a live MQTT session on this node (the console's "connected now").
    pub presence: Arc<dyn devid_store::Presence>,
    /// The console's login sessions (in memory, this node only).
    pub console: Arc<crate::console::Sessions>,
}

/// See [`HttpState::readiness`].
pub type Readiness = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

impl std::fmt::Debug for HttpState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpState")
            .field("registry", &self.registry)
            .field("ca", &self.ca)
            .field("messages", &self.messages)
            .finish_non_exhaustive()
    }
}

/// The admin API's view of a registry row and its attestation.
pub fn device_info(d: &DeviceRecord, a: Option<&Attestation>) -> DeviceInfo {
    DeviceInfo {
        assurance: a
            .map(|a| a.assurance.clone())
            .unwrap_or_else(|| "none".into()),
        ek_fingerprint: a.map(|a| a.ek_fingerprint.clone()),
        tpm_manufacturer: a.and_then(|a| a.ek_manufacturer.clone()),
        tpm_model: a.and_then(|a| a.ek_model.clone()),
        id: d.id.to_string(),
        state: d.state,
        cert_serial: d.cert_serial.clone(),
        cert_not_after: rfc3339(d.cert_not_after_ms),
        key_fingerprint: d.key_fingerprint.clone(),
        policy: d.policy.clone(),
        created_at: rfc3339(d.created_at_ms),
        enrolled_at: rfc3339(d.enrolled_at_ms),
        last_seen: rfc3339(d.last_seen_ms),
        // no backend records an attestation yet: nothing was proven
        reported_backend: d.reported_backend.clone(),
    }
}

/// What the TLS listener knows about the connection a request came on. Inserted as a request
/// extension by [`listener`].
#[derive(Clone, Debug, Default)]
pub struct PeerInfo {
    /// The peer's address.
    pub addr: Option<SocketAddr>,
    /// The client certificate chain, already verified against the fleet CA by rustls.
    pub client_chain: Option<Arc<Vec<CertificateDer<'static>>>>,
}
