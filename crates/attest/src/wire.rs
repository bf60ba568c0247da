//! Strict parsers for the TPM 2.0 structures a device sends: TPMT_PUBLIC, TPMS_ATTEST and
//! TPMT_SIGNATURE (TPM 2.0 Part 2; all integers big-endian).
//!
//! Rules every parser here keeps: the whole input is consumed (a trailing byte is an error),
//! every TPM2B size is checked against the structure's maximum before the bytes are read, every
//! selector (algorithm, curve, attestation type) is either understood or refused, and an input
//! longer than [`MAX_STRUCTURE`] is refused before parsing. Nothing allocates more than the
//! input's size.

use sha2::{Digest, Sha256, Sha384, Sha512};

use crate::{AttestError, Result};

/// No structure handled here is longer than this (a TPM2B_PUBLIC with a 4096-bit modulus is
/// about 600 bytes); longer inputs are refused before parsing.
pub const MAX_STRUCTURE: usize = 4096;

// ---- algorithm identifiers (TPM_ALG_ID) ----

/// TPM_ALG_RSA.
pub const ALG_RSA: u16 = 0x0001;
/// TPM_ALG_SHA1.
pub const ALG_SHA1: u16 = 0x0004;
/// TPM_ALG_HMAC.
pub const ALG_HMAC: u16 = 0x0005;
/// TPM_ALG_AES.
pub const ALG_AES: u16 = 0x0006;
/// TPM_ALG_KEYEDHASH.
pub const ALG_KEYEDHASH: u16 = 0x0008;
/// TPM_ALG_SHA256.
pub const ALG_SHA256: u16 = 0x000B;
/// TPM_ALG_SHA384.
pub const ALG_SHA384: u16 = 0x000C;
/// TPM_ALG_SHA512.
pub const ALG_SHA512: u16 = 0x000D;
/// TPM_ALG_NULL.
pub const ALG_NULL: u16 = 0x0010;
/// TPM_ALG_RSASSA (PKCS#1 v1.5 signatures).
pub const ALG_RSASSA: u16 = 0x0014;
/// TPM_ALG_RSAES (PKCS#1 v1.5 encryption).
pub const ALG_RSAES: u16 = 0x0015;
/// TPM_ALG_RSAPSS.
pub const ALG_RSAPSS: u16 = 0x0016;
/// TPM_ALG_OAEP.
pub const ALG_OAEP: u16 = 0x0017;
/// TPM_ALG_ECDSA.
pub const ALG_ECDSA: u16 = 0x0018;
/// TPM_ALG_ECDH.
pub const ALG_ECDH: u16 = 0x0019;
/// TPM_ALG_ECDAA.
pub const ALG_ECDAA: u16 = 0x001A;
/// TPM_ALG_SM2.
pub const ALG_SM2: u16 = 0x001B;
/// TPM_ALG_ECSCHNORR.
pub const ALG_ECSCHNORR: u16 = 0x001C;
/// TPM_ALG_ECMQV.
pub const ALG_ECMQV: u16 = 0x001D;
/// TPM_ALG_KDF1_SP800_56A.
pub const ALG_KDF1_SP800_56A: u16 = 0x0020;
/// TPM_ALG_KDF2.
pub const ALG_KDF2: u16 = 0x0021;
/// TPM_ALG_KDF1_SP800_108.
pub const ALG_KDF1_SP800_108: u16 = 0x0022;
/// TPM_ALG_MGF1.
pub const ALG_MGF1: u16 = 0x0007;
/// TPM_ALG_ECC.
pub const ALG_ECC: u16 = 0x0023;
/// TPM_ALG_SYMCIPHER.
pub const ALG_SYMCIPHER: u16 = 0x0025;
/// TPM_ALG_CFB.
pub const ALG_CFB: u16 = 0x0043;

/// TPM_ECC_NIST_P256.
pub const ECC_NIST_P256: u16 = 0x0003;
/// TPM_ECC_NIST_P384.
pub const ECC_NIST_P384: u16 = 0x0004;
/// TPM_ECC_NIST_P521.
pub const ECC_NIST_P521: u16 = 0x0005;

// ---- TPMA_OBJECT bits ----

