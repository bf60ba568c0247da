//! Refusals that protect the disk: the free-space watermark of the data dir
//! (`storage.min_free_bytes`) and the per-device byte quota over the retention window
//! (`retention.device_quota_bytes`). Both answer on the hot path from memory: free space is
//! read with one `statvfs` at most every [`DISK_CHECK_EVERY`] (and at once after a failed
//! commit), and the quota is an in-memory byte counter per device and time bucket, seeded once
//! at start from the message store.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devid_store::{DeviceUsage, MessageStore, StoreError};

/// How often the free space is read at most.
pub const DISK_CHECK_EVERY: Duration = Duration::from_millis(100);

/// What the ingest refuses to protect the disk.
#[derive(Debug, Clone, Default)]
pub struct StorageLimits {
    /// The directory whose file system holds the message log (None: no watermark).
    pub data_dir: Option<PathBuf>,
    /// Refuse publishes below this many free bytes (0: never).
    pub min_free_bytes: u64,
    /// Per-device quota: at most this many stored bytes within this window.
    pub quota: Option<(Duration, u64)>,
}

/// The free-space watermark.
#[derive(Debug)]
pub struct DiskGuard {
    path: PathBuf,
    min_free: u64,
    start: Instant,
    /// ms since `start` of the last check (+1; 0: never).
    checked: AtomicU64,
    low: AtomicBool,
    free: AtomicU64,
}

impl DiskGuard {
    /// A guard over the file system of `path`, checked once now.
    pub fn new(path: PathBuf, min_free: u64) -> Self {
        let g = Self {
            path,
            min_free,
            start: Instant::now(),
            checked: AtomicU64::new(0),
            low: AtomicBool::new(false),
            free: AtomicU64::new(u64::MAX),
        };
        g.check_now();
        g
    }

    /// Below the watermark? Reads the free space when the last reading is older than
    /// [`DISK_CHECK_EVERY`] (one caller at a time does), else answers from memory.
    pub fn is_low(&self) -> bool {
        let now = self.start.elapsed().as_millis() as u64 + 1;
        let last = self.checked.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= DISK_CHECK_EVERY.as_millis() as u64
            && self
                .checked
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            self.read();
        }
        self.low.load(Ordering::Acquire)
    }

    /// The last answer, without reading the disk.
    pub fn was_low(&self) -> bool {
        self.low.load(Ordering::Acquire)
    }

    /// Read the free space now (after a failed commit).
    pub fn check_now(&self) {
        let now = self.start.elapsed().as_millis() as u64 + 1;
        self.checked.store(now, Ordering::Relaxed);
        self.read();
    }

    /// Free bytes at the last reading.
    pub fn free_bytes(&self) -> u64 {
        self.free.load(Ordering::Relaxed)
    }

    fn read(&self) {
        match rustix::fs::statvfs(&self.path) {
            Ok(st) => {
                let free = st.f_bavail.saturating_mul(st.f_frsize);
                self.free.store(free, Ordering::Relaxed);
                let low = free < self.min_free;
                let was = self.low.swap(low, Ordering::AcqRel);
                if low && !was {
                    tracing::warn!(
                        free_bytes = free,
                        min_free_bytes = self.min_free,
                        "free disk space below storage.min_free_bytes: refusing publishes (0x97) until it returns"
                    );
                } else if was && !low {
                    tracing::info!(
                        free_bytes = free,
                        "free disk space is back above storage.min_free_bytes: accepting publishes"
                    );
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, path = %self.path.display(), "cannot read the free disk space")
            }
        }
    }
}

/// One device's bytes per time bucket, oldest first.
#[derive(Debug, Default)]
struct Usage {
    buckets: VecDeque<(i64, u64)>,
    total: u64,
}

impl Usage {
    fn expire(&mut self, before_ms: i64) {
        while let Some(&(start, bytes)) = self.buckets.front() {
            if start >= before_ms {
                break;
            }
            self.total = self.total.saturating_sub(bytes);
            self.buckets.pop_front();
        }
    }

