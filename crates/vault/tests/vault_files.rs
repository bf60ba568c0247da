//! What is on flash and in debug output: no secret value, atomic 0600 files.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use devid_keystore::soft::SoftKeystore;
use devid_keystore::{Keystore, SecretBytes};
use devid_vault::{Contents, Vault, BUNDLE_FILE, DATA_KEY_FILE};

const SECRET_A: &[u8] = b"s3cr3t-wifi-passphrase-value";
const SECRET_B: &[u8] = b"api-key-9f8e7d6c5b4a";
const DEVICE_ID: &str = "flash-dump-device-0001";

fn setup(dir: &Path) -> (Vault, Contents) {
    let ks: Arc<dyn Keystore> = Arc::new(SoftKeystore::create(dir).unwrap());
    let v = Vault::create(dir, ks).unwrap();
    let mut c = Contents {
        device_id: Some(DEVICE_ID.into()),
        server_url: Some("https://devid.example:8443".into()),
        ..Contents::default()
    };
    c.put_secret("wifi", SecretBytes::from_slice(SECRET_A))
        .unwrap();
    c.put_secret("api", SecretBytes::from_slice(SECRET_B))
        .unwrap();
    v.store(&c).unwrap();
    (v, c)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn flash_dump_shows_no_secret_and_no_device_id() {
    let d = tempfile::tempdir().unwrap();
    let (v, c) = setup(d.path());
    assert_eq!(v.load().unwrap(), c);
    let needles: Vec<Vec<u8>> = [SECRET_A, SECRET_B, DEVICE_ID.as_bytes()]
        .iter()
        .flat_map(|s| [s.to_vec(), hex::encode(s).into_bytes()])
        .collect();
    let bundle = std::fs::read(d.path().join(BUNDLE_FILE)).unwrap();
    for n in &needles {
        assert!(
            !contains(&bundle, n),
            "bundle.sealed contains a known secret string"
        );
    }
    // Also the secret names' neighbour, the server URL, is not readable.
    assert!(!contains(&bundle, b"devid.example"));
    // The test can fail: the same scan finds the needle in a plain copy.
    let mut plain = bundle.clone();
    plain.extend_from_slice(SECRET_A);
    assert!(contains(&plain, SECRET_A));
    // No other file of the state dir holds them either.
    for entry in std::fs::read_dir(d.path()).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        for n in &needles {
            assert!(!contains(&bytes, n));
        }
    }
}

#[test]
fn writes_are_atomic_and_private() {
    let d = tempfile::tempdir().unwrap();
    let (v, c) = setup(d.path());
    for _ in 0..3 {
        v.store(&c).unwrap();
    }
    let mut names: Vec<String> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    // No temp file is left behind; `.lock` is the advisory lock of read-modify-writes.
    assert_eq!(
        names,
        [
            devid_keystore::fsutil::LOCK_FILE,
            BUNDLE_FILE,
            DATA_KEY_FILE,
            "soft-device-key.pem"
        ]
    );
    for f in [BUNDLE_FILE, DATA_KEY_FILE] {
        let mode = std::fs::metadata(d.path().join(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }

    // A half-written temp file left by a power loss does not affect the bundle.
    let stale = d.path().join(format!(".{BUNDLE_FILE}.tmp.999999"));
    std::fs::write(&stale, b"DEVIDVB1 partial").unwrap();
    assert_eq!(v.load().unwrap(), c);
}

#[test]
fn new_state_dir_is_private() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("state");
    std::fs::create_dir(&dir).unwrap();
    let ks: Arc<dyn Keystore> = Arc::new(SoftKeystore::create(&dir).unwrap());
    let sub = d.path().join("nested/vault");
    Vault::create(&sub, ks).unwrap();
    let mode = std::fs::metadata(&sub).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
}

#[test]
fn debug_prints_no_secret_value() {
    let d = tempfile::tempdir().unwrap();
    let (v, c) = setup(d.path());
    let shown = format!("{c:?} {c:#?} {v:?} {v:#?} {:?}", v.load().unwrap());
    for s in [SECRET_A, SECRET_B] {
        let s = std::str::from_utf8(s).unwrap();
        assert!(!shown.contains(s), "{shown}");
        assert!(!shown.contains(&hex::encode(s)), "{shown}");
    }
    // Names and non-secret fields are shown, so the test sees real output.
    assert!(
        shown.contains("wifi") && shown.contains(DEVICE_ID),
        "{shown}"
    );
    assert!(shown.contains("redacted"), "{shown}");
}
