//! Review finding H1, end to end through the real `devid-server` binary: renewal accepts only
//! the device's current certificate, or its immediate predecessor until the new one is first
//! used; a superseded certificate works neither on `POST /v1/renew` nor on MQTT; a lost
//! renewal answer is recovered by retrying with the old certificate; a key change is refused
//! where the policy says so; a re-enrolment evicts a stolen unit's certificates.
#![allow(clippy::unwrap_used)]

mod common;
mod ingest_support;

use std::sync::Arc;

use common::Server;
use devid_enroll::{build_csr_with_keystore, enroll, renew, EnrollError};
use devid_keystore::soft::SoftKeystore;
use devid_keystore::Keystore;
use devid_mqtt::Protocol;
use ingest_support::*;

fn soft(dir: &std::path::Path) -> Arc<dyn Keystore> {
    std::fs::create_dir_all(dir).unwrap();
    Arc::new(SoftKeystore::create(dir).unwrap())
}

/// The device `dev` with another certificate chain (same key).
fn with_chain(dev: &Device, name: &str, chain_pem: &str) -> Device {
    let cert_path = dev.dir.join(format!("{name}.pem"));
    std::fs::write(&cert_path, chain_pem).unwrap();
    Device {
        cert_path,
        ..dev.clone()
    }
}

fn refused(r: Result<devid_proto::EnrollResponse, EnrollError>) -> (u16, String) {
    match r {
        Err(EnrollError::Server { status, code, .. }) => (status, code),
        other => panic!("expected a server refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_superseded_certificate_can_neither_renew_nor_connect() {
    let s = Server::start_with_config(&[], FAST);
    let ca = s.ca_pem_path();
    let dev = enrol(&s, "h1-dev", "default");
    let ks: Arc<dyn Keystore> = Arc::new(SoftKeystore::open(&dev.dir).unwrap());
    let csr = build_csr_with_keystore(&*ks, None).unwrap();
    let c0 = dev.cert_pem();

    // r1's answer is lost on the way; the device retries with c0 and recovers by itself
    let (url, pin) = (s.url.clone(), s.pin.clone());
    let lost = {
        let (c0, ks, csr) = (c0.clone(), ks.clone(), csr.clone());
        let (url, pin) = (url.clone(), pin.clone());
        tokio::task::spawn_blocking(move || renew(&url, &pin, &c0, ks, &csr).unwrap())
            .await
            .unwrap()
    };
    let r2 = {
        let (c0, ks, csr) = (c0.clone(), ks.clone(), csr.clone());
        let (url, pin) = (url.clone(), pin.clone());
        tokio::task::spawn_blocking(move || renew(&url, &pin, &c0, ks, &csr).unwrap())
            .await
            .unwrap()
    };
    assert_ne!(lost.certificate_chain, r2.certificate_chain);
    let c2 = with_chain(&dev, "c2", &r2.certificate_chain);
    let c1 = with_chain(&dev, "c1", &lost.certificate_chain);

    // c1 was superseded by c2 before it was ever used
    let (_c, code) = Client::connect(s.mqtt_port, &ca, &c1, Protocol::V5, &dev.id)
        .await
        .unwrap();
    assert_eq!(code, 0x86, "c1 must be refused on MQTT");

    // the first use of c2 kills c0 for good
    let mut live = Client::connect_ok(s.mqtt_port, &ca, &c2, Protocol::V5).await;
    assert_eq!(
        live.publish_qos1(&dev.topic("telemetry/t"), 1, b"1", Some("a"))
            .await,
        Some(0)
    );
    let (_c, code) = Client::connect(s.mqtt_port, &ca, &dev, Protocol::V5, &dev.id)
        .await
        .unwrap();
    assert_eq!(code, 0x86, "c0 must be refused on MQTT after c2 was used");
    let before = s.devices();
    let (st, code) = {
        let (c0, ks, csr) = (c0.clone(), ks.clone(), csr.clone());
        let (url, pin) = (url.clone(), pin.clone());
        refused(
            tokio::task::spawn_blocking(move || renew(&url, &pin, &c0, ks, &csr))
                .await
                .unwrap(),
        )
    };
    assert_eq!((st, code.as_str()), (403, "cert_superseded"));
    wait_audit(&s, "renew", "cert_superseded");
    assert_eq!(s.devices(), before, "a refused renewal changes nothing");

    // a stolen unit keeps c2; the operator re-enrols a replacement under the same id
    let token = s.token(&["--device-id", "h1-dev", "--ttl", "10m"]);
    let replacement = soft(&s.tmp.path().join("replacement"));
    let csr_r = build_csr_with_keystore(&*replacement, Some("h1-dev")).unwrap();
    {
        let (url, pin) = (url.clone(), pin.clone());
        tokio::task::spawn_blocking(move || enroll(&url, &token, &pin, &csr_r, Some("h1-dev")))
            .await
            .unwrap()
            .unwrap();
    }
    let before = s.devices();
    let (st, code) = {
        let (c2, ks, csr) = (r2.certificate_chain.clone(), ks.clone(), csr.clone());
        let (url, pin) = (url.clone(), pin.clone());
        refused(
            tokio::task::spawn_blocking(move || renew(&url, &pin, &c2, ks, &csr))
                .await
                .unwrap(),
        )
    };
    assert_eq!((st, code.as_str()), (403, "cert_superseded"));
    assert_eq!(s.devices(), before);
    let (_c, code) = Client::connect(s.mqtt_port, &ca, &c2, Protocol::V5, &dev.id)
        .await
        .unwrap();
    assert_eq!(code, 0x86, "the stolen unit's c2 must be refused on MQTT");
}

#[test]
fn a_key_change_is_refused_where_the_policy_says_so() {
    let s = Server::start_with_config(&[], "renewal.key_change = \"refused\"");
    let dev = enrol(&s, "h1-key", "default");
    let ks: Arc<dyn Keystore> = Arc::new(SoftKeystore::open(&dev.dir).unwrap());
    // brief root on the device: a CSR for an exportable software key, signed in over TLS
    // with the device's own key
    let exportable = soft(&s.tmp.path().join("exportable"));
    let csr = build_csr_with_keystore(&*exportable, None).unwrap();
    let before = s.devices();
    let (st, code) = refused(renew(&s.url, &s.pin, &dev.cert_pem(), ks.clone(), &csr));
    assert_eq!((st, code.as_str()), (403, "key_change_refused"));
    wait_audit(&s, "renew", "key_change_refused");
    assert_eq!(s.devices(), before);
    // the same key renews
    let same = build_csr_with_keystore(&*ks, None).unwrap();
    renew(&s.url, &s.pin, &dev.cert_pem(), ks, &same).unwrap();
}
