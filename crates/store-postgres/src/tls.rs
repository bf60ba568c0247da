//! TLS to PostgreSQL over rustls, with libpq's `sslmode` semantics.
//!
//! rust-postgres knows `sslmode=disable|prefer|require` and no `sslrootcert`; devid reads the
//! libpq parameters itself ([`TlsTarget::parse`] strips `sslmode` and `sslrootcert` from the
//! URL before the driver sees it) and builds one [`MakeRustlsConnect`] for the pool, the first
//! direct connection and the `LISTEN` thread alike:
//!
//! | sslmode         | TLS                              | server certificate checked        |
//! |-----------------|----------------------------------|-----------------------------------|
//! | `disable`       | never                            | -                                 |
//! | `prefer` (none) | if the server offers it          | only if `sslrootcert` is given    |
//! | `require`       | always (refused otherwise)       | only if `sslrootcert` is given    |
//! | `verify-ca`     | always                           | chains to `sslrootcert`           |
//! | `verify-full`   | always                           | chains to `sslrootcert` + host    |
//!
//! As in libpq, a missing `sslmode` is `prefer`, and a root certificate given with `prefer`
//! or `require` is checked (libpq's `verify-ca` behaviour). Unlike libpq, `prefer` falls back
//! to plaintext only when the server says it has no TLS, not after a failed handshake, and a
//! `verify-*` mode without `sslrootcert` is an error (there is no `~/.postgresql/root.crt`
//! default: the server has no home directory to speak of).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use r2d2_postgres::postgres;
use r2d2_postgres::postgres::config::{Host, SslMode as DriverMode};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

/// libpq's `sslmode` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// TLS if the server offers it (libpq's default).
    Prefer,
    /// TLS or no connection; the certificate is not checked (unless `sslrootcert` is given).
    Require,
    /// TLS; the certificate chains to `sslrootcert`.
    VerifyCa,
    /// TLS; the certificate chains to `sslrootcert` and names the host.
    VerifyFull,
}

impl SslMode {
    /// The URL value.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    fn parse(s: &str) -> Result<Self, TlsSettingsError> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => return Err(TlsSettingsError::BadMode(other.to_owned())),
        })
    }
}

