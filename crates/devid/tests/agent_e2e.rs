//! `devid agent` end to end: a TPM device (swtpm) enrolled with a real `devid-server`, the
//! agent process connecting to the server's MQTT ingest over mutual TLS with the key in the
//! TPM, applications publishing through the local socket. Counts are taken on the server
//! (`devid-server messages list`), which stores each `msg-id` once.
#![allow(clippy::unwrap_used)]

mod agent_support;
mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_support::*;
use common::Devid;
use devid_testkit::server::DevidServer;
use devid_testkit::softhsm::SoftHsm;
use devid_testkit::swtpm::Swtpm;

#[path = "../../agent/tests/support/mod.rs"]
mod support;

fn tpm_device(server: &DevidServer, id: &str) -> (Swtpm, Devid) {
    let tpm = Swtpm::start();
    let d = Devid::new().tcti(&tpm.tcti());
    d.run(&["init", "--backend", "tpm"]).ok();
    enrol(server, &d, id);
    (tpm, d)
}

fn payloads(prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("{prefix}-{i:06}")).collect()
}

/// Payload → how many times the server stored it.
fn stored_counts(server: &DevidServer, id: &str) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for (_, _, p) in server_messages(server, id) {
        *m.entry(p).or_insert(0) += 1;
    }
    m
}

