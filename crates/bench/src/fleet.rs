//! The simulated fleet: N devices, each with its own ECDSA P-256 key (soft, in memory) and a
//! certificate from devid's fleet CA, obtained through the real enrolment API (one-time token
//! from the admin API, CSR built by [`devid_enroll::build_csr`], `POST /v1/enroll`). Mosquitto
//! trusts the same CA, so the same certificates work on both servers.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devid_admin_client::AdminClient;
use devid_proto::TokenCreateRequest;
use rcgen::{PublicKeyData, SigningKey};
use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::{ClientConfig, RootCertStore};

use crate::BenchError;

/// One simulated device.
pub struct Device {
    /// Its device id (also the MQTT client id and the certificate's CN).
    pub id: String,
    chain: Vec<CertificateDer<'static>>,
    key: PrivatePkcs8KeyDer<'static>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// The fleet and what the clients need to connect.
pub struct Fleet {
    /// The devices, in enrolment order.
    pub devices: Vec<Device>,
    provider: Arc<CryptoProvider>,
    verifier: Arc<WebPkiServerVerifier>,
    /// Wall time the enrolment took.
    pub enrol_time: Duration,
    /// Enrolment concurrency used.
    pub enrol_concurrency: usize,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("devices", &self.devices.len())
            .field("enrol_time", &self.enrol_time)
            .finish_non_exhaustive()
    }
}

/// Device id of device number `i`.
pub fn device_id(i: usize) -> String {
    format!("bench-{i:06}")
}

fn enrol_one(admin: &AdminClient, url: &str, pin: &str, i: usize) -> Result<Device, BenchError> {
    let id = device_id(i);
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| BenchError::Enrol(format!("key generation: {e}")))?;
    let token = admin
        .create_token(&TokenCreateRequest {
            device_id: Some(id.clone()),
            ..Default::default()
        })
        .map_err(|e| BenchError::Enrol(format!("token for {id}: {e}")))?
        .token;
    let sign = |m: &[u8]| -> Result<Vec<u8>, String> { key.sign(m).map_err(|e| e.to_string()) };
    let csr = devid_enroll::build_csr(&sign, &key.subject_public_key_info(), Some(&id))
        .map_err(|e| BenchError::Enrol(format!("CSR for {id}: {e}")))?;
    let resp = devid_enroll::enroll(url, &token, pin, &csr, Some(&id))
        .map_err(|e| BenchError::Enrol(format!("{id}: {e}")))?;
    let chain = CertificateDer::pem_slice_iter(resp.certificate_chain.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| BenchError::Enrol(format!("{id}: certificate chain: {e}")))?;
    Ok(Device {
        id,
        chain,
        key: PrivatePkcs8KeyDer::from(key.serialize_der()),
    })
}

impl Fleet {
    /// Enrol `n` devices on the devid server at `url` (admin client `admin`, CA pin `pin`,
    /// CA certificate `ca_pem`), `concurrency` at a time.
    pub fn enrol(
        admin: &AdminClient,
        url: &str,
        pin: &str,
        ca_pem: &[u8],
        n: usize,
        concurrency: usize,
    ) -> Result<Fleet, BenchError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca_pem) {
            let c = c.map_err(|e| BenchError::Tls(format!("CA PEM: {e}")))?;
            roots
                .add(c)
                .map_err(|e| BenchError::Tls(format!("CA certificate: {e}")))?;
        }
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| BenchError::Tls(format!("server verifier: {e}")))?;
        let start = Instant::now();
        let next = AtomicUsize::new(0);
        let done = AtomicUsize::new(0);
        let slots: Mutex<Vec<Option<Device>>> = Mutex::new((0..n).map(|_| None).collect());
        let first_error: Mutex<Option<BenchError>> = Mutex::new(None);
        let concurrency = concurrency.clamp(1, 64);
        std::thread::scope(|s| {
            for _ in 0..concurrency {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    match enrol_one(admin, url, pin, i) {
                        Ok(d) => {
                            if let Ok(mut v) = slots.lock() {
                                v[i] = Some(d);
                            }
                            let k = done.fetch_add(1, Ordering::Relaxed) + 1;
                            if k.is_multiple_of(2000) {
                                tracing::info!(enrolled = k, of = n, "enrolling");
                            }
                        }
                        Err(e) => {
                            if let Ok(mut f) = first_error.lock() {
                                f.get_or_insert(e);
                            }
                            next.store(n, Ordering::Relaxed);
                            break;
                        }
                    }
                });
            }
        });
        if let Some(e) = first_error.into_inner().ok().flatten() {
            return Err(e);
        }
        let devices = slots
            .into_inner()
            .map_err(|_| BenchError::Enrol("an enrolment thread panicked".into()))?
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| BenchError::Enrol("a device was not enrolled".into()))?;
        Ok(Fleet {
            devices,
            provider,
            verifier,
            enrol_time: start.elapsed(),
            enrol_concurrency: concurrency,
        })
    }

    /// A TLS 1.3 client config presenting device `i`'s certificate. With `resume`, the
    /// config keeps session tickets (an in-memory cache private to this device) so
    /// reconnects resume; without, every connection is a full handshake.
    pub fn client_config(&self, i: usize, resume: bool) -> Result<Arc<ClientConfig>, BenchError> {
        let d = self
            .devices
            .get(i)
            .ok_or_else(|| BenchError::Scenario(format!("device {i} is not enrolled")))?;
        let mut cfg = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| BenchError::Tls(e.to_string()))?
            .with_webpki_verifier(self.verifier.clone())
            .with_client_auth_cert(d.chain.clone(), PrivateKeyDer::Pkcs8(d.key.clone_key()))
            .map_err(|e| BenchError::Tls(format!("{}: client certificate: {e}", d.id)))?;
        if resume {
            cfg.resumption = Resumption::in_memory_sessions(8);
        } else {
            cfg.resumption = Resumption::disabled();
            // A client that never resumes says so (RFC 9149), as a careful device would:
            // servers that honour the request skip issuing tickets it would throw away.
            cfg.send_ticket_request = Some(rustls::client::TicketRequest {
                new_session_count: 0,
                resumption_count: 0,
            });
        }
        Ok(Arc::new(cfg))
    }

    /// Client configs for devices `range`, with their ids.
    pub fn configs(
        &self,
        range: std::ops::Range<usize>,
        resume: bool,
    ) -> Result<Vec<(String, Arc<ClientConfig>)>, BenchError> {
        range
            .map(|i| {
                let cfg = self.client_config(i, resume)?;
                Ok((self.devices[i].id.clone(), cfg))
            })
            .collect()
    }
}
