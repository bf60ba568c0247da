//! The registry's decisions and audit wording, the same for every backend. A store reads the
//! rows inside its own transaction (with its own locking), asks these functions what to do,
//! and writes what they say: the two backends cannot drift apart on who gets refused, in which
//! order, or what the audit row says.

use devid_proto::{DeviceId, DeviceState};

use devid_stdx::rfc3339;

use crate::{
    Attestation, CertStanding, DeviceRecord, IssuedCert, KeyChangePolicy, NewToken, PresentedCert,
    Refusal, StoreError,
};

/// An enrolment token's row, as read (and, where the backend needs it, locked).
#[derive(Debug, Clone)]
pub struct TokenRow {
    /// The device id the token is bound to.
    pub bound: Option<String>,
    /// Policy for the device that uses it.
    pub policy: String,
    /// Expiry, ms since the epoch.
    pub expires_at_ms: i64,
    /// Whether it was used already.
    pub used: bool,
    /// The device must attest its key.
    pub attestation_required: bool,
    /// The endorsement key (hex SHA-256 of its SPKI) the device must attest with.
    pub ek_fingerprint: Option<String>,
}

/// What a valid token lets the enrolment do.
#[derive(Debug, Clone)]
pub(crate) struct TokenUse {
    /// The device id to enrol: the token's binding, else the requested one, else a new UUID.
    pub id: DeviceId,
    /// Its policy.
    pub policy: String,
    /// Whether the token names the device (only such a token may re-enrol an active device).
    pub bound: bool,
    /// The device must attest its key.
    pub attestation_required: bool,
    /// The EK the device must attest with.
    pub ek_fingerprint: Option<String>,
}

/// A refusal and the device id its audit row names.
pub(crate) type Refused = (Refusal, Option<String>);

/// Check the token presented with an enrolment asking for `requested` at `now_ms`. Refusals
/// in this order: unknown, used, expired, bound to another id.
pub(crate) fn check_token(
    token: Option<TokenRow>,
    requested: Option<&DeviceId>,
    now_ms: i64,
) -> Result<Result<TokenUse, Refused>, StoreError> {
    let requested_str = || requested.map(|r| r.as_str().to_owned());
    let Some(t) = token else {
        return Ok(Err((Refusal::TokenUnknown, requested_str())));
    };
    if t.used || t.expires_at_ms <= now_ms {
        let why = if t.used {
            Refusal::TokenUsed
        } else {
            Refusal::TokenExpired
        };
        return Ok(Err((why, t.bound.or_else(requested_str))));
    }
    let id = match (t.bound.as_deref(), requested) {
        (Some(b), Some(r)) if b != r.as_str() => {
            return Ok(Err((Refusal::TokenBoundToOther, t.bound)));
        }
        (Some(b), _) => DeviceId::parse(b).map_err(|e| StoreError::Corrupt {
            what: "token device id",
            detail: e.to_string(),
        })?,
        (None, Some(r)) => r.clone(),
        (None, None) => {
            DeviceId::parse(&uuid::Uuid::new_v4().to_string()).map_err(|e| StoreError::Corrupt {
                what: "generated device id",
                detail: e.to_string(),
            })?
        }
    };
    Ok(Ok(TokenUse {
        id,
        policy: t.policy,
        bound: t.bound.is_some(),
        attestation_required: t.attestation_required,
        ek_fingerprint: t.ek_fingerprint,
    }))
}

/// Whether a device in `existing` state may be enrolled with a token (`bound`: the token
/// names it). A revoked or suspended device may not; an active one only with a token bound
/// to it (re-enrolment).
pub(crate) fn enroll_refusal(existing: Option<DeviceState>, bound: bool) -> Option<Refusal> {
    match existing {
        Some(DeviceState::Revoked) => Some(Refusal::DeviceRevoked),
        Some(DeviceState::Suspended) => Some(Refusal::DeviceSuspended),
        Some(DeviceState::Active) if !bound => Some(Refusal::DeviceExists),
        _ => None,
    }
}

/// Whether a device in `state` may renew its certificate: only an active one.
pub(crate) fn renew_refusal(state: Option<DeviceState>) -> Option<Refusal> {
    match state {
        None => Some(Refusal::DeviceUnknown),
        Some(DeviceState::Revoked) => Some(Refusal::DeviceRevoked),
        Some(DeviceState::Suspended) => Some(Refusal::DeviceSuspended),
        Some(DeviceState::Active) => None,
    }
}

/// Which certificate of the device a renewal presents, as far as the registry knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Presented {
    /// The current certificate (its first use, if a predecessor is still kept).
    Current,
    /// The immediate predecessor, while the current one was never used (a lost answer).
    Predecessor,
}