fn wait_stored(
    server: &DevidServer,
    id: &str,
    n: usize,
    timeout: Duration,
) -> HashMap<String, usize> {
    let t = Instant::now();
    loop {
        let c = stored_counts(server, id);
        if c.len() >= n {
            return c;
        }
        assert!(
            t.elapsed() < timeout,
            "only {} of {n} messages stored",
            c.len()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn tpm_agent_delivers_10000_messages_exactly_once_and_resumes_tls() {
    let server = server_for_tests(None);
    let (_tpm, d) = tpm_device(&server, "tpm-agent-1");
    let proxy = Proxy::start(server.mqtt_port);
    set_mqtt_url(&d, &format!("mqtts://localhost:{}", proxy.port));
    let agent = Agent::start(&d, &[]);
    agent.wait_status("connected", Duration::from_secs(20), |s| {
        s["connection"]["state"] == "connected"
    });
    let rss_idle = agent.rss_kib();

    // 10,000 messages from four applications at once.
    let t0 = Instant::now();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let socket = agent.socket.clone();
            std::thread::spawn(move || {
                support::publish_pipelined(
                    &socket,
                    "telemetry/load",
                    payloads(&format!("app{t}"), 0..2500),
                )
            })
        })
        .collect();
    let mut acked = 0;
    for t in threads {
        let answers = t.join().unwrap();
        assert_eq!(answers.len(), 2500);
        assert!(
            answers.iter().all(|a| a.ok),
            "{:?}",
            answers.iter().find(|a| !a.ok)
        );
        acked += answers.len();
    }
    let t_outbox = t0.elapsed();
    let s = agent.wait_status("all acked by the server", Duration::from_secs(60), |s| {
        s["mqtt"]["acked"] == 10_000
    });
    let t_server = t0.elapsed();
    assert_eq!(acked, 10_000);
    assert_eq!(s["outbox"]["depth"], 0);
    let counts = wait_stored(&server, "tpm-agent-1", 10_000, Duration::from_secs(20));
    assert_eq!(counts.len(), 10_000);
    assert!(
        counts.values().all(|c| *c == 1),
        "a message was stored twice"
    );
    let msgs = server_messages(&server, "tpm-agent-1");
    let mut ids: Vec<&str> = msgs.iter().map(|(_, id, _)| id.as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 10_000, "each message carries its own msg-id");
    // One connection, one full handshake, one TPM signature.
    assert_eq!(s["tls"]["full_handshakes"], 1);
    assert_eq!(s["tls"]["keystore_signatures"], 1);

    // RSS under a steady ~1,000 msg/s for 3 s.
    let mut rss_load = 0;
    for round in 0..30 {
        let answers = support::publish_pipelined(
            &agent.socket,
            "telemetry/steady",
            payloads(&format!("steady{round}"), 0..100),
        );
        assert!(answers.iter().all(|a| a.ok));
        rss_load = rss_load.max(agent.rss_kib());
        std::thread::sleep(Duration::from_millis(90));
    }

    // Network cut: the reconnect resumes the TLS session, no TPM signature.
    proxy.cut();
    let s = agent.wait_status("reconnected", Duration::from_secs(20), |s| {
        s["connection"]["connects"] == 2 && s["connection"]["state"] == "connected"
    });
    assert_eq!(s["tls"]["resumed_handshakes"], 1, "{s:#}");
    assert_eq!(
        s["tls"]["keystore_signatures"], 1,
        "resumed: no TPM signature"
    );
    // Server restart: its session cache is gone, the reconnect is a full handshake.
    let mut server = server;
    server.stop();
    server.run();
    let s = agent.wait_status("reconnected after restart", Duration::from_secs(20), |s| {
        s["connection"]["connects"] == 3 && s["connection"]["state"] == "connected"
    });
    assert_eq!(s["tls"]["full_handshakes"], 2);
    assert_eq!(
        s["tls"]["keystore_signatures"], 2,
        "full handshake: one TPM signature"
    );
    assert!(
        support::publish_pipelined(&agent.socket, "events/after", payloads("after", 0..10))
            .iter()
            .all(|a| a.ok)
    );
    wait_stored(&server, "tpm-agent-1", 13_010, Duration::from_secs(20));

    println!(
        "MEASURED agent: 10,000 msgs from 4 apps: in the durable outbox after {:.2}s, acked by \
         the server after {:.2}s ({:.0} msg/s end to end); RSS idle {} KiB, under ~1,000 msg/s \
         {} KiB; TPM signatures per reconnect: 0 resumed, 1 full",
        t_outbox.as_secs_f64(),
        t_server.as_secs_f64(),
        10_000.0 / t_server.as_secs_f64(),
        rss_idle,
        rss_load
    );
}

/// `kill -9` of the agent at random moments while 4 applications send through its socket
/// (issue 15: 5 rounds by default, 20 in the full run, `DEVID_ROBUST_ROUNDS=N`). Every message
/// an application saw acknowledged reaches the server exactly once.
fn kill_9_rounds(server: &DevidServer, d: &Devid, id: &str, backend: &str) {
    const APPS: usize = 4;
    let rounds = devid_testkit::robust::rounds(5, 20);
    let mut agent = Agent::start(d, &[]);
    let socket = agent.socket.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let apps: Vec<_> = (0..APPS)
        .map(|k| {
            let (stop, acked, socket) = (stop.clone(), acked.clone(), socket.clone());
            std::thread::spawn(move || {
                let mut n = 0usize;
                while !stop.load(Ordering::SeqCst) {
                    let batch = payloads(&format!("a{k}"), n..n + 40);
                    n += 40;
                    // Empty when the agent is down (connect refused).
                    let answers = support::publish_pipelined(&socket, "telemetry/k", batch.clone());
                    let mut g = acked.lock().unwrap();
                    for (a, p) in answers.iter().zip(batch) {
                        if a.ok {
                            g.push(p);
                        }
                    }
                    drop(g);
                    if answers.len() < 40 {
                        std::thread::sleep(Duration::from_millis(30));
                    }
                }
            })
        })
        .collect();
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    let first_seed = seed;
    let mut recovery = Vec::new();
    // swtpm has no resource manager: each killed agent leaves its SRK, device key and session
    // loaded. Nothing flushes them here; the restarted agent must (issue 12, item 3).
    for round in 0..rounds {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(300 + seed % 700));
        agent.kill9();
        std::thread::sleep(Duration::from_millis(100));
        let t = Instant::now();
        agent.spawn();
        let pid = agent.pid();
        agent.wait_status(
            &format!("reconnected after kill {} (seed {first_seed})", round + 1),
            Duration::from_secs(20),
            |s| s["pid"] == pid && s["connection"]["state"] == "connected",
        );
        recovery.push(t.elapsed());
    }
    if backend == "swtpm" {
        assert!(
            agent
                .log_text()
                .contains("flushed TPM objects and sessions left by a previous process"),
            "{}",
            agent.log_text()
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    for a in apps {
        a.join().unwrap();
    }
    agent.wait_status("outbox drained", Duration::from_secs(60), |s| {
        s["outbox"]["depth"] == 0 && s["connection"]["state"] == "connected"
    });
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 200, "the apps got only {} acks", acked.len());
    let counts = stored_counts(server, id);
    for p in &acked {
        assert_eq!(
            counts.get(p),
            Some(&1),
            "acknowledged message {p} stored {:?} times (seed {first_seed})",
            counts.get(p)
        );
    }
    let twice = counts.values().filter(|c| **c > 1).count();
    assert_eq!(twice, 0, "messages stored twice");
    let max_rec = recovery.iter().max().copied().unwrap_or_default();
    let mean_rec = recovery.iter().sum::<Duration>() / recovery.len().max(1) as u32;
    println!(
        "MEASURED kill -9 x{rounds} on {backend}, {APPS} apps: {} acknowledged, all stored exactly \
         once ({} stored in total); restart to connected mean {mean_rec:?}, max {max_rec:?}",
        acked.len(),
        counts.len()
    );
    devid_testkit::robust::Report::new(&format!("agent_kill9_4_apps_{backend}"))
        .text("threats", "C1")
        .num("rounds", rounds as f64)
        .num("apps", APPS as f64)
        .num("acked", acked.len() as f64)
        .num("acked_stored", acked.len() as f64)
        .num("stored", counts.len() as f64)
        .num("duplicates", twice as f64)
        .num("recovery_ms_mean", mean_rec.as_secs_f64() * 1000.0)
        .num("recovery_ms_max", max_rec.as_secs_f64() * 1000.0)
        .emit();
}

#[test]
fn kill_9_at_random_points_every_acknowledged_message_is_stored_once() {
    let server = server_for_tests(None);
    let (_tpm, d) = tpm_device(&server, "tpm-agent-2");
    kill_9_rounds(&server, &d, "tpm-agent-2", "swtpm");
}

#[test]
fn kill_9_at_random_points_on_softhsm_every_acknowledged_message_is_stored_once() {
    let server = server_for_tests(None);
    let hsm = SoftHsm::new("killed");
    let d = Devid::new().envs(hsm.env());
    d.run(&[
        "init",
        "--backend",
        "pkcs11",
        "--module",
        &hsm.module().display().to_string(),
        "--token",
        hsm.label(),
        "--pin-file",
        &hsm.pin_file().display().to_string(),
    ])
    .ok();
    enrol(&server, &d, "hsm-agent-2");
    kill_9_rounds(&server, &d, "hsm-agent-2", "softhsm");
}

#[test]
fn server_down_messages_buffer_and_drain_in_order_then_revocation_backs_off() {
    let mut server = DevidServer::start();
    let (_tpm, d) = tpm_device(&server, "tpm-agent-3");
    let agent = Agent::start(&d, &["--backoff-cap", "2s"]);
    agent.wait_status("connected", Duration::from_secs(20), |s| {
        s["connection"]["state"] == "connected"
    });
    server.stop();
    let answers = support::publish_pipelined(&agent.socket, "telemetry/o", payloads("o", 0..300));
    assert!(answers.iter().all(|a| a.ok));
    let s = agent.wait_status("buffered", Duration::from_secs(10), |s| {
        s["outbox"]["depth"] == 300 && s["connection"]["state"] != "connected"
    });
    assert!(s["connection"]["last_error"].as_str().is_some());
    std::thread::sleep(Duration::from_secs(2));
    server.run();
    agent.wait_status("drained", Duration::from_secs(20), |s| {
        s["outbox"]["depth"] == 0
    });
    let stored: Vec<String> = server_messages(&server, "tpm-agent-3")
        .into_iter()
        .map(|(_, _, p)| p)
        .collect();
    assert_eq!(stored, payloads("o", 0..300), "all stored once, in order");

    // Revoked: the live session is cut, the agent says so and retries only slowly.
    let out = server.cli(&["device", "revoke", "tpm-agent-3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = agent.wait_status("refused", Duration::from_secs(10), |s| {
        s["connection"]["state"] == "refused"
    });
    let why = s["connection"]["last_error"].as_str().unwrap().to_string();
    assert!(why.contains("revoked"), "{why}");
    assert!(
        support::publish_pipelined(&agent.socket, "telemetry/o", payloads("late", 0..5))
            .iter()
            .all(|a| a.ok)
    );
    let a0 = agent.status()["connection"]["attempts"].as_u64().unwrap();
    std::thread::sleep(Duration::from_secs(4));
    let s = agent.status();
    let tries = s["connection"]["attempts"].as_u64().unwrap() - a0;
    assert!(tries <= 5, "{tries} attempts in 4 s while refused");
    assert_eq!(s["connection"]["state"], "refused");
    assert_eq!(s["outbox"]["depth"], 5, "the outbox keeps the messages");
    assert!(agent.log_text().contains("connection refused"));
    // `devid status --agent` tells the operator.
    let st = d.run(&["status", "--agent"]).ok().text();
    assert!(st.contains("refused") && st.contains("5 waiting"), "{st}");
}

#[test]
fn renewal_with_one_minute_certificates_loses_no_message() {
    let server = server_for_tests(Some("1m"));
    let (_tpm, d) = tpm_device(&server, "tpm-agent-4");
    let serial0 = cert_serial(&d.state, &d);
    let mut agent = Agent::start(&d, &["--renew-at", "0.1"]);
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let app = {
        let (stop, acked, socket) = (stop.clone(), acked.clone(), agent.socket.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                let batch = payloads("n", n..n + 20);
                n += 20;
                let answers = support::publish_pipelined(&socket, "events/r", batch.clone());
                let mut g = acked.lock().unwrap();
                g.extend(
                    answers
                        .iter()
                        .zip(batch)
                        .filter(|(a, _)| a.ok)
                        .map(|(_, p)| p),
                );
                drop(g);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    // Each renewal is followed by a reconnect with the new certificate (a full handshake).
    let s = agent.wait_status(
        "two renewals and reconnects",
        Duration::from_secs(30),
        |s| {
            s["certificate"]["renewals"].as_u64().unwrap_or(0) >= 2
                && s["connection"]["connects"].as_u64().unwrap_or(0) >= 3
                && s["connection"]["state"] == "connected"
        },
    );
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    app.join().unwrap();
    let s2 = agent.wait_status("drained", Duration::from_secs(20), |s| {
        s["outbox"]["depth"] == 0
    });
    let serial = s2["certificate"]["serial"].as_str().unwrap().to_string();
    assert_ne!(serial, serial0);
    assert!(s["tls"]["full_handshakes"].as_u64().unwrap() >= 2, "{s:#}");
    assert!(s2["certificate"]["last_renewal_error"].is_null());
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 100);
    let counts = stored_counts(&server, "tpm-agent-4");
    for p in &acked {
        assert_eq!(counts.get(p), Some(&1), "{p}");
    }
    agent.stop();
    // The new chain is sealed in the bundle.
    assert_eq!(cert_serial(&d.state, &d), serial);
}

fn cert_serial(_state: &Path, d: &Devid) -> String {
    let v: serde_json::Value =
        serde_json::from_slice(&d.run(&["status", "--json"]).ok().stdout).unwrap();
    v["certificate"]["serial"]
        .as_str()
        .unwrap()
        .replace(':', "")
}

/// In `dir`'s segments, find the record whose body contains `needle` and let `change` edit
/// its body in place (same length); the CRC is recomputed, as an attacker would. Handles
/// records with and without a MAC tag. Returns whether the record was found.
fn edit_outbox_record(dir: &Path, needle: &[u8], change: impl Fn(&mut [u8])) -> bool {
    use devid_agent::outbox::{MAC_TAG_LEN, RECORD_HEADER_LEN, RECORD_MAGIC_MAC};
    for e in std::fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        if !path.to_string_lossy().ends_with(".log") {
            continue;
        }
        let mut bytes = std::fs::read(&path).unwrap();
        let mut pos = 0;
        while pos + RECORD_HEADER_LEN <= bytes.len() {
            let len = u32::from_be_bytes(bytes[pos + 2..pos + 6].try_into().unwrap()) as usize;
            let tag = if bytes[pos..pos + 2] == RECORD_MAGIC_MAC {
                MAC_TAG_LEN
            } else {
                0
            };
            let body = pos + RECORD_HEADER_LEN..pos + RECORD_HEADER_LEN + len;
            if devid_testkit::contains(&bytes[body.clone()], needle) {
                change(&mut bytes[body.clone()]);
                let crc = crc32fast::hash(&bytes[body]);
                bytes[pos + 6..pos + 10].copy_from_slice(&crc.to_be_bytes());
                std::fs::write(&path, &bytes).unwrap();
                return true;
            }
            pos += RECORD_HEADER_LEN + len + tag;
        }
    }
    false
}

/// Review M4 / THREATS.md T15: records written into the outbox offline, or changed there
/// (with a recomputed CRC), are refused, counted and never sent under the device's identity.
#[test]
fn forged_or_altered_outbox_records_are_refused_and_never_sent() {
    let mut server = server_for_tests(None);
    let (_tpm, d) = tpm_device(&server, "tpm-outbox-mac");
    let mut agent = Agent::start(&d, &[]);
    agent.wait_status("connected", Duration::from_secs(20), |s| {
        s["connection"]["state"] == "connected"
    });
    // Messages that wait in the outbox: the server is down.
    server.stop();
    for p in ["pending-1", "pending-2", "pending-3"] {
        devid_agent::local::publish(
            &agent.socket,
            "telemetry/t",
            p.as_bytes(),
            Duration::from_secs(5),
        )
        .unwrap();
    }
    agent.stop();

    // Offline: change one stored reading, and append a forged one after the last record.
    let outbox = d.state.join("outbox");
    assert!(edit_outbox_record(&outbox, b"pending-2", |body| {
        let n = body.len();
        body[n - 9..].copy_from_slice(b"TAMPERED2");
    }));
    let mut last = None;
    for e in std::fs::read_dir(&outbox).unwrap() {
        let p = e.unwrap().path();
        if p.to_string_lossy().ends_with(".log")
            && last.as_ref().is_none_or(|l: &std::path::PathBuf| p > *l)
        {
            last = Some(p);
        }
    }
    let seg = last.expect("a segment");
    let mut bytes = std::fs::read(&seg).unwrap();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    // seq far above anything stored, a fresh epoch: a "new" reading.
    devid_agent::outbox::encode_record(
        1000,
        0xbad,
        now_ms,
        "telemetry/t",
        b"FORGED-READING",
        &mut bytes,
    );
    std::fs::write(&seg, &bytes).unwrap();

    server.run();
    agent.spawn();
    let s = agent.wait_status("drained", Duration::from_secs(30), |s| {
        s["outbox"]["depth"] == 0 && s["connection"]["state"] == "connected"
    });
    let counts = wait_stored(&server, "tpm-outbox-mac", 2, Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(500));
    let counts_after = stored_counts(&server, "tpm-outbox-mac");
    assert_eq!(counts, counts_after);
    assert_eq!(counts.get("pending-1"), Some(&1), "{counts:?}");
    assert_eq!(counts.get("pending-3"), Some(&1), "{counts:?}");
    for bad in [
        "FORGED-READING",
        "pending-TAMPERED2",
        "TAMPERED2",
        "pending-2",
    ] {
        assert!(
            !counts.keys().any(|k| k.contains(bad)),
            "{bad} reached the server: {counts:?}"
        );
    }
    assert_eq!(
        s["outbox"]["refused_unauthenticated"], 2,
        "the forged and the altered record are counted: {s:#}"
    );
    assert!(agent.log_text().contains("failed authentication"));
}

/// A tmpfs of `size` (the device's "disk"), unmounted on drop even after a failure. Needs
/// root.
struct Tmpfs {
    dir: std::path::PathBuf,
    _parent: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Self {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("fs");
        std::fs::create_dir(&dir).unwrap();
        let ok = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "devid-agent-test",
            ])
            .arg(&dir)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount -t tmpfs failed (this test needs root)");
        Tmpfs {
            dir,
            _parent: parent,
        }
    }

    /// Fill the filesystem up to the last byte.
    fn fill(&self) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.dir.join("filler")).unwrap();
        for chunk in [1 << 20, 4096, 1] {
            let buf = vec![0u8; chunk];
            for _ in 0..100_000 {
                if f.write_all(&buf).is_err() {
                    break;
                }
            }
        }
        let _ = f.sync_all();
    }

    fn unfill(&self) {
        std::fs::remove_file(self.dir.join("filler")).unwrap();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = std::process::Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.dir)
                .status();
        }
    }
}

