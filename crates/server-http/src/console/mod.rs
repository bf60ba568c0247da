//! The fleet console: server-rendered HTML pages for operators on the admin listener only
//! (`/console/...`, never on the public listener), with a little script and the uPlot chart
//! library embedded in the binary ([`assets`]).
//!
//! * Login with a named admin credential (its bearer secret); the session lives in memory on
//!   this node ([`Sessions`]: sessions do not survive a restart and are not shared between
//!   nodes), 15 minutes idle, 8 hours at most, and ends as soon as its credential is revoked
//!   (every request looks the credential up again).
//! * The cookie is `__Host-devid_console`: `HttpOnly; Secure; SameSite=Strict; Path=/`.
//! * Every state change is a POST that must carry the session's CSRF token (form field
//!   `csrf` or header `x-csrf-token`) and an `Origin` equal to the console's own; a read-only
//!   credential is refused by the server ([`crate::Admin::may_change`]), not only shown no
//!   button. Changes go through the same handlers as the admin API, so they are audited with
//!   the credential's name (`admin:<name>`) and cut live sessions the same way.
//! * Strict Content-Security-Policy (`default-src 'self'`, no inline script or style);
//!   payloads and topics are escaped on the server ([`html::esc`]) and set with
//!   `textContent` in the script.
//! * The live chart streams Server-Sent Events authenticated by the session cookie.

// The helpers answer a refusal with the page itself (`Result<_, Response>`), as the handlers
// do; a boxed response would only add an allocation per refusal.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;

use devid_stdx::now_ms;
use devid_store::{token, AuditCtx, Role};

use crate::auth::Admin;
use crate::request::{audit_refusal, blocking};
use crate::state::{HttpState, PeerInfo};

mod actions;
pub mod assets;
pub(crate) mod html;
mod pages;

/// The session cookie's name (`__Host-`: Secure, no Domain, Path=/ enforced by browsers).
pub const COOKIE: &str = "__Host-devid_console";
/// A session unused this long ends.
pub const IDLE: Duration = Duration::from_secs(15 * 60);
/// No session lasts longer than this.
pub const ABSOLUTE: Duration = Duration::from_secs(8 * 3600);
/// At most this many sessions at once (the oldest goes first).
const MAX_SESSIONS: usize = 10_000;

/// The routes the console serves (method, path), for the docs.
pub fn routes() -> Vec<(&'static str, &'static str)> {
    vec![
        ("GET", "/console"),
        ("GET", "/console/login"),
        ("POST", "/console/login"),
        ("POST", "/console/logout"),
        ("GET", "/console/devices"),
        ("GET", "/console/devices/{id}"),
        ("GET", "/console/devices/{id}/confirm/{action}"),
        ("POST", "/console/devices/{id}/{action}"),
        ("GET", "/console/devices/{id}/messages.json"),
        ("GET", "/console/devices/{id}/stream"),
        ("POST", "/console/tokens"),
        ("GET", "/console/overview"),
        ("GET", "/console/overview.json"),
        ("GET", "/console/assets/{name}"),
    ]
}

/// The console's router (merged into the admin listener's).
pub(crate) fn router() -> Router<HttpState> {
    Router::new()
        .route(
            "/console",
            get(|| async { Redirect::to("/console/devices") }),
        )
        .route(
            "/console/login",
            get(actions::login_page).post(actions::login),
        )
        .route("/console/logout", post(actions::logout))
        .route("/console/devices", get(pages::devices))
        .route("/console/devices/{id}", get(pages::device))
        .route(
            "/console/devices/{id}/confirm/{action}",
            get(pages::confirm),
        )
        .route("/console/devices/{id}/{action}", post(actions::change))
        .route(
            "/console/devices/{id}/messages.json",
            get(pages::messages_json),
        )
        .route("/console/devices/{id}/stream", get(pages::stream))
        .route("/console/tokens", post(actions::create_token))
        .route("/console/overview", get(pages::overview))
        .route("/console/overview.json", get(pages::overview_json))
        .route("/console/assets/{name}", get(assets::serve))
        .layer(axum::middleware::map_response(security_headers))
}

