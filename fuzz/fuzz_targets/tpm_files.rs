//! Fuzz the parsers of the TPM backend's files on disk: the TSS2 PRIVATE KEY (DER and PEM)
//! and the sealed data-key blob.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = devid_keystore_tpm::keyfile::TpmKeyFile::from_der(data);
    let _ = devid_keystore_tpm::parse_sealed_blob(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = devid_keystore_tpm::keyfile::TpmKeyFile::from_pem(text);
    }
});
