//! The server's policy checks on the AK and on the TPM2_Certify of the device key. The small
//! bindings both sides compute (qualifying data, activation proof) are part of the wire
//! contract: `devid_proto::attest_binding`.
//!
//! Each failed check is its own [`AttestError`] variant (its own reason code), checked in the
//! order the functions document.

use p256::ecdsa::signature::Verifier;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use p256::pkcs8::DecodePublicKey;
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::wire::{
    name_of, Attested, KeyAlg, TpmsAttest, TpmtPublic, TpmtSignature, ALG_ECDSA, ALG_RSASSA,
    ALG_SHA256, DECRYPT, ECC_NIST_P256, FIXED_PARENT, FIXED_TPM, RESTRICTED, SENSITIVE_DATA_ORIGIN,
    SIGN, ST_ATTEST_CERTIFY, TPM_GENERATED_VALUE,
};
use crate::{AttestError, Result};

/// Attributes an AK must have.
pub const AK_REQUIRED: u32 = FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN | RESTRICTED | SIGN;
/// Attributes an AK must not have.
pub const AK_FORBIDDEN: u32 = DECRYPT;
/// Attributes a certified device key must have.
pub const KEY_REQUIRED: u32 = FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN | SIGN;
/// Attributes a certified device key must not have.
pub const KEY_FORBIDDEN: u32 = RESTRICTED | DECRYPT;

const ATTR_NAMES: [(u32, &str); 11] = [
    (FIXED_TPM, "fixedTPM"),
    (crate::wire::ST_CLEAR, "stClear"),
    (FIXED_PARENT, "fixedParent"),
    (SENSITIVE_DATA_ORIGIN, "sensitiveDataOrigin"),
    (crate::wire::USER_WITH_AUTH, "userWithAuth"),
    (crate::wire::ADMIN_WITH_POLICY, "adminWithPolicy"),
    (crate::wire::NO_DA, "noDA"),
    (crate::wire::ENCRYPTED_DUPLICATION, "encryptedDuplication"),
    (RESTRICTED, "restricted"),
    (DECRYPT, "decrypt"),
    (SIGN, "sign"),
];

fn attr_list(mask: u32) -> String {
    let v: Vec<&str> = ATTR_NAMES
        .iter()
        .filter(|(m, _)| mask & m != 0)
        .map(|(_, n)| *n)
        .collect();
    v.join("|")
}

/// `None` when `attrs` has all of `required` and none of `forbidden`, else what is wrong.
fn attr_problem(attrs: u32, required: u32, forbidden: u32) -> Option<String> {
    let missing = required & !attrs;
    let extra = forbidden & attrs;
    if missing == 0 && extra == 0 {
        return None;
    }
    let mut parts = Vec::new();
    if missing != 0 {
        parts.push(format!("missing {}", attr_list(missing)));
    }
    if extra != 0 {
        parts.push(format!("must not have {}", attr_list(extra)));
    }
    Some(format!("{} (attributes {attrs:#010x})", parts.join(", ")))
}

/// A P-256 point from TPM coordinates (left-padded, at most 32 bytes each, on the curve).
fn p256_point(x: &[u8], y: &[u8]) -> Option<p256::PublicKey> {
    if x.len() > 32 || y.len() > 32 {
        return None;
    }
    let mut sec1 = vec![0x04];
    sec1.extend(std::iter::repeat_n(0u8, 32 - x.len()));
    sec1.extend_from_slice(x);
    sec1.extend(std::iter::repeat_n(0u8, 32 - y.len()));
    sec1.extend_from_slice(y);
    p256::PublicKey::from_sec1_bytes(&sec1).ok()
}

#[derive(Debug, Clone)]
enum AkVerifier {
    P256(p256::ecdsa::VerifyingKey),
    Rsa(rsa::pkcs1v15::VerifyingKey<Sha256>, usize),
}

/// An AK that passed [`check_ak`]: its public area, its Name and its verifying key.
#[derive(Debug, Clone)]
pub struct AkKey {
    public: TpmtPublic,
    name: Vec<u8>,
    verifier: AkVerifier,
}

