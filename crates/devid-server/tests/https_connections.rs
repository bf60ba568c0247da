//! Review finding M2 (connection exhaustion): idle HTTP/2 connections must not hold the
//! HTTPS listener's connection cap. The test opens as many idle HTTP/2 connections as the cap
//! allows (TLS with ALPN h2, the client preface and SETTINGS, then silence), and a new client
//! must still be served within the idle timeout: the idle ones are closed and give their slots
//! back. Through the real binary, on 127.0.0.1.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{tool, Server};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const CAP: usize = 8;

async fn idle_h2_connection(
    port: u16,
    cfg: Arc<rustls::ClientConfig>,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    // client preface, an empty SETTINGS frame and the ACK of the server's SETTINGS
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    tls.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
    tls.write_all(&[0, 0, 0, 4, 1, 0, 0, 0, 0]).await.unwrap();
    tls.flush().await.unwrap();
    tls
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http2_connections_cannot_hold_the_connection_cap() {
    let s = Server::start_with_config(
        &[],
        &format!("max_connections = {CAP}\nhttps.idle_timeout_secs = 2\n"),
    );
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(s.ca_pem_path()).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let cfg = Arc::new(cfg);
    let mut idle = Vec::new();
    for _ in 0..CAP {
        idle.push(idle_h2_connection(s.port, cfg.clone()).await);
    }
    // every slot is taken by an idle connection; a new client must still get an answer
    // within the idle timeout (plus a margin), not wait forever
    let start = Instant::now();
    let ca = s.ca_pem_path();
    let url = format!("{}/v1/health", s.url);
    let out = tokio::task::spawn_blocking(move || {
        tool(
            "curl",
            &[
                "-sS",
                "--http2",
                "--max-time",
                "15",
                "--cacert",
                ca.to_str().unwrap(),
                &url,
            ],
            std::path::Path::new("/"),
        )
    })
    .await
    .unwrap();
    let took = start.elapsed();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("ok"),
        "a new client was not served while idle HTTP/2 connections held the cap: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        took < Duration::from_secs(8),
        "served only after {took:?} (idle timeout 2 s)"
    );
    drop(idle);
}
