//! The disk is protected from the devices (review M2): a free-disk watermark
//! (`storage.min_free_bytes`) below which publishes are refused with 0x97 and nothing is
//! acknowledged that was not stored, recovering without a restart; a full disk that makes
//! commits fail no longer wedges the writer; a per-device byte quota over the retention window;
//! and retention that deletes whole old log segments and their index rows.
//!
//! The disk tests put the data dir on a small tmpfs (`mount -t tmpfs -o size=20m`: they need
//! root) and fill it with a filler file; the mount is removed on drop, also after a failure.
#![allow(clippy::unwrap_used)]

mod common;
mod ingest_support;

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::Server;
use devid_mqtt::Protocol;
use ingest_support::*;

/// A tmpfs of `size` mounted on a fresh directory; unmounted and removed on drop.
struct Tmpfs {
    dir: PathBuf,
    _parent: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Self {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("fs");
        std::fs::create_dir(&dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700")])
            .arg("devid-test")
            .arg(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount -t tmpfs failed (these tests need root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs {
            dir,
            _parent: parent,
        }
    }

    /// Free bytes (as `df` says).
    fn free(&self) -> u64 {
        let out = Command::new("df")
            .args(["-B1", "--output=avail"])
            .arg(&self.dir)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// Grow the filler file until only `leave` bytes are free (0: until the disk is full).
    fn fill(&self, leave: u64) {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("filler"))
            .unwrap();
        let chunk = vec![0xA5u8; 64 << 10];
        loop {
            let free = self.free();
            if free <= leave {
                return;
            }
            let n = (free - leave).min(chunk.len() as u64) as usize;
            if leave == 0 {
                if f.write_all(&chunk[..n]).is_err() {
                    return; // ENOSPC: full
                }
            } else {
                f.write_all(&chunk[..n]).unwrap();
            }
        }
    }

    fn unfill(&self) {
        std::fs::remove_file(self.dir.join("filler")).unwrap();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Publish QoS 1 with msg-id `id` and the next packet id; the PUBACK reason (None: closed).
async fn pub1(
    c: &mut Client,
    topic: &str,
    pid: &mut u16,
    payload: &[u8],
    id: String,
) -> (String, Option<u8>) {
    *pid = pid.wrapping_add(1).max(1);
    let r = c.publish_qos1(topic, *pid, payload, Some(&id)).await;
    (id, r)
}

fn stored_ids(s: &Server, dev: &str) -> HashSet<String> {
    all_messages(s, dev)
        .into_iter()
        .filter_map(|m| m.msg_id)
        .collect()
}

/// Below the watermark every publish gets 0x97 (3.1.1: the connection is closed), nothing
/// acknowledged is lost, and once space returns publishing works again without a restart.
#[test]
fn below_the_free_disk_watermark_publishes_get_0x97_and_recover_without_restart() {
    let fs = Tmpfs::mount("20m");
    let s = Server::start_at(
        &fs.dir.join("data"),
        &format!(
            "{FAST}\nstorage.min_free_bytes = {}\nstorage.segment_bytes = {}",
            4 << 20,
            1 << 20
        ),
    );
    let dev = enrol(&s, "filler", "default");
    let topic = dev.topic("telemetry/t");
    let payload = [b'p'; 200];
    let rt = runtime();
    let mut acked: Vec<String> = Vec::new();
    let mut refused: Vec<String> = Vec::new();
    let mut pid = 0u16;
    let (recovery, first_refusal) = rt.block_on(async {
        let mut c = Client::connect_ok(s.mqtt_port, &s.ca_pem_path(), &dev, Protocol::V5).await;
        for i in 0..10 {
            let (id, r) = pub1(&mut c, &topic, &mut pid, &payload, format!("a-{i}")).await;
            assert_eq!(r, Some(0), "{id} with space free");
            acked.push(id);
        }
        // below the watermark (4 MiB), still 2 MiB free
        fs.fill(2 << 20);
        let filled = Instant::now();
        let mut first_refusal = None;
        for i in 0..200 {
            let (id, r) = pub1(&mut c, &topic, &mut pid, &payload, format!("b-{i}")).await;
            match r {
                Some(0) => acked.push(id),
                Some(0x97) => {
                    first_refusal.get_or_insert(filled.elapsed());
                    refused.push(id);
                }
                other => panic!("{id}: {other:?}"),
            }
            if refused.len() >= 5 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(refused.len(), 5, "five refusals below the watermark");
        // MQTT 3.1.1 cannot refuse in a PUBACK: the server closes the connection
        let mut v3 = Client::connect_ok(s.mqtt_port, &s.ca_pem_path(), &dev, Protocol::V311).await;
        assert_eq!(
            v3.publish_qos1(&topic, 1, &payload, Some("v3-0")).await,
            None,
            "3.1.1 publish below the watermark: connection closed"
        );
        refused.push("v3-0".into());
        // the v5 session was taken over by the 3.1.1 one; connect again
        let mut c = Client::connect_ok(s.mqtt_port, &s.ca_pem_path(), &dev, Protocol::V5).await;
        // completely full
        fs.fill(0);
        for i in 0..5 {
            let (id, r) = pub1(&mut c, &topic, &mut pid, &payload, format!("c-{i}")).await;
            assert_eq!(r, Some(0x97), "{id} on a full disk");
            refused.push(id);
        }
        // space returns: publishing works again, same process
        fs.unfill();
        let freed = Instant::now();
        let mut n = 0;
        let recovery = loop {
            let (id, r) = pub1(&mut c, &topic, &mut pid, &payload, format!("d-{n}")).await;
            n += 1;
            match r {
                Some(0) => {
                    acked.push(id);
                    break freed.elapsed();
                }
                Some(0x97) => refused.push(id),
                other => panic!("{id}: {other:?}"),
            }
            assert!(freed.elapsed() < Duration::from_secs(10), "no recovery");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        for i in 0..10 {
            let (id, r) = pub1(&mut c, &topic, &mut pid, &payload, format!("e-{i}")).await;
            assert_eq!(r, Some(0), "{id} after recovery");
            acked.push(id);
        }
        (recovery, first_refusal)
    });
    let stored = stored_ids(&s, "filler");
    let lost: Vec<&String> = acked.iter().filter(|k| !stored.contains(*k)).collect();
    assert!(lost.is_empty(), "acknowledged but not stored: {lost:?}");
    let ghost: Vec<&String> = refused.iter().filter(|k| stored.contains(*k)).collect();
    assert!(ghost.is_empty(), "refused but stored: {ghost:?}");
    let m = metrics(&s);
    assert!(
        metric(
            &m,
            "devid_mqtt_storage_refusals_total{reason=\"disk_full\"}"
        )
        .unwrap_or(0.0)
            >= 11.0,
        "{m}"
    );
    wait_audit(&s, "mqtt.publish", "disk_full");
    eprintln!(
        "watermark 4 MiB on a 20 MiB tmpfs: first 0x97 {:?} after the disk went below it; \
         {} acked, {} refused (0x97 / 3.1.1 closed), all acked stored; publishing again \
         {recovery:?} after the filler was deleted",
        first_refusal.unwrap(),
        acked.len(),
        refused.len()
    );
    devid_testkit::robust::Report::new("server_disk_watermark")
        .text("threats", "T12b")
        .num("acked", acked.len() as f64)
        .num("acked_stored", acked.len() as f64)
        .num("refused", refused.len() as f64)
        .num("refused_stored", 0)
        .num("duplicates", 0)
        .num("recovered_ms", recovery.as_secs_f64() * 1000.0)
        .emit();
}

/// Without a watermark a full disk makes the commit fail: those publishes are not
/// acknowledged (0x80), and once space returns the message log repairs itself and the
/// same process acknowledges again (the old writer refused every append until a restart).
#[test]
fn a_full_disk_fails_commits_and_the_writer_recovers_without_restart() {
    let fs = Tmpfs::mount("20m");
    let s = Server::start_at(
        &fs.dir.join("data"),
        &format!("{FAST}\nstorage.min_free_bytes = 0"),
    );
    let dev = enrol(&s, "full", "default");
    let topic = dev.topic("telemetry/t");
    let payload = vec![b'q'; 4096];
    let rt = runtime();
    let (acked, failed, recovery) = rt.block_on(async {
        let mut c = Client::connect_ok(s.mqtt_port, &s.ca_pem_path(), &dev, Protocol::V5).await;
        let mut acked = Vec::new();
        let mut failed = Vec::new();
        let mut pid = 0u16;
        for i in 0..10 {
            pid += 1;
            let id = format!("a-{i}");
            assert_eq!(
                c.publish_qos1(&topic, pid, &payload, Some(&id)).await,
                Some(0)
            );
            acked.push(id);
        }
        fs.fill(0);
        for i in 0..5 {
            pid += 1;
            let id = format!("b-{i}");
            let r = c.publish_qos1(&topic, pid, &payload, Some(&id)).await;
            assert!(
                matches!(r, Some(0x80) | Some(0x97)),
                "{id} on a full disk: {r:?}"
            );
            failed.push(id);
        }
        fs.unfill();
        let freed = Instant::now();
        let mut n = 0;
        let recovery = loop {
            pid += 1;
            let id = format!("c-{n}");
            n += 1;
            match c.publish_qos1(&topic, pid, &payload, Some(&id)).await {
                Some(0) => {
                    acked.push(id);
                    break freed.elapsed();
                }
                r => {
                    assert!(
                        freed.elapsed() < Duration::from_secs(10),
                        "still refused 10 s after space returned: {r:?}"
                    );
                    failed.push(id);
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        for i in 0..10 {
            pid += 1;
            let id = format!("d-{i}");
            assert_eq!(
                c.publish_qos1(&topic, pid, &payload, Some(&id)).await,
                Some(0)
            );
            acked.push(id);
        }
        (acked, failed, recovery)
    });
    let stored = stored_ids(&s, "full");
    for k in &acked {
        assert!(stored.contains(k), "{k} acknowledged but not stored");
    }
    for k in &failed {
        assert!(!stored.contains(k), "{k} refused but stored");
    }
    eprintln!(
        "full disk, no watermark: {} publishes refused while full, acks again {recovery:?} \
         after space returned, {} acked all stored",
        failed.len(),
        acked.len()
    );
    devid_testkit::robust::Report::new("server_disk_full")
        .text("threats", "T12b")
        .num("acked", acked.len() as f64)
        .num("acked_stored", acked.len() as f64)
        .num("refused", failed.len() as f64)
        .num("refused_stored", 0)
        .num("duplicates", 0)
        .num("recovered_ms", recovery.as_secs_f64() * 1000.0)
        .emit();
}

/// A device past its quota gets 0x97 (3.1.1: closed) while another keeps publishing; the
/// counter survives a restart (seeded from the index) and the device is served again once its
/// old messages age out of the window.
#[test]
fn a_device_over_its_quota_gets_0x97_until_its_old_data_ages_out() {
    let mut s = Server::start_with_config(
        &[],
        &format!(
            "{FAST}\nretention.max_age = \"10s\"\nretention.device_quota_bytes = 3000\n\
             retention.sweep_interval_secs = 1"
        ),
    );
    let hog = enrol(&s, "hog", "default");
    let calm = enrol(&s, "calm", "default");
    let payload = [b'h'; 200];
    let rt = runtime();
    let (accepted, first_ok) = rt.block_on(async {
        let mut c = Client::connect_ok(s.mqtt_port, &s.ca_pem_path(), &hog, Protocol::V5).await;
        let mut accepted = 0;
        let mut first_ok = None;
        let mut refused = false;
        for i in 1..=40u16 {
            match c
                .publish_qos1(
                    &hog.topic("telemetry/t"),
                    i,
                    &payload,
                    Some(&format!("h-{i}")),
                )
                .await
            {
                Some(0) => {
                    first_ok.get_or_insert_with(Instant::now);
                    accepted += 1;
                }
                Some(0x97) => {
                    refused = true;
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(refused, "the quota was never reached");
        let mut d = Client::connect_ok(s.mqtt_port, &s.ca_pem_path(), &calm, Protocol::V5).await;
        for i in 1..=5u16 {
            assert_eq!(
                d.publish_qos1(
                    &calm.topic("telemetry/t"),
                    i,
                    &payload,
                    Some(&format!("c-{i}"))
                )
                .await,
                Some(0),
                "another device is not affected"
            );
        }
        assert_eq!(
            c.publish_qos1(&hog.topic("telemetry/t"), 100, &payload, Some("h-100"))
                .await,
            Some(0x97)
        );
        let mut v3 = Client::connect_ok(s.mqtt_port, &s.ca_pem_path(), &hog, Protocol::V311).await;
        assert_eq!(
            v3.publish_qos1(&hog.topic("telemetry/t"), 1, &payload, Some("h-v3"))
                .await,
            None,
            "3.1.1 over quota: closed"
        );
        (accepted, first_ok.unwrap())
    });
    // 266 bytes counted per message: 11 fit in 3000
    assert_eq!(accepted, 11);
    wait_audit(&s, "mqtt.publish", "quota_exceeded");
    let m = metrics(&s);
    assert!(
        metric(
            &m,
            "devid_mqtt_storage_refusals_total{reason=\"quota_exceeded\"}"
        )
        .unwrap_or(0.0)
            >= 2.0,
        "{m}"
    );
    // a restart does not reset the counter
    s.restart();
    rt.block_on(async {
        let mut c = Client::connect_ok(s.mqtt_port, &s.ca_pem_path(), &hog, Protocol::V5).await;
        assert!(first_ok.elapsed() < Duration::from_secs(9), "test too slow");
        assert_eq!(
            c.publish_qos1(
                &hog.topic("telemetry/t"),
                1,
                &payload,
                Some("h-after-restart")
            )
            .await,
            Some(0x97),
            "still over quota after a restart"
        );
        let mut pid = 1;
        let served = loop {
            pid += 1;
            tokio::time::sleep(Duration::from_millis(250)).await;
            match c
                .publish_qos1(
                    &hog.topic("telemetry/t"),
                    pid,
                    &payload,
                    Some(&format!("w-{pid}")),
                )
                .await
            {
                Some(0) => break first_ok.elapsed(),
                Some(0x97) => {}
                other => panic!("{other:?}"),
            }
            assert!(
                first_ok.elapsed() < Duration::from_secs(20),
                "never served again"
            );
        };
        assert!(
            served >= Duration::from_secs(8),
            "served again too early: {served:?}"
        );
        eprintln!("quota 3000 B / 10 s: 11 accepted, refused until {served:?} after the first");
    });
    assert!(stored_ids(&s, "calm").len() == 5);
}

fn segments(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("seg-"))
        .collect();
    v.sort();
    v
}

/// With a short `retention.max_age` whole old segments go, with their index rows; the
/// listing keeps the recent messages.
#[test]
fn retention_deletes_old_segments_and_their_index_rows() {
    let s = Server::start_with_config(
        &[],
        &format!(
            "{FAST}\nretention.max_age = \"3s\"\nretention.sweep_interval_secs = 1\n\
             storage.segment_bytes = 65536\nmqtt.max_payload_bytes = 1024"
        ),
    );
    let dev = enrol(&s, "old", "default");
    let log_dir = s.dir.join("devid-server.msglog");
    let payload = [b'r'; 1000];
    let rt = runtime();
    rt.block_on(async {
        let mut c = Client::connect_ok(s.mqtt_port, &s.ca_pem_path(), &dev, Protocol::V5).await;
        for i in 1..=300u16 {
            assert_eq!(
                c.publish_qos1(
                    &dev.topic("telemetry/t"),
                    i,
                    &payload,
                    Some(&format!("old-{i}"))
                )
                .await,
                Some(0)
            );
        }
    });
    let before = segments(&log_dir);
    assert!(before.len() >= 4, "{before:?}");
    assert_eq!(all_messages(&s, "old").len(), 300);
    std::thread::sleep(Duration::from_secs(4));
    rt.block_on(async {
        let mut c = Client::connect_ok(s.mqtt_port, &s.ca_pem_path(), &dev, Protocol::V5).await;
        for i in 1..=100u16 {
            assert_eq!(
                c.publish_qos1(
                    &dev.topic("telemetry/t"),
                    i,
                    &payload,
                    Some(&format!("new-{i}"))
                )
                .await,
                Some(0)
            );
        }
    });
    let start = Instant::now();
    let (listed, after) = loop {
        let listed = stored_ids(&s, "old");
        let old = listed.iter().filter(|k| k.starts_with("old-")).count();
        // at most the one segment that holds both old and new messages keeps old ones
        if old <= 70 {
            break (listed, segments(&log_dir));
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "{old} old messages still listed; segments {:?}",
            segments(&log_dir)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    for i in 1..=100 {
        assert!(listed.contains(&format!("new-{i}")), "new-{i} kept");
    }
    for i in 1..=200 {
        assert!(!listed.contains(&format!("old-{i}")), "old-{i} deleted");
    }
    assert!(!after.contains(&before[0]), "{before:?} -> {after:?}");
    eprintln!(
        "retention 3 s: segments {} -> {} ({:?} after the new messages), {} listed",
        before.len(),
        after.len(),
        start.elapsed(),
        listed.len()
    );
}

/// The same quota and retention on PostgreSQL: the counter is seeded from `messages` after a
/// restart, and batched deletes remove the rows older than `retention.max_age`.
#[test]
fn on_postgres_the_quota_survives_a_restart_and_old_rows_are_deleted() {
    let pg = devid_testkit::postgres::PgCluster::start();
    let url = pg.url();
    let mut s = Server::start_with_config(
        &["--db", &url],
        &format!(
            "{FAST}\nretention.max_age = \"6s\"\nretention.device_quota_bytes = 3000\n\
             retention.sweep_interval_secs = 1"
        ),
    );
    let hog = enrol(&s, "pghog", "default");
    let payload = [b'h'; 200];
    let rt = runtime();
    let first = Instant::now();
    let accepted = rt.block_on(async {
        let mut c = Client::connect_ok(s.mqtt_port, &s.ca_pem_path(), &hog, Protocol::V5).await;
        let mut accepted = 0;
        for i in 1..=40u16 {
            match c
                .publish_qos1(
                    &hog.topic("telemetry/t"),
                    i,
                    &payload,
                    Some(&format!("h-{i}")),
                )
                .await
            {
                Some(0) => accepted += 1,
                Some(0x97) => break,
                other => panic!("{other:?}"),
            }
        }
        accepted
    });
    // 268 bytes per message with this longer device id: 11 fit in 3000
    assert_eq!(accepted, 11);
    assert_eq!(stored_ids(&s, "pghog").len(), 11);
    s.restart();
    let served = rt.block_on(async {
        let mut c = Client::connect_ok(s.mqtt_port, &s.ca_pem_path(), &hog, Protocol::V5).await;
        assert_eq!(
            c.publish_qos1(
                &hog.topic("telemetry/t"),
                1,
                &payload,
                Some("after-restart")
            )
            .await,
            Some(0x97),
            "still over quota after a restart (seeded from PostgreSQL)"
        );
        let mut pid = 1;
        loop {
            pid += 1;
            tokio::time::sleep(Duration::from_millis(250)).await;
            match c
                .publish_qos1(
                    &hog.topic("telemetry/t"),
                    pid,
                    &payload,
                    Some(&format!("w-{pid}")),
                )
                .await
            {
                Some(0) => break first.elapsed(),
                Some(0x97) => {}
                other => panic!("{other:?}"),
            }
            assert!(
                first.elapsed() < Duration::from_secs(20),
                "never served again"
            );
        }
    });
    assert!(served >= Duration::from_secs(6), "{served:?}");
    let start = Instant::now();
    loop {
        let ids = stored_ids(&s, "pghog");
        if !ids.iter().any(|k| k.starts_with("h-")) {
            assert_eq!(ids.len(), 1, "{ids:?}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "old rows kept: {ids:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "PostgreSQL: quota seeded after restart, served again after {served:?}, old rows deleted"
    );
}
