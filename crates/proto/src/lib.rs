//! Wire types shared by the devid device and the devid server.
//!
//! Everything that crosses the network between a device and the server is defined here once:
//! the enrolment and renewal JSON bodies, the JSON error body, the device id rules and the
//! identity URI carried in device certificates, and the admin API's JSON shapes.
#![forbid(unsafe_code)]

use std::fmt;
use std::str::FromStr;

use base64::Engine;
use serde::{Deserialize, Serialize};

/// Prefix of the SAN URI that names a device in its certificate: `urn:devid:<id>`.
pub const DEVICE_URI_PREFIX: &str = "urn:devid:";

/// Longest device id accepted.
pub const MAX_DEVICE_ID_LEN: usize = 64;

/// Path of the enrolment endpoint.
pub const ENROLL_PATH: &str = "/v1/enroll";

/// Path of the renewal endpoint (mutual TLS).
pub const RENEW_PATH: &str = "/v1/renew";

/// Path of the first step of an attested enrolment (token in the body, not consumed).
pub const ATTEST_START_PATH: &str = "/v1/attest/start";

/// Path of the first step of an attested renewal (mutual TLS with the device certificate).
pub const RENEW_ATTEST_START_PATH: &str = "/v1/renew/attest/start";

/// A device id: lowercase `[a-z0-9-]{1,64}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DeviceId(String);

/// A string that is not a valid device id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid device id: use 1 to 64 characters from lowercase a-z, digits 0-9 and '-' \
     (got {len} characters{detail})"
)]
pub struct InvalidDeviceId {
    len: usize,
    detail: &'static str,
}

