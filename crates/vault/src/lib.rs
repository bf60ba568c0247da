//! The devid vault: the device's credential bundle, one AEAD-encrypted file whose data key is
//! sealed by the keystore backend.
//!
//! The bundle holds the server endpoints, the server CA certificate or its SHA-256 pin, the
//! device id, the device certificate chain and the operator's named secrets ([`Contents`]).
//! Two files in the state dir make a vault:
//!
//! * [`DATA_KEY_FILE`] (`datakey.sealed`): a random 32-byte data key, sealed by
//!   [`Keystore::seal`]. With the TPM backend the blob is useless off the TPM that made it;
//!   with the PKCS#11 backend it is wrapped by a non-extractable token key; with the soft
//!   backend it is **not protected** (the data key sits on the same flash as the bundle,
//!   THREATS.md T2/T3, see [`devid_keystore::Protection::Software`]).
//! * [`BUNDLE_FILE`] (`bundle.sealed`): the contents, encrypted and authenticated with
//!   AES-256-GCM under the data key.
//!
//! # Bundle file format, version 1
//!
//! All integers are big-endian.
//!
//! | offset | size | field |
//! |-------:|-----:|-------|
//! | 0  | 8  | magic `b"DEVIDVB1"` ([`MAGIC`]) |
//! | 8  | 2  | format version, `1` ([`FORMAT_VERSION`]) |
//! | 10 | 1  | AEAD id, `1` = AES-256-GCM ([`AEAD_AES_256_GCM`]) |
//! | 11 | 32 | key binding: SHA-256 of the `datakey.sealed` blob this bundle belongs to |
//! | 43 | 12 | nonce, fresh from the OS RNG on every write |
//! | 55 | n+16 | ciphertext of the plaintext, then the 16-byte GCM tag |
//!
//! # Bundle file format, version 2 (bound to the state file)
//!
//! Version 2 adds one field after the key binding: the **state binding**, a SHA-256 over the
//! trust-relevant fields of the device's `state.toml` (backend, pinned SRK Name or token
//! serial, PCR list...; the `devid` crate computes it). The header is then 87 bytes
//! ([`HEADER_LEN_V2`]) and, as in version 1, all of it is the associated data:
//!
//! | offset | size | field |
//! |-------:|-----:|-------|
//! | 0  | 8  | magic `b"DEVIDVB1"` |
//! | 8  | 2  | format version, `2` ([`FORMAT_VERSION_BOUND`]) |
//! | 10 | 1  | AEAD id |
//! | 11 | 32 | key binding |
//! | 43 | 32 | state binding |
//! | 75 | 12 | nonce |
//! | 87 | n+16 | ciphertext, then the tag |
//!
//! A [`Vault`] opened with a state binding ([`Vault::open_bound`]) refuses a version-2 bundle
//! whose state binding differs ([`VaultError::StateChanged`]) and writes version 2. A
//! version-1 bundle (written before state binding existed) still opens, and the next
//! [`Vault::store`] upgrades it in place. The stored binding can be read without any key
//! ([`bundle_state_binding`]), so a changed `state.toml` is refused before a keystore is
//! even opened; an attacker who rewrites the binding too is refused by the tag.
//!
//! The associated data is the whole 55-byte header ([`HEADER_LEN`]): magic, version, AEAD id,
//! key binding and nonce are all authenticated, so any changed bit anywhere in the file is
//! refused ([`VaultError::Tampered`], or [`VaultError::Format`] when the header is not even
//! one this version can read) and nothing from the file is used.
//!
//! The key binding ties the bundle to its sealed data key: [`Vault::load`] refuses a bundle
//! whose binding is not the SHA-256 of the `datakey.sealed` it unsealed, so files of two
//! devices (or of two `init`s) cannot be mixed even when both seal the same data key (e.g. an
//! old blob sealed without a PCR policy put back next to a newer bundle). [`seal_bundle`] and
//! [`open_bundle`] are the pure format functions: `seal_bundle` writes an all-zero binding,
//! `open_bundle` authenticates whatever binding the header carries; only the [`Vault`]
//! compares it with the real blob.
//!
//! The plaintext is the JSON of a private struct: the optional text fields of [`Contents`]
//! and `"secrets": {"name": "lowercase hex of the value"}`. Unknown fields are refused, so an
//! older devid never silently drops what a newer one stored. A whole bundle is at most
//! [`MAX_BUNDLE_SIZE`] bytes. Secret names match `[A-Za-z0-9._-]{1,64}`
//! ([`validate_secret_name`]); `ca_pin`, when set, is 64 lowercase hex characters.
//!
//! # Memory hygiene (THREATS.md T7)
//!
//! The data key and every secret value live in [`SecretBytes`] (locked, zeroized on drop,
//! redacted by `Debug`). The JSON plaintext is built in a buffer allocated once at its exact
//! final size (a first pass only counts bytes), so it is never reallocated, and it is
//! zeroized when dropped; secret values are hex-encoded straight into it and decoded straight
//! out of it into `SecretBytes`, with no intermediate `String`. Decryption happens in place in
//! a zeroizing buffer. The AES round keys are zeroized when the cipher is dropped.
//!
//! # Writes
//!
//! [`Vault::store`] writes through [`write_atomic_private`]: temp file, fsync, rename, fsync
//! of the directory, mode 0600. After a power loss the bundle is either the old or the new
//! one, never a mix. The temp file has a random name and is opened `O_EXCL | O_NOFOLLOW`.
//! Every store holds an advisory `flock` on `<state dir>/.lock`; [`Vault::update`] holds it
//! around the whole read-modify-write, so the agent's renewal and a concurrent
//! `devid secret put` or `devid config set` cannot lose each other's update.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use devid_keystore::fsutil::{ensure_private_dir, write_atomic_private, DirLock};
use devid_keystore::{Keystore, KeystoreError};
use rand_core::{OsRng, RngCore};
use serde::de::{self, Deserializer, Visitor};
use serde::ser::Serializer;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, Zeroizing};

