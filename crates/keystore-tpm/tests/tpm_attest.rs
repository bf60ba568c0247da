//! The TPM keystore's attestation and rotation against a manufactured swtpm (EK certificates
//! by `swtpm_setup --create-ek-cert`): the structures it makes parse with tpm2-tools
//! (`tpm2_print`), its ActivateCredential recovers a secret made by the server's software
//! MakeCredential, the AK certifies the device key and a rotation's next key, the secret
//! crosses the bus only encrypted, and the TPM commands of each step are counted.

#![allow(clippy::unwrap_used)]

use std::process::Command;

use devid_attest::ek::EkCert;
use devid_attest::verify::{check_ak, verify_certify};
use devid_keystore::{spki_der, Keystore};
use devid_keystore_tpm::{TpmInitOptions, TpmKeystore};
use devid_testkit::contains;
use devid_testkit::proxy::RecordingProxy;
use devid_testkit::swtpm::{shared_tpm_ca, Swtpm};

fn tpm2b(body: &[u8]) -> Vec<u8> {
    let mut v = (body.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(body);
    v
}

fn tpm2_print(kind: &str, bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("blob");
    std::fs::write(&f, bytes).unwrap();
    let out = Command::new("tpm2_print")
        .args(["-t", kind])
        .arg(&f)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tpm2_print -t {kind}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn attestation_structures_parse_with_tpm2_tools_and_verify_on_the_server_side() {
    devid_testkit::require_program("tpm2_print", "tpm2-tools");
    let ca = shared_tpm_ca();
    let tpm = Swtpm::start_manufactured(ca);
    let proxy = RecordingProxy::start(tpm.port());
    let dir = tempfile::tempdir().unwrap();
    let (ks, _) = TpmKeystore::create(
        dir.path(),
        &TpmInitOptions {
            tcti: proxy.tcti(),
            ..TpmInitOptions::default()
        },
    )
    .unwrap();
    for alg in ["rsa2048", "ecc-p384"] {
        proxy.clear();
        let att = ks.attestation().unwrap();
        let id = att.attestation_identity(Some(alg)).unwrap().unwrap();
        let identity_cmds = proxy.command_codes().len();
        assert_eq!(id.ek_alg, alg);
        // what the device sends parses with tpm2-tools
        let printed = tpm2_print("TPM2B_PUBLIC", &tpm2b(&id.ak_public));
        assert!(
            printed.contains("restricted") && printed.contains("fixedtpm"),
            "{printed}"
        );
        let ak = check_ak(&id.ak_public).unwrap();
        let ek = EkCert::parse(&id.ek_cert).unwrap();

        // the server's software MakeCredential, the TPM's ActivateCredential
        proxy.clear();
        let secret = [0x5au8; 32];
        let cred = devid_attest::credential::make_credential(
            &ek.public,
            ak.name(),
            &secret,
            &mut rand_core::OsRng,
        )
        .unwrap();
        let got = att
            .activate_credential(alg, &cred.id_object, &cred.encrypted_secret)
            .unwrap();
        assert_eq!(got.expose(), &secret);
        assert!(
            !contains(&proxy.capture(), &secret),
            "the activated secret crosses the bus in the clear"
        );
        let activate_cmds = proxy.command_codes().len();

        // the AK certifies the device key
        proxy.clear();
        let q = [0x11u8; 32];
        let c = att.certify_key(&q).unwrap();
        let certify_cmds = proxy.command_codes().len();
        // tpm2_print (tpm2-tools 5.4) prints only QUOTE attestations; libtss2's own
        // unmarshalling (tss-esapi) reads the Certify and its signature
        use tss_esapi::traits::UnMarshall;
        let attest = tss_esapi::structures::Attest::unmarshall(&c.certify_info).unwrap();
        assert_eq!(attest.extra_data().value(), &q);
        tss_esapi::structures::Signature::unmarshall(&c.signature).unwrap();
        let printed = tpm2_print("TPM2B_PUBLIC", &tpm2b(&c.key_public));
        assert!(printed.contains("sensitivedataorigin"), "{printed}");
        let certified =
            verify_certify(&ak, &c.certify_info, &c.signature, &q, &c.key_public).unwrap();
        assert!(certified.matches_spki_der(&spki_der(&ks.public_key())));
        println!(
            "ROBUST {{\"test\":\"tpm_commands_per_attestation\",\"ek\":\"{alg}\",\
             \"identity\":{identity_cmds},\"activate\":{activate_cmds},\"certify\":{certify_cmds}}}"
        );
    }
    // a credential for another AK's Name is not released
    let att = ks.attestation().unwrap();
    let id = att.attestation_identity(Some("rsa2048")).unwrap().unwrap();
    let ek = EkCert::parse(&id.ek_cert).unwrap();
    let mut other_name = check_ak(&id.ak_public).unwrap().name().to_vec();
    other_name[5] ^= 1;
    let cred = devid_attest::credential::make_credential(
        &ek.public,
        &other_name,
        &[1u8; 32],
        &mut rand_core::OsRng,
    )
    .unwrap();
    assert!(att
        .activate_credential("rsa2048", &cred.id_object, &cred.encrypted_secret)
        .is_err());
}

#[test]
fn rotation_makes_a_certified_next_key_and_switches_only_at_commit() {
    let ca = shared_tpm_ca();
    let tpm = Swtpm::start_manufactured(ca);
    let proxy = RecordingProxy::start(tpm.port());
    let dir = tempfile::tempdir().unwrap();
    let (ks, cfg) = TpmKeystore::create(
        dir.path(),
        &TpmInitOptions {
            tcti: proxy.tcti(),
            ..TpmInitOptions::default()
        },
    )
    .unwrap();
    let att = ks.attestation().unwrap();
    let id = att.attestation_identity(Some("rsa2048")).unwrap().unwrap();
    let ak = check_ak(&id.ak_public).unwrap();
    let rot = ks.rotation().unwrap();
    let old = ks.public_key();
    proxy.clear();
    let next = rot.create_next_key().unwrap();
    assert_ne!(next, old);
    assert_eq!(
        rot.create_next_key().unwrap(),
        next,
        "a pending key is reused"
    );
    // the next key signs (its CSR) and is certified by the AK; the device key is unchanged
    let sig = rot.sign_digest_next(&[7u8; 32]).unwrap();
    use p256::ecdsa::signature::hazmat::PrehashVerifier;
    p256::ecdsa::VerifyingKey::from(&next)
        .verify_prehash(&[7u8; 32], &sig)
        .unwrap();
    let c = rot.certify_next_key(&[3u8; 32]).unwrap();
    let certified = verify_certify(
        &ak,
        &c.certify_info,
        &c.signature,
        &[3u8; 32],
        &c.key_public,
    )
    .unwrap();
    assert!(certified.matches_spki_der(&spki_der(&next)));
    assert_eq!(ks.public_key(), old, "nothing switched before the commit");
    let rotate_cmds = proxy.command_codes().len();
    // a restart before the commit finds the pending key again
    drop(ks);
    let ks = TpmKeystore::open(dir.path(), &cfg, None).unwrap();
    assert_eq!(ks.public_key(), old);
    assert_eq!(ks.rotation().unwrap().next_key(), Some(next));
    ks.rotation().unwrap().commit_next_key().unwrap();
    assert_eq!(ks.public_key(), next);
    assert!(!dir.path().join("tpm-device-key.pem.next").exists());
    let sig = ks.sign(b"after").unwrap();
    assert!(devid_keystore::verify(&next, b"after", &sig));
    // and after another restart the rotated key is the device key
    drop(ks);
    let ks = TpmKeystore::open(dir.path(), &cfg, None).unwrap();
    assert_eq!(ks.public_key(), next);
    assert_eq!(ks.rotation().unwrap().next_key(), None);
    println!(
        "ROBUST {{\"test\":\"tpm_commands_per_rotation\",\"create_sign_certify\":{rotate_cmds}}}"
    );
}
