//! The devid device agent: the long-running process behind `devid agent`.
//!
//! ```text
//! app ──unix socket (local)──► outbox (fsync, group commit) ──► MQTT 5 / mTLS (mqtt) ──► server
//!                                                     ▲ renewal (renew) reseals the bundle
//! ```
//!
//! * [`local`]: the Unix socket applications publish through (newline-delimited JSON, peer
//!   credentials checked). An application is answered only once its message is durably in the
//!   [`outbox`].
//! * [`outbox`]: append-only segment log with a CRC per record, one `fdatasync` per batch
//!   (group commit), bounded in size and age, deleted only after the server's PUBACK.
//! * [`mqtt`]: MQTT 5 over TLS to the endpoint sealed in the bundle, trusting only the pinned
//!   CA; the client key signs inside the TPM / token through
//!   [`devid_tls::KeystoreSigningKey`]. Every message carries its idempotency key as the user
//!   property `msg-id`, so a resend after a crash is stored once by the server.
//! * [`backoff`]: reconnects with exponential backoff and full jitter, capped.
//! * [`renew`]: renewal at a fraction of the certificate's lifetime over mutual TLS.
//! * [`status`]: the status file `devid status` reads; [`notify`]: systemd `sd_notify`.
//!
//! # Where blocking keystore calls run
//!
//! The runtime is multi-threaded. The rustls signer is called inside the TLS handshake; the
//! handshake future is driven inside [`tokio::task::block_in_place`], so the worker that waits
//! for the TPM hands its other tasks (local socket, acks) to the other worker first. Renewal
//! (CSR signature, HTTPS with a keystore-signed handshake, bundle write) runs in
//! `spawn_blocking`; outbox writes run on a dedicated thread and outbox reads in
//! `spawn_blocking`.
//!
//! # TLS session resumption
//!
//! One rustls `ClientConfig` (and so one in-memory session cache) is kept for the life of a
//! certificate. When the server issues TLS 1.3 session tickets, a reconnect resumes with a
//! PSK: the server does not request the client certificate again, so no CertificateVerify is
//! sent and the keystore makes no signature. The status counts full and resumed handshakes and
//! keystore signatures. A renewed certificate starts a new config (the next handshake is full,
//! so the server sees the new certificate).
#![forbid(unsafe_code)]

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devid_tls::KeystoreSigningKey;
use devid_vault::Vault;
use tokio::sync::{watch, Notify};

/// The purpose string of the outbox MAC key ([`devid_vault::Vault::derive_key`]).
pub const OUTBOX_MAC_PURPOSE: &str = "agent outbox record mac v1";

pub mod backoff;
pub mod local;
pub mod mqtt;
pub mod notify;
pub mod outbox;
pub mod renew;
pub mod status;
pub mod topic;

use backoff::Backoff;
use mqtt::{Ended, Endpoint, Failure};
use outbox::{Outbox, OutboxConfig};
use renew::CertInfo;
use status::{AgentStatus, ConnState};

/// Agent settings (the `devid agent` flags).
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// State dir (status file; the outbox defaults to `<state dir>/outbox`).
    pub state_dir: PathBuf,
    /// Local socket path.
    pub socket: PathBuf,
    /// Group allowed on the socket (also the socket file's group).
    pub socket_group: Option<u32>,
    /// Mode of the socket file.
    pub socket_mode: u32,
    /// Outbox settings.
    pub outbox: OutboxConfig,
    /// Most unacknowledged messages on the connection (the server's receive maximum caps it).
    pub inflight: u16,
    /// MQTT keep-alive.
    pub keep_alive: Duration,
    /// TCP, TLS and CONNACK timeout.
    pub connect_timeout: Duration,
    /// First reconnect delay ceiling.
    pub backoff_base: Duration,
    /// Largest reconnect delay.
    pub backoff_cap: Duration,
    /// A connection that lasted this long resets the backoff.
    pub stable_after: Duration,
    /// Renew at this fraction of the certificate lifetime (0 < f ≤ 1); `None` disables.
    pub renew_fraction: Option<f64>,
    /// First renewal retry delay ceiling.
    pub renew_retry_base: Duration,
    /// Largest renewal retry delay.
    pub renew_retry_cap: Duration,
    /// How often the status file is rewritten at least.
    pub status_interval: Duration,
    /// Tokio worker threads.
    pub worker_threads: usize,
}

