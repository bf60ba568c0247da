//! Endorsement Key certificates: parsing what a TPM keeps in NV, the EK's standard protection
//! parameters, and chaining the certificate to a set of trusted TPM-maker roots.
//!
//! Chains are checked here, not with a WebPKI validator, because field EK certificates are not
//! WebPKI-clean (swtpm's and several vendors' have a *critical* SAN that holds only a
//! directoryName with the TPM manufacturer, model and firmware version). The rules:
//! issuer/subject match by exact DER bytes (plus AKI/SKI when both are present), every
//! signature checked (RSA PKCS#1 v1.5 with SHA-256/384/512, ECDSA P-256/P-384 with
//! SHA-256/384; SHA-1 and anything else refused), intermediates untrusted and required to be
//! CAs (basicConstraints cA), at most [`MAX_CHAIN_DEPTH`] intermediates, the TCG EK EKU
//! (2.23.133.8.1) required when the EK certificate has an EKU extension. Not checked:
//! pathLenConstraint, keyUsage and name constraints of the CAs, and revocation (no CRL or
//! OCSP fetch: the server never follows URLs found in certificates). Roots are trust anchors
//! as configured; their own signature and extensions are not examined.
//!
//! **Validity periods are logged, not enforced** (many EK chains carry odd dates, and a TPM
//! outlives its certificate's notAfter): [`Trusted::outside_validity`] lists every certificate
//! of the chain whose period does not contain `now`, and a `tracing` warning is emitted. A
//! caller that wants to block on it can.

use std::path::Path;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use p256::pkcs8::DecodePublicKey;
use sha2::{Digest, Sha256};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;
use x509_parser::time::ASN1Time;

use crate::wire::{ALG_SHA256, ALG_SHA384};
use crate::{AttestError, Result};

/// At most this many intermediates between an EK certificate and a root.
pub const MAX_CHAIN_DEPTH: usize = 5;

/// NV contents longer than this are refused (EK certificates are 1-2 KiB).
pub const MAX_EK_CERT_NV: usize = 16 * 1024;

/// TCG EK certificate EKU: tcg-kp-EKCertificate.
const OID_TCG_KP_EK_CERTIFICATE: &str = "2.23.133.8.1";
const OID_TPM_MANUFACTURER: &str = "2.23.133.2.1";
const OID_TPM_MODEL: &str = "2.23.133.2.2";
const OID_TPM_VERSION: &str = "2.23.133.2.3";

/// Signature algorithms accepted in EK chains.
const ACCEPTED_SIG_OIDS: [&str; 5] = [
    "1.2.840.113549.1.1.11", // sha256WithRSAEncryption
    "1.2.840.113549.1.1.12", // sha384WithRSAEncryption
    "1.2.840.113549.1.1.13", // sha512WithRSAEncryption
    "1.2.840.10045.4.3.2",   // ecdsa-with-SHA256
    "1.2.840.10045.4.3.3",   // ecdsa-with-SHA384
];

/// The EK kinds of the TCG EK Credential Profile this crate handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EkAlg {
    /// RSA-2048, low range (template L-1): certificate at NV 0x01c00002.
    Rsa2048,
    /// ECC NIST P-256, low range (L-2): NV 0x01c0000a.
    EccP256,
    /// ECC NIST P-384, high range (H-3): NV 0x01c00016 (what swtpm and Nuvoton ship).
    EccP384,
    /// RSA-3072, high range (H-6): NV 0x01c0001c.
    Rsa3072,
}

impl EkAlg {
    /// All kinds, in the order a device should look for certificates.
    pub const ALL: [EkAlg; 4] = [
        EkAlg::Rsa2048,
        EkAlg::EccP256,
        EkAlg::EccP384,
        EkAlg::Rsa3072,
    ];

