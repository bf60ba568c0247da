//! The store contract, written once and run against every backend (`store_sqlite.rs`,
//! `store_postgres.rs`): single-use tokens under contention, refusals that change nothing but
//! the audit log, renewal, permanent revocation, audit queries.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::sync::{Arc, Barrier};
use std::time::Duration;

use devid_ca::Ca;
use devid_proto::{DeviceId, DeviceState};
use devid_stdx::now_ms;
use devid_store::token;
use devid_store::{
    AuditCtx, DeviceRecord, EnrollAttempt, IssuedCert, KeyChangePolicy, NewToken, PresentedCert,
    Refusal, Registry, RenewAttempt, Role,
};
use rcgen::{KeyPair, PublicKeyData, PKCS_ECDSA_P256_SHA256};

pub fn ctx() -> AuditCtx {
    AuditCtx {
        actor: "test".into(),
        source: "127.0.0.1:1".into(),
        now_ms: now_ms(),
    }
}

pub fn new_token(store: &dyn Registry, device: Option<&str>, ttl_ms: i64) -> String {
    let t = token::generate();
    store
        .create_token(
            &NewToken {
                hash: token::hash(&t),
                device_id: device.map(|d| DeviceId::parse(d).unwrap()),
                policy: "default".into(),
                expires_at_ms: now_ms() + ttl_ms,
                attestation_required: false,
                ek_fingerprint: None,
            },
            &ctx(),
        )
        .unwrap();
    t.to_string()
}

pub fn enroll(
    store: &dyn Registry,
    ca: &Ca,
    tok: &str,
    requested: Option<&str>,
) -> Result<DeviceId, Refusal> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let spki = key.subject_public_key_info();
    let requested = requested.map(|r| DeviceId::parse(r).unwrap());
    let c = ctx();
    let hash = token::hash(tok);
    let attempt = EnrollAttempt {
        token_hash: &hash,
        requested_id: requested.as_ref(),
        key_fingerprint: "fp",
        attestation: None,
        ctx: &c,
        reported_backend: Some("tpm"),
    };
    let mut issue = |id: &DeviceId| {
        ca.issue_device(id, &spki, Duration::from_secs(3600), c.now_ms)
            .map_err(Into::into)
    };
    store
        .enroll(&attempt, &mut issue)
        .unwrap()
        .map(|(rec, _)| rec.id)
}

