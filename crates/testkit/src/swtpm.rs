//! A real swtpm per test.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::{free_port_pair, require_program, wait_for_port};

/// A running `swtpm socket --tpm2` with its own state dir. Killed (and waited for) on drop.
pub struct Swtpm {
    child: Option<Child>,
    port: u16,
    state: StateDir,
}

enum StateDir {
    Owned(TempDir),
    Borrowed(PathBuf),
}

impl StateDir {
    fn path(&self) -> &Path {
        match self {
            StateDir::Owned(t) => t.path(),
            StateDir::Borrowed(p) => p,
        }
    }
}

impl Swtpm {
    /// A fresh TPM: new state dir (so new seeds), new ports.
    pub fn start() -> Swtpm {
        let dir = tempfile::Builder::new().prefix("swtpm-").tempdir().unwrap();
        Self::spawn(StateDir::Owned(dir))
    }

    /// Restart a TPM on an existing state dir (the "same chip after a reboot").
    pub fn start_with_state(dir: &Path) -> Swtpm {
        Self::spawn(StateDir::Borrowed(dir.to_path_buf()))
    }

    fn spawn(mut state: StateDir) -> Swtpm {
        require_program("swtpm", "swtpm");
        for _attempt in 0..5 {
            let port = free_port_pair();
            let child = Command::new("swtpm")
                .args(["socket", "--tpm2", "--tpmstate"])
                .arg(format!("dir={}", state.path().display()))
                .args(["--server"])
                .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
                .args(["--ctrl"])
                .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
                .args(["--flags", "not-need-init,startup-clear"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn swtpm");
            let mut tpm = Swtpm {
                child: Some(child),
                port,
                state,
            };
            if wait_for_port(port, Duration::from_secs(10))
                && wait_for_port(port + 1, Duration::from_secs(10))
            {
                return tpm;
            }
            // Port raced with another test: try again with new ports.
            tpm.kill();
            state = std::mem::replace(&mut tpm.state, StateDir::Borrowed(PathBuf::new()));
        }
        panic!("swtpm did not start");
    }

    /// The data port (control port is this + 1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// TCTI string for tss-esapi / tpm2-tools.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// The swtpm state directory.
    pub fn state_dir(&self) -> &Path {
        self.state.path()
    }

    /// Stop the TPM and wait for the process to exit.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Run a tpm2-tools command against this TPM, returning (success, stdout, stderr).
    pub fn tpm2(&self, tool: &str, args: &[&str]) -> (bool, String, String) {
        require_program(tool, "tpm2-tools");
        let out = Command::new(tool)
            .env("TPM2TOOLS_TCTI", self.tcti())
            .args(args)
            .output()
            .expect("run tpm2-tools");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        self.kill();
    }
}
