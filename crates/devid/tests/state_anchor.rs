//! Review H2 / THREATS.md T13: the device state cannot be swapped or edited offline.
//!
//! Each attack is done as an attacker with the flash in hand would: write files into the
//! state dir while nothing runs, then start `devid status` and `devid agent`. The anchor lives
//! in the root-owned device configuration (`--config-file` / `DEVID_CONFIG_FILE`).

#![allow(clippy::unwrap_used)]

mod common;

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Devid;
use devid_testkit::softhsm::SoftHsm;
use devid_testkit::swtpm::Swtpm;

/// A PKCS#11 "module" whose constructor (run by `dlopen`, before any PKCS#11 call) leaves
/// `marker` behind: the attacker's code running inside devid.
fn evil_module(dir: &Path, marker: &Path) -> PathBuf {
    devid_testkit::require_program("gcc", "gcc");
    let src = dir.join("evil.c");
    std::fs::write(
        &src,
        format!(
            "#include <stdio.h>\n__attribute__((constructor)) static void pwn(void) {{\n\
             FILE *f = fopen(\"{}\", \"w\"); if (f) {{ fputs(\"loaded\", f); fclose(f); }} }}\n\
             int C_GetFunctionList(void **p) {{ (void)p; return 5; }}\n",
            marker.display()
        ),
    )
    .unwrap();
    let so = dir.join("x.so");
    let out = Command::new("gcc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&so)
        .arg(&src)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "gcc: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_file(&src).unwrap();
    so
}

/// Start `devid agent` and wait until it exits (or `limit` passes: then it is killed and
/// `None` is returned). Returns (exit code, stderr).
fn agent_exit(d: &Devid, limit: Duration) -> Option<(i32, String)> {
    let sock = d.state.parent().unwrap().join("agent.sock");
    let mut child = d
        .command(&["agent", "--socket", &sock.display().to_string()])
        .env("DEVID_LOG", "info")
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            return Some((
                st.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ));
        }
        if t.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn replace_line(path: &Path, starts: &str, with: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(
        text.lines().any(|l| l.starts_with(starts)),
        "{starts} not in {text}"
    );
    let out: Vec<String> = text
        .lines()
        .map(|l| {
            if l.starts_with(starts) {
                with.to_string()
            } else {
                l.to_string()
            }
        })
        .collect();
    std::fs::write(path, out.join("\n") + "\n").unwrap();
}

/// Give the attacker's soft vault in `d` everything `devid agent` needs to connect: the
/// victim's device id, an MQTT endpoint of the attacker's choosing, a CA and a certificate
/// for the soft key (made with the key file the attacker holds).
fn arm_attacker_vault(d: &Devid, device_id: &str, mqtt_port: u16) {
    use rcgen::{CertificateParams, DnType, KeyPair, SanType};
    use sha2::{Digest, Sha256};
    let key_pem = std::fs::read_to_string(d.state.join(devid_keystore::soft::KEY_FILE)).unwrap();
    let key = KeyPair::from_pem(&key_pem).unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, device_id);
    p.subject_alt_names = vec![SanType::URI(
        format!("urn:devid:{device_id}").try_into().unwrap(),
    )];
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let cert = p.self_signed(&key).unwrap();
    let (_, vault) = devid::open_vault(&d.state, None).unwrap();
    vault
        .update(|c| {
            c.device_id = Some(device_id.to_string());
            c.mqtt_url = Some(format!("mqtts://127.0.0.1:{mqtt_port}"));
            c.server_url = Some(format!("https://127.0.0.1:{mqtt_port}"));
            c.ca_pin = Some(hex::encode(Sha256::digest(cert.der())));
            c.ca_cert_pem = Some(cert.pem());
            c.cert_chain_pem = Some(cert.pem());
            Ok(())
        })
        .unwrap();
}

