//! `devid` on a real swtpm: round trip, flash dump (T2), clone/swap (T3/T6), tamper (T4),
//! bus capture of the whole CLI flow (T5), PCR policy (T8), process hygiene (T7).

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::{assert_not_in_dump, Devid};
use devid_testkit::proxy::RecordingProxy;
use devid_testkit::swtpm::Swtpm;

#[test]
fn tpm_round_trip() {
    let tpm = Swtpm::start();
    let d = Devid::new().tcti(&tpm.tcti());
    let out = d.run(&["init", "--backend", "tpm"]).ok();
    assert!(
        out.text().contains("initialised a tpm vault"),
        "{}",
        out.text()
    );
    d.round_trip();
    let status = d.run(&["status"]).ok().text();
    assert!(status.contains("protection:   hardware"), "{status}");
}

#[test]
fn tpm_flash_dump_yields_no_secret() {
    let tpm = Swtpm::start();
    let d = Devid::new().tcti(&tpm.tcti());
    d.run(&["init", "--backend", "tpm"]).ok();
    d.run_stdin(&["secret", "put", "s"], b"FLASH-DUMP-SECRET-42")
        .ok();
    d.run(&["config", "set", "server", "https://flash.example:8443"])
        .ok();

    // The data key, recovered through the TPM the way only this device can.
    let state = devid::state::StateFile::require(&d.state).unwrap();
    let ks = state.open_keystore(&d.state, Some(&tpm.tcti())).unwrap();
    let sealed = std::fs::read(d.state.join(devid_vault::DATA_KEY_FILE)).unwrap();
    let data_key = ks.unseal(&sealed).unwrap();
    assert_eq!(data_key.len(), 32);
    let vault = devid_vault::Vault::open(&d.state, Arc::clone(&ks)).unwrap();
    let contents = vault.load().unwrap();
    assert_eq!(contents.secrets["s"].expose(), b"FLASH-DUMP-SECRET-42");
    drop((vault, ks));

    assert_not_in_dump(
        &d.state,
        &[b"FLASH-DUMP-SECRET-42", data_key.expose(), b"flash.example"],
    );
}

#[test]
fn state_copied_to_another_tpm_is_refused() {
    let tpm_a = Swtpm::start();
    let a = Devid::new().tcti(&tpm_a.tcti());
    a.run(&["init", "--backend", "tpm"]).ok();
    a.run_stdin(&["secret", "put", "s"], b"clone-secret").ok();

    let tpm_b = Swtpm::start();
    let copy = tempfile::tempdir().unwrap();
    devid_testkit::copy_tree(&a.state, copy.path());
    let b = Devid::at(copy.path()).tcti(&tpm_b.tcti());
    for args in [
        vec!["status"],
        vec!["secret", "get", "s"],
        vec!["pubkey"],
        vec!["sign"],
        vec!["init", "--backend", "tpm"],
    ] {
        let r = b.run(&args);
        assert_ne!(r.code, 0, "{args:?} succeeded on another TPM");
        assert!(
            r.stderr.contains("this vault was created on another TPM"),
            "{args:?}: {}",
            r.stderr
        );
        assert!(!r.stdout.windows(12).any(|w| w == b"clone-secret"));
    }
    // The original device is unaffected.
    assert_eq!(a.run(&["secret", "get", "s"]).ok().stdout, b"clone-secret");
}

#[test]
fn tampered_bundle_is_refused_and_nothing_used() {
    let tpm = Swtpm::start();
    let d = Devid::new().tcti(&tpm.tcti());
    d.run(&["init", "--backend", "tpm"]).ok();
    d.run_stdin(&["secret", "put", "s"], b"tamper-secret").ok();
    d.run(&["config", "set", "server", "https://good.example:8443"])
        .ok();
    let path = d.state.join(devid_vault::BUNDLE_FILE);
    let original = std::fs::read(&path).unwrap();
    let n = original.len();
    // Header (magic, version, alg), nonce, ciphertext start/middle/end, tag.
    for offset in [
        0,
        8,
        10,
        11,
        15,
        23,
        24,
        n / 2,
        n - 17,
        n - 16,
        n - 8,
        n - 1,
    ] {
        let mut bytes = original.clone();
        bytes[offset] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap();
        for args in [vec!["secret", "get", "s"], vec!["status", "--json"]] {
            let r = d.run(&args);
            assert_ne!(
                r.code, 0,
                "offset {offset}: {args:?} accepted a changed bundle"
            );
            assert!(
                r.stdout.is_empty(),
                "offset {offset}: something was printed"
            );
            assert!(
                r.stderr.contains("bundle failed authentication")
                    || r.stderr.contains("bundle format"),
                "offset {offset}: {}",
                r.stderr
            );
        }
    }
    std::fs::write(&path, &original[..n - 1]).unwrap();
    assert_ne!(d.run(&["secret", "get", "s"]).code, 0);
    std::fs::write(&path, &original).unwrap();
    assert_eq!(d.run(&["secret", "get", "s"]).ok().stdout, b"tamper-secret");
}

