//! Certificate renewal: at a fraction of the certificate's lifetime (2/3 by default) the
//! agent asks the server for a new certificate over mutual TLS (`POST /v1/renew`, the TLS
//! signature and the CSR signature made in the keystore), checks the answer, and seals the
//! new chain into the bundle with one atomic read-modify-write under the state dir's lock
//! ([`devid_vault::Vault::update`]), so a concurrent `devid secret put` is never lost.
//!
//! With a TPM that the server attests (docs/attestation.md), each renewal is attested and
//! rotates the key: a new key is made in the TPM beside the current one, certified by the
//! registered attestation key, and the CSR is for it; the current key and certificate keep
//! working until the new certificate is sealed, and only then does the new key become the
//! device key ([`devid_keystore::KeyRotation`]; [`recover_rotation`] finishes a rotation a
//! crash interrupted). Other backends renew with the same key.

use devid_keystore::{spki_der, Keystore};
use devid_vault::Vault;
use sha2::Digest as _;

/// Serial and validity of a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Serial, hex.
    pub serial: String,
    /// Not before, unix seconds.
    pub not_before: i64,
    /// Not after, unix seconds.
    pub not_after: i64,
}

/// Errors of renewal. Never contain a key, token or certificate body.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RenewError {
    /// Renewal is impossible with what the bundle holds.
    #[error("renewal not possible: {0}")]
    NotConfigured(String),
    /// The server or the network failed.
    #[error(transparent)]
    Enroll(#[from] devid_enroll::EnrollError),
    /// The returned chain is not acceptable.
    #[error("the renewed certificate was refused: {0}")]
    BadChain(String),
    /// The bundle could not be read or written.
    #[error(transparent)]
    Vault(#[from] devid_vault::VaultError),
    /// The keystore failed (making or switching to the next key).
    #[error(transparent)]
    Keystore(#[from] devid_keystore::KeystoreError),
}

fn leaf_spki(chain_pem: &str) -> Option<Vec<u8>> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(chain_pem.as_bytes()).ok()?;
    let cert = pem.parse_x509().ok()?;
    Some(cert.public_key().raw.to_vec())
}

/// Finish a key rotation a crash interrupted: when the sealed certificate is for the pending
/// next key, that key becomes the device key. Otherwise the pending key is kept (the next
/// renewal retries with it). Returns whether a rotation was committed.
pub fn recover_rotation(vault: &Vault) -> Result<bool, RenewError> {
    let ks = vault.keystore();
    let Some(rot) = ks.rotation() else {
        return Ok(false);
    };
    let Some(next) = rot.next_key() else {
        return Ok(false);
    };
    let chain = vault.load()?.cert_chain_pem.clone();
    if chain.as_deref().and_then(leaf_spki) == Some(spki_der(&next)) {
        rot.commit_next_key()?;
        tracing::info!("finished a key rotation interrupted after its certificate was sealed");
        return Ok(true);
    }
    Ok(false)
}

/// The attestation challenge of a renewal, when the keystore can attest and the server
/// attests; `None` otherwise (renewal then goes ahead unattested, and the server decides).
fn renewal_challenge(
    server: &str,
    pin: &str,
    chain: &str,
    ks: &std::sync::Arc<dyn Keystore>,
) -> Option<(devid_keystore::AttestIdentity, devid_proto::AttestChallenge)> {
    let attestor = ks.attestation()?;
    let identity = match attestor.attestation_identity(None) {
        Ok(Some(i)) => i,
        Ok(None) => return None,
        Err(e) => {
            tracing::warn!(error = %e, "cannot prepare the TPM attestation; renewing unattested");
            return None;
        }
    };
    match devid_enroll::renew_attest_start(server, pin, chain, ks.clone(), &identity) {
        Ok(c) => Some((identity, c)),
        Err(devid_enroll::EnrollError::Server { code, .. })
            if code == "attestation_off" || code == "ek_untrusted" =>
        {
            tracing::info!(%code, "the server does not attest this TPM; renewing unattested");
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "attestation challenge failed; renewing unattested");
            None
        }
    }
}

