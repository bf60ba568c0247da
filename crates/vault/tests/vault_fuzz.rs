//! A deterministic, stable-toolchain stand-in for the cargo-fuzz target (fuzz/): 20,000
//! random and mutated inputs through `open_bundle`, seeded xorshift so a failure reproduces.
//! Never a panic; never `Ok` for a mutated sealed bundle.
#![allow(clippy::unwrap_used)]

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use devid_keystore::SecretBytes;
use devid_vault::{
    open_bundle, seal_bundle, Contents, VaultError, AEAD_AES_256_GCM, FORMAT_VERSION, HEADER_LEN,
    MAGIC,
};

const KEY: [u8; 32] = [0x42; 32];

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }
}

fn mutate(rng: &mut XorShift, input: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    let rounds = 1 + rng.below(4);
    for _ in 0..rounds {
        match rng.below(8) {
            0 | 1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            2 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = rng.byte();
            }
            3 => {
                let n = rng.below(v.len() + 1);
                v.truncate(n);
            }
            4 => {
                let i = rng.below(v.len() + 1);
                let n = 1 + rng.below(8);
                let extra = rng.bytes(n);
                v.splice(i..i, extra);
            }
            5 if !v.is_empty() => {
                let i = rng.below(v.len());
                let n = 1 + rng.below(8);
                v.drain(i..(i + n).min(v.len()));
            }
            6 if v.len() > 2 => {
                let i = rng.below(v.len());
                let j = rng.below(v.len());
                v.swap(i, j);
            }
            _ => {
                let n = rng.below(32);
                let extra = rng.bytes(n);
                v.extend_from_slice(&extra);
            }
        }
    }
    v
}

fn sample() -> Contents {
    let mut c = Contents {
        server_url: Some("https://devid.example:8443".into()),
        mqtt_url: Some("mqtts://devid.example:8883".into()),
        ca_pin: Some("cd".repeat(32)),
        device_id: Some("fuzz-1".into()),
        cert_chain_pem: Some(
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into(),
        ),
        ..Contents::default()
    };
    c.put_secret("a", SecretBytes::from_slice(b"alpha"))
        .unwrap();
    c.put_secret("b.c", SecretBytes::from_slice(&[0, 255, 34, 92]))
        .unwrap();
    c
}

/// A valid envelope around an arbitrary plaintext, built from the documented format alone.
fn envelope(plaintext: &[u8]) -> Vec<u8> {
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
    header.push(AEAD_AES_256_GCM);
    header.extend_from_slice(&[0u8; 32]);
    header.extend_from_slice(&[9u8; 12]);
    assert_eq!(header.len(), HEADER_LEN);
    let mut buf = plaintext.to_vec();
    Aes256Gcm::new_from_slice(&KEY)
        .unwrap()
        .encrypt_in_place(&Nonce::from([9u8; 12]), &header, &mut buf)
        .unwrap();
    header.extend_from_slice(&buf);
    header
}

fn round_trip(c: &Contents) {
    let sealed = seal_bundle(&KEY, c).unwrap();
    assert_eq!(&open_bundle(&KEY, &sealed).unwrap(), c);
}

#[test]
fn open_bundle_survives_20000_hostile_inputs() {
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let valid = seal_bundle(&KEY, &sample()).unwrap();
    assert_eq!(open_bundle(&KEY, &valid).unwrap(), sample());
    let plain = br#"{"server_url":"https://h:8443","device_id":"d","ca_pin":"cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd","secrets":{"a":"616c706861","b.c":"00ff225c"}}"#;
    assert_eq!(open_bundle(&KEY, &envelope(plain)).unwrap(), {
        let mut c = Contents {
            server_url: Some("https://h:8443".into()),
            device_id: Some("d".into()),
            ca_pin: Some("cd".repeat(32)),
            ..Contents::default()
        };
        c.put_secret("a", SecretBytes::from_slice(b"alpha"))
            .unwrap();
        c.put_secret("b.c", SecretBytes::from_slice(&[0, 255, 34, 92]))
            .unwrap();
        c
    });

    let (mut refused, mut parsed_plain, mut refused_plain) = (0, 0, 0);
    for i in 0..20_000 {
        match i % 4 {
            // Mutations of a real sealed bundle: must never be accepted.
            0 | 1 => {
                let m = mutate(&mut rng, &valid);
                if m == valid {
                    continue;
                }
                match open_bundle(&KEY, &m) {
                    Err(VaultError::Tampered) | Err(VaultError::Format(_)) => refused += 1,
                    Err(other) => panic!("case {i}: unexpected error {other:?}"),
                    Ok(_) => panic!("case {i}: a mutated bundle was accepted"),
                }
            }
            // Random bytes, half of them behind a valid-looking header.
            2 => {
                let mut m = Vec::new();
                if rng.below(2) == 0 {
                    m.extend_from_slice(&valid[..HEADER_LEN]);
                }
                let n = rng.below(300);
                m.extend(rng.bytes(n));
                assert!(
                    open_bundle(&KEY, &m).is_err(),
                    "case {i}: random bytes accepted"
                );
                refused += 1;
            }
            // Mutated plaintexts in a valid envelope: reach the JSON parser. Whatever parses
            // must survive a seal/open round trip unchanged.
            _ => {
                let m = mutate(&mut rng, plain);
                match open_bundle(&KEY, &envelope(&m)) {
                    Ok(c) => {
                        round_trip(&c);
                        parsed_plain += 1;
                    }
                    Err(VaultError::Tampered) => panic!("case {i}: valid envelope refused"),
                    Err(_) => refused_plain += 1,
                }
            }
        }
    }
    assert!(refused > 14_000, "{refused}");
    assert!(
        parsed_plain > 0 && refused_plain > 0,
        "{parsed_plain} {refused_plain}"
    );
}
