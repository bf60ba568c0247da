//! TPM2_MakeCredential in software (TPM 2.0 Part 1, "Credential Protection").
//!
//! The server encrypts a secret to the EK, bound to an object's Name (the AK's). The TPM that
//! owns the EK releases it with TPM2_ActivateCredential only when an object with exactly that
//! Name is loaded in it: that ties the AK to the EK.
//!
//! Every hash, key size and the symmetric algorithm come from the EK (the protector) through
//! its standard template ([`EkPublic::name_alg`], [`EkPublic::sym_key_bits`]), never from the
//! AK or the client:
//!
//! 1. seed: RSA EK: |H| random bytes, RSAES-OAEP(H, MGF1(H), label "IDENTITY\0") to the EK;
//!    ECC EK: ephemeral ECDH on the EK's curve, seed = KDFe(H, Z, "IDENTITY", x_eph, x_EK,
//!    |H|·8), encrypted secret = TPMS_ECC_POINT(x_eph, y_eph).
//! 2. symKey = KDFa(H, seed, "STORAGE", Name, "", AES bits).
//! 3. encIdentity = AES-CFB(symKey, IV 0, u16 len || secret).
//! 4. hmacKey = KDFa(H, seed, "INTEGRITY", "", "", |H|·8); integrity = HMAC_H(hmacKey,
//!    encIdentity || Name).
//! 5. TPM2B_ID_OBJECT contents = u16 |H| || integrity || encIdentity.
//!
//! The seed, the derived keys and the plaintext are zeroized when dropped.

use aes::cipher::{AsyncStreamCipher, KeyIvInit};
use hmac::digest::core_api::BlockSizeUser;
use hmac::{Mac, SimpleHmac};
use rand_core::CryptoRngCore;
use sha2::{Digest, Sha256, Sha384};
use zeroize::Zeroizing;

use crate::ek::{EkKey, EkPublic};
use crate::wire::{digest_len, ALG_SHA256, ALG_SHA384};
use crate::{AttestError, Result};

/// The two blobs TPM2_ActivateCredential takes, as TPM2B *contents* (no u16 size prefix):
/// what tss-esapi's `IdObject::try_from` and `EncryptedSecret::try_from` expect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    /// TPM2B_ID_OBJECT contents: u16 |H| || integrity HMAC || encIdentity.
    pub id_object: Vec<u8>,
    /// TPM2B_ENCRYPTED_SECRET contents: the OAEP ciphertext (RSA EK) or the ephemeral
    /// TPMS_ECC_POINT (ECC EK).
    pub encrypted_secret: Vec<u8>,
}

impl Credential {
    /// The tpm2-tools credential file (`tpm2 makecredential -o`, `tpm2 activatecredential -i`):
    /// u32 0xBADCC0DE, u32 1, TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET.
    pub fn to_tpm2_tools_blob(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(12 + self.id_object.len() + self.encrypted_secret.len());
        v.extend_from_slice(&0xBADC_C0DEu32.to_be_bytes());
        v.extend_from_slice(&1u32.to_be_bytes());
        for part in [&self.id_object, &self.encrypted_secret] {
            // Both are far below 64 KiB (checked when made).
            v.extend_from_slice(&(part.len() as u16).to_be_bytes());
            v.extend_from_slice(part);
        }
        v
    }
}

/// KDFa (SP 800-108 counter mode with HMAC): the first `bits` of
/// HMAC_H(key, u32 i || label || 0 || context_u || context_v || u32 bits) for i = 1, 2, ...
pub fn kdfa(
    hash_alg: u16,
    key: &[u8],
    label: &[u8],
    context_u: &[u8],
    context_v: &[u8],
    bits: u32,
) -> Result<Zeroizing<Vec<u8>>> {
    match hash_alg {
        ALG_SHA256 => Ok(kdfa_h::<Sha256>(key, label, context_u, context_v, bits)),
        ALG_SHA384 => Ok(kdfa_h::<Sha384>(key, label, context_u, context_v, bits)),
        other => Err(AttestError::Credential(format!(
            "KDFa hash {other:#06x} is not SHA-256 or SHA-384"
        ))),
    }
}

