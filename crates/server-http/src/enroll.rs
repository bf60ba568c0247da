//! `POST /v1/enroll` (one-time token, CSR proof of possession) and `POST /v1/renew` (mutual
//! TLS with the device certificate, whose device id comes from the one identity rule).

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use devid_proto::{DeviceId, EnrollRequest, EnrollResponse, RenewRequest};

use devid_ca::IssuedCert;
use devid_stdx::now_ms;
use devid_store::{token, AuditCtx, EnrollAttempt};

use crate::error::{refusal_error, ApiError};
use crate::request::{audit_refusal, blocking, check_csr, parse_body, parse_device_id, source_of};
use crate::state::{HttpState, PeerInfo};

pub(crate) fn response(state: &HttpState, id: &DeviceId, cert: &IssuedCert) -> EnrollResponse {
    EnrollResponse {
        device_id: id.to_string(),
        certificate_chain: format!("{}{}", cert.cert_pem, state.ca.cert_pem()),
        mqtt_url: state.config.mqtt_url(),
        ca_pin: state.ca.pin(),
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
    let checked = (|| {
        let req: EnrollRequest = parse_body(body)?;
        let requested = req.device_id.as_deref().map(parse_device_id).transpose()?;
        let csr = check_csr(&req.csr)?;
        Ok::<_, ApiError>((req.token, requested, csr))
    })();
    let (token_text, requested, csr) = match checked {
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
    let st = state.clone();
    let outcome = blocking(move || {
        let lifetime = st.config.device_cert_lifetime();
        let attempt = EnrollAttempt {
            token_hash: &token_hash,
            requested_id: requested.as_ref(),
            key_fingerprint: &csr.key_fingerprint,
            ctx: &ctx,
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
            tracing::info!(device_id = %record.id, serial = %cert.serial_hex, "device enrolled");
            Ok(Json(response(&state, &record.id, &cert)))
        }
        (Err(r), source) => {
            tracing::info!(%source, code = r.code(), "enrolment refused");
            Err(refusal_error(r))
        }
    }
}

pub(crate) async fn renew(
    State(state): State<HttpState>,
    peer: Option<Extension<PeerInfo>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<EnrollResponse>, ApiError> {
    let source = source_of(&peer);
    let chain = peer.as_ref().and_then(|p| p.client_chain.clone());
    let id = chain
        .as_ref()
        .and_then(|c| c.first())
        .and_then(|der| devid_tls::identity::device_of(der).ok());
    let ctx = AuditCtx {
        actor: match &id {
            Some(id) => format!("device:{id}"),
            None => "anonymous".into(),
        },
        source,
        now_ms: now_ms(),
    };
    let checked = (|| {
        let id =
            match (&chain, &id) {
                (None, _) => return Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "client_cert_required",
                    "renewal needs mutual TLS with the device certificate issued by this fleet CA",
                )),
                (Some(_), None) => {
                    return Err(ApiError::new(
                        StatusCode::FORBIDDEN,
                        "client_cert_not_device",
                        "the client certificate names no single urn:devid: identity",
                    ))
                }
                (Some(_), Some(id)) => id.clone(),
            };
        let req: RenewRequest = parse_body(body)?;
        let csr = check_csr(&req.csr)?;
        Ok((id, csr))
    })();
    let (id, csr) = match checked {
        Ok(v) => v,
        Err(e) => {
            tracing::info!(source = %ctx.source, code = e.code, "renewal refused");
            let dev = id.map(|d| d.to_string());
            audit_refusal(&state, ctx, "renew", dev, e.code).await?;
            return Err(e);
        }
    };
    let st = state.clone();
    let outcome = blocking(move || {
        let lifetime = st.config.device_cert_lifetime();
        let mut issue = |d: &DeviceId| {
            st.ca
                .issue_device(d, &csr.spki_der, lifetime, ctx.now_ms)
                .map_err(Into::into)
        };
        st.registry
            .renew(&id, &csr.key_fingerprint, &ctx, &mut issue)
    })
    .await??;
    match outcome {
        Ok((record, cert)) => {
            tracing::info!(device_id = %record.id, serial = %cert.serial_hex, "certificate renewed");
            Ok(Json(response(&state, &record.id, &cert)))
        }
        Err(r) => {
            tracing::info!(code = r.code(), "renewal refused");
            Err(refusal_error(r))
        }
    }
}
