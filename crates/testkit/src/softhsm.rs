//! SoftHSMv2 tokens for tests (filled in with the PKCS#11 backend).
