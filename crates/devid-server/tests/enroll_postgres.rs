//! End to end on PostgreSQL: the real `devid-server` binary initialised with
//! `--db postgres://...` against a throwaway cluster (SCRAM password on 127.0.0.1). The
//! enrolment scenarios of `enroll_e2e.rs` (enrol, replay, expiry, wrong id, racing
//! enrolments, renewal, suspend/resume/revoke), then two `run` nodes on one database.
#![allow(clippy::unwrap_used)]

mod common;
mod enroll_support;

use std::sync::{Arc, Barrier};

use common::{check_chain, Server};
use devid_enroll::{build_csr_with_keystore, enroll, renew};
use devid_testkit::postgres::PgCluster;
use enroll_support::{assert_refused, server_error, soft_key, spki};

/// Two enrolments race for each token, against `a` and `b` (the same server or two nodes):
/// exactly one wins every round, the loser gets 409 token_used.
fn race(a: &Server, b: &Server, rounds: usize, tag: &str) {
    for round in 0..rounds {
        let token = a.token(&[]);
        let barrier = Arc::new(Barrier::new(2));
        let handles: Vec<_> = [a, b]
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let ks = soft_key(&a.tmp.path().join(format!("{tag}-{round}-{i}")));
                let csr = build_csr_with_keystore(&*ks, None).unwrap();
                let (url, pin, token, barrier) =
                    (s.url.clone(), s.pin.clone(), token.clone(), barrier.clone());
                let id = format!("{tag}-{round}-{i}");
                std::thread::spawn(move || {
                    barrier.wait();
                    enroll(&url, &token, &pin, &csr, Some(&id))
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(
            results.iter().filter(|r| r.is_ok()).count(),
            1,
            "round {round}: {results:?}"
        );
        let loser = results.into_iter().find_map(|r| r.err()).unwrap();
        assert_eq!(server_error(loser), (409, "token_used".to_owned()));
    }
}

#[test]
fn enrolment_flow_on_postgres() {
    let pg = PgCluster::start();
    let url = pg.url();
    let s = Server::start_with(&["--db", &url]);
    let ca_pem = std::fs::read_to_string(s.ca_pem_path()).unwrap();

    // enrol
    let token = s.token(&["--device-id", "pg-dev-1", "--policy", "lab"]);
    let ks = soft_key(&s.tmp.path().join("dev"));
    let csr = build_csr_with_keystore(&*ks, None).unwrap();
    let resp = enroll(&s.url, &token, &s.pin, &csr, None).unwrap();
    assert_eq!(resp.device_id, "pg-dev-1");
    let serial0 = check_chain(&resp.certificate_chain, &ca_pem, "pg-dev-1", &spki(&*ks));
    let devices = s.devices();
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0].policy, "lab");
    assert_eq!(devices[0].cert_serial, serial0);
    // the rows are in PostgreSQL, not in an SQLite file
    assert!(!s.dir.join("devid-server.db").exists());
    assert_eq!(
        pg.psql("devid", "SELECT state FROM devices WHERE id = 'pg-dev-1'")
            .trim(),
        "active"
    );

    // replay
    let (st, code) = server_error(enroll(&s.url, &token, &s.pin, &csr, None).unwrap_err());
    assert_eq!((st, code.as_str()), (409, "token_used"));
    assert_refused(&s, "enroll", "token_used");
    // expiry
    let expiring = s.token(&["--ttl", "1s"]);
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let (st, code) = server_error(enroll(&s.url, &expiring, &s.pin, &csr, None).unwrap_err());
    assert_eq!((st, code.as_str()), (401, "token_expired"));
    assert_refused(&s, "enroll", "token_expired");
    // wrong id
    let bound = s.token(&["--device-id", "pg-a"]);
    let (st, code) = server_error(enroll(&s.url, &bound, &s.pin, &csr, Some("pg-b")).unwrap_err());
    assert_eq!((st, code.as_str()), (403, "token_device_mismatch"));
    assert_refused(&s, "enroll", "token_device_mismatch");
    // unknown token
    let (st, code) =
        server_error(enroll(&s.url, &"ab".repeat(32), &s.pin, &csr, None).unwrap_err());
    assert_eq!((st, code.as_str()), (401, "token_unknown"));
    assert_eq!(s.devices().len(), 1, "refusals created nothing");

    // two concurrent enrolments racing for one token: exactly one wins
    race(&s, &s, 5, "race");
    assert_eq!(s.devices().len(), 6);

    // renewal, rotation of the key
    let r1 = renew(&s.url, &s.pin, &resp.certificate_chain, ks.clone(), &csr).unwrap();
    let serial1 = check_chain(&r1.certificate_chain, &ca_pem, "pg-dev-1", &spki(&*ks));
    assert_ne!(serial0, serial1);
    let new = soft_key(&s.tmp.path().join("new"));
    let new_csr = build_csr_with_keystore(&*new, None).unwrap();
    let r2 = renew(&s.url, &s.pin, &r1.certificate_chain, ks.clone(), &new_csr).unwrap();
    check_chain(&r2.certificate_chain, &ca_pem, "pg-dev-1", &spki(&*new));

    // suspend, resume, revoke
    assert!(s
        .cli(&["device", "suspend", "pg-dev-1"])
        .contains("suspended"));
    let (st, code) = server_error(
        renew(&s.url, &s.pin, &r2.certificate_chain, new.clone(), &new_csr).unwrap_err(),
    );
    assert_eq!((st, code.as_str()), (403, "device_suspended"));
    assert!(s.cli(&["device", "resume", "pg-dev-1"]).contains("active"));
    renew(&s.url, &s.pin, &r2.certificate_chain, new.clone(), &new_csr).unwrap();
    assert!(s.cli(&["device", "revoke", "pg-dev-1"]).contains("revoked"));
    let (st, code) = server_error(
        renew(&s.url, &s.pin, &r2.certificate_chain, new.clone(), &new_csr).unwrap_err(),
    );
    assert_eq!((st, code.as_str()), (403, "device_revoked"));
    assert_refused(&s, "renew", "device_revoked");
    let out = s.cli_output(&["device", "resume", "pg-dev-1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("device_revoked"));
    let again = s.token(&["--device-id", "pg-dev-1"]);
    let (st, code) = server_error(enroll(&s.url, &again, &s.pin, &new_csr, None).unwrap_err());
    assert_eq!((st, code.as_str()), (403, "device_revoked"));

    // the database password is in no log line, and the config holding it is private
    let log = s.log_text();
    assert!(log.contains("PostgreSQL store ready"), "{log}");
    assert!(log.contains("postgres:***@127.0.0.1"), "{log}");
    assert!(
        !log.contains(pg.password()),
        "the database password leaked into the log"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(s.dir.join("devid-server.toml"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn two_nodes_share_one_database() {
    let pg = PgCluster::start();
    let url = pg.url();
    let a = Server::start_with(&["--db", &url]);
    let b = a.another_node();
    assert_ne!(a.port, b.port);
    let ca_pem = std::fs::read_to_string(a.ca_pem_path()).unwrap();

    // a token created through node A is consumed by an enrolment on node B
    let token = a.token(&["--device-id", "multi-1"]);
    let ks = soft_key(&a.tmp.path().join("dev"));
    let csr = build_csr_with_keystore(&*ks, None).unwrap();
    let resp = enroll(&b.url, &token, &b.pin, &csr, None).unwrap();
    check_chain(&resp.certificate_chain, &ca_pem, "multi-1", &spki(&*ks));
    // replay on A fails
    let (st, code) = server_error(enroll(&a.url, &token, &a.pin, &csr, None).unwrap_err());
    assert_eq!((st, code.as_str()), (409, "token_used"));
    assert_refused(&a, "enroll", "token_used");
    // both nodes see one registry and one audit log
    assert_eq!(a.devices(), b.devices());
    assert_eq!(a.audit(), b.audit());
    assert!(b.log_text().contains("device enrolled"));

    // a revocation on B holds on A
    assert!(b.cli(&["device", "revoke", "multi-1"]).contains("revoked"));
    let (st, code) =
        server_error(renew(&a.url, &a.pin, &resp.certificate_chain, ks.clone(), &csr).unwrap_err());
    assert_eq!((st, code.as_str()), (403, "device_revoked"));

    // enrolments on both nodes racing for one token: exactly one wins every round
    race(&a, &b, 8, "multi-race");
    assert_eq!(a.devices().len(), 9);
}
