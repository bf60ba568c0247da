//! [`Ingest`]: what every MQTT session of this node shares (settings, the registry as far as
//! the ingest may use it, the message store and its group-commit writer, live sessions,
//! metrics, limits, the queue of `last_seen` times), and the audit of refusals.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devid_proto::{DeviceId, DeviceState};
use devid_server_config::MqttSettings;
use devid_stdx::now_ms;
use devid_store::{
    AuditCtx, IngestRegistry, LiveMessage, MessageStore, NewAudit, StateChangeSink, StoreError,
};
use tokio::sync::broadcast;

use crate::{commit, limits, live, metrics, storage};

/// How often pending `last_seen` times are written to the registry.
pub(crate) const LAST_SEEN_FLUSH: Duration = Duration::from_secs(1);
/// Most devices per `last_seen` transaction.
const LAST_SEEN_CHUNK: usize = 500;

/// Everything the ingest's sessions share.
#[derive(Debug)]
pub struct Ingest {
    /// The `mqtt.*` settings.
    pub settings: MqttSettings,
    /// The registry, as far as the ingest may use it.
    pub registry: Arc<dyn IngestRegistry>,
    /// Durable message storage.
    pub messages: Arc<dyn MessageStore>,
    /// Live sessions by device.
    pub live: Arc<live::LiveConnections>,
    /// Metrics.
    pub metrics: Arc<metrics::Metrics>,
    /// The group-commit writer.
    pub commits: commit::CommitQueue,
    /// Stored messages as they commit, for `GET /v1/stream`.
    pub stream: broadcast::Sender<Arc<LiveMessage>>,
    /// Per-source handshake limits.
    pub sources: Arc<limits::SourceLimiter>,
    /// The free-disk watermark (None: off).
    pub disk: Option<Arc<storage::DiskGuard>>,
    /// The per-device byte quota (None: off).
    pub quota: Option<storage::Quota>,
    audit_limiter: limits::AuditLimiter,
    /// `last_seen` times not yet written, by device (sorted: batches lock rows in id order).
    last_seen: Mutex<BTreeMap<DeviceId, i64>>,
}

impl Ingest {
    /// Start the group-commit writer over `messages`; committed messages are sent on `stream`
    /// (the channel the HTTPS live stream subscribes to).
    pub fn start(
        settings: MqttSettings,
        registry: Arc<dyn IngestRegistry>,
        messages: Arc<dyn MessageStore>,
        stream: broadcast::Sender<Arc<LiveMessage>>,
    ) -> Result<Arc<Self>, StoreError> {
        Self::start_with(
            settings,
            storage::StorageLimits::default(),
            registry,
            messages,
            stream,
        )
    }

    /// [`Ingest::start`] with the disk's limits: the free-space watermark and the per-device
    /// quota (seeded here from what `messages` holds within its window).
    pub fn start_with(
        settings: MqttSettings,
        limits: storage::StorageLimits,
        registry: Arc<dyn IngestRegistry>,
        messages: Arc<dyn MessageStore>,
        stream: broadcast::Sender<Arc<LiveMessage>>,
    ) -> Result<Arc<Self>, StoreError> {
        let metrics = Arc::new(metrics::Metrics::new());
        let disk = match (&limits.data_dir, limits.min_free_bytes) {
            (Some(dir), min) if min > 0 => {
                Some(Arc::new(storage::DiskGuard::new(dir.clone(), min)))
            }
            _ => None,
        };
        let quota = match limits.quota {
            Some((window, bytes)) if bytes > 0 => {
                let q = storage::Quota::new(window, bytes);
                // The store blocks (PostgreSQL panics on an async executor thread, and this
                // may be called from one): seed on a thread of its own.
                let rows = std::thread::scope(|sc| {
                    sc.spawn(|| q.seed_from(&*messages, now_ms()))
                        .join()
                        .unwrap_or_else(|_| {
                            Err(StoreError::Db {
                                operation: "seed the per-device quota",
                                detail: "the seeding thread panicked".into(),
                            })
                        })
                })?;
                tracing::info!(
                    buckets = rows,
                    "per-device quota counters seeded from the message store"
                );
                Some(q)
            }
            _ => None,
        };
        if let Some(d) = &disk {
            metrics.set_disk_guard(d.clone());
        }
        {
            let metrics = metrics.clone();
            let stream = stream.clone();
            messages.set_index_hook(Box::new(move |stored, duplicates| {
                metrics.messages_stored.inc_by(stored.len() as u64);
                metrics.messages_duplicate.inc_by(duplicates);
                if stream.receiver_count() > 0 {
                    for (id, m) in stored {
                        let _ = stream.send(Arc::new(LiveMessage::new(*id, m.clone())));
                    }
                }
            }));
        }
        let commits = commit::CommitQueue::start(
            messages.clone(),
            metrics.clone(),
            stream.clone(),
            disk.clone(),
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
            registry,
            messages,
            disk,
            quota,
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
        let mut pending = devid_stdx::lock(&self.last_seen);
        for (id, ms) in times {
            let t = pending.entry(id.clone()).or_insert(*ms);
            *t = (*t).max(*ms);
        }
    }

    /// Write the queued `last_seen` times (blocking), [`LAST_SEEN_CHUNK`] devices per
    /// transaction so that no transaction holds many rows' locks for long. What fails stays
    /// queued for the next round.
    pub fn flush_last_seen(&self) -> Result<(), StoreError> {
        let batch: Vec<(DeviceId, i64)> = {
            let mut pending = devid_stdx::lock(&self.last_seen);
            std::mem::take(&mut *pending).into_iter().collect()
        };
        let mut chunks = batch.chunks(LAST_SEEN_CHUNK);
        for chunk in chunks.by_ref() {
            if let Err(e) = self.registry.record_last_seen(chunk) {
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
    pub fn follow_state_changes(self: &Arc<Self>) {
        let sink: Arc<dyn StateChangeSink> = self.clone();
        match self.registry.follow_state_changes(Arc::downgrade(&sink)) {
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
    pub(crate) fn audit(&self, store: &Arc<dyn IngestRegistry>, row: AuditRow) {
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

impl devid_store::Presence for Ingest {
    fn connected(&self, id: &str) -> bool {
        self.live.contains(id)
    }

    fn connected_count(&self) -> usize {
        self.live.len()
    }
}

impl StateChangeSink for Ingest {
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
