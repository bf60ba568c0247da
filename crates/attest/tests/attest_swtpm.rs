//! devid-attest against a real TPM: a swtpm manufactured with EK certificates by swtpm's local
//! CA (testkit `Swtpm::start_manufactured`), driven by tpm2-tools (test-only; the crate itself
//! never calls them). Each test has its own TPM.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::SystemTime;

use devid_attest::credential::make_credential;
use devid_attest::ek::{EkAlg, EkCert, EkKey, EkRoots};
use devid_attest::verify::{check_ak, verify_certify, AkKey};
use devid_attest::wire::{KeyAlg, TpmsAttest, TpmtPublic};
use devid_proto::attest_binding::qualifying_data;
use devid_testkit::swtpm::{shared_tpm_ca, Swtpm, TpmCa};
use rand_core::OsRng;

/// A manufactured TPM and a scratch dir for tpm2-tools files.
struct Bench {
    tpm: Swtpm,
    dir: tempfile::TempDir,
}

impl Bench {
    fn new() -> Bench {
        Bench {
            tpm: Swtpm::start_manufactured(shared_tpm_ca()),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn p(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_owned()
    }

    fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.dir.path().join(name)).unwrap()
    }

    /// Run a tpm2 tool, panicking on failure, then flush transient objects (swtpm has three
    /// object slots and no resource manager).
    fn run(&self, args: &[&str]) -> Vec<u8> {
        let out = self.tpm.tpm2_ok(args);
        self.flush();
        out
    }

    fn flush(&self) {
        let _ = self.tpm.tpm2_output(&["flushcontext", "-t"]);
        let _ = self.tpm.tpm2_output(&["flushcontext", "-s"]);
    }

    fn nv_cert(&self, index: &str) -> Vec<u8> {
        let f = self.p(&format!("nv-{index}"));
        self.run(&["nvread", index, "-o", &f]);
        std::fs::read(&f).unwrap()
    }

    /// `tpm2 createak` under the RSA EK; returns the TPMT_PUBLIC (TPM2B size stripped).
    fn create_ak(&self, tag: &str, alg: &str, scheme: &str) -> Vec<u8> {
        self.run(&[
            "createak",
            "-C",
            "0x81010001",
            "-G",
            alg,
            "-g",
            "sha256",
            "-s",
            scheme,
            "-c",
            &self.p(&format!("{tag}.ctx")),
            "-u",
            &self.p(&format!("{tag}.pub")),
            "-n",
            &self.p(&format!("{tag}.name")),
            "-r",
            &self.p(&format!("{tag}.priv")),
        ]);
        strip_tpm2b(&self.read(&format!("{tag}.pub")))
    }

    /// An owner primary to create ordinary keys under.
    fn primary(&self) {
        if !self.dir.path().join("prim.ctx").exists() {
            self.run(&[
                "createprimary",
                "-C",
                "o",
                "-g",
                "sha256",
                "-G",
                "ecc",
                "-c",
                &self.p("prim.ctx"),
            ]);
        }
    }

    /// `tpm2 create` + `tpm2 load` of a key with `alg` and `attrs`; returns its TPMT_PUBLIC.
    fn create_key(&self, tag: &str, alg: &str, attrs: &str) -> Vec<u8> {
        self.primary();
        let (pubf, privf, ctx) = (
            self.p(&format!("{tag}.pub")),
            self.p(&format!("{tag}.priv")),
            self.p(&format!("{tag}.ctx")),
        );
        self.run(&[
            "create",
            "-C",
            &self.p("prim.ctx"),
            "-G",
            alg,
            "-a",
            attrs,
            "-u",
            &pubf,
            "-r",
            &privf,
        ]);
        self.run(&[
            "load",
            "-C",
            &self.p("prim.ctx"),
            "-u",
            &pubf,
            "-r",
            &privf,
            "-c",
            &ctx,
            "-n",
            &self.p(&format!("{tag}.name")),
        ]);
        strip_tpm2b(&self.read(&format!("{tag}.pub")))
    }

