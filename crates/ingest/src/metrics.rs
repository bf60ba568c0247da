//! Prometheus metrics of the ingest (text exposition format at `GET /metrics` on the HTTPS
//! port, admin bearer token required). Hot-path counters are plain atomics; labelled families
//! are touched only on refusals and disconnects.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// A `reason` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Stable reason code.
    pub reason: &'static str,
}

/// A `kind` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// What kind of event.
    pub kind: &'static str,
}

/// Every ingest metric.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Open MQTT sessions (after CONNACK success).
    pub connections: Gauge,
    /// TCP connections accepted (before any limit).
    pub tcp_accepted: Counter,
    /// Completed TLS handshakes.
    pub handshakes: Counter,
    /// Connections that ended before a CONNECT was read: TLS failures, timeouts, limits.
    pub handshake_failures: Family<ReasonLabel, Counter>,
    /// Sessions accepted (CONNACK success).
    pub connects: Counter,
    /// CONNECTs refused, by reason.
    pub connect_refusals: Family<ReasonLabel, Counter>,
    /// Sessions closed, by reason.
    pub disconnects: Family<ReasonLabel, Counter>,
    /// Messages received and authorised (queued for the durable commit).
    pub messages_in: Counter,
    /// Payload bytes of those messages.
    pub bytes_in: Counter,
    /// Messages durably stored.
    pub messages_stored: Counter,
    /// Messages whose (device, msg-id) was stored before.
    pub messages_duplicate: Counter,
    /// Batches that failed to commit.
    pub commit_failures: Counter,
    /// Duration of one group commit (transaction + fsync), seconds.
    pub commit_seconds: Histogram,
    /// Messages per group commit.
    pub commit_batch_size: Histogram,
    /// Denied publishes and subscriptions, by kind.
    pub denials: Family<KindLabel, Counter>,
    /// Messages that hit a per-device rate limit (reading was slowed), by kind.
    pub rate_limited: Family<KindLabel, Counter>,
    /// Live sessions closed because the device was suspended or revoked.
    pub live_revocations: Counter,
    /// Publishes refused to protect the disk (MQTT 5 0x97 / 3.1.1 disconnect), by reason
    /// (`disk_full`, `quota_exceeded`).
    pub storage_refusals: Family<ReasonLabel, Counter>,
    /// Free bytes on the data dir's file system at the last reading.
    pub disk_free_bytes: Gauge,
    disk_free: std::sync::OnceLock<std::sync::Arc<crate::storage::DiskGuard>>,
}

