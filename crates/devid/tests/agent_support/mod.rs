//! Helpers for the `devid agent` end-to-end tests: the real `devid` binary as an agent process,
//! a real `devid-server`, swtpm, and a TCP proxy that can cut connections.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::io::Read;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devid_testkit::server::DevidServer;

use crate::common::Devid;

/// A `devid-server` whose per-device message rate limit (100/s by default) does not cap a
/// throughput test, optionally with a short certificate lifetime (e.g. `"1m"`).
pub fn server_for_tests(cert_lifetime: Option<&str>) -> DevidServer {
    let mut server = DevidServer::start();
    server.stop();
    let path = server.dir.join("devid-server.toml");
    let mut cfg = std::fs::read_to_string(&path).unwrap();
    cfg = cfg
        .lines()
        .map(|l| {
            if l.starts_with("mqtt.messages_per_sec") {
                "mqtt.messages_per_sec = 1000000.0".to_string()
            } else if l.starts_with("mqtt.messages_burst") {
                "mqtt.messages_burst = 1000000.0".to_string()
            } else if l.starts_with("mqtt.bytes_per_sec") {
                "mqtt.bytes_per_sec = 1000000000.0".to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    if let Some(l) = cert_lifetime {
        cfg = format!("device_cert_lifetime = \"{l}\"\n{cfg}");
    }
    std::fs::write(&path, cfg).unwrap();
    // The ports were free for a moment: make sure nothing else took them meanwhile.
    let t = Instant::now();
    while [server.https_port, server.mqtt_port]
        .iter()
        .any(|p| TcpListener::bind(("127.0.0.1", *p)).is_err())
    {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the server's ports stay taken"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    server.run();
    server
}

/// Enrol `d` (already `init`ed) with the server under `id`.
pub fn enrol(server: &DevidServer, d: &Devid, id: &str) {
    let token = server.token(&["--device-id", id]);
    d.run_stdin(
        &[
            "enroll",
            "--server",
            &server.url,
            "--ca-pin",
            &server.pin,
            "--token",
            "-",
        ],
        token.as_bytes(),
    )
    .ok();
}

/// Point the sealed MQTT endpoint somewhere else (the agent must not be running: the TPM
/// connection of swtpm is single-client).
pub fn set_mqtt_url(d: &Devid, url: &str) {
    let tcti = d
        .env
        .iter()
        .find(|(k, _)| k == "DEVID_TCTI")
        .map(|(_, v)| v.to_string_lossy().into_owned());
    let (_, vault) = devid::open_vault(&d.state, tcti.as_deref()).unwrap();
    let mut c = vault.load().unwrap();
    c.mqtt_url = Some(url.to_string());
    vault.store(&c).unwrap();
}

/// A `devid agent` process.
pub struct Agent {
    child: Option<Child>,
    args: Vec<String>,
    pub socket: PathBuf,
    pub log: PathBuf,
    cmd: Box<dyn Fn() -> Command + Send>,
}

impl Agent {
    /// Start `devid agent` for device `d` with test-friendly timings plus `extra` flags.
    pub fn start(d: &Devid, extra: &[&str]) -> Agent {
        let socket = d.state.parent().unwrap().join("agent.sock");
        let log = d.state.parent().unwrap().join("agent.log");
        let mut args: Vec<String> = vec![
            "agent".into(),
            "--socket".into(),
            socket.display().to_string(),
        ];
        for (flag, value) in [
            ("--backoff-base", "100ms"),
            ("--backoff-cap", "1s"),
            ("--status-interval", "200ms"),
        ] {
            if !extra.contains(&flag) {
                args.extend([flag.to_string(), value.to_string()]);
            }
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let state = d.state.clone();
        let env = d.env.clone();
        let cmd = Box::new(move || {
            let mut c = Command::new(env!("CARGO_BIN_EXE_devid"));
            c.arg("--state-dir").arg(&state);
            c.env_remove("DEVID_TCTI");
            c.env_remove("NOTIFY_SOCKET");
            for (k, v) in &env {
                c.env(k, v);
            }
            c.env("DEVID_LOG", "info");
            c
        });
        let mut a = Agent {
            child: None,
            args,
            socket,
            log,
            cmd,
        };
        a.spawn();
        a
    }

    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = (self.cmd)()
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let t = Instant::now();
        loop {
            if devid_agent::local::status(&self.socket, Duration::from_secs(2)).is_ok() {
                return;
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!("devid agent exited ({st}): {}", self.log_text());
                }
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "devid agent did not open its socket: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(30));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn status(&self) -> serde_json::Value {
        devid_agent::local::status(&self.socket, Duration::from_secs(5)).unwrap()
    }

    pub fn wait_status(
        &self,
        what: &str,
        timeout: Duration,
        f: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let t = Instant::now();
        loop {
            let s = self.status();
            if f(&s) {
                return s;
            }
            assert!(
                t.elapsed() < timeout,
                "timed out waiting for {what}; status {s:#}\nlog:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let st = c.wait().unwrap();
            assert!(st.success(), "agent exit {st}: {}", self.log_text());
        }
    }

    /// Resident set size of the agent, KiB.
    pub fn rss_kib(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Every stored message of `device` on the server: (server id, msg-id, payload text).
pub fn server_messages(server: &DevidServer, device: &str) -> Vec<(i64, String, String)> {
    let mut out = Vec::new();
    let mut since = 0i64;
    loop {
        let since_s = since.to_string();
        let o = server.cli(&[
            "messages", "list", "--device", device, "--limit", "10000", "--since", &since_s,
            "--json",
        ]);
        assert!(
            o.status.success(),
            "messages list: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let page = v["messages"].as_array().unwrap();
        if page.is_empty() {
            return out;
        }
        for m in page {
            let id = m["id"].as_i64().unwrap();
            since = since.max(id);
            out.push((
                id,
                m["msg_id"].as_str().unwrap_or("").to_string(),
                m["payload"].as_str().unwrap_or("").to_string(),
            ));
        }
    }
}

/// A TCP proxy whose live connections can be cut (a network outage without stopping the
/// server).
pub struct Proxy {
    pub port: u16,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    pub fn start(upstream: u16) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let c2 = conns.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(down) = s else { continue };
                let Ok(up) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let _ = down.set_nodelay(true);
                let _ = up.set_nodelay(true);
                {
                    let mut g = c2.lock().unwrap();
                    g.push(down.try_clone().unwrap());
                    g.push(up.try_clone().unwrap());
                }
                for (mut a, mut b) in [
                    (down.try_clone().unwrap(), up.try_clone().unwrap()),
                    (up, down),
                ] {
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16384];
                        loop {
                            match a.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    if std::io::Write::write_all(&mut b, &buf[..n]).is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                        let _ = b.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        Proxy { port, conns }
    }

    /// Cut every live connection.
    pub fn cut(&self) {
        for s in self.conns.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// A state dir path's parent made traversable (for tests that run a client as `nobody`).
pub fn open_up(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
}
