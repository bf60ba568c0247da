//! THREATS.md T7: the running devid process is non-dumpable and cannot write a core file.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::Devid;

#[test]
fn status_reports_non_dumpable_and_no_core() {
    let d = Devid::new();
    d.run(&["init", "--backend", "soft"]).ok();
    let v: serde_json::Value =
        serde_json::from_slice(&d.run(&["status", "--json"]).ok().stdout).unwrap();
    assert_eq!(v["process"]["dumpable"], false);
    assert_eq!(v["process"]["core_limit"], 0);
}

#[test]
fn a_running_devid_has_core_size_zero() {
    let d = Devid::new();
    d.run(&["init", "--backend", "soft"]).ok();
    // `secret put` blocks reading stdin: inspect it from outside while it runs.
    let mut child = d
        .command(&["secret", "put", "x"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut limits = String::new();
    for _ in 0..100 {
        std::thread::sleep(Duration::from_millis(20));
        limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
        let core = limits.lines().find(|l| l.starts_with("Max core file size"));
        if core.is_some_and(|l| l.split_whitespace().nth(4) == Some("0")) {
            break;
        }
    }
    drop(child.stdin.take());
    let _ = child.wait();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap_or_default()
        .to_string();
    let fields: Vec<&str> = core.split_whitespace().collect();
    assert_eq!(fields.get(4), Some(&"0"), "soft limit: {core}");
    assert_eq!(fields.get(5), Some(&"0"), "hard limit: {core}");
}
