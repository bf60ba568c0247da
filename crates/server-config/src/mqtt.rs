//! The `mqtt.*` settings of `devid-server.toml` (dotted keys, so they never open a TOML table
//! that would swallow settings written after them).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

/// MQTT ingest settings. Every field has a default; `devid-server init` writes them all.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttSettings {
    /// Also accept TLS 1.2 (TLS 1.3 only by default).
    pub tls12: bool,
    /// Time allowed from TCP accept to a complete TLS handshake and CONNECT packet, seconds.
    pub connect_timeout_secs: u64,
    /// Most MQTT connections open at once (TLS handshakes included); more are closed at once.
    pub max_connections: usize,
    /// New connections accepted per second from one source address (token bucket rate).
    pub handshakes_per_source_per_sec: f64,
    /// Burst of new connections from one source address.
    pub handshake_burst_per_source: f64,
    /// Handshakes (TLS + CONNECT) in progress at once from one source address.
    pub max_pending_handshakes_per_source: usize,
    /// Largest PUBLISH payload accepted, bytes (larger packets: DISCONNECT 0x95 / close).
    pub max_payload_bytes: u32,
    /// Longest keep-alive granted, seconds; a client asking for 0 or more gets this (MQTT 5
    /// is told in CONNACK). The connection closes after 1.5 x keep-alive without a packet.
    pub max_keepalive_secs: u16,
    /// Unacknowledged publishes accepted per connection (MQTT 5 Receive Maximum); further
    /// reading waits for the durable commit (backpressure).
    pub receive_maximum: u16,
    /// Messages per second per device (token bucket rate); above it, reading slows down.
    pub messages_per_sec: f64,
    /// Message burst per device.
    pub messages_burst: f64,
    /// Payload bytes per second per device (token bucket rate).
    pub bytes_per_sec: f64,
    /// Payload byte burst per device (at least `max_payload_bytes`).
    pub bytes_burst: f64,
    /// Most messages in one durable commit (one transaction + fsync).
    pub commit_batch_max: usize,
    /// Messages waiting for the writer, over all connections, before readers wait.
    pub commit_queue: usize,
    /// Re-check the registry state of every connected device this often, seconds (live
    /// revocation is immediate on this node; this bounds it when another node changed the
    /// state).
    pub registry_recheck_secs: u64,
    /// A device's `last_seen` in the registry is moved forward when it connects, or its session
    /// is re-checked, and the stored value is older than this many seconds (written in
    /// batches, at most once a second).
    pub last_seen_resolution_secs: u64,
    /// At most one audit row per device (or source address) and refusal reason in this
    /// window, seconds; the next row counts the ones left out.
    pub audit_interval_secs: u64,
}

impl Default for MqttSettings {
    fn default() -> Self {
        Self {
            tls12: false,
            connect_timeout_secs: 10,
            max_connections: 10_000,
            handshakes_per_source_per_sec: 200.0,
            handshake_burst_per_source: 1_000.0,
            max_pending_handshakes_per_source: 64,
            max_payload_bytes: 256 * 1024,
            max_keepalive_secs: 1_200,
            receive_maximum: 128,
            messages_per_sec: 100.0,
            messages_burst: 1_000.0,
            bytes_per_sec: 1024.0 * 1024.0,
            bytes_burst: 4.0 * 1024.0 * 1024.0,
            commit_batch_max: 4_096,
            commit_queue: 65_536,
            registry_recheck_secs: 60,
            last_seen_resolution_secs: 300,
            audit_interval_secs: 10,
        }
    }
}

fn invalid(key: &'static str, detail: &str) -> ConfigError {
    ConfigError::Invalid {
        key,
        detail: detail.to_owned(),
    }
}

