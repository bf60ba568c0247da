//! The MQTT ingest at its own crate boundary: a real TLS listener on 127.0.0.1 and real
//! sessions, in-process (no binary, no HTTPS side), over a real SQLite registry and message
//! store in a temp dir and a real CA. Each test checks what the client sees AND what the
//! stores hold afterwards.
#![allow(clippy::unwrap_used, missing_docs)]

use std::num::NonZeroU16;
use std::sync::Arc;
use std::time::Duration;

use devid_ca::Ca;
use devid_ingest::Ingest;
use devid_mqtt::{Bytes, BytesMut, Codec, Connect, Packet, Protocol, Publish};
use devid_proto::{DeviceId, DeviceState};
use devid_server_config::MqttSettings;
use devid_stdx::now_ms;
use devid_store::{
    token, AuditCtx, AuditLog, EnrollAttempt, MessageStore, NewToken, Registry, StateChangeSink,
};
use devid_store_sqlite::{SqliteMessageStore, SqliteStore};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

struct Node {
    _dir: tempfile::TempDir,
    ca: Arc<Ca>,
    registry: Arc<SqliteStore>,
    messages: Arc<SqliteMessageStore>,
    ingest: Arc<Ingest>,
    port: u16,
    _stop: tokio::sync::oneshot::Sender<()>,
}

struct Device {
    id: DeviceId,
    chain: Vec<CertificateDer<'static>>,
    key_der: Vec<u8>,
}

fn ctx() -> AuditCtx {
    AuditCtx {
        actor: "test".into(),
        source: "127.0.0.1:1".into(),
        now_ms: now_ms(),
    }
}

impl Node {
    async fn start() -> Node {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("devid-server.db");
        let registry = Arc::new(SqliteStore::open(&db).unwrap());
        let messages = Arc::new(SqliteMessageStore::open(&db).unwrap());
        let ca = Arc::new(Ca::generate("localhost", now_ms()).unwrap());
        let (chain_pem, key_pem) = ca
            .issue_server(
                &["localhost".into()],
                &[],
                Duration::from_secs(3600),
                now_ms(),
            )
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .unwrap();
        let tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                CertificateDer::pem_slice_iter(chain_pem.as_bytes())
                    .map(|c| c.unwrap())
                    .collect(),
                PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap(),
            )
            .unwrap();
        let settings = MqttSettings::default();
        let (stream, _) = tokio::sync::broadcast::channel(64);
        let ingest = Ingest::start(settings, registry.clone(), messages.clone(), stream).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(devid_ingest::serve(
            listener,
            Arc::new(tls),
            ingest.clone(),
            devid_stdx::proxy::Trusted::default(),
            async move {
                let _ = stopped.await;
            },
        ));
        Node {
            _dir: dir,
            ca,
            registry,
            messages,
            ingest,
            port,
            _stop: stop,
        }
    }

    /// Enrol `id` in the registry (token, then enrolment with a fresh key): what the HTTPS
    /// side would do.
    fn enrol(&self, id: &str) -> Device {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
        let t = token::generate();
        let device = DeviceId::parse(id).unwrap();
        self.registry
            .create_token(
                &NewToken {
                    hash: token::hash(&t),
                    device_id: Some(device.clone()),
                    policy: "default".into(),
                    expires_at_ms: now_ms() + 60_000,
                    attestation_required: false,
                    ek_fingerprint: None,
                },
                &ctx(),
            )
            .unwrap();
        let c = ctx();
        let hash = token::hash(&t);
        let fp = hex_sha256(&spki);
        let attempt = EnrollAttempt {
            token_hash: &hash,
            requested_id: Some(&device),
            key_fingerprint: &fp,
            attestation: None,
            ctx: &c,
            reported_backend: None,
        };
        let ca = self.ca.clone();
        let mut issue = |d: &DeviceId| {
            ca.issue_device(d, &spki, Duration::from_secs(3600), now_ms())
                .map_err(Into::into)
        };
        let (_, cert) = self.registry.enroll(&attempt, &mut issue).unwrap().unwrap();
        let mut chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(cert.cert_pem.as_bytes())
                .map(|c| c.unwrap())
                .collect();
        chain.push(self.ca.cert_der().clone());
        Device {
            id: device,
            chain,
            key_der: key.serialize_der(),
        }
    }

    async fn connect(&self, dev: &Device) -> (Client, u8) {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.cert_der().clone()).unwrap();
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            dev.chain.clone(),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(dev.key_der.clone())),
        )
        .unwrap();
        let tcp = TcpStream::connect(("127.0.0.1", self.port)).await.unwrap();
        let stream = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        let mut c = Client {
            stream,
            codec: Codec::client(Protocol::V5, 1 << 20),
            buf: BytesMut::new(),
        };
        c.send(Packet::Connect(Box::new(Connect {
            protocol: Protocol::V5,
            client_id: dev.id.as_str().into(),
            keep_alive: 30,
            clean_start: true,
            will: None,
            has_username: false,
            has_password: false,
            session_expiry_secs: 0,
            receive_max: None,
            max_packet_size: None,
            auth_method: None,
        })))
        .await;
        match c.recv().await {
            Some(Packet::ConnAck { code, .. }) => (c, code),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }
}

