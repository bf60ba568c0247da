//! The registry's decisions and audit wording, the same for every backend. A store reads the
//! rows inside its own transaction (with its own locking), asks these functions what to do,
//! and writes what they say: the two backends cannot drift apart on who gets refused, in which
//! order, or what the audit row says.

use devid_proto::{DeviceId, DeviceState};

use devid_stdx::rfc3339;

use crate::{
    CertStanding, DeviceRecord, IssuedCert, KeyChangePolicy, NewToken, PresentedCert, Refusal,
    StoreError,
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
/// ahead under `policy`. Attestation keys do not exist yet, so `Attested` refuses every change.
pub(crate) fn key_change_refusal(
    presented_key: &str,
    new_key: &str,
    policy: KeyChangePolicy,
) -> Option<Refusal> {
    if presented_key == new_key {
        return None;
    }
    match policy {
        KeyChangePolicy::Allowed => None,
        KeyChangePolicy::Attested | KeyChangePolicy::Refused => Some(Refusal::KeyChangeRefused),
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
    format!(
        "policy={} expires={}",
        token.policy,
        rfc3339(token.expires_at_ms)
    )
}

/// Audit detail of an enrolment.
pub(crate) fn enroll_detail(
    cert: &IssuedCert,
    policy: &str,
    key_fingerprint: &str,
    re_enrolment: bool,
) -> String {
    format!(
        "serial={} policy={policy} key={key_fingerprint}{}",
        cert.serial_hex,
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
        })
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
