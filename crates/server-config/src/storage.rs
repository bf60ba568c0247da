//! The `storage.*` and `retention.*` settings: the free-disk watermark below which the ingest
//! refuses new publishes, the message log's segment size, how long messages are kept and the
//! per-device byte quota over that window.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

/// Default free-disk watermark: 256 MiB, several 32 MiB log segments (one of them is
/// prepared ahead) plus room for SQLite's WAL and the audit log.
pub const DEFAULT_MIN_FREE_BYTES: u64 = 256 << 20;

/// `storage.*`: the disk the data dir (message log, SQLite) lives on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageSettings {
    /// Below this many free bytes on the data dir's file system (as an unprivileged process
    /// sees it) the ingest refuses new publishes (MQTT 5: PUBACK 0x97; 3.1.1: disconnect)
    /// until space returns. 0: no watermark.
    pub min_free_bytes: u64,
    /// Size of one message-log segment (SQLite backend); retention deletes whole segments.
    pub segment_bytes: u32,
}

impl Default for StorageSettings {
    fn default() -> Self {
        Self {
            min_free_bytes: DEFAULT_MIN_FREE_BYTES,
            segment_bytes: 32 << 20,
        }
    }
}

/// `retention.*`: how long messages are kept, and how much one device may store meanwhile.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionSettings {
    /// Keep messages this long (humantime: `30d`); older ones are deleted in the background
    /// (SQLite: whole log segments once every record in them is older, and their index rows;
    /// PostgreSQL: batched deletes). None: keep everything.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_age: Option<String>,
    /// Most bytes one device may store within `max_age` (payload, topic, ids and 36 bytes of
    /// record overhead per message); past it its publishes are refused (MQTT 5: PUBACK 0x97;
    /// 3.1.1: disconnect) until its old messages age out. 0: no quota.
    pub device_quota_bytes: u64,
    /// How often the background deletion runs, seconds (0: every `max_age`/10, between 1 s
    /// and 60 s).
    pub sweep_interval_secs: u64,
}

fn invalid(key: &'static str, detail: &str) -> ConfigError {
    ConfigError::Invalid {
        key,
        detail: detail.to_owned(),
    }
}

fn invalid_owned(key: &'static str, detail: String) -> ConfigError {
    ConfigError::Invalid { key, detail }
}

impl StorageSettings {
    /// Check the values.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.segment_bytes < 64 << 10 {
            return Err(invalid(
                "storage.segment_bytes",
                "must be at least 65536 (and above mqtt.max_payload_bytes)",
            ));
        }
        Ok(())
    }

    /// The `storage.*` lines of the commented config file.
    pub fn to_commented_toml(&self) -> String {
        format!(
            "\n\
             # ---- Storage (storage.*) ----\n\
             # Below this many free bytes on the data dir's file system the server refuses new\n\
             # publishes (MQTT 5 PUBACK 0x97 quota exceeded, MQTT 3.1.1 disconnect) and acks\n\
             # nothing it could not store; it serves again by itself once space returns.\n\
             # Keep it above a few log segments plus SQLite's WAL. 0 disables it.\n\
             storage.min_free_bytes = {free}\n\
             # Size of one message-log segment (retention deletes whole segments).\n\
             storage.segment_bytes = {seg}\n",
            free = self.min_free_bytes,
            seg = self.segment_bytes,
        )
    }
}

impl RetentionSettings {
    /// Check the values.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let age = self.max_age()?;
        if self.device_quota_bytes > 0 && age.is_none() {
            return Err(invalid(
                "retention.device_quota_bytes",
                "a quota is counted over retention.max_age: set it too",
            ));
        }
        Ok(())
    }

    /// `max_age` parsed.
    pub fn max_age(&self) -> Result<Option<Duration>, ConfigError> {
        self.max_age
            .as_deref()
            .map(|s| {
                let d = humantime::parse_duration(s.trim()).map_err(|e| {
                    invalid_owned(
                        "retention.max_age",
                        format!("{s:?}: {e} (examples: 12h, 7d, 30d)"),
                    )
                })?;
                if d.is_zero() {
                    return Err(invalid("retention.max_age", "must be longer than zero"));
                }
                Ok(d)
            })
            .transpose()
    }

    /// How often the deletion runs.
    pub fn sweep_interval(&self) -> Duration {
        if self.sweep_interval_secs > 0 {
            return Duration::from_secs(self.sweep_interval_secs);
        }
        let age = self.max_age().ok().flatten().unwrap_or(Duration::ZERO);
        (age / 10).clamp(Duration::from_secs(1), Duration::from_secs(60))
    }

    /// The `retention.*` lines of the commented config file.
    pub fn to_commented_toml(&self) -> String {
        let age = match &self.max_age {
            Some(a) => format!("retention.max_age = {}\n", toml::Value::String(a.clone())),
            None => "# retention.max_age = \"30d\"\n".to_owned(),
        };
        format!(
            "\n\
             # ---- Retention (retention.*) ----\n\
             # Delete messages older than this (humantime: 30d). Unset: keep everything.\n\
             {age}\
             # Most bytes one device may store within retention.max_age (payload, topic, ids and\n\
             # 36 bytes per message); past it: MQTT 5 PUBACK 0x97, MQTT 3.1.1 disconnect, until\n\
             # its old messages age out. 0: no quota.\n\
             retention.device_quota_bytes = {quota}\n\
             # Run the background deletion this often, seconds (0: max_age/10, 1 to 60 s).\n\
             retention.sweep_interval_secs = {sweep}\n",
            quota = self.device_quota_bytes,
            sweep = self.sweep_interval_secs,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Wrap {
        storage: StorageSettings,
        retention: RetentionSettings,
        after: u32,
    }

    #[test]
    fn dotted_keys_round_trip_and_a_quota_needs_a_window() {
        let st = StorageSettings::default();
        let mut r = RetentionSettings::default();
        let text = format!(
            "{}{}after = 7\n",
            st.to_commented_toml(),
            r.to_commented_toml()
        );
        let back: Wrap = toml::from_str(&text).unwrap();
        assert_eq!(
            (back.storage, back.retention.clone(), back.after),
            (st, r.clone(), 7)
        );
        assert_eq!(back.retention.max_age().unwrap(), None);
        r.device_quota_bytes = 1000;
        assert!(r.validate().is_err(), "quota without max_age");
        r.max_age = Some("30d".into());
        r.validate().unwrap();
        assert_eq!(r.sweep_interval(), Duration::from_secs(60));
        let text = format!("{}after = 1\n", r.to_commented_toml());
        let back: Wrap = toml::from_str(&format!("{}{text}", st_toml())).unwrap();
        assert_eq!(back.retention, r);
        r.max_age = Some("soon".into());
        assert!(r.validate().is_err());
    }

    fn st_toml() -> String {
        StorageSettings::default().to_commented_toml()
    }
}