    fn add(&mut self, bucket: i64, bytes: u64) {
        match self.buckets.back_mut() {
            Some((b, n)) if *b == bucket => *n += bytes,
            Some((b, _)) if *b > bucket => {
                // seeding out of order: keep the buckets sorted
                let at = self.buckets.partition_point(|(s, _)| *s < bucket);
                match self.buckets.get_mut(at) {
                    Some((s, n)) if *s == bucket => *n += bytes,
                    _ => self.buckets.insert(at, (bucket, bytes)),
                }
            }
            _ => self.buckets.push_back((bucket, bytes)),
        }
        self.total += bytes;
    }
}

/// The per-device byte quota over a sliding window.
#[derive(Debug)]
pub struct Quota {
    window_ms: i64,
    bucket_ms: i64,
    limit: u64,
    devices: Mutex<HashMap<Arc<str>, Usage>>,
}

impl Quota {
    /// At most `limit` bytes per device within `window`.
    pub fn new(window: Duration, limit: u64) -> Self {
        let window_ms = i64::try_from(window.as_millis()).unwrap_or(i64::MAX).max(1);
        Self {
            window_ms,
            bucket_ms: (window_ms / 64).clamp(1_000, 3_600_000),
            limit,
            devices: Mutex::new(HashMap::new()),
        }
    }

    /// Width of a bucket, ms.
    pub fn bucket_ms(&self) -> i64 {
        self.bucket_ms
    }

    /// Count what the store already holds (once, at start).
    pub fn seed(&self, rows: &[DeviceUsage]) {
        let mut map = devid_stdx::lock(&self.devices);
        for r in rows {
            let bucket = r.bucket_ms.div_euclid(self.bucket_ms) * self.bucket_ms;
            map.entry(Arc::from(r.device_id.as_str()))
                .or_default()
                .add(bucket, r.bytes);
        }
    }

    /// Seed from `store`: what it holds within the window.
    pub fn seed_from(&self, store: &dyn MessageStore, now_ms: i64) -> Result<usize, StoreError> {
        let rows = store.usage_since(now_ms.saturating_sub(self.window_ms), self.bucket_ms)?;
        self.seed(&rows);
        Ok(rows.len())
    }

    /// Charge `bytes` to `device` at `now_ms` if that keeps it within its quota; false
    /// (nothing charged) when it would not.
    pub fn charge(&self, device: &Arc<str>, bytes: u64, now_ms: i64) -> bool {
        let mut map = devid_stdx::lock(&self.devices);
        let usage = match map.get_mut(&**device) {
            Some(u) => u,
            None => map.entry(device.clone()).or_default(),
        };
        // a bucket ages out once all of it is older than the window
        usage.expire(
            now_ms
                .saturating_sub(self.window_ms)
                .saturating_sub(self.bucket_ms)
                + 1,
        );
        if usage.total.saturating_add(bytes) > self.limit {
            return false;
        }
        usage.add(now_ms.div_euclid(self.bucket_ms) * self.bucket_ms, bytes);
        true
    }

    /// Bytes `device` has within the window (tests, metrics).
    pub fn used(&self, device: &str) -> u64 {
        devid_stdx::lock(&self.devices)
            .get(device)
            .map_or(0, |u| u.total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_quota_slides_with_time() {
        let q = Quota::new(Duration::from_secs(64), 1000);
        let d: Arc<str> = Arc::from("d");
        let e: Arc<str> = Arc::from("e");
        assert!(q.charge(&d, 600, 10_000));
        assert!(!q.charge(&d, 600, 11_000), "over the quota");
        assert!(q.charge(&e, 600, 11_000), "another device is not affected");
        assert!(q.charge(&d, 400, 12_000));
        // the first 600 bytes age out after the window
        assert!(!q.charge(&d, 500, 10_000 + 64_000));
        assert!(q.charge(&d, 500, 10_000 + 64_000 + 1_001));
        assert_eq!(q.used("d"), 900);
    }

    #[test]
    fn seeding_counts_stored_bytes() {
        let q = Quota::new(Duration::from_secs(64), 1000);
        q.seed(&[
            DeviceUsage {
                device_id: "d".into(),
                bucket_ms: 5_000,
                bytes: 700,
            },
            DeviceUsage {
                device_id: "d".into(),
                bucket_ms: 3_000,
                bytes: 200,
            },
        ]);
        assert_eq!(q.used("d"), 900);
        let d: Arc<str> = Arc::from("d");
        assert!(!q.charge(&d, 200, 6_000));
        assert!(q.charge(&d, 100, 6_000));
    }
}