impl DeviceId {
    /// Check and wrap a device id.
    pub fn parse(s: &str) -> Result<Self, InvalidDeviceId> {
        if s.is_empty() || s.len() > MAX_DEVICE_ID_LEN {
            return Err(InvalidDeviceId {
                len: s.len(),
                detail: "",
            });
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(InvalidDeviceId {
                len: s.len(),
                detail: ", some outside the allowed set",
            });
        }
        Ok(Self(s.to_owned()))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The identity URI carried in the certificate's SAN: `urn:devid:<id>`.
    pub fn uri(&self) -> String {
        format!("{DEVICE_URI_PREFIX}{}", self.0)
    }

    /// Parse an identity URI `urn:devid:<id>` back into a device id.
    pub fn from_uri(uri: &str) -> Option<Self> {
        uri.strip_prefix(DEVICE_URI_PREFIX)
            .and_then(|id| Self::parse(id).ok())
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for DeviceId {
    type Err = InvalidDeviceId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<String> for DeviceId {
    type Error = InvalidDeviceId;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<DeviceId> for String {
    fn from(id: DeviceId) -> String {
        id.0
    }
}

impl AsRef<str> for DeviceId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// `POST /v1/enroll` request body.
///
/// `Debug` leaves the token out so the body can never be logged with it.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// The one-time enrolment token given by the operator.
    pub token: String,
    /// PKCS#10 certificate signing request, PEM.
    pub csr: String,
    /// The device id the device asks for (ignored when the token is bound to an id; refused
    /// with 403 when it differs from that id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// The answer to an attestation challenge (`POST /v1/attest/start`), when attesting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attestation: Option<AttestationEvidence>,
    /// The keystore backend the device uses (`tpm`, `pkcs11`, `soft`), as it reports it: the
    /// registry keeps it labelled as reported (only attestation proves a TPM key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_backend: Option<String>,
}

impl fmt::Debug for EnrollRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnrollRequest")
            .field("token", &"<redacted>")
            .field("csr_len", &self.csr.len())
            .field("device_id", &self.device_id)
            .field("attested", &self.attestation.is_some())
            .field("key_backend", &self.key_backend)
            .finish()
    }
}

/// The two values that tie an attestation to its challenge, computed the same way by the
/// device and the server.
pub mod attest_binding {
    use hmac::{Hmac, Mac};
    use sha2::{Digest, Sha256};

    fn len16(n: usize) -> [u8; 2] {
        u16::try_from(n).unwrap_or(u16::MAX).to_be_bytes()
    }

    /// The TPM2_Certify qualifying data: SHA-256("devid-attest-v1" || len || challenge_id ||
    /// len || secret || SHA-256(CSR DER)). Only the TPM that activated the credential knows
    /// `secret`, and the CSR named here is the one the certificate will be issued for.
    pub fn qualifying_data(challenge_id: &str, secret: &[u8], csr_der: &[u8]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(b"devid-attest-v1");
        h.update(len16(challenge_id.len()));
        h.update(challenge_id.as_bytes());
        h.update(len16(secret.len()));
        h.update(secret);
        h.update(Sha256::digest(csr_der));
        h.finalize().into()
    }

    /// HMAC-SHA256(secret, "devid-activate" || challenge_id): shows the credential was
    /// activated, without sending the secret.
    pub fn activation_proof(secret: &[u8], challenge_id: &str) -> [u8; 32] {
        mac(secret, challenge_id).finalize().into_bytes().into()
    }

    fn mac(secret: &[u8], challenge_id: &str) -> Hmac<Sha256> {
        // HMAC takes keys of any length: this cannot fail.
        let mut m = <Hmac<Sha256> as hmac::digest::KeyInit>::new_from_slice(secret)
            .expect("HMAC accepts any key length");
        m.update(b"devid-activate");
        m.update(challenge_id.as_bytes());
        m
    }

    /// Constant-time check of a received proof (hex) against the expected one.
    pub fn proof_matches(secret: &[u8], challenge_id: &str, proof_hex: &str) -> bool {
        let Some(got) = decode_hex(proof_hex) else {
            return false;
        };
        mac(secret, challenge_id).verify_slice(&got).is_ok()
    }

    fn decode_hex(s: &str) -> Option<Vec<u8>> {
        if s.len() != 64 {
            return None;
        }
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
            .collect()
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn known_answers() {
            // HMAC-SHA256(key = 32 x 0x42, "devid-activate" || "c1"), computed with Python's hmac.
            let p = activation_proof(&[0x42; 32], "c1");
            let hex: String = p.iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(
                hex,
                "27e55a90dded8fe7da41b41124be39c891c98b554bce30b5f3c013e73c09200f"
            );
            // the definition, computed independently
            let mut m = b"devid-attest-v1".to_vec();
            m.extend_from_slice(&[0, 2]);
            m.extend_from_slice(b"ab");
            m.extend_from_slice(&[0, 1]);
            m.extend_from_slice(b"c");
            m.extend_from_slice(&Sha256::digest(b"csr"));
            assert_eq!(
                qualifying_data("ab", b"c", b"csr").as_slice(),
                &Sha256::digest(&m)[..]
            );
        }

        #[test]
        fn proof_checks_secret_and_challenge() {
            let p = activation_proof(b"s3cret", "c1");
            let hex: String = p.iter().map(|b| format!("{b:02x}")).collect();
            assert!(proof_matches(b"s3cret", "c1", &hex));
            assert!(!proof_matches(b"s3cres", "c1", &hex));
            assert!(!proof_matches(b"s3cret", "c2", &hex));
            assert!(!proof_matches(b"s3cret", "c1", &hex[..62]));
            assert_ne!(
                qualifying_data("c1", b"s", b"csr"),
                qualifying_data("c1", b"s", b"csR")
            );
            assert_ne!(
                qualifying_data("c1", b"s", b"csr"),
                qualifying_data("c", b"1s", b"csr")
            );
        }
    }
}

/// `POST /v1/attest/start` and `POST /v1/renew/attest/start` request body: the TPM's
/// endorsement key certificate and its attestation key. Binary fields are standard base64 of
/// the raw TPM structures.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttestStartRequest {
    /// The one-time enrolment token (checked, not consumed); absent at renewal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Which endorsement key: `rsa2048`, `ecc-p256`, `ecc-p384`, `rsa3072`.
    pub ek_alg: String,
    /// The EK certificate as read from the TPM's NV (DER, possibly padded), base64.
    pub ek_cert: String,
    /// Intermediate certificates (DER, base64), untrusted: only the configured roots are.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ek_chain: Vec<String>,
    /// The AK's public area (TPMT_PUBLIC), base64.
    pub ak_public: String,
}

impl fmt::Debug for AttestStartRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AttestStartRequest")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("ek_alg", &self.ek_alg)
            .field("ek_cert_len", &self.ek_cert.len())
            .field("ek_chain", &self.ek_chain.len())
            .finish()
    }
}

/// The server's credential challenge: MakeCredential to the EK, bound to the AK's Name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttestChallenge {
    /// Names the challenge in the second step (single use).
    pub challenge_id: String,
    /// TPM2B_ID_OBJECT contents, base64.
    pub credential_blob: String,
    /// TPM2B_ENCRYPTED_SECRET contents, base64.
    pub encrypted_secret: String,
    /// Seconds until the challenge expires.
    pub expires_in_secs: u64,
}

/// The device's answer to a challenge, sent with the CSR (`POST /v1/enroll` or `/v1/renew`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttestationEvidence {
    /// The challenge answered.
    pub challenge_id: String,
    /// Hex HMAC-SHA256(secret, "devid-activate" || challenge_id): the activation worked.
    pub activation_proof: String,
    /// The device key's public area (TPMT_PUBLIC), base64.
    pub key_public: String,
    /// TPM2_Certify's TPMS_ATTEST, base64.
    pub certify_info: String,
    /// Its TPMT_SIGNATURE by the AK, base64.
    pub certify_signature: String,
}

