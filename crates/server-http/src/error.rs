//! JSON error responses and how each registry refusal is answered.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use devid_proto::ErrorBody;

use devid_store::{Refusal, StoreError};

/// A JSON error response.
#[derive(Debug)]
pub struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) code: &'static str,
    pub(crate) message: String,
    /// Seconds for a `Retry-After` header (429).
    pub(crate) retry_after: Option<u64>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// 429 with `Retry-After` (whole seconds, at least 1).
    pub(crate) fn rate_limited(what: &str, wait: std::time::Duration) -> Self {
        let secs = wait
            .as_secs()
            .saturating_add(u64::from(wait.subsec_nanos() > 0))
            .max(1);
        Self {
            status: StatusCode::TOO_MANY_REQUESTS,
            code: "rate_limited",
            message: format!("too many {what} requests from this address; retry after {secs} s"),
            retry_after: Some(secs),
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
        let retry_after = self.retry_after;
        let mut resp = (
            self.status,
            Json(ErrorBody {
                error: self.message,
                code: self.code.to_owned(),
            }),
        )
            .into_response();
        if let Some(secs) = retry_after {
            if let Ok(v) = axum::http::HeaderValue::from_str(&secs.to_string()) {
                resp.headers_mut()
                    .insert(axum::http::header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::internal("database", &e)
    }
}

pub(crate) fn refusal_error(r: Refusal) -> ApiError {
    let status = match r {
        Refusal::TokenUnknown | Refusal::TokenExpired => StatusCode::UNAUTHORIZED,
        Refusal::TokenUsed | Refusal::DeviceExists => StatusCode::CONFLICT,
        Refusal::TokenBoundToOther
        | Refusal::DeviceRevoked
        | Refusal::DeviceSuspended
        | Refusal::CertSuperseded
        | Refusal::KeyChangeRefused => StatusCode::FORBIDDEN,
        Refusal::CredentialExists | Refusal::LastAdminCredential => StatusCode::CONFLICT,
        Refusal::CredentialUnknown => StatusCode::NOT_FOUND,
        Refusal::DeviceUnknown => StatusCode::NOT_FOUND,
        Refusal::AttestationRequired
        | Refusal::AttestationDowngrade
        | Refusal::EkChanged
        | Refusal::EkRegisteredElsewhere
        | Refusal::AkChanged
        | Refusal::EkNotAllowed => StatusCode::FORBIDDEN,
    };
    ApiError::new(status, r.code(), r.message())
}
