//! Deterministic stand-in for the fuzz targets `attest_tpm_structures` and `attest_ek_cert`,
//! run with the unit tests: the real structures captured from swtpm (fuzz/seeds/) parse, and
//! every truncation, an appended byte and every single-bit flip of them neither panics nor is
//! accepted where the format forbids it.

#![allow(clippy::unwrap_used)]

use std::time::SystemTime;

use devid_attest::ek::{EkAlg, EkCert, EkRoots};
use devid_attest::verify::{check_ak, verify_certify};
use devid_attest::wire::{Attested, TpmsAttest, TpmtPublic, TpmtSignature};

macro_rules! seed {
    ($dir:literal, $name:literal) => {
        include_bytes!(concat!("../../../fuzz/seeds/", $dir, "/", $name)).as_slice()
    };
}

const AK: &[u8] = seed!("attest_tpm_structures", "public-ak");
const AK_RSA: &[u8] = seed!("attest_tpm_structures", "public-akr");
const KEY: &[u8] = seed!("attest_tpm_structures", "public-key");
const EK_RSA_PUB: &[u8] = seed!("attest_tpm_structures", "public-ek_rsa");
const EK_ECC_PUB: &[u8] = seed!("attest_tpm_structures", "public-ek_ecc");
const CERTIFY_ECC: &[u8] = seed!("attest_tpm_structures", "attest-certify-ecc");
const CERTIFY_RSA: &[u8] = seed!("attest_tpm_structures", "attest-certify-rsa");
const QUOTE: &[u8] = seed!("attest_tpm_structures", "attest-quote");
const SIG_ECC: &[u8] = seed!("attest_tpm_structures", "sig-ecdsa");
const SIG_RSA: &[u8] = seed!("attest_tpm_structures", "sig-rsassa");
const SIG_QUOTE: &[u8] = seed!("attest_tpm_structures", "sig-quote-ecdsa");
const EK_CERT_RSA: &[u8] = seed!("attest_ek_cert", "ek-rsa2048");
const EK_CERT_P384: &[u8] = seed!("attest_ek_cert", "ek-p384");
const EK_CERT_WRAPPED: &[u8] = seed!("attest_ek_cert", "ek-p384-wrapped-padded");

const TOOLS_EXTRA: &[u8] = &[0x00, 0xff, 0x55, 0xaa];

#[test]
fn captured_swtpm_structures_verify() {
    for p in [AK, AK_RSA, KEY, EK_RSA_PUB, EK_ECC_PUB] {
        let parsed = TpmtPublic::parse(p).unwrap();
        assert_eq!(parsed.raw(), p);
    }
    let ek_rsa = TpmtPublic::parse(EK_RSA_PUB).unwrap();
    assert_eq!(ek_rsa.attributes, 0x0003_00b2);
    let ek_ecc = TpmtPublic::parse(EK_ECC_PUB).unwrap();
    assert_eq!(ek_ecc.attributes, 0x0003_00f2);
    assert_eq!(ek_ecc.name_alg, EkAlg::EccP384.name_alg());
    assert!(TpmtSignature::parse(SIG_QUOTE).is_ok());
    assert!(matches!(
        TpmsAttest::parse(QUOTE).unwrap().attested,
        Attested::Quote { .. }
    ));

    // The Name of a known public area: the TPM put it in its Certify.
    let Attested::Certify { name, .. } = TpmsAttest::parse(CERTIFY_ECC).unwrap().attested else {
        panic!("not a certify")
    };
    assert_eq!(TpmtPublic::parse(KEY).unwrap().name().unwrap(), name);
    assert_eq!(devid_attest::wire::name_of(KEY, 0x000b).unwrap(), name);

    let ak = check_ak(AK).unwrap();
    let ak_rsa = check_ak(AK_RSA).unwrap();
    verify_certify(&ak, CERTIFY_ECC, SIG_ECC, TOOLS_EXTRA, KEY).unwrap();
    verify_certify(&ak_rsa, CERTIFY_RSA, SIG_RSA, TOOLS_EXTRA, KEY).unwrap();
    // The EK public areas are restricted decrypt keys: never an AK.
    assert_eq!(check_ak(EK_RSA_PUB).unwrap_err().code(), "ak_attributes");
    assert_eq!(check_ak(KEY).unwrap_err().code(), "ak_attributes");

    let rsa = EkCert::parse(EK_CERT_RSA).unwrap();
    assert_eq!(rsa.public.alg, EkAlg::Rsa2048);
    let p384 = EkCert::parse(EK_CERT_P384).unwrap();
    assert_eq!(p384.public.alg, EkAlg::EccP384);
    assert_eq!(EkCert::parse(EK_CERT_WRAPPED).unwrap(), p384);
    // Not issued by itself.
    let mut roots = EkRoots::default();
    roots.add_der(EK_CERT_RSA).unwrap();
    assert_eq!(
        roots
            .verify(&p384, &[], SystemTime::now())
            .unwrap_err()
            .code(),
        "ek_untrusted"
    );
}