#[test]
fn cli_flow_through_a_bus_probe_shows_no_secret() {
    let tpm = Swtpm::start();
    let probe = RecordingProxy::start(tpm.port());
    let d = Devid::new().tcti(&probe.tcti());
    d.run(&["init", "--backend", "tpm"]).ok();
    d.run_stdin(&["secret", "put", "s"], b"BUS-PROBE-SECRET-99")
        .ok();
    assert_eq!(
        d.run(&["secret", "get", "s"]).ok().stdout,
        b"BUS-PROBE-SECRET-99"
    );
    let capture = probe.capture();
    assert!(capture.len() > 1000, "the probe saw the traffic");

    let state = devid::state::StateFile::require(&d.state).unwrap();
    let ks = state.open_keystore(&d.state, Some(&tpm.tcti())).unwrap();
    let sealed = std::fs::read(d.state.join(devid_vault::DATA_KEY_FILE)).unwrap();
    let data_key = ks.unseal(&sealed).unwrap();
    assert!(!devid_testkit::contains(&capture, b"BUS-PROBE-SECRET-99"));
    assert!(
        !devid_testkit::contains(&capture, data_key.expose()),
        "data key on the bus"
    );
}

#[test]
fn pcr_bound_vault_refuses_after_extend() {
    let tpm = Swtpm::start();
    let d = Devid::new().tcti(&tpm.tcti());
    d.run(&["init", "--backend", "tpm", "--pcrs", "8"]).ok();
    d.run_stdin(&["secret", "put", "s"], b"pcr-secret").ok();
    assert_eq!(d.run(&["secret", "get", "s"]).ok().stdout, b"pcr-secret");
    let (ok, _, err) = tpm.tpm2(
        "tpm2_pcrextend",
        &["8:sha256=1111111111111111111111111111111111111111111111111111111111111111"],
    );
    assert!(ok, "{err}");
    let r = d.run(&["secret", "get", "s"]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("PCR policy not satisfied"),
        "{}",
        r.stderr
    );
    assert!(r.stdout.is_empty());
}

/// Review M1/M5: with `--pcrs` the device key's use is PCR-bound as well: after a changed
/// boot (an extended PCR) the key no longer signs, so a modified OS cannot authenticate as
/// the device, while the public key stays readable.
#[test]
fn pcr_bound_device_key_refuses_to_sign_after_extend() {
    let tpm = Swtpm::start();
    let d = Devid::new().tcti(&tpm.tcti());
    d.run(&["init", "--backend", "tpm", "--pcrs", "8"]).ok();
    let key = d.public_key();
    let sig = d.run_stdin(&["sign"], b"good boot").ok().stdout;
    let sig = p256::ecdsa::Signature::from_der(&sig).unwrap();
    assert!(devid_keystore::verify(&key, b"good boot", &sig));
    let state = std::fs::read_to_string(d.state.join("state.toml")).unwrap();
    assert!(state.contains("key_pcrs = [8]"), "{state}");
    let (ok, _, err) = tpm.tpm2(
        "tpm2_pcrextend",
        &["8:sha256=2222222222222222222222222222222222222222222222222222222222222222"],
    );
    assert!(ok, "{err}");
    let r = d.run_stdin(&["sign"], b"modified boot");
    assert_ne!(r.code, 0, "the device key signed after the boot changed");
    assert!(
        r.stderr.contains("PCR policy not satisfied"),
        "{}",
        r.stderr
    );
    assert!(r.stdout.is_empty());
    assert_eq!(d.public_key(), key);
}

#[test]
fn no_tpm_is_a_clear_error() {
    let port = devid_testkit::free_port_pair();
    let d = Devid::new().tcti(&format!("swtpm:host=127.0.0.1,port={port}"));
    let r = d.run(&["init", "--backend", "tpm"]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("no TPM at swtpm:"), "{}", r.stderr);
    assert!(
        !r.stderr.contains("ERROR:tcti"),
        "tpm2-tss noise leaked: {}",
        r.stderr
    );
}

