//! Rate limits: a token bucket (per device: messages and bytes), the per-source-address
//! handshake limiter, and the audit limiter that keeps refusals from flooding the audit log.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A token bucket that may go into debt: taking more than is there succeeds and returns how
/// long the caller must wait before the next take (so one large message is never refused, it
/// only slows the sender down).
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// Full bucket: `rate` tokens per second, at most `burst` stored.
    pub fn new(rate: f64, burst: f64, now: Instant) -> Self {
        Self {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
    }

    /// Take `n` tokens; returns the wait before the balance is positive again (zero when
    /// there was enough).
    pub fn take(&mut self, n: f64, now: Instant) -> Duration {
        self.refill(now);
        self.tokens -= n;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }

    /// Take one token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.burst
    }
}

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

/// At most one audit row per key (device or source, and reason) per window; the row that is
/// written says how many were left out before it.
#[derive(Debug)]
pub struct AuditLimiter {
    window: Duration,
    map: Mutex<HashMap<String, (Instant, u64)>>,
}

impl AuditLimiter {
    /// A limiter with the given window.
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            map: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(suppressed_before)` when a row for `key` should be written now.
    pub fn allow(&self, key: &str) -> Option<u64> {
        let now = Instant::now();
        let mut map = match self.map.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        if map.len() >= SOURCE_MAP_SOFT_CAP {
            let window = self.window;
            map.retain(|_, (t, n)| *n > 0 || now.saturating_duration_since(*t) < window);
        }
        match map.get_mut(key) {
            Some((t, n)) if now.saturating_duration_since(*t) < self.window => {
                *n += 1;
                None
            }
            Some((t, n)) => {
                let suppressed = *n;
                *t = now;
                *n = 0;
                Some(suppressed)
            }
            None => {
                map.insert(key.to_owned(), (now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_debt_and_refill() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 5.0, t0);
        for _ in 0..5 {
            assert_eq!(b.take(1.0, t0), Duration::ZERO);
        }
        let wait = b.take(1.0, t0);
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-6, "{wait:?}");
        // after 1 s: +10 tokens, capped at 5, minus the debt of 1 taken before
        assert_eq!(b.take(1.0, t0 + Duration::from_secs(1)), Duration::ZERO);
        let mut b = TokenBucket::new(1.0, 1.0, t0);
        assert!(b.try_take(t0));
        assert!(!b.try_take(t0));
        assert!(b.try_take(t0 + Duration::from_secs(1)));
    }

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
        let l = AuditLimiter::new(Duration::from_millis(50));
        assert_eq!(l.allow("a"), Some(0));
        assert_eq!(l.allow("a"), None);
        assert_eq!(l.allow("a"), None);
        assert_eq!(l.allow("b"), Some(0));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(l.allow("a"), Some(2));
    }
}
