//! `devid-server run`: put the process together and serve until Ctrl-C or SIGTERM.
//!
//! [`prepare`] loads the CA, opens the backends ([`crate::backend`]), starts the ingest and
//! builds the HTTPS state; [`run`] binds both listeners and serves. The two listeners never
//! see each other: the HTTPS side reaches live MQTT sessions through the ingest's
//! `StateChangeSink`, and reads the messages the ingest stores through the shared message
//! store and the live-message channel created here.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use devid_ca::{Ca, CaError};

use crate::error::RunError;
use devid_ingest::Ingest;
use devid_server_config::{ServerConfig, CA_CERT_FILE};
use devid_server_http::{HttpState, Surface};
use tokio::net::TcpListener;
use tokio::sync::broadcast;

/// Capacity of the live stream's broadcast channel (a slower SSE reader skips messages and
/// is told how many).
const STREAM_CAPACITY: usize = 4_096;

/// Everything a running server holds.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The HTTPS API's state.
    pub http: HttpState,
    /// The MQTT ingest.
    pub ingest: Arc<Ingest>,
    /// HTTPS TLS config.
    pub https_tls: Arc<rustls::ServerConfig>,
    /// MQTT TLS config.
    pub mqtt_tls: Arc<rustls::ServerConfig>,
    /// Whether the MQTT listener is serving (for `GET /readyz`).
    pub mqtt_up: Arc<AtomicBool>,
}

/// Load the CA a config names: `ca.pem` of the data dir, the key from its file or PKCS#11
/// token.
pub fn open_ca(cfg: &ServerConfig) -> Result<Ca, RunError> {
    let key = cfg.ca_key_ref().map_err(|e| CaError::Invalid {
        what: "ca_key setting",
        detail: e.to_string(),
    })?;
    Ok(Ca::open(&cfg.path(CA_CERT_FILE), &key)?)
}

/// Load everything `run` needs from a config: CA, stores, ingest, TLS configs, HTTPS state.
pub fn prepare(cfg: ServerConfig) -> Result<Prepared, RunError> {
    let ca = Arc::new(open_ca(&cfg)?);
    let https_tls = crate::tls::https_config(&cfg, &ca)?;
    let mqtt_tls = crate::tls::mqtt_config(&cfg, &ca)?;
    let backend = crate::backend::open(&cfg)?;
    let (stream, _) = broadcast::channel(STREAM_CAPACITY);
    let quota_window = cfg.retention.max_age().ok().flatten();
    let limits = devid_ingest::storage::StorageLimits {
        data_dir: Some(backend.log_dir.clone()),
        min_free_bytes: cfg.storage.min_free_bytes,
        quota: quota_window.map(|w| (w, cfg.retention.device_quota_bytes)),
    };
    let ingest = Ingest::start_with(
        cfg.mqtt.clone(),
        limits,
        backend.registry.clone(),
        backend.messages.clone(),
        stream.clone(),
    )?;
    let metrics = ingest.metrics.clone();
    let http_metrics = Arc::new(devid_server_http::HttpMetrics::default());
    let mqtt_up = Arc::new(AtomicBool::new(false));
    let cfg_https = cfg.https.clone();
    let attest = devid_server_http::AttestPolicy::from_config(&cfg)
        .map_err(|e| RunError::Attestation(e.to_string()))?;
    tracing::info!(
        mode = attest.mode.as_str(),
        ek_roots = attest.roots.len(),
        "TPM key attestation"
    );
    let http = HttpState {
        registry: backend.registry,
        ca,
        config: Arc::new(cfg),
        live: ingest.clone(),
        presence: ingest.clone(),
        console: Arc::new(devid_server_http::ConsoleSessions::default()),
        messages: backend.messages,
        stream,
        metrics: {
            let http_metrics = http_metrics.clone();
            Arc::new(move || {
                // one exposition: the ingest's families, then the HTTPS API's
                let text = metrics.encode();
                match text.strip_suffix("# EOF\n") {
                    Some(body) => format!("{body}{}# EOF\n", http_metrics.encode()),
                    None => format!("{text}{}", http_metrics.encode()),
                }
            })
        },
        http_metrics,
        limits: Arc::new(devid_server_http::HttpLimits::new(&cfg_https)),
        attest: Arc::new(attest),
        readiness: {
            let up = mqtt_up.clone();
            Arc::new(move || {
                if up.load(Ordering::Acquire) {
                    Ok(())
                } else {
                    Err("mqtt_listener".to_owned())
                }
            })
        },
    };
    Ok(Prepared {
        http,
        ingest,
        https_tls,
        mqtt_tls,
        mqtt_up,
    })
}

