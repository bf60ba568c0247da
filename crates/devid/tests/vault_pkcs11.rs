//! `devid` on a real SoftHSMv2 token: round trip, flash dump (T2), clone to a fresh token
//! (T3/T6).

#![allow(clippy::unwrap_used)]

mod common;

use common::{assert_not_in_dump, Devid};
use devid_testkit::softhsm::SoftHsm;

fn init(hsm: &SoftHsm) -> Devid {
    let d = Devid::new().envs(hsm.env());
    let r = d
        .run(&[
            "init",
            "--backend",
            "pkcs11",
            "--module",
            &hsm.module().display().to_string(),
            "--token",
            hsm.label(),
            "--pin-file",
            &hsm.pin_file().display().to_string(),
        ])
        .ok();
    assert!(
        r.text().contains("initialised a pkcs11 vault"),
        "{}",
        r.text()
    );
    d
}

#[test]
fn pkcs11_round_trip_and_flash_dump() {
    let hsm = SoftHsm::new("devid-rt");
    let d = init(&hsm);
    d.round_trip();
    d.run_stdin(&["secret", "put", "dump"], b"PKCS11-FLASH-SECRET")
        .ok();
    let status: serde_json::Value =
        serde_json::from_slice(&d.run(&["status", "--json"]).ok().stdout).unwrap();
    // SoftHSM is honest about being a software token.
    assert_eq!(status["protection"], "software-token");
    assert!(status["protection_summary"]
        .as_str()
        .unwrap()
        .contains("PIN file"));
    assert!(status["key_ref"]
        .as_str()
        .unwrap()
        .starts_with("pkcs11:token=devid-rt"));
    assert_not_in_dump(
        &d.state,
        &[b"PKCS11-FLASH-SECRET", b"correct horse", b"1234\n"],
    );
}

#[test]
fn state_copied_to_a_fresh_token_is_refused() {
    let hsm_a = SoftHsm::new("devid-clone");
    let a = init(&hsm_a);
    a.run_stdin(&["secret", "put", "s"], b"clone-secret").ok();

    // Another device: its own SoftHSM store, a token with the same label (new serial, no keys).
    let hsm_b = SoftHsm::new("devid-clone");
    let copy = tempfile::tempdir().unwrap();
    devid_testkit::copy_tree(&a.state, copy.path());
    // The copied state names A's PIN file; point the pin at B's equal PIN file path content.
    let b = Devid::at(copy.path()).envs(hsm_b.env());
    for args in [vec!["status"], vec!["secret", "get", "s"], vec!["sign"]] {
        let r = b.run(&args);
        assert_ne!(r.code, 0, "{args:?} succeeded on another token");
        assert!(
            r.stderr
                .contains("this vault was created on another PKCS#11 token"),
            "{args:?}: {}",
            r.stderr
        );
        assert!(r.stdout.is_empty());
    }
    assert_eq!(a.run(&["secret", "get", "s"]).ok().stdout, b"clone-secret");
}