pub use devid_keystore::SecretBytes;

/// File name of the encrypted bundle inside the state dir.
pub const BUNDLE_FILE: &str = "bundle.sealed";
/// File name of the sealed data key inside the state dir.
pub const DATA_KEY_FILE: &str = "datakey.sealed";

/// First eight bytes of every bundle.
pub const MAGIC: &[u8; 8] = b"DEVIDVB1";
/// The bundle format version of an unbound bundle ([`seal_bundle`], or a [`Vault`] opened
/// without a state binding).
pub const FORMAT_VERSION: u16 = 1;
/// The bundle format version of a bundle bound to the state file (see the crate docs).
pub const FORMAT_VERSION_BOUND: u16 = 2;
/// Length of the state binding field (a SHA-256).
pub const STATE_BINDING_LEN: usize = 32;
/// AEAD id of AES-256-GCM in the header.
pub const AEAD_AES_256_GCM: u8 = 1;
/// Length of the key binding field (a SHA-256).
pub const KEY_BINDING_LEN: usize = 32;
/// Length of the AES-GCM nonce.
pub const NONCE_LEN: usize = 12;
/// Length of the AES-GCM tag at the end of the file.
pub const TAG_LEN: usize = 16;
/// Length of the header (magic, version, AEAD id, key binding, nonce): the associated data.
pub const HEADER_LEN: usize = MAGIC.len() + 2 + 1 + KEY_BINDING_LEN + NONCE_LEN;
/// Length of a version-2 header (with the state binding).
pub const HEADER_LEN_V2: usize = HEADER_LEN + STATE_BINDING_LEN;
/// Largest bundle file this crate writes or reads (1 MiB).
pub const MAX_BUNDLE_SIZE: usize = 1 << 20;
/// Length of the data key.
pub const DATA_KEY_LEN: usize = 32;
/// Largest `datakey.sealed` this crate reads (sealed blobs are a few hundred bytes).
const MAX_SEALED_KEY_SIZE: usize = 64 * 1024;
/// Longest secret name.
pub const MAX_SECRET_NAME_LEN: usize = 64;

const OFF_VERSION: usize = MAGIC.len();
const OFF_ALG: usize = OFF_VERSION + 2;
const OFF_BINDING: usize = OFF_ALG + 1;
const OFF_NONCE: usize = OFF_BINDING + KEY_BINDING_LEN;
const OFF_STATE_V2: usize = OFF_BINDING + KEY_BINDING_LEN;
const OFF_NONCE_V2: usize = OFF_STATE_V2 + STATE_BINDING_LEN;