    /// `tpm2 certify` of `key` by `ak`: (TPMS_ATTEST, TPMT_SIGNATURE).
    fn certify(&self, key: &str, ak: &str) -> (Vec<u8>, Vec<u8>) {
        let (a, s) = (
            self.p(&format!("{key}-by-{ak}.attest")),
            self.p(&format!("{key}-by-{ak}.sig")),
        );
        self.run(&[
            "certify",
            "-c",
            &self.p(&format!("{key}.ctx")),
            "-C",
            &self.p(&format!("{ak}.ctx")),
            "-g",
            "sha256",
            "-o",
            &a,
            "-s",
            &s,
        ]);
        (std::fs::read(&a).unwrap(), std::fs::read(&s).unwrap())
    }
}

fn strip_tpm2b(b: &[u8]) -> Vec<u8> {
    let n = usize::from(u16::from_be_bytes([b[0], b[1]]));
    assert_eq!(n + 2, b.len(), "not a TPM2B");
    b[2..].to_vec()
}

fn pem_to_der(pem: &str) -> Vec<u8> {
    let p = x509_pem(pem);
    p.into_iter().next().unwrap()
}

fn x509_pem(pem: &str) -> Vec<Vec<u8>> {
    // openssl converts, so the test does not trust the crate's own PEM reading.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("c.pem");
    std::fs::write(&f, pem).unwrap();
    let out = std::process::Command::new("openssl")
        .args(["x509", "-outform", "DER", "-in"])
        .arg(&f)
        .output()
        .unwrap();
    assert!(out.status.success());
    vec![out.stdout]
}

/// The SHA-256 of the certificate's SPKI as openssl computes it.
fn openssl_spki_sha256(der: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("c.der");
    std::fs::write(&f, der).unwrap();
    let pem = std::process::Command::new("openssl")
        .args(["x509", "-inform", "DER", "-noout", "-pubkey", "-in"])
        .arg(&f)
        .output()
        .unwrap();
    let pk = dir.path().join("pk.pem");
    std::fs::write(&pk, &pem.stdout).unwrap();
    let spki = std::process::Command::new("openssl")
        .args(["pkey", "-pubin", "-outform", "DER", "-in"])
        .arg(&pk)
        .output()
        .unwrap();
    assert!(spki.status.success());
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(&spki.stdout))
}

