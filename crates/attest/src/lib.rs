//! Server-side TPM 2.0 key attestation, in pure Rust.
//!
//! The devid server uses this crate to judge bytes a device sends about its TPM: it never
//! links tss-esapi, libtss2 or any C TPM library, so untrusted TPM structures are only ever
//! parsed by the strict, bounded parsers in [`wire`]. The three proofs, in the order the server
//! checks them:
//!
//! 1. **EK → genuine TPM**: [`ek::EkCert::parse`] reads the EK certificate from the NV bytes,
//!    [`ek::EkRoots::verify`] chains it to a configured set of TPM-maker roots.
//! 2. **AK → same TPM as that EK**: [`verify::check_ak`] checks the AK's public area
//!    (restricted signing, fixedTPM, ...), [`credential::make_credential`] encrypts a secret to
//!    the EK bound to the AK's Name (what `TPM2_MakeCredential` does, in software); the device
//!    proves it could `TPM2_ActivateCredential` it (`devid_proto::attest_binding::activation_proof`).
//! 3. **Device key → same TPM, non-exportable**: [`verify::verify_certify`] checks a
//!    `TPM2_Certify` of the device key signed by that AK over
//!    `devid_proto::attest_binding::qualifying_data`.
//!
//! Invariants: every parser rejects trailing bytes and over-long fields; EK protection
//! parameters (name hash, AES key size) always come from the standard EK template for the
//! algorithm of the *certificate's* key ([`ek::EkPublic`]), never from the client; every
//! refusal is its own [`AttestError`] variant with a stable [`AttestError::code`]; secrets,
//! seeds and derived keys are zeroized.
//!
//! The device never links it: the device side is tss-esapi in `devid-keystore-tpm`, and the
//! bindings both sides compute are in `devid-proto`. It stays light anyway: no async runtime, no I/O
//! besides [`ek::EkRoots::from_pem_dir`].

#![forbid(unsafe_code)]

pub mod credential;
pub mod ek;
mod error;
pub mod verify;
pub mod wire;

pub use error::AttestError;

/// `Result` with [`AttestError`].
pub type Result<T> = std::result::Result<T, AttestError>;
