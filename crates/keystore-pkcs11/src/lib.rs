//! The PKCS#11 backend of the devid keystore: the device key and the vault's wrap key live on
//! a PKCS#11 token (a secure element, an HSM, or SoftHSMv2 in tests).
//!
//! At [`Pkcs11Keystore::create`] the token generates
//! * an EC P-256 key pair (`devid-device-key`): the private half is a token object with
//!   `CKA_SENSITIVE=true`, `CKA_EXTRACTABLE=false`, `CKA_PRIVATE=true`, `CKA_SIGN=true`;
//! * an AES-256 key (`devid-wrap-key`), equally sensitive, non-extractable and private, usable
//!   only to encrypt and decrypt: it seals the vault's data key with AES-GCM
//!   ([`blob`] describes the format).
//!
//! The three objects share a random `CKA_ID`. [`Pkcs11Config`] records the module, the token
//! label, the token serial (pinned: a different token with the same label is refused,
//! THREATS.md T3/T6), the PIN file and that id. The PIN is read from its file into zeroizing
//! memory for each login and never logged.
//!
//! This is the only crate of devid that links `cryptoki`. Every call blocks; the session is
//! behind a `Mutex`, so a keystore can be shared across threads.
#![forbid(unsafe_code)]

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use der::asn1::{ObjectIdentifier, OctetStringRef};
use der::{Decode, Encode};
use devid_keystore::{
    signature_from_scalars, BackendKind, Keystore, KeystoreError, Protection, PublicKey,
    SecretBytes, Signature,
};
use zeroize::Zeroizing;

pub mod blob;
mod module;

use module::ModuleLease;

/// Label of the EC key pair objects.
pub const DEVICE_KEY_LABEL: &str = "devid-device-key";
/// Label of the AES wrap key object.
pub const WRAP_KEY_LABEL: &str = "devid-wrap-key";

const WHAT: &str = "PKCS#11 token";
const BACKEND: &str = "pkcs11";
/// OID of the P-256 curve (prime256v1), the `CKA_EC_PARAMS` of the device key.
const P256_OID: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
/// Bytes of the random `CKA_ID`.
const KEY_ID_LEN: u32 = 16;

/// Where the device key lives: what `devid init` records and [`Pkcs11Keystore::open`] needs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Pkcs11Config {
    /// The PKCS#11 module, e.g. `/usr/lib/softhsm/libsofthsm2.so`.
    pub module: PathBuf,
    /// The token's label (`CKA_LABEL` of the token, as `pkcs11-tool -L` shows it).
    pub token_label: String,
    /// A file holding the user PIN (a trailing newline is ignored).
    pub pin_file: PathBuf,
    /// The token's serial number at init: a token with another serial is refused.
    pub token_serial: String,
    /// Hex `CKA_ID` shared by the EC key pair and the AES wrap key.
    pub key_id: String,
}

/// A device key and wrap key on a PKCS#11 token. See the crate docs.
pub struct Pkcs11Keystore {
    // Field order matters: the session must close before the module lease may finalise.
    session: Mutex<Session>,
    objects: Objects,
    public: PublicKey,
    config: Pkcs11Config,
    key_ref: String,
    token_model: String,
    _module: ModuleLease,
}

/// A token found by label.
#[derive(Clone)]
struct Found {
    slot: Slot,
    serial: String,
    /// "manufacturer model", as the token reports them.
    model: String,
}

#[derive(Clone, Copy)]
struct Objects {
    private: ObjectHandle,
    wrap: ObjectHandle,
}

impl fmt::Debug for Pkcs11Keystore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Keystore")
            .field("module", &self.config.module)
            .field("token_label", &self.config.token_label)
            .field("token_serial", &self.config.token_serial)
            .field("key_id", &self.config.key_id)
            .field("token_model", &self.token_model)
            .finish_non_exhaustive()
    }
}

