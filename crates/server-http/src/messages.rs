//! Reading the telemetry over the HTTPS API (admin bearer token, like every admin route):
//!
//! * `GET /v1/devices/{id}/messages?since=ID&limit=N`: stored messages, oldest first. Without
//!   `since`: the newest `limit`; with it: the first `limit` after row id `since`.
//!   `next_since` continues the listing.
//! * `GET /v1/stream?device=ID`: server-sent events, one `message` event per stored message
//!   (`id:` is the row id), `lagged` when a slow reader skipped some.
//! * `GET /metrics`: Prometheus text format (0.0.4).
//!
//! Payloads are shown as UTF-8 text when they are, base64 otherwise (`payload_encoding`).

use std::convert::Infallible;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use devid_proto::{payload_text, MessagePage, MessageView};
use devid_stdx::rfc3339;
use devid_store::{LiveMessage, StoredMessage};
use futures_util::stream::Stream;
use serde::Deserialize;
use tokio::sync::broadcast::error::RecvError;

use crate::auth::Admin;
use crate::error::ApiError;
use crate::request::{blocking, parse_device_id};
use crate::state::HttpState;

/// Default and largest page size of the messages listing.
pub const DEFAULT_LIMIT: u32 = 100;
/// Largest page size.
pub const MAX_LIMIT: u32 = 10_000;

/// The API's view of a stored row.
pub fn view_stored(m: &StoredMessage) -> MessageView {
    let (enc, payload) = payload_text(&m.payload);
    MessageView {
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

/// The API's view of a message just committed.
pub fn view_live(m: &LiveMessage) -> MessageView {
    let (enc, payload) = payload_text(&m.payload);
    MessageView {
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

/// Query of the messages listing.
#[derive(Debug, Deserialize)]
pub struct ListQuery {
    since: Option<i64>,
    limit: Option<u32>,
}

/// `GET /v1/devices/{id}/messages`.
pub async fn list_messages(
    _admin: Admin,
    State(state): State<HttpState>,
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
    let id = parse_device_id(&id)?;
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT);
    let store = state.messages.clone();
    let rows = blocking(move || store.list(&id, q.since, limit)).await??;
    let messages: Vec<MessageView> = rows.iter().map(view_stored).collect();
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
    State(state): State<HttpState>,
    query: Result<Query<StreamQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let Query(q) = query.map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            "use ?device=ID or no query",
        )
    })?;
    let filter = q.device.as_deref().map(parse_device_id).transpose()?;
    let rx = state.stream.subscribe();
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
                        .json_data(view_live(&m))
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
pub async fn metrics(_admin: Admin, State(state): State<HttpState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        (state.metrics)(),
    )
        .into_response()
}
