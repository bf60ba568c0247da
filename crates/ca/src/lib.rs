//! The fleet certificate authority: an ECDSA P-256 key that signs device certificates and the
//! server's own TLS certificate. The key is a 0600 PKCS#8 file in the data dir, or lives on a
//! PKCS#11 token (generated there by `devid-server init --ca-key pkcs11:...`, never
//! extractable): then every certificate is signed by the token through
//! [`devid_keystore_pkcs11::Pkcs11Keystore`], and no CA private key is ever on disk.
//!
//! * this file: [`Ca`] (generate, load, issue device and server certificates), [`cert_pin`];
//! * [`csr`]: parsing and the proof-of-possession check of the PKCS#10 requests devices send.
//!
//! Invariants: never holds a device's private key; the paths it reads are handed to it by
//! the composition root; a CA key file is read into zeroizing memory and kept only as the
//! signing key.
#![forbid(unsafe_code)]

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use devid_keystore::Keystore;
use devid_keystore_pkcs11::{Pkcs11Config, Pkcs11Keystore};
use devid_proto::DeviceId;
use rand_core::{OsRng, RngCore};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber, SubjectPublicKeyInfo,
    PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::{pem::PemObject, CertificateDer};
use sha2::{Digest, Sha256};

use devid_server_config::{CaKeyRef, Pkcs11KeyUri};
use devid_stdx::fs as fsutil;
use devid_stdx::time::datetime;
pub use devid_store::IssuedCert;

pub mod csr;

/// Errors of the CA.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// A CA file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A CA file is not what it should be.
    #[error("invalid {what}: {detail}")]
    Invalid {
        /// Which file or value.
        what: &'static str,
        /// Why.
        detail: String,
    },
    /// The PKCS#11 token holding the CA key failed or refused.
    #[error("CA key on the PKCS#11 token: cannot {operation}: {detail}")]
    Token {
        /// What was being done.
        operation: &'static str,
        /// The keystore's words (never the PIN).
        detail: String,
    },
    /// Certificate generation failed.
    #[error("cannot {operation}: {detail}")]
    Issue {
        /// What was being made.
        operation: &'static str,
        /// rcgen's words.
        detail: String,
    },
}

impl From<CaError> for devid_store::IssueError {
    fn from(e: CaError) -> Self {
        devid_store::IssueError(e.to_string())
    }
}

fn io(path: &Path, source: std::io::Error) -> CaError {
    CaError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The fleet CA.
pub struct Ca {
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    issuer: Issuer<'static, CaKey>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("pin", &self.pin())
            .field("key", &self.key_kind())
            .finish()
    }
}

/// The CA's signing key: in memory (from the 0600 file) or on a PKCS#11 token.
enum CaKey {
    File(KeyPair),
    Token(TokenKey),
}

/// A P-256 key on a PKCS#11 token, as an rcgen remote signing key.
struct TokenKey {
    keystore: Arc<Pkcs11Keystore>,
    /// The SEC1 uncompressed point: what rcgen wants as an EC key's public bytes.
    point: Vec<u8>,
    /// The full RFC 7512 reference (token serial and key id included).
    uri: Pkcs11KeyUri,
}

impl TokenKey {
    fn new(keystore: Pkcs11Keystore, uri: Pkcs11KeyUri) -> Self {
        let point = p256::EncodedPoint::from(keystore.public_key())
            .as_bytes()
            .to_vec();
        Self {
            keystore: Arc::new(keystore),
            point,
            uri,
        }
    }
}

impl rcgen::PublicKeyData for CaKey {
    fn der_bytes(&self) -> &[u8] {
        match self {
            CaKey::File(k) => k.der_bytes(),
            CaKey::Token(t) => &t.point,
        }
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            CaKey::File(k) => k.algorithm(),
            CaKey::Token(_) => &PKCS_ECDSA_P256_SHA256,
        }
    }
}

impl rcgen::SigningKey for CaKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        match self {
            CaKey::File(k) => k.sign(msg),
            CaKey::Token(t) => {
                let started = std::time::Instant::now();
                let sig = t.keystore.sign(msg).map_err(|e| {
                    // rcgen's error carries no detail: the log has the cause.
                    tracing::error!(error = %e, token = %t.uri.token, "CA signing on the PKCS#11 token failed");
                    rcgen::Error::RemoteKeyError
                })?;
                tracing::debug!(
                    micros = started.elapsed().as_micros() as u64,
                    "CA signature made on the PKCS#11 token"
                );
                Ok(sig.to_der().as_bytes().to_vec())
            }
        }
    }
}

