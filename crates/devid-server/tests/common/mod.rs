//! Start the real `devid-server` binary on a free loopback port with a fresh data dir.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use devid_proto::{AuditEntry, DeviceInfo};
use sha2::{Digest, Sha256};

pub const BIN: &str = env!("CARGO_BIN_EXE_devid-server");

pub struct Server {
    pub tmp: tempfile::TempDir,
    pub dir: PathBuf,
    pub port: u16,
    pub mqtt_port: u16,
    pub admin_port: u16,
    pub url: String,
    /// The admin listener (`admin_listen`): admin API, messages, stream, metrics.
    pub admin_url: String,
    pub pin: String,
    pub log: PathBuf,
    child: Child,
    run_env: Vec<(String, std::ffi::OsString)>,
}

pub fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

impl Server {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    pub fn start_with(extra_init: &[&str]) -> Self {
        Self::start_opts(extra_init, &[])
    }

    /// `init` with `extra_init` (e.g. `--db postgres://...`, `--ca-key pkcs11:...`) and `run`,
    /// both with the extra environment `env` (e.g. `SOFTHSM2_CONF`).
    pub fn start_opts(extra_init: &[&str], env: &[(String, std::ffi::OsString)]) -> Self {
        Self::start_full(extra_init, env, "")
    }

    /// `init` with `extra_init`, then `extra_toml` (e.g. `mqtt.*` settings) appended to the
    /// config, then `run`.
    pub fn start_with_config(extra_init: &[&str], extra_toml: &str) -> Self {
        Self::start_full(extra_init, &[], extra_toml)
    }

    /// [`Server::start_with_config`] with the data dir at `data_dir` (which must not exist
    /// yet; e.g. on a small tmpfs). The server's log stays in a temp dir outside it.
    pub fn start_at(data_dir: &Path, extra_toml: &str) -> Self {
        Self::start_in(Some(data_dir.to_path_buf()), &[], &[], extra_toml)
    }

    /// `init` with `extra_init`, `extra_toml` appended to the config, and `run`, both with the
    /// extra environment `env` (e.g. an `LD_PRELOAD` fault shim).
    pub fn start_env_config(
        extra_init: &[&str],
        env: &[(String, std::ffi::OsString)],
        extra_toml: &str,
    ) -> Self {
        Self::start_full(extra_init, env, extra_toml)
    }

    fn start_full(
        extra_init: &[&str],
        env: &[(String, std::ffi::OsString)],
        extra_toml: &str,
    ) -> Self {
        Self::start_in(None, extra_init, env, extra_toml)
    }