/// Check the presented certificate against the device's row: only its current certificate,
/// or its kept predecessor, may renew ([`DeviceRecord::certificate_standing`]).
pub(crate) fn presented_cert(d: &DeviceRecord, p: &PresentedCert) -> Result<Presented, Refusal> {
    match d.certificate_standing(&p.serial_hex, &p.key_fingerprint) {
        CertStanding::Current => Ok(Presented::Current),
        CertStanding::Predecessor => Ok(Presented::Predecessor),
        CertStanding::Superseded => Err(Refusal::CertSuperseded),
    }
}

/// Whether a renewal from a certificate for `presented_key` to a CSR for `new_key` may go
/// ahead under `policy`; `attested`: the new key comes with a verified attestation.
pub(crate) fn key_change_refusal(
    presented_key: &str,
    new_key: &str,
    policy: KeyChangePolicy,
    attested: bool,
) -> Option<Refusal> {
    if presented_key == new_key {
        return None;
    }
    match policy {
        KeyChangePolicy::Allowed => None,
        KeyChangePolicy::Attested if attested => None,
        KeyChangePolicy::Attested | KeyChangePolicy::Refused => Some(Refusal::KeyChangeRefused),
    }
}

/// The attestation rules of an enrolment: a required attestation must be there, the token's
/// EK must be the attested one, an attested device stays attested and on its EK, and one EK
/// is one device (`ek_owner`: the device the presented EK is registered to).
pub(crate) fn enroll_attestation_refusal(
    id: &DeviceId,
    token: &TokenUse,
    registered: Option<&Attestation>,
    presented: Option<&Attestation>,
    ek_owner: Option<&str>,
) -> Option<Refusal> {
    if token.attestation_required && presented.is_none() {
        return Some(Refusal::AttestationRequired);
    }
    if let Some(want) = &token.ek_fingerprint {
        if presented.map(|p| &p.ek_fingerprint) != Some(want) {
            return Some(Refusal::EkNotAllowed);
        }
    }
    match (registered, presented) {
        (Some(_), None) => return Some(Refusal::AttestationDowngrade),
        (Some(r), Some(p)) if r.ek_fingerprint != p.ek_fingerprint => {
            return Some(Refusal::EkChanged)
        }
        _ => {}
    }
    match ek_owner {
        Some(owner) if presented.is_some() && owner != id.as_str() => {
            Some(Refusal::EkRegisteredElsewhere)
        }
        _ => None,
    }
}

/// The attestation rules of a renewal: an attested device never moves to an unattested key,
/// and renews only with its registered EK and AK; an unattested device may become attested
/// with an EK no other device has.
pub(crate) fn renew_attestation_refusal(
    id: &DeviceId,
    key_changed: bool,
    registered: Option<&Attestation>,
    presented: Option<&Attestation>,
    ek_owner: Option<&str>,
) -> Option<Refusal> {
    match (registered, presented) {
        (Some(_), None) if key_changed => Some(Refusal::AttestationDowngrade),
        (Some(_), None) => None,
        (Some(r), Some(p)) if r.ek_fingerprint != p.ek_fingerprint => Some(Refusal::EkChanged),
        (Some(r), Some(p)) if r.ak_public != p.ak_public => Some(Refusal::AkChanged),
        (Some(_), Some(_)) => None,
        (None, Some(_)) => match ek_owner {
            Some(owner) if owner != id.as_str() => Some(Refusal::EkRegisteredElsewhere),
            _ => None,
        },
        (None, None) => None,
    }
}

/// The audit detail's attestation part: ` assurance=ek-cert ek=<first 16 hex>` or
/// ` assurance=none`.
pub(crate) fn assurance_detail(a: Option<&Attestation>) -> String {
    match a {
        Some(a) => format!(
            " assurance={} ek={}",
            a.assurance,
            a.ek_fingerprint.get(..16).unwrap_or(&a.ek_fingerprint)
        ),
        None => " assurance=none".to_owned(),
    }
}

/// The audit action of a move to `target`.
pub fn state_action(target: DeviceState) -> &'static str {
    match target {
        DeviceState::Active => "device.resume",
        DeviceState::Suspended => "device.suspend",
        DeviceState::Revoked => "device.revoke",
    }
}