impl Pkcs11Keystore {
    /// Generate a new device key pair and wrap key on the token labelled `token_label`, logging
    /// in with the PIN in `pin_file`. Returns the keystore and the configuration to store.
    pub fn create(
        module: &Path,
        token_label: &str,
        pin_file: &Path,
    ) -> Result<(Self, Pkcs11Config), KeystoreError> {
        let lease = acquire(module, token_label)?;
        let slots = slots_labelled(&lease, module, token_label)?;
        let found = match slots.as_slice() {
            [] => return Err(no_token(module, token_label)),
            [one] => one.clone(),
            many => {
                return Err(KeystoreError::Config(format!(
                    "{} tokens are labelled {token_label:?} in {} (serials {}); relabel or \
                     remove the extra ones so the device key has one unambiguous home",
                    many.len(),
                    module.display(),
                    many.iter()
                        .map(|f| f.serial.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )))
            }
        };
        let session = lease
            .ctx()
            .open_rw_session(found.slot)
            .map_err(backend("open session"))?;
        login(&session, pin_file)?;

        let id = session
            .generate_random_vec(KEY_ID_LEN)
            .map_err(backend("generate key id"))?;
        let ec_params = P256_OID.to_der().map_err(|e| KeystoreError::Backend {
            backend: BACKEND,
            operation: "encode curve",
            detail: e.to_string(),
        })?;
        let device_label = DEVICE_KEY_LABEL.as_bytes().to_vec();
        let public_template = [
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::Verify(true),
            Attribute::EcParams(ec_params),
            Attribute::Label(device_label.clone()),
            Attribute::Id(id.clone()),
        ];
        let private_template = [
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
            Attribute::Derive(false),
            Attribute::Label(device_label),
            Attribute::Id(id.clone()),
        ];
        let (public_h, private_h) = session
            .generate_key_pair(
                &Mechanism::EccKeyPairGen,
                &public_template,
                &private_template,
            )
            .map_err(backend("generate device key"))?;
        let wrap_template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(32.into()),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Wrap(false),
            Attribute::Unwrap(false),
            Attribute::Sign(false),
            Attribute::Verify(false),
            Attribute::Derive(false),
            Attribute::Label(WRAP_KEY_LABEL.as_bytes().to_vec()),
            Attribute::Id(id.clone()),
        ];
        let created = session
            .generate_key(&Mechanism::AesKeyGen, &wrap_template)
            .map_err(backend("generate wrap key"))
            .and_then(|wrap_h| {
                let public = read_public_key(&session, public_h)?;
                Ok((wrap_h, public))
            });
        let (wrap_h, public) = match created {
            Ok(v) => v,
            Err(e) => {
                // Leave no half-made identity behind.
                for h in [public_h, private_h] {
                    let _ = session.destroy_object(h);
                }
                return Err(e);
            }
        };
        let config = Pkcs11Config {
            module: module.to_path_buf(),
            token_label: token_label.to_string(),
            pin_file: pin_file.to_path_buf(),
            token_serial: found.serial,
            key_id: hex::encode(&id),
        };
        tracing::info!(
            token = %config.token_label,
            serial = %config.token_serial,
            key_id = %config.key_id,
            "created device key and wrap key on the PKCS#11 token"
        );
        let keystore = Self::assemble(
            session,
            Objects {
                private: private_h,
                wrap: wrap_h,
            },
            public,
            config.clone(),
            found.model,
            lease,
        );
        Ok((keystore, config))
    }