    /// The wire name: "rsa2048", "ecc-p256", "ecc-p384", "rsa3072".
    pub fn as_str(self) -> &'static str {
        match self {
            EkAlg::Rsa2048 => "rsa2048",
            EkAlg::EccP256 => "ecc-p256",
            EkAlg::EccP384 => "ecc-p384",
            EkAlg::Rsa3072 => "rsa3072",
        }
    }

    /// The NV index of this kind's EK certificate.
    pub fn nv_index(self) -> u32 {
        match self {
            EkAlg::Rsa2048 => 0x01c0_0002,
            EkAlg::EccP256 => 0x01c0_000a,
            EkAlg::EccP384 => 0x01c0_0016,
            EkAlg::Rsa3072 => 0x01c0_001c,
        }
    }

    /// The standard template's nameAlg: SHA-256 for the low-range RSA-2048 and P-256 EKs,
    /// SHA-384 for P-384 and RSA-3072.
    pub fn name_alg(self) -> u16 {
        match self {
            EkAlg::Rsa2048 | EkAlg::EccP256 => ALG_SHA256,
            EkAlg::EccP384 | EkAlg::Rsa3072 => ALG_SHA384,
        }
    }

    /// The standard template's AES key size (the mode is always CFB): 128 bits for RSA-2048
    /// and P-256, 256 for P-384 and RSA-3072.
    pub fn sym_key_bits(self) -> u16 {
        match self {
            EkAlg::Rsa2048 | EkAlg::EccP256 => 128,
            EkAlg::EccP384 | EkAlg::Rsa3072 => 256,
        }
    }
}

impl std::fmt::Display for EkAlg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EkAlg {
    type Err = AttestError;
    fn from_str(s: &str) -> Result<EkAlg> {
        EkAlg::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| {
                AttestError::EkCertInvalid(format!(
                    "unknown EK algorithm {s:?} (use rsa2048, ecc-p256, ecc-p384 or rsa3072)"
                ))
            })
    }
}

/// The EK's public key, as the certificate states it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EkKey {
    /// An RSA key (2048 or 3072 bits).
    Rsa(rsa::RsaPublicKey),
    /// A P-256 point.
    P256(p256::PublicKey),
    /// A P-384 point.
    P384(p384::PublicKey),
}

/// An EK public key with the protection parameters of its standard template.
///
/// Built only from a certificate's key: the EK parameters (nameAlg, AES key size) always come
/// from the template for the key's algorithm ([`EkAlg::name_alg`], [`EkAlg::sym_key_bits`]),
/// never from anything the client sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EkPublic {
    /// Which standard EK this is.
    pub alg: EkAlg,
    /// The key.
    pub key: EkKey,
}

impl EkPublic {
    /// From a DER SubjectPublicKeyInfo: RSA-2048, RSA-3072, P-256 or P-384.
    pub fn from_spki_der(spki: &[u8]) -> Result<EkPublic> {
        if let Ok(k) = p256::PublicKey::from_public_key_der(spki) {
            return Ok(EkPublic {
                alg: EkAlg::EccP256,
                key: EkKey::P256(k),
            });
        }
        if let Ok(k) = p384::PublicKey::from_public_key_der(spki) {
            return Ok(EkPublic {
                alg: EkAlg::EccP384,
                key: EkKey::P384(k),
            });
        }
        if let Ok(k) = rsa::RsaPublicKey::from_public_key_der(spki) {
            use rsa::traits::PublicKeyParts;
            let alg = match k.size() * 8 {
                2048 => EkAlg::Rsa2048,
                3072 => EkAlg::Rsa3072,
                bits => {
                    return Err(AttestError::EkCertInvalid(format!(
                        "RSA-{bits} EK: only RSA-2048 and RSA-3072 EKs are supported"
                    )))
                }
            };
            return Ok(EkPublic {
                alg,
                key: EkKey::Rsa(k),
            });
        }
        Err(AttestError::EkCertInvalid(
            "the EK key is not RSA-2048, RSA-3072, ECC P-256 or ECC P-384".into(),
        ))
    }

