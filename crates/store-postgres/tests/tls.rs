//! TLS to a real PostgreSQL (Debian's, started by the test kit with `ssl = on`, a test CA's
//! server certificate, and TCP accepted over TLS only), for each sslmode; and the password
//! read from a private file.
#![allow(clippy::unwrap_used, missing_docs)]

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devid_proto::{DeviceId, DeviceState};
use devid_store::{DeviceLookup, Registry, StateChangeSink};
use devid_store_postgres::{ConnectOptions, PostgresStore};
use devid_testkit::postgres::PgCluster;

/// A write and a read through the pool: the registry works over this connection.
fn round_trip(store: &PostgresStore) {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let hash = format!("tls-round-trip-{}-{n}", std::process::id());
    let ctx = devid_store::AuditCtx {
        actor: "test".into(),
        source: "local".into(),
        now_ms: 1,
    };
    store
        .add_admin_credential(&format!("rt-{n}"), devid_store::Role::Admin, &hash, &ctx)
        .unwrap()
        .unwrap();
    assert!(store.admin_credential(&hash).unwrap().is_some());
    assert!(store.admin_credential("no-such-hash").unwrap().is_none());
}

fn open_err(url: &str) -> String {
    PostgresStore::open(url).unwrap_err().to_string()
}

/// Every connection the store made, as the server sees it, is encrypted.
fn assert_all_encrypted(pg: &PgCluster) {
    assert_eq!(
        pg.connections_by_ssl("devid", "devid-server", false),
        0,
        "a devid connection without TLS"
    );
    assert!(pg.connections_by_ssl("devid", "devid-server", true) >= 1);
}

struct Seen(std::sync::Mutex<Vec<(String, DeviceState)>>);
impl StateChangeSink for Seen {
    fn state_changed(&self, id: &DeviceId, state: DeviceState) {
        self.0.lock().unwrap().push((id.as_str().to_owned(), state));
    }
}