#[test]
fn ek_certs_from_nv_parse_and_chain_to_the_test_ca_only() {
    let b = Bench::new();
    let ca = shared_tpm_ca();
    let roots = EkRoots::from_pems(&[&ca.root_pem()]).unwrap();
    assert_eq!(roots.len(), 1);
    let issuer = pem_to_der(&ca.issuer_pem());
    let other = TpmCa::new();
    let other_roots = EkRoots::from_pems(&[&other.root_pem()]).unwrap();
    let other_issuer = pem_to_der(&other.issuer_pem());
    for (index, alg, handle) in [
        ("0x01c00002", EkAlg::Rsa2048, "0x81010001"),
        ("0x01c00016", EkAlg::EccP384, "0x81010016"),
    ] {
        let nv = b.nv_cert(index);
        let ek = EkCert::parse(&nv).unwrap();
        assert_eq!(ek.public.alg, alg);
        assert_eq!(format!("{:#010x}", alg.nv_index()), index);
        assert_eq!(ek.manufacturer.as_deref(), Some("id:00001014"), "{index}");
        assert_eq!(ek.model.as_deref(), Some("swtpm"), "{index}");
        assert!(
            ek.version.as_deref().unwrap_or("").starts_with("id:"),
            "{index}"
        );
        assert_eq!(ek.fingerprint, openssl_spki_sha256(&ek.der), "{index}");

        // The certificate's key is the TPM's persistent EK (read with tpm2 readpublic).
        let f = b.p(&format!("{handle}.pub"));
        b.run(&["readpublic", "-c", handle, "-o", &f]);
        let tpm_ek = TpmtPublic::parse(&strip_tpm2b(&std::fs::read(&f).unwrap())).unwrap();
        assert_eq!(tpm_ek.name_alg, alg.name_alg(), "{index}: template nameAlg");
        assert_eq!(
            tpm_ek.symmetric.map(|s| s.1),
            Some(alg.sym_key_bits()),
            "{index}: template AES bits"
        );
        match (&ek.public.key, &tpm_ek.alg) {
            (EkKey::Rsa(k), KeyAlg::Rsa { modulus, .. }) => {
                use rsa::traits::PublicKeyParts;
                assert_eq!(&k.n().to_bytes_be(), modulus);
            }
            (EkKey::P384(k), KeyAlg::Ecc { x, y, .. }) => {
                use p384::elliptic_curve::sec1::ToEncodedPoint;
                let pt = k.to_encoded_point(false);
                assert_eq!(&pt.x().unwrap()[..], &x[..]);
                assert_eq!(&pt.y().unwrap()[..], &y[..]);
            }
            other => panic!("{index}: unexpected {other:?}"),
        }

        // NV padding and the 10 01 00 <len> wrapper are tolerated.
        let mut padded = nv.clone();
        padded.extend_from_slice(&[0u8; 200]);
        assert_eq!(EkCert::parse(&padded).unwrap(), ek);
        let mut wrapped = vec![0x10, 0x01, 0x00];
        wrapped.extend_from_slice(&(nv.len() as u16).to_be_bytes());
        wrapped.extend_from_slice(&nv);
        wrapped.extend_from_slice(&[0xff; 3]);
        assert_eq!(EkCert::parse(&wrapped).unwrap(), ek);
        // A truncated certificate is not.
        assert_eq!(
            EkCert::parse(&nv[..nv.len() - 1]).unwrap_err().code(),
            "ek_cert_invalid"
        );

        ek.require_alg(alg).unwrap();
        let wrong_alg = if alg == EkAlg::Rsa2048 {
            EkAlg::EccP384
        } else {
            EkAlg::Rsa2048
        };
        assert_eq!(
            ek.require_alg(wrong_alg).unwrap_err().code(),
            "ek_cert_invalid"
        );

        let now = SystemTime::now();
        // Validity is reported, not enforced: in 1971 every certificate is not yet valid.
        let past = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(365 * 86400);
        let t = roots
            .verify(&ek, std::slice::from_ref(&issuer), past)
            .unwrap();
        assert_eq!(t.outside_validity.len(), 3, "{:?}", t.outside_validity);
        let t = roots
            .verify(&ek, std::slice::from_ref(&issuer), now)
            .unwrap();
        assert!(
            t.root_subject.contains("swtpm-localca-rootca"),
            "{}",
            t.root_subject
        );
        assert_eq!(t.intermediates_used, 1);
        assert!(t.outside_validity.is_empty(), "{:?}", t.outside_validity);
        // Without the intermediate: untrusted.
        assert_eq!(
            roots.verify(&ek, &[], now).unwrap_err().code(),
            "ek_untrusted"
        );
        // Another CA's root, with either intermediate: untrusted.
        for inter in [&issuer, &other_issuer] {
            let e = other_roots
                .verify(&ek, std::slice::from_ref(inter), now)
                .unwrap_err();
            assert_eq!(e.code(), "ek_untrusted", "{index}: {e}");
        }
        // The other CA's intermediate does not bridge to our root either.
        let e = roots
            .verify(&ek, std::slice::from_ref(&other_issuer), now)
            .unwrap_err();
        assert_eq!(e.code(), "ek_untrusted");
        // An empty trust set trusts nothing.
        let empty = EkRoots::from_pems(&[]).unwrap();
        assert_eq!(
            empty
                .verify(&ek, std::slice::from_ref(&issuer), now)
                .unwrap_err()
                .code(),
            "ek_untrusted"
        );
    }

    // A roots directory, as `attestation.ek_roots` configures it.
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("swtpm.pem"), ca.root_pem()).unwrap();
    std::fs::write(d.path().join("README"), "not a certificate").unwrap();
    let from_dir = EkRoots::from_pem_dir(d.path()).unwrap();
    assert_eq!(from_dir.len(), 1);
    let ek = EkCert::parse(&b.nv_cert("0x01c00002")).unwrap();
    from_dir
        .verify(&ek, std::slice::from_ref(&issuer), SystemTime::now())
        .unwrap();
}

