//! TPM key attestation, the server's side (docs/attestation.md): the challenge step
//! (`POST /v1/attest/start`, `POST /v1/renew/attest/start`) and the check of the answer that
//! comes with the CSR. Every byte from the client is parsed by `devid-attest` (pure Rust,
//! strict); this module decides the order and the policy:
//!
//! 1. the token (enrolment; checked, not consumed) or the device certificate (renewal);
//! 2. the EK certificate chains to a configured root (`ek-cert`), or its key is the one the
//!    token names (`ek-allowlist`); else `ek_untrusted`;
//! 3. the AK has the attributes of a restricted TPM signing key; the credential is made to the
//!    EK's key with the standard template's parameters (never the client's);
//! 4. at the second step: the challenge exists (single use), is not expired, belongs to this
//!    token or device; the activation proof matches; the Certify is the AK's, over qualifying
//!    data binding challenge, secret and CSR, of a key born in the TPM that is the CSR's key.
//!
//! Each refusal has its own code and an audit row (aggregated per source like the other
//! refusals found before the registry).

use std::time::SystemTime;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use base64::Engine as _;
use devid_attest::ek::{EkAlg, EkCert};

pub use crate::attest_policy::AttestPolicy;
use devid_attest::verify::{check_ak, verify_certify};
use devid_attest::AttestError;
use devid_ca::csr::VerifiedCsr;
use devid_proto::{attest_binding, AttestChallenge, AttestStartRequest, AttestationEvidence};
use devid_server_config::AttestationMode;
use devid_stdx::now_ms;
use devid_store::{token, Attestation, AuditCtx, Challenge, ChallengeFor};
use zeroize::Zeroizing;

use crate::error::{refusal_error, ApiError};
use crate::request::{audit_refusal, blocking, ip_of, parse_body, source_of};
use crate::state::{HttpState, PeerInfo};

/// How long a challenge can be answered.
pub const CHALLENGE_TTL_MS: i64 = 5 * 60 * 1000;

fn refused(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, code, message)
}

fn from_attest(e: AttestError) -> ApiError {
    let status = match e {
        AttestError::MalformedTpmStructure { .. } | AttestError::EkCertInvalid(_) => {
            StatusCode::BAD_REQUEST
        }
        _ => StatusCode::FORBIDDEN,
    };
    ApiError::new(status, e.code(), e.to_string())
}

fn b64(field: &'static str, s: &str) -> Result<Vec<u8>, ApiError> {
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_base64",
                format!("{field} is not standard base64"),
            )
        })
}

/// What a start request proves before any challenge is made: the EK is trusted (or named by
/// the token) and the AK is a restricted TPM key. Pure: no I/O.
fn check_identity(
    policy: &AttestPolicy,
    req: &AttestStartRequest,
    allowed_ek: Option<&str>,
) -> Result<(EkCert, devid_attest::verify::AkKey, &'static str), ApiError> {
    let alg: EkAlg = req.ek_alg.parse().map_err(from_attest)?;
    let ek = EkCert::parse(&b64("ek_cert", &req.ek_cert)?).map_err(from_attest)?;
    if ek.public.alg != alg {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "ek_alg_mismatch",
            format!(
                "ek_alg is {alg} but the certificate holds a {} key",
                ek.public.alg
            ),
        ));
    }
    if req.ek_chain.len() > 8 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "ek_chain_too_long",
            "at most 8 chain certificates",
        ));
    }
    let chain = req
        .ek_chain
        .iter()
        .map(|c| b64("ek_chain", c))
        .collect::<Result<Vec<_>, _>>()?;
    let assurance = match policy.roots.verify(&ek, &chain, SystemTime::now()) {
        Ok(_) => "ek-cert",
        Err(e) => match allowed_ek {
            Some(fp) if fp.eq_ignore_ascii_case(&ek.fingerprint) => "ek-allowlist",
            Some(_) => {
                return Err(refused(
                    "ek_not_allowed",
                    "the enrolment token is for another TPM (endorsement key fingerprint)",
                ))
            }
            None => return Err(from_attest(e)),
        },
    };
    let ak = check_ak(&b64("ak_public", &req.ak_public)?).map_err(from_attest)?;
    Ok((ek, ak, assurance))
}

