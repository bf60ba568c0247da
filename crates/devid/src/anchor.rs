//! The device configuration file (`/etc/devid/devid.toml`): the **anchor**, i.e. the trust
//! decisions an offline write to the state dir must not be able to change (review H2,
//! THREATS.md T13): which backend holds the key, the PKCS#11 module, the TPM's TCTI.
//!
//! Rules:
//! * The file is read only if it and the directories above it are owned by root and not
//!   writable by group or others; a root-owned sticky directory (such as /tmp) ends the walk
//!   up. A file that fails the check is an error, never silently ignored.
//! * No file, or a file without `[anchor] backend`: the device is **unanchored** and works as
//!   before, with `state.toml` choosing; `devid status` and the agent's log say so, with the
//!   command that anchors it (`devid anchor`).
//! * `devid init` fills in the anchor when the file exists without one (the packaged file
//!   ships with the keys commented out), and refuses another backend than the anchored one.
//! * An anchored device refuses a state dir of any other backend, takes the PKCS#11 module
//!   from the anchor, and uses the anchor's TCTI unless `--tcti` / `DEVID_TCTI` is given.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use devid_keystore::BackendKind;
use serde::{Deserialize, Serialize};

/// Where the device configuration lives unless `--config-file` / `DEVID_CONFIG_FILE` says
/// otherwise.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/devid/devid.toml";

/// The `[anchor]` table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Anchor {
    /// The backend this device's key lives in. Unset: unanchored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<BackendKind>,
    /// TPM: the TCTI (`device:/dev/tpmrm0`, `swtpm:host=...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcti: Option<String>,
    /// PKCS#11: the module.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct FileText {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    anchor: Option<Anchor>,
}

/// The device configuration as read from its file.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    /// The file.
    pub path: PathBuf,
    /// Whether the file exists.
    pub exists: bool,
    /// The anchor, when the file sets a backend.
    pub anchor: Option<Anchor>,
    text: String,
}

impl DeviceConfig {
    /// No configuration at all (library callers that do not read one).
    pub fn unanchored() -> DeviceConfig {
        DeviceConfig {
            path: PathBuf::from(DEFAULT_CONFIG_FILE),
            exists: false,
            anchor: None,
            text: String::new(),
        }
    }

    /// Read and check `path`. A missing file is an unanchored device; a file that is not
    /// root-owned and protected, or not valid, is an error.
    pub fn load(path: &Path) -> Result<DeviceConfig> {
        match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(DeviceConfig {
                    path: path.to_path_buf(),
                    exists: false,
                    anchor: None,
                    text: String::new(),
                })
            }
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
            Ok(_) => {}
        }
        devid_keystore::fsutil::check_root_owned(path, true).with_context(|| {
            format!(
                "refusing the device configuration {}: it decides which keystore and module \
                 devid trusts, so it must be owned by root and writable only by root",
                path.display()
            )
        })?;
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Self::parse(path, text)
    }

    /// Check the text of the device configuration read from `path` (fuzzed by
    /// `fuzz/fuzz_targets/device_config.rs`).
    pub fn parse(path: &Path, text: String) -> Result<DeviceConfig> {
        let parsed: FileText = toml::from_str(&text).with_context(|| {
            format!(
                "{} is not a valid devid device configuration (expected an [anchor] table with \
                 backend, tcti, module)",
                path.display()
            )
        })?;
        let anchor = parsed.anchor.filter(|a| a.backend.is_some());
        if let Some(a) = &anchor {
            if a.backend == Some(BackendKind::Pkcs11) && a.module.is_none() {
                bail!(
                    "{}: [anchor] backend = \"pkcs11\" needs module = \"/path/to/module.so\"",
                    path.display()
                );
            }
        }
        Ok(DeviceConfig {
            path: path.to_path_buf(),
            exists: true,
            anchor,
            text,
        })
    }

    /// The anchored backend, if any.
    pub fn backend(&self) -> Option<BackendKind> {
        self.anchor.as_ref().and_then(|a| a.backend)
    }

    /// What `devid status` and the agent's log say about an unanchored device.
    pub fn unanchored_hint(&self) -> String {
        format!(
            "this device is unanchored: {} sets no [anchor] backend, so state.toml alone \
             chooses the keystore and an offline write to the state dir can swap it; run \
             `devid anchor` as root (writes the anchor into {})",
            self.path.display(),
            self.path.display()
        )
    }

    /// Write `anchor` into the file: appended to an existing file that has no `[anchor]`
    /// table (its comments are kept), or as a new file (mode 0644, directory 0755).
    pub fn write_anchor(&self, anchor: &Anchor) -> Result<()> {
        let table = toml::to_string(&FileText {
            anchor: Some(anchor.clone()),
        })
        .context("cannot encode the anchor")?;
        let has_table = self.text.lines().any(|l| l.trim() == "[anchor]");
        let text = if !self.exists {
            format!(
                "# devid device configuration: the trust anchor (see docs/device-vault.md).\n\
                 # Keep it root-owned and writable only by root.\n{table}"
            )
        } else if has_table {
            // An [anchor] table without a backend: rewrite it (comments are lost).
            let mut parsed: FileText = toml::from_str(&self.text)
                .with_context(|| format!("{} is not valid TOML", self.path.display()))?;
            parsed.anchor = Some(anchor.clone());
            toml::to_string(&parsed).context("cannot encode the device configuration")?
        } else {
            let sep = if self.text.ends_with('\n') || self.text.is_empty() {
                ""
            } else {
                "\n"
            };
            format!("{}{sep}{table}", self.text)
        };
        if let Some(dir) = self.path.parent() {
            if !dir.as_os_str().is_empty() && !dir.exists() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
            }
        }
        devid_keystore::fsutil::write_atomic(&self.path, text.as_bytes(), 0o644)
            .with_context(|| format!("cannot write the anchor into {}", self.path.display()))
    }
}

/// Refuse a state dir whose backend is not the anchored one.
pub fn check_backend(cfg: &DeviceConfig, state_backend: BackendKind, dir: &Path) -> Result<()> {
    match cfg.backend() {
        Some(anchored) if anchored != state_backend => bail!(
            "this device is anchored to the {anchored} backend ({}), but the state dir {} holds \
             a {state_backend} vault: the state dir was replaced or edited; nothing in it was \
             used. Restore the original state dir, or (to change backends deliberately) change \
             the anchor in {} and run `devid init` again",
            cfg.path.display(),
            dir.display(),
            cfg.path.display()
        ),
        _ => Ok(()),
    }
}

/// Check a PKCS#11 module before it is loaded: the file and every directory above it owned
/// by root and not writable by group or others, and not inside the state dir.
pub fn check_module(module: &Path, state_dir: &Path) -> Result<()> {
    if let (Ok(real), Ok(state)) = (
        std::fs::canonicalize(module),
        std::fs::canonicalize(state_dir),
    ) {
        if real.starts_with(&state) {
            bail!(
                "refusing to load the PKCS#11 module {}: it is inside the state dir {}, which \
                 is writable data, not code; install the module under /usr/lib and name it in \
                 the device configuration",
                module.display(),
                state_dir.display()
            );
        }
    }
    devid_keystore::fsutil::check_root_owned(module, false).with_context(|| {
        format!(
            "refusing to load the PKCS#11 module {}: a module runs with devid's rights, so it \
             and every directory above it must be owned by root and writable only by root",
            module.display()
        )
    })?;
    Ok(())
}
