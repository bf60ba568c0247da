//! The agent library against a real Mosquitto 2 broker (mTLS, require_certificate), with a
//! soft-keystore device whose certificate is minted by a throwaway rcgen CA. The end-to-end
//! tests with a TPM (swtpm) and the real `devid` binary are in crates/devid/tests/agent_*.rs.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devid_agent::status::{AgentStatus, ConnState};
use devid_agent::AgentConfig;
use devid_keystore::soft::SoftKeystore;
use devid_keystore::Keystore;
use devid_vault::{Contents, Vault};
use support::*;

struct Device {
    _tmp: tempfile::TempDir,
    state: PathBuf,
    vault: Arc<Vault>,
}

fn soft_device(pki: &Pki, id: &str, serial: u64, mqtt_port: u16) -> Device {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    devid_keystore::fsutil::ensure_private_dir(&state).unwrap();
    let ks: Arc<dyn Keystore> = Arc::new(SoftKeystore::create(&state).unwrap());
    let vault = Vault::create(&state, ks.clone()).unwrap();
    let chain = pki.device_chain(id, &devid_keystore::spki_der(&ks.public_key()), serial, 30);
    vault
        .store(&Contents {
            mqtt_url: Some(format!("mqtts://127.0.0.1:{mqtt_port}")),
            ca_pin: Some(pki.pin.clone()),
            ca_cert_pem: Some(pki.ca_pem.clone()),
            device_id: Some(id.into()),
            cert_chain_pem: Some(chain),
            ..Contents::default()
        })
        .unwrap();
    Device {
        _tmp: tmp,
        state,
        vault: Arc::new(vault),
    }
}

struct Running {
    socket: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<AgentStatus>>,
}

impl Running {
    fn start(dev: &Device, tweak: impl FnOnce(&mut AgentConfig)) -> Running {
        let mut cfg = AgentConfig::new(dev.state.clone());
        cfg.socket = dev.state.join("agent.sock");
        cfg.backoff_base = Duration::from_millis(100);
        cfg.backoff_cap = Duration::from_secs(1);
        cfg.status_interval = Duration::from_millis(500);
        tweak(&mut cfg);
        let socket = cfg.socket.clone();
        let vault = dev.vault.clone();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(devid_agent::run_async(cfg, vault, async move {
                let _ = rx.await;
            }))
            .unwrap()
        });
        wait_for("the agent socket", Duration::from_secs(10), || {
            socket.exists().then_some(())
        });
        Running {
            socket,
            stop: Some(tx),
            thread: Some(thread),
        }
    }

    fn status(&self) -> AgentStatus {
        let v = devid_agent::local::status(&self.socket, Duration::from_secs(5)).unwrap();
        serde_json::from_value(v).unwrap()
    }

    fn wait_status(&self, what: &str, f: impl Fn(&AgentStatus) -> bool) -> AgentStatus {
        wait_for(what, Duration::from_secs(20), || {
            let s = self.status();
            f(&s).then_some(s)
        })
    }

    fn stop(mut self) -> AgentStatus {
        let _ = self.stop.take().unwrap().send(());
        self.thread.take().unwrap().join().unwrap()
    }
}

fn payloads(prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("{prefix}-{i:06}")).collect()
}

