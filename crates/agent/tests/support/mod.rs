//! Test support for the agent: a throwaway PKI (rcgen), a real Mosquitto 2 broker on free
//! loopback ports, a real `mosquitto_sub` subscriber counting what the broker delivers, and a
//! pipelining local-socket client. Also included by crates/devid/tests/agent_*.rs.
#![allow(dead_code, unreachable_pub, missing_docs, clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType, IsCa, Issuer,
    KeyIdMethod, KeyPair, KeyUsagePurpose, RevocationReason, RevokedCertParams, SanType,
    SerialNumber,
};
use sha2::{Digest, Sha256};

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn wait_port(port: u16, timeout: Duration) -> bool {
    let t = Instant::now();
    while t.elapsed() < timeout {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Poll `f` until it returns `Some`, or panic with `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let t = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(t.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A throwaway CA with a server certificate for 127.0.0.1/localhost.
pub struct Pki {
    issuer: Issuer<'static, KeyPair>,
    pub ca_pem: String,
    pub pin: String,
    pub server_pem: String,
    pub server_key_pem: String,
}

impl Pki {
    pub fn new() -> Pki {
        let ca_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "devid agent test CA");
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = params.self_signed(&ca_key).unwrap();
        let ca_pem = ca.pem();
        let pin = hex::encode(Sha256::digest(ca.der()));
        let issuer = Issuer::new(params, ca_key);
        let server_key = KeyPair::generate().unwrap();
        let mut sp =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        sp.distinguished_name.push(DnType::CommonName, "localhost");
        let server = sp.signed_by(&server_key, &issuer).unwrap();
        Pki {
            issuer,
            ca_pem,
            pin,
            server_pem: server.pem(),
            server_key_pem: server_key.serialize_pem(),
        }
    }

    /// A device certificate (leaf + CA, PEM) for the key whose SPKI DER is given.
    pub fn device_chain(&self, id: &str, spki_der: &[u8], serial: u64, days: i64) -> String {
        let spki = rcgen::SubjectPublicKeyInfo::from_der(spki_der).unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, id);
        p.subject_alt_names = vec![SanType::URI(format!("urn:devid:{id}").try_into().unwrap())];
        p.serial_number = Some(SerialNumber::from(serial));
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::minutes(1);
        p.not_after = now + time::Duration::days(days);
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = p.signed_by(&spki, &self.issuer).unwrap();
        format!("{}{}", cert.pem(), self.ca_pem)
    }

    /// A CRL (PEM) revoking `serials`.
    pub fn crl(&self, serials: &[u64]) -> String {
        let now = time::OffsetDateTime::now_utc();
        CertificateRevocationListParams {
            this_update: now - time::Duration::minutes(1),
            next_update: now + time::Duration::days(1),
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|s| RevokedCertParams {
                    serial_number: SerialNumber::from(*s),
                    revocation_time: now - time::Duration::seconds(30),
                    reason_code: Some(RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&self.issuer)
        .unwrap()
        .pem()
        .unwrap()
    }
}

/// A real Mosquitto 2 broker: an mTLS listener (require_certificate) and a plain loopback
/// listener for the test's subscriber.
pub struct Mosquitto {
    pub dir: tempfile::TempDir,
    pub tls_port: u16,
    pub plain_port: u16,
    child: Option<Child>,
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

impl Mosquitto {
    pub fn start(pki: &Pki) -> Mosquitto {
        Self::start_with(
            &pki.ca_pem,
            &pki.server_pem,
            &pki.server_key_pem,
            free_port(),
        )
    }

    pub fn start_with(ca_pem: &str, cert_pem: &str, key_pem: &str, tls_port: u16) -> Mosquitto {
        let dir = tempfile::tempdir().unwrap();
        let mut m = Mosquitto {
            dir,
            tls_port,
            plain_port: free_port(),
            child: None,
            ca_pem: ca_pem.into(),
            cert_pem: cert_pem.into(),
            key_pem: key_pem.into(),
        };
        m.run(None);
        m
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    /// (Re)start, optionally with a CRL.
    pub fn run(&mut self, crl_pem: Option<&str>) {
        self.stop();
        let d = self.dir.path();
        std::fs::write(d.join("ca.pem"), &self.ca_pem).unwrap();
        std::fs::write(d.join("server.pem"), &self.cert_pem).unwrap();
        std::fs::write(d.join("server-key.pem"), &self.key_pem).unwrap();
        let crl_line = match crl_pem {
            Some(c) => {
                std::fs::write(d.join("crl.pem"), c).unwrap();
                format!("crlfile {}\n", d.join("crl.pem").display())
            }
            None => String::new(),
        };
        let conf = format!(
            "user root\npersistence true\npersistence_location {pdir}/\nautosave_interval 1\nallow_anonymous true\nset_tcp_nodelay true\n\
             max_queued_messages 100000\nmax_inflight_messages 0\n\
             log_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\nlog_type information\n\
             listener {tls} 127.0.0.1\ncafile {ca}\ncertfile {cert}\nkeyfile {key}\n\
             require_certificate true\nuse_identity_as_username true\n{crl}\
             listener {plain} 127.0.0.1\n",
            tls = self.tls_port,
            plain = self.plain_port,
            ca = d.join("ca.pem").display(),
            cert = d.join("server.pem").display(),
            key = d.join("server-key.pem").display(),
            crl = crl_line,
            pdir = d.display(),
        );
        std::fs::write(d.join("mosquitto.conf"), conf).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("mosquitto.log"))
            .unwrap();
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(d.join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("mosquitto (Debian package mosquitto) must be installed");
        self.child = Some(child);
        assert!(
            wait_port(self.tls_port, Duration::from_secs(10))
                && wait_port(self.plain_port, Duration::from_secs(10)),
            "mosquitto did not start: {}",
            self.log()
        );
    }

    /// Stop gracefully (SIGTERM: the broker saves its sessions, so the test's subscriber
    /// keeps its subscription and queued messages across a restart).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kick the client `id` off by connecting another client with the same id.
    pub fn take_over(&self, id: &str) {
        let out = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &self.plain_port.to_string()])
            .args(["-i", id, "-t", "test/takeover", "-m", "x"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A `mosquitto_sub` subscribed to `devices/#` with QoS 1 on the plain listener; every line
/// it prints is `topic msg-id:<key> payload`.
static NEXT_SUB: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

pub struct Subscriber {
    child: Child,
    out: PathBuf,
    _dir: tempfile::TempDir,
    port: u16,
}

impl Subscriber {
    pub fn start(port: u16) -> Subscriber {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("sub.txt");
        let child = Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args([
                "-V",
                "mqttv5",
                "-q",
                "1",
                "-t",
                "devices/#",
                "-t",
                "probe/#",
            ])
            .args([
                "-c",
                "-i",
                &format!(
                    "test-sub-{}-{}",
                    std::process::id(),
                    NEXT_SUB.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
                ),
            ])
            .args(["-x", "3600"])
            .args(["-F", "%t %P %p"])
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto_sub (Debian package mosquitto-clients) must be installed");
        let s = Subscriber {
            child,
            out,
            _dir: dir,
            port,
        };
        // Subscribed once a probe comes back.
        wait_for("the subscriber", Duration::from_secs(10), || {
            let _ = Command::new("mosquitto_pub")
                .args(["-h", "127.0.0.1", "-p", &port.to_string()])
                .args(["-t", "probe/x", "-m", "probe", "-q", "1"])
                .output();
            s.raw().contains("probe/x").then_some(())
        });
        s
    }

    pub fn raw(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// (topic, msg-id, payload) of every device message received so far.
    pub fn messages(&self) -> Vec<(String, String, String)> {
        self.raw()
            .lines()
            .filter(|l| l.starts_with("devices/"))
            .filter_map(|l| {
                let mut it = l.splitn(3, ' ');
                let topic = it.next()?.to_string();
                let id = it.next()?.strip_prefix("msg-id:")?.to_string();
                let payload = it.next().unwrap_or("").to_string();
                Some((topic, id, payload))
            })
            .collect()
    }

    /// Payload → number of deliveries.
    pub fn counts(&self) -> HashMap<String, usize> {
        let mut m = HashMap::new();
        for (_, _, p) in self.messages() {
            *m.entry(p).or_insert(0) += 1;
        }
        m
    }

    /// Wait until `n` distinct payloads arrived.
    pub fn wait_distinct(&self, n: usize, timeout: Duration) -> HashMap<String, usize> {
        let t = Instant::now();
        loop {
            let c = self.counts();
            if c.len() >= n {
                return c;
            }
            assert!(
                t.elapsed() < timeout,
                "only {} of {n} messages arrived at the broker",
                c.len()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One answer of the agent.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Answer {
    pub ok: bool,
    pub seq: Option<u64>,
    pub msg_id: Option<String>,
    pub code: Option<String>,
    pub error: Option<String>,
    pub id: Option<serde_json::Value>,
}

/// Publish `payloads` on one connection, pipelined (a writer thread, answers read in order).
/// Returns the answers received (fewer if the agent went away).
pub fn publish_pipelined(socket: &Path, topic: &str, payloads: Vec<String>) -> Vec<Answer> {
    let Ok(stream) = UnixStream::connect(socket) else {
        return Vec::new();
    };
    let mut w = stream.try_clone().unwrap();
    let topic = topic.to_string();
    let n = payloads.len();
    let writer = std::thread::spawn(move || {
        let mut buf = Vec::new();
        for (i, p) in payloads.iter().enumerate() {
            let line = serde_json::json!({
                "op": "publish",
                "topic": topic,
                "payload": base64::engine::general_purpose::STANDARD.encode(p),
                "id": i,
            });
            buf.extend_from_slice(line.to_string().as_bytes());
            buf.push(b'\n');
            if buf.len() > 32 * 1024 {
                if w.write_all(&buf).is_err() {
                    return;
                }
                buf.clear();
            }
        }
        let _ = w.write_all(&buf);
    });
    let mut answers = Vec::with_capacity(n);
    let mut r = BufReader::new(stream);
    for _ in 0..n {
        let mut line = String::new();
        match r.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => answers.push(serde_json::from_str(&line).unwrap()),
        }
    }
    let _ = writer.join();
    answers
}

/// Send raw bytes on a fresh connection and return every answer line until EOF or timeout.
pub fn raw_exchange(socket: &Path, bytes: &[u8], timeout: Duration) -> Vec<serde_json::Value> {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(timeout)).unwrap();
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = Vec::new();
    for line in BufReader::new(s).lines() {
        match line {
            Ok(l) => out.push(serde_json::from_str(&l).unwrap()),
            Err(_) => break,
        }
    }
    out
}
