//! What the registry keeps about key attestation: per device the verified [`Attestation`],
//! and the short-lived [`Challenge`]s between the two steps of an attested enrolment or
//! renewal (in the database, so the second step may reach another node).

use devid_proto::DeviceId;
use zeroize::Zeroizing;

use crate::StoreError;

/// A string that held a secret, wiped on drop (how backends read a challenge's secret).
pub type Secret = Zeroizing<String>;

/// What the server verified about a device's TPM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attestation {
    /// `ek-cert` (the EK certificate chains to a configured root) or `ek-allowlist` (the
    /// token named this EK).
    pub assurance: String,
    /// Hex SHA-256 of the EK's SubjectPublicKeyInfo.
    pub ek_fingerprint: String,
    /// TPM manufacturer from the EK certificate.
    pub ek_manufacturer: Option<String>,
    /// TPM model from the EK certificate.
    pub ek_model: Option<String>,
    /// Hex of the AK's public area (TPMT_PUBLIC).
    pub ak_public: String,
}

/// Who may answer a challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChallengeFor {
    /// An enrolment with the token of this hash.
    Token(String),
    /// A renewal by this device (mutual TLS).
    Device(DeviceId),
}

/// A pending credential challenge.
#[derive(Debug, Clone)]
pub struct Challenge {
    /// Random id, hex.
    pub id: String,
    /// Who may answer it.
    pub bound: ChallengeFor,
    /// What will be recorded if the answer is good.
    pub attestation: Attestation,
    /// The secret MakeCredential protected (wiped on drop).
    pub secret: Zeroizing<Vec<u8>>,
    /// Expiry, ms since the epoch.
    pub expires_at_ms: i64,
}

impl Challenge {
    /// The secret as the backends store it (hex), wiped on drop.
    pub fn secret_hex(&self) -> Secret {
        Zeroizing::new(hex::encode(self.secret.as_slice()))
    }

    /// A challenge row back as the contract's type: exactly one of `token_hash` and
    /// `device_id` is set.
    pub fn from_row(
        id: &str,
        token_hash: Option<String>,
        device_id: Option<String>,
        secret_hex: &str,
        expires_at_ms: i64,
        attestation: Attestation,
    ) -> Result<Challenge, StoreError> {
        let corrupt = |detail: String| StoreError::Corrupt {
            what: "attestation challenge",
            detail,
        };
        let bound = match (token_hash, device_id) {
            (Some(t), None) => ChallengeFor::Token(t),
            (None, Some(d)) => {
                ChallengeFor::Device(DeviceId::parse(&d).map_err(|e| corrupt(e.to_string()))?)
            }
            _ => return Err(corrupt("neither a token nor a device".into())),
        };
        let secret =
            Zeroizing::new(hex::decode(secret_hex).map_err(|e| corrupt(format!("secret: {e}")))?);
        Ok(Challenge {
            id: id.to_owned(),
            bound,
            attestation,
            secret,
            expires_at_ms,
        })
    }
}
