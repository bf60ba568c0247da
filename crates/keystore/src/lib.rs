//! The devid keystore: one trait for "a P-256 signing key that cannot leave its home, plus
//! sealing of a small secret", and the software backend.
//!
//! Backends:
//! * `devid-keystore-tpm` (the only crate that links tss-esapi),
//! * `devid-keystore-pkcs11` (the only crate that links cryptoki),
//! * [`soft::SoftKeystore`] here, for boards without secure hardware, with its weaker promise
//!   stated in [`Protection::Software`].
//!
//! Every backend signs ECDSA P-256 over SHA-256 and returns a fixed-size `r || s`
//! [`Signature`]; [`Signature::to_der`] gives the DER form TLS and X.509 want.
#![forbid(unsafe_code)]

use std::fmt;

pub use devid_secmem::SecretBytes;
pub use p256::ecdsa::{Signature, VerifyingKey};
pub use p256::PublicKey;

use p256::pkcs8::EncodePublicKey;
use sha2::{Digest, Sha256};

pub mod fsutil;
pub mod soft;

/// Which kind of home the device key has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// A TPM 2.0, through tpm2-tss.
    Tpm,
    /// A PKCS#11 token or secure element.
    Pkcs11,
    /// Files in the state directory.
    Soft,
}

impl BackendKind {
    /// The name used on the command line and in the state file.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Tpm => "tpm",
            BackendKind::Pkcs11 => "pkcs11",
            BackendKind::Soft => "soft",
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a backend promises against the physical attacks of THREATS.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protection {
    /// The private key and the sealing key live in a chip and cannot be copied out.
    Hardware,
    /// Keys are files on the same flash as the data they protect.
    Software,
    /// A software PKCS#11 token (SoftHSM): keys are files encrypted under the PIN, and the PIN
    /// file is on the same flash. For development and tests.
    #[serde(rename = "software-token")]
    SoftwareToken,
}

impl Protection {
    /// One honest sentence for `devid status` and the docs.
    pub fn summary(self) -> &'static str {
        match self {
            Protection::Hardware => {
                "hardware: the private key and the bundle key never leave the chip; a flash dump \
                 or a copy of the state dir onto another device is useless"
            }
            Protection::Software => {
                "software only: keys are files in the state dir; a flash dump or a copy of the \
                 state dir yields the device identity and every sealed secret (THREATS.md T2, \
                 T3, T7). Use a TPM or secure element where the device can be captured"
            }
            Protection::SoftwareToken => {
                "software PKCS#11 token: the key cannot be exported through PKCS#11, but the \
                 token's files and the PIN file are on the same flash, so a full flash dump \
                 yields them. For development and tests; use a real secure element in the field"
            }
        }
    }
}

/// Errors from any keystore backend. Messages say what failed and what to do; they never
/// carry a secret.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeystoreError {
    /// The chip or module could not be reached.
    #[error("no {what} at {location}: {detail}")]
    NoDevice {
        /// "TPM" or "PKCS#11 token".
        what: &'static str,
        /// Where we looked (TCTI string, module path + token label).
        location: String,
        /// The library's own words.
        detail: String,
    },
    /// The chip answering is not the one this vault was created on.
    #[error(
        "this vault was created on another {what}: {detail}. The state dir was copied from \
         another device, or the {what} was replaced or cleared; re-initialise and re-enrol"
    )]
    OtherDevice {
        /// "TPM" or "PKCS#11 token".
        what: &'static str,
        /// What did not match (names, serials), never a secret.
        detail: String,
    },
    /// The sealed object or the device key is bound to PCR values the platform no longer has.
    #[error(
        "PCR policy not satisfied: the key (sealed data key or device key) is bound to PCRs \
         {pcrs} and the platform's measurements changed (modified boot chain?)"
    )]
    PolicyNotSatisfied {
        /// The PCR list, as given at init.
        pcrs: String,
    },
    /// A stored key or sealed blob could not be parsed or does not belong to this backend.
    #[error("invalid {what}: {detail}")]
    InvalidBlob {
        /// Which file or blob.
        what: &'static str,
        /// Why.
        detail: String,
    },
    /// The backend refused or failed an operation.
    #[error("{backend} {operation} failed: {detail}")]
    Backend {
        /// Backend name.
        backend: &'static str,
        /// The operation (sign, seal, unseal, create key...).
        operation: &'static str,
        /// The library's own words (never a secret).
        detail: String,
    },
    /// The backend's configuration is incomplete or wrong.
    #[error("keystore configuration: {0}")]
    Config(String),
    /// A file of the keystore could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl KeystoreError {
    /// Shorthand for [`KeystoreError::Io`].
    pub fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        KeystoreError::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }
}

