//! The admin API: enrolment tokens, devices, state changes, the audit log.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use devid_proto::{
    CredentialCreateRequest, CredentialCreateResponse, CredentialInfo, DeviceInfo, DeviceState,
    TokenCreateRequest, TokenCreateResponse,
};
use serde::Deserialize;

use devid_stdx::rfc3339;
use devid_store::{token, AdminCredential, NewToken, Refusal, Role};

use crate::auth::Admin;
use crate::error::{refusal_error, ApiError};
use crate::request::{blocking, parse_body, parse_device_id};
use crate::state::{device_info, HttpState};

pub(crate) async fn create_token(
    admin: Admin,
    State(state): State<HttpState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<TokenCreateResponse>), ApiError> {
    admin.may_change(&state, "token.create").await?;
    let req: TokenCreateRequest = parse_body(body)?;
    let device_id = req.device_id.as_deref().map(parse_device_id).transpose()?;
    let policy = req.policy.unwrap_or_else(|| "default".into());
    if !token::valid_policy(&policy) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_policy",
            "policy names use 1 to 64 characters from a-z, 0-9, '-' and '_'",
        ));
    }
    let max = state
        .config
        .token_max_ttl()
        .map_err(|e| ApiError::internal("config", &e))?;
    let ttl = match req.ttl_seconds {
        Some(0) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_ttl",
                "ttl must be at least one second",
            ))
        }
        Some(s) => Duration::from_secs(s),
        None => state
            .config
            .token_default_ttl()
            .map_err(|e| ApiError::internal("config", &e))?,
    };
    if ttl > max {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_ttl",
            format!(
                "ttl longer than the server's token_max_ttl ({})",
                state.config.token_max_ttl
            ),
        ));
    }
    let attestation_required = match req.attestation.as_deref() {
        None | Some("optional") => false,
        Some("required") => true,
        Some(_) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_attestation",
                "attestation is \"required\" or absent",
            ))
        }
    };
    // a token can only be stricter than the server
    if (attestation_required || req.ek_fingerprint.is_some())
        && state.attest.mode == devid_server_config::AttestationMode::Off
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "attestation_off",
            "this server does not attest keys (attestation.mode = \"off\"): a token cannot \
             require attestation or name an EK",
        ));
    }
    let ek_fingerprint = match req.ek_fingerprint {
        Some(fp) if fp.len() == 64 && fp.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Some(fp.to_ascii_lowercase())
        }
        Some(_) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_ek_fingerprint",
                "ek_fingerprint is the hex SHA-256 of the EK's SubjectPublicKeyInfo (64 hex \
                 characters)",
            ))
        }
        None => None,
    };
    let secret = token::generate();
    let expires_at_ms = admin
        .ctx
        .now_ms
        .saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 2));
    let new = NewToken {
        hash: token::hash(&secret),
        device_id: device_id.clone(),
        policy: policy.clone(),
        expires_at_ms,
        // an EK named by the token must be attested
        attestation_required: attestation_required || ek_fingerprint.is_some(),
        ek_fingerprint,
    };
    let store = state.registry.clone();
    let ctx = admin.ctx;
    blocking(move || store.create_token(&new, &ctx)).await??;
    tracing::info!(device_id = ?device_id.as_ref().map(|d| d.as_str()), %policy, "enrolment token created");
    Ok((
        StatusCode::CREATED,
        Json(TokenCreateResponse {
            token: secret.to_string(),
            expires_at: rfc3339(expires_at_ms),
            device_id: device_id.map(String::from),
            policy,
        }),
    ))
}

pub(crate) async fn list_devices(
    _admin: Admin,
    State(state): State<HttpState>,
) -> Result<Json<Vec<DeviceInfo>>, ApiError> {
    let store = state.registry.clone();
    let (devices, attested) = blocking(move || {
        Ok::<_, devid_store::StoreError>((store.devices()?, store.attestations()?))
    })
    .await??;
    let attested: std::collections::HashMap<_, _> = attested.into_iter().collect();
    Ok(Json(
        devices
            .iter()
            .map(|d| device_info(d, attested.get(d.id.as_str())))
            .collect(),
    ))
}

pub(crate) async fn show_device(
    _admin: Admin,
    State(state): State<HttpState>,
    Path(id): Path<String>,
) -> Result<Json<DeviceInfo>, ApiError> {
    let id = parse_device_id(&id)?;
    let store = state.registry.clone();
    let found = blocking(move || {
        Ok::<_, devid_store::StoreError>(match store.device(&id)? {
            Some(d) => {
                let a = store.attestation(&id)?;
                Some((d, a))
            }
            None => None,
        })
    })
    .await??;
    match found {
        Some((d, a)) => Ok(Json(device_info(&d, a.as_ref()))),
        None => Err(refusal_error(Refusal::DeviceUnknown)),
    }
}

/// `POST /v1/admin/devices/{id}/reset-attestation`: forget the device's registered TPM (after
/// a TPM swap) so it may attest with another EK.
pub(crate) async fn reset_attestation(
    admin: Admin,
    State(state): State<HttpState>,
    Path(id): Path<String>,
) -> Result<Json<DeviceInfo>, ApiError> {
    admin.may_change(&state, "device.reset_attestation").await?;
    let id = parse_device_id(&id)?;
    let store = state.registry.clone();
    let ctx = admin.ctx;
    let out = blocking(move || {
        Ok::<_, devid_store::StoreError>(match store.reset_attestation(&id, &ctx)? {
            Ok(()) => Ok(store.device(&id)?),
            Err(r) => Err(r),
        })
    })
    .await??;
    match out {
        Ok(Some(d)) => {
            tracing::info!(device_id = %d.id, "device attestation reset");
            Ok(Json(device_info(&d, None)))
        }
        Ok(None) => Err(refusal_error(Refusal::DeviceUnknown)),
        Err(r) => Err(refusal_error(r)),
    }
}

