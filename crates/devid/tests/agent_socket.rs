//! The agent's local socket: peer credentials (a client running as `nobody` through
//! `setpriv`), malformed requests, `devid send`, `devid status --agent`, and systemd
//! notifications. A soft-backend device enrolled with a real `devid-server`.
#![allow(clippy::unwrap_used)]

mod agent_support;
mod common;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use agent_support::*;
use common::Devid;
use devid_testkit::server::DevidServer;

#[path = "../../agent/tests/support/mod.rs"]
mod support;

fn soft_device(server: &DevidServer, id: &str) -> Devid {
    let d = Devid::new();
    d.run(&["init", "--backend", "soft"]).ok();
    enrol(server, &d, id);
    d
}

/// `devid send` as uid `nobody` with the given group options of setpriv.
fn send_as_nobody(socket: &std::path::Path, groups: &[&str], payload: &str) -> Output {
    Command::new("setpriv")
        .args(["--reuid", "nobody"])
        .args(groups)
        .arg(env!("CARGO_BIN_EXE_devid"))
        .args(["send", "--socket"])
        .arg(socket)
        .args(["--topic", "telemetry/nobody", payload])
        .output()
        .unwrap()
}

#[test]
fn socket_serves_its_group_and_refuses_other_peers() {
    let server = DevidServer::start();
    let d = soft_device(&server, "sock-1");
    open_up(d.state.parent().unwrap());
    let agent = Agent::start(&d, &["--socket-group", "nogroup", "--socket-mode", "0666"]);
    let meta = std::fs::metadata(&agent.socket).unwrap();
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert_eq!(meta.permissions().mode() & 0o777, 0o666);
    assert_eq!(meta.gid(), 65534, "socket file gets the configured group");

    // Primary group allowed.
    let ok = send_as_nobody(
        &agent.socket,
        &["--regid", "nogroup", "--clear-groups"],
        "a",
    );
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    // Supplementary group allowed.
    let ok = send_as_nobody(
        &agent.socket,
        &["--regid", "daemon", "--groups", "nogroup"],
        "b",
    );
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    // Neither: refused by the SO_PEERCRED check although the socket file let it connect.
    let no = send_as_nobody(&agent.socket, &["--regid", "daemon", "--clear-groups"], "c");
    assert!(!no.status.success());
    let err = String::from_utf8_lossy(&no.stderr);
    assert!(
        err.contains("forbidden") && err.contains("may not use the devid agent"),
        "{err}"
    );
    assert!(agent.log_text().contains("local peer refused"));

    let s = agent.wait_status("two accepted", Duration::from_secs(5), |s| {
        s["outbox"]["accepted"] == 2
    });
    assert_eq!(
        s["outbox"]["accepted"], 2,
        "the refused peer's message was not taken"
    );
}

