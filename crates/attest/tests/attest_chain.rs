//! EkRoots::verify on generated chains (rcgen): the rules a swtpm chain cannot show, each able
//! to fail: intermediates must be CAs, the depth is bounded, an impostor CA with a trusted
//! root's name is refused, an EKU without the TCG EK purpose is refused.

#![allow(clippy::unwrap_used)]

use std::time::SystemTime;

use devid_attest::ek::{EkCert, EkRoots, MAX_CHAIN_DEPTH};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

const TCG_EK_EKU: [u64; 5] = [2, 23, 133, 8, 1];

fn ca_params(cn: &str, ca: bool) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, cn);
    if ca {
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    }
    p
}

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    der: Vec<u8>,
}

fn root(cn: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let params = ca_params(cn, true);
    let der = params.self_signed(&key).unwrap().der().to_vec();
    Ca {
        issuer: Issuer::new(params, key),
        der,
    }
}

fn sub(cn: &str, parent: &Ca, ca: bool) -> Ca {
    let key = KeyPair::generate().unwrap();
    let params = ca_params(cn, ca);
    let der = params
        .signed_by(&key, &parent.issuer)
        .unwrap()
        .der()
        .to_vec();
    Ca {
        issuer: Issuer::new(params, key),
        der,
    }
}

fn ek_cert(parent: &Ca, eku: Option<Vec<ExtendedKeyUsagePurpose>>) -> EkCert {
    let key = KeyPair::generate().unwrap();
    let mut params = ca_params("unknown", false);
    if let Some(eku) = eku {
        params.extended_key_usages = eku;
    }
    let der = params
        .signed_by(&key, &parent.issuer)
        .unwrap()
        .der()
        .to_vec();
    EkCert::parse(&der).unwrap()
}

fn tcg_eku() -> Option<Vec<ExtendedKeyUsagePurpose>> {
    Some(vec![ExtendedKeyUsagePurpose::Other(TCG_EK_EKU.to_vec())])
}

fn trust(ca: &Ca) -> EkRoots {
    let mut r = EkRoots::default();
    r.add_der(&ca.der).unwrap();
    r
}

#[test]
fn chain_through_intermediates_up_to_the_bound() {
    let r = root("maker root");
    let roots = trust(&r);
    let now = SystemTime::now();
    // Directly under the root, no intermediates.
    let ek = ek_cert(&r, tcg_eku());
    assert_eq!(roots.verify(&ek, &[], now).unwrap().intermediates_used, 0);
    // MAX_CHAIN_DEPTH intermediates: accepted, passed in any order.
    let mut chain = vec![r];
    for i in 0..=MAX_CHAIN_DEPTH {
        let next = sub(&format!("intermediate {i}"), chain.last().unwrap(), true);
        chain.push(next);
    }
    let at_bound = ek_cert(&chain[MAX_CHAIN_DEPTH], tcg_eku());
    let mut inters: Vec<Vec<u8>> = chain[1..=MAX_CHAIN_DEPTH]
        .iter()
        .map(|c| c.der.clone())
        .collect();
    inters.reverse();
    let t = roots.verify(&at_bound, &inters, now).unwrap();
    assert_eq!(t.intermediates_used, MAX_CHAIN_DEPTH);
    assert!(t.root_subject.contains("maker root"), "{}", t.root_subject);
    // One more: refused.
    let too_deep = ek_cert(&chain[MAX_CHAIN_DEPTH + 1], tcg_eku());
    let all: Vec<Vec<u8>> = chain[1..].iter().map(|c| c.der.clone()).collect();
    assert_eq!(
        roots.verify(&too_deep, &all, now).unwrap_err().code(),
        "ek_untrusted"
    );
    // A missing link: refused.
    let mut gap = inters.clone();
    gap.remove(2);
    assert_eq!(
        roots.verify(&at_bound, &gap, now).unwrap_err().code(),
        "ek_untrusted"
    );
}

#[test]
fn an_intermediate_that_is_not_a_ca_is_refused() {
    let r = root("maker root");
    let roots = trust(&r);
    let not_ca = sub("end entity", &r, false);
    let ek = ek_cert(&not_ca, tcg_eku());
    let e = roots
        .verify(&ek, std::slice::from_ref(&not_ca.der), SystemTime::now())
        .unwrap_err();
    assert_eq!(e.code(), "ek_untrusted", "{e}");
    // The same shape with a CA intermediate is accepted.
    let ca = sub("end entity", &r, true);
    let ek = ek_cert(&ca, tcg_eku());
    roots
        .verify(&ek, std::slice::from_ref(&ca.der), SystemTime::now())
        .unwrap();
}

#[test]
fn an_impostor_ca_with_the_roots_name_is_refused() {
    let r = root("maker root");
    let roots = trust(&r);
    // Same subject as the trusted root, its own key.
    let impostor = root("maker root");
    let ek = ek_cert(&impostor, tcg_eku());
    let now = SystemTime::now();
    assert_eq!(
        roots.verify(&ek, &[], now).unwrap_err().code(),
        "ek_untrusted"
    );
    assert_eq!(
        roots
            .verify(&ek, std::slice::from_ref(&impostor.der), now)
            .unwrap_err()
            .code(),
        "ek_untrusted"
    );
}

#[test]
fn eku_must_allow_ek_use_when_present() {
    let r = root("maker root");
    let roots = trust(&r);
    let now = SystemTime::now();
    roots.verify(&ek_cert(&r, None), &[], now).unwrap();
    let server = ek_cert(&r, Some(vec![ExtendedKeyUsagePurpose::ServerAuth]));
    assert_eq!(
        roots.verify(&server, &[], now).unwrap_err().code(),
        "ek_cert_invalid"
    );
    let both = ek_cert(
        &r,
        Some(vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::Other(TCG_EK_EKU.to_vec()),
        ]),
    );
    roots.verify(&both, &[], now).unwrap();
}