/// Errors of the vault. Messages say what failed and what to do; they never carry a secret
/// value, a key or decrypted content.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VaultError {
    /// The AEAD tag did not verify, or the bundle belongs to another sealed data key.
    #[error(
        "bundle failed authentication: the state dir was modified (or copied from another \
         device); nothing in it was used"
    )]
    Tampered,
    /// The bundle was bound to other trust-relevant fields of `state.toml` than the ones
    /// there now: the state file was edited (or the state dir put together from two vaults).
    #[error(
        "state.toml was changed since the bundle was written (its backend, pinned SRK Name or \
         token serial, or PCR list differ from what the bundle is bound to): the state dir was \
         modified; nothing in it was used. Restore the original state.toml, or remove the \
         state dir and run `devid init` and `devid enroll` again"
    )]
    StateChanged,
    /// The file is not a bundle this version can read (truncated, wrong magic, unknown
    /// version or algorithm, unparsable contents).
    #[error("bundle format: {0}")]
    Format(String),
    /// The state dir holds no vault.
    #[error("no vault in {}: initialise the device first (`devid init`)", .0.display())]
    NotInitialised(PathBuf),
    /// [`Vault::create`] found an existing bundle.
    #[error(
        "a vault already exists in {}: refusing to overwrite it (remove the state dir \
         deliberately to start over)",
        .0.display()
    )]
    AlreadyExists(PathBuf),
    /// A secret name outside `[A-Za-z0-9._-]{1,64}`.
    #[error("invalid secret name: {0}; use 1 to 64 characters from A-Z a-z 0-9 . _ -")]
    InvalidSecretName(String),
    /// A field of [`Contents`] has an invalid value.
    #[error("invalid vault contents: {0}")]
    InvalidContents(String),
    /// The bundle would exceed [`MAX_BUNDLE_SIZE`].
    #[error(
        "the bundle would be {size} bytes, over the {limit}-byte limit: store fewer or smaller \
         secrets"
    )]
    TooLarge {
        /// Size the bundle would have.
        size: usize,
        /// [`MAX_BUNDLE_SIZE`].
        limit: usize,
    },
    /// The keystore failed to seal or unseal the data key. Its message is passed through
    /// unchanged (other TPM, PCR policy, token missing...).
    #[error(transparent)]
    Keystore(#[from] KeystoreError),
    /// The OS random number generator failed.
    #[error("the operating system's random number generator failed: {0}")]
    Random(String),
    /// A vault file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl VaultError {
    fn io(path: &Path, source: io::Error) -> Self {
        VaultError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Check a secret name: 1 to 64 characters from `A-Z a-z 0-9 . _ -`. The error never repeats
/// the name (it could be a value typed in the wrong place).
pub fn validate_secret_name(name: &str) -> Result<(), VaultError> {
    if name.is_empty() {
        return Err(VaultError::InvalidSecretName("the name is empty".into()));
    }
    let chars = name.chars().count();
    if chars > MAX_SECRET_NAME_LEN {
        return Err(VaultError::InvalidSecretName(format!(
            "the name has {chars} characters, at most {MAX_SECRET_NAME_LEN} are allowed"
        )));
    }
    if let Some(pos) = name
        .chars()
        .position(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(VaultError::InvalidSecretName(format!(
            "character {} of the name is not allowed",
            pos + 1
        )));
    }
    Ok(())
}

/// The decrypted bundle: non-secret fields plus the operator's secrets.
///
/// `Debug` prints the text fields and the secret names, never a secret value.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Contents {
    /// Enrolment/API endpoint, `https://host:8443`.
    pub server_url: Option<String>,
    /// MQTT endpoint, `mqtts://host:8883`.
    pub mqtt_url: Option<String>,
    /// Lowercase hex SHA-256 of the server CA certificate DER.
    pub ca_pin: Option<String>,
    /// The server CA certificate, PEM.
    pub ca_cert_pem: Option<String>,
    /// The device id (`[a-z0-9-]{1,64}` by DESIGN.md; not checked here).
    pub device_id: Option<String>,
    /// The device certificate chain, PEM, leaf first.
    pub cert_chain_pem: Option<String>,
    /// Named user secrets (names: [`validate_secret_name`]).
    pub secrets: BTreeMap<String, SecretBytes>,
}

impl Contents {
    /// Check every field that has a format: secret names and the CA pin.
    pub fn validate(&self) -> Result<(), VaultError> {
        for name in self.secrets.keys() {
            validate_secret_name(name)?;
        }
        if let Some(pin) = &self.ca_pin {
            let ok = pin.len() == 64
                && pin
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            if !ok {
                return Err(VaultError::InvalidContents(
                    "ca_pin must be 64 lowercase hex characters (SHA-256 of the CA certificate \
                     DER)"
                        .into(),
                ));
            }
        }
        Ok(())
    }

    /// Add or replace a secret after checking its name; returns the previous value.
    pub fn put_secret(
        &mut self,
        name: &str,
        value: SecretBytes,
    ) -> Result<Option<SecretBytes>, VaultError> {
        validate_secret_name(name)?;
        Ok(self.secrets.insert(name.to_owned(), value))
    }
}

// ---------------------------------------------------------------------------------------------
// Plaintext serialisation

/// Lowercase hex of a secret, written in 32-byte chunks through a zeroized stack buffer.
struct HexDisplay<'a>(&'a [u8]);

impl fmt::Display for HexDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = Zeroizing::new([0u8; 64]);
        for chunk in self.0.chunks(32) {
            let out = &mut buf[..chunk.len() * 2];
            hex::encode_to_slice(chunk, out).map_err(|_| fmt::Error)?;
            f.write_str(std::str::from_utf8(out).map_err(|_| fmt::Error)?)?;
        }
        Ok(())
    }
}

struct HexOut<'a>(&'a SecretBytes);

impl Serialize for HexOut<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // serde_json's collect_str escapes the pieces straight into the output buffer.
        s.collect_str(&HexDisplay(self.0.expose()))
    }
}

struct HexIn(SecretBytes);

impl<'de> Deserialize<'de> for HexIn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = HexIn;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a hex string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<HexIn, E> {
                if !v.len().is_multiple_of(2) {
                    return Err(E::custom("a secret value has an odd number of hex digits"));
                }
                let mut out = SecretBytes::zeroed(v.len() / 2);
                hex::decode_to_slice(v, out.expose_mut())
                    .map_err(|_| E::custom("a secret value is not hex"))?;
                Ok(HexIn(out))
            }
            fn visit_string<E: de::Error>(self, mut v: String) -> Result<HexIn, E> {
                let r = self.visit_str(&v);
                v.zeroize();
                r
            }
        }
        d.deserialize_str(V)
    }
}

#[derive(Serialize)]
struct PlainOut<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    server_url: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mqtt_url: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ca_pin: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ca_cert_pem: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    device_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cert_chain_pem: Option<&'a str>,
    secrets: BTreeMap<&'a str, HexOut<'a>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlainIn {
    #[serde(default)]
    server_url: Option<String>,
    #[serde(default)]
    mqtt_url: Option<String>,
    #[serde(default)]
    ca_pin: Option<String>,
    #[serde(default)]
    ca_cert_pem: Option<String>,
    #[serde(default)]
    device_id: Option<String>,
    #[serde(default)]
    cert_chain_pem: Option<String>,
    #[serde(default)]
    secrets: BTreeMap<String, HexIn>,
}

/// Counts what would be written, keeps nothing.
struct Counter(usize);

impl io::Write for Counter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 = self.0.saturating_add(buf.len());
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn serialise_error(e: serde_json::Error) -> VaultError {
    // serde_json messages may quote input; only the category and position are kept.
    VaultError::Format(format!(
        "could not serialise the contents ({:?} error)",
        e.classify()
    ))
}

