//! Per-source-address limits of the HTTPS API (`https.*`): token buckets for enrolment,
//! renewal and failed admin authentication, and the aggregation of refusal audit rows.

use std::net::IpAddr;
use std::time::Duration;

use devid_server_config::HttpsSettings;
use devid_stdx::limit::{AuditLimiter, KeyedLimiter};

/// The limits one HTTPS listener applies.
#[derive(Debug)]
pub struct HttpLimits {
    pub(crate) enroll: KeyedLimiter<IpAddr>,
    pub(crate) renew: KeyedLimiter<IpAddr>,
    pub(crate) admin_failures: KeyedLimiter<IpAddr>,
    pub(crate) audit: AuditLimiter,
}

impl HttpLimits {
    /// Limits from the `https.*` settings.
    pub fn new(s: &HttpsSettings) -> Self {
        Self {
            enroll: KeyedLimiter::new(s.enroll_per_source_per_sec, s.enroll_burst_per_source),
            renew: KeyedLimiter::new(s.renew_per_source_per_sec, s.renew_burst_per_source),
            admin_failures: KeyedLimiter::new(
                s.admin_auth_failures_per_source_per_sec,
                s.admin_auth_failure_burst_per_source,
            ),
            audit: AuditLimiter::new(Duration::from_secs(s.audit_interval_secs)),
        }
    }
}