impl AgentConfig {
    /// Defaults for a state dir.
    pub fn new(state_dir: PathBuf) -> Self {
        AgentConfig {
            outbox: OutboxConfig::new(state_dir.join("outbox")),
            state_dir,
            socket: PathBuf::from(local::DEFAULT_SOCKET),
            socket_group: None,
            socket_mode: 0o660,
            inflight: 64,
            keep_alive: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(15),
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(300),
            stable_after: Duration::from_secs(30),
            renew_fraction: Some(2.0 / 3.0),
            renew_retry_base: Duration::from_secs(10),
            renew_retry_cap: Duration::from_secs(3600),
            status_interval: Duration::from_secs(5),
            worker_threads: 2,
        }
    }
}

/// Errors that stop the agent. Messages say what to do and never carry a secret.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The bundle lacks what the agent needs.
    #[error("the sealed bundle has no {0}: enrol the device first (`devid enroll`)")]
    NotEnrolled(&'static str),
    /// A setting is unusable.
    #[error("agent configuration: {0}")]
    Config(String),
    /// The bundle could not be read.
    #[error(transparent)]
    Vault(#[from] devid_vault::VaultError),
    /// TLS setup failed (certificate does not match the key, bad pin).
    #[error(transparent)]
    Tls(#[from] devid_tls::TlsError),
    /// The outbox could not be opened.
    #[error(transparent)]
    Outbox(#[from] outbox::OutboxError),
    /// The local socket could not be created.
    #[error(transparent)]
    Socket(#[from] local::SocketError),
    /// The async runtime could not start.
    #[error("cannot start the agent runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

type TlsPair = (Arc<rustls::ClientConfig>, Arc<AtomicBool>);

/// State shared by the agent's tasks.
pub(crate) struct Ctx {
    pub(crate) cfg: AgentConfig,
    pub(crate) device_id: String,
    pub(crate) endpoint: Endpoint,
    pub(crate) outbox: Arc<Outbox>,
    pub(crate) signer: KeystoreSigningKey,
    pub(crate) reconnect: Notify,
    pub(crate) max_sent: AtomicU64,
    pub(crate) shutdown: watch::Sender<bool>,
    status: Mutex<AgentStatus>,
    status_changed: Notify,
    tls: Mutex<TlsPair>,
    pin: String,
    cert: Mutex<CertInfo>,
    /// The vault, closed: the data key is unsealed again only for a renewal's write.
    vault: devid_vault::VaultOpener,
}

impl Ctx {
    pub(crate) fn update(&self, f: impl FnOnce(&mut AgentStatus)) {
        {
            let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut s);
        }
        self.status_changed.notify_one();
    }

    pub(crate) fn tls_config(&self) -> TlsPair {
        self.tls.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn snapshot(&self) -> AgentStatus {
        let mut s = self
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        s.outbox = self.outbox.stats();
        s.tls.keystore_signatures = self.signer.signatures();
        s.updated_unix = status::unix_now();
        s
    }

    fn set_state(&self, state: ConnState, error: Option<&str>, retry: Option<Duration>) {
        self.update(|s| {
            if s.connection.state != state {
                s.connection.since_unix = status::unix_now();
            }
            s.connection.state = state;
            if let Some(e) = error {
                s.connection.last_error = Some(e.to_string());
            }
            s.connection.retry_in_ms = retry.map(|d| d.as_millis() as u64);
        });
    }
}

fn build_tls(pin: &str, chain: &str, signer: &KeystoreSigningKey) -> Result<TlsPair, AgentError> {
    let resolver = devid_tls::client_cert(chain, signer.clone())?;
    let (config, mismatch) = devid_tls::client_config(pin, Some(resolver))?;
    Ok((Arc::new(config), mismatch))
}

/// Run the agent until `shutdown` completes. Returns the final status.
pub async fn run_async(
    cfg: AgentConfig,
    vault: Arc<Vault>,
    shutdown: impl Future<Output = ()>,
) -> Result<AgentStatus, AgentError> {
    // a key rotation a crash cut between sealing the certificate and switching keys
    if let Err(e) = renew::recover_rotation(&vault) {
        tracing::warn!(error = %e, "could not finish an interrupted key rotation");
    }
    let contents = vault.load()?;
    let device_id = contents
        .device_id
        .clone()
        .ok_or(AgentError::NotEnrolled("device id"))?;
    let mqtt_url = contents
        .mqtt_url
        .clone()
        .ok_or(AgentError::NotEnrolled("MQTT endpoint"))?;
    let pin = contents
        .ca_pin
        .clone()
        .ok_or(AgentError::NotEnrolled("CA pin"))?;
    let chain = contents
        .cert_chain_pem
        .clone()
        .ok_or(AgentError::NotEnrolled("device certificate"))?;
    let can_renew = contents.server_url.is_some();
    drop(contents);
    if !devid_mqtt::topic::valid_device_id(&device_id) {
        return Err(AgentError::Config(
            "the sealed device id is not a valid MQTT client id".into(),
        ));
    }
    let endpoint = mqtt::parse_mqtt_url(&mqtt_url).ok_or_else(|| {
        AgentError::Config(format!(
            "the sealed MQTT endpoint {mqtt_url:?} is not mqtts://HOST[:PORT]"
        ))
    })?;
    let cert = renew::cert_info(&chain)
        .ok_or_else(|| AgentError::Config("the sealed device certificate does not parse".into()))?;
    let signer = KeystoreSigningKey::new(vault.keystore().clone());
    let tls = build_tls(&pin, &chain, &signer)?;
    if let Some(f) = cfg.renew_fraction {
        if !(f > 0.0 && f <= 1.0) {
            return Err(AgentError::Config(
                "the renewal fraction must be in (0, 1]".into(),
            ));
        }
    }

    let outbox = tokio::task::spawn_blocking({
        let mut c = cfg.outbox.clone();
        // Records are authenticated with a key derived from the vault (not the data key
        // itself), held in locked memory for the agent's lifetime: an offline write to the
        // outbox cannot inject or change a reading (review M4).
        c.mac_key = Some(Arc::new(vault.derive_key(OUTBOX_MAC_PURPOSE)));
        move || Outbox::open(c)
    })
    .await
    .map_err(|e| AgentError::Config(format!("outbox open panicked: {e}")))??;
    // Everything the agent needs from the vault has been read: close it, so the data key is
    // not in memory between renewals (THREATS.md T7). A renewal unseals it again.
    let opener = vault.opener();
    drop(vault);
    let listener = local::bind(&cfg.socket, cfg.socket_mode, cfg.socket_group)?;

    let status = AgentStatus {
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        started_unix: status::unix_now(),
        device_id: device_id.clone(),
        socket: cfg.socket.display().to_string(),
        connection: status::Connection {
            endpoint: endpoint.to_string(),
            since_unix: status::unix_now(),
            ..Default::default()
        },
        certificate: status::CertStatus {
            serial: cert.serial.clone(),
            not_after_unix: cert.not_after,
            renew_at_unix: cfg
                .renew_fraction
                .filter(|_| can_renew)
                .map(|f| renew::renew_at(&cert, f, None)),
            ..Default::default()
        },
        ..Default::default()
    };
    let (shutdown_tx, _) = watch::channel(false);
    let ctx = Arc::new(Ctx {
        cfg: cfg.clone(),
        device_id: device_id.clone(),
        endpoint,
        outbox: outbox.clone(),
        signer,
        reconnect: Notify::new(),
        max_sent: AtomicU64::new(0),
        shutdown: shutdown_tx,
        status: Mutex::new(status),
        status_changed: Notify::new(),
        tls: Mutex::new(tls),
        pin,
        cert: Mutex::new(cert),
        vault: opener,
    });

    let api = Arc::new(local::LocalApi {
        outbox: outbox.clone(),
        policy: local::PeerPolicy {
            agent_uid: nix::unistd::getuid().as_raw(),
            group: cfg.socket_group,
        },
        status: Box::new({
            let ctx = Arc::downgrade(&ctx);
            move || {
                ctx.upgrade()
                    .and_then(|c| serde_json::to_value(c.snapshot()).ok())
                    .unwrap_or(serde_json::Value::Null)
            }
        }),
    });
    let api_task = tokio::spawn(api.serve(listener));
    let status_task = tokio::spawn(status_loop(ctx.clone()));
    let supervisor = tokio::spawn(supervise(ctx.clone()));
    let renew_task = match cfg.renew_fraction {
        Some(_) if can_renew => Some(tokio::spawn(renewal_loop(ctx.clone()))),
        Some(_) => {
            tracing::warn!("no server URL in the bundle: certificate renewal is disabled");
            None
        }
        None => None,
    };
    let watchdog = notify::watchdog_interval().map(|every| {
        tokio::spawn(async move {
            loop {
                let _ = notify::notify("WATCHDOG=1");
                tokio::time::sleep(every).await;
            }
        })
    });
    tracing::info!(
        device_id = %device_id,
        endpoint = %ctx.endpoint,
        socket = %cfg.socket.display(),
        "devid agent started"
    );
    match notify::notify("READY=1\nSTATUS=accepting messages; connecting") {
        Ok(true) => tracing::debug!("notified systemd: ready"),
        Ok(false) => {}
        Err(e) => tracing::warn!(error = %e, "cannot notify systemd"),
    }

    shutdown.await;
    tracing::info!("devid agent stopping");
    let _ = notify::notify("STOPPING=1");
    ctx.shutdown.send_replace(true);
    api_task.abort();
    if let Some(t) = renew_task {
        t.abort();
    }
    if let Some(t) = watchdog {
        t.abort();
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), supervisor).await;
    status_task.abort();
    let ob = outbox.clone();
    let _ = tokio::task::spawn_blocking(move || ob.close()).await;
    ctx.set_state(ConnState::Stopped, None, None);
    let final_status = ctx.snapshot();
    if let Err(e) = status::write_status(&cfg.state_dir, &final_status) {
        tracing::warn!(error = %e, "cannot write the status file");
    }
    let _ = std::fs::remove_file(&cfg.socket);
    Ok(final_status)
}

/// Run the agent on its own runtime until SIGTERM or SIGINT.
pub fn run(cfg: AgentConfig, vault: Vault) -> Result<AgentStatus, AgentError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.worker_threads.max(2))
        .max_blocking_threads(8)
        .thread_name("devid-agent")
        .enable_all()
        .build()
        .map_err(AgentError::Runtime)?;
    rt.block_on(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(AgentError::Runtime)?;
        let stop = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        run_async(cfg, Arc::new(vault), stop).await
    })
}

async fn status_loop(ctx: Arc<Ctx>) {
    let min_gap = Duration::from_millis(250);
    let mut committed = ctx.outbox.committed();
    loop {
        let snap = ctx.snapshot();
        let dir = ctx.cfg.state_dir.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(e) = status::write_status(&dir, &snap) {
                tracing::warn!(error = %e, "cannot write the status file");
            }
        })
        .await;
        tokio::time::sleep(min_gap).await;
        tokio::select! {
            _ = ctx.status_changed.notified() => {}
            _ = committed.changed() => {}
            _ = tokio::time::sleep(ctx.cfg.status_interval) => {}
        }
    }
}

