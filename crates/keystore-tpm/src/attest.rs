//! Key attestation on the device (docs/attestation.md): read the EK certificate, make (once)
//! and keep an attestation key, answer the server's credential challenge with
//! TPM2_ActivateCredential and certify the device key with TPM2_Certify.
//!
//! * The AK is a restricted ECC P-256 ECDSA/SHA-256 signing key with fixedTPM | fixedParent |
//!   sensitiveDataOrigin | userWithAuth, created under the SRK in the vault's salted session
//!   and kept in `tpm-attest-key.pem` beside the device key (same TSS2 key-file format).
//! * ActivateCredential runs with the vault's salted, parameter-encrypted HMAC session for the
//!   AK, so the secret it returns crosses the bus encrypted; the EK is authorised by a policy
//!   session with PolicySecret(endorsement) (low-range EKs, userWithAuth clear) or by its
//!   empty password (high-range EKs).
//! * Three object slots are enough (swtpm without a resource manager has three): the device
//!   key is flushed before the AK and the EK are used, and the AK is flushed after each step.

use std::path::PathBuf;

use devid_keystore::{
    AttestIdentity, KeyAttestation, KeyCertification, KeystoreError, SecretBytes,
};
use tss_esapi::abstraction::{ek, AsymmetricAlgorithmSelection};
use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::constants::SessionType;
use tss_esapi::handles::{
    AuthHandle, KeyHandle, ObjectHandle, PersistentTpmHandle, SessionHandle, TpmHandle,
};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    Data, EccPoint, EccScheme, EncryptedSecret, HashScheme, IdObject, KeyDerivationFunctionScheme,
    Private, Public, PublicBuilder, PublicEccParametersBuilder, SignatureScheme,
    SymmetricDefinition, SymmetricDefinitionObject,
};
use tss_esapi::traits::{Marshall, UnMarshall};

use crate::keyfile::{make_tpm2b, take_tpm2b, TpmKeyFile, PARENT_OWNER};
use crate::{backend_err, load_error, tss, Inner, TpmKeystore};

/// File name of the attestation key inside the state dir.
pub const AK_FILE: &str = "tpm-attest-key.pem";

/// The endorsement keys devid knows, in the order `auto` tries them: name, the algorithm
/// selection, the persistent handle where platforms usually keep it, low range (userWithAuth
/// clear, PolicySecret needed).
const EK_KINDS: &[(&str, u32, bool)] = &[
    ("rsa2048", 0x8101_0001, true),
    ("ecc-p256", 0x8101_0002, true),
    ("ecc-p384", 0x8101_0016, false),
    ("rsa3072", 0x8101_001c, false),
];

fn selection(alg: &str) -> Result<AsymmetricAlgorithmSelection, KeystoreError> {
    Ok(match alg {
        "rsa2048" => AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048),
        "rsa3072" => AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa3072),
        "ecc-p256" => AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP256),
        "ecc-p384" => AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP384),
        other => {
            return Err(KeystoreError::Config(format!(
                "unknown endorsement key {other:?}: use rsa2048, ecc-p256, ecc-p384 or rsa3072"
            )))
        }
    })
}

fn kind(alg: &str) -> Result<(u32, bool), KeystoreError> {
    EK_KINDS
        .iter()
        .find(|(n, _, _)| *n == alg)
        .map(|(_, h, low)| (*h, *low))
        .ok_or_else(|| KeystoreError::Config(format!("unknown endorsement key {alg:?}")))
}

/// The AK template: restricted ECC P-256 signing key, ECDSA/SHA-256 (TPMA 0x00050072).
fn ak_template() -> Result<Public, KeystoreError> {
    let attrs = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_restricted(true)
        .with_sign_encrypt(true)
        .with_decrypt(false)
        .build()
        .map_err(tss("build AK template"))?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attrs)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new()
                .with_symmetric(SymmetricDefinitionObject::Null)
                .with_ecc_scheme(EccScheme::EcDsa(HashScheme::new(HashingAlgorithm::Sha256)))
                .with_curve(EccCurve::NistP256)
                .with_key_derivation_function_scheme(KeyDerivationFunctionScheme::Null)
                .with_is_signing_key(true)
                .with_is_decryption_key(false)
                .with_restricted(true)
                .build()
                .map_err(tss("build AK template"))?,
        )
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
        .map_err(tss("build AK template"))
}

