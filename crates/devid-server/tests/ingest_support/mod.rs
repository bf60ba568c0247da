//! Helpers for the MQTT ingest tests: devices enrolled through the real server with soft
//! keys, a small Rust MQTT client (tokio + tokio-rustls + devid-mqtt's codec), third-party
//! client invocations, and API reads.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::collections::HashMap;
use std::num::NonZeroU16;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use devid_enroll::{build_csr_with_keystore, enroll};
use devid_keystore::soft::SoftKeystore;
use devid_keystore::Keystore;
use devid_mqtt::{Bytes, BytesMut, Codec, Connect, Packet, Protocol, Publish};
use devid_proto::{MessagePage, MessageView};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::common::Server;

/// Settings that keep the per-device rate limits out of the way of tests that are not about
/// them.
pub const FAST: &str = "mqtt.messages_per_sec = 1000000.0\nmqtt.messages_burst = 1000000.0\n\
                        mqtt.bytes_per_sec = 1000000000.0\nmqtt.bytes_burst = 1000000000.0";

/// An enrolled device: its soft key (PKCS#8 PEM file) and certificate chain on disk.
#[derive(Debug, Clone)]
pub struct Device {
    pub id: String,
    pub dir: PathBuf,
    /// PKCS#8 PEM private key (the soft keystore's file).
    pub key_path: PathBuf,
    /// Leaf + CA, PEM.
    pub cert_path: PathBuf,
}

impl Device {
    pub fn key_pem(&self) -> String {
        std::fs::read_to_string(&self.key_path).unwrap()
    }
    pub fn cert_pem(&self) -> String {
        std::fs::read_to_string(&self.cert_path).unwrap()
    }
    pub fn topic(&self, rest: &str) -> String {
        format!("devices/{}/{rest}", self.id)
    }
}

/// Enrol `id` through the real server (token with `policy`), soft key in a fresh dir.
pub fn enrol(s: &Server, id: &str, policy: &str) -> Device {
    let token = s.token(&["--device-id", id, "--ttl", "10m", "--policy", policy]);
    let dir = s.tmp.path().join(format!("dev-{id}"));
    std::fs::create_dir_all(&dir).unwrap();
    let ks: Arc<dyn Keystore> = Arc::new(SoftKeystore::create(&dir).unwrap());
    let csr = build_csr_with_keystore(&*ks, Some(id)).unwrap();
    let resp = enroll(&s.url, &token, &s.pin, &csr, Some(id)).unwrap();
    assert_eq!(resp.device_id, id);
    let cert_path = dir.join("cert.pem");
    std::fs::write(&cert_path, &resp.certificate_chain).unwrap();
    Device {
        id: id.to_owned(),
        key_path: dir.join(devid_keystore::soft::KEY_FILE),
        cert_path,
        dir,
    }
}

/// A device certificate made outside the enrolment path (foreign CA, expired...).
pub fn write_identity(dir: &Path, name: &str, chain_pem: &str, key_pem: &str) -> Device {
    std::fs::create_dir_all(dir).unwrap();
    let key_path = dir.join(format!("{name}-key.pem"));
    let cert_path = dir.join(format!("{name}-cert.pem"));
    std::fs::write(&key_path, key_pem).unwrap();
    std::fs::write(&cert_path, chain_pem).unwrap();
    Device {
        id: name.to_owned(),
        dir: dir.to_path_buf(),
        key_path,
        cert_path,
    }
}

/// A certificate for `urn:devid:<id>` signed by the CA `issuer` with the given validity.
pub fn issue_cert(
    issuer: &rcgen::Issuer<'_, rcgen::KeyPair>,
    id: &str,
    not_before: time::OffsetDateTime,
    not_after: time::OffsetDateTime,
) -> (String, String) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, id);
    params.distinguished_name = dn;
    params.subject_alt_names = vec![rcgen::SanType::URI(
        format!("urn:devid:{id}").try_into().unwrap(),
    )];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.not_before = not_before;
    params.not_after = not_after;
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// A fresh CA that is not the fleet's.
pub fn foreign_ca() -> rcgen::Issuer<'static, rcgen::KeyPair> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "devid fleet CA localhost");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    rcgen::Issuer::new(params, key)
}

