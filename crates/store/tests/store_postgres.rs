//! The PostgreSQL store on a real throwaway cluster (`initdb` + `pg_ctl`, SCRAM password on
//! 127.0.0.1): the shared store contract (`store_scenarios`), plus what only PostgreSQL shows:
//! triggers refuse to undo a revocation or edit the audit log, migrations are idempotent and
//! safe with several nodes starting at once, two stores (two nodes) on one database share
//! tokens, and the password never appears in an error.
#![allow(clippy::unwrap_used)]

mod store_scenarios;

use std::sync::{Arc, Barrier};

use devid_store::token;
use devid_store::Registry;
use devid_store_postgres::{PostgresStore, MIGRATIONS};
use devid_testkit::postgres::PgCluster;

fn open(pg: &PgCluster) -> Arc<dyn Registry> {
    Arc::new(PostgresStore::open(&pg.url()).unwrap())
}

#[test]
fn store_contract_on_postgres() {
    let pg = PgCluster::start();
    store_scenarios::tokens_are_single_use_even_under_contention(open(&pg));
    let url = pg.create_database("race");
    store_scenarios::two_tokens_racing_for_one_new_id(Arc::new(PostgresStore::open(&url).unwrap()));
    let url = pg.create_database("refusals");
    store_scenarios::refusals_change_nothing_but_the_audit_log(&PostgresStore::open(&url).unwrap());
    let url = pg.create_database("renewal");
    store_scenarios::renewal_and_reenrolment(&PostgresStore::open(&url).unwrap());
    let url = pg.create_database("creds");
    store_scenarios::admin_credentials_are_named_revocable_and_audited(
        &PostgresStore::open(&url).unwrap(),
    );
    let url = pg.create_database("h1");
    store_scenarios::renewal_accepts_only_the_current_certificate_or_its_unused_predecessor(
        &PostgresStore::open(&url).unwrap(),
    );
    let url = pg.create_database("seen");
    store_scenarios::last_seen_only_moves_forward(&PostgresStore::open(&url).unwrap());
    let url = pg.create_database("pages");
    store_scenarios::device_pages_filters_and_counts(&PostgresStore::open(&url).unwrap());
    let url = pg.create_database("lookup");
    assert_eq!(
        store_scenarios::try_device_now_agrees_with_device(&PostgresStore::open(&url).unwrap()),
        0,
        "a networked store never reads on the caller's thread"
    );
}

#[test]
fn revocation_is_permanent_and_audit_is_append_only() {
    let pg = PgCluster::start();
    let store = open(&pg);
    let tok = store_scenarios::revocation_is_permanent(&*store);

    // below the API, the database itself refuses (as the superuser, even)
    for sql in [
        "UPDATE devices SET state = 'active' WHERE id = 'dev-r'",
        "DELETE FROM devices WHERE id = 'dev-r'",
        "DELETE FROM audit",
        "UPDATE audit SET outcome = 'ok'",
        "TRUNCATE audit",
    ] {
        let out = pg.psql_output("devid", sql);
        assert!(!out.status.success(), "{sql} must be refused");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("append-only") || err.contains("revocation is permanent"),
            "{sql}: {err}"
        );
    }
    assert_eq!(
        pg.psql("devid", "SELECT state FROM devices WHERE id = 'dev-r'")
            .trim(),
        "revoked"
    );
    // tokens are stored hashed only
    let stored = pg.psql("devid", "SELECT token_hash FROM enrollment_tokens");
    assert!(stored.contains(&token::hash(&tok)));
    assert!(!stored.contains(&tok));
    assert_eq!(
        pg.psql(
            "devid",
            "SELECT value FROM meta WHERE key = 'schema_version'"
        )
        .trim(),
        MIGRATIONS.len().to_string()
    );
}

