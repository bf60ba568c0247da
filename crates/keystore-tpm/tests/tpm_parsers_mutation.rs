//! Deterministic stand-in for the cargo-fuzz target `tpm_files` that runs in CI: real blobs
//! from a swtpm, mutated 20,000 times, through the parsers that read them from disk. None may
//! panic; each answer is Ok or a typed error.

#![allow(clippy::unwrap_used)]

use devid_keystore::Keystore;
use devid_keystore_tpm::keyfile::TpmKeyFile;
use devid_keystore_tpm::{parse_sealed_blob, TpmInitOptions, TpmKeystore};
use devid_testkit::swtpm::Swtpm;

struct XorShift(u64);
impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(rng: &mut XorShift, seed: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..=rng.below(4) {
        match rng.below(4) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = rng.next() as u8;
            }
            2 => v.truncate(rng.below(v.len() + 1)),
            _ => {
                let i = rng.below(v.len() + 1);
                v.insert(i, rng.next() as u8);
            }
        }
    }
    v
}

#[test]
fn mutated_key_files_and_sealed_blobs_never_panic() {
    let tpm = Swtpm::start();
    let dir = tempfile::tempdir().unwrap();
    let (ks, _) = TpmKeystore::create(
        dir.path(),
        &TpmInitOptions {
            tcti: tpm.tcti(),
            pcrs: vec![7],
            ..TpmInitOptions::default()
        },
    )
    .unwrap();
    let blob = ks.seal(b"0123456789abcdef0123456789abcdef").unwrap();
    drop(ks);
    let pem = std::fs::read_to_string(dir.path().join("tpm-device-key.pem")).unwrap();
    let key = TpmKeyFile::from_pem(&pem).unwrap();
    let der = key.to_der().unwrap();
    assert!(parse_sealed_blob(&blob).is_ok());

    let mut rng = XorShift(0x5eed_1234_abcd_ef01);
    let mut accepted = 0;
    for _ in 0..20_000 {
        let b = mutate(&mut rng, &blob);
        if parse_sealed_blob(&b).is_ok() {
            accepted += 1;
        }
        let d = mutate(&mut rng, &der);
        let _ = TpmKeyFile::from_der(&d);
        if let Ok(text) = std::str::from_utf8(&mutate(&mut rng, pem.as_bytes())) {
            let _ = TpmKeyFile::from_pem(text);
        }
    }
    // Some mutations (e.g. in the private blob, which only the TPM can check) still parse:
    // the TPM's integrity check refuses those at Load. Most must be refused here.
    assert!(accepted < 20_000 / 2, "{accepted} mutated blobs parsed");
}