/// Issue 15: the device's disk fills up while the server is away. The agent refuses new
/// application messages with a clear error (`disk_full`), keeps every message it had
/// accepted, takes messages again as soon as space returns (no restart), and once the server
/// is back every accepted message is stored exactly once and no refused one is.
#[test]
fn a_full_device_disk_refuses_new_messages_keeps_the_outbox_and_recovers() {
    let mut server = DevidServer::start();
    let fs = Tmpfs::mount("16m");
    let d = Devid::at(&fs.dir.join("state"));
    d.run(&["init", "--backend", "soft"]).ok();
    enrol(&server, &d, "full-disk-1");
    let agent = Agent::start(&d, &[]);
    agent.wait_status("connected", Duration::from_secs(20), |s| {
        s["connection"]["state"] == "connected"
    });
    server.stop();
    let before =
        support::publish_pipelined(&agent.socket, "telemetry/f", payloads("before", 0..200));
    assert!(before.iter().all(|a| a.ok) && before.len() == 200);
    agent.wait_status("buffered", Duration::from_secs(10), |s| {
        s["outbox"]["depth"] == 200
    });
    fs.fill();
    // 1 KiB messages: what still fits in the segment file's last allocated page is stored
    // (and must arrive); the rest is refused
    let full: Vec<String> = (0..20)
        .map(|i| format!("full-{i:06}-{}", "x".repeat(1000)))
        .collect();
    let answers = support::publish_pipelined(&agent.socket, "telemetry/f", full.clone());
    assert_eq!(answers.len(), 20, "every request answered");
    let mut kept_full = Vec::new();
    let mut refused = 0usize;
    for (a, p) in answers.iter().zip(&full) {
        if a.ok {
            kept_full.push(p.clone());
            continue;
        }
        refused += 1;
        assert_eq!(a.code.as_deref(), Some("disk_full"), "{:?}", a.error);
        assert!(
            a.error
                .as_deref()
                .is_some_and(|e| e.contains("no space left")),
            "{:?}",
            a.error
        );
    }
    assert!(refused >= 10, "only {refused} of 20 refused on a full disk");
    assert_eq!(
        agent.status()["outbox"]["depth"],
        200 + kept_full.len(),
        "the outbox is kept"
    );
    fs.unfill();
    let t = Instant::now();
    let mut after = Vec::new();
    for _ in 0..50 {
        after = support::publish_pipelined(&agent.socket, "telemetry/f", payloads("after", 0..20));
        if after.iter().all(|a| a.ok) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let recovered = t.elapsed();
    assert!(
        after.len() == 20 && after.iter().all(|a| a.ok),
        "the agent did not take messages again once space returned: {}",
        agent.log_text()
    );
    server.run();
    agent.wait_status("drained", Duration::from_secs(30), |s| {
        s["outbox"]["depth"] == 0
    });
    let counts = stored_counts(&server, "full-disk-1");
    let mut want = payloads("before", 0..200);
    want.extend(kept_full.iter().cloned());
    want.extend(payloads("after", 0..20));
    for p in &want {
        assert_eq!(counts.get(p), Some(&1), "{p}");
    }
    assert_eq!(counts.len(), want.len(), "no refused message was stored");
    println!(
        "MEASURED device disk full: 200 queued kept, {refused} of 20 refused with disk_full, \
         taking messages again {recovered:?} after space returned; {} stored exactly once",
        want.len()
    );
    devid_testkit::robust::Report::new("agent_disk_full")
        .text("threats", "T12b")
        .num("acked", want.len() as f64)
        .num("acked_stored", want.len() as f64)
        .num("refused", refused as f64)
        .num("duplicates", 0)
        .num("recovered_ms", recovered.as_secs_f64() * 1000.0)
        .emit();
}