fn kdfa_h<D: Digest + BlockSizeUser>(
    key: &[u8],
    label: &[u8],
    u: &[u8],
    v: &[u8],
    bits: u32,
) -> Zeroizing<Vec<u8>> {
    let want = bits.div_ceil(8) as usize;
    let mut out = Zeroizing::new(Vec::with_capacity(want + 64));
    let mut i: u32 = 1;
    while out.len() < want {
        let mut mac =
            <SimpleHmac<D> as Mac>::new_from_slice(key).expect("HMAC takes keys of any length");
        mac.update(&i.to_be_bytes());
        mac.update(label);
        mac.update(&[0]);
        mac.update(u);
        mac.update(v);
        mac.update(&bits.to_be_bytes());
        out.extend_from_slice(&mac.finalize().into_bytes());
        i += 1;
    }
    out.truncate(want);
    out
}

/// KDFe (SP 800-56A concat KDF): the first `bits` of H(u32 i || Z || label || 0 || party_u ||
/// party_v) for i = 1, 2, ...
pub fn kdfe(
    hash_alg: u16,
    z: &[u8],
    label: &[u8],
    party_u: &[u8],
    party_v: &[u8],
    bits: u32,
) -> Result<Zeroizing<Vec<u8>>> {
    match hash_alg {
        ALG_SHA256 => Ok(kdfe_h::<Sha256>(z, label, party_u, party_v, bits)),
        ALG_SHA384 => Ok(kdfe_h::<Sha384>(z, label, party_u, party_v, bits)),
        other => Err(AttestError::Credential(format!(
            "KDFe hash {other:#06x} is not SHA-256 or SHA-384"
        ))),
    }
}

fn kdfe_h<D: Digest>(z: &[u8], label: &[u8], u: &[u8], v: &[u8], bits: u32) -> Zeroizing<Vec<u8>> {
    let want = bits.div_ceil(8) as usize;
    let mut out = Zeroizing::new(Vec::with_capacity(want + 64));
    let mut i: u32 = 1;
    while out.len() < want {
        let mut h = D::new();
        h.update(i.to_be_bytes());
        h.update(z);
        h.update(label);
        h.update([0]);
        h.update(u);
        h.update(v);
        out.extend_from_slice(&h.finalize());
        i += 1;
    }
    out.truncate(want);
    out
}

fn hmac(hash_alg: u16, key: &[u8], parts: &[&[u8]]) -> Result<Vec<u8>> {
    fn run<D: Digest + BlockSizeUser>(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
        let mut mac =
            <SimpleHmac<D> as Mac>::new_from_slice(key).expect("HMAC takes keys of any length");
        for p in parts {
            mac.update(p);
        }
        mac.finalize().into_bytes().to_vec()
    }
    match hash_alg {
        ALG_SHA256 => Ok(run::<Sha256>(key, parts)),
        ALG_SHA384 => Ok(run::<Sha384>(key, parts)),
        other => Err(AttestError::Credential(format!(
            "HMAC hash {other:#06x} is not SHA-256 or SHA-384"
        ))),
    }
}

/// AES-CFB128 with a zero IV, in place, key of 16 or 32 bytes.
fn aes_cfb_encrypt(key: &[u8], buf: &mut [u8]) -> Result<()> {
    let iv = [0u8; 16];
    match key.len() {
        16 => cfb_mode::Encryptor::<aes::Aes128>::new_from_slices(key, &iv)
            .map_err(|_| AttestError::Credential("bad AES-128 key".into()))?
            .encrypt(buf),
        32 => cfb_mode::Encryptor::<aes::Aes256>::new_from_slices(key, &iv)
            .map_err(|_| AttestError::Credential("bad AES-256 key".into()))?
            .encrypt(buf),
        n => {
            return Err(AttestError::Credential(format!(
                "AES key of {n} bytes (want 16 or 32)"
            )))
        }
    }
    Ok(())
}

/// Left-pad a big-endian integer to `n` bytes.
fn pad(b: &[u8], n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n.saturating_sub(b.len())];
    v.extend_from_slice(b);
    v
}

