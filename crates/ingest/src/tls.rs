//! Reason codes for failed MQTT TLS handshakes (metrics and audit rows). The listener's
//! `rustls::ServerConfig` is built by the composition root; which device a certificate names
//! is `devid_tls::identity`'s one rule.

/// A stable reason code for a failed TLS handshake.
pub fn failure_reason(e: &std::io::Error) -> &'static str {
    use rustls::CertificateError as C;
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::NoCertificatesPresented) => "tls_no_client_cert",
        Some(rustls::Error::InvalidCertificate(c)) => match c {
            C::UnknownIssuer => "tls_unknown_ca",
            C::Expired | C::ExpiredContext { .. } => "tls_cert_expired",
            C::NotValidYet | C::NotValidYetContext { .. } => "tls_cert_not_yet_valid",
            C::BadSignature => "tls_bad_signature",
            C::InvalidPurpose | C::InvalidPurposeContext { .. } => "tls_cert_wrong_purpose",
            _ => "tls_invalid_cert",
        },
        Some(rustls::Error::PeerIncompatible(_)) => "tls_incompatible",
        Some(rustls::Error::AlertReceived(_)) => "tls_alert_received",
        Some(_) => "tls_error",
        None if e.kind() == std::io::ErrorKind::UnexpectedEof => "tls_eof",
        None => "tls_io",
    }
}

/// Whether a handshake failure is about the client's certificate (worth an audit row).
pub fn is_certificate_failure(reason: &str) -> bool {
    matches!(
        reason,
        "tls_no_client_cert"
            | "tls_unknown_ca"
            | "tls_cert_expired"
            | "tls_cert_not_yet_valid"
            | "tls_bad_signature"
            | "tls_cert_wrong_purpose"
            | "tls_invalid_cert"
    )
}
