//! Test support: start the real components devid talks to.
//!
//! * [`swtpm::Swtpm`]: a software TPM 2.0 on two consecutive free loopback ports, fresh state,
//!   killed on drop.
//!   [`swtpm::Swtpm::start_manufactured`] gives one with EK certificates (RSA-2048, P-384) issued
//!   by a hermetic [`swtpm::TpmCa`] (swtpm's local CA in a temp dir; [`swtpm::shared_tpm_ca`]
//!   is one per test binary).
//! * [`proxy::RecordingProxy`]: a TCP proxy that forwards a swtpm's data and control ports
//!   and records every byte of the data channel (the "bus" of THREATS.md T5).
//! * [`softhsm`]: SoftHSMv2 tokens in a temp dir (module in its folder).
//! * [`postgres::PgCluster`]: a throwaway PostgreSQL cluster on a free loopback port.
//! * [`haproxy::Haproxy`]: Debian's HAProxy in TCP mode in front of `devid-server` nodes
//!   (PROXY protocol v2, `/readyz` health checks), the configuration of docs/scaling.md.
//! * [`browser::Browser`]: headless Chromium through ChromeDriver, trusting a given CA.
//!
//! Nothing here is a mock: each helper starts the real program and fails loudly when it is
//! missing, naming the Debian package to install.
#![allow(missing_docs)]
#![allow(clippy::unwrap_used)]

use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

pub mod browser;
pub mod haproxy;
pub mod postgres;
pub mod proxy;
pub mod robust;
pub mod server;
pub mod softhsm;
pub mod swtpm;

/// Path of a binary of this workspace (`devid`, `devid-server`), next to the test executable's
/// `deps` folder. `cargo test --workspace` builds every binary before running tests; a test
/// run for one package alone needs `cargo build --bins` first.
pub fn workspace_bin(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let mut dir = exe.parent().unwrap().to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} not built: run `cargo build --bins` (or `cargo test --workspace`) first",
        path.display()
    );
    path
}

/// Two consecutive free TCP ports on 127.0.0.1 (swtpm's data port and control port = data+1).
pub fn free_port_pair() -> u16 {
    for _ in 0..200 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        if p < 65534 && TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            drop(l);
            return p;
        }
    }
    panic!("no two consecutive free ports on 127.0.0.1");
}

/// One free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Wait until something accepts connections on `port`.
pub fn wait_for_port(port: u16, timeout: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Panic with an actionable message when `program` is not installed.
pub fn require_program(program: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{program} not found: install the Debian package {package} (scripts/test does)"
    );
}

/// Find a byte string inside a haystack.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// Count occurrences of a byte string.
pub fn count(haystack: &[u8], needle: &[u8]) -> usize {
    if needle.is_empty() {
        return 0;
    }
    haystack
        .windows(needle.len())
        .filter(|w| *w == needle)
        .count()
}

/// Every regular file below `dir`, recursively, with its contents.
pub fn read_tree(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                out.push((e.path(), std::fs::read(e.path()).unwrap()));
            }
        }
    }
    out
}

/// Copy a directory tree (files and folders only).
pub fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

/// Set `key = value` lines of `settings` in the config file: an existing line of the same key
/// is replaced, a new key is appended.
pub fn set_config(path: &std::path::Path, settings: &str) {
    let mut text = std::fs::read_to_string(path).unwrap();
    for line in settings.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let key = line.split('=').next().unwrap().trim();
        let mut found = false;
        text = text
            .lines()
            .map(|l| {
                if l.split('=').next().map(str::trim) == Some(key) && !l.starts_with('#') {
                    found = true;
                    line.to_owned()
                } else {
                    l.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
            + "\n";
        if !found {
            text.push_str(line);
            text.push('\n');
        }
    }
    std::fs::write(path, text).unwrap();
}
