//! Beyond one node (issue 17): two `devid-server run` nodes on one PostgreSQL behind a real
//! HAProxy (Debian's, TCP mode, `send-proxy-v2`, health checks on each node's `/readyz`;
//! the configuration is `devid_testkit::haproxy`, the one docs/scaling.md shows). Devices
//! enrol through HAProxy and are handed its address (`mqtt_advertised_url`), connect through
//! it from their own loopback addresses (127.0.0.11 and up) and land on both nodes, which
//! see those addresses (PROXY protocol v2 from HAProxy's address 127.0.0.3, the only one in
//! `proxy_protocol.trusted`); a revocation made through one node cuts a device connected to
//! the other; a node stopped (SIGTERM, then kill -9 of the other one) loses its devices to
//! the other node with every acknowledged QoS 1 message stored once. The failover time is
//! printed as a `HAPROXY_FAILOVER` line.
#![allow(clippy::unwrap_used)]

mod common;
mod ingest_support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Server;
use devid_keystore::Keystore;
use devid_mqtt::{reason, Packet, Protocol};
use devid_testkit::haproxy::{Haproxy, Node, Spec};
use devid_testkit::postgres::PgCluster;
use ingest_support::*;
use rustls::pki_types::ServerName;
use tokio::net::TcpSocket;

/// HAProxy's own address as the nodes see it (`source`), the one trusted address.
const LB_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);

/// One at a time: the failover figures mean little with another cluster on the same cores.
static SERIAL: Mutex<()> = Mutex::new(());

/// PostgreSQL, nodes `a` and `b` on it, HAProxy in front.
struct Cluster {
    lb: Haproxy,
    a: Server,
    b: Server,
    /// `https://127.0.0.1:PORT` of HAProxy's enrolment frontend.
    lb_url: String,
    /// What enrolment hands devices.
    advertised: String,
    _pg: PgCluster,
}

/// The HAProxy configuration for nodes `a` and `b` (test timing: a check every 300 ms, down
/// after 2 failures, up after 1 success).
fn spec(a: &Server, b: &Server, mqtt_port: u16, https_port: u16) -> Spec {
    let node = |name: &str, s: &Server| Node {
        name: name.to_owned(),
        https: SocketAddr::from(([127, 0, 0, 1], s.port)),
        mqtt: SocketAddr::from(([127, 0, 0, 1], s.mqtt_port)),
    };
    Spec {
        bind: "127.0.0.1".into(),
        mqtt_port,
        https_port,
        source: Some(LB_SOURCE),
        ca_file: a.ca_pem_path(),
        server_name: "localhost".into(),
        inter_ms: 300,
        fall: 2,
        rise: 1,
        stats_socket: None,
        nodes: vec![node("a", a), node("b", b)],
    }
}

fn cluster() -> Cluster {
    let pg = PgCluster::start();
    let lb_mqtt = devid_testkit::free_port();
    let lb_https = common::free_port_other_than(lb_mqtt);
    let advertised = format!("mqtts://localhost:{lb_mqtt}");
    // node b is a copy of a's data dir: the same settings
    let a = Server::start_with_config(
        &["--db", &pg.url()],
        &format!(
            "{FAST}\nmqtt_advertised_url = \"{advertised}\"\n\
             proxy_protocol.trusted = [\"{LB_SOURCE}/32\"]\n"
        ),
    );
    let b = a.another_node();
    let lb = Haproxy::start(&spec(&a, &b, lb_mqtt, lb_https));
    for node in ["a", "b"] {
        assert!(
            lb.wait_status(node, "UP", Duration::from_secs(15))
                .is_some(),
            "HAProxy never saw node {node} ready: {:?}\n{}",
            lb.servers(),
            lb.log_text()
        );
    }
    Cluster {
        lb,
        a,
        b,
        lb_url: format!("https://127.0.0.1:{lb_https}"),
        advertised,
        _pg: pg,
    }
}