/// `POST /v1/enroll` and `POST /v1/renew` response body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollResponse {
    /// The device id the certificate names.
    pub device_id: String,
    /// PEM: the device certificate followed by the fleet CA certificate.
    pub certificate_chain: String,
    /// Where the device connects for MQTT: `mqtts://HOST:PORT`.
    pub mqtt_url: String,
    /// Hex SHA-256 of the fleet CA certificate's DER.
    pub ca_pin: String,
    /// What the server verified about the key: `ek-cert`, `ek-allowlist` or `none`.
    #[serde(default = "assurance_none")]
    pub assurance: String,
}

fn assurance_none() -> String {
    "none".to_owned()
}

/// `POST /v1/renew` request body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    /// PKCS#10 certificate signing request, PEM, for the same key or a new one (rotation).
    pub csr: String,
    /// The answer to `POST /v1/renew/attest/start`, when attesting (key rotation of an
    /// attested device, or an unattested TPM device becoming attested).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attestation: Option<AttestationEvidence>,
}

/// Every error response of the HTTP API: `{"error": "...", "code": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// A sentence for people: what failed and what to do.
    pub error: String,
    /// A stable machine-readable code, e.g. `token_used`.
    pub code: String,
}

/// Registry state of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceState {
    /// Allowed to connect and renew.
    Active,
    /// Temporarily refused; `resume` makes it active again.
    Suspended,
    /// Refused for good.
    Revoked,
}

impl DeviceState {
    /// The lowercase name used in JSON and in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceState::Active => "active",
            DeviceState::Suspended => "suspended",
            DeviceState::Revoked => "revoked",
        }
    }
}

impl fmt::Display for DeviceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DeviceState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "active" => Ok(DeviceState::Active),
            "suspended" => Ok(DeviceState::Suspended),
            "revoked" => Ok(DeviceState::Revoked),
            other => Err(format!("unknown device state {other:?}")),
        }
    }
}

/// A device as the admin API shows it. Times are RFC 3339 UTC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// Device id.
    pub id: String,
    /// Registry state.
    pub state: DeviceState,
    /// Serial of the newest certificate issued, hex.
    pub cert_serial: String,
    /// Expiry of the newest certificate issued.
    pub cert_not_after: String,
    /// Hex SHA-256 of the device public key's SubjectPublicKeyInfo DER.
    pub key_fingerprint: String,
    /// Policy name the device was enrolled with.
    pub policy: String,
    /// When the registry row was created.
    pub created_at: String,
    /// When the device last enrolled.
    pub enrolled_at: String,
    /// When the device was last seen (enrolment, renewal, connection).
    pub last_seen: String,
    /// What the server verified about the key: `ek-cert` (TPM attested, EK certificate
    /// chains to a configured root), `ek-allowlist` (the token named this EK) or `none`.
    #[serde(default = "assurance_none")]
    pub assurance: String,
    /// Hex SHA-256 of the EK's SubjectPublicKeyInfo, for attested devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ek_fingerprint: Option<String>,
    /// TPM manufacturer from the EK certificate (e.g. `id:00001014`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm_manufacturer: Option<String>,
    /// TPM model from the EK certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm_model: Option<String>,
    /// The keystore backend the device *reported* at enrolment (`tpm`, `pkcs11`, `soft`): a
    /// claim nothing proves. Absent for devices that did not report one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported_backend: Option<String>,
}

/// `POST /v1/admin/tokens` request body.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenCreateRequest {
    /// Bind the token to this device id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// Lifetime in seconds (server default when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
    /// Policy name given to the device that uses the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// `required`: the device must attest its key (stricter than the server's mode only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attestation: Option<String>,
    /// Hex SHA-256 of the EK public key (SPKI) the device must attest with: assurance
    /// `ek-allowlist` when its certificate chains to no configured root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ek_fingerprint: Option<String>,
}

/// `POST /v1/admin/tokens` response body. The only place a token's plaintext ever appears.
#[derive(Clone, Serialize, Deserialize)]
pub struct TokenCreateResponse {
    /// The one-time token (shown once; the server keeps only its SHA-256).
    pub token: String,
    /// Expiry, RFC 3339 UTC.
    pub expires_at: String,
    /// The device id the token is bound to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// Policy name.
    pub policy: String,
}

impl fmt::Debug for TokenCreateResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenCreateResponse")
            .field("token", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .field("device_id", &self.device_id)
            .field("policy", &self.policy)
            .finish()
    }
}