#[test]
fn check_ak_accepts_tpm_aks_and_refuses_weak_keys() {
    let b = Bench::new();
    for (tag, alg, scheme) in [("ak-ecc", "ecc", "ecdsa"), ("ak-rsa", "rsa", "rsassa")] {
        let raw = b.create_ak(tag, alg, scheme);
        let ak = check_ak(&raw).unwrap_or_else(|e| panic!("{tag}: {e}"));
        assert_eq!(
            ak.name(),
            b.read(&format!("{tag}.name")),
            "{tag}: Name differs from the TPM's"
        );
        assert_eq!(ak.public_raw(), raw);
        assert_eq!(ak.is_ecc(), alg == "ecc");
    }
    // An AK with a scheme other than ECDSA/RSASSA-SHA256.
    let raw = b.create_ak("ak-pss", "rsa", "rsapss");
    assert_eq!(check_ak(&raw).unwrap_err().code(), "ak_algorithm");
    // A restricted signing key without fixedTPM (duplicable; the TPM refuses fixedParent
    // without fixedTPM under a fixedTPM parent, so it lacks both).
    let raw = b.create_key(
        "dup",
        "ecc256:ecdsa-sha256:null",
        "sensitivedataorigin|userwithauth|restricted|sign",
    );
    let e = check_ak(&raw).unwrap_err();
    assert_eq!(e.code(), "ak_attributes", "{e}");
    assert!(e.to_string().contains("fixedTPM"), "{e}");
    // A non-restricted signing key (it could sign a forged TPMS_ATTEST).
    let raw = b.create_key(
        "unrestricted",
        "ecc256:ecdsa-sha256",
        "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign",
    );
    let e = check_ak(&raw).unwrap_err();
    assert_eq!(e.code(), "ak_attributes", "{e}");
    assert!(e.to_string().contains("restricted"), "{e}");
    // Trailing byte on a real public area.
    let mut raw = b.read("ak-ecc.pub")[2..].to_vec();
    raw.push(0);
    assert_eq!(
        check_ak(&raw).unwrap_err().code(),
        "malformed_tpm_structure"
    );
}

/// make_credential in software, then the TPM's ActivateCredential must recover the secret.
fn activate(b: &Bench, ek_handle: &str, ak_ctx: &str, blob: &[u8]) -> Option<Vec<u8>> {
    let cred = b.p("cred");
    let out = b.p("out");
    let _ = std::fs::remove_file(&out);
    std::fs::write(&cred, blob).unwrap();
    let low_range = ek_handle == "0x81010001" || ek_handle.ends_with("ek256.ctx");
    let ok = if low_range {
        // Low-range EK: userWithAuth clear, PolicySecret(TPM_RH_ENDORSEMENT) session.
        let s = b.p("s.ctx");
        b.tpm
            .tpm2_ok(&["startauthsession", "--policy-session", "-S", &s]);
        b.tpm.tpm2_ok(&["policysecret", "-S", &s, "-c", "e"]);
        let session = format!("session:{s}");
        let ok = b
            .tpm
            .tpm2_output(&[
                "activatecredential",
                "-c",
                ak_ctx,
                "-C",
                ek_handle,
                "-i",
                &cred,
                "-o",
                &out,
                "-P",
                &session,
            ])
            .status
            .success();
        let _ = b.tpm.tpm2_output(&["flushcontext", &s]);
        ok
    } else {
        b.tpm
            .tpm2_output(&[
                "activatecredential",
                "-c",
                ak_ctx,
                "-C",
                ek_handle,
                "-i",
                &cred,
                "-o",
                &out,
                "-P",
                "",
            ])
            .status
            .success()
    };
    b.flush();
    if ok {
        Some(std::fs::read(&out).unwrap())
    } else {
        None
    }
}

