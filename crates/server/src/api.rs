//! The HTTPS API as an axum router: enrolment, renewal (mutual TLS), the admin API and a
//! health check. [`app`] builds it; [`routes`] lists what it serves (the OpenAPI file
//! `openapi.yaml` is checked against that list by a test).
//!
//! Errors are JSON `{"error": "...", "code": "..."}`. Every refusal of an enrolment or renewal
//! and every admin change leaves an audit row. No token, key, CSR or body reaches a log line.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::{Extension, Json, Router};
use devid_proto::{
    DeviceId, DeviceInfo, DeviceState, EnrollRequest, EnrollResponse, ErrorBody, RenewRequest,
    TokenCreateRequest, TokenCreateResponse,
};
use rustls::pki_types::CertificateDer;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use x509_parser::prelude::GeneralName;

use crate::ca::{Ca, IssuedCert};
use crate::config::ServerConfig;
use crate::csr::{verify_csr_pem, VerifiedCsr};
use crate::store::{AuditCtx, EnrollAttempt, NewAudit, NewToken, Refusal, Store, StoreError};
use crate::timeutil::{now_ms, rfc3339};
use crate::token;

/// What the handlers share.
#[derive(Clone, Debug)]
pub struct AppState {
    /// Registry, tokens, audit.
    pub store: Arc<dyn Store>,
    /// The fleet CA.
    pub ca: Arc<Ca>,
    /// Settings.
    pub config: Arc<ServerConfig>,
    /// The MQTT ingest's shared state: message store, live sessions, metrics.
    pub telemetry: Arc<crate::ingest::Telemetry>,
}

/// What the TLS listener knows about the connection a request came on. Inserted as a request
/// extension by [`crate::serve`].
#[derive(Clone, Debug, Default)]
pub struct PeerInfo {
    /// The peer's address.
    pub addr: Option<SocketAddr>,
    /// The client certificate chain, already verified against the fleet CA by rustls.
    pub client_chain: Option<Arc<Vec<CertificateDer<'static>>>>,
}

/// A JSON error response.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub(crate) fn internal(what: &str, e: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %e, "{what} failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal server error; the server log has the cause",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(ErrorBody {
                error: self.message,
                code: self.code.to_owned(),
            }),
        )
            .into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::internal("database", &e)
    }
}

fn refusal_error(r: Refusal) -> ApiError {
    let status = match r {
        Refusal::TokenUnknown | Refusal::TokenExpired => StatusCode::UNAUTHORIZED,
        Refusal::TokenUsed | Refusal::DeviceExists => StatusCode::CONFLICT,
        Refusal::TokenBoundToOther | Refusal::DeviceRevoked | Refusal::DeviceSuspended => {
            StatusCode::FORBIDDEN
        }
        Refusal::DeviceUnknown => StatusCode::NOT_FOUND,
    };
    ApiError::new(status, r.code(), r.message())
}

/// The routes [`app`] serves, as (method, path) with OpenAPI-style `{param}` templates.
pub fn routes() -> Vec<(&'static str, &'static str)> {
    build().1
}

/// The router, with body limit and request timeout from the config.
pub fn app(state: AppState) -> Router {
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
    router: Router<AppState>,
    list: Vec<(&'static str, &'static str)>,
}

impl Builder {
    fn add(mut self, method: &'static str, path: &'static str, mr: MethodRouter<AppState>) -> Self {
        self.router = self.router.route(path, mr);
        self.list.push((method, path));
        self
    }
}

fn build() -> (Router<AppState>, Vec<(&'static str, &'static str)>) {
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
        get(crate::ingest::http::list_messages),
    )
    .add("GET", "/v1/stream", get(crate::ingest::http::stream))
    .add("GET", "/metrics", get(crate::ingest::http::metrics));
    let router = b.router.fallback(|| async {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such route; see openapi.yaml",
        )
    });
    (router, b.list)
}

fn source_of(peer: &Option<Extension<PeerInfo>>) -> String {
    peer.as_ref()
        .and_then(|p| p.addr)
        .map(|a| a.to_string())
        .unwrap_or_else(|| "unknown".into())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal("blocking task", &e))
}

/// Write a refusal audit row for failures found before the store is involved.
async fn audit_refusal(
    state: &AppState,
    ctx: AuditCtx,
    action: &'static str,
    device: Option<String>,
    code: &'static str,
) -> Result<(), ApiError> {
    let store = state.store.clone();
    blocking(move || {
        store.append_audit(&NewAudit {
            ctx: &ctx,
            device_id: device.as_deref(),
            action,
            outcome: "refused",
            detail: code,
        })
    })
    .await??;
    Ok(())
}

/// Parse a JSON body without ever quoting it back (it may hold a token).
fn parse_body<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
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

fn check_csr(pem: &str) -> Result<VerifiedCsr, ApiError> {
    verify_csr_pem(pem).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.code(), e.to_string()))
}

