//! Create, open, sign, seal, unseal on a real SoftHSM token; tampered blobs and wrong
//! configurations are refused with the right error.
//!
//! SoftHSM reads SOFTHSM2_CONF once per process, so every test of this binary shares ONE store
//! (made on first use, with all its tokens created before the module is first initialised).
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::OnceLock;

use devid_keystore::{verify, BackendKind, Keystore, KeystoreError, Protection};
use devid_keystore_pkcs11::{blob, Pkcs11Config, Pkcs11Keystore};
use devid_testkit::softhsm::SoftHsm;

const LABEL: &str = "devid-rt";
const OTHER_LABEL: &str = "devid-other";
/// Only the wrong-PIN test logs in here: a token this process is already logged in to answers
/// any C_Login with CKR_USER_ALREADY_LOGGED_IN, whatever the PIN.
const PIN_LABEL: &str = "devid-pin";

fn hsm() -> &'static SoftHsm {
    static HSM: OnceLock<SoftHsm> = OnceLock::new();
    HSM.get_or_init(|| {
        let hsm = SoftHsm::new(LABEL);
        hsm.init_token(OTHER_LABEL);
        hsm.init_token(PIN_LABEL);
        hsm.install_process_env();
        hsm
    })
}

fn create(label: &str) -> (Pkcs11Keystore, Pkcs11Config) {
    let hsm = hsm();
    Pkcs11Keystore::create(&hsm.module(), label, hsm.pin_file()).unwrap()
}

#[test]
fn create_open_sign_seal_unseal() {
    let (ks, cfg) = create(LABEL);
    assert_eq!(ks.kind(), BackendKind::Pkcs11);
    assert_eq!(
        ks.protection(),
        Protection::SoftwareToken,
        "SoftHSM reports itself as software"
    );
    assert!(ks.is_software_token());
    assert!(ks.is_software_token());
    assert_eq!(cfg.token_label, LABEL);
    assert_eq!(cfg.key_id.len(), 32, "16-byte CKA_ID in hex");
    assert!(!cfg.token_serial.is_empty());

    // The key reference is an RFC 7512 URI naming the token and the id, percent-encoded.
    let id = hex::decode(&cfg.key_id).unwrap();
    let id_pct: String = id.iter().map(|b| format!("%{b:02x}")).collect();
    assert_eq!(
        ks.key_ref(),
        format!("pkcs11:token=devid-rt;id={id_pct};type=private")
    );

    let sig = ks.sign(b"hello").unwrap();
    assert!(verify(&ks.public_key(), b"hello", &sig));
    assert!(!verify(&ks.public_key(), b"hellO", &sig));

    let blob = ks.seal(b"the vault data key").unwrap();
    assert!(blob.starts_with(blob::MAGIC));
    assert_eq!(
        blob.len(),
        blob::MAGIC.len() + blob::IV_LEN + b"the vault data key".len() + blob::TAG_LEN
    );
    assert_eq!(ks.unseal(&blob).unwrap().expose(), b"the vault data key");
    // A fresh IV each time.
    assert_ne!(ks.seal(b"the vault data key").unwrap(), blob);

    // The config survives a serde round trip and opens the same keys, in the same process
    // (module shared) and after the module was finalised (all keystores dropped).
    let json: Pkcs11Config = serde_json::from_str(&serde_json::to_string(&cfg).unwrap()).unwrap();
    assert_eq!(json, cfg);
    let reopened = Pkcs11Keystore::open(&cfg).unwrap();
    assert_eq!(reopened.public_key(), ks.public_key());
    assert_eq!(reopened.key_ref(), ks.key_ref());
    assert_eq!(
        reopened.unseal(&blob).unwrap().expose(),
        b"the vault data key"
    );
    let public = ks.public_key();
    drop(ks);
    drop(reopened);
    let reopened = Pkcs11Keystore::open(&json).unwrap();
    assert_eq!(reopened.public_key(), public);
    let sig = reopened.sign(b"after reopen").unwrap();
    assert!(verify(&public, b"after reopen", &sig));
    assert_eq!(
        reopened.unseal(&blob).unwrap().expose(),
        b"the vault data key"
    );

    // Debug names the token, never the PIN.
    let dbg = format!("{reopened:?}");
    assert!(dbg.contains(&cfg.token_serial));
    assert!(!dbg.contains(devid_testkit::softhsm::USER_PIN));

    // Shared across threads: concurrent signatures all verify.
    let ks = std::sync::Arc::new(reopened);
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let ks = ks.clone();
            std::thread::spawn(move || {
                let msg = format!("thread {i}");
                let sig = ks.sign(msg.as_bytes()).unwrap();
                verify(&ks.public_key(), msg.as_bytes(), &sig)
            })
        })
        .collect();
    for h in handles {
        assert!(h.join().unwrap());
    }
}

