//! `devid-bench --quick` end to end against a real `devid-server` and a real Mosquitto: every
//! scenario row is in the table with numbers for both servers, and the charts are written.
//! Needs the workspace's `devid-server` binary (`cargo build --bins`) and the Debian package
//! mosquitto.
#![allow(clippy::unwrap_used, missing_docs)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const ROWS: [&str; 19] = [
    "1a", "1b", "1c", "2", "3a", "3b", "3c", "3d", "3e", "4a", "4b", "4c", "5a", "5b", "6a", "6b",
    "6c", "6d", "6e",
];

/// The leading number of a table cell (`12,345 (11,000-13,000)` -> 12345), or None for `n/a`.
fn number(cell: &str) -> Option<f64> {
    let t: String = cell
        .trim()
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == ',' || *c == '.' || *c == '-')
        .filter(|c| *c != ',')
        .collect();
    t.parse().ok()
}

#[test]
fn quick_run_measures_every_scenario_on_both_servers() {
    devid_testkit::require_program("mosquitto", "mosquitto");
    let devid_server = devid_testkit::workspace_bin("devid-server");
    let out = tempfile::tempdir().unwrap();
    let start = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_devid-bench"))
        .arg("--quick")
        .arg("--devid-server")
        .arg(&devid_server)
        .arg("--out-dir")
        .arg(out.path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(240) {
            child.kill().unwrap();
            panic!("devid-bench --quick took longer than 240 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let stderr = std::io::read_to_string(child.stderr.take().unwrap()).unwrap();
    assert!(status.success(), "devid-bench --quick failed:\n{stderr}");

    let md = std::fs::read_to_string(out.path().join("benchmarks.md")).unwrap();
    for id in ROWS {
        let line = md
            .lines()
            .find(|l| l.starts_with(&format!("| {id} |")))
            .unwrap_or_else(|| panic!("row {id} missing from the table:\n{md}"));
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // | id | scenario | unit | devid | Mosquitto | ratio | target | met |
        assert_eq!(cells.len(), 10, "{line}");
        for (server, cell) in [("devid", cells[4]), ("Mosquitto", cells[5])] {
            let v =
                number(cell).unwrap_or_else(|| panic!("row {id}: no number for {server}: {line}"));
            if id == "5b" {
                // CPU at rest may honestly be zero ticks.
                assert!(v >= 0.0, "row {id} {server}: {line}");
            } else {
                assert!(v > 0.0, "row {id} {server}: {line}");
            }
            assert!(!cell.contains("failed"), "row {id} {server}: {line}");
        }
    }
    // Targets are judged; the machine and the command are stated.
    assert!(md.contains("| command |") && md.contains("| CPU |"), "{md}");
    assert!(md.contains("met**") || md.contains("missed**"), "{md}");
    assert!(md.contains("## The crypto lower bound"), "{md}");
    for svg in ["benchmarks-throughput.svg", "benchmarks-latency.svg"] {
        let text = std::fs::read_to_string(out.path().join(svg)).unwrap();
        assert!(text.contains("<svg") && text.contains("devid"), "{svg}");
        assert!(text.contains("Mosquitto"), "{svg}");
    }
    assert!(
        start.elapsed() < Duration::from_secs(120),
        "the quick run should stay near a minute, took {:?}",
        start.elapsed()
    );
}

#[test]
fn number_parsing() {
    assert_eq!(number("12,345 (11,000-13,000)"), Some(12345.0));
    assert_eq!(number("0.812"), Some(0.812));
    assert_eq!(number("n/a (failed: x)"), None);
}
