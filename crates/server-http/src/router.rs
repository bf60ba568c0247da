//! The route table: [`app`] builds the router, [`routes`] lists what it serves.

use std::time::Duration;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::routing::{get, post, MethodRouter};
use axum::{Json, Router};

use crate::messages;

use crate::admin::{
    audit_log, create_credential, create_token, list_credentials, list_devices, resume_device,
    revoke_credential, revoke_device, show_device, suspend_device,
};
use crate::enroll::{enroll, renew};
use crate::error::ApiError;
use crate::state::HttpState;

/// Which of the server's HTTPS listeners a router is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    /// `https_listen`, facing devices and the internet: enrolment, renewal, health, readiness.
    Public,
    /// `admin_listen`, for operators: the admin API, messages, the live stream, metrics (and
    /// health, readiness).
    Admin,
    /// Both at once (in-process tests).
    All,
}

impl Surface {
    /// Whether a route belongs on this surface.
    fn serves(self, path: &str) -> bool {
        let public = matches!(
            path,
            "/v1/health"
                | "/readyz"
                | "/v1/enroll"
                | "/v1/renew"
                | "/v1/attest/start"
                | "/v1/renew/attest/start"
        );
        let both = matches!(path, "/v1/health" | "/readyz");
        match self {
            Surface::All => true,
            Surface::Public => public,
            Surface::Admin => both || !public,
        }
    }
}

/// The routes [`app`] serves, as (method, path) with OpenAPI-style `{param}` templates.
pub fn routes() -> Vec<(&'static str, &'static str)> {
    build(Surface::All).1
}

/// The routes one surface serves.
pub fn surface_routes(surface: Surface) -> Vec<(&'static str, &'static str)> {
    build(surface).1
}

/// The router of every route, with body limit and request timeout from the config.
pub fn app(state: HttpState) -> Router {
    surface_app(state, Surface::All)
}

/// The router of one listener.
pub fn surface_app(state: HttpState, surface: Surface) -> Router {
    let limit = state.config.max_body_bytes;
    let timeout = Duration::from_secs(state.config.request_timeout_secs.max(1));
    let mut router = build(surface).0;
    if surface != Surface::Public {
        // the operators' web console: admin listener only, never the devices' one
        router = router.merge(crate::console::router());
    }
    router
        .layer(DefaultBodyLimit::max(limit))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            timeout,
        ))
        .with_state(state)
}

struct Builder {
    router: Router<HttpState>,
    list: Vec<(&'static str, &'static str)>,
    surface: Surface,
}

impl Builder {
    fn add(
        mut self,
        method: &'static str,
        path: &'static str,
        mr: MethodRouter<HttpState>,
    ) -> Self {
        if self.surface.serves(path) {
            self.router = self.router.route(path, mr);
            self.list.push((method, path));
        }
        self
    }
}

pub(crate) fn build(surface: Surface) -> (Router<HttpState>, Vec<(&'static str, &'static str)>) {
    let b = Builder {
        router: Router::new(),
        list: Vec::new(),
        surface,
    }
    .add("GET", "/v1/health", get(health))
    .add("GET", "/readyz", get(readyz))
    .add("POST", "/v1/attest/start", post(crate::attest::start))
    .add("POST", "/v1/enroll", post(enroll))
    .add(
        "POST",
        "/v1/renew/attest/start",
        post(crate::attest::renew_start),
    )
    .add("POST", "/v1/renew", post(renew))
    .add("POST", "/v1/admin/tokens", post(create_token))
    .add("GET", "/v1/admin/devices", get(list_devices))
    .add("GET", "/v1/admin/devices/{id}", get(show_device))
    .add(
        "POST",
        "/v1/admin/devices/{id}/suspend",
        post(suspend_device),
    )
    .add("POST", "/v1/admin/devices/{id}/resume", post(resume_device))
    .add("POST", "/v1/admin/devices/{id}/revoke", post(revoke_device))
    .add(
        "POST",
        "/v1/admin/devices/{id}/reset-attestation",
        post(crate::admin::reset_attestation),
    )
    .add("GET", "/v1/admin/audit", get(audit_log))
    .add("POST", "/v1/admin/credentials", post(create_credential))
    .add("GET", "/v1/admin/credentials", get(list_credentials))
    .add(
        "POST",
        "/v1/admin/credentials/{name}/revoke",
        post(revoke_credential),
    )
    .add(
        "GET",
        "/v1/devices/{id}/messages",
        get(messages::list_messages),
    )
    .add("GET", "/v1/stream", get(messages::stream))
    .add("GET", "/metrics", get(messages::metrics));
    let router = b.router.fallback(|| async {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such route; see openapi.yaml",
        )
    });
    (router, b.list)
}

/// `GET /readyz`: the database answers (a registry read on the blocking pool, bounded by
/// [`READY_TIMEOUT`]) and the other listeners the root reports are up.
pub(crate) async fn readyz(State(state): State<HttpState>) -> axum::response::Response {
    use axum::response::IntoResponse;
    let not_ready = |check: &str| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "not ready", "check": check})),
        )
            .into_response()
    };
    if let Err(check) = (state.readiness)() {
        return not_ready(&check);
    }
    let registry = state.registry.clone();
    let probe = tokio::time::timeout(
        READY_TIMEOUT,
        tokio::task::spawn_blocking(move || {
            let id = devid_proto::DeviceId::parse("readyz-probe").map_err(|e| {
                devid_store::StoreError::Corrupt {
                    what: "probe id",
                    detail: e.to_string(),
                }
            })?;
            registry.device(&id).map(|_| ())
        }),
    )
    .await;
    match probe {
        Ok(Ok(Ok(()))) => Json(serde_json::json!({"status": "ready"})).into_response(),
        Ok(Ok(Err(e))) => {
            tracing::warn!(error = %e, "readiness: the database did not answer");
            not_ready("database")
        }
        Ok(Err(_)) | Err(_) => not_ready("database"),
    }
}

/// Longest wait for the database in a readiness check.
const READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

pub(crate) async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}
