//! A real HAProxy (Debian's `haproxy`) in TCP mode in front of `devid-server` nodes: the
//! configuration `docs/scaling.md` documents, written into a temp dir and run in the
//! foreground (`haproxy -f CFG -db`: no daemon, no systemd), killed on drop.
//!
//! Two frontends, both plain TCP (TLS ends on the nodes, so devices keep their mutual TLS
//! end to end): MQTT and the public HTTPS listener (enrolment, renewal). Both backends send
//! a PROXY protocol v2 header (`send-proxy-v2`) and check each node's `GET /readyz` on its
//! public HTTPS listener over TLS (the node's certificate verified against the fleet CA),
//! with the PROXY header too, since a trusted peer's connection without one is dropped.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::wait_for_port;

/// One `devid-server` node as HAProxy sees it.
#[derive(Debug, Clone)]
pub struct Node {
    /// The server's name in HAProxy (`a`, `b`, `node1`).
    pub name: String,
    /// The node's public HTTPS listener (`https_listen`): enrolment traffic and the check.
    pub https: SocketAddr,
    /// The node's MQTT listener (`mqtt_listen`).
    pub mqtt: SocketAddr,
}

/// What the configuration is made of.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Address the frontends bind (`127.0.0.1` in the test, `0.0.0.0` or a public address in
    /// production).
    pub bind: String,
    /// The MQTT frontend's port (devices' `mqtts://` URL; 8883 in production).
    pub mqtt_port: u16,
    /// The HTTPS frontend's port (enrolment URL; 8443 in production).
    pub https_port: u16,
    /// Local address HAProxy connects to the nodes from (`source`); `None`: the kernel picks.
    /// The nodes' `proxy_protocol.trusted` must contain it.
    pub source: Option<Ipv4Addr>,
    /// The fleet CA (`ca.pem` of the data dir) that signs the nodes' certificates.
    pub ca_file: PathBuf,
    /// The nodes' certificate name (`hostname` of the server config).
    pub server_name: String,
    /// Health check interval in milliseconds.
    pub inter_ms: u32,
    /// Failed checks before a node is marked down.
    pub fall: u32,
    /// Passed checks before a node is marked up again.
    pub rise: u32,
    /// The admin socket (`stats socket`), for `show stat`; `None`: no socket.
    pub stats_socket: Option<PathBuf>,
    /// The nodes.
    pub nodes: Vec<Node>,
}

impl Spec {
    /// The haproxy.cfg text.
    pub fn config(&self) -> String {
        let mut s = String::new();
        s.push_str(
            "# devid-server behind HAProxy in TCP mode (docs/scaling.md). TLS ends on the nodes.\n\
             global\n\
             \x20   # test: logs to stdout of `haproxy -db`; Debian's packaged config logs to\n\
             \x20   # /dev/log and adds chroot, user and group haproxy.\n\
             \x20   log stdout format raw local0 info\n",
        );
        if let Some(sock) = &self.stats_socket {
            s.push_str(&format!(
                "    stats socket {} mode 600 level admin\n",
                sock.display()
            ));
        }
        s.push_str(
            "    # test: 4096 fits the test's file descriptor limit; production: the fleet's size\n\
             \x20   # and headroom (each device holds two descriptors, client and server side)\n\
             \x20   maxconn 4096\n\
             \n\
             defaults\n\
             \x20   mode tcp\n\
             \x20   log global\n\
             \x20   option tcplog\n\
             \x20   timeout connect 2s\n\
             \x20   # longer than the devices' MQTT keep-alive (the agent's default is 30 s)\n\
             \x20   timeout client 10m\n\
             \x20   timeout server 10m\n\
             \x20   timeout check 2s\n\
             \x20   # a refused connection (a node that just stopped) is retried on the other node\n\
             \x20   retries 3\n\
             \x20   option redispatch 1\n\
             \n",
        );
        let default_server = format!(
            "    # test: short check timing so a stopped node is out within about a second;\n\
             \x20   # production: inter 2s fall 3 rise 2\n\
             \x20   default-server inter {}ms fall {} rise {}\n",
            self.inter_ms, self.fall, self.rise
        );
        // the check's TLS: the node's certificate must chain to the fleet CA and name
        // server_name (HAProxy verifies it against the SNI it sends)
        let check = format!(
            "check-ssl check-send-proxy verify required ca-file {} check-sni {}",
            self.ca_file.display(),
            self.server_name
        );
        let source = match self.source {
            Some(ip) => format!(
                "    # test: HAProxy's own address as the nodes see it (a loopback alias); \
                 list it in\n\
                 \x20   # proxy_protocol.trusted\n\
                 \x20   source {ip}\n"
            ),
            None => String::new(),
        };
        let health = "    # each node's readiness (database reachable, MQTT listener up), on its public\n\
                      \x20   # HTTPS listener; the check carries a PROXY header (LOCAL) like all traffic\n\
                      \x20   option httpchk GET /readyz\n\
                      \x20   http-check expect status 200\n";
        for (fe, be, port, what) in [
            ("mqtt", "devid_mqtt", self.mqtt_port, "MQTT over mutual TLS"),
            (
                "enroll",
                "devid_https",
                self.https_port,
                "HTTPS: enrolment, renewal",
            ),
        ] {
            s.push_str(&format!(
                "# {what}\n\
                 frontend {fe}\n\
                 \x20   bind {}:{port}\n\
                 \x20   default_backend {be}\n\
                 \n\
                 backend {be}\n\
                 \x20   balance roundrobin\n",
                self.bind
            ));
            s.push_str(&source);
            s.push_str(health);
            s.push_str(&default_server);
            if fe == "mqtt" {
                s.push_str(
                    "    # a node marked down loses its devices at once (they reconnect to the other)\n\
                     \x20   default-server on-marked-down shutdown-sessions\n",
                );
            }
            for n in &self.nodes {
                let target = if fe == "mqtt" { n.mqtt } else { n.https };
                let port = if fe == "mqtt" {
                    format!(" port {}", n.https.port())
                } else {
                    String::new()
                };
                s.push_str(&format!(
                    "    server {} {target} send-proxy-v2 check{port} {check}\n",
                    n.name
                ));
            }
            s.push('\n');
        }
        s.truncate(s.trim_end().len());
        s.push('\n');
        s
    }
}

