//! The HTTPS listener: rustls with the server certificate from the data dir, client
//! certificates OPTIONAL (verified against the fleet CA when presented, so enrolment works
//! without one and renewal gets one), handshake and header timeouts, a connection cap, and the
//! peer's address and certificate chain handed to the router as [`PeerInfo`].

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::api::{app, AppState, PeerInfo};
use crate::ca::{Ca, CaError};
use crate::config::{ServerConfig, SERVER_CERT_FILE, SERVER_KEY_FILE};
use crate::fsutil;
use crate::store::{self, StoreError};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors starting or running the server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// A file of the data dir could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The TLS files are unusable.
    #[error("TLS setup: {0}")]
    Tls(String),
    /// The CA could not be loaded.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// The database could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}; is another server running there?")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &std::path::Path, source: std::io::Error) -> ServeError {
    ServeError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The rustls provider the server and its clients use.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::cipher_suite as cs;
    // AES-128-GCM with SHA-256 first: TLS 1.3's mandatory suite, 128-bit security like the
    // P-256 keys it protects, and cheaper than AES-256/SHA-384 on both ends (SHA-256 has
    // hardware support on current x86 and ARMv8 CPUs, SHA-384 mostly not; fewer AES rounds).
    // The handshake's key schedule and every record cost less; a client that prefers another
    // suite of the list still gets it only if it offers nothing else.
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

/// The server's certificate chain and key from the data dir (`server.pem`, `server-key.pem`),
/// for both listeners.
pub(crate) fn server_identity(
    cfg: &ServerConfig,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), ServeError> {
    let cert_path = cfg.path(SERVER_CERT_FILE);
    let key_path = cfg.path(SERVER_KEY_FILE);
    let chain_pem = std::fs::read(&cert_path).map_err(|e| io(&cert_path, e))?;
    let chain = CertificateDer::pem_slice_iter(&chain_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ServeError::Tls(format!("{}: {e}", cert_path.display())))?;
    if chain.is_empty() {
        return Err(ServeError::Tls(format!(
            "{} holds no certificate",
            cert_path.display()
        )));
    }
    let key_pem =
        zeroize::Zeroizing::new(fsutil::read_private(&key_path).map_err(|e| io(&key_path, e))?);
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| ServeError::Tls(format!("{}: {e}", key_path.display())))?;
    Ok((chain, key))
}

/// Trust anchors for client certificates: the fleet CA alone.
pub(crate) fn fleet_roots(ca: &Ca) -> Result<Arc<RootCertStore>, ServeError> {
    let mut roots = RootCertStore::empty();
    roots
        .add(ca.cert_der().clone())
        .map_err(|e| ServeError::Tls(format!("CA certificate: {e}")))?;
    Ok(Arc::new(roots))
}

/// Build the TLS server config from the data dir's `server.pem` / `server-key.pem`, trusting
/// client certificates issued by `ca`.
pub fn tls_config(cfg: &ServerConfig, ca: &Ca) -> Result<Arc<rustls::ServerConfig>, ServeError> {
    let (chain, key) = server_identity(cfg)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(fleet_roots(ca)?, provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| ServeError::Tls(format!("client verifier: {e}")))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ServeError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| ServeError::Tls(format!("server certificate and key: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Load everything `run` needs from a config: CA, store, TLS config, router state.
pub fn prepare(cfg: ServerConfig) -> Result<(AppState, Arc<rustls::ServerConfig>), ServeError> {
    let ca = Ca::open(&cfg)?;
    let tls = tls_config(&cfg, &ca)?;
    let store = store::open(&cfg)?;
    let telemetry = crate::ingest::Telemetry::open(&cfg)?;
    Ok((
        AppState {
            store,
            ca: Arc::new(ca),
            config: Arc::new(cfg),
            telemetry,
        },
        tls,
    ))
}

/// Bind the configured HTTPS address.
pub async fn bind(cfg: &ServerConfig) -> Result<TcpListener, ServeError> {
    TcpListener::bind(cfg.https_listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: cfg.https_listen,
            source,
        })
}

/// Serve HTTPS on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    state: AppState,
    shutdown: impl Future<Output = ()>,
) {
    let max = state.config.max_connections.max(1);
    let router = app(state);
    let acceptor = TlsAcceptor::from(tls);
    let slots = Arc::new(Semaphore::new(max));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (tcp, addr) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let router = router.clone();
        tokio::spawn(async move {
            let _permit = permit;
            handle(tcp, addr, acceptor, router).await;
        });
    }
    tracing::info!("HTTPS listener stopped");
}

async fn handle(
    tcp: tokio::net::TcpStream,
    addr: SocketAddr,
    acceptor: TlsAcceptor,
    router: Router,
) {
    let _ = tcp.set_nodelay(true);
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%addr, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%addr, "TLS handshake timed out");
            return;
        }
    };
    let peer = PeerInfo {
        addr: Some(addr),
        client_chain: tls
            .get_ref()
            .1
            .peer_certificates()
            .map(|c| Arc::new(c.iter().map(|d| d.clone().into_owned()).collect())),
    };
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let mut req = req.map(axum::body::Body::new);
        req.extensions_mut().insert(peer.clone());
        let router = router.clone();
        async move { Ok::<_, Infallible>(router.oneshot(req).await.into_response_infallible()) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    if let Err(e) = builder.serve_connection(TokioIo::new(tls), service).await {
        tracing::debug!(%addr, error = %e, "connection ended with an error");
    }
}

trait IntoResponseInfallible {
    fn into_response_infallible(self) -> axum::response::Response;
}

impl IntoResponseInfallible for Result<axum::response::Response, Infallible> {
    fn into_response_infallible(self) -> axum::response::Response {
        match self {
            Ok(r) => r,
            Err(never) => match never {},
        }
    }
}

/// `devid-server run`: load the data dir, listen, serve until Ctrl-C or SIGTERM.
pub async fn run(cfg: ServerConfig) -> Result<(), ServeError> {
    let (state, tls) = prepare(cfg)?;
    // MQTT first: once the HTTPS port answers, both listeners are up.
    let mqtt_tls = crate::ingest::tls::server_config(&state.config, &state.ca)?;
    let mqtt = crate::ingest::bind(&state.config).await?;
    let listener = bind(&state.config).await?;
    let addr = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: state.config.https_listen,
        source,
    })?;
    if let Ok(mqtt_addr) = mqtt.local_addr() {
        tracing::info!(addr = %mqtt_addr, "devid-server listening (MQTT over mutual TLS)");
    }
    tracing::info!(%addr, ca_pin = %state.ca.pin(), "devid-server listening (HTTPS)");
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let ingest = tokio::spawn(crate::ingest::serve(
        mqtt,
        mqtt_tls,
        state.clone(),
        async move {
            let _ = stopped.changed().await;
        },
    ));
    serve(listener, tls, state, shutdown_signal()).await;
    let _ = stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(2), ingest).await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
}
