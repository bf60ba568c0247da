//! Fuzz devid-attest's strict TPM parsers (TPMT_PUBLIC, TPMS_ATTEST, TPMT_SIGNATURE) and the
//! checks built on them: the bytes a device sends the server. Seeds: fuzz/seeds/attest_tpm_structures
//! (real structures captured from swtpm).
#![no_main]

use devid_attest::verify::{check_ak, verify_certify};
use devid_attest::wire::{TpmsAttest, TpmtPublic, TpmtSignature};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = TpmtPublic::parse(data) {
        // A parsed structure is exactly its input.
        assert_eq!(p.raw(), data);
        let _ = p.name();
    }
    let _ = TpmsAttest::parse(data);
    let _ = TpmtSignature::parse(data);
    if let Ok(ak) = check_ak(data) {
        let _ = verify_certify(&ak, data, data, &[], data);
    }
    // Split the input in three: attest | signature | key public, checked by a fixed AK-like
    // public area taken from the input's first part when it is one.
    if data.len() > 4 {
        let a = usize::from(data[0]) % data.len();
        let b = a + (usize::from(data[1]) % (data.len() - a));
        let (x, rest) = data.split_at(a);
        let (y, z) = rest.split_at(b - a);
        if let Ok(ak) = check_ak(z) {
            let _ = verify_certify(&ak, x, y, &[0, 0xff, 0x55, 0xaa], z);
        }
    }
});