/// A running `haproxy -f CFG -db`.
pub struct Haproxy {
    /// Holds haproxy.cfg, the admin socket and the log.
    pub tmp: tempfile::TempDir,
    /// The configuration file.
    pub cfg: PathBuf,
    /// stdout and stderr of haproxy (its log lines and its server state warnings).
    pub log: PathBuf,
    /// The admin socket.
    pub socket: PathBuf,
    child: Option<Child>,
}

/// One line of `show stat`: a server of a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerStat {
    /// Backend name.
    pub backend: String,
    /// Server name.
    pub server: String,
    /// `UP`, `DOWN`, `UP 1/2` (going down), `DOWN 1/2` (coming up), `MAINT`...
    pub status: String,
    /// Sessions open to it now.
    pub current_sessions: u64,
    /// Sessions it has been given in all.
    pub total_sessions: u64,
}

/// The haproxy binary: on PATH, or where Debian puts it.
pub fn binary() -> PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("haproxy"))
            .find(|p| p.is_file())
    });
    let path = on_path.unwrap_or_else(|| PathBuf::from("/usr/sbin/haproxy"));
    assert!(
        path.is_file(),
        "haproxy not found: install the Debian package haproxy (scripts/deps does)"
    );
    path
}

impl Haproxy {
    /// Write `spec`'s configuration (its `stats_socket` set to a socket in the temp dir),
    /// check it (`haproxy -c`), start it in the foreground and wait for both frontends.
    pub fn start(spec: &Spec) -> Haproxy {
        let tmp = tempfile::Builder::new()
            .prefix("haproxy-")
            .tempdir()
            .unwrap();
        let socket = tmp.path().join("admin.sock");
        let mut spec = spec.clone();
        spec.stats_socket = Some(socket.clone());
        let cfg = tmp.path().join("haproxy.cfg");
        std::fs::write(&cfg, spec.config()).unwrap();
        let bin = binary();
        let check = Command::new(&bin)
            .arg("-c")
            .arg("-f")
            .arg(&cfg)
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "haproxy -c refused the configuration:\n{}{}\n{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr),
            spec.config()
        );
        let log = tmp.path().join("haproxy.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(&bin)
            .arg("-f")
            .arg(&cfg)
            .arg("-db")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let mut h = Haproxy {
            tmp,
            cfg,
            log,
            socket,
            child: Some(child),
        };
        for port in [spec.mqtt_port, spec.https_port] {
            if !wait_for_port(port, Duration::from_secs(10)) {
                let text = h.log_text();
                h.stop();
                panic!("haproxy did not listen on {port}:\n{text}");
            }
        }
        h
    }

    /// haproxy's output so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Send one command to the admin socket; its answer.
    pub fn command(&self, cmd: &str) -> std::io::Result<String> {
        let mut s = UnixStream::connect(&self.socket)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(cmd.as_bytes())?;
        s.write_all(b"\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    }

    /// Every server of every backend (`show stat`).
    pub fn servers(&self) -> Vec<ServerStat> {
        let Ok(text) = self.command("show stat") else {
            return Vec::new();
        };
        let mut lines = text.lines();
        let Some(header) = lines.next() else {
            return Vec::new();
        };
        let cols: Vec<&str> = header.trim_start_matches("# ").split(',').collect();
        let col = |name: &str| cols.iter().position(|c| *c == name);
        let (Some(px), Some(sv), Some(st), Some(cur), Some(tot)) = (
            col("pxname"),
            col("svname"),
            col("status"),
            col("scur"),
            col("stot"),
        ) else {
            return Vec::new();
        };
        lines
            .map(|l| l.split(',').collect::<Vec<_>>())
            .filter(|f| f.len() > st && !matches!(f[sv], "FRONTEND" | "BACKEND"))
            .map(|f| ServerStat {
                backend: f[px].to_owned(),
                server: f[sv].to_owned(),
                status: f[st].to_owned(),
                current_sessions: f[cur].parse().unwrap_or(0),
                total_sessions: f[tot].parse().unwrap_or(0),
            })
            .collect()
    }

    /// Wait until `server` is `status` (`UP`, `DOWN`) in every backend; how long it took.
    pub fn wait_status(&self, server: &str, status: &str, timeout: Duration) -> Option<Duration> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            let all = self.servers();
            let mine: Vec<_> = all.iter().filter(|s| s.server == server).collect();
            if !mine.is_empty() && mine.iter().all(|s| s.status == status) {
                return Some(start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Kill haproxy (SIGKILL) and wait for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        self.stop();
    }
}
