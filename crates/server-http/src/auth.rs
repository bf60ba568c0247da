//! The [`Admin`] extractor: a bearer token whose hash is in the registry, or an audited
//! refusal.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, StatusCode};

use devid_stdx::now_ms;
use devid_store::{token, AuditCtx, Role};

use crate::error::ApiError;
use crate::request::{audit_refusal, blocking};
use crate::state::{HttpState, PeerInfo};

/// An authenticated admin request: a bearer token whose hash belongs to a live named
/// credential. Handlers that change state call [`Admin::may_change`] first.
#[derive(Debug)]
pub struct Admin {
    pub(crate) ctx: AuditCtx,
    pub(crate) role: Role,
}

impl Admin {
    /// Refuse (and audit, aggregated) a state change asked with a read-only credential: the
    /// refusal is the server's, not only a hidden button.
    pub(crate) async fn may_change(
        &self,
        state: &HttpState,
        action: &'static str,
    ) -> Result<(), ApiError> {
        if self.role == Role::Admin {
            return Ok(());
        }
        tracing::info!(actor = %self.ctx.actor, action, "read-only credential refused");
        audit_refusal(
            state,
            self.ctx.clone(),
            action,
            None,
            "read_only_credential",
        )
        .await?;
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "read_only_credential",
            "this credential is read-only; use an admin credential to change anything",
        ))
    }
}

impl FromRequestParts<HttpState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &HttpState) -> Result<Self, ApiError> {
        let addr = parts.extensions.get::<PeerInfo>().and_then(|p| p.addr);
        let ip = addr
            .map(|a| a.ip())
            .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
        let source = addr
            .map(|a| a.to_string())
            .unwrap_or_else(|| "unknown".into());
        // a source that failed too often is turned away before its token is even looked up
        if let Err(wait) = state.limits.admin_failures.would_allow(&ip) {
            let ctx = AuditCtx {
                actor: "anonymous".into(),
                source,
                now_ms: now_ms(),
            };
            audit_refusal(state, ctx, "admin.auth", None, "rate_limited").await?;
            return Err(ApiError::rate_limited("failed admin authentication", wait));
        }
        let presented = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| token::well_formed(t))
            .map(token::hash);
        let ctx = AuditCtx {
            actor: "admin".into(),
            source,
            now_ms: now_ms(),
        };
        let found = match presented {
            Some(hash) => {
                let store = state.registry.clone();
                blocking(move || store.admin_credential(&hash)).await??
            }
            None => None,
        };
        if let Some(credential) = found {
            let changes = parts.method != axum::http::Method::GET;
            state
                .http_metrics
                .admin_request(credential.role == Role::ReadOnly, changes);
            let mut ctx = ctx;
            ctx.actor = format!("admin:{}", credential.name);
            return Ok(Admin {
                ctx,
                role: credential.role,
            });
        }
        // a failure costs the source a token; past the burst it gets 429 (above)
        let _ = state.limits.admin_failures.check(&ip);
        let mut refused_ctx = ctx;
        refused_ctx.actor = "anonymous".into();
        tracing::warn!(source = %refused_ctx.source, "admin request without a valid token");
        audit_refusal(state, refused_ctx, "admin.auth", None, "admin_unauthorized").await?;
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "admin_unauthorized",
            "missing or invalid admin bearer token (DATA_DIR/admin.token)",
        ))
    }
}
