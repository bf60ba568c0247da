//! End to end: the real `devid-server` binary on 127.0.0.1, enrolment with `devid-enroll` and
//! a soft key, and with `openssl req` + `curl`; refusals; races; renewal; registry states.
#![allow(clippy::unwrap_used)]

mod common;
mod enroll_support;

use std::path::Path;
use std::sync::{Arc, Barrier};

use common::{check_chain, pem_to_der, tool, Server};
use devid_enroll::{build_csr_with_keystore, enroll, renew, EnrollError};
use enroll_support::{assert_refused, server_error, soft_key, spki};

#[test]
fn enrol_with_soft_key_through_devid_enroll() {
    let s = Server::start();
    let token = s.token(&[
        "--device-id",
        "sensor-01",
        "--ttl",
        "10m",
        "--policy",
        "lab",
    ]);
    assert_eq!(token.len(), 64, "token alone on the last line");
    let ks = soft_key(&s.tmp.path().join("dev"));
    let csr = build_csr_with_keystore(&*ks, Some("sensor-01")).unwrap();
    let resp = enroll(&s.url, &token, &s.pin, &csr, Some("sensor-01")).unwrap();
    assert_eq!(resp.device_id, "sensor-01");
    assert_eq!(resp.ca_pin, s.pin);
    assert_eq!(resp.mqtt_url, format!("mqtts://localhost:{}", s.mqtt_port));
    let ca_pem = std::fs::read_to_string(s.ca_pem_path()).unwrap();
    let serial = check_chain(&resp.certificate_chain, &ca_pem, "sensor-01", &spki(&*ks));

    let devices = s.devices();
    assert_eq!(devices.len(), 1);
    let d = &devices[0];
    assert_eq!(
        (d.id.as_str(), d.state.as_str(), d.policy.as_str()),
        ("sensor-01", "active", "lab")
    );
    assert_eq!(d.cert_serial, serial);
    assert_eq!(
        d.key_fingerprint,
        devid_keystore::fingerprint(&ks.public_key())
    );
    let shown: devid_proto::DeviceInfo =
        serde_json::from_str(&s.cli(&["device", "show", "sensor-01", "--json"])).unwrap();
    assert_eq!(&shown, d);
    let human = s.cli(&["device", "show", "sensor-01"]);
    assert!(human.contains("active"), "{human}");

    let audit = s.audit();
    let enrol = audit.iter().find(|a| a.action == "enroll").unwrap();
    assert_eq!(enrol.outcome, "ok");
    assert_eq!(enrol.device_id.as_deref(), Some("sensor-01"));
    assert!(audit
        .iter()
        .any(|a| a.action == "token.create" && a.actor == "admin:admin"));

    // a token without binding and no requested id gives a UUID v4 id
    let token = s.token(&[]);
    let ks2 = soft_key(&s.tmp.path().join("dev2"));
    let resp = enroll(
        &s.url,
        &token,
        &s.pin,
        &build_csr_with_keystore(&*ks2, None).unwrap(),
        None,
    )
    .unwrap();
    assert_eq!(resp.device_id.len(), 36);
    assert_eq!(resp.device_id.chars().nth(14), Some('4'));
    check_chain(
        &resp.certificate_chain,
        &ca_pem,
        &resp.device_id,
        &spki(&*ks2),
    );
}

fn curl_post(s: &Server, path: &str, body_file: &Path, extra: &[&str]) -> (u16, String) {
    let out_file = body_file.with_extension("out");
    // the admin API is on its own listener (admin_listen)
    let base = if path.starts_with("/v1/admin") {
        &s.admin_url
    } else {
        &s.url
    };
    let url = format!("{base}{path}");
    let mut args = vec![
        "-sS",
        "--cacert",
        s.ca_pem_path().to_str().unwrap().to_owned().leak(),
        "-H",
        "content-type: application/json",
        "--data-binary",
    ];
    let data = format!("@{}", body_file.display());
    args.push(&data);
    args.extend_from_slice(extra);
    args.extend_from_slice(&["-o", out_file.to_str().unwrap(), "-w", "%{http_code}", &url]);
    let out = tool("curl", &args, s.tmp.path());
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: u16 = String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    (
        status,
        std::fs::read_to_string(out_file).unwrap_or_default(),
    )
}

