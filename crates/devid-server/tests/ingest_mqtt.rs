//! MQTT ingest end to end: the real `devid-server` binary on 127.0.0.1, devices enrolled with
//! soft keys, third-party clients (mosquitto_pub/mosquitto_sub, paho-mqtt) and a Rust client.
#![allow(clippy::unwrap_used)]

mod common;
mod ingest_support;

use std::time::{Duration, Instant};

use common::Server;
use devid_mqtt::{reason, Packet, Protocol};
use ingest_support::*;

const V5: Protocol = Protocol::V5;
const V3: Protocol = Protocol::V311;

#[test]
fn mosquitto_clients_v311_and_v5_store_rows_and_dedupe_msg_id() {
    let s = Server::start_with_config(&[], FAST);
    let a = enrol(&s, "sensor-a", "default");
    let b = enrol(&s, "sensor-b", "default");

    let (ok, out) = mosquitto_pub(
        &s,
        &a,
        "mqttv311",
        &["-q", "1", "-t", &a.topic("telemetry/temp"), "-m", "21.5"],
    );
    assert!(ok, "{out}");
    // MQTT 5 with our idempotency key, twice: stored once, acknowledged twice
    for _ in 0..2 {
        let (ok, out) = mosquitto_pub(
            &s,
            &a,
            "mqttv5",
            &[
                "-q",
                "1",
                "-t",
                &a.topic("events/boot"),
                "-m",
                "booted",
                "-D",
                "publish",
                "user-property",
                "msg-id",
                "boot-1",
            ],
        );
        assert!(ok, "{out}");
        assert!(!out.to_lowercase().contains("fail"), "{out}");
    }
    // binary payload from a file, QoS 0
    let bin = a.dir.join("blob.bin");
    std::fs::write(&bin, [0u8, 159, 146, 150, 255]).unwrap();
    let (ok, out) = mosquitto_pub(
        &s,
        &a,
        "mqttv5",
        &[
            "-q",
            "1",
            "-t",
            &a.topic("telemetry/blob"),
            "-f",
            bin.to_str().unwrap(),
        ],
    );
    assert!(ok, "{out}");

    // v5: a topic of another device is refused (PUBACK 0x87), nothing stored
    let (_ok, out) = mosquitto_pub(
        &s,
        &a,
        "mqttv5",
        &["-q", "1", "-t", &b.topic("telemetry/temp"), "-m", "forged"],
    );
    assert!(out.to_lowercase().contains("not authori"), "{out}");
    // 3.1.1: refused by closing the connection
    let (ok, out) = mosquitto_pub(
        &s,
        &a,
        "mqttv311",
        &["-q", "1", "-t", "other/topic", "-m", "x"],
    );
    assert!(!ok, "3.1.1 publish outside the namespace must fail: {out}");
    // the client id must be the device id
    let port = s.mqtt_port.to_string();
    let (ok, out) = tool(
        "mosquitto_pub",
        &[
            "-h",
            "localhost",
            "-p",
            &port,
            "-V",
            "mqttv5",
            "--cafile",
            s.ca_pem_path().to_str().unwrap(),
            "--cert",
            a.cert_path.to_str().unwrap(),
            "--key",
            a.key_path.to_str().unwrap(),
            "-i",
            "sensor-b",
            "-q",
            "1",
            "-t",
            &b.topic("telemetry/x"),
            "-m",
            "impostor",
        ],
    );
    assert!(!ok, "{out}");
    assert!(out.to_lowercase().contains("identifier"), "{out}");
    // mosquitto_sub: another device's commands are refused
    let (ok, out) = tool(
        "mosquitto_sub",
        &[
            "-h",
            "localhost",
            "-p",
            &port,
            "-V",
            "mqttv311",
            "--cafile",
            s.ca_pem_path().to_str().unwrap(),
            "--cert",
            a.cert_path.to_str().unwrap(),
            "--key",
            a.key_path.to_str().unwrap(),
            "-i",
            "sensor-a",
            "-t",
            &b.topic("commands/#"),
            "-W",
            "3",
        ],
    );
    // mosquitto_sub reports the SUBACK failure and gives up (its exit status is 0)
    let _ = ok;
    assert!(
        out.contains("All subscription requests were denied"),
        "{out}"
    );

    let rows = all_messages(&s, "sensor-a");
    let summary: Vec<(&str, &str, u8, Option<&str>)> = rows
        .iter()
        .map(|m| {
            (
                m.topic.as_str(),
                m.payload_encoding.as_str(),
                m.qos,
                m.msg_id.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("devices/sensor-a/telemetry/temp", "utf8", 1, None),
            ("devices/sensor-a/events/boot", "utf8", 1, Some("boot-1")),
            ("devices/sensor-a/telemetry/blob", "base64", 1, None),
        ]
    );
    assert_eq!(rows[0].payload, "21.5");
    assert_eq!(rows[1].payload, "booted");
    assert_eq!(
        rows[2].payload_bytes().unwrap(),
        vec![0u8, 159, 146, 150, 255]
    );
    assert!(all_messages(&s, "sensor-b").is_empty(), "nothing forged");

    // the CLI shows the same rows: text when UTF-8, base64 otherwise
    let text = s.cli(&["messages", "list", "--device", "sensor-a"]);
    assert!(text.contains("devices/sensor-a/telemetry/temp"), "{text}");
    assert!(text.contains(" 21.5"), "{text}");
    assert!(text.contains("msg-id=boot-1"), "{text}");
    assert!(text.contains("base64:AJ+Slv8="), "{text}");
    let json: serde_json::Value =
        serde_json::from_str(&s.cli(&["messages", "list", "--device", "sensor-a", "--json"]))
            .unwrap();
    assert_eq!(json["messages"].as_array().unwrap().len(), 3);
    let limited: serde_json::Value = serde_json::from_str(&s.cli(&[
        "messages", "list", "--device", "sensor-a", "--limit", "1", "--json",
    ]))
    .unwrap();
    assert_eq!(
        limited["messages"][0]["topic"],
        "devices/sensor-a/telemetry/blob"
    );

    let m = metrics(&s);
    assert!(
        metric(&m, "devid_mqtt_messages_duplicate_total").unwrap() >= 1.0,
        "{m}"
    );
    assert!(
        metric(&m, "devid_mqtt_denials_total{kind=\"publish\"}").unwrap() >= 2.0,
        "{m}"
    );
    assert!(m.contains("devid_mqtt_commit_seconds_bucket"), "{m}");
    assert!(
        metric(
            &m,
            "devid_mqtt_connect_refusals_total{reason=\"client_id_mismatch\"}"
        )
        .unwrap()
            >= 1.0,
        "{m}"
    );
}

const PAHO_SCRIPT: &str = r#"
import json, ssl, sys, threading
import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes

port, ca, cert, key, dev, other = sys.argv[1:7]
out = {"version": mqtt.__version__ if hasattr(mqtt, "__version__") else ""}

def run(client_id, actions):
    done = threading.Event()
    res = {}
    c = mqtt.Client(client_id=client_id, protocol=mqtt.MQTTv5)
    c.tls_set(ca_certs=ca, certfile=cert, keyfile=key, tls_version=ssl.PROTOCOL_TLS_CLIENT)
    def on_connect(cl, ud, flags, rc, props=None):
        res["connack"] = rc.value if hasattr(rc, "value") else rc
        if res["connack"] != 0:
            done.set()
            return
        actions(cl, res, done)
    def on_subscribe(cl, ud, mid, rcs, props=None):
        res.setdefault("suback", []).append([r.value for r in rcs])
        if len(res["suback"]) == 2:
            p = Properties(PacketTypes.PUBLISH)
            p.UserProperty = ("msg-id", "paho-1")
            info = cl.publish("devices/%s/telemetry/paho" % dev, b"from paho", qos=1, properties=p)
            res["pub_mid"] = info.mid
    def on_publish(cl, ud, mid):
        res["acked_mid"] = mid
        done.set()
    def on_disconnect(cl, ud, rc, props=None):
        done.set()
    c.on_connect, c.on_subscribe, c.on_publish, c.on_disconnect = on_connect, on_subscribe, on_publish, on_disconnect
    c.connect("localhost", int(port), keepalive=30)
    c.loop_start()
    done.wait(10)
    c.disconnect()
    c.loop_stop()
    return res

def subscribe_both(cl, res, done):
    cl.subscribe("devices/%s/commands/#" % dev, qos=1)
    cl.subscribe("devices/%s/commands/#" % other, qos=1)

out["ok"] = run(dev, subscribe_both)
out["mismatch"] = run(other, lambda cl, res, done: done.set())
print(json.dumps(out))
"#;

#[test]
fn paho_mqtt_v5_reason_codes_and_rows() {
    let s = Server::start_with_config(&[], FAST);
    let a = enrol(&s, "paho-a", "default");
    let script = s.tmp.path().join("paho_check.py");
    std::fs::write(&script, PAHO_SCRIPT).unwrap();
    // Debian's python3-paho-mqtt lives in the system interpreter
    let python = if std::path::Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    };
    let port = s.mqtt_port.to_string();
    let (ok, out) = tool(
        python,
        &[
            script.to_str().unwrap(),
            &port,
            s.ca_pem_path().to_str().unwrap(),
            a.cert_path.to_str().unwrap(),
            a.key_path.to_str().unwrap(),
            "paho-a",
            "paho-b",
        ],
    );
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(v["ok"]["connack"], 0, "{v}");
    // own commands granted QoS 1; another device's commands: 0x87 Not authorized
    assert_eq!(v["ok"]["suback"], serde_json::json!([[1], [0x87]]), "{v}");
    assert_eq!(v["ok"]["acked_mid"], v["ok"]["pub_mid"], "{v}");
    // client id other than the certificate's device id: 0x85 Client Identifier not valid
    assert_eq!(v["mismatch"]["connack"], 0x85, "{v}");
    let rows = all_messages(&s, "paho-a");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].topic, "devices/paho-a/telemetry/paho");
    assert_eq!(rows[0].payload, "from paho");
    assert_eq!(rows[0].msg_id.as_deref(), Some("paho-1"));
    wait_audit(&s, "mqtt.subscribe", "subscribe_denied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_privilege_v5_and_v311() {
    let s = Server::start_with_config(&[], FAST);
    let a = enrol(&s, "dev-a", "default");
    let b = enrol(&s, "dev-b", "default");
    let quiet = enrol(&s, "dev-quiet", "publish-only");
    let ca = s.ca_pem_path();
    let port = s.mqtt_port;

    let mut c = Client::connect_ok(port, &ca, &a, V5).await;
    assert_eq!(
        c.publish_qos1(&a.topic("telemetry/t"), 1, b"ok", None)
            .await,
        Some(0)
    );
    for (i, bad) in [
        b.topic("telemetry/t"),
        a.topic("commands/x"),
        "devices/dev-a".to_owned(),
        "devices/dev-ab/telemetry/t".to_owned(),
        "$SYS/broker".to_owned(),
        "elsewhere".to_owned(),
    ]
    .iter()
    .enumerate()
    {
        let pid = 10 + u16::try_from(i).unwrap();
        assert_eq!(
            c.publish_qos1(bad, pid, b"no", None).await,
            Some(reason::NOT_AUTHORIZED),
            "{bad}"
        );
    }
    // QoS 0 to a foreign topic: dropped, connection kept
    c.send(publish(&b.topic("telemetry/t"), 0, 0, b"no", None))
        .await
        .unwrap();
    assert_eq!(
        c.subscribe(
            30,
            &[
                &a.topic("commands/#"),
                &b.topic("commands/#"),
                "devices/+/commands/#",
                "#",
                &a.topic("telemetry/#"),
            ]
        )
        .await,
        Some(vec![1, 0x87, 0x87, 0x87, 0x87])
    );
    // still connected and working after all those denials
    assert_eq!(
        c.publish_qos1(&a.topic("events/e"), 40, b"still here", None)
            .await,
        Some(0)
    );

    // publish-only policy: not even its own commands
    let mut q = Client::connect_ok(port, &ca, &quiet, V5).await;
    assert_eq!(
        q.subscribe(1, &[&quiet.topic("commands/#")]).await,
        Some(vec![0x87])
    );

    // MQTT 3.1.1: SUBACK failure 0x80, and a denied publish closes the connection
    let mut c3 = Client::connect_ok(port, &ca, &a, V3).await;
    assert_eq!(
        c3.subscribe(1, &[&a.topic("commands/#"), &b.topic("commands/#")])
            .await,
        Some(vec![1, 0x80])
    );
    assert_eq!(
        c3.publish_qos1(&a.topic("telemetry/v3"), 2, b"v3 ok", None)
            .await,
        Some(0)
    );
    assert_eq!(
        c3.publish_qos1(&b.topic("telemetry/t"), 3, b"forged", None)
            .await,
        None,
        "3.1.1 denied publish must close"
    );

    // QoS 2 is refused: v5 DISCONNECT 0x9B, v3 close
    let mut c5 = Client::connect_ok(port, &ca, &b, V5).await;
    c5.send(publish(&b.topic("telemetry/t"), 2, 5, b"qos2", None))
        .await
        .unwrap();
    let (why, _) = c5.wait_closed(Duration::from_secs(5)).await;
    assert_eq!(why, Some(reason::QOS_NOT_SUPPORTED));

    let rows: Vec<String> = all_messages(&s, "dev-a")
        .into_iter()
        .map(|m| m.payload)
        .collect();
    assert_eq!(rows, vec!["ok", "still here", "v3 ok"]);
    assert!(all_messages(&s, "dev-b").is_empty());
    let row = wait_audit(&s, "mqtt.publish", "publish_denied");
    assert_eq!(row.device_id.as_deref(), Some("dev-a"));
    assert_eq!(row.outcome, "refused");
    assert!(!row.detail.contains("no"), "never the payload: {row:?}");
    wait_audit(&s, "mqtt.subscribe", "subscribe_denied");
    let m = metrics(&s);
    assert!(metric(&m, "devid_mqtt_denials_total{kind=\"subscribe\"}").unwrap() >= 5.0);
    assert!(metric(&m, "devid_mqtt_denials_total{kind=\"publish\"}").unwrap() >= 8.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connections_are_audited_and_store_nothing() {
    let s = Server::start_with_config(&[], FAST);
    let ca = s.ca_pem_path();
    let port = s.mqtt_port;
    let good = enrol(&s, "good", "default");
    let susp = enrol(&s, "susp", "default");
    let revo = enrol(&s, "revo", "default");
    s.cli(&["device", "suspend", "susp"]);
    s.cli(&["device", "revoke", "revo"]);

    // a certificate from another CA, naming an enrolled device
    let (pem, key) = issue_cert(
        &foreign_ca(),
        "good",
        rcgen::date_time_ymd(2024, 1, 1),
        rcgen::date_time_ymd(2099, 1, 1),
    );
    let foreign = write_identity(&s.tmp.path().join("foreign"), "good", &pem, &key);
    let r = Client::connect(port, &ca, &foreign, V5, "good").await;
    assert!(r.is_err(), "unknown CA accepted");
    wait_audit(&s, "mqtt.connect", "tls_unknown_ca");

    // an expired certificate from the fleet CA itself
    let (pem, key) = issue_cert(
        &fleet_ca(&s),
        "good",
        rcgen::date_time_ymd(2020, 1, 1),
        rcgen::date_time_ymd(2021, 1, 1),
    );
    let expired = write_identity(&s.tmp.path().join("expired"), "good", &pem, &key);
    assert!(Client::connect(port, &ca, &expired, V3, "good")
        .await
        .is_err());
    wait_audit(&s, "mqtt.connect", "tls_cert_expired");

    // no client certificate at all
    let refused = async {
        let mut c = Client::new(tls_connect(port, tls_config(&ca, None)).await?, V5);
        c.send(connect_packet(V5, "good", 30)).await?;
        Ok::<_, std::io::Error>(c.recv(Duration::from_secs(5)).await)
    }
    .await;
    assert!(
        !matches!(refused, Ok(Ok(Some(Packet::ConnAck { code: 0, .. })))),
        "{refused:?}"
    );
    wait_audit(&s, "mqtt.connect", "tls_no_client_cert");

    // suspended: v5 0x87, v3 0x05; revoked: v5 0x86, v3 0x05
    for (dev, proto, code) in [
        (&susp, V5, 0x87),
        (&susp, V3, 0x05),
        (&revo, V5, 0x86),
        (&revo, V3, 0x05),
    ] {
        let (_, got) = Client::connect(port, &ca, dev, proto, &dev.id)
            .await
            .unwrap();
        assert_eq!(got, code, "{} {proto:?}", dev.id);
    }
    wait_audit(&s, "mqtt.connect", "device_suspended");
    wait_audit(&s, "mqtt.connect", "device_revoked");

    // client id other than the device id: v5 0x85, v3 0x02
    let (_, got) = Client::connect(port, &ca, &good, V5, "susp").await.unwrap();
    assert_eq!(got, 0x85);
    let (_, got) = Client::connect(port, &ca, &good, V3, "").await.unwrap();
    assert_eq!(got, 0x02);
    let row = wait_audit(&s, "mqtt.connect", "client_id_mismatch");
    assert_eq!(row.actor, "device:good");
    assert!(row.source.starts_with("127.0.0.1:"), "{row:?}");

    for d in ["good", "susp", "revo"] {
        assert!(all_messages(&s, d).is_empty(), "{d}");
    }
    let m = metrics(&s);
    for reason in ["tls_unknown_ca", "tls_cert_expired", "tls_no_client_cert"] {
        let line = format!("devid_mqtt_handshake_failures_total{{reason=\"{reason}\"}}");
        assert!(metric(&m, &line).unwrap() >= 1.0, "{line}\n{m}");
    }
    // and the good device still gets in
    Client::connect_ok(port, &ca, &good, V5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_and_suspension_close_live_sessions_within_a_second() {
    let s = Server::start_with_config(&[], FAST);
    let ca = s.ca_pem_path();
    let port = s.mqtt_port;
    let r = enrol(&s, "to-revoke", "default");
    let p = enrol(&s, "to-suspend", "default");

    let mut c = Client::connect_ok(port, &ca, &r, V5).await;
    assert_eq!(
        c.publish_qos1(&r.topic("telemetry/t"), 1, b"before", None)
            .await,
        Some(0)
    );
    let dir = s.dir_str().to_owned();
    let start = Instant::now();
    let revoke = tokio::task::spawn_blocking(move || {
        let out = common::run(&["device", "revoke", "to-revoke", "--data-dir", &dir]);
        assert!(out.status.success());
        Instant::now()
    });
    let (why, _) = c.wait_closed(Duration::from_secs(5)).await;
    let closed_at = Instant::now();
    let committed_at = revoke.await.unwrap();
    let since_command = closed_at - start;
    eprintln!(
        "revoke: session closed {since_command:?} after `device revoke` started \
         (the command returned after {:?})",
        committed_at - start
    );
    assert!(
        since_command < Duration::from_secs(1),
        "closed after {since_command:?}"
    );
    assert_eq!(why, Some(reason::ADMINISTRATIVE_ACTION));
    let (_, code) = Client::connect(port, &ca, &r, V5, "to-revoke")
        .await
        .unwrap();
    assert_eq!(code, 0x86, "a revoked device cannot reconnect");

    // suspension through the admin API closes a 3.1.1 session too; resume lets it back
    let mut c = Client::connect_ok(port, &ca, &p, V3).await;
    let start = Instant::now();
    let dir = s.dir_str().to_owned();
    let suspend = tokio::task::spawn_blocking(move || {
        common::run(&["device", "suspend", "to-suspend", "--data-dir", &dir])
    });
    let (_, _) = c.wait_closed(Duration::from_secs(5)).await;
    let took = start.elapsed();
    assert!(suspend.await.unwrap().status.success());
    assert!(took < Duration::from_secs(1), "closed after {took:?}");
    let (_, code) = Client::connect(port, &ca, &p, V3, "to-suspend")
        .await
        .unwrap();
    assert_eq!(code, 0x05);
    s.cli(&["device", "resume", "to-suspend"]);
    let mut c = Client::connect_ok(port, &ca, &p, V3).await;
    assert_eq!(
        c.publish_qos1(&p.topic("telemetry/t"), 1, b"back", None)
            .await,
        Some(0)
    );
    wait_audit(&s, "mqtt.session", "session closed: device_revoked");
    let m = metrics(&s);
    assert!(metric(&m, "devid_mqtt_live_revocations_total").unwrap() >= 2.0);

    // a second session of the same device takes over the first (no duplicate identities)
    let mut first = Client::connect_ok(port, &ca, &p, V5).await;
    let _second = Client::connect_ok(port, &ca, &p, V5).await;
    let (why, _) = first.wait_closed(Duration::from_secs(5)).await;
    assert_eq!(why, Some(reason::SESSION_TAKEN_OVER));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_msg_id_is_stored_once_and_acked_each_time() {
    let s = Server::start_with_config(&[], FAST);
    let d = enrol(&s, "idem", "default");
    let mut c = Client::connect_ok(s.mqtt_port, &s.ca_pem_path(), &d, V5).await;
    for pid in 1..=3 {
        assert_eq!(
            c.publish_qos1(&d.topic("telemetry/t"), pid, b"same", Some("k-42"))
                .await,
            Some(0)
        );
    }
    assert_eq!(
        c.publish_qos1(&d.topic("telemetry/t"), 4, b"other", Some("k-43"))
            .await,
        Some(0)
    );
    // no key: at-least-once, every copy is stored
    for pid in 5..=6 {
        assert_eq!(
            c.publish_qos1(&d.topic("telemetry/t"), pid, b"nokey", None)
                .await,
            Some(0)
        );
    }
    let keys: Vec<Option<String>> = all_messages(&s, "idem")
        .into_iter()
        .map(|m| m.msg_id)
        .collect();
    assert_eq!(
        keys,
        vec![Some("k-42".into()), Some("k-43".into()), None, None]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_malformed_and_slow_clients_are_cut_others_keep_working() {
    let s = Server::start_with_config(
        &[],
        "mqtt.connect_timeout_secs = 2\nmqtt.max_payload_bytes = 1024\n\
         mqtt.messages_per_sec = 20.0\nmqtt.messages_burst = 5.0",
    );
    let ca = s.ca_pem_path();
    let port = s.mqtt_port;
    let d = enrol(&s, "victim", "default");
    let e = enrol(&s, "rude", "default");
    let mut good = Client::connect_ok(port, &ca, &d, V5).await;

    // slowloris 1: TCP only, never a TLS byte
    let start = Instant::now();
    let mut idle = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    // slowloris 2: TLS done, CONNECT never completed (one byte of it)
    let mut half = Client::new(
        tls_connect(port, tls_config(&ca, Some(&e))).await.unwrap(),
        V5,
    );
    half.send_raw(&[0x10]).await.unwrap();
    assert_eq!(
        good.publish_qos1(&d.topic("telemetry/t"), 1, b"during", None)
            .await,
        Some(0)
    );
    let mut byte = [0u8; 1];
    let n = tokio::time::timeout(
        Duration::from_secs(6),
        tokio::io::AsyncReadExt::read(&mut idle, &mut byte),
    )
    .await
    .expect("idle TCP connection not closed");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    let (_, _) = half.wait_closed(Duration::from_secs(6)).await;
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(5),
        "{took:?}"
    );

    // oversized: DISCONNECT 0x95, nothing stored
    let mut c = Client::connect_ok(port, &ca, &e, V5).await;
    c.send(publish(
        &e.topic("telemetry/big"),
        1,
        1,
        &[b'x'; 20_000],
        None,
    ))
    .await
    .unwrap();
    let (why, _) = c.wait_closed(Duration::from_secs(5)).await;
    assert_eq!(why, Some(reason::PACKET_TOO_LARGE));

    // malformed: a PUBLISH whose topic length runs past the packet
    let mut c = Client::connect_ok(port, &ca, &e, V3).await;
    c.send_raw(&[0x32, 0x04, 0x00, 0x7f, b'a', b'b'])
        .await
        .unwrap();
    let (_, _) = c.wait_closed(Duration::from_secs(5)).await;
    // garbage instead of CONNECT
    let mut c = Client::new(
        tls_connect(port, tls_config(&ca, Some(&e))).await.unwrap(),
        V5,
    );
    c.send_raw(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let (_, _) = c.wait_closed(Duration::from_secs(5)).await;

    // the well-behaved device was never disturbed
    assert_eq!(
        good.publish_qos1(&d.topic("telemetry/t"), 2, b"after", None)
            .await,
        Some(0)
    );
    // rate limit (20/s, burst 5): 25 pipelined messages take about a second, all stored
    let start = Instant::now();
    for pid in 100..125u16 {
        good.send(publish(&d.topic("telemetry/r"), 1, pid, b"r", None))
            .await
            .unwrap();
    }
    let mut acked = 0;
    while acked < 25 {
        if let Some(Packet::PubAck { reason, .. }) =
            good.recv(Duration::from_secs(5)).await.unwrap()
        {
            assert_eq!(reason, 0);
            acked += 1;
        }
    }
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(800),
        "rate limit not applied: {took:?}"
    );
    assert_eq!(all_messages(&s, "victim").len(), 27);
    assert!(all_messages(&s, "rude").is_empty());
    let m = metrics(&s);
    assert!(metric(&m, "devid_mqtt_rate_limited_total{kind=\"messages\"}").unwrap() >= 1.0);
    assert!(
        metric(
            &m,
            "devid_mqtt_handshake_failures_total{reason=\"connect_timeout\"}"
        )
        .unwrap()
            >= 1.0
            || metric(
                &m,
                "devid_mqtt_handshake_failures_total{reason=\"handshake_timeout\"}"
            )
            .unwrap()
                >= 1.0,
        "{m}"
    );
}

#[test]
fn messages_tail_follows_the_stream() {
    let s = Server::start_with_config(&[], FAST);
    let d = enrol(&s, "tailed", "default");
    let other = enrol(&s, "untailed", "default");
    let mut tail = std::process::Command::new(common::BIN)
        .args([
            "messages",
            "tail",
            "--device",
            "tailed",
            "--json",
            "--count",
            "2",
            "--data-dir",
            s.dir_str(),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // let the stream subscribe before publishing
    std::thread::sleep(Duration::from_millis(700));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ca = s.ca_pem_path();
        let mut o = Client::connect_ok(s.mqtt_port, &ca, &other, V5).await;
        o.publish_qos1(&other.topic("telemetry/x"), 1, b"not me", None)
            .await;
        let mut c = Client::connect_ok(s.mqtt_port, &ca, &d, V5).await;
        c.publish_qos1(&d.topic("telemetry/x"), 1, b"one", None)
            .await;
        c.publish_qos1(&d.topic("events/y"), 2, &[0xff, 0x00], None)
            .await;
    });
    let start = Instant::now();
    loop {
        if tail.try_wait().unwrap().is_some() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "tail did not finish"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = tail.wait_with_output().unwrap();
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["payload"], "one");
    assert_eq!(lines[1]["payload_encoding"], "base64");
    assert_eq!(lines[1]["device_id"], "tailed");
}

/// A device that reconnects resumes TLS with the ticket of its last session (one per
/// handshake); a client that asks for no tickets (RFC 9149 `ticket_request`, as one that
/// never resumes would) gets none, so its next connection is a full handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_tickets_follow_the_clients_request() {
    let s = Server::start_with_config(&[], FAST);
    let dev = enrol(&s, "ticket-dev", "default");
    let ca = s.ca_pem_path();
    for (asked, want) in [
        (None, rustls::HandshakeKind::Resumed),
        (Some(0u8), rustls::HandshakeKind::Full),
    ] {
        let mut cfg = (*tls_config(&ca, Some(&dev))).clone();
        cfg.resumption = rustls::client::Resumption::in_memory_sessions(4);
        cfg.send_ticket_request = asked.map(|n| rustls::client::TicketRequest {
            new_session_count: n,
            resumption_count: n,
        });
        let cfg = std::sync::Arc::new(cfg);
        let mut kinds = Vec::new();
        for _ in 0..2 {
            let stream = tls_connect(s.mqtt_port, cfg.clone()).await.unwrap();
            kinds.push(stream.get_ref().1.handshake_kind());
            let mut c = Client::new(stream, V5);
            c.send(connect_packet(V5, &dev.id, 30)).await.unwrap();
            // the ticket travels after the handshake: reading CONNACK takes it in
            match c.recv(Duration::from_secs(5)).await.unwrap() {
                Some(Packet::ConnAck { code: 0, .. }) => {}
                other => panic!("{other:?}"),
            }
            c.send(Packet::Disconnect { reason: 0 }).await.unwrap();
            let _ = c.wait_closed(Duration::from_secs(5)).await;
        }
        assert_eq!(
            kinds,
            vec![Some(rustls::HandshakeKind::Full), Some(want)],
            "ticket_request {asked:?}"
        );
    }
}

/// The registry's `last_seen` moves forward when a device connects over MQTT (written within
/// about a second), not when a connection is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_seen_follows_mqtt_connections_but_not_refusals() {
    let s = Server::start_with_config(&[], &format!("{FAST}\nmqtt.last_seen_resolution_secs = 1"));
    let dev = enrol(&s, "seen-dev", "default");
    let gone = enrol(&s, "seen-revoked", "default");
    s.cli(&["device", "revoke", "seen-revoked"]);
    let last_seen = |id: &str| {
        let d = s.devices().into_iter().find(|d| d.id == id).unwrap();
        time::OffsetDateTime::parse(&d.last_seen, &time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    let (before, gone_before) = (last_seen("seen-dev"), last_seen("seen-revoked"));
    // older than the resolution, so the next connect counts
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let ca = s.ca_pem_path();
    let connected_at = time::OffsetDateTime::now_utc();
    let _c = Client::connect_ok(s.mqtt_port, &ca, &dev, V5).await;
    let (_, code) = Client::connect(s.mqtt_port, &ca, &gone, V5, "seen-revoked")
        .await
        .unwrap();
    assert_eq!(code, reason::BAD_CREDENTIALS);
    let start = Instant::now();
    loop {
        let now_seen = last_seen("seen-dev");
        if now_seen > before {
            assert!(
                now_seen >= connected_at - time::Duration::milliseconds(5),
                "last_seen {now_seen} is before the connect at {connected_at}"
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "last_seen stayed {before} after an MQTT connection"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // a wrongly queued time for the refused device would be written by now (flushes run
    // every second)
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(
        last_seen("seen-revoked"),
        gone_before,
        "a refused connect is not 'seen'"
    );
}