    /// From a DER certificate's key.
    pub fn from_cert(cert_der: &[u8]) -> Result<EkPublic> {
        let (_, cert) = X509Certificate::from_der(cert_der)
            .map_err(|e| AttestError::EkCertInvalid(format!("not an X.509 certificate: {e}")))?;
        EkPublic::from_spki_der(cert.public_key().raw)
    }

    /// The template's name hash (the hash of every MakeCredential step).
    pub fn name_alg(&self) -> u16 {
        self.alg.name_alg()
    }

    /// The template's AES-CFB key size in bits.
    pub fn sym_key_bits(&self) -> u16 {
        self.alg.sym_key_bits()
    }
}

/// A parsed EK certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EkCert {
    /// The certificate, exactly one DER element (NV padding and wrapper removed).
    pub der: Vec<u8>,
    /// The EK's key and template parameters.
    pub public: EkPublic,
    /// TPM manufacturer from the SAN directoryName (2.23.133.2.1), e.g. "id:00001014".
    pub manufacturer: Option<String>,
    /// TPM model (2.23.133.2.2).
    pub model: Option<String>,
    /// TPM firmware version (2.23.133.2.3).
    pub version: Option<String>,
    /// Lowercase hex SHA-256 of the SubjectPublicKeyInfo DER: the EK's identity for
    /// allowlists and the registry.
    pub fingerprint: String,
}

/// The first DER element of `b` (a SEQUENCE), or why not.
fn one_der_element(b: &[u8]) -> Result<&[u8]> {
    let bad = |m: &str| AttestError::EkCertInvalid(format!("not a DER certificate: {m}"));
    if b.len() < 2 || b[0] != 0x30 {
        return Err(bad("does not start with a SEQUENCE"));
    }
    let (len, hdr) = match b[1] {
        n if n < 0x80 => (usize::from(n), 2),
        0x81..=0x83 => {
            let k = usize::from(b[1] - 0x80);
            let bytes = b.get(2..2 + k).ok_or_else(|| bad("truncated length"))?;
            let len = bytes.iter().fold(0usize, |a, x| (a << 8) | usize::from(*x));
            (len, 2 + k)
        }
        _ => return Err(bad("unsupported length encoding")),
    };
    let end = hdr
        .checked_add(len)
        .filter(|e| *e <= b.len())
        .ok_or_else(|| bad("truncated"))?;
    Ok(&b[..end])
}

impl EkCert {
    /// Parse an EK certificate from the bytes of its NV index. Tolerated, as real TPMs need:
    /// the `10 01 00 <len16>` wrapper, zero padding or other trailing bytes after the one DER
    /// element, a critical SAN with only a directoryName. Refused: anything that is not one
    /// X.509 certificate with an RSA-2048/3072, P-256 or P-384 key.
    pub fn parse(nv_bytes: &[u8]) -> Result<EkCert> {
        if nv_bytes.len() > MAX_EK_CERT_NV {
            return Err(AttestError::EkCertInvalid(format!(
                "{} bytes, more than the {MAX_EK_CERT_NV} an EK certificate index holds",
                nv_bytes.len()
            )));
        }
        let mut b = nv_bytes;
        if b.len() >= 5 && b[..3] == [0x10, 0x01, 0x00] {
            let n = usize::from(u16::from_be_bytes([b[3], b[4]]));
            b = b.get(5..5 + n).ok_or_else(|| {
                AttestError::EkCertInvalid("truncated 10 01 00 <len> NV wrapper".into())
            })?;
        }
        let der = one_der_element(b)?;
        let (rest, cert) = X509Certificate::from_der(der)
            .map_err(|e| AttestError::EkCertInvalid(format!("not an X.509 certificate: {e}")))?;
        if !rest.is_empty() {
            return Err(AttestError::EkCertInvalid(
                "bytes inside the certificate's DER element after the certificate".into(),
            ));
        }
        let spki = cert.public_key().raw;
        let public = EkPublic::from_spki_der(spki)?;
        let fingerprint = hex::encode(Sha256::digest(spki));
        let (mut manufacturer, mut model, mut version) = (None, None, None);
        for ext in cert.extensions() {
            if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
                for gn in &san.general_names {
                    if let GeneralName::DirectoryName(name) = gn {
                        for attr in name.iter_attributes() {
                            let value = attr.as_str().ok().map(str::to_owned);
                            match attr.attr_type().to_id_string().as_str() {
                                OID_TPM_MANUFACTURER => manufacturer = value,
                                OID_TPM_MODEL => model = value,
                                OID_TPM_VERSION => version = value,
                                _ => {}
                            }
                        }
                    }
                }
            }
        }
        Ok(EkCert {
            der: der.to_vec(),
            public,
            manufacturer,
            model,
            version,
            fingerprint,
        })
    }
}

