//! Runs the real `devid` binary against real swtpm / SoftHSM instances.
#![allow(unreachable_pub)]
#![allow(dead_code, clippy::unwrap_used)]

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub struct Devid {
    pub state: PathBuf,
    pub env: Vec<(String, OsString)>,
    _tmp: Option<tempfile::TempDir>,
}

pub struct Run {
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl Run {
    pub fn ok(self) -> Run {
        assert_eq!(self.code, 0, "devid failed: {}", self.stderr);
        self
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

impl Devid {
    /// A device with its own state dir and its own (absent: unanchored) device configuration
    /// file, so no test reads or writes /etc/devid/devid.toml.
    pub fn new() -> Devid {
        let tmp = tempfile::tempdir().unwrap();
        Devid {
            state: tmp.path().join("state"),
            env: vec![(
                "DEVID_CONFIG_FILE".into(),
                tmp.path().join("devid.toml").into(),
            )],
            _tmp: Some(tmp),
        }
    }

    /// A second device view over another state dir (for clone tests).
    pub fn at(state: &Path) -> Devid {
        Devid {
            state: state.to_path_buf(),
            env: vec![(
                "DEVID_CONFIG_FILE".into(),
                state.with_extension("devid.toml").into(),
            )],
            _tmp: None,
        }
    }

    /// The device configuration file this device uses.
    pub fn config_file(&self) -> PathBuf {
        self.env
            .iter()
            .rev()
            .find(|(k, _)| k == "DEVID_CONFIG_FILE")
            .map(|(_, v)| PathBuf::from(v))
            .unwrap()
    }

    /// Install the packaged device configuration (anchor keys commented out) at
    /// [`Devid::config_file`], root-owned 0644 as the package ships it.
    pub fn install_packaged_config(&self) {
        use std::os::unix::fs::PermissionsExt;
        let text = include_str!("../../../../packaging/devid.toml");
        let path = self.config_file();
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    }

    pub fn tcti(mut self, tcti: &str) -> Devid {
        self.env.push(("DEVID_TCTI".into(), tcti.into()));
        self
    }

    pub fn envs(mut self, env: Vec<(String, OsString)>) -> Devid {
        self.env.extend(env);
        self
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_devid"));
        c.arg("--state-dir").arg(&self.state).args(args);
        c.env_remove("DEVID_TCTI");
        c.env_remove("DEVID_CONFIG_FILE");
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    pub fn run(&self, args: &[&str]) -> Run {
        self.run_stdin(args, b"")
    }

    pub fn run_stdin(&self, args: &[&str], stdin: &[u8]) -> Run {
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        let Output {
            status,
            stdout,
            stderr,
        } = child.wait_with_output().unwrap();
        Run {
            code: status.code().unwrap_or(-1),
            stdout,
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        }
    }

    pub fn public_key(&self) -> p256::PublicKey {
        use p256::pkcs8::DecodePublicKey;
        let pem = self.run(&["pubkey"]).ok().text();
        p256::PublicKey::from_public_key_pem(&pem).unwrap()
    }

    /// The round trip every backend must pass: put/get/list/rm, sign + verify with pubkey.
    pub fn round_trip(&self) {
        self.run_stdin(&["secret", "put", "wifi-psk"], b"correct horse battery")
            .ok();
        self.run_stdin(&["secret", "put", "api-key"], b"\x00\x01binary\xff")
            .ok();
        assert_eq!(
            self.run(&["secret", "get", "wifi-psk"]).ok().stdout,
            b"correct horse battery"
        );
        assert_eq!(
            self.run(&["secret", "get", "api-key"]).ok().stdout,
            b"\x00\x01binary\xff"
        );
        assert_eq!(
            self.run(&["secret", "list"]).ok().text(),
            "api-key\nwifi-psk\n"
        );
        self.run(&["secret", "rm", "api-key"]).ok();
        let missing = self.run(&["secret", "get", "api-key"]);
        assert_ne!(missing.code, 0);
        assert!(
            missing.stderr.contains("no secret named 'api-key'"),
            "{}",
            missing.stderr
        );

        let key = self.public_key();
        let sig = self.run_stdin(&["sign"], b"sign me").ok().stdout;
        let sig = p256::ecdsa::Signature::from_der(&sig).unwrap();
        assert!(devid_keystore::verify(&key, b"sign me", &sig));
        assert!(!devid_keystore::verify(&key, b"sign you", &sig));

        let pin = "ab".repeat(32);
        self.run(&["config", "set", "server", "https://127.0.0.1:8443"])
            .ok();
        self.run(&["config", "set", "ca-pin", &pin]).ok();
        let status: serde_json::Value =
            serde_json::from_slice(&self.run(&["status", "--json"]).ok().stdout).unwrap();
        assert_eq!(status["server_url"], "https://127.0.0.1:8443");
        assert_eq!(status["ca_pin"], pin.as_str());
        assert_eq!(status["secret_count"], 1);
        assert_eq!(
            status["public_key_fingerprint"],
            devid_keystore::fingerprint(&key).as_str()
        );
        assert!(!self.run(&["status"]).ok().text().contains("correct horse"));
    }
}

/// Every file of the state dir, concatenated (what a flash dump of it yields).
pub fn dump(dir: &Path) -> Vec<u8> {
    devid_testkit::read_tree(dir)
        .into_iter()
        .flat_map(|(_, bytes)| bytes)
        .collect()
}

/// Assert none of `needles` occurs in the state dir.
pub fn assert_not_in_dump(dir: &Path, needles: &[&[u8]]) {
    for (path, bytes) in devid_testkit::read_tree(dir) {
        for n in needles {
            assert!(
                !devid_testkit::contains(&bytes, n),
                "{} contains a secret in clear",
                path.display()
            );
        }
    }
}
