//! The device's check of the certificate chain a server returned at enrolment or renewal,
//! written once for `devid enroll` and the agent's renewal.

use devid_proto::DeviceId;
use sha2::{Digest, Sha256};
use x509_parser::parse_x509_certificate;

/// Why a returned chain is refused. Messages name no key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChainError {
    /// Not a PEM chain, or empty.
    #[error("the server returned an unparsable or empty certificate chain")]
    Unparsable,
    /// The pinned CA certificate is not in it.
    #[error("the returned chain does not contain the pinned CA certificate")]
    PinnedCaMissing,
    /// The leaf is not signed by the pinned CA.
    #[error("the device certificate is not signed by the pinned CA")]
    NotSignedByCa,
    /// The leaf certifies another key.
    #[error("the server certified another public key than this device's")]
    WrongKey,
    /// The leaf names another device, or none (the one identity rule of `devid_tls::identity`).
    #[error("the device certificate does not name {expected}: {why}")]
    WrongIdentity {
        /// `urn:devid:<id>` expected.
        expected: String,
        /// What it names instead.
        why: String,
    },
}

/// A chain that passed [`verify_issued_chain`].
#[derive(Debug, Clone)]
pub struct VerifiedChain {
    /// The pinned CA certificate, PEM.
    pub ca_pem: String,
}

/// Check a chain the server returned: its first certificate is signed by the CA whose
/// certificate's SHA-256 is `pin` (that CA must be in the chain), certifies `spki_der` (this
/// device's key) and names `device` by the one identity rule.
pub fn verify_issued_chain(
    chain_pem: &str,
    pin: &str,
    device: &DeviceId,
    spki_der: &[u8],
) -> Result<VerifiedChain, ChainError> {
    let pems: Vec<x509_parser::pem::Pem> =
        x509_parser::pem::Pem::iter_from_buffer(chain_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|_| ChainError::Unparsable)?;
    let leaf_pem = pems.first().ok_or(ChainError::Unparsable)?;
    let ca_pem = pems
        .iter()
        .find(|p| hex::encode(Sha256::digest(&p.contents)) == pin)
        .ok_or(ChainError::PinnedCaMissing)?;
    let (_, leaf) =
        parse_x509_certificate(&leaf_pem.contents).map_err(|_| ChainError::Unparsable)?;
    let (_, ca) = parse_x509_certificate(&ca_pem.contents).map_err(|_| ChainError::Unparsable)?;
    leaf.verify_signature(Some(ca.public_key()))
        .map_err(|_| ChainError::NotSignedByCa)?;
    if leaf.public_key().raw != spki_der {
        return Err(ChainError::WrongKey);
    }
    match devid_tls::identity::device_of_parsed(&leaf) {
        Ok(named) if &named == device => {}
        Ok(other) => {
            return Err(ChainError::WrongIdentity {
                expected: device.uri(),
                why: format!("it names {}", other.uri()),
            })
        }
        Err(e) => {
            return Err(ChainError::WrongIdentity {
                expected: device.uri(),
                why: e.to_string(),
            })
        }
    }
    Ok(VerifiedChain {
        ca_pem: pem("CERTIFICATE", &ca_pem.contents),
    })
}

fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        // base64 output is ASCII
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}