/// Every prefix, one extra byte, and every single-bit flip.
fn mutations(seed: &[u8]) -> impl Iterator<Item = (String, Vec<u8>)> + '_ {
    let cuts = (0..seed.len()).map(move |n| (format!("cut {n}"), seed[..n].to_vec()));
    let extra = std::iter::once(("extra byte".to_string(), {
        let mut v = seed.to_vec();
        v.push(0);
        v
    }));
    let flips = (0..seed.len() * 8).map(move |bit| {
        let mut v = seed.to_vec();
        v[bit / 8] ^= 1 << (bit % 8);
        (format!("flip bit {bit}"), v)
    });
    cuts.chain(extra).chain(flips)
}

#[test]
fn mutated_tpm_structures_never_panic_and_truncations_fail() {
    for seed in [AK, AK_RSA, KEY, EK_RSA_PUB, EK_ECC_PUB] {
        for (what, m) in mutations(seed) {
            let r = TpmtPublic::parse(&m);
            if what.starts_with("cut") || what == "extra byte" {
                assert!(r.is_err(), "{what} accepted");
            }
            let _ = check_ak(&m);
        }
    }
    for seed in [CERTIFY_ECC, CERTIFY_RSA, QUOTE] {
        for (what, m) in mutations(seed) {
            let r = TpmsAttest::parse(&m);
            if what.starts_with("cut") || what == "extra byte" {
                assert!(r.is_err(), "{what} accepted");
            }
        }
    }
    for seed in [SIG_ECC, SIG_RSA, SIG_QUOTE] {
        for (what, m) in mutations(seed) {
            let r = TpmtSignature::parse(&m);
            if what.starts_with("cut") || what == "extra byte" {
                assert!(r.is_err(), "{what} accepted");
            }
        }
    }
}

#[test]
fn every_bit_of_a_certify_is_covered_by_a_check() {
    let ak = check_ak(AK).unwrap();
    for (what, m) in mutations(CERTIFY_ECC) {
        assert!(
            verify_certify(&ak, &m, SIG_ECC, TOOLS_EXTRA, KEY).is_err(),
            "certify info with {what} accepted"
        );
    }
    for (what, m) in mutations(SIG_ECC) {
        assert!(
            verify_certify(&ak, CERTIFY_ECC, &m, TOOLS_EXTRA, KEY).is_err(),
            "signature with {what} accepted"
        );
    }
    for (what, m) in mutations(KEY) {
        assert!(
            verify_certify(&ak, CERTIFY_ECC, SIG_ECC, TOOLS_EXTRA, &m).is_err(),
            "key public area with {what} accepted"
        );
    }
}

#[test]
fn mutated_ek_certs_never_panic() {
    let mut roots = EkRoots::default();
    roots.add_der(EK_CERT_RSA).unwrap();
    let now = SystemTime::now();
    // Flips of every 7th bit keep this under a second in debug builds; cuts are all tried.
    for seed in [EK_CERT_RSA, EK_CERT_P384] {
        for (what, m) in mutations(seed).filter(|(w, _)| !w.starts_with("flip") || w.ends_with('7'))
        {
            if let Ok(ek) = EkCert::parse(&m) {
                assert!(!what.starts_with("cut"), "{what} accepted");
                let _ = roots.verify(&ek, std::slice::from_ref(&m), now);
            }
        }
    }
}
