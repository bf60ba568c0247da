//! A throwaway PostgreSQL cluster for one test: `initdb` + `pg_ctl` from the Debian
//! postgresql package, on a free loopback port, removed on drop.
//!
//! PostgreSQL refuses to run as root. When the test runs as root (CI does), the cluster is
//! created and run as the `postgres` system user (`runuser -u postgres --`), in a temp dir
//! owned by that user; otherwise as the current user. The server listens on 127.0.0.1 only,
//! its unix socket lives inside the temp dir, TCP clients authenticate with SCRAM-SHA-256 and
//! a generated password (so tests exercise real password handling), and [`PgCluster::url`]
//! names a database made for the test.
//!
//! [`PgCluster::start_tls`] starts one with `ssl = on`, a server certificate issued by a test
//! CA made here with rcgen (for the names the test asks for), and a pg_hba.conf that accepts
//! TCP clients over TLS only (`hostssl`; `hostnossl` lines reject): [`PgTls`] has the CA.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// Where Debian's postgresql package installs the server programs.
pub const BIN_DIR: &str = "/usr/lib/postgresql/15/bin";
/// The superuser of every cluster made here.
pub const SUPERUSER: &str = "postgres";
/// The system user that runs the cluster when the test runs as root.
pub const SYSTEM_USER: &str = "postgres";

/// A running PostgreSQL cluster in a temp dir; `pg_ctl stop -m immediate` and removed on drop.
pub struct PgCluster {
    dir: TempDir,
    data: PathBuf,
    port: u16,
    password: String,
    as_user: Option<&'static str>,
    tls: Option<PgTls>,
}

/// The TLS side of a cluster started by [`PgCluster::start_tls`].
pub struct PgTls {
    /// The test CA that issued the server's certificate (PEM file, world-readable).
    pub ca_file: PathBuf,
    /// An unrelated CA (PEM file), for "wrong CA" tests.
    pub other_ca_file: PathBuf,
    /// The names in the server certificate.
    pub names: Vec<String>,
}