/// The JSON plaintext in a zeroizing buffer of exactly `len + TAG_LEN` capacity.
fn serialise(c: &Contents) -> Result<Zeroizing<Vec<u8>>, VaultError> {
    let out = PlainOut {
        server_url: c.server_url.as_deref(),
        mqtt_url: c.mqtt_url.as_deref(),
        ca_pin: c.ca_pin.as_deref(),
        ca_cert_pem: c.ca_cert_pem.as_deref(),
        device_id: c.device_id.as_deref(),
        cert_chain_pem: c.cert_chain_pem.as_deref(),
        secrets: c
            .secrets
            .iter()
            .map(|(k, v)| (k.as_str(), HexOut(v)))
            .collect(),
    };
    let mut counter = Counter(0);
    serde_json::to_writer(&mut counter, &out).map_err(serialise_error)?;
    let len = counter.0;
    let size = HEADER_LEN_V2.saturating_add(len).saturating_add(TAG_LEN);
    if size > MAX_BUNDLE_SIZE {
        return Err(VaultError::TooLarge {
            size,
            limit: MAX_BUNDLE_SIZE,
        });
    }
    // Allocated once at its final size (plus room for the tag): never reallocated, so no
    // unzeroized copy of the plaintext is left behind.
    let mut buf = Zeroizing::new(Vec::with_capacity(len + TAG_LEN));
    serde_json::to_writer(&mut *buf, &out).map_err(serialise_error)?;
    if buf.len() != len {
        return Err(VaultError::Format(
            "the contents changed size between two serialisations".into(),
        ));
    }
    Ok(buf)
}

fn parse_plaintext(plain: &[u8]) -> Result<Contents, VaultError> {
    let p: PlainIn = serde_json::from_slice(plain).map_err(|e| {
        VaultError::Format(format!(
            "the decrypted contents are not a valid bundle ({:?} error at line {} column {}): \
             written by an incompatible devid?",
            e.classify(),
            e.line(),
            e.column()
        ))
    })?;
    let c = Contents {
        server_url: p.server_url,
        mqtt_url: p.mqtt_url,
        ca_pin: p.ca_pin,
        ca_cert_pem: p.ca_cert_pem,
        device_id: p.device_id,
        cert_chain_pem: p.cert_chain_pem,
        secrets: p.secrets.into_iter().map(|(k, v)| (k, v.0)).collect(),
    };
    c.validate()?;
    Ok(c)
}

// ---------------------------------------------------------------------------------------------
// The envelope

struct Header<'a> {
    /// The whole header: the associated data.
    aad: &'a [u8],
    key_binding: [u8; KEY_BINDING_LEN],
    /// The state binding of a version-2 bundle.
    state_binding: Option<[u8; STATE_BINDING_LEN]>,
    nonce: [u8; NONCE_LEN],
    /// Ciphertext followed by the tag.
    sealed: &'a [u8],
}

fn parse_header(bytes: &[u8]) -> Result<Header<'_>, VaultError> {
    if bytes.len() > MAX_BUNDLE_SIZE {
        return Err(VaultError::Format(format!(
            "{} bytes is larger than any bundle devid writes ({MAX_BUNDLE_SIZE} bytes at most)",
            bytes.len()
        )));
    }
    let min = HEADER_LEN + TAG_LEN;
    if bytes.len() < MAGIC.len() && MAGIC.starts_with(bytes) {
        return Err(VaultError::Format(format!(
            "truncated: {} bytes, a bundle has at least {min}",
            bytes.len()
        )));
    }
    if !bytes.starts_with(MAGIC) {
        return Err(VaultError::Format(
            "not a devid bundle (bad magic): the file was modified or replaced; nothing in it \
             was used"
                .into(),
        ));
    }
    if bytes.len() < OFF_ALG {
        return Err(VaultError::Format(format!(
            "truncated: {} bytes, a bundle has at least {min}",
            bytes.len()
        )));
    }
    let version = u16::from_be_bytes([bytes[OFF_VERSION], bytes[OFF_VERSION + 1]]);
    if version != FORMAT_VERSION && version != FORMAT_VERSION_BOUND {
        return Err(VaultError::Format(format!(
            "unsupported bundle format version {version} (this devid reads versions \
             {FORMAT_VERSION} and {FORMAT_VERSION_BOUND}): use the devid release that wrote it, \
             or a newer one"
        )));
    }
    let (header_len, off_nonce) = if version == FORMAT_VERSION_BOUND {
        (HEADER_LEN_V2, OFF_NONCE_V2)
    } else {
        (HEADER_LEN, OFF_NONCE)
    };
    let min = header_len + TAG_LEN;
    if bytes.len() < min {
        return Err(VaultError::Format(format!(
            "truncated: {} bytes, a bundle has at least {min}",
            bytes.len()
        )));
    }
    let alg = bytes[OFF_ALG];
    if alg != AEAD_AES_256_GCM {
        return Err(VaultError::Format(format!(
            "unsupported AEAD id {alg} (this devid knows {AEAD_AES_256_GCM} = AES-256-GCM)"
        )));
    }
    let mut key_binding = [0u8; KEY_BINDING_LEN];
    key_binding.copy_from_slice(&bytes[OFF_BINDING..OFF_BINDING + KEY_BINDING_LEN]);
    let state_binding = (version == FORMAT_VERSION_BOUND).then(|| {
        let mut b = [0u8; STATE_BINDING_LEN];
        b.copy_from_slice(&bytes[OFF_STATE_V2..OFF_NONCE_V2]);
        b
    });
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&bytes[off_nonce..header_len]);
    Ok(Header {
        aad: &bytes[..header_len],
        key_binding,
        state_binding,
        nonce,
        sealed: &bytes[header_len..],
    })
}