fn parse_device_id(s: &str) -> Result<DeviceId, ApiError> {
    DeviceId::parse(s)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_device_id", e.to_string()))
}

async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

fn response(state: &AppState, id: &DeviceId, cert: &IssuedCert) -> EnrollResponse {
    EnrollResponse {
        device_id: id.to_string(),
        certificate_chain: format!("{}{}", cert.cert_pem, state.ca.cert_pem()),
        mqtt_url: state.config.mqtt_url(),
        ca_pin: state.ca.pin(),
    }
}

async fn enroll(
    State(state): State<AppState>,
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
        let mut issue = |id: &DeviceId| st.ca.issue_device(id, &csr.spki_der, lifetime, ctx.now_ms);
        let source = ctx.source.clone();
        st.store.enroll(&attempt, &mut issue).map(|r| (r, source))
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

/// The device id named by a verified client certificate's `urn:devid:` SAN URI.
fn device_of_cert(der: &CertificateDer<'_>) -> Option<DeviceId> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let mut ids = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(u) => DeviceId::from_uri(u),
        _ => None,
    });
    let id = ids.next()?;
    if ids.next().is_some() {
        return None;
    }
    Some(id)
}

async fn renew(
    State(state): State<AppState>,
    peer: Option<Extension<PeerInfo>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<EnrollResponse>, ApiError> {
    let source = source_of(&peer);
    let chain = peer.as_ref().and_then(|p| p.client_chain.clone());
    let id = chain
        .as_ref()
        .and_then(|c| c.first())
        .and_then(device_of_cert);
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
        let mut issue = |d: &DeviceId| st.ca.issue_device(d, &csr.spki_der, lifetime, ctx.now_ms);
        st.store.renew(&id, &csr.key_fingerprint, &ctx, &mut issue)
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

/// An authenticated admin request (bearer token whose hash is in the store).
#[derive(Debug)]
pub struct Admin {
    ctx: AuditCtx,
}

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let source = parts
            .extensions
            .get::<PeerInfo>()
            .and_then(|p| p.addr)
            .map(|a| a.to_string())
            .unwrap_or_else(|| "unknown".into());
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
        let valid = match presented {
            Some(hash) => {
                let store = state.store.clone();
                blocking(move || store.admin_credential_valid(&hash)).await??
            }
            None => false,
        };
        if valid {
            return Ok(Admin { ctx });
        }
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

async fn create_token(
    admin: Admin,
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<TokenCreateResponse>), ApiError> {
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
    };
    let store = state.store.clone();
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

async fn list_devices(
    _admin: Admin,
    State(state): State<AppState>,
) -> Result<Json<Vec<DeviceInfo>>, ApiError> {
    let store = state.store.clone();
    let devices = blocking(move || store.devices()).await??;
    Ok(Json(devices.iter().map(|d| d.info()).collect()))
}

async fn show_device(
    _admin: Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<DeviceInfo>, ApiError> {
    let id = parse_device_id(&id)?;
    let store = state.store.clone();
    match blocking(move || store.device(&id)).await?? {
        Some(d) => Ok(Json(d.info())),
        None => Err(refusal_error(Refusal::DeviceUnknown)),
    }
}

async fn change_state(
    admin: Admin,
    state: AppState,
    id: String,
    target: DeviceState,
) -> Result<Json<DeviceInfo>, ApiError> {
    let id = parse_device_id(&id)?;
    let store = state.store.clone();
    let ctx = admin.ctx;
    match blocking(move || store.set_state(&id, target, &ctx)).await?? {
        Ok(d) => {
            tracing::info!(device_id = %d.id, state = %d.state, "device state changed");
            // committed: cut the device's live MQTT session now if it is no longer active
            state.telemetry.on_state_change(&d.id, d.state);
            Ok(Json(d.info()))
        }
        Err(Refusal::DeviceRevoked) => Err(ApiError::new(
            StatusCode::CONFLICT,
            Refusal::DeviceRevoked.code(),
            Refusal::DeviceRevoked.message(),
        )),
        Err(r) => Err(refusal_error(r)),
    }
}

async fn suspend_device(
    admin: Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<DeviceInfo>, ApiError> {
    change_state(admin, state, id, DeviceState::Suspended).await
}

async fn resume_device(
    admin: Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<DeviceInfo>, ApiError> {
    change_state(admin, state, id, DeviceState::Active).await
}

async fn revoke_device(
    admin: Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<DeviceInfo>, ApiError> {
    change_state(admin, state, id, DeviceState::Revoked).await
}

/// Query of `GET /v1/admin/audit`.
#[derive(Debug, Deserialize)]
struct AuditQuery {
    limit: Option<u32>,
    device_id: Option<String>,
}

async fn audit_log(
    _admin: Admin,
    State(state): State<AppState>,
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
    let store = state.store.clone();
    let rows =
        blocking(move || store.audit_log(limit, device.as_ref().map(|d| d.as_str()))).await??;
    Ok(Json(rows))
}
