//! The TPM backend against a real swtpm: round trip, bus capture (T5), TPM swap/clone (T3/T6),
//! PCR policy (T8), interop with tpm2-openssl.

#![allow(clippy::unwrap_used)]

use std::process::Command;

use devid_keystore::{verify, Keystore, KeystoreError};
use devid_keystore_tpm::{danger, TpmInitOptions, TpmKeystore};
use devid_testkit::proxy::RecordingProxy;
use devid_testkit::swtpm::Swtpm;
use devid_testkit::{contains, count};

fn create(
    tpm_tcti: String,
    pcrs: Vec<u8>,
) -> (
    tempfile::TempDir,
    TpmKeystore,
    devid_keystore_tpm::TpmConfig,
) {
    let dir = tempfile::tempdir().unwrap();
    let (ks, cfg) = TpmKeystore::create(
        dir.path(),
        &TpmInitOptions {
            tcti: tpm_tcti,
            pcrs,
            ..TpmInitOptions::default()
        },
    )
    .unwrap();
    (dir, ks, cfg)
}

#[test]
fn round_trip_sign_and_seal() {
    let tpm = Swtpm::start();
    let (dir, ks, cfg) = create(tpm.tcti(), vec![]);
    let sig = ks.sign(b"message").unwrap();
    assert!(verify(&ks.public_key(), b"message", &sig));
    assert!(!verify(&ks.public_key(), b"other", &sig));
    let blob = ks.seal(b"0123456789abcdef0123456789abcdef").unwrap();
    drop(ks);

    let ks = TpmKeystore::open(dir.path(), &cfg, None).unwrap();
    assert_eq!(
        ks.unseal(&blob).unwrap().expose(),
        b"0123456789abcdef0123456789abcdef"
    );
    let sig = ks.sign(b"again").unwrap();
    assert!(verify(&ks.public_key(), b"again", &sig));
    assert!(ks.key_ref().starts_with("tpm:"));
    let pem = std::fs::read_to_string(dir.path().join("tpm-device-key.pem")).unwrap();
    assert!(pem.starts_with("-----BEGIN TSS2 PRIVATE KEY-----"));
}

#[test]
fn bus_capture_shows_only_ciphertext_unless_encryption_is_off() {
    let tpm = Swtpm::start();
    let proxy = RecordingProxy::start(tpm.port());
    let (_dir, ks, _cfg) = create(proxy.tcti(), vec![]);

    let secret = b"T5-SECRET-data-key-0123456789ab!";
    proxy.clear();
    let blob = ks.seal(secret).unwrap();
    let back = ks.unseal(&blob).unwrap();
    assert_eq!(back.expose(), secret);
    let capture = proxy.capture();
    assert!(capture.len() > 200, "the proxy saw the traffic");
    assert_eq!(
        count(&capture, secret),
        0,
        "secret crossed the bus in clear"
    );

    // Commands per sign: the first loads the key, later ones are a single TPM2_Sign.
    proxy.clear();
    ks.sign(b"x").unwrap();
    let first = proxy.command_codes();
    proxy.clear();
    ks.sign(b"y").unwrap();
    let steady = proxy.command_codes();
    println!("TPM commands per sign: first {first:x?}, steady {steady:x?}");
    assert_eq!(steady, vec![0x15d], "steady-state sign is one TPM2_Sign");

    // The same flow with parameter encryption off must expose the secret: the test can fail.
    danger::disable_parameter_encryption(&ks).unwrap();
    let secret2 = b"T5-SECRET-second-key-0123456789!";
    proxy.clear();
    let blob = ks.seal(secret2).unwrap();
    let back = ks.unseal(&blob).unwrap();
    assert_eq!(back.expose(), secret2);
    let capture = proxy.capture();
    assert!(
        count(&capture, secret2) >= 2,
        "without parameter encryption the secret is on the bus (Create and Unseal)"
    );
}

