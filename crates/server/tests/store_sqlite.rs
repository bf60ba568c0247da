//! The SQLite store: single-use tokens under concurrency, append-only audit, permanent
//! revocation, WAL mode.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Barrier};
use std::time::Duration;

use devid_proto::{DeviceId, DeviceState};
use devid_server_core::ca::Ca;
use devid_server_core::store::sqlite::SqliteStore;
use devid_server_core::store::{AuditCtx, EnrollAttempt, NewToken, Refusal, Store};
use devid_server_core::timeutil::now_ms;
use devid_server_core::token;
use rcgen::{KeyPair, PublicKeyData, PKCS_ECDSA_P256_SHA256};

fn ctx() -> AuditCtx {
    AuditCtx {
        actor: "test".into(),
        source: "127.0.0.1:1".into(),
        now_ms: now_ms(),
    }
}

fn new_token(store: &dyn Store, device: Option<&str>, ttl_ms: i64) -> String {
    let t = token::generate();
    store
        .create_token(
            &NewToken {
                hash: token::hash(&t),
                device_id: device.map(|d| DeviceId::parse(d).unwrap()),
                policy: "default".into(),
                expires_at_ms: now_ms() + ttl_ms,
            },
            &ctx(),
        )
        .unwrap();
    t.to_string()
}

fn enroll(
    store: &dyn Store,
    ca: &Ca,
    tok: &str,
    requested: Option<&str>,
) -> Result<DeviceId, Refusal> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let spki = key.subject_public_key_info();
    let requested = requested.map(|r| DeviceId::parse(r).unwrap());
    let c = ctx();
    let hash = token::hash(tok);
    let attempt = EnrollAttempt {
        token_hash: &hash,
        requested_id: requested.as_ref(),
        key_fingerprint: "fp",
        ctx: &c,
    };
    let mut issue = |id: &DeviceId| ca.issue_device(id, &spki, Duration::from_secs(3600), c.now_ms);
    store
        .enroll(&attempt, &mut issue)
        .unwrap()
        .map(|(rec, _)| rec.id)
}

#[test]
fn tokens_are_single_use_even_under_contention() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("db")).unwrap());
    let ca = Arc::new(Ca::generate("localhost", now_ms()).unwrap());
    for round in 0..5 {
        let tok = new_token(&*store, None, 60_000);
        let barrier = Arc::new(Barrier::new(4));
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let (store, ca, tok, barrier) =
                    (store.clone(), ca.clone(), tok.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    enroll(&*store, &ca, &tok, Some(&format!("r{round}-t{i}")))
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(
            results.iter().filter(|r| r.is_ok()).count(),
            1,
            "{results:?}"
        );
        assert!(results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .all(|e| *e == Refusal::TokenUsed));
    }
    assert_eq!(store.devices().unwrap().len(), 5);
}

#[test]
fn refusals_change_nothing_but_the_audit_log() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("db")).unwrap();
    let ca = Ca::generate("localhost", now_ms()).unwrap();
    assert_eq!(
        enroll(&store, &ca, &token::generate(), None),
        Err(Refusal::TokenUnknown)
    );
    let expired = new_token(&store, None, -1);
    assert_eq!(
        enroll(&store, &ca, &expired, None),
        Err(Refusal::TokenExpired)
    );
    let bound = new_token(&store, Some("dev-a"), 60_000);
    assert_eq!(
        enroll(&store, &ca, &bound, Some("dev-b")),
        Err(Refusal::TokenBoundToOther)
    );
    assert!(store.devices().unwrap().is_empty());
    // the mismatch did not consume the token
    assert_eq!(enroll(&store, &ca, &bound, None).unwrap().as_str(), "dev-a");
    // an unbound token cannot take over an existing id
    let other = new_token(&store, None, 60_000);
    assert_eq!(
        enroll(&store, &ca, &other, Some("dev-a")),
        Err(Refusal::DeviceExists)
    );
    // generated ids are UUID v4
    let id = enroll(&store, &ca, &other, None).unwrap();
    assert_eq!(id.as_str().len(), 36);
    let audit = store.audit_log(100, None).unwrap();
    let refused: Vec<_> = audit
        .iter()
        .filter(|a| a.action == "enroll" && a.outcome == "refused")
        .map(|a| a.detail.as_str())
        .collect();
    assert_eq!(
        refused,
        [
            "token_unknown",
            "token_expired",
            "token_device_mismatch",
            "device_exists"
        ]
    );
}

#[test]
fn revocation_is_permanent_and_audit_is_append_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let store = SqliteStore::open(&path).unwrap();
    let ca = Ca::generate("localhost", now_ms()).unwrap();
    let id = enroll(&store, &ca, &new_token(&store, Some("dev-r"), 60_000), None).unwrap();
    let c = ctx();
    assert_eq!(
        store
            .set_state(&id, DeviceState::Suspended, &c)
            .unwrap()
            .unwrap()
            .state,
        DeviceState::Suspended
    );
    assert_eq!(
        store
            .set_state(&id, DeviceState::Active, &c)
            .unwrap()
            .unwrap()
            .state,
        DeviceState::Active
    );
    store
        .set_state(&id, DeviceState::Revoked, &c)
        .unwrap()
        .unwrap();
    assert_eq!(
        store.set_state(&id, DeviceState::Active, &c).unwrap(),
        Err(Refusal::DeviceRevoked)
    );
    // re-enrolment of a revoked id is refused even with a token bound to it
    let tok = new_token(&store, Some("dev-r"), 60_000);
    assert_eq!(enroll(&store, &ca, &tok, None), Err(Refusal::DeviceRevoked));

    // below the API, the database itself refuses
    let raw = rusqlite::Connection::open(&path).unwrap();
    assert!(raw
        .execute("UPDATE devices SET state = 'active' WHERE id = 'dev-r'", [])
        .is_err());
    assert!(raw.execute("DELETE FROM audit", []).is_err());
    assert!(raw.execute("UPDATE audit SET outcome = 'ok'", []).is_err());
    let mode: String = raw
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    // tokens are stored hashed only
    let stored: Vec<String> = raw
        .prepare("SELECT token_hash FROM enrollment_tokens")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    assert!(stored.contains(&token::hash(&tok)));
    assert!(!stored.contains(&tok));
}