#[test]
fn enrol_and_renew_with_openssl_and_curl() {
    devid_testkit::require_program("openssl", "openssl");
    devid_testkit::require_program("curl", "curl");
    let s = Server::start();
    let w = s.tmp.path();
    let token = s.token(&["--device-id", "curl-dev"]);
    let ok = |o: std::process::Output| {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        o
    };
    ok(tool(
        "openssl",
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "dev.key",
        ],
        w,
    ));
    ok(tool(
        "openssl",
        &[
            "req",
            "-new",
            "-key",
            "dev.key",
            "-subj",
            "/CN=ignored",
            "-out",
            "dev.csr",
        ],
        w,
    ));
    let csr = std::fs::read_to_string(w.join("dev.csr")).unwrap();
    let body = w.join("enroll.json");
    std::fs::write(
        &body,
        serde_json::json!({"token": token, "csr": csr, "device_id": "curl-dev"}).to_string(),
    )
    .unwrap();
    let (status, text) = curl_post(&s, "/v1/enroll", &body, &[]);
    assert_eq!(status, 200, "{text}");
    let resp: devid_proto::EnrollResponse = serde_json::from_str(&text).unwrap();
    std::fs::write(w.join("chain.pem"), &resp.certificate_chain).unwrap();
    let verify = ok(tool(
        "openssl",
        &[
            "verify",
            "-CAfile",
            s.ca_pem_path().to_str().unwrap(),
            "chain.pem",
        ],
        w,
    ));
    assert!(String::from_utf8_lossy(&verify.stdout).contains("OK"));
    let spki_pem = ok(tool(
        "openssl",
        &[
            "pkey", "-in", "dev.key", "-pubout", "-outform", "DER", "-out", "key.spki",
        ],
        w,
    ));
    drop(spki_pem);
    let key_spki = std::fs::read(w.join("key.spki")).unwrap();
    let ca_pem = std::fs::read_to_string(s.ca_pem_path()).unwrap();
    let first = check_chain(&resp.certificate_chain, &ca_pem, "curl-dev", &key_spki);

    // renewal over mutual TLS with curl
    let renew_body = w.join("renew.json");
    std::fs::write(&renew_body, serde_json::json!({"csr": csr}).to_string()).unwrap();
    let (status, text) = curl_post(
        &s,
        "/v1/renew",
        &renew_body,
        &["--cert", "chain.pem", "--key", "dev.key"],
    );
    assert_eq!(status, 200, "{text}");
    let renewed: devid_proto::EnrollResponse = serde_json::from_str(&text).unwrap();
    let second = check_chain(&renewed.certificate_chain, &ca_pem, "curl-dev", &key_spki);
    assert_ne!(first, second);
    // without a client certificate renewal is refused
    let (status, text) = curl_post(&s, "/v1/renew", &renew_body, &[]);
    assert_eq!(status, 401, "{text}");
    assert!(text.contains("client_cert_required"));
    assert_refused(&s, "renew", "client_cert_required");

    // the admin API refuses a wrong bearer token, and says so in the audit log
    let (status, text) = curl_post(
        &s,
        "/v1/admin/tokens",
        &renew_body,
        &["-H", &format!("authorization: Bearer {}", "0".repeat(64))],
    );
    assert_eq!(status, 401, "{text}");
    assert_refused(&s, "admin.auth", "admin_unauthorized");
    // and is not served at all on the public listener devices reach
    let out = tool(
        "curl",
        &[
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--cacert",
            s.ca_pem_path().to_str().unwrap(),
            "-H",
            &format!("authorization: Bearer {}", "0".repeat(64)),
            &format!("{}/v1/admin/devices", s.url),
        ],
        s.tmp.path(),
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "404");
}