/// What is wrong with the URL's TLS parameters or the files they name.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsSettingsError {
    /// `sslmode` has a value libpq does not know.
    #[error("sslmode={0:?} is not one of disable, prefer, require, verify-ca, verify-full")]
    BadMode(String),
    /// `verify-ca` / `verify-full` without a CA to verify against.
    #[error(
        "sslmode={0} needs sslrootcert=FILE (the PEM certificate of the CA that issued the \
         database server's certificate)"
    )]
    NoRootCert(&'static str),
    /// A parameter appears twice.
    #[error("{0} appears twice in the database URL")]
    Duplicate(&'static str),
    /// A `%XX` escape that is not one.
    #[error("{0}: bad percent-encoding in the database URL")]
    BadEscape(&'static str),
    /// The root certificate file cannot be read.
    #[error("cannot read sslrootcert={path}: {source}")]
    ReadRootCert {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The root certificate file holds no usable certificate.
    #[error("sslrootcert={path}: {detail}")]
    BadRootCert {
        /// The file.
        path: String,
        /// Why.
        detail: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The TLS half of a database URL: the mode, the CA file, and the URL the driver gets.
#[derive(Debug, Clone)]
pub struct TlsTarget {
    /// The URL without `sslmode` and `sslrootcert` (rust-postgres refuses libpq's other modes).
    pub driver_url: String,
    /// The mode (`prefer` when the URL gives none).
    pub mode: SslMode,
    /// `sslrootcert`, as given.
    pub root_cert: Option<PathBuf>,
}

impl TlsTarget {
    /// Take `sslmode` and `sslrootcert` out of a `postgres://` URL's query.
    pub fn parse(url: &str) -> Result<Self, TlsSettingsError> {
        let (base, query) = match url.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (url, None),
        };
        let mut kept = Vec::new();
        let mut mode = None;
        let mut root = None;
        for kv in query.into_iter().flat_map(|q| q.split('&')) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            match k {
                "sslmode" => {
                    if mode.is_some() {
                        return Err(TlsSettingsError::Duplicate("sslmode"));
                    }
                    mode = Some(SslMode::parse(&percent_decode(v, "sslmode")?)?);
                }
                "sslrootcert" => {
                    if root.is_some() {
                        return Err(TlsSettingsError::Duplicate("sslrootcert"));
                    }
                    root = Some(PathBuf::from(percent_decode(v, "sslrootcert")?));
                }
                _ => kept.push(kv),
            }
        }
        let mode = mode.unwrap_or(SslMode::Prefer);
        if matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull) && root.is_none() {
            return Err(TlsSettingsError::NoRootCert(mode.as_str()));
        }
        let driver_url = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        Ok(Self {
            driver_url,
            mode,
            root_cert: root,
        })
    }

    /// The mode rust-postgres runs the handshake with (it only decides whether TLS is asked
    /// for; what is checked is the connector's business).
    pub fn driver_mode(&self) -> DriverMode {
        match self.mode {
            SslMode::Disable => DriverMode::Disable,
            SslMode::Prefer => DriverMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => DriverMode::Require,
        }
    }

    /// Is the server's certificate checked against `sslrootcert`?
    pub fn verifies_chain(&self) -> bool {
        self.mode != SslMode::Disable && self.root_cert.is_some()
    }

    /// The connector for this mode (one, shared by every connection of the store).
    pub fn connector(&self) -> Result<MakeRustlsConnect, TlsSettingsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = match &self.root_cert {
            Some(path) => Some(Arc::new(load_roots(path)?)),
            None => None,
        };
        let check = match (self.mode, roots) {
            // never used (the driver does not ask for TLS); fails closed if it ever were
            (SslMode::Disable, _) => Check::Chain(Arc::new(RootCertStore::empty())),
            (SslMode::VerifyFull, Some(roots)) => Check::Full(roots),
            (_, Some(roots)) => Check::Chain(roots),
            (_, None) => Check::Nothing,
        };
        let verifier = Arc::new(Verifier {
            check,
            provider: provider.clone(),
        });
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(MakeRustlsConnect::new(config))
    }

    /// A refused connection in words an operator acts on, when it is a TLS matter: a
    /// certificate that does not chain to `sslrootcert` or does not name the host, or a
    /// server without TLS where this mode requires it. `None`: the driver's words will do.
    pub fn explain(&self, e: &postgres::Error, config: &postgres::Config) -> Option<String> {
        let mode = self.mode.as_str();
        let root = self
            .root_cert
            .as_deref()
            .map(Path::display)
            .map(|p| p.to_string())
            .unwrap_or_default();
        if let Some(err) = rustls_error(e) {
            return match err {
                rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName
                    | CertificateError::NotValidForNameContext { .. },
                ) => Some(format!(
                    "the database server's certificate is not valid for the host name {} \
                     (sslmode={mode} checks it): {err}",
                    tcp_host(config).unwrap_or("?")
                )),
                rustls::Error::InvalidCertificate(
                    CertificateError::Expired
                    | CertificateError::ExpiredContext { .. }
                    | CertificateError::NotValidYet
                    | CertificateError::NotValidYetContext { .. },
                ) => Some(format!(
                    "the database server's certificate is outside its validity period: {err}"
                )),
                rustls::Error::InvalidCertificate(_) => Some(format!(
                    "the database server's certificate does not chain to sslrootcert={root} \
                     (sslmode={mode}): {err}"
                )),
                _ => None,
            };
        }
        if self.driver_mode() == DriverMode::Require
            && chain(e).any(|c| c.to_string().contains("server does not support TLS"))
        {
            return Some(format!(
                "the database server does not accept TLS, and sslmode={mode} requires it \
                 (set ssl = on, ssl_cert_file and ssl_key_file in its postgresql.conf)"
            ));
        }
        None
    }
}

/// The first TCP host of the config (the name TLS checks).
pub(crate) fn tcp_host(config: &postgres::Config) -> Option<&str> {
    config.get_hosts().iter().find_map(|h| match h {
        Host::Tcp(name) => Some(name.as_str()),
        Host::Unix(_) => None,
    })
}

