//! The blocking HTTPS client behind the admin subcommands (`token create`, `device ...`,
//! `audit`). It trusts only the fleet CA (`DATA_DIR/ca.pem`) and sends the bearer token from
//! `DATA_DIR/admin.token`.
//!
//! Invariants: links no server crate but the configuration's (it reads `devid-server.toml`
//! to find the server) and the wire types of `devid-proto`: no database driver, no HTTP
//! server framework, no PKCS#11. The CLI's admin subcommands and the benchmark use it.
#![forbid(unsafe_code)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use devid_proto::{
    AuditEntry, CredentialCreateRequest, CredentialCreateResponse, CredentialInfo, DeviceInfo,
    ErrorBody, TokenCreateRequest, TokenCreateResponse,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use zeroize::Zeroizing;

use devid_server_config::{ConfigError, ServerConfig, ADMIN_TOKEN_FILE, CA_CERT_FILE};
use devid_stdx::fs as fsutil;

mod messages;

pub use messages::MessagesClient;

/// The rustls provider of the admin clients: ring, its default suites.
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Errors of the admin client. Messages never carry the admin token.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// A file of the data dir could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The config could not be read.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// TLS setup failed.
    #[error("TLS setup: {0}")]
    Tls(String),
    /// The server could not be reached.
    #[error("cannot reach the devid server at {url}: {detail}; is `devid-server run` running?")]
    Connect {
        /// The URL.
        url: String,
        /// The transport's words.
        detail: String,
    },
    /// The server refused the request.
    #[error("server refused ({status} {code}): {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// The error code.
        code: String,
        /// The server's message.
        message: String,
    },
    /// The server's answer could not be read.
    #[error("unexpected answer from the server: {0}")]
    Response(String),
}

/// A state change the admin can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateAction {
    /// Refuse the device until resumed.
    Suspend,
    /// Make a suspended device active again.
    Resume,
    /// Refuse the device for good.
    Revoke,
}

impl StateAction {
    fn path(self) -> &'static str {
        match self {
            StateAction::Suspend => "suspend",
            StateAction::Resume => "resume",
            StateAction::Revoke => "revoke",
        }
    }
}

/// A client of the admin API.
pub struct AdminClient {
    agent: ureq::Agent,
    base: String,
    bearer: Zeroizing<String>,
}