/// A device keystore: an ECDSA P-256 key that signs in its home, and a sealing function for
/// small secrets (the vault's data key).
///
/// Implementations serialise access to their hardware internally, so a keystore can be shared
/// as `Arc<dyn Keystore>`. Calls block: from async code use `spawn_blocking`.
pub trait Keystore: Send + Sync + fmt::Debug {
    /// Which backend this is.
    fn kind(&self) -> BackendKind;

    /// What the backend protects against.
    fn protection(&self) -> Protection;

    /// A reference to the key: `tpm:PATH`, `pkcs11:URI`, `file:PATH`.
    fn key_ref(&self) -> String;

    /// The device's public key.
    fn public_key(&self) -> PublicKey;

    /// Sign a SHA-256 digest computed by the caller.
    fn sign_digest(&self, digest: &[u8; 32]) -> Result<Signature, KeystoreError>;

    /// Sign `message` (ECDSA P-256, SHA-256).
    fn sign(&self, message: &[u8]) -> Result<Signature, KeystoreError> {
        let digest: [u8; 32] = Sha256::digest(message).into();
        self.sign_digest(&digest)
    }

    /// Seal `secret` so that only this keystore can recover it. The returned blob is safe to
    /// store on flash (except for the soft backend, see [`Protection::Software`]).
    fn seal(&self, secret: &[u8]) -> Result<Vec<u8>, KeystoreError>;

    /// Recover a secret sealed by [`Keystore::seal`] on this same keystore.
    fn unseal(&self, blob: &[u8]) -> Result<SecretBytes, KeystoreError>;

    /// Key attestation, where the backend can prove where its key lives (a TPM with an
    /// endorsement key). `None` for backends that cannot (PKCS#11, soft).
    fn attestation(&self) -> Option<&dyn KeyAttestation> {
        None
    }

    /// Key rotation in place, where the backend can make a second key and switch to it.
    fn rotation(&self) -> Option<&dyn KeyRotation> {
        None
    }
}

/// Rotating the device key in the keystore, crash-safe: the next key is made beside the
/// current one (and kept across restarts) and becomes the device key only at
/// [`KeyRotation::commit_next_key`], after its certificate is sealed. Until then the current
/// key and certificate keep working.
pub trait KeyRotation: Send + Sync {
    /// Make the next key, or return the pending one (a rotation interrupted before its
    /// commit is retried with the same key).
    fn create_next_key(&self) -> Result<PublicKey, KeystoreError>;

    /// The pending next key, if any.
    fn next_key(&self) -> Option<PublicKey>;

    /// Sign a SHA-256 digest with the next key (its CSR).
    fn sign_digest_next(&self, digest: &[u8; 32]) -> Result<Signature, KeystoreError>;

    /// TPM2_Certify of the next key by the AK (see [`KeyAttestation::certify_key`]).
    fn certify_next_key(&self, qualifying_data: &[u8]) -> Result<KeyCertification, KeystoreError>;

    /// The next key becomes the device key; the old one is flushed and its blob deleted.
    fn commit_next_key(&self) -> Result<(), KeystoreError>;

    /// Forget the next key (its certificate was never sealed).
    fn discard_next_key(&self) -> Result<(), KeystoreError>;
}

/// What a TPM shows the server to start key attestation: its endorsement key certificate and
/// an attestation key (AK) made inside it. Raw TPM structures, as the TPM marshals them.
#[derive(Debug, Clone)]
pub struct AttestIdentity {
    /// Which endorsement key: `rsa2048`, `ecc-p256`, `ecc-p384` or `rsa3072`.
    pub ek_alg: String,
    /// The EK certificate as stored in the TPM's NV (DER, possibly padded).
    pub ek_cert: Vec<u8>,
    /// Intermediate certificates the TPM stores (DER); often none.
    pub ek_chain: Vec<Vec<u8>>,
    /// The AK's public area (TPMT_PUBLIC).
    pub ak_public: Vec<u8>,
}

