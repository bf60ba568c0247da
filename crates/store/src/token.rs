//! Secrets handed to people: one-time enrolment tokens and the admin credential. Both are 256
//! random bits shown once as hex; the database keeps only their SHA-256.

use rand_core::{OsRng, RngCore};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// A fresh random token: 32 bytes from the OS, as 64 lowercase hex characters.
pub fn generate() -> Zeroizing<String> {
    let mut b = Zeroizing::new([0u8; 32]);
    OsRng.fill_bytes(&mut *b);
    Zeroizing::new(hex::encode(*b))
}

/// The stored form of a token: hex SHA-256 of its text.
pub fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.trim().as_bytes()))
}

/// Whether `s` looks like a token (64 hex characters); anything else is refused early.
pub fn well_formed(s: &str) -> bool {
    let s = s.trim();
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A policy name: `[a-z0-9_-]{1,64}`.
pub fn valid_policy(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_hashed() {
        let a = generate();
        let b = generate();
        assert_ne!(*a, *b);
        assert!(well_formed(&a));
        assert_ne!(hash(&a), *a);
        assert_eq!(hash(&a).len(), 64);
        assert!(!well_formed("abc"));
        assert!(valid_policy("default"));
        assert!(!valid_policy("Bad"));
    }
}