fn cipher(data_key: &[u8]) -> Result<Aes256Gcm, VaultError> {
    Aes256Gcm::new_from_slice(data_key).map_err(|_| {
        VaultError::Format(format!(
            "the data key has {} bytes, AES-256-GCM needs {DATA_KEY_LEN}",
            data_key.len()
        ))
    })
}

/// Parse, authenticate, decrypt and parse a bundle with `data_key` (32 bytes). Pure: used by
/// [`Vault::load`] and by the fuzz target. The header's key binding is authenticated but not
/// compared with anything (that is [`Vault::load`]'s job).
pub fn open_bundle(data_key: &[u8], bytes: &[u8]) -> Result<Contents, VaultError> {
    let h = parse_header(bytes)?;
    let cipher = cipher(data_key)?;
    let mut buf = Zeroizing::new(h.sealed.to_vec());
    cipher
        .decrypt_in_place(&Nonce::from(h.nonce), h.aad, &mut *buf)
        .map_err(|_| VaultError::Tampered)?;
    parse_plaintext(&buf)
}

/// Serialise and encrypt `c` under `data_key` (32 bytes) with a fresh random nonce and an
/// all-zero key binding. [`Vault::store`] uses the same format with the real binding.
pub fn seal_bundle(data_key: &[u8], c: &Contents) -> Result<Vec<u8>, VaultError> {
    seal_bound(data_key, &[0u8; KEY_BINDING_LEN], None, c)
}

fn seal_bound(
    data_key: &[u8],
    key_binding: &[u8; KEY_BINDING_LEN],
    state_binding: Option<&[u8; STATE_BINDING_LEN]>,
    c: &Contents,
) -> Result<Vec<u8>, VaultError> {
    c.validate()?;
    let cipher = cipher(data_key)?;
    let mut nonce = [0u8; NONCE_LEN];
    OsRng
        .try_fill_bytes(&mut nonce)
        .map_err(|e| VaultError::Random(e.to_string()))?;
    let mut header = Vec::with_capacity(HEADER_LEN_V2);
    header.extend_from_slice(MAGIC);
    let version = match state_binding {
        Some(_) => FORMAT_VERSION_BOUND,
        None => FORMAT_VERSION,
    };
    header.extend_from_slice(&version.to_be_bytes());
    header.push(AEAD_AES_256_GCM);
    header.extend_from_slice(key_binding);
    if let Some(b) = state_binding {
        header.extend_from_slice(b);
    }
    header.extend_from_slice(&nonce);

    let mut buf = serialise(c)?;
    cipher
        .encrypt_in_place(&Nonce::from(nonce), &header, &mut *buf)
        .map_err(|_| VaultError::Format("AES-256-GCM refused to encrypt the bundle".into()))?;
    let mut out = header;
    out.extend_from_slice(&buf);
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Files

/// Read at most `limit` bytes of `path`; `Ok(None)` when the file does not exist.
fn read_limited(path: &Path, limit: usize, what: &str) -> Result<Option<Vec<u8>>, VaultError> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(VaultError::io(path, e)),
    };
    let mut out = Vec::new();
    f.take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| VaultError::io(path, e))?;
    if out.len() > limit {
        return Err(VaultError::Format(format!(
            "{} is larger than any {what} devid writes ({limit} bytes at most)",
            path.display()
        )));
    }
    Ok(Some(out))
}

/// An open vault: the unsealed data key and the state dir it belongs to.
pub struct Vault {
    dir: PathBuf,
    keystore: Arc<dyn Keystore>,
    data_key: SecretBytes,
    /// SHA-256 of the sealed data-key blob this vault was opened with.
    key_binding: [u8; KEY_BINDING_LEN],
    /// What the state file's trust fields hash to, when the caller bound the vault to them.
    state_binding: Option<[u8; STATE_BINDING_LEN]>,
    /// Serialises [`Vault::store`] calls of this process.
    write_lock: Mutex<()>,
}

/// The state binding stored in `dir`'s bundle header, read without any key: `Ok(None)` for a
/// version-1 bundle or when there is no bundle. Not authenticated on its own (the tag covers
/// it when the bundle is loaded); use it to refuse a changed `state.toml` early.
pub fn bundle_state_binding(dir: &Path) -> Result<Option<[u8; STATE_BINDING_LEN]>, VaultError> {
    let path = dir.join(BUNDLE_FILE);
    match read_limited(&path, MAX_BUNDLE_SIZE, "bundle")? {
        None => Ok(None),
        Some(bytes) => Ok(parse_header(&bytes)?.state_binding),
    }
}

impl fmt::Debug for Vault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vault")
            .field("dir", &self.dir)
            .field("keystore", &self.keystore.kind())
            .field("data_key", &self.data_key)
            .finish_non_exhaustive()
    }
}

impl Vault {
    /// Create a vault in `dir` (made 0700 if missing): a new random 32-byte data key sealed
    /// with `keystore.seal` into [`DATA_KEY_FILE`], and an empty bundle. Refuses if a bundle
    /// already exists. A `datakey.sealed` without a bundle (an interrupted create) is replaced.
    pub fn create(dir: &Path, keystore: Arc<dyn Keystore>) -> Result<Vault, VaultError> {
        Self::create_inner(dir, keystore, None)
    }

    /// [`Vault::create`] with the bundle bound to `state_binding` (format version 2).
    pub fn create_bound(
        dir: &Path,
        keystore: Arc<dyn Keystore>,
        state_binding: [u8; STATE_BINDING_LEN],
    ) -> Result<Vault, VaultError> {
        Self::create_inner(dir, keystore, Some(state_binding))
    }