/// Four threads race for each of five tokens: exactly one enrols, the rest see `TokenUsed`.
pub fn tokens_are_single_use_even_under_contention(store: Arc<dyn Registry>) {
    let ca = Arc::new(Ca::generate("localhost", now_ms()).unwrap());
    for round in 0..5 {
        let tok = new_token(&*store, None, 60_000);
        let barrier = Arc::new(Barrier::new(4));
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let (store, ca, tok, barrier) =
                    (store.clone(), ca.clone(), tok.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    enroll(&*store, &ca, &tok, Some(&format!("r{round}-t{i}")))
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(
            results.iter().filter(|r| r.is_ok()).count(),
            1,
            "{results:?}"
        );
        assert!(results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .all(|e| *e == Refusal::TokenUsed));
    }
    assert_eq!(store.devices().unwrap().len(), 5);
}

/// Two tokens without binding, both asking for the same new id at once: one device, one
/// refusal (`DeviceExists`), and the loser's token is not consumed.
pub fn two_tokens_racing_for_one_new_id(store: Arc<dyn Registry>) {
    let ca = Arc::new(Ca::generate("localhost", now_ms()).unwrap());
    for round in 0..3 {
        let toks: Vec<String> = (0..2).map(|_| new_token(&*store, None, 60_000)).collect();
        let barrier = Arc::new(Barrier::new(2));
        let handles: Vec<_> = toks
            .iter()
            .map(|tok| {
                let (store, ca, tok, barrier) =
                    (store.clone(), ca.clone(), tok.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    enroll(&*store, &ca, &tok, Some(&format!("same-{round}")))
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(
            results.iter().filter(|r| r.is_ok()).count(),
            1,
            "{results:?}"
        );
        assert!(results.contains(&Err(Refusal::DeviceExists)), "{results:?}");
        // the loser's token still works for another id
        let loser = toks
            .iter()
            .zip(&results)
            .find(|(_, r)| r.is_err())
            .unwrap()
            .0;
        assert!(enroll(&*store, &ca, loser, Some(&format!("other-{round}"))).is_ok());
    }
}

pub fn refusals_change_nothing_but_the_audit_log(store: &dyn Registry) {
    let ca = Ca::generate("localhost", now_ms()).unwrap();
    assert_eq!(
        enroll(store, &ca, &token::generate(), None),
        Err(Refusal::TokenUnknown)
    );
    let expired = new_token(store, None, -1);
    assert_eq!(
        enroll(store, &ca, &expired, None),
        Err(Refusal::TokenExpired)
    );
    let bound = new_token(store, Some("dev-a"), 60_000);
    assert_eq!(
        enroll(store, &ca, &bound, Some("dev-b")),
        Err(Refusal::TokenBoundToOther)
    );
    assert!(store.devices().unwrap().is_empty());
    // the mismatch did not consume the token
    assert_eq!(enroll(store, &ca, &bound, None).unwrap().as_str(), "dev-a");
    // replay
    assert_eq!(enroll(store, &ca, &bound, None), Err(Refusal::TokenUsed));
    // an unbound token cannot take over an existing id
    let other = new_token(store, None, 60_000);
    assert_eq!(
        enroll(store, &ca, &other, Some("dev-a")),
        Err(Refusal::DeviceExists)
    );
    // generated ids are UUID v4
    let id = enroll(store, &ca, &other, None).unwrap();
    assert_eq!(id.as_str().len(), 36);
    let audit = store.audit_log(100, None).unwrap();
    let refused: Vec<_> = audit
        .iter()
        .filter(|a| a.action == "enroll" && a.outcome == "refused")
        .map(|a| a.detail.as_str())
        .collect();
    assert_eq!(
        refused,
        [
            "token_unknown",
            "token_expired",
            "token_device_mismatch",
            "token_used",
            "device_exists"
        ]
    );
    // oldest first, ids increasing, filter by device, limit keeps the newest
    assert!(audit.windows(2).all(|w| w[0].id < w[1].id));
    let dev_a = store.audit_log(100, Some("dev-a")).unwrap();
    assert!(!dev_a.is_empty());
    assert!(dev_a
        .iter()
        .all(|a| a.device_id.as_deref() == Some("dev-a")));
    let last2 = store.audit_log(2, None).unwrap();
    assert_eq!(last2.len(), 2);
    assert_eq!(last2[1].id, audit.last().unwrap().id);
}

/// Renew `id` presenting the certificate (serial, key) for a CSR key `new_key`.
pub fn renew(
    store: &dyn Registry,
    ca: &Ca,
    id: &DeviceId,
    presented: (&str, &str),
    new_key: &str,
    key_change: KeyChangePolicy,
) -> Result<(DeviceRecord, IssuedCert), Refusal> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let spki = key.subject_public_key_info();
    let c = ctx();
    let mut issue = |d: &DeviceId| {
        ca.issue_device(d, &spki, Duration::from_secs(7200), c.now_ms)
            .map_err(Into::into)
    };
    let presented = PresentedCert {
        serial_hex: presented.0.to_owned(),
        key_fingerprint: presented.1.to_owned(),
    };
    store
        .renew(
            &RenewAttempt {
                id,
                presented: &presented,
                key_fingerprint: new_key,
                key_change,
                attestation: None,
                ctx: &c,
            },
            &mut issue,
        )
        .unwrap()
}

/// Renewal of an active device records the new serial and key; a re-enrolment with a token
/// bound to an active device replaces its key.
pub fn renewal_and_reenrolment(store: &dyn Registry) {
    let ca = Ca::generate("localhost", now_ms()).unwrap();
    let id = enroll(store, &ca, &new_token(store, Some("ren-1"), 60_000), None).unwrap();
    let before = store.device(&id).unwrap().unwrap();
    assert_eq!(before.predecessor, None);
    let (rec, cert) = renew(
        store,
        &ca,
        &id,
        (&before.cert_serial, "fp"),
        "fp-new",
        KeyChangePolicy::Allowed,
    )
    .unwrap();
    assert_eq!(rec.cert_serial, cert.serial_hex);
    assert_ne!(rec.cert_serial, before.cert_serial);
    assert_eq!(rec.key_fingerprint, "fp-new");
    assert_eq!(rec.cert_not_after_ms, cert.not_after_ms);
    assert_eq!(
        rec.predecessor,
        Some((before.cert_serial.clone(), "fp".into()))
    );
    assert_eq!(store.device(&id).unwrap().unwrap(), rec);
    assert!(store
        .audit_log(10, Some("ren-1"))
        .unwrap()
        .iter()
        .any(|a| a.action == "renew.key_change" && a.detail.contains("key-change")));
    let unknown = DeviceId::parse("nobody").unwrap();
    assert_eq!(
        renew(
            store,
            &ca,
            &unknown,
            ("00", "fp"),
            "fp",
            KeyChangePolicy::Allowed
        )
        .err(),
        Some(Refusal::DeviceUnknown)
    );
    // re-enrolment with a token bound to the active device
    let again = enroll(store, &ca, &new_token(store, Some("ren-1"), 60_000), None).unwrap();
    assert_eq!(again, id);
    let after = store.device(&id).unwrap().unwrap();
    assert_eq!(after.key_fingerprint, "fp");
    assert_eq!(after.created_at_ms, before.created_at_ms);
    assert_eq!(
        after.predecessor, None,
        "a re-enrolment keeps no older certificate"
    );
    assert!(store
        .audit_log(10, Some("ren-1"))
        .unwrap()
        .iter()
        .any(|a| a.action == "enroll" && a.detail.ends_with("re-enrolment")));
}

/// Review finding H1: a renewal needs the device's current certificate, or its immediate
/// predecessor until the current one is first used; a superseded certificate, one from before
/// a re-enrolment, and a key change the policy refuses are refused with the registry unchanged
/// and the refusal audited.
pub fn renewal_accepts_only_the_current_certificate_or_its_unused_predecessor(
    store: &dyn Registry,
) {
    let ca = Ca::generate("localhost", now_ms()).unwrap();
    let id = enroll(store, &ca, &new_token(store, Some("h1-1"), 60_000), None).unwrap();
    let c0 = store.device(&id).unwrap().unwrap().cert_serial;
    // r1 with the enrolment certificate (same key)
    let (r1, _) = renew(store, &ca, &id, (&c0, "fp"), "fp", KeyChangePolicy::Refused).unwrap();
    let c1 = r1.cert_serial.clone();
    // the answer to r1 was lost: the device retries with c0 and gets a new certificate
    let (r2, _) = renew(store, &ca, &id, (&c0, "fp"), "fp", KeyChangePolicy::Refused).unwrap();
    let c2 = r2.cert_serial.clone();
    assert_ne!(c2, c1);
    assert_eq!(r2.predecessor, Some((c0.clone(), "fp".into())));
    // c1 (issued, never used, replaced by c2) is dead
    assert_eq!(
        renew(store, &ca, &id, (&c1, "fp"), "fp", KeyChangePolicy::Allowed).err(),
        Some(Refusal::CertSuperseded)
    );
    // first use of c2 (an MQTT CONNECT): c0 is dead from now on
    assert!(store.mark_cert_used(&id, &c2).unwrap());
    assert!(
        !store.mark_cert_used(&id, &c2).unwrap(),
        "marking twice changes nothing"
    );
    let before = store.device(&id).unwrap().unwrap();
    assert_eq!(before.predecessor, None);
    assert_eq!(
        renew(store, &ca, &id, (&c0, "fp"), "fp", KeyChangePolicy::Allowed).err(),
        Some(Refusal::CertSuperseded)
    );
    // a key change where the policy refuses it (and "attested": no attestation key yet)
    for policy in [KeyChangePolicy::Refused, KeyChangePolicy::Attested] {
        assert_eq!(
            renew(store, &ca, &id, (&c2, "fp"), "fp-soft", policy).err(),
            Some(Refusal::KeyChangeRefused)
        );
    }
    assert_eq!(
        store.device(&id).unwrap().unwrap(),
        before,
        "refusals change nothing"
    );
    // renewal with c2 itself works, and is also a first use
    let (r3, _) = renew(store, &ca, &id, (&c2, "fp"), "fp", KeyChangePolicy::Refused).unwrap();
    // re-enrolment (a replacement device): the stolen unit's certificates are all dead
    enroll(store, &ca, &new_token(store, Some("h1-1"), 60_000), None).unwrap();
    for old in [&c2, &r3.cert_serial] {
        assert_eq!(
            renew(store, &ca, &id, (old, "fp"), "fp", KeyChangePolicy::Allowed).err(),
            Some(Refusal::CertSuperseded)
        );
    }
    let refused: Vec<_> = store
        .audit_log(100, Some("h1-1"))
        .unwrap()
        .into_iter()
        .filter(|a| a.action == "renew" && a.outcome == "refused")
        .map(|a| a.detail)
        .collect();
    assert_eq!(
        refused,
        [
            "cert_superseded",
            "cert_superseded",
            "key_change_refused",
            "key_change_refused",
            "cert_superseded",
            "cert_superseded"
        ]
    );
}

/// Suspend, resume, revoke; revocation is permanent through the API. Returns the token that
/// was refused for the revoked id (the caller checks it is stored hashed only).
pub fn revocation_is_permanent(store: &dyn Registry) -> String {
    let ca = Ca::generate("localhost", now_ms()).unwrap();
    let id = enroll(store, &ca, &new_token(store, Some("dev-r"), 60_000), None).unwrap();
    let c = ctx();
    assert_eq!(
        store
            .set_state(&id, DeviceState::Suspended, &c)
            .unwrap()
            .unwrap()
            .state,
        DeviceState::Suspended
    );
    let tok = new_token(store, Some("dev-r"), 60_000);
    assert_eq!(
        enroll(store, &ca, &tok, None),
        Err(Refusal::DeviceSuspended)
    );
    assert_eq!(
        store
            .set_state(&id, DeviceState::Active, &c)
            .unwrap()
            .unwrap()
            .state,
        DeviceState::Active
    );
    store
        .set_state(&id, DeviceState::Revoked, &c)
        .unwrap()
        .unwrap();
    // setting the current state again succeeds
    store
        .set_state(&id, DeviceState::Revoked, &c)
        .unwrap()
        .unwrap();
    assert_eq!(
        store.set_state(&id, DeviceState::Active, &c).unwrap(),
        Err(Refusal::DeviceRevoked)
    );
    assert_eq!(
        store.set_state(&id, DeviceState::Suspended, &c).unwrap(),
        Err(Refusal::DeviceRevoked)
    );
    let nobody = DeviceId::parse("nobody").unwrap();
    assert_eq!(
        store.set_state(&nobody, DeviceState::Revoked, &c).unwrap(),
        Err(Refusal::DeviceUnknown)
    );
    // re-enrolment of a revoked id is refused even with a token bound to it
    assert_eq!(enroll(store, &ca, &tok, None), Err(Refusal::DeviceRevoked));
    assert_eq!(
        store.device(&id).unwrap().unwrap().state,
        DeviceState::Revoked
    );
    tok
}

/// Review finding L5: named admin credentials, an admin and a read-only role, revocable; the
/// last admin credential cannot be revoked; every change audited with the acting name.
pub fn admin_credentials_are_named_revocable_and_audited(store: &dyn Registry) {
    let c = AuditCtx {
        actor: "admin:admin".into(),
        ..ctx()
    };
    let admin = token::generate();
    let dash = token::generate();
    store
        .add_admin_credential("admin", Role::Admin, &token::hash(&admin), &c)
        .unwrap()
        .unwrap();
    store
        .add_admin_credential("dash", Role::ReadOnly, &token::hash(&dash), &c)
        .unwrap()
        .unwrap();
    let found = store
        .admin_credential(&token::hash(&dash))
        .unwrap()
        .unwrap();
    assert_eq!((found.name.as_str(), found.role), ("dash", Role::ReadOnly));
    assert_eq!(
        store
            .admin_credential(&token::hash(&admin))
            .unwrap()
            .unwrap()
            .role,
        Role::Admin
    );
    assert!(store
        .admin_credential(&token::hash(&token::generate()))
        .unwrap()
        .is_none());
    // a taken name, and the last admin credential
    assert_eq!(
        store
            .add_admin_credential("dash", Role::Admin, &token::hash(&token::generate()), &c)
            .unwrap(),
        Err(Refusal::CredentialExists)
    );
    assert_eq!(
        store.revoke_admin_credential("admin", &c).unwrap(),
        Err(Refusal::LastAdminCredential)
    );
    // revoking dash: its token authenticates nothing any more, its name stays taken
    store.revoke_admin_credential("dash", &c).unwrap().unwrap();
    assert!(store
        .admin_credential(&token::hash(&dash))
        .unwrap()
        .is_none());
    assert_eq!(
        store.revoke_admin_credential("dash", &c).unwrap(),
        Err(Refusal::CredentialUnknown)
    );
    let listed = store.admin_credentials().unwrap();
    assert_eq!(listed.len(), 2);
    assert!(listed[1].revoked_at_ms.is_some() && listed[0].revoked_at_ms.is_none());
    let rows: Vec<(String, String, String)> = store
        .audit_log(100, None)
        .unwrap()
        .into_iter()
        .filter(|a| a.action.starts_with("credential."))
        .map(|a| (a.action, a.outcome, a.actor))
        .collect();
    assert!(
        rows.iter().all(|(_, _, actor)| actor == "admin:admin"),
        "{rows:?}"
    );
    assert_eq!(
        rows.iter()
            .map(|(a, o, _)| format!("{a} {o}"))
            .collect::<Vec<_>>(),
        [
            "credential.create ok",
            "credential.create ok",
            "credential.create refused",
            "credential.revoke refused",
            "credential.revoke ok",
            "credential.revoke refused"
        ]
    );
}

/// Whenever a store answers `try_device_now`, it answers what `device` answers: the record of
/// an active device, the new state after a revocation, nothing for an unknown id.
/// Returns how many of the three lookups were answered at once.
pub fn try_device_now_agrees_with_device(store: &dyn Registry) -> usize {
    let ca = Ca::generate("localhost", now_ms()).unwrap();
    let tok = new_token(store, Some("quick"), 60_000);
    let id = enroll(store, &ca, &tok, None).unwrap();
    let nobody = DeviceId::parse("nobody").unwrap();
    let mut answered = 0;
    let mut check = |id: &DeviceId| {
        let slow = store.device(id).unwrap();
        if let Some(now) = store.try_device_now(id) {
            answered += 1;
            let now = now.unwrap();
            assert_eq!(
                now.as_ref()
                    .map(|r| (r.id.clone(), r.state, r.key_fingerprint.clone())),
                slow.as_ref()
                    .map(|r| (r.id.clone(), r.state, r.key_fingerprint.clone())),
            );
        }
        slow.map(|r| r.state)
    };
    assert_eq!(check(&id), Some(DeviceState::Active));
    store
        .set_state(&id, DeviceState::Revoked, &ctx())
        .unwrap()
        .unwrap();
    assert_eq!(check(&id), Some(DeviceState::Revoked));
    assert_eq!(check(&nobody), None);
    answered
}

/// `record_last_seen` moves `last_seen` forward only, skips unknown ids, and works for a
/// device revoked since it was seen (a batch never fails on one).
pub fn last_seen_only_moves_forward(store: &dyn Registry) {
    let ca = Ca::generate("localhost", now_ms()).unwrap();
    let a = enroll(store, &ca, &new_token(store, Some("seen-a"), 60_000), None).unwrap();
    let b = enroll(store, &ca, &new_token(store, Some("seen-b"), 60_000), None).unwrap();
    store
        .set_state(&b, DeviceState::Revoked, &ctx())
        .unwrap()
        .unwrap();
    let seen = |id: &DeviceId| store.device(id).unwrap().unwrap().last_seen_ms;
    let (a0, b0) = (seen(&a), seen(&b));
    let nobody = DeviceId::parse("seen-nobody").unwrap();
    store
        .record_last_seen(&[
            (a.clone(), a0 + 5_000),
            (b.clone(), b0 + 7_000),
            (nobody, 1),
        ])
        .unwrap();
    assert_eq!((seen(&a), seen(&b)), (a0 + 5_000, b0 + 7_000));
    store.record_last_seen(&[(a.clone(), a0 + 1_000)]).unwrap();
    assert_eq!(seen(&a), a0 + 5_000, "an older time changes nothing");
    assert_eq!(
        store.device(&b).unwrap().unwrap().state,
        DeviceState::Revoked
    );
}

/// The console's device table: filter, prefix search, sort both ways, paging with the total;
/// the reported backend is recorded as enrolment reported it; the fleet counts.
pub fn device_pages_filters_and_counts(store: &dyn Registry) {
    use devid_store::{DeviceQuery, DeviceSort};
    let ca = Ca::generate("localhost", now_ms()).unwrap();
    for i in 0..7 {
        let tok = new_token(store, None, 60_000);
        enroll(store, &ca, &tok, Some(&format!("page-{i}"))).unwrap();
    }
    let tok = new_token(store, None, 60_000);
    enroll(store, &ca, &tok, Some("other-1")).unwrap();
    let id = |s: &str| DeviceId::parse(s).unwrap();
    store
        .set_state(&id("page-3"), DeviceState::Suspended, &ctx())
        .unwrap()
        .unwrap();
    store
        .set_state(&id("page-5"), DeviceState::Revoked, &ctx())
        .unwrap()
        .unwrap();
    assert_eq!(
        store
            .device(&id("page-0"))
            .unwrap()
            .unwrap()
            .reported_backend
            .as_deref(),
        Some("tpm")
    );
    let ids = |q: &DeviceQuery| {
        let p = store.device_page(q).unwrap();
        (
            p.devices
                .iter()
                .map(|d| d.id.to_string())
                .collect::<Vec<_>>(),
            p.total,
        )
    };
    let q = DeviceQuery {
        id_prefix: Some("page-".into()),
        limit: 3,
        ..Default::default()
    };
    assert_eq!(
        ids(&q),
        (vec!["page-0".into(), "page-1".into(), "page-2".into()], 7)
    );
    let q2 = DeviceQuery {
        offset: 6,
        ..q.clone()
    };
    assert_eq!(ids(&q2), (vec!["page-6".into()], 7));
    let q3 = DeviceQuery {
        descending: true,
        ..q.clone()
    };
    assert_eq!(ids(&q3).0, vec!["page-6", "page-5", "page-4"]);
    let q4 = DeviceQuery {
        state: Some(DeviceState::Suspended),
        limit: 50,
        ..Default::default()
    };
    assert_eq!(ids(&q4), (vec!["page-3".into()], 1));
    let q5 = DeviceQuery {
        sort: DeviceSort::State,
        limit: 50,
        ..Default::default()
    };
    let (all, total) = ids(&q5);
    assert_eq!(total, 8);
    assert_eq!(
        all.last().unwrap(),
        "page-3",
        "suspended sorts after revoked: {all:?}"
    );
    let q6 = DeviceQuery {
        reported_backend: Some("pkcs11".into()),
        limit: 50,
        ..Default::default()
    };
    assert_eq!(ids(&q6).1, 0);
    // no assurance is recorded yet: every device is "none"
    let q7 = DeviceQuery {
        assurance: Some("none".into()),
        limit: 50,
        ..Default::default()
    };
    assert_eq!(ids(&q7).1, 8);
    let q8 = DeviceQuery {
        assurance: Some("ek-cert".into()),
        limit: 50,
        ..Default::default()
    };
    assert_eq!(ids(&q8).1, 0);
    // a prefix with LIKE metacharacters matches literally
    let q9 = DeviceQuery {
        id_prefix: Some("page_%".into()),
        limit: 50,
        ..Default::default()
    };
    assert_eq!(ids(&q9).1, 0);
    let now = now_ms();
    let c = store.fleet_counts(now, now + 2 * 3600 * 1000, 10).unwrap();
    let n = |s: DeviceState| c.by_state.iter().find(|(k, _)| *k == s).map(|(_, n)| *n);
    assert_eq!(n(DeviceState::Active), Some(6));
    assert_eq!(n(DeviceState::Suspended), Some(1));
    assert_eq!(n(DeviceState::Revoked), Some(1));
    assert_eq!(c.by_backend, vec![(Some("tpm".to_owned()), 8)]);
    // certificates of one hour (see `enroll`) expire in the window; not the revoked one
    assert_eq!(c.expiring_total, 7);
    assert!(c.expiring.iter().all(|d| d.id.as_str() != "page-5"));
    let later = store
        .fleet_counts(now + 3 * 3600 * 1000, now + 4 * 3600 * 1000, 10)
        .unwrap();
    assert_eq!(later.expiring_total, 0);
}
