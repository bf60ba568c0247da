//! A real `devid-server` for device-side tests: fresh data dir, free loopback ports, killed on
//! drop. The binary is the workspace's own (built by `cargo test --workspace`).

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use crate::{free_port, wait_for_port, workspace_bin};

/// A running `devid-server run`.
pub struct DevidServer {
    /// Keeps the data dir alive.
    pub tmp: tempfile::TempDir,
    /// `--data-dir`.
    pub dir: PathBuf,
    /// HTTPS port.
    pub https_port: u16,
    /// MQTT port.
    pub mqtt_port: u16,
    /// Admin listener port (admin API, metrics, console).
    pub admin_port: u16,
    /// `https://localhost:ADMIN_PORT` (the name in the server certificate).
    pub admin_url: String,
    /// `https://127.0.0.1:PORT`.
    pub url: String,
    /// The CA pin printed by `init`.
    pub pin: String,
    /// Server stderr log file.
    pub log: PathBuf,
    child: Option<Child>,
}

impl DevidServer {
    /// `devid-server init` + `run` with the embedded SQLite.
    pub fn start() -> DevidServer {
        Self::start_with(&[])
    }

    /// Same, with extra `init` arguments.
    pub fn start_with(extra_init: &[&str]) -> DevidServer {
        Self::start_with_config(extra_init, "")
    }

    /// Same, with `key = value` lines set in `devid-server.toml` before the first run
    /// ([`crate::set_config`]).
    pub fn start_with_config(extra_init: &[&str], settings: &str) -> DevidServer {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("server");
        let https_port = free_port();
        let mqtt_port = free_port();
        let admin_port = free_port();
        let mut args: Vec<String> = vec![
            "init".into(),
            "--data-dir".into(),
            dir.display().to_string(),
            "--hostname".into(),
            "localhost".into(),
            "--https-listen".into(),
            format!("127.0.0.1:{https_port}"),
            "--mqtt-listen".into(),
            format!("127.0.0.1:{mqtt_port}"),
            "--admin-listen".into(),
            format!("127.0.0.1:{admin_port}"),
        ];
        args.extend(extra_init.iter().map(|s| s.to_string()));
        let out = Command::new(workspace_bin("devid-server"))
            .args(&args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "devid-server init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let pin = stdout
            .split(|c: char| !c.is_ascii_hexdigit())
            .find(|w| w.len() == 64)
            .expect("init prints the CA pin")
            .to_ascii_lowercase();
        let log = tmp.path().join("server.log");
        let mut s = DevidServer {
            url: format!("https://127.0.0.1:{https_port}"),
            tmp,
            dir,
            https_port,
            mqtt_port,
            admin_port,
            admin_url: format!("https://localhost:{admin_port}"),
            pin,
            log,
            child: None,
        };
        if !settings.is_empty() {
            crate::set_config(&s.dir.join("devid-server.toml"), settings);
        }
        s.run();
        s
    }

    /// Start (or restart) `devid-server run`.
    pub fn run(&mut self) {
        self.stop();
        let child = Command::new(workspace_bin("devid-server"))
            .args(["run", "--data-dir"])
            .arg(&self.dir)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&self.log).unwrap())
            .spawn()
            .unwrap();
        self.child = Some(child);
        assert!(
            wait_for_port(self.https_port, Duration::from_secs(20)),
            "devid-server did not listen: {}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    /// Kill the server (SIGKILL) and wait for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Run an admin subcommand (`--data-dir` appended).
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(workspace_bin("devid-server"))
            .args(args)
            .arg("--data-dir")
            .arg(&self.dir)
            .output()
            .unwrap()
    }

    /// A fresh one-time token (the last line of `token create`).
    pub fn token(&self, extra: &[&str]) -> String {
        let mut args = vec!["token", "create"];
        args.extend_from_slice(extra);
        let out = self.cli(&args);
        assert!(
            out.status.success(),
            "token create failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap()
            .trim()
            .to_string()
    }

    /// The fleet CA certificate (PEM).
    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(self.dir.join("ca.pem")).unwrap()
    }
}

impl Drop for DevidServer {
    fn drop(&mut self) {
        self.stop();
    }
}