impl AkKey {
    /// The AK's Name (bare: 0x000b || SHA-256(TPMT_PUBLIC)): what MakeCredential binds to.
    pub fn name(&self) -> &[u8] {
        &self.name
    }

    /// The exact TPMT_PUBLIC bytes checked (to store in the registry).
    pub fn public_raw(&self) -> &[u8] {
        self.public.raw()
    }

    /// The parsed public area.
    pub fn public(&self) -> &TpmtPublic {
        &self.public
    }

    /// True for an ECC P-256 AK, false for RSA.
    pub fn is_ecc(&self) -> bool {
        matches!(self.verifier, AkVerifier::P256(_))
    }
}

/// Check an AK's public area (TPMT_PUBLIC, strictly parsed), in this order:
/// nameAlg SHA-256 (`ak_algorithm`); fixedTPM, fixedParent, sensitiveDataOrigin, restricted,
/// sign set and decrypt clear (`ak_attributes`); ECC P-256 with ECDSA-SHA256 and a valid point,
/// or RSA 2048-4096 bits with RSASSA-SHA256 and a full-size modulus (`ak_algorithm`).
pub fn check_ak(ak_public_raw: &[u8]) -> Result<AkKey> {
    let public = TpmtPublic::parse(ak_public_raw)?;
    if public.name_alg != ALG_SHA256 {
        return Err(AttestError::AkAlgorithm(format!(
            "nameAlg {:#06x} is not SHA-256",
            public.name_alg
        )));
    }
    if let Some(p) = attr_problem(public.attributes, AK_REQUIRED, AK_FORBIDDEN) {
        return Err(AttestError::AkAttributes(p));
    }
    let verifier = match &public.alg {
        KeyAlg::Ecc { curve, x, y, .. } => {
            if *curve != ECC_NIST_P256 {
                return Err(AttestError::AkAlgorithm(format!(
                    "ECC curve {curve:#06x} is not NIST P-256"
                )));
            }
            if public.scheme != Some((ALG_ECDSA, ALG_SHA256)) {
                return Err(AttestError::AkAlgorithm(format!(
                    "ECC scheme {:?} is not ECDSA with SHA-256",
                    public.scheme
                )));
            }
            let pk = p256_point(x, y)
                .ok_or_else(|| AttestError::AkAlgorithm("the AK's point is not on P-256".into()))?;
            AkVerifier::P256(p256::ecdsa::VerifyingKey::from(&pk))
        }
        KeyAlg::Rsa { bits, modulus, .. } => {
            if !(2048..=4096).contains(bits) || usize::from(*bits) != modulus.len() * 8 {
                return Err(AttestError::AkAlgorithm(format!(
                    "RSA key of {bits} bits with a {}-byte modulus (need 2048 to 4096 bits, full size)",
                    modulus.len()
                )));
            }
            if public.scheme != Some((ALG_RSASSA, ALG_SHA256)) {
                return Err(AttestError::AkAlgorithm(format!(
                    "RSA scheme {:?} is not RSASSA with SHA-256",
                    public.scheme
                )));
            }
            let e = public.alg.rsa_exponent().unwrap_or(65537);
            let pk =
                rsa::RsaPublicKey::new(rsa::BigUint::from_bytes_be(modulus), rsa::BigUint::from(e))
                    .map_err(|err| AttestError::AkAlgorithm(format!("unusable RSA key: {err}")))?;
            AkVerifier::Rsa(rsa::pkcs1v15::VerifyingKey::new(pk), modulus.len())
        }
    };
    let name = name_of(ak_public_raw, ALG_SHA256)?;
    Ok(AkKey {
        public,
        name,
        verifier,
    })
}

/// A device key the TPM certified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertifiedKey {
    /// The key as an uncompressed SEC1 point: 0x04 || x || y.
    pub p256_sec1_uncompressed: Vec<u8>,
    /// Its TPMA_OBJECT attributes.
    pub attributes: u32,
    /// The key's Name.
    pub name: Vec<u8>,
    /// clockInfo.resetCount at the Certify (a baseline for later quotes).
    pub reset_count: u32,
    /// clockInfo.restartCount.
    pub restart_count: u32,
    /// The TPM's firmwareVersion.
    pub firmware_version: u64,
}

