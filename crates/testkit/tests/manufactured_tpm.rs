//! A manufactured swtpm carries EK certificates that chain to its TpmCa (checked with openssl),
//! and a plain one does not.

#![allow(clippy::unwrap_used)]

use devid_testkit::swtpm::{shared_tpm_ca, Swtpm, TpmCa};
use std::process::Command;

fn openssl_verify(dir: &std::path::Path, root_pem: &str, issuer_pem: &str, ek_der: &[u8]) -> bool {
    let root = dir.join("root.pem");
    let issuer = dir.join("issuer.pem");
    let der = dir.join("ek.der");
    std::fs::write(&root, root_pem).unwrap();
    std::fs::write(&issuer, issuer_pem).unwrap();
    std::fs::write(&der, ek_der).unwrap();
    let pem = Command::new("openssl")
        .args(["x509", "-inform", "DER", "-in"])
        .arg(&der)
        .output()
        .expect("run openssl");
    assert!(pem.status.success(), "NV contents are no DER certificate");
    let pem_path = dir.join("ek.pem");
    std::fs::write(&pem_path, &pem.stdout).unwrap();
    Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(&root)
        .arg("-untrusted")
        .arg(&issuer)
        .arg(&pem_path)
        .output()
        .expect("run openssl")
        .status
        .success()
}

#[test]
fn manufactured_tpm_has_ek_certs_that_chain_to_its_ca() {
    let ca = shared_tpm_ca();
    assert!(ca.root_pem().contains("BEGIN CERTIFICATE"));
    let tpm = Swtpm::start_manufactured(ca);
    let tmp = tempfile::tempdir().unwrap();
    for (index, handle) in [("0x01c00002", "0x81010001"), ("0x01c00016", "0x81010016")] {
        let f = tmp.path().join(format!("{index}.der"));
        tpm.tpm2_ok(&["nvread", index, "-o", f.to_str().unwrap()]);
        let der = std::fs::read(&f).unwrap();
        assert_eq!(
            der[0], 0x30,
            "NV {index} does not start with a DER SEQUENCE"
        );
        assert!(
            openssl_verify(tmp.path(), &ca.root_pem(), &ca.issuer_pem(), &der),
            "EK certificate at {index} does not verify against the TpmCa root"
        );
        // The persistent EK is there.
        tpm.tpm2_ok(&["readpublic", "-c", handle]);
        let other = TpmCa::new();
        assert!(
            !openssl_verify(tmp.path(), &other.root_pem(), &other.issuer_pem(), &der),
            "EK certificate at {index} verifies against an unrelated CA"
        );
    }
}

#[test]
fn plain_tpm_has_no_ek_cert() {
    let tpm = Swtpm::start();
    let out = tpm.tpm2_output(&["nvreadpublic"]);
    assert!(out.status.success());
    let list = String::from_utf8_lossy(&out.stdout);
    assert!(
        !list.contains("0x1c00002"),
        "plain swtpm has an EK cert: {list}"
    );
}
