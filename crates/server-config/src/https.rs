//! The `https.*` settings: per-source rate limits of the HTTPS API, its aggregated refusal
//! audit, and connection timeouts.

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

/// HTTPS API settings. Every field has a default; `devid-server init` writes them all.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpsSettings {
    /// Enrolment requests (`POST /v1/enroll`) per second from one source address.
    pub enroll_per_source_per_sec: f64,
    /// Enrolment requests one source may make in a burst.
    pub enroll_burst_per_source: f64,
    /// Renewals (`POST /v1/renew`) per second from one source address.
    pub renew_per_source_per_sec: f64,
    /// Renewals one source may make in a burst.
    pub renew_burst_per_source: f64,
    /// Failed admin authentications per second from one source address; past the burst the
    /// source gets 429 before its token is even looked up.
    pub admin_auth_failures_per_source_per_sec: f64,
    /// Failed admin authentications one source may make in a burst.
    pub admin_auth_failure_burst_per_source: f64,
    /// At most one audit row per source and reason for refusals decided before the registry
    /// (rate limits, malformed requests, bad admin tokens) per this many seconds; the row says
    /// how many were left out.
    pub audit_interval_secs: u64,
    /// A connection with no request in flight and no byte moving for this long is closed
    /// (HTTP/1 keep-alive and HTTP/2 alike), so idle connections cannot hold the
    /// `max_connections` slots.
    pub idle_timeout_secs: u64,
    /// HTTP/2 keep-alive PING interval; a peer that does not answer within it is dropped.
    pub h2_keepalive_secs: u64,
}

impl Default for HttpsSettings {
    fn default() -> Self {
        Self {
            enroll_per_source_per_sec: 5.0,
            enroll_burst_per_source: 50.0,
            renew_per_source_per_sec: 1.0,
            renew_burst_per_source: 20.0,
            admin_auth_failures_per_source_per_sec: 0.5,
            admin_auth_failure_burst_per_source: 10.0,
            audit_interval_secs: 60,
            idle_timeout_secs: 60,
            h2_keepalive_secs: 20,
        }
    }
}

fn invalid(key: &'static str, why: &str) -> ConfigError {
    ConfigError::Invalid {
        key,
        detail: why.to_owned(),
    }
}

impl HttpsSettings {
    /// Check the values.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let rates = [
            (
                "https.enroll_per_source_per_sec",
                self.enroll_per_source_per_sec,
            ),
            (
                "https.renew_per_source_per_sec",
                self.renew_per_source_per_sec,
            ),
            (
                "https.admin_auth_failures_per_source_per_sec",
                self.admin_auth_failures_per_source_per_sec,
            ),
        ];
        for (key, v) in rates {
            if !(v.is_finite() && v >= 1e-6) {
                return Err(invalid(key, "must be a number of at least 0.000001"));
            }
        }
        let bursts = [
            (
                "https.enroll_burst_per_source",
                self.enroll_burst_per_source,
            ),
            ("https.renew_burst_per_source", self.renew_burst_per_source),
            (
                "https.admin_auth_failure_burst_per_source",
                self.admin_auth_failure_burst_per_source,
            ),
        ];
        for (key, v) in bursts {
            if !(v.is_finite() && v >= 1.0) {
                return Err(invalid(key, "must be a number of at least 1"));
            }
        }
        if self.idle_timeout_secs == 0 || self.idle_timeout_secs > 86_400 {
            return Err(invalid(
                "https.idle_timeout_secs",
                "must be between 1 and 86400",
            ));
        }
        if self.h2_keepalive_secs == 0 || self.h2_keepalive_secs > 3_600 {
            return Err(invalid(
                "https.h2_keepalive_secs",
                "must be between 1 and 3600",
            ));
        }
        Ok(())
    }

    /// The `https.*` lines of the commented config file.
    pub fn to_commented_toml(&self) -> String {
        format!(
            "\n\
             # ---- HTTPS API (https.*): per-source limits, refusal audit, timeouts. ----\n\
             # Enrolments per second from one source address, and the burst it may make\n\
             # (past it: 429 with Retry-After).\n\
             https.enroll_per_source_per_sec = {eps:?}\n\
             https.enroll_burst_per_source = {eb:?}\n\
             # Renewals per second from one source address, and its burst.\n\
             https.renew_per_source_per_sec = {rps:?}\n\
             https.renew_burst_per_source = {rb:?}\n\
             # Failed admin authentications per second from one source, and its burst.\n\
             https.admin_auth_failures_per_source_per_sec = {aps:?}\n\
             https.admin_auth_failure_burst_per_source = {ab:?}\n\
             # One audit row per source and reason per this many seconds for refusals made\n\
             # before the registry is asked (the row counts the ones left out).\n\
             https.audit_interval_secs = {audit}\n\
             # Close a connection idle this long (HTTP/1 and HTTP/2).\n\
             https.idle_timeout_secs = {idle}\n\
             # HTTP/2 keep-alive PING interval (an unanswered PING closes the connection).\n\
             https.h2_keepalive_secs = {ka}\n",
            eps = self.enroll_per_source_per_sec,
            eb = self.enroll_burst_per_source,
            rps = self.renew_per_source_per_sec,
            rb = self.renew_burst_per_source,
            aps = self.admin_auth_failures_per_source_per_sec,
            ab = self.admin_auth_failure_burst_per_source,
            audit = self.audit_interval_secs,
            idle = self.idle_timeout_secs,
            ka = self.h2_keepalive_secs,
        )
    }
}
