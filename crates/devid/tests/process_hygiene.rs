//! THREATS.md T7: the running devid process is non-dumpable and cannot write a core file.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Command, Stdio};
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

/// Review L2: a failed mlock is reported by `devid status`, not silent. As root mlock always
/// works (CAP_IPC_LOCK); as `nobody` with RLIMIT_MEMLOCK 0 it cannot.
#[test]
fn status_reports_whether_secrets_are_locked_in_ram() {
    let d = Devid::new();
    d.run(&["init", "--backend", "soft"]).ok();
    let v: serde_json::Value =
        serde_json::from_slice(&d.run(&["status", "--json"]).ok().stdout).unwrap();
    assert_eq!(v["process"]["secrets_locked"], true, "{v}");

    let parent = d.state.parent().unwrap();
    let ok = Command::new("chown")
        .args(["-R", "nobody:nogroup"])
        .arg(parent)
        .status()
        .unwrap();
    assert!(ok.success());
    let out = Command::new("prlimit")
        .args([
            "--memlock=0:0",
            "setpriv",
            "--reuid",
            "nobody",
            "--regid",
            "nogroup",
        ])
        .arg("--clear-groups")
        .arg(env!("CARGO_BIN_EXE_devid"))
        .arg("--state-dir")
        .arg(&d.state)
        .arg("status")
        .env("DEVID_CONFIG_FILE", parent.join("devid.toml"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("WARNING: mlock failed"), "{text}");
}
