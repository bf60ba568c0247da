//! Telemetry on PostgreSQL: two `devid-server run` nodes on one database; a device publishes
//! through node B's MQTT listener (mosquitto_pub, MQTT 5, QoS 1) and node A serves the stored
//! rows (the message store is the shared database, not a per-node file). A device revoked or
//! suspended through one node loses its live session on the other at once (LISTEN/NOTIFY),
//! not only at the next periodic registry re-check, and a node that was not listening when
//! the change committed catches up when it listens again. The revocation test runs over TLS
//! too (sslmode=verify-full).
#![allow(clippy::unwrap_used)]

mod common;
mod ingest_support;

use std::time::{Duration, Instant};

use common::Server;
use devid_mqtt::{reason, Protocol};
use devid_testkit::postgres::PgCluster;
use ingest_support::*;

#[test]
fn messages_published_on_one_node_are_read_on_the_other() {
    let pg = PgCluster::start();
    let url = pg.url();
    let a = Server::start_with(&["--db", &url]);
    let b = a.another_node();
    let dev = enrol(&a, "pg-sensor", "default");

    let (ok, out) = mosquitto_pub(
        &b,
        &dev,
        "mqttv5",
        &[
            "-q",
            "1",
            "-t",
            &dev.topic("telemetry/temp"),
            "-m",
            "pg-21.5",
        ],
    );
    assert!(ok, "mosquitto_pub through node B failed: {out}");

    let listed = a.cli(&["messages", "list", "--device", "pg-sensor", "--json"]);
    let page: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let msgs = page["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 1, "{listed}");
    assert_eq!(msgs[0]["topic"], "devices/pg-sensor/telemetry/temp");
    assert!(listed.contains("pg-21.5"), "{listed}");
    assert!(
        !a.dir.join("messages.db").exists() && !b.dir.join("messages.db").exists(),
        "no node-local message file on PostgreSQL"
    );
    // registry and messages share ONE pool, opened (and migrated) once per node
    for node in [&a, &b] {
        let log = node.log_text();
        assert_eq!(
            log.matches("PostgreSQL store ready").count(),
            1,
            "the store was opened more than once:\n{log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_on_one_node_closes_the_session_on_the_other_at_once() {
    let pg = PgCluster::start();
    revocation_closes_the_other_nodes_session(&pg.url()).await;
}

/// The same over TLS (sslmode=verify-full against the test CA; the cluster takes TCP clients
/// over TLS only): the pool and the LISTEN connection both go through the TLS connector.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_on_one_node_closes_the_session_on_the_other_at_once_over_tls() {
    let pg = PgCluster::start_tls(&["localhost", "127.0.0.1"]);
    let (a, b) = revocation_closes_the_other_nodes_session(&pg.tls_url("verify-full")).await;
    // both nodes listen, over TLS; no devid connection is in plaintext
    assert_eq!(
        pg.connections_by_ssl("devid", "devid-server:listen", true),
        2
    );
    assert_eq!(pg.connections_by_ssl("devid", "devid-server", false), 0);
    for node in [&a, &b] {
        let log = node.log_text();
        assert!(
            log.contains("sslmode=\"verify-full\"") && log.contains("server_verified=true"),
            "{log}"
        );
        assert!(
            !log.contains(pg.password()),
            "the password is in a log line:\n{log}"
        );
    }
}

/// Two nodes on `url`; a device revoked (and one suspended) through node A loses its live
/// session on node B at once. Returns the nodes.
async fn revocation_closes_the_other_nodes_session(url: &str) -> (Server, Server) {
    // the periodic registry re-check stays at its default (60 s): only the notification
    // can close the session within the test's bound
    let a = Server::start_with(&["--db", url]);
    let b = a.another_node();
    let ca = b.ca_pem_path();
    let r = enrol(&a, "pg-revoke", "default");
    let p = enrol(&a, "pg-suspend", "default");

    for (dev, verb, proto) in [
        (&r, "revoke", Protocol::V5),
        (&p, "suspend", Protocol::V311),
    ] {
        let mut c = Client::connect_ok(b.mqtt_port, &ca, dev, proto).await;
        assert_eq!(
            c.publish_qos1(&dev.topic("telemetry/t"), 1, b"before", None)
                .await,
            Some(0)
        );
        let (dir, id) = (a.dir_str().to_owned(), dev.id.clone());
        let start = Instant::now();
        let change = tokio::task::spawn_blocking(move || {
            common::run(&["device", verb, &id, "--data-dir", &dir])
        });
        let (why, _) = c.wait_closed(Duration::from_secs(10)).await;
        let took = start.elapsed();
        assert!(change.await.unwrap().status.success(), "device {verb}");
        eprintln!("{verb} on node A: node B closed the session after {took:?}");
        assert!(
            took < Duration::from_secs(3),
            "{verb} through node A closed node B's session only after {took:?}"
        );
        if proto == Protocol::V5 {
            assert_eq!(why, Some(reason::ADMINISTRATIVE_ACTION));
        }
    }
    let (_, code) = Client::connect(b.mqtt_port, &ca, &r, Protocol::V5, "pg-revoke")
        .await
        .unwrap();
    assert_eq!(code, 0x86, "a revoked device cannot reconnect to node B");
    let metrics = metrics(&b);
    assert_eq!(
        metric(&metrics, "devid_mqtt_live_revocations_total"),
        Some(2.0),
        "{metrics}"
    );
    (a, b)
}

/// Each node's LISTEN connection, as PostgreSQL sees them.
fn listeners(pg: &PgCluster, db: &str) -> usize {
    pg.psql(
        db,
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'devid-server:listen'",
    )
    .trim()
    .parse()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_change_listener_survives_losing_its_connection() {
    let pg = PgCluster::start();
    let url = pg.url();
    let db = "devid"; // the database PgCluster::url names
    let a = Server::start_with(&["--db", &url]);
    let b = a.another_node();
    let ca = b.ca_pem_path();
    let dev = enrol(&a, "pg-relisten", "default");
    let wait_listeners = |what: &str| {
        let start = Instant::now();
        while listeners(&pg, db) < 2 {
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "{what}: the nodes do not listen"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait_listeners("at start");
    // the database drops both listening connections (as a restart or a failover would)
    let killed = pg.psql(
        db,
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = 'devid-server:listen') t",
    );
    assert_eq!(killed.trim(), "2", "terminated listeners");
    wait_listeners("after the connections were cut");

    let mut c = Client::connect_ok(b.mqtt_port, &ca, &dev, Protocol::V5).await;
    let (dir, id) = (a.dir_str().to_owned(), dev.id.clone());
    let start = Instant::now();
    let revoke = tokio::task::spawn_blocking(move || {
        common::run(&["device", "revoke", &id, "--data-dir", &dir])
    });
    let (why, _) = c.wait_closed(Duration::from_secs(10)).await;
    let took = start.elapsed();
    assert!(revoke.await.unwrap().status.success());
    assert!(
        took < Duration::from_secs(3),
        "after reconnecting, node B closed the revoked session only after {took:?}"
    );
    assert_eq!(why, Some(reason::ADMINISTRATIVE_ACTION));
}

/// A revocation committed while a node's LISTEN connection is down sends a notification that
/// node never receives; once it listens again, its catch-up sweep of the registry closes the
/// session anyway. Without the sweep the session would live until the periodic re-check (60 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_missed_while_not_listening_is_caught_up_after_reconnecting() {
    let pg = PgCluster::start();
    let url = pg.url();
    // psql goes to the `postgres` database: `devid` refuses new connections for a while
    let db = "postgres";
    let a = Server::start_with(&["--db", &url]);
    let b = a.another_node();
    let ca = b.ca_pem_path();
    let dev = enrol(&a, "pg-missed", "default");
    let wait_for = |want: usize, what: &str| {
        let start = Instant::now();
        while listeners(&pg, db) != want {
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "{what}: expected {want} listening connections"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_for(2, "at start");
    let mut c = Client::connect_ok(b.mqtt_port, &ca, &dev, Protocol::V5).await;
    // No new connection to the database (superusers included) while the listeners are cut,
    // so they cannot come back before the revocation commits. Node A's API still has the
    // pooled connection it enrolled with.
    pg.psql(db, "ALTER DATABASE devid ALLOW_CONNECTIONS false");
    pg.psql(
        db,
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = 'devid-server:listen') t",
    );
    wait_for(0, "after terminating them");
    let out = common::run(&["device", "revoke", &dev.id, "--data-dir", a.dir_str()]);
    assert!(
        out.status.success(),
        "device revoke through node A: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        listeners(&pg, db),
        0,
        "nobody listened when the revocation committed"
    );
    pg.psql(db, "ALTER DATABASE devid ALLOW_CONNECTIONS true");
    let start = Instant::now();
    let (why, _) = c.wait_closed(Duration::from_secs(30)).await;
    let took = start.elapsed();
    eprintln!("missed notification: node B closed the session {took:?} after connections were allowed again");
    assert_eq!(why, Some(reason::ADMINISTRATIVE_ACTION));
    // the listener retries after 1 s, then 2 s, 4 s, ... (at most 30 s): on a slow machine
    // the closed window may span a few retries; the periodic re-check would take 60 s
    assert!(
        took < Duration::from_secs(20),
        "node B closed the session only after {took:?}: no catch-up sweep after re-LISTEN"
    );
    wait_for(2, "at the end");
}