/// Enrol `id` through HAProxy (token from node a's CLI); the device and the MQTT URL the
/// server handed it.
fn enrol_via(c: &Cluster, id: &str) -> (Device, String) {
    let token =
        c.a.token(&["--device-id", id, "--ttl", "10m", "--policy", "default"]);
    let dir = c.a.tmp.path().join(format!("dev-{id}"));
    std::fs::create_dir_all(&dir).unwrap();
    let ks: Arc<dyn Keystore> = Arc::new(devid_keystore::soft::SoftKeystore::create(&dir).unwrap());
    let csr = devid_enroll::build_csr_with_keystore(&*ks, Some(id)).unwrap();
    let resp = devid_enroll::enroll(&c.lb_url, &token, &c.a.pin, &csr, Some(id))
        .unwrap_or_else(|e| panic!("enrolment of {id} through HAProxy: {e}"));
    let cert_path = dir.join("cert.pem");
    std::fs::write(&cert_path, &resp.certificate_chain).unwrap();
    let dev = Device {
        id: id.to_owned(),
        key_path: dir.join(devid_keystore::soft::KEY_FILE),
        cert_path,
        dir,
    };
    (dev, resp.mqtt_url)
}

/// TLS + CONNECT to `mqtt_url` (as a device reads it from its bundle) from the local address
/// `src`; the client and its local address, or why not.
async fn connect_via(
    mqtt_url: &str,
    src: Ipv4Addr,
    ca: &std::path::Path,
    dev: &Device,
) -> Result<(Client, SocketAddr, u8), String> {
    let hostport = mqtt_url
        .strip_prefix("mqtts://")
        .ok_or_else(|| format!("not an mqtts URL: {mqtt_url}"))?;
    let host = hostport
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(hostport);
    let target = tokio::net::lookup_host(hostport)
        .await
        .map_err(|e| format!("resolve {hostport}: {e}"))?
        .find(SocketAddr::is_ipv4)
        .ok_or_else(|| format!("no IPv4 address for {hostport}"))?;
    let sock = TcpSocket::new_v4().map_err(|e| e.to_string())?;
    sock.bind(SocketAddr::from((src, 0)))
        .map_err(|e| format!("bind {src}: {e}"))?;
    let tcp = sock
        .connect(target)
        .await
        .map_err(|e| format!("connect {target}: {e}"))?;
    let local = tcp.local_addr().map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    let tls = tokio_rustls::TlsConnector::from(tls_config(ca, Some(dev)))
        .connect(ServerName::try_from(host.to_owned()).unwrap(), tcp)
        .await
        .map_err(|e| format!("tls: {e}"))?;
    let mut c = Client::new(tls, Protocol::V5);
    c.send(connect_packet(Protocol::V5, &dev.id, 30))
        .await
        .map_err(|e| format!("send CONNECT: {e}"))?;
    match c.recv(Duration::from_secs(5)).await {
        Ok(Some(Packet::ConnAck { code, .. })) => Ok((c, local, code)),
        Ok(Some(other)) => Err(format!("expected CONNACK, got {other:?}")),
        Ok(None) => Err("closed without CONNACK".into()),
        Err(e) => Err(e),
    }
}

/// Publish QoS 1 and wait for its PUBACK: the reason code, or why there was none (closed,
/// timed out). Unlike `Client::publish_qos1`, a dead connection is an `Err`, not a panic.
async fn publish_acked(c: &mut Client, topic: &str, pid: u16, msg_id: &str) -> Result<u8, String> {
    c.send(publish(topic, 1, pid, msg_id.as_bytes(), Some(msg_id)))
        .await
        .map_err(|e| format!("send: {e}"))?;
    for _ in 0..100 {
        match c.recv(Duration::from_secs(5)).await? {
            Some(Packet::PubAck { packet_id, reason }) if packet_id.get() == pid => {
                return Ok(reason)
            }
            Some(Packet::Disconnect { reason }) => return Err(format!("DISCONNECT {reason:#x}")),
            None => return Err("closed".into()),
            Some(_) => {}
        }
    }
    Err("no PUBACK among 100 packets".into())
}