#[test]
fn verify_full_with_the_right_ca_works_on_every_connection() {
    let pg = PgCluster::start_tls(&["localhost", "127.0.0.1"]);
    let store = PostgresStore::open(&pg.tls_url("verify-full")).unwrap();
    round_trip(&store);
    // the LISTEN thread's own connection uses the same connector
    let sink: Arc<dyn StateChangeSink> = Arc::new(Seen(Default::default()));
    assert!(store.follow_state_changes(Arc::downgrade(&sink)).unwrap());
    let start = Instant::now();
    while pg.connections_by_ssl("devid", "devid-server:listen", true) < 1 {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the listener did not connect over TLS: {}",
            pg.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_all_encrypted(&pg);
}

#[test]
fn verify_full_with_a_wrong_ca_is_refused() {
    let pg = PgCluster::start_tls(&["localhost", "127.0.0.1"]);
    let other = pg.tls().other_ca_file.display().to_string();
    let url = format!("{}?sslmode=verify-full&sslrootcert={other}", pg.url());
    let err = open_err(&url);
    eprintln!("wrong CA: {err}");
    assert!(
        err.contains(&format!(
            "the database server's certificate does not chain to sslrootcert={other}"
        )),
        "{err}"
    );
    assert!(!err.contains(pg.password()), "{err}");
    // verify-ca checks the chain as well
    let err = open_err(&url.replace("verify-full", "verify-ca"));
    assert!(err.contains("does not chain to sslrootcert"), "{err}");
}

#[test]
fn host_name_mismatch_is_refused_under_verify_full_and_accepted_by_verify_ca() {
    // the certificate names another host than the 127.0.0.1 the URL connects to
    let pg = PgCluster::start_tls(&["db.devid.test"]);
    let err = open_err(&pg.tls_url("verify-full"));
    eprintln!("host name mismatch: {err}");
    assert!(
        err.contains("the database server's certificate is not valid for the host name 127.0.0.1"),
        "{err}"
    );
    // verify-ca: the chain is right, the name is not checked
    let store = PostgresStore::open(&pg.tls_url("verify-ca")).unwrap();
    round_trip(&store);
    assert_all_encrypted(&pg);
}

#[test]
fn require_encrypts_without_checking_the_certificate() {
    let pg = PgCluster::start_tls(&["db.devid.test"]);
    // wrong name and no CA: require does not look at the certificate (libpq's semantics)
    let store = PostgresStore::open(&format!("{}?sslmode=require", pg.url())).unwrap();
    round_trip(&store);
    assert_all_encrypted(&pg);
    // prefer (the default when sslmode is missing) takes the TLS the server offers
    drop(store);
    let store = PostgresStore::open(&pg.url()).unwrap();
    round_trip(&store);
    assert_all_encrypted(&pg);
}

#[test]
fn require_against_a_server_without_tls_says_so() {
    let pg = PgCluster::start();
    let err = open_err(&format!("{}?sslmode=require", pg.url()));
    eprintln!("require, no TLS on the server: {err}");
    assert!(
        err.contains("the database server does not accept TLS, and sslmode=require requires it"),
        "{err}"
    );
    let err = open_err(&format!(
        "{}?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
        pg.url()
    ));
    assert!(
        err.contains("cannot read sslrootcert=/nonexistent/ca.pem"),
        "{err}"
    );
    // prefer falls back to plaintext when the server has no TLS, as libpq does
    round_trip(&PostgresStore::open(&pg.url()).unwrap());
    round_trip(&PostgresStore::open(&format!("{}?sslmode=disable", pg.url())).unwrap());
}

/// The TLS-only cluster really refuses a client without TLS: the tests above that see TLS
/// connections are not passing because the server would have taken plaintext anyway.
#[test]
fn a_client_without_tls_is_refused_by_the_tls_only_cluster() {
    let pg = PgCluster::start_tls(&["localhost", "127.0.0.1"]);
    let err = open_err(&format!("{}?sslmode=disable", pg.url()));
    eprintln!("no TLS against the TLS-only cluster: {err}");
    assert!(err.contains("no encryption"), "{err}");
    assert!(!err.contains(pg.password()), "{err}");
}

#[test]
fn the_password_comes_from_a_private_file() {
    let pg = PgCluster::start_tls(&["localhost", "127.0.0.1"]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("db.password");
    std::fs::write(&file, format!("{}\n", pg.password())).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let url = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        pg.url_without_password(),
        pg.tls().ca_file.display()
    );
    let opts = ConnectOptions {
        password_file: Some(file.clone()),
    };
    let store = PostgresStore::open_with(&url, &opts).unwrap();
    round_trip(&store);
    assert!(!format!("{store:?}").contains(pg.password()));
    assert!(!store.url_redacted().contains(pg.password()));
    drop(store);

    // without the file: the server asks for a password the client does not have
    assert!(PostgresStore::open(&url).is_err());
    // a wrong password in the file: refused, and the file's content is in no message
    std::fs::write(&file, "not-the-password-0x5eed\n").unwrap();
    let err = PostgresStore::open_with(&url, &opts)
        .unwrap_err()
        .to_string();
    assert!(err.contains("password authentication failed"), "{err}");
    assert!(!err.contains("not-the-password-0x5eed"), "{err}");
    // readable by others: refused before connecting
    std::fs::write(&file, format!("{}\n", pg.password())).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = PostgresStore::open_with(&url, &opts)
        .unwrap_err()
        .to_string();
    assert!(err.contains("chmod 600"), "{err}");
    assert!(!err.contains(pg.password()), "{err}");
    // a password in the URL and a file: ambiguous, refused
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let err = PostgresStore::open_with(&pg.tls_url("verify-full"), &opts)
        .unwrap_err()
        .to_string();
    assert!(err.contains("keep only the file"), "{err}");
    assert!(!err.contains(pg.password()), "{err}");
}