impl EkCert {
    /// Check the EK algorithm a device claims (`ek_alg` on the wire) against the
    /// certificate's key: the certificate decides, a mismatch is refused (`ek_cert_invalid`).
    pub fn require_alg(&self, claimed: EkAlg) -> Result<()> {
        if self.public.alg == claimed {
            Ok(())
        } else {
            Err(AttestError::EkCertInvalid(format!(
                "the device says ek_alg {claimed} but the certificate holds a {} key",
                self.public.alg
            )))
        }
    }
}

/// The result of a successful chain check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trusted {
    /// The subject of the root the chain ends at (RFC 4514 text).
    pub root_subject: String,
    /// How many intermediates were used.
    pub intermediates_used: usize,
    /// Subjects of the certificates of the chain (EK certificate, intermediates, root) whose
    /// validity period does not contain `now`. Not a refusal (see the module docs).
    pub outside_validity: Vec<String>,
}

/// A trust set of TPM-maker root certificates.
#[derive(Debug, Clone, Default)]
pub struct EkRoots {
    roots: Vec<Vec<u8>>,
}

impl EkRoots {
    /// Every `CERTIFICATE` PEM block of every `*.pem` / `*.crt` file in `dir` (not recursive).
    /// An unreadable file or a broken block is an error: a trust set is configuration.
    pub fn from_pem_dir(dir: impl AsRef<Path>) -> Result<EkRoots> {
        let dir = dir.as_ref();
        let entries = std::fs::read_dir(dir).map_err(|e| {
            AttestError::EkRootsInvalid(format!("cannot read {}: {e}", dir.display()))
        })?;
        let mut paths = Vec::new();
        for e in entries {
            let e = e.map_err(|e| {
                AttestError::EkRootsInvalid(format!("cannot read {}: {e}", dir.display()))
            })?;
            let p = e.path();
            let ext = p.extension().and_then(|x| x.to_str()).unwrap_or("");
            if (ext == "pem" || ext == "crt") && p.is_file() {
                paths.push(p);
            }
        }
        paths.sort();
        let mut roots = EkRoots::default();
        for p in paths {
            let text = std::fs::read(&p).map_err(|e| {
                AttestError::EkRootsInvalid(format!("cannot read {}: {e}", p.display()))
            })?;
            roots
                .add_pem(&text)
                .map_err(|e| AttestError::EkRootsInvalid(format!("{}: {e}", p.display())))?;
        }
        Ok(roots)
    }

    /// From PEM texts (each may hold several certificates).
    pub fn from_pems(pems: &[&str]) -> Result<EkRoots> {
        let mut roots = EkRoots::default();
        for p in pems {
            roots
                .add_pem(p.as_bytes())
                .map_err(|e| AttestError::EkRootsInvalid(e.to_string()))?;
        }
        Ok(roots)
    }

    /// Add one DER root certificate.
    pub fn add_der(&mut self, der: &[u8]) -> Result<()> {
        let (rest, _) = X509Certificate::from_der(der)
            .map_err(|e| AttestError::EkRootsInvalid(format!("not an X.509 certificate: {e}")))?;
        if !rest.is_empty() {
            return Err(AttestError::EkRootsInvalid(
                "trailing bytes after a root certificate".into(),
            ));
        }
        self.roots.push(der.to_vec());
        Ok(())
    }