#[test]
fn another_tpm_is_refused() {
    let tpm_a = Swtpm::start();
    let (dir, ks, cfg) = create(tpm_a.tcti(), vec![]);
    let blob = ks.seal(b"clone-me").unwrap();
    drop(ks);

    let tpm_b = Swtpm::start();
    let err = TpmKeystore::open(dir.path(), &cfg, Some(&tpm_b.tcti())).unwrap_err();
    assert!(matches!(err, KeystoreError::OtherDevice { .. }), "{err}");
    assert!(err.to_string().contains("created on another TPM"), "{err}");

    // Even skipping the Name check (recording B's Name), A's blobs do not load in B.
    let (_d2, ks_b, cfg_b) = create(tpm_b.tcti(), vec![]);
    drop(ks_b);
    let mut forged = cfg.clone();
    forged.srk_name = cfg_b.srk_name.clone();
    let ks = TpmKeystore::open(dir.path(), &forged, Some(&tpm_b.tcti())).unwrap();
    let err = ks.unseal(&blob).unwrap_err();
    assert!(matches!(err, KeystoreError::OtherDevice { .. }), "{err}");
    let err = ks.sign(b"x").unwrap_err();
    assert!(matches!(err, KeystoreError::OtherDevice { .. }), "{err}");

    // The original TPM still works.
    let ks = TpmKeystore::open(dir.path(), &cfg, None).unwrap();
    assert_eq!(ks.unseal(&blob).unwrap().expose(), b"clone-me");
}

#[test]
fn no_tpm_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let port = devid_testkit::free_port_pair();
    let err = TpmKeystore::create(
        dir.path(),
        &TpmInitOptions {
            tcti: format!("swtpm:host=127.0.0.1,port={port}"),
            pcrs: vec![],
            ..TpmInitOptions::default()
        },
    )
    .unwrap_err();
    assert!(err.to_string().starts_with("no TPM at swtpm:"), "{err}");
}

