//! The attestation settings in force ([`AttestPolicy`]), built from the config by the
//! composition root and read by the handlers (kept apart from the handlers, which need
//! [`crate::state::HttpState`], so that the state does not import them).

use std::sync::Arc;

use devid_attest::ek::EkRoots;
use devid_attest::AttestError;
use devid_server_config::AttestationMode;

/// The attestation settings in force: the mode and the EK trust bundle.
#[derive(Debug, Clone, Default)]
pub struct AttestPolicy {
    /// `attestation.mode`.
    pub mode: AttestationMode,
    /// The TPM makers' roots (`attestation.ek_roots`); empty: only allowlisted EKs.
    pub roots: Arc<EkRoots>,
}

impl AttestPolicy {
    /// From the config: reads every PEM file of `attestation.ek_roots`.
    pub fn from_config(
        config: &devid_server_config::ServerConfig,
    ) -> Result<AttestPolicy, AttestError> {
        let roots = match config.ek_roots_dir() {
            Some(dir) => EkRoots::from_pem_dir(&dir)?,
            None => EkRoots::default(),
        };
        Ok(AttestPolicy {
            mode: config.attestation.mode,
            roots: Arc::new(roots),
        })
    }
}
