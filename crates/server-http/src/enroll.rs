//! `POST /v1/enroll` (one-time token, CSR proof of possession) and `POST /v1/renew` (mutual
//! TLS with the device certificate, whose device id comes from the one identity rule).

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use devid_proto::{DeviceId, EnrollRequest, EnrollResponse, RenewRequest};

use devid_ca::IssuedCert;
use devid_server_config::AttestationMode;
use devid_server_config::KeyChange;
use devid_stdx::now_ms;
use devid_store::{
    token, Attestation, AuditCtx, ChallengeFor, EnrollAttempt, KeyChangePolicy, PresentedCert,
    RenewAttempt,
};

use crate::error::{refusal_error, ApiError};
use crate::request::{
    audit_refusal, blocking, check_csr, ip_of, parse_body, parse_device_id, source_of,
};
use crate::state::{HttpState, PeerInfo};

pub(crate) fn response(
    state: &HttpState,
    id: &DeviceId,
    cert: &IssuedCert,
    attestation: Option<&Attestation>,
) -> EnrollResponse {
    EnrollResponse {
        device_id: id.to_string(),
        certificate_chain: format!("{}{}", cert.cert_pem, state.ca.cert_pem()),
        mqtt_url: state.config.mqtt_url(),
        ca_pin: state.ca.pin(),
        assurance: attestation
            .map(|a| a.assurance.clone())
            .unwrap_or_else(|| "none".into()),
    }
}