#[test]
fn make_credential_activates_on_swtpm_for_rsa2048_and_p384_eks() {
    let b = Bench::new();
    let ak = check_ak(&b.create_ak("ak", "ecc", "ecdsa")).unwrap();
    let other = check_ak(&b.create_ak("ak2", "ecc", "ecdsa")).unwrap();
    assert_ne!(ak.name(), other.name());
    let ak_ctx = b.p("ak.ctx");
    for (index, handle, alg, id_len, secret_len) in [
        ("0x01c00002", "0x81010001", EkAlg::Rsa2048, 2 + 32 + 34, 256),
        (
            "0x01c00016",
            "0x81010016",
            EkAlg::EccP384,
            2 + 48 + 34,
            4 + 2 * 48,
        ),
    ] {
        let ek = EkCert::parse(&b.nv_cert(index)).unwrap();
        assert_eq!(ek.public.alg, alg);
        let mut secret = [0u8; 32];
        rand_core::RngCore::fill_bytes(&mut OsRng, &mut secret);
        let cred = make_credential(&ek.public, ak.name(), &secret, &mut OsRng).unwrap();
        assert_eq!(cred.id_object.len(), id_len, "{index}");
        assert_eq!(cred.encrypted_secret.len(), secret_len, "{index}");
        let got = activate(&b, handle, &ak_ctx, &cred.to_tpm2_tools_blob());
        assert_eq!(
            got.as_deref(),
            Some(&secret[..]),
            "{index}: ActivateCredential did not recover the secret"
        );

        // Bound to another AK's Name: the TPM refuses to activate it with this AK.
        let wrong = make_credential(&ek.public, other.name(), &secret, &mut OsRng).unwrap();
        assert_eq!(
            activate(&b, handle, &ak_ctx, &wrong.to_tpm2_tools_blob()),
            None,
            "{index}"
        );
        // Made for the other EK of the same TPM: refused too.
        let other_ek = if handle == "0x81010001" {
            "0x81010016"
        } else {
            "0x81010001"
        };
        assert_eq!(
            activate(&b, other_ek, &ak_ctx, &cred.to_tpm2_tools_blob()),
            None,
            "{index}"
        );
        // A 48-byte secret works for the SHA-384 EK only (secret <= digest size).
        let long = [7u8; 48];
        match alg {
            EkAlg::EccP384 => {
                let c = make_credential(&ek.public, ak.name(), &long, &mut OsRng).unwrap();
                assert_eq!(
                    activate(&b, handle, &ak_ctx, &c.to_tpm2_tools_blob()).as_deref(),
                    Some(&long[..])
                );
            }
            _ => assert_eq!(
                make_credential(&ek.public, ak.name(), &long, &mut OsRng)
                    .unwrap_err()
                    .code(),
                "credential_failed"
            ),
        }
    }
}

