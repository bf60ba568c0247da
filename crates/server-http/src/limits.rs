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

/// Counters of the HTTPS API that `GET /metrics` shows beside the ingest's (OpenMetrics text
/// the composition root appends).
#[derive(Debug, Default)]
pub struct HttpMetrics {
    /// Authenticated admin requests: [admin read, admin change, read-only read, read-only
    /// change refused].
    admin_requests: [std::sync::atomic::AtomicU64; 4],
}

impl HttpMetrics {
    pub(crate) fn admin_request(&self, read_only: bool, changes: bool) {
        let i = usize::from(read_only) * 2 + usize::from(changes);
        self.admin_requests[i].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// The counters as OpenMetrics text (no `# EOF`).
    pub fn encode(&self) -> String {
        let n = |i: usize| self.admin_requests[i].load(std::sync::atomic::Ordering::Relaxed);
        format!(
            "# HELP devid_admin_requests_total Authenticated admin API requests by the credential's \
             role and whether they read or asked to change state.\n\
             # TYPE devid_admin_requests_total counter\n\
             devid_admin_requests_total{{role=\"admin\",kind=\"read\"}} {}\n\
             devid_admin_requests_total{{role=\"admin\",kind=\"change\"}} {}\n\
             devid_admin_requests_total{{role=\"read-only\",kind=\"read\"}} {}\n\
             devid_admin_requests_total{{role=\"read-only\",kind=\"change\"}} {}\n",
            n(0),
            n(1),
            n(2),
            n(3)
        )
    }
}
