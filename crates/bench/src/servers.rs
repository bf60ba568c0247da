//! The two servers under test, started by the harness on 127.0.0.1: `devid-server` (SQLite
//! store, its own fleet CA) and Mosquitto 2 configured as the honest peer (client certificate
//! required, identity as user name, `pattern write devices/%u/#`, persistence off), both with
//! the CA, server certificate and key of devid's data dir.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::BenchError;

/// Which server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// devid-server.
    Devid,
    /// Mosquitto.
    Mosquitto,
}

impl Kind {
    /// Both, in the order they run within each round.
    pub const ALL: [Kind; 2] = [Kind::Devid, Kind::Mosquitto];

    /// Display name.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Devid => "devid",
            Kind::Mosquitto => "Mosquitto",
        }
    }
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> Result<u16, BenchError> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(BenchError::io("bind a free port"))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(BenchError::io("read a free port"))
}

fn wait_for_port(port: u16, timeout: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

fn kill(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// The `devid-server.toml` settings the benchmark changes, as (key, value) pairs; `mqtt.` and
/// `https.` keys go into their tables. The per-device and per-source limits protect a production fleet
/// from one misbehaving device; the benchmark's devices are deliberately greedy and all come
/// from a handful of loopback addresses, so those limits are lifted. Nothing that makes
/// devid do less work per message (durable commit, registry check, authorisation, audit) is
/// turned off.
pub fn devid_bench_settings(max_connections: usize) -> Vec<(&'static str, toml::Value)> {
    use toml::Value::{Float, Integer};
    let big = 1e12;
    vec![
        ("max_connections", Integer(256)),
        ("mqtt.max_connections", Integer(max_connections as i64)),
        ("mqtt.connect_timeout_secs", Integer(60)),
        ("mqtt.handshakes_per_source_per_sec", Float(big)),
        ("mqtt.handshake_burst_per_source", Float(big)),
        ("mqtt.max_pending_handshakes_per_source", Integer(1_000_000)),
        ("mqtt.messages_per_sec", Float(big)),
        ("mqtt.messages_burst", Float(big)),
        ("mqtt.bytes_per_sec", Float(big)),
        ("mqtt.bytes_burst", Float(big)),
        // the fleet enrols (and the admin client authenticates) from one address
        ("https.enroll_per_source_per_sec", Float(big)),
        ("https.enroll_burst_per_source", Float(big)),
        ("https.renew_per_source_per_sec", Float(big)),
        ("https.renew_burst_per_source", Float(big)),
    ]
}

/// Set `settings` in the TOML file at `path`.
pub fn edit_toml(path: &Path, settings: &[(&str, toml::Value)]) -> Result<(), BenchError> {
    let text = std::fs::read_to_string(path)
        .map_err(BenchError::io(format!("read {}", path.display())))?;
    let mut table: toml::Table = text
        .parse()
        .map_err(|e| BenchError::Server(format!("{}: not TOML: {e}", path.display())))?;
    for (key, value) in settings {
        match key.split_once('.') {
            Some((section, name)) => {
                let sub = table
                    .entry(section.to_owned())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                let toml::Value::Table(sub) = sub else {
                    return Err(BenchError::Server(format!(
                        "{}: {section} is not a table",
                        path.display()
                    )));
                };
                sub.insert(name.to_owned(), value.clone());
            }
            None => {
                table.insert((*key).to_owned(), value.clone());
            }
        }
    }
    let out = toml::to_string(&table)
        .map_err(|e| BenchError::Server(format!("cannot write TOML: {e}")))?;
    std::fs::write(path, out).map_err(BenchError::io(format!("write {}", path.display())))
}

/// A `devid-server` started by the harness.
#[derive(Debug)]
pub struct DevidServer {
    bin: PathBuf,
    /// Its data dir.
    pub dir: PathBuf,
    /// HTTPS port (enrolment, admin API).
    pub https_port: u16,
    /// MQTT port.
    pub mqtt_port: u16,
    /// Hex SHA-256 of the fleet CA certificate.
    pub pin: String,
    /// stderr of the server.
    pub log: PathBuf,
    child: Option<Child>,
}

impl DevidServer {
    /// `devid-server init` in `work/devid` (SQLite), apply `settings` to its config, and
    /// start it.
    pub fn init(
        bin: &Path,
        work: &Path,
        settings: &[(&str, toml::Value)],
    ) -> Result<DevidServer, BenchError> {
        let dir = work.join("devid");
        let https_port = free_port()?;
        let mut mqtt_port = free_port()?;
        while mqtt_port == https_port {
            mqtt_port = free_port()?;
        }
        let out = Command::new(bin)
            .arg("init")
            .arg("--data-dir")
            .arg(&dir)
            .args(["--hostname", "localhost", "--https-listen"])
            .arg(format!("127.0.0.1:{https_port}"))
            .arg("--mqtt-listen")
            .arg(format!("127.0.0.1:{mqtt_port}"))
            .arg("--admin-listen")
            .arg(format!("127.0.0.1:{}", free_port()?))
            .output()
            .map_err(BenchError::io(format!("run {} init", bin.display())))?;
        if !out.status.success() {
            return Err(BenchError::Server(format!(
                "devid-server init failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let pin = stdout
            .split(|c: char| !c.is_ascii_hexdigit())
            .find(|w| w.len() == 64)
            .ok_or_else(|| BenchError::Server("devid-server init printed no CA pin".into()))?
            .to_ascii_lowercase();
        edit_toml(&dir.join("devid-server.toml"), settings)?;
        let mut s = DevidServer {
            bin: bin.to_path_buf(),
            log: work.join("devid-server.log"),
            dir,
            https_port,
            mqtt_port,
            pin,
            child: None,
        };
        s.start()?;
        Ok(s)
    }

    /// Start (or restart) `devid-server run`; returns once both ports accept connections.
    pub fn start(&mut self) -> Result<(), BenchError> {
        self.stop();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(BenchError::io(format!("open {}", self.log.display())))?;
        let child = Command::new(&self.bin)
            .arg("run")
            .arg("--data-dir")
            .arg(&self.dir)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(BenchError::io(format!("start {} run", self.bin.display())))?;
        self.child = Some(child);
        for port in [self.https_port, self.mqtt_port] {
            if !wait_for_port(port, Duration::from_secs(30)) {
                self.stop();
                return Err(BenchError::Server(format!(
                    "devid-server did not listen on port {port}:\n{}",
                    log_tail(&self.log)
                )));
            }
        }
        Ok(())
    }

    /// Kill it.
    pub fn stop(&mut self) {
        kill(&mut self.child);
    }

    /// The database files of the data dir (registry, audit, message index).
    const DB_FILES: [&'static str; 3] = [
        "devid-server.db",
        "devid-server.db-wal",
        "devid-server.db-shm",
    ];

    fn snapshot_dir(&self) -> PathBuf {
        self.dir.with_extension("snapshot")
    }

    /// Keep a copy of the database as it is now (the enrolled fleet, no messages yet):
    /// [`DevidServer::reset`] returns to it. Restarts the server.
    pub fn snapshot(&mut self) -> Result<(), BenchError> {
        self.stop();
        let snap = self.snapshot_dir();
        std::fs::create_dir_all(&snap)
            .map_err(BenchError::io(format!("create {}", snap.display())))?;
        for f in Self::DB_FILES {
            let from = self.dir.join(f);
            if from.exists() {
                std::fs::copy(&from, snap.join(f))
                    .map_err(BenchError::io(format!("copy {}", from.display())))?;
            }
        }
        self.start()
    }

    /// Restart with no stored messages: the message log is removed and the database goes
    /// back to the snapshot. Every throughput and latency run starts from the same state, and
    /// a full run does not need the disk space of every message of every run at once.
    pub fn reset(&mut self) -> Result<(), BenchError> {
        self.stop();
        let log = self.dir.join("devid-server.msglog");
        if log.exists() {
            std::fs::remove_dir_all(&log)
                .map_err(BenchError::io(format!("remove {}", log.display())))?;
        }
        let snap = self.snapshot_dir();
        for f in Self::DB_FILES {
            let to = self.dir.join(f);
            if to.exists() {
                std::fs::remove_file(&to)
                    .map_err(BenchError::io(format!("remove {}", to.display())))?;
            }
            if snap.join(f).exists() {
                std::fs::copy(snap.join(f), &to)
                    .map_err(BenchError::io(format!("restore {}", to.display())))?;
            }
        }
        self.start()
    }

    /// Its process id while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.https_port)
    }

    /// The MQTT address.
    pub fn mqtt_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.mqtt_port))
    }

    /// The fleet CA certificate (PEM).
    pub fn ca_pem(&self) -> Result<Vec<u8>, BenchError> {
        let p = self.dir.join("ca.pem");
        std::fs::read(&p).map_err(BenchError::io(format!("read {}", p.display())))
    }

    /// The effective `mqtt.*` settings and connection caps, as written in the config file.
    pub fn config_text(&self) -> String {
        std::fs::read_to_string(self.dir.join("devid-server.toml")).unwrap_or_default()
    }

    /// `devid-server --version`.
    pub fn version(bin: &Path) -> String {
        Command::new(bin)
            .arg("--version")
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "unknown".into())
    }
}

impl Drop for DevidServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Mosquitto, configured as the peer.
#[derive(Debug)]
pub struct Mosquitto {
    conf: PathBuf,
    /// Its MQTT port.
    pub port: u16,
    /// stderr of the server.
    pub log: PathBuf,
    child: Option<Child>,
}

/// The Mosquitto configuration used (the port and file paths filled in).
pub fn mosquitto_conf(port: u16, dir: &Path) -> String {
    format!(
        "# Written by devid-bench: Mosquitto as the honest single-machine peer of devid.\n\
         # The harness runs as root; `user root` keeps Mosquitto from dropping to the\n\
         # mosquitto user (it then could not read the copied key). Mosquitto accepts it\n\
         # with a warning.\n\
         user root\n\
         per_listener_settings false\n\
         listener {port} 127.0.0.1\n\
         cafile {dir}/ca.pem\n\
         certfile {dir}/server.pem\n\
         keyfile {dir}/server-key.pem\n\
         tls_version tlsv1.3\n\
         # The same TLS 1.3 suite as devid-server prefers (OpenSSL would pick AES-256/SHA-384).\n\
         ciphers_tls1.3 TLS_AES_128_GCM_SHA256\n\
         require_certificate true\n\
         use_identity_as_username true\n\
         allow_anonymous false\n\
         acl_file {dir}/acl\n\
         # No durable ingest in Mosquitto: acks go out on receipt; persistence is only a\n\
         # periodic snapshot, so it is off.\n\
         persistence false\n\
         set_tcp_nodelay true\n\
         # Mosquitto announces max_inflight_messages (default 20) as its MQTT 5 Receive\n\
         # Maximum; devid announces 128 (mqtt.receive_maximum): the same for both.\n\
         max_inflight_messages 128\n\
         max_connections -1\n\
         max_keepalive 65535\n\
         connection_messages false\n\
         log_dest stderr\n\
         log_type error\n\
         log_type warning\n",
        dir = dir.display()
    )
}

impl Mosquitto {
    /// Write the config, ACL and a copy of devid's CA, server certificate and key into
    /// `work/mosquitto`, and start Mosquitto.
    pub fn start_with(work: &Path, devid_dir: &Path) -> Result<Mosquitto, BenchError> {
        let dir = work.join("mosquitto");
        std::fs::create_dir_all(&dir)
            .map_err(BenchError::io(format!("mkdir {}", dir.display())))?;
        for f in ["ca.pem", "server.pem", "server-key.pem"] {
            std::fs::copy(devid_dir.join(f), dir.join(f))
                .map_err(BenchError::io(format!("copy {f} for Mosquitto")))?;
        }
        std::fs::write(dir.join("acl"), "pattern write devices/%u/#\n")
            .map_err(BenchError::io("write the Mosquitto ACL"))?;
        let port = free_port()?;
        let conf = dir.join("mosquitto.conf");
        std::fs::write(&conf, mosquitto_conf(port, &dir))
            .map_err(BenchError::io("write mosquitto.conf"))?;
        let mut m = Mosquitto {
            conf,
            port,
            log: work.join("mosquitto.log"),
            child: None,
        };
        m.start()?;
        Ok(m)
    }

    /// Start (or restart) it; returns once its port accepts connections.
    pub fn start(&mut self) -> Result<(), BenchError> {
        self.stop();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(BenchError::io(format!("open {}", self.log.display())))?;
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| {
                BenchError::Server(format!(
                    "cannot start mosquitto ({e}): install the Debian package mosquitto"
                ))
            })?;
        self.child = Some(child);
        if !wait_for_port(self.port, Duration::from_secs(20)) {
            self.stop();
            return Err(BenchError::Server(format!(
                "mosquitto did not listen on port {}:\n{}",
                self.port,
                log_tail(&self.log)
            )));
        }
        Ok(())
    }

    /// Kill it.
    pub fn stop(&mut self) {
        kill(&mut self.child);
    }

    /// Its process id while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The MQTT address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The config file text.
    pub fn config_text(&self) -> String {
        std::fs::read_to_string(&self.conf).unwrap_or_default()
    }

    /// First line of `mosquitto -h` (`mosquitto version 2.0.11`).
    pub fn version() -> String {
        Command::new("mosquitto")
            .arg("-h")
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .map(|l| l.trim().to_owned())
            })
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "unknown".into())
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dotted_settings_land_in_their_table() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "a = 1\nmqtt.x = 2\nmqtt.y = 3\n").unwrap();
        edit_toml(
            &p,
            &[
                ("a", toml::Value::Integer(5)),
                ("mqtt.y", toml::Value::Float(1e12)),
            ],
        )
        .unwrap();
        let t: toml::Table = std::fs::read_to_string(&p).unwrap().parse().unwrap();
        assert_eq!(t["a"].as_integer(), Some(5));
        assert_eq!(t["mqtt"]["x"].as_integer(), Some(2));
        assert_eq!(t["mqtt"]["y"].as_float(), Some(1e12));
    }
}
