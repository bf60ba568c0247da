//! The sealed-blob format of the PKCS#11 backend.
//!
//! ```text
//! MAGIC (8 bytes, "DEVIDPK1": format and version) || IV (12) || ciphertext || tag (16)
//! ```
//! The ciphertext and tag are AES-256-GCM (`CKM_AES_GCM`, 128-bit tag) under the token's
//! non-extractable wrap key, with the magic as additional authenticated data, so neither a
//! changed byte of the header nor of the body goes unnoticed. The IV comes from the token's
//! random number generator (`C_GenerateRandom`).

use devid_keystore::KeystoreError;

/// Format marker and version at the start of every blob.
pub const MAGIC: &[u8; 8] = b"DEVIDPK1";
/// Length of the AES-GCM IV.
pub const IV_LEN: usize = 12;
/// Length of the AES-GCM tag in bytes.
pub const TAG_LEN: usize = 16;
/// Length of the AES-GCM tag in bits, as `CK_GCM_PARAMS` wants it.
pub(crate) const TAG_BITS: std::os::raw::c_ulong = 128;

/// The additional authenticated data of every blob: the header.
pub(crate) const AAD: &[u8] = MAGIC;

/// A blob split into its parts.
pub(crate) struct Parsed<'a> {
    pub(crate) iv: [u8; IV_LEN],
    /// Ciphertext followed by the tag.
    pub(crate) sealed: &'a [u8],
}

pub(crate) fn encode(iv: &[u8; IV_LEN], sealed: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAGIC.len() + IV_LEN + sealed.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(iv);
    out.extend_from_slice(sealed);
    out
}

pub(crate) fn decode(blob: &[u8]) -> Result<Parsed<'_>, KeystoreError> {
    let Some(rest) = blob.strip_prefix(MAGIC.as_slice()) else {
        return Err(KeystoreError::InvalidBlob {
            what: "sealed data key",
            detail: "not sealed by the PKCS#11 backend (unknown header)".into(),
        });
    };
    if rest.len() < IV_LEN + TAG_LEN {
        return Err(KeystoreError::InvalidBlob {
            what: "sealed data key",
            detail: format!(
                "{} bytes is too short for a PKCS#11 sealed blob",
                blob.len()
            ),
        });
    }
    let (iv, sealed) = rest.split_at(IV_LEN);
    let mut iv_arr = [0u8; IV_LEN];
    iv_arr.copy_from_slice(iv);
    Ok(Parsed { iv: iv_arr, sealed })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let blob = encode(&[1; IV_LEN], &[2; 20]);
        let p = decode(&blob).unwrap();
        assert_eq!(p.iv, [1; IV_LEN]);
        assert_eq!(p.sealed, &[2; 20]);
        assert!(decode(&blob[..MAGIC.len() + IV_LEN + TAG_LEN - 1]).is_err());
        let mut other = blob.clone();
        other[7] = b'2';
        assert!(decode(&other).is_err());
    }
}
