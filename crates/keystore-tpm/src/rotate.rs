//! Device key rotation in the TPM (docs/attestation.md, "rotation"), in a crash-safe order:
//!
//! 1. [`KeyRotation::create_next_key`] makes a new key under the SRK with the device key's
//!    template and PCR policy, and writes its blobs to `tpm-device-key.next.pem` (atomic).
//!    A pending next key is reused: a renewal interrupted after this point retries with it.
//! 2. The caller signs the renewal CSR with it and has the AK certify it; the current key
//!    keeps signing the TLS handshake with the current certificate.
//! 3. Once the new certificate is sealed, [`KeyRotation::commit_next_key`] renames the next
//!    key file over the device key file (the old blob is gone) and switches the keystore.
//!
//! A crash between the sealing and the rename leaves both files; the caller compares the
//! sealed certificate's key with both and commits or discards (`devid_agent::renew`).

use std::path::{Path, PathBuf};

use devid_keystore::{KeyCertification, KeyRotation, KeystoreError, PublicKey, Signature};
use tss_esapi::handles::KeyHandle;
use tss_esapi::structures::{Data, Private, Public};
use tss_esapi::traits::UnMarshall;

use crate::keyfile::{take_tpm2b, TpmKeyFile};
use crate::{device_key_template, ecc_public_key, load_error, tss, Inner, TpmKeystore};

/// A key made for a rotation, not yet the device key.
pub(crate) struct NextKey {
    file: TpmKeyFile,
    public: PublicKey,
}

fn next_path(key_path: &Path) -> PathBuf {
    let mut p = key_path.as_os_str().to_owned();
    p.push(".next");
    PathBuf::from(p)
}

fn public_of(file: &TpmKeyFile) -> Result<PublicKey, KeystoreError> {
    let (pub_body, _) = take_tpm2b(&file.public)?;
    let public = Public::unmarshall(pub_body).map_err(tss("parse key public area"))?;
    ecc_public_key(&public)
}

/// The pending next key of the device key at `key_path`, if a rotation left one.
pub(crate) fn read_next(key_path: &Path) -> Result<Option<NextKey>, KeystoreError> {
    let path = next_path(key_path);
    match std::fs::read_to_string(&path) {
        Ok(pem) => {
            let file = TpmKeyFile::from_pem(&pem)?;
            let public = public_of(&file)?;
            Ok(Some(NextKey { file, public }))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(KeystoreError::io(&path, e)),
    }
}

impl TpmKeystore {
    fn load_next(&self, inner: &mut Inner) -> Result<KeyHandle, KeystoreError> {
        let file = match &inner.next {
            Some(n) => &n.file,
            None => {
                return Err(KeystoreError::Config(
                    "no next key: create_next_key first".into(),
                ))
            }
        };
        let (pub_body, _) = take_tpm2b(&file.public)?;
        let (priv_body, _) = take_tpm2b(&file.private)?;
        let public = Public::unmarshall(pub_body).map_err(tss("parse key public area"))?;
        let private =
            Private::try_from(priv_body.to_vec()).map_err(tss("parse key private blob"))?;
        // three object slots: SRK, this key, and the AK when certifying
        inner.flush_device_key();
        let srk = inner.srk;
        let session = inner.session;
        inner
            .ctx
            .execute_with_session(Some(session), |ctx| ctx.load(srk, private, public))
            .map_err(|e| load_error("load next device key", e))
    }
}

impl KeyRotation for TpmKeystore {
    fn create_next_key(&self) -> Result<PublicKey, KeystoreError> {
        let mut inner = self.lock()?;
        if let Some(n) = &inner.next {
            return Ok(n.public);
        }
        let pcrs = self.config.key_pcrs.clone();
        let policy = if pcrs.is_empty() {
            None
        } else {
            Some(Self::policy_digest(&mut inner.ctx, &pcrs)?)
        };
        let path = next_path(&self.key_path);
        let (file, created) = self.create_key_file(
            &mut inner,
            device_key_template(policy)?,
            &path,
            "create next device key",
        )?;
        let public = ecc_public_key(&created)?;
        inner.next = Some(NextKey { file, public });
        tracing::info!("created the next device key in the TPM (rotation pending)");
        Ok(public)
    }

    fn next_key(&self) -> Option<PublicKey> {
        self.lock().ok()?.next.as_ref().map(|n| n.public)
    }

    fn sign_digest_next(&self, digest: &[u8; 32]) -> Result<Signature, KeystoreError> {
        let mut inner = self.lock()?;
        let key = self.load_next(&mut inner)?;
        let r = self.sign_with(&mut inner, key, digest);
        inner.flush(key);
        r
    }

    fn certify_next_key(&self, qualifying_data: &[u8]) -> Result<KeyCertification, KeystoreError> {
        let data = Data::try_from(qualifying_data.to_vec()).map_err(tss("qualifying data"))?;
        let mut inner = self.lock()?;
        // the AK first (making it flushes the device key; the next key is loaded after)
        self.ak_file(&mut inner)?;
        let key = self.load_next(&mut inner)?;
        let key_public = match &inner.next {
            Some(n) => n.file.public.clone(),
            None => return Err(KeystoreError::Config("the next key vanished".into())),
        };
        let r = self.certify_loaded(
            &mut inner,
            key,
            &key_public,
            data,
            "certify the next device key",
        );
        inner.flush(key);
        r
    }

    fn commit_next_key(&self) -> Result<(), KeystoreError> {
        let mut inner = self.lock()?;
        let Some(next) = inner.next.take() else {
            return Ok(());
        };
        let from = next_path(&self.key_path);
        std::fs::rename(&from, &self.key_path).map_err(|e| KeystoreError::io(&from, e))?;
        if let Some(dir) = self.key_path.parent() {
            // the rename is durable before the old key is forgotten
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| KeystoreError::io(dir, e))?;
        }
        inner.flush_device_key();
        inner.key_file = next.file;
        *self.public.write().unwrap_or_else(|p| p.into_inner()) = next.public;
        tracing::info!("device key rotated: the next key is the device key, the old blob is gone");
        Ok(())
    }

    fn discard_next_key(&self) -> Result<(), KeystoreError> {
        let mut inner = self.lock()?;
        inner.next = None;
        let path = next_path(&self.key_path);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(KeystoreError::io(&path, e)),
        }
    }
}