#[test]
fn tampered_blobs_are_refused() {
    let (ks, _cfg) = create(LABEL);
    let secret = b"0123456789abcdef0123456789abcdef";
    let blob = ks.seal(secret).unwrap();

    // Every single-bit flip, anywhere (header, IV, ciphertext, tag), is an error.
    for i in 0..blob.len() {
        for bit in [0x01u8, 0x80] {
            let mut bad = blob.clone();
            bad[i] ^= bit;
            match ks.unseal(&bad) {
                Ok(_) => panic!("flipped byte {i} (mask {bit:#x}) still unsealed"),
                Err(KeystoreError::InvalidBlob { .. }) => {}
                Err(other) => panic!("flipped byte {i}: unexpected error {other}"),
            }
        }
    }
    // Truncated, extended, empty, foreign.
    for bad in [
        &blob[..blob.len() - 1],
        &blob[..blob::MAGIC.len() + blob::IV_LEN + blob::TAG_LEN - 1],
        &[][..],
        b"DEVIDSS1secret".as_slice(),
    ] {
        assert!(
            matches!(ks.unseal(bad), Err(KeystoreError::InvalidBlob { .. })),
            "{} bytes accepted",
            bad.len()
        );
    }
    let mut longer = blob.clone();
    longer.push(0);
    assert!(matches!(
        ks.unseal(&longer),
        Err(KeystoreError::InvalidBlob { .. })
    ));
    // The untouched blob still works: the failures did not break the session.
    assert_eq!(ks.unseal(&blob).unwrap().expose(), secret);

    // A blob sealed by another token's keystore does not unseal here, and vice versa.
    let (other, _) = create(OTHER_LABEL);
    let foreign = other.seal(secret).unwrap();
    let err = ks.unseal(&foreign).unwrap_err();
    assert!(matches!(err, KeystoreError::InvalidBlob { .. }), "{err}");
    assert!(other.unseal(&blob).is_err());
    // The error says what happened without echoing the blob or the secret.
    let msg = err.to_string();
    assert!(
        msg.contains("another token") || msg.contains("modified"),
        "{msg}"
    );
    assert!(!msg.contains("0123456789abcdef"));
}

#[test]
fn wrong_configurations_are_refused_clearly() {
    let hsm = hsm();

    // Missing module.
    let err = Pkcs11Keystore::create(
        Path::new("/nonexistent/libpkcs11.so"),
        LABEL,
        hsm.pin_file(),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            KeystoreError::NoDevice {
                what: "PKCS#11 token",
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("/nonexistent/libpkcs11.so"),
        "{err}"
    );

    // No token with this label.
    let err = Pkcs11Keystore::create(&hsm.module(), "no-such-token", hsm.pin_file()).unwrap_err();
    assert!(matches!(err, KeystoreError::NoDevice { .. }), "{err}");
    assert!(err.to_string().contains("no-such-token"), "{err}");

    // Missing PIN file.
    let dir = tempfile::tempdir().unwrap();
    let err =
        Pkcs11Keystore::create(&hsm.module(), LABEL, &dir.path().join("missing.pin")).unwrap_err();
    assert!(matches!(err, KeystoreError::Io { .. }), "{err}");

    let (ks, cfg) = create(LABEL);
    drop(ks);

    // A config whose serial does not match the token carrying the label.
    let mut other_serial = cfg.clone();
    other_serial.token_serial = "0000000000000000".into();
    let err = Pkcs11Keystore::open(&other_serial).unwrap_err();
    match &err {
        KeystoreError::OtherDevice { what, detail } => {
            assert_eq!(*what, "PKCS#11 token");
            assert!(detail.contains(&cfg.token_serial), "{detail}");
            assert!(detail.contains("0000000000000000"), "{detail}");
        }
        other => panic!("expected OtherDevice, got {other}"),
    }

    // The right token, but no objects with this id.
    let mut other_id = cfg.clone();
    other_id.key_id = "00".repeat(16);
    let err = Pkcs11Keystore::open(&other_id).unwrap_err();
    assert!(matches!(err, KeystoreError::OtherDevice { .. }), "{err}");

    // Not hex.
    let mut bad_id = cfg.clone();
    bad_id.key_id = "zz".into();
    assert!(matches!(
        Pkcs11Keystore::open(&bad_id),
        Err(KeystoreError::Config(_))
    ));
}

#[test]
fn wrong_pin_is_refused_without_echoing_it() {
    let hsm = hsm();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pin = dir.join("wrong.pin");
    std::fs::write(&pin, "97531\n").unwrap();
    let err = match Pkcs11Keystore::create(&hsm.module(), PIN_LABEL, &pin) {
        Ok(_) => panic!("a wrong PIN was accepted"),
        Err(e) => e,
    };
    let msg = err.to_string();
    assert!(msg.contains("login"), "{msg}");
    assert!(msg.contains("wrong.pin"), "{msg}");
    assert!(!msg.contains("97531"), "PIN leaked into the error: {msg}");

    let empty = dir.join("empty.pin");
    std::fs::write(&empty, "\n").unwrap();
    assert!(matches!(
        Pkcs11Keystore::create(&hsm.module(), PIN_LABEL, &empty),
        Err(KeystoreError::Config(_))
    ));
}
