//! The "TSS2 PRIVATE KEY" PEM file (ASN.1 `TPMKey`), as read by tpm2-openssl,
//! openssl_tpm2_engine, the Linux kernel and GRUB:
//!
//! ```text
//! TPMKey ::= SEQUENCE {
//!     type        OBJECT IDENTIFIER,          -- 2.23.133.10.1.3 loadable key
//!     emptyAuth   [0] EXPLICIT BOOLEAN OPTIONAL,
//!     policy      [1] EXPLICIT SEQUENCE OF TPMPolicy OPTIONAL,  -- not written
//!     secret      [2] EXPLICIT OCTET STRING OPTIONAL,           -- not written
//!     parent      INTEGER,                    -- 0x40000001 (owner primary) or 0x81000001
//!     pubkey      OCTET STRING,               -- TPM2B_PUBLIC
//!     privkey     OCTET STRING                -- TPM2B_PRIVATE
//! }
//! ```

use der::asn1::{ObjectIdentifier, OctetString};
use der::{Decode, DecodePem, Encode, EncodePem, Sequence};

use devid_keystore::KeystoreError;

/// OID of a loadable TPM key.
pub const OID_LOADABLE_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.23.133.10.1.3");
/// Parent handle meaning "the primary made from the standard template in the owner hierarchy".
pub const PARENT_OWNER: u32 = 0x4000_0001;

#[derive(Sequence)]
struct TpmKeyAsn1 {
    key_type: ObjectIdentifier,
    #[asn1(context_specific = "0", optional = "true", tag_mode = "EXPLICIT")]
    empty_auth: Option<bool>,
    parent: u32,
    pubkey: OctetString,
    privkey: OctetString,
}

impl der::pem::PemLabel for TpmKeyAsn1 {
    const PEM_LABEL: &'static str = "TSS2 PRIVATE KEY";
}

/// A parsed key file: the TPM2B_PUBLIC and TPM2B_PRIVATE blobs and the parent handle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpmKeyFile {
    /// Parent handle (see [`PARENT_OWNER`]).
    pub parent: u32,
    /// Marshalled TPM2B_PUBLIC (2-byte size prefix included).
    pub public: Vec<u8>,
    /// Marshalled TPM2B_PRIVATE (2-byte size prefix included).
    pub private: Vec<u8>,
}

fn invalid(detail: impl ToString) -> KeystoreError {
    KeystoreError::InvalidBlob {
        what: "TSS2 PRIVATE KEY file",
        detail: detail.to_string(),
    }
}

impl TpmKeyFile {
    /// Encode as PEM.
    pub fn to_pem(&self) -> Result<String, KeystoreError> {
        let asn = TpmKeyAsn1 {
            key_type: OID_LOADABLE_KEY,
            empty_auth: Some(true),
            parent: self.parent,
            pubkey: OctetString::new(self.public.clone()).map_err(invalid)?,
            privkey: OctetString::new(self.private.clone()).map_err(invalid)?,
        };
        asn.to_pem(der::pem::LineEnding::LF).map_err(invalid)
    }

    /// Parse a PEM file.
    pub fn from_pem(pem: &str) -> Result<Self, KeystoreError> {
        let asn = TpmKeyAsn1::from_pem(pem).map_err(invalid)?;
        Self::from_asn(asn)
    }

    /// Parse DER (for tests and fuzzing).
    pub fn from_der(der: &[u8]) -> Result<Self, KeystoreError> {
        let asn = TpmKeyAsn1::from_der(der).map_err(invalid)?;
        Self::from_asn(asn)
    }

    /// Encode DER.
    pub fn to_der(&self) -> Result<Vec<u8>, KeystoreError> {
        TpmKeyAsn1 {
            key_type: OID_LOADABLE_KEY,
            empty_auth: Some(true),
            parent: self.parent,
            pubkey: OctetString::new(self.public.clone()).map_err(invalid)?,
            privkey: OctetString::new(self.private.clone()).map_err(invalid)?,
        }
        .to_der()
        .map_err(invalid)
    }

    fn from_asn(asn: TpmKeyAsn1) -> Result<Self, KeystoreError> {
        if asn.key_type != OID_LOADABLE_KEY {
            return Err(invalid(format!(
                "key type {} is not a loadable key (2.23.133.10.1.3)",
                asn.key_type
            )));
        }
        Ok(TpmKeyFile {
            parent: asn.parent,
            public: asn.pubkey.as_bytes().to_vec(),
            private: asn.privkey.as_bytes().to_vec(),
        })
    }
}

/// Split a TPM2B (2-byte big-endian size, then that many bytes) off the front of `bytes`.
pub fn take_tpm2b(bytes: &[u8]) -> Result<(&[u8], &[u8]), KeystoreError> {
    if bytes.len() < 2 {
        return Err(invalid("truncated TPM2B size"));
    }
    let n = u16::from_be_bytes([bytes[0], bytes[1]]) as usize;
    let rest = &bytes[2..];
    if rest.len() < n {
        return Err(invalid("truncated TPM2B body"));
    }
    Ok((&rest[..n], &rest[n..]))
}

/// Prefix `body` with its 2-byte big-endian size.
pub fn make_tpm2b(body: &[u8]) -> Result<Vec<u8>, KeystoreError> {
    let n = u16::try_from(body.len()).map_err(|_| invalid("TPM2B body too large"))?;
    let mut out = Vec::with_capacity(body.len() + 2);
    out.extend_from_slice(&n.to_be_bytes());
    out.extend_from_slice(body);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_round_trip() {
        let k = TpmKeyFile {
            parent: 0x8100_0001,
            public: make_tpm2b(&[1, 2, 3]).expect("tpm2b"),
            private: make_tpm2b(&[4, 5]).expect("tpm2b"),
        };
        let pem = k.to_pem().expect("pem");
        assert!(pem.starts_with("-----BEGIN TSS2 PRIVATE KEY-----"));
        assert_eq!(TpmKeyFile::from_pem(&pem).expect("parse"), k);
        let (body, rest) = take_tpm2b(&k.public).expect("take");
        assert_eq!(body, &[1, 2, 3]);
        assert!(rest.is_empty());
        assert!(take_tpm2b(&[0, 5, 1]).is_err());
        assert!(TpmKeyFile::from_pem(
            "-----BEGIN TSS2 PRIVATE KEY-----\nAAAA\n-----END TSS2 PRIVATE KEY-----\n"
        )
        .is_err());
    }
}
