//! The fleet CA key on a PKCS#11 token (SoftHSMv2): `devid-server init --ca-key pkcs11:...`
//! generates the key on the token, `run` signs every certificate there, no CA private key is
//! ever written to the data dir, and without the token the server does not start.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use common::{check_chain, pem_to_der, Server, BIN};
use devid_enroll::{build_csr_with_keystore, enroll};
use devid_keystore::soft::SoftKeystore;
use devid_keystore::Keystore;
use devid_testkit::softhsm::SoftHsm;

fn soft_key(dir: &Path) -> Arc<dyn Keystore> {
    std::fs::create_dir_all(dir).unwrap();
    Arc::new(SoftKeystore::create(dir).unwrap())
}

fn ca_key_uri(hsm: &SoftHsm) -> String {
    format!(
        "pkcs11:token={}?module-path={}&pin-source=file:{}",
        hsm.label(),
        hsm.module().display(),
        hsm.pin_file().display()
    )
}

/// Enrol `n` devices one after the other; enrolments per second (key creation and token
/// creation outside the clock).
fn enrol_rate(s: &Server, n: usize, tag: &str) -> f64 {
    let work: Vec<_> = (0..n)
        .map(|i| {
            let ks = soft_key(&s.tmp.path().join(format!("{tag}-{i}")));
            let id = format!("{tag}-{i}");
            (ks, s.token(&["--device-id", &id]), id)
        })
        .collect();
    let start = Instant::now();
    for (ks, token, id) in &work {
        let csr = build_csr_with_keystore(&**ks, Some(id)).unwrap();
        enroll(&s.url, token, &s.pin, &csr, Some(id)).unwrap();
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// `micros=N` of every "CA signature made on the PKCS#11 token" line of the server log.
fn token_signatures(log: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.contains("CA signature made on the PKCS#11 token"))
        .filter_map(|l| {
            let rest = &l[l.find("micros=")? + 7..];
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

#[test]
fn ca_key_on_softhsm_signs_device_certificates() {
    let hsm = SoftHsm::new("fleet-ca");
    let uri = ca_key_uri(&hsm);
    let s = Server::start_opts(&["--ca-key", &uri], &hsm.env());

    // the config records the full key reference: token serial and key id
    let toml = std::fs::read_to_string(s.dir.join("devid-server.toml")).unwrap();
    let line = toml
        .lines()
        .find(|l| l.starts_with("ca_key = "))
        .unwrap()
        .to_owned();
    assert!(line.contains("pkcs11:token=fleet-ca;serial="), "{line}");
    assert!(line.contains(";id=%"), "{line}");
    assert!(
        line.contains("module-path=/usr/lib/softhsm/libsofthsm2.so"),
        "{line}"
    );
    assert!(!line.contains(devid_testkit::softhsm::USER_PIN), "{line}");

    // enrol a soft device; the chain verifies against ca.pem
    let ks = soft_key(&s.tmp.path().join("dev"));
    let token = s.token(&["--device-id", "hsm-dev-1"]);
    let csr = build_csr_with_keystore(&*ks, None).unwrap();
    let resp = enroll(&s.url, &token, &s.pin, &csr, None).unwrap();
    let ca_pem = std::fs::read_to_string(s.ca_pem_path()).unwrap();
    check_chain(
        &resp.certificate_chain,
        &ca_pem,
        "hsm-dev-1",
        &devid_keystore::spki_der(&ks.public_key()),
    );
    std::fs::write(s.tmp.path().join("chain.pem"), &resp.certificate_chain).unwrap();
    let verify = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(s.ca_pem_path())
        .arg(s.tmp.path().join("chain.pem"))
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    // the device certificate was signed on the token, by this server process
    let sigs = token_signatures(&s.log_text());
    assert_eq!(sigs.len(), 1, "one token signature per enrolment");

    // no CA private key in the data dir: the only private key there is the server's TLS key,
    // which belongs to server.pem's leaf, not to the CA
    assert!(!s.dir.join("ca-key.pem").exists());
    let private: Vec<_> = devid_testkit::read_tree(&s.dir)
        .into_iter()
        .filter(|(_, bytes)| devid_testkit::contains(bytes, b"PRIVATE KEY"))
        .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(private, ["server-key.pem"]);
    use x509_parser::prelude::parse_x509_certificate;
    let server_chain = pem_to_der(&std::fs::read_to_string(s.dir.join("server.pem")).unwrap());
    let ca_der = &pem_to_der(&ca_pem)[0];
    let (_, leaf) = parse_x509_certificate(&server_chain[0]).unwrap();
    let (_, ca) = parse_x509_certificate(ca_der).unwrap();
    assert_ne!(leaf.public_key().raw, ca.public_key().raw);
    leaf.verify_signature(Some(ca.public_key())).unwrap();

    // without the token the server refuses to start (the key is nowhere else)
    let out = Command::new(BIN)
        .args(["run", "--data-dir", s.dir_str()])
        .env("SOFTHSM2_CONF", s.tmp.path().join("no-such-softhsm2.conf"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("PKCS#11"), "{err}");
    assert!(!err.contains(devid_testkit::softhsm::USER_PIN), "{err}");

    // a wrong --ca-key is refused before anything is made
    let bad = Command::new(BIN)
        .args([
            "init",
            "--data-dir",
            s.tmp.path().join("bad").to_str().unwrap(),
            "--hostname",
            "localhost",
            "--ca-key",
            "pkcs11:token=fleet-ca?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-value=1234",
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("pin-source"), "{err}");
    assert!(!err.contains("1234"), "{err}");
}

/// A quick measurement, printed (run with --nocapture): signing latency on SoftHSM and
/// enrolments per second with the token CA against the file CA. It asserts only that every
/// enrolment succeeded and went through the token.
#[test]
fn token_ca_and_file_ca_enrolment_rates() {
    const N: usize = 40;
    let hsm = SoftHsm::new("rate-ca");
    let token_ca = Server::start_opts(&["--ca-key", &ca_key_uri(&hsm)], &hsm.env());
    let file_ca = Server::start();
    // warm up both (TLS session setup, first connection)
    enrol_rate(&token_ca, 2, "warm");
    enrol_rate(&file_ca, 2, "warm");
    let token_rate = enrol_rate(&token_ca, N, "tok");
    let file_rate = enrol_rate(&file_ca, N, "file");
    let mut sigs = token_signatures(&token_ca.log_text());
    assert_eq!(
        sigs.len(),
        N + 2,
        "every certificate was signed on the token"
    );
    sigs.sort_unstable();
    eprintln!(
        "PKCS#11 CA on SoftHSM: signature median {} us, max {} us; enrolments/s: token CA \
         {token_rate:.1}, file CA {file_rate:.1} ({N} sequential enrolments each, debug build)",
        sigs[sigs.len() / 2],
        sigs[sigs.len() - 1]
    );
    assert_eq!(token_ca.devices().len(), N + 2);
    assert_eq!(file_ca.devices().len(), N + 2);
}
