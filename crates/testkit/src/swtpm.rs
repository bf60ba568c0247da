//! A real swtpm per test.
//!
//! [`Swtpm::start`] gives a plain TPM (no EK certificate). [`Swtpm::start_manufactured`] first
//! runs `swtpm_setup --create-ek-cert --create-platform-cert` with a [`TpmCa`] (swtpm's local
//! CA, hermetic in a temp dir), so the TPM has what a real one ships with: an RSA-2048 EK
//! certificate at NV 0x01c00002, a P-384 EK certificate at NV 0x01c00016, the EKs persisted at
//! 0x81010001 and 0x81010016, and a platform certificate.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
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

    /// A fresh TPM "from the factory": `swtpm_setup` manufactures it into a new state dir with
    /// EK certificates issued by `ca` (RSA-2048 at NV 0x01c00002, P-384 at NV 0x01c00016,
    /// persistent EKs 0x81010001 / 0x81010016, sha256 PCR bank only), then it is started like
    /// [`Swtpm::start`]. About 0.6 s per TPM once the CA exists.
    pub fn start_manufactured(ca: &TpmCa) -> Swtpm {
        let dir = tempfile::Builder::new().prefix("swtpm-").tempdir().unwrap();
        ca.manufacture(dir.path());
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

impl Swtpm {
    /// Run `tpm2 <args>` (the tpm2-tools multiplexer, e.g. `&["nvread", "0x01c00002", "-o", f]`)
    /// against this TPM and return its raw output (binary stdout kept as bytes). Named
    /// `tpm2_output` because [`Swtpm::tpm2`] (one tool by name, lossy text output) already exists.
    pub fn tpm2_output(&self, args: &[&str]) -> Output {
        require_program("tpm2", "tpm2-tools");
        Command::new("tpm2")
            .env("TPM2TOOLS_TCTI", self.tcti())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run tpm2-tools")
    }

    /// [`Swtpm::tpm2_output`], panicking with the tool's stderr when it fails; returns stdout.
    pub fn tpm2_ok(&self, args: &[&str]) -> Vec<u8> {
        let out = self.tpm2_output(args);
        assert!(
            out.status.success(),
            "tpm2 {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }
}

/// swtpm's local CA (`swtpm_localca`, a root CN=swtpm-localca-rootca and an intermediate
/// CN=swtpm-localca that signs EK certificates), with all its files and the swtpm_setup
/// configuration in its own temp dir: never /etc or /var/lib. Removed on drop.
pub struct TpmCa {
    dir: CaDir,
    /// swtpm_localca locks its state dir itself; this keeps one manufacture at a time per CA
    /// within the process so the log of a failure is the one of its own run.
    lock: Mutex<()>,
}

enum CaDir {
    Owned(TempDir),
    /// The process-wide CA: a fixed dir named after the pid, removed by the next test
    /// binary that finds its process gone (a `static` is never dropped).
    Leaked(PathBuf),
}

impl TpmCa {
    /// A new CA in a fresh temp dir. The root key pair is created right away (one throwaway
    /// manufacture), so [`TpmCa::root_pem`] works before any TPM is made.
    pub fn new() -> TpmCa {
        let dir = tempfile::Builder::new().prefix("tpmca-").tempdir().unwrap();
        Self::init(CaDir::Owned(dir))
    }

    fn init(dir: CaDir) -> TpmCa {
        require_program("swtpm_setup", "swtpm-tools");
        require_program("swtpm_localca", "swtpm-tools");
        require_program("certtool", "gnutls-bin");
        let ca = TpmCa {
            dir,
            lock: Mutex::new(()),
        };
        let b = ca.dir();
        std::fs::create_dir_all(b.join("ca")).unwrap();
        std::fs::write(
            b.join("swtpm-localca.conf"),
            format!(
                "statedir = {d}/ca\nsigningkey = {d}/ca/signkey.pem\n\
                 issuercert = {d}/ca/issuercert.pem\ncertserial = {d}/ca/certserial\n",
                d = b.display()
            ),
        )
        .unwrap();
        std::fs::write(
            b.join("swtpm-localca.options"),
            "--platform-manufacturer devid-test\n--platform-version 1.0\n--platform-model swtpm\n",
        )
        .unwrap();
        std::fs::write(
            b.join("swtpm_setup.conf"),
            format!(
                "create_certs_tool = /usr/bin/swtpm_localca\n\
                 create_certs_tool_config = {d}/swtpm-localca.conf\n\
                 create_certs_tool_options = {d}/swtpm-localca.options\n\
                 active_pcr_banks = sha256\n",
                d = b.display()
            ),
        )
        .unwrap();
        let first = tempfile::Builder::new()
            .prefix("swtpm-ca-init-")
            .tempdir()
            .unwrap();
        ca.manufacture(first.path());
        assert!(
            b.join("ca/swtpm-localca-rootca-cert.pem").is_file(),
            "swtpm_localca did not create its root in {}",
            b.display()
        );
        ca
    }

    /// The CA directory (configuration files, and `ca/` with the keys and certificates).
    pub fn dir(&self) -> &Path {
        match &self.dir {
            CaDir::Owned(t) => t.path(),
            CaDir::Leaked(p) => p,
        }
    }

    /// The root certificate (CN=swtpm-localca-rootca), PEM: what a server trusts.
    pub fn root_pem(&self) -> String {
        std::fs::read_to_string(self.dir().join("ca/swtpm-localca-rootca-cert.pem")).unwrap()
    }

    /// The intermediate (CN=swtpm-localca) that signs the EK certificates, PEM. A TPM does not
    /// carry it in NV; a device or a test passes it as an untrusted intermediate.
    pub fn issuer_pem(&self) -> String {
        std::fs::read_to_string(self.dir().join("ca/issuercert.pem")).unwrap()
    }

    /// Run swtpm_setup into `state` (an empty dir; no swtpm may run on it).
    fn manufacture(&self, state: &Path) {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let out = Command::new("swtpm_setup")
            .args(["--tpm2", "--tpmstate"])
            .arg(state)
            .arg("--config")
            .arg(self.dir().join("swtpm_setup.conf"))
            .args([
                "--create-ek-cert",
                "--create-platform-cert",
                "--pcr-banks",
                "sha256",
                "--overwrite",
            ])
            .stdin(Stdio::null())
            .output()
            .expect("run swtpm_setup");
        assert!(
            out.status.success(),
            "swtpm_setup failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Default for TpmCa {
    fn default() -> Self {
        Self::new()
    }
}

/// One [`TpmCa`] for the whole test binary (created on first use). Its dir is
/// `$TMPDIR/devid-tpmca-<pid>`; since a `static` is never dropped, each call of the first
/// use also removes the dirs of earlier test binaries whose process is gone, so at most one
/// dir per running test binary exists.
pub fn shared_tpm_ca() -> &'static TpmCa {
    static CA: OnceLock<TpmCa> = OnceLock::new();
    CA.get_or_init(|| {
        let tmp = std::env::temp_dir();
        if let Ok(entries) = std::fs::read_dir(&tmp) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(pid) = name.strip_prefix("devid-tpmca-") {
                    if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
                        let _ = std::fs::remove_dir_all(e.path());
                    }
                }
            }
        }
        let dir = tmp.join(format!("devid-tpmca-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TpmCa::init(CaDir::Leaked(dir))
    })
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        self.kill();
    }
}