/// The fleet CA of a server, from its data dir (file key).
pub fn fleet_ca(s: &Server) -> rcgen::Issuer<'static, rcgen::KeyPair> {
    let cert = std::fs::read_to_string(s.dir.join("ca.pem")).unwrap();
    let key = std::fs::read_to_string(s.dir.join("ca-key.pem")).unwrap();
    let key = rcgen::KeyPair::from_pem(&key).unwrap();
    rcgen::Issuer::from_ca_cert_pem(&cert, key).unwrap()
}

/// A small MQTT client over mutual TLS.
pub struct Client {
    pub stream: TlsStream<TcpStream>,
    pub codec: Codec,
    buf: BytesMut,
}

/// rustls client config: trust the fleet CA, present `identity` if any.
pub fn tls_config(ca_pem: &Path, identity: Option<&Device>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca_pem).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let cfg = match identity {
        Some(d) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&d.cert_path)
                .unwrap()
                .map(|c| c.unwrap())
                .collect();
            let key = PrivateKeyDer::from_pem_file(&d.key_path).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    Arc::new(cfg)
}

/// Open TLS to the MQTT port (the handshake may still be refused later: TLS 1.3 checks the
/// client certificate after the client's Finished).
pub async fn tls_connect(
    port: u16,
    cfg: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    tcp.set_nodelay(true)?;
    TlsConnector::from(cfg)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

pub fn connect_packet(proto: Protocol, client_id: &str, keep_alive: u16) -> Packet {
    Packet::Connect(Box::new(Connect {
        protocol: proto,
        client_id: client_id.into(),
        keep_alive,
        clean_start: true,
        will: None,
        has_username: false,
        has_password: false,
        session_expiry_secs: 0,
        receive_max: None,
        max_packet_size: None,
        auth_method: None,
    }))
}

pub fn publish(topic: &str, qos: u8, pid: u16, payload: &[u8], msg_id: Option<&str>) -> Packet {
    Packet::Publish(Publish {
        topic: topic.into(),
        qos,
        packet_id: NonZeroU16::new(pid),
        payload: Bytes::copy_from_slice(payload),
        retain: false,
        dup: false,
        msg_id: msg_id.map(Into::into),
        topic_alias: None,
    })
}

pub fn nz(n: u16) -> NonZeroU16 {
    NonZeroU16::new(n).unwrap()
}

impl Client {
    pub fn new(stream: TlsStream<TcpStream>, proto: Protocol) -> Self {
        Self {
            stream,
            codec: Codec::client(proto, 1 << 20),
            buf: BytesMut::with_capacity(8192),
        }
    }

    /// TLS + CONNECT; returns the client and the CONNACK code, or why there was none.
    pub async fn connect(
        port: u16,
        ca: &Path,
        dev: &Device,
        proto: Protocol,
        client_id: &str,
    ) -> Result<(Client, u8), String> {
        let stream = tls_connect(port, tls_config(ca, Some(dev)))
            .await
            .map_err(|e| format!("tls: {e}"))?;
        let mut c = Client::new(stream, proto);
        c.send(connect_packet(proto, client_id, 30))
            .await
            .map_err(|e| format!("send: {e}"))?;
        match c.recv(Duration::from_secs(5)).await {
            Ok(Some(Packet::ConnAck { code, .. })) => Ok((c, code)),
            Ok(Some(other)) => Err(format!("expected CONNACK, got {other:?}")),
            Ok(None) => Err("closed without CONNACK".into()),
            Err(e) => Err(e),
        }
    }

    /// Connect and require success.
    pub async fn connect_ok(port: u16, ca: &Path, dev: &Device, proto: Protocol) -> Client {
        let (c, code) = Self::connect(port, ca, dev, proto, &dev.id).await.unwrap();
        assert_eq!(code, 0, "CONNACK code");
        c
    }

    pub async fn send(&mut self, p: Packet) -> std::io::Result<()> {
        let mut out = BytesMut::new();
        self.codec.encode(p, &mut out).unwrap();
        self.stream.write_all(&out).await?;
        self.stream.flush().await
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }

    /// The next packet; `Ok(None)` when the server closed the connection; `Err` on timeout.
    pub async fn recv(&mut self, timeout: Duration) -> Result<Option<Packet>, String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(p) = self
                .codec
                .decode(&mut self.buf)
                .map_err(|e| e.to_string())?
            {
                return Ok(Some(p));
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Err(_) => return Err("timed out waiting for a packet".into()),
                Ok(Ok(0)) | Ok(Err(_)) => return Ok(None),
                Ok(Ok(_)) => {}
            }
        }
    }

    /// Publish QoS 1 and return the PUBACK reason code (None: the server closed instead).
    pub async fn publish_qos1(
        &mut self,
        topic: &str,
        pid: u16,
        payload: &[u8],
        msg_id: Option<&str>,
    ) -> Option<u8> {
        self.send(publish(topic, 1, pid, payload, msg_id))
            .await
            .ok()?;
        loop {
            match self.recv(Duration::from_secs(5)).await.unwrap() {
                Some(Packet::PubAck { packet_id, reason }) => {
                    assert_eq!(packet_id.get(), pid);
                    return Some(reason);
                }
                Some(Packet::Disconnect { .. }) | None => return None,
                Some(_) => {}
            }
        }
    }

    /// Subscribe and return the SUBACK codes (None: closed).
    pub async fn subscribe(&mut self, pid: u16, filters: &[&str]) -> Option<Vec<u8>> {
        self.send(Packet::Subscribe {
            packet_id: nz(pid),
            filters: filters.iter().map(|f| ((*f).into(), 1)).collect(),
        })
        .await
        .ok()?;
        match self.recv(Duration::from_secs(5)).await.unwrap() {
            Some(Packet::SubAck { packet_id, codes }) => {
                assert_eq!(packet_id.get(), pid);
                Some(codes)
            }
            _ => None,
        }
    }

    /// Wait until the server closes; returns the DISCONNECT reason if one came first and the
    /// time it took.
    pub async fn wait_closed(&mut self, timeout: Duration) -> (Option<u8>, Duration) {
        let start = Instant::now();
        let mut reason = None;
        loop {
            match self.recv(timeout).await {
                Ok(Some(Packet::Disconnect { reason: r })) => reason = Some(r),
                Ok(Some(_)) => {}
                Ok(None) => return (reason, start.elapsed()),
                Err(e) => panic!("server did not close within {timeout:?}: {e}"),
            }
        }
    }
}