#[test]
fn migrations_are_idempotent_and_serialised_across_nodes() {
    let pg = PgCluster::start();
    // eight "nodes" start at once on an empty database
    let barrier = Arc::new(Barrier::new(8));
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let (url, barrier) = (pg.url(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                PostgresStore::open(&url).map(|_| ())
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap().unwrap();
    }
    assert_eq!(
        pg.psql(
            "devid",
            "SELECT value FROM meta WHERE key = 'schema_version'"
        )
        .trim(),
        MIGRATIONS.len().to_string()
    );
    // one trigger set, not eight
    assert_eq!(
        pg.psql(
            "devid",
            "SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal"
        )
        .trim(),
        "4"
    );
    // data survives a restart of the node (reopen)
    let a = open(&pg);
    let tok = store_scenarios::new_token(&*a, None, 60_000);
    drop(a);
    let b = open(&pg);
    let ca = devid_ca::Ca::generate("localhost", 0).unwrap();
    assert!(store_scenarios::enroll(&*b, &ca, &tok, Some("after-restart")).is_ok());
}

#[test]
fn two_nodes_share_tokens_and_the_registry() {
    let pg = PgCluster::start();
    let node_a = open(&pg);
    let node_b = open(&pg);
    let ca = devid_ca::Ca::generate("localhost", 0).unwrap();
    let tok = store_scenarios::new_token(&*node_a, None, 60_000);
    assert!(store_scenarios::enroll(&*node_b, &ca, &tok, Some("shared-1")).is_ok());
    assert_eq!(
        store_scenarios::enroll(&*node_a, &ca, &tok, Some("shared-2")),
        Err(devid_store::Refusal::TokenUsed)
    );
    assert_eq!(node_a.devices().unwrap().len(), 1);
    // both nodes race for one token, many times: exactly one wins each round
    let ca = Arc::new(ca);
    for round in 0..10 {
        let tok = store_scenarios::new_token(&*node_a, None, 60_000);
        let barrier = Arc::new(Barrier::new(2));
        let handles: Vec<_> = [node_a.clone(), node_b.clone()]
            .into_iter()
            .enumerate()
            .map(|(i, node)| {
                let (ca, tok, barrier) = (ca.clone(), tok.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    store_scenarios::enroll(&*node, &ca, &tok, Some(&format!("n{round}-{i}")))
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(
            results.iter().filter(|r| r.is_ok()).count(),
            1,
            "{results:?}"
        );
    }
    assert_eq!(node_b.devices().unwrap().len(), 11);
}

#[test]
fn the_password_never_appears_in_errors() {
    let pg = PgCluster::start();
    let wrong = format!("wrong-{}", pg.password());
    let url = pg.url().replace(pg.password(), &wrong);
    let err = PostgresStore::open(&url).unwrap_err().to_string();
    assert!(!err.contains(&wrong), "{err}");
    assert!(!err.contains(pg.password()), "{err}");
    assert!(err.contains("postgres:***@127.0.0.1"), "{err}");
    assert!(err.contains("password authentication failed"), "{err}");
    let store = PostgresStore::open(&pg.url()).unwrap();
    let shown = format!("{store:?} {}", store.url_redacted());
    assert!(!shown.contains(pg.password()), "{shown}");
    // a server that is not there
    let port = devid_testkit::free_port();
    let url = format!(
        "postgres://postgres:{}@127.0.0.1:{port}/devid",
        pg.password()
    );
    let err = PostgresStore::open(&url).unwrap_err().to_string();
    assert!(!err.contains(pg.password()), "{err}");
    assert!(err.contains("connect"), "{err}");
}

fn msg(dev: &str, n: u32, msg_id: Option<&str>) -> devid_store::NewMessage {
    devid_store::NewMessage {
        device_id: Arc::from(dev),
        topic: format!("devices/{dev}/telemetry/t").into(),
        payload: devid_mqtt::Bytes::from(format!("p{n}")),
        qos: 1,
        msg_id: msg_id.map(Into::into),
        received_ms: 1_000 + i64::from(n),
    }
}

#[test]
fn messages_batches_idempotency_and_paging() {
    use devid_store::{Appended, MessageStore};
    let pg = PgCluster::start();
    let s = PostgresStore::open(&pg.url()).unwrap();
    let r = s
        .append_batch(&[
            msg("a", 1, Some("k1")),
            msg("a", 2, None),
            msg("b", 3, Some("k1")),
            msg("a", 4, Some("k1")),
        ])
        .unwrap();
    assert!(matches!(r[0], Appended::Stored(_)));
    assert!(matches!(r[1], Appended::Stored(_)));
    assert!(matches!(r[2], Appended::Stored(_)), "msg-id is per device");
    assert_eq!(r[3], Appended::Duplicate);
    let r = s
        .append_batch(&[msg("a", 5, Some("k1")), msg("a", 6, None)])
        .unwrap();
    assert_eq!(r[0], Appended::Duplicate);
    assert!(matches!(r[1], Appended::Stored(_)));
    assert!(s.append_batch(&[]).unwrap().is_empty());
    let a = devid_proto::DeviceId::parse("a").unwrap();
    let all = s.list(&a, None, 100).unwrap();
    let payloads: Vec<_> = all.iter().map(|m| m.payload.clone()).collect();
    assert_eq!(
        payloads,
        vec![b"p1".to_vec(), b"p2".to_vec(), b"p6".to_vec()]
    );
    assert_eq!(s.list(&a, None, 1).unwrap()[0].payload, b"p6");
    let page = s.list(&a, Some(all[0].id), 1).unwrap();
    assert_eq!(page[0].id, all[1].id);
    assert_eq!(all[0].msg_id.as_deref(), Some("k1"));
    assert_eq!(all[0].topic, "devices/a/telemetry/t");
    assert_eq!((all[0].qos, all[0].received_ms), (1, 1_001));

    // a failing batch stores nothing: a NUL byte in a topic is refused by PostgreSQL TEXT
    let mut bad = msg("c", 7, None);
    bad.topic = "devices/c/\u{0}".into();
    assert!(s.append_batch(&[msg("c", 8, Some("x")), bad]).is_err());
    let c = devid_proto::DeviceId::parse("c").unwrap();
    assert!(s.list(&c, None, 10).unwrap().is_empty());

    // two nodes receive the same redeliveries at once: each message is stored exactly once
    let nodes: Vec<Arc<PostgresStore>> = (0..2)
        .map(|_| Arc::new(PostgresStore::open(&pg.url()).unwrap()))
        .collect();
    let barrier = Arc::new(Barrier::new(2));
    let handles: Vec<_> = nodes
        .iter()
        .map(|n| {
            let (n, barrier) = (n.clone(), barrier.clone());
            std::thread::spawn(move || {
                let batch: Vec<_> = (0..200)
                    .map(|i| msg("d", i, Some(&format!("m{i}"))))
                    .collect();
                barrier.wait();
                n.append_batch(&batch).unwrap()
            })
        })
        .collect();
    let results: Vec<Vec<Appended>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for i in 0..200 {
        let stored = results
            .iter()
            .filter(|r| matches!(r[i], Appended::Stored(_)))
            .count();
        assert_eq!(stored, 1, "message {i}");
    }
    let d = devid_proto::DeviceId::parse("d").unwrap();
    assert_eq!(s.list(&d, None, 1000).unwrap().len(), 200);
}

/// `devid-server run` opens the store inside its async runtime and drops it there at shutdown;
/// the sync client's own runtimes must not panic either way.
#[test]
fn open_and_drop_inside_an_async_runtime() {
    let pg = PgCluster::start();
    let url = pg.url();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let store: Arc<dyn Registry> = Arc::new(PostgresStore::open(&url).unwrap());
        let s = store.clone();
        let tok =
            tokio::task::spawn_blocking(move || store_scenarios::new_token(&*s, None, 60_000))
                .await
                .unwrap();
        let s = store.clone();
        let rows = tokio::task::spawn_blocking(move || s.audit_log(10, None).unwrap())
            .await
            .unwrap();
        assert_eq!(rows.len(), 1);
        assert!(!tok.is_empty());
        drop(store);
    });
}
