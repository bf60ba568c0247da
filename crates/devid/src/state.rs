//! The state file `state.toml`: which backend holds the key and what was pinned at init
//! (TPM SRK Name, token serial, PCR list). Not secret, but not trusted either (review H2):
//! * its trust-relevant fields ([`StateFile::binding`]) are bound into the bundle's
//!   associated data, so an edited `state.toml` is refused like an edited bundle;
//! * the choices that decide what code runs and which chip is asked (backend, PKCS#11 module,
//!   TCTI) come from the root-owned device configuration when the device is anchored
//!   ([`crate::anchor`]); a PKCS#11 module is loaded only from a root-owned, non-writable
//!   path outside the state dir, anchored or not.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use devid_keystore::{soft::SoftKeystore, BackendKind, Keystore};
use devid_keystore_pkcs11::{Pkcs11Config, Pkcs11Keystore};
use devid_keystore_tpm::{TpmConfig, TpmKeystore};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::anchor::{self, DeviceConfig};

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
        Self::parse(&path, &text).map(Some)
    }

    /// Check the text of a state file read from `path` (fuzzed by
    /// `fuzz/fuzz_targets/device_config.rs`).
    pub fn parse(path: &Path, text: &str) -> Result<StateFile> {
        let state: StateFile = toml::from_str(text)
            .with_context(|| format!("{} is not a valid devid state file", path.display()))?;
        if state.format != FORMAT {
            bail!(
                "{} has format {}, this devid understands {FORMAT}",
                path.display(),
                state.format
            );
        }
        Ok(state)
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

    /// SHA-256 over the trust-relevant fields: backend, TPM SRK handle and Name, PCR lists
    /// (data key and device key) and key file, PKCS#11 token label, serial and key id. Not covered (runtime choices that
    /// the device configuration overrides): TCTI, module path, PIN file.
    pub fn binding(&self) -> [u8; 32] {
        fn field(h: &mut Sha256, name: &str, value: &str) {
            for part in [name, value] {
                h.update((part.len() as u64).to_be_bytes());
                h.update(part.as_bytes());
            }
        }
        let mut h = Sha256::new();
        h.update(b"devid state binding v1\0");
        field(&mut h, "backend", self.backend.as_str());
        if let Some(t) = &self.tpm {
            let handle = t
                .srk_handle
                .map(|v| format!("{v:#010x}"))
                .unwrap_or_default();
            field(&mut h, "tpm.srk_handle", &handle);
            field(&mut h, "tpm.srk_name", &t.srk_name);
            let pcrs: Vec<String> = t.pcrs.iter().map(u8::to_string).collect();
            field(&mut h, "tpm.pcrs", &pcrs.join(","));
            field(&mut h, "tpm.key_file", &t.key_file);
            if !t.key_pcrs.is_empty() {
                let key_pcrs: Vec<String> = t.key_pcrs.iter().map(u8::to_string).collect();
                field(&mut h, "tpm.key_pcrs", &key_pcrs.join(","));
            }
        }
        if let Some(p) = &self.pkcs11 {
            field(&mut h, "pkcs11.token_label", &p.token_label);
            field(&mut h, "pkcs11.token_serial", &p.token_serial);
            field(&mut h, "pkcs11.key_id", &p.key_id);
        }
        h.finalize().into()
    }

    /// Open the keystore this state file describes, on an unanchored device (see
    /// [`StateFile::open_keystore_with`]).
    pub fn open_keystore(&self, dir: &Path, tcti: Option<&str>) -> Result<Arc<dyn Keystore>> {
        self.open_keystore_with(dir, tcti, &DeviceConfig::unanchored())
    }

    /// Open the keystore this state file describes, under the device configuration `cfg`:
    /// an anchored device refuses another backend, takes the PKCS#11 module from the anchor,
    /// and the TCTI from `tcti` (`--tcti` / `DEVID_TCTI`), else the anchor, else `state.toml`.
    /// A PKCS#11 module is checked ([`anchor::check_module`]) before it is loaded. A
    /// `state.toml` whose trust fields differ from those the bundle is bound to is refused
    /// before anything is opened.
    pub fn open_keystore_with(
        &self,
        dir: &Path,
        tcti: Option<&str>,
        cfg: &DeviceConfig,
    ) -> Result<Arc<dyn Keystore>> {
        anchor::check_backend(cfg, self.backend, dir)?;
        if let Some(stored) = devid_vault::bundle_state_binding(dir)? {
            if stored != self.binding() {
                return Err(devid_vault::VaultError::StateChanged.into());
            }
        }
        let anchored = cfg.anchor.as_ref();
        let ks: Arc<dyn Keystore> = match self.backend {
            BackendKind::Tpm => {
                let state_cfg = self
                    .tpm
                    .as_ref()
                    .context("state file says backend = tpm but has no [tpm] section")?;
                let tcti = tcti.or(anchored.and_then(|a| a.tcti.as_deref()));
                Arc::new(TpmKeystore::open(dir, state_cfg, tcti)?)
            }
            BackendKind::Pkcs11 => {
                let state_cfg = self
                    .pkcs11
                    .as_ref()
                    .context("state file says backend = pkcs11 but has no [pkcs11] section")?;
                let mut p = state_cfg.clone();
                if let Some(m) = anchored.and_then(|a| a.module.as_ref()) {
                    if *m != p.module {
                        tracing::info!(
                            anchored = %m.display(),
                            recorded = %p.module.display(),
                            "using the PKCS#11 module of the device configuration, not the one \
                             state.toml recorded"
                        );
                    }
                    p.module = m.clone();
                }
                anchor::check_module(&p.module, dir)?;
                Arc::new(Pkcs11Keystore::open(&p)?)
            }
            BackendKind::Soft => Arc::new(SoftKeystore::open(dir)?),
        };
        Ok(ks)
    }
}
