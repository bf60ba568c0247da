//! The SQLite store: the shared store contract (`store_scenarios`), plus what only SQLite
//! shows: the database file itself refuses to undo a revocation or edit the audit log, WAL
//! mode, tokens stored hashed.
#![allow(clippy::unwrap_used)]

mod store_scenarios;

use std::sync::Arc;

use devid_store::token;
use devid_store::{DeviceLookup, Registry};
use devid_store_sqlite::SqliteStore;

fn open(dir: &tempfile::TempDir) -> Arc<dyn Registry> {
    Arc::new(SqliteStore::open(&dir.path().join("db")).unwrap())
}

#[test]
fn tokens_are_single_use_even_under_contention() {
    let dir = tempfile::tempdir().unwrap();
    store_scenarios::tokens_are_single_use_even_under_contention(open(&dir));
}

#[test]
fn two_tokens_racing_for_one_new_id() {
    let dir = tempfile::tempdir().unwrap();
    store_scenarios::two_tokens_racing_for_one_new_id(open(&dir));
}

#[test]
fn refusals_change_nothing_but_the_audit_log() {
    let dir = tempfile::tempdir().unwrap();
    store_scenarios::refusals_change_nothing_but_the_audit_log(&*open(&dir));
}

#[test]
fn renewal_and_reenrolment() {
    let dir = tempfile::tempdir().unwrap();
    store_scenarios::renewal_and_reenrolment(&*open(&dir));
}

#[test]
fn renewal_accepts_only_the_current_certificate_or_its_unused_predecessor() {
    let dir = tempfile::tempdir().unwrap();
    store_scenarios::renewal_accepts_only_the_current_certificate_or_its_unused_predecessor(
        &*open(&dir),
    );
}

#[test]
fn a_database_of_schema_version_1_opens_and_is_migrated_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    {
        let raw = rusqlite::Connection::open(&path).unwrap();
        raw.execute_batch(devid_store_sqlite::SCHEMA).unwrap();
        raw.execute(
            "INSERT INTO devices (id, state, cert_serial, cert_not_after, key_fingerprint, \
             policy, created_at, enrolled_at, last_seen) \
             VALUES ('old-1', 'active', 'abcd', 1, 'fp', 'default', 1, 1, 1)",
            [],
        )
        .unwrap();
        // the admin token `init` made in version 1
        raw.execute(
            "INSERT INTO admin_credentials (token_hash, created_at) VALUES ('h-old', 1)",
            [],
        )
        .unwrap();
    }
    let store = SqliteStore::open(&path).unwrap();
    let id = devid_proto::DeviceId::parse("old-1").unwrap();
    let rec = store.device(&id).unwrap().unwrap();
    assert_eq!((rec.cert_serial.as_str(), rec.predecessor), ("abcd", None));
    // schema 4: nothing reported for a device enrolled before devices reported a backend
    assert_eq!(rec.reported_backend, None);
    // schema 5: a device enrolled before attestation has none registered
    use devid_store::Registry;
    assert_eq!(store.attestation(&id).unwrap(), None);
    assert!(store.attestations().unwrap().is_empty());
    // existing installs keep working: the old admin token is now the credential `admin`
    let admin = store.admin_credential("h-old").unwrap().unwrap();
    assert_eq!(
        (admin.name.as_str(), admin.role),
        ("admin", devid_store::Role::Admin)
    );
    drop(store);
    let raw = rusqlite::Connection::open(&path).unwrap();
    let v: String = raw
        .query_row(
            "SELECT value FROM meta WHERE key = 'schema_version'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(v, "5");
    // and opening again changes nothing
    drop(raw);
    SqliteStore::open(&path).unwrap();
}

#[test]
fn admin_credentials_are_named_revocable_and_audited() {
    let dir = tempfile::tempdir().unwrap();
    store_scenarios::admin_credentials_are_named_revocable_and_audited(&*open(&dir));
}

#[test]
fn revocation_is_permanent_and_audit_is_append_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let store = SqliteStore::open(&path).unwrap();
    let tok = store_scenarios::revocation_is_permanent(&store);

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
    // reopening is idempotent
    drop(store);
    let again = SqliteStore::open(&path).unwrap();
    assert_eq!(again.devices().unwrap().len(), 1);
}

#[test]
fn the_registry_read_at_connect_is_answered_in_place() {
    let dir = tempfile::tempdir().unwrap();
    // nothing else holds the connection, so every lookup is answered at once
    assert_eq!(
        store_scenarios::try_device_now_agrees_with_device(&*open(&dir)),
        3
    );
}

#[test]
fn last_seen_only_moves_forward() {
    let dir = tempfile::tempdir().unwrap();
    store_scenarios::last_seen_only_moves_forward(&*open(&dir));
}

#[test]
fn device_pages_filters_and_counts() {
    let dir = tempfile::tempdir().unwrap();
    store_scenarios::device_pages_filters_and_counts(&*open(&dir));
}