/// fixedTPM: the object cannot be duplicated at all.
pub const FIXED_TPM: u32 = 0x0000_0002;
/// stClear.
pub const ST_CLEAR: u32 = 0x0000_0004;
/// fixedParent: the object cannot be duplicated to another parent.
pub const FIXED_PARENT: u32 = 0x0000_0010;
/// sensitiveDataOrigin: the TPM generated the private part.
pub const SENSITIVE_DATA_ORIGIN: u32 = 0x0000_0020;
/// userWithAuth.
pub const USER_WITH_AUTH: u32 = 0x0000_0040;
/// adminWithPolicy.
pub const ADMIN_WITH_POLICY: u32 = 0x0000_0080;
/// noDA.
pub const NO_DA: u32 = 0x0000_0400;
/// encryptedDuplication.
pub const ENCRYPTED_DUPLICATION: u32 = 0x0000_0800;
/// restricted: signs only TPM-made structures (AK) or decrypts only TPM formats (parents, EK).
pub const RESTRICTED: u32 = 0x0001_0000;
/// decrypt.
pub const DECRYPT: u32 = 0x0002_0000;
/// sign (also encrypt for symmetric keys).
pub const SIGN: u32 = 0x0004_0000;

// ---- TPMS_ATTEST ----

/// TPM_GENERATED_VALUE: the magic of every TPMS_ATTEST the TPM builds.
pub const TPM_GENERATED_VALUE: u32 = 0xff54_4347;
/// TPM_ST_ATTEST_CERTIFY.
pub const ST_ATTEST_CERTIFY: u16 = 0x8017;
/// TPM_ST_ATTEST_QUOTE.
pub const ST_ATTEST_QUOTE: u16 = 0x8018;
/// TPM_ST_ATTEST_CREATION.
pub const ST_ATTEST_CREATION: u16 = 0x801A;

// ---- size bounds (TPM 2.0 Part 2 with the PC Client maxima) ----

/// Largest digest: SHA-512.
pub const MAX_DIGEST: usize = 64;
/// TPM2B_NAME: a hash algorithm id plus a digest (or a 4-byte handle).
pub const MAX_NAME: usize = 2 + MAX_DIGEST;
/// TPM2B_DATA: sizeof(TPMT_HA).
pub const MAX_DATA: usize = 2 + MAX_DIGEST;
/// TPM2B_ECC_PARAMETER: a P-521 coordinate.
pub const MAX_ECC_PARAMETER: usize = 66;
/// TPM2B_PUBLIC_KEY_RSA: a 4096-bit modulus or signature.
pub const MAX_RSA_BYTES: usize = 512;
/// TPML_PCR_SELECTION: at most this many banks.
pub const MAX_PCR_BANKS: usize = 16;
/// TPMS_PCR_SELECTION: at most this many bitmap bytes (PCR_SELECT_MAX).
pub const MAX_PCR_SELECT: usize = 4;

/// The digest size of a TPM hash algorithm this crate can compute, or `None`.
pub fn digest_len(hash_alg: u16) -> Option<usize> {
    match hash_alg {
        ALG_SHA256 => Some(32),
        ALG_SHA384 => Some(48),
        ALG_SHA512 => Some(64),
        _ => None,
    }
}

/// H_alg(data) for the hash algorithms of [`digest_len`].
pub fn hash(hash_alg: u16, data: &[u8]) -> Option<Vec<u8>> {
    match hash_alg {
        ALG_SHA256 => Some(Sha256::digest(data).to_vec()),
        ALG_SHA384 => Some(Sha384::digest(data).to_vec()),
        ALG_SHA512 => Some(Sha512::digest(data).to_vec()),
        _ => None,
    }
}

/// The Name of an object: `nameAlg (u16) || H_nameAlg(raw TPMT_PUBLIC)`, the bare bytes (not
/// a TPM2B). `raw_tpmt_public` must be the exact bytes the TPM marshalled; the Name covers the
/// attributes and the policy, which is what makes checking them sound.
pub fn name_of(raw_tpmt_public: &[u8], name_alg: u16) -> Result<Vec<u8>> {
    let digest =
        hash(name_alg, raw_tpmt_public).ok_or_else(|| AttestError::MalformedTpmStructure {
            what: "Name",
            detail: format!("name algorithm {name_alg:#06x} is not SHA-256, SHA-384 or SHA-512"),
        })?;
    let mut name = Vec::with_capacity(2 + digest.len());
    name.extend_from_slice(&name_alg.to_be_bytes());
    name.extend_from_slice(&digest);
    Ok(name)
}