/// Nothing connected to `l` (non-blocking accept).
fn nothing_connected(l: &TcpListener) -> bool {
    l.set_nonblocking(true).unwrap();
    matches!(l.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

#[test]
fn unanchored_device_says_so_and_init_fills_the_packaged_file() {
    // No device configuration at all: works as before, but says it is unanchored.
    let d = Devid::new();
    let out = d.run(&["init", "--backend", "soft"]).ok().text();
    assert!(out.contains("unanchored"), "{out}");
    let st = d.run(&["status"]).ok().text();
    assert!(st.contains("UNANCHORED"), "{st}");
    assert!(st.contains("devid anchor"), "{st}");
    let js: serde_json::Value =
        serde_json::from_slice(&d.run(&["status", "--json"]).ok().stdout).unwrap();
    assert_eq!(js["anchor"]["anchored"], false, "{js}");
    // `devid anchor` anchors it.
    d.run(&["anchor"]).ok();
    let st = d.run(&["status"]).ok().text();
    assert!(st.contains("anchored to soft"), "{st}");

    // The packaged file (keys commented out): the first init fills it in, comments kept.
    let e = Devid::new();
    e.install_packaged_config();
    e.run(&["init", "--backend", "soft"]).ok();
    let text = std::fs::read_to_string(e.config_file()).unwrap();
    assert!(text.contains("backend = \"soft\""), "{text}");
    assert!(text.contains("#tcti = "), "{text}");
    let st = e.run(&["status"]).ok().text();
    assert!(st.contains("anchored to soft"), "{st}");
    // Another backend is refused by init.
    let f = Devid::new().envs(vec![("DEVID_CONFIG_FILE".into(), e.config_file().into())]);
    let r = f.run(&["init", "--backend", "tpm", "--tcti", "swtpm:port=1"]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("anchored to the soft backend"),
        "{}",
        r.stderr
    );

    // A configuration writable by others is refused, not silently ignored.
    std::fs::set_permissions(e.config_file(), std::fs::Permissions::from_mode(0o666)).unwrap();
    let r = e.run(&["status"]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("writable by group or others"),
        "{}",
        r.stderr
    );
}

#[test]
fn state_dir_swapped_for_a_soft_vault_is_refused_on_an_anchored_tpm_device() {
    let tpm = Swtpm::start();
    let victim = Devid::new();
    victim.install_packaged_config();
    // The anchor records the TCTI; the victim runs without DEVID_TCTI afterwards.
    victim
        .run(&["--tcti", &tpm.tcti(), "init", "--backend", "tpm"])
        .ok();
    let text = std::fs::read_to_string(victim.config_file()).unwrap();
    assert!(text.contains("backend = \"tpm\""), "{text}");
    assert!(text.contains(&tpm.tcti()), "{text}");
    victim
        .run_stdin(&["secret", "put", "s"], b"victim-secret")
        .ok();
    let st = victim.run(&["status"]).ok().text();
    assert!(st.contains("protection:   hardware"), "{st}");
    // TCTI precedence: the anchor's TCTI wins over what state.toml recorded (here edited
    // to point nowhere), and DEVID_TCTI wins over the anchor.
    let state_toml = victim.state.join("state.toml");
    let recorded = std::fs::read_to_string(&state_toml).unwrap();
    replace_line(
        &state_toml,
        "tcti = ",
        "tcti = \"swtpm:host=127.0.0.1,port=1\"",
    );
    victim.run(&["status"]).ok();
    let r = victim.run(&["--tcti", "swtpm:host=127.0.0.1,port=1", "status"]);
    assert_ne!(r.code, 0, "--tcti did not override the anchor");
    std::fs::write(&state_toml, recorded).unwrap();

    // The attacker builds a soft vault with the victim's id and their own endpoint...
    let attacker_mqtt = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = attacker_mqtt.local_addr().unwrap().port();
    let attacker = Devid::new();
    attacker.run(&["init", "--backend", "soft"]).ok();
    attacker
        .run_stdin(&["secret", "put", "s"], b"attacker-secret")
        .ok();
    arm_attacker_vault(&attacker, "victim-1", port);
    // ...and swaps it in for the victim's state dir, offline.
    std::fs::remove_dir_all(&victim.state).unwrap();
    devid_testkit::copy_tree(&attacker.state, &victim.state);

    for args in [vec!["status"], vec!["secret", "get", "s"], vec!["sign"]] {
        let r = victim.run(&args);
        assert_ne!(r.code, 0, "{args:?} used the swapped-in soft vault");
        assert!(
            r.stderr.contains("anchored to the tpm backend")
                && r.stderr.contains("holds a soft vault"),
            "{args:?}: {}",
            r.stderr
        );
        assert!(!devid_testkit::contains(&r.stdout, b"attacker-secret"));
    }
    let r = agent_exit(&victim, Duration::from_secs(10));
    let (code, log) = r.expect("the agent ran on a swapped-in soft vault");
    assert_ne!(code, 0);
    assert!(log.contains("anchored to the tpm backend"), "{log}");
    assert!(
        nothing_connected(&attacker_mqtt),
        "the agent connected to the attacker's endpoint"
    );
}

#[test]
fn pkcs11_module_planted_in_the_state_dir_is_never_loaded() {
    let hsm = SoftHsm::new("devid-h2");
    let d = Devid::new().envs(hsm.env());
    d.run(&[
        "init",
        "--backend",
        "pkcs11",
        "--module",
        &hsm.module().display().to_string(),
        "--token",
        hsm.label(),
        "--pin-file",
        &hsm.pin_file().display().to_string(),
    ])
    .ok();
    d.run_stdin(&["secret", "put", "s"], b"pkcs11-secret").ok();

    // Offline: a library in the state dir, and state.toml pointing at it.
    let marker = d.state.parent().unwrap().join("PWNED");
    let so = evil_module(&d.state, &marker);
    let state_toml = d.state.join("state.toml");
    let original = std::fs::read_to_string(&state_toml).unwrap();
    replace_line(
        &state_toml,
        "module = ",
        &format!("module = {:?}", so.display().to_string()),
    );
    for args in [vec!["status"], vec!["secret", "get", "s"]] {
        let r = d.run(&args);
        assert!(!marker.exists(), "{args:?} loaded the planted module");
        assert_ne!(r.code, 0, "{args:?}");
        assert!(
            r.stderr.contains("inside the state dir"),
            "{args:?}: {}",
            r.stderr
        );
    }
    let r = agent_exit(&d, Duration::from_secs(10));
    assert!(!marker.exists(), "the agent loaded the planted module");
    let (code, log) = r.expect("the agent kept running");
    assert_ne!(code, 0);
    assert!(log.contains("inside the state dir"), "{log}");

    // The same library in a directory others can write: refused too.
    let open_dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(open_dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let so2 = open_dir.path().join("y.so");
    std::fs::copy(&so, &so2).unwrap();
    replace_line(
        &state_toml,
        "module = ",
        &format!("module = {:?}", so2.display().to_string()),
    );
    let r = d.run(&["status"]);
    assert!(
        !marker.exists(),
        "status loaded a module from a world-writable dir"
    );
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("writable by group or others"),
        "{}",
        r.stderr
    );

    // Anchored: the anchor's module is used whatever state.toml says.
    let cfg = d.config_file();
    std::fs::write(
        &cfg,
        format!(
            "[anchor]\nbackend = \"pkcs11\"\nmodule = {:?}\n",
            hsm.module().display().to_string()
        ),
    )
    .unwrap();
    replace_line(
        &state_toml,
        "module = ",
        &format!("module = {:?}", so.display().to_string()),
    );
    assert_eq!(d.run(&["secret", "get", "s"]).ok().stdout, b"pkcs11-secret");
    assert!(!marker.exists());
    std::fs::write(&state_toml, original).unwrap();
}

#[test]
fn edited_state_toml_is_refused_and_old_vaults_upgrade() {
    let tpm = Swtpm::start();
    let d = Devid::new().tcti(&tpm.tcti());
    d.run(&["init", "--backend", "tpm"]).ok();
    d.run_stdin(&["secret", "put", "s"], b"bound-secret").ok();
    let state_toml = d.state.join("state.toml");
    let original = std::fs::read_to_string(&state_toml).unwrap();
    // Offline: claim the data key is PCR-bound (it is not), as an edit of the trust fields.
    replace_line(&state_toml, "pcrs = ", "pcrs = [8]");
    for args in [vec!["status"], vec!["secret", "get", "s"]] {
        let r = d.run(&args);
        assert_ne!(r.code, 0, "{args:?} accepted an edited state.toml");
        assert!(
            r.stderr.contains("state.toml was changed"),
            "{args:?}: {}",
            r.stderr
        );
        assert!(r.stdout.is_empty());
    }
    std::fs::write(&state_toml, &original).unwrap();
    assert_eq!(d.run(&["secret", "get", "s"]).ok().stdout, b"bound-secret");

    // A vault written by the previous version (bundle format 1, no state binding) opens,
    // and its next write binds it.
    let old = Devid::new();
    {
        devid_keystore::fsutil::ensure_private_dir(&old.state).unwrap();
        let ks =
            std::sync::Arc::new(devid_keystore::soft::SoftKeystore::create(&old.state).unwrap());
        let v = devid_vault::Vault::create(&old.state, ks).unwrap();
        let mut c = v.load().unwrap();
        c.put_secret("old", devid_vault::SecretBytes::from_slice(b"old-value"))
            .unwrap();
        v.store(&c).unwrap();
        devid::state::StateFile::new(devid_keystore::BackendKind::Soft)
            .write(&old.state)
            .unwrap();
    }
    let bundle = old.state.join(devid_vault::BUNDLE_FILE);
    assert_eq!(&std::fs::read(&bundle).unwrap()[8..10], &[0, 1]);
    assert_eq!(old.run(&["secret", "get", "old"]).ok().stdout, b"old-value");
    old.run_stdin(&["secret", "put", "new"], b"new-value").ok();
    assert_eq!(&std::fs::read(&bundle).unwrap()[8..10], &[0, 2]);
    assert_eq!(old.run(&["secret", "get", "old"]).ok().stdout, b"old-value");
    // Now bound: changing the backend line is refused as a changed state file.
    replace_line(
        &old.state.join("state.toml"),
        "backend = ",
        "backend = \"tpm\"",
    );
    std::fs::write(
        old.state.join("state.toml"),
        std::fs::read_to_string(old.state.join("state.toml")).unwrap()
            + "\n[tpm]\ntcti = \"swtpm:port=1\"\nsrk_name = \"00\"\nkey_file = \"k\"\n",
    )
    .unwrap();
    let r = old.run(&["status"]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("state.toml was changed"), "{}", r.stderr);
}