#[test]
fn malformed_requests_get_clear_errors_and_do_not_hurt_the_agent() {
    let server = DevidServer::start();
    let d = soft_device(&server, "sock-2");
    let agent = Agent::start(&d, &[]);
    let big = "A".repeat(93_400); // base64 of 70,050 bytes: over the 64 KiB payload limit
    let requests = [
        "this is not json".to_string(),
        r#"{"op":"publish","topic":"telemetry/x"}"#.to_string(),
        r#"{"op":"launch"}"#.to_string(),
        r#"{"op":"publish","topic":"telemetry/x","payload":"!!!"}"#.to_string(),
        r#"{"op":"publish","topic":"commands/reboot","payload":"aGk="}"#.to_string(),
        r#"{"op":"publish","topic":"telemetry/../../x","payload":"aGk="}"#.to_string(),
        r#"{"op":"publish","topic":"telemetry/#","payload":"aGk="}"#.to_string(),
        r#"{"op":"publish","topic":"telemetry/x","payload":"aGk=","qos":2}"#.to_string(),
        format!(r#"{{"op":"publish","topic":"telemetry/x","payload":"{big}"}}"#),
        "\u{0}\u{1}\u{fffd}garbage".to_string(),
        r#"{"op":"publish","topic":"telemetry/x","payload":"aGk=","id":"last"}"#.to_string(),
    ];
    let mut wire = Vec::new();
    for r in &requests {
        wire.extend_from_slice(r.as_bytes());
        wire.push(b'\n');
    }
    let answers = support::raw_exchange(&agent.socket, &wire, Duration::from_secs(10));
    let codes: Vec<&str> = answers
        .iter()
        .map(|a| a["code"].as_str().unwrap_or("ok"))
        .collect();
    assert_eq!(
        codes,
        [
            "bad_request",
            "bad_request",
            "bad_request",
            "bad_request",
            "bad_topic",
            "bad_topic",
            "bad_topic",
            "bad_request",
            "too_large",
            "bad_request",
            "ok"
        ]
    );
    assert!(answers[1]["error"].as_str().unwrap().contains("payload"));
    assert!(answers[2]["error"].as_str().unwrap().contains("unknown op"));
    assert!(answers[4]["error"]
        .as_str()
        .unwrap()
        .contains("telemetry/ or events/"));
    assert_eq!(answers[10]["id"], "last");
    assert!(
        answers.iter().all(|a| !a.to_string().contains("aGk=")),
        "no payload echoed"
    );

    // An endless line: refused and the connection closed.
    let mut long = vec![b'{'; 200_000];
    long.push(b'\n');
    let a = support::raw_exchange(&agent.socket, &long, Duration::from_secs(10));
    assert_eq!(a.len(), 1);
    assert_eq!(a[0]["code"], "line_too_long");

    // The agent is fine: `devid send` works, also from stdin, and checks topics itself.
    let r = d.run(&[
        "send",
        "--socket",
        agent.socket.to_str().unwrap(),
        "--topic",
        "events/door",
        "--json",
        "p4yl0ad-7f3a",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&r.ok().stdout).unwrap();
    assert_eq!(v["msg_id"].as_str().unwrap().len(), 32);
    d.run_stdin(
        &[
            "send",
            "--socket",
            agent.socket.to_str().unwrap(),
            "--topic",
            "telemetry/t",
            "-",
        ],
        b"\x00binary\xff",
    )
    .ok();
    let bad = d.run(&[
        "send",
        "--socket",
        agent.socket.to_str().unwrap(),
        "--topic",
        "commands/x",
        "hi",
    ]);
    assert_ne!(bad.code, 0);
    assert!(
        bad.stderr.contains("telemetry/ or events/"),
        "{}",
        bad.stderr
    );
    let gone = d.run(&[
        "send",
        "--socket",
        "/nonexistent/agent.sock",
        "--topic",
        "telemetry/t",
        "x",
    ]);
    assert_ne!(gone.code, 0);
    assert!(
        gone.stderr.contains("is `devid agent` running?"),
        "{}",
        gone.stderr
    );

    // Status: from the socket and from the status file.
    let s = agent.wait_status("stored and acked", Duration::from_secs(10), |s| {
        s["outbox"]["accepted"] == 3 && s["mqtt"]["acked"] == 3
    });
    assert_eq!(s["connection"]["state"], "connected");
    // The status file follows within a fraction of a second.
    let t = Instant::now();
    let text = loop {
        let text = d.run(&["status", "--agent"]).ok().text();
        if text.contains("3 acked") || t.elapsed() > Duration::from_secs(5) {
            break text;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        text.contains("connected") && text.contains("3 acked"),
        "{text}"
    );
    let v: serde_json::Value =
        serde_json::from_slice(&d.run(&["status", "--agent", "--json"]).ok().stdout).unwrap();
    assert_eq!(v["running"], true);
    assert_eq!(v["device_id"], "sock-2");
    // `devid status` shows the agent section too, and never a payload.
    let full = d.run(&["status"]).ok().text();
    assert!(full.contains("agent:") && !full.contains("binary") && !full.contains("p4yl0ad"));
    assert!(!agent.log_text().contains("p4yl0ad"), "payload in the log");
}

#[test]
fn systemd_gets_ready_and_watchdog_notifications() {
    let server = DevidServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let notify_path = tmp.path().join("notify");
    let sock = UnixDatagram::bind(&notify_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let d = soft_device(&server, "sock-3").envs(vec![
        ("NOTIFY_SOCKET".into(), notify_path.clone().into()),
        ("WATCHDOG_USEC".into(), "400000".into()),
    ]);
    let mut agent = Agent::start(&d, &[]);
    let mut seen = String::new();
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10)
        && !(seen.contains("READY=1") && seen.matches("WATCHDOG=1").count() >= 2)
    {
        let mut buf = [0u8; 512];
        if let Ok(n) = sock.recv(&mut buf) {
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            seen.push('\n');
        }
    }
    assert!(seen.contains("READY=1"), "{seen}");
    assert!(seen.matches("WATCHDOG=1").count() >= 2, "{seen}");
    agent.stop();
    let mut buf = [0u8; 512];
    let mut rest = String::new();
    while let Ok(n) = sock.recv(&mut buf) {
        rest.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(rest.contains("STOPPING=1"), "{rest}");
    assert!(!agent.socket.exists(), "socket removed on a clean stop");
}

/// Review L3: under the shipped unit's `ProtectProc=invisible` the agent (not root) cannot
/// see other users' processes in /proc, so a supplementary group read from
/// `/proc/<pid>/status` is never found. The agent runs as `nobody` in a mount namespace with
/// /proc mounted `hidepid=invisible`; a client whose only link to the socket group is a
/// supplementary group must still be served (groups come from `SO_PEERGROUPS`), and a client
/// without the group is still refused.
#[test]
fn supplementary_group_is_honoured_under_protect_proc_invisible() {
    use std::os::unix::fs::PermissionsExt;
    use std::process::Stdio;
    devid_testkit::require_program("unshare", "util-linux");
    let server = DevidServer::start();
    let d = soft_device(&server, "sock-pp");
    let parent = d.state.parent().unwrap().to_path_buf();
    // The agent's user owns its state dir and the socket's directory.
    let chown = Command::new("chown")
        .args(["-R", "nobody:nogroup"])
        .arg(&parent)
        .status()
        .unwrap();
    assert!(chown.success());
    std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = parent.join("agent.sock");
    let log = parent.join("agent.log");
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(
            "mount -t proc -o hidepid=invisible proc /proc && exec setpriv --reuid nobody \
             --regid nogroup --groups daemon \"$@\"",
        )
        .arg("sh")
        .arg(env!("CARGO_BIN_EXE_devid"))
        .arg("--state-dir")
        .arg(&d.state)
        .args(["agent", "--socket"])
        .arg(&socket)
        .args([
            "--socket-group",
            "daemon",
            // Open file mode: the non-member must reach the agent's own peer check.
            "--socket-mode",
            "0666",
            "--backoff-base",
            "100ms",
            "--status-interval",
            "200ms",
        ])
        .env_remove("DEVID_TCTI")
        .env_remove("NOTIFY_SOCKET")
        .env("DEVID_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    for (k, v) in &d.env {
        cmd.env(k, v);
    }
    let mut agent = cmd.spawn().unwrap();
    let t = Instant::now();
    while devid_agent::local::status(&socket, Duration::from_secs(2)).is_err() {
        if let Ok(Some(st)) = agent.try_wait() {
            panic!(
                "agent exited ({st}): {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "agent never listened"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let send = |groups: &[&str], payload: &str| {
        Command::new("setpriv")
            .args(["--reuid", "bin", "--regid", "bin"])
            .args(groups)
            .arg(env!("CARGO_BIN_EXE_devid"))
            .args(["send", "--socket"])
            .arg(&socket)
            .args(["--topic", "telemetry/pp", payload])
            .output()
            .unwrap()
    };
    let ok = send(&["--groups", "daemon"], "via-supplementary-group");
    let no = send(&["--clear-groups"], "no-group");
    let _ = agent.kill();
    let _ = agent.wait();
    let agent_log = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        ok.status.success(),
        "a member of the socket group (supplementary) was refused: {} / agent log: {agent_log}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(!no.status.success(), "a non-member was served");
    assert!(
        String::from_utf8_lossy(&no.stderr).contains("may not use the devid agent"),
        "{}",
        String::from_utf8_lossy(&no.stderr)
    );
}