    fn create_inner(
        dir: &Path,
        keystore: Arc<dyn Keystore>,
        state_binding: Option<[u8; STATE_BINDING_LEN]>,
    ) -> Result<Vault, VaultError> {
        ensure_private_dir(dir).map_err(|e| VaultError::io(dir, e))?;
        let bundle = dir.join(BUNDLE_FILE);
        match bundle.try_exists() {
            Ok(false) => {}
            Ok(true) => return Err(VaultError::AlreadyExists(dir.to_path_buf())),
            Err(e) => return Err(VaultError::io(&bundle, e)),
        }
        let mut data_key = SecretBytes::zeroed(DATA_KEY_LEN);
        OsRng
            .try_fill_bytes(data_key.expose_mut())
            .map_err(|e| VaultError::Random(e.to_string()))?;
        let blob = keystore.seal(data_key.expose())?;
        let key_path = dir.join(DATA_KEY_FILE);
        write_atomic_private(&key_path, &blob).map_err(|e| VaultError::io(&key_path, e))?;
        let vault = Vault {
            dir: dir.to_path_buf(),
            keystore,
            data_key,
            key_binding: Sha256::digest(&blob).into(),
            state_binding,
            write_lock: Mutex::new(()),
        };
        vault.store(&Contents::default())?;
        tracing::info!(dir = %dir.display(), backend = %vault.keystore.kind(), "vault created");
        Ok(vault)
    }

    /// Open the vault in `dir`: unseal the data key with `keystore`. Keystore errors pass
    /// through unchanged ([`VaultError::Keystore`]): they say "other TPM", "PCR policy" and
    /// what to do.
    pub fn open(dir: &Path, keystore: Arc<dyn Keystore>) -> Result<Vault, VaultError> {
        Self::open_inner(dir, keystore, None)
    }

    /// [`Vault::open`] for a vault bound to `state_binding`: a version-2 bundle bound to
    /// anything else is refused ([`VaultError::StateChanged`]) before the data key is
    /// unsealed; a version-1 bundle opens and is upgraded to version 2 by the next store.
    pub fn open_bound(
        dir: &Path,
        keystore: Arc<dyn Keystore>,
        state_binding: [u8; STATE_BINDING_LEN],
    ) -> Result<Vault, VaultError> {
        if let Some(stored) = bundle_state_binding(dir)? {
            if stored != state_binding {
                return Err(VaultError::StateChanged);
            }
        }
        Self::open_inner(dir, keystore, Some(state_binding))
    }

    fn open_inner(
        dir: &Path,
        keystore: Arc<dyn Keystore>,
        state_binding: Option<[u8; STATE_BINDING_LEN]>,
    ) -> Result<Vault, VaultError> {
        let key_path = dir.join(DATA_KEY_FILE);
        let blob = read_limited(&key_path, MAX_SEALED_KEY_SIZE, "sealed data key")?
            .ok_or_else(|| VaultError::NotInitialised(dir.to_path_buf()))?;
        let bundle = dir.join(BUNDLE_FILE);
        match bundle.try_exists() {
            Ok(true) => {}
            Ok(false) => return Err(VaultError::NotInitialised(dir.to_path_buf())),
            Err(e) => return Err(VaultError::io(&bundle, e)),
        }
        let data_key = keystore.unseal(&blob)?;
        if data_key.len() != DATA_KEY_LEN {
            return Err(VaultError::Format(format!(
                "{} unsealed to {} bytes instead of a {DATA_KEY_LEN}-byte data key: the file was \
                 modified or is not from devid",
                key_path.display(),
                data_key.len()
            )));
        }
        tracing::debug!(dir = %dir.display(), backend = %keystore.kind(), "vault opened");
        Ok(Vault {
            dir: dir.to_path_buf(),
            keystore,
            data_key,
            key_binding: Sha256::digest(&blob).into(),
            state_binding,
            write_lock: Mutex::new(()),
        })
    }

    /// Read, authenticate and decrypt the bundle. Any changed byte, a bundle of another data
    /// key, or one bound to another `datakey.sealed` gives [`VaultError::Tampered`] or
    /// [`VaultError::Format`], and nothing from the file is returned.
    pub fn load(&self) -> Result<Contents, VaultError> {
        let path = self.dir.join(BUNDLE_FILE);
        let bytes = read_limited(&path, MAX_BUNDLE_SIZE, "bundle")?
            .ok_or_else(|| VaultError::NotInitialised(self.dir.clone()))?;
        let result = parse_header(&bytes).and_then(|h| {
            if h.key_binding != self.key_binding {
                tracing::warn!(
                    dir = %self.dir.display(),
                    "bundle is bound to another sealed data key (files of two devices or two \
                     inits mixed?)"
                );
                return Err(VaultError::Tampered);
            }
            if let (Some(stored), Some(expected)) = (h.state_binding, self.state_binding) {
                if stored != expected {
                    return Err(VaultError::StateChanged);
                }
            }
            if h.state_binding.is_none() && self.state_binding.is_some() {
                tracing::info!(
                    dir = %self.dir.display(),
                    "bundle of format 1: it is bound to state.toml on its next write"
                );
            }
            open_bundle(self.data_key.expose(), &bytes)
        });
        if let Err(e) = &result {
            tracing::warn!(file = %path.display(), error = %e, "bundle refused");
        }
        result
    }