impl CertifiedKey {
    /// True when `spki_der` (a SubjectPublicKeyInfo, e.g. the CSR's) is this P-256 key.
    pub fn matches_spki_der(&self, spki_der: &[u8]) -> bool {
        match p256::PublicKey::from_public_key_der(spki_der) {
            Ok(pk) => {
                let enc = pk.to_encoded_point(false);
                bool::from(enc.as_bytes().ct_eq(&self.p256_sec1_uncompressed))
            }
            Err(_) => false,
        }
    }

    /// [`CertifiedKey::matches_spki_der`] as a check: `key_mismatch` when it does not match.
    pub fn require_spki_der(&self, spki_der: &[u8]) -> Result<()> {
        if self.matches_spki_der(spki_der) {
            Ok(())
        } else {
            Err(AttestError::KeyMismatch)
        }
    }
}

/// Left-pad an ECDSA scalar to 32 bytes; `None` when longer.
fn scalar32(b: &[u8]) -> Option<[u8; 32]> {
    if b.len() > 32 {
        return None;
    }
    let mut out = [0u8; 32];
    out[32 - b.len()..].copy_from_slice(b);
    Some(out)
}

/// Check a TPM2_Certify of a device key by `ak`, in this order:
/// 1. `certify_info` parses strictly as TPMS_ATTEST (`malformed_tpm_structure`);
/// 2. magic is TPM_GENERATED_VALUE (`certify_magic`), type is CERTIFY (`certify_type`);
/// 3. extraData equals `expected_extra_data`, compared in constant time (`certify_extra_data`);
/// 4. `signature` parses as TPMT_SIGNATURE and is the AK's scheme (ECDSA or RSASSA with
///    SHA-256) over the *raw* `certify_info` bytes; ECDSA r and s are left-padded to 32 bytes,
///    longer ones refused (`certify_signature`);
/// 5. `key_public_raw` parses strictly and its Name is the certified Name (`key_name_mismatch`);
/// 6. the key has fixedTPM, fixedParent, sensitiveDataOrigin and sign, and neither restricted
///    nor decrypt (`key_attributes`);
/// 7. the key is ECC P-256 with ECDSA-SHA256 and a valid point (`key_algorithm`).
///
/// Then compare the result with the CSR's key ([`CertifiedKey::matches_spki_der`]).
pub fn verify_certify(
    ak: &AkKey,
    certify_info: &[u8],
    signature: &[u8],
    expected_extra_data: &[u8],
    key_public_raw: &[u8],
) -> Result<CertifiedKey> {
    let attest = TpmsAttest::parse(certify_info)?;
    if attest.magic != TPM_GENERATED_VALUE {
        return Err(AttestError::CertifyMagic(attest.magic));
    }
    if attest.kind != ST_ATTEST_CERTIFY {
        return Err(AttestError::CertifyType(attest.kind));
    }
    let certified_name = match &attest.attested {
        Attested::Certify { name, .. } => name.clone(),
        _ => return Err(AttestError::CertifyType(attest.kind)),
    };
    let extra_ok = attest.extra_data.len() == expected_extra_data.len()
        && bool::from(attest.extra_data.ct_eq(expected_extra_data));
    if !extra_ok {
        return Err(AttestError::CertifyExtraData);
    }
    verify_ak_signature(ak, certify_info, signature)?;
    let key = TpmtPublic::parse(key_public_raw)?;
    let key_name = key.name().map_err(|_| {
        AttestError::KeyAlgorithm(format!(
            "nameAlg {:#06x} is not SHA-256, SHA-384 or SHA-512",
            key.name_alg
        ))
    })?;
    if key_name.len() != certified_name.len() || !bool::from(key_name.ct_eq(&certified_name)) {
        return Err(AttestError::KeyNameMismatch);
    }
    if let Some(p) = attr_problem(key.attributes, KEY_REQUIRED, KEY_FORBIDDEN) {
        return Err(AttestError::KeyAttributes(p));
    }
    let point = match &key.alg {
        KeyAlg::Ecc { curve, x, y, .. } if *curve == ECC_NIST_P256 => {
            if key.scheme != Some((ALG_ECDSA, ALG_SHA256)) {
                return Err(AttestError::KeyAlgorithm(format!(
                    "scheme {:?} is not ECDSA with SHA-256",
                    key.scheme
                )));
            }
            p256_point(x, y).ok_or_else(|| {
                AttestError::KeyAlgorithm("the key's point is not on P-256".into())
            })?
        }
        KeyAlg::Ecc { curve, .. } => {
            return Err(AttestError::KeyAlgorithm(format!(
                "ECC curve {curve:#06x} is not NIST P-256"
            )))
        }
        KeyAlg::Rsa { .. } => {
            return Err(AttestError::KeyAlgorithm(
                "an RSA key, not ECC P-256".into(),
            ))
        }
    };
    Ok(CertifiedKey {
        p256_sec1_uncompressed: point.to_encoded_point(false).as_bytes().to_vec(),
        attributes: key.attributes,
        name: key_name,
        reset_count: attest.reset_count,
        restart_count: attest.restart_count,
        firmware_version: attest.firmware_version,
    })
}

