//! The state file `state.toml`: which backend holds the key and what was pinned at init
//! (TPM SRK Name, token serial). Not secret; tampering with it cannot help an attacker: a
//! changed pin only makes the vault refuse to open, and the sealed blobs load only in the
//! chip that made them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use devid_keystore::{soft::SoftKeystore, BackendKind, Keystore};
use devid_keystore_pkcs11::{Pkcs11Config, Pkcs11Keystore};
use devid_keystore_tpm::{TpmConfig, TpmKeystore};
use serde::{Deserialize, Serialize};

/// File name of the state file inside the state dir.
pub const STATE_FILE: &str = "state.toml";
const FORMAT: u32 = 1;

/// Contents of `state.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StateFile {
    /// Format version.
    pub format: u32,
    /// Which backend holds the key.
    pub backend: BackendKind,
    /// TPM settings and pins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<TpmConfig>,
    /// PKCS#11 settings and pins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pkcs11: Option<Pkcs11Config>,
}

impl StateFile {
    /// A state file for a new key.
    pub fn new(backend: BackendKind) -> Self {
        StateFile {
            format: FORMAT,
            backend,
            tpm: None,
            pkcs11: None,
        }
    }

    /// Path of the state file in `dir`.
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(STATE_FILE)
    }

    /// Read `dir/state.toml`; `Ok(None)` when the device was never initialised.
    pub fn read(dir: &Path) -> Result<Option<StateFile>> {
        let path = Self::path(dir);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let state: StateFile = toml::from_str(&text)
            .with_context(|| format!("{} is not a valid devid state file", path.display()))?;
        if state.format != FORMAT {
            bail!(
                "{} has format {}, this devid understands {FORMAT}",
                path.display(),
                state.format
            );
        }
        Ok(Some(state))
    }

    /// Read the state file or explain how to create one.
    pub fn require(dir: &Path) -> Result<StateFile> {
        Self::read(dir)?.with_context(|| {
            format!(
                "no devid vault in {} (run `devid init --backend tpm|pkcs11|soft` first, or pass \
                 --state-dir / DEVID_STATE_DIR)",
                dir.display()
            )
        })
    }

    /// Write atomically (0600).
    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = Self::path(dir);
        let text = toml::to_string_pretty(self).context("cannot encode the state file")?;
        let text = format!(
            "# devid state: which keystore holds this device's key and what was pinned at init.\n\
             # Not secret. Do not edit: a changed pin makes the vault refuse to open.\n{text}"
        );
        devid_keystore::fsutil::write_atomic_private(&path, text.as_bytes())
            .with_context(|| format!("cannot write {}", path.display()))
    }

    /// Open the keystore this state file describes.
    pub fn open_keystore(&self, dir: &Path, tcti: Option<&str>) -> Result<Arc<dyn Keystore>> {
        let ks: Arc<dyn Keystore> = match self.backend {
            BackendKind::Tpm => {
                let cfg = self
                    .tpm
                    .as_ref()
                    .context("state file says backend = tpm but has no [tpm] section")?;
                Arc::new(TpmKeystore::open(dir, cfg, tcti)?)
            }
            BackendKind::Pkcs11 => {
                let cfg = self
                    .pkcs11
                    .as_ref()
                    .context("state file says backend = pkcs11 but has no [pkcs11] section")?;
                Arc::new(Pkcs11Keystore::open(cfg)?)
            }
            BackendKind::Soft => Arc::new(SoftKeystore::open(dir)?),
        };
        Ok(ks)
    }
}
