//! The blocking client behind `devid-server messages list|tail` (and `/metrics` for
//! scripts): HTTPS to the admin API, trusting only the fleet CA, with the admin bearer token
//! of the data dir.

use std::io::BufRead;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use zeroize::Zeroizing;

use devid_proto::{MessagePage, MessageView};
use devid_server_config::{ServerConfig, ADMIN_TOKEN_FILE, CA_CERT_FILE};
use devid_stdx::fs as fsutil;

use crate::AdminError;

/// A client of the telemetry routes.
pub struct MessagesClient {
    agent: ureq::Agent,
    stream_agent: ureq::Agent,
    base: String,
    bearer: Zeroizing<String>,
}

impl std::fmt::Debug for MessagesClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MessagesClient")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> AdminError + '_ {
    move |source| AdminError::Io {
        path: path.display().to_string(),
        source,
    }
}

impl MessagesClient {
    /// A client for the server whose data dir is `dir`, at `server_url` or the config's local
    /// HTTPS URL.
    pub fn from_data_dir(dir: &Path, server_url: Option<&str>) -> Result<Self, AdminError> {
        let cfg = ServerConfig::load_from_data_dir(dir)?;
        let ca_path = dir.join(CA_CERT_FILE);
        let ca_pem = std::fs::read(&ca_path).map_err(io_err(&ca_path))?;
        let tok_path = dir.join(ADMIN_TOKEN_FILE);
        let raw = Zeroizing::new(fsutil::read_private(&tok_path).map_err(io_err(&tok_path))?);
        let bearer = Zeroizing::new(String::from_utf8_lossy(&raw).trim().to_owned());
        let url = server_url
            .map(str::to_owned)
            .unwrap_or_else(|| cfg.local_admin_url());
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&ca_pem) {
            let cert = cert.map_err(|e| AdminError::Tls(format!("CA PEM: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| AdminError::Tls(format!("CA certificate: {e}")))?;
        }
        let tls = Arc::new(
            rustls::ClientConfig::builder_with_provider(crate::provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| AdminError::Tls(e.to_string()))?
                .with_root_certificates(roots)
                .with_no_client_auth(),
        );
        let agent = ureq::AgentBuilder::new()
            .tls_config(tls.clone())
            .timeout(Duration::from_secs(30))
            .build();
        // the stream has no overall deadline; keep-alive comments arrive every 15 s
        let stream_agent = ureq::AgentBuilder::new()
            .tls_config(tls)
            .timeout_connect(Duration::from_secs(10))
            .timeout_read(Duration::from_secs(60))
            .build();
        Ok(Self {
            agent,
            stream_agent,
            base: url.trim_end_matches('/').to_owned(),
            bearer,
        })
    }

    fn get(&self, agent: &ureq::Agent, path: &str) -> Result<ureq::Response, AdminError> {
        let url = format!("{}{path}", self.base);
        let result = agent
            .get(&url)
            .set("Authorization", &format!("Bearer {}", self.bearer.as_str()))
            .call();
        crate::api_response(&self.base, result)
    }

    /// One page of a device's messages (see `GET /v1/devices/{id}/messages`).
    pub fn list(
        &self,
        device: &str,
        since: Option<i64>,
        limit: u32,
    ) -> Result<MessagePage, AdminError> {
        if devid_proto::DeviceId::parse(device).is_err() {
            return Err(AdminError::Response(format!(
                "invalid device id {device:?}: use lowercase a-z, 0-9 and '-'"
            )));
        }
        let mut path = format!("/v1/devices/{device}/messages?limit={limit}");
        if let Some(s) = since {
            path.push_str(&format!("&since={s}"));
        }
        self.get(&self.agent, &path)?
            .into_json()
            .map_err(|e| AdminError::Response(e.to_string()))
    }

    /// The metrics text.
    pub fn metrics(&self) -> Result<String, AdminError> {
        self.get(&self.agent, "/metrics")?
            .into_string()
            .map_err(|e| AdminError::Response(e.to_string()))
    }

    /// Follow the live stream, calling `each` for every message until it returns false or
    /// the server closes the stream.
    pub fn tail(
        &self,
        device: Option<&str>,
        mut each: impl FnMut(MessageView) -> bool,
    ) -> Result<(), AdminError> {
        let path = match device {
            Some(d) => {
                if devid_proto::DeviceId::parse(d).is_err() {
                    return Err(AdminError::Response(format!(
                        "invalid device id {d:?}: use lowercase a-z, 0-9 and '-'"
                    )));
                }
                format!("/v1/stream?device={d}")
            }
            None => "/v1/stream".to_owned(),
        };
        let resp = self.get(&self.stream_agent, &path)?;
        let reader = std::io::BufReader::new(resp.into_reader());
        let mut event = String::new();
        let mut data = String::new();
        for line in reader.lines() {
            let line = line.map_err(|e| AdminError::Connect {
                url: self.base.clone(),
                detail: format!("stream broke: {e}"),
            })?;
            if line.is_empty() {
                if event == "message" {
                    let m: MessageView = serde_json::from_str(&data)
                        .map_err(|e| AdminError::Response(format!("stream event: {e}")))?;
                    if !each(m) {
                        return Ok(());
                    }
                } else if event == "lagged" {
                    tracing::warn!(skipped = %data, "the stream skipped messages (reader too slow)");
                }
                event.clear();
                data.clear();
            } else if let Some(v) = line.strip_prefix("event:") {
                event = v.trim_start().to_owned();
            } else if let Some(v) = line.strip_prefix("data:") {
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(v.strip_prefix(' ').unwrap_or(v));
            }
        }
        Ok(())
    }
}
