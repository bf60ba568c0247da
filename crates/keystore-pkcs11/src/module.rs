//! One initialised PKCS#11 context per module per process.
//!
//! A PKCS#11 module is initialised once per process (`C_Initialize`); a second initialisation
//! fails with `CKR_CRYPTOKI_ALREADY_INITIALIZED` and a `C_Finalize` ends every session of the
//! process. Many modules (SoftHSM among them) also read their configuration and scan their
//! tokens only at `C_Initialize`. So every keystore takes a [`ModuleLease`] from a
//! process-wide registry: the first lease loads and initialises the module, the last one to be
//! dropped finalises it, and a later lease initialises it again (and sees tokens added in the
//! meantime). If something else in the process initialised the module first, we use it and
//! leave finalising to its owner.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error, RvError};

struct Entry {
    ctx: Pkcs11,
    leases: usize,
    /// We called `C_Initialize`, so we call `C_Finalize`.
    owned: bool,
}

fn registry() -> MutexGuard<'static, HashMap<PathBuf, Entry>> {
    static REGISTRY: OnceLock<Mutex<HashMap<PathBuf, Entry>>> = OnceLock::new();
    REGISTRY
        .get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        // The map stays consistent even if a holder panicked: every update is one statement.
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A share in the process-wide initialised context of one module.
pub(crate) struct ModuleLease {
    key: PathBuf,
    ctx: Pkcs11,
}

impl ModuleLease {
    /// Load and initialise `module`, or share the context already initialised for it.
    pub(crate) fn acquire(module: &Path) -> Result<ModuleLease, Error> {
        let key = std::fs::canonicalize(module).unwrap_or_else(|_| module.to_path_buf());
        let mut reg = registry();
        if let Some(entry) = reg.get_mut(&key) {
            entry.leases += 1;
            return Ok(ModuleLease {
                ctx: entry.ctx.clone(),
                key,
            });
        }
        let ctx = Pkcs11::new(&key)?;
        let owned = match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) => true,
            Err(Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {
                tracing::debug!(module = %key.display(), "module already initialised in this process");
                false
            }
            Err(e) => return Err(e),
        };
        tracing::debug!(module = %key.display(), "module initialised");
        reg.insert(
            key.clone(),
            Entry {
                ctx: ctx.clone(),
                leases: 1,
                owned,
            },
        );
        Ok(ModuleLease { key, ctx })
    }

    /// The initialised context.
    pub(crate) fn ctx(&self) -> &Pkcs11 {
        &self.ctx
    }
}

impl Drop for ModuleLease {
    fn drop(&mut self) {
        let mut reg = registry();
        let last = match reg.get_mut(&self.key) {
            Some(entry) => {
                entry.leases = entry.leases.saturating_sub(1);
                entry.leases == 0
            }
            None => false,
        };
        if last {
            if let Some(entry) = reg.remove(&self.key) {
                if entry.owned {
                    match entry.ctx.finalize() {
                        Ok(()) => tracing::debug!(module = %self.key.display(), "module finalised"),
                        Err(e) => tracing::warn!(
                            module = %self.key.display(),
                            error = %e,
                            "finalising the PKCS#11 module failed"
                        ),
                    }
                }
            }
        }
    }
}