/// Whether a device in `current` state may move to `target`: revocation is permanent.
/// Returns the current state.
pub(crate) fn state_change(
    current: Option<DeviceState>,
    target: DeviceState,
) -> Result<DeviceState, Refusal> {
    match current {
        None => Err(Refusal::DeviceUnknown),
        Some(DeviceState::Revoked) if target != DeviceState::Revoked => Err(Refusal::DeviceRevoked),
        Some(c) => Ok(c),
    }
}

/// Audit detail of a created token (never the token).
pub(crate) fn token_detail(token: &NewToken) -> String {
    let mut d = format!(
        "policy={} expires={}",
        token.policy,
        rfc3339(token.expires_at_ms)
    );
    if token.attestation_required {
        d.push_str(" attestation=required");
    }
    if let Some(ek) = &token.ek_fingerprint {
        d.push_str(&format!(" ek={}", ek.get(..16).unwrap_or(ek)));
    }
    d
}

/// Audit detail of an enrolment.
pub(crate) fn enroll_detail(
    cert: &IssuedCert,
    policy: &str,
    key_fingerprint: &str,
    attestation: Option<&Attestation>,
    re_enrolment: bool,
) -> String {
    format!(
        "serial={} policy={policy} key={key_fingerprint}{}{}",
        cert.serial_hex,
        assurance_detail(attestation),
        if re_enrolment { " re-enrolment" } else { "" }
    )
}

/// Audit detail of a renewal.
pub(crate) fn renew_detail(
    cert: &IssuedCert,
    key_fingerprint: &str,
    key_changed: bool,
    presented: Presented,
) -> String {
    format!(
        "serial={} key={key_fingerprint}{}{}",
        cert.serial_hex,
        if key_changed { " key-change" } else { "" },
        if presented == Presented::Predecessor {
            " retry-with-predecessor"
        } else {
            ""
        }
    )
}

/// Audit detail of a state change.
pub(crate) fn state_detail(current: DeviceState, target: DeviceState) -> String {
    format!("{current} -> {target}")
}

