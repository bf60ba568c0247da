//! The route table: [`app`] builds the router, [`routes`] lists what it serves.

use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::routing::{get, post, MethodRouter};
use axum::{Json, Router};

use crate::messages;

use crate::admin::{
    audit_log, create_token, list_devices, resume_device, revoke_device, show_device,
    suspend_device,
};
use crate::enroll::{enroll, renew};
use crate::error::ApiError;
use crate::state::HttpState;

/// The routes [`app`] serves, as (method, path) with OpenAPI-style `{param}` templates.
pub fn routes() -> Vec<(&'static str, &'static str)> {
    build().1
}

/// The router, with body limit and request timeout from the config.
pub fn app(state: HttpState) -> Router {
    let limit = state.config.max_body_bytes;
    let timeout = Duration::from_secs(state.config.request_timeout_secs.max(1));
    build()
        .0
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
}

impl Builder {
    fn add(
        mut self,
        method: &'static str,
        path: &'static str,
        mr: MethodRouter<HttpState>,
    ) -> Self {
        self.router = self.router.route(path, mr);
        self.list.push((method, path));
        self
    }
}

pub(crate) fn build() -> (Router<HttpState>, Vec<(&'static str, &'static str)>) {
    let b = Builder {
        router: Router::new(),
        list: Vec::new(),
    }
    .add("GET", "/v1/health", get(health))
    .add("POST", "/v1/enroll", post(enroll))
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
    .add("GET", "/v1/admin/audit", get(audit_log))
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

pub(crate) async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}
