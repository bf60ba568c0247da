//! Fuzz the vault bundle parser.
//!
//! Each input is used twice:
//! 1. as a whole bundle file, opened with a fixed key (header parsing, AEAD, limits);
//! 2. as the plaintext inside a valid envelope built from the documented format, so the
//!    JSON/hex/name-validation layer behind the AEAD is reached too.
//!
//! Whatever opens must survive a seal/open round trip unchanged.
#![no_main]

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use devid_vault::{
    open_bundle, seal_bundle, Contents, AEAD_AES_256_GCM, FORMAT_VERSION, HEADER_LEN,
    KEY_BINDING_LEN, MAGIC, NONCE_LEN,
};
use libfuzzer_sys::fuzz_target;

const KEY: [u8; 32] = [0x42; 32];
const NONCE: [u8; NONCE_LEN] = [9; NONCE_LEN];

fn envelope(plaintext: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + plaintext.len() + 16);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
    out.push(AEAD_AES_256_GCM);
    out.extend_from_slice(&[0u8; KEY_BINDING_LEN]);
    out.extend_from_slice(&NONCE);
    assert_eq!(out.len(), HEADER_LEN);
    let mut buf = plaintext.to_vec();
    Aes256Gcm::new_from_slice(&KEY)
        .expect("32-byte key")
        .encrypt_in_place(&Nonce::from(NONCE), &out, &mut buf)
        .expect("encrypt");
    out.extend_from_slice(&buf);
    out
}

fn round_trip(c: &Contents) {
    let sealed = seal_bundle(&KEY, c).expect("contents that opened must seal again");
    let back = open_bundle(&KEY, &sealed).expect("a fresh bundle must open");
    assert_eq!(&back, c, "seal/open round trip changed the contents");
}

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = open_bundle(&KEY, data) {
        round_trip(&c);
    }
    if let Ok(c) = open_bundle(&KEY, &envelope(data)) {
        round_trip(&c);
    }
});
