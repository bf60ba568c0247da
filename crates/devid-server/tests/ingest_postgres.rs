//! Telemetry on PostgreSQL: two `devid-server run` nodes on one database; a device publishes
//! through node B's MQTT listener (mosquitto_pub, MQTT 5, QoS 1) and node A serves the stored
//! rows (the message store is the shared database, not a per-node file).
#![allow(clippy::unwrap_used)]

mod common;
mod ingest_support;

use common::Server;
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
}
