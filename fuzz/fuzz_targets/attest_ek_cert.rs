//! Fuzz devid-attest's EK certificate handling: EkCert::parse of NV bytes (wrapper, padding,
//! DER) and EkRoots::verify against an empty trust set and a one-root set. Seeds:
//! fuzz/seeds/attest_ek_cert (swtpm's RSA-2048 and P-384 EK certificates).
#![no_main]

use std::sync::OnceLock;
use std::time::SystemTime;

use devid_attest::ek::{EkCert, EkRoots};
use libfuzzer_sys::fuzz_target;

/// A one-root trust set: swtpm's RSA-2048 EK certificate from the seeds. It is no CA and
/// issued nothing, so chains through it fail, after the issuer match and signature checks.
fn one_root() -> &'static EkRoots {
    static R: OnceLock<EkRoots> = OnceLock::new();
    R.get_or_init(|| {
        let mut r = EkRoots::default();
        let _ = r.add_der(include_bytes!("../seeds/attest_ek_cert/ek-rsa2048"));
        r
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(ek) = EkCert::parse(data) {
        let now = SystemTime::now();
        let _ = EkRoots::default().verify(&ek, &[], now);
        let _ = one_root().verify(&ek, &[], now);
        let _ = one_root().verify(&ek, &[ek.der.clone(), data.to_vec()], now);
    }
});