/// A bounds-checked big-endian reader over one structure.
struct Reader<'a> {
    what: &'static str,
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(what: &'static str, buf: &'a [u8]) -> Result<Self> {
        let r = Reader { what, buf, pos: 0 };
        if buf.len() > MAX_STRUCTURE {
            return Err(r.err(format!(
                "{} bytes, more than the {MAX_STRUCTURE} any TPM structure here needs",
                buf.len()
            )));
        }
        Ok(r)
    }

    fn err(&self, detail: String) -> AttestError {
        AttestError::MalformedTpmStructure {
            what: self.what,
            detail,
        }
    }

    fn take(&mut self, n: usize, field: &str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(self.err(format!(
                "truncated: {field} needs {n} bytes at offset {}, {} left",
                self.pos,
                self.buf.len() - self.pos
            ))),
        }
    }

    fn u8(&mut self, field: &str) -> Result<u8> {
        Ok(self.take(1, field)?[0])
    }

    fn u16(&mut self, field: &str) -> Result<u16> {
        let b = self.take(2, field)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, field: &str) -> Result<u32> {
        let b = self.take(4, field)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, field: &str) -> Result<u64> {
        let b = self.take(8, field)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    /// A TPM2B: u16 size, then that many bytes, at most `max`.
    fn tpm2b(&mut self, max: usize, field: &str) -> Result<Vec<u8>> {
        let at = self.pos;
        let n = usize::from(self.u16(field)?);
        if n > max {
            return Err(self.err(format!(
                "{field} at offset {at} is {n} bytes, more than its maximum {max}"
            )));
        }
        Ok(self.take(n, field)?.to_vec())
    }

    fn finish(self) -> Result<()> {
        if self.pos != self.buf.len() {
            return Err(self.err(format!(
                "{} trailing bytes after offset {}",
                self.buf.len() - self.pos,
                self.pos
            )));
        }
        Ok(())
    }
}

/// The key part of a public area.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyAlg {
    /// TPM_ALG_RSA.
    Rsa {
        /// keyBits of TPMS_RSA_PARMS.
        bits: u16,
        /// exponent of TPMS_RSA_PARMS as sent; 0 means 65537 (see [`KeyAlg::rsa_exponent`]).
        exponent: u32,
        /// unique.rsa: the modulus, big-endian (may be empty in a template).
        modulus: Vec<u8>,
    },
    /// TPM_ALG_ECC.
    Ecc {
        /// curveID (e.g. [`ECC_NIST_P256`]).
        curve: u16,
        /// TPMT_KDF_SCHEME: (scheme, hash), `None` for TPM_ALG_NULL.
        kdf: Option<(u16, u16)>,
        /// unique.ecc.x, big-endian, as sent (may be shorter than the curve size).
        x: Vec<u8>,
        /// unique.ecc.y.
        y: Vec<u8>,
    },
}

impl KeyAlg {
    /// The effective RSA public exponent (0 in the structure means 65537), or `None` for ECC.
    pub fn rsa_exponent(&self) -> Option<u32> {
        match self {
            KeyAlg::Rsa { exponent: 0, .. } => Some(65537),
            KeyAlg::Rsa { exponent, .. } => Some(*exponent),
            KeyAlg::Ecc { .. } => None,
        }
    }
}

/// TPMT_PUBLIC (that is TPM2B_PUBLIC without its u16 size) of an RSA or ECC object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpmtPublic {
    /// The key type and its unique field.
    pub alg: KeyAlg,
    /// nameAlg: the hash of the object's Name.
    pub name_alg: u16,
    /// objectAttributes (TPMA_OBJECT; see the constants of this module).
    pub attributes: u32,
    /// authPolicy (empty when none).
    pub auth_policy: Vec<u8>,
    /// TPMT_SYM_DEF_OBJECT: (algorithm, keyBits, mode), `None` for TPM_ALG_NULL.
    pub symmetric: Option<(u16, u16, u16)>,
    /// The asymmetric scheme: (scheme, hash), `None` for TPM_ALG_NULL; RSAES has hash
    /// TPM_ALG_NULL.
    pub scheme: Option<(u16, u16)>,
    raw: Vec<u8>,
}

