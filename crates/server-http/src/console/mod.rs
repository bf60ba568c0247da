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

use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{Redirect, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::state::HttpState;

mod actions;
pub mod assets;
pub(crate) mod html;
mod pages;
mod session;
mod user;

pub use session::{Sessions, ABSOLUTE, COOKIE, IDLE};

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
