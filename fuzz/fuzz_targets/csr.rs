//! Fuzz the CSR check the server runs on every enrolment and renewal (`devid_ca::csr`): DER
//! and PEM, signature (proof of possession), key type, extensions. Whatever it accepts names a
//! P-256 key. Never panic, bounded work.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = devid_ca::csr::verify_csr_der(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = devid_ca::csr::verify_csr_pem(text);
    }
});