impl TpmKeystore {
    fn ak_path(&self) -> PathBuf {
        self.key_path
            .parent()
            .map(|d| d.join(AK_FILE))
            .unwrap_or_else(|| PathBuf::from(AK_FILE))
    }

    /// The AK's key file: read it, or create the AK under the SRK and write it.
    pub(crate) fn ak_file(&self, inner: &mut Inner) -> Result<TpmKeyFile, KeystoreError> {
        let path = self.ak_path();
        match std::fs::read_to_string(&path) {
            Ok(pem) => return TpmKeyFile::from_pem(&pem),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(KeystoreError::io(&path, e)),
        }
        inner.flush_device_key();
        let (file, _) =
            self.create_key_file(inner, ak_template()?, &path, "create attestation key")?;
        tracing::info!(path = %path.display(), "created the TPM attestation key");
        Ok(file)
    }

    /// Create a key under the SRK (in the salted session) and write its TSS2 key file to
    /// `path`; returns the file and the public area.
    pub(crate) fn create_key_file(
        &self,
        inner: &mut Inner,
        template: Public,
        path: &std::path::Path,
        what: &'static str,
    ) -> Result<(TpmKeyFile, Public), KeystoreError> {
        let srk = inner.srk;
        let session = inner.session;
        let created = inner.ctx.execute_with_session(Some(session), |ctx| {
            ctx.create(srk, template, None, None, None, None)
                .map_err(tss(what))
        })?;
        let public = created
            .out_public
            .marshall()
            .map_err(tss("marshal key public area"))?;
        let file = TpmKeyFile {
            parent: self.config.srk_handle.unwrap_or(PARENT_OWNER),
            public: make_tpm2b(&public)?,
            private: make_tpm2b(created.out_private.value())?,
        };
        devid_keystore::fsutil::write_atomic_private(path, file.to_pem()?.as_bytes())
            .map_err(|e| KeystoreError::io(path, e))?;
        Ok((file, created.out_public))
    }

    /// TPM2_Certify of the loaded `key` (whose TPM2B_PUBLIC is `key_public`) by the AK, which
    /// is loaded and flushed here (callers read [`TpmKeystore::ak_file`] before loading `key`:
    /// making the AK flushes the device key). The object's ADMIN role: devid keys have adminWithPolicy
    /// clear, so their (empty) auth value in the salted session works, with or without a PCR
    /// policy for USER.
    pub(crate) fn certify_loaded(
        &self,
        inner: &mut Inner,
        key: KeyHandle,
        key_public: &[u8],
        data: Data,
        what: &'static str,
    ) -> Result<KeyCertification, KeystoreError> {
        let ak_file = self.ak_file(inner)?;
        let ak = self.load_ak(inner, &ak_file)?;
        let session = inner.session;
        let out = inner
            .ctx
            .execute_with_sessions((Some(session), Some(AuthSession::Password), None), |ctx| {
                ctx.certify(ObjectHandle::from(key), ak, data, SignatureScheme::Null)
            })
            .map_err(tss(what));
        inner.flush(ak);
        let (attest, signature) = out?;
        let (key_public, _) = take_tpm2b(key_public)?;
        Ok(KeyCertification {
            key_public: key_public.to_vec(),
            certify_info: attest.marshall().map_err(tss("marshal TPMS_ATTEST"))?,
            signature: signature
                .marshall()
                .map_err(tss("marshal TPMT_SIGNATURE"))?,
        })
    }

    pub(crate) fn load_ak(
        &self,
        inner: &mut Inner,
        file: &TpmKeyFile,
    ) -> Result<KeyHandle, KeystoreError> {
        let (pub_body, _) = take_tpm2b(&file.public)?;
        let (priv_body, _) = take_tpm2b(&file.private)?;
        let public = Public::unmarshall(pub_body).map_err(tss("parse AK public area"))?;
        let private =
            Private::try_from(priv_body.to_vec()).map_err(tss("parse AK private blob"))?;
        let srk = inner.srk;
        let session = inner.session;
        inner
            .ctx
            .execute_with_session(Some(session), |ctx| ctx.load(srk, private, public))
            .map_err(|e| load_error("load attestation key", e))
    }
}

