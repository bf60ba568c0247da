//! Small helpers every handler uses: the peer's address, the blocking pool, refusal audit
//! rows, request bodies that are never quoted back.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::Extension;
use devid_proto::DeviceId;
use serde::de::DeserializeOwned;

use devid_ca::csr::{verify_csr_pem, VerifiedCsr};
use devid_store::{AuditCtx, NewAudit};

use crate::error::ApiError;
use crate::state::{HttpState, PeerInfo};

/// The peer's IP address (unspecified when the listener told none, as in-process tests may).
pub(crate) fn ip_of(peer: &Option<Extension<PeerInfo>>) -> std::net::IpAddr {
    peer.as_ref()
        .and_then(|p| p.addr)
        .map(|a| a.ip())
        .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
}

pub(crate) fn source_of(peer: &Option<Extension<PeerInfo>>) -> String {
    peer.as_ref()
        .and_then(|p| p.addr)
        .map(|a| a.to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// Run a blocking store call on the blocking pool (never on an async worker).
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal("blocking task", &e))
}

/// Write a refusal audit row for failures found before the store is involved, at most one
/// per source address, action and code per `https.audit_interval_secs` (the row written says
/// how many were left out before it): a flood of bad requests cannot fill the disk or hold
/// the registry's write lock.
pub(crate) async fn audit_refusal(
    state: &HttpState,
    ctx: AuditCtx,
    action: &'static str,
    device: Option<String>,
    code: &'static str,
) -> Result<(), ApiError> {
    let ip = ctx
        .source
        .parse::<std::net::SocketAddr>()
        .map(|a| a.ip().to_string())
        .unwrap_or_else(|_| ctx.source.clone());
    let key = format!("src:{ip}:{action}:{code}");
    let Some(suppressed) = state.limits.audit.allow(&key) else {
        return Ok(());
    };
    let detail = if suppressed > 0 {
        format!("{code} (+{suppressed} similar suppressed)")
    } else {
        code.to_owned()
    };
    let store = state.registry.clone();
    blocking(move || {
        store.append_audit(&NewAudit {
            ctx: &ctx,
            device_id: device.as_deref(),
            action,
            outcome: "refused",
            detail: &detail,
        })
    })
    .await??;
    Ok(())
}

/// Parse a JSON body without ever quoting it back (it may hold a token).
pub(crate) fn parse_body<T: DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let bytes = body.map_err(|rej| {
        let status = rej.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                status,
                "body_too_large",
                "request body too large; a CSR for a P-256 key is under 1 KiB",
            )
        } else {
            ApiError::new(status, "bad_request", "could not read the request body")
        }
    })?;
    serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!(
                "invalid JSON body ({:?} error at line {} column {}); see openapi.yaml for the \
                 schema",
                e.classify(),
                e.line(),
                e.column()
            ),
        )
    })
}

pub(crate) fn check_csr(pem: &str) -> Result<VerifiedCsr, ApiError> {
    verify_csr_pem(pem).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.code(), e.to_string()))
}

pub(crate) fn parse_device_id(s: &str) -> Result<DeviceId, ApiError> {
    DeviceId::parse(s)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_device_id", e.to_string()))
}
