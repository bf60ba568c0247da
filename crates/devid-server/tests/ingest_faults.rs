//! Issue 15: a failed `fdatasync` of the message log is fatal (PostgreSQL's rule after
//! "fsyncgate": after a failed fsync the kernel may have dropped the dirty pages and cleared
//! the error, so a retry that succeeds proves nothing). An `LD_PRELOAD` shim
//! (`tests/faults/faultsync.c`, built here with the system `cc`) makes the N-th `fdatasync` /
//! `fsync` of a log segment fail with EIO, once (a transient error, the tempting one to retry)
//! or for good. The server must acknowledge nothing of the failed batch, log why, and exit
//! non-zero; restarted without the shim it holds every message any device saw acknowledged,
//! none twice, and takes new messages.
#![allow(clippy::unwrap_used)]

mod common;
mod ingest_support;

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Server;
use devid_mqtt::Protocol;
use ingest_support::*;

/// Build the shim into `dir`.
fn build_shim(dir: &Path) -> PathBuf {
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/faults/faultsync.c");
    let out = dir.join("libfaultsync.so");
    let st = Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-Wall", "-o"])
        .arg(&out)
        .arg(src)
        .arg("-ldl")
        .status()
        .expect("cc (gcc) is needed to build the fault shim: apt-get install gcc");
    assert!(st.success(), "building the fault shim failed");
    out
}

const DEVICES: usize = 4;

fn one_fault(shim: &Path, times: Option<u32>, after: u32) -> (usize, usize, Duration) {
    let marks = tempfile::tempdir().unwrap();
    let mark = marks.path().join("faults");
    let mut env: Vec<(String, OsString)> = vec![
        ("LD_PRELOAD".into(), shim.into()),
        ("FAULT_SYNC_MATCH".into(), ".msglog/seg-".into()),
        ("FAULT_SYNC_AFTER".into(), after.to_string().into()),
        ("FAULT_SYNC_MARK".into(), mark.clone().into()),
    ];
    if let Some(t) = times {
        env.push(("FAULT_SYNC_TIMES".into(), t.to_string().into()));
    }
    let mut s = Server::start_env_config(&[], &env, FAST);
    let devs: Vec<Device> = (0..DEVICES)
        .map(|i| enrol(&s, &format!("sync-{i}"), "default"))
        .collect();
    let progress = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (port, ca, devs, progress, stop) = (
            s.mqtt_port,
            s.ca_pem_path(),
            devs.clone(),
            progress.clone(),
            stop.clone(),
        );
        std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async move {
                let tasks: Vec<_> = devs
                    .into_iter()
                    .map(|d| {
                        let (ca, progress, stop) = (ca.clone(), progress.clone(), stop.clone());
                        tokio::spawn(async move {
                            let id = d.id.clone();
                            let run =
                                pipelined(port, ca, d, 1_000_000, progress, stop, "f", 16).await;
                            (id, run)
                        })
                    })
                    .collect();
                let mut out = Vec::new();
                for t in tasks {
                    out.push(t.await.unwrap());
                }
                out
            })
        })
    };
    // the fault fires ...
    let start = Instant::now();
    while !mark.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the fault never fired ({} acks): {}",
            progress.load(Ordering::Relaxed),
            s.log_text()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let fired = Instant::now();
    // ... and the server exits by itself, non-zero
    let status = s.wait_exit(Duration::from_secs(20));
    stop.store(true, Ordering::Relaxed);
    let log = s.log_text();
    let Some(status) = status else {
        s.kill9();
        let runs = load.join().unwrap();
        let acked: usize = runs.iter().map(|(_, r)| r.acked.len()).sum();
        panic!(
            "the server still runs 20 s after a failed fdatasync of its message log ({acked} \
             acknowledged; times {times:?}); it must exit: {}",
            &log[log.len().saturating_sub(3000)..]
        );
    };
    let exit_after = fired.elapsed();
    assert!(!status.success(), "exit status {status}");
    assert!(
        log.contains("fdatasync") && log.contains("exiting"),
        "the log says why: {}",
        &log[log.len().saturating_sub(3000)..]
    );
    let runs = load.join().unwrap();
    let mut acked: HashMap<String, HashSet<String>> = HashMap::new();
    let mut n_acked = 0;
    for (id, r) in &runs {
        n_acked += r.acked.len();
        acked
            .entry(id.clone())
            .or_default()
            .extend(r.acked.iter().cloned());
    }
    // restart without the shim: every acknowledged message is there, once
    s.set_run_env(&[]);
    s.restart();
    let mut stored = 0;
    for d in &devs {
        let msgs = all_messages(&s, &d.id);
        let mut seen: HashMap<String, usize> = HashMap::new();
        for m in &msgs {
            *seen.entry(m.msg_id.clone().unwrap()).or_default() += 1;
        }
        assert!(seen.values().all(|n| *n == 1), "{}: stored twice", d.id);
        let mine = acked.get(&d.id).cloned().unwrap_or_default();
        let lost = mine.iter().filter(|k| !seen.contains_key(*k)).count();
        assert_eq!(lost, 0, "{}: acknowledged messages lost", d.id);
        stored += msgs.len();
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let code = rt.block_on(async {
        let mut c = Client::connect_ok(s.mqtt_port, &s.ca_pem_path(), &devs[0], Protocol::V5).await;
        c.publish_qos1(
            &devs[0].topic("telemetry/t"),
            1,
            b"after",
            Some("after-restart"),
        )
        .await
    });
    assert_eq!(code, Some(0), "the restarted server takes new messages");
    eprintln!(
        "fdatasync EIO after {after} log syncs (times {times:?}): exit {status} {exit_after:?} \
         after the fault; {n_acked} acknowledged before, all {n_acked} there after restart \
         ({stored} stored)"
    );
    (n_acked, stored, exit_after)
}

#[test]
fn failed_fdatasync_of_the_message_log_is_fatal_and_loses_no_acknowledged_message() {
    let tmp = tempfile::tempdir().unwrap();
    let shim = build_shim(tmp.path());
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let mut rows = Vec::new();
    for (k, times) in [Some(1), None].into_iter().enumerate() {
        let after = 30 + (seed.wrapping_mul(k as u32 + 7) % 200);
        rows.push((times, after, one_fault(&shim, times, after)));
    }
    for (times, after, (acked, stored, exit_after)) in rows {
        devid_testkit::robust::Report::new(match times {
            Some(_) => "server_fdatasync_eio_once",
            None => "server_fdatasync_eio_always",
        })
        .text("threats", "C3")
        .num("syncs_before_fault", after)
        .num("acked", acked as f64)
        .num("acked_stored", acked as f64)
        .num("stored", stored as f64)
        .num("duplicates", 0)
        .num("exit_ms_after_fault", exit_after.as_secs_f64() * 1000.0)
        .emit();
    }
}
