//! A throwaway PostgreSQL cluster for one test: `initdb` + `pg_ctl` from the Debian
//! postgresql package, on a free loopback port, removed on drop.
//!
//! PostgreSQL refuses to run as root. When the test runs as root (CI does), the cluster is
//! created and run as the `postgres` system user (`runuser -u postgres --`), in a temp dir
//! owned by that user; otherwise as the current user. The server listens on 127.0.0.1 only,
//! its unix socket lives inside the temp dir, TCP clients authenticate with SCRAM-SHA-256 and
//! a generated password (so tests exercise real password handling), and [`PgCluster::url`]
//! names a database made for the test.

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
        // A free port can be taken between the check and the bind: try a few.
        let log = cluster.dir.path().join("server.log");
        let socket_dir = cluster.dir.path().to_str().unwrap().to_owned();
        for attempt in 0..5 {
            let port = crate::free_port();
            let opts = format!(
                "-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={socket_dir} \
                 -c fsync=off -c synchronous_commit=off -c full_page_writes=off \
                 -c max_connections=100 -c shared_buffers=16MB"
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
