//! Who is signed in ([`ConsoleUser`], from the session cookie) and the checks every change
//! passes ([`check_csrf`]: same origin and the session's CSRF token).

// check_csrf answers a refusal with the response itself (`Result<_, Response>`), as the
// handlers do; a boxed response would only add an allocation per refusal.
#![allow(clippy::result_large_err)]

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};

use devid_stdx::now_ms;
use devid_store::{AuditCtx, Role};

use super::session::{cookie_value, ct_eq};
use crate::auth::Admin;
use crate::request::{audit_refusal, blocking};
use crate::state::{HttpState, PeerInfo};

/// A signed-in operator.
#[derive(Debug)]
pub(crate) struct ConsoleUser {
    /// Audit context (`admin:<name>`, source, time).
    pub(crate) ctx: AuditCtx,
    pub(crate) name: String,
    pub(crate) role: Role,
    pub(crate) csrf: String,
}

impl ConsoleUser {
    /// The same identity as an admin API caller, for the shared handlers.
    pub(crate) fn admin(&self) -> Admin {
        Admin {
            ctx: self.ctx.clone(),
            role: self.role,
        }
    }
}

/// Why a request has no signed-in operator: pages send the browser to the login form, data
/// and change requests get 401.
#[derive(Debug)]
pub(crate) enum NoSession {
    Page,
    Api,
    Internal(crate::error::ApiError),
}

impl IntoResponse for NoSession {
    fn into_response(self) -> Response {
        match self {
            NoSession::Page => Redirect::to("/console/login").into_response(),
            NoSession::Api => (
                StatusCode::UNAUTHORIZED,
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                "not signed in to the console (or the session expired)",
            )
                .into_response(),
            NoSession::Internal(e) => e.into_response(),
        }
    }
}

pub(crate) fn source_of(parts_ext: &axum::http::Extensions) -> String {
    parts_ext
        .get::<PeerInfo>()
        .and_then(|p| p.addr)
        .map(|a| a.to_string())
        .unwrap_or_else(|| "unknown".into())
}

impl FromRequestParts<HttpState> for ConsoleUser {
    type Rejection = NoSession;

    async fn from_request_parts(parts: &mut Parts, state: &HttpState) -> Result<Self, NoSession> {
        let page = parts.method == axum::http::Method::GET
            && !parts.uri.path().ends_with(".json")
            && !parts.uri.path().ends_with("/stream");
        let none = || {
            if page {
                NoSession::Page
            } else {
                NoSession::Api
            }
        };
        let cookie = cookie_value(&parts.headers).ok_or_else(none)?;
        let session = state.console.touch(&cookie).ok_or_else(none)?;
        // the credential may have been revoked since the login: look it up again
        let store = state.registry.clone();
        let hash = session.credential_hash.clone();
        let found = blocking(move || store.admin_credential(&hash))
            .await
            .map_err(NoSession::Internal)?
            .map_err(|e| NoSession::Internal(e.into()))?;
        let Some(credential) = found else {
            state.console.remove(&cookie);
            return Err(none());
        };
        state.http_metrics.admin_request(
            credential.role == Role::ReadOnly,
            parts.method != axum::http::Method::GET,
        );
        Ok(ConsoleUser {
            ctx: AuditCtx {
                actor: format!("admin:{}", credential.name),
                source: source_of(&parts.extensions),
                now_ms: now_ms(),
            },
            name: credential.name,
            role: credential.role,
            csrf: session.csrf,
        })
    }
}

/// The console's own origin as the browser names it (`https://` + the Host it asked for).
fn own_origin(headers: &HeaderMap, uri: &axum::http::Uri) -> Option<String> {
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| uri.authority().map(|a| a.to_string()))?;
    Some(format!("https://{host}"))
}

/// Whether a POST comes from the console's own pages: its `Origin` is the console's (every
/// browser sends `Origin` on a POST; a request without one is refused).
pub(crate) fn same_origin(headers: &HeaderMap, uri: &axum::http::Uri) -> bool {
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    match (origin, own_origin(headers, uri)) {
        (Some(o), Some(own)) => o.eq_ignore_ascii_case(&own),
        _ => false,
    }
}

/// The checks every state change passes before anything else: same origin and the session's
/// CSRF token. A refusal is audited (aggregated) and answered 403.
pub(crate) async fn check_csrf(
    state: &HttpState,
    user: &ConsoleUser,
    headers: &HeaderMap,
    uri: &axum::http::Uri,
    form_token: Option<&str>,
    action: &'static str,
) -> Result<(), Response> {
    let presented =
        form_token.or_else(|| headers.get("x-csrf-token").and_then(|v| v.to_str().ok()));
    let code = if !same_origin(headers, uri) {
        Some("cross_origin")
    } else if !presented.is_some_and(|t| ct_eq(t.trim().as_bytes(), user.csrf.as_bytes())) {
        Some("csrf_token")
    } else {
        None
    };
    let Some(code) = code else {
        return Ok(());
    };
    tracing::warn!(actor = %user.ctx.actor, action, code, "console change refused (CSRF)");
    if let Err(e) = audit_refusal(state, user.ctx.clone(), action, None, code).await {
        return Err(e.into_response());
    }
    Err((
        StatusCode::FORBIDDEN,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        "refused: this change did not come from the console's own page (missing or wrong \
         CSRF token, or another origin); reload the page and try again",
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn origin_must_match_the_host() {
        let uri: axum::http::Uri = "/console/logout".parse().unwrap_or_default();
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("localhost:8444"));
        assert!(!same_origin(&h, &uri), "no Origin: refused");
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.example"),
        );
        assert!(!same_origin(&h, &uri));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://localhost:8444"),
        );
        assert!(same_origin(&h, &uri));
        assert!(ct_eq(b"abc", b"abc") && !ct_eq(b"abc", b"abd") && !ct_eq(b"ab", b"abc"));
    }
}