#[test]
fn refusals_are_clear_audited_and_change_nothing() {
    let s = Server::start();
    let ks = soft_key(&s.tmp.path().join("dev"));
    let csr = build_csr_with_keystore(&*ks, None).unwrap();

    // unknown token
    let (st, code) =
        server_error(enroll(&s.url, &"ab".repeat(32), &s.pin, &csr, None).unwrap_err());
    assert_eq!((st, code.as_str()), (401, "token_unknown"));
    assert_refused(&s, "enroll", "token_unknown");

    // expired token
    let expiring = s.token(&["--ttl", "1s"]);
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let (st, code) = server_error(enroll(&s.url, &expiring, &s.pin, &csr, None).unwrap_err());
    assert_eq!((st, code.as_str()), (401, "token_expired"));
    assert_refused(&s, "enroll", "token_expired");

    // token bound to another id
    let bound = s.token(&["--device-id", "dev-a"]);
    let (st, code) = server_error(enroll(&s.url, &bound, &s.pin, &csr, Some("dev-b")).unwrap_err());
    assert_eq!((st, code.as_str()), (403, "token_device_mismatch"));
    assert_refused(&s, "enroll", "token_device_mismatch");

    // malformed CSR
    let (st, code) = server_error(enroll(&s.url, &bound, &s.pin, "not a csr", None).unwrap_err());
    assert_eq!((st, code.as_str()), (400, "csr_malformed"));
    assert_refused(&s, "enroll", "csr_malformed");

    // CSR whose signature does not match its key: flip a bit in the signature
    let mut der = pem_to_der(&csr).remove(0);
    let n = der.len();
    der[n - 2] ^= 0x01;
    let bad = pem_rfc7468(&der);
    let (st, code) = server_error(enroll(&s.url, &bound, &s.pin, &bad, None).unwrap_err());
    assert_eq!((st, code.as_str()), (400, "csr_signature_invalid"));
    assert_refused(&s, "enroll", "csr_signature_invalid");

    // oversized body
    let huge = format!("{csr}{}", "A".repeat(100 * 1024));
    let (st, code) = server_error(enroll(&s.url, &bound, &s.pin, &huge, None).unwrap_err());
    assert_eq!((st, code.as_str()), (413, "body_too_large"));
    assert_refused(&s, "enroll", "body_too_large");

    // a CSR just under the body limit but over the CSR limit is malformed
    let padded = format!("{csr}{}", "\n".repeat(20 * 1024));
    let (st, code) = server_error(enroll(&s.url, &bound, &s.pin, &padded, None).unwrap_err());
    assert_eq!((st, code.as_str()), (400, "csr_malformed"));

    // wrong CA pin on the device side: refused before anything is sent
    let wrong = "00".repeat(32);
    match enroll(&s.url, &bound, &wrong, &csr, None) {
        Err(EnrollError::PinMismatch { expected, .. }) => assert_eq!(expected, wrong),
        other => panic!("expected PinMismatch, got {other:?}"),
    }
    let msg = enroll(&s.url, &bound, &wrong, &csr, None)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("CA pin mismatch"), "{msg}");

    // none of that created a device or consumed the bound token
    assert!(s.devices().is_empty());
    assert!(!s
        .audit()
        .iter()
        .any(|a| a.action == "enroll" && a.outcome == "ok"));
    let resp = enroll(&s.url, &bound, &s.pin, &csr, None).unwrap();
    assert_eq!(resp.device_id, "dev-a");

    // replay
    let (st, code) = server_error(enroll(&s.url, &bound, &s.pin, &csr, None).unwrap_err());
    assert_eq!((st, code.as_str()), (409, "token_used"));
    assert_refused(&s, "enroll", "token_used");
    assert_eq!(s.devices().len(), 1);
}

fn pem_rfc7468(der: &[u8]) -> String {
    use base64_encode as b64;
    let body = b64(der);
    let mut out = String::from("-----BEGIN CERTIFICATE REQUEST-----\n");
    for chunk in body.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE REQUEST-----\n");
    out
}