    /// Encrypt `c` with a fresh nonce and replace the bundle atomically and durably (0600).
    /// Secret names and the CA pin are validated first.
    ///
    /// This replaces the whole bundle: to change some fields while other processes may write
    /// too (the agent's renewal, `devid secret put`), use [`Vault::update`].
    pub fn store(&self, c: &Contents) -> Result<(), VaultError> {
        let _guard = self
            .write_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let _dir_lock = self.dir_lock()?;
        self.store_locked(c)
    }

    /// Read, change and write the bundle under the state dir's advisory lock
    /// ([`DirLock`]), so a concurrent update by another process (or thread) is never lost:
    /// `change` sees the latest stored contents. Returns what `change` returned.
    pub fn update<T>(
        &self,
        change: impl FnOnce(&mut Contents) -> Result<T, VaultError>,
    ) -> Result<T, VaultError> {
        let _guard = self
            .write_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let _dir_lock = self.dir_lock()?;
        let mut c = self.load()?;
        let out = change(&mut c)?;
        self.store_locked(&c)?;
        Ok(out)
    }

    fn dir_lock(&self) -> Result<DirLock, VaultError> {
        DirLock::exclusive(&self.dir)
            .map_err(|e| VaultError::io(&self.dir.join(devid_keystore::fsutil::LOCK_FILE), e))
    }

    fn store_locked(&self, c: &Contents) -> Result<(), VaultError> {
        let bytes = seal_bound(
            self.data_key.expose(),
            &self.key_binding,
            self.state_binding.as_ref(),
            c,
        )?;
        let path = self.dir.join(BUNDLE_FILE);
        write_atomic_private(&path, &bytes).map_err(|e| VaultError::io(&path, e))?;
        tracing::debug!(
            dir = %self.dir.display(),
            secrets = c.secrets.len(),
            "bundle stored"
        );
        Ok(())
    }

    /// A 32-byte key for one `purpose`, derived from the data key (HMAC-SHA256 keyed with
    /// the data key over `"devid vault subkey v1\0" || purpose`, i.e. one HKDF-Expand block),
    /// in locked, zeroized memory. It reveals nothing about the data key or about the keys of
    /// other purposes, and it is the same on every open of this vault. The agent keys its
    /// outbox record MACs with it.
    pub fn derive_key(&self, purpose: &str) -> SecretBytes {
        use hmac::{Hmac, Mac};
        let mut out = SecretBytes::zeroed(32);
        // HMAC accepts keys of any length, so this cannot fail for a 32-byte data key.
        if let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(self.data_key.expose()) {
            mac.update(b"devid vault subkey v1\0");
            mac.update(purpose.as_bytes());
            let tag = mac.finalize().into_bytes();
            out.expose_mut().copy_from_slice(&tag);
            let mut tag: [u8; 32] = tag.into();
            tag.zeroize();
        }
        out
    }

    /// Whether the unsealed data key is locked in RAM (mlock succeeded). `false` means it
    /// could be written to swap: raise `RLIMIT_MEMLOCK` (`LimitMEMLOCK=` in the unit).
    pub fn key_locked(&self) -> bool {
        self.data_key.is_locked()
    }

    /// What it takes to open this vault again later ([`VaultOpener::open`]) without keeping
    /// the data key in memory meanwhile: a long-running process (the agent) drops the
    /// [`Vault`] once it has what it needs, and unseals again only when it writes.
    pub fn opener(&self) -> VaultOpener {
        VaultOpener {
            dir: self.dir.clone(),
            keystore: Arc::clone(&self.keystore),
            state_binding: self.state_binding,
        }
    }

    /// The state dir of this vault.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The keystore that sealed the data key.
    pub fn keystore(&self) -> &Arc<dyn Keystore> {
        &self.keystore
    }
}

/// A closed vault: its state dir, keystore and state binding, but no data key. See
/// [`Vault::opener`].
#[derive(Clone)]
pub struct VaultOpener {
    dir: PathBuf,
    keystore: Arc<dyn Keystore>,
    state_binding: Option<[u8; STATE_BINDING_LEN]>,
}

impl fmt::Debug for VaultOpener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VaultOpener")
            .field("dir", &self.dir)
            .field("keystore", &self.keystore.kind())
            .finish_non_exhaustive()
    }
}

impl VaultOpener {
    /// Unseal the data key again and open the vault, with the same state binding.
    pub fn open(&self) -> Result<Vault, VaultError> {
        match self.state_binding {
            Some(b) => Vault::open_bound(&self.dir, Arc::clone(&self.keystore), b),
            None => Vault::open(&self.dir, Arc::clone(&self.keystore)),
        }
    }