/// swtpm ships no P-256 EK certificate; the low-range P-256 EK (template L-2) made by
/// `tpm2 createek -G ecc` still lets the P-256 path of make_credential meet a real TPM. Its
/// key comes from the TPM's public area here, since there is no certificate.
#[test]
fn make_credential_activates_on_swtpm_for_a_p256_ek() {
    let b = Bench::new();
    let ak = check_ak(&b.create_ak("ak", "ecc", "ecdsa")).unwrap();
    let (ek_ctx, ek_pub) = (b.p("ek256.ctx"), b.p("ek256.pub"));
    b.run(&["createek", "-G", "ecc", "-c", &ek_ctx, "-u", &ek_pub]);
    let tpm_ek = TpmtPublic::parse(&strip_tpm2b(&std::fs::read(&ek_pub).unwrap())).unwrap();
    assert_eq!(tpm_ek.name_alg, EkAlg::EccP256.name_alg());
    assert_eq!(
        tpm_ek.symmetric.map(|s| s.1),
        Some(EkAlg::EccP256.sym_key_bits())
    );
    let KeyAlg::Ecc { x, y, .. } = &tpm_ek.alg else {
        panic!("not an ECC EK")
    };
    let mut sec1 = vec![4u8];
    sec1.extend_from_slice(x);
    sec1.extend_from_slice(y);
    let ek = devid_attest::ek::EkPublic {
        alg: EkAlg::EccP256,
        key: EkKey::P256(p256::PublicKey::from_sec1_bytes(&sec1).unwrap()),
    };
    let secret = [0x5au8; 32];
    let cred = make_credential(&ek, ak.name(), &secret, &mut OsRng).unwrap();
    assert_eq!(cred.encrypted_secret.len(), 4 + 2 * 32);
    // createek saved a context, not a persistent handle: the low-range policy path applies.
    let got = activate(&b, &ek_ctx, &b.p("ak.ctx"), &cred.to_tpm2_tools_blob());
    assert_eq!(got.as_deref(), Some(&secret[..]));
}

fn ak_from(b: &Bench, tag: &str, alg: &str, scheme: &str) -> AkKey {
    check_ak(&b.create_ak(tag, alg, scheme)).unwrap()
}

