//! THREATS.md T4: every changed bit, truncation, extension and foreign bundle is refused,
//! and nothing from a refused bundle is returned.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;

use devid_keystore::soft::SoftKeystore;
use devid_keystore::{Keystore, SecretBytes};
use devid_vault::{Contents, Vault, VaultError, BUNDLE_FILE, DATA_KEY_FILE, HEADER_LEN};

fn vault_with_secrets(dir: &Path) -> (Vault, Contents) {
    let ks: Arc<dyn Keystore> = Arc::new(SoftKeystore::create(dir).unwrap());
    let v = Vault::create(dir, ks).unwrap();
    let mut c = Contents {
        server_url: Some("https://devid.example:8443".into()),
        ca_pin: Some("ab".repeat(32)),
        device_id: Some("dev-7".into()),
        ..Contents::default()
    };
    c.put_secret("one", SecretBytes::from_slice(b"first secret"))
        .unwrap();
    c.put_secret("two", SecretBytes::from_slice(b"second secret"))
        .unwrap();
    v.store(&c).unwrap();
    (v, c)
}

fn assert_refused(v: &Vault, what: &str) {
    match v.load() {
        Err(VaultError::Tampered) | Err(VaultError::Format(_)) => {}
        Err(other) => panic!("{what}: unexpected error kind {other:?}"),
        Ok(_) => panic!("{what}: a modified bundle was accepted"),
    }
}

#[test]
fn every_bit_flip_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let (v, c) = vault_with_secrets(d.path());
    let path = d.path().join(BUNDLE_FILE);
    let original = std::fs::read(&path).unwrap();
    assert!(original.len() > HEADER_LEN + 16);

    let mut tampered = 0;
    let mut format = 0;
    for offset in 0..original.len() {
        for bit in 0..8 {
            let mut bytes = original.clone();
            bytes[offset] ^= 1 << bit;
            std::fs::write(&path, &bytes).unwrap();
            match v.load() {
                Err(VaultError::Tampered) => tampered += 1,
                Err(VaultError::Format(_)) => format += 1,
                Err(other) => panic!("offset {offset} bit {bit}: unexpected {other:?}"),
                Ok(_) => panic!("offset {offset} bit {bit}: modified bundle accepted"),
            }
        }
    }
    // Header fields (magic, version, alg) give Format; binding, nonce, ciphertext and tag
    // give Tampered. Both kinds must have been seen, so the loop really covered the file.
    assert_eq!(format, 11 * 8);
    assert_eq!(tampered, (original.len() - 11) * 8);

    // The error message the user sees.
    let mut bytes = original.clone();
    bytes[HEADER_LEN + 3] ^= 0x80;
    std::fs::write(&path, &bytes).unwrap();
    let msg = v.load().unwrap_err().to_string();
    assert_eq!(
        msg,
        "bundle failed authentication: the state dir was modified (or copied from another \
         device); nothing in it was used"
    );

    // The original still loads: the refusals were about the bytes, not a broken vault.
    std::fs::write(&path, &original).unwrap();
    assert_eq!(v.load().unwrap(), c);
}

#[test]
fn truncation_and_appended_bytes_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let (v, c) = vault_with_secrets(d.path());
    let path = d.path().join(BUNDLE_FILE);
    let original = std::fs::read(&path).unwrap();
    for len in 0..original.len() {
        std::fs::write(&path, &original[..len]).unwrap();
        assert_refused(&v, &format!("truncated to {len}"));
    }
    for extra in [
        &[0u8][..],
        &[0xff],
        &[0; 16],
        b"{\"server_url\":\"https://evil\"}",
    ] {
        let mut bytes = original.clone();
        bytes.extend_from_slice(extra);
        std::fs::write(&path, &bytes).unwrap();
        assert_refused(&v, &format!("{} bytes appended", extra.len()));
    }
    // An empty file and a huge one.
    std::fs::write(&path, b"").unwrap();
    assert_refused(&v, "empty");
    let mut huge = original.clone();
    huge.resize(devid_vault::MAX_BUNDLE_SIZE + 1, 0);
    std::fs::write(&path, &huge).unwrap();
    let err = v.load().unwrap_err();
    assert!(matches!(err, VaultError::Format(_)), "{err:?}");
    assert!(err.to_string().contains("larger than"), "{err}");

    std::fs::write(&path, &original).unwrap();
    assert_eq!(v.load().unwrap(), c);
}

#[test]
fn bundle_of_another_data_key_is_refused() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let (va, ca) = vault_with_secrets(a.path());
    let (vb, _) = vault_with_secrets(b.path());

    // B's bundle copied over A's: another data key.
    std::fs::copy(b.path().join(BUNDLE_FILE), a.path().join(BUNDLE_FILE)).unwrap();
    assert!(matches!(va.load(), Err(VaultError::Tampered)));

    // The pure function agrees: A's bundle under B's key, or under any other key.
    std::fs::copy(b.path().join(BUNDLE_FILE), a.path().join(BUNDLE_FILE)).unwrap();
    let b_bytes = std::fs::read(b.path().join(BUNDLE_FILE)).unwrap();
    assert!(matches!(
        devid_vault::open_bundle(&[0x55; 32], &b_bytes),
        Err(VaultError::Tampered)
    ));

    // Mixed files of two devices: A's bundle next to B's sealed data key.
    let mixed = tempfile::tempdir().unwrap();
    for f in ["soft-device-key.pem", DATA_KEY_FILE] {
        std::fs::copy(b.path().join(f), mixed.path().join(f)).unwrap();
    }
    vb.store(&Contents::default()).unwrap();
    let a_bundle = {
        // Restore A's own bundle first so it is a valid bundle of A.
        va.store(&ca).unwrap();
        std::fs::read(a.path().join(BUNDLE_FILE)).unwrap()
    };
    std::fs::write(mixed.path().join(BUNDLE_FILE), &a_bundle).unwrap();
    let ks: Arc<dyn Keystore> = Arc::new(SoftKeystore::open(mixed.path()).unwrap());
    let vm = Vault::open(mixed.path(), ks).unwrap();
    assert!(matches!(vm.load(), Err(VaultError::Tampered)));
    assert_eq!(va.load().unwrap(), ca);
}
