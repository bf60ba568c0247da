//! Device-side enrolment: build a PKCS#10 request with a key that never leaves its keystore,
//! and talk to the devid server over HTTPS trusting only the pinned fleet CA.
//!
//! * [`build_csr`] / [`build_csr_with_keystore`]: the CSR is signed by a callback (TPM,
//!   PKCS#11 token or soft key); no private key is ever handed to this crate.
//! * [`enroll`]: `POST /v1/enroll` with a one-time token. The server is trusted only if its
//!   chain contains a certificate whose SHA-256(DER) equals the CA pin, and the server
//!   certificate then verifies against that CA for the URL's host name.
//! * [`renew`]: `POST /v1/renew` over mutual TLS, the TLS signature made by the keystore.
//! * [`verify_issued_chain`]: the device's check of the chain either returns (pinned CA, our
//!   key, our device id by the one identity rule of `devid_tls::identity`).
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use devid_keystore::Keystore;
use devid_keystore::{AttestIdentity, KeyAttestation};
use devid_proto::{
    attest_binding, AttestChallenge, AttestStartRequest, AttestationEvidence, EnrollRequest,
    EnrollResponse, ErrorBody, RenewRequest, ATTEST_START_PATH, ENROLL_PATH,
    RENEW_ATTEST_START_PATH, RENEW_PATH,
};
use devid_tls::parse_pin;
pub use devid_tls::KeystoreSigningKey;

mod chain;

pub use chain::{verify_issued_chain, ChainError, VerifiedChain};
use p256::pkcs8::DecodePublicKey;
use rcgen::{CertificateParams, DistinguishedName, DnType, PublicKeyData, PKCS_ECDSA_P256_SHA256};
use rustls::client::ResolvesClientCert;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

/// Errors of enrolment and renewal. Messages never carry the token, a key or a CSR.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnrollError {
    /// The CA pin is not 64 hex characters.
    #[error("invalid CA pin: expected 64 hex characters (SHA-256 of the CA certificate DER)")]
    InvalidPin,
    /// The server's certificate chain does not contain the pinned CA: wrong server, wrong pin,
    /// or someone in the middle. Nothing was sent.
    #[error(
        "CA pin mismatch: the server at {url} presented no certificate with SHA-256 {expected}; \
         check the pin printed by `devid-server init` (nothing was sent to this server)"
    )]
    PinMismatch {
        /// The server URL.
        url: String,
        /// The pin we expected.
        expected: String,
    },
    /// The URL is not `https://HOST[:PORT]`.
    #[error("invalid server URL {0:?}: use https://HOST[:PORT]")]
    InvalidUrl(String),
    /// TLS setup failed.
    #[error("TLS setup: {0}")]
    Tls(String),
    /// The server could not be reached or the TLS handshake failed.
    #[error("cannot reach the devid server at {url}: {detail}")]
    Transport {
        /// The URL.
        url: String,
        /// What failed.
        detail: String,
    },
    /// The server refused.
    #[error("server refused ({status} {code}): {message}")]
    Server {
        /// HTTP status.
        status: u16,
        /// Stable error code, e.g. `token_used`.
        code: String,
        /// The server's sentence.
        message: String,
        /// `Retry-After` of a throttled request (429), in seconds.
        retry_after_secs: Option<u64>,
    },
    /// The server's answer is not what the protocol says.
    #[error("invalid answer from the server: {0}")]
    InvalidResponse(String),
    /// The public key given is not an ECDSA P-256 SubjectPublicKeyInfo.
    #[error("invalid device public key: {0}")]
    InvalidKey(String),
    /// The keystore could not sign.
    #[error("the keystore could not sign: {0}")]
    Signer(String),
    /// The CSR could not be built.
    #[error("cannot build the CSR: {0}")]
    Csr(String),
    /// The client certificate does not belong to the keystore's key.
    #[error("the device certificate does not belong to the keystore's key; re-enrol")]
    CertKeyMismatch,
    /// The TPM could not do its part of the attestation.
    #[error("key attestation in the TPM failed: {0}")]
    Attestation(String),
}

/// A signing callback: ECDSA P-256 over SHA-256 of the input, DER-encoded signature.
pub type SignFn<'a> = &'a dyn Fn(&[u8]) -> Result<Vec<u8>, String>;

struct RemoteKey<'a> {
    point: Vec<u8>,
    sign: SignFn<'a>,
    error: std::cell::RefCell<Option<String>>,
}

impl PublicKeyData for RemoteKey<'_> {
    fn der_bytes(&self) -> &[u8] {
        &self.point
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &PKCS_ECDSA_P256_SHA256
    }
}

impl rcgen::SigningKey for RemoteKey<'_> {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        (self.sign)(msg).map_err(|e| {
            *self.error.borrow_mut() = Some(e);
            rcgen::Error::RemoteKeyError
        })
    }
}

