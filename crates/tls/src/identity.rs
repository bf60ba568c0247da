//! The one identity rule: which device a certificate names.
//!
//! A certificate names device `<id>` when its subjectAltName holds exactly one URI that starts
//! with `urn:devid:`, and the rest of that URI is a valid device id. Nothing else counts: not
//! the subject CN, not a second `urn:devid:` URI (then the certificate names no device), not a
//! malformed id. The server's HTTPS renewal, its MQTT ingest and the device's check of the
//! chain it was issued all call [`device_of`], so the three can never disagree.

use devid_proto::{DeviceId, DEVICE_URI_PREFIX};
use sha2::{Digest, Sha256};
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::GeneralName;

/// Why a certificate names no device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The bytes are not an X.509 certificate.
    #[error("not a valid X.509 certificate")]
    NotACertificate,
    /// No `urn:devid:` SAN URI (a CN alone never names a device).
    #[error("the certificate has no urn:devid: subjectAltName URI")]
    NoDeviceUri,
    /// More than one `urn:devid:` SAN URI.
    #[error("the certificate has more than one urn:devid: subjectAltName URI")]
    SeveralDeviceUris,
    /// The `urn:devid:` URI does not hold a valid device id.
    #[error("the certificate's urn:devid: URI holds an invalid device id")]
    InvalidDeviceId,
}

impl IdentityError {
    /// A stable code for audit rows and JSON errors.
    pub fn code(&self) -> &'static str {
        match self {
            IdentityError::NotACertificate => "cert_unparsable",
            IdentityError::NoDeviceUri => "cert_no_device_id",
            IdentityError::SeveralDeviceUris => "cert_several_device_ids",
            IdentityError::InvalidDeviceId => "cert_invalid_device_id",
        }
    }
}

/// What a (verified) certificate says about its holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertIdentity {
    /// The device it names, by [`device_of`]'s rule.
    pub device: Result<DeviceId, IdentityError>,
    /// Hex SHA-256 of its SubjectPublicKeyInfo (as the registry stores the device key).
    pub key_fingerprint: String,
    /// Serial number, lowercase hex without leading zero bytes (as the CA records it).
    pub serial_hex: String,
    /// Expiry, ms since the epoch.
    pub not_after_ms: i64,
}

/// The device a parsed certificate names (the rule above).
pub fn device_of_parsed(cert: &X509Certificate<'_>) -> Result<DeviceId, IdentityError> {
    let mut found = None;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(u) = name {
                if u.starts_with(DEVICE_URI_PREFIX) {
                    if found.is_some() {
                        return Err(IdentityError::SeveralDeviceUris);
                    }
                    found = Some(*u);
                }
            }
        }
    }
    let uri = found.ok_or(IdentityError::NoDeviceUri)?;
    DeviceId::from_uri(uri).ok_or(IdentityError::InvalidDeviceId)
}

/// The device a DER certificate names (the rule above).
pub fn device_of(der: &[u8]) -> Result<DeviceId, IdentityError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|_| IdentityError::NotACertificate)?;
    device_of_parsed(&cert)
}

/// Everything the server checks about a client certificate against the registry.
pub fn identity_of(der: &[u8]) -> Result<CertIdentity, IdentityError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|_| IdentityError::NotACertificate)?;
    Ok(CertIdentity {
        device: device_of_parsed(&cert),
        key_fingerprint: hex::encode(Sha256::digest(cert.public_key().raw)),
        serial_hex: serial_hex(cert.raw_serial()),
        not_after_ms: cert.validity().not_after.timestamp().saturating_mul(1000),
    })
}

/// A serial number's bytes as the CA records them: lowercase hex, leading zero bytes dropped.
fn serial_hex(raw: &[u8]) -> String {
    let start = raw.iter().position(|b| *b != 0).unwrap_or(raw.len());
    hex::encode(&raw[start..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};

    fn cert(cn: Option<&str>, uris: &[&str]) -> Vec<u8> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        if let Some(cn) = cn {
            dn.push(DnType::CommonName, cn);
        }
        params.distinguished_name = dn;
        params.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI((*u).try_into().expect("ia5")))
            .collect();
        let key = KeyPair::generate().expect("key");
        params.self_signed(&key).expect("cert").der().to_vec()
    }

    #[test]
    fn exactly_one_devid_uri_names_the_device_and_nothing_else_does() {
        let ok = cert(
            Some("other"),
            &["https://example.com/x", "urn:devid:pump-7"],
        );
        assert_eq!(device_of(&ok).map(|d| d.to_string()), Ok("pump-7".into()));
        // a CN alone never names a device (the MQTT ingest used to fall back to it)
        assert_eq!(
            device_of(&cert(Some("pump-7"), &[])),
            Err(IdentityError::NoDeviceUri)
        );
        assert_eq!(
            device_of(&cert(
                Some("pump-7"),
                &["urn:devid:pump-7", "urn:devid:pump-8"]
            )),
            Err(IdentityError::SeveralDeviceUris)
        );
        // a malformed id is refused, never skipped in favour of another name
        assert_eq!(
            device_of(&cert(None, &["urn:devid:a/b"])),
            Err(IdentityError::InvalidDeviceId)
        );
        assert_eq!(device_of(b"junk"), Err(IdentityError::NotACertificate));
    }

    #[test]
    fn identity_carries_key_serial_and_expiry() {
        let der = cert(None, &["urn:devid:pump-7"]);
        let id = identity_of(&der).expect("identity");
        assert_eq!(id.key_fingerprint.len(), 64);
        assert!(!id.serial_hex.is_empty() && !id.serial_hex.starts_with("00"));
        assert!(id.not_after_ms > 0);
    }

    #[test]
    fn serials_drop_leading_zero_bytes() {
        assert_eq!(serial_hex(&[0, 0, 0x0a, 0x01]), "0a01");
        assert_eq!(serial_hex(&[0x80]), "80");
        assert_eq!(serial_hex(&[0]), "");
    }
}
