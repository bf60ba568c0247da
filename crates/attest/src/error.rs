//! The one error type of the crate; each refusal has a stable reason code.

/// Why a TPM structure, an EK certificate or an attestation was refused.
///
/// Every variant maps to one stable snake_case [`code`](AttestError::code) (for audit rows,
/// metrics and API error bodies); the `Display` message says what failed and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AttestError {
    /// A TPM structure (TPMT_PUBLIC, TPMS_ATTEST, TPMT_SIGNATURE, a Name) is truncated, has
    /// trailing bytes, an over-long field or a value the TPM would never produce.
    #[error("malformed {what}: {detail} (send the structure exactly as the TPM marshalled it)")]
    MalformedTpmStructure {
        /// The structure being parsed.
        what: &'static str,
        /// What is wrong, at which offset.
        detail: String,
    },
    /// The EK certificate cannot be parsed or does not describe a usable EK (key type, EKU).
    #[error("EK certificate invalid: {0}")]
    EkCertInvalid(String),
    /// The EK certificate does not chain to any configured TPM-maker root.
    #[error("EK certificate not trusted: {0} (add the TPM maker's root to attestation.ek_roots, or send the missing intermediate certificates)")]
    EkUntrusted(String),
    /// The trust set itself could not be loaded (a configuration error, not a device's fault).
    #[error("EK roots: {0}")]
    EkRootsInvalid(String),
    /// MakeCredential could not be run with these inputs (bad Name, secret size, EK key).
    #[error("credential: {0}")]
    Credential(String),
    /// The AK lacks a required attribute or has a forbidden one.
    #[error("attestation key attributes: {0} (create the AK as a restricted signing key with fixedTPM|fixedParent|sensitiveDataOrigin, e.g. `tpm2 createak`)")]
    AkAttributes(String),
    /// The AK's algorithm, key size, scheme or name hash is not accepted.
    #[error("attestation key algorithm: {0} (use ECC P-256 with ECDSA-SHA256, or RSA-2048+ with RSASSA-SHA256, and nameAlg SHA-256)")]
    AkAlgorithm(String),
    /// TPMS_ATTEST does not start with TPM_GENERATED_VALUE.
    #[error("certify info magic is {0:#010x}, not TPM_GENERATED_VALUE 0xff544347: it was not made by a TPM")]
    CertifyMagic(u32),
    /// TPMS_ATTEST is not a TPM2_Certify result.
    #[error("attestation type is {0:#06x}, not TPM_ST_ATTEST_CERTIFY 0x8017 (send the output of TPM2_Certify)")]
    CertifyType(u16),
    /// The Certify's qualifying data is not the one this challenge expects (replay, or a
    /// Certify made for another challenge or CSR).
    #[error(
        "certify qualifying data does not match this challenge and CSR (restart the attestation)"
    )]
    CertifyExtraData,
    /// The Certify signature does not verify with the AK, or its scheme differs from the AK's.
    #[error("certify signature: {0}")]
    CertifySignature(String),
    /// The certified Name is not the Name of the key public area sent.
    #[error("the certified Name is not the Name of the key public area sent (send the TPMT_PUBLIC of the key that was certified)")]
    KeyNameMismatch,
    /// The certified key lacks a required attribute or has a forbidden one.
    #[error("device key attributes: {0} (the key must be created in the TPM with fixedTPM|fixedParent|sensitiveDataOrigin|sign, not restricted, not decrypt)")]
    KeyAttributes(String),
    /// The certified key is not ECC P-256 with ECDSA-SHA256.
    #[error("device key algorithm: {0} (the device key must be ECC P-256 with ECDSA-SHA256)")]
    KeyAlgorithm(String),
    /// The certified key is not the key of the CSR.
    #[error("the certified TPM key is not the CSR's key")]
    KeyMismatch,
}

impl AttestError {
    /// The stable reason code: snake_case, never changes once released.
    pub fn code(&self) -> &'static str {
        match self {
            AttestError::MalformedTpmStructure { .. } => "malformed_tpm_structure",
            AttestError::EkCertInvalid(_) => "ek_cert_invalid",
            AttestError::EkUntrusted(_) => "ek_untrusted",
            AttestError::EkRootsInvalid(_) => "ek_roots_invalid",
            AttestError::Credential(_) => "credential_failed",
            AttestError::AkAttributes(_) => "ak_attributes",
            AttestError::AkAlgorithm(_) => "ak_algorithm",
            AttestError::CertifyMagic(_) => "certify_magic",
            AttestError::CertifyType(_) => "certify_type",
            AttestError::CertifyExtraData => "certify_extra_data",
            AttestError::CertifySignature(_) => "certify_signature",
            AttestError::KeyNameMismatch => "key_name_mismatch",
            AttestError::KeyAttributes(_) => "key_attributes",
            AttestError::KeyAlgorithm(_) => "key_algorithm",
            AttestError::KeyMismatch => "key_mismatch",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_snake_case() {
        let all = [
            AttestError::MalformedTpmStructure {
                what: "x",
                detail: String::new(),
            },
            AttestError::EkCertInvalid(String::new()),
            AttestError::EkUntrusted(String::new()),
            AttestError::EkRootsInvalid(String::new()),
            AttestError::Credential(String::new()),
            AttestError::AkAttributes(String::new()),
            AttestError::AkAlgorithm(String::new()),
            AttestError::CertifyMagic(0),
            AttestError::CertifyType(0),
            AttestError::CertifyExtraData,
            AttestError::CertifySignature(String::new()),
            AttestError::KeyNameMismatch,
            AttestError::KeyAttributes(String::new()),
            AttestError::KeyAlgorithm(String::new()),
            AttestError::KeyMismatch,
        ];
        let mut codes: Vec<_> = all.iter().map(|e| e.code()).collect();
        for c in &codes {
            assert!(
                c.chars().all(|ch| ch.is_ascii_lowercase() || ch == '_'),
                "{c}"
            );
        }
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), all.len());
    }
}
