//! Telemetry ingest: MQTT 3.1.1 and 5 over mutual TLS, part of `devid-server run` beside the
//! HTTPS API.
//!
//! Per connection, in order: TLS 1.3 handshake with a client certificate chained to the fleet
//! CA -> CONNECT (client id must equal the certificate's device id) -> registry check (active
//! only) -> for each PUBLISH: authorise (least privilege, [`policy`]) -> durable append through
//! the group-commit writer ([`commit`]) -> PUBACK. At most `mqtt.receive_maximum` messages of a
//! connection wait for their commit; further reading waits (backpressure).
//!
//! Code map:
//! * [`config`]: the `mqtt.*` settings.
//! * [`tls`]: the rustls server config (client certificate required) and certificate identity.
//! * [`session`]: one connection, from TCP accept to close.
//! * [`commit`]: the group-commit writer thread (one transaction + fsync per batch).
//! * [`live`]: device id -> live session, for takeover and live revocation.
//! * [`policy`]: what a device may publish and subscribe.
//! * [`limits`]: token buckets, per-source handshake limits, audit rate limiting.
//! * [`metrics`]: Prometheus metrics (`GET /metrics`).
//! * [`http`]: `GET /v1/devices/{id}/messages`, `GET /v1/stream` (SSE), `GET /metrics`.
//! * [`client`]: the CLI's client for those routes (`devid-server messages list|tail`).
//!
//! Invariants: a PUBACK is sent only after its message is durably committed; no payload is
//! ever logged, audited or put in an error; a device that is suspended or revoked loses its
//! session at once (on this node) and cannot reconnect.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use devid_proto::{DeviceId, DeviceState};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::api::AppState;
use crate::config::ServerConfig;
use crate::serve::ServeError;
use crate::store::messages::{self as message_store, MessageStore};
use crate::store::{AuditCtx, NewAudit, StateChangeSink, StoreError};
use crate::timeutil::now_ms;

pub mod client;
pub mod commit;
pub mod config;
pub mod http;
pub mod limits;
pub mod live;
pub mod metrics;
pub mod policy;
pub mod session;
pub mod tls;

/// Capacity of the live stream's broadcast channel (a slower SSE reader skips messages and
/// is told how many).
const STREAM_CAPACITY: usize = 4_096;

/// How often pending `last_seen` times are written to the registry.
const LAST_SEEN_FLUSH: Duration = Duration::from_secs(1);
/// Most devices per `last_seen` transaction.
const LAST_SEEN_CHUNK: usize = 500;

/// Everything the ingest shares between connections and with the HTTP API.
#[derive(Debug)]
pub struct Telemetry {
    /// The `mqtt.*` settings.
    pub settings: config::MqttSettings,
    /// Durable message storage.
    pub messages: Arc<dyn MessageStore>,
    /// Live sessions by device.
    pub live: Arc<live::LiveConnections>,
    /// Metrics.
    pub metrics: Arc<metrics::Metrics>,
    /// The group-commit writer.
    pub commits: commit::CommitQueue,
    /// Stored messages as they commit, for `GET /v1/stream`.
    pub stream: broadcast::Sender<Arc<commit::LiveMessage>>,
    /// Per-source handshake limits.
    pub sources: Arc<limits::SourceLimiter>,
    audit_limiter: limits::AuditLimiter,
    /// `last_seen` times not yet written, by device (sorted: batches lock rows in id order).
    last_seen: Mutex<BTreeMap<DeviceId, i64>>,
}

impl Telemetry {
    /// Open the message store and start the writer thread.
    pub fn open(cfg: &ServerConfig) -> Result<Arc<Self>, StoreError> {
        let settings = cfg.mqtt.clone();
        let messages = message_store::open(cfg)?;
        let metrics = Arc::new(metrics::Metrics::new());
        let (stream, _) = broadcast::channel(STREAM_CAPACITY);
        {
            let metrics = metrics.clone();
            let stream = stream.clone();
            messages.set_index_hook(Box::new(move |stored, duplicates| {
                metrics.messages_stored.inc_by(stored.len() as u64);
                metrics.messages_duplicate.inc_by(duplicates);
                if stream.receiver_count() > 0 {
                    for (id, m) in stored {
                        let _ = stream.send(Arc::new(commit::LiveMessage::new(*id, m.clone())));
                    }
                }
            }));
        }
        let commits = commit::CommitQueue::start(
            messages.clone(),
            metrics.clone(),
            stream.clone(),
            settings.commit_batch_max,
            settings.commit_queue,
        )
        .map_err(|e| StoreError::Db {
            operation: "start the message writer",
            detail: e.to_string(),
        })?;
        Ok(Arc::new(Self {
            sources: limits::SourceLimiter::new(
                settings.handshakes_per_source_per_sec,
                settings.handshake_burst_per_source,
                settings.max_pending_handshakes_per_source,
            ),
            audit_limiter: limits::AuditLimiter::new(Duration::from_secs(
                settings.audit_interval_secs,
            )),
            settings,
            messages,
            live: live::LiveConnections::new(),
            metrics,
            commits,
            stream,
            last_seen: Mutex::new(BTreeMap::new()),
        }))
    }