    fn add_pem(&mut self, text: &[u8]) -> std::result::Result<(), String> {
        for pem in x509_parser::pem::Pem::iter_from_buffer(text) {
            let pem = pem.map_err(|e| format!("bad PEM: {e}"))?;
            if pem.label != "CERTIFICATE" {
                continue;
            }
            self.add_der(&pem.contents).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// True when the set holds no root (then every EK is untrusted).
    pub fn is_empty(&self) -> bool {
        self.roots.is_empty()
    }

    /// How many roots.
    pub fn len(&self) -> usize {
        self.roots.len()
    }

    /// Chain `ek` to one of the roots, using `intermediates` (DER, from the client or NV:
    /// untrusted) as needed. See the module docs for the rules.
    pub fn verify(
        &self,
        ek: &EkCert,
        intermediates: &[Vec<u8>],
        now: SystemTime,
    ) -> Result<Trusted> {
        let (_, leaf) = X509Certificate::from_der(&ek.der)
            .map_err(|e| AttestError::EkCertInvalid(format!("not an X.509 certificate: {e}")))?;
        check_ek_eku(&leaf)?;
        let roots: Vec<X509Certificate<'_>> = self
            .roots
            .iter()
            .filter_map(|d| X509Certificate::from_der(d).ok().map(|(_, c)| c))
            .collect();
        let mut inters = Vec::with_capacity(intermediates.len());
        for (i, d) in intermediates.iter().enumerate() {
            let (_, c) = X509Certificate::from_der(d).map_err(|e| {
                AttestError::EkCertInvalid(format!("intermediate certificate #{i} unparsable: {e}"))
            })?;
            inters.push(c);
        }
        let now_secs = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let now_asn1 = ASN1Time::from_timestamp(i64::try_from(now_secs).unwrap_or(i64::MAX))
            .map_err(|e| AttestError::EkUntrusted(format!("bad time: {e}")))?;
        let mut outside = Vec::new();
        let mut note_validity = |c: &X509Certificate<'_>| {
            if !c.validity().is_valid_at(now_asn1) {
                outside.push(c.subject().to_string());
            }
        };
        note_validity(&leaf);
        let mut used = vec![false; inters.len()];
        let mut current = &leaf;
        for depth in 0..=MAX_CHAIN_DEPTH {
            if let Some(root) = roots.iter().find(|r| issued_by(current, r)) {
                note_validity(root);
                if !outside.is_empty() {
                    tracing::warn!(
                        certificates = ?outside,
                        "EK certificate chain outside its validity period (accepted: validity is not enforced)"
                    );
                }
                return Ok(Trusted {
                    root_subject: root.subject().to_string(),
                    intermediates_used: depth,
                    outside_validity: outside,
                });
            }
            if depth == MAX_CHAIN_DEPTH {
                break;
            }
            let next = inters
                .iter()
                .enumerate()
                .find(|(i, c)| !used[*i] && is_ca(c) && issued_by(current, c));
            match next {
                Some((i, c)) => {
                    used[i] = true;
                    note_validity(c);
                    current = c;
                }
                None => {
                    return Err(AttestError::EkUntrusted(format!(
                        "no trusted root or intermediate issued {:?} (issuer {:?})",
                        current.subject().to_string(),
                        current.issuer().to_string()
                    )))
                }
            }
        }
        Err(AttestError::EkUntrusted(format!(
            "no trusted root within {MAX_CHAIN_DEPTH} intermediates"
        )))
    }
}

fn check_ek_eku(cert: &X509Certificate<'_>) -> Result<()> {
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::ExtendedKeyUsage(eku)
                if !eku
                    .other
                    .iter()
                    .any(|o| o.to_id_string() == OID_TCG_KP_EK_CERTIFICATE) =>
            {
                return Err(AttestError::EkCertInvalid(
                    "the certificate has an extended key usage without tcg-kp-EKCertificate (2.23.133.8.1): it is not an EK certificate".into(),
                ));
            }
            ParsedExtension::ParseError { error } if ext.oid.to_id_string() == "2.5.29.37" => {
                return Err(AttestError::EkCertInvalid(format!(
                    "unparsable extended key usage: {error}"
                )))
            }
            _ => {}
        }
    }
    Ok(())
}

