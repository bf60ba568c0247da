//! TLS pieces shared by every devid component that talks to the server:
//!
//! * [`KeystoreSigningKey`]: a rustls signing key whose signatures are made by a devid
//!   keystore (TPM, PKCS#11 token or soft key); the private key never exists in this process
//!   (soft backend aside). Written once here, used for enrolment renewal and the agent's MQTT
//!   connection. Each signature is counted ([`KeystoreSigningKey::signatures`]) so the agent
//!   can report how many TPM signatures its reconnects cost.
//! * [`PinnedCaVerifier`]: trusts a server only when its chain holds the certificate whose
//!   SHA-256 equals the sealed CA pin and the leaf verifies against it for the host name.
//! * [`client_config`]: a rustls client config from those two.
//! * [`identity`]: the one rule mapping a certificate to a device id, shared by the server's
//!   HTTPS and MQTT listeners and the device's check of its issued chain.
#![forbid(unsafe_code)]

pub mod identity;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use devid_keystore::Keystore;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, SubjectPublicKeyInfoDer, UnixTime};
use rustls::sign::{CertifiedKey, Signer, SigningKey};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureAlgorithm, SignatureScheme};
use sha2::{Digest, Sha256};

/// Errors building TLS configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The CA pin is not 64 hex characters.
    #[error("invalid CA pin: expected 64 hex characters (SHA-256 of the CA certificate DER)")]
    InvalidPin,
    /// The certificate chain is empty, unparsable, or does not match the keystore's key.
    #[error("device certificate: {0}")]
    Certificate(String),
    /// rustls refused the configuration.
    #[error("TLS setup: {0}")]
    Setup(String),
}

/// Parse a hex CA pin.
pub fn parse_pin(hex_pin: &str) -> Result<[u8; 32], TlsError> {
    let bytes = hex::decode(hex_pin.trim()).map_err(|_| TlsError::InvalidPin)?;
    bytes.try_into().map_err(|_| TlsError::InvalidPin)
}

/// The crypto provider devid uses on devices (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Trusts a server only when its chain holds the pinned CA and the leaf verifies against it.
#[derive(Debug)]
pub struct PinnedCaVerifier {
    /// SHA-256 of the CA certificate DER.
    pub pin: [u8; 32],
    /// Crypto provider for the signature checks.
    pub provider: Arc<CryptoProvider>,
    /// Set when a server presented no certificate with the pinned hash (to tell "wrong
    /// server or pin" apart from other TLS failures).
    pub mismatch: Arc<AtomicBool>,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .chain(std::iter::once(end_entity))
            .find(|c| <[u8; 32]>::from(Sha256::digest(c.as_ref())) == self.pin);
        let Some(ca) = ca else {
            self.mismatch.store(true, Ordering::SeqCst);
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ));
        };
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(format!("pinned CA: {e}")))?;
        inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .map_err(clock_hint)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Presents the device certificate; the handshake signature is made by the keystore.
#[derive(Debug)]
pub struct KeystoreClientCert {
    /// The chain and the keystore-backed key.
    pub certified: Arc<CertifiedKey>,
}

impl ResolvesClientCert for KeystoreClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        sigschemes
            .contains(&SignatureScheme::ECDSA_NISTP256_SHA256)
            .then(|| self.certified.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A rustls signing key backed by a devid keystore (TPM, PKCS#11 or soft).
#[derive(Debug, Clone)]
pub struct KeystoreSigningKey {
    keystore: Arc<dyn Keystore>,
    signatures: Arc<AtomicU64>,
}

impl KeystoreSigningKey {
    /// Wrap a keystore.
    pub fn new(keystore: Arc<dyn Keystore>) -> Self {
        Self {
            keystore,
            signatures: Arc::new(AtomicU64::new(0)),
        }
    }

    /// How many handshake signatures the keystore made through this key.
    pub fn signatures(&self) -> u64 {
        self.signatures.load(Ordering::Relaxed)
    }
}

impl SigningKey for KeystoreSigningKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        offered
            .contains(&SignatureScheme::ECDSA_NISTP256_SHA256)
            .then(|| {
                Box::new(KeystoreSigner(
                    self.keystore.clone(),
                    self.signatures.clone(),
                )) as Box<dyn Signer>
            })
    }

    fn public_key(&self) -> Option<SubjectPublicKeyInfoDer<'_>> {
        Some(SubjectPublicKeyInfoDer::from(devid_keystore::spki_der(
            &self.keystore.public_key(),
        )))
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        SignatureAlgorithm::ECDSA
    }
}

