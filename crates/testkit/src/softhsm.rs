//! SoftHSMv2 tokens for tests: a temp dir with its own `softhsm2.conf` and token store.
//!
//! SoftHSM reads `SOFTHSM2_CONF` when the module is initialised (`C_Initialize`) and is one
//! instance per process, so a test binary uses ONE [`SoftHsm`] and calls
//! [`SoftHsm::install_process_env`] before the first PKCS#11 call; child processes get the
//! variable through [`SoftHsm::env`]. Several tokens can live in one [`SoftHsm`]
//! ([`SoftHsm::init_token`]); a module that is already initialised only sees tokens created
//! after it is finalised and initialised again.

use std::ffi::OsString;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

use crate::require_program;

/// Where Debian's softhsm2 package installs the PKCS#11 module.
pub const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
/// The user PIN of every token made here.
pub const USER_PIN: &str = "1234";
/// The security officer PIN of every token made here.
pub const SO_PIN: &str = "5678";

/// A SoftHSM configuration and token store in a temp dir (removed on drop), with one token
/// initialised at creation.
pub struct SoftHsm {
    dir: TempDir,
    conf: PathBuf,
    label: String,
    pin_file: PathBuf,
}

impl SoftHsm {
    /// A fresh store with one token labelled `label` (user PIN [`USER_PIN`]), and a 0600 PIN
    /// file holding the user PIN followed by a newline.
    pub fn new(label: &str) -> SoftHsm {
        require_program("softhsm2-util", "softhsm2");
        assert!(
            Path::new(MODULE).is_file(),
            "{MODULE} not found: install the Debian package softhsm2"
        );
        let dir = tempfile::Builder::new()
            .prefix("softhsm-")
            .tempdir()
            .unwrap();
        let tokens = dir.path().join("tokens");
        fs::create_dir(&tokens).unwrap();
        fs::set_permissions(&tokens, fs::Permissions::from_mode(0o700)).unwrap();
        let conf = dir.path().join("softhsm2.conf");
        fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n\
                 slots.removable = false\nslots.mechanisms = ALL\n\
                 library.reset_on_fork = false\n",
                tokens.display()
            ),
        )
        .unwrap();
        let pin_file = dir.path().join("user.pin");
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&pin_file)
            .unwrap();
        writeln!(f, "{USER_PIN}").unwrap();
        drop(f);
        let hsm = SoftHsm {
            dir,
            conf,
            label: label.to_string(),
            pin_file,
        };
        hsm.init_token(label);
        hsm
    }

    /// Initialise one more token (same or another label) in the first free slot and return its
    /// serial number. A fresh token always gets a new serial, even with an old label.
    pub fn init_token(&self, label: &str) -> String {
        let before = self.serials();
        let (ok, out, err) = self.util(&[
            "--init-token",
            "--free",
            "--label",
            label,
            "--pin",
            USER_PIN,
            "--so-pin",
            SO_PIN,
        ]);
        assert!(ok, "softhsm2-util --init-token failed: {out} {err}");
        let new: Vec<_> = self
            .serials()
            .into_iter()
            .filter(|s| !before.contains(s))
            .collect();
        assert_eq!(new.len(), 1, "expected one new token, got {new:?}");
        new.into_iter().next().unwrap()
    }

    /// Delete the token with this serial number (its folder in the token dir).
    pub fn delete_token(&self, serial: &str) {
        let (ok, out, err) = self.util(&["--delete-token", "--serial", serial]);
        assert!(ok, "softhsm2-util --delete-token failed: {out} {err}");
    }

    /// Serial numbers of every initialised token, as `softhsm2-util --show-slots` lists them.
    pub fn serials(&self) -> Vec<String> {
        let (ok, out, err) = self.util(&["--show-slots"]);
        assert!(ok, "softhsm2-util --show-slots failed: {err}");
        out.lines()
            .filter_map(|l| l.trim().strip_prefix("Serial number:"))
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    }

    /// Run `softhsm2-util` with this store's configuration: (success, stdout, stderr).
    pub fn util(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", &self.conf)
            .args(args)
            .output()
            .expect("run softhsm2-util");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Point this process's `SOFTHSM2_CONF` at this store. Call it once per test binary,
    /// before the module is first initialised.
    pub fn install_process_env(&self) {
        std::env::set_var("SOFTHSM2_CONF", &self.conf);
    }

    /// Environment to give a child process so it uses this store.
    pub fn env(&self) -> Vec<(String, OsString)> {
        vec![(
            "SOFTHSM2_CONF".to_string(),
            self.conf.clone().into_os_string(),
        )]
    }

    /// The `softhsm2.conf` path.
    pub fn conf(&self) -> &Path {
        &self.conf
    }

    /// The PKCS#11 module path ([`MODULE`]).
    pub fn module(&self) -> PathBuf {
        PathBuf::from(MODULE)
    }

    /// The label of the token made by [`SoftHsm::new`].
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The 0600 file holding the user PIN.
    pub fn pin_file(&self) -> &Path {
        &self.pin_file
    }

    /// The token store: one folder per token, holding its object files.
    pub fn token_dir(&self) -> PathBuf {
        self.dir.path().join("tokens")
    }

    /// The temp dir holding everything.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}