fn is_ca(cert: &X509Certificate<'_>) -> bool {
    matches!(cert.basic_constraints(), Ok(Some(bc)) if bc.value.ca)
}

fn key_ids(cert: &X509Certificate<'_>) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
    let (mut aki, mut ski) = (None, None);
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(a) => {
                aki = a.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            ParsedExtension::SubjectKeyIdentifier(k) => ski = Some(k.0.to_vec()),
            _ => {}
        }
    }
    (aki, ski)
}

/// `child` names `issuer` as its issuer (exact DER name, AKI/SKI when both present) and its
/// signature verifies with `issuer`'s key under an accepted algorithm.
fn issued_by(child: &X509Certificate<'_>, issuer: &X509Certificate<'_>) -> bool {
    if child.issuer().as_raw() != issuer.subject().as_raw() {
        return false;
    }
    if let (Some(aki), _) = key_ids(child) {
        if let (_, Some(ski)) = key_ids(issuer) {
            if aki != ski {
                return false;
            }
        }
    }
    let alg = child.signature_algorithm.algorithm.to_id_string();
    if !ACCEPTED_SIG_OIDS.contains(&alg.as_str()) {
        return false;
    }
    child.verify_signature(Some(issuer.public_key())).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ek_alg_names_round_trip_and_templates() {
        for a in EkAlg::ALL {
            assert_eq!(a.as_str().parse::<EkAlg>().unwrap(), a);
        }
        assert!("rsa".parse::<EkAlg>().is_err());
        assert_eq!(EkAlg::Rsa2048.name_alg(), ALG_SHA256);
        assert_eq!(EkAlg::EccP256.sym_key_bits(), 128);
        assert_eq!(EkAlg::EccP384.name_alg(), ALG_SHA384);
        assert_eq!(EkAlg::Rsa3072.sym_key_bits(), 256);
    }

    #[test]
    fn nv_wrapper_and_padding_are_handled_before_der() {
        assert!(
            one_der_element(&[0x30, 0x03, 1, 2, 3, 0, 0, 0])
                .unwrap()
                .len()
                == 5
        );
        assert!(one_der_element(&[0x30, 0x05, 1, 2]).is_err());
        assert!(one_der_element(&[0x31, 0x00]).is_err());
        assert!(one_der_element(&[0x30, 0x84, 0, 0, 0, 1, 0]).is_err());
        assert!(one_der_element(&[0x30, 0x81]).is_err());
        // Wrapper claiming more than there is.
        let e = EkCert::parse(&[0x10, 0x01, 0x00, 0x01, 0x00, 0x30]).unwrap_err();
        assert_eq!(e.code(), "ek_cert_invalid");
        assert_eq!(EkCert::parse(&[]).unwrap_err().code(), "ek_cert_invalid");
        assert_eq!(
            EkCert::parse(&vec![0u8; MAX_EK_CERT_NV + 1])
                .unwrap_err()
                .code(),
            "ek_cert_invalid"
        );
    }

    #[test]
    fn empty_roots_trust_nothing_and_bad_pem_is_refused() {
        let r = EkRoots::from_pems(&[]).unwrap();
        assert!(r.is_empty());
        let bad = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert_eq!(
            EkRoots::from_pems(&[bad]).unwrap_err().code(),
            "ek_roots_invalid"
        );
        assert_eq!(
            EkRoots::from_pem_dir(Path::new("/nonexistent-devid-dir"))
                .unwrap_err()
                .code(),
            "ek_roots_invalid"
        );
    }
}
