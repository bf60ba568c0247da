//! Helpers shared by the enrolment tests (`enroll_e2e.rs`, `enroll_postgres.rs`).
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;

use devid_enroll::EnrollError;
use devid_keystore::soft::SoftKeystore;
use devid_keystore::Keystore;

use crate::common::Server;

/// A fresh soft keystore in `dir`.
pub fn soft_key(dir: &Path) -> Arc<dyn Keystore> {
    std::fs::create_dir_all(dir).unwrap();
    Arc::new(SoftKeystore::create(dir).unwrap())
}

/// The keystore's public key as SubjectPublicKeyInfo DER.
pub fn spki(ks: &dyn Keystore) -> Vec<u8> {
    devid_keystore::spki_der(&ks.public_key())
}

/// The status and code of a server refusal; panics on any other error.
pub fn server_error(e: EnrollError) -> (u16, String) {
    match e {
        EnrollError::Server { status, code, .. } => (status, code),
        other => panic!("expected a server refusal, got {other}"),
    }
}

/// The newest audit row, which must be a refusal of `action` with `code`, from loopback.
pub fn assert_refused(s: &Server, action: &str, code: &str) {
    let audit = s.audit();
    let last = audit.last().unwrap();
    assert_eq!(
        (
            last.action.as_str(),
            last.outcome.as_str(),
            last.detail.as_str()
        ),
        (action, "refused", code),
        "{last:?}"
    );
    assert!(last.source.starts_with("127.0.0.1:"), "{last:?}");
}