/// One row of the audit log. Times are RFC 3339 UTC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Monotonic row id.
    pub id: i64,
    /// When it happened.
    pub time: String,
    /// Who acted: `admin`, `device:<id>`, `anonymous`.
    pub actor: String,
    /// The device concerned, if any.
    pub device_id: Option<String>,
    /// What was attempted: `enroll`, `renew`, `token.create`, `device.revoke`, ...
    pub action: String,
    /// `ok` or `refused`.
    pub outcome: String,
    /// The refusal code or a short non-secret detail.
    pub detail: String,
    /// Peer address of the request.
    pub source: String,
}

/// `POST /v1/admin/credentials` request body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CredentialCreateRequest {
    /// The credential's name (1 to 64 of `a-z`, `0-9`, `-`, `_`), in audit rows as
    /// `admin:<name>`.
    pub name: String,
    /// Read everything, change nothing.
    #[serde(default)]
    pub read_only: bool,
}

/// `POST /v1/admin/credentials` response body: the only place the bearer token appears.
#[derive(Clone, Serialize, Deserialize)]
pub struct CredentialCreateResponse {
    /// Name.
    pub name: String,
    /// `admin` or `read-only`.
    pub role: String,
    /// The bearer token (shown once; the server keeps only its SHA-256).
    pub token: String,
}

impl fmt::Debug for CredentialCreateResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CredentialCreateResponse")
            .field("name", &self.name)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

/// An admin credential as the API lists it (never its token).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredentialInfo {
    /// Name.
    pub name: String,
    /// `admin` or `read-only`.
    pub role: String,
    /// Creation, RFC 3339 UTC.
    pub created_at: String,
    /// Revocation, RFC 3339 UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<String>,
}

// --- telemetry messages (`GET /v1/devices/{id}/messages`, `GET /v1/stream`) ---

/// One message as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageView {
    /// Row id (increasing).
    pub id: i64,
    /// Device id.
    pub device_id: String,
    /// Topic.
    pub topic: String,
    /// QoS it was published with.
    pub qos: u8,
    /// Idempotency key, if any.
    #[serde(default)]
    pub msg_id: Option<String>,
    /// Receive time, RFC 3339 UTC.
    pub received_at: String,
    /// `utf8` or `base64`.
    pub payload_encoding: String,
    /// The payload in that encoding.
    pub payload: String,
}

/// A page of messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessagePage {
    /// Messages, oldest first.
    pub messages: Vec<MessageView>,
    /// Pass as `since` for the next page (the last id shown), absent when the page is empty.
    #[serde(default)]
    pub next_since: Option<i64>,
}

/// Encode a payload for JSON (the messages API): text when UTF-8, base64 otherwise.
pub fn payload_text(payload: &[u8]) -> (&'static str, String) {
    match std::str::from_utf8(payload) {
        Ok(s) => ("utf8", s.to_owned()),
        Err(_) => (
            "base64",
            base64::engine::general_purpose::STANDARD.encode(payload),
        ),
    }
}

impl MessageView {
    /// The payload bytes back.
    pub fn payload_bytes(&self) -> Option<Vec<u8>> {
        match self.payload_encoding.as_str() {
            "utf8" => Some(self.payload.as_bytes().to_vec()),
            "base64" => base64::engine::general_purpose::STANDARD
                .decode(&self.payload)
                .ok(),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_id_rules() {
        assert!(DeviceId::parse("sensor-01").is_ok());
        assert!(DeviceId::parse(&"a".repeat(64)).is_ok());
        assert!(DeviceId::parse(&"a".repeat(65)).is_err());
        assert!(DeviceId::parse("").is_err());
        assert!(DeviceId::parse("Sensor").is_err());
        assert!(DeviceId::parse("a_b").is_err());
        assert!(DeviceId::parse("a/b").is_err());
        let id = DeviceId::parse("x1").unwrap();
        assert_eq!(id.uri(), "urn:devid:x1");
        assert_eq!(DeviceId::from_uri("urn:devid:x1"), Some(id));
        assert_eq!(DeviceId::from_uri("urn:other:x1"), None);
    }

    #[test]
    fn json_shapes() {
        let r: EnrollRequest = serde_json::from_str(r#"{"token":"t","csr":"c"}"#).unwrap();
        assert!(r.device_id.is_none());
        assert!(!format!("{r:?}").contains("\"t\""));
        assert!(serde_json::from_str::<EnrollRequest>(r#"{"token":"t","csr":"c","x":1}"#).is_err());
        let s: DeviceState = serde_json::from_str("\"revoked\"").unwrap();
        assert_eq!(s, DeviceState::Revoked);
        assert!(serde_json::from_str::<DeviceId>("\"BAD\"").is_err());
    }
}
