//! THREATS.md T3/T6: the state dir (config + sealed blob) copied to a device whose token has
//! the same label is refused, because the token serial was pinned at init, and the old blob
//! cannot be unsealed there: the wrap key never left the first token.
#![allow(clippy::unwrap_used)]

use devid_keystore::{verify, Keystore, KeystoreError};
use devid_keystore_pkcs11::Pkcs11Keystore;
use devid_testkit::softhsm::SoftHsm;

const LABEL: &str = "devid-clone";

#[test]
fn other_token_with_same_label_is_refused() {
    let hsm = SoftHsm::new(LABEL);
    hsm.install_process_env();
    let secret = b"data key of the first device";

    let (ks, cfg) = Pkcs11Keystore::create(&hsm.module(), LABEL, hsm.pin_file()).unwrap();
    let old_public = ks.public_key();
    let blob = ks.seal(secret).unwrap();
    drop(ks); // last keystore: the module is finalised and rescans tokens on the next open

    // A second token with the same label appears next to the first: the config still finds
    // its own token by serial, and a new create refuses to guess between the two.
    let new_serial = hsm.init_token(LABEL);
    assert_ne!(
        new_serial, cfg.token_serial,
        "a fresh token has a fresh serial"
    );
    let ks = Pkcs11Keystore::open(&cfg).unwrap();
    assert_eq!(ks.public_key(), old_public);
    assert_eq!(ks.unseal(&blob).unwrap().expose(), secret);
    drop(ks);
    let err = Pkcs11Keystore::create(&hsm.module(), LABEL, hsm.pin_file()).unwrap_err();
    assert!(matches!(err, KeystoreError::Config(_)), "{err}");

    // The first token is gone: only the fresh token carries the label now (a state dir copied
    // to another device, or the original token cleared and re-initialised).
    hsm.delete_token(&cfg.token_serial);
    assert_eq!(hsm.serials(), vec![new_serial.clone()]);
    let err = Pkcs11Keystore::open(&cfg).unwrap_err();
    match &err {
        KeystoreError::OtherDevice { what, detail } => {
            assert_eq!(*what, "PKCS#11 token");
            assert_eq!(
                detail,
                &format!(
                    "token serial {new_serial}, vault expects {}",
                    cfg.token_serial
                )
            );
        }
        other => panic!("expected OtherDevice, got {other}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("re-initialise and re-enrol"), "{msg}");

    // Editing the serial in the copied config does not help: the keys are not on that token.
    let mut forged = cfg.clone();
    forged.token_serial = new_serial.clone();
    let err = Pkcs11Keystore::open(&forged).unwrap_err();
    assert!(matches!(err, KeystoreError::OtherDevice { .. }), "{err}");
    assert!(err.to_string().contains(&cfg.key_id), "{err}");

    // A new identity on the fresh token is a different key, and it cannot unseal the old blob.
    let (fresh, fresh_cfg) = Pkcs11Keystore::create(&hsm.module(), LABEL, hsm.pin_file()).unwrap();
    assert_eq!(fresh_cfg.token_serial, new_serial);
    assert_ne!(fresh.public_key(), old_public);
    let err = fresh.unseal(&blob).unwrap_err();
    assert!(matches!(err, KeystoreError::InvalidBlob { .. }), "{err}");
    let sig = fresh.sign(b"m").unwrap();
    assert!(!verify(&old_public, b"m", &sig));
}
