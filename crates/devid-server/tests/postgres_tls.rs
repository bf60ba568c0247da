//! The real `devid-server` on a PostgreSQL that takes TCP clients over TLS only (the test
//! kit's `PgCluster::start_tls`): `sslmode=verify-full` with the password in a 0600 file
//! (`init --db-password-file`, `database.password_file`), which is in no log line and not in
//! the config; a wrong CA stops `init` and `run` with an error that says so.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::Server;
use devid_testkit::postgres::PgCluster;

fn password_file(dir: &Path, password: &str) -> String {
    let file = dir.join("db.password");
    std::fs::write(&file, format!("{password}\n")).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    file.to_str().unwrap().to_owned()
}

#[test]
fn verify_full_with_the_password_from_a_file_which_is_in_no_log_line() {
    let pg = PgCluster::start_tls(&["localhost", "127.0.0.1"]);
    let secrets = tempfile::tempdir().unwrap();
    let file = password_file(secrets.path(), pg.password());
    let url = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        pg.url_without_password(),
        pg.tls().ca_file.display()
    );
    let a = Server::start_with(&["--db", &url, "--db-password-file", &file]);
    let b = a.another_node();
    // the registry works through both nodes: a token made on A is in the audit B reads
    let token = a.token(&[]);
    assert!(!token.is_empty());
    let audit = b.audit();
    assert!(
        audit.iter().any(|e| e.action == "token.create"),
        "{audit:?}"
    );

    let config = std::fs::read_to_string(a.dir.join("devid-server.toml")).unwrap();
    assert!(
        config.contains(&format!("database.password_file = \"{file}\"")),
        "{config}"
    );
    assert!(
        !config.contains(pg.password()),
        "the password is in the config"
    );
    assert_eq!(pg.connections_by_ssl("devid", "devid-server", false), 0);
    assert!(pg.connections_by_ssl("devid", "devid-server", true) >= 2);
    for node in [&a, &b] {
        let log = node.log_text();
        let ready = log.lines().find(|l| l.contains("PostgreSQL store ready"));
        eprintln!(
            "{}",
            ready.unwrap_or_else(|| panic!("no ready line:\n{log}"))
        );
        assert!(log.contains("server_verified=true"), "{log}");
        assert!(!log.contains("NOT encrypted"), "{log}");
        assert!(
            !log.contains(pg.password()),
            "the database password is in the server log:\n{log}"
        );
    }
}

#[test]
fn a_wrong_database_ca_stops_init_and_run_with_a_clear_error() {
    let pg = PgCluster::start_tls(&["localhost", "127.0.0.1"]);
    let tmp = tempfile::tempdir().unwrap();
    let other = pg.tls().other_ca_file.display().to_string();
    let wrong = format!("{}?sslmode=verify-full&sslrootcert={other}", pg.url());
    let want = format!("the database server's certificate does not chain to sslrootcert={other}");
    let dir = tmp.path().join("data");
    let out = common::run(&[
        "init",
        "--data-dir",
        dir.to_str().unwrap(),
        "--hostname",
        "localhost",
        "--db",
        &wrong,
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("init with a wrong CA: {stderr}");
    assert!(!out.status.success());
    assert!(stderr.contains(&want), "{stderr}");
    assert!(!stderr.contains(pg.password()), "{stderr}");

    // a server set up with the right CA whose config then names the wrong one refuses to run
    let mut s = Server::start_with(&["--db", &pg.tls_url("verify-full")]);
    drop(s.cli(&["token", "create"]));
    s.kill9();
    let cfg = s.dir.join("devid-server.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let ca = pg.tls().ca_file.display().to_string();
    std::fs::write(&cfg, text.replace(&ca, &other)).unwrap();
    let out = common::run(&["run", "--data-dir", s.dir_str()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains(&want), "{stderr}");
    assert!(!stderr.contains(pg.password()), "{stderr}");
}
