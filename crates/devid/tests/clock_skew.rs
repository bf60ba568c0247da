//! A device whose clock is years off (a board without RTC), faked with libfaketime for the
//! `devid` process only (never the machine's clock): enrolment fails with an error that names
//! the clock, nothing is sealed, and the same command works once the clock is right.

#![allow(clippy::unwrap_used)]

mod common;

use common::Devid;
use devid_testkit::server::DevidServer;

const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

fn enroll(d: &Devid, s: &DevidServer, token: &str, faketime: Option<&str>) -> std::process::Output {
    use std::io::Write;
    let mut cmd = d.command(&[
        "enroll", "--server", &s.url, "--ca-pin", &s.pin, "--token", "-",
    ]);
    if let Some(offset) = faketime {
        cmd.env("LD_PRELOAD", LIBFAKETIME).env("FAKETIME", offset);
    }
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(token.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn a_device_clock_years_off_gets_a_clear_error_and_recovers_when_it_is_right() {
    assert!(
        std::path::Path::new(LIBFAKETIME).exists(),
        "libfaketime missing: scripts/deps installs the faketime package"
    );
    let s = DevidServer::start();
    let d = Devid::new();
    d.run(&["init", "--backend", "soft"]).ok();
    let token = s.token(&["--device-id", "skewed"]);
    for offset in ["+5y", "-5y"] {
        let out = enroll(&d, &s, &token, Some(offset));
        assert!(
            !out.status.success(),
            "{offset}: enrolled with a wrong clock"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("check this device's clock"), "{offset}: {err}");
        let status = String::from_utf8_lossy(&d.run(&["status", "--json"]).stdout).into_owned();
        assert!(!status.contains("skewed"), "nothing sealed: {status}");
    }
    // the token was never consumed: the same one works with the right clock
    let out = enroll(&d, &s, &token, None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = String::from_utf8_lossy(&d.run(&["status", "--json"]).ok().stdout).into_owned();
    assert!(status.contains("skewed"), "{status}");
}