#[test]
fn verify_certify_accepts_a_tpm_key_and_refuses_each_forgery() {
    let b = Bench::new();
    // tpm2-tools 5.4 `certify` cannot set qualifying data: it always uses these bytes.
    let tools_extra: &[u8] = &[0x00, 0xff, 0x55, 0xaa];
    let ak = ak_from(&b, "ak", "ecc", "ecdsa");
    let ak_rsa = ak_from(&b, "akr", "rsa", "rsassa");
    let key = b.create_key(
        "key",
        "ecc256:ecdsa-sha256",
        "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign",
    );
    assert_eq!(TpmtPublic::parse(&key).unwrap().attributes, 0x0004_0072);

    let (attest, sig) = b.certify("key", "ak");
    let info = TpmsAttest::parse(&attest).unwrap();
    assert_eq!(info.extra_data, tools_extra);
    let ck = verify_certify(&ak, &attest, &sig, tools_extra, &key).unwrap();
    assert_eq!(ck.attributes, 0x0004_0072);
    assert_eq!(ck.name, b.read("key.name")[..]);
    assert_eq!(ck.reset_count, info.reset_count);
    // The certified point is the key's SPKI (tpm2 readpublic -f der).
    let spki = b.p("key.spki");
    b.run(&[
        "readpublic",
        "-c",
        &b.p("key.ctx"),
        "-f",
        "der",
        "-o",
        &spki,
    ]);
    let spki = std::fs::read(&spki).unwrap();
    assert!(ck.matches_spki_der(&spki));
    ck.require_spki_der(&spki).unwrap();
    // ... and not another P-256 key.
    let other_spki = p256::pkcs8::EncodePublicKey::to_public_key_der(
        &p256::SecretKey::random(&mut OsRng).public_key(),
    )
    .unwrap();
    assert!(!ck.matches_spki_der(other_spki.as_bytes()));
    assert_eq!(
        ck.require_spki_der(other_spki.as_bytes())
            .unwrap_err()
            .code(),
        "key_mismatch"
    );

    // The same with an RSA AK (RSASSA-SHA256 signature).
    let (attest_r, sig_r) = b.certify("key", "akr");
    verify_certify(&ak_rsa, &attest_r, &sig_r, tools_extra, &key).unwrap();

    let code = |r: devid_attest::Result<_>| r.unwrap_err().code();
    // Qualifying data of another challenge / CSR.
    let q = qualifying_data("challenge-1", &[1; 32], b"csr");
    assert_eq!(
        code(verify_certify(&ak, &attest, &sig, &q, &key)),
        "certify_extra_data"
    );
    // Signed by another AK (of the same TPM): the ECC AK does not verify the RSA AK's Certify,
    // nor a second ECC AK's.
    assert_eq!(
        code(verify_certify(&ak, &attest_r, &sig_r, tools_extra, &key)),
        "certify_signature"
    );
    let ak2 = ak_from(&b, "ak2", "ecc", "ecdsa");
    let (attest2, sig2) = b.certify("key", "ak2");
    verify_certify(&ak2, &attest2, &sig2, tools_extra, &key).unwrap();
    assert_eq!(
        code(verify_certify(&ak, &attest2, &sig2, tools_extra, &key)),
        "certify_signature"
    );
    assert_eq!(
        code(verify_certify(&ak, &attest, &sig2, tools_extra, &key)),
        "certify_signature"
    );
    // One flipped bit in the signed bytes (the clock field).
    let mut t = attest.clone();
    let clock_at = 4 + 2 + 2 + info.qualified_signer.len() + 2 + info.extra_data.len();
    t[clock_at + 7] ^= 1;
    assert_eq!(
        code(verify_certify(&ak, &t, &sig, tools_extra, &key)),
        "certify_signature"
    );
    // Not TPM-generated.
    let mut m = attest.clone();
    m[0] = 0;
    assert_eq!(
        code(verify_certify(&ak, &m, &sig, tools_extra, &key)),
        "certify_magic"
    );
    // A Quote is not a Certify.
    let (qm, qs) = (b.p("q.msg"), b.p("q.sig"));
    b.run(&[
        "quote",
        "-c",
        &b.p("ak.ctx"),
        "-l",
        "sha256:0,7",
        "-q",
        "00ff55aa",
        "-m",
        &qm,
        "-s",
        &qs,
    ]);
    let quote = std::fs::read(&qm).unwrap();
    assert!(matches!(
        TpmsAttest::parse(&quote).unwrap().attested,
        devid_attest::wire::Attested::Quote { .. }
    ));
    assert_eq!(
        code(verify_certify(
            &ak,
            &quote,
            &std::fs::read(&qs).unwrap(),
            tools_extra,
            &key
        )),
        "certify_type"
    );
    // A trailing byte after the TPMS_ATTEST or the signature.
    let mut long = attest.clone();
    long.push(0);
    assert_eq!(
        code(verify_certify(&ak, &long, &sig, tools_extra, &key)),
        "malformed_tpm_structure"
    );
    let mut long = sig.clone();
    long.push(0);
    assert_eq!(
        code(verify_certify(&ak, &attest, &long, tools_extra, &key)),
        "malformed_tpm_structure"
    );

    // A key without fixedTPM|fixedParent (duplicable), honestly certified by the AK.
    let dup = b.create_key(
        "dup",
        "ecc256:ecdsa-sha256",
        "sensitivedataorigin|userwithauth|sign",
    );
    let (attest_d, sig_d) = b.certify("dup", "ak");
    let e = verify_certify(&ak, &attest_d, &sig_d, tools_extra, &dup).unwrap_err();
    assert_eq!(e.code(), "key_attributes", "{e}");
    assert!(e.to_string().contains("fixedTPM|fixedParent"), "{e}");
    // Presenting another key's public area with this Certify.
    assert_eq!(
        code(verify_certify(&ak, &attest, &sig, tools_extra, &dup)),
        "key_name_mismatch"
    );
    // A decrypt key and an RSA key, honestly certified.
    let dec = b.create_key(
        "dec",
        "ecc256",
        "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|decrypt|sign",
    );
    let (a, s) = b.certify("dec", "ak");
    assert_eq!(
        code(verify_certify(&ak, &a, &s, tools_extra, &dec)),
        "key_attributes"
    );
    let rsa_key = b.create_key(
        "rsakey",
        "rsa2048:rsassa-sha256",
        "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign",
    );
    let (a, s) = b.certify("rsakey", "ak");
    assert_eq!(
        code(verify_certify(&ak, &a, &s, tools_extra, &rsa_key)),
        "key_algorithm"
    );
}