    /// The keystore.
    pub fn keystore(&self) -> &Arc<dyn Keystore> {
        &self.keystore
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use devid_keystore::soft::SoftKeystore;

    fn key() -> [u8; 32] {
        [7u8; 32]
    }

    #[test]
    fn header_layout_is_as_documented() {
        let c = Contents::default();
        let b = seal_bundle(&key(), &c).unwrap();
        assert_eq!(HEADER_LEN, 55);
        assert_eq!(&b[..8], b"DEVIDVB1");
        assert_eq!(&b[8..10], &[0, 1]);
        assert_eq!(b[10], 1);
        assert_eq!(&b[11..43], &[0u8; 32]);
        // Plaintext `{"secrets":{}}` is 14 bytes.
        assert_eq!(b.len(), HEADER_LEN + 14 + TAG_LEN);
        assert_eq!(open_bundle(&key(), &b).unwrap(), c);
    }

    #[test]
    fn nonce_is_fresh_on_every_seal() {
        let c = Contents::default();
        let a = seal_bundle(&key(), &c).unwrap();
        let b = seal_bundle(&key(), &c).unwrap();
        assert_ne!(&a[OFF_NONCE..HEADER_LEN], &b[OFF_NONCE..HEADER_LEN]);
        assert_ne!(a, b);
    }

    #[test]
    fn plaintext_is_exact_size_and_secrets_are_hex() {
        let mut c = Contents {
            device_id: Some("dev-1".into()),
            ..Contents::default()
        };
        c.put_secret("wifi.psk", SecretBytes::from_slice(&[0xde, 0xad, 0x00]))
            .unwrap();
        let buf = serialise(&c).unwrap();
        assert_eq!(buf.capacity(), buf.len() + TAG_LEN);
        assert_eq!(
            std::str::from_utf8(&buf).unwrap(),
            r#"{"device_id":"dev-1","secrets":{"wifi.psk":"dead00"}}"#
        );
        assert_eq!(parse_plaintext(&buf).unwrap(), c);
    }

    #[test]
    fn long_secrets_round_trip_through_chunked_hex() {
        let mut c = Contents::default();
        let value: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        c.put_secret("big", SecretBytes::from_slice(&value))
            .unwrap();
        let b = seal_bundle(&key(), &c).unwrap();
        assert_eq!(
            open_bundle(&key(), &b).unwrap().secrets["big"].expose(),
            value
        );
    }

    #[test]
    fn plaintext_errors_never_quote_the_input() {
        let bad = br#"{"secrets":{"a":"zz-not-hex-topsecret"}}"#;
        let e = parse_plaintext(bad).unwrap_err();
        assert!(matches!(e, VaultError::Format(_)), "{e:?}");
        assert!(!e.to_string().contains("topsecret"), "{e}");
        let unknown = br#"{"secrets":{},"future_field":"topsecret"}"#;
        let e = parse_plaintext(unknown).unwrap_err();
        assert!(!e.to_string().contains("topsecret"), "{e}");
        let bad_name = br#"{"secrets":{"bad name":"00"}}"#;
        assert!(matches!(
            parse_plaintext(bad_name),
            Err(VaultError::InvalidSecretName(_))
        ));
    }

    #[test]
    fn oversized_contents_are_refused_on_store() {
        let mut c = Contents::default();
        c.put_secret("huge", SecretBytes::zeroed(MAX_BUNDLE_SIZE / 2))
            .unwrap();
        match seal_bundle(&key(), &c) {
            Err(VaultError::TooLarge { size, limit }) => {
                assert!(size > limit);
                assert_eq!(limit, MAX_BUNDLE_SIZE);
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[test]
    fn wrong_key_length_is_an_error_not_a_panic() {
        let b = seal_bundle(&key(), &Contents::default()).unwrap();
        assert!(open_bundle(&[1u8; 16], &b).is_err());
        assert!(seal_bundle(&[1u8; 31], &Contents::default()).is_err());
    }

    #[test]
    fn bundle_bound_to_another_sealed_key_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let ks: Arc<dyn Keystore> = Arc::new(SoftKeystore::create(d.path()).unwrap());
        let v = Vault::create(d.path(), ks.clone()).unwrap();
        let mut c = Contents::default();
        c.put_secret("s", SecretBytes::from_slice(b"v")).unwrap();
        v.store(&c).unwrap();
        assert_eq!(v.load().unwrap(), c);
        // Same data key, but opened from a different sealed blob: the binding differs.
        let other_blob = Vault {
            dir: v.dir.clone(),
            keystore: ks.clone(),
            data_key: v.data_key.clone(),
            key_binding: Sha256::digest(b"another datakey.sealed").into(),
            state_binding: None,
            write_lock: Mutex::new(()),
        };
        assert!(matches!(other_blob.load(), Err(VaultError::Tampered)));
        // A bundle written by that vault is refused by the real one, and vice versa.
        other_blob.store(&c).unwrap();
        assert!(matches!(v.load(), Err(VaultError::Tampered)));
        assert_eq!(other_blob.load().unwrap(), c);
        v.store(&c).unwrap();
        assert_eq!(v.load().unwrap(), c);
        // An unbound bundle (seal_bundle) is refused by the vault too.
        let unbound = seal_bundle(v.data_key.expose(), &c).unwrap();
        std::fs::write(d.path().join(BUNDLE_FILE), unbound).unwrap();
        assert!(matches!(v.load(), Err(VaultError::Tampered)));
    }

    #[test]
    fn derived_keys_are_stable_per_purpose_and_not_the_data_key() {
        let d = tempfile::tempdir().unwrap();
        let ks: Arc<dyn Keystore> = Arc::new(SoftKeystore::create(d.path()).unwrap());
        let v = Vault::create(d.path(), ks.clone()).unwrap();
        let a = v.derive_key("outbox");
        assert_eq!(a.len(), 32);
        assert_ne!(a.expose(), v.data_key.expose());
        assert_ne!(a.expose(), v.derive_key("other").expose());
        let reopened = Vault::open(d.path(), ks).unwrap();
        assert_eq!(reopened.derive_key("outbox").expose(), a.expose());
    }

    #[test]
    fn ca_pin_is_validated() {
        let mut c = Contents {
            ca_pin: Some("AB".repeat(32)),
            ..Contents::default()
        };
        assert!(matches!(
            seal_bundle(&key(), &c),
            Err(VaultError::InvalidContents(_))
        ));
        c.ca_pin = Some("ab".repeat(32));
        let b = seal_bundle(&key(), &c).unwrap();
        assert_eq!(open_bundle(&key(), &b).unwrap(), c);
    }

    #[test]
    fn vault_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Vault>();
        check::<Contents>();
    }
}
