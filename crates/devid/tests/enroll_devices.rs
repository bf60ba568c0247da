//! Enrolment end to end with the real `devid-server` (SQLite): a TPM device on swtpm, a
//! SoftHSM device and a soft device. The certificate chains to the fleet CA, carries the device
//! id, and its public key is `devid pubkey`; everything lands sealed in the bundle.

#![allow(clippy::unwrap_used)]

mod common;

use common::Devid;
use devid_testkit::server::DevidServer;
use devid_testkit::softhsm::SoftHsm;
use devid_testkit::swtpm::Swtpm;
use x509_parser::prelude::*;

fn pem_ders(pem: &str) -> Vec<Vec<u8>> {
    x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
        .map(|p| p.unwrap().contents)
        .collect()
}

/// Enrol `d` with a fresh token and check everything the issue asks for.
fn enrol_and_check(server: &DevidServer, d: &Devid, id: &str) {
    let token = server.token(&["--device-id", id]);
    let out = d
        .run_stdin(
            &[
                "enroll",
                "--server",
                &server.url,
                "--ca-pin",
                &server.pin,
                "--token",
                "-",
                "--json",
            ],
            token.as_bytes(),
        )
        .ok();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["device_id"], id);
    assert_eq!(
        v["mqtt_url"],
        format!("mqtts://localhost:{}", server.mqtt_port).as_str()
    );

    let status: serde_json::Value =
        serde_json::from_slice(&d.run(&["status", "--json"]).ok().stdout).unwrap();
    assert_eq!(status["device_id"], id);
    assert_eq!(status["server_url"], server.url.as_str());
    assert_eq!(status["ca_pin"], server.pin.as_str());
    assert!(
        status["certificate"]["expires_in_seconds"]
            .as_i64()
            .unwrap()
            > 29 * 86_400
    );

    // The chain sealed in the bundle: leaf signed by the fleet CA, SAN urn:devid:<id>, and the
    // key is the keystore's.
    let tcti = d
        .env
        .iter()
        .find(|(k, _)| k == "DEVID_TCTI")
        .map(|(_, v)| v.to_string_lossy().into_owned());
    let (_, vault) = devid::open_vault(&d.state, tcti.as_deref()).unwrap();
    let contents = vault.load().unwrap();
    drop(vault);
    let chain = pem_ders(contents.cert_chain_pem.as_deref().unwrap());
    let ca = pem_ders(&server.ca_pem());
    assert_eq!(chain.len(), 2);
    assert_eq!(chain[1], ca[0], "chain ends in the fleet CA");
    let (_, leaf) = parse_x509_certificate(&chain[0]).unwrap();
    let (_, ca_cert) = parse_x509_certificate(&ca[0]).unwrap();
    leaf.verify_signature(Some(ca_cert.public_key())).unwrap();
    let san = leaf.subject_alternative_name().unwrap().unwrap();
    assert!(san
        .value
        .general_names
        .iter()
        .any(|n| matches!(n, GeneralName::URI(u) if *u == format!("urn:devid:{id}"))));
    let key = d.public_key();
    assert_eq!(
        leaf.public_key().raw,
        devid_keystore::spki_der(&key).as_slice()
    );
    assert_eq!(
        contents.ca_cert_pem.as_deref().map(pem_ders),
        Some(ca),
        "CA certificate sealed too"
    );
}

#[test]
fn tpm_softhsm_and_soft_devices_enrol() {
    let server = DevidServer::start();

    let tpm = Swtpm::start();
    let d = Devid::new().tcti(&tpm.tcti());
    d.run(&["init", "--backend", "tpm"]).ok();
    enrol_and_check(&server, &d, "tpm-dev-1");

    let hsm = SoftHsm::new("enrol");
    hsm.install_process_env(); // this test also opens the vault in-process
    let d = Devid::new().envs(hsm.env());
    d.run(&[
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
    enrol_and_check(&server, &d, "hsm-dev-1");

    let d = Devid::new();
    d.run(&["init", "--backend", "soft"]).ok();
    enrol_and_check(&server, &d, "soft-dev-1");

    // The registry has all three, active.
    let out = server.cli(&["device", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device_id"].as_str().or(d["id"].as_str()).unwrap())
        .collect();
    for id in ["tpm-dev-1", "hsm-dev-1", "soft-dev-1"] {
        assert!(ids.contains(&id), "{id} missing from {ids:?}");
    }
}

#[test]
fn wrong_pin_replayed_token_and_bad_server_are_refused_without_change() {
    let server = DevidServer::start();
    let d = Devid::new();
    d.run(&["init", "--backend", "soft"]).ok();
    let before = std::fs::read(d.state.join(devid_vault::BUNDLE_FILE)).unwrap();

    let token = server.token(&[]);
    let wrong_pin = "00".repeat(32);
    let r = d.run(&[
        "enroll",
        "--server",
        &server.url,
        "--ca-pin",
        &wrong_pin,
        "--token",
        &token,
    ]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("CA pin mismatch"), "{}", r.stderr);
    assert!(!r.stderr.contains(&token), "token leaked into an error");
    assert_eq!(
        std::fs::read(d.state.join(devid_vault::BUNDLE_FILE)).unwrap(),
        before,
        "nothing sealed"
    );

    // The token was not used by the refused attempt: it still works once, then never again.
    d.run(&[
        "enroll",
        "--server",
        &server.url,
        "--ca-pin",
        &server.pin,
        "--token",
        &token,
    ])
    .ok();
    let other = Devid::new();
    other.run(&["init", "--backend", "soft"]).ok();
    let r = other.run(&[
        "enroll",
        "--server",
        &server.url,
        "--ca-pin",
        &server.pin,
        "--token",
        &token,
    ]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("server refused (409"), "{}", r.stderr);

    let r = other.run(&[
        "enroll",
        "--server",
        "http://127.0.0.1:1",
        "--ca-pin",
        &server.pin,
        "--token",
        "x",
    ]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("https://"), "{}", r.stderr);
}