impl TpmtPublic {
    /// Parse a TPMT_PUBLIC of type RSA or ECC: the whole of `bytes`, nothing after it.
    pub fn parse(bytes: &[u8]) -> Result<TpmtPublic> {
        let mut r = Reader::new("TPMT_PUBLIC", bytes)?;
        let typ = r.u16("type")?;
        if typ != ALG_RSA && typ != ALG_ECC {
            return Err(r.err(format!(
                "object type {typ:#06x} is not RSA or ECC (keyed-hash and symmetric objects are not keys that can be attested)"
            )));
        }
        let name_alg = r.u16("nameAlg")?;
        if name_alg != ALG_SHA1 && digest_len(name_alg).is_none() {
            return Err(r.err(format!("nameAlg {name_alg:#06x} is not a hash algorithm")));
        }
        let attributes = r.u32("objectAttributes")?;
        let auth_policy = r.tpm2b(MAX_DIGEST, "authPolicy")?;
        let sym_alg = r.u16("symmetric.algorithm")?;
        let symmetric = if sym_alg == ALG_NULL {
            None
        } else {
            let bits = r.u16("symmetric.keyBits")?;
            let mode = r.u16("symmetric.mode")?;
            Some((sym_alg, bits, mode))
        };
        let scheme_alg = r.u16("scheme")?;
        let scheme = match (typ, scheme_alg) {
            (_, ALG_NULL) => None,
            (ALG_RSA, ALG_RSAES) => Some((ALG_RSAES, ALG_NULL)),
            (ALG_RSA, ALG_RSASSA | ALG_RSAPSS | ALG_OAEP) => {
                Some((scheme_alg, r.u16("scheme.hashAlg")?))
            }
            (ALG_ECC, ALG_ECDSA | ALG_ECDH | ALG_SM2 | ALG_ECSCHNORR | ALG_ECMQV) => {
                Some((scheme_alg, r.u16("scheme.hashAlg")?))
            }
            (_, other) => {
                return Err(r.err(format!(
                    "scheme {other:#06x} is not understood for object type {typ:#06x}"
                )))
            }
        };
        let alg = if typ == ALG_RSA {
            let bits = r.u16("rsa.keyBits")?;
            let exponent = r.u32("rsa.exponent")?;
            let modulus = r.tpm2b(MAX_RSA_BYTES, "unique.rsa")?;
            KeyAlg::Rsa {
                bits,
                exponent,
                modulus,
            }
        } else {
            let curve = r.u16("ecc.curveID")?;
            let kdf_alg = r.u16("ecc.kdf")?;
            let kdf = match kdf_alg {
                ALG_NULL => None,
                ALG_MGF1 | ALG_KDF1_SP800_56A | ALG_KDF2 | ALG_KDF1_SP800_108 => {
                    Some((kdf_alg, r.u16("ecc.kdf.hashAlg")?))
                }
                other => return Err(r.err(format!("ECC kdf {other:#06x} is not understood"))),
            };
            let x = r.tpm2b(MAX_ECC_PARAMETER, "unique.ecc.x")?;
            let y = r.tpm2b(MAX_ECC_PARAMETER, "unique.ecc.y")?;
            KeyAlg::Ecc { curve, kdf, x, y }
        };
        r.finish()?;
        Ok(TpmtPublic {
            alg,
            name_alg,
            attributes,
            auth_policy,
            symmetric,
            scheme,
            raw: bytes.to_vec(),
        })
    }

    /// The exact bytes this was parsed from.
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }

    /// The object's Name (bare: nameAlg || digest), from the exact bytes parsed.
    pub fn name(&self) -> Result<Vec<u8>> {
        name_of(&self.raw, self.name_alg)
    }

    /// True when every bit of `mask` is set in [`TpmtPublic::attributes`].
    pub fn has(&self, mask: u32) -> bool {
        self.attributes & mask == mask
    }
}

/// The attested body of a TPMS_ATTEST.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attested {
    /// TPMS_CERTIFY_INFO (type [`ST_ATTEST_CERTIFY`]).
    Certify {
        /// The certified object's Name (bare bytes of the TPM2B_NAME).
        name: Vec<u8>,
        /// Its qualified Name.
        qualified_name: Vec<u8>,
    },
    /// TPMS_QUOTE_INFO (type [`ST_ATTEST_QUOTE`]).
    Quote {
        /// TPML_PCR_SELECTION: (hash, bitmap) per bank; PCR n is bit n%8 of byte n/8.
        pcr_select: Vec<(u16, Vec<u8>)>,
        /// pcrDigest.
        pcr_digest: Vec<u8>,
    },
    /// TPMS_CREATION_INFO (type [`ST_ATTEST_CREATION`]).
    Creation {
        /// objectName.
        object_name: Vec<u8>,
        /// creationHash.
        creation_hash: Vec<u8>,
    },
    /// Another attestation type; its body is not parsed (so not checked for trailing bytes),
    /// and nothing in this crate accepts it.
    Other(u16),
}