/// The EK's handle: the persistent one when present, else CreatePrimary from the standard
/// template. Returns whether it must be flushed after use.
fn ek_handle(inner: &mut Inner, alg: &str) -> Result<(KeyHandle, bool), KeystoreError> {
    let (handle, _) = kind(alg)?;
    if let Ok(ph) = PersistentTpmHandle::new(handle) {
        if let Ok(obj) = inner.ctx.tr_from_tpm_public(TpmHandle::Persistent(ph)) {
            return Ok((KeyHandle::from(obj), false));
        }
    }
    let key = ek::create_ek_object_2(
        &mut inner.ctx,
        selection(alg)?,
        tss_esapi::abstraction::DefaultKey,
    )
    .map_err(tss("create endorsement key"))?;
    Ok((key, true))
}

/// The certificate's public key bytes comparable with a TPM public area: the RSA modulus
/// (leading zeros stripped) or the uncompressed EC point's x || y.
fn cert_key(der: &[u8]) -> Result<Vec<u8>, KeystoreError> {
    use x509_parser::prelude::FromDer;
    let bad = |d: String| KeystoreError::InvalidBlob {
        what: "EK certificate",
        detail: d,
    };
    // NV contents may be padded after the one DER element.
    let (_, cert) =
        x509_parser::certificate::X509Certificate::from_der(der).map_err(|e| bad(e.to_string()))?;
    match cert.public_key().parsed() {
        Ok(x509_parser::public_key::PublicKey::RSA(rsa)) => Ok(strip(rsa.modulus).to_vec()),
        Ok(x509_parser::public_key::PublicKey::EC(point)) => {
            let d = point.data();
            match d.split_first() {
                Some((4, xy)) => Ok(xy.to_vec()),
                _ => Err(bad("EC point is not uncompressed".into())),
            }
        }
        Ok(_) => Err(bad("neither an RSA nor an EC key".into())),
        Err(e) => Err(bad(e.to_string())),
    }
}

fn strip(v: &[u8]) -> &[u8] {
    let i = v.iter().position(|b| *b != 0).unwrap_or(v.len());
    &v[i..]
}

fn tpm_key(public: &Public) -> Vec<u8> {
    match public {
        Public::Rsa { unique, .. } => strip(unique.value()).to_vec(),
        Public::Ecc { unique, .. } => {
            let mut v = unique.x().value().to_vec();
            v.extend_from_slice(unique.y().value());
            v
        }
        _ => Vec::new(),
    }
}

impl Inner {
    pub(crate) fn flush_device_key(&mut self) {
        if let Some(k) = self.device_key.take() {
            let _ = self.ctx.flush_context(ObjectHandle::from(k));
        }
    }

    pub(crate) fn flush(&mut self, key: KeyHandle) {
        let _ = self.ctx.flush_context(ObjectHandle::from(key));
    }
}

impl KeyAttestation for TpmKeystore {
    fn attestation_identity(
        &self,
        ek_alg: Option<&str>,
    ) -> Result<Option<AttestIdentity>, KeystoreError> {
        let mut inner = self.lock()?;
        let wanted: Vec<&str> = match ek_alg {
            Some(a) => {
                kind(a)?;
                vec![a]
            }
            None => EK_KINDS.iter().map(|(n, _, _)| *n).collect(),
        };
        let mut found = None;
        for alg in wanted {
            // An index that was never written is an error from the TPM: no certificate.
            if let Ok(cert) = ek::retrieve_ek_pubcert(&mut inner.ctx, selection(alg)?) {
                if !cert.is_empty() {
                    found = Some((alg, cert));
                    break;
                }
            }
        }
        let Some((alg, cert)) = found else {
            return Ok(None);
        };
        // The EK the TPM has must be the one the certificate names (a non-default template or
        // an EK nonce in NV would make the server's credential undecryptable).
        inner.flush_device_key();
        let (ek, transient) = ek_handle(&mut inner, alg)?;
        let read = inner
            .ctx
            .read_public(ek)
            .map_err(tss("read EK public area"));
        if transient {
            inner.flush(ek);
        }
        let (ek_public, _, _) = read?;
        if tpm_key(&ek_public) != cert_key(&cert)? {
            return Err(KeystoreError::Config(format!(
                "the TPM's {alg} endorsement key is not the key of its EK certificate (an EK \
                 template or nonce in NV?); attest with another EK (--ek-alg) or enrol with \
                 --no-attest"
            )));
        }
        let ak = self.ak_file(&mut inner)?;
        let (ak_public, _) = take_tpm2b(&ak.public)?;
        Ok(Some(AttestIdentity {
            ek_alg: alg.to_owned(),
            ek_cert: cert,
            ek_chain: Vec::new(),
            ak_public: ak_public.to_vec(),
        }))
    }