impl std::fmt::Debug for AdminClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminClient")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl AdminClient {
    /// A client for the server whose data dir is `dir` (config, `ca.pem`, `admin.token`),
    /// at `server_url` or the config's local HTTPS URL.
    pub fn from_data_dir(dir: &Path, server_url: Option<&str>) -> Result<Self, AdminError> {
        Self::from_data_dir_with(dir, server_url, None)
    }

    /// [`AdminClient::from_data_dir`], authenticating with the named credential whose token is
    /// in `token_file` instead of `DATA_DIR/admin.token`.
    pub fn from_data_dir_with(
        dir: &Path,
        server_url: Option<&str>,
        token_file: Option<&Path>,
    ) -> Result<Self, AdminError> {
        let cfg = ServerConfig::load_from_data_dir(dir)?;
        let ca_path = dir.join(CA_CERT_FILE);
        let ca_pem = std::fs::read(&ca_path).map_err(|source| AdminError::Io {
            path: ca_path.display().to_string(),
            source,
        })?;
        let tok_path = token_file
            .map(Path::to_path_buf)
            .unwrap_or_else(|| dir.join(ADMIN_TOKEN_FILE));
        let token =
            Zeroizing::new(
                fsutil::read_private(&tok_path).map_err(|source| AdminError::Io {
                    path: tok_path.display().to_string(),
                    source,
                })?,
            );
        let token = Zeroizing::new(String::from_utf8_lossy(&token).trim().to_owned());
        let url = server_url
            .map(str::to_owned)
            .unwrap_or_else(|| cfg.local_admin_url());
        Self::new(&url, &ca_pem, token)
    }

    /// A client for `base_url`, trusting only the CA certificates in `ca_pem`.
    pub fn new(
        base_url: &str,
        ca_pem: &[u8],
        bearer: Zeroizing<String>,
    ) -> Result<Self, AdminError> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem) {
            let cert = cert.map_err(|e| AdminError::Tls(format!("CA PEM: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| AdminError::Tls(format!("CA certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(AdminError::Tls("the CA file holds no certificate".into()));
        }
        let tls = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| AdminError::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let agent = ureq::AgentBuilder::new()
            .tls_config(Arc::new(tls))
            .timeout(Duration::from_secs(30))
            .build();
        Ok(Self {
            agent,
            base: base_url.trim_end_matches('/').to_owned(),
            bearer,
        })
    }

    fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<T, AdminError> {
        let url = format!("{}{path}", self.base);
        let req = self
            .agent
            .request(method, &url)
            .set("Authorization", &format!("Bearer {}", self.bearer.as_str()));
        let result = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        api_response(&self.base, result)?
            .into_json::<T>()
            .map_err(|e| AdminError::Response(e.to_string()))
    }

    /// Create a named admin credential; the answer holds its token (shown once).
    pub fn create_credential(
        &self,
        name: &str,
        read_only: bool,
    ) -> Result<CredentialCreateResponse, AdminError> {
        let body = serde_json::to_value(CredentialCreateRequest {
            name: name.to_owned(),
            read_only,
        })
        .map_err(|e| AdminError::Response(e.to_string()))?;
        self.call("POST", "/v1/admin/credentials", Some(body))
    }

    /// Every admin credential (never their tokens).
    pub fn credentials(&self) -> Result<Vec<CredentialInfo>, AdminError> {
        self.call("GET", "/v1/admin/credentials", None)
    }

    /// Revoke the credential `name`.
    pub fn revoke_credential(&self, name: &str) -> Result<(), AdminError> {
        let url = format!(
            "{}/v1/admin/credentials/{}/revoke",
            self.base,
            path_segment(name)
        );
        let result = self
            .agent
            .request("POST", &url)
            .set("Authorization", &format!("Bearer {}", self.bearer.as_str()))
            .call();
        api_response(&self.base, result).map(|_| ())
    }

    /// Create a one-time enrolment token.
    pub fn create_token(
        &self,
        req: &TokenCreateRequest,
    ) -> Result<TokenCreateResponse, AdminError> {
        let body = serde_json::to_value(req).map_err(|e| AdminError::Response(e.to_string()))?;
        self.call("POST", "/v1/admin/tokens", Some(body))
    }

    /// Every device.
    pub fn devices(&self) -> Result<Vec<DeviceInfo>, AdminError> {
        self.call("GET", "/v1/admin/devices", None)
    }

    /// One device.
    pub fn device(&self, id: &str) -> Result<DeviceInfo, AdminError> {
        self.call(
            "GET",
            &format!("/v1/admin/devices/{}", path_segment(id)),
            None,
        )
    }

    /// Suspend, resume or revoke a device.
    pub fn set_state(&self, id: &str, action: StateAction) -> Result<DeviceInfo, AdminError> {
        self.call(
            "POST",
            &format!("/v1/admin/devices/{}/{}", path_segment(id), action.path()),
            Some(serde_json::json!({})),
        )
    }

    /// Forget a device's registered TPM attestation (after a TPM swap).
    pub fn reset_attestation(&self, id: &str) -> Result<DeviceInfo, AdminError> {
        self.call(
            "POST",
            &format!("/v1/admin/devices/{}/reset-attestation", path_segment(id)),
            Some(serde_json::json!({})),
        )
    }

    /// The newest `limit` audit rows, oldest first.
    pub fn audit(&self, limit: u32, device: Option<&str>) -> Result<Vec<AuditEntry>, AdminError> {
        let mut path = format!("/v1/admin/audit?limit={limit}");
        if let Some(d) = device {
            path.push_str("&device_id=");
            path.push_str(&path_segment(d));
        }
        self.call("GET", &path, None)
    }
}

/// Keep only characters a device id may have so a bad id cannot change the path.
fn path_segment(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A response from the API at `base`, or the error it answered with (code and message from its
/// JSON error body) or the transport failure.
pub(crate) fn api_response(
    base: &str,
    result: Result<ureq::Response, ureq::Error>,
) -> Result<ureq::Response, AdminError> {
    match result {
        Ok(r) => Ok(r),
        Err(ureq::Error::Status(status, resp)) => {
            let body: Option<ErrorBody> = resp.into_json().ok();
            Err(AdminError::Api {
                status,
                code: body.as_ref().map(|b| b.code.clone()).unwrap_or_default(),
                message: body.map(|b| b.error).unwrap_or_default(),
            })
        }
        Err(ureq::Error::Transport(t)) => Err(AdminError::Connect {
            url: base.to_owned(),
            detail: t.to_string(),
        }),
    }
}
