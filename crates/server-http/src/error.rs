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

pub(crate) fn refusal_error(r: Refusal) -> ApiError {
    let status = match r {
        Refusal::TokenUnknown | Refusal::TokenExpired => StatusCode::UNAUTHORIZED,
        Refusal::TokenUsed | Refusal::DeviceExists => StatusCode::CONFLICT,
        Refusal::TokenBoundToOther
        | Refusal::DeviceRevoked
        | Refusal::DeviceSuspended
        | Refusal::CertSuperseded
        | Refusal::KeyChangeRefused => StatusCode::FORBIDDEN,
        Refusal::DeviceUnknown => StatusCode::NOT_FOUND,
    };
    ApiError::new(status, r.code(), r.message())
}