#[derive(Debug)]
struct KeystoreSigner(Arc<dyn Keystore>, Arc<AtomicU64>);

impl Signer for KeystoreSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        self.1.fetch_add(1, Ordering::Relaxed);
        self.0
            .sign(message)
            .map(|s| s.to_der().as_bytes().to_vec())
            .map_err(|e| rustls::Error::General(format!("keystore signature: {e}")))
    }

    fn scheme(&self) -> SignatureScheme {
        SignatureScheme::ECDSA_NISTP256_SHA256
    }
}

/// Parse a PEM certificate chain.
pub fn parse_chain(chain_pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Certificate(format!("unparsable PEM chain: {e}")))?;
    if chain.is_empty() {
        return Err(TlsError::Certificate("empty chain".into()));
    }
    Ok(chain)
}

/// A client certificate resolver presenting `chain_pem` with signatures from `key`. Fails when
/// the leaf's public key is not the keystore's.
pub fn client_cert(
    chain_pem: &str,
    key: KeystoreSigningKey,
) -> Result<Arc<KeystoreClientCert>, TlsError> {
    let certified = CertifiedKey::new(parse_chain(chain_pem)?, Arc::new(key));
    certified.keys_match().map_err(|_| {
        TlsError::Certificate("the certificate's public key is not this device's key".into())
    })?;
    Ok(Arc::new(KeystoreClientCert {
        certified: Arc::new(certified),
    }))
}

/// A TLS 1.3/1.2 client config that trusts only the pinned CA, with an optional client
/// certificate. Returns the config and the "pin mismatch" flag of its verifier.
pub fn client_config(
    ca_pin_hex: &str,
    client: Option<Arc<dyn ResolvesClientCert>>,
) -> Result<(rustls::ClientConfig, Arc<AtomicBool>), TlsError> {
    let pin = parse_pin(ca_pin_hex)?;
    let provider = provider();
    let mismatch = Arc::new(AtomicBool::new(false));
    let verifier = Arc::new(PinnedCaVerifier {
        pin,
        provider: provider.clone(),
        mismatch: mismatch.clone(),
    });
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let config = match client {
        Some(c) => builder.with_client_cert_resolver(c),
        None => builder.with_no_client_auth(),
    };
    Ok((config, mismatch))
}
/// A server certificate outside its validity at this device's clock says so plainly: on a
/// board without an RTC (or before NTP) that is the device's clock, not the server.
fn clock_hint(e: rustls::Error) -> rustls::Error {
    use rustls::CertificateError as C;
    let detail = match &e {
        rustls::Error::InvalidCertificate(C::ExpiredContext { time, not_after }) => format!(
            "expired: this device's clock says {} (UNIX seconds), the certificate ends at {}",
            time.as_secs(),
            not_after.as_secs()
        ),
        rustls::Error::InvalidCertificate(C::NotValidYetContext { time, not_before }) => format!(
            "not valid yet: this device's clock says {} (UNIX seconds), the certificate starts \
             at {}",
            time.as_secs(),
            not_before.as_secs()
        ),
        rustls::Error::InvalidCertificate(C::Expired) => "expired at this device's time".into(),
        rustls::Error::InvalidCertificate(C::NotValidYet) => {
            "not valid yet at this device's time".into()
        }
        _ => return e,
    };
    rustls::Error::General(format!(
        "the server's certificate is {detail}; check this device's clock (a board without a \
         real-time clock, or NTP not synced yet), set it and retry"
    ))
}