/// Serial and validity of the first certificate of a PEM chain.
pub fn cert_info(chain_pem: &str) -> Option<CertInfo> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(chain_pem.as_bytes()).ok()?;
    let cert = pem.parse_x509().ok()?;
    Some(CertInfo {
        serial: cert.raw_serial_as_string().replace(':', ""),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// When to renew: `start + fraction · (not_after - start)`, where `start` is the
/// certificate's not-before, or the moment this agent obtained it when that is later.
///
/// Servers backdate not-before for clock skew (devid-server: 5 minutes). For a short-lived
/// certificate that backdating can be most of its life, and counting from not-before alone
/// would make a freshly renewed certificate "due" at once, renewing in a loop.
pub fn renew_at(info: &CertInfo, fraction: f64, obtained: Option<i64>) -> i64 {
    let start = obtained.map_or(info.not_before, |o| o.max(info.not_before));
    let life = (info.not_after - start).max(0) as f64;
    start + (life * fraction.clamp(0.0, 1.0)) as i64
}

/// Check a chain returned by the server: the leaf carries our public key and
/// `urn:devid:<id>`, and is signed by the CA whose certificate hashes to `pin`.
pub fn check_chain(
    chain_pem: &str,
    pin: &str,
    device_id: &str,
    ks: &dyn Keystore,
) -> Result<(), RenewError> {
    let id =
        devid_proto::DeviceId::parse(device_id).map_err(|e| RenewError::BadChain(e.to_string()))?;
    devid_enroll::verify_issued_chain(chain_pem, pin, &id, &spki_der(&ks.public_key()))
        .map(|_| ())
        .map_err(|e| RenewError::BadChain(e.to_string()))
}

/// Renew once (blocking: network and keystore). Returns the new chain, already sealed.
pub fn renew_blocking(vault: &Vault, device_id: &str) -> Result<String, RenewError> {
    let contents = vault.load()?;
    let server = contents
        .server_url
        .clone()
        .ok_or_else(|| RenewError::NotConfigured("no server URL in the bundle".into()))?;
    let pin = contents
        .ca_pin
        .clone()
        .ok_or_else(|| RenewError::NotConfigured("no CA pin in the bundle".into()))?;
    let chain = contents
        .cert_chain_pem
        .clone()
        .ok_or_else(|| RenewError::NotConfigured("no certificate in the bundle".into()))?;
    let ks = vault.keystore().clone();
    let challenge = renewal_challenge(&server, &pin, &chain, &ks);
    // Attested renewal with a TPM that can make a second key: rotate.
    let rotation = match (&challenge, ks.rotation()) {
        (Some(_), Some(rot)) => Some((rot, rot.create_next_key()?)),
        _ => None,
    };
    let (csr, new_key) = match &rotation {
        Some((rot, next)) => {
            let sign = |m: &[u8]| -> Result<Vec<u8>, String> {
                let digest: [u8; 32] = sha2::Sha256::digest(m).into();
                rot.sign_digest_next(&digest)
                    .map(|s| s.to_der().as_bytes().to_vec())
                    .map_err(|e| e.to_string())
            };
            let spki = spki_der(next);
            (
                devid_enroll::build_csr(&sign, &spki, Some(device_id))?,
                spki,
            )
        }
        None => (
            devid_enroll::build_csr_with_keystore(ks.as_ref(), Some(device_id))?,
            spki_der(&ks.public_key()),
        ),
    };
    let evidence = match (&challenge, ks.attestation()) {
        (Some((identity, c)), Some(attestor)) => Some(match &rotation {
            Some((rot, _)) => {
                devid_enroll::answer_challenge_with(attestor, &identity.ek_alg, c, &csr, &|q| {
                    rot.certify_next_key(q)
                })?
            }
            None => devid_enroll::answer_challenge(attestor, &identity.ek_alg, c, &csr)?,
        }),
        _ => None,
    };
    let resp = devid_enroll::renew_with(&server, &pin, &chain, ks.clone(), &csr, evidence)?;
    if resp.device_id != device_id {
        return Err(RenewError::BadChain(
            "the server answered for another device id".into(),
        ));
    }
    let id =
        devid_proto::DeviceId::parse(device_id).map_err(|e| RenewError::BadChain(e.to_string()))?;
    devid_enroll::verify_issued_chain(&resp.certificate_chain, &pin, &id, &new_key)
        .map_err(|e| RenewError::BadChain(e.to_string()))?;
    if contents.mqtt_url.as_deref() != Some(resp.mqtt_url.as_str()) {
        tracing::info!(
            "the server announced another MQTT endpoint at renewal; keeping the sealed one until \
             the next start"
        );
    }
    drop(contents);
    // Re-read under the state dir's lock and change only the chain: a `devid secret put` or
    // `devid config set` that ran while we talked to the server is kept.
    let chain = resp.certificate_chain.clone();
    vault.update(move |c| {
        c.cert_chain_pem = Some(chain);
        Ok(())
    })?;
    // The certificate for the next key is sealed: now it becomes the device key (a crash
    // before this line is finished by `recover_rotation`).
    if let Some((rot, _)) = rotation {
        rot.commit_next_key()?;
    }
    tracing::info!(
        attested = challenge.is_some(),
        rotated = rotation.is_some(),
        assurance = %resp.assurance,
        "certificate renewed"
    );
    Ok(resp.certificate_chain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_time() {
        let i = CertInfo {
            serial: "01".into(),
            not_before: 1000,
            not_after: 1000 + 3 * 86_400,
        };
        assert_eq!(renew_at(&i, 2.0 / 3.0, None), 1000 + 2 * 86_400);
        assert_eq!(renew_at(&i, 0.0, None), 1000);
        assert_eq!(renew_at(&i, 7.0, None), i.not_after);
        // a 2-minute certificate backdated by 5 minutes, just obtained
        let short = CertInfo {
            serial: "02".into(),
            not_before: 10_000 - 300,
            not_after: 10_000 + 120,
        };
        assert!(
            renew_at(&short, 0.5, None) < 10_000,
            "due at once by not-before alone"
        );
        assert_eq!(renew_at(&short, 0.5, Some(10_000)), 10_060);
        assert_eq!(renew_at(&i, 0.5, Some(0)), renew_at(&i, 0.5, None));
    }
}
