//! The agent's honest status: connection state, outbox depth, last acknowledgement,
//! certificate expiry, TLS signature counts. Written to `<state dir>/agent-status.json`
//! (replaced atomically, 0640) and answered on the local socket (`{"op":"status"}`).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::outbox::OutboxStats;

/// File name of the status file in the state dir.
pub const STATUS_FILE: &str = "agent-status.json";

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Connection states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ConnState {
    /// Starting up.
    #[default]
    Starting,
    /// Opening TCP, TLS and MQTT.
    Connecting,
    /// Connected and publishing.
    Connected,
    /// Waiting before the next attempt after a failure.
    Backoff,
    /// The server refused this device (revoked, suspended, unknown) or is not the pinned
    /// server; retrying slowly.
    Refused,
    /// Stopped.
    Stopped,
}

/// Connection part of the status.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Connection {
    /// State.
    pub state: ConnState,
    /// Since when (unix seconds).
    pub since_unix: u64,
    /// MQTT endpoint.
    pub endpoint: String,
    /// Why the last connection failed or ended (no secrets).
    pub last_error: Option<String>,
    /// Milliseconds until the next attempt (state backoff/refused).
    pub retry_in_ms: Option<u64>,
    /// Connection attempts since start.
    pub attempts: u64,
    /// Successful connections since start.
    pub connects: u64,
    /// Refusals (CONNACK not authorised / bad credentials, TLS certificate alerts).
    pub refusals: u64,
}

/// TLS part of the status.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TlsStatus {
    /// Handshake signatures made by the keystore (TPM / token) for MQTT connections.
    pub keystore_signatures: u64,
    /// Full handshakes (each costs one keystore signature).
    pub full_handshakes: u64,
    /// Resumed handshakes (TLS 1.3 PSK: no client signature).
    pub resumed_handshakes: u64,
}

/// MQTT publishing counters.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct MqttStatus {
    /// PUBLISH packets sent (resends included).
    pub published: u64,
    /// Messages acknowledged with success.
    pub acked: u64,
    /// Messages the server refused for good (PUBACK reason ≥ 0x80 that retrying cannot
    /// fix, or larger than the server accepts); removed from the outbox.
    pub rejected: u64,
    /// When the server last acknowledged a message (unix seconds).
    pub last_ack_unix: Option<u64>,
}

/// Certificate part of the status.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CertStatus {
    /// Serial (hex) of the certificate in use.
    pub serial: String,
    /// Expiry (unix seconds).
    pub not_after_unix: i64,
    /// When renewal is (or was) due (unix seconds); `None` when renewal is disabled.
    pub renew_at_unix: Option<i64>,
    /// Successful renewals since start.
    pub renewals: u64,
    /// Last renewal failure (no secrets).
    pub last_renewal_error: Option<String>,
}

/// Everything the agent reports.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct AgentStatus {
    /// Agent process id.
    pub pid: u32,
    /// Agent version.
    pub version: String,
    /// When the agent started (unix seconds).
    pub started_unix: u64,
    /// When this status was written (unix seconds).
    pub updated_unix: u64,
    /// Device id.
    pub device_id: String,
    /// Local socket path.
    pub socket: String,
    /// Connection.
    pub connection: Connection,
    /// Outbox.
    pub outbox: OutboxStats,
    /// MQTT counters.
    pub mqtt: MqttStatus,
    /// TLS counters.
    pub tls: TlsStatus,
    /// Certificate.
    pub certificate: CertStatus,
}

/// Write `status` to `dir/agent-status.json` atomically (temp file + rename, 0640).
pub fn write_status(dir: &Path, status: &AgentStatus) -> std::io::Result<()> {
    let json = serde_json::to_vec_pretty(status).map_err(std::io::Error::other)?;
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{STATUS_FILE}.{}.{n}.tmp", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o640)
        .open(&tmp)?;
    let result = f
        .write_all(&json)
        .and_then(|()| std::fs::rename(&tmp, dir.join(STATUS_FILE)));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Read the status file of the agent working on state dir `dir`, if any.
pub fn read_status(dir: &Path) -> Option<AgentStatus> {
    let bytes = std::fs::read(dir.join(STATUS_FILE)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Whether the process that wrote `status` still runs (same pid, a `devid` process).
pub fn agent_alive(status: &AgentStatus) -> bool {
    std::fs::read_to_string(format!("/proc/{}/comm", status.pid))
        .map(|c| c.trim() == "devid" || c.trim().starts_with("devid"))
        .unwrap_or(false)
}