    /// Open the keys recorded in `config`: find the token by label and serial, log in, find
    /// the key objects by `CKA_ID`.
    pub fn open(config: &Pkcs11Config) -> Result<Self, KeystoreError> {
        let id = hex::decode(&config.key_id).map_err(|e| {
            KeystoreError::Config(format!("key_id {:?} is not hex: {e}", config.key_id))
        })?;
        let lease = acquire(&config.module, &config.token_label)?;
        let slots = slots_labelled(&lease, &config.module, &config.token_label)?;
        if slots.is_empty() {
            return Err(no_token(&config.module, &config.token_label));
        }
        let Some(token) = slots.iter().find(|f| f.serial == config.token_serial) else {
            let found = slots
                .iter()
                .map(|f| f.serial.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            return Err(KeystoreError::OtherDevice {
                what: WHAT,
                detail: format!(
                    "token serial {found}, vault expects {}",
                    config.token_serial
                ),
            });
        };
        // Serial checked before the PIN goes anywhere.
        let session = lease
            .ctx()
            .open_rw_session(token.slot)
            .map_err(backend("open session"))?;
        login(&session, &config.pin_file)?;

        let find = |class: ObjectClass| -> Result<ObjectHandle, KeystoreError> {
            let found = session
                .find_objects(&[Attribute::Class(class), Attribute::Id(id.clone())])
                .map_err(backend("find key objects"))?;
            match found.as_slice() {
                [one] => Ok(*one),
                [] => Err(KeystoreError::OtherDevice {
                    what: WHAT,
                    detail: format!(
                        "token {:?} (serial {}) holds no {class} with CKA_ID {}: the keys were \
                         deleted or the token was re-initialised",
                        config.token_label, config.token_serial, config.key_id
                    ),
                }),
                many => Err(KeystoreError::InvalidBlob {
                    what: "PKCS#11 key objects",
                    detail: format!(
                        "{} objects of class {class} share CKA_ID {}; remove the extra ones",
                        many.len(),
                        config.key_id
                    ),
                }),
            }
        };
        let public_h = find(ObjectClass::PUBLIC_KEY)?;
        let objects = Objects {
            private: find(ObjectClass::PRIVATE_KEY)?,
            wrap: find(ObjectClass::SECRET_KEY)?,
        };
        let public = read_public_key(&session, public_h)?;
        tracing::debug!(
            token = %config.token_label,
            serial = %config.token_serial,
            key_id = %config.key_id,
            "opened PKCS#11 keystore"
        );
        Ok(Self::assemble(
            session,
            objects,
            public,
            config.clone(),
            token.model.clone(),
            lease,
        ))
    }

    /// The configuration this keystore was opened or created with.
    pub fn config(&self) -> &Pkcs11Config {
        &self.config
    }

    /// True when the token is SoftHSM, a software token: its keys are files encrypted under
    /// the user PIN, so it is only as strong as the PIN file's secrecy. For tests and
    /// development; `devid status` can warn about it.
    pub fn is_software_token(&self) -> bool {
        self.token_model.starts_with("SoftHSM")
    }

    fn assemble(
        session: Session,
        objects: Objects,
        public: PublicKey,
        config: Pkcs11Config,
        token_model: String,
        lease: ModuleLease,
    ) -> Self {
        let key_ref = key_uri(&config.token_label, &config.key_id);
        Self {
            session: Mutex::new(session),
            objects,
            public,
            config,
            key_ref,
            token_model,
            _module: lease,
        }
    }

    fn session(&self) -> MutexGuard<'_, Session> {
        // A panic while holding the lock cannot leave the session half-updated: every use is
        // one PKCS#11 operation that either completed or failed.
        self.session
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Keystore for Pkcs11Keystore {
    fn kind(&self) -> BackendKind {
        BackendKind::Pkcs11
    }

    fn protection(&self) -> Protection {
        if self.is_software_token() {
            Protection::SoftwareToken
        } else {
            Protection::Hardware
        }
    }

    fn key_ref(&self) -> String {
        self.key_ref.clone()
    }

    fn public_key(&self) -> PublicKey {
        self.public
    }

    fn sign_digest(&self, digest: &[u8; 32]) -> Result<Signature, KeystoreError> {
        let raw = self
            .session()
            .sign(&Mechanism::Ecdsa, self.objects.private, digest)
            .map_err(backend("sign"))?;
        if raw.is_empty() || raw.len() % 2 != 0 {
            return Err(KeystoreError::InvalidBlob {
                what: "signature",
                detail: format!("token returned {} bytes, expected r || s", raw.len()),
            });
        }
        let (r, s) = raw.split_at(raw.len() / 2);
        signature_from_scalars(r, s)
    }

    fn seal(&self, secret: &[u8]) -> Result<Vec<u8>, KeystoreError> {
        let session = self.session();
        let mut iv = [0u8; blob::IV_LEN];
        session
            .generate_random_slice(&mut iv)
            .map_err(backend("seal: generate iv"))?;
        let mechanism = Mechanism::AesGcm(
            GcmParams::new(&mut iv, blob::AAD, blob::TAG_BITS.into()).map_err(backend("seal"))?,
        );
        let sealed = session
            .encrypt(&mechanism, self.objects.wrap, secret)
            .map_err(backend("seal"))?;
        // Read the IV back only now: a token that generates its own IV writes it there.
        drop(mechanism);
        drop(session);
        if sealed.len() != secret.len() + blob::TAG_LEN {
            return Err(KeystoreError::Backend {
                backend: BACKEND,
                operation: "seal",
                detail: format!(
                    "token returned {} bytes of AES-GCM output for {} bytes of input",
                    sealed.len(),
                    secret.len()
                ),
            });
        }
        Ok(blob::encode(&iv, &sealed))
    }

    fn unseal(&self, data: &[u8]) -> Result<SecretBytes, KeystoreError> {
        let parsed = blob::decode(data)?;
        let mut iv = parsed.iv;
        let params =
            GcmParams::new(&mut iv, blob::AAD, blob::TAG_BITS.into()).map_err(backend("unseal"))?;
        let plain = self
            .session()
            .decrypt(&Mechanism::AesGcm(params), self.objects.wrap, parsed.sealed)
            .map_err(|e| match e {
                CkError::Pkcs11(
                    RvError::EncryptedDataInvalid
                    | RvError::EncryptedDataLenRange
                    | RvError::GeneralError
                    | RvError::DataInvalid
                    | RvError::DataLenRange,
                    _,
                ) => KeystoreError::InvalidBlob {
                    what: "sealed data key",
                    detail: "it does not decrypt with this token's wrap key: the blob was \
                             modified, or it was sealed on another token"
                        .into(),
                },
                other => backend("unseal")(other),
            })?;
        Ok(SecretBytes::from_vec(plain))
    }
}

/// The RFC 7512 URI of the private key: `pkcs11:token=<label>;id=%xx..;type=private`.
fn key_uri(label: &str, key_id_hex: &str) -> String {
    let id = hex::decode(key_id_hex).unwrap_or_default();
    let mut uri = String::from("pkcs11:token=");
    for b in label.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            uri.push(char::from(b));
        } else {
            uri.push_str(&format!("%{b:02x}"));
        }
    }
    uri.push_str(";id=");
    for b in id {
        uri.push_str(&format!("%{b:02x}"));
    }
    uri.push_str(";type=private");
    uri
}