/// The device row read back after writing it is missing.
pub(crate) fn row_missing(after: &str) -> StoreError {
    StoreError::Corrupt {
        what: "device",
        detail: format!("row missing right after {after}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(bound: Option<&str>, used: bool, expires_at_ms: i64) -> Option<TokenRow> {
        Some(TokenRow {
            bound: bound.map(str::to_owned),
            policy: "default".into(),
            expires_at_ms,
            used,
            attestation_required: false,
            ek_fingerprint: None,
        })
    }

    fn att(ek: &str, ak: &str) -> Attestation {
        Attestation {
            assurance: "ek-cert".into(),
            ek_fingerprint: ek.into(),
            ek_manufacturer: None,
            ek_model: None,
            ak_public: ak.into(),
        }
    }

    fn token_use(required: bool, ek: Option<&str>) -> TokenUse {
        TokenUse {
            id: id("d1"),
            policy: "default".into(),
            bound: true,
            attestation_required: required,
            ek_fingerprint: ek.map(str::to_owned),
        }
    }

    #[test]
    fn attestation_rules_of_enrolment() {
        let d = id("d1");
        let a = att("ek1", "ak1");
        let f = enroll_attestation_refusal;
        assert_eq!(f(&d, &token_use(false, None), None, None, None), None);
        assert_eq!(
            f(&d, &token_use(true, None), None, None, None),
            Some(Refusal::AttestationRequired)
        );
        assert_eq!(f(&d, &token_use(true, None), None, Some(&a), None), None);
        assert_eq!(
            f(&d, &token_use(false, Some("ek2")), None, Some(&a), None),
            Some(Refusal::EkNotAllowed)
        );
        assert_eq!(
            f(&d, &token_use(false, Some("ek1")), None, Some(&a), None),
            None
        );
        // an attested device stays attested and on its EK (a new AK after a TPM clear is fine)
        assert_eq!(
            f(&d, &token_use(false, None), Some(&a), None, Some("d1")),
            Some(Refusal::AttestationDowngrade)
        );
        assert_eq!(
            f(
                &d,
                &token_use(false, None),
                Some(&a),
                Some(&att("ek2", "ak1")),
                None
            ),
            Some(Refusal::EkChanged)
        );
        assert_eq!(
            f(
                &d,
                &token_use(false, None),
                Some(&a),
                Some(&att("ek1", "ak9")),
                Some("d1")
            ),
            None
        );
        // one EK is one device
        assert_eq!(
            f(&d, &token_use(false, None), None, Some(&a), Some("d2")),
            Some(Refusal::EkRegisteredElsewhere)
        );
    }

    #[test]
    fn attestation_rules_of_renewal() {
        let d = id("d1");
        let a = att("ek1", "ak1");
        let f = renew_attestation_refusal;
        assert_eq!(
            f(&d, false, Some(&a), None, None),
            None,
            "same key, no evidence"
        );
        assert_eq!(
            f(&d, true, Some(&a), None, None),
            Some(Refusal::AttestationDowngrade),
            "an attested device never moves to an unattested key"
        );
        assert_eq!(f(&d, true, Some(&a), Some(&a), Some("d1")), None);
        assert_eq!(
            f(&d, true, Some(&a), Some(&att("ek1", "ak2")), Some("d1")),
            Some(Refusal::AkChanged)
        );
        assert_eq!(
            f(&d, true, Some(&a), Some(&att("ek2", "ak1")), None),
            Some(Refusal::EkChanged)
        );
        // an unattested device becomes attested, unless the EK is another device's
        assert_eq!(f(&d, true, None, Some(&a), None), None);
        assert_eq!(
            f(&d, true, None, Some(&a), Some("d2")),
            Some(Refusal::EkRegisteredElsewhere)
        );
        assert_eq!(f(&d, true, None, None, None), None);
        assert_eq!(
            key_change_refusal("k1", "k2", KeyChangePolicy::Attested, false),
            Some(Refusal::KeyChangeRefused)
        );
        assert_eq!(
            key_change_refusal("k1", "k2", KeyChangePolicy::Attested, true),
            None
        );
    }

    fn id(s: &str) -> DeviceId {
        DeviceId::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn refused(r: Result<Result<TokenUse, Refused>, StoreError>) -> Refused {
        match r {
            Ok(Err(why)) => why,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn token_refusals_come_in_order_and_name_the_right_device() {
        let me = id("pump-1");
        let now = 1_000;
        assert_eq!(
            refused(check_token(None, Some(&me), now)),
            (Refusal::TokenUnknown, Some("pump-1".into()))
        );
        // used beats expired; the audit row names the bound id over the requested one
        assert_eq!(
            refused(check_token(token(Some("pump-2"), true, 0), Some(&me), now)),
            (Refusal::TokenUsed, Some("pump-2".into()))
        );
        assert_eq!(
            refused(check_token(token(None, false, now), Some(&me), now)),
            (Refusal::TokenExpired, Some("pump-1".into()))
        );
        assert_eq!(
            refused(check_token(
                token(Some("pump-2"), false, now + 1),
                Some(&me),
                now
            )),
            (Refusal::TokenBoundToOther, Some("pump-2".into()))
        );
    }

    #[test]
    fn a_valid_token_chooses_the_device_id() {
        let now = 1_000;
        let bound = match check_token(token(Some("pump-2"), false, now + 1), None, now) {
            Ok(Ok(u)) => u,
            other => panic!("{other:?}"),
        };
        assert_eq!((bound.id.as_str(), bound.bound), ("pump-2", true));
        let asked = match check_token(token(None, false, now + 1), Some(&id("pump-3")), now) {
            Ok(Ok(u)) => u,
            other => panic!("{other:?}"),
        };
        assert_eq!((asked.id.as_str(), asked.bound), ("pump-3", false));
        let fresh = match check_token(token(None, false, now + 1), None, now) {
            Ok(Ok(u)) => u,
            other => panic!("{other:?}"),
        };
        assert!(
            uuid::Uuid::parse_str(fresh.id.as_str()).is_ok(),
            "{:?}",
            fresh.id
        );
    }

    #[test]
    fn state_rules() {
        use DeviceState::*;
        assert_eq!(enroll_refusal(None, false), None);
        assert_eq!(enroll_refusal(Some(Active), true), None);
        assert_eq!(
            enroll_refusal(Some(Active), false),
            Some(Refusal::DeviceExists)
        );
        assert_eq!(
            enroll_refusal(Some(Suspended), true),
            Some(Refusal::DeviceSuspended)
        );
        assert_eq!(
            enroll_refusal(Some(Revoked), true),
            Some(Refusal::DeviceRevoked)
        );
        assert_eq!(renew_refusal(Some(Active)), None);
        assert_eq!(renew_refusal(None), Some(Refusal::DeviceUnknown));
        assert_eq!(
            renew_refusal(Some(Suspended)),
            Some(Refusal::DeviceSuspended)
        );
        assert_eq!(state_change(Some(Revoked), Revoked), Ok(Revoked));
        assert_eq!(
            state_change(Some(Revoked), Active),
            Err(Refusal::DeviceRevoked)
        );
        assert_eq!(state_change(Some(Suspended), Active), Ok(Suspended));
        assert_eq!(state_change(None, Suspended), Err(Refusal::DeviceUnknown));
    }
}