/// Which node served the connection from `local`: the node whose log has the latest
/// "MQTT session open" line with that address (the PROXY header's source).
fn node_of(c: &Cluster, local: SocketAddr) -> Option<&'static str> {
    let needle = format!("addr={local} ");
    let last = |s: &Server| {
        s.log_text()
            .lines()
            .filter(|l| l.contains("MQTT session open") && l.contains(&needle))
            .map(|l| l.split_whitespace().next().unwrap_or("").to_owned())
            .max()
    };
    match (last(&c.a), last(&c.b)) {
        (Some(x), Some(y)) => Some(if x >= y { "a" } else { "b" }),
        (Some(_), None) => Some("a"),
        (None, Some(_)) => Some("b"),
        (None, None) => None,
    }
}

/// [`node_of`], waiting up to 5 s for the log line.
fn wait_node_of(c: &Cluster, local: SocketAddr) -> &'static str {
    let start = Instant::now();
    loop {
        if let Some(n) = node_of(c, local) {
            return n;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no node logged a session from {local}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn connections(s: &Server) -> f64 {
    metric(&metrics(s), "devid_mqtt_connections ").unwrap_or(-1.0)
}

/// `kill SIG PID`.
fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "kill {sig} {pid}");
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn devices_enrol_and_connect_through_haproxy_land_on_both_nodes_with_their_addresses() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = cluster();
    let rt = runtime();
    let ca = c.a.ca_pem_path();

    // enrolment through HAProxy: every device gets HAProxy's MQTT address
    let devs: Vec<(Device, String)> = (1..=6)
        .map(|i| enrol_via(&c, &format!("lb-dev-{i}")))
        .collect();
    for (d, url) in &devs {
        assert_eq!(url, &c.advertised, "{}: the advertised URL", d.id);
    }
    // the enrolments went to both nodes, and the audit names the client, not HAProxy
    let https: Vec<_> =
        c.lb.servers()
            .into_iter()
            .filter(|s| s.backend == "devid_https")
            .collect();
    assert_eq!(https.len(), 2, "{https:?}");
    assert!(
        https.iter().all(|s| s.total_sessions > 0),
        "roundrobin gave both nodes enrolments: {https:?}"
    );
    let enrolled: Vec<_> =
        c.a.audit()
            .into_iter()
            .filter(|r| r.action == "enroll")
            .filter(|r| {
                r.device_id
                    .as_deref()
                    .is_some_and(|d| d.starts_with("lb-dev-"))
            })
            .collect();
    assert_eq!(enrolled.len(), 6, "{enrolled:#?}");
    for r in &enrolled {
        assert!(
            r.source.starts_with("127.0.0.1:"),
            "the enrol audit shows the device's address, not HAProxy's: {r:#?}"
        );
    }

    // MQTT through HAProxy, each device from its own address
    let mut clients = Vec::new();
    let mut on = BTreeMap::<&str, Vec<usize>>::new();
    for (i, (d, url)) in devs.iter().enumerate() {
        let src = Ipv4Addr::new(127, 0, 0, 11 + i as u8);
        let (mut cl, local, code) = rt
            .block_on(connect_via(url, src, &ca, d))
            .unwrap_or_else(|e| panic!("{} through HAProxy: {e}", d.id));
        assert_eq!(code, 0, "{} CONNACK", d.id);
        assert_eq!(local.ip(), std::net::IpAddr::V4(src));
        let ack = rt
            .block_on(publish_acked(
                &mut cl,
                &d.topic("telemetry/t"),
                1,
                &format!("{}-1", d.id),
            ))
            .unwrap();
        assert_eq!(ack, 0);
        // found by the address the node logged: the PROXY header's source is the device's
        on.entry(wait_node_of(&c, local)).or_default().push(i);
        clients.push(cl);
    }
    eprintln!("devices per node: {on:?}");
    assert!(
        on.get("a").is_some_and(|v| !v.is_empty()) && on.get("b").is_some_and(|v| !v.is_empty()),
        "the devices did not land on both nodes: {on:?}"
    );
    let (ca_conns, cb_conns) = (connections(&c.a), connections(&c.b));
    assert_eq!(
        ca_conns as usize,
        on["a"].len(),
        "node a's connection gauge"
    );
    assert_eq!(
        cb_conns as usize,
        on["b"].len(),
        "node b's connection gauge"
    );
    for node in [&c.a, &c.b] {
        let log = node.log_text();
        assert!(
            !log.lines()
                .any(|l| l.contains("MQTT session open")
                    && l.contains(&format!("addr={LB_SOURCE}:"))),
            "a session is attributed to HAProxy's address:\n{log}"
        );
    }

    // a revocation through node a cuts the device connected to node b
    let victim = on["b"][0];
    let (vdev, vurl) = &devs[victim];
    let start = Instant::now();
    let out = common::run(&["device", "revoke", &vdev.id, "--data-dir", c.a.dir_str()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (why, _) = rt.block_on(clients[victim].wait_closed(Duration::from_secs(10)));
    let took = start.elapsed();
    eprintln!("revoke through node a: node b closed the session after {took:?}");
    assert_eq!(why, Some(reason::ADMINISTRATIVE_ACTION));
    assert!(took < Duration::from_secs(3), "closed only after {took:?}");
    let row = wait_audit(&c.a, "mqtt.session", "session closed");
    assert_eq!(row.device_id.as_deref(), Some(vdev.id.as_str()));
    let vsrc = Ipv4Addr::new(127, 0, 0, 11 + victim as u8);
    assert!(
        row.source.starts_with(&format!("{vsrc}:")),
        "the audit names the device's address: {row:#?}"
    );
    // it cannot come back through HAProxy, whichever node it reaches
    for _ in 0..2 {
        match rt.block_on(connect_via(vurl, vsrc, &ca, vdev)) {
            Ok((_, _, code)) => assert_eq!(code, 0x86, "a revoked device reconnected"),
            Err(e) => eprintln!("revoked device refused: {e}"),
        }
    }
    // the others are untouched
    for (i, cl) in clients.iter_mut().enumerate() {
        if i == victim {
            continue;
        }
        let d = &devs[i].0;
        let ack = rt.block_on(publish_acked(
            cl,
            &d.topic("telemetry/t"),
            2,
            &format!("{}-2", d.id),
        ));
        assert_eq!(ack, Ok(0), "{} after the revocation", d.id);
    }
}

/// What one device saw.
#[derive(Default)]
struct Record {
    /// Every connection: its local address and when CONNACK came.
    conns: Vec<(SocketAddr, Instant)>,
    /// Acknowledged messages: number, when, on which connection (index into `conns`).
    acks: Vec<(u32, Instant, usize)>,
    /// The highest message number sent (acknowledged or not).
    sent: u32,
    /// Connection and publish failures (the first few).
    errors: Vec<String>,
}

/// A device: connect through HAProxy from `src`, publish QoS 1 every 20 ms with msg-id
/// `ID-N`, resend an unacknowledged message after reconnecting (50 ms after a failure),
/// until `stop` (or 5 minutes, a bound for a stuck test).
async fn device_loop(
    dev: Device,
    url: String,
    src: Ipv4Addr,
    ca: std::path::PathBuf,
    rec: Arc<Mutex<Record>>,
    stop: Arc<AtomicBool>,
) {
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut n: u32 = 1;
    let mut pid: u16 = 1;
    let note = |rec: &Arc<Mutex<Record>>, e: String| {
        let mut r = rec.lock().unwrap();
        if r.errors.len() < 20 {
            r.errors.push(e);
        }
    };
    'outer: while !stop.load(Ordering::Acquire) && Instant::now() < deadline {
        let mut cl = match connect_via(&url, src, &ca, &dev).await {
            Ok((cl, local, 0)) => {
                rec.lock().unwrap().conns.push((local, Instant::now()));
                cl
            }
            Ok((_, _, code)) => {
                note(&rec, format!("CONNACK {code:#x}"));
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Err(e) => {
                note(&rec, e);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let conn = rec.lock().unwrap().conns.len() - 1;
        loop {
            if stop.load(Ordering::Acquire) || Instant::now() >= deadline {
                break 'outer;
            }
            let msg_id = format!("{}-{n}", dev.id);
            {
                let mut r = rec.lock().unwrap();
                r.sent = r.sent.max(n);
            }
            match publish_acked(&mut cl, &dev.topic("telemetry/seq"), pid, &msg_id).await {
                Ok(0) => {
                    rec.lock().unwrap().acks.push((n, Instant::now(), conn));
                    n += 1;
                    pid = if pid == u16::MAX { 1 } else { pid + 1 };
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Ok(code) => {
                    note(&rec, format!("PUBACK {code:#x}"));
                    break;
                }
                Err(e) => {
                    note(&rec, e);
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Stop `victim` with `stop`, then wait until every device that was on it is publishing
/// (a message acknowledged on a new connection) through the other node; the failover time
/// of each such device (stop -> first acknowledgement on the other node).
fn fail_over(
    c: &Cluster,
    victim: &'static str,
    stop: impl FnOnce(),
    fleet: &[(String, Arc<Mutex<Record>>)],
    how: &str,
) -> Vec<Duration> {
    let survivor = if victim == "a" { "b" } else { "a" };
    // every device is connected and publishing; which are on the victim
    let on_victim: Vec<usize> = fleet
        .iter()
        .enumerate()
        .filter(|(_, (_, r))| {
            let local = r.lock().unwrap().conns.last().map(|c| c.0);
            local.is_some_and(|l| wait_node_of(c, l) == victim)
        })
        .map(|(i, _)| i)
        .collect();
    assert!(!on_victim.is_empty(), "no device on node {victim}");
    let t0 = Instant::now();
    stop();
    let stopped = t0.elapsed();
    let down = c.lb.wait_status(victim, "DOWN", Duration::from_secs(15));
    let mut times = Vec::new();
    for &i in &on_victim {
        let (id, rec) = &fleet[i];
        let start = Instant::now();
        let took = loop {
            let first = {
                let r = rec.lock().unwrap();
                r.acks
                    .iter()
                    .find(|(_, at, conn)| *at > t0 && r.conns[*conn].1 > t0)
                    .map(|(_, at, conn)| (*at - t0, r.conns[*conn].0))
            };
            if let Some((took, local)) = first {
                assert_eq!(
                    wait_node_of(c, local),
                    survivor,
                    "{id} reconnected, but not to node {survivor}"
                );
                break took;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{id} never published through node {survivor} after node {victim} stopped ({how}): {:?}",
                rec.lock().unwrap().errors
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        times.push(took);
    }
    let max = times.iter().max().copied().unwrap_or_default();
    let mean = times.iter().sum::<Duration>() / times.len() as u32;
    println!(
        "HAPROXY_FAILOVER stop={how} devices={} max_ms={} mean_ms={} stop_call_ms={} haproxy_marked_down_ms={}",
        times.len(),
        max.as_millis(),
        mean.as_millis(),
        stopped.as_millis(),
        down.map(|d| (d + stopped).as_millis().to_string())
            .unwrap_or_else(|| "never".into()),
    );
    assert!(
        down.is_some(),
        "HAProxy never marked node {victim} down: {:?}",
        c.lb.servers()
    );
    // generous: the checks take well under 2 s; the devices retry every 50 ms
    assert!(
        max < Duration::from_secs(30),
        "failover after {how} took {max:?}"
    );
    times
}

#[test]
fn a_stopped_node_s_devices_reconnect_through_haproxy_to_the_other_with_nothing_lost() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = cluster();
    let rt = runtime();
    let ca = c.a.ca_pem_path();
    let stop = Arc::new(AtomicBool::new(false));
    let mut fleet = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..6u8 {
        let (dev, url) = enrol_via(&c, &format!("fo-dev-{i}"));
        let rec = Arc::new(Mutex::new(Record::default()));
        fleet.push((dev.id.clone(), rec.clone()));
        tasks.push(rt.spawn(device_loop(
            dev,
            url,
            Ipv4Addr::new(127, 0, 0, 21 + i),
            ca.clone(),
            rec,
            stop.clone(),
        )));
    }
    // everyone publishing, on both nodes
    let start = Instant::now();
    loop {
        let ready = fleet.iter().all(|(_, r)| r.lock().unwrap().acks.len() >= 3);
        if ready {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the fleet did not start publishing: {:?}",
            fleet
                .iter()
                .map(|(id, r)| (id.clone(), r.lock().unwrap().errors.clone()))
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (ca_n, cb_n) = (connections(&c.a), connections(&c.b));
    assert!(
        ca_n >= 1.0 && cb_n >= 1.0,
        "both nodes serve devices: a={ca_n} b={cb_n}"
    );
    assert_eq!(ca_n + cb_n, 6.0);

    // SIGTERM node a (its graceful shutdown): its devices go to b
    let pid_a = c.a.pid();
    let term_times = fail_over(&c, "a", move || signal(pid_a, "-TERM"), &fleet, "sigterm");
    assert!(
        c.a.wait_exit(Duration::from_secs(10)).is_some(),
        "node a did not exit after SIGTERM"
    );
    assert_eq!(connections(&c.b), 6.0, "every device is on node b");
    assert_eq!(term_times.len() as f64, ca_n, "node a's devices all moved");

    // node a back; then kill -9 node b: everyone goes to a
    c.a.restart();
    assert!(
        c.lb.wait_status("a", "UP", Duration::from_secs(15))
            .is_some(),
        "node a not back in HAProxy: {:?}",
        c.lb.servers()
    );
    let pid_b = c.b.pid();
    let kill_times = fail_over(&c, "b", move || signal(pid_b, "-KILL"), &fleet, "kill9");
    c.b.kill9(); // reap it
    assert_eq!(kill_times.len(), 6, "every device was on node b");

    // a few more messages on node a, then stop the devices
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Release);
    for t in tasks {
        rt.block_on(t).unwrap();
    }

    // nothing lost, nothing twice: every acknowledged message is stored exactly once, and
    // nothing is stored that was never sent
    for (id, rec) in &fleet {
        let r = rec.lock().unwrap();
        let acked: BTreeSet<String> = r.acks.iter().map(|(n, _, _)| format!("{id}-{n}")).collect();
        let stored = all_messages(&c.a, id);
        let mut seen = BTreeSet::new();
        for m in &stored {
            let key = m.msg_id.clone().unwrap_or_default();
            assert_eq!(m.payload, key, "payload is the msg-id");
            assert!(seen.insert(key.clone()), "{key} stored twice");
        }
        let missing: Vec<_> = acked.difference(&seen).collect();
        assert!(
            missing.is_empty(),
            "{id}: acknowledged but not stored: {missing:?}"
        );
        for k in &seen {
            let n: u32 = k.rsplit('-').next().unwrap().parse().unwrap();
            assert!(n <= r.sent, "{id}: {k} stored but never sent");
        }
        assert!(
            seen.len() >= acked.len() && seen.len() <= acked.len() + 1,
            "{id}: {} stored, {} acknowledged (at most the one in flight more)",
            seen.len(),
            acked.len()
        );
        eprintln!(
            "{id}: {} acknowledged, {} stored, {} connections",
            acked.len(),
            seen.len(),
            r.conns.len()
        );
    }
}

/// The configuration docs/scaling.md shows: the generator the tests run, with production
/// addresses (and no `source` line: HAProxy's own address is what the nodes trust).
fn documented_spec() -> Spec {
    let node = |name: &str, ip: [u8; 4]| Node {
        name: name.to_owned(),
        https: SocketAddr::from((ip, 8443)),
        mqtt: SocketAddr::from((ip, 8883)),
    };
    Spec {
        bind: "0.0.0.0".into(),
        mqtt_port: 8883,
        https_port: 8443,
        source: None,
        ca_file: "/etc/haproxy/devid-ca.pem".into(),
        server_name: "iot.example.com".into(),
        inter_ms: 300,
        fall: 2,
        rise: 1,
        stats_socket: Some("/run/haproxy/admin.sock".into()),
        nodes: vec![node("node1", [10, 0, 0, 11]), node("node2", [10, 0, 0, 12])],
    }
}

#[test]
fn docs_scaling_md_shows_the_configuration_these_tests_run() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/scaling.md");
    let doc = std::fs::read_to_string(&path).unwrap();
    let cfg = documented_spec().config();
    assert!(
        doc.contains(&cfg),
        "{} does not show the configuration devid_testkit::haproxy writes; it should contain:\n{cfg}",
        path.display()
    );
}