/// The AK's TPM2_Certify of the device key.
#[derive(Debug, Clone)]
pub struct KeyCertification {
    /// The device key's public area (TPMT_PUBLIC).
    pub key_public: Vec<u8>,
    /// The signed TPMS_ATTEST.
    pub certify_info: Vec<u8>,
    /// TPMT_SIGNATURE over it by the AK.
    pub signature: Vec<u8>,
}

/// The three device-side steps of key attestation (ARCHITECTURE.md, "attestation").
pub trait KeyAttestation: Send + Sync {
    /// The EK certificate and the AK (made on first use and kept in the state dir).
    /// `ek_alg`: which EK to use; `None` picks the first one with a certificate. `Ok(None)`
    /// when the TPM holds no EK certificate (it cannot be attested).
    fn attestation_identity(
        &self,
        ek_alg: Option<&str>,
    ) -> Result<Option<AttestIdentity>, KeystoreError>;

    /// TPM2_ActivateCredential: recover the server's secret, which the TPM releases only if it
    /// holds the EK the credential was made for *and* the AK it names.
    fn activate_credential(
        &self,
        ek_alg: &str,
        credential_blob: &[u8],
        encrypted_secret: &[u8],
    ) -> Result<SecretBytes, KeystoreError>;

    /// TPM2_Certify of the device key by the AK over `qualifying_data` (at most 64 bytes).
    fn certify_key(&self, qualifying_data: &[u8]) -> Result<KeyCertification, KeystoreError>;
}

/// Build a [`Signature`] from big-endian `r` and `s` as TPMs and PKCS#11 tokens return them
/// (possibly shorter than 32 bytes, possibly with a leading zero).
pub fn signature_from_scalars(r: &[u8], s: &[u8]) -> Result<Signature, KeystoreError> {
    fn pad(v: &[u8]) -> Result<[u8; 32], KeystoreError> {
        let v = match v.iter().position(|b| *b != 0) {
            Some(i) => &v[i..],
            None => &[],
        };
        if v.len() > 32 {
            return Err(KeystoreError::InvalidBlob {
                what: "signature",
                detail: format!("scalar of {} bytes for P-256", v.len()),
            });
        }
        let mut out = [0u8; 32];
        out[32 - v.len()..].copy_from_slice(v);
        Ok(out)
    }
    let r = pad(r)?;
    let s = pad(s)?;
    Signature::from_scalars(r, s).map_err(|e| KeystoreError::InvalidBlob {
        what: "signature",
        detail: e.to_string(),
    })
}

/// The SubjectPublicKeyInfo DER of a public key.
pub fn spki_der(key: &PublicKey) -> Vec<u8> {
    key.to_public_key_der()
        .map(|d| d.as_bytes().to_vec())
        .unwrap_or_default()
}

/// The public key as a PEM `PUBLIC KEY` block.
pub fn public_key_pem(key: &PublicKey) -> String {
    key.to_public_key_pem(p256::pkcs8::LineEnding::LF)
        .unwrap_or_default()
}

/// Hex SHA-256 of the SubjectPublicKeyInfo DER: the key's fingerprint.
pub fn fingerprint(key: &PublicKey) -> String {
    hex::encode(Sha256::digest(spki_der(key)))
}

/// Verify a signature made by any backend.
pub fn verify(key: &PublicKey, message: &[u8], sig: &Signature) -> bool {
    use p256::ecdsa::signature::Verifier;
    VerifyingKey::from(key).verify(message, sig).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalars_are_padded_and_trimmed() {
        let sig = signature_from_scalars(&[0, 0, 1], &[2; 32]).expect("sig");
        let bytes = sig.to_bytes();
        assert_eq!(bytes[31], 1);
        assert!(bytes[..31].iter().all(|b| *b == 0));
        assert!(signature_from_scalars(&[1; 33], &[1; 32]).is_err());
        assert!(signature_from_scalars(&[0; 32], &[1; 32]).is_err());
    }
}
