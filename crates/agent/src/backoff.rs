//! Reconnect delays: exponential backoff with full jitter.
//!
//! Attempt `n` waits a uniformly random time in `[0, min(cap, base · 2^n)]` ("full jitter",
//! as in the AWS architecture blog's analysis): when a whole fleet loses its server at once
//! (a power cut, a server restart), the reconnects spread over the whole window instead of
//! arriving in synchronised waves. A refusal that retrying cannot fix soon (revoked or
//! suspended device, untrusted server) waits in `[cap/2, cap]` straight away.

use std::time::Duration;

use rand_core::{OsRng, RngCore};

/// Backoff state of one retry loop.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

/// A uniformly random duration in `[lo, hi]`.
pub fn uniform(lo: Duration, hi: Duration) -> Duration {
    if hi <= lo {
        return lo;
    }
    let span = (hi - lo).as_nanos().min(u128::from(u64::MAX)) as u64;
    let r = OsRng.next_u64() % span.saturating_add(1);
    lo + Duration::from_nanos(r)
}

impl Backoff {
    /// A new backoff: first ceiling `base`, never more than `cap`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base: base.max(Duration::from_millis(1)),
            cap: cap.max(base),
            attempt: 0,
        }
    }

    /// The ceiling of the next delay.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The next delay (full jitter), then grow the ceiling.
    pub fn next_delay(&mut self) -> Duration {
        let d = uniform(Duration::ZERO, self.ceiling());
        self.attempt = self.attempt.saturating_add(1);
        d
    }

    /// A delay at the cap (`[cap/2, cap]`), for refusals that retrying will not fix soon.
    pub fn capped_delay(&mut self) -> Duration {
        self.attempt = 32;
        uniform(self.cap / 2, self.cap)
    }

    /// Forget past failures (after a connection that stayed up).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Number of delays handed out since the last reset.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_with_full_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let mut ceilings = Vec::new();
        for _ in 0..10 {
            let c = b.ceiling();
            let d = b.next_delay();
            assert!(d <= c);
            ceilings.push(c.as_millis());
        }
        assert_eq!(
            ceilings,
            [100, 200, 400, 800, 1600, 2000, 2000, 2000, 2000, 2000]
        );
        // Full jitter: over many draws at the cap, the delays cover the whole window.
        let draws: Vec<Duration> = (0..2000).map(|_| b.next_delay()).collect();
        let lo = draws.iter().filter(|d| d.as_millis() < 200).count();
        let hi = draws.iter().filter(|d| d.as_millis() > 1800).count();
        assert!(lo > 100 && hi > 100, "lo={lo} hi={hi}");
        let mean = draws.iter().map(|d| d.as_secs_f64()).sum::<f64>() / 2000.0;
        assert!((0.85..1.15).contains(&mean), "mean {mean}");
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
        let d = b.capped_delay();
        assert!(d >= Duration::from_secs(1) && d <= Duration::from_secs(2));
        assert_eq!(b.ceiling(), Duration::from_secs(2));
    }
}