    fn start_in(
        data_dir: Option<PathBuf>,
        extra_init: &[&str],
        env: &[(String, std::ffi::OsString)],
        extra_toml: &str,
    ) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = data_dir.unwrap_or_else(|| tmp.path().join("data"));
        let port = devid_testkit::free_port();
        let listen = format!("127.0.0.1:{port}");
        let mqtt_port = free_port_other_than(port);
        let mqtt_listen = format!("127.0.0.1:{mqtt_port}");
        let admin_port = free_port_not_in(&[port, mqtt_port]);
        let admin_listen = format!("127.0.0.1:{admin_port}");
        let mut args = vec![
            "init",
            "--data-dir",
            dir.to_str().unwrap(),
            "--hostname",
            "localhost",
            "--https-listen",
            &listen,
            "--mqtt-listen",
            &mqtt_listen,
            "--admin-listen",
            &admin_listen,
        ];
        args.extend_from_slice(extra_init);
        let out = Command::new(BIN)
            .args(&args)
            .envs(env.iter().cloned())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8(out.stdout).unwrap();
        let ca_der = pem_to_der(&std::fs::read_to_string(dir.join("ca.pem")).unwrap());
        let pin = hex::encode(Sha256::digest(&ca_der[0]));
        assert!(stdout.contains(&pin), "init prints the CA pin: {stdout}");
        if !extra_toml.is_empty() {
            set_config(&dir.join("devid-server.toml"), extra_toml);
        }
        Self::run_node(tmp, dir, [port, mqtt_port, admin_port], pin, env)
    }

    /// Another `devid-server run` node sharing this one's database (PostgreSQL): a copy of
    /// the data dir (same CA, TLS files and admin token) listening on another port.
    pub fn another_node(&self) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        devid_testkit::copy_tree(&self.dir, &dir);
        let port = devid_testkit::free_port();
        let mqtt_port = free_port_other_than(port);
        let admin_port = free_port_not_in(&[port, mqtt_port]);
        let toml = std::fs::read_to_string(dir.join("devid-server.toml")).unwrap();
        let toml = toml
            .replace(self.dir_str(), dir.to_str().unwrap())
            .replace(
                &format!("\"127.0.0.1:{}\"", self.port),
                &format!("\"127.0.0.1:{port}\""),
            )
            .replace(
                &format!("\"127.0.0.1:{}\"", self.mqtt_port),
                &format!("\"127.0.0.1:{mqtt_port}\""),
            )
            .replace(
                &format!("\"127.0.0.1:{}\"", self.admin_port),
                &format!("\"127.0.0.1:{admin_port}\""),
            );
        std::fs::write(dir.join("devid-server.toml"), toml).unwrap();
        Self::run_node(
            tmp,
            dir,
            [port, mqtt_port, admin_port],
            self.pin.clone(),
            &[],
        )
    }

    fn run_node(
        tmp: tempfile::TempDir,
        dir: PathBuf,
        [port, mqtt_port, admin_port]: [u16; 3],
        pin: String,
        env: &[(String, std::ffi::OsString)],
    ) -> Self {
        let log = tmp.path().join("server.log");
        let child = Command::new(BIN)
            .args(["run", "--data-dir", dir.to_str().unwrap()])
            .env("RUST_LOG", "debug")
            .envs(env.iter().cloned())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        assert!(
            devid_testkit::wait_for_port(port, Duration::from_secs(20)),
            "server did not listen: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        Server {
            url: format!("https://127.0.0.1:{port}"),
            admin_url: format!("https://127.0.0.1:{admin_port}"),
            tmp,
            dir,
            port,
            mqtt_port,
            admin_port,
            pin,
            log,
            child,
            run_env: env.to_vec(),
        }
    }

    /// `kill -9` the server: no shutdown path of any kind runs.
    pub fn kill9(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }

    /// The environment later [`Server::restart`]s run with (e.g. without a fault shim).
    pub fn set_run_env(&mut self, env: &[(String, std::ffi::OsString)]) {
        self.run_env = env.to_vec();
    }

    /// Wait up to `timeout` for the server process to exit by itself; its status, or None
    /// while it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let start = std::time::Instant::now();
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            if start.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The server's process id (to send it a signal, e.g. SIGTERM).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `run` again on the same data dir and ports (after `kill9`), log appended.
    pub fn restart(&mut self) {
        self.kill9();
        self.child = Command::new(BIN)
            .args(["run", "--data-dir", self.dir.to_str().unwrap()])
            .env("RUST_LOG", "debug")
            .envs(self.run_env.iter().cloned())
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(&self.log)
                    .unwrap(),
            )
            .spawn()
            .unwrap();
        assert!(
            devid_testkit::wait_for_port(self.port, Duration::from_secs(20)),
            "server did not listen again: {}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    pub fn dir_str(&self) -> &str {
        self.dir.to_str().unwrap()
    }

    /// Run an admin subcommand against this server; panics unless it succeeds.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = self.cli_output(args);
        assert!(
            out.status.success(),
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn cli_output(&self, args: &[&str]) -> Output {
        let mut all: Vec<&str> = args.to_vec();
        all.extend_from_slice(&["--data-dir", self.dir_str()]);
        run(&all)
    }

    /// `token create ...`, returning the last line of stdout.
    pub fn token(&self, extra: &[&str]) -> String {
        let mut args = vec!["token", "create"];
        args.extend_from_slice(extra);
        let out = self.cli(&args);
        out.lines().last().unwrap().trim().to_owned()
    }

    pub fn devices(&self) -> Vec<DeviceInfo> {
        serde_json::from_str(&self.cli(&["device", "list", "--json"])).unwrap()
    }

    pub fn audit(&self) -> Vec<AuditEntry> {
        serde_json::from_str(&self.cli(&["audit", "--json"])).unwrap()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap()
    }

    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.dir.join("admin.token"))
            .unwrap()
            .trim()
            .to_owned()
    }

    pub fn ca_pem_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub use devid_testkit::set_config;

/// A free loopback port that is not `other`.
/// A free port that is none of `others`.
pub fn free_port_not_in(others: &[u16]) -> u16 {
    loop {
        let p = devid_testkit::free_port();
        if !others.contains(&p) {
            return p;
        }
    }
}

pub fn free_port_other_than(other: u16) -> u16 {
    loop {
        let p = devid_testkit::free_port();
        if p != other {
            return p;
        }
    }
}

pub fn pem_to_der(pem: &str) -> Vec<Vec<u8>> {
    x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
        .map(|p| p.unwrap().contents)
        .collect()
}

/// Checks a returned chain: leaf signed by the CA in `ca_pem`, SAN `urn:devid:<id>`, CN id,
/// and the leaf's public key equals `spki_der`. Returns the leaf serial (hex).
pub fn check_chain(chain_pem: &str, ca_pem: &str, id: &str, spki_der: &[u8]) -> String {
    use x509_parser::prelude::*;
    let ders = crate::common::pem_to_der(chain_pem);
    assert_eq!(ders.len(), 2, "leaf + CA");
    let ca_der = &crate::common::pem_to_der(ca_pem)[0];
    assert_eq!(&ders[1], ca_der, "second certificate is the fleet CA");
    let (_, leaf) = parse_x509_certificate(&ders[0]).unwrap();
    let (_, ca) = parse_x509_certificate(ca_der).unwrap();
    leaf.verify_signature(Some(ca.public_key())).unwrap();
    assert_eq!(
        leaf.public_key().raw,
        spki_der,
        "certificate carries the CSR's key"
    );
    let san = leaf.subject_alternative_name().unwrap().unwrap();
    let uris: Vec<_> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(uris, vec![format!("urn:devid:{id}")]);
    let cn = leaf
        .subject()
        .iter_common_name()
        .next()
        .unwrap()
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(cn, id);
    assert!(leaf.validity().is_valid());
    let days =
        (leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp()) / 86_400;
    assert_eq!(days, 30, "default lifetime 30 days (+5 min backdating)");
    hex::encode(leaf.raw_serial())
}

pub fn tool(program: &str, args: &[&str], cwd: &Path) -> Output {
    let out = Command::new(program)
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    out
}
