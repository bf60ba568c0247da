//! PKCS#10 requests: parse, require an ECDSA P-256 key signed with SHA-256, and check the
//! signature (proof that the requester holds the private key). Everything else in the request
//! (subject, extensions) is ignored: the server decides what the certificate says.

use p256::pkcs8::DecodePublicKey;
use sha2::{Digest, Sha256};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_SIG_ECDSA_WITH_SHA256,
};
use x509_parser::prelude::FromDer;

/// Largest PEM CSR accepted (a P-256 request is well under 1 KiB).
pub const MAX_CSR_PEM_LEN: usize = 16 * 1024;

/// Why a CSR was refused. Messages never quote the request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CsrError {
    /// Not one well-formed PEM `CERTIFICATE REQUEST`.
    #[error("malformed CSR: {0}; send one PEM CERTIFICATE REQUEST")]
    Malformed(String),
    /// The key or signature algorithm is not ECDSA P-256 with SHA-256.
    #[error("unsupported CSR key: {0}; devid requires an ECDSA P-256 key signed with SHA-256")]
    UnsupportedKey(String),
    /// The signature does not verify with the key in the request.
    #[error("CSR signature does not verify with the key it carries (no proof of possession)")]
    BadSignature,
}

impl CsrError {
    /// Stable code for the JSON error body.
    pub fn code(&self) -> &'static str {
        match self {
            CsrError::Malformed(_) => "csr_malformed",
            CsrError::UnsupportedKey(_) => "csr_key_unsupported",
            CsrError::BadSignature => "csr_signature_invalid",
        }
    }
}

/// A request whose signature verified.
#[derive(Debug, Clone)]
pub struct VerifiedCsr {
    /// The requester's SubjectPublicKeyInfo, DER.
    pub spki_der: Vec<u8>,
    /// Hex SHA-256 of `spki_der`.
    pub key_fingerprint: String,
    /// The request itself, DER (attestation binds the TPM's Certify to it).
    pub der: Vec<u8>,
}

/// Parse and verify a PEM CSR.
pub fn verify_csr_pem(pem: &str) -> Result<VerifiedCsr, CsrError> {
    if pem.len() > MAX_CSR_PEM_LEN {
        return Err(CsrError::Malformed(format!(
            "{} bytes, the limit is {MAX_CSR_PEM_LEN}",
            pem.len()
        )));
    }
    let mut blocks = x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes());
    let block = match blocks.next() {
        Some(Ok(b)) => b,
        Some(Err(e)) => return Err(CsrError::Malformed(format!("bad PEM: {e}"))),
        None => return Err(CsrError::Malformed("no PEM block".into())),
    };
    if blocks.next().is_some() {
        return Err(CsrError::Malformed("more than one PEM block".into()));
    }
    if block.label != "CERTIFICATE REQUEST" && block.label != "NEW CERTIFICATE REQUEST" {
        return Err(CsrError::Malformed(format!(
            "PEM label {:?}, expected CERTIFICATE REQUEST",
            block.label
        )));
    }
    verify_csr_der(&block.contents)
}

/// Parse and verify a DER CSR.
pub fn verify_csr_der(der: &[u8]) -> Result<VerifiedCsr, CsrError> {
    let (rest, csr) = X509CertificationRequest::from_der(der)
        .map_err(|e| CsrError::Malformed(format!("not a PKCS#10 request: {e}")))?;
    if !rest.is_empty() {
        return Err(CsrError::Malformed(
            "trailing bytes after the request".into(),
        ));
    }
    if csr.signature_algorithm.algorithm != OID_SIG_ECDSA_WITH_SHA256 {
        return Err(CsrError::UnsupportedKey(format!(
            "signature algorithm {}",
            csr.signature_algorithm.algorithm
        )));
    }
    let spki = &csr.certification_request_info.subject_pki;
    if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY {
        return Err(CsrError::UnsupportedKey(format!(
            "key algorithm {}",
            spki.algorithm.algorithm
        )));
    }
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    if curve.as_ref() != Some(&OID_EC_P256) {
        return Err(CsrError::UnsupportedKey(match curve {
            Some(c) => format!("curve {c}"),
            None => "no named curve".into(),
        }));
    }
    let spki_der = spki.raw.to_vec();
    p256::PublicKey::from_public_key_der(&spki_der)
        .map_err(|_| CsrError::UnsupportedKey("not a valid P-256 point".into()))?;
    csr.verify_signature().map_err(|_| CsrError::BadSignature)?;
    Ok(VerifiedCsr {
        key_fingerprint: hex::encode(Sha256::digest(&spki_der)),
        spki_der,
        der: der.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_ED25519};

    #[test]
    fn accepts_p256_and_refuses_the_rest() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = CertificateParams::new(vec!["x".into()])
            .unwrap()
            .serialize_request(&key)
            .unwrap();
        let pem = csr.pem().unwrap();
        let ok = verify_csr_pem(&pem).unwrap();
        assert_eq!(
            ok.spki_der,
            rcgen::PublicKeyData::subject_public_key_info(&key)
        );

        // flip one byte of the signature
        let mut der = csr.der().to_vec();
        let n = der.len();
        der[n - 3] ^= 0x01;
        assert_eq!(verify_csr_der(&der).unwrap_err(), CsrError::BadSignature);

        let ed = KeyPair::generate_for(&PKCS_ED25519).unwrap();
        let ed_csr = CertificateParams::new(vec!["x".into()])
            .unwrap()
            .serialize_request(&ed)
            .unwrap();
        assert!(matches!(
            verify_csr_pem(&ed_csr.pem().unwrap()),
            Err(CsrError::UnsupportedKey(_))
        ));
        assert!(matches!(
            verify_csr_pem("hello"),
            Err(CsrError::Malformed(_))
        ));
        assert!(matches!(
            verify_csr_pem(&format!("{pem}{pem}")),
            Err(CsrError::Malformed(_))
        ));
    }
}