impl MqttSettings {
    /// Check the values.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.connect_timeout_secs == 0 || self.connect_timeout_secs > 300 {
            return Err(invalid(
                "mqtt.connect_timeout_secs",
                "must be between 1 and 300",
            ));
        }
        if self.max_connections == 0 {
            return Err(invalid("mqtt.max_connections", "must be at least 1"));
        }
        let positive = [
            (
                "mqtt.handshakes_per_source_per_sec",
                self.handshakes_per_source_per_sec,
            ),
            (
                "mqtt.handshake_burst_per_source",
                self.handshake_burst_per_source,
            ),
            ("mqtt.messages_per_sec", self.messages_per_sec),
            ("mqtt.messages_burst", self.messages_burst),
            ("mqtt.bytes_per_sec", self.bytes_per_sec),
            ("mqtt.bytes_burst", self.bytes_burst),
        ];
        for (key, v) in positive {
            if !(v.is_finite() && v > 0.0) {
                return Err(invalid(key, "must be a number above 0"));
            }
        }
        if self.handshake_burst_per_source < 1.0 || self.messages_burst < 1.0 {
            return Err(invalid(
                "mqtt.*_burst",
                "bursts must allow at least one event",
            ));
        }
        if self.max_pending_handshakes_per_source == 0 {
            return Err(invalid(
                "mqtt.max_pending_handshakes_per_source",
                "must be at least 1",
            ));
        }
        if self.max_payload_bytes < 64 || self.max_payload_bytes > 64 * 1024 * 1024 {
            return Err(invalid(
                "mqtt.max_payload_bytes",
                "must be between 64 and 67108864",
            ));
        }
        if self.bytes_burst < f64::from(self.max_payload_bytes) {
            return Err(invalid(
                "mqtt.bytes_burst",
                "must be at least mqtt.max_payload_bytes, or the largest message could never pass",
            ));
        }
        if self.max_keepalive_secs == 0 {
            return Err(invalid("mqtt.max_keepalive_secs", "must be at least 1"));
        }
        if self.receive_maximum == 0 {
            return Err(invalid("mqtt.receive_maximum", "must be at least 1"));
        }
        if self.commit_batch_max == 0 || self.commit_queue == 0 {
            return Err(invalid(
                "mqtt.commit_batch_max / mqtt.commit_queue",
                "must be at least 1",
            ));
        }
        if self.registry_recheck_secs == 0 {
            return Err(invalid("mqtt.registry_recheck_secs", "must be at least 1"));
        }
        if self.last_seen_resolution_secs == 0 {
            return Err(invalid(
                "mqtt.last_seen_resolution_secs",
                "must be at least 1",
            ));
        }
        Ok(())
    }

    /// TLS + CONNECT deadline.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.connect_timeout_secs)
    }

    /// Largest packet the codec buffers: the payload limit plus room for the topic and
    /// properties.
    pub fn max_packet_bytes(&self) -> u32 {
        self.max_payload_bytes.saturating_add(8 * 1024)
    }

    /// The settings as commented `mqtt.key = value` lines for `devid-server.toml`.
    pub fn to_commented_toml(&self) -> String {
        format!(
            "\n\
             # ---- MQTT ingest (mqtt.*): mutual TLS on mqtt_listen, identity from the device\n\
             # certificate, PUBACK only after a durable commit. ----\n\
             # Accept TLS 1.2 too (TLS 1.3 only when false).\n\
             mqtt.tls12 = {tls12}\n\
             # Seconds allowed for the TLS handshake plus the CONNECT packet (slow clients are cut).\n\
             mqtt.connect_timeout_secs = {cto}\n\
             # Most MQTT connections at once.\n\
             mqtt.max_connections = {maxc}\n\
             # New connections per second from one source address, and its burst.\n\
             mqtt.handshakes_per_source_per_sec = {hrate:?}\n\
             mqtt.handshake_burst_per_source = {hburst:?}\n\
             # Handshakes in progress at once from one address (a flood from one address\n\
             # cannot starve the others).\n\
             mqtt.max_pending_handshakes_per_source = {hpend}\n\
             # Largest payload accepted, in bytes.\n\
             mqtt.max_payload_bytes = {maxp}\n\
             # Longest keep-alive granted (s); idle connections close after 1.5 x keep-alive.\n\
             mqtt.max_keepalive_secs = {ka}\n\
             # Unacknowledged QoS 1 publishes per connection (MQTT 5 Receive Maximum).\n\
             mqtt.receive_maximum = {rm}\n\
             # Per-device rate limit (token bucket): messages per second and burst. Above it the\n\
             # server reads more slowly (TCP backpressure); nothing is dropped.\n\
             mqtt.messages_per_sec = {mrate:?}\n\
             mqtt.messages_burst = {mburst:?}\n\
             # Per-device payload bytes per second and burst (burst >= max_payload_bytes).\n\
             mqtt.bytes_per_sec = {brate:?}\n\
             mqtt.bytes_burst = {bburst:?}\n\
             # Group commit: most messages per transaction + fsync, and messages queued for it.\n\
             mqtt.commit_batch_max = {cbm}\n\
             mqtt.commit_queue = {cq}\n\
             # Re-read every connected device's registry state this often (s).\n\
             mqtt.registry_recheck_secs = {rr}\n\
             # Move a device's last_seen forward (at connect and at each re-check) when it is\n\
             # older than this (s); written in batches.\n\
             mqtt.last_seen_resolution_secs = {ls}\n\
             # At most one audit row per device and refusal reason in this many seconds.\n\
             mqtt.audit_interval_secs = {ai}\n",
            tls12 = self.tls12,
            cto = self.connect_timeout_secs,
            maxc = self.max_connections,
            hrate = self.handshakes_per_source_per_sec,
            hburst = self.handshake_burst_per_source,
            hpend = self.max_pending_handshakes_per_source,
            maxp = self.max_payload_bytes,
            ka = self.max_keepalive_secs,
            rm = self.receive_maximum,
            mrate = self.messages_per_sec,
            mburst = self.messages_burst,
            brate = self.bytes_per_sec,
            bburst = self.bytes_burst,
            cbm = self.commit_batch_max,
            cq = self.commit_queue,
            rr = self.registry_recheck_secs,
            ls = self.last_seen_resolution_secs,
            ai = self.audit_interval_secs,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Wrap {
        mqtt: MqttSettings,
        after: u32,
    }

    #[test]
    fn dotted_keys_round_trip_and_do_not_swallow_later_keys() {
        let s = MqttSettings::default();
        s.validate().unwrap();
        let text = format!("{}after = 7\n", s.to_commented_toml());
        let back: Wrap = toml::from_str(&text).unwrap();
        assert_eq!(back.mqtt, s);
        assert_eq!(back.after, 7);
        let mut bad = s.clone();
        bad.bytes_burst = 10.0;
        assert!(bad.validate().is_err());
    }
}
