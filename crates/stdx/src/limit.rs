//! Rate limiting without a domain: a token bucket that may go into debt, token buckets per
//! key (a source address and what it asks for), and the audit limiter that keeps refusals from
//! flooding the audit log. The MQTT ingest and the HTTPS API both use them.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Past this many keys, a map forgets the keys whose state is back to its start.
const SOFT_CAP: usize = 10_000;

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
            secs(-self.tokens / self.rate)
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

    /// How long until one token is there (zero when one is).
    pub fn wait_for_one(&mut self, now: Instant) -> Duration {
        self.refill(now);
        if self.tokens >= 1.0 {
            Duration::ZERO
        } else {
            secs((1.0 - self.tokens) / self.rate)
        }
    }

    /// Whether the bucket is full again (its key can be forgotten).
    pub fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.burst
    }
}

/// A duration of `s` seconds, saturating (a rate of 1e-300 must not panic).
fn secs(s: f64) -> Duration {
    if s.is_finite() && s >= 0.0 {
        Duration::try_from_secs_f64(s).unwrap_or(Duration::MAX)
    } else {
        Duration::MAX
    }
}

/// One token bucket per key, all with the same rate and burst: per-source-address limits.
#[derive(Debug)]
pub struct KeyedLimiter<K> {
    rate: f64,
    burst: f64,
    map: Mutex<HashMap<K, TokenBucket>>,
}

impl<K: Hash + Eq + Clone> KeyedLimiter<K> {
    /// `rate` tokens per second and key, at most `burst` stored.
    pub fn new(rate: f64, burst: f64) -> Self {
        Self {
            rate,
            burst,
            map: Mutex::new(HashMap::new()),
        }
    }

    /// Take one token for `key`: `Ok` if there was one, else `Err(wait)` with the time until
    /// there is one (for `Retry-After`).
    pub fn check(&self, key: &K) -> Result<(), Duration> {
        let now = Instant::now();
        let mut map = crate::lock(&self.map);
        if map.len() >= SOFT_CAP {
            map.retain(|_, b| !b.is_full(now));
        }
        let bucket = map
            .entry(key.clone())
            .or_insert_with(|| TokenBucket::new(self.rate, self.burst, now));
        if bucket.try_take(now) {
            Ok(())
        } else {
            Err(bucket.wait_for_one(now))
        }
    }

    /// Whether `key` has a token now, without taking it.
    pub fn would_allow(&self, key: &K) -> Result<(), Duration> {
        let now = Instant::now();
        let mut map = crate::lock(&self.map);
        match map.get_mut(key) {
            None => Ok(()),
            Some(b) => match b.wait_for_one(now) {
                Duration::ZERO => Ok(()),
                wait => Err(wait),
            },
        }
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
        let mut map = crate::lock(&self.map);
        if map.len() >= SOFT_CAP {
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
        // a tiny rate waits "forever" instead of panicking
        let mut b = TokenBucket::new(1e-300, 1.0, t0);
        assert!(b.try_take(t0));
        assert_eq!(b.take(1.0, t0), Duration::MAX);
    }

    #[test]
    fn keyed_limits_are_per_key_and_say_how_long_to_wait() {
        let l = KeyedLimiter::new(2.0, 3.0);
        for _ in 0..3 {
            assert!(l.check(&"a").is_ok());
        }
        let wait = l.check(&"a").unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(500),
            "{wait:?}"
        );
        assert!(l.would_allow(&"a").is_err());
        assert!(l.check(&"b").is_ok(), "other keys are not affected");
        assert!(l.would_allow(&"c").is_ok());
    }

    #[test]
    fn audit_rows_are_aggregated_per_key_and_window() {
        let l = AuditLimiter::new(Duration::from_secs(3600));
        assert_eq!(l.allow("src:a:x"), Some(0));
        assert_eq!(l.allow("src:a:x"), None);
        assert_eq!(l.allow("src:a:x"), None);
        assert_eq!(l.allow("src:b:x"), Some(0));
        let l = AuditLimiter::new(Duration::ZERO);
        assert_eq!(l.allow("k"), Some(0));
        assert_eq!(l.allow("k"), Some(0), "a zero window writes every row");
    }
}