#[test]
fn pcr_policy_refuses_after_extend() {
    let tpm = Swtpm::start();
    let (dir, ks, cfg) = create(tpm.tcti(), vec![8]);
    let blob = ks.seal(b"bound-to-pcr-8").unwrap();
    assert_eq!(ks.unseal(&blob).unwrap().expose(), b"bound-to-pcr-8");
    drop(ks); // swtpm serves one client at a time

    let (ok, _, err) = tpm.tpm2(
        "tpm2_pcrextend",
        &["8:sha256=0000000000000000000000000000000000000000000000000000000000000001"],
    );
    assert!(ok, "tpm2_pcrextend failed: {err}");

    let ks = TpmKeystore::open(dir.path(), &cfg, None).unwrap();
    let err = ks.unseal(&blob).unwrap_err();
    assert!(
        matches!(err, KeystoreError::PolicyNotSatisfied { .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("PCR policy not satisfied"),
        "{err}"
    );
}

#[test]
fn tpm2_openssl_signs_with_our_key_file() {
    let tpm = Swtpm::start();
    let (dir, ks, _cfg) = create(tpm.tcti(), vec![]);
    let public = ks.public_key();
    drop(ks);
    let key = dir.path().join("tpm-device-key.pem");
    let data = dir.path().join("data");
    let sig = dir.path().join("sig");
    std::fs::write(&data, b"interop message").unwrap();
    let out = Command::new("openssl")
        .env("TPM2OPENSSL_TCTI", tpm.tcti())
        .args([
            "dgst",
            "-sha256",
            "-provider",
            "tpm2",
            "-provider",
            "default",
        ])
        .args(["-propquery", "?provider=tpm2", "-sign"])
        .arg(&key)
        .arg("-out")
        .arg(&sig)
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl with the tpm2 provider failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let der = std::fs::read(&sig).unwrap();
    let sig = p256::ecdsa::Signature::from_der(&der).unwrap();
    assert!(verify(&public, b"interop message", &sig));
    assert!(contains(&std::fs::read(&key).unwrap(), b"TSS2 PRIVATE KEY"));
}

#[test]
fn persistent_srk_is_used_when_provisioned() {
    let tpm = Swtpm::start();
    let work = tempfile::tempdir().unwrap();
    let ctx = work.path().join("srk.ctx");
    let ctx_s = ctx.to_str().unwrap();
    let (ok, _, err) = tpm.tpm2(
        "tpm2_createprimary",
        &["-C", "o", "-G", "ecc256:aes128cfb", "-c", ctx_s],
    );
    assert!(ok, "{err}");
    let (ok, _, err) = tpm.tpm2("tpm2_evictcontrol", &["-C", "o", "-c", ctx_s, "0x81000001"]);
    assert!(ok, "{err}");
    let (ok, _, err) = tpm.tpm2("tpm2_flushcontext", &["-t"]);
    assert!(ok, "{err}");
    let name_file = work.path().join("srk.name");
    let (ok, _, err) = tpm.tpm2(
        "tpm2_readpublic",
        &["-c", "0x81000001", "-n", name_file.to_str().unwrap()],
    );
    assert!(ok, "{err}");
    let tools_name = hex::encode(std::fs::read(&name_file).unwrap());

    let (dir, ks, cfg) = create(tpm.tcti(), vec![]);
    assert_eq!(cfg.srk_handle, Some(0x8100_0001));
    assert_eq!(
        cfg.srk_name, tools_name,
        "pinned Name is the persistent SRK's"
    );
    let blob = ks.seal(b"persistent").unwrap();
    drop(ks);
    let ks = TpmKeystore::open(dir.path(), &cfg, None).unwrap();
    assert_eq!(ks.unseal(&blob).unwrap().expose(), b"persistent");
    let pem = std::fs::read_to_string(dir.path().join("tpm-device-key.pem")).unwrap();
    let key = devid_keystore_tpm::keyfile::TpmKeyFile::from_pem(&pem).unwrap();
    assert_eq!(key.parent, 0x8100_0001);

    // A TPM whose persistent SRK was replaced (evicted and re-made from another template)
    // is refused before anything secret is sent.
    drop(ks);
    let (ok, _, err) = tpm.tpm2("tpm2_evictcontrol", &["-C", "o", "-c", "0x81000001"]);
    assert!(ok, "{err}");
    let (ok, _, err) = tpm.tpm2(
        "tpm2_createprimary",
        &["-C", "o", "-G", "ecc256:aes256cfb", "-c", ctx_s],
    );
    assert!(ok, "{err}");
    let (ok, _, err) = tpm.tpm2("tpm2_evictcontrol", &["-C", "o", "-c", ctx_s, "0x81000001"]);
    assert!(ok, "{err}");
    let _ = tpm.tpm2("tpm2_flushcontext", &["-t"]);
    let err = TpmKeystore::open(dir.path(), &cfg, None).unwrap_err();
    assert!(matches!(err, KeystoreError::OtherDevice { .. }), "{err}");
}

#[test]
fn our_srk_template_matches_tpm2_tools() {
    // The transient primary devid makes has the same Name as the TCG standard ECC SRK made by
    // tpm2-tools (`-G ecc256:aes128cfb` with the provisioning-guidance attributes, noda
    // included), so `tpm2_load` under that primary accepts our blobs.
    let tpm = Swtpm::start();
    let (_dir, ks, cfg) = create(tpm.tcti(), vec![]);
    drop(ks);
    assert_eq!(cfg.srk_handle, None);
    let work = tempfile::tempdir().unwrap();
    let ctx = work.path().join("srk.ctx");
    let (ok, _, err) = tpm.tpm2(
        "tpm2_createprimary",
        &[
            "-C",
            "o",
            "-G",
            "ecc256:aes128cfb",
            "-a",
            "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda|restricted|decrypt",
            "-c",
            ctx.to_str().unwrap(),
        ],
    );
    assert!(ok, "{err}");
    let name_file = work.path().join("srk.name");
    let (ok, _, err) = tpm.tpm2(
        "tpm2_readpublic",
        &[
            "-c",
            ctx.to_str().unwrap(),
            "-n",
            name_file.to_str().unwrap(),
        ],
    );
    assert!(ok, "{err}");
    let _ = tpm.tpm2("tpm2_flushcontext", &["-t"]);
    assert_eq!(
        hex::encode(std::fs::read(&name_file).unwrap()),
        cfg.srk_name
    );
}