/// MakeCredential to `ek` for the object with the bare Name `object_name` (nameAlg ||
/// digest, e.g. [`crate::verify::AkKey::name`]). `secret` is 1 to |H| bytes (32 is the norm).
pub fn make_credential(
    ek: &EkPublic,
    object_name: &[u8],
    secret: &[u8],
    rng: &mut impl CryptoRngCore,
) -> Result<Credential> {
    let h = ek.name_alg();
    let hlen = digest_len(h).ok_or_else(|| AttestError::Credential("EK hash unknown".into()))?;
    if object_name.len() < 2 {
        return Err(AttestError::Credential(
            "object Name shorter than 2 bytes".into(),
        ));
    }
    let name_alg = u16::from_be_bytes([object_name[0], object_name[1]]);
    match digest_len(name_alg) {
        Some(n) if n + 2 == object_name.len() => {}
        _ => {
            return Err(AttestError::Credential(format!(
                "object Name of {} bytes with nameAlg {name_alg:#06x} is not nameAlg || digest",
                object_name.len()
            )))
        }
    }
    if secret.is_empty() || secret.len() > hlen {
        return Err(AttestError::Credential(format!(
            "secret of {} bytes; it must be 1 to {hlen} bytes for this EK",
            secret.len()
        )));
    }
    let bits_h = (hlen * 8) as u32;

    let (seed, encrypted_secret): (Zeroizing<Vec<u8>>, Vec<u8>) = match &ek.key {
        EkKey::Rsa(pk) => {
            let mut seed = Zeroizing::new(vec![0u8; hlen]);
            rng.fill_bytes(&mut seed);
            let padding = match h {
                ALG_SHA256 => rsa::Oaep::new_with_label::<Sha256, _>("IDENTITY\0"),
                _ => rsa::Oaep::new_with_label::<Sha384, _>("IDENTITY\0"),
            };
            let enc = pk
                .encrypt(rng, padding, &seed)
                .map_err(|e| AttestError::Credential(format!("RSA-OAEP to the EK: {e}")))?;
            (seed, enc)
        }
        EkKey::P256(pk) => {
            use p256::elliptic_curve::sec1::ToEncodedPoint;
            let eph = p256::ecdh::EphemeralSecret::random(rng);
            let shared = eph.diffie_hellman(pk);
            let e_pt = eph.public_key().to_encoded_point(false);
            let ek_pt = pk.to_encoded_point(false);
            ecc_seed(
                h,
                shared.raw_secret_bytes(),
                e_pt.x().map(|a| &a[..]),
                e_pt.y().map(|a| &a[..]),
                ek_pt.x().map(|a| &a[..]),
                32,
                bits_h,
            )?
        }
        EkKey::P384(pk) => {
            use p384::elliptic_curve::sec1::ToEncodedPoint;
            let eph = p384::ecdh::EphemeralSecret::random(rng);
            let shared = eph.diffie_hellman(pk);
            let e_pt = eph.public_key().to_encoded_point(false);
            let ek_pt = pk.to_encoded_point(false);
            ecc_seed(
                h,
                shared.raw_secret_bytes(),
                e_pt.x().map(|a| &a[..]),
                e_pt.y().map(|a| &a[..]),
                ek_pt.x().map(|a| &a[..]),
                48,
                bits_h,
            )?
        }
    };

    let sym_key = kdfa(
        h,
        &seed,
        b"STORAGE",
        object_name,
        &[],
        u32::from(ek.sym_key_bits()),
    )?;
    let mut enc_identity = Zeroizing::new(Vec::with_capacity(2 + secret.len()));
    enc_identity.extend_from_slice(&(secret.len() as u16).to_be_bytes());
    enc_identity.extend_from_slice(secret);
    aes_cfb_encrypt(&sym_key, &mut enc_identity)?;
    let hmac_key = kdfa(h, &seed, b"INTEGRITY", &[], &[], bits_h)?;
    let integrity = hmac(h, &hmac_key, &[&enc_identity, object_name])?;
    let mut id_object = Vec::with_capacity(2 + integrity.len() + enc_identity.len());
    id_object.extend_from_slice(&(integrity.len() as u16).to_be_bytes());
    id_object.extend_from_slice(&integrity);
    id_object.extend_from_slice(&enc_identity);
    Ok(Credential {
        id_object,
        encrypted_secret,
    })
}