    fn activate_credential(
        &self,
        ek_alg: &str,
        credential_blob: &[u8],
        encrypted_secret: &[u8],
    ) -> Result<SecretBytes, KeystoreError> {
        let (_, low_range) = kind(ek_alg)?;
        let blob = IdObject::try_from(credential_blob.to_vec()).map_err(tss("credential blob"))?;
        let secret = EncryptedSecret::try_from(encrypted_secret.to_vec())
            .map_err(tss("encrypted secret"))?;
        let mut inner = self.lock()?;
        let file = self.ak_file(&mut inner)?;
        inner.flush_device_key();
        let ak = self.load_ak(&mut inner, &file)?;
        let result = (|| {
            let (ek, transient) = ek_handle(&mut inner, ek_alg)?;
            // The EK's authorisation: PolicySecret(endorsement) for low-range EKs (their
            // userWithAuth is clear), the empty password for high-range ones. No secret flows
            // in this session; the salted session of the AK encrypts the response.
            let mut policy = None;
            let ek_auth = if low_range {
                let s = inner
                    .ctx
                    .start_auth_session(
                        None,
                        None,
                        None,
                        SessionType::Policy,
                        SymmetricDefinition::AES_128_CFB,
                        HashingAlgorithm::Sha256,
                    )
                    .map_err(tss("start EK policy session"))?
                    .ok_or_else(|| backend_err("start EK policy session", "no session"))?;
                policy = Some(s);
                let ps = PolicySession::try_from(s).map_err(tss("EK policy session"))?;
                inner
                    .ctx
                    .execute_with_nullauth_session(|ctx| {
                        ctx.policy_secret(
                            ps,
                            AuthHandle::Endorsement,
                            Default::default(),
                            Default::default(),
                            Default::default(),
                            None,
                        )
                    })
                    .map_err(tss("PolicySecret(endorsement)"))?;
                s
            } else {
                AuthSession::Password
            };
            let session = inner.session;
            let out = inner
                .ctx
                .execute_with_sessions((Some(session), Some(ek_auth), None), |ctx| {
                    ctx.activate_credential(ak, ek, blob, secret)
                });
            if let Some(s) = policy {
                let _ = inner
                    .ctx
                    .flush_context(ObjectHandle::from(SessionHandle::from(s)));
            }
            if transient {
                inner.flush(ek);
            }
            let digest = out.map_err(|e| match e {
                tss_esapi::Error::Tss2Error(_) => KeystoreError::Backend {
                    backend: "TPM",
                    operation: "activate credential",
                    detail: format!(
                        "{e}; the credential was not made for this TPM's endorsement key and \
                         attestation key"
                    ),
                },
                e => backend_err("activate credential", e),
            })?;
            Ok(SecretBytes::from_slice(digest.value()))
        })();
        inner.flush(ak);
        result
    }

    fn certify_key(&self, qualifying_data: &[u8]) -> Result<KeyCertification, KeystoreError> {
        let data = Data::try_from(qualifying_data.to_vec()).map_err(tss("qualifying data"))?;
        let mut inner = self.lock()?;
        // the AK first: making it flushes the device key
        self.ak_file(&mut inner)?;
        let key = inner.device_key()?;
        let key_public = inner.key_file.public.clone();
        self.certify_loaded(&mut inner, key, &key_public, data, "certify the device key")
    }
}
