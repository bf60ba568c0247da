//! Behind a load balancer (issue 13): both public listeners read a PROXY protocol v2 header
//! from the configured proxy addresses only, so rate limits and the audit see the device's
//! address; a trusted peer without a header is dropped; a header from anyone else is never
//! parsed; enrolment hands devices the advertised MQTT URL. Real binary, 127.0.0.x only: the
//! "load balancer" is 127.0.0.3, devices behind it claim 127.0.0.77 and .99, 127.0.0.2 is an
//! untrusted client, 127.0.0.1 the test's own direct clients.
#![allow(clippy::unwrap_used)]

mod common;
mod ingest_support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::Server;
use devid_mqtt::Protocol;
use ingest_support::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

fn client_tls(ca: &std::path::Path) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

async fn tcp_from(local: &str, port: u16) -> TcpStream {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(format!("{local}:0").parse().unwrap()).unwrap();
    sock.connect(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .unwrap()
}

/// `POST /v1/enroll` with a junk body over `tcp` (after an optional PROXY header); the HTTP
/// status, or None when the connection failed.
async fn junk_enrol(
    mut tcp: TcpStream,
    header: Option<Vec<u8>>,
    ca: &std::path::Path,
) -> Option<u16> {
    if let Some(h) = header {
        tcp.write_all(&h).await.ok()?;
    }
    let mut tls = tokio_rustls::TlsConnector::from(client_tls(ca))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .ok()?;
    let body =
        r#"{"token":"0000000000000000000000000000000000000000000000000000000000000000","csr":"x"}"#;
    let req = format!(
        "POST /v1/enroll HTTP/1.1\r\nHost: localhost\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(req.as_bytes()).await.ok()?;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    text.split_whitespace().nth(1)?.parse().ok()
}

fn sources(s: &Server) -> Vec<String> {
    s.audit()
        .into_iter()
        .filter(|a| a.action == "enroll")
        .map(|a| a.source)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxied_addresses_are_seen_only_from_trusted_proxies() {
    let s = Server::start_with_config(
        &[],
        &format!(
            "{FAST}\nmqtt_advertised_url = \"mqtts://iot.example.com:8883\"\n\
             proxy_protocol.trusted = [\"127.0.0.3/32\"]\n"
        ),
    );
    let ca = s.ca_pem_path();
    let server: SocketAddr = format!("127.0.0.1:{}", s.port).parse().unwrap();
    // through the trusted proxy: the audit names the device's address
    let device: SocketAddr = "127.0.0.77:40001".parse().unwrap();
    let header = devid_stdx::proxy::encode(device, server);
    let status = junk_enrol(tcp_from("127.0.0.3", s.port).await, Some(header), &ca).await;
    assert_eq!(status, Some(400));
    // the trusted proxy without a header: dropped, nothing audited
    assert_eq!(
        junk_enrol(tcp_from("127.0.0.3", s.port).await, None, &ca).await,
        None
    );
    // another address claiming to be someone else: the header is not parsed (the handshake
    // fails on it), and its plain request is audited under its own address
    let forged = devid_stdx::proxy::encode("127.0.0.88:1".parse().unwrap(), server);
    assert_eq!(
        junk_enrol(tcp_from("127.0.0.2", s.port).await, Some(forged), &ca).await,
        None
    );
    assert_eq!(
        junk_enrol(tcp_from("127.0.0.2", s.port).await, None, &ca).await,
        Some(400)
    );
    let seen = sources(&s);
    assert!(seen.iter().any(|a| a == "127.0.0.77:40001"), "{seen:?}");
    assert!(seen.iter().any(|a| a.starts_with("127.0.0.2:")), "{seen:?}");
    assert!(
        !seen.iter().any(|a| a.starts_with("127.0.0.88")),
        "{seen:?}"
    );
    assert!(
        !seen.iter().any(|a| a.starts_with("127.0.0.1:")),
        "{seen:?}"
    );

    // enrolment hands devices the advertised MQTT URL
    let token = s.token(&["--device-id", "lb-1", "--ttl", "10m"]);
    let dir = s.tmp.path().join("lb-1");
    std::fs::create_dir_all(&dir).unwrap();
    let ks: Arc<dyn devid_keystore::Keystore> =
        Arc::new(devid_keystore::soft::SoftKeystore::create(&dir).unwrap());
    let csr = devid_enroll::build_csr_with_keystore(&*ks, Some("lb-1")).unwrap();
    let (url, pin) = (s.url.clone(), s.pin.clone());
    let resp = tokio::task::spawn_blocking(move || {
        devid_enroll::enroll(&url, &token, &pin, &csr, Some("lb-1"))
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(resp.mqtt_url, "mqtts://iot.example.com:8883");

    // MQTT: through the proxy with a header works; the trusted proxy without one is dropped
    let dev = enrol(&s, "lb-2", "default");
    let mqtt: SocketAddr = format!("127.0.0.1:{}", s.mqtt_port).parse().unwrap();
    let mut tcp = tcp_from("127.0.0.3", s.mqtt_port).await;
    tcp.write_all(&devid_stdx::proxy::encode(
        "127.0.0.99:5000".parse().unwrap(),
        mqtt,
    ))
    .await
    .unwrap();
    let tls = tokio_rustls::TlsConnector::from(tls_config(&ca, Some(&dev)))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let mut c = Client::new(tls, Protocol::V5);
    c.send(connect_packet(Protocol::V5, &dev.id, 30))
        .await
        .unwrap();
    match c.recv(Duration::from_secs(5)).await {
        Ok(Some(devid_mqtt::Packet::ConnAck { code, .. })) => assert_eq!(code, 0),
        other => panic!("expected CONNACK through the proxy, got {other:?}"),
    }
    let bare = tcp_from("127.0.0.3", s.mqtt_port).await;
    let handshake = tokio_rustls::TlsConnector::from(tls_config(&ca, Some(&dev)))
        .connect(ServerName::try_from("localhost").unwrap(), bare)
        .await;
    if let Ok(tls) = handshake {
        // TLS 1.3 may complete on the client side before the server reacts; it must close
        let mut c = Client::new(tls, Protocol::V5);
        let _ = c.send(connect_packet(Protocol::V5, &dev.id, 30)).await;
        assert!(
            !matches!(
                c.recv(Duration::from_secs(5)).await,
                Ok(Some(devid_mqtt::Packet::ConnAck { code: 0, .. }))
            ),
            "a trusted proxy's connection without a PROXY header was served"
        );
    }
}