/// Make the challenge for a checked identity.
fn make_challenge(
    ek: &EkCert,
    ak: &devid_attest::verify::AkKey,
    assurance: &str,
    bound: ChallengeFor,
    now: i64,
) -> Result<(Challenge, AttestChallenge), ApiError> {
    use rand_core::{OsRng, RngCore};
    let mut secret = Zeroizing::new(vec![0u8; 32]);
    OsRng.fill_bytes(&mut secret);
    let mut id = [0u8; 16];
    OsRng.fill_bytes(&mut id);
    let id = hex::encode(id);
    let cred =
        devid_attest::credential::make_credential(&ek.public, ak.name(), &secret, &mut OsRng)
            .map_err(from_attest)?;
    let b = base64::engine::general_purpose::STANDARD;
    let answer = AttestChallenge {
        challenge_id: id.clone(),
        credential_blob: b.encode(&cred.id_object),
        encrypted_secret: b.encode(&cred.encrypted_secret),
        expires_in_secs: (CHALLENGE_TTL_MS / 1000) as u64,
    };
    let challenge = Challenge {
        id,
        bound,
        attestation: Attestation {
            assurance: assurance.to_owned(),
            ek_fingerprint: ek.fingerprint.clone(),
            ek_manufacturer: ek.manufacturer.clone(),
            ek_model: ek.model.clone(),
            ak_public: hex::encode(ak.public_raw()),
        },
        secret,
        expires_at_ms: now + CHALLENGE_TTL_MS,
    };
    Ok((challenge, answer))
}

fn attestation_off() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "attestation_off",
        "this server does not attest keys (attestation.mode = \"off\"); enrol without attestation",
    )
}

/// `POST /v1/attest/start`: the token is checked, not consumed.
pub(crate) async fn start(
    State(state): State<HttpState>,
    peer: Option<Extension<PeerInfo>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<AttestChallenge>, ApiError> {
    let ctx = AuditCtx {
        actor: "anonymous".into(),
        source: source_of(&peer),
        now_ms: now_ms(),
    };
    // the enrolment limiter: a challenge costs an RSA or ECDH operation
    if let Err(wait) = state.limits.enroll.check(&ip_of(&peer)) {
        audit_refusal(&state, ctx, "attest.start", None, "rate_limited").await?;
        return Err(ApiError::rate_limited("enrolment", wait));
    }
    let result = start_checked(&state, &ctx, body).await;
    match result {
        Ok(c) => Ok(Json(c)),
        Err((e, device)) => {
            tracing::info!(source = %ctx.source, code = e.code, "attestation challenge refused");
            audit_refusal(&state, ctx, "attest.start", device, e.code).await?;
            Err(e)
        }
    }
}

async fn start_checked(
    state: &HttpState,
    ctx: &AuditCtx,
    body: Result<Bytes, BytesRejection>,
) -> Result<AttestChallenge, (ApiError, Option<String>)> {
    let policy = state.attest.clone();
    if policy.mode == AttestationMode::Off {
        return Err((attestation_off(), None));
    }
    let mut req: AttestStartRequest = parse_body(body).map_err(|e| (e, None))?;
    let token_text = Zeroizing::new(req.token.take().unwrap_or_default());
    if !token::well_formed(&token_text) {
        return Err((refusal_error(devid_store::Refusal::TokenUnknown), None));
    }
    let hash = token::hash(&token_text);
    drop(token_text);
    let store = state.registry.clone();
    let h = hash.clone();
    let row = blocking(move || store.token(&h))
        .await
        .map_err(|e| (e, None))?
        .map_err(|e| (ApiError::from(e), None))?;
    let row = match row {
        None => return Err((refusal_error(devid_store::Refusal::TokenUnknown), None)),
        Some(r) if r.used => return Err((refusal_error(devid_store::Refusal::TokenUsed), r.bound)),
        Some(r) if r.expires_at_ms <= ctx.now_ms => {
            return Err((refusal_error(devid_store::Refusal::TokenExpired), r.bound))
        }
        Some(r) => r,
    };
    let bound = row.bound.clone();
    let (ek, ak, assurance) = check_identity(&policy, &req, row.ek_fingerprint.as_deref())
        .map_err(|e| (e, bound.clone()))?;
    let (challenge, answer) =
        make_challenge(&ek, &ak, assurance, ChallengeFor::Token(hash), ctx.now_ms)
            .map_err(|e| (e, bound.clone()))?;
    let store = state.registry.clone();
    let now = ctx.now_ms;
    blocking(move || store.put_challenge(&challenge, now))
        .await
        .map_err(|e| (e, bound.clone()))?
        .map_err(|e| (ApiError::from(e), bound.clone()))?;
    tracing::info!(assurance, ek = %&ek.fingerprint[..16], "attestation challenge issued");
    Ok(answer)
}

/// `POST /v1/renew/attest/start`: for the device the client certificate names.
pub(crate) async fn renew_start(
    State(state): State<HttpState>,
    peer: Option<Extension<PeerInfo>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<AttestChallenge>, ApiError> {
    let id = peer
        .as_ref()
        .and_then(|p| p.client_chain.clone())
        .and_then(|c| {
            c.first()
                .and_then(|der| devid_tls::identity::identity_of(der).ok())
        })
        .and_then(|i| i.device.ok());
    let ctx = AuditCtx {
        actor: match &id {
            Some(id) => format!("device:{id}"),
            None => "anonymous".into(),
        },
        source: source_of(&peer),
        now_ms: now_ms(),
    };
    if let Err(wait) = state.limits.renew.check(&ip_of(&peer)) {
        audit_refusal(&state, ctx, "attest.start", None, "rate_limited").await?;
        return Err(ApiError::rate_limited("renewal", wait));
    }
    let dev = id.as_ref().map(|d| d.to_string());
    let checked = (|| {
        if state.attest.mode == AttestationMode::Off {
            return Err(attestation_off());
        }
        let Some(id) = id.clone() else {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "client_cert_required",
                "an attested renewal needs mutual TLS with the device certificate",
            ));
        };
        let req: AttestStartRequest = parse_body(body)?;
        if req.token.is_some() {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "unexpected_token",
                "a renewal carries no enrolment token",
            ));
        }
        let (ek, ak, assurance) = check_identity(&state.attest, &req, None)?;
        make_challenge(&ek, &ak, assurance, ChallengeFor::Device(id), ctx.now_ms)
    })();
    let (challenge, answer) = match checked {
        Ok(v) => v,
        Err(e) => {
            tracing::info!(source = %ctx.source, code = e.code, "attestation challenge refused");
            audit_refusal(&state, ctx, "attest.start", dev, e.code).await?;
            return Err(e);
        }
    };
    let store = state.registry.clone();
    let now = ctx.now_ms;
    blocking(move || store.put_challenge(&challenge, now)).await??;
    Ok(Json(answer))
}