/// Build a PEM CSR for the P-256 key whose SubjectPublicKeyInfo DER is `public_key_spki_der`,
/// signed by `sign` (which returns a DER ECDSA signature over SHA-256 of its input). The
/// subject CN is `device_id` when given; the server decides the certificate's contents.
pub fn build_csr(
    sign: SignFn<'_>,
    public_key_spki_der: &[u8],
    device_id: Option<&str>,
) -> Result<String, EnrollError> {
    let public = p256::PublicKey::from_public_key_der(public_key_spki_der)
        .map_err(|e| EnrollError::InvalidKey(format!("not a P-256 SubjectPublicKeyInfo: {e}")))?;
    let point = p256::EncodedPoint::from(public).as_bytes().to_vec();
    let key = RemoteKey {
        point,
        sign,
        error: std::cell::RefCell::new(None),
    };
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, device_id.unwrap_or("devid-device"));
    params.distinguished_name = dn;
    let csr = params
        .serialize_request(&key)
        .map_err(|e| match key.error.take() {
            Some(detail) => EnrollError::Signer(detail),
            None => EnrollError::Csr(e.to_string()),
        })?;
    csr.pem().map_err(|e| EnrollError::Csr(e.to_string()))
}

/// [`build_csr`] with a devid keystore's key.
pub fn build_csr_with_keystore(
    keystore: &dyn Keystore,
    device_id: Option<&str>,
) -> Result<String, EnrollError> {
    let spki = devid_keystore::spki_der(&keystore.public_key());
    let sign = |m: &[u8]| -> Result<Vec<u8>, String> {
        keystore
            .sign(m)
            .map(|s| s.to_der().as_bytes().to_vec())
            .map_err(|e| e.to_string())
    };
    build_csr(&sign, &spki, device_id)
}

struct Client {
    agent: ureq::Agent,
    mismatch: Arc<AtomicBool>,
    base: String,
    pin_hex: String,
}

fn client(
    server_url: &str,
    ca_pin_hex: &str,
    client_cert: Option<Arc<dyn ResolvesClientCert>>,
) -> Result<Client, EnrollError> {
    let pin = parse_pin(ca_pin_hex).map_err(|_| EnrollError::InvalidPin)?;
    let base = server_url.trim_end_matches('/');
    let rest = base
        .strip_prefix("https://")
        .ok_or_else(|| EnrollError::InvalidUrl(server_url.to_owned()))?;
    if rest.is_empty() || rest.contains('/') || rest.contains('@') {
        return Err(EnrollError::InvalidUrl(server_url.to_owned()));
    }
    let (tls, mismatch) =
        devid_tls::client_config(ca_pin_hex, client_cert).map_err(|e| match e {
            devid_tls::TlsError::InvalidPin => EnrollError::InvalidPin,
            e => EnrollError::Tls(e.to_string()),
        })?;
    let agent = ureq::AgentBuilder::new()
        .tls_config(Arc::new(tls))
        .timeout(Duration::from_secs(60))
        .build();
    Ok(Client {
        agent,
        mismatch,
        base: base.to_owned(),
        pin_hex: hex::encode(pin),
    })
}

impl Client {
    fn post(&self, path: &str, body: &[u8]) -> Result<EnrollResponse, EnrollError> {
        let resp = self.send(path, body)?;
        let out: EnrollResponse = resp
            .into_json()
            .map_err(|e| EnrollError::InvalidResponse(e.to_string()))?;
        if !out.ca_pin.eq_ignore_ascii_case(&self.pin_hex) {
            return Err(EnrollError::InvalidResponse(
                "the server names another CA pin than the one this device trusts".into(),
            ));
        }
        let certs = CertificateDer::pem_slice_iter(out.certificate_chain.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| EnrollError::InvalidResponse(format!("certificate_chain: {e}")))?;
        if certs.is_empty() {
            return Err(EnrollError::InvalidResponse(
                "certificate_chain holds no certificate".into(),
            ));
        }
        Ok(out)
    }

    fn challenge(&self, path: &str, body: &[u8]) -> Result<AttestChallenge, EnrollError> {
        self.send(path, body)?
            .into_json()
            .map_err(|e| EnrollError::InvalidResponse(e.to_string()))
    }