async fn supervise(ctx: Arc<Ctx>) {
    let cfg = &ctx.cfg;
    let mut backoff = Backoff::new(cfg.backoff_base, cfg.backoff_cap);
    let mut shutdown = ctx.shutdown.subscribe();
    let mut refused_logged = false;
    loop {
        if *shutdown.borrow() {
            return;
        }
        ctx.set_state(ConnState::Connecting, None, None);
        ctx.update(|s| s.connection.attempts += 1);
        let failure = match mqtt::connect(&ctx).await {
            Ok(conn) => {
                tracing::info!(endpoint = %ctx.endpoint, "connected");
                refused_logged = false;
                ctx.set_state(ConnState::Connected, None, None);
                ctx.update(|s| s.connection.connects += 1);
                let _ = notify::notify("STATUS=connected");
                let started = Instant::now();
                let end = mqtt::run_session(&ctx, conn).await;
                if started.elapsed() >= cfg.stable_after {
                    backoff.reset();
                }
                match end {
                    Ok(Ended::Shutdown) => return,
                    Ok(Ended::Reconnect) => {
                        backoff.reset();
                        continue;
                    }
                    Err(f) => f,
                }
            }
            Err(f) => f,
        };
        let (state, delay) = match &failure {
            Failure::Refused(why) => {
                if refused_logged {
                    tracing::warn!(reason = %why, "connection refused again");
                } else {
                    tracing::error!(
                        reason = %why,
                        "connection refused; retrying slowly (messages stay in the outbox)"
                    );
                    refused_logged = true;
                }
                ctx.update(|s| s.connection.refusals += 1);
                (ConnState::Refused, backoff.capped_delay())
            }
            Failure::Transient(why) => {
                tracing::warn!(reason = %why, "connection failed or lost");
                (ConnState::Backoff, backoff.next_delay())
            }
        };
        ctx.set_state(state, Some(failure.text()), Some(delay));
        let _ = notify::notify(&format!("STATUS={}", failure.text()));
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => {}
            _ = ctx.reconnect.notified() => { backoff.reset(); }
        }
    }
}