    /// `id` is connected now: queue a new `last_seen` for the registry when the stored one
    /// (`stored_ms`) is older than `mqtt.last_seen_resolution_secs`.
    pub(crate) fn seen(&self, id: &DeviceId, stored_ms: i64) {
        let now = now_ms();
        let resolution = i64::try_from(self.settings.last_seen_resolution_secs)
            .unwrap_or(i64::MAX)
            .saturating_mul(1000);
        if now.saturating_sub(stored_ms) < resolution {
            return;
        }
        self.queue_last_seen([(id, &now)]);
    }

    /// Queue `last_seen` times, keeping the later one of a device already queued.
    fn queue_last_seen<'a>(&self, times: impl IntoIterator<Item = (&'a DeviceId, &'a i64)>) {
        let mut pending = match self.last_seen.lock() {
            Ok(p) => p,
            Err(p) => p.into_inner(),
        };
        for (id, ms) in times {
            let t = pending.entry(id.clone()).or_insert(*ms);
            *t = (*t).max(*ms);
        }
    }

    /// Write the queued `last_seen` times (blocking), [`LAST_SEEN_CHUNK`] devices per
    /// transaction so that no transaction holds many rows' locks for long. What fails stays
    /// queued for the next round.
    pub fn flush_last_seen(&self, store: &dyn crate::store::Store) -> Result<(), StoreError> {
        let batch: Vec<(DeviceId, i64)> = {
            let mut pending = match self.last_seen.lock() {
                Ok(p) => p,
                Err(p) => p.into_inner(),
            };
            std::mem::take(&mut *pending).into_iter().collect()
        };
        let mut chunks = batch.chunks(LAST_SEEN_CHUNK);
        for chunk in chunks.by_ref() {
            if let Err(e) = store.record_last_seen(chunk) {
                self.queue_last_seen(
                    std::iter::once(chunk)
                        .chain(chunks)
                        .flatten()
                        .map(|(id, ms)| (id, ms)),
                );
                return Err(e);
            }
        }
        Ok(())
    }

    /// Called after a registry state change is committed (by this node's admin API, or by the
    /// listener for changes any node committed to a shared PostgreSQL): a device that is no
    /// longer active loses its live session now (MQTT 5 DISCONNECT 0x98, then close).
    pub fn on_state_change(&self, id: &DeviceId, state: DeviceState) {
        if self.live.on_state_change(id.as_str(), state) {
            self.metrics.live_revocations.inc();
            tracing::info!(device_id = %id, %state, "live MQTT session closed by state change");
        }
    }

    /// Follow the state changes other nodes commit to a shared store (PostgreSQL), so that a
    /// device revoked or suspended anywhere loses its session on this node at once too.
    pub fn follow_state_changes(self: &Arc<Self>, store: &Arc<dyn crate::store::Store>) {
        let sink: Arc<dyn StateChangeSink> = self.clone();
        match store.follow_state_changes(Arc::downgrade(&sink)) {
            Ok(true) => tracing::info!("following device state changes from other nodes"),
            Ok(false) => {}
            Err(e) => tracing::warn!(
                error = %e,
                "cannot follow other nodes' device state changes; live sessions fall back to \
                 the periodic registry re-check"
            ),
        }
    }

    /// Write an audit row unless one with the same `key` was written within
    /// `mqtt.audit_interval_secs` (then only count it). Never blocks the caller.
    pub(crate) fn audit(&self, store: &Arc<dyn crate::store::Store>, row: AuditRow) {
        let Some(suppressed) = self.audit_limiter.allow(&row.key) else {
            return;
        };
        let detail = if suppressed > 0 {
            format!("{} (+{suppressed} similar suppressed)", row.detail)
        } else {
            row.detail
        };
        let store = store.clone();
        tokio::task::spawn_blocking(move || {
            let ctx = AuditCtx {
                actor: row.actor,
                source: row.source,
                now_ms: now_ms(),
            };
            if let Err(e) = store.append_audit(&NewAudit {
                ctx: &ctx,
                device_id: row.device.as_deref(),
                action: row.action,
                outcome: "refused",
                detail: &detail,
            }) {
                tracing::error!(error = %e, "writing an MQTT audit row failed");
            }
        });
    }
}