    fn send(&self, path: &str, body: &[u8]) -> Result<ureq::Response, EnrollError> {
        let result = self
            .agent
            .post(&format!("{}{path}", self.base))
            .set("content-type", "application/json")
            .send_bytes(body);
        let resp = match result {
            Ok(r) => r,
            Err(ureq::Error::Status(status, resp)) => {
                let retry_after_secs = resp
                    .header("retry-after")
                    .and_then(|v| v.trim().parse::<u64>().ok());
                let body: Option<ErrorBody> = resp.into_json().ok();
                return Err(EnrollError::Server {
                    status,
                    code: body.as_ref().map(|b| b.code.clone()).unwrap_or_default(),
                    message: body.map(|b| b.error).unwrap_or_default(),
                    retry_after_secs,
                });
            }
            Err(ureq::Error::Transport(t)) => {
                if self.mismatch.load(Ordering::SeqCst) {
                    return Err(EnrollError::PinMismatch {
                        url: self.base.clone(),
                        expected: self.pin_hex.clone(),
                    });
                }
                return Err(EnrollError::Transport {
                    url: self.base.clone(),
                    detail: t.to_string(),
                });
            }
        };
        Ok(resp)
    }
}

/// Enrol: send `csr_pem` and the one-time `token` to `server_url` (`https://HOST:PORT`),
/// trusting the server only through the CA whose certificate hashes to `ca_pin_hex`.
pub fn enroll(
    server_url: &str,
    token: &str,
    ca_pin_hex: &str,
    csr_pem: &str,
    device_id: Option<&str>,
) -> Result<EnrollResponse, EnrollError> {
    enroll_with(
        server_url, token, ca_pin_hex, csr_pem, device_id, None, None,
    )
}

/// [`enroll`] with the answer to an attestation challenge ([`attest_start`],
/// [`answer_challenge`]), and the keystore backend (`tpm`, `pkcs11`, `soft`) the key lives
/// in, which the server records as *reported* (only attestation proves a TPM key).
pub fn enroll_with(
    server_url: &str,
    token: &str,
    ca_pin_hex: &str,
    csr_pem: &str,
    device_id: Option<&str>,
    attestation: Option<AttestationEvidence>,
    key_backend: Option<&str>,
) -> Result<EnrollResponse, EnrollError> {
    let c = client(server_url, ca_pin_hex, None)?;
    let mut req = EnrollRequest {
        token: token.to_owned(),
        csr: csr_pem.to_owned(),
        device_id: device_id.map(str::to_owned),
        attestation,
        key_backend: key_backend.map(str::to_owned),
    };
    // the body holds the token: both are wiped once sent
    let body = zeroize::Zeroizing::new(
        serde_json::to_vec(&req).map_err(|e| EnrollError::Csr(e.to_string()))?,
    );
    zeroize::Zeroize::zeroize(&mut req.token);
    c.post(ENROLL_PATH, &body)
}

/// Renew over mutual TLS: present `cert_chain_pem` (from enrolment) with the keystore's key,
/// and send `csr_pem` (for the same key, or a new one to rotate).
pub fn renew(
    server_url: &str,
    ca_pin_hex: &str,
    cert_chain_pem: &str,
    keystore: Arc<dyn Keystore>,
    csr_pem: &str,
) -> Result<EnrollResponse, EnrollError> {
    renew_with(
        server_url,
        ca_pin_hex,
        cert_chain_pem,
        keystore,
        csr_pem,
        None,
    )
}

fn mtls_client(
    server_url: &str,
    ca_pin_hex: &str,
    cert_chain_pem: &str,
    keystore: Arc<dyn Keystore>,
) -> Result<Client, EnrollError> {
    let resolver = devid_tls::client_cert(cert_chain_pem, KeystoreSigningKey::new(keystore))
        .map_err(|e| match e {
            devid_tls::TlsError::Certificate(d) if d.contains("not this device's key") => {
                EnrollError::CertKeyMismatch
            }
            e => EnrollError::Tls(e.to_string()),
        })?;
    client(server_url, ca_pin_hex, Some(resolver))
}

/// [`renew`] with the answer to an attestation challenge ([`renew_attest_start`]).
pub fn renew_with(
    server_url: &str,
    ca_pin_hex: &str,
    cert_chain_pem: &str,
    keystore: Arc<dyn Keystore>,
    csr_pem: &str,
    attestation: Option<AttestationEvidence>,
) -> Result<EnrollResponse, EnrollError> {
    let c = mtls_client(server_url, ca_pin_hex, cert_chain_pem, keystore)?;
    let body = serde_json::to_vec(&RenewRequest {
        csr: csr_pem.to_owned(),
        attestation,
    })
    .map_err(|e| EnrollError::Csr(e.to_string()))?;
    c.post(RENEW_PATH, &body)
}

fn start_request(identity: &AttestIdentity, token: Option<&str>) -> AttestStartRequest {
    use base64::Engine as _;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    AttestStartRequest {
        token: token.map(str::to_owned),
        ek_alg: identity.ek_alg.clone(),
        ek_cert: b64(&identity.ek_cert),
        ek_chain: identity.ek_chain.iter().map(|c| b64(c)).collect(),
        ak_public: b64(&identity.ak_public),
    }
}

