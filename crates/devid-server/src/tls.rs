//! The server's TLS configurations, built from the data dir: its certificate chain and key
//! (`server.pem`, `server-key.pem`) and the fleet CA as the only trust anchor for client
//! certificates. HTTPS makes client certificates optional (enrolment has none, renewal needs
//! one); MQTT requires one.

use std::sync::Arc;

use devid_ca::Ca;
use devid_server_config::{ServerConfig, SERVER_CERT_FILE, SERVER_KEY_FILE};
use devid_stdx::fs as fsutil;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use crate::error::RunError;

/// The rustls provider of both listeners.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::cipher_suite as cs;
    // AES-128-GCM with SHA-256 first: TLS 1.3's mandatory suite, 128-bit security like the
    // P-256 keys it protects, and cheaper than AES-256/SHA-384 on both ends (SHA-256 has
    // hardware support on current x86 and ARMv8 CPUs, SHA-384 mostly not; fewer AES rounds).
    // The handshake's key schedule and every record cost less; a client that prefers another
    // suite of the list still gets it only if it offers nothing else.
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

fn io(path: &std::path::Path, source: std::io::Error) -> RunError {
    RunError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The server's certificate chain and key from the data dir, for both listeners.
fn server_identity(
    cfg: &ServerConfig,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), RunError> {
    let cert_path = cfg.path(SERVER_CERT_FILE);
    let key_path = cfg.path(SERVER_KEY_FILE);
    let chain_pem = std::fs::read(&cert_path).map_err(|e| io(&cert_path, e))?;
    let chain = CertificateDer::pem_slice_iter(&chain_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| RunError::Tls(format!("{}: {e}", cert_path.display())))?;
    if chain.is_empty() {
        return Err(RunError::Tls(format!(
            "{} holds no certificate",
            cert_path.display()
        )));
    }
    let key_pem =
        zeroize::Zeroizing::new(fsutil::read_private(&key_path).map_err(|e| io(&key_path, e))?);
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| RunError::Tls(format!("{}: {e}", key_path.display())))?;
    Ok((chain, key))
}

/// Trust anchors for client certificates: the fleet CA alone.
fn fleet_roots(ca: &Ca) -> Result<Arc<RootCertStore>, RunError> {
    let mut roots = RootCertStore::empty();
    roots
        .add(ca.cert_der().clone())
        .map_err(|e| RunError::Tls(format!("CA certificate: {e}")))?;
    Ok(Arc::new(roots))
}

/// The HTTPS listener's config: client certificates optional, verified against `ca`.
pub fn https_config(cfg: &ServerConfig, ca: &Ca) -> Result<Arc<rustls::ServerConfig>, RunError> {
    let (chain, key) = server_identity(cfg)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(fleet_roots(ca)?, provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| RunError::Tls(format!("client verifier: {e}")))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| RunError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| RunError::Tls(format!("server certificate and key: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The MQTT listener's config: TLS 1.3 (1.2 only when `mqtt.tls12`), a client certificate
/// REQUIRED and chained to `ca` (signature, validity period, clientAuth EKU). What the
/// certificate names is checked afterwards against the registry, at every CONNECT.
pub fn mqtt_config(cfg: &ServerConfig, ca: &Ca) -> Result<Arc<rustls::ServerConfig>, RunError> {
    let (chain, key) = server_identity(cfg)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(fleet_roots(ca)?, provider())
        .build()
        .map_err(|e| RunError::Tls(format!("client verifier: {e}")))?;
    let versions: &[&'static rustls::SupportedProtocolVersion] = if cfg.mqtt.tls12 {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13]
    };
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .map_err(|e| RunError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| RunError::Tls(format!("server certificate and key: {e}")))?;
    // One ticket per handshake (rustls sends two by default): a device reconnects with the
    // newest one, and each resumed connection brings a fresh ticket.
    config.send_tls13_tickets = 1;
    // RFC 9149: a client may ask for fewer tickets (none, when it never resumes); honour
    // that, up to the same one.
    config.max_tls13_tickets = 1;
    // Our suite order (AES-128-GCM first, see provider), not the client's.
    config.ignore_client_order = true;
    // A resumed session still passes the registry check at CONNECT, and the certificate's
    // expiry is checked there too.
    // Stateless TLS 1.3 tickets (encrypted with a rotating key held only in memory): resumption
    // works without a server-side cache entry per session, which held a copy of every client
    // certificate chain (~0.8 KiB per ticket, two tickets per handshake).
    config.ticketer = rustls::crypto::ring::Ticketer::new()
        .map_err(|e| RunError::Tls(format!("session ticket key: {e}")))?;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(Arc::new(config))
}