#[test]
fn every_message_arrives_once_with_its_msg_id_and_reconnects_resume_tls() {
    let pki = Pki::new();
    let broker = Mosquitto::start(&pki);
    let sub = Subscriber::start(broker.plain_port);
    let dev = soft_device(&pki, "dev-1", 1001, broker.tls_port);
    let agent = Running::start(&dev, |_| {});
    agent.wait_status("connected", |s| s.connection.state == ConnState::Connected);

    let answers = publish_pipelined(&agent.socket, "telemetry/t", payloads("a", 0..2000));
    assert_eq!(answers.len(), 2000);
    assert!(
        answers.iter().all(|a| a.ok),
        "{:?}",
        answers.iter().find(|a| !a.ok)
    );
    let counts = sub.wait_distinct(2000, Duration::from_secs(30));
    assert!(counts.values().all(|c| *c == 1), "a message arrived twice");
    let msgs = sub.messages();
    assert!(msgs
        .iter()
        .all(|(t, _, _)| t == "devices/dev-1/telemetry/t"));
    let mut ids: Vec<&String> = msgs.iter().map(|(_, id, _)| id).collect();
    assert!(ids.iter().all(|i| i.len() == 32));
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 2000, "every message has its own msg-id");
    // msg-id is what the agent answered
    let by_payload: std::collections::HashMap<&str, &str> = msgs
        .iter()
        .map(|(_, id, p)| (p.as_str(), id.as_str()))
        .collect();
    assert_eq!(
        by_payload["a-000007"],
        answers[7].msg_id.as_deref().unwrap()
    );

    let s = agent.wait_status("outbox drained", |s| s.outbox.depth == 0);
    assert_eq!(s.mqtt.acked, 2000);
    assert_eq!(s.tls.full_handshakes, 1);
    assert_eq!(
        s.tls.keystore_signatures, 1,
        "one keystore signature per full handshake"
    );

    // Another client takes the id over: the agent reconnects, resuming the TLS session.
    broker.take_over("dev-1");
    let s = agent.wait_status("reconnected", |s| {
        s.connection.connects >= 2 && s.connection.state == ConnState::Connected
    });
    assert_eq!(s.tls.resumed_handshakes, 1, "{s:?}");
    assert_eq!(
        s.tls.keystore_signatures, 1,
        "a resumed handshake costs no keystore signature"
    );
    let answers = publish_pipelined(&agent.socket, "events/e", payloads("b", 0..100));
    assert!(answers.iter().all(|a| a.ok));
    sub.wait_distinct(2100, Duration::from_secs(20));
    let end = agent.stop();
    assert_eq!(end.connection.state, ConnState::Stopped);
    assert_eq!(end.outbox.depth, 0);
}

#[test]
fn revoked_device_backs_off_to_the_cap_keeps_its_outbox_and_drains_when_allowed_again() {
    let pki = Pki::new();
    let mut broker = Mosquitto::start(&pki);
    let sub = Subscriber::start(broker.plain_port);
    let dev = soft_device(&pki, "dev-2", 2002, broker.tls_port);
    let agent = Running::start(&dev, |c| {
        c.backoff_cap = Duration::from_secs(2);
    });
    agent.wait_status("connected", |s| s.connection.state == ConnState::Connected);
    assert!(
        publish_pipelined(&agent.socket, "telemetry/t", payloads("r", 0..10))
            .iter()
            .all(|a| a.ok)
    );
    sub.wait_distinct(10, Duration::from_secs(10));

    // The broker restarts with a CRL that revokes the device.
    broker.run(Some(&pki.crl(&[2002])));
    let s = agent.wait_status("refused", |s| s.connection.state == ConnState::Refused);
    let why = s.connection.last_error.clone().unwrap();
    assert!(why.contains("refused this device's certificate"), "{why}");
    assert!(
        publish_pipelined(&agent.socket, "telemetry/t", payloads("r", 10..30))
            .iter()
            .all(|a| a.ok)
    );

    // Slow retries: delays at the cap are 1-2 s, never a tight loop.
    let a0 = agent.status().connection.attempts;
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(5));
    let s = agent.status();
    let tries = s.connection.attempts - a0;
    assert!(
        (2..=6).contains(&tries),
        "{tries} attempts in {:?}",
        t0.elapsed()
    );
    assert_eq!(s.connection.state, ConnState::Refused);
    assert!(s.connection.retry_in_ms.unwrap() >= 1000);
    assert_eq!(
        s.outbox.depth, 20,
        "the outbox keeps what the apps handed over"
    );

    // Allowed again: everything drains, in order.
    broker.run(None);
    let counts = sub.wait_distinct(30, Duration::from_secs(20));
    assert!(counts.values().all(|c| *c == 1));
    let order: Vec<String> = sub.messages().into_iter().map(|(_, _, p)| p).collect();
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(order, sorted, "delivered in the order accepted");
    agent.wait_status("drained", |s| s.outbox.depth == 0);
    agent.stop();
}
