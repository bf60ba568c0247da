//! TPM key attestation end to end (docs/attestation.md, THREATS.md T2, T3, T10): a real
//! swtpm manufactured with EK certificates by `swtpm_setup --create-ek-cert` and swtpm's local
//! CA (hermetic, one per test binary), the real `devid-server` trusting that CA as its EK
//! root, and the real `devid` binary.

#![allow(clippy::unwrap_used)]

mod agent_support;
mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_support::{server_messages, Agent};

use common::Devid;
use devid_testkit::server::DevidServer;
use devid_testkit::swtpm::{shared_tpm_ca, Swtpm, TpmCa};

#[path = "../../agent/tests/support/mod.rs"]
mod support;

/// A server whose EK trust bundle is `ca`'s root and the intermediate that signs the EK
/// certificates (the TPM stores no chain), in `mode`.
fn server(ca: &TpmCa, mode: &str) -> DevidServer {
    server_with(ca, mode, "")
}

fn server_with(ca: &TpmCa, mode: &str, extra: &str) -> DevidServer {
    let roots = tempfile::tempdir().unwrap().keep();
    std::fs::write(roots.join("swtpm-root.pem"), ca.root_pem()).unwrap();
    std::fs::write(roots.join("swtpm-issuer.pem"), ca.issuer_pem()).unwrap();
    DevidServer::start_with_config(
        &[],
        &format!(
            "attestation.mode = \"{mode}\"\nattestation.ek_roots = \"{}\"\n{extra}",
            roots.display()
        ),
    )
}