fn token_err(operation: &'static str) -> impl Fn(devid_keystore::KeystoreError) -> CaError {
    move |e| CaError::Token {
        operation,
        detail: e.to_string(),
    }
}

/// Hex SHA-256 of a certificate's DER: the pin devices check.
pub fn cert_pin(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

fn random_serial() -> SerialNumber {
    let mut b = [0u8; 16];
    OsRng.fill_bytes(&mut b);
    // positive and always 16 bytes long
    b[0] = (b[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&b)
}

fn read_cert(cert_path: &Path) -> Result<(String, CertificateDer<'static>), CaError> {
    let cert_pem = std::fs::read_to_string(cert_path).map_err(|e| io(cert_path, e))?;
    let cert_der =
        CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| CaError::Invalid {
            what: "CA certificate",
            detail: format!("{}: {e}", cert_path.display()),
        })?;
    Ok((cert_pem, cert_der))
}

fn issue_err(operation: &'static str) -> impl Fn(rcgen::Error) -> CaError {
    move |e| CaError::Issue {
        operation,
        detail: e.to_string(),
    }
}

impl Ca {
    /// Make a new CA for the fleet served at `hostname`, its key in memory (saved to a 0600
    /// file by [`Ca::save`]).
    pub fn generate(hostname: &str, now_ms: i64) -> Result<Self, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(issue_err("generate the CA key"))?;
        Self::self_signed(hostname, now_ms, CaKey::File(key))
    }

    /// Make a new CA whose key is generated ON the PKCS#11 token `uri` names (its `serial` and
    /// `id`, when given, are ignored: a new key gets a new id). Returns the CA and the full
    /// reference to record (`ca_key` in the config). The private key never leaves the token.
    pub fn generate_on_token(
        hostname: &str,
        now_ms: i64,
        uri: &Pkcs11KeyUri,
    ) -> Result<(Self, Pkcs11KeyUri), CaError> {
        let (keystore, config) =
            Pkcs11Keystore::create(&uri.module_path, &uri.token, &uri.pin_file)
                .map_err(token_err("generate the CA key"))?;
        let full = Pkcs11KeyUri {
            token: config.token_label.clone(),
            serial: Some(config.token_serial.clone()),
            id: Some(hex::decode(&config.key_id).map_err(|e| CaError::Token {
                operation: "generate the CA key",
                detail: format!("the token returned a key id that is not hex: {e}"),
            })?),
            module_path: config.module.clone(),
            pin_file: config.pin_file.clone(),
        };
        tracing::info!(
            token = %full.token,
            serial = %config.token_serial,
            key_id = %config.key_id,
            "generated the fleet CA key on the PKCS#11 token"
        );
        let ca = Self::self_signed(
            hostname,
            now_ms,
            CaKey::Token(TokenKey::new(keystore, full.clone())),
        )?;
        Ok((ca, full))
    }

    fn self_signed(hostname: &str, now_ms: i64, key: CaKey) -> Result<Self, CaError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("devid fleet CA {hostname}"));
        dn.push(DnType::OrganizationName, "devid");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial());
        params.not_before = datetime(now_ms - 3_600_000);
        params.not_after = datetime(now_ms + 20 * 365 * 86_400_000);
        params.use_authority_key_identifier_extension = false;
        let cert = params
            .self_signed(&key)
            .map_err(issue_err("self-sign the CA certificate"))?;
        let cert_der = cert.der().clone();
        let cert_pem = cert.pem();
        let issuer = Issuer::new(params, key);
        Ok(Self {
            cert_der,
            cert_pem,
            issuer,
        })
    }

    /// Load the CA from its certificate file and the key `key` names (a file, or a key on a
    /// PKCS#11 token).
    pub fn open(cert_path: &Path, key: &CaKeyRef) -> Result<Self, CaError> {
        match key {
            CaKeyRef::File(key_path) => Self::load(cert_path, key_path),
            CaKeyRef::Pkcs11(uri) => Self::load_from_token(cert_path, uri),
        }
    }

    /// Load the CA from its certificate file and its key on a PKCS#11 token. `uri` must name
    /// the token serial and the key id (as `init` records them).
    pub fn load_from_token(cert_path: &Path, uri: &Pkcs11KeyUri) -> Result<Self, CaError> {
        let (cert_pem, cert_der) = read_cert(cert_path)?;
        let (Some(serial), Some(id)) = (&uri.serial, &uri.id) else {
            return Err(CaError::Invalid {
                what: "ca_key setting",
                detail: "the pkcs11: URI must name the token serial (serial=) and the key \
                         (id=), as `devid-server init --ca-key` records them"
                    .into(),
            });
        };
        let keystore = Pkcs11Keystore::open(&Pkcs11Config {
            module: uri.module_path.clone(),
            token_label: uri.token.clone(),
            pin_file: uri.pin_file.clone(),
            token_serial: serial.clone(),
            key_id: hex::encode(id),
        })
        .map_err(token_err("open the CA key"))?;
        let key = CaKey::Token(TokenKey::new(keystore, uri.clone()));
        Self::assemble(
            cert_pem,
            cert_der,
            key,
            cert_path,
            "the key on the PKCS#11 token",
        )
    }

    /// Load the CA from its certificate and key files.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, CaError> {
        let (cert_pem, cert_der) = read_cert(cert_path)?;
        let key_bytes =
            zeroize::Zeroizing::new(fsutil::read_private(key_path).map_err(|e| io(key_path, e))?);
        let key_text = std::str::from_utf8(&key_bytes).map_err(|_| CaError::Invalid {
            what: "CA key",
            detail: format!("{} is not PEM", key_path.display()),
        })?;
        let key = KeyPair::from_pem(key_text).map_err(|e| CaError::Invalid {
            what: "CA key",
            detail: format!("{}: {e}", key_path.display()),
        })?;
        Self::assemble(
            cert_pem,
            cert_der,
            CaKey::File(key),
            cert_path,
            &key_path.display().to_string(),
        )
    }

    fn assemble(
        cert_pem: String,
        cert_der: CertificateDer<'static>,
        key: CaKey,
        cert_path: &Path,
        key_name: &str,
    ) -> Result<Self, CaError> {
        let issuer = Issuer::from_ca_cert_der(&cert_der, key).map_err(|e| CaError::Invalid {
            what: "CA certificate",
            detail: e.to_string(),
        })?;
        let ca = Self {
            cert_der,
            cert_pem,
            issuer,
        };
        let (_, parsed) =
            x509_parser::parse_x509_certificate(&ca.cert_der).map_err(|e| CaError::Invalid {
                what: "CA certificate",
                detail: e.to_string(),
            })?;
        if parsed.public_key().raw
            != rcgen::PublicKeyData::subject_public_key_info(ca.issuer.key()).as_slice()
        {
            return Err(CaError::Invalid {
                what: "CA key",
                detail: format!("{key_name} does not belong to {}", cert_path.display()),
            });
        }
        Ok(ca)
    }

    /// Write the certificate (public) and, for a file key, the key (0600), refusing to
    /// overwrite. A key on a PKCS#11 token stays there: `key_path` is not written.
    pub fn save(&self, cert_path: &Path, key_path: &Path) -> Result<(), CaError> {
        if let CaKey::File(key) = self.issuer.key() {
            let key_pem = zeroize::Zeroizing::new(key.serialize_pem());
            fsutil::write_new(key_path, key_pem.as_bytes(), 0o600).map_err(|e| io(key_path, e))?;
        }
        fsutil::write_new(cert_path, self.cert_pem.as_bytes(), 0o644).map_err(|e| io(cert_path, e))
    }

    /// `file` or `pkcs11`: where the CA key is.
    pub fn key_kind(&self) -> &'static str {
        match self.issuer.key() {
            CaKey::File(_) => "file",
            CaKey::Token(_) => "pkcs11",
        }
    }

    /// The RFC 7512 reference of the CA key when it is on a PKCS#11 token.
    pub fn token_key_uri(&self) -> Option<&Pkcs11KeyUri> {
        match self.issuer.key() {
            CaKey::File(_) => None,
            CaKey::Token(t) => Some(&t.uri),
        }
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// Hex SHA-256 of the CA certificate's DER.
    pub fn pin(&self) -> String {
        cert_pin(&self.cert_der)
    }

    /// Issue a device certificate: CN=`id`, SAN URI `urn:devid:<id>`, client auth, for the
    /// P-256 public key `spki_der` (SubjectPublicKeyInfo DER), valid `lifetime` from now.
    pub fn issue_device(
        &self,
        id: &DeviceId,
        spki_der: &[u8],
        lifetime: Duration,
        now_ms: i64,
    ) -> Result<IssuedCert, CaError> {
        let public = SubjectPublicKeyInfo::from_der(spki_der).map_err(|e| CaError::Invalid {
            what: "device public key",
            detail: e.to_string(),
        })?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, id.as_str());
        params.distinguished_name = dn;
        let uri = id
            .uri()
            .try_into()
            .map_err(issue_err("encode the device URI"))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.finish(
            params,
            &public,
            lifetime,
            now_ms,
            "issue a device certificate",
        )
    }

    /// Issue the server's TLS certificate for `dns_names` and `ips`, with a new key.
    /// Returns the chain PEM (leaf then CA) and the key PEM.
    pub fn issue_server(
        &self,
        dns_names: &[String],
        ips: &[IpAddr],
        lifetime: Duration,
        now_ms: i64,
    ) -> Result<(String, zeroize::Zeroizing<String>), CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(issue_err("generate the server key"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            dns_names
                .first()
                .cloned()
                .unwrap_or_else(|| "devid-server".into()),
        );
        params.distinguished_name = dn;
        let mut sans = Vec::new();
        for n in dns_names {
            sans.push(SanType::DnsName(
                n.clone()
                    .try_into()
                    .map_err(issue_err("encode a DNS name"))?,
            ));
        }
        for ip in ips {
            sans.push(SanType::IpAddress(*ip));
        }
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let issued = self.finish(
            params,
            &key,
            lifetime,
            now_ms,
            "issue the server certificate",
        )?;
        Ok((
            format!("{}{}", issued.cert_pem, self.cert_pem),
            zeroize::Zeroizing::new(key.serialize_pem()),
        ))
    }

    fn finish(
        &self,
        mut params: CertificateParams,
        public: &impl rcgen::PublicKeyData,
        lifetime: Duration,
        now_ms: i64,
        operation: &'static str,
    ) -> Result<IssuedCert, CaError> {
        let serial = random_serial();
        let serial_hex = hex::encode(serial.to_bytes());
        params.serial_number = Some(serial);
        let lifetime_ms = i64::try_from(lifetime.as_millis()).unwrap_or(i64::MAX / 2);
        let not_after_ms = now_ms.saturating_add(lifetime_ms) / 1000 * 1000;
        params.not_before = datetime(now_ms - 300_000);
        params.not_after = datetime(not_after_ms);
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(public, &self.issuer)
            .map_err(issue_err(operation))?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            serial_hex,
            not_after_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::prelude::*;

    #[test]
    fn device_cert_names_the_device_and_chains() {
        let now = devid_stdx::now_ms();
        let ca = Ca::generate("iot.example", now).unwrap();
        let dev = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let id = DeviceId::parse("sensor-1").unwrap();
        let issued = ca
            .issue_device(
                &id,
                &rcgen::PublicKeyData::subject_public_key_info(&dev),
                Duration::from_secs(86_400),
                now,
            )
            .unwrap();
        let der = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
        let (_, cert) = parse_x509_certificate(&der).unwrap();
        assert_eq!(
            cert.public_key().raw,
            rcgen::PublicKeyData::subject_public_key_info(&dev).as_slice()
        );
        let san = cert.subject_alternative_name().unwrap().unwrap();
        assert!(san
            .value
            .general_names
            .iter()
            .any(|n| matches!(n, GeneralName::URI("urn:devid:sensor-1"))));
        let (_, ca_cert) = parse_x509_certificate(ca.cert_der()).unwrap();
        cert.verify_signature(Some(ca_cert.public_key())).unwrap();
        assert_eq!(hex::encode(cert.raw_serial()), issued.serial_hex);

        let dir = tempfile::tempdir().unwrap();
        let (c, k) = (dir.path().join("ca.pem"), dir.path().join("ca-key.pem"));
        ca.save(&c, &k).unwrap();
        assert!(ca.save(&c, &k).is_err(), "must not overwrite");
        let back = Ca::load(&c, &k).unwrap();
        assert_eq!(back.pin(), ca.pin());
        let again = back
            .issue_device(
                &id,
                &rcgen::PublicKeyData::subject_public_key_info(&dev),
                Duration::from_secs(60),
                now,
            )
            .unwrap();
        let der = CertificateDer::from_pem_slice(again.cert_pem.as_bytes()).unwrap();
        let (_, cert) = parse_x509_certificate(&der).unwrap();
        cert.verify_signature(Some(ca_cert.public_key())).unwrap();
    }
}