impl Metrics {
    /// Register every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("devid_mqtt");
        let m = Self {
            connections: Gauge::default(),
            tcp_accepted: Counter::default(),
            handshakes: Counter::default(),
            handshake_failures: Family::default(),
            connects: Counter::default(),
            connect_refusals: Family::default(),
            disconnects: Family::default(),
            messages_in: Counter::default(),
            bytes_in: Counter::default(),
            messages_stored: Counter::default(),
            messages_duplicate: Counter::default(),
            commit_failures: Counter::default(),
            commit_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            commit_batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            denials: Family::default(),
            rate_limited: Family::default(),
            live_revocations: Counter::default(),
            storage_refusals: Family::default(),
            disk_free_bytes: Gauge::default(),
            disk_free: std::sync::OnceLock::new(),
            registry: Registry::default(),
        };
        registry.register("connections", "Open MQTT sessions", m.connections.clone());
        registry.register(
            "tcp_accepted",
            "TCP connections accepted on the MQTT port",
            m.tcp_accepted.clone(),
        );
        registry.register(
            "handshakes",
            "Completed TLS handshakes with a fleet client certificate",
            m.handshakes.clone(),
        );
        registry.register(
            "handshake_failures",
            "Connections ended before CONNECT, by reason",
            m.handshake_failures.clone(),
        );
        registry.register("connects", "Sessions accepted", m.connects.clone());
        registry.register(
            "connect_refusals",
            "CONNECTs refused, by reason",
            m.connect_refusals.clone(),
        );
        registry.register(
            "disconnects",
            "Sessions closed, by reason",
            m.disconnects.clone(),
        );
        registry.register(
            "messages_in",
            "Messages received and authorised",
            m.messages_in.clone(),
        );
        registry.register(
            "received_payload_bytes",
            "Payload bytes received and authorised",
            m.bytes_in.clone(),
        );
        registry.register(
            "messages_stored",
            "Messages durably stored",
            m.messages_stored.clone(),
        );
        registry.register(
            "messages_duplicate",
            "Messages whose device and msg-id were stored before (acked, not stored again)",
            m.messages_duplicate.clone(),
        );
        registry.register(
            "commit_failures",
            "Group commits that failed",
            m.commit_failures.clone(),
        );
        registry.register(
            "commit_seconds",
            "Duration of one group commit (transaction and fsync)",
            m.commit_seconds.clone(),
        );
        registry.register(
            "commit_batch_messages",
            "Messages per group commit",
            m.commit_batch_size.clone(),
        );
        registry.register(
            "denials",
            "Publishes and subscriptions denied by policy, by kind",
            m.denials.clone(),
        );
        registry.register(
            "rate_limited",
            "Messages slowed down by a per-device rate limit, by kind",
            m.rate_limited.clone(),
        );
        registry.register(
            "live_revocations",
            "Open sessions closed because the device was suspended or revoked",
            m.live_revocations.clone(),
        );
        registry.register(
            "storage_refusals",
            "Publishes refused to protect the disk (free-space watermark, per-device quota), by reason",
            m.storage_refusals.clone(),
        );
        registry.register(
            "disk_free_bytes",
            "Free bytes on the data dir's file system at the last reading (when storage.min_free_bytes is set)",
            m.disk_free_bytes.clone(),
        );
        Self { registry, ..m }
    }

    /// Where `disk_free_bytes` comes from.
    pub fn set_disk_guard(&self, g: std::sync::Arc<crate::storage::DiskGuard>) {
        let _ = self.disk_free.set(g);
    }

    /// Count a publish refused to protect the disk.
    pub fn storage_refused(&self, reason: &'static str) {
        self.storage_refusals
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// The text exposition, in the Prometheus text format (version 0.0.4) that Prometheus
    /// scrapes and `promtool check metrics` lints: a counter family is named with its
    /// `_total` suffix, as its samples are (OpenMetrics names the family without it).
    pub fn encode(&self) -> String {
        if let Some(g) = self.disk_free.get() {
            self.disk_free_bytes
                .set(i64::try_from(g.free_bytes()).unwrap_or(i64::MAX));
        }
        let mut open = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut open, &self.registry) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        to_prometheus_text(&open)
    }

    /// Count a handshake-phase failure.
    pub fn handshake_failed(&self, reason: &'static str) {
        self.handshake_failures
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Count a refused CONNECT.
    pub fn connect_refused(&self, reason: &'static str) {
        self.connect_refusals
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Count a closed session.
    pub fn disconnected(&self, reason: &'static str) {
        self.disconnects
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Count a denial.
    pub fn denied(&self, kind: &'static str) {
        self.denials.get_or_create(&KindLabel { kind }).inc();
    }

    /// Count a rate-limited message.
    pub fn limited(&self, kind: &'static str) {
        self.rate_limited.get_or_create(&KindLabel { kind }).inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// OpenMetrics text to the Prometheus text format: `# HELP`/`# TYPE` of a counter family get
/// the `_total` of its samples, `# EOF` goes.
fn to_prometheus_text(open: &str) -> String {
    let counters: std::collections::HashSet<&str> = open
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(open.len() + 16 * counters.len());
    for line in open.lines() {
        if line == "# EOF" {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                if counters.contains(name) {
                    out.push_str(&format!("{prefix}{name}_total {tail}\n"));
                } else {
                    out.push_str(line);
                    out.push('\n');
                }
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_named_with_total_and_every_family_has_help() {
        let m = Metrics::new();
        m.connects.inc();
        let text = m.encode();
        assert!(
            text.contains("# TYPE devid_mqtt_connects_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("# HELP devid_mqtt_connects_total Sessions accepted.\n"),
            "{text}"
        );
        assert!(text.contains("\ndevid_mqtt_connects_total 1\n"), "{text}");
        assert!(
            text.contains("# TYPE devid_mqtt_connections gauge\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE devid_mqtt_commit_seconds histogram\n"),
            "{text}"
        );
        assert!(!text.contains("# EOF"), "{text}");
    }
}