fn hex_sha256(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

struct Client {
    stream: tokio_rustls::client::TlsStream<TcpStream>,
    codec: Codec,
    buf: BytesMut,
}

impl Client {
    async fn send(&mut self, p: Packet) {
        let mut out = BytesMut::new();
        self.codec.encode(p, &mut out).unwrap();
        self.stream.write_all(&out).await.unwrap();
        self.stream.flush().await.unwrap();
    }

    /// The next packet, None when the server closed the connection.
    async fn recv(&mut self) -> Option<Packet> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(p) = self.codec.decode(&mut self.buf).unwrap() {
                return Some(p);
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Err(_) => panic!("timed out waiting for a packet"),
                Ok(Ok(0)) | Ok(Err(_)) => return None,
                Ok(Ok(_)) => {}
            }
        }
    }

    async fn publish_qos1(&mut self, topic: &str, pid: u16, payload: &[u8]) -> Option<u8> {
        self.send(Packet::Publish(Publish {
            topic: topic.into(),
            qos: 1,
            packet_id: NonZeroU16::new(pid),
            payload: Bytes::copy_from_slice(payload),
            retain: false,
            dup: false,
            msg_id: Some(format!("m{pid}").into()),
            topic_alias: None,
        }))
        .await;
        loop {
            match self.recv().await? {
                Packet::PubAck { packet_id, reason } => {
                    assert_eq!(packet_id.get(), pid);
                    return Some(reason);
                }
                Packet::Disconnect { .. } => return None,
                _ => {}
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_publish_is_stored_once_and_a_foreign_topic_is_refused() {
    let node = Node::start().await;
    let dev = node.enrol("pump-1");
    let (mut c, code) = node.connect(&dev).await;
    assert_eq!(code, 0);
    assert_eq!(
        c.publish_qos1("devices/pump-1/telemetry/t", 1, b"{\"t\":21.5}")
            .await,
        Some(0)
    );
    // a redelivery with the same msg-id: acknowledged, not stored again
    assert_eq!(
        c.publish_qos1("devices/pump-1/telemetry/t", 1, b"{\"t\":21.5}")
            .await,
        Some(0)
    );
    // another device's topic: refused with 0x87, nothing stored
    assert_eq!(
        c.publish_qos1("devices/pump-2/telemetry/t", 2, b"x").await,
        Some(0x87)
    );
    let stored = {
        let m = node.messages.clone();
        let id = dev.id.clone();
        tokio::task::spawn_blocking(move || m.list(&id, None, 100))
            .await
            .unwrap()
            .unwrap()
    };
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(stored[0].payload, b"{\"t\":21.5}");
    let other = DeviceId::parse("pump-2").unwrap();
    let m = node.messages.clone();
    let none = tokio::task::spawn_blocking(move || m.list(&other, None, 100))
        .await
        .unwrap()
        .unwrap();
    assert!(none.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_change_reported_by_the_root_cuts_the_live_session_and_refuses_a_reconnect() {
    let node = Node::start().await;
    let dev = node.enrol("pump-3");
    let (mut c, code) = node.connect(&dev).await;
    assert_eq!(code, 0);
    let reg = node.registry.clone();
    let id = dev.id.clone();
    tokio::task::spawn_blocking(move || reg.set_state(&id, DeviceState::Revoked, &ctx()))
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    // what the composition root does after the HTTPS API committed the change
    node.ingest.state_changed(&dev.id, DeviceState::Revoked);
    let mut reason = None;
    while let Some(p) = c.recv().await {
        if let Packet::Disconnect { reason: r } = p {
            reason = Some(r);
        }
    }
    assert_eq!(reason, Some(0x98), "administrative action");
    let (_c, code) = node.connect(&dev).await;
    assert_eq!(
        code, 0x86,
        "a revoked device's CONNECT gets bad credentials"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_superseded_certificate_is_refused_at_connect_and_audited() {
    let node = Node::start().await;
    let old = node.enrol("pump-4");
    // re-enrolment with a new key: the old certificate is dead
    let new = node.enrol("pump-4");
    let (_c, code) = node.connect(&old).await;
    assert_eq!(code, 0x86);
    let (_c, code) = node.connect(&new).await;
    assert_eq!(code, 0);
    // the refusal's audit row is written off the session's task: wait for it
    let mut found = false;
    for _ in 0..50 {
        let reg = node.registry.clone();
        let rows = tokio::task::spawn_blocking(move || reg.audit_log(100, Some("pump-4")))
            .await
            .unwrap()
            .unwrap();
        if rows
            .iter()
            .any(|r| r.action == "mqtt.connect" && r.detail.contains("cert_superseded"))
        {
            found = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(found, "no audit row for the superseded certificate");
}
