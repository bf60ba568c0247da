//! The lower bound the crypto allows: the server-side public-key work of one TLS 1.3 mutual
//! TLS handshake with ECDSA P-256 certificates, measured in-process with ring (the provider
//! devid-server uses): one ECDSA P-256 sign (the server's CertificateVerify), two ECDSA P-256
//! verifies (the client certificate's signature by the CA, and the client's CertificateVerify)
//! and one X25519 key generation + agreement (ECDHE). Hashing, HKDF and record encryption are
//! left out: they are small next to these, so the bound is optimistic, as a bound should be.

use std::time::{Duration, Instant};

use ring::agreement;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair};

use crate::BenchError;

/// Cost of the public-key operations of one mTLS handshake, microseconds (median of rounds).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HandshakeCost {
    /// One ECDSA P-256 SHA-256 signature.
    pub sign_us: f64,
    /// One ECDSA P-256 SHA-256 verification.
    pub verify_us: f64,
    /// One X25519 key generation, public key and agreement.
    pub ecdhe_us: f64,
}

impl HandshakeCost {
    /// Server-side cost of one handshake: 1 sign + 2 verifies + 1 ECDHE.
    pub fn server_us(&self) -> f64 {
        self.sign_us + 2.0 * self.verify_us + self.ecdhe_us
    }

    /// Handshakes per second one core could do if it did nothing else.
    pub fn per_core_bound(&self) -> f64 {
        1e6 / self.server_us()
    }

    /// Handshakes per second this machine could do when the load generator runs on the same
    /// cores: the client's side costs the same operations (it signs its CertificateVerify,
    /// verifies the server's chain and CertificateVerify, and does its half of the ECDHE).
    pub fn shared_machine_bound(&self, cores: usize) -> f64 {
        cores as f64 * 1e6 / (2.0 * self.server_us())
    }
}

fn time_op(
    budget: Duration,
    mut op: impl FnMut() -> Result<(), BenchError>,
) -> Result<f64, BenchError> {
    // A few rounds; the median round's per-operation time.
    let mut rounds = Vec::new();
    for _ in 0..5 {
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < budget / 5 {
            for _ in 0..16 {
                op()?;
            }
            n += 16;
        }
        rounds.push(start.elapsed().as_secs_f64() * 1e6 / n as f64);
    }
    rounds.sort_by(f64::total_cmp);
    Ok(rounds[rounds.len() / 2])
}

/// Measure, spending about `budget` per operation kind.
pub fn measure(budget: Duration) -> Result<HandshakeCost, BenchError> {
    let rng = SystemRandom::new();
    let err = |what: &str| BenchError::Scenario(format!("crypto measurement: {what} failed"));
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
        .map_err(|_| err("key generation"))?;
    let key = EcdsaKeyPair::from_pkcs8(
        &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        pkcs8.as_ref(),
        &rng,
    )
    .map_err(|_| err("key parsing"))?;
    // A TLS 1.3 CertificateVerify signs 64 spaces, a context string and a transcript hash.
    let msg = [0x20u8; 130];
    let sign_us = time_op(budget, || {
        key.sign(&rng, &msg).map(|_| ()).map_err(|_| err("sign"))
    })?;
    let sig = key.sign(&rng, &msg).map_err(|_| err("sign"))?;
    let public = signature::UnparsedPublicKey::new(
        &signature::ECDSA_P256_SHA256_ASN1,
        key.public_key().as_ref().to_vec(),
    );
    let verify_us = time_op(budget, || {
        public.verify(&msg, sig.as_ref()).map_err(|_| err("verify"))
    })?;
    let peer = agreement::EphemeralPrivateKey::generate(&agreement::X25519, &rng)
        .map_err(|_| err("x25519 keygen"))?
        .compute_public_key()
        .map_err(|_| err("x25519 public key"))?;
    let peer_bytes = peer.as_ref().to_vec();
    let ecdhe_us = time_op(budget, || {
        let mine = agreement::EphemeralPrivateKey::generate(&agreement::X25519, &rng)
            .map_err(|_| err("x25519 keygen"))?;
        let _public = mine
            .compute_public_key()
            .map_err(|_| err("x25519 public"))?;
        agreement::agree_ephemeral(
            mine,
            &agreement::UnparsedPublicKey::new(&agreement::X25519, &peer_bytes),
            |k| k.len(),
        )
        .map(|_| ())
        .map_err(|_| err("x25519 agreement"))
    })?;
    Ok(HandshakeCost {
        sign_us,
        verify_us,
        ecdhe_us,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn costs_are_plausible() {
        let c = measure(Duration::from_millis(100)).unwrap();
        assert!(c.sign_us > 1.0 && c.sign_us < 10_000.0, "{c:?}");
        assert!(c.verify_us > 1.0 && c.ecdhe_us > 1.0, "{c:?}");
        assert!(c.per_core_bound() > c.shared_machine_bound(1));
    }
}