/// Every host is a unix socket or on the loopback: nothing between here and the database
/// for TLS to protect against.
pub(crate) fn only_local(config: &postgres::Config) -> bool {
    let loopback = |name: &str| {
        name == "localhost"
            || name
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    };
    let hosts_local = config.get_hosts().iter().all(|h| match h {
        Host::Tcp(name) => loopback(name),
        Host::Unix(_) => true,
    });
    let addrs_local = config.get_hostaddrs().iter().all(|ip| ip.is_loopback());
    hosts_local && addrs_local
}

fn chain<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(e), |c| c.source())
}

/// The rustls error somewhere in the driver's cause chain (tokio-rustls wraps it in an
/// `io::Error`, whose `source()` skips it: look inside with `get_ref`).
fn rustls_error(e: &postgres::Error) -> Option<&rustls::Error> {
    chain(e).find_map(|c| {
        c.downcast_ref::<rustls::Error>().or_else(|| {
            c.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        })
    })
}

fn load_roots(path: &Path) -> Result<RootCertStore, TlsSettingsError> {
    let shown = path.display().to_string();
    let pem = std::fs::read(path).map_err(|source| TlsSettingsError::ReadRootCert {
        path: shown.clone(),
        source,
    })?;
    let bad = |detail: String| TlsSettingsError::BadRootCert {
        path: shown.clone(),
        detail,
    };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| bad(format!("not PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| bad(format!("not a usable CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(bad("holds no PEM certificate".into()));
    }
    Ok(roots)
}

fn percent_decode(s: &str, what: &'static str) -> Result<String, TlsSettingsError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or(TlsSettingsError::BadEscape(what))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| TlsSettingsError::BadEscape(what))
}

/// What the server's certificate must satisfy.
#[derive(Debug)]
enum Check {
    /// Nothing (`prefer`/`require` without `sslrootcert`): encrypted, not authenticated.
    Nothing,
    /// A chain to one of these roots (`verify-ca`, or a root given with `prefer`/`require`).
    Chain(Arc<RootCertStore>),
    /// A chain to one of these roots, and the host name (`verify-full`).
    Full(Arc<RootCertStore>),
}

/// The server certificate verifier of every sslmode. The handshake signatures are always
/// checked (the peer holds the key of the certificate it sent); what differs is what is
/// required of that certificate.
#[derive(Debug)]
struct Verifier {
    check: Check,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let roots = match &self.check {
            Check::Nothing => return Ok(ServerCertVerified::assertion()),
            Check::Chain(roots) | Check::Full(roots) => roots,
        };
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        if let Check::Full(_) = self.check {
            rustls::client::verify_server_name(&cert, server_name)?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_parameters_are_taken_out_of_the_url() {
        let t = TlsTarget::parse(
            "postgres://u@db:5432/d?application_name=x&sslmode=verify-full&sslrootcert=%2Fetc%2Fca%20x.pem",
        )
        .unwrap();
        assert_eq!(t.mode, SslMode::VerifyFull);
        assert_eq!(t.root_cert.as_deref(), Some(Path::new("/etc/ca x.pem")));
        assert_eq!(t.driver_url, "postgres://u@db:5432/d?application_name=x");
        let t = TlsTarget::parse("postgres://u@db/d").unwrap();
        assert_eq!(
            (t.mode, t.driver_url.as_str()),
            (SslMode::Prefer, "postgres://u@db/d")
        );
        let t = TlsTarget::parse("postgres://u@db/d?sslmode=require").unwrap();
        assert_eq!(t.driver_mode(), DriverMode::Require);
        assert!(!t.verifies_chain());
        assert_eq!(t.driver_url, "postgres://u@db/d");
        for bad in [
            "postgres://h/d?sslmode=verify-full",
            "postgres://h/d?sslmode=verify-ca",
            "postgres://h/d?sslmode=strict",
            "postgres://h/d?sslmode=require&sslmode=disable",
            "postgres://h/d?sslmode=require&sslrootcert=%zz",
        ] {
            assert!(TlsTarget::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn local_hosts_are_recognised() {
        use std::str::FromStr;
        let local = |u: &str| only_local(&postgres::Config::from_str(u).unwrap());
        assert!(local("postgres://u@127.0.0.1:5432/d"));
        assert!(local("postgres://u@localhost/d"));
        assert!(local("postgres://u@%2Frun%2Fpostgresql/d"));
        assert!(!local("postgres://u@db.example/d"));
        assert!(!local("postgres://u@10.0.0.7/d"));
    }
}
