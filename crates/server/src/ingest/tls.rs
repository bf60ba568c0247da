//! The MQTT listener's TLS: rustls, TLS 1.3 (1.2 only when `mqtt.tls12`), the server
//! certificate of the data dir, and a client certificate REQUIRED and chained to the fleet CA
//! (`WebPkiClientVerifier`: signature, validity period, clientAuth EKU). What the certificate
//! names is checked afterwards against the registry ([`identity_of`] and the session).

use std::sync::Arc;

use devid_proto::DeviceId;
use rustls::pki_types::CertificateDer;
use rustls::server::WebPkiClientVerifier;
use sha2::{Digest, Sha256};
use x509_parser::prelude::GeneralName;

use crate::ca::Ca;
use crate::config::ServerConfig;
use crate::serve::{fleet_roots, provider, server_identity, ServeError};

/// Build the MQTT TLS server config.
pub fn server_config(cfg: &ServerConfig, ca: &Ca) -> Result<Arc<rustls::ServerConfig>, ServeError> {
    let (chain, key) = server_identity(cfg)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(fleet_roots(ca)?, provider())
        .build()
        .map_err(|e| ServeError::Tls(format!("client verifier: {e}")))?;
    let versions: &[&'static rustls::SupportedProtocolVersion] = if cfg.mqtt.tls12 {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13]
    };
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .map_err(|e| ServeError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| ServeError::Tls(format!("server certificate and key: {e}")))?;
    // One ticket per handshake (rustls sends two by default): a device reconnects with the
    // newest one, and each resumed connection brings a fresh ticket.
    config.send_tls13_tickets = 1;
    // RFC 9149: a client may ask for fewer tickets (none, when it never resumes); honour
    // that, up to the same one.
    config.max_tls13_tickets = 1;
    // Our suite order (AES-128-GCM first, see serve::provider), not the client's.
    config.ignore_client_order = true;
    // A resumed session still passes the registry check at CONNECT, and the certificate's
    // expiry is checked there too.
    // Stateless TLS 1.3 tickets (encrypted with a rotating key held only in memory): resumption
    // works without a server-side cache entry per session, which held a copy of every client
    // certificate chain (~0.8 KiB per ticket, two tickets per handshake).
    config.ticketer = rustls::crypto::ring::Ticketer::new()
        .map_err(|e| ServeError::Tls(format!("session ticket key: {e}")))?;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(Arc::new(config))
}

/// What a verified client certificate says about its holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The device: the single `urn:devid:<id>` SAN URI, else the CN when it is a device id.
    pub device: Option<DeviceId>,
    /// Hex SHA-256 of the certificate's SubjectPublicKeyInfo (as the registry stores it).
    pub key_fingerprint: String,
    /// Expiry, ms since the epoch.
    pub not_after_ms: i64,
}

/// Read the identity from a (verified) leaf certificate.
pub fn identity_of(der: &CertificateDer<'_>) -> Option<PeerIdentity> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let mut uris = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::URI(u) = n {
                if u.starts_with(devid_proto::DEVICE_URI_PREFIX) {
                    uris.push(*u);
                }
            }
        }
    }
    let device = match uris.as_slice() {
        [one] => DeviceId::from_uri(one),
        [] => cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .and_then(|cn| DeviceId::parse(cn).ok()),
        _ => None,
    };
    Some(PeerIdentity {
        device,
        key_fingerprint: hex::encode(Sha256::digest(cert.public_key().raw)),
        not_after_ms: cert.validity().not_after.timestamp().saturating_mul(1000),
    })
}

/// A stable reason code for a failed TLS handshake.
pub fn failure_reason(e: &std::io::Error) -> &'static str {
    use rustls::CertificateError as C;
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::NoCertificatesPresented) => "tls_no_client_cert",
        Some(rustls::Error::InvalidCertificate(c)) => match c {
            C::UnknownIssuer => "tls_unknown_ca",
            C::Expired | C::ExpiredContext { .. } => "tls_cert_expired",
            C::NotValidYet | C::NotValidYetContext { .. } => "tls_cert_not_yet_valid",
            C::BadSignature => "tls_bad_signature",
            C::InvalidPurpose | C::InvalidPurposeContext { .. } => "tls_cert_wrong_purpose",
            _ => "tls_invalid_cert",
        },
        Some(rustls::Error::PeerIncompatible(_)) => "tls_incompatible",
        Some(rustls::Error::AlertReceived(_)) => "tls_alert_received",
        Some(_) => "tls_error",
        None if e.kind() == std::io::ErrorKind::UnexpectedEof => "tls_eof",
        None => "tls_io",
    }
}

/// Whether a handshake failure is about the client's certificate (worth an audit row).
pub fn is_certificate_failure(reason: &str) -> bool {
    matches!(
        reason,
        "tls_no_client_cert"
            | "tls_unknown_ca"
            | "tls_cert_expired"
            | "tls_cert_not_yet_valid"
            | "tls_bad_signature"
            | "tls_cert_wrong_purpose"
            | "tls_invalid_cert"
    )
}