/// TPMS_ATTEST: what TPM2_Certify, TPM2_Quote and the like sign.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpmsAttest {
    /// magic; [`TPM_GENERATED_VALUE`] when the TPM built it (checked by the verifier, not here).
    pub magic: u32,
    /// type (TPMI_ST_ATTEST), e.g. [`ST_ATTEST_CERTIFY`].
    pub kind: u16,
    /// qualifiedSigner.
    pub qualified_signer: Vec<u8>,
    /// extraData: the caller's qualifying data.
    pub extra_data: Vec<u8>,
    /// clockInfo.clock (ms).
    pub clock: u64,
    /// clockInfo.resetCount (TPM resets, i.e. reboots).
    pub reset_count: u32,
    /// clockInfo.restartCount.
    pub restart_count: u32,
    /// clockInfo.safe.
    pub safe: bool,
    /// firmwareVersion.
    pub firmware_version: u64,
    /// The type-specific body.
    pub attested: Attested,
}

impl TpmsAttest {
    /// Parse a TPMS_ATTEST: the whole of `bytes` for the certify, quote and creation types.
    pub fn parse(bytes: &[u8]) -> Result<TpmsAttest> {
        let mut r = Reader::new("TPMS_ATTEST", bytes)?;
        let magic = r.u32("magic")?;
        let kind = r.u16("type")?;
        let qualified_signer = r.tpm2b(MAX_NAME, "qualifiedSigner")?;
        let extra_data = r.tpm2b(MAX_DATA, "extraData")?;
        let clock = r.u64("clockInfo.clock")?;
        let reset_count = r.u32("clockInfo.resetCount")?;
        let restart_count = r.u32("clockInfo.restartCount")?;
        let safe = match r.u8("clockInfo.safe")? {
            0 => false,
            1 => true,
            v => return Err(r.err(format!("clockInfo.safe is {v}, not YES or NO"))),
        };
        let firmware_version = r.u64("firmwareVersion")?;
        let attested = match kind {
            ST_ATTEST_CERTIFY => {
                let name = r.tpm2b(MAX_NAME, "certify.name")?;
                let qualified_name = r.tpm2b(MAX_NAME, "certify.qualifiedName")?;
                Attested::Certify {
                    name,
                    qualified_name,
                }
            }
            ST_ATTEST_QUOTE => {
                let count = r.u32("pcrSelect.count")?;
                if count as usize > MAX_PCR_BANKS {
                    return Err(r.err(format!(
                        "pcrSelect has {count} banks, more than {MAX_PCR_BANKS}"
                    )));
                }
                let mut pcr_select = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    let h = r.u16("pcrSelect.hash")?;
                    let n = usize::from(r.u8("pcrSelect.sizeofSelect")?);
                    if n > MAX_PCR_SELECT {
                        return Err(
                            r.err(format!("sizeofSelect is {n}, more than {MAX_PCR_SELECT}"))
                        );
                    }
                    pcr_select.push((h, r.take(n, "pcrSelect.pcrSelect")?.to_vec()));
                }
                let pcr_digest = r.tpm2b(MAX_DIGEST, "pcrDigest")?;
                Attested::Quote {
                    pcr_select,
                    pcr_digest,
                }
            }
            ST_ATTEST_CREATION => {
                let object_name = r.tpm2b(MAX_NAME, "creation.objectName")?;
                let creation_hash = r.tpm2b(MAX_DIGEST, "creation.creationHash")?;
                Attested::Creation {
                    object_name,
                    creation_hash,
                }
            }
            other => {
                return Ok(TpmsAttest {
                    magic,
                    kind,
                    qualified_signer,
                    extra_data,
                    clock,
                    reset_count,
                    restart_count,
                    safe,
                    firmware_version,
                    attested: Attested::Other(other),
                })
            }
        };
        r.finish()?;
        Ok(TpmsAttest {
            magic,
            kind,
            qualified_signer,
            extra_data,
            clock,
            reset_count,
            restart_count,
            safe,
            firmware_version,
            attested,
        })
    }
}

/// TPMT_SIGNATURE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TpmtSignature {
    /// TPM_ALG_ECDSA: r and s as sent (big-endian, possibly shorter than the curve size).
    Ecdsa {
        /// The hash the TPM signed with.
        hash: u16,
        /// signatureR.
        r: Vec<u8>,
        /// signatureS.
        s: Vec<u8>,
    },
    /// ECDAA, SM2 or EC-Schnorr: parsed, never accepted by this crate.
    OtherEcc {
        /// sigAlg.
        sig_alg: u16,
        /// hash.
        hash: u16,
        /// signatureR.
        r: Vec<u8>,
        /// signatureS.
        s: Vec<u8>,
    },
    /// TPM_ALG_RSASSA (PKCS#1 v1.5).
    RsaSsa {
        /// The hash the TPM signed with.
        hash: u16,
        /// The signature, big-endian, modulus-sized.
        sig: Vec<u8>,
    },
    /// TPM_ALG_RSAPSS.
    RsaPss {
        /// The hash.
        hash: u16,
        /// The signature.
        sig: Vec<u8>,
    },
    /// TPM_ALG_HMAC: TPMT_HA.
    Hmac {
        /// The hash.
        hash: u16,
        /// The digest (exactly the hash's size).
        digest: Vec<u8>,
    },
    /// TPM_ALG_NULL: no signature.
    Null,
}

