//! Rate limits: the per-source-address handshake limiter; the token bucket (per device:
//! messages and bytes) and the audit limiter that keeps refusals from flooding the audit log
//! are `devid_stdx::limit`'s, shared with the HTTPS API.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

pub use devid_stdx::limit::{AuditLimiter, TokenBucket};

/// Why a source address was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceRefusal {
    /// Too many new connections per second.
    Rate,
    /// Too many handshakes in progress.
    Pending,
}

#[derive(Debug)]
struct SourceState {
    bucket: TokenBucket,
    pending: usize,
}

/// Per-source-address limits on new connections: a token bucket for the rate and a cap on
/// handshakes in progress, so a flood (or slowloris) from one address cannot starve the fleet.
#[derive(Debug)]
pub struct SourceLimiter {
    rate: f64,
    burst: f64,
    max_pending: usize,
    map: Mutex<HashMap<IpAddr, SourceState>>,
}

/// Holds one pending-handshake slot of a source address until dropped.
#[derive(Debug)]
pub struct SourceSlot {
    limiter: Arc<SourceLimiter>,
    ip: IpAddr,
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        if let Ok(mut map) = self.limiter.map.lock() {
            if let Some(s) = map.get_mut(&self.ip) {
                s.pending = s.pending.saturating_sub(1);
            }
        }
    }
}

const SOURCE_MAP_SOFT_CAP: usize = 10_000;

impl SourceLimiter {
    /// A limiter with the given rate, burst and pending cap per address.
    pub fn new(rate: f64, burst: f64, max_pending: usize) -> Arc<Self> {
        Arc::new(Self {
            rate,
            burst,
            max_pending,
            map: Mutex::new(HashMap::new()),
        })
    }

    /// Admit a new connection from `ip`, or say why not.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<SourceSlot, SourceRefusal> {
        let now = Instant::now();
        let mut map = match self.map.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        if map.len() >= SOURCE_MAP_SOFT_CAP {
            map.retain(|_, s| s.pending > 0 || !s.bucket.is_full(now));
        }
        let state = map.entry(ip).or_insert_with(|| SourceState {
            bucket: TokenBucket::new(self.rate, self.burst, now),
            pending: 0,
        });
        if state.pending >= self.max_pending {
            return Err(SourceRefusal::Pending);
        }
        if !state.bucket.try_take(now) {
            return Err(SourceRefusal::Rate);
        }
        state.pending += 1;
        Ok(SourceSlot {
            limiter: self.clone(),
            ip,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_limiter_rate_and_pending() {
        let l = SourceLimiter::new(1.0, 3.0, 2);
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let other: IpAddr = "127.0.0.2".parse().unwrap();
        let a = l.admit(ip).unwrap();
        let _b = l.admit(ip).unwrap();
        assert_eq!(l.admit(ip).unwrap_err(), SourceRefusal::Pending);
        assert!(l.admit(other).is_ok(), "other addresses are not affected");
        drop(a);
        let _c = l.admit(ip).unwrap();
        drop(_c);
        assert_eq!(l.admit(ip).unwrap_err(), SourceRefusal::Rate);
    }

    #[test]
    fn audit_limiter_counts_suppressed() {
        let l = AuditLimiter::new(std::time::Duration::from_millis(50));
        assert_eq!(l.allow("a"), Some(0));
        assert_eq!(l.allow("a"), None);
        assert_eq!(l.allow("a"), None);
        assert_eq!(l.allow("b"), Some(0));
        std::thread::sleep(std::time::Duration::from_millis(60));
        assert_eq!(l.allow("a"), Some(2));
    }
}