impl StateChangeSink for Telemetry {
    fn state_changed(&self, id: &DeviceId, state: DeviceState) {
        self.on_state_change(id, state);
    }
}

/// A refusal to audit.
#[derive(Debug, Clone)]
pub(crate) struct AuditRow {
    /// Rate-limit key (device or source, and reason).
    pub(crate) key: String,
    /// `device:<id>` or `anonymous`.
    pub(crate) actor: String,
    /// Peer address.
    pub(crate) source: String,
    /// Device concerned.
    pub(crate) device: Option<String>,
    /// `mqtt.connect`, `mqtt.publish`, `mqtt.subscribe`, `mqtt.session`.
    pub(crate) action: &'static str,
    /// Reason code and non-secret detail (never a payload).
    pub(crate) detail: String,
}

/// A topic or client id as it may appear in an audit row or log: printable ASCII only, at
/// most 128 characters.
pub(crate) fn sanitize(s: &str) -> String {
    let mut out: String = s
        .chars()
        .take(128)
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect();
    if s.chars().count() > 128 {
        out.push_str("...");
    }
    out
}

/// Bind the configured MQTT address.
pub async fn bind(cfg: &ServerConfig) -> Result<TcpListener, ServeError> {
    TcpListener::bind(cfg.mqtt_listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: cfg.mqtt_listen,
            source,
        })
}

/// Accept MQTT connections on `listener` until `shutdown` completes, then ask every session
/// to close.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    state: AppState,
    shutdown: impl Future<Output = ()>,
) {
    let tel = state.telemetry.clone();
    tel.follow_state_changes(&state.store);
    flush_last_seen_every_second(Arc::downgrade(&tel), state.store.clone());
    let acceptor = TlsAcceptor::from(tls);
    let slots = Arc::new(Semaphore::new(tel.settings.max_connections.max(1)));
    tokio::pin!(shutdown);
    loop {
        let (tcp, addr) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "MQTT accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        tel.metrics.tcp_accepted.inc();
        let _ = tcp.set_nodelay(true);
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tel.metrics.handshake_failed("connection_limit");
            tracing::debug!(%addr, "MQTT connection refused: mqtt.max_connections reached");
            drop(tcp);
            continue;
        };
        let slot = match tel.sources.admit(addr.ip()) {
            Ok(s) => s,
            Err(why) => {
                tel.metrics.handshake_failed(match why {
                    limits::SourceRefusal::Rate => "source_rate_limited",
                    limits::SourceRefusal::Pending => "source_pending_limit",
                });
                tracing::debug!(%addr, ?why, "MQTT connection refused by the per-source limit");
                drop(tcp);
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let state = state.clone();
        tokio::spawn(async move {
            session::handle(tcp, addr, acceptor, state, slot).await;
            drop(permit);
        });
    }
    tel.live.close_all();
    let store = state.store.clone();
    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || tel.flush_last_seen(&*store)).await {
        tracing::warn!(error = %e, "recording last-seen times at shutdown failed");
    }
    tracing::info!("MQTT listener stopped");
}

/// A thread that writes the queued `last_seen` times every [`LAST_SEEN_FLUSH`] until the
/// telemetry is dropped.
fn flush_last_seen_every_second(tel: Weak<Telemetry>, store: Arc<dyn crate::store::Store>) {
    let spawned = std::thread::Builder::new()
        .name("devid-last-seen".into())
        .spawn(move || {
            let mut failing = false;
            loop {
                std::thread::sleep(LAST_SEEN_FLUSH);
                let Some(t) = tel.upgrade() else { return };
                // one line when writing starts to fail and one when it works again
                match t.flush_last_seen(&*store) {
                    Err(e) if !failing => {
                        tracing::warn!(error = %e, "recording last-seen times failed; retrying");
                        failing = true;
                    }
                    Ok(()) if failing => {
                        tracing::info!("recording last-seen times works again");
                        failing = false;
                    }
                    _ => {}
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the last-seen writer; last_seen stays as enrolled");
    }
}