/// Bind `addr`.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, RunError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| RunError::Bind { addr, source })
}

/// `devid-server run`: load the data dir, listen, serve until Ctrl-C or SIGTERM.
pub async fn run(cfg: ServerConfig) -> Result<(), RunError> {
    serve_until(cfg, shutdown_signal()).await
}

/// [`run`], stopping when `shutdown` completes.
pub async fn serve_until(
    cfg: ServerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let p = prepare(cfg)?;
    let config = p.http.config.clone();
    // MQTT first: once the HTTPS port answers, both listeners are up.
    let mqtt = bind(config.mqtt_listen).await?;
    let admin = bind(config.admin_listen).await?;
    let listener = bind(config.https_listen).await?;
    let addr = listener.local_addr().map_err(|source| RunError::Bind {
        addr: config.https_listen,
        source,
    })?;
    if let Ok(mqtt_addr) = mqtt.local_addr() {
        tracing::info!(addr = %mqtt_addr, "devid-server listening (MQTT over mutual TLS)");
    }
    if let Ok(admin_addr) = admin.local_addr() {
        tracing::info!(addr = %admin_addr, "devid-server listening (admin API, HTTPS)");
    }
    tracing::info!(%addr, ca_pin = %p.http.ca.pin(), "devid-server listening (HTTPS)");
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    // A fatal storage error (failed fdatasync) stops the server like a signal, then makes
    // `run` fail: nothing is acknowledged after it, and the exit status says so.
    let fatal_rx = p.ingest.commits.fatal();
    let fatal = Arc::new(std::sync::Mutex::new(None::<String>));
    let shutdown = {
        let fatal = fatal.clone();
        async move {
            tokio::select! {
                _ = shutdown => {},
                why = fatal_storage(fatal_rx) => {
                    tracing::error!(error = %why, "fatal storage error: shutting down; exiting non-zero");
                    *devid_stdx::lock(&fatal) = Some(why);
                },
            }
        }
    };
    let up = p.mqtt_up.clone();
    up.store(true, Ordering::Release);
    let proxies = devid_stdx::proxy::Trusted::parse(&config.proxy_protocol.trusted)
        .map_err(|e| RunError::Tls(format!("proxy_protocol.trusted: {e}")))?;
    let ingest = tokio::spawn(async move {
        devid_ingest::serve(mqtt, p.mqtt_tls, p.ingest, proxies, async move {
            let _ = stopped.changed().await;
        })
        .await;
        up.store(false, Ordering::Release);
    });
    let admin_task = {
        let (tls, http, mut stopped) = (p.https_tls.clone(), p.http.clone(), stop.subscribe());
        tokio::spawn(devid_server_http::listener::serve(
            admin,
            tls,
            http,
            Surface::Admin,
            async move {
                let _ = stopped.changed().await;
            },
        ))
    };
    devid_server_http::listener::serve(listener, p.https_tls, p.http, Surface::Public, shutdown)
        .await;
    let _ = stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(2), admin_task).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), ingest).await;
    let why = devid_stdx::lock(&fatal).take();
    match why {
        Some(why) => Err(RunError::Fatal(why)),
        None => Ok(()),
    }
}

/// Completes with the reason once the message writer stopped for a fatal storage error; never
/// when it stops normally.
async fn fatal_storage(mut rx: tokio::sync::watch::Receiver<Option<String>>) -> String {
    loop {
        if let Some(why) = rx.borrow_and_update().clone() {
            return why;
        }
        if rx.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
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