fn backend(operation: &'static str) -> impl Fn(CkError) -> KeystoreError {
    move |e| KeystoreError::Backend {
        backend: BACKEND,
        operation,
        detail: e.to_string(),
    }
}

fn no_token(module: &Path, label: &str) -> KeystoreError {
    KeystoreError::NoDevice {
        what: WHAT,
        location: format!("{} token {label}", module.display()),
        detail: "no initialised token has this label; check the label (pkcs11-tool -L) and \
                 that the token is plugged in"
            .into(),
    }
}

fn acquire(module: &Path, label: &str) -> Result<ModuleLease, KeystoreError> {
    ModuleLease::acquire(module).map_err(|e| KeystoreError::NoDevice {
        what: WHAT,
        location: format!("{} token {label}", module.display()),
        detail: format!("could not load and initialise the PKCS#11 module: {e}"),
    })
}

/// Every slot whose initialised token carries `label`, with the token's serial number.
fn slots_labelled(
    lease: &ModuleLease,
    module: &Path,
    label: &str,
) -> Result<Vec<Found>, KeystoreError> {
    let ctx = lease.ctx();
    let slots = ctx
        .get_slots_with_initialized_token()
        .map_err(|e| KeystoreError::NoDevice {
            what: WHAT,
            location: format!("{} token {label}", module.display()),
            detail: format!("could not list the module's slots: {e}"),
        })?;
    let mut out = Vec::new();
    for slot in slots {
        match ctx.get_token_info(slot) {
            Ok(info) if info.label().trim_end() == label => {
                out.push(Found {
                    slot,
                    serial: info.serial_number().trim().to_string(),
                    model: format!("{} {}", info.manufacturer_id().trim(), info.model().trim()),
                });
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "skipping a slot whose token info is unreadable"),
        }
    }
    Ok(out)
}