fn enroll(d: &Devid, s: &DevidServer, token: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "enroll", "--server", &s.url, "--ca-pin", &s.pin, "--token", "-", "--json",
    ];
    args.extend_from_slice(extra);
    let mut cmd = d.command(&args);
    use std::io::Write;
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(token.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn device_json(s: &DevidServer, id: &str) -> serde_json::Value {
    let out = s.cli(&["device", "show", id, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn audit(s: &DevidServer) -> String {
    String::from_utf8_lossy(&s.cli(&["audit", "--limit", "1000"]).stdout).into_owned()
}

#[test]
fn attested_enrolment_with_rsa_and_p384_eks_records_the_tpm() {
    let ca = shared_tpm_ca();
    let s = server(ca, "required");
    for (alg, id) in [("rsa2048", "tpm-rsa"), ("ecc-p384", "tpm-p384")] {
        let tpm = Swtpm::start_manufactured(ca);
        let d = Devid::new().tcti(&tpm.tcti());
        d.run(&["init", "--backend", "tpm"]).ok();
        let token = s.token(&["--device-id", id, "--attestation", "required"]);
        let out = enroll(&d, &s, &token, &["--ek-alg", alg]);
        assert!(
            out.status.success(),
            "{alg}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["assurance"], "ek-cert", "{alg}");
        let dev = device_json(&s, id);
        assert_eq!(dev["assurance"], "ek-cert");
        assert_eq!(dev["tpm_manufacturer"], "id:00001014", "{dev}");
        assert_eq!(dev["tpm_model"], "swtpm", "{dev}");
        assert_eq!(dev["ek_fingerprint"].as_str().unwrap().len(), 64);
        // the AK is kept for rotation
        assert!(d.state.join("tpm-attest-key.pem").exists());
        let human = String::from_utf8_lossy(&s.cli(&["device", "show", id]).stdout).into_owned();
        assert!(human.contains("assurance:       ek-cert"), "{human}");
    }
    let log = audit(&s);
    assert!(log.contains("assurance=ek-cert"), "{log}");
}

#[test]
fn without_ek_certificate_or_with_no_attest_a_required_server_refuses_and_optional_records_none() {
    let ca = shared_tpm_ca();
    let s = server(ca, "required");
    // a plain swtpm has no EK certificate: nothing to attest with
    let plain = Swtpm::start();
    let d = Devid::new().tcti(&plain.tcti());
    d.run(&["init", "--backend", "tpm"]).ok();
    let out = enroll(&d, &s, &s.token(&["--device-id", "plain"]), &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("attestation_required"), "{err}");

    // --no-attest on a TPM that could
    let tpm = Swtpm::start_manufactured(ca);
    let d2 = Devid::new().tcti(&tpm.tcti());
    d2.run(&["init", "--backend", "tpm"]).ok();
    let out = enroll(
        &d2,
        &s,
        &s.token(&["--device-id", "skip"]),
        &["--no-attest"],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("attestation_required"));

    // optional: the plain TPM and a soft device enrol, recorded as not attested
    let o = server(ca, "optional");
    let out = enroll(&d, &o, &o.token(&["--device-id", "plain"]), &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["assurance"], "none");
    assert_eq!(device_json(&o, "plain")["assurance"], "none");
    // but a token can demand it
    let soft = Devid::new();
    soft.run(&["init", "--backend", "soft"]).ok();
    let out = enroll(
        &soft,
        &o,
        &o.token(&["--device-id", "soft", "--attestation", "required"]),
        &[],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("attestation_required"));
}

#[test]
fn an_ek_certificate_from_an_untrusted_ca_is_not_attested() {
    // the TPM's EK certificate is from a CA the server does not trust
    let other = TpmCa::new();
    let s = server(shared_tpm_ca(), "optional");
    let tpm = Swtpm::start_manufactured(&other);
    let d = Devid::new().tcti(&tpm.tcti());
    d.run(&["init", "--backend", "tpm"]).ok();
    // required by the token: refused
    let out = enroll(
        &d,
        &s,
        &s.token(&["--device-id", "u1", "--attestation", "required"]),
        &[],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ek_untrusted") || err.contains("attestation_required"),
        "{err}"
    );
    let log = audit(&s);
    assert!(
        log.contains("ek_untrusted"),
        "the refusal is audited: {log}"
    );
    // optional: enrols, not attested
    let out = enroll(&d, &s, &s.token(&["--device-id", "u1"]), &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(device_json(&s, "u1")["assurance"], "none");
}

#[test]
fn one_tpm_is_one_device_and_reset_attestation_is_audited() {
    let ca = shared_tpm_ca();
    let s = server(ca, "optional");
    let tpm = Swtpm::start_manufactured(ca);
    let d = Devid::new().tcti(&tpm.tcti());
    d.run(&["init", "--backend", "tpm"]).ok();
    let out = enroll(&d, &s, &s.token(&["--device-id", "first"]), &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // the same TPM (same EK), a fresh vault, under another id: refused
    let clone = Devid::new().tcti(&tpm.tcti());
    clone.run(&["init", "--backend", "tpm"]).ok();
    let out = enroll(&clone, &s, &s.token(&["--device-id", "second"]), &[]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ek_registered_elsewhere"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // the same id again, same EK (re-enrolment): fine
    let out = enroll(&d, &s, &s.token(&["--device-id", "first"]), &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // the device comes back with another TPM: refused until reset
    let tpm2 = Swtpm::start_manufactured(ca);
    let d2 = Devid::new().tcti(&tpm2.tcti());
    d2.run(&["init", "--backend", "tpm"]).ok();
    let out = enroll(&d2, &s, &s.token(&["--device-id", "first"]), &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("ek_changed"));
    // and without attestation: a downgrade, refused
    let out = enroll(
        &d2,
        &s,
        &s.token(&["--device-id", "first"]),
        &["--no-attest"],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("attestation_downgrade"));
    let out = s.cli(&["device", "reset-attestation", "first"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = enroll(&d2, &s, &s.token(&["--device-id", "first"]), &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = audit(&s);
    assert!(log.contains("device.reset_attestation"), "{log}");
    assert!(log.contains("ek_changed") && log.contains("ek_registered_elsewhere"));
}

#[test]
fn ek_allowlist_token_attests_without_a_trusted_root() {
    // the server trusts no EK root at all; the token names the TPM's EK
    let ca = shared_tpm_ca();
    let s = DevidServer::start();
    let tpm = Swtpm::start_manufactured(ca);
    let cert = tpm.tpm2_ok(&["nvread", "0x01c00002"]);
    let ek = devid_attest::ek::EkCert::parse(&cert).unwrap();
    let d = Devid::new().tcti(&tpm.tcti());
    d.run(&["init", "--backend", "tpm"]).ok();
    let token = s.token(&["--device-id", "listed", "--ek-fingerprint", &ek.fingerprint]);
    let out = enroll(&d, &s, &token, &["--ek-alg", "rsa2048"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(device_json(&s, "listed")["assurance"], "ek-allowlist");
    // a token naming another EK refuses this TPM
    let other = "ab".repeat(32);
    let token = s.token(&["--device-id", "listed2", "--ek-fingerprint", &other]);
    let tpm2 = Swtpm::start_manufactured(ca);
    let d2 = Devid::new().tcti(&tpm2.tcti());
    d2.run(&["init", "--backend", "tpm"]).ok();
    let out = enroll(&d2, &s, &token, &["--ek-alg", "rsa2048"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("ek_not_allowed"));
}

/// Median time of an attested enrolment (challenge, activation, certify, enrolment) over
/// `DEVID_ATTEST_ROUNDS` fresh devices (3 by default; 10 for the closing figures).
#[test]
fn attested_enrolment_time() {
    let rounds: usize = std::env::var("DEVID_ATTEST_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let ca = shared_tpm_ca();
    let s = server(ca, "required");
    let mut times = Vec::new();
    for i in 0..rounds {
        let tpm = Swtpm::start_manufactured(ca);
        let d = Devid::new().tcti(&tpm.tcti());
        d.run(&["init", "--backend", "tpm"]).ok();
        let id = format!("timed-{i}");
        let token = s.token(&["--device-id", &id]);
        let t = Instant::now();
        let out = enroll(&d, &s, &token, &[]);
        times.push(t.elapsed());
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(device_json(&s, &id)["assurance"], "ek-cert");
    }
    times.sort();
    println!(
        "ROBUST {{\"test\":\"attested_enrolment_time\",\"rounds\":{rounds},\"median_ms\":{}}}",
        times[times.len() / 2].as_millis()
    );
}

fn key_fingerprints(s: &DevidServer, id: &str) -> Vec<String> {
    // every certificate issued names its key in the audit detail
    let out = s.cli(&["audit", "--device-id", id, "--json"]);
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    rows.iter()
        .filter(|r| r["outcome"] == "ok")
        .filter_map(|r| {
            let d = r["detail"].as_str()?;
            d.split_whitespace()
                .find_map(|w| w.strip_prefix("key=").map(str::to_owned))
        })
        .collect()
}

/// Three attested renewals with one-minute certificates, each onto a new key made in the TPM
/// and certified by the registered AK, while an application keeps sending: nothing lost,
/// nothing twice; the old key's blob is gone, no next key is left pending.
#[test]
fn attested_renewals_rotate_the_tpm_key_and_lose_no_message() {
    let ca = shared_tpm_ca();
    let s = server_with(
        ca,
        "required",
        "device_cert_lifetime = \"1m\"\nrenewal.key_change = \"attested\"\n\
         mqtt.messages_per_sec = 1000000.0\nmqtt.messages_burst = 1000000.0",
    );
    let tpm = Swtpm::start_manufactured(ca);
    let d = Devid::new().tcti(&tpm.tcti());
    d.run(&["init", "--backend", "tpm"]).ok();
    let out = enroll(&d, &s, &s.token(&["--device-id", "rot"]), &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key0 = std::fs::read(d.state.join("tpm-device-key.pem")).unwrap();
    let mut agent = Agent::start(&d, &["--renew-at", "0.1"]);
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let app = {
        let (stop, acked, socket) = (stop.clone(), acked.clone(), agent.socket.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                let batch: Vec<String> = (n..n + 20).map(|i| format!("r-{i:06}")).collect();
                n += 20;
                let answers = support::publish_pipelined(&socket, "events/rot", batch.clone());
                acked.lock().unwrap().extend(
                    answers
                        .iter()
                        .zip(batch)
                        .filter(|(a, _)| a.ok)
                        .map(|(_, p)| p),
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let st = agent.wait_status("three renewals", Duration::from_secs(60), |s| {
        s["certificate"]["renewals"].as_u64().unwrap_or(0) >= 3
            && s["connection"]["state"] == "connected"
    });
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    app.join().unwrap();
    agent.wait_status("drained", Duration::from_secs(20), |s| {
        s["outbox"]["depth"] == 0
    });
    assert!(st["certificate"]["last_renewal_error"].is_null(), "{st:#}");
    agent.stop();
    let log = agent.log_text();
    assert!(log.contains("device key rotated"), "{log}");
    // every renewal certified a new key: enrolment + 3 renewals = 4 distinct keys
    let keys = key_fingerprints(&s, "rot");
    let distinct: std::collections::BTreeSet<_> = keys.iter().collect();
    assert!(distinct.len() >= 4, "keys {keys:?}");
    let audit = audit(&s);
    assert!(
        audit.matches("renew.key_change").count() >= 3,
        "attested key changes audited: {audit}"
    );
    assert_eq!(device_json(&s, "rot")["assurance"], "ek-cert");
    // the old key blob is gone, nothing pending
    assert_ne!(
        std::fs::read(d.state.join("tpm-device-key.pem")).unwrap(),
        key0
    );
    assert!(!d.state.join("tpm-device-key.pem.next").exists());
    // the registry's key is the TPM's key now
    let pubkey = d.public_key();
    assert_eq!(
        device_json(&s, "rot")["key_fingerprint"],
        devid_keystore::fingerprint(&pubkey).as_str()
    );
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 100, "{}", acked.len());
    let mut counts: HashMap<String, usize> = HashMap::new();
    for (_, _, p) in server_messages(&s, "rot") {
        *counts.entry(p).or_insert(0) += 1;
    }
    for p in &acked {
        assert_eq!(counts.get(p), Some(&1), "{p}");
    }
}

/// An attested device's renewal onto a key the TPM did not certify (a software key, a CSR
/// signed outside the TPM) is refused, and an unattested TPM device becomes attested at its
/// next renewal.
#[test]
fn attested_devices_never_move_to_an_unattested_key_and_unattested_ones_upgrade() {
    let ca = shared_tpm_ca();
    let s = server(ca, "optional");
    let tpm = Swtpm::start_manufactured(ca);
    let d = Devid::new().tcti(&tpm.tcti());
    d.run(&["init", "--backend", "tpm"]).ok();
    let out = enroll(&d, &s, &s.token(&["--device-id", "att"]), &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, vault) = devid::open_vault(&d.state, Some(&tpm.tcti())).unwrap();
    let c = vault.load().unwrap();
    let (chain, server_url, pin) = (
        c.cert_chain_pem.clone().unwrap(),
        c.server_url.clone().unwrap(),
        c.ca_pin.clone().unwrap(),
    );
    drop(c);
    let soft_dir = tempfile::tempdir().unwrap();
    let soft = devid_keystore::soft::SoftKeystore::create(soft_dir.path()).unwrap();
    let csr = devid_enroll::build_csr_with_keystore(&soft, Some("att")).unwrap();
    let err =
        devid_enroll::renew(&server_url, &pin, &chain, vault.keystore().clone(), &csr).unwrap_err();
    assert!(
        matches!(&err, devid_enroll::EnrollError::Server { code, .. } if code == "attestation_downgrade"),
        "{err}"
    );
    // the same key, unattested: still fine (no key change)
    let same =
        devid_enroll::build_csr_with_keystore(vault.keystore().as_ref(), Some("att")).unwrap();
    devid_enroll::renew(&server_url, &pin, &chain, vault.keystore().clone(), &same).unwrap();
    drop(vault);
    assert!(audit(&s).contains("attestation_downgrade"));

    // an unattested TPM device (enrolled with --no-attest) is attested at its next renewal
    let tpm2 = Swtpm::start_manufactured(ca);
    let d2 = Devid::new().tcti(&tpm2.tcti());
    d2.run(&["init", "--backend", "tpm"]).ok();
    let out = enroll(
        &d2,
        &s,
        &s.token(&["--device-id", "late"]),
        &["--no-attest"],
    );
    assert!(out.status.success());
    assert_eq!(device_json(&s, "late")["assurance"], "none");
    let (_, vault) = devid::open_vault(&d2.state, Some(&tpm2.tcti())).unwrap();
    devid_agent::renew::renew_blocking(&vault, "late").unwrap();
    drop(vault);
    let dev = device_json(&s, "late");
    assert_eq!(dev["assurance"], "ek-cert", "{dev}");
    assert_eq!(dev["tpm_model"], "swtpm");
}