/// The wait a throttling server asked for (`429` with `Retry-After`).
fn retry_after(e: &renew::RenewError) -> Option<Duration> {
    match e {
        renew::RenewError::Enroll(devid_enroll::EnrollError::Server {
            status: 429,
            retry_after_secs: Some(s),
            ..
        }) => Some(Duration::from_secs((*s).min(24 * 3600))),
        _ => None,
    }
}

async fn renewal_loop(ctx: Arc<Ctx>) {
    let Some(fraction) = ctx.cfg.renew_fraction else {
        return;
    };
    let mut backoff = Backoff::new(ctx.cfg.renew_retry_base, ctx.cfg.renew_retry_cap);
    let mut shutdown = ctx.shutdown.subscribe();
    let mut obtained: Option<i64> = None;
    loop {
        let info = ctx.cert.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let at = renew::renew_at(&info, fraction, obtained);
        ctx.update(|s| s.certificate.renew_at_unix = Some(at));
        let wait = Duration::from_secs((at - status::unix_now() as i64).max(0) as u64);
        tracing::info!(serial = %info.serial, renew_in_s = wait.as_secs(), "certificate renewal scheduled");
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
        loop {
            let opener = ctx.vault.clone();
            let id = ctx.device_id.clone();
            // a server that throttles renewals says how long to wait (429, Retry-After)
            let mut server_wait: Option<Duration> = None;
            let result = tokio::task::spawn_blocking(move || {
                // Unsealed for this renewal only; dropped (zeroized) when it returns.
                let vault = opener.open().map_err(renew::RenewError::from)?;
                renew::renew_blocking(&vault, &id)
            })
            .await
            .map_err(|e| format!("renewal task failed: {e}"));
            let outcome = match result {
                Ok(Ok(chain)) => match (
                    renew::cert_info(&chain),
                    build_tls(&ctx.pin, &chain, &ctx.signer),
                ) {
                    (Some(new), Ok(tls)) => Ok((new, tls)),
                    (None, _) => Err("the renewed certificate does not parse".to_string()),
                    (_, Err(e)) => Err(e.to_string()),
                },
                Ok(Err(renew::RenewError::NotConfigured(why))) => {
                    tracing::warn!(%why, "certificate renewal disabled");
                    ctx.update(|s| s.certificate.last_renewal_error = Some(why.clone()));
                    return;
                }
                Ok(Err(e)) => {
                    server_wait = retry_after(&e);
                    Err(e.to_string())
                }
                Err(e) => Err(e),
            };
            match outcome {
                Ok((new, tls)) => {
                    tracing::info!(
                        serial = %new.serial,
                        not_after = new.not_after,
                        "certificate renewed and sealed; reconnecting with it"
                    );
                    *ctx.tls.lock().unwrap_or_else(|p| p.into_inner()) = tls;
                    ctx.update(|s| {
                        s.certificate.serial = new.serial.clone();
                        s.certificate.not_after_unix = new.not_after;
                        s.certificate.renewals += 1;
                        s.certificate.last_renewal_error = None;
                    });
                    *ctx.cert.lock().unwrap_or_else(|p| p.into_inner()) = new;
                    obtained = Some(status::unix_now() as i64);
                    ctx.reconnect.notify_one();
                    backoff.reset();
                    break;
                }
                Err(why) => {
                    let delay = match server_wait {
                        Some(wait) => backoff.next_delay().max(wait),
                        None => backoff.next_delay(),
                    };
                    let expired = info.not_after <= status::unix_now() as i64;
                    if expired {
                        tracing::error!(
                            reason = %why,
                            "certificate renewal failed and the certificate has expired: \
                             re-enrol the device (`devid enroll`)"
                        );
                    } else {
                        tracing::warn!(reason = %why, retry_in_s = delay.as_secs(), "certificate renewal failed; retrying");
                    }
                    ctx.update(|s| s.certificate.last_renewal_error = Some(why));
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.changed() => return,
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(status: u16, retry_after_secs: Option<u64>) -> renew::RenewError {
        renew::RenewError::Enroll(devid_enroll::EnrollError::Server {
            status,
            code: "rate_limited".into(),
            message: String::new(),
            retry_after_secs,
        })
    }

    #[test]
    fn a_throttled_renewal_waits_what_the_server_asks() {
        assert_eq!(
            retry_after(&server(429, Some(30))),
            Some(Duration::from_secs(30))
        );
        assert_eq!(retry_after(&server(429, None)), None);
        assert_eq!(retry_after(&server(403, Some(30))), None);
        assert_eq!(
            retry_after(&server(429, Some(u64::MAX))),
            Some(Duration::from_secs(24 * 3600))
        );
    }
}