impl TpmtSignature {
    /// Parse a TPMT_SIGNATURE: the whole of `bytes`.
    pub fn parse(bytes: &[u8]) -> Result<TpmtSignature> {
        let mut r = Reader::new("TPMT_SIGNATURE", bytes)?;
        let sig_alg = r.u16("sigAlg")?;
        let sig = match sig_alg {
            ALG_NULL => TpmtSignature::Null,
            ALG_RSASSA | ALG_RSAPSS => {
                let hash = r.u16("hash")?;
                let sig = r.tpm2b(MAX_RSA_BYTES, "sig")?;
                if sig_alg == ALG_RSASSA {
                    TpmtSignature::RsaSsa { hash, sig }
                } else {
                    TpmtSignature::RsaPss { hash, sig }
                }
            }
            ALG_ECDSA | ALG_ECDAA | ALG_SM2 | ALG_ECSCHNORR => {
                let hash = r.u16("hash")?;
                let sr = r.tpm2b(MAX_ECC_PARAMETER, "signatureR")?;
                let ss = r.tpm2b(MAX_ECC_PARAMETER, "signatureS")?;
                if sig_alg == ALG_ECDSA {
                    TpmtSignature::Ecdsa { hash, r: sr, s: ss }
                } else {
                    TpmtSignature::OtherEcc {
                        sig_alg,
                        hash,
                        r: sr,
                        s: ss,
                    }
                }
            }
            ALG_HMAC => {
                let hash = r.u16("hash")?;
                let n = match hash {
                    ALG_SHA1 => 20,
                    h => digest_len(h)
                        .ok_or_else(|| r.err(format!("HMAC hash {h:#06x} is not a known hash")))?,
                };
                let digest = r.take(n, "digest")?.to_vec();
                TpmtSignature::Hmac { hash, digest }
            }
            other => return Err(r.err(format!("sigAlg {other:#06x} is not understood"))),
        };
        r.finish()?;
        Ok(sig)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The public area of an ECC P-256 AK as swtpm + `tpm2 createak -G ecc -g sha256 -s ecdsa`
    /// made it (attributes 0x00050072), unique x/y replaced by a fixed pattern.
    fn ak_p256() -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&ALG_ECC.to_be_bytes());
        v.extend_from_slice(&ALG_SHA256.to_be_bytes());
        v.extend_from_slice(&0x0005_0072u32.to_be_bytes());
        v.extend_from_slice(&[0, 0]); // authPolicy
        v.extend_from_slice(&ALG_NULL.to_be_bytes()); // symmetric
        v.extend_from_slice(&ALG_ECDSA.to_be_bytes());
        v.extend_from_slice(&ALG_SHA256.to_be_bytes());
        v.extend_from_slice(&ECC_NIST_P256.to_be_bytes());
        v.extend_from_slice(&ALG_NULL.to_be_bytes()); // kdf
        v.extend_from_slice(&[0, 32]);
        v.extend_from_slice(&[0x11; 32]);
        v.extend_from_slice(&[0, 32]);
        v.extend_from_slice(&[0x22; 32]);
        v
    }

    #[test]
    fn tpmt_public_parses_and_names() {
        let raw = ak_p256();
        let p = TpmtPublic::parse(&raw).unwrap();
        assert_eq!(p.name_alg, ALG_SHA256);
        assert!(p.has(FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN | RESTRICTED | SIGN));
        assert!(!p.has(DECRYPT));
        assert_eq!(p.scheme, Some((ALG_ECDSA, ALG_SHA256)));
        assert_eq!(p.symmetric, None);
        let name = p.name().unwrap();
        assert_eq!(&name[..2], &[0x00, 0x0b]);
        assert_eq!(&name[2..], &Sha256::digest(&raw)[..]);
        assert_eq!(name, name_of(&raw, ALG_SHA256).unwrap());
    }

    #[test]
    fn every_truncation_and_a_trailing_byte_are_refused() {
        let raw = ak_p256();
        for n in 0..raw.len() {
            let e = TpmtPublic::parse(&raw[..n]).unwrap_err();
            assert_eq!(e.code(), "malformed_tpm_structure", "length {n}");
        }
        let mut long = raw.clone();
        long.push(0);
        let e = TpmtPublic::parse(&long).unwrap_err();
        assert!(e.to_string().contains("trailing"), "{e}");
    }

    #[test]
    fn size_bounds_are_enforced() {
        // authPolicy of 65 bytes (one more than SHA-512).
        let mut v = Vec::new();
        v.extend_from_slice(&ALG_ECC.to_be_bytes());
        v.extend_from_slice(&ALG_SHA256.to_be_bytes());
        v.extend_from_slice(&0u32.to_be_bytes());
        v.extend_from_slice(&65u16.to_be_bytes());
        v.extend_from_slice(&[0; 65]);
        let e = TpmtPublic::parse(&v).unwrap_err();
        assert!(e.to_string().contains("maximum 64"), "{e}");
        // ECC coordinate of 67 bytes.
        let mut raw = ak_p256();
        let x_at = raw.len() - 2 * 34;
        raw.truncate(x_at);
        raw.extend_from_slice(&67u16.to_be_bytes());
        raw.extend_from_slice(&[1; 67]);
        raw.extend_from_slice(&[0, 0]);
        let e = TpmtPublic::parse(&raw).unwrap_err();
        assert!(e.to_string().contains("maximum 66"), "{e}");
        // RSA modulus of 513 bytes.
        let mut v = Vec::new();
        v.extend_from_slice(&ALG_RSA.to_be_bytes());
        v.extend_from_slice(&ALG_SHA256.to_be_bytes());
        v.extend_from_slice(&0u32.to_be_bytes());
        v.extend_from_slice(&[0, 0]);
        v.extend_from_slice(&ALG_NULL.to_be_bytes());
        v.extend_from_slice(&ALG_NULL.to_be_bytes());
        v.extend_from_slice(&2048u16.to_be_bytes());
        v.extend_from_slice(&0u32.to_be_bytes());
        v.extend_from_slice(&513u16.to_be_bytes());
        v.extend_from_slice(&[1; 513]);
        let e = TpmtPublic::parse(&v).unwrap_err();
        assert!(e.to_string().contains("maximum 512"), "{e}");
        // Whole input too long.
        let e = TpmtPublic::parse(&vec![0u8; MAX_STRUCTURE + 1]).unwrap_err();
        assert_eq!(e.code(), "malformed_tpm_structure");
        // Unknown object type, unknown nameAlg, unknown scheme.
        let mut raw = ak_p256();
        raw[0..2].copy_from_slice(&ALG_KEYEDHASH.to_be_bytes());
        assert!(TpmtPublic::parse(&raw).is_err());
        let mut raw = ak_p256();
        raw[2..4].copy_from_slice(&0x0099u16.to_be_bytes());
        assert!(TpmtPublic::parse(&raw).is_err());
        let mut raw = ak_p256();
        raw[12..14].copy_from_slice(&ALG_RSASSA.to_be_bytes());
        assert!(TpmtPublic::parse(&raw).is_err());
    }

    fn certify_info(extra: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&TPM_GENERATED_VALUE.to_be_bytes());
        v.extend_from_slice(&ST_ATTEST_CERTIFY.to_be_bytes());
        v.extend_from_slice(&[0, 34, 0, 0x0b]);
        v.extend_from_slice(&[0xaa; 32]);
        v.extend_from_slice(&(extra.len() as u16).to_be_bytes());
        v.extend_from_slice(extra);
        v.extend_from_slice(&7u64.to_be_bytes());
        v.extend_from_slice(&3u32.to_be_bytes());
        v.extend_from_slice(&4u32.to_be_bytes());
        v.push(1);
        v.extend_from_slice(&0x2019_1023_0016_3636u64.to_be_bytes());
        v.extend_from_slice(&[0, 34, 0, 0x0b]);
        v.extend_from_slice(&[0xbb; 32]);
        v.extend_from_slice(&[0, 34, 0, 0x0b]);
        v.extend_from_slice(&[0xcc; 32]);
        v
    }

    #[test]
    fn tpms_attest_certify_parses_strictly() {
        let raw = certify_info(&[0x00, 0xff, 0x55, 0xaa]);
        let a = TpmsAttest::parse(&raw).unwrap();
        assert_eq!(a.magic, TPM_GENERATED_VALUE);
        assert_eq!(a.kind, ST_ATTEST_CERTIFY);
        assert_eq!(a.extra_data, vec![0x00, 0xff, 0x55, 0xaa]);
        assert_eq!(
            (a.clock, a.reset_count, a.restart_count, a.safe),
            (7, 3, 4, true)
        );
        match a.attested {
            Attested::Certify { name, .. } => assert_eq!(name[2..], [0xbb; 32]),
            other => panic!("{other:?}"),
        }
        for n in 0..raw.len() {
            assert!(TpmsAttest::parse(&raw[..n]).is_err(), "length {n}");
        }
        let mut long = raw.clone();
        long.push(0);
        assert!(TpmsAttest::parse(&long).is_err());
        // extraData of 67 bytes.
        assert!(TpmsAttest::parse(&certify_info(&[0; 67])).is_err());
        assert!(TpmsAttest::parse(&certify_info(&[0; 66])).is_ok());
        // safe must be 0 or 1.
        let mut bad = raw.clone();
        let safe_at = 4 + 2 + 36 + 6 + 16;
        assert_eq!(bad[safe_at], 1);
        bad[safe_at] = 2;
        assert!(TpmsAttest::parse(&bad).is_err());
    }

    #[test]
    fn tpms_attest_quote_bounds() {
        let mut v = certify_info(&[]);
        v[4..6].copy_from_slice(&ST_ATTEST_QUOTE.to_be_bytes());
        let body_at = v.len() - 72;
        v.truncate(body_at);
        let mut q = v.clone();
        q.extend_from_slice(&1u32.to_be_bytes());
        q.extend_from_slice(&ALG_SHA256.to_be_bytes());
        q.extend_from_slice(&[3, 0x81, 0, 0]);
        q.extend_from_slice(&[0, 32]);
        q.extend_from_slice(&[9; 32]);
        let a = TpmsAttest::parse(&q).unwrap();
        assert_eq!(
            a.attested,
            Attested::Quote {
                pcr_select: vec![(ALG_SHA256, vec![0x81, 0, 0])],
                pcr_digest: vec![9; 32]
            }
        );
        let mut many = v.clone();
        many.extend_from_slice(&17u32.to_be_bytes());
        assert!(TpmsAttest::parse(&many).is_err());
        let mut wide = v;
        wide.extend_from_slice(&1u32.to_be_bytes());
        wide.extend_from_slice(&ALG_SHA256.to_be_bytes());
        wide.extend_from_slice(&[5, 0, 0, 0, 0, 0]);
        wide.extend_from_slice(&[0, 0]);
        assert!(TpmsAttest::parse(&wide).is_err());
    }

    #[test]
    fn tpmt_signature_variants_and_bounds() {
        let mut e = Vec::new();
        e.extend_from_slice(&ALG_ECDSA.to_be_bytes());
        e.extend_from_slice(&ALG_SHA256.to_be_bytes());
        e.extend_from_slice(&[0, 31]);
        e.extend_from_slice(&[1; 31]);
        e.extend_from_slice(&[0, 32]);
        e.extend_from_slice(&[2; 32]);
        assert_eq!(
            TpmtSignature::parse(&e).unwrap(),
            TpmtSignature::Ecdsa {
                hash: ALG_SHA256,
                r: vec![1; 31],
                s: vec![2; 32]
            }
        );
        for n in 0..e.len() {
            assert!(TpmtSignature::parse(&e[..n]).is_err());
        }
        let mut long = e.clone();
        long.push(0);
        assert!(TpmtSignature::parse(&long).is_err());
        let mut big = Vec::new();
        big.extend_from_slice(&ALG_ECDSA.to_be_bytes());
        big.extend_from_slice(&ALG_SHA256.to_be_bytes());
        big.extend_from_slice(&[0, 67]);
        big.extend_from_slice(&[1; 67]);
        assert!(TpmtSignature::parse(&big).is_err());
        let mut rsa = Vec::new();
        rsa.extend_from_slice(&ALG_RSASSA.to_be_bytes());
        rsa.extend_from_slice(&ALG_SHA256.to_be_bytes());
        rsa.extend_from_slice(&256u16.to_be_bytes());
        rsa.extend_from_slice(&[7; 256]);
        assert!(matches!(
            TpmtSignature::parse(&rsa).unwrap(),
            TpmtSignature::RsaSsa { sig, .. } if sig.len() == 256
        ));
        assert_eq!(
            TpmtSignature::parse(&ALG_NULL.to_be_bytes()).unwrap(),
            TpmtSignature::Null
        );
        let mut h = Vec::new();
        h.extend_from_slice(&ALG_HMAC.to_be_bytes());
        h.extend_from_slice(&ALG_SHA256.to_be_bytes());
        h.extend_from_slice(&[0; 32]);
        assert!(TpmtSignature::parse(&h).is_ok());
        h.pop();
        assert!(TpmtSignature::parse(&h).is_err());
        assert!(TpmtSignature::parse(&0x0099u16.to_be_bytes()).is_err());
    }
}