/// A self-signed CA: (params, key, PEM).
fn test_ca(cn: &str) -> (rcgen::Issuer<'static, rcgen::KeyPair>, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let pem = params.self_signed(&key).unwrap().pem();
    (rcgen::Issuer::new(params, key), pem)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl PgCluster {
    /// `initdb` a fresh cluster, start it on a free loopback port, and create the database
    /// `devid`.
    pub fn start() -> PgCluster {
        Self::start_opts(None)
    }

    /// Like [`start`](Self::start), with `ssl = on`, a server certificate for `names` (DNS
    /// names or IP addresses) issued by a fresh test CA, and TCP clients accepted over TLS
    /// only. See [`PgCluster::tls`] for the CA files.
    pub fn start_tls(names: &[&str]) -> PgCluster {
        Self::start_opts(Some(names))
    }

    fn start_opts(tls_names: Option<&[&str]>) -> PgCluster {
        let initdb = Path::new(BIN_DIR).join("initdb");
        assert!(
            initdb.is_file(),
            "{} not found: install the Debian package postgresql (scripts/deps does)",
            initdb.display()
        );
        let as_user = if is_root() {
            crate::require_program("runuser", "util-linux");
            Some(SYSTEM_USER)
        } else {
            None
        };
        let dir = tempfile::Builder::new().prefix("pg-").tempdir().unwrap();
        if let Some(user) = as_user {
            let out = Command::new("chown")
                .args([&format!("{user}:"), dir.path().to_str().unwrap()])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "chown {user} {}: {} (does the user {user} exist? the postgresql package \
                 creates it)",
                dir.path().display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
        let password = random_hex(16);
        let pwfile = dir.path().join("pw");
        fs::write(&pwfile, format!("{password}\n")).unwrap();
        let mut cluster = PgCluster {
            data: dir.path().join("data"),
            dir,
            port: 0,
            password,
            as_user,
            tls: None,
        };
        if let Some(user) = as_user {
            let out = Command::new("chown")
                .args([&format!("{user}:"), pwfile.to_str().unwrap()])
                .output()
                .unwrap();
            assert!(out.status.success());
        }
        let data = cluster.data.to_str().unwrap().to_owned();
        let out = cluster.pg(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                SUPERUSER,
                "--pwfile",
                pwfile.to_str().unwrap(),
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
        );
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let _ = fs::remove_file(&pwfile);
        let mut ssl_opts = String::new();
        if let Some(names) = tls_names {
            ssl_opts = cluster.set_up_tls(names);
        }
        // A free port can be taken between the check and the bind: try a few.
        let log = cluster.dir.path().join("server.log");
        let socket_dir = cluster.dir.path().to_str().unwrap().to_owned();
        for attempt in 0..5 {
            let port = crate::free_port();
            let opts = format!(
                "-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={socket_dir} \
                 -c fsync=off -c synchronous_commit=off -c full_page_writes=off \
                 -c max_connections=100 -c shared_buffers=16MB{ssl_opts}"
            );
            let out = cluster.pg(
                "pg_ctl",
                &[
                    "-D",
                    &data,
                    "-l",
                    log.to_str().unwrap(),
                    "-o",
                    &opts,
                    "-w",
                    "-t",
                    "60",
                    "start",
                ],
            );
            if out.status.success() && crate::wait_for_port(port, Duration::from_secs(10)) {
                cluster.port = port;
                break;
            }
            assert!(
                attempt < 4,
                "pg_ctl start failed: {}{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                fs::read_to_string(&log).unwrap_or_default()
            );
            let _ = cluster.pg("pg_ctl", &["-D", &data, "-m", "immediate", "stop"]);
        }
        cluster.create_database("devid");
        cluster
    }

    /// Write the test CA, the server certificate and key, and a TLS-only pg_hba.conf; returns
    /// the `pg_ctl -o` options that turn TLS on.
    fn set_up_tls(&mut self, names: &[&str]) -> String {
        let dir = self.dir.path();
        let (ca, ca_pem) = test_ca("devid test database CA");
        let (_, other_pem) = test_ca("devid test database CA (another one)");
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            names.first().copied().unwrap_or("db"),
        );
        let cert = params.signed_by(&key, &ca).unwrap();
        let ca_file = dir.join("db-ca.pem");
        let other_ca_file = dir.join("other-ca.pem");
        let cert_file = dir.join("server.crt");
        let key_file = dir.join("server.key");
        fs::write(&ca_file, &ca_pem).unwrap();
        fs::write(&other_ca_file, &other_pem).unwrap();
        fs::write(&cert_file, format!("{}{ca_pem}", cert.pem())).unwrap();
        fs::write(&key_file, key.serialize_pem()).unwrap();
        for f in [&ca_file, &other_ca_file, &cert_file] {
            fs::set_permissions(f, fs::Permissions::from_mode(0o644)).unwrap();
        }
        // PostgreSQL wants its key owned by itself and 0600.
        fs::set_permissions(&key_file, fs::Permissions::from_mode(0o600)).unwrap();
        // Local (unix socket) clients as before; TCP only with TLS.
        let hba = self.data.join("pg_hba.conf");
        fs::write(
            &hba,
            "local all all trust\n\
             local replication all trust\n\
             hostssl all all 127.0.0.1/32 scram-sha-256\n\
             hostssl all all ::1/128 scram-sha-256\n\
             hostnossl all all 0.0.0.0/0 reject\n\
             hostnossl all all ::/0 reject\n",
        )
        .unwrap();
        if let Some(user) = self.as_user {
            for f in [&key_file, &cert_file, &hba] {
                let out = Command::new("chown")
                    .args([&format!("{user}:"), f.to_str().unwrap()])
                    .output()
                    .unwrap();
                assert!(out.status.success());
            }
        }
        self.tls = Some(PgTls {
            ca_file,
            other_ca_file,
            names: names.iter().map(|n| n.to_string()).collect(),
        });
        format!(
            " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
            cert_file.display(),
            key_file.display()
        )
    }

    /// The TLS files of a cluster started by [`start_tls`](Self::start_tls).
    pub fn tls(&self) -> &PgTls {
        self.tls
            .as_ref()
            .expect("a cluster started by PgCluster::start_tls")
    }

    /// [`url`](Self::url) with `?sslmode=MODE&sslrootcert=THE_TEST_CA` (a TLS cluster's).
    pub fn tls_url(&self, mode: &str) -> String {
        format!(
            "{}?sslmode={mode}&sslrootcert={}",
            self.url(),
            self.tls().ca_file.display()
        )
    }

    /// The URL of the `devid` database without the password (for a password file).
    pub fn url_without_password(&self) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/devid", self.port)
    }

    /// How many client connections to database `db` are (`true`) or are not encrypted, as
    /// PostgreSQL sees them (`pg_stat_ssl`), among those whose application name starts with
    /// `app`.
    pub fn connections_by_ssl(&self, db: &str, app: &str, ssl: bool) -> usize {
        assert!(app
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_:".contains(&b)));
        self.psql(
            "postgres",
            &format!(
                "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
                 WHERE a.datname = '{db}' AND a.application_name LIKE '{app}%' AND s.ssl = {ssl}"
            ),
        )
        .trim()
        .parse()
        .unwrap()
    }

    /// Run a program of [`BIN_DIR`] as the cluster's user.
    fn pg(&self, program: &str, args: &[&str]) -> Output {
        let path = Path::new(BIN_DIR).join(program);
        let mut cmd = match self.as_user {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&path);
                c
            }
            None => Command::new(&path),
        };
        cmd.args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// Run SQL as the superuser over the unix socket (`psql`), panicking on failure; returns
    /// what psql printed (unaligned, tuples only).
    pub fn psql(&self, database: &str, sql: &str) -> String {
        let out = self.psql_output(database, sql);
        assert!(
            out.status.success(),
            "psql {sql:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Run SQL as the superuser over the unix socket; the raw result.
    pub fn psql_output(&self, database: &str, sql: &str) -> Output {
        let port = self.port.to_string();
        let host = self.dir.path().to_str().unwrap().to_owned();
        self.pg(
            "psql",
            &[
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                &host,
                "-p",
                &port,
                "-U",
                SUPERUSER,
                "-d",
                database,
                "-c",
                sql,
            ],
        )
    }

    /// Create another database; returns its URL.
    pub fn create_database(&self, name: &str) -> String {
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
            "database names here are [a-z0-9_]"
        );
        self.psql("postgres", &format!("CREATE DATABASE {name}"));
        self.url_for(name)
    }

    /// The URL of the `devid` database (with the password).
    pub fn url(&self) -> String {
        self.url_for("devid")
    }

    /// The URL of database `name` (with the password).
    pub fn url_for(&self, name: &str) -> String {
        format!(
            "postgres://{SUPERUSER}:{}@127.0.0.1:{}/{name}",
            self.password, self.port
        )
    }

    /// The superuser's generated password.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's log file.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if let Some(data) = self.data.to_str() {
            let _ = self.pg("pg_ctl", &["-D", data, "-m", "immediate", "-w", "stop"]);
        }
        // Wait for the postmaster to be gone before the temp dir is removed.
        let pid_file = self.data.join("postmaster.pid");
        let start = Instant::now();
        while pid_file.exists() && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    let mut f = fs::File::open("/dev/urandom").unwrap();
    std::io::Read::read_exact(&mut f, &mut buf).unwrap();
    buf.iter().map(|b| format!("{b:02x}")).collect()
}
