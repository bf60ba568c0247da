//! Reading the telemetry over the HTTPS API (admin bearer token, like every admin route):
//!
//! * `GET /v1/devices/{id}/messages?since=ID&limit=N`: stored messages, oldest first. Without
//!   `since`: the newest `limit`; with it: the first `limit` after row id `since`.
//!   `next_since` continues the listing.
//! * `GET /v1/stream?device=ID`: server-sent events, one `message` event per stored message
//!   (`id:` is the row id), `lagged` when a slow reader skipped some.
//! * `GET /metrics`: Prometheus / OpenMetrics text.
//!
//! Payloads are shown as UTF-8 text when they are, base64 otherwise (`payload_encoding`).

use std::convert::Infallible;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use devid_proto::DeviceId;
use futures_util::stream::Stream;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast::error::RecvError;

use super::commit::LiveMessage;
use crate::api::{Admin, ApiError, AppState};
use crate::store::messages::StoredMessage;
use crate::timeutil::rfc3339;

/// Default and largest page size of the messages listing.
pub const DEFAULT_LIMIT: u32 = 100;
/// Largest page size.
pub const MAX_LIMIT: u32 = 10_000;

/// One message as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageView {
    /// Row id (increasing).
    pub id: i64,
    /// Device id.
    pub device_id: String,
    /// Topic.
    pub topic: String,
    /// QoS it was published with.
    pub qos: u8,
    /// Idempotency key, if any.
    #[serde(default)]
    pub msg_id: Option<String>,
    /// Receive time, RFC 3339 UTC.
    pub received_at: String,
    /// `utf8` or `base64`.
    pub payload_encoding: String,
    /// The payload in that encoding.
    pub payload: String,
}

/// A page of messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessagePage {
    /// Messages, oldest first.
    pub messages: Vec<MessageView>,
    /// Pass as `since` for the next page (the last id shown), absent when the page is empty.
    #[serde(default)]
    pub next_since: Option<i64>,
}

/// Encode a payload for JSON: text when UTF-8, base64 otherwise.
pub fn payload_text(payload: &[u8]) -> (&'static str, String) {
    match std::str::from_utf8(payload) {
        Ok(s) => ("utf8", s.to_owned()),
        Err(_) => (
            "base64",
            base64::engine::general_purpose::STANDARD.encode(payload),
        ),
    }
}

impl MessageView {
    /// From a stored row.
    pub fn from_stored(m: &StoredMessage) -> Self {
        let (enc, payload) = payload_text(&m.payload);
        Self {
            id: m.id,
            device_id: m.device_id.clone(),
            topic: m.topic.clone(),
            qos: m.qos,
            msg_id: m.msg_id.clone(),
            received_at: rfc3339(m.received_ms),
            payload_encoding: enc.to_owned(),
            payload,
        }
    }

    /// From a message just committed.
    pub fn from_live(m: &LiveMessage) -> Self {
        let (enc, payload) = payload_text(&m.payload);
        Self {
            id: m.id,
            device_id: m.device_id.to_string(),
            topic: m.topic.to_string(),
            qos: m.qos,
            msg_id: m.msg_id.as_ref().map(|s| s.to_string()),
            received_at: rfc3339(m.received_ms),
            payload_encoding: enc.to_owned(),
            payload,
        }
    }

    /// The payload bytes back.
    pub fn payload_bytes(&self) -> Option<Vec<u8>> {
        match self.payload_encoding.as_str() {
            "utf8" => Some(self.payload.as_bytes().to_vec()),
            "base64" => base64::engine::general_purpose::STANDARD
                .decode(&self.payload)
                .ok(),
            _ => None,
        }
    }
}

fn device_id(s: &str) -> Result<DeviceId, ApiError> {
    DeviceId::parse(s)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_device_id", e.to_string()))
}

/// Query of the messages listing.
#[derive(Debug, Deserialize)]
pub struct ListQuery {
    since: Option<i64>,
    limit: Option<u32>,
}

/// `GET /v1/devices/{id}/messages`.
pub async fn list_messages(
    _admin: Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<MessagePage>, ApiError> {
    let Query(q) = query.map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            "use ?since=ID&limit=N (integers)",
        )
    })?;
    let id = device_id(&id)?;
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT);
    let store = state.telemetry.messages.clone();
    let rows = tokio::task::spawn_blocking(move || store.list(&id, q.since, limit))
        .await
        .map_err(|e| ApiError::internal("blocking task", &e))??;
    let messages: Vec<MessageView> = rows.iter().map(MessageView::from_stored).collect();
    Ok(Json(MessagePage {
        next_since: messages.last().map(|m| m.id).or(q.since),
        messages,
    }))
}

/// Query of the live stream.
#[derive(Debug, Deserialize)]
pub struct StreamQuery {
    device: Option<String>,
}

/// `GET /v1/stream`: server-sent events.
pub async fn stream(
    _admin: Admin,
    State(state): State<AppState>,
    query: Result<Query<StreamQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let Query(q) = query.map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            "use ?device=ID or no query",
        )
    })?;
    let filter = q.device.as_deref().map(device_id).transpose()?;
    let rx = state.telemetry.stream.subscribe();
    let events = futures_util::stream::unfold((rx, filter), |(mut rx, filter)| async move {
        loop {
            match rx.recv().await {
                Ok(m) => {
                    if filter.as_ref().is_some_and(|d| d.as_str() != &*m.device_id) {
                        continue;
                    }
                    let event = Event::default()
                        .event("message")
                        .id(m.id.to_string())
                        .json_data(MessageView::from_live(&m))
                        .unwrap_or_else(|_| Event::default().comment("unencodable message"));
                    return Some((Ok(event), (rx, filter)));
                }
                Err(RecvError::Lagged(n)) => {
                    let event = Event::default().event("lagged").data(n.to_string());
                    return Some((Ok(event), (rx, filter)));
                }
                Err(RecvError::Closed) => return None,
            }
        }
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}

/// `GET /metrics`.
pub async fn metrics(_admin: Admin, State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.telemetry.metrics.encode(),
    )
        .into_response()
}