/// Issue 12 item 3: on a TPM without a resource manager, a full object memory (what a killed
/// process leaves behind) is explained, and a plain command does not flush anything (only
/// `devid agent` may: it could cut a running agent's objects).
#[test]
fn full_tpm_object_memory_is_explained_and_not_flushed_by_commands() {
    let tpm = Swtpm::start();
    let d = Devid::new().tcti(&tpm.tcti());
    d.run(&["init", "--backend", "tpm"]).ok();
    let ctx = d.state.parent().unwrap().join("p.ctx");
    let ctx = ctx.display().to_string();
    // Another TPM user's leftovers: fill every transient object slot of swtpm.
    let mut loaded = 0;
    for _ in 0..8 {
        let (ok, _, _) = tpm.tpm2("tpm2_createprimary", &["-C", "o", "-c", &ctx]);
        if !ok {
            break;
        }
        loaded += 1;
    }
    assert!(loaded >= 2, "could not fill the TPM ({loaded} objects)");
    let r = d.run(&["status"]);
    assert_ne!(r.code, 0, "status worked with a full TPM");
    assert!(
        r.stderr.contains("no free object slot") && r.stderr.contains("devid agent"),
        "{}",
        r.stderr
    );
    let (_, handles, _) = tpm.tpm2("tpm2_getcap", &["handles-transient"]);
    assert_eq!(
        handles.matches("0x80").count(),
        loaded,
        "a plain command flushed other users' objects: {handles}"
    );
}

/// Review M5: PCRs 16-23 can be reset by software, so a binding to them proves nothing;
/// `devid init` refuses them unless explicitly allowed.
#[test]
fn resettable_pcrs_are_refused_unless_allowed() {
    let tpm = Swtpm::start();
    let d = Devid::new().tcti(&tpm.tcti());
    for list in ["16", "7,23"] {
        let r = d.run(&["init", "--backend", "tpm", "--pcrs", list]);
        assert_ne!(r.code, 0, "--pcrs {list} accepted");
        assert!(
            r.stderr.contains("can be reset by software"),
            "{}",
            r.stderr
        );
        assert!(!d.state.join("state.toml").exists());
    }
    d.run(&[
        "init",
        "--backend",
        "tpm",
        "--pcrs",
        "16",
        "--allow-resettable-pcrs",
    ])
    .ok();
}

/// Review L1: a persistent key at 0x81000001 is used as the SRK only if it has the standard
/// template; another key there (here an RSA primary) is refused at init, clearly.
#[test]
fn persistent_srk_of_another_template_is_refused() {
    let tpm = Swtpm::start();
    let ctx = tpm.state_dir().join("p.ctx").display().to_string();
    let (ok, _, err) = tpm.tpm2(
        "tpm2_createprimary",
        &["-C", "o", "-G", "rsa2048", "-c", &ctx],
    );
    assert!(ok, "{err}");
    let (ok, _, err) = tpm.tpm2("tpm2_evictcontrol", &["-C", "o", "-c", &ctx, "0x81000001"]);
    assert!(ok, "{err}");
    let _ = tpm.tpm2("tpm2_flushcontext", &["-t"]);
    let d = Devid::new().tcti(&tpm.tcti());
    let r = d.run(&["init", "--backend", "tpm"]);
    assert_ne!(r.code, 0, "init used a non-standard persistent SRK");
    assert!(
        r.stderr
            .contains("does not match the standard storage key template"),
        "{}",
        r.stderr
    );

    // The standard SRK there is used.
    let (ok, _, err) = tpm.tpm2("tpm2_evictcontrol", &["-C", "o", "-c", "0x81000001"]);
    assert!(ok, "{err}");
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
            &ctx,
        ],
    );
    assert!(ok, "{err}");
    let (ok, _, err) = tpm.tpm2("tpm2_evictcontrol", &["-C", "o", "-c", &ctx, "0x81000001"]);
    assert!(ok, "{err}");
    let _ = tpm.tpm2("tpm2_flushcontext", &["-t"]);
    let e = Devid::new().tcti(&tpm.tcti());
    e.run(&["init", "--backend", "tpm"]).ok();
    let state = std::fs::read_to_string(e.state.join("state.toml")).unwrap();
    assert!(state.contains("srk_handle = 2164260865"), "{state}");
    e.round_trip();
}
