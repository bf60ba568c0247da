//! The fleet certificate authority: an ECDSA P-256 key (a 0600 file for now; PKCS#11 later)
//! that signs device certificates and the server's own TLS certificate.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use devid_proto::DeviceId;
use rand_core::{OsRng, RngCore};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber, SubjectPublicKeyInfo,
    PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::{pem::PemObject, CertificateDer};
use sha2::{Digest, Sha256};

use crate::fsutil;
use crate::timeutil::datetime;

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
    /// Certificate generation failed.
    #[error("cannot {operation}: {detail}")]
    Issue {
        /// What was being made.
        operation: &'static str,
        /// rcgen's words.
        detail: String,
    },
}

fn io(path: &Path, source: std::io::Error) -> CaError {
    CaError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// A certificate just issued.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// Serial number, lowercase hex.
    pub serial_hex: String,
    /// Expiry, milliseconds since the epoch.
    pub not_after_ms: i64,
}

/// The fleet CA.
pub struct Ca {
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").field("pin", &self.pin()).finish()
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

fn issue_err(operation: &'static str) -> impl Fn(rcgen::Error) -> CaError {
    move |e| CaError::Issue {
        operation,
        detail: e.to_string(),
    }
}

impl Ca {
    /// Make a new CA for the fleet served at `hostname`.
    pub fn generate(hostname: &str, now_ms: i64) -> Result<Self, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(issue_err("generate the CA key"))?;
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

    /// Load the CA from its certificate and key files.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, CaError> {
        let cert_pem = std::fs::read_to_string(cert_path).map_err(|e| io(cert_path, e))?;
        let cert_der =
            CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| CaError::Invalid {
                what: "CA certificate",
                detail: format!("{}: {e}", cert_path.display()),
            })?;
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
                detail: format!(
                    "{} does not belong to {}",
                    key_path.display(),
                    cert_path.display()
                ),
            });
        }
        Ok(ca)
    }

    /// Write the certificate (public) and the key (0600) into `dir`, refusing to overwrite.
    pub fn save(&self, cert_path: &Path, key_path: &Path) -> Result<(), CaError> {
        let key_pem = zeroize::Zeroizing::new(self.issuer.key().serialize_pem());
        fsutil::write_new(key_path, key_pem.as_bytes(), 0o600).map_err(|e| io(key_path, e))?;
        fsutil::write_new(cert_path, self.cert_pem.as_bytes(), 0o644).map_err(|e| io(cert_path, e))
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
        let now = crate::timeutil::now_ms();
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