pub(crate) async fn enroll(
    State(state): State<HttpState>,
    peer: Option<Extension<PeerInfo>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<EnrollResponse>, ApiError> {
    let ctx = AuditCtx {
        actor: "anonymous".into(),
        source: source_of(&peer),
        now_ms: now_ms(),
    };
    // before anything else, so a flood from one address costs no parsing and no database work
    if let Err(wait) = state.limits.enroll.check(&ip_of(&peer)) {
        audit_refusal(&state, ctx, "enroll", None, "rate_limited").await?;
        return Err(ApiError::rate_limited("enrolment", wait));
    }
    let checked = (|| {
        let req: EnrollRequest = parse_body(body)?;
        let requested = req.device_id.as_deref().map(parse_device_id).transpose()?;
        let csr = check_csr(&req.csr)?;
        if req.attestation.is_none() && state.attest.mode == AttestationMode::Required {
            return Err(crate::attest::required_error());
        }
        // a name outside the known set is kept as nothing (never echoed or logged)
        let backend = req
            .key_backend
            .as_deref()
            .and_then(|b| devid_store::REPORTED_BACKENDS.iter().find(|k| **k == b))
            .copied();
        Ok::<_, ApiError>((req.token, requested, csr, req.attestation, backend))
    })();
    let (token_text, requested, csr, evidence, backend) = match checked {
        Ok(v) => v,
        Err(e) => {
            tracing::info!(source = %ctx.source, code = e.code, "enrolment refused");
            audit_refusal(&state, ctx, "enroll", None, e.code).await?;
            return Err(e);
        }
    };
    // A string that cannot be a token is looked up as an impossible hash, so it is refused
    // and audited exactly like an unknown token.
    let token_hash = if token::well_formed(&token_text) {
        token::hash(&token_text)
    } else {
        "-".to_owned()
    };
    drop(token_text);
    let attestation = match &evidence {
        Some(ev) if state.attest.mode != AttestationMode::Off => {
            let bound = ChallengeFor::Token(token_hash.clone());
            match crate::attest::check_evidence(&state, ev, &bound, &csr, ctx.now_ms).await {
                Ok(a) => Some(a),
                Err(e) => {
                    tracing::info!(source = %ctx.source, code = e.code, "enrolment attestation refused");
                    audit_refusal(&state, ctx, "enroll", None, e.code).await?;
                    return Err(e);
                }
            }
        }
        _ => None,
    };
    let st = state.clone();
    let att = attestation.clone();
    let outcome = blocking(move || {
        let lifetime = st.config.device_cert_lifetime();
        let attempt = EnrollAttempt {
            token_hash: &token_hash,
            requested_id: requested.as_ref(),
            key_fingerprint: &csr.key_fingerprint,
            attestation: att.as_ref(),
            ctx: &ctx,
            reported_backend: backend,
        };
        let mut issue = |id: &DeviceId| {
            st.ca
                .issue_device(id, &csr.spki_der, lifetime, ctx.now_ms)
                .map_err(Into::into)
        };
        let source = ctx.source.clone();
        st.registry
            .enroll(&attempt, &mut issue)
            .map(|r| (r, source))
    })
    .await??;
    match outcome {
        (Ok((record, cert)), _) => {
            let assurance = attestation
                .as_ref()
                .map(|a| a.assurance.as_str())
                .unwrap_or("none");
            tracing::info!(device_id = %record.id, serial = %cert.serial_hex, assurance, "device enrolled");
            Ok(Json(response(
                &state,
                &record.id,
                &cert,
                attestation.as_ref(),
            )))
        }
        (Err(r), source) => {
            tracing::info!(%source, code = r.code(), "enrolment refused");
            Err(refusal_error(r))
        }
    }
}

/// `POST /v1/renew`. The device is the one the client certificate names (the one identity
/// rule); that certificate must be the device's current one, or its immediate predecessor
/// until the current one is first used (the registry decides, [`devid_store::tx::renew`]),
/// and unexpired now: a resumed TLS session skips the handshake's certificate checks, so the
/// validity is checked here too.
pub(crate) async fn renew(
    State(state): State<HttpState>,
    peer: Option<Extension<PeerInfo>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<EnrollResponse>, ApiError> {
    let source = source_of(&peer);
    if let Err(wait) = state.limits.renew.check(&ip_of(&peer)) {
        let ctx = AuditCtx {
            actor: "anonymous".into(),
            source,
            now_ms: now_ms(),
        };
        audit_refusal(&state, ctx, "renew", None, "rate_limited").await?;
        return Err(ApiError::rate_limited("renewal", wait));
    }
    let chain = peer.as_ref().and_then(|p| p.client_chain.clone());
    let identity = chain
        .as_ref()
        .and_then(|c| c.first())
        .and_then(|der| devid_tls::identity::identity_of(der).ok());
    let id = identity.as_ref().and_then(|i| i.device.clone().ok());
    let ctx = AuditCtx {
        actor: match &id {
            Some(id) => format!("device:{id}"),
            None => "anonymous".into(),
        },
        source,
        now_ms: now_ms(),
    };
    let checked = (|| {
        let (id, identity) =
            match (&chain, &id, &identity) {
                (None, _, _) => return Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "client_cert_required",
                    "renewal needs mutual TLS with the device certificate issued by this fleet CA",
                )),
                (Some(_), Some(id), Some(identity)) => (id.clone(), identity.clone()),
                (Some(_), _, _) => {
                    return Err(ApiError::new(
                        StatusCode::FORBIDDEN,
                        "client_cert_not_device",
                        "the client certificate names no single urn:devid: identity",
                    ))
                }
            };
        if identity.not_after_ms <= ctx.now_ms {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "client_cert_expired",
                "the client certificate has expired; the device must enrol again with a new token",
            ));
        }
        let req: RenewRequest = parse_body(body)?;
        let csr = check_csr(&req.csr)?;
        Ok((id, identity, csr, req.attestation))
    })();
    let (id, identity, csr, evidence) = match checked {
        Ok(v) => v,
        Err(e) => {
            tracing::info!(source = %ctx.source, code = e.code, "renewal refused");
            let dev = id.map(|d| d.to_string());
            audit_refusal(&state, ctx, "renew", dev, e.code).await?;
            return Err(e);
        }
    };
    let attestation = match &evidence {
        Some(ev) if state.attest.mode != AttestationMode::Off => {
            let bound = ChallengeFor::Device(id.clone());
            match crate::attest::check_evidence(&state, ev, &bound, &csr, ctx.now_ms).await {
                Ok(a) => Some(a),
                Err(e) => {
                    tracing::info!(source = %ctx.source, code = e.code, "renewal attestation refused");
                    audit_refusal(&state, ctx, "renew", Some(id.to_string()), e.code).await?;
                    return Err(e);
                }
            }
        }
        _ => None,
    };
    let st = state.clone();
    let att = attestation.clone();
    let outcome = blocking(move || {
        let lifetime = st.config.device_cert_lifetime();
        let mut issue = |d: &DeviceId| {
            st.ca
                .issue_device(d, &csr.spki_der, lifetime, ctx.now_ms)
                .map_err(Into::into)
        };
        let presented = PresentedCert {
            serial_hex: identity.serial_hex,
            key_fingerprint: identity.key_fingerprint,
        };
        let attempt = RenewAttempt {
            id: &id,
            presented: &presented,
            key_fingerprint: &csr.key_fingerprint,
            key_change: match st.config.renewal.key_change {
                KeyChange::Allowed => KeyChangePolicy::Allowed,
                KeyChange::Attested => KeyChangePolicy::Attested,
                KeyChange::Refused => KeyChangePolicy::Refused,
            },
            attestation: att.as_ref(),
            ctx: &ctx,
        };
        st.registry.renew(&attempt, &mut issue)
    })
    .await??;
    match outcome {
        Ok((record, cert)) => {
            tracing::info!(device_id = %record.id, serial = %cert.serial_hex, attested = attestation.is_some(), "certificate renewed");
            // the registered attestation, also when this renewal brought none
            let store = state.registry.clone();
            let rid = record.id.clone();
            let registered = match attestation {
                Some(a) => Some(a),
                None => blocking(move || store.attestation(&rid)).await??,
            };
            Ok(Json(response(
                &state,
                &record.id,
                &cert,
                registered.as_ref(),
            )))
        }
        Err(r) => {
            tracing::info!(code = r.code(), "renewal refused");
            Err(refusal_error(r))
        }
    }
}