type Coord<'a> = Option<&'a [u8]>;

fn ecc_seed<T: AsRef<[u8]>>(
    h: u16,
    z: &T,
    ex: Coord<'_>,
    ey: Coord<'_>,
    kx: Coord<'_>,
    size: usize,
    bits_h: u32,
) -> Result<(Zeroizing<Vec<u8>>, Vec<u8>)> {
    let missing = || AttestError::Credential("point at infinity".into());
    let ex = pad(ex.ok_or_else(missing)?, size);
    let ey = pad(ey.ok_or_else(missing)?, size);
    let kx = pad(kx.ok_or_else(missing)?, size);
    let z = Zeroizing::new(pad(z.as_ref(), size));
    let seed = kdfe(h, &z, b"IDENTITY", &ex, &kx, bits_h)?;
    let mut point = Vec::with_capacity(4 + 2 * size);
    point.extend_from_slice(&(size as u16).to_be_bytes());
    point.extend_from_slice(&ex);
    point.extend_from_slice(&(size as u16).to_be_bytes());
    point.extend_from_slice(&ey);
    Ok((seed, point))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Known answers computed independently, once by hand, with Python's hmac/hashlib and the
    // `cryptography` package's AES-CFB, from the TPM 2.0 Part 1 definitions of KDFa and KDFe.
    #[test]
    fn kdfa_known_answers() {
        let k = kdfa(ALG_SHA256, &[0x01; 32], b"STORAGE", &[0xab; 34], &[], 128).unwrap();
        assert_eq!(hex::encode(&*k), KDFA_SHA256_STORAGE_128);
        let k = kdfa(ALG_SHA384, &[0x02; 48], b"INTEGRITY", &[], &[], 384).unwrap();
        assert_eq!(hex::encode(&*k), KDFA_SHA384_INTEGRITY_384);
        let k = kdfa(ALG_SHA256, b"k", b"L", b"u", b"v", 520).unwrap();
        assert_eq!(hex::encode(&*k), KDFA_SHA256_520);
    }

    #[test]
    fn kdfe_known_answers() {
        let k = kdfe(
            ALG_SHA256,
            &[0x03; 32],
            b"IDENTITY",
            &[0x04; 32],
            &[0x05; 32],
            256,
        )
        .unwrap();
        assert_eq!(hex::encode(&*k), KDFE_SHA256_256);
        let k = kdfe(
            ALG_SHA384,
            &[0x06; 48],
            b"IDENTITY",
            &[0x07; 48],
            &[0x08; 48],
            384,
        )
        .unwrap();
        assert_eq!(hex::encode(&*k), KDFE_SHA384_384);
    }

    #[test]
    fn aes_cfb_known_answer() {
        let mut buf = vec![0x00, 0x20];
        buf.extend_from_slice(&[0x5a; 32]);
        aes_cfb_encrypt(&[0x11; 16], &mut buf).unwrap();
        assert_eq!(hex::encode(&buf), AES128_CFB_34);
    }

    const KDFA_SHA256_STORAGE_128: &str = "19f90734d3e12571f33daa1d7b2f2972";
    const KDFA_SHA384_INTEGRITY_384: &str =
        "66fec2ed44f5f779628fbec2a783d70141e24f0cafe083821aba31d214cde5a4afc3ccc09b1a236a63e8ace9b9032b3a";
    const KDFA_SHA256_520: &str =
        "7e6644f79783091b1c84c9ace92af323df309ac6bc40730cfbf19339f011bb08f1398b11c9146fc3335c019c00da1f55254252ecd1bc9c0b75a7c51096c49be4dd";
    const KDFE_SHA256_256: &str =
        "812f3d828b72c4f104e6443e4ebfc4a3cc0441c4dae7c8388d28d442b4a64153";
    const KDFE_SHA384_384: &str =
        "666be3bf4be9d35d95534c54f9c5fcc9560db9c54cd332ac13f5c33cc93de96689da72f545afac60693e655d74736c3c";
    const AES128_CFB_34: &str =
        "e0f51b6b145a4a7737a6f2e65a2136d0a99696cdd01857075de99e327a0228bc130d";
}