/// Check the answer to a challenge against the CSR; returns what to record.
pub(crate) async fn check_evidence(
    state: &HttpState,
    evidence: &AttestationEvidence,
    bound: &ChallengeFor,
    csr: &VerifiedCsr,
    now: i64,
) -> Result<Attestation, ApiError> {
    let store = state.registry.clone();
    let id = evidence.challenge_id.clone();
    if id.len() > 64 {
        return Err(refused(
            "challenge_unknown",
            "no such attestation challenge",
        ));
    }
    let challenge = blocking(move || store.take_challenge(&id)).await??;
    let Some(challenge) = challenge else {
        return Err(refused(
            "challenge_unknown",
            "no such attestation challenge (each is single use): start again with \
             POST /v1/attest/start",
        ));
    };
    if challenge.expires_at_ms <= now {
        return Err(refused(
            "challenge_expired",
            "the attestation challenge expired; start again",
        ));
    }
    if &challenge.bound != bound {
        return Err(refused(
            "challenge_mismatch",
            "the attestation challenge was made for another token or device",
        ));
    }
    if !attest_binding::proof_matches(&challenge.secret, &challenge.id, &evidence.activation_proof)
    {
        return Err(refused(
            "activation_failed",
            "the credential was not activated: the attestation key is not in the TPM that \
             holds this endorsement key",
        ));
    }
    let ak_raw = hex::decode(&challenge.attestation.ak_public)
        .map_err(|e| ApiError::internal("stored AK", &e))?;
    let ak = check_ak(&ak_raw).map_err(from_attest)?;
    let q = attest_binding::qualifying_data(&challenge.id, &challenge.secret, &csr.der);
    let certified = verify_certify(
        &ak,
        &b64("certify_info", &evidence.certify_info)?,
        &b64("certify_signature", &evidence.certify_signature)?,
        &q,
        &b64("key_public", &evidence.key_public)?,
    )
    .map_err(from_attest)?;
    certified
        .require_spki_der(&csr.spki_der)
        .map_err(from_attest)?;
    Ok(challenge.attestation)
}

/// The server's `attestation.mode = "required"` for an enrolment without evidence.
pub(crate) fn required_error() -> ApiError {
    refusal_error(devid_store::Refusal::AttestationRequired)
}