/// Headers on every console answer: the CSP, no sniffing, no framing, no caching, referrer only to itself.
async fn security_headers(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    let set = |h: &mut HeaderMap, k: header::HeaderName, v: &'static str| {
        h.insert(k, HeaderValue::from_static(v));
    };
    set(
        h,
        header::CONTENT_SECURITY_POLICY,
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
         connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; \
         frame-ancestors 'none'",
    );
    set(h, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(h, header::X_FRAME_OPTIONS, "DENY");
    // not `no-referrer`: with it Chromium sends `Origin: null` on the console's own form
    // posts, and the Origin check could not tell them from another site's
    set(h, header::REFERRER_POLICY, "same-origin");
    if !h.contains_key(header::CACHE_CONTROL) {
        set(h, header::CACHE_CONTROL, "no-store");
    }
    resp
}

/// One login.
#[derive(Debug, Clone)]
struct Session {
    /// SHA-256 of the credential's bearer token (looked up again at every request).
    credential_hash: String,
    csrf: String,
    created: Instant,
    last: Instant,
}

/// The console's sessions, in memory: per node, gone at restart. Keyed by the SHA-256 of the
/// cookie value, so the table holds no usable cookie.
#[derive(Debug, Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Session>>,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        match self.map.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        }
    }

    /// A new session for the credential whose token hashes to `credential_hash`: returns
    /// (cookie value, CSRF token).
    fn create(&self, credential_hash: String) -> (String, String) {
        let id = token::generate().to_string();
        let csrf = token::generate().to_string();
        let now = Instant::now();
        let mut map = self.lock();
        map.retain(|_, s| alive(s, now));
        if map.len() >= MAX_SESSIONS {
            if let Some(oldest) = map
                .iter()
                .min_by_key(|(_, s)| s.created)
                .map(|(k, _)| k.clone())
            {
                map.remove(&oldest);
            }
        }
        map.insert(
            token::hash(&id),
            Session {
                credential_hash,
                csrf: csrf.clone(),
                created: now,
                last: now,
            },
        );
        (id, csrf)
    }

    /// The live session of this cookie value (its idle time restarts).
    fn touch(&self, cookie: &str) -> Option<Session> {
        let key = token::hash(cookie);
        let now = Instant::now();
        let mut map = self.lock();
        match map.get_mut(&key) {
            Some(s) if alive(s, now) => {
                s.last = now;
                Some(s.clone())
            }
            Some(_) => {
                map.remove(&key);
                None
            }
            None => None,
        }
    }

    fn remove(&self, cookie: &str) {
        self.lock().remove(&token::hash(cookie));
    }

    /// Sessions now alive.
    pub fn len(&self) -> usize {
        let now = Instant::now();
        self.lock().values().filter(|s| alive(s, now)).count()
    }

    /// Whether no session is alive.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn alive(s: &Session, now: Instant) -> bool {
    now.duration_since(s.last) < IDLE && now.duration_since(s.created) < ABSOLUTE
}

/// Equal in constant time (for CSRF tokens).
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The session cookie's value in a request.
fn cookie_value(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.trim().to_owned())
        .filter(|v| token::well_formed(v))
}

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

    #[test]
    fn sessions_expire_and_are_keyed_by_hash() {
        let s = Sessions::default();
        let (cookie, csrf) = s.create("h".into());
        assert!(token::well_formed(&cookie));
        assert_ne!(cookie, csrf);
        assert!(s.touch(&cookie).is_some());
        assert!(
            !s.lock().contains_key(&cookie),
            "the table holds no cookie value"
        );
        {
            let mut m = s.lock();
            let e = m
                .get_mut(&token::hash(&cookie))
                .unwrap_or_else(|| panic!("session"));
            e.last = Instant::now()
                .checked_sub(IDLE)
                .unwrap_or_else(Instant::now);
        }
        assert!(s.touch(&cookie).is_none(), "idle session ended");
        let (c2, _) = s.create("h".into());
        {
            let mut m = s.lock();
            let e = m
                .get_mut(&token::hash(&c2))
                .unwrap_or_else(|| panic!("session"));
            e.created = Instant::now()
                .checked_sub(ABSOLUTE)
                .unwrap_or_else(Instant::now);
        }
        assert!(s.touch(&c2).is_none(), "absolute lifetime ended");
    }

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
