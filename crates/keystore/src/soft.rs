//! The software backend: a P-256 key in a 0600 PKCS#8 file under the state dir.
//!
//! Its promise is weaker and stated, not hidden ([`Protection::Software`]): the key and the
//! vault's data key are files on the same flash as the bundle they protect, so a flash dump
//! (T2) or a copy of the state dir (T3) yields them. What it does do: the key is read into
//! locked, zeroized memory only for the duration of one operation (T7 mitigated, not
//! prevented), and nothing is baked into the image (T1).

use std::path::{Path, PathBuf};

use p256::ecdsa::signature::hazmat::PrehashSigner;
use p256::ecdsa::SigningKey;
use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey, LineEnding};
use p256::SecretKey;
use rand_core::OsRng;

use crate::fsutil::write_atomic_private;
use crate::{BackendKind, Keystore, KeystoreError, Protection, PublicKey, SecretBytes, Signature};

/// File name of the private key inside the state dir.
pub const KEY_FILE: &str = "soft-device-key.pem";

const SEAL_MAGIC: &[u8; 8] = b"DEVIDSS1";

/// A key held in a file. See the module docs for what it protects.
#[derive(Debug)]
pub struct SoftKeystore {
    path: PathBuf,
    public: PublicKey,
}

impl SoftKeystore {
    /// Create a new key in `state_dir` (refusing to overwrite an existing one).
    pub fn create(state_dir: &Path) -> Result<Self, KeystoreError> {
        let path = state_dir.join(KEY_FILE);
        if path.exists() {
            return Err(KeystoreError::Config(format!(
                "{} already exists; refusing to overwrite a device key",
                path.display()
            )));
        }
        let secret = SecretKey::random(&mut OsRng);
        let pem = secret
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|e| KeystoreError::Backend {
                backend: "soft",
                operation: "encode key",
                detail: e.to_string(),
            })?;
        write_atomic_private(&path, pem.as_bytes()).map_err(|e| KeystoreError::io(&path, e))?;
        Ok(Self {
            public: secret.public_key(),
            path,
        })
    }

    /// Open the key in `state_dir`.
    pub fn open(state_dir: &Path) -> Result<Self, KeystoreError> {
        let path = state_dir.join(KEY_FILE);
        let key = load(&path)?;
        Ok(Self {
            public: key.public_key(),
            path,
        })
    }
}

fn load(path: &Path) -> Result<SecretKey, KeystoreError> {
    let bytes = SecretBytes::from_vec(std::fs::read(path).map_err(|e| KeystoreError::io(path, e))?);
    let text = std::str::from_utf8(bytes.expose()).map_err(|_| KeystoreError::InvalidBlob {
        what: "soft key file",
        detail: "not UTF-8 PEM".into(),
    })?;
    SecretKey::from_pkcs8_pem(text).map_err(|e| KeystoreError::InvalidBlob {
        what: "soft key file",
        detail: e.to_string(),
    })
}

impl Keystore for SoftKeystore {
    fn kind(&self) -> BackendKind {
        BackendKind::Soft
    }

    fn protection(&self) -> Protection {
        Protection::Software
    }

    fn key_ref(&self) -> String {
        format!("file:{}", self.path.display())
    }

    fn public_key(&self) -> PublicKey {
        self.public
    }

    fn sign_digest(&self, digest: &[u8; 32]) -> Result<Signature, KeystoreError> {
        let key = load(&self.path)?;
        if key.public_key() != self.public {
            return Err(KeystoreError::InvalidBlob {
                what: "soft key file",
                detail: "the key changed on disk since it was opened".into(),
            });
        }
        SigningKey::from(&key)
            .sign_prehash(digest)
            .map_err(|e| KeystoreError::Backend {
                backend: "soft",
                operation: "sign",
                detail: e.to_string(),
            })
    }

    /// The soft backend has no sealing key distinct from the state dir: the "sealed" blob is
    /// the secret behind a format marker. Stated in [`Protection::Software`].
    fn seal(&self, secret: &[u8]) -> Result<Vec<u8>, KeystoreError> {
        let mut out = Vec::with_capacity(SEAL_MAGIC.len() + secret.len());
        out.extend_from_slice(SEAL_MAGIC);
        out.extend_from_slice(secret);
        Ok(out)
    }

    fn unseal(&self, blob: &[u8]) -> Result<SecretBytes, KeystoreError> {
        match blob.strip_prefix(SEAL_MAGIC.as_slice()) {
            Some(secret) => Ok(SecretBytes::from_slice(secret)),
            None => Err(KeystoreError::InvalidBlob {
                what: "sealed data key",
                detail: "not sealed by the soft backend".into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify;

    #[test]
    fn create_sign_verify_seal_unseal() {
        let d = tempfile::tempdir().expect("tempdir");
        let ks = SoftKeystore::create(d.path()).expect("create");
        assert!(
            SoftKeystore::create(d.path()).is_err(),
            "must not overwrite"
        );
        let ks2 = SoftKeystore::open(d.path()).expect("open");
        assert_eq!(ks.public_key(), ks2.public_key());
        let sig = ks2.sign(b"hello").expect("sign");
        assert!(verify(&ks.public_key(), b"hello", &sig));
        assert!(!verify(&ks.public_key(), b"hellO", &sig));
        let blob = ks.seal(b"data-key").expect("seal");
        assert_eq!(ks2.unseal(&blob).expect("unseal").expose(), b"data-key");
        assert!(ks.unseal(b"garbage").is_err());
    }
}
