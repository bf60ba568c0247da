//! The soft backend: works everywhere, and its weaker promise is stated and asserted.

#![allow(clippy::unwrap_used)]

mod common;

use common::{dump, Devid};

#[test]
fn soft_round_trip() {
    let d = Devid::new();
    let r = d.run(&["init", "--backend", "soft"]).ok();
    assert!(r.text().contains("software only"), "{}", r.text());
    d.round_trip();
    let status = d.run(&["status"]).ok().text();
    assert!(status.contains("software only"), "{status}");
    assert!(status.contains("flash dump"), "{status}");
}

/// THREATS.md T2/T3 for the soft backend, as documented: the bundle is encrypted, but its key
/// is on the same flash, so a dump of the state dir alone decrypts it.
#[test]
fn soft_backend_flash_dump_is_not_protected_as_documented() {
    let d = Devid::new();
    d.run(&["init", "--backend", "soft"]).ok();
    d.run_stdin(&["secret", "put", "s"], b"SOFT-SECRET-XYZ")
        .ok();
    // The secret itself is not in clear in any file...
    assert!(!devid_testkit::contains(
        &dump(&d.state),
        b"SOFT-SECRET-XYZ"
    ));
    // ...but the data key is, and with it an attacker decrypts the dump offline.
    let sealed = std::fs::read(d.state.join(devid_vault::DATA_KEY_FILE)).unwrap();
    let data_key = &sealed[8..];
    assert_eq!(data_key.len(), 32);
    let bundle = std::fs::read(d.state.join(devid_vault::BUNDLE_FILE)).unwrap();
    let stolen = devid_vault::open_bundle(data_key, &bundle).unwrap();
    assert_eq!(stolen.secrets["s"].expose(), b"SOFT-SECRET-XYZ");

    // A copy of the state dir works elsewhere (T3, stated weakness).
    let copy = tempfile::tempdir().unwrap();
    devid_testkit::copy_tree(&d.state, copy.path());
    let clone = Devid::at(copy.path());
    assert_eq!(
        clone.run(&["secret", "get", "s"]).ok().stdout,
        b"SOFT-SECRET-XYZ"
    );
}

#[test]
fn init_twice_and_missing_state_are_clear_errors() {
    let d = Devid::new();
    let r = d.run(&["status"]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("no devid vault in"), "{}", r.stderr);
    d.run(&["init", "--backend", "soft"]).ok();
    let r = d.run(&["init", "--backend", "soft"]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("already holds a devid vault"),
        "{}",
        r.stderr
    );
    let r = d.run_stdin(&["secret", "put", "bad/name"], b"x");
    assert_ne!(r.code, 0);
    let r = d.run(&["config", "set", "ca-pin", "nothex"]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("64 hex digits"), "{}", r.stderr);
}