/// Every stored message of a device, through the API (paged).
pub fn all_messages(s: &Server, device: &str) -> Vec<MessageView> {
    let client =
        devid_admin_client::MessagesClient::from_data_dir(&s.dir, Some(&s.admin_url)).unwrap();
    let mut out = Vec::new();
    let mut since = Some(0);
    loop {
        let page: MessagePage = client.list(device, since, 1000).unwrap();
        if page.messages.is_empty() {
            return out;
        }
        since = page.next_since;
        out.extend(page.messages);
    }
}

/// The metrics text.
pub fn metrics(s: &Server) -> String {
    devid_admin_client::MessagesClient::from_data_dir(&s.dir, Some(&s.admin_url))
        .unwrap()
        .metrics()
        .unwrap()
}

/// The value of a metric line that starts with `prefix` (name and labels), if present.
pub fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Audit rows with `action` and `detail` starting with `code`, waiting up to 5 s for them
/// (refusal audit rows are written off the connection's path).
pub fn wait_audit(s: &Server, action: &str, code: &str) -> devid_proto::AuditEntry {
    let start = Instant::now();
    loop {
        if let Some(row) = s
            .audit()
            .into_iter()
            .find(|a| a.action == action && a.detail.starts_with(code))
        {
            return row;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no audit row {action} {code}: {:#?}",
            s.audit()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Run a third-party client; returns (success, stdout+stderr).
pub fn tool(program: &str, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("{program}: {e} (install mosquitto-clients / python3-paho-mqtt: scripts/deps)")
        });
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `mosquitto_pub` with the device identity.
pub fn mosquitto_pub(s: &Server, dev: &Device, version: &str, extra: &[&str]) -> (bool, String) {
    let port = s.mqtt_port.to_string();
    let ca = s.ca_pem_path();
    let mut args = vec![
        "-h",
        "localhost",
        "-p",
        &port,
        "-V",
        version,
        "--cafile",
        ca.to_str().unwrap(),
        "--cert",
        dev.cert_path.to_str().unwrap(),
        "--key",
        dev.key_path.to_str().unwrap(),
        "-i",
        &dev.id,
    ];
    args.extend_from_slice(extra);
    tool("mosquitto_pub", &args)
}

/// What a pipelined publisher saw.
#[derive(Debug, Default)]
pub struct Run {
    pub sent: usize,
    /// msg-ids whose PUBACK (success) arrived.
    pub acked: Vec<String>,
    pub elapsed: Duration,
    pub ack_latencies: Vec<Duration>,
    /// PUBACKs with a failure reason code.
    pub refused: usize,
}

/// Publish `total` QoS 1 messages (64-byte payloads, msg-id `<prefix>-<n>`) with `window` in
/// flight, until done or the connection breaks. `progress` counts acks as they arrive.
#[allow(clippy::too_many_arguments)]
pub async fn pipelined(
    port: u16,
    ca: std::path::PathBuf,
    dev: Device,
    total: usize,
    progress: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    prefix: &str,
    window_size: usize,
) -> Run {
    let prefix = prefix.to_owned();
    let Ok(stream) = tls_connect(port, tls_config(&ca, Some(&dev))).await else {
        return Run::default();
    };
    let mut c = Client::new(stream, Protocol::V5);
    if c.send(connect_packet(Protocol::V5, &dev.id, 60))
        .await
        .is_err()
    {
        return Run::default();
    }
    match c.recv(Duration::from_secs(5)).await {
        Ok(Some(Packet::ConnAck { code: 0, .. })) => {}
        _ => return Run::default(),
    }
    let (mut rd, mut wr) = tokio::io::split(c.stream);
    let window = Arc::new(Semaphore::new(window_size));
    // packet id -> (msg-id, sent at)
    let pending: Arc<Mutex<HashMap<u16, (String, Instant)>>> = Arc::default();
    let topic = dev.topic("telemetry/load");
    let payload = [b'x'; 64];
    let start = Instant::now();
    let writer = {
        let window = window.clone();
        let pending = pending.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut codec = Codec::client(Protocol::V5, 1 << 20);
            let mut out = BytesMut::with_capacity(64 * 1024);
            let mut sent = 0usize;
            let mut pid: u16 = 0;
            while sent < total && !stop.load(Ordering::Relaxed) {
                let Ok(permit) = window.acquire().await else {
                    break;
                };
                permit.forget();
                pid = pid.wrapping_add(1).max(1);
                let msg_id = format!("{prefix}-{sent}");
                pending
                    .lock()
                    .unwrap()
                    .insert(pid, (msg_id.clone(), Instant::now()));
                codec
                    .encode(publish(&topic, 1, pid, &payload, Some(&msg_id)), &mut out)
                    .unwrap();
                sent += 1;
                // batch writes while permits are there (pipelining)
                if window.available_permits() == 0 || sent == total {
                    if wr.write_all(&out).await.is_err() {
                        break;
                    }
                    out.clear();
                }
            }
            if !out.is_empty() {
                let _ = wr.write_all(&out).await;
            }
            let _ = wr.flush().await;
            (sent, wr)
        })
    };
    let mut run = Run::default();
    let mut codec = Codec::client(Protocol::V5, 1 << 20);
    let mut buf = BytesMut::with_capacity(64 * 1024);
    'read: while run.acked.len() < total {
        match tokio::time::timeout(Duration::from_secs(10), rd.read_buf(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(_)) => {}
        }
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(Packet::PubAck { packet_id, reason })) => {
                    let Some((msg_id, at)) = pending.lock().unwrap().remove(&packet_id.get())
                    else {
                        panic!("ack for a packet id not in flight");
                    };
                    if reason != 0 {
                        // a refusal: not an acknowledgement of storage
                        window.add_permits(1);
                        run.refused += 1;
                        continue;
                    }
                    run.ack_latencies.push(at.elapsed());
                    run.acked.push(msg_id);
                    progress.fetch_add(1, Ordering::Relaxed);
                    window.add_permits(1);
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => break 'read,
            }
        }
        // told to stop and nothing in flight any more: done
        if stop.load(Ordering::Relaxed) && pending.lock().unwrap().is_empty() {
            break;
        }
    }
    run.elapsed = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    window.close();
    if let Ok(Ok((sent, _wr))) = tokio::time::timeout(Duration::from_secs(5), writer).await {
        run.sent = sent;
    }
    run
}