/// First step of an attested enrolment: show the EK certificate and the AK with the token
/// (checked, not consumed). The server answers with a credential challenge, or refuses with
/// `attestation_off` when it does not attest.
pub fn attest_start(
    server_url: &str,
    token: &str,
    ca_pin_hex: &str,
    identity: &AttestIdentity,
) -> Result<AttestChallenge, EnrollError> {
    let c = client(server_url, ca_pin_hex, None)?;
    let mut req = start_request(identity, Some(token));
    let body = zeroize::Zeroizing::new(
        serde_json::to_vec(&req).map_err(|e| EnrollError::Csr(e.to_string()))?,
    );
    if let Some(t) = req.token.as_mut() {
        zeroize::Zeroize::zeroize(t);
    }
    c.challenge(ATTEST_START_PATH, &body)
}

/// First step of an attested renewal, over mutual TLS with the current certificate.
pub fn renew_attest_start(
    server_url: &str,
    ca_pin_hex: &str,
    cert_chain_pem: &str,
    keystore: Arc<dyn Keystore>,
    identity: &AttestIdentity,
) -> Result<AttestChallenge, EnrollError> {
    let c = mtls_client(server_url, ca_pin_hex, cert_chain_pem, keystore)?;
    let body = serde_json::to_vec(&start_request(identity, None))
        .map_err(|e| EnrollError::Csr(e.to_string()))?;
    c.challenge(RENEW_ATTEST_START_PATH, &body)
}

/// Second step, in the TPM: activate the credential (only the TPM with that EK and AK can),
/// then certify the device key with the AK over qualifying data that binds the challenge,
/// the secret and `csr_pem`.
pub fn answer_challenge(
    attestor: &dyn KeyAttestation,
    ek_alg: &str,
    challenge: &AttestChallenge,
    csr_pem: &str,
) -> Result<AttestationEvidence, EnrollError> {
    answer_challenge_with(attestor, ek_alg, challenge, csr_pem, &|q| {
        attestor.certify_key(q)
    })
}

/// [`answer_challenge`] with another key certified than the device key: `certify` makes the
/// AK's TPM2_Certify of the key the CSR is for (a rotation's next key).
pub fn answer_challenge_with(
    attestor: &dyn KeyAttestation,
    ek_alg: &str,
    challenge: &AttestChallenge,
    csr_pem: &str,
    certify: &dyn Fn(
        &[u8],
    )
        -> Result<devid_keystore::KeyCertification, devid_keystore::KeystoreError>,
) -> Result<AttestationEvidence, EnrollError> {
    use base64::Engine as _;
    use rustls::pki_types::CertificateSigningRequestDer;
    let b64 = base64::engine::general_purpose::STANDARD;
    let bad = |what: &str, e: base64::DecodeError| {
        EnrollError::InvalidResponse(format!("challenge {what}: {e}"))
    };
    let blob = b64
        .decode(&challenge.credential_blob)
        .map_err(|e| bad("credential_blob", e))?;
    let enc = b64
        .decode(&challenge.encrypted_secret)
        .map_err(|e| bad("encrypted_secret", e))?;
    let csr = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
        .map_err(|e| EnrollError::Csr(e.to_string()))?;
    let secret = attestor
        .activate_credential(ek_alg, &blob, &enc)
        .map_err(|e| EnrollError::Attestation(e.to_string()))?;
    let q = attest_binding::qualifying_data(&challenge.challenge_id, secret.expose(), csr.as_ref());
    let proof = attest_binding::activation_proof(secret.expose(), &challenge.challenge_id);
    drop(secret);
    let cert = certify(&q).map_err(|e| EnrollError::Attestation(e.to_string()))?;
    Ok(AttestationEvidence {
        challenge_id: challenge.challenge_id.clone(),
        activation_proof: hex::encode(proof),
        key_public: b64.encode(&cert.key_public),
        certify_info: b64.encode(&cert.certify_info),
        certify_signature: b64.encode(&cert.signature),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csr_from_soft_key_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let ks = devid_keystore::soft::SoftKeystore::create(dir.path()).unwrap();
        let pem = build_csr_with_keystore(&ks, Some("dev-1")).unwrap();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
        let failing = |_: &[u8]| -> Result<Vec<u8>, String> { Err("token removed".into()) };
        let spki = devid_keystore::spki_der(&ks.public_key());
        match build_csr(&failing, &spki, None) {
            Err(EnrollError::Signer(d)) => assert_eq!(d, "token removed"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            build_csr(&failing, b"junk", None),
            Err(EnrollError::InvalidKey(_))
        ));
        assert!(matches!(
            parse_pin("abc"),
            Err(devid_tls::TlsError::InvalidPin)
        ));
        assert!(matches!(
            enroll("http://x", "t", &"0".repeat(64), &pem, None),
            Err(EnrollError::InvalidUrl(_))
        ));
    }
}