pub(crate) async fn change_state(
    admin: Admin,
    state: HttpState,
    id: String,
    target: DeviceState,
) -> Result<Json<DeviceInfo>, ApiError> {
    admin
        .may_change(&state, devid_store::state_action(target))
        .await?;
    let id = parse_device_id(&id)?;
    let store = state.registry.clone();
    let ctx = admin.ctx;
    match blocking(move || store.set_state(&id, target, &ctx)).await?? {
        Ok(d) => {
            tracing::info!(device_id = %d.id, state = %d.state, "device state changed");
            // committed: cut the device's live MQTT session now if it is no longer active
            state.live.state_changed(&d.id, d.state);
            let store = state.registry.clone();
            let id = d.id.clone();
            let a = blocking(move || store.attestation(&id)).await??;
            Ok(Json(device_info(&d, a.as_ref())))
        }
        Err(Refusal::DeviceRevoked) => Err(ApiError::new(
            StatusCode::CONFLICT,
            Refusal::DeviceRevoked.code(),
            Refusal::DeviceRevoked.message(),
        )),
        Err(r) => Err(refusal_error(r)),
    }
}

pub(crate) async fn suspend_device(
    admin: Admin,
    State(state): State<HttpState>,
    Path(id): Path<String>,
) -> Result<Json<DeviceInfo>, ApiError> {
    change_state(admin, state, id, DeviceState::Suspended).await
}

pub(crate) async fn resume_device(
    admin: Admin,
    State(state): State<HttpState>,
    Path(id): Path<String>,
) -> Result<Json<DeviceInfo>, ApiError> {
    change_state(admin, state, id, DeviceState::Active).await
}

pub(crate) async fn revoke_device(
    admin: Admin,
    State(state): State<HttpState>,
    Path(id): Path<String>,
) -> Result<Json<DeviceInfo>, ApiError> {
    change_state(admin, state, id, DeviceState::Revoked).await
}

/// Query of `GET /v1/admin/audit`.
#[derive(Debug, Deserialize)]
pub(crate) struct AuditQuery {
    limit: Option<u32>,
    device_id: Option<String>,
}

pub(crate) async fn audit_log(
    _admin: Admin,
    State(state): State<HttpState>,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<devid_proto::AuditEntry>>, ApiError> {
    let Query(q) = query.map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            "use ?limit=N&device_id=ID",
        )
    })?;
    let limit = q.limit.unwrap_or(1000).clamp(1, 100_000);
    let device = q.device_id.as_deref().map(parse_device_id).transpose()?;
    let store = state.registry.clone();
    let rows =
        blocking(move || store.audit_log(limit, device.as_ref().map(|d| d.as_str()))).await??;
    Ok(Json(rows))
}

fn credential_info(c: &AdminCredential) -> CredentialInfo {
    CredentialInfo {
        name: c.name.clone(),
        role: c.role.as_str().to_owned(),
        created_at: rfc3339(c.created_at_ms),
        revoked_at: c.revoked_at_ms.map(rfc3339),
    }
}

/// `POST /v1/admin/credentials`: a new named credential; its token is in this answer only.
pub(crate) async fn create_credential(
    admin: Admin,
    State(state): State<HttpState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<CredentialCreateResponse>), ApiError> {
    admin.may_change(&state, "credential.create").await?;
    let req: CredentialCreateRequest = parse_body(body)?;
    if !token::valid_policy(&req.name) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_credential_name",
            "credential names use 1 to 64 characters from a-z, 0-9, '-' and '_'",
        ));
    }
    let role = if req.read_only {
        Role::ReadOnly
    } else {
        Role::Admin
    };
    let secret = token::generate();
    let hash = token::hash(&secret);
    let store = state.registry.clone();
    let ctx = admin.ctx;
    let name = req.name.clone();
    match blocking(move || store.add_admin_credential(&name, role, &hash, &ctx)).await?? {
        Ok(()) => {
            tracing::info!(name = %req.name, role = role.as_str(), "admin credential created");
            Ok((
                StatusCode::CREATED,
                Json(CredentialCreateResponse {
                    name: req.name,
                    role: role.as_str().to_owned(),
                    token: secret.to_string(),
                }),
            ))
        }
        Err(r) => Err(refusal_error(r)),
    }
}

/// `GET /v1/admin/credentials`.
pub(crate) async fn list_credentials(
    _admin: Admin,
    State(state): State<HttpState>,
) -> Result<Json<Vec<CredentialInfo>>, ApiError> {
    let store = state.registry.clone();
    let all = blocking(move || store.admin_credentials()).await??;
    Ok(Json(all.iter().map(credential_info).collect()))
}

/// `POST /v1/admin/credentials/{name}/revoke`.
pub(crate) async fn revoke_credential(
    admin: Admin,
    State(state): State<HttpState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    admin.may_change(&state, "credential.revoke").await?;
    let store = state.registry.clone();
    let ctx = admin.ctx;
    let n = name.clone();
    match blocking(move || store.revoke_admin_credential(&n, &ctx)).await?? {
        Ok(()) => {
            tracing::info!(%name, "admin credential revoked");
            Ok(StatusCode::NO_CONTENT)
        }
        Err(r) => Err(refusal_error(r)),
    }
}