/// The AK's signature (TPMT_SIGNATURE) over `message`, in the AK's own scheme.
pub fn verify_ak_signature(ak: &AkKey, message: &[u8], signature: &[u8]) -> Result<()> {
    let sig = TpmtSignature::parse(signature)?;
    let bad = |m: &str| AttestError::CertifySignature(m.to_owned());
    match (&ak.verifier, sig) {
        (AkVerifier::P256(vk), TpmtSignature::Ecdsa { hash, r, s }) => {
            if hash != ALG_SHA256 {
                return Err(bad("ECDSA signature hash is not the AK scheme's SHA-256"));
            }
            let (r, s) = match (scalar32(&r), scalar32(&s)) {
                (Some(r), Some(s)) => (r, s),
                _ => return Err(bad("ECDSA r or s longer than 32 bytes")),
            };
            let sig = p256::ecdsa::Signature::from_scalars(r, s)
                .map_err(|_| bad("ECDSA r or s out of range"))?;
            vk.verify(message, &sig).map_err(|_| {
                bad("the signature does not verify with the AK (another AK, or altered data)")
            })
        }
        (AkVerifier::Rsa(vk, len), TpmtSignature::RsaSsa { hash, sig }) => {
            if hash != ALG_SHA256 {
                return Err(bad("RSASSA signature hash is not the AK scheme's SHA-256"));
            }
            if sig.len() != *len {
                return Err(bad("RSASSA signature is not modulus-sized"));
            }
            let sig = rsa::pkcs1v15::Signature::try_from(sig.as_slice())
                .map_err(|_| bad("unusable RSASSA signature"))?;
            vk.verify(message, &sig).map_err(|_| {
                bad("the signature does not verify with the AK (another AK, or altered data)")
            })
        }
        (_, other) => Err(AttestError::CertifySignature(format!(
            "signature algorithm {} is not the AK's scheme",
            match other {
                TpmtSignature::Ecdsa { .. } => "ECDSA".to_string(),
                TpmtSignature::RsaSsa { .. } => "RSASSA".to_string(),
                TpmtSignature::RsaPss { .. } => "RSAPSS".to_string(),
                TpmtSignature::Hmac { .. } => "HMAC".to_string(),
                TpmtSignature::Null => "NULL".to_string(),
                TpmtSignature::OtherEcc { sig_alg, .. } => format!("{sig_alg:#06x}"),
            }
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attribute_problems_name_the_bits() {
        assert_eq!(attr_problem(0x0005_0072, AK_REQUIRED, AK_FORBIDDEN), None);
        let p = attr_problem(0x0004_0072, AK_REQUIRED, AK_FORBIDDEN).unwrap();
        assert!(p.contains("missing restricted"), "{p}");
        let p = attr_problem(0x0006_0070, KEY_REQUIRED, KEY_FORBIDDEN).unwrap();
        assert!(
            p.contains("missing fixedTPM") && p.contains("must not have decrypt"),
            "{p}"
        );
    }

    #[test]
    fn ecdsa_scalars_pad_and_refuse_long() {
        assert_eq!(scalar32(&[1]).unwrap()[31], 1);
        assert!(scalar32(&[1; 33]).is_none());
    }
}
