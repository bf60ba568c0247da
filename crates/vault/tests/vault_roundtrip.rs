//! Create, store, reopen, load; the errors of `create` and `open`.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use devid_keystore::soft::SoftKeystore;
use devid_keystore::{Keystore, KeystoreError, SecretBytes};
use devid_vault::{Contents, Vault, VaultError, BUNDLE_FILE, DATA_KEY_FILE};

fn sample() -> Contents {
    let mut c = Contents {
        server_url: Some("https://devid.example:8443".into()),
        mqtt_url: Some("mqtts://devid.example:8883".into()),
        ca_pin: Some("0f".repeat(32)),
        ca_cert_pem: Some("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into()),
        device_id: Some("sensor-0042".into()),
        cert_chain_pem: Some(
            "-----BEGIN CERTIFICATE-----\nMIIC\n-----END CERTIFICATE-----\n".into(),
        ),
        ..Contents::default()
    };
    c.put_secret(
        "wifi.psk",
        SecretBytes::from_slice(b"correct horse battery"),
    )
    .unwrap();
    c.put_secret(
        "api_key-2",
        SecretBytes::from_slice(&[0, 1, 2, 255, 0x22, b'\\']),
    )
    .unwrap();
    c
}

#[test]
fn create_store_reopen_load_equals() {
    let d = tempfile::tempdir().unwrap();
    let ks: Arc<dyn Keystore> = Arc::new(SoftKeystore::create(d.path()).unwrap());
    let v = Vault::create(d.path(), ks).unwrap();
    assert_eq!(v.dir(), d.path());
    assert_eq!(
        v.load().unwrap(),
        Contents::default(),
        "a new vault is empty"
    );
    let c = sample();
    v.store(&c).unwrap();
    assert_eq!(v.load().unwrap(), c);
    drop(v);

    let ks: Arc<dyn Keystore> = Arc::new(SoftKeystore::open(d.path()).unwrap());
    let v = Vault::open(d.path(), ks).unwrap();
    let loaded = v.load().unwrap();
    assert_eq!(loaded, c);
    assert_eq!(loaded.secrets.len(), 2);
    assert_eq!(
        loaded.secrets["wifi.psk"].expose(),
        b"correct horse battery"
    );

    // Overwrite again: the new contents replace the old.
    let mut c2 = loaded.clone();
    c2.secrets.remove("wifi.psk");
    c2.server_url = None;
    v.store(&c2).unwrap();
    assert_eq!(v.load().unwrap(), c2);
    assert_ne!(v.load().unwrap(), c);
}

#[test]
fn create_refuses_an_existing_vault() {
    let d = tempfile::tempdir().unwrap();
    let ks: Arc<dyn Keystore> = Arc::new(SoftKeystore::create(d.path()).unwrap());
    let v = Vault::create(d.path(), ks.clone()).unwrap();
    v.store(&sample()).unwrap();
    let err = Vault::create(d.path(), ks.clone()).unwrap_err();
    assert!(matches!(err, VaultError::AlreadyExists(_)), "{err:?}");
    // The old vault is untouched.
    assert_eq!(Vault::open(d.path(), ks).unwrap().load().unwrap(), sample());
}

#[test]
fn open_without_vault_is_not_initialised() {
    let d = tempfile::tempdir().unwrap();
    let ks: Arc<dyn Keystore> = Arc::new(SoftKeystore::create(d.path()).unwrap());
    let err = Vault::open(d.path(), ks.clone()).unwrap_err();
    assert!(matches!(err, VaultError::NotInitialised(_)), "{err:?}");
    assert!(err.to_string().contains("devid init"), "{err}");

    // An interrupted create (data key written, bundle not) is not a vault, and create
    // recovers from it.
    Vault::create(d.path(), ks.clone()).unwrap();
    std::fs::remove_file(d.path().join(BUNDLE_FILE)).unwrap();
    let err = Vault::open(d.path(), ks.clone()).unwrap_err();
    assert!(matches!(err, VaultError::NotInitialised(_)), "{err:?}");
    let v = Vault::create(d.path(), ks).unwrap();
    assert_eq!(v.load().unwrap(), Contents::default());
}

#[test]
fn keystore_errors_pass_through_unchanged() {
    let d = tempfile::tempdir().unwrap();
    let ks: Arc<dyn Keystore> = Arc::new(SoftKeystore::create(d.path()).unwrap());
    Vault::create(d.path(), ks.clone()).unwrap();
    let key_path = d.path().join(DATA_KEY_FILE);
    let mut blob = std::fs::read(&key_path).unwrap();
    blob[0] ^= 0x01;
    std::fs::write(&key_path, &blob).unwrap();

    let expected = ks.unseal(&blob).unwrap_err().to_string();
    let err = Vault::open(d.path(), ks).unwrap_err();
    assert!(
        matches!(err, VaultError::Keystore(KeystoreError::InvalidBlob { .. })),
        "{err:?}"
    );
    assert_eq!(err.to_string(), expected);
}

#[test]
fn invalid_secret_names_are_refused_on_store() {
    use devid_vault::validate_secret_name;
    for ok in ["a", "wifi.psk", "API_KEY-2", &"x".repeat(64)] {
        validate_secret_name(ok).unwrap();
    }
    for bad in [
        "",
        "has space",
        "slash/",
        "ünïcode",
        "nul\0",
        &"x".repeat(65),
        "..",
    ] {
        if bad == ".." {
            // Dots are allowed: names are map keys, never paths.
            validate_secret_name(bad).unwrap();
            continue;
        }
        let err = validate_secret_name(bad).unwrap_err();
        assert!(matches!(err, VaultError::InvalidSecretName(_)), "{err:?}");
        if !bad.is_empty() {
            assert!(
                !err.to_string().contains(bad),
                "the name is not echoed: {err}"
            );
        }
    }

    let d = tempfile::tempdir().unwrap();
    let ks: Arc<dyn Keystore> = Arc::new(SoftKeystore::create(d.path()).unwrap());
    let v = Vault::create(d.path(), ks).unwrap();
    let mut c = sample();
    c.secrets
        .insert("bad name".into(), SecretBytes::from_slice(b"x"));
    let err = v.store(&c).unwrap_err();
    assert!(matches!(err, VaultError::InvalidSecretName(_)), "{err:?}");
    assert_eq!(
        v.load().unwrap(),
        Contents::default(),
        "nothing was written"
    );
    assert!(matches!(
        Contents::default().put_secret("a/b", SecretBytes::from_slice(b"x")),
        Err(VaultError::InvalidSecretName(_))
    ));
}

#[test]
fn vault_is_shareable_across_threads() {
    let d = tempfile::tempdir().unwrap();
    let ks: Arc<dyn Keystore> = Arc::new(SoftKeystore::create(d.path()).unwrap());
    let v = Arc::new(Vault::create(d.path(), ks).unwrap());
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let v = v.clone();
            std::thread::spawn(move || {
                for j in 0..10 {
                    let mut c = Contents::default();
                    c.put_secret(&format!("t{i}"), SecretBytes::from_slice(&[j]))
                        .unwrap();
                    v.store(&c).unwrap();
                    v.load().unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let last = v.load().unwrap();
    assert_eq!(last.secrets.len(), 1);
    assert_eq!(last.secrets.values().next().unwrap().expose(), &[9]);
}