/// Read the user PIN from `pin_file` into zeroizing memory and log in.
fn login(session: &Session, pin_file: &Path) -> Result<(), KeystoreError> {
    let pin = read_pin(pin_file)?;
    match session.login(UserType::User, Some(&pin)) {
        // Login state is per process and token: another keystore of this process on the same
        // token already logged in (the token did not check this PIN again).
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
        Err(CkError::Pkcs11(RvError::PinIncorrect, _)) => Err(KeystoreError::Backend {
            backend: BACKEND,
            operation: "login",
            detail: format!(
                "the token refused the PIN in {}; fix the file (tokens lock after a few wrong \
                 PINs)",
                pin_file.display()
            ),
        }),
        Err(CkError::Pkcs11(RvError::PinLocked, _)) => Err(KeystoreError::Backend {
            backend: BACKEND,
            operation: "login",
            detail: "the token's user PIN is locked; unlock it with the SO PIN".into(),
        }),
        Err(e) => Err(backend("login")(e)),
    }
}

fn read_pin(pin_file: &Path) -> Result<AuthPin, KeystoreError> {
    use std::os::unix::fs::PermissionsExt;
    let bytes =
        Zeroizing::new(std::fs::read(pin_file).map_err(|e| KeystoreError::io(pin_file, e))?);
    if let Ok(meta) = std::fs::metadata(pin_file) {
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                pin_file = %pin_file.display(),
                "the PIN file is readable by group or others; chmod 600 it"
            );
        }
    }
    let text = std::str::from_utf8(&bytes).map_err(|_| {
        KeystoreError::Config(format!("PIN file {} is not UTF-8 text", pin_file.display()))
    })?;
    let pin = text.trim_end_matches(['\n', '\r']);
    if pin.is_empty() {
        return Err(KeystoreError::Config(format!(
            "PIN file {} is empty",
            pin_file.display()
        )));
    }
    Ok(AuthPin::from(pin))
}

/// The public key from the public key object's `CKA_EC_POINT`: a DER OCTET STRING around the
/// SEC1 point (some tokens return the bare point, which is accepted too).
fn read_public_key(session: &Session, public: ObjectHandle) -> Result<PublicKey, KeystoreError> {
    let attrs = session
        .get_attributes(public, &[AttributeType::EcPoint])
        .map_err(backend("read public key"))?;
    let point = attrs
        .into_iter()
        .find_map(|a| match a {
            Attribute::EcPoint(p) => Some(p),
            _ => None,
        })
        .ok_or_else(|| KeystoreError::InvalidBlob {
            what: "PKCS#11 public key",
            detail: "the public key object has no CKA_EC_POINT".into(),
        })?;
    parse_ec_point(&point)
}

fn parse_ec_point(point: &[u8]) -> Result<PublicKey, KeystoreError> {
    let sec1 = match OctetStringRef::from_der(point) {
        Ok(octets) => octets.as_bytes(),
        // PKCS#11 2.x tokens that predate the clarification return the raw point.
        Err(_) if point.first() == Some(&0x04) && point.len() == 65 => point,
        Err(e) => {
            return Err(KeystoreError::InvalidBlob {
                what: "PKCS#11 public key",
                detail: format!("CKA_EC_POINT is not a DER OCTET STRING: {e}"),
            })
        }
    };
    PublicKey::from_sec1_bytes(sec1).map_err(|e| KeystoreError::InvalidBlob {
        what: "PKCS#11 public key",
        detail: format!("CKA_EC_POINT is not a P-256 point: {e}"),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn key_uri_percent_encodes() {
        assert_eq!(
            key_uri("dev id;1", "00ff10"),
            "pkcs11:token=dev%20id%3b1;id=%00%ff%10;type=private"
        );
    }

    #[test]
    fn ec_point_der_and_raw() {
        let key = p256::SecretKey::from_slice(&[7u8; 32])
            .unwrap()
            .public_key();
        let sec1 = p256::EncodedPoint::from(key);
        let der = OctetStringRef::new(sec1.as_bytes())
            .unwrap()
            .to_der()
            .unwrap();
        assert_eq!(parse_ec_point(&der).unwrap(), key);
        assert_eq!(parse_ec_point(sec1.as_bytes()).unwrap(), key);
        assert!(parse_ec_point(&der[..der.len() - 1]).is_err());
        assert!(parse_ec_point(&[0x04, 1, 2]).is_err());
    }
}