fn base64_encode(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn two_enrolments_racing_for_one_token_exactly_one_wins() {
    let s = Server::start();
    for round in 0..5 {
        let token = s.token(&[]);
        let barrier = Arc::new(Barrier::new(2));
        let handles: Vec<_> = (0..2)
            .map(|i| {
                let ks = soft_key(&s.tmp.path().join(format!("race-{round}-{i}")));
                let csr = build_csr_with_keystore(&*ks, None).unwrap();
                let (url, pin, token, barrier) =
                    (s.url.clone(), s.pin.clone(), token.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let id = format!("race-{round}-{i}");
                    barrier.wait();
                    enroll(&url, &token, &pin, &csr, Some(&id))
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let wins = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(wins, 1, "round {round}: {results:?}");
        let loser = results.into_iter().find_map(|r| r.err()).unwrap();
        assert_eq!(server_error(loser), (409, "token_used".to_owned()));
    }
    assert_eq!(s.devices().len(), 5);
}

#[test]
fn renewal_rotation_suspend_resume_revoke() {
    let s = Server::start();
    let ca_pem = std::fs::read_to_string(s.ca_pem_path()).unwrap();
    let token = s.token(&["--device-id", "rot-1"]);
    let old = soft_key(&s.tmp.path().join("old"));
    let resp = enroll(
        &s.url,
        &token,
        &s.pin,
        &build_csr_with_keystore(&*old, None).unwrap(),
        None,
    )
    .unwrap();
    let serial0 = check_chain(&resp.certificate_chain, &ca_pem, "rot-1", &spki(&*old));

    // same key
    let r1 = renew(
        &s.url,
        &s.pin,
        &resp.certificate_chain,
        old.clone(),
        &build_csr_with_keystore(&*old, None).unwrap(),
    )
    .unwrap();
    let serial1 = check_chain(&r1.certificate_chain, &ca_pem, "rot-1", &spki(&*old));
    assert_ne!(serial0, serial1);

    // rotation: authenticate with the old key, get a certificate for the new one
    let new = soft_key(&s.tmp.path().join("new"));
    let r2 = renew(
        &s.url,
        &s.pin,
        &r1.certificate_chain,
        old.clone(),
        &build_csr_with_keystore(&*new, None).unwrap(),
    )
    .unwrap();
    let serial2 = check_chain(&r2.certificate_chain, &ca_pem, "rot-1", &spki(&*new));
    let dev = &s.devices()[0];
    assert_eq!(dev.cert_serial, serial2);
    assert_eq!(
        dev.key_fingerprint,
        devid_keystore::fingerprint(&new.public_key())
    );
    // the new certificate works with the new key
    let r3 = renew(
        &s.url,
        &s.pin,
        &r2.certificate_chain,
        new.clone(),
        &build_csr_with_keystore(&*new, None).unwrap(),
    )
    .unwrap();
    // a certificate with the wrong key is refused on the device side
    assert!(matches!(
        renew(&s.url, &s.pin, &r3.certificate_chain, old.clone(), "x"),
        Err(EnrollError::CertKeyMismatch)
    ));

    let csr = build_csr_with_keystore(&*new, None).unwrap();
    assert!(s.cli(&["device", "suspend", "rot-1"]).contains("suspended"));
    let (st, code) =
        server_error(renew(&s.url, &s.pin, &r3.certificate_chain, new.clone(), &csr).unwrap_err());
    assert_eq!((st, code.as_str()), (403, "device_suspended"));
    assert_refused(&s, "renew", "device_suspended");
    assert!(s.cli(&["device", "resume", "rot-1"]).contains("active"));
    renew(&s.url, &s.pin, &r3.certificate_chain, new.clone(), &csr).unwrap();

    assert!(s.cli(&["device", "revoke", "rot-1"]).contains("revoked"));
    let (st, code) =
        server_error(renew(&s.url, &s.pin, &r3.certificate_chain, new.clone(), &csr).unwrap_err());
    assert_eq!((st, code.as_str()), (403, "device_revoked"));
    assert_refused(&s, "renew", "device_revoked");
    // revocation is permanent
    let out = s.cli_output(&["device", "resume", "rot-1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("device_revoked"));
    assert_refused(&s, "device.resume", "device_revoked");
    // and re-enrolment under the revoked id is refused
    let again = s.token(&["--device-id", "rot-1"]);
    let (st, code) = server_error(enroll(&s.url, &again, &s.pin, &csr, None).unwrap_err());
    assert_eq!((st, code.as_str()), (403, "device_revoked"));
    assert_eq!(s.devices()[0].state.as_str(), "revoked");

    let actions: Vec<String> = s
        .audit()
        .iter()
        .filter(|a| a.outcome == "ok")
        .map(|a| a.action.clone())
        .collect();
    for a in [
        "enroll",
        "renew",
        "device.suspend",
        "device.resume",
        "device.revoke",
    ] {
        assert!(
            actions.iter().any(|x| x == a),
            "{a} missing from {actions:?}"
        );
    }
}

#[test]
fn no_token_key_or_csr_in_logs_or_audit() {
    let s = Server::start();
    let token = s.token(&["--device-id", "quiet-1"]);
    let ks = soft_key(&s.tmp.path().join("dev"));
    let csr = build_csr_with_keystore(&*ks, None).unwrap();
    enroll(&s.url, &token, &s.pin, &csr, None).unwrap();
    let _ = enroll(&s.url, &token, &s.pin, &csr, None).unwrap_err();
    let unknown = "cd".repeat(32);
    let _ = enroll(&s.url, &unknown, &s.pin, &csr, None).unwrap_err();
    let audit_json = s.cli(&["audit", "--json"]);
    let audit_text = s.cli(&["audit"]);
    let log = s.log_text();
    assert!(log.contains("device enrolled"), "debug log is on: {log}");
    let admin = s.admin_token();
    let csr_body = csr.lines().nth(1).unwrap();
    let ca_key = std::fs::read_to_string(s.dir.join("ca-key.pem")).unwrap();
    let ca_key_body = ca_key.lines().nth(1).unwrap();
    let server_key = std::fs::read_to_string(s.dir.join("server-key.pem")).unwrap();
    let server_key_body = server_key.lines().nth(1).unwrap();
    for (name, haystack) in [
        ("log", &log),
        ("audit json", &audit_json),
        ("audit", &audit_text),
    ] {
        for (what, secret) in [
            ("enrolment token", token.as_str()),
            ("unknown token", unknown.as_str()),
            ("admin token", admin.as_str()),
            ("CSR", csr_body),
            ("CA key", ca_key_body),
            ("server key", server_key_body),
        ] {
            assert!(!haystack.contains(secret), "{what} found in {name}");
        }
    }
    // the database holds only hashes
    let db = std::fs::read(s.dir.join("devid-server.db")).unwrap();
    let wal = std::fs::read(s.dir.join("devid-server.db-wal")).unwrap_or_default();
    for bytes in [&db, &wal] {
        assert!(!devid_testkit::contains(bytes, token.as_bytes()));
        assert!(!devid_testkit::contains(bytes, admin.as_bytes()));
    }
    // private files are private
    use std::os::unix::fs::PermissionsExt;
    for f in [
        "ca-key.pem",
        "server-key.pem",
        "admin.token",
        "devid-server.db",
    ] {
        let mode = std::fs::metadata(s.dir.join(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
}

/// Review finding M2, through the real binary with its default limits: 300 enrolment requests
/// from one loopback address (127.0.0.2, as an attacker on another host would be) are
/// throttled with 429 and Retry-After after the burst, audited in aggregate, and a device
/// enrolling from 127.0.0.1 meanwhile is served.
#[test]
fn an_enrolment_flood_from_one_address_is_throttled() {
    let s = Server::start();
    let body = s.tmp.path().join("flood.json");
    std::fs::write(
        &body,
        serde_json::json!({"token": "0".repeat(64), "csr": "x"}).to_string(),
    )
    .unwrap();
    let url = format!("{}/v1/enroll", s.url);
    let data = format!("@{}", body.display());
    let ca = s.ca_pem_path();
    let mut args: Vec<&str> = vec![
        "-sS",
        "--interface",
        "127.0.0.2",
        "--cacert",
        ca.to_str().unwrap(),
        "-H",
        "content-type: application/json",
        "--data-binary",
        &data,
        "-w",
        "\n%{http_code} %header{retry-after}\n",
    ];
    for _ in 0..300 {
        args.push(&url);
    }
    let out = tool("curl", &args, s.tmp.path());
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let codes: Vec<(u16, String)> = text
        .lines()
        .filter_map(|l| {
            let (code, rest) = l.split_once(' ')?;
            Some((code.parse().ok()?, rest.to_owned()))
        })
        .collect();
    assert_eq!(codes.len(), 300, "{text}");
    let limited: Vec<_> = codes.iter().filter(|(c, _)| *c == 429).collect();
    assert!(
        limited.len() >= 150,
        "only {} of 300 requests from one address were throttled",
        limited.len()
    );
    assert!(limited
        .iter()
        .all(|(_, retry)| retry.parse::<u64>().is_ok_and(|s| s >= 1)));
    assert!(codes.iter().all(|(c, _)| *c == 429 || *c == 400));
    // the load balancer's health check is not rate-limited and sees both listeners up
    let ready = tool(
        "curl",
        &[
            "-sS",
            "--cacert",
            ca.to_str().unwrap(),
            &format!("{}/readyz", s.url),
        ],
        s.tmp.path(),
    );
    assert!(
        String::from_utf8_lossy(&ready.stdout).contains("\"ready\""),
        "{}",
        String::from_utf8_lossy(&ready.stdout)
    );
    // a device enrolling from another address is not affected
    let token = s.token(&["--device-id", "calm-1"]);
    let ks = soft_key(&s.tmp.path().join("calm"));
    let csr = build_csr_with_keystore(&*ks, None).unwrap();
    enroll(&s.url, &token, &s.pin, &csr, None).unwrap();
    // the flood left a handful of audit rows, not hundreds
    let rows: Vec<_> = s
        .audit()
        .into_iter()
        .filter(|a| a.action == "enroll" && a.outcome == "refused")
        .collect();
    assert!(
        rows.iter().any(|a| a.detail.starts_with("rate_limited")),
        "{rows:#?}"
    );
    assert!(
        rows.len() <= 4,
        "{} audit rows for one flood: {rows:#?}",
        rows.len()
    );
}

/// Review finding L5, through the real binary and CLI: a read-only credential made with
/// `credential create --read-only` reads the registry and is refused every change by the
/// server; revoking it ends it; the `admin` credential of `init` keeps working.
#[test]
fn named_credentials_read_only_and_revocation_through_the_cli() {
    let s = Server::start();
    let out = s.cli(&["credential", "create", "dashboard", "--read-only"]);
    let token = out.lines().last().unwrap().trim().to_owned();
    assert_eq!(token.len(), 64, "{out}");
    let file = s.tmp.path().join("dashboard.token");
    std::fs::write(&file, &token).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let f = file.to_str().unwrap();
    let token_for_device = s.token(&["--device-id", "ro-1"]);
    let ks = soft_key(&s.tmp.path().join("ro"));
    let csr = build_csr_with_keystore(&*ks, None).unwrap();
    enroll(&s.url, &token_for_device, &s.pin, &csr, None).unwrap();
    let listed = s.cli(&["device", "list", "--json", "--token-file", f]);
    assert!(listed.contains("ro-1"), "{listed}");
    let refused = s.cli_output(&["device", "revoke", "ro-1", "--token-file", f]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("read_only_credential"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert_eq!(s.devices()[0].state.as_str(), "active");
    let creds = s.cli(&["credential", "list", "--json"]);
    assert!(
        creds.contains("\"admin\"") && creds.contains("\"dashboard\""),
        "{creds}"
    );
    s.cli(&["credential", "revoke", "dashboard"]);
    let after = s.cli_output(&["device", "list", "--token-file", f]);
    assert!(!after.status.success());
    assert!(String::from_utf8_lossy(&after.stderr).contains("admin_unauthorized"));
    // the last admin credential cannot be revoked
    let last = s.cli_output(&["credential", "revoke", "admin"]);
    assert!(String::from_utf8_lossy(&last.stderr).contains("last_admin_credential"));
    let audit = s.audit();
    assert!(audit
        .iter()
        .any(|a| a.action == "credential.revoke" && a.outcome == "ok" && a.actor == "admin:admin"));
}
